// RMSNorm, YaRN RoPE on interleaved pairs, SiLU-gated product, embedding gather.

// Rotates pairs (2i, 2i+1) of the `2 * half` values at `offset` in every (token, head):
// element (t, h, d) is x[t * token_stride + h * head_stride + offset + d].
extern "C" __global__ void rope_yarn(float* x, const int* positions, const float* inv_freq,
                                     float magnitude, int tokens, int heads, int token_stride,
                                     int head_stride, int offset, int half) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    int total = tokens * heads * half;
    if (idx >= total) return;
    int i = idx % half;
    int h = (idx / half) % heads;
    int t = idx / (half * heads);
    float angle = (float)positions[t] * inv_freq[i];
    float s, c;
    sincosf(angle, &s, &c);
    c *= magnitude;
    s *= magnitude;
    float* p = x + (size_t)t * token_stride + (size_t)h * head_stride + offset + 2 * i;
    float a = p[0], b = p[1];
    p[0] = a * c - b * s;
    p[1] = b * c + a * s;
}

// gate = silu(gate) * up, in place.
extern "C" __global__ void silu_mul(float* gate, const float* up, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = gate[i];
    gate[i] = g / (1.0f + expf(-g)) * up[i];
}

// out[rows[first + j]] += weight[first + j] * src[j] for rows of `dim` values
// (token-ordered scatter-add; one block per j, so rows must be distinct within a launch).
// `first` selects one expert's entries from a layer's packed index arrays; a null `weight`
// adds the rows as they are.
extern "C" __global__ void scatter_add_rows(float* out, const float* src, const int* rows,
                                            const float* weight, int first, int dim) {
    int j = blockIdx.x;
    float wj = weight ? weight[first + j] : 1.0f;
    float* o = out + (size_t)rows[first + j] * dim;
    const float* s = src + (size_t)j * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] += wj * s[i];
}

// One block per token: out[t] = table[ids[t]] (BF16 rows to f32).
extern "C" __global__ void embedding_bf16(const u16* table, const int* ids, float* out, int hidden) {
    const u16* row = table + (size_t)ids[blockIdx.x] * hidden;
    float* o = out + (size_t)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = bf16_to_f32(row[i]);
}

// In place, one block per row: the first `dim` values of each `stride`-wide row become
// x * rsqrt(mean(x^2) + eps) * w (the latent part of a cached KV row, or a whole row).
extern "C" __global__ void rms_norm_rows(float* x, const float* w, int dim, int stride, float eps) {
    __shared__ float scratch[32];
    float* row = x + (size_t)blockIdx.x * stride;
    float acc = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) acc += row[i] * row[i];
    float total = block_sum(acc, scratch);
    float inv = rsqrtf(total / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) row[i] = row[i] * inv * w[i];
}

// x += y over n values.
extern "C" __global__ void add_f32(float* x, const float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// pool[slots[j]] = rows[j] for rows of `width` values: one block per row (the latent
// cache write through the block tables).
extern "C" __global__ void write_rows(float* pool, const float* rows, const int* slots, int width) {
    int j = blockIdx.x;
    float* dst = pool + (size_t)slots[j] * width;
    const float* src = rows + (size_t)j * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = src[i];
}

// out[j] = x[rows[first + j]] for rows of `width` values: one block per row.
extern "C" __global__ void take_rows(const float* x, const int* rows, int first, float* out,
                                     int width) {
    int j = blockIdx.x;
    const float* src = x + (size_t)rows[first + j] * width;
    float* dst = out + (size_t)j * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = src[i];
}


// write_rows into a BF16 pool (latents rounded on write).
extern "C" __global__ void write_rows_bf16(u16* pool, const float* rows, const int* slots, int width) {
    int j = blockIdx.x;
    u16* dst = pool + (size_t)slots[j] * width;
    const float* src = rows + (size_t)j * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = f32_to_bf16(src[i]);
}

// x = hi + lo in two BF16 parts (hi = bf16(x), lo = bf16(x - hi)): with the BF16 weight
// exact, two BF16 tensor-core products accumulated in f32 give x's product to about
// 2^-17 relative, the f32 activations' accuracy at BF16 GEMM speed.
extern "C" __global__ void split_bf16(const float* x, u16* hi, u16* lo, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    u16 h = f32_to_bf16(x[i]);
    hi[i] = h;
    lo[i] = f32_to_bf16(x[i] - bf16_to_f32(h));
}
