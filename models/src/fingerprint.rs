//! What a model's answers depend on, as one digest: every byte of every file it may load,
//! and the version of the code that computes with them. Reuse decisions (the SQL answer
//! cache, answers learned from a committed run, `run.skip_done`) key on these, never on a
//! path: weights replaced in place must give new answers.
//!
//! Every byte is read once per process (BLAKE3, about 0.4 s for a 0.5 GB GGUF file on one
//! core here); later calls in the same process reuse a file's digest while its device,
//! inode, size, modification and change times are all unchanged. The change time
//! (`ctime`) is what makes that safe: any write to the file, and any call that sets its
//! modification time back, moves it, and no user call can set it.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// Bumped with any change to abridge's engines, encoders or tokenizers that changes a
/// number they compute (a kernel's summation order, a tokenizer fix): answers kept from an
/// older revision are then computed again. Bumping it costs one recomputation; forgetting
/// it serves old answers, so when in doubt, bump.
const ENGINE_REVISION: u32 = 1;

/// The version of the code that turns weights into answers, for cache keys.
pub fn engine_version() -> String {
    format!(
        "abridge-models {} r{ENGINE_REVISION}",
        env!("CARGO_PKG_VERSION")
    )
}

/// `cpu` or `cuda`, whatever the ordinal: the device class decides the numbers (other
/// kernels, other summation orders), the GPU's number does not.
pub fn device_class(device: &str) -> &str {
    let device = device.trim();
    device.split_once(':').map_or(device, |(class, _)| class)
}

/// The digest of `model`: a file, or every file under a folder (subfolders included, each
/// named by its path inside the folder). A name that is neither (a hub id) stands for
/// itself.
pub fn model_digest(model: &str) -> Result<String, FingerprintError> {
    let root = Path::new(model);
    let mut files = Vec::new();
    if root.is_dir() {
        walk(root, &mut files)?;
        files.sort();
    } else if root.is_file() {
        files.push(root.to_path_buf());
    } else {
        return Ok(blake3::hash(model.as_bytes()).to_hex()[..32].to_string());
    }
    let mut hasher = blake3::Hasher::new();
    for file in &files {
        let name = file.strip_prefix(root).unwrap_or(file).to_string_lossy();
        let digest = file_digest(file)?;
        hasher.update(&(name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update(&digest);
    }
    Ok(hasher.finalize().to_hex()[..32].to_string())
}

/// A model file that could not be read for its digest.
#[derive(Debug, thiserror::Error)]
#[error("cannot read model file {} for its fingerprint: {source}", path.display())]
pub struct FingerprintError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<(), FingerprintError> {
    let failed = |source| FingerprintError {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(failed)? {
        let path = entry.map_err(failed)?.path();
        if path.is_dir() {
            walk(&path, files)?;
        } else if path.is_file() {
            files.push(path);
        }
    }
    Ok(())
}

/// What identifies a file's contents within one process (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    device: u64,
    inode: u64,
    size: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

#[cfg(unix)]
fn stamp(meta: &std::fs::Metadata) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    Stamp {
        device: meta.dev(),
        inode: meta.ino(),
        size: meta.size(),
        modified: (meta.mtime(), meta.mtime_nsec()),
        changed: (meta.ctime(), meta.ctime_nsec()),
    }
}

#[cfg(not(unix))]
fn stamp(_: &std::fs::Metadata) -> Stamp {
    // No change time to trust: never reuse (every call reads the file).
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Stamp {
        device: n,
        inode: 0,
        size: 0,
        modified: (0, 0),
        changed: (0, 0),
    }
}

/// Digests of the files read so far in this process, with the stamp each was read under.
type Known = Mutex<HashMap<PathBuf, (Stamp, [u8; 32])>>;

fn file_digest(path: &Path) -> Result<[u8; 32], FingerprintError> {
    static KNOWN: OnceLock<Known> = OnceLock::new();
    let failed = |source| FingerprintError {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(failed)?;
    let before = stamp(&file.metadata().map_err(failed)?);
    let known = KNOWN.get_or_init(Mutex::default);
    let lock = || known.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((seen, digest)) = lock().get(path)
        && *seen == before
    {
        return Ok(*digest);
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(&file).map_err(failed)?;
    let digest = *hasher.finalize().as_bytes();
    // A file written while it was read is not remembered: the next call reads it again.
    if stamp(&file.metadata().map_err(failed)?) == before {
        lock().insert(path.to_path_buf(), (before, digest));
    }
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(dir: &Path) -> String {
        model_digest(&dir.display().to_string()).expect("digest")
    }

    #[test]
    fn every_file_counts_subfolders_included_and_content_not_times() {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = dir.path().join("model");
        std::fs::create_dir_all(model.join("1_Pooling")).expect("mkdir");
        std::fs::write(model.join("weights.bin"), [1u8; 64]).expect("write");
        std::fs::write(model.join("1_Pooling/config.json"), "{\"mean\": true}").expect("write");
        let first = digest(&model);
        assert_eq!(first.len(), 32);
        assert_eq!(digest(&model), first, "asked again");

        std::fs::write(model.join("1_Pooling/config.json"), "{\"mean\": fals}").expect("write");
        let pooled = digest(&model);
        assert_ne!(pooled, first, "a subfolder's file changed");

        // The same bytes written again (new times): the same digest.
        std::fs::write(model.join("weights.bin"), [1u8; 64]).expect("write");
        assert_eq!(digest(&model), pooled);

        // Other bytes of the same size, with the old modification time put back: the change
        // time still moves, so the file is read again.
        let weights = model.join("weights.bin");
        let modified = std::fs::metadata(&weights)
            .and_then(|m| m.modified())
            .expect("mtime");
        std::fs::write(&weights, [2u8; 64]).expect("write");
        std::fs::File::options()
            .write(true)
            .open(&weights)
            .and_then(|f| f.set_modified(modified))
            .expect("set mtime");
        assert_ne!(digest(&model), pooled, "weights replaced in place");

        // A file is named by its place in the folder: moving it changes the digest.
        std::fs::rename(&weights, model.join("1_Pooling/weights.bin")).expect("rename");
        assert_ne!(digest(&model), pooled);
    }

    #[test]
    fn a_file_a_name_and_a_device_class() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("m.gguf");
        std::fs::write(&file, b"GGUF").expect("write");
        assert_ne!(
            digest(&file),
            digest(dir.path()),
            "the folder names its file"
        );
        assert_eq!(
            model_digest("org/model").expect("a name"),
            model_digest("org/model").expect("a name")
        );
        assert_ne!(
            model_digest("org/model").expect("a name"),
            model_digest("org/other").expect("a name")
        );
        assert_eq!(device_class("cuda:1"), "cuda");
        assert_eq!(device_class(" cpu "), "cpu");
    }
}
