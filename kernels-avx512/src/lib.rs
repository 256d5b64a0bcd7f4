//! CPU kernels for kimi-hybrid.
//!
//! Every kernel has a scalar reference (`scalar` module) that spells out exactly how a
//! stored weight format decodes. Fast paths (AVX-512 VNNI, AVX2) sit beside the references,
//! are tested against them, and are chosen at run time by CPUID (`Isa::detect`), never by
//! `target-cpu=native`; tests and benches force each path by name.

pub mod bf16;
pub mod f32ops;
pub mod formats;
pub mod int4;
pub mod scalar;
pub mod stream;

pub use formats::{bf16_to_f32, f16_to_f32, fp8_e4m3_to_f32};

/// An instruction-set path of the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable code (the integer reference for INT4, plain loops for BF16).
    Scalar,
    /// AVX2 + FMA.
    Avx2,
    /// AVX-512 F/BW with VNNI (`vpdpbusd`).
    Avx512Vnni,
}

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni];

    /// The best path this CPU supports.
    pub fn detect() -> Isa {
        [Isa::Avx512Vnni, Isa::Avx2]
            .into_iter()
            .find(|i| i.available())
            .unwrap_or(Isa::Scalar)
    }

    /// Whether this CPU can run the path.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512-vnni",
        }
    }

    pub fn from_name(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == name)
    }
}

/// Horizontal sum of 8 f32 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn hsum256(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let sum128 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let sum64 = _mm_add_ps(sum128, _mm_movehl_ps(sum128, sum128));
    let sum32 = _mm_add_ss(sum64, _mm_shuffle_ps(sum64, sum64, 1));
    _mm_cvtss_f32(sum32)
}
