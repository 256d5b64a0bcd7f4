//! A linear layer's weight `[rows = out, cols = in]` in whichever form the checkpoint
//! stores it. Quantized forms stay quantized in memory; kernels decode on the fly.

use super::TensorData;
use kernels_avx512::scalar;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseDtype {
    Bf16,
    F16,
    F32,
}

impl DenseDtype {
    pub fn bytes(self) -> usize {
        match self {
            DenseDtype::Bf16 | DenseDtype::F16 => 2,
            DenseDtype::F32 => 4,
        }
    }
}

#[derive(Debug, Clone)]
pub enum LinearWeight {
    Dense {
        dtype: DenseDtype,
        data: TensorData,
        rows: usize,
        cols: usize,
    },
    /// compressed-tensors pack-quantized INT4: I32 words [rows, cols/8], BF16 scales
    /// [rows, cols/group].
    Int4 {
        packed: TensorData,
        scales: TensorData,
        rows: usize,
        cols: usize,
        group: usize,
    },
    /// FP8 E4M3 [rows, cols] with F32 scale_inv [ceil(rows/b0), ceil(cols/b1)].
    Fp8 {
        data: TensorData,
        scale_inv: TensorData,
        rows: usize,
        cols: usize,
        block: [usize; 2],
    },
}

impl LinearWeight {
    pub fn rows(&self) -> usize {
        match self {
            LinearWeight::Dense { rows, .. }
            | LinearWeight::Int4 { rows, .. }
            | LinearWeight::Fp8 { rows, .. } => *rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            LinearWeight::Dense { cols, .. }
            | LinearWeight::Int4 { cols, .. }
            | LinearWeight::Fp8 { cols, .. } => *cols,
        }
    }

    pub fn format_name(&self) -> &'static str {
        match self {
            LinearWeight::Dense {
                dtype: DenseDtype::Bf16,
                ..
            } => "BF16",
            LinearWeight::Dense {
                dtype: DenseDtype::F16,
                ..
            } => "F16",
            LinearWeight::Dense {
                dtype: DenseDtype::F32,
                ..
            } => "F32",
            LinearWeight::Int4 { .. } => "INT4",
            LinearWeight::Fp8 { .. } => "FP8",
        }
    }

    /// Where the weight's bytes live in the host mapping: an identity that clones share,
    /// by which device copies are found.
    pub fn identity(&self) -> (usize, usize) {
        let bytes = match self {
            LinearWeight::Dense { data, .. } => data.bytes(),
            LinearWeight::Int4 { packed, .. } => packed.bytes(),
            LinearWeight::Fp8 { data, .. } => data.bytes(),
        };
        (bytes.as_ptr() as usize, bytes.len())
    }

    /// Bytes held in memory (weights plus scales).
    pub fn stored_bytes(&self) -> usize {
        match self {
            LinearWeight::Dense { data, .. } => data.bytes().len(),
            LinearWeight::Int4 { packed, scales, .. } => {
                packed.bytes().len() + scales.bytes().len()
            }
            LinearWeight::Fp8 {
                data, scale_inv, ..
            } => data.bytes().len() + scale_inv.bytes().len(),
        }
    }

    /// Row `r` of an FP8-block weight: its E4M3 bytes, the F32 `scale_inv` bytes of its
    /// block row, and the block width in columns. `None` for other formats.
    pub fn fp8_row(&self, r: usize) -> Option<(&[u8], &[u8], usize)> {
        match self {
            LinearWeight::Fp8 {
                data,
                scale_inv,
                cols,
                block,
                ..
            } => {
                let scale_row = cols.div_ceil(block[1]) * 4;
                let block_row = r / block[0];
                Some((
                    &data.bytes()[r * cols..(r + 1) * cols],
                    &scale_inv.bytes()[block_row * scale_row..(block_row + 1) * scale_row],
                    block[1],
                ))
            }
            _ => None,
        }
    }

    /// Decodes row `r` into `out` (length `cols`) with the scalar reference decoders.
    pub fn decode_row(&self, r: usize, out: &mut [f32]) {
        match self {
            LinearWeight::Dense {
                dtype, data, cols, ..
            } => {
                let width = cols * dtype.bytes();
                let bytes = &data.bytes()[r * width..(r + 1) * width];
                match dtype {
                    DenseDtype::Bf16 => scalar::decode_bf16(bytes, out),
                    DenseDtype::F16 => scalar::decode_f16(bytes, out),
                    DenseDtype::F32 => scalar::decode_f32(bytes, out),
                }
            }
            LinearWeight::Int4 {
                packed,
                scales,
                cols,
                group,
                ..
            } => {
                let pw = cols / 8 * 4;
                let sw = cols / group * 2;
                scalar::decode_int4_row(
                    &packed.bytes()[r * pw..(r + 1) * pw],
                    &scales.bytes()[r * sw..(r + 1) * sw],
                    *group,
                    out,
                );
            }
            LinearWeight::Fp8 { .. } => {
                if let Some((row, scale_inv_row, block_cols)) = self.fp8_row(r) {
                    scalar::decode_fp8_row(row, scale_inv_row, block_cols, out);
                }
            }
        }
    }
}
