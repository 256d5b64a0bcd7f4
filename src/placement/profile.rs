//! Hardware profiles: what a machine has (GPUs, NUMA nodes, bandwidths, reserves) and the
//! default workload. Profiles are TOML files (`placement-profiles/*.toml`, also built into
//! the binary) or a description of the current machine (`auto`).

use serde::{Deserialize, Serialize};
use std::path::Path;

pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read profile {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("profile {source_name}: {message}")]
    Parse {
        source_name: String,
        message: String,
    },
    #[error("profile {source_name}: field `{field}`: {reason}")]
    Field {
        source_name: String,
        field: String,
        reason: String,
    },
    #[error("unknown profile {name:?}; built-in profiles: {known}; or give a path to a .toml file, or `auto`")]
    Unknown { name: String, known: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// All-GPU when the model fits in GPU memory, hybrid when there are GPUs, else CPU.
    Auto,
    AllGpu,
    Hybrid,
    Cpu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionParallel {
    Auto,
    /// Tensor-parallel: heads split across GPUs; the latent KV cache is replicated.
    Tp,
    /// Data-parallel: each GPU runs attention for its own sequences.
    Dp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    Bf16,
    Fp16,
    Fp8,
    F32,
}

impl std::fmt::Display for AttentionParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttentionParallel::Auto => "auto",
            AttentionParallel::Tp => "tp",
            AttentionParallel::Dp => "dp",
        })
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvDtype::Bf16 => "bf16",
            KvDtype::Fp16 => "fp16",
            KvDtype::Fp8 => "fp8",
            KvDtype::F32 => "f32",
        })
    }
}

impl KvDtype {
    pub fn bytes(self) -> u64 {
        match self {
            KvDtype::Bf16 | KvDtype::Fp16 => 2,
            KvDtype::Fp8 => 1,
            KvDtype::F32 => 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    pub count: usize,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub memory_gib: f64,
    #[serde(default)]
    pub memory_bandwidth_gbs: f64,
    #[serde(default)]
    pub bf16_tflops: f64,
    #[serde(default)]
    pub interconnect_gbs: f64,
    #[serde(default)]
    pub pcie_gbs: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumaNode {
    pub cores: usize,
    pub memory_gib: f64,
    pub dram_bandwidth_gbs: f64,
    pub matmul_tflops: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    pub ram_gib: f64,
    #[serde(default)]
    pub isa: Vec<String>,
    pub numa: Vec<NumaNode>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    pub read_gbs: f64,
    pub capacity_gib: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reserves {
    pub os_ram_gib: f64,
    #[serde(default)]
    pub gpu_context_gib: f64,
    #[serde(default)]
    pub gpu_workspace_gib: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub context: u64,
    pub concurrency: u64,
    pub kv_dtype: KvDtype,
    #[serde(default = "default_attention")]
    pub attention: AttentionParallel,
}

/// The longest context a workload may ask for: 64 times the 262,144 tokens of the
/// longest-context K2 and DeepSeek models, and small enough that every size computed from
/// it (KV bytes for every sequence) stays far inside 64 bits.
pub const MAX_CONTEXT: u64 = 1 << 24;
/// The most sequences a workload may run at once.
pub const MAX_CONCURRENCY: u64 = 1 << 16;
/// The most GPUs a profile may have.
pub const MAX_GPUS: usize = 1024;

impl Workload {
    /// Whether the context and concurrency are within sense: `(field, reason)` if not.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if !(1..=MAX_CONTEXT).contains(&self.context) {
            return Err((
                "context",
                format!("{} is outside 1..={MAX_CONTEXT} tokens", self.context),
            ));
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return Err((
                "concurrency",
                format!(
                    "{} is outside 1..={MAX_CONCURRENCY} sequences",
                    self.concurrency
                ),
            ));
        }
        Ok(())
    }
}

fn default_attention() -> AttentionParallel {
    AttentionParallel::Auto
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub layout: Layout,
    pub gpu: Gpu,
    pub host: Host,
    pub disk: Disk,
    pub reserves: Reserves,
    pub workload: Workload,
}

/// The profiles shipped in `placement-profiles/`, built into the binary.
pub const BUILTIN: &[(&str, &str)] = &[
    (
        "1xH100+512GB",
        include_str!("../../placement-profiles/1xH100+512GB.toml"),
    ),
    (
        "b200x8",
        include_str!("../../placement-profiles/b200x8.toml"),
    ),
    (
        "8xH200",
        include_str!("../../placement-profiles/8xH200.toml"),
    ),
    (
        "4xH100",
        include_str!("../../placement-profiles/4xH100.toml"),
    ),
    (
        "1x4090+384GB",
        include_str!("../../placement-profiles/1x4090+384GB.toml"),
    ),
    (
        "2xRTX6000Pro+768GB",
        include_str!("../../placement-profiles/2xRTX6000Pro+768GB.toml"),
    ),
    (
        "cpu-only",
        include_str!("../../placement-profiles/cpu-only.toml"),
    ),
];

const KNOWN_ISA: &[&str] = &["avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx"];

impl Profile {
    /// A built-in profile by name, a TOML file by path, or `auto` for this machine.
    pub fn resolve(name_or_path: &str) -> Result<Self, ProfileError> {
        if name_or_path == "auto" {
            return Ok(super::detect::this_machine());
        }
        if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            return Self::from_toml(text, name_or_path);
        }
        let path = Path::new(name_or_path);
        if path.exists() || name_or_path.ends_with(".toml") {
            let text = crate::files::read_to_string(path).map_err(|source| ProfileError::Io {
                path: name_or_path.to_string(),
                source,
            })?;
            return Self::from_toml(&text, name_or_path);
        }
        Err(ProfileError::Unknown {
            name: name_or_path.to_string(),
            known: BUILTIN
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    pub fn from_toml(text: &str, source_name: &str) -> Result<Self, ProfileError> {
        let profile: Profile = toml::from_str(text).map_err(|e| ProfileError::Parse {
            source_name: source_name.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        profile.validate(source_name)?;
        Ok(profile)
    }

    fn validate(&self, source_name: &str) -> Result<(), ProfileError> {
        let bad = |field: &str, reason: String| ProfileError::Field {
            source_name: source_name.to_string(),
            field: field.to_string(),
            reason,
        };
        let positive = |field: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(bad(field, format!("must be a positive number, got {v}")))
            }
        };
        if self.gpu.count > 0 {
            positive("gpu.memory_gib", self.gpu.memory_gib)?;
            positive("gpu.memory_bandwidth_gbs", self.gpu.memory_bandwidth_gbs)?;
            positive("gpu.bf16_tflops", self.gpu.bf16_tflops)?;
            positive("gpu.pcie_gbs", self.gpu.pcie_gbs)?;
            if self.gpu.name.is_empty() {
                return Err(bad("gpu.name", "missing".into()));
            }
        }
        positive("host.ram_gib", self.host.ram_gib)?;
        if self.host.numa.is_empty() {
            return Err(bad("host.numa", "at least one NUMA node is needed".into()));
        }
        for (i, n) in self.host.numa.iter().enumerate() {
            if n.cores == 0 {
                return Err(bad(
                    &format!("host.numa[{i}].cores"),
                    "must be at least 1".into(),
                ));
            }
            positive(&format!("host.numa[{i}].memory_gib"), n.memory_gib)?;
            positive(
                &format!("host.numa[{i}].dram_bandwidth_gbs"),
                n.dram_bandwidth_gbs,
            )?;
            positive(&format!("host.numa[{i}].matmul_tflops"), n.matmul_tflops)?;
        }
        let numa_total: f64 = self.host.numa.iter().map(|n| n.memory_gib).sum();
        if (numa_total - self.host.ram_gib).abs() > 0.5 {
            return Err(bad(
                "host.numa",
                format!(
                    "node memories add up to {numa_total} GiB but host.ram_gib is {}",
                    self.host.ram_gib
                ),
            ));
        }
        for isa in &self.host.isa {
            if !KNOWN_ISA.contains(&isa.as_str()) {
                return Err(bad(
                    "host.isa",
                    format!("unknown feature {isa:?}; known: {}", KNOWN_ISA.join(", ")),
                ));
            }
        }
        positive("disk.read_gbs", self.disk.read_gbs)?;
        positive("disk.capacity_gib", self.disk.capacity_gib)?;
        if self.reserves.os_ram_gib < 0.0 || self.reserves.os_ram_gib >= self.host.ram_gib {
            return Err(bad(
                "reserves.os_ram_gib",
                format!(
                    "{} must be between 0 and host.ram_gib",
                    self.reserves.os_ram_gib
                ),
            ));
        }
        if self.gpu.count > 0
            && self.reserves.gpu_context_gib + self.reserves.gpu_workspace_gib
                >= self.gpu.memory_gib
        {
            return Err(bad(
                "reserves.gpu_workspace_gib",
                "GPU reserves exceed the GPU's memory".into(),
            ));
        }
        if self.gpu.count > MAX_GPUS {
            return Err(bad(
                "gpu.count",
                format!("{} is more than {MAX_GPUS} GPUs", self.gpu.count),
            ));
        }
        self.workload
            .check()
            .map_err(|(field, reason)| bad(&format!("workload.{field}"), reason))
    }

    /// Usable bytes per GPU after the context and workspace reserves.
    pub fn gpu_budget_bytes(&self) -> u64 {
        ((self.gpu.memory_gib - self.reserves.gpu_context_gib - self.reserves.gpu_workspace_gib)
            * GIB) as u64
    }

    /// Usable host RAM after the OS reserve, per NUMA node (reserve split by node size).
    pub fn numa_budget_bytes(&self) -> Vec<u64> {
        let share = 1.0 - self.reserves.os_ram_gib / self.host.ram_gib;
        self.host
            .numa
            .iter()
            .map(|n| (n.memory_gib * share * GIB) as u64)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_profile_parses() {
        for (name, _) in BUILTIN {
            let p = Profile::resolve(name).unwrap();
            assert_eq!(&p.name, name);
        }
    }

    #[test]
    fn bad_profiles_name_the_field() {
        let text = BUILTIN[0].1;
        let e = Profile::from_toml(
            &text.replace("memory_gib = 79.6", "memory_gib = -1"),
            "x.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("gpu.memory_gib") && e.contains("x.toml"), "{e}");
        let e = Profile::from_toml(&text.replace("read_gbs = 7", "read_gbz = 7"), "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("read_gbz"), "{e}");
        let e = Profile::from_toml(
            &text.replace("kv_dtype = \"bf16\"", "kv_dtype = \"int3\""),
            "x.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("int3") && e.contains("line"), "{e}");
        let e = Profile::from_toml(&text.replace("\"amx\"]", "\"sse9\"]"), "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("host.isa") && e.contains("sse9"), "{e}");
        let e = Profile::from_toml(&text.replace("ram_gib = 512", "ram_gib = 600"), "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("host.numa"), "{e}");
        let e = Profile::resolve("no-such-profile").unwrap_err().to_string();
        assert!(e.contains("b200x8"), "{e}");
        // Sizes that would overflow the planner's arithmetic or its memory.
        for (from, to, field) in [
            ("count = 1", "count = 18446744073709551615", "gpu.count"),
            (
                "context = ",
                "context = 18446744073709551615 #",
                "workload.context",
            ),
            (
                "concurrency = ",
                "concurrency = 4294967296 #",
                "workload.concurrency",
            ),
        ] {
            assert!(text.contains(from), "{from}");
            let e = Profile::from_toml(&text.replacen(from, to, 1), "x.toml")
                .unwrap_err()
                .to_string();
            assert!(e.contains(field) && e.contains("x.toml"), "{e}");
        }
    }
}
