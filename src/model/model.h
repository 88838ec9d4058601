// A loaded DeepSeek-V3/V2 model and its inference forward pass.
//
// Attention attends over a latent KV cache: per token and layer it holds only the normalised
// latent c_kv (kv_lora_rank) and the rotated shared key k_pe (qk_rope_head_dim) — SPEC §2.1.
// Two attention paths read it: ATTN_PLAIN expands per-head keys and values through kv_b_proj
// (the readable reference, and fast for long prefills), ATTN_ABSORBED folds W_UK into the query
// and W_UV after the weighted sum (the decode path; no per-head keys ever exist).
#ifndef DSV3_MODEL_MODEL_H
#define DSV3_MODEL_MODEL_H

#include <stddef.h>

#include "base/error.h"
#include "base/safetensors.h"
#include "model/config.h"
#include "model/layer.h"
#include "model/weights.h"

typedef struct Model {
    Backend *be;         // where the forward pass runs (the CPU backend)
    ModelConfig cfg;
    StModel files;
    ModelWeights w;
    double *inv_freq;    // (qk_rope/2) RoPE frequencies, YaRN-corrected
    float rope_mscale;   // cos/sin factor m(mscale)/m(mscale_all_dim)
    float softmax_scale;
} Model;

// Loads config.json and the safetensors of dir. need_mtp: fail unless the MTP layers are present.
int model_load(Model *m, const char *dir, int need_mtp, Error *err);
void model_free(Model *m);

// The latent cache of one sequence, for the main layers and then the MTP layers. Elements are F32
// (decode computes exactly what prefill does) or BF16 (half the memory and the bytes attention
// reads; the normalised latent and the rotated key are rounded to BF16 as they are stored).
typedef struct KVCache {
    int n_layers;   // num_hidden_layers + MTP modules
    int capacity;   // positions
    int len;        // positions filled (same for every main layer)
    int n_mtp;
    int *mtp_len;   // (n_mtp) positions filled in each MTP module's layer
    DType dtype;    // DT_F32 or DT_BF16
    void *latent;   // (n_layers, capacity, kv_lora_rank)  normalised c_kv
    void *k_pe;     // (n_layers, capacity, qk_rope_head_dim) rotated
} KVCache;

// An F32 cache; kvcache_init_as chooses the element type (DT_F32 or DT_BF16).
int kvcache_init(KVCache *kv, const ModelConfig *c, int n_mtp, int capacity, Error *err);
int kvcache_init_as(KVCache *kv, const ModelConfig *c, int n_mtp, int capacity, DType dtype, Error *err);
void kvcache_free(KVCache *kv);
// Layer l's latents and rotated keys (pointers into the cache at position 0).
void *kvcache_latent(const KVCache *kv, const ModelConfig *c, int l);
void *kvcache_kpe(const KVCache *kv, const ModelConfig *c, int l);
// Bytes per token of the cache with elements of dtype, over the main layers.
size_t kvcache_bytes_per_token(const ModelConfig *c, DType dtype);

// Scratch for a forward pass over up to max_T tokens against a cache of `capacity` positions:
// one allocation, laid out by the plan in forward.c.
typedef struct ForwardState ForwardState;
ForwardState *forward_state_new(const Model *m, int max_T, int capacity, Error *err);
void forward_state_free(ForwardState *s);

// Runs tokens[0..T) at positions kv->len .. kv->len+T-1, appending to the cache.
// logits: (T, vocab) for every position, or NULL; last_logits: (vocab) for the last position or
// NULL; hidden: (T, d) the final-normed hidden states (the MTP module's input) or NULL.
int model_forward(const Model *m, ForwardState *s, KVCache *kv, const int *tokens, int T, AttnMode mode,
                  float *logits, float *last_logits, float *hidden, Error *err);

// MTP module k (0-based): rows i = 0..T-1 combine (next_tokens[i], hidden[i]) at positions
// kv->mtp_len + i, appending to the module's cache layer. hidden: (T, d) — the main model's
// final-normed output for k = 0, the previous module's output for k > 0. logits: (T, vocab);
// hidden_out: (T, d) the module's output after shared_head.norm — the next module's `hidden`, as
// in training (docs/training.md) and Megatron — or NULL.
int model_mtp_forward(const Model *m, ForwardState *s, KVCache *kv, int k, const int *next_tokens,
                      const float *hidden, int T, AttnMode mode, float *logits, float *hidden_out, Error *err);

#endif
