//! `sink`: writes a run's rows as Parquet files in the run's folder.
//!
//! Each file is written under a hidden temporary name, flushed to disk and only then
//! renamed to `part-NNNNN.parquet`; a reader listing the folder sees whole files or none,
//! and a failure part-way leaves every finished file intact. Published files are a run's
//! checkpoints: a resumed run's sink continues after them ([`published_files`]), and a
//! [`PublishObserver`] (the search index) commits right after each one. Encoding and
//! compression are CPU work, so they run on a blocking thread fed by a bounded channel.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

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

use crate::filter::KEPT;
use crate::{OperatorError, OperatorMetrics, SendableRecordBatchStream};

/// Where and how to write one run's rows.
#[derive(Clone)]
pub struct ParquetSink {
    /// The run's folder (created if missing).
    pub dir: PathBuf,
    /// Written into every row's `run_id` column.
    pub run_id: String,
    /// Start a new file after this many rows.
    pub rows_per_file: usize,
    /// Rows per Parquet row group; bounds the writer's memory.
    pub row_group_rows: usize,
    /// What earlier attempts of this run published ([`published_files`]): kept, and the
    /// numbering of new files continues after them.
    pub previous: SinkReport,
    /// Told of every batch staged and every file published, so that a second store (the
    /// search index) commits in step with the table.
    pub observer: Option<Arc<dyn PublishObserver>>,
}

/// A store kept in step with the files of a run.
pub trait PublishObserver: Send + Sync {
    /// `batch` (output schema, `run_id` first) goes into the file being written; it must
    /// not become visible before [`PublishObserver::published`].
    fn staged(&self, batch: &RecordBatch) -> Result<(), OperatorError>;
    /// A file was published; `files` have been published by the run so far (earlier
    /// attempts included). Called after the rename, so a crash in between leaves the
    /// store one file behind the table, never ahead of it.
    fn published(&self, files: usize) -> Result<(), OperatorError>;
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
}

impl SinkReport {
    fn count(&mut self, batch: &RecordBatch) {
        let errors = batch.column_by_name(output::ERROR);
        let kept = batch
            .column_by_name(KEPT)
            .and_then(|c| c.as_any().downcast_ref::<BooleanArray>());
        for row in 0..batch.num_rows() {
            if errors.is_some_and(|e| e.is_valid(row)) {
                self.rows_failed += 1;
            } else if kept.is_some_and(|k| k.is_valid(row) && !k.value(row)) {
                self.rows_filtered += 1;
            }
        }
        self.rows += batch.num_rows() as u64;
    }
}

const ID: &str = "id";
/// Tries at publishing a finished file before the run fails.
const PUBLISH_ATTEMPTS: u32 = 3;
/// Wait before the second try; each later one waits 4 times longer.
const PUBLISH_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// The files that earlier attempts of a run published in `dir`, with their rows counted
/// and the ids they hold; unpublished temporaries left by a crash are removed (the caller
/// holds the output's lock, so no live writer owns them).
pub fn published_files(dir: &Path) -> Result<(SinkReport, Vec<String>), OperatorError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| OperatorError::Io { path, source }
    };
    let mut report = SinkReport::default();
    let mut ids = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((report, ids)),
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
        for batch in read_columns(&path, &[ID, output::ERROR, KEPT])? {
            report.count(&batch);
            if let Some(column) = batch
                .column_by_name(ID)
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            {
                ids.extend(column.iter().flatten().map(str::to_string));
            }
        }
        report.files.push(path);
    }
    Ok((report, ids))
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

    /// Writes every batch of `input`; returns once all files are closed and renamed. The
    /// report covers earlier attempts' files too.
    pub async fn write(
        self,
        mut input: SendableRecordBatchStream,
        metrics: OperatorMetrics,
    ) -> Result<SinkReport, OperatorError> {
        let schema = Self::output_schema(&input.schema());
        let (tx, mut rx) = mpsc::channel::<RecordBatch>(2);
        let writer_metrics = metrics.clone();
        let writer = tokio::task::spawn_blocking(move || {
            let mut files = RunFiles::new(self, schema)?;
            while let Some(batch) = rx.blocking_recv() {
                let started = Instant::now();
                files.write(&batch)?;
                writer_metrics.add_busy(started.elapsed());
                writer_metrics.add_out(batch.num_rows());
            }
            files.finish()
        });

        let mut upstream_error = None;
        while let Some(batch) = input.next().await {
            match batch {
                Ok(batch) => {
                    metrics.add_in(batch.num_rows());
                    if tx.send(batch).await.is_err() {
                        break; // the writer failed; its error is reported below
                    }
                }
                Err(err) => {
                    upstream_error = Some(err);
                    break;
                }
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

/// The files of one run being written, one open at a time.
struct RunFiles {
    sink: ParquetSink,
    schema: SchemaRef,
    properties: WriterProperties,
    current: Option<OpenFile>,
    report: SinkReport,
}

struct OpenFile {
    writer: ArrowWriter<File>,
    temp: PathBuf,
    path: PathBuf,
    rows: usize,
    counts: SinkReport,
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
        Ok(Self {
            sink,
            schema,
            properties,
            current: None,
            report,
        })
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<(), OperatorError> {
        let mut offset = 0;
        while offset < batch.num_rows() {
            let file = match self.current.as_mut() {
                Some(file) => file,
                None => self.current.insert(self.open()?),
            };
            let room = self.sink.rows_per_file.max(1) - file.rows;
            let take = room.min(batch.num_rows() - offset);
            let slice = batch.slice(offset, take);
            let run_id: ArrayRef =
                Arc::new(StringArray::from(vec![self.sink.run_id.as_str(); take]));
            let mut columns = vec![run_id];
            columns.extend(slice.columns().iter().cloned());
            let rows = RecordBatch::try_new(Arc::clone(&self.schema), columns)?;
            if let Some(observer) = &self.sink.observer {
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
            if file.rows >= self.sink.rows_per_file {
                self.close()?;
            }
        }
        Ok(())
    }

    fn open(&self) -> Result<OpenFile, OperatorError> {
        let index = self.report.files.len();
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
        // Publishing is retried: on network filesystems a sync or rename can fail once and
        // then succeed. The bytes are written; only making them durable and visible is
        // repeated, and every step is idempotent.
        let publish = || -> std::io::Result<()> {
            fail::fail_point!("sink::publish", |_| Err(std::io::Error::other(
                "injected I/O error (failpoint sink::publish)"
            )));
            handle.sync_all()?;
            if file.temp.exists() {
                std::fs::rename(&file.temp, &file.path)?;
            }
            File::open(&self.sink.dir)?.sync_all()
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
        drop(handle);
        self.report.rows += file.counts.rows;
        self.report.rows_failed += file.counts.rows_failed;
        self.report.rows_filtered += file.counts.rows_filtered;
        self.report.files.push(file.path);
        if let Some(observer) = &self.sink.observer {
            observer.published(self.report.files.len())?;
        }
        Ok(())
    }

    /// Closes the last file. A run without rows still gets one (empty) file, so that its
    /// partition has a schema that SQL can query.
    fn finish(mut self) -> Result<SinkReport, OperatorError> {
        if self.current.is_none() && self.report.files.is_empty() {
            self.current = Some(self.open()?);
        }
        self.close()?;
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
