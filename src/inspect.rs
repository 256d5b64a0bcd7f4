//! `kimi-hybrid inspect`: what a checkpoint holds and how the runtime will read it.

use crate::config::{ModelConfig, Quantization};
use crate::model::{Ffn, Model, ModelError, QueryProj};
use crate::weights::{Checkpoint, LinearWeight};
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Serialize)]
pub struct ModuleFormats {
    /// Format name -> (modules, bytes).
    pub formats: BTreeMap<String, (usize, usize)>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub dir: String,
    pub architecture: String,
    pub model_type: String,
    pub config: BTreeMap<String, String>,
    pub shards: usize,
    pub file_bytes: usize,
    pub tensor_count: usize,
    /// Dtype -> (tensors, bytes).
    pub dtypes: BTreeMap<String, (usize, usize)>,
    /// Module group (attention, routed experts, ...) -> formats.
    pub modules: BTreeMap<String, ModuleFormats>,
    pub vision_tensors: usize,
    pub vision_bytes: usize,
    /// Multi-token-prediction layers (`model.layers.N` with N >= num_hidden_layers, as in
    /// DeepSeek-V3): recognised, not used for generation.
    pub mtp_tensors: usize,
    pub mtp_bytes: usize,
    /// Tensors that are neither used by the text model nor part of the vision tower.
    pub unrecognised: Vec<String>,
    /// The load error, when the text model cannot be loaded.
    pub problem: Option<String>,
}

fn key_config(c: &ModelConfig) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(k.to_string(), v);
    };
    put("hidden_size", c.hidden_size.to_string());
    put("num_hidden_layers", c.num_hidden_layers.to_string());
    put("vocab_size", c.vocab_size.to_string());
    put(
        "attention",
        format!(
            "MLA heads {} q_lora {:?} kv_lora {} nope/rope/v {}/{}/{}",
            c.num_attention_heads,
            c.q_lora_rank,
            c.kv_lora_rank,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim
        ),
    );
    put(
        "experts",
        format!(
            "{} routed (top {}), {} shared, intermediate {}, first {} layers dense",
            c.n_routed_experts,
            c.num_experts_per_tok,
            c.n_shared_experts,
            c.moe_intermediate_size,
            c.first_k_dense_replace
        ),
    );
    put(
        "routing",
        format!(
            "{:?} {:?} n_group {} topk_group {} scale {} norm {}",
            c.scoring_func,
            c.topk_method,
            c.n_group,
            c.topk_group,
            c.routed_scaling_factor,
            c.norm_topk_prob
        ),
    );
    put(
        "rope",
        match &c.rope_scaling {
            Some(y) => format!(
                "theta {} yarn factor {} original {} beta {}/{} mscale {}/{}",
                c.rope_theta,
                y.factor,
                y.original_max_position_embeddings,
                y.beta_fast,
                y.beta_slow,
                y.mscale,
                y.mscale_all_dim
            ),
            None => format!("theta {} (no scaling)", c.rope_theta),
        },
    );
    put(
        "max_position_embeddings",
        c.max_position_embeddings.to_string(),
    );
    put(
        "quantization",
        match &c.quantization {
            Some(Quantization::PackQuantized(q)) => format!(
                "compressed-tensors pack-quantized int{} group {}",
                q.num_bits, q.group_size
            ),
            Some(Quantization::Fp8Block { block }) => {
                format!("fp8 e4m3 blocks {}x{}", block[0], block[1])
            }
            None => "none".into(),
        },
    );
    put("eos_token_ids", format!("{:?}", c.eos_token_ids));
    m
}

fn is_vision(name: &str) -> bool {
    name.starts_with("vision_tower.") || name.starts_with("mm_projector.")
}

pub fn inspect(ckpt: &Checkpoint) -> Report {
    let mut dtypes: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let (mut vision_tensors, mut vision_bytes) = (0, 0);
    for t in ckpt.tensors() {
        let e = dtypes.entry(t.dtype.name().to_string()).or_default();
        e.0 += 1;
        e.1 += t.byte_len();
        if is_vision(&t.name) {
            vision_tensors += 1;
            vision_bytes += t.byte_len();
        }
    }
    let is_mtp = |name: &str| {
        name.strip_prefix(&ckpt.config.tensor_prefix)
            .and_then(|n| n.strip_prefix("model.layers."))
            .and_then(|n| n.split('.').next())
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|l| l >= ckpt.config.num_hidden_layers)
    };
    let (mtp_tensors, mtp_bytes) = ckpt
        .tensors()
        .filter(|t| is_mtp(&t.name))
        .fold((0, 0), |(n, b), t| (n + 1, b + t.byte_len()));
    let (modules, unrecognised, problem) = match Model::load(ckpt) {
        Ok(model) => {
            let unrecognised = ckpt
                .tensors()
                .filter(|t| {
                    !model.used_tensors.contains(&t.name) && !is_vision(&t.name) && !is_mtp(&t.name)
                })
                .map(|t| t.name.clone())
                .collect();
            (module_formats(&model), unrecognised, None)
        }
        Err(e) => (BTreeMap::new(), Vec::new(), Some(ModelError::to_string(&e))),
    };
    Report {
        dir: ckpt.dir.display().to_string(),
        architecture: ckpt.config.architecture.clone(),
        model_type: ckpt.config.model_type.clone(),
        config: key_config(&ckpt.config),
        shards: ckpt.shard_paths().count(),
        file_bytes: ckpt.file_bytes(),
        tensor_count: ckpt.tensors().count(),
        dtypes,
        modules,
        vision_tensors,
        vision_bytes,
        mtp_tensors,
        mtp_bytes,
        unrecognised,
        problem,
    }
}

fn module_formats(model: &Model) -> BTreeMap<String, ModuleFormats> {
    let mut groups: BTreeMap<String, ModuleFormats> = BTreeMap::new();
    let mut add = |group: &str, w: &LinearWeight| {
        let g = groups
            .entry(group.to_string())
            .or_insert_with(|| ModuleFormats {
                formats: BTreeMap::new(),
            });
        let e = g.formats.entry(w.format_name().to_string()).or_default();
        e.0 += 1;
        e.1 += w.stored_bytes();
    };
    add("embeddings", &model.embed);
    add("lm_head", &model.lm_head);
    for layer in &model.layers {
        let a = &layer.attn;
        match &a.q {
            QueryProj::LowRank { a: qa, b, .. } => {
                add("attention", qa);
                add("attention", b);
            }
            QueryProj::Full(w) => add("attention", w),
        }
        for w in [&a.kv_a, &a.kv_b, &a.o] {
            add("attention", w);
        }
        match &layer.ffn {
            Ffn::Dense(f) => [&f.gate, &f.up, &f.down]
                .iter()
                .for_each(|w| add("dense mlp", w)),
            Ffn::Moe(m) => {
                add("router", &m.router);
                for e in &m.experts {
                    [&e.gate, &e.up, &e.down]
                        .iter()
                        .for_each(|w| add("routed experts", w));
                }
                if let Some(s) = &m.shared {
                    [&s.gate, &s.up, &s.down]
                        .iter()
                        .for_each(|w| add("shared experts", w));
                }
            }
        }
    }
    groups
}

fn gb(bytes: usize) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.2} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "checkpoint   {}", self.dir)?;
        writeln!(
            f,
            "architecture {} (model_type {})",
            self.architecture, self.model_type
        )?;
        for (k, v) in &self.config {
            writeln!(f, "  {k:<24} {v}")?;
        }
        writeln!(
            f,
            "files        {} shard(s), {}",
            self.shards,
            gb(self.file_bytes)
        )?;
        writeln!(f, "tensors      {}", self.tensor_count)?;
        for (dtype, (count, bytes)) in &self.dtypes {
            writeln!(f, "  {dtype:<10} {count:>7} tensors  {:>12}", gb(*bytes))?;
        }
        writeln!(f, "modules (stored form as read by the runtime)")?;
        for (group, m) in &self.modules {
            let parts: Vec<String> = m
                .formats
                .iter()
                .map(|(fmt, (count, bytes))| format!("{fmt} x{count} ({})", gb(*bytes)))
                .collect();
            writeln!(f, "  {group:<16} {}", parts.join(", "))?;
        }
        if self.vision_tensors > 0 {
            writeln!(
                f,
                "vision       {} tensors, {} (vision tower and projector; not used for text)",
                self.vision_tensors,
                gb(self.vision_bytes)
            )?;
        }
        if self.mtp_tensors > 0 {
            writeln!(
                f,
                "mtp          {} tensors, {} (multi-token-prediction layers; not used)",
                self.mtp_tensors,
                gb(self.mtp_bytes)
            )?;
        }
        if self.unrecognised.is_empty() {
            writeln!(f, "unrecognised none")?;
        } else {
            writeln!(f, "unrecognised {} tensor(s):", self.unrecognised.len())?;
            for name in self.unrecognised.iter().take(20) {
                writeln!(f, "  {name}")?;
            }
            if self.unrecognised.len() > 20 {
                writeln!(f, "  ... and {} more", self.unrecognised.len() - 20)?;
            }
        }
        if let Some(p) = &self.problem {
            writeln!(f, "PROBLEM      {p}")?;
        }
        Ok(())
    }
}

/// One tensor that `inspect --verify` found wrong.
#[derive(Debug, Serialize)]
pub struct BadTensor {
    pub tensor: String,
    pub file: String,
    pub dtype: String,
    pub elements: usize,
    /// NaN or infinite values.
    pub non_finite: usize,
    /// Zero or negative values in a quantization scale (which would erase or flip a
    /// group of weights).
    pub non_positive_scales: usize,
}

/// What `inspect --verify` read.
#[derive(Debug, Serialize)]
pub struct Verification {
    pub tensors: usize,
    pub bytes: usize,
    pub seconds: f64,
    pub bad: Vec<BadTensor>,
}

impl std::fmt::Display for Verification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "verified {} tensors ({:.2} GB) in {:.1} s",
            self.tensors,
            self.bytes as f64 / 1e9,
            self.seconds
        )?;
        if self.bad.is_empty() {
            return writeln!(
                f,
                "every floating-point value is finite; every scale is positive"
            );
        }
        for b in &self.bad {
            write!(f, "  {} ({}, {}): ", b.tensor, b.file, b.dtype)?;
            let mut parts = Vec::new();
            if b.non_finite > 0 {
                parts.push(format!(
                    "{} of {} values not finite",
                    b.non_finite, b.elements
                ));
            }
            if b.non_positive_scales > 0 {
                parts.push(format!(
                    "{} of {} scales zero or negative",
                    b.non_positive_scales, b.elements
                ));
            }
            writeln!(f, "{}", parts.join("; "))?;
        }
        Ok(())
    }
}

/// Whether a tensor holds quantization scales (compressed-tensors `weight_scale`, FP8
/// block `weight_scale_inv`).
fn is_scale(name: &str) -> bool {
    name.ends_with("weight_scale") || name.ends_with("weight_scale_inv")
}

/// Counts (non-finite values, non-positive values) of a floating-point tensor's bytes;
/// `None` for integer and boolean tensors, where every bit pattern is a value.
fn float_counts(dtype: crate::weights::Dtype, bytes: &[u8]) -> Option<(usize, usize)> {
    use crate::weights::Dtype;
    let count = |values: &mut dyn Iterator<Item = f64>| {
        values.fold((0, 0), |(bad, neg), v| {
            (
                bad + usize::from(!v.is_finite()),
                neg + usize::from(v <= 0.0),
            )
        })
    };
    Some(match dtype {
        Dtype::Bf16 => count(
            &mut bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f64()),
        ),
        Dtype::F16 => count(
            &mut bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f64()),
        ),
        Dtype::F32 => count(
            &mut bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64),
        ),
        Dtype::F64 => count(
            &mut bytes
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])),
        ),
        // E4M3 has no infinities; S.1111.111 is NaN. Only the sign matters for scales.
        Dtype::F8E4M3 => bytes.iter().fold((0, 0), |(bad, neg), &b| {
            let nan = b & 0x7f == 0x7f;
            (
                bad + usize::from(nan),
                neg + usize::from(b & 0x80 != 0 || b & 0x7f == 0),
            )
        }),
        // E5M2: an all-ones exponent is infinity or NaN.
        Dtype::F8E5M2 => bytes.iter().fold((0, 0), |(bad, neg), &b| {
            let special = b & 0x7c == 0x7c;
            (
                bad + usize::from(special),
                neg + usize::from(b & 0x80 != 0 || b & 0x7f == 0),
            )
        }),
        _ => return None,
    })
}

/// Reads every tensor of the checkpoint (in parallel, largest first) and reports the
/// ones with non-finite values or unusable scales. `progress` gets the bytes read so
/// far. A 594 GB checkpoint is read at the storage's speed.
pub fn verify(ckpt: &Checkpoint, progress: &(dyn Fn(u64) + Sync)) -> Verification {
    use rayon::prelude::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    let started = std::time::Instant::now();
    let mut tensors: Vec<_> = ckpt.tensors().collect();
    tensors.sort_by_key(|t| std::cmp::Reverse(t.byte_len()));
    let done = AtomicU64::new(0);
    let mut bad: Vec<BadTensor> = tensors
        .par_iter()
        .filter_map(|info| {
            let data = ckpt.data(info);
            let counts = float_counts(info.dtype, data.bytes());
            progress(
                done.fetch_add(info.byte_len() as u64, Ordering::Relaxed) + info.byte_len() as u64,
            );
            let (non_finite, non_positive) = counts?;
            let elements = info.shape.iter().product::<usize>();
            let non_positive_scales = if is_scale(&info.name) {
                non_positive
            } else {
                0
            };
            (non_finite > 0 || non_positive_scales > 0).then(|| BadTensor {
                tensor: info.name.clone(),
                file: ckpt.file_of(info).display().to_string(),
                dtype: info.dtype.name().to_string(),
                elements,
                non_finite,
                non_positive_scales,
            })
        })
        .collect();
    bad.sort_by(|a, b| a.tensor.cmp(&b.tensor));
    Verification {
        tensors: tensors.len(),
        bytes: tensors.iter().map(|t| t.byte_len()).sum(),
        seconds: started.elapsed().as_secs_f64(),
        bad,
    }
}
