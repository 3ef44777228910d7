//! The `[summarize]` section turned into a `summarize` stage: the generator loaded, the
//! prompt and rules resolved.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use abridge_operators::OperatorError;
use abridge_operators::generator::batch::BatchGenerator;
#[cfg(feature = "mistralrs")]
use abridge_operators::generator::mistralrs::{MistralRsGenerator, MistralRsOptions, PromptFormat};
use abridge_operators::generator::{GeneratorError, PagedAttention, Sampling, SharedGenerator};
use abridge_operators::summarize::{Rewrite, Summarize, SummarizeSettings};
use arrow::datatypes::SchemaRef;

use crate::error::PipelineError;
use crate::job::{self, Backend, JobError, PromptFormatConfig, SummarizeConfig};

/// The stage, and a note for the run summary about how prompts reach the model.
/// `samples` summaries are drawn per row (`metrics.stability_samples`).
pub async fn summarize_stage(
    config: &SummarizeConfig,
    samples: usize,
    input: &SchemaRef,
    job_path: &Path,
) -> Result<(Summarize, String), PipelineError> {
    let device = job::candle_device(&config.device).map_err(|message| JobError::Invalid {
        path: job_path.to_path_buf(),
        key: "summarize.device".into(),
        message,
    })?;
    let doesnt_fit = |source| PipelineError::JobDoesNotFitInput {
        job: job_path.to_path_buf(),
        source: Box::new(source),
    };
    let rules = config
        .rules
        .iter()
        .map(|r| Rewrite::new(&r.pattern, &r.replace))
        .collect::<Result<Vec<_>, _>>()
        .map_err(doesnt_fit)?;
    let settings = SummarizeSettings {
        template: config.template(),
        sampling: Sampling {
            temperature: config.temperature,
            top_p: config.top_p,
            max_new_tokens: config.max_new_tokens,
            seed: config.seed,
        },
        max_input_tokens: config.max_input_tokens,
        glossary: config.glossary.clone(),
        glossary_retry: config.glossary_retry,
        rules,
        in_flight: config.in_flight(),
        samples,
    };
    // Checked before the model loads: a bad template should not cost a minute of loading.
    abridge_operators::template::Template::parse(&settings.template, input).map_err(doesnt_fit)?;
    let paged_attention = PagedAttention {
        enabled: config.paged_attention.enabled,
        gpu_memory_mb: config.paged_attention.gpu_memory_mb,
        gpu_memory_fraction: config.paged_attention.gpu_memory_fraction,
        block_size: config.paged_attention.block_size,
    };
    let (generator, how) = match config.backend {
        #[cfg(not(feature = "mistralrs"))]
        Backend::Mistralrs => {
            return Err(JobError::Invalid {
                path: job_path.to_path_buf(),
                key: "summarize.backend".into(),
                message: "this abridge was built without mistral.rs (cargo feature \
                          `mistralrs`, on by default): rebuild with it, or use `llama` \
                          (Llama GGUF files) or `seqgpt` (BLOOM checkpoints)"
                    .into(),
            }
            .into());
        }
        #[cfg(feature = "mistralrs")]
        Backend::Mistralrs => {
            let options = MistralRsOptions {
                model: config.model.clone(),
                allow_download: config.allow_download,
                device,
                isq: config.isq.clone(),
                dequantize: config.dequantize,
                f32_cache: abridge_operators::cache_dir().join("f32"),
                max_num_seqs: config.in_flight(),
                paged_attention,
                prompt_format: match config.prompt_format {
                    PromptFormatConfig::Auto => PromptFormat::Auto,
                    PromptFormatConfig::Chat => PromptFormat::Chat,
                    PromptFormatConfig::Raw => PromptFormat::Raw,
                },
            };
            let generator = MistralRsGenerator::load(options)
                .await
                .map_err(|e| model_error(e, job_path))?;
            let how = if generator.is_chat() {
                "as the user turn of its chat template"
            } else {
                "as raw text (no chat template)"
            };
            (Arc::new(generator) as SharedGenerator, how)
        }
        Backend::Seqgpt => {
            let dir = PathBuf::from(&config.model);
            let batch = config.in_flight();
            let generator = tokio::task::spawn_blocking(move || {
                BatchGenerator::load_bloom(&dir, &device, batch, &paged_attention)
            })
            .await
            .map_err(|e| model_error(GeneratorError::EngineGone(e.to_string()), job_path))?
            .map_err(|e| model_error(e, job_path))?;
            (
                Arc::new(generator) as SharedGenerator,
                "as raw text (BLOOM)",
            )
        }
        Backend::Llama => {
            let invalid = |message: String| JobError::Invalid {
                path: job_path.to_path_buf(),
                key: "summarize.model".into(),
                message,
            };
            if config.device.trim() != "cpu" {
                return Err(JobError::Invalid {
                    path: job_path.to_path_buf(),
                    key: "summarize.device".into(),
                    message: "the `llama` backend runs on the CPU; use `mistralrs` on a GPU".into(),
                }
                .into());
            }
            let file = gguf_file(Path::new(&config.model)).map_err(invalid)?;
            let batch = config.in_flight();
            let chat = config.prompt_format != PromptFormatConfig::Raw;
            let generator =
                tokio::task::spawn_blocking(move || BatchGenerator::load_llama(&file, batch, chat))
                    .await
                    .map_err(|e| model_error(GeneratorError::EngineGone(e.to_string()), job_path))?
                    .map_err(|e| model_error(e, job_path))?;
            let how = match generator.is_chat() {
                true => "as the user turn of its chat template",
                false if config.prompt_format == PromptFormatConfig::Chat => {
                    return Err(JobError::Invalid {
                        path: job_path.to_path_buf(),
                        key: "summarize.prompt_format".into(),
                        message: format!("`chat`, but {} has no chat template", config.model),
                    }
                    .into());
                }
                false => "as raw text (no chat template)",
            };
            (Arc::new(generator) as SharedGenerator, how)
        }
    };
    let note = format!("summarize: {} gets prompts {how}", config.model);
    let stage = Summarize::try_new(generator, settings, input).map_err(doesnt_fit)?;
    Ok((stage, note))
}

/// The GGUF file `model` names: the file, or the only `.gguf` file in a folder.
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

fn model_error(e: GeneratorError, job_path: &Path) -> PipelineError {
    PipelineError::Model {
        job: job_path.to_path_buf(),
        source: Box::new(OperatorError::Generator(Box::new(e))),
    }
}
