// gemm_lowp.h: scales, the scalar rounding reference, the portable path and the choice of path.
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/convert.h"
#include "kernels/gemm_lowp.h"
#include "kernels/kernels_cpu.h"

float lowp_fp8_max(LowpFormat fmt) { return fmt == LOWP_E5M2 ? 57344.0f : 448.0f; }

long lowp_fp8_scale_count(int rows, int K, LowpScaling how) {
    long kc = (K + LOWP_FP8_CHUNK - 1) / LOWP_FP8_CHUNK;
    switch (how) {
    case LOWP_TILE_1x128: return rows * kc;
    case LOWP_BLOCK_128x128: return (long)(rows + LOWP_FP8_CHUNK - 1) / LOWP_FP8_CHUNK * kc;
    default: return 1;
    }
}

// The scale of a tile, block or tensor whose largest magnitude is amax.
static float scale_of_amax(float amax, float fmt_max, int pow2) {
    float s = fmaxf(amax, 1e-4f) / fmt_max;
    return pow2 ? lowp_ue8m0(s) : s;
}

// The scales of one operand by the calling team of threads (worksharing constructs that bind to
// the enclosing parallel region; one thread outside of any): tile maxima — each 1 × 128 tile's
// scale straight away — then, for blocks or one value per tensor, the maxima folded by one thread.
// amax: rows × ceil(K / 128) floats of scratch (scale itself for 1 × 128 tiles).
static void scales_team(const LowpOperand *op, float *scale, float *amax, int rows, int K, LowpScaling how) {
    int kc = (K + LOWP_FP8_CHUNK - 1) / LOWP_FP8_CHUNK, vec = kernels_cpu_avx512();
    int tiles = how == LOWP_TILE_1x128, pow2 = op->pow2;
    float mx = lowp_fp8_max(op->fmt);
    const float *d = op->data;
    long ld = op->ld;
    if (!op->trans) {
#pragma omp for schedule(static)
        for (int i = 0; i < rows; i++)
            for (int c = 0; c < kc; c++) {
                const float *x = d + i * ld + (long)c * LOWP_FP8_CHUNK;
                int n = K - c * LOWP_FP8_CHUNK < LOWP_FP8_CHUNK ? K - c * LOWP_FP8_CHUNK : LOWP_FP8_CHUNK;
                float m = 0.0f;
                if (vec) {
                    m = lowp_absmax_avx512(x, n);
                } else {
#pragma omp simd reduction(max : m)
                    for (int k = 0; k < n; k++) m = fabsf(x[k]) > m ? fabsf(x[k]) : m;
                }
                amax[(long)i * kc + c] = tiles ? scale_of_amax(m, mx, pow2) : m;
            }
    } else {
        // element (i, k) at d[k * ld + i]: blocks of 256 values of i, each swept down one chunk's
        // rows — the threads share (block, chunk) units: a weight gradient's operands (a few hundred
        // features along i, the tokens along K) are one block and many chunks
        enum { IB = 256 };
        int units = (rows + IB - 1) / IB * kc;
#pragma omp for schedule(static)
        for (int u = 0; u < units; u++) {
            int i0 = u / kc * IB, c = u % kc, n = rows - i0 < IB ? rows - i0 : IB;
            float m[IB];
            for (int i = 0; i < n; i++) m[i] = 0.0f;
            int k0 = c * LOWP_FP8_CHUNK, k1 = k0 + LOWP_FP8_CHUNK < K ? k0 + LOWP_FP8_CHUNK : K;
            if (vec)
                lowp_colmax_avx512(m, d + k0 * ld + i0, ld, n, k1 - k0);
            else
                for (int k = k0; k < k1; k++) {
                    const float *x = d + k * ld + i0;
#pragma omp simd
                    for (int i = 0; i < n; i++) m[i] = fabsf(x[i]) > m[i] ? fabsf(x[i]) : m[i];
                }
            for (int i = 0; i < n; i++) amax[(long)(i0 + i) * kc + c] = tiles ? scale_of_amax(m[i], mx, pow2) : m[i];
        }
    }
    if (tiles) return;  // (the loop's barrier: every scale is written)
#pragma omp single
    {  // the tiles' maxima folded into blocks or one value
        long n = lowp_fp8_scale_count(rows, K, how);
        int srow = how == LOWP_BLOCK_128x128 ? LOWP_FP8_CHUNK : rows;
        for (long c = 0; c < n; c++) scale[c] = 0.0f;
        for (int i = 0; i < rows; i++)
            for (int c = 0; c < kc; c++) {
                float *cell = how == LOWP_TENSOR ? scale : scale + (long)(i / srow) * kc + c;
                if (amax[(long)i * kc + c] > *cell) *cell = amax[(long)i * kc + c];
            }
        for (long c = 0; c < n; c++) scale[c] = scale_of_amax(scale[c], mx, pow2);
    }
}

// Points op at scale with the strides of `how`.
static void scales_bind(LowpOperand *op, float *scale, int K, LowpScaling how) {
    int kc = (K + LOWP_FP8_CHUNK - 1) / LOWP_FP8_CHUNK;
    op->scale = scale;
    op->scale_rows = how == LOWP_TILE_1x128 ? 1 : how == LOWP_BLOCK_128x128 ? LOWP_FP8_CHUNK : INT_MAX;
    op->scale_ld = how == LOWP_TENSOR ? 0 : kc;
    op->scale_kstep = how == LOWP_TENSOR ? 0 : 1;
}

static float *amax_scratch(float *scale, int rows, int K, LowpScaling how) {
    int kc = (K + LOWP_FP8_CHUNK - 1) / LOWP_FP8_CHUNK;
    return how == LOWP_TILE_1x128 ? scale : malloc(sizeof(float) * ((size_t)rows * kc + 1));
}

float lowp_ue8m0(float s) {
    int e;
    float m = frexpf(s, &e);  // s = m · 2^e, m in [0.5, 1)
    return m == 0.5f ? s : ldexpf(1.0f, e);
}

int lowp_fp8_scales(LowpOperand *op, float *scale, int rows, int K, LowpScaling how) {
    float *amax = amax_scratch(scale, rows, K, how);
    if (!amax) return -1;
    scales_bind(op, scale, K, how);
#pragma omp parallel if (!omp_in_parallel() && (long)rows * K > (1 << 16))
    scales_team(op, scale, amax, rows, K, how);
    if (amax != scale) free(amax);
    return 0;
}

float lowp_value(LowpFormat fmt, float x, float scale) {
    switch (fmt) {
    case LOWP_BF16: return bf16_to_f32(bf16_from_f32(x));
    case LOWP_E4M3: return fp8_e4m3_to_f32(fp8_e4m3_from_f32(x / scale));
    default: {
        // E5M2 keeps ±inf as a code; the quantiser saturates every non-NaN value, as E4M3 does
        float v = fp8_e5m2_to_f32(fp8_e5m2_from_f32(x / scale));
        return isinf(v) ? copysignf(57344.0f, v) : v;
    }
    }
}

void lowp_values(float *out, const float *x, long n, LowpFormat fmt, float scale) {
    long i = 0;
    if (kernels_cpu_avx512()) i = lowp_values_avx512(out, x, n, fmt, scale);
    for (; i < n; i++) out[i] = lowp_value(fmt, x[i], scale);
}

void lowp_e4m3_codes(uint8_t *codes, const LowpOperand *op, long rows, int cols) {
    int kc = (cols + LOWP_FP8_CHUNK - 1) / LOWP_FP8_CHUNK, vec = kernels_cpu_avx512();
#pragma omp parallel for schedule(static) if (!omp_in_parallel() && rows * cols > (1 << 16))
    for (long r = 0; r < rows; r++)
        for (int c = 0; c < kc; c++) {
            long k0 = (long)c * LOWP_FP8_CHUNK, n = cols - k0 < LOWP_FP8_CHUNK ? cols - k0 : LOWP_FP8_CHUNK, k = 0;
            const float *xr = op->data + r * op->ld + k0, s = lowp_scale_of(op, (int)r, (int)k0);
            uint8_t *out = codes + r * cols + k0;
            if (vec) k = lowp_e4m3_codes_avx512(out, xr, n, s);
            for (; k < n; k++) out[k] = fp8_e4m3_from_f32(xr[k] / s);
        }
}

void lowp_fp8_save_rows(uint8_t *codes, float *scales, const float *x, long rows, int cols, int pow2) {
    // the scales as the forward GEMM computes them for this operand (1 × 128 tiles along a row)
    LowpOperand op = {.data = x, .ld = cols, .fmt = LOWP_E4M3, .pow2 = pow2};
    if (lowp_fp8_scales(&op, scales, (int)rows, cols, LOWP_TILE_1x128)) return;  // (tiles: no scratch to fail)
    lowp_e4m3_codes(codes, &op, rows, cols);
}

void lowp_fp8_restore_rows(float *x, const uint8_t *codes, const float *scales, long rows, int cols) {
    int kc = (cols + LOWP_FP8_CHUNK - 1) / LOWP_FP8_CHUNK, vec = kernels_cpu_avx512();
    float table[256];  // every code's value
    for (int c = 0; c < 256; c++) table[c] = fp8_e4m3_to_f32((uint8_t)c);
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 16))
    for (long r = 0; r < rows; r++)
        for (int c = 0; c < kc; c++) {
            long k0 = (long)c * LOWP_FP8_CHUNK, n = cols - k0 < LOWP_FP8_CHUNK ? cols - k0 : LOWP_FP8_CHUNK, k = 0;
            const uint8_t *in = codes + r * cols + k0;
            float *xr = x + r * cols + k0, s = scales[r * kc + c];
            if (vec) k = lowp_e4m3_scaled_avx512(xr, in, n, s);
            for (; k < n; k++) xr[k] = table[in[k]] * s;
        }
}

const char *gemm_lowp_isa(void) {
    return kernels_cpu_amx() ? "amx" : kernels_cpu_avx512bf16() ? "avx512bf16" : "portable";
}

// One thread's share of the product on the fastest unit: AMX tiles, else AVX512_BF16 dot products.
static int gemm_lowp_share(float *C, int ldc, const LowpOperand *A, const LowpOperand *B, int K, int add, int m_begin,
                           int m_end, int n_begin, int n_end) {
    return kernels_cpu_amx() ? gemm_lowp_amx(C, ldc, A, B, K, add, m_begin, m_end, n_begin, n_end)
                             : gemm_lowp_avx512bf16(C, ldc, A, B, K, add, m_begin, m_end, n_begin, n_end);
}

// Rows [0, rows) × K columns [k0, k0 + kn) of an operand as the values it is packed as (lowp_value,
// vectorised), into out (rows × kn); times_scale: FP8 values multiplied back by their scales. k0
// is a multiple of 128. An orphaned worksharing loop: the calling team splits the rows.
static void lowp_unpack(const LowpOperand *X, int rows, int k0, int kn, float *out, int times_scale) {
    int fp8 = X->fmt != LOWP_BF16;
#pragma omp for schedule(static)
    for (int i = 0; i < rows; i++)
        for (int c = 0; c < kn; c += LOWP_FP8_CHUNK) {
            int n = kn - c < LOWP_FP8_CHUNK ? kn - c : LOWP_FP8_CHUNK;
            float *o = out + (size_t)i * kn + c, s = fp8 ? lowp_scale_of(X, i, k0 + c) : 1.0f, col[LOWP_FP8_CHUNK];
            const float *x = X->data + (size_t)i * X->ld + k0 + c;
            if (X->trans) {  // a column of the stored matrix, gathered first
                for (int k = 0; k < n; k++) col[k] = X->data[(size_t)(k0 + c + k) * X->ld + i];
                x = col;
            }
            lowp_values(o, x, n, X->fmt, s);
            if (fp8 && times_scale)
                for (int k = 0; k < n; k++) o[k] *= s;
        }
}

// The portable path: operands rounded into fp32 buffers, products by sgemm. FP8: one sgemm per
// 128-chunk of K into a scratch C, promoted into C with the two scales.
static int gemm_lowp_portable(float *C, int ldc, const LowpOperand *A, const LowpOperand *B, int M, int N, int K,
                              int add) {
    int fp8 = A->fmt != LOWP_BF16, chunk = fp8 ? LOWP_FP8_CHUNK : K;
    if (K == 0) chunk = 1;
    float *a = malloc(sizeof(float) * ((size_t)M * chunk + (size_t)N * chunk + (fp8 ? (size_t)M * N : 0)) + 64);
    if (!a) return -1;
    float *b = a + (size_t)M * chunk, *t = b + (size_t)N * chunk;
    if (!add)
        for (int i = 0; i < M; i++) memset(C + (size_t)i * ldc, 0, sizeof(float) * N);
    for (int k0 = 0; k0 < K; k0 += chunk) {
        int kc = K - k0 < chunk ? K - k0 : chunk;
#pragma omp parallel if (!omp_in_parallel() && (long)(M + N) * kc > (1 << 16))
        {
            lowp_unpack(A, M, k0, kc, a, 0);
            lowp_unpack(B, N, k0, kc, b, 0);
        }
        if (!fp8) {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, kc, 1.0f, a, kc, b, kc, 1.0f, C, ldc);
            continue;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, kc, 1.0f, a, kc, b, kc, 0.0f, t, N);
        for (int i = 0; i < M; i++) {
            float sa = lowp_scale_of(A, i, k0);
            for (int j = 0; j < N; j++) {
                float *c = C + (size_t)i * ldc + j;
                *c = fmaf(t[(size_t)i * N + j], sa * lowp_scale_of(B, j, k0), *c);
            }
        }
    }
    free(a);
    return 0;
}

// The tensor core's limited accumulation, as the V3 report describes the H800's: each group of 32
// products is aligned to the largest exponent among them and the running sum, and everything below
// `bits` bits under that leading bit is dropped (truncated toward zero) before the exact sum —
// every addend and the running sum itself. In double: the grid is a power of two and the sum of
// 33 values on it stays exact.
static double accum_group(double acc, const double *t, int n, int bits) {
    double big = fabs(acc);
    for (int k = 0; k < n; k++) big = fabs(t[k]) > big ? fabs(t[k]) : big;
    if (big == 0 || !isfinite(big)) {
        double s = acc;
        for (int k = 0; k < n; k++) s += t[k];
        return s;
    }
    int e;
    frexp(big, &e);  // big in [2^(e-1), 2^e)
    double q = ldexp(1.0, e - bits), s = trunc(acc / q) * q;
    for (int k = 0; k < n; k++) s += trunc(t[k] / q) * q;
    return s;
}

// FP8 products with the accumulation emulated (accum->bits > 0): with promotion each 128-chunk of
// code products is summed that way and promoted (× the two scales, fp32 fused multiply-add into C);
// without, every product of scaled values goes into one limited sum over all of K. For ablations
// and the error table, not for speed: a vector path over 16 columns (bits <= 18), else scalar.
static int gemm_lowp_emulated(float *C, int ldc, const LowpOperand *A, const LowpOperand *B, int M, int N, int K,
                              int add, const LowpAccum *accum) {
    float *a = malloc(sizeof(float) * ((size_t)M * K + (size_t)N * K + 1));
    if (!a) return -1;
    float *b = a + (size_t)M * K;
    int promote = accum->promote;
#pragma omp parallel
    {
        lowp_unpack(A, M, 0, K, a, !promote);
        lowp_unpack(B, N, 0, K, b, !promote);
    }
    int chunk = promote ? LOWP_FP8_CHUNK : (K > 0 ? K : 1);
    if (kernels_cpu_avx512() && accum->bits <= 18) {
        // the vector path: B transposed (K × N) and the promotion's scales laid out per chunk
        int nch = (K + chunk - 1) / chunk;
        float *bt = malloc(sizeof(float) * ((size_t)K * N + (size_t)M * nch + (size_t)nch * N + 1));
        if (!bt) {
            free(a);
            return -1;
        }
        float *sa = bt + (size_t)K * N, *sbt = sa + (size_t)M * nch;
#pragma omp parallel for schedule(static)
        for (int k0 = 0; k0 < K; k0 += 64)  // in 64 × 64 blocks
            for (int j0 = 0; j0 < N; j0 += 64)
                for (int k = k0; k < K && k < k0 + 64; k++)
                    for (int j = j0; j < N && j < j0 + 64; j++) bt[(size_t)k * N + j] = b[(size_t)j * K + k];
        for (int ch = 0; ch < nch; ch++) {
            for (int i = 0; i < M; i++) sa[(size_t)i * nch + ch] = promote ? lowp_scale_of(A, i, ch * chunk) : 1.0f;
            for (int j = 0; j < N; j++) sbt[(size_t)ch * N + j] = promote ? lowp_scale_of(B, j, ch * chunk) : 1.0f;
        }
#pragma omp parallel
        {
            int nt = omp_get_num_threads(), t = omp_get_thread_num();
            emulated_rows_avx512(C, ldc, a, bt, N, K, (int)((long)M * t / nt), (int)((long)M * (t + 1) / nt), chunk,
                                 accum->bits, promote, sa, sbt, add);
        }
        free(bt);
        free(a);
        return 0;
    }
#pragma omp parallel for schedule(static)
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float *c = C + (size_t)i * ldc + j;
            if (!add) *c = 0.0f;
            for (int k0 = 0; k0 < K; k0 += chunk) {
                int k1 = k0 + chunk < K ? k0 + chunk : K;
                double acc = 0, t[32];
                for (int g = k0; g < k1; g += 32) {
                    int n = k1 - g < 32 ? k1 - g : 32;
                    for (int k = 0; k < n; k++) t[k] = (double)(a[(size_t)i * K + g + k] * b[(size_t)j * K + g + k]);
                    acc = accum_group(acc, t, n, accum->bits);
                }
                *c = promote ? fmaf((float)acc, lowp_scale_of(A, i, k0) * lowp_scale_of(B, j, k0), *c) : *c + (float)acc;
            }
        }
    free(a);
    return 0;
}

// Checks the formats and takes the paths that need no AVX512_BF16 team.
int gemm_lowp(float *C, int ldc, const LowpOperand *A, const LowpOperand *B, int M, int N, int K, int add) {
    if ((A->fmt == LOWP_BF16) != (B->fmt == LOWP_BF16)) return -1;
    if (M <= 0 || N <= 0) return 0;
    if (!kernels_cpu_avx512bf16()) return gemm_lowp_portable(C, ldc, A, B, M, N, K, add);
    if (omp_in_parallel()) return gemm_lowp_share(C, ldc, A, B, K, add, 0, M, 0, N);
    return gemm_lowp_scaled(C, ldc, (LowpOperand *)A, -1, NULL, (LowpOperand *)B, -1, NULL, M, N, K, add, NULL);
}

// The operand from element k0 of K on (k0 a multiple of the FP8 chunk: its scales shift with it).
static LowpOperand operand_from(const LowpOperand *o, int k0) {
    LowpOperand v = *o;
    v.data = o->trans ? o->data + (size_t)k0 * o->ld : o->data + k0;
    if (o->fmt != LOWP_BF16 && o->scale) v.scale = o->scale + (long)(k0 / LOWP_FP8_CHUNK) * o->scale_kstep;
    return v;
}

// Split K over the threads rather than C when K is long and C small — the weight-gradient GEMMs,
// whose K is the tokens: split by C, every thread would pack the whole of one token-long operand;
// split by K, each element of both is packed once. Each thread's slice of K (whole 256-element
// packing slices, so FP8 chunks stay whole) goes into its own block, thread 0's into C, and the
// blocks are then added to C in thread order: for a given thread count, the same bits every run.
#define SPLIT_K_MIN 1024
static int split_k_wanted(int M, int N, int K, int nt) {
    return nt > 1 && K >= SPLIT_K_MIN && K >= 4 * (M > N ? M : N);
}

int gemm_lowp_scaled(float *C, int ldc, LowpOperand *A, int scale_a_how, float *scale_a, LowpOperand *B,
                     int scale_b_how, float *scale_b, int M, int N, int K, int add, const LowpAccum *accum) {
    if ((A->fmt == LOWP_BF16) != (B->fmt == LOWP_BF16)) return -1;
    int emulate = accum && accum->bits > 0 && A->fmt != LOWP_BF16;
    int qa = scale_a_how >= 0 && A->fmt != LOWP_BF16, qb = scale_b_how >= 0 && B->fmt != LOWP_BF16;
    float *amax_a = qa ? amax_scratch(scale_a, M, K, scale_a_how) : NULL;
    float *amax_b = qb ? amax_scratch(scale_b, N, K, scale_b_how) : NULL;
    int failed = (qa && !amax_a) || (qb && !amax_b);
    if (qa && amax_a) scales_bind(A, scale_a, K, scale_a_how);
    if (qb && amax_b) scales_bind(B, scale_b, K, scale_b_how);
    if (!failed && (M <= 0 || N <= 0)) {  // nothing to multiply; the scales are still asked for
        if (qa) scales_team(A, scale_a, amax_a, M > 0 ? M : 0, K, scale_a_how);
        if (qb) scales_team(B, scale_b, amax_b, N > 0 ? N : 0, K, scale_b_how);
    } else if (!failed && (emulate || !kernels_cpu_avx512bf16())) {
        if (qa) scales_team(A, scale_a, amax_a, M, K, scale_a_how);
        if (qb) scales_team(B, scale_b, amax_b, N, K, scale_b_how);
        failed = (emulate ? gemm_lowp_emulated(C, ldc, A, B, M, N, K, add, accum)
                          : gemm_lowp_portable(C, ldc, A, B, M, N, K, add)) != 0;
    } else if (!failed) {
        int max_nt = omp_in_parallel() ? 1 : omp_get_max_threads();
        float *parts = split_k_wanted(M, N, K, max_nt) ? malloc(sizeof(float) * (max_nt - 1) * M * N) : NULL;
        // one team: both operands' scales (the worksharing loops end in barriers), then the product
        // split along the longer side of C, in units of a register tile (12 rows or 32 columns; AMX's
        // blocks: 32 either way): each
        // thread packs its own share of that side's operand and all of the other, so the operand
        // packed more than once is the smaller one
#pragma omp parallel reduction(| : failed) if (!omp_in_parallel())
        {
            if (qa) scales_team(A, scale_a, amax_a, M, K, scale_a_how);
            if (qb) scales_team(B, scale_b, amax_b, N, K, scale_b_how);
            int nt = omp_get_num_threads(), t = omp_get_thread_num(), by_rows = M > N;
            if (parts && nt == max_nt) {
                long slices = (K + 255) / 256, k0 = slices * t / nt * 256, k1 = slices * (t + 1) / nt * 256;
                if (k1 > K) k1 = K;
                if (k0 > k1) k0 = k1;
                LowpOperand a = operand_from(A, (int)k0), b = operand_from(B, (int)k0);
                float *dst = t == 0 ? C : parts + (size_t)(t - 1) * M * N;
                failed |= gemm_lowp_share(dst, t == 0 ? ldc : N, &a, &b, (int)(k1 - k0), t == 0 ? add : 0, 0, M, 0, N) != 0;
#pragma omp barrier
                int r0 = (int)((long)M * t / nt), r1 = (int)((long)M * (t + 1) / nt);
                for (int p = 1; p < nt; p++)
                    for (int i = r0; i < r1; i++) {
                        float *c = C + (size_t)i * ldc;
                        const float *q = parts + (size_t)(p - 1) * M * N + (size_t)i * N;
                        for (int j = 0; j < N; j++) c[j] += q[j];
                    }
            } else {
                int len = by_rows ? M : N, unit = by_rows && !kernels_cpu_amx() ? 12 : 32;
                long units = (len + unit - 1) / unit, lo = units * t / nt * unit, hi = units * (t + 1) / nt * unit;
                if (hi > len) hi = len;
                if (lo < hi)
                    failed |= (by_rows ? gemm_lowp_share(C, ldc, A, B, K, add, (int)lo, (int)hi, 0, N)
                                       : gemm_lowp_share(C, ldc, A, B, K, add, 0, M, (int)lo, (int)hi)) != 0;
            }
        }
        free(parts);
    }
    if (amax_a && amax_a != scale_a) free(amax_a);
    if (amax_b && amax_b != scale_b) free(amax_b);
    return failed ? -1 : 0;
}
