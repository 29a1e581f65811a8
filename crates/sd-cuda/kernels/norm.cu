// Group normalisation (Wu & He, 2018), optionally fused with SiLU, and layer normalisation.
// Mirrors sd-models' cpu/norm.rs (PyTorch's GroupNorm / LayerNorm: biased variance, eps
// inside the square root).
//
// Group norm runs in two kernels so that a group (up to a million values in a VAE) is spread
// over many blocks: `group_norm_stats` writes (count, mean, M2) for each chunk of each group,
// `group_norm_apply` merges the chunks' statistics (Chan et al.'s parallel formula) and
// normalises its chunk.

#define NORM_THREADS 256

// Merges (nb, mb, m2b) into (na, ma, m2a): Chan, Golub & LeVeque's pairwise update.
__device__ __forceinline__ void chan_merge(float& na, float& ma, float& m2a, float nb, float mb,
                                           float m2b) {
    const float n = na + nb;
    if (n == 0.0f) return;
    const float delta = mb - ma;
    const float fb = nb / n;
    ma = ma + delta * fb;
    m2a = m2a + m2b + delta * delta * na * fb;
    na = n;
}

// partial[(ng * chunks + chunk) * 3 + {0, 1, 2}] = count, mean and M2 of the chunk `chunk`
// (blockIdx.x) of the group `ng` (blockIdx.y): `chunk_len` values from chunk * chunk_len,
// the last chunk shorter. A group is `group_len` contiguous values.
template <typename T>
__device__ __forceinline__ void group_norm_stats(float* __restrict__ partial,
                                                 const T* __restrict__ x, u32 group_len,
                                                 u32 chunk_len, u32 chunks) {
    const u32 ng = blockIdx.y;
    const u32 chunk = blockIdx.x;
    const u32 begin = chunk * chunk_len;
    const u32 end = min(begin + chunk_len, group_len);
    const T* xg = x + ng * group_len;
    // Sums shifted by the thread's first value, so that s2 - s1^2 / n does not cancel.
    float shift = 0.0f, s1 = 0.0f, s2 = 0.0f, count = 0.0f;
    if (begin + threadIdx.x < end) shift = to_f32(xg[begin + threadIdx.x]);
    for (u32 i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const float d = to_f32(xg[i]) - shift;
        s1 += d;
        s2 += d * d;
        count += 1.0f;
    }
    float n = count;
    float mean = count > 0.0f ? shift + s1 / count : 0.0f;
    float m2 = count > 0.0f ? fmaxf(s2 - s1 * s1 / count, 0.0f) : 0.0f;
    for (int o = 16; o > 0; o >>= 1) {
        const float nb = __shfl_xor_sync(0xffffffffu, n, o);
        const float mb = __shfl_xor_sync(0xffffffffu, mean, o);
        const float m2b = __shfl_xor_sync(0xffffffffu, m2, o);
        chan_merge(n, mean, m2, nb, mb, m2b);
    }
    __shared__ float sh[3][NORM_THREADS / 32];
    const u32 warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
        sh[0][warp] = n;
        sh[1][warp] = mean;
        sh[2][warp] = m2;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float tn = 0.0f, tm = 0.0f, tm2 = 0.0f;
        for (u32 w = 0; w < blockDim.x / 32; ++w) chan_merge(tn, tm, tm2, sh[0][w], sh[1][w], sh[2][w]);
        float* p = partial + (ng * chunks + chunk) * 3;
        p[0] = tn;
        p[1] = tm;
        p[2] = tm2;
    }
}

// Normalises chunk `blockIdx.x` of group `blockIdx.y` = n * groups + g with the merged
// statistics: y = (x - mean) / sqrt(var + eps) * gamma[c] + beta[c], then SiLU if `silu`.
// The group holds `channels_per_group` channels of `spatial` values each.
template <typename T>
__device__ __forceinline__ void group_norm_apply(T* __restrict__ out, const T* __restrict__ x,
                                                 const float* __restrict__ partial,
                                                 const T* __restrict__ gamma,
                                                 const T* __restrict__ beta, u32 groups,
                                                 u32 channels_per_group, u32 spatial,
                                                 u32 chunk_len, u32 chunks, float eps, u32 silu) {
    const u32 ng = blockIdx.y;
    const u32 group_len = channels_per_group * spatial;
    __shared__ float s_mean, s_rstd;
    if (threadIdx.x == 0) {
        float n = 0.0f, mean = 0.0f, m2 = 0.0f;
        const float* p = partial + ng * chunks * 3;
        for (u32 c = 0; c < chunks; ++c) chan_merge(n, mean, m2, p[3 * c], p[3 * c + 1], p[3 * c + 2]);
        s_mean = mean;
        s_rstd = 1.0f / sqrtf(m2 / fmaxf(n, 1.0f) + eps);
    }
    __syncthreads();
    const float mean = s_mean;
    const float rstd = s_rstd;
    const u32 channel0 = (ng % groups) * channels_per_group;
    const u32 begin = blockIdx.x * chunk_len;
    const u32 end = min(begin + chunk_len, group_len);
    const u32 base = ng * group_len;
    for (u32 i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const u32 c = channel0 + i / spatial;
        float y = (to_f32(x[base + i]) - mean) * rstd * to_f32(gamma[c]) + to_f32(beta[c]);
        if (silu) y = silu_f32(y);
        out[base + i] = from_f32<T>(y);
    }
}

// Layer norm of `rows` rows of `cols` entries, one warp per row (two passes over the row for
// the mean and the variance, a third that writes).
template <typename T>
__device__ __forceinline__ void layer_norm(T* __restrict__ out, const T* __restrict__ x,
                                           const T* __restrict__ gamma, const T* __restrict__ beta,
                                           u32 rows, u32 cols, float eps) {
    const u32 lane = threadIdx.x % 32;
    const u32 row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;  // the whole warp leaves together
    const T* xr = x + row * cols;
    T* outr = out + row * cols;
    float s = 0.0f;
    for (u32 c = lane; c < cols; c += 32) s += to_f32(xr[c]);
    const float mean = warp_sum(s) / (float)cols;
    float v = 0.0f;
    for (u32 c = lane; c < cols; c += 32) {
        const float d = to_f32(xr[c]) - mean;
        v += d * d;
    }
    const float rstd = 1.0f / sqrtf(warp_sum(v) / (float)cols + eps);
    for (u32 c = lane; c < cols; c += 32) {
        outr[c] = from_f32<T>((to_f32(xr[c]) - mean) * rstd * to_f32(gamma[c]) + to_f32(beta[c]));
    }
}

// Entry points: each macro defines one `extern "C"` kernel. The instantiations are not in
// this file: the Rust side (`Kernel::instantiation`) appends the ones it compiles, so that a
// heavy kernel can be compiled on its own.

#define GROUP_NORM_STATS(N, T)                                                              \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS)                             \
        group_norm_stats_##N(float* partial, const T* x, u32 group_len, u32 chunk_len,     \
                             u32 chunks) {                                                 \
        group_norm_stats<T>(partial, x, group_len, chunk_len, chunks);                     \
    }

#define GROUP_NORM_APPLY(N, T)                                                              \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS)                             \
        group_norm_apply_##N(T* out, const T* x, const float* partial, const T* gamma,     \
                             const T* beta, u32 groups, u32 channels_per_group,            \
                             u32 spatial, u32 chunk_len, u32 chunks, float eps, u32 silu) { \
        group_norm_apply<T>(out, x, partial, gamma, beta, groups, channels_per_group,      \
                            spatial, chunk_len, chunks, eps, silu);                        \
    }

#define LAYER_NORM(N, T)                                                                    \
    extern "C" __global__ void layer_norm_##N(T* out, const T* x, const T* gamma,          \
                                              const T* beta, u32 rows, u32 cols, float eps) { \
        layer_norm<T>(out, x, gamma, beta, rows, cols, eps);                               \
    }
