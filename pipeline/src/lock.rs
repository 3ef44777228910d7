//! One writer per output table: a run holds `_abridge.lock` in the output folder from
//! before it opens the index until it ends, so two live runs of a job (or of two jobs
//! sharing an output) refuse each other with a message naming the holder, instead of
//! meeting in tantivy's lock or interleaving their commits.
//!
//! The lock records its holder's pid, the pid's start time (so a recycled pid is not
//! taken for the holder) and host, and the holder touches it every 15 s. A lock whose
//! holder is gone (killed, machine rebooted) is stale: on the holder's host, told by the
//! pid; from another host (shards sharing a volume), by two minutes without a heartbeat.
//! The next run clears it and says so. Shards of a split job each take their own lock. Clearing is safe against two runs
//! clearing at once: the stale file is renamed aside (only one rename succeeds) and
//! checked to be the one judged stale before anything else happens.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::PipelineError;

/// The lock file's name: `_`-prefixed, so readers of the table skip it.
pub const LOCK_FILE: &str = "_abridge.lock";

/// How often a holder touches its lock.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// A lock of another host untouched this long belongs to a dead run.
const HEARTBEAT_MISSED: Duration = Duration::from_secs(120);

/// Who holds the lock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Holder {
    pid: u32,
    /// The process's start time in clock ticks since boot (`/proc/PID/stat`), where known.
    start_ticks: Option<u64>,
    host: String,
    run_id: String,
    since: String,
}

impl Holder {
    fn this_process(run_id: &str) -> Self {
        let pid = std::process::id();
        Self {
            pid,
            start_ticks: start_ticks(pid),
            host: host(),
            run_id: run_id.to_string(),
            since: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }
    }

    /// Whether the holder may still be running. On its own host, asked by pid and start
    /// time; from another host (shards on a shared volume), by its heartbeat: a holder
    /// touches its lock every [`HEARTBEAT`], so a lock untouched for [`HEARTBEAT_MISSED`]
    /// is stale.
    fn alive(&self, lock: &Path) -> bool {
        if self.host != host() {
            let age = std::fs::metadata(lock)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
            return age.is_none_or(|age| age < HEARTBEAT_MISSED);
        }
        match (start_ticks(self.pid), self.start_ticks) {
            (Some(now), Some(then)) => now == then,
            (Some(_), None) => true,
            // No such process; or no /proc to ask (not Linux), where a live holder is
            // the safe guess.
            (None, _) => !Path::new("/proc/self").exists(),
        }
    }
}

/// The held lock; dropping it releases it.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    /// The output folder, when taking the lock created it: removed again if the run
    /// leaves it empty (a job that fails before any row writes nothing).
    created: Option<PathBuf>,
    /// Dropped with the lock, which stops the heartbeat thread.
    _heartbeat: mpsc::Sender<()>,
}

impl OutputLock {
    /// Takes the lock of the output folder `output` for `run_id`. Returns the lock and,
    /// when a stale lock was cleared, a note saying whose.
    pub fn acquire(output: &Path, run_id: &str) -> Result<(Self, Option<String>), PipelineError> {
        Self::acquire_file(output, LOCK_FILE, run_id)
    }

    /// [`OutputLock::acquire`] with another lock file name in `output`: each shard of a
    /// split job has its own, so that shards run side by side.
    pub fn acquire_file(
        output: &Path,
        file_name: &str,
        run_id: &str,
    ) -> Result<(Self, Option<String>), PipelineError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PipelineError::Io { path, source }
        };
        let created = (!output.exists()).then(|| output.to_path_buf());
        std::fs::create_dir_all(output).map_err(io(output))?;
        let path = output.join(file_name);
        let mut cleared = None;
        // The holder is written whole to a private file and linked into place: a lock
        // file never exists half-written, even if the process is killed while taking it.
        let staged = output.join(format!(".{file_name}.{}", std::process::id()));
        let holder = serde_json::to_vec_pretty(&Holder::this_process(run_id))
            .map_err(std::io::Error::other)
            .map_err(io(&staged))?;
        std::fs::write(&staged, &holder)
            .and_then(|()| std::fs::File::open(&staged)?.sync_all())
            .map_err(io(&staged))?;
        let linked = Self::link(&staged, &path, output, &mut cleared);
        let _ = std::fs::remove_file(&staged);
        linked?;
        let (heartbeat, stop) = mpsc::channel();
        let touched = path.clone();
        std::thread::spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(HEARTBEAT) {
                let _ = std::fs::File::options()
                    .append(true)
                    .open(&touched)
                    .and_then(|f| f.set_modified(SystemTime::now()));
            }
        });
        let lock = Self {
            path,
            created,
            _heartbeat: heartbeat,
        };
        Ok((lock, cleared))
    }

    fn link(
        staged: &Path,
        path: &Path,
        output: &Path,
        cleared: &mut Option<String>,
    ) -> Result<(), PipelineError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PipelineError::Io { path, source }
        };
        for _ in 0..3 {
            match std::fs::hard_link(staged, path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(path).unwrap_or_default();
                    match serde_json::from_str::<Holder>(&text) {
                        Ok(holder) if holder.alive(path) => {
                            return Err(PipelineError::Locked {
                                output: output.to_path_buf(),
                                holder: format!(
                                    "run {} (pid {} on {}, since {})",
                                    holder.run_id, holder.pid, holder.host, holder.since
                                ),
                                lock: path.to_path_buf(),
                            });
                        }
                        Ok(holder) => {
                            if clear_stale(path, &text)? {
                                *cleared = Some(format!(
                                    "cleared a stale lock of run {} (pid {} on {}, since {}, no \
                                     longer running)",
                                    holder.run_id, holder.pid, holder.host, holder.since
                                ));
                            }
                        }
                        Err(_) => {
                            if clear_stale(path, &text)? {
                                *cleared = Some("cleared an unreadable stale lock".into());
                            }
                        }
                    }
                }
                Err(e) => return Err(io(path)(e)),
            }
        }
        Err(PipelineError::Locked {
            output: output.to_path_buf(),
            holder: "other runs contending for it".into(),
            lock: path.to_path_buf(),
        })
    }
}

impl OutputLock {
    /// Names another run as the holder (a run that turned out to resume an earlier one).
    pub fn relabel(&self, run_id: &str) -> Result<(), PipelineError> {
        let io = |source| PipelineError::Io {
            path: self.path.clone(),
            source,
        };
        let holder = serde_json::to_vec_pretty(&Holder::this_process(run_id))
            .map_err(std::io::Error::other)
            .map_err(io)?;
        let temp = self.path.with_extension("relabel");
        std::fs::write(&temp, holder).map_err(io)?;
        std::fs::rename(&temp, &self.path).map_err(io)
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        if let Some(dir) = &self.created {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Moves the stale lock whose content is `stale` aside; false when another run got
/// there first (the lock then belongs to someone else, who is checked on the next try).
fn clear_stale(path: &Path, stale: &str) -> Result<bool, PipelineError> {
    let aside = path.with_extension(format!("stale-{}", std::process::id()));
    match std::fs::rename(path, &aside) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(PipelineError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    }
    let moved = std::fs::read_to_string(&aside).unwrap_or_default();
    if moved != stale {
        // A live run's fresh lock was moved: put it back (unless yet another exists).
        let _ = std::fs::hard_link(&aside, path);
        let _ = std::fs::remove_file(&aside);
        return Ok(false);
    }
    let _ = std::fs::remove_file(&aside);
    Ok(true)
}

/// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks since boot.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after_name = stat.get(stat.rfind(')')? + 1..)?;
    after_name.split_whitespace().nth(19)?.parse().ok()
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_holder_is_refused_and_released_on_drop() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (lock, note) = OutputLock::acquire(dir.path(), "run-a").expect("free");
        assert!(note.is_none());
        let err = OutputLock::acquire(dir.path(), "run-b").expect_err("held");
        let message = err.to_string();
        assert!(
            message.contains("run-a") && message.contains(&std::process::id().to_string()),
            "{message}"
        );
        drop(lock);
        assert!(!dir.path().join(LOCK_FILE).exists());
        OutputLock::acquire(dir.path(), "run-b").expect("released");

        // A folder the lock created is removed with it when nothing else was written.
        let fresh = dir.path().join("new-output");
        let (lock, _) = OutputLock::acquire(&fresh, "run-c").expect("free");
        drop(lock);
        assert!(!fresh.exists());
    }

    #[test]
    fn a_dead_or_recycled_holder_is_cleared_with_a_note() {
        let dir = tempfile::tempdir().expect("temp dir");
        // A process that has exited: its pid is no longer running.
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let dead = child.id();
        child.wait().expect("wait");
        let mut me = Holder::this_process("crashed");
        for holder in [
            Holder {
                pid: dead,
                ..me.clone()
            },
            // Our own pid, but another start time: the pid was recycled.
            {
                me.start_ticks = me.start_ticks.map(|t| t + 1);
                me.clone()
            },
        ] {
            std::fs::write(
                dir.path().join(LOCK_FILE),
                serde_json::to_string(&holder).expect("json"),
            )
            .expect("write");
            let (_lock, note) = OutputLock::acquire(dir.path(), "next").expect("stale lock");
            let note = note.expect("a note");
            assert!(note.contains("stale") && note.contains("crashed"), "{note}");
        }

        // A lock is linked into place whole, so garbage is never a holder mid-write.
        let path = dir.path().join(LOCK_FILE);
        std::fs::write(&path, "{").expect("write");
        let (lock, note) = OutputLock::acquire(dir.path(), "next").expect("stale");
        assert!(note.is_some_and(|n| n.contains("unreadable")));
        drop(lock);

        // Another host's holder (a shard on a shared volume) lives while it heartbeats.
        let elsewhere = Holder {
            host: "another-host".into(),
            ..Holder::this_process("shard-run")
        };
        std::fs::write(&path, serde_json::to_string(&elsewhere).expect("json")).expect("write");
        assert!(OutputLock::acquire(dir.path(), "next").is_err());
        let silent = SystemTime::now() - HEARTBEAT_MISSED - Duration::from_secs(1);
        std::fs::File::options()
            .append(true)
            .open(&path)
            .and_then(|f| f.set_modified(silent))
            .expect("age the lock");
        let (_lock, note) = OutputLock::acquire(dir.path(), "next").expect("stale");
        assert!(note.is_some_and(|n| n.contains("shard-run")));
    }
}
