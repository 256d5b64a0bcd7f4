//! Typed, validated access to a checkpoint's tensors by their model names. Every check
//! (presence, dtype, shape, quantization metadata) happens here, at load time.

use super::{Checkpoint, DenseDtype, Dtype, LinearWeight, TensorInfo, WeightsError};
use crate::config::Quantization;
use std::cell::RefCell;
use std::collections::BTreeSet;

/// Hands out weights by text-model name (`model.layers.3.self_attn.o_proj`), adding the
/// checkpoint's prefix, and records which tensors were consumed.
pub struct WeightLoader<'a> {
    ckpt: &'a Checkpoint,
    used: RefCell<BTreeSet<String>>,
}

impl<'a> WeightLoader<'a> {
    pub fn new(ckpt: &'a Checkpoint) -> Self {
        WeightLoader {
            ckpt,
            used: RefCell::new(BTreeSet::new()),
        }
    }

    /// Names of every tensor handed out so far (with prefix).
    pub fn used(&self) -> BTreeSet<String> {
        self.used.borrow().clone()
    }

    fn full_name(&self, name: &str) -> String {
        format!("{}{}", self.ckpt.config.tensor_prefix, name)
    }

    fn find(&self, name: &str) -> Option<&'a TensorInfo> {
        let full = self.full_name(name);
        let info = self.ckpt.get(&full)?;
        self.used.borrow_mut().insert(full);
        Some(info)
    }

    fn missing(&self, name: &str, alternatives: &str) -> WeightsError {
        WeightsError::Missing {
            tensor: self.full_name(name),
            dir: self.ckpt.dir.display().to_string(),
            hint: alternatives.to_string(),
        }
    }

    fn path(&self, info: &TensorInfo) -> String {
        self.ckpt.file_of(info).display().to_string()
    }

    fn expect_shape(&self, info: &TensorInfo, expected: &[usize]) -> Result<(), WeightsError> {
        if info.shape != expected {
            return Err(WeightsError::Shape {
                tensor: info.name.clone(),
                path: self.path(info),
                expected: expected.to_vec(),
                actual: info.shape.clone(),
            });
        }
        Ok(())
    }

    fn expect_dtype(&self, info: &TensorInfo, allowed: &[Dtype]) -> Result<(), WeightsError> {
        if !allowed.contains(&info.dtype) {
            let expected: Vec<&str> = allowed.iter().map(|d| d.name()).collect();
            return Err(WeightsError::Dtype {
                tensor: info.name.clone(),
                path: self.path(info),
                expected: expected.join(" or "),
                actual: info.dtype.name().into(),
            });
        }
        Ok(())
    }

    fn required(&self, name: &str) -> Result<&'a TensorInfo, WeightsError> {
        self.find(name).ok_or_else(|| self.missing(name, ""))
    }

    /// A 1-D float vector (norm weights, correction bias), decoded to f32. Small.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, WeightsError> {
        let info = self.required(name)?;
        self.expect_dtype(info, &[Dtype::Bf16, Dtype::F16, Dtype::F32])?;
        self.expect_shape(info, &[len])?;
        let bytes = self.ckpt.data(info);
        let mut out = vec![0.0; len];
        match info.dtype {
            Dtype::Bf16 => kernels_avx512::scalar::decode_bf16(bytes.bytes(), &mut out),
            Dtype::F16 => kernels_avx512::scalar::decode_f16(bytes.bytes(), &mut out),
            _ => kernels_avx512::scalar::decode_f32(bytes.bytes(), &mut out),
        }
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            return Err(WeightsError::Inconsistent {
                tensor: info.name.clone(),
                path: self.path(info),
                reason: format!("element {i} is not finite"),
            });
        }
        Ok(out)
    }

    /// A dense float matrix kept in place (embeddings, router): `name` is the full
    /// tensor name including `.weight`.
    pub fn dense_matrix(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<LinearWeight, WeightsError> {
        let info = self.required(name)?;
        self.dense_from(info, rows, cols)
    }

    fn dense_from(
        &self,
        info: &TensorInfo,
        rows: usize,
        cols: usize,
    ) -> Result<LinearWeight, WeightsError> {
        self.expect_dtype(info, &[Dtype::Bf16, Dtype::F16, Dtype::F32])?;
        self.expect_shape(info, &[rows, cols])?;
        let dtype = match info.dtype {
            Dtype::Bf16 => DenseDtype::Bf16,
            Dtype::F16 => DenseDtype::F16,
            _ => DenseDtype::F32,
        };
        Ok(LinearWeight::Dense {
            dtype,
            data: self.ckpt.data(info),
            rows,
            cols,
        })
    }

    /// A linear module's weight (`module` without `.weight`), in whichever stored form:
    /// `weight_packed` (INT4 pack-quantized), `weight` F8_E4M3 + `weight_scale_inv`, or a
    /// dense `weight`.
    pub fn linear(
        &self,
        module: &str,
        rows: usize,
        cols: usize,
    ) -> Result<LinearWeight, WeightsError> {
        if let Some(packed) = self.find(&format!("{module}.weight_packed")) {
            return self.int4(module, packed, rows, cols);
        }
        let Some(weight) = self.find(&format!("{module}.weight")) else {
            return Err(self.missing(
                &format!("{module}.weight"),
                " (nor a pack-quantized .weight_packed)",
            ));
        };
        if weight.dtype == Dtype::F8E4M3 {
            return self.fp8(module, weight, rows, cols);
        }
        self.dense_from(weight, rows, cols)
    }

    fn int4(
        &self,
        module: &str,
        packed: &TensorInfo,
        rows: usize,
        cols: usize,
    ) -> Result<LinearWeight, WeightsError> {
        let inconsistent = |info: &TensorInfo, reason: String| WeightsError::Inconsistent {
            tensor: info.name.clone(),
            path: self.path(info),
            reason,
        };
        let q = match &self.ckpt.config.quantization {
            Some(Quantization::PackQuantized(q)) => q,
            _ => return Err(inconsistent(
                packed,
                "is pack-quantized but config.json has no compressed-tensors quantization_config"
                    .into(),
            )),
        };
        let full_module = self.full_name(module);
        if q.is_ignored(&full_module) || q.is_ignored(module) {
            return Err(inconsistent(
                packed,
                format!("is pack-quantized but quantization_config.ignore lists {full_module}"),
            ));
        }
        if !cols.is_multiple_of(q.group_size) {
            return Err(inconsistent(
                packed,
                format!(
                    "input width {cols} is not a multiple of group_size {}",
                    q.group_size
                ),
            ));
        }
        self.expect_dtype(packed, &[Dtype::I32])?;
        self.expect_shape(packed, &[rows, cols / 8])?;
        let scale = self.required(&format!("{module}.weight_scale"))?;
        self.expect_dtype(scale, &[Dtype::Bf16])?;
        self.expect_shape(scale, &[rows, cols / q.group_size])?;
        if let Some(shape) = self.find(&format!("{module}.weight_shape")) {
            self.expect_dtype(shape, &[Dtype::I32, Dtype::I64])?;
            self.expect_shape(shape, &[2])?;
            let bytes = self.ckpt.data(shape);
            let b = bytes.bytes();
            let stored: Vec<i64> = match shape.dtype {
                Dtype::I32 => b
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                    .collect(),
                _ => b
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect(),
            };
            if stored != [rows as i64, cols as i64] {
                return Err(inconsistent(
                    shape,
                    format!("records shape {stored:?}, expected [{rows}, {cols}]"),
                ));
            }
        }
        Ok(LinearWeight::Int4 {
            packed: self.ckpt.data(packed),
            scales: self.ckpt.data(scale),
            rows,
            cols,
            group: q.group_size,
        })
    }

    fn fp8(
        &self,
        module: &str,
        weight: &TensorInfo,
        rows: usize,
        cols: usize,
    ) -> Result<LinearWeight, WeightsError> {
        let block = match &self.ckpt.config.quantization {
            Some(Quantization::Fp8Block { block }) => *block,
            _ => [128, 128],
        };
        self.expect_shape(weight, &[rows, cols])?;
        let scale = self.required(&format!("{module}.weight_scale_inv"))?;
        self.expect_dtype(scale, &[Dtype::F32])?;
        self.expect_shape(scale, &[rows.div_ceil(block[0]), cols.div_ceil(block[1])])?;
        Ok(LinearWeight::Fp8 {
            data: self.ckpt.data(weight),
            scale_inv: self.ckpt.data(scale),
            rows,
            cols,
            block,
        })
    }
}
