// Shared by every kernel source: prepended before compilation (NVRTC has no include
// path to the crate). Weight formats are the checkpoint's own:
//  - BF16: the upper 16 bits of an f32.
//  - INT4 pack-quantized (compressed-tensors): 8 nibbles per little-endian int32, LSB
//    first, value = (nibble - 8) * bf16 scale of its group along the row.
//  - FP8 E4M3FN with f32 `weight_scale_inv` per 128x128 block: value = fp8 * scale.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

__device__ __forceinline__ float bf16_to_f32(u16 h) {
    return __uint_as_float(((u32)h) << 16);
}

// f32 to BF16, round to nearest even (NaN stays NaN), as half::bf16::from_f32.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

__device__ __forceinline__ float fp8_e4m3_to_f32(u8 v) {
    u32 s = v >> 7, e = (v >> 3) & 0xf, m = v & 7;
    float r;
    if (e == 0) {
        r = ldexpf((float)m, -9);
    } else if (e == 15 && m == 7) {
        r = __int_as_float(0x7fc00000);
    } else {
        r = ldexpf(1.0f + (float)m * 0.125f, (int)e - 7);
    }
    return s ? -r : r;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of up to 1024 threads; every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < warps) ? scratch[threadIdx.x] : 0.0f;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    return scratch[0];
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < warps) ? scratch[threadIdx.x] : -INFINITY;
    if (warp == 0) v = warp_max(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    return scratch[0];
}

// ---- tensor cores -----------------------------------------------------------------------
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

// Two nibbles at bits 0-3 and 16-19 of `bits` (the rest is ignored) as the BF16 pair
// (n0 - 8, n1 - 8), exactly: OR-ing a nibble into the mantissa of BF16 128.0 gives 128 + n,
// and one packed FMA subtracts 136.
__device__ __forceinline__ u32 int4_pair_bf16(u32 bits) {
    u32 v = (bits & 0x000f000fu) | 0x43004300u;
#ifdef __CUDACC_RTC__
    u32 r;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(v), "r"(0x3f803f80u), "r"(0xc308c308u));
    return r;
#else
    return (u32)f32_to_bf16(bf16_lo(v) - 136.0f) | ((u32)f32_to_bf16(bf16_hi(v) - 136.0f) << 16);
#endif
}

// ---- dynamic shared memory and asynchronous copies ----------------------------------------
// DYNAMIC_SHARED(T, name) declares the launch's dynamic shared memory as `T name[]` (the
// emulator hands out one buffer per block). cp_async16 copies 16 bytes from global to
// shared memory without passing through registers, or writes zeros if !valid; copies join
// a group at cp_async_commit() and cp_async_wait<N>() waits until at most N groups are
// in flight (this thread's copies only: a barrier must follow before others read them).
// The emulator copies at once.
#ifdef __CUDACC_RTC__
#define DYNAMIC_SHARED(T, name) extern __shared__ __align__(16) T name[]
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    u32 addr;
    asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }"
                 : "=r"(addr) : "l"(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(addr), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}
#else
#define DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(emu::dynamic_shared())
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    uint4 v = {0u, 0u, 0u, 0u};
    if (valid) v = *(const uint4*)src;
    *(uint4*)dst = v;
}
__device__ __forceinline__ void cp_async_commit() {}
template <int N>
__device__ __forceinline__ void cp_async_wait() {}
#endif
