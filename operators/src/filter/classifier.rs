//! `[filter.topics] method = "classifier"`: the topic rule by the summarizer model, the
//! design's second step after the similarity threshold.
//!
//! Only the tickets the filter kept are classified: the model is the costly part, and a
//! ticket the similarity rule dropped stays dropped whatever its topic, so theirs stays
//! NULL. Decoding is restricted to the labels' tokens
//! ([`abridge_models::generator::Generator::choose`]) rather than each label's likelihood
//! scored: one short greedy decode per ticket, batched with the others at the engine,
//! instead of one prefill per label, and the answer is always a label, never free text
//! (nor `other`, which only prototypes give). A ticket whose topic is not allowed, or
//! (`match = "query"`) is not the topic of the query it matched, is dropped with the
//! reason in `filter_reason`; a ticket the model fails on is a failed row, its reason in
//! `error`.

use std::collections::HashMap;
use std::sync::Arc;

use abridge_models::generator::{Generation, GeneratorError, SharedGenerator};
use abridge_schemas::TicketColumn;
use abridge_schemas::output::ERROR;
use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use futures::future::BoxFuture;

use super::{FILTER_REASON, KEPT, MATCHED_QUERY, TOPIC, topic_reasons};
use crate::tasks::{TaskSettings, classify_each};
use crate::{AsyncBatchTransform, AsyncTransformStage, OperatorError, StageCounters};

/// What the classifier decides with.
#[derive(Debug, Clone)]
pub struct ClassifierRule {
    /// The topics the model chooses from.
    pub labels: Vec<String>,
    /// Topics whose tickets are kept.
    pub allowed: Vec<String>,
    /// Keep a ticket only when its topic is that of the query it matched.
    pub match_query: bool,
}

/// The `topics` stage: runs after the filter, on its output schema.
pub struct TopicClassifier {
    generator: SharedGenerator,
    labels: Arc<[String]>,
    allowed: Vec<String>,
    /// Each similarity query's topic, by the query's text (`match = "query"`).
    query_topics: HashMap<String, String>,
    settings: TaskSettings,
    columns: Columns,
    schema: SchemaRef,
}

/// Where the columns the classifier reads and rewrites are.
struct Columns {
    text: usize,
    topic: usize,
    kept: usize,
    reason: usize,
    matched: usize,
    error: usize,
}

impl TopicClassifier {
    /// A classifier over the filter's output `input`; with `match_query`, each of
    /// `queries` is classified here, once, as a ticket would be.
    pub async fn try_new(
        generator: SharedGenerator,
        rule: ClassifierRule,
        queries: &[String],
        settings: TaskSettings,
        input: &SchemaRef,
    ) -> Result<AsyncTransformStage<Self>, OperatorError> {
        let column = |name: &str| {
            input.index_of(name).map_err(|_| {
                OperatorError::StageSchema(format!(
                    "the topic classifier needs a `{name}` column (it runs after the filter)"
                ))
            })
        };
        let columns = Columns {
            text: column(TicketColumn::Text.name())?,
            topic: column(TOPIC)?,
            kept: column(KEPT)?,
            reason: column(FILTER_REASON)?,
            matched: column(MATCHED_QUERY)?,
            error: column(ERROR)?,
        };
        let labels: Arc<[String]> = rule.labels.into();
        let mut query_topics = HashMap::new();
        if rule.match_query {
            let answers =
                classify_each(&generator, queries.to_vec(), Arc::clone(&labels), &settings).await;
            for (query, answer) in queries.iter().zip(answers) {
                let topic = label_of(answer, &labels).map_err(|reason| {
                    OperatorError::Generator(Box::new(GeneratorError::Request(format!(
                        "classifying the query {query:?}: {reason}"
                    ))))
                })?;
                query_topics.insert(query.clone(), topic);
            }
        }
        let classifier = Self {
            generator,
            labels,
            allowed: rule.allowed,
            query_topics,
            settings,
            columns,
            schema: Arc::clone(input),
        };
        Ok(AsyncTransformStage::new("topics", classifier))
    }

    /// Each similarity query's topic, as the model decided it (`match = "query"`).
    pub fn query_topics(&self) -> &HashMap<String, String> {
        &self.query_topics
    }
}

/// The label a classification answered, or why there is none.
fn label_of(
    answer: Result<Generation, GeneratorError>,
    labels: &[String],
) -> Result<String, String> {
    match answer {
        Ok(g) if labels.contains(&g.text) => Ok(g.text),
        Ok(g) => Err(format!("the model answered {:?}, not a label", g.text)),
        Err(e) => Err(e.to_string()),
    }
}

impl AsyncBatchTransform for TopicClassifier {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn transform<'a>(
        &'a self,
        batch: RecordBatch,
        metrics: &'a StageCounters,
    ) -> BoxFuture<'a, Result<RecordBatch, OperatorError>> {
        Box::pin(self.classify_batch(batch, metrics))
    }
}

/// A string column as owned values, to rewrite some of them.
fn strings(batch: &RecordBatch, column: usize) -> Result<Vec<Option<String>>, OperatorError> {
    let values = cast(batch.column(column), &DataType::Utf8)?;
    Ok(values
        .as_string::<i32>()
        .iter()
        .map(|v| v.map(str::to_string))
        .collect())
}

impl TopicClassifier {
    async fn classify_batch(
        &self,
        batch: RecordBatch,
        metrics: &StageCounters,
    ) -> Result<RecordBatch, OperatorError> {
        let c = &self.columns;
        let kept = batch
            .column(c.kept)
            .as_boolean_opt()
            .ok_or_else(|| OperatorError::StageSchema(format!("`{KEPT}` is not boolean")))?;
        let rows: Vec<usize> = (0..batch.num_rows())
            .filter(|&r| kept.is_valid(r) && kept.value(r))
            .collect();
        if rows.is_empty() {
            return Ok(batch);
        }
        let texts = strings(&batch, c.text)?;
        let asked = rows
            .iter()
            .map(|&r| texts[r].clone().unwrap_or_default())
            .collect();
        let answers = classify_each(
            &self.generator,
            asked,
            Arc::clone(&self.labels),
            &self.settings,
        )
        .await;

        let mut kept: Vec<Option<bool>> = kept.iter().collect();
        let mut topic = strings(&batch, c.topic)?;
        let mut reason = strings(&batch, c.reason)?;
        let mut error = strings(&batch, c.error)?;
        let matched = strings(&batch, c.matched)?;
        let (mut filtered, mut failed) = (0, 0);
        for (&row, answer) in rows.iter().zip(answers) {
            match label_of(answer, &self.labels) {
                Ok(label) => {
                    let query_topic = matched[row]
                        .as_ref()
                        .and_then(|q| self.query_topics.get(q).map(|t| (t, q)));
                    let reasons = topic_reasons(&label, &self.allowed, query_topic);
                    if !reasons.is_empty() {
                        kept[row] = Some(false);
                        reason[row] = Some(reasons.join("; "));
                        filtered += 1;
                    }
                    topic[row] = Some(label);
                }
                Err(why) => {
                    kept[row] = Some(false);
                    error[row] = Some(format!("filter: classifying the topic: {why}"));
                    failed += 1;
                }
            }
        }
        metrics.add_filtered(filtered);
        metrics.add_failed(failed);
        let mut columns = batch.columns().to_vec();
        columns[c.kept] = Arc::new(BooleanArray::from(kept)) as ArrayRef;
        columns[c.topic] = Arc::new(StringArray::from(topic));
        columns[c.reason] = Arc::new(StringArray::from(reason));
        columns[c.error] = Arc::new(StringArray::from(error));
        Ok(RecordBatch::try_new(batch.schema(), columns)?)
    }
}
