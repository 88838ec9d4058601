// The one table of a checkpoint's tensors: every tensor a configuration calls for, with its
// HuggingFace name, shape and place in the model, in the order the released checkpoints use.
// Whatever depends on the layout walks this table and nothing else: `dsv3 init` and the trainer
// (what they write), weights_bind (what it binds), the parameter counts of `dsv3 info` and
// `dsv3 plan`, the benchmarks' bytes and FLOPs per token.
#ifndef DSV3_MODEL_TENSORS_H
#define DSV3_MODEL_TENSORS_H

#include <stdint.h>

#include "base/error.h"
#include "model/config.h"
#include "model/weights.h"

typedef enum {
    TENSOR_LINEAR,  // a weight matrix [out, in] (the FP8 ones among them: TensorSpec.fp8)
    TENSOR_EMBED,   // embedding / output head [V, d]: kept BF16/F32
    TENSOR_ROUTER,  // router weight [N_r, d]: kept BF16/F32
    TENSOR_NORM,    // a norm weight [C], initialised to 1
    TENSOR_BIAS,    // e_score_correction_bias [N_r], F32, initialised to 0
} TensorKind;

typedef struct TensorSpec {
    char name[128];   // HF name
    TensorKind kind;
    int ndim;
    int64_t shape[2];  // shape[1] is 0 when ndim == 1
    int layer;         // HF layer index (MTP module k: num_hidden_layers + k); -1 for embed/final norm/lm_head
    int expert;        // routed expert index; -1 otherwise
    int mtp;           // MTP module k (0-based); -1 in the main model
    int mtp_copy;      // 1: an MTP module's copy of the embedding or of the output head (shared_head.head)
    int head;          // 1: an output head: lm_head, shared_head.head, or the embedding when tie_word_embeddings
    int fp8;           // 1: F8_E4M3 + block scales in an FP8 checkpoint (SPEC §3.2): the linear weights of
                       // a decoder layer (attention, dense FFN, experts); eh_proj, router, embeddings stay BF16
    MatView *mat;      // walked over a ModelWeights: the matrix slot this tensor binds to, else NULL
    float **vec;       // walked over a ModelWeights: the vector slot (norms, router bias), else NULL
} TensorSpec;

// Calls fn for every tensor of the main model and of the first n_mtp MTP modules, in checkpoint
// order; stops and returns fn's value when it is non-zero. w: NULL, or weights whose tables were
// allocated by weights_alloc_tables, whose slots are then given in t->mat / t->vec.
// lm_head is not listed when tie_word_embeddings (the embedding is the head).
typedef int (*TensorVisitor)(const TensorSpec *t, void *ctx);
int tensor_walk(const ModelConfig *c, int n_mtp, ModelWeights *w, TensorVisitor fn, void *ctx);

// Fills *out (malloc'd) with every tensor of the main model and all its MTP modules.
int tensor_specs(const ModelConfig *c, TensorSpec **out, int *n, Error *err);

// What one tensor costs a token. Active: used by one token's computation — everything of a layer
// and the router, the final norm and the head (a tied embedding is the head, so it is active),
// K_r of the N_r routed experts: all experts have one shape, so experts 0..K_r-1 stand for the
// ones a token reaches. Not active: the embedding table (a token reads one row of it; DeepSeek's
// "37B activated" counts so) and an MTP module's copy of it. Multiplied: the active matrices (a
// token's matmul weights: no norms, no router bias).
typedef struct TensorCost {
    int64_t params;     // elements stored
    int64_t active;     // params, or 0
    int64_t matmul;     // params of an active matrix, or 0
    int64_t bytes_fp8;  // in the released FP8 format: E4M3 + one F32 scale per 128x128 block when
                        // fp8, BF16 otherwise
} TensorCost;
TensorCost tensor_cost(const ModelConfig *c, const TensorSpec *t);

// Bytes of a bound matrix in its stored type, FP8 block scales included.
int64_t tensor_view_bytes(const MatView *m);

// Parameters of the main model (all, and active as tensor_cost counts them) and of the MTP modules
// (all of them, their stored copies of the embedding and head included; active likewise: the head
// copy, not the embedding copy).
typedef struct ParamCounts {
    long long total, active, mtp_total, mtp_active;
} ParamCounts;
ParamCounts tensor_count_params(const ModelConfig *c);

#endif
