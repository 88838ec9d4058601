// Model costs: the architecture from config.json, then one walk over its tensors that every
// parameter, memory and FLOP figure comes from: for MLA (DeepSeek) architectures the tensor table
// dsv3 loads checkpoints by (model/tensors.h), for the GQA/MHA ones compared against a walk of
// their own here. Conventions: docs/plan.md.
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/file.h"
#include "base/rng.h"
#include "model/tensors.h"
#include "plan/plan.h"

// The published configurations, as the keys of their HuggingFace config.json files (only the
// keys costs depend on). They go through the same parser as a user's file.
static const struct {
    const char *name;
    PlanPaper paper;
    const char *config;
} presets[] = {
    {"deepseek-v3", {70272, 250e9},
     "{\"model_type\": \"deepseek_v3\", \"vocab_size\": 129280, \"hidden_size\": 7168,"
     " \"num_hidden_layers\": 61, \"first_k_dense_replace\": 3, \"moe_layer_freq\": 1,"
     " \"intermediate_size\": 18432, \"moe_intermediate_size\": 2048, \"num_attention_heads\": 128,"
     " \"num_key_value_heads\": 128, \"q_lora_rank\": 1536, \"kv_lora_rank\": 512,"
     " \"qk_nope_head_dim\": 128, \"qk_rope_head_dim\": 64, \"v_head_dim\": 128,"
     " \"n_routed_experts\": 256, \"n_shared_experts\": 1, \"num_experts_per_tok\": 8,"
     " \"n_group\": 8, \"topk_group\": 4, \"topk_method\": \"noaux_tc\", \"scoring_func\": \"sigmoid\","
     " \"num_nextn_predict_layers\": 1, \"tie_word_embeddings\": false, \"attention_bias\": false}"},
    {"deepseek-v2", {0, 155e9},
     "{\"model_type\": \"deepseek_v2\", \"vocab_size\": 102400, \"hidden_size\": 5120,"
     " \"num_hidden_layers\": 60, \"first_k_dense_replace\": 1, \"moe_layer_freq\": 1,"
     " \"intermediate_size\": 12288, \"moe_intermediate_size\": 1536, \"num_attention_heads\": 128,"
     " \"num_key_value_heads\": 128, \"q_lora_rank\": 1536, \"kv_lora_rank\": 512,"
     " \"qk_nope_head_dim\": 128, \"qk_rope_head_dim\": 64, \"v_head_dim\": 128,"
     " \"n_routed_experts\": 160, \"n_shared_experts\": 2, \"num_experts_per_tok\": 6,"
     " \"n_group\": 8, \"topk_group\": 3, \"topk_method\": \"group_limited_greedy\","
     " \"scoring_func\": \"softmax\", \"tie_word_embeddings\": false, \"attention_bias\": false}"},
    {"deepseek-v2-lite", {0, 0},
     "{\"model_type\": \"deepseek_v2\", \"vocab_size\": 102400, \"hidden_size\": 2048,"
     " \"num_hidden_layers\": 27, \"first_k_dense_replace\": 1, \"moe_layer_freq\": 1,"
     " \"intermediate_size\": 10944, \"moe_intermediate_size\": 1408, \"num_attention_heads\": 16,"
     " \"num_key_value_heads\": 16, \"q_lora_rank\": null, \"kv_lora_rank\": 512,"
     " \"qk_nope_head_dim\": 128, \"qk_rope_head_dim\": 64, \"v_head_dim\": 128,"
     " \"n_routed_experts\": 64, \"n_shared_experts\": 2, \"num_experts_per_tok\": 6,"
     " \"n_group\": 1, \"topk_group\": 1, \"topk_method\": \"greedy\", \"scoring_func\": \"softmax\","
     " \"tie_word_embeddings\": false, \"attention_bias\": false}"},
    // The paper's training-cost row says "Qwen-72B"; its KV row says Qwen-2.5 72B.
    {"qwen2.5-72b", {327680, 394e9},
     "{\"model_type\": \"qwen2\", \"vocab_size\": 152064, \"hidden_size\": 8192,"
     " \"num_hidden_layers\": 80, \"intermediate_size\": 29568, \"num_attention_heads\": 64,"
     " \"num_key_value_heads\": 8, \"tie_word_embeddings\": false}"},
    {"llama3.1-405b", {516096, 2448e9},
     "{\"model_type\": \"llama\", \"vocab_size\": 128256, \"hidden_size\": 16384,"
     " \"num_hidden_layers\": 126, \"intermediate_size\": 53248, \"num_attention_heads\": 128,"
     " \"num_key_value_heads\": 8, \"attention_bias\": false, \"mlp_bias\": false,"
     " \"tie_word_embeddings\": false}"},
};
#define NPRESETS ((int)(sizeof presets / sizeof presets[0]))

int plan_preset_count(void) { return NPRESETS; }

const char *plan_preset_name(int i) { return i >= 0 && i < NPRESETS ? presets[i].name : NULL; }

PlanPaper plan_preset_paper(const char *name) {
    for (int i = 0; i < NPRESETS; i++)
        if (strcmp(presets[i].name, name) == 0) return presets[i].paper;
    return (PlanPaper){0, 0};
}

// Largest value any key may take, so that products of two keys fit an int64; products of more
// are bounded by the 1e15-parameter check of parse_arch.
#define DIM_MAX (1LL << 24)

// An integer key: absent or null gives dflt (or an error when required).
static int get_int(json_t *root, const char *src, const char *key, int required, int64_t dflt,
                   int64_t lo, int64_t *out, Error *err) {
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) {
        if (required) return err_set(err, "%s: %s: missing", src, key);
        *out = dflt;
        return 0;
    }
    if (!json_is_integer(v)) return err_set(err, "%s: %s: expected an integer", src, key);
    json_int_t x = json_integer_value(v);
    if (x < lo || x > DIM_MAX)
        return err_set(err, "%s: %s: %lld is outside [%lld, %lld]", src, key, (long long)x,
                       (long long)lo, (long long)DIM_MAX);
    *out = x;
    return 0;
}

static int get_bool(json_t *root, const char *src, const char *key, int dflt, int *out, Error *err) {
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) {
        *out = dflt;
        return 0;
    }
    if (!json_is_boolean(v)) return err_set(err, "%s: %s: expected true or false", src, key);
    *out = json_is_true(v);
    return 0;
}

static int get_str(json_t *root, const char *src, const char *key, const char **out, Error *err) {
    json_t *v = json_object_get(root, key);
    *out = "";
    if (!v || json_is_null(v)) return 0;
    if (!json_is_string(v)) return err_set(err, "%s: %s: expected a string", src, key);
    *out = json_string_value(v);
    return 0;
}

static int has_key(json_t *root, const char *key) {
    json_t *v = json_object_get(root, key);
    return v && !json_is_null(v);
}

static int check_size(const PlanArch *a, const char *src, Error *err);

static int parse_arch(PlanArch *a, json_t *root, const char *src, Error *err) {
    memset(a, 0, sizeof *a);
    snprintf(a->name, sizeof a->name, "%s", src);
    if (!json_is_object(root)) return err_set(err, "%s: expected a JSON object", src);
    if (get_int(root, src, "vocab_size", 1, 0, 1, &a->vocab, err) ||
        get_int(root, src, "hidden_size", 1, 0, 1, &a->hidden, err) ||
        get_int(root, src, "num_hidden_layers", 1, 0, 1, &a->layers, err) ||
        get_int(root, src, "intermediate_size", 1, 0, 1, &a->intermediate, err) ||
        get_int(root, src, "num_attention_heads", 1, 0, 1, &a->heads, err) ||
        get_bool(root, src, "tie_word_embeddings", 0, &a->tie_embeddings, err) ||
        get_bool(root, src, "mlp_bias", 0, &a->mlp_bias, err) ||
        get_bool(root, src, "attention_bias", 0, &a->o_bias, err) ||
        get_int(root, src, "num_nextn_predict_layers", 0, 0, 0, &a->mtp, err))
        return -1;
    const char *model_type, *topk_method;
    if (get_str(root, src, "model_type", &model_type, err) || get_str(root, src, "topk_method", &topk_method, err))
        return -1;
    // Qwen2 puts biases on q/k/v (not o) without saying so in its config.
    a->qkv_bias = a->o_bias || strncmp(model_type, "qwen2", 5) == 0;

    a->mla = has_key(root, "kv_lora_rank");
    if (a->mla) {
        if (get_int(root, src, "kv_lora_rank", 1, 0, 1, &a->kv_lora, err) ||
            get_int(root, src, "q_lora_rank", 0, 0, 0, &a->q_lora, err) ||
            get_int(root, src, "qk_nope_head_dim", 1, 0, 0, &a->qk_nope, err) ||
            get_int(root, src, "qk_rope_head_dim", 1, 0, 0, &a->qk_rope, err) ||
            get_int(root, src, "v_head_dim", 1, 0, 1, &a->v_head, err))
            return -1;
        if (a->qk_nope + a->qk_rope == 0)
            return err_set(err, "%s: qk_nope_head_dim: qk_nope_head_dim + qk_rope_head_dim is 0", src);
        a->kv_heads = a->heads;
        a->head_dim = a->qk_nope + a->qk_rope;
    } else {
        if (get_int(root, src, "num_key_value_heads", 0, a->heads, 1, &a->kv_heads, err)) return -1;
        if (a->heads % a->kv_heads)
            return err_set(err, "%s: num_key_value_heads: %lld does not divide num_attention_heads %lld", src,
                           (long long)a->kv_heads, (long long)a->heads);
        if (!has_key(root, "head_dim") && a->hidden % a->heads)
            return err_set(err, "%s: head_dim: missing, and hidden_size %lld is not a multiple of num_attention_heads %lld",
                           src, (long long)a->hidden, (long long)a->heads);
        if (get_int(root, src, "head_dim", 0, a->hidden / a->heads, 1, &a->head_dim, err)) return -1;
    }

    // Experts: DeepSeek's n_routed_experts, or Mixtral's num_local_experts (every layer MoE,
    // experts as wide as intermediate_size).
    const char *experts_key = has_key(root, "n_routed_experts") ? "n_routed_experts" : "num_local_experts";
    if (get_int(root, src, experts_key, 0, 0, 0, &a->n_routed, err)) return -1;
    if (a->n_routed > 0) {
        if (get_int(root, src, "num_experts_per_tok", 1, 0, 1, &a->top_k, err) ||
            get_int(root, src, "moe_intermediate_size", 0, a->intermediate, 1, &a->moe_intermediate, err) ||
            get_int(root, src, "n_shared_experts", 0, 0, 0, &a->n_shared, err) ||
            get_int(root, src, "first_k_dense_replace", 0, 0, 0, &a->first_dense, err) ||
            get_int(root, src, "moe_layer_freq", 0, 1, 1, &a->moe_freq, err))
            return -1;
        if (a->top_k > a->n_routed)
            return err_set(err, "%s: num_experts_per_tok: %lld is more than the %lld experts of %s", src,
                           (long long)a->top_k, (long long)a->n_routed, experts_key);
        if (a->first_dense > a->layers)
            return err_set(err, "%s: first_k_dense_replace: %lld is more than num_hidden_layers %lld", src,
                           (long long)a->first_dense, (long long)a->layers);
        a->shared_intermediate = a->n_shared * a->moe_intermediate;
        a->router_bias = strcmp(topk_method, "noaux_tc") == 0;
        int grouped = a->router_bias || strcmp(topk_method, "group_limited_greedy") == 0;
        if (get_int(root, src, "n_group", 0, 1, 1, &a->n_group, err) ||
            get_int(root, src, "topk_group", 0, a->n_group, 1, &a->topk_group, err))
            return -1;
        if (!grouped) a->n_group = a->topk_group = 1;  // plain top-k: no group limit
        if (a->n_routed % a->n_group || a->topk_group > a->n_group)
            return err_set(err, "%s: n_group %lld, topk_group %lld: not groups of %lld experts", src,
                           (long long)a->n_group, (long long)a->topk_group, (long long)a->n_routed);
    }
    return check_size(a, src, err);
}

int plan_arch_from_json(PlanArch *a, const char *text, const char *source, Error *err) {
    json_error_t je;
    json_t *root = json_loads(text, 0, &je);
    if (!root) return err_set(err, "%s: line %d column %d: %s", source, je.line, je.column, je.text);
    int rc = parse_arch(a, root, source, err);
    json_decref(root);
    return rc;
}

int plan_arch_from_file(PlanArch *a, const char *path, Error *err) {
    size_t len;
    char *text = file_read_all(path, &len, err);
    if (!text) return -1;
    if (strlen(text) != len) {
        free(text);
        return err_set(err, "%s: not a JSON text (contains a NUL byte)", path);
    }
    int rc = plan_arch_from_json(a, text, path, err);
    free(text);
    return rc;
}

int plan_arch_preset(PlanArch *a, const char *name, Error *err) {
    for (int i = 0; i < NPRESETS; i++)
        if (strcmp(presets[i].name, name) == 0) {
            if (plan_arch_from_json(a, presets[i].config, name, err)) return -1;
            return 0;
        }
    char known[256] = "";
    for (int i = 0; i < NPRESETS; i++)
        snprintf(known + strlen(known), sizeof known - strlen(known), "%s%s", i ? ", " : "", presets[i].name);
    return err_set(err, "unknown preset '%s' (known: %s)", name, known);
}

int plan_is_moe_layer(const PlanArch *a, int64_t layer) {
    return a->n_routed > 0 && layer >= a->first_dense && layer % a->moe_freq == 0;
}

int64_t plan_moe_layers(const PlanArch *a) {
    int64_t n = 0;
    for (int64_t i = 0; i < a->layers; i++) n += plan_is_moe_layer(a, i);
    return n;
}

int plan_model_config(const PlanArch *a, ModelConfig *c) {
    memset(c, 0, sizeof *c);
    if (!a->mla) return -1;
    snprintf(c->model_type, sizeof c->model_type, "deepseek_v3");
    c->vocab_size = (int)a->vocab;
    c->hidden_size = (int)a->hidden;
    c->num_hidden_layers = (int)a->layers;
    c->intermediate_size = (int)a->intermediate;
    c->num_attention_heads = (int)a->heads;
    c->tie_word_embeddings = a->tie_embeddings;
    c->q_lora_rank = (int)a->q_lora;
    c->kv_lora_rank = (int)a->kv_lora;
    c->qk_nope_head_dim = (int)a->qk_nope;
    c->qk_rope_head_dim = (int)a->qk_rope;
    c->v_head_dim = (int)a->v_head;
    c->n_routed_experts = (int)a->n_routed;
    c->n_shared_experts = (int)a->n_shared;
    c->num_experts_per_tok = (int)a->top_k;
    c->moe_intermediate_size = (int)a->moe_intermediate;
    c->first_k_dense_replace = (int)a->first_dense;
    c->moe_layer_freq = a->moe_freq > 0 ? (int)a->moe_freq : 1;
    c->n_group = c->topk_group = 1;
    c->topk_method = a->router_bias ? TOPK_NOAUX_TC : TOPK_GREEDY;
    c->num_nextn_predict_layers = (int)a->mtp;
    return 0;
}

// Every count, with and without the MTP modules. Counts are doubles so that an absurd configuration
// cannot overflow before it is rejected; every realistic count stays far below 2^53, where doubles
// are exact.
typedef struct Tally {
    double total, active, matmul;
    double bytes_fp8;
} Tally;

typedef struct Tallies {
    const ModelConfig *c;
    Tally main, mtp;  // the main model; the MTP modules alone
} Tallies;

static int tally_tensor(const TensorSpec *t, void *ctx) {
    Tallies *x = ctx;
    TensorCost k = tensor_cost(x->c, t);
    Tally *y = t->mtp < 0 ? &x->main : &x->mtp;
    y->total += (double)k.params;
    y->active += (double)k.active;
    y->matmul += (double)k.matmul;
    y->bytes_fp8 += (double)k.bytes_fp8;
    return 0;
}

// The GQA/MHA walk (LLaMA, Qwen, Mixtral-style experts): dsv3 cannot load these models, so they
// have no tensor table; plan_model compares DeepSeek's figures against theirs. Each tensor is
// counted with the conventions of tensor_cost: stored, active (copies a token's computation uses:
// the routed experts it reaches, not the embedding table) and multiplied (active matrices).
typedef enum { KIND_FP8_LINEAR, KIND_BF16_MATRIX, KIND_VECTOR } GqaKind;

static void tensor(Tally *t, GqaKind kind, int64_t rows, int64_t cols, double stored, double active,
                   double multiplied) {
    double n = (double)rows * (double)cols;
    t->total += n * stored;
    t->active += n * active;
    t->matmul += n * multiplied;
    if (kind == KIND_FP8_LINEAR)  // E4M3 codes plus one F32 scale per 128x128 block (SPEC §3.2)
        t->bytes_fp8 += stored * (n + 4.0 * (double)((rows + 127) / 128) * (double)((cols + 127) / 128));
    else
        t->bytes_fp8 += stored * n * 2;
}

static void linear(Tally *t, int64_t out, int64_t in, double stored, double active) {
    tensor(t, KIND_FP8_LINEAR, out, in, stored, active, active);
}

static void vec(Tally *t, int64_t n) { tensor(t, KIND_VECTOR, n, 1, 1, 1, 0); }

static void swiglu(Tally *t, int64_t d, int64_t width, double stored, double active) {
    linear(t, width, d, stored, active);  // gate_proj
    linear(t, width, d, stored, active);  // up_proj
    linear(t, d, width, stored, active);  // down_proj
}

static void gqa_layer(Tally *t, const PlanArch *a, int moe) {
    int64_t d = a->hidden, H = a->heads, q = H * a->head_dim, kv = a->kv_heads * a->head_dim;
    vec(t, d);               // input_layernorm
    vec(t, d);               // post_attention_layernorm
    linear(t, q, d, 1, 1);   // q_proj
    linear(t, kv, d, 1, 1);  // k_proj
    linear(t, kv, d, 1, 1);  // v_proj
    linear(t, d, q, 1, 1);   // o_proj
    if (a->qkv_bias) {
        vec(t, q);
        vec(t, kv);
        vec(t, kv);
    }
    if (a->o_bias) vec(t, d);
    if (!moe) {
        swiglu(t, d, a->intermediate, 1, 1);
        if (a->mlp_bias) {
            vec(t, a->intermediate);
            vec(t, a->intermediate);
            vec(t, d);
        }
        return;
    }
    // every token is scored against every expert, so the whole router is multiplied
    tensor(t, KIND_BF16_MATRIX, a->n_routed, d, 1, 1, 1);  // router
    if (a->router_bias) vec(t, a->n_routed);             // e_score_correction_bias
    swiglu(t, d, a->moe_intermediate, (double)a->n_routed, (double)a->top_k);
    if (a->shared_intermediate) swiglu(t, d, a->shared_intermediate, 1, 1);
}

static void gqa_walk(const PlanArch *a, Tally *body, Tally *mtp) {
    int64_t V = a->vocab, d = a->hidden;
    tensor(body, KIND_BF16_MATRIX, V, d, 1, 0, 0);  // embed_tokens: a token reads one row of it
    for (int64_t i = 0; i < a->layers; i++) gqa_layer(body, a, plan_is_moe_layer(a, i));
    vec(body, d);  // model.norm
    if (a->tie_embeddings)
        tensor(body, KIND_BF16_MATRIX, V, d, 0, 1, 1);  // lm_head is embed_tokens: active, not stored again
    else
        tensor(body, KIND_BF16_MATRIX, V, d, 1, 1, 1);
    for (int64_t k = 0; k < a->mtp; k++) {  // laid out as DeepSeek's MTP modules (SPEC §5)
        tensor(mtp, KIND_BF16_MATRIX, V, d, 1, 0, 0);      // embed_tokens copy
        vec(mtp, d);                                       // enorm
        vec(mtp, d);                                       // hnorm
        tensor(mtp, KIND_BF16_MATRIX, d, 2 * d, 1, 1, 1);  // eh_proj
        gqa_layer(mtp, a, plan_is_moe_layer(a, a->layers + k));
        vec(mtp, d);                                       // shared_head.norm
        tensor(mtp, KIND_BF16_MATRIX, V, d, 1, 1, 1);      // shared_head.head
    }
}

static void tally(const PlanArch *a, Tally *body, Tally *mtp) {
    ModelConfig c;
    if (plan_model_config(a, &c)) {
        *body = *mtp = (Tally){0};
        gqa_walk(a, body, mtp);
        return;
    }
    Tallies x = {.c = &c};
    tensor_walk(&c, c.num_nextn_predict_layers, NULL, tally_tensor, &x);
    *body = x.main;
    *mtp = x.mtp;
}

// Counting an MLA model walks every routed expert's tensors one by one: (3 N_r + 14) tensors or
// fewer per layer, ~0.1 us each. Refuse sizes whose walks would take more than about a second
// (DeepSeek-V3 has 47,000 tensors), then sizes whose counts would not fit the int64 figures.
#define MAX_TENSORS 2e6
#define MAX_PARAMS 1e15

static double params_stored(const TensorSpec *t) {
    return (double)t->shape[0] * (double)(t->ndim == 2 ? t->shape[1] : 1);
}

static int add_stored(const TensorSpec *t, void *ctx) {
    double *total = ctx;
    *total += params_stored(t);
    return *total > MAX_PARAMS;
}

static int check_size(const PlanArch *a, const char *src, Error *err) {
    double total = 0;
    ModelConfig c;
    if (plan_model_config(a, &c) == 0) {
        if ((double)(a->layers + a->mtp) * (3.0 * (double)a->n_routed + 14) > MAX_TENSORS)
            return err_set(err, "%s: n_routed_experts: the configuration describes more than 2 million tensors", src);
        tensor_walk(&c, c.num_nextn_predict_layers, NULL, add_stored, &total);
    } else {
        Tally body = {0}, mtp = {0};
        gqa_walk(a, &body, &mtp);
        total = body.total + mtp.total;
    }
    if (total > MAX_PARAMS)
        return err_set(err, "%s: hidden_size: the configuration describes more than 1e15 parameters", src);
    return 0;
}

void plan_model(const PlanArch *a, int64_t seq, PlanModel *m) {
    memset(m, 0, sizeof *m);
    Tally t, mtp;
    tally(a, &t, &mtp);
    m->total_params = (int64_t)t.total;
    m->active_params = (int64_t)t.active;
    m->matmul_params = (int64_t)t.matmul;
    m->weight_bytes_bf16 = 2 * m->total_params;
    m->weight_bytes_fp8 = (int64_t)t.bytes_fp8;
    m->total_params_mtp = (int64_t)(t.total + mtp.total);
    m->active_params_mtp = (int64_t)(t.active + mtp.active);
    m->matmul_params_mtp = (int64_t)(t.matmul + mtp.matmul);
    m->weight_bytes_bf16_mtp = 2 * m->total_params_mtp;
    m->weight_bytes_fp8_mtp = (int64_t)(t.bytes_fp8 + mtp.bytes_fp8);

    // MLA caches the latent and the shared rotary key; GQA a key and a value per KV head
    int64_t per_layer = a->mla ? a->kv_lora + a->qk_rope : 2 * a->kv_heads * a->head_dim;
    m->kv_elems_per_token = per_layer * a->layers;
    m->kv_bytes_per_token_bf16 = 2 * m->kv_elems_per_token;
    m->kv_bytes_per_token_fp8 = m->kv_elems_per_token;

    // Training FLOPs per token: 2 per multiply-add forward, 4 backward (input and weight
    // gradients), so 6 x the weights a token is multiplied by; attention scores (qk dims) and the
    // weighted sum of values (v dims) over a causal context of seq/2 tokens on average, also x3.
    int64_t qk = a->mla ? a->qk_nope + a->qk_rope : a->head_dim;
    int64_t v = a->mla ? a->v_head : a->head_dim;
    double attn_per_layer = 3.0 * (double)seq * (double)(a->heads * (qk + v));
    m->seq = seq;
    m->train_flops_matmul = 6.0 * (double)m->matmul_params;
    m->train_flops_attention = attn_per_layer * (double)a->layers;
    m->train_flops_per_token = m->train_flops_matmul + m->train_flops_attention;
    m->train_flops_per_token_mtp = 6.0 * (double)m->matmul_params_mtp + attn_per_layer * (double)(a->layers + a->mtp);
}

int plan_ep_traffic(const PlanArch *a, int64_t ranks, int64_t ranks_per_node, int64_t draws, PlanEpTraffic *t,
                    Error *err) {
    memset(t, 0, sizeof *t);
    t->ranks = ranks, t->ranks_per_node = ranks_per_node;
    if (a->n_routed <= 0) return err_set(err, "%s: a dense model has no expert-parallel traffic", a->name);
    if (ranks < 1 || a->n_routed % ranks)
        return err_set(err, "--ep-ranks %lld: the %lld routed experts do not split evenly", (long long)ranks,
                       (long long)a->n_routed);
    if (ranks_per_node < 1 || (ranks % ranks_per_node && ranks_per_node % ranks))
        return err_set(err, "--ranks-per-node %lld: %lld ranks do not make whole nodes", (long long)ranks_per_node,
                       (long long)ranks);
    if (ranks_per_node > ranks) ranks_per_node = ranks;
    int64_t per_rank = a->n_routed / ranks, per_group = a->n_routed / a->n_group;
    Rng rng;
    rng_seed(&rng, 12345);
    int64_t *pool = malloc(sizeof(int64_t) * (size_t)a->n_routed), *groups = malloc(sizeof(int64_t) * (size_t)a->n_group);
    unsigned char *hit = calloc((size_t)ranks, 1);
    if (!pool || !groups || !hit) {
        free(pool), free(groups), free(hit);
        return err_set(err, "out of memory");
    }
    double sr = 0, sn = 0, so = 0, sno = 0;
    for (int64_t n = 0; n < draws; n++) {
        // topk_group groups, then top_k experts among theirs, each uniformly without replacement
        for (int64_t g = 0; g < a->n_group; g++) groups[g] = g;
        for (int64_t g = 0; g < a->topk_group; g++) {
            int64_t j = g + (int64_t)(rng_next(&rng) % (uint64_t)(a->n_group - g)), x = groups[g];
            groups[g] = groups[j], groups[j] = x;
        }
        int64_t m = 0;
        for (int64_t g = 0; g < a->topk_group; g++)
            for (int64_t e = 0; e < per_group; e++) pool[m++] = groups[g] * per_group + e;
        memset(hit, 0, (size_t)ranks);
        int64_t source = (int64_t)(rng_next(&rng) % (uint64_t)ranks);
        for (int64_t k = 0; k < a->top_k && k < m; k++) {
            int64_t j = k + (int64_t)(rng_next(&rng) % (uint64_t)(m - k)), x = pool[k];
            pool[k] = pool[j], pool[j] = x;
            hit[pool[k] / per_rank] = 1;
        }
        int64_t reached = 0, nodes = 0, other = 0, other_nodes = 0;
        for (int64_t r = 0; r < ranks; r++) {
            if (!hit[r]) continue;
            reached++;
            other += r != source;
            other_nodes += r / ranks_per_node != source / ranks_per_node;
        }
        for (int64_t nd = 0; nd < ranks / ranks_per_node; nd++) {
            int any = 0;
            for (int64_t r = nd * ranks_per_node; r < (nd + 1) * ranks_per_node; r++) any |= hit[r];
            nodes += any;
        }
        sr += reached, sn += nodes, so += other, sno += other_nodes;
        if (nodes > t->max_nodes) t->max_nodes = nodes;
    }
    free(pool), free(groups), free(hit);
    t->ranks_per_node = ranks_per_node;
    t->ranks_reached = sr / draws, t->nodes_reached = sn / draws;
    t->rows_other_ranks = so / draws, t->rows_other_nodes = sno / draws;
    return 0;
}

void plan_ep(const PlanArch *a, double bandwidth_gbps, int64_t tokens_per_device, int64_t hidden, PlanEp *e) {
    memset(e, 0, sizeof *e);
    e->bandwidth_gbps = bandwidth_gbps;
    e->tokens_per_device = tokens_per_device;
    e->hidden = hidden;
    e->applicable = a->n_routed > 0;
    if (!e->applicable) return;
    e->experts_per_token = a->top_k + a->n_shared;
    // dispatch in FP8 (1 byte per element), combine in BF16 (2 bytes)
    e->bytes = 3.0 * (double)tokens_per_device * (double)e->experts_per_token * (double)hidden;
    e->alltoall_us = e->bytes / (bandwidth_gbps * 1e9) * 1e6;
    // two micro-batches overlap, so each layer's all-to-all runs twice per step; the paper counts
    // every layer, the dense ones included
    e->tpot_ms = 2.0 * e->alltoall_us * (double)a->layers / 1000.0;
    e->tokens_per_s = 1000.0 / e->tpot_ms;
}
