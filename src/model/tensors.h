// The list of tensors a configuration calls for, with HF names and shapes: what `dsv3 init` and
// the trainer write, in the order the released checkpoints use.
#ifndef DSV3_MODEL_TENSORS_H
#define DSV3_MODEL_TENSORS_H

#include <stdint.h>

#include "base/error.h"
#include "model/config.h"

typedef enum {
    TENSOR_LINEAR,  // a weight matrix [out, in]: FP8-quantisable
    TENSOR_EMBED,   // embedding / output head [V, d]: kept BF16/F32
    TENSOR_ROUTER,  // router weight [N_r, d]: kept BF16/F32
    TENSOR_NORM,    // a norm weight [C], initialised to 1
    TENSOR_BIAS,    // e_score_correction_bias [N_r], F32, initialised to 0
} TensorKind;

typedef struct TensorSpec {
    char name[128];
    TensorKind kind;
    int ndim;
    int64_t shape[2];
} TensorSpec;

// Fills *out (malloc'd) with every tensor of the main model and its MTP modules.
int tensor_specs(const ModelConfig *c, TensorSpec **out, int *n, Error *err);

#endif
