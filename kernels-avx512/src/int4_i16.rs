//! INT4 (pack-quantized, group 32) weights times int16-quantized activations: the default
//! decode kernel. Activations are quantized per 32 values to 15-bit integers
//! (|q| <= 16383, scale absmax / 16383), a relative error near 3e-5, so results stay
//! within rounding of the f32 reference, while the products run as byte multiply-adds
//! (`vpdpbusd`, `vpmaddubsw` on AVX2) that keep up with DRAM on few cores, which
//! in-register dequantization to f32 does not.
//!
//! Each quantized activation is split as `q = 128 * high + low` with `low` in 0..127 and
//! `high` in -128..127, so both halves are signed bytes. The packed row's bytes are split
//! into low nibbles (values 2p) and high nibbles (values 2p+1), exactly as the int8 kernel
//! does ([`crate::int4`]); activations are stored to match (`even[p] = x[2p]`,
//! `odd[p] = x[2p+1]`, for each half). Four `vpdpbusd` per 64 packed bytes give the low
//! and high sums; `low + (high << 7)` is the exact integer dot product of every 8 values.
//! The +8 nibble offset is removed by starting each lane at `-8 * sum(q)` of its 8 values.

use crate::aligned::AlignedVec;
use crate::Isa;

/// Largest quantized magnitude: 15 bits, so the high half fits a signed byte.
pub const QMAX: i32 = 16383;

/// One token's activations, quantized for [`dot_row`].
#[derive(Debug, Clone)]
pub struct Q16Activations {
    pub cols: usize,
    /// Low halves (0..127): `even_low[p]` of value 2p, `odd_low[p]` of value 2p+1.
    pub even_low: AlignedVec<i8>,
    pub odd_low: AlignedVec<i8>,
    /// High halves (-128..127), same order.
    pub even_high: AlignedVec<i8>,
    pub odd_high: AlignedVec<i8>,
    /// Per 8-value lane: `-8 * sum` of its quantized values.
    pub lane_start: AlignedVec<i32>,
    /// Per 8-value lane: the scale of its 32-value block.
    pub lane_scale: AlignedVec<f32>,
}

impl Q16Activations {
    /// Quantizes `x` (length a multiple of 32) with one scale per 32 values.
    pub fn new(x: &[f32]) -> Self {
        let cols = x.len();
        assert!(
            cols.is_multiple_of(32),
            "INT4 kernels need a multiple of 32 columns"
        );
        let half = cols / 2;
        let mut q = Q16Activations {
            cols,
            even_low: AlignedVec::zeroed(half),
            odd_low: AlignedVec::zeroed(half),
            even_high: AlignedVec::zeroed(half),
            odd_high: AlignedVec::zeroed(half),
            lane_start: AlignedVec::zeroed(cols / 8),
            lane_scale: AlignedVec::zeroed(cols / 8),
        };
        #[cfg(target_arch = "x86_64")]
        if Isa::Avx512Vnni.available() {
            unsafe { avx512::quantize(x, &mut q) };
            return q;
        }
        q.quantize_portable(x);
        q
    }

    /// The scalar quantizer (the definition the vector one matches exactly).
    fn quantize_portable(&mut self, x: &[f32]) {
        let q = self;
        for (b, block) in x.chunks_exact(32).enumerate() {
            let absmax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = absmax / QMAX as f32;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            for (i, lane) in block.chunks_exact(8).enumerate() {
                let mut sum = 0i32;
                for (j, &v) in lane.iter().enumerate() {
                    let value = crate::round_to_i32(v * inv).clamp(-QMAX, QMAX);
                    sum += value;
                    let k = b * 32 + i * 8 + j;
                    let (low, high) = ((value & 127) as i8, (value >> 7) as i8);
                    if k % 2 == 0 {
                        q.even_low[k / 2] = low;
                        q.even_high[k / 2] = high;
                    } else {
                        q.odd_low[k / 2] = low;
                        q.odd_high[k / 2] = high;
                    }
                }
                q.lane_start[b * 4 + i] = -8 * sum;
                q.lane_scale[b * 4 + i] = scale;
            }
        }
    }

    /// The quantized value of activation `k`.
    fn value(&self, k: usize) -> i32 {
        let p = k / 2;
        if k.is_multiple_of(2) {
            128 * self.even_high[p] as i32 + self.even_low[p] as i32
        } else {
            128 * self.odd_high[p] as i32 + self.odd_low[p] as i32
        }
    }
}

/// Integer reference for lanes `from..to` (the scalar path and the tails of fast paths).
fn dot_lanes_portable(
    packed: &[u8],
    scales: &[u8],
    x: &Q16Activations,
    from: usize,
    to: usize,
) -> f32 {
    let mut total = 0.0f32;
    for lane in from..to {
        let mut acc = x.lane_start[lane];
        for k in lane * 8..lane * 8 + 8 {
            let nibble = (packed[k / 2] >> (4 * (k % 2))) & 0x0f;
            acc += nibble as i32 * x.value(k);
        }
        total += acc as f32 * crate::formats::bf16_at(scales, lane / 4) * x.lane_scale[lane];
    }
    total
}

/// `out[t] = row . xs[t]` for one packed row (`cols / 2` bytes, `cols / 32` BF16 scales)
/// and up to 8 tokens.
pub fn dot_row(isa: Isa, packed: &[u8], scales: &[u8], xs: &[&Q16Activations], out: &mut [f32]) {
    debug_assert!(xs.len() <= 8 && out.len() == xs.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if Isa::Avx512Vnni.available() => unsafe {
            avx512::dot_row(packed, scales, xs, out)
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if Isa::Avx2.available() => unsafe { avx2::dot_row(packed, scales, xs, out) },
        _ => {
            let lanes = packed.len() / 4;
            for (o, x) in out.iter_mut().zip(xs) {
                *o = dot_lanes_portable(packed, scales, x, 0, lanes);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{dot_lanes_portable, AlignedVec, Q16Activations};
    use crate::vnni::dpbusd;
    use std::arch::x86_64::*;

    /// [`Q16Activations::new`] 32 values at a time: the same scale, reciprocal and
    /// round-to-nearest-even conversion as the scalar code, so the same bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn quantize(x: &[f32], q: &mut Q16Activations) {
        let limit = _mm512_set1_epi32(super::QMAX);
        let negative_limit = _mm512_set1_epi32(-super::QMAX);
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
        let seven_bits = _mm512_set1_epi32(127);
        for b in 0..x.len() / 32 {
            let v0 = _mm512_loadu_ps(x.as_ptr().add(32 * b));
            let v1 = _mm512_loadu_ps(x.as_ptr().add(32 * b + 16));
            let absmax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            let scale = absmax / super::QMAX as f32;
            let inv = _mm512_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            // Macros, not closures: closures do not inherit the target features.
            macro_rules! round {
                ($v:expr) => {{
                    let r = _mm512_cvtps_epi32(_mm512_mul_ps($v, inv));
                    _mm512_max_epi32(_mm512_min_epi32(r, limit), negative_limit)
                }};
            }
            let (q0, q1) = (round!(v0), round!(v1));
            // Values 2p and 2p + 1 of the block, p = 0..16.
            let e = _mm512_permutex2var_epi32(q0, even, q1);
            let o = _mm512_permutex2var_epi32(q0, odd, q1);
            macro_rules! store {
                ($dst:expr, $v:expr) => {
                    _mm_storeu_si128(
                        $dst.as_mut_ptr().add(16 * b) as *mut _,
                        _mm512_cvtepi32_epi8($v),
                    )
                };
            }
            store!(q.even_low, _mm512_and_si512(e, seven_bits));
            store!(q.odd_low, _mm512_and_si512(o, seven_bits));
            store!(q.even_high, _mm512_srai_epi32(e, 7));
            store!(q.odd_high, _mm512_srai_epi32(o, 7));
            // Sum of each 8 values = each group of 4 pair sums.
            let mut pairs = [0i32; 16];
            _mm512_storeu_si512(pairs.as_mut_ptr() as *mut _, _mm512_add_epi32(e, o));
            for i in 0..4 {
                let sum: i32 = pairs[4 * i..4 * i + 4].iter().sum();
                q.lane_start[4 * b + i] = -8 * sum;
                q.lane_scale[4 * b + i] = scale;
            }
        }
    }

    /// One copy of the loop per token count ([`crate::by_token_count`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot_row(packed: &[u8], scales: &[u8], xs: &[&Q16Activations], out: &mut [f32]) {
        crate::by_token_count!(xs.len(), dot_row_n(packed, scales, xs, out))
    }

    /// 64 packed bytes (128 values, 4 blocks, 16 lanes) per step, `N` tokens; the block
    /// scales of 4 steps are widened at once.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn dot_row_n<const N: usize>(
        packed: &[u8],
        scales: &[u8],
        xs: &[&Q16Activations],
        out: &mut [f32],
    ) {
        let xs: [&Q16Activations; N] = std::array::from_fn(|t| xs[t]);
        let bytes = packed.len();
        let steps = bytes / 64;
        let nibble = _mm512_set1_epi8(0x0f);
        let mut acc = [_mm512_setzero_ps(); N];
        // Lane i of step 4g + j belongs to block 4j + i / 4 of group g's 16 scales.
        let spreads: [__m512i; 4] = std::array::from_fn(|j| {
            let b = 4 * j as i32;
            _mm512_set_epi32(
                b + 3,
                b + 3,
                b + 3,
                b + 3,
                b + 2,
                b + 2,
                b + 2,
                b + 2,
                b + 1,
                b + 1,
                b + 1,
                b + 1,
                b,
                b,
                b,
                b,
            )
        });
        let mut group = 0;
        while group < steps {
            // The 16 BF16 scales of steps group..group+4 (fewer at the row's end) as f32.
            let count = (steps - group).min(4);
            let raw = _mm256_maskz_loadu_epi16(
                ((1u32 << (4 * count)) - 1) as u16,
                scales.as_ptr().add(group * 8) as *const _,
            );
            let ws16 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
            for (j, spread) in spreads.iter().enumerate().take(count) {
                let s = group + j;
                crate::prefetch_stream(packed.as_ptr().wrapping_add(s * 64));
                let ws = _mm512_permutexvar_ps(*spread, ws16);
                let w = _mm512_loadu_si512(packed.as_ptr().add(s * 64) as *const _);
                let lo = _mm512_and_si512(w, nibble);
                let hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), nibble);
                for (t, x) in xs.iter().enumerate() {
                    let at =
                        |v: &AlignedVec<i8>| _mm512_loadu_si512(v.as_ptr().add(s * 64) as *const _);
                    let start = _mm512_loadu_si512(x.lane_start.as_ptr().add(s * 16) as *const _);
                    let low = dpbusd(dpbusd(start, lo, at(&x.even_low)), hi, at(&x.odd_low));
                    let high = dpbusd(
                        dpbusd(_mm512_setzero_si512(), lo, at(&x.even_high)),
                        hi,
                        at(&x.odd_high),
                    );
                    let dot = _mm512_add_epi32(low, _mm512_slli_epi32(high, 7));
                    let scale =
                        _mm512_mul_ps(ws, _mm512_loadu_ps(x.lane_scale.as_ptr().add(s * 16)));
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[t]);
                }
            }
            group += count;
        }
        let (from, to) = (steps * 16, bytes / 4);
        for (t, x) in xs.iter().enumerate() {
            out[t] = _mm512_reduce_add_ps(acc[t]) + dot_lanes_portable(packed, scales, x, from, to);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{dot_lanes_portable, AlignedVec, Q16Activations};
    use std::arch::x86_64::*;

    /// 32 packed bytes (64 values, 2 blocks, 8 lanes) per step.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_row(packed: &[u8], scales: &[u8], xs: &[&Q16Activations], out: &mut [f32]) {
        let bytes = packed.len();
        let steps = bytes / 32;
        let nibble = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let spread = _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0);
        let mut acc = [_mm256_setzero_ps(); 8];
        for s in 0..steps {
            if s % 2 == 0 {
                crate::prefetch_stream(packed.as_ptr().wrapping_add(s * 32));
            }
            let w = _mm256_loadu_si256(packed.as_ptr().add(s * 32) as *const _);
            let lo = _mm256_and_si256(w, nibble);
            let hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), nibble);
            let raw = _mm_cvtsi32_si128(i32::from_le_bytes([
                scales[s * 4],
                scales[s * 4 + 1],
                scales[s * 4 + 2],
                scales[s * 4 + 3],
            ]));
            let ws2 = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(raw), 16));
            let ws = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(ws2), spread);
            for (t, x) in xs.iter().enumerate() {
                let at =
                    |v: &AlignedVec<i8>| _mm256_loadu_si256(v.as_ptr().add(s * 32) as *const _);
                // Nibble x 7-bit products summed in pairs fit in i16 (2 * 15 * 128).
                let low = _mm256_add_epi16(
                    _mm256_maddubs_epi16(lo, at(&x.even_low)),
                    _mm256_maddubs_epi16(hi, at(&x.odd_low)),
                );
                let high = _mm256_add_epi16(
                    _mm256_maddubs_epi16(lo, at(&x.even_high)),
                    _mm256_maddubs_epi16(hi, at(&x.odd_high)),
                );
                let start = _mm256_loadu_si256(x.lane_start.as_ptr().add(s * 8) as *const _);
                let dot = _mm256_add_epi32(
                    _mm256_add_epi32(start, _mm256_madd_epi16(low, ones)),
                    _mm256_slli_epi32(_mm256_madd_epi16(high, ones), 7),
                );
                let scale = _mm256_mul_ps(ws, _mm256_loadu_ps(x.lane_scale.as_ptr().add(s * 8)));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[t]);
            }
        }
        let (from, to) = (steps * 8, bytes / 4);
        for (t, x) in xs.iter().enumerate() {
            out[t] = crate::hsum256(acc[t]) + dot_lanes_portable(packed, scales, x, from, to);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scalar::{decode_int4_row, dot};
    use crate::test_support::{lcg, random_row, rel_l2};

    /// Real shapes and odd ones (K a multiple of 32 but not of 128 or 256), 1 to 8 tokens:
    /// every path within 1e-4 relative L2 of the f32 reference (15-bit activations carry
    /// ~3e-5 relative error each), and all paths equal to each other up to f32 rounding
    /// of the same integers.
    #[test]
    fn every_isa_matches_the_f32_reference() {
        let mut seed = 5;
        for cols in [32, 64, 96, 160, 224, 2048, 7168] {
            for tokens in [1usize, 3, 8] {
                let xs: Vec<Vec<f32>> = (0..tokens)
                    .map(|_| (0..cols).map(|_| lcg(&mut seed) * 3.0).collect())
                    .collect();
                let q: Vec<Q16Activations> = xs.iter().map(|x| Q16Activations::new(x)).collect();
                let qr: Vec<&Q16Activations> = q.iter().collect();
                let mut want = vec![];
                let mut got: Vec<Vec<f32>> = vec![vec![]; Isa::ALL.len()];
                let mut w = vec![0.0; cols];
                for _ in 0..5 {
                    let (packed, scales) = random_row(cols, &mut seed);
                    decode_int4_row(&packed, &scales, 32, &mut w);
                    want.extend(xs.iter().map(|x| dot(&w, x)));
                    for (i, isa) in Isa::ALL.into_iter().enumerate() {
                        let mut out = vec![0.0; tokens];
                        dot_row(isa, &packed, &scales, &qr, &mut out);
                        got[i].extend(out);
                    }
                }
                for (isa, g) in Isa::ALL.iter().zip(&got) {
                    let err = rel_l2(g, &want);
                    assert!(err < 1e-4, "{isa:?} cols {cols} tokens {tokens}: {err}");
                    let spread = rel_l2(g, &got[0]);
                    assert!(spread < 1e-5, "{isa:?} vs scalar, cols {cols}: {spread}");
                }
            }
        }
    }

    #[test]
    fn fast_quantizer_writes_the_scalar_bytes() {
        let x = crate::test_support::awkward_activations(&mut 13);
        let fast = Q16Activations::new(&x);
        let mut plain = Q16Activations::new(&x);
        plain.quantize_portable(&x);
        assert_eq!(&fast.even_low[..], &plain.even_low[..]);
        assert_eq!(&fast.odd_low[..], &plain.odd_low[..]);
        assert_eq!(&fast.even_high[..], &plain.even_high[..]);
        assert_eq!(&fast.odd_high[..], &plain.odd_high[..]);
        assert_eq!(&fast.lane_start[..], &plain.lane_start[..]);
        assert_eq!(&fast.lane_scale[..], &plain.lane_scale[..]);
    }

    #[test]
    fn split_halves_rebuild_every_value() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) * 0.37).collect();
        let q = Q16Activations::new(&x);
        for (k, &v) in x.iter().enumerate() {
            let scale = q.lane_scale[k / 8];
            assert!(
                (q.value(k) as f32 * scale - v).abs() <= 0.5 * scale + 1e-6,
                "value {k}"
            );
        }
        assert_eq!(
            q.value(0).abs(),
            QMAX,
            "block absmax maps to the largest value"
        );
    }
}
