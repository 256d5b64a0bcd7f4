//! The operations the model's maths needs from a device, behind one trait, so the same
//! model code runs on the scalar reference, the fast CPU kernels and (later) the GPU.

mod reference;

pub use reference::ReferenceBackend;

use crate::weights::LinearWeight;
use std::ops::Range;

/// The three projections of a SiLU-gated feed-forward block (dense MLP, shared expert or
/// one routed expert): `down(silu(gate x) * up x)`.
#[derive(Debug, Clone)]
pub struct FfnWeights {
    pub gate: LinearWeight,
    pub up: LinearWeight,
    pub down: LinearWeight,
}

impl FfnWeights {
    pub fn stored_bytes(&self) -> usize {
        self.gate.stored_bytes() + self.up.stored_bytes() + self.down.stored_bytes()
    }
}

/// A strided view of keys or values: element (token t, head h, dim d) is
/// `data[t * token_stride + h * head_stride + offset + d]`.
#[derive(Debug, Clone, Copy)]
pub struct KvView<'a> {
    pub data: &'a [f32],
    pub token_stride: usize,
    pub head_stride: usize,
    pub offset: usize,
}

/// Head counts and widths of one attention call. `kv_heads` divides `heads`; query head h
/// reads kv head `h / (heads / kv_heads)`.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub qk_dim: usize,
    pub v_dim: usize,
}

pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;

    /// `y[t, i] = sum_k x[t, k] * W[rows.start + i, k]` for the `n = x.len() / cols`
    /// tokens of `x` ([n, cols]); `y` is [n, rows.len()].
    fn linear(&self, w: &LinearWeight, rows: Range<usize>, x: &[f32], y: &mut [f32]);

    /// `y[t, k] = sum_i x[t, i] * W[rows.start + i, k]`: the transposed product over a
    /// band of rows; `x` is [n, rows.len()], `y` is [n, cols]. Absorbed MLA uses it to
    /// fold a query into the latent space.
    fn linear_transposed(&self, w: &LinearWeight, rows: Range<usize>, x: &[f32], y: &mut [f32]);

    /// For every `(t, weight)` in `tokens`: `out[t] += weight * ffn(x[t])`, with `x` and
    /// `out` [n, hidden].
    fn ffn_accumulate(&self, ffn: &FfnWeights, x: &[f32], tokens: &[(usize, f32)], out: &mut [f32]);

    /// Causal attention: query i (absolute position `positions[i]`) attends to keys
    /// `0..=positions[i]`. `q` is [n, heads, qk_dim], `out` is [n, heads, v_dim]; softmax
    /// in f32.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &[f32],
        k: KvView,
        v: KvView,
        shape: AttentionShape,
        positions: &[usize],
        scale: f32,
        out: &mut [f32],
    );
}
