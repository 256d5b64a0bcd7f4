//! Tiled MLA attention on the CPU, for both forms, reading the cached latents in place
//! from the paged pool (through each sequence's block table, never copied out whole):
//! blocks of query rows against tiles of keys through `kernels-avx512`'s register-blocked
//! product, with an online softmax in f32 (see `kernels_avx512::attention`).
//!
//! - **Naive** (a prefill chunk): each key tile's latents are expanded through `kv_b`
//!   into every head's keys and values once, used by all of the chunk's queries, and
//!   dropped; memory is one tile's expansion, whatever the context.
//! - **Absorbed** (decode, and chunks where it is cheaper): every head of every query is
//!   one row against the latents themselves (keys: the whole latent row; values: its
//!   first `latent` values), so all heads of a token share one read of its latent. Long
//!   contexts are cut into key ranges computed on separate threads and merged.

use super::kernels::CpuKernels;
use crate::model::MlaDims;
use crate::weights::LinearWeight;
use kernels_avx512::attention::{finish_rows, gemm_acc, merge_rows, softmax_step, RowState};
use kernels_avx512::Isa;
use rayon::prelude::*;
use std::ops::Range;

/// Keys per tile of the naive form: one tile's expansion (`heads x (nope + v)` values per
/// key) is the working set every query block of the chunk reads.
const NAIVE_KEY_TILE: usize = 256;
/// Query rows per task of the naive form.
const NAIVE_QUERY_BLOCK: usize = 64;
/// Keys per tile of the absorbed form (latent rows of `latent + rope` values).
const ABSORBED_KEY_TILE: usize = 64;
/// Query rows up to which the absorbed form reads latents in place for the scores too
/// (a decode query's heads: 64 for K2) rather than packing each tile.
const ABSORBED_FEW_ROWS: usize = 64;
/// The fewest keys one thread takes of an absorbed context (two tiles): below it the
/// merge and a second tile's packing cost more than the thread saves.
const ABSORBED_MIN_KEYS_PER_PART: usize = 2 * ABSORBED_KEY_TILE;

/// One sequence's cached latents in the pool: row `pos` of its context is at
/// `pool[(table[pos / block] * block + pos % block) * width..]`.
#[derive(Clone, Copy)]
pub struct Latents<'a> {
    pub pool: &'a [f32],
    pub table: &'a [i32],
    pub block_size: usize,
    pub width: usize,
}

impl<'a> Latents<'a> {
    /// The rows `keys` as runs that lie consecutively in the pool (within one block):
    /// `(first key, the run's values)`.
    fn runs(&self, keys: Range<usize>) -> impl Iterator<Item = (usize, &'a [f32])> + '_ {
        let bs = self.block_size;
        let mut at = keys.start;
        std::iter::from_fn(move || {
            if at >= keys.end {
                return None;
            }
            let end = ((at / bs + 1) * bs).min(keys.end);
            let first = (self.table[at / bs] as usize * bs + at % bs) * self.width;
            let run = &self.pool[first..first + (end - at) * self.width];
            let start = at;
            at = end;
            Some((start, run))
        })
    }

    /// The rows `keys`, one slice of `width` values each, read where they lie.
    fn rows(&self, keys: Range<usize>) -> impl Iterator<Item = &'a [f32]> + '_ {
        let width = self.width;
        self.runs(keys)
            .flat_map(move |(_, run)| run.chunks_exact(width))
    }
}

/// `dst[k * ld + t] = rows[t][k]`: rows packed as columns for a block product. Column
/// by column, so the writes run in order and the rows being read (a tile's worth) stay
/// in the L1 cache; row by row, every write would touch another line of a buffer larger
/// than L1.
fn pack_columns(rows: &[&[f32]], dst: &mut [f32], ld: usize) {
    let Some(width) = rows.first().map(|r| r.len()) else {
        return;
    };
    for (k, column) in dst.chunks_mut(ld).take(width).enumerate() {
        for (x, row) in column.iter_mut().zip(rows) {
            *x = row[k];
        }
    }
}

/// Multiply-adds of attending `queries` (each seeing `visible` keys in total over all of
/// them) in the naive form, expansion included, and in the absorbed form, query folding
/// and value expansion included. A chunk runs in the cheaper form: the naive form pays
/// `kv_b` once per cached key and `qk + v` per (query, key, head); the absorbed form pays
/// `kv_b` once per query and `width + latent` per (query, key, head). Decode (one query)
/// is absorbed; a chunk of more than ~`kv_b_rows · latent / (width + latent - qk - v)`
/// queries (about 170 for K2) over a long context is naive.
pub fn naive_is_cheaper(d: MlaDims, queries: usize, keys: usize, visible: usize) -> bool {
    d.naive_work(keys, visible) < d.absorbed_work(queries, visible)
}

/// One thread's share of the naive form: one head over one block of queries, with
/// those rows' running softmax state and output.
struct NaiveTask {
    head: usize,
    rows: Range<usize>,
    state: Vec<RowState>,
    out: Vec<f32>,
}

/// The naive form for one sequence's queries `q` (`[n, heads, qk]`, rotated) at
/// `positions` (ascending), attending causally over its latents: `out` `[n, heads, v]`.
#[allow(clippy::too_many_arguments)]
pub fn naive(
    kernels: &dyn CpuKernels,
    isa: Isa,
    kv_b: &LinearWeight,
    q: &[f32],
    positions: &[usize],
    latents: Latents,
    d: MlaDims,
    scale: f32,
    out: &mut [f32],
) {
    let n = positions.len();
    let Some(&last) = positions.last() else {
        return;
    };
    let (heads, dq, dv, per_head) = (d.heads, d.qk(), d.v, d.kv_b_rows());
    let expanded_width = heads * per_head;
    // Per (head, query block): its rows' softmax state and output, head-major so each
    // task owns one contiguous piece.
    let blocks: Vec<Range<usize>> = (0..n)
        .step_by(NAIVE_QUERY_BLOCK)
        .map(|s| s..(s + NAIVE_QUERY_BLOCK).min(n))
        .collect();
    let mut tasks: Vec<NaiveTask> = (0..heads)
        .flat_map(|head| {
            blocks.iter().map(move |b| NaiveTask {
                head,
                rows: b.clone(),
                state: vec![RowState::default(); b.len()],
                out: vec![0.0; b.len() * dv],
            })
        })
        .collect();
    let mut c_kv = Vec::new();
    let mut expanded = Vec::new();
    for t0 in (0..=last).step_by(NAIVE_KEY_TILE) {
        let t1 = (t0 + NAIVE_KEY_TILE).min(last + 1);
        let tile = t1 - t0;
        // This tile's latents (the first `latent` of each row) through kv_b: every head's
        // key (nope part) and value, once for all of the chunk's queries.
        c_kv.clear();
        for (_, run) in latents.runs(t0..t1) {
            for row in run.chunks_exact(latents.width) {
                c_kv.extend_from_slice(&row[..d.latent]);
            }
        }
        expanded.clear();
        expanded.resize(tile * expanded_width, 0.0);
        kernels.linear(kv_b, 0..expanded_width, &c_kv, &mut expanded);
        // Each head's keys packed as columns (`[qk][tile]`) for the score product: the
        // nope part from the expansion, the rope part shared by all heads.
        let tile_pad = tile.next_multiple_of(16);
        let keys_t: Vec<Vec<f32>> = (0..heads)
            .into_par_iter()
            .map(|h| {
                let mut kt = vec![0.0f32; dq * tile_pad];
                let nope: Vec<&[f32]> = expanded
                    .chunks_exact(expanded_width)
                    .map(|row| &row[h * per_head..h * per_head + d.nope])
                    .collect();
                pack_columns(&nope, &mut kt, tile_pad);
                let rope: Vec<&[f32]> = latents.rows(t0..t1).map(|r| &r[d.latent..]).collect();
                pack_columns(&rope, &mut kt[d.nope * tile_pad..], tile_pad);
                kt
            })
            .collect();
        tasks.par_iter_mut().for_each(|task| {
            let NaiveTask {
                head: h,
                rows,
                state,
                out: o,
            } = task;
            // Queries before this tile see none of it (positions ascend).
            if positions[rows.end - 1] < t0 {
                return;
            }
            let m = rows.len();
            let mut s = vec![0.0f32; m * tile_pad];
            let a = &q[(rows.start * heads + *h) * dq..];
            gemm_acc(
                isa,
                (m, tile, dq),
                a,
                heads * dq,
                &keys_t[*h],
                tile_pad,
                &mut s,
                tile_pad,
            );
            let visible: Vec<usize> = rows
                .clone()
                .map(|i| (positions[i] + 1).saturating_sub(t0))
                .collect();
            softmax_step(
                isa,
                (m, tile),
                &mut s,
                tile_pad,
                scale,
                &visible,
                state,
                o,
                (dv, dv),
            );
            let values = &expanded[*h * per_head + d.nope..];
            gemm_acc(
                isa,
                (m, dv, tile),
                &s,
                tile_pad,
                values,
                expanded_width,
                o,
                dv,
            );
        });
    }
    for NaiveTask {
        head: h,
        rows,
        state,
        out: mut o,
    } in tasks
    {
        finish_rows(&state, &mut o, (dv, dv));
        for (r, i) in rows.enumerate() {
            let at = (i * heads + h) * dv;
            out[at..at + dv].copy_from_slice(&o[r * dv..(r + 1) * dv]);
        }
    }
}

/// One sequence's absorbed queries: rows `[n, heads, width]` at `positions`.
pub struct AbsorbedQueries<'a> {
    pub q: &'a [f32],
    pub positions: &'a [usize],
    pub latents: Latents<'a>,
}

/// The absorbed form for several sequences at once (decode): for each, its queries'
/// attention over its latents, `[n, heads, latent]` per sequence in `outs`. Sequences and
/// (for long contexts) ranges of their keys run on separate threads.
pub fn absorbed(isa: Isa, seqs: &[AbsorbedQueries], d: MlaDims, scale: f32) -> Vec<Vec<f32>> {
    let threads = rayon::current_num_threads().max(1);
    // Work items: (sequence, key range). With fewer sequences than threads (one decode
    // stream), each context is cut into ranges of whole tiles so every thread has one.
    let parts_per_seq = threads.div_ceil(seqs.len().max(1));
    let mut items = Vec::new();
    for (s, seq) in seqs.iter().enumerate() {
        let keys = seq.positions.iter().max().map_or(0, |p| p + 1);
        let parts = (keys / ABSORBED_MIN_KEYS_PER_PART).clamp(1, parts_per_seq);
        let per = keys
            .div_ceil(parts)
            .next_multiple_of(ABSORBED_KEY_TILE)
            .max(1);
        let mut at = 0;
        while at < keys {
            items.push((s, at..(at + per).min(keys)));
            at += per;
        }
        if keys == 0 {
            items.push((s, 0..0));
        }
    }
    let partials: Vec<(usize, Vec<RowState>, Vec<f32>)> = items
        .into_par_iter()
        .map(|(s, keys)| {
            let (state, o) = absorbed_part(isa, &seqs[s], keys, d, scale);
            (s, state, o)
        })
        .collect();
    let mut merged: Vec<Option<(Vec<RowState>, Vec<f32>)>> = seqs.iter().map(|_| None).collect();
    for (s, state, o) in partials {
        match &mut merged[s] {
            None => merged[s] = Some((state, o)),
            Some((into, o_into)) => merge_rows(into, o_into, &state, &o, (d.latent, d.latent)),
        }
    }
    merged
        .into_iter()
        .map(|m| {
            let (state, mut o) = m.unwrap_or_default();
            finish_rows(&state, &mut o, (d.latent, d.latent));
            o
        })
        .collect()
}

/// Keys `keys` of one sequence for all of its absorbed query rows: the unnormalised
/// output and softmax state of each row (`n x heads` rows).
fn absorbed_part(
    isa: Isa,
    seq: &AbsorbedQueries,
    keys: Range<usize>,
    d: MlaDims,
    scale: f32,
) -> (Vec<RowState>, Vec<f32>) {
    let (width, c, heads) = (d.width(), d.latent, d.heads);
    let m = seq.positions.len() * heads;
    let mut state = vec![RowState::default(); m];
    let mut o = vec![0.0f32; m * c];
    let visible_end: Vec<usize> = (0..m).map(|r| seq.positions[r / heads] + 1).collect();
    // Few rows (one decode query's heads): the queries are packed as columns once and
    // each run of latents, read in place, is the left operand (scores come out key by
    // key and are turned round, a tile of keys x rows). Many rows: each tile of latents
    // is packed as columns once for all of them.
    let few_rows = m <= ABSORBED_FEW_ROWS;
    let m_pad = m.next_multiple_of(16);
    let mut qt = Vec::new();
    if few_rows {
        qt.resize(width * m_pad, 0.0);
        let q_rows: Vec<&[f32]> = seq.q.chunks_exact(width).take(m).collect();
        pack_columns(&q_rows, &mut qt, m_pad);
    }
    let mut kt = Vec::new();
    let mut st = Vec::new();
    let mut rows = Vec::new();
    let mut s = Vec::new();
    let mut t0 = keys.start;
    while t0 < keys.end {
        let t1 = (t0 + ABSORBED_KEY_TILE).min(keys.end);
        let tile = t1 - t0;
        let tile_pad = tile.next_multiple_of(16);
        s.clear();
        s.resize(m * tile_pad, 0.0);
        if few_rows {
            st.clear();
            st.resize(tile * m_pad, 0.0);
            for (first, run) in seq.latents.runs(t0..t1) {
                let len = run.len() / width;
                let at = (first - t0) * m_pad;
                gemm_acc(
                    isa,
                    (len, m, width),
                    run,
                    width,
                    &qt,
                    m_pad,
                    &mut st[at..],
                    m_pad,
                );
            }
            for (t, key) in st.chunks_exact(m_pad).enumerate() {
                for (r, &x) in key[..m].iter().enumerate() {
                    s[r * tile_pad + t] = x;
                }
            }
        } else {
            // The tile's latent rows packed as columns for the score product.
            kt.clear();
            kt.resize(width * tile_pad, 0.0);
            rows.clear();
            rows.extend(seq.latents.rows(t0..t1));
            pack_columns(&rows, &mut kt, tile_pad);
            gemm_acc(
                isa,
                (m, tile, width),
                seq.q,
                width,
                &kt,
                tile_pad,
                &mut s,
                tile_pad,
            );
        }
        let visible: Vec<usize> = visible_end.iter().map(|v| v.saturating_sub(t0)).collect();
        softmax_step(
            isa,
            (m, tile),
            &mut s,
            tile_pad,
            scale,
            &visible,
            &mut state,
            &mut o,
            (c, c),
        );
        // Values: the first `latent` of each row, read in place run by run.
        for (first, run) in seq.latents.runs(t0..t1) {
            let len = run.len() / width;
            let p = &s[first - t0..];
            gemm_acc(isa, (m, c, len), p, tile_pad, run, width, &mut o, c);
        }
        t0 = t1;
    }
    (state, o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::cpu::kernels::{AttentionShape, KvView, ReferenceBackend};
    use crate::weights::{DenseDtype, TensorData};
    use std::sync::Arc;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn f32_weight(v: &[f32], rows: usize, cols: usize) -> LinearWeight {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut map = memmap2::MmapMut::map_anon(bytes.len()).expect("anonymous map");
        map.copy_from_slice(&bytes);
        let map = Arc::new(map.make_read_only().expect("read-only map"));
        LinearWeight::Dense {
            dtype: DenseDtype::F32,
            data: TensorData::new(map, 0, bytes.len()).expect("in range"),
            rows,
            cols,
        }
    }

    fn rel_l2(got: &[f32], want: &[f32]) -> f32 {
        let num: f32 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
        let den: f32 = want.iter().map(|b| b * b).sum();
        (num / den.max(1e-30)).sqrt()
    }

    /// A context of `len` latents scattered over a pool of 16-token blocks (the table
    /// visits blocks out of order), the model's small MLA dims and a kv_b.
    struct Case {
        d: MlaDims,
        pool: Vec<f32>,
        table: Vec<i32>,
        kv_b: LinearWeight,
    }

    const BLOCK: usize = 16;

    impl Case {
        fn new(len: usize) -> Self {
            let d = MlaDims {
                heads: 3,
                nope: 16,
                rope: 8,
                v: 12,
                latent: 32,
            };
            let blocks = len.div_ceil(BLOCK) + 3;
            let table: Vec<i32> = (0..blocks).map(|b| ((b * 7 + 2) % blocks) as i32).collect();
            let rows = d.heads * d.kv_b_rows();
            Case {
                d,
                pool: values(blocks * BLOCK * d.width(), 1),
                table,
                kv_b: f32_weight(&values(rows * d.latent, 2), rows, d.latent),
            }
        }

        fn latents(&self) -> Latents<'_> {
            Latents {
                pool: &self.pool,
                table: &self.table,
                block_size: BLOCK,
                width: self.d.width(),
            }
        }

        /// The latents of positions `0..len`, copied out (the reference's input).
        fn gathered(&self, len: usize) -> Vec<f32> {
            let w = self.d.width();
            (0..len)
                .flat_map(|p| {
                    let at = (self.table[p / BLOCK] as usize * BLOCK + p % BLOCK) * w;
                    self.pool[at..at + w].to_vec()
                })
                .collect()
        }

        /// The naive form one (query, head) at a time through the scalar reference.
        fn reference_naive(&self, q: &[f32], positions: &[usize]) -> Vec<f32> {
            let d = self.d;
            let len = positions.last().map_or(0, |p| p + 1);
            let lat = self.gathered(len);
            let c: Vec<f32> = lat
                .chunks_exact(d.width())
                .flat_map(|r| r[..d.latent].to_vec())
                .collect();
            let per = d.kv_b_rows();
            let mut expanded = vec![0.0f32; len * d.heads * per];
            ReferenceBackend.linear(&self.kv_b, 0..d.heads * per, &c, &mut expanded);
            let mut keys = vec![0.0f32; len * d.heads * d.qk()];
            for t in 0..len {
                for h in 0..d.heads {
                    let k = &mut keys[(t * d.heads + h) * d.qk()..(t * d.heads + h + 1) * d.qk()];
                    let e = (t * d.heads + h) * per;
                    k[..d.nope].copy_from_slice(&expanded[e..e + d.nope]);
                    k[d.nope..]
                        .copy_from_slice(&lat[t * d.width() + d.latent..(t + 1) * d.width()]);
                }
            }
            let mut out = vec![0.0f32; positions.len() * d.heads * d.v];
            ReferenceBackend.attention(
                q,
                KvView {
                    data: &keys,
                    token_stride: d.heads * d.qk(),
                    head_stride: d.qk(),
                    offset: 0,
                },
                KvView {
                    data: &expanded,
                    token_stride: d.heads * per,
                    head_stride: per,
                    offset: d.nope,
                },
                AttentionShape {
                    heads: d.heads,
                    kv_heads: d.heads,
                    qk_dim: d.qk(),
                    v_dim: d.v,
                },
                positions,
                0.125,
                &mut out,
            );
            out
        }

        /// The absorbed form through the scalar reference: every head over the latents.
        fn reference_absorbed(&self, q_lat: &[f32], positions: &[usize]) -> Vec<f32> {
            let d = self.d;
            let len = positions.iter().max().map_or(0, |p| p + 1);
            let lat = self.gathered(len);
            let view = KvView {
                data: &lat,
                token_stride: d.width(),
                head_stride: 0,
                offset: 0,
            };
            let mut out = vec![0.0f32; positions.len() * d.heads * d.latent];
            ReferenceBackend.attention(
                q_lat,
                view,
                view,
                AttentionShape {
                    heads: d.heads,
                    kv_heads: 1,
                    qk_dim: d.width(),
                    v_dim: d.latent,
                },
                positions,
                0.125,
                &mut out,
            );
            out
        }
    }

    /// A prefill chunk late in a long context (several key tiles, the last one cut by
    /// the causal mask, query blocks past the first) on every instruction set against the
    /// scalar reference, and the first chunk of a prompt.
    #[test]
    fn tiled_naive_attention_matches_the_reference() {
        let case = Case::new(700);
        let d = case.d;
        for positions in [(600..670).collect::<Vec<usize>>(), (0..90).collect()] {
            let q = values(positions.len() * d.heads * d.qk(), 3);
            let want = case.reference_naive(&q, &positions);
            for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
                let mut got = vec![0.0f32; want.len()];
                let l = case.latents();
                naive(
                    &ReferenceBackend,
                    isa,
                    &case.kv_b,
                    &q,
                    &positions,
                    l,
                    d,
                    0.125,
                    &mut got,
                );
                let err = rel_l2(&got, &want);
                assert!(err < 1e-5, "{isa:?} at {}: {err}", positions[0]);
            }
        }
    }

    /// Decode queries (one per sequence, contexts from 1 key to ones split over threads)
    /// and a short chunk, absorbed, on every instruction set against the reference.
    #[test]
    fn tiled_absorbed_attention_matches_the_reference() {
        let case = Case::new(2100);
        let d = case.d;
        let rows = d.heads * d.width();
        let positions: Vec<usize> = vec![0, 15, 16, 63, 64, 700, 2099];
        let q = values(positions.len() * rows, 4);
        let want = case.reference_absorbed(&q, &positions);
        for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
            let seqs: Vec<AbsorbedQueries> = positions
                .iter()
                .enumerate()
                .map(|(i, _)| AbsorbedQueries {
                    q: &q[i * rows..(i + 1) * rows],
                    positions: &positions[i..i + 1],
                    latents: case.latents(),
                })
                .collect();
            let got: Vec<f32> = absorbed(isa, &seqs, d, 0.125).concat();
            let err = rel_l2(&got, &want);
            assert!(err < 1e-5, "{isa:?}: {err}");
            // Several queries of one sequence as one item.
            let chunk = [AbsorbedQueries {
                q: &q,
                positions: &positions,
                latents: case.latents(),
            }];
            let got = absorbed(isa, &chunk, d, 0.125).concat();
            let err = rel_l2(&got, &want);
            assert!(err < 1e-5, "{isa:?} as one sequence: {err}");
        }
        // More query rows than ABSORBED_FEW_ROWS: tiles packed once for all of them.
        let many: Vec<usize> = (0..30).map(|i| i * 70).collect();
        assert!(many.len() * d.heads > ABSORBED_FEW_ROWS);
        let q = values(many.len() * rows, 5);
        let want = case.reference_absorbed(&q, &many);
        for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
            let chunk = [AbsorbedQueries {
                q: &q,
                positions: &many,
                latents: case.latents(),
            }];
            let got = absorbed(isa, &chunk, d, 0.125).concat();
            let err = rel_l2(&got, &want);
            assert!(err < 1e-5, "{isa:?} with many rows: {err}");
        }
    }

    /// The form choice: decode absorbed; a prompt's first chunk naive; over a long
    /// context, a short chunk absorbed and a long one naive (K2's dims).
    #[test]
    fn the_cheaper_form_is_chosen_by_arithmetic() {
        let k2 = MlaDims {
            heads: 64,
            nope: 128,
            rope: 64,
            v: 128,
            latent: 512,
        };
        let visible = |first: usize, n: usize| (first + 1..=first + n).sum::<usize>();
        assert!(!naive_is_cheaper(k2, 1, 40_000, 40_000));
        assert!(naive_is_cheaper(k2, 2048, 2048, visible(0, 2048)));
        assert!(!naive_is_cheaper(k2, 32, 40_032, visible(40_000, 32)));
        assert!(naive_is_cheaper(k2, 1024, 41_024, visible(40_000, 1024)));
    }
}
