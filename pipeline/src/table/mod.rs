//! The table protocol: how runs write an output table so that what the nightly job
//! promises holds (README, "Resuming, incremental runs and sharding"): one writer per
//! output (or per shard), whole files or none, every row exactly once across kills and
//! resumes, a durable commit point, an index never ahead of the table.
//!
//! Every run goes through one state machine, [`TableRun`], which the executor drives and
//! the sink calls back into (through the [`PublishObserver`]s it is given):
//!
//! ```text
//! open ──▶ begin ──▶ publish* ──┬──▶ commit      every row written; the manifest says committed
//!  │                            ├──▶ interrupt   stopped by a signal or a lost lock: resumable
//!  ╰─▶ refused (locked)         ╰──▶ fail        an error: resumable
//! ```
//!
//! - **open** takes the lock ([`lock`]: the output's, or a shard's; shards and whole runs
//!   exclude each other) and chooses the run folder ([`plan`]: a new one, or the
//!   unfinished run to continue, with the keys of the rows its files hold). Nothing is
//!   written yet.
//! - **begin** makes a new run's folder appear by one rename with its job and manifest in
//!   it ([`manifest`]), or counts one more attempt in a resumed run's manifest.
//! - **publish**: the sink publishes data files (`abridge_operators::sink`), each followed
//!   by the index's commit ([`index`]) and a manifest with the progress so far.
//! - **commit / interrupt / fail** write the manifest's final state (by rename, its
//!   folder synced) and only then release the lock: the run's writer has been joined
//!   before, so nothing is published after the run has ended.

pub mod delta;
pub mod index;
pub mod lock;
pub mod manifest;
pub mod plan;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use abridge_operators::sink::{PublishObserver, SinkReport, published_files};
use abridge_operators::stop::StopSignal;
use abridge_operators::{OperatorError, StageCounters};
use arrow::record_batch::RecordBatch;

use crate::error::PipelineError;
use lock::OutputLock;
use manifest::{JOB_RECORD, RunManifest, RunStatus, ShardRecord};
use plan::{Attempt, ResumeMode};

/// What the table protocol needs of a job.
#[derive(Debug, Clone)]
pub struct RunRecord {
    /// The job's name ([`crate::job::Job::name`]).
    pub name: String,
    /// The `--set` overrides, as given.
    pub overrides: Vec<String>,
    /// The output table's folder.
    pub output: PathBuf,
    /// The job file, named in messages.
    pub job_file: PathBuf,
    /// The resolved job ([`crate::job::Job::to_toml`]): recorded beside a new run, and
    /// compared with the record of an unfinished one before it is resumed.
    pub job_text: String,
}

/// One run of an output table, from its lock to its end; see the module documentation.
pub struct TableRun {
    /// Held for its `Drop`: released when the run ends (this value is dropped), after
    /// its last manifest.
    _lock: OutputLock,
    attempt: Attempt,
}

impl TableRun {
    /// **open**: takes the output's (or `shard`'s) lock for a run of `job` and chooses its
    /// folder. Returns the run and what the user should be told (a stale lock cleared, a
    /// run resumed). A lost lock later stops the run through `stop`.
    pub fn open(
        job: &RunRecord,
        mode: ResumeMode,
        limit: Option<usize>,
        shard: Option<&ShardRecord>,
        stop: &StopSignal,
    ) -> Result<(Self, Vec<String>), PipelineError> {
        let fresh_id = shard.map_or_else(manifest::new_run_id, ShardRecord::run_id);
        let (lock, cleared) =
            OutputLock::acquire(&job.output, &fresh_id, shard.map(|s| (s.index, s.count)))?;
        lock.stop_on_loss(stop.clone());
        let attempt = plan::plan(job, mode, limit, shard, &fresh_id)?;
        if attempt.resumed.is_some() {
            lock.relabel(&attempt.run_id)?;
        }
        let notes = cleared.into_iter().chain(attempt.note.clone()).collect();
        Ok((
            Self {
                _lock: lock,
                attempt,
            },
            notes,
        ))
    }

    /// The run's id.
    pub fn run_id(&self) -> &str {
        &self.attempt.run_id
    }

    /// The folder the run writes.
    pub fn run_dir(&self) -> &Path {
        &self.attempt.run_dir
    }

    /// What earlier attempts of the run published.
    pub fn previous(&self) -> &SinkReport {
        &self.attempt.previous
    }

    /// The keys of the rows earlier attempts published (`dedup::row_key`), for the run's
    /// deduplication to skip; taken once.
    pub fn take_committed_keys(&mut self) -> Vec<u128> {
        std::mem::take(&mut self.attempt.committed_keys)
    }

    /// When the run resumes earlier attempts: its id and the files they published, which
    /// the index may have to catch up with.
    pub fn resuming(&self) -> Option<(&str, &[PathBuf])> {
        self.attempt.resumed.as_ref().map(|_| {
            (
                self.attempt.run_id.as_str(),
                self.attempt.previous.files.as_slice(),
            )
        })
    }

    /// **begin**: a new run's folder appears with `job`'s record and `manifest` in it, or
    /// not at all (a run killed here leaves only a hidden folder, which the next run
    /// removes); a resumed run's `manifest` keeps its start and counts one more attempt.
    pub fn begin(&self, job: &RunRecord, manifest: &mut RunManifest) -> Result<(), PipelineError> {
        let run_dir = &self.attempt.run_dir;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PipelineError::Io { path, source }
        };
        manifest.files = self
            .attempt
            .previous
            .files
            .iter()
            .map(|f| file_name(f))
            .collect();
        manifest.rows_written = self.attempt.previous.rows;
        manifest.rows_failed = self.attempt.previous.rows_failed;
        manifest.rows_filtered = self.attempt.previous.rows_filtered;
        match &self.attempt.resumed {
            Some(earlier) => {
                manifest.started_at = earlier.started_at.clone();
                manifest.attempts = earlier.attempts + 1;
                manifest.write(run_dir).map_err(io(run_dir))
            }
            None => {
                let staged = manifest::staged_dir(run_dir);
                std::fs::create_dir_all(&staged).map_err(io(&staged))?;
                let record = staged.join(JOB_RECORD);
                std::fs::write(&record, &job.job_text).map_err(io(&record))?;
                manifest.write(&staged).map_err(io(&staged))?;
                std::fs::rename(&staged, run_dir).map_err(io(run_dir))?;
                let output = run_dir.parent().unwrap_or(Path::new("."));
                manifest::sync_dir(output).map_err(io(run_dir))
            }
        }
    }

    /// **publish**: the observer that rewrites the manifest after each published file,
    /// with the rows so far, the rate and an ETA against `expected_rows` input rows, of
    /// which `read` counts those read.
    pub fn progress(
        &self,
        manifest: &RunManifest,
        expected_rows: u64,
        read: StageCounters,
    ) -> Arc<dyn PublishObserver> {
        Arc::new(ProgressRecord {
            manifest: Mutex::new(manifest.clone()),
            run_dir: self.attempt.run_dir.clone(),
            started: Instant::now(),
            rows_before: self.attempt.previous.rows,
            expected_rows,
            read,
        })
    }

    /// **commit**: every row is in `report`'s files; the manifest says so.
    pub fn commit(
        self,
        mut manifest: RunManifest,
        report: &SinkReport,
    ) -> Result<RunManifest, PipelineError> {
        manifest.status = RunStatus::Committed;
        self.record(&mut manifest, report);
        let run_dir = &self.attempt.run_dir;
        manifest
            .write(run_dir)
            .map_err(|source| PipelineError::Io {
                path: run_dir.clone(),
                source,
            })?;
        Ok(manifest)
    }

    /// **interrupt**: `stop` (a signal, or the lost lock it names) ended the run; what it
    /// published stays, and the next run of the job continues it.
    pub fn interrupt(self, manifest: RunManifest, stop: &StopSignal) -> PipelineError {
        let err = match stop.reason() {
            Some(reason) => PipelineError::LockLost { reason },
            None => PipelineError::Interrupted {
                signal: stop.signal(),
                run: Some((self.attempt.run_id.clone(), self.attempt.run_dir.clone())),
            },
        };
        self.end(manifest, RunStatus::Interrupted, err)
    }

    /// **fail**: `source` ended the run; what it published stays, and the next run of the
    /// job continues it.
    pub fn fail(self, manifest: RunManifest, source: OperatorError) -> PipelineError {
        let err = PipelineError::RunFailed {
            run_id: self.attempt.run_id.clone(),
            run_dir: self.attempt.run_dir.clone(),
            source: Box::new(source),
        };
        self.end(manifest, RunStatus::Failed, err)
    }

    fn end(
        self,
        mut manifest: RunManifest,
        status: RunStatus,
        err: PipelineError,
    ) -> PipelineError {
        manifest.status = status;
        // What the table holds now: what earlier attempts and this one published.
        if let Ok((report, _)) = published_files(&self.attempt.run_dir) {
            self.record(&mut manifest, &report);
        }
        manifest.error = Some(err.to_string());
        // Best effort: on a full disk the manifest may not fit either, and the run's own
        // error is the one to report (it stays resumable either way).
        let _ = manifest.write(&self.attempt.run_dir);
        err
    }

    fn record(&self, manifest: &mut RunManifest, report: &SinkReport) {
        manifest.rows_written = report.rows;
        manifest.rows_failed = report.rows_failed;
        manifest.rows_filtered = report.rows_filtered;
        manifest.files = report.files.iter().map(|f| file_name(f)).collect();
        let new_rows = report.rows.saturating_sub(self.attempt.previous.rows);
        manifest.rows_per_s = Some(new_rows as f64 / manifest.elapsed_s.max(1e-3));
    }
}

/// Rewrites a run's manifest after each published file, with the rows so far, the rate
/// and an ETA: a long run can be watched from another shell or pod (`abridge status`),
/// and what a killed run had done is on disk.
struct ProgressRecord {
    manifest: Mutex<RunManifest>,
    run_dir: PathBuf,
    started: Instant,
    /// Rows earlier attempts published.
    rows_before: u64,
    expected_rows: u64,
    read: StageCounters,
}

impl PublishObserver for ProgressRecord {
    fn staged(&self, _: &RecordBatch) -> Result<(), OperatorError> {
        Ok(())
    }

    fn published(&self, report: &SinkReport) -> Result<(), OperatorError> {
        let mut manifest = self
            .manifest
            .lock()
            .map_err(|_| OperatorError::WorkerGone("manifest"))?;
        let elapsed = self.started.elapsed().as_secs_f64();
        let read = self.read.snapshot().rows_out;
        manifest.rows_written = report.rows;
        manifest.rows_failed = report.rows_failed;
        manifest.rows_filtered = report.rows_filtered;
        manifest.files = report.files.iter().map(|f| file_name(f)).collect();
        manifest.rows_read = read;
        manifest.elapsed_s = elapsed;
        manifest.updated_at = Some(manifest::now_rfc3339());
        manifest.rows_per_s =
            Some(report.rows.saturating_sub(self.rows_before) as f64 / elapsed.max(1e-3));
        manifest.eta_s = (read > 0)
            .then(|| self.expected_rows.saturating_sub(read) as f64 * elapsed / read as f64);
        // Best effort: progress is for watching; the data files are the commit, and a
        // full disk is reported by the next one.
        let _ = manifest.write(&self.run_dir);
        Ok(())
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job writing to `dir/out`, and a run of it opened (automatic resume).
    fn open(
        dir: &Path,
        stop: &StopSignal,
    ) -> Result<(RunRecord, TableRun, Vec<String>), PipelineError> {
        let text = format!(
            "[input]\npath = \"in.parquet\"\n[output]\npath = \"{}\"\n",
            dir.join("out").display()
        );
        let job = crate::job::Job::from_str(&text, &dir.join("job.toml"), &[])?.record();
        let (run, notes) = TableRun::open(&job, ResumeMode::Auto, None, None, stop)?;
        Ok((job, run, notes))
    }

    fn blank_manifest(run: &TableRun) -> Result<RunManifest, Box<dyn std::error::Error>> {
        Ok(serde_json::from_value(serde_json::json!({
            "run_id": run.run_id(), "job": "j", "status": "running", "abridge_version": "t",
            "job_file": "j", "overrides": [], "started_at": manifest::now_rfc3339(),
            "finished_at": null, "elapsed_s": 1.0, "input_files": [], "rows_read": 0,
            "rows_written": 0, "rows_failed": 0, "duplicates_dropped": 0, "files": [],
            "stages": [], "error": null
        }))?)
    }

    /// open → begin → interrupt, then open (resumes) → begin → commit: each state is on
    /// disk as the protocol says, and the lock is held from open to the end.
    #[test]
    fn a_run_goes_open_begin_interrupt_then_resumes_to_commit()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let stop = StopSignal::default();
        let (job, run, _) = open(dir.path(), &stop)?;
        let run_dir = run.run_dir().to_path_buf();
        assert!(!run_dir.exists(), "open writes nothing");
        let refused = open(dir.path(), &stop)
            .map(|_| ())
            .map_err(|e| e.exit_code());
        assert_eq!(
            refused,
            Err(crate::error::EXIT_LOCKED),
            "the lock is held from open"
        );

        let mut m = blank_manifest(&run)?;
        run.begin(&job, &mut m)?;
        assert!(run_dir.join(JOB_RECORD).exists());
        assert_eq!(RunManifest::read(&run_dir)?.status, RunStatus::Running);
        stop.request(Some(crate::error::SIGTERM));
        let err = run.interrupt(m, &stop);
        assert_eq!(err.exit_code(), 143);
        let interrupted = RunManifest::read(&run_dir)?;
        assert_eq!(interrupted.status, RunStatus::Interrupted);
        assert!(interrupted.error.is_some_and(|e| e.contains("SIGTERM")));

        // The lock went with the run; the next one continues it.
        let (job, mut run, notes) = open(dir.path(), &StopSignal::default())?;
        assert_eq!(run.run_dir(), run_dir);
        assert!(notes.iter().any(|n| n.contains("resuming")), "{notes:?}");
        assert!(run.take_committed_keys().is_empty());
        let mut m = blank_manifest(&run)?;
        run.begin(&job, &mut m)?;
        assert_eq!(m.attempts, 2);
        let committed = run.commit(m, &SinkReport::default())?;
        assert_eq!(RunManifest::read(&run_dir)?, committed);
        assert_eq!(committed.status, RunStatus::Committed);
        assert!(
            !dir.path().join("out").join(lock::LOCK_FILE).exists(),
            "released"
        );
        Ok(())
    }

    #[test]
    fn a_failed_run_says_why_and_is_resumed() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let (job, run, _) = open(dir.path(), &StopSignal::default())?;
        let mut m = blank_manifest(&run)?;
        run.begin(&job, &mut m)?;
        let run_dir = run.run_dir().to_path_buf();
        let err = run.fail(m, OperatorError::WorkerGone("test"));
        assert_eq!(err.exit_code(), 1);
        let failed = RunManifest::read(&run_dir)?;
        assert_eq!(failed.status, RunStatus::Failed);
        assert!(failed.error.is_some_and(|e| e.contains("test worker")));
        let (_, again, _) = open(dir.path(), &StopSignal::default())?;
        assert_eq!(again.run_dir(), run_dir, "a failed run is continued");
        Ok(())
    }
}
