//! Compiling the kernel sources with NVRTC. The library is loaded at run time (cudarc's
//! dynamic loading), so a machine without it gets an error value, never a panic.

use crate::sources::{full_source, Module, MODULES};
use crate::NoCuda;

/// Architectures the kernels are built for, as NVRTC virtual architectures.
pub const ARCHITECTURES: &[(u32, &str)] = &[
    (80, "compute_80"),
    (89, "compute_89"),
    (90, "compute_90"),
    (100, "compute_100"),
    (120, "compute_120"),
];

/// The NVRTC architecture for a device's compute capability, if supported.
pub fn arch_for(major: i32, minor: i32) -> Option<&'static str> {
    let cc = (major * 10 + minor) as u32;
    ARCHITECTURES
        .iter()
        .find(|(a, _)| *a == cc)
        .map(|(_, s)| *s)
}

/// Whether libnvrtc can be loaded (searched by the dynamic loader: `LD_LIBRARY_PATH`).
pub fn available() -> Result<(), NoCuda> {
    // SAFETY: only tries to open the library; no symbol is called.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(NoCuda {
            reason: "libnvrtc.so (NVIDIA's runtime compiler) was not found; install the CUDA \
                     toolkit or `pip install nvidia-cuda-nvrtc-cu12` and add its lib directory \
                     to LD_LIBRARY_PATH"
                .into(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    NoNvrtc(#[from] NoCuda),
    #[error("NVRTC failed to compile module {module} for {arch}:\n{log}")]
    Failed {
        module: String,
        arch: String,
        log: String,
    },
}

/// Compiles one module to PTX for `arch` (e.g. `compute_90`).
pub fn compile(module: &Module, arch: &'static str) -> Result<cudarc::nvrtc::Ptx, CompileError> {
    available()?;
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        name: Some(format!("{}.cu", module.name)),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(full_source(module), opts).map_err(|e| {
        let log = match &e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                log.to_string_lossy().into_owned()
            }
            other => other.to_string(),
        };
        CompileError::Failed {
            module: module.name.into(),
            arch: arch.into(),
            log,
        }
    })
}

/// Compiles every module for `arch`; returns (module, PTX) pairs.
pub fn compile_all(
    arch: &'static str,
) -> Result<Vec<(&'static Module, cudarc::nvrtc::Ptx)>, CompileError> {
    MODULES
        .iter()
        .map(|m| compile(m, arch).map(|p| (m, p)))
        .collect()
}
