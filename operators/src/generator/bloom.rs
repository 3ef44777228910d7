//! BLOOM (BLOOMZ, SeqGPT-560M) on candle: mistral.rs has no BLOOM model, so the `seqgpt`
//! backend (DESIGN.md) runs this one. The forward pass follows transformers'
//! `BloomForCausalLM` step for step, so that logits match it (tests against fixtures that
//! `scripts/make-bloom-fixture.py` made with transformers):
//!
//! word embeddings → LayerNorm → per block { LayerNorm → fused QKV (per head `[q, k, v]`
//! interleaved) → attention with ALiBi biases (positions counted over the attention mask,
//! so left padding does not shift them) → dense + residual → LayerNorm → MLP (tanh GELU)
//! + residual } → LayerNorm → logits by the tied embedding matrix.

use std::path::Path;

use candle_core::{D, DType, Device, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, Module, VarBuilder};
use serde::Deserialize;

use super::GeneratorError;

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

struct Block {
    input_norm: LayerNorm,
    qkv: Linear,
    dense: Linear,
    post_norm: LayerNorm,
    up: Linear,
    down: Linear,
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

/// A loaded BLOOM model.
pub struct Bloom {
    config: BloomConfig,
    embeddings: Embedding,
    embeddings_norm: LayerNorm,
    blocks: Vec<Block>,
    final_norm: LayerNorm,
    device: Device,
}

impl Bloom {
    /// Loads `config.json` and `model.safetensors` from `dir` (weight names with or
    /// without the `transformer.` prefix).
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
        let weights = candle_core::safetensors::load(dir.join("model.safetensors"), device)
            .map_err(|e| fail(format!("model.safetensors: {e}")))?;
        let prefixed = weights.contains_key("transformer.word_embeddings.weight");
        let vb = VarBuilder::from_tensors(weights, DType::F32, device);
        let vb = if prefixed { vb.pp("transformer") } else { vb };
        Self::from_weights(config, vb, device)
            .map_err(|e| fail(format!("weights do not match config.json: {e}")))
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
        })
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
        let causal: Vec<f32> = (past..tokens)
            .flat_map(|i| (0..tokens).map(move |j| if j <= i { 0.0 } else { f32::MIN }))
            .collect();
        let causal = Tensor::from_vec(causal, (1, 1, new, tokens), &self.device)?;
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
            let normed = block.input_norm.forward(&hidden)?;
            let residual = if self.config.apply_residual_connection_post_layernorm {
                &normed
            } else {
                &hidden
            };
            let qkv = block
                .qkv
                .forward(&normed)?
                .reshape((batch, new, heads, 3, head_dim))?;
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
            let context = probs.matmul(&v)?.transpose(1, 2)?.reshape((
                batch,
                new,
                self.config.hidden_size,
            ))?;
            let attended = (block.dense.forward(&context)? + residual)?;
            let normed = block.post_norm.forward(&attended)?;
            let residual = if self.config.apply_residual_connection_post_layernorm {
                &normed
            } else {
                &attended
            };
            let up = block.up.forward(&normed)?.gelu()?;
            hidden = (block.down.forward(&up)? + residual)?;
        }
        let hidden = self.final_norm.forward(&hidden)?;
        hidden.broadcast_matmul(&self.embeddings.embeddings().t()?)
    }

    /// The id of the most likely next token after each sequence of `ids`/`mask`.
    pub fn next_greedy(&self, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Vec<u32>> {
        let logits = self.forward(ids, mask)?;
        let last = logits.dim(1)? - 1;
        logits
            .narrow(1, last, 1)?
            .squeeze(1)?
            .argmax(D::Minus1)?
            .to_vec1()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                    let next = model.next_greedy(&t, &t.ones_like().unwrap()).unwrap();
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
