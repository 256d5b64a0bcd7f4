// MLA attention.
//
// Decode (absorbed form): each sequence's query per head is q~ = [q_nope W_UK | q_pe]
// (`width` = kv_lora_rank + rope dim values), attending over the sequence's latents in the
// paged cache (pool [blocks, block_size, width], f32 or BF16, block table per sequence); values
// are the first `c` latent values. Long contexts split over chunks of KV blocks
// (`mla_decode_partial`, grid (heads, splits, seqs); over BF16 latents of K2-like widths
// `mla_decode_mma_bf16`, 16 heads per block on the tensor cores), merged by
// `mla_decode_combine`;
// the host picks the split count so the grid fills the GPU without the partial sums
// outgrowing memory.
//
// Prefill (naive form): q [n, heads, dq], keys/values expanded per head, causal by
// absolute position, online softmax over key chunks, one block per (query, head).

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

// Staging for the tensor-core decode kernel below: tiles of MH_TOKENS latents copied
// into shared memory as stored (pairs of BF16 in a word), fetched into registers 16 bytes
// per lane while the previous tile is computed.
#define MH_TOKENS 16
#define MH_WIDTH 576
// Words per staged latent row: 4 more than the widest row, so the eight tokens a warp
// reads at once fall in distinct banks (and rows stay 16-byte aligned).
#define MH_ROW_WORDS (MH_WIDTH / 2 + 4)
// 16-byte pieces of a row each lane fetches, and tile tokens each warp fetches.
#define MH_PIECES ((MH_WIDTH / 8 + 31) / 32)
#define MH_TOKENS_PER_WARP (MH_TOKENS / 8)

// Fetches this warp's tokens of the tile starting at t0 (end exclusive) into registers.
__device__ __forceinline__ void mh_fetch(uint4 pre[MH_TOKENS_PER_WARP][MH_PIECES],
                                         const u16* pool, const int* table, int block_size,
                                         int width, int t0, int end) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int pieces = width / 8;
    #pragma unroll
    for (int j = 0; j < MH_TOKENS_PER_WARP; j++) {
        int tok = t0 + warp + 8 * j;
        const uint4* row = nullptr;
        if (tok < end)
            row = (const uint4*)(pool + ((size_t)table[tok / block_size] * block_size +
                                         tok % block_size) * width);
        #pragma unroll
        for (int p = 0; p < MH_PIECES; p++) {
            int piece = lane + 32 * p;
            uint4 z = {0u, 0u, 0u, 0u};
            pre[j][p] = (row && piece < pieces) ? __ldg(row + piece) : z;
        }
    }
}

// ---- tensor-core MLA decode ------------------------------------------------------------
// d += a * b for one m16n8k16 tile: a 16x16 row-major, b 16x8 column-major, both BF16
// pairs in u32 registers laid out as PTX's mma.sync fragments, f32 accumulators.
// Compiled by NVRTC it is the instruction itself; elsewhere (the CPU emulator) the same
// fragments are gathered through shuffles and multiplied in f32.
__device__ __forceinline__ float bf16_lo(u32 v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(u32 v) { return __uint_as_float(v & 0xffff0000u); }

__device__ __forceinline__ void mma_bf16_16816(float d[4], const u32 a[4], const u32 b[2]) {
#ifdef __CUDACC_RTC__
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    // Lane (g, q) = (lane / 4, lane % 4) holds a rows g and g + 8, columns 2q, 2q + 1
    // (registers 0, 1) and 2q + 8, 2q + 9 (registers 2, 3); b rows 2q, 2q + 1 (register
    // 0) and 2q + 8, 2q + 9 (register 1) of column g; d rows g, g + 8, columns 2q, 2q + 1.
    int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    for (int kp = 0; kp < 8; kp++) {
        int high = kp >> 2;
        u32 r0 = __shfl_sync(0xffffffffu, a[2 * high], g * 4 + (kp & 3));
        u32 r8 = __shfl_sync(0xffffffffu, a[2 * high + 1], g * 4 + (kp & 3));
        u32 c0 = __shfl_sync(0xffffffffu, b[high], (2 * q) * 4 + (kp & 3));
        u32 c1 = __shfl_sync(0xffffffffu, b[high], (2 * q + 1) * 4 + (kp & 3));
        s0 += bf16_lo(r0) * bf16_lo(c0) + bf16_hi(r0) * bf16_hi(c0);
        s1 += bf16_lo(r0) * bf16_lo(c1) + bf16_hi(r0) * bf16_hi(c1);
        s2 += bf16_lo(r8) * bf16_lo(c0) + bf16_hi(r8) * bf16_hi(c0);
        s3 += bf16_lo(r8) * bf16_lo(c1) + bf16_hi(r8) * bf16_hi(c1);
    }
    d[0] += s0;
    d[1] += s1;
    d[2] += s2;
    d[3] += s3;
#endif
}

// Two f32 as a BF16 pair (x0 in the low half), and their remainders after rounding.
__device__ __forceinline__ void split_pair(float x0, float x1, u32& hi, u32& lo) {
    u16 h0 = f32_to_bf16(x0), h1 = f32_to_bf16(x1);
    u16 l0 = f32_to_bf16(x0 - bf16_to_f32(h0)), l1 = f32_to_bf16(x1 - bf16_to_f32(h1));
    hi = (u32)h0 | ((u32)h1 << 16);
    lo = (u32)l0 | ((u32)l1 << 16);
}

// MLA decode on the tensor cores: grid (ceil(heads / 16), splits, seqs), 256 threads. A
// block's 16 heads read each tile of MH_TOKENS latents once. Scores S = Q L^T are m16n8k16 products with the width's
// 16-wide steps dealt round-robin to the 8 warps (summed through shared memory); the
// softmax runs on the accumulators; values O += P L take the latent columns' 8-wide tiles
// round-robin. Queries and probabilities enter as BF16 pairs hi + lo (two products each),
// the latents as stored, so the sums keep f32 accuracy. Needs width % 16 == 0, width <=
// MH_WIDTH, c % 8 == 0 and c <= 512.
#define MM_HEADS 16
#define MM_KSTEPS_PER_WARP ((MH_WIDTH / 16 + 7) / 8)
#define MM_TILES_PER_WARP (512 / 8 / 8)

extern "C" __global__ void mla_decode_mma_bf16(const float* q, const u16* pool,
                                               const int* block_tables, const int* seq_lens,
                                               int max_blocks, int block_size, int width, int c,
                                               int heads, int chunk, float scale,
                                               float* part_out, float* part_max,
                                               float* part_sum) {
    __shared__ __align__(16) u32 lat[MH_TOKENS * MH_ROW_WORDS];
    __shared__ float partial[8 * MM_HEADS * MH_TOKENS];
    int h0 = blockIdx.x * MM_HEADS, split = blockIdx.y, s = blockIdx.z;
    int splits = gridDim.y;
    int nh = min(MM_HEADS, heads - h0);
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
    uint4 pre[MH_TOKENS_PER_WARP][MH_PIECES];
    mh_fetch(pre, pool, table, block_size, width, start, end);
    int ksteps = width / 16, ntiles = c / 8, pieces = width / 8;
    // This warp's query fragments (rows g, g + 8 of the block's heads), hi and lo.
    u32 qh[MM_KSTEPS_PER_WARP][4], ql[MM_KSTEPS_PER_WARP][4];
    #pragma unroll
    for (int i = 0; i < MM_KSTEPS_PER_WARP; i++) {
        int kk = warp + 8 * i;
        #pragma unroll
        for (int r = 0; r < 4; r++) {
            int head = h0 + g + 8 * (r & 1);
            int col = 16 * kk + 2 * tq + 8 * (r >> 1);
            float x0 = 0.0f, x1 = 0.0f;
            if (kk < ksteps && head < heads) {
                const float* qr = q + ((size_t)s * heads + head) * width + col;
                x0 = qr[0];
                x1 = qr[1];
            }
            split_pair(x0, x1, qh[i][r], ql[i][r]);
        }
    }
    float run_max[2] = {-INFINITY, -INFINITY}, run_sum[2] = {0.0f, 0.0f};  // rows g, g + 8
    float acc[MM_TILES_PER_WARP][4];
    #pragma unroll
    for (int j = 0; j < MM_TILES_PER_WARP; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    const u16* lat16 = (const u16*)lat;
    for (int t0 = start; t0 < end; t0 += MH_TOKENS) {
        int n = min(MH_TOKENS, end - t0);
        __syncthreads();  // the previous tile is done with `lat` and `partial`
        #pragma unroll
        for (int j = 0; j < MH_TOKENS_PER_WARP; j++) {
            uint4* row = (uint4*)(lat + (warp + 8 * j) * MH_ROW_WORDS);
            #pragma unroll
            for (int p = 0; p < MH_PIECES; p++) {
                int piece = lane + 32 * p;
                if (piece < pieces) row[piece] = pre[j][p];
            }
        }
        __syncthreads();
        if (t0 + MH_TOKENS < end)
            mh_fetch(pre, pool, table, block_size, width, t0 + MH_TOKENS, end);
        // This warp's share of the scores, tokens 8 nt + (0..8).
        float sc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
        #pragma unroll
        for (int i = 0; i < MM_KSTEPS_PER_WARP; i++) {
            int kk = warp + 8 * i;
            if (kk >= ksteps) break;
            #pragma unroll
            for (int nt = 0; nt < 2; nt++) {
                const u32* lr = lat + (8 * nt + g) * MH_ROW_WORDS + 8 * kk + tq;
                u32 b[2] = {lr[0], lr[4]};
                mma_bf16_16816(sc[nt], qh[i], b);
                mma_bf16_16816(sc[nt], ql[i], b);
            }
        }
        float* mine = partial + warp * MM_HEADS * MH_TOKENS;
        #pragma unroll
        for (int nt = 0; nt < 2; nt++) {
            int col = 8 * nt + 2 * tq;
            mine[g * MH_TOKENS + col] = sc[nt][0];
            mine[g * MH_TOKENS + col + 1] = sc[nt][1];
            mine[(g + 8) * MH_TOKENS + col] = sc[nt][2];
            mine[(g + 8) * MH_TOKENS + col + 1] = sc[nt][3];
        }
        __syncthreads();
        // Every warp sums the eight shares in the same order, so all hold equal scores.
        float p[2][4];
        #pragma unroll
        for (int nt = 0; nt < 2; nt++)
            #pragma unroll
            for (int e = 0; e < 4; e++) {
                int row = g + 8 * (e >> 1), col = 8 * nt + 2 * tq + (e & 1);
                float v = 0.0f;
                #pragma unroll
                for (int w = 0; w < 8; w++) v += partial[w * MM_HEADS * MH_TOKENS + row * MH_TOKENS + col];
                p[nt][e] = col < n ? v * scale : -INFINITY;
            }
        #pragma unroll
        for (int half = 0; half < 2; half++) {
            int e0 = 2 * half;
            float tm = fmaxf(fmaxf(p[0][e0], p[0][e0 + 1]), fmaxf(p[1][e0], p[1][e0 + 1]));
            tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 1));
            tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 2));
            float nm = fmaxf(run_max[half], tm);
            float sum = 0.0f;
            #pragma unroll
            for (int nt = 0; nt < 2; nt++)
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
            for (int j = 0; j < MM_TILES_PER_WARP; j++) {
                acc[j][e0] *= r;
                acc[j][e0 + 1] *= r;
            }
        }
        // Probabilities as the A operand: rows g, g + 8; tokens 2 tq (+8).
        u32 ph[4], pl[4];
        split_pair(p[0][0], p[0][1], ph[0], pl[0]);
        split_pair(p[0][2], p[0][3], ph[1], pl[1]);
        split_pair(p[1][0], p[1][1], ph[2], pl[2]);
        split_pair(p[1][2], p[1][3], ph[3], pl[3]);
        #pragma unroll
        for (int jj = 0; jj < MM_TILES_PER_WARP; jj++) {
            int j = warp + 8 * jj;
            if (j >= ntiles) break;
            int dn = 8 * j + g;
            const int stride = 2 * MH_ROW_WORDS;
            u32 b[2];
            b[0] = (u32)lat16[(2 * tq) * stride + dn] | ((u32)lat16[(2 * tq + 1) * stride + dn] << 16);
            b[1] = (u32)lat16[(2 * tq + 8) * stride + dn] |
                   ((u32)lat16[(2 * tq + 9) * stride + dn] << 16);
            mma_bf16_16816(acc[jj], ph, b);
            mma_bf16_16816(acc[jj], pl, b);
        }
    }
    #pragma unroll
    for (int jj = 0; jj < MM_TILES_PER_WARP; jj++) {
        int j = warp + 8 * jj;
        if (j >= ntiles) break;
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

// out[s, h, :] from the splits' partial sums: one block per (head, sequence).
extern "C" __global__ void mla_decode_combine(const float* part_out, const float* part_max,
                                              const float* part_sum, float* out, int c,
                                              int heads, int splits) {
    int h = blockIdx.x, s = blockIdx.y;
    size_t base = ((size_t)s * heads + h) * splits;
    float m = -INFINITY;
    for (int i = 0; i < splits; i++) m = fmaxf(m, part_max[base + i]);
    float denom = 0.0f;
    for (int i = 0; i < splits; i++)
        if (part_sum[base + i] > 0.0f) denom += expf(part_max[base + i] - m) * part_sum[base + i];
    float* o = out + ((size_t)s * heads + h) * c;
    for (int d = threadIdx.x; d < c; d += blockDim.x) {
        float acc = 0.0f;
        for (int i = 0; i < splits; i++)
            if (part_sum[base + i] > 0.0f)
                acc += expf(part_max[base + i] - m) * part_out[(base + i) * c + d];
        o[d] = acc / denom;
    }
}

// Causal attention for prefill: query i (position positions[i]) over keys 0..=positions[i].
// Query head h reads kv head g = h / group; element (t, g, d) of k is
// k[t * k_token_stride + g * k_head_stride + d]; v likewise with v_offset. One block (128
// threads) per (query, head); out [n, heads, dv].
extern "C" __global__ void mla_prefill(const float* q, const float* k, const float* v,
                                       const int* positions, int heads, int group, int dq, int dv,
                                       int k_token_stride, int k_head_stride,
                                       int v_token_stride, int v_head_stride, int v_offset,
                                       float scale, float* out) {
    __shared__ float p[128];
    __shared__ float scratch[32];
    __shared__ float qs[1024];
    int i = blockIdx.x, h = blockIdx.y, g = h / group;
    int last = positions[i];
    const float* qh = q + ((size_t)i * heads + h) * dq;
    for (int d = threadIdx.x; d < dq; d += blockDim.x) qs[d] = qh[d];
    __syncthreads();
    float m = -INFINITY, l = 0.0f;
    // Each thread owns output dims d = threadIdx.x + j * blockDim.x (dv <= 512).
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int t0 = 0; t0 <= last; t0 += blockDim.x) {
        int t = t0 + threadIdx.x;
        float sc = -INFINITY;
        if (t <= last) {
            const float* kt = k + (size_t)t * k_token_stride + (size_t)g * k_head_stride;
            float a = 0.0f;
            for (int d = 0; d < dq; d++) a += qs[d] * kt[d];
            sc = a * scale;
        }
        float cm = block_max(sc, scratch);
        float nm = fmaxf(m, cm);
        float pe = (t <= last) ? expf(sc - nm) : 0.0f;
        p[threadIdx.x] = pe;
        float ps = block_sum(pe, scratch);
        float rescale = expf(m - nm);
        l = l * rescale + ps;
        int n = min((int)blockDim.x, last + 1 - t0);
        for (int j = 0; j < 4; j++) {
            int d = threadIdx.x + j * blockDim.x;
            if (d >= dv) break;
            float a = acc[j] * rescale;
            for (int u = 0; u < n; u++)
                a += p[u] * v[(size_t)(t0 + u) * v_token_stride + (size_t)g * v_head_stride + v_offset + d];
            acc[j] = a;
        }
        m = nm;
        __syncthreads();
    }
    float* o = out + ((size_t)i * heads + h) * dv;
    for (int j = 0; j < 4; j++) {
        int d = threadIdx.x + j * blockDim.x;
        if (d < dv) o[d] = acc[j] / l;
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
