//! BF16 weights times many tokens rounded to BF16: the prefill GEMM of the `cpu-int8`
//! backend's dense matrices (attention projections, shared expert, dense layers).
//!
//! `vdpbf16ps` multiplies two pairs of BF16 values per 32-bit lane into an f32 sum: 32
//! multiply-adds per instruction where the f32 product ([`crate::attention::gemm_acc`]
//! on weights widened to f32) does 16, and the weights stay two bytes each in cache. The
//! activations are rounded to BF16 (to nearest, ties to even) once per call: about 0.2%
//! per value, the approximation `cpu-int8` states; the default backend keeps the f32
//! product.
//!
//! Layout: a panel of 32 weight rows is stored as `[pair p][row 0..32]` dwords, pair `p`
//! being the row's values `2p, 2p + 1` exactly as they lie in the checkpoint (a BF16 row
//! read four bytes at a time), so one 64-byte load gives 16 rows' pair `p`; each token's
//! pair `p` is broadcast against it. Rows need an even width.

use crate::aligned::AlignedVec;

/// Rows per panel: two 16-lane vectors.
pub const PANEL_ROWS: usize = 32;
/// Tokens per micro-kernel call: 2 x 12 f32 accumulators fit the 32 vector registers next
/// to the two weight vectors and a broadcast.
pub const TOKEN_TILE: usize = 12;

/// Whether this CPU runs the fast path (AVX-512 with BF16 dot products). Elsewhere the
/// portable code computes the same products in plain f32.
pub fn fast_path_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::Isa::Avx512Vnni.available() && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Many tokens rounded to BF16, as the dwords `x[2p] | x[2p + 1] << 16`.
#[derive(Debug, Clone)]
pub struct Bf16Tokens {
    pub cols: usize,
    /// Tokens rounded up to [`TOKEN_TILE`] (extra tokens are zero).
    pub padded_tokens: usize,
    pub tokens: usize,
    /// `[padded_tokens][cols / 2]`.
    pub pairs: AlignedVec<i32>,
}

impl Bf16Tokens {
    /// Rounds `x` (`[tokens][cols]`, cols even) on the calling thread.
    pub fn new(x: &[f32], cols: usize) -> Self {
        let mut q = Bf16Tokens::zeroed(x.len() / cols, cols);
        for (row, pairs) in x.chunks_exact(cols).zip(q.pairs.chunks_exact_mut(cols / 2)) {
            round_token(row, pairs);
        }
        q
    }

    /// Room for `tokens` tokens, all zero (see [`Bf16Tokens::reshape`]).
    pub fn zeroed(tokens: usize, cols: usize) -> Self {
        let mut q = Bf16Tokens {
            cols,
            padded_tokens: 0,
            tokens: 0,
            pairs: AlignedVec::zeroed(0),
        };
        q.reshape(tokens, cols);
        q
    }

    /// Reshapes to room for `tokens` tokens of `cols` values, reusing the buffer. The
    /// padding tokens are zero; the real tokens hold stale values until rounded with
    /// [`round_token`] on their `cols / 2` chunk of `pairs`.
    pub fn reshape(&mut self, tokens: usize, cols: usize) {
        assert!(
            cols.is_multiple_of(2) && cols > 0,
            "the BF16 GEMM needs an even number of columns"
        );
        let padded_tokens = tokens.div_ceil(TOKEN_TILE) * TOKEN_TILE;
        (self.cols, self.tokens, self.padded_tokens) = (cols, tokens, padded_tokens);
        self.pairs.set_len(padded_tokens * cols / 2);
        self.pairs[tokens * cols / 2..].fill(0);
    }
}

/// `v` rounded to BF16 bits the way the hardware conversion does: to nearest, ties to
/// even; subnormal inputs become zero of the same sign; NaN stays a (quiet) NaN.
fn to_bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    if bits & 0x7f80_0000 == 0 {
        return ((bits >> 16) & 0x8000) as u16;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// Rounds one token (`cols` values) to BF16 pairs (`cols / 2` dwords).
pub fn round_token(x: &[f32], pairs: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if fast_path_available() {
        unsafe { avx512::round_token(x, pairs) };
        return;
    }
    round_token_portable(x, pairs);
}

fn round_token_portable(x: &[f32], pairs: &mut [i32]) {
    for (pair, out) in x.chunks_exact(2).zip(pairs.iter_mut()) {
        *out = (to_bf16_bits(pair[0]) as u32 | (to_bf16_bits(pair[1]) as u32) << 16) as i32;
    }
}

/// A panel of [`PANEL_ROWS`] BF16 weight rows, pair-major.
pub struct Bf16Panel {
    /// `[cols / 2][32]` dwords: row r's values `2p, 2p + 1`; missing rows are zero.
    pairs: AlignedVec<i32>,
    cols: usize,
}

impl Bf16Panel {
    pub fn new(cols: usize) -> Self {
        Bf16Panel {
            pairs: AlignedVec::zeroed(cols / 2 * PANEL_ROWS),
            cols,
        }
    }

    /// The row width this panel was made for.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Copies rows `first..first + count` (count <= 32) of the row-major BF16 matrix
    /// `bytes` (`cols` values per row) into pair-major order.
    pub fn fill(&mut self, bytes: &[u8], first: usize, count: usize) {
        let cols = self.cols;
        assert!(count <= PANEL_ROWS && bytes.len() >= (first + count) * cols * 2);
        #[cfg(target_arch = "x86_64")]
        if fast_path_available() {
            unsafe { avx512::fill(self, bytes, first, count) };
            return;
        }
        self.fill_portable(bytes, first, count);
    }

    fn fill_portable(&mut self, bytes: &[u8], first: usize, count: usize) {
        let cols = self.cols;
        for r in 0..PANEL_ROWS {
            for p in 0..cols / 2 {
                self.pairs[p * PANEL_ROWS + r] = if r < count {
                    let at = (first + r) * cols * 2 + 4 * p;
                    i32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
                } else {
                    0
                };
            }
        }
    }
}

/// `out[t][r] = panel row r . x[t]` for every token of `x`, padding tokens included:
/// `out` holds `[x.padded_tokens][32]` and is overwritten.
pub fn bf16_panel_times_tokens(panel: &Bf16Panel, x: &Bf16Tokens, out: &mut [f32]) {
    assert!(
        out.len() >= x.padded_tokens * PANEL_ROWS && panel.cols == x.cols,
        "panel output needs room for the padded tokens, and the panel the tokens' width"
    );
    #[cfg(target_arch = "x86_64")]
    if fast_path_available() {
        unsafe { avx512::panel_times_tokens(panel, x, out) };
        return;
    }
    portable(panel, x, out);
}

/// The widened value of the BF16 half `half` (0 low, 1 high) of a pair.
fn half_of(pair: i32, half: u32) -> f32 {
    f32::from_bits(((pair as u32) >> (16 * half)) << 16)
}

/// The same products in plain f32 (the twin of the tests, and the path of CPUs without
/// AVX-512 BF16): BF16 products are exact in f32, so only the order of the sums differs.
fn portable(panel: &Bf16Panel, x: &Bf16Tokens, out: &mut [f32]) {
    let half_cols = x.cols / 2;
    for t in 0..x.padded_tokens {
        let xt = &x.pairs[t * half_cols..(t + 1) * half_cols];
        for r in 0..PANEL_ROWS {
            let mut total = 0.0f32;
            for (p, &xp) in xt.iter().enumerate() {
                let w = panel.pairs[p * PANEL_ROWS + r];
                total += half_of(w, 1) * half_of(xp, 1);
                total += half_of(w, 0) * half_of(xp, 0);
            }
            out[t * PANEL_ROWS + r] = total;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Bf16Panel, Bf16Tokens, PANEL_ROWS, TOKEN_TILE};
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// Lines of each row the fill asks for ahead of its reads: 32 rows are more streams
    /// than the hardware prefetchers follow.
    const PREFETCH_LINES: usize = 4;

    /// `acc + a.hi * b.hi + a.lo * b.lo` per f32 lane of BF16 pairs, pinned to
    /// `vdpbf16ps` (see `crate::vnni` for why instructions are pinned).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dpbf16(acc: __m512, a: __m512i, b: __m512i) -> __m512 {
        let mut acc = acc;
        asm!("vdpbf16ps {acc}, {a}, {b}", acc = inout(zmm_reg) acc, a = in(zmm_reg) a, b = in(zmm_reg) b, options(pure, nomem, nostack, preserves_flags));
        acc
    }

    /// 32 f32 values to 32 BF16 values in order (`vcvtne2ps2bf16`: to nearest even,
    /// subnormals to zero), pinned like [`dpbf16`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn cvtne2ps(low: __m512, high: __m512) -> __m512i {
        let out: __m512i;
        asm!("vcvtne2ps2bf16 {out}, {high}, {low}", out = out(zmm_reg) out, high = in(zmm_reg) high, low = in(zmm_reg) low, options(pure, nomem, nostack, preserves_flags));
        out
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn round_token(x: &[f32], pairs: &mut [i32]) {
        let whole = x.len() / 32;
        for i in 0..whole {
            let low = _mm512_loadu_ps(x.as_ptr().add(32 * i));
            let high = _mm512_loadu_ps(x.as_ptr().add(32 * i + 16));
            _mm512_storeu_si512(
                pairs.as_mut_ptr().add(16 * i) as *mut _,
                cvtne2ps(low, high),
            );
        }
        super::round_token_portable(&x[32 * whole..], &mut pairs[16 * whole..]);
    }

    /// [`Bf16Panel::fill`]: 8 rows' 8 dwords at a time transposed in registers.
    #[target_feature(enable = "avx512f,avx2")]
    pub unsafe fn fill(panel: &mut Bf16Panel, bytes: &[u8], first: usize, count: usize) {
        let half_cols = panel.cols / 2;
        let row_bytes = panel.cols * 2;
        let row_at = |r: usize| bytes.as_ptr().wrapping_add((first + r) * row_bytes);
        for r in 0..count {
            for line in 0..PREFETCH_LINES {
                _mm_prefetch::<_MM_HINT_T0>(row_at(r).wrapping_add(64 * line) as *const i8);
            }
        }
        let out = panel.pairs.as_mut_ptr();
        let whole = half_cols / 8;
        for chunk in 0..whole {
            if chunk % 2 == 0 {
                let ahead = 32 * chunk + 64 * PREFETCH_LINES;
                for r in 0..count {
                    _mm_prefetch::<_MM_HINT_T0>(row_at(r).wrapping_add(ahead) as *const i8);
                }
            }
            for g in 0..PANEL_ROWS / 8 {
                let mut rows = [_mm256_setzero_si256(); 8];
                for (i, row_vec) in rows.iter_mut().enumerate() {
                    let r = 8 * g + i;
                    if r < count {
                        *row_vec = _mm256_loadu_si256(row_at(r).add(32 * chunk) as *const _);
                    }
                }
                let cols = crate::int4_gemm8::avx512::transpose8x8_epi32(rows);
                for (c, v) in cols.iter().enumerate() {
                    let at = out.add((8 * chunk + c) * PANEL_ROWS + 8 * g);
                    _mm256_store_si256(at as *mut _, *v);
                }
            }
        }
        // The last pairs of a width not a multiple of 16 values.
        for p in 8 * whole..half_cols {
            for r in 0..PANEL_ROWS {
                *out.add(p * PANEL_ROWS + r) = if r < count {
                    (row_at(r).add(4 * p) as *const i32).read_unaligned()
                } else {
                    0
                };
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn panel_times_tokens(panel: &Bf16Panel, x: &Bf16Tokens, out: &mut [f32]) {
        for tile in 0..x.padded_tokens / TOKEN_TILE {
            let t0 = tile * TOKEN_TILE;
            tile_kernel(panel, x, t0, out.as_mut_ptr().add(t0 * PANEL_ROWS));
        }
    }

    /// 32 rows x 12 tokens over the whole width, written to `sum` (`[12][32]` f32).
    #[inline(always)]
    unsafe fn tile_kernel(panel: &Bf16Panel, x: &Bf16Tokens, t0: usize, sum: *mut f32) {
        let half_cols = x.cols / 2;
        let mut acc = [[_mm512_setzero_ps(); TOKEN_TILE]; 2];
        let w = panel.pairs.as_ptr();
        let xt: [*const i32; TOKEN_TILE] =
            std::array::from_fn(|t| x.pairs.as_ptr().add((t0 + t) * half_cols));
        for p in 0..half_cols {
            let w0 = _mm512_load_si512(w.add(p * PANEL_ROWS) as *const _);
            let w1 = _mm512_load_si512(w.add(p * PANEL_ROWS + 16) as *const _);
            for t in 0..TOKEN_TILE {
                let xb = _mm512_set1_epi32(*xt[t].add(p));
                acc[0][t] = dpbf16(acc[0][t], w0, xb);
                acc[1][t] = dpbf16(acc[1][t], w1, xb);
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (t, a) in acc_r.iter().enumerate() {
                _mm512_storeu_ps(sum.add(t * PANEL_ROWS + 16 * r), *a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_support::lcg_u32 as lcg;

    #[test]
    fn rounding_is_to_nearest_even_and_fast_equals_portable() {
        assert_eq!(to_bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(to_bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: to even (1 + 2^-6).
        assert_eq!(to_bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16_bits(-0.0), 0x8000);
        assert_eq!(to_bf16_bits(f32::from_bits(1)), 0);
        assert!(f32::from_bits((to_bf16_bits(f32::NAN) as u32) << 16).is_nan());
        let mut seed = 4;
        let x: Vec<f32> = (0..7168 + 14)
            .map(|i| {
                let v = (lcg(&mut seed) % 2_000_001) as f32 / 1000.0 - 1000.0;
                if i % 61 == 0 {
                    0.0
                } else {
                    v / (1 + i % 7) as f32
                }
            })
            .collect();
        let (mut fast, mut plain) = (vec![0i32; x.len() / 2], vec![0i32; x.len() / 2]);
        round_token(&x, &mut fast);
        round_token_portable(&x, &mut plain);
        assert_eq!(fast, plain);
    }

    #[test]
    fn fast_fill_equals_portable_fill() {
        for (rows, cols) in [(40, 224), (33, 30), (32, 16)] {
            let mut seed = 3;
            let bytes: Vec<u8> = (0..rows * cols * 2).map(|_| lcg(&mut seed) as u8).collect();
            for (first, count) in [(0, 32), (rows - 8, 8), (1, 17)] {
                let (mut a, mut b) = (Bf16Panel::new(cols), Bf16Panel::new(cols));
                a.pairs.fill(7);
                b.pairs.fill(9);
                a.fill(&bytes, first, count);
                b.fill_portable(&bytes, first, count);
                assert_eq!(&a.pairs[..], &b.pairs[..], "{rows}x{cols} {first}+{count}");
            }
        }
    }

    /// Odd row counts, widths not a multiple of 16 values, 1 token, partial and many token
    /// tiles: the fast path equals the portable products up to summation order, and both
    /// stay within BF16 activation rounding of the f32 product (relative L2 per token at
    /// most 1e-2; measured about 2e-3).
    #[test]
    fn gemm_matches_the_reference_on_odd_and_real_shapes() {
        let mut seed = 17;
        for (rows, cols, tokens) in [
            (37, 96, 1),
            (5, 30, 7),
            (32, 544, 13),
            (70, 2048, 25),
            (64, 96, 400),
        ] {
            // BF16 weights in [-2, 2) with varied exponents.
            let bytes: Vec<u8> = (0..rows * cols)
                .flat_map(|_| (0x3800u16 | (lcg(&mut seed) as u16 & 0x83ff)).to_le_bytes())
                .collect();
            let x: Vec<f32> = (0..tokens * cols)
                .map(|_| (lcg(&mut seed) % 20001) as f32 / 10000.0 - 1.0)
                .collect();
            let q = Bf16Tokens::new(&x, cols);
            let mut panel = Bf16Panel::new(cols);
            let mut fast = vec![0.0f32; q.padded_tokens * PANEL_ROWS];
            let mut plain = vec![0.0f32; q.padded_tokens * PANEL_ROWS];
            for first in (0..rows).step_by(PANEL_ROWS) {
                let count = (rows - first).min(PANEL_ROWS);
                panel.fill(&bytes, first, count);
                bf16_panel_times_tokens(&panel, &q, &mut fast);
                portable(&panel, &q, &mut plain);
                for t in 0..tokens {
                    let (mut num, mut den, mut spread) = (0.0f64, 0.0f64, 0.0f64);
                    for r in 0..count {
                        let row = &bytes[(first + r) * cols * 2..(first + r + 1) * cols * 2];
                        let want: f64 = row
                            .chunks_exact(2)
                            .zip(&x[t * cols..(t + 1) * cols])
                            .map(|(b, &v)| {
                                crate::formats::bf16_to_f32(u16::from_le_bytes([b[0], b[1]])) as f64
                                    * v as f64
                            })
                            .sum();
                        let got = fast[t * PANEL_ROWS + r] as f64;
                        num += (got - want) * (got - want);
                        den += want * want;
                        spread += (got - plain[t * PANEL_ROWS + r] as f64).powi(2);
                    }
                    let err = (num / den.max(1e-30)).sqrt();
                    assert!(err < 1e-2, "rows {rows} cols {cols} token {t}: {err}");
                    assert!((spread / den.max(1e-30)).sqrt() < 1e-5);
                    for r in count..PANEL_ROWS {
                        assert_eq!(fast[t * PANEL_ROWS + r], 0.0, "padding row {r}");
                    }
                }
            }
        }
    }
}
