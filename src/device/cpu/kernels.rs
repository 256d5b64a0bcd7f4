//! The CPU's kernel sets behind one trait ([`CpuKernels`]): the products, fused
//! feed-forward blocks and attention the CPU device computes with, and the host's routed
//! experts in hybrid layouts (the seam a hybrid pass hands a layer's host experts to);
//! the scalar reference (the yardstick) and the fast kernels of `kernels-avx512`.

pub use super::fast::{Activations, CpuBackend};
pub use super::reference::ReferenceBackend;

use crate::weights::LinearWeight;
use std::ops::Range;

pub use crate::model::FfnWeights;

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

pub trait CpuKernels: Send + Sync {
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

    /// `weight * ffn(x[t])` for every `(t, weight)` in `tokens`, as `[tokens.len(), hidden]`
    /// rows in that order. Backends with a fused feed-forward block override it; the
    /// default composes `linear`.
    fn ffn_contributions(&self, ffn: &FfnWeights, x: &[f32], tokens: &[(usize, f32)]) -> Vec<f32> {
        ffn_composed(self, ffn, x, tokens)
    }

    /// The routed experts of one MoE layer: for each `(expert, tokens)`, in order,
    /// `ffn_accumulate`. Backends may run experts concurrently but must add their outputs
    /// in this order, so results do not depend on scheduling.
    fn moe_accumulate(&self, work: &[(&FfnWeights, &[(usize, f32)])], x: &[f32], out: &mut [f32]) {
        for (ffn, tokens) in work {
            self.ffn_accumulate(ffn, x, tokens, out);
        }
    }

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

    /// The instruction set MLA attention runs tiled with on this kernel set's threads
    /// (see `device::cpu::attention`), or `None` for attention one (query, head) at a
    /// time through [`attention`](Self::attention) (the scalar reference).
    fn tiled_attention(&self) -> Option<kernels_avx512::Isa> {
        None
    }

    /// Runs `work` on this kernel set's threads (where its parallel loops run).
    fn install(&self, work: &mut (dyn FnMut() + Send)) {
        work()
    }
}

/// Causal attention written once, parameterised by the dot product and the weighted sum
/// (`y += a * x`) the backend computes with: one task per (query, head), scores and
/// softmax in f32, values accumulated in f32.
#[allow(clippy::too_many_arguments)]
pub fn attention_with(
    q: &[f32],
    k: KvView,
    v: KvView,
    shape: AttentionShape,
    positions: &[usize],
    scale: f32,
    out: &mut [f32],
    dot: impl Fn(&[f32], &[f32]) -> f32 + Sync,
    axpy: impl Fn(f32, &[f32], &mut [f32]) + Sync,
) {
    use rayon::prelude::*;
    let AttentionShape {
        heads,
        kv_heads,
        qk_dim,
        v_dim,
    } = shape;
    let group = heads / kv_heads.max(1);
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
            axpy(p / sum, &v.data[base..base + v_dim], o);
        }
    });
}

pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// The tokens' rows of `x` (`[n, hidden]`), in `tokens` order: an FFN's input.
pub fn gather_rows(x: &[f32], tokens: &[(usize, f32)], hidden: usize) -> Vec<f32> {
    let mut xs = Vec::with_capacity(tokens.len() * hidden);
    for &(t, _) in tokens {
        xs.extend_from_slice(&x[t * hidden..(t + 1) * hidden]);
    }
    xs
}

/// Scales row `j` of `rows` (`[tokens.len(), hidden]`) by token `j`'s routing weight.
pub fn weight_rows(rows: &mut [f32], tokens: &[(usize, f32)]) {
    let hidden = rows.len() / tokens.len().max(1);
    for (row, &(_, weight)) in rows.chunks_exact_mut(hidden.max(1)).zip(tokens) {
        for v in row {
            *v *= weight;
        }
    }
}

/// The SiLU-gated FFN written once over any backend's `linear`: gather the tokens' rows,
/// gate and up projections, `silu(gate) * up`, down projection; returns each token's
/// weighted contribution, [tokens.len(), hidden].
pub fn ffn_composed<B: CpuKernels + ?Sized>(
    backend: &B,
    ffn: &FfnWeights,
    x: &[f32],
    tokens: &[(usize, f32)],
) -> Vec<f32> {
    let hidden = ffn.gate.cols();
    let inter = ffn.gate.rows();
    let m = tokens.len();
    let xs = gather_rows(x, tokens, hidden);
    let mut gate = vec![0.0; m * inter];
    let mut up = vec![0.0; m * inter];
    backend.linear(&ffn.gate, 0..inter, &xs, &mut gate);
    backend.linear(&ffn.up, 0..inter, &xs, &mut up);
    for (g, u) in gate.iter_mut().zip(&up) {
        *g = silu(*g) * u;
    }
    let mut down = vec![0.0; m * hidden];
    backend.linear(&ffn.down, 0..hidden, &gate, &mut down);
    weight_rows(&mut down, tokens);
    down
}

/// Adds contributions from `ffn_contributions` into `out` at their tokens' rows.
pub fn scatter_add(contributions: &[f32], tokens: &[(usize, f32)], out: &mut [f32]) {
    let hidden = contributions.len() / tokens.len().max(1);
    for (j, &(t, _)) in tokens.iter().enumerate() {
        for (o, c) in out[t * hidden..(t + 1) * hidden]
            .iter_mut()
            .zip(&contributions[j * hidden..(j + 1) * hidden])
        {
            *o += c;
        }
    }
}

/// Adds each work item's contributions (`parts[i]` for `work[i]`, missing ones skipped)
/// into `out` in work order: the fixed order that makes a layer's result independent of
/// where and when its experts ran.
pub fn add_in_order<C: AsRef<[f32]>>(
    work: &[(&FfnWeights, &[(usize, f32)])],
    parts: impl IntoIterator<Item = Option<C>>,
    out: &mut [f32],
) {
    for ((_, tokens), c) in work.iter().zip(parts) {
        if let Some(c) = c {
            scatter_add(c.as_ref(), tokens, out);
        }
    }
}

/// `out[t] += weight * ffn(x[t])` for every `(t, weight)` in `tokens`.
pub fn ffn_accumulate_with(
    backend: &dyn CpuKernels,
    ffn: &FfnWeights,
    x: &[f32],
    tokens: &[(usize, f32)],
    out: &mut [f32],
) {
    let contributions = backend.ffn_contributions(ffn, x, tokens);
    scatter_add(&contributions, tokens, out);
}

/// Why a backend name gives no kernels.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("unknown backend {0:?}; expected reference, cpu, cpu-f32 or cpu-int8 (optionally :scalar, :avx2, :avx512-vnni), or cuda[:N]")]
    Unknown(String),
    #[error("backend {0:?}: expected cuda or cuda:N with N a GPU number")]
    BadGpuNumber(String),
    #[error("backend {0} runs the whole model on a GPU (without --profile or --plan); as the host's kernels of a GPU plan use cpu, cpu-f32, cpu-int8 or reference")]
    NotKernels(String),
    #[error("unknown kernel path {0:?}; expected scalar, avx2 or avx512-vnni")]
    UnknownPath(String),
    #[error("this CPU cannot run the {0} kernels")]
    PathUnavailable(&'static str),
    #[error("cannot start the CPU worker threads {name}: {reason}")]
    Threads { name: String, reason: String },
}

/// The GPU a backend name asks for: `Some(N)` for `cuda:N` (`cuda` is GPU 0), `None` for
/// every other name, an error for a malformed GPU number.
pub fn cuda_ordinal(name: &str) -> Result<Option<usize>, BackendError> {
    match name.strip_prefix("cuda") {
        Some("") => Ok(Some(0)),
        Some(n) if n.starts_with(':') => n[1..]
            .parse()
            .map(Some)
            .map_err(|_| BackendError::BadGpuNumber(name.to_string())),
        _ => Ok(None),
    }
}

/// A backend by name: `reference` (scalar decode, the yardstick), `cpu` (fast kernels on
/// the best ISA of this CPU; INT4 weights against int16-quantized activations, within
/// rounding of the reference), `cpu-f32` (INT4 dequantized to f32 in registers: the
/// reference's numbers, slower) or `cpu-int8` (int8-quantized activations for INT4 and
/// BF16-rounded ones for BF16 batches: fastest, approximate). `:scalar`, `:avx2` or `:avx512-vnni` after any `cpu*` forces a kernel
/// path. `cuda` (or `cuda:N`) is not a kernel set: `run`/`serve --backend cuda` put the
/// whole model on GPU N (see `runtime`), and with a GPU profile or plan `--backend` names
/// the host's kernels, so here it is an error saying so.
pub fn by_name(name: &str) -> Result<Box<dyn CpuKernels>, BackendError> {
    if name == "reference" {
        return Ok(Box::new(ReferenceBackend));
    }
    if cuda_ordinal(name)?.is_some() {
        return Err(BackendError::NotKernels(name.to_string()));
    }
    let (family, isa) = name
        .split_once(':')
        .map_or((name, None), |(f, i)| (f, Some(i)));
    let activations = match family {
        "cpu" => Activations::Int16,
        "cpu-f32" => Activations::F32,
        "cpu-int8" => Activations::Int8,
        _ => return Err(BackendError::Unknown(name.to_string())),
    };
    let isa = match isa {
        None => kernels_avx512::Isa::detect(),
        Some(i) => match kernels_avx512::Isa::from_name(i) {
            Some(isa) if isa.available() => isa,
            Some(isa) => return Err(BackendError::PathUnavailable(isa.name())),
            None => return Err(BackendError::UnknownPath(i.to_string())),
        },
    };
    Ok(Box::new(CpuBackend::new(isa, activations)))
}

#[cfg(test)]
mod tests {
    use super::by_name;

    fn error_of(name: &str) -> String {
        by_name(name)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn backend_names_parse_with_errors_saying_what_is_accepted() {
        for bad in ["cudax", "gpu", "cpu-f16"] {
            let e = error_of(bad);
            assert!(
                e.contains("unknown backend") && e.contains("cuda[:N]"),
                "{e}"
            );
        }
        for bad in ["cuda:x", "cuda:", "cuda:-1"] {
            assert!(
                error_of(bad).contains("cuda:N with N a GPU number"),
                "{bad}"
            );
        }
        assert!(error_of("cpu:sse9").contains("unknown kernel path"));
        let e = error_of("cuda:0");
        assert!(
            e.contains("whole model on a GPU") && e.contains("cpu-f32"),
            "{e}"
        );
    }
}
