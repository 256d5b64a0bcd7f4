//! The straightforward CPU backend: decode a weight row with the scalar reference
//! decoders, dot it with each token, rayon across rows. Slow and obviously correct; the
//! yardstick the fast kernels are measured against.

use super::{AttentionShape, Backend, FfnWeights, KvView};
use crate::weights::LinearWeight;
use kernels_avx512::scalar::dot;
use rayon::prelude::*;
use std::ops::Range;

#[derive(Debug, Default, Clone, Copy)]
pub struct ReferenceBackend;

impl Backend for ReferenceBackend {
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
        super::ffn_accumulate_with(self, ffn, x, tokens, out);
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
        let AttentionShape {
            heads,
            kv_heads,
            qk_dim,
            v_dim,
        } = shape;
        let group = heads / kv_heads;
        out.par_chunks_mut(v_dim).enumerate().for_each(|(idx, o)| {
            let (i, h) = (idx / heads, idx % heads);
            let kvh = h / group;
            let qh = &q[(i * heads + h) * qk_dim..(i * heads + h + 1) * qk_dim];
            let visible = positions[i] + 1;
            let mut scores: Vec<f32> = (0..visible)
                .map(|t| {
                    let base = t * k.token_stride + kvh * k.head_stride + k.offset;
                    dot(qh, &k.data[base..base + qk_dim]) * scale
                })
                .collect();
            let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            o.fill(0.0);
            for (t, p) in scores.iter().enumerate() {
                let base = t * v.token_stride + kvh * v.head_stride + v.offset;
                let weight = p / sum;
                for (od, vd) in o.iter_mut().zip(&v.data[base..base + v_dim]) {
                    *od += weight * vd;
                }
            }
        });
    }
}
