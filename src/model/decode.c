// The decode step: one token through every layer with absorbed attention, in ONE parallel region.
//
// Decoding is bound by streaming the weights, and at one token the matrices are small (an expert
// of a 100M model is 256 x 512). Forking a team per product spends much of the step starting and
// joining threads, so here the team is formed once per token and every product is split between
// its threads by output rows (matmul_nt_part), with a barrier only where the next phase reads the
// whole of what the previous one wrote. Small per-token work (the RMSNorms, the router's top-k)
// is repeated by every thread into its own scratch instead of costing a barrier.
//
// Phases of a layer, each ending in a barrier:
//   q_a / q_proj and kv_a rows  →  q_b rows, the cache row  →  attention heads  →  o_proj rows + residual
//   →  router rows  →  expert gate/up rows  →  down-projection slice + residual   (MoE)
//   →  gate/up rows  →  down rows + residual                                      (dense)
#include <omp.h>
#include <string.h>

#include "kernels/convert.h"
#include "kernels/matmul.h"
#include "kernels/ops.h"
#include "model/forward_internal.h"
#include "model/layer.h"
#include "model/moe.h"

// Output rows are handed out in units of 16 floats (one 64-byte line): threads never write the
// same cache line.
#define SHARE_UNIT 16

// [*b, *e) of n for this thread of the team.
static void share(int n, int unit, int *b, int *e) {
    int nt = omp_get_num_threads(), t = omp_get_thread_num();
    long units = (n + unit - 1) / unit, lo = units * t / nt * unit, hi = units * (t + 1) / nt * unit;
    *b = (int)(lo < n ? lo : n);
    *e = (int)(hi < n ? hi : n);
}

// This thread's rows of out (rows of w) = w · x; 0 or -1 (kernel scratch).
static int gemv_share(float *out, const float *x, const MatView *w) {
    int b, e;
    share(w->rows, SHARE_UNIT, &b, &e);
    return matmul_nt_part(out, x, w, 1, b, e);
}

// x += o_proj · attn (or down · act): this thread's rows of y, then of x.
static int gemv_share_residual(float *x, float *y, const float *in, const MatView *w) {
    int b, e;
    share(w->rows, SHARE_UNIT, &b, &e);
    int rc = matmul_nt_part(y, in, w, 1, b, e);
    for (int r = b; r < e; r++) x[r] += y[r];
    return rc;
}

// A thread's private vectors, carved from s->own: every thread normalises and routes for itself
// rather than wait at a barrier for one thread to do it.
typedef struct {
    float *xn;      // (d) the normed input of a sub-layer
    float *cq;      // (q_lora) the normed q latent
    float *cat;     // (2d) the MTP input
    float *scores;  // (N_r) router scores
    float *gw;      // (K_r) gating weights of the chosen experts
    int *idx;       // (K_r) the chosen experts
    float *attn;    // this thread's attention scratch
    int failed;     // a product of this thread failed (out of kernel scratch)
} Own;

static Own own_vectors(const ModelConfig *c, ForwardState *s) {
    int t = omp_get_thread_num(), K = c->num_experts_per_tok > 0 ? c->num_experts_per_tok : 1;
    Own o;
    o.xn = s->own + (size_t)t * s->own_per_thread;
    o.cq = o.xn + c->hidden_size;
    o.cat = o.cq + c->q_lora_rank;
    o.scores = o.cat + 2 * c->hidden_size;
    o.gw = o.scores + c->n_routed_experts;
    o.idx = (int *)(o.gw + K);  // int and float have the same size
    o.attn = s->attn + (size_t)t * s->attn_per_thread;
    o.failed = 0;
    return o;
}

// The chosen experts and the shared experts of one token, split evenly over the team: first the
// gate and up rows of all of them, then, after one barrier, each thread owns a slice of the output
// features and sums every expert's down projection into it. Small experts (256 x 512) would lose
// most of their time to start-up if each product forked on its own. Adds the result to x.
static void moe_experts_one(const Model *m, ForwardState *s, const MoeWeights *w, const float *xn, const int *idx,
                            const float *gw, float *x, Own *ts) {
    const ModelConfig *c = &m->cfg;
    int d = c->hidden_size, K = c->num_experts_per_tok, F = c->moe_intermediate_size;
    const FfnWeights *ex[K + 1];
    float g[K + 1];
    int off[K + 2], ne = 0;  // expert j's rows are act[off[j] .. off[j + 1])
    off[0] = 0;
    for (int k = 0; k < K; k++) {
        ex[ne] = &w->experts[idx[k]];
        g[ne] = gw[k];
        off[ne + 1] = off[ne] + F;
        ne++;
    }
    if (c->n_shared_experts > 0) {
        ex[ne] = &w->shared_experts;
        g[ne] = 1.0f;
        off[ne + 1] = off[ne] + c->n_shared_experts * F;
        ne++;
    }
    int R = off[ne], b, e;
    float *act = s->fused, *up = s->fused + R, *tmp = s->xg;  // act, up: (R); tmp: (d) down products
    share(R, SHARE_UNIT, &b, &e);
    for (int j = 0; j < ne; j++) {
        int lo = off[j] > b ? off[j] : b, hi = off[j + 1] < e ? off[j + 1] : e;
        if (lo >= hi) continue;
        ts->failed |= matmul_nt_part(act + off[j], xn, &ex[j]->gate_proj, 1, lo - off[j], hi - off[j]);
        ts->failed |= matmul_nt_part(up + off[j], xn, &ex[j]->up_proj, 1, lo - off[j], hi - off[j]);
        swiglu_forward(act + lo, act + lo, up + lo, hi - lo);
    }
#pragma omp barrier
    share(d, SHARE_UNIT, &b, &e);
    for (int r = b; r < e; r++) s->y[r] = 0.0f;
    for (int j = 0; j < ne && e > b; j++) {
        ts->failed |= matmul_nt_part(tmp, act + off[j], &ex[j]->down_proj, 1, b, e);
        for (int r = b; r < e; r++) s->y[r] += g[j] * tmp[r];
    }
    for (int r = b; r < e; r++) x[r] += s->y[r];
#pragma omp barrier
}

// x += MLA(RMSNorm(x)) for the token at position pos; appends the cache row.
static void decode_mla(const Model *m, ForwardState *s, const LayerPass *p, const LayerWeights *lw, int pos,
                       Own *ts) {
    const ModelConfig *c = &m->cfg;
    const MlaWeights *a = &lw->self_attn;
    int d = c->hidden_size, H = c->num_attention_heads, qk = config_qk_head_dim(c), nope = c->qk_nope_head_dim;
    int r = c->qk_rope_head_dim, L = c->kv_lora_rank;
    float eps = c->rms_norm_eps;
    rmsnorm_forward(ts->xn, NULL, s->x, lw->input_layernorm, 1, d, eps);
    ts->failed |= gemv_share(c->q_lora_rank > 0 ? s->qa : s->q, ts->xn, c->q_lora_rank > 0 ? &a->q_a_proj : &a->q_proj);
    ts->failed |= gemv_share(s->kva, ts->xn, &a->kv_a_proj_with_mqa);
#pragma omp barrier
    if (omp_get_thread_num() == omp_get_num_threads() - 1) {  // the others start on q_b meanwhile
        // normalised and rotated in place in kva, then stored in the cache's element type
        rmsnorm_forward(s->kva, NULL, s->kva, a->kv_a_layernorm, 1, L, eps);
        rope_forward(s->kva + L, r, p->rope_cos, p->rope_sin);
        if (p->store == DT_F32) {
            memcpy((float *)p->latent + (size_t)pos * L, s->kva, sizeof(float) * L);
            memcpy((float *)p->kpe + (size_t)pos * r, s->kva + L, sizeof(float) * r);
        } else {
            bf16_from_f32_n((uint16_t *)p->latent + (size_t)pos * L, s->kva, L);
            bf16_from_f32_n((uint16_t *)p->kpe + (size_t)pos * r, s->kva + L, r);
        }
    }
    if (c->q_lora_rank > 0) {
        rmsnorm_forward(ts->cq, NULL, s->qa, a->q_a_layernorm, 1, c->q_lora_rank, eps);
        ts->failed |= gemv_share(s->q, ts->cq, &a->q_b_proj);
    }
#pragma omp barrier
    int h0, h1;
    share(H, 1, &h0, &h1);
    for (int h = h0; h < h1; h++) rope_forward(s->q + (size_t)h * qk + nope, r, p->rope_cos, p->rope_sin);
    // the latent cache is every head's key and value (MQA-like), so this thread's heads score
    // against it together: each cached row is read once per thread, not once per head
    LatentAttention at = mla_attention_call(p, &a->kv_b_proj, s->q, s->ao, NULL, NULL);
    ts->failed |= latent_attention_absorbed_part(&at, h0, h1, ts->attn);
#pragma omp barrier
    ts->failed |= gemv_share_residual(s->x, s->y, s->ao, &a->o_proj);
#pragma omp barrier
}

// x += FFN(RMSNorm(x)): the dense SwiGLU or the MoE.
static void decode_ffn(const Model *m, ForwardState *s, const LayerWeights *lw, Own *ts) {
    const ModelConfig *c = &m->cfg;
    rmsnorm_forward(ts->xn, NULL, s->x, lw->post_attention_layernorm, 1, c->hidden_size, c->rms_norm_eps);
    if (lw->is_moe) {
        const MoeWeights *w = &lw->moe;
        ts->failed |= gemv_share(s->router, ts->xn, &w->gate);
#pragma omp barrier
        moe_route(c, s->router, w->e_score_correction_bias, ts->scores, ts->idx, ts->gw);
        moe_experts_one(m, s, w, ts->xn, ts->idx, ts->gw, s->x, ts);
        return;
    }
    const FfnWeights *f = &lw->mlp;
    int b, e;
    share(c->intermediate_size, SHARE_UNIT, &b, &e);
    ts->failed |= matmul_nt_part(s->gate, ts->xn, &f->gate_proj, 1, b, e);
    ts->failed |= matmul_nt_part(s->up, ts->xn, &f->up_proj, 1, b, e);
    swiglu_forward(s->gate + b, s->gate + b, s->up + b, e - b);
#pragma omp barrier
    ts->failed |= gemv_share_residual(s->x, s->y, s->gate, &f->down_proj);
#pragma omp barrier
}

static void decode_layer(const Model *m, ForwardState *s, LayerPass *p, KVCache *kv, int cache_layer,
                         const LayerWeights *lw, int pos, Own *ts) {
    const ModelConfig *c = &m->cfg;
    LayerPass lp = *p;
    lp.latent = kvcache_latent(kv, c, cache_layer);
    lp.kpe = kvcache_kpe(kv, c, cache_layer);
    decode_mla(m, s, &lp, lw, pos, ts);
    decode_ffn(m, s, lw, ts);
}

// logits (vocab) = head · norm(x); hidden (d) = norm(x) when asked.
static void decode_head(const Model *m, ForwardState *s, const float *norm, const MatView *head, float *logits,
                        float *hidden, Own *ts) {
    const ModelConfig *c = &m->cfg;
    rmsnorm_forward(ts->xn, NULL, s->x, norm, 1, c->hidden_size, c->rms_norm_eps);
    if (hidden && omp_get_thread_num() == 0) memcpy(hidden, ts->xn, sizeof(float) * c->hidden_size);
    if (logits) ts->failed |= gemv_share(logits, ts->xn, head);
}

// Every thread's failure, as the step's: 0, or -1 with the backend's error set.
static int step_result(const Model *m, int failed) {
    return failed ? err_set(&m->be->err, "decode step: out of memory for kernel scratch") : 0;
}

int decode_forward(const Model *m, ForwardState *s, KVCache *kv, int token, float *logits, float *hidden) {
    const ModelConfig *c = &m->cfg;
    int pos = kv->len, failed = matview_row_f32(&m->w.embed_tokens, token, s->x) != 0;
    LayerPass p = forward_pass(m, s, kv, 1, pos, ATTN_ABSORBED);
#pragma omp parallel num_threads(s->nthreads) reduction(| : failed)
    {
        Own ts = own_vectors(c, s);
        for (int l = 0; l < c->num_hidden_layers; l++) decode_layer(m, s, &p, kv, l, &m->w.layers[l], pos, &ts);
        decode_head(m, s, m->w.norm, &m->w.lm_head, logits, hidden, &ts);
        failed |= ts.failed != 0;
    }
    kv->len++;
    return step_result(m, failed);
}

int decode_mtp_forward(const Model *m, ForwardState *s, KVCache *kv, int k, int token, const float *hidden,
                       float *logits, float *hidden_out) {
    const ModelConfig *c = &m->cfg;
    const MtpWeights *w = &m->w.mtp[k];
    int d = c->hidden_size, pos = kv->mtp_len[k], failed = matview_row_f32(&w->embed_tokens, token, s->emb) != 0;
    LayerPass p = forward_pass(m, s, kv, 1, pos, ATTN_ABSORBED);
#pragma omp parallel num_threads(s->nthreads) reduction(| : failed)
    {
        Own ts = own_vectors(c, s);
        // the embedding half comes first, as in the released checkpoints (SPEC §2.3)
        rmsnorm_forward(ts.cat, NULL, s->emb, w->enorm, 1, d, c->rms_norm_eps);
        rmsnorm_forward(ts.cat + d, NULL, hidden, w->hnorm, 1, d, c->rms_norm_eps);
        ts.failed |= gemv_share(s->x, ts.cat, &w->eh_proj);
#pragma omp barrier
        decode_layer(m, s, &p, kv, c->num_hidden_layers + k, &w->layer, pos, &ts);
        decode_head(m, s, w->shared_head_norm, &w->shared_head_head, logits, hidden_out, &ts);
        failed |= ts.failed != 0;
    }
    kv->mtp_len[k]++;
    return step_result(m, failed);
}
