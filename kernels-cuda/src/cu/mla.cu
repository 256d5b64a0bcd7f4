// MLA attention.
//
// Decode (absorbed form): each sequence's query per head is q~ = [q_nope W_UK | q_pe]
// (`width` = kv_lora_rank + rope dim values), attending over the sequence's latents in the
// paged cache (pool [blocks, block_size, width], f32 or BF16, block table per sequence); values
// are the first `c` latent values. Long contexts split over chunks of KV blocks
// (`mla_decode_partial`, grid (heads, splits, seqs); over BF16 latents of K2-like widths
// `mla_decode_tc_bf16`, 16 heads per block on the tensor cores), merged by
// `mla_decode_combine`;
// the host picks the split count so the grid fills the GPU without the partial sums
// outgrowing memory. A prefill chunk runs the same kernels, one "sequence" per query
// (its length its position + 1): latents are read in place tile by tile, never expanded,
// and the partial sums stay the size of the output.

#define MAX_CHUNK 256

// A cached latent value: f32 pools as stored, BF16 pools widened.
__device__ __forceinline__ float latent_value(const float* p) { return *p; }
__device__ __forceinline__ float latent_value(const u16* p) { return bf16_to_f32(*p); }

// One (head, split, query) block of 128 threads: the split's keys [start, end) are read
// in tiles of MAX_CHUNK with an online softmax (running max and sum, accumulators
// rescaled per tile), so a split may cover any length; each thread owns output values
// d = threadIdx.x + j * blockDim.x (c <= 4 * blockDim.x).
template <typename T>
__device__ void mla_decode_partial_impl(const float* q, const T* pool,
                                        const int* block_tables, const int* seq_lens,
                                        int max_blocks, int block_size, int width, int c,
                                        int heads, int chunk, float scale,
                                        float* part_out, float* part_max, float* part_sum) {
    __shared__ float scores[MAX_CHUNK];
    __shared__ float scratch[32];
    int h = blockIdx.x, split = blockIdx.y, s = blockIdx.z;
    int splits = gridDim.y;
    int len = seq_lens[s];
    int start = split * chunk;
    int end = min(start + chunk, len);
    size_t slot = ((size_t)s * heads + h) * splits + split;
    float* out = part_out + slot * c;
    if (start >= end) {
        for (int d = threadIdx.x; d < c; d += blockDim.x) out[d] = 0.0f;
        if (threadIdx.x == 0) { part_max[slot] = -INFINITY; part_sum[slot] = 0.0f; }
        return;
    }
    const float* qh = q + ((size_t)s * heads + h) * width;
    const int* table = block_tables + (size_t)s * max_blocks;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float m = -INFINITY, l = 0.0f;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int t0 = start; t0 < end; t0 += MAX_CHUNK) {
        int t1 = min(t0 + MAX_CHUNK, end);
        for (int t = t0 + warp; t < t1; t += warps) {
            const T* lat = pool + ((size_t)table[t / block_size] * block_size + t % block_size) * width;
            float a = 0.0f;
            for (int d = lane; d < width; d += 32) a += qh[d] * latent_value(lat + d);
            a = warp_sum(a);
            if (lane == 0) scores[t - t0] = a * scale;
        }
        __syncthreads();
        float tm = -INFINITY;
        for (int i = threadIdx.x; i < t1 - t0; i += blockDim.x) tm = fmaxf(tm, scores[i]);
        tm = block_max(tm, scratch);
        float nm = fmaxf(m, tm);
        float ts = 0.0f;
        for (int i = threadIdx.x; i < t1 - t0; i += blockDim.x) {
            float p = expf(scores[i] - nm);
            scores[i] = p;
            ts += p;
        }
        ts = block_sum(ts, scratch);
        float rescale = expf(m - nm);
        l = l * rescale + ts;
        for (int j = 0; j < 4; j++) {
            int d = threadIdx.x + j * blockDim.x;
            if (d >= c) break;
            float a = acc[j] * rescale;
            for (int t = t0; t < t1; t++) {
                const T* lat = pool + ((size_t)table[t / block_size] * block_size + t % block_size) * width;
                a += scores[t - t0] * latent_value(lat + d);
            }
            acc[j] = a;
        }
        m = nm;
        __syncthreads();
    }
    for (int j = 0; j < 4; j++) {
        int d = threadIdx.x + j * blockDim.x;
        if (d < c) out[d] = acc[j];
    }
    if (threadIdx.x == 0) { part_max[slot] = m; part_sum[slot] = l; }
}

extern "C" __global__ void mla_decode_partial(const float* q, const float* pool,
                                              const int* block_tables, const int* seq_lens,
                                              int max_blocks, int block_size, int width, int c,
                                              int heads, int chunk, float scale,
                                              float* part_out, float* part_max, float* part_sum) {
    mla_decode_partial_impl(q, pool, block_tables, seq_lens, max_blocks, block_size, width, c,
                            heads, chunk, scale, part_out, part_max, part_sum);
}

// The same over a BF16 pool.
extern "C" __global__ void mla_decode_partial_bf16(const float* q, const u16* pool,
                                                   const int* block_tables, const int* seq_lens,
                                                   int max_blocks, int block_size, int width,
                                                   int c, int heads, int chunk, float scale,
                                                   float* part_out, float* part_max,
                                                   float* part_sum) {
    mla_decode_partial_impl(q, pool, block_tables, seq_lens, max_blocks, block_size, width, c,
                            heads, chunk, scale, part_out, part_max, part_sum);
}

// ---- tensor-core MLA decode -------------------------------------------------------------
// Grid (ceil(heads / 16), splits, seqs), MT_WARPS warps, MT_SHARED_BYTES of dynamic shared
// memory. A block's 16 heads attend over its split in tiles of MT_TOKENS latents, copied
// into shared memory asynchronously one tile ahead of the one being computed (two stages),
// rows zero-filled past the end. The blocks of a sequence's head groups are neighbours in
// the grid, so they run together and a tile comes from device memory once and from the L2
// cache for the others.
//  - Scores S = Q L^T: each warp owns a quarter of the width's 16-wide steps, its query
//    fragments (hi and lo) held in registers for the whole split, and makes partial
//    scores for all 16 heads x MT_TOKENS tokens; the four partials meet in shared memory.
//  - Softmax: every warp sums the partials in the same order at exactly the positions
//    its probability fragments need, so all warps hold the same probabilities.
//  - Values O += P L: each warp owns a quarter of the c value columns (8-wide tiles) and
//    keeps their accumulators in registers for the whole split.
// Queries and probabilities enter as BF16 pairs hi + lo (two products each), the latents as
// stored, so the sums keep f32 accuracy. Needs width % 16 == 0, width <= MT_WIDTH, c % 8
// == 0 and c <= MT_VALUES.
#define MT_TOKENS 32
#define MT_WIDTH 576
#define MT_VALUES 512
#define MT_WARPS 4
// Words per staged latent row: 4 more than the widest row, so the eight rows a fragment
// load touches fall in distinct banks (and rows stay 16-byte aligned).
#define MT_ROW_WORDS (MT_WIDTH / 2 + 4)
#define MT_STAGE_WORDS (MT_TOKENS * MT_ROW_WORDS)
#define MT_KSTEPS_PER_WARP ((MT_WIDTH / 16 + MT_WARPS - 1) / MT_WARPS)
#define MT_TILES_PER_WARP (MT_VALUES / 8 / MT_WARPS)
#define MT_NTILES (MT_TOKENS / 8)

// Starts the copies of tokens t0..t0 + MT_TOKENS (those past `end` as zeros) into `stage`:
// each warp a row at a time (one block-table lookup per row), lanes over its 16-byte pieces.
__device__ __forceinline__ void mt_stage_tile(u32* stage, const u16* pool, const int* table,
                                              int block_size, int width, int t0, int end) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int pieces = width / 8;
    for (int row = warp; row < MT_TOKENS; row += warps) {
        int tok = t0 + row;
        bool valid = tok < end;
        const u16* src = pool;
        if (valid)
            src = pool + ((size_t)table[tok / block_size] * block_size + tok % block_size) * width;
        for (int piece = lane; piece < pieces; piece += 32)
            cp_async16(stage + row * MT_ROW_WORDS + 4 * piece, valid ? src + 8 * piece : pool,
                       valid);
    }
}

extern "C" __global__ void __launch_bounds__(MT_WARPS * 32) mla_decode_tc_bf16(
    const float* q, const u16* pool, const int* block_tables, const int* seq_lens, int max_blocks,
    int block_size, int width, int c, int heads, int chunk, float scale, float* part_out,
    float* part_max, float* part_sum) {
    DYNAMIC_SHARED(u32, lat);  // two stages of MT_TOKENS rows
    __shared__ float partial[MT_WARPS * MT_NTILES * 4 * 32];  // [warp][n-tile][element][lane]
    int h0 = blockIdx.x * 16, split = blockIdx.y, s = blockIdx.z;
    int splits = gridDim.y;
    int nh = min(16, heads - h0);
    int len = seq_lens[s];
    int start = split * chunk;
    int end = min(start + chunk, len);
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int g = lane >> 2, tq = lane & 3;
    if (start >= end) {
        for (int h = 0; h < nh; h++) {
            size_t slot = ((size_t)s * heads + h0 + h) * splits + split;
            for (int d = tid; d < c; d += blockDim.x) part_out[slot * c + d] = 0.0f;
            if (tid == 0) { part_max[slot] = -INFINITY; part_sum[slot] = 0.0f; }
        }
        return;
    }
    const int* table = block_tables + (size_t)s * max_blocks;
    mt_stage_tile(lat, pool, table, block_size, width, start, end);
    cp_async_commit();
    int ksteps = width / 16, ntiles = c / 8;
    int k0 = warp * ksteps / MT_WARPS, k1 = (warp + 1) * ksteps / MT_WARPS;
    int j0 = warp * ntiles / MT_WARPS, j1 = (warp + 1) * ntiles / MT_WARPS;
    // This warp's query fragments (rows g, g + 8 of the block's heads), hi and lo.
    u32 qh[MT_KSTEPS_PER_WARP][4], ql[MT_KSTEPS_PER_WARP][4];
    #pragma unroll
    for (int i = 0; i < MT_KSTEPS_PER_WARP; i++) {
        int kk = k0 + i;
        #pragma unroll
        for (int r = 0; r < 4; r++) {
            int head = h0 + g + 8 * (r & 1);
            int col = 16 * kk + 2 * tq + 8 * (r >> 1);
            float x0 = 0.0f, x1 = 0.0f;
            if (kk < k1 && head < heads) {
                const float* qr = q + ((size_t)s * heads + head) * width + col;
                x0 = qr[0];
                x1 = qr[1];
            }
            split_pair(x0, x1, qh[i][r], ql[i][r]);
        }
    }
    float run_max[2] = {-INFINITY, -INFINITY}, run_sum[2] = {0.0f, 0.0f};  // rows g, g + 8
    float acc[MT_TILES_PER_WARP][4];
    #pragma unroll
    for (int j = 0; j < MT_TILES_PER_WARP; j++)
        acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    for (int t0 = start, it = 0; t0 < end; t0 += MT_TOKENS, it++) {
        int n = min(MT_TOKENS, end - t0);
        if (t0 + MT_TOKENS < end)
            mt_stage_tile(lat + ((it + 1) & 1) * MT_STAGE_WORDS, pool, table, block_size, width,
                          t0 + MT_TOKENS, end);
        cp_async_commit();
        cp_async_wait<1>();  // this tile's copies (the next tile's may still run)
        __syncthreads();
        const u32* tile = lat + (it & 1) * MT_STAGE_WORDS;
        // This warp's partial scores over its k-steps, tokens 8 nt + (0..8); the hi and
        // lo products accumulate apart (two chains of dependent products, not one).
        float sc[MT_NTILES][4], sl[MT_NTILES][4];
        #pragma unroll
        for (int nt = 0; nt < MT_NTILES; nt++)
            #pragma unroll
            for (int e = 0; e < 4; e++) sc[nt][e] = sl[nt][e] = 0.0f;
        #pragma unroll
        for (int i = 0; i < MT_KSTEPS_PER_WARP; i++) {
            int kk = k0 + i;
            if (kk >= k1) break;
            #pragma unroll
            for (int nt = 0; nt < MT_NTILES; nt++) {
                const u32* lr = tile + (8 * nt + g) * MT_ROW_WORDS + 8 * kk + tq;
                u32 b[2] = {lr[0], lr[4]};
                mma_bf16_16816(sc[nt], qh[i], b);
                mma_bf16_16816(sl[nt], ql[i], b);
            }
        }
        #pragma unroll
        for (int nt = 0; nt < MT_NTILES; nt++)
            #pragma unroll
            for (int e = 0; e < 4; e++)
                partial[((warp * MT_NTILES + nt) * 4 + e) * 32 + lane] = sc[nt][e] + sl[nt][e];
        __syncthreads();
        // Whole scores at this lane's positions (rows g, g + 8; tokens 8 nt + 2 tq (+1)).
        float p[MT_NTILES][4];
        #pragma unroll
        for (int nt = 0; nt < MT_NTILES; nt++)
            #pragma unroll
            for (int e = 0; e < 4; e++) {
                float v = 0.0f;
                #pragma unroll
                for (int w = 0; w < MT_WARPS; w++)
                    v += partial[((w * MT_NTILES + nt) * 4 + e) * 32 + lane];
                int col = 8 * nt + 2 * tq + (e & 1);
                p[nt][e] = col < n ? v * scale : -INFINITY;
            }
        #pragma unroll
        for (int half = 0; half < 2; half++) {
            int e0 = 2 * half;
            float tm = -INFINITY;
            #pragma unroll
            for (int nt = 0; nt < MT_NTILES; nt++) tm = fmaxf(tm, fmaxf(p[nt][e0], p[nt][e0 + 1]));
            tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 1));
            tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 2));
            float nm = fmaxf(run_max[half], tm);
            float sum = 0.0f;
            #pragma unroll
            for (int nt = 0; nt < MT_NTILES; nt++)
                #pragma unroll
                for (int e = e0; e < e0 + 2; e++) {
                    p[nt][e] = expf(p[nt][e] - nm);
                    sum += p[nt][e];
                }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            float r = expf(run_max[half] - nm);
            run_sum[half] = run_sum[half] * r + sum;
            run_max[half] = nm;
            #pragma unroll
            for (int j = 0; j < MT_TILES_PER_WARP; j++) {
                acc[j][e0] *= r;
                acc[j][e0 + 1] *= r;
            }
        }
        // Probabilities as A fragments, one per 16 tokens: rows g, g + 8; tokens 2 tq (+8).
        u32 ph[MT_NTILES / 2][4], pl[MT_NTILES / 2][4];
        #pragma unroll
        for (int kt = 0; kt < MT_NTILES / 2; kt++) {
            split_pair(p[2 * kt][0], p[2 * kt][1], ph[kt][0], pl[kt][0]);
            split_pair(p[2 * kt][2], p[2 * kt][3], ph[kt][1], pl[kt][1]);
            split_pair(p[2 * kt + 1][0], p[2 * kt + 1][1], ph[kt][2], pl[kt][2]);
            split_pair(p[2 * kt + 1][2], p[2 * kt + 1][3], ph[kt][3], pl[kt][3]);
        }
        const u16* tile16 = (const u16*)tile;
        const int stride = 2 * MT_ROW_WORDS;
        #pragma unroll
        for (int jj = 0; jj < MT_TILES_PER_WARP; jj++) {
            int j = j0 + jj;
            if (j >= j1) break;
            int dn = 8 * j + g;
            #pragma unroll
            for (int kt = 0; kt < MT_NTILES / 2; kt++) {
                const u16* col = tile16 + (16 * kt + 2 * tq) * stride + dn;
                u32 b[2];
                b[0] = (u32)col[0] | ((u32)col[stride] << 16);
                b[1] = (u32)col[8 * stride] | ((u32)col[9 * stride] << 16);
                mma_bf16_16816(acc[jj], ph[kt], b);
                mma_bf16_16816(acc[jj], pl[kt], b);
            }
        }
        __syncthreads();  // this stage and `partial` are free for the next tile
    }
    #pragma unroll
    for (int jj = 0; jj < MT_TILES_PER_WARP; jj++) {
        int j = j0 + jj;
        if (j >= j1) break;
        int d = 8 * j + 2 * tq;
        if (g < nh) {
            size_t slot = ((size_t)s * heads + h0 + g) * splits + split;
            part_out[slot * c + d] = acc[jj][0];
            part_out[slot * c + d + 1] = acc[jj][1];
        }
        if (g + 8 < nh) {
            size_t slot = ((size_t)s * heads + h0 + g + 8) * splits + split;
            part_out[slot * c + d] = acc[jj][2];
            part_out[slot * c + d + 1] = acc[jj][3];
        }
    }
    if (warp == 0 && tq == 0) {
        #pragma unroll
        for (int half = 0; half < 2; half++) {
            int row = g + 8 * half;
            if (row < nh) {
                size_t slot = ((size_t)s * heads + h0 + row) * splits + split;
                part_max[slot] = run_max[half];
                part_sum[slot] = run_sum[half];
            }
        }
    }
}

// out[s, h, :] from the splits' partial sums: one block per (head, sequence). Each split's
// weight exp(max_i - max) (zero for an empty split, whose partial sums are zeros) goes to
// shared memory once, so the loop over splits is independent loads and FMAs.
#define COMBINE_SPLITS 256
extern "C" __global__ void mla_decode_combine(const float* part_out, const float* part_max,
                                              const float* part_sum, float* out, int c,
                                              int heads, int splits) {
    __shared__ float weight[COMBINE_SPLITS];
    __shared__ float scratch[32];
    int h = blockIdx.x, s = blockIdx.y;
    size_t base = ((size_t)s * heads + h) * splits;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < splits; i += blockDim.x) m = fmaxf(m, part_max[base + i]);
    m = block_max(m, scratch);
    float denom = 0.0f;
    for (int i = threadIdx.x; i < splits; i += blockDim.x)
        if (part_sum[base + i] > 0.0f) denom += expf(part_max[base + i] - m) * part_sum[base + i];
    denom = block_sum(denom, scratch);
    // d = threadIdx.x + j * blockDim.x (c <= 4 * blockDim.x)
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int i0 = 0; i0 < splits; i0 += COMBINE_SPLITS) {
        int n = min(COMBINE_SPLITS, splits - i0);
        __syncthreads();  // the previous round is done with `weight`
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            size_t at = base + i0 + i;
            weight[i] = part_sum[at] > 0.0f ? expf(part_max[at] - m) : 0.0f;
        }
        __syncthreads();
        const float* po = part_out + (base + i0) * c;
        #pragma unroll 4
        for (int i = 0; i < n; i++) {
            float w = weight[i];
            #pragma unroll
            for (int j = 0; j < 4; j++) {
                int d = threadIdx.x + j * blockDim.x;
                if (d < c) acc[j] += w * po[(size_t)i * c + d];
            }
        }
    }
    float* o = out + ((size_t)s * heads + h) * c;
    #pragma unroll
    for (int j = 0; j < 4; j++) {
        int d = threadIdx.x + j * blockDim.x;
        if (d < c) o[d] = acc[j] / denom;
    }
}

// Absorbed queries. kv_b is [heads * (nope + v), latent] f32: per head, W_UK (nope rows)
// then W_UV (v rows). q is [tokens, heads, nope + rope]; out is [tokens, heads, latent +
// rope] with out[t, h, j] = sum_d q[t, h, d] * W_UK_h[d, j] for j < latent, followed by
// q's rope part. One block per (token, head); threads over j read kv_b rows coalesced.
extern "C" __global__ void mla_absorb_queries(const float* q, const float* kv_b, float* out,
                                              int heads, int nope, int rope, int v, int latent) {
    __shared__ float qs[512];
    int t = blockIdx.x, h = blockIdx.y;
    const float* qh = q + ((size_t)t * heads + h) * (nope + rope);
    float* o = out + ((size_t)t * heads + h) * (latent + rope);
    for (int d = threadIdx.x; d < nope; d += blockDim.x) qs[d] = qh[d];
    __syncthreads();
    const float* uk = kv_b + (size_t)h * (nope + v) * latent;
    for (int j = threadIdx.x; j < latent; j += blockDim.x) {
        float acc = 0.0f;
        for (int d = 0; d < nope; d++) acc += qs[d] * uk[(size_t)d * latent + j];
        o[j] = acc;
    }
    for (int r = threadIdx.x; r < rope; r += blockDim.x) o[latent + r] = qh[nope + r];
}

// Values from attended latents: out[t, h, e] = sum_j W_UV_h[e, j] * o[t, h, j], o being
// [tokens, heads, latent] and out [tokens, heads, v]. One block per (token, head), one
// warp per output value at a time, lanes over j.
extern "C" __global__ void mla_expand_values(const float* o, const float* kv_b, float* out,
                                             int heads, int nope, int v, int latent) {
    int t = blockIdx.x, h = blockIdx.y;
    const float* oh = o + ((size_t)t * heads + h) * latent;
    float* dst = out + ((size_t)t * heads + h) * v;
    const float* uv = kv_b + ((size_t)h * (nope + v) + nope) * latent;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int e = warp; e < v; e += warps) {
        const float* row = uv + (size_t)e * latent;
        float acc = 0.0f;
        for (int j = lane; j < latent; j += 32) acc += row[j] * oh[j];
        acc = warp_sum(acc);
        if (lane == 0) dst[e] = acc;
    }
}
