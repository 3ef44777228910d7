//! `embed`: one sentence vector per ticket, kept in the output as `embedding`
//! (FixedSizeList<Float32, D>), so that filters, the index and later evaluations never
//! need to embed the same text again.
//!
//! What is embedded is `text`, or a template over the row's columns (`{title}\n{text}`).
//! Rows that already failed (their `error` is set), or whose template columns are all
//! null, get a null embedding. The same stage, on `{summary}`, writes `summary_embedding`
//! for the `drift` metric. Beside each vector column, `<column>_cut_tokens` says how many
//! tokens the encoder's length limit cut from the end of the text: a long ticket's vector
//! describes its head only, and a user should be able to see which ones.

use std::path::PathBuf;
use std::sync::Arc;

use abridge_models::Precision;
use abridge_models::encoder::{Encoded, EncoderError, EncoderWorker};
use abridge_models::models::bert::BertEncoder;
use abridge_schemas::output::ERROR;
use arrow::array::{Array, ArrayRef, FixedSizeListArray, Float32Array, UInt32Builder};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use futures::future::BoxFuture;

use crate::stage::{BuildContext, JobView, Stage, StageSection};
use crate::template::Template;
use crate::{AsyncBatchTransform, AsyncTransformStage, OperatorError, StageCounters};
use serde::{Deserialize, Serialize};

/// Name of the column this stage adds.
pub const EMBEDDING: &str = "embedding";
/// The column the stage adds when it embeds summaries ([`Embed::summaries`]).
pub const SUMMARY_EMBEDDING: &str = "summary_embedding";
/// [`cut_tokens_column`] of [`EMBEDDING`].
pub const EMBEDDING_CUT_TOKENS: &str = "embedding_cut_tokens";
/// [`cut_tokens_column`] of [`SUMMARY_EMBEDDING`].
pub const SUMMARY_EMBEDDING_CUT_TOKENS: &str = "summary_embedding_cut_tokens";

/// `[embed]`: one vector per ticket from a BERT-family sentence encoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedConfig {
    /// Model folder in Hugging Face layout (config.json, tokenizer.json,
    /// model.safetensors, sentence-transformers files): GTE, BGE, MiniLM, e5...
    pub model: PathBuf,
    /// What to embed: a template over the row's columns. Default: `{text}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// Most texts per forward pass. Default: 32.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Most tokens per forward pass, padding included: texts are sorted by length and
    /// batched until the longest times the count reaches this, as
    /// text-embeddings-inference does (short texts many at a time, long ones few).
    /// Default: 8192 on CPU, 65536 on a GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch_tokens: Option<usize>,
    /// Where the encoder runs: `cpu` (default), `cuda` or `cuda:N` (a build with the
    /// `cuda` feature and an NVIDIA GPU).
    #[serde(default = "default_device")]
    pub device: String,
    /// What it computes in: `auto` (default: the checkpoint's type on CUDA, float32 on the
    /// CPU), `float32`, `float16` or `bfloat16`. Half types are for GPUs; on the CPU they
    /// are exact but slower. Vectors of another type differ slightly, so it keys reuse.
    #[serde(default, skip_serializing_if = "Precision::is_auto")]
    pub dtype: Precision,
}

fn default_batch_size() -> usize {
    32
}

pub(crate) fn default_device() -> String {
    "cpu".into()
}

impl EmbedConfig {
    /// Why this section cannot be used, naming the key.
    pub fn validate(&self) -> Result<(), OperatorError> {
        if self.batch_size == 0 {
            return Err(OperatorError::config(
                "embed.batch_size",
                "must be at least 1",
            ));
        }
        if self.max_batch_tokens == Some(0) {
            return Err(OperatorError::config(
                "embed.max_batch_tokens",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// Loads the encoder (on a blocking thread: minutes for a large model), starts its
    /// worker and makes the stage over `input`. The worker is returned too: the filter,
    /// the index and the summaries' vectors use the same encoder.
    pub async fn operator(
        &self,
        input: &SchemaRef,
    ) -> Result<(AsyncTransformStage<Embed>, EncoderWorker), OperatorError> {
        Template::parse(self.input.as_deref().unwrap_or("{text}"), input)?;
        let worker = self.load_encoder().await?;
        let stage = Embed::try_new(worker.clone(), self.input.as_deref(), input)?;
        Ok((stage, worker))
    }

    /// What decides this encoder's vectors, as one digest: the model folder's files by
    /// content, the encoder's version and the device class (not `batch_size`: padding is
    /// masked).
    pub fn model_identity(&self) -> Result<String, OperatorError> {
        let content = abridge_models::fingerprint::model_digest(&self.model.to_string_lossy())?;
        let numbers = format!(
            "{content} {} device={}{}",
            abridge_models::fingerprint::engine_version(),
            abridge_models::fingerprint::device_class(&self.device),
            match self.dtype {
                Precision::Auto => String::new(),
                other => format!(" dtype={other:?}"),
            },
        );
        Ok(blake3::hash(numbers.as_bytes()).to_hex()[..32].to_string())
    }

    /// Loads the encoder (on a blocking thread) and starts its worker.
    pub async fn load_encoder(&self) -> Result<EncoderWorker, OperatorError> {
        let model_error = |e| OperatorError::Encoder(Box::new(e));
        let device = abridge_models::device(&self.device)
            .map_err(|message| OperatorError::config("embed.device", message))?;
        let (dir, batch_size, tokens) =
            (self.model.clone(), self.batch_size, self.max_batch_tokens);
        let precision = self.dtype;
        let encoder = tokio::task::spawn_blocking(move || {
            let encoder = BertEncoder::load_in(&dir, &device, batch_size, precision)?;
            Ok(match tokens {
                Some(tokens) => encoder.with_max_batch_tokens(tokens),
                None => encoder,
            })
        })
        .await
        .map_err(|_| model_error(EncoderError::WorkerGone))?
        .map_err(model_error)?;
        EncoderWorker::spawn(Arc::new(encoder)).map_err(model_error)
    }
}

impl StageSection for EmbedConfig {
    const SECTION: &'static str = "embed";
    const PATH_KEYS: &'static [&'static str] = &["model"];
    // Padding is masked: the batch never changes a vector.
    const SPEED_KEYS: &'static [&'static str] = &["batch_size", "max_batch_tokens", "device"];
    const COLUMNS: &'static [&'static str] = &[EMBEDDING, EMBEDDING_CUT_TOKENS];
}

impl Stage for EmbedConfig {
    fn validate(&self, _job: &JobView<'_>) -> Result<(), OperatorError> {
        EmbedConfig::validate(self)
    }

    fn model_identity(&self) -> Option<Result<String, OperatorError>> {
        Some(EmbedConfig::model_identity(self))
    }

    /// The `embed` stage; its encoder serves the stages after it (filter, index, the
    /// summaries' vectors).
    fn build<'a>(
        &'a self,
        ctx: &'a mut BuildContext<'_>,
    ) -> BoxFuture<'a, Result<(), OperatorError>> {
        Box::pin(async move {
            let (stage, encoder) = self.operator(&ctx.schema()).await?;
            ctx.set_encoder(encoder);
            ctx.push(stage);
            Ok(())
        })
    }
}

/// The `embed` stage.
pub struct Embed {
    encoder: EncoderWorker,
    template: Template,
    schema: SchemaRef,
}

impl Embed {
    /// An `embed` stage over streams of `input`. `template` (default `{text}`) names the
    /// columns to embed; every `{name}` must be a column of `input`.
    pub fn try_new(
        encoder: EncoderWorker,
        template: Option<&str>,
        input: &SchemaRef,
    ) -> Result<AsyncTransformStage<Self>, OperatorError> {
        Self::build(
            "embed",
            encoder,
            template.unwrap_or("{text}"),
            EMBEDDING,
            input,
        )
    }

    /// The stage that embeds each row's `summary` into `summary_embedding`.
    pub fn summaries(
        encoder: EncoderWorker,
        input: &SchemaRef,
    ) -> Result<AsyncTransformStage<Self>, OperatorError> {
        Self::build(
            "embed_summary",
            encoder,
            "{summary}",
            SUMMARY_EMBEDDING,
            input,
        )
    }

    fn build(
        name: &'static str,
        encoder: EncoderWorker,
        template: &str,
        output: &str,
        input: &SchemaRef,
    ) -> Result<AsyncTransformStage<Self>, OperatorError> {
        let template = Template::parse(template, input)?;
        if input.index_of(output).is_ok() {
            return Err(OperatorError::StageSchema(format!(
                "the input already has a `{output}` column"
            )));
        }
        let mut fields: Vec<_> = input.fields().iter().cloned().collect();
        fields.push(Arc::new(vector_field(output, encoder.dim())));
        fields.push(Arc::new(Field::new(
            cut_tokens_column(output),
            DataType::UInt32,
            true,
        )));
        let stage = Self {
            encoder,
            template,
            schema: Arc::new(Schema::new_with_metadata(fields, input.metadata().clone())),
        };
        Ok(AsyncTransformStage::new(name, stage))
    }
}

/// The column beside a vector column `vectors` that counts, per row, the tokens past the
/// encoder's length limit (`embedding_cut_tokens`): the end of the text the vector does
/// not see. Null where the row was not embedded.
pub fn cut_tokens_column(vectors: &str) -> String {
    format!("{vectors}_cut_tokens")
}

/// The `embedding` field for vectors of `dim` floats.
pub fn embedding_field(dim: usize) -> Field {
    vector_field(EMBEDDING, dim)
}

fn vector_field(name: &str, dim: usize) -> Field {
    Field::new(
        name,
        DataType::FixedSizeList(
            Arc::new(Field::new("item", DataType::Float32, false)),
            dim as i32,
        ),
        true,
    )
}

impl AsyncBatchTransform for Embed {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn transform<'a>(
        &'a self,
        batch: RecordBatch,
        _: &'a StageCounters,
    ) -> BoxFuture<'a, Result<RecordBatch, OperatorError>> {
        Box::pin(self.embed_batch(batch))
    }
}

impl Embed {
    async fn embed_batch(&self, batch: RecordBatch) -> Result<RecordBatch, OperatorError> {
        let (encoder, template) = (&self.encoder, &self.template);
        let rows = batch.num_rows();
        let dim = encoder.dim();
        let errors = batch.column_by_name(ERROR);
        let used: Vec<&ArrayRef> = (0..batch.num_columns())
            .filter(|&i| template.uses(i))
            .map(|i| batch.column(i))
            .collect();
        let keep: Vec<bool> = (0..rows)
            .map(|r| errors.is_none_or(|e| e.is_null(r)) && used.iter().any(|c| c.is_valid(r)))
            .collect();
        let texts = template.render(&batch, &keep)?;
        let encoded = if texts.is_empty() {
            Encoded::default()
        } else {
            encoder
                .encode_counting_cuts(texts)
                .await
                .map_err(|e| OperatorError::Encoder(Box::new(e)))?
        };
        // Scatter the encoded rows back; skipped rows are null with zeroed values.
        let mut values = vec![0f32; rows * dim];
        let mut cut = UInt32Builder::with_capacity(rows);
        let mut next = 0;
        for (row, &k) in keep.iter().enumerate() {
            if k {
                values[row * dim..(row + 1) * dim]
                    .copy_from_slice(&encoded.vectors[next * dim..(next + 1) * dim]);
                cut.append_option(encoded.cut_tokens.get(next).copied());
                next += 1;
            } else {
                cut.append_null();
            }
        }
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let list = FixedSizeListArray::try_new(
            item,
            dim as i32,
            Arc::new(Float32Array::from(values)),
            Some(NullBuffer::from(keep)),
        )?;
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        columns.push(Arc::new(list));
        columns.push(Arc::new(cut.finish()));
        Ok(RecordBatch::try_new(Arc::clone(&self.schema), columns)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Operator;
    use abridge_models::cached_model_dir;
    use abridge_models::models::bert::BertEncoder;
    use arrow::array::StringArray;
    use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
    use futures::TryStreamExt;

    #[tokio::test]
    async fn embeds_rows_and_skips_failed_ones() {
        let dir = cached_model_dir("minilm-l6-v2");
        let encoder = BertEncoder::load(&dir, &candle_core::Device::Cpu, 8)
            .unwrap_or_else(|e| panic!("{e} (run scripts/fetch-models)"));
        let worker = EncoderWorker::spawn(Arc::new(encoder)).unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("title", DataType::Utf8, true),
            Field::new("text", DataType::Utf8, true),
            Field::new(ERROR, DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(StringArray::from(vec![Some("Printer"), None, Some("VPN")])),
                Arc::new(StringArray::from(vec![
                    Some("offline again"),
                    None,
                    Some("drops"),
                ])),
                Arc::new(StringArray::from(vec![None, Some("text is null"), None])),
            ],
        )
        .unwrap();
        let op = Embed::try_new(worker.clone(), Some("{title}: {text}"), &schema).unwrap();
        let input = Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&schema),
            futures::stream::iter(vec![Ok(batch)]),
        ));
        let out: Vec<RecordBatch> = op
            .execute(input, StageCounters::default())
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let list = out[0]
            .column_by_name(EMBEDDING)
            .unwrap()
            .as_any()
            .downcast_ref::<FixedSizeListArray>()
            .unwrap()
            .clone();
        assert_eq!(list.value_length(), 384);
        assert!(list.is_valid(0) && list.is_null(1) && list.is_valid(2));
        let cut = out[0]
            .column_by_name(EMBEDDING_CUT_TOKENS)
            .unwrap()
            .as_any()
            .downcast_ref::<arrow::array::UInt32Array>()
            .unwrap()
            .clone();
        assert_eq!(cut.iter().collect::<Vec<_>>(), [Some(0), None, Some(0)]);
        let direct = worker
            .encode(vec!["Printer: offline again".into()])
            .await
            .unwrap();
        let row0 = list.value(0);
        let row0 = row0.as_any().downcast_ref::<Float32Array>().unwrap();
        assert_eq!(
            row0.values().to_vec(),
            direct,
            "template rendered as written"
        );
        assert!(Embed::try_new(worker.clone(), Some("{body}"), &schema).is_err());
        assert!(Embed::try_new(worker, Some("no columns"), &schema).is_err());
    }
}
