// Multi-head Latent Attention (SPEC §2.1), forward and backward, for every pass: prefill and
// training (plain: per-head keys and values expanded through kv_b_proj) and decode / speculative
// verification (absorbed: W_UK folded into the query, W_UV applied after the weighted sum).
#include <omp.h>
#include <string.h>

#include "kernels/matmul.h"
#include "kernels/ops.h"
#include "model/layer.h"

// One thread's attention scratch, carved from LayerPass.scratch.
typedef struct AttnScratch {
    float *k, *v;     // (S, nope), (S, v_head): one head's expanded keys and values (plain path)
    float *p, *p2;    // (QCHUNK, S) scores: latent/no-rope part, then the rotary part
    float *qn, *qp;   // (QCHUNK, nope), (QCHUNK, rope) query rows
    float *qa, *ol;   // (QCHUNK, kv_lora) absorbed queries, latent-space outputs (absorbed path)
    float *o;         // (QCHUNK, v_head)
} AttnScratch;

size_t attn_scratch_floats(const ModelConfig *c, int S) {
    size_t Q = QCHUNK;
    return (size_t)S * (c->qk_nope_head_dim + c->v_head_dim) + 2 * Q * S +
           Q * (c->qk_nope_head_dim + c->qk_rope_head_dim + 2 * c->kv_lora_rank + c->v_head_dim);
}

static AttnScratch attn_scratch(const ModelConfig *c, float *base, int S) {
    size_t Q = QCHUNK;
    AttnScratch h;
    h.k = base;
    h.v = h.k + (size_t)S * c->qk_nope_head_dim;
    h.p = h.v + (size_t)S * c->v_head_dim;
    h.p2 = h.p + Q * S;
    h.qn = h.p2 + Q * S;
    h.qp = h.qn + Q * c->qk_nope_head_dim;
    h.qa = h.qp + Q * c->qk_rope_head_dim;
    h.ol = h.qa + Q * c->kv_lora_rank;
    h.o = h.ol + Q * c->kv_lora_rank;
    return h;
}

// The per-thread scratch of a pass is sized for its longest sequence (pos0 + T positions).
static AttnScratch thread_scratch(const LayerPass *p) {
    return attn_scratch(p->c, p->scratch + (size_t)omp_get_thread_num() * p->per_thread, p->pos0 + p->T);
}

// p (n, S) = (p + p2) · scale, causally masked (row i sees keys 0 .. first_pos + i), softmaxed;
// masked entries become 0 so the weighted sum can run over the whole row.
static void scores_to_probs(float *p, const float *p2, int n, int S, int first_pos, float scale, int has_rope) {
    for (int i = 0; i < n; i++) {
        float *row = p + (size_t)i * S;
        const float *row2 = p2 + (size_t)i * S;
        int visible = first_pos + i + 1;
        for (int j = 0; j < visible; j++) row[j] = (row[j] + (has_rope ? row2[j] : 0.0f)) * scale;
        softmax_inplace(row, visible);
        for (int j = visible; j < S; j++) row[j] = 0.0f;
    }
}

// Plain MLA: per (sequence, head), expand the head's keys and values from the latent store, then
// causal attention of the T new rows over the pos0 + T positions. With p->save (training, pos0 = 0)
// the expanded keys and values and the probabilities are kept for the backward pass.
static void attention_plain(const LayerPass *p, const MatView *kv_b, LayerActs *a) {
    const ModelConfig *c = p->c;
    int H = c->num_attention_heads, nope = c->qk_nope_head_dim, r = c->qk_rope_head_dim, v = c->v_head_dim;
    int L = c->kv_lora_rank, qk = nope + r, T = p->T, pos0 = p->pos0, S = pos0 + T;
#pragma omp parallel for schedule(static)
    for (int bh = 0; bh < p->B * H; bh++) {
        int b = bh / H, h = bh % H;
        AttnScratch s = thread_scratch(p);
        const float *latent = p->latent + (size_t)b * p->ld * L, *kpe = p->kpe + (size_t)b * p->ld * r;
        MatView wk = matview_rows(kv_b, h * (nope + v), nope), wv = matview_rows(kv_b, h * (nope + v) + nope, v);
        if (nope > 0) matmul_nt(s.k, latent, &wk, S);
        matmul_nt(s.v, latent, &wv, S);
        if (p->save)  // [k_nope | v] of head h, rows of sequence b
            for (int j = 0; j < S; j++) {
                float *dst = a->kv + ((size_t)(b * T + j) * H + h) * (nope + v);
                memcpy(dst, s.k + (size_t)j * nope, sizeof(float) * nope);
                memcpy(dst + nope, s.v + (size_t)j * v, sizeof(float) * v);
            }
        MatView K = matview_f32(s.k, S, nope), P = matview_f32(kpe, S, r), V = matview_f32(s.v, S, v);
        for (int t0 = 0; t0 < T; t0 += QCHUNK) {
            int n = T - t0 < QCHUNK ? T - t0 : QCHUNK, Sc = pos0 + t0 + n;
            for (int i = 0; i < n; i++) {
                const float *src = a->q + ((size_t)(b * T + t0 + i) * H + h) * qk;
                memcpy(s.qn + (size_t)i * nope, src, sizeof(float) * nope);
                memcpy(s.qp + (size_t)i * r, src + nope, sizeof(float) * r);
            }
            K.rows = P.rows = V.rows = Sc;
            if (nope > 0) matmul_nt(s.p, s.qn, &K, n);
            else memset(s.p, 0, sizeof(float) * n * Sc);
            if (r > 0) matmul_nt(s.p2, s.qp, &P, n);
            scores_to_probs(s.p, s.p2, n, Sc, pos0 + t0, p->softmax_scale, r > 0);
            if (p->save)
                for (int i = 0; i < n; i++) {
                    float *dst = a->att + ((size_t)bh * T + t0 + i) * T;
                    memcpy(dst, s.p + (size_t)i * Sc, sizeof(float) * Sc);
                    memset(dst + Sc, 0, sizeof(float) * (T - Sc));
                }
            matmul_nn(s.o, s.p, &V, n);
            for (int i = 0; i < n; i++)
                memcpy(a->ao + ((size_t)(b * T + t0 + i) * H + h) * v, s.o + (size_t)i * v, sizeof(float) * v);
        }
    }
}

void mla_attend_absorbed(const LayerPass *p, const MatView *kv_b, const float *q, int T, int pos0, int h0, int h1,
                         const float *latent, const float *kpe, float *out, float *scratch) {
    const ModelConfig *c = p->c;
    int H = c->num_attention_heads, nope = c->qk_nope_head_dim, r = c->qk_rope_head_dim, v = c->v_head_dim;
    int L = c->kv_lora_rank, qk = nope + r;
    AttnScratch s = attn_scratch(c, scratch, pos0 + T);
    int E = (h1 - h0) * T;  // entries (head, row), head-major: entry e is head h0 + e / T, row e % T
    for (int e0 = 0; e0 < E; e0 += QCHUNK) {
        int n = E - e0 < QCHUNK ? E - e0 : QCHUNK, S = 0;
        for (int i = 0; i < n; i++) {
            int h = h0 + (e0 + i) / T, t = (e0 + i) % T;
            const float *qr = q + ((size_t)t * H + h) * qk;
            memcpy(s.qp + (size_t)i * r, qr + nope, sizeof(float) * r);
            MatView wuk = matview_rows(kv_b, h * (nope + v), nope);
            if (nope > 0) matmul_nn_part(s.qa + (size_t)i * L, qr, &wuk, 1, 0, L);
            else memset(s.qa + (size_t)i * L, 0, sizeof(float) * L);
            if (pos0 + t + 1 > S) S = pos0 + t + 1;
        }
        // every head's key and value is the latent (MQA-like): the entries score the cache together
        MatView C = matview_f32(latent, S, L), P = matview_f32(kpe, S, r);
        matmul_nt_part(s.p, s.qa, &C, n, 0, S);  // (n, S) latent scores
        if (r > 0) matmul_nt_part(s.p2, s.qp, &P, n, 0, S);
        for (int i = 0; i < n; i++) {
            float *row = s.p + (size_t)i * S;
            const float *row2 = s.p2 + (size_t)i * S;
            int visible = pos0 + (e0 + i) % T + 1;
            for (int j = 0; j < visible; j++) row[j] = (row[j] + (r > 0 ? row2[j] : 0.0f)) * p->softmax_scale;
            softmax_inplace(row, visible);
            for (int j = visible; j < S; j++) row[j] = 0.0f;
        }
        matmul_nn_part(s.ol, s.p, &C, n, 0, L);  // (n, L) the weighted sums, in latent space
        for (int i = 0; i < n; i++) {
            int h = h0 + (e0 + i) / T, t = (e0 + i) % T;
            MatView wuv = matview_rows(kv_b, h * (nope + v) + nope, v);
            matmul_nt_part(out + ((size_t)t * H + h) * v, s.ol + (size_t)i * L, &wuv, 1, 0, v);
        }
    }
}

static void attention_absorbed(const LayerPass *p, const MatView *kv_b, LayerActs *a) {
    const ModelConfig *c = p->c;
    int H = c->num_attention_heads, qk = config_qk_head_dim(c), L = c->kv_lora_rank, r = c->qk_rope_head_dim;
    int v = c->v_head_dim, T = p->T;
#pragma omp parallel for schedule(static)
    for (int bh = 0; bh < p->B * H; bh++) {
        int b = bh / H, h = bh % H;
        mla_attend_absorbed(p, kv_b, a->q + (size_t)b * T * H * qk, T, p->pos0, h, h + 1,
                            p->latent + (size_t)b * p->ld * L, p->kpe + (size_t)b * p->ld * r,
                            a->ao + (size_t)b * T * H * v, p->scratch + (size_t)omp_get_thread_num() * p->per_thread);
    }
}

void mla_forward(const LayerPass *p, const MlaWeights *w, const float *input_layernorm, LayerActs *a) {
    const ModelConfig *c = p->c;
    int N = p->B * p->T, T = p->T, d = c->hidden_size, H = c->num_attention_heads, nope = c->qk_nope_head_dim;
    int r = c->qk_rope_head_dim, L = c->kv_lora_rank, qr = c->q_lora_rank, qk = nope + r;
    float eps = c->rms_norm_eps;
    rmsnorm_rows_forward(a->ln1, a->ln1_rstd, a->x_in, input_layernorm, N, d, eps);
    if (qr > 0) {
        matmul_nt(a->qa, a->ln1, &w->q_a_proj, N);
        rmsnorm_rows_forward(a->cq, a->cq_rstd, a->qa, w->q_a_layernorm, N, qr, eps);
        matmul_nt(a->q, a->cq, &w->q_b_proj, N);
    } else {
        matmul_nt(a->q, a->ln1, &w->q_proj, N);
    }
    matmul_nt(a->kva, a->ln1, &w->kv_a_proj_with_mqa, N);
    // the new positions' normalised latents and rotated keys go into the store
#pragma omp parallel for schedule(static) if (N > 1)
    for (int n = 0; n < N; n++) {
        int b = n / T, t = n % T;
        size_t at = (size_t)b * p->ld + p->pos0 + t;
        const float *row = a->kva + (size_t)n * (L + r);
        if (a->ckv_pre) memcpy(a->ckv_pre + (size_t)n * L, row, sizeof(float) * L);
        rmsnorm_forward(p->latent + at * L, a->ckv_rstd ? a->ckv_rstd + n : NULL, row, w->kv_a_layernorm, 1, L, eps);
        float *kp = p->kpe + at * r;
        memcpy(kp, row + L, sizeof(float) * r);
        rope_forward(kp, r, p->rope_cos + (size_t)t * (r / 2), p->rope_sin + (size_t)t * (r / 2));
    }
    rope_rows_forward(a->q + nope, N, T, H, qk, r, p->rope_cos, p->rope_sin);
    if (p->mode == ATTN_PLAIN) attention_plain(p, &w->kv_b_proj, a);
    else attention_absorbed(p, &w->kv_b_proj, a);
    matmul_nt(a->y, a->ao, &w->o_proj, N);
#pragma omp parallel for schedule(static) if (N > 1)
    for (long i = 0; i < (long)N * d; i++) a->x_mid[i] = a->x_in[i] + a->y[i];
}

// The backward of plain causal attention over B sequences of T positions from 0 (training):
// per head the key is [k_nope | k_pe] with one rotary key per token shared by every head.
// q: (B*T, H, qk)  kv: (B*T, H, nope + v)  kpe: (B*T, r)  att: (B, H, T, T)  dout: (B*T, H, v)
// dq, dkv, dkpe += ...;  scratch: dkpe_heads (B, H, T, r), datt (B, H, T, T)
static void attention_plain_backward(const LayerPass *p, const LayerActs *a, LayerGradScratch *s) {
    const ModelConfig *c = p->c;
    int B = p->B, T = p->T, H = c->num_attention_heads, nope = c->qk_nope_head_dim, r = c->qk_rope_head_dim;
    int v = c->v_head_dim, qk = nope + r, kvw = nope + v;
    float scale = p->softmax_scale;
    const float *q = a->q, *kv = a->kv, *kpe = p->kpe;
    int saved = gemm_f32_serial_begin();
#pragma omp parallel for schedule(static)
    for (int bh = 0; bh < B * H; bh++) {
        int b = bh / H, h = bh % H;
        const float *dob = s->dao + (size_t)b * T * H * v + (size_t)h * v;
        const float *qb = q + (size_t)b * T * H * qk + (size_t)h * qk;
        const float *kb = kv + (size_t)b * T * H * kvw + (size_t)h * kvw;
        const float *P = a->att + (size_t)bh * T * T;
        float *dS = s->datt + (size_t)bh * T * T;
        float *dqb = s->dq + (size_t)b * T * H * qk + (size_t)h * qk;
        float *dkb = s->dkv + (size_t)b * T * H * kvw + (size_t)h * kvw;
        gemm_f32(0, 1, T, T, v, 1.0f, dob, H * v, kb + nope, H * kvw, 0.0f, dS, T);  // dP = dO Vᵀ
        gemm_f32(1, 0, T, v, T, 1.0f, P, T, dob, H * v, 1.0f, dkb + nope, H * kvw);  // dV += Pᵀ dO
        // dS = P ⊙ (dP − Σ_j P dP), times the score scale (folded here once)
        for (int t = 0; t < T; t++) {
            const float *pr = P + (size_t)t * T;
            float *ds = dS + (size_t)t * T, dot = 0;
            for (int j = 0; j <= t; j++) dot += pr[j] * ds[j];
            for (int j = 0; j <= t; j++) ds[j] = pr[j] * (ds[j] - dot) * scale;
            memset(ds + t + 1, 0, sizeof(float) * (T - t - 1));
        }
        if (nope > 0) {
            gemm_f32(0, 0, T, nope, T, 1.0f, dS, T, kb, H * kvw, 1.0f, dqb, H * qk);  // dQ_nope += dS K_nope
            gemm_f32(1, 0, T, nope, T, 1.0f, dS, T, qb, H * qk, 1.0f, dkb, H * kvw);  // dK_nope += dSᵀ Q_nope
        }
        if (r > 0) {
            gemm_f32(0, 0, T, r, T, 1.0f, dS, T, kpe + (size_t)b * T * r, r, 1.0f, dqb + nope, H * qk);  // dQ_pe += dS K_pe
            gemm_f32(1, 0, T, r, T, 1.0f, dS, T, qb + nope, H * qk, 0.0f, s->dkpe_heads + (size_t)bh * T * r, r);
        }
    }
    gemm_f32_serial_end(saved);
    if (r == 0) return;
    // the one rotary key per token collects every head's gradient, added in head order
#pragma omp parallel for schedule(static)
    for (int bt = 0; bt < B * T; bt++) {
        int b = bt / T, t = bt % T;
        float *dst = s->dkpe + (size_t)bt * r;
        for (int h = 0; h < H; h++) {
            const float *src = s->dkpe_heads + (((size_t)b * H + h) * T + t) * r;
            for (int i = 0; i < r; i++) dst[i] += src[i];
        }
    }
}

static void zero(float *p, size_t n) { memset(p, 0, sizeof(float) * n); }

void mla_backward(const LayerPass *p, const MlaWeights *w, MlaWeights *g, const float *input_layernorm,
                  float *dinput_layernorm, LayerActs *a, LayerGradScratch *s, float *dres) {
    const ModelConfig *c = p->c;
    int N = p->B * p->T, T = p->T, d = c->hidden_size, H = c->num_attention_heads, nope = c->qk_nope_head_dim;
    int r = c->qk_rope_head_dim, v = c->v_head_dim, L = c->kv_lora_rank, qr = c->q_lora_rank, qk = nope + r;
    const float *ckv = p->latent;  // (N, L): a training window's latents are its store
    zero(s->dao, (size_t)N * H * v);
    matmul_backward(s->dao, &g->o_proj, dres, a->ao, &w->o_proj, N);
    zero(s->dq, (size_t)N * H * qk);
    zero(s->dkv, (size_t)N * H * (nope + v));
    zero(s->dkpe, (size_t)N * r);
    attention_plain_backward(p, a, s);
    rope_rows_backward(s->dq + nope, N, T, H, qk, r, p->rope_cos, p->rope_sin);
    rope_rows_backward(s->dkpe, N, T, 1, r, r, p->rope_cos, p->rope_sin);
    zero(s->dckv, (size_t)N * L);
    matmul_backward(s->dckv, &g->kv_b_proj, s->dkv, ckv, &w->kv_b_proj, N);
    zero(s->dckv_pre, (size_t)N * L);
    rmsnorm_rows_backward(s->dckv_pre, g->kv_a_layernorm, s->dckv, a->ckv_pre, w->kv_a_layernorm, a->ckv_rstd, N, L);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        memcpy(s->dkva + (size_t)n * (L + r), s->dckv_pre + (size_t)n * L, sizeof(float) * L);
        memcpy(s->dkva + (size_t)n * (L + r) + L, s->dkpe + (size_t)n * r, sizeof(float) * r);
    }
    zero(s->dln, (size_t)N * d);
    matmul_backward(s->dln, &g->kv_a_proj_with_mqa, s->dkva, a->ln1, &w->kv_a_proj_with_mqa, N);
    if (qr > 0) {
        zero(s->dcq, (size_t)N * qr);
        matmul_backward(s->dcq, &g->q_b_proj, s->dq, a->cq, &w->q_b_proj, N);
        zero(s->dqa, (size_t)N * qr);
        rmsnorm_rows_backward(s->dqa, g->q_a_layernorm, s->dcq, a->qa, w->q_a_layernorm, a->cq_rstd, N, qr);
        matmul_backward(s->dln, &g->q_a_proj, s->dqa, a->ln1, &w->q_a_proj, N);
    } else {
        matmul_backward(s->dln, &g->q_proj, s->dq, a->ln1, &w->q_proj, N);
    }
    rmsnorm_rows_backward(dres, dinput_layernorm, s->dln, a->x_in, input_layernorm, a->ln1_rstd, N, d);
}
