//! Moving buffers between GPUs with NCCL peer-to-peer sends (NVLink where the GPUs have
//! it), for the resident pass's expert exchange over several GPUs. One communicator per
//! GPU, all in this process; every move of an exchange step is one NCCL group, so the
//! transfers run at once. Without libnccl the pass moves buffers through host memory.

use super::CudaBackend;
use super::GpuBuf;
use crate::device::{DeviceError, DeviceResult, Fabric};
use kernels_cuda::cudarc::nccl::safe::Comm;
use kernels_cuda::cudarc::nccl::{result as nccl, sys as nccl_sys};
use kernels_cuda::CudaError;
use std::sync::Arc;

pub struct NcclFabric {
    comms: Vec<Comm>,
}

// SAFETY: a communicator is used only inside `transfer`, which the resident pass calls
// from one thread at a time (its state lock is held for the whole pass).
unsafe impl Send for NcclFabric {}
unsafe impl Sync for NcclFabric {}

impl NcclFabric {
    /// Communicators over `gpus` (rank i on `gpus[i]`'s stream); an error saying why when
    /// libnccl cannot be loaded or the GPUs cannot form a communicator.
    pub fn open(gpus: &[Arc<CudaBackend>]) -> Result<Self, CudaError> {
        // SAFETY: only tries to load the library.
        if !unsafe { nccl_sys::is_culib_present() } {
            return Err(CudaError::Unavailable(
                "libnccl cannot be loaded (install NCCL or the nvidia-nccl-cu12 \
                 wheel and add it to LD_LIBRARY_PATH)"
                    .into(),
            ));
        }
        let streams = gpus.iter().map(|g| g.gpu().stream.clone()).collect();
        let comms = Comm::from_devices(streams)
            .map_err(|e| CudaError::Failed(format!("NCCL cannot connect the GPUs: {e:?}")))?;
        Ok(NcclFabric { comms })
    }
}

/// An NCCL failure after start-up as the pass's error (it fails the step, as every
/// device failure does).
fn nccl<T>(what: &str, r: Result<T, nccl::NcclError>) -> DeviceResult<T> {
    r.map_err(|e| DeviceError {
        device: "the GPUs' NCCL communicators".into(),
        operation: what.to_string(),
        reason: format!("{e:?}"),
    })
}

impl Fabric<CudaBackend> for NcclFabric {
    fn transfer(
        &self,
        devices: &[Arc<CudaBackend>],
        moves: Vec<(usize, usize, GpuBuf<f32>)>,
    ) -> DeviceResult<Vec<GpuBuf<f32>>> {
        use crate::device::DeviceOps;
        // Receive buffers first: allocation is not allowed inside an NCCL group.
        let mut targets: Vec<Option<GpuBuf<f32>>> = Vec::with_capacity(moves.len());
        for (from, to, b) in &moves {
            targets.push(if from != to {
                Some(devices[*to].zeros(b.len())?)
            } else {
                None
            });
        }
        nccl("an exchange", nccl::group_start())?;
        let mut queued = Ok(());
        for ((from, to, b), target) in moves.iter().zip(targets.iter_mut()) {
            if let Some(dst) = target {
                queued = nccl("a send", self.comms[*from].send(&**b, *to as i32))
                    .and_then(|_| nccl("a receive", self.comms[*to].recv(&mut **dst, *from as i32)))
                    .map(|_| ());
                if queued.is_err() {
                    break;
                }
            }
        }
        // The group is closed even when a send failed, so later groups start clean.
        let ended = nccl("an exchange", nccl::group_end());
        queued?;
        ended?;
        Ok(moves
            .into_iter()
            .zip(targets)
            .map(|((_, _, b), target)| target.unwrap_or(b))
            .collect())
    }

    /// One NCCL all-reduce over the GPUs, in place.
    fn all_reduce(
        &self,
        _devices: &[Arc<CudaBackend>],
        mut parts: Vec<GpuBuf<f32>>,
    ) -> DeviceResult<Vec<GpuBuf<f32>>> {
        use kernels_cuda::cudarc::nccl::safe::ReduceOp;
        if parts.len() < 2 {
            return Ok(parts);
        }
        nccl("an all-reduce", nccl::group_start())?;
        let mut queued = Ok(());
        for (comm, part) in self.comms.iter().zip(parts.iter_mut()) {
            queued = nccl(
                "an all-reduce",
                comm.all_reduce_in_place(&mut **part, &ReduceOp::Sum),
            )
            .map(|_| ());
            if queued.is_err() {
                break;
            }
        }
        let ended = nccl("an all-reduce", nccl::group_end());
        queued?;
        ended?;
        Ok(parts)
    }
}
