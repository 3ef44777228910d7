//! The `abridge` command: parses flags, runs the library, maps errors to exit codes
//! ([`EXIT_CODES`]; `PipelineError::exit_code`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use abridge_operators::OperatorError;
use abridge_operators::encoder::EncoderWorker;
use abridge_operators::encoder::bert::BertEncoder;
use abridge_operators::index::TicketIndex;
use abridge_operators::stop::{StopLevel, StopSignal};
use abridge_pipeline::PipelineError;
use abridge_pipeline::eval::{self, AlertOverrides, EvalOptions, Recompute};
use abridge_pipeline::executor::{self, RunOptions};
use abridge_pipeline::job::Job;
use abridge_pipeline::progress::{ProgressMode, ProgressReporter};
use abridge_pipeline::report;
use abridge_pipeline::retrieval::{self, SearchMode};
use abridge_pipeline::sample::{SampleOptions, write_sample};
use abridge_pipeline::sql::{OutputFormat, SqlSession, write_results};
use abridge_pipeline::table::manifest::{RunManifest, ShardRecord};
use abridge_pipeline::table::plan::ResumeMode;
use anyhow::Context;
use candle_core::Device;
use clap::{Args, Parser, Subcommand};

/// Summarize large tables of documents with small language models.
///
/// abridge reads tickets (or news, reports) from Parquet, processes them in a streaming
/// pipeline described by a job file, and writes the results as a new run of a Parquet
/// output table that `abridge sql` can query.
#[derive(Parser)]
#[command(name = "abridge", version, propagate_version = true, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job: read its input, process every ticket, write a new run of its output table.
    ///
    /// The run is written to OUTPUT/run_id=<id>/ (OUTPUT is the job's output.path) with
    /// the resolved job (_job.toml) and a manifest of counts and timings (_run.json).
    ///
    /// Examples:
    ///   abridge run jobs/demo.toml
    ///   abridge run jobs/demo.toml --limit 100 --set output.path=/tmp/try
    ///   abridge run jobs/nightly.toml --set "input.where=language = 'zh'" --json
    ///
    /// Rows are committed in files of output.commit_every_rows rows, or every
    /// output.commit_every_s seconds on a slow run: a killed run, run again, keeps what
    /// it committed and does the rest. SIGTERM or Ctrl-C stops reading input, lets the
    /// rows in flight finish and commit for up to run.stop_grace_s seconds, and exits
    /// 143 or 130; a second signal stops at once (nothing half-written is kept).
    #[command(verbatim_doc_comment, after_help = EXIT_CODES)]
    Run(RunArgs),
    /// Run read-only SQL over output tables and any Parquet files.
    ///
    /// With a job (default: jobs/demo.toml when it exists) its output table is registered:
    /// `summaries` is its latest committed run, `runs` all its committed runs. More tables
    /// come from --table NAME=PATH (a Parquet file, a folder or a glob).
    ///
    /// Examples:
    ///   abridge sql "SELECT category, count(*) FROM summaries GROUP BY category"
    ///   abridge sql "SELECT run_id, count(*) FROM runs GROUP BY run_id"
    ///   abridge sql "SELECT * FROM t LIMIT 5" --table t=data/tickets.parquet --format json
    ///   abridge sql "SELECT id, text FROM summaries" --format parquet --out ids.parquet
    #[command(verbatim_doc_comment)]
    Sql(SqlArgs),
    /// Search a job's index: by words (BM25), by meaning (sentence vectors), or both.
    ///
    /// The index is the one the job's [index] section names (default job: jobs/demo.toml
    /// when it exists) or a folder given with --index; it holds every ticket of the job's
    /// committed runs. Hybrid mode fuses the BM25 and vector rankings by reciprocal rank;
    /// vector and hybrid modes embed the query with the encoder that built the index.
    /// Chinese queries work in every mode (BM25 indexes one token per CJK character).
    ///
    /// Examples:
    ///   abridge search "printer prints blank pages"
    ///   abridge search "打印机无法连接" --k 5 --format json
    ///   abridge search "invoice charged twice" --mode bm25 --index out/demo-index
    #[command(verbatim_doc_comment)]
    Search(SearchArgs),
    /// Measure historical runs again, and compare two runs on the tickets both summarized.
    ///
    /// Reads the committed runs of an output table (all, or those named with --run),
    /// recomputes ROUGE against a reference (a column of the runs, or of another table
    /// joined on id), compression, drift (from the stored vectors) and the alerts, and
    /// writes a new evaluation table: RUNS/_eval/<id>/evaluation.parquet, summary.json,
    /// and report.html (a self-contained page of plots and the worst summaries).
    /// The runs themselves are never written. With --compare, prints per measure the means
    /// on the shared tickets and the paired wins (higher ROUGE or drift wins).
    ///
    /// Examples:
    ///   abridge eval --runs out/demo
    ///   abridge eval --runs out/demo --reference-table gold.parquet --reference summary --stem
    ///   abridge eval --runs out/demo --compare RUN_A RUN_B --json
    #[command(verbatim_doc_comment)]
    Eval(EvalArgs),
    /// Write a synthetic ticket table (English and Chinese help-desk tickets with reference
    /// summaries), the same for the same seed.
    ///
    /// Columns: ticket_id, subject, body, category, priority, status, language, customer,
    /// opened_at, resolution_summary. Like real exports, about 1% of rows re-send an
    /// earlier ticket and 1% have an empty body (leave them out with --clean).
    ///
    /// Example:
    ///   abridge sample --rows 100000 --seed 7 --out data/tickets-100k.parquet
    Sample(SampleArgs),
    /// Show the live and recent runs of a job's output table: state, rows, rate, ETA and
    /// the process writing it.
    ///
    /// Reads the run folders' manifests (refreshed at every commit) and the output's lock
    /// files, so it works from any shell or pod that sees the output folder. States:
    /// running (a live process holds it), stopped (killed: its next run continues it),
    /// interrupted (by a signal: likewise), failed, committed.
    ///
    /// Examples:
    ///   abridge status jobs/nightly.toml
    ///   watch -n 10 abridge status jobs/nightly.toml
    ///   abridge status --output /data/out/nightly --json
    #[command(verbatim_doc_comment)]
    Status(StatusArgs),
}

#[derive(Args)]
struct StatusArgs {
    /// The job whose output table to show [default: jobs/demo.toml when it exists].
    #[arg(conflicts_with = "output")]
    job: Option<PathBuf>,
    /// An output folder (a job's output.path) instead of a job.
    #[arg(long, value_name = "DIR")]
    output: Option<PathBuf>,
    /// How many of the newest runs to show.
    #[arg(long, default_value_t = 10)]
    last: usize,
    /// Print the runs as a JSON array.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RunArgs {
    /// The job file (TOML).
    job: PathBuf,
    /// Override a job-file key, e.g. --set input.path=other.parquet (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Read at most N input rows (after input.where).
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// No progress and no summary; errors only.
    #[arg(long, short)]
    quiet: bool,
    /// Print the run's manifest as JSON on stdout when it ends.
    #[arg(long)]
    json: bool,
    /// Continue the job's unfinished run (killed, failed or interrupted): rows its earlier
    /// attempts committed are kept, the rest are processed. Without this flag a run still
    /// continues an unfinished run of the same job, and says so; with it, having nothing
    /// to continue is an error.
    #[arg(long, conflicts_with = "fresh")]
    resume: bool,
    /// Start a new run even if the last one did not finish (it is left as it was).
    #[arg(long)]
    fresh: bool,
    /// Process only shard I of N (0 ≤ I < N): the tickets whose stable id hash falls in
    /// it. The N shards, run anywhere, together process the input once; their output
    /// folders form one run of the table. Needs --run-group.
    #[arg(long, value_name = "I/N", value_parser = parse_shard, requires = "run_group")]
    shard: Option<(u32, u32)>,
    /// The name the shards of one run share (e.g. the scheduler's job name or the night's
    /// date). A shard's folder is run_id=GROUP.IofN; rerunning it resumes it.
    #[arg(long, value_name = "NAME", requires = "shard", value_parser = parse_group)]
    run_group: Option<String>,
}

fn parse_shard(value: &str) -> Result<(u32, u32), String> {
    let (i, n) = value
        .split_once('/')
        .ok_or_else(|| format!("`{value}`: expected I/N, e.g. 0/4"))?;
    let number = |s: &str| {
        s.trim()
            .parse::<u32>()
            .map_err(|_| format!("`{value}`: `{s}` is not a whole number"))
    };
    let (i, n) = (number(i)?, number(n)?);
    if n == 0 || i >= n {
        return Err(format!(
            "`{value}`: the shard number must be below the shard count (0 ≤ I < N)"
        ));
    }
    Ok((i, n))
}

fn parse_group(value: &str) -> Result<String, String> {
    let fine = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    match fine {
        true => Ok(value.to_string()),
        false => Err(format!(
            "`{value}`: use letters, digits, `-`, `_` and `.` (it names a folder)"
        )),
    }
}

#[derive(Args)]
struct SqlArgs {
    /// The SQL query.
    query: String,
    /// Register a Parquet file, folder or glob as a table (repeatable).
    #[arg(long = "table", value_name = "NAME=PATH")]
    tables: Vec<String>,
    /// The job whose output table is registered as `summaries` and `runs`
    /// [default: jobs/demo.toml when it exists].
    #[arg(long, value_name = "JOB.toml")]
    job: Option<PathBuf>,
    /// How to print the result.
    #[arg(long, value_enum, default_value = "table")]
    format: OutputFormat,
    /// Write the result to this file instead of stdout (required for parquet).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Threads the query may use [default: one per core].
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
}

#[derive(Args)]
struct EvalArgs {
    /// The output table (a job's output.path) whose runs to evaluate.
    #[arg(long, value_name = "DIR")]
    runs: PathBuf,
    /// A run to evaluate (repeatable) [default: every committed run].
    #[arg(long = "run", value_name = "ID")]
    run_ids: Vec<String>,
    /// The reference column, in the runs or in --reference-table.
    #[arg(long, value_name = "COLUMN", default_value = "reference")]
    reference: String,
    /// The column to measure (another model's output carried in the runs, say).
    #[arg(long, value_name = "COLUMN", default_value = "summary")]
    summary: String,
    /// A Parquet file, folder or glob holding `id` and the reference column.
    #[arg(long, value_name = "PATH")]
    reference_table: Option<String>,
    /// Porter-stem words before ROUGE (rouge-score's use_stemmer).
    #[arg(long)]
    stem: bool,
    /// The measures to compute again; the others are read from the runs.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "rouge,drift,compression"
    )]
    recompute: Vec<Recompute>,
    /// Embed text and summary again with this encoder folder for drift (default: the
    /// vectors stored in the runs).
    #[arg(long, value_name = "DIR")]
    encoder: Option<PathBuf>,
    /// Compare two runs on the tickets both summarized.
    #[arg(long, num_args = 2, value_names = ["RUN_A", "RUN_B"])]
    compare: Vec<String>,
    /// Where to write the evaluation [default: RUNS/_eval/<id>].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Alert when drift is below this [default: each run's own `[metrics.alerts]`].
    #[arg(long, value_name = "X")]
    drift_min: Option<f64>,
    /// Alert when compression is below this [default: each run's own].
    #[arg(long, value_name = "X")]
    compression_min: Option<f64>,
    /// Alert when compression is above this [default: each run's own].
    #[arg(long, value_name = "X")]
    compression_max: Option<f64>,
    /// Alert when stability is above this [default: each run's own].
    #[arg(long, value_name = "X")]
    stability_max: Option<f64>,
    /// Print the summary (and comparison) as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SearchArgs {
    /// What to look for, in any words.
    query: String,
    /// The job whose index to search [default: jobs/demo.toml when it exists].
    #[arg(long, value_name = "JOB.toml", conflicts_with = "index")]
    job: Option<PathBuf>,
    /// An index folder to search instead of a job's.
    #[arg(long, value_name = "DIR")]
    index: Option<PathBuf>,
    /// Number of results.
    #[arg(long, short, default_value_t = 10)]
    k: usize,
    /// How to rank.
    #[arg(long, value_enum, default_value = "hybrid")]
    mode: SearchMode,
    /// How to print the hits: an aligned table, or a JSON array of objects with id,
    /// score, title, text, topic and run_id.
    #[arg(long, value_enum, default_value = "table")]
    format: HitFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum HitFormat {
    Table,
    Json,
}

#[derive(Args)]
struct SampleArgs {
    /// Number of tickets.
    #[arg(long, default_value_t = 1000)]
    rows: usize,
    /// Seed: the same seed gives the same table.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// The Parquet file to write.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// No duplicate ids and no empty bodies.
    #[arg(long)]
    clean: bool,
}

const DEFAULT_JOB: &str = "jobs/demo.toml";

/// `job`, or [`DEFAULT_JOB`] when none was given and it exists; otherwise a usage error
/// that says what to `pass` instead.
fn job_or_default(job: Option<&PathBuf>, pass: &str) -> Result<PathBuf, PipelineError> {
    match job {
        Some(job) => Ok(job.clone()),
        None if Path::new(DEFAULT_JOB).exists() => Ok(PathBuf::from(DEFAULT_JOB)),
        None => Err(PipelineError::Usage(format!(
            "no job given and no {DEFAULT_JOB} here: pass {pass}"
        ))),
    }
}

/// What each exit code means, for schedulers (`--help` of abridge and of `abridge run`).
const EXIT_CODES: &str = "\
Exit codes:
  0    done (a run: committed)
  1    failed on its data or environment (a run keeps what it committed; run it again to continue)
  2    usage, job-file or SQL error: fix the command
  3    committed, but some input files could not be read (named in _run.json)
  75   another live run holds the output's lock, or took it over from this one: retry later
  130  stopped by SIGINT (Ctrl-C), 143 by SIGTERM: run it again to continue";

fn main() -> ExitCode {
    // A panic inside a guarded read of an input file becomes that file's error (named in
    // the run's summary): no panic message for it.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !abridge_operators::scan::inside_guarded_read() {
            report(info);
        }
    }));
    let cli = Cli::parse();
    // Failpoints named by FAILPOINTS (test builds only; see operators' fault tests).
    let _failpoints = fail::FailScenario::setup();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Sql(args) => sql(args).await,
            Command::Search(args) => search(args).await,
            Command::Eval(args) => eval(args).await,
            Command::Sample(args) => sample(&args),
            Command::Status(args) => status(&args),
        }
    });
    // Whatever a stopped run left on blocking threads (a model still loading, say) has no
    // more effect: its writer was joined and its manifest written. Do not wait for it.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", message(&err));
            let code = err
                .chain()
                .find_map(|e| e.downcast_ref::<PipelineError>())
                .map_or(1, PipelineError::exit_code);
            ExitCode::from(code)
        }
    }
}

/// The error and its causes, each cause only where the text so far does not already say it
/// (library errors name their source in their own message).
fn message(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
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
    let mode = ProgressMode::detect(args.quiet || args.json);
    if !args.quiet {
        for note in prepared.notes() {
            eprintln!("note: {note}");
        }
    }
    if mode != ProgressMode::Off {
        eprintln!(
            "run {} → {}",
            prepared.run_id(),
            prepared.run_dir().display()
        );
    }
    let reporter = ProgressReporter::start(prepared.progress(), mode);
    let result = prepared.execute().await;
    reporter.finish().await;
    let manifest = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&manifest)?);
    } else if !args.quiet {
        eprint!("{}", summary(&manifest));
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
                eprintln!("\n{name}: {message}");
            }
        }
    });
    Ok(())
}

fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let output = match (&args.output, &args.job) {
        (Some(output), _) => output.clone(),
        (None, job) => {
            let path = job_or_default(job.as_ref(), "a job or --output DIR")?;
            Job::load(&path, &[])
                .map_err(PipelineError::from)?
                .config
                .output
                .path
        }
    };
    let runs = abridge_pipeline::status::recent_runs(&output, args.last)
        .with_context(|| format!("cannot read the runs of {}", output.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&runs)?);
    } else if runs.is_empty() {
        println!("no runs in {}", output.display());
    } else {
        print!("{}", abridge_pipeline::status::table(&runs));
    }
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

async fn eval(args: EvalArgs) -> anyhow::Result<()> {
    // Compared runs are evaluated (alone, unless --run names more).
    let mut run_ids = args.run_ids.clone();
    for id in &args.compare {
        if !run_ids.contains(id) {
            run_ids.push(id.clone());
        }
    }
    let options = EvalOptions {
        runs: args.runs.clone(),
        run_ids,
        summary: args.summary.clone(),
        reference: args.reference.clone(),
        reference_table: args.reference_table.clone(),
        stem: args.stem,
        recompute: args.recompute.clone(),
        encoder: args.encoder.clone(),
        thresholds: AlertOverrides {
            drift_min: args.drift_min,
            compression_min: args.compression_min,
            compression_max: args.compression_max,
            stability_max: args.stability_max,
        },
        out: args.out.clone(),
    };
    let evaluation = eval::evaluate(&options).await?;
    let comparison = match args.compare.as_slice() {
        [a, b] => Some(eval::compare(&evaluation, a, b).await?),
        _ => None,
    };
    if let Some(comparison) = &comparison {
        let text = serde_json::to_string_pretty(comparison)?;
        let path = evaluation.dir.join("comparison.json");
        std::fs::write(&path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    report::write_report(
        &evaluation.dir.join("report.html"),
        &evaluation,
        comparison.as_ref(),
    )?;
    if args.json {
        let out = serde_json::json!({
            "dir": evaluation.dir,
            "runs": evaluation.runs,
            "comparison": comparison,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let mean = |m: &BTreeMap<String, Option<f64>>, k: &str| match m.get(k).copied().flatten() {
        Some(v) => format!("{v:.3}"),
        None => "-".into(),
    };
    println!("evaluation → {}", evaluation.dir.display());
    println!(
        "  {:<32} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}",
        "run", "rows", "no ref", "rouge1", "rouge2", "rouge_l", "drift", "compr.", "alerted"
    );
    for run in &evaluation.runs {
        println!(
            "  {:<32} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}",
            run.run_id,
            run.summarized,
            run.without_reference,
            mean(&run.means, "rouge1"),
            mean(&run.means, "rouge2"),
            mean(&run.means, "rouge_l"),
            mean(&run.means, "drift"),
            mean(&run.means, "compression"),
            run.alerts.values().sum::<u64>(),
        );
    }
    if let Some(c) = &comparison {
        println!(
            "\n{} vs {} on {} shared tickets",
            c.run_a, c.run_b, c.shared
        );
        println!(
            "  {:<12} {:>8} {:>8} {:>7} {:>7} {:>7}",
            "measure", "mean A", "mean B", "A wins", "B wins", "ties"
        );
        let num = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3}"));
        let count = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
        for m in &c.measures {
            println!(
                "  {:<12} {:>8} {:>8} {:>7} {:>7} {:>7}",
                m.measure,
                num(m.mean_a),
                num(m.mean_b),
                count(m.a_wins),
                count(m.b_wins),
                count(m.ties)
            );
        }
        for (alert, (a, b)) in &c.alerts {
            println!("  alert {alert:<20} A {a:>5}  B {b:>5}");
        }
    }
    Ok(())
}

async fn sql(args: SqlArgs) -> anyhow::Result<()> {
    if args.format == OutputFormat::Parquet && args.out.is_none() {
        return Err(PipelineError::Usage("--format parquet needs --out FILE".into()).into());
    }
    let mut session = match args.threads {
        Some(threads) => SqlSession::with_threads(threads),
        None => SqlSession::new(),
    };
    let job_path = match args.job {
        Some(job) => Some(job),
        None => Some(PathBuf::from(DEFAULT_JOB)).filter(|p| p.exists()),
    };
    if let Some(path) = &job_path {
        let job = Job::load(path, &[]).map_err(PipelineError::from)?;
        session.register_output(&job.config.output.path).await?;
    }
    for table in &args.tables {
        let (name, path) = table
            .split_once('=')
            .ok_or_else(|| PipelineError::Usage(format!("--table {table}: expected NAME=PATH")))?;
        session.register_path(name.trim(), path.trim()).await?;
    }
    let (schema, batches) = match session.query(&args.query).await {
        Ok(result) => result,
        Err(err) => {
            let text = err.to_string();
            let has_defaults = session.tables().iter().any(|t| t == "summaries");
            if has_defaults || !(text.contains("summaries") || text.contains("runs")) {
                return Err(err.into());
            }
            let hint = match &job_path {
                Some(job) => format!(
                    "no committed run of {} yet: run `abridge run {}` first",
                    job.display(),
                    job.display()
                ),
                None => format!(
                    "no job given and no {DEFAULT_JOB} here: pass --job or --table NAME=PATH"
                ),
            };
            return Err(anyhow::Error::new(err).context(hint));
        }
    };
    match &args.out {
        Some(path) => {
            let file = std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            write_results(
                &schema,
                &batches,
                args.format,
                std::io::BufWriter::new(file),
            )?;
        }
        None => {
            let stdout = std::io::BufWriter::new(std::io::stdout());
            write_results(&schema, &batches, args.format, stdout)?;
        }
    }
    Ok(())
}

async fn search(args: SearchArgs) -> anyhow::Result<()> {
    let (dir, model, batch_size) = match (&args.index, &args.job) {
        (Some(dir), _) => (dir.clone(), None, 32),
        (None, job) => {
            let path = job_or_default(job.as_ref(), "--job or --index DIR")?;
            let job = Job::load(&path, &[]).map_err(PipelineError::from)?;
            let Some(index) = &job.config.index else {
                return Err(PipelineError::Usage(format!(
                    "job {} has no [index] section, so there is nothing to search",
                    path.display()
                ))
                .into());
            };
            let embed = job.config.embed.as_ref();
            (
                index.path.clone(),
                embed.map(|e| e.model.clone()),
                embed.map_or(32, |e| e.batch_size),
            )
        }
    };
    let index = TicketIndex::open(&dir).map_err(retrieval::index_error)?;
    let encoder = if args.mode == SearchMode::Bm25 {
        None
    } else {
        let model = model.unwrap_or_else(|| index.meta().model.clone());
        let encoder = BertEncoder::load(&model, &Device::Cpu, batch_size)
            .and_then(|e| EncoderWorker::spawn(Arc::new(e)))
            .map_err(|e| PipelineError::Model {
                job: dir.clone(),
                source: Box::new(OperatorError::Encoder(Box::new(e))),
            })
            .context("vector search embeds the query (or use --mode bm25)")?;
        let meta = index.meta();
        if let Some(reason) = meta.mismatch(encoder.dim(), &model, encoder.fingerprint()) {
            return Err(PipelineError::Usage(format!(
                "index {}: {reason}; search it with the encoder that made it, or use --mode bm25",
                dir.display()
            ))
            .into());
        }
        Some(encoder)
    };
    let hits = retrieval::search(&index, encoder.as_ref(), &args.query, args.k, args.mode).await?;
    let mut out = std::io::BufWriter::new(std::io::stdout());
    match args.format {
        HitFormat::Json => {
            serde_json::to_writer_pretty(&mut out, &hits)?;
            writeln!(out)?;
        }
        HitFormat::Table => {
            if hits.is_empty() {
                eprintln!("no match in {} for {:?}", dir.display(), args.query);
            }
            for (rank, hit) in hits.iter().enumerate() {
                let mut line = hit
                    .title
                    .clone()
                    .map(|t| format!("{t} — "))
                    .unwrap_or_default();
                line.push_str(&hit.text);
                let line: String = line.split_whitespace().collect::<Vec<_>>().join(" ");
                writeln!(
                    out,
                    "{:>3}  {:>8.4}  {:<12}  {:<12}  {}",
                    rank + 1,
                    hit.score,
                    hit.id,
                    hit.topic.as_deref().unwrap_or("-"),
                    clip(&line, 90)
                )?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// `text` cut to `chars` characters, with an ellipsis when cut.
fn clip(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

fn sample(args: &SampleArgs) -> anyhow::Result<()> {
    let options = SampleOptions {
        rows: args.rows,
        seed: args.seed,
        clean: args.clean,
    };
    write_sample(&options, &args.out)?;
    eprintln!(
        "wrote {} tickets (seed {}) to {}",
        args.rows,
        args.seed,
        args.out.display()
    );
    Ok(())
}
