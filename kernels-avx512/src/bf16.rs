//! BF16 weight rows times f32 activations (attention, shared experts and dense layers on
//! CPU-only hosts). BF16 -> f32 is a 16-bit shift, so the kernels stream the weights once
//! and accumulate in f32.

use crate::Isa;

/// `out[t] = row . xs[t]` for one BF16 row (`2 * cols` bytes) and up to 8 tokens.
pub fn dot_row(isa: Isa, row: &[u8], xs: &[&[f32]], out: &mut [f32]) {
    debug_assert!(xs.len() <= 8 && out.len() == xs.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if Isa::Avx512Vnni.available() => unsafe { avx512::dot_row(row, xs, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if Isa::Avx2.available() => unsafe { avx2::dot_row(row, xs, out) },
        _ => portable(row, xs, out, 0),
    }
}

/// `y += a * row` for one BF16 row (`2 * y.len()` bytes): the transposed product's step,
/// which folds absorbed MLA queries into the latent space one weight row at a time.
pub fn axpy_row(isa: Isa, row: &[u8], a: f32, y: &mut [f32]) {
    debug_assert_eq!(row.len(), 2 * y.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if Isa::Avx512Vnni.available() => unsafe { avx512::axpy_row(row, a, y) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if Isa::Avx2.available() => unsafe { avx2::axpy_row(row, a, y) },
        _ => axpy_portable(row, a, y, 0),
    }
}

/// Columns `from..` of [`axpy_row`].
fn axpy_portable(row: &[u8], a: f32, y: &mut [f32], from: usize) {
    for (k, o) in y.iter_mut().enumerate().skip(from) {
        *o += a * crate::bf16_to_f32(u16::from_le_bytes([row[2 * k], row[2 * k + 1]]));
    }
}

/// Columns `from..` of the dot products, added to `out`.
fn portable(row: &[u8], xs: &[&[f32]], out: &mut [f32], from: usize) {
    let cols = row.len() / 2;
    for (o, x) in out.iter_mut().zip(xs) {
        let mut acc = 0.0f32;
        for k in from..cols {
            acc += crate::bf16_to_f32(u16::from_le_bytes([row[2 * k], row[2 * k + 1]])) * x[k];
        }
        *o += acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn dot_row(row: &[u8], xs: &[&[f32]], out: &mut [f32]) {
        let cols = row.len() / 2;
        let steps = cols / 16;
        let mut acc = [_mm512_setzero_ps(); 8];
        for s in 0..steps {
            if s % 2 == 0 {
                crate::prefetch_stream(row.as_ptr().wrapping_add(s * 32));
            }
            let raw = _mm256_loadu_si256(row.as_ptr().add(s * 32) as *const _);
            let w = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
            for (t, x) in xs.iter().enumerate() {
                acc[t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x.as_ptr().add(s * 16)), acc[t]);
            }
        }
        for t in 0..xs.len() {
            out[t] = _mm512_reduce_add_ps(acc[t]);
        }
        super::portable(row, xs, out, steps * 16);
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn axpy_row(row: &[u8], a: f32, y: &mut [f32]) {
        let steps = y.len() / 16;
        let av = _mm512_set1_ps(a);
        for s in 0..steps {
            let raw = _mm256_loadu_si256(row.as_ptr().add(s * 32) as *const _);
            let w = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
            let at = y.as_mut_ptr().add(s * 16);
            _mm512_storeu_ps(at, _mm512_fmadd_ps(w, av, _mm512_loadu_ps(at)));
        }
        super::axpy_portable(row, a, y, steps * 16);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_row(row: &[u8], xs: &[&[f32]], out: &mut [f32]) {
        let cols = row.len() / 2;
        let steps = cols / 8;
        let mut acc = [_mm256_setzero_ps(); 8];
        for s in 0..steps {
            let raw = _mm_loadu_si128(row.as_ptr().add(s * 16) as *const _);
            let w = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
            for (t, x) in xs.iter().enumerate() {
                acc[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x.as_ptr().add(s * 8)), acc[t]);
            }
        }
        for t in 0..xs.len() {
            out[t] = crate::hsum256(acc[t]);
        }
        super::portable(row, xs, out, steps * 8);
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy_row(row: &[u8], a: f32, y: &mut [f32]) {
        let steps = y.len() / 8;
        let av = _mm256_set1_ps(a);
        for s in 0..steps {
            let raw = _mm_loadu_si128(row.as_ptr().add(s * 16) as *const _);
            let w = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
            let at = y.as_mut_ptr().add(s * 8);
            _mm256_storeu_ps(at, _mm256_fmadd_ps(w, av, _mm256_loadu_ps(at)));
        }
        super::axpy_portable(row, a, y, steps * 8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_isa_matches_the_reference() {
        let mut seed = 3u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for cols in [1, 7, 8, 15, 16, 33, 100, 2048, 7168] {
            let row: Vec<u8> = (0..cols)
                .flat_map(|_| ((rnd().to_bits() >> 16) as u16).to_le_bytes())
                .collect();
            let xs: Vec<Vec<f32>> = (0..3).map(|_| (0..cols).map(|_| rnd()).collect()).collect();
            let xr: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
            let mut want = vec![0.0; 3];
            dot_row(Isa::Scalar, &row, &xr, &mut want);
            // y += a * row: every path computes each element with one f32 multiply-add,
            // so all agree with the scalar path to the last bit but for fused rounding.
            let mut want_axpy = xs[0].clone();
            axpy_row(Isa::Scalar, &row, 0.37, &mut want_axpy);
            for isa in [Isa::Avx2, Isa::Avx512Vnni] {
                let mut got = xs[0].clone();
                axpy_row(isa, &row, 0.37, &mut got);
                for (g, w) in got.iter().zip(&want_axpy) {
                    assert!(
                        (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                        "{isa:?} axpy cols {cols}: {g} vs {w}"
                    );
                }
            }
            for isa in [Isa::Avx2, Isa::Avx512Vnni] {
                let mut got = vec![0.0; 3];
                dot_row(isa, &row, &xr, &mut got);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 2e-3 * w.abs().max(1.0),
                        "{isa:?} cols {cols}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
