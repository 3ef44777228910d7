//! One writer per output table: a run holds `_abridge.lock` in the output folder from
//! before it opens the index until it ends, so two live runs of a job (or of two jobs
//! sharing an output) refuse each other with a message naming the holder, instead of
//! meeting in tantivy's lock or interleaving their commits.
//!
//! The lock records its holder's pid, the pid's start time (so a recycled pid is not
//! taken for the holder), its host, and its process space (the machine's boot id and the
//! pid namespace: where the pid means something; a replacement pod has the old one's
//! hostname and is PID 1 too, on another machine or in another namespace), and the holder
//! touches it every 5 s. A lock whose holder is gone (killed, machine rebooted) is stale:
//! in the holder's host and process space, told by the pid; from anywhere else (shards
//! sharing a volume, a pod rescheduled, a replacement pod of the same name), by 30 s
//! without a heartbeat, judged by the lock's modification time against this host's clock
//! (hosts' clocks must agree to a few seconds, as NTP keeps them). A run that finds another
//! host's lock still beating waits up to that long for it to stop before it refuses, so a
//! replacement pod takes over from a dead one without failing. The next run clears a stale
//! lock and says so. Clearing is safe against two runs clearing at once: the stale file is
//! renamed aside (only one rename succeeds) and checked to be the one judged stale before
//! anything else happens.
//!
//! A holder that cannot heartbeat (its lock is gone, another run's, or cannot be touched
//! for half the staleness) no longer owns the output: it stops its run at once
//! ([`OutputLock::stop_on_loss`]), before another host could judge it dead.
//!
//! Shards of a split job each take their own lock (`_abridge.IofN.lock`), so that they run
//! side by side; a whole (unsharded) run and shards exclude each other: each takes its own
//! lock first and then looks for live holders of the other kind, so of two that start
//! together at least one sees the other and refuses, naming it. A lock is removed on
//! release only while it is still the releasing run's.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};

use abridge_operators::stop::StopSignal;

use serde::{Deserialize, Serialize};

use crate::PipelineError;
use crate::table::manifest as run;

/// The lock file's name: `_`-prefixed, so readers of the table skip it.
pub const LOCK_FILE: &str = "_abridge.lock";

/// How often a holder touches its lock.
#[cfg(not(test))]
const HEARTBEAT: Duration = Duration::from_secs(5);
#[cfg(test)]
const HEARTBEAT: Duration = Duration::from_millis(100);
/// A lock of another host untouched this long belongs to a dead run.
const HEARTBEAT_MISSED: Duration = Duration::from_secs(30);
/// How long a run waits for another host's lock to go stale before refusing: past the
/// staleness and one more heartbeat.
#[cfg(not(test))]
const CROSS_HOST_WAIT: Duration = Duration::from_secs(35);
#[cfg(test)]
const CROSS_HOST_WAIT: Duration = Duration::from_millis(600);
/// A holder whose heartbeat has failed this long stops: well before others judge it dead.
const HEARTBEAT_GIVE_UP: Duration = Duration::from_secs(15);

/// Who holds the lock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Holder {
    pid: u32,
    /// The process's start time in clock ticks since boot (`/proc/PID/stat`), where known.
    start_ticks: Option<u64>,
    host: String,
    /// Where `pid` names this process: the boot id and pid namespace
    /// ([`process_space`]); absent in locks of older versions and where /proc is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    process_space: Option<String>,
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
            process_space: process_space(),
            run_id: run_id.to_string(),
            since: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }
    }

    fn describe(&self) -> String {
        format!(
            "run {} (pid {} on {}, since {})",
            self.run_id, self.pid, self.host, self.since
        )
    }

    /// Whether the holder runs where its pid cannot be asked: another host, or the same
    /// hostname in another process space (a replacement pod).
    fn elsewhere(&self) -> bool {
        self.host != host()
            || matches!((&self.process_space, process_space()), (Some(theirs), Some(ours)) if *theirs != ours)
    }

    /// Whether the holder may still be running. In its own process space, asked by pid
    /// and start time; from elsewhere (shards on a shared volume, another pod), by its
    /// heartbeat: a holder
    /// touches its lock every [`HEARTBEAT`], so a lock untouched for [`HEARTBEAT_MISSED`]
    /// is stale.
    fn alive(&self, lock: &Path) -> bool {
        if self.elsewhere() {
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
    /// Who this lock says holds it, to release it only while it is still ours; shared
    /// with the heartbeat, which checks it under this mutex.
    holder: Arc<Mutex<Holder>>,
    /// Told when the heartbeat finds the lock lost.
    on_loss: Arc<Mutex<Option<StopSignal>>>,
    /// Dropped with the lock, which stops the heartbeat thread.
    _heartbeat: mpsc::Sender<()>,
}

/// The lock file of shard `index` of `count`.
fn shard_lock_file(index: u32, count: u32) -> String {
    format!("_abridge.{index}of{count}.lock")
}

fn is_shard_lock(name: &str) -> bool {
    name.strip_prefix("_abridge.")
        .and_then(|n| n.strip_suffix(".lock"))
        .and_then(|n| n.split_once("of"))
        .is_some_and(|(i, n)| i.parse::<u32>().is_ok() && n.parse::<u32>().is_ok())
}

impl OutputLock {
    /// Takes the lock of the output folder `output` for `run_id`: the whole output's, or
    /// with `shard` (index, count) that shard's. Returns the lock and, when a stale lock
    /// was cleared, a note saying whose. Refused while another live run holds it, and
    /// while runs of the other kind (shards for a whole run, a whole run for a shard)
    /// hold theirs.
    pub fn acquire(
        output: &Path,
        run_id: &str,
        shard: Option<(u32, u32)>,
    ) -> Result<(Self, Option<String>), PipelineError> {
        let file_name = match shard {
            Some((index, count)) => shard_lock_file(index, count),
            None => LOCK_FILE.to_string(),
        };
        let (lock, cleared) = Self::acquire_file(output, &file_name, run_id)?;
        let conflicts = |name: &str| match shard {
            Some(_) => name == LOCK_FILE,
            None => is_shard_lock(name),
        };
        let holders = live_holders(output, conflicts);
        if let Some(first) = holders.first() {
            let lock_path = first.lock.clone();
            drop(lock);
            return Err(PipelineError::Locked {
                output: output.to_path_buf(),
                holder: holders
                    .iter()
                    .map(|h| h.description.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
                lock: lock_path,
            });
        }
        Ok((lock, cleared))
    }

    fn acquire_file(
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
        let me = Holder::this_process(run_id);
        let holder = serde_json::to_vec_pretty(&me)
            .map_err(std::io::Error::other)
            .map_err(io(&staged))?;
        std::fs::write(&staged, &holder)
            .and_then(|()| std::fs::File::open(&staged)?.sync_all())
            .map_err(io(&staged))?;
        let linked = Self::link(&staged, &path, output, &mut cleared);
        let _ = std::fs::remove_file(&staged);
        linked?;
        run::sync_dir(output).map_err(io(output))?;
        let (heartbeat, stop) = mpsc::channel();
        let touched = path.clone();
        let on_loss = Arc::new(Mutex::new(None::<StopSignal>));
        let me = Arc::new(Mutex::new(me));
        let (told, ours) = (Arc::clone(&on_loss), Arc::clone(&me));
        std::thread::spawn(move || {
            let mut failing_since = None;
            while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(HEARTBEAT) {
                let beaten = match ours.lock() {
                    Ok(ours) => beat(&touched, &ours),
                    Err(_) => Err(Beat::Failed("poisoned".into())),
                };
                let lost = match beaten {
                    Ok(()) => {
                        failing_since = None;
                        None
                    }
                    Err(Beat::Taken(why)) => Some(why),
                    Err(Beat::Failed(why)) => {
                        let since = *failing_since.get_or_insert_with(Instant::now);
                        (since.elapsed() >= HEARTBEAT_GIVE_UP).then(|| {
                            format!("its heartbeat failed for {HEARTBEAT_GIVE_UP:?}: {why}")
                        })
                    }
                };
                if let Some(why) = lost {
                    if let Some(stop) = told.lock().ok().and_then(|s| s.clone()) {
                        stop.abort_because(format!(
                            "the run lost its lock {}: {why}",
                            touched.display()
                        ));
                    }
                    break;
                }
            }
        });
        let lock = Self {
            path,
            created,
            holder: me,
            on_loss,
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
        let mut waited = false;
        for _ in 0..3 {
            match std::fs::hard_link(staged, path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(path).unwrap_or_default();
                    match serde_json::from_str::<Holder>(&text) {
                        // Another host's holder may be a pod that just died: wait for its
                        // heartbeat to stop (or the lock to go) before refusing.
                        Ok(holder) if holder.alive(path) && holder.elsewhere() && !waited => {
                            waited = true;
                            let deadline = Instant::now() + CROSS_HOST_WAIT;
                            while Instant::now() < deadline
                                && holder.alive(path)
                                && std::fs::read_to_string(path).is_ok_and(|t| t == text)
                            {
                                std::thread::sleep(Duration::from_millis(200));
                            }
                        }
                        Ok(holder) if holder.alive(path) => {
                            return Err(PipelineError::Locked {
                                output: output.to_path_buf(),
                                holder: holder.describe(),
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
        let holder = Holder::this_process(run_id);
        let text = serde_json::to_vec_pretty(&holder)
            .map_err(std::io::Error::other)
            .map_err(io)?;
        let temp = self.path.with_extension("relabel");
        // Under the mutex: the heartbeat sees the old holder in the file, or the new.
        let mut ours = self
            .holder
            .lock()
            .map_err(|_| io(std::io::Error::other("lock state poisoned")))?;
        std::fs::write(&temp, text)
            .and_then(|()| std::fs::File::open(&temp)?.sync_all())
            .and_then(|()| std::fs::rename(&temp, &self.path))
            .map_err(io)?;
        *ours = holder;
        drop(ours);
        let output = self.path.parent().unwrap_or(Path::new("."));
        run::sync_dir(output).map_err(io)
    }
}

impl OutputLock {
    /// Stops the run through `stop` if the lock is lost while held.
    pub fn stop_on_loss(&self, stop: StopSignal) {
        if let Ok(mut slot) = self.on_loss.lock() {
            *slot = Some(stop);
        }
    }
}

/// Why a heartbeat did not beat.
enum Beat {
    /// The lock is gone or another run's: stop now.
    Taken(String),
    /// It could not be read or touched: maybe a passing storage hiccup.
    Failed(String),
}

/// Touches the lock at `path` after checking it still names `ours`.
fn beat(path: &Path, ours: &Holder) -> Result<(), Beat> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Beat::Taken("it was removed".into()));
        }
        Err(e) => return Err(Beat::Failed(e.to_string())),
    };
    match serde_json::from_str::<Holder>(&text) {
        Ok(holder) if holder == *ours => {}
        Ok(holder) => {
            return Err(Beat::Taken(format!("it now names {}", holder.describe())));
        }
        Err(e) => return Err(Beat::Failed(format!("unreadable: {e}"))),
    }
    std::fs::File::options()
        .append(true)
        .open(path)
        .and_then(|f| f.set_modified(SystemTime::now()))
        .map_err(|e| Beat::Failed(e.to_string()))
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Only our own lock: one that another run took over (ours went stale) is theirs.
        let ours = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|text| serde_json::from_str::<Holder>(&text).ok())
            .is_some_and(|holder| self.holder.lock().is_ok_and(|ours| holder == *ours));
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
        if let Some(dir) = &self.created {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// A live run holding one of an output's locks.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LiveHolder {
    /// The run it is writing.
    pub run_id: String,
    /// Run, pid, host and since when, for messages.
    pub description: String,
    /// The lock file.
    pub lock: PathBuf,
}

/// The live holders of the lock files in `output` whose names `select` picks
/// ([`is_lock_file`] picks them all).
pub fn live_holders(output: &Path, select: impl Fn(&str) -> bool) -> Vec<LiveHolder> {
    let Ok(entries) = std::fs::read_dir(output) else {
        return Vec::new();
    };
    let mut holders = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !select(&name) {
            continue;
        }
        let path = entry.path();
        let holder = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| serde_json::from_str::<Holder>(&text).ok());
        if let Some(holder) = holder.filter(|h| h.alive(&path)) {
            holders.push(LiveHolder {
                description: holder.describe(),
                run_id: holder.run_id,
                lock: path,
            });
        }
    }
    holders.sort();
    holders
}

/// Whether `name` is one of abridge's lock files (the output's or a shard's).
pub fn is_lock_file(name: &str) -> bool {
    name == LOCK_FILE || is_shard_lock(name)
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

/// The machine's boot id and this process's pid namespace (`pid:[inode]`): two processes
/// with the same pid are the same one only where these agree.
fn process_space() -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let namespace = std::fs::read_link("/proc/self/ns/pid").ok()?;
    Some(format!("{}/{}", boot.trim(), namespace.display()))
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
        let (lock, note) = OutputLock::acquire(dir.path(), "run-a", None).expect("free");
        assert!(note.is_none());
        let err = OutputLock::acquire(dir.path(), "run-b", None).expect_err("held");
        let message = err.to_string();
        assert!(
            message.contains("run-a") && message.contains(&std::process::id().to_string()),
            "{message}"
        );
        drop(lock);
        assert!(!dir.path().join(LOCK_FILE).exists());
        OutputLock::acquire(dir.path(), "run-b", None).expect("released");

        // A folder the lock created is removed with it when nothing else was written.
        let fresh = dir.path().join("new-output");
        let (lock, _) = OutputLock::acquire(&fresh, "run-c", None).expect("free");
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
            let (_lock, note) = OutputLock::acquire(dir.path(), "next", None).expect("stale lock");
            let note = note.expect("a note");
            assert!(note.contains("stale") && note.contains("crashed"), "{note}");
        }

        // A lock is linked into place whole, so garbage is never a holder mid-write.
        let path = dir.path().join(LOCK_FILE);
        std::fs::write(&path, "{").expect("write");
        let (lock, note) = OutputLock::acquire(dir.path(), "next", None).expect("stale");
        assert!(note.is_some_and(|n| n.contains("unreadable")));
        drop(lock);

        // Another host's holder (a shard on a shared volume) lives while it heartbeats.
        let elsewhere = Holder {
            host: "another-host".into(),
            ..Holder::this_process("shard-run")
        };
        std::fs::write(&path, serde_json::to_string(&elsewhere).expect("json")).expect("write");
        assert!(OutputLock::acquire(dir.path(), "next", None).is_err());
        let age = |when: SystemTime| {
            std::fs::File::options()
                .append(true)
                .open(&path)
                .and_then(|f| f.set_modified(when))
                .expect("age the lock")
        };
        let silent = SystemTime::now() - HEARTBEAT_MISSED - Duration::from_secs(1);
        age(silent);
        let (lock, note) = OutputLock::acquire(dir.path(), "next", None).expect("stale");
        assert!(note.is_some_and(|n| n.contains("shard-run")));
        drop(lock);

        // A replacement pod of the same name (a Job's pod: same hostname, PID 1 in both) in
        // another process space: its pid says nothing here (it would look recycled), so it
        // lives while it heartbeats.
        let me = Holder::this_process("old-pod");
        assert!(
            me.process_space.is_some(),
            "Linux has a boot id and pid namespace"
        );
        let twin = Holder {
            start_ticks: me.start_ticks.map(|t| t + 1),
            process_space: Some("another-boot/pid:[1]".into()),
            ..me
        };
        std::fs::write(&path, serde_json::to_string(&twin).expect("json")).expect("write");
        let refused = OutputLock::acquire(dir.path(), "next", None).expect_err("alive");
        assert!(refused.to_string().contains("old-pod"), "{refused}");
        age(silent);
        let (lock, note) = OutputLock::acquire(dir.path(), "next", None).expect("stale");
        assert!(note.is_some_and(|n| n.contains("old-pod")));
        drop(lock);

        // A replacement pod: the other host's heartbeat stopped just short of staleness;
        // the run waits for it to go stale and takes over instead of refusing.
        std::fs::write(&path, serde_json::to_string(&elsewhere).expect("json")).expect("write");
        let almost = SystemTime::now() - HEARTBEAT_MISSED + Duration::from_millis(300);
        age(almost);
        let started = Instant::now();
        let (_lock, note) = OutputLock::acquire(dir.path(), "next", None).expect("taken over");
        assert!(note.is_some_and(|n| n.contains("shard-run")));
        assert!(started.elapsed() >= Duration::from_millis(250));
    }

    #[test]
    fn a_holder_that_loses_its_lock_stops_its_run() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (lock, _) = OutputLock::acquire(dir.path(), "mine", None).expect("free");
        let stop = StopSignal::default();
        lock.stop_on_loss(stop.clone());
        std::thread::sleep(HEARTBEAT * 3);
        assert_eq!(stop.reason(), None, "beating: still ours");
        std::fs::remove_file(dir.path().join(LOCK_FILE)).expect("remove");
        let deadline = Instant::now() + Duration::from_secs(5);
        while stop.reason().is_none() && Instant::now() < deadline {
            std::thread::sleep(HEARTBEAT);
        }
        let reason = stop.reason().unwrap_or_default();
        assert!(
            reason.contains("lost its lock") && reason.contains("removed"),
            "{reason}"
        );
    }

    #[test]
    fn shards_and_the_whole_output_exclude_each_other() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (first, _) = OutputLock::acquire(dir.path(), "g.0of2", Some((0, 2))).expect("free");
        let (second, _) =
            OutputLock::acquire(dir.path(), "g.1of2", Some((1, 2))).expect("side by side");
        let message = OutputLock::acquire(dir.path(), "whole", None)
            .expect_err("shards are live")
            .to_string();
        assert!(
            message.contains("g.0of2") && message.contains("g.1of2"),
            "{message}"
        );
        assert!(
            !dir.path().join(LOCK_FILE).exists(),
            "the refused run left no lock"
        );
        drop((first, second));

        let (_whole, _) = OutputLock::acquire(dir.path(), "whole", None).expect("free");
        let message = OutputLock::acquire(dir.path(), "g.0of2", Some((0, 2)))
            .expect_err("a whole run is live")
            .to_string();
        assert!(message.contains("run whole"), "{message}");
        assert!(!dir.path().join(shard_lock_file(0, 2)).exists());
        assert!(is_shard_lock("_abridge.10of12.lock") && !is_shard_lock(LOCK_FILE));
    }

    #[test]
    fn release_removes_only_a_lock_that_is_still_ours() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (lock, _) = OutputLock::acquire(dir.path(), "mine", None).expect("free");
        // Another run took the lock over (it judged ours stale).
        let theirs = Holder {
            pid: 1,
            ..Holder::this_process("theirs")
        };
        let path = dir.path().join(LOCK_FILE);
        std::fs::write(&path, serde_json::to_string(&theirs).expect("json")).expect("write");
        drop(lock);
        let left = std::fs::read_to_string(&path).expect("their lock stays");
        assert!(left.contains("theirs"), "{left}");
    }
}
