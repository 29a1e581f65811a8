// The PTX-level helpers of common.cuh in C++, for the host emulator (see emu.h). Included by
// common.cuh after its storage types when SD_HOST_EMULATION is defined.
#pragma once

inline float to_f32(float x) { return x; }
inline float to_f32(half_t x) {
    _Float16 h;
    std::memcpy(&h, &x.bits, 2);
    return (float)h;
}
inline float to_f32(bf16_t x) { return __uint_as_float(((u32)x.bits) << 16); }

template <typename T> T from_f32(float x);
template <> inline float from_f32<float>(float x) { return x; }
template <> inline half_t from_f32<half_t>(float x) {
    _Float16 h = (_Float16)x;  // round to nearest even
    half_t r;
    std::memcpy(&r.bits, &h, 2);
    return r;
}
template <> inline bf16_t from_f32<bf16_t>(float x) {
    u32 u = __float_as_uint(x);
    bf16_t r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (u16)((u >> 16) | 0x40);  // quiet NaN
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
        r.bits = (u16)(u >> 16);
    }
    return r;
}

template <typename T> inline u32 pack2_f32(float lo, float hi) {
    return (u32)from_f32<T>(lo).bits | ((u32)from_f32<T>(hi).bits << 16);
}
inline u32 pack2_bits(u16 lo, u16 hi) { return ((u32)hi << 16) | (u32)lo; }

template <typename T> inline float emu_half(u32 reg, int upper) {
    T h;
    h.bits = (u16)(upper ? reg >> 16 : reg & 0xffffu);
    return to_f32(h);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: gathers the warp's fragments into A
// (16 x 16) and B (16 x 8) by the PTX ISA's layout ("Matrix Fragments for mma.m16n8k16 with
// floating point type"), then each lane updates its four accumulators.
template <typename T> inline void mma_16816(float c[4], const u32 a[4], const u32 b[2]) {
    auto& x = emu_block->mma[emu_warp];
    for (int r = 0; r < 4; ++r) x[emu_lane * 6 + r] = a[r];
    for (int r = 0; r < 2; ++r) x[emu_lane * 6 + 4 + r] = b[r];
    emu_warp_sync();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l % 4;
        for (int i = 0; i < 8; ++i) {  // a_i: register i / 2, half i % 2
            const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
            const int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
            A[row][col] = emu_half<T>(x[l * 6 + i / 2], i & 1);
        }
        for (int i = 0; i < 4; ++i) {  // b_i
            const int row = t * 2 + (i & 1) + (i >= 2 ? 8 : 0);
            B[row][g] = emu_half<T>(x[l * 6 + 4 + i / 2], i & 1);
        }
    }
    emu_warp_sync();
    const int g = emu_lane >> 2, t = emu_lane % 4;
    for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? g : g + 8;
        const int col = t * 2 + (i & 1);
        float s = c[i];
        for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
        c[i] = s;
    }
}

#define DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(emu_dynamic_smem)
