//! The device-resident forward pass: the residual stream, every activation and the paged
//! latent KV cache stay in the accelerator's memory for the whole pass. Only the token
//! ids, positions and block tables go in, the router's choices and the requested logits
//! come out, and, in hybrid mode, each MoE layer with experts in host RAM hands its
//! normalised hidden states to the host and takes the host experts' sum back.
//!
//! The pass is written once over [`DeviceOps`], the operations a device provides on its
//! own buffers. The CUDA backend implements them with its kernels; [`twin::TwinOps`]
//! implements them on host vectors with the CPU kernels, so the whole schedule (cache
//! layout, block tables, hand-off, byte counts) is checked against the golden fixtures
//! on machines without a GPU.
//!
//! Attention runs in the absorbed MLA form for every token, prefill included: each new
//! token is one query over its sequence's latents `0..=position`, read through the block
//! table, so one kernel serves decode, chunked prefill and mixed batches.
//!
//! The latent cache on the device mirrors the host store's block numbering (the engine's
//! block allocator and prefix cache decide which block a position lives in; the device
//! holds that block's latents). The host store itself is not written: every pass of a
//! store goes through the same resident forward.

pub mod twin;

use crate::accel::sim::SimDevice;
use crate::accel::{launch, Accelerator, Pending};
use crate::backend::{AttentionShape, Backend, FfnWeights, KvView};
use crate::config::ModelConfig;
use crate::model::{
    router, BatchEntry, Ffn, LatentStore, Logits, Model, ModelError, QueryProj, RouteObserver,
};
use crate::weights::LinearWeight;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Widths of the absorbed MLA computation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaDims {
    pub heads: usize,
    /// qk_nope_head_dim
    pub nope: usize,
    /// qk_rope_head_dim
    pub rope: usize,
    /// v_head_dim
    pub v: usize,
    /// kv_lora_rank
    pub latent: usize,
}

impl MlaDims {
    pub fn of(cfg: &ModelConfig) -> Self {
        MlaDims {
            heads: cfg.num_attention_heads,
            nope: cfg.qk_nope_head_dim,
            rope: cfg.qk_rope_head_dim,
            v: cfg.v_head_dim,
            latent: cfg.kv_lora_rank,
        }
    }

    /// Values per cached token: the latent and the rotated key part.
    pub fn width(&self) -> usize {
        self.latent + self.rope
    }

    /// Query values per head.
    pub fn qk(&self) -> usize {
        self.nope + self.rope
    }

    /// Rows of kv_b per head: W_UK (nope rows) then W_UV (v rows).
    pub fn kv_b_rows(&self) -> usize {
        self.nope + self.v
    }
}

/// Where the queries of one pass read their keys: per query, its sequence's block table
/// (padded to `max_blocks`) and how many latents it attends to (its position + 1).
pub struct QueryBlocks<I> {
    pub tables: I,
    pub lens: I,
    pub queries: usize,
    pub max_blocks: usize,
    pub block_size: usize,
    /// The longest `lens` entry.
    pub max_len: usize,
}

/// How rotary embedding finds its pairs: element `(t, h, d)` of the buffer is at
/// `t * token_stride + h * head_stride + offset + d`, `d < rope dim`.
#[derive(Debug, Clone, Copy)]
pub struct RopeLayout {
    pub tokens: usize,
    pub heads: usize,
    pub token_stride: usize,
    pub head_stride: usize,
    pub offset: usize,
}

/// The operations the resident forward pass needs from a device, on its own buffers.
/// Weights are the checkpoint's [`LinearWeight`]s; a device keeps its copies of them.
pub trait DeviceOps: Send + Sync {
    /// f32 values in device memory.
    type Buf: Send;
    /// i32 values in device memory.
    type Ints: Send;
    /// A device-to-host copy in flight.
    type Download: Send;
    /// One layer's latent cache, `[blocks, block_size, width]`, f32 or BF16.
    type Pool: Send;

    fn label(&self) -> String;
    fn upload(&self, x: &[f32]) -> Self::Buf;
    fn upload_ints(&self, x: &[i32]) -> Self::Ints;
    fn zeros(&self, n: usize) -> Self::Buf;
    /// Starts copying `x` to host memory (staged through pinned buffers on a GPU) and
    /// returns at once; the device goes on with later work.
    fn begin_download(&self, x: &Self::Buf) -> Self::Download;
    /// Waits for a copy and puts the values in `out`.
    fn finish_download(&self, d: Self::Download, out: &mut [f32]);
    /// An upload of host results in the hand-off (through pinned staging on a GPU).
    fn upload_staged(&self, x: &[f32]) -> Self::Buf {
        self.upload(x)
    }
    fn copy(&self, x: &Self::Buf) -> Self::Buf;
    /// A zeroed latent cache pool of `len` values, stored in BF16 (rounded on write)
    /// when `bf16`, else f32.
    fn pool(&self, len: usize, bf16: bool) -> Self::Pool;
    /// A pool of `len` values holding `pool`'s values followed by zeros.
    fn grow_pool(&self, pool: &Self::Pool, len: usize) -> Self::Pool;
    /// Rows `rows` of `x` (rows of `width` values), in that order.
    fn take_rows(&self, x: &Self::Buf, rows: &[usize], width: usize) -> Self::Buf;
    /// `x += y`.
    fn add(&self, x: &mut Self::Buf, y: &Self::Buf);
    /// In place, for `rows` rows at `stride`: the first `dim` values become
    /// `x * rsqrt(mean(x²) + eps) * w`.
    fn rms_norm(
        &self,
        x: &mut Self::Buf,
        w: &Self::Buf,
        rows: usize,
        stride: usize,
        dim: usize,
        eps: f32,
    );
    /// Token embeddings: rows `ids` of the table.
    fn embed(&self, table: &LinearWeight, ids: &[u32]) -> Self::Buf;
    /// `y = x Wᵀ` over all rows of `w`, `x` holding `tokens` rows.
    fn linear(&self, w: &LinearWeight, x: &Self::Buf, tokens: usize) -> Self::Buf;
    /// Rotary embedding (the model's YaRN tables) at `positions`, in place.
    fn rope(
        &self,
        x: &mut Self::Buf,
        rope: &DeviceRope<Self::Buf>,
        positions: &Self::Ints,
        layout: RopeLayout,
    );
    /// `pool[slots[i]] = rows[i]` for rows of `width` values.
    fn write_rows(&self, pool: &mut Self::Pool, rows: &Self::Buf, slots: &Self::Ints, width: usize);
    /// Absorbed queries `[tokens, heads, latent + rope]`: per head
    /// `[q_nope · W_UK_h | q_pe]` from `q` `[tokens, heads, nope + rope]`.
    fn absorb_queries(
        &self,
        kv_b: &LinearWeight,
        q: &Self::Buf,
        dims: MlaDims,
        tokens: usize,
    ) -> Self::Buf;
    /// Attention of absorbed queries over the cached latents (values: the first `latent`
    /// of each): `[queries, heads, latent]`.
    fn mla(
        &self,
        q: &Self::Buf,
        pool: &Self::Pool,
        blocks: &QueryBlocks<Self::Ints>,
        dims: MlaDims,
        scale: f32,
    ) -> Self::Buf;
    /// Per head `W_UV_h · o_h`: `[tokens, heads, v]` from `[tokens, heads, latent]`.
    fn expand_values(
        &self,
        kv_b: &LinearWeight,
        o: &Self::Buf,
        dims: MlaDims,
        tokens: usize,
    ) -> Self::Buf;
    /// Each token's routed experts, best first (see [`router::route`]).
    fn route(
        &self,
        cfg: &ModelConfig,
        logits: &Self::Buf,
        bias: Option<&Self::Buf>,
        tokens: usize,
    ) -> Vec<Vec<(usize, f32)>>;
    /// For every `(t, weight)` of `tokens`: `out[t] += weight * ffn(x[t])`.
    fn ffn_accumulate(
        &self,
        ffn: &FfnWeights,
        x: &Self::Buf,
        tokens: &[(usize, f32)],
        out: &mut Self::Buf,
    );
}

/// The rotary tables on the device, and the host's for twins that compute on the host.
pub struct DeviceRope<B> {
    pub host: crate::model::Rope,
    pub inv_freq: B,
}

/// A whole forward pass on a device, offered by a backend through
/// [`Backend::whole_forward`].
pub trait WholeForward: Send + Sync {
    /// `Model::forward_batch` on the device; `None` when this pass cannot serve the call
    /// (it was prepared for another model), and the caller runs the per-operation path.
    fn forward_batch(
        &self,
        model: &Model,
        batch: &[BatchEntry],
        store: &mut dyn LatentStore,
        on_route: &mut RouteObserver,
    ) -> Option<Result<Vec<Option<Vec<f32>>>, ModelError>>;
}

/// The small per-layer tensors, uploaded once per model.
struct LayerTensors<B> {
    input_norm: B,
    post_attn_norm: B,
    q_a_norm: Option<B>,
    kv_a_norm: B,
    correction_bias: Option<B>,
}

/// What the device holds for one model: its small tensors and the latent cache pools,
/// one `[blocks, block_size, width]` buffer per layer.
struct Prepared<O: DeviceOps> {
    model_id: (usize, usize),
    layers: Vec<LayerTensors<O::Buf>>,
    final_norm: O::Buf,
    rope: DeviceRope<O::Buf>,
    pools: Vec<O::Pool>,
    pool_blocks: usize,
    block_size: usize,
    pool_bf16: bool,
}

/// The resident forward pass over device `ops`. In hybrid mode (`host` given), routed
/// experts without a GPU in the plan run on `host` from host RAM; otherwise every expert
/// runs on the device.
pub struct Resident<O: DeviceOps> {
    ops: Arc<O>,
    host: Option<Arc<dyn Backend>>,
    /// Where the hand-off bytes are counted (the planner's `handoff_bytes_per_token`).
    accounting: Option<Arc<dyn Accelerator>>,
    /// The in-order host thread deferred experts run on (hybrid mode).
    host_worker: Option<Arc<SimDevice>>,
    state: Mutex<Option<Prepared<O>>>,
}

impl<O: DeviceOps> Resident<O> {
    pub fn new(
        ops: Arc<O>,
        host: Option<Arc<dyn Backend>>,
        accounting: Option<Arc<dyn Accelerator>>,
    ) -> Self {
        // Without a thread for deferred experts they are computed in line (same numbers).
        let host_worker = host
            .as_ref()
            .and_then(|_| SimDevice::new("deferred-experts", u64::MAX).ok())
            .map(Arc::new);
        Resident {
            ops,
            host,
            accounting,
            host_worker,
            state: Mutex::new(None),
        }
    }

    fn prepare(&self, model: &Model) -> Prepared<O> {
        let ops = &self.ops;
        let layers = model
            .layers
            .iter()
            .map(|l| LayerTensors {
                input_norm: ops.upload(&l.input_norm),
                post_attn_norm: ops.upload(&l.post_attn_norm),
                q_a_norm: match &l.attn.q {
                    QueryProj::LowRank { norm, .. } => Some(ops.upload(norm)),
                    QueryProj::Full(_) => None,
                },
                kv_a_norm: ops.upload(&l.attn.kv_a_norm),
                correction_bias: match &l.ffn {
                    Ffn::Moe(m) => m.correction_bias.as_deref().map(|b| ops.upload(b)),
                    Ffn::Dense(_) => None,
                },
            })
            .collect();
        Prepared {
            model_id: model.embed.identity(),
            layers,
            final_norm: ops.upload(&model.norm),
            rope: DeviceRope {
                host: model.rope.clone(),
                inv_freq: ops.upload(model.rope.inv_freq()),
            },
            pools: model.layers.iter().map(|_| ops.pool(0, false)).collect(),
            pool_blocks: 0,
            block_size: 0,
            pool_bf16: false,
        }
    }

    /// Whether routed expert `f` runs on the host.
    fn on_host(&self, f: &FfnWeights) -> bool {
        self.host.is_some() && f.gpu.is_none()
    }
}

/// Where one entry's tokens sit in the pass.
struct Span {
    first: usize,
    start: usize,
    len: usize,
}

impl<O: DeviceOps> WholeForward for Resident<O> {
    fn forward_batch(
        &self,
        model: &Model,
        batch: &[BatchEntry],
        store: &mut dyn LatentStore,
        on_route: &mut RouteObserver,
    ) -> Option<Result<Vec<Option<Vec<f32>>>, ModelError>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state
            .as_ref()
            .is_some_and(|p| p.model_id != model.embed.identity())
        {
            return None;
        }
        if let Err(e) = model.check_batch(batch) {
            return Some(Err(e));
        }
        let prepared = state.get_or_insert_with(|| self.prepare(model));
        Some(Ok(self.run(model, prepared, batch, store, on_route)))
    }
}

impl<O: DeviceOps> Resident<O> {
    fn run(
        &self,
        model: &Model,
        p: &mut Prepared<O>,
        batch: &[BatchEntry],
        store: &mut dyn LatentStore,
        on_route: &mut RouteObserver,
    ) -> Vec<Option<Vec<f32>>> {
        let ops = self.ops.as_ref();
        let cfg = &model.config;
        let (h, dims) = (cfg.hidden_size, MlaDims::of(cfg));
        let width = dims.width();

        // Token layout, slots in the cache and each query's block table.
        let mut spans = Vec::with_capacity(batch.len());
        let mut first = 0;
        for e in batch {
            spans.push(Span {
                first,
                start: e.start,
                len: e.tokens.len(),
            });
            first += e.tokens.len();
        }
        let n = first;
        let tables: Vec<(usize, Vec<u32>)> = spans
            .iter()
            .enumerate()
            .map(|(s, span)| store.block_table(s, span.start + span.len))
            .collect();
        let block_size = tables.first().map_or(1, |t| t.0);
        let max_blocks = tables.iter().map(|t| t.1.len()).max().unwrap_or(1).max(1);
        let mut positions = Vec::with_capacity(n);
        let mut slots = Vec::with_capacity(n);
        let mut query_tables = Vec::with_capacity(n * max_blocks);
        let mut lens = Vec::with_capacity(n);
        for (span, (bs, table)) in spans.iter().zip(&tables) {
            for pos in span.start..span.start + span.len {
                positions.push(pos as i32);
                slots.push((table[pos / bs] as usize * bs + pos % bs) as i32);
                query_tables.extend(table.iter().map(|&b| b as i32));
                query_tables.resize(query_tables.len() + max_blocks - table.len(), 0);
                lens.push(pos as i32 + 1);
            }
        }
        let needed_blocks = tables
            .iter()
            .flat_map(|t| t.1.iter())
            .map(|&b| b as usize + 1)
            .max()
            .unwrap_or(0);
        self.ensure_pools(p, (block_size, store.bf16_latents()), needed_blocks, width);
        let positions_d = ops.upload_ints(&positions);
        let slots_d = ops.upload_ints(&slots);
        let blocks = QueryBlocks {
            tables: ops.upload_ints(&query_tables),
            lens: ops.upload_ints(&lens),
            queries: n,
            max_blocks,
            block_size,
            max_len: lens.iter().map(|&l| l as usize).max().unwrap_or(0),
        };

        let ids: Vec<u32> = batch
            .iter()
            .flat_map(|e| e.tokens.iter().copied())
            .collect();
        let mut x = ops.embed(&model.embed, &ids);
        // Host-expert outputs deferred by the previous layer (see `defer_host_experts`).
        let mut deferred: Option<Pending<Vec<f32>>> = None;
        for (l, layer) in model.layers.iter().enumerate() {
            let mut xn = ops.copy(&x);
            ops.rms_norm(&mut xn, &p.layers[l].input_norm, n, h, h, cfg.rms_norm_eps);
            let attn = self.attention(model, p, l, &xn, &positions_d, &slots_d, &blocks);
            ops.add(&mut x, &attn);
            let mut xn = ops.copy(&x);
            let post = &p.layers[l].post_attn_norm;
            ops.rms_norm(&mut xn, post, n, h, h, cfg.rms_norm_eps);
            let (out, later) = match &layer.ffn {
                Ffn::Dense(w) => {
                    let mut out = ops.zeros(n * h);
                    let all: Vec<(usize, f32)> = (0..n).map(|t| (t, 1.0)).collect();
                    ops.ffn_accumulate(w, &xn, &all, &mut out);
                    (out, None)
                }
                Ffn::Moe(_) => self.moe(model, p, l, &xn, n, &mut deferred, on_route),
            };
            ops.add(&mut x, &out);
            if let Some(d) = deferred.take().and_then(Pending::wait) {
                // The previous layer's deferred outputs, when this layer did not ship.
                ops.add(&mut x, &self.upload_handoff(&d));
            }
            deferred = later;
        }
        if let Some(d) = deferred.and_then(Pending::wait) {
            ops.add(&mut x, &self.upload_handoff(&d));
        }

        // lm_head over the rows that need logits.
        let mut rows = Vec::new();
        for (e, s) in batch.iter().zip(&spans) {
            match e.logits {
                Some(Logits::All) => rows.extend(s.first..s.first + s.len),
                Some(Logits::Last) => rows.push(s.first + s.len - 1),
                None => {}
            }
        }
        let vocab = cfg.vocab_size;
        let mut all = vec![0.0f32; rows.len() * vocab];
        if !rows.is_empty() {
            let mut picked = ops.take_rows(&x, &rows, h);
            ops.rms_norm(
                &mut picked,
                &p.final_norm,
                rows.len(),
                h,
                h,
                cfg.rms_norm_eps,
            );
            let logits = ops.linear(&model.lm_head, &picked, rows.len());
            ops.finish_download(ops.begin_download(&logits), &mut all);
        }
        let mut out = Vec::with_capacity(batch.len());
        let mut next = 0;
        for (e, s) in batch.iter().zip(&spans) {
            let count = match e.logits {
                Some(Logits::All) => s.len,
                Some(Logits::Last) => 1,
                None => 0,
            };
            out.push(
                e.logits
                    .map(|_| all[next * vocab..(next + count) * vocab].to_vec()),
            );
            next += count;
        }
        out
    }

    /// Grows every layer's pool to hold `blocks` blocks (doubling, so a growing sequence
    /// copies its cache a logarithmic number of times).
    fn ensure_pools(
        &self,
        p: &mut Prepared<O>,
        (block_size, bf16): (usize, bool),
        blocks: usize,
        width: usize,
    ) {
        if p.block_size != block_size || p.pool_bf16 != bf16 {
            // A store with another layout: start over (its blocks are all new).
            p.pools = p.pools.iter().map(|_| self.ops.pool(0, bf16)).collect();
            p.pool_blocks = 0;
            p.block_size = block_size;
            p.pool_bf16 = bf16;
        }
        if blocks <= p.pool_blocks {
            return;
        }
        let grown = blocks.max(p.pool_blocks * 2);
        for pool in p.pools.iter_mut() {
            *pool = self.ops.grow_pool(pool, grown * block_size * width);
        }
        p.pool_blocks = grown;
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        model: &Model,
        p: &mut Prepared<O>,
        l: usize,
        x: &O::Buf,
        positions: &O::Ints,
        slots: &O::Ints,
        blocks: &QueryBlocks<O::Ints>,
    ) -> O::Buf {
        let ops = self.ops.as_ref();
        let cfg = &model.config;
        let a = &model.layers[l].attn;
        let t = &p.layers[l];
        let dims = MlaDims::of(cfg);
        let (n, heads, width) = (blocks.queries, dims.heads, dims.width());
        let mut q = match (&a.q, &t.q_a_norm) {
            (QueryProj::LowRank { a: qa, b, .. }, Some(norm)) => {
                let mut lat = ops.linear(qa, x, n);
                let r = qa.rows();
                ops.rms_norm(&mut lat, norm, n, r, r, cfg.rms_norm_eps);
                ops.linear(b, &lat, n)
            }
            (QueryProj::Full(w), _) | (QueryProj::LowRank { a: w, .. }, None) => {
                ops.linear(w, x, n)
            }
        };
        let qk = dims.qk();
        let layout = |heads, token_stride, head_stride, offset| RopeLayout {
            tokens: n,
            heads,
            token_stride,
            head_stride,
            offset,
        };
        ops.rope(
            &mut q,
            &p.rope,
            positions,
            layout(heads, heads * qk, qk, dims.nope),
        );
        let mut kv = ops.linear(&a.kv_a, x, n);
        ops.rms_norm(
            &mut kv,
            &t.kv_a_norm,
            n,
            width,
            dims.latent,
            cfg.rms_norm_eps,
        );
        ops.rope(
            &mut kv,
            &p.rope,
            positions,
            layout(1, width, 0, dims.latent),
        );
        ops.write_rows(&mut p.pools[l], &kv, slots, width);
        let q_lat = ops.absorb_queries(&a.kv_b, &q, dims, n);
        let o_lat = ops.mla(&q_lat, &p.pools[l], blocks, dims, cfg.softmax_scale());
        let v = ops.expand_values(&a.kv_b, &o_lat, dims, n);
        ops.linear(&a.o, &v, n)
    }

    /// One MoE layer: the router on the device; in hybrid mode with host experts in this
    /// layer, the normalised hidden states go to the host (every token, every time: a
    /// fixed schedule) while the device computes its experts and the shared expert, and
    /// the host's sum comes back. Returns the layer's output and, with deferral, the
    /// host outputs to add after the next layer. `previous` (the last layer's deferred
    /// outputs) is taken and sent back with this layer's host sum when it ships one.
    #[allow(clippy::too_many_arguments)]
    fn moe(
        &self,
        model: &Model,
        p: &Prepared<O>,
        l: usize,
        xn: &O::Buf,
        n: usize,
        previous: &mut Option<Pending<Vec<f32>>>,
        on_route: &mut RouteObserver,
    ) -> (O::Buf, Option<Pending<Vec<f32>>>) {
        let ops = self.ops.as_ref();
        let cfg = &model.config;
        let h = cfg.hidden_size;
        let Ffn::Moe(moe) = &model.layers[l].ffn else {
            unreachable!("moe() is only called on MoE layers")
        };
        let logits = ops.linear(&moe.router, xn, n);
        let routes = ops.route(cfg, &logits, p.layers[l].correction_bias.as_ref(), n);
        let e = moe.experts.len();
        let mut device_tokens: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e];
        let mut host_tokens: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e];
        let mut later_tokens: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e];
        for (t, r) in routes.iter().enumerate() {
            on_route(l, r);
            let deferred = model.deferred_routes(moe, r);
            for &(expert, weight) in r {
                let Some(f) = moe.experts.get(expert) else {
                    continue;
                };
                let list = if !self.on_host(f) {
                    &mut device_tokens
                } else if deferred.contains(&expert) {
                    &mut later_tokens
                } else {
                    &mut host_tokens
                };
                list[expert].push((t, weight));
            }
        }
        let ships = self.host.is_some() && moe.experts.iter().any(|f| self.on_host(f));
        let download = ships.then(|| {
            self.count(|a| a.copy_to_host((n * h * 4) as u64));
            ops.begin_download(xn)
        });
        // The device's experts and the shared expert, queued while the host works.
        let mut out = ops.zeros(n * h);
        for (f, tokens) in moe.experts.iter().zip(&device_tokens) {
            if !tokens.is_empty() {
                ops.ffn_accumulate(f, xn, tokens, &mut out);
            }
        }
        if let Some(shared) = &moe.shared {
            let all: Vec<(usize, f32)> = (0..n).map(|t| (t, 1.0)).collect();
            ops.ffn_accumulate(shared, xn, &all, &mut out);
        }
        let (Some(download), Some(host)) = (download, &self.host) else {
            return (out, None);
        };
        let mut host_x = vec![0.0f32; n * h];
        ops.finish_download(download, &mut host_x);
        let mut host_out = vec![0.0f32; n * h];
        host.moe_accumulate(&work(&moe.experts, &host_tokens), &host_x, &mut host_out);
        // Experts deferred to the next layer run on the host worker, overlapping the
        // device's next attention block.
        let later_work: Vec<(FfnWeights, Vec<(usize, f32)>)> = work(&moe.experts, &later_tokens)
            .into_iter()
            .map(|(f, t)| (f.clone(), t.to_vec()))
            .collect();
        let later = (!later_work.is_empty()).then(|| {
            let host = host.clone();
            let compute = move || {
                let refs: Vec<(&FfnWeights, &[(usize, f32)])> =
                    later_work.iter().map(|(f, t)| (f, t.as_slice())).collect();
                let mut d = vec![0.0f32; host_x.len()];
                host.moe_accumulate(&refs, &host_x, &mut d);
                d
            };
            match &self.host_worker {
                Some(worker) => launch(worker.as_ref(), compute),
                None => Pending::ready(compute()),
            }
        });
        if let Some(d) = previous.take().and_then(Pending::wait) {
            for (a, b) in host_out.iter_mut().zip(&d) {
                *a += b;
            }
        }
        ops.add(&mut out, &self.upload_handoff(&host_out));
        (out, later)
    }

    /// Host results back to the device, counted as hand-off bytes.
    fn upload_handoff(&self, x: &[f32]) -> O::Buf {
        self.count(|a| a.copy_to_device((x.len() * 4) as u64));
        self.ops.upload_staged(x)
    }

    fn count(&self, f: impl FnOnce(&dyn Accelerator)) {
        if let Some(a) = &self.accounting {
            f(a.as_ref());
        }
    }
}

/// The (expert, tokens) pairs of the experts some token visits, in expert order.
fn work<'a>(
    experts: &'a [FfnWeights],
    tokens: &'a [Vec<(usize, f32)>],
) -> Vec<(&'a FfnWeights, &'a [(usize, f32)])> {
    experts
        .iter()
        .zip(tokens)
        .filter(|(_, t)| !t.is_empty())
        .map(|(f, t)| (f, t.as_slice()))
        .collect()
}

/// A per-operation backend together with a whole-pass one: the model's forward passes
/// run resident on the device, every other caller (benchmarks, tools) uses the
/// per-operation methods.
pub struct ResidentBackend {
    per_op: Arc<dyn Backend>,
    whole: Box<dyn WholeForward>,
}

impl ResidentBackend {
    pub fn new(per_op: Arc<dyn Backend>, whole: Box<dyn WholeForward>) -> Self {
        ResidentBackend { per_op, whole }
    }
}

impl Backend for ResidentBackend {
    fn name(&self) -> &'static str {
        self.per_op.name()
    }

    fn linear(&self, w: &LinearWeight, rows: Range<usize>, x: &[f32], y: &mut [f32]) {
        self.per_op.linear(w, rows, x, y)
    }

    fn linear_transposed(&self, w: &LinearWeight, rows: Range<usize>, x: &[f32], y: &mut [f32]) {
        self.per_op.linear_transposed(w, rows, x, y)
    }

    fn ffn_accumulate(
        &self,
        ffn: &FfnWeights,
        x: &[f32],
        tokens: &[(usize, f32)],
        out: &mut [f32],
    ) {
        self.per_op.ffn_accumulate(ffn, x, tokens, out)
    }

    fn ffn_contributions(&self, ffn: &FfnWeights, x: &[f32], tokens: &[(usize, f32)]) -> Vec<f32> {
        self.per_op.ffn_contributions(ffn, x, tokens)
    }

    fn moe_accumulate(&self, work: &[(&FfnWeights, &[(usize, f32)])], x: &[f32], out: &mut [f32]) {
        self.per_op.moe_accumulate(work, x, out)
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
        self.per_op.attention(q, k, v, shape, positions, scale, out)
    }

    fn whole_forward(&self) -> Option<&dyn WholeForward> {
        Some(self.whole.as_ref())
    }
}

/// Routes every token from router logits on the host (the twin's routing, and the
/// reference the device router is tested against).
pub fn route_on_host(
    cfg: &ModelConfig,
    logits: &[f32],
    bias: Option<&[f32]>,
) -> Vec<Vec<(usize, f32)>> {
    let e = cfg.n_routed_experts;
    logits
        .chunks_exact(e.max(1))
        .map(|row| router::route(cfg, row, bias))
        .collect()
}
