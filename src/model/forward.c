// The inference forward pass: embedding → decoder layers (MLA + dense/MoE FFN) → norm → head,
// and the MTP modules. Activations are fp32; weights are read in their stored type by the kernels.
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/attention.h"
#include "kernels/matmul.h"
#include "kernels/ops.h"
#include "model/forward_internal.h"
#include "model/moe.h"

static int max3(int a, int b, int c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

ForwardState *forward_state_new(const Model *m, int max_T, int capacity, Error *err) {
    const ModelConfig *c = &m->cfg;
    ForwardState *s = xcalloc(err, 1, sizeof *s, "forward state");
    if (!s) return NULL;
    s->max_T = max_T;
    s->capacity = capacity;
    s->nthreads = omp_get_max_threads();
    long T = max_T, d = c->hidden_size, H = c->num_attention_heads, qk = config_qk_head_dim(c);
    long F = max3(c->intermediate_size, c->moe_intermediate_size * (c->n_shared_experts > 0 ? c->n_shared_experts : 1),
                  c->moe_intermediate_size);
    long N = c->n_routed_experts > 0 ? c->n_routed_experts : 1, K = c->num_experts_per_tok > 0 ? c->num_experts_per_tok : 1;
    long v = c->v_head_dim, lora = c->kv_lora_rank;
    s->per_thread = thread_scratch_floats(c, capacity);
    long sizes[] = {T * d, T * d, T * d, T * (c->q_lora_rank > 0 ? c->q_lora_rank : 1), T * H * qk,
                    T * (lora + c->qk_rope_head_dim), T * H * v, T * F, T * F, T * N, T * N, T * K, T * K, T,
                    T * d, 2 * (K + c->n_shared_experts) * (long)c->moe_intermediate_size, T * 2 * d,
                    (long)(s->nthreads * s->per_thread)};
    size_t total = 0;
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) total += (size_t)sizes[i];
    s->block = xmalloc(err, total * sizeof(float), "forward activations");
    if (!s->block) {
        free(s);
        return NULL;
    }
    float *p = s->block;
    float **slots[] = {&s->x, &s->xn, &s->y, &s->cq, &s->q, &s->kva, &s->attn, &s->gate, &s->up, &s->router, &s->scores};
    int i = 0;
    for (; i < (int)(sizeof slots / sizeof slots[0]); i++) {
        *slots[i] = p;
        p += sizes[i];
    }
    s->topk_idx = (int *)p;  // int and float have the same size
    p += sizes[i++];
    s->topk_w = p;
    p += sizes[i++];
    s->rows = (int *)p;
    p += sizes[i++];
    s->xg = p;
    p += sizes[i++];
    s->fused = p;
    p += sizes[i++];
    s->cat = p;
    p += sizes[i++];
    s->thread = p;
    return s;
}

void forward_state_free(ForwardState *s) {
    if (!s) return;
    free(s->block);
    free(s);
}

// Up to this many query rows, absorbed attention runs as direct loops per row.
#define DECODE_ROWS 4

static MatView f32_view(const float *data, int rows, int cols) {
    return (MatView){.dtype = DT_F32, .rows = rows, .cols = cols, .data = data};
}

size_t thread_scratch_floats(const ModelConfig *c, int capacity) {
    size_t S = capacity, Q = QCHUNK, K = c->num_experts_per_tok > 0 ? c->num_experts_per_tok : 1;
    return S * (c->qk_nope_head_dim + c->v_head_dim) + 2 * Q * S +
           Q * (c->qk_nope_head_dim + c->qk_rope_head_dim + 2 * c->kv_lora_rank + c->v_head_dim) +
           3 * (size_t)c->hidden_size + c->q_lora_rank + c->n_routed_experts + 2 * K;
}

ThreadScratch thread_scratch(const ModelConfig *c, ForwardState *s) {
    size_t S = s->capacity, Q = QCHUNK, K = c->num_experts_per_tok > 0 ? c->num_experts_per_tok : 1;
    ThreadScratch h;
    h.k = s->thread + (size_t)omp_get_thread_num() * s->per_thread;
    h.v = h.k + S * c->qk_nope_head_dim;
    h.p = h.v + S * c->v_head_dim;
    h.p2 = h.p + Q * S;
    h.qn = h.p2 + Q * S;
    h.qp = h.qn + Q * c->qk_nope_head_dim;
    h.qa = h.qp + Q * c->qk_rope_head_dim;
    h.ol = h.qa + Q * c->kv_lora_rank;
    h.o = h.ol + Q * c->kv_lora_rank;
    h.xn = h.o + Q * c->v_head_dim;
    h.cq = h.xn + c->hidden_size;
    h.cat = h.cq + c->q_lora_rank;
    h.scores = h.cat + 2 * c->hidden_size;
    h.gw = h.scores + c->n_routed_experts;
    h.idx = (int *)(h.gw + K);  // int and float have the same size
    return h;
}

// Copies head h's query rows t0..t0+n into qn (no-rope part) and qp (rotary part).
static void gather_query(const ModelConfig *c, const float *q, int h, int t0, int n, float *qn, float *qp) {
    int H = c->num_attention_heads, qk = config_qk_head_dim(c), nope = c->qk_nope_head_dim, r = c->qk_rope_head_dim;
    for (int i = 0; i < n; i++) {
        const float *src = q + ((size_t)(t0 + i) * H + h) * qk;
        memcpy(qn + (size_t)i * nope, src, sizeof(float) * nope);
        memcpy(qp + (size_t)i * r, src + nope, sizeof(float) * r);
    }
}

// p (n, S) = (p + p2) * scale, causally masked (row i sees keys 0..pos0+t0+i), softmaxed; masked
// entries become 0 so the weighted sum can run over the whole row.
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

// Plain MLA: expand each head's keys and values from the cached latents, then ordinary causal
// attention. latent: (S, kv_lora) and kpe: (S, rope) of this layer, S = pos0 + T.
static void attention_plain(const Model *m, ForwardState *s, const MlaWeights *a, const float *latent,
                            const float *kpe, int T, int pos0) {
    const ModelConfig *c = &m->cfg;
    int H = c->num_attention_heads, nope = c->qk_nope_head_dim, r = c->qk_rope_head_dim, v = c->v_head_dim;
#pragma omp parallel for schedule(static)
    for (int h = 0; h < H; h++) {
        ThreadScratch b = thread_scratch(c, s);
        MatView wk = matview_rows(&a->kv_b_proj, h * (nope + v), nope);
        MatView wv = matview_rows(&a->kv_b_proj, h * (nope + v) + nope, v);
        if (nope > 0) matmul_nt(b.k, latent, &wk, pos0 + T);
        matmul_nt(b.v, latent, &wv, pos0 + T);
        for (int t0 = 0; t0 < T; t0 += QCHUNK) {
            int n = T - t0 < QCHUNK ? T - t0 : QCHUNK, S = pos0 + t0 + n;
            gather_query(c, s->q, h, t0, n, b.qn, b.qp);
            MatView K = f32_view(b.k, S, nope), P = f32_view(kpe, S, r), V = f32_view(b.v, S, v);
            if (nope > 0) matmul_nt(b.p, b.qn, &K, n);
            else memset(b.p, 0, sizeof(float) * n * S);
            if (r > 0) matmul_nt(b.p2, b.qp, &P, n);
            scores_to_probs(b.p, b.p2, n, S, pos0 + t0, m->softmax_scale, r > 0);
            matmul_nn(b.o, b.p, &V, n);
            for (int i = 0; i < n; i++) memcpy(s->attn + ((size_t)(t0 + i) * H + h) * v, b.o + (size_t)i * v, sizeof(float) * v);
        }
    }
}

// Absorbed MLA (SPEC §2.1): q̃ = W_UKᵀ q_nope scores against the latents directly, the weighted
// sum stays in latent space, and W_UV maps it to the head's output.
static void attention_absorbed(const Model *m, ForwardState *s, const MlaWeights *a, const float *latent,
                               const float *kpe, int T, int pos0) {
    const ModelConfig *c = &m->cfg;
    int H = c->num_attention_heads, nope = c->qk_nope_head_dim, r = c->qk_rope_head_dim, v = c->v_head_dim;
    int L = c->kv_lora_rank;
#pragma omp parallel for schedule(static)
    for (int h = 0; h < H; h++) {
        ThreadScratch b = thread_scratch(c, s);
        MatView wuk = matview_rows(&a->kv_b_proj, h * (nope + v), nope);
        MatView wuv = matview_rows(&a->kv_b_proj, h * (nope + v) + nope, v);
        for (int t0 = 0; t0 < T; t0 += QCHUNK) {
            int n = T - t0 < QCHUNK ? T - t0 : QCHUNK, S = pos0 + t0 + n;
            gather_query(c, s->q, h, t0, n, b.qn, b.qp);
            if (nope > 0) matmul_nn(b.qa, b.qn, &wuk, n);
            else memset(b.qa, 0, sizeof(float) * n * L);
            if (n <= DECODE_ROWS) {  // a few rows: direct loops beat matmul calls of one row
                for (int i = 0; i < n; i++)
                    attention_one_query(b.ol + (size_t)i * L, b.qa + (size_t)i * L, b.qp + (size_t)i * r, latent, L, L,
                                        kpe, r, latent, L, L, pos0 + t0 + i + 1, m->softmax_scale, b.p);
                matmul_nt(b.o, b.ol, &wuv, n);
                for (int i = 0; i < n; i++)
                    memcpy(s->attn + ((size_t)(t0 + i) * H + h) * v, b.o + (size_t)i * v, sizeof(float) * v);
                continue;
            }
            MatView C = f32_view(latent, S, L), P = f32_view(kpe, S, r);
            if (nope > 0) matmul_nt(b.p, b.qa, &C, n);
            else memset(b.p, 0, sizeof(float) * n * S);
            if (r > 0) matmul_nt(b.p2, b.qp, &P, n);
            scores_to_probs(b.p, b.p2, n, S, pos0 + t0, m->softmax_scale, r > 0);
            matmul_nn(b.ol, b.p, &C, n);
            matmul_nt(b.o, b.ol, &wuv, n);
            for (int i = 0; i < n; i++) memcpy(s->attn + ((size_t)(t0 + i) * H + h) * v, b.o + (size_t)i * v, sizeof(float) * v);
        }
    }
}

// x += MLA(RMSNorm(x)), appending this layer's latents and rotated keys to the cache.
static void mla_forward(const Model *m, ForwardState *s, KVCache *kv, int cache_layer, const LayerWeights *lw, int T,
                        int pos0, AttnMode mode) {
    const ModelConfig *c = &m->cfg;
    const MlaWeights *a = &lw->self_attn;
    int d = c->hidden_size, H = c->num_attention_heads, qk = config_qk_head_dim(c), nope = c->qk_nope_head_dim;
    int r = c->qk_rope_head_dim, L = c->kv_lora_rank;
    rmsnorm_forward(s->xn, NULL, s->x, lw->input_layernorm, T, d, c->rms_norm_eps);
    if (c->q_lora_rank > 0) {
        matmul_nt(s->cq, s->xn, &a->q_a_proj, T);
        rmsnorm_forward(s->cq, NULL, s->cq, a->q_a_layernorm, T, c->q_lora_rank, c->rms_norm_eps);
        matmul_nt(s->q, s->cq, &a->q_b_proj, T);
    } else {
        matmul_nt(s->q, s->xn, &a->q_proj, T);
    }
    matmul_nt(s->kva, s->xn, &a->kv_a_proj_with_mqa, T);
    float *latent = kv->latent + (size_t)cache_layer * kv->capacity * L;
    float *kpe = kv->k_pe + (size_t)cache_layer * kv->capacity * r;
    for (int t = 0; t < T; t++) {
        const float *row = s->kva + (size_t)t * (L + r);
        rmsnorm_forward(latent + (size_t)(pos0 + t) * L, NULL, row, a->kv_a_layernorm, 1, L, c->rms_norm_eps);
        float *kp = kpe + (size_t)(pos0 + t) * r;
        memcpy(kp, row + L, sizeof(float) * r);
        rope_forward(kp, r, pos0 + t, m->inv_freq, m->rope_mscale);
        for (int h = 0; h < H; h++) rope_forward(s->q + ((size_t)t * H + h) * qk + nope, r, pos0 + t, m->inv_freq, m->rope_mscale);
    }
    if (mode == ATTN_PLAIN) attention_plain(m, s, a, latent, kpe, T, pos0);
    else attention_absorbed(m, s, a, latent, kpe, T, pos0);
    matmul_nt(s->y, s->attn, &a->o_proj, T);
    for (long i = 0; i < (long)T * d; i++) s->x[i] += s->y[i];
}

// out (T, d) = SwiGLU FFN of in (T, d), width inter.
static void ffn_forward(ForwardState *s, const FfnWeights *f, int inter, const float *in, float *out, int T) {
    matmul_nt(s->gate, in, &f->gate_proj, T);
    matmul_nt(s->up, in, &f->up_proj, T);
    swiglu_forward(s->gate, s->gate, s->up, (long)T * inter);
    matmul_nt(out, s->gate, &f->down_proj, T);
}

// y (T, d) = shared experts + Σ routed gate · expert, every token reaching its K_r experts.
static void moe_forward(const Model *m, ForwardState *s, const MoeWeights *w, int T) {
    const ModelConfig *c = &m->cfg;
    int d = c->hidden_size, N = c->n_routed_experts, K = c->num_experts_per_tok, F = c->moe_intermediate_size;
    matmul_nt(s->router, s->xn, &w->gate, T);
    for (int t = 0; t < T; t++)
        moe_route(c, s->router + (size_t)t * N, w->e_score_correction_bias, s->scores + (size_t)t * N,
                  s->topk_idx + (size_t)t * K, s->topk_w + (size_t)t * K);
    if (T == 1) {
#pragma omp parallel
        moe_experts_one(m, s, w, s->xn, s->topk_idx, s->topk_w, NULL);
        return;
    }
    if (c->n_shared_experts > 0) ffn_forward(s, &w->shared_experts, c->n_shared_experts * F, s->xn, s->y, T);
    else memset(s->y, 0, sizeof(float) * T * d);
    float *eo = s->cat;  // (T, d) expert outputs; the MTP input buffer is free during a layer
    for (int e = 0; e < N; e++) {
        int n = 0;
        for (int t = 0; t < T; t++)
            for (int k = 0; k < K; k++)
                if (s->topk_idx[t * K + k] == e) {
                    s->rows[n] = t * K + k;
                    memcpy(s->xg + (size_t)n * d, s->xn + (size_t)t * d, sizeof(float) * d);
                    n++;
                }
        if (n == 0) continue;
        ffn_forward(s, &w->experts[e], F, s->xg, eo, n);
        for (int i = 0; i < n; i++) {
            int t = s->rows[i] / K;
            float g = s->topk_w[s->rows[i]];
            float *yt = s->y + (size_t)t * d;
            const float *et = eo + (size_t)i * d;
            for (int j = 0; j < d; j++) yt[j] += g * et[j];
        }
    }
}

static void layer_forward(const Model *m, ForwardState *s, KVCache *kv, int cache_layer, const LayerWeights *lw,
                          int T, int pos0, AttnMode mode) {
    const ModelConfig *c = &m->cfg;
    int d = c->hidden_size;
    mla_forward(m, s, kv, cache_layer, lw, T, pos0, mode);
    rmsnorm_forward(s->xn, NULL, s->x, lw->post_attention_layernorm, T, d, c->rms_norm_eps);
    if (lw->is_moe) moe_forward(m, s, &lw->moe, T);
    else ffn_forward(s, &lw->mlp, c->intermediate_size, s->xn, s->y, T);
    for (long i = 0; i < (long)T * d; i++) s->x[i] += s->y[i];
}

static int check_call(const Model *m, const ForwardState *s, int T, int pos0, int capacity, const int *tokens,
                      Error *err) {
    if (T < 1 || T > s->max_T) return err_set(err, "forward: %d tokens, but the state holds at most %d", T, s->max_T);
    if (pos0 + T > capacity || pos0 + T > s->capacity)
        return err_set(err, "forward: positions up to %d exceed the KV cache capacity %d", pos0 + T, capacity);
    for (int t = 0; t < T; t++)
        if (tokens[t] < 0 || tokens[t] >= m->cfg.vocab_size)
            return err_set(err, "token %d at position %d is outside the vocabulary [0, %d)", tokens[t], pos0 + t,
                           m->cfg.vocab_size);
    return 0;
}

static void head_forward(const ForwardState *s, const MatView *head, int T, int d, float *logits, float *last_logits) {
    if (logits) matmul_nt(logits, s->xn, head, T);
    if (last_logits) matmul_nt(last_logits, s->xn + (size_t)(T - 1) * d, head, 1);
}

int model_forward(const Model *m, ForwardState *s, KVCache *kv, const int *tokens, int T, AttnMode mode,
                  float *logits, float *last_logits, float *hidden, Error *err) {
    const ModelConfig *c = &m->cfg;
    int d = c->hidden_size, pos0 = kv->len;
    if (check_call(m, s, T, pos0, kv->capacity, tokens, err)) return -1;
    if (T == 1 && mode == ATTN_ABSORBED) {
        decode_forward(m, s, kv, tokens[0], logits ? logits : last_logits, hidden);
        if (logits && last_logits) memcpy(last_logits, logits, sizeof(float) * c->vocab_size);
        return 0;
    }
    for (int t = 0; t < T; t++) matview_row_f32(&m->w.embed_tokens, tokens[t], s->x + (size_t)t * d);
    for (int l = 0; l < c->num_hidden_layers; l++) layer_forward(m, s, kv, l, &m->w.layers[l], T, pos0, mode);
    kv->len += T;
    rmsnorm_forward(s->xn, NULL, s->x, m->w.norm, T, d, c->rms_norm_eps);
    if (hidden) memcpy(hidden, s->xn, sizeof(float) * T * d);
    head_forward(s, &m->w.lm_head, T, d, logits, last_logits);
    return 0;
}

int model_mtp_forward(const Model *m, ForwardState *s, KVCache *kv, int k, const int *next_tokens,
                      const float *hidden, int T, AttnMode mode, float *logits, float *hidden_out, Error *err) {
    const ModelConfig *c = &m->cfg;
    if (k < 0 || k >= m->w.n_mtp || k >= kv->n_mtp)
        return err_set(err, "MTP module %d: the model has %d MTP modules loaded", k, m->w.n_mtp);
    const MtpWeights *w = &m->w.mtp[k];
    int d = c->hidden_size, pos0 = kv->mtp_len[k];
    if (check_call(m, s, T, pos0, kv->capacity, next_tokens, err)) return -1;
    if (T == 1 && mode == ATTN_ABSORBED) {
        decode_mtp_forward(m, s, kv, k, next_tokens[0], hidden, logits, hidden_out);
        return 0;
    }
    for (int t = 0; t < T; t++) {
        float *row = s->cat + (size_t)t * 2 * d;
        // the embedding half comes first, as in the released checkpoints (SPEC §2.3)
        matview_row_f32(&w->embed_tokens, next_tokens[t], s->y);
        rmsnorm_forward(row, NULL, s->y, w->enorm, 1, d, c->rms_norm_eps);
        rmsnorm_forward(row + d, NULL, hidden + (size_t)t * d, w->hnorm, 1, d, c->rms_norm_eps);
    }
    matmul_nt(s->x, s->cat, &w->eh_proj, T);
    layer_forward(m, s, kv, c->num_hidden_layers + k, &w->layer, T, pos0, mode);
    kv->mtp_len[k] += T;
    rmsnorm_forward(s->xn, NULL, s->x, w->shared_head_norm, T, d, c->rms_norm_eps);
    if (hidden_out) memcpy(hidden_out, s->xn, sizeof(float) * T * d);
    head_forward(s, &w->shared_head_head, T, d, logits, NULL);
    return 0;
}
