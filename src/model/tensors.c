#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "base/dtype.h"
#include "model/tensors.h"

// One walk in progress: the spec being built (its layer, expert and MTP fields are set by the
// caller of visit) and the visitor's first non-zero answer, after which nothing more is visited.
typedef struct Walk {
    const ModelConfig *c;
    ModelWeights *w;
    TensorVisitor fn;
    void *ctx;
    int rc;
    int in_layer;  // inside a decoder layer: its linear weights are the FP8 ones
    TensorSpec t;
} Walk;

// The address of a slot, or NULL when the walk has no weights.
#define SLOT(p, field) ((p) ? &(p)->field : NULL)

static void visit(Walk *W, TensorKind kind, int64_t rows, int64_t cols, MatView *mat, float **vec, const char *fmt,
                  ...) {
    if (W->rc) return;
    TensorSpec *t = &W->t;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->name, sizeof t->name, fmt, ap);
    va_end(ap);
    t->kind = kind;
    t->ndim = cols ? 2 : 1;
    t->shape[0] = rows;
    t->shape[1] = cols;
    t->fp8 = kind == TENSOR_LINEAR && W->in_layer;
    t->mat = mat;
    t->vec = vec;
    W->rc = W->fn(t, W->ctx);
}

static void visit_ffn(Walk *W, FfnWeights *f, const char *p, int64_t d, int64_t inter) {
    visit(W, TENSOR_LINEAR, inter, d, SLOT(f, gate_proj), NULL, "%s.gate_proj.weight", p);
    visit(W, TENSOR_LINEAR, inter, d, SLOT(f, up_proj), NULL, "%s.up_proj.weight", p);
    visit(W, TENSOR_LINEAR, d, inter, SLOT(f, down_proj), NULL, "%s.down_proj.weight", p);
}

// Decoder layer li (an MTP module's layer when li >= num_hidden_layers), bound to L when given.
static void visit_layer(Walk *W, LayerWeights *L, int li) {
    const ModelConfig *c = W->c;
    int64_t d = c->hidden_size, H = c->num_attention_heads, qk = config_qk_head_dim(c);
    MlaWeights *a = SLOT(L, self_attn);
    char p[64];
    snprintf(p, sizeof p, "model.layers.%d", li);
    W->t.layer = li;
    W->in_layer = 1;
    visit(W, TENSOR_NORM, d, 0, NULL, SLOT(L, input_layernorm), "%s.input_layernorm.weight", p);
    if (c->q_lora_rank > 0) {
        visit(W, TENSOR_LINEAR, c->q_lora_rank, d, SLOT(a, q_a_proj), NULL, "%s.self_attn.q_a_proj.weight", p);
        visit(W, TENSOR_NORM, c->q_lora_rank, 0, NULL, SLOT(a, q_a_layernorm), "%s.self_attn.q_a_layernorm.weight", p);
        visit(W, TENSOR_LINEAR, H * qk, c->q_lora_rank, SLOT(a, q_b_proj), NULL, "%s.self_attn.q_b_proj.weight", p);
    } else {
        visit(W, TENSOR_LINEAR, H * qk, d, SLOT(a, q_proj), NULL, "%s.self_attn.q_proj.weight", p);
    }
    visit(W, TENSOR_LINEAR, (int64_t)c->kv_lora_rank + c->qk_rope_head_dim, d, SLOT(a, kv_a_proj_with_mqa), NULL,
          "%s.self_attn.kv_a_proj_with_mqa.weight", p);
    visit(W, TENSOR_NORM, c->kv_lora_rank, 0, NULL, SLOT(a, kv_a_layernorm), "%s.self_attn.kv_a_layernorm.weight", p);
    visit(W, TENSOR_LINEAR, H * (c->qk_nope_head_dim + c->v_head_dim), c->kv_lora_rank, SLOT(a, kv_b_proj), NULL,
          "%s.self_attn.kv_b_proj.weight", p);
    visit(W, TENSOR_LINEAR, d, H * c->v_head_dim, SLOT(a, o_proj), NULL, "%s.self_attn.o_proj.weight", p);
    visit(W, TENSOR_NORM, d, 0, NULL, SLOT(L, post_attention_layernorm), "%s.post_attention_layernorm.weight", p);
    char q[128];
    if (!config_is_moe_layer(c, li)) {
        snprintf(q, sizeof q, "%s.mlp", p);
        visit_ffn(W, SLOT(L, mlp), q, d, c->intermediate_size);
    } else {
        MoeWeights *m = SLOT(L, moe);
        visit(W, TENSOR_ROUTER, c->n_routed_experts, d, SLOT(m, gate), NULL, "%s.mlp.gate.weight", p);
        if (c->topk_method == TOPK_NOAUX_TC)
            visit(W, TENSOR_BIAS, c->n_routed_experts, 0, NULL, SLOT(m, e_score_correction_bias),
                  "%s.mlp.gate.e_score_correction_bias", p);
        for (int e = 0; e < c->n_routed_experts && !W->rc; e++) {
            W->t.expert = e;
            snprintf(q, sizeof q, "%s.mlp.experts.%d", p, e);
            visit_ffn(W, m ? &m->experts[e] : NULL, q, d, c->moe_intermediate_size);
        }
        W->t.expert = -1;
        if (c->n_shared_experts > 0) {
            snprintf(q, sizeof q, "%s.mlp.shared_experts", p);
            visit_ffn(W, SLOT(m, shared_experts), q, d, (int64_t)c->n_shared_experts * c->moe_intermediate_size);
        }
    }
    W->in_layer = 0;
}

int tensor_walk(const ModelConfig *c, int n_mtp, ModelWeights *w, TensorVisitor fn, void *ctx) {
    Walk W = {.c = c, .w = w, .fn = fn, .ctx = ctx};
    TensorSpec *t = &W.t;
    int64_t d = c->hidden_size, V = c->vocab_size;
    t->layer = t->expert = t->mtp = -1;
    t->head = c->tie_word_embeddings;
    visit(&W, TENSOR_EMBED, V, d, SLOT(w, embed_tokens), NULL, "model.embed_tokens.weight");
    t->head = 0;
    for (int i = 0; i < c->num_hidden_layers && !W.rc; i++) visit_layer(&W, w ? &w->layers[i] : NULL, i);
    for (int k = 0; k < n_mtp && !W.rc; k++) {
        int li = c->num_hidden_layers + k;
        MtpWeights *m = w ? &w->mtp[k] : NULL;
        t->layer = li;
        t->mtp = k;
        t->mtp_copy = 1;
        visit(&W, TENSOR_EMBED, V, d, SLOT(m, embed_tokens), NULL, "model.layers.%d.embed_tokens.weight", li);
        t->mtp_copy = 0;
        visit(&W, TENSOR_NORM, d, 0, NULL, SLOT(m, enorm), "model.layers.%d.enorm.weight", li);
        visit(&W, TENSOR_NORM, d, 0, NULL, SLOT(m, hnorm), "model.layers.%d.hnorm.weight", li);
        visit(&W, TENSOR_LINEAR, d, 2 * d, SLOT(m, eh_proj), NULL, "model.layers.%d.eh_proj.weight", li);
        visit_layer(&W, SLOT(m, layer), li);
        visit(&W, TENSOR_NORM, d, 0, NULL, SLOT(m, shared_head_norm), "model.layers.%d.shared_head.norm.weight", li);
        t->mtp_copy = t->head = 1;
        visit(&W, TENSOR_EMBED, V, d, SLOT(m, shared_head_head), NULL, "model.layers.%d.shared_head.head.weight", li);
        t->mtp_copy = t->head = 0;
    }
    t->layer = t->mtp = -1;
    visit(&W, TENSOR_NORM, d, 0, NULL, SLOT(w, norm), "model.norm.weight");
    t->head = 1;
    if (!c->tie_word_embeddings) visit(&W, TENSOR_EMBED, V, d, SLOT(w, lm_head), NULL, "lm_head.weight");
    return W.rc;
}

typedef struct List {
    TensorSpec *v;
    int n, cap;
} List;

static int append(const TensorSpec *t, void *ctx) {
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
    if (tensor_walk(c, c->num_nextn_predict_layers, NULL, append, &l)) {
        free(l.v);
        return err_set(err, "out of memory listing tensors");
    }
    *out = l.v;
    *n = l.n;
    return 0;
}

TensorCost tensor_cost(const ModelConfig *c, const TensorSpec *t) {
    TensorCost k = {0};
    int64_t rows = t->shape[0], cols = t->ndim == 2 ? t->shape[1] : 1;
    k.params = rows * cols;
    int active = t->kind == TENSOR_EMBED ? t->head : t->expert < c->num_experts_per_tok;
    k.active = active ? k.params : 0;
    k.matmul = active && t->ndim == 2 ? k.params : 0;
    k.bytes_fp8 = t->fp8 ? k.params + 4 * ((rows + 127) / 128) * ((cols + 127) / 128) : 2 * k.params;
    return k;
}

int64_t tensor_view_bytes(const MatView *m) {
    int64_t b = (int64_t)m->rows * m->cols * (int64_t)dtype_size(m->dtype);
    if (m->dtype == DT_F8_E4M3) b += 4 * (int64_t)((m->rows + m->block - 1) / m->block) * m->scale_cols;
    return b;
}

typedef struct Counter {
    const ModelConfig *c;
    ParamCounts p;
} Counter;

static int count(const TensorSpec *t, void *ctx) {
    Counter *n = ctx;
    TensorCost k = tensor_cost(n->c, t);
    if (t->mtp < 0) {
        n->p.total += k.params;
        n->p.active += k.active;
    } else {
        n->p.mtp_total += k.params;
        n->p.mtp_active += k.active;
    }
    return 0;
}

ParamCounts tensor_count_params(const ModelConfig *c) {
    Counter n = {.c = c};
    tensor_walk(c, c->num_nextn_predict_layers, NULL, count, &n);
    return n.p;
}
