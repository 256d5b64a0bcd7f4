//! CUDA kernels for kimi-hybrid.
//!
//! The GPU backend (MLA decode/prefill, router, INT4 GEMM, FP8 GEMM) compiles its `.cu`
//! sources with NVRTC at start-up and reaches the driver through cudarc's dynamic
//! loading, so this crate builds on machines without CUDA. This first version only
//! answers whether a CUDA driver library can be found; the kernels arrive with the GPU
//! backend.

/// Why no CUDA device can be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoCuda {
    pub reason: String,
}

impl std::fmt::Display for NoCuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no CUDA device: {}", self.reason)
    }
}

impl std::error::Error for NoCuda {}

/// Looks for the CUDA driver library in the usual places (no loading, no panics).
pub fn driver_library_present() -> Result<std::path::PathBuf, NoCuda> {
    const CANDIDATES: &[&str] = &[
        "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
        "/usr/lib64/libcuda.so.1",
        "/usr/local/cuda/lib64/stubs/libcuda.so",
        "/usr/lib/aarch64-linux-gnu/libcuda.so.1",
    ];
    CANDIDATES
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| NoCuda {
            reason: "libcuda.so.1 not found (no NVIDIA driver installed); use a CPU profile".into(),
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn probe_never_panics() {
        match super::driver_library_present() {
            Ok(path) => assert!(path.exists()),
            Err(e) => assert!(e.to_string().contains("no CUDA device")),
        }
    }
}
