//! Products of a few rows by a large weight matrix, `x · wᵀ`, for decoding on CPU.
//!
//! A decoding step multiplies a handful of rows (one token per sequence in the batch) by
//! every weight matrix of the model. General GEMM kernels repack the weight matrix on each
//! call, which for so few rows costs more than the product: candle's spent most of a
//! BLOOM-560m decoding step copying weights. Here each weight row is read from memory once,
//! straight from where it lies, and multiplied by every input row while it sits in L1, so
//! a step costs about one pass over the weights.

use rayon::prelude::*;

/// Weight rows per parallel task: enough work per task to amortize scheduling, small
/// enough to spread a 1,024-row matrix over a few cores.
const ROWS_PER_TASK: usize = 32;

/// Weight rows (`n × k`, row-major) as they are kept: f32, or the half precision a
/// checkpoint came in, widened to f32 as they are read (see [`Weight`]).
#[derive(Clone, Copy)]
pub enum WeightRows<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
    Bf16(&'a [half::bf16]),
}

impl WeightRows<'_> {
    fn len(&self) -> usize {
        match self {
            WeightRows::F32(w) => w.len(),
            WeightRows::F16(w) => w.len(),
            WeightRows::Bf16(w) => w.len(),
        }
    }
}

/// `out (rows × n) = x (rows × k) · wᵀ (+ bias)`, with `w` `(n × k)` row-major, as a
/// linear layer stores it.
pub fn matmul_t(x: &[f32], rows: usize, w: WeightRows, bias: Option<&[f32]>, out: &mut [f32]) {
    let k = x.len() / rows.max(1);
    let n = w.len() / k.max(1);
    assert!(
        x.len() == rows * k && w.len() == n * k && out.len() == rows * n,
        "matmul_t: x {rows}×{k}, w {} values, out {} values",
        w.len(),
        out.len()
    );
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n, "matmul_t: bias");
    }
    // Each task takes ROWS_PER_TASK weight rows and writes the matching columns of every
    // output row, straight where they belong (no transposed copy to allocate and walk).
    let mut tasks: Vec<Vec<&mut [f32]>> = (0..n.div_ceil(ROWS_PER_TASK))
        .map(|_| Vec::with_capacity(rows))
        .collect();
    for row in out.chunks_mut(n.max(1)) {
        for (columns, task) in row.chunks_mut(ROWS_PER_TASK).zip(&mut tasks) {
            task.push(columns);
        }
    }
    match w {
        WeightRows::F32(w) => by_tasks(x, k, w, bias, tasks),
        WeightRows::F16(w) => by_tasks(x, k, w, bias, tasks),
        WeightRows::Bf16(w) => by_tasks(x, k, w, bias, tasks),
    }
}

/// The tasks in parallel, task `t` over weight rows `t × ROWS_PER_TASK…`.
fn by_tasks<T: Weight>(
    x: &[f32],
    k: usize,
    w: &[T],
    bias: Option<&[f32]>,
    tasks: Vec<Vec<&mut [f32]>>,
) {
    tasks
        .into_par_iter()
        .zip(w.par_chunks(ROWS_PER_TASK * k))
        .enumerate()
        .for_each(|(t, (mut out, w))| {
            let bias = bias.map(|b| &b[t * ROWS_PER_TASK..][..w.len() / k]);
            dot_rows(x, k, w, bias, &mut out);
        });
}

/// A weight value as stored: f32, used where it lies, or half precision, widened to f32
/// two rows at a time into a buffer that stays in L1 (exactly: every f16 and bf16 value
/// is an f32 value), which halves the memory a decoding step reads. (Widening in the
/// product's loop instead, eight values at a time, went through a stack copy per call
/// and ran at half the speed.)
trait Weight: Copy + Sync {
    /// `values` as f32: themselves, or widened into `buffer`.
    fn as_f32<'a>(values: &'a [Self], buffer: &'a mut Vec<f32>) -> &'a [f32];
}

impl Weight for f32 {
    fn as_f32<'a>(values: &'a [f32], _: &'a mut Vec<f32>) -> &'a [f32] {
        values
    }
}

impl Weight for half::f16 {
    /// From the bits, in a loop the compiler vectorizes (the `half` crate's slice
    /// conversion calls its F16C kernel through a function pointer per eight values): the
    /// exponent and mantissa moved into an f32's place and scaled by 2^112, the difference
    /// of the exponent biases, which gets subnormals right too; infinities and NaNs keep
    /// an all-ones exponent.
    fn as_f32<'a>(values: &'a [half::f16], buffer: &'a mut Vec<f32>) -> &'a [f32] {
        buffer.resize(values.len(), 0.0);
        for (o, h) in buffer.iter_mut().zip(values) {
            let bits = u32::from(h.to_bits());
            let magnitude = bits & 0x7fff;
            let sign = (bits & 0x8000) << 16;
            let finite = (f32::from_bits(magnitude << 13) * f32::from_bits(0x7780_0000)).to_bits();
            let special = (magnitude << 13) | 0x7f80_0000;
            *o = f32::from_bits(if magnitude >= 0x7c00 { special } else { finite } | sign);
        }
        buffer
    }
}

impl Weight for half::bf16 {
    /// bf16 is the high half of an f32.
    fn as_f32<'a>(values: &'a [half::bf16], buffer: &'a mut Vec<f32>) -> &'a [f32] {
        buffer.resize(values.len(), 0.0);
        for (o, h) in buffer.iter_mut().zip(values) {
            *o = f32::from_bits(u32::from(h.to_bits()) << 16);
        }
        buffer
    }
}

/// Lanes of one SIMD register (AVX2: 8 × f32); the loops below are written over arrays of
/// this width so that the compiler turns each into one vector instruction (safe code only:
/// the workspace forbids `unsafe`).
const LANES: usize = 8;
type Lanes = [f32; LANES];

/// `acc += a × b`, lane by lane: one fused multiply-add where the target has FMA (the
/// x86-64-v3 builds), a multiply and an add elsewhere (a software `mul_add` is slow).
#[inline(always)]
fn multiply_add(acc: &mut Lanes, a: &Lanes, b: &Lanes) {
    for l in 0..LANES {
        #[cfg(target_feature = "fma")]
        {
            acc[l] = a[l].mul_add(b[l], acc[l]);
        }
        #[cfg(not(target_feature = "fma"))]
        {
            acc[l] += a[l] * b[l];
        }
    }
}

/// `out[r][j] = w_j · x_r (+ bias[j])` for the weight rows `w` (each `k` long), two weight
/// rows against four input rows at a time ([`block_2x4`]); weights stream from memory once.
fn dot_rows<T: Weight>(x: &[f32], k: usize, w: &[T], bias: Option<&[f32]>, out: &mut [&mut [f32]]) {
    let (rows, n) = (out.len(), w.len() / k);
    let x_rows: Vec<(&[Lanes], &[f32])> = x.chunks_exact(k).map(<[f32]>::as_chunks).collect();
    let mut widened = Vec::new();
    let mut j = 0;
    while j < n {
        let pair = (n - j).min(2);
        let stored = &w[j * k..(j + pair) * k];
        let pair_rows = T::as_f32(stored, &mut widened);
        let w_rows = [
            pair_rows[..k].as_chunks::<LANES>(),
            pair_rows[(pair - 1) * k..].as_chunks::<LANES>(),
        ];
        let mut r = 0;
        while r < rows {
            let quad = (rows - r).min(4);
            let xs: [(&[Lanes], &[f32]); 4] = std::array::from_fn(|i| x_rows[r + i.min(quad - 1)]);
            let acc = block_2x4(
                w_rows[0].0,
                w_rows[1].0,
                [xs[0].0, xs[1].0, xs[2].0, xs[3].0],
            );
            for (p, (_, w_tail)) in w_rows.iter().enumerate().take(pair) {
                for (i, (_, x_tail)) in xs.iter().enumerate().take(quad) {
                    let rest: f32 = w_tail.iter().zip(*x_tail).map(|(a, b)| a * b).sum();
                    let b = bias.map_or(0.0, |b| b[j + p]);
                    out[r + i][j + p] = acc[4 * p + i].iter().sum::<f32>() + rest + b;
                }
            }
            r += quad;
        }
        j += pair;
    }
}

/// The dot products of two weight rows with four input rows, over whole lanes. The eight
/// accumulators are separate locals: an array indexed after the loop is kept in memory
/// and stored on every iteration (that alone took a third of the time). Each weight block
/// is widened and loaded once for four inputs.
#[inline(always)]
fn block_2x4(w0: &[Lanes], w1: &[Lanes], x: [&[Lanes]; 4]) -> [Lanes; 8] {
    let [
        mut c0,
        mut c1,
        mut c2,
        mut c3,
        mut c4,
        mut c5,
        mut c6,
        mut c7,
    ] = [[0f32; LANES]; 8];
    let inputs = x[0].iter().zip(x[1]).zip(x[2].iter().zip(x[3]));
    for ((a0, a1), ((v0, v1), (v2, v3))) in w0.iter().zip(w1).zip(inputs) {
        multiply_add(&mut c0, a0, v0);
        multiply_add(&mut c1, a0, v1);
        multiply_add(&mut c2, a0, v2);
        multiply_add(&mut c3, a0, v3);
        multiply_add(&mut c4, a1, v0);
        multiply_add(&mut c5, a1, v1);
        multiply_add(&mut c6, a1, v2);
        multiply_add(&mut c7, a1, v3);
    }
    [c0, c1, c2, c3, c4, c5, c6, c7]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(x: &[f32], rows: usize, w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let k = x.len() / rows;
        let n = w.len() / k;
        let mut out = vec![0f32; rows * n];
        for r in 0..rows {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|i| f64::from(x[r * k + i]) * f64::from(w[j * k + i]))
                    .sum();
                out[r * n + j] = dot as f32 + bias.map_or(0.0, |b| b[j]);
            }
        }
        out
    }

    proptest! {
        #[test]
        fn matches_the_plain_product(rows in 1usize..11, k in 1usize..70, n in 1usize..80,
                                     seed in 0u64..1000, with_bias: bool) {
            let value = |i: usize| ((i as u64 * 2654435761 + seed) % 1000) as f32 / 500.0 - 1.0;
            let x: Vec<f32> = (0..rows * k).map(value).collect();
            let w: Vec<f32> = (0..n * k).map(|i| value(i + 7)).collect();
            let bias: Vec<f32> = (0..n).map(|i| value(i + 3)).collect();
            let bias = with_bias.then_some(bias.as_slice());
            // Weights exactly representable in half precision, so all three agree.
            let w: Vec<f32> = w.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
            let f16: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
            let bf16: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let expected = naive(&x, rows, &w, bias);
            for weights in [WeightRows::F32(&w), WeightRows::F16(&f16), WeightRows::Bf16(&bf16)] {
                let mut out = vec![f32::NAN; rows * n];
                matmul_t(&x, rows, weights, bias, &mut out);
                for (a, b) in out.iter().zip(&expected) {
                    prop_assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn every_f16_widens_exactly() {
        let all: Vec<half::f16> = (0..=u16::MAX).map(half::f16::from_bits).collect();
        let mut buffer = Vec::new();
        let ours = half::f16::as_f32(&all, &mut buffer);
        for (h, &v) in all.iter().zip(ours) {
            let expected = h.to_f32();
            assert!(
                expected.to_bits() == v.to_bits() || (expected.is_nan() && v.is_nan()),
                "{:#x}: {expected} vs {v}",
                h.to_bits()
            );
        }
    }
}
