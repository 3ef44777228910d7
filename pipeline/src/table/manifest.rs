//! A run's folder and its manifest.
//!
//! Layout of an output table (`output.path`):
//!
//! ```text
//! out/demo/
//!   run_id=20261126T212000.123Z-3f2a/
//!     _job.toml          the resolved job (every default spelled out)
//!     _run.json          this manifest: status, counts, files, per-stage metrics,
//!                        progress (rewritten at every commit while the run goes on)
//!     part-00000.parquet finished files (written as hidden temporaries, then renamed)
//!   _abridge.lock        the live run's lock (_abridge.IofN.lock: a shard's)
//! ```
//!
//! Names starting with `_` or `.` are skipped by DataFusion, Spark and pyarrow readers,
//! so pointing any of them at the table reads only data files.

use std::path::{Path, PathBuf};

use abridge_operators::CountersSnapshot;
use abridge_operators::dedup::Deduplicate;
use abridge_operators::scope::RunScope;
use serde::{Deserialize, Serialize};

use crate::table::RunRecord;

/// What a run's manifest records of how it was started, beside its job.
#[derive(Debug, Clone, Default)]
pub struct RunStart {
    /// [`crate::job::Job::results_fingerprint`].
    pub fingerprint: String,
    /// `--limit`.
    pub limit: Option<usize>,
    /// `--shard`.
    pub shard: Option<ShardRecord>,
}

/// The manifest's file name inside a run folder.
pub const MANIFEST: &str = "_run.json";
/// The recorded job's file name inside a run folder.
pub const JOB_RECORD: &str = "_job.toml";
/// Prefix of run folders, Hive-style so that readers can derive a `run_id` partition.
pub const RUN_DIR_PREFIX: &str = "run_id=";

/// Where a run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Rows are being written (or the process died while they were).
    Running,
    /// Every row was written and every file is complete.
    Committed,
    /// The run stopped on an error; finished files are intact, the table is partial.
    Failed,
    /// A signal (SIGTERM, Ctrl-C) stopped the run; what it published is intact, and the
    /// next run of the job continues it.
    Interrupted,
}

/// Counts and timings of one stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageSummary {
    /// The stage's name.
    pub stage: String,
    /// Its counters.
    #[serde(flatten)]
    pub metrics: CountersSnapshot,
}

/// What a run did: written as `_run.json` and printed by `abridge run --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunManifest {
    /// The run's id (also its folder's name after `run_id=`).
    pub run_id: String,
    /// The job's name.
    pub job: String,
    /// Where the run is in its life.
    pub status: RunStatus,
    /// The abridge version that wrote it.
    pub abridge_version: String,
    /// The job file.
    pub job_file: String,
    /// `--set` overrides, as given.
    pub overrides: Vec<String>,
    /// When it started (RFC 3339, UTC).
    pub started_at: String,
    /// When it ended, if it did.
    pub finished_at: Option<String>,
    /// Seconds from start to end.
    pub elapsed_s: f64,
    /// The input files read.
    pub input_files: Vec<String>,
    /// Input files skipped because they could not be read (or not to their end; rows
    /// read before the failure are in the output), with why. Absent in older runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub input_files_failed: Vec<InputFileFailure>,
    /// Rows read from the input (after `input.where`).
    pub rows_read: u64,
    /// Rows written to the output.
    pub rows_written: u64,
    /// Written rows whose `error` is set.
    pub rows_failed: u64,
    /// Written rows that the filter did not keep (`kept = false`). Absent in older runs.
    #[serde(default)]
    pub rows_filtered: u64,
    /// Rows dropped because their id had been seen earlier in the run.
    pub duplicates_dropped: u64,
    /// Data files written, relative to the run folder.
    pub files: Vec<String>,
    /// Input rows that earlier attempts of this run had committed (a resumed run skips
    /// them). Absent in older runs.
    #[serde(default)]
    pub rows_resumed: u64,
    /// Input rows skipped because an earlier run summarized them unchanged (`skip_done`).
    #[serde(default)]
    pub rows_skipped_done: u64,
    /// Input rows left to the other shards (`--shard`).
    #[serde(default)]
    pub rows_other_shards: u64,
    /// How many times the run was started (1, plus one per resume).
    #[serde(default = "one")]
    pub attempts: u32,
    /// Digest of the settings that decide a row's result ([`crate::job::Job::results_fingerprint`]):
    /// `run.skip_done` trusts only runs with the same one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// `--limit`, when given: a run resumes only with the same limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// The shard this run processed, when the job was split (`--shard`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<ShardRecord>,
    /// When this manifest was written: at the start, after each commit, at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
    /// Rows this attempt wrote per second, so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_per_s: Option<f64>,
    /// While running: seconds until this attempt has read all of its input, at its rate
    /// so far (the rows in flight then still take a moment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<f64>,
    /// Each similarity query with its threshold and the tickets it kept (in the whole
    /// run, every attempt), so that a query that keeps nothing stands out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queries: Vec<QueryOutcome>,
    /// Per-stage counters, in pipeline order (of the last attempt).
    pub stages: Vec<StageSummary>,
    /// Why the run failed, if it did.
    pub error: Option<String>,
}

fn one() -> u32 {
    1
}

/// What one similarity query did in a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryOutcome {
    /// The query as written in the job.
    pub query: String,
    /// The cosine a ticket needed.
    pub threshold: f32,
    /// Tickets kept on this query (`matched_query`).
    pub kept: u64,
}

/// One shard of a job split by `--shard i/n` and grouped by `--run-group`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    /// The shard's number, from 0.
    pub index: u32,
    /// How many shards.
    pub count: u32,
    /// The name every shard of the run shares.
    pub group: String,
}

impl ShardRecord {
    /// The run id of this shard: its group, shard and count, so that a restarted shard
    /// finds (and resumes) its own folder.
    pub fn run_id(&self) -> String {
        format!("{}.{}of{}", self.group, self.index, self.count)
    }
}

/// An input file a run could not read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputFileFailure {
    pub path: String,
    pub error: String,
}

impl RunManifest {
    /// A run's manifest as it begins: what it reads and how, no rows yet.
    pub fn start(
        run_id: &str,
        job: &RunRecord,
        input_files: Vec<String>,
        started: RunStart,
    ) -> Self {
        let now = now_rfc3339();
        RunManifest {
            run_id: run_id.to_string(),
            job: job.name.clone(),
            status: RunStatus::Running,
            abridge_version: env!("CARGO_PKG_VERSION").to_string(),
            job_file: job.job_file.display().to_string(),
            overrides: job.overrides.clone(),
            started_at: now.clone(),
            finished_at: None,
            elapsed_s: 0.0,
            input_files,
            input_files_failed: Vec::new(),
            rows_read: 0,
            rows_written: 0,
            rows_failed: 0,
            rows_filtered: 0,
            duplicates_dropped: 0,
            rows_resumed: 0,
            rows_skipped_done: 0,
            rows_other_shards: 0,
            attempts: 1,
            fingerprint: Some(started.fingerprint),
            limit: started.limit,
            shard: started.shard,
            files: Vec::new(),
            updated_at: Some(now),
            rows_per_s: None,
            eta_s: None,
            queries: Vec::new(),
            stages: Vec::new(),
            error: None,
        }
    }

    /// Records every stage's final counts, in flow order from the scan (`stages[0]`) to
    /// the sink (the last), and the run's totals drawn from them: rows read, duplicates
    /// dropped anywhere, rows other shards process, rows a resumed run had committed
    /// (dedup's skipped) and rows done by earlier runs (scope's skipped).
    pub fn count(&mut self, stages: Vec<StageSummary>) {
        let sum = |name: Option<&str>, count: fn(&CountersSnapshot) -> u64| -> u64 {
            stages
                .iter()
                .filter(|s| name.is_none_or(|n| s.stage == n))
                .map(|s| count(&s.metrics))
                .sum()
        };
        self.rows_read = stages.first().map_or(0, |s| s.metrics.rows_out);
        self.duplicates_dropped = sum(None, |m| m.rows_dropped);
        self.rows_resumed = sum(Some(Deduplicate::NAME), |m| m.rows_skipped);
        self.rows_skipped_done = sum(Some(RunScope::NAME), |m| m.rows_skipped);
        self.rows_other_shards = sum(None, |m| m.rows_elsewhere);
        self.stages = stages;
    }

    /// Writes the manifest atomically and durably: a temporary file, synced, renamed over
    /// the old one, and the folder synced so that the rename survives a power cut (the
    /// manifest is the run's commit point).
    pub fn write(&self, run_dir: &Path) -> std::io::Result<()> {
        let temp = run_dir.join(format!(".{MANIFEST}.tmp"));
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&temp, text + "\n")?;
        std::fs::File::open(&temp)?.sync_all()?;
        std::fs::rename(&temp, run_dir.join(MANIFEST))?;
        sync_dir(run_dir)
    }

    /// Reads a run folder's manifest.
    pub fn read(run_dir: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(run_dir.join(MANIFEST))?;
        serde_json::from_str(&text).map_err(std::io::Error::other)
    }
}

/// Fixed-width UTC timestamps, so that they sort as text.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// A new run id: UTC time to the millisecond (so ids sort by start time) and 16 random
/// bits (so two runs started in the same millisecond differ).
pub fn new_run_id() -> String {
    let now = chrono::Utc::now();
    let nanos = now.timestamp_subsec_nanos();
    let noise = blake3::hash(format!("{nanos}-{}", std::process::id()).as_bytes());
    let bytes = noise.as_bytes();
    format!(
        "{}-{:02x}{:02x}",
        now.format("%Y%m%dT%H%M%S%.3fZ"),
        bytes[0],
        bytes[1]
    )
}

/// Where a new run's folder is prepared before it appears under its name: hidden, so
/// that readers and [`committed_runs`] skip it.
pub fn staged_dir(run_dir: &Path) -> PathBuf {
    let name = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    run_dir.with_file_name(format!(".{name}{STAGED_SUFFIX}"))
}

const STAGED_SUFFIX: &str = ".new";

/// Removes run folders that were being prepared when their process died: every one, or
/// with `only` just that run's (a shard's: other shards' are theirs to clear). The caller
/// holds the lock that covers them (the whole output's, or the shard's).
pub fn remove_staged_dirs(output: &Path, only: Option<&str>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(output) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some(run_id) = name
            .strip_prefix(&format!(".{RUN_DIR_PREFIX}"))
            .and_then(|n| n.strip_suffix(STAGED_SUFFIX))
        else {
            continue;
        };
        if only.is_none_or(|only| only == run_id) {
            std::fs::remove_dir_all(&path)?;
        }
    }
    Ok(())
}

/// Flushes a folder's entries (a rename in it) to disk.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The committed runs of an output table, oldest first.
pub fn committed_runs(output: &Path) -> std::io::Result<Vec<(PathBuf, RunManifest)>> {
    let mut runs = all_runs(output)?;
    runs.retain(|(_, m)| m.status == RunStatus::Committed);
    Ok(runs)
}

/// The newest unsharded run of an output table if it did not finish (it is running,
/// failed, or its process died), with its folder.
pub fn unfinished_run(output: &Path) -> std::io::Result<Option<(PathBuf, RunManifest)>> {
    let mut runs = all_runs(output)?;
    runs.retain(|(_, m)| m.shard.is_none());
    Ok(runs.pop().filter(|(_, m)| m.status != RunStatus::Committed))
}

/// Every run of an output table with a readable manifest, oldest first.
pub fn all_runs(output: &Path) -> std::io::Result<Vec<(PathBuf, RunManifest)>> {
    let mut runs = Vec::new();
    let entries = match std::fs::read_dir(output) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(runs),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        let is_run = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(RUN_DIR_PREFIX));
        if !is_run || !path.is_dir() {
            continue;
        }
        if let Ok(manifest) = RunManifest::read(&path) {
            runs.push((path, manifest));
        }
    }
    // Start times have nanoseconds; ids break the (theoretical) ties.
    runs.sort_by(|a, b| (&a.1.started_at, &a.1.run_id).cmp(&(&b.1.started_at, &b.1.run_id)));
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_sort_by_time_and_differ() {
        let a = new_run_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_run_id();
        assert_ne!(a, b);
        assert!(a < b, "{a} sorts before {b}");
        assert_eq!(a.len(), "20261126T212000.123Z-3f2a".len());
    }
}
