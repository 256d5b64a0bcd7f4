//! The resident pass itself, over one device or several.
//!
//! One device: every token's attention, dense layers, shared experts and the device's
//! routed experts run there; in hybrid mode the host computes the experts in its RAM
//! from a hand-off of each MoE layer's hidden states (see [`Pass::moe_one_device`]).
//!
//! Several devices (all-GPU plans with data-parallel attention): each sequence lives on
//! one device, chosen by the partition of the engine's block pool its blocks come from,
//! so its latents never move; attention, dense layers, shared experts and routers run
//! on the device of each sequence, and every routed expert runs on the device its plan
//! gives it, fed by an exchange of hidden states (see [`super::exchange`]).

use super::exchange::exchange_experts;
use super::handoff::{HandoffCounter, HostWorker, Pending};
use super::layout::{block_tables, ensure_pools, Group, Layout};
use super::tensor::HeadSplit;
use super::{DeviceOps, DeviceRope, Fabric, Forward, MlaDims, ReplayKey, RopeLayout, ThroughHost};
use crate::device::cpu::kernels::{CpuKernels, FfnWeights};
use crate::device::DeviceResult;
use crate::model::{
    expert_work, AttentionForm, BatchEntry, Ffn, LatentStore, Logits, Model, ModelError, QueryProj,
    RouteObserver,
};
use std::sync::{Arc, Mutex};

/// Host experts' sums still being computed (deferred to the next layer).
type HostSums = Pending<Vec<f32>>;

/// The small per-layer tensors, uploaded once per model.
pub(super) struct LayerTensors<B> {
    pub(super) input_norm: B,
    pub(super) post_attn_norm: B,
    q_a_norm: Option<B>,
    kv_a_norm: B,
    correction_bias: Option<B>,
}

/// What one device holds for one model: its small tensors and the latent cache pools,
/// one `[blocks, block_size, width]` buffer per layer.
pub(super) struct Prepared<O: DeviceOps> {
    model_id: u64,
    layers: Vec<LayerTensors<O::Buf>>,
    final_norm: O::Buf,
    rope: DeviceRope<O::Buf>,
    pub(super) pools: Vec<O::Pool>,
    pub(super) pool_blocks: usize,
    pub(super) block_size: usize,
    pub(super) pool_bf16: bool,
    /// Bumped whenever the pools move (see [`ReplayKey`]).
    pub(super) pool_generation: u64,
    /// Fixed buffers of recorded decode steps, least recently used first.
    decode_io: Vec<DecodeIo<O>>,
}

/// The most tokens (sequences) a recorded decode step takes; larger steps run as they are.
pub(super) const MAX_RECORDED_TOKENS: usize = 64;
/// Sets of fixed decode buffers a device keeps (each a token count and table width).
const MAX_DECODE_IOS: usize = 8;

/// The fixed buffers a recorded decode step of `group.tokens` tokens and block tables
/// `bufs.width` wide works in: its indices and the rest of [`Recorded`]. While a step
/// runs, its group and residual stream are out (in the pass's shares and residuals).
pub(super) struct DecodeIo<O: DeviceOps> {
    group: Group<O>,
    bufs: Recorded<O>,
}

impl<O: DeviceOps> DecodeIo<O> {
    fn fits(&self, layout: &Layout) -> bool {
        self.group.tokens == layout.tokens()
            && self.group.blocks.block_size == layout.block_size
            && self.bufs.width == layout.recorded_width()
    }
}

/// A recorded decode step's fixed buffers other than its group: the residual stream
/// (until the step's embeddings are copied into it and it takes their place), the
/// post-attention norm, the dense MLP's or shared expert's output and the router logits.
pub(super) struct Recorded<O: DeviceOps> {
    id: u64,
    width: usize,
    x: Option<O::Buf>,
    pub(super) xn: O::Buf,
    ffn: O::Buf,
    logits: O::Buf,
}

/// What a recorded layer computed beside its attention, for the layer's FFN: the dense
/// MLP's or shared expert's output and the router logits (MoE layers).
pub(super) struct Computed<'a, B> {
    pub(super) ffn: Option<&'a B>,
    pub(super) logits: Option<&'a B>,
}

impl<B> Computed<'_, B> {
    fn none() -> Self {
        Computed {
            ffn: None,
            logits: None,
        }
    }
}

/// A process-wide number for each set of fixed decode buffers, so a recording is never
/// replayed on buffers other than its own.
fn next_io_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Puts a recorded step's buffers back as the most recently used, dropping the least
/// recently used beyond [`MAX_DECODE_IOS`].
pub(super) fn keep_decode_io<O: DeviceOps>(p: &mut Prepared<O>, io: DecodeIo<O>) {
    p.decode_io.push(io);
    if p.decode_io.len() > MAX_DECODE_IOS {
        p.decode_io.remove(0);
    }
}

impl<O: DeviceOps> Prepared<O> {
    pub(super) fn correction_bias(&self, layer: usize) -> Option<&O::Buf> {
        self.layers[layer].correction_bias.as_ref()
    }

    pub(super) fn layer(&self, layer: usize) -> &LayerTensors<O::Buf> {
        &self.layers[layer]
    }
}

/// The resident forward pass over one or more devices. With `host` (hybrid mode: one
/// device, or a pipeline), routed experts without a GPU in the plan run on `host` from
/// host RAM; otherwise every expert runs on a device (the one its plan names, or the
/// first).
pub struct Pass<O: DeviceOps> {
    devices: Vec<Arc<O>>,
    host: Option<Arc<dyn CpuKernels>>,
    /// Where the hand-off bytes are counted (the planner's `handoff_bytes_per_token`).
    accounting: Option<Arc<HandoffCounter>>,
    /// The in-order host thread deferred experts run on (hybrid mode).
    host_worker: Option<HostWorker>,
    /// Pipeline layout: the device of each decoder layer (hybrid plans over several
    /// GPUs give each GPU a contiguous range of layers).
    layer_devices: Option<Vec<usize>>,
    /// How hidden states move between devices (several devices only).
    fabric: Arc<dyn Fabric<O>>,
    /// Tensor-parallel attention: the heads each device computes.
    split: Option<HeadSplit>,
    /// Data-parallel devices: the lm_head split by vocabulary (see [`super::vocab`]).
    vocab: Option<super::VocabSplit>,
    state: Mutex<Option<Vec<Prepared<O>>>>,
}

impl<O: DeviceOps> Pass<O> {
    /// On one device; with `host` (hybrid), the experts the plan leaves in host RAM run
    /// there, their hand-off bytes counted on `accounting`.
    pub fn new(
        ops: Arc<O>,
        host: Option<Arc<dyn CpuKernels>>,
        accounting: Option<Arc<HandoffCounter>>,
    ) -> Self {
        Self::build(vec![ops], None, host, accounting)
    }

    /// On several devices with data-parallel attention (all-GPU plans): each routed
    /// expert runs on its plan's device.
    pub fn on_devices(devices: Vec<Arc<O>>) -> Self {
        Self::build(devices, None, None, None)
    }

    fn build(
        devices: Vec<Arc<O>>,
        layer_devices: Option<Vec<usize>>,
        host: Option<Arc<dyn CpuKernels>>,
        accounting: Option<Arc<HandoffCounter>>,
    ) -> Self {
        // Without a thread for deferred experts they are computed in line (same numbers).
        let host_worker = host
            .as_ref()
            .and_then(|_| HostWorker::new("deferred-experts").ok());
        Pass {
            devices,
            host,
            accounting,
            host_worker,
            layer_devices,
            fabric: Arc::new(ThroughHost),
            split: None,
            vocab: None,
            state: Mutex::new(None),
        }
    }

    /// On several devices with tensor-parallel attention (all-GPU plans with fewer
    /// sequences than GPUs): `split` says which heads each device computes, and each
    /// routed expert runs on its plan's device (see [`super::tensor`]).
    pub fn tensor_parallel(devices: Vec<Arc<O>>, split: HeadSplit) -> Self {
        let mut r = Self::build(devices, None, None, None);
        r.split = Some(split);
        r
    }

    /// Splits the lm_head by vocabulary over the devices (data-parallel all-GPU plans,
    /// which budget 1/N of it per GPU): each device holds `split`'s band of it.
    pub fn with_vocab_split(mut self, split: super::VocabSplit) -> Self {
        self.vocab = Some(split);
        self
    }

    /// Moves between devices through `fabric` instead of host memory.
    pub fn with_fabric(mut self, fabric: Arc<dyn Fabric<O>>) -> Self {
        self.fabric = fabric;
        self
    }

    /// The heads each device computes (tensor-parallel passes).
    pub fn head_split(&self) -> Option<&HeadSplit> {
        self.split.as_ref()
    }

    /// The lm_head's band on each device (data-parallel passes).
    pub fn vocab_split(&self) -> Option<&super::VocabSplit> {
        self.vocab.as_ref()
    }

    pub(super) fn fabric(&self) -> &dyn Fabric<O> {
        self.fabric.as_ref()
    }

    pub(super) fn devices(&self) -> &[Arc<O>] {
        &self.devices
    }

    /// Layer-pipelined over several devices: decoder layer `l` (its attention, latent
    /// cache, dense or shared FFN and device experts) runs on `devices[layer_devices[l]]`
    /// and the residual stream moves between devices at the boundaries; `host` computes
    /// the experts in host RAM, with each layer's hand-off from that layer's device.
    pub fn pipeline(
        devices: Vec<Arc<O>>,
        layer_devices: Vec<usize>,
        host: Option<Arc<dyn CpuKernels>>,
        accounting: Option<Arc<HandoffCounter>>,
    ) -> Self {
        let d = devices.len().max(1);
        let layer_devices = layer_devices.into_iter().map(|g| g % d).collect();
        Self::build(devices, Some(layer_devices), host, accounting)
    }

    /// The device that runs layer `l` for a share placed on `home`.
    fn layer_device(&self, l: usize, home: usize) -> usize {
        match &self.layer_devices {
            Some(ld) => ld.get(l).copied().unwrap_or(0),
            None => home,
        }
    }

    fn prepare(&self, ops: &O, model: &Model) -> DeviceResult<Prepared<O>> {
        let layers = model
            .layers
            .iter()
            .map(|l| {
                Ok(LayerTensors {
                    input_norm: ops.upload(&l.input_norm)?,
                    post_attn_norm: ops.upload(&l.post_attn_norm)?,
                    q_a_norm: match &l.attn.q {
                        QueryProj::LowRank { norm, .. } => Some(ops.upload(norm)?),
                        QueryProj::Full(_) => None,
                    },
                    kv_a_norm: ops.upload(&l.attn.kv_a_norm)?,
                    correction_bias: match &l.ffn {
                        Ffn::Moe(m) => match m.correction_bias.as_deref() {
                            Some(b) => Some(ops.upload(b)?),
                            None => None,
                        },
                        Ffn::Dense(_) => None,
                    },
                })
            })
            .collect::<DeviceResult<_>>()?;
        Ok(Prepared {
            model_id: model.id,
            layers,
            final_norm: ops.upload(&model.norm)?,
            rope: DeviceRope {
                host: model.rope.clone(),
                inv_freq: ops.upload(model.rope.inv_freq())?,
            },
            pools: model
                .layers
                .iter()
                .map(|_| ops.pool(0, false))
                .collect::<DeviceResult<_>>()?,
            pool_blocks: 0,
            block_size: 0,
            pool_bf16: false,
            pool_generation: 0,
            decode_io: Vec::new(),
        })
    }

    /// Whether routed expert `f` runs on the host (hybrid mode, no GPU in the plan).
    fn on_host(&self, f: &FfnWeights) -> bool {
        self.host.is_some() && f.gpu.is_none()
    }

    /// The device routed expert `f` runs on when several devices share the experts.
    pub(super) fn expert_device(&self, f: &FfnWeights) -> usize {
        f.gpu.unwrap_or(0) % self.devices.len()
    }

    pub(super) fn device(&self, g: usize) -> &O {
        &self.devices[g]
    }
}

impl<O: DeviceOps> Forward for Pass<O> {
    fn forward_batch(
        &self,
        model: &Model,
        batch: &[BatchEntry],
        store: &mut dyn LatentStore,
        form: AttentionForm,
        on_route: &mut RouteObserver,
    ) -> Result<Vec<Option<Vec<f32>>>, ModelError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state
            .as_ref()
            .and_then(|p| p.first())
            .is_some_and(|p| p.model_id != model.id)
        {
            // Another model: what was prepared for the last one goes.
            *state = None;
        }
        model.check_batch(batch)?;
        let failed = |e: crate::device::DeviceError| {
            eprintln!("error: {e}");
            ModelError::Device(e.to_string())
        };
        if state.is_none() {
            let prepared = self
                .devices
                .iter()
                .map(|ops| self.prepare(ops, model))
                .collect::<DeviceResult<_>>()
                .map_err(failed)?;
            *state = Some(prepared);
        }
        let Some(prepared) = state.as_mut() else {
            unreachable!("prepared just above")
        };
        // A device failure mid-pass (out of memory while the latent pools grow for a long
        // batch, a lost GPU) fails this batch, not the process: the pass's buffers are
        // freed as it returns, and the pools keep their layout (they are replaced only
        // once every layer's bigger pool exists).
        self.run(model, prepared, batch, store, form, on_route)
            .map_err(failed)
    }

    fn devices(&self) -> usize {
        // Tensor-parallel devices all hold every sequence's latents.
        if self.split.is_some() {
            1
        } else {
            self.devices.len()
        }
    }
}

impl<O: DeviceOps> Pass<O> {
    fn run(
        &self,
        model: &Model,
        prepared: &mut [Prepared<O>],
        batch: &[BatchEntry],
        store: &mut dyn LatentStore,
        form: AttentionForm,
        on_route: &mut RouteObserver,
    ) -> DeviceResult<Vec<Option<Vec<f32>>>> {
        if let Some(split) = &self.split {
            let io = (batch, store, form);
            return self.run_tensor_parallel(split, model, prepared, io, on_route);
        }
        let cfg = &model.config;
        let h = cfg.hidden_size;
        // Per share of the batch, its placements (one per device it visits); a decode step
        // on recording devices works in each device's fixed buffers.
        let layouts = self.layouts(model, prepared, batch, store)?;
        let (shares, mut recorded): (_, Option<Vec<Recorded<O>>>) = if self
            .recordable(batch, &layouts)
        {
            let mut shares = Vec::with_capacity(layouts.len());
            let mut recorded = Vec::with_capacity(layouts.len());
            for (layout, devices) in &layouts {
                let d = devices[0];
                let (group, r) = fixed_share(self.device(d), &mut prepared[d], model, layout, d)?;
                shares.push(vec![group]);
                recorded.push(r);
            }
            (shares, Some(recorded))
        } else {
            let shares: Vec<Vec<Group<O>>> = layouts
                .iter()
                .map(|(layout, devices)| {
                    devices
                        .iter()
                        .map(|&d| layout.place(self.device(d), d))
                        .collect()
                })
                .collect::<DeviceResult<_>>()?;
            (shares, None)
        };
        let mut xs: Vec<(usize, O::Buf)> = shares
            .iter()
            .map(|placed| {
                let g = self.placement(placed, 0);
                let ids: Vec<u32> = g
                    .entries
                    .iter()
                    .flat_map(|&e| batch[e].tokens.iter().copied())
                    .collect();
                Ok((g.device, self.devices[g.device].embed(&model.embed, &ids)?))
            })
            .collect::<DeviceResult<_>>()?;
        for (r, (at, x)) in recorded.iter_mut().flatten().zip(xs.iter_mut()) {
            r.hold_residual(self.device(*at), x)?;
        }
        let one_device_moe =
            shares.len() == 1 && (self.devices.len() == 1 || self.layer_devices.is_some());
        // Host-expert outputs deferred by the previous layer (see `defer_host_experts`).
        let mut deferred: Option<Pending<Vec<f32>>> = None;
        for (l, layer) in model.layers.iter().enumerate() {
            let groups: Vec<&Group<O>> = shares.iter().map(|p| self.placement(p, l)).collect();
            let mut normed_here = Vec::with_capacity(groups.len());
            for (share, (g, (at, x))) in groups.iter().zip(xs.iter_mut()).enumerate() {
                if *at != g.device {
                    *x = self.move_rows(x, *at, g.device, g.tokens * h)?;
                    *at = g.device;
                }
                let (ops, p) = (self.devices[g.device].as_ref(), &mut prepared[g.device]);
                if let Some(r) = recorded.as_mut().and_then(|r| r.get_mut(share)) {
                    recorded_attention(ops, model, p, l, x, g, r)?;
                    continue;
                }
                let n = g.tokens;
                let xn = normed(ops, x, &p.layers[l].input_norm, n, h, cfg.rms_norm_eps)?;
                let w = AttnWeights::whole(model, l);
                let attn = attention(ops, model, p, l, &xn, g, &w, form)?;
                ops.add(x, &attn)?;
                let post = &p.layers[l].post_attn_norm;
                normed_here.push(normed(ops, x, post, n, h, cfg.rms_norm_eps)?);
            }
            // Each group's post-attention norm: a recorded step's stays in its fixed buffer.
            let xns: Vec<&O::Buf> = match &recorded {
                Some(rs) => rs.iter().map(|r| &r.xn).collect(),
                None => normed_here.iter().collect(),
            };
            let mut later = None;
            // Per group, what its recorded block computed of the FFN (nothing otherwise).
            let computed: Vec<Computed<O::Buf>> = match &recorded {
                Some(rs) => rs.iter().map(|r| r.computed(&layer.ffn)).collect(),
                None => groups.iter().map(|_| Computed::none()).collect(),
            };
            let outs = match &layer.ffn {
                Ffn::Dense(_) if recorded.is_some() => groups
                    .iter()
                    .zip(&computed)
                    .filter_map(|(g, c)| c.ffn.map(|f| self.device(g.device).copy(f)))
                    .collect::<DeviceResult<_>>()?,
                Ffn::Dense(w) => groups
                    .iter()
                    .zip(&xns)
                    .map(|(g, xn)| {
                        let ops = self.devices[g.device].as_ref();
                        let mut out = ops.zeros(g.tokens * h)?;
                        let all: Vec<(usize, f32)> = (0..g.tokens).map(|t| (t, 1.0)).collect();
                        ops.ffn_accumulate(w, xn, &all, &mut out)?;
                        Ok(out)
                    })
                    .collect::<DeviceResult<_>>()?,
                Ffn::Moe(_) if one_device_moe => {
                    let g = groups[0];
                    let p = &prepared[g.device];
                    let (out, after) = self.moe_one_device(
                        model,
                        p,
                        l,
                        (xns[0], &computed[0]),
                        g,
                        &mut deferred,
                        on_route,
                    )?;
                    later = after;
                    vec![out]
                }
                Ffn::Moe(_) => {
                    let inputs = (&xns[..], &computed[..]);
                    exchange_experts(self, model, prepared, l, &groups, inputs, on_route)?
                }
            };
            self.add_outputs(&groups, &mut xs, &outs)?;
            if let Some(d) = deferred.take().and_then(Pending::wait) {
                // The previous layer's deferred outputs, when this layer did not ship.
                let (at, x) = &mut xs[0];
                let ops = self.device(*at);
                ops.add(x, &self.upload_handoff(ops, &d)?)?;
            }
            deferred = later;
        }
        if let Some(d) = deferred.and_then(Pending::wait) {
            let (at, x) = &mut xs[0];
            let ops = self.device(*at);
            ops.add(x, &self.upload_handoff(ops, &d)?)?;
        }
        let logits = self.logits(model, prepared, batch, &shares, &xs)?;
        // A recorded step's buffers go back to their devices for the next step.
        for ((r, mut placed), (device, x)) in recorded.into_iter().flatten().zip(shares).zip(xs) {
            if let Some(group) = placed.pop() {
                keep_decode_io(&mut prepared[device], r.into_io(group, x));
            }
        }
        Ok(logits)
    }

    /// Whether a pass with these layouts runs as a recorded decode step: every device
    /// records, each share runs on one device (no pipeline, no head split), every entry
    /// adds one token and no share has more than [`MAX_RECORDED_TOKENS`].
    fn recordable(&self, batch: &[BatchEntry], layouts: &[(Layout, Vec<usize>)]) -> bool {
        self.layer_devices.is_none()
            && self.split.is_none()
            && self.devices.iter().all(|d| d.records())
            && !batch.is_empty()
            && batch.iter().all(|e| e.tokens.len() == 1)
            && layouts.iter().all(|(layout, devices)| {
                devices.len() == 1 && layout.tokens() <= MAX_RECORDED_TOKENS
            })
    }

    /// The placement of a share that runs layer `l`.
    fn placement<'a>(&self, placed: &'a [Group<O>], l: usize) -> &'a Group<O> {
        let device = self.layer_device(l, placed[0].device);
        placed
            .iter()
            .find(|g| g.device == device)
            .unwrap_or(&placed[0])
    }

    /// `n` values of `x` from device `from` to device `to` (through host memory).
    fn move_rows(&self, x: &O::Buf, from: usize, to: usize, n: usize) -> DeviceResult<O::Buf> {
        let mut host = vec![0.0f32; n];
        let src = self.device(from);
        src.finish_download(src.begin_download(x)?, &mut host)?;
        self.device(to).upload_staged(&host)
    }

    fn add_outputs(
        &self,
        groups: &[&Group<O>],
        xs: &mut [(usize, O::Buf)],
        outs: &[O::Buf],
    ) -> DeviceResult<()> {
        for ((g, (_, x)), out) in groups.iter().zip(xs.iter_mut()).zip(outs) {
            self.devices[g.device].add(x, out)?;
        }
        Ok(())
    }

    /// Splits the batch into shares and says which devices each runs on: with
    /// data-parallel devices, one share per device holding the sequences whose blocks
    /// lie in that device's partition of the store; otherwise one share, on the first
    /// device or, pipelined, on every device that runs layers. A layout holds positions,
    /// cache slots and block tables in the devices' own block numbering, and the
    /// devices' pools (for their layers) are grown to hold them.
    fn layouts(
        &self,
        model: &Model,
        prepared: &mut [Prepared<O>],
        batch: &[BatchEntry],
        store: &mut dyn LatentStore,
    ) -> DeviceResult<Vec<(Layout, Vec<usize>)>> {
        let d = self.devices.len();
        // A store split into one partition per device keeps each sequence's blocks in
        // one partition (block id mod d): data-parallel. Other stores, and pipelines,
        // keep every sequence in one share.
        let partitioned = d > 1 && self.layer_devices.is_none() && store.partitions() == d;
        let tables = block_tables(batch, store);
        let bf16 = store.bf16_latents();
        let share_of = |t: &[u32]| match (partitioned, t.first()) {
            (true, Some(&b)) => b as usize % d,
            _ => 0,
        };
        let local = |b: u32| {
            if partitioned {
                b as usize / d
            } else {
                b as usize
            }
        };
        let width = MlaDims::of(&model.config).width();
        let layers = model.layers.len();
        let mut shares = Vec::new();
        for share in 0..d {
            let entries: Vec<usize> = (0..batch.len())
                .filter(|&i| share_of(&tables[i].1) == share)
                .collect();
            if entries.is_empty() {
                continue;
            }
            let layout = Layout::new(batch, &tables, entries, &local);
            let devices: Vec<usize> = match &self.layer_devices {
                Some(ld) => (0..d).filter(|g| ld.contains(g)).collect(),
                None => vec![share],
            };
            for &device in &devices {
                let ops = self.devices[device].as_ref();
                let owned = |l: usize| self.layer_device(l, device) == device;
                ensure_pools(
                    ops,
                    &mut prepared[device],
                    (layout.block_size, bf16),
                    layout.needed_blocks,
                    width,
                    (0..layers).filter(|&l| owned(l)),
                )?;
            }
            shares.push((layout, devices));
        }
        Ok(shares)
    }

    /// The lm_head over the rows that need logits, on each device for its entries;
    /// returned in batch order.
    fn logits(
        &self,
        model: &Model,
        prepared: &[Prepared<O>],
        batch: &[BatchEntry],
        shares: &[Vec<Group<O>>],
        xs: &[(usize, O::Buf)],
    ) -> DeviceResult<Vec<Option<Vec<f32>>>> {
        let cfg = &model.config;
        let (h, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let mut out: Vec<Option<Vec<f32>>> = vec![None; batch.len()];
        if let Some(split) = self.vocab.as_ref().filter(|_| self.devices.len() > 1) {
            // Every share's rows through the final norm on its device, then every
            // device's band of all of them.
            let mut picked = Vec::new();
            let mut counted = Vec::new();
            for (placed, (device, x)) in shares.iter().zip(xs) {
                let g = last_placement(placed, *device);
                let rows = logit_rows(batch, g);
                if !rows.is_empty() {
                    let ops = self.devices[g.device].as_ref();
                    let p = &prepared[g.device];
                    let x = final_rows(ops, p, x, &rows, h, cfg.rms_norm_eps)?;
                    picked.push((g.device, x, rows.len()));
                }
                counted.push((g, rows.len()));
            }
            let all = split.logits(&self.devices, self.fabric(), picked, vocab)?;
            let mut at = 0;
            for (g, n) in counted {
                hand_out_logits(
                    batch,
                    g,
                    &all[at * vocab..(at + n) * vocab],
                    vocab,
                    &mut out,
                );
                at += n;
            }
            return Ok(out);
        }
        for (placed, (device, x)) in shares.iter().zip(xs) {
            let g = last_placement(placed, *device);
            let ops = self.devices[g.device].as_ref();
            let rows = logit_rows(batch, g);
            let mut all = vec![0.0f32; rows.len() * vocab];
            if !rows.is_empty() {
                let picked = final_rows(ops, &prepared[g.device], x, &rows, h, cfg.rms_norm_eps)?;
                let logits = ops.linear(&model.lm_head, &picked, rows.len())?;
                ops.finish_download(ops.begin_download(&logits)?, &mut all)?;
            }
            hand_out_logits(batch, g, &all, vocab, &mut out);
        }
        Ok(out)
    }

    /// One MoE layer on one device: the router there; in hybrid mode with host experts
    /// in this layer, the normalised hidden states go to the host (every token, every
    /// time: a fixed schedule) while the device computes its experts and the shared
    /// expert, and the host's sum comes back. Returns the layer's output and, with
    /// deferral, the host outputs to add after the next layer. `previous` (the last
    /// layer's deferred outputs) is taken and sent back with this layer's host sum when
    /// it ships one.
    #[allow(clippy::too_many_arguments)]
    fn moe_one_device(
        &self,
        model: &Model,
        p: &Prepared<O>,
        l: usize,
        (xn, computed): (&O::Buf, &Computed<O::Buf>),
        group: &Group<O>,
        previous: &mut Option<Pending<Vec<f32>>>,
        on_route: &mut RouteObserver,
    ) -> DeviceResult<(O::Buf, Option<HostSums>)> {
        let ops = self.device(group.device);
        let cfg = &model.config;
        let (h, n) = (cfg.hidden_size, group.tokens);
        let Ffn::Moe(moe) = &model.layers[l].ffn else {
            unreachable!("moe_one_device() is only called on MoE layers")
        };
        let own;
        let logits = match computed.logits {
            Some(logits) => logits,
            None => {
                own = ops.linear(&moe.router, xn, n)?;
                &own
            }
        };
        let routes = ops.route(cfg, logits, p.correction_bias(l), n)?;
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
        let ships = moe.experts.iter().any(|f| self.on_host(f));
        let download = if ships {
            self.count(|a| a.copied_to_host((n * h * 4) as u64));
            Some(ops.begin_download(xn)?)
        } else {
            None
        };
        // The device's experts and the shared expert, queued while the host works.
        let mut out = ops.zeros(n * h)?;
        ops.experts_accumulate(&expert_work(&moe.experts, &device_tokens), xn, &mut out)?;
        match (&moe.shared, computed.ffn) {
            (Some(_), Some(shared_out)) => ops.add(&mut out, shared_out)?,
            (Some(shared), None) => {
                let all: Vec<(usize, f32)> = (0..n).map(|t| (t, 1.0)).collect();
                ops.ffn_accumulate(shared, xn, &all, &mut out)?;
            }
            (None, _) => {}
        }
        let (Some(download), Some(host)) = (download, &self.host) else {
            return Ok((out, None));
        };
        let mut host_x = vec![0.0f32; n * h];
        ops.finish_download(download, &mut host_x)?;
        let mut host_out = vec![0.0f32; n * h];
        host.moe_accumulate(
            &expert_work(&moe.experts, &host_tokens),
            &host_x,
            &mut host_out,
        );
        // Experts deferred to the next layer run on the host worker, overlapping the
        // device's next attention block.
        let later_work: Vec<(FfnWeights, Vec<(usize, f32)>)> =
            expert_work(&moe.experts, &later_tokens)
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
                Some(worker) => worker.run(compute),
                None => Pending::ready(compute()),
            }
        });
        if let Some(d) = previous.take().and_then(Pending::wait) {
            for (a, b) in host_out.iter_mut().zip(&d) {
                *a += b;
            }
        }
        ops.add(&mut out, &self.upload_handoff(ops, &host_out)?)?;
        Ok((out, later))
    }

    /// Host results back to a device, counted as hand-off bytes.
    fn upload_handoff(&self, ops: &O, x: &[f32]) -> DeviceResult<O::Buf> {
        self.count(|a| a.copied_to_device((x.len() * 4) as u64));
        ops.upload_staged(x)
    }

    fn count(&self, f: impl FnOnce(&HandoffCounter)) {
        if let Some(a) = &self.accounting {
            f(a);
        }
    }
}

/// A copy of `x` (`n` rows of `h` values) through RMSNorm with weights `w`.
pub(super) fn normed<O: DeviceOps>(
    ops: &O,
    x: &O::Buf,
    w: &O::Buf,
    n: usize,
    h: usize,
    eps: f32,
) -> DeviceResult<O::Buf> {
    let mut xn = ops.copy(x)?;
    ops.rms_norm(&mut xn, w, n, h, h, eps)?;
    Ok(xn)
}

impl<O: DeviceOps> Recorded<O> {
    /// The fixed buffers again as one set, with the step's group and residual stream.
    pub(super) fn into_io(self, group: Group<O>, x: O::Buf) -> DecodeIo<O> {
        let bufs = Recorded { x: Some(x), ..self };
        DecodeIo { group, bufs }
    }

    /// The key of step `step` of a pass on these buffers with pools of `generation`.
    pub(super) fn key(&self, generation: u64, step: usize) -> ReplayKey {
        ReplayKey {
            io: self.id,
            generation,
            step,
        }
    }

    /// Moves the step's input into the fixed residual buffer, which takes its place in
    /// `x` (once per step).
    pub(super) fn hold_residual(&mut self, ops: &O, x: &mut O::Buf) -> DeviceResult<()> {
        if let Some(mut fixed) = self.x.take() {
            ops.copy_into(&mut fixed, x)?;
            *x = fixed;
        }
        Ok(())
    }

    /// What [`recorded_attention`] computed for a layer with this FFN.
    fn computed(&self, ffn: &Ffn) -> Computed<'_, O::Buf> {
        match ffn {
            Ffn::Dense(_) => Computed {
                ffn: Some(&self.ffn),
                logits: None,
            },
            Ffn::Moe(m) => Computed {
                ffn: m.shared.as_ref().map(|_| &self.ffn),
                logits: Some(&self.logits),
            },
        }
    }
}

/// A recorded decode step's share on device `device`: the device's fixed group for the
/// layout's token count, block size and table width (made on first use) with this step's
/// indices written into it, and the rest of its fixed buffers.
pub(super) fn fixed_share<O: DeviceOps>(
    ops: &O,
    p: &mut Prepared<O>,
    model: &Model,
    layout: &Layout,
    device: usize,
) -> DeviceResult<(Group<O>, Recorded<O>)> {
    let n = layout.tokens() * model.config.hidden_size;
    let width = layout.recorded_width();
    let mut io = match p.decode_io.iter().position(|io| io.fits(layout)) {
        Some(i) => p.decode_io.remove(i),
        None => DecodeIo {
            group: layout.place_recorded(ops, device, width)?,
            bufs: Recorded {
                id: next_io_id(),
                width,
                x: Some(ops.zeros(n)?),
                xn: ops.zeros(n)?,
                ffn: ops.zeros(n)?,
                logits: ops.zeros(layout.tokens() * model.config.n_routed_experts)?,
            },
        },
    };
    layout.write_recorded(ops, &mut io.group)?;
    Ok((io.group, io.bufs))
}

/// Layer `l`'s attention block of a recorded decode step and what of its FFN needs no
/// routes, through [`DeviceOps::replay`]: the residual `x` gains the attention output,
/// `r.xn` holds the post-attention norm, `r.ffn` the dense MLP's or shared expert's
/// output and `r.logits` the router logits (see [`Recorded::computed`]), every buffer
/// fixed for the step's key.
fn recorded_attention<O: DeviceOps>(
    ops: &O,
    model: &Model,
    p: &mut Prepared<O>,
    l: usize,
    x: &mut O::Buf,
    g: &Group<O>,
    r: &mut Recorded<O>,
) -> DeviceResult<()> {
    let cfg = &model.config;
    let (n, h, eps) = (g.tokens, cfg.hidden_size, cfg.rms_norm_eps);
    let key = r.key(p.pool_generation, l);
    let (xn_out, ffn_out, logits_out) = (&mut r.xn, &mut r.ffn, &mut r.logits);
    ops.replay(key, &mut || {
        let xn = normed(ops, x, &p.layers[l].input_norm, n, h, eps)?;
        let w = AttnWeights::whole(model, l);
        let attn = attention(ops, model, p, l, &xn, g, &w, AttentionForm::Auto)?;
        ops.add(x, &attn)?;
        let post = normed(ops, x, &p.layers[l].post_attn_norm, n, h, eps)?;
        ops.copy_into(xn_out, &post)?;
        let (ffn, router) = match &model.layers[l].ffn {
            Ffn::Dense(w) => (Some(w), None),
            Ffn::Moe(m) => (m.shared.as_ref(), Some(&m.router)),
        };
        if let Some(w) = ffn {
            ops.copy_into(ffn_out, &ops.ffn_all(w, &post, n)?)?;
        }
        if let Some(router) = router {
            ops.copy_into(logits_out, &ops.linear(router, &post, n)?)?;
        }
        Ok(())
    })
}

/// A share's placement on `device`, where its final hidden states are (the device of
/// its last layer).
fn last_placement<O: DeviceOps>(placed: &[Group<O>], device: usize) -> &Group<O> {
    placed
        .iter()
        .find(|g| g.device == device)
        .unwrap_or(&placed[0])
}

/// The rows of a group's tokens that get logits, in the group's entry order.
pub(super) fn logit_rows<O: DeviceOps>(batch: &[BatchEntry], g: &Group<O>) -> Vec<usize> {
    let mut rows = Vec::new();
    for (&i, s) in g.entries.iter().zip(&g.spans) {
        rows.extend(Logits::rows(batch[i].logits, s.first, s.len));
    }
    rows
}

/// Rows `rows` of the final hidden states `x`, through the final RMSNorm.
pub(super) fn final_rows<O: DeviceOps>(
    ops: &O,
    p: &Prepared<O>,
    x: &O::Buf,
    rows: &[usize],
    h: usize,
    eps: f32,
) -> DeviceResult<O::Buf> {
    let mut picked = ops.take_rows(x, rows, h)?;
    ops.rms_norm(&mut picked, &p.final_norm, rows.len(), h, h, eps)?;
    Ok(picked)
}

/// Gives each entry of `g` its rows of `all` (the logits of [`logit_rows`], `vocab`
/// values each).
pub(super) fn hand_out_logits<O: DeviceOps>(
    batch: &[BatchEntry],
    g: &Group<O>,
    all: &[f32],
    vocab: usize,
    out: &mut [Option<Vec<f32>>],
) {
    let mut next = 0;
    for (&i, s) in g.entries.iter().zip(&g.spans) {
        let count = Logits::rows(batch[i].logits, 0, s.len).len();
        out[i] = batch[i]
            .logits
            .map(|_| all[next * vocab..(next + count) * vocab].to_vec());
        next += count;
    }
}

/// The matrices one device's attention multiplies by: the whole layer's, or (tensor
/// parallel) its heads' cut of `q_b`/`q_proj`, `kv_b` and `o_proj`; `dims.heads` heads.
pub(super) struct AttnWeights<'a> {
    /// The projection whose output is the queries: `q_b_proj`, or `q_proj` without a
    /// low-rank query.
    pub(super) q: &'a crate::weights::LinearWeight,
    pub(super) kv_b: &'a crate::weights::LinearWeight,
    pub(super) o: &'a crate::weights::LinearWeight,
    pub(super) dims: MlaDims,
}

impl<'a> AttnWeights<'a> {
    /// Every head of layer `l`.
    pub(super) fn whole(model: &'a Model, l: usize) -> Self {
        let a = &model.layers[l].attn;
        AttnWeights {
            q: match &a.q {
                QueryProj::LowRank { b, .. } => b,
                QueryProj::Full(w) => w,
            },
            kv_b: &a.kv_b,
            o: &a.o,
            dims: MlaDims::of(&model.config),
        }
    }
}

/// MLA attention of one device's share of the pass in `form` (see
/// [`DeviceOps::mla_attention`]), through its block tables: the heads of `w`, projected
/// back to the hidden size (a partial sum over heads when `w` holds some of them).
#[allow(clippy::too_many_arguments)]
pub(super) fn attention<O: DeviceOps>(
    ops: &O,
    model: &Model,
    p: &mut Prepared<O>,
    l: usize,
    x: &O::Buf,
    g: &Group<O>,
    w: &AttnWeights,
    form: AttentionForm,
) -> DeviceResult<O::Buf> {
    let cfg = &model.config;
    let a = &model.layers[l].attn;
    let t = &p.layers[l];
    let dims = w.dims;
    let (n, heads, width) = (g.tokens, dims.heads, dims.width());
    let mut q = match &a.q {
        QueryProj::LowRank { a: qa, .. } => {
            let mut lat = ops.linear(qa, x, n)?;
            if let Some(norm) = &t.q_a_norm {
                let r = qa.rows();
                ops.rms_norm(&mut lat, norm, n, r, r, cfg.rms_norm_eps)?;
            }
            ops.linear(w.q, &lat, n)?
        }
        QueryProj::Full(_) => ops.linear(w.q, x, n)?,
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
        &g.positions,
        layout(heads, heads * qk, qk, dims.nope),
    )?;
    let mut kv = ops.linear(&a.kv_a, x, n)?;
    ops.rms_norm(
        &mut kv,
        &t.kv_a_norm,
        n,
        width,
        dims.latent,
        cfg.rms_norm_eps,
    )?;
    ops.rope(
        &mut kv,
        &p.rope,
        &g.positions,
        layout(1, width, 0, dims.latent),
    )?;
    ops.write_rows(&mut p.pools[l], &kv, &g.slots, width)?;
    let sequences: Vec<std::ops::Range<usize>> =
        g.spans.iter().map(|s| s.first..s.first + s.len).collect();
    let pool = &p.pools[l];
    let scale = cfg.softmax_scale();
    let v = ops.mla_attention(w.kv_b, &q, pool, &g.blocks, &sequences, dims, scale, form)?;
    ops.linear(w.o, &v, n)
}
