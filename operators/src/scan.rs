//! `scan`: reads the user's Parquet files through DataFusion, with the job's SQL `where`
//! pushed down into the Parquet reader (row groups and pages it rules out are never
//! decoded).
//!
//! Files are resolved and their footers checked before anything runs, so that a missing,
//! truncated or non-Parquet file is reported by name instead of surfacing mid-stream.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use arrow::datatypes::{Schema, SchemaRef};
use datafusion::dataframe::DataFrame;
use datafusion::datasource::file_format::options::ParquetReadOptions;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SessionContext;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::prelude::SessionConfig;
use futures::StreamExt;
use parquet::file::reader::{FileReader, SerializedFileReader};

use crate::{OperatorError, OperatorMetrics, SendableRecordBatchStream};

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

/// A scan ready to be polled.
pub struct OpenScan {
    /// The files that will be read, in order.
    pub files: Vec<PathBuf>,
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
    pub async fn open(&self, metrics: OperatorMetrics) -> Result<OpenScan, OperatorError> {
        let files = resolve_files(&self.path)?;
        let mut file_rows = 0u64;
        for file in &files {
            file_rows += footer_rows(file)?;
        }

        // One partition keeps input order stable from run to run: "first occurrence" and
        // resumption depend on it, and the model stages downstream set the pace anyway.
        let mut config = SessionConfig::new()
            .with_batch_size(self.batch_size.max(1))
            .with_target_partitions(1);
        config.options_mut().execution.parquet.pushdown_filters = true;
        config.options_mut().execution.parquet.reorder_filters = true;
        let ctx = SessionContext::new_with_config(config);

        // The files' merged schema, and the `where` clause checked against it, before any
        // row is read: configuration errors surface here, not mid-run.
        let paths: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        let all = ctx
            .read_parquet(paths, read_options(None))
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
        // failure names the file it happened in.
        let file_schema = Arc::clone(&merged);
        let per_file = futures::stream::iter(files.clone())
            .then(move |file| {
                let ctx = ctx.clone();
                let schema = Arc::clone(&file_schema);
                let where_clause = where_clause.clone();
                async move {
                    let named = {
                        let file = file.clone();
                        move |source| OperatorError::ReadFailed {
                            path: file.clone(),
                            source,
                        }
                    };
                    let open = async {
                        let path = file.display().to_string();
                        let mut df = ctx.read_parquet(path, read_options(Some(&schema))).await?;
                        if let Some(clause) = &where_clause {
                            df = filtered(df, clause).map_err(DataFusionError::from)?;
                        }
                        df.execute_stream().await
                    };
                    match open.await {
                        Ok(stream) => stream
                            .map(move |batch| batch.map_err(|e| named(e).into()))
                            .boxed(),
                        Err(e) => {
                            futures::stream::once(async move { Err(named(e).into()) }).boxed()
                        }
                    }
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

fn footer_rows(file: &Path) -> Result<u64, OperatorError> {
    let handle = File::open(file).map_err(|e| OperatorError::InputNotFound {
        path: file.display().to_string(),
        reason: e.to_string(),
    })?;
    let reader =
        SerializedFileReader::new(handle).map_err(|source| OperatorError::CorruptParquet {
            path: file.to_path_buf(),
            source,
        })?;
    Ok(u64::try_from(reader.metadata().file_metadata().num_rows()).unwrap_or(0))
}
