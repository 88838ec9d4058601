#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/tensors.h"

typedef struct {
    TensorVisitor fn;
    void *ctx;
    int rc;
    TensorSpec t;  // layer / expert / mtp of the tensors being visited
} Walk;

static void visit(Walk *w, TensorKind kind, int64_t rows, int64_t cols, MatView *mat, float **vec, const char *fmt,
                  ...) {
    if (w->rc) return;
    TensorSpec *t = &w->t;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->name, sizeof t->name, fmt, ap);
    va_end(ap);
    t->kind = kind;
    t->ndim = cols ? 2 : 1;
    t->shape[0] = rows;
    t->shape[1] = cols;
    t->mat = mat;
    t->vec = vec;
    w->rc = w->fn(t, w->ctx);
}

#define SLOT(x) (base ? &(x) : NULL)

static void walk_ffn(Walk *w, const char *p, int64_t d, int64_t inter, FfnWeights *base) {
    visit(w, TENSOR_LINEAR, inter, d, SLOT(base->gate_proj), NULL, "%s.gate_proj.weight", p);
    visit(w, TENSOR_LINEAR, inter, d, SLOT(base->up_proj), NULL, "%s.up_proj.weight", p);
    visit(w, TENSOR_LINEAR, d, inter, SLOT(base->down_proj), NULL, "%s.down_proj.weight", p);
}

static void walk_layer(Walk *w, const ModelConfig *c, int i, LayerWeights *base) {
    int64_t d = c->hidden_size, H = c->num_attention_heads, qk = config_qk_head_dim(c);
    MlaWeights *a = base ? &base->self_attn : NULL;
    char p[64];
    snprintf(p, sizeof p, "model.layers.%d", i);
    w->t.layer = i;
    w->t.expert = -1;
    if (base) base->is_moe = config_is_moe_layer(c, i);
    visit(w, TENSOR_NORM, d, 0, NULL, SLOT(base->input_layernorm), "%s.input_layernorm.weight", p);
    if (c->q_lora_rank > 0) {
        visit(w, TENSOR_LINEAR, c->q_lora_rank, d, SLOT(a->q_a_proj), NULL, "%s.self_attn.q_a_proj.weight", p);
        visit(w, TENSOR_NORM, c->q_lora_rank, 0, NULL, SLOT(a->q_a_layernorm), "%s.self_attn.q_a_layernorm.weight", p);
        visit(w, TENSOR_LINEAR, H * qk, c->q_lora_rank, SLOT(a->q_b_proj), NULL, "%s.self_attn.q_b_proj.weight", p);
    } else {
        visit(w, TENSOR_LINEAR, H * qk, d, SLOT(a->q_proj), NULL, "%s.self_attn.q_proj.weight", p);
    }
    visit(w, TENSOR_LINEAR, c->kv_lora_rank + c->qk_rope_head_dim, d, SLOT(a->kv_a_proj_with_mqa), NULL,
          "%s.self_attn.kv_a_proj_with_mqa.weight", p);
    visit(w, TENSOR_NORM, c->kv_lora_rank, 0, NULL, SLOT(a->kv_a_layernorm), "%s.self_attn.kv_a_layernorm.weight", p);
    visit(w, TENSOR_LINEAR, H * (c->qk_nope_head_dim + c->v_head_dim), c->kv_lora_rank, SLOT(a->kv_b_proj), NULL,
          "%s.self_attn.kv_b_proj.weight", p);
    visit(w, TENSOR_LINEAR, d, H * c->v_head_dim, SLOT(a->o_proj), NULL, "%s.self_attn.o_proj.weight", p);
    visit(w, TENSOR_NORM, d, 0, NULL, SLOT(base->post_attention_layernorm), "%s.post_attention_layernorm.weight", p);
    char q[128];
    if (!config_is_moe_layer(c, i)) {
        snprintf(q, sizeof q, "%s.mlp", p);
        walk_ffn(w, q, d, c->intermediate_size, base ? &base->mlp : NULL);
        return;
    }
    MoeWeights *m = base ? &base->moe : NULL;
    visit(w, TENSOR_ROUTER, c->n_routed_experts, d, SLOT(m->gate), NULL, "%s.mlp.gate.weight", p);
    if (c->topk_method == TOPK_NOAUX_TC)
        visit(w, TENSOR_BIAS, c->n_routed_experts, 0, NULL, SLOT(m->e_score_correction_bias),
              "%s.mlp.gate.e_score_correction_bias", p);
    for (int e = 0; e < c->n_routed_experts; e++) {
        snprintf(q, sizeof q, "%s.mlp.experts.%d", p, e);
        w->t.expert = e;
        walk_ffn(w, q, d, c->moe_intermediate_size, base ? &m->experts[e] : NULL);
    }
    w->t.expert = -1;
    if (c->n_shared_experts > 0) {
        snprintf(q, sizeof q, "%s.mlp.shared_experts", p);
        walk_ffn(w, q, d, (int64_t)c->n_shared_experts * c->moe_intermediate_size, base ? &m->shared_experts : NULL);
    }
}

int tensor_walk(const ModelConfig *c, int n_mtp, ModelWeights *base, TensorVisitor fn, void *ctx) {
    Walk w = {fn, ctx, 0, {.layer = -1, .expert = -1, .mtp = -1}};
    int64_t d = c->hidden_size, V = c->vocab_size;
    visit(&w, TENSOR_EMBED, V, d, SLOT(base->embed_tokens), NULL, "model.embed_tokens.weight");
    for (int i = 0; i < c->num_hidden_layers; i++) walk_layer(&w, c, i, base ? &base->layers[i] : NULL);
    for (int k = 0; k < n_mtp; k++) {
        int li = c->num_hidden_layers + k;
        MtpWeights *m = base ? &base->mtp[k] : NULL;
        w.t.layer = li;
        w.t.mtp = k;
        w.t.mtp_copy = 1;
        visit(&w, TENSOR_EMBED, V, d, SLOT(m->embed_tokens), NULL, "model.layers.%d.embed_tokens.weight", li);
        w.t.mtp_copy = 0;
        visit(&w, TENSOR_NORM, d, 0, NULL, SLOT(m->enorm), "model.layers.%d.enorm.weight", li);
        visit(&w, TENSOR_NORM, d, 0, NULL, SLOT(m->hnorm), "model.layers.%d.hnorm.weight", li);
        visit(&w, TENSOR_LINEAR, d, 2 * d, SLOT(m->eh_proj), NULL, "model.layers.%d.eh_proj.weight", li);
        walk_layer(&w, c, li, m ? &m->layer : NULL);
        w.t.expert = -1;
        w.t.layer = li;
        visit(&w, TENSOR_NORM, d, 0, NULL, SLOT(m->shared_head_norm), "model.layers.%d.shared_head.norm.weight", li);
        w.t.mtp_copy = 1;
        visit(&w, TENSOR_EMBED, V, d, SLOT(m->shared_head_head), NULL, "model.layers.%d.shared_head.head.weight", li);
        w.t.mtp_copy = 0;
    }
    w.t.layer = w.t.mtp = -1;
    visit(&w, TENSOR_NORM, d, 0, NULL, SLOT(base->norm), "model.norm.weight");
    if (!c->tie_word_embeddings) visit(&w, TENSOR_EMBED, V, d, SLOT(base->lm_head), NULL, "lm_head.weight");
    return w.rc;
}

typedef struct {
    TensorSpec *v;
    int n, cap;
} List;

static int collect(const TensorSpec *t, void *ctx) {
    List *l = ctx;
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 256;
        TensorSpec *nv = realloc(l->v, sizeof *nv * cap);
        if (!nv) return -1;
        l->v = nv;
        l->cap = cap;
    }
    l->v[l->n++] = *t;
    return 0;
}

int tensor_specs(const ModelConfig *c, TensorSpec **out, int *n, Error *err) {
    List l = {0};
    if (tensor_walk(c, c->num_nextn_predict_layers, NULL, collect, &l)) {
        free(l.v);
        return err_set(err, "out of memory listing tensors");
    }
    *out = l.v;
    *n = l.n;
    return 0;
}
