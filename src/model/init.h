// Writing a randomly initialised checkpoint in the HuggingFace format (`dsv3 init`).
#ifndef DSV3_MODEL_INIT_H
#define DSV3_MODEL_INIT_H

#include <stddef.h>
#include <stdint.h>

#include "base/dtype.h"
#include "base/error.h"
#include "model/config.h"

// Linear weights ~ N(0, initializer_range); those of the decoder layers stored as dtype (F32, BF16
// or F8_E4M3 with 128×128 block scales), the MTP modules' eh_proj, embeddings, head and router in
// BF16 (F32 when dtype is F32), as released (SPEC §3.2); norms 1; router bias 0 (F32). MTP modules
// get byte-identical copies of the embedding and head, as released.
// Writes config.json and model.safetensors (shards of at most shard_bytes + an index when larger).
int model_write_random(const ModelConfig *c, const char *dir, uint64_t seed, DType dtype, size_t shard_bytes,
                       Error *err);

#endif
