#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "base/file.h"
#include "model/config.h"

typedef struct {
    const char *path;
    json_t *root;
    Error *err;
} Reader;

// An integer key: required keys fail when absent; null counts as absent.
static int get_int(Reader *r, const char *key, int required, long dflt, long lo, long hi, int *out) {
    json_t *v = json_object_get(r->root, key);
    if (!v || json_is_null(v)) {
        if (required) return err_set(r->err, "%s: %s: missing", r->path, key);
        *out = (int)dflt;
        return 0;
    }
    if (!json_is_integer(v)) return err_set(r->err, "%s: %s: not an integer", r->path, key);
    json_int_t x = json_integer_value(v);
    if (x < lo || x > hi) return err_set(r->err, "%s: %s: %lld is outside [%ld, %ld]", r->path, key, (long long)x, lo, hi);
    *out = (int)x;
    return 0;
}

// prefix names the enclosing object in messages ("rope_scaling."), "" at the top level.
static int get_num(Reader *r, json_t *obj, const char *prefix, const char *key, int required, double dflt,
                   double lo, double hi, double *out) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        if (required) return err_set(r->err, "%s: %s%s: missing", r->path, prefix, key);
        *out = dflt;
        return 0;
    }
    if (!json_is_number(v)) return err_set(r->err, "%s: %s%s: not a number", r->path, prefix, key);
    double x = json_number_value(v);
    if (!(x >= lo && x <= hi))
        return err_set(r->err, "%s: %s%s: %g is outside [%g, %g]", r->path, prefix, key, x, lo, hi);
    *out = x;
    return 0;
}

static int get_bool(Reader *r, const char *key, int dflt, int *out) {
    json_t *v = json_object_get(r->root, key);
    if (!v || json_is_null(v)) {
        *out = dflt;
        return 0;
    }
    if (!json_is_boolean(v)) return err_set(r->err, "%s: %s: not true or false", r->path, key);
    *out = json_is_true(v);
    return 0;
}

static int get_str(Reader *r, const char *key, const char *dflt, char *out, size_t n) {
    json_t *v = json_object_get(r->root, key);
    const char *s = dflt;
    if (v && !json_is_null(v)) {
        if (!json_is_string(v)) return err_set(r->err, "%s: %s: not a string", r->path, key);
        s = json_string_value(v);
    }
    if (strlen(s) >= n) return err_set(r->err, "%s: %s: value too long", r->path, key);
    strcpy(out, s);
    return 0;
}

#define BIG 1000000000L

static int parse_rope_scaling(Reader *r, ModelConfig *c) {
    json_t *rs = json_object_get(r->root, "rope_scaling");
    c->rope_yarn = 0;
    c->rope_factor = 1;
    if (!rs || json_is_null(rs)) return 0;
    if (!json_is_object(rs)) return err_set(r->err, "%s: rope_scaling: not an object", r->path);
    json_t *t = json_object_get(rs, "type");
    if (!t) t = json_object_get(rs, "rope_type");
    if (!json_is_string(t)) return err_set(r->err, "%s: rope_scaling.type: missing", r->path);
    if (strcmp(json_string_value(t), "yarn") != 0)
        return err_set(r->err, "%s: rope_scaling.type: '%s' is not supported (only yarn)", r->path, json_string_value(t));
    double orig;
    const char *p = "rope_scaling.";
    if (get_num(r, rs, p, "factor", 1, 1, 1, 1e6, &c->rope_factor) ||
        get_num(r, rs, p, "original_max_position_embeddings", 1, 0, 1, 1e9, &orig) ||
        get_num(r, rs, p, "beta_fast", 0, 32, 1e-6, 1e6, &c->rope_beta_fast) ||
        get_num(r, rs, p, "beta_slow", 0, 1, 1e-6, 1e6, &c->rope_beta_slow) ||
        get_num(r, rs, p, "mscale", 0, 1, 0, 1e3, &c->rope_mscale) ||
        get_num(r, rs, p, "mscale_all_dim", 0, 0, 0, 1e3, &c->rope_mscale_all_dim))
        return -1;
    c->rope_original_max_position = (int)orig;
    c->rope_yarn = 1;
    return 0;
}

int config_load(ModelConfig *c, const char *path, Error *err) {
    memset(c, 0, sizeof *c);
    json_t *root = file_read_json(path, 0, err);
    if (!root) return -1;
    if (!json_is_object(root)) {
        json_decref(root);
        return err_set(err, "%s: not a JSON object", path);
    }
    Reader r = {path, root, err};
    int rc = -1;
    char buf[64];
    if (get_str(&r, "model_type", "deepseek_v3", c->model_type, sizeof c->model_type) ||
        get_int(&r, "vocab_size", 1, 0, 1, BIG, &c->vocab_size) ||
        get_int(&r, "hidden_size", 1, 0, 1, 1 << 20, &c->hidden_size) ||
        get_int(&r, "num_hidden_layers", 1, 0, 1, 10000, &c->num_hidden_layers) ||
        get_int(&r, "first_k_dense_replace", 0, 0, 0, 10000, &c->first_k_dense_replace) ||
        get_int(&r, "moe_layer_freq", 0, 1, 1, 10000, &c->moe_layer_freq) ||
        get_int(&r, "intermediate_size", 1, 0, 1, 1 << 22, &c->intermediate_size) ||
        get_int(&r, "num_attention_heads", 1, 0, 1, 4096, &c->num_attention_heads) ||
        get_int(&r, "q_lora_rank", 0, 0, 0, 1 << 20, &c->q_lora_rank) ||
        get_int(&r, "kv_lora_rank", 1, 0, 1, 1 << 20, &c->kv_lora_rank) ||
        get_int(&r, "qk_nope_head_dim", 1, 0, 0, 1 << 16, &c->qk_nope_head_dim) ||
        get_int(&r, "qk_rope_head_dim", 1, 0, 0, 1 << 16, &c->qk_rope_head_dim) ||
        get_int(&r, "v_head_dim", 1, 0, 1, 1 << 16, &c->v_head_dim) ||
        get_int(&r, "n_routed_experts", 0, 0, 0, 1 << 16, &c->n_routed_experts) ||
        get_int(&r, "n_shared_experts", 0, 0, 0, 1 << 10, &c->n_shared_experts) ||
        get_int(&r, "num_nextn_predict_layers", 0, 0, 0, 64, &c->num_nextn_predict_layers) ||
        get_int(&r, "max_position_embeddings", 0, 4096, 1, BIG, &c->max_position_embeddings) ||
        get_int(&r, "bos_token_id", 0, 0, 0, BIG, &c->bos_token_id) ||
        get_int(&r, "eos_token_id", 0, 1, 0, BIG, &c->eos_token_id) ||
        get_bool(&r, "norm_topk_prob", 0, &c->norm_topk_prob) ||
        get_bool(&r, "tie_word_embeddings", 0, &c->tie_word_embeddings) ||
        get_str(&r, "torch_dtype", "bfloat16", c->torch_dtype, sizeof c->torch_dtype))
        goto done;
    if (c->qk_nope_head_dim + c->qk_rope_head_dim < 1) {
        err_set(err, "%s: qk_nope_head_dim + qk_rope_head_dim must be positive", path);
        goto done;
    }
    if (c->qk_rope_head_dim % 2) {
        err_set(err, "%s: qk_rope_head_dim: %d is odd (RoPE rotates pairs)", path, c->qk_rope_head_dim);
        goto done;
    }
    if (c->n_routed_experts > 0) {
        if (get_int(&r, "moe_intermediate_size", 1, 0, 1, 1 << 22, &c->moe_intermediate_size) ||
            get_int(&r, "num_experts_per_tok", 1, 0, 1, c->n_routed_experts, &c->num_experts_per_tok) ||
            get_int(&r, "n_group", 0, 1, 1, c->n_routed_experts, &c->n_group) ||
            get_int(&r, "topk_group", 0, 1, 1, c->n_group, &c->topk_group))
            goto done;
        if (c->n_routed_experts % c->n_group) {
            err_set(err, "%s: n_group: %d does not divide n_routed_experts %d", path, c->n_group, c->n_routed_experts);
            goto done;
        }
    }
    if (get_str(&r, "topk_method", "greedy", buf, sizeof buf)) goto done;
    if (strcmp(buf, "greedy") == 0) c->topk_method = TOPK_GREEDY;
    else if (strcmp(buf, "group_limited_greedy") == 0) c->topk_method = TOPK_GROUP_LIMITED_GREEDY;
    else if (strcmp(buf, "noaux_tc") == 0) c->topk_method = TOPK_NOAUX_TC;
    else {
        err_set(err, "%s: topk_method: '%s' is not greedy, group_limited_greedy or noaux_tc", path, buf);
        goto done;
    }
    if (get_str(&r, "scoring_func", "softmax", buf, sizeof buf)) goto done;
    if (strcmp(buf, "softmax") == 0) c->scoring_func = SCORING_SOFTMAX;
    else if (strcmp(buf, "sigmoid") == 0) c->scoring_func = SCORING_SIGMOID;
    else {
        err_set(err, "%s: scoring_func: '%s' is not softmax or sigmoid", path, buf);
        goto done;
    }
    if (c->n_routed_experts > 0) {
        int per_group = c->n_routed_experts / c->n_group;
        if (c->topk_method == TOPK_NOAUX_TC && c->n_group > 1 && per_group < 2) {
            err_set(err, "%s: n_group: noaux_tc scores a group by its top two experts, but groups hold %d", path, per_group);
            goto done;
        }
        if (c->topk_method != TOPK_GREEDY && c->num_experts_per_tok > c->topk_group * per_group) {
            err_set(err, "%s: num_experts_per_tok: %d exceeds the %d experts of topk_group groups", path,
                    c->num_experts_per_tok, c->topk_group * per_group);
            goto done;
        }
    }
    double x;
    if (get_num(&r, root, "", "routed_scaling_factor", 0, 1.0, 0, 1e6, &x)) goto done;
    c->routed_scaling_factor = (float)x;
    if (get_num(&r, root, "", "rope_theta", 0, 10000.0, 1e-6, 1e12, &c->rope_theta)) goto done;
    if (get_num(&r, root, "", "rms_norm_eps", 0, 1e-6, 0, 1, &x)) goto done;
    c->rms_norm_eps = (float)x;
    if (get_num(&r, root, "", "initializer_range", 0, 0.02, 0, 10, &x)) goto done;
    c->initializer_range = (float)x;
    if (c->bos_token_id >= c->vocab_size || c->eos_token_id >= c->vocab_size) {
        err_set(err, "%s: %s: id is outside the vocabulary of %d", path,
                c->bos_token_id >= c->vocab_size ? "bos_token_id" : "eos_token_id", c->vocab_size);
        goto done;
    }
    if (parse_rope_scaling(&r, c)) goto done;
    json_t *q = json_object_get(root, "quantization_config");
    if (q && !json_is_null(q)) {
        json_t *fmt = json_object_get(q, "fmt"), *qm = json_object_get(q, "quant_method");
        json_t *bs = json_object_get(q, "weight_block_size");
        if ((fmt && (!json_is_string(fmt) || strcmp(json_string_value(fmt), "e4m3") != 0)) ||
            (qm && (!json_is_string(qm) || strcmp(json_string_value(qm), "fp8") != 0))) {
            err_set(err, "%s: quantization_config: only fp8 e4m3 is supported", path);
            goto done;
        }
        c->fp8 = 1;
        c->fp8_block[0] = c->fp8_block[1] = 128;
        if (bs) {
            if (!json_is_array(bs) || json_array_size(bs) != 2 || !json_is_integer(json_array_get(bs, 0)) ||
                !json_is_integer(json_array_get(bs, 1)) || json_integer_value(json_array_get(bs, 0)) < 1 ||
                json_integer_value(json_array_get(bs, 1)) < 1) {
                err_set(err, "%s: quantization_config.weight_block_size: not [rows, cols]", path);
                goto done;
            }
            c->fp8_block[0] = (int)json_integer_value(json_array_get(bs, 0));
            c->fp8_block[1] = (int)json_integer_value(json_array_get(bs, 1));
        }
    }
    rc = 0;
done:
    json_decref(root);
    return rc;
}

int config_is_moe_layer(const ModelConfig *c, int layer) {
    return c->n_routed_experts > 0 && layer >= c->first_k_dense_replace && layer % c->moe_layer_freq == 0;
}

int config_qk_head_dim(const ModelConfig *c) { return c->qk_nope_head_dim + c->qk_rope_head_dim; }

double config_yarn_mscale(const ModelConfig *c, double mscale) {
    return !c->rope_yarn || c->rope_factor <= 1 ? 1.0 : 0.1 * mscale * log(c->rope_factor) + 1.0;
}

float config_softmax_scale(const ModelConfig *c) {
    double s = 1.0 / sqrt((double)config_qk_head_dim(c));
    double m = config_yarn_mscale(c, c->rope_mscale_all_dim);
    s *= m * m;
    return (float)s;
}

const char *config_topk_method_name(TopkMethod m) {
    return m == TOPK_NOAUX_TC ? "noaux_tc" : m == TOPK_GROUP_LIMITED_GREEDY ? "group_limited_greedy" : "greedy";
}

void config_json_set_storage(json_t *o, int fp8_block, const char *torch_dtype) {
    json_object_set_new(o, "torch_dtype", json_string(torch_dtype));
    if (fp8_block > 0)
        json_object_set_new(o, "quantization_config",
                            json_pack("{s:s,s:s,s:s,s:[i,i]}", "activation_scheme", "dynamic", "fmt", "e4m3",
                                      "quant_method", "fp8", "weight_block_size", fp8_block, fp8_block));
    else
        json_object_del(o, "quantization_config");
}

int config_save(const ModelConfig *c, const char *path, Error *err) {
    json_t *o = json_object();
    json_object_set_new(o, "architectures", json_pack("[s]", strcmp(c->model_type, "deepseek_v2") == 0 ? "DeepseekV2ForCausalLM" : "DeepseekV3ForCausalLM"));
    json_object_set_new(o, "model_type", json_string(c->model_type));
#define I(k) json_object_set_new(o, #k, json_integer(c->k))
    I(vocab_size); I(hidden_size); I(intermediate_size); I(moe_intermediate_size); I(num_hidden_layers);
    I(num_attention_heads);
    json_object_set_new(o, "num_key_value_heads", json_integer(c->num_attention_heads));
    if (c->q_lora_rank) I(q_lora_rank);
    else json_object_set_new(o, "q_lora_rank", json_null());
    I(kv_lora_rank); I(qk_nope_head_dim); I(qk_rope_head_dim); I(v_head_dim);
    I(n_routed_experts); I(n_shared_experts); I(num_experts_per_tok); I(n_group); I(topk_group);
    I(first_k_dense_replace); I(moe_layer_freq); I(num_nextn_predict_layers); I(max_position_embeddings);
    I(bos_token_id); I(eos_token_id);
#undef I
    json_object_set_new(o, "topk_method", json_string(config_topk_method_name(c->topk_method)));
    json_object_set_new(o, "scoring_func", json_string(c->scoring_func == SCORING_SIGMOID ? "sigmoid" : "softmax"));
    json_object_set_new(o, "norm_topk_prob", json_boolean(c->norm_topk_prob));
    json_object_set_new(o, "routed_scaling_factor", json_real(c->routed_scaling_factor));
    json_object_set_new(o, "rope_theta", json_real(c->rope_theta));
    if (c->rope_yarn)
        json_object_set_new(o, "rope_scaling",
                            json_pack("{s:s,s:f,s:i,s:f,s:f,s:f,s:f}", "type", "yarn", "factor", c->rope_factor,
                                      "original_max_position_embeddings", c->rope_original_max_position,
                                      "beta_fast", c->rope_beta_fast, "beta_slow", c->rope_beta_slow, "mscale",
                                      c->rope_mscale, "mscale_all_dim", c->rope_mscale_all_dim));
    else
        json_object_set_new(o, "rope_scaling", json_null());
    json_object_set_new(o, "rms_norm_eps", json_real(c->rms_norm_eps));
    json_object_set_new(o, "initializer_range", json_real(c->initializer_range));
    json_object_set_new(o, "hidden_act", json_string("silu"));
    json_object_set_new(o, "attention_bias", json_false());
    json_object_set_new(o, "tie_word_embeddings", json_boolean(c->tie_word_embeddings));
    json_object_set_new(o, "use_cache", json_true());
    config_json_set_storage(o, c->fp8 ? c->fp8_block[0] : 0, c->torch_dtype);
    char *s = json_dumps(o, JSON_INDENT(2));
    json_decref(o);
    if (!s) return err_set(err, "%s: cannot encode config", path);
    size_t n = strlen(s);
    s[n] = '\n';
    int rc = file_write_all(path, s, n + 1, err);
    free(s);
    return rc;
}
