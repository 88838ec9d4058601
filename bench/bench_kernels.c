// Throughput of the matmul kernels against what the machine can do: its read bandwidth (a
// vectorised sum over 1 GiB, the faster of one and four streams a thread) and OpenBLAS sgemm
// (oneDNN's beside it). Decode (N = 1..8) is bandwidth-bound, so it is reported as GB/s of weights
// streamed and as a fraction of the read bandwidth; prefill (N = 64, 256) is compute-bound, so as
// GFLOP/s next to sgemm's. Every figure is the median of several runs;
// the weights cycle through a 1 GiB pool so that nothing is served from the caches.
#include <cblas.h>
#include <math.h>
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/team_barrier.h"
#include "bench_common.h"
#include "kernels/convert.h"
#include "kernels/gemm_lowp.h"
#include "kernels/matmul.h"

#define POOL_BYTES ((size_t)1 << 30)
#define RUNS 7

// onednn 0: OpenBLAS's sgemm (its own threads, as many as OpenMP's: the kernels keep OpenBLAS at
// one otherwise); 1: oneDNN's (gemm_f32's library, its own threads).
static double sgemm_gflops(int M, int onednn) {
    int blas_threads = bench_blas_threads(omp_get_max_threads());
    float *a = malloc(sizeof(float) * M * M), *b = malloc(sizeof(float) * M * M), *c = malloc(sizeof(float) * M * M);
    for (int i = 0; i < M * M; i++) a[i] = (float)(i % 13) * 0.01f, b[i] = (float)(i % 7) * 0.01f;
    double g[5];
    for (int r = -1; r < 5; r++) {
        double t = bench_now();
        if (onednn) dnnl_sgemm('N', 'T', M, M, M, 1.0f, a, M, b, M, 0.0f, c, M);
        else cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, M, M, 1.0f, a, M, b, M, 0.0f, c, M);
        t = bench_now() - t;
        if (r >= 0) g[r] = 2.0 * M * M * M / t / 1e9;
    }
    openblas_set_num_threads(blas_threads);
    free(a), free(b), free(c);
    return bench_median(g, 5);
}

// Views of consecutive matrices of one shape and type laid over the pool (as many as fit), each
// with its own valid contents: bf16/f16 values in [-1, 1], E4M3 codes other than NaN.
typedef struct Pool {
    MatView *views;
    int count;
    float *scale;
} Pool;

// Fills the first 16 MiB with weights distributed like trained ones (roughly normal) in the given
// type and repeats them over the pool (the addresses differ, so the repeats are not served from the
// caches). E4M3 codes are those of a block quantiser (amax ~ 4.5 sigma maps to 448), so subnormal
// codes are as rare as in released checkpoints.
static void pool_fill(void *pool, DType dt) {
    enum { CHUNK = 16 << 20 };
    uint32_t s = 12345;
    size_t n = CHUNK / dtype_size(dt);
    for (size_t i = 0; i < n; i++) {
        float v = 0;
        for (int k = 0; k < 4; k++) {
            s = s * 1664525u + 1013904223u;
            v += (float)(s >> 8) * 0x1p-24f - 0.5f;
        }
        v *= 1.7320508f;  // unit variance
        switch (dt) {
        case DT_F8_E4M3: ((uint8_t *)pool)[i] = fp8_e4m3_from_f32(v * (448.0f / 4.5f)); break;
        case DT_BF16: ((uint16_t *)pool)[i] = bf16_from_f32(v * 0.02f); break;
        case DT_F16: ((uint16_t *)pool)[i] = f16_from_f32(v * 0.02f); break;
        default: ((float *)pool)[i] = v * 0.02f; break;
        }
    }
#pragma omp parallel for schedule(static)
    for (size_t off = CHUNK; off < POOL_BYTES; off += CHUNK) memcpy((char *)pool + off, pool, CHUNK);
}

static Pool pool_views(void *pool, DType dt, int rows, int cols) {
    Pool p = {0};
    size_t bytes = (size_t)rows * cols * dtype_size(dt);
    p.count = (int)(POOL_BYTES / bytes);
    p.views = malloc(sizeof(MatView) * p.count);
    int sr = (rows + 127) / 128, sc = (cols + 127) / 128;
    p.scale = malloc(sizeof(float) * sr * sc);
    for (int i = 0; i < sr * sc; i++) p.scale[i] = 0.02f * 4.5f / 448.0f * (float)(1 + i % 3);
    for (int i = 0; i < p.count; i++)
        p.views[i] = (MatView){.dtype = dt, .rows = rows, .cols = cols, .data = (char *)pool + i * bytes,
                               .scale_inv = dt == DT_F8_E4M3 ? p.scale : NULL, .scale_cols = sc, .block = 128};
    return p;
}

// Median GB/s of weights streamed by matmul_nt with N activation rows, one pass over the pool per
// run, and the median ratio to a read of the pool timed just before each run (the machine's
// bandwidth drifts when it is shared, so the ratio compares like with like).
static double gemv_gbs(const Pool *p, const float *x, float *out, int N, double *ratio) {
    const MatView *v = &p->views[0];
    double bytes = (double)p->count * v->rows * v->cols * dtype_size(v->dtype), g[RUNS], q[RUNS];
    for (int r = -1; r < RUNS; r++) {
        double tr = bench_read_pass(p->views[0].data, POOL_BYTES);
        double t = bench_now();
        for (int i = 0; i < p->count; i++) matmul_nt(out, x, &p->views[i], N);
        t = bench_now() - t;
        if (r >= 0) g[r] = bytes / t / 1e9, q[r] = (bytes / t) / (POOL_BYTES / tr);
    }
    *ratio = bench_median(q, RUNS);
    return bench_median(g, RUNS);
}

// Median GB/s of weights streamed by the batch-invariant product (the engine's decode steps: an
// expert's rows split between the threads), N activation rows, one pass over the pool per run.
static double invariant_gbs(const Pool *p, const float *x, float *out, int N) {
    const MatView *v = &p->views[0];
    double bytes = (double)p->count * v->rows * v->cols * dtype_size(v->dtype), g[RUNS];
    for (int r = -1; r < RUNS; r++) {
        double t = bench_now();
#pragma omp parallel
        {
            int nt = omp_get_num_threads(), th = omp_get_thread_num();
            int r0 = v->rows * th / nt, r1 = v->rows * (th + 1) / nt;
            for (int i = 0; i < p->count; i++) matmul_nt_invariant(out, v->rows, x, v->cols, &p->views[i], N, r0, r1);
        }
        t = bench_now() - t;
        if (r >= 0) g[r] = bytes / t / 1e9;
    }
    return bench_median(g, RUNS);
}

// Median GFLOP/s of matmul_nt (or nn) with N activation rows, cycling through the pool.
static double gemm_gflops(const Pool *p, const float *x, float *out, int N, int nn, int runs) {
    const MatView *v = &p->views[0];
    double flops = 2.0 * N * v->rows * v->cols, g[16];
    for (int r = -1; r < runs; r++) {
        const MatView *w = &p->views[(r + 1) % p->count];
        double t = bench_now();
        if (nn) matmul_nn(out, x, w, N);
        else matmul_nt(out, x, w, N);
        t = bench_now() - t;
        if (r >= 0) g[r] = flops / t / 1e9;
    }
    return bench_median(g, runs);
}

static double sgemm_direct_gflops(const Pool *p, const float *x, float *out, int N, int runs, int onednn) {
    const MatView *v = &p->views[0];
    double flops = 2.0 * N * v->rows * v->cols, g[16];
    int blas_threads = bench_blas_threads(omp_get_max_threads());
    for (int r = -1; r < runs; r++) {
        const MatView *w = &p->views[(r + 1) % p->count];
        double t = bench_now();
        if (onednn)
            dnnl_sgemm('N', 'T', N, w->rows, w->cols, 1.0f, x, w->cols, w->data, w->cols, 0.0f, out, w->rows);
        else
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, w->rows, w->cols, 1.0f, x, w->cols, w->data,
                        w->cols, 0.0f, out, w->rows);
        t = bench_now() - t;
        if (r >= 0) g[r] = flops / t / 1e9;
    }
    openblas_set_num_threads(blas_threads);
    return bench_median(g, runs);
}

// The FP8 GEMM's accumulation error (the V3 report's §3.3.2 experiment): A (32 × K) and B (32 × K)
// standard normal, quantised to E4M3 in 1 × 128 tiles and 128 × 128 blocks; C = A·Bᵀ against fp64
// of the same FP8 values, as max |C − C64| / max |C64|, for fp32 accumulation with promotion (the
// default), a 14-bit accumulator promoted every 128 (the report's fix) and a 14-bit accumulator over
// all of K (the H800 without promotion).
static void fp8_accumulation_table(void) {
    printf("FP8 GEMM accumulation error, 32 x 32 outputs, normal operands, max|C - C64| / max|C64|:\n");
    printf("      K   fp32+promote   14-bit+promote   14-bit, no promotion\n");
    uint32_t s = 7;
    for (int K = 512; K <= 16384; K *= 2) {
        enum { M = 32 };
        float *a = malloc(sizeof(float) * M * K), *b = malloc(sizeof(float) * M * K), *c = malloc(sizeof(float) * M * M);
        float *sa = malloc(sizeof(float) * M * (K / 128 + 1)), *sb = malloc(sizeof(float) * (K / 128 + 1));
        for (long i = 0; i < (long)M * K; i++)
            for (int w = 0; w < 2; w++) {
                double u1, u2;  // Box-Muller
                s = s * 1664525u + 1013904223u, u1 = ((s >> 8) + 1) * 0x1p-24;
                s = s * 1664525u + 1013904223u, u2 = (s >> 8) * 0x1p-24;
                (w ? b : a)[i] = (float)(sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2));
            }
        LowpOperand A = {.data = a, .ld = K, .fmt = LOWP_E4M3}, B = {.data = b, .ld = K, .fmt = LOWP_E4M3};
        lowp_fp8_scales(&A, sa, M, K, LOWP_TILE_1x128);
        lowp_fp8_scales(&B, sb, M, K, LOWP_BLOCK_128x128);
        double ref[M * M], big = 0;
        for (int i = 0; i < M; i++)
            for (int j = 0; j < M; j++) {
                double r = 0;
                for (int k = 0; k < K; k++) {
                    float qa = lowp_value(LOWP_E4M3, a[(long)i * K + k], sa[i * (K / 128) + k / 128]);
                    float qb = lowp_value(LOWP_E4M3, b[(long)j * K + k], sb[k / 128]);
                    r += (double)qa * sa[i * (K / 128) + k / 128] * qb * sb[k / 128];
                }
                ref[i * M + j] = r, big = fmax(big, fabs(r));
            }
        double err[3];
        const LowpAccum modes[3] = {{0, 1}, {14, 1}, {14, 0}};
        for (int m = 0; m < 3; m++) {
            gemm_lowp_scaled(c, M, &A, -1, NULL, &B, -1, NULL, M, M, K, 0, &modes[m]);
            double e = 0;
            for (int i = 0; i < M * M; i++) e = fmax(e, fabs(c[i] - ref[i]));
            err[m] = e / big;
        }
        printf("  %5d   %12.2e   %14.2e   %20.2e\n", K, err[0], err[1], err[2]);
        free(a), free(b), free(c), free(sa), free(sb);
    }
}

// What a decode step pays besides streaming weights: the threads meeting between phases (OpenMP's
// barrier against base/team_barrier.h's, microseconds per meeting, 72,000 meetings in one
// parallel region), and the FP8 one-row product on one thread from cache, with BF16 compute and
// with fp32 compute (a 768 x 1024 matrix, 768 KB, against one activation row: how fast E4M3 codes
// are widened and multiplied when memory is not the limit).
// Median GB/s of codes of v's one-row product (768 x 1024) from cache, one thread.
static double one_row_gbs(const MatView *v, const float *x, float *out) {
    double g[RUNS];
    for (int r = -1; r < RUNS; r++) {
        double t = bench_now();
        for (int k = 0; k < 400; k++) matmul_nt_invariant(out, 768, x, 1024, v, 1, 0, 768);
        if (r >= 0) g[r] = 400.0 * 768 * 1024 / (bench_now() - t) / 1e9;
    }
    return bench_median(g, RUNS);
}

static void decode_step_costs(void *pool, const float *x, float *out) {
    enum { MEETINGS = 72000 };
    static TeamBarrier tb;
    double t0 = bench_now();
#pragma omp parallel
    for (int i = 0; i < MEETINGS; i++) {
#pragma omp barrier
    }
    double t1 = bench_now();
#pragma omp parallel
    for (int i = 0; i < MEETINGS; i++) team_barrier_wait(&tb, omp_get_num_threads());
    double t2 = bench_now();
    printf("threads meeting (%d threads): OpenMP barrier %.2f us, TeamBarrier %.2f us\n", omp_get_max_threads(),
           (t1 - t0) / MEETINGS * 1e6, (t2 - t1) / MEETINGS * 1e6);
    pool_fill(pool, DT_F8_E4M3);
    Pool p = pool_views(pool, DT_F8_E4M3, 768, 1024);
    MatView v = p.views[0];
    v.compute_bf16 = 1;
    void *panels = weight_panels_bytes(&v) ? aligned_alloc(64, (weight_panels_bytes(&v) + 63) / 64 * 64) : NULL;
    if (panels && weight_panels_pack(panels, &v) == 0) v.panels = panels;  // as a loaded model has them
    printf("FP8 one-row product, bf16 compute%s, one thread, 768x1024 in cache: %5.1f GB/s of codes\n",
           v.panels ? " on panels" : "", one_row_gbs(&v, x, out));
    // the exact path: each code times its scale in fp32, fp32 sums
    printf("FP8 one-row product, f32 compute, one thread, 768x1024 in cache: %5.1f GB/s of codes\n",
           one_row_gbs(&p.views[0], x, out));
    free(p.views), free(p.scale), free(panels);
}

// The BF16-compute products as a loaded model runs them (weight panels, matmul.h) on a routed
// expert's gate of the 108M model (256 x 512), N activation rows — a decode step's one, a batch's
// few per expert, a prompt's many — the panels of one matrix copied over the pool so that every
// product streams its weights from memory, the rows split between the threads as a decode step
// splits them: GB/s of the weights' stored bytes (and the share of the read bandwidth) and GFLOP/s;
// for one row also the same products handed over as lists of pieces (matmul_nt_pieces), as a
// decode phase hands over its several products.
static void panel_products(void *pool, const float *x, float *out, double bw) {
    const DType types[] = {DT_BF16, DT_F8_E4M3};
    enum { ROWS = 256, COLS = 512 };
    for (int ti = 0; ti < 2; ti++) {
        pool_fill(pool, types[ti]);
        Pool p = pool_views(pool, types[ti], ROWS, COLS);
        MatView w = p.views[0];
        w.compute_bf16 = 1;
        size_t pb = (weight_panels_bytes(&w) + 63) / 64 * 64;
        void *panels = pb ? aligned_alloc(64, POOL_BYTES) : NULL;
        if (!panels || weight_panels_pack(panels, &w)) {
            printf("BF16-compute products on weight panels: none on this CPU (AVX512_BF16 with VBMI)\n");
            free(panels), free(p.views), free(p.scale);
            return;
        }
        int count = (int)(POOL_BYTES / pb);
        for (int i = 1; i < count; i++) memcpy((char *)panels + (size_t)i * pb, panels, pb);
        double stored = (double)ROWS * COLS * dtype_size(types[ti]);
        static const int Ns[] = {1, 2, 4, 8, 16, 64};
        // on the register tiles, then (where the CPU has them) the AMX tiles: MatView.panels_tiles
        for (int k = 0; k < 12 && (k < 6 || weight_panels_tiles()); k++) {
            const int N = Ns[k % 6];
            w.panels_tiles = k >= 6;
            double g[RUNS];
            for (int r = -1; r < RUNS; r++) {
                double t = bench_now();
#pragma omp parallel
                {
                    int nt = omp_get_num_threads(), th = omp_get_thread_num();
                    int r0 = ROWS / 32 * th / nt * 32, r1 = ROWS / 32 * (th + 1) / nt * 32;
                    for (int i = 0; i < count; i++) {
                        MatView v = w;
                        v.panels = (char *)panels + (size_t)i * pb;
                        matmul_nt_invariant(out, ROWS, x, COLS, &v, N, r0, r1);
                    }
                }
                if (r >= 0) g[r] = count / (bench_now() - t);  // products per second
            }
            double per_s = bench_median(g, RUNS);
            printf("BF16-compute product on panels%s, %-7s N=%-2d %dx%d: %6.1f GB/s of weights (%3.0f%% of read "
                   "bandwidth), %6.1f GFLOP/s\n", k >= 6 ? ", AMX tiles" : "", dtype_name(types[ti]), N, ROWS, COLS,
                   per_s * stored / 1e9, 100 * per_s * stored / 1e9 / bw, per_s * 2.0 * N * ROWS * COLS / 1e9);
            if (k == 0) {  // one row, the same products as lists of 8 pieces (matmul_nt_pieces: one stream)
                enum { LIST = 8 };
                for (int r = -1; r < RUNS; r++) {
                    double t = bench_now();
#pragma omp parallel
                    {
                        int nt = omp_get_num_threads(), th = omp_get_thread_num();
                        int r0 = ROWS / 32 * th / nt * 32, r1 = ROWS / 32 * (th + 1) / nt * 32;
                        MatView vs[LIST];
                        NtPiece pc[LIST];
                        for (int i = 0; i + LIST <= count; i += LIST) {
                            for (int j = 0; j < LIST; j++) {
                                vs[j] = w;
                                vs[j].panels = (char *)panels + (size_t)(i + j) * pb;
                                pc[j] = (NtPiece){.w = &vs[j], .r0 = r0, .r1 = r1, .x = x, .ldx = COLS, .N = 1, .out = out, .ldo = ROWS};
                            }
                            matmul_nt_pieces(pc, LIST);
                        }
                    }
                    if (r >= 0) g[r] = count / LIST * LIST / (bench_now() - t);
                }
                per_s = bench_median(g, RUNS);
                printf("   the same as lists of %d pieces (one stream):              %6.1f GB/s of weights (%3.0f%% of read "
                       "bandwidth)\n", LIST, per_s * stored / 1e9, 100 * per_s * stored / 1e9 / bw);
            }
        }
        free(panels), free(p.views), free(p.scale);
    }
}

int main(void) {
    double t_start = bench_now();
    void *pool = aligned_alloc(64, POOL_BYTES);
    float *x = malloc(sizeof(float) * 256 * 8192), *out = malloc(sizeof(float) * 256 * 8192);
    if (!pool || !x || !out) {
        fprintf(stderr, "bench_kernels: out of memory\n");
        return 1;
    }
    for (int i = 0; i < 256 * 8192; i++) x[i] = (float)((i * 7919L) % 2001 - 1000) * 1e-3f;
    printf("kernels: %s, %d threads\n", kernels_isa(), omp_get_max_threads());

    pool_fill(pool, DT_F32);
    double bw = bench_read_bandwidth_of(pool, POOL_BYTES, RUNS);
    printf("read bandwidth (1 GiB, 1 or 4 streams/thread): %6.1f GB/s\n", bw);
    double peak = sgemm_gflops(2048, 0), peak_dnnl = sgemm_gflops(2048, 1);
    const char *core = getenv("OPENBLAS_CORETYPE");  // set on some machines (it chooses OpenBLAS's kernels)
    char what[80];
    snprintf(what, sizeof what, "sgemm 2048^3 (OpenBLAS%s%s):", core ? " " : "", core ? core : "");
    printf("%-44s%6.1f GFLOP/s\n", what, peak);
    printf("sgemm 2048^3 (oneDNN: training's fp32):     %6.1f GFLOP/s\n", peak_dnnl);
    if (peak_dnnl > peak) peak = peak_dnnl;  // "% of sgemm" below: of the faster library

    const DType dts[3] = {DT_BF16, DT_F8_E4M3, DT_F32};
    const int shapes[2][2] = {{4096, 4096}, {1408, 512}};
    for (int d = 0; d < 3; d++) {
        DType dt = dts[d];
        pool_fill(pool, dt);
        for (int s = 0; s < 2; s++) {
            Pool p = pool_views(pool, dt, shapes[s][0], shapes[s][1]);
            double q, g = gemv_gbs(&p, x, out, 1, &q);
            printf("matmul_nt %-7s N=1 %4dx%-4d (x%4d):     %6.1f GB/s  %3.0f%% of read bandwidth\n", dtype_name(dt),
                   shapes[s][0], shapes[s][1], p.count, g, 100 * q);
            free(p.views), free(p.scale);
        }
        Pool p = pool_views(pool, dt, 4096, 4096);
        if (dt != DT_F32) {
            for (int N = 2; N <= 8; N *= 2) {
                double q, g = gemv_gbs(&p, x, out, N, &q);
                printf("matmul_nt %-7s N=%d 4096x4096:              %6.1f GB/s  %3.0f%% of read bandwidth\n",
                       dtype_name(dt), N, g, 100 * q);
            }
        }
        for (int N = 64; N <= 256; N *= 4) {
            double g = gemm_gflops(&p, x, out, N, 0, N == 64 ? 9 : 5);
            printf("matmul_nt %-7s N=%-3d 4096x4096:            %6.1f GFLOP/s  %3.0f%% of sgemm\n", dtype_name(dt), N,
                   g, 100 * g / peak);
            if (dt == DT_F32)
                for (int lib = 0; lib < 2; lib++) {
                    g = sgemm_direct_gflops(&p, x, out, N, N == 64 ? 9 : 5, lib);
                    printf("%-15s N=%-3d 4096x4096:            %6.1f GFLOP/s  %3.0f%% of sgemm\n",
                           lib ? "dnnl_sgemm" : "cblas_sgemm", N, g, 100 * g / peak);
                }
        }
        if (dt == DT_BF16) {
            Pool e = pool_views(pool, dt, 256, 512);  // a routed expert's gate of the 108M model
            for (int N = 1; N <= 16; N *= 2) {
                double g = invariant_gbs(&e, x, out, N);
                printf("matmul_nt_invariant BF16 N=%-2d 256x512:   %6.1f GB/s  %3.0f%% of read bandwidth\n", N, g,
                       100 * g / bw);
            }
            free(e.views), free(e.scale);
            // one multiply-add (2 flops) per 2-byte weight: GFLOP/s and GB/s coincide
            double g = gemm_gflops(&p, x, out, 1, 1, 9);
            printf("matmul_nn BF16    N=1 4096x4096:              %6.1f GB/s  %3.0f%% of read bandwidth\n", g,
                   100 * g / bw);
        }
        free(p.views), free(p.scale);
    }
    panel_products(pool, x, out, bw);
    decode_step_costs(pool, x, out);
    fp8_accumulation_table();
    printf("bench_kernels total time:                   %6.1f s\n", bench_now() - t_start);
    free(pool), free(x), free(out);
    return 0;
}
