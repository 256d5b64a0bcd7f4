// The CUDA C the kernels are written in, as plain C++ run by the emulator's block
// scheduler (see emulator.cpp): each thread of a block is a fiber on one host thread,
// `__syncthreads()` and warp shuffles are scheduling points, and `__shared__` variables
// are statics (one block runs at a time in the whole process, so a static is exactly one
// block's shared memory).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace emu {

struct dim3 {
    unsigned x, y, z;
};

const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
void sync_block();
// The running block's dynamic shared memory (the launch's `sharedMemBytes`).
void* dynamic_shared();
// The value of `v` held by lane `src(lane)` of the calling warp, once every live lane
// of the warp has arrived.
uint64_t shuffle(uint64_t bits, int kind, int arg);

enum { SHFL_XOR = 0, SHFL_DOWN = 1, SHFL_UP = 2, SHFL_IDX = 3 };

template <typename T>
T shfl(T v, int kind, int arg) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    bits = shuffle(bits, kind, arg);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}

}  // namespace emu

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define threadIdx (emu::thread_idx())
#define blockIdx (emu::block_idx())
#define blockDim (emu::block_dim())
#define gridDim (emu::grid_dim())
#define __syncthreads() emu::sync_block()
#define __shfl_xor_sync(mask, v, m) emu::shfl((v), emu::SHFL_XOR, (m))
#define __shfl_down_sync(mask, v, d) emu::shfl((v), emu::SHFL_DOWN, (d))
#define __shfl_up_sync(mask, v, d) emu::shfl((v), emu::SHFL_UP, (d))
#define __shfl_sync(mask, v, s) emu::shfl((v), emu::SHFL_IDX, (s))
// A warp barrier: a shuffle whose value is unused is the emulator's warp scheduling point.
#define __syncwarp(...) ((void)emu::shfl(0, emu::SHFL_IDX, 0))

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}
// CUDA's 16-byte vector types (aligned as on a GPU) and the read-only load.
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
template <typename T>
inline T __ldg(const T* p) {
    return *p;
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

// CUDA's integer min/max overloads.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }

// A kernel's launcher: calls `k` with the arguments cuLaunchKernel's `params` point to.
namespace emu {
using Launcher = void (*)(void* kernel, void** params);
// Copies a launch's arguments (cuLaunchKernel's `params` point to them) so the launch can
// run later, as a GPU copies them when the launch is queued; `ptrs` gets the copies'
// addresses.
using Snapshotter = std::shared_ptr<void> (*)(void** params, std::vector<void*>& ptrs);
void register_kernel(const char* name, void* kernel, Launcher launcher, Snapshotter snapshot);

template <typename T>
using Value = std::remove_cv_t<std::remove_reference_t<T>>;

template <typename... A, std::size_t... I>
std::shared_ptr<void> snapshot_with(void** params, std::vector<void*>& ptrs,
                                    std::index_sequence<I...>) {
    auto copy = std::make_shared<std::tuple<Value<A>...>>(*static_cast<Value<A>*>(params[I])...);
    ptrs = std::vector<void*>{static_cast<void*>(&std::get<I>(*copy))...};
    return copy;
}

template <typename... A>
std::shared_ptr<void> snapshot(void** params, std::vector<void*>& ptrs) {
    return snapshot_with<A...>(params, ptrs, std::index_sequence_for<A...>{});
}

template <typename... A, std::size_t... I>
void call_with(void (*k)(A...), void** params, std::index_sequence<I...>) {
    k(*static_cast<std::remove_reference_t<A>*>(params[I])...);
}

template <typename... A>
void launch_thread(void* kernel, void** params) {
    auto k = reinterpret_cast<void (*)(A...)>(kernel);
    call_with(k, params, std::index_sequence_for<A...>{});
}

template <typename... A>
struct Registration {
    Registration(const char* name, void (*k)(A...)) {
        register_kernel(name, reinterpret_cast<void*>(k), &launch_thread<A...>, &snapshot<A...>);
    }
};
}  // namespace emu

#define EMU_KERNEL(name) static emu::Registration emu_registration_##name(#name, &name);
