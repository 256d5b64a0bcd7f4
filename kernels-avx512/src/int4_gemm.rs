//! INT4 (pack-quantized, group 32) weights times many tokens: the prefill GEMM.
//!
//! Row kernels keep the reduction dimension in vector lanes, which costs a float
//! conversion and scaling per 4 blocks per (row, token) and reloads every token's
//! activations for every row. For many tokens this module instead unpacks a panel of 32
//! weight rows once (to int16 `q - 8`, two values per 32-bit lane, one row per lane, in
//! cache) and reuses it across all tokens: each `vpdpwssd` multiplies 16 rows by one
//! broadcast pair of a token's int16 activations, so a 32-value block is 16 instructions
//! per 16 rows and token, followed by one conversion and scaling. Activations are the same
//! 15-bit per-32 quantization as the row kernel's ([`crate::int4_i16`]), so both compute
//! the same integers; only the order of the f32 sums differs.
//!
//! The panel is the only repacked copy of weights: 32 rows at a time, per worker, reused
//! across every token and discarded after.

use crate::aligned::AlignedVec;
use crate::int4_i16::QMAX;

/// Rows per panel: two 16-lane vectors.
pub const PANEL_ROWS: usize = 32;
/// Tokens per micro-kernel call: 2 x 6 int32 and 2 x 6 f32 accumulators fit the 32 vector
/// registers next to the two weight vectors.
pub const TOKEN_TILE: usize = 6;

/// Many tokens' activations quantized per 32 values to 15-bit integers (stored as int16),
/// natural order.
#[derive(Debug, Clone)]
pub struct Q16Tokens {
    pub cols: usize,
    /// Tokens rounded up to [`TOKEN_TILE`] (extra tokens are zero).
    pub padded_tokens: usize,
    pub tokens: usize,
    /// `[padded_tokens][cols]`.
    pub values: AlignedVec<i16>,
    /// `[padded_tokens][cols / 32]`.
    pub scales: Vec<f32>,
}

impl Q16Tokens {
    /// Quantizes `x` (`[tokens][cols]`, cols a multiple of 32) on the calling thread.
    pub fn new(x: &[f32], cols: usize) -> Self {
        let mut q = Q16Tokens::zeroed(x.len() / cols, cols);
        let blocks = cols / 32;
        for ((row, values), scales) in x
            .chunks_exact(cols)
            .zip(q.values.chunks_exact_mut(cols))
            .zip(q.scales.chunks_exact_mut(blocks))
        {
            quantize_token(row, values, scales);
        }
        q
    }

    /// Room for `tokens` tokens, all zero: fill each token with [`quantize_token`] on its
    /// `values` and `scales` chunks (`cols` and `cols / 32` long), from any thread.
    pub fn zeroed(tokens: usize, cols: usize) -> Self {
        let mut q = Q16Tokens {
            cols,
            padded_tokens: 0,
            tokens: 0,
            values: AlignedVec::zeroed(0),
            scales: Vec::new(),
        };
        q.reshape(tokens, cols);
        q
    }

    /// Reshapes to room for `tokens` tokens of `cols` values, reusing the buffers (a
    /// buffer kept between calls costs no fresh pages). The padding tokens are zero; the
    /// real tokens hold stale values until quantized.
    pub fn reshape(&mut self, tokens: usize, cols: usize) {
        assert!(
            cols.is_multiple_of(32) && cols > 0,
            "INT4 GEMM needs a multiple of 32 columns"
        );
        let padded_tokens = tokens.div_ceil(TOKEN_TILE) * TOKEN_TILE;
        let blocks = cols / 32;
        (self.cols, self.tokens, self.padded_tokens) = (cols, tokens, padded_tokens);
        self.values.set_len(padded_tokens * cols);
        self.values[tokens * cols..].fill(0);
        self.scales.resize(padded_tokens * blocks, 0.0);
        self.scales[tokens * blocks..].fill(0.0);
    }
}

/// Quantizes one token: `values[k]` = x[k] / scale of its 32-block, rounded; `scales[b]` =
/// absmax of block b / [`QMAX`]: the row kernel's quantization, so both compute the same
/// integers.
pub fn quantize_token(x: &[f32], values: &mut [i16], scales: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::Isa::Avx512Vnni.available() {
        unsafe { avx512::quantize_token(x, values, scales) };
        return;
    }
    quantize_token_portable(x, values, scales);
}

fn quantize_token_portable(x: &[f32], values: &mut [i16], scales: &mut [f32]) {
    for ((block, out), scale_out) in x
        .chunks_exact(32)
        .zip(values.chunks_exact_mut(32))
        .zip(scales.iter_mut())
    {
        let absmax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = absmax / QMAX as f32;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (o, &v) in out.iter_mut().zip(block) {
            *o = crate::round_to_i32(v * inv).clamp(-QMAX, QMAX) as i16;
        }
        *scale_out = scale;
    }
}

/// One 64-byte-aligned cache line: a block's pair of 32 rows, so panel loads never
/// straddle lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C, align(64))]
struct Line([i8; 64]);

/// A panel of [`PANEL_ROWS`] unpacked weight rows.
pub struct Panel {
    /// `[block][pair 0..16]` lines of `[row 0..32][q[2p] - 8, q[2p + 1] - 8]` as int8: one
    /// byte per weight (half the stores of int16), widened to the `vpdpwssd` lanes
    /// `(q[2p] - 8) | (q[2p + 1] - 8) << 16` by one `vpmovsxbw` per 16 rows as they load.
    lines: Vec<Line>,
    /// `[block][row 0..32]` f32 weight scales.
    scales: Vec<f32>,
}

impl Panel {
    /// Lane `i` = `(block * 16 + pair) * 32 + row` as its int16 pair.
    fn word(&self, i: usize) -> i32 {
        let (line, row) = (&self.lines[i / PANEL_ROWS].0, i % PANEL_ROWS);
        (line[2 * row] as i16 as u16 as i32) | ((line[2 * row + 1] as i32) << 16)
    }

    fn set_word(&mut self, i: usize, lo: i8, hi: i8) {
        let (line, row) = (&mut self.lines[i / PANEL_ROWS].0, i % PANEL_ROWS);
        line[2 * row] = lo;
        line[2 * row + 1] = hi;
    }

    fn lines_ptr(&self) -> *const i8 {
        self.lines.as_ptr() as *const i8
    }

    fn lines_mut_ptr(&mut self) -> *mut i8 {
        self.lines.as_mut_ptr() as *mut i8
    }

    /// The row width this panel was made for.
    pub fn cols(&self) -> usize {
        self.scales.len() / PANEL_ROWS * 32
    }

    pub fn new(cols: usize) -> Self {
        let blocks = cols / 32;
        Panel {
            lines: vec![Line([0; 64]); blocks * 16],
            scales: vec![0.0; blocks * PANEL_ROWS],
        }
    }

    /// Unpacks rows `first..first + count` (count <= 32; missing rows are zero).
    /// `packed` and `scales` are the whole matrix.
    pub fn fill(&mut self, packed: &[u8], scales: &[u8], cols: usize, first: usize, count: usize) {
        #[cfg(target_arch = "x86_64")]
        if crate::Isa::Avx512Vnni.available() {
            unsafe { avx512::fill(self, packed, scales, cols, first, count) };
            return;
        }
        self.fill_portable(packed, scales, cols, first, count);
    }

    fn fill_portable(
        &mut self,
        packed: &[u8],
        scales: &[u8],
        cols: usize,
        first: usize,
        count: usize,
    ) {
        let (row_bytes, blocks) = (cols / 2, cols / 32);
        for r in 0..PANEL_ROWS {
            if r >= count {
                for b in 0..blocks {
                    self.scales[b * PANEL_ROWS + r] = 0.0;
                    for p in 0..16 {
                        self.set_word((b * 16 + p) * PANEL_ROWS + r, 0, 0);
                    }
                }
                continue;
            }
            let row = first + r;
            let bytes = &packed[row * row_bytes..(row + 1) * row_bytes];
            for b in 0..blocks {
                self.scales[b * PANEL_ROWS + r] = crate::formats::bf16_at(scales, row * blocks + b);
                for p in 0..16 {
                    let byte = bytes[b * 16 + p];
                    let (lo, hi) = ((byte & 0x0f) as i8 - 8, (byte >> 4) as i8 - 8);
                    self.set_word((b * 16 + p) * PANEL_ROWS + r, lo, hi);
                }
            }
        }
    }
}

/// `out[t][r] = panel row r . x[t]` for every token of `x`, padding tokens included:
/// `out` holds `[x.padded_tokens][32]` and is overwritten (so callers can reuse it).
/// `upcoming`: the byte ranges the caller fills next, asked into L2 meanwhile (see
/// [`crate::int4_gemm8::panel8_times_tokens`]).
pub fn panel_times_tokens(panel: &Panel, x: &Q16Tokens, out: &mut [f32], upcoming: &[&[u8]]) {
    assert!(
        out.len() >= x.padded_tokens * PANEL_ROWS,
        "panel output needs room for the padded tokens"
    );
    #[cfg(target_arch = "x86_64")]
    if crate::Isa::Avx512Vnni.available() {
        unsafe { avx512::panel_times_tokens(panel, x, out, upcoming) };
        return;
    }
    let _ = upcoming;
    portable(panel, x, out);
}

/// The same integers and scaling in plain code (reference for the tests, and for CPUs
/// without AVX-512 VNNI).
fn portable(panel: &Panel, x: &Q16Tokens, out: &mut [f32]) {
    let blocks = x.cols / 32;
    for t in 0..x.tokens {
        let xt = &x.values[t * x.cols..(t + 1) * x.cols];
        for r in 0..PANEL_ROWS {
            let mut total = 0.0f32;
            for b in 0..blocks {
                let mut acc = 0i32;
                for p in 0..16 {
                    let lane = panel.word((b * 16 + p) * PANEL_ROWS + r);
                    let (lo, hi) = (lane as i16 as i32, lane >> 16);
                    acc += lo * xt[b * 32 + 2 * p] as i32 + hi * xt[b * 32 + 2 * p + 1] as i32;
                }
                total += acc as f32 * (panel.scales[b * PANEL_ROWS + r] * x.scales[t * blocks + b]);
            }
            out[t * PANEL_ROWS + r] = total;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Panel, Q16Tokens, PANEL_ROWS, TOKEN_TILE};
    use crate::vnni::dpwssd;
    use std::arch::x86_64::*;

    /// [`super::quantize_token`], 32 values per step: the same scale, reciprocal and
    /// round-to-nearest-even conversion as the portable code, so the same integers.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn quantize_token(x: &[f32], values: &mut [i16], scales: &mut [f32]) {
        let limit = _mm512_set1_epi32(super::QMAX);
        let neg_limit = _mm512_set1_epi32(-super::QMAX);
        for (b, scale_out) in scales.iter_mut().enumerate().take(x.len() / 32) {
            let v0 = _mm512_loadu_ps(x.as_ptr().add(32 * b));
            let v1 = _mm512_loadu_ps(x.as_ptr().add(32 * b + 16));
            let absmax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            let scale = absmax / super::QMAX as f32;
            let inv = _mm512_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            for (half, v) in [v0, v1].into_iter().enumerate() {
                let q = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));
                let q = _mm512_max_epi32(_mm512_min_epi32(q, limit), neg_limit);
                _mm256_storeu_si256(
                    values.as_mut_ptr().add(32 * b + 16 * half) as *mut _,
                    _mm512_cvtepi32_epi16(q),
                );
            }
            *scale_out = scale;
        }
    }

    /// [`Panel::fill`]: each row's 16 bytes of a block become 16 lanes
    /// `(lo - 8) | (hi - 8) << 16` (one per pair); 16 rows' vectors are then transposed in
    /// registers so each pair's vector holds one lane per row, and stored whole.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn fill(
        panel: &mut Panel,
        packed: &[u8],
        scales: &[u8],
        cols: usize,
        first: usize,
        count: usize,
    ) {
        let (row_bytes, blocks) = (cols / 2, cols / 32);
        let (nibble, eight) = (_mm_set1_epi8(0x0f), _mm_set1_epi8(8));
        // Loops, not `array::from_fn` closures: a closure does not inherit the target
        // features, so it was compiled out of line and returned each vector through memory.
        for r in 0..PANEL_ROWS {
            for b in 0..blocks {
                panel.scales[b * PANEL_ROWS + r] = if r < count {
                    crate::formats::bf16_at(scales, (first + r) * blocks + b)
                } else {
                    0.0
                };
            }
        }
        for b in 0..blocks {
            for half in 0..PANEL_ROWS / 16 {
                // Each row's 16 bytes -> its 16 pairs as int8 (q - 8), pair order.
                let mut rows = [_mm256_setzero_si256(); 16];
                for (i, row_vec) in rows.iter_mut().enumerate() {
                    let r = 16 * half + i;
                    if r >= count {
                        continue;
                    }
                    let at = packed.as_ptr().add((first + r) * row_bytes + b * 16);
                    let v = _mm_loadu_si128(at as *const _);
                    let lo = _mm_sub_epi8(_mm_and_si128(v, nibble), eight);
                    let hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), nibble), eight);
                    *row_vec =
                        _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
                }
                let pairs = transpose16x16_epi16(rows);
                for (p, v) in pairs.iter().enumerate() {
                    let at = panel.lines_mut_ptr().add((b * 16 + p) * 64 + 32 * half);
                    _mm256_store_si256(at as *mut _, *v);
                }
            }
        }
    }

    /// Transposes a 16 x 16 matrix of 16-bit values held one row per register: three
    /// rounds of unpacks transpose 8 x 8 within each 128-bit lane (rows 0..8 and 8..16
    /// separately), then lanes are exchanged. (Loops, not closures: see `fill`.)
    #[inline(always)]
    unsafe fn transpose16x16_epi16(r: [__m256i; 16]) -> [__m256i; 16] {
        let mut halves = [[_mm256_setzero_si256(); 8]; 2];
        for (h, out) in halves.iter_mut().enumerate() {
            let r = &r[8 * h..8 * h + 8];
            let mut t = [_mm256_setzero_si256(); 8];
            for i in 0..4 {
                t[2 * i] = _mm256_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
                t[2 * i + 1] = _mm256_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
            }
            // u[0..4]: columns (0,1), (2,3), (4,5), (6,7) of rows 0..4; u[4..8] of rows 4..8.
            let mut u = [_mm256_setzero_si256(); 8];
            for g in 0..2 {
                let (a, b, c, d) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
                u[4 * g] = _mm256_unpacklo_epi32(a, c);
                u[4 * g + 1] = _mm256_unpackhi_epi32(a, c);
                u[4 * g + 2] = _mm256_unpacklo_epi32(b, d);
                u[4 * g + 3] = _mm256_unpackhi_epi32(b, d);
            }
            for k in 0..4 {
                out[2 * k] = _mm256_unpacklo_epi64(u[k], u[4 + k]);
                out[2 * k + 1] = _mm256_unpackhi_epi64(u[k], u[4 + k]);
            }
        }
        // Lane 0 of halves[h][k] is column k of rows 8h..8h+8; lane 1 is column 8 + k.
        let mut out = [_mm256_setzero_si256(); 16];
        for k in 0..8 {
            let (a, b) = (halves[0][k], halves[1][k]);
            out[k] = _mm256_permute2x128_si256::<0x20>(a, b);
            out[8 + k] = _mm256_permute2x128_si256::<0x31>(a, b);
        }
        out
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn panel_times_tokens(
        panel: &Panel,
        x: &Q16Tokens,
        out: &mut [f32],
        upcoming: &[&[u8]],
    ) {
        let tiles = x.padded_tokens / TOKEN_TILE;
        // Each token tile runs over the whole row: the panel (at most 2 KiB per block)
        // streams from L2 in one long sequential pass that the prefetchers keep ahead of,
        // and the tile's activations pass once. (Blocking K into L1-sized chunks measured
        // slower: every chunk restarts the streams and reloads the f32 sums.)
        for tile in 0..tiles {
            crate::prefetch_share_l2(upcoming, tile, tiles);
            let t0 = tile * TOKEN_TILE;
            let sum = out.as_mut_ptr().add(t0 * PANEL_ROWS);
            tile_kernel(panel, x, t0, sum);
        }
    }

    /// All blocks of 32 rows x 6 tokens, written to `sum` (`[6][32]` f32).
    #[inline(always)]
    unsafe fn tile_kernel(panel: &Panel, x: &Q16Tokens, t0: usize, sum: *mut f32) {
        const RV: usize = PANEL_ROWS / 16;
        let mut out = [[_mm512_setzero_ps(); TOKEN_TILE]; RV];
        let cols = x.cols;
        let blocks = cols / 32;
        let xv = x.values.as_ptr().add(t0 * cols) as *const u8;
        for b in 0..blocks {
            let mut acc = [[_mm512_setzero_si512(); TOKEN_TILE]; RV];
            let lines = panel.lines_ptr().add(b * 16 * 64);
            // Block b of each token, as i32 pairs of values.
            let xt: [*const i32; TOKEN_TILE] =
                std::array::from_fn(|t| xv.add(2 * (t * cols + b * 32)) as *const i32);
            // A macro, not a closure: closures do not inherit the function's target features,
            // so their intrinsics would not inline.
            macro_rules! pair_step {
                ($p:expr) => {{
                    let p = $p;
                    let mut w = [_mm512_setzero_si512(); RV];
                    for (r, w_r) in w.iter_mut().enumerate() {
                        *w_r = _mm512_cvtepi8_epi16(_mm256_load_si256(
                            lines.add(p * 64 + 32 * r) as *const _
                        ));
                    }
                    for t in 0..TOKEN_TILE {
                        // Values 2p and 2p + 1 of the block, broadcast.
                        let xb = _mm512_set1_epi32(xt[t].add(p).read_unaligned());
                        for r in 0..RV {
                            acc[r][t] = dpwssd(acc[r][t], w[r], xb);
                        }
                    }
                }};
            }
            // Unrolled by four: loop bookkeeping would otherwise take issue slots from the
            // vector ports.
            for p in (0..16).step_by(4) {
                pair_step!(p);
                pair_step!(p + 1);
                pair_step!(p + 2);
                pair_step!(p + 3);
            }
            let xs = x.scales.as_ptr().add(t0 * blocks + b);
            for r in 0..RV {
                let ws = _mm512_loadu_ps(panel.scales.as_ptr().add(b * PANEL_ROWS + 16 * r));
                for t in 0..TOKEN_TILE {
                    let s = _mm512_set1_ps(*xs.add(t * blocks));
                    out[r][t] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(acc[r][t]),
                        _mm512_mul_ps(ws, s),
                        out[r][t],
                    );
                }
            }
        }
        for (r, out_r) in out.iter().enumerate() {
            for (t, o) in out_r.iter().enumerate() {
                _mm512_storeu_ps(sum.add(t * PANEL_ROWS + 16 * r), *o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scalar::{decode_int4_row, dot};

    use crate::test_support::lcg_u32 as lcg;

    #[test]
    fn fast_quantization_equals_portable() {
        let mut seed = 21;
        let x: Vec<f32> = (0..7168)
            .map(|i| {
                let v = (lcg(&mut seed) % 20001) as f32 / 1000.0 - 10.0;
                if i % 97 == 0 {
                    v * 300.0
                } else if i % 211 < 32 {
                    0.0
                } else {
                    v
                }
            })
            .collect();
        let (mut a, mut b) = (vec![0i16; 7168], vec![0i16; 7168]);
        let (mut sa, mut sb) = (vec![0f32; 224], vec![0f32; 224]);
        quantize_token(&x, &mut a, &mut sa);
        quantize_token_portable(&x, &mut b, &mut sb);
        assert_eq!(a, b);
        assert_eq!(sa, sb);
    }

    #[test]
    fn fast_fill_equals_portable_fill() {
        let (rows, cols) = (40, 224);
        let mut seed = 3;
        let packed: Vec<u8> = (0..rows * cols / 2).map(|_| lcg(&mut seed) as u8).collect();
        let scales: Vec<u8> = (0..rows * cols / 16)
            .map(|_| lcg(&mut seed) as u8)
            .collect();
        for (first, count) in [(0, 32), (32, 8)] {
            let (mut a, mut b) = (Panel::new(cols), Panel::new(cols));
            a.lines.fill(Line([7; 64]));
            a.fill(&packed, &scales, cols, first, count);
            b.fill_portable(&packed, &scales, cols, first, count);
            assert_eq!(a.lines, b.lines);
            let bits = |p: &Panel| p.scales.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b));
        }
    }

    /// Rows not a multiple of 32, K a multiple of 32 but not of 256 or of the cache chunk,
    /// 1 token, a partial token tile, many tokens (more than one group of tiles): against
    /// the f32 reference (relative L2 per token at most 1e-4) and against the portable code
    /// of the same integers.
    #[test]
    fn gemm_matches_the_reference_on_odd_and_real_shapes() {
        let mut seed = 17;
        for (rows, cols, tokens) in [
            (37, 96, 1),
            (5, 224, 7),
            (32, 544, 13),
            (70, 2048, 20),
            (64, 96, 400),
        ] {
            let packed: Vec<u8> = (0..rows * cols / 2).map(|_| lcg(&mut seed) as u8).collect();
            let scales: Vec<u8> = (0..rows * cols / 32)
                .flat_map(|i| (0x3c00u16 + (i % 50) as u16).to_le_bytes())
                .collect();
            let x: Vec<f32> = (0..tokens * cols)
                .map(|_| (lcg(&mut seed) % 20001) as f32 / 10000.0 - 1.0)
                .collect();
            let q = Q16Tokens::new(&x, cols);
            let mut panel = Panel::new(cols);
            let mut fast = vec![0.0f32; q.padded_tokens * PANEL_ROWS];
            let mut plain = vec![0.0f32; q.padded_tokens * PANEL_ROWS];
            let mut w = vec![0.0f32; cols];
            for first in (0..rows).step_by(PANEL_ROWS) {
                let count = (rows - first).min(PANEL_ROWS);
                panel.fill(&packed, &scales, cols, first, count);
                panel_times_tokens(&panel, &q, &mut fast, &[&packed[..64]]);
                portable(&panel, &q, &mut plain);
                for t in 0..tokens {
                    let (mut num, mut den, mut spread) = (0.0f64, 0.0f64, 0.0f64);
                    for r in 0..count {
                        let row = first + r;
                        decode_int4_row(
                            &packed[row * cols / 2..(row + 1) * cols / 2],
                            &scales[row * cols / 16..(row + 1) * cols / 16],
                            32,
                            &mut w,
                        );
                        let want = dot(&w, &x[t * cols..(t + 1) * cols]) as f64;
                        let got = fast[t * PANEL_ROWS + r] as f64;
                        num += (got - want) * (got - want);
                        den += want * want;
                        spread += (got - plain[t * PANEL_ROWS + r] as f64).powi(2);
                    }
                    let err = (num / den.max(1e-30)).sqrt();
                    assert!(err < 1e-4, "rows {rows} cols {cols} token {t}: {err}");
                    assert!((spread / den.max(1e-30)).sqrt() < 1e-6);
                    for r in count..PANEL_ROWS {
                        assert_eq!(fast[t * PANEL_ROWS + r], 0.0, "padding row {r}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_reshaped_buffer_equals_a_fresh_one() {
        let mut seed = 5;
        let mut reused = Q16Tokens::zeroed(0, 32);
        for (tokens, cols) in [(13, 96), (4, 224), (20, 64), (1, 96)] {
            let x: Vec<f32> = (0..tokens * cols)
                .map(|_| (lcg(&mut seed) % 2001) as f32 / 100.0 - 10.0)
                .collect();
            reused.reshape(tokens, cols);
            for ((values, scales), row) in reused
                .values
                .chunks_exact_mut(cols)
                .zip(reused.scales.chunks_exact_mut(cols / 32))
                .zip(x.chunks_exact(cols))
            {
                quantize_token(row, values, scales);
            }
            let fresh = Q16Tokens::new(&x, cols);
            assert_eq!(reused.padded_tokens, fresh.padded_tokens);
            assert_eq!(&reused.values[..], &fresh.values[..], "{tokens}x{cols}");
            assert_eq!(reused.scales, fresh.scales, "{tokens}x{cols}");
        }
    }
}
