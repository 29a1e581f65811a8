// Fused scaled dot-product attention, softmax(q k^T * scale + mask) v, in the manner of
// FlashAttention-2 (Dao, 2023): one block owns a tile of queries, walks over the keys in
// tiles held in shared memory and keeps a running (online) softmax, so the Lq x Lk score
// matrix never exists in memory. Mirrors sd-models' cpu/attention.rs.
//
// q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv], out [B, H, Lq, Dv], all contiguous;
// blockIdx.y = b * H + h. Head sizes are padded with zeros up to the template's HD (a
// multiple of 16: 40 -> 48), so 40 and 80 keep the tensor cores. Masks: causal (key j > query
// i is masked) and/or an additive f32 mask read through broadcast strides (0 on a broadcast
// axis). A query row whose keys are all masked gives NaN, as PyTorch's softmax does.
//
// f16/bf16: 4 warps, 64 queries x 64 keys per step; each warp owns 16 query rows, keeps its
// Q fragments and its output accumulators in registers, computes S = Q K^T and O += P V with
// mma.sync m16n8k16 (f32 accumulators); P goes from the S accumulators to the A fragments in
// registers (same layout), rounded to the storage type. f32: a SIMT kernel, 16 queries x 32
// keys per step, 8 threads per query row.
//
// Bounds: the host keeps every tensor under 2^31 elements; every global read is guarded by
// row < Lq or Lk and column < D or Dv, and padded rows and columns are zero in shared memory.

struct AttnParams {
    u32 lq, lk;           // query and key counts
    u32 d, dv;            // head sizes of q/k and v (each <= HD)
    u32 heads;            // H, to split blockIdx.y into (b, h)
    float scale;          // applied to q . k before the mask
    u32 causal;           // non-zero: key j > query i is masked
    u32 has_mask;         // non-zero: add mask[b * sb + h * sh + i * sq + j * sk]
    u32 mask_sb, mask_sh, mask_sq, mask_sk;
};

// The additive mask and the causal rule for query i, key j (j < Lk, i < Lq).
__device__ __forceinline__ float attn_bias(const float* __restrict__ mask, const AttnParams& p,
                                           u32 b, u32 h, u32 i, u32 j) {
    if (p.causal && j > i) return NEG_INF;
    if (p.has_mask) return mask[b * p.mask_sb + h * p.mask_sh + i * p.mask_sq + j * p.mask_sk];
    return 0.0f;
}

// ---------------------------------------------------------------------------------------
// Tensor-core kernel (f16, bf16).
// ---------------------------------------------------------------------------------------

#define ATT_BM 64        // queries per block (16 per warp)
#define ATT_BN 64        // keys per step
#define ATT_THREADS 128

// dst[r][c] (row stride LD) = src[(r0 + r) * cols + c] for r < ROWS, c < HD, zero where
// r0 + r >= rows or c >= cols. 16-byte copies when rows are 16-byte aligned (cols % 8 == 0).
template <int ROWS, int HD, int LD>
__device__ __forceinline__ void load_rows_16(u16* __restrict__ dst, const u16* __restrict__ src,
                                             u32 r0, u32 rows, u32 cols) {
    if (cols % 8 == 0) {
        constexpr u32 chunks = HD / 8;
        for (u32 idx = threadIdx.x; idx < ROWS * chunks; idx += blockDim.x) {
            const u32 r = idx / chunks;
            const u32 c = (idx - r * chunks) * 8;
            uint4 val = make_uint4(0, 0, 0, 0);
            if (r0 + r < rows && c < cols) {
                val = *reinterpret_cast<const uint4*>(src + (r0 + r) * cols + c);
            }
            *reinterpret_cast<uint4*>(dst + r * LD + c) = val;
        }
    } else {
        for (u32 idx = threadIdx.x; idx < ROWS * HD; idx += blockDim.x) {
            const u32 r = idx / HD;
            const u32 c = idx - r * HD;
            dst[r * LD + c] = (r0 + r < rows && c < cols) ? src[(r0 + r) * cols + c] : (u16)0;
        }
    }
}

__device__ __forceinline__ u32 lds32(const u16* p) { return *reinterpret_cast<const u32*>(p); }

template <typename T, int HD>
__device__ __forceinline__ void attn_tc(T* __restrict__ out, const T* __restrict__ q,
                                        const T* __restrict__ k, const T* __restrict__ v,
                                        const float* __restrict__ mask, const AttnParams& p) {
    constexpr int LD = HD + 8;     // row stride (halves): conflict-free fragment loads
    constexpr int KSTEPS = HD / 16; // k-steps of Q K^T
    constexpr int DTILES = HD / 8;  // n-tiles of P V
    constexpr int STILES = ATT_BN / 8;
    DYNAMIC_SMEM(u16, smem);
    u16* Qs = smem;
    u16* Ks = Qs + ATT_BM * LD;
    u16* Vs = Ks + ATT_BN * LD;

    const u32 lane = threadIdx.x % 32;
    const u32 warp = threadIdx.x / 32;
    const u32 g = lane / 4;
    const u32 t = lane % 4;
    const u32 bh = blockIdx.y;
    const u32 b = bh / p.heads;
    const u32 h = bh - b * p.heads;
    const u32 q0 = blockIdx.x * ATT_BM;
    const u16* qg = reinterpret_cast<const u16*>(q) + bh * p.lq * p.d;
    const u16* kg = reinterpret_cast<const u16*>(k) + bh * p.lk * p.d;
    const u16* vg = reinterpret_cast<const u16*>(v) + bh * p.lk * p.dv;
    T* og = out + bh * p.lq * p.dv;

    load_rows_16<ATT_BM, HD, LD>(Qs, qg, q0, p.lq, p.d);
    __syncthreads();
    const u32 rq = warp * 16 + g;  // this thread's rows in the tile: rq and rq + 8
    u32 qf[KSTEPS][4];
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
        qf[kk][0] = lds32(Qs + rq * LD + kk * 16 + 2 * t);
        qf[kk][1] = lds32(Qs + (rq + 8) * LD + kk * 16 + 2 * t);
        qf[kk][2] = lds32(Qs + rq * LD + kk * 16 + 8 + 2 * t);
        qf[kk][3] = lds32(Qs + (rq + 8) * LD + kk * 16 + 8 + 2 * t);
    }
    const u32 row[2] = {q0 + rq, q0 + rq + 8};

    float o[DTILES][4];
#pragma unroll
    for (int dt = 0; dt < DTILES; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[dt][e] = 0.0f;
    float m_run[2] = {NEG_INF, NEG_INF};
    float l_run[2] = {0.0f, 0.0f};

    // With the causal mask, keys past the block's last query are masked for every row.
    const u32 kv_end = p.causal ? min(p.lk, q0 + ATT_BM) : p.lk;
    for (u32 j0 = 0; j0 < kv_end; j0 += ATT_BN) {
        __syncthreads();  // every warp is done with the previous K and V tiles
        load_rows_16<ATT_BN, HD, LD>(Ks, kg, j0, p.lk, p.d);
        load_rows_16<ATT_BN, HD, LD>(Vs, vg, j0, p.lk, p.dv);
        __syncthreads();

        // S = Q K^T for 16 rows x 64 keys: s[nt] holds keys nt*8 + 2t (+1), rows g (+8).
        float s[STILES][4];
#pragma unroll
        for (int nt = 0; nt < STILES; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
            const u16* kr = Ks + (nt * 8 + g) * LD;
#pragma unroll
            for (int kk = 0; kk < KSTEPS; ++kk) {
                const u32 bfrag[2] = {lds32(kr + kk * 16 + 2 * t), lds32(kr + kk * 16 + 8 + 2 * t)};
                mma_16816<T>(s[nt], qf[kk], bfrag);
            }
        }

        // Scale, mask, and the online softmax of each of the thread's two rows.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const u32 i = row[r];
            float mx = NEG_INF;
#pragma unroll
            for (int nt = 0; nt < STILES; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const u32 j = j0 + nt * 8 + 2 * t + e;
                    float x = s[nt][2 * r + e] * p.scale;
                    if (j >= p.lk) {
                        x = NEG_INF;
                    } else if (i < p.lq) {
                        x += attn_bias(mask, p, b, h, i, j);
                    }
                    s[nt][2 * r + e] = x;
                    mx = fmaxf(mx, x);
                }
            // The four threads of a group share the row.
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m_run[r], mx);
            const float base = m_new == NEG_INF ? 0.0f : m_new;  // no (-inf) - (-inf)
            const float alpha = expf(m_run[r] - base);
            float sum = 0.0f;
#pragma unroll
            for (int nt = 0; nt < STILES; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float pv = expf(s[nt][2 * r + e] - base);
                    s[nt][2 * r + e] = pv;
                    sum += pv;
                }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            l_run[r] = l_run[r] * alpha + sum;
            m_run[r] = m_new;
#pragma unroll
            for (int dt = 0; dt < DTILES; ++dt) {
                o[dt][2 * r] *= alpha;
                o[dt][2 * r + 1] *= alpha;
            }
        }

        // O += P V: the S accumulators of n-tiles 2kk and 2kk + 1 are the A fragment of
        // the 16 keys kk*16.. (rows g, g + 8; keys 2t, 2t + 1, 2t + 8, 2t + 9).
#pragma unroll
        for (int kk = 0; kk < ATT_BN / 16; ++kk) {
            const u32 af[4] = {
                pack2_f32<T>(s[2 * kk][0], s[2 * kk][1]),
                pack2_f32<T>(s[2 * kk][2], s[2 * kk][3]),
                pack2_f32<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                pack2_f32<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]),
            };
            const u16* v0 = Vs + (kk * 16 + 2 * t) * LD;  // keys 2t, 2t+1, 2t+8, 2t+9
#pragma unroll
            for (int dt = 0; dt < DTILES; ++dt) {
                const u32 col = dt * 8 + g;
                const u32 bfrag[2] = {
                    pack2_bits(v0[col], v0[LD + col]),
                    pack2_bits(v0[8 * LD + col], v0[9 * LD + col]),
                };
                mma_16816<T>(o[dt], af, bfrag);
            }
        }
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const u32 i = row[r];
        if (i >= p.lq) continue;
        const float inv = 1.0f / l_run[r];
#pragma unroll
        for (int dt = 0; dt < DTILES; ++dt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const u32 c = dt * 8 + 2 * t + e;
                if (c < p.dv) og[i * p.dv + c] = from_f32<T>(o[dt][2 * r + e] * inv);
            }
    }
}

// ---------------------------------------------------------------------------------------
// f32 SIMT kernel.
// ---------------------------------------------------------------------------------------

#define ATF_BM 16        // queries per block
#define ATF_BN 32        // keys per step
#define ATF_SUB 8        // threads per query row
#define ATF_THREADS (ATF_BM * ATF_SUB)

// dst[r][c] (row stride LD) = src[(r0 + r) * cols + c] for r < ROWS, c < HD, zero past the
// rows or the columns.
template <int ROWS, int HD, int LD>
__device__ __forceinline__ void load_rows_f32(float* __restrict__ dst,
                                              const float* __restrict__ src, u32 r0, u32 rows,
                                              u32 cols) {
    for (u32 idx = threadIdx.x; idx < ROWS * HD; idx += blockDim.x) {
        const u32 r = idx / HD;
        const u32 c = idx - r * HD;
        dst[r * LD + c] = (r0 + r < rows && c < cols) ? src[(r0 + r) * cols + c] : 0.0f;
    }
}

template <int HD>
__device__ __forceinline__ void attn_f32(float* __restrict__ out, const float* __restrict__ q,
                                         const float* __restrict__ k, const float* __restrict__ v,
                                         const float* __restrict__ mask, const AttnParams& p) {
    constexpr int LDQ = HD + 1;  // odd strides: rows of a warp fall in different banks
    constexpr int LDK = HD + 1;
    constexpr int LDV = HD;
    constexpr int LDP = ATF_BN + 1;
    constexpr int COLS = HD / ATF_SUB;  // output columns per thread
    DYNAMIC_SMEM(float, smemf);
    float* Qs = smemf;
    float* Ks = Qs + ATF_BM * LDQ;
    float* Vs = Ks + ATF_BN * LDK;
    float* Ps = Vs + ATF_BN * LDV;

    const u32 r = threadIdx.x / ATF_SUB;    // query row in the tile
    const u32 sub = threadIdx.x % ATF_SUB;  // lane among the row's 8 threads (same warp)
    const u32 bh = blockIdx.y;
    const u32 b = bh / p.heads;
    const u32 h = bh - b * p.heads;
    const u32 q0 = blockIdx.x * ATF_BM;
    const u32 i = q0 + r;
    const float* qg = q + bh * p.lq * p.d;
    const float* kg = k + bh * p.lk * p.d;
    const float* vg = v + bh * p.lk * p.dv;

    load_rows_f32<ATF_BM, HD, LDQ>(Qs, qg, q0, p.lq, p.d);
    float o[COLS];
#pragma unroll
    for (int c = 0; c < COLS; ++c) o[c] = 0.0f;
    float m_run = NEG_INF;
    float l_run = 0.0f;

    const u32 kv_end = p.causal ? min(p.lk, q0 + ATF_BM) : p.lk;
    for (u32 j0 = 0; j0 < kv_end; j0 += ATF_BN) {
        __syncthreads();
        load_rows_f32<ATF_BN, HD, LDK>(Ks, kg, j0, p.lk, p.d);
        load_rows_f32<ATF_BN, HD, LDV>(Vs, vg, j0, p.lk, p.dv);
        __syncthreads();

        // Scores of keys sub + 8 * kk.
        float sc[ATF_BN / ATF_SUB];
        float mx = NEG_INF;
#pragma unroll
        for (int kk = 0; kk < ATF_BN / ATF_SUB; ++kk) {
            const u32 key = sub + ATF_SUB * kk;
            const u32 j = j0 + key;
            float dot = 0.0f;
            for (u32 c = 0; c < p.d; ++c) dot = fmaf(Qs[r * LDQ + c], Ks[key * LDK + c], dot);
            float x = dot * p.scale;
            if (j >= p.lk) {
                x = NEG_INF;
            } else if (i < p.lq) {
                x += attn_bias(mask, p, b, h, i, j);
            }
            sc[kk] = x;
            mx = fmaxf(mx, x);
        }
        // The row's 8 threads are 8 consecutive lanes of one warp.
        for (int off = 1; off < ATF_SUB; off <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        const float m_new = fmaxf(m_run, mx);
        const float base = m_new == NEG_INF ? 0.0f : m_new;
        const float alpha = expf(m_run - base);
        float sum = 0.0f;
#pragma unroll
        for (int kk = 0; kk < ATF_BN / ATF_SUB; ++kk) {
            const float pv = expf(sc[kk] - base);
            Ps[r * LDP + sub + ATF_SUB * kk] = pv;
            sum += pv;
        }
        for (int off = 1; off < ATF_SUB; off <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        l_run = l_run * alpha + sum;
        m_run = m_new;
        __syncwarp();  // the row's probabilities are visible to its 8 threads
#pragma unroll
        for (int c = 0; c < COLS; ++c) {
            const u32 col = sub + ATF_SUB * c;
            float acc = o[c] * alpha;
            for (u32 key = 0; key < ATF_BN; ++key) acc = fmaf(Ps[r * LDP + key], Vs[key * LDV + col], acc);
            o[c] = acc;
        }
        __syncwarp();  // reads of Ps done before the next step overwrites it
    }

    if (i < p.lq) {
        const float inv = 1.0f / l_run;
        float* orow = out + (bh * p.lq + i) * p.dv;
#pragma unroll
        for (int c = 0; c < COLS; ++c) {
            const u32 col = sub + ATF_SUB * c;
            if (col < p.dv) orow[col] = o[c] * inv;
        }
    }
}

// Entry points: each macro defines one `extern "C"` kernel. The instantiations are not in
// this file: the Rust side (`Kernel::instantiation`) appends the ones it compiles, so that a
// heavy kernel can be compiled on its own.

#define ATTN_TC(N, T, HD)                                                                   \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                              \
        attn_tc_##N##_d##HD(T* out, const T* q, const T* k, const T* v, const float* mask, \
                            const AttnParams p) {                                          \
        attn_tc<T, HD>(out, q, k, v, mask, p);                                             \
    }

#define ATTN_F32(HD)                                                                        \
    extern "C" __global__ void __launch_bounds__(ATF_THREADS)                              \
        attn_f32_d##HD(float* out, const float* q, const float* k, const float* v,         \
                       const float* mask, const AttnParams p) {                            \
        attn_f32<HD>(out, q, k, v, mask, p);                                               \
    }
