//! Device buffers of the resident pass that make their GPU's context current before they
//! are freed. With one stream per GPU and cudarc's per-buffer events off (they would
//! stop decode steps from being captured as graphs), cudarc frees a buffer with a
//! stream-ordered free in whatever context is current; a pass over several GPUs drops
//! one GPU's buffers after another GPU's work, and the driver's stream operations expect
//! the stream's own context to be current.

use kernels_cuda::cudarc::driver::CudaSlice;
use std::ops::{Deref, DerefMut};

pub struct GpuBuf<T>(CudaSlice<T>);

impl<T> GpuBuf<T> {
    pub fn new(slice: CudaSlice<T>) -> Self {
        GpuBuf(slice)
    }
}

impl<T> Deref for GpuBuf<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.0
    }
}

impl<T> DerefMut for GpuBuf<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.0
    }
}

impl<T> Drop for GpuBuf<T> {
    fn drop(&mut self) {
        // The slice itself is freed right after this, in its own context.
        let _ = self.0.context().bind_to_thread();
    }
}
