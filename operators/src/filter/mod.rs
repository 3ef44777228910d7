//! `filter`: which tickets go on to be summarized, decided by meaning.
//!
//! Two rules over the `embedding` column, each optional:
//! - similarity: a ticket passes when its cosine to some query is at least that query's
//!   threshold. The query with the largest margin (cosine − threshold) is reported as
//!   `similarity` and, when it passes, `matched_query`.
//! - topic: zero-shot classification by cosine to one prototype vector per topic; the
//!   nearest topic wins, a tie or a score under `min_score` gives [`OTHER_TOPIC`]. A ticket
//!   passes when its topic is allowed and, with `match = "query"` (the design's topic
//!   consistency), when it equals the topic of the query it matched (each query's topic is
//!   decided once, by the same prototypes). The result replaces the `topic` column and
//!   its cosine is `topic_score`. With `method = "classifier"` the topic is the summarizer
//!   model's instead, decided by the [`TopicClassifier`] stage after this one.
//!
//! Nothing is dropped: every row comes out with `kept` and, when not kept, a
//! `filter_reason` that a user can audit with SQL. Rows that failed an earlier stage
//! (their `error` is set) have no vector; they come out with `kept = false` and no reason
//! of their own, so that input rows = kept + filtered + failed.

mod classifier;
mod config;

use std::sync::Arc;

use abridge_schemas::output::ERROR;
use arrow::array::{
    Array, ArrayRef, BooleanArray, FixedSizeListArray, Float32Array, Float32Builder, StringArray,
    StringBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;

use crate::embed::EMBEDDING;
use crate::{BatchTransform, OperatorError, StageCounters, TransformStage};

pub use classifier::{ClassifierRule, TopicClassifier};
pub use config::{
    DynamicThreshold, FilterConfig, RelativeThreshold, SimilarityConfig, Threshold, TopicMethod,
    TopicsConfig,
};

/// The topic of tickets near no topic, or equally near two.
pub const OTHER_TOPIC: &str = "other";
/// Column: cosine to the reported query.
pub const SIMILARITY: &str = "similarity";
/// Column: the query a kept ticket matched.
pub const MATCHED_QUERY: &str = "matched_query";
/// Column: the ticket's topic (replaced when topics are classified).
pub const TOPIC: &str = "topic";
/// Column: cosine to the winning topic's prototype.
pub const TOPIC_SCORE: &str = "topic_score";
/// Column: whether the ticket goes on to be summarized.
pub const KEPT: &str = "kept";
/// Column: why a ticket was not kept.
pub const FILTER_REASON: &str = "filter_reason";

/// Two topic scores closer than this are a tie.
const TIE: f32 = 1e-6;

/// One query of the similarity rule, embedded.
#[derive(Debug, Clone)]
pub struct Query {
    /// The query as written in the job.
    pub text: String,
    /// Its L2-normalized vector.
    pub vector: Vec<f32>,
    /// The cosine a ticket needs to pass on this query.
    pub threshold: f32,
}

/// One topic of the topic rule.
#[derive(Debug, Clone)]
pub struct Topic {
    /// The topic's name, written to `topic`.
    pub label: String,
    /// L2-normalized centroid of the label's and descriptions' vectors.
    pub prototype: Vec<f32>,
}

/// The topic rule.
#[derive(Debug, Clone)]
pub struct TopicRule {
    /// The candidate topics.
    pub topics: Vec<Topic>,
    /// Best scores below this give [`OTHER_TOPIC`].
    pub min_score: f32,
    /// Topics whose tickets are kept (may include [`OTHER_TOPIC`]).
    pub allowed: Vec<String>,
    /// Keep a ticket only when its topic is that of the query it matched.
    pub match_query: bool,
}

/// Where the filter's topics come from.
#[derive(Debug, Clone)]
pub enum Topics {
    /// No topic rule: every ticket passes it.
    NoRule,
    /// The nearest prototype, decided by the filter.
    Prototypes(TopicRule),
    /// The summarizer model's, decided by the [`TopicClassifier`] stage after the filter:
    /// the filter makes the `topic` column and leaves it (and `topic_score`) NULL.
    Classifier,
}

/// The `filter` stage.
pub struct SemanticFilter {
    queries: Vec<Query>,
    /// Each query's topic, when tickets must match it (`match = "query"`).
    query_topics: Vec<String>,
    topics: Option<TopicRule>,
    /// Whether `topic` is made for a classifier after the filter to fill in.
    topic_column: bool,
    dim: usize,
    schema: SchemaRef,
}

impl SemanticFilter {
    /// The similarity rule's queries, with their thresholds.
    pub fn queries(&self) -> &[Query] {
        &self.queries
    }

    /// A filter over streams of `input`, which must have an `embedding` column of vectors
    /// as long as the queries' and prototypes'. With no queries every ticket passes the
    /// similarity rule; with no topic rule every ticket passes that one.
    pub fn try_new(
        input: &SchemaRef,
        queries: Vec<Query>,
        topics: Topics,
    ) -> Result<TransformStage<Self>, OperatorError> {
        let topic_column = !matches!(topics, Topics::NoRule);
        let topics = match topics {
            Topics::Prototypes(rule) => Some(rule),
            Topics::NoRule | Topics::Classifier => None,
        };
        let dim = match input
            .field_with_name(EMBEDDING)
            .map(|f| f.data_type().clone())
        {
            Ok(DataType::FixedSizeList(_, dim)) => dim as usize,
            _ => {
                return Err(OperatorError::StageSchema(format!(
                    "the filter needs an `{EMBEDDING}` column of vectors (an embed stage before it)"
                )));
            }
        };
        let lengths = queries.iter().map(|q| q.vector.len()).chain(
            topics
                .iter()
                .flat_map(|t| t.topics.iter().map(|t| t.prototype.len())),
        );
        for len in lengths {
            if len != dim {
                return Err(OperatorError::StageSchema(format!(
                    "filter vectors have {len} dimensions, the `{EMBEDDING}` column {dim}"
                )));
            }
        }
        let mut fields: Vec<Arc<Field>> = input.fields().iter().cloned().collect();
        if topic_column {
            match input.index_of(TOPIC) {
                Ok(i) => fields[i] = Arc::new(Field::new(TOPIC, DataType::Utf8, true)),
                Err(_) => fields.push(Arc::new(Field::new(TOPIC, DataType::Utf8, true))),
            }
        }
        fields.extend([
            Arc::new(Field::new(SIMILARITY, DataType::Float32, true)),
            Arc::new(Field::new(MATCHED_QUERY, DataType::Utf8, true)),
            Arc::new(Field::new(TOPIC_SCORE, DataType::Float32, true)),
            Arc::new(Field::new(KEPT, DataType::Boolean, false)),
            Arc::new(Field::new(FILTER_REASON, DataType::Utf8, true)),
        ]);
        let schema = Arc::new(Schema::new_with_metadata(fields, input.metadata().clone()));
        let mut filter = Self {
            queries,
            query_topics: Vec::new(),
            topics,
            topic_column,
            dim,
            schema,
        };
        if let Some(rule) = filter.topics.as_ref().filter(|r| r.match_query) {
            filter.query_topics = filter
                .queries
                .iter()
                .map(|q| filter.topic(rule, &q.vector).0.to_string())
                .collect();
        }
        Ok(TransformStage::new("filter", filter))
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// What the similarity rule says of one vector.
struct SimilarityVerdict<'q> {
    /// The query's index in the rule.
    index: usize,
    query: &'q Query,
    cosine: f32,
}

impl SemanticFilter {
    fn similarity(&self, vector: &[f32]) -> Option<SimilarityVerdict<'_>> {
        self.queries
            .iter()
            .enumerate()
            .map(|(index, query)| SimilarityVerdict {
                index,
                query,
                cosine: dot(vector, &query.vector),
            })
            .max_by(|a, b| {
                (a.cosine - a.query.threshold).total_cmp(&(b.cosine - b.query.threshold))
            })
    }

    /// The winning topic's label and score.
    fn topic<'r>(&self, rule: &'r TopicRule, vector: &[f32]) -> (&'r str, f32) {
        let mut scores: Vec<(&str, f32)> = rule
            .topics
            .iter()
            .map(|t| (t.label.as_str(), dot(vector, &t.prototype)))
            .collect();
        scores.sort_by(|a, b| b.1.total_cmp(&a.1));
        match scores.as_slice() {
            [] => (OTHER_TOPIC, 0.0),
            [(_, best), ..] if *best < rule.min_score => (OTHER_TOPIC, *best),
            [(_, best), (_, second), ..] if best - second <= TIE => (OTHER_TOPIC, *best),
            [(label, best), ..] => (label, *best),
        }
    }
}

impl BatchTransform for SemanticFilter {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn transform(
        &self,
        batch: RecordBatch,
        metrics: &StageCounters,
    ) -> Result<RecordBatch, OperatorError> {
        let rows = batch.num_rows();
        let vectors = batch
            .column_by_name(EMBEDDING)
            .and_then(|c| c.as_any().downcast_ref::<FixedSizeListArray>())
            .ok_or_else(|| OperatorError::StageSchema(format!("no `{EMBEDDING}` column")))?;
        let values = vectors
            .values()
            .as_any()
            .downcast_ref::<Float32Array>()
            .ok_or_else(|| OperatorError::StageSchema(format!("`{EMBEDDING}` is not f32")))?
            .values();
        let errors = batch.column_by_name(ERROR);

        let mut similarity = Float32Builder::with_capacity(rows);
        let mut matched = StringBuilder::new();
        let mut topic = StringBuilder::new();
        let mut topic_score = Float32Builder::with_capacity(rows);
        let mut kept = Vec::with_capacity(rows);
        let mut reason = StringBuilder::new();
        let mut filtered = 0;
        for row in 0..rows {
            let failed = errors.is_some_and(|e| e.is_valid(row));
            if failed || vectors.is_null(row) {
                similarity.append_null();
                matched.append_null();
                topic.append_null();
                topic_score.append_null();
                kept.push(false);
                reason.append_null();
                continue;
            }
            let vector = &values[row * self.dim..(row + 1) * self.dim];
            let mut reasons = Vec::new();
            let mut query_topic = None;
            match self.similarity(vector) {
                Some(v) => {
                    similarity.append_value(v.cosine);
                    if v.cosine >= v.query.threshold {
                        matched.append_value(&v.query.text);
                        query_topic = self.query_topics.get(v.index).map(|t| (t, &v.query.text));
                    } else {
                        matched.append_null();
                        reasons.push(format!(
                            "similarity {:.3} < {:.3} to nearest query {:?}",
                            v.cosine, v.query.threshold, v.query.text
                        ));
                    }
                }
                None => {
                    similarity.append_null();
                    matched.append_null();
                }
            }
            match &self.topics {
                Some(rule) => {
                    let (label, score) = self.topic(rule, vector);
                    topic.append_value(label);
                    topic_score.append_value(score);
                    reasons.extend(topic_reasons(label, &rule.allowed, query_topic));
                }
                None => {
                    topic.append_null();
                    topic_score.append_null();
                }
            }
            kept.push(reasons.is_empty());
            if reasons.is_empty() {
                reason.append_null();
            } else {
                filtered += 1;
                reason.append_value(reasons.join("; "));
            }
        }
        metrics.add_filtered(filtered);

        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        if self.topic_column {
            let topic: ArrayRef = Arc::new(topic.finish());
            match batch.schema().index_of(TOPIC) {
                Ok(i) => columns[i] = topic,
                Err(_) => columns.push(topic),
            }
        }
        columns.extend([
            Arc::new(similarity.finish()) as ArrayRef,
            Arc::new(matched.finish()),
            Arc::new(topic_score.finish()),
            Arc::new(BooleanArray::from(kept)),
            Arc::new(reason.finish()),
        ]);
        Ok(RecordBatch::try_new(Arc::clone(&self.schema), columns)?)
    }
}

/// Why a ticket of topic `label` is not kept: a topic not `allowed`, or not `wanted`, the
/// topic of the query it matched (`match = "query"`), given with that query.
fn topic_reasons(
    label: &str,
    allowed: &[String],
    query_topic: Option<(&String, &String)>,
) -> Vec<String> {
    let mut reasons = Vec::new();
    if !allowed.iter().any(|a| a == label) {
        reasons.push(format!("topic {label:?} not allowed"));
    }
    if let Some((wanted, query)) = query_topic
        && wanted != label
    {
        reasons.push(format!(
            "topic {label:?} is not {wanted:?}, the topic of matched query {query:?}"
        ));
    }
    reasons
}

/// Reads a string column by name, if it is one.
pub(crate) fn string_column<'b>(batch: &'b RecordBatch, name: &str) -> Option<&'b StringArray> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::embedding_field;

    fn kept_rows(batch: &RecordBatch) -> Option<&BooleanArray> {
        batch
            .column_by_name(KEPT)
            .and_then(|c| c.as_any().downcast_ref::<BooleanArray>())
    }

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = dot(v, v).sqrt();
        v.iter().map(|x| x / n).collect()
    }

    fn batch(vectors: &[Option<[f32; 2]>], errors: &[Option<&str>]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new(TOPIC, DataType::Utf8, true),
            Field::new(ERROR, DataType::Utf8, true),
            embedding_field(2),
        ]));
        let values: Vec<f32> = vectors
            .iter()
            .flat_map(|v| v.map(|v| unit(&v)).unwrap_or(vec![0.0, 0.0]))
            .collect();
        let list = FixedSizeListArray::try_new(
            Arc::new(Field::new("item", DataType::Float32, false)),
            2,
            Arc::new(Float32Array::from(values)),
            Some(vectors.iter().map(Option::is_some).collect()),
        )
        .unwrap();
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec![None::<&str>; vectors.len()])),
                Arc::new(StringArray::from(errors.to_vec())),
                Arc::new(list),
            ],
        )
        .unwrap()
    }

    fn run(filter: &TransformStage<SemanticFilter>, batch: RecordBatch) -> RecordBatch {
        filter
            .inner()
            .transform(batch, &StageCounters::default())
            .unwrap()
    }

    #[test]
    fn similarity_keeps_by_per_query_threshold_and_reports_the_best_margin() {
        let input = batch(
            &[Some([1.0, 0.1]), Some([0.2, 1.0]), Some([1.0, 1.0]), None],
            &[None, None, None, Some("empty text")],
        );
        let queries = vec![
            Query {
                text: "x".into(),
                vector: vec![1.0, 0.0],
                threshold: 0.9,
            },
            Query {
                text: "y".into(),
                vector: vec![0.0, 1.0],
                threshold: 0.99,
            },
        ];
        let filter = SemanticFilter::try_new(&input.schema(), queries, Topics::NoRule).unwrap();
        let out = run(&filter, input);
        let kept = kept_rows(&out).unwrap();
        assert_eq!(
            kept.iter().collect::<Vec<_>>(),
            [Some(true), Some(false), Some(false), Some(false)]
        );
        let matched = string_column(&out, MATCHED_QUERY).unwrap();
        assert_eq!(matched.value(0), "x");
        assert!(matched.is_null(1) && matched.is_null(3));
        let reason = string_column(&out, FILTER_REASON).unwrap();
        assert!(reason.value(1).contains("\"y\""), "{}", reason.value(1));
        assert!(reason.is_null(0), "kept rows have no reason");
        assert!(reason.is_null(3), "failed rows keep their own error");
        let similarity = out.column_by_name(SIMILARITY).unwrap();
        assert!(similarity.is_null(3));
    }

    #[test]
    fn topic_is_nearest_prototype_with_ties_and_weak_scores_as_other() {
        let input = batch(
            &[
                Some([1.0, 0.05]),
                Some([1.0, 1.0]),
                Some([-1.0, -0.2]),
                Some([0.1, 1.0]),
            ],
            &[None; 4],
        );
        let rule = TopicRule {
            topics: vec![
                Topic {
                    label: "printing".into(),
                    prototype: vec![1.0, 0.0],
                },
                Topic {
                    label: "network".into(),
                    prototype: vec![0.0, 1.0],
                },
            ],
            min_score: 0.3,
            allowed: vec!["printing".into(), OTHER_TOPIC.into()],
            match_query: false,
        };
        let filter =
            SemanticFilter::try_new(&input.schema(), vec![], Topics::Prototypes(rule)).unwrap();
        let out = run(&filter, input);
        let topics = string_column(&out, TOPIC).unwrap();
        let topics: Vec<_> = topics.iter().flatten().collect();
        assert_eq!(topics, ["printing", OTHER_TOPIC, OTHER_TOPIC, "network"]);
        let kept = kept_rows(&out).unwrap();
        assert_eq!(
            kept.iter().collect::<Vec<_>>(),
            [Some(true), Some(true), Some(true), Some(false)]
        );
        assert_eq!(out.num_columns(), 3 + 5, "topic replaced in place");
        assert!(out.column_by_name(SIMILARITY).unwrap().is_null(0));
    }

    #[test]
    fn matching_the_query_keeps_tickets_of_its_matched_querys_topic() {
        // Queries along the axes, prototypes turned away from them: the third ticket is
        // nearest the printer query but of topic network.
        let input = batch(
            &[Some([1.0, 0.1]), Some([0.1, 1.0]), Some([0.75, 0.7])],
            &[None; 3],
        );
        let query = |text: &str, v: [f32; 2]| Query {
            text: text.into(),
            vector: unit(&v),
            threshold: 0.1,
        };
        let queries = vec![query("printer", [1.0, 0.0]), query("vpn", [0.0, 1.0])];
        let rule = |match_query| TopicRule {
            topics: vec![
                Topic {
                    label: "printing".into(),
                    prototype: unit(&[1.0, -0.5]),
                },
                Topic {
                    label: "network".into(),
                    prototype: unit(&[0.5, 1.0]),
                },
            ],
            min_score: 0.3,
            allowed: vec!["printing".into(), "network".into()],
            match_query,
        };
        let loose = SemanticFilter::try_new(
            &input.schema(),
            queries.clone(),
            Topics::Prototypes(rule(false)),
        );
        let out = run(&loose.unwrap(), input.clone());
        assert_eq!(kept_rows(&out).unwrap().true_count(), 3);

        let strict =
            SemanticFilter::try_new(&input.schema(), queries, Topics::Prototypes(rule(true)))
                .unwrap();
        let out = run(&strict, input);
        let topics: Vec<_> = string_column(&out, TOPIC).unwrap().iter().collect();
        let matched: Vec<_> = string_column(&out, MATCHED_QUERY).unwrap().iter().collect();
        let kept: Vec<_> = kept_rows(&out).unwrap().iter().collect();
        assert_eq!(topics, [Some("printing"), Some("network"), Some("network")]);
        assert_eq!(matched, [Some("printer"), Some("vpn"), Some("printer")]);
        assert_eq!(kept, [Some(true), Some(true), Some(false)]);
        let reason = string_column(&out, FILTER_REASON).unwrap().value(2);
        assert_eq!(
            reason,
            "topic \"network\" is not \"printing\", the topic of matched query \"printer\""
        );
    }

    #[test]
    fn vectors_of_another_length_are_refused() {
        let input = batch(&[Some([1.0, 0.0])], &[None]);
        let query = Query {
            text: "x".into(),
            vector: vec![1.0, 0.0, 0.0],
            threshold: 0.5,
        };
        assert!(SemanticFilter::try_new(&input.schema(), vec![query], Topics::NoRule).is_err());
    }
}
