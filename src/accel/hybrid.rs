//! Hybrid execution as a plan lays it out: the accelerator computes attention, the
//! router, dense layers, the shared expert, lm_head and the routed experts the plan puts
//! on it; the host computes the routed experts in its RAM. Per MoE layer with host
//! experts, every token's hidden state goes to the host and its result comes back (a
//! fixed schedule, as CUDA graphs need); the host computes its experts while the device
//! works on its own, and both sides' contributions are added in expert order, so the
//! result equals the CPU-only run.

use super::{launch, AccelError, Accelerator};
use crate::backend::{scatter_add, AttentionShape, Backend, FfnWeights, KvView};
use crate::model::{Ffn, Model};
use crate::placement::Plan;
use crate::weights::LinearWeight;
use std::ops::Range;
use std::sync::Arc;

/// A routed expert the device computes: its index in the layer's work list, weights and
/// tokens.
type DeviceExpert = (usize, FfnWeights, Vec<(usize, f32)>);

pub struct HybridBackend {
    device: Arc<dyn Accelerator>,
    /// The kernels the device's queue computes with (the CUDA backend on a GPU; the CPU
    /// twins on the simulated device).
    compute: Arc<dyn Backend>,
    /// The kernels the host computes its routed experts with.
    host: Arc<dyn Backend>,
    /// Per decoder layer: whether some of its routed experts live on the host.
    host_layers: Vec<bool>,
}

impl HybridBackend {
    /// Reserves on `device` what the plan puts there (the non-expert weights and KV items
    /// of GPU 0, and the routed experts `model.apply_plan` marked for it) and builds the
    /// backend: `compute` runs the device's work, `host` the experts in host RAM. An item
    /// that does not fit is an error naming it.
    pub fn new(
        model: &Model,
        plan: &Plan,
        device: Arc<dyn Accelerator>,
        compute: Arc<dyn Backend>,
        host: Arc<dyn Backend>,
    ) -> Result<Self, AccelError> {
        let mut host_layers = vec![false; model.layers.len()];
        let mut device_expert_bytes = 0u64;
        for (l, layer) in model.layers.iter().enumerate() {
            if let Ffn::Moe(moe) = &layer.ffn {
                for e in &moe.experts {
                    match e.gpu {
                        Some(_) => device_expert_bytes += e.stored_bytes() as u64,
                        None => host_layers[l] = true,
                    }
                }
            }
        }
        if let Some(gpu) = plan.gpus.first() {
            for item in gpu
                .holds
                .iter()
                .filter(|i| i.kind != crate::placement::Holding::RoutedExperts)
            {
                device.reserve(&item.describe(), item.bytes)?;
            }
        }
        device.reserve("routed experts placed on the device", device_expert_bytes)?;
        Ok(HybridBackend {
            device,
            compute,
            host,
            host_layers,
        })
    }

    pub fn device(&self) -> &Arc<dyn Accelerator> {
        &self.device
    }

    /// Runs `f` on the device's queue and waits for it.
    fn on_device<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Backend) -> T + Send + 'static,
    ) -> T {
        let compute = self.compute.clone();
        let pending = launch(self.device.as_ref(), move || f(compute.as_ref()));
        match pending.wait() {
            Some(v) => v,
            // The queue worker only stops when the device is dropped, which `self` prevents.
            None => unreachable!("the device queue stopped while its backend was alive"),
        }
    }
}

impl Backend for HybridBackend {
    fn name(&self) -> &'static str {
        "hybrid"
    }

    fn linear(&self, w: &LinearWeight, rows: Range<usize>, x: &[f32], y: &mut [f32]) {
        let (w, x, n) = (w.clone(), x.to_vec(), y.len());
        let out = self.on_device(move |b| {
            let mut y = vec![0.0f32; n];
            b.linear(&w, rows, &x, &mut y);
            y
        });
        y.copy_from_slice(&out);
    }

    fn linear_transposed(&self, w: &LinearWeight, rows: Range<usize>, x: &[f32], y: &mut [f32]) {
        let (w, x, n) = (w.clone(), x.to_vec(), y.len());
        let out = self.on_device(move |b| {
            let mut y = vec![0.0f32; n];
            b.linear_transposed(&w, rows, &x, &mut y);
            y
        });
        y.copy_from_slice(&out);
    }

    /// Dense layers and the shared expert: on the device.
    fn ffn_accumulate(
        &self,
        ffn: &FfnWeights,
        x: &[f32],
        tokens: &[(usize, f32)],
        out: &mut [f32],
    ) {
        let (f, xs, ts) = (ffn.clone(), x.to_vec(), tokens.to_vec());
        let contributions = self.on_device(move |b| b.ffn_contributions(&f, &xs, &ts));
        scatter_add(&contributions, tokens, out);
    }

    fn moe_accumulate(&self, work: &[(&FfnWeights, &[(usize, f32)])], x: &[f32], out: &mut [f32]) {
        let layer = work.iter().find_map(|(f, _)| f.expert.map(|(l, _)| l));
        let ships = layer.is_some_and(|l| self.host_layers.get(l).copied().unwrap_or(false));
        let bytes = (x.len() * 4) as u64;
        if ships {
            // Every token's hidden state to the host...
            self.device.copy_to_host(bytes);
        }
        // The device starts on its experts...
        let device_work: Vec<DeviceExpert> = work
            .iter()
            .enumerate()
            .filter(|(_, (f, _))| f.gpu.is_some())
            .map(|(i, (f, t))| (i, (*f).clone(), t.to_vec()))
            .collect();
        let xs = x.to_vec();
        let compute = self.compute.clone();
        let pending = launch(self.device.as_ref(), move || {
            device_work
                .into_iter()
                .map(|(i, f, t)| (i, compute.ffn_contributions(&f, &xs, &t)))
                .collect::<Vec<_>>()
        });
        // ...while the host computes the experts in its RAM.
        let mut parts: Vec<Option<Vec<f32>>> = vec![None; work.len()];
        for (i, (f, t)) in work.iter().enumerate() {
            if f.gpu.is_none() {
                parts[i] = Some(self.host.ffn_contributions(f, x, t));
            }
        }
        if ships {
            // ...and the host's results go back.
            self.device.copy_to_device(bytes);
        }
        for (i, c) in pending.wait().unwrap_or_default() {
            parts[i] = Some(c);
        }
        crate::backend::add_in_order(work, parts, out);
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
        let q = q.to_vec();
        let (kd, vd) = (k.data.to_vec(), v.data.to_vec());
        let (ks, vs) = (
            (k.token_stride, k.head_stride, k.offset),
            (v.token_stride, v.head_stride, v.offset),
        );
        let positions = positions.to_vec();
        let n = out.len();
        let result = self.on_device(move |b| {
            let mut o = vec![0.0f32; n];
            let k = KvView {
                data: &kd,
                token_stride: ks.0,
                head_stride: ks.1,
                offset: ks.2,
            };
            let v = KvView {
                data: &vd,
                token_stride: vs.0,
                head_stride: vs.1,
                offset: vs.2,
            };
            b.attention(&q, k, v, shape, &positions, scale, &mut o);
            o
        });
        out.copy_from_slice(&result);
    }
}
