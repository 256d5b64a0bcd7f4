//! Execution on real GPUs: the forward pass each plan layout runs, its weights uploaded
//! and checked against each GPU's memory first.
//!
//! - one GPU, all-GPU plan: [`resident_on_gpu`];
//! - one GPU, hybrid plan: [`hybrid_on_gpu`];
//! - several GPUs, all-GPU plan with data-parallel attention: [`data_parallel_on_gpus`];
//! - several GPUs, hybrid plan (layer ranges per GPU): [`pipeline_on_gpus`];
//! - several GPUs, all-GPU plan with tensor-parallel attention:
//!   [`tensor_parallel_on_gpus`].
//!
//! Each GPU also gets the f32 copies of `kv_b_proj` its absorbed attention reads, made at
//! start-up so that a GPU without room for them refuses then, naming them.
//!
//! Each uploads what its layout puts on each GPU, then builds the pass with
//! [`assemble`], as stand-in GPUs do.

use super::budget::{reserve_hybrid_share, DeviceBudget};
use super::{assemble, GpuLayout, HostExperts, RuntimeError};
use crate::device::cpu::kernels::{CpuKernels, FfnWeights};
use crate::device::cuda::{CudaBackend, NcclFabric};
use crate::forward::handoff::HandoffCounter;
use crate::forward::Pass;
use crate::model::Model;
use crate::placement::Plan;
use crate::weights::LinearWeight;
use std::sync::Arc;

/// The pass a one-GPU hybrid plan runs: what the plan puts on the GPU is checked against
/// its memory and uploaded (attention, dense layers, shared experts, router, lm_head and
/// the routed experts `model.apply_plan` marked for it), the other routed experts run on
/// `host`. Not fitting is an error naming what did not fit.
///
/// The pass runs resident on the GPU ([`Pass`]): activations and the latent cache
/// stay there, each MoE layer with host experts hands its hidden states to `host`
/// through page-locked buffers while the GPU computes its experts and the shared expert.
pub fn hybrid_on_gpu(
    model: &Model,
    plan: &Plan,
    gpu: Arc<CudaBackend>,
    host: Arc<dyn CpuKernels>,
) -> Result<Pass<CudaBackend>, RuntimeError> {
    let g = gpu.gpu();
    // What the plan puts on the GPU, checked against its free memory (an error names
    // what does not fit).
    let budget = DeviceBudget::new(&g.name, g.free_bytes as u64);
    reserve_hybrid_share(model, plan, &budget)?;
    budget.reserve(
        "f32 copies of kv_b_proj for absorbed attention",
        absorbed_kv_b_bytes(model),
    )?;
    let mut bytes = gpu
        .preload(&device_matrices(model, |e| e.gpu.is_some()))
        .map_err(|e| gpu_error("uploading the plan's GPU weights", e))?;
    bytes += gpu
        .preload_absorbed(&kv_bs(model, |_| true))
        .map_err(|e| gpu_error("the f32 copies of kv_b_proj", e))?;
    eprintln!(
        "hybrid: {:.2} GiB of weights on {}, the other routed experts in host RAM",
        bytes as f64 / (1u64 << 30) as f64,
        gpu.gpu().name
    );
    let host = HostExperts {
        plan,
        kernels: host,
        handoff: Arc::new(HandoffCounter::new()),
    };
    assemble(GpuLayout::Hybrid, model, vec![gpu], Some(host))
}

/// The pass an all-GPU plan on one GPU runs: every weight uploaded (checked
/// against its memory as it goes), the model's passes resident on the GPU.
pub fn resident_on_gpu(
    model: &Model,
    gpu: Arc<CudaBackend>,
) -> Result<Pass<CudaBackend>, RuntimeError> {
    let mut bytes = gpu
        .preload(&device_matrices(model, |_| true))
        .map_err(|e| gpu_error("uploading the model's weights", e))?;
    bytes += gpu
        .preload_absorbed(&kv_bs(model, |_| true))
        .map_err(|e| gpu_error("the f32 copies of kv_b_proj", e))?;
    eprintln!(
        "resident: {:.2} GiB of weights on {}",
        bytes as f64 / (1u64 << 30) as f64,
        gpu.gpu().name
    );
    assemble(GpuLayout::Whole, model, vec![gpu], None)
}

/// The pass an all-GPU plan with data-parallel attention over several GPUs runs
/// ([`Pass::on_devices`]): every GPU holds the attention, dense and shared-expert
/// weights and the routers (it runs its own sequences end to end), its band of lm_head
/// rows (as the plan budgets it; every GPU computes its band of every sequence's logits)
/// and the routed experts the plan gave it; each MoE layer exchanges hidden states
/// between them.
pub fn data_parallel_on_gpus(
    model: &Model,
    gpus: Vec<Arc<CudaBackend>>,
) -> Result<Pass<CudaBackend>, RuntimeError> {
    let pass = assemble(GpuLayout::DataParallel, model, gpus.clone(), None)?;
    let vocab = pass
        .vocab_split()
        .ok_or(RuntimeError::Unsplit("data-parallel"))?;
    let lm_head = model.lm_head.identity();
    for (g, gpu) in gpus.iter().enumerate() {
        let mut weights: Vec<&LinearWeight> = device_matrices(model, |e| e.gpu == Some(g))
            .into_iter()
            .filter(|w| w.identity() != lm_head)
            .collect();
        weights.extend(vocab.band(g).map(|(_, band)| band));
        let mut bytes = gpu
            .preload(&weights)
            .map_err(|e| gpu_error(&format!("GPU {g}"), e))?;
        bytes += gpu
            .preload_absorbed(&kv_bs(model, |_| true))
            .map_err(|e| gpu_error(&format!("GPU {g}"), e))?;
        report(
            g,
            gpu,
            bytes,
            "data-parallel attention, expert-parallel experts",
        );
    }
    Ok(with_nccl(pass, &gpus, "expert exchange"))
}

/// The pass a hybrid plan over several GPUs runs ([`Pass::pipeline`]): GPU g
/// holds the attention, dense and shared-expert weights and routers of the layers the
/// plan gives it, and their hot experts (the last also the lm_head); the other routed
/// experts run on `host`, handed off from the GPU of their layer.
pub fn pipeline_on_gpus(
    model: &Model,
    plan: &Plan,
    gpus: Vec<Arc<CudaBackend>>,
    host: Arc<dyn CpuKernels>,
) -> Result<Pass<CudaBackend>, RuntimeError> {
    let layer_devices = crate::forward::layer_devices(plan, model.layers.len());
    let last = layer_devices.last().copied().unwrap_or(0);
    for (g, gpu) in gpus.iter().enumerate() {
        let mut weights: Vec<&LinearWeight> = layer_devices
            .iter()
            .enumerate()
            .filter(|(_, &d)| d == g)
            .flat_map(|(l, _)| model.layer_matrices(l))
            .collect();
        if g == last {
            weights.push(&model.lm_head);
        }
        weights.extend(expert_matrices(model, |e| e.gpu == Some(g)));
        let mut bytes = gpu
            .preload(&weights)
            .map_err(|e| gpu_error(&format!("GPU {g}"), e))?;
        bytes += gpu
            .preload_absorbed(&kv_bs(model, |l| layer_devices[l] == g))
            .map_err(|e| gpu_error(&format!("GPU {g}"), e))?;
        report(
            g,
            gpu,
            bytes,
            "its layers, the other routed experts in host RAM",
        );
    }
    let host = HostExperts {
        plan,
        kernels: host,
        handoff: Arc::new(HandoffCounter::new()),
    };
    assemble(GpuLayout::Pipeline, model, gpus, Some(host))
}

/// The pass an all-GPU plan with tensor-parallel attention over several GPUs runs
/// ([`Pass::tensor_parallel`]): GPU g holds every layer's `q_a`/`kv_a`, its heads'
/// cut of `q_b`, `kv_b` and `o_proj` (and their f32 `kv_b` copies), its band of lm_head
/// rows and the routed experts the plan gave it; the first GPU also holds the routers,
/// shared experts and dense MLPs (it routes and adds them for every token). Partial sums meet in an NCCL
/// all-reduce, or through host memory without libnccl.
pub fn tensor_parallel_on_gpus(
    model: &Model,
    gpus: Vec<Arc<CudaBackend>>,
) -> Result<Pass<CudaBackend>, RuntimeError> {
    use crate::model::{Ffn, QueryProj};
    let pass = assemble(GpuLayout::TensorParallel, model, gpus.clone(), None)?;
    let split = pass
        .head_split()
        .ok_or(RuntimeError::Unsplit("tensor-parallel"))?;
    for (g, gpu) in gpus.iter().enumerate() {
        let mut weights: Vec<&LinearWeight> = Vec::new();
        for (l, layer) in model.layers.iter().enumerate() {
            if let Some(share) = split.share(g, l) {
                if let QueryProj::LowRank { a, .. } = &layer.attn.q {
                    weights.push(a);
                }
                weights.push(&layer.attn.kv_a);
                weights.extend(share.matrices());
            }
            if g == 0 {
                match &layer.ffn {
                    Ffn::Dense(f) => weights.extend(f.matrices()),
                    Ffn::Moe(moe) => {
                        weights.push(&moe.router);
                        weights.extend(moe.shared.iter().flat_map(FfnWeights::matrices));
                    }
                }
            }
        }
        if let Some((_, band)) = split.lm_head(g) {
            weights.push(band);
        }
        weights.extend(expert_matrices(model, |e| e.gpu == Some(g)));
        let mut bytes = gpu
            .preload(&weights)
            .map_err(|e| gpu_error(&format!("GPU {g}"), e))?;
        let kv_b: Vec<&LinearWeight> = (0..model.layers.len())
            .filter_map(|l| split.share(g, l))
            .map(|s| s.matrices()[1])
            .collect();
        bytes += gpu
            .preload_absorbed(&kv_b)
            .map_err(|e| gpu_error(&format!("GPU {g}"), e))?;
        report(
            g,
            gpu,
            bytes,
            "tensor-parallel attention, expert-parallel experts",
        );
    }
    Ok(with_nccl(pass, &gpus, "attention and expert sums"))
}

/// `pass` moving `what` with NCCL between `gpus`, or through host memory (saying why).
fn with_nccl(pass: Pass<CudaBackend>, gpus: &[Arc<CudaBackend>], what: &str) -> Pass<CudaBackend> {
    match NcclFabric::open(gpus) {
        Ok(f) => {
            eprintln!("{what}: NCCL between the {} GPUs", gpus.len());
            pass.with_fabric(Arc::new(f))
        }
        Err(why) => {
            eprintln!("{what}: through host memory ({why})");
            pass
        }
    }
}

fn report(g: usize, gpu: &CudaBackend, bytes: u64, what: &str) {
    eprintln!(
        "GPU {g} ({}): {:.2} GiB of weights ({what})",
        gpu.gpu().name,
        bytes as f64 / (1u64 << 30) as f64
    );
}

/// The `kv_b_proj` of the layers `on` selects.
fn kv_bs(model: &Model, on: impl Fn(usize) -> bool) -> Vec<&LinearWeight> {
    model
        .layers
        .iter()
        .enumerate()
        .filter(|(l, _)| on(*l))
        .map(|(_, layer)| &layer.attn.kv_b)
        .collect()
}

/// Device bytes of the f32 `kv_b_proj` copies the resident pass's absorbed attention
/// reads (see `device::cuda::resident`).
fn absorbed_kv_b_bytes(model: &Model) -> u64 {
    model
        .layers
        .iter()
        .map(|l| (l.attn.kv_b.rows() * l.attn.kv_b.cols() * 4) as u64)
        .sum()
}

/// The routed experts' matrices `on` selects.
fn expert_matrices(model: &Model, on: impl Fn(&FfnWeights) -> bool) -> Vec<&LinearWeight> {
    model
        .routed_experts()
        .into_iter()
        .filter(|e| on(e))
        .flat_map(FfnWeights::matrices)
        .collect()
}

/// Every non-expert matrix and the routed experts' matrices `on` selects.
fn device_matrices(model: &Model, on: impl Fn(&FfnWeights) -> bool) -> Vec<&LinearWeight> {
    let mut all = model.non_expert_matrices();
    all.extend(expert_matrices(model, on));
    all
}

/// A GPU's refusal of `what`.
fn gpu_error(what: &str, cause: kernels_cuda::CudaError) -> RuntimeError {
    RuntimeError::Gpu {
        what: what.to_string(),
        cause,
    }
}
