//! Products of a few rows by a large weight matrix, `x · wᵀ`, for decoding on CPU.
//!
//! A decoding step multiplies a handful of rows (one token per sequence in the batch) by
//! every weight matrix of the model. General GEMM kernels repack the weight matrix on each
//! call, which for so few rows costs more than the product: candle's spent most of a
//! BLOOM-560m decoding step copying weights. Here each weight row is read from memory once,
//! straight from where it lies, and multiplied by every input row while it sits in L1, so
//! a step costs about one pass over the weights.
//!
//! The inner loop is written with `pulp`'s vector types, dispatched at run time to
//! AVX-512 or AVX2 (safe code: the workspace forbids `unsafe`). Left to the
//! auto-vectorizer, the same loop over `[f32; 8]` arrays had compiled to clean FMAs in an
//! earlier build and to shuffles and scalar loads in a later one: 4.8x apart on one CPU.

use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;

/// Weight rows per parallel task: enough work per task to amortize scheduling (32 rows
/// ran 1.4x slower on a 4,096 × 1,024 matrix), small enough to spread a 1,024-row matrix
/// over a few cores.
const ROWS_PER_TASK: usize = 64;

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
    matmul_t_on(Arch::new(), x, rows, w, bias, out);
}

/// [`matmul_t`] on the vectors of `arch`.
fn matmul_t_on(
    arch: Arch,
    x: &[f32],
    rows: usize,
    w: WeightRows,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
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
        WeightRows::F32(w) => by_tasks(arch, x, k, w, bias, tasks),
        WeightRows::F16(w) => by_tasks(arch, x, k, w, bias, tasks),
        WeightRows::Bf16(w) => by_tasks(arch, x, k, w, bias, tasks),
    }
}

/// The tasks in parallel, task `t` over weight rows `t × ROWS_PER_TASK…`.
fn by_tasks<T: Weight>(
    arch: Arch,
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
        .for_each(|(t, (out, w))| {
            let bias = bias.map(|b| &b[t * ROWS_PER_TASK..][..w.len() / k]);
            arch.dispatch(DotRows { x, k, w, bias, out });
        });
}

/// A weight value as stored: f32, used where it lies, or half precision, widened to f32
/// a block of rows at a time into a buffer that stays in L1 (exactly: every f16 and bf16 value
/// is an f32 value), which halves the memory a decoding step reads.
trait Weight: Copy + Sync {
    /// `values` as f32: themselves, or widened into `buffer`.
    fn as_f32<'a>(values: &'a [Self], buffer: &'a mut Vec<f32>) -> &'a [f32];
}

impl Weight for f32 {
    #[inline(always)]
    fn as_f32<'a>(values: &'a [f32], _: &'a mut Vec<f32>) -> &'a [f32] {
        values
    }
}

impl Weight for half::f16 {
    /// With AVX-512, sixteen values per conversion instruction; otherwise (and for the
    /// last few) [`widen_f16_bits`].
    #[inline(always)]
    fn as_f32<'a>(values: &'a [half::f16], buffer: &'a mut Vec<f32>) -> &'a [f32] {
        buffer.resize(values.len(), 0.0);
        let (mut values, mut out) = (values, buffer.as_mut_slice());
        #[cfg(target_arch = "x86_64")]
        if let Some(v4) = pulp::x86::V4::try_new() {
            let (stored, rest) = values.as_chunks::<16>();
            let (wide, wide_rest) = out.as_chunks_mut::<16>();
            for (o, h) in wide.iter_mut().zip(stored) {
                let bits: std::arch::x86_64::__m256i =
                    pulp::bytemuck::cast(h.map(half::f16::to_bits));
                *o = pulp::bytemuck::cast(v4.avx512f._mm512_cvtph_ps(bits));
            }
            (values, out) = (rest, wide_rest);
        }
        widen_f16_bits(values, out);
        buffer
    }
}

/// f16 to f32 from the bits, in a loop the compiler vectorizes (the `half` crate's slice
/// conversion calls its F16C kernel through a function pointer per eight values): the
/// exponent and mantissa moved into an f32's place and scaled by 2^112, the difference of
/// the exponent biases, which gets subnormals right too; infinities and NaNs keep an
/// all-ones exponent.
#[inline(always)]
fn widen_f16_bits(values: &[half::f16], out: &mut [f32]) {
    for (o, h) in out.iter_mut().zip(values) {
        let bits = u32::from(h.to_bits());
        let magnitude = bits & 0x7fff;
        let sign = (bits & 0x8000) << 16;
        let finite = (f32::from_bits(magnitude << 13) * f32::from_bits(0x7780_0000)).to_bits();
        let special = (magnitude << 13) | 0x7f80_0000;
        *o = f32::from_bits(if magnitude >= 0x7c00 { special } else { finite } | sign);
    }
}

impl Weight for half::bf16 {
    /// bf16 is the high half of an f32.
    #[inline(always)]
    fn as_f32<'a>(values: &'a [half::bf16], buffer: &'a mut Vec<f32>) -> &'a [f32] {
        buffer.resize(values.len(), 0.0);
        for (o, h) in buffer.iter_mut().zip(values) {
            *o = f32::from_bits(u32::from(h.to_bits()) << 16);
        }
        buffer
    }
}

/// One task: `out[r][j] = w_j · x_r (+ bias[j])` for the weight rows `w` (each `k`
/// long), a few weight rows against four input rows at a time ([`block`]); weights
/// stream from memory once.
struct DotRows<'a, T> {
    x: &'a [f32],
    k: usize,
    w: &'a [T],
    bias: Option<&'a [f32]>,
    out: Vec<&'a mut [f32]>,
}

impl<T: Weight> WithSimd for DotRows<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        // Four weight rows by four inputs is sixteen accumulators: for AVX-512's 32
        // registers (3–4% faster there than two rows, 560m busy time); AVX2 has 16 and
        // takes two rows.
        if S::REGISTER_COUNT >= 32 {
            self.rows_by::<S, 4>(simd);
        } else {
            self.rows_by::<S, 2>(simd);
        }
    }
}

impl<T: Weight> DotRows<'_, T> {
    /// The products, `W` weight rows at a time.
    #[inline(always)]
    fn rows_by<S: Simd, const W: usize>(self, simd: S) {
        let DotRows {
            x,
            k,
            w,
            bias,
            mut out,
        } = self;
        let (rows, n) = (out.len(), w.len() / k);
        let whole = k - k % S::F32_LANES;
        let x_rows: Vec<&[f32]> = x.chunks_exact(k).collect();
        let mut widened = Vec::new();
        for j in (0..n).step_by(W) {
            let some = (n - j).min(W);
            let stored = T::as_f32(&w[j * k..(j + some) * k], &mut widened);
            // Past the last weight row, its copies: computed, not written.
            let w_rows: [&[f32]; W] = std::array::from_fn(|p| &stored[p.min(some - 1) * k..][..k]);
            for r in (0..rows).step_by(4) {
                let quad = (rows - r).min(4);
                let xs: [&[f32]; 4] = std::array::from_fn(|i| x_rows[r + i.min(quad - 1)]);
                let acc = block(
                    simd,
                    w_rows.map(|v| lanes::<S>(v, whole)),
                    xs.map(|v| lanes::<S>(v, whole)),
                );
                for (p, w_row) in w_rows.iter().enumerate().take(some) {
                    for (i, x_row) in xs.iter().enumerate().take(quad) {
                        let tail: f32 = w_row[whole..]
                            .iter()
                            .zip(&x_row[whole..])
                            .map(|(a, b)| a * b)
                            .sum();
                        let b = bias.map_or(0.0, |b| b[j + p]);
                        out[r + i][j + p] = simd.reduce_sum_f32s(acc[p][i]) + tail + b;
                    }
                }
            }
        }
    }
}

/// The first `whole` values of `v` as vectors.
#[inline(always)]
fn lanes<S: Simd>(v: &[f32], whole: usize) -> &[S::f32s] {
    S::as_simd_f32s(&v[..whole]).0
}

/// The dot products of `W` weight rows with four input rows, over whole vectors: at
/// least eight independent accumulators, enough to keep both FMA units busy through
/// their latency, and each weight vector loaded once for four inputs.
#[inline(always)]
fn block<S: Simd, const W: usize>(
    simd: S,
    w: [&[S::f32s]; W],
    x: [&[S::f32s]; 4],
) -> [[S::f32s; 4]; W] {
    let len = w[0].len();
    let (w, x) = (w.map(|s| &s[..len]), x.map(|s| &s[..len]));
    let zero = simd.splat_f32s(0.0);
    let mut acc = [[zero; 4]; W];
    for i in 0..len {
        for (p, row) in w.iter().enumerate() {
            for (q, input) in x.iter().enumerate() {
                acc[p][q] = simd.mul_add_f32s(row[i], input[i], acc[p][q]);
            }
        }
    }
    acc
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

    /// Every instruction set this CPU runs, so that each kernel is tested where it can be.
    fn archs() -> Vec<Arch> {
        let mut archs = vec![Arch::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            archs.extend(pulp::x86::V3::try_new().map(Arch::V3));
            archs.extend(pulp::x86::V4::try_new().map(Arch::V4));
        }
        archs
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
            let weights = [WeightRows::F32(&w), WeightRows::F16(&f16), WeightRows::Bf16(&bf16)];
            for (arch, weights) in archs().into_iter().flat_map(|a| weights.map(|w| (a, w))) {
                let mut out = vec![f32::NAN; rows * n];
                matmul_t_on(arch, &x, rows, weights, bias, &mut out);
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
        let mut bits = vec![0f32; all.len()];
        widen_f16_bits(&all, &mut bits);
        // The conversion instructions where the CPU has them, and the bits elsewhere.
        let widened = half::f16::as_f32(&all, &mut buffer);
        for (h, &v) in all.iter().zip(widened).chain(all.iter().zip(&bits)) {
            let expected = h.to_f32();
            assert!(
                expected.to_bits() == v.to_bits() || (expected.is_nan() && v.is_nan()),
                "{:#x}: {expected} vs {v}",
                h.to_bits()
            );
        }
    }
}
