//! The answers of SQL's model functions, kept so that a query asked again calls no model.
//!
//! Keys are digests of (function, model fingerprint, prompt version, input text), so an
//! answer is reused only for the same question to the same model. Answers come from two
//! places: files in the cache folder (`$ABRIDGE_CACHE/sql-results`, one Parquet file per
//! `abridge sql` that called a model, written to a temporary name and renamed, so that a
//! crash never leaves half a file under a real name), and the committed rows of the job's
//! latest run, which are read, never written. Failed calls are not kept: a later query
//! tries them again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use arrow::array::{
    Array, ArrayRef, AsArray, Float32Builder, ListBuilder, RecordBatch, StringArray, StringBuilder,
};
use arrow::datatypes::{DataType, Field, Float32Type, Schema};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::error::PipelineError;

/// A key: BLAKE3 over the parts of the question, each length-prefixed.
pub type Key = [u8; 32];

/// The key of `parts` (function, fingerprint, version, input ...).
pub fn key(parts: &[&str]) -> Key {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    *hasher.finalize().as_bytes()
}

/// A model's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Text(String),
    Vector(Arc<[f32]>),
}

/// Answers by key; see the module's documentation.
pub struct ResultCache {
    /// None: the cache is off (`--no-cache`): nothing is looked up or kept.
    dir: Option<PathBuf>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    loaded: bool,
    known: HashMap<Key, Answer>,
    /// Answers of this session's calls, to write on [`ResultCache::persist`].
    fresh: Vec<(Key, Answer)>,
}

impl ResultCache {
    /// A cache kept in `dir` (read on first use), or none at all.
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self {
            dir,
            state: Mutex::new(State::default()),
        }
    }

    /// Whether answers are looked up and kept.
    pub fn enabled(&self) -> bool {
        self.dir.is_some()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held leaves a map that is still whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The answer to `key`, if one is known.
    pub fn get(&self, key: &Key) -> Option<Answer> {
        let dir = self.dir.as_ref()?;
        let mut state = self.state();
        if !state.loaded {
            state.loaded = true;
            load(dir, &mut state.known);
        }
        state.known.get(key).cloned()
    }

    /// An answer from elsewhere (a committed run): used, never written.
    pub fn know(&self, key: Key, answer: Answer) {
        if self.enabled() {
            self.state().known.entry(key).or_insert(answer);
        }
    }

    /// An answer a model just gave: used, and written by [`ResultCache::persist`].
    pub fn insert(&self, key: Key, answer: Answer) {
        if self.enabled() {
            let mut state = self.state();
            state.known.insert(key, answer.clone());
            state.fresh.push((key, answer));
        }
    }

    /// Writes the answers not yet written, as one new file; returns how many.
    pub fn persist(&self) -> Result<usize, PipelineError> {
        let Some(dir) = &self.dir else { return Ok(0) };
        let fresh = std::mem::take(&mut self.state().fresh);
        if fresh.is_empty() {
            return Ok(0);
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PipelineError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.6f");
        let name = format!("results-{stamp}-{}.parquet", std::process::id());
        let (path, partial) = (dir.join(&name), dir.join(format!(".{name}.partial")));
        let batch = to_batch(&fresh)?;
        let file = std::fs::File::create(&partial).map_err(io(&partial))?;
        let mut writer = ArrowWriter::try_new(file, batch.schema(), None)?;
        writer.write(&batch)?;
        let file = writer.into_inner()?;
        file.sync_all().map_err(io(&partial))?;
        std::fs::rename(&partial, &path).map_err(io(&path))?;
        Ok(fresh.len())
    }
}

fn schema() -> Schema {
    Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("text", DataType::Utf8, true),
        Field::new(
            "vector",
            DataType::List(Arc::new(Field::new("item", DataType::Float32, true))),
            true,
        ),
    ])
}

fn to_batch(answers: &[(Key, Answer)]) -> Result<RecordBatch, PipelineError> {
    let mut keys = StringBuilder::new();
    let mut texts = StringBuilder::new();
    let mut vectors = ListBuilder::new(Float32Builder::new());
    for (key, answer) in answers {
        keys.append_value(hex(key));
        match answer {
            Answer::Text(text) => {
                texts.append_value(text);
                vectors.append_null();
            }
            Answer::Vector(vector) => {
                texts.append_null();
                vectors.values().append_slice(vector);
                vectors.append(true);
            }
        }
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(keys.finish()),
        Arc::new(texts.finish()),
        Arc::new(vectors.finish()),
    ];
    Ok(RecordBatch::try_new(Arc::new(schema()), columns)?)
}

/// Every readable file of `dir` into `known`. A file that cannot be read is passed over
/// with a warning: the cache only saves time, and its answers will be computed again.
fn load(dir: &Path, known: &mut HashMap<Key, Answer>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    for file in files {
        if let Err(reason) = load_file(&file, known) {
            tracing::warn!(
                file = %file.display(),
                "model result cache: {}: {reason} (left out; its answers are computed again)",
                file.display()
            );
        }
    }
}

fn load_file(file: &Path, known: &mut HashMap<Key, Answer>) -> Result<(), String> {
    let open = std::fs::File::open(file).map_err(|e| e.to_string())?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(open)
        .and_then(|b| b.build())
        .map_err(|e| e.to_string())?;
    for batch in reader {
        let batch = batch.map_err(|e| e.to_string())?;
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| format!("no `{name}` column"))
        };
        let keys = column("key")?
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or("`key` is not text")?
            .clone();
        let texts = column("text")?.as_string_opt::<i32>().cloned();
        let vectors = column("vector")?.as_list_opt::<i32>().cloned();
        for row in 0..batch.num_rows() {
            let Some(key) = unhex(keys.value(row)) else {
                continue;
            };
            let answer = match (&texts, &vectors) {
                (Some(t), _) if t.is_valid(row) => Answer::Text(t.value(row).to_string()),
                (_, Some(v)) if v.is_valid(row) => {
                    let values = v.value(row);
                    let floats = values
                        .as_primitive_opt::<Float32Type>()
                        .ok_or("`vector` is not a list of float32")?;
                    Answer::Vector(floats.values().iter().copied().collect())
                }
                _ => continue,
            };
            known.insert(key, answer);
        }
    }
    Ok(())
}

fn hex(key: &Key) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Key> {
    let mut key = [0u8; 32];
    if text.len() != 64 {
        return None;
    }
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_survive_a_new_session_and_failed_files_are_passed_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ResultCache::new(Some(dir.path().to_path_buf()));
        let (a, b) = (
            key(&["summarize", "m", "v", "x"]),
            key(&["embed", "m", "x"]),
        );
        assert_ne!(a, b);
        assert_eq!(cache.get(&a), None);
        cache.insert(a, Answer::Text("short".into()));
        cache.insert(b, Answer::Vector(vec![0.5, -1.0].into()));
        assert_eq!(cache.persist().expect("persist"), 2);
        assert_eq!(cache.persist().expect("nothing new"), 0);
        std::fs::write(dir.path().join("broken.parquet"), b"not parquet").expect("write");

        let again = ResultCache::new(Some(dir.path().to_path_buf()));
        assert_eq!(again.get(&a), Some(Answer::Text("short".into())));
        assert_eq!(again.get(&b), Some(Answer::Vector(vec![0.5, -1.0].into())));
    }

    #[test]
    fn an_off_cache_keeps_nothing() {
        let cache = ResultCache::new(None);
        let k = key(&["x"]);
        cache.insert(k, Answer::Text("t".into()));
        cache.know(k, Answer::Text("t".into()));
        assert_eq!(cache.get(&k), None);
        assert_eq!(cache.persist().expect("persist"), 0);
    }
}
