//! Streaming read and instruction-peak probes, measured next to the kernels so benchmark
//! figures are ratios to what this machine can do.

use crate::Isa;

/// Reads every byte of `data` (64-byte vector loads where available) and returns a
/// checksum so the reads cannot be optimised away: the wrapping sum of the little-endian
/// u64 words of every whole 256-byte step, plus the bytes after the last step.
pub fn read_sum(isa: Isa, data: &[u8]) -> u64 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if Isa::Avx512Vnni.available() => unsafe { avx512_read(data) },
        _ => {
            let whole = data.len() / 256 * 256;
            let words = data[..whole]
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .fold(0u64, u64::wrapping_add);
            data[whole..]
                .iter()
                .fold(words, |a, &b| a.wrapping_add(b as u64))
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_read(data: &[u8]) -> u64 {
    use std::arch::x86_64::*;
    let steps = data.len() / 256;
    let (mut a, mut b, mut c, mut d) = (
        _mm512_setzero_si512(),
        _mm512_setzero_si512(),
        _mm512_setzero_si512(),
        _mm512_setzero_si512(),
    );
    for s in 0..steps {
        let p = data.as_ptr().add(s * 256);
        a = _mm512_add_epi64(a, _mm512_loadu_si512(p as *const _));
        b = _mm512_add_epi64(b, _mm512_loadu_si512(p.add(64) as *const _));
        c = _mm512_add_epi64(c, _mm512_loadu_si512(p.add(128) as *const _));
        d = _mm512_add_epi64(d, _mm512_loadu_si512(p.add(192) as *const _));
    }
    let sum = _mm512_add_epi64(_mm512_add_epi64(a, b), _mm512_add_epi64(c, d));
    let tail: u64 = data[steps * 256..].iter().map(|&x| x as u64).sum();
    (_mm512_reduce_add_epi64(sum) as u64).wrapping_add(tail)
}

/// int16 multiply-accumulates per second of one core issuing independent `vpdpwssd`
/// (32 MACs each) back to back, for `iterations` rounds of 16 instructions.
pub fn vnni16_macs_per_s_one_core(iterations: u64) -> Option<f64> {
    peak_of(Peak::Int16, iterations)
}

/// int8 multiply-accumulates per second of one core issuing independent `vpdpbusd` (64
/// MACs each), as [`vnni16_macs_per_s_one_core`].
pub fn vnni8_macs_per_s_one_core(iterations: u64) -> Option<f64> {
    peak_of(Peak::Int8, iterations)
}

/// BF16 multiply-accumulates per second of one core issuing independent `vdpbf16ps` (32
/// MACs each); `None` without AVX-512 BF16.
pub fn bf16_macs_per_s_one_core(iterations: u64) -> Option<f64> {
    peak_of(Peak::Bf16, iterations)
}

/// f32 multiply-accumulates per second of one core issuing independent 512-bit FMAs (16
/// MACs each).
pub fn f32_macs_per_s_one_core(iterations: u64) -> Option<f64> {
    peak_of(Peak::F32, iterations)
}

/// The instruction a peak probe issues.
#[derive(Clone, Copy)]
enum Peak {
    Int16,
    Int8,
    Bf16,
    F32,
}

fn peak_of(peak: Peak, iterations: u64) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if Isa::Avx512Vnni.available() {
        let (macs_per_instruction, runs) = match peak {
            Peak::Int16 => (32.0, true),
            Peak::Int8 => (64.0, true),
            Peak::Bf16 => (32.0, crate::bf16_gemm::fast_path_available()),
            Peak::F32 => (16.0, true),
        };
        if !runs {
            return None;
        }
        let start = std::time::Instant::now();
        let sink = unsafe { peak_loop(peak, iterations) };
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(sink);
        return Some(iterations as f64 * 16.0 * macs_per_instruction / secs);
    }
    let _ = (peak, iterations);
    None
}

/// A probe loop: 16 independent accumulators (enough to cover the instruction's latency
/// on two ports), each updated `iterations` times by one instruction; returns a sum so
/// nothing is optimised away. One function per instruction, each compiled for exactly the
/// features its instruction needs.
macro_rules! peak_loop {
    ($name:ident, $features:literal, $instruction:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(iterations: u64) -> f32 {
            use std::arch::asm;
            use std::arch::x86_64::*;
            let (a, b) = (_mm512_set1_epi16(3), _mm512_set1_epi16(-2));
            let mut acc = [_mm512_setzero_si512(); 16];
            for _ in 0..iterations {
                for r in acc.iter_mut() {
                    asm!(concat!($instruction, " {acc}, {a}, {b}"), acc = inout(zmm_reg) *r, a = in(zmm_reg) a, b = in(zmm_reg) b, options(pure, nomem, nostack, preserves_flags));
                }
            }
            let mut total = _mm512_setzero_ps();
            for r in acc {
                total = _mm512_add_ps(total, _mm512_castsi512_ps(r));
            }
            _mm512_reduce_add_ps(total)
        }
    };
}
peak_loop!(vpdpwssd_loop, "avx512f,avx512vnni", "vpdpwssd");
peak_loop!(vpdpbusd_loop, "avx512f,avx512vnni", "vpdpbusd");
peak_loop!(vdpbf16ps_loop, "avx512f,avx512bf16", "vdpbf16ps");
peak_loop!(vfmadd_loop, "avx512f", "vfmadd231ps");

#[cfg(target_arch = "x86_64")]
unsafe fn peak_loop(peak: Peak, iterations: u64) -> f32 {
    match peak {
        Peak::Int16 => vpdpwssd_loop(iterations),
        Peak::Int8 => vpdpbusd_loop(iterations),
        // Only reached where the CPU has AVX-512 BF16 (see `peak_of`).
        Peak::Bf16 => vdpbf16ps_loop(iterations),
        Peak::F32 => vfmadd_loop(iterations),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_sum_paths_agree() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7919 % 251) as u8).collect();
        let want = read_sum(Isa::Scalar, &data);
        for isa in Isa::ALL {
            assert_eq!(read_sum(isa, &data), want, "{isa:?}");
        }
        for probe in [
            vnni16_macs_per_s_one_core,
            vnni8_macs_per_s_one_core,
            bf16_macs_per_s_one_core,
            f32_macs_per_s_one_core,
        ] {
            assert!(probe(1000).is_none_or(|v| v > 0.0));
        }
    }
}
