//! CPU kernels for kimi-hybrid.
//!
//! Every kernel has a scalar reference (`scalar` module) that spells out exactly how a
//! stored weight format decodes. Fast paths (AVX-512 VNNI/BF16, AVX2) are added beside
//! the references and are tested against them; they are selected at run time by CPUID,
//! never by `target-cpu=native`.

pub mod formats;
pub mod scalar;

pub use formats::{bf16_to_f32, f16_to_f32, fp8_e4m3_to_f32};
