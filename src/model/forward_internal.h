// Internal to src/model: the forward state's layout and the pieces the batched forward
// (forward.c) and the single-token decode step (decode.c) share.
#ifndef DSV3_MODEL_FORWARD_INTERNAL_H
#define DSV3_MODEL_FORWARD_INTERNAL_H

#include "model/model.h"

// Queries are processed in chunks of this many rows, so the score buffers stay (QCHUNK, S).
#define QCHUNK 64

struct ForwardState {
    int max_T, capacity, nthreads;
    float *x;        // (T, d) residual stream
    float *xn;       // (T, d) normed input of a sub-layer
    float *y;        // (T, d) sub-layer output
    float *cq;       // (T, q_lora)
    float *q;        // (T, H, qk_head)  [q_nope | q_pe] per head
    float *kva;      // (T, kv_lora + rope)
    float *attn;     // (T, H, v_head)
    float *gate;     // (T, F) SwiGLU gate, F the widest FFN
    float *up;       // (T, F)
    float *router;   // (T, N_r)
    float *scores;   // (T, N_r)
    int *topk_idx;   // (T, K_r)
    float *topk_w;   // (T, K_r)
    int *rows;       // (T) tokens routed to one expert
    float *xg;       // (T, d) those tokens' inputs, gathered
    float *fused;    // (2, K_r + n_shared, moe_inter) decode: gate and up rows of every expert a token uses
    float *cat;      // (T, 2d) MTP input [enorm(emb) ; hnorm(h)]
    float *thread;   // (nthreads, per_thread) attention scratch
    size_t per_thread;
    float *block;    // the one allocation everything above lives in
};

// Per-thread scratch, carved from s->thread: attention buffers for a T-row call, and the decode
// step's private copies of small vectors (every thread normalises and routes for itself rather
// than wait at a barrier for one thread to do it).
typedef struct {
    float *k, *v;     // (S, nope), (S, v_head): one head's expanded keys and values (plain path)
    float *p, *p2;    // (QCHUNK, S) scores: latent/no-rope part, then the rotary part
    float *qn, *qp;   // (QCHUNK, nope), (QCHUNK, rope) one head's query rows
    float *qa, *ol;   // (QCHUNK, kv_lora) absorbed query, latent-space output (absorbed path)
    float *o;         // (QCHUNK, v_head)
    float *xn;        // (d) decode: the normed input of a sub-layer
    float *cq;        // (q_lora) decode: the normed q latent
    float *cat;       // (2d) decode: the MTP input
    float *scores;    // (N_r) decode: router scores
    float *gw;        // (K_r) decode: gating weights of the chosen experts
    int *idx;         // (K_r) decode: the chosen experts
} ThreadScratch;

size_t thread_scratch_floats(const ModelConfig *c, int capacity);
// This thread's scratch (omp_get_thread_num()).
ThreadScratch thread_scratch(const ModelConfig *c, ForwardState *s);

// Decode steps: one token at position kv->len (main model) or kv->mtp_len[k] (MTP module k)
// through absorbed attention, in one parallel region (decode.c). Same outputs as model_forward and
// model_mtp_forward with T = 1; the callers have checked the arguments.
void decode_forward(const Model *m, ForwardState *s, KVCache *kv, int token, float *logits, float *hidden);
void decode_mtp_forward(const Model *m, ForwardState *s, KVCache *kv, int k, int token, const float *hidden,
                        float *logits, float *hidden_out);

// The routed experts a token chose plus the shared experts, for one token, run by every thread of
// the calling team: y (d) = Σ gate · expert(xn). idx, gw: (K_r) the route. Ends with a barrier.
// residual: NULL, or a (d) vector the result is also added to (each thread its own slice).
void moe_experts_one(const Model *m, ForwardState *s, const MoeWeights *w, const float *xn, const int *idx,
                     const float *gw, float *residual);

#endif
