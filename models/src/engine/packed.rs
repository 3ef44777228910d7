//! Products of a few rows by a large weight matrix, `x · wᵀ`, for decoding on CPU.
//!
//! A decoding step multiplies a handful of rows (one token per sequence in the batch) by
//! every weight matrix of the model. General GEMM kernels repack the weight matrix on each
//! call, which for so few rows costs more than the product: candle's spent most of a
//! BLOOM-560m decoding step copying weights. Here the weights are repacked once, at load,
//! into panels of [`PANEL`] output columns stored input by input, so a step reads each
//! weight once, in order, and every value read is used for all rows at once: each input
//! value is broadcast across a vector and multiplied into a panel's columns, leaving the
//! finished columns in the accumulators (no horizontal sums, which a dot-product layout
//! needs per row and column).
//!
//! The inner loop is written with `pulp`'s vector types, dispatched at run time to
//! AVX-512 or AVX2 (safe code: the workspace forbids `unsafe`). Left to the
//! auto-vectorizer, an earlier loop over `[f32; 8]` arrays had compiled to clean FMAs in
//! one build and to shuffles and scalar loads in a later one: 4.8x apart on one CPU.
//!
//! [`product`] is what the models call: these panels for a decoding step's few rows on
//! the CPU, candle's GEMM for a prefill or on another device.

use candle_core::{DType, Tensor};
use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;

use crate::kernels;

/// Output columns per panel: two AVX-512 vectors, four AVX2 ones. A panel of a
/// 1,024-input matrix is 64 KiB in half precision, so each panel is in L2 while a few
/// groups of rows go over it.
pub const PANEL: usize = 32;

/// Weight rows (`n × k`, row-major) as a checkpoint stores them: f32, or half precision.
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

/// A weight matrix packed for [`PackedRows::matmul_t`]: panel `p` holds output columns
/// `p × PANEL…`, as `k` arrays of `PANEL` values (zeros past the last column), in the
/// precision the checkpoint came in (half precision halves what a step reads; every
/// f16 and bf16 value widens exactly to f32).
pub struct PackedRows {
    n: usize,
    k: usize,
    panels: Panels,
}

enum Panels {
    F32(Vec<[f32; PANEL]>),
    /// The bits of f16 values.
    F16(Vec<[u16; PANEL]>),
    Bf16(Vec<[half::bf16; PANEL]>),
}

/// Panels of weights per parallel task: enough work per task to amortize scheduling,
/// small enough to spread a 1,024-column matrix over a few cores.
const PANELS_PER_TASK: usize = 4;

impl PackedRows {
    /// Packs `w`, `n × k` row-major with `k` values per row.
    pub fn new(w: WeightRows, k: usize) -> Self {
        let n = w.len() / k.max(1);
        assert_eq!(
            w.len(),
            n * k,
            "PackedRows: {} values, rows of {k}",
            w.len()
        );
        let panels = match w {
            WeightRows::F32(w) => Panels::F32(pack(w, n, k, 0.0, |v| v)),
            WeightRows::F16(w) => Panels::F16(pack(w, n, k, 0, half::f16::to_bits)),
            WeightRows::Bf16(w) => Panels::Bf16(pack(w, n, k, half::bf16::ZERO, |v| v)),
        };
        Self { n, k, panels }
    }

    /// Bytes per stored weight: 2 for half precision, 4 for f32.
    #[cfg(test)]
    pub fn bytes_per_weight(&self) -> usize {
        match self.panels {
            Panels::F32(_) => 4,
            Panels::F16(_) | Panels::Bf16(_) => 2,
        }
    }

    /// `out (rows × n) = x (rows × k) · wᵀ (+ bias)`.
    pub fn matmul_t(&self, x: &[f32], rows: usize, bias: Option<&[f32]>, out: &mut [f32]) {
        self.matmul_t_on(Arch::new(), x, rows, bias, out);
    }

    /// [`Self::matmul_t`] on the vectors of `arch`.
    fn matmul_t_on(
        &self,
        arch: Arch,
        x: &[f32],
        rows: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let (n, k) = (self.n, self.k);
        assert!(
            x.len() == rows * k && out.len() == rows * n,
            "matmul_t: x {} values for {rows} rows of {k}, out {} values for {n} columns",
            x.len(),
            out.len()
        );
        if let Some(bias) = bias {
            assert_eq!(bias.len(), n, "matmul_t: bias");
        }
        if n == 0 || rows == 0 {
            return;
        }
        // Each task takes PANELS_PER_TASK panels and writes the matching columns of every
        // output row, straight where they belong.
        let columns = PANELS_PER_TASK * PANEL;
        let mut tasks: Vec<Vec<&mut [f32]>> = (0..n.div_ceil(columns))
            .map(|_| Vec::with_capacity(rows))
            .collect();
        for row in out.chunks_mut(n) {
            for (part, task) in row.chunks_mut(columns).zip(&mut tasks) {
                task.push(part);
            }
        }
        let bias = |t: usize| bias.map(|b| &b[t * columns..][..(n - t * columns).min(columns)]);
        let stride = PANELS_PER_TASK * k;
        // The rows grouped once for all tasks (transposing them per task was an eighth of
        // a product's time).
        let x = &group_inputs(x, k, group_rows(arch.dispatch(Lanes)));
        match &self.panels {
            Panels::F32(p) => run_tasks(arch, x, k, p, stride, bias, tasks),
            #[cfg(target_arch = "x86_64")]
            Panels::F16(p) if matches!(arch, Arch::V4(_)) => {
                let Arch::V4(v4) = arch else { unreachable!() };
                tasks
                    .into_par_iter()
                    .zip(p.par_chunks(stride))
                    .enumerate()
                    .for_each(|(t, (out, panels))| {
                        v4.vectorize(F16OnV4(Task {
                            x,
                            k,
                            panels,
                            bias: bias(t),
                            out,
                        }));
                    });
            }
            Panels::F16(p) => run_tasks(arch, x, k, p, stride, bias, tasks),
            Panels::Bf16(p) => run_tasks(arch, x, k, p, stride, bias, tasks),
        }
    }
}

/// `w`'s columns `p × PANEL…` input by input, for every panel `p`.
fn pack<T: Copy + Sync, U: Copy + Send>(
    w: &[T],
    n: usize,
    k: usize,
    zero: U,
    convert: impl Fn(T) -> U + Sync,
) -> Vec<[U; PANEL]> {
    let mut panels = vec![[zero; PANEL]; n.div_ceil(PANEL) * k];
    panels
        .par_chunks_mut(k.max(1))
        .enumerate()
        .for_each(|(p, panel)| {
            for c in 0..PANEL.min(n - p * PANEL) {
                let row = &w[(p * PANEL + c) * k..][..k];
                for (values, &v) in panel.iter_mut().zip(row) {
                    values[c] = convert(v);
                }
            }
        });
    panels
}

/// Stored panel values as f32.
trait PanelValue: Copy + Sync {
    /// `panel` widened into `scratch` (or itself, when already f32).
    fn widened<'a>(
        panel: &'a [[Self; PANEL]],
        scratch: &'a mut Vec<[f32; PANEL]>,
    ) -> &'a [[f32; PANEL]];
}

impl PanelValue for f32 {
    #[inline(always)]
    fn widened<'a>(panel: &'a [[f32; PANEL]], _: &'a mut Vec<[f32; PANEL]>) -> &'a [[f32; PANEL]] {
        panel
    }
}

impl PanelValue for u16 {
    /// The bits of f16 values (kept as bits, which vector loads take as they are).
    #[inline(always)]
    fn widened<'a>(
        panel: &'a [[u16; PANEL]],
        scratch: &'a mut Vec<[f32; PANEL]>,
    ) -> &'a [[f32; PANEL]] {
        scratch.clear();
        scratch.extend(panel.iter().map(|values| values.map(widen_f16_bits)));
        scratch
    }
}

impl PanelValue for half::bf16 {
    /// bf16 is the high half of an f32.
    #[inline(always)]
    fn widened<'a>(
        panel: &'a [[half::bf16; PANEL]],
        scratch: &'a mut Vec<[f32; PANEL]>,
    ) -> &'a [[f32; PANEL]] {
        scratch.clear();
        scratch.extend(
            panel
                .iter()
                .map(|values| values.map(|v| f32::from_bits(u32::from(v.to_bits()) << 16))),
        );
        scratch
    }
}

/// f16 to f32 from the bits, in code the compiler vectorizes: the exponent and mantissa
/// moved into an f32's place and scaled by 2^112, the difference of the exponent biases,
/// which gets subnormals right too; infinities and NaNs keep an all-ones exponent.
#[inline(always)]
fn widen_f16_bits(h: u16) -> f32 {
    let bits = u32::from(h);
    let magnitude = bits & 0x7fff;
    let sign = (bits & 0x8000) << 16;
    let finite = (f32::from_bits(magnitude << 13) * f32::from_bits(0x7780_0000)).to_bits();
    let special = (magnitude << 13) | 0x7f80_0000;
    f32::from_bits(if magnitude >= 0x7c00 { special } else { finite } | sign)
}

/// The tasks in parallel, task `t` over panels `t × PANELS_PER_TASK…`.
fn run_tasks<'a, T: PanelValue>(
    arch: Arch,
    x: &[f32],
    k: usize,
    panels: &[[T; PANEL]],
    stride: usize,
    bias: impl Fn(usize) -> Option<&'a [f32]> + Sync,
    tasks: Vec<Vec<&mut [f32]>>,
) {
    tasks
        .into_par_iter()
        .zip(panels.par_chunks(stride))
        .enumerate()
        .for_each(|(t, (out, panels))| {
            arch.dispatch(Task {
                x,
                k,
                panels,
                bias: bias(t),
                out,
            });
        });
}

/// Rows per group of a product on vectors of `lanes` f32 (as `Task::with_simd` picks them).
fn group_rows(lanes: usize) -> usize {
    match lanes {
        16 => 8,
        8 | 4 => 2,
        _ => 1,
    }
}

/// The f32 lanes of an arch's vectors.
struct Lanes;

impl WithSimd for Lanes {
    type Output = usize;

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) -> usize {
        S::F32_LANES
    }
}

/// Rows of `k` inputs in groups of `group`, each group input by input (`group` values per
/// input, zeros past the last row): the products broadcast one input of every row of a
/// group after the other.
fn group_inputs(x: &[f32], k: usize, group: usize) -> Vec<f32> {
    let rows = x.len() / k;
    let mut grouped = vec![0f32; rows.div_ceil(group) * group * k];
    for (r, row) in x.chunks_exact(k).enumerate() {
        let block = &mut grouped[r / group * group * k..][..group * k];
        for (values, &v) in block.chunks_exact_mut(group).zip(row) {
            values[r % group] = v;
        }
    }
    grouped
}

/// One task: the columns of a few panels for every input row.
struct Task<'a, T> {
    /// The input rows as [`group_inputs`] lays them out for this arch.
    x: &'a [f32],
    k: usize,
    panels: &'a [[T; PANEL]],
    bias: Option<&'a [f32]>,
    /// Per input row, this task's columns.
    out: Vec<&'a mut [f32]>,
}

impl<T> Task<'_, T> {
    /// The task's panels `R` input rows at a time: for each group of rows, each panel
    /// through `product`, whose accumulators, `NV` vectors per row, hold the group's
    /// columns (those of the rows past the last are computed but not written).
    #[inline(always)]
    fn by_groups<S: Simd, const R: usize, const NV: usize>(
        self,
        mut product: impl FnMut(&[[T; PANEL]], &[[f32; R]]) -> [[S::f32s; NV]; R],
    ) {
        let Task {
            x,
            k,
            panels,
            bias,
            mut out,
        } = self;
        let rows = out.len();
        assert_eq!(x.len(), rows.div_ceil(R) * R * k, "rows grouped by {R}");
        for (g, inputs) in x.chunks_exact(R * k).enumerate() {
            let (inputs, _) = inputs.as_chunks::<R>();
            let group = g * R;
            let members = (rows - group).min(R);
            for (p, panel) in panels.chunks_exact(k).enumerate() {
                let acc = product(panel, inputs);
                let first = p * PANEL;
                for (q, acc) in acc.iter().enumerate().take(members) {
                    let columns = &mut out[group + q][first..];
                    let width = columns.len().min(PANEL);
                    let sums: [f32; PANEL] = pulp::bytemuck::cast_slice::<S::f32s, f32>(acc)
                        .try_into()
                        .expect("NV vectors make one panel");
                    for (j, (o, s)) in columns[..width].iter_mut().zip(sums).enumerate() {
                        *o = s + bias.map_or(0.0, |b| b[first + j]);
                    }
                }
            }
        }
    }
}

impl<T: PanelValue> WithSimd for Task<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        // Accumulators: R rows × NV vectors, within the registers, with room for the
        // panel's vectors and a broadcast input (R as `group_rows` says).
        match S::F32_LANES {
            16 => self.widened_by::<S, 8, 2>(simd),
            8 => self.widened_by::<S, 2, 4>(simd),
            4 => self.widened_by::<S, 2, 8>(simd),
            _ => self.widened_by::<S, 1, 32>(simd),
        }
    }
}

impl<T: PanelValue> Task<'_, T> {
    #[inline(always)]
    fn widened_by<S: Simd, const R: usize, const NV: usize>(self, simd: S) {
        let mut scratch = Vec::new();
        self.by_groups::<S, R, NV>(|panel, inputs| {
            let panel = T::widened(panel, &mut scratch);
            outer_products(simd, inputs, |i| {
                let v = S::as_simd_f32s(&panel[i]).0;
                std::array::from_fn(|j| v[j])
            })
        });
    }
}

/// The product of one panel with a group of `R` rows: for each input `i`, the panel's
/// values for `i` (`load(i)`, `NV` vectors) times each row's value, broadcast. Every
/// accumulator is its own chain, `R × NV` of them, enough to cover the FMA latency.
#[inline(always)]
fn outer_products<S: Simd, const R: usize, const NV: usize>(
    simd: S,
    inputs: &[[f32; R]],
    load: impl Fn(usize) -> [S::f32s; NV],
) -> [[S::f32s; NV]; R] {
    let mut acc = [[simd.splat_f32s(0.0); NV]; R];
    for (i, values) in inputs.iter().enumerate() {
        let w = load(i);
        for (acc, &v) in acc.iter_mut().zip(values) {
            let v = simd.splat_f32s(v);
            for (acc, &w) in acc.iter_mut().zip(&w) {
                *acc = simd.mul_add_f32s(w, v, *acc);
            }
        }
    }
    acc
}

/// How far ahead of the product the f16 kernel asks for panel values, in inputs (one
/// cache line each): 4 KiB. Without it two cores streamed a 514 MB matrix at ~7 GB/s, with
/// it at 11–16 GB/s (16 to 128 lines measured; the hardware prefetcher alone fell behind).
const PREFETCH: usize = 64;

/// f16 panels on AVX-512: sixteen values widened per instruction (`vcvtph2ps`), in
/// registers, with no scratch.
#[cfg(target_arch = "x86_64")]
struct F16OnV4<'a>(Task<'a, u16>);

#[cfg(target_arch = "x86_64")]
impl pulp::NullaryFnOnce for F16OnV4<'_> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        let Some(v4) = pulp::x86::V4::try_new() else {
            unreachable!("dispatched on AVX-512 only")
        };
        self.0.by_groups::<pulp::x86::V4, 8, 2>(|panel, inputs| {
            outer_products(v4, inputs, |i| {
                let ahead: *const [u16; PANEL] = panel.as_ptr().wrapping_add(i + PREFETCH);
                v4.sse
                    ._mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(ahead.cast());
                let bits: [std::arch::x86_64::__m256i; 2] = pulp::bytemuck::cast(panel[i]);
                bits.map(|b| pulp::bytemuck::cast(v4.avx512f._mm512_cvtph_ps(b)))
            })
        });
    }
}

/// Rows of a decoding step up to which products go through [`PackedRows::matmul_t`]: past a
/// few dozen rows, a GEMM's reuse of each loaded weight wins.
pub(crate) const SKINNY_ROWS: usize = 32;

/// `weight` (widened to f32 at load) packed for [`PackedRows::matmul_t`] in `dtype`, the
/// precision its checkpoint stored: half precision is exact, as the values came from it,
/// and halves what a decoding step reads.
pub(crate) fn pack_weight(weight: &Tensor, dtype: DType) -> candle_core::Result<PackedRows> {
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

/// Runs `f` on the values of a contiguous f32 tensor in CPU memory, where they lie.
pub(crate) fn with_cpu_values<R>(
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

/// broadcast one would first copy the transposed weights per batch). A few rows on CPU
/// (a decoding step) go through the `packed` copy, which a product reads once; more
/// rows (a prefill), or another device, through candle's GEMM.
pub(crate) fn product(
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
        fn matches_the_plain_product(rows in 1usize..20, k in 1usize..70, n in 1usize..300,
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
                let packed = PackedRows::new(weights, k);
                for arch in archs() {
                    let mut out = vec![f32::NAN; rows * n];
                    packed.matmul_t_on(arch, &x, rows, bias, &mut out);
                    for (a, b) in out.iter().zip(&expected) {
                        prop_assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn every_f16_widens_exactly() {
        // One weight row per f16 value, one input of 1: each output is the widened value.
        let all: Vec<half::f16> = (0..=u16::MAX).map(half::f16::from_bits).collect();
        let packed = PackedRows::new(WeightRows::F16(&all), 1);
        for arch in archs() {
            let mut out = vec![0f32; all.len()];
            packed.matmul_t_on(arch, &[1.0], 1, None, &mut out);
            for (h, v) in all.iter().zip(&out) {
                let expected = h.to_f32();
                // (Signed zeros compare equal: the accumulator starts at +0.)
                assert!(
                    expected == *v || (expected.is_nan() && v.is_nan()),
                    "{:#x}: {expected} vs {v}",
                    h.to_bits()
                );
            }
        }
    }
}
