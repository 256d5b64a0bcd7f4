//! CPU kernels for kimi-hybrid.
//!
//! Every kernel has a scalar reference (`scalar` module) that spells out exactly how a
//! stored weight format decodes. Fast paths (AVX-512 VNNI, AVX2) sit beside the references,
//! are tested against them, and are chosen at run time by CPUID (`Isa::detect`), never by
//! `target-cpu=native`; tests and benches force each path by name.

pub mod aligned;
pub mod attention;
pub mod bf16;
pub mod bf16_gemm;
pub mod f32ops;
pub mod formats;
pub mod fp8;
pub mod int4;
pub mod int4_gemm;
pub mod int4_gemm8;
pub mod int4_i16;
pub mod scalar;
pub mod stream;

pub use formats::{bf16_to_f32, f16_to_f32, fp8_e4m3_to_f32};

/// Helpers shared by the kernel tests: a seeded generator, INT4 rows, relative L2 error.
#[cfg(test)]
pub(crate) mod test_support {
    /// Pseudo-random u32 (the high bits of one LCG step).
    pub fn lcg_u32(seed: &mut u64) -> u32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    }

    /// Pseudo-random f32 in [-1, 1).
    pub fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Activations that exercise a quantizer's edges at K2's width: outliers far above the
    /// rest of their block, and whole blocks of zeros near the end.
    pub fn awkward_activations(seed: &mut u64) -> Vec<f32> {
        (0..7168)
            .map(|i| match i % 101 {
                0 => lcg(seed) * 500.0,
                1..=40 if i > 6000 => 0.0,
                _ => lcg(seed) * 4.0,
            })
            .collect()
    }

    /// One random pack-quantized INT4 row of `cols` values: packed bytes and BF16 scales.
    pub fn random_row(cols: usize, seed: &mut u64) -> (Vec<u8>, Vec<u8>) {
        let packed: Vec<u8> = (0..cols / 2)
            .map(|_| (lcg(seed).to_bits() >> 7) as u8)
            .collect();
        let scales: Vec<u8> = (0..cols / 32)
            .flat_map(|_| (((0.01 + 0.02 * lcg(seed).abs()).to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        (packed, scales)
    }

    /// `|got - want| / |want|` in the L2 norm.
    pub fn rel_l2(got: &[f32], want: &[f32]) -> f32 {
        let num: f32 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
        let den: f32 = want.iter().map(|b| b * b).sum();
        (num / den.max(1e-30)).sqrt()
    }
}

/// Calls `$f::<N>($args)` with the token count `$n` (1..=8) as a constant, so each count
/// gets its own copy of a row kernel's loop with its accumulators in registers (a
/// runtime-length array of accumulators lives in memory, which puts a store-to-load round
/// trip into every step).
#[cfg(target_arch = "x86_64")]
macro_rules! by_token_count {
    ($n:expr, $f:ident($($arg:expr),*)) => {
        match $n {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            6 => $f::<6>($($arg),*),
            7 => $f::<7>($($arg),*),
            _ => $f::<8>($($arg),*),
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use by_token_count;

/// An instruction-set path of the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable code (the integer reference for INT4, plain loops for BF16).
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VL with VNNI (`vpdpbusd`, `vpdpwssd`).
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
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
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

/// `vpdpwssd` and `vpdpbusd` pinned to those instructions. LLVM may rewrite the
/// intrinsics as `vpmaddwd`/`vpmaddubsw` + `vpaddd` (two instructions where the hardware
/// has one), which halves the multiply-accumulate rate of the GEMM; inline assembly keeps
/// the instruction the kernels are written for.
#[cfg(target_arch = "x86_64")]
pub(crate) mod vnni {
    use std::arch::asm;
    use std::arch::x86_64::__m512i;

    /// Per 32-bit lane: `acc + a.lo16 * b.lo16 + a.hi16 * b.hi16` (signed).
    #[inline]
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn dpwssd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
        let mut acc = acc;
        asm!("vpdpwssd {acc}, {a}, {b}", acc = inout(zmm_reg) acc, a = in(zmm_reg) a, b = in(zmm_reg) b, options(pure, nomem, nostack, preserves_flags));
        acc
    }

    /// Per 32-bit lane: `acc + sum of 4 (unsigned byte of a) * (signed byte of b)`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn dpbusd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
        let mut acc = acc;
        asm!("vpdpbusd {acc}, {a}, {b}", acc = inout(zmm_reg) acc, a = in(zmm_reg) a, b = in(zmm_reg) b, options(pure, nomem, nostack, preserves_flags));
        acc
    }
}

/// `v` rounded to the nearest integer, ties to even. One conversion instruction on x86_64
/// (SSE2, under the default rounding mode) where `f32::round` is a library call, which
/// dominated quantizing prefill activations.
#[inline(always)]
pub(crate) fn round_to_i32(v: f32) -> i32 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: SSE2 is part of the x86_64 baseline.
        unsafe { std::arch::x86_64::_mm_cvtss_si32(std::arch::x86_64::_mm_set_ss(v)) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        v.round_ties_even() as i32
    }
}

/// Bytes ahead of the current read position that the streaming kernels ask for into L1,
/// and further ahead into L2. Weight rows are read once, front to back; hints this far
/// ahead (into the next rows) keep enough reads in flight for one core to approach its
/// share of DRAM bandwidth while it computes, which the hardware prefetchers alone did
/// not (measured with `kimi-hybrid bench kernels`).
pub(crate) const PREFETCH_L1_BYTES: usize = 4096;
pub(crate) const PREFETCH_L2_BYTES: usize = 16384;

/// Prefetch hints for a stream read at `at`: call once per 64 bytes consumed. Hints never
/// fault, so they may point past the end of the data.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_stream(at: *const u8) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
    // SAFETY: prefetch is a hint available on every x86_64 CPU; it does not access memory
    // architecturally.
    unsafe {
        _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(PREFETCH_L1_BYTES) as *const i8);
        _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(PREFETCH_L2_BYTES) as *const i8);
    }
}

/// Asks for share `part` of `parts` of each range's cache lines into L2: a GEMM spreads
/// the next panel's weights over its token tiles this way, so the panel's fill finds them
/// in cache (see `int4_gemm8::panel8_times_tokens`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_share_l2(ranges: &[&[u8]], part: usize, parts: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
    for range in ranges {
        let lines = range.len().div_ceil(64);
        let (from, to) = (lines * part / parts, lines * (part + 1) / parts);
        for line in from..to {
            // SAFETY: a prefetch is a hint that never faults, and the address is in the range.
            unsafe {
                _mm_prefetch::<_MM_HINT_T1>(range.as_ptr().wrapping_add(64 * line) as *const i8)
            };
        }
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
