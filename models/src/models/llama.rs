//! Llama-architecture GGUF files (SmolLM2, TinyLlama, Llama 2 and 3.0 and the like:
//! plain rotary positions, no rope scaling) and Qwen2 ones (Qwen2, Qwen2.5: the same
//! blocks with biases on q, k and v, and rotary positions over half-heads) on abridge's own
//! batch engine, for CPUs: mistral.rs 0.8.1 decodes one sequence at a time there, a matrix
//! product per row, and ran SmolLM2-135M at 0.29x of llama.cpp (README, Summarize). Here
//! a decoding step multiplies the whole batch through each weight once, as the BLOOM
//! engine does ([`super::bloom`]), sharing its attention kernel, its caches and its
//! products.
//!
//! token embeddings → per layer { RMSNorm → fused q, k, v (+ bias) → rotary positions →
//! grouped-query attention → output + residual → RMSNorm → SwiGLU MLP + residual } →
//! RMSNorm → logits (the output matrix, or the tied embeddings).
//!
//! Past 800 lines with its tests (a quarter of it), which check the GGUF tokenizer, chat
//! template and logits against transformers.
//!
//! Weights are dequantized once at load to f32 (each quantized weight is `scale × q (+
//! min)`, exactly an f32), so logits follow transformers' float32 forward of the same
//! file (tests against `tests/fixtures/smollm2-reference.json`, from
//! `scripts/make-llama-fixture.py`; Qwen2 against `tests/fixtures/qwen2-tiny-reference.json`,
//! from `scripts/make-qwen2-fixture.py`). GGUF stores a Llama's q and k rows permuted for
//! llama.cpp's rotary layout (pairs of adjacent values); a Qwen2's as transformers has them
//! (value `i` paired with `i + d/2`): [`RopeStyle`] says which.

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use tokenizers::Tokenizer;

use crate::engine::attention::{QueryLayout, attend_rows, timed};
use crate::engine::batch::{BatchGenerator, BatchModel, Chat};
use crate::engine::chat::render_chat;
use crate::engine::kv::{HeadsKv, SequenceCache, SequenceKv};
use crate::engine::packed::{PackedRows, pack_weight, product};
use crate::engine::paged::{BlockTable, PagedKv};
use crate::generator::GeneratorError;
use crate::kernels;

/// Which values of a head rotary positions turn together: the layout of the file's q and k
/// rows, which llama.cpp's converter permutes for Llama and leaves as they are for Qwen2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Values `2i` and `2i + 1` (llama.cpp's "normal" rope, Llama files).
    Adjacent,
    /// Values `i` and `i + d/2` (llama.cpp's "neox" rope, Qwen2 files).
    HalfHead,
}

/// The architectures this engine reads, as `general.architecture` names them.
const ARCHITECTURES: [&str; 2] = ["llama", "qwen2"];

/// What the GGUF metadata says of a Llama or Qwen2 model.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    /// `llama` or `qwen2`: the prefix of its metadata keys.
    pub architecture: String,
    pub rope_style: RopeStyle,
    pub hidden_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    pub context_length: usize,
    pub eos_token_id: Option<u32>,
}

impl LlamaConfig {
    fn from_gguf(content: &gguf_file::Content) -> Result<Self, String> {
        let arch = text(content, "general.architecture")?;
        if !ARCHITECTURES.contains(&arch) {
            return Err(format!(
                "architecture `{arch}`: abridge's own engine runs `llama` and `qwen2` GGUF files"
            ));
        }
        let number = |key: &str| -> Result<usize, String> {
            let value = content
                .metadata
                .get(&format!("{arch}.{key}"))
                .ok_or_else(|| format!("no `{arch}.{key}` in its metadata"))?;
            value
                .to_u64()
                .map(|v| v as usize)
                .or_else(|_| value.to_u32().map(|v| v as usize))
                .map_err(|e| format!("`{arch}.{key}`: {e}"))
        };
        let float = |key: &str, default: f32| -> Result<f32, String> {
            match content.metadata.get(&format!("{arch}.{key}")) {
                None => Ok(default),
                Some(v) => v.to_f32().map_err(|e| format!("`{arch}.{key}`: {e}")),
            }
        };
        let hidden_size = number("embedding_length")?;
        let heads = number("attention.head_count")?;
        let kv_heads = number("attention.head_count_kv").unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || hidden_size % heads != 0 || heads % kv_heads != 0 {
            return Err(format!(
                "{heads} heads and {kv_heads} key/value heads over a hidden size of {hidden_size}"
            ));
        }
        let head_dim = hidden_size / heads;
        if number("rope.dimension_count").is_ok_and(|d| d != head_dim) || head_dim % 2 != 0 {
            return Err("rotary positions over part of a head are not supported".into());
        }
        refuse_rope_scaling(content, arch)?;
        Ok(Self {
            architecture: arch.to_string(),
            rope_style: match arch {
                "qwen2" => RopeStyle::HalfHead,
                _ => RopeStyle::Adjacent,
            },
            hidden_size,
            layers: number("block_count")?,
            heads,
            kv_heads,
            head_dim,
            rope_theta: float("rope.freq_base", 10_000.0)?,
            rms_eps: float("attention.layer_norm_rms_epsilon", 1e-5)?,
            context_length: number("context_length").unwrap_or(4096),
            eos_token_id: content
                .metadata
                .get("tokenizer.ggml.eos_token_id")
                .and_then(|v| v.to_u32().ok()),
        })
    }
}

/// Rotary positions stretched for long contexts (Llama 3.1's and 3.2's `rope_freqs`
/// factors, linear or YaRN scaling) change every position's angle; this engine has been
/// checked against transformers only without them, so a file that uses them is refused by
/// name rather than summarized wrongly (the `mistralrs` backend runs such files).
fn refuse_rope_scaling(content: &gguf_file::Content, arch: &str) -> Result<(), String> {
    let key = format!("{arch}.rope.scaling.type");
    let scaling = content
        .metadata
        .get(&key)
        .and_then(|v| v.to_string().ok())
        .filter(|kind| kind.as_str() != "none");
    let scaled = match scaling {
        Some(kind) => Some(format!("`{key}` = {kind:?}")),
        None => content
            .tensor_infos
            .contains_key("rope_freqs.weight")
            .then(|| "a `rope_freqs.weight` tensor (Llama 3.1/3.2 rope scaling)".to_string()),
    };
    match scaled {
        Some(what) => Err(format!(
            "it scales rotary positions ({what}), which abridge's own engine does not \
             support: use `backend = \"mistralrs\"` for this file"
        )),
        None => Ok(()),
    }
}

fn text<'a>(content: &'a gguf_file::Content, key: &str) -> Result<&'a str, String> {
    content
        .metadata
        .get(key)
        .ok_or_else(|| format!("no `{key}` in its metadata"))?
        .to_string()
        .map(String::as_str)
        .map_err(|e| format!("`{key}`: {e}"))
}

/// A string array of the metadata.
fn strings<'a>(content: &'a gguf_file::Content, key: &str) -> Result<Vec<&'a str>, String> {
    let values = content
        .metadata
        .get(key)
        .ok_or_else(|| format!("no `{key}` in its metadata"))?
        .to_vec()
        .map_err(|e| format!("`{key}`: {e}"))?;
    values
        .iter()
        .map(|v| {
            v.to_string()
                .map(String::as_str)
                .map_err(|e| format!("`{key}`: {e}"))
        })
        .collect()
}

/// The byte-level BPE tokenizer (`tokenizer.ggml.model = "gpt2"`) the metadata describes,
/// with control tokens (`<|im_start|>` ...) as special tokens, split into words first as
/// the file's pre-tokenizer (`tokenizer.ggml.pre`) says, the way llama.cpp does: `smollm`
/// splits numbers into single digits, `qwen2` splits by Qwen2's pattern (single digits,
/// words with one leading symbol) after NFC normalization, as its `tokenizer.json` does.
pub fn gguf_tokenizer(content: &gguf_file::Content) -> Result<Tokenizer, String> {
    let model = text(content, "tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(format!(
            "tokenizer `{model}`: abridge's own engine reads byte-level BPE (`gpt2`) tokenizers"
        ));
    }
    let tokens = strings(content, "tokenizer.ggml.tokens")?;
    let merges = strings(content, "tokenizer.ggml.merges")?;
    let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
        None => Vec::new(),
        Some(v) => v
            .to_vec()
            .map_err(|e| format!("`tokenizer.ggml.token_type`: {e}"))?
            .iter()
            .map(|t| t.to_i32().unwrap_or(1))
            .collect(),
    };
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.to_string(), id.into()))
        .collect();
    // llama.cpp's token types: 1 normal, 3 control, 4 user-defined.
    let added: Vec<serde_json::Value> = types
        .iter()
        .enumerate()
        .filter(|&(_, &t)| t == 3 || t == 4)
        .filter_map(|(id, &t)| {
            Some(serde_json::json!({
                "id": id, "content": tokens.get(id)?, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": t == 3,
            }))
        })
        .collect();
    let byte_level = serde_json::json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true,
    });
    let pre = content
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str);
    let (normalizer, pre_tokenizer) = match pre {
        Some("smollm") => (
            serde_json::Value::Null,
            serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level,
            ]}),
        ),
        Some("qwen2") => (
            serde_json::json!({"type": "NFC"}),
            serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated",
                 "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false,
                 "use_regex": false},
            ]}),
        ),
        _ => (serde_json::Value::Null, byte_level.clone()),
    };
    let json = serde_json::json!({
        "version": "1.0",
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    });
    json.to_string()
        .parse::<Tokenizer>()
        .map_err(|e| format!("its tokenizer: {e}"))
}

/// Qwen2's word pattern (its `tokenizer.json`; llama.cpp's `qwen2` pre-tokenizer).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

struct Layer {
    attn_norm: Tensor,
    /// q, k and v stacked: one product.
    qkv: Tensor,
    /// Their biases, stacked the same way (Qwen2).
    qkv_bias: Option<Tensor>,
    output: Tensor,
    ffn_norm: Tensor,
    /// gate and up stacked: one product.
    gate_up: Tensor,
    down: Tensor,
    /// qkv, output, gate_up, down packed for decoding steps.
    packed: [PackedRows; 4],
}

/// A loaded Llama model (CPU).
pub struct Llama {
    config: LlamaConfig,
    embeddings: Tensor,
    layers: Vec<Layer>,
    final_norm: Tensor,
    /// The output matrix (the embeddings where tied), and its packed copy.
    head: Tensor,
    head_packed: PackedRows,
    /// Rotary frequencies, one per pair of a head's values.
    inverse_frequencies: Vec<f32>,
}

/// What a GGUF file holds for abridge's engine.
pub struct LoadedGguf {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    /// The text of the begin- and end-of-sequence tokens, for chat templates.
    pub bos_token: String,
    pub eos_token: String,
}

impl Llama {
    /// Reads a Llama or Qwen2 GGUF file: metadata, tokenizer, chat template, weights (dequantized),
    /// with the copies decoding steps read in `packed`: `F32` holds the dequantized
    /// weights exactly; `F16` rounds them (relative error under 2⁻¹¹) for half the bytes
    /// a step reads.
    pub fn load(path: &Path, packed: DType) -> Result<LoadedGguf, GeneratorError> {
        let fail = |reason: String| GeneratorError::Load {
            model: path.display().to_string(),
            reason,
        };
        let (mut file, content) = crate::gguf::read(path).map_err(&fail)?;
        let config = LlamaConfig::from_gguf(&content).map_err(&fail)?;
        let tokenizer = gguf_tokenizer(&content).map_err(&fail)?;
        let cpu = Device::Cpu;
        let mut read = |name: &str| -> Result<Tensor, GeneratorError> {
            content
                .tensor(&mut file, name, &cpu)
                .and_then(|t| t.dequantize(&cpu))
                .map_err(|e| fail(format!("tensor `{name}`: {e}")))
        };
        let stack = |parts: &[Tensor]| Tensor::cat(parts, 0);
        // The header's layer count is not trusted for an allocation: each layer has tensors.
        let mut layers = Vec::with_capacity(config.layers.min(content.tensor_infos.len()));
        for i in 0..config.layers {
            let qkv_bias = match content
                .tensor_infos
                .contains_key(&format!("blk.{i}.attn_q.bias"))
            {
                false => None,
                true => {
                    let mut bias = |part: &str| read(&format!("blk.{i}.{part}.bias"));
                    let parts = [bias("attn_q")?, bias("attn_k")?, bias("attn_v")?];
                    Some(stack(&parts).map_err(|e| fail(format!("layer {i}: {e}")))?)
                }
            };
            let mut get = |part: &str| read(&format!("blk.{i}.{part}.weight"));
            let (q, k, v) = (get("attn_q")?, get("attn_k")?, get("attn_v")?);
            let (gate, up) = (get("ffn_gate")?, get("ffn_up")?);
            let attn_norm = get("attn_norm")?;
            let output = get("attn_output")?;
            let ffn_norm = get("ffn_norm")?;
            let down = get("ffn_down")?;
            let packing = || -> candle_core::Result<(Tensor, Tensor, [PackedRows; 4])> {
                let qkv = stack(&[q, k, v])?;
                let gate_up = stack(&[gate, up])?;
                let packs = [
                    pack_weight(&qkv, packed)?,
                    pack_weight(&output, packed)?,
                    pack_weight(&gate_up, packed)?,
                    pack_weight(&down, packed)?,
                ];
                Ok((qkv, gate_up, packs))
            };
            let (qkv, gate_up, packs) = packing().map_err(|e| fail(format!("layer {i}: {e}")))?;
            let expected = (
                (config.heads + 2 * config.kv_heads) * config.head_dim,
                config.hidden_size,
            );
            if qkv.dims2().ok() != Some(expected) {
                return Err(fail(format!(
                    "layer {i}: q, k, v are {:?}, expected {expected:?}",
                    qkv.dims()
                )));
            }
            if let Some(bias) = &qkv_bias
                && bias.dims() != [expected.0]
            {
                return Err(fail(format!(
                    "layer {i}: the biases of q, k, v are {:?}, expected [{}]",
                    bias.dims(),
                    expected.0
                )));
            }
            layers.push(Layer {
                attn_norm,
                qkv,
                qkv_bias,
                output,
                ffn_norm,
                gate_up,
                down,
                packed: packs,
            });
        }
        let embeddings = read("token_embd.weight")?;
        let head = if content.tensor_infos.contains_key("output.weight") {
            read("output.weight")?
        } else {
            embeddings.clone()
        };
        let head_packed = pack_weight(&head, packed).map_err(|e| fail(e.to_string()))?;
        let final_norm = read("output_norm.weight")?;
        let half = config.head_dim / 2;
        let inverse_frequencies = (0..half)
            .map(|i| {
                1.0 / config
                    .rope_theta
                    .powf((2 * i) as f32 / config.head_dim as f32)
            })
            .collect();
        let tokens = strings(&content, "tokenizer.ggml.tokens").unwrap_or_default();
        let token = |key: &str| -> String {
            content
                .metadata
                .get(key)
                .and_then(|v| v.to_u32().ok())
                .and_then(|id| tokens.get(id as usize).map(|t| t.to_string()))
                .unwrap_or_default()
        };
        let chat_template = content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        Ok(LoadedGguf {
            bos_token: token("tokenizer.ggml.bos_token_id"),
            eos_token: token("tokenizer.ggml.eos_token_id"),
            chat_template,
            tokenizer,
            model: Self {
                config,
                embeddings,
                layers,
                final_norm,
                head,
                head_packed,
                inverse_frequencies,
            },
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Runs new prompts through the model together, each with room in its cache for that
    /// many more tokens: the logits of each prompt's last token `(prompts, vocab)` and the
    /// caches. Tokens of all prompts are stacked for the products; attention runs per
    /// prompt, so nothing is padded.
    pub fn prefill(
        &self,
        prompts: &[(&[u32], usize)],
    ) -> candle_core::Result<(Tensor, Vec<SequenceCache>)> {
        if prompts.iter().any(|(p, _)| p.is_empty()) {
            candle_core::bail!("an empty prompt");
        }
        // Each token's prompt and position in it.
        let places: Vec<(usize, usize)> = prompts
            .iter()
            .enumerate()
            .flat_map(|(i, (p, _))| (0..p.len()).map(move |t| (i, t)))
            .collect();
        let ids: Vec<u32> = prompts
            .iter()
            .flat_map(|(p, _)| p.iter().copied())
            .collect();
        let (kv_heads, dim) = (self.config.kv_heads, self.config.head_dim);
        let mut own: Vec<Vec<HeadsKv>> = prompts
            .iter()
            .map(|_| Vec::with_capacity(self.config.layers))
            .collect();
        let hidden = self.layers_forward(&ids, |qkv| {
            let positions: Vec<usize> = places.iter().map(|&(_, t)| t).collect();
            let qkv = self.rotate(qkv, &positions)?;
            let mut start = 0;
            for ((prompt, answer), layers) in prompts.iter().zip(&mut own) {
                let mut kv = HeadsKv::with_room(kv_heads, dim, prompt.len() + answer);
                for t in start..start + prompt.len() {
                    let (key, value) = self.key_value(&qkv, t);
                    kv.push_with(|h| (&key[h * dim..][..dim], &value[h * dim..][..dim]));
                }
                layers.push(kv);
                start += prompt.len();
            }
            let attending: Vec<(&HeadsKv, usize)> = places
                .iter()
                .map(|&(prompt, t)| own[prompt].last().map(|kv| (kv, t + 1)))
                .collect::<Option<_>>()
                .ok_or_else(|| candle_core::Error::Msg("a prompt without its cache".into()))?;
            self.attention(&qkv, &attending)
        })?;
        let mut last = Vec::with_capacity(prompts.len());
        let mut end = 0;
        for (prompt, _) in prompts {
            end += prompt.len();
            last.push((end - 1) as u32);
        }
        let last = hidden.index_select(&Tensor::new(last, hidden.device())?, 0)?;
        let caches = own
            .into_iter()
            .zip(prompts)
            .map(|(layers, (prompt, _))| SequenceCache {
                kv: SequenceKv::Own(layers),
                len: prompt.len(),
            })
            .collect();
        Ok((self.logits(&last)?, caches))
    }

    /// One decoding step: `tokens[i]` is the newest token of the sequence whose cache is
    /// `caches[i]`. Returns the next token's logits `(batch, vocab)`; each cache then holds
    /// its token too.
    pub fn decode_step(
        &self,
        tokens: &[u32],
        caches: &mut [&mut SequenceCache],
    ) -> candle_core::Result<Tensor> {
        if caches.len() != tokens.len() {
            candle_core::bail!("{} tokens for {} caches", tokens.len(), caches.len());
        }
        let dim = self.config.head_dim;
        let positions: Vec<usize> = caches.iter().map(|c| c.len).collect();
        let mut layer = 0;
        let hidden = self.layers_forward(tokens, |qkv| {
            let qkv = self.rotate(qkv, &positions)?;
            for (b, cache) in caches.iter_mut().enumerate() {
                let SequenceKv::Own(layers) = &mut cache.kv else {
                    candle_core::bail!("a Llama sequence in blocks");
                };
                let (key, value) = self.key_value(&qkv, b);
                layers[layer].push_with(|h| (&key[h * dim..][..dim], &value[h * dim..][..dim]));
            }
            let mut attending = Vec::with_capacity(caches.len());
            for cache in caches.iter() {
                let SequenceKv::Own(layers) = &cache.kv else {
                    candle_core::bail!("a Llama sequence in blocks");
                };
                attending.push((&layers[layer], cache.len + 1));
            }
            layer += 1;
            timed(&Device::Cpu, || self.attention(&qkv, &attending))
        })?;
        for cache in caches.iter_mut() {
            cache.len += 1;
        }
        self.logits(&hidden)
    }

    /// The final hidden states of `ids` through every layer, where `attention` turns a
    /// layer's rows of q, k, v (row-major, one row per token) into its context rows.
    fn layers_forward(
        &self,
        ids: &[u32],
        mut attention: impl FnMut(Vec<f32>) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let eps = self.config.rms_eps;
        let ids = Tensor::new(ids, self.embeddings.device())?;
        let mut hidden = self.embeddings.index_select(&ids, 0)?;
        for layer in &self.layers {
            let normed = candle_nn::ops::rms_norm(&hidden, &layer.attn_norm, eps)?;
            let qkv = product(
                &layer.qkv,
                Some(&layer.packed[0]),
                layer.qkv_bias.as_ref(),
                &normed,
            )?;
            let context = attention(qkv.flatten_all()?.to_vec1::<f32>()?)?;
            hidden = (product(&layer.output, Some(&layer.packed[1]), None, &context)? + hidden)?;
            let normed = candle_nn::ops::rms_norm(&hidden, &layer.ffn_norm, eps)?;
            let gate_up = product(&layer.gate_up, Some(&layer.packed[2]), None, &normed)?;
            let act = kernels::swiglu(&gate_up)?;
            hidden = (product(&layer.down, Some(&layer.packed[3]), None, &act)? + hidden)?;
        }
        candle_nn::ops::rms_norm(&hidden, &self.final_norm, eps)
    }

    fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        product(&self.head, Some(&self.head_packed), None, hidden)
    }

    /// Width of a token's q, k, v row.
    fn qkv_width(&self) -> usize {
        (self.config.heads + 2 * self.config.kv_heads) * self.config.head_dim
    }

    /// Token `t`'s keys and values (all key/value heads) in rows of q, k, v.
    fn key_value<'a>(&self, qkv: &'a [f32], t: usize) -> (&'a [f32], &'a [f32]) {
        let (q, kv) = (
            self.config.heads * self.config.head_dim,
            self.config.kv_heads * self.config.head_dim,
        );
        let row = &qkv[t * self.qkv_width()..][..self.qkv_width()];
        (&row[q..q + kv], &row[q + kv..])
    }

    /// Rotary positions on the queries and keys of rows of q, k, v: in each head, the
    /// pair of values `2i, 2i + 1` (or `i, i + d/2`, by [`RopeStyle`]) turned by
    /// `position × θ^(−2i/d)`.
    fn rotate(&self, mut qkv: Vec<f32>, positions: &[usize]) -> candle_core::Result<Vec<f32>> {
        let width = self.qkv_width();
        if qkv.len() != positions.len() * width {
            candle_core::bail!("{} values for {} tokens", qkv.len(), positions.len());
        }
        let dim = self.config.head_dim;
        let half = dim / 2;
        let style = self.config.rope_style;
        let rotated = (self.config.heads + self.config.kv_heads) * dim;
        qkv.par_chunks_mut(width)
            .zip(positions)
            .for_each(|(row, &position)| {
                let angles: Vec<(f32, f32)> = self
                    .inverse_frequencies
                    .iter()
                    .map(|f| {
                        let angle = position as f32 * f;
                        (angle.cos(), angle.sin())
                    })
                    .collect();
                let turn = |a: &mut f32, b: &mut f32, (cos, sin): (f32, f32)| {
                    (*a, *b) = (*a * cos - *b * sin, *a * sin + *b * cos);
                };
                for head in row[..rotated].chunks_exact_mut(dim) {
                    match style {
                        RopeStyle::Adjacent => {
                            for (pair, &angle) in head.chunks_exact_mut(2).zip(&angles) {
                                let [a, b] = pair else { continue };
                                turn(a, b, angle);
                            }
                        }
                        RopeStyle::HalfHead => {
                            let (firsts, seconds) = head.split_at_mut(half);
                            for ((a, b), &angle) in firsts.iter_mut().zip(seconds).zip(&angles) {
                                turn(a, b, angle);
                            }
                        }
                    }
                }
            });
        Ok(qkv)
    }

    /// Attention of every (token, head) of rows of q, k, v over the first `tokens` of its
    /// sequence's cache (`attending[t]`), a query head reading its group's key/value head.
    fn attention(
        &self,
        qkv: &[f32],
        attending: &[(&HeadsKv, usize)],
    ) -> candle_core::Result<Tensor> {
        let (heads, dim) = (self.config.heads, self.config.head_dim);
        let layout = QueryLayout {
            row: self.qkv_width(),
            head: dim,
        };
        let shape = (heads, self.config.kv_heads, dim);
        let context = attend_rows(qkv, layout, attending, shape, None);
        Tensor::from_vec(context, (attending.len(), heads * dim), &Device::Cpu)
    }
}

impl BatchModel for Llama {
    fn family(&self) -> &'static str {
        match self.config.architecture.as_str() {
            "qwen2" => "Qwen2",
            _ => "Llama",
        }
    }

    fn eos_token_id(&self) -> Option<u32> {
        self.config().eos_token_id
    }

    fn context_length(&self) -> Option<usize> {
        Some(self.config().context_length)
    }

    fn prefill(
        &self,
        prompts: &[(&[u32], usize)],
        paged: Option<(&mut PagedKv, &[BlockTable])>,
    ) -> candle_core::Result<(Tensor, Vec<SequenceCache>)> {
        refuse_paged(paged.is_some())?;
        Llama::prefill(self, prompts)
    }

    fn decode_step(
        &self,
        tokens: &[u32],
        caches: &mut [&mut SequenceCache],
        paged: Option<&mut PagedKv>,
    ) -> candle_core::Result<Tensor> {
        refuse_paged(paged.is_some())?;
        Llama::decode_step(self, tokens, caches)
    }
}

/// Llama's caches are its own vectors: a paged pool is refused (the backend is CPU-only).
fn refuse_paged(paged: bool) -> candle_core::Result<()> {
    if paged {
        candle_core::bail!("paged attention is not implemented for Llama in this engine");
    }
    Ok(())
}

impl BatchGenerator {
    /// Loads the Llama or Qwen2 GGUF file `path` (on CPU) and starts its engine, which decodes up
    /// to `max_batch` sequences at a time. Prompts go in as the user turn of the file's
    /// chat template when `chat` and it has one.
    pub fn load_llama(path: &Path, max_batch: usize, chat: bool) -> Result<Self, GeneratorError> {
        // Decoding reads f16 copies of the dequantized weights: half the bytes per step.
        let loaded = Llama::load(path, DType::F16)?;
        let chat = loaded.chat_template.filter(|_| chat).map(|template| Chat {
            template,
            bos_token: loaded.bos_token,
            eos_token: loaded.eos_token,
        });
        if let Some(chat) = &chat {
            render_chat(&chat.template, "", &chat.bos_token, &chat.eos_token).map_err(
                |reason| GeneratorError::Load {
                    model: path.display().to_string(),
                    reason,
                },
            )?;
        }
        Self::start(
            loaded.model,
            loaded.tokenizer,
            chat,
            max_batch.max(1),
            None,
            path.display().to_string(),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;
    use crate::cached_model_dir;

    /// SmolLM2 with its decoding copies in `packed`.
    fn smollm2(packed: DType) -> LoadedGguf {
        let path =
            cached_model_dir("smollm2-135m-instruct").join("SmolLM2-135M-Instruct.Q4_1.gguf");
        Llama::load(&path, packed).unwrap_or_else(|e| panic!("{e} (run scripts/fetch-models)"))
    }

    #[test]
    fn rope_scaling_is_refused_by_name() {
        let path =
            cached_model_dir("smollm2-135m-instruct").join("SmolLM2-135M-Instruct.Q4_1.gguf");
        let header = || {
            let mut file = File::open(&path).expect("run scripts/fetch-models");
            gguf_file::Content::read(&mut file).expect("a GGUF header")
        };
        assert!(LlamaConfig::from_gguf(&header()).is_ok());
        let mut yarn = header();
        yarn.metadata.insert(
            "llama.rope.scaling.type".into(),
            gguf_file::Value::String("yarn".into()),
        );
        let err = LlamaConfig::from_gguf(&yarn).unwrap_err();
        assert!(
            err.contains("\"yarn\"") && err.contains("mistralrs"),
            "{err}"
        );
        let mut llama31 = header();
        let factors = gguf_file::TensorInfo {
            ggml_dtype: candle_core::quantized::GgmlDType::F32,
            shape: candle_core::Shape::from(32),
            offset: 0,
        };
        llama31
            .tensor_infos
            .insert("rope_freqs.weight".into(), factors);
        let err = LlamaConfig::from_gguf(&llama31).unwrap_err();
        assert!(err.contains("rope_freqs"), "{err}");
    }

    fn reference(name: &str) -> serde_json::Value {
        let path = fixture(name);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("the reference fixture {}: {e}", path.display()));
        serde_json::from_str(&text).expect("its JSON")
    }

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(name)
    }

    /// The random tiny Qwen2 of `scripts/make-qwen2-fixture.py tiny`.
    fn qwen2_tiny(packed: DType) -> LoadedGguf {
        Llama::load(&fixture("qwen2-tiny.gguf"), packed).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The real Qwen2.5 Coder 0.5B, or None (and why, on stderr) where it is not cached:
    /// it is opt-in (`scripts/fetch-models qwen`).
    fn qwen2_5(packed: DType) -> Option<LoadedGguf> {
        let path = cached_model_dir("qwen2.5-coder-0.5b-instruct")
            .join("qwen2.5-coder-0.5b-instruct.gguf");
        if !path.is_file() {
            eprintln!(
                "skipped: {} is not cached (scripts/fetch-models qwen)",
                path.display()
            );
            return None;
        }
        Some(Llama::load(&path, packed).unwrap_or_else(|e| panic!("{e}")))
    }

    fn numbers<T: TryFrom<u64>>(value: &serde_json::Value) -> Vec<T> {
        value
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_u64().and_then(|v| T::try_from(v).ok()))
            .collect()
    }

    fn floats(value: &serde_json::Value) -> Vec<f32> {
        value
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_f64().map(|v| v as f32))
            .collect()
    }

    fn cases(reference: &serde_json::Value) -> &Vec<serde_json::Value> {
        reference["cases"].as_array().expect("cases")
    }

    /// The chat template's text and its token ids, and the ids of the reference's plain
    /// texts, as transformers makes them.
    fn prompts_match(loaded: &LoadedGguf, reference: &serde_json::Value) {
        let template = loaded.chat_template.as_deref().expect("a chat template");
        for case in cases(reference) {
            let prompt = case["prompt"].as_str().expect("prompt");
            let text = render_chat(template, prompt, &loaded.bos_token, &loaded.eos_token)
                .expect("renders");
            assert_eq!(Some(text.as_str()), case["text"].as_str());
            let ids = loaded
                .tokenizer
                .encode(text.as_str(), false)
                .expect("encodes");
            assert_eq!(
                ids.get_ids(),
                numbers::<u32>(&case["ids"]).as_slice(),
                "{prompt}"
            );
        }
        for case in reference["texts"].as_array().into_iter().flatten() {
            let text = case["text"].as_str().expect("text");
            let ids = loaded.tokenizer.encode(text, false).expect("encodes");
            assert_eq!(
                ids.get_ids(),
                numbers::<u32>(&case["ids"]).as_slice(),
                "{text:?}"
            );
            let back = loaded
                .tokenizer
                .decode(ids.get_ids(), true)
                .expect("decodes");
            assert_eq!(back, text);
        }
    }

    #[test]
    fn chat_template_and_tokenizer_give_transformers_prompts() {
        let loaded = smollm2(DType::F16);
        prompts_match(&loaded, &reference("smollm2-reference.json"));
        // llama.cpp's `smollm` pre-tokenizer: numbers are single digits.
        let digits = loaded.tokenizer.encode("12 jobs", false).expect("encodes");
        let pieces: Vec<String> = digits
            .get_ids()
            .iter()
            .map(|&id| loaded.tokenizer.decode(&[id], false).unwrap_or_default())
            .collect();
        assert_eq!(pieces[..2], ["1", "2"]);
        let back = loaded
            .tokenizer
            .decode(digits.get_ids(), true)
            .expect("decodes");
        assert_eq!(back, "12 jobs");
    }

    /// Logits of each reference prompt's last position: prefilled alone, and together,
    /// within `tolerance` of transformers'.
    fn prefill_logits_match(model: &Llama, reference: &serde_json::Value, tolerance: f32) {
        let fixed: Vec<usize> = numbers(&reference["fixed_ids"]);
        let prompts: Vec<Vec<u32>> = cases(reference)
            .iter()
            .map(|c| numbers(&c["ids"]))
            .collect();
        let alone: Vec<Vec<f32>> = prompts
            .iter()
            .map(|p| {
                let (logits, _) = model.prefill(&[(p, 0)]).expect("prefill");
                logits
                    .flatten_all()
                    .and_then(|l| l.to_vec1())
                    .expect("logits")
            })
            .collect();
        let together: Vec<(&[u32], usize)> = prompts.iter().map(|p| (p.as_slice(), 4)).collect();
        let (logits, caches) = model.prefill(&together).expect("prefill");
        let together = logits.to_vec2::<f32>().expect("logits");
        assert_eq!(
            caches.iter().map(|c| c.len()).collect::<Vec<_>>(),
            prompts.iter().map(Vec::len).collect::<Vec<_>>()
        );
        for ((case, alone), together) in cases(reference).iter().zip(&alone).zip(&together) {
            let top: Vec<usize> = numbers(&case["top_ids"]);
            let expected = floats(&case["top_logits"]).into_iter().zip(top).chain(
                floats(&case["fixed_logits"])
                    .into_iter()
                    .zip(fixed.iter().copied()),
            );
            let mut worst = 0f32;
            for (theirs, id) in expected {
                for ours in [alone[id], together[id]] {
                    worst = worst.max((ours - theirs).abs());
                }
            }
            assert!(
                worst < tolerance,
                "{}: worst logit difference {worst}",
                case["prompt"]
            );
        }
    }

    /// From the exact (f32) weights.
    #[test]
    fn prefill_logits_match_transformers() {
        // Logits of ~30 printed to 5 decimals, sums in another order.
        let reference = reference("smollm2-reference.json");
        prefill_logits_match(&smollm2(DType::F32).model, &reference, 2e-3);
    }

    fn greedy(model: &Llama, prompts: &[Vec<u32>], steps: usize) -> Vec<Vec<u32>> {
        let group: Vec<(&[u32], usize)> = prompts.iter().map(|p| (p.as_slice(), steps)).collect();
        let (mut logits, mut caches) = model.prefill(&group).expect("prefill");
        let mut out = vec![Vec::new(); prompts.len()];
        for step in 0..steps {
            let next: Vec<u32> = logits
                .argmax(candle_core::D::Minus1)
                .and_then(|t| t.to_vec1())
                .expect("argmax");
            for (o, &n) in out.iter_mut().zip(&next) {
                o.push(n);
            }
            if step + 1 < steps {
                let mut refs: Vec<&mut SequenceCache> = caches.iter_mut().collect();
                logits = model.decode_step(&next, &mut refs).expect("step");
            }
        }
        out
    }

    /// From the f16 copies the engine decodes with, and from the exact ones.
    #[test]
    fn greedy_tokens_match_transformers_alone_and_batched() {
        let reference = reference("smollm2-reference.json");
        for packed in [DType::F16, DType::F32] {
            greedy_tokens_match(&smollm2(packed).model, &reference);
        }
    }

    fn greedy_tokens_match(model: &Llama, reference: &serde_json::Value) {
        let prompts: Vec<Vec<u32>> = cases(reference)
            .iter()
            .map(|c| numbers(&c["ids"]))
            .collect();
        let expected: Vec<Vec<u32>> = cases(reference)
            .iter()
            .map(|c| numbers(&c["greedy"]))
            .collect();
        let steps = expected[0].len();
        assert_eq!(greedy(model, &prompts, steps), expected, "batched");
        for (prompt, expected) in prompts.iter().zip(&expected) {
            assert_eq!(
                &greedy(model, std::slice::from_ref(prompt), steps)[0],
                expected,
                "alone"
            );
        }
    }

    /// A random Qwen2 (q, k, v biases, two query heads per key/value head, rotary
    /// positions over half-heads, Qwen2's pre-tokenizer, ChatML): prompts, logits and greedy
    /// tokens as transformers computes them from the same file.
    #[test]
    fn qwen2_matches_transformers() {
        let reference = reference("qwen2-tiny-reference.json");
        let loaded = qwen2_tiny(DType::F32);
        assert_eq!(loaded.model.family(), "Qwen2");
        assert_eq!(loaded.model.config().rope_style, RopeStyle::HalfHead);
        prompts_match(&loaded, &reference);
        prefill_logits_match(&loaded.model, &reference, 1e-3);
        greedy_tokens_match(&loaded.model, &reference);
        greedy_tokens_match(&qwen2_tiny(DType::F16).model, &reference);
    }

    /// The real Qwen2.5 Coder 0.5B (Q5_0, Q8_0, Q4_K and Q6_K tensors, 151,936 tokens),
    /// where cached: its tokenizer, chat template and logits as transformers has them.
    #[test]
    fn qwen2_5_coder_matches_transformers_where_cached() {
        let Some(loaded) = qwen2_5(DType::F32) else {
            return;
        };
        let reference = reference("qwen2.5-coder-reference.json");
        prompts_match(&loaded, &reference);
        prefill_logits_match(&loaded.model, &reference, 2e-2);
        greedy_tokens_match(&loaded.model, &reference);
    }

    #[test]
    fn other_architectures_and_tokenizers_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bloom.gguf");
        let arch = gguf_file::Value::String("bloom".into());
        let mut file = File::create(&path).expect("create");
        gguf_file::write(&mut file, &[("general.architecture", &arch)], &[]).expect("write");
        drop(file);
        let err = Llama::load(&path, DType::F32)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("architecture `bloom`"), "{err}");
        assert!(err.contains("bloom.gguf"), "{err}");
        std::fs::write(&path, b"not a gguf").expect("write");
        let err = Llama::load(&path, DType::F32)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("not a readable GGUF file"), "{err}");
    }
}
