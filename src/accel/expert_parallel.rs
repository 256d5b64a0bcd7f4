//! All-GPU execution over several devices, as an all-GPU plan lays it out:
//!
//! - attention, dense layers, shared experts and routers are on every device
//!   (data-parallel): a batch's tokens are split into contiguous chunks, one per device,
//!   computed at once;
//! - the lm_head is split by vocabulary rows (each device computes its band of the logits
//!   for every token);
//! - each routed expert lives on one device (expert-parallel): a layer's experts run on
//!   their devices at once and their outputs are added in expert order.
//!
//! Every token's numbers come from the same kernels as on one device and are combined in
//! the same order, so the result equals a one-device run. Dispatch and combine pass
//! through host memory (each device receives the hidden states of the tokens routed to
//! its experts and returns their outputs); device-to-device all-to-all over NCCL is not
//! used yet.

use crate::backend::{AttentionShape, Backend, FfnWeights, KvView};
use crate::model::Model;
use crate::weights::LinearWeight;
use std::ops::Range;
use std::sync::Arc;

pub struct ExpertParallel {
    devices: Vec<Arc<dyn Backend>>,
    /// The lm_head's identity: the matrix split by rows.
    lm_head: (usize, usize),
}

/// `total` split into at most `parts` contiguous, nearly equal, non-empty ranges.
pub fn split(total: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.clamp(1, total.max(1));
    let (base, extra) = (total / parts, total % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .filter(|r| !r.is_empty())
        .collect()
}

impl ExpertParallel {
    /// One backend per device, in device order (routed expert `e` with `e.gpu == Some(g)`
    /// runs on `devices[g]`). `None` without devices.
    pub fn new(devices: Vec<Arc<dyn Backend>>, model: &Model) -> Option<Self> {
        (!devices.is_empty()).then(|| ExpertParallel {
            devices,
            lm_head: model.lm_head.identity(),
        })
    }

    /// Device `g`'s band of the lm_head's rows (what it should hold).
    pub fn lm_head_rows(vocab: usize, devices: usize, g: usize) -> Range<usize> {
        split(vocab, devices).get(g).cloned().unwrap_or(0..0)
    }

    fn device_of(&self, ffn: &FfnWeights) -> usize {
        ffn.gpu.unwrap_or(0) % self.devices.len()
    }

    /// `f(item i, device i)` for every item at once, results in item order.
    fn on_devices<I: Sync, T: Send>(
        &self,
        items: &[I],
        f: impl Fn(&I, &dyn Backend) -> T + Sync,
    ) -> Vec<T> {
        std::thread::scope(|s| {
            let handles: Vec<_> = items
                .iter()
                .zip(&self.devices)
                .map(|(item, dev)| {
                    let f = &f;
                    s.spawn(move || f(item, dev.as_ref()))
                })
                .collect();
            handles.into_iter().map(join).collect()
        })
    }

    /// The tokens of `x` (`x_width` values each) split across the devices, each running
    /// `f(device, its tokens, its rows of y)` (`y_width` values per token) at once.
    fn by_tokens(
        &self,
        x: &[f32],
        x_width: usize,
        y: &mut [f32],
        y_width: usize,
        f: impl Fn(&dyn Backend, &[f32], &mut [f32]) + Sync,
    ) {
        let chunks = split(x.len() / x_width.max(1), self.devices.len());
        std::thread::scope(|s| {
            let mut y_rest = y;
            for (chunk, dev) in chunks.iter().zip(&self.devices) {
                let (y_here, rest) = y_rest.split_at_mut(chunk.len() * y_width);
                y_rest = rest;
                let x_here = &x[chunk.start * x_width..chunk.end * x_width];
                let f = &f;
                s.spawn(move || f(dev.as_ref(), x_here, y_here));
            }
        });
    }
}

impl Backend for ExpertParallel {
    fn name(&self) -> &'static str {
        "expert-parallel"
    }

    fn linear(&self, w: &LinearWeight, rows: Range<usize>, x: &[f32], y: &mut [f32]) {
        let cols = w.cols().max(1);
        let n = x.len() / cols;
        let r = rows.len();
        if w.identity() == self.lm_head && rows == (0..w.rows()) && self.devices.len() > 1 {
            // Each device its band of rows for every token, then interleaved into [n, r].
            let bands = split(r, self.devices.len());
            let parts = self.on_devices(&bands, |band, dev| {
                let mut part = vec![0.0f32; n * band.len()];
                dev.linear(w, band.clone(), x, &mut part);
                part
            });
            for (band, part) in bands.iter().zip(&parts) {
                for t in 0..n {
                    y[t * r + band.start..t * r + band.end]
                        .copy_from_slice(&part[t * band.len()..(t + 1) * band.len()]);
                }
            }
            return;
        }
        self.by_tokens(x, cols, y, r, |dev, x, y| dev.linear(w, rows.clone(), x, y));
    }

    fn linear_transposed(&self, w: &LinearWeight, rows: Range<usize>, x: &[f32], y: &mut [f32]) {
        let r = rows.len().max(1);
        self.by_tokens(x, r, y, w.cols(), |dev, x, y| {
            dev.linear_transposed(w, rows.clone(), x, y)
        });
    }

    fn ffn_accumulate(
        &self,
        ffn: &FfnWeights,
        x: &[f32],
        tokens: &[(usize, f32)],
        out: &mut [f32],
    ) {
        crate::backend::ffn_accumulate_with(self, ffn, x, tokens, out)
    }

    /// Dense layers and shared experts: the tokens split across devices. A routed expert:
    /// on its device.
    fn ffn_contributions(&self, ffn: &FfnWeights, x: &[f32], tokens: &[(usize, f32)]) -> Vec<f32> {
        if ffn.expert.is_some() {
            return self.devices[self.device_of(ffn)].ffn_contributions(ffn, x, tokens);
        }
        let chunks = split(tokens.len(), self.devices.len());
        let parts = self.on_devices(&chunks, |chunk, dev| {
            dev.ffn_contributions(ffn, x, &tokens[chunk.clone()])
        });
        parts.concat()
    }

    /// Each device computes the experts it holds, all devices at once; outputs are added
    /// in the layer's expert order.
    fn moe_accumulate(&self, work: &[(&FfnWeights, &[(usize, f32)])], x: &[f32], out: &mut [f32]) {
        let mut by_device: Vec<Vec<usize>> = vec![Vec::new(); self.devices.len()];
        for (i, (ffn, _)) in work.iter().enumerate() {
            by_device[self.device_of(ffn)].push(i);
        }
        let per_device = self.on_devices(&by_device, |items, dev| {
            items
                .iter()
                .map(|&i| (i, dev.ffn_contributions(work[i].0, x, work[i].1)))
                .collect::<Vec<_>>()
        });
        let mut parts: Vec<Option<Vec<f32>>> = vec![None; work.len()];
        for (i, c) in per_device.into_iter().flatten() {
            parts[i] = Some(c);
        }
        crate::backend::add_in_order(work, parts, out);
    }

    /// Attention runs on the first device: the model calls it one sequence at a time.
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
        self.devices[0].attention(q, k, v, shape, positions, scale, out)
    }
}

/// A device thread's result; a device failure (which stops the computation on one device,
/// see the CUDA backend) stops it here too.
fn join<T>(h: std::thread::ScopedJoinHandle<'_, T>) -> T {
    match h.join() {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e),
    }
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn splits_are_contiguous_balanced_and_cover_everything() {
        assert_eq!(split(10, 3), vec![0..4, 4..7, 7..10]);
        assert_eq!(split(2, 8), vec![0..1, 1..2]);
        assert_eq!(split(0, 4), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(split(5, 1), vec![0..5]);
    }
}
