// A CPU emulator for sd-cuda's kernels, used by tests/emulation.rs: each CUDA thread of a
// block is an OS thread, __syncthreads and the warp operations are barriers, shared memory
// is static storage (blocks run one after another), and the PTX the kernels use (half
// conversions, mma.sync) is replaced by C++ in emulation_ops.h, following the PTX ISA.
// It checks the kernels' indexing, tiling, masking and synchronisation on small problems;
// it says nothing about speed, and cannot see races that the barriers serialise.
#pragma once

#include <algorithm>
#include <array>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define SD_HOST_EMULATION 1

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
struct alignas(16) float4 {
    float x, y, z, w;
};

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

using std::max;
using std::min;

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

// The block being run and this thread's place in it.
struct EmuBlock {
    std::unique_ptr<std::barrier<>> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<std::array<unsigned long long, 32>> xchg;  // shuffle slots per warp
    std::vector<std::array<unsigned, 32 * 6>> mma;         // a[4], b[2] per lane per warp
};
inline thread_local EmuBlock* emu_block = nullptr;
inline thread_local unsigned emu_warp = 0, emu_lane = 0;
inline unsigned char* emu_dynamic_smem = nullptr;

inline void __syncthreads() { emu_block->block->arrive_and_wait(); }
inline void emu_warp_sync() { emu_block->warps[emu_warp]->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp_sync(); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    static_assert(sizeof(T) <= 8, "shuffle of a register");
    auto& x = emu_block->xchg[emu_warp];
    unsigned long long slot = 0;
    std::memcpy(&slot, &v, sizeof(T));
    x[emu_lane] = slot;
    emu_warp_sync();
    T r;
    slot = x[emu_lane ^ (unsigned)lane_mask];
    std::memcpy(&r, &slot, sizeof(T));
    emu_warp_sync();
    return r;
}

// Runs `kernel(args...)` over `grid` blocks of `threads` threads (one-dimensional blocks),
// with `smem` bytes of dynamic shared memory.
template <typename K, typename... A>
void emu_launch(K kernel, dim3 grid, unsigned threads, size_t smem, A... args) {
    gridDim = grid;
    blockDim = dim3{threads, 1, 1};
    std::vector<unsigned char> dynamic(smem + 64, 0xcd);  // garbage, as on a GPU
    emu_dynamic_smem = reinterpret_cast<unsigned char*>(
        (reinterpret_cast<uintptr_t>(dynamic.data()) + 15) & ~uintptr_t(15));
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                EmuBlock b;
                b.block = std::make_unique<std::barrier<>>(threads);
                unsigned warps = (threads + 31) / 32;
                for (unsigned w = 0; w < warps; ++w)
                    b.warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
                b.xchg.resize(warps);
                b.mma.resize(warps);
                std::vector<std::thread> ts;
                ts.reserve(threads);
                for (unsigned t = 0; t < threads; ++t) {
                    ts.emplace_back([&, t] {
                        threadIdx = dim3{t, 1, 1};
                        blockIdx = dim3{x, y, z};
                        emu_block = &b;
                        emu_warp = t / 32;
                        emu_lane = t % 32;
                        kernel(args...);
                        // An exited thread no longer holds the others at a barrier.
                        b.warps[emu_warp]->arrive_and_drop();
                        b.block->arrive_and_drop();
                    });
                }
                for (auto& th : ts) th.join();
            }
}

// Device memory: 256-byte aligned, like the backend's pool.
template <typename T>
struct DevBuf {
    T* p = nullptr;
    size_t n = 0;
    explicit DevBuf(size_t count) : n(count) {
        size_t bytes = ((count * sizeof(T) + 255) / 256 + 1) * 256;
        p = static_cast<T*>(std::aligned_alloc(256, bytes));
        std::memset(static_cast<void*>(p), 0xcd, bytes);  // garbage
    }
    ~DevBuf() { std::free(p); }
    DevBuf(const DevBuf&) = delete;
    DevBuf& operator=(const DevBuf&) = delete;
};
