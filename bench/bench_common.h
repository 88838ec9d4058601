// Shared by the benchmark programs: wall-clock time, medians, the machine's read bandwidth
// measured the same way every time (the faster of two vectorised readers of a buffer far larger
// than the caches: bench_read_pass),
// and its GEMM peaks (fp32: OpenBLAS's or oneDNN's sgemm; gemm_lowp's BF16 product, the BF16
// dot-product unit).
#ifndef DSV3_BENCH_COMMON_H
#define DSV3_BENCH_COMMON_H

#include <cblas.h>
#include <immintrin.h>
#include <oneapi/dnnl/dnnl.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "kernels/gemm_lowp.h"
#include "kernels/matmul.h"

static inline double bench_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static inline int bench_cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static inline double bench_median(double *v, int n) {
    qsort(v, n, sizeof *v, bench_cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// The smallest and the largest of v[0 .. n) (n >= 1).
static inline void bench_range(const double *v, int n, double *lo, double *hi) {
    *lo = *hi = v[0];
    for (int i = 1; i < n; i++) *lo = v[i] < *lo ? v[i] : *lo, *hi = v[i] > *hi ? v[i] : *hi;
}

__attribute__((target("avx512f"))) static inline uint64_t bench_sum_avx512(const uint64_t *p, size_t n) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i + 32 <= n; i += 32) {
        a0 = _mm512_add_epi64(a0, _mm512_load_si512(p + i));
        a1 = _mm512_add_epi64(a1, _mm512_load_si512(p + i + 8));
        a2 = _mm512_add_epi64(a2, _mm512_load_si512(p + i + 16));
        a3 = _mm512_add_epi64(a3, _mm512_load_si512(p + i + 24));
    }
    return _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
}

static inline uint64_t bench_sum_scalar(const uint64_t *p, size_t n) {
    uint64_t s = 0;
    for (size_t i = 0; i < n; i++) s += p[i];
    return s;
}

// The same sum over four streams at once, each quarter of p[0 .. n) (n a multiple of 32), the line
// BENCH_STREAM_AHEAD bytes on in each requested as it goes: the decode kernels' way of reading
// weights (four panel streams a thread, matmul_nt_pieces), which on the Zen 5 VMs here reads
// ~20% faster than one stream a thread left to the hardware's prefetchers (69-77 against 58-63
// GB/s) — so a probe of one stream put the kernels at 103-127% of "the bandwidth".
#define BENCH_STREAM_AHEAD 1536
__attribute__((target("avx512f"))) static inline uint64_t bench_sum4_avx512(const uint64_t *p, size_t n) {
    const size_t q = n / 4 & ~(size_t)7;
    __m512i a[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    for (size_t i = 0; i < q; i += 8)
        for (int s = 0; s < 4; s++) {
            const uint64_t *at = p + s * q + i;
            _mm_prefetch((const char *)at + BENCH_STREAM_AHEAD, _MM_HINT_T0);
            a[s] = _mm512_add_epi64(a[s], _mm512_load_si512(at));
        }
    uint64_t s = _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a[0], a[1]), _mm512_add_epi64(a[2], a[3])));
    for (size_t i = 4 * q; i < n; i++) s += p[i];
    return s;
}

// Seconds for one read of buf (bytes, a multiple of 256, 64-byte aligned) by all threads, each its
// share as one stream (streams 1) or four (streams 4, AVX-512 only).
static inline double bench_read_pass_as(const void *buf, size_t bytes, int streams) {
    static volatile uint64_t sink;
    const uint64_t *p = buf;
    size_t n = bytes / 8;
    int avx = __builtin_cpu_supports("avx512f");
    double t0 = bench_now();
    uint64_t s = 0;
#pragma omp parallel reduction(+ : s)
    {
        int nt = omp_get_num_threads(), id = omp_get_thread_num();
        size_t chunk = (n / nt) & ~(size_t)31, b = chunk * id, e = id == nt - 1 ? n : b + chunk;
        s += !avx ? bench_sum_scalar(p + b, e - b)
             : streams == 4 ? bench_sum4_avx512(p + b, (e - b) & ~(size_t)31)
                            : bench_sum_avx512(p + b, (e - b) & ~(size_t)31);
    }
    sink += s;
    return bench_now() - t0;
}

// Seconds for one read of buf by all threads, the faster of the two readers: what the memory gives
// to a reader that asks well, the limit the kernels' figures are put against.
static inline double bench_read_pass(const void *buf, size_t bytes) {
    double one = bench_read_pass_as(buf, bytes, 1);
    if (!__builtin_cpu_supports("avx512f")) return one;
    double four = bench_read_pass_as(buf, bytes, 4);
    return four < one ? four : one;
}

// Median GB/s (1e9 bytes) of reading buf `reps` times (at most 32) after one warm-up pass.
static inline double bench_read_bandwidth_of(const void *buf, size_t bytes, int reps) {
    double t[32];
    if (reps > 32) reps = 32;
    bench_read_pass(buf, bytes);  // clock ramp, TLB
    for (int r = 0; r < reps; r++) t[r] = bytes / bench_read_pass(buf, bytes) / 1e9;
    return bench_median(t, reps);
}

// A buffer of `bytes` for the bandwidth probe, on huge pages where the kernel gives them, or NULL.
static inline void *bench_probe_alloc(size_t bytes) {
    void *buf = aligned_alloc(2 << 20, bytes);
    if (!buf) return NULL;
    madvise(buf, bytes, MADV_HUGEPAGE);
    memset(buf, 1, bytes);
    return buf;
}

// The BF16 dot-product unit's peak: every thread runs 24 independent chains of vdpbf16ps on registers
// (no memory traffic), 64 flops per instruction (16 lanes × 2 products × multiply-add). 0 when the
// CPU lacks AVX512_BF16.
__attribute__((target("avx512f,avx512bf16"))) static inline double bench_dpbf16_chains(long iters) {
    __m512 acc[24];
#pragma GCC unroll 24
    for (int i = 0; i < 24; i++) acc[i] = _mm512_set1_ps((float)i);
    __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = (__m512bh)_mm512_set1_epi32(0x3f7f3f7f);
    for (long it = 0; it < iters; it++)
#pragma GCC unroll 24
        for (int i = 0; i < 24; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
    float s = 0;
    for (int i = 0; i < 24; i++) s += _mm512_reduce_add_ps(acc[i]);
    return s;
}

// The AMX unit's peak: every thread runs four independent TDPBF16PS chains on tiles 0-3 from
// tiles 4-7 (no memory traffic), 16 · 16 · 32 · 2 flops each. Only where kernels_amx_present().
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} BenchTileConfig;

__attribute__((target("amx-tile,amx-bf16"))) static inline void bench_tdpbf16_chains(long iters) {
    BenchTileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    __asm__ volatile("ldtilecfg %0" ::"m"(cfg));  // (GCC 12's _tile_loadconfig names only 8 bytes as read)
    uint16_t ones[16 * 32] __attribute__((aligned(64)));  // BF16 1.0: sums grow by 32 per instruction, never inf
    for (int i = 0; i < 16 * 32; i++) ones[i] = 0x3f80;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, ones, 64);
    _tile_loadd(5, ones, 64);
    _tile_loadd(6, ones, 64);
    _tile_loadd(7, ones, 64);
    for (long it = 0; it < iters; it++) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_release();
}

static inline double bench_amx_unit_peak(void) {
    if (!kernels_amx_present()) return 0;
    const long iters = 1000000;
    double best = 0;
    for (int r = 0; r < 3; r++) {
        double t = bench_now();
        int nt = 1;
#pragma omp parallel
        {
#pragma omp single
            nt = omp_get_num_threads();
            bench_tdpbf16_chains(iters);
        }
        t = bench_now() - t;
        double g = 4.0 * 16 * 16 * 32 * 2 * iters * nt / t / 1e9;
        best = g > best ? g : best;
    }
    return best;
}

// The name of the unit bench_bf16_unit_peak measured.
static const char *bench_bf16_unit = "BF16 dot-product unit";

static inline double bench_dpbf16_unit_peak(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512bf16")) return 0;
    const long iters = 4000000;
    double best = 0;
    static volatile double sink;
    (void)sink;
    for (int r = 0; r < 3; r++) {
        double t = bench_now(), s = 0;
        int nt = 1;
#pragma omp parallel reduction(+ : s)
        {
#pragma omp single
            nt = omp_get_num_threads();
            s += bench_dpbf16_chains(iters);
        }
        t = bench_now() - t;
        sink = s;
        double g = 64.0 * 24 * iters * nt / t / 1e9;
        best = g > best ? g : best;
    }
    return best;
}

// The faster BF16 unit's peak on registers: AMX tiles where present, else the dot products.
static inline double bench_bf16_unit_peak(void) {
    double amx = bench_amx_unit_peak();
    if (amx > 0) {
        bench_bf16_unit = "AMX tile unit";
        return amx;
    }
    return bench_dpbf16_unit_peak();
}

// Sets OpenBLAS's own thread count (the kernels keep it at one on AVX512_BF16 CPUs: benchmarks of
// OpenBLAS threading a product itself raise it) and returns the previous one.
static inline int bench_blas_threads(int n) {
    int was = openblas_get_num_threads();
    openblas_set_num_threads(n);
    return was;
}

// Best GFLOP/s of an n×n×n fp32 GEMM over reps runs on all cores, the best of three ways: OpenBLAS
// threading its sgemm itself, oneDNN threading its own, and OpenMP threads each running gemm_f32
// (oneDNN's, single-threaded) on a block of rows, as the training code does.
static inline double bench_sgemm_peak(int n, int reps) {
    float *a = malloc(sizeof(float) * n * n), *b = malloc(sizeof(float) * n * n), *c = malloc(sizeof(float) * n * n);
    for (long i = 0; i < (long)n * n; i++) a[i] = b[i] = (float)((i % 17) - 8) * 0.01f;
    double best = 0;
    int nt = omp_get_max_threads(), blas_threads = bench_blas_threads(nt);
    for (int way = 0; way < 3; way++) {
        if (way == 1) openblas_set_num_threads(1);
        for (int r = 0; r < reps; r++) {
            double t0 = bench_now();
            if (way == 0) {
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
            } else if (way == 1) {
                dnnl_sgemm('N', 'T', n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
            } else {
#pragma omp parallel for schedule(static)
                for (int p = 0; p < nt; p++) {
                    int q = (n + nt - 1) / nt, o = p * q, m = n - o < q ? n - o : q;
                    gemm_f32(0, 1, m, n, n, 1.0f, a + (size_t)o * n, n, b, n, 0.0f, c + (size_t)o * n, n);
                }
            }
            double g = 2.0 * n * n * n / (bench_now() - t0) / 1e9;
            best = g > best ? g : best;
        }
    }
    openblas_set_num_threads(blas_threads);
    free(a), free(b), free(c);
    return best;
}

// Best GFLOP/s of an n×n×n gemm_lowp with BF16 operands over reps runs (its own threads).
static inline double bench_bf16_gemm_peak(int n, int reps) {
    float *a = malloc(sizeof(float) * n * n), *b = malloc(sizeof(float) * n * n), *c = malloc(sizeof(float) * n * n);
    for (long i = 0; i < (long)n * n; i++) a[i] = b[i] = (float)((i % 17) - 8) * 0.01f;
    LowpOperand A = {.data = a, .ld = n, .fmt = LOWP_BF16}, B = {.data = b, .ld = n, .fmt = LOWP_BF16};
    double best = 0;
    for (int r = 0; r < reps; r++) {
        double t0 = bench_now();
        gemm_lowp(c, n, &A, &B, n, n, n, 0);
        double g = 2.0 * n * n * n / (bench_now() - t0) / 1e9;
        best = g > best ? g : best;
    }
    free(a), free(b), free(c);
    return best;
}

#endif
