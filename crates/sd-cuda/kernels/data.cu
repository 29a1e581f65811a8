// Data movement: dtype casts, axis permutations and the strided block copies that slice and
// concatenate. Mirrors sd-models' cpu/data.rs. Copies move bits, so they come in 16- and
// 32-bit element sizes rather than per dtype.

template <typename TI, typename TO>
__device__ __forceinline__ void cast(TO* __restrict__ out, const TI* __restrict__ x, u32 n) {
    GRID_STRIDE(i, n) { out[i] = from_f32<TO>(to_f32(x[i])); }
}


// out (contiguous, `out_shape`) = in read with `in_stride` per output axis.
struct PermuteParams {
    u32 rank;
    u32 out_shape[MAX_DIMS];
    u32 in_stride[MAX_DIMS];
};

template <typename T>
__device__ __forceinline__ void permute(T* __restrict__ out, const T* __restrict__ in,
                                        const PermuteParams& p, u32 n) {
    GRID_STRIDE(i, n) {
        u32 rem = i;
        u32 src = 0;
        // Unrolled with constant indices, so the parameters stay in the constant bank.
#pragma unroll
        for (int d = MAX_DIMS - 1; d >= 0; --d) {
            if (d < (int)p.rank) {
                const u32 idx = rem % p.out_shape[d];
                rem /= p.out_shape[d];
                src += idx * p.in_stride[d];
            }
        }
        out[i] = in[src];
    }
}

// dst[r * dst_stride + dst_off + c] = src[r * src_stride + src_off + c] for r < rows,
// c < width (all in elements).
template <typename T>
__device__ __forceinline__ void copy2d(T* __restrict__ dst, const T* __restrict__ src, u32 rows,
                                       u32 width, u32 src_stride, u32 src_off, u32 dst_stride,
                                       u32 dst_off) {
    GRID_STRIDE(i, rows * width) {
        const u32 r = i / width;
        const u32 c = i - r * width;
        dst[r * dst_stride + dst_off + c] = src[r * src_stride + src_off + c];
    }
}

// Entry points: each macro defines one `extern "C"` kernel. The instantiations are not in
// this file: the Rust side (`Kernel::instantiation`) appends the ones it compiles, so that a
// heavy kernel can be compiled on its own.

#define CAST(NI, TI, NO, TO)                                                                \
    extern "C" __global__ void cast_##NI##_##NO(TO* out, const TI* x, u32 n) {             \
        cast<TI, TO>(out, x, n);                                                           \
    }

#define PERMUTE(N, T)                                                                       \
    extern "C" __global__ void permute_##N(T* out, const T* in, const PermuteParams p,     \
                                           u32 n) {                                        \
        permute<T>(out, in, p, n);                                                         \
    }

#define COPY2D(N, T)                                                                        \
    extern "C" __global__ void copy2d_##N(T* dst, const T* src, u32 rows, u32 width,       \
                                          u32 src_stride, u32 src_off, u32 dst_stride,     \
                                          u32 dst_off) {                                   \
        copy2d<T>(dst, src, rows, width, src_stride, src_off, dst_stride, dst_off);        \
    }
