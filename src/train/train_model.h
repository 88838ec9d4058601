// Training a DeepSeek-V3/V2 model over fp32 master weights: the forward pass saving what the
// backward pass needs, and the backward pass, for the main model, the MTP modules (SPEC §2.3) and
// the complementary sequence-wise balance loss (SPEC §2.4). It computes the function of the
// inference engine (src/model/forward.c, plain attention): same routing (moe_route), same RoPE
// frequencies, same tensor list (tensor_specs).
//
// The manner is llm.c's: parameters and their gradients are two equal blocks laid out by one
// plan, tensor by tensor in tensor_specs() order, and TrainParams names every tensor as the
// checkpoint does; the activations of a micro-batch are one more block laid out by one plan.
//
// A micro-batch is B windows of T + 1 tokens: the main model reads positions 0..T-1 of each and
// predicts tokens 1..T. MTP module k (1-based) runs over rows i = 0..T-k-1 at RoPE positions
// 0..T-k-1, combining Emb(t_{i+k}) with h^{k-1}_i, and predicts t_{i+k+1}; h^0 is the main model's
// output after model.norm, h^k module k's output after its shared_head.norm. The embedding and the
// output head are shared by the MTP modules (one parameter each); a saved checkpoint stores
// byte-identical copies under the MTP names, as the released checkpoints do.
//
// The objective (reported in parts):
//   main    = mean over the B·T positions of −log p(t_{i+1})
//   mtp     = (1/D) Σ_k mean over the B·(T−k) rows of module k of −log p(t_{i+k+1})
//   balance = Σ over MoE layers (main and MTP) of the mean over the B sequences of α Σ_i f_i P_i
//   loss    = main + λ · mtp + balance
#ifndef DSV3_TRAIN_TRAIN_MODEL_H
#define DSV3_TRAIN_TRAIN_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "base/error.h"
#include "model/config.h"
#include "model/tensors.h"

typedef struct TrainFfn {  // SwiGLU: down(silu(gate x) · up x)
    float *gate_proj;  // (F, d)
    float *up_proj;    // (F, d)
    float *down_proj;  // (d, F)
} TrainFfn;

typedef struct TrainMla {
    float *q_proj;              // (H*qk, d)         when q_lora_rank == 0
    float *q_a_proj;            // (q_lora, d)
    float *q_a_layernorm;       // (q_lora)
    float *q_b_proj;            // (H*qk, q_lora)
    float *kv_a_proj_with_mqa;  // (kv_lora + rope, d)
    float *kv_a_layernorm;      // (kv_lora)
    float *kv_b_proj;           // (H*(nope + v), kv_lora)
    float *o_proj;              // (d, H*v)
} TrainMla;

typedef struct TrainMoe {
    float *gate;                     // (N_r, d) router
    float *e_score_correction_bias;  // (N_r) noaux_tc only, else NULL; steered by the loads, not by gradients
    TrainFfn *experts;               // (N_r) width moe_inter
    TrainFfn shared_experts;         // width n_shared * moe_inter (NULLs when n_shared == 0)
} TrainMoe;

typedef struct TrainLayer {
    float *input_layernorm;  // (d)
    TrainMla self_attn;
    float *post_attention_layernorm;  // (d)
    int is_moe;
    TrainFfn mlp;  // dense layers
    TrainMoe moe;  // MoE layers
} TrainLayer;

typedef struct TrainMtp {  // HF layer num_hidden_layers + k
    float *enorm, *hnorm;    // (d)
    float *eh_proj;          // (d, 2d): input [enorm(emb) ; hnorm(h)]
    TrainLayer layer;
    float *shared_head_norm;  // (d)
} TrainMtp;

typedef struct TrainParams {
    float *embed_tokens;  // (V, d), shared by the MTP modules
    TrainLayer *layers;   // (num_hidden_layers)
    TrainMtp *mtp;        // (num_nextn_predict_layers)
    float *norm;          // (d)
    float *lm_head;       // (V, d), shared by the MTP modules; = embed_tokens when tie_word_embeddings
    TrainFfn *expert_table;  // backing store of every layer's experts array
} TrainParams;

// One tensor of the checkpoint and where it lives in the parameter (and gradient) block.
typedef struct TrainTensor {
    char name[128];  // HF name
    TensorKind kind;
    int ndim;
    int64_t shape[2];
    size_t offset, numel;  // in floats
    int shared;            // an MTP module's copy of the embedding or head: the original's storage
} TrainTensor;

// What one decoder layer's forward saves for its backward. N = B·T rows.
typedef struct TrainLayerActs {
    int B, T, N;
    float *x_in;               // (N, d) residual stream entering the layer
    float *ln1, *ln1_rstd;     // (N, d), (N) input_layernorm
    float *qa;                 // (N, q_lora) q_a_proj output
    float *cq, *cq_rstd;       // (N, q_lora), (N) after q_a_layernorm
    float *q;                  // (N, H, nope + rope) per head [q_nope | q_pe], q_pe rotated
    float *ckv_pre;            // (N, kv_lora) the latent before kv_a_layernorm
    float *ckv, *ckv_rstd;     // (N, kv_lora), (N)
    float *kpe;                // (N, rope) the shared rotary key, rotated
    float *kv;                 // (N, H, nope + v) kv_b_proj output [k_nope | v] per head
    float *att;                // (B, H, T, T) attention probabilities
    float *ao;                 // (N, H, v) attention output (o_proj input)
    float *x_mid;              // (N, d) residual stream after attention
    float *ln2, *ln2_rstd;     // (N, d), (N) post_attention_layernorm
    float *ffn_gate, *ffn_up, *ffn_h;  // (N, F) the dense FFN, or the shared experts of a MoE layer
    float *router;             // (N, N_r) router outputs
    float *scores;             // (N, N_r) sigmoid / softmax scores
    int *topk_idx;             // (N, K_r) chosen experts
    float *topk_w;             // (N, K_r) their gating weights
    int *slot_of;              // (N, K_r) slot of choice (t, k) in the expert-sorted order
    int *slot_tk;              // (N·K_r) the choice t·K_r + k each slot serves
    int *expert_off;           // (N_r + 1) each expert's slots
    float *e_gate, *e_up, *e_h;  // (N·K_r, moe_inter) routed experts' activations by slot
    float *e_out;              // (N·K_r, d) routed experts' outputs by slot
    float *bal_f;              // (B, N_r) f_i of each sequence for the balance loss
    float *x_out;              // (N, d) residual stream leaving the layer (the next layer's x_in)
} TrainLayerActs;

typedef struct TrainMtpActs {
    int T, N;                 // rows per sequence (T − k) and in all
    int *in_tok;              // (N) t_{i+k}, the embedded token
    int *targets;             // (N) t_{i+k+1}
    float *emb;               // (N, d) Emb(t_{i+k})
    float *h_in;              // (N, d) h^{k-1}_i
    float *en_rstd, *hn_rstd; // (N) enorm / hnorm
    float *cat;               // (N, 2d) [enorm(emb) ; hnorm(h)]
    TrainLayerActs layer;
    float *x_out;             // (N, d) the layer's output
    float *h_out, *h_rstd;    // (N, d), (N) after shared_head.norm: h^k, the head's input
    float *logits;            // (N, V), dlogits after the backward pass
    float *lse, *losses;      // (N)
    float *dh_out;            // (N, d) gradient of h_out: from the head and from module k + 1
} TrainMtpActs;

typedef struct TrainActs {
    int *tokens;              // (B, T + 1) the micro-batch
    int *targets;             // (B·T)
    TrainLayerActs *layers;   // (num_hidden_layers)
    float *x_final;           // (B·T, d) output of the last layer
    float *lnf, *lnf_rstd;    // (B·T, d), (B·T) after model.norm: h^0
    float *logits;            // (B·T, V), dlogits after the backward pass
    float *lse, *losses;      // (B·T)
    TrainMtpActs *mtp;        // (num_nextn_predict_layers)
    // scratch, sized for B·T rows, shared by every layer
    float *tmp;               // (B·T, max(d, kv_lora + rope)) forward temporaries
    float *xg;                // (B·T·K_r, d) routed tokens' inputs gathered by slot
    float *dres, *dln, *dlnf; // (B·T, d) residual, normed-input and final-norm gradients
    float *dq;                // (B·T, H*qk)
    float *dqa, *dcq;         // (B·T, q_lora)
    float *dkv;               // (B·T, H*(nope + v))
    float *dckv, *dckv_pre;   // (B·T, kv_lora)
    float *dkpe;              // (B·T, rope)
    float *dkpe_heads;        // (B, H, T, rope) each head's share of dkpe
    float *dkva;              // (B·T, kv_lora + rope)
    float *datt;              // (B, H, T, T)
    float *dao;               // (B·T, H*v)
    float *dffn_gate, *dffn_up, *dffn_h;  // (B·T, F)
    float *de_out, *dxg;      // (B·T·K_r, d)
    float *de_gate, *de_up, *de_h;  // (B·T·K_r, moe_inter)
    float *dtopk_w;           // (B·T, K_r)
    float *dscores, *drouter; // (B·T, N_r)
    float *dcat;              // (B·T, 2d)
    float *den, *dhn, *demb, *dh_prev;  // (B·T, d) MTP input gradients
} TrainActs;

typedef struct TrainObjective {
    float mtp_lambda;     // λ: the MTP modules run only when λ > 0 (and the config has them)
    float seq_aux_alpha;  // α of the sequence-wise balance loss (0: not computed)
} TrainObjective;

typedef struct TrainLosses {
    double loss, main, mtp, balance;  // see the top of this file
} TrainLosses;

typedef struct TrainModel {
    ModelConfig cfg;
    int B, T;  // micro-batch: B windows, T predicted positions each (windows hold T + 1 tokens)
    TrainObjective obj;
    int n_tensors;
    TrainTensor *tensors;  // every tensor of tensor_specs(), in its order
    size_t n_params;       // floats in the parameter block (shared copies counted once)
    float *params;         // (n_params) fp32 master weights
    float *grads;          // (n_params) their gradients, same layout
    TrainParams p, g;      // the two blocks by tensor name
    int n_moe;             // MoE layers: main ones in order, then the MTP modules'
    float **moe_bias;      // (n_moe) each one's e_score_correction_bias in params, or NULL
    long long *expert_load;  // (n_moe, N_r) tokens each expert received in the last forward
    double *inv_freq;      // (rope/2)
    float rope_mscale, softmax_scale;
    float *rope_cos, *rope_sin;  // (T, rope/2)
    TrainActs a;
    void *act_block;       // the one allocation of TrainActs
    size_t act_bytes;
    TrainLosses loss;      // of the last forward
    int mtp_ran;           // the last forward ran the MTP modules
    // Reuse the last forward's expert choices instead of routing afresh. The choice is piecewise
    // constant in the weights and not differentiated; holding it makes the objective smooth, so
    // finite differences can check the gradient (tests) across any routing margin.
    int freeze_routing;
} TrainModel;

// Lays out parameters, gradients and activations for micro-batches of B × (T + 1) tokens;
// parameters are zero until train_model_init_random or train_model_load.
int train_model_new(TrainModel *m, const ModelConfig *c, int B, int T, Error *err);
void train_model_free(TrainModel *m);
// Linear, embedding, head and router weights ~ N(0, initializer_range); norms 1; router bias 0.
void train_model_init_random(TrainModel *m, uint64_t seed);
// Reads every tensor (any stored dtype, FP8 block-scaled included) of the checkpoint in dir,
// which must match m's configuration in names and shapes. MTP tensors absent from the files are
// an error; the MTP copies of the embedding and head are not read (the model shares them).
int train_model_load(TrainModel *m, const char *dir, Error *err);
// Writes config.json and model.safetensors (F32, shards over shard_bytes) into dir, MTP copies
// of the embedding and head included.
int train_model_save(const TrainModel *m, const char *dir, size_t shard_bytes, Error *err);
// The tensor named name, or NULL.
const TrainTensor *train_model_tensor(const TrainModel *m, const char *name);

// tokens: (B, T + 1). Fills m->loss; fails (without running) on a token outside the vocabulary.
int train_model_forward(TrainModel *m, const int *tokens, Error *err);
void train_model_zero_grad(TrainModel *m);
// Accumulates into m->grads the gradient of scale · loss of the last forward (scale = 1/A when
// A micro-batches make one step). Consumes the saved logits.
void train_model_backward(TrainModel *m, float scale);

#endif
