// The model's hyper-parameters, read from a HuggingFace config.json. Behaviour follows these keys,
// never model_type: a deepseek_v2 config with sigmoid/noaux_tc keys runs as V3 would.
#ifndef DSV3_MODEL_CONFIG_H
#define DSV3_MODEL_CONFIG_H

#include "base/error.h"

typedef enum { SCORING_SOFTMAX, SCORING_SIGMOID } ScoringFunc;
typedef enum { TOPK_GREEDY, TOPK_GROUP_LIMITED_GREEDY, TOPK_NOAUX_TC } TopkMethod;

typedef struct ModelConfig {
    char model_type[32];
    int vocab_size;
    int hidden_size;
    int num_hidden_layers;
    int first_k_dense_replace;
    int moe_layer_freq;
    int intermediate_size;
    int moe_intermediate_size;
    int num_attention_heads;
    int q_lora_rank;  // 0: a plain q_proj (V2-Lite)
    int kv_lora_rank;
    int qk_nope_head_dim;
    int qk_rope_head_dim;
    int v_head_dim;
    int n_routed_experts;  // 0: every layer dense
    int n_shared_experts;
    int num_experts_per_tok;
    int n_group;
    int topk_group;
    TopkMethod topk_method;
    ScoringFunc scoring_func;
    int norm_topk_prob;
    float routed_scaling_factor;
    int num_nextn_predict_layers;
    double rope_theta;
    int rope_yarn;  // rope_scaling of type yarn
    double rope_factor;
    int rope_original_max_position;
    double rope_beta_fast, rope_beta_slow, rope_mscale, rope_mscale_all_dim;
    int max_position_embeddings;
    float rms_norm_eps;
    int tie_word_embeddings;
    int bos_token_id, eos_token_id;
    int fp8;             // quantization_config: fp8 e4m3 with block scales
    int fp8_block[2];    // weight_block_size
    float initializer_range;
    char torch_dtype[16];
} ModelConfig;

// Parses and validates path; a missing or out-of-range key is "path: key: what is wrong".
int config_load(ModelConfig *c, const char *path, Error *err);
// Writes a config.json that config_load and HuggingFace both read (atomically).
int config_save(const ModelConfig *c, const char *path, Error *err);
// Sets the keys of a config.json object that say how the weights are stored: torch_dtype, and the
// release's quantization_config ({"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method":
// "fp8", "weight_block_size": [b, b]}) when fp8_block > 0, none otherwise.
struct json_t;
void config_json_set_storage(struct json_t *o, int fp8_block, const char *torch_dtype);

int config_is_moe_layer(const ModelConfig *c, int layer);
int config_qk_head_dim(const ModelConfig *c);
// YaRN's m = 0.1·mscale·ln(factor) + 1 (1 without YaRN or with factor <= 1).
double config_yarn_mscale(const ModelConfig *c, double mscale);
// 1/sqrt(qk_head_dim), times m(mscale_all_dim)² under YaRN (SPEC §2.1).
float config_softmax_scale(const ModelConfig *c);
const char *config_topk_method_name(TopkMethod m);

#endif
