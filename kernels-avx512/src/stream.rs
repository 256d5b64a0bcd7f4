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
    #[cfg(target_arch = "x86_64")]
    if Isa::Avx512Vnni.available() {
        let start = std::time::Instant::now();
        let sink = unsafe { vnni16_loop(iterations) };
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(sink);
        return Some(iterations as f64 * 16.0 * 32.0 / secs);
    }
    let _ = iterations;
    None
}

/// 16 independent `vpdpwssd` accumulators (enough to cover the instruction's latency on
/// two ports), each updated `iterations` times; returns a sum so nothing is optimised away.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn vnni16_loop(iterations: u64) -> i32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_epi16(3), _mm512_set1_epi16(-2));
    let mut acc = [_mm512_setzero_si512(); 16];
    for _ in 0..iterations {
        for r in acc.iter_mut() {
            *r = crate::vnni::dpwssd(*r, a, b);
        }
    }
    let mut total = _mm512_setzero_si512();
    for r in acc {
        total = _mm512_add_epi32(total, r);
    }
    _mm512_reduce_add_epi32(total)
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
        assert!(vnni16_macs_per_s_one_core(1000).is_none_or(|v| v > 0.0));
    }
}
