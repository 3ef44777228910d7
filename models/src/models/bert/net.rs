//! The BERT forward pass, written for encoding throughput on CPU.
//!
//! Same weights and numerics as candle-transformers' `BertModel` (and so as
//! transformers), with less work per layer: the three attention projections are one
//! matmul (weights concatenated at load, the query pre-scaled by 1/√d so the scores need
//! no division), every projection runs on a 2-D (tokens × hidden) matrix, so each is one
//! large matmul, and on the CPU the bias, the padded softmax and GELU are in-place
//! vectorized kernels ([`crate::kernels`]).

use candle_core::{D, DType, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use candle_transformers::models::bert::{Config, HiddenAct};

use crate::kernels;

pub(super) struct BertNet {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    head_dim: usize,
    hidden: usize,
}

struct Layer {
    qkv: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    up: Linear,
    down: Linear,
    out_norm: LayerNorm,
    act: HiddenAct,
}

fn linear(vb: &VarBuilder, inputs: usize, outputs: usize) -> candle_core::Result<Linear> {
    let weight = vb.get((outputs, inputs), "weight")?;
    let bias = vb.get(outputs, "bias")?;
    Ok(Linear::new(weight, Some(bias)))
}

fn layer_norm(vb: &VarBuilder, size: usize, eps: f64) -> candle_core::Result<LayerNorm> {
    // Older checkpoints name the parameters gamma/beta.
    let (weight, bias) = match (vb.get(size, "weight"), vb.get(size, "bias")) {
        (Ok(w), Ok(b)) => (w, b),
        _ => (vb.get(size, "gamma")?, vb.get(size, "beta")?),
    };
    // In f32 whatever the model computes in: see [`norm`].
    Ok(LayerNorm::new(
        weight.to_dtype(DType::F32)?,
        bias.to_dtype(DType::F32)?,
        eps,
    ))
}

/// `layer` over `x`, computed in f32 and rounded back to `x`'s type, as torch computes a
/// half type's layer norm.
fn norm(layer: &LayerNorm, x: &Tensor) -> candle_core::Result<Tensor> {
    match x.dtype() {
        DType::F32 => layer.forward(x),
        half => layer.forward(&x.to_dtype(DType::F32)?)?.to_dtype(half),
    }
}

impl BertNet {
    /// Loads the weights under `embeddings.*` and `encoder.*`, or the same under a
    /// `bert.` (or `<model_type>.`) prefix, as checkpoints saved with a task head have them.
    pub(super) fn load(vb: VarBuilder, config: &Config) -> candle_core::Result<Self> {
        match Self::load_at(vb.clone(), config) {
            Ok(net) => Ok(net),
            Err(err) => {
                let prefix = config.model_type.clone().unwrap_or_else(|| "bert".into());
                Self::load_at(vb.pp(prefix), config).map_err(|_| err)
            }
        }
    }

    fn load_at(vb: VarBuilder, config: &Config) -> candle_core::Result<Self> {
        let hidden = config.hidden_size;
        let heads = config.num_attention_heads;
        if heads == 0 || !hidden.is_multiple_of(heads) {
            candle_core::bail!("hidden_size {hidden} is not a multiple of {heads} heads");
        }
        let head_dim = hidden / heads;
        let eps = config.layer_norm_eps;
        let e = vb.pp("embeddings");
        let embedding = |name: &str, rows: usize| -> candle_core::Result<Embedding> {
            Ok(Embedding::new(
                e.pp(name).get((rows, hidden), "weight")?,
                hidden,
            ))
        };
        let word = embedding("word_embeddings", config.vocab_size)?;
        let position = embedding("position_embeddings", config.max_position_embeddings)?;
        let token_type = embedding("token_type_embeddings", config.type_vocab_size)?;
        let norm = layer_norm(&e.pp("LayerNorm"), hidden, eps)?;

        let scale = 1.0 / (head_dim as f64).sqrt();
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let a = l.pp("attention");
            let q = linear(&a.pp("self.query"), hidden, hidden)?;
            let k = linear(&a.pp("self.key"), hidden, hidden)?;
            let v = linear(&a.pp("self.value"), hidden, hidden)?;
            let bias = |l: &Linear| {
                l.bias()
                    .cloned()
                    .ok_or_else(|| candle_core::Error::Msg("bias".into()))
            };
            let weight = Tensor::cat(
                &[
                    (q.weight() * scale)?,
                    k.weight().clone(),
                    v.weight().clone(),
                ],
                0,
            )?;
            let bias = Tensor::cat(&[(bias(&q)? * scale)?, bias(&k)?, bias(&v)?], 0)?;
            layers.push(Layer {
                qkv: Linear::new(weight, Some(bias)),
                attention_out: linear(&a.pp("output.dense"), hidden, hidden)?,
                attention_norm: layer_norm(&a.pp("output.LayerNorm"), hidden, eps)?,
                up: linear(
                    &l.pp("intermediate.dense"),
                    hidden,
                    config.intermediate_size,
                )?,
                down: linear(&l.pp("output.dense"), config.intermediate_size, hidden)?,
                out_norm: layer_norm(&l.pp("output.LayerNorm"), hidden, eps)?,
                act: config.hidden_act,
            });
        }
        Ok(Self {
            word,
            position,
            token_type,
            norm,
            layers,
            heads,
            head_dim,
            hidden,
        })
    }

    /// Token vectors `(batch, seq, hidden)` for `ids` and `types` `(batch, seq)`, right
    /// padded: row `b` has `lens[b]` tokens; `mask` (1 for tokens, 0 for padding) is `None`
    /// when no row is padded.
    pub(super) fn forward(
        &self,
        ids: &Tensor,
        types: &Tensor,
        mask: Option<&Tensor>,
        lens: &[usize],
    ) -> candle_core::Result<Tensor> {
        let (batch, seq) = ids.dims2()?;
        let device = ids.device();
        let positions = Tensor::arange(0u32, seq as u32, device)?;
        let x = (self.word.forward(ids)? + self.token_type.forward(types)?)?
            .broadcast_add(&self.position.forward(&positions)?)?;
        let mut x = norm(&self.norm, &x)?.reshape((batch * seq, self.hidden))?;
        // Additive mask, (batch, 1, 1, seq): 0 for tokens, f32::MIN for padding, as
        // transformers' extended attention mask.
        let mask = match mask {
            Some(mask) => Some(
                ((mask.to_dtype(DType::F32)?.ones_like()? - mask.to_dtype(DType::F32)?)?
                    * f32::MIN as f64)?
                    .reshape((batch, 1, 1, seq))?,
            ),
            None => None,
        };
        for layer in &self.layers {
            x = self.layer(layer, &x, (batch, seq), mask.as_ref(), lens)?;
        }
        x.reshape((batch, seq, self.hidden))
    }

    fn layer(
        &self,
        layer: &Layer,
        x: &Tensor,
        (batch, seq): (usize, usize),
        mask: Option<&Tensor>,
        lens: &[usize],
    ) -> candle_core::Result<Tensor> {
        let (heads, head_dim) = (self.heads, self.head_dim);
        // (tokens, 3·hidden) → (3, batch, heads, seq, head_dim), one copy.
        let qkv = kernels::linear(&layer.qkv, x)?
            .reshape((batch, seq, 3, heads, head_dim))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        let scores = kernels::matmul(&q, &k.t()?)?;
        let probs = match mask {
            _ if scores.device().is_cpu() && scores.dtype() == DType::F32 => {
                kernels::masked_softmax(scores, lens)?
            }
            // A half type on the CPU: in f32, rounded back, as torch does.
            _ if scores.device().is_cpu() => {
                let half = scores.dtype();
                kernels::masked_softmax(scores.to_dtype(DType::F32)?, lens)?.to_dtype(half)?
            }
            Some(mask) => {
                let mask = mask.to_dtype(scores.dtype())?;
                candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?
            }
            None => candle_nn::ops::softmax_last_dim(&scores)?,
        };
        let context = kernels::matmul(&probs, &v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((batch * seq, self.hidden))?;
        let attended = norm(
            &layer.attention_norm,
            &(kernels::linear(&layer.attention_out, &context)? + x)?,
        )?;
        let up = kernels::linear(&layer.up, &attended)?;
        let up = match layer.act {
            HiddenAct::Gelu => kernels::gelu_erf(up)?,
            HiddenAct::GeluApproximate => up.gelu()?,
            HiddenAct::Relu => up.relu()?,
        };
        norm(
            &layer.out_norm,
            &(kernels::linear(&layer.down, &up)? + &attended)?,
        )
    }
}

/// Mean of the token vectors where `mask` is 1, or the first token's: `(batch, hidden)`.
pub(super) fn pool(hidden: &Tensor, mask: &Tensor, mean: bool) -> candle_core::Result<Tensor> {
    if !mean {
        return hidden.narrow(1, 0, 1)?.squeeze(1);
    }
    let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
    summed.broadcast_div(&counts)
}

/// Rows divided by max(‖row‖, 1e-12), as `torch.nn.functional.normalize`.
pub(super) fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let norms = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    x.broadcast_div(&norms)
}
