//! The forward pass, written once over [`DeviceOps`] (the operations a device provides
//! on its own buffers) and used by every layout: the CPU alone ([`on_cpu`]), one GPU,
//! hybrid (one GPU or a pipeline over several, experts in host RAM computed by the host),
//! and all-GPU data- or tensor-parallel. The residual stream, every activation and the
//! paged latent KV cache stay on the device for the whole pass: only the token ids,
//! positions and block tables go in, the router's choices and the requested logits come
//! out, and, in hybrid mode, each MoE layer with experts in host RAM hands its
//! normalised hidden states to the host and takes the host experts' sum back.
//!
//! The CUDA device implements [`DeviceOps`] with its kernels; [`CpuDevice`] with the
//! CPU kernels on host vectors: as the CPU device ([`CpuDevice::new`]), and as a
//! stand-in GPU (`--simulate-gpus`, and tests), so the whole schedule (cache layout,
//! block tables, hand-off, byte counts) is checked against the golden fixtures on
//! machines without a GPU.
//!
//! Attention reads the latents through each query's block table in either MLA form (see
//! [`DeviceOps::mla_attention`]): naive for a sequence's several new tokens, absorbed for
//! one, so one pass serves decode, chunked prefill and mixed batches.
//!
//! The latent cache on a device is numbered by the engine's blocks (the engine's block
//! allocator and prefix cache decide which block a position lives in; the device holds
//! that block's latents).

mod exchange;
pub mod handoff;
mod layout;
mod pass;
mod tensor;
mod vocab;

pub use crate::model::MlaDims;
pub use pass::Pass;
pub use tensor::{HeadShare, HeadSplit};
pub use vocab::VocabSplit;

use crate::device::cpu::kernels::CpuKernels;
use crate::device::cpu::CpuDevice;
use crate::device::{
    embedding_rows, DeviceOps, DeviceRope, Fabric, QueryBlocks, ReplayKey, RopeLayout, ThroughHost,
};
use crate::model::{
    AttentionForm, BatchEntry, KvCache, LatentStore, Logits, Model, ModelError, RouteObserver,
};
use std::sync::Arc;

/// The forward pass as its callers see it (the engine, `run`, benchmarks, tests): one
/// implementation, [`Pass`], over whichever devices a layout gives it.
pub trait Forward: Send + Sync {
    /// One pass over several sequences at once: every weight is read once for all their
    /// tokens (each routed expert once for all tokens routed to it), attention runs per
    /// sequence over its own latents, placed by `store`'s block tables. Per-token results
    /// do not depend on what else is in the batch. Returns, per entry, its logits
    /// (`[n, vocab]` or `[vocab]`) when asked for. `on_route(layer, experts)` sees every
    /// token's routed experts.
    fn forward_batch(
        &self,
        model: &Model,
        batch: &[BatchEntry],
        store: &mut dyn LatentStore,
        form: AttentionForm,
        on_route: &mut RouteObserver,
    ) -> Result<Vec<Option<Vec<f32>>>, ModelError>;

    /// Devices the pass keeps latents on (each sequence on one): into how many
    /// partitions a paged latent store should split its blocks.
    fn devices(&self) -> usize {
        1
    }
}

impl dyn Forward + '_ {
    /// Runs `tokens` (positions `cache.len()..`) of one sequence, extending `cache`.
    /// Returns logits `[n, vocab]` (`Logits::All`) or `[vocab]` for the last token.
    pub fn forward(
        &self,
        model: &Model,
        tokens: &[u32],
        cache: &mut KvCache,
        form: AttentionForm,
        logits: Logits,
    ) -> Result<Vec<f32>, ModelError> {
        self.forward_observed(model, tokens, cache, form, logits, &mut |_, _| {})
    }

    /// [`forward`](Self::forward), calling `on_route(layer, experts)` with every token's
    /// routed experts (used to collect activation statistics).
    pub fn forward_observed(
        &self,
        model: &Model,
        tokens: &[u32],
        cache: &mut KvCache,
        form: AttentionForm,
        logits: Logits,
        on_route: &mut RouteObserver,
    ) -> Result<Vec<f32>, ModelError> {
        let entry = BatchEntry {
            tokens,
            start: cache.len(),
            logits: Some(logits),
        };
        let mut out = self.forward_batch(model, &[entry], cache, form, on_route)?;
        cache.advance(tokens.len());
        Ok(out.pop().flatten().unwrap_or_default())
    }
}

/// The pass on the CPU alone, computing with `kernels` (see [`CpuDevice::new`]).
pub fn on_cpu(kernels: Arc<dyn CpuKernels>) -> Pass<CpuDevice> {
    Pass::new(Arc::new(CpuDevice::new(kernels)), None, None)
}

/// The device of each decoder layer in a plan that gives GPUs ranges of layers (hybrid
/// plans over several GPUs); layers outside every range go to the first GPU.
pub fn layer_devices(plan: &crate::placement::Plan, layers: usize) -> Vec<usize> {
    (0..layers)
        .map(|l| {
            plan.gpus
                .iter()
                .position(|g| (g.layers[0]..g.layers[1]).contains(&l))
                .unwrap_or(0)
        })
        .collect()
}
