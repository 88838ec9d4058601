// Each training op's backward against central finite differences of its forward, in fp32: the
// scalar is a fixed random projection Σ r·y summed in double, inputs are O(1), and the step 1e-3
// keeps the truncation error near 1e-6 while the rounding noise stays near 1e-4 of the gradient.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "base/rng.h"
#include "kernels/ops.h"
#include "model/moe.h"
#include "kernels/matmul.h"
#include "model/layer.h"
#include "test.h"

static Rng rng;

static float *randn(size_t n, float scale) {
    float *p = malloc(sizeof(float) * n);
    for (size_t i = 0; i < n; i++) p[i] = scale * rng_normal(&rng);
    return p;
}

static float *zeros(size_t n) { return calloc(n, sizeof(float)); }

static double dot(const float *a, const float *b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}

// Perturbs every x[j] by ±eps, recomputes loss(ctx), and compares with analytic[j]: the largest
// error must stay within tol × the largest |analytic|. Returns that ratio.
static double fd_ratio(float *x, size_t n, const float *analytic, double (*loss)(void *), void *ctx) {
    const float eps = 1e-3f;
    double worst = 0, scale = 1e-12;
    for (size_t j = 0; j < n; j++) {
        float x0 = x[j];
        x[j] = x0 + eps;
        double lp = loss(ctx);
        x[j] = x0 - eps;
        double lm = loss(ctx);
        x[j] = x0;
        double fd = (lp - lm) / (2.0 * eps);
        worst = fmax(worst, fabs(fd - analytic[j]));
        scale = fmax(scale, fabs(analytic[j]));
    }
    return worst / scale;
}

#define FD_TOL 3e-3

// ---- linear ----
typedef struct {
    int N, C, OC;
    float *x, *w, *y, *r;
} LinCtx;

static double lin_loss(void *p) {
    LinCtx *c = p;
    MatView w = matview_f32(c->w, c->OC, c->C);
    matmul_nt(c->y, c->x, &w, c->N);
    return dot(c->y, c->r, (size_t)c->N * c->OC);
}

TEST(test_train_op_linear) {
    rng_seed(&rng, 1);
    LinCtx c = {5, 7, 4, randn(35, 1), randn(28, 1), zeros(20), randn(20, 1)};
    float *dx = randn(35, 1), *dw = zeros(28), *dx0 = malloc(sizeof(float) * 35);
    memcpy(dx0, dx, sizeof(float) * 35);
    MatView w = matview_f32(c.w, c.OC, c.C), gw = matview_f32(dw, c.OC, c.C);
    matmul_backward(dx, &gw, c.r, c.x, &w, c.N);
    for (int i = 0; i < 35; i++) dx[i] -= dx0[i];  // the backward accumulates onto what was there
    CHECK(fd_ratio(c.x, 35, dx, lin_loss, &c) < FD_TOL);
    CHECK(fd_ratio(c.w, 28, dw, lin_loss, &c) < FD_TOL);
    free(c.x), free(c.w), free(c.y), free(c.r), free(dx), free(dw), free(dx0);
}

// ---- RMSNorm (threaded rows) ----
typedef struct {
    int N, C;
    float *x, *w, *y, *rstd, *r;
} NormCtx;

static double norm_loss(void *p) {
    NormCtx *c = p;
    rmsnorm_rows_forward(c->y, c->rstd, c->x, c->w, c->N, c->C, 1e-6f);
    return dot(c->y, c->r, (size_t)c->N * c->C);
}

TEST(test_train_op_rmsnorm) {
    rng_seed(&rng, 2);
    int N = 130, C = 6;  // more rows than one chunk of the fixed-order reduction
    NormCtx c = {N, C, randn(N * C, 1), randn(C, 1), zeros(N * C), zeros(N), randn(N * C, 1)};
    float *dx = zeros(N * C), *dw = zeros(C);
    norm_loss(&c);
    rmsnorm_rows_backward(dx, dw, c.r, c.x, c.w, c.rstd, N, C);
    CHECK(fd_ratio(c.x, N * C, dx, norm_loss, &c) < FD_TOL);
    CHECK(fd_ratio(c.w, C, dw, norm_loss, &c) < FD_TOL);
    free(c.x), free(c.w), free(c.y), free(c.rstd), free(c.r), free(dx), free(dw);
}

// RMSNorm's forward on the AVX-512 path and the portable one against fp64 (widths around the
// 16-lane vectors, a hidden size), and a row's bits whatever rows come with it.
TEST(test_rmsnorm_forward_against_fp64) {
    rng_seed(&rng, 3);
    const int widths[] = {1, 6, 16, 37, 512};
    for (int isa = 0; isa < 2; isa++) {
        CHECK(kernels_set_isa(isa ? "scalar" : "auto") == 0);
        for (int k = 0; k < 5; k++) {
            int N = 5, C = widths[k];
            float *x = randn((size_t)N * C, 2), *w = randn(C, 1), *y = zeros((size_t)N * C), *rstd = zeros(N);
            float *one = zeros(C), r1;
            rmsnorm_forward(y, rstd, x, w, N, C, 1e-6f);
            for (int n = 0; n < N; n++) {
                double ss = 0;
                for (int i = 0; i < C; i++) ss += (double)x[n * C + i] * x[n * C + i];
                double r = 1 / sqrt(ss / C + 1e-6);
                CHECK_MSG(fabs(rstd[n] - r) <= 1e-6 * r, "C %d row %d: rstd %.9g, fp64 %.9g", C, n, rstd[n], r);
                for (int i = 0; i < C; i++) {
                    double want = x[n * C + i] * r * w[i];
                    CHECK_MSG(fabs(y[n * C + i] - want) <= 2e-6 * fabs(want) + 1e-30, "C %d row %d col %d: %.9g, fp64 %.9g",
                              C, n, i, y[n * C + i], want);
                }
                rmsnorm_forward(one, &r1, x + (size_t)n * C, w, 1, C, 1e-6f);  // the row alone
                CHECK(r1 == rstd[n] && memcmp(one, y + (size_t)n * C, sizeof(float) * C) == 0);
            }
            free(x), free(w), free(y), free(rstd), free(one);
        }
    }
    CHECK(kernels_set_isa("auto") == 0);
}

// RMSNorm's backward over several rows gives each row's dx, and dweight's sums, bit for bit as one
// row at a time in row order does (a row's arithmetic is its own; dweight adds the rows in order) —
// on both paths, for widths around the 16-lane vectors.
TEST(test_rmsnorm_backward_rows_alone) {
    rng_seed(&rng, 5);
    const int widths[] = {1, 6, 16, 37, 512}, rows[] = {1, 4, 7};
    for (int isa = 0; isa < 2; isa++) {
        CHECK(kernels_set_isa(isa ? "scalar" : "auto") == 0);
        for (int k = 0; k < 5; k++)
            for (int q = 0; q < 3; q++) {
                int N = rows[q], C = widths[k];
                float *x = randn((size_t)N * C, 2), *w = randn(C, 1), *dy = randn((size_t)N * C, 1), *y = zeros((size_t)N * C);
                float *rstd = zeros(N), *dx = randn((size_t)N * C, 1), *dw = randn(C, 1);
                float *dx1 = zeros((size_t)N * C), *dw1 = zeros(C);
                memcpy(dx1, dx, sizeof(float) * N * C), memcpy(dw1, dw, sizeof(float) * C);
                rmsnorm_forward(y, rstd, x, w, N, C, 1e-6f);
                rmsnorm_backward(dx, dw, dy, x, w, rstd, N, C);
                for (int n = 0; n < N; n++)
                    rmsnorm_backward(dx1 + (size_t)n * C, dw1, dy + (size_t)n * C, x + (size_t)n * C, w, rstd + n, 1, C);
                CHECK_MSG(memcmp(dx, dx1, sizeof(float) * N * C) == 0 && memcmp(dw, dw1, sizeof(float) * C) == 0,
                          "isa %d C %d N %d: the rows together differ from the rows alone", isa, C, N);
                free(x), free(w), free(dy), free(y), free(rstd), free(dx), free(dw), free(dx1), free(dw1);
            }
    }
    CHECK(kernels_set_isa("auto") == 0);
}

// y += a · x with the product rounded before the sum, the same bits on the AVX-512 path and the
// portable one, for lengths around the 16-lane vectors.
TEST(test_axpy_rounds_the_product) {
    rng_seed(&rng, 4);
    for (long n = 1; n <= 40; n += 13) {
        float *x = randn(n, 1), *y0 = randn(n, 1), *want = zeros(n), *got = zeros(n), a = 0.37f;
        for (long i = 0; i < n; i++) {
            volatile float p = a * x[i];  // (volatile: rounded to fp32 on its own)
            want[i] = y0[i] + p;
        }
        for (int isa = 0; isa < 2; isa++) {
            CHECK(kernels_set_isa(isa ? "scalar" : "auto") == 0);
            memcpy(got, y0, sizeof(float) * n);
            axpy_f32(got, a, x, n);
            CHECK_MSG(memcmp(got, want, sizeof(float) * n) == 0, "n %ld, %s path", n, isa ? "portable" : "vector");
        }
        CHECK(kernels_set_isa("auto") == 0);
        free(x), free(y0), free(want), free(got);
    }
}

// ---- SwiGLU ----
typedef struct {
    long n;
    float *g, *u, *h, *r;
} SwiCtx;

static double swi_loss(void *p) {
    SwiCtx *c = p;
    swiglu_rows_forward(c->h, c->g, c->u, c->n);
    return dot(c->h, c->r, c->n);
}

// The combine's backward row: out = a·x exactly rounded products, and Σ x·y in 16 running sums
// folded in halves — written out here with each product and sum rounded on its own — on both paths.
TEST(test_scale_and_dot_in_sixteen_lanes) {
    rng_seed(&rng, 5);
    for (long n = 1; n <= 300; n += 37) {
        float *x = randn(n, 1), *y = randn(n, 1), *got = zeros(n), a = -0.61f, lane[16] = {0};
        for (long i = 0; i < n; i++) {
            volatile float p = x[i] * y[i];
            lane[i % 16] = lane[i % 16] + p;
        }
        for (int h = 8; h >= 1; h /= 2)
            for (int k = 0; k < h; k++) lane[k] = lane[k] + lane[k + h];
        double ref = 0;
        for (long i = 0; i < n; i++) ref += (double)x[i] * y[i];
        for (int isa = 0; isa < 2; isa++) {
            CHECK(kernels_set_isa(isa ? "scalar" : "auto") == 0);
            float dot = scale_and_dot_f32(got, a, x, y, n);
            CHECK_MSG(memcmp(&dot, &lane[0], sizeof dot) == 0, "n %ld, %s path: %.9g vs %.9g", n,
                      isa ? "portable" : "vector", dot, lane[0]);
            CHECK_MSG(fabs(dot - ref) <= 1e-5 * (fabs(ref) + sqrt((double)n)), "n %ld: %.9g vs %.9g", n, dot, ref);
            for (long i = 0; i < n; i++) CHECK(got[i] == a * x[i]);
        }
        CHECK(kernels_set_isa("auto") == 0);
        free(x), free(y), free(got);
    }
}

TEST(test_train_op_swiglu) {
    rng_seed(&rng, 3);
    long n = 40;
    SwiCtx c = {n, randn(n, 2), randn(n, 1), zeros(n), randn(n, 1)};
    float *dg = zeros(n), *du = zeros(n);
    swiglu_rows_backward(dg, du, c.r, c.g, c.u, n);
    CHECK(fd_ratio(c.g, n, dg, swi_loss, &c) < FD_TOL);
    CHECK(fd_ratio(c.u, n, du, swi_loss, &c) < FD_TOL);
    free(c.g), free(c.u), free(c.h), free(c.r), free(dg), free(du);
}

// ---- RoPE (YaRN frequencies, a cos/sin factor ≠ 1) ----
typedef struct {
    int N, T, heads, stride, r;
    float *x, *y, *cs, *sn, *rr;
} RopeCtx;

static double rope_loss(void *p) {
    RopeCtx *c = p;
    size_t n = (size_t)c->N * c->heads * c->stride;
    memcpy(c->y, c->x, sizeof(float) * n);
    rope_rows_forward(c->y + 2, c->N, c->T, c->heads, c->stride, c->r, c->cs, c->sn);
    return dot(c->y, c->rr, n);
}

TEST(test_train_op_rope) {
    rng_seed(&rng, 4);
    int T = 5, N = 10, heads = 2, stride = 10, r = 8;  // q-like rows: 2 non-rotary then 8 rotary per head
    double inv[4];
    rope_inv_freq(inv, r, 10000.0, 1, 4.0, 16, 32, 1);
    float cs[5 * 4], sn[5 * 4];
    rope_table(cs, sn, T, r, 0, inv, 1.1f);
    size_t n = (size_t)N * heads * stride;
    RopeCtx c = {N, T, heads, stride, r, randn(n, 1), zeros(n), cs, sn, randn(n, 1)};
    float *dx = malloc(sizeof(float) * n);
    memcpy(dx, c.rr, sizeof(float) * n);
    rope_rows_backward(dx + 2, N, T, heads, stride, r, cs, sn);
    CHECK(fd_ratio(c.x, n, dx, rope_loss, &c) < FD_TOL);
    // a table row is the angles rope_cos_sin computes for its position
    float v[8], c3[4], s3[4];
    for (int i = 0; i < 8; i++) v[i] = (float)i - 3.5f;
    rope_cos_sin(c3, s3, r, 3, inv, 1.1f);
    rope_forward(v, r, c3, s3);
    float u[4 * 8];  // rows 0..3 at positions 0..3
    for (int i = 0; i < 32; i++) u[i] = (float)(i % 8) - 3.5f;
    rope_rows_forward(u, 4, T, 1, 8, 8, cs, sn);
    for (int i = 0; i < 8; i++) CHECK_NEAR(u[3 * 8 + i], v[i], 0);
    free(c.x), free(c.y), free(c.rr), free(dx);
}

// ---- MLA (projections, norms, RoPE, plain attention, o_proj) ----
typedef struct {
    ModelConfig c;
    MlaWeights w;
    float *ln1w;
    LayerPass p;
    LayerActs a;
    float *rr;
    size_t n;  // N·d
} MlaCtx;

static double mla_loss(void *ptr) {
    MlaCtx *m = ptr;
    mla_forward(&m->p, &m->w, m->ln1w, &m->a);
    return dot(m->a.x_mid, m->rr, m->n);
}

static MatView rand_view(int rows, int cols) { return matview_f32(randn((size_t)rows * cols, 0.5f), rows, cols); }
static MatView zero_view(int rows, int cols) { return matview_f32(zeros((size_t)rows * cols), rows, cols); }

static void check_mla(int q_lora, int nope) {
    rng_seed(&rng, 5);
    MlaCtx m = {0};
    ModelConfig *c = &m.c;
    int B = 2, T = 5, d = 6, H = 3, L = 5, r = 4, v = 3, N = B * T, qk = nope + r;
    c->hidden_size = d, c->num_attention_heads = H, c->q_lora_rank = q_lora, c->kv_lora_rank = L;
    c->qk_nope_head_dim = nope, c->qk_rope_head_dim = r, c->v_head_dim = v, c->rms_norm_eps = 1e-6f;
    MlaWeights *w = &m.w, g = {0};
    if (q_lora) {
        w->q_a_proj = rand_view(q_lora, d), w->q_b_proj = rand_view(H * qk, q_lora);
        w->q_a_layernorm = randn(q_lora, 0.3f);
        g.q_a_proj = zero_view(q_lora, d), g.q_b_proj = zero_view(H * qk, q_lora), g.q_a_layernorm = zeros(q_lora);
    } else {
        w->q_proj = rand_view(H * qk, d), g.q_proj = zero_view(H * qk, d);
    }
    w->kv_a_proj_with_mqa = rand_view(L + r, d), w->kv_b_proj = rand_view(H * (nope + v), L), w->o_proj = rand_view(d, H * v);
    w->kv_a_layernorm = randn(L, 0.3f);
    g.kv_a_proj_with_mqa = zero_view(L + r, d), g.kv_b_proj = zero_view(H * (nope + v), L), g.o_proj = zero_view(d, H * v);
    g.kv_a_layernorm = zeros(L);
    for (int i = 0; i < L; i++) w->kv_a_layernorm[i] += 1.0f;
    m.ln1w = randn(d, 0.3f);
    float *dln1w = zeros(d);
    double inv[2];
    rope_inv_freq(inv, r, 10000.0, 0, 1, 16, 32, 1);
    float *cs = zeros(T * r / 2), *sn = zeros(T * r / 2);
    rope_table(cs, sn, T, r, 0, inv, 1.0f);
    size_t per = attn_scratch_floats(c, T);
    m.p = (LayerPass){.be = backend_cpu(), .c = c, .B = B, .T = T, .rope_cos = cs, .rope_sin = sn, .softmax_scale = 0.4f,
                      .latent = zeros(N * L), .kpe = zeros(N * r), .ld = T, .mode = ATTN_PLAIN, .save = 1,
                      .scratch = zeros(per * 64), .per_thread = per};
    LayerActs *a = &m.a;
    a->x_in = randn(N * d, 1), a->ln1 = zeros(N * d), a->ln1_rstd = zeros(N);
    a->qa = zeros(N * (q_lora + 1)), a->cq = zeros(N * (q_lora + 1)), a->cq_rstd = zeros(N);
    a->q = zeros(N * H * qk), a->kva = zeros(N * (L + r)), a->ckv_pre = zeros(N * L), a->ckv_rstd = zeros(N);
    a->kv = zeros(N * H * (nope + v)), a->att = zeros(B * H * T * T), a->ao = zeros(N * H * v);
    a->y = zeros(N * d), a->x_mid = zeros(N * d);
    m.rr = randn(N * d, 1);
    m.n = (size_t)N * d;
    LayerGradScratch s = {.dln = zeros(N * d), .dq = zeros(N * H * qk), .dqa = zeros(N * (q_lora + 1)),
                          .dcq = zeros(N * (q_lora + 1)), .dkv = zeros(N * H * (nope + v)), .dckv = zeros(N * L),
                          .dckv_pre = zeros(N * L), .dkpe = zeros(N * r), .dkpe_heads = zeros(B * H * T * r),
                          .dkva = zeros(N * (L + r)), .dao = zeros(N * H * v)};
    mla_loss(&m);
    float *dres = malloc(sizeof(float) * m.n);
    memcpy(dres, m.rr, sizeof(float) * m.n);
    CHECK(mla_backward(&m.p, w, &g, m.ln1w, dln1w, a, &s, dres) == 0);
    CHECK(fd_ratio(a->x_in, m.n, dres, mla_loss, &m) < FD_TOL);
    CHECK(fd_ratio((float *)w->kv_b_proj.data, (size_t)H * (nope + v) * L, g.kv_b_proj.data, mla_loss, &m) < FD_TOL);
    CHECK(fd_ratio((float *)w->kv_a_proj_with_mqa.data, (size_t)(L + r) * d, g.kv_a_proj_with_mqa.data, mla_loss, &m) <
          FD_TOL);
    CHECK(fd_ratio(w->kv_a_layernorm, L, g.kv_a_layernorm, mla_loss, &m) < FD_TOL);
    CHECK(fd_ratio((float *)w->o_proj.data, (size_t)d * H * v, g.o_proj.data, mla_loss, &m) < FD_TOL);
    CHECK(fd_ratio(m.ln1w, d, dln1w, mla_loss, &m) < FD_TOL);
    if (q_lora) CHECK(fd_ratio((float *)w->q_b_proj.data, (size_t)H * qk * q_lora, g.q_b_proj.data, mla_loss, &m) < FD_TOL);
    // causal: every probability row sums to 1 and never reaches a later position
    for (int bh = 0; bh < B * H; bh++)
        for (int t = 0; t < T; t++) {
            double rowsum = 0;
            for (int j = 0; j < T; j++) {
                float pj = a->att[((size_t)bh * T + t) * T + j];
                if (j > t) CHECK(pj == 0);
                rowsum += pj;
            }
            CHECK_NEAR(rowsum, 1.0, 1e-5);
        }
    // the weights, activations and scratch of this test are left to the process's exit
}

TEST(test_mla_backward_matches_finite_differences) { check_mla(4, 2); }
TEST(test_mla_backward_rope_only_no_q_lora) { check_mla(0, 0); }

// ---- cross-entropy ----
typedef struct {
    int N, V;
    float *logits, *lse, *losses;
    int *tgt;
} CeCtx;

static double ce_loss(void *p) {
    CeCtx *c = p;
    return crossentropy_forward(c->losses, c->lse, c->logits, c->tgt, c->N, c->V) * 0.7;
}

TEST(test_train_op_cross_entropy) {
    rng_seed(&rng, 6);
    int N = 4, V = 9, tgt[4] = {0, 8, 3, 3};
    CeCtx c = {N, V, randn(N * V, 2), zeros(N), zeros(N), tgt};
    ce_loss(&c);
    for (int n = 0; n < N; n++) {  // −log softmax computed directly
        double s = 0;
        for (int i = 0; i < V; i++) s += exp(c.logits[n * V + i]);
        CHECK_NEAR(c.losses[n], log(s) - c.logits[n * V + tgt[n]], 1e-5);
    }
    // the fused pass: the same losses and lse to rounding, and the gradient by finite differences —
    // on the vector path and the portable one (V = 9: a part vector)
    for (int isa = 0; isa < 2; isa++) {
        CHECK(kernels_set_isa(isa ? "scalar" : "auto") == 0);
        float *g = malloc(sizeof(float) * N * V), lse2[4], losses2[4];
        memcpy(g, c.logits, sizeof(float) * N * V);
        double sum = crossentropy_forward_backward(losses2, lse2, g, tgt, N, V, 0.7f);
        ce_loss(&c);
        double want = 0;
        for (int n = 0; n < N; n++) {
            CHECK_NEAR(lse2[n], c.lse[n], 1e-6 * fabs(c.lse[n]) + 1e-6);
            CHECK_NEAR(losses2[n], c.losses[n], 1e-5);
            want += c.losses[n];
        }
        CHECK_NEAR(sum, want, 1e-5);
        CHECK(fd_ratio(c.logits, N * V, g, ce_loss, &c) < FD_TOL);
        free(g);
    }
    CHECK(kernels_set_isa("auto") == 0);
    free(c.logits), free(c.lse), free(c.losses);
}

// ---- router: scores → gates of the (held) chosen experts, and the balance loss ----
typedef struct {
    ModelConfig cfg;
    int T;
    float *logits, *scores, *f, *rw;  // rw: (T, K) projection of the gates
    int *idx;
    float alpha;
} RouteCtx;

static void scores_of(const RouteCtx *c, const float *lg, float *s) {
    int Nr = c->cfg.n_routed_experts;
    if (c->cfg.scoring_func == SCORING_SIGMOID) {
        for (int i = 0; i < Nr; i++) s[i] = sigmoidf_(lg[i]);
    } else {
        memcpy(s, lg, sizeof(float) * Nr);
        softmax_inplace(s, Nr);
    }
}

// Σ_t rw_t · gates_t (the held choice) + the balance loss of the sequence.
static double route_loss(void *p) {
    RouteCtx *c = p;
    int Nr = c->cfg.n_routed_experts, K = c->cfg.num_experts_per_tok;
    double L = 0;
    for (int t = 0; t < c->T; t++) {
        float *s = c->scores + (size_t)t * Nr;
        scores_of(c, c->logits + (size_t)t * Nr, s);
        const int *idx = c->idx + (size_t)t * K;
        float sum = 1e-20f;
        for (int k = 0; k < K; k++) sum += s[idx[k]];
        for (int k = 0; k < K; k++) {
            float g = s[idx[k]] * (c->cfg.norm_topk_prob ? 1.0f / sum : 1.0f) * c->cfg.routed_scaling_factor;
            L += (double)g * c->rw[t * K + k];
        }
    }
    return L + moe_balance_forward(c->f, c->scores, c->idx, c->T, Nr, K, c->alpha);
}

static void check_router(ScoringFunc sf, TopkMethod tm, int norm, float rsf) {
    rng_seed(&rng, 8);
    RouteCtx c = {0};
    c.cfg.n_routed_experts = 8;
    c.cfg.num_experts_per_tok = 3;
    c.cfg.n_group = 4;
    c.cfg.topk_group = 2;
    c.cfg.scoring_func = sf;
    c.cfg.topk_method = tm;
    c.cfg.norm_topk_prob = norm;
    c.cfg.routed_scaling_factor = rsf;
    c.T = 6;
    c.alpha = 0.3f;
    int Nr = 8, K = 3, T = 6;
    c.logits = randn(T * Nr, 1.5f);
    c.scores = zeros(T * Nr);
    c.f = zeros(Nr);
    c.rw = randn(T * K, 1);
    c.idx = malloc(sizeof(int) * T * K);
    float *bias = randn(Nr, 0.1f), w[3];
    for (int t = 0; t < T; t++) {  // the choice made by moe_route, then held
        moe_route(&c.cfg, c.logits + t * Nr, bias, c.scores + t * Nr, c.idx + t * K, w);
        float sum = 1e-20f;
        for (int k = 0; k < K; k++) sum += c.scores[t * Nr + c.idx[t * K + k]];
        for (int k = 0; k < K; k++)  // moe_route's gates are the unbiased scores, normalised, scaled
            CHECK_NEAR(w[k], c.scores[t * Nr + c.idx[t * K + k]] * (norm ? 1.0f / sum : 1.0f) * rsf, 1e-6);
    }
    route_loss(&c);
    float *ds = zeros(T * Nr), *dl = zeros(T * Nr);
    for (int t = 0; t < T; t++) moe_gate_backward(ds + t * Nr, c.rw + t * K, c.scores + t * Nr, c.idx + t * K, &c.cfg);
    moe_balance_backward(ds, c.f, c.scores, T, Nr, c.alpha, 1.0f);
    for (int t = 0; t < T; t++) moe_scores_backward(dl + t * Nr, ds + t * Nr, c.scores + t * Nr, Nr, sf);
    CHECK(fd_ratio(c.logits, T * Nr, dl, route_loss, &c) < FD_TOL);
    free(c.logits), free(c.scores), free(c.f), free(c.rw), free(c.idx), free(bias), free(ds), free(dl);
}

TEST(test_train_op_router_sigmoid_noaux_tc) { check_router(SCORING_SIGMOID, TOPK_NOAUX_TC, 1, 2.5f); }
TEST(test_train_op_router_softmax_greedy) { check_router(SCORING_SOFTMAX, TOPK_GREEDY, 0, 1.0f); }
TEST(test_train_op_router_softmax_group_limited) { check_router(SCORING_SOFTMAX, TOPK_GROUP_LIMITED_GREEDY, 1, 1.5f); }

// The balance loss of a perfectly even sequence is α: f_i = 1 for every expert and Σ P_i = 1.
TEST(test_train_balance_loss_even_is_alpha) {
    int T = 4, Nr = 4, K = 2, idx[8] = {0, 1, 2, 3, 1, 0, 3, 2};
    float s[16], f[4];
    for (int i = 0; i < 16; i++) s[i] = 0.25f + 0.01f * (i % 3);
    CHECK_NEAR(moe_balance_forward(f, s, idx, T, Nr, K, 0.01f), 0.01, 1e-8);
    for (int i = 0; i < Nr; i++) CHECK_NEAR(f[i], 1.0, 0);
}
