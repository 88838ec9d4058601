// The training model: tensor list and parameter block, activation plan, checkpoint I/O, and the
// model-level forward/backward (embedding, layers, final norm, head, cross-entropy, MTP modules).
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/bufplan.h"
#include "base/file.h"
#include "base/rng.h"
#include "base/safetensors.h"
#include "kernels/matmul.h"
#include "kernels/ops.h"
#include "model/convert_checkpoint.h"
#include "train/train_model.h"

// ---- tensors and the parameter block ----

const TrainTensor *train_model_tensor(const TrainModel *m, const char *name) {
    for (int i = 0; i < m->n_tensors; i++)
        if (strcmp(m->tensors[i].name, name) == 0) return &m->tensors[i];
    return NULL;
}

// Binds one tensor of the walk to its place in a block: the walk visits tensors in the order of
// m->tensors, so the i-th visit is m->tensors[i].
typedef struct {
    const TrainModel *m;
    float *base;
    int i;
} BlockBinder;

static int bind_tensor(const TensorSpec *t, void *ctx) {
    BlockBinder *b = ctx;
    const TrainTensor *tt = &b->m->tensors[b->i++];
    float *at = tt->remote ? NULL : b->base + tt->offset;  // a remote expert's view has no data here
    if (t->mat) *t->mat = matview_f32(at, (int)tt->shape[0], (int)tt->shape[1]);
    if (t->vec) *t->vec = at;
    return 0;
}

// w: the model's weights seen over one block (parameters or gradients).
static int bind_block(TrainModel *m, ModelWeights *w, float *base, Error *err) {
    const ModelConfig *c = &m->cfg;
    int D = c->num_nextn_predict_layers;
    if (weights_alloc_tables(w, c, D, err)) return -1;
    w->n_mtp = D;
    BlockBinder b = {m, base, 0};
    tensor_walk(c, D, w, bind_tensor, &b);
    if (c->tie_word_embeddings) w->lm_head = w->embed_tokens;
    return 0;
}

static void free_block_tables(ModelWeights *w, const ModelConfig *c) {
    w->vectors = NULL;  // the vectors live in the block, not in a table of their own
    weights_free(w, c);
}

// ---- the activation plan ----

static long lmax(long a, long b) { return a > b ? a : b; }
static long lmin(long a, long b) { return a < b ? a : b; }

// One layer's saved activations; kva, y and xg are shared scratch (not read by the backward pass).
static void plan_layer(const TrainModel *m, BufPlan *p, TrainLayerActs *t, int is_moe, int B, int T) {
    const ModelConfig *c = &m->cfg;
    LayerActs *a = &t->acts;
    const TrainActs *s = &m->a;
    long N = (long)B * T, d = c->hidden_size, H = c->num_attention_heads, nope = c->qk_nope_head_dim;
    long r = c->qk_rope_head_dim, v = c->v_head_dim, L = c->kv_lora_rank, qr = c->q_lora_rank;
    long Nr = c->n_routed_experts, K = c->num_experts_per_tok, Fm = c->moe_intermediate_size;
    long F = is_moe ? (long)c->n_shared_experts * Fm : c->intermediate_size;
    memset(t->kept, 0, sizeof t->kept);
    // a buffer that only a linear layer's weight gradient reads again: the layer's own fp32, or
    // (FP8 storage) shared fp32 scratch plus the layer's FP8 copy
#define KEPT(k, rows, cols)                                                                             \
    (m->fp8_storage ? (t->kept[k] = (Fp8Kept){(uint8_t *)bufplan_take(p, (size_t)(rows) * (cols), 1),   \
                                              PLAN_F(p, (rows) * (((cols) + 127) / 128)), (rows), (int)(cols)}, \
                       s->kept_fp32[k])                                                                 \
                    : PLAN_F(p, (rows) * (cols)))
    a->x_in = PLAN_F(p, N * d);
    a->ln1 = KEPT(KEPT_LN1, N, d);
    a->ln1_rstd = PLAN_F(p, N);
    a->qa = qr > 0 ? PLAN_F(p, N * qr) : NULL;
    a->cq = qr > 0 ? KEPT(KEPT_CQ, N, qr) : NULL;
    a->cq_rstd = qr > 0 ? PLAN_F(p, N) : NULL;
    a->q = PLAN_F(p, N * H * (nope + r));
    a->kva = s->kva;
    a->ckv_pre = PLAN_F(p, N * L);
    t->ckv = PLAN_F(p, N * L);
    a->ckv_rstd = PLAN_F(p, N);
    t->kpe = PLAN_F(p, N * lmax(r, 1));
    a->kv = PLAN_F(p, N * H * (nope + v));
    a->att = PLAN_F(p, (long)B * H * T * T);
    a->ao = KEPT(KEPT_AO, N, H * v);
    a->y = s->y;
    a->x_mid = PLAN_F(p, N * d);
    a->ln2 = PLAN_F(p, N * d);
    a->ln2_rstd = PLAN_F(p, N);
    a->ffn_gate = F > 0 ? KEPT(KEPT_FFN_GATE, N, F) : NULL;
    a->ffn_up = F > 0 ? KEPT(KEPT_FFN_UP, N, F) : NULL;
    a->ffn_h = F > 0 ? (m->fp8_storage ? s->ffn_h_fp32 : PLAN_F(p, N * F)) : NULL;
    if (!is_moe) return;
    a->router = PLAN_F(p, N * Nr);
    a->scores = PLAN_F(p, N * Nr);
    a->topk_idx = PLAN_I(p, N * K);
    a->topk_w = PLAN_F(p, N * K);
    a->slot_of = PLAN_I(p, N * K);
    a->slot_tk = PLAN_I(p, N * K);
    a->slot_tk_token = PLAN_I(p, N * K);
    a->expert_off = PLAN_I(p, Nr + 1);
    a->xg = s->xg;
    a->e_gate = KEPT(KEPT_E_GATE, N * K, Fm);
    a->e_up = KEPT(KEPT_E_UP, N * K, Fm);
    a->e_h = m->fp8_storage ? s->e_h_fp32 : PLAN_F(p, N * K * Fm);
    a->e_out = PLAN_F(p, N * K * d);
    a->bal_f = PLAN_F(p, (long)B * Nr);
#undef KEPT
}

static void plan_acts(BufPlan *p, void *ctx) {
    TrainModel *m = ctx;
    const ModelConfig *c = &m->cfg;
    TrainActs *a = &m->a;
    LayerGradScratch *g = &a->gs;
    int B = m->B, T = m->T, D = c->num_nextn_predict_layers, nl = c->num_hidden_layers;
    long N = (long)B * T, d = c->hidden_size, V = c->vocab_size, H = c->num_attention_heads;
    long nope = c->qk_nope_head_dim, r = c->qk_rope_head_dim, v = c->v_head_dim, L = c->kv_lora_rank;
    long qr = c->q_lora_rank, Nr = c->n_routed_experts, K = c->num_experts_per_tok, Fm = c->moe_intermediate_size;
    long F = lmax(c->intermediate_size, (long)c->n_shared_experts * Fm);
    long NK = N * lmax(K, 1);
    // shared scratch first: the layers' plans point into it
    a->kva = PLAN_F(p, N * (L + r));
    a->y = PLAN_F(p, N * d);
    a->xg = PLAN_F(p, NK * d);
    a->attn = PLAN_F(p, (size_t)omp_get_max_threads() * a->attn_per_thread);
    if (m->fp8_storage) {  // the kept buffers' fp32 form, as large as any layer's
        a->kept_fp32[KEPT_LN1] = PLAN_F(p, N * d);
        a->kept_fp32[KEPT_CQ] = PLAN_F(p, N * lmax(qr, 1));
        a->kept_fp32[KEPT_AO] = PLAN_F(p, N * H * v);
        a->kept_fp32[KEPT_FFN_GATE] = PLAN_F(p, N * F);
        a->kept_fp32[KEPT_FFN_UP] = PLAN_F(p, N * F);
        a->ffn_h_fp32 = PLAN_F(p, N * F);
        a->kept_fp32[KEPT_E_GATE] = PLAN_F(p, NK * lmax(Fm, 1));
        a->kept_fp32[KEPT_E_UP] = PLAN_F(p, NK * lmax(Fm, 1));
        a->e_h_fp32 = PLAN_F(p, NK * lmax(Fm, 1));
    }
    a->tokens = PLAN_I(p, (long)B * (T + 1));
    a->inputs = PLAN_I(p, N);
    a->targets = PLAN_I(p, N);
    for (int l = 0; l < nl; l++) plan_layer(m, p, &a->layers[l], config_is_moe_layer(c, l), B, T);
    a->x_final = PLAN_F(p, N * d);
    for (int l = 0; l < nl; l++) a->layers[l].acts.x_out = l + 1 < nl ? a->layers[l + 1].acts.x_in : a->x_final;
    a->lnf = PLAN_F(p, N * d);
    a->lnf_rstd = PLAN_F(p, N);
    a->head_logits = PLAN_F(p, lmin(N, TRAIN_HEAD_ROWS) * V);
    a->head_grad = PLAN_F(p, V * d);
    a->lse = PLAN_F(p, N);
    a->losses = PLAN_F(p, N);
    for (int k = 1; k <= D; k++) {
        TrainMtpActs *t = &a->mtp[k - 1];
        long Nk = (long)B * (T - k);
        t->T = T - k;
        t->N = (int)Nk;
        t->in_tok = PLAN_I(p, Nk);
        t->targets = PLAN_I(p, Nk);
        t->emb = PLAN_F(p, Nk * d);
        t->h_in = PLAN_F(p, Nk * d);
        t->en_rstd = PLAN_F(p, Nk);
        t->hn_rstd = PLAN_F(p, Nk);
        t->cat = PLAN_F(p, Nk * 2 * d);
        plan_layer(m, p, &t->layer, config_is_moe_layer(c, nl + k - 1), B, T - k);
        t->layer.acts.x_out = PLAN_F(p, Nk * d);
        t->h_out = PLAN_F(p, Nk * d);
        t->h_rstd = PLAN_F(p, Nk);
        t->lse = PLAN_F(p, Nk);
        t->losses = PLAN_F(p, Nk);
        t->dh_out = PLAN_F(p, Nk * d);
    }
    a->dres = PLAN_F(p, N * d);
    a->dlnf = PLAN_F(p, N * d);
    g->dln = PLAN_F(p, N * d);
    g->dq = PLAN_F(p, N * H * (nope + r));
    g->dqa = qr > 0 ? PLAN_F(p, N * qr) : NULL;
    g->dcq = qr > 0 ? PLAN_F(p, N * qr) : NULL;
    g->dkv = PLAN_F(p, N * H * (nope + v));
    g->dckv = PLAN_F(p, N * L);
    g->dckv_pre = PLAN_F(p, N * L);
    g->dkpe = PLAN_F(p, N * r);
    g->dkpe_heads = PLAN_F(p, N * H * r);
    g->dkva = PLAN_F(p, N * (L + r));
    g->dao = PLAN_F(p, N * H * v);
    g->dffn_gate = PLAN_F(p, N * F);
    g->dffn_up = PLAN_F(p, N * F);
    g->dffn_h = PLAN_F(p, N * F);
    if (Nr > 0) {
        g->de_out = PLAN_F(p, NK * d);
        g->dxg = PLAN_F(p, NK * d);
        g->de_gate = PLAN_F(p, NK * Fm);
        g->de_up = PLAN_F(p, NK * Fm);
        g->de_h = PLAN_F(p, NK * Fm);
        g->dtopk_w = PLAN_F(p, NK);
        g->dscores = PLAN_F(p, N * Nr);
        g->drouter = PLAN_F(p, N * Nr);
    }
    if (D > 0) {
        a->dcat = PLAN_F(p, N * 2 * d);
        a->den = PLAN_F(p, N * d);
        a->dhn = PLAN_F(p, N * d);
        a->demb = PLAN_F(p, N * d);
        a->dh_prev = PLAN_F(p, N * d);
    }
}

// ---- construction ----

// The gradient groups (TrainGradsDone): each a contiguous range of the block, since the block is
// laid out in tensor_walk order, layer by layer.
static int plan_grad_groups(TrainModel *m, const TensorSpec *specs, Error *err) {
    int ng = TRAIN_GRADS_EMBED(m) + 1;
    m->grad_groups = xcalloc(err, ng, sizeof *m->grad_groups, "gradient groups");
    if (!m->grad_groups) return -1;
    m->n_grad_groups = ng;
    size_t *end = xcalloc(err, ng, sizeof *end, "gradient groups");
    if (!end) return -1;
    for (int g = 0; g < ng; g++) m->grad_groups[g].offset = SIZE_MAX;
    for (int i = 0; i < m->n_tensors; i++) {
        const TrainTensor *t = &m->tensors[i];
        int g = specs[i].layer >= 0                                      ? specs[i].layer
                : strcmp(t->name, "model.embed_tokens.weight") == 0 ? TRAIN_GRADS_EMBED(m)
                                                                     : TRAIN_GRADS_HEAD(m);
        m->tensors[i].group = g;
        if (t->shared || t->remote) continue;
        TrainGradGroup *gg = &m->grad_groups[g];
        if (gg->offset == SIZE_MAX) gg->offset = t->offset;
        else if (t->offset != end[g]) {
            free(end);
            return err_set(err, "%s: its layer's tensors are not contiguous in the parameter block", t->name);
        }
        end[g] = t->offset + t->numel;
        gg->n += t->numel;
    }
    for (int g = 0; g < ng; g++)
        if (m->grad_groups[g].offset == SIZE_MAX) m->grad_groups[g].offset = 0;  // empty (no lm_head when tied)
    free(end);
    return 0;
}

// Training's fp32 products — the linear layers without a low-precision recipe, and the heads in
// every precision — through the library GEMM (backend.h): no row of a training batch needs the bits
// it would have in another batch.
static const LinearRecipe train_f32 = {.f32 = 1};
static const LinearRecipe train_head_bf16 = {.fmt = LOWP_BF16, .grad_fmt = LOWP_BF16};  // (head_bf16)

// What the linear layers run under: the low-precision recipe, or else fp32 through the library.
static const LinearRecipe *linear_recipe(const TrainModel *m) { return m->lowp ? m->lowp : &train_f32; }

int train_model_new(TrainModel *m, const ModelConfig *c, int B, int T, Error *err) {
    return train_model_new_sharded(m, c, B, T, 1, 0, err);
}

int train_model_new_sharded(TrainModel *m, const ModelConfig *c, int B, int T, int ep_size, int ep_rank, Error *err) {
    memset(m, 0, sizeof *m);
    m->be = backend_cpu();
    m->cfg = *c;
    m->B = B;
    m->T = T;
    int D = c->num_nextn_predict_layers, nl = c->num_hidden_layers, Nr = c->n_routed_experts;
    if (B < 1 || T < 1) return err_set(err, "training batch %d × %d: both must be positive", B, T);
    if (ep_size < 1 || ep_rank < 0 || ep_rank >= ep_size || (ep_size > 1 && (Nr <= 0 || Nr % ep_size)))
        return err_set(err, "%d routed experts cannot be split over %d ranks", Nr, ep_size);
    m->ep_size = ep_size, m->ep_rank = ep_rank;
    if (D > 0 && T <= D)
        return err_set(err, "sequence length %d: the %d MTP module(s) need at least %d positions", T, D, D + 1);
    if (T > c->max_position_embeddings)
        return err_set(err, "sequence length %d exceeds max_position_embeddings %d", T, c->max_position_embeddings);
    TensorSpec *specs = NULL;
    int n;
    if (tensor_specs(c, &specs, &n, err)) return -1;
    m->tensors = xcalloc(err, n, sizeof *m->tensors, "training tensor list");
    if (!m->tensors) goto fail;
    m->n_tensors = n;
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        TrainTensor *t = &m->tensors[i];
        snprintf(t->name, sizeof t->name, "%s", specs[i].name);
        t->kind = specs[i].kind;
        t->ndim = specs[i].ndim;
        t->shape[0] = specs[i].shape[0];
        t->shape[1] = specs[i].ndim == 2 ? specs[i].shape[1] : 1;
        t->numel = (size_t)t->shape[0] * t->shape[1];
        t->shared = specs[i].mtp_copy;
        t->expert = specs[i].expert;
        t->remote = ep_size > 1 && t->expert >= 0 && t->expert / (Nr / ep_size) != ep_rank;
        if (t->shared || t->remote) continue;
        t->offset = off;
        off += t->numel;
    }
    m->n_params = off;
    if (plan_grad_groups(m, specs, err)) goto fail;
    // the shared copies take the storage of the embedding and of the head
    const TrainTensor *emb = train_model_tensor(m, "model.embed_tokens.weight");
    const TrainTensor *head = c->tie_word_embeddings ? emb : train_model_tensor(m, "lm_head.weight");
    for (int i = 0; i < n; i++)
        if (m->tensors[i].shared) m->tensors[i].offset = strstr(m->tensors[i].name, "shared_head") ? head->offset : emb->offset;
    // the backend's memory (on a 64-byte line, zeroed), the gradients a whole number of lines after
    // the parameters (as the optimiser's moments: the update writes all of them around the cache)
    size_t stride = (m->n_params + 15) & ~(size_t)15;
    m->params = m->be->ops->alloc(m->be, 2 * stride * sizeof(float), "the parameters and gradients");
    if (!m->params) {
        err_set(err, "%s", m->be->err.msg);
        goto fail;
    }
    m->grads = m->params + stride;
    if (bind_block(m, &m->p, m->params, err) || bind_block(m, &m->g, m->grads, err)) goto fail;
    for (int l = 0; l < nl + D; l++) m->n_moe += config_is_moe_layer(c, l);
    m->moe_bias = xcalloc(err, m->n_moe > 0 ? m->n_moe : 1, sizeof *m->moe_bias, "router bias table");
    m->expert_load = xcalloc(err, (size_t)(m->n_moe > 0 ? m->n_moe : 1) * (Nr > 0 ? Nr : 1), sizeof(long long),
                             "expert loads");
    if (!m->moe_bias || !m->expert_load) goto fail;
    for (int l = 0, j = 0; l < nl + D; l++) {
        const LayerWeights *ly = l < nl ? &m->p.layers[l] : &m->p.mtp[l - nl].layer;
        if (ly->is_moe) m->moe_bias[j++] = ly->moe.e_score_correction_bias;
    }
    int r = c->qk_rope_head_dim;
    m->inv_freq = xcalloc(err, r / 2 + 1, sizeof(double), "RoPE frequencies");
    m->rope_cos = xcalloc(err, (size_t)T * (r / 2) + 1, sizeof(float), "RoPE table");
    m->rope_sin = xcalloc(err, (size_t)T * (r / 2) + 1, sizeof(float), "RoPE table");
    if (!m->inv_freq || !m->rope_cos || !m->rope_sin) goto fail;
    rope_inv_freq(m->inv_freq, r, c->rope_theta, c->rope_yarn, c->rope_factor, c->rope_original_max_position,
                  c->rope_beta_fast, c->rope_beta_slow);
    m->rope_mscale = (float)(config_yarn_mscale(c, c->rope_mscale) / config_yarn_mscale(c, c->rope_mscale_all_dim));
    m->softmax_scale = config_softmax_scale(c);
    rope_table(m->rope_cos, m->rope_sin, T, r, 0, m->inv_freq, m->rope_mscale);
    m->a.layers = xcalloc(err, nl, sizeof *m->a.layers, "layer activations");
    m->a.mtp = xcalloc(err, D > 0 ? D : 1, sizeof *m->a.mtp, "MTP activations");
    if (!m->a.layers || !m->a.mtp) goto fail;
    m->a.attn_per_thread = (attn_scratch_floats(c, T) + 15) / 16 * 16;
    m->act_bytes = bufplan_size(plan_acts, m);
    m->act_block = m->be->ops->alloc(m->be, m->act_bytes, "training activations");
    if (!m->act_block) {
        err_set(err, "micro-batch %d × %d: %s", B, T, m->be->err.msg);
        goto fail;
    }
    bufplan_lay(plan_acts, m, m->act_block);
    m->obj.mtp_lambda = D > 0 ? 0.3f : 0.0f;
    m->obj.seq_aux_alpha = 0.0001f;
    free(specs);
    return 0;
fail:
    free(specs);
    train_model_free(m);
    return -1;
}

int train_model_set_recipe(TrainModel *m, const LinearRecipe *recipe, Error *err) {
    if (recipe) m->recipe = *recipe;
    m->lowp = recipe ? &m->recipe : NULL;
    int want = recipe && recipe->fmt != LOWP_BF16;
    if (want == m->fp8_storage) return 0;
    // The old layout's block goes first: holding both at once put the process's peak at their sum
    // (v3-10m-train, fp8: 687 MB against 373 for the model with its bf16 layout).
    m->be->ops->free(m->be, m->act_block);
    m->fp8_storage = want;
    size_t bytes = bufplan_size(plan_acts, m);
    m->act_block = m->be->ops->alloc(m->be, bytes, "training activations");
    if (!m->act_block) {
        Error why = {0};
        err_set(&why, "micro-batch %d × %d: %s", m->B, m->T, m->be->err.msg);
        m->fp8_storage = !want;  // the previous layout back, where its memory can still be had
        m->act_bytes = bufplan_size(plan_acts, m);
        m->act_block = m->be->ops->alloc(m->be, m->act_bytes, "training activations");
        if (m->act_block) bufplan_lay(plan_acts, m, m->act_block);
        else m->act_bytes = 0;
        return err_set(err, "%s%s", why.msg, m->act_block ? "" : " (and the previous layout's again: free the model)");
    }
    m->act_bytes = bytes;
    bufplan_lay(plan_acts, m, m->act_block);
    return 0;
}

void train_model_free(TrainModel *m) {
    free_block_tables(&m->p, &m->cfg);
    free_block_tables(&m->g, &m->cfg);
    free(m->tensors);
    free(m->grad_groups);
    if (m->params) m->be->ops->free(m->be, m->params);
    free(m->moe_bias);
    free(m->expert_load);
    free(m->inv_freq);
    free(m->rope_cos);
    free(m->rope_sin);
    free(m->a.layers);
    free(m->a.mtp);
    if (m->act_block) m->be->ops->free(m->be, m->act_block);
    memset(m, 0, sizeof *m);
}

void train_model_init_random(TrainModel *m, uint64_t seed) {
    Rng rng;
    rng_seed(&rng, seed);
    float std = m->cfg.initializer_range;
    for (int i = 0; i < m->n_tensors; i++) {
        const TrainTensor *t = &m->tensors[i];
        if (t->shared) continue;
        if (t->remote) {  // its draws, so that the tensors after it get the values they get everywhere
            for (size_t j = 0; j < t->numel; j++) rng_normal(&rng);
            continue;
        }
        float *w = m->params + t->offset;
        for (size_t j = 0; j < t->numel; j++)
            w[j] = t->kind == TENSOR_NORM ? 1.0f : t->kind == TENSOR_BIAS ? 0.0f : std * rng_normal(&rng);
    }
}

// ---- checkpoints ----

int train_model_load(TrainModel *m, const char *dir, Error *err) {
    StModel st;
    if (st_model_open(&st, dir, err)) return -1;
    int rc = -1;
    for (int i = 0; i < m->n_tensors; i++) {
        const TrainTensor *t = &m->tensors[i];
        if (t->shared || t->remote) continue;
        const StTensor *s = st_model_find(&st, t->name);
        if (!s) {
            err_set(err, "%s: tensor %s: missing", dir, t->name);
            goto done;
        }
        int64_t cols = s->ndim == 2 ? s->shape[1] : 1;
        if (s->ndim != t->ndim || s->shape[0] != t->shape[0] || cols != t->shape[1]) {
            err_set(err, "%s: tensor %s: shape does not match the configuration ([%lld, %lld] expected)", s->file,
                    t->name, (long long)t->shape[0], (long long)t->shape[1]);
            goto done;
        }
        MatView v = {.dtype = s->dtype, .rows = (int)t->shape[0], .cols = (int)cols, .data = s->data, .block = 128};
        if (s->dtype == DT_F8_E4M3) {
            char sname[160];
            snprintf(sname, sizeof sname, "%s_scale_inv", t->name);
            const StTensor *sc = st_model_find(&st, sname);
            int br = m->cfg.fp8_block[0] > 0 ? m->cfg.fp8_block[0] : 128;
            int bc = m->cfg.fp8_block[1] > 0 ? m->cfg.fp8_block[1] : 128;
            if (br != bc) {
                err_set(err, "%s: tensor %s: FP8 blocks %d×%d are not square", s->file, t->name, br, bc);
                goto done;
            }
            int64_t want_r = (t->shape[0] + br - 1) / br, want_c = (cols + bc - 1) / bc;
            if (!sc || sc->dtype != DT_F32 || sc->ndim != 2 || sc->shape[0] != want_r || sc->shape[1] != want_c) {
                err_set(err, "%s: tensor %s: missing or malformed (F32 [%lld, %lld] expected)", s->file, sname,
                        (long long)want_r, (long long)want_c);
                goto done;
            }
            v.scale_inv = sc->data;
            v.scale_cols = (int)want_c;
            v.block = br;
        } else if (s->dtype != DT_F32 && s->dtype != DT_BF16 && s->dtype != DT_F16) {
            err_set(err, "%s: tensor %s: dtype %s cannot be trained", s->file, t->name, dtype_name(s->dtype));
            goto done;
        }
        float *w = m->params + t->offset;
        for (int row = 0; row < v.rows; row++) matview_row_f32(&v, row, w + (size_t)row * cols);
    }
    rc = 0;
done:
    st_model_close(&st);
    return rc;
}

int train_model_save_values(const TrainModel *m, const char *dir, const float *const *values, DType dtype,
                            size_t shard_bytes, Error *err) {
    return ckpt_save_f32(dir, &m->cfg, values, dtype, shard_bytes, err);
}

int train_model_save(const TrainModel *m, const char *dir, DType dtype, size_t shard_bytes, Error *err) {
    for (int i = 0; i < m->n_tensors; i++)
        if (m->tensors[i].remote) return err_set(err, "%s: held by another rank", m->tensors[i].name);
    const float **values = xcalloc(err, m->n_tensors ? m->n_tensors : 1, sizeof *values, "tensor list");
    if (!values) return -1;
    for (int i = 0; i < m->n_tensors; i++) values[i] = m->params + m->tensors[i].offset;
    int rc = train_model_save_values(m, dir, values, dtype, shard_bytes, err);
    free(values);
    return rc;
}

// ---- forward and backward ----

static int mtp_active(const TrainModel *m) { return m->cfg.num_nextn_predict_layers > 0 && m->obj.mtp_lambda > 0; }

// The pass of a layer over B windows of T positions from 0, its latent store the saved ckv/kpe.
// The pass of HF layer `layer` (MTP module k: num_hidden_layers + k − 1).
static LayerPass train_pass(const TrainModel *m, const TrainLayerActs *t, int T, int layer) {
    return (LayerPass){.moe_parallel = m->moe_parallel, .layer = layer, .be = m->be, .c = &m->cfg, .B = m->B, .T = T, .pos0 = 0, .rope_cos = m->rope_cos,
                       .rope_sin = m->rope_sin, .softmax_scale = m->softmax_scale, .latent = t->ckv, .kpe = t->kpe,
                       .ld = T, .mode = ATTN_PLAIN, .save = 1, .freeze_routing = m->freeze_routing,
                       .seq_aux_alpha = m->obj.seq_aux_alpha, .scratch = m->a.attn,
                       .per_thread = m->a.attn_per_thread, .recipe = linear_recipe(m)};
}

// The final norm, the head and the loss of rows (N, d) x: h (N, d) and its rstd saved; *loss the
// mean cross-entropy against targets. With dh (the forward of a training step): the loss's
// gradient too, each row's loss weighted dloss — dh (N, d) = its gradient of h (overwritten) and
// a->head_grad += its gradient of the head — so that no chunk's logits need to outlive it.
static int head_forward(TrainModel *m, const float *norm, const float *x, float *h, float *h_rstd, float *lse,
                        float *losses, const int *targets, int N, float dloss, float *dh, double *loss) {
    Backend *be = m->be;
    int d = m->cfg.hidden_size, V = m->cfg.vocab_size;
    float *logits = m->a.head_logits;  // (rows, V)
    MatView dw = matview_f32(m->a.head_grad, V, d);
    const LinearRecipe *recipe = m->head_bf16 ? &train_head_bf16 : &train_f32;  // (fp32 unless asked)
    TRY(be->ops->rmsnorm(be, h, d, h_rstd, x, d, norm, N, d, m->cfg.rms_norm_eps));
    if (dh) TRY(be->ops->zero(be, dh, (long)N * d));
    for (int r0 = 0; r0 < N; r0 += TRAIN_HEAD_ROWS) {
        int rows = N - r0 < TRAIN_HEAD_ROWS ? N - r0 : TRAIN_HEAD_ROWS;
        const float *hr = h + (size_t)r0 * d;
        double part;
        TRY(be->ops->matmul(be, logits, hr, &m->p.lm_head, rows, recipe));
        if (!dh) {
            TRY(be->ops->crossentropy(be, &part, losses + r0, lse + r0, logits, targets + r0, rows, V));
            continue;
        }
        TRY(be->ops->crossentropy_grad(be, &part, losses + r0, lse + r0, logits, targets + r0, rows, V, dloss));
        TRY(be->ops->matmul_backward(be, dh + (size_t)r0 * d, &dw, logits, hr, &m->p.lm_head, rows, recipe));
    }
    TRY(be->ops->synchronize(be));
    double sum = 0;  // in row order, however the rows were chunked
    for (int n = 0; n < N; n++) sum += losses[n];
    *loss = sum / N;
    return 0;
}

// FP8 storage: a layer's kept buffers, which its forward left in the shared fp32 scratch, into its
// FP8 copies; and back into the scratch before its backward pass.
// Whether kept buffer k is in use: with the experts split over ranks (moe_parallel) the routed
// experts' activations live in the exchange's state, not in the layer's, and are not kept here.
static int kept_in_use(const TrainModel *m, const TrainLayerActs *t, int k) {
    return t->kept[k].rows && !(m->moe_parallel && (k == KEPT_E_GATE || k == KEPT_E_UP));
}

static int keep_layer(TrainModel *m, TrainLayerActs *t) {
    for (int k = 0; k < N_KEPT; k++)
        if (kept_in_use(m, t, k))
            TRY(m->be->ops->fp8_save(m->be, t->kept[k].codes, t->kept[k].scales, m->a.kept_fp32[k], t->kept[k].rows,
                                     t->kept[k].cols, m->lowp && m->lowp->pow2_scales));
    return 0;
}

static int restore_layer(TrainModel *m, const TrainLayerActs *t) {
    for (int k = 0; k < N_KEPT; k++)
        if (kept_in_use(m, t, k))
            TRY(m->be->ops->fp8_restore(m->be, m->a.kept_fp32[k], t->kept[k].codes, t->kept[k].scales, t->kept[k].rows,
                                        t->kept[k].cols));
    // the SwiGLU outputs from the restored inputs (the report recomputes them rather than keep them)
    const Fp8Kept *fg = &t->kept[KEPT_FFN_GATE], *eg = &t->kept[KEPT_E_GATE];
    if (fg->rows)
        TRY(m->be->ops->swiglu(m->be, t->acts.ffn_h, t->acts.ffn_gate, t->acts.ffn_up, fg->rows * fg->cols));
    if (kept_in_use(m, t, KEPT_E_GATE))
        TRY(m->be->ops->swiglu(m->be, t->acts.e_h, t->acts.e_gate, t->acts.e_up, eg->rows * eg->cols));
    return 0;
}

// MTP module k (1-based): rows (b, i), i < T − k, of the previous stage's h (rows T − k + 1 per
// sequence) feed module k with Emb(t_{i+k}).
static int mtp_forward(TrainModel *m, int k, long long *load, double *bal, double *loss) {
    const ModelConfig *c = &m->cfg;
    Backend *be = m->be;
    TrainActs *a = &m->a;
    TrainMtpActs *t = &a->mtp[k - 1];
    const MtpWeights *w = &m->p.mtp[k - 1];
    int B = m->B, T = m->T, Tk = t->T, Tp = Tk + 1, d = c->hidden_size;
    const float *prev = k == 1 ? a->lnf : a->mtp[k - 2].h_out;  // (B, Tp, d)
    for (int b = 0; b < B; b++)
        for (int i = 0; i < Tk; i++) {
            t->in_tok[b * Tk + i] = a->tokens[(size_t)b * (T + 1) + i + k];
            t->targets[b * Tk + i] = a->tokens[(size_t)b * (T + 1) + i + k + 1];
            memcpy(t->h_in + ((size_t)b * Tk + i) * d, prev + ((size_t)b * Tp + i) * d, sizeof(float) * d);
        }
    int N = t->N;
    double layer_bal;
    LayerPass p = train_pass(m, &t->layer, Tk, c->num_hidden_layers + k - 1);
    TRY(be->ops->embedding(be, t->emb, &m->p.embed_tokens, t->in_tok, N));
    TRY(mtp_input_forward(be, linear_recipe(m), c, w, t->emb, t->h_in, t->cat, t->en_rstd, t->hn_rstd, t->layer.acts.x_in, N));
    TRY(layer_forward(&p, &w->layer, &t->layer.acts, load, &layer_bal));
    TRY(keep_layer(m, &t->layer));
    *bal += layer_bal;
    float dloss = m->obj.mtp_lambda / c->num_nextn_predict_layers / N;
    return head_forward(m, w->shared_head_norm, t->layer.acts.x_out, t->h_out, t->h_rstd, t->lse, t->losses,
                        t->targets, N, dloss, m->a.head_grads ? t->dh_out : NULL, loss);
}

// grads: keep the heads' gradients for a backward pass (TrainActs.head_grads).
static int forward(TrainModel *m, const int *tokens, int grads) {
    const ModelConfig *c = &m->cfg;
    TrainActs *a = &m->a;
    int B = m->B, T = m->T, N = B * T, Nr = c->n_routed_experts;
    a->head_grads = grads;
    if (grads) TRY(m->be->ops->zero(m->be, a->head_grad, (long)c->vocab_size * c->hidden_size));
    memcpy(a->tokens, tokens, sizeof(int) * B * (T + 1));
    for (int b = 0; b < B; b++)
        for (int i = 0; i < T; i++) {
            a->inputs[b * T + i] = tokens[(size_t)b * (T + 1) + i];
            a->targets[b * T + i] = tokens[(size_t)b * (T + 1) + i + 1];
        }
    TRY(m->be->ops->embedding(m->be, a->layers[0].acts.x_in, &m->p.embed_tokens, a->inputs, N));
    double bal = 0, layer_bal;
    int j = 0;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        long long *load = m->p.layers[l].is_moe ? m->expert_load + (size_t)(j++) * Nr : NULL;
        LayerPass p = train_pass(m, &a->layers[l], T, l);
        TRY(layer_forward(&p, &m->p.layers[l], &a->layers[l].acts, load, &layer_bal));
        TRY(keep_layer(m, &a->layers[l]));
        bal += layer_bal;
    }
    TRY(head_forward(m, m->p.norm, a->x_final, a->lnf, a->lnf_rstd, a->lse, a->losses, a->targets, N, 1.0f / N,
                     grads ? a->dlnf : NULL, &m->loss.main));
    m->loss.mtp = 0;
    m->mtp_ran = mtp_active(m);
    if (m->mtp_ran) {
        int D = c->num_nextn_predict_layers;
        for (int k = 1; k <= D; k++) {
            long long *load = m->p.mtp[k - 1].layer.is_moe ? m->expert_load + (size_t)(j++) * Nr : NULL;
            double lk;
            TRY(mtp_forward(m, k, load, &bal, &lk));
            m->loss.mtp += lk;
        }
        m->loss.mtp /= D;
    } else {
        for (; j < m->n_moe; j++) memset(m->expert_load + (size_t)j * Nr, 0, sizeof(long long) * Nr);
    }
    m->loss.balance = bal;
    m->loss.loss = m->loss.main + (m->mtp_ran ? m->obj.mtp_lambda * m->loss.mtp : 0) + bal;
    return 0;
}

static int run_forward(TrainModel *m, const int *tokens, int grads, Error *err) {
    int B = m->B, T = m->T, V = m->cfg.vocab_size;
    m->a.head_grads = 0;
    for (long i = 0; i < (long)B * (T + 1); i++)
        if (tokens[i] < 0 || tokens[i] >= V)
            return err_set(err, "token %d at batch position %ld is outside the vocabulary [0, %d)", tokens[i], i, V);
    if (forward(m, tokens, grads) || m->be->ops->synchronize(m->be)) {
        m->a.head_grads = 0;
        return err_set(err, "training forward: %s", m->be->err.msg);
    }
    return 0;
}

int train_model_forward(TrainModel *m, const int *tokens, Error *err) { return run_forward(m, tokens, 1, err); }

int train_model_evaluate(TrainModel *m, const int *tokens, Error *err) { return run_forward(m, tokens, 0, err); }

int train_model_logits(TrainModel *m, int module, float *out, Error *err) {
    int D = m->cfg.num_nextn_predict_layers;
    if (module < 0 || module > D || (module > 0 && !m->mtp_ran))
        return err_set(err, "training logits: module %d did not run in the last forward pass", module);
    const float *h = module ? m->a.mtp[module - 1].h_out : m->a.lnf;
    int N = module ? m->a.mtp[module - 1].N : m->B * m->T;
    if (m->be->ops->matmul(m->be, out, h, &m->p.lm_head, N, NULL) || m->be->ops->synchronize(m->be))
        return err_set(err, "training logits: %s", m->be->err.msg);
    return 0;
}

void train_model_zero_grad(TrainModel *m) {
    long n = (long)m->n_params, chunk = 1L << 16;
#pragma omp parallel for schedule(static)
    for (long b = 0; b < n; b += chunk) memset(m->grads + b, 0, sizeof(float) * (n - b < chunk ? n - b : chunk));
}

// The final norm's backward: dres (N, d) = the gradient of the head's input x (overwritten) from
// dh, the gradient of its output h (the head's, left by the forward pass, and the MTP modules').
static int head_backward(TrainModel *m, const float *norm, float *dnorm, const float *x, const float *h_rstd, int N,
                         const float *dh, float *dres) {
    int d = m->cfg.hidden_size;
    TRY(m->be->ops->zero(m->be, dres, (long)N * d));
    return m->be->ops->rmsnorm_backward(m->be, dres, dnorm, dh, x, norm, h_rstd, N, d);
}

// y (n) *= s.
static void scale_floats(float *y, long n, float s) {
#pragma omp parallel for schedule(static)
    for (long i = 0; i < n; i++) y[i] *= s;
}

// y (n) += s · x.
static void add_scaled(float *y, const float *x, long n, float s) {
#pragma omp parallel for schedule(static)
    for (long i = 0; i < n; i++) y[i] += s * x[i];
}

static int mtp_backward(TrainModel *m, int k, float scale) {
    const ModelConfig *c = &m->cfg;
    Backend *be = m->be;
    TrainActs *a = &m->a;
    TrainMtpActs *t = &a->mtp[k - 1];
    const MtpWeights *w = &m->p.mtp[k - 1];
    MtpWeights *g = &m->g.mtp[k - 1];
    int N = t->N, d = c->hidden_size, Tk = t->T, Tp = Tk + 1;
    TRY(head_backward(m, w->shared_head_norm, g->shared_head_norm, t->layer.acts.x_out, t->h_rstd, N, t->dh_out,
                      a->dres));
    LayerPass p = train_pass(m, &t->layer, Tk, c->num_hidden_layers + k - 1);
    TRY(restore_layer(m, &t->layer));
    TRY(layer_backward(&p, &w->layer, &g->layer, &t->layer.acts, &a->gs, a->dres, scale));
    TRY(be->ops->zero(be, a->demb, (long)N * d));
    TRY(be->ops->zero(be, a->dh_prev, (long)N * d));
    TRY(mtp_input_backward(be, linear_recipe(m), c, w, g, t->emb, t->h_in, t->cat, t->en_rstd, t->hn_rstd, a->dres, a->dcat, a->den,
                           a->dhn, a->demb, a->dh_prev, N));
    TRY(be->ops->embedding_backward(be, &m->g.embed_tokens, a->demb, t->in_tok, N));
    float *dprev = k == 1 ? a->dlnf : a->mtp[k - 2].dh_out;  // (B, Tp, d)
    for (int b = 0; b < m->B; b++)
        for (int i = 0; i < Tk; i++) {
            float *dst = dprev + ((size_t)b * Tp + i) * d;
            const float *src = a->dh_prev + ((size_t)b * Tk + i) * d;
            for (int j = 0; j < d; j++) dst[j] += src[j];
        }
    return 0;
}

// Tells the caller a group's gradients are final; the backend's queue is drained first.
static int grads_done(TrainModel *m, int group) {
    if (!m->grads_done) return 0;
    TRY(m->be->ops->synchronize(m->be));
    return m->grads_done(m->grads_done_ctx, group, &m->be->err);
}

static int backward(TrainModel *m, float scale) {
    const ModelConfig *c = &m->cfg;
    TrainActs *a = &m->a;
    int B = m->B, T = m->T, d = c->hidden_size, N = B * T;
    // the heads' gradients, which the forward pass left per unit of scale
    scale_floats(a->dlnf, (long)N * d, scale);
    if (m->mtp_ran) {
        int D = c->num_nextn_predict_layers;
        for (int k = 1; k <= D; k++) scale_floats(a->mtp[k - 1].dh_out, (long)a->mtp[k - 1].N * d, scale);
        for (int k = D; k >= 1; k--) {
            TRY(mtp_backward(m, k, scale));
            TRY(grads_done(m, c->num_hidden_layers + k - 1));
        }
    }
    TRY(head_backward(m, m->p.norm, m->g.norm, a->x_final, a->lnf_rstd, N, a->dlnf, a->dres));
    add_scaled((float *)m->g.lm_head.data, a->head_grad, (long)c->vocab_size * d, scale);
    TRY(grads_done(m, TRAIN_GRADS_HEAD(m)));
    for (int l = c->num_hidden_layers - 1; l >= 0; l--) {
        LayerPass p = train_pass(m, &a->layers[l], T, l);
        TRY(restore_layer(m, &a->layers[l]));
        TRY(layer_backward(&p, &m->p.layers[l], &m->g.layers[l], &a->layers[l].acts, &a->gs, a->dres, scale));
        TRY(grads_done(m, l));
    }
    TRY(m->be->ops->embedding_backward(m->be, &m->g.embed_tokens, a->dres, a->inputs, N));
    return grads_done(m, TRAIN_GRADS_EMBED(m));
}

int train_model_backward(TrainModel *m, float scale, Error *err) {
    if (!m->a.head_grads)
        return err_set(err, "training backward: no train_model_forward to follow (none yet, an evaluation, or a failed one)");
    m->a.head_grads = 0;  // consumed: the heads' gradients are scaled in place
    return backward(m, scale) || m->be->ops->synchronize(m->be) ? err_set(err, "training backward: %s", m->be->err.msg)
                                                                  : 0;
}
