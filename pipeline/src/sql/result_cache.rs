//! The answers of SQL's model functions, kept so that a query asked again calls no model.
//!
//! Keys are digests of (function, model fingerprint, prompt version, input text), so an
//! answer is reused only for the same question to the same model. Answers come from two
//! places: files in the cache folder (`$ABRIDGE_CACHE/sql-results`, one Parquet file per
//! `abridge sql` that called a model, written to a temporary name and renamed, so that a
//! crash never leaves half a file under a real name), and the committed rows of the job's
//! latest run, which are read, never written. Failed calls are not kept: a later query
//! tries them again.
//!
//! Answers are written as they come (after each batch a model answers), so that a query
//! stopped halfway keeps what it paid for. The folder is held under a size cap: past it,
//! the oldest files go first. `queries.log` has a line per query that used the cache
//! (its model calls and cache hits), for `abridge cache`.

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
    /// None: the cache is off (`--no-cache`): nothing is read or written, and only this
    /// session's own answers are reused (a question asked twice in one query is asked once).
    dir: Option<PathBuf>,
    /// The most bytes the folder's answer files may take.
    max_bytes: u64,
    state: Mutex<State>,
}

/// The default size cap of the cache folder: 2 GiB (about 4 million summaries).
pub const DEFAULT_MAX_BYTES: u64 = 2 << 30;

/// The log of queries that used the cache, in its folder.
const QUERY_LOG: &str = "queries.log";

#[derive(Default)]
struct State {
    loaded: bool,
    known: HashMap<Key, Answer>,
    /// Answers of this session's calls, to write on [`ResultCache::persist`].
    fresh: Vec<(Key, Answer)>,
}

impl ResultCache {
    /// A cache kept in `dir` (read on first use) within `max_bytes`, or none at all.
    pub fn new(dir: Option<PathBuf>, max_bytes: u64) -> Self {
        Self {
            dir,
            max_bytes,
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
        let mut state = self.state();
        if !state.loaded
            && let Some(dir) = &self.dir
        {
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
        let enabled = self.enabled();
        let mut state = self.state();
        if enabled {
            state.fresh.push((key, answer.clone()));
        }
        state.known.insert(key, answer);
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
        evict(dir, self.max_bytes, &path).map_err(io(dir))?;
        Ok(fresh.len())
    }

    /// Notes a query's model calls and cache hits in the folder's log (nothing when the
    /// cache is off); a log that cannot be written is passed over.
    pub fn log_query(&self, calls: u64, hits: u64) {
        let Some(dir) = &self.dir else { return };
        let line = format!("{} {calls} {hits}\n", chrono::Utc::now().to_rfc3339());
        let written = std::fs::create_dir_all(dir).and_then(|_| {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(QUERY_LOG))
                .and_then(|mut f| f.write_all(line.as_bytes()))
        });
        if let Err(e) = written {
            tracing::warn!(
                "model result cache: cannot log the query in {}: {e}",
                dir.display()
            );
        }
    }
}

/// The answer files of `dir`, oldest first (their names begin with the time written).
fn answer_files(dir: &Path) -> std::io::Result<Vec<(PathBuf, u64)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("results-") && name.ends_with(".parquet") {
            files.push((entry.path(), entry.metadata()?.len()));
        }
    }
    files.sort();
    Ok(files)
}

/// Removes the oldest answer files of `dir` until the rest fit in `max_bytes`, never
/// `newest` (the one just written).
fn evict(dir: &Path, max_bytes: u64, newest: &Path) -> std::io::Result<()> {
    let files = answer_files(dir)?;
    let mut total: u64 = files.iter().map(|(_, size)| size).sum();
    for (file, size) in files {
        if total <= max_bytes {
            break;
        }
        if file != newest {
            match std::fs::remove_file(&file) {
                Ok(()) => total -= size,
                // Another session evicted it first.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => total -= size,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// What `abridge cache` shows of a cache folder.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct CacheSummary {
    /// Answer files, and their bytes.
    pub files: usize,
    pub bytes: u64,
    /// Answers kept (a question answered twice, in two files, counts twice).
    pub answers: u64,
    /// Queries that used the cache, and their model calls and cache hits, all told.
    pub queries: u64,
    pub model_calls: u64,
    pub cache_hits: u64,
}

/// The summary of the cache folder `dir` (empty when there is none yet).
pub fn summary(dir: &Path) -> Result<CacheSummary, PipelineError> {
    let mut out = CacheSummary::default();
    if !dir.exists() {
        return Ok(out);
    }
    let io = |source| PipelineError::Io {
        path: dir.to_path_buf(),
        source,
    };
    for (file, size) in answer_files(dir).map_err(io)? {
        out.files += 1;
        out.bytes += size;
        let rows = std::fs::File::open(&file)
            .ok()
            .and_then(|f| ParquetRecordBatchReaderBuilder::try_new(f).ok())
            .map_or(0, |b| b.metadata().file_metadata().num_rows());
        out.answers += rows.max(0) as u64;
    }
    if let Ok(log) = std::fs::read_to_string(dir.join(QUERY_LOG)) {
        for line in log.lines() {
            let mut fields = line.split_whitespace().skip(1).map(str::parse::<u64>);
            if let (Some(Ok(calls)), Some(Ok(hits))) = (fields.next(), fields.next()) {
                out.queries += 1;
                out.model_calls += calls;
                out.cache_hits += hits;
            }
        }
    }
    Ok(out)
}

/// Removes every answer file and the query log of `dir`; returns the bytes freed.
pub fn clear(dir: &Path) -> Result<u64, PipelineError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PipelineError::Io { path, source }
    };
    if !dir.exists() {
        return Ok(0);
    }
    let mut freed = 0;
    for (file, size) in answer_files(dir).map_err(io(dir))? {
        std::fs::remove_file(&file).map_err(io(&file))?;
        freed += size;
    }
    let log = dir.join(QUERY_LOG);
    if log.exists() {
        std::fs::remove_file(&log).map_err(io(&log))?;
    }
    Ok(freed)
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
    let Ok(files) = answer_files(dir) else {
        return;
    };
    for (file, _) in files {
        // A corrupt file must not take the query down: some make the Parquet reader panic.
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut answers = HashMap::new();
            load_file(&file, &mut answers).map(|()| answers)
        }))
        .unwrap_or_else(|_| Err("the Parquet reader failed on it".into()));
        match loaded {
            Ok(answers) => known.extend(answers),
            Err(reason) => {
                tracing::warn!(
                    file = %file.display(),
                    "model result cache: {}: {reason} (left out; its answers are computed \
                     again)",
                    file.display()
                );
            }
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
        let cache = ResultCache::new(Some(dir.path().to_path_buf()), DEFAULT_MAX_BYTES);
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
        std::fs::write(dir.path().join("results-0-broken.parquet"), b"not parquet").expect("write");

        let again = ResultCache::new(Some(dir.path().to_path_buf()), DEFAULT_MAX_BYTES);
        assert_eq!(again.get(&a), Some(Answer::Text("short".into())));
        assert_eq!(again.get(&b), Some(Answer::Vector(vec![0.5, -1.0].into())));
    }

    #[test]
    fn an_off_cache_keeps_only_the_sessions_own_answers() {
        let cache = ResultCache::new(None, DEFAULT_MAX_BYTES);
        let (learned, asked) = (key(&["learned"]), key(&["asked"]));
        cache.know(learned, Answer::Text("t".into()));
        assert_eq!(cache.get(&learned), None);
        cache.insert(asked, Answer::Text("a".into()));
        assert_eq!(cache.get(&asked), Some(Answer::Text("a".into())));
        assert_eq!(cache.persist().expect("persist"), 0);
    }

    #[test]
    fn the_oldest_files_go_past_the_cap_and_the_summary_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ResultCache::new(Some(dir.path().to_path_buf()), 1);
        for i in 0..3 {
            cache.insert(key(&[&i.to_string()]), Answer::Text("x".repeat(100)));
            assert_eq!(cache.persist().expect("persist"), 1);
            cache.log_query(1, i);
        }
        let kept = summary(dir.path()).expect("summary");
        assert_eq!(
            (kept.files, kept.answers),
            (1, 1),
            "only the newest fits: {kept:?}"
        );
        assert_eq!((kept.queries, kept.model_calls, kept.cache_hits), (3, 3, 3));
        let again = ResultCache::new(Some(dir.path().to_path_buf()), 1);
        assert_eq!(again.get(&key(&["2"])), Some(Answer::Text("x".repeat(100))));
        assert_eq!(again.get(&key(&["0"])), None);
        assert_eq!(clear(dir.path()).expect("clear"), kept.bytes);
        assert_eq!(
            summary(dir.path()).expect("summary"),
            CacheSummary::default()
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
            abridge_models::fuzz_cases(128)
        ))]
        /// A cache file with bytes changed anywhere, or cut anywhere, beside a good one:
        /// loading never panics, and the good file's answers are still found.
        #[test]
        fn changed_cache_files_never_panic(
            changes in proptest::collection::vec((0usize..4096, proptest::prelude::any::<u8>()), 1..8),
            cut in proptest::option::of(0usize..4096),
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let cache = ResultCache::new(Some(dir.path().to_path_buf()), DEFAULT_MAX_BYTES);
            let (good, other) = (key(&["good"]), key(&["other"]));
            cache.insert(good, Answer::Text("kept".into()));
            cache.persist().expect("persist");
            cache.insert(other, Answer::Vector(vec![0.25; 8].into()));
            cache.persist().expect("persist");
            let files = answer_files(dir.path()).expect("files");
            let (last, _) = files.last().expect("two files");
            let bytes = abridge_models::changed_bytes(std::fs::read(last).expect("read"), &changes, cut);
            std::fs::write(last, &bytes).expect("write");
            let again = ResultCache::new(Some(dir.path().to_path_buf()), DEFAULT_MAX_BYTES);
            proptest::prop_assert_eq!(again.get(&good), Some(Answer::Text("kept".into())));
        }
    }
}
