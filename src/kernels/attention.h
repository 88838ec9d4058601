// Attention over a latent cache (MLA's core, SPEC §2.1), in terms of shapes only: per position the
// cache holds a latent vector c (kv_lora) and one rotary key k_pe (rope) shared by every head;
// head h's key is [W_UK,h c ; k_pe] and its value W_UV,h c, with W_UK,h and W_UV,h the head's
// rows of kv_b_proj ([nope rows of W_UK ; v rows of W_UV] per head).
//
// Two ways compute the same function: plain expands each head's keys and values (prefill,
// training, which keeps them for the backward pass); absorbed folds W_UK into the query and W_UV
// after the weighted sum, so per-head keys never exist (decode, speculative verification).
#ifndef DSV3_KERNELS_ATTENTION_H
#define DSV3_KERNELS_ATTENTION_H

#include <stddef.h>

#include "kernels/matmul.h"

// Queries are processed in chunks of this many rows (or head × row entries), so score buffers
// stay (LATENT_QCHUNK, S).
#define LATENT_QCHUNK 64

// One call: B sequences of T new query rows at positions pos0 .. pos0 + T − 1, causal over
// positions 0 .. pos0 + T − 1 of their own sequence.
typedef struct LatentAttention {
    int B, T, pos0;
    int H, nope, rope, v, kv_lora;
    float scale;               // softmax scale (YaRN mscale² folded in)
    int absorbed;
    const float *q;            // (B·T, H, nope + rope) [q_nope | q_pe], q_pe rotated
    const void *latent;        // (B, ld, kv_lora), or the rows of a paged store (blocks)
    const void *kpe;           // (B, ld, rope) rotated, or paged like latent
    int ld;                    // positions per sequence in latent / kpe (contiguous store)
    const int *blocks;         // paged store (B = 1): position p is row p % block_size of block
    int block_size;            // blocks[p / block_size]; NULL: contiguous
    DType dtype;               // of latent and kpe: DT_F32 or DT_BF16 (plain backward: F32 only)
    const MatView *kv_b_proj;  // (H·(nope + v), kv_lora)
    const MatView *w_uk_t;     // absorbed, or NULL: (H·kv_lora, nope) every head's W_UK,hᵀ (weight panels), so
                               // that W_UK,hᵀ q_nope is an x · Wᵀ product of the BF16-compute kernels; NULL:
                               // q_nope · W_UK,h from kv_b_proj's rows
    float *out;                // (B·T, H, v)
    // absorbed only, or NULL: the caller folds W_UK and applies W_UV itself, for many sequences in
    // one product per head (a batched decode step) — the same products, the same bits
    const float *q_latent;     // (B·T, H, kv_lora) W_UK,hᵀ q_nope: read instead of computed
    float *out_latent;         // (B·T, H, kv_lora) Σ p · latent written instead of out (W_UV not applied)
    float *kv_save;            // plain with pos0 = 0 only, or NULL: (B·T, H, nope + v) [k_nope | v]
    const float *kv_in;        // plain with pos0 = 0 only, or NULL: the same [k_nope | v], already
                               // expanded by the caller (training under a BF16/FP8 recipe)
    float *probs_save;         // plain with pos0 = 0 only, or NULL: (B, H, T, T), upper triangle 0
    float *scratch;            // (threads, per_thread) floats, per_thread ≥ latent_attention_scratch_floats
    size_t per_thread;
} LatentAttention;

// The row of the store holding position pos of sequence b (paged: B = 1).
static inline size_t latent_store_row(const int *blocks, int block_size, int ld, int b, int pos) {
    return blocks ? (size_t)blocks[pos / block_size] * block_size + pos % block_size : (size_t)b * ld + pos;
}

// Per-thread scratch floats for sequences of up to S positions.
size_t latent_attention_scratch_floats(const LatentAttention *a, int S);

// The whole call, split over the OpenMP threads by (sequence, head). 0, or -1 when a product
// failed (out of scratch memory).
int latent_attention_forward(const LatentAttention *a);
// W_UK,hᵀ q_nope,h for n rows and heads [h0, h1) of a's shape: q's rows (every head's nope + rope
// query, head h's at q + h·(nope + rope)) ldq floats apart; out's rows (head h's kv_lora values at
// out + h·kv_lora) ldo apart. On a->w_uk_t's panels where it has them, else q_nope · W_UK,h over
// kv_b_proj's rows; zero when nope is 0. One product per head for the rows, whoever asks —
// attention for its entries, a batched decode step folding every row at once
// (LatentAttention.q_latent) — so the same bits; the heads' weights one stream.
int latent_attention_fold_queries(const LatentAttention *a, int h0, int h1, const float *q, int ldq, int n, float *out,
                                  int ldo);
// out,h = W_UV,h ol,h for n rows and heads [h0, h1): ol's rows (head h's kv_lora values at
// ol + h·kv_lora) ldl floats apart, out's (head h's v values at out + h·v) ldo apart; the same
// product as attention's own for its entries (LatentAttention.out_latent unset), so the same bits.
int latent_attention_apply_w_uv(const LatentAttention *a, int h0, int h1, const float *ol, int ldl, int n, float *out,
                                int ldo);
// Absorbed attention of sequence 0's rows × heads [h0, h1) on the calling thread, with this
// thread's scratch (a decode step's share of the heads: they score the cache together, so each
// cached row is read once per thread, not once per head).
int latent_attention_absorbed_part(const LatentAttention *a, int h0, int h1, float *scratch);

// Absorbed attention goes over the cache in chunks of LATENT_CHUNK positions: per chunk and entry
// (head h, row t of sequence 0 is entry h·T + t) a part row [max score, Σ exp(score − max),
// Σ exp(score − max) · latent (kv_lora)], the chunks merged one after another in order (running
// max and rescaled sums), then the latent sum over the exp sum through W_UV. One running merge
// in chunk order whoever computed the chunks: latent_attention_absorbed_part does it all on one
// thread; a long context spreads its chunks over the threads (latent_attention_chunk, then
// latent_attention_merge in order) and gets the same bits.
#define LATENT_CHUNK 1024
int latent_attention_chunk_count(const LatentAttention *a);
// Chunk c of every entry (H·T part rows, ld kv_lora + 2) with this thread's scratch.
int latent_attention_chunk(const LatentAttention *a, int c, float *part, float *scratch);
// Entries [e0, e1) of state (H·T rows) merged with a chunk's part rows (first: the first chunk,
// copied); every chunk in order, from chunk 0.
void latent_attention_merge(const LatentAttention *a, int e0, int e1, const float *part, float *state, int first);
// Entries [e0, e1) from their merged state rows into out.
int latent_attention_finish(const LatentAttention *a, int e0, int e1, const float *state, float *scratch);

// The backward pass of plain attention from what the forward saved (pos0 = 0; kv_save and
// probs_save set; a contiguous store; scratch as for the forward). dout: (B·T, H, v). dq (B·T, H,
// nope + rope), dkv (B·T, H, nope + v) and dkpe (B·T, rope) += ...; dkpe_heads (B, H, T, rope) is
// scratch.
int latent_attention_backward(const LatentAttention *a, const float *dout, float *dq, float *dkv, float *dkpe,
                              float *dkpe_heads);

#endif
