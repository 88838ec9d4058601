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

static inline float elem(const LowpOperand *o, int i, int k) {
    return o->trans ? o->data[(long)k * o->ld + i] : o->data[(long)i * o->ld + k];
}

static inline float op_scale(const LowpOperand *o, int i, int k) {
    return o->scale[(long)(i / o->scale_rows) * o->scale_ld + (long)(k / LOWP_FP8_CHUNK) * o->scale_kstep];
}

// amax (rows × ceil(K / 128)) of each 1 × 128 tile, threads over rows, vector loops inside.
static void tile_amax(float *amax, const LowpOperand *op, int rows, int K) {
    int kc = (K + LOWP_FP8_CHUNK - 1) / LOWP_FP8_CHUNK;
    const float *d = op->data;
    long ld = op->ld;
    if (!op->trans) {
#pragma omp parallel for schedule(static) if ((long)rows * K > (1 << 16))
        for (int i = 0; i < rows; i++)
            for (int c = 0; c < kc; c++) {
                const float *x = d + i * ld + (long)c * LOWP_FP8_CHUNK;
                int n = K - c * LOWP_FP8_CHUNK < LOWP_FP8_CHUNK ? K - c * LOWP_FP8_CHUNK : LOWP_FP8_CHUNK;
                float m = 0.0f;
#pragma omp simd reduction(max : m)
                for (int k = 0; k < n; k++) m = fabsf(x[k]) > m ? fabsf(x[k]) : m;
                amax[(long)i * kc + c] = m;
            }
        return;
    }
    // transposed: element (i, k) at d[k * ld + i]; a chunk's rows k sweep a range of i at a time
#pragma omp parallel if ((long)rows * K > (1 << 16))
    {
        int nt = omp_get_num_threads(), t = omp_get_thread_num();
        int i0 = (int)((long)rows * t / nt), i1 = (int)((long)rows * (t + 1) / nt);
        float *m = malloc(sizeof(float) * (i1 - i0 + 1));
        for (int c = 0; c < kc && m; c++) {
            for (int i = i0; i < i1; i++) m[i - i0] = 0.0f;
            int k1 = (c + 1) * LOWP_FP8_CHUNK < K ? (c + 1) * LOWP_FP8_CHUNK : K;
            for (int k = c * LOWP_FP8_CHUNK; k < k1; k++) {
                const float *x = d + k * ld;
#pragma omp simd
                for (int i = i0; i < i1; i++) m[i - i0] = fabsf(x[i]) > m[i - i0] ? fabsf(x[i]) : m[i - i0];
            }
            for (int i = i0; i < i1; i++) amax[(long)i * kc + c] = m[i - i0];
        }
        if (!m)  // out of memory: the slow way, same result
            for (int c = 0; c < kc; c++)
                for (int i = i0; i < i1; i++) {
                    float v = 0.0f;
                    for (int k = c * LOWP_FP8_CHUNK; k < K && k < (c + 1) * LOWP_FP8_CHUNK; k++)
                        v = fabsf(d[k * ld + i]) > v ? fabsf(d[k * ld + i]) : v;
                    amax[(long)i * kc + c] = v;
                }
        free(m);
    }
}

int lowp_fp8_scales(LowpOperand *op, float *scale, int rows, int K, LowpScaling how) {
    long n = lowp_fp8_scale_count(rows, K, how);
    int kc = (K + LOWP_FP8_CHUNK - 1) / LOWP_FP8_CHUNK;
    op->scale = scale;
    op->scale_rows = how == LOWP_TILE_1x128 ? 1 : how == LOWP_BLOCK_128x128 ? LOWP_FP8_CHUNK : INT_MAX;
    op->scale_ld = how == LOWP_TENSOR ? 0 : kc;
    op->scale_kstep = how == LOWP_TENSOR ? 0 : 1;
    float *amax = how == LOWP_TILE_1x128 ? scale : malloc(sizeof(float) * ((size_t)rows * kc + 1));
    if (!amax) return -1;
    tile_amax(amax, op, rows, K);
    if (how != LOWP_TILE_1x128) {  // the tiles' maxima folded into blocks or one value
        for (long c = 0; c < n; c++) scale[c] = 0.0f;
        for (int i = 0; i < rows; i++)
            for (int c = 0; c < kc; c++) {
                float *cell = scale + (long)(i / op->scale_rows) * op->scale_ld + (long)c * op->scale_kstep;
                if (amax[(long)i * kc + c] > *cell) *cell = amax[(long)i * kc + c];
            }
        free(amax);
    }
    float mx = lowp_fp8_max(op->fmt);
    for (long c = 0; c < n; c++) scale[c] = fmaxf(scale[c], 1e-4f) / mx;
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

const char *gemm_lowp_isa(void) { return kernels_cpu_avx512bf16() ? "avx512bf16" : "portable"; }

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
        for (int i = 0; i < M; i++)
            for (int k = 0; k < kc; k++)
                a[(size_t)i * kc + k] = lowp_value(A->fmt, elem(A, i, k0 + k), fp8 ? op_scale(A, i, k0 + k) : 1.0f);
        for (int j = 0; j < N; j++)
            for (int k = 0; k < kc; k++)
                b[(size_t)j * kc + k] = lowp_value(B->fmt, elem(B, j, k0 + k), fp8 ? op_scale(B, j, k0 + k) : 1.0f);
        if (!fp8) {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, kc, 1.0f, a, kc, b, kc, 1.0f, C, ldc);
            continue;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, kc, 1.0f, a, kc, b, kc, 0.0f, t, N);
        for (int i = 0; i < M; i++) {
            float sa = op_scale(A, i, k0);
            for (int j = 0; j < N; j++) {
                float *c = C + (size_t)i * ldc + j;
                *c = fmaf(t[(size_t)i * N + j], sa * op_scale(B, j, k0), *c);
            }
        }
    }
    free(a);
    return 0;
}

int gemm_lowp(float *C, int ldc, const LowpOperand *A, const LowpOperand *B, int M, int N, int K, int add) {
    if ((A->fmt == LOWP_BF16) != (B->fmt == LOWP_BF16)) return -1;
    if (M <= 0 || N <= 0) return 0;
    if (!kernels_cpu_avx512bf16()) return gemm_lowp_portable(C, ldc, A, B, M, N, K, add);
    if (omp_in_parallel()) return gemm_lowp_avx512bf16(C, ldc, A, B, M, N, K, add, 0, N);
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        // features in units of one register panel (32), split evenly
        int nt = omp_get_num_threads(), t = omp_get_thread_num();
        long units = (N + 31) / 32, lo = units * t / nt * 32, hi = units * (t + 1) / nt * 32;
        if (hi > N) hi = N;
        if (lo < hi) failed |= gemm_lowp_avx512bf16(C, ldc, A, B, M, N, K, add, (int)lo, (int)hi) != 0;
    }
    return failed ? -1 : 0;
}
