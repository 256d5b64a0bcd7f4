//! Compiling the kernel sources with NVRTC. The library is loaded at run time, so a
//! machine without it gets an error value, never a panic.

use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::OnceLock;

use crate::sources::{full_source, Module, MODULES};
use crate::CudaError;

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

/// Sonames tried in order: the toolkit's development link, then CUDA 13's and CUDA 12's
/// runtime names (the `nvidia-cuda-nvrtc` wheels ship only the versioned file).
const LIBRARY_NAMES: &[&str] = &["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"];

type Program = *mut c_void;

/// The NVRTC entry points the kernels need. They are resolved one by one here rather than
/// through cudarc's bindings because those bind every symbol of one CUDA release eagerly
/// and panic when one is missing (CUDA 13's NVRTC dropped `nvrtcGetNVVM`, so a binding for
/// 12.x cannot open it); these seven calls exist unchanged from CUDA 11 to 13.
struct Nvrtc {
    create: unsafe extern "C" fn(
        *mut Program,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> c_int,
    compile: unsafe extern "C" fn(Program, c_int, *const *const c_char) -> c_int,
    log_size: unsafe extern "C" fn(Program, *mut usize) -> c_int,
    log: unsafe extern "C" fn(Program, *mut c_char) -> c_int,
    ptx_size: unsafe extern "C" fn(Program, *mut usize) -> c_int,
    ptx: unsafe extern "C" fn(Program, *mut c_char) -> c_int,
    destroy: unsafe extern "C" fn(*mut Program) -> c_int,
    /// Keeps the entry points above valid.
    _library: libloading::Library,
}

const NVRTC_SUCCESS: c_int = 0;

fn not_found(detail: &str) -> CudaError {
    CudaError::Unavailable(format!(
        "libnvrtc.so (NVIDIA's runtime compiler) could not be loaded ({detail}); install the \
             CUDA toolkit, or `pip install nvidia-cuda-nvrtc-cu12` (CUDA 12 drivers) or \
             `pip install nvidia-cuda-nvrtc` (CUDA 13 drivers), and add its lib directory to \
             LD_LIBRARY_PATH"
    ))
}

impl Nvrtc {
    fn open() -> Result<Nvrtc, CudaError> {
        let mut tried = Vec::new();
        for name in LIBRARY_NAMES {
            // SAFETY: loading NVRTC runs no initialisation with preconditions of ours.
            match unsafe { libloading::Library::new(name) } {
                Ok(library) => return Nvrtc::resolve(library, name),
                Err(e) => tried.push(format!("{name}: {e}")),
            }
        }
        Err(not_found(&tried.join("; ")))
    }

    fn resolve(library: libloading::Library, name: &str) -> Result<Nvrtc, CudaError> {
        fn symbol<T: Copy>(
            library: &libloading::Library,
            lib: &str,
            sym: &str,
        ) -> Result<T, CudaError> {
            // SAFETY: each call below names the C signature NVRTC documents for `sym`.
            unsafe { library.get::<T>(sym.as_bytes()) }
                .map(|s| *s)
                .map_err(|e| not_found(&format!("{lib} lacks {sym}: {e}")))
        }
        Ok(Nvrtc {
            create: symbol(&library, name, "nvrtcCreateProgram")?,
            compile: symbol(&library, name, "nvrtcCompileProgram")?,
            log_size: symbol(&library, name, "nvrtcGetProgramLogSize")?,
            log: symbol(&library, name, "nvrtcGetProgramLog")?,
            ptx_size: symbol(&library, name, "nvrtcGetPTXSize")?,
            ptx: symbol(&library, name, "nvrtcGetPTX")?,
            destroy: symbol(&library, name, "nvrtcDestroyProgram")?,
            _library: library,
        })
    }

    /// Compiles `source` to PTX; the error is NVRTC's log (or its failing call).
    fn compile_ptx(
        &self,
        source: &str,
        name: &str,
        options: &[String],
    ) -> Result<String, CudaError> {
        let source = CString::new(source)
            .map_err(|_| CudaError::Failed("kernel source holds a NUL byte".into()))?;
        let name = CString::new(name)
            .map_err(|_| CudaError::Failed("module name holds a NUL byte".into()))?;
        let options = options
            .iter()
            .map(|o| CString::new(o.as_str()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| CudaError::Failed("an NVRTC option holds a NUL byte".into()))?;
        let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
        let mut program: Program = std::ptr::null_mut();
        // SAFETY: NUL-terminated strings that outlive the call; no headers are passed.
        let rc = unsafe {
            (self.create)(
                &mut program,
                source.as_ptr(),
                name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        if rc != NVRTC_SUCCESS {
            return Err(CudaError::Failed(format!(
                "nvrtcCreateProgram returned {rc}"
            )));
        }
        // SAFETY: `program` was created above and is destroyed once, below.
        let result = unsafe { self.compile_created(program, &option_ptrs) };
        // SAFETY: as above.
        unsafe { (self.destroy)(&mut program) };
        result
    }

    /// # Safety
    /// `program` must be a live NVRTC program.
    unsafe fn compile_created(
        &self,
        program: Program,
        options: &[*const c_char],
    ) -> Result<String, CudaError> {
        let count = c_int::try_from(options.len())
            .map_err(|_| CudaError::Failed("too many NVRTC options".into()))?;
        let rc = (self.compile)(program, count, options.as_ptr());
        if rc != NVRTC_SUCCESS {
            let mut size = 0usize;
            (self.log_size)(program, &mut size);
            let mut log = vec![0u8; size.max(1)];
            (self.log)(program, log.as_mut_ptr().cast());
            let log = String::from_utf8_lossy(&log)
                .trim_end_matches('\0')
                .to_string();
            return Err(CudaError::Failed(format!(
                "nvrtcCompileProgram returned {rc}:\n{log}"
            )));
        }
        let mut size = 0usize;
        if (self.ptx_size)(program, &mut size) != NVRTC_SUCCESS {
            return Err(CudaError::Failed("nvrtcGetPTXSize failed".into()));
        }
        let mut ptx = vec![0u8; size.max(1)];
        if (self.ptx)(program, ptx.as_mut_ptr().cast()) != NVRTC_SUCCESS {
            return Err(CudaError::Failed("nvrtcGetPTX failed".into()));
        }
        Ok(String::from_utf8_lossy(&ptx)
            .trim_end_matches('\0')
            .to_string())
    }
}

/// NVRTC, opened once per process.
fn nvrtc() -> Result<&'static Nvrtc, CudaError> {
    static NVRTC: OnceLock<Result<Nvrtc, CudaError>> = OnceLock::new();
    NVRTC
        .get_or_init(Nvrtc::open)
        .as_ref()
        .map_err(Clone::clone)
}

/// Whether libnvrtc can be loaded (searched by the dynamic loader: `LD_LIBRARY_PATH`), with
/// every entry point the kernels need.
pub fn available() -> Result<(), CudaError> {
    nvrtc().map(|_| ())
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    NoNvrtc(#[from] CudaError),
    #[error("NVRTC failed to compile module {module} for {arch}:\n{log}")]
    Failed {
        module: String,
        arch: String,
        log: String,
    },
}

/// Compiles one module to PTX for `arch` (e.g. `compute_90`).
pub fn compile(module: &Module, arch: &'static str) -> Result<cudarc::nvrtc::Ptx, CompileError> {
    let nvrtc = nvrtc()?;
    let options = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
    ];
    nvrtc
        .compile_ptx(
            &full_source(module),
            &format!("{}.cu", module.name),
            &options,
        )
        .map(cudarc::nvrtc::Ptx::from_src)
        .map_err(|e| CompileError::Failed {
            module: module.name.into(),
            arch: arch.into(),
            log: e.reason().to_string(),
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
