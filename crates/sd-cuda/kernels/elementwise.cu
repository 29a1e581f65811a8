// Element-wise arithmetic with numpy broadcasting, the scalar-parameter activations and the
// bias of a linear layer. Mirrors sd-models' cpu/elementwise.rs and cpu/activation.rs.

// A broadcast binary operation over `rank` (coalesced) output dimensions; a stride of 0
// repeats an operand along that dimension.
struct BroadcastParams {
    u32 rank;
    u32 shape[MAX_DIMS];
    u32 stride_a[MAX_DIMS];
    u32 stride_b[MAX_DIMS];
};

#define OP_ADD 0u
#define OP_SUB 1u
#define OP_MUL 2u

// out = a (op) b, broadcast; computed in f32, stored as TO (the promoted type).
template <typename TA, typename TB, typename TO>
__device__ __forceinline__ void binary(TO* __restrict__ out, const TA* __restrict__ a,
                                       const TB* __restrict__ b, const BroadcastParams& p, u32 n,
                                       u32 op) {
    GRID_STRIDE(i, n) {
        u32 ia, ib;
        if (p.rank == 1) {
            ia = i * p.stride_a[0];
            ib = i * p.stride_b[0];
        } else {
            u32 rem = i;
            ia = 0;
            ib = 0;
            // Unrolled with constant indices, so the parameters stay in the constant bank.
#pragma unroll
            for (int d = MAX_DIMS - 1; d >= 0; --d) {
                if (d < (int)p.rank) {
                    const u32 idx = rem % p.shape[d];
                    rem /= p.shape[d];
                    ia += idx * p.stride_a[d];
                    ib += idx * p.stride_b[d];
                }
            }
        }
        const float x = to_f32(a[ia]);
        const float y = to_f32(b[ib]);
        const float r = op == OP_ADD ? x + y : (op == OP_SUB ? x - y : x * y);
        out[i] = from_f32<TO>(r);
    }
}


#define UNARY_AFFINE 0u
#define UNARY_SILU 1u
#define UNARY_GELU 2u
#define UNARY_GELU_TANH 3u
#define UNARY_QUICK_GELU 4u

// out = f(x) for contiguous tensors; `scale` and `shift` are the affine map's.
template <typename T>
__device__ __forceinline__ void unary(T* __restrict__ out, const T* __restrict__ x, u32 n, u32 op,
                                      float scale, float shift) {
    GRID_STRIDE(i, n) {
        const float v = to_f32(x[i]);
        float r;
        switch (op) {
            case UNARY_AFFINE: r = v * scale + shift; break;
            case UNARY_SILU: r = silu_f32(v); break;
            case UNARY_GELU: r = gelu_erf_f32(v); break;
            case UNARY_GELU_TANH: r = gelu_tanh_f32(v); break;
            default: r = quick_gelu_f32(v); break;
        }
        out[i] = from_f32<T>(r);
    }
}

// y[r, c] += bias[c] in place, for `rows` rows of `cols` entries.
template <typename T>
__device__ __forceinline__ void bias_rows(T* __restrict__ y, const T* __restrict__ bias, u32 rows,
                                          u32 cols) {
    GRID_STRIDE(i, rows * cols) {
        y[i] = from_f32<T>(to_f32(y[i]) + to_f32(bias[i % cols]));
    }
}

// Entry points: each macro defines one `extern "C"` kernel. The instantiations are not in
// this file: the Rust side (`Kernel::instantiation`) appends the ones it compiles, so that a
// heavy kernel can be compiled on its own.

// The output type TO is the promotion of the two: the same type, or f32 for any mix.
#define BINARY(NA, TA, NB, TB, TO)                                                          \
    extern "C" __global__ void binary_##NA##_##NB(TO* out, const TA* a, const TB* b,       \
                                                  const BroadcastParams p, u32 n, u32 op) {  \
        binary<TA, TB, TO>(out, a, b, p, n, op);                                             \
    }

#define UNARY(N, T)                                                                         \
    extern "C" __global__ void unary_##N(T* out, const T* x, u32 n, u32 op, float scale,   \
                                         float shift) {                                    \
        unary<T>(out, x, n, op, scale, shift);                                             \
    }

#define BIAS_ROWS(N, T)                                                                     \
    extern "C" __global__ void bias_rows_##N(T* y, const T* bias, u32 rows, u32 cols) {     \
        bias_rows<T>(y, bias, rows, cols);                                                 \
    }
