//! FP8 E4M3 block-scaled weight rows (DeepSeek-V3 style, `weight_scale_inv` per 128x128
//! block) times f32 activations.
//!
//! E4M3 becomes IEEE half by moving bits, no table: the 7 exponent+mantissa bits shifted
//! left by 7 form a half whose exponent field is the E4M3 exponent (bias 15 instead of 7),
//! so the half equals the FP8 value times 2^-8, subnormals included; the sign bit moves to
//! bit 15. Hardware half->f32 conversion (`vcvtph2ps`) is exact, and the 2^8 is folded
//! into the block scale. The one pattern this does not reproduce is E4M3's NaN (0x7f /
//! 0xff), which reads as +-480: checkpoints do not store NaN weights.

use crate::Isa;

/// `out[t] = row . xs[t]` for one FP8 row (`cols` bytes) whose block scales (F32, one per
/// `block_cols` columns) are `scale_inv_row`, for up to 8 tokens.
pub fn dot_row(
    isa: Isa,
    row: &[u8],
    scale_inv_row: &[u8],
    block_cols: usize,
    xs: &[&[f32]],
    out: &mut [f32],
) {
    debug_assert!(xs.len() <= 8 && out.len() == xs.len());
    // The fast paths work in whole blocks of 16 values.
    let fast = block_cols.is_multiple_of(16) && block_cols > 0;
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if fast && Isa::Avx512Vnni.available() => unsafe {
            avx512::dot_row(row, scale_inv_row, block_cols, xs, out)
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if fast && Isa::Avx2.available() => unsafe {
            avx2::dot_row(row, scale_inv_row, block_cols, xs, out)
        },
        _ => {
            out.fill(0.0);
            portable(row, scale_inv_row, block_cols, xs, out, 0);
        }
    }
}

/// Decodes one FP8 row to f32 (`w = fp8 * scale_inv` of its block), as
/// [`crate::scalar::decode_fp8_row`] does and with the same values: the fast path widens 16
/// values at a time to `fp8 * 2^-8` exactly and multiplies by `scale_inv * 2^8`, which
/// rounds the same single product. Used to unpack tiles for the prefill GEMM.
pub fn decode_row(isa: Isa, row: &[u8], scale_inv_row: &[u8], block_cols: usize, out: &mut [f32]) {
    debug_assert_eq!(row.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni
        && Isa::Avx512Vnni.available()
        && block_cols.is_multiple_of(16)
        && block_cols > 0
    {
        unsafe { avx512::decode_row(row, scale_inv_row, block_cols, out) };
        return;
    }
    let _ = isa;
    crate::scalar::decode_fp8_row(row, scale_inv_row, block_cols, out);
}

fn block_scale(scale_inv_row: &[u8], block: usize) -> f32 {
    f32::from_le_bytes([
        scale_inv_row[4 * block],
        scale_inv_row[4 * block + 1],
        scale_inv_row[4 * block + 2],
        scale_inv_row[4 * block + 3],
    ])
}

/// Columns `from..` added to `out` through the reference decoder.
fn portable(
    row: &[u8],
    scale_inv_row: &[u8],
    block_cols: usize,
    xs: &[&[f32]],
    out: &mut [f32],
    from: usize,
) {
    for (o, x) in out.iter_mut().zip(xs) {
        let mut acc = 0.0f32;
        for k in from..row.len() {
            acc +=
                crate::fp8_e4m3_to_f32(row[k]) * block_scale(scale_inv_row, k / block_cols) * x[k];
        }
        *o += acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::block_scale;
    use std::arch::x86_64::*;

    /// 32 E4M3 bytes -> 32 f32 (two vectors) equal to the FP8 values times 2^-8.
    #[inline(always)]
    unsafe fn widen32(bytes: *const u8) -> (__m512, __m512) {
        let b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(bytes as *const _));
        let sign = _mm512_slli_epi16(_mm512_and_si512(b, _mm512_set1_epi16(0x80)), 8);
        let magnitude = _mm512_slli_epi16(_mm512_and_si512(b, _mm512_set1_epi16(0x7f)), 7);
        let half = _mm512_or_si512(sign, magnitude);
        (
            _mm512_cvtph_ps(_mm512_castsi512_si256(half)),
            _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(half)),
        )
    }

    /// One copy of the loop per token count, accumulators in registers.
    #[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
    pub unsafe fn dot_row(
        row: &[u8],
        scale_inv_row: &[u8],
        block_cols: usize,
        xs: &[&[f32]],
        out: &mut [f32],
    ) {
        crate::by_token_count!(xs.len(), dot_row_n(row, scale_inv_row, block_cols, xs, out))
    }

    /// Whole 32-value steps inside each scale block, then 16-value steps, per block.
    #[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
    unsafe fn dot_row_n<const N: usize>(
        row: &[u8],
        scale_inv_row: &[u8],
        block_cols: usize,
        xs: &[&[f32]],
        out: &mut [f32],
    ) {
        let xs: [&[f32]; N] = std::array::from_fn(|t| xs[t]);
        let cols = row.len();
        let whole = cols / 16 * 16;
        let mut total = [_mm512_setzero_ps(); N];
        let mut start = 0;
        while start < whole {
            let end = (start + block_cols).min(whole);
            let mut block = [_mm512_setzero_ps(); N];
            let mut k = start;
            while k + 32 <= end {
                if k % 64 == 0 {
                    crate::prefetch_stream(row.as_ptr().wrapping_add(k));
                }
                let (w0, w1) = widen32(row.as_ptr().add(k));
                for (t, x) in xs.iter().enumerate() {
                    block[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x.as_ptr().add(k)), block[t]);
                    block[t] =
                        _mm512_fmadd_ps(w1, _mm512_loadu_ps(x.as_ptr().add(k + 16)), block[t]);
                }
                k += 32;
            }
            if k < end {
                // One 16-value step left in this block.
                let w0 = widen16(row.as_ptr().add(k));
                for (t, x) in xs.iter().enumerate() {
                    block[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x.as_ptr().add(k)), block[t]);
                }
            }
            let scale = _mm512_set1_ps(block_scale(scale_inv_row, start / block_cols) * 256.0);
            for t in 0..N {
                total[t] = _mm512_fmadd_ps(block[t], scale, total[t]);
            }
            start = end;
        }
        for t in 0..N {
            out[t] = _mm512_reduce_add_ps(total[t]);
        }
        super::portable(row, scale_inv_row, block_cols, &xs, out, whole);
    }

    /// [`super::decode_row`]: whole 16-value steps (blocks are multiples of 16), the last
    /// partial step through the scalar decoder.
    #[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
    pub unsafe fn decode_row(row: &[u8], scale_inv_row: &[u8], block_cols: usize, out: &mut [f32]) {
        let whole = row.len() / 16 * 16;
        let mut k = 0;
        while k < whole {
            let scale = _mm512_set1_ps(block_scale(scale_inv_row, k / block_cols) * 256.0);
            _mm512_storeu_ps(
                out.as_mut_ptr().add(k),
                _mm512_mul_ps(widen16(row.as_ptr().add(k)), scale),
            );
            k += 16;
        }
        for k in whole..row.len() {
            out[k] = crate::fp8_e4m3_to_f32(row[k]) * block_scale(scale_inv_row, k / block_cols);
        }
    }

    /// 16 E4M3 bytes -> 16 f32 equal to the FP8 values times 2^-8.
    #[inline(always)]
    unsafe fn widen16(bytes: *const u8) -> __m512 {
        let b = _mm256_cvtepu8_epi16(_mm_loadu_si128(bytes as *const _));
        let sign = _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8);
        let magnitude = _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7f)), 7);
        _mm512_cvtph_ps(_mm256_or_si256(sign, magnitude))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::block_scale;
    use std::arch::x86_64::*;

    /// 8 E4M3 bytes -> 8 f32 equal to the FP8 values times 2^-8.
    #[inline(always)]
    unsafe fn widen(bytes: *const u8) -> __m256 {
        let b = _mm_cvtepu8_epi16(_mm_loadl_epi64(bytes as *const _));
        let sign = _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8);
        let magnitude = _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7f)), 7);
        _mm256_cvtph_ps(_mm_or_si128(sign, magnitude))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_row(
        row: &[u8],
        scale_inv_row: &[u8],
        block_cols: usize,
        xs: &[&[f32]],
        out: &mut [f32],
    ) {
        let cols = row.len();
        let whole = cols / 16 * 16;
        let mut total = [_mm256_setzero_ps(); 8];
        let mut start = 0;
        while start < whole {
            let end = (start + block_cols).min(whole);
            let mut block = [_mm256_setzero_ps(); 8];
            let mut k = start;
            while k < end {
                let w = widen(row.as_ptr().add(k));
                for (t, x) in xs.iter().enumerate() {
                    block[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x.as_ptr().add(k)), block[t]);
                }
                k += 8;
            }
            let scale = _mm256_set1_ps(block_scale(scale_inv_row, start / block_cols) * 256.0);
            for t in 0..xs.len() {
                total[t] = _mm256_fmadd_ps(block[t], scale, total[t]);
            }
            start = end;
        }
        for t in 0..xs.len() {
            out[t] = crate::hsum256(total[t]);
        }
        super::portable(row, scale_inv_row, block_cols, xs, out, whole);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_finite_pattern_decodes_exactly() {
        // One row holding each finite E4M3 byte once (254 of them, padded with zeros to 256),
        // against one-hot activations: each output is exactly one decoded value.
        let bytes: Vec<u8> = (0..=255u8)
            .filter(|b| b & 0x7f != 0x7f)
            .chain([0, 0])
            .collect();
        let scales = 1.0f32.to_le_bytes().repeat(2);
        for isa in Isa::ALL {
            for (k, &b) in bytes.iter().enumerate() {
                let mut x = vec![0.0f32; bytes.len()];
                x[k] = 1.0;
                let mut out = [0.0f32];
                dot_row(isa, &bytes, &scales, 128, &[&x], &mut out);
                assert_eq!(out[0], crate::fp8_e4m3_to_f32(b), "{isa:?} byte {b:#04x}");
            }
        }
    }

    /// The row decoder of the GEMM gives the scalar decoder's values bit for bit, on
    /// every finite pattern, block widths of 16 and 128, and a width with a partial step.
    #[test]
    fn decoded_rows_equal_the_scalar_decoder() {
        let bytes: Vec<u8> = (0..=255u8)
            .filter(|b| b & 0x7f != 0x7f)
            .cycle()
            .take(1000)
            .collect();
        for (cols, block) in [(1000usize, 128usize), (992, 16), (7, 128)] {
            let scales: Vec<u8> = (0..cols.div_ceil(block))
                .flat_map(|i| (0.0037f32 * (1 + i % 5) as f32).to_le_bytes())
                .collect();
            let mut want = vec![0.0f32; cols];
            crate::scalar::decode_fp8_row(&bytes[..cols], &scales, block, &mut want);
            for isa in Isa::ALL {
                let mut got = vec![1.0f32; cols];
                decode_row(isa, &bytes[..cols], &scales, block, &mut got);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{isa:?} {cols}/{block}");
            }
        }
    }

    #[test]
    fn every_isa_matches_the_reference() {
        let mut seed = 9u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u32
        };
        for (cols, block) in [
            (7168usize, 128usize),
            (2048, 128),
            (200, 128),
            (48, 16),
            (7, 128),
        ] {
            let row: Vec<u8> = (0..cols)
                .map(|_| {
                    let b = rnd() as u8;
                    if b & 0x7f == 0x7f {
                        0x3f
                    } else {
                        b
                    }
                })
                .collect();
            let scales: Vec<u8> = (0..cols.div_ceil(block))
                .flat_map(|i| (0.001f32 * (1 + i % 7) as f32).to_le_bytes())
                .collect();
            let xs: Vec<Vec<f32>> = (0..3)
                .map(|_| {
                    (0..cols)
                        .map(|_| (rnd() % 2001) as f32 / 1000.0 - 1.0)
                        .collect()
                })
                .collect();
            let xr: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
            let mut want = vec![0.0; 3];
            dot_row(Isa::Scalar, &row, &scales, block, &xr, &mut want);
            let mut decoded = vec![0.0; cols];
            crate::scalar::decode_fp8_row(&row, &scales, block, &mut decoded);
            for (t, x) in xs.iter().enumerate() {
                let exact = crate::scalar::dot(&decoded, x);
                assert!((want[t] - exact).abs() <= 1e-4 * exact.abs().max(1.0));
            }
            for isa in [Isa::Avx2, Isa::Avx512Vnni] {
                let mut got = vec![0.0; 3];
                dot_row(isa, &row, &scales, block, &xr, &mut got);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                        "{isa:?} cols {cols}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
