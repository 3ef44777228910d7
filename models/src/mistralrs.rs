//! The `mistralrs` backend: every text architecture mistral.rs loads (Llama, Qwen2/3,
//! Gemma, Phi, Mistral ...), from a GGUF file or a Hugging Face safetensors folder, with
//! mistral.rs's continuous batching (and PagedAttention on CUDA).
//!
//! Sampling is ours, not the engine's: the engine draws from one random generator shared
//! by every sequence, so a row's summary would depend on what else was in flight. A logits
//! processor per request picks the token with [`pick_token`] and a draw fixed by
//! `(seed, key, position)`, and the engine then takes that token greedily.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use either::Either;
use futures::future::BoxFuture;
use mistralrs::core::RequestMessage;
use mistralrs::{
    Constraint, CustomLogitsProcessor, GgufModelBuilder, MemoryGpuConfig, Model, ModelDType,
    NormalRequest, PagedAttentionMetaBuilder, Request, RequestLike, Response, SamplingParams,
    TextMessageRole, TextMessages, TextModelBuilder, TokenSource,
};

use crate::generator::{
    Generation, GenerationRequest, Generator, GeneratorError, Head, PagedAttention, PromptFormat,
    Sampling, pick_token, uniform_draw,
};

/// What to load and how.
#[derive(Debug, Clone)]
pub struct MistralRsOptions {
    /// A `.gguf` file, a folder holding one, or a Hugging Face folder (`config.json` and
    /// safetensors). With `allow_download`, a hub model id too.
    pub model: String,
    /// Lets a model id that is not a local path be fetched from the Hugging Face hub.
    pub allow_download: bool,
    pub device: Device,
    /// In-situ quantization of safetensors weights at load (`Q4K`, `Q8_0`, `4`, `8` ...).
    pub isq: Option<String>,
    /// Load a quantized GGUF file's weights widened to f32 (an exact copy kept in
    /// `f32_cache`); `None` decides: on CPU, when the f32 weights take at most
    /// [`AUTO_DEQUANTIZE_MAX_BYTES`]. See [`f32_copy`] for why.
    pub dequantize: Option<bool>,
    /// Where f32 copies of GGUF files are kept, made once per file.
    pub f32_cache: PathBuf,
    /// Sequences the engine decodes together.
    pub max_num_seqs: usize,
    pub paged_attention: PagedAttention,
    pub prompt_format: PromptFormat,
    /// The type a safetensors model loads in (`Auto`: mistral.rs's choice); a GGUF file's
    /// compute type is mistral.rs's own.
    pub dtype: crate::Precision,
}

/// A model loaded in a mistral.rs engine.
pub struct MistralRsGenerator {
    model: Arc<Model>,
    name: String,
    chat: bool,
    /// Sequences allowed in the engine at once. Without PagedAttention, mistral.rs 0.8.1
    /// mixes up the tokens of concurrent sequences (a summary ends with another ticket's
    /// words; the tests below catch it), and on CPU batching was slower anyway
    /// (scripts/bench-summarize): there, one sequence at a time. Its prefix cache is off
    /// for the same reason: a prompt sharing a prefix with the previous one was answered
    /// from a stale cache.
    gate: tokio::sync::Semaphore,
}

/// Where the model's files are, as mistral.rs wants them.
#[derive(Debug, PartialEq)]
enum Source {
    Gguf { dir: PathBuf, file: String },
    Folder(PathBuf),
    Hub(String),
}

impl MistralRsGenerator {
    /// Loads the model (seconds to minutes: weights are read and, with `isq`, quantized).
    pub async fn load(options: MistralRsOptions) -> Result<Self, GeneratorError> {
        let fail = |reason: String| GeneratorError::Load {
            model: options.model.clone(),
            reason,
        };
        let source = locate(&options.model, options.allow_download).map_err(fail)?;
        let chat = match options.prompt_format {
            PromptFormat::Chat => true,
            PromptFormat::Raw => false,
            PromptFormat::Auto => has_chat_template(&source),
        };
        let cpu = options.device.is_cpu();
        let paged_enabled = match options.paged_attention.enabled {
            Some(true) if cpu => {
                return Err(fail(
                    "PagedAttention needs a CUDA device (set device = \"cuda\" or \
                     paged_attention.enabled = false)"
                        .into(),
                ));
            }
            Some(enabled) => enabled,
            None => !cpu,
        };
        let sequences = if paged_enabled {
            options.max_num_seqs.max(1)
        } else {
            1
        };
        let paged = if paged_enabled {
            let settings = &options.paged_attention;
            let mut builder = PagedAttentionMetaBuilder::default();
            if let Some(mb) = settings.gpu_memory_mb {
                builder = builder.with_gpu_memory(MemoryGpuConfig::MbAmount(mb));
            } else if let Some(fraction) = settings.gpu_memory_fraction {
                builder = builder.with_gpu_memory(MemoryGpuConfig::Utilization(fraction));
            }
            if let Some(size) = settings.block_size {
                builder = builder.with_block_size(size);
            }
            Some(builder.build().map_err(|e| fail(format!("{e:#}")))?)
        } else {
            None
        };
        let source = match source {
            Source::Gguf { dir, file } => {
                let path = dir.join(&file);
                let widen = match options.dequantize {
                    Some(widen) => widen,
                    None => cpu && worth_widening(&path).map_err(fail)?,
                };
                if widen {
                    let copy = f32_copy(&path, &options.f32_cache).map_err(fail)?;
                    let (Some(dir), Some(file)) = (copy.parent(), copy.file_name()) else {
                        return Err(fail(format!("f32 copy {} has no folder", copy.display())));
                    };
                    Source::Gguf {
                        dir: dir.to_path_buf(),
                        file: file.to_string_lossy().into_owned(),
                    }
                } else {
                    Source::Gguf { dir, file }
                }
            }
            _ if options.dequantize == Some(true) => {
                return Err(fail(
                    "dequantize applies to GGUF files; safetensors weights load as stored".into(),
                ));
            }
            other => other,
        };
        let model = match &source {
            Source::Gguf { dir, file } => {
                if options.isq.is_some() {
                    return Err(fail(
                        "isq applies to safetensors weights; a GGUF file is already quantized"
                            .into(),
                    ));
                }
                if !options.dtype.is_auto() {
                    return Err(fail(
                        "summarize.dtype applies to safetensors models; mistral.rs chooses a \
                         GGUF file's compute type itself (leave dtype at auto)"
                            .into(),
                    ));
                }
                let mut builder = GgufModelBuilder::new(dir.to_string_lossy(), vec![file])
                    .with_token_source(TokenSource::None)
                    .with_max_num_seqs(sequences)
                    .with_prefix_cache_n(None);
                if cpu {
                    builder = builder.with_force_cpu();
                } else {
                    builder = builder.with_device(options.device.clone());
                }
                if let Some(paged) = paged {
                    builder = builder.with_paged_attn(paged);
                }
                builder.build().await
            }
            Source::Folder(_) | Source::Hub(_) => {
                let id = match &source {
                    Source::Folder(dir) => dir.to_string_lossy().into_owned(),
                    _ => options.model.clone(),
                };
                let mut builder = TextModelBuilder::new(id)
                    .with_max_num_seqs(sequences)
                    .with_prefix_cache_n(None)
                    .with_token_source(if matches!(source, Source::Hub(_)) {
                        TokenSource::CacheToken
                    } else {
                        TokenSource::None
                    });
                if cpu {
                    builder = builder.with_force_cpu();
                } else {
                    builder = builder.with_device(options.device.clone());
                }
                builder = builder.with_dtype(match options.dtype {
                    crate::Precision::Auto => ModelDType::Auto,
                    crate::Precision::Float32 => ModelDType::F32,
                    crate::Precision::Float16 => ModelDType::F16,
                    crate::Precision::Bfloat16 => ModelDType::BF16,
                });
                if let Some(isq) = &options.isq {
                    let isq = mistralrs::core::parse_isq_value(isq, Some(&options.device))
                        .map_err(|e| fail(format!("isq `{isq}`: {e}")))?;
                    builder = builder.with_isq(isq);
                }
                if let Some(paged) = paged {
                    builder = builder.with_paged_attn(paged);
                }
                builder.build().await
            }
        }
        .map_err(|e| fail(format!("mistral.rs could not load it: {e:#}")))?;
        Ok(Self {
            model: Arc::new(model),
            name: options.model.clone(),
            chat,
            gate: tokio::sync::Semaphore::new(sequences),
        })
    }

    /// Whether prompts go in as the user turn of a chat template.
    pub fn is_chat(&self) -> bool {
        self.chat
    }

    async fn complete(&self, request: GenerationRequest) -> Result<Generation, GeneratorError> {
        let _turn = self
            .gate
            .acquire()
            .await
            .map_err(|e| GeneratorError::EngineGone(e.to_string()))?;
        let started = Instant::now();
        let messages = if self.chat {
            TextMessages::new()
                .add_message(TextMessageRole::User, &request.prompt)
                .take_messages()
        } else {
            RequestMessage::Completion {
                text: request.prompt,
                echo_prompt: false,
                best_of: None,
            }
        };
        let mut sampling = SamplingParams::deterministic();
        sampling.max_len = Some(request.sampling.max_new_tokens);
        let processors: Option<Vec<Arc<dyn CustomLogitsProcessor>>> =
            (request.sampling.temperature > 0.0).then(|| {
                vec![Arc::new(SeededPick {
                    sampling: request.sampling.clone(),
                    key: request.key,
                }) as Arc<dyn CustomLogitsProcessor>]
            });
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let message = Request::Normal(Box::new(NormalRequest {
            messages,
            sampling_params: sampling,
            response: tx,
            return_logprobs: false,
            is_streaming: false,
            id: 0,
            constraint: Constraint::None,
            suffix: None,
            tools: None,
            tool_choice: None,
            logits_processors: processors,
            return_raw_logits: false,
            web_search_options: None,
            model_id: None,
            truncate_sequence: false,
        }));
        let gone = |e: String| GeneratorError::EngineGone(e);
        self.model
            .inner()
            .get_sender(None)
            .map_err(|e| gone(e.to_string()))?
            .send(message)
            .await
            .map_err(|e| gone(e.to_string()))?;
        let response = rx
            .recv()
            .await
            .ok_or_else(|| gone("no answer to a request".into()))?;
        let (text, usage) = match response {
            Response::Done(done) => {
                let text = done
                    .choices
                    .into_iter()
                    .next()
                    .and_then(|c| c.message.content)
                    .unwrap_or_default();
                (text, done.usage)
            }
            Response::CompletionDone(done) => {
                let text = done
                    .choices
                    .into_iter()
                    .next()
                    .map(|c| c.text)
                    .unwrap_or_default();
                (text, done.usage)
            }
            Response::ModelError(e, _) | Response::CompletionModelError(e, _) => {
                return Err(GeneratorError::Request(e));
            }
            Response::ValidationError(e) | Response::InternalError(e) => {
                return Err(GeneratorError::Request(e.to_string()));
            }
            _ => return Err(GeneratorError::Request("unexpected answer kind".into())),
        };
        Ok(Generation {
            text,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            latency: started.elapsed(),
        })
    }

    async fn head(&self, text: String, max_tokens: usize) -> Result<Head, GeneratorError> {
        // A token covers at least one byte: texts this short fit without asking.
        if text.len() <= max_tokens {
            return Ok(Head::whole(text));
        }
        let failed =
            |e: mistralrs::error::Error| GeneratorError::Request(format!("tokenizer: {e}"));
        let ids = self
            .model
            .tokenize(Either::Right(text.clone()), None, false, false, None)
            .await
            .map_err(failed)?;
        if ids.len() <= max_tokens {
            return Ok(Head::whole(text));
        }
        let head = self
            .model
            .detokenize(ids[..max_tokens].to_vec(), true)
            .await
            .map_err(failed)?;
        Ok(Head {
            text: head,
            cut_tokens: ids.len() - max_tokens,
        })
    }
}

impl Generator for MistralRsGenerator {
    fn model(&self) -> &str {
        &self.name
    }

    fn generate(
        &self,
        request: GenerationRequest,
    ) -> BoxFuture<'_, Result<Generation, GeneratorError>> {
        Box::pin(self.complete(request))
    }

    fn truncate(
        &self,
        text: String,
        max_tokens: usize,
    ) -> BoxFuture<'_, Result<Head, GeneratorError>> {
        Box::pin(self.head(text, max_tokens))
    }
}

/// Turns the engine's greedy pick into our seeded draw: every logit but the chosen
/// token's becomes -inf.
struct SeededPick {
    sampling: Sampling,
    key: u64,
}

impl CustomLogitsProcessor for SeededPick {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> candle_core::Result<Tensor> {
        let values: Vec<f32> = logits
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?;
        let uniform = uniform_draw(self.sampling.seed, self.key, context.len() as u64);
        let chosen = pick_token(
            &values,
            self.sampling.temperature,
            self.sampling.top_p,
            uniform,
        );
        let mut masked = vec![f32::NEG_INFINITY; values.len()];
        masked[chosen] = 0.0;
        Tensor::from_vec(masked, logits.shape(), logits.device())?.to_dtype(logits.dtype())
    }
}

fn locate(model: &str, allow_download: bool) -> Result<Source, String> {
    let path = Path::new(model);
    if !path.exists() {
        return if allow_download {
            Ok(Source::Hub(model.to_string()))
        } else {
            Err(
                "no such file or folder. summarize.model must be a local path (a .gguf file or \
                 a Hugging Face folder); to fetch a model id from the Hugging Face hub, set \
                 summarize.allow_download = true"
                    .into(),
            )
        };
    }
    if path.is_file() {
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            let file = path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            check_gguf_architecture(path)?;
            return Ok(Source::Gguf { dir, file });
        }
        return Err("not a model: expected a .gguf file or a Hugging Face model folder".into());
    }
    if path.join("config.json").is_file() {
        check_folder_architecture(&path.join("config.json"))?;
        return Ok(Source::Folder(path.to_path_buf()));
    }
    let ggufs: Vec<String> = std::fs::read_dir(path)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.to_ascii_lowercase().ends_with(".gguf"))
        .collect();
    match ggufs.as_slice() {
        [file] => {
            check_gguf_architecture(&path.join(file))?;
            Ok(Source::Gguf {
                dir: path.to_path_buf(),
                file: file.clone(),
            })
        }
        [] => Err(
            "not a model folder: it has neither config.json (Hugging Face layout) nor a .gguf file"
                .into(),
        ),
        many => Err(format!(
            "the folder holds several .gguf files ({}); name one file in summarize.model",
            many.join(", ")
        )),
    }
}

const BLOOM_HINT: &str = "mistral.rs has no BLOOM model; BLOOM, BLOOMZ and SeqGPT checkpoints \
                          need the seqgpt backend (summarize.backend = \"seqgpt\")";

fn check_gguf_architecture(path: &Path) -> Result<(), String> {
    let content = read_gguf(path)?;
    let architecture = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_default();
    if architecture == "bloom" {
        return Err(BLOOM_HINT.into());
    }
    Ok(())
}

fn check_folder_architecture(config: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(config).map_err(|e| format!("config.json: {e}"))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("config.json: {e}"))?;
    if json.get("model_type").and_then(|v| v.as_str()) == Some("bloom") {
        return Err(BLOOM_HINT.into());
    }
    Ok(())
}

fn read_gguf(path: &Path) -> Result<gguf_file::Content, String> {
    crate::gguf::read(path).map(|(_, content)| content)
}

/// The largest f32 copy of a GGUF file made without being asked (models up to ~250M
/// parameters): above it, memory holds four to eight times the quantized size, and
/// decoding, which reads every weight per token, is bound by memory bandwidth.
pub const AUTO_DEQUANTIZE_MAX_BYTES: u64 = 1 << 30;

/// Whether a GGUF file holds quantized weights whose f32 copy fits
/// [`AUTO_DEQUANTIZE_MAX_BYTES`].
fn worth_widening(path: &Path) -> Result<bool, String> {
    let content = read_gguf(path)?;
    let infos = content.tensor_infos.values();
    let quantized = infos.clone().any(|t| {
        !matches!(
            t.ggml_dtype,
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        )
    });
    let bytes: u64 = infos.map(|t| 4 * t.shape.elem_count() as u64).sum();
    Ok(quantized && bytes <= AUTO_DEQUANTIZE_MAX_BYTES)
}

/// The f32 copy of the GGUF file `source` in `cache`, made on first use: every tensor
/// dequantized (exactly: each quantized weight is `scale × q + min`, an f32), metadata
/// (tokenizer, chat template, architecture) kept. On CPU, candle multiplies f32 weights
/// with its GEMM, while quantized ones go one row at a time through a dot product, and for
/// Q4_1 a scalar one: SmolLM2-135M's Q4_1 file summarized 1.8x faster from its f32 copy
/// (scripts/bench-summarize). The copy's name carries a hash of the source's path, size
/// and modification time, and it is written under a temporary name and renamed, so a
/// changed source gets a new copy and an interrupted one is never loaded.
pub fn f32_copy(source: &Path, cache: &Path) -> Result<PathBuf, String> {
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    let meta = std::fs::metadata(source).map_err(|e| io("reading the GGUF file", e))?;
    let mut key = blake3::Hasher::new();
    let canonical = source
        .canonicalize()
        .map_err(|e| io("resolving the path", e))?;
    key.update(canonical.as_os_str().as_encoded_bytes());
    key.update(&meta.len().to_le_bytes());
    if let Some(since) = meta
        .modified()
        .ok()
        .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
    {
        key.update(&since.as_nanos().to_le_bytes());
    }
    let stem = source
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let hash = key.finalize().to_hex();
    let target = cache.join(format!("{stem}.{}.f32.gguf", &hash[..16]));
    if target.is_file() {
        return Ok(target);
    }
    std::fs::create_dir_all(cache).map_err(|e| io(&format!("creating {}", cache.display()), e))?;

    let (mut file, content) = crate::gguf::read(source)?;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let cpu = Device::Cpu;
    let tensors = names
        .iter()
        .map(|name| {
            let stored = content.tensor(&mut file, name, &cpu)?;
            QTensor::quantize(&stored.dequantize(&cpu)?, GgmlDType::F32)
        })
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(|e| format!("dequantizing: {e}"))?;
    // The writer aligns tensors to 32 bytes (the default) and the file type is now f32
    // throughout (llama.cpp's `ALL_F32`).
    let file_type = gguf_file::Value::U32(0);
    let mut metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.alignment")
        .map(|(k, v)| match k.as_str() {
            "general.file_type" => (k.as_str(), &file_type),
            _ => (k.as_str(), v),
        })
        .collect();
    metadata.sort_by_key(|(k, _)| *k);
    let named: Vec<(&str, &QTensor)> = names.iter().map(|n| n.as_str()).zip(&tensors).collect();

    // Its own partial file per call (loads in two processes, or two threads, may race:
    // each renames a whole copy into place).
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let partial = cache.join(format!(
        "{stem}.{}.f32.gguf.partial-{}-{call}",
        &hash[..16],
        std::process::id()
    ));
    let writing = format!("writing {}", partial.display());
    let written = File::create(&partial)
        .map_err(|e| io(&writing, e))
        .and_then(|f| {
            let mut out = std::io::BufWriter::new(f);
            gguf_file::write(&mut out, &metadata, &named).map_err(|e| format!("{writing}: {e}"))?;
            out.into_inner()
                .map_err(|e| io(&writing, e.into_error()))?
                .sync_all()
                .map_err(|e| io(&writing, e))
        })
        .and_then(|()| {
            std::fs::rename(&partial, &target)
                .map_err(|e| io(&format!("renaming to {}", target.display()), e))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written.map(|()| target)
}

/// Whether the model ships a chat template (GGUF metadata, or the files transformers reads).
fn has_chat_template(source: &Source) -> bool {
    match source {
        Source::Gguf { dir, file } => read_gguf(&dir.join(file))
            .map(|c| c.metadata.contains_key("tokenizer.chat_template"))
            .unwrap_or(false),
        Source::Folder(dir) => {
            dir.join("chat_template.jinja").is_file()
                || dir.join("chat_template.json").is_file()
                || std::fs::read_to_string(dir.join("tokenizer_config.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .is_some_and(|j| j.get("chat_template").is_some())
        }
        // A hub model is a chat model in nearly every case that matters here.
        Source::Hub(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cache_dir, cached_model_dir};

    async fn smollm2(max_num_seqs: usize) -> MistralRsGenerator {
        let options = MistralRsOptions {
            model: cached_model_dir("smollm2-135m-instruct")
                .to_string_lossy()
                .into_owned(),
            allow_download: false,
            device: Device::Cpu,
            isq: None,
            dequantize: None,
            f32_cache: cache_dir().join("f32"),
            max_num_seqs,
            paged_attention: PagedAttention::default(),
            prompt_format: PromptFormat::Auto,
            dtype: crate::Precision::Auto,
        };
        MistralRsGenerator::load(options)
            .await
            .unwrap_or_else(|e| panic!("{e} (run scripts/fetch-models)"))
    }

    fn request(prompt: &str, temperature: f64, key: u64) -> GenerationRequest {
        GenerationRequest {
            prompt: prompt.into(),
            sampling: Sampling {
                temperature,
                top_p: 0.95,
                max_new_tokens: 16,
                seed: 11,
            },
            key,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_answer_as_serial_ones_do() {
        let model = smollm2(4).await;
        assert!(model.is_chat(), "SmolLM2's GGUF carries a chat template");
        let prompts = [
            "Summarize: the printer on floor 3 is offline.",
            "Summarize: VPN drops every ten minutes.",
            "Summarize: my mailbox is full and I cannot receive mail.",
            "Summarize: Outlook crashes when opening attachments.",
        ];
        // Sampled at a high temperature: each draw depends on (seed, key, position) only.
        let requests: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| request(p, if i % 2 == 0 { 0.9 } else { 0.0 }, i as u64))
            .collect();
        let mut serial = Vec::new();
        for r in &requests {
            serial.push(model.generate(r.clone()).await.unwrap());
        }
        for g in &serial {
            assert!(
                g.completion_tokens > 0 && g.completion_tokens <= 16,
                "{g:?}"
            );
            assert!(g.prompt_tokens > 10, "the chat template adds tokens");
            assert!(!g.text.trim().is_empty());
        }
        let together = model.generate_batch(requests.clone()).await;
        for (alone, with_others) in serial.iter().zip(together) {
            assert_eq!(with_others.unwrap().text, alone.text);
        }
        // Another key draws differently somewhere in 16 tokens at this temperature.
        let mut other = requests[0].clone();
        let mut again = requests[0].clone();
        (other.key, again.key) = (100, 101);
        let other = model.generate(other).await.unwrap();
        let again = model.generate(again).await.unwrap();
        assert!(other.text != serial[0].text || again.text != serial[0].text);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn truncation_keeps_the_head_within_the_budget() {
        let model = smollm2(1).await;
        let text = "The VPN disconnects every ten minutes. ".repeat(40);
        let head = model.truncate(text.clone(), 12).await.unwrap();
        assert!(
            head.text.len() < 80 && text.starts_with(head.text.trim_end()),
            "{head:?}"
        );
        assert!(head.cut_tokens > 12 * 20, "{head:?}");
        let short = model.truncate("short".into(), 12).await.unwrap();
        assert_eq!(short, Head::whole("short".into()));
        let long_prompt = "word ".repeat(9000);
        let err = model
            .generate(request(&long_prompt, 0.0, 1))
            .await
            .unwrap_err();
        assert!(matches!(err, GeneratorError::Request(_)), "{err}");
        // The engine survives a refused request.
        assert!(model.generate(request("Say hi.", 0.0, 1)).await.is_ok());
    }

    #[test]
    fn f32_copies_hold_the_stored_weights_exactly_and_are_made_once() {
        let source =
            cached_model_dir("smollm2-135m-instruct").join("SmolLM2-135M-Instruct.Q4_1.gguf");
        let cache = tempfile::tempdir().unwrap();
        let copy = f32_copy(&source, cache.path()).unwrap();
        let made = std::fs::metadata(&copy).unwrap().modified().unwrap();
        assert_eq!(f32_copy(&source, cache.path()).unwrap(), copy);
        assert_eq!(std::fs::metadata(&copy).unwrap().modified().unwrap(), made);
        assert_eq!(
            std::fs::read_dir(cache.path()).unwrap().count(),
            1,
            "no partial left"
        );

        let (stored, widened) = (read_gguf(&source).unwrap(), read_gguf(&copy).unwrap());
        assert!(worth_widening(&source).unwrap());
        assert!(
            !worth_widening(&copy).unwrap(),
            "an f32 file is not widened again"
        );
        let mut keys: Vec<_> = stored.metadata.keys().collect();
        keys.retain(|k| !matches!(k.as_str(), "general.alignment" | "general.file_type"));
        for key in keys {
            assert_eq!(
                format!("{:?}", stored.metadata[key]),
                format!("{:?}", widened.metadata[key]),
                "{key}"
            );
        }
        assert_eq!(stored.tensor_infos.len(), widened.tensor_infos.len());
        let (mut a, mut b) = (File::open(&source).unwrap(), File::open(&copy).unwrap());
        for name in [
            "blk.0.attn_q.weight",
            "blk.29.ffn_down.weight",
            "token_embd.weight",
        ] {
            let q = stored.tensor(&mut a, name, &Device::Cpu).unwrap();
            let f = widened.tensor(&mut b, name, &Device::Cpu).unwrap();
            assert_ne!(q.dtype(), GgmlDType::F32, "{name} is stored quantized");
            assert_eq!(f.dtype(), GgmlDType::F32);
            let q = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
            let f = f.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
            assert_eq!(
                q.to_vec1::<f32>().unwrap(),
                f.to_vec1::<f32>().unwrap(),
                "{name}"
            );
        }
    }

    #[test]
    fn locates_gguf_files_folders_and_refuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = locate(missing.to_str().unwrap(), false).unwrap_err();
        assert!(err.contains("allow_download"), "{err}");
        assert_eq!(
            locate("org/model", true).unwrap(),
            Source::Hub("org/model".into())
        );
        let err = locate(dir.path().to_str().unwrap(), false).unwrap_err();
        assert!(err.contains("neither config.json"), "{err}");
        let text = dir.path().join("weights.bin");
        std::fs::write(&text, b"x").unwrap();
        assert!(
            locate(text.to_str().unwrap(), false)
                .unwrap_err()
                .contains("not a model")
        );
        let fake = dir.path().join("a.gguf");
        std::fs::write(&fake, b"not gguf").unwrap();
        let err = locate(fake.to_str().unwrap(), false).unwrap_err();
        assert!(err.contains("not a readable GGUF"), "{err}");
        std::fs::write(dir.path().join("b.gguf"), b"x").unwrap();
        let err = locate(dir.path().to_str().unwrap(), false).unwrap_err();
        assert!(err.contains("several .gguf files"), "{err}");
        let bloom = tempfile::tempdir().unwrap();
        std::fs::write(
            bloom.path().join("config.json"),
            r#"{"model_type": "bloom", "n_layer": 2}"#,
        )
        .unwrap();
        let err = locate(bloom.path().to_str().unwrap(), false).unwrap_err();
        assert!(err.contains("seqgpt backend"), "{err}");
    }
}
