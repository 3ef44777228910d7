//! The job-file side of retrieval: filter rules embedded from `[filter]`, and `abridge
//! search`. (The index is kept in step with the table by `table::index`.)

use std::path::Path;

use abridge_operators::OperatorError;
use abridge_operators::encoder::{EncoderError, EncoderWorker};
use abridge_operators::filter::{Query, Topic, TopicRule};
use abridge_operators::index::{Hit, IndexError, TicketIndex, reciprocal_rank_fusion};

use crate::error::PipelineError;
use crate::job::{JobError, SimilarityConfig, TopicsConfig};

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
        let threshold = config.threshold.for_tokens(tokens);
        // A cosine never exceeds 1: a query that no ticket can match is a mistake in the
        // job, not a quiet night.
        if threshold > 1.0 {
            return Err(JobError::Invalid {
                path: job.to_path_buf(),
                key: "filter.similarity.threshold".into(),
                message: format!(
                    "query {text:?} ({tokens} tokens) gets threshold {threshold:.3}, above 1, \
                     the largest cosine there is: no ticket could match it; lower base or \
                     per_token, or set a fixed threshold"
                ),
            }
            .into());
        }
        queries.push(Query {
            threshold,
            text,
            vector: vector.to_vec(),
        });
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
