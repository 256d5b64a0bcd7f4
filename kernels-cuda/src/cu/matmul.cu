// Quantized matrix products straight from the checkpoint's layouts:
//   y[t, r] = sum_k W[r, k] * x[t, k],  x: [tokens, cols] f32, y: [tokens, rows] f32.
// GEMV (decode, up to GEMV_TOKENS tokens per launch): one warp per weight row, so each
// weight is read once for all the launch's tokens. GEMM (prefill): 64x64 output tiles,
// weights decoded to f32 in shared memory 32 columns at a time.

#define GEMV_TOKENS 8
#define TILE 64
#define KSTEP 32

// ---- weight decoders: 8 consecutive values of row r starting at column k0 ----------

__device__ __forceinline__ void int4_load8(const u32* packed, const u16* scales, int cols,
                                           int group, int r, int k0, float v[8]) {
    u32 word = packed[(size_t)r * (cols / 8) + k0 / 8];
    float s = bf16_to_f32(scales[(size_t)r * (cols / group) + k0 / group]);
    #pragma unroll
    for (int j = 0; j < 8; j++) v[j] = (float)((int)((word >> (4 * j)) & 0xf) - 8) * s;
}

__device__ __forceinline__ void fp8_load8(const u8* data, const float* scale_inv, int cols,
                                          int block_r, int block_c, int r, int k0, float v[8]) {
    int scale_cols = (cols + block_c - 1) / block_c;
    const float* srow = scale_inv + (size_t)(r / block_r) * scale_cols;
    #pragma unroll
    for (int j = 0; j < 8; j++) {
        int k = k0 + j;
        v[j] = k < cols ? fp8_e4m3_to_f32(data[(size_t)r * cols + k]) * srow[k / block_c] : 0.0f;
    }
}

__device__ __forceinline__ void bf16_load8(const u16* w, int cols, int r, int k0, float v[8]) {
    #pragma unroll
    for (int j = 0; j < 8; j++) {
        int k = k0 + j;
        v[j] = k < cols ? bf16_to_f32(w[(size_t)r * cols + k]) : 0.0f;
    }
}

__device__ __forceinline__ void f32_load8(const float* w, int cols, int r, int k0, float v[8]) {
    #pragma unroll
    for (int j = 0; j < 8; j++) {
        int k = k0 + j;
        v[j] = k < cols ? w[(size_t)r * cols + k] : 0.0f;
    }
}

// ---- GEMV ----------------------------------------------------------------------------

#define GEMV_BODY(LOAD)                                                                   \
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;                              \
    int lane = threadIdx.x & 31;                                                          \
    if (warp >= rows) return;                                                             \
    float acc[GEMV_TOKENS];                                                               \
    _Pragma("unroll") for (int t = 0; t < GEMV_TOKENS; t++) acc[t] = 0.0f;               \
    for (int k0 = lane * 8; k0 < cols; k0 += 32 * 8) {                                    \
        float v[8];                                                                       \
        LOAD;                                                                             \
        _Pragma("unroll") for (int t = 0; t < GEMV_TOKENS; t++) {                          \
            if (t >= tokens) break;                                                       \
            const float* xt = x + (size_t)t * cols + k0;                                  \
            float a = 0.0f;                                                               \
            _Pragma("unroll") for (int j = 0; j < 8; j++) a += (k0 + j < cols) ? v[j] * xt[j] : 0.0f; \
            acc[t] += a;                                                                  \
        }                                                                                 \
    }                                                                                     \
    _Pragma("unroll") for (int t = 0; t < GEMV_TOKENS; t++) {                              \
        if (t >= tokens) break;                                                           \
        float s = warp_sum(acc[t]);                                                       \
        if (lane == 0) y[(size_t)t * rows + warp] = s;                                    \
    }

// INT4 rows: lane L reads packed words L, L + 32, ... (each warp load is 128 contiguous
// bytes of the row, and the activations each word meets are 32 contiguous bytes per lane,
// so both stay coalesced), eight words in flight per lane. Activations must be 16-byte
// aligned (they are read as float4): the GEMV's always are, and int4_row_dot, whose rows
// lie inside a larger buffer, checks and otherwise takes the 8-value path above. Every
// token's accumulator stays in a register (the token loop is unrolled to GEMV_TOKENS).
#define INT4_WORDS_IN_FLIGHT 8

__device__ __forceinline__ bool int4_wide_ok(const float* x, int cols) {
    return cols % 8 == 0 && ((size_t)x & 15) == 0;
}

// acc[t] += this lane's share of row r . x[t] (wide path); `x` rows of `cols` values.
template <int TOKENS>
__device__ __forceinline__ void int4_row_wide(const u32* packed, const u16* scales, int cols,
                                              int group, int r, const float* x, int tokens,
                                              float acc[TOKENS]) {
    int lane = threadIdx.x & 31;
    int words = cols / 8;
    const u32* row = packed + (size_t)r * words;
    const u16* srow = scales + (size_t)r * (cols / group);
    for (int w0 = lane; w0 < words; w0 += 32 * INT4_WORDS_IN_FLIGHT) {
        u32 word[INT4_WORDS_IN_FLIGHT];
        #pragma unroll
        for (int i = 0; i < INT4_WORDS_IN_FLIGHT; i++) {
            int w = w0 + 32 * i;
            word[i] = w < words ? __ldg(row + w) : 0u;
        }
        #pragma unroll
        for (int i = 0; i < INT4_WORDS_IN_FLIGHT; i++) {
            int w = w0 + 32 * i;
            if (w >= words) break;
            int k = 8 * w;
            float s = bf16_to_f32(srow[k / group]);
            float v[8];
            #pragma unroll
            for (int j = 0; j < 8; j++) v[j] = (float)((int)((word[i] >> (4 * j)) & 0xf) - 8) * s;
            #pragma unroll
            for (int t = 0; t < TOKENS; t++) {
                if (t < tokens) {
                    const float4* xt = (const float4*)(x + (size_t)t * cols + k);
                    float4 a = xt[0], b = xt[1];
                    acc[t] += v[0] * a.x + v[1] * a.y + v[2] * a.z + v[3] * a.w +
                              v[4] * b.x + v[5] * b.y + v[6] * b.z + v[7] * b.w;
                }
            }
        }
    }
}

// The wide GEMV for up to TOKENS tokens. x is a whole device allocation (CUDA aligns
// those to 256 bytes) and cols a multiple of 8 (8 values per packed word), so every
// token's row of x is 16-byte aligned.
template <int TOKENS>
__device__ __forceinline__ void int4_gemv_wide(const u32* packed, const u16* scales,
                                               const float* x, float* y, int rows, int cols,
                                               int group, int tokens) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp >= rows) return;
    float acc[TOKENS];
    #pragma unroll
    for (int t = 0; t < TOKENS; t++) acc[t] = 0.0f;
    int4_row_wide<TOKENS>(packed, scales, cols, group, warp, x, tokens, acc);
    #pragma unroll
    for (int t = 0; t < TOKENS; t++) {
        if (t < tokens) {
            float s = warp_sum(acc[t]);
            if (lane == 0) y[(size_t)t * rows + warp] = s;
        }
    }
}

// One token (decode of one sequence): a single accumulator keeps registers, and so the
// warps in flight per multiprocessor, at their most.
extern "C" __global__ void int4_gemv_1(const u32* packed, const u16* scales, const float* x,
                                       float* y, int rows, int cols, int group, int tokens) {
    int4_gemv_wide<1>(packed, scales, x, y, rows, cols, group, tokens);
}

extern "C" __global__ void int4_gemv(const u32* packed, const u16* scales, const float* x,
                                     float* y, int rows, int cols, int group, int tokens) {
    int4_gemv_wide<GEMV_TOKENS>(packed, scales, x, y, rows, cols, group, tokens);
}

extern "C" __global__ void fp8_gemv(const u8* data, const float* scale_inv, const float* x,
                                    float* y, int rows, int cols, int block_r, int block_c,
                                    int tokens) {
    GEMV_BODY(fp8_load8(data, scale_inv, cols, block_r, block_c, warp, k0, v))
}

extern "C" __global__ void bf16_gemv(const u16* w, const float* x, float* y, int rows, int cols,
                                     int tokens) {
    GEMV_BODY(bf16_load8(w, cols, warp, k0, v))
}

extern "C" __global__ void f32_gemv(const float* w, const float* x, float* y, int rows, int cols,
                                    int tokens) {
    GEMV_BODY(f32_load8(w, cols, warp, k0, v))
}

// ---- GEMM ----------------------------------------------------------------------------
// Block (16, 16): thread (tx, ty) computes rows ty*4..+4 and tokens tx*4..+4 of the tile.

#define GEMM_BODY(LOAD)                                                                   \
    __shared__ float ws[TILE][KSTEP + 1];                                                 \
    __shared__ float xs[TILE][KSTEP + 1];                                                 \
    int tid = threadIdx.y * 16 + threadIdx.x;                                             \
    int row0 = blockIdx.y * TILE, tok0 = blockIdx.x * TILE;                               \
    float acc[4][4];                                                                      \
    _Pragma("unroll") for (int i = 0; i < 4; i++)                                         \
        _Pragma("unroll") for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;                   \
    for (int kb = 0; kb < cols; kb += KSTEP) {                                            \
        /* 64 rows x 4 chunks of 8 = 256 loads: one per thread. */                        \
        int lr = tid / 4, lc = (tid % 4) * 8;                                             \
        int r = row0 + lr, k0 = kb + lc;                                                  \
        float v[8];                                                                       \
        if (r < rows && k0 < cols) { LOAD; }                                              \
        else { _Pragma("unroll") for (int j = 0; j < 8; j++) v[j] = 0.0f; }              \
        _Pragma("unroll") for (int j = 0; j < 8; j++) ws[lr][lc + j] = v[j];              \
        int t = tok0 + lr;                                                                \
        _Pragma("unroll") for (int j = 0; j < 8; j++)                                     \
            xs[lr][lc + j] = (t < tokens && k0 + j < cols) ? x[(size_t)t * cols + k0 + j] : 0.0f; \
        __syncthreads();                                                                  \
        for (int kk = 0; kk < KSTEP; kk++) {                                              \
            float a[4], b[4];                                                             \
            _Pragma("unroll") for (int i = 0; i < 4; i++) a[i] = ws[threadIdx.y * 4 + i][kk]; \
            _Pragma("unroll") for (int j = 0; j < 4; j++) b[j] = xs[threadIdx.x * 4 + j][kk]; \
            _Pragma("unroll") for (int i = 0; i < 4; i++)                                 \
                _Pragma("unroll") for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];   \
        }                                                                                 \
        __syncthreads();                                                                  \
    }                                                                                     \
    _Pragma("unroll") for (int i = 0; i < 4; i++) {                                       \
        int r = row0 + threadIdx.y * 4 + i;                                               \
        _Pragma("unroll") for (int j = 0; j < 4; j++) {                                   \
            int t = tok0 + threadIdx.x * 4 + j;                                           \
            if (r < rows && t < tokens) y[(size_t)t * rows + r] = acc[i][j];              \
        }                                                                                 \
    }

extern "C" __global__ void int4_gemm(const u32* packed, const u16* scales, const float* x,
                                     float* y, int rows, int cols, int group, int tokens) {
    GEMM_BODY(int4_load8(packed, scales, cols, group, r, k0, v))
}

extern "C" __global__ void fp8_gemm(const u8* data, const float* scale_inv, const float* x,
                                    float* y, int rows, int cols, int block_r, int block_c,
                                    int tokens) {
    GEMM_BODY(fp8_load8(data, scale_inv, cols, block_r, block_c, r, k0, v))
}

extern "C" __global__ void bf16_gemm(const u16* w, const float* x, float* y, int rows, int cols,
                                     int tokens) {
    GEMM_BODY(bf16_load8(w, cols, r, k0, v))
}

extern "C" __global__ void f32_gemm(const float* w, const float* x, float* y, int rows, int cols,
                                    int tokens) {
    GEMM_BODY(f32_load8(w, cols, r, k0, v))
}

// ---- transposed products (absorbed MLA folds queries through a band of kv_b rows) ----
// A band of `n` rows starting at `row0` decoded to f32 [n, cols], one thread per value;
// then y[t, k] = sum_i x[t, i] * band[i, k], one thread per (t, k): neighbouring threads
// read neighbouring columns of a band row.

extern "C" __global__ void int4_dequant_rows(const u32* packed, const u16* scales, float* out,
                                             int row0, int n, int cols, int group) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)n * cols) return;
    int i = (int)(idx / cols), k = (int)(idx % cols), r = row0 + i;
    u32 word = packed[(size_t)r * (cols / 8) + k / 8];
    float s = bf16_to_f32(scales[(size_t)r * (cols / group) + k / group]);
    out[idx] = (float)((int)((word >> (4 * (k % 8))) & 0xf) - 8) * s;
}

// An INT4 weight [rows, cols] as two BF16 matrices with w = hi + lo exactly: a nibble
// (4 bits) times a BF16 scale (8 significant bits) needs at most 11 significant bits, so
// the remainder lo fits a BF16 exactly. One thread per packed word (8 values).
extern "C" __global__ void int4_dequant_split_bf16(const u32* packed, const u16* scales,
                                                   u16* hi, u16* lo, int rows, int cols,
                                                   int group) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t words = (size_t)rows * (cols / 8);
    if (i >= words) return;
    int r = (int)(i / (cols / 8)), k0 = (int)(i % (cols / 8)) * 8;
    float v[8];
    int4_load8(packed, scales, cols, group, r, k0, v);
    size_t at = (size_t)r * cols + k0;
    #pragma unroll
    for (int j = 0; j < 8; j++) {
        u16 h = f32_to_bf16(v[j]);
        hi[at + j] = h;
        lo[at + j] = f32_to_bf16(v[j] - bf16_to_f32(h));
    }
}

extern "C" __global__ void fp8_dequant_rows(const u8* data, const float* scale_inv, float* out,
                                            int row0, int n, int cols, int block_r, int block_c) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)n * cols) return;
    int i = (int)(idx / cols), k = (int)(idx % cols), r = row0 + i;
    int scale_cols = (cols + block_c - 1) / block_c;
    out[idx] = fp8_e4m3_to_f32(data[(size_t)r * cols + k]) *
               scale_inv[(size_t)(r / block_r) * scale_cols + k / block_c];
}

extern "C" __global__ void bf16_dequant_rows(const u16* w, float* out, int row0, int n, int cols) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)n * cols) return;
    out[idx] = bf16_to_f32(w[(size_t)row0 * cols + idx]);
}

extern "C" __global__ void f32_matmul_t(const float* band, const float* x, float* y, int n,
                                        int cols, int tokens) {
    int k = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
    if (k >= cols || t >= tokens) return;
    const float* xt = x + (size_t)t * n;
    float acc = 0.0f;
    for (int i = 0; i < n; i++) acc += xt[i] * band[(size_t)i * cols + k];
    y[(size_t)t * cols + k] = acc;
}

// ---- grouped INT4 experts (decode) ------------------------------------------------------
// A MoE layer's routed experts for a few tokens in three launches instead of a handful per
// expert. The work is a list of (token, expert slot) pairs, ordered by token and, within
// a token, in the order its experts are added; `experts` holds, per slot, the device
// addresses of the expert's gate, up and down weights and scales:
//   experts[0 * n + s] gate packed   experts[1 * n + s] gate scales
//   experts[2 * n + s] up packed     experts[3 * n + s] up scales
//   experts[4 * n + s] down packed   experts[5 * n + s] down scales
// Each product is the GEMV above for one token (one warp per weight row, lanes over
// columns in the same order), so the sums are those of the per-expert path.

__device__ __forceinline__ float int4_row_dot(const u32* packed, const u16* scales, int cols,
                                              int group, int r, const float* x) {
    int lane = threadIdx.x & 31;
    float acc = 0.0f;
    if (int4_wide_ok(x, cols)) {
        float one[1] = {0.0f};
        int4_row_wide<1>(packed, scales, cols, group, r, x, 1, one);
        return warp_sum(one[0]);
    }
    for (int k0 = lane * 8; k0 < cols; k0 += 32 * 8) {
        float v[8];
        int4_load8(packed, scales, cols, group, r, k0, v);
        const float* xt = x + k0;
        float a = 0.0f;
        #pragma unroll
        for (int j = 0; j < 8; j++) a += (k0 + j < cols) ? v[j] * xt[j] : 0.0f;
        acc += a;
    }
    return warp_sum(acc);
}

// h[p, r] = silu(gate_e[r] . x[t]) * (up_e[r] . x[t]) for pair p = (t, e);
// grid (ceil(inter / warps per block), pairs).
extern "C" __global__ void moe_gate_up_int4(const unsigned long long* experts, int slots,
                                            const int* pairs, const float* x, float* h,
                                            int hidden, int inter, int group) {
    int r = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, p = blockIdx.y;
    if (r >= inter) return;
    int t = pairs[2 * p], s = pairs[2 * p + 1];
    const float* xt = x + (size_t)t * hidden;
    float g = int4_row_dot((const u32*)experts[s], (const u16*)experts[slots + s], hidden, group,
                           r, xt);
    float u = int4_row_dot((const u32*)experts[2 * slots + s], (const u16*)experts[3 * slots + s],
                           hidden, group, r, xt);
    if ((threadIdx.x & 31) == 0) h[(size_t)p * inter + r] = g / (1.0f + expf(-g)) * u;
}

// y[p, r] = down_e[r] . h[p]; grid (ceil(hidden / warps per block), pairs).
extern "C" __global__ void moe_down_int4(const unsigned long long* experts, int slots,
                                         const int* pairs, const float* h, float* y, int hidden,
                                         int inter, int group) {
    int r = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, p = blockIdx.y;
    if (r >= hidden) return;
    int s = pairs[2 * p + 1];
    float d = int4_row_dot((const u32*)experts[4 * slots + s], (const u16*)experts[5 * slots + s],
                           inter, group, r, h + (size_t)p * inter);
    if ((threadIdx.x & 31) == 0) y[(size_t)p * hidden + r] = d;
}

// out[t] += weight[p] * y[p] for each token's pairs in order: block b adds the pairs
// starts[b]..starts[b + 1], which all belong to token pairs[2 * starts[b]].
extern "C" __global__ void moe_combine(float* out, const float* y, const float* weight,
                                       const int* pairs, const int* starts, int hidden) {
    int first = starts[blockIdx.x], end = starts[blockIdx.x + 1];
    float* o = out + (size_t)pairs[2 * first] * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float acc = o[i];
        for (int p = first; p < end; p++) acc += weight[p] * y[(size_t)p * hidden + i];
        o[i] = acc;
    }
}

// ---- INT4 products on the tensor cores ---------------------------------------------------
// y[t, r] = sum_k W[r, k] x[t, k] with W's nibbles widened in registers (no BF16 copy of
// the weight) and multiplied on the tensor cores (m16n8k16, f32 accumulation):
//  - a warp's 16 rows (g and g + 8 of the fragment) meet the columns in units of 32, one
//    packed word per row from each of the quad's lanes q (word 4u + q); since a unit lies
//    inside one scale group (groups are multiples of 32), its product is the exact integer
//    sum over (nibble - 8) times x, scaled in f32 by the row's group scale;
//  - the 8 values of a word enter two products, the slots of lane q taking nibbles
//    (0, 4) and (1, 5), then (2, 6) and (3, 7), so one AND-OR and one packed FMA turn two
//    nibbles into the BF16 pair (n - 8) the fragment wants;
//  - activations enter as BF16 hi + lo (two products each, so f32 accuracy), split once
//    per call by `int4_tc_split_x` into exactly the B fragments' order.
// The columns are dealt to TC_WARPS warps (contiguous ranges of units), whose partial
// sums meet in shared memory; a block makes 16 rows for 8 * NT tokens.

#define TC_WARPS 16
#define TC_UNROLL 8

// xs: per tile of 8 tokens, per unit u of 32 columns, per token slot (0..8), per quad lane
// q: two uint4 (hi, then lo) whose component c holds x[t][32u + 8q + c] in its low half
// and x[t][32u + 8q + c + 4] in its high half. Slots past `tokens` are zero. One thread
// per (tile, unit, slot, q).
extern "C" __global__ void int4_tc_split_x(const float* x, uint4* xs, int tokens, int cols) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    int units = cols / 32;
    size_t tiles = (size_t)(tokens + 7) / 8;
    if (i >= tiles * units * 32) return;
    int q = (int)(i & 3), slot = (int)((i >> 2) & 7);
    size_t rest = i >> 5;
    int u = (int)(rest % units);
    int t = (int)(rest / units) * 8 + slot;
    float v[8];
    #pragma unroll
    for (int j = 0; j < 8; j++) v[j] = t < tokens ? x[(size_t)t * cols + 32 * u + 8 * q + j] : 0.0f;
    u32 hi[4], lo[4];
    #pragma unroll
    for (int c = 0; c < 4; c++) split_pair(v[c], v[c + 4], hi[c], lo[c]);
    uint4 h = {hi[0], hi[1], hi[2], hi[3]}, l = {lo[0], lo[1], lo[2], lo[3]};
    xs[2 * i] = h;
    xs[2 * i + 1] = l;
}

// acc[nt] += this warp's share (units u0..u1) of rows row0 + g, row0 + g + 8 times the
// tokens of n-tile nt (xs at the block's first tile) for the first `tiles` n-tiles (a last
// block may have fewer than NT; the others' accumulators stay as they are).
template <int NT>
__device__ __forceinline__ void int4_tc_rows(const u32* packed, const u16* scales, int rows,
                                             int cols, int group, int row0, const uint4* xs,
                                             int tiles, int u0, int u1, float acc[NT][4]) {
    int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    int units = cols / 32, groups = cols / group;
    // Rows past the end read row 0 (their sums are never stored).
    int ra = row0 + g < rows ? row0 + g : 0, rb = row0 + g + 8 < rows ? row0 + g + 8 : 0;
    const u32* wa = packed + (size_t)ra * (cols / 8) + q;
    const u32* wb = packed + (size_t)rb * (cols / 8) + q;
    const u16* sa = scales + (size_t)ra * groups;
    const u16* sb = scales + (size_t)rb * groups;
    for (int u = u0; u < u1; u += TC_UNROLL) {
        u32 word[TC_UNROLL][2];
        u16 scale[TC_UNROLL][2];
        #pragma unroll
        for (int i = 0; i < TC_UNROLL; i++) {
            int uu = u + i < u1 ? u + i : u0;
            word[i][0] = __ldg(wa + 4 * uu);
            word[i][1] = __ldg(wb + 4 * uu);
            int s = 32 * uu / group;
            scale[i][0] = __ldg(sa + s);
            scale[i][1] = __ldg(sb + s);
        }
        #pragma unroll
        for (int i = 0; i < TC_UNROLL; i++) {
            if (u + i >= u1) break;
            u32 a0[4] = {int4_pair_bf16(word[i][0]), int4_pair_bf16(word[i][1]),
                         int4_pair_bf16(word[i][0] >> 4), int4_pair_bf16(word[i][1] >> 4)};
            u32 a1[4] = {int4_pair_bf16(word[i][0] >> 8), int4_pair_bf16(word[i][1] >> 8),
                         int4_pair_bf16(word[i][0] >> 12), int4_pair_bf16(word[i][1] >> 12)};
            float s0 = bf16_to_f32(scale[i][0]), s1 = bf16_to_f32(scale[i][1]);
            #pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                if (nt >= tiles) break;
                const uint4* xp = xs + (((size_t)nt * units + u + i) * 32 + lane) * 2;
                uint4 h = xp[0], l = xp[1];
                float t[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                u32 b[2] = {h.x, h.y};
                mma_bf16_16816(t, a0, b);
                b[0] = l.x;
                b[1] = l.y;
                mma_bf16_16816(t, a0, b);
                b[0] = h.z;
                b[1] = h.w;
                mma_bf16_16816(t, a1, b);
                b[0] = l.z;
                b[1] = l.w;
                mma_bf16_16816(t, a1, b);
                acc[nt][0] += s0 * t[0];
                acc[nt][1] += s0 * t[1];
                acc[nt][2] += s1 * t[2];
                acc[nt][3] += s1 * t[3];
            }
        }
    }
}

// Sums the warps' accumulators in shared memory; element (nt, e) of lane l of the result
// is returned to thread e * 32 + l of warp nt (for threads below NT * 128), which returns
// true with `out` its value.
template <int NT>
__device__ __forceinline__ bool int4_tc_reduce(float acc[NT][4], float* red, float& out) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    #pragma unroll
    for (int nt = 0; nt < NT; nt++)
        #pragma unroll
        for (int e = 0; e < 4; e++) red[((warp * NT + nt) * 4 + e) * 32 + lane] = acc[nt][e];
    __syncthreads();
    int i = threadIdx.x;
    if (i >= NT * 128) return false;
    float v = 0.0f;
    for (int w = 0; w < TC_WARPS; w++) v += red[w * NT * 128 + i];
    out = v;
    return true;
}

// Row and token of reduced element i = (nt * 4 + e) * 32 + lane of a block's 16 x 8 NT
// tile (the m16n8 accumulator layout: rows g, g + 8, tokens 2q, 2q + 1).
__device__ __forceinline__ void int4_tc_place(int i, int& row, int& token) {
    int lane = i & 31, e = (i >> 5) & 3, nt = i >> 7;
    row = (lane >> 2) + 8 * (e >> 1);
    token = nt * 8 + 2 * (lane & 3) + (e & 1);
}

// grid (ceil(rows / 16), ceil(tiles / NT)), TC_WARPS warps. Needs cols % 32 == 0 and
// group % 32 == 0 (and cols % group == 0).
template <int NT>
__device__ __forceinline__ void int4_tc_matmul(const u32* packed, const u16* scales,
                                               const uint4* xs, float* y, int rows, int cols,
                                               int group, int tokens) {
    __shared__ float red[TC_WARPS * NT * 128];
    int warp = threadIdx.x >> 5, units = cols / 32;
    int row0 = blockIdx.x * 16, tile0 = blockIdx.y * NT;
    float acc[NT][4];
    #pragma unroll
    for (int nt = 0; nt < NT; nt++) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
    int u0 = warp * units / TC_WARPS, u1 = (warp + 1) * units / TC_WARPS;
    // n-tiles past the last are not read: their accumulators stay zero and unstored.
    int tiles = (tokens + 7) / 8 - tile0;
    int4_tc_rows<NT>(packed, scales, rows, cols, group, row0, xs + (size_t)tile0 * units * 64,
                     tiles, u0, u1, acc);
    float v;
    if (int4_tc_reduce<NT>(acc, red, v)) {
        int row, token;
        int4_tc_place(threadIdx.x, row, token);
        row += row0;
        token += tile0 * 8;
        if (row < rows && token < tokens) y[(size_t)token * rows + row] = v;
    }
}

extern "C" __global__ void __launch_bounds__(TC_WARPS * 32) int4_tc_matmul_1(
    const u32* packed, const u16* scales, const uint4* xs, float* y, int rows, int cols, int group,
    int tokens) {
    int4_tc_matmul<1>(packed, scales, xs, y, rows, cols, group, tokens);
}

extern "C" __global__ void __launch_bounds__(TC_WARPS * 32) int4_tc_matmul_2(
    const u32* packed, const u16* scales, const uint4* xs, float* y, int rows, int cols, int group,
    int tokens) {
    int4_tc_matmul<2>(packed, scales, xs, y, rows, cols, group, tokens);
}

extern "C" __global__ void __launch_bounds__(TC_WARPS * 32) int4_tc_matmul_4(
    const u32* packed, const u16* scales, const uint4* xs, float* y, int rows, int cols, int group,
    int tokens) {
    int4_tc_matmul<4>(packed, scales, xs, y, rows, cols, group, tokens);
}
