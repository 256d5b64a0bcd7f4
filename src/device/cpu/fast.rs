//! The fast CPU backend: INT4, BF16 and FP8-block weights through the `kernels-avx512` row
//! kernels (read in place from the mmap), rayon across rows; batches of tokens times INT4
//! weights through the tiled GEMMs (int16 or int8 activations), rayon across panels, with
//! an expert's gate and up fused; times BF16 weights through the BF16-pair GEMM
//! (`cpu-int8`) or the f32 block product on tiles decoded once, as FP8-block weights;
//! attention through the tiled kernels. Other formats (F16, F32) use the reference code. Each output row is computed
//! by one task in a fixed order, so results do not depend on the thread count.

use super::kernels::{AttentionShape, CpuKernels, FfnWeights, KvView, ReferenceBackend};
use super::pool::CpuPools;
use crate::weights::{DenseDtype, LinearWeight};
use kernels_avx512::int4::Q8Activations;
use kernels_avx512::int4_i16::Q16Activations;
use kernels_avx512::{f32ops, Isa};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::Arc;

/// Fewest rows per rayon task.
const MIN_ROWS_PER_TASK: usize = 16;
/// Tasks per worker thread for one matrix: enough to balance, few enough that task
/// overhead stays small next to streaming the rows (a task is then tens of KiB or more
/// of contiguous weights, which the prefetcher and the kernels' prefetch hints follow).
const TASKS_PER_THREAD: usize = 4;
/// Token-expert visits in one MoE layer from which experts run concurrently.
const PARALLEL_EXPERTS_MIN_VISITS: usize = 64;
/// Tokens per kernel call (the kernels keep one accumulator per token).
const TOKENS_PER_CALL: usize = 8;
/// Tokens from which INT4 products unpack 32-row panels and run the tiled GEMM instead
/// of the row kernels: below it, unpacking costs more than it saves.
const GEMM_MIN_TOKENS: usize = 8;
/// Tokens from which BF16 and FP8-block products take the f32 GEMM (`cpu`, `cpu-f32`;
/// FP8 on every backend) instead of the row kernels: its tiles are decoded to f32 and
/// transposed once per call, which costs about as much as the product itself below ~32
/// tokens. Measured on the K2-geometry kit checkpoint (BF16): with the row kernels below
/// 32, a 16-token prompt 27 -> 46 tok/s and 8 concurrent decodes 24 -> 44 tok/s
/// aggregate; with the GEMM from 32, a 32-token prompt 37 -> 47 tok/s. For FP8 the GEMM
/// runs at 3x the row kernels from 128 tokens (`bench kernels`). (The BF16-pair GEMM of
/// `cpu-int8` copies its panels without widening and pays off from [`GEMM_MIN_TOKENS`].)
const F32_GEMM_MIN_TOKENS: usize = 32;

/// How INT4 kernels take their activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activations {
    /// f32 activations, nibbles dequantized in registers: the reference's numbers.
    F32,
    /// Activations quantized to int16 per 32 values (`vpdpwssd`): within rounding of the
    /// reference (relative error ~1e-5) at integer speed. The default.
    Int16,
    /// Activations quantized to int8 per 32 values (`vpdpbusd`, twice the multiply rate
    /// of int16) in the INT4 row kernels and GEMM, and rounded to BF16 for the BF16 GEMM
    /// (`vdpbf16ps`, twice the f32 rate) where the CPU has it: fastest, approximate (the
    /// peers' numbers: llama.cpp and ik_llama.cpp quantize activations the same way).
    Int8,
}

#[derive(Clone)]
pub struct CpuBackend {
    isa: Isa,
    activations: Activations,
    /// Pinned worker pools (rayon's global pool when they cannot be started).
    pools: Option<Arc<CpuPools>>,
}

impl CpuBackend {
    /// A backend on this machine's shared, pinned per-NUMA-node pools.
    pub fn new(isa: Isa, activations: Activations) -> Self {
        CpuBackend {
            isa,
            activations,
            pools: CpuPools::shared().ok(),
        }
    }

    /// A backend on the given pools.
    pub fn with_pools(isa: Isa, activations: Activations, pools: Arc<CpuPools>) -> Self {
        CpuBackend {
            isa,
            activations,
            pools: Some(pools),
        }
    }

    /// Runs `f` on NUMA node `node`'s threads (a routed expert the plan put there), or
    /// as [`Self::on_pool`] without a node or pools.
    fn on_node<R: Send>(&self, node: Option<usize>, f: impl FnOnce() -> R + Send) -> R {
        match (&self.pools, node) {
            (Some(p), Some(n)) => p.node(n).install(f),
            _ => f(),
        }
    }

    /// Runs `f` on the all-CPU pool, unless already on a worker thread (then on that pool:
    /// an expert assigned to a node stays on the node's threads).
    fn on_pool<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pools {
            Some(p) if rayon::current_thread_index().is_none() => p.all().install(f),
            _ => f(),
        }
    }
}

/// Computes `y[t, i] = row(rows.start + i) . x[t]` with a per-row kernel, in parallel
/// over rows; `kernel(row, token_range, out)` fills `out` for those tokens.
fn rows_parallel(
    rows: Range<usize>,
    n: usize,
    y: &mut [f32],
    kernel: impl Fn(usize, Range<usize>, &mut [f32]) + Sync,
) {
    let start = rows.start;
    let by_row = rows_parallel_many(&[(rows.len(), n)], |_, row, t, o| kernel(start + row, t, o));
    if let Some(b) = by_row.first() {
        token_major(b, rows.len(), n, y);
    }
}

/// [`rows_parallel`] over several products at once (one parallel region, tasks never
/// crossing a product): for each `(rows, n)` of `shapes`, returns the products row-major
/// (`[rows, n]`, see [`token_major`]) with `kernel(product, row, token_range, out)`
/// filling row `row`'s outputs for those tokens. Each row is computed by one call per
/// token range whatever the split, so results do not depend on the thread count or on
/// which products share the region.
fn rows_parallel_many(
    shapes: &[(usize, usize)],
    kernel: impl Fn(usize, usize, Range<usize>, &mut [f32]) + Sync,
) -> Vec<Vec<f32>> {
    let total: usize = shapes.iter().map(|s| s.0).sum();
    let per_task = total
        .div_ceil(rayon::current_num_threads() * TASKS_PER_THREAD)
        .max(MIN_ROWS_PER_TASK);
    let mut by_row: Vec<Vec<f32>> = shapes.iter().map(|&(r, n)| vec![0.0f32; r * n]).collect();
    let mut tasks: Vec<(usize, usize, &mut [f32])> = Vec::new();
    for (p, (buf, &(_, n))) in by_row.iter_mut().zip(shapes).enumerate() {
        for (i, chunk) in buf.chunks_mut((per_task * n).max(1)).enumerate() {
            tasks.push((p, i * per_task, chunk));
        }
    }
    tasks.into_par_iter().for_each(|(p, first, out)| {
        let n = shapes[p].1;
        for (j, row_out) in out.chunks_mut(n.max(1)).enumerate() {
            let mut t = 0;
            while t < n {
                let end = (t + TOKENS_PER_CALL).min(n);
                kernel(p, first + j, t..end, &mut row_out[t..end]);
                t = end;
            }
        }
    });
    by_row
}

/// `y[t, i] = by_row[i, t]`: a row-major product (`[rows, n]`) in token-major order.
fn token_major(by_row: &[f32], rows: usize, n: usize, y: &mut [f32]) {
    for i in 0..rows {
        for t in 0..n {
            y[t * rows + i] = by_row[i * n + t];
        }
    }
}

/// Output rows per f32 GEMM tile (its weights decoded to f32, transposed, once).
const DENSE_TILE_ROWS: usize = 64;
/// Tokens per f32 GEMM task.
const DENSE_TILE_TOKENS: usize = 128;

/// `y[t, i] = row(rows.start + i) · x[t]` for dense rows (BF16, FP8-block) and a batch of
/// tokens: each tile of rows is decoded once to f32 (`decode_row(row, out)` writes one
/// row of `cols` values) as columns and multiplied with blocks of tokens through the
/// register-blocked f32 product, which reads every weight once per block of tokens
/// instead of once per few tokens. The products are exact in f32 and summed in column
/// order.
fn dense_gemm(
    isa: Isa,
    rows: Range<usize>,
    cols: usize,
    decode_row: impl Fn(usize, &mut [f32]) + Sync,
    x: &[f32],
    y: &mut [f32],
) {
    use kernels_avx512::attention::gemm_acc;
    let n = x.len() / cols;
    let r = rows.len();
    let tiles: Vec<(usize, Vec<f32>)> = (rows.start..rows.end)
        .step_by(DENSE_TILE_ROWS)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|first| {
            let w = (rows.end - first).min(DENSE_TILE_ROWS);
            // [cols][w]: column j holds weight row first + j.
            let mut packed = vec![0.0f32; cols * w];
            let mut row = vec![0.0f32; cols];
            for j in 0..w {
                decode_row(first + j, &mut row);
                for (p, &v) in row.iter().enumerate() {
                    packed[p * w + j] = v;
                }
            }
            let mut out = vec![0.0f32; n * w];
            out.par_chunks_mut(DENSE_TILE_TOKENS * w)
                .zip(x.par_chunks(DENSE_TILE_TOKENS * cols))
                .for_each(|(o, xs)| {
                    gemm_acc(isa, (xs.len() / cols, w, cols), xs, cols, &packed, w, o, w);
                });
            (first - rows.start, out)
        })
        .collect();
    y[..n * r]
        .par_chunks_mut(r)
        .enumerate()
        .for_each(|(t, y_row)| {
            for (at, out) in &tiles {
                let w = out.len() / n.max(1);
                y_row[*at..at + w].copy_from_slice(&out[t * w..(t + 1) * w]);
            }
        });
}

thread_local! {
    /// The unpacked weight panels of the INT4 GEMMs (int16 and int8 activations), kept
    /// per worker thread.
    static PANEL: std::cell::RefCell<Option<kernels_avx512::int4_gemm::Panel>> =
        const { std::cell::RefCell::new(None) };
    static PANEL8: std::cell::RefCell<Option<kernels_avx512::int4_gemm8::Panel8>> =
        const { std::cell::RefCell::new(None) };
    /// The BF16 GEMM's panel (`cpu-int8`), kept per worker thread.
    static BF16_PANEL: std::cell::RefCell<Option<kernels_avx512::bf16_gemm::Bf16Panel>> =
        const { std::cell::RefCell::new(None) };
    /// The GEMM's quantized activations and output tiles, kept by the thread that calls
    /// it: at 512 tokens they are 11 MiB, whose fresh pages cost several percent of the
    /// product when allocated per call.
    static GEMM_SCRATCH: std::cell::RefCell<GemmScratch> =
        std::cell::RefCell::new(GemmScratch::default());
}

#[derive(Default)]
struct GemmScratch {
    tokens16: Option<kernels_avx512::int4_gemm::Q16Tokens>,
    tokens8: Option<kernels_avx512::int4_gemm8::Q8Tokens>,
    bf16_tokens: Option<kernels_avx512::bf16_gemm::Bf16Tokens>,
    tiles: Vec<f32>,
}

/// Runs `f` on the calling thread's GEMM scratch (a fresh one when a nested call on the
/// same thread holds it: rayon lets a waiting thread steal a task that calls the GEMM).
fn with_gemm_scratch<R>(f: impl FnOnce(&mut GemmScratch) -> R) -> R {
    GEMM_SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut GemmScratch::default()),
    })
}

/// `tiles` (`[panel][tokens][panel_rows]`, the panels in row order) gathered into `y`'s
/// token-major `[n][r]` order, tokens in parallel.
fn gather_panel_tiles(
    tiles: &[f32],
    (tile_len, panel_rows): (usize, usize),
    n: usize,
    r: usize,
    y: &mut [f32],
) {
    y[..n * r]
        .par_chunks_mut(r)
        .enumerate()
        .for_each(|(t, out)| {
            for (i, tile) in tiles.chunks_exact(tile_len).enumerate() {
                let first = i * panel_rows;
                let count = (r - first).min(panel_rows);
                out[first..first + count]
                    .copy_from_slice(&tile[t * panel_rows..t * panel_rows + count]);
            }
        });
}

/// `y[t, i] = row(rows.start + i) . x[t]` for BF16 rows with the tokens rounded to BF16
/// (`vdpbf16ps`, `cpu-int8` on CPUs with AVX-512 BF16): one 32-row panel per task,
/// copied pair-major once and used for every token.
fn bf16_dot_gemm(rows: Range<usize>, bytes: &[u8], cols: usize, x: &[f32], y: &mut [f32]) {
    use kernels_avx512::bf16_gemm::{
        bf16_panel_times_tokens, round_token, Bf16Panel, Bf16Tokens, PANEL_ROWS,
    };
    let n = x.len() / cols;
    let r = rows.len();
    with_gemm_scratch(|scratch| {
        let q = scratch
            .bf16_tokens
            .get_or_insert_with(|| Bf16Tokens::zeroed(n, cols));
        q.reshape(n, cols);
        q.pairs
            .par_chunks_mut(cols / 2)
            .zip(x.par_chunks(cols))
            .for_each(|(pairs, row)| round_token(row, pairs));
        let q = &*q;
        let tile_len = q.padded_tokens * PANEL_ROWS;
        let need = r.div_ceil(PANEL_ROWS) * tile_len;
        if scratch.tiles.len() < need {
            scratch.tiles.resize(need, 0.0);
        }
        let tiles = &mut scratch.tiles[..need];
        tiles
            .par_chunks_mut(tile_len)
            .enumerate()
            .for_each(|(i, tile)| {
                let first = rows.start + i * PANEL_ROWS;
                let count = (rows.end - first).min(PANEL_ROWS);
                BF16_PANEL.with(|cell| {
                    let mut slot = cell.borrow_mut();
                    let panel = match slot.as_mut() {
                        Some(p) if p.cols() == cols => p,
                        _ => slot.insert(Bf16Panel::new(cols)),
                    };
                    panel.fill(bytes, first, count);
                    bf16_panel_times_tokens(panel, q, tile);
                });
            });
        gather_panel_tiles(tiles, (tile_len, PANEL_ROWS), n, r, y);
    });
}

/// A batch of tokens quantized for one of the two INT4 GEMMs.
enum GemmTokens<'a> {
    /// int16 per 32 values (`cpu`): within rounding of the reference.
    Int16(&'a kernels_avx512::int4_gemm::Q16Tokens),
    /// int8 per 32 values (`cpu-int8`): twice the multiply rate, approximate.
    Int8(&'a kernels_avx512::int4_gemm8::Q8Tokens),
}

impl GemmTokens<'_> {
    fn padded_tokens(&self) -> usize {
        match self {
            GemmTokens::Int16(q) => q.padded_tokens,
            GemmTokens::Int8(q) => q.padded_tokens,
        }
    }

    /// Rows per panel of this GEMM.
    fn panel_rows(&self) -> usize {
        match self {
            GemmTokens::Int16(_) => kernels_avx512::int4_gemm::PANEL_ROWS,
            GemmTokens::Int8(_) => kernels_avx512::int4_gemm8::PANEL_ROWS,
        }
    }

    /// Unpacks rows `first..first + count` of `m` into this worker's panel and writes
    /// their products with every token to `tile` (`[padded tokens][panel rows]`); `upcoming`
    /// (the bytes this worker unpacks next) is asked into L2 meanwhile.
    fn panel_product(
        &self,
        m: &Int4Matrix,
        first: usize,
        count: usize,
        tile: &mut [f32],
        upcoming: &[&[u8]],
    ) {
        use kernels_avx512::{int4_gemm, int4_gemm8};
        let (packed, scales, cols) = (m.packed, m.scales, m.cols);
        // Each worker keeps its panel between calls (half a MiB at K2's widths).
        match self {
            GemmTokens::Int16(q) => PANEL.with(|cell| {
                let mut slot = cell.borrow_mut();
                let panel = match slot.as_mut() {
                    Some(p) if p.cols() == cols => p,
                    _ => slot.insert(int4_gemm::Panel::new(cols)),
                };
                panel.fill(packed, scales, cols, first, count);
                int4_gemm::panel_times_tokens(panel, q, tile, upcoming);
            }),
            GemmTokens::Int8(q) => PANEL8.with(|cell| {
                let mut slot = cell.borrow_mut();
                let panel = match slot.as_mut() {
                    Some(p) if p.cols() == cols => p,
                    _ => slot.insert(int4_gemm8::Panel8::new(cols)),
                };
                panel.fill(packed, scales, cols, first, count);
                int4_gemm8::panel8_times_tokens(panel, q, tile, upcoming);
            }),
        }
    }
}

/// `x` (`[n][cols]`) quantized for the INT4 GEMM of `activations` (int8 for `Int8`, else
/// int16) into the caller's reusable buffers, tokens in parallel.
fn quantize_for_gemm<'s>(
    activations: Activations,
    x: &[f32],
    cols: usize,
    tokens16: &'s mut Option<kernels_avx512::int4_gemm::Q16Tokens>,
    tokens8: &'s mut Option<kernels_avx512::int4_gemm8::Q8Tokens>,
) -> GemmTokens<'s> {
    use kernels_avx512::int4_gemm::{quantize_token, Q16Tokens};
    use kernels_avx512::int4_gemm8::{quantize_token8, Q8Tokens};
    let n = x.len() / cols;
    if activations == Activations::Int8 {
        let q = tokens8.get_or_insert_with(|| Q8Tokens::zeroed(n, cols));
        q.reshape(n, cols);
        q.values
            .par_chunks_mut(cols)
            .zip(q.scales.par_chunks_mut(cols / 32))
            .zip(q.offsets.par_chunks_mut(cols / 32))
            .zip(x.par_chunks(cols))
            .for_each(|(((values, scales), offsets), row)| {
                quantize_token8(row, values, scales, offsets)
            });
        GemmTokens::Int8(&*q)
    } else {
        let q = tokens16.get_or_insert_with(|| Q16Tokens::zeroed(n, cols));
        q.reshape(n, cols);
        q.values
            .par_chunks_mut(cols)
            .zip(q.scales.par_chunks_mut(cols / 32))
            .zip(x.par_chunks(cols))
            .for_each(|((values, scales), row)| quantize_token(row, values, scales));
        GemmTokens::Int16(&*q)
    }
}

/// `y[t, i] = row(rows.start + i) . x[t]` through the tiled INT4 GEMM of `activations`
/// (int16 unless `Int8`): one panel of rows (32 for int16, 64 for int8) per task,
/// unpacked once and used for every token.
fn int4_gemm(
    activations: Activations,
    rows: Range<usize>,
    m: &Int4Matrix,
    x: &[f32],
    y: &mut [f32],
) {
    let n = x.len() / m.cols;
    let r = rows.len();
    with_gemm_scratch(|scratch| {
        let GemmScratch {
            tokens16,
            tokens8,
            tiles,
            ..
        } = scratch;
        let q = quantize_for_gemm(activations, x, m.cols, tokens16, tokens8);
        // One output tile per panel, [panel][padded tokens][panel rows], written in
        // parallel (each tile is overwritten whole, so the reused buffer needs no clearing).
        let panel_rows = q.panel_rows();
        let tile_len = q.padded_tokens() * panel_rows;
        let need = r.div_ceil(panel_rows) * tile_len;
        if tiles.len() < need {
            tiles.resize(need, 0.0);
        }
        let tiles = &mut tiles[..need];
        tiles
            .par_chunks_mut(tile_len)
            .enumerate()
            .for_each(|(i, tile)| {
                let first = rows.start + i * panel_rows;
                let count = (rows.end - first).min(panel_rows);
                // This worker's next panel is most often the following rows.
                let upcoming = m.panel_bytes(first + count, panel_rows);
                q.panel_product(m, first, count, tile, &upcoming);
            });
        gather_panel_tiles(tiles, (tile_len, panel_rows), n, r, y);
    });
}

/// The expert's `silu(gate . x) * (up . x)` for a GEMM-sized batch (`x` is `[n][hidden]`),
/// token-major `[n][inter]`: the tokens are quantized once for both matrices, and each
/// task unpacks the same panel of rows of gate and of up and multiplies both with every token,
/// applying the activation to its own tile (one pass over the activations and one
/// parallel region, where gate and up composed take two of each and write both products
/// out). The same integers and f32 operations as the composed form, so the same numbers.
fn gate_up_gemm(
    activations: Activations,
    gate: &Int4Matrix,
    up: &Int4Matrix,
    x: &[f32],
) -> Vec<f32> {
    let (n, inter) = (x.len() / gate.cols, gate.rows);
    let mut h = vec![0.0f32; n * inter];
    with_gemm_scratch(|scratch| {
        let GemmScratch {
            tokens16,
            tokens8,
            tiles,
            ..
        } = scratch;
        let q = quantize_for_gemm(activations, x, gate.cols, tokens16, tokens8);
        let panel_rows = q.panel_rows();
        let tile_len = q.padded_tokens() * panel_rows;
        let need = inter.div_ceil(panel_rows) * tile_len;
        if tiles.len() < 2 * need {
            tiles.resize(2 * need, 0.0);
        }
        let (gate_tiles, up_tiles) = tiles[..2 * need].split_at_mut(need);
        gate_tiles
            .par_chunks_mut(tile_len)
            .zip(up_tiles.par_chunks_mut(tile_len))
            .enumerate()
            .for_each(|(i, (g, u))| {
                let first = i * panel_rows;
                let count = (inter - first).min(panel_rows);
                // While gate computes, up's same rows are fetched; while up computes,
                // gate's next rows.
                q.panel_product(gate, first, count, g, &up.panel_bytes(first, count));
                let next = gate.panel_bytes(first + count, panel_rows);
                q.panel_product(up, first, count, u, &next);
                for (g, u) in g.iter_mut().zip(u.iter()) {
                    *g = super::kernels::silu(*g) * u;
                }
            });
        gather_panel_tiles(gate_tiles, (tile_len, panel_rows), n, inter, &mut h);
    });
    h
}

impl CpuKernels for CpuBackend {
    fn name(&self) -> &'static str {
        match self.activations {
            Activations::F32 => "cpu-f32",
            Activations::Int16 => "cpu",
            Activations::Int8 => "cpu-int8",
        }
    }

    fn linear(&self, w: &LinearWeight, rows: Range<usize>, x: &[f32], y: &mut [f32]) {
        self.on_pool(|| self.linear_here(w, rows, x, y))
    }

    /// BF16 rows are folded into the output in place, a weight row at a time (one vector
    /// multiply-add per 16 values, no decoded copy); on the calling thread, since absorbed
    /// MLA calls it once per head from a region that is already parallel over heads.
    fn linear_transposed(&self, w: &LinearWeight, rows: Range<usize>, x: &[f32], y: &mut [f32]) {
        let LinearWeight::Dense {
            dtype: DenseDtype::Bf16,
            data,
            cols,
            ..
        } = w
        else {
            return ReferenceBackend.linear_transposed(w, rows, x, y);
        };
        let (bytes, cols, r) = (data.bytes(), *cols, rows.len());
        y.fill(0.0);
        for (xt, yt) in x.chunks_exact(r.max(1)).zip(y.chunks_exact_mut(cols)) {
            for (i, row) in rows.clone().enumerate() {
                let weight = &bytes[row * cols * 2..(row + 1) * cols * 2];
                kernels_avx512::bf16::axpy_row(self.isa, weight, xt[i], yt);
            }
        }
    }

    fn ffn_contributions(&self, ffn: &FfnWeights, x: &[f32], tokens: &[(usize, f32)]) -> Vec<f32> {
        if let Some(c) = self.ffn_fused(ffn, x, tokens) {
            return c;
        }
        if let Some(c) = self.on_pool(|| self.ffn_gemm(ffn, x, tokens)) {
            return c;
        }
        super::kernels::ffn_composed(self, ffn, x, tokens)
    }

    fn ffn_accumulate(
        &self,
        ffn: &FfnWeights,
        x: &[f32],
        tokens: &[(usize, f32)],
        out: &mut [f32],
    ) {
        self.on_node(ffn.numa_node, || {
            super::kernels::ffn_accumulate_with(self, ffn, x, tokens, out)
        })
    }

    fn tiled_attention(&self) -> Option<Isa> {
        Some(self.isa)
    }

    fn install(&self, work: &mut (dyn FnMut() + Send)) {
        self.on_pool(work)
    }

    /// Few tokens: experts one after another, each split by rows over all threads (every
    /// expert's weights are read once, by all cores). Many tokens: experts concurrently,
    /// each on its node's pool, outputs added in expert order.
    fn moe_accumulate(&self, work: &[(&FfnWeights, &[(usize, f32)])], x: &[f32], out: &mut [f32]) {
        let visits: usize = work.iter().map(|(_, t)| t.len()).sum();
        if visits < PARALLEL_EXPERTS_MIN_VISITS || work.len() < 2 {
            // All the layer's experts in two parallel regions, on their node's threads
            // when they share one.
            let node = work.first().and_then(|(f, _)| f.numa_node);
            if work.iter().all(|(f, _)| f.numa_node == node) {
                if let Some(parts) = self.on_node(node, || self.experts_fused(work, x)) {
                    super::kernels::add_in_order(work, parts.into_iter().map(Some), out);
                    return;
                }
            }
            for (ffn, tokens) in work {
                self.ffn_accumulate(ffn, x, tokens, out);
            }
            return;
        }
        let parts: Vec<Vec<f32>> = self.on_pool(|| {
            work.par_iter()
                .map(|(ffn, tokens)| {
                    self.on_node(ffn.numa_node, || self.ffn_contributions(ffn, x, tokens))
                })
                .collect()
        });
        super::kernels::add_in_order(work, parts.into_iter().map(Some), out);
    }

    fn attention(
        &self,
        q: &[f32],
        k: KvView,
        v: KvView,
        shape: AttentionShape,
        positions: &[usize],
        scale: f32,
        out: &mut [f32],
    ) {
        // The reference's algorithm with vector dot products and weighted sums.
        let isa = self.isa;
        self.on_pool(|| {
            super::kernels::attention_with(
                q,
                k,
                v,
                shape,
                positions,
                scale,
                out,
                |a, b| f32ops::dot(isa, a, b),
                |alpha, x, y| f32ops::axpy(isa, alpha, x, y),
            )
        })
    }
}

/// An INT4 group-32 matrix's bytes, row by row.
struct Int4Matrix<'a> {
    packed: &'a [u8],
    scales: &'a [u8],
    rows: usize,
    cols: usize,
}

impl<'a> Int4Matrix<'a> {
    fn of(w: &'a LinearWeight) -> Option<Self> {
        match w {
            LinearWeight::Int4 {
                packed,
                scales,
                rows,
                cols,
                group: 32,
            } => Some(Int4Matrix {
                packed: packed.bytes(),
                scales: scales.bytes(),
                rows: *rows,
                cols: *cols,
            }),
            _ => None,
        }
    }

    /// The packed values and scales of rows `first..first + count` (clipped to the
    /// matrix; empty past its end): two contiguous ranges.
    fn panel_bytes(&self, first: usize, count: usize) -> [&'a [u8]; 2] {
        let rows = first.min(self.rows)..(first + count).min(self.rows);
        let (pw, sw) = (self.cols / 2, self.cols / 32 * 2);
        [
            &self.packed[rows.start * pw..rows.end * pw],
            &self.scales[rows.start * sw..rows.end * sw],
        ]
    }

    /// Row `r`'s packed values and BF16 scales.
    fn row(&self, r: usize) -> (&'a [u8], &'a [u8]) {
        let (pw, sw) = (self.cols / 2, self.cols / 32 * 2);
        (
            &self.packed[r * pw..(r + 1) * pw],
            &self.scales[r * sw..(r + 1) * sw],
        )
    }
}

/// Tokens' activations prepared once (not once per row) for this backend's INT4 row
/// kernel.
enum Prepared<'a> {
    F32(Vec<&'a [f32]>),
    Int16(Vec<Q16Activations>),
    Int8(Vec<Q8Activations>),
}

/// `f` on references to `items` (at most [`TOKENS_PER_CALL`]), without allocating.
fn with_refs<T, R>(items: &[T], f: impl FnOnce(&[&T]) -> R) -> R {
    let Some(first) = items.first() else {
        return f(&[]);
    };
    let mut refs = [first; TOKENS_PER_CALL];
    for (r, item) in refs.iter_mut().zip(items) {
        *r = item;
    }
    f(&refs[..items.len().min(TOKENS_PER_CALL)])
}

impl<'a> Prepared<'a> {
    /// `x` is `[n, cols]`.
    fn new(activations: Activations, x: &'a [f32], cols: usize) -> Self {
        match activations {
            Activations::F32 => Prepared::F32(x.chunks_exact(cols).collect()),
            Activations::Int16 => {
                Prepared::Int16(x.chunks_exact(cols).map(Q16Activations::new).collect())
            }
            Activations::Int8 => {
                Prepared::Int8(x.chunks_exact(cols).map(Q8Activations::new).collect())
            }
        }
    }

    /// `out[i] = row . x[tokens.start + i]` for one packed row (at most
    /// [`TOKENS_PER_CALL`] tokens).
    fn dot(&self, isa: Isa, row: (&[u8], &[u8]), tokens: Range<usize>, out: &mut [f32]) {
        let (p, s) = row;
        match self {
            Prepared::F32(xs) => kernels_avx512::int4::dot_row_f32(isa, p, s, &xs[tokens], out),
            Prepared::Int16(q) => with_refs(&q[tokens], |xs| {
                kernels_avx512::int4_i16::dot_row(isa, p, s, xs, out)
            }),
            Prepared::Int8(q) => with_refs(&q[tokens], |xs| {
                kernels_avx512::int4::dot_row(isa, p, s, xs, out)
            }),
        }
    }
}

impl CpuBackend {
    /// Whether INT4 products over `n` tokens take the tiled GEMM (else the row kernels).
    fn batched(&self, n: usize) -> bool {
        n >= GEMM_MIN_TOKENS && self.isa == Isa::Avx512Vnni && self.activations != Activations::F32
    }

    /// The fused INT4 expert FFN for decode-sized batches (those the row kernels take):
    /// see [`Self::experts_fused`]. `None` where it does not apply (other formats,
    /// batches for the GEMM).
    fn ffn_fused(&self, ffn: &FfnWeights, x: &[f32], tokens: &[(usize, f32)]) -> Option<Vec<f32>> {
        self.experts_fused(&[(ffn, tokens)], x)
            .and_then(|mut v| v.pop())
    }

    /// Several INT4 expert FFNs at decode-sized batches, fused: each expert's tokens are
    /// quantized once for gate and up; one parallel region computes `silu(gate . x) *
    /// (up . x)` row by row for every expert at once (both matrices streamed together),
    /// one more the down projections; then each token's output is weighted. The same
    /// kernels on the same quantized values as the composed form, so the same numbers,
    /// with two synchronisations per layer instead of three per expert. `None` where it
    /// does not apply (a format other than INT4 group 32, mismatched shapes, an empty or
    /// GEMM-sized batch).
    fn experts_fused(
        &self,
        work: &[(&FfnWeights, &[(usize, f32)])],
        x: &[f32],
    ) -> Option<Vec<Vec<f32>>> {
        struct Job<'a> {
            gate: Int4Matrix<'a>,
            up: Int4Matrix<'a>,
            down: Int4Matrix<'a>,
            tokens: &'a [(usize, f32)],
            xs: Vec<f32>,
        }
        let mut jobs = Vec::with_capacity(work.len());
        for &(ffn, tokens) in work {
            let (gate, up, down) = (
                Int4Matrix::of(&ffn.gate)?,
                Int4Matrix::of(&ffn.up)?,
                Int4Matrix::of(&ffn.down)?,
            );
            let (m, hidden, inter) = (tokens.len(), gate.cols, gate.rows);
            let shapes_agree =
                up.rows == inter && up.cols == hidden && down.rows == hidden && down.cols == inter;
            if m == 0 || self.batched(m) || !shapes_agree {
                return None;
            }
            jobs.push(Job {
                gate,
                up,
                down,
                tokens,
                xs: super::kernels::gather_rows(x, tokens, hidden),
            });
        }
        let (isa, act) = (self.isa, self.activations);
        Some(self.on_pool(|| {
            let prepared: Vec<Prepared> = jobs
                .iter()
                .map(|j| Prepared::new(act, &j.xs, j.gate.cols))
                .collect();
            let shapes: Vec<(usize, usize)> =
                jobs.iter().map(|j| (j.gate.rows, j.tokens.len())).collect();
            let h_by_row = rows_parallel_many(&shapes, |e, row, t, out| {
                let mut u = [0.0f32; TOKENS_PER_CALL];
                let u = &mut u[..out.len()];
                prepared[e].dot(isa, jobs[e].gate.row(row), t.clone(), out);
                prepared[e].dot(isa, jobs[e].up.row(row), t, u);
                for (g, u) in out.iter_mut().zip(u.iter()) {
                    *g = super::kernels::silu(*g) * u;
                }
            });
            let h: Vec<Vec<f32>> = h_by_row
                .iter()
                .zip(&shapes)
                .map(|(b, &(r, n))| {
                    let mut h = vec![0.0f32; r * n];
                    token_major(b, r, n, &mut h);
                    h
                })
                .collect();
            let prepared: Vec<Prepared> = jobs
                .iter()
                .zip(&h)
                .map(|(j, h)| Prepared::new(act, h, j.down.cols))
                .collect();
            let shapes: Vec<(usize, usize)> =
                jobs.iter().map(|j| (j.down.rows, j.tokens.len())).collect();
            let d_by_row = rows_parallel_many(&shapes, |e, row, t, out| {
                prepared[e].dot(isa, jobs[e].down.row(row), t, out)
            });
            jobs.iter()
                .zip(&d_by_row)
                .map(|(j, b)| {
                    let (r, n) = (j.down.rows, j.tokens.len());
                    let mut d = vec![0.0f32; r * n];
                    token_major(b, r, n, &mut d);
                    super::kernels::weight_rows(&mut d, j.tokens);
                    d
                })
                .collect()
        }))
    }

    /// The INT4 expert FFN for GEMM-sized batches: gate and up fused
    /// ([`gate_up_gemm`]), then down through the GEMM; the composed form's numbers.
    /// `None` where it does not apply (other formats, mismatched shapes, batches for the
    /// row kernels).
    fn ffn_gemm(&self, ffn: &FfnWeights, x: &[f32], tokens: &[(usize, f32)]) -> Option<Vec<f32>> {
        let (gate, up, down) = (
            Int4Matrix::of(&ffn.gate)?,
            Int4Matrix::of(&ffn.up)?,
            Int4Matrix::of(&ffn.down)?,
        );
        let (hidden, inter) = (gate.cols, gate.rows);
        let shapes_agree =
            up.rows == inter && up.cols == hidden && down.rows == hidden && down.cols == inter;
        if !self.batched(tokens.len()) || !shapes_agree {
            return None;
        }
        let xs = super::kernels::gather_rows(x, tokens, hidden);
        let h = gate_up_gemm(self.activations, &gate, &up, &xs);
        let mut d = vec![0.0f32; tokens.len() * hidden];
        int4_gemm(self.activations, 0..hidden, &down, &h, &mut d);
        super::kernels::weight_rows(&mut d, tokens);
        Some(d)
    }

    /// `linear` on the current thread pool.
    fn linear_here(&self, w: &LinearWeight, rows: Range<usize>, x: &[f32], y: &mut [f32]) {
        if let Some(m) = Int4Matrix::of(w) {
            let n = x.len() / m.cols;
            if self.batched(n) {
                // Batches of tokens take the tiled GEMM of the backend's activations: it
                // is several times faster than the row kernels there.
                int4_gemm(self.activations, rows, &m, x, y);
            } else {
                let prepared = Prepared::new(self.activations, x, m.cols);
                rows_parallel(rows, n, y, |row, tokens, out| {
                    prepared.dot(self.isa, m.row(row), tokens, out)
                });
            }
            return;
        }
        match w {
            LinearWeight::Dense {
                dtype: DenseDtype::Bf16,
                data,
                cols,
                ..
            } => {
                let n = x.len() / cols;
                let bytes = data.bytes();
                let pairs_gemm = self.activations == Activations::Int8
                    && self.isa == Isa::Avx512Vnni
                    && cols.is_multiple_of(2)
                    && kernels_avx512::bf16_gemm::fast_path_available();
                if pairs_gemm && n >= GEMM_MIN_TOKENS {
                    bf16_dot_gemm(rows, bytes, *cols, x, y);
                    return;
                }
                if !pairs_gemm && n >= F32_GEMM_MIN_TOKENS {
                    let width = cols * 2;
                    let decode = |row: usize, out: &mut [f32]| {
                        kernels_avx512::scalar::decode_bf16(
                            &bytes[row * width..(row + 1) * width],
                            out,
                        )
                    };
                    dense_gemm(self.isa, rows, *cols, decode, x, y);
                    return;
                }
                let width = cols * 2;
                let xs: Vec<&[f32]> = x.chunks_exact(*cols).collect();
                rows_parallel(rows, n, y, |row, tokens, out| {
                    kernels_avx512::bf16::dot_row(
                        self.isa,
                        &bytes[row * width..(row + 1) * width],
                        &xs[tokens],
                        out,
                    );
                });
            }
            LinearWeight::Fp8 { cols, .. } => {
                let n = x.len() / cols;
                if n >= F32_GEMM_MIN_TOKENS {
                    let decode = |row: usize, out: &mut [f32]| match w.fp8_row(row) {
                        Some((bytes, scale_inv_row, block_cols)) => {
                            kernels_avx512::fp8::decode_row(
                                self.isa,
                                bytes,
                                scale_inv_row,
                                block_cols,
                                out,
                            )
                        }
                        None => out.fill(0.0),
                    };
                    dense_gemm(self.isa, rows, *cols, decode, x, y);
                    return;
                }
                let xs: Vec<&[f32]> = x.chunks_exact(*cols).collect();
                rows_parallel(rows, n, y, |row, tokens, out| {
                    if let Some((bytes, scale_inv_row, block_cols)) = w.fp8_row(row) {
                        kernels_avx512::fp8::dot_row(
                            self.isa,
                            bytes,
                            scale_inv_row,
                            block_cols,
                            &xs[tokens],
                            out,
                        );
                    }
                });
            }
            _ => ReferenceBackend.linear(w, rows, x, y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::TensorData;
    use memmap2::MmapMut;
    use std::sync::Arc;

    fn map_of(bytes: &[u8]) -> Arc<memmap2::Mmap> {
        let mut m = MmapMut::map_anon(bytes.len()).unwrap();
        m.copy_from_slice(bytes);
        Arc::new(m.make_read_only().unwrap())
    }

    fn pseudo(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect()
    }

    fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
        let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        let den: f32 = b.iter().map(|y| y * y).sum();
        (num / den.max(1e-30)).sqrt()
    }

    /// INT4 and BF16 weights with odd row counts, K a multiple of 32 but not of 256, and
    /// 1, 8, 9 and 20 tokens: every path against the reference backend, per output row.
    #[test]
    fn every_path_matches_the_reference_on_odd_shapes() {
        for (rows, cols) in [(37, 96), (5, 224), (130, 2048), (16, 32)] {
            let packed = map_of(&pseudo(rows * cols / 2, 1));
            let scale_bytes: Vec<u8> = (0..rows * cols / 32)
                .flat_map(|i| (0x3c00u16 + (i % 64) as u16).to_le_bytes())
                .collect();
            let scales = map_of(&scale_bytes);
            let int4 = LinearWeight::Int4 {
                packed: TensorData::new(packed.clone(), 0, rows * cols / 2).unwrap(),
                scales: TensorData::new(scales.clone(), 0, rows * cols / 32 * 2).unwrap(),
                rows,
                cols,
                group: 32,
            };
            let bf16_bytes: Vec<u8> = pseudo(rows * cols * 2, 2)
                .chunks(2)
                .flat_map(|c| (0x3800u16 | (c[0] as u16 & 0x83ff)).to_le_bytes())
                .collect();
            let bf16_map = map_of(&bf16_bytes);
            let bf16 = LinearWeight::Dense {
                dtype: DenseDtype::Bf16,
                data: TensorData::new(bf16_map, 0, rows * cols * 2).unwrap(),
                rows,
                cols,
            };
            let fp8_bytes: Vec<u8> = pseudo(rows * cols, 4)
                .iter()
                .map(|&b| if b & 0x7f == 0x7f { 0x30 } else { b })
                .collect();
            let fp8_scales: Vec<u8> = (0..rows.div_ceil(16) * cols.div_ceil(32))
                .flat_map(|i| (0.01f32 * (1 + i % 5) as f32).to_le_bytes())
                .collect();
            let fp8 = LinearWeight::Fp8 {
                data: TensorData::new(map_of(&fp8_bytes), 0, rows * cols).unwrap(),
                scale_inv: TensorData::new(map_of(&fp8_scales), 0, fp8_scales.len()).unwrap(),
                rows,
                cols,
                block: [16, 32],
            };
            for n in [1, 8, 9, 20, 33] {
                let x: Vec<f32> = pseudo(n * cols, 3)
                    .iter()
                    .map(|&b| b as f32 / 128.0 - 1.0)
                    .collect();
                for w in [&int4, &bf16, &fp8] {
                    let mut want = vec![0.0; n * rows];
                    ReferenceBackend.linear(w, 0..rows, &x, &mut want);
                    for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
                        for (acts, bound) in [
                            (Activations::F32, 2e-3),
                            (Activations::Int16, 2e-3),
                            (Activations::Int8, 1e-2),
                        ] {
                            let mut got = vec![0.0; n * rows];
                            CpuBackend::new(isa, acts).linear(w, 0..rows, &x, &mut got);
                            for t in 0..n {
                                let err = rel_l2(
                                    &got[t * rows..(t + 1) * rows],
                                    &want[t * rows..(t + 1) * rows],
                                );
                                assert!(
                                    err <= bound,
                                    "{} {isa:?} {acts:?} rows {rows} cols {cols} tokens {n}: {err}",
                                    w.format_name()
                                );
                            }
                        }
                    }
                }
                // The transposed product over a band of BF16 rows (absorbed MLA's query
                // fold), `n` inputs of the band's width, on every path.
                let band = rows / 3..rows - rows / 4;
                let xb: Vec<f32> = x[..n * band.len()].to_vec();
                let mut want = vec![0.0; n * cols];
                ReferenceBackend.linear_transposed(&bf16, band.clone(), &xb, &mut want);
                for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
                    let mut got = vec![1.0; n * cols];
                    CpuBackend::new(isa, Activations::Int16).linear_transposed(
                        &bf16,
                        band.clone(),
                        &xb,
                        &mut got,
                    );
                    assert!(
                        rel_l2(&got, &want) <= 1e-6,
                        "transposed BF16 {isa:?} rows {rows} cols {cols} tokens {n}"
                    );
                }
                // A band of rows in the middle (as absorbed MLA asks for).
                let band = rows / 3..rows - rows / 4;
                let mut want = vec![0.0; n * band.len()];
                ReferenceBackend.linear(&int4, band.clone(), &x, &mut want);
                let mut got = vec![0.0; n * band.len()];
                CpuBackend::new(Isa::detect(), Activations::Int16)
                    .linear(&int4, band, &x, &mut got);
                assert!(rel_l2(&got, &want) <= 2e-3);
            }
        }
    }

    fn int4_matrix(rows: usize, cols: usize, seed: u64) -> LinearWeight {
        let packed = map_of(&pseudo(rows * cols / 2, seed));
        let scale_bytes: Vec<u8> = (0..rows * cols / 32)
            .flat_map(|i| (0x3c00u16 + ((i as u64 * seed) % 64) as u16).to_le_bytes())
            .collect();
        LinearWeight::Int4 {
            packed: TensorData::new(packed, 0, rows * cols / 2).unwrap(),
            scales: TensorData::new(map_of(&scale_bytes), 0, rows * cols / 32 * 2).unwrap(),
            rows,
            cols,
            group: 32,
        }
    }

    /// The fused expert FFN computes exactly what gate, up, SiLU and down composed from
    /// `linear` compute, on every ISA and activation type, for every batch it takes.
    #[test]
    fn fused_ffn_equals_the_composed_one() {
        let (hidden, inter) = (96, 160);
        let ffn = FfnWeights {
            gate: int4_matrix(inter, hidden, 3),
            up: int4_matrix(inter, hidden, 5),
            down: int4_matrix(hidden, inter, 7),
            numa_node: None,
            expert: None,
            gpu: None,
        };
        let x: Vec<f32> = pseudo(10 * hidden, 11)
            .iter()
            .map(|&b| (b as f32 - 127.5) / 64.0)
            .collect();
        for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
            for act in [Activations::F32, Activations::Int16, Activations::Int8] {
                let b = CpuBackend::new(isa, act);
                for tokens in [
                    vec![(3, 1.0)],
                    vec![(0, 0.5), (9, 0.25), (4, 2.0)],
                    (0..9).map(|t| (t, 0.1 * t as f32)).collect(),
                ] {
                    let composed = super::super::kernels::ffn_composed(&b, &ffn, &x, &tokens);
                    let gemm_sized = tokens.len() >= GEMM_MIN_TOKENS
                        && isa == Isa::Avx512Vnni
                        && act != Activations::F32;
                    // Row-kernel batches take the fused row form, GEMM batches the fused
                    // gate-up GEMM: exactly one applies, with the composed numbers.
                    match (
                        b.ffn_fused(&ffn, &x, &tokens),
                        b.ffn_gemm(&ffn, &x, &tokens),
                    ) {
                        (Some(fused), None) if !gemm_sized => {
                            assert_eq!(fused, composed, "{isa:?} {act:?} {}", tokens.len())
                        }
                        (None, Some(fused)) if gemm_sized => {
                            assert_eq!(fused, composed, "{isa:?} {act:?} {}", tokens.len())
                        }
                        _ => panic!("{isa:?} {act:?} {}: wrong form", tokens.len()),
                    }
                    assert_eq!(b.ffn_contributions(&ffn, &x, &tokens), composed);
                }
                // A layer's experts fused into two parallel regions: the same sums as
                // each expert composed and added in order.
                let second = FfnWeights {
                    gate: int4_matrix(inter, hidden, 13),
                    up: int4_matrix(inter, hidden, 17),
                    down: int4_matrix(hidden, inter, 19),
                    ..ffn.clone()
                };
                let (t1, t2) = (vec![(0, 0.7), (2, 0.1)], vec![(2, 0.3)]);
                let work: Vec<(&FfnWeights, &[(usize, f32)])> = vec![(&ffn, &t1), (&second, &t2)];
                let mut want = vec![0.0f32; 10 * hidden];
                for (f, t) in &work {
                    let c = super::super::kernels::ffn_composed(&b, f, &x, t);
                    super::super::kernels::scatter_add(&c, t, &mut want);
                }
                let mut got = vec![0.0f32; 10 * hidden];
                b.moe_accumulate(&work, &x, &mut got);
                assert_eq!(got, want, "{isa:?} {act:?} layer");
            }
        }
    }
}
