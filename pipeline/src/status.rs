//! `abridge status`: the live and recent runs of an output table, read from the run
//! folders' manifests (refreshed at every commit) and the output's lock files, so that a
//! twelve-hour run can be watched from another shell or pod.

use std::path::Path;

use serde::Serialize;

use crate::table::lock::{LiveHolder, is_lock_file, live_holders};
use crate::table::manifest::{self as run, RunManifest, RunStatus};

/// One run as `abridge status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunState {
    pub run_id: String,
    /// `running` (a live process holds its lock), `stopped` (its manifest says running
    /// but no live process holds it: killed, the next run continues it), `interrupted`,
    /// `failed` or `committed`.
    pub state: &'static str,
    pub attempts: u32,
    pub rows_written: u64,
    pub rows_failed: u64,
    pub rows_per_s: Option<f64>,
    pub eta_s: Option<f64>,
    pub started_at: String,
    pub updated_at: Option<String>,
    /// The live process writing it (pid, host, since), when there is one.
    pub holder: Option<String>,
}

/// The newest `last` runs of the output table `output`, newest first.
pub fn recent_runs(output: &Path, last: usize) -> std::io::Result<Vec<RunState>> {
    let holders = live_holders(output, is_lock_file);
    let runs = run::all_runs(output)?;
    Ok(runs
        .into_iter()
        .rev()
        .take(last)
        .map(|(_, manifest)| state_of(manifest, &holders))
        .collect())
}

fn state_of(m: RunManifest, holders: &[LiveHolder]) -> RunState {
    let holder = holders
        .iter()
        .find(|h| h.run_id == m.run_id)
        .map(|h| h.description.clone());
    let state = match (m.status, &holder) {
        (RunStatus::Running, Some(_)) => "running",
        (RunStatus::Running, None) => "stopped",
        (RunStatus::Interrupted, _) => "interrupted",
        (RunStatus::Failed, _) => "failed",
        (RunStatus::Committed, _) => "committed",
    };
    RunState {
        eta_s: m.eta_s.filter(|_| state == "running"),
        run_id: m.run_id,
        state,
        attempts: m.attempts,
        rows_written: m.rows_written,
        rows_failed: m.rows_failed,
        rows_per_s: m.rows_per_s,
        started_at: m.started_at,
        updated_at: m.updated_at,
        holder,
    }
}

/// The runs as an aligned table, one line each.
pub fn table(runs: &[RunState]) -> String {
    let mut lines = vec![
        [
            "RUN", "STATE", "ATTEMPT", "ROWS", "FAILED", "ROWS/S", "ETA", "UPDATED", "HOLDER",
        ]
        .map(str::to_string),
    ];
    for r in runs {
        lines.push([
            r.run_id.clone(),
            r.state.to_string(),
            r.attempts.to_string(),
            r.rows_written.to_string(),
            r.rows_failed.to_string(),
            r.rows_per_s.map_or("-".into(), |v| format!("{v:.1}")),
            r.eta_s.map_or("-".into(), duration),
            r.updated_at
                .as_deref()
                .map_or("-".into(), |t| t.chars().take(19).collect()),
            r.holder.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let widths: Vec<usize> = (0..9)
        .map(|c| {
            lines
                .iter()
                .map(|l| l[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in lines {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(cell, &w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_a_person_would_say_them() {
        assert_eq!(duration(4.4), "4s");
        assert_eq!(duration(312.0), "5m12s");
        assert_eq!(duration(4.0 * 3600.0 + 125.0), "4h02m");
    }
}
