#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "model/tensors.h"

typedef struct {
    TensorSpec *v;
    int n, cap;
} List;

static void add(List *l, TensorKind kind, int64_t rows, int64_t cols, const char *fmt, ...) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 256;
        TensorSpec *nv = realloc(l->v, sizeof *nv * l->cap);
        if (!nv) {
            l->cap = -1;
            return;
        }
        l->v = nv;
    }
    if (l->cap < 0) return;
    TensorSpec *t = &l->v[l->n++];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->name, sizeof t->name, fmt, ap);
    va_end(ap);
    t->kind = kind;
    t->ndim = cols ? 2 : 1;
    t->shape[0] = rows;
    t->shape[1] = cols;
}

static void add_ffn(List *l, const char *p, int64_t d, int64_t inter) {
    add(l, TENSOR_LINEAR, inter, d, "%s.gate_proj.weight", p);
    add(l, TENSOR_LINEAR, inter, d, "%s.up_proj.weight", p);
    add(l, TENSOR_LINEAR, d, inter, "%s.down_proj.weight", p);
}

static void add_layer(List *l, const ModelConfig *c, int i) {
    int64_t d = c->hidden_size, H = c->num_attention_heads, qk = config_qk_head_dim(c);
    char p[64];
    snprintf(p, sizeof p, "model.layers.%d", i);
    add(l, TENSOR_NORM, d, 0, "%s.input_layernorm.weight", p);
    if (c->q_lora_rank > 0) {
        add(l, TENSOR_LINEAR, c->q_lora_rank, d, "%s.self_attn.q_a_proj.weight", p);
        add(l, TENSOR_NORM, c->q_lora_rank, 0, "%s.self_attn.q_a_layernorm.weight", p);
        add(l, TENSOR_LINEAR, H * qk, c->q_lora_rank, "%s.self_attn.q_b_proj.weight", p);
    } else {
        add(l, TENSOR_LINEAR, H * qk, d, "%s.self_attn.q_proj.weight", p);
    }
    add(l, TENSOR_LINEAR, c->kv_lora_rank + c->qk_rope_head_dim, d, "%s.self_attn.kv_a_proj_with_mqa.weight", p);
    add(l, TENSOR_NORM, c->kv_lora_rank, 0, "%s.self_attn.kv_a_layernorm.weight", p);
    add(l, TENSOR_LINEAR, H * (c->qk_nope_head_dim + c->v_head_dim), c->kv_lora_rank, "%s.self_attn.kv_b_proj.weight", p);
    add(l, TENSOR_LINEAR, d, H * c->v_head_dim, "%s.self_attn.o_proj.weight", p);
    add(l, TENSOR_NORM, d, 0, "%s.post_attention_layernorm.weight", p);
    char q[128];
    if (!config_is_moe_layer(c, i)) {
        snprintf(q, sizeof q, "%s.mlp", p);
        add_ffn(l, q, d, c->intermediate_size);
        return;
    }
    add(l, TENSOR_ROUTER, c->n_routed_experts, d, "%s.mlp.gate.weight", p);
    if (c->topk_method == TOPK_NOAUX_TC) add(l, TENSOR_BIAS, c->n_routed_experts, 0, "%s.mlp.gate.e_score_correction_bias", p);
    for (int e = 0; e < c->n_routed_experts; e++) {
        snprintf(q, sizeof q, "%s.mlp.experts.%d", p, e);
        add_ffn(l, q, d, c->moe_intermediate_size);
    }
    if (c->n_shared_experts > 0) {
        snprintf(q, sizeof q, "%s.mlp.shared_experts", p);
        add_ffn(l, q, d, (int64_t)c->n_shared_experts * c->moe_intermediate_size);
    }
}

int tensor_specs(const ModelConfig *c, TensorSpec **out, int *n, Error *err) {
    List l = {0};
    int64_t d = c->hidden_size, V = c->vocab_size;
    add(&l, TENSOR_EMBED, V, d, "model.embed_tokens.weight");
    for (int i = 0; i < c->num_hidden_layers; i++) add_layer(&l, c, i);
    for (int k = 0; k < c->num_nextn_predict_layers; k++) {
        int li = c->num_hidden_layers + k;
        add(&l, TENSOR_EMBED, V, d, "model.layers.%d.embed_tokens.weight", li);
        add(&l, TENSOR_NORM, d, 0, "model.layers.%d.enorm.weight", li);
        add(&l, TENSOR_NORM, d, 0, "model.layers.%d.hnorm.weight", li);
        add(&l, TENSOR_LINEAR, d, 2 * d, "model.layers.%d.eh_proj.weight", li);
        add_layer(&l, c, li);
        add(&l, TENSOR_NORM, d, 0, "model.layers.%d.shared_head.norm.weight", li);
        add(&l, TENSOR_EMBED, V, d, "model.layers.%d.shared_head.head.weight", li);
    }
    add(&l, TENSOR_NORM, d, 0, "model.norm.weight");
    if (!c->tie_word_embeddings) add(&l, TENSOR_EMBED, V, d, "lm_head.weight");
    if (l.cap < 0) {
        free(l.v);
        return err_set(err, "out of memory listing tensors");
    }
    *out = l.v;
    *n = l.n;
    return 0;
}
