// The softmax over the last axis and GEGLU. (SiLU, the GELUs and quick GELU are scalar maps
// and live with the affine map in elementwise.cu.) Mirrors sd-models' cpu/activation.rs.

// Softmax of each of `rows` contiguous rows of `cols` entries: one warp per row, an online
// pass for the maximum and the sum of exponentials, then a pass that writes.
// A row of -inf only gives NaN, as PyTorch does.
template <typename T>
__device__ __forceinline__ void softmax_last(T* __restrict__ out, const T* __restrict__ x, u32 rows,
                                             u32 cols) {
    const u32 lane = threadIdx.x % 32;
    const u32 row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;  // the whole warp leaves together
    const T* xr = x + row * cols;
    T* outr = out + row * cols;
    float m = NEG_INF;
    float s = 0.0f;
    for (u32 c = lane; c < cols; c += 32) {
        const float v = to_f32(xr[c]);
        const float mn = fmaxf(m, v);
        if (mn == NEG_INF) continue;  // nothing but -inf so far
        s = s * expf(m - mn) + expf(v - mn);
        m = mn;
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
        const float mn = fmaxf(m, m2);
        s = mn == NEG_INF ? 0.0f : s * expf(m - mn) + s2 * expf(m2 - mn);
        m = mn;
    }
    const float inv = 1.0f / s;
    for (u32 c = lane; c < cols; c += 32) {
        outr[c] = from_f32<T>(expf(to_f32(xr[c]) - m) * inv);
    }
}

// GEGLU: out[r, c] = x[r, c] * gelu(x[r, C + c]) for x [rows, 2C], out [rows, C].
template <typename T>
__device__ __forceinline__ void geglu(T* __restrict__ out, const T* __restrict__ x, u32 rows,
                                      u32 half_cols) {
    GRID_STRIDE(i, rows * half_cols) {
        const u32 r = i / half_cols;
        const u32 c = i - r * half_cols;
        const float h = to_f32(x[r * 2 * half_cols + c]);
        const float g = to_f32(x[r * 2 * half_cols + half_cols + c]);
        out[i] = from_f32<T>(h * gelu_erf_f32(g));
    }
}

// Entry points: each macro defines one `extern "C"` kernel. The instantiations are not in
// this file: the Rust side (`Kernel::instantiation`) appends the ones it compiles, so that a
// heavy kernel can be compiled on its own.

#define SOFTMAX_LAST(N, T)                                                                  \
    extern "C" __global__ void softmax_last_##N(T* out, const T* x, u32 rows, u32 cols) {  \
        softmax_last<T>(out, x, rows, cols);                                               \
    }

#define GEGLU(N, T)                                                                         \
    extern "C" __global__ void geglu_##N(T* out, const T* x, u32 rows, u32 half_cols) {     \
        geglu<T>(out, x, rows, half_cols);                                                 \
    }
