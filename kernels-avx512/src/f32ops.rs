//! f32 vector kernels for attention on the CPU: dot products (scores) and `y += a * x`
//! (weighted values). Sums are split over vector lanes, so results differ from the scalar
//! reference by rounding only.

use crate::Isa;

/// `sum_i a[i] * b[i]`.
pub fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if Isa::Avx512Vnni.available() => unsafe { avx512::dot(a, b) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if Isa::Avx2.available() => unsafe { avx2::dot(a, b) },
        _ => crate::scalar::dot(a, b),
    }
}

/// `y[i] += alpha * x[i]`.
pub fn axpy(isa: Isa, alpha: f32, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if Isa::Avx512Vnni.available() => unsafe { avx512::axpy(alpha, x, y) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if Isa::Avx2.available() => unsafe { avx2::axpy(alpha, x, y) },
        _ => {
            for (o, v) in y.iter_mut().zip(x) {
                *o += alpha * v;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let mut acc0 = _mm512_setzero_ps();
        let mut acc1 = _mm512_setzero_ps();
        let mut i = 0;
        while i + 32 <= n {
            acc0 = _mm512_fmadd_ps(
                _mm512_loadu_ps(a.as_ptr().add(i)),
                _mm512_loadu_ps(b.as_ptr().add(i)),
                acc0,
            );
            acc1 = _mm512_fmadd_ps(
                _mm512_loadu_ps(a.as_ptr().add(i + 16)),
                _mm512_loadu_ps(b.as_ptr().add(i + 16)),
                acc1,
            );
            i += 32;
        }
        while i + 16 <= n {
            acc0 = _mm512_fmadd_ps(
                _mm512_loadu_ps(a.as_ptr().add(i)),
                _mm512_loadu_ps(b.as_ptr().add(i)),
                acc0,
            );
            i += 16;
        }
        let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
        for j in i..n {
            sum += a[j] * b[j];
        }
        sum
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let a = _mm512_set1_ps(alpha);
        let mut i = 0;
        while i + 16 <= n {
            let yp = y.as_mut_ptr().add(i);
            _mm512_storeu_ps(
                yp,
                _mm512_fmadd_ps(a, _mm512_loadu_ps(x.as_ptr().add(i)), _mm512_loadu_ps(yp)),
            );
            i += 16;
        }
        for j in i..n {
            y[j] += alpha * x[j];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                acc0,
            );
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                acc1,
            );
            i += 16;
        }
        let mut sum = crate::hsum256(_mm256_add_ps(acc0, acc1));
        for j in i..n {
            sum += a[j] * b[j];
        }
        sum
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let a = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            let yp = y.as_mut_ptr().add(i);
            _mm256_storeu_ps(
                yp,
                _mm256_fmadd_ps(a, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(yp)),
            );
            i += 8;
        }
        for j in i..n {
            y[j] += alpha * x[j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_matches_scalar_on_odd_lengths() {
        for n in [1usize, 7, 16, 33, 576, 1000] {
            let a: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            let b: Vec<f32> = (0..n)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
                .collect();
            let want = crate::scalar::dot(&a, &b);
            for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni] {
                if !isa.available() {
                    continue;
                }
                let got = dot(isa, &a, &b);
                assert!(
                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{isa:?} n={n}"
                );
                let mut y = b.clone();
                axpy(isa, 0.5, &a, &mut y);
                for i in 0..n {
                    assert!((y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6);
                }
            }
        }
    }
}
