// Every tensor of a DeepSeek-V3/V2 checkpoint, named as in the HuggingFace files. Linear weights
// are views into the mapped files in their stored type (F32, BF16, F16 or F8_E4M3 with block
// scales); the small vectors (norms, router bias) are widened to fp32 copies at load.
#ifndef DSV3_MODEL_WEIGHTS_H
#define DSV3_MODEL_WEIGHTS_H

#include "base/error.h"
#include "base/safetensors.h"
#include "kernels/matmul.h"
#include "model/config.h"

typedef struct FfnWeights {  // SwiGLU: down(silu(gate x) * up x)
    MatView gate_proj;  // (inter, d)
    MatView up_proj;    // (inter, d)
    MatView down_proj;  // (d, inter)
} FfnWeights;

typedef struct MlaWeights {
    MatView q_proj;              // (H*qk_head, d)          when q_lora_rank == 0
    MatView q_a_proj;            // (q_lora, d)
    float *q_a_layernorm;        // (q_lora)
    MatView q_b_proj;            // (H*qk_head, q_lora)
    MatView kv_a_proj_with_mqa;  // (kv_lora + rope, d)
    float *kv_a_layernorm;       // (kv_lora)
    MatView kv_b_proj;           // (H*(nope + v), kv_lora): per head [W_UK (nope rows) ; W_UV (v rows)]
    MatView w_uk_t;              // (H*kv_lora, nope): per head W_UKᵀ, BF16-compute weight panels only (data
                                 // NULL; model_set_compute), for absorbed attention's W_UKᵀ q_nope; else empty
    MatView o_proj;              // (d, H*v)
} MlaWeights;

typedef struct MoeWeights {
    MatView gate;                    // (N_r, d) router
    float *e_score_correction_bias;  // (N_r) noaux_tc only, else NULL
    FfnWeights *experts;             // N_r experts of width moe_inter
    FfnWeights shared_experts;       // width n_shared * moe_inter (absent when n_shared == 0)
} MoeWeights;

typedef struct LayerWeights {
    float *input_layernorm;           // (d)
    float *post_attention_layernorm;  // (d)
    MlaWeights self_attn;
    int is_moe;
    FfnWeights mlp;  // dense layers
    MoeWeights moe;  // MoE layers
} LayerWeights;

typedef struct MtpWeights {  // layer num_hidden_layers + k
    MatView embed_tokens;      // (V, d) a copy of the main embedding
    float *enorm, *hnorm;      // (d)
    MatView eh_proj;           // (d, 2d): input [enorm(emb) ; hnorm(h)]
    LayerWeights layer;
    float *shared_head_norm;   // (d)
    MatView shared_head_head;  // (V, d)
} MtpWeights;

typedef struct ModelWeights {
    MatView embed_tokens;  // (V, d)
    LayerWeights *layers;  // num_hidden_layers
    float *norm;           // (d)
    MatView lm_head;       // (V, d)
    MtpWeights *mtp;       // num_nextn_predict_layers (may be 0)
    int n_mtp;             // MTP modules present in the files
    float *vectors;        // one block holding every fp32 vector above
} ModelWeights;

// Binds every tensor of the table (model/tensors.h) the config calls for, checking presence, dtype
// and shape; an error names the tensor and its file. MTP layers are bound only when present
// (need_mtp demands them). Tied embeddings: lm_head.weight when the files have one, else the
// embedding.
int weights_bind(ModelWeights *w, const ModelConfig *c, const StModel *st, int need_mtp, Error *err);
// Zeroes w and allocates its tables for n_mtp MTP modules: w->layers, w->mtp and every MoE layer's
// experts (is_moe set), so that tensor_walk can give every tensor's slot. On failure w is freed.
int weights_alloc_tables(ModelWeights *w, const ModelConfig *c, int n_mtp, Error *err);
void weights_free(ModelWeights *w, const ModelConfig *c);

#endif
