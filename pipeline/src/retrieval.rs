//! The job-file side of retrieval: filter rules embedded from `[filter]`, the job's index
//! opened and kept in step with its output table, and `abridge search`.

use std::path::{Path, PathBuf};

use abridge_operators::OperatorError;
use abridge_operators::encoder::{EncoderError, EncoderWorker};
use abridge_operators::filter::{Query, Topic, TopicRule};
use abridge_operators::index::{
    Hit, IndexCommitter, IndexError, IndexPosition, TicketIndex, reciprocal_rank_fusion,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::error::PipelineError;
use crate::job::{JobError, SimilarityConfig, TopicsConfig};
use crate::run::committed_runs;

fn encoder_error(job: &Path, source: EncoderError) -> PipelineError {
    PipelineError::Model {
        job: job.to_path_buf(),
        source: Box::new(OperatorError::Encoder(Box::new(source))),
    }
}

/// The similarity rule's queries, embedded, each with its threshold.
pub async fn similarity_queries(
    config: &SimilarityConfig,
    encoder: &EncoderWorker,
    job: &Path,
) -> Result<Vec<Query>, PipelineError> {
    let texts: Vec<String> = config
        .queries
        .iter()
        .map(|q| q.trim().to_string())
        .filter(|q| !q.is_empty())
        .collect();
    let dim = encoder.dim();
    let vectors = encoder
        .encode(texts.clone())
        .await
        .map_err(|e| encoder_error(job, e))?;
    let mut queries = Vec::with_capacity(texts.len());
    for (text, vector) in texts.into_iter().zip(vectors.chunks_exact(dim)) {
        let tokens = encoder
            .count_tokens(&text)
            .map_err(|e| encoder_error(job, e))?;
        queries.push(Query {
            threshold: config.threshold.for_tokens(tokens),
            text,
            vector: vector.to_vec(),
        });
    }
    // A cosine never exceeds 1: a rule that no ticket can pass is a mistake in the job.
    if queries.iter().all(|q| q.threshold > 1.0) {
        let worst = queries
            .iter()
            .map(|q| format!("{:?}: {:.2}", q.text, q.threshold))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(JobError::Invalid {
            path: job.to_path_buf(),
            key: "filter.similarity.threshold".into(),
            message: format!(
                "every query's threshold is above 1, the largest cosine there is ({worst}); \
                 lower base/per_token or set a fixed threshold"
            ),
        }
        .into());
    }
    Ok(queries)
}

/// The topic rule: one prototype per label, the normalized mean of the vectors of the
/// label and of its description sentences.
pub async fn topic_rule(
    config: &TopicsConfig,
    encoder: &EncoderWorker,
    job: &Path,
) -> Result<TopicRule, PipelineError> {
    let dim = encoder.dim();
    let mut topics = Vec::with_capacity(config.labels.len());
    for (label, descriptions) in &config.labels {
        let mut texts = vec![label.clone()];
        texts.extend(
            descriptions
                .iter()
                .filter(|d| !d.trim().is_empty())
                .cloned(),
        );
        let count = texts.len();
        let vectors = encoder
            .encode(texts)
            .await
            .map_err(|e| encoder_error(job, e))?;
        let mut mean = vec![0f32; dim];
        for vector in vectors.chunks_exact(dim) {
            for (m, v) in mean.iter_mut().zip(vector) {
                *m += v / count as f32;
            }
        }
        let norm = mean.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        mean.iter_mut().for_each(|x| *x /= norm);
        topics.push(Topic {
            label: label.clone(),
            prototype: mean,
        });
    }
    Ok(TopicRule {
        allowed: config
            .allowed
            .clone()
            .unwrap_or_else(|| config.labels.keys().cloned().collect()),
        topics,
        min_score: config.min_score,
    })
}

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
    output: &Path,
    resuming: Option<(&str, &[PathBuf])>,
) -> Result<(IndexCommitter, Option<u64>), PipelineError> {
    let index = TicketIndex::open_or_create(dir, dim, model).map_err(index_error)?;
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

/// An index error as a pipeline error (what went wrong already names the folder).
pub fn index_error(source: IndexError) -> PipelineError {
    PipelineError::Index(Box::new(source))
}

/// How `abridge search` ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SearchMode {
    /// Words in common (tantivy BM25 over titles and texts).
    Bm25,
    /// Meaning: cosine between the query's vector and the tickets'.
    Vector,
    /// Both, fused by reciprocal rank.
    Hybrid,
}

/// Searches `index`; `encoder` is needed for vector and hybrid modes.
pub async fn search(
    index: &TicketIndex,
    encoder: Option<&EncoderWorker>,
    query: &str,
    k: usize,
    mode: SearchMode,
) -> Result<Vec<Hit>, PipelineError> {
    let vector = match (mode, encoder) {
        (SearchMode::Bm25, _) => Vec::new(),
        (_, None) => {
            return Err(PipelineError::Usage(format!(
                "{mode:?} search needs the index's encoder; use --mode bm25"
            )));
        }
        (_, Some(encoder)) => encoder
            .encode(vec![query.to_string()])
            .await
            .map_err(|e| encoder_error(&index.meta().model, e))?,
    };
    let hits = match mode {
        SearchMode::Bm25 => index.search_bm25(query, k),
        SearchMode::Vector => index.search_vector(&vector, k),
        SearchMode::Hybrid => {
            // Fuse deeper lists than asked for, so that a ticket ranked well by one
            // method and moderately by the other can still surface.
            let depth = (k * 4).max(50);
            let lexical = index.search_bm25(query, depth).map_err(index_error)?;
            let semantic = index.search_vector(&vector, depth).map_err(index_error)?;
            Ok(reciprocal_rank_fusion(&[lexical, semantic], k))
        }
    };
    hits.map_err(index_error)
}
