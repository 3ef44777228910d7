//! A GGUF file's header walked with every count checked against the file's size, before
//! candle (or mistral.rs) reads it: their readers size allocations by the header's counts
//! (`vec![0; len]` for a string, `Vec::with_capacity(len)` for an array, a tensor's bytes
//! from its shape), so a file that lies about them would abort the process on allocation
//! rather than fail its load. After this check every such count is bounded by the bytes
//! the file really holds.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::gguf_file;

/// GGUF's value types that have a fixed size, by their number, in bytes.
fn scalar_size(kind: u32) -> Option<u64> {
    match kind {
        0 | 1 | 7 => Some(1), // u8, i8, bool
        2 | 3 => Some(2),     // u16, i16
        4..=6 => Some(4),     // u32, i32, f32
        10..=12 => Some(8),   // u64, i64, f64
        _ => None,
    }
}

/// The ggml types candle reads, by their number: (values per block, bytes per block), as
/// llama.cpp lays them out.
fn ggml_block(kind: u32) -> Option<(u64, u64)> {
    Some(match kind {
        0 => (1, 4),      // F32
        1 | 30 => (1, 2), // F16, BF16
        2 => (32, 18),    // Q4_0
        3 => (32, 20),    // Q4_1
        6 => (32, 22),    // Q5_0
        7 => (32, 24),    // Q5_1
        8 => (32, 34),    // Q8_0
        9 => (32, 36),    // Q8_1
        10 => (256, 84),  // Q2_K
        11 => (256, 110), // Q3_K
        12 => (256, 144), // Q4_K
        13 => (256, 176), // Q5_K
        14 => (256, 210), // Q6_K
        15 => (256, 292), // Q8_K
        _ => return None,
    })
}

const STRING: u32 = 8;
const ARRAY: u32 = 9;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;

struct Header<R> {
    reader: R,
    size: u64,
    at: u64,
}

impl<R: Read> Header<R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut buf = [0u8; N];
        self.reader
            .read_exact(&mut buf)
            .map_err(|_| format!("its header ends early, at byte {}", self.at))?;
        self.at += N as u64;
        Ok(buf)
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.bytes::<4>().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, String> {
        self.bytes::<8>().map(u64::from_le_bytes)
    }

    /// `n` bytes skipped, where the file has them.
    fn skip(&mut self, n: u64, what: &str) -> Result<(), String> {
        if n > self.size.saturating_sub(self.at) {
            return Err(format!(
                "{what} of {n} bytes at byte {}, past the end of the file ({} bytes)",
                self.at, self.size
            ));
        }
        std::io::copy(&mut (&mut self.reader).take(n), &mut std::io::sink())
            .map_err(|e| format!("reading its header: {e}"))?;
        self.at += n;
        Ok(())
    }

    /// A string's length, where the file holds that many bytes after it.
    fn string_len(&mut self, what: &str) -> Result<u64, String> {
        let n = self.u64()?;
        if n > self.size.saturating_sub(self.at) {
            return Err(format!(
                "{what}: a string of {n} bytes at byte {}, past the end of the file ({} bytes)",
                self.at, self.size
            ));
        }
        Ok(n)
    }

    /// A string the check needs to read (a key, a tensor's name).
    fn string(&mut self, what: &str) -> Result<Vec<u8>, String> {
        let n = self.string_len(what)?;
        let mut text = vec![0u8; n as usize];
        self.reader
            .read_exact(&mut text)
            .map_err(|_| format!("{what}: the file ends inside a string"))?;
        self.at += n;
        Ok(text)
    }

    fn value(&mut self, kind: u32, key: &str, depth: usize) -> Result<(), String> {
        if let Some(size) = scalar_size(kind) {
            return self.skip(size, key);
        }
        match kind {
            // Skipped, not read: a tokenizer's 150k strings are read once, by candle.
            STRING => {
                let n = self.string_len(key)?;
                self.skip(n, key)
            }
            ARRAY if depth < 2 => {
                let inner = self.u32()?;
                let len = self.u64()?;
                // Each element takes at least its size in the file (a string: its length's
                // 8 bytes), so the count is bounded by the bytes left.
                let least = scalar_size(inner).unwrap_or(8);
                if len.saturating_mul(least) > self.size.saturating_sub(self.at) {
                    return Err(format!(
                        "`{key}`: an array of {len} values, more than the file holds"
                    ));
                }
                match scalar_size(inner) {
                    Some(size) => self.skip(len * size, key),
                    None => (0..len).try_for_each(|_| self.value(inner, key, depth + 1)),
                }
            }
            ARRAY => Err(format!("`{key}`: arrays nested too deep")),
            other => Err(format!("`{key}`: a value of unknown type {other}")),
        }
    }
}

/// Checks that the GGUF header of `file` describes a file of its size: magic and version,
/// every string and array within the file, every tensor of a known type with at most four
/// dimensions, whole blocks, and its data inside the file.
pub fn check(file: &mut File) -> Result<(), String> {
    let size = file
        .metadata()
        .map_err(|e| format!("reading it: {e}"))?
        .len();
    file.seek(SeekFrom::Start(0))
        .map_err(|e| format!("reading it: {e}"))?;
    let mut header = Header {
        reader: BufReader::new(&mut *file),
        size,
        at: 0,
    };
    if &header.bytes::<4>()? != b"GGUF" {
        return Err("no GGUF magic at its start".into());
    }
    let version = header.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "GGUF version {version}; abridge reads versions 2 and 3"
        ));
    }
    let tensors = header.u64()?;
    let keys = header.u64()?;
    // A key takes at least 12 bytes (length, type), a tensor at least 24.
    if keys
        .saturating_mul(12)
        .saturating_add(tensors.saturating_mul(24))
        > size
    {
        return Err(format!(
            "its header counts {keys} metadata keys and {tensors} tensors, more than the \
             file holds ({size} bytes)"
        ));
    }
    let mut alignment = 32u64;
    for _ in 0..keys {
        let key = String::from_utf8_lossy(&header.string("a metadata key")?).into_owned();
        let kind = header.u32()?;
        if key == "general.alignment" && kind == 4 {
            alignment = u64::from(header.u32()?);
            if alignment == 0 || !alignment.is_power_of_two() {
                return Err(format!("`general.alignment` = {alignment}"));
            }
        } else {
            header.value(kind, &key, 0)?;
        }
    }
    let mut table = Vec::new();
    for _ in 0..tensors {
        let name = String::from_utf8_lossy(&header.string("a tensor name")?).into_owned();
        let dims = header.u32()?;
        if dims == 0 || dims > MAX_DIMS {
            return Err(format!("tensor `{name}` has {dims} dimensions"));
        }
        let mut count = 1u64;
        let mut first = 0;
        for d in 0..dims {
            let n = header.u64()?;
            if d == 0 {
                first = n;
            }
            count = count
                .checked_mul(n)
                .ok_or_else(|| format!("tensor `{name}`: its shape overflows"))?;
        }
        let kind = header.u32()?;
        let (block, block_bytes) = ggml_block(kind).ok_or_else(|| {
            format!("tensor `{name}`: ggml type {kind}, which candle does not read")
        })?;
        let offset = header.u64()?;
        if first % block != 0 {
            return Err(format!(
                "tensor `{name}`: rows of {first} values in blocks of {block}"
            ));
        }
        let bytes = (count / block).saturating_mul(block_bytes);
        table.push((name, offset, bytes));
    }
    let data = header.at.div_ceil(alignment).saturating_mul(alignment);
    for (name, offset, bytes) in table {
        let end = data.saturating_add(offset).saturating_add(bytes);
        if end > size {
            return Err(format!(
                "tensor `{name}` ends at byte {end}, past the end of the file ({size} bytes)"
            ));
        }
    }
    Ok(())
}

/// The checked header of the GGUF file at `path`, and the file, positioned for reading
/// tensors.
pub fn read(path: &Path) -> Result<(File, gguf_file::Content), String> {
    let mut file = File::open(path).map_err(|e| format!("reading it: {e}"))?;
    check(&mut file).map_err(|e| format!("not a readable GGUF file: {e}"))?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| format!("reading it: {e}"))?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| format!("not a readable GGUF file: {e}"))?;
    Ok((file, content))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tiny() -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen2-tiny.gguf");
        std::fs::read(path).expect("the tiny Qwen2 fixture")
    }

    fn checked(bytes: &[u8]) -> Result<(), String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, bytes).expect("write");
        read(&path).map(drop)
    }

    /// The whole load of a Llama/Qwen2 engine model from `bytes`, as a job makes it.
    fn loaded(bytes: &[u8]) -> Result<(), String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, bytes).expect("write");
        crate::models::llama::Llama::load(&path, candle_core::DType::F16)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_good_file_passes_and_lies_are_named() {
        let good = tiny();
        assert_eq!(checked(&good), Ok(()));
        let cut = checked(&good[..good.len() - 100]).unwrap_err();
        assert!(cut.contains("past the end of the file"), "{cut}");
        // The first key's length (bytes 24..32) claims 2^62 bytes.
        let mut long = good.clone();
        long[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
        let err = checked(&long).unwrap_err();
        assert!(
            err.contains("a string of 4611686018427387904 bytes"),
            "{err}"
        );
        // The tensor count (bytes 8..16) claims 2^60 tensors.
        let mut many = good.clone();
        many[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
        let err = checked(&many).unwrap_err();
        assert!(err.contains("more than the file holds"), "{err}");
        assert!(checked(b"GGUF").unwrap_err().contains("ends early"));
        assert!(checked(b"not a gguf file").unwrap_err().contains("magic"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(256)))]
        /// Bytes of the file changed anywhere in its header, or the file cut anywhere:
        /// the whole load (the check, candle's reader, the model's tensors) answers, and
        /// never panics or aborts.
        #[test]
        fn changed_headers_never_panic(
            changes in proptest::collection::vec((0usize..4096, any::<u8>()), 1..8),
            cut in proptest::option::of(0usize..8192),
        ) {
            let bytes = crate::changed_bytes(tiny(), &changes, cut);
            let _ = loaded(&bytes);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut with_magic = b"GGUF\x03\0\0\0".to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = checked(&bytes);
            let _ = checked(&with_magic);
        }
    }
}
