//! Host wrappers: one function per kernel, taking device buffers and the shapes, choosing
//! the launch geometry. Each has a CPU twin in the main crate that its GPU test compares
//! against.

use crate::device::GpuDevice;
use crate::CudaError;
use cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};

pub(crate) fn launch_err(kernel: &str, e: impl std::fmt::Display) -> CudaError {
    CudaError::Failed(format!("launching {kernel} failed: {e}"))
}

pub(crate) fn cfg(grid: (u32, u32, u32), block: (u32, u32, u32)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: block,
        shared_mem_bytes: 0,
    }
}

/// The most tokens a GEMV launch takes (`GEMV_TOKENS` in matmul.cu); more tokens run
/// the tiled GEMM.
pub const GEMV_MAX_TOKENS: usize = 8;

/// The token range of the INT4 tensor-core kernels. One token stays on the CUDA-core
/// GEMV, which reads the weights faster (an H200: 668 against 604 GB/s for a K2 gate
/// projection); from 2 tokens the tensor cores win (8 tokens: 2.7x); above 256 tokens
/// cuBLAS's BF16 pair overtakes them (512 tokens: 64 against 61 TFLOP/s).
pub const INT4_TC_MIN_TOKENS: usize = 2;
pub const INT4_TC_MAX_TOKENS: usize = 256;

/// The smallest weight (rows x cols) the INT4 tensor-core kernels take: they cost two
/// launches (the activations' split, then the product), which for small matrices weighs
/// more than the product (the demo checkpoint's 32x64 experts ran decode 20% slower on an
/// H200 through them); a K2 expert matrix has 14.7M weights.
pub const INT4_TC_MIN_WEIGHTS: usize = 1 << 20;

/// Threads of an INT4 tensor-core block (`TC_WARPS` warps in matmul.cu).
const INT4_TC_THREADS: u32 = 16 * 32;

/// Whether an INT4 weight of `cols` columns in groups of `group` suits the tensor-core
/// kernels: they take columns in units of 32 that must each lie inside one scale group.
pub fn int4_tc_fits(cols: usize, group: usize) -> bool {
    cols > 0
        && group > 0
        && cols.is_multiple_of(32)
        && group.is_multiple_of(32)
        && cols.is_multiple_of(group)
}

pub(crate) fn blocks_for(n: usize, per: usize) -> u32 {
    n.div_ceil(per).max(1) as u32
}

impl GpuDevice {
    #[allow(clippy::too_many_arguments)]
    pub fn rope_yarn(
        &self,
        x: &mut CudaSlice<f32>,
        positions: &CudaSlice<i32>,
        inv_freq: &CudaSlice<f32>,
        magnitude: f32,
        tokens: usize,
        heads: usize,
        token_stride: usize,
        head_stride: usize,
        offset: usize,
        half: usize,
    ) -> Result<(), CudaError> {
        let f = self.function("rope_yarn")?;
        let args = [tokens, heads, token_stride, head_stride, offset, half].map(|v| v as i32);
        let mut b = self.stream.launch_builder(f);
        b.arg(x).arg(positions).arg(inv_freq).arg(&magnitude);
        for a in &args {
            b.arg(a);
        }
        let n = tokens * heads * half;
        // SAFETY: every (token, head, pair) index stays inside x as laid out by the strides.
        unsafe { b.launch(cfg((blocks_for(n, 256), 1, 1), (256, 1, 1))) }
            .map(|_| ())
            .map_err(|e| launch_err("rope_yarn", e))
    }

    pub fn silu_mul(
        &self,
        gate: &mut CudaSlice<f32>,
        up: &CudaSlice<f32>,
        n: usize,
    ) -> Result<(), CudaError> {
        let f = self.function("silu_mul")?;
        let n_i = n as i32;
        let mut b = self.stream.launch_builder(f);
        b.arg(gate).arg(up).arg(&n_i);
        // SAFETY: both buffers hold n values.
        unsafe { b.launch(cfg((blocks_for(n, 256), 1, 1), (256, 1, 1))) }
            .map(|_| ())
            .map_err(|e| launch_err("silu_mul", e))
    }

    pub fn embedding_bf16(
        &self,
        table: &CudaSlice<u16>,
        ids: &CudaSlice<i32>,
        out: &mut CudaSlice<f32>,
        tokens: usize,
        hidden: usize,
    ) -> Result<(), CudaError> {
        let f = self.function("embedding_bf16")?;
        let h = hidden as i32;
        let mut b = self.stream.launch_builder(f);
        b.arg(table).arg(ids).arg(out).arg(&h);
        // SAFETY: ids are checked against the vocabulary before upload.
        unsafe { b.launch(cfg((tokens as u32, 1, 1), (256, 1, 1))) }
            .map(|_| ())
            .map_err(|e| launch_err("embedding_bf16", e))
    }

    /// Routing parameters of `route_topk`.
    #[allow(clippy::too_many_arguments)]
    pub fn route_topk(
        &self,
        logits: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        tokens: usize,
        n_experts: usize,
        groups: (usize, usize),
        k: usize,
        scoring_softmax: bool,
        method: i32,
        norm_topk: bool,
        scaling: f32,
        ids: &mut CudaSlice<i32>,
        weights: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let f = self.function("route_topk")?;
        let ints = [
            n_experts as i32,
            groups.0 as i32,
            groups.1 as i32,
            k as i32,
            scoring_softmax as i32,
            method,
            norm_topk as i32,
        ];
        let null: u64 = 0;
        let mut b = self.stream.launch_builder(f);
        b.arg(logits);
        match bias {
            Some(bias) => b.arg(bias),
            None => b.arg(&null),
        };
        for a in &ints {
            b.arg(a);
        }
        b.arg(&scaling).arg(ids).arg(weights);
        // SAFETY: logits hold tokens * n_experts, outputs tokens * k values.
        unsafe { b.launch(cfg((tokens as u32, 1, 1), (128, 1, 1))) }
            .map(|_| ())
            .map_err(|e| launch_err("route_topk", e))
    }

    /// `y[t, r] = sum_k W[r, k] x[t, k]` for an INT4 pack-quantized weight: on the tensor
    /// cores (nibbles widened in registers) for [`INT4_TC_MIN_TOKENS`] to
    /// [`INT4_TC_MAX_TOKENS`] tokens where the shape suits them and the weight has at
    /// least [`INT4_TC_MIN_WEIGHTS`] values, else the CUDA-core GEMV (up to
    /// [`GEMV_MAX_TOKENS`]) or tiled GEMM.
    #[allow(clippy::too_many_arguments)]
    pub fn int4_matmul(
        &self,
        packed: &CudaSlice<u32>,
        scales: &CudaSlice<u16>,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
        group: usize,
        tokens: usize,
    ) -> Result<(), CudaError> {
        if (INT4_TC_MIN_TOKENS..=INT4_TC_MAX_TOKENS).contains(&tokens)
            && rows * cols >= INT4_TC_MIN_WEIGHTS
            && int4_tc_fits(cols, group)
        {
            return self.int4_tc_matmul(packed, scales, x, y, rows, cols, group, tokens);
        }
        self.int4_matmul_cuda_cores(packed, scales, x, y, rows, cols, group, tokens)
    }

    /// [`int4_matmul`](Self::int4_matmul) on the CUDA cores only: the GEMV up to
    /// [`GEMV_MAX_TOKENS`], the tiled GEMM above.
    #[allow(clippy::too_many_arguments)]
    pub fn int4_matmul_cuda_cores(
        &self,
        packed: &CudaSlice<u32>,
        scales: &CudaSlice<u16>,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
        group: usize,
        tokens: usize,
    ) -> Result<(), CudaError> {
        let ints = [rows as i32, cols as i32, group as i32, tokens as i32];
        if tokens <= GEMV_MAX_TOKENS {
            let f = self.function(if tokens == 1 {
                "int4_gemv_1"
            } else {
                "int4_gemv"
            })?;
            let mut b = self.stream.launch_builder(f);
            b.arg(packed).arg(scales).arg(x).arg(y);
            for a in &ints {
                b.arg(a);
            }
            // SAFETY: one warp per row; shapes match the buffers.
            unsafe { b.launch(cfg((blocks_for(rows, 4), 1, 1), (128, 1, 1))) }
                .map(|_| ())
                .map_err(|e| launch_err("int4_gemv", e))
        } else {
            let f = self.function("int4_gemm")?;
            let mut b = self.stream.launch_builder(f);
            b.arg(packed).arg(scales).arg(x).arg(y);
            for a in &ints {
                b.arg(a);
            }
            let grid = (blocks_for(tokens, 64), blocks_for(rows, 64), 1);
            // SAFETY: 64x64 tiles, bounds checked in the kernel.
            unsafe { b.launch(cfg(grid, (16, 16, 1))) }
                .map(|_| ())
                .map_err(|e| launch_err("int4_gemm", e))
        }
    }

    /// Activations `[tokens, cols]` split into BF16 hi + lo in the order the INT4
    /// tensor-core kernels read them (`int4_tc_split_x` in matmul.cu).
    fn int4_tc_split(
        &self,
        x: &CudaSlice<f32>,
        tokens: usize,
        cols: usize,
    ) -> Result<CudaSlice<u32>, CudaError> {
        if tokens * cols > x.len() {
            return Err(CudaError::Unsupported(format!(
                "int4_tc_split_x: {tokens} tokens of {cols} values, but x holds {}",
                x.len()
            )));
        }
        let tiles = tokens.div_ceil(8);
        let entries = tiles * (cols / 32) * 32;
        // Two uint4 (eight words) per entry, every one written by the kernel.
        let mut xs = self.scratch::<u32>("split activations", entries * 8)?;
        let f = self.function("int4_tc_split_x")?;
        let (t, c) = (tokens as i32, cols as i32);
        let mut b = self.stream.launch_builder(f);
        b.arg(x).arg(&mut xs).arg(&t).arg(&c);
        // SAFETY: x holds tokens * cols values; xs holds `entries` pairs of uint4.
        unsafe { b.launch(cfg((blocks_for(entries, 256), 1, 1), (256, 1, 1))) }
            .map_err(|e| launch_err("int4_tc_split_x", e))?;
        Ok(xs)
    }

    /// The INT4 product on the tensor cores (see [`int4_tc_fits`] for the shapes).
    #[allow(clippy::too_many_arguments)]
    pub fn int4_tc_matmul(
        &self,
        packed: &CudaSlice<u32>,
        scales: &CudaSlice<u16>,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
        group: usize,
        tokens: usize,
    ) -> Result<(), CudaError> {
        if !int4_tc_fits(cols, group) {
            return Err(CudaError::Unsupported(format!(
                "the INT4 tensor-core product needs columns and group multiples of 32, \
                     got {cols} columns in groups of {group}"
            )));
        }
        if tokens == 0 || rows == 0 {
            return Ok(());
        }
        let xs = self.int4_tc_split(x, tokens, cols)?;
        let tiles = tokens.div_ceil(8);
        let (name, per_block) = match tiles {
            1 => ("int4_tc_matmul_1", 1),
            2 => ("int4_tc_matmul_2", 2),
            _ => ("int4_tc_matmul_4", 4),
        };
        let f = self.function(name)?;
        let ints = [rows as i32, cols as i32, group as i32, tokens as i32];
        let mut b = self.stream.launch_builder(f);
        b.arg(packed).arg(scales).arg(&xs).arg(y);
        for a in &ints {
            b.arg(a);
        }
        let grid = (blocks_for(rows, 16), blocks_for(tiles, per_block), 1);
        // SAFETY: 16 rows and `per_block` tiles of 8 tokens per block, bounds checked in
        // the kernel; xs was split for `tokens` tokens of `cols` columns.
        unsafe { b.launch(cfg(grid, (INT4_TC_THREADS, 1, 1))) }
            .map(|_| ())
            .map_err(|e| launch_err(name, e))
    }

    /// `y[t, r] = sum_k W[r, k] x[t, k]` for an FP8 E4M3 block-scaled weight.
    #[allow(clippy::too_many_arguments)]
    pub fn fp8_matmul(
        &self,
        data: &CudaSlice<u8>,
        scale_inv: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
        block: [usize; 2],
        tokens: usize,
    ) -> Result<(), CudaError> {
        let ints = [
            rows as i32,
            cols as i32,
            block[0] as i32,
            block[1] as i32,
            tokens as i32,
        ];
        let (name, grid, block_dim) = if tokens <= GEMV_MAX_TOKENS {
            ("fp8_gemv", (blocks_for(rows, 4), 1, 1), (128, 1, 1))
        } else {
            (
                "fp8_gemm",
                (blocks_for(tokens, 64), blocks_for(rows, 64), 1),
                (16, 16, 1),
            )
        };
        let f = self.function(name)?;
        let mut b = self.stream.launch_builder(f);
        b.arg(data).arg(scale_inv).arg(x).arg(y);
        for a in &ints {
            b.arg(a);
        }
        // SAFETY: shapes match the buffers; bounds checked in the kernels.
        unsafe { b.launch(cfg(grid, block_dim)) }
            .map(|_| ())
            .map_err(|e| launch_err(name, e))
    }

    /// Absorbed MLA decode over the paged latent cache, split over `chunk`-token pieces.
    #[allow(clippy::too_many_arguments)]
    pub fn mla_decode(
        &self,
        q: &CudaSlice<f32>,
        pool: LatentPool,
        block_tables: &CudaSlice<i32>,
        seq_lens: &CudaSlice<i32>,
        max_len: usize,
        shape: MlaDecodeShape,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let s = shape;
        if s.c > 4 * 128 {
            return Err(CudaError::Unsupported(format!(
                "mla_decode supports a latent of at most 512, got {}",
                s.c
            )));
        }
        let kernel = MlaDecodeKernel::for_shape(matches!(pool, LatentPool::Bf16(_)), &s);
        let head_blocks = s.heads.div_ceil(kernel.heads_per_block());
        let (splits, chunk) = kernel.splits(max_len, s.seqs * head_blocks);
        let slots = s.seqs * s.heads * splits;
        // Every split writes its slots in full (zeros for an empty one).
        let mut part_out = self.scratch::<f32>("MLA decode partial sums", slots * s.c)?;
        let mut part_max = self.scratch::<f32>("MLA decode partial maxima", slots)?;
        let mut part_sum = self.scratch::<f32>("MLA decode partial softmax sums", slots)?;
        let f = self.function(kernel.name())?;
        let ints = [
            s.max_blocks as i32,
            s.block_size as i32,
            s.width as i32,
            s.c as i32,
            s.heads as i32,
            chunk as i32,
        ];
        let mut b = self.stream.launch_builder(f);
        b.arg(q);
        match pool {
            LatentPool::F32(p) => b.arg(p),
            LatentPool::Bf16(p) => b.arg(p),
        };
        b.arg(block_tables).arg(seq_lens);
        for a in &ints {
            b.arg(a);
        }
        b.arg(&s.scale)
            .arg(&mut part_out)
            .arg(&mut part_max)
            .arg(&mut part_sum);
        let launch = LaunchConfig {
            grid_dim: (head_blocks as u32, splits as u32, s.seqs as u32),
            block_dim: (MLA_DECODE_THREADS, 1, 1),
            shared_mem_bytes: kernel.dynamic_shared_bytes(),
        };
        // SAFETY: tables and lengths describe blocks inside the pool.
        unsafe { b.launch(launch) }.map_err(|e| launch_err(kernel.name(), e))?;
        let f = self.function("mla_decode_combine")?;
        let ints = [s.c as i32, s.heads as i32, splits as i32];
        let mut b = self.stream.launch_builder(f);
        b.arg(&part_out).arg(&part_max).arg(&part_sum).arg(out);
        for a in &ints {
            b.arg(a);
        }
        // SAFETY: out holds seqs * heads * c values.
        unsafe { b.launch(cfg((s.heads as u32, s.seqs as u32, 1), (128, 1, 1))) }
            .map(|_| ())
            .map_err(|e| launch_err("mla_decode_combine", e))
    }
}

/// The widest latent row (`kv_lora_rank + qk_rope_head_dim`) the tensor-core decode
/// kernel stages (`MT_WIDTH` in mla.cu), and the most value columns it keeps (`MT_VALUES`).
const MLA_TC_MAX_WIDTH: usize = 576;
const MLA_TC_MAX_VALUES: usize = 512;

/// Threads of every MLA decode kernel's block (four warps).
const MLA_DECODE_THREADS: u32 = 128;

/// Dynamic shared memory of `mla_decode_tc_bf16`: two stages of 32 latent rows of
/// `MT_ROW_WORDS` (292) words.
pub(crate) const MLA_TC_SHARED_BYTES: u32 = 2 * 32 * (MLA_TC_MAX_WIDTH as u32 / 2 + 4) * 4;

/// Which MLA decode kernel serves a call: per the pool's type and the latent's shape, the
/// fastest one whose limits it meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MlaDecodeKernel {
    /// `mla_decode_tc_bf16`: 16 heads per block on the tensor cores (BF16 pools, width a
    /// multiple of 16 up to 576, c a multiple of 8 up to 512).
    TensorCores,
    /// `mla_decode_partial(_bf16)`: one head per block, any shape with c <= 512.
    PerHead { bf16: bool },
}

impl MlaDecodeKernel {
    fn for_shape(bf16: bool, s: &MlaDecodeShape) -> Self {
        if bf16
            && s.width <= MLA_TC_MAX_WIDTH
            && s.width.is_multiple_of(16)
            && s.c.is_multiple_of(8)
            && s.c <= MLA_TC_MAX_VALUES
        {
            MlaDecodeKernel::TensorCores
        } else {
            MlaDecodeKernel::PerHead { bf16 }
        }
    }

    fn name(self) -> &'static str {
        match self {
            MlaDecodeKernel::TensorCores => "mla_decode_tc_bf16",
            MlaDecodeKernel::PerHead { bf16: true } => "mla_decode_partial_bf16",
            MlaDecodeKernel::PerHead { bf16: false } => "mla_decode_partial",
        }
    }

    fn heads_per_block(self) -> usize {
        match self {
            MlaDecodeKernel::TensorCores => 16,
            MlaDecodeKernel::PerHead { .. } => 1,
        }
    }

    fn dynamic_shared_bytes(self) -> u32 {
        match self {
            MlaDecodeKernel::TensorCores => MLA_TC_SHARED_BYTES,
            MlaDecodeKernel::PerHead { .. } => 0,
        }
    }

    /// Splits of the context: the one-head kernel wants many small blocks; the
    /// tensor-core kernel's blocks are large (two per multiprocessor), and each split
    /// writes 16 heads' partial sums, so it aims at a few waves of blocks over pieces of at
    /// least 64 keys (two tiles).
    fn splits(self, max_len: usize, query_blocks: usize) -> (usize, usize) {
        match self {
            MlaDecodeKernel::TensorCores => decode_splits_for(max_len, query_blocks, 512, 64),
            MlaDecodeKernel::PerHead { .. } => decode_splits(max_len, query_blocks),
        }
    }
}

/// How many pieces each query's keys are split into, and the keys per piece: enough
/// (head, piece, query) blocks to fill a large GPU (about 2048), pieces of at least 256
/// keys, at most one piece per 256 keys. Few queries over long contexts split finely;
/// a prefill chunk of many queries does not split, which also keeps the partial sums
/// (`queries * heads * splits * latent` values) the size of the output.
pub fn decode_splits(max_len: usize, query_heads: usize) -> (usize, usize) {
    decode_splits_for(max_len, query_heads, 2048, 256)
}

/// [`decode_splits`] for `query_blocks` blocks per split, aiming at `target_blocks`
/// blocks in all with pieces of at least `min_chunk` keys.
pub fn decode_splits_for(
    max_len: usize,
    query_blocks: usize,
    target_blocks: usize,
    min_chunk: usize,
) -> (usize, usize) {
    let most = max_len.div_ceil(min_chunk.max(1)).max(1);
    let wanted = target_blocks.div_ceil(query_blocks.max(1)).max(1);
    let splits = most.min(wanted);
    (splits, max_len.div_ceil(splits).max(1))
}

/// Shapes of one absorbed MLA decode call.
#[derive(Debug, Clone, Copy)]
pub struct MlaDecodeShape {
    pub seqs: usize,
    pub heads: usize,
    /// kv_lora_rank + qk_rope_head_dim.
    pub width: usize,
    /// kv_lora_rank.
    pub c: usize,
    pub block_size: usize,
    pub max_blocks: usize,
    pub scale: f32,
}

/// A latent cache pool as the decode kernel reads it.
#[derive(Clone, Copy)]
pub enum LatentPool<'a> {
    F32(&'a CudaSlice<f32>),
    Bf16(&'a CudaSlice<u16>),
}

/// Widths of the absorbed MLA projections (see `mla_absorb_queries` in mla.cu).
#[derive(Debug, Clone, Copy)]
pub struct AbsorbShape {
    pub tokens: usize,
    pub heads: usize,
    pub nope: usize,
    pub rope: usize,
    pub v: usize,
    pub latent: usize,
}

/// The operations of the device-resident forward pass that are not matrix products.
impl GpuDevice {
    /// In place, the first `dim` values of each of `rows` rows at `stride`.
    pub fn rms_norm_rows(
        &self,
        x: &mut CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rows: usize,
        dim: usize,
        stride: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        let f = self.function("rms_norm_rows")?;
        let (dim_i, stride_i) = (dim as i32, stride as i32);
        let mut b = self.stream.launch_builder(f);
        b.arg(x).arg(w).arg(&dim_i).arg(&stride_i).arg(&eps);
        // SAFETY: x holds rows * stride values, w dim.
        unsafe { b.launch(cfg((rows as u32, 1, 1), (256, 1, 1))) }
            .map(|_| ())
            .map_err(|e| launch_err("rms_norm_rows", e))
    }

    /// `x += y` over `n` values.
    pub fn add(
        &self,
        x: &mut CudaSlice<f32>,
        y: &CudaSlice<f32>,
        n: usize,
    ) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        let f = self.function("add_f32")?;
        let n_i = n as i32;
        let mut b = self.stream.launch_builder(f);
        b.arg(x).arg(y).arg(&n_i);
        // SAFETY: both hold n values.
        unsafe { b.launch(cfg((blocks_for(n, 256), 1, 1), (256, 1, 1))) }
            .map(|_| ())
            .map_err(|e| launch_err("add_f32", e))
    }

    /// `pool[slots[j]] = rows[j]` for `count` rows of `width` values.
    pub fn write_rows(
        &self,
        pool: &mut CudaSlice<f32>,
        rows: &CudaSlice<f32>,
        slots: &CudaSlice<i32>,
        count: usize,
        width: usize,
    ) -> Result<(), CudaError> {
        self.write_pool_rows("write_rows", pool, rows, slots, count, width)
    }

    /// [`write_rows`](Self::write_rows) into a BF16 pool, rounding to nearest even.
    pub fn write_rows_bf16(
        &self,
        pool: &mut CudaSlice<u16>,
        rows: &CudaSlice<f32>,
        slots: &CudaSlice<i32>,
        count: usize,
        width: usize,
    ) -> Result<(), CudaError> {
        self.write_pool_rows("write_rows_bf16", pool, rows, slots, count, width)
    }

    fn write_pool_rows<T: cudarc::driver::DeviceRepr>(
        &self,
        kernel: &str,
        pool: &mut CudaSlice<T>,
        rows: &CudaSlice<f32>,
        slots: &CudaSlice<i32>,
        count: usize,
        width: usize,
    ) -> Result<(), CudaError> {
        if count == 0 {
            return Ok(());
        }
        let f = self.function(kernel)?;
        let w = width as i32;
        let mut b = self.stream.launch_builder(f);
        b.arg(pool).arg(rows).arg(slots).arg(&w);
        // SAFETY: every slot lies inside the pool (the caller grows it first).
        unsafe { b.launch(cfg((count as u32, 1, 1), (256, 1, 1))) }
            .map(|_| ())
            .map_err(|e| launch_err(kernel, e))
    }

    /// `out[j] = x[rows[first + j]]` for `count` rows of `width` values.
    pub fn take_rows(
        &self,
        x: &CudaSlice<f32>,
        (rows, first): (&CudaSlice<i32>, usize),
        out: &mut CudaSlice<f32>,
        count: usize,
        width: usize,
    ) -> Result<(), CudaError> {
        if count == 0 {
            return Ok(());
        }
        let f = self.function("take_rows")?;
        let (w, first) = (width as i32, first as i32);
        let mut b = self.stream.launch_builder(f);
        b.arg(x).arg(rows).arg(&first).arg(out).arg(&w);
        // SAFETY: row indices come from the caller's token layout, inside x.
        unsafe { b.launch(cfg((count as u32, 1, 1), (256, 1, 1))) }
            .map(|_| ())
            .map_err(|e| launch_err("take_rows", e))
    }

    /// Absorbed queries `[tokens, heads, latent + rope]` from `q` and the f32 `kv_b`.
    pub fn mla_absorb_queries(
        &self,
        q: &CudaSlice<f32>,
        kv_b: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        s: AbsorbShape,
    ) -> Result<(), CudaError> {
        if s.nope > 512 {
            return Err(CudaError::Unsupported(format!(
                "mla_absorb_queries supports nope <= 512, got {}",
                s.nope
            )));
        }
        if s.tokens == 0 {
            return Ok(());
        }
        let f = self.function("mla_absorb_queries")?;
        let ints = [s.heads, s.nope, s.rope, s.v, s.latent].map(|v| v as i32);
        let mut b = self.stream.launch_builder(f);
        b.arg(q).arg(kv_b).arg(out);
        for a in &ints {
            b.arg(a);
        }
        // SAFETY: shapes as documented in mla.cu.
        unsafe { b.launch(cfg((s.tokens as u32, s.heads as u32, 1), (256, 1, 1))) }
            .map(|_| ())
            .map_err(|e| launch_err("mla_absorb_queries", e))
    }

    /// Per-head values `[tokens, heads, v]` from attended latents `[tokens, heads, latent]`.
    pub fn mla_expand_values(
        &self,
        o: &CudaSlice<f32>,
        kv_b: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        s: AbsorbShape,
    ) -> Result<(), CudaError> {
        if s.tokens == 0 {
            return Ok(());
        }
        let f = self.function("mla_expand_values")?;
        let ints = [s.heads, s.nope, s.v, s.latent].map(|v| v as i32);
        let mut b = self.stream.launch_builder(f);
        b.arg(o).arg(kv_b).arg(out);
        for a in &ints {
            b.arg(a);
        }
        // SAFETY: shapes as documented in mla.cu.
        unsafe { b.launch(cfg((s.tokens as u32, s.heads as u32, 1), (256, 1, 1))) }
            .map(|_| ())
            .map_err(|e| launch_err("mla_expand_values", e))
    }
}

impl GpuDevice {
    /// `out[rows[first + j]] += src[j]` for `count` rows of `dim` values (those `rows`
    /// distinct).
    pub fn add_rows(
        &self,
        out: &mut CudaSlice<f32>,
        src: &CudaView<'_, f32>,
        (rows, first): (&CudaSlice<i32>, usize),
        count: usize,
        dim: usize,
    ) -> Result<(), CudaError> {
        if count == 0 {
            return Ok(());
        }
        let f = self.function("scatter_add_rows")?;
        let (d, first) = (dim as i32, first as i32);
        let null: u64 = 0;
        let mut b = self.stream.launch_builder(f);
        b.arg(out).arg(src).arg(rows).arg(&null).arg(&first).arg(&d);
        // SAFETY: rows index inside out; src holds count * dim values; a null weight
        // pointer means weight 1.
        unsafe { b.launch(cfg((count as u32, 1, 1), (256, 1, 1))) }
            .map(|_| ())
            .map_err(|e| launch_err("add_rows", e))
    }

    /// `out[rows[first + j]] += weight[first + j] * src[j]` for `count` rows of `dim`
    /// values (those `rows` distinct).
    pub fn scatter_add_rows(
        &self,
        out: &mut CudaSlice<f32>,
        src: &CudaSlice<f32>,
        (rows, weights, first): (&CudaSlice<i32>, &CudaSlice<f32>, usize),
        count: usize,
        dim: usize,
    ) -> Result<(), CudaError> {
        if count == 0 {
            return Ok(());
        }
        let f = self.function("scatter_add_rows")?;
        let (d, first) = (dim as i32, first as i32);
        let mut b = self.stream.launch_builder(f);
        b.arg(out)
            .arg(src)
            .arg(rows)
            .arg(weights)
            .arg(&first)
            .arg(&d);
        // SAFETY: rows index inside out; src holds count * dim values.
        unsafe { b.launch(cfg((count as u32, 1, 1), (256, 1, 1))) }
            .map(|_| ())
            .map_err(|e| launch_err("scatter_add_rows", e))
    }
}

/// The routed experts of one MoE layer for a few tokens, all INT4 with one shape (see
/// `moe_gate_up_int4` in matmul.cu): `experts` holds the 6 x `slots` device addresses of
/// their weights and scales; `index` holds the `pairs` (token, slot) pairs, ordered by
/// token, followed by `tokens + 1` offsets where each token's pairs start; `weights`
/// the pairs' routing weights.
pub struct GroupedExperts<'a> {
    pub experts: &'a CudaSlice<u64>,
    pub slots: usize,
    pub index: &'a CudaSlice<i32>,
    pub weights: &'a CudaSlice<f32>,
    pub pairs: usize,
    /// Tokens the pairs name (the offsets' count less one).
    pub tokens: usize,
    pub hidden: usize,
    pub inter: usize,
    pub group: usize,
}

impl GpuDevice {
    /// `out[t] += Σ weight · down(silu(gate x[t]) · up x[t])` over each token's pairs, in
    /// three launches: gate and up with SiLU, down, and the weighted sum.
    pub fn grouped_int4_experts(
        &self,
        g: &GroupedExperts,
        x: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        if g.pairs == 0 {
            return Ok(());
        }
        // Both written in full by the launches below.
        let mut h = self.scratch::<f32>("grouped experts' intermediate", g.pairs * g.inter)?;
        let mut y = self.scratch::<f32>("grouped experts' outputs", g.pairs * g.hidden)?;
        let (slots, hidden, inter, group) = (
            g.slots as i32,
            g.hidden as i32,
            g.inter as i32,
            g.group as i32,
        );
        let pairs = g.index.slice(0..2 * g.pairs);
        let starts = g.index.slice(2 * g.pairs..2 * g.pairs + g.tokens + 1);
        // Four warps per block, one weight row per warp.
        let rows_grid = |rows: usize| (blocks_for(rows, 4), g.pairs as u32, 1);
        let f = self.function("moe_gate_up_int4")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(g.experts)
            .arg(&slots)
            .arg(&pairs)
            .arg(x)
            .arg(&mut h)
            .arg(&hidden)
            .arg(&inter)
            .arg(&group);
        // SAFETY: every pair names a token row of x and a slot of `experts`, whose
        // addresses are live INT4 weights of shape [inter, hidden].
        unsafe { b.launch(cfg(rows_grid(g.inter), (128, 1, 1))) }
            .map_err(|e| launch_err("moe_gate_up_int4", e))?;
        let f = self.function("moe_down_int4")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(g.experts)
            .arg(&slots)
            .arg(&pairs)
            .arg(&h)
            .arg(&mut y)
            .arg(&hidden)
            .arg(&inter)
            .arg(&group);
        // SAFETY: as above, down weights of shape [hidden, inter].
        unsafe { b.launch(cfg(rows_grid(g.hidden), (128, 1, 1))) }
            .map_err(|e| launch_err("moe_down_int4", e))?;
        let f = self.function("moe_combine")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(out)
            .arg(&y)
            .arg(g.weights)
            .arg(&pairs)
            .arg(&starts)
            .arg(&hidden);
        // SAFETY: the offsets split the pairs by token; tokens are rows of out.
        unsafe { b.launch(cfg((g.tokens as u32, 1, 1), (256, 1, 1))) }
            .map(|_| ())
            .map_err(|e| launch_err("moe_combine", e))
    }
}

#[cfg(test)]
mod tests {
    use super::{decode_splits, decode_splits_for};

    #[test]
    fn decode_splits_fill_the_gpu_without_growing_past_the_output() {
        // One sequence at 32k: 32 pieces of 1024 keys fill 64 heads x 32 = 2048 blocks.
        assert_eq!(decode_splits(32768, 64), (32, 1024));
        // Short contexts never split below 256 keys a piece.
        assert_eq!(decode_splits(300, 64), (2, 150));
        assert_eq!(decode_splits(100, 1), (1, 100));
        // 64 sequences, or a prefill chunk, already fill the GPU: one piece each.
        assert_eq!(decode_splits(4096, 64 * 64), (1, 4096));
        assert_eq!(decode_splits(32768, 2048 * 64), (1, 32768));
        // The tensor-core kernel's pieces: a few waves of 16-head blocks, at least 64 keys.
        assert_eq!(decode_splits_for(32768, 4, 512, 64), (128, 256));
        assert_eq!(decode_splits_for(4096, 64 * 4, 512, 64), (2, 2048));
        assert_eq!(decode_splits_for(1000, 8, 512, 64), (16, 63));
        for (len, qh) in [(1, 1), (257, 3), (100_000, 7), (5000, 64)] {
            let (splits, chunk) = decode_splits(len, qh);
            assert!(splits * chunk >= len && chunk >= 1, "{len} {qh}");
        }
    }
}
