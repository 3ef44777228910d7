//! Helpers shared by the end-to-end test files.

use std::path::{Path, PathBuf};

/// A copy of the tiny BLOOM checkpoint (`tests/fixtures/bloom-tiny-4h`) in `dir`, whose
/// weights a test may change.
pub fn own_bloom(dir: &Path) -> std::io::Result<PathBuf> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/bloom-tiny-4h");
    let model = dir.join("bloom");
    std::fs::create_dir_all(&model)?;
    for entry in std::fs::read_dir(fixture)? {
        let entry = entry?;
        std::fs::copy(entry.path(), model.join(entry.file_name()))?;
    }
    Ok(model)
}

/// Changes one weight of the checkpoint in `model` in place: the same path and size, and
/// the old modification time put back, as a careless copy over the old file leaves it.
pub fn change_weights_in_place(model: &Path) -> std::io::Result<()> {
    let weights = model.join("model.safetensors");
    let modified = std::fs::metadata(&weights)?.modified()?;
    let mut bytes = std::fs::read(&weights)?;
    // The lowest byte of a value near the end (a mantissa byte, whatever the float type).
    let at = bytes.len() - 4;
    bytes[at] ^= 1;
    std::fs::write(&weights, bytes)?;
    std::fs::File::options()
        .write(true)
        .open(&weights)?
        .set_modified(modified)
}
