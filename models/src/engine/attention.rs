//! Attention of one decoding query over a head's cached keys and values, on the CPU.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use candle_core::Device;
use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;

use crate::engine::kv::HeadsKv;
use crate::kernels;

/// Nanoseconds the engines of this process spent in attention, counted while
/// [`step_times`] is on: the engine reads it around each decoding step.
pub(crate) static ATTENTION_NANOS: AtomicU64 = AtomicU64::new(0);

/// Whether decoding steps are timed part by part (`ABRIDGE_STEP_TIMES` set): then each
/// engine prints where its steps' time goes, every `ABRIDGE_STEP_TIMES` steps (a number;
/// 100 otherwise), and the GPU is synchronized after each part so that the figures are
/// the parts' own, not their launches'.
pub(crate) fn step_times() -> Option<u64> {
    static EVERY: OnceLock<Option<u64>> = OnceLock::new();
    *EVERY.get_or_init(|| {
        let value = std::env::var("ABRIDGE_STEP_TIMES").ok()?;
        Some(value.trim().parse().unwrap_or(100).max(1))
    })
}

/// `attention()`, its time counted in [`ATTENTION_NANOS`] when steps are timed.
pub(crate) fn timed<T>(device: &Device, attention: impl FnOnce() -> T) -> T {
    if step_times().is_none() {
        return attention();
    }
    let started = Instant::now();
    let out = attention();
    if !device.is_cpu() {
        let _ = device.synchronize();
    }
    let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
    ATTENTION_NANOS.fetch_add(nanos, Ordering::Relaxed);
    out
}

/// Where each head's query sits in a batch's rows of projected queries: row `r`, head `h`
/// starts at `r × row + h × head`. BLOOM's fused projection interleaves `[q, k, v]` per
/// head (`head = 3 × head_dim`); Llama's puts every query head first (`head = head_dim`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueryLayout {
    /// Values from one row's start to the next's.
    pub row: usize,
    /// Values from one head's query to the next's within a row.
    pub head: usize,
}

/// The context rows of a CPU attention step, `rows.len() × heads × dim` values: every
/// (row, head) attends over the first `tokens` of its cache `rows[r] = (cache, tokens)`,
/// in parallel. A query head reads key/value head `h / (heads / kv_heads)` (grouped-query
/// attention; BLOOM has as many of each); `slopes` are the model's ALiBi slopes, one per
/// head, or `None` where positions are in the queries and keys already (rotary).
///
/// The one attention loop of the models on CPU, for prefill (a row per prompt token) and
/// decoding (a row per sequence) alike: the model says where its queries are and which
/// cache each row reads, the engine does the rest.
pub(crate) fn attend_rows(
    queries: &[f32],
    layout: QueryLayout,
    rows: &[(&HeadsKv, usize)],
    (heads, kv_heads, dim): (usize, usize, usize),
    slopes: Option<&[f32]>,
) -> Vec<f32> {
    let group = (heads / kv_heads.max(1)).max(1);
    let scale = 1.0 / (dim as f32).sqrt();
    let mut context = vec![0f32; rows.len() * heads * dim];
    context
        .par_chunks_mut(dim)
        .enumerate()
        .for_each(|(i, out)| {
            let (r, h) = (i / heads, i % heads);
            let (kv, tokens) = rows[r];
            let (keys, values) = kv.head(h / group, tokens);
            let query = &queries[r * layout.row + h * layout.head..][..dim];
            let slope = slopes.map_or(0.0, |s| s[h]);
            attend(query, keys, values, slope, scale, out);
        });
    context
}

/// Attention of one head's `query` over that head's cached `keys`/`values` (token after
/// token) with an ALiBi bias (BLOOM's; 0 for models without one) `slope × position`, written into `out`. Positions count
/// from the sequence's first token: there is no padding here.
pub(crate) fn attend(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
