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
    MoeParallel *moe_parallel;  // the routed experts split over ranks (prefill: model_forward), or NULL
    void *panels;               // the BF16-compute matrices' weight panels (MatView.panels), one allocation
    size_t panels_bytes;
} Model;

// Loads config.json and the safetensors of dir. need_mtp: fail unless the MTP layers are present.
int model_load(Model *m, const char *dir, int need_mtp, Error *err);
void model_free(Model *m);
// The arithmetic of the linear layers' products (--compute): COMPUTE_F32 (the default: activations
// and weights in fp32), COMPUTE_BF16 (activations rounded to BF16, weights as BF16 values — FP8
// codes exactly, with their scales per 128-column chunk — fp32 sums; matmul_nt_bf16c), or
// COMPUTE_AUTO: BF16 for the matrices stored in BF16 or FP8 where the CPU runs BF16 products fast
// (matmul_bf16c_fast), fp32 for the rest (F32 and F16 checkpoints keep their precision unless
// asked: the panels would round their weights). The attention projections,
// kv_b_proj, the dense FFN, the experts, eh_proj and the output heads (main and MTP: the largest
// matrix a decode step reads); the router, the norms, RoPE and the attention core stay fp32.
// Where the CPU has AVX512_BF16 with VBMI, the BF16-compute matrices are copied once into weight
// panels (matmul.h), which every product of them then reads — prefill, decode, a batch — with one
// order of sums whatever the number of rows (memory: a second copy of those matrices, FP8 as codes;
// freed by COMPUTE_F32 and model_free; with m->moe_parallel set, only this rank's routed experts).
// Fails only when that memory cannot be had (the model keeps fp32 compute then).
typedef enum { COMPUTE_F32, COMPUTE_BF16, COMPUTE_AUTO } ComputeMode;
int model_set_compute(Model *m, ComputeMode mode, Error *err);
// The latent cache's element type that goes with the model's compute (after model_set_compute):
// BF16 where its attention's down-projection (kv_a, whose normalised rows the cache holds) runs in
// BF16 — DeepSeek's reference keeps its cache in the model's BF16 too — else F32.
DType model_kv_dtype_auto(const Model *m);
// Where the products on weight panels run (after model_set_compute), for steps of up to `rows`
// rows (an engine's sequences × (1 + draft tokens); 0: one row): on the AMX tiles, where the CPU
// has them, a matrix's products if the rows it gets are enough for the tiles to win — the dense
// matrices from 4 rows, the routed experts when rows × top-k / experts reaches 4 — else on the
// AVX512_BF16 register tiles (model_set_compute's choice). One tile instruction costs the same for
// 1 row as for 16, so a step of many rows reads each weight once at little more than one row's
// cost, while a single row streams slower than on the register tiles (README's speed section).
// A matrix's products take one kernel whatever the rows, so a row's bits do not depend on the
// others in its step. Returns how many matrices the tiles now run.
int model_set_panel_tiles(Model *m, long rows);
#define MODEL_PANEL_TILES_ALL (1L << 40)  // rows that put every matrix with panels on the tiles
// The bytes of weight panels model_set_compute(mode) would allocate (0: none on this CPU), and
// in *matrices (when not NULL) how many matrices they hold.
size_t model_panels_bytes(const Model *m, ComputeMode mode, int *matrices);
// 1 when a row of a prefill chunk gets the same bits in a chunk of any other rows (every linear
// product in BF16 compute: one chain per element; on AMX tiles, for chunks of 16 rows or more);
// 0 when some product is fp32, whose blocked GEMM sums a row differently in chunks of other sizes.
int model_rows_independent(const Model *m);

// The latent cache's memory: one pool of blocks of block_size positions, each block holding those
// positions' rows for every layer (main layers, then the MTP modules' layers). Sequences take blocks
// as they grow and give them back when they end, so sequences of different lengths share one
// bounded pool. Elements are F32 (decode computes exactly what prefill does) or BF16 (half the
// memory and the bytes attention reads; the normalised latent and the rotated key are rounded to
// BF16 as they are stored).
typedef struct KVPool {
    int n_layers;     // num_hidden_layers + MTP modules
    int block_size;   // positions per block
    int n_blocks;
    DType dtype;      // DT_F32 or DT_BF16
    void *latent;     // (n_layers, n_blocks, block_size, kv_lora_rank)  normalised c_kv
    void *k_pe;       // (n_layers, n_blocks, block_size, qk_rope_head_dim) rotated
    size_t latent_bytes, kpe_bytes;  // (base/bigmem.h: huge pages where the kernel gives them)
    int *free_ids;    // (n_blocks) a stack of the free blocks
    int n_free;
    // Sharing (a prefix cache): a block may be in several sequences' tables (ref counts them); a
    // retained block stays filled after its last user leaves and is evicted, least recently
    // released first, only when no block is free — its owner hears of it through on_evict.
    int *ref;         // (n_blocks) the tables holding each block
    int *retained;    // (n_blocks)
    long *released;   // (n_blocks) when a retained block's last user left (eviction order)
    long clock;
    int n_used;       // blocks with ref > 0
    void (*on_evict)(void *ctx, int block);
    void *evict_ctx;
} KVPool;

int kvpool_init(KVPool *p, const ModelConfig *c, int n_mtp, int n_blocks, int block_size, DType dtype, Error *err);
void kvpool_free(KVPool *p);
// Bytes of one block.
size_t kvpool_block_bytes(const KVPool *p, const ModelConfig *c);
// Keeps block b filled after its last user leaves (until evicted).
void kvpool_retain(KVPool *p, int b);

// One sequence's cache: its block table into a pool (position p lives in row p % block_size of
// block blocks[p / block_size]) and how many positions are filled.
typedef struct KVCache {
    KVPool *pool;
    int owns_pool;  // kvcache_init made a private pool (freed with the cache)
    int *blocks;    // (max_blocks) the block table
    int n_blocks, max_blocks;
    int capacity;   // positions at most: max_blocks · block_size
    int len;        // positions filled (same for every main layer)
    int n_mtp;
    int *mtp_len;   // (n_mtp) positions filled in each MTP module's layer
    DType dtype;    // the pool's
} KVCache;

// A cache of `capacity` positions with a private pool that holds all of them (one block): for a
// caller that runs one sequence. F32, or kvcache_init_as's dtype (DT_F32 or DT_BF16).
int kvcache_init(KVCache *kv, const ModelConfig *c, int n_mtp, int capacity, Error *err);
int kvcache_init_as(KVCache *kv, const ModelConfig *c, int n_mtp, int capacity, DType dtype, Error *err);
// An empty cache of up to `capacity` positions whose blocks come from pool as it grows.
int kvcache_attach(KVCache *kv, KVPool *pool, int n_mtp, int capacity, Error *err);
// Makes positions [0, positions) backed by blocks; -1 with err when the pool has run out (the
// cache keeps what it had) or positions exceeds the capacity.
int kvcache_reserve(KVCache *kv, int positions, Error *err);
// Appends block b of the pool (a filled block another sequence shares) to the cache's table.
int kvcache_share(KVCache *kv, int b, Error *err);
// Empties the cache and gives its blocks back to the pool.
void kvcache_clear(KVCache *kv);
void kvcache_free(KVCache *kv);
// Layer l's latents and rotated keys: the pool's rows of that layer, addressed through the block
// table (kernels/attention.h: latent_store_row).
void *kvcache_latent(const KVCache *kv, const ModelConfig *c, int l);
void *kvcache_kpe(const KVCache *kv, const ModelConfig *c, int l);
// Bytes per token of the cache with elements of dtype, over the main layers.
size_t kvcache_bytes_per_token(const ModelConfig *c, DType dtype);

// Scratch for a forward pass over up to max_T tokens against a cache of `capacity` positions:
// one allocation, laid out by the plan in forward.c.
typedef struct ForwardState ForwardState;
ForwardState *forward_state_new(const Model *m, int max_T, int capacity, Error *err);
void forward_state_free(ForwardState *s);
// From now on, every model_forward of T > 1 tokens (or plain attention) writes the experts each
// token is routed to: routes (num_hidden_layers, T, num_experts_per_tok) in selection order, −1
// for the dense layers — what `dsv3 logits --routes-out` writes. NULL stops recording.
void forward_state_record_routes(ForwardState *s, int *routes);
// The decode threads' shares of the products' output rows: fractions (one per thread of the
// team, summing to 1) held fixed from now on, or NULL: in proportion to each thread's speed as
// measured over the previous steps (the default; decode.c). The shares never change the bits —
// for tests that show it, and benchmarks that want them fixed. -1 (err set) for a wrong count
// or fraction.
int forward_state_set_shares(ForwardState *s, const float *fractions, int n, Error *err);
// The shares now in use: up to n of them into fractions; returns the team's size.
int forward_state_shares(const ForwardState *s, float *fractions, int n);

// Where decode steps' time goes (model_decode, model_mtp_decode), from forward_state_profile(s, 1)
// on: each thread's seconds by kind of work, averaged over the team. A step's threads split every
// product between them and meet where one phase needs all of another's outputs; the profile tells
// the products (streaming the weights, with the norms, routing and RoPE between them) from the
// absorbed attention (its W_UK fold and W_UV included: compute over the cache) and from the time a
// thread waits for the others at a meeting. The marks cost two clock reads per phase: v3-108m FP8
// decode steps took ~1% longer profiled (median of 20 rounds taking turns, within the noise).
typedef struct DecodeProfile {
    long steps;        // decode steps profiled
    double seconds;    // their wall time
    double products;   // per thread: the products and everything else not below
    double attention;  // per thread: absorbed attention
    double meetings;   // per thread: waiting at the meetings
} DecodeProfile;
// on: from now on decode steps time their phases (the sums start from zero); 0: no more.
void forward_state_profile(ForwardState *s, int on);
// The sums since forward_state_profile(s, 1) or the last take, then zero again.
void forward_state_profile_take(ForwardState *s, DecodeProfile *out);

// Runs tokens[0..T) at positions kv->len .. kv->len+T-1, appending to the cache.
// logits: (T, vocab) for every position, or NULL; last_logits: (vocab) for the last position or
// NULL; hidden: (T, d) the final-normed hidden states (the MTP module's input) or NULL.
int model_forward(const Model *m, ForwardState *s, KVCache *kv, const int *tokens, int T, AttnMode mode,
                  float *logits, float *last_logits, float *hidden, Error *err);

// Batched decoding: one forward with absorbed attention over the new tokens of several sequences —
// one each in a decode step, K + 1 in a speculative verification, a piece of a prompt in the
// engine's prefill — each at its own positions (kv->len .., or kv->mtp_len[k] ..) in its own
// cache, appending to it. Every weight matrix is read once for the whole batch, and a row's bits
// do not depend on the other rows, how its sequence's rows are split between calls, or the thread
// count (batch invariance, decode.c). Rows are in sequence order, N = Σ T ≤ the state's max_T and
// DECODE_MAX_ROWS. logits: (Σ (T − skip_logits), vocab), the rows that want them in row order, or
// NULL; hidden: (N, d) the final-normed states or NULL.
#define DECODE_MAX_SEQS 256
#define DECODE_MAX_ROWS 512
typedef struct DecodeSeq {
    KVCache *kv;
    const int *tokens;  // (T)
    int T;
    int skip_logits;    // leading rows whose logits nobody reads (a prompt's, whose next token is known)
} DecodeSeq;
int model_decode(const Model *m, ForwardState *s, const DecodeSeq *seqs, int n_seqs, float *logits, float *hidden,
                 Error *err);
// MTP module k over such a batch: tokens are the next tokens, hidden (N, d) the input states (as
// model_mtp_forward's); logits (N, vocab), hidden_out (N, d) or NULL.
int model_mtp_decode(const Model *m, ForwardState *s, int k, const DecodeSeq *seqs, int n_seqs, const float *hidden,
                     float *logits, float *hidden_out, Error *err);

// MTP module k (0-based): rows i = 0..T-1 combine (next_tokens[i], hidden[i]) at positions
// kv->mtp_len + i, appending to the module's cache layer. hidden: (T, d) — the main model's
// final-normed output for k = 0, the previous module's output for k > 0. logits: (T, vocab);
// hidden_out: (T, d) the module's output after shared_head.norm — the next module's `hidden`, as
// in training (docs/training.md) and Megatron — or NULL.
int model_mtp_forward(const Model *m, ForwardState *s, KVCache *kv, int k, const int *next_tokens,
                      const float *hidden, int T, AttnMode mode, float *logits, float *hidden_out, Error *err);

#endif
