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
/// checkpoint came in, widened to f32 block by block as they are read (exactly: every
/// f16 and bf16 value is an f32 value), which halves the memory a decoding step reads.
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

/// Weight rows per task when they are widened first: the widened block stays in L2.
const HALF_ROWS_PER_TASK: usize = 8;

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
    // Computed weight row by weight row (`n × rows`), then laid out as `rows × n`.
    let mut by_weight = vec![0f32; n * rows];
    match w {
        WeightRows::F32(w) => by_weight
            .par_chunks_mut(ROWS_PER_TASK * rows)
            .zip(w.par_chunks(ROWS_PER_TASK * k))
            .for_each(|(out, w)| dot_rows(x, rows, k, w, out)),
        WeightRows::F16(w) => widened(x, rows, k, w, &mut by_weight, |w, f| {
            half::slice::HalfFloatSliceExt::convert_to_f32_slice(w, f)
        }),
        WeightRows::Bf16(w) => widened(x, rows, k, w, &mut by_weight, |w, f| {
            half::slice::HalfFloatSliceExt::convert_to_f32_slice(w, f)
        }),
    }
    for (j, column) in by_weight.chunks_exact(rows).enumerate() {
        let b = bias.map_or(0.0, |b| b[j]);
        for (r, value) in column.iter().enumerate() {
            out[r * n + j] = value + b;
        }
    }
}

/// [`dot_rows`] over half-precision weights, widened a block of rows at a time.
fn widened<T: Sync>(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[T],
    by_weight: &mut [f32],
    widen: impl Fn(&[T], &mut [f32]) + Sync,
) {
    by_weight
        .par_chunks_mut(HALF_ROWS_PER_TASK * rows)
        .zip(w.par_chunks(HALF_ROWS_PER_TASK * k))
        .for_each_init(Vec::new, |block, (out, w)| {
            block.resize(w.len(), 0.0);
            widen(w, block);
            dot_rows(x, rows, k, block, out);
        });
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

/// `out[j * rows + r] = w_j · x_r` for the weight rows `w` (each `k` long), two weight rows
/// against four input rows at a time: eight accumulators, each weight block loaded once
/// and used for four inputs (input rows stay in L1; weights stream from memory once).
fn dot_rows(x: &[f32], rows: usize, k: usize, w: &[f32], out: &mut [f32]) {
    fn split(row: &[f32]) -> (&[Lanes], &[f32]) {
        row.as_chunks::<LANES>()
    }
    let n = w.len() / k;
    let x_rows: Vec<(&[Lanes], &[f32])> = x.chunks_exact(k).map(split).collect();
    let mut j = 0;
    while j < n {
        let pair = (n - j).min(2);
        let w_rows = [
            split(&w[j * k..(j + 1) * k]),
            split(&w[(j + pair - 1) * k..(j + pair) * k]),
        ];
        let mut r = 0;
        while r < rows {
            let quad = (rows - r).min(4);
            let xs: [(&[Lanes], &[f32]); 4] = std::array::from_fn(|i| x_rows[r + i.min(quad - 1)]);
            // Eight accumulators named by constant indices (zipped iterators, no indexing
            // in the loop) so that they live in registers.
            let mut acc = [[0f32; LANES]; 8];
            let pairs = w_rows[0].0.iter().zip(w_rows[1].0);
            let inputs = xs[0].0.iter().zip(xs[1].0).zip(xs[2].0.iter().zip(xs[3].0));
            for ((a0, a1), ((v0, v1), (v2, v3))) in pairs.zip(inputs) {
                multiply_add(&mut acc[0], a0, v0);
                multiply_add(&mut acc[1], a0, v1);
                multiply_add(&mut acc[2], a0, v2);
                multiply_add(&mut acc[3], a0, v3);
                multiply_add(&mut acc[4], a1, v0);
                multiply_add(&mut acc[5], a1, v1);
                multiply_add(&mut acc[6], a1, v2);
                multiply_add(&mut acc[7], a1, v3);
            }
            for (p, (_, w_tail)) in w_rows.iter().enumerate().take(pair) {
                for (i, (_, x_tail)) in xs.iter().enumerate().take(quad) {
                    let rest: f32 = w_tail.iter().zip(*x_tail).map(|(a, b)| a * b).sum();
                    out[(j + p) * rows + r + i] = acc[4 * p + i].iter().sum::<f32>() + rest;
                }
            }
            r += quad;
        }
        j += pair;
    }
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
}
