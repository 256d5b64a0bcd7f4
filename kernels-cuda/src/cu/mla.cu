// MLA attention.
//
// Decode (absorbed form): each sequence's query per head is q~ = [q_nope W_UK | q_pe]
// (`width` = kv_lora_rank + rope dim values), attending over the sequence's latents in the
// paged cache (pool [blocks, block_size, width], f32 or BF16, block table per sequence); values
// are the first `c` latent values. Long contexts split over chunks of KV blocks
// (`mla_decode_partial`, grid (heads, splits, seqs)), merged by `mla_decode_combine`;
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
