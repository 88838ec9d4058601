// The inference forward pass: embedding → decoder layers (layer.c) → norm → head, and the MTP
// modules, over T tokens of one sequence appended to its latent cache. Activations are fp32;
// weights are read in their stored type by the kernels.
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "base/bufplan.h"
#include "kernels/ops.h"
#include "model/forward_internal.h"

static long lmax(long a, long b) { return a > b ? a : b; }

typedef struct {
    ForwardState *s;
    const ModelConfig *c;
} Layout;

static void lay_state(BufPlan *p, void *ctx) {
    ForwardState *s = ((Layout *)ctx)->s;
    const ModelConfig *c = ((Layout *)ctx)->c;
    long T = s->max_T, d = c->hidden_size, H = c->num_attention_heads, qk = config_qk_head_dim(c);
    long Fm = c->moe_intermediate_size, F = lmax(c->intermediate_size, (long)c->n_shared_experts * Fm);
    long Nr = lmax(c->n_routed_experts, 1), K = lmax(c->num_experts_per_tok, 1), TK = T * K;
    long L = c->kv_lora_rank, r = c->qk_rope_head_dim, v = c->v_head_dim;
    s->x = PLAN_F(p, T * d);
    s->xn = PLAN_F(p, T * d);
    s->y = PLAN_F(p, T * d);
    s->qa = PLAN_F(p, T * lmax(c->q_lora_rank, 1));
    s->q = PLAN_F(p, T * H * qk);
    s->kva = PLAN_F(p, T * (L + r));
    s->ao = PLAN_F(p, T * H * v);
    s->gate = PLAN_F(p, T * F);
    s->up = PLAN_F(p, T * F);
    s->router = PLAN_F(p, T * Nr);
    s->scores = PLAN_F(p, T * Nr);
    s->topk_idx = PLAN_I(p, TK);
    s->topk_w = PLAN_F(p, TK);
    s->slot_of = PLAN_I(p, TK);
    s->slot_tk = PLAN_I(p, TK);
    s->slot_tk_token = PLAN_I(p, TK);
    s->expert_off = PLAN_I(p, Nr + 1);
    s->xg = PLAN_F(p, TK * d);
    s->e_out = PLAN_F(p, TK * d);
    s->e_gate = PLAN_F(p, TK * Fm);
    s->e_up = PLAN_F(p, TK * Fm);
    s->emb = PLAN_F(p, T * d);
    s->cat = PLAN_F(p, T * 2 * d);
    s->rope_cos = PLAN_F(p, T * (r / 2 + 1));
    s->rope_sin = PLAN_F(p, T * (r / 2 + 1));
    s->attn = PLAN_F(p, s->nthreads * s->attn_per_thread);
    s->attn_parts = PLAN_F(p, (long)LONG_SLOTS * s->nthreads * LONG_ROWS * H * (L + 2));
    s->attn_state = PLAN_F(p, LONG_ROWS * H * (L + 2));
    s->share_cut = PLAN_F(p, SHARE_KINDS * (s->nthreads + 1));
    s->share_busy = PLAN_F(p, SHARE_KINDS * 16 * s->nthreads);
    s->prof = bufplan_take(p, PROFILE_LINE * (size_t)s->nthreads, sizeof(double));
    s->own = PLAN_F(p, s->nthreads * s->own_per_thread);
    s->q_latent = PLAN_F(p, (long)s->latent_rows * H * L);
    s->out_latent = PLAN_F(p, (long)s->latent_rows * H * L);
}

ForwardState *forward_state_new(const Model *m, int max_T, int capacity, Error *err) {
    const ModelConfig *c = &m->cfg;
    ForwardState *s = xcalloc(err, 1, sizeof *s, "forward state");
    if (!s) return NULL;
    s->max_T = max_T;
    s->max_decode = max_T < DECODE_MAX_ROWS ? max_T : DECODE_MAX_ROWS;
    s->latent_rows = s->max_decode < DECODE_LATENT_ROWS ? s->max_decode : DECODE_LATENT_ROWS;
    s->capacity = capacity;
    s->nthreads = omp_get_max_threads();
    // per-thread sizes padded to whole cache lines, so threads never share one
    s->attn_per_thread = (attn_scratch_floats(c, capacity) + 15) / 16 * 16;
    s->own_per_thread = (decode_own_floats(c, s->max_decode) + 15) / 16 * 16;
    Layout lay = {s, c};
    s->be = m->be;
    s->block = s->be->ops->alloc(s->be, bufplan_size(lay_state, &lay), "forward activations");
    if (!s->block) {
        err_set(err, "%s", s->be->err.msg);
        free(s);
        return NULL;
    }
    bufplan_lay(lay_state, &lay, s->block);
    share_cuts_equal(s);
    // one layer's activations: the residual stream is updated in place, nothing is kept
    LayerActs *a = &s->acts;
    a->x_in = a->x_mid = a->x_out = s->x;
    a->ln1 = a->ln2 = s->xn;
    a->qa = a->cq = s->qa;
    a->q = s->q;
    a->kva = s->kva;
    a->ckv_pre = NULL;
    a->ao = s->ao;
    a->y = s->y;
    a->ffn_gate = a->ffn_h = s->gate;
    a->ffn_up = s->up;
    a->router = s->router;
    a->scores = s->scores;
    a->topk_idx = s->topk_idx;
    a->topk_w = s->topk_w;
    a->slot_of = s->slot_of;
    a->slot_tk = s->slot_tk;
    a->slot_tk_token = s->slot_tk_token;
    a->expert_off = s->expert_off;
    a->xg = s->xg;
    a->e_gate = a->e_h = s->e_gate;
    a->e_up = s->e_up;
    a->e_out = s->e_out;
    return s;
}

void forward_state_record_routes(ForwardState *s, int *routes) { s->routes = routes; }

void share_cuts_set(ForwardState *s, int kind, const double *f) {
    int nt = s->nthreads;
    float *cut = s->share_cut + kind * (nt + 1);
    double sum = 0;
    for (int t = 0; t < nt; t++) sum += f[t];
    cut[0] = 0.0f;
    for (int t = 0; t < nt; t++) cut[t + 1] = (float)(cut[t] + f[t] / sum);
    cut[nt] = 1.0f;
}

// Every kind's cuts from the fractions f, and no time measured yet.
static void share_cuts_all(ForwardState *s, const double *f) {
    for (int k = 0; k < SHARE_KINDS; k++) share_cuts_set(s, k, f);
    memset(s->share_busy, 0, sizeof(float) * SHARE_KINDS * 16 * s->nthreads);
}

void share_cuts_equal(ForwardState *s) {
    double f[s->nthreads];
    for (int t = 0; t < s->nthreads; t++) f[t] = 1.0;
    share_cuts_all(s, f);
}

int forward_state_set_shares(ForwardState *s, const float *fractions, int n, Error *err) {
    if (!fractions) {
        s->share_fixed = 0;
        share_cuts_equal(s);
        return 0;
    }
    if (n != s->nthreads) return err_set(err, "thread shares: %d fractions for a team of %d threads", n, s->nthreads);
    double sum = 0, f[n];
    for (int t = 0; t < n; t++) {
        if (!(fractions[t] >= 0.0f && fractions[t] <= 1.0f))
            return err_set(err, "thread shares: fraction %d is %g, not in [0, 1]", t, fractions[t]);
        sum += f[t] = fractions[t];
    }
    if (fabs(sum - 1.0) > 1e-4) return err_set(err, "thread shares: the fractions sum to %g, not 1", sum);
    s->share_fixed = 1;
    share_cuts_all(s, f);
    return 0;
}

void forward_state_profile(ForwardState *s, int on) {
    s->profile = on != 0;
    memset(s->prof, 0, sizeof(double) * PROFILE_LINE * s->nthreads);
    s->prof_steps = 0;
    s->prof_seconds = 0;
}

void forward_state_profile_take(ForwardState *s, DecodeProfile *out) {
    *out = (DecodeProfile){.steps = s->prof_steps, .seconds = s->prof_seconds};
    for (int t = 0; t < s->nthreads; t++) {
        const double *p = s->prof + PROFILE_LINE * t;
        out->products += p[PROFILE_PRODUCTS] / s->nthreads;
        out->attention += p[PROFILE_ATTENTION] / s->nthreads;
        out->meetings += p[PROFILE_MEETINGS] / s->nthreads;
    }
    forward_state_profile(s, s->profile);
}

int forward_state_shares(const ForwardState *s, float *fractions, int n) {
    for (int t = 0; t < n && t < s->nthreads; t++) fractions[t] = s->share_cut[t + 1] - s->share_cut[t];
    return s->nthreads;
}

void forward_state_free(ForwardState *s) {
    if (!s) return;
    s->be->ops->free(s->be, s->block);
    free(s);
}

LayerPass forward_pass(const Model *m, ForwardState *s, const KVCache *kv, int T, int pos0, AttnMode mode) {
    const ModelConfig *c = &m->cfg;
    rope_table(s->rope_cos, s->rope_sin, T, c->qk_rope_head_dim, pos0, m->inv_freq, m->rope_mscale);
    return (LayerPass){.be = m->be, .c = c, .B = 1, .T = T, .pos0 = pos0, .rope_cos = s->rope_cos, .rope_sin = s->rope_sin,
                       .softmax_scale = m->softmax_scale, .blocks = kv->blocks, .block_size = kv->pool->block_size,
                       .store = kv->dtype, .mode = mode, .moe_parallel = m->moe_parallel,
                       .scratch = s->attn,
                       .per_thread = s->attn_per_thread};
}

// Points the pass at cache layer l (main layers first, then the MTP modules' layers).
static void pass_layer(LayerPass *p, const ModelConfig *c, KVCache *kv, int l) {
    p->layer = l;
    p->latent = kvcache_latent(kv, c, l);
    p->kpe = kvcache_kpe(kv, c, l);
}

// Checks a call of T tokens at pos0 and makes room for them in the cache.
static int check_call(const Model *m, const ForwardState *s, KVCache *kv, int T, int pos0, const int *tokens,
                      Error *err) {
    if (T < 1 || T > s->max_T) return err_set(err, "forward: %d tokens, but the state holds at most %d", T, s->max_T);
    if (pos0 + T > kv->capacity || pos0 + T > s->capacity)
        return err_set(err, "forward: positions up to %d exceed the KV cache capacity %d", pos0 + T,
                       kv->capacity < s->capacity ? kv->capacity : s->capacity);
    for (int t = 0; t < T; t++)
        if (tokens[t] < 0 || tokens[t] >= m->cfg.vocab_size)
            return err_set(err, "token %d at position %d is outside the vocabulary [0, %d)", tokens[t], pos0 + t,
                           m->cfg.vocab_size);
    return kvcache_reserve(kv, pos0 + T, err);
}

// The final norm and the head: hidden (T, d) = norm(x) when asked, logits (T, vocab) and
// last_logits (vocab) when asked.
static int head_forward(const Model *m, ForwardState *s, const float *norm, const MatView *head, int T,
                        float *logits, float *last_logits, float *hidden) {
    Backend *be = m->be;
    int d = m->cfg.hidden_size;
    TRY(be->ops->rmsnorm(be, s->xn, d, NULL, s->x, d, norm, T, d, m->cfg.rms_norm_eps));
    if (hidden) memcpy(hidden, s->xn, sizeof(float) * T * d);
    if (logits) TRY(be->ops->matmul(be, logits, s->xn, head, T, NULL));
    if (last_logits) TRY(be->ops->matmul(be, last_logits, s->xn + (size_t)(T - 1) * d, head, 1, NULL));
    return be->ops->synchronize(be);  // the caller reads the results
}

// The backend's error, as the caller's.
static int backend_failed(const Model *m, Error *err) { return err_set(err, "%s", m->be->err.msg); }

int model_forward(const Model *m, ForwardState *s, KVCache *kv, const int *tokens, int T, AttnMode mode,
                  float *logits, float *last_logits, float *hidden, Error *err) {
    const ModelConfig *c = &m->cfg;
    int pos0 = kv->len;
    if (check_call(m, s, kv, T, pos0, tokens, err)) return -1;
    if (T == 1 && mode == ATTN_ABSORBED) {
        DecodeSeq one = {.kv = kv, .tokens = tokens, .T = 1};
        if (model_decode(m, s, &one, 1, logits ? logits : last_logits, hidden, err)) return -1;
        if (logits && last_logits) memcpy(last_logits, logits, sizeof(float) * c->vocab_size);
        return 0;
    }
    Backend *be = m->be;
    if (be->ops->embedding(be, s->x, &m->w.embed_tokens, tokens, T)) return backend_failed(m, err);
    LayerPass p = forward_pass(m, s, kv, T, pos0, mode);
    for (int l = 0; l < c->num_hidden_layers; l++) {
        double balance;
        pass_layer(&p, c, kv, l);
        if (layer_forward(&p, &m->w.layers[l], &s->acts, NULL, &balance)) return backend_failed(m, err);
        if (s->routes) {
            size_t K = c->num_experts_per_tok > 0 ? c->num_experts_per_tok : 1;
            int *dst = s->routes + (size_t)l * T * K;
            if (m->w.layers[l].is_moe) memcpy(dst, s->topk_idx, sizeof(int) * T * K);
            else
                for (size_t i = 0; i < T * K; i++) dst[i] = -1;
        }
    }
    kv->len += T;
    return head_forward(m, s, m->w.norm, &m->w.lm_head, T, logits, last_logits, hidden) ? backend_failed(m, err) : 0;
}

int model_mtp_forward(const Model *m, ForwardState *s, KVCache *kv, int k, const int *next_tokens,
                      const float *hidden, int T, AttnMode mode, float *logits, float *hidden_out, Error *err) {
    const ModelConfig *c = &m->cfg;
    if (k < 0 || k >= m->w.n_mtp || k >= kv->n_mtp)
        return err_set(err, "MTP module %d: the model has %d MTP modules loaded", k, m->w.n_mtp);
    const MtpWeights *w = &m->w.mtp[k];
    int pos0 = kv->mtp_len[k];
    if (check_call(m, s, kv, T, pos0, next_tokens, err)) return -1;
    if (T == 1 && mode == ATTN_ABSORBED) {
        DecodeSeq one = {.kv = kv, .tokens = next_tokens, .T = 1};
        return model_mtp_decode(m, s, k, &one, 1, hidden, logits, hidden_out, err);
    }
    Backend *be = m->be;
    double balance;
    LayerPass p = forward_pass(m, s, kv, T, pos0, mode);
    pass_layer(&p, c, kv, c->num_hidden_layers + k);
    if (be->ops->embedding(be, s->emb, &w->embed_tokens, next_tokens, T) ||
        mtp_input_forward(be, NULL, c, w, s->emb, hidden, s->cat, NULL, NULL, s->x, T) ||
        layer_forward(&p, &w->layer, &s->acts, NULL, &balance))
        return backend_failed(m, err);
    kv->mtp_len[k] += T;
    return head_forward(m, s, w->shared_head_norm, &w->shared_head_head, T, logits, NULL, hidden_out)
               ? backend_failed(m, err)
               : 0;
}
