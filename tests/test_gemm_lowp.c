// The low-precision GEMMs of mixed-precision training (kernels/gemm_lowp.h) against fp64
// references written here: the operands rounded by the scalar codecs (themselves tested against
// the format definitions in test_kernels.c), every product and sum in double, FP8 chunks scaled
// as the report describes. Both paths: the AVX512_BF16 dot products when the CPU has them, and
// the portable one (operands rounded into fp32, sgemm).
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/convert.h"
#include "kernels/gemm_lowp.h"
#include "kernels/kernels_cpu.h"
#include "kernels/matmul.h"
#include "test.h"

static uint64_t lcg = 0x2545f4914f6cdd1dull;

static double urand(void) {  // [0, 1)
    lcg = lcg * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(lcg >> 11) * 0x1p-53;
}

static float f32_from(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// Values that exercise the rounding: random over many binades, exact ties of the BF16, E4M3 and
// E5M2 grids (mantissa patterns with the first dropped bit set), subnormals of both FP8 formats,
// values past saturation, zeros, NaN.
static float probe_value(long i) {
    double sgn = i % 2 ? -1.0 : 1.0;
    switch (i % 9) {
    case 0: return (float)(sgn * ldexp(1 + urand(), (int)(urand() * 60) - 30));
    case 1: return f32_from(((uint32_t)(urand() * 254 + 1) << 23) | 0x8000u);                // BF16 tie
    case 2: return f32_from(((uint32_t)(120 + urand() * 16) << 23) | (uint32_t)(urand() * 8) << 20 | 1u << 19);  // E4M3 tie
    case 3: return f32_from(((uint32_t)(110 + urand() * 30) << 23) | (uint32_t)(urand() * 4) << 21 | 1u << 20);  // E5M2 tie
    case 4: return (float)(sgn * (int)(urand() * 32) * 0x1p-10);                              // E4M3 subnormals, ties
    case 5: return (float)(sgn * (int)(urand() * 16) * 0x1p-17);                              // E5M2 subnormals, ties
    case 6: return (float)(sgn * (440 + urand() * 80000));                                   // saturation
    case 7: return i % 5 == 0 ? NAN : sgn * 0.0f;
    default: return (float)(sgn * urand() * 2);
    }
}

// The activations FP8 storage keeps (lowp_fp8_save_rows): every code is the scalar codec's of
// x / scale (convert.c, itself checked against the format in test_kernels.c), with the tile scales
// max(amax, 1e-4) / 448 computed here; restoring gives code × scale. The vector encoder on its own
// too, at fixed scales, so that values past saturation, infinities and NaN reach it.
TEST(test_lowp_fp8_saved_codes_are_the_codec) {
    enum { rows = 37, cols = 300, n = 40000 };  // 300: two whole 128-column tiles and a ragged one
    const int kc = (cols + 127) / 128;
    float *x = malloc(sizeof(float) * rows * cols), *back = malloc(sizeof(float) * rows * cols);
    float *scales = malloc(sizeof(float) * rows * kc);
    uint8_t *codes = malloc((size_t)rows * cols);
    for (long i = 0; i < (long)rows * cols; i++) x[i] = probe_value(i);
    x[5] = INFINITY;  // a tile whose scale is infinite: finite values code to zero, the infinity to NaN
    lowp_fp8_save_rows(codes, scales, x, rows, cols, 0);
    lowp_fp8_restore_rows(back, codes, scales, rows, cols);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < kc; c++) {
            float amax = 0;
            for (int k = c * 128; k < cols && k < c * 128 + 128; k++)
                if (fabsf(x[r * cols + k]) > amax) amax = fabsf(x[r * cols + k]);
            float s = fmaxf(amax, 1e-4f) / 448.0f;
            CHECK_MSG(scales[r * kc + c] == s || isnan(scales[r * kc + c]), "row %d tile %d: scale %g, want %g", r, c,
                      scales[r * kc + c], s);
            for (int k = c * 128; k < cols && k < c * 128 + 128; k++) {
                uint8_t want = fp8_e4m3_from_f32(x[r * cols + k] / scales[r * kc + c]);
                float v = fp8_e4m3_to_f32(want) * scales[r * kc + c];
                int same_back = back[r * cols + k] == v || (isnan(v) && isnan(back[r * cols + k]));
                CHECK_MSG(codes[r * cols + k] == want && same_back,
                          "x[%d][%d] = %.9g: code 0x%02x, codec 0x%02x; restored %.9g, want %.9g", r, k,
                          x[r * cols + k], codes[r * cols + k], want, back[r * cols + k], v);
            }
        }
    if (kernels_cpu_avx512()) {  // (without AVX-512 the rows above took the scalar codec)
        float *y = malloc(sizeof(float) * n);
        uint8_t *got = malloc(n);
        for (long i = 0; i < n; i++) y[i] = probe_value(i);
        y[1] = INFINITY, y[3] = -INFINITY, y[7] = -NAN;
        const float fixed[3] = {1.0f, 0.37f, 3e-3f};
        for (int s = 0; s < 3; s++) {
            long done = lowp_e4m3_codes_avx512(got, y, n, fixed[s]);
            CHECK(done == n);
            for (long i = 0; i < done; i++)
                CHECK_MSG(got[i] == fp8_e4m3_from_f32(y[i] / fixed[s]), "scale %g: x = %.9g -> 0x%02x, codec 0x%02x",
                          fixed[s], y[i], got[i], fp8_e4m3_from_f32(y[i] / fixed[s]));
        }
        free(y), free(got);
    }
    free(x), free(back), free(scales), free(codes);
}

// The vector rounding used by the packers gives the scalar codecs' values bit for bit.
TEST(test_lowp_values_vector_equals_scalar) {
    enum { n = 40000 };
    float *x = malloc(sizeof(float) * n), *got = malloc(sizeof(float) * n);
    for (long i = 0; i < n; i++) x[i] = probe_value(i);
    const LowpFormat fmts[3] = {LOWP_BF16, LOWP_E4M3, LOWP_E5M2};
    const float scales[3] = {1.0f, 0.37f, 3e-3f};
    for (int f = 0; f < 3; f++)
        for (int s = 0; s < 3; s++) {
            lowp_values(got, x, n, fmts[f], scales[s]);
            for (long i = 0; i < n; i++) {
                float want = lowp_value(fmts[f], x[i], scales[s]);
                uint32_t a, b;
                memcpy(&a, &got[i], 4);
                memcpy(&b, &want, 4);
                int same = a == b || (isnan(got[i]) && isnan(want));
                CHECK_MSG(same, "format %d scale %g: x = %.9g -> %.9g, scalar %.9g", f, scales[s], x[i], got[i], want);
            }
        }
    // quotients at and beside the formats' rounding boundaries: x = M · s for every midpoint M of
    // two neighbouring E4M3 or E5M2 values (subnormal ones too) and a few units in the last place
    // either side of it, where a quotient formed as x · (1/s) could round the other way
    const float hard_scales[8] = {0.37f, 3e-3f, 1.7e-5f, 0.0123456f, 0.1f, 0.7f, 1e-3f, 2.3e-4f};
    enum { per = 25 };
    float *y = malloc(sizeof(float) * 2 * 256 * per), *yv = malloc(sizeof(float) * 2 * 256 * per);
    for (int s = 0; s < 8; s++)
        for (int f = 1; f < 3; f++) {
            LowpFormat fmt = fmts[f];
            long m = 0;
            for (int c = 0; c < 255; c++) {  // midpoints of consecutive positive codes
                float a = f == 1 ? fp8_e4m3_to_f32((uint8_t)c) : fp8_e5m2_to_f32((uint8_t)c);
                float b = f == 1 ? fp8_e4m3_to_f32((uint8_t)(c + 1)) : fp8_e5m2_to_f32((uint8_t)(c + 1));
                if (!isfinite(a) || !isfinite(b)) continue;
                float x = (float)(0.5 * ((double)a + (double)b) * hard_scales[s]);
                for (int k = -per / 2; k <= per / 2; k++) {
                    float v = x;
                    for (int t = 0; t < abs(k); t++) v = nextafterf(v, k < 0 ? -INFINITY : INFINITY);
                    y[m++] = (c % 2 ? -1 : 1) * v;
                }
            }
            lowp_values(yv, y, m, fmt, hard_scales[s]);
            for (long i = 0; i < m; i++) {
                float want = lowp_value(fmt, y[i], hard_scales[s]);
                CHECK_MSG(yv[i] == want, "format %d scale %g: x = %.9g (x / s = %.9g) -> %.9g, scalar %.9g", f,
                          hard_scales[s], y[i], y[i] / hard_scales[s], yv[i], want);
            }
        }
    free(y), free(yv);
    // a stride through every fp32 bit pattern (all exponents, both signs, NaN and infinities), as
    // quotients by 1: the vector rounding is the scalar codec's on the whole range
    enum { stride = 4093, sweep = (int)(4294967296.0 / stride) + 1 };
    float *z = malloc(sizeof(float) * sweep), *zv = malloc(sizeof(float) * sweep);
    for (long i = 0; i < sweep; i++) z[i] = f32_from((uint32_t)((uint64_t)i * stride));
    for (int f = 1; f < 3; f++) {
        lowp_values(zv, z, sweep, fmts[f], 1.0f);
        long bad = 0;
        for (long i = 0; i < sweep; i++) {
            float want = lowp_value(fmts[f], z[i], 1.0f);
            uint32_t a, b;
            memcpy(&a, &zv[i], 4);
            memcpy(&b, &want, 4);
            if (a != b && !(isnan(zv[i]) && isnan(want)) && bad++ < 3)
                CHECK_MSG(0, "format %d: x = %a -> %a, scalar %a", f, z[i], zv[i], want);
        }
        CHECK_MSG(bad == 0, "format %d: %ld of %d bit patterns differ", f, bad, (int)sweep);
    }
    free(z), free(zv);
    // the scalar values are the formats': a few fixed points
    CHECK(lowp_value(LOWP_E4M3, 1000.0f, 1.0f) == 448.0f);
    CHECK(lowp_value(LOWP_E5M2, -1e9f, 1.0f) == -57344.0f);
    CHECK(lowp_value(LOWP_E4M3, 3 * 0x1p-10f, 1.0f) == 2 * 0x1p-9f);
    CHECK(lowp_value(LOWP_E4M3, 1.0625f * 4, 4.0f) == 1.0f);
    CHECK(lowp_value(LOWP_BF16, f32_from(0x3f808000u), 1.0f) == 1.0f);
    free(x), free(got);
}

typedef struct {
    int rows, K, trans;
    float *data;
    float *scale;
    LowpOperand op;
} Opnd;

// A rows × K operand stored as trans says, rows of different magnitudes (so that tile scales
// differ), quantised as fmt with the given scaling.
static void make_opnd(Opnd *o, int rows, int K, int trans, LowpFormat fmt, LowpScaling how) {
    o->rows = rows, o->K = K, o->trans = trans;
    o->data = malloc(sizeof(float) * ((size_t)rows * K + 1));
    for (int i = 0; i < rows; i++)
        for (int k = 0; k < K; k++) {
            float v = (float)((urand() * 2 - 1) * ldexp(1, i % 7 - 3 + (k / 128) % 3));
            o->data[trans ? (size_t)k * rows + i : (size_t)i * K + k] = v;
        }
    o->op = (LowpOperand){.data = o->data, .ld = trans ? rows : K, .trans = trans, .fmt = fmt};
    o->scale = NULL;
    if (fmt != LOWP_BF16) {
        o->scale = malloc(sizeof(float) * lowp_fp8_scale_count(rows, K, how));
        lowp_fp8_scales(&o->op, o->scale, rows, K, how);
    }
}

static float opnd_at(const Opnd *o, int i, int k) {
    return o->trans ? o->data[(size_t)k * o->rows + i] : o->data[(size_t)i * o->K + k];
}

static float opnd_scale(const Opnd *o, int i, int k) {
    const LowpOperand *p = &o->op;
    return p->fmt == LOWP_BF16 ? 1.0f : p->scale[(long)(i / p->scale_rows) * p->scale_ld + (long)(k / 128) * p->scale_kstep];
}

// Checks C (M × N, from C0 when add) against the fp64 sum of the rounded operands, chunk by chunk,
// within (K + 8) units of 2^-24 of Σ|terms| (fp32 accumulation of K terms, the scale products and
// the promotion's fused multiply-adds).
static int check_product(const float *C, const float *C0, int add, const Opnd *A, const Opnd *B, int M, int N, int K,
                         double *worst) {
    int fp8 = A->op.fmt != LOWP_BF16, chunk = fp8 ? 128 : (K > 0 ? K : 1);
    // the operands' rounded values (lowp_value), once
    double *ra = malloc(sizeof(double) * ((size_t)M * K + (size_t)N * K + 1)), *rb = ra + (size_t)M * K;
    for (int i = 0; i < M; i++)
        for (int k = 0; k < K; k++) ra[(size_t)i * K + k] = lowp_value(A->op.fmt, opnd_at(A, i, k), opnd_scale(A, i, k));
    for (int j = 0; j < N; j++)
        for (int k = 0; k < K; k++) rb[(size_t)j * K + k] = lowp_value(B->op.fmt, opnd_at(B, j, k), opnd_scale(B, j, k));
    *worst = 0;
    int ok = 1;
    for (int i = 0; i < M && ok; i++)
        for (int j = 0; j < N; j++) {
            double ref = add ? C0[(size_t)i * N + j] : 0, mag = fabs(ref);
            for (int k0 = 0; k0 < K; k0 += chunk) {
                double part = 0, pmag = 0, s = (double)opnd_scale(A, i, k0) * opnd_scale(B, j, k0);
                for (int k = k0; k < K && k < k0 + chunk; k++) {
                    double t = ra[(size_t)i * K + k] * rb[(size_t)j * K + k];
                    part += t, pmag += fabs(t);
                }
                ref += part * s, mag += pmag * s;
            }
            double err = fabs(C[(size_t)i * N + j] - ref), tol = (K + 8) * 0x1p-24 * mag + 1e-30;
            if (!(err <= tol)) {
                test_fail(__FILE__, __LINE__, "C[%d][%d] = %.9g, fp64 %.9g, |diff| %.3g > %.3g (M %d N %d K %d)", i,
                          j, C[(size_t)i * N + j], ref, err, tol, M, N, K);
                ok = 0;
                break;
            }
            if (mag > 0 && err / mag > *worst) *worst = err / mag;
        }
    free(ra);
    return ok;
}

static void run_case(int M, int N, int K, int ta, int tb, LowpFormat fa, LowpFormat fb, LowpScaling sa,
                     LowpScaling sb, int add) {
    Opnd A, B;
    make_opnd(&A, M, K, ta, fa, sa);
    make_opnd(&B, N, K, tb, fb, sb);
    float *C = malloc(sizeof(float) * M * N), *C0 = malloc(sizeof(float) * M * N);
    for (int i = 0; i < M * N; i++) C0[i] = (float)(urand() - 0.5);
    // "auto": AMX tiles where the CPU has them; "avx512bf16": the dot products; "avx512": no BF16
    // dot products, the portable path; "emulated": the AMX kernel against a C model of the tile
    // instructions (its blocking and packing, on any CPU with AVX512_BF16), in two column shares
    const char *isas[4] = {"auto", "avx512bf16", "avx512", "emulated"};
    for (int p = 0; p < 4; p++) {
        int emulated = p == 3, rc = 0;
        kernels_set_isa(emulated ? "auto" : isas[p]);
        if (emulated && !kernels_cpu_avx512bf16()) break;
        memcpy(C, C0, sizeof(float) * M * N);
        if (emulated) {
            int n1 = N / 3;
            rc = gemm_lowp_amx_emulated(C, N, &A.op, &B.op, K, add, 0, M, 0, n1) |
                 gemm_lowp_amx_emulated(C, N, &A.op, &B.op, K, add, 0, M, n1, N);
        } else {
            rc = gemm_lowp(C, N, &A.op, &B.op, M, N, K, add);
        }
        const char *path = emulated ? "amx emulated" : gemm_lowp_isa();
        double worst;
        int ok = rc == 0 && check_product(C, C0, add, &A, &B, M, N, K, &worst);
        kernels_set_isa("auto");
        if (!ok) {
            test_fail(__FILE__, __LINE__, "path %s (%s), M %d N %d K %d trans %d%d formats %d%d scaling %d%d add %d rc %d",
                      isas[p], path, M, N, K, ta, tb, fa, fb, sa, sb, add, rc);
            break;
        }
    }
    free(A.data), free(A.scale), free(B.data), free(B.scale), free(C), free(C0);
}

// Ragged shapes (partial register tiles and panels, odd K, K past one packed slice and one chunk;
// long K over small C, which splits K over the threads; a thread's columns past one packed block of
// B and past a 256-row span of its packing), all four storage combinations, BF16 and FP8 with
// every scaling, overwrite and accumulate.
TEST(test_gemm_lowp_against_fp64) {
    const int shapes[][3] = {{37, 45, 300}, {5, 70, 129}, {64, 33, 513}, {13, 100, 1}, {1, 1, 7},
                             {200, 64, 128}, {40, 70, 2100}, {3, 9, 1300}, {14, 2500, 140}, {250, 700, 33}};
    for (int s = 0; s < 10; s++)
        for (int t = 0; t < 4; t++) {
            int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2], ta = t & 1, tb = t >> 1;
            run_case(M, N, K, ta, tb, LOWP_BF16, LOWP_BF16, 0, 0, t == 3);
            run_case(M, N, K, ta, tb, LOWP_E4M3, LOWP_E4M3, LOWP_TILE_1x128, LOWP_BLOCK_128x128, t & 1);
            run_case(M, N, K, ta, tb, LOWP_E5M2, LOWP_E4M3, LOWP_TILE_1x128, LOWP_TILE_1x128, 0);
            run_case(M, N, K, ta, tb, LOWP_E4M3, LOWP_E5M2, LOWP_TENSOR, LOWP_TENSOR, 1);
        }
    // formats must agree on BF16 vs FP8
    Opnd A, B;
    make_opnd(&A, 4, 8, 0, LOWP_BF16, 0);
    make_opnd(&B, 4, 8, 0, LOWP_E4M3, LOWP_TENSOR);
    float C[16];
    CHECK(gemm_lowp(C, 4, &A.op, &B.op, 4, 4, 8, 0) == -1);
    free(A.data), free(B.data), free(B.scale);
}

// Rounding really happens, and by the formats' amounts: against the fp32 operands' exact product
// the BF16 product is off by about 2^-9 relative per operand, E4M3 tiles by about 2^-4.
TEST(test_gemm_lowp_error_is_the_formats) {
    int M = 48, N = 64, K = 1024;
    Opnd A, B;
    const LowpFormat f[2] = {LOWP_BF16, LOWP_E4M3};
    const double lo[2] = {1e-5, 1e-3}, hi[2] = {2e-2 / 8, 2e-1 / 4};
    for (int p = 0; p < 2; p++) {
        make_opnd(&A, M, K, 0, f[p], LOWP_TILE_1x128);
        make_opnd(&B, N, K, 0, f[p], LOWP_BLOCK_128x128);
        float *C = malloc(sizeof(float) * M * N);
        CHECK(gemm_lowp(C, N, &A.op, &B.op, M, N, K, 0) == 0);
        double num = 0, den = 0;
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) {
                double exact = 0;
                for (int k = 0; k < K; k++) exact += (double)opnd_at(&A, i, k) * opnd_at(&B, j, k);
                num += (C[i * N + j] - exact) * (C[i * N + j] - exact), den += exact * exact;
            }
        double rel = sqrt(num / den);
        CHECK_MSG(rel > lo[p] && rel < hi[p], "format %d: relative rms error %.3g outside (%.3g, %.3g)", p, rel, lo[p],
                  hi[p]);
        free(A.data), free(A.scale), free(B.data), free(B.scale), free(C);
    }
}

// The FP8 scales are max(amax of the tile, 1e-4) / the format's max, over 1 x 128 tiles, 128 x 128
// blocks or the whole tensor, whichever way the operand is stored (ragged edges included).
TEST(test_lowp_fp8_scales_are_tile_amax) {
    const int rows = 300, K = 261;
    for (int trans = 0; trans < 2; trans++)
        for (int how = 0; how < 3; how++) {
            Opnd o;
            make_opnd(&o, rows, K, trans, how == 1 ? LOWP_E5M2 : LOWP_E4M3, (LowpScaling)how);
            int tile_rows = how == 0 ? 1 : how == 1 ? 128 : rows, tile_k = how == 2 ? K : 128;
            float mx = how == 1 ? 57344.0f : 448.0f;
            if (how == 0) {  // a tile of zeros gets the 1e-4 floor
                for (int k = 0; k < 128; k++) o.data[trans ? (size_t)k * rows + 7 : (size_t)7 * K + k] = 0;
                lowp_fp8_scales(&o.op, o.scale, rows, K, LOWP_TILE_1x128);
            }
            for (int i0 = 0; i0 < rows; i0 += tile_rows)
                for (int k0 = 0; k0 < K; k0 += tile_k) {
                    float amax = 0;
                    for (int i = i0; i < i0 + tile_rows && i < rows; i++)
                        for (int k = k0; k < k0 + tile_k && k < K; k++) amax = fmaxf(amax, fabsf(opnd_at(&o, i, k)));
                    float want = fmaxf(amax, 1e-4f) / mx;
                    CHECK_MSG(opnd_scale(&o, i0, k0) == want, "trans %d scaling %d tile (%d, %d): %.9g, want %.9g",
                              trans, how, i0, k0, opnd_scale(&o, i0, k0), want);
                    if (how == 0 && i0 == 7 && k0 == 0) CHECK(want == 1e-4f / 448.0f);
                }
            free(o.data), free(o.scale);
        }
}

// UE8M0 scales (--fp8-scale-format ue8m0): lowp_ue8m0 is 2^ceil(log2 s) (powers of two stay), and
// an operand with pow2 set gets exactly that of each tile's fp32 scale, so its amax lands in
// (max / 2, max] — never saturating, never below half the format's range.
TEST(test_lowp_ue8m0_scales) {
    const float cases[][2] = {{1.0f, 1.0f}, {0.75f, 1.0f}, {1.5f, 2.0f}, {0x1p-20f, 0x1p-20f}, {0x1.000002p-20f, 0x1p-19f},
                              {1e-4f / 448.0f, 0x1p-22f}, {3.0f / 448.0f, 0x1p-7f}};
    for (int i = 0; i < (int)(sizeof cases / sizeof cases[0]); i++)
        CHECK_MSG(lowp_ue8m0(cases[i][0]) == cases[i][1], "ue8m0(%a) = %a, want %a", cases[i][0], lowp_ue8m0(cases[i][0]),
                  cases[i][1]);
    const int rows = 70, K = 300;
    for (int how = 0; how < 3; how++) {
        Opnd o;
        make_opnd(&o, rows, K, 0, LOWP_E4M3, (LowpScaling)how);
        float *fp32 = malloc(sizeof(float) * lowp_fp8_scale_count(rows, K, (LowpScaling)how));
        memcpy(fp32, o.scale, sizeof(float) * lowp_fp8_scale_count(rows, K, (LowpScaling)how));
        o.op.pow2 = 1;
        CHECK(lowp_fp8_scales(&o.op, o.scale, rows, K, (LowpScaling)how) == 0);
        for (long c = 0; c < lowp_fp8_scale_count(rows, K, (LowpScaling)how); c++) {
            int e;
            CHECK_MSG(frexpf(o.scale[c], &e) == 0.5f && o.scale[c] >= fp32[c] && o.scale[c] < 2 * fp32[c],
                      "scaling %d scale %ld: %a from %a", how, c, o.scale[c], fp32[c]);
        }
        free(o.data), free(o.scale), free(fp32);
    }
}

// The H800 accumulation model, written again from its definition with integers: in each group of
// 32 products the leading bit of the largest magnitude among them and the running sum sets a grid
// 2^(lead + 1 - bits); every addend and the running sum are cut toward zero onto it and summed.
static double limited_sum(const double *t, int K, int bits) {
    double acc = 0;
    for (int g = 0; g < K; g += 32) {
        double big = fabs(acc);
        for (int k = g; k < K && k < g + 32; k++) big = fmax(big, fabs(t[k]));
        if (big == 0) continue;
        int lead = 0;  // 2^lead <= big < 2^(lead + 1)
        while (ldexp(1, lead) > big) lead--;
        while (ldexp(1, lead + 1) <= big) lead++;
        double q = ldexp(1, lead + 1 - bits);
        long long units = (long long)(acc / q);
        for (int k = g; k < K && k < g + 32; k++) units += (long long)(t[k] / q);
        acc = (double)units * q;
    }
    return acc;
}

// gemm_lowp_scaled with an emulated accumulator equals that model (with promotion: per 128-chunk
// of code products, then × the scales in fp32; without: one sum of the scaled products). The sizes
// of the error it causes are bench_kernels' FP8 accumulation table.
TEST(test_gemm_lowp_emulated_accumulation) {
    const int M = 3, N = 5, K = 1000;
    Opnd A, B;
    make_opnd(&A, M, K, 0, LOWP_E4M3, LOWP_TILE_1x128);
    make_opnd(&B, N, K, 1, LOWP_E4M3, LOWP_BLOCK_128x128);
    for (int bits = 8; bits <= 20; bits += 6)  // 8 and 14: the vector path; 20: the scalar one
        for (int promote = 0; promote < 2; promote++) {
            float C[15];
            LowpAccum acc = {bits, promote};
            CHECK(gemm_lowp_scaled(C, N, &A.op, -1, NULL, &B.op, -1, NULL, M, N, K, 0, &acc) == 0);
            for (int i = 0; i < M; i++)
                for (int j = 0; j < N; j++) {
                    double t[1000], want = 0;
                    int chunk = promote ? 128 : K;
                    for (int k0 = 0; k0 < K; k0 += chunk) {
                        int n = K - k0 < chunk ? K - k0 : chunk;
                        float sa = opnd_scale(&A, i, k0), sb = opnd_scale(&B, j, k0);
                        for (int k = 0; k < n; k++) {
                            float a = lowp_value(LOWP_E4M3, opnd_at(&A, i, k0 + k), opnd_scale(&A, i, k0 + k));
                            float b = lowp_value(LOWP_E4M3, opnd_at(&B, j, k0 + k), opnd_scale(&B, j, k0 + k));
                            if (!promote) a *= opnd_scale(&A, i, k0 + k), b *= opnd_scale(&B, j, k0 + k);
                            t[k] = (double)(a * b);
                        }
                        double part = limited_sum(t, n, bits);
                        want = promote ? fmaf((float)part, sa * sb, (float)want) : (float)want + (float)part;
                    }
                    CHECK_MSG(C[i * N + j] == (float)want, "bits %d promote %d C[%d][%d] = %.9g, model %.9g", bits,
                              promote, i, j, C[i * N + j], want);
                }
        }
    free(A.data), free(A.scale), free(B.data), free(B.scale);
}
