//! Page-locked host buffers for the hybrid hand-off: hidden states go down to the host
//! experts and their sums come back through these, so the copies are asynchronous DMA
//! that overlaps the kernels queued behind them. They are ordinary cached host memory
//! (not write-combined), because the host reads what comes down.
//!
//! A [`StagingPool`] starts with two buffers (one hand-off in flight while the previous
//! one is read), grows them when a pass needs more, and keeps as many as an exchange
//! step between several GPUs has in flight (up to [`KEEP_BYTES`]); a buffer is returned
//! with the event of the last copy that touched it and is only reused once that copy is
//! done.

use crate::CudaError;
use cudarc::driver::{result, CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr};
use std::sync::{Arc, Mutex};

fn err(what: &str, e: impl std::fmt::Display) -> CudaError {
    CudaError::Failed(format!("{what} failed: {e}"))
}

/// One page-locked buffer of f32.
pub struct Staging {
    ptr: *mut f32,
    len: usize,
    ctx: Arc<CudaContext>,
    /// The last copy using this buffer.
    busy: Option<CudaEvent>,
}

// SAFETY: the buffer is plain host memory owned by this value; access is through
// `&mut self` or after the pending copy's event has completed.
unsafe impl Send for Staging {}

impl Staging {
    pub fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self, CudaError> {
        ctx.bind_to_thread()
            .map_err(|e| err("binding the context", e))?;
        // SAFETY: a fresh allocation of `len` f32, freed in Drop.
        let ptr = unsafe { result::malloc_host(len.max(1) * 4, 0) }
            .map_err(|e| err("allocating page-locked host memory", e))?;
        Ok(Staging {
            ptr: ptr as *mut f32,
            len: len.max(1),
            ctx: ctx.clone(),
            busy: None,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Waits for the last copy that used the buffer.
    fn settle(&mut self) -> Result<(), CudaError> {
        if let Some(e) = self.busy.take() {
            e.synchronize()
                .map_err(|e| err("waiting for a hand-off copy", e))?;
        }
        Ok(())
    }

    /// The first `n` values, once every copy into the buffer has landed.
    pub fn read(&mut self, n: usize) -> Result<&[f32], CudaError> {
        self.settle()?;
        // SAFETY: n <= len (callers size the buffer) and no copy is in flight.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr, n.min(self.len)) })
    }

    /// Queues a copy of `src` into the buffer on `stream`; returns at once.
    pub fn download(
        &mut self,
        stream: &Arc<CudaStream>,
        src: &CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        self.settle()?;
        let n = src.len();
        if n > self.len {
            return Err(err(
                "a hand-off download",
                "the staging buffer is too small",
            ));
        }
        // The raw copy below runs in the current context, which must be the stream's
        // (another GPU's work may have left its own current on this thread).
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| err("a hand-off download", e))?;
        // SAFETY: n <= len; the buffer is not read until `read` waits on the event.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.ptr, n) };
        let (src_ptr, _sync) = src.device_ptr(stream);
        unsafe { result::memcpy_dtoh_async(dst, src_ptr, stream.cu_stream()) }
            .map_err(|e| err("a hand-off download", e))?;
        self.busy = Some(
            stream
                .record_event(None)
                .map_err(|e| err("recording a hand-off copy", e))?,
        );
        Ok(())
    }

    /// Copies `x` into the buffer and queues its upload into `dst` on `stream`.
    pub fn upload(
        &mut self,
        stream: &Arc<CudaStream>,
        x: &[f32],
        dst: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        self.settle()?;
        if x.len() > self.len || x.len() > dst.len() {
            return Err(err("a hand-off upload", "the staging buffer is too small"));
        }
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| err("a hand-off upload", e))?;
        // SAFETY: no copy is in flight and x fits.
        let host = unsafe { std::slice::from_raw_parts_mut(self.ptr, x.len()) };
        host.copy_from_slice(x);
        let (dst_ptr, _sync) = cudarc::driver::DevicePtrMut::device_ptr_mut(dst, stream);
        unsafe { result::memcpy_htod_async(dst_ptr, &*host, stream.cu_stream()) }
            .map_err(|e| err("a hand-off upload", e))?;
        self.busy = Some(
            stream
                .record_event(None)
                .map_err(|e| err("recording a hand-off copy", e))?,
        );
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // A copy still writing into the buffer must finish before it is freed.
        if let Some(e) = self.busy.take() {
            let _ = e.synchronize();
        }
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by malloc_host in `new`, freed once.
        let _ = unsafe { result::free_host(self.ptr as *mut std::ffi::c_void) };
    }
}

/// Page-locked bytes a pool keeps for reuse (beyond its two largest buffers).
pub const KEEP_BYTES: usize = 1 << 30;

/// Two (or more, when hand-offs overlap) staging buffers, pre-allocated and reused.
pub struct StagingPool {
    ctx: Arc<CudaContext>,
    free: Mutex<Vec<Staging>>,
}

impl StagingPool {
    /// Allocates two buffers of `len` values.
    pub fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self, CudaError> {
        let free = vec![Staging::new(ctx, len)?, Staging::new(ctx, len)?];
        Ok(StagingPool {
            ctx: ctx.clone(),
            free: Mutex::new(free),
        })
    }

    /// A buffer of at least `len` values: the smallest free one that fits, else a new
    /// one.
    pub fn take(&self, len: usize) -> Result<Staging, CudaError> {
        let spare = {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            // `free` is largest first.
            free.iter()
                .rposition(|s| s.len() >= len)
                .map(|i| free.remove(i))
        };
        match spare {
            Some(s) => Ok(s),
            None => Staging::new(&self.ctx, len),
        }
    }

    /// Returns a buffer for reuse (its pending copy, if any, is waited for then). The
    /// largest buffers are kept, as many as one exchange step has in flight, up to
    /// [`KEEP_BYTES`] in all: page-locking memory is slow, so a step that needs a buffer
    /// per piece it moves should find them already there on the next layer.
    pub fn give(&self, s: Staging) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free.push(s);
        free.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let mut total = 0;
        let keep = free
            .iter()
            .take_while(|s| {
                total += s.len() * 4;
                total <= KEEP_BYTES
            })
            .count()
            .max(2);
        free.truncate(keep);
    }
}
