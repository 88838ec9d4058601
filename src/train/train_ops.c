#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "train/train_ops.h"

// Row chunk of the fixed-order reductions: partial sums per chunk of rows, added in chunk order,
// give the same bits however the chunks are scheduled.
#define ROW_CHUNK 64

// C (M×N, ldc) = alpha op(A) op(B) + beta C, op(A) M×K, op(B) K×N (row-major; ta/tb transpose),
// in the calling thread. A zero-width K leaves beta C (cblas wants K ≥ 1 for some layouts).
static void sgemm1(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
                   float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) C[(size_t)i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[(size_t)i * ldc + j];
        return;
    }
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda,
                B, ldb, beta, C, ldc);
}

// OpenBLAS runs single-threaded while training code runs: one pool of threads (OpenMP's) does all
// the work; two pools, OpenBLAS's and OpenMP's, would fight over the cores. The previous setting
// is restored at the end, so other callers in the process keep theirs.
static int blas_single_begin(void) {
    int n = openblas_get_num_threads();
    if (n != 1) openblas_set_num_threads(1);
    return n;
}
static void blas_single_end(int n) {
    if (n != 1) openblas_set_num_threads(n);
}

// sgemm1's product split over the OpenMP threads in static blocks of C rows (or columns, when C is
// wide and short), each block one single-threaded sgemm: the same thread count gives the same
// blocks and the same bits (OpenBLAS may round a block's edge differently, so a different thread
// count can move the last bits).
static void gemm(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
                 float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    int nt = omp_get_max_threads();
    if ((double)M * N * (K > 0 ? K : 1) < (1 << 18) || K <= 0) nt = 1;  // too small to share
    int by_rows = M >= N || M >= 64 * nt, len = by_rows ? M : N;
    int saved = blas_single_begin();
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int p = 0; p < nt; p++) {
        int q = (len + nt - 1) / nt, o = p * q, n = len - o < q ? len - o : q;
        if (n <= 0) continue;
        if (by_rows)
            sgemm1(ta, tb, n, N, K, alpha, A + (ta ? (size_t)o : (size_t)o * lda), lda, B, ldb, beta,
                   C + (size_t)o * ldc, ldc);
        else
            sgemm1(ta, tb, M, n, K, alpha, A, lda, B + (tb ? (size_t)o * ldb : (size_t)o), ldb, beta, C + o, ldc);
    }
    blas_single_end(saved);
}

void linear_forward(float *out, const float *inp, const float *weight, int N, int C, int OC) {
    gemm(0, 1, N, OC, C, 1.0f, inp, C, weight, C, 0.0f, out, OC);
}

void linear_backward(float *dinp, float *dweight, const float *dout, const float *inp, const float *weight, int N,
                     int C, int OC) {
    if (dinp) gemm(0, 0, N, C, OC, 1.0f, dout, OC, weight, C, 1.0f, dinp, C);
    gemm(1, 0, OC, C, N, 1.0f, dout, OC, inp, C, 1.0f, dweight, C);
}

void rmsnorm_rows_forward(float *out, float *rstd, const float *inp, const float *weight, int N, int C, float eps) {
#pragma omp parallel for schedule(static)
    for (int n0 = 0; n0 < N; n0 += ROW_CHUNK) {
        int n = N - n0 < ROW_CHUNK ? N - n0 : ROW_CHUNK;
        rmsnorm_forward(out + (size_t)n0 * C, rstd + n0, inp + (size_t)n0 * C, weight, n, C, eps);
    }
}

void rmsnorm_rows_backward(float *dinp, float *dweight, const float *dout, const float *inp, const float *weight,
                           const float *rstd, int N, int C) {
    int chunks = (N + ROW_CHUNK - 1) / ROW_CHUNK;
    float *part = calloc((size_t)chunks * C, sizeof(float));  // (chunks, C) per-chunk dweight
    if (!part) {  // no memory for the partials: the serial pass gives the same sums row by row
        rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, N, C);
        return;
    }
#pragma omp parallel for schedule(static)
    for (int ch = 0; ch < chunks; ch++) {
        int n0 = ch * ROW_CHUNK, n = N - n0 < ROW_CHUNK ? N - n0 : ROW_CHUNK;
        rmsnorm_backward(dinp + (size_t)n0 * C, part + (size_t)ch * C, dout + (size_t)n0 * C, inp + (size_t)n0 * C,
                         weight, rstd + n0, n, C);
    }
    for (int ch = 0; ch < chunks; ch++)
        for (int i = 0; i < C; i++) dweight[i] += part[(size_t)ch * C + i];
    free(part);
}

#define ELEM_CHUNK 4096L

void swiglu_rows_forward(float *h, const float *gate, const float *up, long n) {
#pragma omp parallel for schedule(static)
    for (long i = 0; i < n; i += ELEM_CHUNK) swiglu_forward(h + i, gate + i, up + i, n - i < ELEM_CHUNK ? n - i : ELEM_CHUNK);
}

void swiglu_rows_backward(float *dgate, float *dup, const float *dh, const float *gate, const float *up, long n) {
#pragma omp parallel for schedule(static)
    for (long i = 0; i < n; i += ELEM_CHUNK)
        swiglu_backward(dgate + i, dup + i, dh + i, gate + i, up + i, n - i < ELEM_CHUNK ? n - i : ELEM_CHUNK);
}

void rope_table(float *cos_t, float *sin_t, int T, int r, const double *inv_freq, float mscale) {
    for (int t = 0; t < T; t++)
        for (int i = 0; i < r / 2; i++) {
            double a = (double)t * inv_freq[i];
            cos_t[(size_t)t * (r / 2) + i] = (float)cos(a) * mscale;
            sin_t[(size_t)t * (r / 2) + i] = (float)sin(a) * mscale;
        }
}

// sign +1: the rotation R; sign −1: its transpose.
static void rope_rows(float *x, int N, int T, int heads, int stride, int r, const float *cos_t, const float *sin_t,
                      float sign) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *c = cos_t + (size_t)(n % T) * (r / 2), *s = sin_t + (size_t)(n % T) * (r / 2);
        for (int h = 0; h < heads; h++) {
            float *v = x + ((size_t)n * heads + h) * stride;
            for (int i = 0; i < r / 2; i++) {
                float x0 = v[2 * i], x1 = v[2 * i + 1], si = sign * s[i];
                v[2 * i] = x0 * c[i] - x1 * si;
                v[2 * i + 1] = x0 * si + x1 * c[i];
            }
        }
    }
}

void rope_rows_forward(float *x, int N, int T, int heads, int stride, int r, const float *cos_t, const float *sin_t) {
    rope_rows(x, N, T, heads, stride, r, cos_t, sin_t, 1.0f);
}

void rope_rows_backward(float *dx, int N, int T, int heads, int stride, int r, const float *cos_t,
                        const float *sin_t) {
    rope_rows(dx, N, T, heads, stride, r, cos_t, sin_t, -1.0f);
}

void mla_attention_forward(float *out, float *att, const float *q, const float *kv, const float *kpe, int B, int T,
                           int H, int nope, int r, int v, float scale) {
    int qk = nope + r, kvw = nope + v, saved = blas_single_begin();
    // one (sequence, head) per task: its products are single-threaded sgemms
#pragma omp parallel for schedule(static)
    for (int bh = 0; bh < B * H; bh++) {
        int b = bh / H, h = bh % H;
        const float *qb = q + (size_t)b * T * H * qk + (size_t)h * qk;     // (T, qk) rows at stride H*qk
        const float *kb = kv + (size_t)b * T * H * kvw + (size_t)h * kvw;  // (T, nope + v) at stride H*kvw
        float *S = att + (size_t)bh * T * T;                                // (T, T)
        // scores = scale (q_nope k_nopeᵀ + q_pe k_peᵀ) over the full square; the mask follows
        sgemm1(0, 1, T, T, nope, scale, qb, H * qk, kb, H * kvw, 0.0f, S, T);
        sgemm1(0, 1, T, T, r, scale, qb + nope, H * qk, kpe + (size_t)b * T * r, r, nope > 0 ? 1.0f : 0.0f, S, T);
        for (int t = 0; t < T; t++) {
            softmax_inplace(S + (size_t)t * T, t + 1);
            memset(S + (size_t)t * T + t + 1, 0, sizeof(float) * (T - t - 1));
        }
        sgemm1(0, 0, T, v, T, 1.0f, S, T, kb + nope, H * kvw, 0.0f, out + (size_t)b * T * H * v + (size_t)h * v, H * v);
    }
    blas_single_end(saved);
}

void mla_attention_backward(float *dq, float *dkv, float *dkpe, float *dkpe_heads, float *datt, const float *dout,
                            const float *att, const float *q, const float *kv, const float *kpe, int B, int T, int H,
                            int nope, int r, int v, float scale) {
    int qk = nope + r, kvw = nope + v, saved = blas_single_begin();
#pragma omp parallel for schedule(static)
    for (int bh = 0; bh < B * H; bh++) {
        int b = bh / H, h = bh % H;
        const float *dob = dout + (size_t)b * T * H * v + (size_t)h * v;
        const float *qb = q + (size_t)b * T * H * qk + (size_t)h * qk;
        const float *kb = kv + (size_t)b * T * H * kvw + (size_t)h * kvw;
        const float *P = att + (size_t)bh * T * T;
        float *dS = datt + (size_t)bh * T * T;
        float *dqb = dq + (size_t)b * T * H * qk + (size_t)h * qk;
        float *dkb = dkv + (size_t)b * T * H * kvw + (size_t)h * kvw;
        sgemm1(0, 1, T, T, v, 1.0f, dob, H * v, kb + nope, H * kvw, 0.0f, dS, T);  // dP = dO Vᵀ
        sgemm1(1, 0, T, v, T, 1.0f, P, T, dob, H * v, 1.0f, dkb + nope, H * kvw);  // dV += Pᵀ dO
        // dS = P ⊙ (dP − Σ_j P dP), times the score scale (folded here once)
        for (int t = 0; t < T; t++) {
            const float *p = P + (size_t)t * T;
            float *ds = dS + (size_t)t * T, dot = 0;
            for (int j = 0; j <= t; j++) dot += p[j] * ds[j];
            for (int j = 0; j <= t; j++) ds[j] = p[j] * (ds[j] - dot) * scale;
            memset(ds + t + 1, 0, sizeof(float) * (T - t - 1));
        }
        if (nope > 0) {
            sgemm1(0, 0, T, nope, T, 1.0f, dS, T, kb, H * kvw, 1.0f, dqb, H * qk);  // dQ_nope += dS K_nope
            sgemm1(1, 0, T, nope, T, 1.0f, dS, T, qb, H * qk, 1.0f, dkb, H * kvw);  // dK_nope += dSᵀ Q_nope
        }
        if (r > 0) {
            sgemm1(0, 0, T, r, T, 1.0f, dS, T, kpe + (size_t)b * T * r, r, 1.0f, dqb + nope, H * qk);  // dQ_pe += dS K_pe
            sgemm1(1, 0, T, r, T, 1.0f, dS, T, qb + nope, H * qk, 0.0f, dkpe_heads + (size_t)bh * T * r, r);
        }
    }
    blas_single_end(saved);
    if (r == 0) return;
    // the one rotary key per token collects every head's gradient, added in head order
#pragma omp parallel for schedule(static)
    for (int bt = 0; bt < B * T; bt++) {
        int b = bt / T, t = bt % T;
        float *dst = dkpe + (size_t)bt * r;
        for (int h = 0; h < H; h++) {
            const float *src = dkpe_heads + (((size_t)b * H + h) * T + t) * r;
            for (int i = 0; i < r; i++) dst[i] += src[i];
        }
    }
}

double crossentropy_forward(float *losses, float *lse, const float *logits, const int *targets, int N, int V) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *l = logits + (size_t)n * V;
        float mx = -INFINITY;
        for (int i = 0; i < V; i++) mx = l[i] > mx ? l[i] : mx;
        double s = 0;
        for (int i = 0; i < V; i++) s += expf(l[i] - mx);
        lse[n] = mx + (float)log(s);
        losses[n] = lse[n] - l[targets[n]];
    }
    double sum = 0;
    for (int n = 0; n < N; n++) sum += losses[n];
    return sum;
}

void crossentropy_backward(float *logits, const float *lse, const int *targets, int N, int V, float dloss) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *l = logits + (size_t)n * V;
        for (int i = 0; i < V; i++) l[i] = expf(l[i] - lse[n]) * dloss;
        l[targets[n]] -= dloss;
    }
}

void moe_scores_backward(float *dlogits, const float *dscores, const float *scores, int N_r, ScoringFunc f) {
    if (f == SCORING_SIGMOID) {
        for (int i = 0; i < N_r; i++) dlogits[i] += dscores[i] * scores[i] * (1.0f - scores[i]);
        return;
    }
    float dot = 0;
    for (int i = 0; i < N_r; i++) dot += dscores[i] * scores[i];
    for (int i = 0; i < N_r; i++) dlogits[i] += scores[i] * (dscores[i] - dot);
}

void moe_gate_backward(float *dscores, const float *dweight, const float *scores, const int *idx,
                       const ModelConfig *c) {
    int K = c->num_experts_per_tok;
    float rsf = c->routed_scaling_factor;
    if (!c->norm_topk_prob) {
        for (int k = 0; k < K; k++) dscores[idx[k]] += rsf * dweight[k];
        return;
    }
    // w_k = rsf s_k / S with S = Σ_j s_j (+1e-20 as in moe_route): ∂w_k/∂s_j = rsf (δ_kj − w_k/rsf) / S
    float S = 1e-20f, dot = 0;
    for (int k = 0; k < K; k++) S += scores[idx[k]];
    for (int k = 0; k < K; k++) dot += dweight[k] * scores[idx[k]];
    for (int k = 0; k < K; k++) dscores[idx[k]] += rsf * (dweight[k] - dot / S) / S;
}

double moe_balance_forward(float *f, const float *scores, const int *idx, int T, int N_r, int K_r, float alpha) {
    double P[N_r];
    for (int i = 0; i < N_r; i++) {
        f[i] = 0;
        P[i] = 0;
    }
    for (int t = 0; t < T; t++) {
        for (int k = 0; k < K_r; k++) f[idx[(size_t)t * K_r + k]] += 1.0f;
        const float *s = scores + (size_t)t * N_r;
        double S = 0;
        for (int i = 0; i < N_r; i++) S += s[i];
        for (int i = 0; i < N_r; i++) P[i] += s[i] / S;
    }
    double loss = 0;
    for (int i = 0; i < N_r; i++) {
        f[i] *= (float)N_r / ((float)K_r * T);
        loss += (double)f[i] * P[i] / T;
    }
    return alpha * loss;
}

void moe_balance_backward(float *dscores, const float *f, const float *scores, int T, int N_r, float alpha,
                          float dloss) {
    float g[N_r];
    for (int i = 0; i < N_r; i++) g[i] = alpha * dloss * f[i] / T;
    for (int t = 0; t < T; t++) {
        const float *s = scores + (size_t)t * N_r;
        float *ds = dscores + (size_t)t * N_r;
        float S = 0, c = 0;
        for (int i = 0; i < N_r; i++) S += s[i];
        for (int i = 0; i < N_r; i++) c += g[i] * s[i];
        c /= S;
        for (int i = 0; i < N_r; i++) ds[i] += (g[i] - c) / S;
    }
}
