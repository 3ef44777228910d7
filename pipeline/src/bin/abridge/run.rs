//! `abridge run`: a job's run, driven from the command line (signals, progress, summary).

use abridge_operators::stop::{StopLevel, StopSignal};
use abridge_pipeline::PipelineError;
use abridge_pipeline::executor::{self, RunOptions};
use abridge_pipeline::job::Job;
use abridge_pipeline::progress::{ProgressMode, ProgressReporter};
use abridge_pipeline::table::manifest::{RunManifest, ShardRecord};
use abridge_pipeline::table::plan::ResumeMode;
use anyhow::Context;

use crate::args::RunArgs;
use crate::logging::LogFormat;

pub async fn run(args: RunArgs, log_format: LogFormat) -> anyhow::Result<()> {
    let stop = StopSignal::default();
    forward_signals(&stop, args.quiet)?;
    let job = Job::load(&args.job, &args.set).map_err(PipelineError::from)?;
    let options = RunOptions {
        limit: args.limit,
        resume: match (args.resume, args.fresh) {
            (true, _) => ResumeMode::Required,
            (_, true) => ResumeMode::Fresh,
            _ => ResumeMode::Auto,
        },
        shard: args
            .shard
            .zip(args.run_group.clone())
            .map(|((index, count), group)| ShardRecord {
                index,
                count,
                group,
            }),
        stop: stop.clone(),
    };
    // Loading models can take minutes: a signal meanwhile ends the run before it writes.
    let prepared = tokio::select! {
        prepared = executor::prepare(job, &options) => prepared?,
        () = stop.reached(StopLevel::Drain) => {
            return Err(match stop.reason() {
                Some(reason) => PipelineError::LockLost { reason },
                None => PipelineError::Interrupted { signal: stop.signal(), run: None },
            }
            .into());
        }
    };
    let mode = match ProgressMode::detect(args.quiet || args.json) {
        ProgressMode::Bar if log_format == LogFormat::Json => ProgressMode::Log,
        mode => mode,
    };
    let run_id = prepared.run_id().to_string();
    if !args.quiet {
        for note in prepared.notes() {
            tracing::warn!(run_id, "{note}");
        }
    }
    if mode != ProgressMode::Off {
        let dir = prepared.run_dir().display().to_string();
        tracing::info!(run_id, dir, "run {run_id} → {dir}");
    }
    let reporter = ProgressReporter::start(prepared.progress(), mode);
    let result = prepared.execute().await;
    reporter.finish().await;
    let manifest = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&manifest)?);
    } else if !args.quiet {
        match log_format {
            LogFormat::Text => eprint!("{}", summary(&manifest)),
            LogFormat::Json => tracing::info!(
                run_id = manifest.run_id,
                rows_read = manifest.rows_read,
                rows_written = manifest.rows_written,
                rows_failed = manifest.rows_failed,
                rows_filtered = manifest.rows_filtered,
                elapsed_s = manifest.elapsed_s,
                "run {} committed",
                manifest.run_id
            ),
        }
    }
    if !manifest.input_files_failed.is_empty() {
        return Err(PipelineError::InputFilesSkipped {
            run_id: manifest.run_id.clone(),
            files: manifest
                .input_files_failed
                .iter()
                .map(|f| f.error.clone())
                .collect(),
        }
        .into());
    }
    Ok(())
}

/// SIGINT and SIGTERM become stop requests: the first drains the run, the next stops it
/// at once (see `abridge run --help`).
fn forward_signals(stop: &StopSignal, quiet: bool) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let stop = stop.clone();
    tokio::spawn(async move {
        loop {
            let (name, number) = tokio::select! {
                _ = interrupt.recv() => ("SIGINT", abridge_pipeline::error::SIGINT),
                _ = terminate.recv() => ("SIGTERM", abridge_pipeline::error::SIGTERM),
            };
            let message = match stop.request(Some(number)) {
                StopLevel::Drain => {
                    "reading no more input; finishing and committing the rows \
                     in flight (up to run.stop_grace_s); send it again to stop at once"
                }
                _ => "stopping at once; what was committed is kept",
            };
            if !quiet {
                tracing::info!(signal = name, "{name}: {message}");
            }
        }
    });
    Ok(())
}

fn summary(m: &RunManifest) -> String {
    let attempts = match m.attempts {
        1 => String::new(),
        n => format!(" (attempt {n})"),
    };
    let mut out = format!(
        "run {} committed in {:.1}s{attempts}: {} rows written ({} with errors, {} filtered out)\n",
        m.run_id, m.elapsed_s, m.rows_written, m.rows_failed, m.rows_filtered,
    );
    // Row conservation, as checked at the end of the run: every row read is accounted for.
    let new_rows = m.rows_read.saturating_sub(
        m.rows_resumed + m.rows_skipped_done + m.rows_other_shards + m.duplicates_dropped,
    );
    let mut parts = vec![format!("{new_rows} written now")];
    for (n, what) in [
        (m.rows_resumed, "committed by earlier attempts"),
        (m.rows_skipped_done, "done by earlier runs (skip_done)"),
        (m.rows_other_shards, "in other shards"),
        (m.duplicates_dropped, "duplicates"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {what}"));
        }
    }
    out.push_str(&format!(
        "  {} rows read = {}\n",
        m.rows_read,
        parts.join(" + ")
    ));
    for q in &m.queries {
        out.push_str(&format!(
            "  query {:?} (threshold {:.3}) kept {} tickets{}\n",
            q.query,
            q.threshold,
            q.kept,
            if q.kept == 0 {
                ": lower its threshold?"
            } else {
                ""
            }
        ));
    }
    out.push_str(&format!(
        "  {:<13} {:>10} {:>10} {:>8} {:>8} {:>9} {:>9}\n",
        "stage", "rows in", "rows out", "failed", "dropped", "filtered", "busy ms"
    ));
    for s in &m.stages {
        let x = &s.metrics;
        out.push_str(&format!(
            "  {:<13} {:>10} {:>10} {:>8} {:>8} {:>9} {:>9}\n",
            s.stage,
            x.rows_in,
            x.rows_out,
            x.rows_failed,
            x.rows_dropped,
            x.rows_filtered,
            x.busy_ms
        ));
    }
    out
}
