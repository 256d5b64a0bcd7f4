//! INT4 (compressed-tensors pack-quantized, group 32) weights times int8-quantized
//! activations, read in place from the checkpoint's layout.
//!
//! A packed row is `cols / 2` bytes: byte p holds value 2p in its low nibble and value
//! 2p+1 in its high nibble, each stored as q+8 (0..15). Activations are quantized per
//! 32-value block to int8 and split the same way (`even[p] = x[2p]`, `odd[p] = x[2p+1]`),
//! so a byte-wise unsigned x signed dot product (`vpdpbusd`, or `pmaddubsw` on AVX2) of the
//! low nibbles with `even` plus the high nibbles with `odd` gives sum(nibble * x) over
//! every 4 bytes (8 values). Subtracting `8 * sum(x)` of those 8 values (precomputed per
//! lane) removes the +8 offset; each lane then gets its block's weight scale times the
//! activation block scale.

use crate::aligned::AlignedVec;
use crate::Isa;

/// One token's activations, quantized for the INT4 kernels.
#[derive(Debug, Clone)]
pub struct Q8Activations {
    pub cols: usize,
    /// `even[p] = q(x[2p])`, `odd[p] = q(x[2p+1])`, p < cols/2.
    pub even: AlignedVec<i8>,
    pub odd: AlignedVec<i8>,
    /// Per lane of 8 values (4 bytes of each half): 8 * sum of their quantized values.
    pub lane_offset: AlignedVec<i32>,
    /// Per lane of 8 values: the activation scale of the lane's 32-block.
    pub lane_scale: AlignedVec<f32>,
}

impl Q8Activations {
    /// Quantizes `x` (length a multiple of 32) with one scale per 32 values: absmax / 127.
    pub fn new(x: &[f32]) -> Self {
        let cols = x.len();
        assert!(
            cols.is_multiple_of(32),
            "INT4 kernels need a multiple of 32 columns"
        );
        let mut q = Q8Activations {
            cols,
            even: AlignedVec::zeroed(cols / 2),
            odd: AlignedVec::zeroed(cols / 2),
            lane_offset: AlignedVec::zeroed(cols / 8),
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
        for (b, block) in x.chunks_exact(32).enumerate() {
            let absmax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = absmax / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            for (j, &v) in block.iter().enumerate() {
                let q = crate::round_to_i32(v * inv).clamp(-127, 127) as i8;
                let p = b * 16 + j / 2;
                if j % 2 == 0 {
                    self.even[p] = q;
                } else {
                    self.odd[p] = q;
                }
            }
            for lane in 0..4 {
                let l = b * 4 + lane;
                let sum: i32 = (0..4)
                    .map(|i| self.even[l * 4 + i] as i32 + self.odd[l * 4 + i] as i32)
                    .sum();
                self.lane_offset[l] = 8 * sum;
                self.lane_scale[l] = scale;
            }
        }
    }
}

/// Integer reference of the quantized dot product for lanes `from..to` (used for tails).
fn dot_lanes_portable(
    packed: &[u8],
    scales: &[u8],
    x: &Q8Activations,
    from: usize,
    to: usize,
) -> f32 {
    let mut total = 0.0f32;
    for lane in from..to {
        let mut acc = 0i32;
        for i in 0..4 {
            let p = lane * 4 + i;
            let byte = packed[p];
            acc += (byte & 0x0f) as i32 * x.even[p] as i32 + (byte >> 4) as i32 * x.odd[p] as i32;
        }
        total += (acc - x.lane_offset[lane]) as f32
            * crate::formats::bf16_at(scales, lane / 4)
            * x.lane_scale[lane];
    }
    total
}

/// `out[t] = row . x[t]` for one packed row and up to 8 tokens, on the given ISA.
/// `packed` holds cols/2 bytes, `scales` cols/32 BF16 values.
pub fn dot_row(isa: Isa, packed: &[u8], scales: &[u8], xs: &[&Q8Activations], out: &mut [f32]) {
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

/// `out[t] = row . xs[t]` with f32 activations: the nibbles are dequantized in registers
/// (exact, as the reference decodes them), for up to 8 tokens.
pub fn dot_row_f32(isa: Isa, packed: &[u8], scales: &[u8], xs: &[&[f32]], out: &mut [f32]) {
    debug_assert!(xs.len() <= 8 && out.len() == xs.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if Isa::Avx512Vnni.available() => unsafe {
            avx512::dot_row_f32(packed, scales, xs, out)
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if Isa::Avx2.available() => unsafe { avx2::dot_row_f32(packed, scales, xs, out) },
        _ => {
            let mut w = vec![0.0f32; packed.len() * 2];
            crate::scalar::decode_int4_row(packed, scales, 32, &mut w);
            for (o, x) in out.iter_mut().zip(xs) {
                *o = crate::scalar::dot(&w, x);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{dot_lanes_portable, Q8Activations};
    use std::arch::x86_64::*;

    /// [`Q8Activations::new`] 32 values at a time: the same scale, reciprocal and
    /// round-to-nearest-even conversion as the scalar code, so the same bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn quantize(x: &[f32], q: &mut Q8Activations) {
        let (limit, negative_limit) = (_mm512_set1_epi32(127), _mm512_set1_epi32(-127));
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
        for b in 0..x.len() / 32 {
            let v0 = _mm512_loadu_ps(x.as_ptr().add(32 * b));
            let v1 = _mm512_loadu_ps(x.as_ptr().add(32 * b + 16));
            let absmax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            let scale = absmax / 127.0;
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
            _mm_storeu_si128(
                q.even.as_mut_ptr().add(16 * b) as *mut _,
                _mm512_cvtepi32_epi8(e),
            );
            _mm_storeu_si128(
                q.odd.as_mut_ptr().add(16 * b) as *mut _,
                _mm512_cvtepi32_epi8(o),
            );
            // Sum of each 8 values = each group of 4 pair sums.
            let mut pairs = [0i32; 16];
            _mm512_storeu_si512(pairs.as_mut_ptr() as *mut _, _mm512_add_epi32(e, o));
            for i in 0..4 {
                let sum: i32 = pairs[4 * i..4 * i + 4].iter().sum();
                q.lane_offset[4 * b + i] = 8 * sum;
                q.lane_scale[4 * b + i] = scale;
            }
        }
    }

    /// One copy of the loop per token count, accumulators in registers.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn dot_row(packed: &[u8], scales: &[u8], xs: &[&Q8Activations], out: &mut [f32]) {
        crate::by_token_count!(xs.len(), dot_row_n(packed, scales, xs, out))
    }

    /// 64 packed bytes (128 values, 4 blocks, 16 lanes) per step, `N` tokens.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn dot_row_n<const N: usize>(
        packed: &[u8],
        scales: &[u8],
        xs: &[&Q8Activations],
        out: &mut [f32],
    ) {
        let xs: [&Q8Activations; N] = std::array::from_fn(|t| xs[t]);
        let bytes = packed.len();
        let steps = bytes / 64;
        let nibble = _mm512_set1_epi8(0x0f);
        // Lane i of a step belongs to block i / 4.
        let spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
        let mut acc = [_mm512_setzero_ps(); N];
        for s in 0..steps {
            crate::prefetch_stream(packed.as_ptr().wrapping_add(s * 64));
            let w = _mm512_loadu_si512(packed.as_ptr().add(s * 64) as *const _);
            let lo = _mm512_and_si512(w, nibble);
            let hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), nibble);
            // Four BF16 block scales -> f32, each repeated over the block's 4 lanes.
            let raw = _mm_loadl_epi64(scales.as_ptr().add(s * 8) as *const _);
            let ws4 = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(raw), 16));
            let ws = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(ws4));
            for (t, x) in xs.iter().enumerate() {
                let xe = _mm512_loadu_si512(x.even.as_ptr().add(s * 64) as *const _);
                let xo = _mm512_loadu_si512(x.odd.as_ptr().add(s * 64) as *const _);
                let mut dot = crate::vnni::dpbusd(_mm512_setzero_si512(), lo, xe);
                dot = crate::vnni::dpbusd(dot, hi, xo);
                dot = _mm512_sub_epi32(
                    dot,
                    _mm512_loadu_si512(x.lane_offset.as_ptr().add(s * 16) as *const _),
                );
                let scale = _mm512_mul_ps(ws, _mm512_loadu_ps(x.lane_scale.as_ptr().add(s * 16)));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[t]);
            }
        }
        let (from, to) = (steps * 16, bytes / 4);
        for (t, x) in xs.iter().enumerate() {
            out[t] = _mm512_reduce_add_ps(acc[t]) + dot_lanes_portable(packed, scales, x, from, to);
        }
    }

    /// One 32-value block (16 packed bytes) per step. A nibble q becomes (q - 8) * scale by
    /// one table lookup: the 16 possible values of the block, scaled, fill one register and
    /// `vpermps` picks them by nibble.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn dot_row_f32(packed: &[u8], scales: &[u8], xs: &[&[f32]], out: &mut [f32]) {
        let blocks = packed.len() / 16;
        let nibble = _mm_set1_epi8(0x0f);
        let levels = _mm512_setr_ps(
            -8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0,
        );
        let mut acc = [_mm512_setzero_ps(); 8];
        for b in 0..blocks {
            if b % 4 == 0 {
                crate::prefetch_stream(packed.as_ptr().wrapping_add(b * 16));
            }
            let w = _mm_loadu_si128(packed.as_ptr().add(b * 16) as *const _);
            let lo = _mm_and_si128(w, nibble);
            let hi = _mm_and_si128(_mm_srli_epi16(w, 4), nibble);
            // Interleave low (even k) and high (odd k) nibbles back into k order.
            let first = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
            let second = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi));
            let table = _mm512_mul_ps(levels, _mm512_set1_ps(crate::formats::bf16_at(scales, b)));
            let w0 = _mm512_permutexvar_ps(first, table);
            let w1 = _mm512_permutexvar_ps(second, table);
            for (t, x) in xs.iter().enumerate() {
                let p = x.as_ptr().add(b * 32);
                acc[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(p), acc[t]);
                acc[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(p.add(16)), acc[t]);
            }
        }
        for t in 0..xs.len() {
            out[t] = _mm512_reduce_add_ps(acc[t]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{dot_lanes_portable, Q8Activations};
    use std::arch::x86_64::*;

    /// 32 packed bytes (64 values, 2 blocks, 8 lanes) per step.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_row(packed: &[u8], scales: &[u8], xs: &[&Q8Activations], out: &mut [f32]) {
        let bytes = packed.len();
        let steps = bytes / 32;
        let nibble = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let spread = _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0);
        let mut acc = [_mm256_setzero_ps(); 8];
        for s in 0..steps {
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
                let xe = _mm256_loadu_si256(x.even.as_ptr().add(s * 32) as *const _);
                let xo = _mm256_loadu_si256(x.odd.as_ptr().add(s * 32) as *const _);
                // Nibble x int8 products summed in pairs fit in i16 (2 * 15 * 127 each).
                let pairs =
                    _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe), _mm256_maddubs_epi16(hi, xo));
                let mut dot = _mm256_madd_epi16(pairs, ones);
                dot = _mm256_sub_epi32(
                    dot,
                    _mm256_loadu_si256(x.lane_offset.as_ptr().add(s * 8) as *const _),
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

    /// One 32-value block per step, four 8-wide pieces.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_row_f32(packed: &[u8], scales: &[u8], xs: &[&[f32]], out: &mut [f32]) {
        let blocks = packed.len() / 16;
        let nibble = _mm_set1_epi8(0x0f);
        let eight = _mm256_set1_epi32(8);
        let mut acc = [_mm256_setzero_ps(); 8];
        for b in 0..blocks {
            let w = _mm_loadu_si128(packed.as_ptr().add(b * 16) as *const _);
            let lo = _mm_and_si128(w, nibble);
            let hi = _mm_and_si128(_mm_srli_epi16(w, 4), nibble);
            let first = _mm_unpacklo_epi8(lo, hi);
            let second = _mm_unpackhi_epi8(lo, hi);
            let scale = _mm256_set1_ps(crate::formats::bf16_at(scales, b));
            let pieces = [
                first,
                _mm_srli_si128(first, 8),
                second,
                _mm_srli_si128(second, 8),
            ];
            let mut ws = [_mm256_setzero_ps(); 4];
            for (i, piece) in pieces.iter().enumerate() {
                ws[i] = _mm256_mul_ps(
                    _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(*piece), eight)),
                    scale,
                );
            }
            for (t, x) in xs.iter().enumerate() {
                let p = x.as_ptr().add(b * 32);
                for (i, w) in ws.iter().enumerate() {
                    acc[t] = _mm256_fmadd_ps(*w, _mm256_loadu_ps(p.add(8 * i)), acc[t]);
                }
            }
        }
        for t in 0..xs.len() {
            out[t] = crate::hsum256(acc[t]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scalar::{decode_int4_row, dot};
    use crate::test_support::{lcg, random_row, rel_l2};

    #[test]
    fn fast_quantizer_writes_the_scalar_bytes() {
        let x = crate::test_support::awkward_activations(&mut 17);
        let fast = Q8Activations::new(&x);
        let mut plain = Q8Activations::new(&x);
        plain.quantize_portable(&x);
        assert_eq!(&fast.even[..], &plain.even[..]);
        assert_eq!(&fast.odd[..], &plain.odd[..]);
        assert_eq!(&fast.lane_offset[..], &plain.lane_offset[..]);
        assert_eq!(&fast.lane_scale[..], &plain.lane_scale[..]);
    }

    #[test]
    fn f32_activation_paths_match_the_reference_closely() {
        let mut seed = 11;
        for cols in [32, 64, 96, 2048, 7168] {
            let xs: Vec<Vec<f32>> = (0..3)
                .map(|_| (0..cols).map(|_| lcg(&mut seed)).collect())
                .collect();
            let xr: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
            let (packed, scales) = random_row(cols, &mut seed);
            let mut w = vec![0.0; cols];
            decode_int4_row(&packed, &scales, 32, &mut w);
            let want: Vec<f32> = xs.iter().map(|x| dot(&w, x)).collect();
            for isa in Isa::ALL {
                let mut got = vec![0.0; 3];
                dot_row_f32(isa, &packed, &scales, &xr, &mut got);
                let err = rel_l2(&got, &want);
                assert!(err < 2e-5, "{isa:?} cols {cols}: relative L2 error {err}");
            }
        }
    }

    #[test]
    fn every_isa_matches_the_f32_reference() {
        let mut seed = 7;
        for cols in [32, 64, 96, 160, 224, 2048, 7168] {
            let rows = 5;
            let tokens = 3;
            let xs: Vec<Vec<f32>> = (0..tokens)
                .map(|_| (0..cols).map(|_| lcg(&mut seed)).collect())
                .collect();
            let q: Vec<Q8Activations> = xs.iter().map(|x| Q8Activations::new(x)).collect();
            let qr: Vec<&Q8Activations> = q.iter().collect();
            let mut want = vec![];
            let mut got: Vec<Vec<f32>> = vec![vec![]; 3];
            let mut w = vec![0.0; cols];
            for _ in 0..rows {
                let (packed, scales) = random_row(cols, &mut seed);
                decode_int4_row(&packed, &scales, 32, &mut w);
                for x in &xs {
                    want.push(dot(&w, x));
                }
                for (i, isa) in [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni]
                    .into_iter()
                    .enumerate()
                {
                    let mut out = vec![0.0; tokens];
                    dot_row(isa, &packed, &scales, &qr, &mut out);
                    got[i].extend(out);
                }
            }
            for (i, g) in got.iter().enumerate() {
                let err = rel_l2(g, &want);
                assert!(err < 1e-2, "isa {i} cols {cols}: relative L2 error {err}");
            }
            // All int8 paths compute the same integers: they agree closely with each other.
            assert!(
                rel_l2(&got[1], &got[0]) < 1e-5 && rel_l2(&got[2], &got[0]) < 1e-5,
                "cols {cols}"
            );
        }
    }
}
