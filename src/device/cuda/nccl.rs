//! Moving buffers between GPUs with NCCL peer-to-peer sends (NVLink where the GPUs have
//! it), for the resident pass's expert exchange over several GPUs. One communicator per
//! GPU, all in this process; every move of an exchange step is one NCCL group, so the
//! transfers run at once. Without libnccl the pass moves buffers through host memory.

use super::CudaBackend;
use super::GpuBuf;
use crate::device::Fabric;
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

/// Stops on an NCCL failure after start-up (as every device failure does, see the CUDA
/// backend's module comment).
fn nccl<T>(what: &str, r: Result<T, nccl::NcclError>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("NCCL failure during {what}: {e:?}"),
    }
}

impl Fabric<CudaBackend> for NcclFabric {
    fn transfer(
        &self,
        devices: &[Arc<CudaBackend>],
        moves: Vec<(usize, usize, GpuBuf<f32>)>,
    ) -> Vec<GpuBuf<f32>> {
        use crate::device::DeviceOps;
        // Receive buffers first: allocation is not allowed inside an NCCL group.
        let mut targets: Vec<Option<GpuBuf<f32>>> = moves
            .iter()
            .map(|(from, to, b)| (from != to).then(|| devices[*to].zeros(b.len())))
            .collect();
        nccl("an exchange", nccl::group_start());
        for ((from, to, b), target) in moves.iter().zip(targets.iter_mut()) {
            if let Some(dst) = target {
                nccl("a send", self.comms[*from].send(&**b, *to as i32));
                nccl("a receive", self.comms[*to].recv(&mut **dst, *from as i32));
            }
        }
        nccl("an exchange", nccl::group_end());
        moves
            .into_iter()
            .zip(targets)
            .map(|((_, _, b), target)| target.unwrap_or(b))
            .collect()
    }

    /// One NCCL all-reduce over the GPUs, in place.
    fn all_reduce(
        &self,
        _devices: &[Arc<CudaBackend>],
        mut parts: Vec<GpuBuf<f32>>,
    ) -> Vec<GpuBuf<f32>> {
        use kernels_cuda::cudarc::nccl::safe::ReduceOp;
        if parts.len() < 2 {
            return parts;
        }
        nccl("an all-reduce", nccl::group_start());
        for (comm, part) in self.comms.iter().zip(parts.iter_mut()) {
            nccl(
                "an all-reduce",
                comm.all_reduce_in_place(&mut **part, &ReduceOp::Sum),
            );
        }
        nccl("an all-reduce", nccl::group_end());
        parts
    }
}
