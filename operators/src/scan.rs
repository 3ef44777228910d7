//! `scan`: reads the user's Parquet files through DataFusion, with the job's SQL `where`
//! pushed down into the Parquet reader (row groups and pages it rules out are never
//! decoded).
//!
//! Files are resolved and their footers checked before anything runs. Input files are
//! untrusted: a file that cannot be read (truncated, corrupt pages, a footer or embedded
//! schema the readers choke on, even by panicking) is recorded with its error in
//! [`OpenScan::failed`] and skipped, and the other files are still read. Only when no file
//! can be read at all does the scan fail.

use std::cell::Cell;
use std::fs::File;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Instant;

use arrow::datatypes::{Schema, SchemaRef};
use datafusion::dataframe::DataFrame;
use datafusion::datasource::file_format::options::ParquetReadOptions;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SessionContext;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::prelude::SessionConfig;
use futures::{FutureExt, StreamExt};
use parquet::errors::ParquetError;
use parquet::file::reader::{FileReader, SerializedFileReader};

use crate::normalize::Normalize;
use crate::{OperatorError, SendableRecordBatchStream, StageCounters, TransformStage};
use abridge_schemas::ColumnMapping;
use serde::{Deserialize, Serialize};

/// `[input]`: the Parquet tickets to read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// A Parquet file, a folder (every `*.parquet` below it) or a glob (`data/*.parquet`).
    pub path: String,
    /// Optional SQL condition over the input's own column names, pushed down into the
    /// Parquet reader, e.g. `status = 'open' AND language = 'zh'`.
    #[serde(default, rename = "where", skip_serializing_if = "Option::is_none")]
    pub where_clause: Option<String>,
    /// Which input column fills each ticket column (`id`, `text`, `title`, `created_at`,
    /// `reference`, `topic`). Unset ones default to the column of the same name.
    #[serde(default)]
    pub columns: ColumnMapping,
    /// Input columns not to carry into the output. Default: none (everything else is kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drop: Vec<String>,
}

impl InputConfig {
    /// Why this section cannot be used, naming the key.
    pub fn validate(&self) -> Result<(), OperatorError> {
        if self.path.trim().is_empty() {
            return Err(OperatorError::config("input.path", "must not be empty"));
        }
        Ok(())
    }

    /// The scan of this input: at most `limit` rows (after `where`), `batch_size` per batch.
    pub fn scan(&self, limit: Option<usize>, batch_size: usize) -> ParquetScan {
        ParquetScan {
            path: self.path.clone(),
            where_clause: self.where_clause.clone(),
            limit,
            batch_size,
        }
    }

    /// The `normalize` stage over the scan's `schema`: the column mapping applied.
    pub fn normalize(
        &self,
        schema: &SchemaRef,
        stage_columns: &[&str],
    ) -> Result<TransformStage<Normalize>, OperatorError> {
        Normalize::try_new(&self.columns, schema, &self.path, &self.drop, stage_columns)
    }
}

/// What to read.
#[derive(Debug, Clone)]
pub struct ParquetScan {
    /// A Parquet file, a folder (all `*.parquet` below it, in path order) or a glob.
    pub path: String,
    /// A SQL boolean expression over the input's own column names.
    pub where_clause: Option<String>,
    /// Stop after this many rows (after `where_clause`).
    pub limit: Option<usize>,
    /// Rows per batch handed downstream.
    pub batch_size: usize,
}

/// An input file that could not be read (or not to its end), and why.
#[derive(Debug, Clone, PartialEq)]
pub struct FileFailure {
    pub path: PathBuf,
    pub error: String,
}

/// The files a scan skipped, filled in as the scan goes (a file can fail part-way).
pub type FailedFiles = Arc<Mutex<Vec<FileFailure>>>;

/// A scan ready to be polled.
pub struct OpenScan {
    /// The files that will be read, in order (those whose footers could be read).
    pub files: Vec<PathBuf>,
    /// Files skipped: unreadable footers at once, failures while reading as they happen.
    /// Rows a file yielded before it failed are kept.
    pub failed: FailedFiles,
    /// Rows in those files before `where` and `limit`, from their footers.
    pub file_rows: u64,
    /// The merged schema of the files.
    pub schema: SchemaRef,
    /// The rows.
    pub stream: SendableRecordBatchStream,
}

impl ParquetScan {
    /// Resolves and checks the input files and plans the scan. Rows are only read once the
    /// returned stream is polled; `metrics` counts them as they come.
    pub async fn open(&self, metrics: StageCounters) -> Result<OpenScan, OperatorError> {
        // One partition keeps input order stable from run to run: "first occurrence" and
        // resumption depend on it, and the model stages downstream set the pace anyway.
        let mut config = SessionConfig::new()
            .with_batch_size(self.batch_size.max(1))
            .with_target_partitions(1);
        config.options_mut().execution.parquet.pushdown_filters = true;
        config.options_mut().execution.parquet.reorder_filters = true;
        let ctx = SessionContext::new_with_config(config);

        // Each file's footer, embedded schema and DataFusion's reading of its metadata,
        // one file at a time: a file that fails is skipped and recorded by name.
        let failed: FailedFiles = Arc::default();
        let mut files = Vec::new();
        let mut file_rows = 0u64;
        let mut first_error = None;
        for file in resolve_files(&self.path)? {
            let checked = match check_file(&file) {
                Ok(rows) => {
                    guarded(ctx.read_parquet(file.display().to_string(), read_options(None)))
                        .await
                        .map(|_| rows)
                        .map_err(|source| OperatorError::ReadFailed {
                            path: file.clone(),
                            source,
                        })
                }
                Err(e) => Err(e),
            };
            match checked {
                Ok(rows) => {
                    file_rows += rows;
                    files.push(file);
                }
                Err(e) => {
                    record(&failed, &file, &e);
                    first_error.get_or_insert(e);
                }
            }
        }
        if let (true, Some(e)) = (files.is_empty(), first_error) {
            return Err(e);
        }

        // The files' merged schema, and the `where` clause checked against it, before any
        // row is read: configuration errors surface here, not mid-run.
        let paths: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        let all = guarded(ctx.read_parquet(paths, read_options(None)))
            .await
            .map_err(|source| OperatorError::InputSchema {
                path: self.path.clone(),
                source,
            })?;
        let merged = Arc::clone(all.schema().inner());
        let where_clause = self.where_clause.clone().filter(|c| !c.trim().is_empty());
        if let Some(clause) = &where_clause {
            filtered(all, clause)?;
        }

        // Files are read one after the other, each its own DataFusion scan, so that a
        // failure names the file it happened in; a failed file ends there, recorded.
        let file_schema = Arc::clone(&merged);
        let failures = Arc::clone(&failed);
        let per_file = futures::stream::iter(files.clone())
            .then(move |file| {
                let ctx = ctx.clone();
                let schema = Arc::clone(&file_schema);
                let where_clause = where_clause.clone();
                let failures = Arc::clone(&failures);
                async move {
                    let open = async {
                        let path = file.display().to_string();
                        let mut df = ctx.read_parquet(path, read_options(Some(&schema))).await?;
                        if let Some(clause) = &where_clause {
                            df = filtered(df, clause).map_err(DataFusionError::from)?;
                        }
                        df.execute_stream().await
                    };
                    let batches = match guarded(open).await {
                        Ok(mut stream) => AssertUnwindSafe(futures::stream::poll_fn(move |cx| {
                            let _reading = Reading::start();
                            stream.poll_next_unpin(cx)
                        }))
                        .catch_unwind()
                        .map(|polled| polled.unwrap_or_else(|panic| Err(panicked(panic))))
                        .boxed(),
                        Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
                    };
                    batches
                        .scan(false, move |done, batch| {
                            let item = match batch {
                                _ if *done => None,
                                Ok(batch) => Some(Some(batch)),
                                Err(source) => {
                                    *done = true;
                                    let error = OperatorError::ReadFailed {
                                        path: file.clone(),
                                        source,
                                    };
                                    record(&failures, &file, &error);
                                    Some(None)
                                }
                            };
                            std::future::ready(item)
                        })
                        .filter_map(|batch| std::future::ready(batch.map(Ok)))
                }
            })
            .flatten();
        let limited = per_file.scan(self.limit.unwrap_or(usize::MAX), |remaining, batch| {
            let item = match batch {
                _ if *remaining == 0 => return std::future::ready(None),
                Ok(batch) => {
                    let take = batch.num_rows().min(*remaining);
                    *remaining -= take;
                    Ok(batch.slice(0, take))
                }
                Err(e) => Err(e),
            };
            std::future::ready(Some(item))
        });
        // Busy time is the time spent inside the scan's polls: decoding and filtering.
        let mut limited = Box::pin(limited);
        let counted = futures::stream::poll_fn(move |cx| {
            let started = Instant::now();
            let polled = limited.poll_next_unpin(cx);
            metrics.add_busy(started.elapsed());
            if let Poll::Ready(Some(Ok(batch))) = &polled {
                metrics.add_in(batch.num_rows());
                metrics.add_out(batch.num_rows());
            }
            polled
        });
        Ok(OpenScan {
            files,
            failed,
            file_rows,
            schema: Arc::clone(&merged),
            stream: Box::pin(RecordBatchStreamAdapter::new(merged, counted)),
        })
    }
}

fn read_options(schema: Option<&Schema>) -> ParquetReadOptions<'_> {
    ParquetReadOptions {
        // Files were chosen by `resolve_files`, whatever their extension.
        file_extension: "",
        schema,
        ..Default::default()
    }
}

fn filtered(df: DataFrame, clause: &str) -> Result<DataFrame, OperatorError> {
    let where_err = |source| OperatorError::Where {
        clause: clause.to_string(),
        source,
    };
    let predicate = df.parse_sql_expr(clause).map_err(where_err)?;
    df.filter(predicate).map_err(where_err)
}

/// A file, every `*.parquet` under a folder (sorted, hidden and `_`-prefixed entries
/// skipped, as Spark and Hive writers use them for temporary files), or a glob's matches.
pub fn resolve_files(path: &str) -> Result<Vec<PathBuf>, OperatorError> {
    let not_found = |reason: String| OperatorError::InputNotFound {
        path: path.to_string(),
        reason,
    };
    let files = if path.contains(['*', '?', '[']) {
        let matches = glob::glob(path).map_err(|e| not_found(format!("bad glob: {e}")))?;
        let mut files = Vec::new();
        for entry in matches {
            let file = entry.map_err(|e| not_found(e.to_string()))?;
            if file.is_file() {
                files.push(file);
            }
        }
        files.sort();
        files
    } else {
        let p = Path::new(path);
        match std::fs::metadata(p) {
            Err(e) => return Err(not_found(e.to_string())),
            Ok(meta) if meta.is_dir() => {
                let mut files = Vec::new();
                walk_parquet(p, &mut files).map_err(|e| not_found(e.to_string()))?;
                files.sort();
                files
            }
            Ok(_) => vec![p.to_path_buf()],
        }
    };
    if files.is_empty() {
        return Err(not_found("no Parquet files found".into()));
    }
    Ok(files)
}

fn walk_parquet(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name.starts_with('_') {
            continue;
        }
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            walk_parquet(&path, out)?;
        } else if name.ends_with(".parquet") {
            out.push(path);
        }
    }
    Ok(())
}

thread_local! {
    static READING: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is inside a guarded read of an input file, where a panic becomes
/// that file's error: the binary's panic hook keeps quiet about those.
pub fn inside_guarded_read() -> bool {
    READING.with(Cell::get)
}

/// Marks the current thread as inside a guarded read until dropped (also when a panic
/// unwinds through it).
struct Reading(bool);

impl Reading {
    fn start() -> Self {
        Self(READING.with(|r| r.replace(true)))
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        READING.with(|r| r.set(self.0));
    }
}

fn record(failed: &FailedFiles, path: &Path, error: &OperatorError) {
    if let Ok(mut failed) = failed.lock() {
        failed.push(FileFailure {
            path: path.to_path_buf(),
            error: error.to_string(),
        });
    }
}

/// Runs `future`, turning a panic inside it (Parquet and Arrow readers panic on some
/// corrupt inputs) into an error; see [`check_whole_file`] to name the file.
pub async fn guarded<T>(
    future: impl Future<Output = Result<T, DataFusionError>>,
) -> Result<T, DataFusionError> {
    let mut future = Box::pin(future);
    AssertUnwindSafe(futures::future::poll_fn(move |cx| {
        let _reading = Reading::start();
        future.poll_unpin(cx)
    }))
    .catch_unwind()
    .await
    .unwrap_or_else(|panic| Err(panicked(panic)))
}

fn panicked(panic: Box<dyn std::any::Any + Send>) -> DataFusionError {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    DataFusionError::Execution(format!("the Parquet reader failed on this file: {message}"))
}

/// The rows a file's footer announces, once the footer has been read without error (the
/// embedded Arrow schema is read next, by DataFusion under [`guarded`], file by file). A
/// panic of the reader on a corrupt footer is that file's error, naming it.
pub fn check_file(file: &Path) -> Result<u64, OperatorError> {
    let handle = File::open(file).map_err(|e| OperatorError::InputNotFound {
        path: file.display().to_string(),
        reason: e.to_string(),
    })?;
    let corrupt = |source| OperatorError::CorruptParquet {
        path: file.to_path_buf(),
        source,
    };
    let footer = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let _reading = Reading::start();
        let reader = SerializedFileReader::new(handle)?;
        let meta = reader.metadata().file_metadata();
        Ok(u64::try_from(meta.num_rows()).unwrap_or(0))
    }));
    match footer {
        Ok(rows) => rows.map_err(corrupt),
        Err(panic) => Err(corrupt(ParquetError::General(panicked(panic).to_string()))),
    }
}

/// Reads every page of `file`, as a query that needs all of it would: the rows, or the
/// file's error (a panic of the reader included), naming it. For telling which of a query's
/// files a reading failure came from.
pub fn check_whole_file(file: &Path) -> Result<u64, OperatorError> {
    check_file(file)?;
    let corrupt = |source| OperatorError::CorruptParquet {
        path: file.to_path_buf(),
        source,
    };
    let handle = File::open(file).map_err(|e| OperatorError::InputNotFound {
        path: file.display().to_string(),
        reason: e.to_string(),
    })?;
    let read = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let _reading = Reading::start();
        let reader =
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(handle)?
                .build()?;
        let mut rows = 0u64;
        for batch in reader {
            rows += batch
                .map_err(|e| ParquetError::External(Box::new(e)))?
                .num_rows() as u64;
        }
        Ok(rows)
    }));
    match read {
        Ok(rows) => rows.map_err(corrupt),
        Err(panic) => Err(corrupt(ParquetError::General(panicked(panic).to_string()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field};
    use arrow::record_batch::RecordBatch;
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;

    /// A small ticket file: several row groups and pages, text and numbers.
    fn tickets(rows: usize) -> Vec<u8> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("ticket_id", DataType::Utf8, false),
            Field::new("body", DataType::Utf8, true),
            Field::new("priority", DataType::Int64, true),
        ]));
        let ids: Vec<String> = (0..rows).map(|i| format!("T{i:05}")).collect();
        let bodies: Vec<Option<String>> = (0..rows)
            .map(|i| (i % 7 != 0).then(|| format!("printer {i} offline, 打印机离线 {}", i * 31)))
            .collect();
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(StringArray::from(ids)),
                Arc::new(StringArray::from(bodies)),
                Arc::new(Int64Array::from_iter((0..rows).map(|i| Some(i as i64 % 5)))),
            ],
        )
        .expect("batch");
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(rows / 3))
            .set_data_page_row_count_limit(rows / 10)
            .build();
        let mut out = Vec::new();
        let mut writer = ArrowWriter::try_new(&mut out, schema, Some(props)).expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
        out
    }

    /// Rows the scan yields and the files it reports as failed (panics would escape).
    async fn scan(dir: &Path) -> Result<(usize, Vec<FileFailure>), OperatorError> {
        let scan = ParquetScan {
            path: dir.display().to_string(),
            where_clause: None,
            limit: None,
            batch_size: 64,
        };
        let open = scan.open(StageCounters::default()).await?;
        let mut stream = open.stream;
        let mut rows = 0;
        while let Some(batch) = stream.next().await {
            rows += batch?.num_rows();
        }
        let failed = open.failed.lock().map(|f| f.clone()).unwrap_or_default();
        Ok((rows, failed))
    }

    #[tokio::test]
    async fn corrupt_files_are_skipped_by_name_and_never_panic() {
        let good = tickets(300);
        let bad = tickets(200);
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("a.parquet"), &good).expect("write");
        let bad_path = dir.path().join("b.parquet");
        // SplitMix64: seeded, so every run tries the same corruptions.
        let mut state = 7u64;
        let mut next = move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let mut corruptions: Vec<Vec<u8>> = (1..64)
            .map(|i| bad[..bad.len() * i / 64].to_vec())
            .collect();
        for _ in 0..abridge_models::fuzz_cases(1500) {
            let mut flipped = bad.clone();
            for _ in 0..=next() % 8 {
                let at = (next() % flipped.len() as u64) as usize;
                flipped[at] = next() as u8;
            }
            corruptions.push(flipped);
        }
        let (mut skipped, mut crashed) = (0, 0);
        for bytes in corruptions {
            std::fs::write(&bad_path, &bytes).expect("write");
            let (rows, failed) = scan(dir.path()).await.expect("the good file is still read");
            // Every row of the good file, and the bad one's up to where it broke (or all
            // of it, when a flip hit bytes nothing reads).
            assert!((300..=500).contains(&rows), "{rows} rows");
            for failure in &failed {
                assert_eq!(failure.path, bad_path);
                assert!(failure.error.contains("b.parquet"), "{}", failure.error);
            }
            skipped += usize::from(!failed.is_empty());
            crashed += failed
                .iter()
                .filter(|f| f.error.contains("reader failed"))
                .count();
        }
        assert!(skipped > 500, "only {skipped} corruptions were noticed");
        eprintln!("{skipped} corrupt files skipped, {crashed} of them after a reader panic");

        // With nothing readable, the scan fails with the file's error.
        std::fs::remove_file(dir.path().join("a.parquet")).expect("rm");
        std::fs::write(&bad_path, &bad[..bad.len() / 2]).expect("write");
        let err = scan(dir.path())
            .await
            .expect_err("no readable file")
            .to_string();
        assert!(
            err.contains("b.parquet") && err.contains("not a readable Parquet file"),
            "{err}"
        );
    }
}
