//! `sink`: writes a run's rows as Parquet files in the run's folder.
//!
//! Each file is written under a hidden temporary name, flushed to disk and only then
//! renamed to `part-NNNNN.parquet`; a reader listing the folder sees whole files or none,
//! and a failure part-way leaves every finished file intact. Published files are a run's
//! checkpoints: a resumed run's sink continues after them ([`published_files`]), and a
//! [`PublishObserver`] (the search index) commits right after each one. A file is
//! published once it holds `commit_every_rows` rows or its first row is `commit_every`
//! old, whichever comes first, so a kill loses at most one such interval of work.
//! Encoding and compression are CPU work, so they run on a blocking thread fed by a
//! bounded channel; that thread is always joined before [`ParquetSink::write`] returns,
//! also when the run is stopped ([`StopSignal`]), so nothing is published after it.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use abridge_schemas::output::{self, SCHEMA_VERSION, SCHEMA_VERSION_KEY};
use arrow::array::{Array, ArrayRef, BooleanArray, StringArray};
use arrow::datatypes::{Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use futures::StreamExt;
use parquet::arrow::ArrowWriter;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use tokio::sync::mpsc;

use crate::compaction;
use crate::dedup::{row_key, value};
use crate::filter::{KEPT, MATCHED_QUERY};
use crate::stop::{StopLevel, StopSignal};
use crate::{OperatorError, SendableRecordBatchStream, StageCounters};

/// Where and how to write one run's rows.
#[derive(Clone)]
pub struct ParquetSink {
    /// The run's folder (created if missing).
    pub dir: PathBuf,
    /// Written into every row's `run_id` column.
    pub run_id: String,
    /// Publish the file being written once it holds this many rows.
    pub commit_every_rows: usize,
    /// ... or once its first row was written this long ago.
    pub commit_every: Duration,
    /// Rows per Parquet row group; bounds the writer's memory.
    pub row_group_rows: usize,
    /// What earlier attempts of this run published ([`published_files`]): kept, and the
    /// numbering of new files continues after them.
    pub previous: SinkReport,
    /// Told of every batch staged and every file published, in this order, so that other
    /// stores (the search index, the run's manifest) keep in step with the table.
    pub observers: Vec<Arc<dyn PublishObserver>>,
    /// At [`StopLevel::Abort`] the file being written is abandoned (its rows were never
    /// published) and [`ParquetSink::write`] returns [`OperatorError::Stopped`].
    pub stop: StopSignal,
}

/// A store kept in step with the files of a run.
pub trait PublishObserver: Send + Sync {
    /// `batch` (output schema, `run_id` first) goes into the file being written; it must
    /// not become visible before [`PublishObserver::published`].
    fn staged(&self, batch: &RecordBatch) -> Result<(), OperatorError>;
    /// A file was published; `report` covers what the run published so far (earlier
    /// attempts included). Called after the rename, so a crash in between leaves the
    /// store one file behind the table, never ahead of it.
    fn published(&self, report: &SinkReport) -> Result<(), OperatorError>;
}

/// What a sink wrote.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SinkReport {
    /// The finished files, in order.
    pub files: Vec<PathBuf>,
    /// Rows in them.
    pub rows: u64,
    /// Of which rows with an `error`.
    pub rows_failed: u64,
    /// Of which rows without an error that the filter did not keep (`kept = false`).
    pub rows_filtered: u64,
    /// Kept rows by the similarity query they matched (`matched_query`).
    pub kept_by_query: BTreeMap<String, u64>,
}

impl SinkReport {
    fn count(&mut self, batch: &RecordBatch) {
        let errors = batch.column_by_name(output::ERROR);
        let kept = batch
            .column_by_name(KEPT)
            .and_then(|c| c.as_any().downcast_ref::<BooleanArray>());
        let matched = batch
            .column_by_name(MATCHED_QUERY)
            .and_then(|c| c.as_any().downcast_ref::<StringArray>());
        for row in 0..batch.num_rows() {
            if errors.is_some_and(|e| e.is_valid(row)) {
                self.rows_failed += 1;
            } else if kept.is_some_and(|k| k.is_valid(row) && !k.value(row)) {
                self.rows_filtered += 1;
            } else if let Some(query) = matched.and_then(|m| value(m, row)) {
                *self.kept_by_query.entry(query.to_string()).or_default() += 1;
            }
        }
        self.rows += batch.num_rows() as u64;
    }
}

const ID: &str = "id";
/// Tries at publishing a finished file before the run fails.
const PUBLISH_ATTEMPTS: u32 = 3;
/// Wait before the second try; each later one waits 4 times longer.
const PUBLISH_BACKOFF: Duration = Duration::from_millis(100);

/// The files that earlier attempts of a run published in `dir`, with their rows counted
/// and the keys of those rows ([`row_key`]: the id, or the content hash of a row without
/// one); unpublished temporaries left by a crash are removed. The caller holds the run's
/// lock, and no writer of this process is running (the sink joins its writer).
pub fn published_files(dir: &Path) -> Result<(SinkReport, Vec<u128>), OperatorError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| OperatorError::Io { path, source }
    };
    let mut report = SinkReport::default();
    let mut keys = Vec::new();
    compaction::recover(dir)?;
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((report, keys)),
        Err(e) => return Err(io(dir)(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let path = entry.map_err(io(dir))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with(".part-") && name.ends_with(".inprogress") {
            std::fs::remove_file(&path).map_err(io(&path))?;
        } else if name.starts_with("part-") && name.ends_with(".parquet") {
            names.push(path);
        }
    }
    names.sort();
    for path in names {
        let columns = [ID, output::CONTENT_HASH, output::ERROR, KEPT, MATCHED_QUERY];
        for batch in read_columns(&path, &columns)? {
            report.count(&batch);
            let strings = |name| {
                batch
                    .column_by_name(name)
                    .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            };
            let (ids, hashes) = (strings(ID), strings(output::CONTENT_HASH));
            keys.extend((0..batch.num_rows()).map(|row| {
                let id = ids.and_then(|c| value(c, row));
                row_key(id, hashes.and_then(|c| value(c, row)))
            }));
        }
        report.files.push(path);
    }
    Ok((report, keys))
}

/// The number in a data file's name (`part-00042.parquet` → 42).
fn file_number(path: &Path) -> Option<usize> {
    path.file_name()?
        .to_str()?
        .strip_prefix("part-")?
        .strip_suffix(".parquet")?
        .parse()
        .ok()
}

/// The columns `names` (those the file has) of an output file, in batches.
pub fn read_columns(path: &Path, names: &[&str]) -> Result<Vec<RecordBatch>, OperatorError> {
    let unreadable = |source| OperatorError::CorruptParquet {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(|source| OperatorError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(unreadable)?;
    let schema = builder.parquet_schema();
    let wanted =
        (0..schema.num_columns()).filter(|&i| names.contains(&schema.get_column_root(i).name()));
    let mask = ProjectionMask::leaves(schema, wanted);
    let reader = builder.with_projection(mask).build().map_err(unreadable)?;
    reader
        .map(|batch| batch.map_err(|e| unreadable(e.into())))
        .collect()
}

impl ParquetSink {
    /// The schema of the written files: `run_id`, then the input's columns.
    pub fn output_schema(input: &Schema) -> SchemaRef {
        let mut fields = vec![Arc::new(output::run_id_field())];
        fields.extend(input.fields().iter().cloned());
        let metadata =
            HashMap::from([(SCHEMA_VERSION_KEY.to_string(), SCHEMA_VERSION.to_string())]);
        Arc::new(Schema::new_with_metadata(fields, metadata))
    }

    /// Writes every batch of `input`; returns once all files are closed and renamed, and
    /// the writer thread has ended. The report covers earlier attempts' files too.
    pub async fn write(
        self,
        mut input: SendableRecordBatchStream,
        metrics: StageCounters,
    ) -> Result<SinkReport, OperatorError> {
        let schema = Self::output_schema(&input.schema());
        let (tx, mut rx) = mpsc::channel::<ToWriter>(2);
        let abandon = Arc::new(AtomicBool::new(false));
        let stop = self.stop.clone();
        // The writer looks at the clock when told to; how often bounds how late a
        // time-based commit can be.
        let mut tick = tokio::time::interval(self.commit_every.min(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let writer = {
            let (abandon, metrics) = (Arc::clone(&abandon), metrics.clone());
            tokio::task::spawn_blocking(move || {
                let mut files = RunFiles::new(self, schema)?;
                while let Some(message) = rx.blocking_recv() {
                    if abandon.load(Ordering::Acquire) {
                        break;
                    }
                    match message {
                        ToWriter::Rows(batch) => {
                            let started = Instant::now();
                            files.write(&batch)?;
                            metrics.add_busy(started.elapsed());
                            metrics.add_out(batch.num_rows());
                        }
                        ToWriter::Tick => files.commit_if_due()?,
                    }
                }
                match abandon.load(Ordering::Acquire) {
                    // The open file is removed when `files` drops.
                    true => Err(OperatorError::Stopped),
                    false => files.finish(),
                }
            })
        };

        let aborted = stop.reached(StopLevel::Abort);
        tokio::pin!(aborted);
        let mut upstream_error = None;
        loop {
            let message = tokio::select! {
                biased;
                () = &mut aborted => {
                    abandon.store(true, Ordering::Release);
                    break;
                }
                batch = input.next() => match batch {
                    None => break,
                    Some(Ok(batch)) => {
                        metrics.add_in(batch.num_rows());
                        ToWriter::Rows(batch)
                    }
                    Some(Err(err)) => {
                        upstream_error = Some(err);
                        break;
                    }
                },
                _ = tick.tick() => ToWriter::Tick,
            };
            if tx.send(message).await.is_err() {
                break; // the writer failed; its error is reported below
            }
        }
        drop(tx);
        let written = writer
            .await
            .map_err(|_| OperatorError::WorkerGone("sink"))?;
        match upstream_error {
            // Finished files stay; the run's manifest says the run did not complete.
            Some(err) => Err(err.into()),
            None => written,
        }
    }
}

/// What the sink's task tells its writer thread.
enum ToWriter {
    Rows(RecordBatch),
    /// Publish the open file if its time is up.
    Tick,
}

/// The files of one run being written, one open at a time.
struct RunFiles {
    sink: ParquetSink,
    schema: SchemaRef,
    properties: WriterProperties,
    current: Option<OpenFile>,
    report: SinkReport,
    /// The number of the next file: after every file earlier attempts left, which
    /// compaction may have spaced out.
    next_number: usize,
}

struct OpenFile {
    writer: ArrowWriter<File>,
    temp: PathBuf,
    path: PathBuf,
    rows: usize,
    counts: SinkReport,
    /// When its first row was written.
    opened: Instant,
}

impl RunFiles {
    fn new(sink: ParquetSink, schema: SchemaRef) -> Result<Self, OperatorError> {
        std::fs::create_dir_all(&sink.dir).map_err(|source| OperatorError::Io {
            path: sink.dir.clone(),
            source,
        })?;
        let properties = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(1)?))
            .set_max_row_group_row_count(Some(sink.row_group_rows.max(1)))
            .set_created_by(format!("abridge {}", env!("CARGO_PKG_VERSION")))
            .build();
        let report = sink.previous.clone();
        let next_number = report
            .files
            .iter()
            .filter_map(|f| file_number(f))
            .max()
            .map_or(report.files.len(), |n| n + 1);
        Ok(Self {
            sink,
            schema,
            properties,
            current: None,
            report,
            next_number,
        })
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<(), OperatorError> {
        // The fault tests' kill -9 at an exact row count.
        fail::fail_point!("sink::write", |_| std::process::abort());
        let mut offset = 0;
        while offset < batch.num_rows() {
            if self.current.is_none() {
                self.current = Some(self.open()?);
            }
            let Some(file) = self.current.as_mut() else {
                continue;
            };
            let room = self.sink.commit_every_rows.max(1) - file.rows;
            let take = room.min(batch.num_rows() - offset);
            let slice = batch.slice(offset, take);
            let run_id: ArrayRef =
                Arc::new(StringArray::from(vec![self.sink.run_id.as_str(); take]));
            let mut columns = vec![run_id];
            columns.extend(slice.columns().iter().cloned());
            let rows = RecordBatch::try_new(Arc::clone(&self.schema), columns)?;
            for observer in &self.sink.observers {
                observer.staged(&rows)?;
            }
            file.writer
                .write(&rows)
                .map_err(|source| OperatorError::WriteFailed {
                    path: file.temp.clone(),
                    source,
                })?;
            file.counts.count(&rows);
            file.rows += take;
            offset += take;
            if file.rows >= self.sink.commit_every_rows {
                self.close()?;
            }
        }
        // A file that fills slowly is published by time: the writer is told to check
        // between batches, and checks after each batch too.
        self.commit_if_due()
    }

    fn commit_if_due(&mut self) -> Result<(), OperatorError> {
        match &self.current {
            Some(file) if file.rows > 0 && file.opened.elapsed() >= self.sink.commit_every => {
                self.close()
            }
            _ => Ok(()),
        }
    }

    fn open(&mut self) -> Result<OpenFile, OperatorError> {
        let index = self.next_number;
        self.next_number += 1;
        let path = self.sink.dir.join(format!("part-{index:05}.parquet"));
        let temp = self
            .sink
            .dir
            .join(format!(".part-{index:05}.parquet.inprogress"));
        let handle = File::create(&temp).map_err(|source| OperatorError::Io {
            path: temp.clone(),
            source,
        })?;
        let writer = ArrowWriter::try_new(
            handle,
            Arc::clone(&self.schema),
            Some(self.properties.clone()),
        )?;
        Ok(OpenFile {
            writer,
            temp,
            path,
            rows: 0,
            counts: SinkReport::default(),
            opened: Instant::now(),
        })
    }

    fn close(&mut self) -> Result<(), OperatorError> {
        let Some(file) = self.current.take() else {
            return Ok(());
        };
        // An unpublished file's bytes are removed on failure: on a full disk they are
        // what a resume needs back.
        let abandon = |err: OperatorError| {
            let _ = std::fs::remove_file(&file.temp);
            err
        };
        let handle = file.writer.into_inner().map_err(|source| {
            abandon(OperatorError::WriteFailed {
                path: file.temp.clone(),
                source,
            })
        })?;
        // A failed fsync fails the file, never retried: on Linux the kernel may have
        // dropped the dirty pages it could not write, so a later fsync that succeeds
        // proves nothing about these bytes.
        let synced = (|| -> std::io::Result<()> {
            fail::fail_point!("sink::sync", |_| Err(std::io::Error::other(
                "injected I/O error (failpoint sink::sync)"
            )));
            handle.sync_all()
        })();
        if let Err(source) = synced {
            return Err(abandon(OperatorError::Io {
                path: file.temp.clone(),
                source: std::io::Error::new(
                    source.kind(),
                    format!("cannot make the file durable (fsync): {source}"),
                ),
            }));
        }
        // The rename is retried: on network filesystems it can fail once and then
        // succeed, and it is idempotent.
        let publish = || -> std::io::Result<()> {
            fail::fail_point!("sink::publish", |_| Err(std::io::Error::other(
                "injected I/O error (failpoint sink::publish)"
            )));
            if file.temp.exists() {
                std::fs::rename(&file.temp, &file.path)?;
            }
            Ok(())
        };
        let mut attempt = 1;
        while let Err(source) = publish() {
            if attempt == PUBLISH_ATTEMPTS {
                return Err(abandon(OperatorError::Io {
                    path: file.path.clone(),
                    source: std::io::Error::new(
                        source.kind(),
                        format!("cannot publish after {attempt} attempts: {source}"),
                    ),
                }));
            }
            std::thread::sleep(PUBLISH_BACKOFF * 4u32.pow(attempt - 1));
            attempt += 1;
        }
        // The folder's entry, synced once: its failure fails the commit.
        File::open(&self.sink.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| OperatorError::Io {
                path: self.sink.dir.clone(),
                source: std::io::Error::new(
                    source.kind(),
                    format!("cannot make the folder's new entry durable (fsync): {source}"),
                ),
            })?;
        drop(handle);
        self.report.rows += file.counts.rows;
        self.report.rows_failed += file.counts.rows_failed;
        self.report.rows_filtered += file.counts.rows_filtered;
        for (query, kept) in file.counts.kept_by_query {
            *self.report.kept_by_query.entry(query).or_default() += kept;
        }
        self.report.files.push(file.path);
        for observer in &self.sink.observers {
            observer.published(&self.report)?;
        }
        Ok(())
    }

    /// Closes the last file and, unless the run is being stopped, merges its small files
    /// ([`compaction`]). A run
    /// without rows still gets one (empty) file, so that its partition has a schema that
    /// SQL can query.
    fn finish(mut self) -> Result<SinkReport, OperatorError> {
        if self.current.is_none() && self.report.files.is_empty() {
            self.current = Some(self.open()?);
        }
        self.close()?;
        // A stopped run is not finished: its next attempt merges, without the clock of a
        // grace period running.
        if self.sink.stop.level() != StopLevel::Running {
            return Ok(std::mem::take(&mut self.report));
        }
        let files = compaction::compact(
            &self.sink.dir,
            &self.report.files,
            self.sink.commit_every_rows,
            &self.schema,
            &self.properties,
        )?;
        if files != self.report.files {
            self.report.files = files;
            // The index records the run's file count: the same rows, fewer files.
            for observer in &self.sink.observers {
                observer.published(&self.report)?;
            }
        }
        Ok(std::mem::take(&mut self.report))
    }
}

impl Drop for RunFiles {
    fn drop(&mut self) {
        // A file still open here was abandoned by an error: remove its partial bytes.
        if let Some(file) = self.current.take() {
            let _ = std::fs::remove_file(&file.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{DataType, Field};
    use datafusion::physical_plan::stream::RecordBatchStreamAdapter;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new(ID, DataType::Utf8, true),
            Field::new(output::CONTENT_HASH, DataType::Utf8, true),
        ]))
    }

    fn rows(from: usize, count: usize) -> RecordBatch {
        let ids: Vec<String> = (from..from + count).map(|i| format!("t{i}")).collect();
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(StringArray::from(ids.clone())),
                Arc::new(StringArray::from(ids)),
            ],
        )
        .expect("a batch")
    }

    fn sink(dir: &Path, every_rows: usize, every: Duration, stop: &StopSignal) -> ParquetSink {
        ParquetSink {
            dir: dir.to_path_buf(),
            run_id: "r".into(),
            commit_every_rows: every_rows,
            commit_every: every,
            row_group_rows: 1024,
            previous: SinkReport::default(),
            observers: Vec::new(),
            stop: stop.clone(),
        }
    }

    /// Batches of 10 rows, `pause` apart, then (with `hang`) a stream that never ends.
    fn slow_input(batches: usize, pause: Duration, hang: bool) -> SendableRecordBatchStream {
        let stream = futures::stream::iter(0..batches)
            .then(move |i| async move {
                if i > 0 {
                    tokio::time::sleep(pause).await;
                }
                Ok(rows(i * 10, 10))
            })
            .chain(futures::stream::iter(hang.then_some(())).then(|()| async {
                std::future::pending::<()>().await;
                Ok(rows(0, 0))
            }));
        Box::pin(RecordBatchStreamAdapter::new(schema(), stream))
    }

    fn data_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("the run folder")
            .map(|e| {
                e.expect("an entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn files_are_published_by_rows_and_by_time() -> Result<(), OperatorError> {
        let dir = tempfile::tempdir().map_err(|source| OperatorError::Io {
            path: "tempdir".into(),
            source,
        })?;
        let stop = StopSignal::default();
        // By rows: 50 rows in files of at most 20.
        let by_rows = dir.path().join("rows");
        let report = sink(&by_rows, 20, Duration::from_secs(3600), &stop)
            .write(
                slow_input(5, Duration::ZERO, false),
                StageCounters::default(),
            )
            .await?;
        assert_eq!(report.rows, 50);
        assert_eq!(data_files(&by_rows).len(), 3, "{:?}", data_files(&by_rows));

        // By time: batches 300 ms apart and files due after 100 ms, so each batch is
        // published on its own although no file reaches its row count; at the end the
        // three small files are merged into one.
        let by_time = dir.path().join("time");
        let published = Arc::new(Counts::default());
        let mut by_time_sink = sink(&by_time, 1000, Duration::from_millis(100), &stop);
        by_time_sink.observers = vec![Arc::clone(&published) as Arc<dyn PublishObserver>];
        let report = by_time_sink
            .write(
                slow_input(3, Duration::from_millis(300), false),
                StageCounters::default(),
            )
            .await?;
        assert_eq!(
            published.files(),
            [1, 2, 3, 1],
            "three commits, then the merge"
        );
        assert_eq!(report.rows, 30);
        assert_eq!(data_files(&by_time), ["part-00000.parquet"]);
        let (published, keys) = published_files(&by_time)?;
        assert_eq!(
            (published.rows, published.files.len(), keys.len()),
            (30, 1, 30)
        );
        Ok(())
    }

    /// Records the file count of every publication.
    #[derive(Default)]
    struct Counts(std::sync::Mutex<Vec<usize>>);

    impl Counts {
        fn files(&self) -> Vec<usize> {
            self.0.lock().map(|c| c.clone()).unwrap_or_default()
        }
    }

    impl PublishObserver for Counts {
        fn staged(&self, _: &RecordBatch) -> Result<(), OperatorError> {
            Ok(())
        }

        fn published(&self, report: &SinkReport) -> Result<(), OperatorError> {
            if let Ok(mut counts) = self.0.lock() {
                counts.push(report.files.len());
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn an_abort_joins_the_writer_and_keeps_only_published_files() -> Result<(), OperatorError>
    {
        let dir = tempfile::tempdir().map_err(|source| OperatorError::Io {
            path: "tempdir".into(),
            source,
        })?;
        let stop = StopSignal::default();
        // 30 rows arrive, a file of 20 is published, 10 wait in the open file; the input
        // then hangs until the abort.
        let write = tokio::spawn(
            sink(dir.path(), 20, Duration::from_secs(3600), &stop).write(
                slow_input(3, Duration::ZERO, true),
                StageCounters::default(),
            ),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while data_files(dir.path()) != [".part-00001.parquet.inprogress", "part-00000.parquet"] {
            assert!(Instant::now() < deadline, "{:?}", data_files(dir.path()));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.request(None);
        stop.request(None);
        let result = write.await.map_err(|_| OperatorError::WorkerGone("test"))?;
        assert!(matches!(result, Err(OperatorError::Stopped)), "{result:?}");
        // When `write` returns, the writer has ended: the open file is gone, and nothing
        // is published later.
        assert_eq!(data_files(dir.path()), ["part-00000.parquet"]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(data_files(dir.path()), ["part-00000.parquet"]);
        assert_eq!(published_files(dir.path())?.0.rows, 20);
        Ok(())
    }
}
