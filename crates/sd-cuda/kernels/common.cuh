// Shared definitions, prepended to every kernel module of sd-cuda before NVRTC compiles it.
//
// No header is included: NVRTC installed from PyPI has no cuda_fp16.h, so the half-precision
// types are plain 16-bit storage here, converted with PTX `cvt` instructions (sm_80 and newer:
// `cvt.rn.bf16.f32` needs sm_80). Every kernel computes and accumulates in f32.

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

// IEEE half precision, stored as its bits.
struct half_t {
    u16 bits;
};

// bfloat16, stored as its bits (the upper half of an f32).
struct bf16_t {
    u16 bits;
};

#ifndef SD_HOST_EMULATION
__device__ __forceinline__ float to_f32(float x) { return x; }

__device__ __forceinline__ float to_f32(half_t x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}

__device__ __forceinline__ float to_f32(bf16_t x) {
    return __uint_as_float(((u32)x.bits) << 16);
}

// Round to nearest even from f32.
template <typename T> __device__ __forceinline__ T from_f32(float x);

template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }

template <> __device__ __forceinline__ half_t from_f32<half_t>(float x) {
    half_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
    return h;
}

template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float x) {
    bf16_t h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
    return h;
}

// Two f32 values packed into one 32-bit register of two 16-bit values, `lo` in the low half
// (the element with the lower index, as mma fragments want it).
template <typename T> __device__ __forceinline__ u32 pack2_f32(float lo, float hi);

template <> __device__ __forceinline__ u32 pack2_f32<half_t>(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

template <> __device__ __forceinline__ u32 pack2_f32<bf16_t>(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Two 16-bit values packed into one 32-bit register, `lo` in the low half.
__device__ __forceinline__ u32 pack2_bits(u16 lo, u16 hi) { return ((u32)hi << 16) | (u32)lo; }

// D = A * B + C for one m16n8k16 tile: A 16x16 (row), B 16x8 (col), f32 accumulators.
// Fragment layout (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with g = lane / 4 and
// t = lane % 4:
//   a[0]: A[g][2t, 2t+1]      a[1]: A[g+8][2t, 2t+1]
//   a[2]: A[g][2t+8, 2t+9]    a[3]: A[g+8][2t+8, 2t+9]
//   b[0]: B[2t, 2t+1][g]      b[1]: B[2t+8, 2t+9][g]
//   c[0], c[1]: C[g][2t, 2t+1]    c[2], c[3]: C[g+8][2t, 2t+1]
template <typename T> __device__ __forceinline__ void mma_16816(float c[4], const u32 a[4], const u32 b[2]);

template <> __device__ __forceinline__ void mma_16816<half_t>(float c[4], const u32 a[4], const u32 b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <> __device__ __forceinline__ void mma_16816<bf16_t>(float c[4], const u32 a[4], const u32 b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Dynamic shared memory of `type` named `name` (16-byte aligned).
#define DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]

#else  // SD_HOST_EMULATION: the same functions in portable C++, for the host emulator that
       // runs these kernels on the CPU in tests (tests/emulation.rs). The MMA follows the
       // fragment layout quoted above, gathering the warp's fragments.
#include "emulation_ops.h"
#endif  // SD_HOST_EMULATION

// Warp-wide reductions (all 32 lanes take part).
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// The activations, in f32 (accurate libm functions: no fast-math approximations).
__device__ __forceinline__ float silu_f32(float x) { return x / (1.0f + expf(-x)); }

__device__ __forceinline__ float gelu_erf_f32(float x) {
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f));
}

__device__ __forceinline__ float gelu_tanh_f32(float x) {
    const float k = 0.79788456080286535588f;  // sqrt(2 / pi)
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

__device__ __forceinline__ float quick_gelu_f32(float x) { return x / (1.0f + expf(-1.702f * x)); }

// -infinity (NVRTC without headers has no INFINITY macro).
#define NEG_INF (__int_as_float(0xff800000))

// The largest number of dimensions the strided kernels take (broadcasting, permutes).
#define MAX_DIMS 8

// Grid-stride loop over [0, n). The host keeps every tensor under 2^31 elements and the grid
// under 2^30 threads, so 32-bit unsigned indices cannot overflow.
#define GRID_STRIDE(i, n)                                                                   \
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < (u32)(n);               \
         i += blockDim.x * gridDim.x)
