//! A CUDA GPU as the forward pass's device: the [`DeviceOps`](crate::device::DeviceOps)
//! operations on the device's buffers through the `kernels-cuda` kernels ([`resident`]),
//! weights resident on the device in the checkpoint's own formats (INT4, FP8-block and
//! BF16 read as stored; F16/F32 widened once). Weights are uploaded once
//! ([`CudaBackend::preload`] at start-up, where running out of device memory is an error
//! value naming the weight), keyed by where their bytes live in the host's mapping.
//!
//! A device failure after start-up (out of memory while buffers grow, a failed launch or
//! copy, a lost GPU) is a [`DeviceError`] naming the GPU and the operation; it fails the
//! step it happened in.

mod buf;
mod nccl;
mod recording;
mod resident;

pub use buf::GpuBuf;
pub use nccl::NcclFabric;
pub use recording::GraphStats;

use crate::device::{DeviceError, DeviceResult};
use crate::weights::{DenseDtype, LinearWeight};
use kernels_cuda::device::GpuDevice;
use kernels_cuda::weights::{DeviceData, DeviceWeight};
use kernels_cuda::CudaError;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// A device copy's identity: where the weight's bytes live on the host, and the band of
/// rows copied (all of them, or one device's share of a row-split matrix).
type WeightKey = ((usize, usize), usize, usize);

fn key(w: &LinearWeight, rows: &Range<usize>) -> WeightKey {
    (w.identity(), rows.start, rows.end)
}

pub struct CudaBackend {
    gpu: Arc<GpuDevice>,
    /// Device copies of the weights; the lock also keeps one caller at a time on the
    /// device's stream.
    weights: Mutex<HashMap<WeightKey, Arc<DeviceWeight>>>,
    /// The resident pass's state (see [`resident`]).
    resident: resident::ResidentState,
    /// Decode steps recorded as CUDA graphs (see [`recording`]).
    recordings: recording::Recordings,
    /// The host weights behind every device copy, kept mapped while the copies exist:
    /// copies are found by where the host bytes live, and host memory freed while its
    /// copy lived could be reused by another weight (a cut of a matrix made for tensor
    /// parallelism, a later model) that would then find the stale copy.
    hosts: Mutex<HashMap<(usize, usize), LinearWeight>>,
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // The weights, recordings and buffers are freed after this, in this GPU's context
        // (another GPU's may be current).
        let _ = self.gpu.ctx.bind_to_thread();
    }
}

/// A device failure after start-up as the pass's error, naming the GPU and what it was
/// doing (see the module comment).
fn failed(gpu: &GpuDevice, operation: &str, e: CudaError) -> DeviceError {
    DeviceError {
        device: format!("GPU {} ({})", gpu.ordinal, gpu.name),
        operation: operation.to_string(),
        reason: e.reason().to_string(),
    }
}

impl CudaBackend {
    /// Opens GPU `ordinal`; no driver, no device or an unsupported architecture is an
    /// error naming what is missing.
    pub fn open(ordinal: usize) -> Result<Self, CudaError> {
        Ok(CudaBackend {
            gpu: Arc::new(GpuDevice::open(ordinal, 0)?),
            weights: Mutex::new(HashMap::new()),
            resident: resident::ResidentState::default(),
            recordings: recording::Recordings::default(),
            hosts: Mutex::new(HashMap::new()),
        })
    }

    pub fn gpu(&self) -> &GpuDevice {
        &self.gpu
    }

    /// `r`, or its failure as a [`DeviceError`] naming this GPU and `operation`.
    fn check<T>(&self, operation: &str, r: Result<T, CudaError>) -> DeviceResult<T> {
        r.map_err(|e| failed(&self.gpu, operation, e))
    }

    /// Copies `weights` to the device (those already there are skipped); returns the
    /// device bytes they hold. Running out of memory is an error naming the weight.
    pub fn preload(&self, weights: &[&LinearWeight]) -> Result<u64, CudaError> {
        let mut total = 0u64;
        for w in weights {
            total += self.preload_rows(w, 0..w.rows())?;
        }
        Ok(total)
    }

    /// Copies rows `rows` of `w` to the device (this device's share of a matrix split by
    /// rows); a band the format cannot cut (FP8 rows off a scale block) copies the whole
    /// matrix. Returns the device bytes held.
    pub fn preload_rows(&self, w: &LinearWeight, rows: Range<usize>) -> Result<u64, CudaError> {
        let rows = if band_of(w, &rows).is_some() {
            rows
        } else {
            0..w.rows()
        };
        let mut map = self.lock();
        if let Some(dw) = map.get(&key(w, &rows)) {
            return Ok(dw.bytes() as u64);
        }
        let dw = upload(&self.gpu, w, rows.clone()).map_err(|e| {
            CudaError::Failed(format!(
                "rows {}..{} of a {}x{} {} weight could not be placed on {}: {}",
                rows.start,
                rows.end,
                w.rows(),
                w.cols(),
                w.format_name(),
                self.gpu.name,
                e.reason()
            ))
        })?;
        let bytes = dw.bytes() as u64;
        map.insert(key(w, &rows), Arc::new(dw));
        self.hold(w);
        Ok(bytes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<WeightKey, Arc<DeviceWeight>>> {
        // A panic while holding the lock leaves the map consistent (inserts are whole).
        self.weights.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device copy of `w`, uploaded now if [`preload`](Self::preload) did not.
    fn weight(
        &self,
        map: &mut HashMap<WeightKey, Arc<DeviceWeight>>,
        w: &LinearWeight,
    ) -> DeviceResult<Arc<DeviceWeight>> {
        let all = 0..w.rows();
        if let Some(dw) = map.get(&key(w, &all)) {
            return Ok(dw.clone());
        }
        let dw = Arc::new(self.check("a weight upload", upload(&self.gpu, w, all.clone()))?);
        self.hold(w);
        map.insert(key(w, &all), dw.clone());
        Ok(dw)
    }

    /// Keeps `w`'s host bytes mapped while this device holds a copy of it.
    fn hold(&self, w: &LinearWeight) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        hosts.entry(w.identity()).or_insert_with(|| w.clone());
    }

    /// `y = x Wᵀ` on the device, `x` already there.
    fn linear_on_device(
        &self,
        w: &DeviceWeight,
        x: &kernels_cuda::cudarc::driver::CudaSlice<f32>,
        tokens: usize,
    ) -> DeviceResult<kernels_cuda::cudarc::driver::CudaSlice<f32>> {
        let g = &self.gpu;
        let mut y = self.check("an output buffer", g.zeros::<f32>("y", tokens * w.rows))?;
        self.check("a matrix product", g.matmul(w, x, &mut y, tokens))?;
        Ok(y)
    }
}

/// Byte ranges of rows `rows` of `w`: (weights, scales) for the formats whose rows can be
/// cut (FP8 only at scale-block boundaries); `None` otherwise.
fn band_of(w: &LinearWeight, rows: &Range<usize>) -> Option<(Range<usize>, Range<usize>)> {
    if rows.start > rows.end || rows.end > w.rows() {
        return None;
    }
    match w {
        LinearWeight::Dense { dtype, cols, .. } => {
            let width = cols * dtype.bytes();
            Some((rows.start * width..rows.end * width, 0..0))
        }
        LinearWeight::Int4 { cols, group, .. } => {
            let (pw, sw) = (cols / 2, cols / group * 2);
            Some((
                rows.start * pw..rows.end * pw,
                rows.start * sw..rows.end * sw,
            ))
        }
        LinearWeight::Fp8 {
            rows: all,
            cols,
            block,
            ..
        } => {
            let aligned = rows.start.is_multiple_of(block[0])
                && (rows.end.is_multiple_of(block[0]) || rows.end == *all);
            let sw = cols.div_ceil(block[1]) * 4;
            aligned.then(|| {
                (
                    rows.start * cols..rows.end * cols,
                    rows.start / block[0] * sw..rows.end.div_ceil(block[0]) * sw,
                )
            })
        }
    }
}

/// Copies rows `rows` of one weight to the device in its own format.
fn upload(
    gpu: &GpuDevice,
    w: &LinearWeight,
    rows: Range<usize>,
) -> Result<DeviceWeight, CudaError> {
    let cols = w.cols();
    let Some((wb, sb)) = band_of(w, &rows) else {
        return Err(CudaError::Failed(format!(
            "rows {}..{} cannot be cut from this weight",
            rows.start, rows.end
        )));
    };
    let data = match w {
        LinearWeight::Int4 {
            packed,
            scales,
            group,
            ..
        } => DeviceData::Int4 {
            packed: gpu.upload("INT4 weights", &words::<u32>(&packed.bytes()[wb]))?,
            scales: gpu.upload("INT4 scales", &words::<u16>(&scales.bytes()[sb]))?,
            group: *group,
        },
        LinearWeight::Fp8 {
            data,
            scale_inv,
            block,
            ..
        } => {
            let scale_bytes = &scale_inv.bytes()[sb];
            let mut scales = vec![0.0f32; scale_bytes.len() / 4];
            kernels_avx512::scalar::decode_f32(scale_bytes, &mut scales);
            DeviceData::Fp8 {
                data: gpu.upload("FP8 weights", &data.bytes()[wb])?,
                scale_inv: gpu.upload("FP8 scales", &scales)?,
                block: *block,
            }
        }
        LinearWeight::Dense {
            dtype: DenseDtype::Bf16,
            data,
            ..
        } => DeviceData::Bf16(gpu.upload("BF16 weights", &words::<u16>(&data.bytes()[wb]))?),
        LinearWeight::Dense { .. } => {
            let mut f = vec![0.0f32; rows.len() * cols];
            for (i, row) in f.chunks_exact_mut(cols.max(1)).enumerate() {
                w.decode_row(rows.start + i, row);
            }
            DeviceData::F32(gpu.upload("F32 weights", &f)?)
        }
    };
    Ok(DeviceWeight {
        rows: rows.len(),
        cols,
        data,
    })
}

/// Little-endian values of a byte buffer.
fn words<T: FromLe>(bytes: &[u8]) -> Vec<T> {
    bytes.chunks_exact(T::SIZE).map(T::from_le).collect()
}

trait FromLe: Sized {
    const SIZE: usize;
    fn from_le(b: &[u8]) -> Self;
}

impl FromLe for u16 {
    const SIZE: usize = 2;
    fn from_le(b: &[u8]) -> Self {
        u16::from_le_bytes([b[0], b[1]])
    }
}

impl FromLe for u32 {
    const SIZE: usize = 4;
    fn from_le(b: &[u8]) -> Self {
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn little_endian_words() {
        assert_eq!(
            words::<u16>(&[0x34, 0x12, 0x78, 0x56]),
            vec![0x1234, 0x5678]
        );
        assert_eq!(words::<u32>(&[1, 0, 0, 0x80]), vec![0x8000_0001]);
    }

    fn data(len: usize) -> crate::weights::TensorData {
        let map = memmap2::MmapMut::map_anon(len.max(1)).unwrap();
        crate::weights::TensorData::new(Arc::new(map.make_read_only().unwrap()), 0, len).unwrap()
    }

    #[test]
    fn row_bands_cut_weights_and_scales_where_the_format_allows() {
        let int4 = LinearWeight::Int4 {
            packed: data(300 * 64 / 2),
            scales: data(300 * 2 * 2),
            rows: 300,
            cols: 64,
            group: 32,
        };
        assert_eq!(band_of(&int4, &(10..20)), Some((320..640, 40..80)));
        let bf16 = LinearWeight::Dense {
            dtype: DenseDtype::Bf16,
            data: data(300 * 64 * 2),
            rows: 300,
            cols: 64,
        };
        assert_eq!(band_of(&bf16, &(0..300)), Some((0..38400, 0..0)));
        assert_eq!(band_of(&bf16, &(290..301)), None);
        // FP8 [300, 200] in 128x128 blocks: scale rows of 2 f32.
        let fp8 = LinearWeight::Fp8 {
            data: data(300 * 200),
            scale_inv: data(3 * 2 * 4),
            rows: 300,
            cols: 200,
            block: [128, 128],
        };
        assert_eq!(band_of(&fp8, &(128..300)), Some((25600..60000, 8..24)));
        assert_eq!(band_of(&fp8, &(0..128)), Some((0..25600, 0..8)));
        assert_eq!(band_of(&fp8, &(100..228)), None);
    }

    #[test]
    fn opening_without_a_gpu_is_an_error_naming_why() {
        match CudaBackend::open(0) {
            Ok(b) => eprintln!("GPU present: {}", b.gpu().name),
            Err(e) => assert!(e.to_string().starts_with("no CUDA device"), "{e}"),
        }
    }
}
