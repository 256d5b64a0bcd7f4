//! CUDA graphs: work queued on a device's stream recorded once (stream capture) and
//! replayed with one launch. The kernels of a recording run with the arguments they were
//! recorded with, so recorded work must read and write buffers whose addresses stay the
//! same between replays; its own temporaries are graph allocations (the stream-ordered
//! allocations made while capturing), which keep their addresses for every launch.

use crate::device::GpuDevice;
use crate::CudaError;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaGraph;

/// A recorded piece of work, launched on the stream it was recorded on.
pub struct Recording {
    graph: CudaGraph,
}

// SAFETY: a graph is used through `&mut` or behind the caller's lock only (graph objects
// are not internally synchronised), and cudarc binds the device's context before every
// call on it, from whichever thread.
unsafe impl Send for Recording {}

fn failed(what: &str, e: impl std::fmt::Display) -> CudaError {
    CudaError::Failed(format!("{what} failed: {e}"))
}

impl GpuDevice {
    /// Starts recording this device's stream: work queued on it from this thread is
    /// recorded, not run, until [`end_recording`](Self::end_recording). Calls that would
    /// wait for the device or allocate synchronously fail while recording (thread-local
    /// capture mode) and spoil the recording.
    pub fn begin_recording(&self) -> Result<(), CudaError> {
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| failed("starting a CUDA graph capture", e))
    }

    /// Ends the recording begun by [`begin_recording`](Self::begin_recording); an error
    /// when something spoiled it (the work then has to run as it is, not recorded).
    pub fn end_recording(&self) -> Result<Recording, CudaError> {
        let flag = CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH;
        match self.stream.end_capture(flag) {
            Ok(Some(graph)) => Ok(Recording { graph }),
            Ok(None) => Err(failed("a CUDA graph capture", "nothing was recorded")),
            Err(e) => Err(failed("a CUDA graph capture", e)),
        }
    }

    /// Whether this device's stream is being recorded (a recording left open by a failure
    /// must be ended before the stream can be used again).
    pub fn recording(&self) -> bool {
        use cudarc::driver::sys::CUstreamCaptureStatus as S;
        !matches!(
            self.stream.capture_status(),
            Ok(S::CU_STREAM_CAPTURE_STATUS_NONE) | Err(_)
        )
    }

    /// Queues a replay of `r` on this device's stream.
    pub fn replay(&self, r: &Recording) -> Result<(), CudaError> {
        r.graph
            .launch()
            .map_err(|e| failed("launching a CUDA graph", e))
    }
}
