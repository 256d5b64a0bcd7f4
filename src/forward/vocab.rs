//! The lm_head split by vocabulary over several devices, as all-GPU plans budget it (each
//! GPU holds 1/N of its rows): every device computes its band of the logits of every row
//! that needs them, and the bands come down and are laid side by side.

use super::{DeviceOps, Fabric};
use crate::device::DeviceResult;
use crate::weights::LinearWeight;
use std::ops::Range;
use std::sync::Arc;

/// Each device's band of lm_head rows (vocabulary entries) and the weight holding them.
pub struct VocabSplit {
    bands: Vec<(Range<usize>, LinearWeight)>,
}

impl VocabSplit {
    /// `lm_head`'s rows over `devices` devices in contiguous, even bands. Fails only when
    /// memory for a cut runs out.
    pub fn new(lm_head: &LinearWeight, devices: usize) -> std::io::Result<Self> {
        let vocab = lm_head.rows();
        let devices = devices.max(1);
        let bands = (0..devices)
            .map(|d| {
                let band = d * vocab / devices..(d + 1) * vocab / devices;
                Ok((band.clone(), lm_head.row_slice(band)?))
            })
            .collect::<std::io::Result<_>>()?;
        Ok(VocabSplit { bands })
    }

    /// Device `d`'s band: which vocabulary entries, and their rows of the lm_head.
    pub fn band(&self, d: usize) -> Option<&(Range<usize>, LinearWeight)> {
        self.bands.get(d)
    }

    /// The logits of the rows in `picked` (per entry: the device holding them, the
    /// final-normed hidden states, how many rows), `vocab` values per row in the order of
    /// `picked`. Every device with a band gets every row (through `fabric`; a device's
    /// own rows stay), multiplies them by its band, and every band is queued before any
    /// is awaited.
    pub(super) fn logits<O: DeviceOps>(
        &self,
        devices: &[Arc<O>],
        fabric: &dyn Fabric<O>,
        picked: Vec<(usize, O::Buf, usize)>,
        vocab: usize,
    ) -> DeviceResult<Vec<f32>> {
        let rows: usize = picked.iter().map(|(_, _, n)| n).sum();
        let targets: Vec<usize> = (0..devices.len())
            .filter(|&d| self.band(d).is_some_and(|(b, _)| !b.is_empty()))
            .collect();
        if rows == 0 || targets.is_empty() {
            return Ok(vec![0.0f32; rows * vocab]);
        }
        // Each piece to every target device: copies to the others, the buffer itself to
        // its own device. Each target receives the pieces in the order of `picked`.
        let mut moves = Vec::with_capacity(picked.len() * targets.len());
        let mut target_of = Vec::with_capacity(moves.capacity());
        for (from, buf, _) in picked {
            for (t, &to) in targets.iter().enumerate() {
                if to != from {
                    moves.push((from, to, devices[from].copy(&buf)?));
                    target_of.push(t);
                }
            }
            if let Some(t) = targets.iter().position(|&to| to == from) {
                moves.push((from, from, buf));
                target_of.push(t);
            }
        }
        let mut arrived: Vec<Vec<O::Buf>> = targets.iter().map(|_| Vec::new()).collect();
        for (b, t) in fabric.transfer(devices, moves)?.into_iter().zip(target_of) {
            arrived[t].push(b);
        }
        let on_targets = targets
            .iter()
            .zip(arrived)
            .map(|(&d, parts)| {
                let x = match <[O::Buf; 1]>::try_from(parts) {
                    Ok([x]) => x,
                    Err(parts) => devices[d].concat(&parts)?,
                };
                Ok((d, x))
            })
            .collect::<DeviceResult<_>>()?;
        self.bands(devices, on_targets, rows, vocab)
    }

    /// The logits of `rows` rows (`vocab` values each) from `on_devices`: per device with
    /// a band, the same final-normed rows already on it. Each multiplies them by its
    /// band; every band is queued before any is awaited, then laid side by side.
    pub(super) fn bands<O: DeviceOps>(
        &self,
        devices: &[Arc<O>],
        on_devices: Vec<(usize, O::Buf)>,
        rows: usize,
        vocab: usize,
    ) -> DeviceResult<Vec<f32>> {
        let mut all = vec![0.0f32; rows * vocab];
        let mut pending = Vec::with_capacity(on_devices.len());
        for (d, x) in on_devices {
            let Some((band, w)) = self.band(d).filter(|(b, _)| !b.is_empty()) else {
                continue;
            };
            let ops = devices[d].as_ref();
            let logits = ops.linear(w, &x, rows)?;
            pending.push((d, band.clone(), ops.begin_download(&logits)?));
        }
        for (d, band, download) in pending {
            let mut part = vec![0.0f32; rows * band.len()];
            devices[d].finish_download(download, &mut part)?;
            for (r, values) in part.chunks_exact(band.len()).enumerate() {
                all[r * vocab + band.start..r * vocab + band.end].copy_from_slice(values);
            }
        }
        Ok(all)
    }
}
