//! The `[filter]` section's rules made ready for the filter stage: each similarity query
//! embedded with its threshold decided, each topic's prototype embedded.

use std::path::Path;

use abridge_operators::encoder::EncoderWorker;
use abridge_operators::filter::{Query, Topic, TopicRule};

use crate::error::{PipelineError, encoder_error};
use crate::job::{JobError, SimilarityConfig, TopicsConfig};

/// Everyday sentences about nothing a ticket is about, in the two languages of the
/// sample: a query's mean cosine to them is what its encoder gives unrelated text, the
/// floor that `above_unrelated` thresholds are measured from.
const UNRELATED: [&str; 16] = [
    "The recipe calls for two cups of flour and a pinch of salt.",
    "The river flooded the valley after a week of heavy rain.",
    "She won the chess tournament in the final round.",
    "The museum opens a new exhibition of medieval paintings.",
    "Our team scored twice in the second half of the match.",
    "The train to the coast leaves every hour on weekends.",
    "Photosynthesis turns sunlight into chemical energy in plants.",
    "He planted tomatoes and basil in the garden this spring.",
    "The novel tells the story of a family across three generations.",
    "Prices of fresh fruit rose sharply this summer.",
    "The orchestra played a symphony by Beethoven.",
    "A new species of frog was found in the rainforest.",
    "今天的天气晴朗，适合去公园散步。",
    "这家餐厅的饺子非常好吃。",
    "他在图书馆读了一下午的历史书。",
    "比赛在最后一分钟结束了。",
];

/// The mean cosine of `vector` to each of `others` (normalized vectors, one after
/// another); 0 when there are none.
fn mean_cosine(vector: &[f32], others: &[f32]) -> f32 {
    let rows = others.chunks_exact(vector.len().max(1));
    let count = rows.len();
    if count == 0 {
        return 0.0;
    }
    let sum: f32 = rows
        .map(|row| row.iter().zip(vector).map(|(a, b)| a * b).sum::<f32>())
        .sum();
    sum / count as f32
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
    let unrelated = if config.threshold.needs_unrelated() {
        encoder
            .encode(UNRELATED.iter().map(|s| s.to_string()).collect())
            .await
            .map_err(|e| encoder_error(job, e))?
    } else {
        Vec::new()
    };
    let mut queries = Vec::with_capacity(texts.len());
    for (text, vector) in texts.into_iter().zip(vectors.chunks_exact(dim)) {
        let tokens = encoder
            .count_tokens(&text)
            .map_err(|e| encoder_error(job, e))?;
        let threshold = config
            .threshold
            .for_query(tokens, mean_cosine(vector, &unrelated));
        // A cosine never exceeds 1: a query that no ticket can match is a mistake in the
        // job, not a quiet night.
        if threshold > 1.0 {
            return Err(JobError::Invalid {
                path: job.to_path_buf(),
                key: "filter.similarity.threshold".into(),
                message: format!(
                    "query {text:?} ({tokens} tokens) gets threshold {threshold:.3}, above 1, \
                     the largest cosine there is: no ticket could match it; lower it (base or \
                     per_token for the rule by length)"
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
