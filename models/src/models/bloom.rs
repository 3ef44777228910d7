//! BLOOM (BLOOMZ, SeqGPT-560M) on candle: mistral.rs has no BLOOM model, so the `seqgpt`
//! backend (DESIGN.md) runs this one. The forward pass follows transformers'
//! `BloomForCausalLM` step for step, so that logits match it (tests against fixtures that
//! `scripts/make-bloom-fixture.py` made with transformers):
//!
//! word embeddings → LayerNorm → per block { LayerNorm → fused QKV (per head `[q, k, v]`
//! interleaved) → attention with ALiBi biases (positions counted over the attention mask,
//! so left padding does not shift them) → dense + residual → LayerNorm → MLP (tanh GELU)
//! + residual } → LayerNorm → logits by the tied embedding matrix.
//!
//! One file for BLOOM's whole model (its config, weight loading from safetensors, shards
//! or `pytorch_model.bin`, the forward pass, batched prefill and decoding step over the
//! engine's caches, and its engine constructor): past 800 lines because a third of it is
//! the tests that check each part against transformers' fixtures.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, Module, VarBuilder};

use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::engine::attention::{QueryLayout, attend_rows, timed};
use crate::engine::batch::{BatchGenerator, BatchModel};
use crate::engine::kv::{HeadsKv, SequenceCache, SequenceKv};
use crate::engine::packed::{PackedRows, pack_weight, product};
use crate::engine::paged::{
    BlockTable, DEFAULT_BLOCK_SIZE, KERNEL_HEAD_SIZES, PagedKv, free_gpu_memory,
};
use crate::generator::{GeneratorError, PagedAttention};
use crate::{Precision, kernels};

/// What `config.json` says of a BLOOM checkpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct BloomConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    #[serde(alias = "num_hidden_layers")]
    pub n_layer: usize,
    #[serde(alias = "num_attention_heads")]
    pub n_head: usize,
    #[serde(default = "default_epsilon")]
    pub layer_norm_epsilon: f64,
    /// Residuals taken after the LayerNorm instead of before (false in BLOOM's releases).
    #[serde(default)]
    pub apply_residual_connection_post_layernorm: bool,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
}

fn default_epsilon() -> f64 {
    1e-5
}

/// ALiBi's slope per head, as BLOOM computes them: a geometric series for the largest
/// power of two not above the head count, then every other term of the next series.
pub fn alibi_slopes(heads: usize) -> Vec<f32> {
    let closest = 1usize << (usize::BITS - 1 - heads.max(1).leading_zeros());
    let base = |n: usize| 2f64.powf(-(2f64.powf(-((n as f64).log2() - 3.0))));
    let first = base(closest);
    let mut slopes: Vec<f32> = (1..=closest).map(|p| first.powi(p as i32) as f32).collect();
    if closest != heads {
        let extra = base(2 * closest);
        let remaining = closest.min(heads - closest);
        slopes.extend((0..remaining).map(|i| extra.powi(2 * i as i32 + 1) as f32));
    }
    slopes
}

/// Every tensor of the checkpoint in `dir`, named without the `transformer.` prefix
/// (the tied `lm_head.weight` is left out: the embeddings serve as the LM head).
fn load_weights(dir: &Path) -> Result<HashMap<String, Tensor>, String> {
    let files = |single: &str, index: &str| -> Result<Option<Vec<PathBuf>>, String> {
        if dir.join(single).is_file() {
            return Ok(Some(vec![dir.join(single)]));
        }
        let index_path = dir.join(index);
        if !index_path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&index_path).map_err(|e| format!("{index}: {e}"))?;
        let index_json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{index}: {e}"))?;
        let map = index_json["weight_map"]
            .as_object()
            .ok_or_else(|| format!("{index}: no weight_map object"))?;
        let mut shards: Vec<PathBuf> = Vec::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| format!("{index}: weight_map[{name:?}] is not a file name"))?;
            // A shard named with a path (`../x`) would read outside the model folder.
            let mut parts = Path::new(file).components();
            if !matches!(
                (parts.next(), parts.next()),
                (Some(Component::Normal(_)), None)
            ) {
                return Err(format!(
                    "{index}: shard {file:?} is not a file of this folder"
                ));
            }
            let path = dir.join(file);
            if !shards.contains(&path) {
                shards.push(path);
            }
        }
        Ok(Some(shards))
    };
    type Reader = fn(&Path) -> candle_core::Result<Vec<(String, Tensor)>>;
    let safetensors: Reader =
        |path| candle_core::safetensors::load(path, &Device::Cpu).map(|t| t.into_iter().collect());
    let pickle: Reader = |path| candle_core::pickle::read_all(path);
    let (shards, read) = match files("model.safetensors", "model.safetensors.index.json")? {
        Some(shards) => (shards, safetensors),
        None => match files("pytorch_model.bin", "pytorch_model.bin.index.json")? {
            Some(shards) => (shards, pickle),
            None => {
                return Err("no weights: expected model.safetensors, \
                            model.safetensors.index.json, pytorch_model.bin or \
                            pytorch_model.bin.index.json"
                    .into());
            }
        },
    };
    let mut weights = HashMap::new();
    for shard in shards {
        let shown = shard.file_name().map(|n| n.to_string_lossy().into_owned());
        let tensors = read(&shard).map_err(|e| format!("{}: {e}", shown.unwrap_or_default()))?;
        for (name, tensor) in tensors {
            if name == "lm_head.weight" {
                continue;
            }
            let name = match name.strip_prefix("transformer.") {
                Some(bare) => bare.to_string(),
                None => name,
            };
            weights.insert(name, tensor);
        }
    }
    Ok(weights)
}

struct Block {
    input_norm: LayerNorm,
    qkv: Linear,
    dense: Linear,
    post_norm: LayerNorm,
    up: Linear,
    down: Linear,
    /// qkv, dense, up, down packed for decoding steps on CPU.
    packed: Option<[PackedRows; 4]>,
}

/// Keys and values of the tokens already seen, per block: what lets decoding feed one new
/// token per step instead of the whole sequence.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .and_then(|(k, _)| k.dim(2).ok())
            .unwrap_or(0)
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The additive causal mask of `new` queries after `past` cached tokens,
/// `(new, past + new)`: 0 where a query may look, the most negative float where not.
fn causal_mask(past: usize, new: usize, device: &Device) -> candle_core::Result<Tensor> {
    let tokens = past + new;
    let values: Vec<f32> = (past..tokens)
        .flat_map(|i| (0..tokens).map(move |j| if j <= i { 0.0 } else { f32::MIN }))
        .collect();
    Tensor::from_vec(values, (new, tokens), device)
}

/// A prompt's causal mask plus ALiBi (`slopes` `(heads, 1, 1)` × key position),
/// `(heads, len, len)`.
fn causal_alibi(len: usize, slopes: &Tensor, device: &Device) -> candle_core::Result<Tensor> {
    let positions: Vec<f32> = (0..len).map(|j| j as f32).collect();
    let positions = Tensor::from_vec(positions, (1, 1, len), device)?;
    causal_mask(0, len, device)?
        .reshape((1, len, len))?
        .broadcast_add(&slopes.broadcast_mul(&positions)?)
}

/// Appends a token's keys and values from BLOOM's fused projection (per head: query,
/// key, value, `dim` each).
fn push_fused(kv: &mut HeadsKv, qkv: &[f32], dim: usize) {
    kv.push_with(|h| {
        let part = &qkv[h * 3 * dim..(h + 1) * 3 * dim];
        (&part[dim..2 * dim], &part[2 * dim..])
    });
}

/// The values of `t` in f32 on the host, where the engine's own attention reads them.
fn to_host(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()
}

/// A loaded BLOOM model.
pub struct Bloom {
    config: BloomConfig,
    embeddings: Embedding,
    embeddings_norm: LayerNorm,
    blocks: Vec<Block>,
    final_norm: LayerNorm,
    device: Device,
    /// ALiBi's slope per head ([`alibi_slopes`]), worked out once for every step's
    /// attention.
    slopes: Vec<f32>,
    /// The tied embeddings packed for decoding steps on CPU.
    embeddings_packed: Option<PackedRows>,
    /// The type the model computes in ([`Precision::dtype`]). On a GPU its tensors are of
    /// it. On the CPU they stay f32, holding values of it: the weights rounded to it at
    /// load (exact for a checkpoint stored in it), the activations rounded to it wherever
    /// transformers' half forward rounds ([`Bloom::round`]), so that the CPU checks the half
    /// forward while its kernels keep computing in f32.
    dtype: DType,
}

impl Bloom {
    /// Loads `config.json` and the weights from `dir`: `model.safetensors`, shards listed
    /// in `model.safetensors.index.json`, or `pytorch_model.bin` (single or sharded), read
    /// by candle's pickle reader, which builds tensors and never runs the file's code.
    /// Weight names may carry the `transformer.` prefix or not. Computes in f32 on the CPU
    /// and in the checkpoint's type on a GPU ([`Precision::Auto`]).
    pub fn load(dir: &Path, device: &Device) -> Result<Self, GeneratorError> {
        Self::load_in(dir, device, Precision::Auto)
    }

    /// [`Bloom::load`], computing in the type `precision` names.
    pub fn load_in(
        dir: &Path,
        device: &Device,
        precision: Precision,
    ) -> Result<Self, GeneratorError> {
        let fail = |reason: String| GeneratorError::Load {
            model: dir.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| fail(format!("config.json: {e}")))?;
        let config: BloomConfig =
            serde_json::from_str(&text).map_err(|e| fail(format!("config.json: {e}")))?;
        if config.n_head == 0 || !config.hidden_size.is_multiple_of(config.n_head) {
            return Err(fail(format!(
                "config.json: hidden_size {} is not a multiple of n_head {}",
                config.hidden_size, config.n_head
            )));
        }
        let mut weights = load_weights(dir).map_err(fail)?;
        let stored = weights
            .get("word_embeddings.weight")
            .map_or(DType::F32, Tensor::dtype);
        let dtype = precision.dtype(device, stored);
        let half = dtype != DType::F32;
        if device.is_cpu() && half {
            for tensor in weights.values_mut() {
                *tensor = tensor
                    .to_dtype(dtype)
                    .map_err(|e| fail(format!("weights in {dtype:?}: {e}")))?;
            }
        }
        let tensors = if device.is_cpu() { DType::F32 } else { dtype };
        let vb = VarBuilder::from_tensors(weights, tensors, device);
        let mut model = Self::from_weights(config, vb, dtype, device)
            .map_err(|e| fail(format!("weights do not match config.json: {e}")))?;
        if device.is_cpu() {
            // Packed in the narrowest type that holds the values exactly.
            let packed = if half { dtype } else { stored };
            model
                .pack_for_decoding(packed)
                .map_err(|e| fail(format!("packing {packed:?} weights: {e}")))?;
        }
        Ok(model)
    }

    /// `t` with its values rounded to the model's type: where transformers' forward in a
    /// half type rounds (each product, norm, activation and sum), on the CPU, whose tensors
    /// stay f32. Nothing on a GPU, whose tensors are of the type.
    fn round(&self, t: Tensor) -> candle_core::Result<Tensor> {
        if self.rounds() {
            t.to_dtype(self.dtype)?.to_dtype(DType::F32)
        } else {
            Ok(t)
        }
    }

    /// Whether [`Bloom::round`] rounds: a half type on the CPU.
    fn rounds(&self) -> bool {
        self.device.is_cpu() && self.dtype != DType::F32
    }

    /// The type of the model's tensors: its own on a GPU, f32 on the CPU.
    fn tensor_dtype(&self) -> DType {
        if self.device.is_cpu() {
            DType::F32
        } else {
            self.dtype
        }
    }

    /// Attention of `q` over `k` and `v` (heads first) with an additive f32 `bias` (the
    /// causal mask, padding and ALiBi): scores and softmax in f32, probabilities and
    /// context in the model's type, as transformers computes a half forward.
    fn attend_tensors(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        bias: &Tensor,
        scale: f64,
    ) -> candle_core::Result<Tensor> {
        let scores = self
            .round((q.matmul(&k.t()?)? * scale)?)?
            .to_dtype(DType::F32)?
            .broadcast_add(bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(self.tensor_dtype())?;
        self.round(probs)?.matmul(v)
    }

    fn from_weights(
        config: BloomConfig,
        vb: VarBuilder,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let (h, eps) = (config.hidden_size, config.layer_norm_epsilon);
        let norm = |vb: VarBuilder| candle_nn::layer_norm(h, eps, vb);
        let blocks = (0..config.n_layer)
            .map(|i| {
                let vb = vb.pp(format!("h.{i}"));
                Ok(Block {
                    input_norm: norm(vb.pp("input_layernorm"))?,
                    qkv: candle_nn::linear(h, 3 * h, vb.pp("self_attention.query_key_value"))?,
                    dense: candle_nn::linear(h, h, vb.pp("self_attention.dense"))?,
                    post_norm: norm(vb.pp("post_attention_layernorm"))?,
                    up: candle_nn::linear(h, 4 * h, vb.pp("mlp.dense_h_to_4h"))?,
                    down: candle_nn::linear(4 * h, h, vb.pp("mlp.dense_4h_to_h"))?,
                    packed: None,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: candle_nn::embedding(config.vocab_size, h, vb.pp("word_embeddings"))?,
            embeddings_norm: norm(vb.pp("word_embeddings_layernorm"))?,
            final_norm: norm(vb.pp("ln_f"))?,
            blocks,
            slopes: alibi_slopes(config.n_head),
            config,
            device: device.clone(),
            embeddings_packed: None,
            dtype,
        })
    }

    /// Keeps a copy of every weight matrix packed for decoding steps, which read all of
    /// them once per token, in `dtype` (the checkpoint's or the model's half type, which
    /// hold the values exactly). Prefill keeps the f32 tensors, where candle's GEMM wants
    /// them.
    fn pack_for_decoding(&mut self, dtype: DType) -> candle_core::Result<()> {
        for block in &mut self.blocks {
            block.packed = Some([
                pack_weight(block.qkv.weight(), dtype)?,
                pack_weight(block.dense.weight(), dtype)?,
                pack_weight(block.up.weight(), dtype)?,
                pack_weight(block.down.weight(), dtype)?,
            ]);
        }
        self.embeddings_packed = Some(pack_weight(self.embeddings.embeddings(), dtype)?);
        Ok(())
    }

    /// The checkpoint's configuration.
    pub fn config(&self) -> &BloomConfig {
        &self.config
    }

    /// Logits `(batch, tokens, vocab)` for `ids` `(batch, tokens)`, where `mask` (same
    /// shape, 1 for a token, 0 for padding) marks left padding.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_cached(ids, mask, &mut self.new_cache())
    }

    /// An empty cache for [`Bloom::forward_cached`].
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: (0..self.config.n_layer).map(|_| None).collect(),
        }
    }

    /// Logits for the new tokens `ids` `(batch, new)` after the ones in `cache`, which
    /// then holds them too. `mask` covers cached and new tokens `(batch, cached + new)`.
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        cache: &mut KvCache,
    ) -> candle_core::Result<Tensor> {
        self.lm_head(&self.hidden_states(ids, mask, cache)?)
    }

    /// The final hidden states `(batch, new, hidden)` of [`Bloom::forward_cached`].
    fn hidden_states(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        cache: &mut KvCache,
    ) -> candle_core::Result<Tensor> {
        let (batch, new) = ids.dims2()?;
        let past = cache.len();
        let tokens = past + new;
        if mask.dims2()? != (batch, tokens) {
            candle_core::bail!(
                "mask is {:?}, expected ({batch}, {tokens}): cached and new tokens",
                mask.dims()
            );
        }
        let heads = self.config.n_head;
        let head_dim = self.config.hidden_size / heads;
        let mask = mask.to_dtype(DType::F32)?;

        // ALiBi: slope × position, positions counted over real tokens only.
        let positions = ((mask.cumsum(1)? - 1.0)? * &mask)?;
        let slopes = Tensor::new(self.slopes.as_slice(), &self.device)?;
        let alibi = slopes
            .reshape((1, heads, 1, 1))?
            .broadcast_mul(&positions.reshape((batch, 1, 1, tokens))?)?;
        // Additive mask: a query sees earlier real tokens. The most negative finite float
        // (as transformers uses), not -inf: a pad's query row is all masked, and -inf would
        // make it NaN.
        let causal = causal_mask(past, new, &self.device)?.reshape((1, 1, new, tokens))?;
        let padding = ((mask.reshape((batch, 1, 1, tokens))? - 1.0)? * -(f32::MIN as f64))?;
        let bias = causal
            .broadcast_add(&padding)?
            .clamp(f32::MIN, 0.0)?
            .broadcast_add(&alibi)?;

        let mut hidden = self.embed(ids)?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        for (block, cached) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            hidden = self.block_forward(block, &hidden, |qkv| {
                let qkv = qkv.reshape((batch, new, heads, 3, head_dim))?;
                let part = |i: usize| {
                    qkv.narrow(3, i, 1)?
                        .squeeze(3)?
                        .transpose(1, 2)?
                        .contiguous()
                };
                let (q, mut k, mut v) = (part(0)?, part(1)?, part(2)?);
                if let Some((past_k, past_v)) = cached.take() {
                    k = Tensor::cat(&[&past_k, &k], 2)?;
                    v = Tensor::cat(&[&past_v, &v], 2)?;
                }
                *cached = Some((k.clone(), v.clone()));
                self.attend_tensors((&q, &k, &v), &bias, scale)?
                    .transpose(1, 2)?
                    .reshape((batch, new, self.config.hidden_size))
            })?;
        }
        self.round(self.final_norm.forward(&hidden)?)
    }

    /// The normed embeddings of `ids`.
    fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.round(
            self.embeddings_norm
                .forward(&self.embeddings.forward(ids)?)?,
        )
    }

    /// One block: LayerNorm → fused QKV → `attention` (from the QKV rows to the context
    /// rows, however the caller keeps its keys and values) → dense + residual →
    /// LayerNorm → MLP (tanh GELU) + residual.
    fn block_forward(
        &self,
        block: &Block,
        hidden: &Tensor,
        attention: impl FnOnce(Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let post = self.config.apply_residual_connection_post_layernorm;
        let normed = self.round(block.input_norm.forward(hidden)?)?;
        let residual = if post { &normed } else { hidden };
        let packed = |i: usize| block.packed.as_ref().map(|p| &p[i]);
        let context = self.round(attention(self.project(&block.qkv, packed(0), &normed)?)?)?;
        let attended =
            self.round((self.project(&block.dense, packed(1), &context)? + residual)?)?;
        let normed = self.round(block.post_norm.forward(&attended)?)?;
        let residual = if post { &normed } else { &attended };
        let up = self.round(kernels::gelu_tanh(self.project(
            &block.up,
            packed(2),
            &normed,
        )?)?)?;
        self.round((self.project(&block.down, packed(3), &up)? + residual)?)
    }

    /// Logits of the final hidden states `(…, hidden)`: the tied embedding matrix. In f32
    /// whatever the model's type, for the samplers.
    fn lm_head(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        let logits = product(
            self.embeddings.embeddings(),
            self.embeddings_packed.as_ref(),
            None,
            hidden,
        )?;
        self.round(logits)?.to_dtype(DType::F32)
    }

    /// `linear` applied to `x` `(…, in)`, in the model's type.
    fn project(
        &self,
        linear: &Linear,
        packed: Option<&PackedRows>,
        x: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.round(product(linear.weight(), packed, linear.bias(), x)?)
    }

    /// Runs a group of new prompts through the model together, each with the room for
    /// that many more tokens in its cache: the logits of each prompt's last token
    /// `(prompts, vocab)` and the caches. The prompts' tokens are stacked into one matrix
    /// for the products (more rows per product is what makes candle's GEMM efficient: 1.4x
    /// at 1,024 rows vs 128), while attention runs per prompt, so nothing is padded. With
    /// `paged`, each prompt's keys and values go to the blocks of its table instead of
    /// vectors of its own.
    pub fn prefill(
        &self,
        prompts: &[(&[u32], usize)],
        mut paged: Option<(&mut PagedKv, &[BlockTable])>,
    ) -> candle_core::Result<(Tensor, Vec<SequenceCache>)> {
        if prompts.iter().any(|(p, _)| p.is_empty()) {
            candle_core::bail!("an empty prompt");
        }
        if let Some((_, tables)) = &paged
            && tables.len() != prompts.len()
        {
            candle_core::bail!(
                "{} block tables for {} prompts",
                tables.len(),
                prompts.len()
            );
        }
        let (hidden_size, heads) = (self.config.hidden_size, self.config.n_head);
        let head_dim = hidden_size / heads;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let mut spans = Vec::with_capacity(prompts.len());
        let mut offset = 0;
        for (prompt, _) in prompts {
            spans.push((offset, prompt.len()));
            offset += prompt.len();
        }
        // Attention as tensor ops per prompt with a paged pool (its slots there), and in a
        // half type on the CPU (whose scores and probabilities round as transformers' do);
        // otherwise in Rust over caches of their own. Per prompt its causal mask plus
        // ALiBi, shared by all blocks.
        let by_tensors = paged.is_some() || self.rounds();
        let biases = if by_tensors {
            let slopes =
                Tensor::new(self.slopes.as_slice(), &self.device)?.reshape((heads, 1, 1))?;
            spans
                .iter()
                .map(|&(_, len)| causal_alibi(len, &slopes, &self.device))
                .collect::<candle_core::Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let slots = match &paged {
            Some((kv, tables)) => tables
                .iter()
                .zip(&spans)
                .map(|(table, &(_, len))| kv.prompt_slots(table, len))
                .collect::<candle_core::Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        let ids: Vec<u32> = prompts
            .iter()
            .flat_map(|(p, _)| p.iter().copied())
            .collect();
        let ids = Tensor::new(ids, &self.device)?;
        let mut hidden = self.embed(&ids)?;
        let mut own: Vec<Vec<HeadsKv>> = prompts
            .iter()
            .map(|_| Vec::with_capacity(self.config.n_layer))
            .collect();
        for (layer, block) in self.blocks.iter().enumerate() {
            hidden = self.block_forward(block, &hidden, |qkv| {
                if !by_tensors {
                    return self.attend_prompts_own(&qkv, &spans, prompts, &mut own);
                }
                if paged.is_none() {
                    self.cache_prompts_own(&to_host(&qkv)?, &spans, prompts, &mut own);
                }
                let mut contexts = Vec::with_capacity(spans.len());
                for (p, (&(offset, len), bias)) in spans.iter().zip(&biases).enumerate() {
                    let qkv = qkv
                        .narrow(0, offset, len)?
                        .reshape((len, heads, 3, head_dim))?;
                    let part = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2);
                    let (q, k, v) = (part(0)?, part(1)?, part(2)?);
                    if let Some((kv, _)) = &mut paged {
                        kv.write(layer, &k, &v, &slots[p])?;
                    }
                    let heads_first = |t: Tensor| t.transpose(0, 1)?.contiguous();
                    let (q, k, v) = (heads_first(q)?, heads_first(k)?, heads_first(v)?);
                    contexts.push(
                        self.attend_tensors((&q, &k, &v), bias, scale)?
                            .transpose(0, 1)?
                            .reshape((len, hidden_size))?,
                    );
                }
                Tensor::cat(&contexts, 0)
            })?;
        }
        // Only the last position's logits: the LM head is the largest matrix of a small
        // model (250,880 × 1,024 in BLOOM-560m), not to be spent on every prompt token.
        let last: Vec<u32> = spans.iter().map(|&(o, len)| (o + len - 1) as u32).collect();
        let last = hidden.index_select(&Tensor::new(last, &self.device)?, 0)?;
        let logits = self.lm_head(&self.round(self.final_norm.forward(&last)?)?)?;
        let kv: Vec<SequenceKv> = match paged {
            Some((_, tables)) => tables.iter().cloned().map(SequenceKv::Paged).collect(),
            None => own.into_iter().map(SequenceKv::Own).collect(),
        };
        let caches = kv
            .into_iter()
            .zip(prompts)
            .map(|(kv, (prompt, _))| SequenceCache {
                kv,
                len: prompt.len(),
            })
            .collect();
        Ok((logits, caches))
    }

    /// One decoding step for a batch of sequences, each with its own cache: `tokens[i]`
    /// is the newest token of the sequence whose cache is `caches[i]`. Returns the next
    /// token's logits `(batch, vocab)`; each cache then holds its token too.
    ///
    /// The matrix products see the whole batch (what makes batching pay), while attention
    /// runs per sequence over its own cache, so sequences of any lengths share a step
    /// without padding, and joining or leaving the batch copies nothing. Caches in blocks
    /// of `paged` attend through it (the PagedAttention kernels on CUDA).
    pub fn decode_step(
        &self,
        tokens: &[u32],
        caches: &mut [&mut SequenceCache],
        paged: Option<&mut PagedKv>,
    ) -> candle_core::Result<Tensor> {
        let batch = tokens.len();
        if caches.len() != batch {
            candle_core::bail!("{batch} tokens for {} caches", caches.len());
        }
        let ids = Tensor::new(tokens, &self.device)?;
        let mut hidden = self.embed(&ids)?;
        match paged {
            Some(kv) => {
                let mut tables = Vec::with_capacity(batch);
                for cache in caches.iter() {
                    let SequenceKv::Paged(table) = &cache.kv else {
                        candle_core::bail!("a sequence without blocks in a paged step");
                    };
                    tables.push(table.clone());
                }
                let lens = caches.iter().map(|c| c.len + 1).collect();
                let step = kv.step_tables(tables, lens)?;
                let (heads, head_dim) = (
                    self.config.n_head,
                    self.config.hidden_size / self.config.n_head,
                );
                for (layer, block) in self.blocks.iter().enumerate() {
                    hidden = self.block_forward(block, &hidden, |qkv| {
                        let qkv = qkv.reshape((batch, heads, 3, head_dim))?;
                        let part = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2);
                        kv.write(layer, &part(1)?, &part(2)?, step.slots())?;
                        let query = part(0)?;
                        timed(&self.device, || kv.attend(layer, &query, &step))
                    })?;
                }
            }
            None => {
                for (layer, block) in self.blocks.iter().enumerate() {
                    hidden = self.block_forward(block, &hidden, |qkv| {
                        timed(&self.device, || self.attend_own(layer, &qkv, caches))
                    })?;
                }
            }
        }
        for cache in caches.iter_mut() {
            cache.len += 1;
        }
        self.lm_head(&self.round(self.final_norm.forward(&hidden)?)?)
    }

    /// The context rows of `rows` (each a cache and the tokens it sees) for their queries
    /// in rows of the fused projection (per head `[q, k, v]`), with ALiBi.
    fn attention(&self, qkv: &[f32], rows: &[(&HeadsKv, usize)]) -> Vec<f32> {
        let (hidden_size, heads) = (self.config.hidden_size, self.config.n_head);
        let head_dim = hidden_size / heads;
        let layout = QueryLayout {
            row: 3 * hidden_size,
            head: 3 * head_dim,
        };
        attend_rows(
            qkv,
            layout,
            rows,
            (heads, heads, head_dim),
            Some(&self.slopes),
        )
    }

    /// A prefill's attention over caches of their own: each prompt's keys and values
    /// become its cache rows ([`Bloom::cache_prompts_own`]), then every (token, head)
    /// attends causally over its prompt ([`attend_rows`]), in parallel. In Rust rather than
    /// as tensor ops per prompt, which spent their time copying and launching (narrow,
    /// transpose, mask): 0.75 s of a 5.5 s prefill of eight 128-token prompts on the
    /// 560m shape that way, 0.5 s this way.
    fn attend_prompts_own(
        &self,
        qkv: &Tensor,
        spans: &[(usize, usize)],
        prompts: &[(&[u32], usize)],
        own: &mut [Vec<HeadsKv>],
    ) -> candle_core::Result<Tensor> {
        let hidden_size = self.config.hidden_size;
        let qkv = to_host(qkv)?;
        self.cache_prompts_own(&qkv, spans, prompts, own);
        // Each token sees its prompt's cache up to itself.
        let mut rows = Vec::with_capacity(qkv.len() / (3 * hidden_size));
        for (&(_, len), layers) in spans.iter().zip(own.iter()) {
            let Some(kv) = layers.last() else {
                candle_core::bail!("a prompt without its cache");
            };
            rows.extend((1..=len).map(|seen| (kv, seen)));
        }
        let context = self.attention(&qkv, &rows);
        Tensor::from_vec(context, (rows.len(), hidden_size), &self.device)?
            .to_dtype(self.tensor_dtype())
    }

    /// Appends each prompt's keys and values of a layer, from the rows of the fused
    /// projection `qkv` (per token: heads × `[q, k, v]` × head_dim), to its own cache,
    /// with room for its answer.
    fn cache_prompts_own(
        &self,
        qkv: &[f32],
        spans: &[(usize, usize)],
        prompts: &[(&[u32], usize)],
        own: &mut [Vec<HeadsKv>],
    ) {
        let (hidden_size, heads) = (self.config.hidden_size, self.config.n_head);
        let head_dim = hidden_size / heads;
        let token = |t: usize| &qkv[t * 3 * hidden_size..(t + 1) * 3 * hidden_size];
        for ((&(offset, len), (_, answer)), layers) in spans.iter().zip(prompts).zip(&mut *own) {
            let mut kv = HeadsKv::with_room(heads, head_dim, len + answer);
            for t in offset..offset + len {
                push_fused(&mut kv, token(t), head_dim);
            }
            layers.push(kv);
        }
    }

    /// A decoding step's attention over caches of their own: appends each sequence's new
    /// key and value and attends per (sequence, head) in Rust, in parallel.
    fn attend_own(
        &self,
        layer: usize,
        qkv: &Tensor,
        caches: &mut [&mut SequenceCache],
    ) -> candle_core::Result<Tensor> {
        let batch = caches.len();
        let (hidden_size, heads) = (self.config.hidden_size, self.config.n_head);
        let head_dim = hidden_size / heads;
        // Per sequence: heads × [q, k, v] × head_dim.
        let qkv = to_host(qkv)?;
        for (cache, token) in caches.iter_mut().zip(qkv.chunks_exact(3 * hidden_size)) {
            let SequenceKv::Own(layers) = &mut cache.kv else {
                candle_core::bail!("a sequence in blocks in a step without its pool");
            };
            push_fused(&mut layers[layer], token, head_dim);
        }
        let mut rows = Vec::with_capacity(batch);
        for cache in caches.iter() {
            let SequenceKv::Own(layers) = &cache.kv else {
                candle_core::bail!("a sequence in blocks in a step without its pool");
            };
            rows.push((&layers[layer], layers[layer].len()));
        }
        let context = self.attention(&qkv, &rows);
        Tensor::from_vec(context, (batch, hidden_size), &self.device)?.to_dtype(self.tensor_dtype())
    }
}

impl BatchModel for Bloom {
    fn family(&self) -> &'static str {
        "BLOOM"
    }

    fn eos_token_id(&self) -> Option<u32> {
        self.config().eos_token_id
    }

    fn prefill(
        &self,
        prompts: &[(&[u32], usize)],
        paged: Option<(&mut PagedKv, &[BlockTable])>,
    ) -> candle_core::Result<(Tensor, Vec<SequenceCache>)> {
        Bloom::prefill(self, prompts, paged)
    }

    fn decode_step(
        &self,
        tokens: &[u32],
        caches: &mut [&mut SequenceCache],
        paged: Option<&mut PagedKv>,
    ) -> candle_core::Result<Tensor> {
        Bloom::decode_step(self, tokens, caches, paged)
    }
}

impl BatchGenerator {
    /// Loads the BLOOM checkpoint in `dir` (config.json, tokenizer.json, weights) and
    /// starts its engine, which decodes up to `max_batch` sequences at a time, with its
    /// keys and values in a paged pool as `paged` says (on CUDA by default), computing in
    /// the type `precision` names.
    pub fn load_bloom(
        dir: &Path,
        device: &Device,
        max_batch: usize,
        paged: &PagedAttention,
        precision: Precision,
    ) -> Result<Self, GeneratorError> {
        let model = Bloom::load_in(dir, device, precision)?;
        let max_batch = max_batch.max(1);
        let paged = paged_cache(&model, device, paged, max_batch).map_err(|reason| {
            GeneratorError::Load {
                model: dir.display().to_string(),
                reason: format!("summarize.paged_attention: {reason}"),
            }
        })?;
        let tokenizer =
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| GeneratorError::Load {
                model: dir.display().to_string(),
                reason: format!("tokenizer.json: {e}"),
            })?;
        Self::start(
            model,
            tokenizer,
            None,
            max_batch,
            paged,
            dir.display().to_string(),
        )
    }
}

/// The paged KV cache `settings` ask for, or none. On by default on CUDA where the
/// kernels take the model's head size (otherwise decoding attends on the host); the
/// budget is `gpu_memory_mb`, or a share of the GPU memory free after loading (half by
/// default), or on the CPU room for `max_batch` sequences of 4,096 tokens.
fn paged_cache(
    model: &Bloom,
    device: &Device,
    settings: &PagedAttention,
    max_batch: usize,
) -> Result<Option<PagedKv>, String> {
    let config = model.config();
    let head_dim = config.hidden_size / config.n_head;
    let enabled = settings
        .enabled
        .unwrap_or(!device.is_cpu() && KERNEL_HEAD_SIZES.contains(&head_dim));
    if !enabled {
        return Ok(None);
    }
    let block_size = settings.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
    let block_bytes = PagedKv::block_bytes(
        config.n_layer,
        config.hidden_size,
        block_size,
        model.dtype,
        device,
    );
    let budget = match settings.gpu_memory_mb {
        Some(mb) => mb << 20,
        None if device.is_cpu() => max_batch * 4096_usize.div_ceil(block_size) * block_bytes,
        None => {
            let share = f64::from(settings.gpu_memory_fraction.unwrap_or(0.5));
            (free_gpu_memory(device)? as f64 * share) as usize
        }
    };
    let blocks = budget / block_bytes;
    if blocks == 0 {
        return Err(format!(
            "a budget of {} MiB holds no block ({} KiB for {block_size} tokens of this model)",
            budget >> 20,
            block_bytes >> 10
        ));
    }
    PagedKv::new(
        blocks,
        block_size,
        config.n_layer,
        head_dim,
        alibi_slopes(config.n_head),
        model.dtype,
        device,
    )
    .map(Some)
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::D;

    fn fixture(name: &str) -> (Bloom, serde_json::Value) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(name);
        let model = Bloom::load(&dir, &Device::Cpu).expect("fixture model");
        let text = std::fs::read_to_string(dir.join("expected.json")).expect("expected.json");
        (
            model,
            serde_json::from_str(&text).expect("expected.json is JSON"),
        )
    }

    /// A batch of one sequence.
    fn one_row(ids: &[u32]) -> Tensor {
        Tensor::new(ids, &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("a tensor of ids")
    }

    /// The id of the most likely next token after each sequence of `ids`/`mask`.
    fn next_greedy(model: &Bloom, ids: &Tensor, mask: &Tensor) -> Vec<u32> {
        let logits = model.forward(ids, mask).unwrap();
        let last = logits.dim(1).unwrap() - 1;
        logits
            .narrow(1, last, 1)
            .and_then(|l| l.squeeze(1))
            .and_then(|l| l.argmax(D::Minus1))
            .and_then(|l| l.to_vec1())
            .unwrap()
    }

    fn ids(value: &serde_json::Value) -> Vec<u32> {
        value
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect()
    }

    fn floats(value: &serde_json::Value) -> Vec<f32> {
        value
            .as_array()
            .expect("floats")
            .iter()
            .map(|v| v.as_f64().expect("float") as f32)
            .collect()
    }

    fn assert_close(ours: &[f32], theirs: &[f32], what: &str) {
        assert_eq!(ours.len(), theirs.len(), "{what}: length");
        let worst = ours
            .iter()
            .zip(theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-4, "{what}: largest difference {worst}");
    }

    fn last_logits(model: &Bloom, seq: &[u32]) -> Vec<f32> {
        let t = one_row(seq);
        let logits = model.forward(&t, &t.ones_like().unwrap()).unwrap();
        let last = logits.dim(1).unwrap() - 1;
        logits.get(0).unwrap().get(last).unwrap().to_vec1().unwrap()
    }

    #[test]
    fn batched_decode_steps_match_the_whole_sequence_forward() {
        // The 6-head fixture is a pytorch_model.bin: this also reads it.
        let (model, expected) = fixture("bloom-tiny-6h");
        let config = model.config().clone();
        let head_dim = config.hidden_size / config.n_head;
        // Caches of their own, and blocks of a pool (3-token blocks: every sequence spans
        // several, handed out in no particular order).
        for paged in [false, true] {
            let mut pool = PagedKv::new(
                40,
                3,
                config.n_layer,
                head_dim,
                alibi_slopes(config.n_head),
                DType::F32,
                &Device::Cpu,
            )
            .expect("pool");
            let mut seqs: Vec<Vec<u32>> = expected["single"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| ids(&s["ids"]))
                .collect();
            let _hole = pool.pool.reserve(4);
            let tables: Vec<BlockTable> = seqs
                .iter()
                .map(|s| pool.pool.reserve(s.len() + 6).expect("room"))
                .collect();
            // All prompts prefilled together, stacked without padding.
            let prompts: Vec<(&[u32], usize)> = seqs.iter().map(|s| (s.as_slice(), 6)).collect();
            let (logits, mut caches) = model
                .prefill(&prompts, paged.then_some((&mut pool, tables.as_slice())))
                .unwrap();
            for ((logits, cache), seq) in logits
                .to_vec2::<f32>()
                .unwrap()
                .iter()
                .zip(&caches)
                .zip(&seqs)
            {
                assert_close(logits, &last_logits(&model, seq), "prefill");
                assert_eq!(cache.len(), seq.len());
            }
            for step in 0..6u32 {
                // Sequences of different lengths in one step, none padded.
                let tokens: Vec<u32> = (0..seqs.len() as u32)
                    .map(|i| (7 * i + 13 * step) % 300)
                    .collect();
                let mut refs: Vec<&mut SequenceCache> = caches.iter_mut().collect();
                let logits: Vec<Vec<f32>> = model
                    .decode_step(&tokens, &mut refs, paged.then_some(&mut pool))
                    .unwrap()
                    .to_vec2()
                    .unwrap();
                for ((seq, token), ours) in seqs.iter_mut().zip(&tokens).zip(&logits) {
                    seq.push(*token);
                    let what = format!("paged {paged}, step {step}");
                    assert_close(ours, &last_logits(&model, seq), &what);
                }
            }
            assert!(caches.iter().zip(&seqs).all(|(c, s)| c.len() == s.len()));
            let blocks: Vec<Option<BlockTable>> =
                caches.into_iter().map(SequenceCache::into_blocks).collect();
            assert_eq!(blocks.iter().all(Option::is_some), paged);
        }
    }

    #[test]
    fn half_precision_checkpoints_decode_from_their_own_weights_with_the_same_results() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/bloom-tiny-4h");
        let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
            .expect("fixture weights");
        let mut logits = Vec::new();
        for dtype in [DType::F16, DType::BF16] {
            // The same values stored in half precision, and widened to f32.
            let (half, wide) = (
                tempfile::tempdir().expect("dir"),
                tempfile::tempdir().expect("dir"),
            );
            for (copy, stored) in [(&half, dtype), (&wide, DType::F32)] {
                for file in ["config.json", "tokenizer.json"] {
                    std::fs::copy(dir.join(file), copy.path().join(file)).expect("copy");
                }
                let converted: HashMap<String, Tensor> = tensors
                    .iter()
                    .map(|(n, t)| {
                        (
                            n.clone(),
                            t.to_dtype(dtype)
                                .and_then(|t| t.to_dtype(stored))
                                .expect("dtype"),
                        )
                    })
                    .collect();
                candle_core::safetensors::save(&converted, copy.path().join("model.safetensors"))
                    .expect("save");
            }
            let half = Bloom::load(half.path(), &Device::Cpu).expect("half checkpoint");
            let bytes = |model: &Bloom| {
                let packed = model.blocks.iter().flat_map(|b| b.packed.iter().flatten());
                let all: Vec<usize> = packed
                    .chain(&model.embeddings_packed)
                    .map(PackedRows::bytes_per_weight)
                    .collect();
                assert_eq!(all.len(), 4 * model.blocks.len() + 1, "every matrix packed");
                all
            };
            assert!(bytes(&half).iter().all(|&b| b == 2));
            let wide = Bloom::load(wide.path(), &Device::Cpu).expect("f32 checkpoint");
            assert!(bytes(&wide).iter().all(|&b| b == 4));
            let prompts: Vec<(&[u32], usize)> = vec![(&[5, 17, 42], 2), (&[7, 8], 2)];
            let step = |model: &Bloom| {
                let (_, mut caches) = model.prefill(&prompts, None).expect("prefill");
                let mut refs: Vec<&mut SequenceCache> = caches.iter_mut().collect();
                let out: Vec<Vec<f32>> = model
                    .decode_step(&[9, 11], &mut refs, None)
                    .expect("step")
                    .to_vec2()
                    .expect("vec");
                out
            };
            let (a, b) = (step(&half), step(&wide));
            assert_eq!(a, b, "{dtype:?}: the very same values, the same arithmetic");
            logits.push(a);
        }
        assert_ne!(logits[0], logits[1], "f16 and bf16 round differently");
    }

    #[test]
    fn sharded_safetensors_without_the_prefix_load_the_same_model() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/bloom-tiny-4h");
        let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
            .expect("fixture weights");
        let copy = tempfile::tempdir().expect("temp dir");
        for file in ["config.json", "tokenizer.json"] {
            std::fs::copy(dir.join(file), copy.path().join(file)).expect("copy");
        }
        let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
        let mut weight_map = serde_json::Map::new();
        for (i, (name, tensor)) in tensors.into_iter().enumerate() {
            let bare = name.trim_start_matches("transformer.").to_string();
            let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
            weight_map.insert(bare.clone(), file.into());
            shards[i % 2].insert(bare, tensor);
        }
        for (i, shard) in shards.iter().enumerate() {
            let path = copy
                .path()
                .join(format!("model-0000{}-of-00002.safetensors", i + 1));
            candle_core::safetensors::save(shard, path).expect("save shard");
        }
        let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
        std::fs::write(
            copy.path().join("model.safetensors.index.json"),
            index.to_string(),
        )
        .expect("index");
        let sharded = Bloom::load(copy.path(), &Device::Cpu).expect("sharded checkpoint");
        let (whole, _) = fixture("bloom-tiny-4h");
        let seq = [5, 17, 42, 99];
        assert_eq!(last_logits(&sharded, &seq), last_logits(&whole, &seq));

        // A shard outside the folder is refused; no weights at all is named.
        let escaping = serde_json::json!({ "weight_map": { "ln_f.weight": "../x.safetensors" } });
        std::fs::write(
            copy.path().join("model.safetensors.index.json"),
            escaping.to_string(),
        )
        .expect("index");
        let err = Bloom::load(copy.path(), &Device::Cpu)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("not a file of this folder"), "{err}");
        std::fs::remove_file(copy.path().join("model.safetensors.index.json")).expect("rm");
        let err = Bloom::load(copy.path(), &Device::Cpu)
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("no weights") && err.contains("pytorch_model.bin"),
            "{err}"
        );
    }

    #[test]
    fn alibi_slopes_match_transformers() {
        // torch: _get_alibi_slopes(4) and (6).
        let four = alibi_slopes(4);
        assert_eq!(four, [0.25, 0.0625, 0.015625, 0.00390625]);
        let six = alibi_slopes(6);
        assert_eq!(six.len(), 6);
        assert_eq!(&six[..4], &four[..]);
        assert!(
            (six[4] - 0.5).abs() < 1e-7 && (six[5] - 0.125).abs() < 1e-7,
            "{six:?}"
        );
    }

    #[test]
    fn logits_and_greedy_tokens_match_transformers() {
        for name in ["bloom-tiny-4h", "bloom-tiny-6h"] {
            let (model, expected) = fixture(name);
            let vocab = model.config().vocab_size;
            for (i, single) in expected["single"]
                .as_array()
                .expect("single")
                .iter()
                .enumerate()
            {
                let seq = ids(&single["ids"]);
                let t = one_row(seq.as_slice());
                let mask = t.ones_like().unwrap();
                let logits = model.forward(&t, &mask).unwrap();
                let ours: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
                assert_close(
                    &ours,
                    &floats(&single["logits"]),
                    &format!("{name} single {i}"),
                );
            }

            // Left-padded batch: real positions agree with transformers.
            let batch = &expected["batch"];
            let rows: Vec<Vec<u32>> = batch["ids"].as_array().unwrap().iter().map(ids).collect();
            let masks: Vec<Vec<u32>> = batch["mask"].as_array().unwrap().iter().map(ids).collect();
            let width = rows[0].len();
            let flat = |v: &Vec<Vec<u32>>| v.iter().flatten().copied().collect::<Vec<u32>>();
            let t = Tensor::from_vec(flat(&rows), (rows.len(), width), &Device::Cpu).unwrap();
            let m = Tensor::from_vec(flat(&masks), (rows.len(), width), &Device::Cpu).unwrap();
            let logits = model.forward(&t, &m).unwrap();
            for (i, theirs) in batch["logits"].as_array().unwrap().iter().enumerate() {
                let real = masks[i].iter().filter(|&&x| x == 1).count();
                let ours: Vec<f32> = logits
                    .get(i)
                    .unwrap()
                    .narrow(0, width - real, real)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!(ours.len(), real * vocab);
                assert_close(&ours, &floats(theirs), &format!("{name} batch row {i}"));
            }

            // Greedy decoding is transformers' exactly: the whole sequence each step here,
            // and one token per step through the KV cache below.
            for case in expected["greedy"].as_array().unwrap() {
                let mut seq = ids(&case["ids"]);
                let prompt = seq.len();
                for _ in 0..20 {
                    let t = one_row(seq.as_slice());
                    let next = next_greedy(&model, &t, &t.ones_like().unwrap());
                    seq.push(next[0]);
                }
                assert_eq!(
                    &seq[prompt..],
                    ids(&case["tokens"]).as_slice(),
                    "{name} greedy"
                );

                let mut cache = model.new_cache();
                let mut fresh = ids(&case["ids"]);
                let mut step = one_row(fresh.as_slice());
                for _ in 0..20 {
                    let mask = Tensor::ones((1, fresh.len()), DType::U32, &Device::Cpu).unwrap();
                    let logits = model.forward_cached(&step, &mask, &mut cache).unwrap();
                    let last = logits.dim(1).unwrap() - 1;
                    let scores = logits.get(0).unwrap().get(last).unwrap();
                    let next: u32 = scores.argmax(D::Minus1).unwrap().to_scalar().unwrap();
                    fresh.push(next);
                    step = one_row(&[next]);
                }
                assert_eq!(cache.len(), prompt + 19, "every fed token cached");
                assert_eq!(fresh, seq, "{name}: cached greedy decoding");
            }
        }
    }

    /// The largest difference of `ours` from `theirs`, and the largest magnitude of theirs.
    fn worst(ours: &[f32], theirs: &[f32]) -> (f32, f32) {
        assert_eq!(ours.len(), theirs.len());
        let difference = ours
            .iter()
            .zip(theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        (
            difference,
            theirs.iter().map(|v| v.abs()).fold(0f32, f32::max),
        )
    }

    #[test]
    fn half_precision_forward_matches_transformers_in_the_same_type() {
        for name in ["bloom-tiny-4h", "bloom-tiny-6h"] {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures")
                .join(name);
            let text = std::fs::read_to_string(dir.join("expected-half.json")).expect("fixture");
            let expected: serde_json::Value = serde_json::from_str(&text).expect("JSON");
            let (_, full) = fixture(name);
            for (key, precision) in [
                ("float16", Precision::Float16),
                ("bfloat16", Precision::Bfloat16),
            ] {
                let model = Bloom::load_in(&dir, &Device::Cpu, precision).expect("model");
                for (case, f32_case) in expected[key]["single"]
                    .as_array()
                    .expect("single")
                    .iter()
                    .zip(full["single"].as_array().expect("single"))
                {
                    let t = one_row(ids(&case["ids"]).as_slice());
                    let ours: Vec<f32> = model
                        .forward(&t, &t.ones_like().unwrap())
                        .and_then(|l| l.flatten_all())
                        .and_then(|l| l.to_vec1())
                        .unwrap();
                    let theirs = floats(&case["logits"]);
                    let (difference, scale) = worst(&ours, &theirs);
                    // Logits up to `scale` (about 2 here) are rounded to 11 (f16) or 8
                    // (bf16) significant bits at the end; a few units of the last place
                    // of the largest logit allow for sums taken in another order inside.
                    let ulp = scale
                        * if key == "float16" {
                            2f32.powi(-10)
                        } else {
                            2f32.powi(-7)
                        };
                    assert!(
                        difference <= 4.0 * ulp,
                        "{name} {key}: {difference} from transformers' {key} (ulp {ulp})"
                    );
                    // It is the half forward: logits of the type, on average closer to
                    // transformers' in the type than to its f32 forward.
                    let dtype = model.dtype;
                    let representable = |v: &f32| {
                        Tensor::new(&[*v], &Device::Cpu)
                            .and_then(|t| t.to_dtype(dtype)?.to_dtype(DType::F32)?.to_vec1::<f32>())
                            .is_ok_and(|back| back[0] == *v)
                    };
                    assert!(
                        ours.iter().all(representable),
                        "{name} {key}: logits of the type"
                    );
                    let mean = |other: &[f32]| {
                        ours.iter()
                            .zip(other)
                            .map(|(a, b)| (a - b).abs())
                            .sum::<f32>()
                            / ours.len() as f32
                    };
                    let from_f32 = floats(&f32_case["logits"]);
                    assert!(
                        mean(&theirs) < mean(&from_f32),
                        "{name} {key}: mean difference {} from transformers' {key}, {} from its f32",
                        mean(&theirs),
                        mean(&from_f32)
                    );
                }
                // Greedy decoding through the engine's caches, where no step's margin is
                // within rounding.
                let mut compared = 0;
                for case in expected[key]["greedy"].as_array().expect("greedy") {
                    if case["smallest_margin"].as_f64().expect("margin") < 0.05 {
                        continue;
                    }
                    let prompt = ids(&case["ids"]);
                    let best = |logits: Tensor| -> u32 {
                        logits
                            .get(0)
                            .and_then(|row| row.argmax(D::Minus1))
                            .and_then(|id| id.to_scalar())
                            .expect("the best token")
                    };
                    let (logits, mut caches) =
                        model.prefill(&[(prompt.as_slice(), 20)], None).unwrap();
                    let mut tokens = vec![best(logits)];
                    for _ in 1..20 {
                        let mut refs: Vec<&mut SequenceCache> = caches.iter_mut().collect();
                        let last = tokens[tokens.len() - 1];
                        tokens.push(best(model.decode_step(&[last], &mut refs, None).unwrap()));
                    }
                    assert_eq!(tokens, ids(&case["tokens"]), "{name} {key} greedy");
                    compared += 1;
                }
                assert!(
                    compared > 0,
                    "{name} {key}: no greedy run with margins to compare"
                );
            }
        }
    }

    /// The tiny BLOOM's folder in a temporary copy whose `model.safetensors` is `bytes`.
    fn with_weights(bytes: &[u8]) -> tempfile::TempDir {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/bloom-tiny-4h");
        let dir = tempfile::tempdir().expect("tempdir");
        for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(fixture.join(file), dir.path().join(file)).expect("copy");
        }
        std::fs::write(dir.path().join("model.safetensors"), bytes).expect("write");
        dir
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(crate::fuzz_cases(128)))]
        /// Bytes of a safetensors file changed in its header (its length, its JSON table of
        /// names, shapes and offsets), or the file cut anywhere: the load answers (an error
        /// names the model), and never panics or allocates by a lying header.
        #[test]
        fn changed_safetensors_headers_never_panic(
            changes in proptest::collection::vec((0usize..2048, proptest::prelude::any::<u8>()), 1..8),
            cut in proptest::option::of(0usize..4096),
        ) {
            let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/bloom-tiny-4h/model.safetensors");
            let bytes = crate::changed_bytes(std::fs::read(fixture).expect("fixture"), &changes, cut);
            let dir = with_weights(&bytes);
            if let Err(e) = Bloom::load(dir.path(), &Device::Cpu) {
                let named = e.to_string().contains(&dir.path().display().to_string());
                proptest::prop_assert!(named, "{e}");
            }
        }
    }
}
