//! The models' costliest steps outside their matrix products (the encoder's and BLOOM's),
//! as in-place CPU kernels the compiler vectorizes (candle's are scalar or go through
//! broadcasting copies, and allocate a fresh tensor each, which for a prefill's activations
//! means fresh pages from the kernel every time):
//!
//! - BERT's exact GELU, `x · Φ(x)`: candle calls a scalar `erff` per value. Here the error
//!   function is Abramowitz & Stegun's 7.1.26 (absolute error under 1.5e-7) over a
//!   branch-free `exp`.
//! - BLOOM's tanh GELU, `½x(1 + tanh(u))`: candle calls scalar `tanhf`. Here as the equal
//!   `x · σ(2u)`, over the same `exp`.
//! - the attention softmax over right-padded keys: candle adds a broadcast mask tensor (a
//!   strided copy as large as the scores) and then takes the softmax. Here each row's
//!   softmax runs over its real keys and the padded ones get 0, which is what the additive
//!   mask of the most negative float gives.
//! - a linear layer's bias added to each row of its product (candle's broadcast add walks a
//!   strided index per value).

use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Tensor};
use rayon::prelude::*;

/// `x · Φ(x)` over `x`, in place on the CPU (candle's own kernel elsewhere).
pub(crate) fn gelu_erf(x: Tensor) -> candle_core::Result<Tensor> {
    if is_half_on_cpu(&x) {
        // In f32, rounded back, as torch computes a half type's GELU.
        let half = x.dtype();
        return gelu_erf(x.to_dtype(DType::F32)?)?.to_dtype(half);
    }
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return x.gelu_erf();
    }
    let x = x.contiguous()?;
    x.inplace_op1(&GeluErf)?;
    Ok(x)
}

/// BLOOM's tanh-approximated GELU over `x`, in place on the CPU (candle's own kernel
/// elsewhere).
pub(crate) fn gelu_tanh(x: Tensor) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return x.gelu();
    }
    let x = x.contiguous()?;
    x.inplace_op1(&GeluTanh)?;
    Ok(x)
}

/// Llama's MLP activation: for rows `[gate | up]` `(rows, 2f)`, `silu(gate) · up`
/// `(rows, f)`, with `silu(x) = x · σ(x)`.
pub(crate) fn swiglu(gate_up: &Tensor) -> candle_core::Result<Tensor> {
    let (rows, width) = gate_up.dims2()?;
    if !width.is_multiple_of(2) {
        candle_core::bail!("gate and up rows of odd width {width}");
    }
    let f = width / 2;
    let values = gate_up.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; rows * f];
    out.par_chunks_mut(f)
        .zip(values.par_chunks(width))
        .for_each(|(out, row)| {
            let (gate, up) = row.split_at(f);
            for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                *o = g * sigmoid(g) * u;
            }
        });
    Tensor::from_vec(out, (rows, f), gate_up.device())
}

/// `x · weightᵀ + bias` for `x` `(rows, in)`, the bias added in place on the CPU.
pub(crate) fn linear(layer: &candle_nn::Linear, x: &Tensor) -> candle_core::Result<Tensor> {
    use candle_core::Module;
    if is_half_on_cpu(x) && x.rank() == 2 {
        let product = matmul(x, &layer.weight().t()?)?;
        return match layer.bias() {
            Some(bias) => product.broadcast_add(bias),
            None => Ok(product),
        };
    }
    match layer.bias() {
        Some(bias) if x.device().is_cpu() && x.rank() == 2 => {
            add_rows(x.matmul(&layer.weight().t()?)?, bias)
        }
        _ => layer.forward(x),
    }
}

fn is_half_on_cpu(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F16 | DType::BF16)
}

/// `a · b`; in a half type on the CPU, whose matmul candle lacks there (bfloat16) or runs
/// slowly, as torch computes it: the half operands widened, summed in f32, the product
/// rounded back to the half type.
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if !is_half_on_cpu(a) {
        return a.matmul(b);
    }
    let half = a.dtype();
    a.to_dtype(DType::F32)?
        .matmul(&b.to_dtype(DType::F32)?)?
        .to_dtype(half)
}

/// `product (rows, n) + bias (n)` added to every row: in place on the CPU, a broadcast add
/// elsewhere.
pub(crate) fn add_rows(product: Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    if !product.device().is_cpu() || product.dtype() != DType::F32 {
        return product.broadcast_add(bias);
    }
    let product = product.contiguous()?;
    product.inplace_op2(&bias.contiguous()?, &AddRows)?;
    Ok(product)
}

struct AddRows;

impl InplaceOp2 for AddRows {
    fn name(&self) -> &'static str {
        "add-rows-in-place"
    }

    fn cpu_fwd(
        &self,
        rows: &mut CpuStorage,
        rows_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(rows), CpuStorage::F32(bias)) = (rows, bias) else {
            candle_core::bail!("add-rows-in-place takes f32 values");
        };
        let (Some((start, end)), Some((bias_start, bias_end))) = (
            rows_layout.contiguous_offsets(),
            bias_layout.contiguous_offsets(),
        ) else {
            candle_core::bail!("add-rows-in-place takes contiguous tensors");
        };
        let bias = &bias[bias_start..bias_end];
        if bias.is_empty() || !(end - start).is_multiple_of(bias.len()) {
            candle_core::bail!("a bias of {} for {} values", bias.len(), end - start);
        }
        rows[start..end]
            .par_chunks_mut(bias.len() * 64)
            .for_each(|chunk| {
                for row in chunk.chunks_exact_mut(bias.len()) {
                    row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
                }
            });
        Ok(())
    }
}

/// Softmax over the last dimension of attention scores `(batch, heads, queries, keys)`,
/// in place, where batch row `b` has `lens[b]` real keys (the rest are padding).
pub(crate) fn masked_softmax(scores: Tensor, lens: &[usize]) -> candle_core::Result<Tensor> {
    let (batch, heads, queries, keys) = scores.dims4()?;
    if lens.len() != batch || lens.iter().any(|&l| l == 0 || l > keys) {
        candle_core::bail!("key lengths {lens:?} for scores {:?}", scores.dims());
    }
    let scores = scores.contiguous()?;
    scores.inplace_op1(&MaskedSoftmax {
        lens,
        heads,
        block: queries * keys,
        keys,
    })?;
    Ok(scores)
}

struct MaskedSoftmax<'a> {
    lens: &'a [usize],
    heads: usize,
    /// Values per (batch row, head).
    block: usize,
    keys: usize,
}

impl InplaceOp1 for MaskedSoftmax<'_> {
    fn name(&self) -> &'static str {
        "masked-softmax-in-place"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(values) = storage else {
            candle_core::bail!("masked-softmax-in-place takes f32 values");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("masked-softmax-in-place takes a contiguous tensor");
        };
        values[start..end]
            .par_chunks_mut(self.block)
            .enumerate()
            .for_each(|(i, block)| {
                let len = self.lens[i / self.heads];
                for row in block.chunks_exact_mut(self.keys) {
                    let (live, padded) = row.split_at_mut(len);
                    let max = lanes(live, f32::NEG_INFINITY, f32::max);
                    live.iter_mut().for_each(|v| *v = exp_negative(*v - max));
                    let scale = 1.0 / lanes(live, 0.0, |a, b| a + b);
                    live.iter_mut().for_each(|v| *v *= scale);
                    padded.fill(0.0);
                }
            });
        Ok(())
    }
}

struct GeluErf;

impl InplaceOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf-in-place"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        map_in_place(self.name(), storage, layout, gelu)
    }
}

struct GeluTanh;

impl InplaceOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu-tanh-in-place"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        map_in_place(self.name(), storage, layout, gelu_tanh_value)
    }
}

/// `f` applied to every value of a contiguous f32 tensor, in parallel chunks.
fn map_in_place(
    name: &str,
    storage: &mut CpuStorage,
    layout: &Layout,
    f: impl Fn(f32) -> f32 + Sync,
) -> candle_core::Result<()> {
    let CpuStorage::F32(values) = storage else {
        candle_core::bail!("{name} takes f32 values");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{name} takes a contiguous tensor");
    };
    values[start..end]
        .par_chunks_mut(1 << 14)
        .for_each(|chunk| chunk.iter_mut().for_each(|v| *v = f(*v)));
    Ok(())
}

/// `values` folded with `op` in 8 lanes, then the lanes together: a shape the compiler
/// vectorizes (a plain fold must keep its order, one value at a time).
#[inline]
pub(crate) fn lanes(values: &[f32], start: f32, op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [start; 8];
    let chunks = values.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = op(*a, v);
        }
    }
    acc.iter().chain(rest).fold(start, |a, &v| op(a, v))
}

/// `0.5 · x · (1 + erf(x / √2))`; below zero through `erfc`, without the cancellation of
/// `1 + erf` there.
#[inline]
fn gelu(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    let erfc = poly * exp_negative(-z * z);
    let one_plus_erf = if x < 0.0 { erfc } else { 2.0 - erfc };
    0.5 * x * one_plus_erf
}

/// `½x(1 + tanh(u))`, `u = √(2/π)(x + 0.044715x³)`, as `x · σ(2u)` (the same value: `1 +
/// tanh(u) = 2σ(2u)`), with `σ` from `e^(−2|u|)` so that the exponential never overflows.
#[inline]
fn gelu_tanh_value(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x);
    x * sigmoid(2.0 * u)
}

/// `1 / (1 + e^−x)`, from `e^(−|x|)` so that the exponential never overflows.
#[inline]
fn sigmoid(x: f32) -> f32 {
    let e = exp_negative(-x.abs());
    (if x >= 0.0 { 1.0 } else { e }) / (1.0 + e)
}

/// `e^x` for `x ≤ 0` (Cephes' `expf`: `2^n · e^r`, |r| ≤ ln 2 / 2, degree-6 polynomial);
/// below −87, where f32 would turn subnormal, `e^−87`.
///
/// `n` is rounded (ties to even) by adding 1.5 · 2^23, which leaves it in the low bits of
/// the sum, and `2^n` is made from those bits: no float-to-int cast, which Rust saturates
/// and the compiler therefore did one lane at a time (SwiGLU over a prefill's rows ran
/// 2.2x slower that way). Same values, bit for bit, as `round_ties_even` and a cast.
#[inline]
pub(crate) fn exp_negative(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let e_r = p * r * r + r + 1.0;
    // The sum's bits are those of ROUND plus n; n + 127 (≥ 1 here) is 2^n's exponent.
    e_r * f32::from_bits(shifted.to_bits().wrapping_sub(ROUND.to_bits() - 127) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candles_gelu_erf() {
        let values: Vec<f32> = (-20_000..=20_000).map(|i| i as f32 * 6e-4).collect();
        let reference = Tensor::new(values.as_slice(), &Device::Cpu)
            .and_then(|t| t.gelu_erf())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("candle");
        let ours = gelu_erf(Tensor::new(values.as_slice(), &Device::Cpu).expect("tensor"))
            .and_then(|t| t.to_vec1::<f32>())
            .expect("ours");
        for ((x, a), b) in values.iter().zip(&reference).zip(&ours) {
            // A few ulps.
            assert!(
                (a - b).abs() <= 4e-7 * x.abs().max(1.0),
                "gelu({x}): {a} vs {b}"
            );
        }
        assert!(gelu(-100.0).abs() < 1e-30);
        assert_eq!(gelu(100.0), 100.0);
    }

    #[test]
    fn exp_negative_is_within_two_ulps_down_to_its_floor() {
        // A fine sweep, and the points where `x · log2 e` is half an odd integer (where
        // the rounding of `n` ties).
        let sweep = (0..=870_000).map(|i| i as f32 * -1e-4);
        let ties = (0..=250).map(|i| (i as f32 + 0.5) * -std::f32::consts::LN_2);
        for x in sweep.chain(ties).filter(|&x| x >= -87.0) {
            let ours = f64::from(exp_negative(x));
            let exact = f64::from(x).exp();
            assert!(
                (ours - exact).abs() <= 2.4e-7 * exact,
                "exp({x}): {ours} vs {exact}"
            );
        }
        assert_eq!(exp_negative(0.0), 1.0);
        assert_eq!(exp_negative(-1e4), exp_negative(-87.0));
    }

    #[test]
    fn matches_candles_gelu_tanh() {
        let values: Vec<f32> = (-20_000..=20_000).map(|i| i as f32 * 6e-4).collect();
        let reference = Tensor::new(values.as_slice(), &Device::Cpu)
            .and_then(|t| t.gelu())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("candle");
        let ours = gelu_tanh(Tensor::new(values.as_slice(), &Device::Cpu).expect("tensor"))
            .and_then(|t| t.to_vec1::<f32>())
            .expect("ours");
        for ((x, a), b) in values.iter().zip(&reference).zip(&ours) {
            assert!(
                (a - b).abs() <= 4e-7 * x.abs().max(1.0),
                "gelu_tanh({x}): {a} vs {b}"
            );
        }
        assert!(gelu_tanh_value(-100.0).abs() < 1e-30);
        assert_eq!(gelu_tanh_value(100.0), 100.0);
        assert_eq!(gelu_tanh_value(0.0), 0.0);
    }

    #[test]
    fn linear_adds_the_bias_to_every_row() {
        let weight = Tensor::randn(0f32, 1.0, (5, 3), &Device::Cpu).expect("weight");
        let bias = Tensor::randn(0f32, 1.0, 5, &Device::Cpu).expect("bias");
        let layer = candle_nn::Linear::new(weight, Some(bias));
        let x = Tensor::randn(0f32, 1.0, (7, 3), &Device::Cpu).expect("x");
        let theirs = candle_core::Module::forward(&layer, &x)
            .and_then(|t| t.to_vec2::<f32>())
            .expect("candle");
        let ours = linear(&layer, &x)
            .and_then(|t| t.to_vec2::<f32>())
            .expect("ours");
        assert_eq!(theirs, ours);
    }

    #[test]
    fn masked_softmax_is_the_softmax_of_the_additively_masked_scores() {
        let (batch, heads, queries, keys) = (3, 2, 4, 5);
        let scores =
            Tensor::randn(0f32, 3.0, (batch, heads, queries, keys), &Device::Cpu).expect("scores");
        let lens = [5, 2, 1];
        let mask: Vec<f32> = lens
            .iter()
            .flat_map(|&l| (0..keys).map(move |k| if k < l { 0.0 } else { f32::MIN }))
            .collect();
        let mask = Tensor::from_vec(mask, (batch, 1, 1, keys), &Device::Cpu).expect("mask");
        let reference = scores
            .broadcast_add(&mask)
            .and_then(|s| candle_nn::ops::softmax_last_dim(&s))
            .and_then(|p| p.flatten_all()?.to_vec1::<f32>())
            .expect("candle");
        let ours = masked_softmax(scores.copy().expect("copy"), &lens)
            .and_then(|p| p.flatten_all()?.to_vec1::<f32>())
            .expect("ours");
        for (a, b) in reference.iter().zip(&ours) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert!(
            masked_softmax(scores, &[5, 0, 1]).is_err(),
            "a row without keys"
        );
    }
}
