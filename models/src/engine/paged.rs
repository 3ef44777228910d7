//! PagedAttention for the BLOOM engine (vLLM's design): the keys and values of every
//! running sequence live in fixed-size blocks of one pool allocated at load, each sequence
//! holds a table of its blocks, and a finished sequence's blocks go straight to the next
//! prompt. Nothing is copied when sequences join or leave the batch, and the memory the
//! cache may take is a number in the job file rather than whatever the batch grows to.
//!
//! On CUDA the blocks are device tensors in the layout of mistral.rs's kernels
//! (`mistralrs-paged-attn`: `reshape_and_cache` writes a step's keys and values into their
//! slots, `paged_attention` attends over a sequence's blocks with the model's ALiBi slopes). On
//! the host the same bookkeeping runs over plain vectors with attention in Rust, so block
//! tables, slots and admission are tested on machines without a GPU.

use candle_core::{DType, Device, Tensor};

use super::attention::attend;

/// Tokens per block unless the job file says otherwise (vLLM's default).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Head sizes `paged_attention`'s kernels are compiled for.
pub const KERNEL_HEAD_SIZES: [usize; 8] = [64, 80, 96, 112, 128, 192, 256, 512];

/// The free blocks of the pool.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    total: usize,
    free: Vec<u32>,
}

/// One sequence's blocks: position `p` lives in block `blocks[p / block_size]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<u32>,
}

impl BlockPool {
    pub fn new(total: usize, block_size: usize) -> Self {
        let mut pool = Self {
            block_size,
            total,
            free: Vec::new(),
        };
        pool.reset();
        pool
    }

    /// Blocks that hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// The blocks for a sequence of up to `tokens` tokens (its prompt and every token it
    /// may generate), or `None` while fewer are free. Reserving the whole sequence at
    /// admission means a running sequence never waits for memory, so no sequence is ever
    /// evicted and recomputed; the price is the room of answers that end early.
    pub fn reserve(&mut self, tokens: usize) -> Option<BlockTable> {
        let needed = self.blocks_for(tokens.max(1));
        if needed > self.free.len() {
            return None;
        }
        let blocks = self.free.split_off(self.free.len() - needed);
        Some(BlockTable { blocks })
    }

    /// Gives a finished sequence's blocks back.
    pub fn release(&mut self, table: BlockTable) {
        self.free.extend(table.blocks);
    }

    /// Every block free again: for when no sequence runs, which also reclaims the
    /// blocks of sequences an engine panic dropped.
    pub fn reset(&mut self) {
        // Handed out from the end: the lowest blocks first.
        self.free = (0..self.total as u32).rev().collect();
    }
}

impl BlockTable {
    /// The pool slot of position `position`.
    fn slot(&self, position: usize, block_size: usize) -> i64 {
        let block = self.blocks[position / block_size] as usize;
        (block * block_size + position % block_size) as i64
    }
}

/// The slots one write fills, on the host and (for the kernels) on the device.
pub struct Slots {
    host: Vec<i64>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    device: Option<Tensor>,
}

/// Per decoding step: where each sequence's new token goes and what it attends over.
pub struct StepTables {
    slots: Slots,
    /// `(sequences, most blocks)` block ids, zero-padded, and context lengths: the
    /// kernels' inputs (device only).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    device: Option<(Tensor, Tensor)>,
    tables: Vec<BlockTable>,
    lens: Vec<usize>,
}

impl StepTables {
    /// The slots of the step's new tokens.
    pub fn slots(&self) -> &Slots {
        &self.slots
    }
}

/// Where the blocks live.
enum Store {
    /// Per layer, the key cache `(blocks, heads, head_dim / x, block_size, x)` and the value
    /// cache `(blocks, heads, head_dim, block_size)`, `x` = 16 bytes of elements: the
    /// kernels' layout. The ALiBi slopes ride along on the device.
    #[cfg(feature = "cuda")]
    Cuda {
        layers: Vec<(Tensor, Tensor)>,
        slopes: Tensor,
    },
    /// Per layer, keys and values slot after slot, each slot's heads in a row; grown as
    /// slots are written.
    Host { layers: Vec<(Vec<f32>, Vec<f32>)> },
}

/// The paged key/value cache of a model with a position bias per head (BLOOM's ALiBi):
/// the pool and its blocks.
pub struct PagedKv {
    pub pool: BlockPool,
    store: Store,
    heads: usize,
    head_dim: usize,
    /// The model's position bias per head, from [`PagedKv::new`].
    slopes: Vec<f32>,
    device: Device,
}

impl PagedKv {
    /// Bytes one block takes over all layers, keys and values, on `device` for a model
    /// computing in `dtype` (the host keeps f32, whatever the model's type).
    pub fn block_bytes(
        layers: usize,
        hidden: usize,
        block_size: usize,
        dtype: DType,
        device: &Device,
    ) -> usize {
        let element = if device.is_cpu() {
            size_of::<f32>()
        } else {
            dtype.size_in_bytes()
        };
        2 * layers * block_size * hidden * element
    }

    /// A cache of `blocks` blocks for a model of `layers` × heads × `head_dim`, on
    /// `device` (the kernels on CUDA, Rust on the host). `slopes` is the model's position
    /// bias, one slope per head (BLOOM's ALiBi; zeros for a model that rotates its keys
    /// itself): the engine knows no model's position scheme. On a device the blocks hold
    /// `dtype`, the model's keys' and values' type; the host holds them widened to f32
    /// (exact), where its attention computes.
    pub fn new(
        blocks: usize,
        block_size: usize,
        layers: usize,
        head_dim: usize,
        slopes: Vec<f32>,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let heads = slopes.len();
        let store = if device.is_cpu() {
            Store::Host {
                layers: (0..layers).map(|_| (Vec::new(), Vec::new())).collect(),
            }
        } else {
            let shape = (blocks, block_size, layers, head_dim);
            Self::device_store(shape, &slopes, dtype, device)?
        };
        Ok(Self {
            pool: BlockPool::new(blocks, block_size),
            store,
            heads,
            head_dim,
            slopes,
            device: device.clone(),
        })
    }

    /// Zeroed blocks of `(blocks, block_size, layers, head_dim)` in `dtype` on `device`.
    #[cfg(feature = "cuda")]
    fn device_store(
        (blocks, block_size, layers, head_dim): (usize, usize, usize, usize),
        slopes: &[f32],
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Store> {
        let heads = slopes.len();
        if !KERNEL_HEAD_SIZES.contains(&head_dim) {
            candle_core::bail!(
                "PagedAttention's kernels take head sizes {KERNEL_HEAD_SIZES:?}, this model's \
                 is {head_dim}"
            );
        }
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            candle_core::bail!("PagedAttention's kernels take f32, f16 or bf16, not {dtype:?}");
        }
        // The kernels read keys 16 bytes at a time.
        let x = 16 / dtype.size_in_bytes();
        let layers = (0..layers)
            .map(|_| {
                Ok((
                    Tensor::zeros((blocks, heads, head_dim / x, block_size, x), dtype, device)?,
                    Tensor::zeros((blocks, heads, head_dim, block_size), dtype, device)?,
                ))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        // The kernels take the slopes in f32 whatever the cache's type.
        let slopes = Tensor::new(slopes, device)?;
        Ok(Store::Cuda { layers, slopes })
    }

    #[cfg(not(feature = "cuda"))]
    fn device_store(
        _: (usize, usize, usize, usize),
        _: &[f32],
        _: DType,
        device: &Device,
    ) -> candle_core::Result<Store> {
        candle_core::bail!("PagedAttention on {device:?} needs abridge built with `cuda`")
    }

    fn block_size(&self) -> usize {
        self.pool.block_size
    }

    /// The slots of positions `0..len` of `table`: a prompt's.
    pub fn prompt_slots(&self, table: &BlockTable, len: usize) -> candle_core::Result<Slots> {
        let host: Vec<i64> = (0..len).map(|p| table.slot(p, self.block_size())).collect();
        self.slots(host)
    }

    fn slots(&self, host: Vec<i64>) -> candle_core::Result<Slots> {
        let device = match self.store {
            Store::Host { .. } => None,
            #[cfg(feature = "cuda")]
            Store::Cuda { .. } => Some(Tensor::new(host.as_slice(), &self.device)?),
        };
        Ok(Slots { host, device })
    }

    /// The tables of a decoding step: sequence `i` has `lens[i]` tokens with its newest,
    /// whose keys and values this step writes, last.
    pub fn step_tables(
        &self,
        tables: Vec<BlockTable>,
        lens: Vec<usize>,
    ) -> candle_core::Result<StepTables> {
        let block_size = self.block_size();
        let slots = self.slots(
            tables
                .iter()
                .zip(&lens)
                .map(|(t, &len)| t.slot(len - 1, block_size))
                .collect(),
        )?;
        let device = match self.store {
            Store::Host { .. } => None,
            #[cfg(feature = "cuda")]
            Store::Cuda { .. } => {
                let widest = tables.iter().map(|t| t.blocks.len()).max().unwrap_or(0);
                let ids: Vec<u32> = tables
                    .iter()
                    .flat_map(|t| {
                        let padding = widest - t.blocks.len();
                        t.blocks
                            .iter()
                            .copied()
                            .chain(std::iter::repeat_n(0, padding))
                    })
                    .collect();
                let lens32: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
                Some((
                    Tensor::from_vec(ids, (tables.len(), widest), &self.device)?,
                    Tensor::new(lens32.as_slice(), &self.device)?,
                ))
            }
        };
        Ok(StepTables {
            slots,
            device,
            tables,
            lens,
        })
    }

    /// Writes keys and values `(tokens, heads, head_dim)` of `layer` into `slots`.
    pub fn write(
        &mut self,
        layer: usize,
        keys: &Tensor,
        values: &Tensor,
        slots: &Slots,
    ) -> candle_core::Result<()> {
        match &mut self.store {
            Store::Host { layers } => {
                let width = self.heads * self.head_dim;
                let (cache_k, cache_v) = &mut layers[layer];
                let wide = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>();
                let (keys, values) = (wide(keys)?, wide(values)?);
                for ((&slot, k), v) in slots
                    .host
                    .iter()
                    .zip(keys.chunks_exact(width))
                    .zip(values.chunks_exact(width))
                {
                    let at = slot as usize * width;
                    if cache_k.len() < at + width {
                        cache_k.resize(at + width, 0.0);
                        cache_v.resize(at + width, 0.0);
                    }
                    cache_k[at..at + width].copy_from_slice(k);
                    cache_v[at..at + width].copy_from_slice(v);
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Store::Cuda { layers, .. } => {
                let (cache_k, cache_v) = &layers[layer];
                let Some(slots) = &slots.device else {
                    candle_core::bail!("slots without their device copy");
                };
                mistralrs_paged_attn::reshape_and_cache(
                    &keys.contiguous()?,
                    &values.contiguous()?,
                    None,
                    None,
                    cache_k,
                    cache_v,
                    slots,
                )
            }
        }
    }

    /// Attention of each sequence's query `(sequences, heads, head_dim)` over its blocks
    /// in `layer`, with ALiBi: the context `(sequences, heads × head_dim)`.
    pub fn attend(
        &self,
        layer: usize,
        queries: &Tensor,
        step: &StepTables,
    ) -> candle_core::Result<Tensor> {
        let (heads, head_dim) = (self.heads, self.head_dim);
        let width = heads * head_dim;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let queries_dtype = queries.dtype();
        match &self.store {
            Store::Host { layers } => {
                let (cache_k, cache_v) = &layers[layer];
                let queries = queries
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?;
                let slopes = &self.slopes;
                let mut context = vec![0f32; step.lens.len() * width];
                for (b, (table, &len)) in step.tables.iter().zip(&step.lens).enumerate() {
                    for (h, &slope) in slopes.iter().enumerate() {
                        // The head's tokens in order, gathered from the sequence's blocks.
                        let mut keys = Vec::with_capacity(len * head_dim);
                        let mut values = Vec::with_capacity(len * head_dim);
                        for p in 0..len {
                            let slot = table.slot(p, self.block_size()) as usize;
                            let at = slot * width + h * head_dim;
                            keys.extend_from_slice(&cache_k[at..at + head_dim]);
                            values.extend_from_slice(&cache_v[at..at + head_dim]);
                        }
                        let at = (b * heads + h) * head_dim;
                        attend(
                            &queries[at..at + head_dim],
                            &keys,
                            &values,
                            slope,
                            scale,
                            &mut context[at..at + head_dim],
                        );
                    }
                }
                // Rounded to the queries' type, as a kernel's output is.
                Tensor::from_vec(context, (step.lens.len(), width), &self.device)?
                    .to_dtype(queries_dtype)
            }
            #[cfg(feature = "cuda")]
            Store::Cuda { layers, slopes } => {
                let (cache_k, cache_v) = &layers[layer];
                let Some((tables, lens)) = &step.device else {
                    candle_core::bail!("step tables without their device copy");
                };
                let longest = step.lens.iter().copied().max().unwrap_or(0);
                // The kernel's ALiBi bias is slope × (key position − query position):
                // BLOOM's slope × key position less a constant per query, which the
                // softmax does not see.
                mistralrs_paged_attn::paged_attention(
                    &queries.contiguous()?,
                    None,
                    None,
                    cache_k,
                    cache_v,
                    tables,
                    lens,
                    Some(slopes),
                    longest,
                    scale,
                    1.0,
                    None,
                )?
                .reshape((step.lens.len(), width))
            }
        }
    }
}

/// What the GPU has free, which the pool takes a share of.
#[cfg(feature = "cuda")]
pub(crate) fn free_gpu_memory(device: &Device) -> Result<usize, String> {
    let cuda = device.as_cuda_device().map_err(|e| e.to_string())?;
    cuda.cuda_stream()
        .context()
        .mem_get_info()
        .map(|(free, _total)| free)
        .map_err(|e| format!("asking the GPU for its free memory: {e:?}"))
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn free_gpu_memory(device: &Device) -> Result<usize, String> {
    Err(format!("{device:?} needs abridge built with `cuda`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_reserved_whole_and_come_back() {
        let mut pool = BlockPool::new(5, 4);
        let a = pool.reserve(9).expect("3 blocks free");
        assert_eq!(a.blocks.len(), 3);
        assert_eq!(pool.free(), 2);
        assert!(pool.reserve(9).is_none(), "only 2 blocks left");
        let b = pool.reserve(8).expect("2 blocks");
        assert_eq!(pool.free(), 0);
        let mut all: Vec<u32> = a.blocks.iter().chain(&b.blocks).copied().collect();
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2, 3, 4], "no block handed out twice");
        pool.release(a);
        assert_eq!(pool.free(), 3);
        assert!(pool.reserve(12).is_some());
        pool.reset();
        assert_eq!(pool.free(), 5);
    }

    #[test]
    fn slots_follow_the_block_table() {
        let table = BlockTable { blocks: vec![7, 2] };
        let slots: Vec<i64> = (0..6).map(|p| table.slot(p, 4)).collect();
        assert_eq!(slots, vec![28, 29, 30, 31, 8, 9]);
    }
}
