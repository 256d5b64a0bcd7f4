//! Micro-kernels of tiled attention on the CPU: one register-blocked f32 product that
//! computes both halves of a tile (scores `Q · Kᵀ` against packed keys, and `P · V`
//! against value rows read where they lie) and the online-softmax step between them.
//!
//! A tile is a block of query rows (for MLA's absorbed form: every head of every query,
//! which share one read of each latent) against a block of keys. Scores, maxima, sums
//! and the output accumulate in f32; the running maximum makes the result independent of
//! how keys are cut into tiles up to rounding.

use crate::Isa;

/// `c[i][j] += Σ_p a[i][p] · b[p][j]` for `i < m`, `j < n`, `p < k`: `a` row-major with
/// rows `lda` apart, `b` with rows `ldb` apart, `c` with rows `ldc` apart.
#[allow(clippy::too_many_arguments)]
pub fn gemm_acc(
    isa: Isa,
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // Every element the kernels touch lies in the slices (the vector paths read through
    // raw pointers).
    assert!(a.len() >= (m - 1) * lda + k, "gemm_acc: a too short");
    assert!(b.len() >= (k - 1) * ldb + n, "gemm_acc: b too short");
    assert!(c.len() >= (m - 1) * ldc + n, "gemm_acc: c too short");
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if Isa::Avx512Vnni.available() => unsafe {
            avx512::gemm_acc((m, n, k), a, lda, b, ldb, c, ldc)
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if Isa::Avx2.available() => unsafe {
            avx2::gemm_acc((m, n, k), a, lda, b, ldb, c, ldc)
        },
        _ => scalar_gemm_acc((m, n, k), a, lda, b, ldb, c, ldc),
    }
}

/// The scalar twin of [`gemm_acc`] (and its reference in tests).
#[allow(clippy::too_many_arguments)]
pub fn scalar_gemm_acc(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    for i in 0..m {
        let row = &mut c[i * ldc..i * ldc + n];
        for p in 0..k {
            let x = a[i * lda + p];
            for (o, y) in row.iter_mut().zip(&b[p * ldb..p * ldb + n]) {
                *o += x * y;
            }
        }
    }
}

/// The running state of one query row (one head of one query) over the tiles seen so far:
/// the largest scaled score and the sum of `exp(score - max)`.
#[derive(Debug, Clone, Copy)]
pub struct RowState {
    pub max: f32,
    pub sum: f32,
}

impl Default for RowState {
    fn default() -> Self {
        RowState {
            max: f32::NEG_INFINITY,
            sum: 0.0,
        }
    }
}

/// One tile's online-softmax step for `m` rows. `s` holds each row's raw scores against
/// the tile's `n` keys (rows `lds` apart); entries at or beyond `visible[i]` are masked
/// (causal attention: keys after the query's position). The scores become the
/// probabilities to multiply the tile's values by, and each row of the output `o`
/// (`dv` values, rows `ldo` apart) and its state are rescaled to the new maximum.
/// `scale` must be positive (it is attention's softmax scale).
#[allow(clippy::too_many_arguments)]
pub fn softmax_step(
    isa: Isa,
    (m, n): (usize, usize),
    s: &mut [f32],
    lds: usize,
    scale: f32,
    visible: &[usize],
    state: &mut [RowState],
    o: &mut [f32],
    (ldo, dv): (usize, usize),
) {
    for i in 0..m {
        let row = &mut s[i * lds..i * lds + n];
        let seen = visible[i].min(n);
        let st = &mut state[i];
        let tile_max = row_max(isa, &row[..seen]) * scale;
        let max = st.max.max(tile_max);
        if max == f32::NEG_INFINITY {
            // Nothing visible yet: the row contributes nothing from this tile.
            row.fill(0.0);
            continue;
        }
        let rescale = (st.max - max).exp();
        let sum = exp_scaled(isa, &mut row[..seen], scale, max);
        row[seen..].fill(0.0);
        if rescale != 1.0 {
            for v in &mut o[i * ldo..i * ldo + dv] {
                *v *= rescale;
            }
        }
        st.sum = st.sum * rescale + sum;
        st.max = max;
    }
}

/// The largest of `xs` (−∞ for none). A positive `scale` keeps the maximum's place, so
/// the row is scaled once, after.
fn row_max(isa: Isa, xs: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if Isa::Avx512Vnni.available() => unsafe { avx512::row_max(xs) },
        _ => xs.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)),
    }
}

/// `x ← exp(x · scale − max)` over `xs`, returning the sum of the new values.
fn exp_scaled(isa: Isa, xs: &mut [f32], scale: f32, max: f32) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if Isa::Avx512Vnni.available() => unsafe {
            avx512::exp_scaled(xs, scale, max)
        },
        _ => {
            let mut sum = 0.0f32;
            for x in xs.iter_mut() {
                *x = (*x * scale - max).exp();
                sum += *x;
            }
            sum
        }
    }
}

/// Merges a partial result over other keys (`from`, `o_from`) into (`into`, `o_into`):
/// rows of `dv` values, `ldo` apart. Splitting the keys of long contexts over threads and
/// merging gives the same sums up to rounding.
pub fn merge_rows(
    into: &mut [RowState],
    o_into: &mut [f32],
    from: &[RowState],
    o_from: &[f32],
    (ldo, dv): (usize, usize),
) {
    for (i, (a, b)) in into.iter_mut().zip(from).enumerate() {
        let max = a.max.max(b.max);
        if max == f32::NEG_INFINITY {
            continue;
        }
        let (ra, rb) = ((a.max - max).exp(), (b.max - max).exp());
        let row = &mut o_into[i * ldo..i * ldo + dv];
        for (x, y) in row.iter_mut().zip(&o_from[i * ldo..i * ldo + dv]) {
            *x = *x * ra + y * rb;
        }
        a.sum = a.sum * ra + b.sum * rb;
        a.max = max;
    }
}

/// Divides each output row by its softmax sum (rows with nothing visible stay zero).
pub fn finish_rows(state: &[RowState], o: &mut [f32], (ldo, dv): (usize, usize)) {
    for (i, st) in state.iter().enumerate() {
        let inv = if st.sum > 0.0 { 1.0 / st.sum } else { 0.0 };
        for v in &mut o[i * ldo..i * ldo + dv] {
            *v *= inv;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Rows of `c` per register block; two 16-lane vectors of columns each.
    const MR: usize = 8;

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm_acc(
        (m, n, k): (usize, usize, usize),
        a: &[f32],
        lda: usize,
        b: &[f32],
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
    ) {
        let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
        let mut j = 0;
        while j < n {
            let cols = (n - j).min(32);
            let mask = |from: usize| -> __mmask16 {
                let left = cols.saturating_sub(from).min(16);
                ((1u32 << left) - 1) as __mmask16
            };
            let (m0, m1) = (mask(0), mask(16));
            let mut i = 0;
            while i + MR <= m {
                block::<MR>(i, j, (m0, m1), k, a, lda, b, ldb, c, ldc);
                i += MR;
            }
            while i + 4 <= m {
                block::<4>(i, j, (m0, m1), k, a, lda, b, ldb, c, ldc);
                i += 4;
            }
            while i < m {
                block::<1>(i, j, (m0, m1), k, a, lda, b, ldb, c, ldc);
                i += 1;
            }
            j += 32;
        }
    }

    /// Rows `i..i + R` by columns `j..j + 32` (masked) of `c`, in registers for the
    /// whole `k` loop: per step two vector loads of `b`, `R` broadcasts of `a`, `2R` FMAs.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const R: usize>(
        i: usize,
        j: usize,
        (m0, m1): (__mmask16, __mmask16),
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for (r, row) in acc.iter_mut().enumerate() {
            let at = c.add((i + r) * ldc + j);
            row[0] = _mm512_maskz_loadu_ps(m0, at);
            row[1] = _mm512_maskz_loadu_ps(m1, at.add(16));
        }
        for p in 0..k {
            let bp = b.add(p * ldb + j);
            let b0 = _mm512_maskz_loadu_ps(m0, bp);
            let b1 = _mm512_maskz_loadu_ps(m1, bp.add(16));
            for (r, row) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a.add((i + r) * lda + p));
                row[0] = _mm512_fmadd_ps(x, b0, row[0]);
                row[1] = _mm512_fmadd_ps(x, b1, row[1]);
            }
        }
        for (r, row) in acc.iter().enumerate() {
            let at = c.add((i + r) * ldc + j);
            _mm512_mask_storeu_ps(at, m0, row[0]);
            _mm512_mask_storeu_ps(at.add(16), m1, row[1]);
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn row_max(xs: &[f32]) -> f32 {
        let mut best = _mm512_set1_ps(f32::NEG_INFINITY);
        for chunk in xs.chunks(16) {
            let mask = ((1u32 << chunk.len()) - 1) as __mmask16;
            let x = _mm512_mask_loadu_ps(best, mask, chunk.as_ptr());
            best = _mm512_max_ps(best, x);
        }
        _mm512_reduce_max_ps(best)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_scaled(xs: &mut [f32], scale: f32, max: f32) -> f32 {
        let (scale, max) = (_mm512_set1_ps(scale), _mm512_set1_ps(max));
        let mut sum = _mm512_setzero_ps();
        for chunk in xs.chunks_mut(16) {
            let mask = ((1u32 << chunk.len()) - 1) as __mmask16;
            let x = _mm512_maskz_loadu_ps(mask, chunk.as_ptr());
            let e = exp(_mm512_fmsub_ps(x, scale, max));
            _mm512_mask_storeu_ps(chunk.as_mut_ptr(), mask, e);
            sum = _mm512_mask_add_ps(sum, mask, sum, e);
        }
        _mm512_reduce_add_ps(sum)
    }

    /// `exp(x)` for `x ≤ 0` (scores less their maximum), within a few ulp of libm's:
    /// `x = n·ln2 + r` with `|r| ≤ ln2/2`, `exp(r)` by its degree-7 Taylor polynomial
    /// (truncation below 1e-8 there), times `2ⁿ` exactly by `vscalefps`. Inputs below
    /// −87.3 give 0, as the f32 result would underflow anyway.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-87.33));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        // ln2 split in two so that n·ln2_hi is exact.
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 5040.0);
        for c in [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Rows of `c` per register block; two 8-lane vectors of columns each.
    const MR: usize = 4;

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm_acc(
        (m, n, k): (usize, usize, usize),
        a: &[f32],
        lda: usize,
        b: &[f32],
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
    ) {
        let full = n / 16 * 16;
        let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
        let mut j = 0;
        while j < full {
            let mut i = 0;
            while i + MR <= m {
                block::<MR>(i, j, k, ap, lda, bp, ldb, cp, ldc);
                i += MR;
            }
            while i < m {
                block::<1>(i, j, k, ap, lda, bp, ldb, cp, ldc);
                i += 1;
            }
            j += 16;
        }
        if full < n {
            // The last columns (fewer than 16) as the scalar twin computes them.
            for i in 0..m {
                for p in 0..k {
                    let x = a[i * lda + p];
                    for jj in full..n {
                        c[i * ldc + jj] += x * b[p * ldb + jj];
                    }
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const R: usize>(
        i: usize,
        j: usize,
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for (r, row) in acc.iter_mut().enumerate() {
            let at = c.add((i + r) * ldc + j);
            row[0] = _mm256_loadu_ps(at);
            row[1] = _mm256_loadu_ps(at.add(8));
        }
        for p in 0..k {
            let bp = b.add(p * ldb + j);
            let b0 = _mm256_loadu_ps(bp);
            let b1 = _mm256_loadu_ps(bp.add(8));
            for (r, row) in acc.iter_mut().enumerate() {
                let x = _mm256_set1_ps(*a.add((i + r) * lda + p));
                row[0] = _mm256_fmadd_ps(x, b0, row[0]);
                row[1] = _mm256_fmadd_ps(x, b1, row[1]);
            }
        }
        for (r, row) in acc.iter().enumerate() {
            let at = c.add((i + r) * ldc + j);
            _mm256_storeu_ps(at, row[0]);
            _mm256_storeu_ps(at.add(8), row[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{lcg, rel_l2};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n).map(|_| lcg(&mut s)).collect()
    }

    /// Every path against the scalar twin, on shapes with every kind of remainder (rows
    /// past the register block, columns past a vector, strides wider than the rows).
    #[test]
    fn every_path_matches_the_scalar_product() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (8, 32, 64),
            (13, 47, 29),
            (64, 256, 576),
            (5, 16, 192),
            (3, 7, 512),
        ] {
            let (lda, ldb, ldc) = (k + 3, n + 5, n + 2);
            let a = values(m * lda, 1);
            let b = values(k * ldb, 2);
            let c0 = values(m * ldc, 3);
            let mut want = c0.clone();
            scalar_gemm_acc((m, n, k), &a, lda, &b, ldb, &mut want, ldc);
            for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
                let mut got = c0.clone();
                gemm_acc(isa, (m, n, k), &a, lda, &b, ldb, &mut got, ldc);
                let err = rel_l2(&got, &want);
                assert!(err < 1e-6, "{isa:?} {m}x{n}x{k}: {err}");
                // Padding between rows is never written.
                for i in 0..m {
                    assert_eq!(
                        got[i * ldc + n..(i + 1) * ldc],
                        c0[i * ldc + n..(i + 1) * ldc]
                    );
                }
            }
        }
    }

    /// Softmax over tiles with a running maximum, and tiles split in two and merged,
    /// equal one softmax over all keys.
    #[test]
    fn online_softmax_over_tiles_equals_one_softmax() {
        let (keys, dv) = (50, 4);
        let scores = values(keys, 7);
        let v = values(keys * dv, 8);
        let scale = 3.0;
        let visible = 41;
        let max = scores[..visible]
            .iter()
            .fold(f32::NEG_INFINITY, |a, &x| a.max(x * scale));
        let w: Vec<f32> = scores[..visible]
            .iter()
            .map(|x| (x * scale - max).exp())
            .collect();
        let total: f32 = w.iter().sum();
        let mut want = vec![0.0f32; dv];
        for (t, p) in w.iter().enumerate() {
            for d in 0..dv {
                want[d] += p / total * v[t * dv + d];
            }
        }
        let run = |isa: Isa, tiles: &[std::ops::Range<usize>]| {
            let mut st = [RowState::default()];
            let mut o = vec![0.0f32; dv];
            for t in tiles {
                let mut s = scores[t.clone()].to_vec();
                let seen = [visible.saturating_sub(t.start)];
                softmax_step(
                    isa,
                    (1, t.len()),
                    &mut s,
                    t.len(),
                    scale,
                    &seen,
                    &mut st,
                    &mut o,
                    (dv, dv),
                );
                scalar_gemm_acc(
                    (1, dv, t.len()),
                    &s,
                    t.len(),
                    &v[t.start * dv..],
                    dv,
                    &mut o,
                    dv,
                );
            }
            (st, o)
        };
        for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
            let (st, mut o) = run(isa, &[0..16, 16..32, 32..48, 48..50]);
            finish_rows(&st, &mut o, (dv, dv));
            assert!(rel_l2(&o, &want) < 1e-6, "{isa:?}: {o:?} vs {want:?}");
            let (mut sa, mut oa) = run(isa, &[0..16, 16..20]);
            let (sb, ob) = run(isa, &[20..40, 40..50]);
            merge_rows(&mut sa, &mut oa, &sb, &ob, (dv, dv));
            finish_rows(&sa, &mut oa, (dv, dv));
            assert!(rel_l2(&oa, &want) < 1e-6, "{isa:?}: {oa:?} vs {want:?}");
        }
    }

    /// The vector exponential against libm's over the range softmax feeds it (scores less
    /// their maximum, down to underflow), and the row sum it returns.
    #[test]
    fn vector_exp_matches_libm() {
        let xs: Vec<f32> = (0..20_000).map(|i| -(i as f32) * 0.0045).collect();
        for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
            let mut got = xs.clone();
            let sum = exp_scaled(isa, &mut got[..19_999], 1.0, 0.0);
            let mut want_sum = 0.0f64;
            for (x, g) in xs.iter().zip(&got).take(19_999) {
                let w = x.exp();
                want_sum += w as f64;
                assert!(
                    (g - w).abs() <= 4.0 * f32::EPSILON * w + f32::MIN_POSITIVE,
                    "{isa:?} exp({x}) = {g}, libm {w}"
                );
            }
            assert_eq!(got[19_999], xs[19_999], "{isa:?} wrote past the slice");
            assert!(
                ((sum as f64 - want_sum) / want_sum).abs() < 1e-5,
                "{isa:?} sum"
            );
        }
    }
}
