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
