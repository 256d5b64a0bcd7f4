//! BF16 weight products through cuBLAS tensor cores, at the f32 activations' accuracy:
//! each activation is split into two BF16 parts (`split_bf16`), the BF16 weight (exact
//! as stored) multiplies both with f32 accumulation, and the second product is added to
//! the first (`beta = 1`). Two BF16 GEMMs cost a fraction of a CUDA-core f32 GEMM at
//! prefill sizes; decode-sized products stay on the GEMV kernels. INT4 weights take the
//! same route at prefill sizes, expanded to an exact pair of BF16 matrices first.

use crate::device::GpuDevice;
use crate::ops::{blocks_for, cfg, launch_err};
use crate::CudaError;
use cudarc::cublas::{sys as cublas_sys, CudaBlas};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};

/// Tokens from which a BF16 product goes to cuBLAS (below, the GEMV/GEMM kernels).
pub const BLAS_MIN_TOKENS: usize = 32;

fn failed(what: &str, e: impl std::fmt::Display) -> CudaError {
    CudaError::Failed(format!("{what} failed: {e}"))
}

/// `c[t, r] (+)= sum_k w[r, k] x[t, k]`, BF16 `w` `[rows, cols]` and `x`
/// `[tokens, cols]`, f32 `c` and accumulation: cuBLAS's column-major view is
/// `cᵀ = wᵀᵀ · xᵀ`. `accumulate` adds to `c` instead of overwriting it.
#[allow(clippy::too_many_arguments)]
pub fn bf16_gemm(
    d: &GpuDevice,
    blas: &CudaBlas,
    w: &CudaSlice<u16>,
    x: &CudaSlice<u16>,
    c: &mut CudaSlice<f32>,
    (rows, cols, tokens): (usize, usize, usize),
    accumulate: bool,
) -> Result<(), CudaError> {
    let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
    let (wp, _w) = w.device_ptr(&d.stream);
    let (xp, _x) = x.device_ptr(&d.stream);
    let (cp, _c) = c.device_ptr_mut(&d.stream);
    // SAFETY: the buffers hold rows x cols, tokens x cols and tokens x rows values, as the
    // leading dimensions say; alpha and beta are host scalars (the default pointer mode).
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            cublas_sys::cublasOperation_t::CUBLAS_OP_T,
            cublas_sys::cublasOperation_t::CUBLAS_OP_N,
            rows as i32,
            tokens as i32,
            cols as i32,
            &alpha as *const f32 as *const _,
            wp as *const _,
            cublas_sys::cudaDataType::CUDA_R_16BF,
            cols as i32,
            xp as *const _,
            cublas_sys::cudaDataType::CUDA_R_16BF,
            cols as i32,
            &beta as *const f32 as *const _,
            cp as *mut _,
            cublas_sys::cudaDataType::CUDA_R_32F,
            rows as i32,
            cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| failed("cublasGemmEx (BF16)", e))
}

impl GpuDevice {
    /// The cuBLAS handle on this device's stream, created on first use; `None` where
    /// libcublas cannot be loaded (the callers then use their own kernels).
    pub fn blas(&self) -> Option<&CudaBlas> {
        self.blas
            .get_or_init(|| {
                // SAFETY: only tries to load the library.
                if !unsafe { cublas_sys::is_culib_present() } {
                    return None;
                }
                CudaBlas::new(self.stream.clone()).ok()
            })
            .as_ref()
    }

    /// `x` split into BF16 halves `(hi, lo)`, `x ≈ hi + lo`.
    pub fn split_bf16(
        &self,
        x: &CudaSlice<f32>,
        n: usize,
    ) -> Result<(CudaSlice<u16>, CudaSlice<u16>), CudaError> {
        // split_bf16 writes every value of both.
        let mut hi = self.scratch::<u16>("BF16 activations", n)?;
        let mut lo = self.scratch::<u16>("BF16 activations", n)?;
        let f = self.function("split_bf16")?;
        let n_i = n as i32;
        let mut b = self.stream.launch_builder(f);
        b.arg(x).arg(&mut hi).arg(&mut lo).arg(&n_i);
        // SAFETY: all three buffers hold n values.
        unsafe { b.launch(cfg((blocks_for(n, 256), 1, 1), (256, 1, 1))) }
            .map_err(|e| launch_err("split_bf16", e))?;
        Ok((hi, lo))
    }

    /// `y[t, r] = sum_k w[r, k] x[t, k]` for a BF16 weight and f32 activations through
    /// cuBLAS (two BF16 products of the split activations). `Ok(false)` without cuBLAS:
    /// nothing was computed.
    pub fn bf16_matmul_blas(
        &self,
        w: &CudaSlice<u16>,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        (rows, cols, tokens): (usize, usize, usize),
    ) -> Result<bool, CudaError> {
        let Some(blas) = self.blas() else {
            return Ok(false);
        };
        let (hi, lo) = self.split_bf16(x, tokens * cols)?;
        bf16_gemm(self, blas, w, &hi, y, (rows, cols, tokens), false)?;
        bf16_gemm(self, blas, w, &lo, y, (rows, cols, tokens), true)?;
        Ok(true)
    }

    /// `y[t, r] = sum_k w[r, k] x[t, k]` for an INT4 group-quantized weight through cuBLAS:
    /// the weight is expanded to BF16 `w_hi + w_lo` (exact, see
    /// `int4_dequant_split_bf16`) and the activations split as in
    /// [`bf16_matmul_blas`](Self::bf16_matmul_blas); the three products
    /// `w_hi·x_hi + w_hi·x_lo + w_lo·x_hi` leave out only `w_lo·x_lo`, under 2⁻¹⁶ of the
    /// sum. `Ok(false)` without cuBLAS: nothing was computed.
    #[allow(clippy::too_many_arguments)]
    pub fn int4_matmul_blas(
        &self,
        packed: &CudaSlice<u32>,
        scales: &CudaSlice<u16>,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        (rows, cols, tokens): (usize, usize, usize),
        group: usize,
    ) -> Result<bool, CudaError> {
        let Some(blas) = self.blas() else {
            return Ok(false);
        };
        // int4_dequant_split_bf16 writes every value of both.
        let mut w_hi = self.scratch::<u16>("BF16 expansion of an INT4 weight", rows * cols)?;
        let mut w_lo = self.scratch::<u16>("BF16 expansion of an INT4 weight", rows * cols)?;
        let f = self.function("int4_dequant_split_bf16")?;
        let ints = [rows as i32, cols as i32, group as i32];
        let mut b = self.stream.launch_builder(f);
        b.arg(packed).arg(scales).arg(&mut w_hi).arg(&mut w_lo);
        for a in &ints {
            b.arg(a);
        }
        let words = rows * cols / 8;
        // SAFETY: one thread per packed word of the [rows, cols] weight; both outputs hold
        // rows * cols values.
        unsafe { b.launch(cfg((blocks_for(words, 256), 1, 1), (256, 1, 1))) }
            .map_err(|e| launch_err("int4_dequant_split_bf16", e))?;
        let (x_hi, x_lo) = self.split_bf16(x, tokens * cols)?;
        let shape = (rows, cols, tokens);
        bf16_gemm(self, blas, &w_hi, &x_hi, y, shape, false)?;
        bf16_gemm(self, blas, &w_hi, &x_lo, y, shape, true)?;
        bf16_gemm(self, blas, &w_lo, &x_hi, y, shape, true)?;
        Ok(true)
    }
}
