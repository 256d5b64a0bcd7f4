//! Hybrid execution on a real GPU: the accelerator interface over GPU `ordinal`, and the
//! hybrid backend a one-GPU plan runs on.
//!
//! The queue, memory budget and transfer accounting are the same ones the simulated
//! device has (its in-order worker thread is where the device's work issues its CUDA
//! calls, so the host computes its experts while the GPU works); the budget is the GPU's
//! free memory when it was opened, and the device's work runs through the CUDA backend.

use super::hybrid::HybridBackend;
use super::sim::SimDevice;
use super::{AccelError, Accelerator, Job, Transfers};
use crate::backend::{Backend, CudaBackend};
use crate::model::Model;
use crate::placement::Plan;
use std::sync::Arc;

pub struct CudaAccelerator {
    queue: SimDevice,
}

impl CudaAccelerator {
    /// The accelerator over an opened GPU.
    pub fn new(gpu: &CudaBackend) -> std::io::Result<Self> {
        let g = gpu.gpu();
        Ok(CudaAccelerator {
            queue: SimDevice::new(&g.name, g.free_bytes as u64)?,
        })
    }
}

impl Accelerator for CudaAccelerator {
    fn name(&self) -> &str {
        self.queue.name()
    }
    fn budget_bytes(&self) -> u64 {
        self.queue.budget_bytes()
    }
    fn used_bytes(&self) -> u64 {
        self.queue.used_bytes()
    }
    fn reserve(&self, what: &str, bytes: u64) -> Result<(), AccelError> {
        self.queue.reserve(what, bytes)
    }
    fn enqueue(&self, job: Job) {
        self.queue.enqueue(job)
    }
    fn copy_to_device(&self, bytes: u64) {
        self.queue.copy_to_device(bytes)
    }
    fn copy_to_host(&self, bytes: u64) {
        self.queue.copy_to_host(bytes)
    }
    fn transfers(&self) -> Transfers {
        self.queue.transfers()
    }
}

/// The backend a one-GPU plan runs on: what the plan puts on the GPU is checked against
/// its memory and uploaded (attention, dense layers, shared experts, router, lm_head and
/// the routed experts `model.apply_plan` marked for it), the other routed experts run on
/// `host`. Not fitting is an error naming what did not fit.
pub fn hybrid_on_gpu(
    model: &Model,
    plan: &Plan,
    gpu: Arc<CudaBackend>,
    host: Arc<dyn Backend>,
) -> anyhow::Result<HybridBackend> {
    let accel = Arc::new(CudaAccelerator::new(&gpu)?);
    let compute: Arc<dyn Backend> = gpu.clone();
    let hybrid = HybridBackend::new(model, plan, accel, compute, host)?;
    let bytes = gpu
        .preload(&model.matrices(|e| e.gpu.is_some()))
        .map_err(|e| anyhow::anyhow!("uploading the plan's GPU weights: {e}"))?;
    eprintln!(
        "hybrid: {:.2} GiB of weights on {}, the other routed experts in host RAM",
        bytes as f64 / (1u64 << 30) as f64,
        gpu.gpu().name
    );
    Ok(hybrid)
}
