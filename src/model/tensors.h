// The list of tensors a configuration calls for, with HF names and shapes: what `dsv3 init` and
// the trainer write, in the order the released checkpoints use.
#ifndef DSV3_MODEL_TENSORS_H
#define DSV3_MODEL_TENSORS_H

#include <stdint.h>

#include "base/error.h"
#include "model/config.h"
#include "model/weights.h"

typedef enum {
    TENSOR_LINEAR,  // a weight matrix [out, in]: FP8-quantisable
    TENSOR_EMBED,   // embedding / output head [V, d]: kept BF16/F32
    TENSOR_ROUTER,  // router weight [N_r, d]: kept BF16/F32
    TENSOR_NORM,    // a norm weight [C], initialised to 1
    TENSOR_BIAS,    // e_score_correction_bias [N_r], F32, initialised to 0
} TensorKind;

typedef struct TensorSpec {
    char name[128];   // HF name
    TensorKind kind;
    int ndim;
    int64_t shape[2];
    int layer;        // HF layer index (MTP module k: num_hidden_layers + k); -1 for embed/final norm/lm_head
    int expert;       // routed expert index; -1 otherwise
    int mtp;          // MTP module k (0-based); -1 in the main model
    int mtp_copy;     // 1: an MTP module's copy of the embedding or of the output head (shared_head.head)
    MatView *mat;     // walked over a ModelWeights: the matrix slot this tensor binds to, else NULL
    float **vec;      // walked over a ModelWeights: the vector slot (norms, router bias), else NULL
} TensorSpec;

// Calls fn for every tensor of the main model and of the first n_mtp MTP modules, in checkpoint
// order; stops and returns fn's value when it is non-zero. w: NULL, or weights whose tables were
// allocated by weights_alloc_tables, whose slots are then given in t->mat / t->vec.
typedef int (*TensorVisitor)(const TensorSpec *t, void *ctx);
int tensor_walk(const ModelConfig *c, int n_mtp, ModelWeights *w, TensorVisitor fn, void *ctx);

// Fills *out (malloc'd) with every tensor of the main model and its MTP modules.
int tensor_specs(const ModelConfig *c, TensorSpec **out, int *n, Error *err);

#endif
