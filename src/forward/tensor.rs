//! Tensor-parallel attention over several devices (all-GPU plans with fewer concurrent
//! sequences than GPUs, where data-parallel attention would leave GPUs idle).
//!
//! Every device holds the whole residual stream of the pass. Attention heads are split
//! across the devices (at most one device per head): each computes `q_a`/`kv_a` whole
//! (they are small and feed every head), writes the layer's latents into its own copy of
//! the latent cache, and runs its heads' cut of `q_b`, `kv_b` and `o_proj`, giving a
//! partial sum of the attention output that one all-reduce completes on every device.
//! Routed experts are expert-parallel: each device computes the experts its plan gives
//! it for every token (the routes come from the first device's router, so every device
//! agrees on them), the first device adds the shared expert or the dense MLP, and a
//! second all-reduce per layer sums the outputs. The lm_head is split by vocabulary: each
//! device computes its band of every row's logits.

use super::layout::{block_tables, ensure_pools, Group, Layout};
use super::pass::{
    attention, final_rows, fixed_share, hand_out_logits, keep_decode_io, logit_rows, normed,
    AttnWeights, Pass, Prepared, Recorded, MAX_RECORDED_TOKENS,
};
use super::{DeviceOps, MlaDims};
use crate::device::DeviceResult;
use crate::model::{
    expert_work, AttentionForm, BatchEntry, Ffn, LatentStore, Model, QueryProj, RouteObserver,
};
use crate::weights::LinearWeight;
use std::ops::Range;

/// One device's heads of one layer's attention, cut out as weights of their own.
pub struct HeadShare {
    dims: MlaDims,
    /// Rows of `q_b_proj` (or `q_proj`) that give these heads' queries.
    q: LinearWeight,
    /// Rows of `kv_b_proj` for these heads' keys and values.
    kv_b: LinearWeight,
    /// Columns of `o_proj` that read these heads' values.
    o: LinearWeight,
}

impl HeadShare {
    fn cut(model: &Model, l: usize, heads: Range<usize>) -> std::io::Result<Self> {
        let a = &model.layers[l].attn;
        let dims = MlaDims::of(&model.config);
        let q = match &a.q {
            QueryProj::LowRank { b, .. } => b,
            QueryProj::Full(w) => w,
        };
        let (qk, kv) = (dims.qk(), dims.nope + dims.v);
        Ok(HeadShare {
            dims: MlaDims {
                heads: heads.len(),
                ..dims
            },
            q: q.row_slice(heads.start * qk..heads.end * qk)?,
            kv_b: a.kv_b.row_slice(heads.start * kv..heads.end * kv)?,
            o: a.o.col_slice(heads.start * dims.v..heads.end * dims.v)?,
        })
    }

    fn weights(&self) -> AttnWeights<'_> {
        AttnWeights {
            q: &self.q,
            kv_b: &self.kv_b,
            o: &self.o,
            dims: self.dims,
        }
    }

    /// The matrices a device multiplies by for these heads.
    pub fn matrices(&self) -> [&LinearWeight; 3] {
        [&self.q, &self.kv_b, &self.o]
    }
}

/// Which heads each device computes, and their weights: per device, one share per
/// layer, or none for devices beyond the head count; and each device's band of lm_head
/// rows (the vocabulary split as the plan budgets it).
pub struct HeadSplit {
    per_device: Vec<Vec<HeadShare>>,
    lm_head: super::VocabSplit,
}

impl HeadSplit {
    /// The model's heads over `devices` devices, in contiguous runs as even as they
    /// come (64 heads over 8 GPUs: 8 each). Fails only when memory for a cut runs out.
    pub fn new(model: &Model, devices: usize) -> std::io::Result<Self> {
        let heads = model.config.num_attention_heads;
        let used = devices.min(heads).max(1);
        let per_device = (0..devices)
            .map(|d| {
                if d >= used {
                    return Ok(Vec::new());
                }
                let range = d * heads / used..(d + 1) * heads / used;
                (0..model.layers.len())
                    .map(|l| HeadShare::cut(model, l, range.clone()))
                    .collect()
            })
            .collect::<std::io::Result<_>>()?;
        let lm_head = super::VocabSplit::new(&model.lm_head, devices)?;
        Ok(HeadSplit {
            per_device,
            lm_head,
        })
    }

    /// Device `d`'s rows of the lm_head: which, and the weight.
    pub fn lm_head(&self, d: usize) -> Option<&(Range<usize>, LinearWeight)> {
        self.lm_head.band(d)
    }

    fn vocab(&self) -> &super::VocabSplit {
        &self.lm_head
    }

    /// Device `d`'s share of layer `l`, if it computes attention.
    pub fn share(&self, d: usize, l: usize) -> Option<&HeadShare> {
        self.per_device.get(d).and_then(|s| s.get(l))
    }

    fn attends(&self, d: usize) -> bool {
        self.per_device.get(d).is_some_and(|s| !s.is_empty())
    }
}

impl<O: DeviceOps> Pass<O> {
    /// The pass with tensor-parallel attention (see the module comment).
    pub(super) fn run_tensor_parallel(
        &self,
        split: &HeadSplit,
        model: &Model,
        prepared: &mut [Prepared<O>],
        (batch, store, form): (&[BatchEntry], &mut dyn LatentStore, AttentionForm),
        on_route: &mut RouteObserver,
    ) -> DeviceResult<Vec<Option<Vec<f32>>>> {
        let cfg = &model.config;
        let h = cfg.hidden_size;
        let devices = self.devices();
        // One layout for the whole batch, in the store's own block numbering, placed on
        // every device; the devices that attend keep every layer's latents.
        let tables = block_tables(batch, store);
        let layout = Layout::new(batch, &tables, (0..batch.len()).collect(), &|b| b as usize);
        let width = MlaDims::of(cfg).width();
        // A decode step on devices that record: each attending device's heads work in
        // its fixed buffers (see `Pass::run`).
        let recording = devices.iter().all(|ops| ops.records())
            && batch.iter().all(|e| e.tokens.len() == 1)
            && layout.tokens() <= MAX_RECORDED_TOKENS;
        let mut recorded: Vec<Option<Recorded<O>>> = Vec::with_capacity(devices.len());
        let mut groups = Vec::with_capacity(devices.len());
        for (d, ops) in devices.iter().enumerate() {
            let ops = ops.as_ref();
            if !split.attends(d) {
                groups.push(layout.place(ops, d)?);
                recorded.push(None);
                continue;
            }
            let p = &mut prepared[d];
            let kind = (layout.block_size, store.bf16_latents());
            ensure_pools(
                ops,
                p,
                kind,
                layout.needed_blocks,
                width,
                0..model.layers.len(),
            )?;
            if recording {
                let (group, r) = fixed_share(ops, p, model, &layout, d)?;
                groups.push(group);
                recorded.push(Some(r));
            } else {
                groups.push(layout.place(ops, d)?);
                recorded.push(None);
            }
        }
        let n = layout.tokens();
        let ids: Vec<u32> = batch
            .iter()
            .flat_map(|e| e.tokens.iter().copied())
            .collect();
        let embedded = super::embedding_rows(&model.embed, &ids);
        let mut xs: Vec<O::Buf> = devices
            .iter()
            .map(|ops| ops.upload(&embedded))
            .collect::<DeviceResult<_>>()?;
        for ((ops, r), x) in devices.iter().zip(&mut recorded).zip(&mut xs) {
            if let Some(r) = r {
                r.hold_residual(ops.as_ref(), x)?;
            }
        }
        for (l, layer) in model.layers.iter().enumerate() {
            let partials = devices
                .iter()
                .enumerate()
                .map(|(d, ops)| {
                    let Some(share) = split.share(d, l) else {
                        return ops.zeros(n * h);
                    };
                    let (ops, p, g) = (ops.as_ref(), &mut prepared[d], &groups[d]);
                    let eps = cfg.rms_norm_eps;
                    let (x, generation) = (&xs[d], p.pool_generation);
                    let mut heads = || {
                        let xn = normed(ops, x, &p.layer(l).input_norm, n, h, eps)?;
                        attention(ops, model, p, l, &xn, g, &share.weights(), form)
                    };
                    let Some(r) = recorded[d].as_mut() else {
                        return heads();
                    };
                    // Recorded: the heads' partial sum lands in the fixed `xn` buffer.
                    let key = r.key(generation, l);
                    let out = &mut r.xn;
                    ops.replay(key, &mut || ops.copy_into(out, &heads()?))?;
                    ops.copy(&r.xn)
                })
                .collect::<DeviceResult<_>>()?;
            self.add_all_reduced(&mut xs, partials)?;
            let xns: Vec<O::Buf> = devices
                .iter()
                .zip(&xs)
                .zip(prepared.iter())
                .map(|((ops, x), p)| {
                    let norm = &p.layer(l).post_attn_norm;
                    normed(ops.as_ref(), x, norm, n, h, cfg.rms_norm_eps)
                })
                .collect::<DeviceResult<_>>()?;
            let all: Vec<(usize, f32)> = (0..n).map(|t| (t, 1.0)).collect();
            let mut outs: Vec<O::Buf> = devices
                .iter()
                .map(|ops| ops.zeros(n * h))
                .collect::<DeviceResult<_>>()?;
            match &layer.ffn {
                Ffn::Dense(w) => devices[0].ffn_accumulate(w, &xns[0], &all, &mut outs[0])?,
                Ffn::Moe(moe) => {
                    let ops = devices[0].as_ref();
                    let logits = ops.linear(&moe.router, &xns[0], n)?;
                    let routes = ops.route(cfg, &logits, prepared[0].correction_bias(l), n)?;
                    let e = moe.experts.len();
                    let mut tokens = vec![vec![Vec::new(); e]; devices.len()];
                    for (t, r) in routes.iter().enumerate() {
                        on_route(l, r);
                        for &(expert, weight) in r {
                            if let Some(f) = moe.experts.get(expert) {
                                tokens[self.expert_device(f)][expert].push((t, weight));
                            }
                        }
                    }
                    for (d, ops) in devices.iter().enumerate() {
                        let work = expert_work(&moe.experts, &tokens[d]);
                        ops.experts_accumulate(&work, &xns[d], &mut outs[d])?;
                    }
                    if let Some(shared) = &moe.shared {
                        devices[0].ffn_accumulate(shared, &xns[0], &all, &mut outs[0])?;
                    }
                }
            }
            self.add_all_reduced(&mut xs, outs)?;
        }
        let logits = self.vocab_parallel_logits(split, model, prepared, batch, &groups[0], &xs)?;
        for (d, ((r, group), x)) in recorded.into_iter().zip(groups).zip(xs).enumerate() {
            if let Some(r) = r {
                keep_decode_io(&mut prepared[d], r.into_io(group, x));
            }
        }
        Ok(logits)
    }

    /// The logits with the lm_head split by vocabulary: every device multiplies the
    /// rows that need logits by its band (each holds the whole residual stream), the
    /// bands come down and are laid side by side.
    fn vocab_parallel_logits(
        &self,
        split: &HeadSplit,
        model: &Model,
        prepared: &[Prepared<O>],
        batch: &[BatchEntry],
        g: &Group<O>,
        xs: &[O::Buf],
    ) -> DeviceResult<Vec<Option<Vec<f32>>>> {
        let cfg = &model.config;
        let (h, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let rows = logit_rows(batch, g);
        let mut all = Vec::new();
        if !rows.is_empty() {
            // Every device holds the whole residual stream: its rows are already there.
            let on_devices = self
                .devices()
                .iter()
                .enumerate()
                .filter(|(d, _)| split.lm_head(*d).is_some_and(|(b, _)| !b.is_empty()))
                .map(|(d, ops)| {
                    let p = &prepared[d];
                    let x = final_rows(ops.as_ref(), p, &xs[d], &rows, h, cfg.rms_norm_eps)?;
                    Ok((d, x))
                })
                .collect::<DeviceResult<_>>()?;
            all = split
                .vocab()
                .bands(self.devices(), on_devices, rows.len(), vocab)?;
        }
        let mut out = vec![None; batch.len()];
        hand_out_logits(batch, g, &all, vocab, &mut out);
        Ok(out)
    }

    /// `xs[d] += Σ parts` on every device `d`.
    fn add_all_reduced(&self, xs: &mut [O::Buf], parts: Vec<O::Buf>) -> DeviceResult<()> {
        let sums = self.fabric().all_reduce(self.devices(), parts)?;
        for ((ops, x), sum) in self.devices().iter().zip(xs.iter_mut()).zip(&sums) {
            ops.add(x, sum)?;
        }
        Ok(())
    }
}
