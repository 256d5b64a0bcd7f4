//! Weights resident on the device, in the checkpoint's own formats (INT4 pack-quantized,
//! FP8-block, BF16) or f32 (F16/F32 checkpoints, widened once at upload), and the matrix
//! products over them: whole matrices through the format's own GEMV/GEMM, bands of rows
//! (per-head slices of `kv_b_proj`) decoded to f32 first.

use crate::device::GpuDevice;
use crate::ops::{blocks_for, cfg, launch_err};
use crate::CudaError;
use cudarc::driver::{CudaSlice, PushKernelArg};

/// A weight `[rows, cols]` on the device.
pub struct DeviceWeight {
    pub rows: usize,
    pub cols: usize,
    pub data: DeviceData,
}

/// A device weight's values, in its format.
pub enum DeviceData {
    Int4 {
        packed: CudaSlice<u32>,
        scales: CudaSlice<u16>,
        group: usize,
    },
    Fp8 {
        data: CudaSlice<u8>,
        scale_inv: CudaSlice<f32>,
        block: [usize; 2],
    },
    Bf16(CudaSlice<u16>),
    F32(CudaSlice<f32>),
}

impl DeviceWeight {
    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        match &self.data {
            DeviceData::Int4 { packed, scales, .. } => packed.len() * 4 + scales.len() * 2,
            DeviceData::Fp8 {
                data, scale_inv, ..
            } => data.len() + scale_inv.len() * 4,
            DeviceData::Bf16(data) => data.len() * 2,
            DeviceData::F32(data) => data.len() * 4,
        }
    }
}

fn copy_err(what: &str, e: impl std::fmt::Display) -> CudaError {
    CudaError::Failed(format!("copying {what} to the GPU failed: {e}"))
}

impl GpuDevice {
    /// Copies host values to a new device buffer.
    pub fn upload<T: cudarc::driver::DeviceRepr>(
        &self,
        what: &str,
        host: &[T],
    ) -> Result<CudaSlice<T>, CudaError> {
        self.stream.memcpy_stod(host).map_err(|e| copy_err(what, e))
    }

    /// Copies a device buffer back to the host (waits for the queue).
    pub fn download<T: cudarc::driver::DeviceRepr>(
        &self,
        what: &str,
        device: &CudaSlice<T>,
    ) -> Result<Vec<T>, CudaError> {
        self.stream
            .memcpy_dtov(device)
            .map_err(|e| CudaError::Failed(format!("copying {what} from the GPU failed: {e}")))
    }

    /// A device buffer of `n` values with undefined contents, for outputs a kernel writes
    /// in full (no memset launch before it).
    pub fn scratch<T: cudarc::driver::DeviceRepr>(
        &self,
        what: &str,
        n: usize,
    ) -> Result<CudaSlice<T>, CudaError> {
        // SAFETY: device memory the host never reads before the caller's kernel writes
        // every value of it.
        unsafe { self.stream.alloc::<T>(n.max(1)) }.map_err(|e| {
            CudaError::Failed(format!(
                "allocating {what} ({n} values) on the GPU failed: {e}"
            ))
        })
    }

    /// A zeroed device buffer of `n` values.
    pub fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        what: &str,
        n: usize,
    ) -> Result<CudaSlice<T>, CudaError> {
        self.stream.alloc_zeros::<T>(n.max(1)).map_err(|e| {
            CudaError::Failed(format!(
                "allocating {what} ({n} values) on the GPU failed: {e}"
            ))
        })
    }

    /// `y[t, r] = sum_k W[r, k] x[t, k]` over all rows of `w`.
    pub fn matmul(
        &self,
        w: &DeviceWeight,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        tokens: usize,
    ) -> Result<(), CudaError> {
        let (rows, cols) = (w.rows, w.cols);
        match &w.data {
            // Products beyond the INT4 tensor-core kernels' token range through cuBLAS
            // (an exact BF16 pair of the weight), when it is there.
            DeviceData::Int4 {
                packed,
                scales,
                group,
            } if tokens >= crate::blas::BLAS_MIN_TOKENS
                && (tokens > crate::ops::INT4_TC_MAX_TOKENS
                    || !crate::ops::int4_tc_fits(cols, *group))
                && cols.is_multiple_of(8)
                && self.int4_matmul_blas(packed, scales, x, y, (rows, cols, tokens), *group)? =>
            {
                Ok(())
            }
            DeviceData::Int4 {
                packed,
                scales,
                group,
            } => self.int4_matmul(packed, scales, x, y, rows, cols, *group, tokens),
            DeviceData::Fp8 {
                data,
                scale_inv,
                block,
            } => self.fp8_matmul(data, scale_inv, x, y, rows, cols, *block, tokens),
            // Prefill-sized products on the tensor cores, when cuBLAS is there.
            DeviceData::Bf16(data)
                if tokens >= crate::blas::BLAS_MIN_TOKENS
                    && self.bf16_matmul_blas(data, x, y, (rows, cols, tokens))? =>
            {
                Ok(())
            }
            DeviceData::Bf16(data) => self.plain_matmul("bf16", data, x, y, rows, cols, tokens),
            DeviceData::F32(data) => self.f32_matmul(data, x, y, rows, cols, tokens),
        }
    }

    /// `y[t, r] = sum_k band[r, k] x[t, k]` for an f32 band `[rows, cols]`.
    pub fn f32_matmul(
        &self,
        band: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
        tokens: usize,
    ) -> Result<(), CudaError> {
        self.plain_matmul("f32", band, x, y, rows, cols, tokens)
    }

    #[allow(clippy::too_many_arguments)]
    fn plain_matmul<T: cudarc::driver::DeviceRepr>(
        &self,
        prefix: &str,
        w: &CudaSlice<T>,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
        tokens: usize,
    ) -> Result<(), CudaError> {
        let ints = [rows as i32, cols as i32, tokens as i32];
        let (name, grid, block) = if tokens <= crate::ops::GEMV_MAX_TOKENS {
            (
                format!("{prefix}_gemv"),
                (blocks_for(rows, 4), 1, 1),
                (128, 1, 1),
            )
        } else {
            (
                format!("{prefix}_gemm"),
                (blocks_for(tokens, 64), blocks_for(rows, 64), 1),
                (16, 16, 1),
            )
        };
        let f = self.function(&name)?;
        let mut b = self.stream.launch_builder(f);
        b.arg(w).arg(x).arg(y);
        for a in &ints {
            b.arg(a);
        }
        // SAFETY: w holds rows * cols values, x tokens * cols, y tokens * rows.
        unsafe { b.launch(cfg(grid, block)) }
            .map(|_| ())
            .map_err(|e| launch_err(&name, e))
    }

    /// Rows `row0..row0 + n` of `w` decoded to f32 into `out` (`[n, cols]`).
    pub fn dequant_rows(
        &self,
        w: &DeviceWeight,
        row0: usize,
        n: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let cols = w.cols;
        if row0 + n > w.rows || out.len() < n * cols {
            return Err(CudaError::Failed(format!(
                "rows {row0}..{} of a {}x{cols} weight do not fit its shape or the output",
                row0 + n,
                w.rows
            )));
        }
        let grid = (blocks_for(n * cols, 256), 1, 1);
        let (r0, nn, c) = (row0 as i32, n as i32, cols as i32);
        match &w.data {
            DeviceData::Int4 {
                packed,
                scales,
                group,
            } => {
                let g = *group as i32;
                let mut b = self
                    .stream
                    .launch_builder(self.function("int4_dequant_rows")?);
                b.arg(packed)
                    .arg(scales)
                    .arg(out)
                    .arg(&r0)
                    .arg(&nn)
                    .arg(&c)
                    .arg(&g);
                // SAFETY: the band lies inside the weight (checked above).
                unsafe { b.launch(cfg(grid, (256, 1, 1))) }
                    .map_err(|e| launch_err("int4_dequant_rows", e))?;
            }
            DeviceData::Fp8 {
                data,
                scale_inv,
                block,
            } => {
                let (br, bc) = (block[0] as i32, block[1] as i32);
                let mut b = self
                    .stream
                    .launch_builder(self.function("fp8_dequant_rows")?);
                b.arg(data)
                    .arg(scale_inv)
                    .arg(out)
                    .arg(&r0)
                    .arg(&nn)
                    .arg(&c)
                    .arg(&br)
                    .arg(&bc);
                // SAFETY: as above.
                unsafe { b.launch(cfg(grid, (256, 1, 1))) }
                    .map_err(|e| launch_err("fp8_dequant_rows", e))?;
            }
            DeviceData::Bf16(data) => {
                let mut b = self
                    .stream
                    .launch_builder(self.function("bf16_dequant_rows")?);
                b.arg(data).arg(out).arg(&r0).arg(&nn).arg(&c);
                // SAFETY: as above.
                unsafe { b.launch(cfg(grid, (256, 1, 1))) }
                    .map_err(|e| launch_err("bf16_dequant_rows", e))?;
            }
            DeviceData::F32(data) => {
                let band = data.slice(row0 * cols..(row0 + n) * cols);
                self.stream
                    .memcpy_dtod(&band, out)
                    .map_err(|e| launch_err("f32 band copy", e))?;
            }
        }
        Ok(())
    }

    /// `y[t, k] = sum_i x[t, i] band[i, k]` for an f32 band `[n, cols]`.
    pub fn f32_matmul_transposed(
        &self,
        band: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        n: usize,
        cols: usize,
        tokens: usize,
    ) -> Result<(), CudaError> {
        let f = self.function("f32_matmul_t")?;
        let ints = [n as i32, cols as i32, tokens as i32];
        let mut b = self.stream.launch_builder(f);
        b.arg(band).arg(x).arg(y);
        for a in &ints {
            b.arg(a);
        }
        // SAFETY: band holds n * cols values, x tokens * n, y tokens * cols.
        unsafe { b.launch(cfg((blocks_for(cols, 128), tokens as u32, 1), (128, 1, 1))) }
            .map(|_| ())
            .map_err(|e| launch_err("f32_matmul_t", e))
    }
}
