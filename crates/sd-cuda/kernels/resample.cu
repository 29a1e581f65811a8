// Nearest-neighbour upsampling by 2 of [N, C, H, W] images. Mirrors sd-models'
// cpu/resample.rs. Moves bits, so it comes in 16- and 32-bit element sizes.

// out[p, y, x] = in[p, y / 2, x / 2] for the `planes` = N * C planes of h x w.
template <typename T>
__device__ __forceinline__ void upsample_nearest2x(T* __restrict__ out, const T* __restrict__ in,
                                                   u32 planes, u32 h, u32 w) {
    const u32 wo = 2 * w;
    const u32 plane_out = 4 * h * w;
    GRID_STRIDE(i, planes * plane_out) {
        const u32 p = i / plane_out;
        const u32 r = i - p * plane_out;
        const u32 y = r / wo;
        const u32 x = r - y * wo;
        out[i] = in[(p * h + y / 2) * w + x / 2];
    }
}

// Entry points: each macro defines one `extern "C"` kernel. The instantiations are not in
// this file: the Rust side (`Kernel::instantiation`) appends the ones it compiles, so that a
// heavy kernel can be compiled on its own.

#define UPSAMPLE(N, T)                                                                      \
    extern "C" __global__ void upsample_nearest2x_##N(T* out, const T* in, u32 planes, u32 h, \
                                                      u32 w) {                             \
        upsample_nearest2x<T>(out, in, planes, h, w);                                      \
    }

