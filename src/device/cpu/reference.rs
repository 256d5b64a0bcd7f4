//! The straightforward CPU backend: decode a weight row with the scalar reference
//! decoders, dot it with each token, rayon across rows. Slow and obviously correct; the
//! yardstick the fast kernels are measured against.

use super::kernels::{AttentionShape, CpuKernels, FfnWeights, KvView};
use crate::weights::LinearWeight;
use kernels_avx512::scalar::dot;
use rayon::prelude::*;
use std::ops::Range;

#[derive(Debug, Default, Clone, Copy)]
pub struct ReferenceBackend;

impl CpuKernels for ReferenceBackend {
    fn name(&self) -> &'static str {
        "reference"
    }

    fn linear(&self, w: &LinearWeight, rows: Range<usize>, x: &[f32], y: &mut [f32]) {
        let cols = w.cols();
        let n = x.len() / cols;
        let r = rows.len();
        debug_assert_eq!(y.len(), n * r);
        // Row-major results per weight row, gathered into token-major order after.
        let per_row: Vec<Vec<f32>> = rows
            .into_par_iter()
            .map_init(
                || vec![0.0f32; cols],
                |buf, row| {
                    w.decode_row(row, buf);
                    (0..n)
                        .map(|t| dot(buf, &x[t * cols..(t + 1) * cols]))
                        .collect()
                },
            )
            .collect();
        for (i, values) in per_row.iter().enumerate() {
            for (t, v) in values.iter().enumerate() {
                y[t * r + i] = *v;
            }
        }
    }

    fn linear_transposed(&self, w: &LinearWeight, rows: Range<usize>, x: &[f32], y: &mut [f32]) {
        let cols = w.cols();
        let r = rows.len();
        let n = x.len() / r;
        debug_assert_eq!(y.len(), n * cols);
        y.fill(0.0);
        let mut buf = vec![0.0f32; cols];
        for (i, row) in rows.enumerate() {
            w.decode_row(row, &mut buf);
            for t in 0..n {
                let a = x[t * r + i];
                for (o, b) in y[t * cols..(t + 1) * cols].iter_mut().zip(&buf) {
                    *o += a * b;
                }
            }
        }
    }

    fn ffn_accumulate(
        &self,
        ffn: &FfnWeights,
        x: &[f32],
        tokens: &[(usize, f32)],
        out: &mut [f32],
    ) {
        super::kernels::ffn_accumulate_with(self, ffn, x, tokens, out);
    }

    fn attention(
        &self,
        q: &[f32],
        k: KvView,
        v: KvView,
        shape: AttentionShape,
        positions: &[usize],
        scale: f32,
        out: &mut [f32],
    ) {
        super::kernels::attention_with(q, k, v, shape, positions, scale, out, dot, |a, x, y| {
            for (o, v) in y.iter_mut().zip(x) {
                *o += a * v;
            }
        });
    }
}
