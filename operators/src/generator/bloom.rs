//! BLOOM (BLOOMZ, SeqGPT-560M) on candle: mistral.rs has no BLOOM model, so the `seqgpt`
//! backend (DESIGN.md) runs this one. The forward pass follows transformers'
//! `BloomForCausalLM` step for step, so that logits match it (tests against fixtures that
//! `scripts/make-bloom-fixture.py` made with transformers):
//!
//! word embeddings → LayerNorm → per block { LayerNorm → fused QKV (per head `[q, k, v]`
//! interleaved) → attention with ALiBi biases (positions counted over the attention mask,
//! so left padding does not shift them) → dense + residual → LayerNorm → MLP (tanh GELU)
//! + residual } → LayerNorm → logits by the tied embedding matrix.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, Module, VarBuilder};
use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;
use serde::Deserialize;

use super::GeneratorError;
use super::paged::{BlockTable, PagedKv};
use super::skinny::{PackedRows, WeightRows};
use crate::kernels;

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

/// `weight` (widened to f32 at load) packed for [`PackedRows::matmul_t`] in `dtype`, the
/// precision its checkpoint stored: half precision is exact, as the values came from it,
/// and halves what a decoding step reads.
pub(super) fn pack(weight: &Tensor, dtype: DType) -> candle_core::Result<PackedRows> {
    let (_, k) = weight.dims2()?;
    match dtype {
        DType::F16 => {
            let values = weight.to_dtype(dtype)?.flatten_all()?.to_vec1()?;
            Ok(PackedRows::new(WeightRows::F16(&values), k))
        }
        DType::BF16 => {
            let values = weight.to_dtype(dtype)?.flatten_all()?.to_vec1()?;
            Ok(PackedRows::new(WeightRows::Bf16(&values), k))
        }
        _ => with_cpu_values(weight, |w| PackedRows::new(WeightRows::F32(w), k)),
    }
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

/// One sequence's keys and values, per block: what [`Bloom::decode_step`] attends over and
/// appends to.
pub struct SequenceCache {
    pub(super) kv: SequenceKv,
    pub(super) len: usize,
}

pub(super) enum SequenceKv {
    /// Its own vectors, per block.
    Own(Vec<HeadsKv>),
    /// Blocks of a [`PagedKv`] pool.
    Paged(BlockTable),
}

impl SequenceCache {
    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pool blocks the sequence holds, to give back when it ends.
    pub fn into_blocks(self) -> Option<BlockTable> {
        match self.kv {
            SequenceKv::Paged(table) => Some(table),
            SequenceKv::Own(_) => None,
        }
    }
}

/// A sequence's keys and values in one block, head by head: each head's keys (and values)
/// lie together, token after token, so attention reads them in order. Token by token,
/// with a token's heads side by side, a head's 64 values lay 4 KiB apart on the 560m
/// shape: every key a page of its own, and a decoding step spent ~50 ms of its ~130 in
/// attention that reads 0.2 GB.
pub(super) struct HeadsKv {
    keys: Vec<f32>,
    values: Vec<f32>,
    heads: usize,
    dim: usize,
    /// Tokens each head has room for.
    room: usize,
    len: usize,
}

impl HeadsKv {
    pub(super) fn with_room(heads: usize, dim: usize, room: usize) -> Self {
        let room = room.max(1);
        Self {
            keys: vec![0.0; heads * room * dim],
            values: vec![0.0; heads * room * dim],
            heads,
            dim,
            room,
            len: 0,
        }
    }

    /// Appends a token's keys and values from BLOOM's fused projection (per head: query,
    /// key, value).
    fn push(&mut self, qkv: &[f32]) {
        let dim = self.dim;
        self.push_with(|h| {
            let part = &qkv[h * 3 * dim..(h + 1) * 3 * dim];
            (&part[dim..2 * dim], &part[2 * dim..])
        });
    }

    /// Appends a token whose key and value of head `h` are `parts(h)`; past the room made
    /// at the start, every head's run moves to a larger one.
    pub(super) fn push_with<'a>(&mut self, parts: impl Fn(usize) -> (&'a [f32], &'a [f32])) {
        let (heads, dim) = (self.heads, self.dim);
        if self.len == self.room {
            let room = (2 * self.room).max(16);
            for vectors in [&mut self.keys, &mut self.values] {
                let mut moved = vec![0.0; heads * room * dim];
                for (to, from) in moved
                    .chunks_exact_mut(room * dim)
                    .zip(vectors.chunks_exact(self.room * dim))
                {
                    to[..from.len()].copy_from_slice(from);
                }
                *vectors = moved;
            }
            self.room = room;
        }
        for h in 0..heads {
            let (key, value) = parts(h);
            let at = (h * self.room + self.len) * dim;
            self.keys[at..at + dim].copy_from_slice(key);
            self.values[at..at + dim].copy_from_slice(value);
        }
        self.len += 1;
    }

    /// The keys and values of head `h`'s first `tokens` tokens.
    pub(super) fn head(&self, h: usize, tokens: usize) -> (&[f32], &[f32]) {
        let at = h * self.room * self.dim;
        let end = at + tokens.min(self.len) * self.dim;
        (&self.keys[at..end], &self.values[at..end])
    }
}

/// Rows of a decoding step up to which products go through [`PackedRows::matmul_t`]: past a
/// few dozen rows, a GEMM's reuse of each loaded weight wins.
pub(super) const SKINNY_ROWS: usize = 32;

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

/// Runs `f` on the values of a contiguous f32 tensor in CPU memory, where they lie.
pub(super) fn with_cpu_values<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> R,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("expected a tensor in CPU memory");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("expected a contiguous tensor");
    };
    Ok(f(&cpu.as_slice::<f32>()?[start..end]))
}

/// `x · weightᵀ (+ bias)` over the last dimension of `x`, as one 2-D product (a
/// broadcast one would first copy the transposed weights per batch). A few rows on CPU
/// (a decoding step) go through the `packed` copy, which a product reads once; more
/// rows (a prefill), or another device, through candle's GEMM.
pub(super) fn product(
    weight: &Tensor,
    packed: Option<&PackedRows>,
    bias: Option<&Tensor>,
    x: &Tensor,
) -> candle_core::Result<Tensor> {
    let (outputs, inputs) = weight.dims2()?;
    let mut dims = x.dims().to_vec();
    let rows = x.elem_count() / inputs;
    if let Some(last) = dims.last_mut() {
        *last = outputs;
    }
    let x = x.reshape((rows, inputs))?;
    let product = if let Some(packed) = packed.filter(|_| rows <= SKINNY_ROWS) {
        let bias = bias.map(Tensor::to_vec1::<f32>).transpose()?;
        let mut out = vec![0f32; rows * outputs];
        with_cpu_values(&x, |x| {
            packed.matmul_t(x, rows, bias.as_deref(), &mut out);
        })?;
        Tensor::from_vec(out, (rows, outputs), x.device())?
    } else {
        let product = x.matmul(&weight.t()?)?;
        match bias {
            Some(bias) => kernels::add_rows(product, bias)?,
            None => product,
        }
    };
    product.reshape(dims)
}

/// Attention of one head's `query` over that head's cached `keys`/`values` (token after
/// token) with BLOOM's ALiBi bias `slope × position`, written into `out`. Positions count
/// from the sequence's first token: there is no padding here.
pub(super) fn attend(
    query: &[f32],
    keys: &[f32],
    values: &[f32],
    slope: f32,
    scale: f32,
    out: &mut [f32],
) {
    Arch::new().dispatch(Attend {
        query,
        keys,
        values,
        slope,
        scale,
        out,
    });
}

/// Vectors of `out` a head's weighted sum of values holds in registers.
const OUT_VECTORS: usize = 4;

/// [`attend`] in explicit vectors (`pulp`, AVX-512 or AVX2 at run time). The plain loops
/// over `[f32; 8]` lanes before compiled to separate multiplies and adds, the weighted
/// sum of values accumulated in memory (each token waiting on the last), and a variant
/// over four keys at once to shuffles; this way a 560m decoding step's attention went
/// from ~21 to ~15–17 ms.
struct Attend<'a> {
    query: &'a [f32],
    keys: &'a [f32],
    values: &'a [f32],
    slope: f32,
    scale: f32,
    out: &'a mut [f32],
}

impl WithSimd for Attend<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let (scale, slope) = (self.scale, self.slope);
        let dim = self.query.len();
        let (query, query_rest) = S::as_simd_f32s(self.query);
        let mut scores = Vec::with_capacity(self.keys.len() / dim.max(1));
        for (t, key) in self.keys.chunks_exact(dim).enumerate() {
            let (key, key_rest) = S::as_simd_f32s(key);
            let mut acc = simd.splat_f32s(0.0);
            for (&q, &k) in query.iter().zip(key) {
                acc = simd.mul_add_f32s(q, k, acc);
            }
            let mut dot = simd.reduce_sum_f32s(acc);
            for (q, k) in query_rest.iter().zip(key_rest) {
                dot += q * k;
            }
            scores.push(dot * scale + slope * t as f32);
        }
        let max = kernels::lanes(&scores, f32::NEG_INFINITY, f32::max);
        for s in scores.iter_mut() {
            *s = kernels::exp_negative(*s - max);
        }
        let total: f32 = kernels::lanes(&scores, 0.0, |a, b| a + b);
        weigh_values(simd, &scores, total, self.values, self.out);
    }
}

/// `out = Σ values[t] · weights[t] / total` over the tokens of `weights`.
#[inline(always)]
fn weigh_values<S: Simd>(simd: S, weights: &[f32], total: f32, values: &[f32], out: &mut [f32]) {
    let dim = out.len();
    let chunk = OUT_VECTORS * S::F32_LANES;
    if dim.is_multiple_of(chunk) {
        // Head dimensions of 64 and 128: `OUT_VECTORS` vectors of `out` at a time, summed
        // in registers over every token (summed in memory, each token waits on the last).
        let scale = simd.splat_f32s(1.0 / total);
        for (c, out) in out.chunks_exact_mut(chunk).enumerate() {
            let mut acc = [simd.splat_f32s(0.0); OUT_VECTORS];
            for (&p, value) in weights.iter().zip(values.chunks_exact(dim)) {
                let p = simd.splat_f32s(p);
                let (value, _) = S::as_simd_f32s(&value[c * chunk..]);
                let Some(value) = value.first_chunk::<OUT_VECTORS>() else {
                    unreachable!("whole chunks")
                };
                for (acc, &v) in acc.iter_mut().zip(value) {
                    *acc = simd.mul_add_f32s(p, v, *acc);
                }
            }
            let (out, _) = S::as_mut_simd_f32s(out);
            for (o, acc) in out.iter_mut().zip(acc) {
                *o = simd.mul_f32s(acc, scale);
            }
        }
        return;
    }
    out.fill(0.0);
    let (out, out_rest) = S::as_mut_simd_f32s(out);
    for (&p, value) in weights.iter().zip(values.chunks_exact(dim)) {
        let weight = p / total;
        let broadcast = simd.splat_f32s(weight);
        let (value, value_rest) = S::as_simd_f32s(value);
        for (o, &v) in out.iter_mut().zip(value) {
            *o = simd.mul_add_f32s(broadcast, v, *o);
        }
        for (o, v) in out_rest.iter_mut().zip(value_rest) {
            *o += weight * v;
        }
    }
}

/// A loaded BLOOM model.
pub struct Bloom {
    config: BloomConfig,
    embeddings: Embedding,
    embeddings_norm: LayerNorm,
    blocks: Vec<Block>,
    final_norm: LayerNorm,
    device: Device,
    /// The tied embeddings packed for decoding steps on CPU.
    embeddings_packed: Option<PackedRows>,
}

impl Bloom {
    /// Loads `config.json` and the weights from `dir`: `model.safetensors`, shards listed
    /// in `model.safetensors.index.json`, or `pytorch_model.bin` (single or sharded), read
    /// by candle's pickle reader, which builds tensors and never runs the file's code.
    /// Weight names may carry the `transformer.` prefix or not.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, GeneratorError> {
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
        let weights = load_weights(dir).map_err(fail)?;
        let stored = weights
            .get("word_embeddings.weight")
            .map_or(DType::F32, Tensor::dtype);
        let vb = VarBuilder::from_tensors(weights, DType::F32, device);
        let mut model = Self::from_weights(config, vb, device)
            .map_err(|e| fail(format!("weights do not match config.json: {e}")))?;
        if device.is_cpu() {
            model
                .pack_for_decoding(stored)
                .map_err(|e| fail(format!("packing {stored:?} weights: {e}")))?;
        }
        Ok(model)
    }

    fn from_weights(
        config: BloomConfig,
        vb: VarBuilder,
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
            config,
            device: device.clone(),
            embeddings_packed: None,
        })
    }

    /// Keeps a copy of every weight matrix packed for decoding steps, which read all of
    /// them once per token, in the precision the checkpoint stored (`dtype`). Prefill keeps
    /// the f32 tensors, where candle's GEMM wants them.
    fn pack_for_decoding(&mut self, dtype: DType) -> candle_core::Result<()> {
        for block in &mut self.blocks {
            block.packed = Some([
                pack(block.qkv.weight(), dtype)?,
                pack(block.dense.weight(), dtype)?,
                pack(block.up.weight(), dtype)?,
                pack(block.down.weight(), dtype)?,
            ]);
        }
        self.embeddings_packed = Some(pack(self.embeddings.embeddings(), dtype)?);
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
        let slopes = Tensor::new(alibi_slopes(heads), &self.device)?;
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

        let mut hidden = self
            .embeddings_norm
            .forward(&self.embeddings.forward(ids)?)?;
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
                let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias)?;
                let probs = candle_nn::ops::softmax_last_dim(&scores)?;
                probs
                    .matmul(&v)?
                    .transpose(1, 2)?
                    .reshape((batch, new, self.config.hidden_size))
            })?;
        }
        self.final_norm.forward(&hidden)
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
        let normed = block.input_norm.forward(hidden)?;
        let residual = if post { &normed } else { hidden };
        let packed = |i: usize| block.packed.as_ref().map(|p| &p[i]);
        let context = attention(self.project(&block.qkv, packed(0), &normed)?)?;
        let attended = (self.project(&block.dense, packed(1), &context)? + residual)?;
        let normed = block.post_norm.forward(&attended)?;
        let residual = if post { &normed } else { &attended };
        let up = kernels::gelu_tanh(self.project(&block.up, packed(2), &normed)?)?;
        self.project(&block.down, packed(3), &up)? + residual
    }

    /// Logits of the final hidden states `(…, hidden)`: the tied embedding matrix.
    fn lm_head(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        product(
            self.embeddings.embeddings(),
            self.embeddings_packed.as_ref(),
            None,
            hidden,
        )
    }

    /// `linear` applied to `x` `(…, in)`.
    fn project(
        &self,
        linear: &Linear,
        packed: Option<&PackedRows>,
        x: &Tensor,
    ) -> candle_core::Result<Tensor> {
        product(linear.weight(), packed, linear.bias(), x)
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
        // With paged attention, per prompt: its slots in the pool, and its causal mask
        // plus ALiBi, shared by all blocks.
        let paged_prompts = match &paged {
            Some((kv, tables)) => {
                let slopes =
                    Tensor::new(alibi_slopes(heads), &self.device)?.reshape((heads, 1, 1))?;
                let prompts = tables
                    .iter()
                    .zip(&spans)
                    .map(|(table, &(_, len))| {
                        let bias = causal_alibi(len, &slopes, &self.device)?;
                        Ok((kv.prompt_slots(table, len)?, bias))
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Some(prompts)
            }
            None => None,
        };
        let ids: Vec<u32> = prompts
            .iter()
            .flat_map(|(p, _)| p.iter().copied())
            .collect();
        let ids = Tensor::new(ids, &self.device)?;
        let mut hidden = self
            .embeddings_norm
            .forward(&self.embeddings.forward(&ids)?)?;
        let mut own: Vec<Vec<HeadsKv>> = prompts
            .iter()
            .map(|_| Vec::with_capacity(self.config.n_layer))
            .collect();
        for (layer, block) in self.blocks.iter().enumerate() {
            hidden = self.block_forward(block, &hidden, |qkv| match &mut paged {
                None => self.attend_prompts_own(&qkv, &spans, prompts, &mut own),
                Some((kv, _)) => {
                    let paged_prompts = paged_prompts.as_deref().unwrap_or_default();
                    let mut contexts = Vec::with_capacity(spans.len());
                    for (&(offset, len), (slots, bias)) in spans.iter().zip(paged_prompts) {
                        let qkv = qkv
                            .narrow(0, offset, len)?
                            .reshape((len, heads, 3, head_dim))?;
                        let part = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2);
                        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
                        kv.write(layer, &k, &v, slots)?;
                        let heads_first = |t: Tensor| t.transpose(0, 1)?.contiguous();
                        let (q, k, v) = (heads_first(q)?, heads_first(k)?, heads_first(v)?);
                        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(bias)?;
                        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
                        contexts.push(
                            probs
                                .matmul(&v)?
                                .transpose(0, 1)?
                                .reshape((len, hidden_size))?,
                        );
                    }
                    Tensor::cat(&contexts, 0)
                }
            })?;
        }
        // Only the last position's logits: the LM head is the largest matrix of a small
        // model (250,880 × 1,024 in BLOOM-560m), not to be spent on every prompt token.
        let last: Vec<u32> = spans.iter().map(|&(o, len)| (o + len - 1) as u32).collect();
        let last = hidden.index_select(&Tensor::new(last, &self.device)?, 0)?;
        let logits = self.lm_head(&self.final_norm.forward(&last)?)?;
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
        let mut hidden = self
            .embeddings_norm
            .forward(&self.embeddings.forward(&ids)?)?;
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
                        kv.attend(layer, &part(0)?, &step)
                    })?;
                }
            }
            None => {
                for (layer, block) in self.blocks.iter().enumerate() {
                    hidden = self.block_forward(block, &hidden, |qkv| {
                        self.attend_own(layer, &qkv, caches)
                    })?;
                }
            }
        }
        for cache in caches.iter_mut() {
            cache.len += 1;
        }
        self.lm_head(&self.final_norm.forward(&hidden)?)
    }

    /// A prefill's attention over caches of their own: each prompt's keys and values
    /// become its cache rows (with room for its answer), then every (token, head) attends
    /// causally over its prompt with [`attend`], in parallel. In Rust rather than as
    /// tensor ops per prompt, which spent their time copying and launching (narrow,
    /// transpose, mask): 0.75 s of a 5.5 s prefill of eight 128-token prompts on the
    /// 560m shape that way, 0.5 s this way.
    fn attend_prompts_own(
        &self,
        qkv: &Tensor,
        spans: &[(usize, usize)],
        prompts: &[(&[u32], usize)],
        own: &mut [Vec<HeadsKv>],
    ) -> candle_core::Result<Tensor> {
        let (hidden_size, heads) = (self.config.hidden_size, self.config.n_head);
        let head_dim = hidden_size / heads;
        let slopes = alibi_slopes(heads);
        let scale = 1.0 / (head_dim as f32).sqrt();
        // Per token: heads × [q, k, v] × head_dim.
        let qkv = qkv.flatten_all()?.to_vec1::<f32>()?;
        let token = |t: usize| &qkv[t * 3 * hidden_size..(t + 1) * 3 * hidden_size];
        for ((&(offset, len), (_, answer)), layers) in spans.iter().zip(prompts).zip(&mut *own) {
            let mut kv = HeadsKv::with_room(heads, head_dim, len + answer);
            for t in offset..offset + len {
                kv.push(token(t));
            }
            layers.push(kv);
        }
        // The prompt of each token and the token's place in it.
        let places: Vec<(usize, usize)> = spans
            .iter()
            .enumerate()
            .flat_map(|(i, &(_, len))| (0..len).map(move |t| (i, t)))
            .collect();
        let mut context = vec![0f32; places.len() * hidden_size];
        context
            .par_chunks_mut(head_dim)
            .enumerate()
            .for_each(|(i, out)| {
                let (token_index, h) = (i / heads, i % heads);
                let (prompt, t) = places[token_index];
                let Some(kv) = own[prompt].last() else {
                    return;
                };
                let (keys, values) = kv.head(h, t + 1);
                let query = &token(token_index)[h * 3 * head_dim..][..head_dim];
                attend(query, keys, values, slopes[h], scale, out);
            });
        Tensor::from_vec(context, (places.len(), hidden_size), &self.device)
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
        let slopes = alibi_slopes(heads);
        let scale = 1.0 / (head_dim as f32).sqrt();
        // Per sequence: heads × [q, k, v] × head_dim.
        let qkv = qkv.flatten_all()?.to_vec1::<f32>()?;
        for (cache, token) in caches.iter_mut().zip(qkv.chunks_exact(3 * hidden_size)) {
            let SequenceKv::Own(layers) = &mut cache.kv else {
                candle_core::bail!("a sequence in blocks in a step without its pool");
            };
            layers[layer].push(token);
        }
        let mut own = Vec::with_capacity(batch);
        for cache in caches.iter() {
            let SequenceKv::Own(layers) = &cache.kv else {
                candle_core::bail!("a sequence in blocks in a step without its pool");
            };
            own.push(&layers[layer]);
        }
        let mut context = vec![0f32; batch * hidden_size];
        context
            .par_chunks_mut(head_dim)
            .enumerate()
            .for_each(|(i, out)| {
                let (b, h) = (i / heads, i % heads);
                let query = &qkv[b * 3 * hidden_size + h * 3 * head_dim..][..head_dim];
                let (keys, values) = own[b].head(h, own[b].len);
                attend(query, keys, values, slopes[h], scale, out);
            });
        Tensor::from_vec(context, (batch, hidden_size), &self.device)
    }
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
            let mut pool =
                PagedKv::new(40, 3, config.n_layer, config.n_head, head_dim, &Device::Cpu)
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
    fn attention_over_a_head_is_softmax_of_biased_scores_times_values() {
        // Head sizes whole vectors in registers (64, 128) and not (1, 8, 48, 80), and key
        // counts of one token and several.
        for dim in [1, 8, 48, 64, 80, 128] {
            for tokens in [1, 2, 7, 33] {
                let value = |i: usize, salt: f32| ((i as f32 + salt) * 0.731).sin();
                let query: Vec<f32> = (0..dim).map(|i| value(i, 0.5)).collect();
                let keys: Vec<f32> = (0..tokens * dim).map(|i| value(i, 1.5)).collect();
                let values: Vec<f32> = (0..tokens * dim).map(|i| value(i, 2.5)).collect();
                let (slope, scale) = (-0.25f32, 1.0 / (dim as f32).sqrt());
                let mut out = vec![f32::NAN; dim];
                attend(&query, &keys, &values, slope, scale, &mut out);
                let scores: Vec<f64> = (0..tokens)
                    .map(|t| {
                        let dot: f64 = (0..dim)
                            .map(|d| f64::from(query[d]) * f64::from(keys[t * dim + d]))
                            .sum();
                        dot * f64::from(scale) + f64::from(slope) * t as f64
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for (d, &ours) in out.iter().enumerate() {
                    let theirs: f64 = (0..tokens)
                        .map(|t| weights[t] / total * f64::from(values[t * dim + d]))
                        .sum();
                    assert!(
                        (f64::from(ours) - theirs).abs() < 1e-5,
                        "dim {dim}, {tokens} tokens, value {d}: {ours} vs {theirs}"
                    );
                }
            }
        }
    }

    #[test]
    fn heads_kv_keeps_every_token_past_its_room() {
        let (heads, dim) = (3, 2);
        let mut kv = HeadsKv::with_room(heads, dim, 2);
        // Token t, head h: query 0, key 100t + 10h + i, value -(that).
        let token = |t: usize| -> Vec<f32> {
            (0..heads)
                .flat_map(|h| {
                    let key = (0..dim).map(move |i| (100 * t + 10 * h + i) as f32);
                    std::iter::repeat_n(0.0, dim)
                        .chain(key.clone())
                        .chain(key.map(|v| -v))
                })
                .collect()
        };
        for t in 0..37 {
            kv.push(&token(t));
        }
        for h in 0..heads {
            let (keys, values) = kv.head(h, 37);
            let expected: Vec<f32> = (0..37)
                .flat_map(|t| (0..dim).map(move |i| (100 * t + 10 * h + i) as f32))
                .collect();
            assert_eq!(keys, expected);
            assert!(values.iter().zip(&expected).all(|(v, e)| *v == -e));
            assert_eq!(kv.head(h, 5).0, &expected[..5 * dim]);
        }
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
}
