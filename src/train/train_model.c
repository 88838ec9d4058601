// The training model: tensor list and parameter block, activation plan, checkpoint I/O, and the
// model-level forward/backward (embedding, layers, final norm, head, cross-entropy, MTP modules).
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/file.h"
#include "base/rng.h"
#include "base/safetensors.h"
#include "kernels/matmul.h"
#include "kernels/ops.h"
#include "train/train_layer.h"
#include "train/train_model.h"
#include "train/train_ops.h"

// ---- tensors and the parameter block ----

static int cmp_tensor_name(const void *a, const void *b) {
    return strcmp(((const TrainTensor *)a)->name, ((const TrainTensor *)b)->name);
}

const TrainTensor *train_model_tensor(const TrainModel *m, const char *name) {
    for (int i = 0; i < m->n_tensors; i++)
        if (strcmp(m->tensors[i].name, name) == 0) return &m->tensors[i];
    return NULL;
}

// Name look-ups while binding go through a sorted copy (configurations have thousands of experts).
typedef struct {
    TrainTensor *sorted;
    int n;
} NameIndex;

static float *at(const NameIndex *ix, float *base, const char *fmt, ...) {
    TrainTensor key;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(key.name, sizeof key.name, fmt, ap);
    va_end(ap);
    const TrainTensor *t = bsearch(&key, ix->sorted, ix->n, sizeof key, cmp_tensor_name);
    return t ? base + t->offset : NULL;
}

static void bind_ffn(const NameIndex *ix, float *base, TrainFfn *f, const char *prefix) {
    f->gate_proj = at(ix, base, "%s.gate_proj.weight", prefix);
    f->up_proj = at(ix, base, "%s.up_proj.weight", prefix);
    f->down_proj = at(ix, base, "%s.down_proj.weight", prefix);
}

static void bind_layer(const TrainModel *m, const NameIndex *ix, float *base, TrainLayer *l, int li,
                       TrainFfn *experts) {
    const ModelConfig *c = &m->cfg;
    char p[64], q[96];
    snprintf(p, sizeof p, "model.layers.%d", li);
    l->input_layernorm = at(ix, base, "%s.input_layernorm.weight", p);
    l->post_attention_layernorm = at(ix, base, "%s.post_attention_layernorm.weight", p);
    TrainMla *a = &l->self_attn;
    a->q_proj = at(ix, base, "%s.self_attn.q_proj.weight", p);
    a->q_a_proj = at(ix, base, "%s.self_attn.q_a_proj.weight", p);
    a->q_a_layernorm = at(ix, base, "%s.self_attn.q_a_layernorm.weight", p);
    a->q_b_proj = at(ix, base, "%s.self_attn.q_b_proj.weight", p);
    a->kv_a_proj_with_mqa = at(ix, base, "%s.self_attn.kv_a_proj_with_mqa.weight", p);
    a->kv_a_layernorm = at(ix, base, "%s.self_attn.kv_a_layernorm.weight", p);
    a->kv_b_proj = at(ix, base, "%s.self_attn.kv_b_proj.weight", p);
    a->o_proj = at(ix, base, "%s.self_attn.o_proj.weight", p);
    l->is_moe = config_is_moe_layer(c, li);
    if (!l->is_moe) {
        snprintf(q, sizeof q, "%s.mlp", p);
        bind_ffn(ix, base, &l->mlp, q);
        return;
    }
    l->moe.gate = at(ix, base, "%s.mlp.gate.weight", p);
    l->moe.e_score_correction_bias = at(ix, base, "%s.mlp.gate.e_score_correction_bias", p);
    l->moe.experts = experts;
    for (int e = 0; e < c->n_routed_experts; e++) {
        snprintf(q, sizeof q, "%s.mlp.experts.%d", p, e);
        bind_ffn(ix, base, &experts[e], q);
    }
    snprintf(q, sizeof q, "%s.mlp.shared_experts", p);
    bind_ffn(ix, base, &l->moe.shared_experts, q);
}

static int bind_params(TrainModel *m, const NameIndex *ix, float *base, TrainParams *p, Error *err) {
    const ModelConfig *c = &m->cfg;
    int nl = c->num_hidden_layers, D = c->num_nextn_predict_layers, Nr = c->n_routed_experts;
    p->layers = xcalloc(err, nl, sizeof *p->layers, "training layer table");
    p->mtp = xcalloc(err, D > 0 ? D : 1, sizeof *p->mtp, "training MTP table");
    p->expert_table = xcalloc(err, (size_t)(nl + D) * (Nr > 0 ? Nr : 1), sizeof *p->expert_table, "expert table");
    if (!p->layers || !p->mtp || !p->expert_table) return -1;
    p->embed_tokens = at(ix, base, "model.embed_tokens.weight");
    p->norm = at(ix, base, "model.norm.weight");
    p->lm_head = c->tie_word_embeddings ? p->embed_tokens : at(ix, base, "lm_head.weight");
    for (int l = 0; l < nl; l++) bind_layer(m, ix, base, &p->layers[l], l, p->expert_table + (size_t)l * Nr);
    for (int k = 0; k < D; k++) {
        int li = nl + k;
        TrainMtp *t = &p->mtp[k];
        t->enorm = at(ix, base, "model.layers.%d.enorm.weight", li);
        t->hnorm = at(ix, base, "model.layers.%d.hnorm.weight", li);
        t->eh_proj = at(ix, base, "model.layers.%d.eh_proj.weight", li);
        t->shared_head_norm = at(ix, base, "model.layers.%d.shared_head.norm.weight", li);
        bind_layer(m, ix, base, &t->layer, li, p->expert_table + (size_t)li * Nr);
    }
    return 0;
}

static void free_params_tables(TrainParams *p) {
    free(p->layers);
    free(p->mtp);
    free(p->expert_table);
    memset(p, 0, sizeof *p);
}

// ---- the activation plan ----

// A bump allocator run twice: once with base NULL to size the block, once to lay pointers over it.
typedef struct {
    char *base;
    size_t used;
} Plan;

static void *take(Plan *p, size_t n, size_t elem) {
    size_t off = (p->used + 63) & ~(size_t)63;  // 64-byte aligned buffers
    p->used = off + n * elem;
    return p->base ? p->base + off : NULL;
}
#define TAKE_F(p, n) ((float *)take((p), (size_t)(n), sizeof(float)))
#define TAKE_I(p, n) ((int *)take((p), (size_t)(n), sizeof(int)))

static long lmax(long a, long b) { return a > b ? a : b; }

static void plan_layer(const TrainModel *m, Plan *p, TrainLayerActs *a, int is_moe, int B, int T) {
    const ModelConfig *c = &m->cfg;
    long N = (long)B * T, d = c->hidden_size, H = c->num_attention_heads, nope = c->qk_nope_head_dim;
    long r = c->qk_rope_head_dim, v = c->v_head_dim, L = c->kv_lora_rank, qr = c->q_lora_rank;
    long Nr = c->n_routed_experts, K = c->num_experts_per_tok, Fm = c->moe_intermediate_size;
    long F = is_moe ? (long)c->n_shared_experts * Fm : c->intermediate_size;
    a->B = B;
    a->T = T;
    a->N = (int)N;
    a->x_in = TAKE_F(p, N * d);
    a->ln1 = TAKE_F(p, N * d);
    a->ln1_rstd = TAKE_F(p, N);
    a->qa = qr > 0 ? TAKE_F(p, N * qr) : NULL;
    a->cq = qr > 0 ? TAKE_F(p, N * qr) : NULL;
    a->cq_rstd = qr > 0 ? TAKE_F(p, N) : NULL;
    a->q = TAKE_F(p, N * H * (nope + r));
    a->ckv_pre = TAKE_F(p, N * L);
    a->ckv = TAKE_F(p, N * L);
    a->ckv_rstd = TAKE_F(p, N);
    a->kpe = TAKE_F(p, N * r);
    a->kv = TAKE_F(p, N * H * (nope + v));
    a->att = TAKE_F(p, (long)B * H * T * T);
    a->ao = TAKE_F(p, N * H * v);
    a->x_mid = TAKE_F(p, N * d);
    a->ln2 = TAKE_F(p, N * d);
    a->ln2_rstd = TAKE_F(p, N);
    a->ffn_gate = F > 0 ? TAKE_F(p, N * F) : NULL;
    a->ffn_up = F > 0 ? TAKE_F(p, N * F) : NULL;
    a->ffn_h = F > 0 ? TAKE_F(p, N * F) : NULL;
    if (!is_moe) return;
    a->router = TAKE_F(p, N * Nr);
    a->scores = TAKE_F(p, N * Nr);
    a->topk_idx = TAKE_I(p, N * K);
    a->topk_w = TAKE_F(p, N * K);
    a->slot_of = TAKE_I(p, N * K);
    a->slot_tk = TAKE_I(p, N * K);
    a->expert_off = TAKE_I(p, Nr + 1);
    a->e_gate = TAKE_F(p, N * K * Fm);
    a->e_up = TAKE_F(p, N * K * Fm);
    a->e_h = TAKE_F(p, N * K * Fm);
    a->e_out = TAKE_F(p, N * K * d);
    a->bal_f = TAKE_F(p, (long)B * Nr);
}

static void plan_acts(TrainModel *m, Plan *p) {
    const ModelConfig *c = &m->cfg;
    TrainActs *a = &m->a;
    int B = m->B, T = m->T, D = c->num_nextn_predict_layers;
    long N = (long)B * T, d = c->hidden_size, V = c->vocab_size, H = c->num_attention_heads;
    long nope = c->qk_nope_head_dim, r = c->qk_rope_head_dim, v = c->v_head_dim, L = c->kv_lora_rank;
    long qr = c->q_lora_rank, Nr = c->n_routed_experts, K = c->num_experts_per_tok, Fm = c->moe_intermediate_size;
    long F = lmax(c->intermediate_size, (long)c->n_shared_experts * Fm);
    long NK = N * (K > 0 ? K : 1);
    a->tokens = TAKE_I(p, (long)B * (T + 1));
    a->targets = TAKE_I(p, N);
    for (int l = 0; l < c->num_hidden_layers; l++) plan_layer(m, p, &a->layers[l], config_is_moe_layer(c, l), B, T);
    a->x_final = TAKE_F(p, N * d);
    for (int l = 0; l < c->num_hidden_layers; l++)
        a->layers[l].x_out = l + 1 < c->num_hidden_layers ? a->layers[l + 1].x_in : a->x_final;
    a->lnf = TAKE_F(p, N * d);
    a->lnf_rstd = TAKE_F(p, N);
    a->logits = TAKE_F(p, N * V);
    a->lse = TAKE_F(p, N);
    a->losses = TAKE_F(p, N);
    for (int k = 1; k <= D; k++) {
        TrainMtpActs *t = &a->mtp[k - 1];
        long Nk = (long)B * (T - k);
        t->T = T - k;
        t->N = (int)Nk;
        t->in_tok = TAKE_I(p, Nk);
        t->targets = TAKE_I(p, Nk);
        t->emb = TAKE_F(p, Nk * d);
        t->h_in = TAKE_F(p, Nk * d);
        t->en_rstd = TAKE_F(p, Nk);
        t->hn_rstd = TAKE_F(p, Nk);
        t->cat = TAKE_F(p, Nk * 2 * d);
        plan_layer(m, p, &t->layer, config_is_moe_layer(c, c->num_hidden_layers + k - 1), B, T - k);
        t->x_out = TAKE_F(p, Nk * d);
        t->layer.x_out = t->x_out;
        t->h_out = TAKE_F(p, Nk * d);
        t->h_rstd = TAKE_F(p, Nk);
        t->logits = TAKE_F(p, Nk * V);
        t->lse = TAKE_F(p, Nk);
        t->losses = TAKE_F(p, Nk);
        t->dh_out = TAKE_F(p, Nk * d);
    }
    a->tmp = TAKE_F(p, N * lmax(d, L + r));
    a->xg = TAKE_F(p, NK * d);
    a->dres = TAKE_F(p, N * d);
    a->dln = TAKE_F(p, N * d);
    a->dlnf = TAKE_F(p, N * d);
    a->dq = TAKE_F(p, N * H * (nope + r));
    a->dqa = qr > 0 ? TAKE_F(p, N * qr) : NULL;
    a->dcq = qr > 0 ? TAKE_F(p, N * qr) : NULL;
    a->dkv = TAKE_F(p, N * H * (nope + v));
    a->dckv = TAKE_F(p, N * L);
    a->dckv_pre = TAKE_F(p, N * L);
    a->dkpe = TAKE_F(p, N * r);
    a->dkpe_heads = TAKE_F(p, N * H * r);
    a->dkva = TAKE_F(p, N * (L + r));
    a->datt = TAKE_F(p, (long)B * H * T * T);
    a->dao = TAKE_F(p, N * H * v);
    a->dffn_gate = TAKE_F(p, N * F);
    a->dffn_up = TAKE_F(p, N * F);
    a->dffn_h = TAKE_F(p, N * F);
    if (Nr > 0) {
        a->de_out = TAKE_F(p, NK * d);
        a->dxg = TAKE_F(p, NK * d);
        a->de_gate = TAKE_F(p, NK * Fm);
        a->de_up = TAKE_F(p, NK * Fm);
        a->de_h = TAKE_F(p, NK * Fm);
        a->dtopk_w = TAKE_F(p, NK);
        a->dscores = TAKE_F(p, N * Nr);
        a->drouter = TAKE_F(p, N * Nr);
    }
    if (D > 0) {
        a->dcat = TAKE_F(p, N * 2 * d);
        a->den = TAKE_F(p, N * d);
        a->dhn = TAKE_F(p, N * d);
        a->demb = TAKE_F(p, N * d);
        a->dh_prev = TAKE_F(p, N * d);
    }
}

// ---- construction ----

static double yarn_m(double factor, double mscale) { return factor <= 1 ? 1.0 : 0.1 * mscale * log(factor) + 1.0; }

int train_model_new(TrainModel *m, const ModelConfig *c, int B, int T, Error *err) {
    memset(m, 0, sizeof *m);
    m->cfg = *c;
    m->B = B;
    m->T = T;
    int D = c->num_nextn_predict_layers, nl = c->num_hidden_layers, Nr = c->n_routed_experts;
    if (B < 1 || T < 1) return err_set(err, "training batch %d × %d: both must be positive", B, T);
    if (D > 0 && T <= D)
        return err_set(err, "sequence length %d: the %d MTP module(s) need at least %d positions", T, D, D + 1);
    if (T > c->max_position_embeddings)
        return err_set(err, "sequence length %d exceeds max_position_embeddings %d", T, c->max_position_embeddings);
    TrainTensor *sorted = NULL;
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
        int mtp_embed = t->kind == TENSOR_EMBED && strstr(t->name, ".embed_tokens.") && strncmp(t->name, "model.embed", 11);
        int mtp_head = t->kind == TENSOR_EMBED && strstr(t->name, "shared_head.head");
        t->shared = mtp_embed || mtp_head;
        if (t->shared) continue;
        t->offset = off;
        off += t->numel;
    }
    m->n_params = off;
    // the shared copies take the storage of the embedding and of the head
    const TrainTensor *emb = train_model_tensor(m, "model.embed_tokens.weight");
    const TrainTensor *head = c->tie_word_embeddings ? emb : train_model_tensor(m, "lm_head.weight");
    for (int i = 0; i < n; i++)
        if (m->tensors[i].shared) m->tensors[i].offset = strstr(m->tensors[i].name, "shared_head") ? head->offset : emb->offset;
    m->params = xcalloc(err, 2 * m->n_params, sizeof(float), "parameters and gradients");
    sorted = xmalloc(err, sizeof *sorted * n, "tensor index");
    if (!m->params || !sorted) goto fail;
    m->grads = m->params + m->n_params;
    memcpy(sorted, m->tensors, sizeof *sorted * n);
    qsort(sorted, n, sizeof *sorted, cmp_tensor_name);
    NameIndex ix = {sorted, n};
    if (bind_params(m, &ix, m->params, &m->p, err) || bind_params(m, &ix, m->grads, &m->g, err)) goto fail;
    free(sorted);
    sorted = NULL;
    for (int l = 0; l < nl + D; l++) m->n_moe += config_is_moe_layer(c, l);
    m->moe_bias = xcalloc(err, m->n_moe > 0 ? m->n_moe : 1, sizeof *m->moe_bias, "router bias table");
    m->expert_load = xcalloc(err, (size_t)(m->n_moe > 0 ? m->n_moe : 1) * (Nr > 0 ? Nr : 1), sizeof(long long),
                             "expert loads");
    if (!m->moe_bias || !m->expert_load) goto fail;
    for (int l = 0, j = 0; l < nl + D; l++) {
        const TrainLayer *ly = l < nl ? &m->p.layers[l] : &m->p.mtp[l - nl].layer;
        if (ly->is_moe) m->moe_bias[j++] = ly->moe.e_score_correction_bias;
    }
    int r = c->qk_rope_head_dim;
    m->inv_freq = xcalloc(err, r / 2 + 1, sizeof(double), "RoPE frequencies");
    m->rope_cos = xcalloc(err, (size_t)T * (r / 2) + 1, sizeof(float), "RoPE table");
    m->rope_sin = xcalloc(err, (size_t)T * (r / 2) + 1, sizeof(float), "RoPE table");
    if (!m->inv_freq || !m->rope_cos || !m->rope_sin) goto fail;
    rope_inv_freq(m->inv_freq, r, c->rope_theta, c->rope_yarn, c->rope_factor, c->rope_original_max_position,
                  c->rope_beta_fast, c->rope_beta_slow);
    m->rope_mscale = 1.0f;
    if (c->rope_yarn && c->rope_factor > 1)
        m->rope_mscale = (float)(yarn_m(c->rope_factor, c->rope_mscale) / yarn_m(c->rope_factor, c->rope_mscale_all_dim));
    m->softmax_scale = config_softmax_scale(c);
    rope_table(m->rope_cos, m->rope_sin, T, r, m->inv_freq, m->rope_mscale);
    m->a.layers = xcalloc(err, nl, sizeof *m->a.layers, "layer activations");
    m->a.mtp = xcalloc(err, D > 0 ? D : 1, sizeof *m->a.mtp, "MTP activations");
    if (!m->a.layers || !m->a.mtp) goto fail;
    Plan plan = {NULL, 0};
    plan_acts(m, &plan);
    m->act_bytes = plan.used;
    m->act_block = xmalloc(err, plan.used + 64, "training activations");
    if (!m->act_block) {
        err_prefix(err, "micro-batch %d × %d needs %.1f MB of activations", B, T, plan.used / 1e6);
        goto fail;
    }
    plan = (Plan){(char *)(((uintptr_t)m->act_block + 63) & ~(uintptr_t)63), 0};
    plan_acts(m, &plan);
    m->obj.mtp_lambda = D > 0 ? 0.3f : 0.0f;
    m->obj.seq_aux_alpha = 0.0001f;
    free(specs);
    return 0;
fail:
    free(sorted);
    free(specs);
    train_model_free(m);
    return -1;
}

void train_model_free(TrainModel *m) {
    free_params_tables(&m->p);
    free_params_tables(&m->g);
    free(m->tensors);
    free(m->params);
    free(m->moe_bias);
    free(m->expert_load);
    free(m->inv_freq);
    free(m->rope_cos);
    free(m->rope_sin);
    free(m->a.layers);
    free(m->a.mtp);
    free(m->act_block);
    memset(m, 0, sizeof *m);
}

void train_model_init_random(TrainModel *m, uint64_t seed) {
    Rng rng;
    rng_seed(&rng, seed);
    float std = m->cfg.initializer_range;
    for (int i = 0; i < m->n_tensors; i++) {
        const TrainTensor *t = &m->tensors[i];
        if (t->shared) continue;
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
        if (t->shared) continue;
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

int train_model_save(const TrainModel *m, const char *dir, size_t shard_bytes, Error *err) {
    StTensorDesc *desc = xcalloc(err, m->n_tensors, sizeof *desc, "tensor list");
    if (!desc) return -1;
    for (int i = 0; i < m->n_tensors; i++) {
        const TrainTensor *t = &m->tensors[i];
        desc[i] = (StTensorDesc){t->name, DT_F32, t->ndim, {t->shape[0], t->shape[1]}, m->params + t->offset};
    }
    ModelConfig c = m->cfg;
    c.fp8 = 0;  // master weights are saved as they are trained: F32
    snprintf(c.torch_dtype, sizeof c.torch_dtype, "float32");
    char path[4096];
    int rc = make_dirs(dir, err) || st_write_model(dir, desc, m->n_tensors, shard_bytes, err) ||
                     path_join(path, sizeof path, dir, "config.json", err) || config_save(&c, path, err)
                 ? -1
                 : 0;
    free(desc);
    return rc;
}

// ---- forward and backward ----

static void embed_rows(float *out, const float *table, const int *tok, int N, int d) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) memcpy(out + (size_t)n * d, table + (size_t)tok[n] * d, sizeof(float) * d);
}

// dtable[tok[n]] += drows[n], in row order (a token may repeat).
static void embed_backward(float *dtable, const float *drows, const int *tok, int N, int d) {
    for (int n = 0; n < N; n++) {
        float *dst = dtable + (size_t)tok[n] * d;
        const float *src = drows + (size_t)n * d;
        for (int j = 0; j < d; j++) dst[j] += src[j];
    }
}

static int mtp_active(const TrainModel *m) { return m->cfg.num_nextn_predict_layers > 0 && m->obj.mtp_lambda > 0; }

// MTP module k (1-based): rows (b, i), i < T − k, of the previous stage's h (rows T − k + 1 per
// sequence) feed module k with Emb(t_{i+k}).
static double mtp_forward(TrainModel *m, int k, long long *load, double *bal) {
    const ModelConfig *c = &m->cfg;
    TrainActs *a = &m->a;
    TrainMtpActs *t = &a->mtp[k - 1];
    const TrainMtp *w = &m->p.mtp[k - 1];
    int B = m->B, T = m->T, Tk = t->T, Tp = Tk + 1, d = c->hidden_size, V = c->vocab_size;
    const float *prev = k == 1 ? a->lnf : a->mtp[k - 2].h_out;  // (B, Tp, d)
    for (int b = 0; b < B; b++)
        for (int i = 0; i < Tk; i++) {
            t->in_tok[b * Tk + i] = a->tokens[(size_t)b * (T + 1) + i + k];
            t->targets[b * Tk + i] = a->tokens[(size_t)b * (T + 1) + i + k + 1];
            memcpy(t->h_in + ((size_t)b * Tk + i) * d, prev + ((size_t)b * Tp + i) * d, sizeof(float) * d);
        }
    int N = t->N;
    embed_rows(t->emb, m->p.embed_tokens, t->in_tok, N, d);
    float *en = a->den, *hn = a->dhn;  // (N, d) each: the gradient buffers are free during the forward
    rmsnorm_rows_forward(en, t->en_rstd, t->emb, w->enorm, N, d, c->rms_norm_eps);
    rmsnorm_rows_forward(hn, t->hn_rstd, t->h_in, w->hnorm, N, d, c->rms_norm_eps);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {  // the embedding half first, as in the released checkpoints (SPEC §2.3)
        memcpy(t->cat + (size_t)n * 2 * d, en + (size_t)n * d, sizeof(float) * d);
        memcpy(t->cat + (size_t)n * 2 * d + d, hn + (size_t)n * d, sizeof(float) * d);
    }
    linear_forward(t->layer.x_in, t->cat, w->eh_proj, N, 2 * d, d);
    *bal += train_layer_forward(m, &w->layer, &t->layer, load);
    rmsnorm_rows_forward(t->h_out, t->h_rstd, t->x_out, w->shared_head_norm, N, d, c->rms_norm_eps);
    linear_forward(t->logits, t->h_out, m->p.lm_head, N, d, V);
    return crossentropy_forward(t->losses, t->lse, t->logits, t->targets, N, V) / N;
}

int train_model_forward(TrainModel *m, const int *tokens, Error *err) {
    const ModelConfig *c = &m->cfg;
    TrainActs *a = &m->a;
    int B = m->B, T = m->T, d = c->hidden_size, V = c->vocab_size, N = B * T, Nr = c->n_routed_experts;
    for (long i = 0; i < (long)B * (T + 1); i++)
        if (tokens[i] < 0 || tokens[i] >= V)
            return err_set(err, "token %d at batch position %ld is outside the vocabulary [0, %d)", tokens[i], i, V);
    memcpy(a->tokens, tokens, sizeof(int) * B * (T + 1));
    for (int b = 0; b < B; b++)
        for (int i = 0; i < T; i++) a->targets[b * T + i] = tokens[(size_t)b * (T + 1) + i + 1];
    int *inp = (int *)a->tmp;  // (N) the input tokens
    for (int b = 0; b < B; b++)
        for (int i = 0; i < T; i++) inp[b * T + i] = tokens[(size_t)b * (T + 1) + i];
    embed_rows(a->layers[0].x_in, m->p.embed_tokens, inp, N, d);
    double bal = 0;
    int j = 0;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        long long *load = m->p.layers[l].is_moe ? m->expert_load + (size_t)(j++) * Nr : NULL;
        bal += train_layer_forward(m, &m->p.layers[l], &a->layers[l], load);
    }
    rmsnorm_rows_forward(a->lnf, a->lnf_rstd, a->x_final, m->p.norm, N, d, c->rms_norm_eps);
    linear_forward(a->logits, a->lnf, m->p.lm_head, N, d, V);
    m->loss.main = crossentropy_forward(a->losses, a->lse, a->logits, a->targets, N, V) / N;
    m->loss.mtp = 0;
    m->mtp_ran = mtp_active(m);
    if (m->mtp_ran) {
        int D = c->num_nextn_predict_layers;
        for (int k = 1; k <= D; k++) {
            long long *load = m->p.mtp[k - 1].layer.is_moe ? m->expert_load + (size_t)(j++) * Nr : NULL;
            m->loss.mtp += mtp_forward(m, k, load, &bal);
        }
        m->loss.mtp /= D;
    } else {
        for (; j < m->n_moe; j++) memset(m->expert_load + (size_t)j * Nr, 0, sizeof(long long) * Nr);
    }
    m->loss.balance = bal;
    m->loss.loss = m->loss.main + (m->mtp_ran ? m->obj.mtp_lambda * m->loss.mtp : 0) + bal;
    return 0;
}

void train_model_zero_grad(TrainModel *m) { memset(m->grads, 0, sizeof(float) * m->n_params); }

static void mtp_backward(TrainModel *m, int k, float scale) {
    const ModelConfig *c = &m->cfg;
    TrainActs *a = &m->a;
    TrainMtpActs *t = &a->mtp[k - 1];
    const TrainMtp *w = &m->p.mtp[k - 1];
    TrainMtp *g = &m->g.mtp[k - 1];
    int N = t->N, d = c->hidden_size, V = c->vocab_size, D = c->num_nextn_predict_layers, Tk = t->T, Tp = Tk + 1;
    crossentropy_backward(t->logits, t->lse, t->targets, N, V, scale * m->obj.mtp_lambda / D / N);
    linear_backward(t->dh_out, m->g.lm_head, t->logits, t->h_out, m->p.lm_head, N, d, V);
    memset(a->dres, 0, sizeof(float) * N * d);
    rmsnorm_rows_backward(a->dres, g->shared_head_norm, t->dh_out, t->x_out, w->shared_head_norm, t->h_rstd, N, d);
    train_layer_backward(m, &w->layer, &g->layer, &t->layer, a->dres, scale);
    memset(a->dcat, 0, sizeof(float) * N * 2 * d);
    linear_backward(a->dcat, g->eh_proj, a->dres, t->cat, w->eh_proj, N, 2 * d, d);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        memcpy(a->den + (size_t)n * d, a->dcat + (size_t)n * 2 * d, sizeof(float) * d);
        memcpy(a->dhn + (size_t)n * d, a->dcat + (size_t)n * 2 * d + d, sizeof(float) * d);
    }
    memset(a->demb, 0, sizeof(float) * N * d);
    memset(a->dh_prev, 0, sizeof(float) * N * d);
    rmsnorm_rows_backward(a->demb, g->enorm, a->den, t->emb, w->enorm, t->en_rstd, N, d);
    rmsnorm_rows_backward(a->dh_prev, g->hnorm, a->dhn, t->h_in, w->hnorm, t->hn_rstd, N, d);
    embed_backward(m->g.embed_tokens, a->demb, t->in_tok, N, d);
    float *dprev = k == 1 ? a->dlnf : a->mtp[k - 2].dh_out;  // (B, Tp, d)
    for (int b = 0; b < m->B; b++)
        for (int i = 0; i < Tk; i++) {
            float *dst = dprev + ((size_t)b * Tp + i) * d;
            const float *src = a->dh_prev + ((size_t)b * Tk + i) * d;
            for (int j = 0; j < d; j++) dst[j] += src[j];
        }
}

void train_model_backward(TrainModel *m, float scale) {
    const ModelConfig *c = &m->cfg;
    TrainActs *a = &m->a;
    int B = m->B, T = m->T, d = c->hidden_size, V = c->vocab_size, N = B * T;
    memset(a->dlnf, 0, sizeof(float) * N * d);
    if (m->mtp_ran) {
        int D = c->num_nextn_predict_layers;
        for (int k = 1; k <= D; k++) memset(a->mtp[k - 1].dh_out, 0, sizeof(float) * a->mtp[k - 1].N * d);
        for (int k = D; k >= 1; k--) mtp_backward(m, k, scale);
    }
    crossentropy_backward(a->logits, a->lse, a->targets, N, V, scale / N);
    linear_backward(a->dlnf, m->g.lm_head, a->logits, a->lnf, m->p.lm_head, N, d, V);
    memset(a->dres, 0, sizeof(float) * N * d);
    rmsnorm_rows_backward(a->dres, m->g.norm, a->dlnf, a->x_final, m->p.norm, a->lnf_rstd, N, d);
    for (int l = c->num_hidden_layers - 1; l >= 0; l--)
        train_layer_backward(m, &m->p.layers[l], &m->g.layers[l], &a->layers[l], a->dres, scale);
    int *inp = (int *)a->tmp;
    for (int b = 0; b < B; b++)
        for (int i = 0; i < T; i++) inp[b * T + i] = a->tokens[(size_t)b * (T + 1) + i];
    embed_backward(m->g.embed_tokens, a->dres, inp, N, d);
}
