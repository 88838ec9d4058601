// Mixed-precision training's linear layer (the backend's matmul and matmul_backward under a BF16
// or FP8 LinearRecipe) against float64 products of the UNROUNDED operands, within bounds derived
// from the formats: each operand element is off by at most half a unit in the last place of its
// format (relative 2^-9 for BF16, 2^-4 for E4M3, 2^-3 for E5M2) plus, for FP8, half a subnormal
// unit times its tile's scale; then fp32 accumulation. The operands' FP8 scales are recomputed
// here from the tiles' maxima.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
#include "test.h"

static uint64_t lcg = 0x9e3779b97f4a7c15ull;

static double urand(void) {
    lcg = lcg * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(lcg >> 11) * 0x1p-53;
}

typedef struct {
    double rel, sub;  // half an ulp (relative) and half a subnormal unit (times the scale)
    float max;        // the format's largest value (scale = max(amax, 1e-4) / max)
} Fmt;

static Fmt fmt_of(LowpFormat f) {
    switch (f) {
    case LOWP_BF16: return (Fmt){0x1p-9, 0, 0};
    case LOWP_E4M3: return (Fmt){0x1p-4, 0x1p-10, 448};
    default: return (Fmt){0x1p-3, 0x1p-17, 57344};
    }
}

// 2^ceil(log2 s), computed apart from the kernel's lowp_ue8m0 (a UE8M0 scale).
static float pow2_up(float s) {
    float p = 1.0f;
    while (p < s) p *= 2.0f;
    while (p / 2.0f >= s) p /= 2.0f;
    return p;
}

// The scales of a rows × K matrix m (row-major along K) in tiles of tr rows × tk columns (0: the
// whole matrix), one per element: out[i * K + k]; rounded up to powers of two when pow2.
static float *tile_scales(const float *m, int rows, int K, int tr, int tk, float max, int pow2) {
    float *out = malloc(sizeof(float) * rows * K);
    int TR = tr ? tr : rows, TK = tk ? tk : K;
    for (int i0 = 0; i0 < rows; i0 += TR)
        for (int k0 = 0; k0 < K; k0 += TK) {
            float amax = 0;
            for (int a = i0; a < i0 + TR && a < rows; a++)
                for (int b = k0; b < k0 + TK && b < K; b++) amax = fmaxf(amax, fabsf(m[(size_t)a * K + b]));
            float s = fmaxf(amax, 1e-4f) / max;
            for (int a = i0; a < i0 + TR && a < rows; a++)
                for (int b = k0; b < k0 + TK && b < K; b++) out[(size_t)a * K + b] = pow2 ? pow2_up(s) : s;
        }
    return out;
}

// Bound on |Σ_k â_k b̂_k − Σ_k a_k b_k| with â, b̂ the rounded operands: per term
// |a||b|(ra + rb + ra rb) + ea |b|(1 + rb) + eb |a|(1 + ra) + ea eb, plus fp32 summation.
static double term_bound(double a, double b, Fmt fa, Fmt fb, double sa, double sb) {
    double ea = fa.sub * sa, eb = fb.sub * sb;
    return fabs(a * b) * (fa.rel + fb.rel + fa.rel * fb.rel) + ea * fabs(b) * (1 + fb.rel) + eb * fabs(a) * (1 + fa.rel) +
           ea * eb;
}

typedef struct {
    double worst;     // largest error / bound
    double rel_rms;   // rms error over rms value
} Report;

// y (N × R) = x (N × C) Wᵀ; dx = g W; dW = gᵀ x — checked against fp64 of x, W, g.
static void check_recipe(const LinearRecipe *r, int N, int R, int C, Report rep[3]) {
    Backend *be = backend_cpu();
    float *x = malloc(sizeof(float) * N * C), *w = malloc(sizeof(float) * R * C), *g = malloc(sizeof(float) * N * R);
    for (int i = 0; i < N * C; i++) x[i] = (float)((urand() * 2 - 1) * ldexp(1, i / C % 5 - 2));
    for (int i = 0; i < R * C; i++) w[i] = (float)((urand() * 2 - 1) * 0.05);
    for (int i = 0; i < N * R; i++) g[i] = (float)((urand() * 2 - 1) * 1e-3 * ldexp(1, i % 3));
    float *y = malloc(sizeof(float) * N * R), *dx = calloc((size_t)N * C, sizeof(float)), *dw = calloc((size_t)R * C, sizeof(float));
    MatView W = matview_f32(w, R, C), DW = matview_f32(dw, R, C);
    CHECK(be->ops->matmul(be, y, x, &W, N, r) == 0);
    CHECK(be->ops->matmul_backward(be, dx, &DW, g, x, &W, N, r) == 0);
    int fp8 = r->fmt != LOWP_BF16, ts = r->tensor_scaling;
    Fmt fa = fmt_of(r->fmt), fg = fmt_of(r->grad_fmt);
    // transposed copies, so that every operand's tiles are "rows × 128 along the reduction"
    float *wt = malloc(sizeof(float) * R * C), *gt = malloc(sizeof(float) * N * R), *xt = malloc(sizeof(float) * N * C);
    for (int i = 0; i < R; i++)
        for (int k = 0; k < C; k++) wt[(size_t)k * R + i] = w[(size_t)i * C + k];
    for (int n = 0; n < N; n++) {
        for (int i = 0; i < R; i++) gt[(size_t)i * N + n] = g[(size_t)n * R + i];
        for (int k = 0; k < C; k++) xt[(size_t)k * N + n] = x[(size_t)n * C + k];
    }
    const int T = ts ? 0 : 128, one = ts ? 0 : 1;
    for (int which = 0; which < 3; which++) {
        // C (M × Nn) = A (M × K) · B (Nn × K)ᵀ, A and B row-major along K
        const float *A = which == 0 ? x : which == 1 ? g : gt, *B = which == 0 ? w : which == 1 ? wt : xt;
        const float *got = which == 0 ? y : which == 1 ? dx : dw;
        int M = which == 2 ? R : N, Nn = which == 0 ? R : C, K = which == 0 ? C : which == 1 ? R : N;
        Fmt fA = which == 0 ? fa : fg, fB = fa;
        int bt = which == 2 ? one : T;  // the weight's 128 x 128 blocks, or a 1 x 128 tile of x along tokens
        // UE8M0: the activations' and gradients' scales (A always; B is x in the weight gradient)
        float *SA = fp8 ? tile_scales(A, M, K, one, T, fA.max, r->pow2_scales) : NULL;
        float *SB = fp8 ? tile_scales(B, Nn, K, bt, T, fB.max, r->pow2_scales && which == 2) : NULL;
        double worst = 0, num = 0, den = 0;
        for (int i = 0; i < M; i++)
            for (int j = 0; j < Nn; j++) {
                double exact = 0, bound = 0, mag = 0;
                for (int k = 0; k < K; k++) {
                    double a = A[(size_t)i * K + k], b = B[(size_t)j * K + k];
                    double sa = fp8 ? SA[(size_t)i * K + k] : 0, sb = fp8 ? SB[(size_t)j * K + k] : 0;
                    exact += a * b, mag += fabs(a * b);
                    bound += term_bound(a, b, fA, fB, sa, sb);
                }
                bound += (K + 8) * 0x1p-24 * (mag + bound);
                double err = fabs(got[(size_t)i * Nn + j] - exact);
                if (!(err <= bound)) {
                    test_fail(__FILE__, __LINE__, "GEMM %d element (%d, %d): %.9g, fp64 %.9g, |diff| %.3g > bound %.3g",
                              which, i, j, got[(size_t)i * Nn + j], exact, err, bound);
                    free(SA), free(SB);
                    goto done;
                }
                if (bound > 0 && err / bound > worst) worst = err / bound;
                num += err * err, den += exact * exact;
            }
        free(SA), free(SB);
        rep[which] = (Report){worst, sqrt(num / den)};
    }
done:
    free(x), free(w), free(g), free(y), free(dx), free(dw), free(wt), free(gt), free(xt);
}

// The three GEMMs of a linear layer, forward, input gradient and weight gradient, in every recipe,
// on ragged shapes (partial tiles and blocks). The error must also be of the format's size, not
// far below it: the operands are really rounded (BF16 ~1e-3 relative, E4M3 ~1e-2).
TEST(test_linear_layer_recipes_within_format_bounds) {
    const LinearRecipe recipes[5] = {
        {.fmt = LOWP_BF16, .grad_fmt = LOWP_BF16, .accum = {0, 1}},
        {.fmt = LOWP_E4M3, .grad_fmt = LOWP_E4M3, .accum = {0, 1}},
        {.fmt = LOWP_E4M3, .grad_fmt = LOWP_E5M2, .accum = {0, 1}},
        {.fmt = LOWP_E4M3, .grad_fmt = LOWP_E4M3, .tensor_scaling = 1, .accum = {0, 1}},
        {.fmt = LOWP_E4M3, .grad_fmt = LOWP_E4M3, .accum = {0, 1}, .pow2_scales = 1}};  // the last: UE8M0 scales
    const double lo[5] = {1e-4, 3e-3, 3e-3, 3e-3, 3e-3}, hi[5] = {4e-3, 8e-2, 1.5e-1, 1.5e-1, 8e-2};
    for (int t = 0; t < 5; t++) {
        Report rep[3] = {{0}};
        check_recipe(&recipes[t], 150, 136, 200, rep);
        for (int which = 0; which < 3; which++) {
            printf("    recipe %d GEMM %d: error at most %.2f of the bound, relative rms %.2g\n", t, which,
                   rep[which].worst, rep[which].rel_rms);
            CHECK_MSG(rep[which].rel_rms > lo[t] && rep[which].rel_rms < hi[t],
                      "recipe %d GEMM %d: relative rms error %.3g outside (%.3g, %.3g)", t, which, rep[which].rel_rms,
                      lo[t], hi[t]);
        }
    }
    // UE8M0 scales really reach the products: the same layer gives other bits than with fp32 scales
    Backend *be = backend_cpu();
    {
        enum { N = 7, R = 20, C = 300 };
        static float x[N * C], w[R * C], y1[N * R], y2[N * R];
        for (int i = 0; i < N * C; i++) x[i] = (float)(urand() * 2 - 1);
        for (int i = 0; i < R * C; i++) w[i] = (float)((urand() * 2 - 1) * 0.05);
        MatView W = matview_f32(w, R, C);
        CHECK(be->ops->matmul(be, y1, x, &W, N, &recipes[1]) == 0 && be->ops->matmul(be, y2, x, &W, N, &recipes[4]) == 0);
        CHECK(memcmp(y1, y2, sizeof y1) != 0);
    }
    // an FP8 recipe needs F32 master weights
    uint16_t wb[4] = {0};
    float x[2] = {1, 2}, y[2];
    MatView w = {.dtype = DT_BF16, .rows = 2, .cols = 2, .data = wb};
    CHECK(be->ops->matmul(be, y, x, &w, 1, &recipes[1]) == -1 && strstr(be->err.msg, "F32 master weights"));
}
