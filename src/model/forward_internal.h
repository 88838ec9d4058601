// Internal to src/model: the inference forward state's layout, shared by the batched forward
// (forward.c) and the single-token decode step (decode.c).
#ifndef DSV3_MODEL_FORWARD_INTERNAL_H
#define DSV3_MODEL_FORWARD_INTERNAL_H

#include "model/layer.h"
#include "model/model.h"

struct ForwardState {
    Backend *be;              // whose memory the block is
    int max_T, capacity, nthreads;
    float *x, *xn, *y;        // (T, d) residual stream, a sub-layer's normed input, its output
    float *qa;                // (T, q_lora) q_a_proj output, normed in place
    float *q;                 // (T, H, qk_head) [q_nope | q_pe] per head
    float *kva;               // (T, kv_lora + rope)
    float *ao;                // (T, H, v_head) attention output
    float *gate, *up;         // (T, F) SwiGLU, F the widest dense or shared FFN
    float *router, *scores;   // (T, N_r)
    int *topk_idx;            // (T, K_r)
    float *topk_w;            // (T, K_r)
    int *slot_of;             // (T, K_r)
    int *slot_tk;             // (T·K_r)
    int *slot_tk_token;       // (T·K_r)
    int *expert_off;          // (N_r + 1)
    float *xg, *e_out;        // (T·K_r, d) routed inputs and outputs by slot
    float *e_gate, *e_up;     // (T·K_r, moe_inter)
    float *emb;               // (T, d) MTP: the next tokens' embeddings
    float *cat;               // (T, 2d) MTP input [enorm(emb) ; hnorm(h)]
    float *rope_cos, *rope_sin;  // (T, rope/2) the angles of the positions being run
    float *fused;             // (2, (K_r + n_shared) · moe_inter) decode: gate and up rows of a token's experts
    float *attn;              // (nthreads, attn_per_thread) attention scratch
    size_t attn_per_thread;
    float *own;               // (nthreads, own_per_thread) decode: each thread's private vectors
    size_t own_per_thread;
    LayerActs acts;           // a layer's activations, laid over the buffers above
    void *block;              // the one allocation everything above lives in
};

// The pass of T rows at pos0 over one sequence's cache; latent and kpe are set per layer.
LayerPass forward_pass(const Model *m, ForwardState *s, const KVCache *kv, int T, int pos0, AttnMode mode);

// Decode steps: one token at position kv->len (main model) or kv->mtp_len[k] (MTP module k)
// through absorbed attention, in one parallel region (decode.c). Same outputs as model_forward and
// model_mtp_forward with T = 1; the callers have checked the arguments. 0, or -1 with m->be->err set.
int decode_forward(const Model *m, ForwardState *s, KVCache *kv, int token, float *logits, float *hidden);
int decode_mtp_forward(const Model *m, ForwardState *s, KVCache *kv, int k, int token, const float *hidden,
                       float *logits, float *hidden_out);

#endif
