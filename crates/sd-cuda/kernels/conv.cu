// 2-D convolution as an implicit GEMM: no unfolded (im2col) input is ever written to memory.
// Mirrors sd-models' cpu/conv.rs (PyTorch's conv2d: cross-correlation, zero padding).
//
// The GEMM: C[m, p] = sum_k A[m, k] B[k, p] with
//   m = output channel (M = O),
//   p = (image, output row, output column) flattened (P = N * Ho * Wo),
//   k = (input channel, kernel row, kernel column) flattened (K = C * kh * kw),
//   A = the weight [O, C, kh, kw] read as the row-major matrix [O, K],
//   B[k, p] = the input pixel that tap k of output pixel p reads (0 in the padding), gathered
//             from [N, C, H, W] while the tile is loaded into shared memory.
// Pixels are the GEMM's N dimension, so neighbouring threads read neighbouring input columns
// and write neighbouring output columns of the NCHW tensors.
//
// f16/bf16: tensor cores (mma.sync m16n8k16, f32 accumulators), 128 x 128 x 32 block tiles,
// 8 warps of 64 x 32, double-buffered shared memory. f32: a SIMT kernel, 64 x 64 x 16 tiles,
// 4 x 4 outputs per thread, f32 FMAs (exact enough for a 1e-4 relative tolerance).
//
// Split-K: with gridDim.z > 1 each z takes `k_tiles_per_split` K-tiles and writes its partial
// sums to a f32 workspace [z, M, P]; `conv_finalize` then adds the splits in order (so results
// do not depend on scheduling) and the bias. Small images (16 x 16, 8 x 8 at 1280 channels)
// otherwise leave most of the GPU idle.
//
// Bounds: the host keeps every tensor (and the workspace) under 2^31 elements, so the u32
// offsets below cannot overflow; every global read and write is guarded by m < M, p < P,
// k < K and the padding test.

struct ConvParams {
    u32 n, c, h, w;           // input [N, C, H, W]
    u32 o, kh, kw;            // weight [O, C, kh, kw]
    u32 ho, wo;               // output spatial size
    u32 sh, sw, ph, pw;       // stride and zero padding (rows, columns)
    u32 k;                    // C * kh * kw
    u32 p;                    // N * Ho * Wo
    u32 k_tiles_per_split;    // K-tiles per split (gridDim.z splits)
    u32 has_bias;             // bias[O] is read only when non-zero
};

// The kernel size: a compile-time constant for 1x1 and 3x3 (the divisions by kh * kw and kw
// become multiplications), the runtime value otherwise (KH == 0).
template <int KH, int KW>
__device__ __forceinline__ u32 conv_khw(const ConvParams& p) {
    return KH > 0 ? (u32)(KH * KW) : p.kh * p.kw;
}
template <int KH, int KW>
__device__ __forceinline__ u32 conv_kw(const ConvParams& p) {
    return KW > 0 ? (u32)KW : p.kw;
}

// Where one output pixel's receptive field starts: the first input row and column (may be
// negative in the padding) and the offset of its image; `valid` is false past P.
struct PixelOrigin {
    int iy0, ix0;
    u32 image_base;
    bool valid;
};

__device__ __forceinline__ PixelOrigin pixel_origin(const ConvParams& p, u32 pidx) {
    PixelOrigin r;
    r.valid = pidx < p.p;
    const u32 q = r.valid ? pidx : 0;
    const u32 hw = p.ho * p.wo;
    const u32 img = q / hw;
    const u32 rem = q - img * hw;
    const u32 oy = rem / p.wo;
    const u32 ox = rem - oy * p.wo;
    r.iy0 = (int)(oy * p.sh) - (int)p.ph;
    r.ix0 = (int)(ox * p.sw) - (int)p.pw;
    r.image_base = img * p.c * p.h * p.w;
    return r;
}

// B[k, p]: the input value tap `k` of the pixel reads, 0 in the padding or past K / P.
template <typename T, int KH, int KW>
__device__ __forceinline__ T load_b(const T* __restrict__ x, const ConvParams& p,
                                    const PixelOrigin& o, u32 k) {
    T zero;
    zero = from_f32<T>(0.0f);
    if (!o.valid || k >= p.k) return zero;
    const u32 khw = conv_khw<KH, KW>(p);
    const u32 kw = conv_kw<KH, KW>(p);
    const u32 ci = k / khw;
    const u32 r = k - ci * khw;
    const u32 ki = r / kw;
    const u32 kj = r - ki * kw;
    const int iy = o.iy0 + (int)ki;
    const int ix = o.ix0 + (int)kj;
    if (iy < 0 || ix < 0 || iy >= (int)p.h || ix >= (int)p.w) return zero;
    return x[o.image_base + (ci * p.h + (u32)iy) * p.w + (u32)ix];
}

// Writes one result: straight to the output (plus the bias) with a single split, else to the
// split's slice of the workspace.
template <typename T>
__device__ __forceinline__ void conv_store(T* __restrict__ out, float* __restrict__ ws,
                                           const T* __restrict__ bias, const ConvParams& p, u32 m,
                                           u32 pidx, float v) {
    if (m >= p.o || pidx >= p.p) return;
    if (gridDim.z == 1) {
        if (p.has_bias) v += to_f32(bias[m]);
        const u32 hw = p.ho * p.wo;
        const u32 img = pidx / hw;
        const u32 q = pidx - img * hw;
        out[(img * p.o + m) * hw + q] = from_f32<T>(v);
    } else {
        ws[(blockIdx.z * p.o + m) * p.p + pidx] = v;
    }
}

// The K-tiles [kt_begin, kt_end) of this block's split.
__device__ __forceinline__ void split_range(const ConvParams& p, u32 bk, u32& kt_begin,
                                            u32& kt_end) {
    const u32 k_tiles = (p.k + bk - 1) / bk;
    kt_begin = blockIdx.z * p.k_tiles_per_split;
    kt_end = min(kt_begin + p.k_tiles_per_split, k_tiles);
}

// ---------------------------------------------------------------------------------------
// Tensor-core kernel (f16, bf16).
// ---------------------------------------------------------------------------------------

#define TC_BM 128
#define TC_BN 128
#define TC_BK 32
#define TC_PAD 8                      // row padding (halves): conflict-free fragment loads
#define TC_LD (TC_BK + TC_PAD)        // 40 halves = 80 bytes, a multiple of 16
#define TC_THREADS 256

template <typename T, int KH, int KW>
__device__ __forceinline__ void conv_tc(T* __restrict__ out, float* __restrict__ ws,
                                        const T* __restrict__ x, const T* __restrict__ wt,
                                        const T* __restrict__ bias, const ConvParams& p) {
    // [buffer][row][k]: A rows are output channels, B rows are pixels (B stored transposed,
    // so both fragments read pairs of consecutive k as one 32-bit word).
    __shared__ __align__(16) u16 As[2][TC_BM][TC_LD];
    __shared__ __align__(16) u16 Bs[2][TC_BN][TC_LD];

    const u32 tid = threadIdx.x;
    const u32 lane = tid % 32;
    const u32 warp = tid / 32;
    const u32 g = lane / 4;       // mma group
    const u32 t = lane % 4;       // thread in group
    const u32 wm = warp / 4;      // warp row: 64 output channels
    const u32 wn = warp % 4;      // warp column: 32 pixels
    const u32 m0 = blockIdx.y * TC_BM;
    const u32 p0 = blockIdx.x * TC_BN;

    // A loader: 16 consecutive k of one output channel.
    const u32 a_row = tid / 2;
    const u32 a_col = (tid % 2) * 16;
    const u32 a_m = m0 + a_row;
    const bool a_vec = (p.k % 8) == 0;  // rows 16-byte aligned: two uint4 loads
    // B loader: 16 consecutive k of one pixel.
    const u32 b_row = tid % TC_BN;
    const u32 b_col = (tid / TC_BN) * 16;
    const PixelOrigin b_origin = pixel_origin(p, p0 + b_row);

    u32 ra[8];  // 16 halves of A
    u32 rb[8];  // 16 halves of B

    auto load_tile = [&](u32 kt) {
        const u32 k0 = kt * TC_BK;
        // A
        if (a_vec) {
#pragma unroll
            for (int v = 0; v < 2; ++v) {
                const u32 k = k0 + a_col + 8 * v;
                uint4 q = make_uint4(0, 0, 0, 0);
                if (a_m < p.o && k < p.k) q = *reinterpret_cast<const uint4*>(wt + a_m * p.k + k);
                ra[4 * v + 0] = q.x;
                ra[4 * v + 1] = q.y;
                ra[4 * v + 2] = q.z;
                ra[4 * v + 3] = q.w;
            }
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const u32 k = k0 + a_col + 2 * j;
                u16 lo = 0, hi = 0;
                if (a_m < p.o && k < p.k) lo = wt[a_m * p.k + k].bits;
                if (a_m < p.o && k + 1 < p.k) hi = wt[a_m * p.k + k + 1].bits;
                ra[j] = pack2_bits(lo, hi);
            }
        }
        // B
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const u32 k = k0 + b_col + 2 * j;
            const T lo = load_b<T, KH, KW>(x, p, b_origin, k);
            const T hi = load_b<T, KH, KW>(x, p, b_origin, k + 1);
            rb[j] = pack2_bits(lo.bits, hi.bits);
        }
    };
    auto store_tile = [&](u32 buf) {
        uint4* da = reinterpret_cast<uint4*>(&As[buf][a_row][a_col]);
        da[0] = make_uint4(ra[0], ra[1], ra[2], ra[3]);
        da[1] = make_uint4(ra[4], ra[5], ra[6], ra[7]);
        uint4* db = reinterpret_cast<uint4*>(&Bs[buf][b_row][b_col]);
        db[0] = make_uint4(rb[0], rb[1], rb[2], rb[3]);
        db[1] = make_uint4(rb[4], rb[5], rb[6], rb[7]);
    };

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    u32 kt_begin, kt_end;
    split_range(p, TC_BK, kt_begin, kt_end);
    if (kt_begin < kt_end) {
        load_tile(kt_begin);
        store_tile(0);
    }
    __syncthreads();
    for (u32 kt = kt_begin; kt < kt_end; ++kt) {
        const u32 buf = (kt - kt_begin) % 2;
        const bool more = kt + 1 < kt_end;
        if (more) load_tile(kt + 1);  // global loads in flight during the MMAs
#pragma unroll
        for (u32 ks = 0; ks < TC_BK; ks += 16) {
            u32 af[4][4];
            u32 bf[4][2];
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) {
                const u32 r = wm * 64 + mt * 16 + g;
                af[mt][0] = *reinterpret_cast<const u32*>(&As[buf][r][ks + 2 * t]);
                af[mt][1] = *reinterpret_cast<const u32*>(&As[buf][r + 8][ks + 2 * t]);
                af[mt][2] = *reinterpret_cast<const u32*>(&As[buf][r][ks + 8 + 2 * t]);
                af[mt][3] = *reinterpret_cast<const u32*>(&As[buf][r + 8][ks + 8 + 2 * t]);
            }
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const u32 n = wn * 32 + nt * 8 + g;
                bf[nt][0] = *reinterpret_cast<const u32*>(&Bs[buf][n][ks + 2 * t]);
                bf[nt][1] = *reinterpret_cast<const u32*>(&Bs[buf][n][ks + 8 + 2 * t]);
            }
#pragma unroll
            for (int mt = 0; mt < 4; ++mt)
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) mma_16816<T>(acc[mt][nt], af[mt], bf[nt]);
        }
        if (more) store_tile(buf ^ 1);
        __syncthreads();
    }

#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const u32 m = m0 + wm * 64 + mt * 16 + g + (e >= 2 ? 8 : 0);
                const u32 pidx = p0 + wn * 32 + nt * 8 + 2 * t + (e % 2);
                conv_store<T>(out, ws, bias, p, m, pidx, acc[mt][nt][e]);
            }
}

// ---------------------------------------------------------------------------------------
// f32 SIMT kernel.
// ---------------------------------------------------------------------------------------

#define F32_BM 64
#define F32_BN 64
#define F32_BK 16
#define F32_THREADS 256

template <int KH, int KW>
__device__ __forceinline__ void conv_f32(float* __restrict__ out, float* __restrict__ ws,
                                         const float* __restrict__ x,
                                         const float* __restrict__ wt,
                                         const float* __restrict__ bias, const ConvParams& p) {
    // [buffer][k][row], k-major so that the inner loop reads 4 consecutive rows.
    __shared__ __align__(16) float As[2][F32_BK][F32_BM];
    __shared__ __align__(16) float Bs[2][F32_BK][F32_BN];

    const u32 tid = threadIdx.x;
    const u32 m0 = blockIdx.y * F32_BM;
    const u32 p0 = blockIdx.x * F32_BN;
    // A loader: 4 consecutive k of one output channel.
    const u32 a_row = tid / 4;
    const u32 a_col = (tid % 4) * 4;
    const u32 a_m = m0 + a_row;
    // B loader: 4 consecutive k of one pixel.
    const u32 b_row = tid % F32_BN;
    const u32 b_col = (tid / F32_BN) * 4;
    const PixelOrigin b_origin = pixel_origin(p, p0 + b_row);
    // This thread's 4 x 4 outputs: rows tm*4.., pixels tn*4...
    const u32 tm = tid / 16;
    const u32 tn = tid % 16;

    float ra[4], rb[4];
    auto load_tile = [&](u32 kt) {
        const u32 k0 = kt * F32_BK;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const u32 k = k0 + a_col + j;
            ra[j] = (a_m < p.o && k < p.k) ? wt[a_m * p.k + k] : 0.0f;
            rb[j] = load_b<float, KH, KW>(x, p, b_origin, k0 + b_col + j);
        }
    };
    auto store_tile = [&](u32 buf) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            As[buf][a_col + j][a_row] = ra[j];
            Bs[buf][b_col + j][b_row] = rb[j];
        }
    };

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    u32 kt_begin, kt_end;
    split_range(p, F32_BK, kt_begin, kt_end);
    if (kt_begin < kt_end) {
        load_tile(kt_begin);
        store_tile(0);
    }
    __syncthreads();
    for (u32 kt = kt_begin; kt < kt_end; ++kt) {
        const u32 buf = (kt - kt_begin) % 2;
        const bool more = kt + 1 < kt_end;
        if (more) load_tile(kt + 1);
#pragma unroll
        for (int k = 0; k < F32_BK; ++k) {
            const float4 a = *reinterpret_cast<const float4*>(&As[buf][k][tm * 4]);
            const float4 b = *reinterpret_cast<const float4*>(&Bs[buf][k][tn * 4]);
            const float av[4] = {a.x, a.y, a.z, a.w};
            const float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        if (more) store_tile(buf ^ 1);
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
            conv_store<float>(out, ws, bias, p, m0 + tm * 4 + i, p0 + tn * 4 + j, acc[i][j]);
}

// out[n, m, q] = sum over the splits of ws[z, m, n * Ho * Wo + q] (in order) + bias[m].
template <typename T>
__device__ __forceinline__ void conv_finalize(T* __restrict__ out, const float* __restrict__ ws,
                                              const T* __restrict__ bias, const ConvParams p,
                                              u32 splits) {
    const u32 hw = p.ho * p.wo;
    GRID_STRIDE(i, p.n * p.o * hw) {
        const u32 img = i / (p.o * hw);
        const u32 rem = i - img * p.o * hw;
        const u32 m = rem / hw;
        const u32 q = rem - m * hw;
        const u32 pidx = img * hw + q;
        float v = p.has_bias ? to_f32(bias[m]) : 0.0f;
        for (u32 z = 0; z < splits; ++z) v += ws[(z * p.o + m) * p.p + pidx];
        out[i] = from_f32<T>(v);
    }
}

// Entry points: each macro defines one `extern "C"` kernel. The instantiations are not in
// this file: the Rust side (`Kernel::instantiation`) appends the ones it compiles, so that a
// heavy kernel can be compiled on its own.

#define CONV_TC(N, T, KN, KH, KW)                                                           \
    extern "C" __global__ void __launch_bounds__(TC_THREADS)                               \
        conv_tc_##N##_##KN(T* out, float* ws, const T* x, const T* w, const T* bias,       \
                           const ConvParams p) {                                           \
        conv_tc<T, KH, KW>(out, ws, x, w, bias, p);                                        \
    }

#define CONV_F32(KN, KH, KW)                                                                \
    extern "C" __global__ void __launch_bounds__(F32_THREADS)                              \
        conv_f32_##KN(float* out, float* ws, const float* x, const float* w,               \
                      const float* bias, const ConvParams p) {                             \
        conv_f32<KH, KW>(out, ws, x, w, bias, p);                                          \
    }

#define CONV_FINALIZE(N, T)                                                                 \
    extern "C" __global__ void conv_finalize_##N(T* out, const float* ws, const T* bias,   \
                                                 const ConvParams p, u32 splits) {         \
        conv_finalize<T>(out, ws, bias, p, splits);                                        \
    }

