// Training a DeepSeek-V3/V2 model over fp32 master weights, for the main model, the MTP modules
// (SPEC §2.3) and the complementary sequence-wise balance loss (SPEC §2.4). The layers are the
// model's own (src/model/layer.h): the same ops the inference forward runs, here asked to keep what
// their backward pass reads.
//
// The manner is llm.c's: parameters and their gradients are two equal blocks laid out by one
// plan, tensor by tensor in tensor_walk() order, and each is seen as the model's weights
// (ModelWeights of F32 views), named as the checkpoint does; the activations of a micro-batch are
// one more block laid out by one plan.
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
#include "model/layer.h"
#include "model/tensors.h"
#include "model/weights.h"

// Rows of a micro-batch whose logits exist at once (TrainActs.head_logits): enough rows for the
// weight-gradient product to run at the GEMM's speed, few enough for a chunk to stay in cache at
// small vocabularies (v3-10m-train, V = 4,096: 4 MB).
#define TRAIN_HEAD_ROWS 256

// One tensor of the checkpoint and where it lives in the parameter (and gradient) block.
typedef struct TrainTensor {
    char name[128];  // HF name
    TensorKind kind;
    int ndim;
    int64_t shape[2];
    size_t offset, numel;  // in floats
    int shared;            // an MTP module's copy of the embedding or head: the original's storage
    int expert;            // the routed expert it belongs to, or -1
    int remote;            // a routed expert another rank holds (expert parallel): no storage here
    int group;             // its TrainGradGroup (see TrainGradsDone)
} TrainTensor;

// What one decoder layer keeps for its backward pass. N = B·T rows.
// Activations kept in FP8 between the forward and the backward pass under --precision fp8, as the V3
// report stores them (§3.3.3): the linear layers' inputs that only their weight gradients read again,
// and the SwiGLU inputs (gate, up) of the dense FFN, the shared and the routed experts, whose output
// (the down projections' input) is then not kept at all but computed again from them.
enum { KEPT_LN1, KEPT_CQ, KEPT_AO, KEPT_FFN_GATE, KEPT_FFN_UP, KEPT_E_GATE, KEPT_E_UP, N_KEPT };

typedef struct Fp8Kept {
    uint8_t *codes;   // (rows, cols) E4M3
    float *scales;    // (rows, ceil(cols / 128)) one per 1 × 128 tile
    long rows;        // 0: not kept (the buffer is the layer's own fp32)
    int cols;
} Fp8Kept;

typedef struct TrainLayerActs {
    LayerActs acts;   // what the layer's forward saves (src/model/layer.h)
    float *ckv;       // (N, kv_lora) the layer's latent store: the normalised latents
    float *kpe;       // (N, rope) and the rotated shared keys
    Fp8Kept kept[N_KEPT];  // FP8 copies of ln1, cq, ao and the SwiGLU inputs; their acts pointers (and
                           // ffn_h's, e_h's) then lead to shared fp32 scratch, filled again from here
                           // (ffn_h and e_h computed again) before the layer's backward pass
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
    float *h_out, *h_rstd;    // (N, d), (N) after shared_head.norm: h^k, the head's input
    float *lse, *losses;      // (N)
    float *dh_out;            // (N, d) gradient of h_out: the head's (left by the forward pass, per
                              // unit of the backward's scale), then module k + 1's
} TrainMtpActs;

typedef struct TrainActs {
    int *tokens;              // (B, T + 1) the micro-batch
    int *inputs;              // (B·T) the input tokens (positions 0..T-1 of each window)
    int *targets;             // (B·T)
    TrainLayerActs *layers;   // (num_hidden_layers)
    float *x_final;           // (B·T, d) output of the last layer
    float *lnf, *lnf_rstd;    // (B·T, d), (B·T) after model.norm: h^0
    float *lse, *losses;      // (B·T)
    // The heads run fused with their loss, TRAIN_HEAD_ROWS rows at a time (the logits of a whole
    // micro-batch, B·T × V floats per head, are never stored): each chunk's logits, loss, dlogits and
    // the two gradient products in the forward pass, per unit of the backward's scale.
    float *head_logits;       // (TRAIN_HEAD_ROWS, V) one chunk's logits, then its dlogits
    float *head_grad;         // (V, d) the heads' weight gradient of this micro-batch, unit scale
    int head_grads;           // the last forward left the heads' gradients (not train_model_evaluate)
    TrainMtpActs *mtp;        // (num_nextn_predict_layers)
    // scratch, sized for B·T rows, shared by every layer
    float *kva;               // (B·T, kv_lora + rope)
    float *y;                 // (B·T, d) a sub-layer's output
    float *xg;                // (B·T·K_r, d) routed tokens' inputs gathered by slot
    float *attn;              // (threads, attn_per_thread) attention scratch
    float *kept_fp32[N_KEPT]; // FP8 storage: the kept buffers' fp32 form, shared by every layer
    float *ffn_h_fp32, *e_h_fp32;  // and the SwiGLU outputs', computed again from the kept inputs
    size_t attn_per_thread;
    LayerGradScratch gs;      // the backward pass's scratch
    float *dres, *dlnf;       // (B·T, d) residual and final-norm gradients (dlnf: the head's,
                              // left by the forward pass, then the MTP modules')
    float *dcat;              // (B·T, 2d)
    float *den, *dhn, *demb, *dh_prev;  // (B·T, d) MTP input gradients
} TrainActs;

// A range of the gradient block that the backward pass completes at once: a decoder layer, an MTP
// module, the final norm with the head, the embedding. The buckets of a data-parallel gradient sum.
typedef struct TrainGradGroup {
    size_t offset, n;  // in floats
} TrainGradGroup;

// Called by the backward pass (when set) as soon as a group's gradients are final for this
// micro-batch: decoder layer l (0..L-1) and MTP module k (L + k), then TRAIN_GRADS_HEAD(m) and
// TRAIN_GRADS_EMBED(m). The order is the backward's: MTP modules last to first (when they ran), the
// head, the layers from the last, the embedding. A non-zero return (err set) fails the backward pass.
typedef int (*TrainGradsDone)(void *ctx, int group, Error *err);
#define TRAIN_GRADS_HEAD(m) ((m)->cfg.num_hidden_layers + (m)->cfg.num_nextn_predict_layers)
#define TRAIN_GRADS_EMBED(m) (TRAIN_GRADS_HEAD(m) + 1)

typedef struct TrainObjective {
    float mtp_lambda;     // λ: the MTP modules run only when λ > 0 (and the config has them)
    float seq_aux_alpha;  // α of the sequence-wise balance loss (0: not computed)
} TrainObjective;

typedef struct TrainLosses {
    double loss, main, mtp, balance;  // see the top of this file
} TrainLosses;

typedef struct TrainModel {
    Backend *be;           // where the passes run (the CPU backend)
    ModelConfig cfg;
    int B, T;  // micro-batch: B windows, T predicted positions each (windows hold T + 1 tokens)
    TrainObjective obj;
    int n_tensors;
    TrainTensor *tensors;  // every tensor of tensor_specs(), in its order
    size_t n_params;       // floats in the parameter block (shared copies counted once, remote experts not)
    int ep_size, ep_rank;  // the routed experts are split over ep_size ranks; this one holds ep_rank's share
    float *params;         // (n_params) fp32 master weights
    float *grads;          // (n_params) their gradients, same layout
    ModelWeights p, g;     // the two blocks as the model's weights: F32 views, by tensor name
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
    // The linear layers' operand precision (dsv3 train --precision): NULL for fp32, else &recipe.
    LinearRecipe recipe;
    const LinearRecipe *lowp;
    // The output heads' GEMMs (dsv3 train --head-precision): 0 fp32 (the default: the report keeps
    // the head in higher precision), 1 BF16 operands with fp32 sums, as Megatron and autocast run it
    int head_bf16;
    int fp8_storage;  // the activation plan keeps the linear layers' inputs in FP8 (Fp8Kept)
    int n_grad_groups;              // L + D + 2
    TrainGradGroup *grad_groups;    // (n_grad_groups) indexed as TrainGradsDone's group
    TrainGradsDone grads_done;      // NULL: not told
    void *grads_done_ctx;
    MoeParallel *moe_parallel;      // the routed experts split over ranks (dist/expert_parallel.h), or NULL
} TrainModel;

// Lays out parameters, gradients and activations for micro-batches of B × (T + 1) tokens;
// parameters are zero until train_model_init_random or train_model_load.
int train_model_new(TrainModel *m, const ModelConfig *c, int B, int T, Error *err);
// The same holding only routed experts ep_rank·N_r/ep_size .. (ep_rank+1)·N_r/ep_size − 1 of every
// MoE layer (expert parallel: the others are `remote`, with neither parameters nor gradients here;
// n_routed_experts must be divisible by ep_size).
int train_model_new_sharded(TrainModel *m, const ModelConfig *c, int B, int T, int ep_size, int ep_rank, Error *err);
// Sets the linear layers' precision (NULL: fp32). FP8 also lays the activations out again with the
// linear layers' inputs kept in FP8 between the passes (smaller act_bytes); the activations'
// contents are lost, the parameters and gradients kept. Out of memory for the new layout, the
// model keeps its previous one if it can still have that memory (else it can only be freed).
int train_model_set_recipe(TrainModel *m, const LinearRecipe *recipe, Error *err);
void train_model_free(TrainModel *m);
// Linear, embedding, head and router weights ~ N(0, initializer_range); norms 1; router bias 0.
// The draws are those of the whole model in tensor order, remote experts' skipped, so a sharded
// model holds the same values as the whole one.
void train_model_init_random(TrainModel *m, uint64_t seed);
// Reads every tensor held here (any stored dtype, FP8 block-scaled included) of the checkpoint in
// dir, which must match m's configuration in names and shapes. MTP tensors absent from the files are
// an error; the MTP copies of the embedding and head are not read (the model shares them).
int train_model_load(TrainModel *m, const char *dir, Error *err);
// Writes config.json and model.safetensors (shards over shard_bytes) into dir, MTP copies of the
// embedding and head included, the weights stored as dtype: F32 (the master weights as they are),
// BF16 or FP8 (model/convert_checkpoint.h).
int train_model_save(const TrainModel *m, const char *dir, DType dtype, size_t shard_bytes, Error *err);
// The same with every tensor's values given (values[i] for m->tensors[i]: remote experts gathered
// from their ranks by the caller).
int train_model_save_values(const TrainModel *m, const char *dir, const float *const *values, DType dtype,
                            size_t shard_bytes, Error *err);
// The tensor named name, or NULL.
const TrainTensor *train_model_tensor(const TrainModel *m, const char *name);

// tokens: (B, T + 1). Fills m->loss; fails (without running) on a token outside the vocabulary.
// The output heads' gradients are computed here, fused with the loss (TrainActs.head_logits), for
// the train_model_backward that follows.
int train_model_forward(TrainModel *m, const int *tokens, Error *err);
// The same for the loss alone (evaluation): no backward pass may follow it.
int train_model_evaluate(TrainModel *m, const int *tokens, Error *err);
// The logits of the last forward's rows, computed again from the heads' saved inputs: module 0
// the main model's (B·T, V), module k ≥ 1 MTP module k's (B·(T − k), V) when it ran.
int train_model_logits(TrainModel *m, int module, float *out, Error *err);
void train_model_zero_grad(TrainModel *m);
// Accumulates into m->grads the gradient of scale · loss of the last train_model_forward (scale =
// 1/A when A micro-batches make one step).
int train_model_backward(TrainModel *m, float scale, Error *err);

#endif
