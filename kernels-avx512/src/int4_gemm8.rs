//! INT4 (pack-quantized, group 32) weights times many int8-quantized tokens: the prefill
//! GEMM of the `cpu-int8` backend.
//!
//! The same panel-and-tile scheme as [`crate::int4_gemm`], at twice its multiply rate:
//! `vpdpbusd` multiplies four unsigned bytes by four signed bytes per 32-bit lane (64
//! multiply-adds per instruction, `vpdpwssd` does 32). Weights go in as their stored
//! nibbles `q + 8` (0..15, the unsigned side), activations as int8 (absmax / 127 per 32
//! values, the signed side); the `+8` is removed by starting each block's accumulator at
//! `-8 * sum(x)` of the token's block.
//!
//! A block's 16 packed bytes hold its even values in their low nibbles and odd values in
//! their high nibbles, so the panel keeps them in that order (`lo` nibbles of bytes
//! `4k..4k+4`, then `hi` nibbles) and the activations are stored in the matching order
//! (a block's 16 even values, then its 16 odd values): unpacking is two masks and no
//! byte shuffling, and lane `k` of a row always meets the same four activations.
//!
//! Accuracy: int8 activations carry about 0.4% rounding per value (int16: 0.003%), the
//! drift the `cpu-int8` backend states; the default backend keeps [`crate::int4_gemm`].

use crate::aligned::AlignedVec;

/// Rows per panel: four 16-lane vectors. With [`TOKEN_TILE`] 3, a step of the micro-kernel
/// loads four weight vectors and broadcasts three tokens' activations for 12 `vpdpbusd`
/// (a 32 x 6 tile broadcast six for 12): the broadcasts and the per-block conversions
/// compete with `vpdpbusd` for the same vector pipes, so fewer broadcasts per product is
/// a higher share of the instruction's peak.
pub const PANEL_ROWS: usize = 64;
/// Tokens per micro-kernel call: 4 x 3 int32 and 4 x 3 f32 accumulators fit the 32 vector
/// registers next to the four weight vectors.
pub const TOKEN_TILE: usize = 3;
/// 16-row vectors per panel.
const VECS: usize = PANEL_ROWS / 16;

/// Largest int8 magnitude used (symmetric, so -128 is never produced).
const QMAX8: i32 = 127;

/// Many tokens' activations quantized per 32 values to int8, each block stored as its 16
/// even values then its 16 odd values.
#[derive(Debug, Clone)]
pub struct Q8Tokens {
    pub cols: usize,
    /// Tokens rounded up to [`TOKEN_TILE`] (extra tokens are zero).
    pub padded_tokens: usize,
    pub tokens: usize,
    /// `[padded_tokens][cols]`, per block `[even 16][odd 16]`.
    pub values: AlignedVec<i8>,
    /// `[padded_tokens][cols / 32]`: absmax / 127 of each block.
    pub scales: Vec<f32>,
    /// `[padded_tokens][cols / 32]`: `-8 * sum` of each block's quantized values.
    pub offsets: Vec<i32>,
}

impl Q8Tokens {
    /// Quantizes `x` (`[tokens][cols]`, cols a multiple of 32) on the calling thread.
    pub fn new(x: &[f32], cols: usize) -> Self {
        let mut q = Q8Tokens::zeroed(x.len() / cols, cols);
        let blocks = cols / 32;
        for (((row, values), scales), offsets) in x
            .chunks_exact(cols)
            .zip(q.values.chunks_exact_mut(cols))
            .zip(q.scales.chunks_exact_mut(blocks))
            .zip(q.offsets.chunks_exact_mut(blocks))
        {
            quantize_token8(row, values, scales, offsets);
        }
        q
    }

    /// Room for `tokens` tokens, all zero (see [`Q8Tokens::reshape`]).
    pub fn zeroed(tokens: usize, cols: usize) -> Self {
        let mut q = Q8Tokens {
            cols,
            padded_tokens: 0,
            tokens: 0,
            values: AlignedVec::zeroed(0),
            scales: Vec::new(),
            offsets: Vec::new(),
        };
        q.reshape(tokens, cols);
        q
    }

    /// Reshapes to room for `tokens` tokens of `cols` values, reusing the buffers. The
    /// padding tokens are zero; the real tokens hold stale values until quantized with
    /// [`quantize_token8`] on their `values`, `scales` and `offsets` chunks.
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
        self.offsets.resize(padded_tokens * blocks, 0);
        self.offsets[tokens * blocks..].fill(0);
    }
}

/// Quantizes one token: per 32-block, scale = absmax / 127, values rounded to nearest
/// even and stored even-then-odd, offset = `-8 * sum` of the block's values.
pub fn quantize_token8(x: &[f32], values: &mut [i8], scales: &mut [f32], offsets: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::Isa::Avx512Vnni.available() {
        unsafe { avx512::quantize_token8(x, values, scales, offsets) };
        return;
    }
    quantize_token8_portable(x, values, scales, offsets);
}

fn quantize_token8_portable(x: &[f32], values: &mut [i8], scales: &mut [f32], offsets: &mut [i32]) {
    for (((block, out), scale_out), offset_out) in x
        .chunks_exact(32)
        .zip(values.chunks_exact_mut(32))
        .zip(scales.iter_mut())
        .zip(offsets.iter_mut())
    {
        let absmax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = absmax / QMAX8 as f32;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut sum = 0i32;
        for (j, &v) in block.iter().enumerate() {
            let q = crate::round_to_i32(v * inv).clamp(-QMAX8, QMAX8);
            out[j / 2 + 16 * (j % 2)] = q as i8;
            sum += q;
        }
        *scale_out = scale;
        *offset_out = -8 * sum;
    }
}

/// One 64-byte-aligned cache line: 16 rows' four weight bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Lines per 32-value block: 8 quads of four values, one line per 16 rows each.
const LINES_PER_BLOCK: usize = 8 * VECS;

/// A panel of [`PANEL_ROWS`] unpacked weight rows for `vpdpbusd`.
pub struct Panel8 {
    /// `[block][quad 0..8][vector 0..VECS]` lines of `[row 0..16][4 nibbles q + 8]`. Quad k < 4
    /// is the low nibbles of the block's bytes `4k..4k+4` (values `8k, 8k+2, 8k+4, 8k+6`),
    /// quad k >= 4 the high nibbles of bytes `4(k-4)..`: the activations' even-then-odd
    /// order read four at a time.
    lines: Vec<Line>,
    /// `[block][row 0..PANEL_ROWS]` f32 weight scales.
    scales: Vec<f32>,
}

impl Panel8 {
    pub fn new(cols: usize) -> Self {
        let blocks = cols / 32;
        Panel8 {
            lines: vec![Line([0; 64]); blocks * LINES_PER_BLOCK],
            scales: vec![0.0; blocks * PANEL_ROWS],
        }
    }

    /// The row width this panel was made for.
    pub fn cols(&self) -> usize {
        self.scales.len() / PANEL_ROWS * 32
    }

    /// The four unsigned weight bytes of row `r`, block `b`, quad `k`.
    fn quad(&self, b: usize, k: usize, r: usize) -> [u8; 4] {
        let line = &self.lines[b * LINES_PER_BLOCK + VECS * k + r / 16].0;
        let at = 4 * (r % 16);
        [line[at], line[at + 1], line[at + 2], line[at + 3]]
    }

    fn set_quad(&mut self, b: usize, k: usize, r: usize, quad: [u8; 4]) {
        let line = &mut self.lines[b * LINES_PER_BLOCK + VECS * k + r / 16].0;
        let at = 4 * (r % 16);
        line[at..at + 4].copy_from_slice(&quad);
    }

    /// Unpacks rows `first..first + count` (count <= 64; missing rows are zero, weights
    /// and scales). `packed` and `scales` are the whole matrix.
    pub fn fill(&mut self, packed: &[u8], scales: &[u8], cols: usize, first: usize, count: usize) {
        assert!(count <= PANEL_ROWS && self.cols() == cols);
        assert!(packed.len() >= (first + count) * cols / 2);
        assert!(scales.len() >= (first + count) * cols / 16);
        #[cfg(target_arch = "x86_64")]
        if crate::Isa::Avx512Vnni.available() {
            unsafe { avx512::fill(self, packed, scales, cols, first, count) };
        } else {
            self.fill_portable(packed, cols, first, count);
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.fill_portable(packed, cols, first, count);
        self.fill_scales(scales, cols, first, count);
    }

    /// The f32 weight scales of rows `first..first + count` (missing rows zero), converted
    /// after the weights so the fast fill's prefetches of them have landed.
    fn fill_scales(&mut self, scales: &[u8], cols: usize, first: usize, count: usize) {
        let blocks = cols / 32;
        for r in 0..PANEL_ROWS {
            for b in 0..blocks {
                self.scales[b * PANEL_ROWS + r] = if r < count {
                    crate::formats::bf16_at(scales, (first + r) * blocks + b)
                } else {
                    0.0
                };
            }
        }
    }

    /// The weights of [`Panel8::fill`] in plain code.
    fn fill_portable(&mut self, packed: &[u8], cols: usize, first: usize, count: usize) {
        let (row_bytes, blocks) = (cols / 2, cols / 32);
        for r in 0..PANEL_ROWS {
            for b in 0..blocks {
                if r >= count {
                    for k in 0..8 {
                        self.set_quad(b, k, r, [0; 4]);
                    }
                    continue;
                }
                let row = first + r;
                let bytes = &packed[row * row_bytes + b * 16..row * row_bytes + b * 16 + 16];
                for k in 0..8 {
                    let shift = if k < 4 { 0 } else { 4 };
                    let at = 4 * (k % 4);
                    let quad = std::array::from_fn(|i| (bytes[at + i] >> shift) & 0x0f);
                    self.set_quad(b, k, r, quad);
                }
            }
        }
    }
}

/// `out[t][r] = panel row r . x[t]` for every token of `x`, padding tokens included:
/// `out` holds `[x.padded_tokens][PANEL_ROWS]` and is overwritten.
///
/// `upcoming` names the bytes the caller fills next (the following panel's packed rows
/// and scales, each one contiguous range): they are asked into L2 a share per token tile
/// while this panel computes, so that fill finds them in cache instead of waiting on its
/// DRAM streams at once (the fill took a quarter of the product's time at 64 tokens per
/// expert without it).
pub fn panel8_times_tokens(panel: &Panel8, x: &Q8Tokens, out: &mut [f32], upcoming: &[&[u8]]) {
    assert!(
        out.len() >= x.padded_tokens * PANEL_ROWS && panel.cols() == x.cols,
        "panel output needs room for the padded tokens, and the panel the tokens' width"
    );
    #[cfg(target_arch = "x86_64")]
    if crate::Isa::Avx512Vnni.available() {
        unsafe { avx512::panel8_times_tokens(panel, x, out, upcoming) };
        return;
    }
    let _ = upcoming;
    portable(panel, x, out);
}

/// The same integers and scaling in plain code (the reference of the tests, and the path
/// of CPUs without AVX-512 VNNI).
fn portable(panel: &Panel8, x: &Q8Tokens, out: &mut [f32]) {
    let blocks = x.cols / 32;
    for t in 0..x.padded_tokens {
        let xt = &x.values[t * x.cols..(t + 1) * x.cols];
        for r in 0..PANEL_ROWS {
            let mut total = 0.0f32;
            for b in 0..blocks {
                let mut acc = x.offsets[t * blocks + b];
                for k in 0..8 {
                    let quad = panel.quad(b, k, r);
                    for (i, &w) in quad.iter().enumerate() {
                        acc += w as i32 * xt[b * 32 + 4 * k + i] as i32;
                    }
                }
                total += acc as f32 * (panel.scales[b * PANEL_ROWS + r] * x.scales[t * blocks + b]);
            }
            out[t * PANEL_ROWS + r] = total;
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::{Panel8, Q8Tokens, LINES_PER_BLOCK, PANEL_ROWS, QMAX8, TOKEN_TILE, VECS};

    /// Lines of each row the fill asks for ahead of its reads (16 blocks).
    const PREFETCH_LINES: usize = 4;
    use crate::vnni::dpbusd;
    use std::arch::x86_64::*;

    /// [`super::quantize_token8`], one block per step: the same scale, reciprocal and
    /// rounding as the portable code; even and odd values are split by two byte
    /// permutations of the packed block.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn quantize_token8(
        x: &[f32],
        values: &mut [i8],
        scales: &mut [f32],
        offsets: &mut [i32],
    ) {
        let (limit, neg_limit) = (_mm512_set1_epi32(QMAX8), _mm512_set1_epi32(-QMAX8));
        // Bytes 0..16 of the block in natural order -> even positions first.
        let even_odd = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
        for b in 0..x.len() / 32 {
            let v0 = _mm512_loadu_ps(x.as_ptr().add(32 * b));
            let v1 = _mm512_loadu_ps(x.as_ptr().add(32 * b + 16));
            let absmax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            let scale = absmax / QMAX8 as f32;
            let inv = _mm512_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            let q0 = _mm512_max_epi32(
                _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), limit),
                neg_limit,
            );
            let q1 = _mm512_max_epi32(
                _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v1, inv)), limit),
                neg_limit,
            );
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
            // Values 0..16 and 16..32 as bytes, each half split even-then-odd (8 + 8).
            let (b0, b1) = (
                _mm_shuffle_epi8(_mm512_cvtepi32_epi8(q0), even_odd),
                _mm_shuffle_epi8(_mm512_cvtepi32_epi8(q1), even_odd),
            );
            // Evens of both halves, then odds of both halves.
            let evens = _mm_unpacklo_epi64(b0, b1);
            let odds = _mm_unpackhi_epi64(b0, b1);
            _mm_storeu_si128(values.as_mut_ptr().add(32 * b) as *mut _, evens);
            _mm_storeu_si128(values.as_mut_ptr().add(32 * b + 16) as *mut _, odds);
            scales[b] = scale;
            offsets[b] = -8 * sum;
        }
    }

    /// The weights of [`Panel8::fill`] (`scales` only prefetched): each row's 16 bytes of
    /// a block become 8 dwords (low nibbles of bytes 0..16, then high nibbles); 8 rows at a
    /// time are transposed so each quad's dwords of 16 rows form one line.
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    pub unsafe fn fill(
        panel: &mut Panel8,
        packed: &[u8],
        scales: &[u8],
        cols: usize,
        first: usize,
        count: usize,
    ) {
        let (row_bytes, blocks) = (cols / 2, cols / 32);
        let nibble = _mm_set1_epi8(0x0f);
        // The rows come from DRAM and are read 16 bytes per row per block across 64 rows:
        // more streams than the hardware prefetchers follow, so every line was a demand
        // miss (the fill took as long as the product at 64 tokens per expert). Hints ask
        // for each row's lines PREFETCH_LINES ahead, and for the scales before they are
        // converted at the end.
        let row_at = |r: usize| packed.as_ptr().wrapping_add((first + r) * row_bytes);
        let scale_bytes = blocks * 2;
        for r in 0..count {
            let scale_row = scales.as_ptr().wrapping_add((first + r) * scale_bytes);
            for at in (0..scale_bytes).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(scale_row.wrapping_add(at) as *const i8);
            }
            for line in 0..PREFETCH_LINES {
                _mm_prefetch::<_MM_HINT_T0>(row_at(r).wrapping_add(64 * line) as *const i8);
            }
        }
        let lines = panel.lines.as_mut_ptr() as *mut u8;
        for b in 0..blocks {
            if b % 4 == 0 {
                let ahead = b * 16 + 64 * PREFETCH_LINES;
                for r in 0..count {
                    _mm_prefetch::<_MM_HINT_T0>(row_at(r).wrapping_add(ahead) as *const i8);
                }
            }
            for half in 0..VECS {
                // Two groups of 8 rows, each transposed 8 x 8 (dwords).
                let mut groups = [[_mm256_setzero_si256(); 8]; 2];
                for (g, group) in groups.iter_mut().enumerate() {
                    let mut rows = [_mm256_setzero_si256(); 8];
                    for (i, row_vec) in rows.iter_mut().enumerate() {
                        let r = 16 * half + 8 * g + i;
                        if r >= count {
                            continue;
                        }
                        let at = packed.as_ptr().add((first + r) * row_bytes + b * 16);
                        let v = _mm_loadu_si128(at as *const _);
                        let lo = _mm_and_si128(v, nibble);
                        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), nibble);
                        *row_vec = _mm256_set_m128i(hi, lo);
                    }
                    *group = transpose8x8_epi32(rows);
                }
                for (k, (low, high)) in groups[0].iter().zip(&groups[1]).enumerate() {
                    let line = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(*low), *high);
                    let at = lines.add((b * LINES_PER_BLOCK + VECS * k + half) * 64);
                    _mm512_store_si512(at as *mut _, line);
                }
            }
        }
    }

    /// Transposes an 8 x 8 matrix of dwords held one row per register. (Loops, not
    /// closures: a closure would not inherit the target features.)
    #[inline(always)]
    pub(crate) unsafe fn transpose8x8_epi32(r: [__m256i; 8]) -> [__m256i; 8] {
        let mut t = [_mm256_setzero_si256(); 8];
        for i in 0..4 {
            t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        // u[4g + c]: columns c and c + 4 of rows 4g..4g+4 (c in 0..4), one per 128-bit lane.
        let mut u = [_mm256_setzero_si256(); 8];
        for g in 0..2 {
            let (a, b, c, d) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
            u[4 * g] = _mm256_unpacklo_epi64(a, c);
            u[4 * g + 1] = _mm256_unpackhi_epi64(a, c);
            u[4 * g + 2] = _mm256_unpacklo_epi64(b, d);
            u[4 * g + 3] = _mm256_unpackhi_epi64(b, d);
        }
        let mut out = [_mm256_setzero_si256(); 8];
        for c in 0..4 {
            out[c] = _mm256_permute2x128_si256::<0x20>(u[c], u[4 + c]);
            out[c + 4] = _mm256_permute2x128_si256::<0x31>(u[c], u[4 + c]);
        }
        out
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn panel8_times_tokens(
        panel: &Panel8,
        x: &Q8Tokens,
        out: &mut [f32],
        upcoming: &[&[u8]],
    ) {
        let tiles = x.padded_tokens / TOKEN_TILE;
        for tile in 0..tiles {
            crate::prefetch_share_l2(upcoming, tile, tiles);
            let t0 = tile * TOKEN_TILE;
            tile_kernel(panel, x, t0, out.as_mut_ptr().add(t0 * PANEL_ROWS));
        }
    }

    /// All blocks of 64 rows x 3 tokens, written to `sum` (`[3][64]` f32).
    #[inline(always)]
    unsafe fn tile_kernel(panel: &Panel8, x: &Q8Tokens, t0: usize, sum: *mut f32) {
        let mut out = [[_mm512_setzero_ps(); TOKEN_TILE]; VECS];
        let cols = x.cols;
        let blocks = cols / 32;
        let xv = x.values.as_ptr().add(t0 * cols);
        let offsets = x.offsets.as_ptr().add(t0 * blocks);
        let lines = panel.lines.as_ptr() as *const u8;
        for b in 0..blocks {
            // Each accumulator starts at its token's -8 * sum(x): the nibbles' +8 removed.
            let mut acc = [[_mm512_setzero_si512(); TOKEN_TILE]; VECS];
            for t in 0..TOKEN_TILE {
                let start = _mm512_set1_epi32(*offsets.add(t * blocks + b));
                for acc_r in acc.iter_mut() {
                    acc_r[t] = start;
                }
            }
            let block_lines = lines.add(b * LINES_PER_BLOCK * 64);
            let xt: [*const i32; TOKEN_TILE] =
                std::array::from_fn(|t| xv.add(t * cols + b * 32) as *const i32);
            // A macro, not a closure: closures do not inherit the target features.
            macro_rules! quad_step {
                ($k:expr) => {{
                    let k = $k;
                    let mut w = [_mm512_setzero_si512(); VECS];
                    for (v, w_v) in w.iter_mut().enumerate() {
                        *w_v = _mm512_load_si512(block_lines.add((VECS * k + v) * 64) as *const _);
                    }
                    for t in 0..TOKEN_TILE {
                        let xb = _mm512_set1_epi32(xt[t].add(k).read_unaligned());
                        for v in 0..VECS {
                            acc[v][t] = dpbusd(acc[v][t], w[v], xb);
                        }
                    }
                }};
            }
            quad_step!(0);
            quad_step!(1);
            quad_step!(2);
            quad_step!(3);
            quad_step!(4);
            quad_step!(5);
            quad_step!(6);
            quad_step!(7);
            let xs = x.scales.as_ptr().add(t0 * blocks + b);
            for v in 0..VECS {
                let ws = _mm512_loadu_ps(panel.scales.as_ptr().add(b * PANEL_ROWS + 16 * v));
                for t in 0..TOKEN_TILE {
                    let s = _mm512_set1_ps(*xs.add(t * blocks));
                    out[v][t] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(acc[v][t]),
                        _mm512_mul_ps(ws, s),
                        out[v][t],
                    );
                }
            }
        }
        for (v, out_v) in out.iter().enumerate() {
            for (t, o) in out_v.iter().enumerate() {
                _mm512_storeu_ps(sum.add(t * PANEL_ROWS + 16 * v), *o);
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
        let (mut a, mut b) = (vec![0i8; 7168], vec![0i8; 7168]);
        let (mut sa, mut sb) = (vec![0f32; 224], vec![0f32; 224]);
        let (mut oa, mut ob) = (vec![0i32; 224], vec![0i32; 224]);
        quantize_token8(&x, &mut a, &mut sa, &mut oa);
        quantize_token8_portable(&x, &mut b, &mut sb, &mut ob);
        assert_eq!(a, b);
        assert_eq!(sa, sb);
        assert_eq!(oa, ob);
        // Even-then-odd order: value 1 of block 0 sits at position 16.
        let inv = 1.0 / sb[0];
        assert_eq!(b[16] as i32, crate::round_to_i32(x[1] * inv));
        assert_eq!(b[1] as i32, crate::round_to_i32(x[2] * inv));
    }

    #[test]
    fn fast_fill_equals_portable_fill() {
        let (rows, cols) = (80, 224);
        let mut seed = 3;
        let packed: Vec<u8> = (0..rows * cols / 2).map(|_| lcg(&mut seed) as u8).collect();
        let scales: Vec<u8> = (0..rows * cols / 16)
            .map(|_| lcg(&mut seed) as u8)
            .collect();
        for (first, count) in [(0, 64), (64, 16), (3, 37), (7, 8)] {
            let (mut a, mut b) = (Panel8::new(cols), Panel8::new(cols));
            a.lines.fill(Line([7; 64]));
            b.lines.fill(Line([9; 64]));
            a.fill(&packed, &scales, cols, first, count);
            b.fill_portable(&packed, cols, first, count);
            b.fill_scales(&scales, cols, first, count);
            assert_eq!(a.lines, b.lines);
            let bits = |p: &Panel8| p.scales.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b));
        }
    }

    /// Odd row counts, K a multiple of 32 only, 1 token, partial token tiles and many
    /// tiles: the fast path equals the portable integers (up to f32 summation order), and
    /// both stay within int8 activation rounding of the f32 reference (relative L2 per
    /// token over all rows at most 1e-2; measured about 4e-3).
    #[test]
    fn gemm_matches_the_reference_on_odd_and_real_shapes() {
        let mut seed = 17;
        for (rows, cols, tokens) in [
            (37, 96, 1),
            (5, 224, 7),
            (32, 544, 13),
            (70, 2048, 20),
            (130, 2048, 4),
            (64, 96, 400),
        ] {
            let packed: Vec<u8> = (0..rows * cols / 2).map(|_| lcg(&mut seed) as u8).collect();
            let scales: Vec<u8> = (0..rows * cols / 32)
                .flat_map(|i| (0x3c00u16 + (i % 50) as u16).to_le_bytes())
                .collect();
            let x: Vec<f32> = (0..tokens * cols)
                .map(|_| (lcg(&mut seed) % 20001) as f32 / 10000.0 - 1.0)
                .collect();
            let q = Q8Tokens::new(&x, cols);
            let mut panel = Panel8::new(cols);
            let mut fast = vec![0.0f32; q.padded_tokens * PANEL_ROWS];
            let mut plain = vec![0.0f32; q.padded_tokens * PANEL_ROWS];
            let mut w = vec![0.0f32; cols];
            // Per token over the whole matrix: squared error and norm against f32.
            let mut errors = vec![(0.0f64, 0.0f64); tokens];
            for first in (0..rows).step_by(PANEL_ROWS) {
                let count = (rows - first).min(PANEL_ROWS);
                panel.fill(&packed, &scales, cols, first, count);
                panel8_times_tokens(&panel, &q, &mut fast, &[&packed[..64]]);
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
                    errors[t].0 += num;
                    errors[t].1 += den;
                    assert!((spread / den.max(1e-30)).sqrt() < 1e-6);
                    for r in count..PANEL_ROWS {
                        assert_eq!(fast[t * PANEL_ROWS + r], 0.0, "padding row {r}");
                    }
                }
                for t in tokens..q.padded_tokens {
                    assert!(fast[t * PANEL_ROWS..(t + 1) * PANEL_ROWS]
                        .iter()
                        .all(|&v| v == 0.0));
                }
            }
            for (t, (num, den)) in errors.iter().enumerate() {
                let err = (num / den.max(1e-30)).sqrt();
                assert!(err < 1e-2, "rows {rows} cols {cols} token {t}: {err}");
            }
        }
    }

    /// The int8 GEMM computes exactly what the int8 row kernel ([`crate::int4`]) computes
    /// for the same token: the same quantization, so the same integers per block.
    #[test]
    fn gemm_and_row_kernel_quantize_alike() {
        let mut seed = 99;
        let cols = 544;
        let x: Vec<f32> = (0..cols)
            .map(|_| (lcg(&mut seed) % 20001) as f32 / 777.0 - 12.0)
            .collect();
        let row = crate::int4::Q8Activations::new(&x);
        let q = Q8Tokens::new(&x, cols);
        for b in 0..cols / 32 {
            assert_eq!(q.scales[b], row.lane_scale[4 * b]);
            let sum: i32 = (0..4).map(|l| row.lane_offset[4 * b + l]).sum();
            assert_eq!(q.offsets[b], -sum);
            assert_eq!(
                &q.values[32 * b..32 * b + 16],
                &row.even[16 * b..16 * b + 16]
            );
            assert_eq!(
                &q.values[32 * b + 16..32 * b + 32],
                &row.odd[16 * b..16 * b + 16]
            );
        }
    }
}
