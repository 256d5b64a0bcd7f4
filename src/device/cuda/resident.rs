//! The resident forward pass's device operations on the GPU (see [`crate::forward`]):
//! buffers are `CudaSlice`s on the backend's stream, weights the backend's device copies,
//! the hybrid hand-off goes through page-locked staging buffers. Every kernel used here
//! has a CPU twin its test in `tests/gpu_kernels.rs` compares it with, and the whole pass
//! is compared with the CPU twin pass in `tests/golden.rs` when a GPU is present.

use super::CudaBackend;
use super::GpuBuf;
use crate::config::{ModelConfig, ScoringFunc, TopkMethod};
use crate::device::cpu::kernels::FfnWeights;
use crate::device::{
    route_on_host, DeviceOps, DeviceResult, DeviceRope, QueryBlocks, RopeLayout, Work,
};
use crate::model::MlaDims;
use crate::weights::LinearWeight;
use kernels_cuda::cudarc::driver::CudaSlice;
use kernels_cuda::cudarc::driver::{CudaStream, DeviceRepr};
use kernels_cuda::ops::{AbsorbShape, LatentPool, MlaDecodeShape};
use kernels_cuda::staging::{Staging, StagingPool};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The largest expert count and group count `route_topk` handles; others route on the
/// host.
const MAX_ROUTED_EXPERTS: usize = 1024;
/// The grouped expert path's limits: tokens per expert (the per-expert path's GEMV
/// limit, so both compute the same sums) and (token, expert) pairs per layer.
const GROUPED_MAX_TOKENS: usize = kernels_cuda::ops::GEMV_MAX_TOKENS;
const GROUPED_MAX_PAIRS: usize = 4096;
const MAX_GROUPS: usize = 64;

/// A weight's identity (where its bytes live on the host).
type WeightId = (usize, usize);

/// What the resident pass keeps beside the weights: f32 copies of each layer's `kv_b`
/// (the absorbed projections read them per head) and the staging buffers.
#[derive(Default)]
pub(super) struct ResidentState {
    kv_b: Mutex<HashMap<WeightId, Arc<CudaSlice<f32>>>>,
    staging: Mutex<Option<Arc<StagingPool>>>,
}

impl CudaBackend {
    /// `kv_b` decoded to f32 on the device, once (made at start-up by
    /// [`preload_absorbed`](Self::preload_absorbed) in every plan layout).
    fn kv_b_f32(&self, w: &LinearWeight) -> DeviceResult<Arc<CudaSlice<f32>>> {
        self.check("an absorbed kv_b copy", self.absorbed_copy(w))
    }

    /// Makes the f32 `kv_b` copies the absorbed attention reads now, for each of
    /// `kv_bs`, so a GPU without room for them refuses at start-up with an error naming
    /// them. Returns the bytes they hold.
    pub fn preload_absorbed(
        &self,
        kv_bs: &[&LinearWeight],
    ) -> Result<u64, kernels_cuda::CudaError> {
        let mut total = 0u64;
        for w in kv_bs {
            total += self.absorbed_copy(w)?.len() as u64 * 4;
        }
        Ok(total)
    }

    /// The f32 copy of `kv_b`, made (its weight uploaded first if it is not yet) on first
    /// use; running out of memory is an error naming the copy.
    fn absorbed_copy(
        &self,
        w: &LinearWeight,
    ) -> Result<Arc<CudaSlice<f32>>, kernels_cuda::CudaError> {
        let mut map = self.resident.kv_b.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = map.get(&w.identity()) {
            return Ok(b.clone());
        }
        self.preload(&[w])?;
        let dw = {
            let mut weights = self.lock();
            self.weight(&mut weights, w)
                .map_err(|e| kernels_cuda::CudaError::Failed(e.to_string()))?
        };
        let g = self.gpu();
        let why = |e: kernels_cuda::CudaError| {
            kernels_cuda::CudaError::Failed(format!(
                "the f32 copy of a {}x{} kv_b_proj for absorbed attention ({:.2} GiB) \
                 could not be placed on {}: {}",
                w.rows(),
                w.cols(),
                (w.rows() * w.cols() * 4) as f64 / (1u64 << 30) as f64,
                g.name,
                e.reason()
            ))
        };
        let mut copy = g
            .zeros::<f32>("kv_b f32", w.rows() * w.cols())
            .map_err(why)?;
        g.dequant_rows(&dw, 0, w.rows(), &mut copy).map_err(why)?;
        let copy = Arc::new(copy);
        map.insert(w.identity(), copy.clone());
        Ok(copy)
    }

    /// The grouped path of [`DeviceOps::experts_accumulate`]: when every expert of
    /// `work` is INT4 with one shape and has at most [`GROUPED_MAX_TOKENS`] tokens (so the
    /// per-expert path would multiply by GEMVs too, with the same sums), the layer's
    /// (token, expert) pairs go up in three small copies and run in three launches.
    /// Returns whether it ran.
    fn grouped_experts(
        &self,
        work: &[(&FfnWeights, &[(usize, f32)])],
        x: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> DeviceResult<bool> {
        use kernels_cuda::cudarc::driver::DevicePtr;
        use kernels_cuda::weights::DeviceData;
        let work: Vec<_> = work.iter().filter(|(_, t)| !t.is_empty()).collect();
        let pairs: usize = work.iter().map(|(_, t)| t.len()).sum();
        if work.is_empty()
            || pairs > GROUPED_MAX_PAIRS
            || work.iter().any(|(_, t)| t.len() > GROUPED_MAX_TOKENS)
        {
            return Ok(false);
        }
        let (hidden, inter) = (work[0].0.gate.cols(), work[0].0.gate.rows());
        let shaped = |w: &LinearWeight, rows, cols| {
            matches!(w, LinearWeight::Int4 { .. }) && w.rows() == rows && w.cols() == cols
        };
        if !work.iter().all(|(f, _)| {
            shaped(&f.gate, inter, hidden)
                && shaped(&f.up, inter, hidden)
                && shaped(&f.down, hidden, inter)
        }) {
            return Ok(false);
        }
        let copies: Vec<[Arc<kernels_cuda::weights::DeviceWeight>; 3]> = {
            let mut map = self.lock();
            let mut copies = Vec::with_capacity(work.len());
            for (f, _) in &work {
                let [gate, up, down] = f.matrices();
                copies.push([
                    self.weight(&mut map, gate)?,
                    self.weight(&mut map, up)?,
                    self.weight(&mut map, down)?,
                ]);
            }
            copies
        };
        // Per matrix kind (gate, up, down), per slot: packed then scales addresses.
        let s = &self.gpu.stream;
        let mut group = None;
        let mut addresses = vec![0u64; 6 * copies.len()];
        for (slot, matrices) in copies.iter().enumerate() {
            for (kind, m) in matrices.iter().enumerate() {
                let DeviceData::Int4 {
                    packed,
                    scales,
                    group: g,
                } = &m.data
                else {
                    return Ok(false);
                };
                if *group.get_or_insert(*g) != *g {
                    return Ok(false);
                }
                addresses[2 * kind * copies.len() + slot] = packed.device_ptr(s).0;
                addresses[(2 * kind + 1) * copies.len() + slot] = scales.device_ptr(s).0;
            }
        }
        // Pairs by token; within a token, in the order of `work` (the per-expert order).
        let mut by_token: std::collections::BTreeMap<usize, Vec<(usize, f32)>> = Default::default();
        for (slot, (_, tokens)) in work.iter().enumerate() {
            for &(t, w) in tokens.iter() {
                by_token.entry(t).or_default().push((slot, w));
            }
        }
        let mut index = Vec::with_capacity(2 * pairs + by_token.len() + 1);
        let mut weights = Vec::with_capacity(pairs);
        let mut starts = vec![0i32];
        for (&t, list) in &by_token {
            for &(slot, w) in list {
                index.extend([t as i32, slot as i32]);
                weights.push(w);
            }
            starts.push(weights.len() as i32);
        }
        index.extend(starts);
        let experts = self.check(
            "an expert table upload",
            self.gpu.upload("experts", &addresses),
        )?;
        let (index, weights) = (self.ints(&index)?, self.upload(&weights)?);
        let grouped = kernels_cuda::ops::GroupedExperts {
            experts: &experts,
            slots: copies.len(),
            index: &index,
            weights: &weights,
            pairs,
            tokens: by_token.len(),
            hidden,
            inter,
            group: group.unwrap_or(32),
        };
        self.check(
            "grouped experts",
            self.gpu.grouped_int4_experts(&grouped, x, out),
        )?;
        Ok(true)
    }

    fn staging(&self) -> DeviceResult<Arc<StagingPool>> {
        let mut s = self
            .resident
            .staging
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(pool) = s.as_ref() {
            return Ok(pool.clone());
        }
        let pool = Arc::new(self.check(
            "allocating the hand-off buffers",
            StagingPool::new(&self.gpu.ctx, 1 << 16),
        )?);
        *s = Some(pool.clone());
        Ok(pool)
    }

    /// Makes this GPU's context current: cudarc's copies and frees run in the current
    /// context, and a pass over several GPUs alternates between them.
    fn enter(&self) {
        let _ = self.gpu.ctx.bind_to_thread();
    }

    fn ints(&self, x: &[i32]) -> DeviceResult<CudaSlice<i32>> {
        self.check("an index upload", self.gpu.upload("indices", x))
    }
}

/// `route_topk`'s method number for a config.
fn topk_method(cfg: &ModelConfig) -> i32 {
    match cfg.topk_method {
        TopkMethod::NoauxTc => 0,
        TopkMethod::Greedy => 1,
        TopkMethod::GroupLimitedGreedy => 2,
    }
}

impl DeviceOps for CudaBackend {
    type Buf = GpuBuf<f32>;
    type Ints = GpuBuf<i32>;
    type Download = (Staging, usize);
    type Pool = DevicePool;

    fn upload(&self, x: &[f32]) -> DeviceResult<GpuBuf<f32>> {
        self.enter();
        Ok(GpuBuf::new(
            self.check("an upload", self.gpu.upload("values", x))?,
        ))
    }

    fn upload_ints(&self, x: &[i32]) -> DeviceResult<GpuBuf<i32>> {
        self.enter();
        Ok(GpuBuf::new(self.ints(x)?))
    }

    fn zeros(&self, n: usize) -> DeviceResult<GpuBuf<f32>> {
        self.enter();
        Ok(GpuBuf::new(
            self.check("a buffer", self.gpu.zeros::<f32>("buffer", n))?,
        ))
    }

    fn begin_download(&self, x: &GpuBuf<f32>) -> DeviceResult<(Staging, usize)> {
        self.enter();
        let mut s = self.check("a hand-off buffer", self.staging()?.take(x.len()))?;
        self.check("a hand-off download", s.download(&self.gpu.stream, x))?;
        Ok((s, x.len()))
    }

    fn finish_download(&self, d: (Staging, usize), out: &mut [f32]) -> DeviceResult<()> {
        self.enter();
        let (mut s, n) = d;
        let values = self.check("a hand-off download", s.read(n))?;
        let n = out.len().min(values.len());
        out[..n].copy_from_slice(&values[..n]);
        self.staging()?.give(s);
        Ok(())
    }

    fn upload_staged(&self, x: &[f32]) -> DeviceResult<GpuBuf<f32>> {
        self.enter();
        let pool = self.staging()?;
        let mut s = self.check("a hand-off buffer", pool.take(x.len()))?;
        let mut dst = self.zeros(x.len())?;
        self.check("a hand-off upload", s.upload(&self.gpu.stream, x, &mut dst))?;
        pool.give(s);
        Ok(dst)
    }

    fn copy(&self, x: &GpuBuf<f32>) -> DeviceResult<GpuBuf<f32>> {
        self.enter();
        let copy = self.gpu.stream.clone_dtod(&**x).map_err(copy_err);
        Ok(GpuBuf::new(self.check("a copy", copy)?))
    }

    fn copy_into(&self, dst: &mut GpuBuf<f32>, src: &GpuBuf<f32>) -> DeviceResult<()> {
        self.enter();
        let n = dst.len().min(src.len());
        self.check(
            "a copy",
            self.gpu
                .stream
                .memcpy_dtod(&src.slice(0..n), &mut dst.slice_mut(0..n))
                .map_err(copy_err),
        )
    }

    fn write_ints(&self, dst: &mut GpuBuf<i32>, src: &[i32]) -> DeviceResult<()> {
        self.enter();
        let n = dst.len().min(src.len());
        self.check(
            "an index upload",
            self.gpu
                .stream
                .memcpy_htod(&src[..n], &mut dst.slice_mut(0..n))
                .map_err(copy_err),
        )
    }

    fn records(&self) -> bool {
        self.records_decode()
    }

    fn replay(&self, key: crate::device::ReplayKey, work: &mut Work) -> DeviceResult<()> {
        self.enter();
        self.replay_work(key, work)
    }

    fn pool(&self, len: usize, bf16: bool) -> DeviceResult<DevicePool> {
        self.enter();
        Ok(if bf16 {
            let pool = self.check("a latent pool", self.gpu.zeros::<u16>("pool", len))?;
            DevicePool::Bf16(GpuBuf::new(pool))
        } else {
            DevicePool::F32(self.zeros(len)?)
        })
    }

    fn grow_pool(&self, pool: &DevicePool, len: usize) -> DeviceResult<DevicePool> {
        self.enter();
        let s = &self.gpu.stream;
        let keep = |r| self.check("growing the latent cache", r);
        Ok(match pool {
            DevicePool::F32(x) => {
                let mut g = self.zeros(len)?;
                keep(keep_prefix(s, x, &mut g))?;
                DevicePool::F32(g)
            }
            DevicePool::Bf16(x) => {
                let mut g = self.check("a latent pool", self.gpu.zeros::<u16>("pool", len))?;
                keep(keep_prefix(s, x, &mut g))?;
                DevicePool::Bf16(GpuBuf::new(g))
            }
        })
    }

    fn take_rows(
        &self,
        x: &GpuBuf<f32>,
        rows: &[usize],
        width: usize,
    ) -> DeviceResult<GpuBuf<f32>> {
        self.enter();
        let idx: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
        let mut out = self.zeros(rows.len() * width)?;
        let idx = self.ints(&idx)?;
        self.check(
            "take_rows",
            self.gpu
                .take_rows(x, (&idx, 0), &mut out, rows.len(), width),
        )?;
        Ok(out)
    }

    fn len(&self, x: &GpuBuf<f32>) -> usize {
        x.len()
    }

    fn add_rows(
        &self,
        out: &mut GpuBuf<f32>,
        rows: &[usize],
        src: &GpuBuf<f32>,
        width: usize,
    ) -> DeviceResult<()> {
        self.enter();
        let idx: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
        let idx_dev = self.ints(&idx)?;
        // Each block of the kernel adds one row; a row named twice in one launch would be
        // added by two blocks at once and one sum lost. Runs of distinct rows go in
        // separate launches, which the stream orders.
        for run in distinct_runs(rows) {
            let src = src.slice(run.start * width..run.end * width);
            self.check(
                "add_rows",
                self.gpu
                    .add_rows(out, &src, (&idx_dev, run.start), run.len(), width),
            )?;
        }
        Ok(())
    }

    fn split(&self, x: &GpuBuf<f32>, lens: &[usize]) -> DeviceResult<Vec<GpuBuf<f32>>> {
        self.enter();
        let mut at = 0;
        let mut parts = Vec::with_capacity(lens.len());
        for &n in lens {
            let mut part = self.zeros(n)?;
            if n > 0 {
                self.check(
                    "splitting a buffer",
                    self.gpu
                        .stream
                        .memcpy_dtod(&x.slice(at..at + n), &mut part.slice_mut(0..n))
                        .map_err(copy_err),
                )?;
            }
            at += n;
            parts.push(part);
        }
        Ok(parts)
    }

    fn concat(&self, parts: &[GpuBuf<f32>]) -> DeviceResult<GpuBuf<f32>> {
        self.enter();
        let total = parts.iter().map(|p| p.len()).sum();
        let mut out = self.zeros(total)?;
        let mut at = 0;
        for p in parts {
            self.check(
                "joining buffers",
                self.gpu
                    .stream
                    .memcpy_dtod(&**p, &mut out.slice_mut(at..at + p.len()))
                    .map_err(copy_err),
            )?;
            at += p.len();
        }
        Ok(out)
    }

    fn add(&self, x: &mut GpuBuf<f32>, y: &GpuBuf<f32>) -> DeviceResult<()> {
        self.enter();
        let n = x.len().min(y.len());
        self.check("add", self.gpu.add(x, y, n))
    }

    fn rms_norm(
        &self,
        x: &mut GpuBuf<f32>,
        w: &GpuBuf<f32>,
        rows: usize,
        stride: usize,
        dim: usize,
        eps: f32,
    ) -> DeviceResult<()> {
        self.enter();
        self.check(
            "rms_norm",
            self.gpu.rms_norm_rows(x, w, rows, dim, stride, eps),
        )
    }

    fn linear(
        &self,
        w: &LinearWeight,
        x: &GpuBuf<f32>,
        tokens: usize,
    ) -> DeviceResult<GpuBuf<f32>> {
        self.enter();
        let dw = {
            let mut map = self.lock();
            self.weight(&mut map, w)?
        };
        Ok(GpuBuf::new(self.linear_on_device(&dw, x, tokens)?))
    }

    fn rope(
        &self,
        x: &mut GpuBuf<f32>,
        rope: &DeviceRope<GpuBuf<f32>>,
        positions: &GpuBuf<i32>,
        l: RopeLayout,
    ) -> DeviceResult<()> {
        self.enter();
        self.check(
            "rope_yarn",
            self.gpu.rope_yarn(
                x,
                positions,
                &rope.inv_freq,
                rope.host.magnitude(),
                l.tokens,
                l.heads,
                l.token_stride,
                l.head_stride,
                l.offset,
                rope.host.inv_freq().len(),
            ),
        )
    }

    fn write_rows(
        &self,
        pool: &mut DevicePool,
        rows: &GpuBuf<f32>,
        slots: &GpuBuf<i32>,
        width: usize,
    ) -> DeviceResult<()> {
        self.enter();
        let count = slots.len();
        let g = &self.gpu;
        self.check(
            "writing the latent cache",
            match pool {
                DevicePool::F32(p) => g.write_rows(p, rows, slots, count, width),
                DevicePool::Bf16(p) => g.write_rows_bf16(p, rows, slots, count, width),
            },
        )
    }

    fn absorb_queries(
        &self,
        kv_b: &LinearWeight,
        q: &GpuBuf<f32>,
        d: MlaDims,
        tokens: usize,
    ) -> DeviceResult<GpuBuf<f32>> {
        self.enter();
        let w = self.kv_b_f32(kv_b)?;
        let mut out = self.zeros(tokens * d.heads * d.width())?;
        self.check(
            "mla_absorb_queries",
            self.gpu
                .mla_absorb_queries(q, &w, &mut out, absorb_shape(d, tokens)),
        )?;
        Ok(out)
    }

    fn mla(
        &self,
        q: &GpuBuf<f32>,
        pool: &DevicePool,
        b: &QueryBlocks<GpuBuf<i32>>,
        d: MlaDims,
        scale: f32,
    ) -> DeviceResult<GpuBuf<f32>> {
        self.enter();
        let mut out = self.zeros(b.queries * d.heads * d.latent)?;
        if b.queries == 0 {
            return Ok(out);
        }
        let shape = MlaDecodeShape {
            seqs: b.queries,
            heads: d.heads,
            width: d.width(),
            c: d.latent,
            block_size: b.block_size,
            max_blocks: b.max_blocks,
            scale,
        };
        let pool = match pool {
            DevicePool::F32(p) => LatentPool::F32(p),
            DevicePool::Bf16(p) => LatentPool::Bf16(p),
        };
        self.check(
            "mla_decode",
            self.gpu
                .mla_decode(q, pool, &b.tables, &b.lens, b.max_len, shape, &mut out),
        )?;
        Ok(out)
    }

    fn expand_values(
        &self,
        kv_b: &LinearWeight,
        o: &GpuBuf<f32>,
        d: MlaDims,
        tokens: usize,
    ) -> DeviceResult<GpuBuf<f32>> {
        self.enter();
        let w = self.kv_b_f32(kv_b)?;
        let mut out = self.zeros(tokens * d.heads * d.v)?;
        self.check(
            "mla_expand_values",
            self.gpu
                .mla_expand_values(o, &w, &mut out, absorb_shape(d, tokens)),
        )?;
        Ok(out)
    }

    fn route(
        &self,
        cfg: &ModelConfig,
        logits: &GpuBuf<f32>,
        bias: Option<&GpuBuf<f32>>,
        tokens: usize,
    ) -> DeviceResult<Vec<Vec<(usize, f32)>>> {
        self.enter();
        let (e, k) = (cfg.n_routed_experts, cfg.num_experts_per_tok);
        if e > MAX_ROUTED_EXPERTS || cfg.n_group > MAX_GROUPS || tokens == 0 {
            let host = self.check("router logits", self.gpu.download("logits", logits))?;
            let bias = match bias {
                Some(b) => Some(self.check("router bias", self.gpu.download("bias", b))?),
                None => None,
            };
            return Ok(route_on_host(cfg, &host[..tokens * e], bias.as_deref()));
        }
        let mut ids = self.check("router output", self.gpu.zeros::<i32>("ids", tokens * k))?;
        let mut w = self.zeros(tokens * k)?;
        self.check(
            "route_topk",
            self.gpu.route_topk(
                logits,
                bias.map(|b| &**b),
                tokens,
                e,
                (cfg.n_group, cfg.topk_group),
                k,
                cfg.scoring_func == ScoringFunc::Softmax,
                topk_method(cfg),
                cfg.norm_topk_prob,
                cfg.routed_scaling_factor,
                &mut ids,
                &mut w,
            ),
        )?;
        let ids = self.check("router output", self.gpu.download("ids", &ids))?;
        let w = self.check("router output", self.gpu.download("weights", &w))?;
        Ok((0..tokens)
            .map(|t| {
                (t * k..(t + 1) * k)
                    .map(|i| (ids[i].max(0) as usize, w[i]))
                    .collect()
            })
            .collect())
    }

    /// Gate and up, SiLU-mul, down over every row: four launches, nothing uploaded.
    fn ffn_all(
        &self,
        ffn: &FfnWeights,
        x: &GpuBuf<f32>,
        tokens: usize,
    ) -> DeviceResult<GpuBuf<f32>> {
        self.enter();
        let mut h = DeviceOps::linear(self, &ffn.gate, x, tokens)?;
        let u = DeviceOps::linear(self, &ffn.up, x, tokens)?;
        let n = tokens * ffn.gate.rows();
        self.check("silu_mul", self.gpu.silu_mul(&mut h, &u, n))?;
        DeviceOps::linear(self, &ffn.down, &h, tokens)
    }

    fn ffn_accumulate(
        &self,
        ffn: &FfnWeights,
        x: &GpuBuf<f32>,
        tokens: &[(usize, f32)],
        out: &mut GpuBuf<f32>,
    ) -> DeviceResult<()> {
        self.enter();
        self.experts_accumulate(&[(ffn, tokens)], x, out)
    }

    /// A few tokens over INT4 experts of one shape (decode) run grouped: three launches
    /// for the whole layer (see [`CudaBackend::grouped_experts`]). Otherwise every
    /// expert's token indices and weights go up in one copy (the host has just waited
    /// for the routes, so the queue is empty and nothing waits on it); then per expert:
    /// gather its tokens, gate and up, SiLU-mul, down, weighted scatter-add.
    fn experts_accumulate(
        &self,
        work: &[(&FfnWeights, &[(usize, f32)])],
        x: &GpuBuf<f32>,
        out: &mut GpuBuf<f32>,
    ) -> DeviceResult<()> {
        self.enter();
        let entries: usize = work.iter().map(|(_, t)| t.len()).sum();
        if entries == 0 || self.grouped_experts(work, x, out)? {
            return Ok(());
        }
        let rows: Vec<i32> = work
            .iter()
            .flat_map(|(_, t)| t.iter().map(|&(r, _)| r as i32))
            .collect();
        let weights: Vec<f32> = work
            .iter()
            .flat_map(|(_, t)| t.iter().map(|&(_, w)| w))
            .collect();
        let (rows, weights) = (self.ints(&rows)?, self.upload(&weights)?);
        let mut first = 0;
        for (ffn, tokens) in work {
            let (hidden, inter, m) = (ffn.gate.cols(), ffn.gate.rows(), tokens.len());
            if m == 0 {
                continue;
            }
            let (gate, up, down) = {
                let mut map = self.lock();
                (
                    self.weight(&mut map, &ffn.gate)?,
                    self.weight(&mut map, &ffn.up)?,
                    self.weight(&mut map, &ffn.down)?,
                )
            };
            let mut xs = self.zeros(m * hidden)?;
            self.check(
                "take_rows",
                self.gpu.take_rows(x, (&rows, first), &mut xs, m, hidden),
            )?;
            let mut h = self.linear_on_device(&gate, &xs, m)?;
            let u = self.linear_on_device(&up, &xs, m)?;
            self.check("silu_mul", self.gpu.silu_mul(&mut h, &u, m * inter))?;
            let d = self.linear_on_device(&down, &h, m)?;
            self.check(
                "scatter_add_rows",
                self.gpu
                    .scatter_add_rows(out, &d, (&rows, &weights, first), m, hidden),
            )?;
            first += m;
        }
        Ok(())
    }
}

/// `rows` cut into consecutive runs in which no row repeats (one run when all differ).
fn distinct_runs(rows: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut start = 0;
    for (i, r) in rows.iter().enumerate() {
        if !seen.insert(*r) {
            runs.push(start..i);
            seen.clear();
            seen.insert(*r);
            start = i;
        }
    }
    if start < rows.len() {
        runs.push(start..rows.len());
    }
    runs
}

/// One layer's latent cache on the GPU.
pub enum DevicePool {
    F32(GpuBuf<f32>),
    Bf16(GpuBuf<u16>),
}

/// Copies `from` into the start of `to` (a grown pool keeps what it held).
fn keep_prefix<T: DeviceRepr>(
    s: &Arc<CudaStream>,
    from: &CudaSlice<T>,
    to: &mut CudaSlice<T>,
) -> Result<(), kernels_cuda::CudaError> {
    let keep = from.len().min(to.len());
    if keep > 0 {
        s.memcpy_dtod(&from.slice(0..keep), &mut to.slice_mut(0..keep))
            .map_err(copy_err)?;
    }
    Ok(())
}

fn absorb_shape(d: MlaDims, tokens: usize) -> AbsorbShape {
    AbsorbShape {
        tokens,
        heads: d.heads,
        nope: d.nope,
        rope: d.rope,
        v: d.v,
        latent: d.latent,
    }
}

fn copy_err(e: impl std::fmt::Display) -> kernels_cuda::CudaError {
    kernels_cuda::CudaError::Failed(format!("a device copy failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::distinct_runs;

    #[test]
    fn rows_named_twice_go_to_separate_launches() {
        assert_eq!(distinct_runs(&[3, 1, 2]), vec![0..3]);
        // Tokens sent to two owners come back as two runs.
        assert_eq!(distinct_runs(&[0, 2, 5, 0, 1, 5]), vec![0..3, 3..6]);
        assert_eq!(distinct_runs(&[4, 4, 4]), vec![0..1, 1..2, 2..3]);
        assert!(distinct_runs(&[]).is_empty());
    }
}
