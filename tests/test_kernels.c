// Codecs and matrix products of src/kernels against references written here from the format
// definitions (SPEC §3.1): code values from sign/exponent/mantissa in double precision, rounding by
// searching the sorted table of representable values, products accumulated in double.
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xmmintrin.h>

#include "kernels/convert.h"
#include "kernels/kernels_cpu.h"
#include "kernels/matmul.h"
#include "test.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint32_t rnd_u32(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}

static float rnd_uniform(float lo, float hi) { return lo + (hi - lo) * (float)(rnd_u32() & 0xffffff) / 16777216.0f; }

static uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float float_of(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// Value of a sign/exponent/mantissa code with an IEEE-style subnormal range; NaN/inf left to the
// caller. ebits/mbits/bias describe the format.
static double minifloat_value(unsigned code, int ebits, int mbits, int bias) {
    unsigned m = code & ((1u << mbits) - 1), e = (code >> mbits) & ((1u << ebits) - 1);
    double v = e == 0 ? ldexp((double)m, 1 - bias - mbits) : ldexp(1.0 + ldexp((double)m, -mbits), (int)e - bias);
    return (code >> (ebits + mbits)) & 1 ? -v : v;
}

static double e4m3_ref(uint8_t c) { return (c & 0x7f) == 0x7f ? NAN : minifloat_value(c, 4, 3, 7); }

// Index of the entry of the ascending table vals[0..n) of non-negative values nearest to a >= 0,
// ties to the even index (indices are the codes); n - 1 for anything past the last entry.
static int nearest_code(const double *vals, int n, double a) {
    if (a >= vals[n - 1]) return n - 1;
    int lo = 0, hi = n - 1;
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (vals[mid] <= a) lo = mid;
        else hi = mid;
    }
    double dl = a - vals[lo], dh = vals[hi] - a;
    if (dl < dh) return lo;
    if (dh < dl) return hi;
    return lo % 2 == 0 ? lo : hi;
}

TEST(test_e4m3_all_codes) {
    for (int c = 0; c < 256; c++) {
        float v = fp8_e4m3_to_f32((uint8_t)c);
        double ref = e4m3_ref((uint8_t)c);
        if (isnan(ref)) {
            CHECK_MSG(isnan(v), "code 0x%02x should be NaN, got %g", c, v);
            CHECK_MSG(fp8_e4m3_from_f32(v) == c, "NaN code 0x%02x came back as 0x%02x", c, fp8_e4m3_from_f32(v));
            continue;
        }
        CHECK_MSG((double)v == ref, "code 0x%02x decodes to %.9g, expected %.9g", c, v, ref);
        CHECK_MSG(fp8_e4m3_from_f32(v) == c, "code 0x%02x round trips to 0x%02x", c, fp8_e4m3_from_f32(v));
        if (c > 0 && c < 0x7f) CHECK_MSG(v > fp8_e4m3_to_f32((uint8_t)(c - 1)), "not increasing at 0x%02x", c);
    }
    CHECK(fp8_e4m3_to_f32(0x7e) == 448.0f);
    CHECK(fp8_e4m3_to_f32(0xfe) == -448.0f);
    CHECK(fp8_e4m3_to_f32(0x01) == 0x1p-9f);
    CHECK(fp8_e4m3_to_f32(0x08) == 0x1p-6f);
    CHECK(fp8_e4m3_to_f32(0x38) == 1.0f);
    CHECK(signbit(fp8_e4m3_to_f32(0x80)) && fp8_e4m3_to_f32(0x80) == 0.0f);
    CHECK((fp8_e4m3_from_f32(NAN) & 0x7f) == 0x7f);
    CHECK(fp8_e4m3_from_f32(-NAN) == 0xff);
}

TEST(test_e4m3_rounding_and_saturation) {
    CHECK(fp8_e4m3_from_f32(1.0625f) == 0x38);             // tie between 1 and 1.125: even mantissa 0
    CHECK(fp8_e4m3_from_f32(1.1875f) == 0x3a);             // tie between 1.125 and 1.25: even mantissa 2
    CHECK(fp8_e4m3_from_f32(nextafterf(1.0625f, 2)) == 0x39);
    CHECK(fp8_e4m3_from_f32(0x1p-10f) == 0x00);            // half the smallest subnormal: tie to 0
    CHECK(fp8_e4m3_from_f32(nextafterf(0x1p-10f, 1)) == 0x01);
    CHECK(fp8_e4m3_from_f32(3 * 0x1p-10f) == 0x02);        // tie between 1 and 2 units of 2^-9
    CHECK(fp8_e4m3_from_f32(7.5f * 0x1p-9f) == 0x08);      // largest subnormal rounds up to 2^-6
    CHECK(fp8_e4m3_from_f32(-3 * 0x1p-10f) == 0x82);
    CHECK(fp8_e4m3_from_f32(449.0f) == 0x7e);
    CHECK(fp8_e4m3_from_f32(464.0f) == 0x7e);
    CHECK(fp8_e4m3_from_f32(1e30f) == 0x7e);
    CHECK(fp8_e4m3_from_f32(INFINITY) == 0x7e);
    CHECK(fp8_e4m3_from_f32(-INFINITY) == 0xfe);
    CHECK(fp8_e4m3_from_f32(1e-30f) == 0x00);
    // Against the nearest-value search over every finite positive code, on random magnitudes
    // spread over the whole range and on every midpoint (the ties) and its neighbours.
    double vals[127];
    for (int c = 0; c < 127; c++) vals[c] = e4m3_ref((uint8_t)c);
    for (int i = 0; i < 200000; i++) {
        float a = ldexpf(rnd_uniform(1, 2), (int)(rnd_u32() % 24) - 14);
        int want = nearest_code(vals, 127, a);
        CHECK_MSG(fp8_e4m3_from_f32(a) == want, "%.9g -> 0x%02x, nearest is 0x%02x", a, fp8_e4m3_from_f32(a), want);
        CHECK(fp8_e4m3_from_f32(-a) == (0x80 | want));
    }
    for (int c = 0; c < 126; c++) {
        float mid = (float)((vals[c] + vals[c + 1]) / 2);
        float probes[3] = {nextafterf(mid, 0), mid, nextafterf(mid, 1000)};
        for (int p = 0; p < 3; p++) {
            int want = nearest_code(vals, 127, probes[p]);
            CHECK_MSG(fp8_e4m3_from_f32(probes[p]) == want, "%.9g -> 0x%02x, nearest is 0x%02x", probes[p],
                      fp8_e4m3_from_f32(probes[p]), want);
        }
    }
}

TEST(test_e5m2_all_codes) {
    double vals[124];
    for (int c = 0; c < 256; c++) {
        float v = fp8_e5m2_to_f32((uint8_t)c);
        int e = (c >> 2) & 31, m = c & 3;
        if (e == 31) {
            CHECK_MSG(m ? isnan(v) : isinf(v) && (v < 0) == (c >= 128), "code 0x%02x decodes to %g", c, v);
            if (m == 0) CHECK(fp8_e5m2_from_f32(v) == c);
            else CHECK((fp8_e5m2_from_f32(v) & 0x7c) == 0x7c && (fp8_e5m2_from_f32(v) & 3));
            continue;
        }
        double ref = minifloat_value((unsigned)c, 5, 2, 15);
        CHECK_MSG((double)v == ref, "code 0x%02x decodes to %.9g, expected %.9g", c, v, ref);
        CHECK_MSG(fp8_e5m2_from_f32(v) == c, "code 0x%02x round trips to 0x%02x", c, fp8_e5m2_from_f32(v));
        if (c < 124) vals[c] = ref;
    }
    CHECK(fp8_e5m2_to_f32(0x7b) == 57344.0f);
    CHECK(fp8_e5m2_to_f32(0x01) == 0x1p-16f);
    CHECK(fp8_e5m2_from_f32(60000.0f) == 0x7b);
    CHECK(fp8_e5m2_from_f32(-1e20f) == 0xfb);
    CHECK(fp8_e5m2_from_f32(INFINITY) == 0x7c);
    CHECK(fp8_e5m2_from_f32(0x1p-17f) == 0x00);      // tie to even 0
    CHECK(fp8_e5m2_from_f32(1.125f) == 0x3c);        // tie between 1 and 1.25: even
    CHECK(fp8_e5m2_from_f32(1.375f) == 0x3e);        // tie between 1.25 and 1.5: even
    for (int i = 0; i < 100000; i++) {
        float a = ldexpf(rnd_uniform(1, 2), (int)(rnd_u32() % 36) - 20);
        int want = nearest_code(vals, 124, a);
        CHECK_MSG(fp8_e5m2_from_f32(a) == want, "%.9g -> 0x%02x, nearest is 0x%02x", a, fp8_e5m2_from_f32(a), want);
    }
}

TEST(test_bf16_rounding_and_nan) {
    CHECK(bf16_from_f32(1.0f) == 0x3f80);
    CHECK(bf16_from_f32(1.0f + 0x1p-8f) == 0x3f80);       // tie: even
    CHECK(bf16_from_f32(1.0f + 3 * 0x1p-8f) == 0x3f82);   // tie: even (up)
    CHECK(bf16_from_f32(nextafterf(1.0f + 0x1p-8f, 2)) == 0x3f81);
    CHECK(bf16_from_f32(-2.0f) == 0xc000);
    CHECK(bf16_from_f32(INFINITY) == 0x7f80);
    CHECK(bf16_from_f32(float_of(0x7f7fffff)) == 0x7f80);  // the largest float rounds to inf
    uint16_t h = bf16_from_f32(float_of(0x7f800001));      // a NaN whose payload sits in the dropped bits
    CHECK_MSG((h & 0x7f80) == 0x7f80 && (h & 0x7f), "signalling NaN became 0x%04x", h);
    CHECK(isnan(bf16_to_f32(bf16_from_f32(NAN))));
    CHECK(bf16_to_f32(0x3f80) == 1.0f && bf16_to_f32(0x0001) == 0x1p-133f);
    // Every bf16 value round-trips; the rounding of random floats matches the nearest of the two
    // bf16 neighbours (ties to the even one), computed in double.
    for (uint32_t c = 0; c < 65536; c++) {
        float v = bf16_to_f32((uint16_t)c);
        if (isnan(v)) continue;
        CHECK(bf16_from_f32(v) == c);
    }
    for (int i = 0; i < 100000; i++) {
        uint32_t u = rnd_u32();
        float f = float_of(u);
        if (!isfinite(f)) continue;
        // the neighbour past the largest finite bf16 is infinity, which rounding treats as 2^128
        uint32_t lo = u & 0xffff0000u, hi = lo + 0x10000u;
        double vhi = (hi & 0x7f800000u) == 0x7f800000u ? copysign(0x1p128, f) : float_of(hi);
        double dlo = fabs((double)f - float_of(lo)), dhi = fabs(vhi - f);
        uint32_t want = dlo < dhi ? lo : dhi < dlo ? hi : ((lo >> 16) & 1) ? hi : lo;
        CHECK_MSG(bf16_from_f32(f) == want >> 16, "0x%08x -> 0x%04x, want 0x%04x", u, bf16_from_f32(f), want >> 16);
    }
}

TEST(test_bf16_bulk_matches_scalar) {
    enum { n = 1000 + 7 };
    static float f[n], back[n];
    static uint16_t h[n];
    for (int i = 0; i < n; i++) f[i] = float_of(rnd_u32());
    f[3] = NAN, f[17] = float_of(0xff800001u), f[40] = INFINITY, f[41] = 1.0f + 0x1p-8f, f[n - 1] = -0.0f;
    bf16_from_f32_n(h, f, n);
    for (int i = 0; i < n; i++) CHECK_MSG(h[i] == bf16_from_f32(f[i]), "element %d: 0x%04x vs 0x%04x", i, h[i], bf16_from_f32(f[i]));
    bf16_to_f32_n(back, h, n);
    for (int i = 0; i < n; i++) CHECK(bits_of(back[i]) == (uint32_t)h[i] << 16);
}

TEST(test_f16_codec) {
    CHECK(f16_from_f32(65504.0f) == 0x7bff);
    CHECK(f16_from_f32(65519.0f) == 0x7bff);
    CHECK(f16_from_f32(65520.0f) == 0x7c00);
    CHECK(f16_from_f32(0x1p-24f) == 0x0001);
    CHECK(f16_from_f32(0x1p-25f) == 0x0000);             // tie to even 0
    CHECK(f16_from_f32(3 * 0x1p-25f) == 0x0002);         // tie between 1 and 2 units: even
    CHECK(f16_from_f32(-1.0f) == 0xbc00);
    CHECK(isnan(f16_to_f32(f16_from_f32(NAN))));
    CHECK(f16_to_f32(0x7c00) == INFINITY && f16_to_f32(0x0001) == 0x1p-24f && f16_to_f32(0x3c00) == 1.0f);
    // index 0x7c00 stands for the value the next exponent would start at (2^16), so that values
    // past 65520 round to it: infinity
    static double vals[31745];
    vals[31744] = 65536.0;
    for (uint32_t c = 0; c < 65536; c++) {
        float v = f16_to_f32((uint16_t)c);
        int e = (c >> 10) & 31;
        if (e == 31) {
            CHECK((c & 0x3ff) ? isnan(v) : isinf(v));
            continue;
        }
        double ref = minifloat_value(c, 5, 10, 15);
        CHECK_MSG((double)v == ref, "code 0x%04x decodes to %.9g, expected %.9g", c, v, ref);
        CHECK(f16_from_f32(v) == c);
        if (c < 31744) vals[c] = ref;
    }
    for (int i = 0; i < 100000; i++) {
        float a = ldexpf(rnd_uniform(1, 2), (int)(rnd_u32() % 48) - 30);
        int want = nearest_code(vals, 31745, a);
        CHECK_MSG(f16_from_f32(a) == want, "%.9g -> 0x%04x, nearest is 0x%04x", a, f16_from_f32(a), want);
    }
}

// ---- matrix products ---------------------------------------------------------------------------

// A weight matrix in one stored type with its exact fp32 values (deq), decoded here.
typedef struct TestMatrix {
    MatView w;
    void *data;
    float *scale;
    float *deq;  // (rows, cols)
} TestMatrix;

static void make_matrix(TestMatrix *m, DType dt, int rows, int cols) {
    memset(m, 0, sizeof *m);
    size_t n = (size_t)rows * cols;
    m->deq = malloc(sizeof(float) * n);
    m->w = (MatView){.dtype = dt, .rows = rows, .cols = cols, .block = 128};
    if (dt == DT_F32) {
        float *d = malloc(sizeof(float) * n);
        for (size_t i = 0; i < n; i++) d[i] = m->deq[i] = rnd_uniform(-1, 1);
        m->data = d;
    } else if (dt == DT_BF16) {
        uint16_t *d = malloc(2 * n);
        for (size_t i = 0; i < n; i++) {
            d[i] = (uint16_t)(bits_of(rnd_uniform(-1, 1)) >> 16);
            m->deq[i] = float_of((uint32_t)d[i] << 16);
        }
        m->data = d;
    } else if (dt == DT_F16) {
        uint16_t *d = malloc(2 * n);
        for (size_t i = 0; i < n; i++) {
            // exponents 0..16: subnormals and normals up to 4
            d[i] = (uint16_t)((rnd_u32() & 0x8000) | ((rnd_u32() % 17) << 10) | (rnd_u32() & 0x3ff));
            m->deq[i] = (float)minifloat_value(d[i], 5, 10, 15);
        }
        m->data = d;
    } else {
        int sr = (rows + 127) / 128, sc = (cols + 127) / 128;
        uint8_t *d = malloc(n);
        m->scale = malloc(sizeof(float) * sr * sc);
        for (int i = 0; i < sr * sc; i++) m->scale[i] = ldexpf(rnd_uniform(1, 2), -(int)(rnd_u32() % 12));
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < cols; c++) {
                uint8_t code;
                do code = (uint8_t)rnd_u32();
                while ((code & 0x7f) == 0x7f);
                d[(size_t)r * cols + c] = code;
                m->deq[(size_t)r * cols + c] = (float)e4m3_ref(code) * m->scale[(r / 128) * sc + c / 128];
            }
        m->data = d;
        m->w.scale_inv = m->scale;
        m->w.scale_cols = sc;
    }
    m->w.data = m->data;
}

static void free_matrix(TestMatrix *m) {
    free(m->data);
    free(m->scale);
    free(m->deq);
}

static float *random_x(int n) {
    float *x = malloc(sizeof(float) * n);
    for (int i = 0; i < n; i++) x[i] = rnd_uniform(-1, 1);
    return x;
}

// Compares out against Σ x·deq in double, rows [r0, r0 + rows) of the matrix, within 1e-5 of
// Σ|x·deq| (fp32 accumulation in any order); transpose 1: out[N][rows] = x·Wᵀ, 0: out[N][cols] = x·W.
static int check_product(const char *what, const float *out, const float *x, const TestMatrix *m, int r0, int rows,
                         int N, int transpose) {
    int cols = m->w.cols, nout = transpose ? rows : cols, K = transpose ? cols : rows;
    for (int n = 0; n < N; n++)
        for (int o = 0; o < nout; o++) {
            double s = 0, sa = 0;
            for (int k = 0; k < K; k++) {
                double w = transpose ? m->deq[(size_t)(r0 + o) * cols + k] : m->deq[(size_t)(r0 + k) * cols + o];
                double p = (double)x[(size_t)n * K + k] * w;
                s += p;
                sa += fabs(p);
            }
            double got = out[(size_t)n * nout + o];
            if (!(fabs(got - s) <= 1e-5 * sa + 1e-30)) {
                test_fail(__FILE__, __LINE__, "%s: out[%d][%d] = %.9g, reference %.9g (sum |terms| %.3g)", what, n, o,
                          got, s, sa);
                return 0;
            }
        }
    return 1;
}

static const DType all_dtypes[4] = {DT_F32, DT_BF16, DT_F16, DT_F8_E4M3};
static const char *isas[2] = {"auto", "scalar"};

// 203 rows: groups of four rows plus a remainder on each thread.
TEST(test_matmul_nt_all_dtypes) {
    const int Ns[] = {1, 2, 3, 4, 5, 8, 9, 17, 40};
    for (int d = 0; d < 4; d++) {
        TestMatrix m;
        make_matrix(&m, all_dtypes[d], 203, 300);
        float *x = random_x(40 * 300), *out = malloc(sizeof(float) * 40 * 203);
        for (int is = 0; is < 2; is++) {
            kernels_set_isa(isas[is]);
            for (size_t k = 0; k < sizeof Ns / sizeof Ns[0]; k++) {
                char what[96];
                snprintf(what, sizeof what, "%s %s nt N=%d", isas[is], dtype_name(all_dtypes[d]), Ns[k]);
                matmul_nt(out, x, &m.w, Ns[k]);
                if (!check_product(what, out, x, &m, 0, 203, Ns[k], 1)) goto done;
            }
        }
    done:
        kernels_set_isa("auto");
        free(x), free(out), free_matrix(&m);
    }
}

TEST(test_matmul_nn_all_dtypes) {
    const int Ns[] = {1, 3, 17};
    for (int d = 0; d < 4; d++) {
        TestMatrix m;
        make_matrix(&m, all_dtypes[d], 300, 200);  // K = 300 rows spans two packed slices
        float *x = random_x(17 * 300), *out = malloc(sizeof(float) * 17 * 200);
        for (int is = 0; is < 2; is++) {
            kernels_set_isa(isas[is]);
            for (size_t k = 0; k < sizeof Ns / sizeof Ns[0]; k++) {
                char what[96];
                snprintf(what, sizeof what, "%s %s nn N=%d", isas[is], dtype_name(all_dtypes[d]), Ns[k]);
                matmul_nn(out, x, &m.w, Ns[k]);
                if (!check_product(what, out, x, &m, 0, 300, Ns[k], 0)) goto done;
            }
        }
    done:
        kernels_set_isa("auto");
        free(x), free(out), free_matrix(&m);
    }
}

// Wide enough for whole column tiles of the few-rows kernel (256, 128, 64 columns) and a rest.
TEST(test_matmul_nn_wide) {
    for (int d = 0; d < 4; d++) {
        TestMatrix m;
        make_matrix(&m, all_dtypes[d], 130, 1100);
        float *x = random_x(4 * 130), *out = malloc(sizeof(float) * 4 * 1100);
        int ok = 1;
        for (int N = 1; N <= 4 && ok; N++) {
            char what[64];
            snprintf(what, sizeof what, "%s nn 130x1100 N=%d", dtype_name(all_dtypes[d]), N);
            matmul_nn(out, x, &m.w, N);
            ok = check_product(what, out, x, &m, 0, 130, N, 0);
        }
        free(x), free(out), free_matrix(&m);
        if (!ok) return;
    }
}

// Deeper and wider than one packed slice (K = 600 > 256) and more activation rows than one packed
// block (N = 200 > 192), for both orientations.
TEST(test_matmul_blocked_edges) {
    const DType dts[2] = {DT_BF16, DT_F8_E4M3};
    for (int d = 0; d < 2; d++) {
        TestMatrix m;
        make_matrix(&m, dts[d], 72, 600);
        float *x = random_x(200 * 600), *out = malloc(sizeof(float) * 200 * 600);
        matmul_nt(out, x, &m.w, 200);
        int ok = check_product("nt 72x600 N=200", out, x, &m, 0, 72, 200, 1);
        if (ok) {
            matmul_nn(out, x, &m.w, 13);
            ok = check_product("nn 72x600 N=13", out, x, &m, 0, 72, 13, 0);
        }
        free(x), free(out), free_matrix(&m);
        if (!ok) return;
    }
}

// The vector maximum (the cross-entropy's and softmax's shift): the largest value that is not NaN,
// as a loop over the elements finds it, at every length around its blocks of 64 and 16 — NaNs
// anywhere never win, -inf only when nothing else is there, +inf wins.
TEST(test_vector_max_ignores_nans) {
    if (!kernels_cpu_avx512()) SKIP("no AVX-512 on this CPU");
    float x[300];
    unsigned s = 99;
    for (int n = 0; n <= 300; n++)
        for (int kind = 0; kind < 4; kind++) {
            for (int i = 0; i < n; i++) {
                s = s * 1103515245u + 12345u;
                x[i] = (float)(s >> 8) / 16777216.0f * 200.0f - 150.0f;
                if (kind >= 1 && (s >> 3) % 7 == 0) x[i] = NAN;  // NaNs sprinkled
                if (kind == 2) x[i] = i == n / 2 ? -INFINITY : NAN;  // nothing but NaNs and -inf
                if (kind == 3 && i == (int)((s >> 5) % (unsigned)n)) x[i] = INFINITY;
            }
            float want = -INFINITY;
            for (int i = 0; i < n; i++) want = x[i] > want ? x[i] : want;
            float got = max_finite_avx512(x, n);
            CHECK_MSG(got == want, "n %d kind %d: %g, want %g", n, kind, got, want);
            if (got != want) return;
        }
}

// The fp32 product on an operand packed once (plain attention's keys and values against each of a
// head's query chunks): gemm_avx512's bits for the same operands, with fewer output columns than
// packed (a chunk's scores) or fewer rows of W (the keys a chunk sees), across packed slices (K >
// 256) and blocks of activation rows (N > 192), output rows apart (the heads' interleaved rows).
TEST(test_f32_panels_product_equals_gemm) {
    if (!kernels_cpu_avx512()) SKIP("no AVX-512 on this CPU");
    const int Fs[] = {6, 33, 300}, Ks[] = {13, 96, 600}, Ns[] = {9, 64, 200};
    for (int tw = 0; tw < 2; tw++)
        for (int fi = 0; fi < 3; fi++)
            for (int ki = 0; ki < 3; ki++) {
                int F = Fs[fi], K = Ks[ki], N = Ns[(fi + ki) % 3], ldo = F + 5;
                // transposed W (F × K): cut the features; W (K × F): cut its rows
                int f_end = tw ? F - F / 3 : F, k_end = tw ? K : K - K / 4;
                float *w = random_x(F * K), *x = random_x(N * K), *bp = malloc(sizeof(float) * f32_panels_floats(F, K));
                float *got = malloc(sizeof(float) * N * ldo), *want = malloc(sizeof(float) * N * F);
                MatView wv = tw ? matview_f32(w, F, K) : matview_f32(w, K, F);
                f32_panels_pack(bp, &wv, tw, F, K);
                CHECK(f32_panels_product(got, ldo, x, K, N, bp, F, K, f_end, k_end) == 0);
                float *xk = malloc(sizeof(float) * N * K);  // x's first k_end columns, contiguous
                for (int n = 0; n < N; n++) memcpy(xk + (size_t)n * k_end, x + (size_t)n * K, sizeof(float) * k_end);
                MatView cut = tw ? wv : matview_f32(w, k_end, F);
                CHECK(gemm_avx512(want, xk, &cut, N, tw, 0, f_end) == 0);
                for (int n = 0; n < N; n++)
                    CHECK_MSG(memcmp(got + (size_t)n * ldo, want + (size_t)n * F, sizeof(float) * f_end) == 0,
                              "%s F %d K %d N %d (f_end %d, k_end %d): row %d differs", tw ? "x · Wᵀ" : "x · W", F, K, N,
                              f_end, k_end, n);
                free(w), free(x), free(bp), free(got), free(want), free(xk);
            }
}

// A view that starts inside a scale block (row 77) and crosses into the next (row 128): the scale
// grid stays the whole matrix's.
TEST(test_fp8_block_edges_and_row_view) {
    TestMatrix m;
    make_matrix(&m, DT_F8_E4M3, 200, 300);
    MatView v = matview_rows(&m.w, 77, 100);
    CHECK(v.row0 == 77 && v.rows == 100 && v.data == (const uint8_t *)m.data + 77 * 300);
    float *x = random_x(17 * 300), *out = malloc(sizeof(float) * 17 * 300);
    int ok = 1;
    for (int is = 0; is < 2 && ok; is++) {
        kernels_set_isa(isas[is]);
        const int Ns[] = {1, 3, 17};
        for (int k = 0; k < 3 && ok; k++) {
            matmul_nt(out, x, &v, Ns[k]);
            ok = check_product("fp8 view nt", out, x, &m, 77, 100, Ns[k], 1);
            if (!ok) break;
            matmul_nn(out, x, &v, Ns[k]);
            ok = check_product("fp8 view nn", out, x, &m, 77, 100, Ns[k], 0);
        }
        // dequantised rows are exactly fp32(code × scale)
        float row[300];
        for (int r = 0; r < 100 && ok; r += 9) {
            matview_row_f32(&v, r, row);
            for (int c = 0; c < 300; c++)
                if (bits_of(row[c]) != bits_of(m.deq[(size_t)(77 + r) * 300 + c])) {
                    test_fail(__FILE__, __LINE__, "%s: view row %d col %d: %.9g vs %.9g", isas[is], r, c, row[c],
                              m.deq[(size_t)(77 + r) * 300 + c]);
                    ok = 0;
                    break;
                }
        }
    }
    kernels_set_isa("auto");
    free(x), free(out), free_matrix(&m);
}

TEST(test_matview_row_f32_all_dtypes) {
    for (int d = 0; d < 4; d++) {
        TestMatrix m;
        make_matrix(&m, all_dtypes[d], 5, 333);
        float row[333];
        for (int is = 0; is < 2; is++) {
            kernels_set_isa(isas[is]);
            for (int r = 0; r < 5; r++) {
                matview_row_f32(&m.w, r, row);
                CHECK_MSG(memcmp(row, m.deq + (size_t)r * 333, sizeof row) == 0, "%s %s row %d", isas[is],
                          dtype_name(all_dtypes[d]), r);
            }
        }
        kernels_set_isa("auto");
        free_matrix(&m);
    }
}

// A block scale >= 2^8 (where code × 2^-120 · (scale × 2^120) would overflow) and NaN codes
// (S.1111.111), which make their rows' products NaN whatever the activations.
TEST(test_fp8_large_scale_and_nan) {
    TestMatrix m;
    make_matrix(&m, DT_F8_E4M3, 130, 200);
    m.scale[1] = 3000.0f;  // block rows 0..127, cols 128..199
    for (int r = 0; r < 128; r++)
        for (int c = 128; c < 200; c++)
            m.deq[(size_t)r * 200 + c] = (float)e4m3_ref(((uint8_t *)m.data)[(size_t)r * 200 + c]) * 3000.0f;
    float *x = random_x(17 * 200), *out = malloc(sizeof(float) * 17 * 200);
    int ok = 1;
    for (int is = 0; is < 2 && ok; is++) {
        kernels_set_isa(isas[is]);
        for (int N = 1; N <= 17 && ok; N += 16) {
            matmul_nt(out, x, &m.w, N);
            ok = check_product("large scale nt", out, x, &m, 0, 130, N, 1);
            if (ok) {
                matmul_nn(out, x, &m.w, N);
                ok = check_product("large scale nn", out, x, &m, 0, 130, N, 0);
            }
        }
    }
    ((uint8_t *)m.data)[5 * 200 + 150] = 0x7f;
    ((uint8_t *)m.data)[129 * 200 + 3] = 0xff;
    for (int is = 0; is < 2 && ok; is++) {
        kernels_set_isa(isas[is]);
        for (int N = 1; N <= 17 && ok; N += 16) {
            matmul_nt(out, x, &m.w, N);
            for (int n = 0; n < N; n++)
                for (int r = 0; r < 130; r++)
                    if ((r == 5 || r == 129) != (isnan(out[(size_t)n * 130 + r]) != 0)) {
                        test_fail(__FILE__, __LINE__, "%s N=%d: out[%d][%d] = %g", isas[is], N, n, r, out[(size_t)n * 130 + r]);
                        ok = 0;
                    }
        }
        for (int N = 1; N <= 17 && ok; N += 16) {
            matmul_nn(out, x, &m.w, N);
            for (int n = 0; n < N; n++)
                for (int c = 0; c < 200; c++)
                    if ((c == 150 || c == 3) != (isnan(out[(size_t)n * 200 + c]) != 0)) {
                        test_fail(__FILE__, __LINE__, "%s nn N=%d: out[%d][%d] = %g", isas[is], N, n, c, out[(size_t)n * 200 + c]);
                        ok = 0;
                    }
        }
        float row[200];
        matview_row_f32(&m.w, 5, row);
        if (!isnan(row[150]) || isnan(row[149])) {
            test_fail(__FILE__, __LINE__, "%s: NaN code not kept in the dequantised row", isas[is]);
            ok = 0;
        }
    }
    kernels_set_isa("auto");
    free(x), free(out), free_matrix(&m);
}

// A caller that runs with denormals-are-zero (MXCSR.DAZ) must still get subnormal E4M3 codes
// right (the fast path passes them through fp32 subnormals).
TEST(test_fp8_under_denormals_are_zero) {
    TestMatrix m;
    make_matrix(&m, DT_F8_E4M3, 64, 200);
    for (int i = 0; i < 64 * 200; i += 3) {  // every third code subnormal
        uint8_t code = (uint8_t)((rnd_u32() & 0x87) | 1);
        ((uint8_t *)m.data)[i] = code;
        m.deq[i] = (float)e4m3_ref(code) * m.scale[(i / 200 / 128) * m.w.scale_cols + (i % 200) / 128];
    }
    float *x = random_x(17 * 200), *out = malloc(sizeof(float) * 17 * 200), row[200];
    unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x0040);
    matmul_nt(out, x, &m.w, 1);
    int ok = check_product("DAZ nt N=1", out, x, &m, 0, 64, 1, 1);
    if (ok) {
        matmul_nt(out, x, &m.w, 17);
        ok = check_product("DAZ nt N=17", out, x, &m, 0, 64, 17, 1);
    }
    matview_row_f32(&m.w, 3, row);
    _mm_setcsr(csr);
    if (ok) CHECK(memcmp(row, m.deq + 3 * 200, sizeof row) == 0);
    free(x), free(out), free_matrix(&m);
}

// The model calls the kernels from inside its own parallel regions (one attention head per
// thread): each call must then run on its own thread and still be right, on both paths.
TEST(test_matmul_inside_parallel_region) {
    TestMatrix m;
    make_matrix(&m, DT_BF16, 256, 160);
    float *x = random_x(20 * 160);
    float *out = malloc(sizeof(float) * 8 * 20 * 160);
    int ok = 1;
    for (int is = 0; is < 2 && ok; is++) {
        kernels_set_isa(isas[is]);
        const int Ns[2] = {3, 20};
        for (int k = 0; k < 2 && ok; k++) {
            int N = Ns[k];
#pragma omp parallel for schedule(static)
            for (int h = 0; h < 8; h++) {
                MatView v = matview_rows(&m.w, h * 32, 32);
                matmul_nt(out + (size_t)h * 20 * 160, x, &v, N);
            }
            for (int h = 0; h < 8 && ok; h++)
                ok = check_product("per-head nt", out + (size_t)h * 20 * 160, x, &m, h * 32, 32, N, 1);
#pragma omp parallel for schedule(static)
            for (int h = 0; h < 8; h++) {
                MatView v = matview_rows(&m.w, h * 32, 32);
                matmul_nn(out + (size_t)h * 20 * 160, x, &v, N);
            }
            for (int h = 0; h < 8 && ok; h++)
                ok = check_product("per-head nn", out + (size_t)h * 20 * 160, x, &m, h * 32, 32, N, 0);
        }
    }
    kernels_set_isa("auto");
    free(x), free(out), free_matrix(&m);
}

// matmul_nt_part / matmul_nn_part: ranges of odd sizes and offsets, each computed by whichever
// thread of a team takes it, together give the whole product and write nothing outside them.
TEST(test_matmul_parts_assemble_the_product) {
    const int cuts[] = {0, 1, 5, 16, 17, 64, 99, 150, 203};
    const int ncuts = sizeof cuts / sizeof cuts[0];
    for (int d = 0; d < 4; d++) {
        TestMatrix m;
        make_matrix(&m, all_dtypes[d], 203, 300);
        float *x = random_x(9 * 300), *out = malloc(sizeof(float) * 9 * 300);
        for (int is = 0; is < 2; is++) {
            kernels_set_isa(isas[is]);
            const int Ns[] = {1, 3, 9};
            for (int k = 0; k < 3; k++) {
                int N = Ns[k];
                char what[96];
                for (int i = 0; i < 9 * 300; i++) out[i] = NAN;
#pragma omp parallel for schedule(dynamic)
                for (int p = 0; p < ncuts - 1; p++) matmul_nt_part(out, x, &m.w, N, cuts[p], cuts[p + 1]);
                snprintf(what, sizeof what, "%s %s nt parts N=%d", isas[is], dtype_name(all_dtypes[d]), N);
                if (!check_product(what, out, x, &m, 0, 203, N, 1)) goto done;
                // out = x (N x 203) · W (203 x 300), columns in pieces
                for (int i = 0; i < 9 * 300; i++) out[i] = NAN;
#pragma omp parallel for schedule(dynamic)
                for (int p = 0; p < ncuts - 1; p++) matmul_nn_part(out, x, &m.w, N, cuts[p], cuts[p + 1] + 97 * (p == ncuts - 2));
                snprintf(what, sizeof what, "%s %s nn parts N=%d", isas[is], dtype_name(all_dtypes[d]), N);
                if (!check_product(what, out, x, &m, 0, 203, N, 0)) goto done;
            }
        }
    done:
        kernels_set_isa("auto");
        free(x), free(out), free_matrix(&m);
    }
}

// Batch invariance of the few-rows product (N <= 8, the decode batches): row n of out = x · Wᵀ is
// the same bits whether x has 1 row or N, whatever the others hold, and however the output rows are
// split over threads — so a sequence's logits do not depend on what else is decoded with it. With
// AVX-512 every element is one running sum over 16-column vectors, then one fixed lane reduction.
TEST(test_matmul_few_rows_batch_invariant) {
    if (strcmp(kernels_isa(), "scalar") == 0) {
        SKIP("the AVX-512 kernels are not in use on this CPU");
    }
    const int rows = 203, cols = 300;
    for (int d = 0; d < 4; d++) {
        TestMatrix m;
        make_matrix(&m, all_dtypes[d], rows, cols);
        float *x = random_x(8 * cols), *one = malloc(sizeof(float) * rows * 8), *many = malloc(sizeof(float) * rows * 8);
        for (int n = 0; n < 8; n++) matmul_nt(one + (size_t)n * rows, x + (size_t)n * cols, &m.w, 1);
        for (int N = 2; N <= 8; N++)
            for (int split = 0; split < 3; split++) {
                // the whole call; then its output rows in uneven shares, as a decode schedule cuts them
                if (split == 0) matmul_nt(many, x, &m.w, N);
                else
                    for (int r0 = 0; r0 < rows; r0 += 37 * split) {
                        int r1 = r0 + 37 * split < rows ? r0 + 37 * split : rows;
                        matmul_nt_part(many, x, &m.w, N, r0, r1);
                    }
                CHECK_MSG(memcmp(many, one, sizeof(float) * rows * N) == 0, "%s: N = %d, split %d: rows differ from N = 1",
                          dtype_name(all_dtypes[d]), N, split);
            }
        free(x), free(one), free(many), free_matrix(&m);
    }
}

// FP8 weights with fp32 compute go four weight rows at a time (four chains of multiply-adds, each
// its row's one sum): every row the bits of the same row computed alone, for narrow and ragged
// widths (the tiles' column tail, blocks narrower than 128) and 1-4 activation rows, and within
// the reference's rounding.
TEST(test_fp8_rows_four_at_a_time_equal_rows_alone) {
    const int widths[] = {1, 5, 16, 33, 64, 100, 129, 200}, heights[] = {4, 7, 13};
    for (size_t wi = 0; wi < sizeof widths / sizeof widths[0]; wi++)
        for (size_t hi = 0; hi < sizeof heights / sizeof heights[0]; hi++) {
            const int rows = heights[hi], cols = widths[wi];
            TestMatrix m;
            make_matrix(&m, DT_F8_E4M3, rows, cols);
            float *x = random_x(4 * cols), *all = malloc(sizeof(float) * 4 * rows), *alone = malloc(sizeof(float) * 4 * rows);
            for (int N = 1; N <= 4; N++) {
                CHECK(matmul_nt_invariant(all, rows, x, cols, &m.w, N, 0, rows) == 0);
                for (int r = 0; r < rows; r++) CHECK(matmul_nt_invariant(alone, rows, x, cols, &m.w, N, r, r + 1) == 0);
                CHECK_MSG(memcmp(all, alone, sizeof(float) * rows * N) == 0, "%d x %d, N = %d: rows together differ from rows alone",
                          rows, cols, N);
                char what[64];
                snprintf(what, sizeof what, "FP8 %d x %d N=%d", rows, cols, N);
                CHECK(check_product(what, all, x, &m, 0, rows, N, 1));
            }
            free(x), free(all), free(alone), free_matrix(&m);
        }
}

// The invariant products for any N (batched decoding, speculative verification): row n's bits are
// those of the row alone, for N up to 40, any split of the output, and (x · W) summed over row
// blocks one after the other with add = 1. Runs on every ISA (the scalar path is invariant too).
TEST(test_matmul_invariant_any_rows) {
    const int rows = 203, cols = 300, NMAX = 40;
    for (int d = 0; d < 4; d++) {
        TestMatrix m;
        make_matrix(&m, all_dtypes[d], rows, cols);
        float *x = random_x(NMAX * cols), *xr = random_x(NMAX * rows);
        float *one = malloc(sizeof(float) * rows * NMAX), *many = malloc(sizeof(float) * rows * NMAX);
        float *one_nn = malloc(sizeof(float) * cols * NMAX), *many_nn = malloc(sizeof(float) * cols * NMAX);
        for (int n = 0; n < NMAX; n++) {
            CHECK(matmul_nt_invariant(one + (size_t)n * rows, rows, x + (size_t)n * cols, cols, &m.w, 1, 0, rows) == 0);
            CHECK(matmul_nn_invariant(one_nn + (size_t)n * cols, cols, xr + (size_t)n * rows, rows, &m.w, 1, 0, cols, 0) == 0);
        }
        // the row products agree with the reference product (the few-rows path) to rounding
        float *ref = malloc(sizeof(float) * rows);
        CHECK(matmul_nt(ref, x, &m.w, 1) == 0 && memcmp(ref, one, sizeof(float) * rows) == 0);
        free(ref);
        for (int N = 2; N <= NMAX; N += 7)
            for (int split = 0; split < 3; split++) {
                int step = split ? 37 * split : rows;
                for (int r0 = 0; r0 < rows; r0 += step)
                    CHECK(matmul_nt_invariant(many, rows, x, cols, &m.w, N, r0, r0 + step < rows ? r0 + step : rows) == 0);
                CHECK_MSG(memcmp(many, one, sizeof(float) * rows * N) == 0, "%s: N = %d, split %d: x·Wᵀ rows differ",
                          dtype_name(all_dtypes[d]), N, split);
                // x · W over row blocks of W (a paged cache's blocks), column shares starting on 16
                int cstep = split ? 64 * split : cols, bstep = split ? 16 * split + 5 : rows;
                for (int c0 = 0; c0 < cols; c0 += cstep) {
                    int c1 = c0 + cstep < cols ? c0 + cstep : cols;
                    for (int b0 = 0; b0 < rows; b0 += bstep) {
                        int nb = rows - b0 < bstep ? rows - b0 : bstep;
                        MatView blk = matview_rows(&m.w, b0, nb);
                        CHECK(matmul_nn_invariant(many_nn, cols, xr + b0, rows, &blk, N, c0, c1, b0 > 0) == 0);
                    }
                }
                CHECK_MSG(memcmp(many_nn, one_nn, sizeof(float) * cols * N) == 0,
                          "%s: N = %d, split %d: x·W rows differ", dtype_name(all_dtypes[d]), N, split);
            }
        free(x), free(xr), free(one), free(many), free(one_nn), free(many_nn), free_matrix(&m);
    }
}

// The vector e^x of the element-wise ops (kernels/ops_avx512.c) against exp in double: within 2
// units in the last place over the whole normal range (a dense sweep and random points), exact at
// 0, 0 below the subnormal range and inf above it, NaN kept; subnormal results within 2^-149.
TEST(test_vector_exp_within_2_ulp) {
    if (strcmp(kernels_isa(), "scalar") == 0) SKIP("the AVX-512 kernels are not in use on this CPU");
    enum { n = 1 << 20 };
    float *x = malloc(sizeof(float) * n), *y = malloc(sizeof(float) * n);
    for (int i = 0; i < n; i++) x[i] = i < n / 2 ? -103.9f + 192.6f * (float)i / (n / 2) : rnd_uniform(-103.9f, 88.7f);
    x[0] = 0.0f, x[1] = -0.0f, x[2] = NAN, x[3] = INFINITY, x[4] = -INFINITY, x[5] = -200.0f, x[6] = 100.0f;
    x[7] = 1e-30f, x[8] = 88.72f, x[9] = -87.33f;
    exp_n_avx512(y, x, n, 0.0f);
    CHECK(y[0] == 1.0f && y[1] == 1.0f && isnan(y[2]) && isinf(y[3]) && y[4] == 0.0f && y[5] == 0.0f && isinf(y[6]));
    CHECK(y[7] == 1.0f);
    double worst = 0;
    for (int i = 8; i < n; i++) {
        double want = exp((double)x[i]);
        if (want < 0x1p-126) {
            CHECK_MSG(fabs(y[i] - want) <= 0x1p-148, "e^%.9g = %.9g, want %.9g", x[i], y[i], want);
            continue;
        }
        double ulp = ldexp(1.0, ilogb(want) - 23), err = fabs(y[i] - want) / ulp;
        if (err > worst) worst = err;
        CHECK_MSG(err <= 2.0, "e^%.9g = %.9g, want %.9g: %.2f ulp", x[i], y[i], want, err);
    }
    printf("    worst %.2f ulp over %d points\n", worst, n);
    free(x), free(y);
}
