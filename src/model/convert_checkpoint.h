// Checkpoints written in another storage dtype: `dsv3 convert` and the trainer's --save-dtype go
// through this one writer and the one block quantiser (kernels/fp8_quant.h), so an FP8 checkpoint
// is the released format (SPEC §3.2) whoever writes it:
//   fp8   every linear of the tensor table's FP8 set (TensorSpec.fp8: q_a_proj, q_b_proj, q_proj,
//         kv_a_proj_with_mqa, kv_b_proj, o_proj and the gate/up/down projections of the dense FFN,
//         the experts and the shared experts, in the main and the MTP layers) as F8_E4M3 [out, in]
//         with `<name>_scale_inv` F32 [ceil(out/128), ceil(in/128)]: per 128×128 block,
//         scale = max(amax, 1e-4) / 448 and code = E4M3(w / scale) in fp32. Every other tensor
//         (embeddings, heads, norms, router, its bias, the MTP eh_proj — BF16 in the release) keeps
//         its stored dtype. config.json gains the release's quantization_config.
//   bf16  every floating tensor BF16 (FP8 weights dequantised as code × scale in fp32, then rounded
//         to nearest even), except e_score_correction_bias, which stays F32 as released.
//   f32   every floating tensor F32 (FP8 weights dequantised as code × scale in fp32).
// Integer tensors are copied as they are. An FP8 weight converted to fp8 again keeps its codes and
// scales; a tensor that already has its target dtype is copied byte for byte.
#ifndef DSV3_MODEL_CONVERT_CHECKPOINT_H
#define DSV3_MODEL_CONVERT_CHECKPOINT_H

#include <stddef.h>

#include "base/dtype.h"
#include "base/error.h"
#include "base/safetensors.h"
#include "kernels/matmul.h"
#include "model/config.h"
#include "model/tensors.h"

// "f32", "bf16" or "fp8" into *out; -1 with err naming `what` (an option, e.g. "--dtype") otherwise.
int ckpt_dtype_parse(const char *s, const char *what, DType *out, Error *err);

// The dtype a tensor of the table stored as `stored` takes in a checkpoint of `target` (above).
DType ckpt_tensor_dtype(const TensorSpec *t, DType stored, DType target);

// One tensor to write: its name and shape, where its values come from, and the dtype to store.
// src: the values as a rows × cols view in any stored dtype (a 1-D tensor is one row; an FP8 view
// carries its scale grid). file: where src lives, for error messages (NULL: memory).
typedef struct CkptTensor {
    const char *name;
    const char *file;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    MatView src;
    DType dtype;
} CkptTensor;

// Writes tensors into dir — one model.safetensors, or, when they exceed shard_bytes, shards
// model-0000k-of-0000n.safetensors of at most shard_bytes and model.safetensors.index.json — each
// converted from its source as it is written (the memory of one tensor, not of the model). An
// F8_E4M3 tensor is followed by its `<name>_scale_inv`. *fp8 (may be NULL) gets how many were.
int ckpt_write_tensors(const char *dir, const CkptTensor *t, int n, size_t shard_bytes, int *fp8, Error *err);

// Writes config.json and the weights of a model given as fp32 values, values[i] the tensor i of
// tensor_specs(c), stored as `target` (the trainer's checkpoints: F32 master weights in, so at
// fp8 the tensors outside the FP8 set stay F32).
int ckpt_save_f32(const char *dir, const ModelConfig *c, const float *const *values, DType target,
                  size_t shard_bytes, Error *err);

typedef struct ConvertStats {
    int tensors;        // tensors written, scales included
    int fp8;            // of them F8_E4M3 weights
    size_t bytes;       // of tensor data
} ConvertStats;

// `dsv3 convert`: the checkpoint in `in` (anything dsv3 reads: single file or shards, F32, BF16,
// F16 or F8_E4M3 weights, with or without MTP layers) into `out` stored as target. out is written
// as out.tmp-XXXXXX and renamed into place when complete; an out that exists and is not an empty
// directory is refused unless force (then replaced only once the new one is complete). config.json
// is the input's with torch_dtype and quantization_config set; tokenizer.json,
// tokenizer_config.json and generation_config.json are copied when present. Errors name the file
// and the tensor or key; on error nothing is left at out (nor its temporary directory).
int checkpoint_convert(const char *in, const char *out, DType target, size_t shard_bytes, int force,
                       ConvertStats *stats, Error *err);

#endif
