//! Opening a GPU: every way it can be missing or unsuitable is an error value with what
//! to do about it. On success the kernels are compiled for its architecture and loaded.

use crate::nvrtc::{self, arch_for};
use crate::sources::MODULES;
use crate::CudaError;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream};
use std::collections::HashMap;
use std::sync::Arc;

pub struct GpuDevice {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// The driver's number for this GPU.
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub arch: &'static str,
    pub free_bytes: usize,
    pub total_bytes: usize,
    functions: HashMap<&'static str, CudaFunction>,
    /// cuBLAS on `stream`, created on first use (see [`GpuDevice::blas`]).
    pub(crate) blas: std::sync::OnceLock<Option<cudarc::cublas::CudaBlas>>,
}

fn no_cuda(reason: impl Into<String>) -> CudaError {
    CudaError::Unavailable(reason.into())
}

impl GpuDevice {
    /// Opens device `ordinal`, requiring `min_free_bytes` of free memory.
    pub fn open(ordinal: usize, min_free_bytes: usize) -> Result<GpuDevice, CudaError> {
        crate::driver_library_present()?;
        // SAFETY: only tries to open the library.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(no_cuda(
                "libcuda could not be loaded (is the NVIDIA driver installed?)",
            ));
        }
        let count = CudaContext::device_count()
            .map_err(|e| no_cuda(format!("the CUDA driver reports an error: {e}")))?;
        if count <= 0 {
            return Err(no_cuda("the CUDA driver sees no GPU"));
        }
        if ordinal >= count as usize {
            return Err(no_cuda(format!(
                "GPU {ordinal} requested but only {count} present"
            )));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| no_cuda(format!("cannot create a context on GPU {ordinal}: {e}")))?;
        // One stream per device orders all of its work, and the staging buffers order
        // their copies with their own events, so cudarc's per-buffer events (two per
        // allocation, recorded and waited on around every launch) are not needed; they
        // would also make decode steps impossible to capture as graphs (a capture may not
        // wait on events recorded outside it).
        // SAFETY: no buffer of this context exists yet, and all of its work goes to
        // `stream`.
        unsafe { ctx.disable_event_tracking() };
        // A created stream, not the legacy default stream, which cannot be captured.
        let stream = ctx
            .new_stream()
            .map_err(|e| no_cuda(format!("cannot create a stream on GPU {ordinal}: {e}")))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let cc = ctx
            .compute_capability()
            .map_err(|e| no_cuda(format!("cannot read the compute capability: {e}")))?;
        let arch = arch_for(cc.0, cc.1).ok_or_else(|| {
            no_cuda(format!(
                "{name} has compute capability {}.{}, which these kernels do not target \
                 (sm_80, sm_89, sm_90, sm_100, sm_120)",
                cc.0, cc.1
            ))
        })?;
        let (free_bytes, total_bytes) = cudarc::driver::result::mem_get_info()
            .map_err(|e| no_cuda(format!("cannot read GPU memory: {e}")))?;
        if free_bytes < min_free_bytes {
            return Err(no_cuda(format!(
                "{name} has {:.1} GiB free, the plan needs {:.1} GiB",
                free_bytes as f64 / (1u64 << 30) as f64,
                min_free_bytes as f64 / (1u64 << 30) as f64
            )));
        }
        let mut functions = HashMap::new();
        for m in MODULES {
            let ptx = nvrtc::compile(m, arch).map_err(|e| no_cuda(e.to_string()))?;
            let module = ctx
                .load_module(ptx)
                .map_err(|e| no_cuda(format!("cannot load module {}: {e}", m.name)))?;
            for &k in m.kernels {
                let f = module
                    .load_function(k)
                    .map_err(|e| no_cuda(format!("kernel {k} missing from {}: {e}", m.name)))?;
                functions.insert(k, f);
            }
        }
        // Kernels that take more dynamic shared memory than the default 48 KiB opt in.
        if let Some(f) = functions.get("mla_decode_tc_bf16") {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                crate::ops::MLA_TC_SHARED_BYTES as i32,
            )
            .map_err(|e| no_cuda(format!("cannot give mla_decode_tc_bf16 its shared memory: {e}")))?;
        }
        Ok(GpuDevice {
            stream,
            ctx,
            ordinal,
            name,
            compute_capability: cc,
            arch,
            free_bytes,
            total_bytes,
            functions,
            blas: std::sync::OnceLock::new(),
        })
    }

    pub fn function(&self, name: &str) -> Result<&CudaFunction, CudaError> {
        self.functions
            .get(name)
            .ok_or_else(|| no_cuda(format!("kernel {name} is not loaded")))
    }
}
