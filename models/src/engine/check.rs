//! A check of the paged cache on a device against plain attention on the host, in
//! seconds: `abridge check-kernels --device cuda` (the first of `scripts/gpu-check`).
//!
//! The same random keys and values go into a [`PagedKv`] on `device` (mistral.rs's
//! `reshape_and_cache` and `paged_attention` kernels on CUDA; the block gather in Rust on
//! the host) and, contiguous, into [`attend`]; the contexts must agree. Heads 1, 2, 3 and
//! 16 cover ALiBi slopes of both kinds (powers of two and the interleaved rest), and the
//! lengths cross block boundaries (a block is 16 tokens) in one batch, so that every
//! sequence's block table differs. In a half type the keys, values and queries are that
//! type's values (so both sides see the same inputs) and the kernels' contexts are rounded
//! to it: [`tolerance`] allows for that rounding.

use candle_core::{DType, Device, Tensor};

use super::attention::attend;
use super::paged::PagedKv;
use crate::generator::uniform_draw;

/// One case of [`check_paged_attention`]: a batch of sequences of `lens` tokens over
/// `heads` heads, and the largest difference from plain attention.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelCase {
    pub heads: usize,
    pub lens: Vec<usize>,
    pub max_difference: f32,
}

/// Head size and block size of the check: BLOOM-560m's head, the engine's default block.
const HEAD_DIM: usize = 64;
const BLOCK_SIZE: usize = 16;

/// The largest difference [`check_paged_attention`] should allow in `dtype`: contexts of
/// magnitude up to 1 rounded to the type (f16 keeps 11 significant bits, bf16 8), plus f32
/// sums taken in another order.
pub fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => 2e-3,
        DType::BF16 => 1e-2,
        _ => 1e-4,
    }
}

/// The cases on `device` with the cache in `dtype`, with each head count's position bias
/// from `slopes` (a model's: the engine knows none).
pub fn check_paged_attention(
    device: &Device,
    dtype: DType,
    slopes: impl Fn(usize) -> Vec<f32>,
) -> candle_core::Result<Vec<KernelCase>> {
    let lens = vec![1, 15, 16, 17, 40];
    let mut cases = Vec::new();
    for heads in [1, 2, 3, 16] {
        let slopes = slopes(heads);
        let blocks: usize = lens.iter().map(|l: &usize| l.div_ceil(BLOCK_SIZE)).sum();
        let mut kv = PagedKv::new(
            blocks,
            BLOCK_SIZE,
            1,
            HEAD_DIM,
            slopes.clone(),
            dtype,
            device,
        )?;
        let width = heads * HEAD_DIM;
        // Values of `dtype` in (-1, 1), widened to f32 for the host's plain attention.
        let random = |salt: u64, n: usize| -> candle_core::Result<Vec<f32>> {
            let draws: Vec<f32> = (0..n as u64)
                .map(|i| (uniform_draw(salt, heads as u64, i) * 2.0 - 1.0) as f32)
                .collect();
            Tensor::new(draws, &Device::Cpu)?
                .to_dtype(dtype)?
                .to_dtype(DType::F32)?
                .to_vec1()
        };
        let tensor = |v: &[f32], shape: (usize, usize, usize)| {
            Tensor::from_slice(v, shape, device)?.to_dtype(dtype)
        };
        let mut tables = Vec::new();
        let mut expected = Vec::new();
        let queries = random(3, lens.len() * width)?;
        for (s, &len) in lens.iter().enumerate() {
            let Some(table) = kv.pool.reserve(len) else {
                candle_core::bail!("the check's pool is too small");
            };
            let keys = random(10 + s as u64, len * width)?;
            let values = random(20 + s as u64, len * width)?;
            let slots = kv.prompt_slots(&table, len)?;
            let shape = (len, heads, HEAD_DIM);
            kv.write(0, &tensor(&keys, shape)?, &tensor(&values, shape)?, &slots)?;
            tables.push(table);
            // Plain attention per head over the token-major keys and values.
            for (h, &slope) in slopes.iter().enumerate() {
                let head = |v: &[f32]| -> Vec<f32> {
                    v.chunks_exact(width)
                        .flat_map(|token| &token[h * HEAD_DIM..(h + 1) * HEAD_DIM])
                        .copied()
                        .collect()
                };
                let query = &queries[s * width + h * HEAD_DIM..][..HEAD_DIM];
                let mut out = vec![0f32; HEAD_DIM];
                let scale = 1.0 / (HEAD_DIM as f32).sqrt();
                attend(query, &head(&keys), &head(&values), slope, scale, &mut out);
                expected.extend(out);
            }
        }
        let step = kv.step_tables(tables, lens.clone())?;
        let queries = tensor(&queries, (lens.len(), heads, HEAD_DIM))?;
        let context = kv.attend(0, &queries, &step)?;
        let context = context
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let max_difference = context
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            // A NaN anywhere is the answer: `f32::max` would pass over it.
            .fold(0f32, |m, d| {
                if m.is_nan() || d.is_nan() {
                    f32::NAN
                } else {
                    m.max(d)
                }
            });
        cases.push(KernelCase {
            heads,
            lens: lens.clone(),
            max_difference,
        });
    }
    Ok(cases)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the host the paged cache's block gather gives plain attention's contexts: the
    /// check's own harness, which a GPU runs against the kernels. In a half type the
    /// contexts are rounded to it, within the tolerance and not exact.
    #[test]
    fn paged_attention_on_the_host_is_plain_attention() -> candle_core::Result<()> {
        let slopes = |heads: usize| (1..=heads).map(|h| -1.0 / (1 << h) as f32).collect();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let cases = check_paged_attention(&Device::Cpu, dtype, slopes)?;
            assert_eq!(cases.len(), 4);
            for case in &cases {
                assert!(case.max_difference < tolerance(dtype), "{dtype:?} {case:?}");
            }
            let worst = cases.iter().map(|c| c.max_difference).fold(0f32, f32::max);
            match dtype {
                DType::F32 => assert!(worst < 1e-5, "{worst}"),
                _ => assert!(worst > 0.0, "{dtype:?}: the contexts are rounded"),
            }
        }
        Ok(())
    }
}
