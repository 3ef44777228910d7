//! `index`: every ticket in a tantivy index, beside its vector, for `abridge search`.
//!
//! One index per job. Fields: `id` (exact, stored, fast), `title` and `text` (BM25 over
//! [`TOKENIZER`]: words for alphabetic scripts, one token per CJK character), `vector`
//! (stored little-endian f32 bytes), `topic`, `created_at`, `run_id`. Indexing a ticket
//! deletes any earlier document with its id first, so an index never holds two versions.
//!
//! Documents are added as the sink stages rows into an output file, and committed right
//! after that file is published ([`RunIndexer`], a [`PublishObserver`]). Each commit
//! records the run and how many of its files the index holds ([`IndexPosition`]): a crash
//! between a file's rename and the index commit leaves the index one file behind the
//! table, which the pipeline sees on the next run and repairs from the table's files.
//!
//! Past 800 lines with its tests (a sixth of it): indexing, both searches, their fusion and
//! the commit protocol are one index's life.
//!
//! Vector search is exact (a scan of the stored vectors): a nightly index of ~100k tickets
//! scans in well under a second, and exact results need no tuning.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use abridge_schemas::output::{ERROR, RUN_ID};
use arrow::array::{
    Array, FixedSizeListArray, Float32Array, StringArray, TimestampMicrosecondArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, TimeUnit};
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};
use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, BoostQuery, Occur, Query, TermQuery};
use tantivy::schema::{
    FAST, Field, INDEXED, IndexRecordOption, STORED, STRING, Schema, TextFieldIndexing,
    TextOptions, Value,
};
use tantivy::{DateTime, Index, IndexWriter, TantivyDocument, TantivyError, Term};

mod tokenizer;

use self::tokenizer::{analyzer, register_tokenizer};
use crate::OperatorError;
use crate::embed::EMBEDDING;
use crate::filter::{TOPIC, string_column};
use crate::sink::{PublishObserver, SinkReport};

/// Name under which the text analyzer is registered with every opened index.
pub const TOKENIZER: &str = "abridge_cjk";
/// abridge's own record of an index: format version, vector length, model.
const META_FILE: &str = "abridge-index.json";
/// Version of the field layout; an index of another version must be rebuilt.
const FORMAT: u32 = 1;
/// Indexing memory; tantivy flushes a segment when it is used up.
const WRITER_MEMORY: usize = 64 << 20;
/// Title matches weigh more than body matches: titles are short and on topic.
const TITLE_BOOST: f32 = 1.5;

/// Errors of opening, writing or searching an index.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    /// Another process holds the index's writer lock.
    #[error(
        "index {} is locked by another writer (is another run of this job going on?)",
        dir.display()
    )]
    Locked {
        /// The index folder.
        dir: PathBuf,
    },
    /// The folder holds an index abridge cannot use as it is.
    #[error("index {}: {reason}", dir.display())]
    Incompatible {
        /// The index folder.
        dir: PathBuf,
        /// What does not fit, and what to do.
        reason: String,
    },
    /// There is no index at the path.
    #[error("no index at {} (run the job first, or check the path)", dir.display())]
    Missing {
        /// The path given.
        dir: PathBuf,
    },
    /// Any other tantivy or filesystem failure.
    #[error("index {}: {source}", dir.display())]
    Tantivy {
        /// The index folder.
        dir: PathBuf,
        /// tantivy's error.
        source: TantivyError,
    },
}

/// Writes abridge's record of the index (whole or not at all: a crash leaves the old one).
fn write_meta(dir: &Path, meta: &IndexMeta) -> Result<(), TantivyError> {
    let text = serde_json::to_string_pretty(meta).unwrap_or_default();
    let staged = dir.join(format!("{META_FILE}.tmp"));
    std::fs::write(&staged, text)?;
    std::fs::rename(&staged, dir.join(META_FILE))?;
    Ok(())
}

/// What abridge records beside tantivy's own files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexMeta {
    /// Layout version ([`FORMAT`]).
    pub format: u32,
    /// Length of the stored vectors.
    pub dim: usize,
    /// The encoder that made them, so that `abridge search --index` can embed queries alike.
    pub model: PathBuf,
    /// That encoder's fingerprint ([`abridge_models::encoder::Encoder::fingerprint`]): vectors of
    /// another model are not comparable with these, even of the same length. None in
    /// indexes made before it was recorded (the next run records it).
    #[serde(default)]
    pub encoder: Option<String>,
}

impl IndexMeta {
    /// Why vectors of the encoder `fingerprint` (model `model`) do not belong in this
    /// index, if they do not.
    pub fn mismatch(&self, dim: usize, model: &Path, fingerprint: &str) -> Option<String> {
        if self.dim != dim {
            return Some(format!(
                "it holds {}-dimension vectors (model {}), the encoder {} makes {dim}",
                self.dim,
                self.model.display(),
                model.display()
            ));
        }
        match &self.encoder {
            Some(theirs) if theirs != fingerprint => Some(format!(
                "its vectors were made by another encoder (model {}, fingerprint {theirs}) \
                 than {} (fingerprint {fingerprint}); cosines between the two mean nothing",
                self.model.display(),
                model.display()
            )),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Fields {
    id: Field,
    title: Field,
    text: Field,
    vector: Field,
    topic: Field,
    created_at: Field,
    run_id: Field,
}

impl Fields {
    fn schema() -> (Schema, Self) {
        let mut builder = Schema::builder();
        let analyzed = TextOptions::default()
            .set_indexing_options(
                TextFieldIndexing::default()
                    .set_tokenizer(TOKENIZER)
                    .set_index_option(IndexRecordOption::WithFreqsAndPositions),
            )
            .set_stored();
        let fields = Self {
            id: builder.add_text_field("id", STRING | STORED | FAST),
            title: builder.add_text_field("title", analyzed.clone()),
            text: builder.add_text_field("text", analyzed),
            vector: builder.add_bytes_field("vector", STORED),
            topic: builder.add_text_field("topic", STRING | STORED),
            created_at: builder.add_date_field("created_at", INDEXED | STORED | FAST),
            run_id: builder.add_text_field("run_id", STRING | STORED),
        };
        (builder.build(), fields)
    }

    fn of(schema: &Schema, dir: &Path) -> Result<Self, IndexError> {
        let get = |name: &str| {
            schema
                .get_field(name)
                .map_err(|_| IndexError::Incompatible {
                    dir: dir.to_path_buf(),
                    reason: format!("it has no `{name}` field; delete it to rebuild"),
                })
        };
        Ok(Self {
            id: get("id")?,
            title: get("title")?,
            text: get("text")?,
            vector: get("vector")?,
            topic: get("topic")?,
            created_at: get("created_at")?,
            run_id: get("run_id")?,
        })
    }
}

/// An opened index.
#[derive(Clone)]
pub struct TicketIndex {
    index: Index,
    fields: Fields,
    meta: IndexMeta,
    dir: PathBuf,
}

/// One search result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit {
    /// Ticket id.
    pub id: String,
    /// BM25 score, cosine, or fused reciprocal-rank score, by search mode.
    pub score: f32,
    /// Ticket title, if it has one.
    pub title: Option<String>,
    /// Ticket text.
    pub text: String,
    /// Topic, if known.
    pub topic: Option<String>,
    /// The run that indexed this version of the ticket.
    pub run_id: String,
}

impl TicketIndex {
    /// Opens the index in `dir`, creating it (and the folder) when there is none. An
    /// existing index must hold vectors of the same encoder (`dim` floats from the model
    /// whose fingerprint is `fingerprint`).
    pub fn open_or_create(
        dir: &Path,
        dim: usize,
        model: &Path,
        fingerprint: &str,
    ) -> Result<Self, IndexError> {
        let tantivy_err = |source| IndexError::Tantivy {
            dir: dir.to_path_buf(),
            source,
        };
        if dir.join(META_FILE).exists() {
            let mut index = Self::open(dir)?;
            if let Some(reason) = index.meta.mismatch(dim, model, fingerprint) {
                return Err(IndexError::Incompatible {
                    dir: dir.to_path_buf(),
                    reason: format!("{reason}; give the job another index path or delete this one"),
                });
            }
            if index.meta.encoder.is_none() {
                index.meta.encoder = Some(fingerprint.to_string());
                write_meta(dir, &index.meta).map_err(tantivy_err)?;
            }
            return Ok(index);
        }
        if dir.join("meta.json").exists() {
            return Err(IndexError::Incompatible {
                dir: dir.to_path_buf(),
                reason: format!("a tantivy index without {META_FILE}: not made by abridge"),
            });
        }
        std::fs::create_dir_all(dir).map_err(|e| tantivy_err(e.into()))?;
        let (schema, fields) = Fields::schema();
        let index = Index::create_in_dir(dir, schema).map_err(tantivy_err)?;
        register_tokenizer(&index);
        let meta = IndexMeta {
            format: FORMAT,
            dim,
            model: model.to_path_buf(),
            encoder: Some(fingerprint.to_string()),
        };
        write_meta(dir, &meta).map_err(tantivy_err)?;
        Ok(Self {
            index,
            fields,
            meta,
            dir: dir.to_path_buf(),
        })
    }

    /// Opens an existing index (for searching, or for writing through [`TicketIndex::writer`]).
    pub fn open(dir: &Path) -> Result<Self, IndexError> {
        let meta_path = dir.join(META_FILE);
        let text = match std::fs::read_to_string(&meta_path) {
            Ok(text) => text,
            Err(_) if !dir.join("meta.json").exists() => {
                return Err(IndexError::Missing {
                    dir: dir.to_path_buf(),
                });
            }
            Err(_) => {
                return Err(IndexError::Incompatible {
                    dir: dir.to_path_buf(),
                    reason: format!("a tantivy index without {META_FILE}: not made by abridge"),
                });
            }
        };
        let incompatible = |reason: String| IndexError::Incompatible {
            dir: dir.to_path_buf(),
            reason,
        };
        let meta: IndexMeta = serde_json::from_str(&text)
            .map_err(|e| incompatible(format!("{META_FILE} is unreadable: {e}")))?;
        if meta.format != FORMAT {
            return Err(incompatible(format!(
                "index format {} (this abridge reads format {FORMAT}); delete the folder \
                 and rerun the job to rebuild it",
                meta.format
            )));
        }
        let index = Index::open_in_dir(dir).map_err(|source| match source {
            TantivyError::IncompatibleIndex(inc) => incompatible(format!(
                "made by an incompatible tantivy ({inc:?}); delete the folder and rerun the job"
            )),
            source => IndexError::Tantivy {
                dir: dir.to_path_buf(),
                source,
            },
        })?;
        register_tokenizer(&index);
        let fields = Fields::of(&index.schema(), dir)?;
        Ok(Self {
            index,
            fields,
            meta,
            dir: dir.to_path_buf(),
        })
    }

    /// abridge's record of the index.
    pub fn meta(&self) -> &IndexMeta {
        &self.meta
    }

    /// Where the last commit left the index, if it has been committed.
    pub fn position(&self) -> Result<Option<IndexPosition>, IndexError> {
        let metas = self.index.load_metas().map_err(|e| self.err(e))?;
        Ok(metas.payload.as_deref().map(IndexPosition::parse))
    }

    /// Documents in the last commit.
    pub fn num_docs(&self) -> Result<u64, IndexError> {
        Ok(self.reader()?.searcher().num_docs())
    }

    /// The ids of every document in the last commit, sorted: what the fault tests compare
    /// with the table's tickets.
    pub fn ids(&self) -> Result<Vec<String>, IndexError> {
        let searcher = self.reader()?.searcher();
        let mut ids = Vec::new();
        for reader in searcher.segment_readers() {
            let store = reader
                .get_store_reader(64)
                .map_err(|e| self.err(e.into()))?;
            for doc in store.iter::<TantivyDocument>(reader.alive_bitset()) {
                let doc = doc.map_err(|e| self.err(e))?;
                if let Some(id) = doc.get_first(self.fields.id).and_then(|v| v.as_str()) {
                    ids.push(id.to_string());
                }
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Takes the index's writer lock. Documents go in through [`IndexCommitter::add_batch`]; they become
    /// visible with [`IndexCommitter::commit`].
    pub fn writer(&self) -> Result<IndexCommitter, IndexError> {
        let writer = self
            .index
            .writer_with_num_threads(1, WRITER_MEMORY)
            .map_err(|source| match source {
                TantivyError::LockFailure(..) => IndexError::Locked {
                    dir: self.dir.clone(),
                },
                source => self.err(source),
            })?;
        Ok(IndexCommitter {
            writer: Arc::new(Mutex::new(writer)),
            fields: self.fields,
            dir: self.dir.clone(),
        })
    }

    fn err(&self, source: TantivyError) -> IndexError {
        IndexError::Tantivy {
            dir: self.dir.clone(),
            source,
        }
    }

    fn reader(&self) -> Result<tantivy::IndexReader, IndexError> {
        self.index.reader().map_err(|e| self.err(e))
    }

    /// The `k` best BM25 matches of `query` over titles and texts. Every word (or CJK
    /// character) of the query is an optional term, so a query needs no syntax.
    pub fn search_bm25(&self, query: &str, k: usize) -> Result<Vec<Hit>, IndexError> {
        let mut analyzer = analyzer();
        let mut stream = analyzer.token_stream(query);
        let mut words = Vec::new();
        let mut seen = HashSet::new();
        while let Some(token) = stream.next() {
            if seen.insert(token.text.clone()) {
                words.push(token.text.clone());
            }
        }
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        for word in &words {
            let text = Term::from_field_text(self.fields.text, word);
            let title = Term::from_field_text(self.fields.title, word);
            clauses.push((
                Occur::Should,
                Box::new(TermQuery::new(text, IndexRecordOption::WithFreqs)),
            ));
            clauses.push((
                Occur::Should,
                Box::new(BoostQuery::new(
                    Box::new(TermQuery::new(title, IndexRecordOption::WithFreqs)),
                    TITLE_BOOST,
                )),
            ));
        }
        if clauses.is_empty() || k == 0 {
            return Ok(Vec::new());
        }
        let searcher = self.reader()?.searcher();
        let top = searcher
            .search(
                &BooleanQuery::new(clauses),
                &TopDocs::with_limit(k).order_by_score(),
            )
            .map_err(|e| self.err(e))?;
        top.into_iter()
            .map(|(score, address)| {
                let doc: TantivyDocument = searcher.doc(address).map_err(|e| self.err(e))?;
                Ok(self.hit(&doc, score))
            })
            .collect()
    }

    /// The `k` stored vectors nearest to `vector` by cosine (exact scan).
    pub fn search_vector(&self, vector: &[f32], k: usize) -> Result<Vec<Hit>, IndexError> {
        if vector.len() != self.meta.dim {
            return Err(IndexError::Incompatible {
                dir: self.dir.clone(),
                reason: format!(
                    "the query vector has {} dimensions, the index {}",
                    vector.len(),
                    self.meta.dim
                ),
            });
        }
        let searcher = self.reader()?.searcher();
        // A min-heap of the best k so far: (score, segment, doc order) with the document.
        let mut best: BinaryHeap<Reverse<(Score, usize, usize)>> = BinaryHeap::new();
        let mut docs: HashMap<(usize, usize), TantivyDocument> = HashMap::new();
        let mut stored = vec![0f32; vector.len()];
        for (segment, reader) in searcher.segment_readers().iter().enumerate() {
            let store = reader
                .get_store_reader(64)
                .map_err(|e| self.err(e.into()))?;
            for (position, doc) in store
                .iter::<TantivyDocument>(reader.alive_bitset())
                .enumerate()
            {
                let doc = doc.map_err(|e| self.err(e))?;
                let Some(bytes) = doc.get_first(self.fields.vector).and_then(|v| v.as_bytes())
                else {
                    continue;
                };
                if !read_vector(bytes, &mut stored) {
                    continue;
                }
                let score = Score(stored.iter().zip(vector).map(|(a, b)| a * b).sum());
                if best.len() < k {
                    best.push(Reverse((score, segment, position)));
                    docs.insert((segment, position), doc);
                } else if best.peek().is_some_and(|Reverse(worst)| score > worst.0) {
                    if let Some(Reverse((_, s, p))) = best.pop() {
                        docs.remove(&(s, p));
                    }
                    best.push(Reverse((score, segment, position)));
                    docs.insert((segment, position), doc);
                }
            }
        }
        let mut hits: Vec<(Score, (usize, usize))> = best
            .into_iter()
            .map(|Reverse((score, s, p))| (score, (s, p)))
            .collect();
        hits.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        Ok(hits
            .into_iter()
            .filter_map(|(score, key)| docs.get(&key).map(|doc| self.hit(doc, score.0)))
            .collect())
    }

    fn hit(&self, doc: &TantivyDocument, score: f32) -> Hit {
        let text = |field: Field| {
            doc.get_first(field)
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        Hit {
            id: text(self.fields.id).unwrap_or_default(),
            score,
            title: text(self.fields.title),
            text: text(self.fields.text).unwrap_or_default(),
            topic: text(self.fields.topic),
            run_id: text(self.fields.run_id).unwrap_or_default(),
        }
    }
}

/// Fuses ranked lists by reciprocal rank (score = Σ 1/(60 + rank)), the usual way to
/// combine BM25 and vector results whose scores are not comparable.
pub fn reciprocal_rank_fusion(lists: &[Vec<Hit>], k: usize) -> Vec<Hit> {
    const K: f32 = 60.0;
    let mut fused: Vec<Hit> = Vec::new();
    let mut position: HashMap<String, usize> = HashMap::new();
    for list in lists {
        for (rank, hit) in list.iter().enumerate() {
            let add = 1.0 / (K + rank as f32 + 1.0);
            match position.get(&hit.id) {
                Some(&i) => fused[i].score += add,
                None => {
                    position.insert(hit.id.clone(), fused.len());
                    fused.push(Hit {
                        score: add,
                        ..hit.clone()
                    });
                }
            }
        }
    }
    fused.sort_by(|a, b| b.score.total_cmp(&a.score));
    fused.truncate(k);
    fused
}

/// f32 ordered by `total_cmp`, for the heap.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Score(f32);
impl Eq for Score {}
impl PartialOrd for Score {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Score {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

fn read_vector(bytes: &[u8], out: &mut [f32]) -> bool {
    if bytes.len() != out.len() * 4 {
        return false;
    }
    for (value, chunk) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *value = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    true
}

/// The writer side of an index: documents in, then a commit (per published output file,
/// through [`RunIndexer`]).
#[derive(Clone)]
pub struct IndexCommitter {
    writer: Arc<Mutex<IndexWriter>>,
    fields: Fields,
    dir: PathBuf,
}

impl IndexCommitter {
    fn err(&self, source: TantivyError) -> IndexError {
        IndexError::Tantivy {
            dir: self.dir.clone(),
            source,
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, IndexWriter>, IndexError> {
        self.writer
            .lock()
            .map_err(|_| self.err(TantivyError::Poisoned))
    }

    /// Makes every document added since the last commit visible, recording `position`.
    pub fn commit(&self, position: &IndexPosition) -> Result<(), IndexError> {
        let mut writer = self.lock()?;
        let mut prepared = writer.prepare_commit().map_err(|e| self.err(e))?;
        prepared.set_payload(&position.to_string());
        prepared.commit().map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Removes every document (committed with the next [`IndexCommitter::commit`]), before
    /// a rebuild from the output table.
    pub fn clear(&self) -> Result<(), IndexError> {
        self.lock()?
            .delete_all_documents()
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Adds every row of `batch` that has a vector and no `error`, replacing documents
    /// with the same id. `run_id` is the batch's own `run_id` column when it has one.
    pub fn add_batch<'b>(
        &self,
        batch: &'b RecordBatch,
        run_id: &'b str,
    ) -> Result<usize, OperatorError> {
        let ids = string_column(batch, "id")
            .ok_or_else(|| OperatorError::StageSchema("the index needs an `id` column".into()))?;
        let texts = string_column(batch, "text");
        let titles = string_column(batch, "title");
        let topics = string_column(batch, TOPIC);
        let run_ids = string_column(batch, RUN_ID);
        let errors = batch.column_by_name(ERROR);
        let vectors = batch
            .column_by_name(EMBEDDING)
            .and_then(|c| c.as_any().downcast_ref::<FixedSizeListArray>());
        let created = match batch.column_by_name("created_at") {
            Some(c) => Some(cast(
                c,
                &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            )?),
            None => None,
        };
        let created = created
            .as_ref()
            .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>());
        let values = vectors.and_then(|v| v.values().as_any().downcast_ref::<Float32Array>());
        let (Some(vectors), Some(values)) = (vectors, values) else {
            return Err(OperatorError::StageSchema(format!(
                "the index needs an `{EMBEDDING}` column of f32 vectors"
            )));
        };
        let dim = vectors.value_length() as usize;
        let writer = self.lock().map_err(published_error)?;
        let mut added = 0;
        let mut bytes = Vec::with_capacity(dim * 4);
        for row in 0..batch.num_rows() {
            if ids.is_null(row) || vectors.is_null(row) || errors.is_some_and(|e| e.is_valid(row)) {
                continue;
            }
            let id = ids.value(row);
            let f = &self.fields;
            let mut doc = TantivyDocument::default();
            doc.add_text(f.id, id);
            let text_of = |column: Option<&'b StringArray>| -> Option<&'b str> {
                column.filter(|c| c.is_valid(row)).map(|c| c.value(row))
            };
            if let Some(title) = text_of(titles) {
                doc.add_text(f.title, title);
            }
            doc.add_text(f.text, text_of(texts).unwrap_or_default());
            bytes.clear();
            for value in &values.values()[row * dim..(row + 1) * dim] {
                bytes.extend_from_slice(&value.to_le_bytes());
            }
            doc.add_bytes(f.vector, &bytes);
            if let Some(topic) = text_of(topics) {
                doc.add_text(f.topic, topic);
            }
            if let Some(created) = created.filter(|c| c.is_valid(row)) {
                doc.add_date(
                    f.created_at,
                    DateTime::from_timestamp_micros(created.value(row)),
                );
            }
            doc.add_text(f.run_id, text_of(run_ids).unwrap_or(run_id));
            writer.delete_term(Term::from_field_text(f.id, id));
            writer
                .add_document(doc)
                .map_err(|e| published_error(self.err(e)))?;
            added += 1;
        }
        Ok(added)
    }
}

/// Where an index stands relative to its output table: the last run it holds and how
/// many of that run's files (tantivy's commit payload, `RUN#FILES`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexPosition {
    /// The run of the last commit.
    pub run_id: String,
    /// Files of that run in the index; `None` for indexes committed once per run (before
    /// runs could be resumed), which hold all of it.
    pub files: Option<usize>,
}

impl IndexPosition {
    fn parse(payload: &str) -> Self {
        match payload.rsplit_once('#') {
            Some((run_id, files)) if files.parse::<usize>().is_ok() => Self {
                run_id: run_id.to_string(),
                files: files.parse().ok(),
            },
            _ => Self {
                run_id: payload.to_string(),
                files: None,
            },
        }
    }
}

impl std::fmt::Display for IndexPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.files {
            Some(files) => write!(f, "{}#{files}", self.run_id),
            None => f.write_str(&self.run_id),
        }
    }
}

/// Keeps an index in step with one run's output files: the rows of a file are added as
/// the sink stages them (rows with an `error` or no vector are left out) and committed
/// once the file is published.
pub struct RunIndexer {
    /// The index's writer.
    pub committer: IndexCommitter,
    /// The run being written.
    pub run_id: String,
}

/// The index's failure as the sink reports it.
fn published_error(source: IndexError) -> OperatorError {
    OperatorError::Observer {
        observer: "index",
        source: Box::new(source),
    }
}

impl PublishObserver for RunIndexer {
    fn staged(&self, batch: &RecordBatch) -> Result<(), OperatorError> {
        self.committer.add_batch(batch, &self.run_id).map(drop)
    }

    fn published(&self, report: &SinkReport) -> Result<(), OperatorError> {
        // The fault tests crash the process here: the file is published, the index not.
        fail::fail_point!("index::before_commit", |_| std::process::abort());
        let position = IndexPosition {
            run_id: self.run_id.clone(),
            files: Some(report.files.len()),
        };
        self.committer.commit(&position).map_err(published_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::embedding_field;
    use arrow::datatypes::{Field as ArrowField, Schema as ArrowSchema};

    fn tokens(text: &str) -> Vec<String> {
        let mut analyzer = analyzer();
        let mut stream = analyzer.token_stream(text);
        let mut out = Vec::new();
        while let Some(t) = stream.next() {
            out.push(t.text.clone());
        }
        out
    }

    #[test]
    fn chinese_is_one_token_per_character_and_english_is_stemmed_words() {
        assert_eq!(
            tokens("打印机Printers offline!"),
            ["打", "印", "机", "printer", "offlin"]
        );
        assert_eq!(tokens("VPN连接 v2.0"), ["vpn", "连", "接", "v2", "0"]);
        assert!(tokens("  —— !").is_empty());
    }

    fn batch(ids: &[&str], texts: &[&str], vectors: &[[f32; 2]]) -> RecordBatch {
        let schema = Arc::new(ArrowSchema::new(vec![
            ArrowField::new("id", DataType::Utf8, false),
            ArrowField::new("text", DataType::Utf8, true),
            ArrowField::new(ERROR, DataType::Utf8, true),
            embedding_field(2),
        ]));
        let list = FixedSizeListArray::try_new(
            Arc::new(ArrowField::new("item", DataType::Float32, false)),
            2,
            Arc::new(Float32Array::from(
                vectors.iter().flatten().copied().collect::<Vec<_>>(),
            )),
            None,
        )
        .unwrap();
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(ids.to_vec())),
                Arc::new(StringArray::from(texts.to_vec())),
                Arc::new(StringArray::from(vec![None::<&str>; ids.len()])),
                Arc::new(list),
            ],
        )
        .unwrap()
    }

    #[test]
    fn reindexing_replaces_and_nothing_shows_before_commit()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let index = TicketIndex::open_or_create(dir.path(), 2, Path::new("/m"), "f")?;
        let writer = index.writer()?;
        writer.add_batch(
            &batch(
                &["a", "b"],
                &["打印机无法打印", "VPN keeps dropping"],
                &[[1.0, 0.0], [0.0, 1.0]],
            ),
            "r1",
        )?;
        assert_eq!(index.num_docs()?, 0, "uncommitted documents are invisible");
        let indexer = RunIndexer {
            committer: writer.clone(),
            run_id: "r1".into(),
        };
        indexer.published(&SinkReport {
            files: vec!["part-00000.parquet".into()],
            ..SinkReport::default()
        })?;
        let r1 = IndexPosition::parse("r1#1");
        assert_eq!(index.position()?.as_ref(), Some(&r1));
        assert_eq!(r1.to_string(), "r1#1");
        let old = IndexPosition::parse("20261126T212000.123Z-3f2a");
        assert_eq!((old.run_id.len(), old.files), (25, None));
        writer.add_batch(&batch(&["a"], &["printer jammed"], &[[0.6, 0.8]]), "r2")?;
        writer.commit(&IndexPosition::parse("r2#3"))?;
        assert_eq!(
            index.num_docs()?,
            2,
            "a re-indexed ticket replaces its old version"
        );

        let hits = index.search_bm25("printer", 5)?;
        assert_eq!(hits.len(), 1);
        assert_eq!((hits[0].id.as_str(), hits[0].run_id.as_str()), ("a", "r2"));
        assert!(index.search_bm25("打印", 5)?.is_empty(), "old text is gone");

        let near = index.search_vector(&[0.0, 1.0], 5)?;
        assert_eq!(near[0].id, "b");
        assert!((near[0].score - 1.0).abs() < 1e-6);
        assert_eq!(near[1].id, "a");

        assert!(
            matches!(index.writer(), Err(IndexError::Locked { .. })),
            "a second writer is refused while the first lives"
        );
        drop(writer);
        assert!(matches!(
            TicketIndex::open_or_create(dir.path(), 3, Path::new("/m"), "f"),
            Err(IndexError::Incompatible { .. })
        ));
        // Another model of the same dimension is refused by its fingerprint.
        let err = TicketIndex::open_or_create(dir.path(), 2, Path::new("/other"), "g")
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("another encoder") && e.contains("/other")),
            "{err:?}"
        );
        assert!(matches!(
            TicketIndex::open(&dir.path().join("nope")),
            Err(IndexError::Missing { .. })
        ));
        // An index written by a future layout is refused with what to do.
        let meta = dir.path().join(META_FILE);
        let text = std::fs::read_to_string(&meta)?.replace("\"format\": 1", "\"format\": 9");
        std::fs::write(&meta, text)?;
        let err = TicketIndex::open(dir.path()).err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("format 9") && e.contains("rebuild")),
            "{err:?}"
        );
        Ok(())
    }

    #[test]
    fn fusion_rewards_agreement() {
        let hit = |id: &str| Hit {
            id: id.into(),
            score: 0.0,
            title: None,
            text: String::new(),
            topic: None,
            run_id: String::new(),
        };
        let fused = reciprocal_rank_fusion(
            &[
                vec![hit("x"), hit("y"), hit("z")],
                vec![hit("y"), hit("w"), hit("x")],
            ],
            3,
        );
        let ids: Vec<&str> = fused.iter().map(|h| h.id.as_str()).collect();
        assert_eq!(ids, ["y", "x", "w"]);
    }
}
