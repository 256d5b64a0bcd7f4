//! The CPU as a device: the forward pass's device operations on host vectors, computed
//! by a CPU backend's kernels ([`CpuDevice::new`]); also a stand-in for a GPU that attends
//! as the CUDA device does ([`CpuDevice::stand_in`]), which the GPU's pass is compared
//! with and `--simulate-gpus` runs plans on. Its kernel sets ([`kernels::CpuKernels`]:
//! the fast ones in `fast`, the scalar reference in `reference`) and their thread pools
//! ([`pool`]) live beside it.

pub mod attention;
mod fast;
pub mod kernels;
pub mod pool;
mod reference;

use super::{
    route_on_host, DeviceOps, DeviceResult, DeviceRope, MlaDims, QueryBlocks, RopeLayout, Work,
};
use crate::config::ModelConfig;
use crate::device::cpu::kernels::{AttentionShape, CpuKernels, FfnWeights, KvView};
use crate::model::AttentionForm;
use crate::weights::LinearWeight;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Time every CPU device of this process has spent in attention (`mla_attention`, all
/// forms, kv_b's expansions included), for `bench`'s attention share.
static ATTENTION_NANOS: AtomicU64 = AtomicU64::new(0);

/// See [`ATTENTION_NANOS`].
pub fn attention_time() -> std::time::Duration {
    std::time::Duration::from_nanos(ATTENTION_NANOS.load(Ordering::Relaxed))
}

/// A latent cache pool on the host: BF16 pools hold values rounded to BF16 (the numbers
/// a BF16 store reads back).
pub struct CpuPool {
    pub values: Vec<f32>,
    pub bf16: bool,
}

pub struct CpuDevice {
    backend: Arc<dyn CpuKernels>,
    log: Mutex<DeviceLog>,
    /// Whether the pass treats this device as one that records (see
    /// [`DeviceOps::records`]): it then runs its fixed-buffer decode schedule here.
    records: bool,
    /// Whether it computes the naive MLA form when asked (the CPU device); a stand-in
    /// for a GPU computes every form absorbed, as the CUDA device does.
    naive: bool,
}

/// What a CPU device computed: tests check that work ran where the plan put it.
#[derive(Debug, Clone, Default)]
pub struct DeviceLog {
    /// Attention queries (one per token of a pass on this device).
    pub queries: usize,
    /// Attention heads computed, summed over queries.
    pub query_heads: usize,
    /// Routed experts computed, as (layer, expert).
    pub experts: Vec<(usize, usize)>,
    /// Pieces of work handed to [`DeviceOps::replay`], by key.
    pub replays: Vec<super::ReplayKey>,
}

impl CpuDevice {
    /// The CPU as the pass's device, computing with `backend`'s kernels: the naive MLA
    /// form for a sequence's several new tokens, absorbed for one (see [`AttentionForm`]).
    pub fn new(backend: Arc<dyn CpuKernels>) -> Self {
        CpuDevice {
            naive: true,
            ..CpuDevice::stand_in(backend)
        }
    }

    /// A stand-in for a GPU (`--simulate-gpus`, tests): the CPU kernels, attending as the
    /// CUDA device does (absorbed for every token).
    pub fn stand_in(backend: Arc<dyn CpuKernels>) -> Self {
        CpuDevice {
            backend,
            log: Mutex::new(DeviceLog::default()),
            records: false,
            naive: false,
        }
    }

    /// A stand-in the pass drives as a recording device (fixed decode buffers, each
    /// layer's attention through [`DeviceOps::replay`]), which runs every piece of work as
    /// it is.
    pub fn recording(backend: Arc<dyn CpuKernels>) -> Self {
        CpuDevice {
            records: true,
            ..CpuDevice::stand_in(backend)
        }
    }

    pub fn log(&self) -> DeviceLog {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn record(&self, f: impl FnOnce(&mut DeviceLog)) {
        f(&mut self.log.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

impl CpuDevice {
    /// Rows `rows` of a table of `width` ints per row.
    fn take_ints(&self, x: &[i32], rows: &[usize], width: usize) -> Vec<i32> {
        rows.iter()
            .flat_map(|&r| x[r * width..(r + 1) * width].iter().copied())
            .collect()
    }

    /// The latents of positions `0..len` read through one block table, `[len, width]`.
    fn gather_latents(
        &self,
        pool: &CpuPool,
        table: &[i32],
        bs: usize,
        len: usize,
        width: usize,
    ) -> Vec<f32> {
        let mut latents = Vec::with_capacity(len * width);
        for pos in 0..len {
            let at = (table[pos / bs] as usize * bs + pos % bs) * width;
            latents.extend_from_slice(&pool.values[at..at + width]);
        }
        latents
    }

    /// The naive MLA form for the queries `rows` of one sequence: its cached latents
    /// expanded through `kv_b` into per-head keys `[nope | rope]` and values, attended
    /// causally; written to `out`'s rows `[heads, v]`.
    #[allow(clippy::too_many_arguments)]
    fn naive_mla(
        &self,
        kv_b: &LinearWeight,
        q: &[f32],
        pool: &CpuPool,
        blocks: &QueryBlocks<Vec<i32>>,
        rows: Range<usize>,
        d: MlaDims,
        scale: f32,
        out: &mut [f32],
    ) {
        if rows.is_empty() {
            return;
        }
        self.record(|l| {
            l.queries += rows.len();
            l.query_heads += rows.len() * d.heads;
        });
        let (width, heads, c) = (d.width(), d.heads, d.latent);
        let (dn, dq, kv_b_rows) = (d.nope, d.qk(), d.kv_b_rows());
        // Every query of a sequence reads the same table; the last reaches furthest.
        let total = blocks.lens[rows.end - 1] as usize;
        let table =
            &blocks.tables[rows.start * blocks.max_blocks..(rows.start + 1) * blocks.max_blocks];
        let positions: Vec<usize> = rows.clone().map(|i| blocks.lens[i] as usize - 1).collect();
        if let Some(isa) = self.backend.tiled_attention() {
            let latents = attention::Latents {
                pool: &pool.values,
                table,
                block_size: blocks.block_size,
                width,
            };
            let q = &q[rows.start * heads * dq..rows.end * heads * dq];
            let out = &mut out[rows.start * heads * d.v..rows.end * heads * d.v];
            let backend = self.backend.as_ref();
            self.backend.install(&mut || {
                attention::naive(backend, isa, kv_b, q, &positions, latents, d, scale, out)
            });
            return;
        }
        let latents = self.gather_latents(pool, table, blocks.block_size, total, width);
        let mut c_kv = Vec::with_capacity(total * c);
        for t in 0..total {
            c_kv.extend_from_slice(&latents[t * width..t * width + c]);
        }
        let mut expanded = vec![0.0f32; total * heads * kv_b_rows];
        self.backend
            .linear(kv_b, 0..heads * kv_b_rows, &c_kv, &mut expanded);
        let mut keys = vec![0.0f32; total * heads * dq];
        for t in 0..total {
            for h in 0..heads {
                let src = (t * heads + h) * kv_b_rows;
                let dst = (t * heads + h) * dq;
                keys[dst..dst + dn].copy_from_slice(&expanded[src..src + dn]);
                keys[dst + dn..dst + dq].copy_from_slice(&latents[t * width + c..(t + 1) * width]);
            }
        }
        self.backend.attention(
            &q[rows.start * heads * dq..rows.end * heads * dq],
            KvView {
                data: &keys,
                token_stride: heads * dq,
                head_stride: dq,
                offset: 0,
            },
            KvView {
                data: &expanded,
                token_stride: heads * kv_b_rows,
                head_stride: kv_b_rows,
                offset: dn,
            },
            AttentionShape {
                heads,
                kv_heads: heads,
                qk_dim: dq,
                v_dim: d.v,
            },
            &positions,
            scale,
            &mut out[rows.start * heads * d.v..rows.end * heads * d.v],
        );
    }
}

impl DeviceOps for CpuDevice {
    type Buf = Vec<f32>;
    type Ints = Vec<i32>;
    type Download = Vec<f32>;
    type Pool = CpuPool;

    fn upload(&self, x: &[f32]) -> DeviceResult<Vec<f32>> {
        Ok(x.to_vec())
    }

    fn upload_ints(&self, x: &[i32]) -> DeviceResult<Vec<i32>> {
        Ok(x.to_vec())
    }

    fn zeros(&self, n: usize) -> DeviceResult<Vec<f32>> {
        Ok(vec![0.0; n])
    }

    fn begin_download(&self, x: &Vec<f32>) -> DeviceResult<Vec<f32>> {
        Ok(x.clone())
    }

    fn finish_download(&self, d: Vec<f32>, out: &mut [f32]) -> DeviceResult<()> {
        out.copy_from_slice(&d);
        Ok(())
    }

    fn copy(&self, x: &Vec<f32>) -> DeviceResult<Vec<f32>> {
        Ok(x.clone())
    }

    fn copy_into(&self, dst: &mut Vec<f32>, src: &Vec<f32>) -> DeviceResult<()> {
        dst.copy_from_slice(src);
        Ok(())
    }

    fn write_ints(&self, dst: &mut Vec<i32>, src: &[i32]) -> DeviceResult<()> {
        dst.copy_from_slice(src);
        Ok(())
    }

    fn records(&self) -> bool {
        self.records
    }

    fn replay(&self, key: super::ReplayKey, work: &mut Work) -> DeviceResult<()> {
        self.record(|log| log.replays.push(key));
        work()
    }

    fn pool(&self, len: usize, bf16: bool) -> DeviceResult<CpuPool> {
        Ok(CpuPool {
            values: vec![0.0; len],
            bf16,
        })
    }

    fn grow_pool(&self, pool: &CpuPool, len: usize) -> DeviceResult<CpuPool> {
        // From empty (the engine sizes the whole cache at start-up) the zeroed memory
        // comes from the allocator untouched: host pages are committed as blocks fill.
        let values = if pool.values.is_empty() {
            vec![0.0; len]
        } else {
            let mut v = pool.values.clone();
            v.resize(len, 0.0);
            v
        };
        Ok(CpuPool {
            values,
            bf16: pool.bf16,
        })
    }

    fn take_rows(&self, x: &Vec<f32>, rows: &[usize], width: usize) -> DeviceResult<Vec<f32>> {
        Ok(rows
            .iter()
            .flat_map(|&r| x[r * width..(r + 1) * width].iter().copied())
            .collect())
    }

    fn len(&self, x: &Vec<f32>) -> usize {
        x.len()
    }

    fn add_rows(
        &self,
        out: &mut Vec<f32>,
        rows: &[usize],
        src: &Vec<f32>,
        width: usize,
    ) -> DeviceResult<()> {
        for (&r, row) in rows.iter().zip(src.chunks_exact(width)) {
            for (a, b) in out[r * width..(r + 1) * width].iter_mut().zip(row) {
                *a += b;
            }
        }
        Ok(())
    }

    fn split(&self, x: &Vec<f32>, lens: &[usize]) -> DeviceResult<Vec<Vec<f32>>> {
        let mut at = 0;
        Ok(lens
            .iter()
            .map(|&n| {
                at += n;
                x[at - n..at].to_vec()
            })
            .collect())
    }

    fn concat(&self, parts: &[Vec<f32>]) -> DeviceResult<Vec<f32>> {
        Ok(parts.concat())
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>) -> DeviceResult<()> {
        for (a, b) in x.iter_mut().zip(y) {
            *a += b;
        }
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &mut Vec<f32>,
        w: &Vec<f32>,
        rows: usize,
        stride: usize,
        dim: usize,
        eps: f32,
    ) -> DeviceResult<()> {
        for r in 0..rows {
            let row = &mut x[r * stride..r * stride + dim];
            let normed = crate::model::rms_norm(row, &w[..dim], eps);
            row.copy_from_slice(&normed);
        }
        Ok(())
    }

    fn linear(&self, w: &LinearWeight, x: &Vec<f32>, tokens: usize) -> DeviceResult<Vec<f32>> {
        let mut y = vec![0.0f32; tokens * w.rows()];
        self.backend.linear(w, 0..w.rows(), x, &mut y);
        Ok(y)
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        rope: &DeviceRope<Vec<f32>>,
        positions: &Vec<i32>,
        layout: RopeLayout,
    ) -> DeviceResult<()> {
        let dim = rope.host.inv_freq().len() * 2;
        for (t, &pos) in positions.iter().enumerate().take(layout.tokens) {
            for h in 0..layout.heads {
                let at = t * layout.token_stride + h * layout.head_stride + layout.offset;
                rope.host.apply(&mut x[at..at + dim], pos as usize);
            }
        }
        Ok(())
    }

    fn write_rows(
        &self,
        pool: &mut CpuPool,
        rows: &Vec<f32>,
        slots: &Vec<i32>,
        width: usize,
    ) -> DeviceResult<()> {
        for (row, &slot) in rows.chunks_exact(width).zip(slots) {
            let at = slot as usize * width;
            let dst = &mut pool.values[at..at + width];
            dst.copy_from_slice(row);
            if pool.bf16 {
                for v in dst.iter_mut() {
                    *v = half::bf16::from_f32(*v).to_f32();
                }
            }
        }
        Ok(())
    }

    fn absorb_queries(
        &self,
        kv_b: &LinearWeight,
        q: &Vec<f32>,
        d: MlaDims,
        tokens: usize,
    ) -> DeviceResult<Vec<f32>> {
        Ok(absorb_queries(self.backend.as_ref(), kv_b, q, d, tokens))
    }

    fn mla(
        &self,
        q: &Vec<f32>,
        pool: &CpuPool,
        blocks: &QueryBlocks<Vec<i32>>,
        d: MlaDims,
        scale: f32,
    ) -> DeviceResult<Vec<f32>> {
        self.record(|l| {
            l.queries += blocks.queries;
            l.query_heads += blocks.queries * d.heads;
        });
        let (width, bs) = (d.width(), blocks.block_size);
        let mut out = vec![0.0f32; blocks.queries * d.heads * d.latent];
        if let Some(isa) = self.backend.tiled_attention() {
            let rows = d.heads * width;
            let positions: Vec<usize> = (0..blocks.queries)
                .map(|i| (blocks.lens[i] as usize).saturating_sub(1))
                .collect();
            let seqs: Vec<attention::AbsorbedQueries> = (0..blocks.queries)
                .map(|i| attention::AbsorbedQueries {
                    q: &q[i * rows..(i + 1) * rows],
                    positions: &positions[i..i + 1],
                    latents: attention::Latents {
                        pool: &pool.values,
                        table: &blocks.tables[i * blocks.max_blocks..(i + 1) * blocks.max_blocks],
                        block_size: bs,
                        width,
                    },
                })
                .collect();
            let mut parts = Vec::new();
            self.backend
                .install(&mut || parts = attention::absorbed(isa, &seqs, d, scale));
            for (o, part) in out.chunks_exact_mut(d.heads * d.latent).zip(parts) {
                o.copy_from_slice(&part);
            }
            return Ok(out);
        }
        for i in 0..blocks.queries {
            let len = blocks.lens[i] as usize;
            let table = &blocks.tables[i * blocks.max_blocks..(i + 1) * blocks.max_blocks];
            let latents = self.gather_latents(pool, table, bs, len, width);
            let view = KvView {
                data: &latents,
                token_stride: width,
                head_stride: 0,
                offset: 0,
            };
            let rows = d.heads * width;
            let outs = d.heads * d.latent;
            self.backend.attention(
                &q[i * rows..(i + 1) * rows],
                view,
                view,
                AttentionShape {
                    heads: d.heads,
                    kv_heads: 1,
                    qk_dim: width,
                    v_dim: d.latent,
                },
                &[len - 1],
                scale,
                &mut out[i * outs..(i + 1) * outs],
            );
        }
        Ok(out)
    }

    fn expand_values(
        &self,
        kv_b: &LinearWeight,
        o: &Vec<f32>,
        d: MlaDims,
        tokens: usize,
    ) -> DeviceResult<Vec<f32>> {
        Ok(expand_values(self.backend.as_ref(), kv_b, o, d, tokens))
    }

    fn mla_attention(
        &self,
        kv_b: &LinearWeight,
        q: &Vec<f32>,
        pool: &CpuPool,
        blocks: &QueryBlocks<Vec<i32>>,
        sequences: &[Range<usize>],
        d: MlaDims,
        scale: f32,
        form: AttentionForm,
    ) -> DeviceResult<Vec<f32>> {
        let started = std::time::Instant::now();
        // Auto: each sequence's queries in the form that needs fewer multiply-adds for
        // them (see `attention::naive_is_cheaper`): naive for a prefill chunk, whose
        // expanded keys and values all of its queries share; absorbed for one query, or a
        // few over a long context.
        let naive = |s: &Range<usize>| match form {
            _ if !self.naive => false,
            AttentionForm::Auto => {
                let lens = &blocks.lens[s.clone()];
                let keys = lens.iter().max().map_or(0, |&l| l as usize);
                let visible = lens.iter().map(|&l| l as usize).sum();
                s.len() > 1 && attention::naive_is_cheaper(d, s.len(), keys, visible)
            }
            AttentionForm::Naive => true,
            AttentionForm::Absorbed => false,
        };
        let n = blocks.queries;
        let mut out = vec![0.0f32; n * d.heads * d.v];
        // Absorbed queries together: one read of kv_b for all of them.
        let absorbed: Vec<usize> = sequences
            .iter()
            .filter(|s| !naive(s))
            .flat_map(|s| s.clone())
            .collect();
        if !absorbed.is_empty() {
            let m = absorbed.len();
            let (qk, v) = (d.heads * d.qk(), d.heads * d.v);
            let rows = self.take_rows(q, &absorbed, qk)?;
            let picked = QueryBlocks {
                tables: self.take_ints(&blocks.tables, &absorbed, blocks.max_blocks),
                lens: self.take_ints(&blocks.lens, &absorbed, 1),
                queries: m,
                ..*blocks
            };
            let q_lat = self.absorb_queries(kv_b, &rows, d, m)?;
            let o_lat = self.mla(&q_lat, pool, &picked, d, scale)?;
            let values = self.expand_values(kv_b, &o_lat, d, m)?;
            for (&t, row) in absorbed.iter().zip(values.chunks_exact(v)) {
                out[t * v..(t + 1) * v].copy_from_slice(row);
            }
        }
        for s in sequences.iter().filter(|s| naive(s)) {
            self.naive_mla(kv_b, q, pool, blocks, s.clone(), d, scale, &mut out);
        }
        ATTENTION_NANOS.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(out)
    }

    fn experts_accumulate(
        &self,
        work: &[(&FfnWeights, &[(usize, f32)])],
        x: &Vec<f32>,
        out: &mut Vec<f32>,
    ) -> DeviceResult<()> {
        self.record(|l| l.experts.extend(work.iter().filter_map(|(f, _)| f.expert)));
        self.backend.moe_accumulate(work, x, out);
        Ok(())
    }

    fn route(
        &self,
        cfg: &ModelConfig,
        logits: &Vec<f32>,
        bias: Option<&Vec<f32>>,
        _tokens: usize,
    ) -> DeviceResult<Vec<Vec<(usize, f32)>>> {
        Ok(route_on_host(cfg, logits, bias.map(|b| b.as_slice())))
    }

    fn ffn_accumulate(
        &self,
        ffn: &FfnWeights,
        x: &Vec<f32>,
        tokens: &[(usize, f32)],
        out: &mut Vec<f32>,
    ) -> DeviceResult<()> {
        if let Some(e) = ffn.expert {
            self.record(|l| l.experts.push(e));
        }
        self.backend.ffn_accumulate(ffn, x, tokens, out);
        Ok(())
    }
}

/// Absorbed queries `[tokens, heads, latent + rope]` from `q` `[tokens, heads, nope +
/// rope]`: per head `[q_nope · W_UK_h | q_pe]`, folding every token's head through one
/// transposed product over that head's band of `kv_b`.
fn absorb_queries(
    backend: &dyn CpuKernels,
    kv_b: &LinearWeight,
    q: &[f32],
    d: MlaDims,
    tokens: usize,
) -> Vec<f32> {
    let (width, qk) = (d.width(), d.qk());
    // Heads in one parallel region: each head's band of kv_b is small (128 rows at K2's
    // sizes), too small to split by rows without the split costing more than the rows.
    let folded = per_head(backend, d.heads, |h| {
        let mut nope = vec![0.0f32; tokens * d.nope];
        for t in 0..tokens {
            let src = (t * d.heads + h) * qk;
            nope[t * d.nope..(t + 1) * d.nope].copy_from_slice(&q[src..src + d.nope]);
        }
        let uk = h * d.kv_b_rows()..h * d.kv_b_rows() + d.nope;
        let mut folded = vec![0.0f32; tokens * d.latent];
        backend.linear_transposed(kv_b, uk, &nope, &mut folded);
        folded
    });
    let mut out = vec![0.0f32; tokens * d.heads * width];
    for (h, folded) in folded.iter().enumerate() {
        for t in 0..tokens {
            let dst = (t * d.heads + h) * width;
            out[dst..dst + d.latent].copy_from_slice(&folded[t * d.latent..(t + 1) * d.latent]);
            let src = (t * d.heads + h) * qk + d.nope;
            out[dst + d.latent..dst + width].copy_from_slice(&q[src..src + d.rope]);
        }
    }
    out
}

/// `work(h)` for every head, in one parallel region on the backend's threads; results in
/// head order (each head computed by one call whatever the thread count).
fn per_head<F>(backend: &dyn CpuKernels, heads: usize, work: F) -> Vec<Vec<f32>>
where
    F: Fn(usize) -> Vec<f32> + Sync,
{
    use rayon::prelude::*;
    let mut parts = Vec::new();
    backend.install(&mut || parts = (0..heads).into_par_iter().map(&work).collect());
    parts
}

/// Per head `W_UV_h · o_h`: values `[tokens, heads, v]` from attended latents `[tokens,
/// heads, latent]`.
fn expand_values(
    backend: &dyn CpuKernels,
    kv_b: &LinearWeight,
    o: &[f32],
    d: MlaDims,
    tokens: usize,
) -> Vec<f32> {
    let values = per_head(backend, d.heads, |h| {
        let mut lat = vec![0.0f32; tokens * d.latent];
        for t in 0..tokens {
            let src = (t * d.heads + h) * d.latent;
            lat[t * d.latent..(t + 1) * d.latent].copy_from_slice(&o[src..src + d.latent]);
        }
        let uv = h * d.kv_b_rows() + d.nope..(h + 1) * d.kv_b_rows();
        let mut v = vec![0.0f32; tokens * d.v];
        backend.linear(kv_b, uv, &lat, &mut v);
        v
    });
    let mut out = vec![0.0f32; tokens * d.heads * d.v];
    for (h, v) in values.iter().enumerate() {
        for t in 0..tokens {
            let dst = (t * d.heads + h) * d.v;
            out[dst..dst + d.v].copy_from_slice(&v[t * d.v..(t + 1) * d.v]);
        }
    }
    out
}
