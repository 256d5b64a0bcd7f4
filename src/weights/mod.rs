//! Checkpoint files: `model.safetensors` or shards listed in `model.safetensors.index.json`,
//! memory-mapped and never copied. Every tensor's bytes stay in the page cache; the model
//! holds views (`TensorData`) into the maps.
//!
//! Everything that can be checked without running the model is checked when the
//! checkpoint opens: headers parse, every tensor's bytes lie inside its file (a truncated
//! shard is found here), and every index entry names a file that holds that tensor.

mod linear;
mod loader;
mod slice;

pub use linear::{DenseDtype, LinearWeight};
pub use loader::WeightLoader;

use crate::config::{ConfigError, ModelConfig};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{dir} holds neither model.safetensors nor model.safetensors.index.json")]
    NoWeights { dir: String },
    #[error("bad shard index {path}: {reason}")]
    BadIndex { path: String, reason: String },
    #[error("bad safetensors header in {path}: {reason}")]
    BadHeader { path: String, reason: String },
    #[error("{path} is truncated: tensor {tensor} needs bytes up to {needed} but the file has {available}")]
    Truncated {
        path: String,
        tensor: String,
        needed: usize,
        available: usize,
    },
    #[error("tensor {tensor} is missing from the checkpoint in {dir}{hint}")]
    Missing {
        tensor: String,
        dir: String,
        hint: String,
    },
    #[error("tensor {tensor} in {path} has shape {actual:?}, expected {expected:?}")]
    Shape {
        tensor: String,
        path: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("tensor {tensor} in {path} has dtype {actual}, expected {expected}")]
    Dtype {
        tensor: String,
        path: String,
        expected: String,
        actual: String,
    },
    #[error("tensor {tensor} in {path}: {reason}")]
    Inconsistent {
        tensor: String,
        path: String,
        reason: String,
    },
}

/// Element types found in safetensors files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    Bf16,
    F16,
    F32,
    F64,
    F8E4M3,
    F8E5M2,
    I8,
    U8,
    I16,
    I32,
    I64,
    Bool,
    Other,
}

impl Dtype {
    fn from_safetensors(d: safetensors::Dtype) -> Self {
        use safetensors::Dtype as S;
        match d {
            S::BF16 => Dtype::Bf16,
            S::F16 => Dtype::F16,
            S::F32 => Dtype::F32,
            S::F64 => Dtype::F64,
            S::F8_E4M3 => Dtype::F8E4M3,
            S::F8_E5M2 => Dtype::F8E5M2,
            S::I8 => Dtype::I8,
            S::U8 => Dtype::U8,
            S::I16 => Dtype::I16,
            S::I32 => Dtype::I32,
            S::I64 => Dtype::I64,
            S::BOOL => Dtype::Bool,
            _ => Dtype::Other,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bf16 => "BF16",
            Dtype::F16 => "F16",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::I8 => "I8",
            Dtype::U8 => "U8",
            Dtype::I16 => "I16",
            Dtype::I32 => "I32",
            Dtype::I64 => "I64",
            Dtype::Bool => "BOOL",
            Dtype::Other => "other",
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub shard: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the shard file (absolute offsets).
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn byte_len(&self) -> usize {
        self.end - self.start
    }
}

/// A view of one tensor's bytes inside a memory map.
#[derive(Clone)]
pub struct TensorData {
    map: Arc<Mmap>,
    start: usize,
    end: usize,
}

impl TensorData {
    /// A view of `map[start..end]` (benchmarks build weights in anonymous maps).
    pub fn new(map: Arc<Mmap>, start: usize, end: usize) -> Option<Self> {
        (start <= end && end <= map.len()).then_some(TensorData { map, start, end })
    }

    /// Bytes `start..end` of this view, as a view of the same map.
    pub fn view(&self, start: usize, end: usize) -> Option<Self> {
        (start <= end && self.start + end <= self.end).then(|| TensorData {
            map: self.map.clone(),
            start: self.start + start,
            end: self.start + end,
        })
    }

    /// `bytes` copied into an anonymous map of their own (weights cut out of others).
    pub fn owned(bytes: &[u8]) -> std::io::Result<Self> {
        let mut map = memmap2::MmapMut::map_anon(bytes.len().max(1))?;
        map[..bytes.len()].copy_from_slice(bytes);
        Ok(TensorData {
            map: Arc::new(map.make_read_only()?),
            start: 0,
            end: bytes.len(),
        })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map[self.start..self.end]
    }
}

impl std::fmt::Debug for TensorData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TensorData({} bytes)", self.end - self.start)
    }
}

struct Shard {
    path: PathBuf,
    map: Arc<Mmap>,
}

/// An opened checkpoint directory.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, TensorInfo>,
}

const INDEX_FILE: &str = "model.safetensors.index.json";
const SINGLE_FILE: &str = "model.safetensors";

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self, WeightsError> {
        let config = ModelConfig::from_dir(dir)?;
        let index_path = dir.join(INDEX_FILE);
        let mut ckpt = Checkpoint {
            dir: dir.to_path_buf(),
            config,
            shards: Vec::new(),
            tensors: BTreeMap::new(),
        };
        if index_path.exists() {
            let weight_map = read_index(&index_path)?;
            let mut files: Vec<&String> = weight_map.values().collect();
            files.sort();
            files.dedup();
            for file in files {
                if file.contains('/') || file.contains('\\') || file == ".." {
                    return Err(WeightsError::BadIndex {
                        path: index_path.display().to_string(),
                        reason: format!(
                            "shard name {file:?} must be a file in the checkpoint directory"
                        ),
                    });
                }
                ckpt.add_shard(&dir.join(file))?;
            }
            for (tensor, file) in &weight_map {
                match ckpt.tensors.get(tensor) {
                    Some(info)
                        if ckpt.shards[info.shard]
                            .path
                            .file_name()
                            .and_then(|f| f.to_str())
                            == Some(file.as_str()) => {}
                    Some(info) => {
                        return Err(WeightsError::BadIndex {
                            path: index_path.display().to_string(),
                            reason: format!(
                                "tensor {tensor} is listed in {file} but stored in {}",
                                ckpt.shards[info.shard].path.display()
                            ),
                        })
                    }
                    None => {
                        return Err(WeightsError::BadIndex {
                            path: index_path.display().to_string(),
                            reason: format!(
                            "tensor {tensor} is listed in {file} but that file does not contain it"
                        ),
                        })
                    }
                }
            }
        } else if dir.join(SINGLE_FILE).exists() {
            ckpt.add_shard(&dir.join(SINGLE_FILE))?;
        } else {
            return Err(WeightsError::NoWeights {
                dir: dir.display().to_string(),
            });
        }
        Ok(ckpt)
    }

    fn add_shard(&mut self, path: &Path) -> Result<(), WeightsError> {
        let io = |source| WeightsError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = crate::files::open_regular(path).map_err(io)?;
        // SAFETY: the map is read-only. As with every mmap-based loader, the checkpoint
        // files must not be modified while the process runs.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let bad = |reason: String| WeightsError::BadHeader {
            path: path.display().to_string(),
            reason,
        };
        if map.len() < 8 {
            return Err(bad(format!(
                "file is {} bytes, shorter than the 8-byte header length",
                map.len()
            )));
        }
        let header_len = u64::from_le_bytes(
            map[..8]
                .try_into()
                .map_err(|_| bad("short header".into()))?,
        ) as usize;
        if header_len > map.len() - 8 {
            return Err(WeightsError::Truncated {
                path: path.display().to_string(),
                tensor: "<header>".into(),
                needed: header_len.saturating_add(8),
                available: map.len(),
            });
        }
        let data_start = 8 + header_len;
        let metadata = match safetensors::SafeTensors::read_metadata(&map[..]) {
            Ok((_, metadata)) => metadata,
            Err(e) => {
                // The crate refuses a file whose data does not exactly cover the header's
                // offsets; say which tensor a truncated file cut off.
                if let Some((tensor, needed)) =
                    first_tensor_past_end(&map[8..data_start], data_start, map.len())
                {
                    return Err(WeightsError::Truncated {
                        path: path.display().to_string(),
                        tensor,
                        needed,
                        available: map.len(),
                    });
                }
                // Otherwise name the tensor whose entry the crate refused, where one is.
                return Err(bad(match first_bad_entry(&map[8..data_start]) {
                    Some((tensor, why)) => format!("{e}: tensor {tensor}: {why}"),
                    None => e.to_string(),
                }));
            }
        };
        let shard = self.shards.len();
        let infos: Vec<TensorInfo> = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| TensorInfo {
                name,
                shard,
                dtype: Dtype::from_safetensors(info.dtype),
                shape: info.shape.clone(),
                start: data_start + info.data_offsets.0,
                end: data_start + info.data_offsets.1,
            })
            .collect();
        for info in infos {
            if let Some(previous) = self.tensors.get(&info.name) {
                return Err(bad(format!(
                    "tensor {} is also stored in {}",
                    info.name,
                    self.shards[previous.shard].path.display()
                )));
            }
            self.tensors.insert(info.name.clone(), info);
        }
        self.shards.push(Shard {
            path: path.to_path_buf(),
            map: Arc::new(map),
        });
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    pub fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.tensors.values()
    }

    pub fn data(&self, info: &TensorInfo) -> TensorData {
        TensorData {
            map: self.shards[info.shard].map.clone(),
            start: info.start,
            end: info.end,
        }
    }

    pub fn file_of(&self, info: &TensorInfo) -> &Path {
        &self.shards[info.shard].path
    }

    pub fn shard_paths(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    /// Touches every page of every shard so the first requests do not wait on page
    /// faults; `progress(done_bytes)` is called as it goes. Returns a checksum of the
    /// bytes read (so the reads are not optimised away).
    pub fn warm(&self, mut progress: impl FnMut(u64)) -> u64 {
        const PAGE: usize = 4096;
        const REPORT: usize = 64 << 20;
        let mut sum = 0u64;
        let mut done = 0u64;
        for shard in &self.shards {
            for chunk in shard.map.chunks(REPORT) {
                sum = chunk
                    .iter()
                    .step_by(PAGE)
                    .fold(sum, |s, &b| s.wrapping_add(b as u64));
                done += chunk.len() as u64;
                progress(done);
            }
        }
        sum
    }

    /// Bytes of all shard files.
    pub fn file_bytes(&self) -> usize {
        self.shards.iter().map(|s| s.map.len()).sum()
    }
}

/// For a header whose tensors claim bytes past the end of the file, the first such
/// tensor (by end offset) and the file length it needs.
fn first_tensor_past_end(
    header: &[u8],
    data_start: usize,
    file_len: usize,
) -> Option<(String, usize)> {
    let value: serde_json::Value = serde_json::from_slice(header).ok()?;
    value
        .as_object()?
        .iter()
        .filter_map(|(name, info)| {
            let end = info.get("data_offsets")?.as_array()?.get(1)?.as_u64()? as usize;
            Some((name.clone(), data_start.saturating_add(end)))
        })
        .filter(|(_, end)| *end > file_len)
        .min_by_key(|(_, end)| *end)
}

/// The first header entry whose dtype is unknown or whose shape does not match its
/// `data_offsets`, with what is wrong with it.
/// More dimensions than any weight tensor has; such a shape is named, not printed.
const MAX_DIMS: usize = 8;

fn first_bad_entry(header: &[u8]) -> Option<(String, String)> {
    let value: serde_json::Value = serde_json::from_slice(header).ok()?;
    value.as_object()?.iter().find_map(|(name, info)| {
        if name == "__metadata__" {
            return None;
        }
        let dtype = info.get("dtype").and_then(|d| d.as_str()).unwrap_or("");
        let Some(bits) = dtype_bits(dtype) else {
            return Some((name.clone(), format!("unknown dtype {dtype:?}")));
        };
        let dims: Option<Vec<u64>> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|s| s.iter().map(|d| d.as_u64()).collect());
        let Some(dims) = dims else {
            return Some((name.clone(), "shape is not a list of sizes".into()));
        };
        if dims.len() > MAX_DIMS {
            return Some((
                name.clone(),
                format!(
                    "shape has {} dimensions (a checkpoint's tensors have at most {MAX_DIMS})",
                    dims.len()
                ),
            ));
        }
        let bytes = dims
            .iter()
            .try_fold(1u64, |n, d| n.checked_mul(*d))
            .and_then(|n| n.checked_mul(bits))
            .map(|b| b.div_ceil(8));
        let Some(bytes) = bytes else {
            return Some((name.clone(), format!("shape {dims:?} overflows")));
        };
        let offsets: Option<Vec<u64>> = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|o| o.iter().map(|v| v.as_u64()).collect());
        match offsets.as_deref() {
            Some([start, end]) if start <= end && end - start == bytes => None,
            Some([start, end]) => Some((
                name.clone(),
                format!(
                    "shape {dims:?} of {dtype} needs {bytes} bytes, data_offsets [{start}, {end}] hold {}",
                    end.saturating_sub(*start)
                ),
            )),
            _ => Some((name.clone(), "data_offsets is not two offsets".into())),
        }
    })
}

/// Bits per value of a safetensors dtype name.
fn dtype_bits(name: &str) -> Option<u64> {
    Some(match name {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" | "F8_E4M3FNUZ"
        | "F8_E5M2FNUZ" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "I64" | "U64" | "F64" | "C64" => 64,
        _ => return None,
    })
}

fn read_index(path: &Path) -> Result<BTreeMap<String, String>, WeightsError> {
    let bad = |reason: String| WeightsError::BadIndex {
        path: path.display().to_string(),
        reason,
    };
    let text = crate::files::read_to_string(path).map_err(|source| WeightsError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    map.iter()
        .map(|(tensor, file)| {
            file.as_str()
                .map(|f| (tensor.clone(), f.to_string()))
                .ok_or_else(|| bad(format!("weight_map entry for {tensor} is not a file name")))
        })
        .collect()
}
