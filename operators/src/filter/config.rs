//! `[filter]`: the filter stage's configuration, and its rules made ready: each
//! similarity query embedded with its threshold decided, each topic's prototype embedded.

use abridge_models::encoder::{EncoderError, EncoderWorker};
use abridge_models::generator::SharedGenerator;
use arrow::datatypes::SchemaRef;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{
    ClassifierRule, FILTER_REASON, KEPT, MATCHED_QUERY, OTHER_TOPIC, Query, SIMILARITY,
    SemanticFilter, TOPIC_SCORE, Topic, TopicClassifier, TopicRule, Topics,
};
use crate::stage::{BuildContext, JobView, Stage, StageSection};
use crate::summarize::Backend;
use crate::tasks::TaskSettings;
use crate::{AsyncTransformStage, OperatorError, TransformStage};

/// `[filter]`: both rules are optional; a ticket is kept when it passes every rule set.
/// Filtered tickets are still written, with `kept = false` and `filter_reason`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Keep tickets near one of the queries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub similarity: Option<SimilarityConfig>,
    /// Classify tickets into topics and keep the allowed ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topics: Option<TopicsConfig>,
}

/// `[filter.similarity]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimilarityConfig {
    /// What the job is looking for, in words: a ticket is kept when its cosine to any
    /// query reaches that query's threshold.
    pub queries: Vec<String>,
    /// How close a ticket must come to a query: `{ above_unrelated = 0.375 }` (the
    /// default), a number (the same for every query), or `{ base, per_token }`.
    ///
    /// Cosines depend on the encoder: MiniLM gives unrelated texts ~0.03, others put even
    /// unrelated pairs above 0.6, so no one number suits every encoder. `above_unrelated = a` places each query's
    /// threshold the fraction `a` of the way from its mean cosine to unrelated sentences
    /// (a fixed set of everyday English and Chinese sentences, embedded by the job's
    /// encoder) up to 1. 0.375 had the best mean F1 on the sample's categories with
    /// MiniLM-L6 (24 queries of 2 to 32 tokens: 0.924, against 0.926 for the best fixed
    /// number there, 0.385); an encoder that packs its cosines closer to 1 moves the
    /// thresholds with it. `scripts/tune-threshold` measures every rule for your encoder.
    /// A query whose threshold exceeds 1 is refused.
    #[serde(default)]
    pub threshold: Threshold,
}

/// How a query's similarity threshold is decided.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Threshold {
    /// The same threshold for every query.
    Fixed(f32),
    /// `base + per_token × query tokens`.
    Dynamic(DynamicThreshold),
    /// `unrelated + above_unrelated × (1 − unrelated)`.
    Relative(RelativeThreshold),
}

/// `base + per_token × query tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicThreshold {
    /// Threshold of a query of no tokens.
    pub base: f32,
    /// Added per token of the query (negative: longer queries pass more easily).
    pub per_token: f32,
}

/// A threshold relative to the cosine the encoder gives the query and unrelated text.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelativeThreshold {
    /// From 0 (as close as unrelated text) to 1 (identical), below 1.
    pub above_unrelated: f32,
}

impl Default for Threshold {
    fn default() -> Self {
        Threshold::Relative(RelativeThreshold {
            above_unrelated: 0.375,
        })
    }
}

impl Threshold {
    /// The threshold of a query of `tokens` tokens whose mean cosine to unrelated
    /// sentences is `unrelated`.
    pub fn for_query(&self, tokens: usize, unrelated: f32) -> f32 {
        match *self {
            Threshold::Fixed(t) => t,
            Threshold::Dynamic(d) => d.base + d.per_token * tokens as f32,
            Threshold::Relative(r) => unrelated + r.above_unrelated * (1.0 - unrelated),
        }
    }

    /// Whether deciding it needs the cosines of unrelated sentences.
    pub fn needs_unrelated(&self) -> bool {
        matches!(self, Threshold::Relative(_))
    }
}

/// `[filter.topics]`: zero-shot topics, by cosine to each topic's prototype (the mean
/// vector of its label and description sentences) or by the summarizer model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    /// Topic label → sentences that describe it (may be empty: the label alone; the
    /// classifier reads the labels only).
    pub labels: std::collections::BTreeMap<String, Vec<String>>,
    /// `prototypes` (default): the nearest prototype by the `[embed]` encoder, for every
    /// ticket. `classifier`: the `[summarize]` model chooses one of the labels (decoding
    /// restricted to their tokens; SeqGPT's `分类` prompt with the `seqgpt` backend, an
    /// English instruction with `llama`), for the tickets the similarity rule kept only.
    #[serde(default, skip_serializing_if = "TopicMethod::is_default")]
    pub method: TopicMethod,
    /// Topics whose tickets are kept; may include `other`. Default: every label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed: Option<Vec<String>>,
    /// A best cosine below this gives topic `other` (prototypes). Default: 0.3.
    #[serde(default = "default_min_topic_score")]
    pub min_score: f32,
    /// `allowed` (default): a ticket's topic must be allowed. `query`: it must also be
    /// the topic of the similarity query the ticket matched (the design's topic
    /// consistency; needs `[filter.similarity]`).
    #[serde(
        default,
        rename = "match",
        skip_serializing_if = "TopicMatch::is_default"
    )]
    pub match_rule: TopicMatch,
}

/// `[filter.topics] method`: who decides a ticket's topic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TopicMethod {
    #[default]
    Prototypes,
    Classifier,
}

impl TopicMethod {
    /// Left out of recorded jobs when default, as [`TopicMatch`] is.
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// `[filter.topics] match`: what a ticket's topic must agree with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TopicMatch {
    #[default]
    Allowed,
    Query,
}

impl TopicMatch {
    /// Left out of recorded jobs when default, so that jobs written before the key
    /// existed keep their fingerprint (and `skip_done` its rows).
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

fn default_min_topic_score() -> f32 {
    0.3
}

impl FilterConfig {
    /// Why this section cannot be used, naming the key.
    pub fn validate(&self) -> Result<(), OperatorError> {
        if let Some(similarity) = &self.similarity {
            if let Threshold::Relative(r) = similarity.threshold
                && !(0.0..1.0).contains(&r.above_unrelated)
            {
                return Err(OperatorError::config(
                    "filter.similarity.threshold.above_unrelated",
                    "must be from 0 (as close as unrelated text) to below 1 (identical)",
                ));
            }
            if similarity.queries.iter().all(|q| q.trim().is_empty()) {
                return Err(OperatorError::config(
                    "filter.similarity.queries",
                    "lists no query; add at least one, or remove [filter.similarity]",
                ));
            }
        }
        if let Some(topics) = &self.topics {
            topics.validate()?;
            if topics.match_rule == TopicMatch::Query && self.similarity.is_none() {
                return Err(OperatorError::config(
                    "filter.topics.match",
                    "`query` compares a ticket's topic with the topic of the query it matched: \
                     add [filter.similarity] with queries",
                ));
            }
        }
        Ok(())
    }

    /// Embeds the rules' queries and topics with `encoder` (the `embed` stage's) and makes
    /// the stage over `input`.
    pub async fn operator(
        &self,
        encoder: &EncoderWorker,
        input: &SchemaRef,
    ) -> Result<TransformStage<SemanticFilter>, OperatorError> {
        let queries = match &self.similarity {
            Some(config) => similarity_queries(config, encoder).await?,
            None => Vec::new(),
        };
        let topics = match &self.topics {
            None => Topics::NoRule,
            Some(config) if config.method == TopicMethod::Classifier => Topics::Classifier,
            Some(config) => Topics::Prototypes(topic_rule(config, encoder).await?),
        };
        SemanticFilter::try_new(input, queries, topics)
    }

    /// Whether topics are the summarizer model's (`[filter.topics] method = "classifier"`):
    /// then [`FilterConfig::classifier`] makes the stage after the filter.
    pub fn classifies(&self) -> bool {
        self.topics
            .as_ref()
            .is_some_and(|t| t.method == TopicMethod::Classifier)
    }

    /// The stage after the filter that classifies the kept tickets with `generator` (the
    /// summarizer's); `queries` are the similarity rule's, whose topics `match = "query"`
    /// compares with.
    pub async fn classifier(
        &self,
        generator: SharedGenerator,
        settings: TaskSettings,
        queries: &[String],
        input: &SchemaRef,
    ) -> Result<AsyncTransformStage<TopicClassifier>, OperatorError> {
        let topics = self.topics.as_ref().ok_or_else(|| {
            OperatorError::config("filter.topics", "the classifier needs topic labels")
        })?;
        let labels: Vec<String> = topics.labels.keys().cloned().collect();
        let rule = ClassifierRule {
            allowed: topics.allowed.clone().unwrap_or_else(|| labels.clone()),
            labels,
            match_query: topics.match_rule == TopicMatch::Query,
        };
        TopicClassifier::try_new(generator, rule, queries, settings, input).await
    }
}

impl StageSection for FilterConfig {
    const SECTION: &'static str = "filter";
    const COLUMNS: &'static [&'static str] =
        &[SIMILARITY, MATCHED_QUERY, TOPIC_SCORE, KEPT, FILTER_REASON];
}

impl Stage for FilterConfig {
    fn validate(&self, job: &JobView<'_>) -> Result<(), OperatorError> {
        FilterConfig::validate(self)?;
        job.require(
            "embed",
            "filter",
            "needs an [embed] section: it works on the tickets' vectors",
        )?;
        if !self.classifies() {
            return Ok(());
        }
        match job.summarize {
            None => Err(OperatorError::config(
                "filter.topics.method",
                "asks the summarizer model: add a [summarize] section",
            )),
            Some(summarize) if summarize.backend == Backend::Mistralrs => {
                Err(OperatorError::config(
                    "filter.topics.method",
                    "`classifier` restricts decoding to the labels' tokens, which abridge's own \
                     engine does: set summarize.backend to `llama` (Llama or Qwen2 GGUF) or \
                     `seqgpt` (BLOOM, SeqGPT-560M)",
                ))
            }
            Some(_) => Ok(()),
        }
    }

    /// The filter; with `method = "classifier"`, the `topics` stage after it, asking the
    /// summarizer's model.
    fn build<'a>(
        &'a self,
        ctx: &'a mut BuildContext<'_>,
    ) -> BoxFuture<'a, Result<(), OperatorError>> {
        Box::pin(async move {
            let stage = self.operator(&ctx.encoder()?, &ctx.schema()).await?;
            let queries = stage.inner().queries();
            ctx.set_queries(
                queries
                    .iter()
                    .map(|q| (q.text.clone(), q.threshold))
                    .collect(),
            );
            ctx.push(stage);
            let Some(summarize) = ctx.job.summarize.filter(|_| self.classifies()) else {
                return Ok(());
            };
            let generator = ctx.generator().await?;
            let queries: Vec<String> = ctx.queries().iter().map(|(q, _)| q.clone()).collect();
            let settings = summarize.task_settings();
            let stage = self
                .classifier(generator, settings, &queries, &ctx.schema())
                .await?;
            let mut topics: Vec<_> = stage.inner().query_topics().iter().collect();
            topics.sort();
            for (query, topic) in topics {
                ctx.note(format!("topics: the query {query:?} is of topic {topic:?}"));
            }
            ctx.push(stage);
            Ok(())
        })
    }
}

impl TopicsConfig {
    fn validate(&self) -> Result<(), OperatorError> {
        if self.labels.is_empty() {
            return Err(OperatorError::config(
                "filter.topics.labels",
                "names no topic; add `label = [\"description\", ...]` lines",
            ));
        }
        if self.labels.contains_key(OTHER_TOPIC) {
            return Err(OperatorError::config(
                "filter.topics.labels",
                format!("`{OTHER_TOPIC}` is the topic of tickets near none; choose another label"),
            ));
        }
        if let Some(label) = self
            .labels
            .keys()
            .find(|l| l.trim() != l.as_str() || l.is_empty())
        {
            return Err(OperatorError::config(
                "filter.topics.labels",
                format!("the label {label:?} is empty or has leading or trailing spaces"),
            ));
        }
        for topic in self.allowed.iter().flatten() {
            if topic == OTHER_TOPIC && self.method == TopicMethod::Classifier {
                return Err(OperatorError::config(
                    "filter.topics.allowed",
                    format!(
                        "`{OTHER_TOPIC}` is the prototypes' topic for tickets near none; the \
                         classifier always chooses a label"
                    ),
                ));
            }
            if topic != OTHER_TOPIC && !self.labels.contains_key(topic) {
                let labels: Vec<&str> = self.labels.keys().map(String::as_str).collect();
                return Err(OperatorError::config(
                    "filter.topics.allowed",
                    format!(
                        "`{topic}` is not a label; labels: {}, {OTHER_TOPIC}",
                        labels.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn encoder_error(e: EncoderError) -> OperatorError {
    OperatorError::Encoder(Box::new(e))
}

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
async fn similarity_queries(
    config: &SimilarityConfig,
    encoder: &EncoderWorker,
) -> Result<Vec<Query>, OperatorError> {
    let texts: Vec<String> = config
        .queries
        .iter()
        .map(|q| q.trim().to_string())
        .filter(|q| !q.is_empty())
        .collect();
    let dim = encoder.dim();
    let vectors = encoder.encode(texts.clone()).await.map_err(encoder_error)?;
    let unrelated = if config.threshold.needs_unrelated() {
        encoder
            .encode(UNRELATED.iter().map(|s| s.to_string()).collect())
            .await
            .map_err(encoder_error)?
    } else {
        Vec::new()
    };
    let mut queries = Vec::with_capacity(texts.len());
    for (text, vector) in texts.into_iter().zip(vectors.chunks_exact(dim)) {
        let tokens = encoder.count_tokens(&text).map_err(encoder_error)?;
        let threshold = config
            .threshold
            .for_query(tokens, mean_cosine(vector, &unrelated));
        // A cosine never exceeds 1: a query that no ticket can match is a mistake in the
        // job, not a quiet night.
        if threshold > 1.0 {
            return Err(OperatorError::config(
                "filter.similarity.threshold",
                format!(
                    "query {text:?} ({tokens} tokens) gets threshold {threshold:.3}, above 1, \
                     the largest cosine there is: no ticket could match it; lower it (base or \
                     per_token for the rule by length)"
                ),
            ));
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
async fn topic_rule(
    config: &TopicsConfig,
    encoder: &EncoderWorker,
) -> Result<TopicRule, OperatorError> {
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
        let vectors = encoder.encode(texts).await.map_err(encoder_error)?;
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
        match_query: config.match_rule == TopicMatch::Query,
    })
}
