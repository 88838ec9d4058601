// Deployment planning: the cost figures of the DeepSeek-V3 papers (SPEC §7), computed for any
// architecture. It reads HuggingFace config.json files itself, because it must also describe dense
// GQA/MHA models that the model loader rejects; MLA (DeepSeek) architectures are counted through
// the tensor table dsv3 loads checkpoints by (model/tensors.h), so `dsv3 plan` and `dsv3 info`
// agree. The conventions behind every figure are in docs/plan.md.
#ifndef DSV3_PLAN_PLAN_H
#define DSV3_PLAN_PLAN_H

#include <stdint.h>

#include "base/error.h"
#include "model/config.h"

// The shape of a decoder-only transformer, as far as its costs depend on it.
typedef struct PlanArch {
    char name[64];           // preset name or the config path
    int64_t vocab;           // vocab_size
    int64_t hidden;          // hidden_size d
    int64_t layers;          // num_hidden_layers (main model)
    int64_t intermediate;    // intermediate_size: dense SwiGLU width
    int64_t heads;           // num_attention_heads
    int tie_embeddings;      // tie_word_embeddings: lm_head shares embed_tokens
    // attention: MLA when mla, otherwise GQA/MHA with kv_heads of head_dim
    int mla;
    int64_t kv_heads, head_dim;
    int qkv_bias, o_bias;    // attention_bias (Qwen2 always has q/k/v biases)
    int64_t q_lora, kv_lora, qk_nope, qk_rope, v_head;
    int mlp_bias;
    // mixture of experts: n_routed == 0 means every layer is dense
    int64_t n_routed, n_shared, top_k;
    int64_t moe_intermediate;   // width of one routed expert
    int64_t shared_intermediate;  // total width of the shared experts' SwiGLU
    int64_t first_dense;        // first_k_dense_replace
    int64_t moe_freq;           // moe_layer_freq: layer i >= first_dense is MoE when i % moe_freq == 0
    int router_bias;            // topk_method noaux_tc: e_score_correction_bias per MoE layer
    int64_t n_group, topk_group;  // group-limited routing (noaux_tc, group_limited_greedy): a token's
                                  // experts come from topk_group of n_group groups; 1, 1 otherwise
    int64_t mtp;                // num_nextn_predict_layers
} PlanArch;

// Parses a HuggingFace config.json text; source names it in errors ("path: key: what is wrong").
int plan_arch_from_json(PlanArch *a, const char *text, const char *source, Error *err);
int plan_arch_from_file(PlanArch *a, const char *path, Error *err);

// Published configurations: deepseek-v3, deepseek-v2, deepseek-v2-lite, qwen2.5-72b, llama3.1-405b.
int plan_preset_count(void);
const char *plan_preset_name(int i);
int plan_arch_preset(PlanArch *a, const char *name, Error *err);

// The papers' figures for a preset; 0 where the papers publish none.
typedef struct PlanPaper {
    double kv_bytes_per_token;     // BF16, ISCA 2025 Table 1
    double train_flops_per_token;  // sequence 4096, ISCA 2025 Table 2
} PlanPaper;
PlanPaper plan_preset_paper(const char *name);

// An MLA architecture as the ModelConfig dsv3 would load (the keys its tensor table depends on;
// routing details it does not are left at neutral values); -1 for GQA/MHA, which dsv3 cannot load.
int plan_model_config(const PlanArch *a, ModelConfig *c);

int plan_is_moe_layer(const PlanArch *a, int64_t layer);
int64_t plan_moe_layers(const PlanArch *a);

typedef struct PlanModel {
    // parameters; "active" counts the routed experts a token reaches (top_k), not all of them,
    // and not the embedding table (a lookup): tensor_cost's conventions (model/tensors.h)
    int64_t total_params, active_params;
    int64_t total_params_mtp, active_params_mtp;  // with the MTP modules, as the checkpoint stores them
    int64_t matmul_params;      // active weights a token is multiplied by: no embedding lookup, no norms
    int64_t matmul_params_mtp;  // the same with the MTP modules
    // memory
    int64_t weight_bytes_bf16, weight_bytes_fp8;
    int64_t weight_bytes_bf16_mtp, weight_bytes_fp8_mtp;
    int64_t kv_elems_per_token;  // cached numbers per token, all layers
    int64_t kv_bytes_per_token_bf16, kv_bytes_per_token_fp8;
    // training compute per token at sequence length seq (forward + backward)
    int64_t seq;
    double train_flops_matmul;     // 6 x matmul_params
    double train_flops_attention;  // 3 x seq x layers x heads x (qk dim + v dim): causal, fwd + bwd
    double train_flops_per_token;
    double train_flops_per_token_mtp;
} PlanModel;

void plan_model(const PlanArch *a, int64_t seq, PlanModel *m);

// Decode bound from expert-parallel all-to-all traffic (ISCA 2025 §4.4, SPEC §7).
typedef struct PlanEp {
    int applicable;            // 0 for a dense model
    double bandwidth_gbps;     // GB/s, 1 GB = 1e9 B
    int64_t tokens_per_device;
    int64_t hidden;
    int64_t experts_per_token;  // routed top_k + shared experts
    double bytes;              // one dispatch (1 B) + combine (2 B) for one layer
    double alltoall_us;        // bytes / bandwidth
    double tpot_ms;            // 2 x alltoall x layers (dual micro-batch overlap)
    double tokens_per_s;       // 1 / tpot
} PlanEp;

void plan_ep(const PlanArch *a, double bandwidth_gbps, int64_t tokens_per_device, int64_t hidden,
             PlanEp *e);

// What dsv3's expert parallelism (dist/expert_parallel.h) sends for one token in one MoE layer, with
// the routed experts split over `ranks` ranks in order (rank r holds experts r·N_r/ranks ..) and
// the ranks in nodes of ranks_per_node: a token's row goes once to each rank holding one of its
// experts. Expected over routing that is uniform within the rules — topk_group groups drawn
// uniformly, then top_k experts uniformly among theirs — and over the token's rank (a fixed-seed
// Monte Carlo of `draws` tokens). With each group on one node a token reaches at most topk_group
// nodes (the V3 report's node-limited routing).
typedef struct PlanEpTraffic {
    int64_t ranks, ranks_per_node;
    double ranks_reached;      // ranks holding one of the token's experts
    double nodes_reached;      // nodes holding one
    int64_t max_nodes;         // the most nodes one token reached among the draws
    double rows_other_ranks;   // rows the token's rank sends to other ranks (dispatch; combine likewise)
    double rows_other_nodes;   // of which to ranks on other nodes
} PlanEpTraffic;

// -1 (err set) when the experts do not split over the ranks or the ranks over the nodes.
int plan_ep_traffic(const PlanArch *a, int64_t ranks, int64_t ranks_per_node, int64_t draws, PlanEpTraffic *t,
                    Error *err);

// Pipeline bubbles and memory multipliers (DeepSeek-V3 report Table 2). F: a forward chunk,
// B: a full backward chunk, W: its weight-gradient part, FB: a forward and a backward chunk
// executed overlapped (F&B).
typedef struct PlanPipe {
    const char *name;     // 1F1B, ZB1P, DualPipe
    const char *formula;  // the bubble, symbolically
    int defined;          // DualPipe needs an even number of stages
    double bubble;
    double param_mult;    // copies of a stage's parameters
    int64_t activation_mult;  // in-flight micro-batches of activations on the first stage
} PlanPipe;

int plan_pipeline(int64_t pp, double f, double b, double w, double fb, PlanPipe out[3], Error *err);

// Network topologies built from switches of one radix (ISCA 2025 Table 3).
typedef struct PlanPrices {
    double switch_usd;      // one switch
    double link_usd;        // one switch-to-switch link (cables, transceivers)
    double endpoint_usd;    // attaching one endpoint to its switch
    double local_link_usd;  // one Dragonfly intra-group link
} PlanPrices;

typedef struct PlanTopo {
    const char *name;  // FT2, MPFT, FT3, SF, DF
    const char *desc;
    int64_t endpoints, switches, links;  // links: switch-to-switch
    int64_t local_links;                 // of links, the Dragonfly intra-group ones
    double cost_usd;
    double cost_per_endpoint_usd;
} PlanTopo;

#define PLAN_NTOPO 5
PlanPrices plan_prices_default(void);
// df_groups 0 takes the default a*h - 1 (see docs/plan.md).
int plan_network(int64_t radix, int64_t planes, int64_t df_groups, const PlanPrices *p,
                 PlanTopo out[PLAN_NTOPO], Error *err);

#endif
