// Matrix products against weights in their stored type: the entry points, the choice of path
// (instruction set, few or many activation rows, threads) and the portable fallback.
//
// Threads: OpenMP over output features with a static split, omp_get_max_threads() of them, or
// one when called from inside a parallel region (the model runs attention heads in parallel and
// calls these per head).
//
// With AVX-512 every type, F32 included, goes through our own kernels: on the machine this was
// tuned on (Zen, 2 threads) OpenBLAS 0.3.21 only has its AVX2 sgemm for it, and the 12 × 32
// AVX-512 tile is ~1.6× faster at N = 64 (bench/bench_kernels prints both). The portable path
// widens panels of W and calls OpenBLAS, but only outside parallel regions, where its own
// threads do not compete with ours; inside one it stays in plain C.
#include <cblas.h>
#include <cpuid.h>
#include <oneapi/dnnl/dnnl.h>
#include <omp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "kernels/convert.h"
#include "kernels/kernels_cpu.h"
#include "kernels/matmul.h"

// The same for out = x · W, whose column tiles hold fewer activation rows in registers.
#define GEMV_NN_MAX_N 4
// Below this many weight elements (times rows of x) one thread is faster than a fork and join.
#define PARALLEL_MIN_WORK (1 << 16)
// Rows of W widened at a time by the portable fallback before calling sgemm.
#define FALLBACK_PANEL 64

// BF16 compute: the blocked products (matmul_nt and its shares: prefill, plain attention) take the
// AMX tiles, else the AVX512_BF16 register tiles of matmul_nt_lowp_avx512, for every number of
// rows — so that a prompt row's bits never depend on how many rows its chunk gave an expert (the
// engine's prefix cache reuses rows across chunks). Where the model packed a matrix's weight
// panels at load (AVX512_BF16 with VBMI), every product of it — prefill's, and the decode
// products (matmul_nt_invariant) of one row, a batch or a verification — takes the register tiles
// on those panels: one order for every N, the weights never re-packed per call. A view without
// panels (off a panel's first row; a matrix no model packed) takes the same tiles packing its
// weights per call (matmul_nt_bf16c; the same bits, too slow for a decode step's one row to be
// the model's path: measured on a Xeon, 2 threads, v3-108m, batch 1 / 16 / 64, per-call tiles gave
// BF16 0.83x / 1.33x / 1.83x the tokens/s of the dot-product kernel that decode then used, FP8
// 0.28x / 0.57x / 0.98x). On panels (Zen 4, the same model, taking turns with that kernel):
// batch 1 BF16 871-997 against 955-964 tokens/s, FP8 1,256-1,624 against 1,077-1,103; batch 64
// BF16 4,311-4,638 against 3,553-3,654, FP8 4,810-4,857 against 3,004-3,128.

static pthread_once_t isa_once = PTHREAD_ONCE_INIT;
static int cpu_has_avx512, cpu_has_bf16, cpu_has_vbmi, cpu_has_amx, use_avx512, use_bf16, use_amx;

// AMX-TILE and AMX-BF16 (CPUID leaf 7: EDX bits 24 and 22), and Linux's permission to use the
// tile data state (XFEATURE 18), which a process must ask for before its first tile instruction.
static int amx_usable(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d >> 24 & 1) || !(d >> 22 & 1)) return 0;
#if defined(__linux__) && defined(SYS_arch_prctl)
    enum { ARCH_GET_XCOMP_PERM = 0x1022, ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 };
    unsigned long perm = 0;
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return 0;
    return syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &perm) == 0 && (perm >> XFEATURE_XTILEDATA & 1);
#else
    return 0;
#endif
}

static int set_isa(const char *isa) {
    if (strcmp(isa, "scalar") == 0) use_avx512 = use_bf16 = use_amx = 0;
    else if (strcmp(isa, "avx512") == 0) use_avx512 = cpu_has_avx512, use_bf16 = use_amx = 0;
    else if (strcmp(isa, "avx512bf16") == 0) use_avx512 = cpu_has_avx512, use_bf16 = cpu_has_bf16, use_amx = 0;
    else if (strcmp(isa, "auto") == 0 || strcmp(isa, "amx") == 0)
        use_avx512 = cpu_has_avx512, use_bf16 = cpu_has_bf16, use_amx = cpu_has_amx;
    else return -1;
    return 0;
}

// OpenBLAS's pthreads build (Debian's default) stops its worker threads with this; a weak reference,
// absent from other BLAS builds.
extern void blas_thread_shutdown_(void) __attribute__((weak));

// OpenBLAS starts its worker threads when it is loaded, and they spin yielding the CPU for ~0.1 s
// before they sleep: on two cores half the machine taken from the first 100 ms of every process
// (`generate` on make demo's model: prefill 2.4x slower, decode ~9%; 85-95 K sched_yield calls in a
// 0.3 s run). With AVX512_BF16 every product dsv3 runs is its own kernel or a single-threaded
// sgemm inside its own OpenMP team, so OpenBLAS is set to one thread and its workers are stopped.
// The portable paths (no AVX-512; no BF16 for the low-precision GEMMs) keep OpenBLAS's threads:
// their large products are OpenBLAS's, multithreaded.
static void blas_threads_stop(void) {
    openblas_set_num_threads(1);
    if (blas_thread_shutdown_) blas_thread_shutdown_();
}

static void isa_detect(void) {
    __builtin_cpu_init();
    cpu_has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    cpu_has_bf16 = cpu_has_avx512 && __builtin_cpu_supports("avx512bf16");
    cpu_has_vbmi = __builtin_cpu_supports("avx512vbmi");
    cpu_has_amx = cpu_has_bf16 && amx_usable();
    const char *env = getenv("DSV3_ISA");  // (an unknown name is the command line's error to report)
    if (!env || set_isa(env)) set_isa("auto");
    if (use_bf16) blas_threads_stop();
}

// At load time (after OpenBLAS's own start, a library this one depends on), so that its workers
// are stopped before they spin through the model's loading.
__attribute__((constructor)) static void isa_at_load(void) { pthread_once(&isa_once, isa_detect); }

int kernels_cpu_avx512(void) {
    pthread_once(&isa_once, isa_detect);
    return use_avx512;
}

int kernels_cpu_avx512bf16(void) {
    pthread_once(&isa_once, isa_detect);
    return use_bf16;
}

int kernels_cpu_avx512bf16_vbmi(void) { return kernels_cpu_avx512bf16() && cpu_has_vbmi; }

int kernels_cpu_amx(void) {
    pthread_once(&isa_once, isa_detect);
    return use_amx;
}

int kernels_amx_present(void) {
    pthread_once(&isa_once, isa_detect);
    return cpu_has_amx;
}

// The fp32 products use AVX-512; the BF16 dot products and tiles serve only the products whose
// operands are rounded to BF16 anyway (gemm_lowp: mixed-precision training; `--compute bf16`).
const char *kernels_isa(void) {
    return kernels_cpu_amx()           ? "amx"
           : kernels_cpu_avx512bf16() ? "avx512bf16"
           : kernels_cpu_avx512()     ? "avx512"
                                      : "scalar";
}

int kernels_set_isa(const char *isa) {
    pthread_once(&isa_once, isa_detect);
    return set_isa(isa);
}

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

// A thread's scratch: one buffer per KernelsScratch slot.
typedef struct Scratch {
    float *data[KERNELS_SCRATCH_SLOTS];
    size_t cap[KERNELS_SCRATCH_SLOTS];
} Scratch;

static void scratch_free(void *p) {
    Scratch *s = p;
    for (int i = 0; i < KERNELS_SCRATCH_SLOTS; i++) free(s->data[i]);
    free(s);
}

static int scratch_key_ok;

static void scratch_init(void) { scratch_key_ok = pthread_key_create(&scratch_key, scratch_free) == 0; }

float *kernels_scratch(size_t n) { return kernels_scratch_slot(KERNELS_SCRATCH_OWN, n); }

float *kernels_scratch_slot(KernelsScratch slot, size_t n) {
    pthread_once(&scratch_once, scratch_init);
    if (!scratch_key_ok) return NULL;
    Scratch *s = pthread_getspecific(scratch_key);
    if (!s) {
        s = calloc(1, sizeof *s);
        if (!s) return NULL;
        if (pthread_setspecific(scratch_key, s) != 0) {
            free(s);
            return NULL;
        }
    }
    if (s->cap[slot] < n) {
        size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
        float *p = aligned_alloc(64, bytes);
        if (!p) return NULL;
        free(s->data[slot]);
        s->data[slot] = p;
        s->cap[slot] = n;
    }
    return s->data[slot];
}

static int check_dtype(const MatView *w) {
    return w->dtype == DT_F32 || w->dtype == DT_BF16 || w->dtype == DT_F16 ||
                   (w->dtype == DT_F8_E4M3 && w->block > 0 && w->scale_inv)
               ? 0
               : -1;
}

MatView matview_rows(const MatView *w, int r0, int n) {
    MatView v = *w;
    v.data = w->data ? (const char *)w->data + (size_t)r0 * w->cols * dtype_size(w->dtype) : NULL;  // (panels only)
    v.rows = n;
    v.row0 = w->row0 + r0;
    v.panels = w->panels && r0 % 32 == 0 ? (const char *)w->panels + (size_t)(r0 / 32) * weight_panel_bytes(w) : NULL;
    return v;
}

// Columns [c0, c0 + n) of row r, widened; FP8 as fp32(code) × scale with one rounding.
static void row_scalar(const MatView *w, int r, int c0, int n, float *out) {
    size_t base = (size_t)r * w->cols + c0;
    switch (w->dtype) {
    case DT_F32: memcpy(out, (const float *)w->data + base, sizeof(float) * n); break;
    case DT_BF16: {
        const uint16_t *p = (const uint16_t *)w->data + base;
        for (int i = 0; i < n; i++) out[i] = bf16_to_f32(p[i]);
        break;
    }
    case DT_F16: {
        const uint16_t *p = (const uint16_t *)w->data + base;
        for (int i = 0; i < n; i++) out[i] = f16_to_f32(p[i]);
        break;
    }
    default: {
        const uint8_t *p = (const uint8_t *)w->data + base;
        const float *sr = w->scale_inv + (size_t)((w->row0 + r) / w->block) * w->scale_cols;
        for (int i = 0; i < n; i++) out[i] = fp8_e4m3_to_f32(p[i]) * sr[(c0 + i) / w->block];
    }
    }
}

int matview_row_f32(const MatView *w, int r, float *out) {
    if (check_dtype(w)) return -1;
    if (kernels_cpu_avx512() && matview_avx512_ok(w)) matview_row_avx512(w, r, 0, w->cols, out);
    else row_scalar(w, r, 0, w->cols, out);
    return 0;
}

static int threads_for(double work) {
    if (omp_in_parallel() || work < PARALLEL_MIN_WORK) return 1;
    return omp_get_max_threads();
}

// [*begin, *end) of `units` units of `unit` items (capped at n) for thread t of nt.
static void split(int n, int unit, int t, int nt, int *begin, int *end) {
    long units = (n + unit - 1) / unit;
    long b = units * t / nt * unit, e = units * (t + 1) / nt * unit;
    *begin = (int)(b < n ? b : n);
    *end = (int)(e < n ? e : n);
}

static float dot(const float *a, const float *b, int n) {
    float s[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) s[j] += a[i + j] * b[i + j];
    for (; i < n; i++) s[0] += a[i] * b[i];
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

// Widens rows [r0, r0 + n) of w into buf[n][cols], in parallel when allowed.
static void rows_scalar(const MatView *w, int r0, int n, float *buf) {
    int nt = threads_for((double)n * w->cols);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int i = 0; i < n; i++) row_scalar(w, r0 + i, 0, w->cols, buf + (size_t)i * w->cols);
}

// Output features [r0, r1) of out[n * ldo ..] = x[n * ldx ..] · Wᵀ on this thread: one widened row
// at a time.
static int nt_scalar_rows(float *out, int ldo, const float *x, int ldx, const MatView *w, int N, int r0, int r1) {
    const int cols = w->cols;
    float *row = kernels_scratch(cols);
    if (!row) return -1;
    for (int r = r0; r < r1; r++) {
        row_scalar(w, r, 0, cols, row);
        for (int n = 0; n < N; n++) out[(size_t)n * ldo + r] = dot(row, x + (size_t)n * ldx, cols);
    }
    return 0;
}

// Columns [c0, c1) of out[n * ldo ..] (add: +=) x[n * ldx ..] · W on this thread: out[n] += Σ_r
// x[n][r] W[r], a row at a time.
static int nn_scalar_cols(float *out, int ldo, const float *x, int ldx, const MatView *w, int N, int c0, int c1,
                          int add) {
    const int rows = w->rows, nc = c1 - c0;
    float *row = kernels_scratch(nc);
    if (!row) return -1;
    if (!add)
        for (int n = 0; n < N; n++) memset(out + (size_t)n * ldo + c0, 0, sizeof(float) * nc);
    for (int r = 0; r < rows; r++) {
        row_scalar(w, r, c0, nc, row);
        for (int n = 0; n < N; n++) {
            float a = x[(size_t)n * ldx + r], *o = out + (size_t)n * ldo + c0;
            for (int c = 0; c < nc; c++) o[c] += a * row[c];
        }
    }
    return 0;
}

static int matmul_nt_scalar(float *out, const float *x, const MatView *w, int N) {
    const int rows = w->rows, cols = w->cols;
    if (w->dtype == DT_F32 && N > GEMV_MAX_N && !omp_in_parallel()) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, rows, cols, 1.0f, x, cols, w->data, cols, 0.0f, out,
                    rows);
        return 0;
    }
    if (N <= GEMV_MAX_N || omp_in_parallel()) {
        int nt = threads_for((double)N * rows * cols), failed = 0;
#pragma omp parallel num_threads(nt) if (nt > 1) reduction(| : failed)
        {
            int r0, r1;
            split(rows, 1, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
            failed |= nt_scalar_rows(out, rows, x, cols, w, N, r0, r1) != 0;
        }
        return failed ? -1 : 0;
    }
    float *buf = malloc(sizeof(float) * FALLBACK_PANEL * cols);
    if (!buf) return -1;
    for (int r0 = 0; r0 < rows; r0 += FALLBACK_PANEL) {
        int p = rows - r0 < FALLBACK_PANEL ? rows - r0 : FALLBACK_PANEL;
        rows_scalar(w, r0, p, buf);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, p, cols, 1.0f, x, cols, buf, cols, 0.0f, out + r0, rows);
    }
    free(buf);
    return 0;
}

static int matmul_nn_scalar(float *out, const float *x, const MatView *w, int N) {
    const int rows = w->rows, cols = w->cols;
    if (omp_in_parallel()) return nn_scalar_cols(out, cols, x, rows, w, N, 0, cols, 0);  // one thread, no BLAS
    if (w->dtype == DT_F32) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, cols, rows, 1.0f, x, rows, w->data, cols, 0.0f, out,
                    cols);
        return 0;
    }
    float *buf = malloc(sizeof(float) * FALLBACK_PANEL * cols);
    if (!buf) return -1;
    for (int k0 = 0; k0 < rows; k0 += FALLBACK_PANEL) {
        int p = rows - k0 < FALLBACK_PANEL ? rows - k0 : FALLBACK_PANEL;
        rows_scalar(w, k0, p, buf);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, cols, p, 1.0f, x + k0, rows, buf, cols,
                    k0 ? 1.0f : 0.0f, out, cols);
    }
    free(buf);
    return 0;
}

int weight_panels_only(void) { return kernels_cpu_avx512bf16_vbmi(); }

int weight_panels_tiles(void) { return kernels_cpu_avx512bf16_vbmi() && kernels_cpu_amx(); }

// Does a BF16-compute product of w read its panels (packed at load; the register tiles)?
int matmul_on_panels(const MatView *w) { return w->compute_bf16 && w->panels && w->cols > 0 && kernels_cpu_avx512bf16_vbmi(); }

// The kernel of a BF16-compute blocked product (see the top): the AMX tiles, the AVX512_BF16
// register tiles (on the view's panels where it has them), or matmul_bf16c (its portable path
// where there are no BF16 dot products).
typedef enum { BLOCKED_AMX, BLOCKED_PANELS, BLOCKED_REGISTER_TILES, BLOCKED_BF16C } BlockedBf16;
static BlockedBf16 blocked_bf16(const MatView *w) {
    return kernels_cpu_amx()           ? BLOCKED_AMX
           : matmul_on_panels(w)       ? BLOCKED_PANELS
           : kernels_cpu_avx512bf16()  ? BLOCKED_REGISTER_TILES
                                       : BLOCKED_BF16C;
}

int matmul_nt_part(float *out, const float *x, const MatView *w, int N, int r0, int r1) {
    if (check_dtype(w)) return -1;
    if (N <= 0 || r1 <= r0) return 0;
    if (w->compute_bf16 && w->cols > 0) {
        switch (blocked_bf16(w)) {
        case BLOCKED_AMX: {
            if (!w->panels || r0 % 32) return matmul_nt_amx(out, w->rows, x, w->cols, w, N, r0, r1);
            uint32_t *ap = (uint32_t *)kernels_scratch_slot(KERNELS_SCRATCH_SHARED, amx_panel_words(N, w->cols));
            if (!ap) return -1;
            amx_pair_rows(ap, x, w->cols, N, w->cols, 0, (N + 31) / 32 * 32);
            return matmul_nt_amx_rows(out, w->rows, ap, N, w, r0, r1);
        }
        case BLOCKED_PANELS: return matmul_nt_panels(out, w->rows, x, w->cols, w, N, r0, r1);
        case BLOCKED_REGISTER_TILES: return matmul_nt_lowp_avx512(out, w->rows, x, w->cols, w, N, r0, r1);
        default: return matmul_nt_bf16c(out, w->rows, x, w->cols, w, N, r0, r1);
        }
    }
    if (w->cols <= 0) {
        for (int n = 0; n < N; n++) memset(out + (size_t)n * w->rows + r0, 0, sizeof(float) * (r1 - r0));
        return 0;
    }
    if (!kernels_cpu_avx512() || !matview_avx512_ok(w)) return nt_scalar_rows(out, w->rows, x, w->cols, w, N, r0, r1);
    if (N <= GEMV_MAX_N) return gemv_nt_avx512(out, w->rows, x, w->cols, N, w, r0, r1);
    return gemm_avx512(out, x, w, N, 1, r0, r1);
}

int matmul_nt2_part(float *out_a, float *out_b, const float *x, const MatView *wa, const MatView *wb, int N) {
    if (check_dtype(wa) || check_dtype(wb)) return -1;
    if (wa->compute_bf16 && wb->compute_bf16 && wa->cols > 0 && wa->cols == wb->cols && wa->dtype == wb->dtype &&
        wa->rows % 32 == 0 && N > 0) {
        BlockedBf16 ka = blocked_bf16(wa), kb = blocked_bf16(wb);
        if (ka == BLOCKED_PANELS && kb == BLOCKED_PANELS)
            return matmul_nt2_panels(out_a, wa->rows, out_b, wb->rows, x, wa->cols, wa, wb, N);
        if (ka == BLOCKED_REGISTER_TILES && kb == BLOCKED_REGISTER_TILES)
            return matmul_nt2_lowp_avx512(out_a, wa->rows, out_b, wb->rows, x, wa->cols, wa, wb, N);
        if (ka == BLOCKED_AMX && kb == BLOCKED_AMX && wa->panels && wb->panels) {  // (the activations rounded once)
            uint32_t *rows = (uint32_t *)kernels_scratch_slot(KERNELS_SCRATCH_SHARED, amx_panel_words(N, wa->cols));
            if (!rows) return -1;
            amx_pair_rows(rows, x, wa->cols, N, wa->cols, 0, (N + 31) / 32 * 32);
            return matmul_nt_amx_rows(out_a, wa->rows, rows, N, wa, 0, wa->rows) ||
                           matmul_nt_amx_rows(out_b, wb->rows, rows, N, wb, 0, wb->rows)
                       ? -1
                       : 0;
        }
    }
    return matmul_nt_part(out_a, x, wa, N, 0, wa->rows) || matmul_nt_part(out_b, x, wb, N, 0, wb->rows) ? -1 : 0;
}

int matmul_nn_part(float *out, const float *x, const MatView *w, int N, int c0, int c1) {
    if (check_dtype(w)) return -1;
    if (N <= GEMV_NN_MAX_N || !kernels_cpu_avx512() || !matview_avx512_ok(w) || fp8_scales_need_split(w))
        return matmul_nn_invariant(out, w->cols, x, w->rows, w, N, c0, c1, 0);
    if (N <= 0 || c1 <= c0) return 0;
    if (w->rows <= 0) {
        for (int n = 0; n < N; n++) memset(out + (size_t)n * w->cols + c0, 0, sizeof(float) * (c1 - c0));
        return 0;
    }
    int a = w->dtype == DT_F8_E4M3 ? (c0 + 15) & ~15 : c0;  // as in matmul_nn_invariant
    if (a > c1) a = c1;
    if (a > c0 && nn_scalar_cols(out, w->cols, x, w->rows, w, N, c0, a, 0)) return -1;
    return gemm_avx512(out, x, w, N, 0, a, c1);
}

int matmul_nt_invariant(float *out, int ldo, const float *x, int ldx, const MatView *w, int N, int r0, int r1) {
    if (check_dtype(w)) return -1;
    if (N <= 0 || r1 <= r0) return 0;
    if (matmul_on_panels(w)) return matmul_nt_panels(out, ldo, x, ldx, w, N, r0, r1);
    if (w->compute_bf16 && w->cols > 0) return matmul_nt_bf16c(out, ldo, x, ldx, w, N, r0, r1);
    if (w->cols <= 0) {
        for (int n = 0; n < N; n++) memset(out + (size_t)n * ldo + r0, 0, sizeof(float) * (r1 - r0));
        return 0;
    }
    if (!kernels_cpu_avx512() || !matview_avx512_ok(w)) return nt_scalar_rows(out, ldo, x, ldx, w, N, r0, r1);
    return gemv_nt_avx512(out, ldo, x, ldx, N, w, r0, r1);
}

// Do the pieces run on panels as one list (matmul_nt_pieces_panels)?
static int pieces_on_panels(const NtPiece *pc, int n) {
    int panels = n > 0, fp8 = n > 0 && pc[0].w->dtype == DT_F8_E4M3;
    for (int i = 0; i < n; i++)
        panels &= matmul_on_panels(pc[i].w) && (pc[i].w->dtype == DT_F8_E4M3) == fp8 && pc[i].N <= PIECES_MAX_N &&
                  !(pc[i].w->panels_tiles && kernels_cpu_amx());
    return panels;
}

void matmul_nt_pieces_ahead(const NtPiece *pc, int n) {
    if (pieces_on_panels(pc, n)) matmul_nt_pieces_panels_ahead(pc, n);
}

int matmul_nt_pieces(const NtPiece *pc, int n) {
    for (int i = 0; i < n; i++)
        if (check_dtype(pc[i].w)) return -1;
    if (pieces_on_panels(pc, n)) return matmul_nt_pieces_panels(pc, n);
    int rc = 0;
    for (int i = 0; i < n; i++)
        rc |= matmul_nt_invariant(pc[i].out, pc[i].ldo, pc[i].x, pc[i].ldx, pc[i].w, pc[i].N, pc[i].r0, pc[i].r1);
    return rc ? -1 : 0;
}

int matmul_nn_invariant(float *out, int ldo, const float *x, int ldx, const MatView *w, int N, int c0, int c1,
                        int add) {
    if (check_dtype(w)) return -1;
    if (N <= 0 || c1 <= c0) return 0;
    if (w->rows <= 0) {
        if (!add)
            for (int n = 0; n < N; n++) memset(out + (size_t)n * ldo + c0, 0, sizeof(float) * (c1 - c0));
        return 0;
    }
    if (!kernels_cpu_avx512() || !matview_avx512_ok(w) || fp8_scales_need_split(w))
        return nn_scalar_cols(out, ldo, x, ldx, w, N, c0, c1, add);
    // The vector kernels take one FP8 scale per 16 columns, so a vector must not straddle a scale
    // block: they start on a multiple of 16 and a ragged head is done here.
    int a = w->dtype == DT_F8_E4M3 ? (c0 + 15) & ~15 : c0;
    if (a > c1) a = c1;
    if (a > c0 && nn_scalar_cols(out, ldo, x, ldx, w, N, c0, a, add)) return -1;
    return gemv_nn_avx512(out, ldo, x, ldx, N, w, a, c1, add);
}

int matmul_nt(float *out, const float *x, const MatView *w, int N) {
    if (check_dtype(w)) return -1;
    const int rows = w->rows, cols = w->cols;
    if (N <= 0 || rows <= 0) return 0;
    if (cols <= 0) {
        memset(out, 0, sizeof(float) * N * rows);
        return 0;
    }
    if (!w->compute_bf16 && (!kernels_cpu_avx512() || !matview_avx512_ok(w))) return matmul_nt_scalar(out, x, w, N);
    int nt = threads_for((double)N * rows * cols), unit = N <= GEMV_MAX_N && !matmul_on_panels(w) ? 4 : 32, failed = 0;
    if (w->compute_bf16 && blocked_bf16(w) == BLOCKED_AMX && w->panels) {
        // the threads round a share of the activations each, then multiply all of them by blocks
        // of 32 rows of w taken in turn (each rounding all of x for itself was ~4% of a prefill;
        // an even split of the rows left a thread waiting ~10% of a prefill: 160 rows are 5
        // blocks, and two vCPUs of a shared host do not run at the same speed). A view without
        // panels: matmul_nt_part's stored-row tiles below.
        const int npan = (N + 31) / 32, blocks = (rows + 31) / 32;
        uint32_t *ap = (uint32_t *)kernels_scratch_slot(KERNELS_SCRATCH_SHARED, amx_panel_words(N, cols));
        if (!ap) return -1;
#pragma omp parallel num_threads(nt) if (nt > 1) reduction(| : failed)
        {
            int p0, p1;
            split(npan, 1, omp_get_thread_num(), omp_get_num_threads(), &p0, &p1);
            amx_pair_rows(ap, x, cols, N, cols, 32 * p0, 32 * p1);
#pragma omp barrier
#pragma omp for schedule(dynamic, 1)
            for (int b = 0; b < blocks; b++)
                failed |= matmul_nt_amx_rows(out, rows, ap, N, w, 32 * b, 32 * b + 32 < rows ? 32 * b + 32 : rows) != 0;
        }
        return failed ? -1 : 0;
    }
#pragma omp parallel num_threads(nt) if (nt > 1) reduction(| : failed)
    {
        int r0, r1;
        split(rows, unit, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
        failed |= matmul_nt_part(out, x, w, N, r0, r1) != 0;
    }
    return failed ? -1 : 0;
}

int matmul_nn(float *out, const float *x, const MatView *w, int N) {
    if (check_dtype(w)) return -1;
    const int rows = w->rows, cols = w->cols;
    if (N <= 0 || cols <= 0) return 0;
    if (rows <= 0) {
        memset(out, 0, sizeof(float) * N * cols);
        return 0;
    }
    if (!kernels_cpu_avx512() || !matview_avx512_ok(w)) return matmul_nn_scalar(out, x, w, N);
    int nt = threads_for((double)N * rows * cols), unit = N <= GEMV_NN_MAX_N ? 64 : 32, failed = 0;
#pragma omp parallel num_threads(nt) if (nt > 1) reduction(| : failed)
    {
        int c0, c1;
        split(cols, unit, omp_get_thread_num(), omp_get_num_threads(), &c0, &c1);
        failed |= matmul_nn_part(out, x, w, N, c0, c1) != 0;
    }
    return failed ? -1 : 0;
}

// ---- fp32 GEMMs for the backward pass ----

// C = alpha op(A) op(B) + beta C: on the calling thread inside a parallel region, on oneDNN's
// choice of the OpenMP threads outside one. A zero-width K leaves beta C (cblas wants K ≥ 1 for
// some layouts).
//
// oneDNN's sgemm, not OpenBLAS's: it chooses its kernels from the CPU's instruction sets, where
// OpenBLAS 0.3.21 goes by the CPU model or OPENBLAS_CORETYPE — which some machines set to Haswell,
// since older OpenBLAS builds compute wrong results on them with their AVX-512 kernels. On the
// training products of bench_train (Zen 4 class, OPENBLAS_CORETYPE=Haswell) oneDNN runs 1.8-2.1x
// faster: 2048³ 304 against 195 GFLOP/s on 2 threads, the head's 256 × 256 × 4096 414 against 177,
// one attention head's 256 × 256 × 32 261 against 88. Should oneDNN refuse a call (out of memory
// for its scratch), OpenBLAS computes it.
void gemm_f32(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
              float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) C[(size_t)i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[(size_t)i * ldc + j];
        return;
    }
    if (dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', M, N, K, alpha, A, lda, B, ldb, beta, C, ldc) == dnnl_success) return;
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda,
                B, ldb, beta, C, ldc);
}

// OpenBLAS runs single-threaded under our OpenMP team: two pools of threads, OpenBLAS's and
// OpenMP's, would fight over the cores. The previous setting is restored afterwards.
int gemm_f32_serial_begin(void) {
    int n = openblas_get_num_threads();
    if (n != 1) openblas_set_num_threads(1);
    return n;
}
void gemm_f32_serial_end(int n) {
    if (n != 1) openblas_set_num_threads(n);
}

// gemm_f32's product on all the threads: oneDNN threads it itself, on the same OpenMP pool (its
// partition of the work is fixed by the shape and the thread count, and so are the bits; faster
// than one single-threaded call per block of C, e.g. the heads' 256 × 4096 × 256 331 against 226
// GFLOP/s). Should oneDNN refuse, static blocks of C rows (or columns, when C is wide and short),
// each one single-threaded gemm_f32 — again the same bits for the same thread count.
static void gemm_f32_parallel(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                              const float *B, int ldb, float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    int nt = omp_in_parallel() ? 1 : omp_get_max_threads();
    if ((double)M * N * (K > 0 ? K : 1) < (1 << 18) || K <= 0) nt = 1;  // too small to share
    if (nt > 1 && dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', M, N, K, alpha, A, lda, B, ldb, beta, C, ldc) == dnnl_success)
        return;
    int by_rows = M >= N || M >= 64 * nt, len = by_rows ? M : N;
    int saved = gemm_f32_serial_begin();
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int p = 0; p < nt; p++) {
        int q = (len + nt - 1) / nt, o = p * q, n = len - o < q ? len - o : q;
        if (n <= 0) continue;
        if (by_rows)
            gemm_f32(ta, tb, n, N, K, alpha, A + (ta ? (size_t)o : (size_t)o * lda), lda, B, ldb, beta,
                     C + (size_t)o * ldc, ldc);
        else
            gemm_f32(ta, tb, M, n, K, alpha, A, lda, B + (tb ? (size_t)o * ldb : (size_t)o), ldb, beta, C + o, ldc);
    }
    gemm_f32_serial_end(saved);
}

float *matview_f32_data(const MatView *w) { return w->dtype == DT_F32 ? (float *)w->data : NULL; }

MatView matview_f32(const float *data, int rows, int cols) {
    return (MatView){.dtype = DT_F32, .rows = rows, .cols = cols, .data = data};
}

int matmul_nt_gemm(float *out, const float *x, const MatView *w, int N) {
    if (w->dtype != DT_F32) return -1;
    if (N <= 0 || w->rows <= 0) return 0;
    gemm_f32_parallel(0, 1, N, w->rows, w->cols, 1.0f, x, w->cols, w->data, w->cols, 0.0f, out, w->rows);
    return 0;
}

int matmul_backward(float *dx, const MatView *dw, const float *dout, const float *x, const MatView *w, int N) {
    int rows = w->rows, cols = w->cols;
    float *dwd = matview_f32_data(dw);
    if (!dwd || check_dtype(w)) return -1;
    if (N <= 0) return 0;
    if (dx) {
        if (w->dtype == DT_F32) {
            gemm_f32_parallel(0, 0, N, cols, rows, 1.0f, dout, rows, w->data, cols, 1.0f, dx, cols);
        } else {  // widen through the forward kernels: tmp = dout · W, then accumulate
            float *tmp = malloc(sizeof(float) * (size_t)N * cols);
            if (!tmp || matmul_nn(tmp, dout, w, N)) {
                free(tmp);
                return -1;
            }
            for (size_t i = 0; i < (size_t)N * cols; i++) dx[i] += tmp[i];
            free(tmp);
        }
    }
    gemm_f32_parallel(1, 0, rows, cols, N, 1.0f, dout, rows, x, cols, 1.0f, dwd, cols);
    return 0;
}
