//! Merging a finished run's small data files, so that readers meet few files.
//!
//! A slow run commits by time (`commit_every`), each commit a file: a 14-hour CPU night
//! at 2 tickets/s would leave ~840 files of ~120 rows, and a query opens every one. When
//! the run has written its last row, and before its manifest says committed (so no reader
//! of committed runs sees it), consecutive small files are merged into files of up to the
//! row-based commit size, each group replacing its first file.
//!
//! A group is merged crash-safely, as a roll-forward log of one entry:
//! 1. the merged rows are written to a hidden temporary and fsynced;
//! 2. an intent (`_compaction.json`: the temporary, the file it replaces, the files it
//!    makes redundant) is written by rename and the folder fsynced: from here the merge
//!    is decided;
//! 3. the temporary is renamed over the group's first file, the other files deleted, the
//!    folder fsynced, and the intent removed.
//!
//! [`recover`] runs before anything reads a run's files ([`crate::sink::published_files`]):
//! with an intent it finishes the merge (each step is idempotent); without one, a merged
//! temporary is an unfinished step 1 and is removed. So the files are always either the
//! group's originals or its merge, never both.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::datatypes::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::OperatorError;

/// The intent of the merge in progress, in the run's folder.
const INTENT: &str = "_compaction.json";
/// Suffix of a merged file before it replaces its group's first file.
const MERGED_SUFFIX: &str = ".compacted";

#[derive(Debug, Serialize, Deserialize)]
struct Intent {
    /// The merged temporary (a file name in the run's folder).
    merged: String,
    /// The data file it replaces.
    replaces: String,
    /// The data files whose rows it also holds, deleted once it is in place.
    redundant: Vec<String>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> OperatorError + '_ {
    move |source| OperatorError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn sync_dir(dir: &Path) -> Result<(), OperatorError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Finishes or undoes a merge that a crash interrupted in run folder `dir`.
pub(crate) fn recover(dir: &Path) -> Result<(), OperatorError> {
    let intent_path = dir.join(INTENT);
    match std::fs::read_to_string(&intent_path) {
        Ok(text) => {
            let intent: Intent = serde_json::from_str(&text).map_err(|e| OperatorError::Io {
                path: intent_path.clone(),
                source: std::io::Error::other(e),
            })?;
            roll_forward(dir, &intent)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&intent_path)(e)),
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(dir)(e)),
    };
    for entry in entries {
        let path = entry.map_err(io(dir))?.path();
        if name(&path).ends_with(MERGED_SUFFIX) {
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
    }
    Ok(())
}

/// Steps 3 on: idempotent, so a crash anywhere in them is finished by running them again.
fn roll_forward(dir: &Path, intent: &Intent) -> Result<(), OperatorError> {
    let merged = dir.join(&intent.merged);
    if merged.exists() {
        let target = dir.join(&intent.replaces);
        std::fs::rename(&merged, &target).map_err(io(&target))?;
    }
    for file in &intent.redundant {
        let path = dir.join(file);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
    }
    sync_dir(dir)?;
    let intent_path = dir.join(INTENT);
    std::fs::remove_file(&intent_path).map_err(io(&intent_path))?;
    sync_dir(dir)
}

/// Merges consecutive files of `files` (a run's data files, in order) whose rows add up to
/// at most `target_rows` into one each. Returns the run's files afterwards, in order.
pub(crate) fn compact(
    dir: &Path,
    files: &[PathBuf],
    target_rows: usize,
    schema: &SchemaRef,
    properties: &WriterProperties,
) -> Result<Vec<PathBuf>, OperatorError> {
    let mut groups: Vec<(Vec<PathBuf>, usize)> = Vec::new();
    for file in files {
        let rows = rows_in(file)?;
        match groups.last_mut() {
            Some((group, sum)) if *sum + rows <= target_rows => {
                group.push(file.clone());
                *sum += rows;
            }
            _ => groups.push((vec![file.clone()], rows)),
        }
    }
    let mut out = Vec::with_capacity(groups.len());
    for (group, _) in groups {
        if group.len() > 1 {
            merge(dir, &group, schema, properties)?;
        }
        out.push(group[0].clone());
    }
    Ok(out)
}

fn rows_in(file: &Path) -> Result<usize, OperatorError> {
    let handle = File::open(file).map_err(io(file))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(handle).map_err(|source| {
        OperatorError::CorruptParquet {
            path: file.to_path_buf(),
            source,
        }
    })?;
    Ok(usize::try_from(builder.metadata().file_metadata().num_rows()).unwrap_or(0))
}

fn merge(
    dir: &Path,
    group: &[PathBuf],
    schema: &SchemaRef,
    properties: &WriterProperties,
) -> Result<(), OperatorError> {
    let first = &group[0];
    let merged = dir.join(format!(".{}{MERGED_SUFFIX}", name(first)));
    let handle = File::create(&merged).map_err(io(&merged))?;
    let mut writer =
        ArrowWriter::try_new(handle, SchemaRef::clone(schema), Some(properties.clone()))?;
    for file in group {
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(file).map_err(io(file))?)
            .and_then(|b| b.build())
            .map_err(|source| OperatorError::CorruptParquet {
                path: file.clone(),
                source,
            })?;
        for batch in reader {
            writer.write(&batch?)?;
        }
    }
    writer.into_inner()?.sync_all().map_err(io(&merged))?;

    let intent = Intent {
        merged: name(&merged),
        replaces: name(first),
        redundant: group[1..].iter().map(|f| name(f)).collect(),
    };
    let staged = dir.join(format!(".{INTENT}.tmp"));
    let text = serde_json::to_vec(&intent).map_err(|e| io(&staged)(std::io::Error::other(e)))?;
    std::fs::write(&staged, text)
        .and_then(|()| File::open(&staged)?.sync_all())
        .map_err(io(&staged))?;
    std::fs::rename(&staged, dir.join(INTENT)).map_err(io(dir))?;
    sync_dir(dir)?;
    // The fault tests' crash with the merge decided but not done.
    fail::fail_point!("compaction::decided", |_| std::process::abort());
    roll_forward(dir, &intent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use arrow::array::{Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::record_batch::RecordBatch;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("id", DataType::Utf8, true)]))
    }

    /// Writes a data file of the ids `from..from + rows`.
    fn write(path: &Path, from: usize, rows: usize) -> Result<(), OperatorError> {
        let ids: Vec<String> = (from..from + rows).map(|i| format!("t{i}")).collect();
        let batch = RecordBatch::try_new(schema(), vec![Arc::new(StringArray::from(ids))])?;
        let mut writer =
            ArrowWriter::try_new(File::create(path).map_err(io(path))?, schema(), None)?;
        writer.write(&batch)?;
        writer.close()?;
        Ok(())
    }

    /// The ids in `files`, in order.
    fn ids(files: &[PathBuf]) -> Result<Vec<String>, OperatorError> {
        let mut out = Vec::new();
        for file in files {
            let reader =
                ParquetRecordBatchReaderBuilder::try_new(File::open(file).map_err(io(file))?)?
                    .build()?;
            for batch in reader {
                let batch = batch?;
                let column = batch
                    .column(0)
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .ok_or_else(|| OperatorError::StageSchema("id".into()))?;
                out.extend(column.iter().flatten().map(str::to_string));
            }
        }
        Ok(out)
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|e| e.filter_map(Result::ok).map(|e| name(&e.path())).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    #[test]
    fn consecutive_small_files_merge_in_order_up_to_the_target() -> Result<(), OperatorError> {
        let dir = tempfile::tempdir().map_err(io(Path::new("tempdir")))?;
        let sizes = [3, 3, 3, 10, 2, 2];
        let mut files = Vec::new();
        let mut from = 0;
        for (i, rows) in sizes.into_iter().enumerate() {
            let path = dir.path().join(format!("part-{i:05}.parquet"));
            write(&path, from, rows)?;
            from += rows;
            files.push(path);
        }
        let before = ids(&files)?;
        let props = WriterProperties::builder().build();
        let after = compact(dir.path(), &files, 10, &schema(), &props)?;
        assert_eq!(
            after,
            [files[0].clone(), files[3].clone(), files[4].clone()]
        );
        assert_eq!(ids(&after)?, before, "every row once, in order");
        assert_eq!(
            listing(dir.path()),
            [
                "part-00000.parquet",
                "part-00003.parquet",
                "part-00004.parquet"
            ]
        );
        Ok(())
    }

    #[test]
    fn a_decided_merge_is_finished_and_an_undecided_one_undone() -> Result<(), OperatorError> {
        let dir = tempfile::tempdir().map_err(io(Path::new("tempdir")))?;
        let d = dir.path();
        let (a, b) = (d.join("part-00000.parquet"), d.join("part-00001.parquet"));
        write(&a, 0, 2)?;
        write(&b, 2, 2)?;
        let merged = d.join(format!(".part-00000.parquet{MERGED_SUFFIX}"));
        write(&merged, 0, 4)?;

        // Undecided (no intent): the merged temporary goes, the originals stay.
        recover(d)?;
        assert_eq!(listing(d), ["part-00000.parquet", "part-00001.parquet"]);

        // Decided: the merge is finished, from any step after the intent.
        let intent = Intent {
            merged: name(&merged),
            replaces: name(&a),
            redundant: vec![name(&b)],
        };
        let text = serde_json::to_string(&intent).map_err(|e| io(d)(std::io::Error::other(e)))?;
        for renamed in [false, true] {
            write(&a, 0, 2)?;
            write(&b, 2, 2)?;
            match renamed {
                false => write(&merged, 0, 4)?,
                true => write(&a, 0, 4)?,
            }
            std::fs::write(d.join(INTENT), &text).map_err(io(d))?;
            recover(d)?;
            assert_eq!(listing(d), ["part-00000.parquet"], "renamed: {renamed}");
            assert_eq!(ids(std::slice::from_ref(&a))?, ["t0", "t1", "t2", "t3"]);
        }
        Ok(())
    }
}
