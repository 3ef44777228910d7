//! `extract`: typed fields of each kept ticket, from the summarizer model answering
//! SeqGPT's extraction question (抽取 with the `seqgpt` backend, an English instruction
//! with the others; greedy), one `name: value` line per field, read strictly
//! ([`parse_fields`]: a field missing, twice or not asked for is never guessed at).
//!
//! Writes `extracted`, a struct of the fields (text; NULL where the text does not say),
//! and `extract_error`, why a row has none, with the model's raw answer. Its own column,
//! not `error`: a ticket whose extraction fails keeps its summary and metrics. Rows that
//! failed before, or that the filter did not keep, pass through with both NULL.

use std::sync::Arc;

use abridge_models::generator::SharedGenerator;
use abridge_schemas::TicketColumn;
use abridge_schemas::output::ERROR;
use arrow::array::{Array, AsArray, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::filter::KEPT;
use crate::stage::{BuildContext, JobView, Stage, StageSection};
use crate::tasks::{TaskSettings, check_field_names, extract_each, fields_array, parse_fields};
use crate::{AsyncBatchTransform, AsyncTransformStage, OperatorError, StageCounters};

/// Column: the extracted fields, a struct of text fields named as in `[extract] fields`.
pub const EXTRACTED: &str = "extracted";
/// Column: why a kept ticket has no `extracted` (the model's answer included).
pub const EXTRACT_ERROR: &str = "extract_error";

/// `[extract]`: fields the `[summarize]` model reads out of each kept ticket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtractConfig {
    /// The fields' names, as the model is asked for them and as `extracted`'s fields are
    /// named (query them as `extracted['name']`): e.g. `["device", "location"]`, or
    /// SeqGPT's Chinese `["设备", "地点"]`.
    pub fields: Vec<String>,
    /// Most tokens of one value: fields are short spans of the ticket, and a small model
    /// that does not stop costs no more than this. Default: 16.
    #[serde(default = "default_max_value_tokens")]
    pub max_value_tokens: usize,
}

fn default_max_value_tokens() -> usize {
    16
}

impl StageSection for ExtractConfig {
    const SECTION: &'static str = "extract";
    const COLUMNS: &'static [&'static str] = &[EXTRACTED, EXTRACT_ERROR];
}

impl Stage for ExtractConfig {
    fn validate(&self, job: &JobView<'_>) -> Result<(), OperatorError> {
        ExtractConfig::validate(self)?;
        job.require(
            "summarize",
            "extract",
            "asks the summarizer model: add a [summarize] section",
        )
    }

    /// Asks the summarizer's model, after the summary and its measures.
    fn build<'a>(
        &'a self,
        ctx: &'a mut BuildContext<'_>,
    ) -> BoxFuture<'a, Result<(), OperatorError>> {
        Box::pin(async move {
            let summarize = ctx.job.summarize.ok_or_else(|| {
                OperatorError::config(
                    "extract",
                    "asks the summarizer model: add a [summarize] section",
                )
            })?;
            let generator = ctx.generator().await?;
            let stage = self.operator(generator, summarize.task_settings(), &ctx.schema())?;
            ctx.push(stage);
            Ok(())
        })
    }
}

impl ExtractConfig {
    /// Why this section cannot be used, naming the key.
    pub fn validate(&self) -> Result<(), OperatorError> {
        if self.max_value_tokens == 0 {
            return Err(OperatorError::config(
                "extract.max_value_tokens",
                "must be at least 1",
            ));
        }
        check_field_names(&self.fields).map_err(|problem| {
            OperatorError::config("extract.fields", format!("the list {problem}"))
        })
    }

    /// The stage over `input`, asking `generator` (the summarizer's) as `settings` say,
    /// each value within `max_value_tokens`.
    pub fn operator(
        &self,
        generator: SharedGenerator,
        settings: TaskSettings,
        input: &SchemaRef,
    ) -> Result<AsyncTransformStage<FieldExtractor>, OperatorError> {
        self.validate()?;
        let settings = TaskSettings {
            max_new_tokens: self.max_value_tokens,
            ..settings
        };
        let text = input
            .index_of(TicketColumn::Text.name())
            .map_err(|_| OperatorError::StageSchema("extract needs a `text` column".into()))?;
        for name in [EXTRACTED, EXTRACT_ERROR] {
            if input.index_of(name).is_ok() {
                return Err(OperatorError::StageSchema(format!(
                    "the input already has a `{name}` column, which extract writes"
                )));
            }
        }
        let fields: Fields = self
            .fields
            .iter()
            .map(|n| Field::new(n, DataType::Utf8, true))
            .collect();
        let mut columns: Vec<_> = input.fields().iter().cloned().collect();
        columns.push(Arc::new(Field::new(
            EXTRACTED,
            DataType::Struct(fields.clone()),
            true,
        )));
        columns.push(Arc::new(Field::new(EXTRACT_ERROR, DataType::Utf8, true)));
        let extractor = FieldExtractor {
            generator,
            names: self.fields.clone().into(),
            fields,
            settings,
            text,
            schema: Arc::new(Schema::new_with_metadata(columns, input.metadata().clone())),
        };
        Ok(AsyncTransformStage::new("extract", extractor))
    }
}

/// The `extract` stage.
pub struct FieldExtractor {
    generator: SharedGenerator,
    names: Arc<[String]>,
    fields: Fields,
    settings: TaskSettings,
    text: usize,
    schema: SchemaRef,
}

impl AsyncBatchTransform for FieldExtractor {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn transform<'a>(
        &'a self,
        batch: RecordBatch,
        _: &'a StageCounters,
    ) -> BoxFuture<'a, Result<RecordBatch, OperatorError>> {
        Box::pin(self.extract_batch(batch))
    }
}

impl FieldExtractor {
    async fn extract_batch(&self, batch: RecordBatch) -> Result<RecordBatch, OperatorError> {
        let n = batch.num_rows();
        let errors = batch.column_by_name(ERROR);
        let kept = batch.column_by_name(KEPT).and_then(|k| k.as_boolean_opt());
        let rows: Vec<usize> = (0..n)
            .filter(|&r| errors.is_none_or(|e| e.is_null(r)))
            .filter(|&r| kept.is_none_or(|k| k.is_valid(r) && k.value(r)))
            .collect();
        let texts = cast(batch.column(self.text), &DataType::Utf8)?;
        let texts = texts.as_string::<i32>();
        let asked = rows
            .iter()
            .map(|&r| match texts.is_valid(r) {
                true => texts.value(r).to_string(),
                false => String::new(),
            })
            .collect();
        let answers = extract_each(
            &self.generator,
            asked,
            Arc::clone(&self.names),
            &self.settings,
        )
        .await;

        let mut values: Vec<Option<Vec<Option<String>>>> = vec![None; n];
        let mut problems: Vec<Option<String>> = vec![None; n];
        for (&row, answer) in rows.iter().zip(answers) {
            let parsed = match answer {
                Ok(g) => parse_fields(&g.text, &self.names)
                    .map_err(|reason| format!("extract: {reason} (answer: {:?})", g.text)),
                Err(e) => Err(format!("extract: {e}")),
            };
            match parsed {
                Ok(fields) => values[row] = Some(fields),
                Err(reason) => problems[row] = Some(reason),
            }
        }
        let extracted = fields_array(&self.fields, &values)?;
        let mut columns = batch.columns().to_vec();
        columns.push(Arc::new(extracted));
        columns.push(Arc::new(StringArray::from(problems)));
        Ok(RecordBatch::try_new(Arc::clone(&self.schema), columns)?)
    }
}
