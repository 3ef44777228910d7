//! The job's index kept in step with its output table: opened for a run, it catches up
//! with the files an earlier attempt published after the index's last commit, or is
//! rebuilt from the table when it disagrees otherwise.

use std::path::{Path, PathBuf};

use abridge_operators::OperatorError;
use abridge_operators::index::{IndexCommitter, IndexPosition, TicketIndex};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::error::PipelineError;
use crate::search::index_error;
use crate::table::manifest::committed_runs;

/// Opens the job's index for a run and brings it in step with the output table: the
/// committed runs, plus the files that earlier attempts of a resumed run published
/// (`resuming`). An index one or more files behind the resumed run (a crash between a
/// file's rename and the index commit) catches up from those files; any other mismatch
/// (new index, a run abandoned after indexing, shard runs, which do not index) rebuilds
/// it from the table. Returns the writer and, when it had to rebuild or catch up, the
/// number of tickets indexed.
pub fn open_index_for_run(
    dir: &Path,
    dim: usize,
    model: &Path,
    fingerprint: &str,
    output: &Path,
    resuming: Option<(&str, &[PathBuf])>,
) -> Result<(IndexCommitter, Option<u64>), PipelineError> {
    let index = TicketIndex::open_or_create(dir, dim, model, fingerprint).map_err(index_error)?;
    let committer = index.writer().map_err(index_error)?;
    let runs = committed_runs(output).map_err(|source| PipelineError::Io {
        path: output.to_path_buf(),
        source,
    })?;
    let position = index.position().map_err(index_error)?;
    let expected = match resuming {
        Some((run_id, files)) if !files.is_empty() => Some(IndexPosition {
            run_id: run_id.to_string(),
            files: Some(files.len()),
        }),
        _ => runs.last().map(|(_, m)| IndexPosition {
            run_id: m.run_id.clone(),
            files: Some(m.files.len()),
        }),
    };
    let in_step = match (&position, &expected) {
        (None, None) => true,
        (Some(p), None) => p.run_id.is_empty(),
        (Some(p), Some(e)) => p.run_id == e.run_id && p.files.is_none_or(|f| Some(f) == e.files),
        (None, Some(_)) => false,
    };
    if in_step {
        return Ok((committer, None));
    }
    let mut rows = 0u64;
    let behind = match (&position, resuming) {
        (Some(p), Some((run_id, files))) if p.run_id == run_id => p
            .files
            .filter(|&done| done < files.len())
            .map(|done| (run_id, &files[done..])),
        _ => None,
    };
    if let Some((run_id, missing)) = behind {
        for path in missing {
            rows += reindex_file(&committer, path, run_id)?;
        }
    } else {
        committer.clear().map_err(index_error)?;
        for (run_dir, manifest) in &runs {
            for file in &manifest.files {
                rows += reindex_file(&committer, &run_dir.join(file), &manifest.run_id)?;
            }
        }
        if let Some((run_id, files)) = resuming {
            for path in files {
                rows += reindex_file(&committer, path, run_id)?;
            }
        }
    }
    let position = expected.unwrap_or(IndexPosition {
        run_id: String::new(),
        files: None,
    });
    committer.commit(&position).map_err(index_error)?;
    Ok((committer, Some(rows)))
}

fn reindex_file(
    committer: &IndexCommitter,
    path: &Path,
    run_id: &str,
) -> Result<u64, PipelineError> {
    let failed = |source: OperatorError| PipelineError::Input {
        job: path.to_path_buf(),
        source: Box::new(source),
    };
    let file = std::fs::File::open(path).map_err(|source| PipelineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| failed(e.into()))?;
    let mut rows = 0;
    for batch in reader {
        let batch = batch.map_err(|e| failed(e.into()))?;
        rows += committer.add_batch(&batch, run_id).map_err(failed)? as u64;
    }
    Ok(rows)
}
