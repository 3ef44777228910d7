//! `metrics` (DESIGN.md): the health measures of every summary, as columns of its row,
//! so that a nightly run can be trusted (or questioned) with a SQL query instead of by
//! reading it.
//!
//! | column | what |
//! | --- | --- |
//! | `rouge1`, `rouge2`, `rouge_l` | F1 against the `reference` column (when the input has one) |
//! | `drift` | cosine of the ticket's vector (`embedding`) and the summary's (`summary_embedding`) |
//! | `compression` | characters of the summary per character of the text the model saw (its head, when the prompt's token budget cut it: `text_cut_chars`) |
//! | `stability` | spread of ROUGE-L over the row's sampled summaries ([`measures::stability`]) |
//! | `alerts` | the thresholds the row crossed ([`AlertThresholds`]) |
//!
//! Each measure is null where its inputs are: rows without a summary (failed, or not kept
//! by the filter), inputs without a reference, runs without sampling. The module is named
//! `quality` because `metrics` already names the operators' own counters.

pub mod functions;
pub mod measures;
mod porter;
pub mod rouge;

use std::sync::Arc;

use abridge_schemas::TicketColumn;
use arrow::array::{
    Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array, Float64Builder, ListArray,
    ListBuilder, StringArray, StringBuilder,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;

pub use measures::AlertThresholds;

use crate::embed::{EMBEDDING, Embed, SUMMARY_EMBEDDING, SUMMARY_EMBEDDING_CUT_TOKENS};
use crate::stage::{BuildContext, JobView, Stage, StageSection};
use crate::summarize::{SUMMARY, SUMMARY_SAMPLES, TEXT_CUT_CHARS};
use crate::{BatchTransform, OperatorError, StageCounters, TransformStage};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// Column: ROUGE-1 F1 against the reference.
pub const ROUGE1: &str = "rouge1";
/// Column: ROUGE-2 F1 against the reference.
pub const ROUGE2: &str = "rouge2";
/// Column: ROUGE-L F1 against the reference.
pub const ROUGE_L: &str = "rouge_l";
/// Column: cosine(ticket vector, summary vector).
pub const DRIFT: &str = "drift";
/// Column: characters of summary / characters of text.
pub const COMPRESSION: &str = "compression";
/// Column: standard deviation of ROUGE-L F1 over the sampled summaries.
pub const STABILITY: &str = "stability";
/// Column: the alerts the row raised.
pub const ALERTS: &str = "alerts";

/// `[metrics]`: the health measures written beside every summary (DESIGN.md).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Porter-stem words before ROUGE (rouge-score's `use_stemmer`). Default: false.
    #[serde(default)]
    pub stem: bool,
    /// Summaries drawn per ticket to measure `stability`; 1 (the default) turns it off.
    /// Each extra draw costs a generation, and draws differ only with temperature > 0.
    #[serde(default = "default_stability_samples")]
    pub stability_samples: usize,
    /// Thresholds of the `alerts` column: `drift_min` (0.45), `compression_min` (0.12),
    /// `compression_max` (0.35), `stability_max` (0.03).
    #[serde(default)]
    pub alerts: AlertThresholds,
}

fn default_stability_samples() -> usize {
    1
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            stem: false,
            stability_samples: default_stability_samples(),
            alerts: AlertThresholds::default(),
        }
    }
}

/// The `metrics` stage: adds the measure columns to every batch.
pub struct QualityMetrics {
    settings: MetricsConfig,
    columns: Columns,
    schema: SchemaRef,
}

/// Where the stage's inputs are in the batch (absent optional inputs are None).
struct Columns {
    text: usize,
    summary: usize,
    reference: Option<usize>,
    embedding: Option<usize>,
    summary_embedding: Option<usize>,
    samples: Option<usize>,
    text_cut_chars: Option<usize>,
}

impl StageSection for MetricsConfig {
    const SECTION: &'static str = "metrics";
    const COLUMNS: &'static [&'static str] = &[
        SUMMARY_EMBEDDING,
        SUMMARY_EMBEDDING_CUT_TOKENS,
        DRIFT,
        COMPRESSION,
        STABILITY,
        ROUGE1,
        ROUGE2,
        ROUGE_L,
        ALERTS,
    ];
}

impl Stage for MetricsConfig {
    fn validate(&self, job: &JobView<'_>) -> Result<(), OperatorError> {
        MetricsConfig::validate(self)?;
        let samples = self.stability_samples;
        if samples > 1 && job.summarize.is_some_and(|s| s.temperature == 0.0) {
            return Err(OperatorError::config(
                "metrics.stability_samples",
                format!(
                    "is {samples}, but summarize.temperature is 0: greedy decoding draws the \
                     same summary every time, so stability would be 0 for {samples}x the work; \
                     raise the temperature or set stability_samples = 1"
                ),
            ));
        }
        Ok(())
    }

    /// The measures run whenever `[summarize]` does: the summaries' vectors by the
    /// `embed` encoder (for `drift`), where there is one, then `metrics`.
    fn build<'a>(
        &'a self,
        ctx: &'a mut BuildContext<'_>,
    ) -> BoxFuture<'a, Result<(), OperatorError>> {
        Box::pin(async move {
            if !ctx.job.has("summarize") {
                return Ok(());
            }
            if ctx.has_encoder() {
                let stage = Embed::summaries(ctx.encoder()?, &ctx.schema())?;
                ctx.push(stage);
            }
            let stage = self.operator(&ctx.schema())?;
            ctx.push(stage);
            Ok(())
        })
    }
}

impl MetricsConfig {
    /// Why this section cannot be used, naming the key.
    pub fn validate(&self) -> Result<(), OperatorError> {
        if self.stability_samples == 0 {
            return Err(OperatorError::config(
                "metrics.stability_samples",
                "must be at least 1",
            ));
        }
        self.alerts
            .validate()
            .map_err(|message| OperatorError::config("metrics.alerts", message))
    }

    /// The `metrics` stage over streams of `input`, which must hold `text` and `summary`.
    pub fn operator(
        &self,
        input: &SchemaRef,
    ) -> Result<TransformStage<QualityMetrics>, OperatorError> {
        let settings = *self;
        let find = |name: &str| input.index_of(name).ok();
        let need = |name: &str| {
            find(name).ok_or_else(|| {
                OperatorError::StageSchema(format!("metrics need a `{name}` column"))
            })
        };
        let vectors = |name: &str| -> Result<Option<usize>, OperatorError> {
            match find(name) {
                Some(i) if matches!(input.field(i).data_type(), DataType::FixedSizeList(item, _) if item.data_type() == &DataType::Float32) => {
                    Ok(Some(i))
                }
                Some(i) => Err(OperatorError::StageSchema(format!(
                    "`{name}` is {}, not a list of f32",
                    input.field(i).data_type()
                ))),
                None => Ok(None),
            }
        };
        let columns = Columns {
            text: need(TicketColumn::Text.name())?,
            summary: need(SUMMARY)?,
            reference: find(TicketColumn::Reference.name()),
            embedding: vectors(EMBEDDING)?,
            summary_embedding: vectors(SUMMARY_EMBEDDING)?,
            samples: find(SUMMARY_SAMPLES),
            text_cut_chars: find(TEXT_CUT_CHARS),
        };
        let mut fields: Vec<_> = input.fields().iter().cloned().collect();
        fields.extend(output_fields().into_iter().map(Arc::new));
        let schema = Arc::new(Schema::new_with_metadata(fields, input.metadata().clone()));
        Ok(TransformStage::new(
            "metrics",
            QualityMetrics {
                settings,
                columns,
                schema,
            },
        ))
    }
}

fn output_fields() -> Vec<Field> {
    let mut fields: Vec<Field> = [ROUGE1, ROUGE2, ROUGE_L, DRIFT, COMPRESSION, STABILITY]
        .iter()
        .map(|name| Field::new(*name, DataType::Float64, true))
        .collect();
    fields.push(Field::new(
        ALERTS,
        DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
        true,
    ));
    fields
}

/// `column` as text, whatever string type the batch has it in.
fn strings(batch: &RecordBatch, column: usize) -> Result<StringArray, OperatorError> {
    Ok(cast(batch.column(column), &DataType::Utf8)?
        .as_string::<i32>()
        .clone())
}

fn value(array: &StringArray, row: usize) -> Option<&str> {
    array.is_valid(row).then(|| array.value(row))
}

/// `text` less its last `cut` characters.
fn head_chars(text: &str, cut: usize) -> &str {
    if cut == 0 {
        return text;
    }
    let keep = text.chars().count().saturating_sub(cut);
    text.char_indices()
        .nth(keep)
        .map_or(text, |(end, _)| &text[..end])
}

/// Row `row` of a vector column, if present and not null.
fn vector(array: Option<&FixedSizeListArray>, row: usize) -> Option<&[f32]> {
    let array = array?;
    if array.is_null(row) {
        return None;
    }
    let size = array.value_length() as usize;
    let values = array.values().as_any().downcast_ref::<Float32Array>()?;
    Some(&values.values()[row * size..(row + 1) * size])
}

impl BatchTransform for QualityMetrics {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn transform(
        &self,
        batch: RecordBatch,
        _metrics: &StageCounters,
    ) -> Result<RecordBatch, OperatorError> {
        let rows = batch.num_rows();
        let c = &self.columns;
        let text = strings(&batch, c.text)?;
        let summary = strings(&batch, c.summary)?;
        let reference = c.reference.map(|i| strings(&batch, i)).transpose()?;
        let fixed = |i: Option<usize>| {
            i.and_then(|i| {
                batch
                    .column(i)
                    .as_any()
                    .downcast_ref::<FixedSizeListArray>()
            })
        };
        let (embedding, summary_embedding) = (fixed(c.embedding), fixed(c.summary_embedding));
        let samples = c
            .samples
            .and_then(|i| batch.column(i).as_any().downcast_ref::<ListArray>());
        let cut_chars = c
            .text_cut_chars
            .map(|i| cast(batch.column(i), &DataType::Int64))
            .transpose()?;
        let cut_chars = cut_chars.as_ref().map(|a| a.as_primitive::<Int64Type>());

        let mut rouge: [Float64Builder; 3] = std::array::from_fn(|_| Float64Builder::new());
        let mut drift = Float64Builder::with_capacity(rows);
        let mut compression = Float64Builder::with_capacity(rows);
        let mut stability = Float64Builder::with_capacity(rows);
        let mut alerts = ListBuilder::new(StringBuilder::new());
        let stem = self.settings.stem;
        for row in 0..rows {
            let Some(summary) = value(&summary, row) else {
                rouge.iter_mut().for_each(Float64Builder::append_null);
                drift.append_null();
                compression.append_null();
                stability.append_null();
                alerts.append_null();
                continue;
            };
            let text = value(&text, row).unwrap_or_default();
            let reference = reference.as_ref().and_then(|r| value(r, row));
            match reference {
                Some(reference) => {
                    for (builder, score) in rouge
                        .iter_mut()
                        .zip(rouge::rouge_all(summary, reference, stem))
                    {
                        builder.append_value(score.f1);
                    }
                }
                None => rouge.iter_mut().for_each(Float64Builder::append_null),
            }
            let d = vector(embedding, row)
                .zip(vector(summary_embedding, row))
                .and_then(|(a, b)| measures::cosine(a, b));
            let cut = cut_chars
                .filter(|c| c.is_valid(row))
                .map_or(0, |c| usize::try_from(c.value(row)).unwrap_or(0));
            let ratio = measures::compression(summary, head_chars(text, cut));
            let spread = samples.filter(|s| s.is_valid(row)).and_then(|s| {
                let others = s.value(row);
                let others = others.as_string::<i32>();
                let mut all = vec![summary];
                all.extend(others.iter().flatten());
                measures::stability(&all, reference.unwrap_or(text), stem)
            });
            drift.append_option(d);
            compression.append_option(ratio);
            stability.append_option(spread);
            alerts.append_value(
                self.settings
                    .alerts
                    .alerts(d, ratio, spread)
                    .into_iter()
                    .map(Some),
            );
        }
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        columns.extend(rouge.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
        columns.push(Arc::new(drift.finish()));
        columns.push(Arc::new(compression.finish()));
        columns.push(Arc::new(stability.finish()));
        columns.push(Arc::new(alerts.finish()));
        Ok(RecordBatch::try_new(Arc::clone(&self.schema), columns)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::embedding_field;
    use arrow::array::{ListBuilder, StringBuilder};
    use arrow::datatypes::Float64Type;

    fn vectors(name: &str, rows: &[Option<[f32; 2]>]) -> (Field, ArrayRef) {
        let field = embedding_field(2).with_name(name);
        let values: Vec<f32> = rows.iter().flat_map(|r| r.unwrap_or([0.0, 0.0])).collect();
        let array = FixedSizeListArray::try_new(
            Arc::new(Field::new("item", DataType::Float32, false)),
            2,
            Arc::new(Float32Array::from(values)),
            Some(rows.iter().map(Option::is_some).collect()),
        )
        .unwrap();
        (field, Arc::new(array))
    }

    #[test]
    fn compression_is_against_the_text_the_prompt_held() {
        assert_eq!(head_chars("打印机离线了", 2), "打印机离");
        assert_eq!(head_chars("abc", 0), "abc");
        assert_eq!(head_chars("abc", 9), "");
        let schema = Arc::new(Schema::new(vec![
            Field::new("text", DataType::Utf8, true),
            Field::new(SUMMARY, DataType::Utf8, true),
            Field::new(TEXT_CUT_CHARS, DataType::Int32, true),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(StringArray::from(vec!["abcdefghij", "abcdefghij"])),
                Arc::new(StringArray::from(vec!["ab", "ab"])),
                Arc::new(arrow::array::Int32Array::from(vec![Some(6), None])),
            ],
        )
        .unwrap();
        let out = measure_default(&schema, batch);
        let compression = out
            .column_by_name(COMPRESSION)
            .unwrap()
            .as_primitive::<Float64Type>()
            .clone();
        // 2 of the 4 characters the model saw; 2 of 10 where nothing was cut.
        assert_eq!(compression.values().to_vec(), [0.5, 0.2]);
    }

    /// `batch` through the metrics stage with the default settings.
    fn measure_default(schema: &SchemaRef, batch: RecordBatch) -> RecordBatch {
        let stage = MetricsConfig::default().operator(schema).unwrap();
        stage
            .inner()
            .transform(batch, &StageCounters::default())
            .unwrap()
    }

    #[test]
    fn measures_each_summarized_row_and_nulls_the_rest() {
        let text = StringArray::from(vec![
            Some("the printer on floor two is offline again"),
            Some("VPN drops"),
            Some("never summarized"),
        ]);
        let summary = StringArray::from(vec![Some("printer offline"), Some("VPN drops"), None]);
        let reference = StringArray::from(vec![Some("printer is offline"), None, Some("x")]);
        let (ef, e) = vectors(EMBEDDING, &[Some([1.0, 0.0]), Some([1.0, 0.0]), None]);
        let (sf, se) = vectors(
            SUMMARY_EMBEDDING,
            &[Some([0.0, 1.0]), Some([1.0, 1.0]), None],
        );
        let mut samples = ListBuilder::new(StringBuilder::new());
        samples.append_value([Some("the printer is broken")]);
        samples.append_value([Some("VPN drops")]);
        samples.append_null();
        let samples: ArrayRef = Arc::new(samples.finish());
        let schema = Arc::new(Schema::new(vec![
            Field::new("text", DataType::Utf8, true),
            Field::new(SUMMARY, DataType::Utf8, true),
            Field::new("reference", DataType::Utf8, true),
            ef,
            sf,
            Field::new(SUMMARY_SAMPLES, samples.data_type().clone(), true),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(text),
                Arc::new(summary),
                Arc::new(reference),
                e,
                se,
                samples,
            ],
        )
        .unwrap();
        let out = measure_default(&schema, batch);
        let column = |name: &str| {
            out.column_by_name(name)
                .unwrap()
                .as_primitive::<Float64Type>()
                .clone()
        };
        let (r1, rl) = (column(ROUGE1), column(ROUGE_L));
        // "printer offline" vs "printer is offline": P 2/2, R 2/3.
        assert!((r1.value(0) - 0.8).abs() < 1e-12 && (rl.value(0) - 0.8).abs() < 1e-12);
        assert!(
            r1.is_null(1) && r1.is_null(2),
            "no reference, no summary: null"
        );
        let drift = column(DRIFT);
        assert_eq!(drift.value(0), 0.0);
        assert!((drift.value(1) - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-6);
        assert!(drift.is_null(2));
        let compression = column(COMPRESSION);
        assert!((compression.value(0) - 15.0 / 41.0).abs() < 1e-12);
        assert_eq!(compression.value(1), 1.0);
        let stability = column(STABILITY);
        assert!(stability.value(0) > 0.0, "two different draws");
        assert_eq!(stability.value(1), 0.0, "the same draw twice");
        let alerts = out.column_by_name(ALERTS).unwrap().as_list::<i32>();
        let fired = |row: usize| -> Vec<String> {
            let list = alerts.value(row);
            list.as_string::<i32>()
                .iter()
                .flatten()
                .map(String::from)
                .collect()
        };
        assert_eq!(fired(0), ["drift", "compression_high", "stability"]);
        assert_eq!(fired(1), ["compression_high"]);
        assert!(alerts.is_null(2));
    }

    #[test]
    fn refuses_inputs_without_text_or_summary() {
        let schema = Arc::new(Schema::new(vec![Field::new("text", DataType::Utf8, true)]));
        assert!(MetricsConfig::default().operator(&schema).is_err());
    }
}
