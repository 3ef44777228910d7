//! Row counters of every stage (rows in, out, failed, dropped, filtered; busy time): what
//! progress, the run summary and the manifest report. The quality metrics of summaries are
//! in `quality/`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Live counters of one operator, shared between the operator and whoever reports progress.
/// Cloning gives another handle on the same counters.
#[derive(Debug, Clone, Default)]
pub struct StageCounters(Arc<Counters>);

#[derive(Debug, Default)]
struct Counters {
    rows_in: AtomicU64,
    rows_out: AtomicU64,
    rows_failed: AtomicU64,
    rows_dropped: AtomicU64,
    rows_filtered: AtomicU64,
    rows_skipped: AtomicU64,
    rows_elsewhere: AtomicU64,
    busy_nanos: AtomicU64,
}

/// A point-in-time copy of an operator's counters, as printed in run summaries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CountersSnapshot {
    /// Rows received.
    pub rows_in: u64,
    /// Rows passed on (failed rows included: they flow on with their `error`).
    pub rows_out: u64,
    /// Rows that this operator marked as failed.
    pub rows_failed: u64,
    /// Rows removed from the stream on purpose (e.g. duplicates).
    pub rows_dropped: u64,
    /// Rows passed on but marked as not to be summarized (`kept = false`). Absent in
    /// manifests of older runs.
    #[serde(default)]
    pub rows_filtered: u64,
    /// Rows removed because they are already done: committed by an earlier attempt of a
    /// resumed run, or summarized unchanged by an earlier run (`skip_done`).
    #[serde(default)]
    pub rows_skipped: u64,
    /// Rows removed because another shard of the job processes them.
    #[serde(default)]
    pub rows_elsewhere: u64,
    /// Time spent inside the operator's own work, in milliseconds.
    pub busy_ms: u64,
}

impl StageCounters {
    /// Counts rows received.
    pub fn add_in(&self, rows: usize) {
        self.0.rows_in.fetch_add(rows as u64, Ordering::Relaxed);
    }

    /// Counts rows passed on.
    pub fn add_out(&self, rows: usize) {
        self.0.rows_out.fetch_add(rows as u64, Ordering::Relaxed);
    }

    /// Counts rows marked as failed.
    pub fn add_failed(&self, rows: usize) {
        self.0.rows_failed.fetch_add(rows as u64, Ordering::Relaxed);
    }

    /// Counts rows removed on purpose.
    pub fn add_dropped(&self, rows: usize) {
        self.0
            .rows_dropped
            .fetch_add(rows as u64, Ordering::Relaxed);
    }

    /// Counts rows passed on with `kept = false`.
    pub fn add_filtered(&self, rows: usize) {
        self.0
            .rows_filtered
            .fetch_add(rows as u64, Ordering::Relaxed);
    }

    /// Counts rows removed because they are already done.
    pub fn add_skipped(&self, rows: usize) {
        self.0
            .rows_skipped
            .fetch_add(rows as u64, Ordering::Relaxed);
    }

    /// Counts rows removed because another shard processes them.
    pub fn add_elsewhere(&self, rows: usize) {
        self.0
            .rows_elsewhere
            .fetch_add(rows as u64, Ordering::Relaxed);
    }

    /// Adds time spent working.
    pub fn add_busy(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.0.busy_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            rows_in: self.0.rows_in.load(Ordering::Relaxed),
            rows_out: self.0.rows_out.load(Ordering::Relaxed),
            rows_failed: self.0.rows_failed.load(Ordering::Relaxed),
            rows_dropped: self.0.rows_dropped.load(Ordering::Relaxed),
            rows_filtered: self.0.rows_filtered.load(Ordering::Relaxed),
            rows_skipped: self.0.rows_skipped.load(Ordering::Relaxed),
            rows_elsewhere: self.0.rows_elsewhere.load(Ordering::Relaxed),
            busy_ms: self.0.busy_nanos.load(Ordering::Relaxed) / 1_000_000,
        }
    }
}
