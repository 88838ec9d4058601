// The CPU backend: the table of backend.h over this folder's kernels. Threads are OpenMP's (the
// kernels split their work in fixed shares, so a result never depends on scheduling); OpenBLAS
// runs single-threaded under them; the ISA is chosen once from CPUID (matmul.c).
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
#include "kernels/convert.h"
#include "kernels/kernels_cpu.h"
#include "kernels/ops.h"

static int fail(Backend *be, const char *op, const char *what) {
    return err_set(&be->err, "%s backend: %s: %s", be->ops->name, op, what);
}

// The products fail only on a weight type they do not take, on FP8 blocks BF16 compute does not
// take, or on scratch memory.
static int product_failed(Backend *be, const char *op, const MatView *w) {
    if (w->dtype != DT_F32 && w->dtype != DT_BF16 && w->dtype != DT_F16 && w->dtype != DT_F8_E4M3)
        return err_set(&be->err, "%s backend: %s: a %s matrix (%d x %d) is not a weight type", be->ops->name, op,
                       dtype_name(w->dtype), w->rows, w->cols);
    if (w->dtype == DT_F8_E4M3 && w->compute_bf16 && (w->block != 128 || !w->scale_inv))
        return err_set(&be->err,
                       "%s backend: %s: BF16 compute takes FP8 weights in 128 x 128 blocks, this matrix (%d x %d) has "
                       "blocks of %d (use --compute f32)",
                       be->ops->name, op, w->rows, w->cols, w->block);
    return fail(be, op, "out of memory for kernel scratch");
}

static void *cpu_alloc(Backend *be, size_t bytes, const char *what) {
    size_t n = (bytes + 63) & ~(size_t)63;
    void *p = aligned_alloc(64, n ? n : 64);
    if (!p) {
        err_set(&be->err, "out of memory for %s (%.1f MB)", what, bytes / 1e6);
        return NULL;
    }
    memset(p, 0, n);
    return p;
}

static void cpu_free(Backend *be, void *p) {
    (void)be;
    free(p);
}

static int cpu_synchronize(Backend *be) {
    (void)be;
    return 0;
}

// C (M × N) (+)= A · Bᵀ for one of a linear layer's GEMMs under a recipe: A's and B's storage
// and scaling as the caller says, the FP8 scales computed from the current tensors.
// A is an activation or a gradient in all three, B too when pb (their scales powers of two under
// r->pow2_scales; a weight's stay fp32).
static int lowp_product(const LinearRecipe *r, float *C, int M, int N, int K, int add, const float *a, int lda, int ta,
                        LowpFormat fa, LowpScaling sa, const float *b, int ldb, int tb, LowpFormat fb, LowpScaling sb,
                        int pb) {
    LowpOperand A = {.data = a, .ld = lda, .trans = ta, .fmt = fa, .pow2 = r->pow2_scales},
                B = {.data = b, .ld = ldb, .trans = tb, .fmt = fb, .pow2 = pb && r->pow2_scales};
    int fp8 = fa != LOWP_BF16;
    float *scale_a = fp8 ? malloc(sizeof(float) * lowp_fp8_scale_count(M, K, sa)) : NULL;
    float *scale_b = fp8 ? malloc(sizeof(float) * lowp_fp8_scale_count(N, K, sb)) : NULL;
    int rc = fp8 && (!scale_a || !scale_b)
                 ? -1
                 : gemm_lowp_scaled(C, N, &A, fp8 ? (int)sa : -1, scale_a, &B, fp8 ? (int)sb : -1, scale_b, M, N, K, add,
                                    &r->accum);
    free(scale_a), free(scale_b);
    return rc;
}

static int recipe_weights(Backend *be, const char *op, const MatView *w) {
    if (w->dtype == DT_F32) return 0;
    char what[96];
    snprintf(what, sizeof what, "a training recipe needs F32 master weights, got %s", dtype_name(w->dtype));
    return fail(be, op, what);
}

// A linear layer's forward product under a recipe (NULL: the inference kernels).
static int linear_product(float *out, const float *x, const MatView *w, int N, const LinearRecipe *recipe) {
    if (!recipe) return matmul_nt(out, x, w, N);
    if (recipe->f32) return matmul_nt_gemm(out, x, w, N);
    LowpScaling act = recipe->tensor_scaling ? LOWP_TENSOR : LOWP_TILE_1x128;
    LowpScaling wgt = recipe->tensor_scaling ? LOWP_TENSOR : LOWP_BLOCK_128x128;
    // out (N × rows) = x (N × cols) · Wᵀ
    return lowp_product(recipe, out, N, w->rows, w->cols, 0, x, w->cols, 0, recipe->fmt, act, w->data, w->cols, 0,
                        recipe->fmt, wgt, 0);
}

static int cpu_matmul(Backend *be, float *out, const float *x, const MatView *w, int N, const LinearRecipe *recipe) {
    if (recipe && recipe_weights(be, "matmul", w)) return -1;
    return linear_product(out, x, w, N, recipe) ? product_failed(be, "matmul", w) : 0;
}

// A linear layer's backward products under a recipe (NULL: fp32 operands), dw an F32 view: -1 on
// a failed product (the caller reports it).
static int linear_backward(float *dx, const MatView *dw, const float *dout, const float *x, const MatView *w, int N,
                           const LinearRecipe *recipe) {
    if (!recipe || recipe->f32) return matmul_backward(dx, dw, dout, x, w, N);
    int rows = w->rows, cols = w->cols;
    LowpScaling act = recipe->tensor_scaling ? LOWP_TENSOR : LOWP_TILE_1x128;
    LowpScaling wgt = recipe->tensor_scaling ? LOWP_TENSOR : LOWP_BLOCK_128x128;
    // dx (N × cols) += dout (N × rows) · W: B = Wᵀ, element (c, r) = W[r][c]
    if (dx && lowp_product(recipe, dx, N, cols, rows, 1, dout, rows, 0, recipe->grad_fmt, act, w->data, cols, 1, recipe->fmt,
                           wgt, 0))
        return -1;
    // dw (rows × cols) += doutᵀ · x: both operands read along the tokens (128 x 1 tiles)
    return lowp_product(recipe, matview_f32_data(dw), rows, cols, N, 1, dout, rows, 1, recipe->grad_fmt, act, x, cols, 1,
                        recipe->fmt, act, 1);
}

static int cpu_matmul_backward(Backend *be, float *dx, const MatView *dw, const float *dout, const float *x,
                               const MatView *w, int N, const LinearRecipe *recipe) {
    if (!matview_f32_data(dw)) return fail(be, "matmul_backward", "the weight gradient is not an F32 view");
    if (recipe && recipe_weights(be, "matmul_backward", w)) return -1;
    return linear_backward(dx, dw, dout, x, w, N, recipe) ? product_failed(be, "matmul_backward", w) : 0;
}

static int cpu_embedding(Backend *be, float *out, const MatView *w, const int *idx, int n) {
    int failed = 0;
#pragma omp parallel for schedule(static) reduction(| : failed) if (n > 1)
    for (int i = 0; i < n; i++) failed |= matview_row_f32(w, idx[i], out + (size_t)i * w->cols) != 0;
    return failed ? product_failed(be, "embedding", w) : 0;
}

static int cpu_embedding_backward(Backend *be, const MatView *dw, const float *dout, const int *idx, int n) {
    float *g = matview_f32_data(dw);
    if (!g) return fail(be, "embedding_backward", "the gradient is not an F32 view");
    int d = dw->cols;
    for (int i = 0; i < n; i++) {  // in row order: a token may repeat
        float *dst = g + (size_t)idx[i] * d;
        const float *src = dout + (size_t)i * d;
        for (int j = 0; j < d; j++) dst[j] += src[j];
    }
    return 0;
}

static int cpu_rmsnorm(Backend *be, float *out, int ldo, float *rstd, const float *x, int ldx, const float *weight,
                       int N, int C, float eps) {
    (void)be;
    if (ldo == C && ldx == C) {
        rmsnorm_rows_forward(out, rstd, x, weight, N, C, eps);
        return 0;
    }
#pragma omp parallel for schedule(static) if (N > 64)
    for (int n = 0; n < N; n++)
        rmsnorm_forward(out + (size_t)n * ldo, rstd ? rstd + n : NULL, x + (size_t)n * ldx, weight, 1, C, eps);
    return 0;
}

static int cpu_rmsnorm_backward(Backend *be, float *dx, float *dweight, const float *dout, const float *x,
                                const float *weight, const float *rstd, int N, int C) {
    (void)be;
    rmsnorm_rows_backward(dx, dweight, dout, x, weight, rstd, N, C);
    return 0;
}

static int cpu_swiglu(Backend *be, float *h, const float *gate, const float *up, long n) {
    (void)be;
    swiglu_rows_forward(h, gate, up, n);
    return 0;
}

// The experts with rows, the most rows first (insertion: a few dozen experts); returns how many.
static int experts_by_rows(int *order, int n_experts, const int *off) {
    int active = 0;
    for (int e = 0; e < n_experts; e++)
        if (off[e + 1] > off[e]) order[active++] = e;
    for (int i = 1; i < active; i++)
        for (int j = i; j > 0 && off[order[j] + 1] - off[order[j]] > off[order[j - 1] + 1] - off[order[j - 1]]; j--) {
            int t = order[j];
            order[j] = order[j - 1], order[j - 1] = t;
        }
    return active;
}

// Expert e of the experts op, on the calling thread (its products on all the threads outside a
// parallel region): -1 on a failed product.
static int expert_forward(float *out, float *gate, float *up, float *h, const float *x, const MatView *const *w, int e,
                          const int *off, const LinearRecipe *recipe) {
    int n = off[e + 1] - off[e];
    size_t o = off[e];
    const MatView *wg = w[3 * e], *wu = w[3 * e + 1], *wd = w[3 * e + 2];
    long F = wg->rows, d = wg->cols;
    if (recipe) {
        if (linear_product(gate + o * F, x + o * d, wg, n, recipe) || linear_product(up + o * F, x + o * d, wu, n, recipe))
            return -1;
        swiglu_rows_forward(h + o * F, gate + o * F, up + o * F, (long)n * F);
        return linear_product(out + o * wd->rows, h + o * F, wd, n, recipe);
    }
    if (matmul_nt2_part(gate + o * F, up + o * F, x + o * d, wg, wu, n)) return -1;
    swiglu_forward(h + o * F, gate + o * F, up + o * F, (long)n * F);
    return matmul_nt_part(out + o * wd->rows, h + o * F, wd, n, 0, wd->rows);
}

// Expert e of the experts' backward, likewise.
static int expert_backward(float *dx, const MatView *const *dw, const float *dout, const float *x, const float *gate,
                           const float *up, const float *h, float *dgate, float *dup, float *dh, const MatView *const *w,
                           int e, const int *off, const LinearRecipe *recipe) {
    int n = off[e + 1] - off[e];
    size_t o = off[e];
    long F = w[3 * e]->rows, d = w[3 * e]->cols;
    memset(dh + o * F, 0, sizeof(float) * n * F);
    if (linear_backward(dh + o * F, dw[3 * e + 2], dout + o * d, h + o * F, w[3 * e + 2], n, recipe)) return -1;
    swiglu_rows_backward(dgate + o * F, dup + o * F, dh + o * F, gate + o * F, up + o * F, (long)n * F);
    return linear_backward(dx + o * d, dw[3 * e], dgate + o * F, x + o * d, w[3 * e], n, recipe) ||
                   linear_backward(dx + o * d, dw[3 * e + 1], dup + o * F, x + o * d, w[3 * e + 1], n, recipe)
               ? -1
               : 0;
}

// One call of the experts op or its backward: the arguments expert_run hands on.
typedef struct ExpertsCall {
    float *out, *gate, *up, *h, *dx, *dgate, *dup, *dh;  // forward: out, gate, up, h; backward: all
    const float *x, *dout, *gate_in, *up_in, *h_in;
    const MatView *const *w, *const *dw;
    const int *off;
    const LinearRecipe *recipe;
    int backward;
} ExpertsCall;

static int expert_run(const ExpertsCall *c, int e) {
    return c->backward ? expert_backward(c->dx, c->dw, c->dout, c->x, c->gate_in, c->up_in, c->h_in, c->dgate, c->dup,
                                         c->dh, c->w, e, c->off, c->recipe)
                       : expert_forward(c->out, c->gate, c->up, c->h, c->x, c->w, e, c->off, c->recipe);
}

// Whole experts handed out to the threads, the largest first, each expert's products and its
// SwiGLU on one thread — one fork per layer instead of one per product, each expert's rows packed
// once, the threads kept busy by experts of different sizes (prefill of 512 tokens, v3-108m:
// 102-103 -> 90-91 ms with BF16 weights, 107-108 -> 92-93 with FP8). A product's rows do not
// depend on the split of its output features, so the bits are those of the expert-by-expert loop.
// Training's products (a recipe) likewise: one expert's rows on one thread beat the same product
// split over both (a v3-10m-train bf16 step, forward and backward: 0.236-0.250 -> 0.227-0.239 s).
// A lone expert (a dense FFN, a shared expert) — or too little work — runs on the calling thread,
// its products on all the threads: not in a one-thread team, in which each product's own fork
// would be a nested region, new threads every time. Nonzero when an expert failed (*bad: which;
// -1 when memory ran out).
static int experts_run(const ExpertsCall *c, int n_experts, int *bad) {
    *bad = -1;
    int *order = malloc(sizeof(int) * (n_experts + 1));
    if (!order) return -1;
    int active = experts_by_rows(order, n_experts, c->off), failed = 0;
    const MatView *w0 = active ? c->w[3 * order[0]] : NULL;
    double work = active ? (double)(c->off[n_experts] - c->off[0]) * w0->rows * w0->cols : 0;
    if (active > 1 && work > (1 << 16)) {
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
        for (int i = 0; i < active; i++)
            if (expert_run(c, order[i])) {
#pragma omp atomic write
                *bad = order[i];
                failed = 1;
            }
    } else {
        for (int i = 0; i < active && !failed; i++)
            if (expert_run(c, order[i])) *bad = order[i], failed = 1;
    }
    free(order);
    return failed;
}

static int cpu_experts(Backend *be, float *out, float *gate, float *up, float *h, const float *x,
                       const MatView *const *w, int n_experts, const int *off, const LinearRecipe *recipe) {
    for (int e = 0; recipe && e < n_experts; e++)
        for (int j = 0; j < 3 && off[e + 1] > off[e]; j++)
            if (recipe_weights(be, "experts", w[3 * e + j])) return -1;
    ExpertsCall c = {.out = out, .gate = gate, .up = up, .h = h, .x = x, .w = w, .off = off, .recipe = recipe};
    int bad, rc = experts_run(&c, n_experts, &bad);
    if (rc && bad < 0) return fail(be, "experts", "out of memory");
    return rc ? product_failed(be, "experts", w[3 * bad]) : 0;
}

// The experts' backward the same way: expert e's rows on one thread (a lone expert on all of
// them), its products' and SwiGLU's backward in the order of the forward reversed.
static int cpu_experts_backward(Backend *be, float *dx, const MatView *const *dw, const float *dout, const float *x,
                                const float *gate, const float *up, const float *h, float *dgate, float *dup, float *dh,
                                const MatView *const *w, int n_experts, const int *off, const LinearRecipe *recipe) {
    for (int e = 0; e < n_experts; e++)
        for (int j = 0; j < 3 && off[e + 1] > off[e]; j++) {
            if (!matview_f32_data(dw[3 * e + j])) return fail(be, "experts_backward", "a weight gradient is not an F32 view");
            if (recipe && recipe_weights(be, "experts_backward", w[3 * e + j])) return -1;
        }
    ExpertsCall c = {.dx = dx, .dgate = dgate, .dup = dup, .dh = dh, .x = x, .dout = dout, .gate_in = gate, .up_in = up,
                     .h_in = h, .w = w, .dw = dw, .off = off, .recipe = recipe, .backward = 1};
    int bad, rc = experts_run(&c, n_experts, &bad);
    if (rc && bad < 0) return fail(be, "experts_backward", "out of memory");
    return rc ? product_failed(be, "experts_backward", w[3 * bad]) : 0;
}

static int cpu_rope(Backend *be, float *x, int N, int T, int heads, int stride, int r, const float *cos_t,
                    const float *sin_t) {
    (void)be;
    rope_rows_forward(x, N, T, heads, stride, r, cos_t, sin_t);
    return 0;
}

static int cpu_rope_backward(Backend *be, float *dx, int N, int T, int heads, int stride, int r, const float *cos_t,
                             const float *sin_t) {
    (void)be;
    rope_rows_backward(dx, N, T, heads, stride, r, cos_t, sin_t);
    return 0;
}

// Parts of 64K values, on all the threads: one thread's stores reach only part of the write
// bandwidth (the backward passes zero ~100 MB a v3-10m-train step).
static int cpu_zero(Backend *be, float *x, long n) {
    (void)be;
    enum { PART = 1 << 16 };
#pragma omp parallel for schedule(static) if (n > PART)
    for (long b = 0; b < n; b += PART) memset(x + b, 0, sizeof(float) * (n - b < PART ? n - b : PART));
    return 0;
}

static int cpu_add(Backend *be, float *out, const float *a, const float *b, long n) {
    (void)be;
#pragma omp parallel for schedule(static) if (n > 65536)
    for (long i = 0; i < n; i++) out[i] = a[i] + b[i];
    return 0;
}

static int cpu_latent_attention(Backend *be, const LatentAttention *a) {
    if (a->dtype != DT_F32 && a->dtype != DT_BF16) return fail(be, "latent_attention", "the cache is neither F32 nor BF16");
    return latent_attention_forward(a) ? fail(be, "latent_attention", "out of memory for kernel scratch") : 0;
}

static int cpu_to_bf16(Backend *be, uint16_t *dst, const float *src, long n) {
    (void)be;
    bf16_from_f32_n(dst, src, (size_t)n);
    return 0;
}

static int cpu_latent_attention_backward(Backend *be, const LatentAttention *a, const float *dout, float *dq,
                                         float *dkv, float *dkpe, float *dkpe_heads) {
    if (a->absorbed || a->pos0 != 0 || !a->kv_save || !a->probs_save || a->dtype != DT_F32)
        return fail(be, "latent_attention_backward", "needs a plain forward from position 0 that saved keys and probabilities");
    latent_attention_backward(a, dout, dq, dkv, dkpe, dkpe_heads);
    return 0;
}

static int cpu_gather_rows(Backend *be, float *out, const float *src, const int *rows, long n, int d) {
    (void)be;
#pragma omp parallel for schedule(static) if (n > 1)
    for (long i = 0; i < n; i++) memcpy(out + i * d, src + (size_t)rows[i] * d, sizeof(float) * d);
    return 0;
}

static int cpu_combine(Backend *be, float *y, const float *src, const int *slot, const float *weight, int N, int K,
                       int d) {
    (void)be;
#pragma omp parallel for schedule(static) if (N > 1)
    for (int t = 0; t < N; t++)
        for (int k = 0; k < K; k++)
            axpy_f32(y + (size_t)t * d, weight[(size_t)t * K + k], src + (size_t)slot[(size_t)t * K + k] * d, d);
    return 0;
}

static int cpu_combine_backward(Backend *be, float *dsrc, float *dweight, const float *dy, const float *src,
                                const int *slot, const float *weight, int N, int K, int d) {
    (void)be;
#pragma omp parallel for schedule(static) if (N > 1)
    for (int t = 0; t < N; t++)
        for (int k = 0; k < K; k++) {
            size_t sl = slot[(size_t)t * K + k];
            dweight[(size_t)t * K + k] =
                scale_and_dot_f32(dsrc + sl * d, weight[(size_t)t * K + k], dy + (size_t)t * d, src + sl * d, d);
        }
    return 0;
}

static int cpu_scatter_add_rows(Backend *be, float *dx, const float *dout, const int *rows, long n, int d) {
    // rows repeat (a token reaches K_r experts): each destination row takes its sources in the order
    // of i, so its additions are those of the loop over i whatever the thread. The sources are
    // listed per destination first (a counting sort over the n rows), then the threads split the
    // destinations: whole rows each, read and written once.
    int rmax = -1;
    for (long i = 0; i < n; i++) rmax = rows[i] > rmax ? rows[i] : rmax;
    long *start = calloc((size_t)rmax + 2, sizeof(long)), *src = malloc(sizeof(long) * (n > 0 ? n : 1));
    if (!start || !src) {
        free(start), free(src);
        return fail(be, "scatter_add_rows", "out of memory");
    }
    for (long i = 0; i < n; i++) start[rows[i] + 1]++;
    for (int r = 0; r <= rmax; r++) start[r + 1] += start[r];
    for (long i = 0; i < n; i++) src[start[rows[i]]++] = i;  // start[r] moves to the end of row r's list
#pragma omp parallel for schedule(static) if (n > 64)
    for (int r = 0; r <= rmax; r++)
        for (long j = r ? start[r - 1] : 0; j < start[r]; j++) {
            float *dst = dx + (size_t)r * d;
            const float *s = dout + src[j] * d;
#pragma omp simd
            for (int c = 0; c < d; c++) dst[c] += s[c];
        }
    free(start), free(src);
    return 0;
}

static int cpu_crossentropy(Backend *be, double *sum, float *losses, float *lse, const float *logits,
                            const int *targets, int N, int V) {
    (void)be;
    *sum = crossentropy_forward(losses, lse, logits, targets, N, V);
    return 0;
}

static int cpu_crossentropy_grad(Backend *be, double *sum, float *losses, float *lse, float *logits,
                                 const int *targets, int N, int V, float dloss) {
    (void)be;
    *sum = crossentropy_forward_backward(losses, lse, logits, targets, N, V, dloss);
    return 0;
}

// Chunks of the fixed-order sum: partial sums per chunk, added in chunk order, give the same bits
// however the chunks are scheduled. Within a chunk, element j goes to running sum j mod
// SUM_LANES (independent chains: one chain would wait on each addition's latency — with 8, one
// vector's, the sum ran at 20-27 GB/s from memory; 32, four vectors, 80-100), and the lanes are
// added in halves at the end. 16K values a chunk: an expert's matrices of a few tens of
// thousands of values still go to both threads. All the vectors' chunks are shared out at once
// (the gradient norm's ~260 tensors of v3-10m-train, one fork a tensor: 3.6 ms a step).
#define SUM_CHUNK 16384
#define SUM_LANES 32

static double sum_squares_chunk(const float *x, long n) {
    if (kernels_cpu_avx512()) return sum_squares_avx512(x, n);  // (SUM_LANES lanes too: the same bits)
    double lane[SUM_LANES] = {0};
    long j = 0;
    for (; j + SUM_LANES <= n; j += SUM_LANES)
        for (int k = 0; k < SUM_LANES; k++) lane[k] += (double)x[j + k] * x[j + k];
    for (int k = 0; j < n; j++, k++) lane[k] += (double)x[j] * x[j];
    for (int w = SUM_LANES / 2; w > 0; w /= 2)
        for (int k = 0; k < w; k++) lane[k] += lane[k + w];
    return lane[0];
}

// Vectors cut into parts of `size` elements, every vector's parts in one list (vector by vector,
// in order) for the threads to share out at once: part c is elements [at[c], end[c]) of vector
// of[c]. The length of vector i is at (const char *)len + i · stride bytes (an array of longs, or a
// field of an array of structs).
typedef struct Parts {
    long count;
    int *of;         // (count) each part's vector
    long *at, *end;  // (count) its elements there
} Parts;

static void parts_free(Parts *ps) { free(ps->of), free(ps->at), free(ps->end); }

static int parts_list(Backend *be, const char *op, Parts *ps, const long *len, size_t stride, int count, long size) {
#define PART_LEN(i) (*(const long *)((const char *)len + (size_t)(i) * stride))
    ps->count = 0;
    for (int i = 0; i < count; i++) ps->count += (PART_LEN(i) + size - 1) / size;
    size_t k = ps->count > 0 ? (size_t)ps->count : 1;
    ps->of = malloc(sizeof(int) * k), ps->at = malloc(sizeof(long) * k), ps->end = malloc(sizeof(long) * k);
    if (!ps->of || !ps->at || !ps->end) {
        parts_free(ps);
        return fail(be, op, "out of memory");
    }
    for (int i = 0, c = 0; i < count; i++)
        for (long b = 0, n = PART_LEN(i); b < n; b += size, c++)
            ps->of[c] = i, ps->at[c] = b, ps->end[c] = b + size < n ? b + size : n;
    return 0;
#undef PART_LEN
}

static int cpu_sum_squares(Backend *be, double *sums, const float *const *x, const long *n, int count) {
    Parts ps;
    if (parts_list(be, "sum_squares", &ps, n, sizeof *n, count, SUM_CHUNK)) return -1;
    double *part = malloc(sizeof(double) * (ps.count > 0 ? ps.count : 1));  // (ps.count) each chunk's sum
    if (!part) {
        parts_free(&ps);
        return fail(be, "sum_squares", "out of memory");
    }
#pragma omp parallel for schedule(static) if (ps.count > 1)  // (a norm's or a bias's few values: no fork)
    for (long c = 0; c < ps.count; c++) part[c] = sum_squares_chunk(x[ps.of[c]] + ps.at[c], ps.end[c] - ps.at[c]);
    for (int i = 0; i < count; i++) sums[i] = 0;
    for (long c = 0; c < ps.count; c++) sums[ps.of[c]] += part[c];  // (each vector's chunks in order)
    free(part);
    parts_free(&ps);
    return 0;
}

static inline void adamw_elem(float *p, float *m, float *v, float g, float shrink, const AdamWStep *s) {
    float gj = g * s->clip;
    *m = s->beta1 * *m + (1.0f - s->beta1) * gj;
    *v = s->beta2 * *v + (1.0f - s->beta2) * gj * gj;
    float mh = *m / s->bc1, vh = *v / s->bc2;
    *p = *p * shrink - s->lr * mh / (sqrtf(vh) + s->eps);
}

// Parameters [b, e) of tensor t, moments fp32 (stream: written around the cache, adamw_avx512).
static void adamw_part_f32(const AdamWTensor *t, long b, long e, int stream, const AdamWStep *s) {
    float *m = (float *)t->m + b, *v = (float *)t->v + b;
    if (kernels_cpu_avx512()) {
        adamw_avx512(t->p + b, m, v, t->g + b, e - b, s->lr, s->beta1, s->beta2, s->eps, s->bc1, s->bc2, s->clip,
                     t->shrink, stream);
        return;
    }
    for (long j = 0; j < e - b; j++) adamw_elem(t->p + b + j, m + j, v + j, t->g[b + j], t->shrink, s);
}

// Parameters [b, e) of tensor t, moments BF16: widened into fp32 a piece at a time, updated, rounded
// back.
static void adamw_part_bf16(const AdamWTensor *t, long b, long e, const AdamWStep *s) {
    enum { PIECE = 512 };
    uint16_t *mb = t->m, *vb = t->v;
    for (long c = b; c < e; c += PIECE) {
        float mf[PIECE], vf[PIECE];
        long k = e - c < PIECE ? e - c : PIECE;
        bf16_to_f32_n(mf, mb + c, (size_t)k);
        bf16_to_f32_n(vf, vb + c, (size_t)k);
        if (kernels_cpu_avx512())
            adamw_avx512(t->p + c, mf, vf, t->g + c, k, s->lr, s->beta1, s->beta2, s->eps, s->bc1, s->bc2, s->clip,
                         t->shrink, 0);
        else
            for (long j = 0; j < k; j++) adamw_elem(t->p + c + j, mf + j, vf + j, t->g[c + j], t->shrink, s);
        bf16_from_f32_n(mb + c, mf, (size_t)k);
        bf16_from_f32_n(vb + c, vf, (size_t)k);
    }
}

// All the tensors' parts of ADAMW_PART parameters shared out at once (one fork a step, not one a
// tensor: v3-10m-train's ~260 tensors). Each parameter's update depends on nothing else, so the
// bits are those of any split. A step over more parameters than ADAMW_STREAM_MIN writes them with
// non-temporal stores (they outgrow the cache; the next step reads them from memory either way).
#define ADAMW_PART 16384
#define ADAMW_STREAM_MIN (1L << 22)

static int cpu_adamw(Backend *be, const AdamWTensor *t, int count, const AdamWStep *s) {
    Parts ps;
    if (parts_list(be, "adamw", &ps, count > 0 ? &t[0].n : NULL, sizeof *t, count, ADAMW_PART)) return -1;
    long total = 0;
    for (int i = 0; i < count; i++) total += t[i].n;
    int stream = total >= ADAMW_STREAM_MIN;
#pragma omp parallel for schedule(static) if (ps.count > 1)
    for (long c = 0; c < ps.count; c++) {
        if (s->moments_bf16) adamw_part_bf16(&t[ps.of[c]], ps.at[c], ps.end[c], s);
        else adamw_part_f32(&t[ps.of[c]], ps.at[c], ps.end[c], stream, s);
    }
    parts_free(&ps);
    return 0;
}

static int cpu_fp8_save(Backend *be, uint8_t *codes, float *scales, const float *x, long rows, int cols, int pow2) {
    (void)be;
    lowp_fp8_save_rows(codes, scales, x, rows, cols, pow2);
    return 0;
}

static int cpu_fp8_restore(Backend *be, float *x, const uint8_t *codes, const float *scales, long rows, int cols) {
    (void)be;
    lowp_fp8_restore_rows(x, codes, scales, rows, cols);
    return 0;
}

// ---- Timing (BackendOps.profile): a second table whose entries time the first's ----

// (an operation found by its name's address: the string literal TIMED names it with)
static void timed(Backend *be, BackendOpKind kind, const char *op, double t0, double flops) {
    BackendProfile *p = be->profile;
    double dt = omp_get_wtime() - t0;
    p->seconds[kind] += dt;
    p->flops[kind] += flops;
    p->calls[kind]++;
    int i = 0;
    while (i < p->n_ops && p->op_name[i] != op) i++;
    if (i == p->n_ops) {
        if (i == BACKEND_PROFILE_OPS) return;  // (the table outgrew the profile: still timed by kind)
        p->op_name[p->n_ops++] = op;
    }
    p->op_seconds[i] += dt;
    p->op_calls[i]++;
}

static BackendOpKind products_kind(const LinearRecipe *recipe) {
    return recipe && !recipe->f32 ? BACKEND_LOWP_PRODUCTS : BACKEND_F32_PRODUCTS;
}

// The FLOPs of the experts op (backward: twice, its input and weight gradients)
static double experts_flops(const MatView *const *w, int n_experts, const int *off, int backward) {
    double f = 0;
    for (int e = 0; e < n_experts; e++)
        if (off[e + 1] > off[e])
            f += 2.0 * (off[e + 1] - off[e]) * (w[3 * e]->rows * (double)w[3 * e]->cols * 2 +
                                                 w[3 * e + 2]->rows * (double)w[3 * e + 2]->cols);
    return backward ? 2 * f : f;
}

// The FLOPs of the attention core (backward: twice, four products of the forward's two sizes): each
// row's scores and weighted sum over the positions it sees — plain: qk + v multiply-adds a head and
// position; absorbed: the latent twice and the rotary part, W_UK and W_UV not counted.
static double attention_flops(const LatentAttention *a, int backward) {
    double seen = (double)a->B * a->T * (a->pos0 + (a->T + 1) / 2.0);  // Σ over rows of the positions seen
    double per = a->absorbed ? 2.0 * a->kv_lora + a->rope : a->nope + a->rope + a->v;
    return 2.0 * a->H * per * seen * (backward ? 2 : 1);
}

// timed_NAME: cpu_NAME's call timed as `kind`, with `flops`
#define TIMED(name, kind, flops, params, args)          \
    static int timed_##name params {                    \
        double t0 = omp_get_wtime();                    \
        int rc = cpu_##name args;                       \
        timed(be, kind, #name, t0, flops);              \
        return rc;                                      \
    }
TIMED(matmul, products_kind(recipe), 2.0 * N * w->rows * w->cols,
      (Backend *be, float *out, const float *x, const MatView *w, int N, const LinearRecipe *recipe),
      (be, out, x, w, N, recipe))
TIMED(matmul_backward, products_kind(recipe), (dx ? 4.0 : 2.0) * N * w->rows * w->cols,
      (Backend *be, float *dx, const MatView *dw, const float *dout, const float *x, const MatView *w, int N,
       const LinearRecipe *recipe),
      (be, dx, dw, dout, x, w, N, recipe))
TIMED(experts, products_kind(recipe), experts_flops(w, n_experts, off, 0),
      (Backend *be, float *out, float *gate, float *up, float *h, const float *x, const MatView *const *w,
       int n_experts, const int *off, const LinearRecipe *recipe),
      (be, out, gate, up, h, x, w, n_experts, off, recipe))
TIMED(experts_backward, products_kind(recipe), experts_flops(w, n_experts, off, 1),
      (Backend *be, float *dx, const MatView *const *dw, const float *dout, const float *x, const float *gate,
       const float *up, const float *h, float *dgate, float *dup, float *dh, const MatView *const *w, int n_experts,
       const int *off, const LinearRecipe *recipe),
      (be, dx, dw, dout, x, gate, up, h, dgate, dup, dh, w, n_experts, off, recipe))
TIMED(embedding, BACKEND_OTHER, 0, (Backend *be, float *out, const MatView *w, const int *idx, int n),
      (be, out, w, idx, n))
TIMED(embedding_backward, BACKEND_OTHER, 0, (Backend *be, const MatView *dw, const float *dout, const int *idx, int n),
      (be, dw, dout, idx, n))
TIMED(rmsnorm, BACKEND_OTHER, 0,
      (Backend *be, float *out, int ldo, float *rstd, const float *x, int ldx, const float *weight, int N, int C,
       float eps),
      (be, out, ldo, rstd, x, ldx, weight, N, C, eps))
TIMED(rmsnorm_backward, BACKEND_OTHER, 0,
      (Backend *be, float *dx, float *dweight, const float *dout, const float *x, const float *weight,
       const float *rstd, int N, int C),
      (be, dx, dweight, dout, x, weight, rstd, N, C))
TIMED(swiglu, BACKEND_OTHER, 0, (Backend *be, float *h, const float *gate, const float *up, long n),
      (be, h, gate, up, n))
TIMED(rope, BACKEND_OTHER, 0,
      (Backend *be, float *x, int N, int T, int heads, int stride, int r, const float *cos_t, const float *sin_t),
      (be, x, N, T, heads, stride, r, cos_t, sin_t))
TIMED(rope_backward, BACKEND_OTHER, 0,
      (Backend *be, float *dx, int N, int T, int heads, int stride, int r, const float *cos_t, const float *sin_t),
      (be, dx, N, T, heads, stride, r, cos_t, sin_t))
TIMED(add, BACKEND_OTHER, 0, (Backend *be, float *out, const float *a, const float *b, long n), (be, out, a, b, n))
TIMED(zero, BACKEND_OTHER, 0, (Backend *be, float *x, long n), (be, x, n))
TIMED(to_bf16, BACKEND_OTHER, 0, (Backend *be, uint16_t *dst, const float *src, long n), (be, dst, src, n))
TIMED(fp8_save, BACKEND_OTHER, 0,
      (Backend *be, uint8_t *codes, float *scales, const float *x, long rows, int cols, int pow2),
      (be, codes, scales, x, rows, cols, pow2))
TIMED(fp8_restore, BACKEND_OTHER, 0,
      (Backend *be, float *x, const uint8_t *codes, const float *scales, long rows, int cols),
      (be, x, codes, scales, rows, cols))
TIMED(latent_attention, BACKEND_ATTENTION, attention_flops(a, 0), (Backend *be, const LatentAttention *a), (be, a))
TIMED(latent_attention_backward, BACKEND_ATTENTION, attention_flops(a, 1),
      (Backend *be, const LatentAttention *a, const float *dout, float *dq, float *dkv, float *dkpe,
       float *dkpe_heads),
      (be, a, dout, dq, dkv, dkpe, dkpe_heads))
TIMED(gather_rows, BACKEND_OTHER, 0, (Backend *be, float *out, const float *src, const int *rows, long n, int d),
      (be, out, src, rows, n, d))
TIMED(combine, BACKEND_OTHER, 0,
      (Backend *be, float *y, const float *src, const int *slot, const float *weight, int N, int K, int d),
      (be, y, src, slot, weight, N, K, d))
TIMED(combine_backward, BACKEND_OTHER, 0,
      (Backend *be, float *dsrc, float *dweight, const float *dy, const float *src, const int *slot,
       const float *weight, int N, int K, int d),
      (be, dsrc, dweight, dy, src, slot, weight, N, K, d))
TIMED(scatter_add_rows, BACKEND_OTHER, 0, (Backend *be, float *dx, const float *dout, const int *rows, long n, int d),
      (be, dx, dout, rows, n, d))
TIMED(crossentropy, BACKEND_LOSS, 0,
      (Backend *be, double *sum, float *losses, float *lse, const float *logits, const int *targets, int N, int V),
      (be, sum, losses, lse, logits, targets, N, V))
TIMED(crossentropy_grad, BACKEND_LOSS, 0,
      (Backend *be, double *sum, float *losses, float *lse, float *logits, const int *targets, int N, int V,
       float dloss),
      (be, sum, losses, lse, logits, targets, N, V, dloss))
TIMED(sum_squares, BACKEND_OPTIMIZER, 0, (Backend *be, double *sums, const float *const *x, const long *n, int count),
      (be, sums, x, n, count))
TIMED(adamw, BACKEND_OPTIMIZER, 0,
      (Backend *be, const AdamWTensor *t, int count, const AdamWStep *s), (be, t, count, s))
#undef TIMED

static void cpu_profile(Backend *be, BackendProfile *p);

// The table, its operations those named P##op: cpu_ (the kernels) or timed_ (the same, timed).
#define CPU_OPS(P)                                                                                                     \
    .name = "cpu", .alloc = cpu_alloc, .free = cpu_free, .synchronize = cpu_synchronize,                               \
    .profile = cpu_profile,                                                                                            \
    .matmul = P##matmul, .matmul_backward = P##matmul_backward, .experts = P##experts,                                 \
    .experts_backward = P##experts_backward, .embedding = P##embedding, .embedding_backward = P##embedding_backward,   \
    .rmsnorm = P##rmsnorm, .rmsnorm_backward = P##rmsnorm_backward, .swiglu = P##swiglu,                               \
    .rope = P##rope, .rope_backward = P##rope_backward, .add = P##add,                                                 \
    .zero = P##zero, .latent_attention = P##latent_attention, .latent_attention_backward = P##latent_attention_backward, \
    .to_bf16 = P##to_bf16, .gather_rows = P##gather_rows, .combine = P##combine,                                       \
    .combine_backward = P##combine_backward, .scatter_add_rows = P##scatter_add_rows, .crossentropy = P##crossentropy, \
    .crossentropy_grad = P##crossentropy_grad, .sum_squares = P##sum_squares, .adamw = P##adamw,                       \
    .fp8_save = P##fp8_save, .fp8_restore = P##fp8_restore

static const BackendOps cpu_ops = {CPU_OPS(cpu_)};
static const BackendOps cpu_timed_ops = {CPU_OPS(timed_)};
#undef CPU_OPS

static void cpu_profile(Backend *be, BackendProfile *p) {
    be->profile = p;
    be->ops = p ? &cpu_timed_ops : &cpu_ops;
}

Backend *backend_cpu(void) {
    // one per thread that asks: its err is written by the operations that thread issues (and its
    // timing, once asked for, stays on for every user of that thread's backend until turned off)
    static _Thread_local Backend be;
    be.ops = be.profile ? &cpu_timed_ops : &cpu_ops;
    return &be;
}
