// BF16 compute of x · Wᵀ (kernels/matmul_bf16c.c, `--compute bf16`) against fp64 sums of the same
// rounded operands — x rounded to BF16, W as BF16 values (F32 and F16 rounded, BF16 as stored, FP8
// codes with their block scale per 128-column chunk) — on ragged shapes, on the AVX512_BF16 path and on
// the portable one (forced), within the fp32 accumulation bound; a row's result does not depend
// on the other activation rows of the call (batch invariance).
#include <immintrin.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/file.h"
#include "kernels/convert.h"
#include "kernels/kernels_cpu.h"
#include "kernels/matmul.h"
#include "model/config.h"
#include "model/init.h"
#include "model/model.h"
#include "test.h"

static uint64_t lcg(uint64_t *s) { return *s = *s * 6364136223846793005ULL + 1442695040888963407ULL; }
static float uniform(uint64_t *s) { return (float)((lcg(s) >> 40) / 16777216.0) * 2 - 1; }

typedef struct {
    MatView v;
    void *data;
    float *scales;
} TestW;

// rows × cols weights of dtype t (FP8: random codes, finite, and scales per 128 × 128 block).
static void make_w(TestW *w, DType t, int rows, int cols, uint64_t *s) {
    size_t n = (size_t)rows * cols;
    w->data = malloc(n * 4 + 64);
    w->scales = NULL;
    for (size_t i = 0; i < n; i++) {
        float x = uniform(s);
        if (t == DT_F32) ((float *)w->data)[i] = x;
        else if (t == DT_BF16) ((uint16_t *)w->data)[i] = bf16_from_f32(x);
        else if (t == DT_F16) ((uint16_t *)w->data)[i] = f16_from_f32(x);
        else {
            uint8_t c = (uint8_t)(lcg(s) >> 56);
            if ((c & 0x7f) == 0x7f) c ^= 1;  // no NaN codes
            if (i % 97 == 0) c = (uint8_t)(lcg(s) >> 61);  // zeros and subnormals among them
            ((uint8_t *)w->data)[i] = c;
        }
    }
    w->v = (MatView){.dtype = t, .rows = rows, .cols = cols, .data = w->data, .compute_bf16 = 1};
    if (t == DT_F8_E4M3) {
        int sr = (rows + 127) / 128, sc = (cols + 127) / 128;
        w->scales = malloc(sizeof(float) * sr * sc);
        for (int i = 0; i < sr * sc; i++) w->scales[i] = 0.001f * (1 + i);
        w->v.scale_inv = w->scales, w->v.scale_cols = sc, w->v.block = 128;
    }
}

static double w_value(const TestW *w, int r, int c) {
    size_t i = (size_t)r * w->v.cols + c;
    switch (w->v.dtype) {
    case DT_F32: return bf16_to_f32(bf16_from_f32(((float *)w->data)[i]));
    case DT_BF16: return bf16_to_f32(((uint16_t *)w->data)[i]);
    case DT_F16: return bf16_to_f32(bf16_from_f32(f16_to_f32(((uint16_t *)w->data)[i])));
    default: return fp8_e4m3_to_f32(((uint8_t *)w->data)[i]);
    }
}

// The fp64 sum of row r of w (of the whole matrix) with the activation row xn rounded to BF16, FP8
// chunks of 128 columns times their block scale; *mag: the same of the products' magnitudes.
static double reference(const TestW *w, int r, const float *xn, double *mag) {
    int cols = w->v.cols;
    double want = 0;
    *mag = 0;
    for (int c0 = 0; c0 < cols; c0 += 128) {
        double part = 0, pm = 0;
        for (int c = c0; c < cols && c < c0 + 128; c++) {
            double p = w_value(w, r, c) * bf16_to_f32(bf16_from_f32(xn[c]));
            part += p, pm += fabs(p);
        }
        double s = w->v.dtype == DT_F8_E4M3 ? w->scales[(r / 128) * w->v.scale_cols + c0 / 128] : 1.0;
        want += part * s, *mag += pm * s;
    }
    return want;
}

// matmul_nt_bf16c (the register tiles packing the weights per call; forced: the portable path) on
// every weight type and ragged shapes — a view starting inside the matrix (FP8 scales of the whole
// matrix), columns around the pairs, the steps of 32, the chunks of 128 and the chains of 256,
// short and long rows — within the fp32 accumulation bound of fp64 sums; each row alone (or in a
// pair) gives the bits it gave among all, and so does a share of the rows.
TEST(test_bf16c_against_fp64) {
    const DType types[] = {DT_F32, DT_BF16, DT_F16, DT_F8_E4M3};
    const int colss[] = {1, 31, 32, 33, 63, 64, 65, 100, 129, 300, 512, 1030, 2100};  // (from 1,024: one row at a time)
    const int Ns[] = {1, 2, 3, 5, 9};
    uint64_t seed = 5;
    for (int isa = 0; isa < 2; isa++) {
        CHECK(kernels_set_isa(isa ? "scalar" : "auto") == 0);
        for (int ti = 0; ti < 4; ti++)
            for (int ci = 0; ci < 13; ci++)
                for (int ni = 0; ni < 5; ni++) {
                    int rows = ci % 2 ? 7 : 37, cols = colss[ci], N = Ns[ni], skip = ci % 3 == 0 ? 3 : 0;
                    if (isa && ni > 2) continue;  // (the portable path has one shape)
                    TestW w;
                    make_w(&w, types[ti], rows + skip, cols, &seed);
                    MatView v = matview_rows(&w.v, skip, rows);  // rows skip .. of the matrix
                    v.compute_bf16 = 1;
                    float *x = malloc(sizeof(float) * N * cols), *out = malloc(sizeof(float) * N * rows);
                    float *one = malloc(sizeof(float) * 2 * rows);
                    for (int i = 0; i < N * cols; i++) x[i] = uniform(&seed) * 3;
                    CHECK(matmul_nt_bf16c(out, rows, x, cols, &v, N, 0, rows) == 0);
                    for (int n = 0; n < N; n++)
                        for (int r = 0; r < rows; r++) {
                            double mag, want = reference(&w, skip + r, x + (size_t)n * cols, &mag);
                            double bound = (cols + 20) * ldexp(1, -24) * mag + 1e-30;
                            CHECK_MSG(fabs(out[n * rows + r] - want) <= bound, "%s %s cols %d N %d: %.9g vs %.9g (bound %.3g)",
                                      isa ? "portable" : "auto", dtype_name(types[ti]), cols, N, out[n * rows + r], want, bound);
                        }
                    for (int n = 0; n < N; n++) {
                        CHECK(matmul_nt_bf16c(one, rows, x + (size_t)n * cols, cols, &v, 1, 0, rows) == 0);
                        CHECK_MSG(memcmp(one, out + (size_t)n * rows, sizeof(float) * rows) == 0, "%s N %d row %d alone",
                                  dtype_name(types[ti]), N, n);
                        if (n + 1 < N) {
                            CHECK(matmul_nt_bf16c(one, rows, x + (size_t)n * cols, cols, &v, 2, 0, rows) == 0);
                            CHECK(memcmp(one, out + (size_t)n * rows, sizeof(float) * 2 * rows) == 0);
                        }
                    }
                    // a share of the rows (a thread's) gives the same bits
                    CHECK(matmul_nt_bf16c(out, rows, x, cols, &v, N, 5, rows - 1) == 0);
                    CHECK(matmul_nt_bf16c(one, rows, x, cols, &v, 1, 0, rows) == 0);
                    CHECK(memcmp(one + 5, out + 5, sizeof(float) * (rows - 6)) == 0);
                    free(x), free(out), free(one), free(w.data), free(w.scales);
                }
    }
    CHECK(kernels_set_isa("auto") == 0);
}

// The blocked kernels of `--compute bf16` (prefill's products: AMX tiles, else the AVX512_BF16
// register tiles): the same operands as above within the same fp32 bound, an FP8 NaN code spoiling
// only its row, and each activation row alone giving the bits it gave among all (a row's bits do
// not depend on its company: blocks of up to 16 rows use half the tiles; a register tile's rows
// are summed alike). path 0: the C model of the tile instructions (the kernel's blocks of 32,
// padding of K to 32 and transposed stores, in two shares of the rows); 1: the tiles; 2:
// matmul_nt (whichever the CPU takes); 3: matmul_nt_lowp_avx512 in two shares of the rows.
typedef int (*BlockedNt)(float *out, int ldo, const float *x, int ldx, const MatView *w, int N, int r0, int r1);

static void amx_nt_sweep(int path) {
    const BlockedNt fn = path == 0 ? matmul_nt_amx_emulated : path == 1 ? matmul_nt_amx : matmul_nt_lowp_avx512;
    const DType types[] = {DT_F32, DT_BF16, DT_F16, DT_F8_E4M3};
    const int colss[] = {1, 31, 33, 64, 129, 300, 1030};
    const int Ns[] = {1, 3, 16, 17, 40, 70};
    uint64_t seed = 41;
    for (int ti = 0; ti < 4; ti++)
        for (int ci = 0; ci < 7; ci++)
            for (int ni = 0; ni < 6; ni++) {
                int rows = ci % 2 ? 37 : 70, cols = colss[ci], N = Ns[ni], skip = ci % 3 == 0 ? 3 : 0;
                if (path == 3 && ci == 5 && ni < 3) rows = 1100;  // past a packed block of weight rows (1,024)
                if (path == 0 && (ni > 3 || cols > 300)) continue;  // (the model is slow)
                TestW w;
                make_w(&w, types[ti], rows + skip, cols, &seed);
                if (types[ti] == DT_F8_E4M3 && ni == 3) ((uint8_t *)w.data)[(size_t)(skip + 5) * cols + cols / 2] = 0xff;
                MatView v = matview_rows(&w.v, skip, rows);
                v.compute_bf16 = 1;
                float *x = malloc(sizeof(float) * N * cols), *out = malloc(sizeof(float) * N * rows);
                for (int i = 0; i < N * cols; i++) x[i] = uniform(&seed) * 3;
                int rc = path == 2   ? matmul_nt(out, x, &v, N)
                         : path == 1 ? fn(out, rows, x, cols, &v, N, 0, rows)
                                     : fn(out, rows, x, cols, &v, N, 0, 11) | fn(out, rows, x, cols, &v, N, 11, rows);
                CHECK(rc == 0);
                const char *name = path == 0 ? "emulated" : path == 1 ? "amx" : path == 2 ? "matmul_nt" : "avx512bf16 tiles";
                for (int n = 0; n < N; n++)
                    for (int r = 0; r < rows; r++) {
                        double mag, want = reference(&w, skip + r, x + (size_t)n * cols, &mag);
                        float got = out[(size_t)n * rows + r];
                        if (types[ti] == DT_F8_E4M3 && ni == 3 && r == 5) {
                            CHECK_MSG(isnan(got), "%s: a NaN code's row gives %g", name, got);
                            continue;
                        }
                        double bound = (cols + 20) * ldexp(1, -24) * mag + 1e-30;
                        CHECK_MSG(fabs(got - want) <= bound, "%s %s rows %d cols %d N %d: [%d][%d] %.9g vs %.9g (bound %.3g)",
                                  name, dtype_name(types[ti]), rows, cols, N, n, r, got, want, bound);
                    }
                float *one = malloc(sizeof(float) * rows);
                for (int n = 0; n < N && path != 2; n += 1 + N / 5) {
                    CHECK(fn(one, rows, x + (size_t)n * cols, cols, &v, 1, 0, rows) == 0);
                    CHECK_MSG(memcmp(one, out + (size_t)n * rows, sizeof(float) * rows) == 0,
                              "%s %s cols %d N %d: row %d alone differs", name, dtype_name(types[ti]), cols, N, n);
                }
                free(one), free(x), free(out), free(w.data), free(w.scales);
            }
}

// The AMX kernels keep their tile configuration loaded between calls; code between them that
// releases the tiles (a benchmark's own tile loop, a library's kernels) must not leave the next
// call without one (it faulted with SIGILL before the kernels read the configuration back).
__attribute__((target("amx-tile"))) static void release_tiles(void) { _tile_release(); }

TEST(test_bf16c_amx_after_the_tiles_are_released) {
    if (!kernels_cpu_amx()) SKIP("no AMX tiles on this CPU");
    uint64_t seed = 9;
    TestW w;
    make_w(&w, DT_BF16, 64, 96, &seed);
    MatView v = w.v;
    v.compute_bf16 = 1;
    float x[3 * 96], a[3 * 64], b[3 * 64];
    for (int i = 0; i < 3 * 96; i++) x[i] = uniform(&seed);
    CHECK(matmul_nt_amx(a, 64, x, 96, &v, 3, 0, 64) == 0);
    release_tiles();
    CHECK(matmul_nt_amx(b, 64, x, 96, &v, 3, 0, 64) == 0);
    CHECK(memcmp(a, b, sizeof a) == 0);
    free(w.data), free(w.scales);
}

TEST(test_bf16c_amx_emulated_against_fp64) {
    if (!kernels_cpu_avx512bf16()) SKIP("no AVX512_BF16: the AMX kernel's model needs its packers");
    amx_nt_sweep(0);
}

TEST(test_bf16c_blocked_avx512bf16_against_fp64) {
    if (!kernels_cpu_avx512bf16()) SKIP("no AVX512_BF16 on this CPU");
    amx_nt_sweep(3);
    if (!kernels_cpu_amx()) amx_nt_sweep(2);  // (matmul_nt takes these tiles)
}

// Products on weight panels on the AMX tiles against fp64 sums of the same rounded operands within
// the fp32 bound above, an FP8 NaN code spoiling only its row, each activation row alone giving the
// bits it gave among all, two shares of the rows that cut the view (the last panel of 5, 26 or 32
// rows), and K not a whole number of tile steps. Decode's kernel (a view's panels_tiles: engines
// that decode many sequences at once; row groups of 16 with tiles configured to fewer rows for the
// last), through its entry matmul_nt_invariant, shares cut anywhere; or prefill's
// (matmul_nt_amx_rows: two groups of 16 rows a step, the sums stored straight into the output),
// shares cut on a panel, which also gives the kernel on the stored rows' bits (matmul_nt_amx: the
// same instructions in the same order). emulated: the C model of the tile instructions.
typedef enum { SWEEP_DECODE, SWEEP_PREFILL } PanelsSweep;

static int sweep_product(PanelsSweep kernel, int emulated, float *out, const float *x, int N, const MatView *v,
                         uint32_t *ap, int r0, int r1) {
    int cols = v->cols;
    if (kernel == SWEEP_DECODE)
        return emulated ? matmul_nt_panels_tiles_emulated(out, v->rows, x, cols, v, N, r0, r1)
                        : matmul_nt_invariant(out, v->rows, x, cols, v, N, r0, r1);
    amx_pair_rows(ap, x, cols, N, cols, 0, (N + 31) / 32 * 32);
    return emulated ? matmul_nt_amx_rows_emulated(out, v->rows, ap, N, v, r0, r1)
                    : matmul_nt_amx_rows(out, v->rows, ap, N, v, r0, r1);
}

static void panels_sweep(PanelsSweep kernel, int emulated) {
    const DType types[] = {DT_F32, DT_BF16, DT_F16, DT_F8_E4M3};
    const int colss[] = {1, 31, 33, 129, 300, 1030};
    const int Ns[] = {1, 2, 5, 16, 17, 40, 70};
    const char *name = kernel == SWEEP_DECODE ? (emulated ? "emulated decode tiles" : "decode tiles")
                                              : (emulated ? "emulated prefill tiles" : "prefill tiles");
    uint64_t seed = 53;
    for (int ti = 0; ti < 4; ti++)
        for (int ci = 0; ci < 6; ci++)
            for (int ni = 0; ni < 7; ni++) {
                int cols = colss[ci], N = Ns[ni];
                if (emulated && (ni > 4 || cols > 300)) continue;  // (the model is slow)
                int rows = (ci + ni) % 3 == 0 ? 37 : (ci + ni) % 3 == 1 ? 90 : 160, skip = 32 * (ni % 2);
                TestW w;
                make_w(&w, types[ti], rows + skip + 5, cols, &seed);
                if (types[ti] == DT_F8_E4M3 && ni == 2) ((uint8_t *)w.data)[(size_t)(skip + 7) * cols + cols / 2] = 0xff;
                size_t bytes = weight_panels_bytes(&w.v);
                void *panels = aligned_alloc(64, (bytes + 63) / 64 * 64);
                // (NaN codes and patterns where the packing must write its zero padding: past an odd
                // last column a weight meets the activations' zero padding, and NaN × 0 is NaN)
                if (panels) memset(panels, 0xff, bytes);
                CHECK(bytes > 0 && panels && weight_panels_pack(panels, &w.v) == 0);
                MatView whole = w.v;
                whole.panels = panels;
                whole.panels_tiles = kernel == SWEEP_DECODE;
                MatView v = matview_rows(&whole, skip, rows);
                v.compute_bf16 = 1;
                float *x = malloc(sizeof(float) * N * cols), *out = malloc(sizeof(float) * N * rows),
                      *stored = malloc(sizeof(float) * N * rows), *one = malloc(sizeof(float) * rows);
                uint32_t *ap = aligned_alloc(64, amx_panel_words(N, cols) * sizeof(uint32_t));
                for (int i = 0; i < N * cols; i++) x[i] = uniform(&seed) * 3;
                int cut = kernel == SWEEP_DECODE ? 1 + (int)(lcg(&seed) >> 33) % (rows - 1) : 32;
                CHECK(sweep_product(kernel, emulated, out, x, N, &v, ap, 0, cut) == 0 &&
                      sweep_product(kernel, emulated, out, x, N, &v, ap, cut, rows) == 0);
                if (kernel == SWEEP_PREFILL)
                    CHECK((emulated ? matmul_nt_amx_emulated : matmul_nt_amx)(stored, rows, x, cols, &v, N, 0, rows) == 0);
                for (int n = 0; n < N; n++)
                    for (int r = 0; r < rows; r++) {
                        double mag, want = reference(&w, skip + r, x + (size_t)n * cols, &mag);
                        float got = out[(size_t)n * rows + r];
                        if (types[ti] == DT_F8_E4M3 && ni == 2 && r == 7) {
                            CHECK_MSG(isnan(got), "%s: a NaN code's row gives %g", name, got);
                            continue;
                        }
                        double bound = (cols + 20) * ldexp(1, -24) * mag + 1e-30;
                        CHECK_MSG(fabs(got - want) <= bound, "%s %s rows %d cols %d N %d: [%d][%d] %.9g vs %.9g (bound %.3g)",
                                  name, dtype_name(types[ti]), rows, cols, N, n, r, got, want, bound);
                        if (kernel == SWEEP_PREFILL)
                            CHECK_MSG(memcmp(&got, stored + (size_t)n * rows + r, sizeof got) == 0,
                                      "%s %s rows %d cols %d N %d: [%d][%d] %.9g, on the stored rows %.9g", name,
                                      dtype_name(types[ti]), rows, cols, N, n, r, got, stored[(size_t)n * rows + r]);
                    }
                for (int n = 0; n < N; n += 1 + N / 5) {
                    CHECK(sweep_product(kernel, emulated, one, x + (size_t)n * cols, 1, &v, ap, 0, rows) == 0);
                    CHECK_MSG(memcmp(one, out + (size_t)n * rows, sizeof(float) * rows) == 0,
                              "%s %s cols %d N %d: row %d alone differs", name, dtype_name(types[ti]), cols, N, n);
                }
                free(ap), free(one), free(stored), free(x), free(out), free(panels), free(w.data), free(w.scales);
            }
}

TEST(test_bf16c_panel_rows_emulated_against_fp64) {
    if (!kernels_cpu_avx512bf16_vbmi()) SKIP("no AVX512_BF16 with VBMI: no weight panels on this CPU");
    panels_sweep(SWEEP_PREFILL, 1);
}

TEST(test_bf16c_panel_rows_against_fp64) {
    if (!weight_panels_tiles()) SKIP("no AMX tiles on this CPU (their C model is tested above)");
    panels_sweep(SWEEP_PREFILL, 0);
}

TEST(test_bf16c_panels_on_tiles_emulated_against_fp64) {
    if (!kernels_cpu_avx512bf16_vbmi()) SKIP("no AVX512_BF16 with VBMI: no weight panels on this CPU");
    panels_sweep(SWEEP_DECODE, 1);
}

TEST(test_bf16c_panels_on_tiles_against_fp64) {
    if (!weight_panels_tiles()) SKIP("no AMX tiles on this CPU (their C model is tested above)");
    panels_sweep(SWEEP_DECODE, 0);
}

// Weight panels (packed once at load, MatView.panels) give the register tiles' bits for every N:
// the few-rows path (several panels at once) and the blocked one (blocks of activation rows, each
// panel's slices in turn) against matmul_nt_lowp_avx512 packing the same weights per call, which
// the sweep above checks against fp64. Views inside the matrix (on a panel's first row: they keep
// panels; off it: none), shares of the rows that cut a panel, activation blocks past their size, a
// NaN code, and the pair product of an expert's gate and up.
TEST(test_bf16c_panels_equal_register_tiles) {
    if (!kernels_cpu_avx512bf16_vbmi()) SKIP("no AVX512_BF16 with VBMI: no weight panels on this CPU");
    const DType types[] = {DT_F32, DT_BF16, DT_F16, DT_F8_E4M3};
    const int colss[] = {1, 31, 33, 129, 300, 1030, 4100};
    const int Ns[] = {1, 2, 3, 4, 5, 6, 7, 12, 13, 24, 25, 40, 200};
    uint64_t seed = 77;
    int compared = 0;
    for (int ti = 0; ti < 4; ti++)
        for (int ci = 0; ci < 7; ci++)
            for (int ni = 0; ni < 13; ni++) {
                int cols = colss[ci], N = Ns[ni];
                if (cols == 4100 && N != 1 && N != 40 && N != 200) continue;
                int rows = (ci + ni) % 3 == 0 ? 37 : (ci + ni) % 3 == 1 ? 96 : 160, skip = 32 * (ni % 3);
                TestW w;
                make_w(&w, types[ti], rows + skip + 5, cols, &seed);
                if (types[ti] == DT_F8_E4M3 && ni == 4) ((uint8_t *)w.data)[(size_t)(skip + 7) * cols + cols / 2] = 0xff;
                size_t bytes = weight_panels_bytes(&w.v);
                CHECK(bytes > 0);
                void *panels = aligned_alloc(64, (bytes + 63) / 64 * 64);
                CHECK(panels && weight_panels_pack(panels, &w.v) == 0);
                MatView whole = w.v;
                whole.panels = panels;
                MatView v = matview_rows(&whole, skip, rows), plain = matview_rows(&w.v, skip, rows);
                CHECK(v.panels != NULL);
                CHECK(matview_rows(&whole, skip + 3, 8).panels == NULL);  // off a panel's first row
                float *x = malloc(sizeof(float) * N * cols), *want = malloc(sizeof(float) * N * rows),
                      *got = malloc(sizeof(float) * N * rows), *inv = malloc(sizeof(float) * N * rows);
                for (int i = 0; i < N * cols; i++) x[i] = uniform(&seed) * 3;
                CHECK(matmul_nt_lowp_avx512(want, rows, x, cols, &plain, N, 0, rows) == 0);
                int cut = 1 + (int)(lcg(&seed) >> 33) % (rows - 1);  // a share boundary, anywhere
                CHECK(matmul_nt_panels(got, rows, x, cols, &v, N, 0, cut) == 0);
                CHECK(matmul_nt_panels(got, rows, x, cols, &v, N, cut, rows) == 0);
                CHECK(matmul_nt_invariant(inv, rows, x, cols, &v, N, 0, rows) == 0);  // the decode entry takes them
                CHECK_MSG(memcmp(got, want, sizeof(float) * N * rows) == 0 && memcmp(inv, want, sizeof(float) * N * rows) == 0,
                          "%s rows %d (view at %d) cols %d N %d cut %d: panels differ from the register tiles",
                          dtype_name(types[ti]), rows, skip, cols, N, cut);
                compared++;
                if (rows % 32 == 0 && N <= 40) {  // gate and up: the view and the whole matrix's first rows
                    // as two matmul_nt_part calls: the panels' bits — or, with AMX, the tiles' (the
                    // activations packed once for both)
                    MatView b = matview_rows(&whole, 0, rows);
                    float *ga = malloc(sizeof(float) * N * rows), *gb = malloc(sizeof(float) * N * rows),
                          *wa = malloc(sizeof(float) * N * rows), *wb = malloc(sizeof(float) * N * rows);
                    CHECK(matmul_nt2_part(ga, gb, x, &v, &b, N) == 0);
                    CHECK(matmul_nt_part(wa, x, &v, N, 0, rows) == 0 && matmul_nt_part(wb, x, &b, N, 0, rows) == 0);
                    CHECK(memcmp(ga, wa, sizeof(float) * N * rows) == 0 && memcmp(gb, wb, sizeof(float) * N * rows) == 0);
                    if (!kernels_cpu_amx()) CHECK(memcmp(ga, want, sizeof(float) * N * rows) == 0);
                    free(ga), free(gb), free(wa), free(wb);
                }
                free(x), free(want), free(got), free(inv), free(panels), free(w.data), free(w.scales);
            }
    printf("    %d products on panels, every one the register tiles' bits\n", compared);
}

// A list of pieces (matmul_nt_pieces: one stream of weights on panels) gives every piece the bits
// of its own matmul_nt_invariant call and writes nothing else: pieces of several matrices, rows
// ranges cut anywhere (empty ones too), activations shared by neighbours or each its own, N from 1
// past what the panel path takes (those go one by one), FP8 lists and BF16/F32/F16 lists, mixed
// lists and views without panels (taken one by one).
TEST(test_bf16c_pieces_equal_single_products) {
    if (!kernels_cpu_avx512bf16_vbmi()) SKIP("no AVX512_BF16 with VBMI: no weight panels on this CPU");
    enum { MATS = 5, PIECES = 9, MAXN = 14 };
    const int rowss[MATS] = {256, 96, 160, 37, 512}, colss[MATS] = {512, 300, 129, 64, 256};
    uint64_t seed = 2024;
    int lists = 0;
    for (int kind = 0; kind < 4; kind++) {  // FP8, the 16/32-bit types, mixed, some without panels
        TestW w[MATS];
        void *panels[MATS];
        for (int m = 0; m < MATS; m++) {
            const DType wide[3] = {DT_BF16, DT_F32, DT_F16};
            DType t = kind == 0 ? DT_F8_E4M3 : kind == 2 && m % 2 ? DT_F8_E4M3 : wide[m % 3];
            make_w(&w[m], t, rowss[m], colss[m], &seed);
            size_t bytes = weight_panels_bytes(&w[m].v);
            CHECK(bytes > 0);
            panels[m] = aligned_alloc(64, (bytes + 63) / 64 * 64);
            CHECK(panels[m] && weight_panels_pack(panels[m], &w[m].v) == 0);
            if (!(kind == 3 && m == 2)) w[m].v.panels = panels[m];
        }
        for (int rep = 0; rep < 40; rep++) {
            NtPiece pc[PIECES];
            float *xs[PIECES], *got[PIECES], *want[PIECES];
            for (int i = 0; i < PIECES; i++) {
                const MatView *v = &w[(int)(lcg(&seed) >> 33) % MATS].v;
                int N = 1 + (int)(lcg(&seed) >> 33) % (rep % 4 == 3 ? MAXN : 3);
                int r0 = (int)(lcg(&seed) >> 33) % v->rows, r1 = r0 + (int)(lcg(&seed) >> 33) % (v->rows - r0 + 1);
                if (rep % 5 == 0) r0 = r0 / 32 * 32, r1 = v->rows;  // whole panels to the end
                int ld = v->rows + 3;
                if (i > 0 && lcg(&seed) % 3 == 0 && pc[i - 1].w->cols == v->cols) {
                    xs[i] = NULL, N = pc[i - 1].N;  // the previous piece's activations
                } else {
                    xs[i] = malloc(sizeof(float) * N * (v->cols + 5));
                    for (int k = 0; k < N * (v->cols + 5); k++) xs[i][k] = uniform(&seed) * 2;
                }
                got[i] = malloc(sizeof(float) * N * ld), want[i] = malloc(sizeof(float) * N * ld);
                for (int k = 0; k < N * ld; k++) got[i][k] = want[i][k] = -7.0f;  // outside the rows: untouched
                pc[i] = (NtPiece){.w = v, .r0 = r0, .r1 = r1, .x = xs[i] ? xs[i] : pc[i - 1].x, .ldx = v->cols + 5,
                                  .N = N, .out = got[i], .ldo = ld};
            }
            CHECK(matmul_nt_pieces(pc, PIECES) == 0);
            for (int i = 0; i < PIECES; i++) {
                CHECK(matmul_nt_invariant(want[i], pc[i].ldo, pc[i].x, pc[i].ldx, pc[i].w, pc[i].N, pc[i].r0, pc[i].r1) == 0);
                CHECK_MSG(memcmp(got[i], want[i], sizeof(float) * pc[i].N * pc[i].ldo) == 0,
                          "list kind %d, repeat %d, piece %d (%s %dx%d rows %d-%d, N %d): not its own product's bits",
                          kind, rep, i, dtype_name(pc[i].w->dtype), pc[i].w->rows, pc[i].w->cols, pc[i].r0, pc[i].r1,
                          pc[i].N);
            }
            for (int i = 0; i < PIECES; i++) free(xs[i]), free(got[i]), free(want[i]);
            lists++;
        }
        for (int m = 0; m < MATS; m++) free(panels[m]), free(w[m].data), free(w[m].scales);
    }
    printf("    %d lists of %d pieces, every piece its own product's bits\n", lists, PIECES);
}

TEST(test_bf16c_amx_against_fp64) {
    if (!kernels_cpu_amx()) SKIP("no AMX tiles on this CPU (or Linux did not grant their state)");
    amx_nt_sweep(1);
    amx_nt_sweep(2);
}

// The portable path is the dot-product instruction's documented arithmetic (two products per lane,
// the odd one added first, each add rounded) in the register tiles' order: the same bits as the
// AVX512_BF16 tiles, on operands without BF16 subnormals (which the instruction reads as zero).
TEST(test_bf16c_portable_equals_instruction) {
    // First a probe of the instruction itself: lane 0 holds 1 after the first step, then adds two
    // products of 2^-24. Each add rounded (the documented arithmetic): 1; the pair rounded once: 1 +
    // 2^-23. A CPU whose instruction differs is not this test's concern: skipped, and said why.
    float probe_x[64] = {0}, got[2];
    uint16_t probe_w[64] = {0};
    probe_x[0] = 1, probe_w[0] = bf16_from_f32(1);
    probe_x[32] = probe_x[33] = 0x1p-12f, probe_w[32] = probe_w[33] = bf16_from_f32(0x1p-12f);
    MatView pv = {.dtype = DT_BF16, .rows = 1, .cols = 64, .data = probe_w, .compute_bf16 = 1};
    CHECK(kernels_set_isa("auto") == 0);
    CHECK(matmul_nt_bf16c(&got[0], 1, probe_x, 64, &pv, 1, 0, 1) == 0);
    CHECK(kernels_set_isa("scalar") == 0);
    CHECK(matmul_nt_bf16c(&got[1], 1, probe_x, 64, &pv, 1, 0, 1) == 0);
    CHECK(kernels_set_isa("auto") == 0);
    CHECK(got[1] == 1.0f);  // the portable path: each add rounded
    if (got[0] != got[1]) SKIP("this CPU's BF16 dot product rounds a lane's pair differently (%.9g)", got[0]);
    uint64_t seed = 21;
    const DType types[] = {DT_F32, DT_BF16, DT_F8_E4M3};
    for (int ti = 0; ti < 3; ti++) {
        TestW w;
        make_w(&w, types[ti], 37, 300, &seed);
        float x[5 * 300], a[5 * 37], b[5 * 37];
        for (int i = 0; i < 5 * 300; i++) x[i] = uniform(&seed) * 3;
        CHECK(kernels_set_isa("auto") == 0);
        CHECK(matmul_nt_bf16c(a, 37, x, 300, &w.v, 5, 0, 37) == 0);
        CHECK(kernels_set_isa("scalar") == 0);
        CHECK(matmul_nt_bf16c(b, 37, x, 300, &w.v, 5, 0, 37) == 0);
        CHECK_MSG(memcmp(a, b, sizeof a) == 0, "%s: the portable path differs from the instruction", dtype_name(types[ti]));
        free(w.data), free(w.scales);
    }
    CHECK(kernels_set_isa("auto") == 0);
}

// An E4M3 NaN code makes its row's products NaN, as the fp32 path does, and no other row's.
TEST(test_bf16c_fp8_nan_code) {
    uint64_t seed = 9;
    for (int isa = 0; isa < 2; isa++) {
        CHECK(kernels_set_isa(isa ? "scalar" : "auto") == 0);
        for (int N = 1; N <= 4; N += 3) {
            TestW w;
            make_w(&w, DT_F8_E4M3, 20, 200, &seed);
            ((uint8_t *)w.data)[3 * 200 + 150] = 0xff;
            ((uint8_t *)w.data)[17 * 200 + 5] = 0x7f;
            float x[4 * 200], out[4 * 20];
            for (int i = 0; i < N * 200; i++) x[i] = uniform(&seed);
            CHECK(matmul_nt_bf16c(out, 20, x, 200, &w.v, N, 0, 20) == 0);
            for (int n = 0; n < N; n++)
                for (int r = 0; r < 20; r++)
                    CHECK_MSG(isnan(out[n * 20 + r]) == (r == 3 || r == 17), "%s N %d row %d: %g", isa ? "portable" : "auto",
                              N, r, out[n * 20 + r]);
            free(w.data), free(w.scales);
        }
    }
    CHECK(kernels_set_isa("auto") == 0);
}

// `--compute bf16` on the golden models, by prefill and by --decode: the logits within 3e-2 of the
// largest reference logit (measured: 0.6–1.4%; BF16 activations carry 8 significant bits, and
// these small random models pass them through every layer) with the same argmax at every position,
// and `--compute f32` unchanged (within the fp32 tolerance of the other golden tests).
static void check_bf16_compute(const char *name) {
    char dir[300], path[600], ids[1024], lf[600], o[4096];
    snprintf(dir, sizeof dir, "%s/%s", test_datadir(), name);
    int T = test_golden_ids(name, ids, sizeof ids);
    CHECK_MSG(T > 0, "%s/tokens.txt missing", dir);
    snprintf(path, sizeof path, "%s/logits.f32", dir);
    size_t ng;
    float *g = test_read_file(path, &ng);
    CHECK(g && ng % T == 0);
    long V = (long)(ng / sizeof(float) / T);
    snprintf(lf, sizeof lf, "%s/bf16c_%s.f32", test_tmpdir(), name);
    const char *modes[] = {"--compute bf16", "--compute bf16 --decode", "--compute f32"};
    for (int mode = 0; mode < 3; mode++) {
        int rc = test_run(o, sizeof o, "%s logits --model %s --tokens %s --out %s %s", test_bin(), dir, ids, lf, modes[mode]);
        CHECK_MSG(rc == 0, "%s", o);
        size_t nl;
        float *l = test_read_file(lf, &nl);
        CHECK(l && nl == ng);
        double md = 0, mx = 0;
        int agree = 0;
        for (long i = 0; l && i < T * V; i++) md = fmax(md, test_absdiff(l[i], g[i])), mx = fmax(mx, fabs(g[i]));
        for (int t = 0; l && t < T; t++) {
            long a = 0, b = 0;
            for (long v = 1; v < V; v++) {
                if (l[t * V + v] > l[t * V + a]) a = v;
                if (g[t * V + v] > g[t * V + b]) b = v;
            }
            agree += a == b;
        }
        printf("    %s %s: max|diff| %.2g of max|logit|, argmax %d/%d\n", name, modes[mode], md / mx, agree, T);
        CHECK_MSG(md <= (mode == 2 ? 1e-5 : 3e-2) * mx && agree == T, "%s %s: %.3g, argmax %d/%d", name, modes[mode],
                  md / mx, agree, T);
        free(l);
    }
    free(g);
    CHECK(test_run(o, sizeof o, "%s logits --model %s --tokens %s --out %s --compute fp16", test_bin(), dir, ids, lf) == 1 &&
          strstr(o, "--compute: unknown value 'fp16' (f32, bf16 or auto)"));
}

// Expert flips: the routed experts of every (layer, token) under --compute bf16 against f32, from
// `logits --routes-out` (int32 (layers, T, K_r), -1 for dense layers). Measured on the golden
// models: see the printed lines (and README); asserted: well-formed routes, and at most 1 in 10
// choices flipped (a flip follows a near-tie of the routing scores, which BF16 rounding of the
// experts' inputs can tip).
static void check_routes(const char *name) {
    char dir[300], ids[1024], fa[600], fb[600], o[4096], path[600];
    snprintf(dir, sizeof dir, "%s/%s", test_datadir(), name);
    int T = test_golden_ids(name, ids, sizeof ids);
    CHECK(T > 0);
    snprintf(fa, sizeof fa, "%s/routes_f32_%s.i32", test_tmpdir(), name);
    snprintf(fb, sizeof fb, "%s/routes_bf16_%s.i32", test_tmpdir(), name);
    CHECK(test_run(o, sizeof o, "%s logits --model %s --tokens %s --routes-out %s", test_bin(), dir, ids, fa) == 0);
    CHECK(test_run(o, sizeof o, "%s logits --model %s --tokens %s --routes-out %s --compute bf16", test_bin(), dir, ids, fb) == 0);
    snprintf(path, sizeof path, "%s/config.json", dir);
    ModelConfig c;
    Error err = {0};
    CHECK(config_load(&c, path, &err) == 0);
    size_t na, nb;
    int *ra = test_read_file(fa, &na), *rb = test_read_file(fb, &nb);
    int K = c.num_experts_per_tok, L = c.num_hidden_layers;
    CHECK(ra && rb && na == nb && na == sizeof(int) * (size_t)L * T * K);
    long choices = 0, flips = 0, rows = 0, rows_flipped = 0;
    for (int l = 0; ra && rb && l < L; l++)
        for (int t = 0; t < T; t++) {
            const int *a = ra + ((size_t)l * T + t) * K, *b = rb + ((size_t)l * T + t) * K;
            if (a[0] < 0) {  // a dense layer: -1 throughout, in both
                for (int k = 0; k < K; k++) CHECK(a[k] == -1 && b[k] == -1);
                continue;
            }
            int f = 0;
            for (int k = 0; k < K; k++) {
                CHECK(a[k] >= 0 && a[k] < c.n_routed_experts && b[k] >= 0 && b[k] < c.n_routed_experts);
                int found = 0;
                for (int j = 0; j < K; j++) found |= a[k] == b[j];
                f += !found;
            }
            choices += K, flips += f, rows++, rows_flipped += f > 0;
        }
    printf("    %s: %ld of %ld expert choices flipped under --compute bf16 (%ld of %ld token-layers)\n", name, flips,
           choices, rows_flipped, rows);
    CHECK(choices > 0 && flips * 10 <= choices);
    free(ra), free(rb);
    CHECK(test_run(o, sizeof o, "%s logits --model %s --tokens %s --routes-out %s --decode", test_bin(), dir, ids, fa) == 1 &&
          strstr(o, "--routes-out: recorded by the prefill pass"));
}

TEST(test_bf16_compute_expert_flips) {
    check_routes("v3");
    check_routes("fp8");
    check_routes("v2lite");
}

TEST(test_bf16_compute_golden_v3) { check_bf16_compute("v3"); }
TEST(test_bf16_compute_golden_fp8) { check_bf16_compute("fp8"); }
TEST(test_bf16_compute_golden_v2lite) { check_bf16_compute("v2lite"); }

// generate, chat and serve default to --compute auto: bf16 for the matrices stored in BF16 or FP8
// where the CPU has the BF16 dot products (matmul_bf16c_fast), f32 elsewhere and for F32 weights;
// logits to f32.
static void check_auto(const char *name, int want_bf16) {
    char dir[300], a[4096], b[4096];
    snprintf(dir, sizeof dir, "%s/%s", test_datadir(), name);
    const char *fmt = "%s generate --model %s --tokens 5,17,3,90 --max-new 16 --temperature 0 %s";
    CHECK(test_run(a, sizeof a, fmt, test_bin(), dir, "") == 0);
    CHECK(test_run(b, sizeof b, fmt, test_bin(), dir, want_bf16 ? "--compute bf16" : "--compute f32") == 0);
    CHECK_MSG(strlen(a) > 10 && strcmp(a, b) == 0, "%s default:\n%s\nexplicit:\n%s", name, a, b);
    CHECK(test_run(b, sizeof b, fmt, test_bin(), dir, "--compute auto") == 0 && strcmp(a, b) == 0);
}

// COMPUTE_AUTO marks the BF16 and FP8 matrices (linear layers and heads) for BF16 compute on a CPU
// with the fast kernels, view by view, and nothing else: not F32 weights, not the router.
TEST(test_compute_auto_marks_views) {
    const char *names[] = {"fp8", "fp8_f32", "v3"};
    for (int i = 0; i < 3; i++) {
        char dir[300];
        snprintf(dir, sizeof dir, "%s/%s", test_datadir(), names[i]);
        Model m;
        Error err = {0};
        CHECK_MSG(model_load(&m, dir, 0, &err) == 0, "%s", err.msg);
        CHECK_MSG(model_set_compute(&m, COMPUTE_AUTO, &err) == 0, "%s", err.msg);
        CHECK(model_panels_bytes(&m, COMPUTE_AUTO, NULL) == m.panels_bytes);  // what `dsv3 info` says
        const LayerWeights *moe = &m.w.layers[m.cfg.first_k_dense_replace];
        int low = m.w.layers[0].self_attn.kv_b_proj.dtype != DT_F32;  // BF16 or FP8 weights
        int want = low && matmul_bf16c_fast();
        CHECK_MSG(m.w.layers[0].self_attn.kv_b_proj.compute_bf16 == want, "%s kv_b_proj", names[i]);
        CHECK(moe->moe.experts[0].down_proj.compute_bf16 == want);
        CHECK(m.w.lm_head.compute_bf16 == (matmul_bf16c_fast() && m.w.lm_head.dtype != DT_F32));  // per view
        CHECK(moe->moe.gate.compute_bf16 == 0);  // the router stays fp32
        CHECK(model_kv_dtype_auto(&m) == (want ? DT_BF16 : DT_F32));  // --kv-dtype auto follows the compute
        CHECK_MSG(model_set_compute(&m, COMPUTE_BF16, &err) == 0, "%s", err.msg);
        CHECK(model_kv_dtype_auto(&m) == DT_BF16);
        CHECK(m.w.layers[0].self_attn.kv_b_proj.compute_bf16 == 1 && moe->moe.gate.compute_bf16 == 0);
        // weight panels where the CPU takes them, for the products' matrices only (not the router)
        CHECK((m.w.layers[0].self_attn.kv_b_proj.panels != NULL) == kernels_cpu_avx512bf16_vbmi());
        CHECK(model_panels_bytes(&m, COMPUTE_BF16, NULL) == m.panels_bytes);
        CHECK(moe->moe.gate.panels == NULL && (m.panels != NULL) == kernels_cpu_avx512bf16_vbmi());
        CHECK_MSG(model_set_compute(&m, COMPUTE_F32, &err) == 0, "%s", err.msg);
        CHECK(m.w.layers[0].self_attn.kv_b_proj.compute_bf16 == 0 && model_kv_dtype_auto(&m) == DT_F32);
        CHECK(m.panels == NULL && m.w.layers[0].self_attn.kv_b_proj.panels == NULL);  // freed
        model_free(&m);
    }
}

TEST(test_compute_auto_default) {
    check_auto("v3", matmul_bf16c_fast());      // BF16 weights
    check_auto("fp8", matmul_bf16c_fast());     // FP8 weights
    check_auto("fp8_f32", 0);                   // the same model in F32: fp32 compute
    printf("    this CPU: --compute auto is %s for BF16 and FP8 weights\n", matmul_bf16c_fast() ? "bf16" : "f32");
}

// f32 logits of the golden tokens of m (tokens ids[0..T)) into out (T, V).
static int f32_logits(const Model *m, const int *ids, int T, float *out, Error *err) {
    KVCache kv;
    if (kvcache_init_as(&kv, &m->cfg, 0, T + 1, DT_F32, err)) return -1;
    ForwardState *s = forward_state_new(m, T, T + 1, err);
    int rc = s ? model_forward(m, s, &kv, ids, T, ATTN_PLAIN, out, NULL, NULL, err) : -1;
    forward_state_free(s);
    kvcache_free(&kv);
    return rc;
}

// Where the products read only the panels, a mmapped matrix's pages go back to the page cache
// (model.c), and its FP8 scales are read from a copy beside the panels; its bytes and scales must
// still be the file's when something reads them again — the fp32 products after --compute f32:
// the same logits as before the panels, bit for bit, and the golden ones.
TEST(test_panels_release_keeps_the_weights) {
    if (!weight_panels_only()) SKIP("the BF16-compute products do not read panels only on this CPU");
    char dir[300], ids_text[1024], path[600];
    snprintf(dir, sizeof dir, "%s/fp8", test_datadir());
    int T = test_golden_ids("fp8", ids_text, sizeof ids_text), ids[256], n = 0;
    for (char *p = ids_text; n < T && *p; p++) ids[n++] = (int)strtol(p, &p, 10);
    CHECK(T > 0 && n == T);
    snprintf(path, sizeof path, "%s/logits.f32", dir);
    size_t ng;
    float *golden = test_read_file(path, &ng);
    Model m;
    Error err = {0};
    CHECK_MSG(model_load(&m, dir, 0, &err) == 0, "%s", err.msg);
    long V = m.cfg.vocab_size;
    CHECK(golden && ng == sizeof(float) * T * V);
    float *before = malloc(sizeof(float) * T * V), *after = malloc(sizeof(float) * T * V);
    CHECK_MSG(f32_logits(&m, ids, T, before, &err) == 0, "%s", err.msg);
    // the FP8 block scales: with the panels, a copy of the file's beside them (model.c's
    // scale_bytes); after, the file's again
    const MatView *down = &m.w.layers[m.cfg.first_k_dense_replace].moe.experts[0].down_proj;
    char sname[200];
    snprintf(sname, sizeof sname, "model.layers.%d.mlp.experts.0.down_proj.weight_scale_inv", m.cfg.first_k_dense_replace);
    const StTensor *file_scales = st_model_find(&m.files, sname);
    CHECK(file_scales && down->dtype == DT_F8_E4M3 && down->scale_inv == file_scales->data);
    CHECK_MSG(model_set_compute(&m, COMPUTE_BF16, &err) == 0, "%s", err.msg);
    CHECK(down->panels != NULL);
    const char *sc = (const char *)down->scale_inv;
    CHECK(sc >= (const char *)m.panels && sc < (const char *)m.panels + m.panels_bytes);
    CHECK(memcmp(sc, file_scales->data, sizeof(float) * file_scales->shape[0] * file_scales->shape[1]) == 0);
    CHECK_MSG(model_set_compute(&m, COMPUTE_F32, &err) == 0, "%s", err.msg);
    CHECK(down->scale_inv == file_scales->data);
    CHECK_MSG(f32_logits(&m, ids, T, after, &err) == 0, "%s", err.msg);
    CHECK(memcmp(before, after, sizeof(float) * T * V) == 0);
    double md = 0, mx = 0;
    for (long i = 0; i < T * V; i++) md = fmax(md, fabs(after[i] - golden[i])), mx = fmax(mx, fabs(golden[i]));
    CHECK_MSG(md <= 1e-5 * mx, "after the panels: %.3g of the largest golden logit", md / mx);
    free(before), free(after), free(golden);
    model_free(&m);
}

// Batch invariance holds under --compute bf16: the batch file's greedy continuations are the same
// bits alone (--parallel 1), four at a time, and on one thread.
TEST(test_bf16_compute_batch_invariant) {
    char dir[300], batch[600], a[4096], b[4096], c[4096];
    snprintf(dir, sizeof dir, "%s/v3", test_datadir());
    snprintf(batch, sizeof batch, "%s/bf16c_batch.txt", test_tmpdir());
    test_write_text(batch, "5,17,3\n90,2,44,8\n7\n11,12\n");
    // either kernel of the decode products (on AMX CPUs the tiles are a second one)
    for (int tiles = 0; tiles < 2; tiles++) {
        const char *fmt = tiles ? "%s%s generate --model %s --batch-file %s --max-new 12 --parallel %d --compute bf16 "
                                  "--temperature 0 --decode-tiles on"
                                : "%s%s generate --model %s --batch-file %s --max-new 12 --parallel %d --compute bf16 "
                                  "--temperature 0 --decode-tiles off";
        CHECK(test_run(a, sizeof a, fmt, "", test_bin(), dir, batch, 1) == 0);
        CHECK(test_run(b, sizeof b, fmt, "", test_bin(), dir, batch, 4) == 0);
        CHECK(test_run(c, sizeof c, fmt, "OMP_NUM_THREADS=1 ", test_bin(), dir, batch, 4) == 0);
        CHECK_MSG(strlen(a) > 20 && strcmp(a, b) == 0 && strcmp(a, c) == 0, "tiles %s, alone:\n%s\nfour:\n%s\none thread:\n%s",
                  tiles ? "on" : "off", a, b, c);
    }
    int rc = test_run(a, sizeof a, "%s generate --model %s --tokens 5 --decode-tiles always", test_bin(), dir);
    CHECK_MSG(rc == 1 && strstr(a, "--decode-tiles") && strstr(a, "always"), "%s", a);
}

// Absorbed attention's W_UK,hᵀ q_nope on the panels model_set_compute packs for it (each head's
// W_UK rows of kv_b_proj transposed, FP8 block scales regridded) against fp64 sums of the same
// rounded operands (q_nope in BF16, W_UK as stored: FP8 codes × their block scale), every head of
// every layer, FP8 and BF16 weights; a head layout whose nope rows straddle two of kv_b_proj's
// block rows (FP8, nope + v = 96) gets none, and attention reads kv_b_proj's rows as before.
TEST(test_w_uk_panels_against_fp64) {
    if (!matmul_bf16c_fast()) SKIP("no weight panels on this CPU (AVX512_BF16 with VBMI)");
    const struct {
        int nope, v, H;
        DType dt;
        int packed;
    } cases[] = {{64, 64, 2, DT_F8_E4M3, 1}, {32, 96, 3, DT_F8_E4M3, 1}, {192, 64, 2, DT_F8_E4M3, 1},
                 {64, 32, 2, DT_F8_E4M3, 0}, {48, 32, 3, DT_BF16, 1}};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        char dir[400], path[600], cfg[2048];
        snprintf(dir, sizeof dir, "%s/w_uk_%zu", test_tmpdir(), k);
        Error err = {0};
        CHECK_MSG(make_dirs(dir, &err) == 0, "%s", err.msg);
        snprintf(cfg, sizeof cfg,
                 "{\"architectures\": [\"DeepseekV3ForCausalLM\"], \"model_type\": \"deepseek_v3\", \"vocab_size\": 64, "
                 "\"hidden_size\": 64, \"intermediate_size\": 96, \"moe_intermediate_size\": 32, \"num_hidden_layers\": 2, "
                 "\"num_attention_heads\": %d, \"num_key_value_heads\": %d, \"q_lora_rank\": 32, \"kv_lora_rank\": 128, "
                 "\"qk_nope_head_dim\": %d, \"qk_rope_head_dim\": 8, \"v_head_dim\": %d, \"n_routed_experts\": 4, "
                 "\"n_shared_experts\": 1, \"num_experts_per_tok\": 2, \"n_group\": 1, \"topk_group\": 1, "
                 "\"topk_method\": \"noaux_tc\", \"scoring_func\": \"sigmoid\", \"norm_topk_prob\": true, "
                 "\"routed_scaling_factor\": 2.5, \"first_k_dense_replace\": 1, \"moe_layer_freq\": 1, "
                 "\"num_nextn_predict_layers\": 0, \"max_position_embeddings\": 256, \"rope_theta\": 10000, "
                 "\"rms_norm_eps\": 1e-06, \"hidden_act\": \"silu\", \"initializer_range\": 0.02, "
                 "\"tie_word_embeddings\": false}",
                 cases[k].H, cases[k].H, cases[k].nope, cases[k].v);
        snprintf(path, sizeof path, "%s/config.json", dir);
        test_write_text(path, cfg);
        ModelConfig c;
        CHECK_MSG(config_load(&c, path, &err) == 0, "%s", err.msg);
        CHECK_MSG(model_write_random(&c, dir, 7 + k, cases[k].dt, (size_t)1 << 30, &err) == 0, "%s", err.msg);
        Model m;
        CHECK_MSG(model_load(&m, dir, 0, &err) == 0, "%s", err.msg);
        CHECK_MSG(model_set_compute(&m, COMPUTE_BF16, &err) == 0, "%s", err.msg);
        int H = cases[k].H, nope = cases[k].nope, v = cases[k].v, L = 128, N = 3;
        uint64_t seed = 99 + k;
        for (int l = 0; l < c.num_hidden_layers; l++) {
            const MlaWeights *a = &m.w.layers[l].self_attn;
            CHECK_MSG((a->w_uk_t.panels != NULL) == cases[k].packed, "case %zu layer %d: W_UK panels %s", k, l,
                      a->w_uk_t.panels ? "made" : "missing");
            if (!cases[k].packed) continue;
            float *q = malloc(sizeof(float) * N * nope), *out = malloc(sizeof(float) * N * L), *row = malloc(sizeof(float) * L);
            for (int h = 0; h < H; h++) {
                for (int i = 0; i < N * nope; i++) q[i] = uniform(&seed);
                MatView wt = matview_rows(&a->w_uk_t, h * L, L);
                CHECK(matmul_nt_invariant(out, L, q, nope, &wt, N, 0, L) == 0);
                for (int n = 0; n < N; n++) {
                    double want[128] = {0}, mag[128] = {0};
                    for (int j = 0; j < nope; j++) {  // (every 128 of a head's nope rows: one block row, one scale)
                        CHECK(matview_row_f32(&a->kv_b_proj, h * (nope + v) + j, row) == 0);
                        double x = bf16_to_f32(bf16_from_f32(q[n * nope + j]));
                        for (int col = 0; col < L; col++) want[col] += x * row[col], mag[col] += fabs(x * row[col]);
                    }
                    for (int col = 0; col < L; col++)
                        CHECK_MSG(fabs(out[n * L + col] - want[col]) <= 1e-5 * mag[col] + 1e-30,
                                  "case %zu layer %d head %d row %d latent %d: %.9g, fp64 %.9g", k, l, h, n, col,
                                  out[n * L + col], want[col]);
                }
            }
            free(q), free(out), free(row);
        }
        model_free(&m);
    }
}
