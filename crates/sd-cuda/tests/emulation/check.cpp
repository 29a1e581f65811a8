// Runs sd-cuda's kernels in the CPU emulator (emu.h) on small random problems and compares
// them with plain double-precision loops. Built and run by tests/emulation.rs, which writes
// kernels.inc (common.cuh, every module, every instantiation). Prints one line per check;
// exits 1 if any check fails.

#include "emu.h"
#include "kernels.inc"

#include <random>
#include <string>

static int failures = 0;
static int checks = 0;
static std::mt19937 rng(20261122);

static std::vector<float> randn(size_t n, float scale = 1.0f) {
    std::normal_distribution<float> d(0.0f, 1.0f);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng) * scale;
    return v;
}

// Stores `h` in `d` as T; returns the stored values (rounded), which the references use.
template <typename T>
static std::vector<float> put(DevBuf<T>& d, const std::vector<float>& h) {
    std::vector<float> r(h.size());
    for (size_t i = 0; i < h.size(); ++i) {
        d.p[i] = from_f32<T>(h[i]);
        r[i] = to_f32(d.p[i]);
    }
    return r;
}

template <typename T>
static std::vector<float> get(const DevBuf<T>& d, size_t n) {
    std::vector<float> r(n);
    for (size_t i = 0; i < n; ++i) r[i] = to_f32(d.p[i]);
    return r;
}

static void expect(const std::string& name, const std::vector<float>& got,
                   const std::vector<double>& want, double tol) {
    ++checks;
    double num = 0, den = 0;
    bool nan = got.size() != want.size();
    for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
        if (std::isnan(got[i]) != std::isnan(want[i])) nan = true;
        if (std::isnan(want[i])) continue;
        const double e = got[i] - want[i];
        num += e * e;
        den += want[i] * want[i];
    }
    const double err = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
    const bool ok = !nan && !(err > tol);
    if (!ok) ++failures;
    std::printf("%s %-58s rel L2 %.2e (tol %.0e)%s\n", ok ? "ok  " : "FAIL", name.c_str(), err, tol,
                nan ? " NaN/size mismatch" : "");
    std::fflush(stdout);
}

template <typename T> static const char* tname();
template <> const char* tname<float>() { return "f32"; }
template <> const char* tname<half_t>() { return "f16"; }
template <> const char* tname<bf16_t>() { return "bf16"; }

template <typename T> static double tol_of();
template <> double tol_of<float>() { return 2e-6; }
template <> double tol_of<half_t>() { return 2e-3; }
template <> double tol_of<bf16_t>() { return 1e-2; }

static unsigned cdiv(size_t a, size_t b) { return (unsigned)((a + b - 1) / b); }

// ---------------------------------------------------------------------------------------
// Convolution.
// ---------------------------------------------------------------------------------------

template <typename T, typename K, typename F>
static void test_conv(K kernel, F finalize, bool tc, int N, int C, int H, int W, int O, int KH,
                      int KW, int SH, int SW, int PH, int PW, bool has_bias, int want_splits) {
    const int Ho = (H + 2 * PH - KH) / SH + 1, Wo = (W + 2 * PW - KW) / SW + 1;
    const size_t K_ = (size_t)C * KH * KW, P = (size_t)N * Ho * Wo;
    DevBuf<T> x(N * C * H * W), w(O * K_), b(O), out(N * O * Ho * Wo);
    auto xh = put(x, randn(x.n));
    auto wh = put(w, randn(w.n, 1.0f / std::sqrt((float)K_)));
    auto bh = put(b, randn(b.n));
    const unsigned bm = tc ? 128 : 64, bn = tc ? 128 : 64, bk = tc ? 32 : 16;
    const unsigned k_tiles = cdiv(K_, bk);
    const unsigned per = cdiv(k_tiles, want_splits);
    const unsigned splits = cdiv(k_tiles, per);
    ConvParams p{(u32)N, (u32)C, (u32)H, (u32)W, (u32)O, (u32)KH, (u32)KW, (u32)Ho, (u32)Wo,
                 (u32)SH, (u32)SW, (u32)PH, (u32)PW, (u32)K_, (u32)P, per, has_bias ? 1u : 0u};
    DevBuf<float> ws(splits > 1 ? splits * O * P : 1);
    emu_launch(kernel, dim3{cdiv(P, bn), cdiv(O, bm), splits}, 256, 0, out.p,
               splits > 1 ? ws.p : (float*)nullptr, (const T*)x.p, (const T*)w.p,
               has_bias ? (const T*)b.p : (const T*)nullptr, p);
    if (splits > 1)
        emu_launch(finalize, dim3{2, 1, 1}, 256, 0, out.p, (const float*)ws.p,
                   has_bias ? (const T*)b.p : (const T*)nullptr, p, splits);
    std::vector<double> want(out.n);
    for (int n = 0; n < N; ++n)
        for (int o = 0; o < O; ++o)
            for (int y = 0; y < Ho; ++y)
                for (int xx = 0; xx < Wo; ++xx) {
                    double s = has_bias ? bh[o] : 0.0;
                    for (int c = 0; c < C; ++c)
                        for (int i = 0; i < KH; ++i)
                            for (int j = 0; j < KW; ++j) {
                                const int iy = y * SH + i - PH, ix = xx * SW + j - PW;
                                if (iy < 0 || ix < 0 || iy >= H || ix >= W) continue;
                                s += (double)xh[((n * C + c) * H + iy) * W + ix] *
                                     wh[((o * C + c) * KH + i) * KW + j];
                            }
                    want[((n * O + o) * Ho + y) * Wo + xx] = s;
                }
    char name[200];
    std::snprintf(name, sizeof name, "conv %s %s [%d,%d,%d,%d] o%d %dx%d s%d,%d p%d,%d split %u",
                  tc ? "tc" : "simt", tname<T>(), N, C, H, W, O, KH, KW, SH, SW, PH, PW, splits);
    expect(name, get(out, out.n), want, tol_of<T>());
}

template <typename T, typename K1, typename K3, typename KN, typename F>
static void conv_suite(K1 k1, K3 k3, KN kn, F fin, bool tc) {
    // The conformance suite's cases.
    test_conv<T>(k3, fin, tc, 2, 4, 9, 7, 6, 3, 3, 1, 1, 1, 1, true, 1);
    test_conv<T>(k3, fin, tc, 1, 3, 8, 8, 5, 3, 3, 2, 2, 1, 1, true, 1);
    test_conv<T>(k1, fin, tc, 2, 8, 5, 6, 4, 1, 1, 1, 1, 0, 0, true, 1);
    test_conv<T>(k3, fin, tc, 1, 2, 7, 9, 3, 3, 3, 2, 2, 0, 0, false, 1);
    test_conv<T>(k3, fin, tc, 1, 5, 16, 16, 7, 3, 3, 1, 2, 1, 0, true, 1);
    // Two tiles each way (M 130, P 144), K = 360 (aligned rows), with and without split-K.
    test_conv<T>(k3, fin, tc, 1, 40, 12, 12, 130, 3, 3, 1, 1, 1, 1, true, 1);
    test_conv<T>(k3, fin, tc, 1, 40, 12, 12, 130, 3, 3, 1, 1, 1, 1, true, 3);
    // A 1x1 projection with K a multiple of 8, split; a 2x2 kernel (run-time size), stride 2.
    test_conv<T>(k1, fin, tc, 2, 64, 6, 6, 24, 1, 1, 1, 1, 0, 0, false, 2);
    test_conv<T>(kn, fin, tc, 2, 16, 6, 7, 8, 2, 2, 2, 1, 0, 1, true, 1);
}

// ---------------------------------------------------------------------------------------
// Attention.
// ---------------------------------------------------------------------------------------

enum Mask { NONE, CAUSAL, FULL, ROWS, KEYS };

template <typename T, typename K>
static void test_attn(K kernel, bool tc, int hd, int B, int Hh, int Lq, int Lk, int D, int Dv,
                      Mask mask) {
    DevBuf<T> q(B * Hh * Lq * D), k(B * Hh * Lk * D), v(B * Hh * Lk * Dv), out(B * Hh * Lq * Dv);
    auto qh = put(q, randn(q.n));
    auto kh = put(k, randn(k.n));
    auto vh = put(v, randn(v.n));
    // Mask shapes: FULL [B, H, Lq, Lk]; ROWS [1, 1, Lq, Lk]; KEYS [B, 1, 1, Lk].
    u32 sb = 0, sh = 0, sq = 0, sk = 0;
    size_t mn = 1;
    if (mask == FULL) { sb = Hh * Lq * Lk; sh = Lq * Lk; sq = Lk; sk = 1; mn = (size_t)B * Hh * Lq * Lk; }
    if (mask == ROWS) { sq = Lk; sk = 1; mn = (size_t)Lq * Lk; }
    if (mask == KEYS) { sb = Lk; sk = 1; mn = (size_t)B * Lk; }
    DevBuf<float> m(mn);
    auto mh = put(m, randn(mn));
    if (mask == KEYS)  // a padding mask: the last keys of image 0 hidden
        for (int j = Lk / 2; j < Lk; ++j) m.p[j] = mh[j] = -INFINITY;
    const float scale = 1.0f / std::sqrt((float)D);
    const bool has_mask = mask == FULL || mask == ROWS || mask == KEYS;
    AttnParams p{(u32)Lq, (u32)Lk, (u32)D, (u32)Dv, (u32)Hh, scale, mask == CAUSAL ? 1u : 0u,
                 has_mask ? 1u : 0u, sb, sh, sq, sk};
    const unsigned rows = tc ? 64 : 16;
    const size_t smem = tc ? 3 * 64 * (hd + 8) * 2
                           : (16 * (hd + 1) + 32 * (hd + 1) + 32 * hd + 16 * 33) * 4;
    emu_launch(kernel, dim3{cdiv(Lq, rows), (unsigned)(B * Hh), 1}, 128, smem, out.p,
               (const T*)q.p, (const T*)k.p, (const T*)v.p,
               has_mask ? (const float*)m.p : (const float*)nullptr, p);
    std::vector<double> want(out.n);
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < Hh; ++h) {
            const int bh = b * Hh + h;
            for (int i = 0; i < Lq; ++i) {
                std::vector<double> s(Lk);
                double mx = -INFINITY;
                for (int j = 0; j < Lk; ++j) {
                    double d = 0;
                    for (int e = 0; e < D; ++e) d += (double)qh[(bh * Lq + i) * D + e] * kh[(bh * Lk + j) * D + e];
                    d *= scale;
                    if (mask == CAUSAL && j > i) d = -INFINITY;
                    if (has_mask) d += mh[b * sb + h * sh + i * sq + j * sk];
                    s[j] = d;
                    mx = std::max(mx, d);
                }
                double sum = 0;
                for (auto& x : s) sum += (x = std::exp(x - mx));
                for (int e = 0; e < Dv; ++e) {
                    double o = 0;
                    for (int j = 0; j < Lk; ++j) o += s[j] / sum * vh[(bh * Lk + j) * Dv + e];
                    want[(bh * Lq + i) * Dv + e] = o;
                }
            }
        }
    static const char* names[] = {"none", "causal", "mask[B,H,Lq,Lk]", "mask[Lq,Lk]", "mask[B,1,1,Lk]"};
    char name[200];
    std::snprintf(name, sizeof name, "attention %s %s d%d %dx%dx%dx%d D%d Dv%d %s", tc ? "tc" : "simt",
                  tname<T>(), hd, B, Hh, Lq, Lk, D, Dv, names[mask]);
    expect(name, get(out, out.n), want, tol_of<T>());
}

#define ATTN_SUITE(T, P, TC)                                                                \
    test_attn<T>(P##_d32, TC, 32, 1, 1, 1, 1, 4, 4, NONE);                                 \
    test_attn<T>(P##_d32, TC, 32, 2, 3, 17, 17, 8, 8, NONE);                               \
    test_attn<T>(P##_d32, TC, 32, 2, 3, 17, 17, 8, 8, CAUSAL);                             \
    test_attn<T>(P##_d32, TC, 32, 2, 3, 17, 17, 8, 8, ROWS);                               \
    test_attn<T>(P##_d32, TC, 32, 1, 2, 40, 7, 16, 12, ROWS);                              \
    test_attn<T>(P##_d48, TC, 48, 2, 1, 64, 77, 40, 40, NONE);                             \
    test_attn<T>(P##_d48, TC, 48, 2, 1, 70, 77, 40, 40, KEYS);                             \
    test_attn<T>(P##_d64, TC, 64, 1, 2, 65, 70, 64, 64, FULL);                             \
    test_attn<T>(P##_d80, TC, 80, 1, 1, 100, 77, 80, 80, ROWS);                            \
    test_attn<T>(P##_d128, TC, 128, 1, 1, 33, 40, 100, 120, NONE);                         \
    test_attn<T>(P##_d160, TC, 160, 1, 1, 130, 130, 160, 160, CAUSAL);                     \
    test_attn<T>(P##_d160, TC, 160, 1, 1, 129, 77, 160, 160, NONE);

// ---------------------------------------------------------------------------------------
// Norms, softmax and the element-wise kernels.
// ---------------------------------------------------------------------------------------

template <typename T, typename S, typename A>
static void test_group_norm(S stats, A apply, int N, int C, int Sp, int G, unsigned chunk_len,
                            bool silu) {
    DevBuf<T> x(N * C * Sp), g(C), b(C), out(N * C * Sp);
    auto xh = put(x, randn(x.n, 2.0f));
    for (size_t i = 0; i < x.n; ++i) { xh[i] += 3.0f; x.p[i] = from_f32<T>(xh[i]); xh[i] = to_f32(x.p[i]); }
    auto gh = put(g, randn(C));
    auto bh = put(b, randn(C));
    const unsigned group_len = C / G * Sp, chunks = cdiv(group_len, chunk_len);
    DevBuf<float> partial(N * G * chunks * 3);
    const float eps = 1e-5f;
    emu_launch(stats, dim3{chunks, (unsigned)(N * G), 1}, 256, 0, partial.p, (const T*)x.p,
               group_len, chunk_len, chunks);
    emu_launch(apply, dim3{chunks, (unsigned)(N * G), 1}, 256, 0, out.p, (const T*)x.p,
               (const float*)partial.p, (const T*)g.p, (const T*)b.p, (u32)G, (u32)(C / G),
               (u32)Sp, chunk_len, chunks, eps, silu ? 1u : 0u);
    std::vector<double> want(out.n);
    for (int ng = 0; ng < N * G; ++ng) {
        double mean = 0, var = 0;
        for (unsigned i = 0; i < group_len; ++i) mean += xh[ng * group_len + i];
        mean /= group_len;
        for (unsigned i = 0; i < group_len; ++i) var += std::pow(xh[ng * group_len + i] - mean, 2);
        var /= group_len;
        for (unsigned i = 0; i < group_len; ++i) {
            const int c = (ng % G) * (C / G) + i / Sp;
            double y = (xh[ng * group_len + i] - mean) / std::sqrt(var + eps) * gh[c] + bh[c];
            if (silu) y = y / (1 + std::exp(-y));
            want[ng * group_len + i] = y;
        }
    }
    char name[200];
    std::snprintf(name, sizeof name, "group_norm%s %s [%d,%d,%d] g%d chunks %u", silu ? "_silu" : "",
                  tname<T>(), N, C, Sp, G, chunks);
    expect(name, get(out, out.n), want, tol_of<T>());
}

template <typename T, typename L>
static void test_layer_norm(L kernel, int rows, int cols) {
    DevBuf<T> x(rows * cols), g(cols), b(cols), out(rows * cols);
    auto xh = put(x, randn(x.n));
    auto gh = put(g, randn(cols));
    auto bh = put(b, randn(cols));
    emu_launch(kernel, dim3{cdiv(rows, 8), 1, 1}, 256, 0, out.p, (const T*)x.p, (const T*)g.p,
               (const T*)b.p, (u32)rows, (u32)cols, 1e-5f);
    std::vector<double> want(out.n);
    for (int r = 0; r < rows; ++r) {
        double mean = 0, var = 0;
        for (int c = 0; c < cols; ++c) mean += xh[r * cols + c];
        mean /= cols;
        for (int c = 0; c < cols; ++c) var += std::pow(xh[r * cols + c] - mean, 2);
        var /= cols;
        for (int c = 0; c < cols; ++c)
            want[r * cols + c] = (xh[r * cols + c] - mean) / std::sqrt(var + 1e-5) * gh[c] + bh[c];
    }
    char name[200];
    std::snprintf(name, sizeof name, "layer_norm %s [%d,%d]", tname<T>(), rows, cols);
    expect(name, get(out, out.n), want, tol_of<T>());
}

template <typename T, typename S>
static void test_softmax(S kernel, int rows, int cols, bool with_inf) {
    DevBuf<T> x(rows * cols), out(rows * cols);
    auto v = randn(x.n, 3.0f);
    if (with_inf)
        for (int r = 0; r < rows; ++r)
            for (int c = 0; c < cols; c += 3) v[r * cols + c] = -INFINITY;
    auto xh = put(x, v);
    emu_launch(kernel, dim3{cdiv(rows, 8), 1, 1}, 256, 0, out.p, (const T*)x.p, (u32)rows, (u32)cols);
    std::vector<double> want(out.n);
    for (int r = 0; r < rows; ++r) {
        double mx = -INFINITY, s = 0;
        for (int c = 0; c < cols; ++c) mx = std::max(mx, (double)xh[r * cols + c]);
        for (int c = 0; c < cols; ++c) s += std::exp(xh[r * cols + c] - mx);
        for (int c = 0; c < cols; ++c) want[r * cols + c] = std::exp(xh[r * cols + c] - mx) / s;
    }
    char name[200];
    std::snprintf(name, sizeof name, "softmax %s [%d,%d]%s", tname<T>(), rows, cols, with_inf ? " with -inf" : "");
    expect(name, get(out, out.n), want, tol_of<T>());
}

static void test_softmax_all_masked() {
    DevBuf<float> x(2 * 5), out(2 * 5);
    for (int i = 0; i < 10; ++i) x.p[i] = i < 5 ? -INFINITY : (float)i;
    emu_launch(softmax_last_f32, dim3{1, 1, 1}, 256, 0, out.p, (const float*)x.p, 2u, 5u);
    std::vector<double> want(10);
    for (int i = 0; i < 5; ++i) want[i] = NAN;  // PyTorch's answer for a fully masked row
    double s = 0;
    for (int i = 5; i < 10; ++i) s += std::exp(i - 9.0);
    for (int i = 5; i < 10; ++i) want[i] = std::exp(i - 9.0) / s;
    expect("softmax f32 a row of -inf gives NaN", get(out, 10), want, 1e-6);
}

// a [2, 3, 4] (op) b [4] and a [2, 1, 4] (op) b [3, 1], with the plans the Rust side makes.
template <typename TA, typename TB, typename TO, typename K>
static void test_binary(K kernel) {
    struct Case { std::vector<int> sa, sb, out; BroadcastParams p; };
    std::vector<Case> cases = {
        {{2, 3, 4}, {4}, {2, 3, 4}, {2, {6, 4}, {4, 1}, {0, 1}}},
        {{2, 1, 4}, {3, 1}, {2, 3, 4}, {3, {2, 3, 4}, {4, 0, 1}, {0, 1, 0}}},
        {{2, 3, 4}, {2, 3, 4}, {2, 3, 4}, {1, {24}, {1}, {1}}},
    };
    for (auto& cs : cases) {
        size_t na = 1, nb = 1, n = 1;
        for (int d : cs.sa) na *= d;
        for (int d : cs.sb) nb *= d;
        for (int d : cs.out) n *= d;
        DevBuf<TA> a(na);
        DevBuf<TB> b(nb);
        DevBuf<TO> out(n);
        auto ah = put(a, randn(na));
        auto bh = put(b, randn(nb));
        for (u32 op = 0; op < 3; ++op) {
            emu_launch(kernel, dim3{1, 1, 1}, 256, 0, out.p, (const TA*)a.p, (const TB*)b.p, cs.p, (u32)n, op);
            std::vector<double> want(n);
            for (size_t i = 0; i < n; ++i) {
                // numpy's rule, right-aligned.
                size_t rem = i, ia = 0, ib = 0, sa = 1, sb = 1;
                for (int d = (int)cs.out.size() - 1; d >= 0; --d) {
                    const size_t idx = rem % cs.out[d];
                    rem /= cs.out[d];
                    const int da = d - ((int)cs.out.size() - (int)cs.sa.size());
                    const int db = d - ((int)cs.out.size() - (int)cs.sb.size());
                    if (da >= 0) { if (cs.sa[da] != 1) ia += idx * sa; sa *= cs.sa[da]; }
                    if (db >= 0) { if (cs.sb[db] != 1) ib += idx * sb; sb *= cs.sb[db]; }
                }
                const double x = ah[ia], y = bh[ib];
                want[i] = op == 0 ? x + y : (op == 1 ? x - y : x * y);
            }
            char name[200];
            std::snprintf(name, sizeof name, "binary %s %s op %u, %zu x %zu", tname<TA>(), tname<TB>(), op, na, nb);
            expect(name, get(out, n), want, tol_of<TO>());
        }
    }
}

template <typename T, typename U>
static void test_unary(U kernel) {
    const size_t n = 1000;
    DevBuf<T> x(n), out(n);
    auto xh = put(x, randn(n, 3.0f));
    const char* names[] = {"affine", "silu", "gelu", "gelu_tanh", "quick_gelu"};
    for (u32 op = 0; op < 5; ++op) {
        emu_launch(kernel, dim3{2, 1, 1}, 256, 0, out.p, (const T*)x.p, (u32)n, op, -0.5f, 3.0f);
        std::vector<double> want(n);
        for (size_t i = 0; i < n; ++i) {
            const double v = xh[i];
            switch (op) {
                case 0: want[i] = v * -0.5 + 3.0; break;
                case 1: want[i] = v / (1 + std::exp(-v)); break;
                case 2: want[i] = 0.5 * v * (1 + std::erf(v / std::sqrt(2.0))); break;
                case 3: want[i] = 0.5 * v * (1 + std::tanh(std::sqrt(2 / M_PI) * (v + 0.044715 * v * v * v))); break;
                default: want[i] = v / (1 + std::exp(-1.702 * v)); break;
            }
        }
        expect(std::string("unary ") + tname<T>() + " " + names[op], get(out, n), want, tol_of<T>());
    }
}

template <typename T, typename G>
static void test_geglu(G kernel, int rows, int c) {
    DevBuf<T> x(rows * 2 * c), out(rows * c);
    auto xh = put(x, randn(x.n));
    emu_launch(kernel, dim3{2, 1, 1}, 256, 0, out.p, (const T*)x.p, (u32)rows, (u32)c);
    std::vector<double> want(out.n);
    for (int r = 0; r < rows; ++r)
        for (int i = 0; i < c; ++i) {
            const double h = xh[r * 2 * c + i], g = xh[r * 2 * c + c + i];
            want[r * c + i] = h * 0.5 * g * (1 + std::erf(g / std::sqrt(2.0)));
        }
    expect(std::string("geglu ") + tname<T>(), get(out, out.n), want, tol_of<T>());
}

static void test_data() {
    // permute [2, 3, 4, 5] by [3, 1, 0, 2]
    const int s[4] = {2, 3, 4, 5}, axes[4] = {3, 1, 0, 2}, st[4] = {60, 20, 5, 1};
    DevBuf<u32> x(120), out(120);
    for (u32 i = 0; i < 120; ++i) x.p[i] = i;
    PermuteParams p{4, {}, {}};
    for (int i = 0; i < 4; ++i) { p.out_shape[i] = s[axes[i]]; p.in_stride[i] = st[axes[i]]; }
    emu_launch(permute_b32, dim3{1, 1, 1}, 256, 0, out.p, (const u32*)x.p, p, 120u);
    std::vector<double> want(120);
    std::vector<float> got(120);
    for (int i = 0; i < 120; ++i) {
        int rem = i, src = 0;
        for (int d = 3; d >= 0; --d) { const int idx = rem % s[axes[d]]; rem /= s[axes[d]]; src += idx * st[axes[d]]; }
        want[i] = src;
        got[i] = (float)out.p[i];
    }
    expect("permute b32 [2,3,4,5] by [3,1,0,2]", got, want, 0);
    // slice entries 1..3 of axis 2 of [2, 3, 4, 5] (16-bit elements): outer 6, inner 5
    DevBuf<u16> y(120), sl(60);
    for (u32 i = 0; i < 120; ++i) y.p[i] = (u16)i;
    emu_launch(copy2d_b16, dim3{1, 1, 1}, 256, 0, sl.p, (const u16*)y.p, 6u, 10u, 20u, 5u, 10u, 0u);
    std::vector<double> w2(60);
    std::vector<float> g2(60);
    for (int r = 0; r < 6; ++r)
        for (int c = 0; c < 10; ++c) { w2[r * 10 + c] = r * 20 + 5 + c; g2[r * 10 + c] = sl.p[r * 10 + c]; }
    expect("copy2d b16 (slice)", g2, w2, 0);
    // upsample [1, 2, 3, 2]
    DevBuf<u32> u(12), uo(48);
    for (u32 i = 0; i < 12; ++i) u.p[i] = i;
    emu_launch(upsample_nearest2x_b32, dim3{1, 1, 1}, 256, 0, uo.p, (const u32*)u.p, 2u, 3u, 2u);
    std::vector<double> w3(48);
    std::vector<float> g3(48);
    for (int p = 0; p < 2; ++p)
        for (int yy = 0; yy < 6; ++yy)
            for (int xx = 0; xx < 4; ++xx) {
                w3[(p * 6 + yy) * 4 + xx] = (p * 3 + yy / 2) * 2 + xx / 2;
                g3[(p * 6 + yy) * 4 + xx] = (float)uo.p[(p * 6 + yy) * 4 + xx];
            }
    expect("upsample_nearest2x b32", g3, w3, 0);
    // casts round to nearest even
    DevBuf<float> f(300);
    DevBuf<half_t> h(300);
    DevBuf<bf16_t> bb(300);
    auto fh = put(f, randn(300, 10.0f));
    emu_launch(cast_f32_f16, dim3{1, 1, 1}, 256, 0, h.p, (const float*)f.p, 300u);
    emu_launch(cast_f16_bf16, dim3{1, 1, 1}, 256, 0, bb.p, (const half_t*)h.p, 300u);
    std::vector<double> w4(300);
    for (int i = 0; i < 300; ++i) w4[i] = to_f32(from_f32<bf16_t>(to_f32(from_f32<half_t>(fh[i]))));
    expect("cast f32 -> f16 -> bf16", get(bb, 300), w4, 0);
    // bias rows
    DevBuf<float> yb(6 * 7), bias(7);
    auto ybh = put(yb, randn(42));
    auto bh = put(bias, randn(7));
    emu_launch(bias_rows_f32, dim3{1, 1, 1}, 256, 0, yb.p, (const float*)bias.p, 6u, 7u);
    std::vector<double> w5(42);
    for (int i = 0; i < 42; ++i) w5[i] = (double)ybh[i] + bh[i % 7];
    expect("bias_rows f32", get(yb, 42), w5, 1e-7);
}

int main() {
    conv_suite<float>(conv_f32_k1, conv_f32_k3, conv_f32_kn, conv_finalize_f32, false);
    conv_suite<half_t>(conv_tc_f16_k1, conv_tc_f16_k3, conv_tc_f16_kn, conv_finalize_f16, true);
    conv_suite<bf16_t>(conv_tc_bf16_k1, conv_tc_bf16_k3, conv_tc_bf16_kn, conv_finalize_bf16, true);

    ATTN_SUITE(float, attn_f32, false)
    ATTN_SUITE(half_t, attn_tc_f16, true)
    ATTN_SUITE(bf16_t, attn_tc_bf16, true)

    test_group_norm<float>(group_norm_stats_f32, group_norm_apply_f32, 2, 12, 15, 4, 45, false);
    test_group_norm<float>(group_norm_stats_f32, group_norm_apply_f32, 2, 12, 15, 4, 7, true);
    test_group_norm<float>(group_norm_stats_f32, group_norm_apply_f32, 1, 64, 33 * 35, 32, 1024, true);
    test_group_norm<half_t>(group_norm_stats_f16, group_norm_apply_f16, 1, 64, 33 * 35, 32, 500, true);
    test_group_norm<bf16_t>(group_norm_stats_bf16, group_norm_apply_bf16, 2, 32, 40, 8, 64, false);

    test_layer_norm<float>(layer_norm_f32, 12, 24);
    test_layer_norm<float>(layer_norm_f32, 5, 1280);
    test_layer_norm<half_t>(layer_norm_f16, 9, 320);
    test_layer_norm<bf16_t>(layer_norm_bf16, 9, 320);

    test_softmax<float>(softmax_last_f32, 4, 33, false);
    test_softmax<float>(softmax_last_f32, 11, 1000, true);
    test_softmax<half_t>(softmax_last_f16, 11, 77, false);
    test_softmax<bf16_t>(softmax_last_bf16, 11, 77, true);
    test_softmax_all_masked();

    test_binary<float, float, float>(binary_f32_f32);
    test_binary<half_t, half_t, half_t>(binary_f16_f16);
    test_binary<bf16_t, float, float>(binary_bf16_f32);
    test_binary<half_t, bf16_t, float>(binary_f16_bf16);

    test_unary<float>(unary_f32);
    test_unary<half_t>(unary_f16);
    test_unary<bf16_t>(unary_bf16);
    test_geglu<float>(geglu_f32, 6, 10);
    test_geglu<bf16_t>(geglu_bf16, 6, 10);
    test_data();

    std::printf("%d passed, %d failed\n", checks - failures, failures);
    return failures == 0 ? 0 : 1;
}
