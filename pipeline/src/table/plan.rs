//! **open**'s second half: which run folder a run writes, and what earlier attempts of it
//! committed.
//!
//! A run's published files are its checkpoint: each is complete (written under a hidden
//! name, fsynced, renamed), so after a crash the rows in them are exactly the rows that
//! survive. Resuming reopens the run's folder, keeps those files, and processes the input
//! again with their rows' keys (`dedup::row_key`) skipped; the finished run holds each
//! input row once.

use std::path::{Path, PathBuf};

use abridge_operators::scope::DoneTickets;
use abridge_operators::sink::{SinkReport, published_files, read_columns};
use abridge_schemas::output::{CONTENT_HASH, ERROR};
use arrow::array::{Array, StringArray};

use crate::error::PipelineError;
use crate::job::record_differences;
use crate::table::RunRecord;
use crate::table::manifest::{
    self as run, JOB_RECORD, RUN_DIR_PREFIX, RunManifest, RunStatus, ShardRecord, committed_runs,
};

/// Whether a run may, must or must not continue an unfinished one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ResumeMode {
    /// Continue the job's last run if it did not finish and has the same job; otherwise
    /// start a new one.
    #[default]
    Auto,
    /// Continue the last run; refuse when there is none to continue (`--resume`).
    Required,
    /// Start a new run whatever the last one did (`--fresh`).
    Fresh,
}

/// The run folder a run writes and what is already in it.
#[derive(Debug)]
pub struct Attempt {
    pub run_id: String,
    pub run_dir: PathBuf,
    /// The manifest of the earlier attempts, when this one resumes them.
    pub resumed: Option<RunManifest>,
    /// Files earlier attempts published.
    pub previous: SinkReport,
    /// The keys of their rows (`dedup::row_key`).
    pub committed_keys: Vec<u128>,
    /// What to tell the user about the choice.
    pub note: Option<String>,
}

impl Attempt {
    fn fresh(job: &RunRecord, run_id: String, note: Option<String>) -> Self {
        let run_dir = job.output.join(format!("{RUN_DIR_PREFIX}{run_id}"));
        Self {
            run_id,
            run_dir,
            resumed: None,
            previous: SinkReport::default(),
            committed_keys: Vec::new(),
            note,
        }
    }

    fn resume(run_dir: PathBuf, manifest: RunManifest) -> Result<Self, PipelineError> {
        let (previous, committed_keys) =
            published_files(&run_dir).map_err(|source| PipelineError::RunFailed {
                run_id: manifest.run_id.clone(),
                run_dir: run_dir.clone(),
                source: Box::new(source),
            })?;
        let note = format!(
            "resuming run {} (attempt {}): {} rows in {} files committed by earlier attempts are kept",
            manifest.run_id,
            manifest.attempts + 1,
            previous.rows,
            previous.files.len()
        );
        Ok(Self {
            run_id: manifest.run_id.clone(),
            run_dir,
            resumed: Some(manifest),
            previous,
            committed_keys,
            note: Some(note),
        })
    }
}

/// Chooses the run folder: the unfinished run to continue, or a new one. The caller holds
/// the output's lock (or the shard's).
/// `fresh_id` is the id of a new run, if one is started.
pub fn plan(
    job: &RunRecord,
    mode: ResumeMode,
    limit: Option<usize>,
    shard: Option<&ShardRecord>,
    fresh_id: &str,
) -> Result<Attempt, PipelineError> {
    let output = &job.output;
    let io = |source| PipelineError::Io {
        path: output.clone(),
        source,
    };
    run::remove_staged_dirs(output, shard.map(ShardRecord::run_id).as_deref()).map_err(io)?;
    let unfinished = match shard {
        Some(shard) => {
            let run_dir = output.join(format!("{RUN_DIR_PREFIX}{}", shard.run_id()));
            match RunManifest::read(&run_dir) {
                Ok(m) if m.status == RunStatus::Committed => {
                    return Err(PipelineError::Usage(format!(
                        "shard {}/{} of run group `{}` is already committed ({}); use another \
                         --run-group for a new run",
                        shard.index,
                        shard.count,
                        shard.group,
                        run_dir.display()
                    )));
                }
                Ok(m) => Some((run_dir, m)),
                Err(_) => None,
            }
        }
        None => run::unfinished_run(output).map_err(io)?,
    };
    let Some((run_dir, manifest)) = unfinished else {
        let last = committed_runs(output).map_err(io)?.pop();
        if let (ResumeMode::Required, Some((_, last))) = (mode, last) {
            return Err(PipelineError::Usage(format!(
                "--resume: job {} has no unfinished run to continue (its last run, {}, is \
                 committed); run it without --resume for a new run",
                job.job_file.display(),
                last.run_id
            )));
        }
        let note = (mode == ResumeMode::Required)
            .then(|| "--resume: the job has no run yet; starting its first".to_string());
        return Ok(Attempt::fresh(job, fresh_id.to_string(), note));
    };
    let recorded = std::fs::read_to_string(run_dir.join(JOB_RECORD)).unwrap_or_default();
    let mut changed = record_differences(&job.job_text, &recorded);
    if manifest.limit != limit {
        changed.push("--limit".into());
    }
    let describe = || {
        let files = std::fs::read_dir(&run_dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("part-"))
                    .count()
            })
            .unwrap_or(0);
        format!(
            "run {} did not finish ({}, {files} files committed), but {} changed since it \
             started",
            manifest.run_id,
            format!("{:?}", manifest.status).to_lowercase(),
            changed.join(", ")
        )
    };
    match (mode, changed.is_empty()) {
        (ResumeMode::Fresh, _) if shard.is_some() => Err(PipelineError::Usage(format!(
            "--fresh: shard run {} exists and did not finish; resume it, or use another \
             --run-group",
            manifest.run_id
        ))),
        (ResumeMode::Fresh, _) => Ok(Attempt::fresh(
            job,
            fresh_id.to_string(),
            Some(format!(
                "run {} did not finish; starting a new run (--fresh), the unfinished one is left \
                 as it was and is not part of the table's committed runs",
                manifest.run_id
            )),
        )),
        (_, true) => Attempt::resume(run_dir, manifest),
        (ResumeMode::Required, false) => Err(PipelineError::Usage(format!(
            "--resume: {}; run it with the job it started with, or start a new run with --fresh",
            describe()
        ))),
        (ResumeMode::Auto, false) if shard.is_some() => Err(PipelineError::Usage(format!(
            "{}; run the shard with the job it started with, or use another --run-group",
            describe()
        ))),
        (ResumeMode::Auto, false) => Ok(Attempt::fresh(
            job,
            fresh_id.to_string(),
            Some(format!(
                "{}: starting a new run (the unfinished one is left as it was)",
                describe()
            )),
        )),
    }
}

/// The tickets that committed runs of the job's output table processed with the same
/// results fingerprint: what `run.skip_done` skips.
pub fn done_tickets(output: &Path, fingerprint: &str) -> Result<DoneTickets, PipelineError> {
    let runs = committed_runs(output).map_err(|source| PipelineError::Io {
        path: output.to_path_buf(),
        source,
    })?;
    let mut done = DoneTickets::default();
    for (run_dir, manifest) in runs {
        if manifest.fingerprint.as_deref() != Some(fingerprint) {
            continue;
        }
        for file in &manifest.files {
            let path = run_dir.join(file);
            let batches = read_columns(&path, &["id", CONTENT_HASH, ERROR]).map_err(|source| {
                PipelineError::RunFailed {
                    run_id: manifest.run_id.clone(),
                    run_dir: run_dir.clone(),
                    source: Box::new(source),
                }
            })?;
            for batch in batches {
                let column = |name| {
                    batch
                        .column_by_name(name)
                        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                };
                let (Some(ids), Some(hashes)) = (column("id"), column(CONTENT_HASH)) else {
                    continue;
                };
                let errors = batch.column_by_name(ERROR);
                for row in 0..batch.num_rows() {
                    if ids.is_valid(row)
                        && hashes.is_valid(row)
                        && !errors.is_some_and(|e| e.is_valid(row))
                    {
                        done.insert(ids.value(row), hashes.value(row));
                    }
                }
            }
        }
    }
    Ok(done)
}
