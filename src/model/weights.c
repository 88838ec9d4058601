#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/convert.h"
#include "model/weights.h"

// Binding runs twice: the first pass only counts the fp32 floats the vectors need, the second
// lays them over one block. Both passes check every tensor, so errors surface on the first.
typedef struct Binder {
    const StModel *st;
    const ModelConfig *c;
    float *block;  // NULL in the counting pass
    size_t used;
    Error *err;
} Binder;

static const StTensor *need(Binder *b, const char *name) {
    const StTensor *t = st_model_find(b->st, name);
    if (!t) err_set(b->err, "%s: tensor %s: missing", b->st->dir, name);
    return t;
}

static int shape_error(Binder *b, const StTensor *t, const char *want) {
    char got[128] = "";
    size_t n = 0;
    for (int i = 0; i < t->ndim; i++) n += snprintf(got + n, sizeof got - n, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
    return err_set(b->err, "%s: tensor %s: shape [%s] disagrees with config.json (expected [%s])", t->file, t->name, got, want);
}

static int bind_vector(Binder *b, float **out, const char *name, int n) {
    const StTensor *t = need(b, name);
    if (!t) return -1;
    char want[32];
    snprintf(want, sizeof want, "%d", n);
    if (t->ndim != 1 || t->shape[0] != n) return shape_error(b, t, want);
    if (t->dtype != DT_F32 && t->dtype != DT_BF16 && t->dtype != DT_F16)
        return err_set(b->err, "%s: tensor %s: dtype %s is not F32, BF16 or F16", t->file, name, dtype_name(t->dtype));
    if (b->block) {
        float *v = b->block + b->used;
        for (int i = 0; i < n; i++) {
            if (t->dtype == DT_F32) memcpy(&v[i], (const char *)t->data + 4 * i, 4);
            else {
                uint16_t h;
                memcpy(&h, (const char *)t->data + 2 * i, 2);
                v[i] = t->dtype == DT_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
            }
        }
        *out = v;
    }
    b->used += n;
    return 0;
}

static int bind_matrix(Binder *b, MatView *m, const char *name, int rows, int cols) {
    const StTensor *t = need(b, name);
    if (!t) return -1;
    char want[64];
    snprintf(want, sizeof want, "%d, %d", rows, cols);
    if (t->ndim != 2 || t->shape[0] != rows || t->shape[1] != cols) return shape_error(b, t, want);
    memset(m, 0, sizeof *m);
    m->dtype = t->dtype;
    m->rows = rows;
    m->cols = cols;
    m->data = t->data;
    if (t->dtype == DT_F8_E4M3) {
        int bs = b->c->fp8 ? b->c->fp8_block[0] : 128;
        if (b->c->fp8 && b->c->fp8_block[0] != b->c->fp8_block[1])
            return err_set(b->err, "%s: tensor %s: only square FP8 blocks are supported", t->file, name);
        char sname[512];
        snprintf(sname, sizeof sname, "%s_scale_inv", name);
        const StTensor *s = need(b, sname);
        if (!s) return -1;
        int sr = (rows + bs - 1) / bs, sc = (cols + bs - 1) / bs;
        snprintf(want, sizeof want, "%d, %d", sr, sc);
        if (s->ndim != 2 || s->shape[0] != sr || s->shape[1] != sc) return shape_error(b, s, want);
        if (s->dtype != DT_F32)
            return err_set(b->err, "%s: tensor %s: dtype %s is not F32", s->file, sname, dtype_name(s->dtype));
        m->scale_inv = s->data;
        m->scale_cols = sc;
        m->block = bs;
    } else if (t->dtype != DT_F32 && t->dtype != DT_BF16 && t->dtype != DT_F16) {
        return err_set(b->err, "%s: tensor %s: dtype %s is not a weight type (F32, BF16, F16, F8_E4M3)", t->file, name,
                       dtype_name(t->dtype));
    }
    return 0;
}

static int bind_ffn(Binder *b, FfnWeights *f, const char *prefix, int inter) {
    char n[512];
    int d = b->c->hidden_size;
    snprintf(n, sizeof n, "%s.gate_proj.weight", prefix);
    if (bind_matrix(b, &f->gate_proj, n, inter, d)) return -1;
    snprintf(n, sizeof n, "%s.up_proj.weight", prefix);
    if (bind_matrix(b, &f->up_proj, n, inter, d)) return -1;
    snprintf(n, sizeof n, "%s.down_proj.weight", prefix);
    return bind_matrix(b, &f->down_proj, n, d, inter);
}

static int bind_layer(Binder *b, LayerWeights *L, int i) {
    const ModelConfig *c = b->c;
    int d = c->hidden_size, H = c->num_attention_heads, qk = config_qk_head_dim(c);
    char p[256], n[512];
    snprintf(p, sizeof p, "model.layers.%d", i);
#define NAME(fmt) (snprintf(n, sizeof n, "%s." fmt, p), n)
    if (bind_vector(b, &L->input_layernorm, NAME("input_layernorm.weight"), d) ||
        bind_vector(b, &L->post_attention_layernorm, NAME("post_attention_layernorm.weight"), d))
        return -1;
    MlaWeights *a = &L->self_attn;
    if (c->q_lora_rank > 0) {
        if (bind_matrix(b, &a->q_a_proj, NAME("self_attn.q_a_proj.weight"), c->q_lora_rank, d) ||
            bind_vector(b, &a->q_a_layernorm, NAME("self_attn.q_a_layernorm.weight"), c->q_lora_rank) ||
            bind_matrix(b, &a->q_b_proj, NAME("self_attn.q_b_proj.weight"), H * qk, c->q_lora_rank))
            return -1;
    } else if (bind_matrix(b, &a->q_proj, NAME("self_attn.q_proj.weight"), H * qk, d)) {
        return -1;
    }
    if (bind_matrix(b, &a->kv_a_proj_with_mqa, NAME("self_attn.kv_a_proj_with_mqa.weight"),
                    c->kv_lora_rank + c->qk_rope_head_dim, d) ||
        bind_vector(b, &a->kv_a_layernorm, NAME("self_attn.kv_a_layernorm.weight"), c->kv_lora_rank) ||
        bind_matrix(b, &a->kv_b_proj, NAME("self_attn.kv_b_proj.weight"), H * (c->qk_nope_head_dim + c->v_head_dim),
                    c->kv_lora_rank) ||
        bind_matrix(b, &a->o_proj, NAME("self_attn.o_proj.weight"), d, H * c->v_head_dim))
        return -1;
    L->is_moe = config_is_moe_layer(c, i);
    if (!L->is_moe) return bind_ffn(b, &L->mlp, NAME("mlp"), c->intermediate_size);
    MoeWeights *m = &L->moe;
    if (bind_matrix(b, &m->gate, NAME("mlp.gate.weight"), c->n_routed_experts, d)) return -1;
    m->e_score_correction_bias = NULL;
    if (c->topk_method == TOPK_NOAUX_TC &&
        bind_vector(b, &m->e_score_correction_bias, NAME("mlp.gate.e_score_correction_bias"), c->n_routed_experts))
        return -1;
    for (int e = 0; e < c->n_routed_experts; e++) {
        char ep[300];
        snprintf(ep, sizeof ep, "%s.mlp.experts.%d", p, e);
        if (bind_ffn(b, &m->experts[e], ep, c->moe_intermediate_size)) return -1;
    }
    if (c->n_shared_experts > 0 &&
        bind_ffn(b, &m->shared_experts, NAME("mlp.shared_experts"), c->n_shared_experts * c->moe_intermediate_size))
        return -1;
#undef NAME
    return 0;
}

static int bind_all(Binder *b, ModelWeights *w, int n_mtp) {
    const ModelConfig *c = b->c;
    int d = c->hidden_size, V = c->vocab_size;
    if (bind_matrix(b, &w->embed_tokens, "model.embed_tokens.weight", V, d) ||
        bind_vector(b, &w->norm, "model.norm.weight", d))
        return -1;
    if (c->tie_word_embeddings && !st_model_find(b->st, "lm_head.weight")) w->lm_head = w->embed_tokens;
    else if (bind_matrix(b, &w->lm_head, "lm_head.weight", V, d)) return -1;
    for (int i = 0; i < c->num_hidden_layers; i++)
        if (bind_layer(b, &w->layers[i], i)) return -1;
    for (int k = 0; k < n_mtp; k++) {
        MtpWeights *m = &w->mtp[k];
        int li = c->num_hidden_layers + k;
        char n[256];
#define NAME(fmt) (snprintf(n, sizeof n, "model.layers.%d." fmt, li), n)
        if (bind_matrix(b, &m->embed_tokens, NAME("embed_tokens.weight"), V, d) ||
            bind_vector(b, &m->enorm, NAME("enorm.weight"), d) || bind_vector(b, &m->hnorm, NAME("hnorm.weight"), d) ||
            bind_matrix(b, &m->eh_proj, NAME("eh_proj.weight"), d, 2 * d) ||
            bind_vector(b, &m->shared_head_norm, NAME("shared_head.norm.weight"), d) ||
            bind_matrix(b, &m->shared_head_head, NAME("shared_head.head.weight"), V, d) || bind_layer(b, &m->layer, li))
            return -1;
#undef NAME
    }
    return 0;
}

static int alloc_experts(LayerWeights *L, const ModelConfig *c, int li, Error *err) {
    L->moe.experts = NULL;
    if (!config_is_moe_layer(c, li)) return 0;
    L->moe.experts = xcalloc(err, c->n_routed_experts, sizeof(FfnWeights), "expert table");
    return L->moe.experts ? 0 : -1;
}

int weights_alloc_tables(ModelWeights *w, const ModelConfig *c, int n_mtp, Error *err) {
    memset(w, 0, sizeof *w);
    w->n_mtp = n_mtp;
    w->layers = xcalloc(err, c->num_hidden_layers, sizeof *w->layers, "layer table");
    w->mtp = xcalloc(err, n_mtp > 0 ? n_mtp : 1, sizeof *w->mtp, "MTP table");
    if (!w->layers || !w->mtp) goto fail;
    for (int i = 0; i < c->num_hidden_layers; i++)
        if (alloc_experts(&w->layers[i], c, i, err)) goto fail;
    for (int k = 0; k < n_mtp; k++)
        if (alloc_experts(&w->mtp[k].layer, c, c->num_hidden_layers + k, err)) goto fail;
    return 0;
fail:
    weights_free(w, c);
    return -1;
}

int weights_bind(ModelWeights *w, const ModelConfig *c, const StModel *st, int need_mtp, Error *err) {
    memset(w, 0, sizeof *w);
    char probe[128];
    snprintf(probe, sizeof probe, "model.layers.%d.eh_proj.weight", c->num_hidden_layers);
    int have_mtp = c->num_nextn_predict_layers > 0 && st_model_find(st, probe) != NULL;
    if (need_mtp && c->num_nextn_predict_layers > 0 && !have_mtp)
        return err_set(err, "%s: tensor %s: missing (config.json asks for %d MTP modules)", st->dir, probe,
                       c->num_nextn_predict_layers);
    w->n_mtp = have_mtp ? c->num_nextn_predict_layers : 0;
    w->layers = xcalloc(err, c->num_hidden_layers, sizeof *w->layers, "layer table");
    w->mtp = xcalloc(err, w->n_mtp, sizeof *w->mtp, "MTP table");
    if (!w->layers || !w->mtp) goto fail;
    for (int i = 0; i < c->num_hidden_layers; i++)
        if (alloc_experts(&w->layers[i], c, i, err)) goto fail;
    for (int k = 0; k < w->n_mtp; k++)
        if (alloc_experts(&w->mtp[k].layer, c, c->num_hidden_layers + k, err)) goto fail;
    Binder b = {st, c, NULL, 0, err};
    if (bind_all(&b, w, w->n_mtp)) goto fail;
    w->vectors = xmalloc(err, b.used * sizeof(float), "norm weights");
    if (!w->vectors) goto fail;
    b.block = w->vectors;
    b.used = 0;
    if (bind_all(&b, w, w->n_mtp)) goto fail;
    return 0;
fail:
    weights_free(w, c);
    return -1;
}

void weights_free(ModelWeights *w, const ModelConfig *c) {
    if (w->layers)
        for (int i = 0; i < c->num_hidden_layers; i++) free(w->layers[i].moe.experts);
    if (w->mtp)
        for (int k = 0; k < w->n_mtp; k++) free(w->mtp[k].layer.moe.experts);
    free(w->layers);
    free(w->mtp);
    free(w->vectors);
    memset(w, 0, sizeof *w);
}

// Parameters of one decoder layer: all of them, and those a single token uses.
static void layer_params(const ModelConfig *c, int li, long long *total, long long *active) {
    long long d = c->hidden_size, H = c->num_attention_heads, qk = config_qk_head_dim(c);
    long long attn = 2 * d + c->kv_lora_rank;  // input/post norms, kv_a_layernorm
    if (c->q_lora_rank > 0) attn += c->q_lora_rank * d + c->q_lora_rank + H * qk * c->q_lora_rank;
    else attn += H * qk * d;
    attn += (c->kv_lora_rank + c->qk_rope_head_dim) * d + H * (c->qk_nope_head_dim + c->v_head_dim) * c->kv_lora_rank +
            d * H * c->v_head_dim;
    if (!config_is_moe_layer(c, li)) {
        long long ffn = 3 * d * c->intermediate_size;
        *total = attn + ffn;
        *active = attn + ffn;
        return;
    }
    long long expert = 3 * d * c->moe_intermediate_size;
    long long router = (long long)c->n_routed_experts * d + (c->topk_method == TOPK_NOAUX_TC ? c->n_routed_experts : 0);
    long long shared = c->n_shared_experts * expert;
    *total = attn + router + shared + c->n_routed_experts * expert;
    *active = attn + router + shared + c->num_experts_per_tok * expert;
}

ParamCounts weights_count_params(const ModelConfig *c) {
    ParamCounts p = {0};
    long long d = c->hidden_size, V = c->vocab_size;
    long long emb = V * d, head = c->tie_word_embeddings ? 0 : V * d;
    p.total = emb + head + d;
    // one embedding row, the head, the final norm
    p.active = d + (c->tie_word_embeddings ? V * d : head) + d;
    for (int i = 0; i < c->num_hidden_layers; i++) {
        long long t, a;
        layer_params(c, i, &t, &a);
        p.total += t;
        p.active += a;
    }
    for (int k = 0; k < c->num_nextn_predict_layers; k++) {
        long long t, a;
        layer_params(c, c->num_hidden_layers + k, &t, &a);
        // own copies of the embedding and head as stored in the checkpoint, norms, eh_proj
        long long extra = 3 * d + 2 * d * d;
        p.mtp_total += t + extra + 2 * V * d;
        p.mtp_active += a + extra + d + V * d;
    }
    return p;
}
