//! `[summarize]`: the summarize stage's configuration, its prompt presets, and the
//! building of the stage: the generator its backend names, loaded (minutes for a large
//! model, so every setting is checked first), and the operator's settings resolved.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use abridge_models::Precision;
use abridge_models::engine::BatchGenerator;
use abridge_models::generator::{
    GeneratorError, PagedAttention, PromptFormat, Sampling, SharedGenerator,
};
#[cfg(feature = "mistralrs")]
use abridge_models::mistralrs::{MistralRsGenerator, MistralRsOptions};
use abridge_models::stall::StallGuard;
use arrow::datatypes::SchemaRef;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{Rewrite, Summarize, SummarizeSettings};
use crate::OperatorError;
use crate::embed::default_device;
use crate::stage::{BuildContext, JobView, Stage, StageSection};
use crate::tasks::TaskSettings;
use crate::template::Template;

/// `[summarize]`: one summary per kept ticket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SummarizeConfig {
    /// The engine. `mistralrs` (the default) loads every text architecture mistral.rs
    /// knows (Llama, Qwen2/3, Gemma, Phi, Mistral ...) from GGUF or safetensors; `llama`
    /// runs Llama- and Qwen2-architecture GGUF files without rope scaling (SmolLM2,
    /// TinyLlama, Llama 3.0, Qwen2.5; files that scale rotary positions, as Llama
    /// 3.1/3.2's do, are refused) on abridge's own batch engine, on CPU; `seqgpt` runs BLOOM checkpoints (SeqGPT-560M)
    /// on it.
    #[serde(default)]
    pub backend: Backend,
    /// A `.gguf` file, a folder holding one, or a Hugging Face model folder.
    pub model: String,
    /// Lets `model` be a Hugging Face hub id, downloaded on first use. Default: false
    /// (a nightly job should not depend on the network).
    #[serde(default)]
    pub allow_download: bool,
    /// A template over the ticket's columns that uses `{text}` (`{{`/`}}` for literal
    /// braces), or a preset: `instruct` (default), `anchor` (`【摘要】{text}【/摘要】`),
    /// `multi-event` (one sentence per event), `seqgpt` (SeqGPT's own format, with the
    /// task and labels of `[summarize.seqgpt]`).
    #[serde(default = "default_prompt")]
    pub prompt: String,
    /// What the `seqgpt` preset asks for.
    #[serde(default)]
    pub seqgpt: SeqGptPromptConfig,
    /// `auto` (default: the model's chat template when it has one), `chat` or `raw`.
    #[serde(default)]
    pub prompt_format: PromptFormat,
    /// Most tokens a summary may have. Default: 128.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// 0 decodes greedily. Default: 0.3.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Nucleus sampling mass. Default: 0.9.
    #[serde(default = "default_top_p")]
    pub top_p: f64,
    /// With the ticket id, fixes every random draw: same seed, same ticket, same summary.
    /// Default: 0.
    #[serde(default)]
    pub seed: u64,
    /// Tokens of `text` a prompt holds; longer texts are cut from their head. Default: 512.
    #[serde(default = "default_max_input_tokens")]
    pub max_input_tokens: usize,
    /// Terms that must appear verbatim in a summary when the text has them; misses are
    /// listed per row in `glossary_missed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub glossary: Vec<String>,
    /// Ask once more, naming the missed terms, when a summary loses some. Default: true.
    #[serde(default = "default_true")]
    pub glossary_retry: bool,
    /// Regex rewrites applied in order to every summary: `{ pattern = "...", replace = "..." }`
    /// (`$1`, `${name}` for groups).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleConfig>,
    /// Requests kept open at the engine (the seqgpt engine's batch size). Default: 8;
    /// with mistral.rs 1 on CPU, where it runs one sequence at a time (its batching
    /// without PagedAttention mixes sequences up, and was slower there anyway:
    /// scripts/bench-summarize), and 8 on CUDA with PagedAttention (on an H100, 32
    /// concurrent requests stalled mistral.rs 0.8.1: scripts/gpu-check); the seqgpt
    /// engine on CUDA 256 (a GPU step costs about the same for 1 or 256 sequences; its
    /// paged KV cache admits as many as its memory budget holds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<usize>,
    /// `cpu` (default), `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// What the model computes in: `auto` (default: the checkpoint's type on CUDA, float32
    /// on the CPU), `float32`, `float16` or `bfloat16`. With `seqgpt` the weights,
    /// activations and the paged KV cache take it; on the CPU a half type is exact (values
    /// rounded where transformers' half forward rounds them) and there for checking, not
    /// speed. With `mistralrs`, safetensors models load in it (GGUF files keep mistral.rs's
    /// own choice); `llama` computes in float32 only. Answers of another type differ, so it
    /// keys reuse.
    #[serde(default, skip_serializing_if = "Precision::is_auto")]
    pub dtype: Precision,
    /// In-situ quantization of safetensors weights at load: `Q4K`, `Q8_0`, `4`, `8` ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isq: Option<String>,
    /// Load a quantized GGUF file's weights as f32, from an exact copy made once in
    /// `$ABRIDGE_CACHE/f32` (default `~/.cache/abridge/f32`): on CPU mistral.rs multiplies
    /// f32 weights with a GEMM, quantized ones row by row (SmolLM2-135M Q4_1: 1.8x faster
    /// as f32). Default: on CPU for files whose f32 weights take at most 1 GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dequantize: Option<bool>,
    /// PagedAttention's KV cache (CUDA, both backends; on by default there).
    #[serde(default)]
    pub paged_attention: PagedAttention,
    /// Seconds the engine may go without answering any request while some wait, before
    /// those rows fail as stalled, and every later one at once, naming the engine: a run
    /// over a stuck engine ends, with its rows failed, instead of hanging. 0: wait
    /// forever. Default: 300, longer than any one answer takes.
    #[serde(default = "default_stall_timeout_s")]
    pub stall_timeout_s: f64,
}

fn default_stall_timeout_s() -> f64 {
    300.0
}

/// `[summarize.seqgpt]`: the instruction of the `seqgpt` prompt preset,
/// `输入: {text}\n{task}: {labels}\n输出: [GEN]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeqGptPromptConfig {
    /// `抽取` (extract, the default) or `分类` (classify): SeqGPT's two trained tasks.
    #[serde(default = "default_seqgpt_task")]
    pub task: String,
    /// What to extract or classify into. Default: `["摘要"]` (a summary).
    #[serde(default = "default_seqgpt_labels")]
    pub labels: Vec<String>,
}

fn default_seqgpt_task() -> String {
    "抽取".into()
}

fn default_seqgpt_labels() -> Vec<String> {
    vec!["摘要".into()]
}

impl Default for SeqGptPromptConfig {
    fn default() -> Self {
        Self {
            task: default_seqgpt_task(),
            labels: default_seqgpt_labels(),
        }
    }
}

/// Which engine summarizes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// mistral.rs.
    #[default]
    Mistralrs,
    /// abridge's BLOOM, for SeqGPT-560M, BLOOMZ and other BLOOM checkpoints (a Hugging
    /// Face folder: config.json, tokenizer.json, model.safetensors).
    Seqgpt,
    /// abridge's batch engine for Llama-architecture GGUF files (a `.gguf` file, or a
    /// folder holding one), on CPU: every decoding step multiplies the whole batch
    /// through each weight once, where mistral.rs decodes one sequence at a time.
    Llama,
}

/// One post-processing rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// A regular expression (Rust `regex` syntax).
    pub pattern: String,
    /// What each match becomes.
    #[serde(default)]
    pub replace: String,
}

impl SummarizeConfig {
    /// The template `prompt` stands for.
    pub fn template(&self) -> String {
        if self.prompt == "seqgpt" {
            return seqgpt_template(&self.seqgpt.task, &self.seqgpt.labels);
        }
        preset(&self.prompt)
            .map(str::to_string)
            .unwrap_or_else(|| self.prompt.clone())
    }

    /// How this section's model is asked SeqGPT's other tasks (classify, extract): its
    /// backend's prompts, input budget, answer length and window of requests.
    pub fn task_settings(&self) -> TaskSettings {
        TaskSettings {
            seqgpt: self.backend == Backend::Seqgpt,
            max_input_tokens: self.max_input_tokens,
            max_new_tokens: self.max_new_tokens,
            in_flight: self.in_flight(),
        }
    }

    /// What decides the numbers this section's model computes, as one digest: the model's
    /// files by content, the engine and its version, the prompt format, the weights' form
    /// (`isq`, `dequantize`) and the device class. Answers are reused only under the same
    /// identity; `in_flight`, `paged_attention` and the GPU's ordinal are left out (they
    /// change speed, not the numbers, under greedy decoding).
    pub fn model_identity(&self) -> Result<String, OperatorError> {
        let content = abridge_models::fingerprint::model_digest(&self.model)?;
        let numbers = format!(
            "{content} {} backend={:?} format={:?} isq={:?} dequantize={:?} device={}",
            abridge_models::fingerprint::engine_version(),
            self.backend,
            self.prompt_format,
            self.isq,
            self.dequantize,
            abridge_models::fingerprint::device_class(&self.device),
        );
        let numbers = match self.dtype {
            Precision::Auto => numbers,
            other => format!("{numbers} dtype={other:?}"),
        };
        Ok(blake3::hash(numbers.as_bytes()).to_hex()[..32].to_string())
    }

    /// `in_flight`, or the default for `device`.
    pub fn in_flight(&self) -> usize {
        let cpu = self.device.trim() == "cpu";
        self.in_flight.unwrap_or(match self.backend {
            Backend::Mistralrs if cpu => 1,
            Backend::Seqgpt if !cpu => 256,
            _ => 8,
        })
    }
}

fn default_prompt() -> String {
    "instruct".into()
}
fn default_max_new_tokens() -> usize {
    128
}
fn default_temperature() -> f64 {
    0.3
}
fn default_top_p() -> f64 {
    0.9
}
fn default_max_input_tokens() -> usize {
    512
}
fn default_true() -> bool {
    true
}

/// Prompt templates that work for short summaries, by the name a job file can use.
pub const PRESETS: [(&str, &str); 3] = [
    (
        "instruct",
        "Summarize this support ticket in one short sentence. Reply with the summary only.\n\n\
         Title: {title}\n{text}",
    ),
    // For plain (non-chat) models trained on anchored spans, e.g. Chinese summarizers.
    ("anchor", "【摘要】{text}【/摘要】"),
    (
        "multi-event",
        "The ticket below may report several separate events. Write one short sentence per \
         event, each on its own line, and nothing else.\n\nTitle: {title}\n{text}",
    ),
];

/// SeqGPT's instruction format (its model card: `输入: {text}\n{task}: {labels}\n输出: [GEN]`):
/// the text, a task over comma-separated labels (`抽取`, extract, or `分类`, classify, as
/// SeqGPT was trained), then `[GEN]`, after which the model answers. Braces in the task or
/// labels are literal.
pub fn seqgpt_template(task: &str, labels: &[String]) -> String {
    let literal = |s: &str| s.replace('{', "{{").replace('}', "}}");
    format!(
        "输入: {{text}}\n{}: {}\n输出: [GEN]",
        literal(task),
        literal(&labels.join(","))
    )
}

/// The template a preset name stands for.
pub fn preset(name: &str) -> Option<&'static str> {
    PRESETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

impl SummarizeConfig {
    /// Why this section cannot be used, naming the key.
    pub fn validate(&self) -> Result<(), OperatorError> {
        let invalid = |key: &str, message: String| Err(OperatorError::config(key, message));
        let template = self.template();
        if !template.contains("{text}") {
            let presets: Vec<&str> = PRESETS
                .iter()
                .map(|(name, _)| *name)
                .chain(["seqgpt"])
                .collect();
            return invalid(
                "summarize.prompt",
                format!(
                    "neither a preset ({}) nor a template that uses {{text}}",
                    presets.join(", ")
                ),
            );
        }
        let positive = [
            ("summarize.max_new_tokens", self.max_new_tokens),
            ("summarize.max_input_tokens", self.max_input_tokens),
            ("summarize.in_flight", self.in_flight()),
        ];
        for (key, value) in positive {
            if value == 0 {
                return invalid(key, "must be at least 1".into());
            }
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return invalid("summarize.temperature", "must be 0 (greedy) or more".into());
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid("summarize.top_p", "must be in (0, 1]".into());
        }
        if self.glossary.iter().any(|t| t.trim().is_empty()) {
            return invalid("summarize.glossary", "has an empty term".into());
        }
        for rule in &self.rules {
            if let Err(e) = Rewrite::new(&rule.pattern, &rule.replace) {
                return invalid("summarize.rules", e.to_string());
            }
        }
        // A GPU device is checked when the stage is built, on the machine that runs it.
        if let Err(message) = abridge_models::device(&self.device)
            && message != abridge_models::NO_CUDA
        {
            return invalid("summarize.device", message);
        }
        if !self.dtype.is_auto() {
            // mistral.rs refuses a type for a GGUF file when it loads (it alone tells
            // which files are GGUF).
            if self.backend == Backend::Llama && self.dtype != Precision::Float32 {
                return invalid(
                    "summarize.dtype",
                    "the `llama` backend computes in float32 only".into(),
                );
            }
        }
        if !(self.stall_timeout_s.is_finite() && self.stall_timeout_s >= 0.0) {
            return invalid(
                "summarize.stall_timeout_s",
                "must be a number of seconds, 0 or more".into(),
            );
        }
        self.paged_attention
            .validate()
            .or_else(|(key, message)| invalid(&format!("summarize.paged_attention.{key}"), message))
    }
}

impl SummarizeConfig {
    /// The settings ([`SummarizeConfig::settings`]) checked against `input`, its template
    /// above all: before the model loads, which can take minutes.
    pub fn checked_settings(
        &self,
        samples: usize,
        input: &SchemaRef,
    ) -> Result<SummarizeSettings, OperatorError> {
        let settings = self.settings(samples)?;
        Template::parse(&settings.template, input)?;
        Ok(settings)
    }

    /// What shapes each summary, resolved from this section (`samples` draws per row).
    pub fn settings(&self, samples: usize) -> Result<SummarizeSettings, OperatorError> {
        let rules = self
            .rules
            .iter()
            .map(|r| Rewrite::new(&r.pattern, &r.replace))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SummarizeSettings {
            template: self.template(),
            sampling: Sampling {
                temperature: self.temperature,
                top_p: self.top_p,
                max_new_tokens: self.max_new_tokens,
                seed: self.seed,
            },
            max_input_tokens: self.max_input_tokens,
            glossary: self.glossary.clone(),
            glossary_retry: self.glossary_retry,
            rules,
            in_flight: self.in_flight(),
            samples,
        })
    }

    /// Loads the generator `backend` and `model` name, with a note on how prompts reach
    /// it (chat template or raw text).
    pub async fn load_generator(&self) -> Result<(SharedGenerator, String), OperatorError> {
        let device = abridge_models::device(&self.device)
            .map_err(|message| OperatorError::config("summarize.device", message))?;
        let paged_attention = self.paged_attention.clone();
        let (generator, how) = match self.backend {
            #[cfg(not(feature = "mistralrs"))]
            Backend::Mistralrs => {
                return Err(OperatorError::config(
                    "summarize.backend",
                    "this abridge was built without mistral.rs (cargo feature `mistralrs`, on by \
                 default): rebuild with it, or use `llama` (Llama and Qwen2 GGUF files) or `seqgpt` \
                 (BLOOM checkpoints)",
                ));
            }
            #[cfg(feature = "mistralrs")]
            Backend::Mistralrs => {
                let options = MistralRsOptions {
                    model: self.model.clone(),
                    allow_download: self.allow_download,
                    device,
                    isq: self.isq.clone(),
                    dequantize: self.dequantize,
                    f32_cache: abridge_models::cache_dir().join("f32"),
                    max_num_seqs: self.in_flight(),
                    paged_attention,
                    prompt_format: self.prompt_format,
                    dtype: self.dtype,
                };
                let generator = MistralRsGenerator::load(options)
                    .await
                    .map_err(model_error)?;
                let how = if generator.is_chat() {
                    "as the user turn of its chat template"
                } else {
                    "as raw text (no chat template)"
                };
                (Arc::new(generator) as SharedGenerator, how)
            }
            Backend::Seqgpt => {
                let dir = PathBuf::from(&self.model);
                let precision = self.dtype;
                let batch = self.in_flight();
                let generator = tokio::task::spawn_blocking(move || {
                    BatchGenerator::load_bloom(&dir, &device, batch, &paged_attention, precision)
                })
                .await
                .map_err(|e| model_error(GeneratorError::EngineGone(e.to_string())))?
                .map_err(model_error)?;
                (
                    Arc::new(generator) as SharedGenerator,
                    "as raw text (BLOOM)",
                )
            }
            Backend::Llama => {
                if self.device.trim() != "cpu" {
                    return Err(OperatorError::config(
                        "summarize.device",
                        "the `llama` backend runs on the CPU; use `mistralrs` on a GPU",
                    ));
                }
                let file = gguf_file(Path::new(&self.model))
                    .map_err(|message| OperatorError::config("summarize.model", message))?;
                let batch = self.in_flight();
                let chat = self.prompt_format != PromptFormat::Raw;
                let generator = tokio::task::spawn_blocking(move || {
                    BatchGenerator::load_llama(&file, batch, chat)
                })
                .await
                .map_err(|e| model_error(GeneratorError::EngineGone(e.to_string())))?
                .map_err(model_error)?;
                let how = match generator.is_chat() {
                    true => "as the user turn of its chat template",
                    false if self.prompt_format == PromptFormat::Chat => {
                        return Err(OperatorError::config(
                            "summarize.prompt_format",
                            format!("`chat`, but {} has no chat template", self.model),
                        ));
                    }
                    false => "as raw text (no chat template)",
                };
                (Arc::new(generator) as SharedGenerator, how)
            }
        };
        let note = format!("summarize: {} gets prompts {how}", self.model);
        let generator = if self.stall_timeout_s > 0.0 {
            let engine = format!("{:?}", self.backend).to_lowercase();
            let timeout = Duration::from_secs_f64(self.stall_timeout_s);
            StallGuard::wrap(generator, &engine, timeout)
        } else {
            generator
        };
        Ok((generator, note))
    }
}

/// The GGUF file `model` names: the file, or the only `.gguf` file in a folder.
impl StageSection for SummarizeConfig {
    const SECTION: &'static str = "summarize";
    const PATH_KEYS: &'static [&'static str] = &["model"];
    // A row's answer never depends on its batch (sampling is keyed by seed, row and
    // position), nor on which GPU of a kind runs it.
    const SPEED_KEYS: &'static [&'static str] =
        &["device", "in_flight", "paged_attention", "stall_timeout_s"];
    const COLUMNS: &'static [&'static str] = &super::COLUMNS;
}

impl Stage for SummarizeConfig {
    fn validate(&self, _job: &JobView<'_>) -> Result<(), OperatorError> {
        SummarizeConfig::validate(self)
    }

    fn model_identity(&self) -> Option<Result<String, OperatorError>> {
        Some(SummarizeConfig::model_identity(self))
    }

    /// The `summarize` stage: its settings and template are checked against the schema
    /// before the model loads.
    fn build<'a>(
        &'a self,
        ctx: &'a mut BuildContext<'_>,
    ) -> BoxFuture<'a, Result<(), OperatorError>> {
        Box::pin(async move {
            let input = ctx.schema();
            let settings = self.checked_settings(ctx.job.stability_samples, &input)?;
            let generator = ctx.generator().await?;
            ctx.push(Summarize::try_new(generator, settings, &input)?);
            Ok(())
        })
    }
}

fn gguf_file(model: &Path) -> Result<PathBuf, String> {
    if model.is_file() {
        return Ok(model.to_path_buf());
    }
    let entries = std::fs::read_dir(model).map_err(|e| {
        format!(
            "{}: neither a GGUF file nor a folder ({e})",
            model.display()
        )
    })?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(format!("{} holds no .gguf file", model.display())),
        n => Err(format!(
            "{} holds {n} .gguf files: name one in summarize.model",
            model.display()
        )),
    }
}

fn model_error(e: GeneratorError) -> OperatorError {
    OperatorError::Generator(Box::new(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_use_text() {
        assert_eq!(
            seqgpt_template("抽取", &["摘要".into(), "{x}".into()]),
            "输入: {text}\n抽取: 摘要,{{x}}\n输出: [GEN]"
        );
        for (name, template) in PRESETS {
            assert!(template.contains("{text}"), "{name}");
            assert_eq!(preset(name), Some(template));
        }
    }

    fn section(fields: serde_json::Value) -> SummarizeConfig {
        serde_json::from_value(fields).expect("a [summarize] section")
    }

    #[test]
    fn dtype_keys_reuse_and_is_refused_where_it_cannot_apply() -> Result<(), OperatorError> {
        let model = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/bloom-tiny-4h"
        );
        let auto = section(serde_json::json!({ "backend": "seqgpt", "model": model }));
        let named = |dtype: &str| {
            section(serde_json::json!({ "backend": "seqgpt", "model": model, "dtype": dtype }))
        };
        // Left out of the recorded section and of the identity unless set: jobs that never
        // set it keep their fingerprints.
        assert_eq!(auto, named("auto"));
        assert!(serde_json::to_value(&auto).is_ok_and(|v| v.get("dtype").is_none()));
        let (f16, bf16) = (named("float16"), named("bfloat16"));
        assert_eq!(auto.model_identity()?, named("auto").model_identity()?);
        assert_ne!(auto.model_identity()?, f16.model_identity()?);
        assert_ne!(f16.model_identity()?, bf16.model_identity()?);
        assert!(bf16.validate().is_ok());
        // `llama` computes in f32 only.
        let llama = |dtype: &str| {
            section(serde_json::json!({ "backend": "llama", "model": model, "dtype": dtype }))
        };
        assert!(llama("float32").validate().is_ok());
        let err = llama("bfloat16")
            .validate()
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("summarize.dtype") && err.contains("float32"),
            "{err}"
        );
        assert!(
            serde_json::from_value::<SummarizeConfig>(
                serde_json::json!({ "model": model, "dtype": "half" })
            )
            .is_err()
        );
        Ok(())
    }
}
