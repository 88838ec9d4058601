// Internal to src/model: the inference forward state's layout, shared by the batched forward
// (forward.c) and the single-token decode step (decode.c).
#ifndef DSV3_MODEL_FORWARD_INTERNAL_H
#define DSV3_MODEL_FORWARD_INTERNAL_H

#include "base/team_barrier.h"
#include "model/layer.h"
#include "model/model.h"

struct ForwardState {
    Backend *be;              // whose memory the block is
    int max_T, capacity, nthreads;
    int max_decode;           // rows a decode step takes at most (min(max_T, DECODE_MAX_ROWS))
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
    float *attn;              // (nthreads, attn_per_thread) attention scratch
    size_t attn_per_thread;
    float *attn_parts;        // (LONG_SLOTS·nthreads, LONG_ROWS·H, kv_lora + 2) decode: a long context's chunk parts
    float *attn_state;        // (LONG_ROWS·H, kv_lora + 2) and their running merge (decode.c)
    float *share_cut;         // (SHARE_KINDS, nthreads + 1) decode: thread t's share of a kind of work is [cut[t], cut[t + 1])
    float *share_busy;        // (SHARE_KINDS, nthreads, 16) decode: each thread's seconds in its shares this step (own line)
    int share_fixed;          // 1: share_cut set by forward_state_set_shares, not measured
    int profile;              // 1: decode steps time their phases (forward_state_profile)
    double *prof;             // (nthreads, PROFILE_LINE) decode: each thread's seconds by kind of work,
                              // and its last mark's time at PROFILE_LAST (a cache line a thread)
    long prof_steps;          // decode steps profiled, and their wall time
    double prof_seconds;
    float *own;               // (nthreads, own_per_thread) decode: each thread's private vectors (decode.c)
    size_t own_per_thread;
    int latent_rows;          // decode steps of up to this many rows fold W_UK / apply W_UV for all rows at once:
    float *q_latent;          // (latent_rows, H, kv_lora) W_UK,hᵀ q_nope of every row and head
    float *out_latent;        // (latent_rows, H, kv_lora) attention's latent outputs, before W_UV
    int *routes;              // or NULL: model_forward records each layer's routed experts here
    LayerActs acts;           // a layer's activations, laid over the buffers above
    void *block;              // the one allocation everything above lives in
    TeamBarrier meet;         // decode.c's threads meet here (DECODE_BARRIER)
    _Alignas(64) atomic_int attn_next;  // decode.c: the next attention unit of a batched step
    _Alignas(64) atomic_int moe_next;   // decode.c: the next expert gate/up unit of a batched step
    _Alignas(64) atomic_int chunk_next; // decode.c: claims of a long context's attention chunks
    _Alignas(64) atomic_int row_stored; // decode.c: a one-token step's new cache row is stored (at this meeting count)
    _Alignas(64) atomic_int router_done; // decode.c: a MoE step's router outputs are written (at this meeting count)
};

// A decode step spreads the chunks of a sequence's attention over the threads when it has at least
// two chunks per thread and at most this many rows (a decode step or a speculative verification;
// prefill chunks keep the split by heads).
#define LONG_ROWS 16
// Chunk parts kept per thread of a step with LONG_ROWS rows: the chunks of a wave, merged after
// it, are up to this many per thread (more with fewer rows — a decode step's one row has 16 times
// as many: 128 chunks, 128K positions, at two threads).
#define LONG_SLOTS 4

// Rows of a decode step whose latent queries and outputs have room in the forward state (above it,
// attention folds them per (row, head) itself: the same bits, slower).
#define DECODE_LATENT_ROWS 256

// The pass of T rows at pos0 over one sequence's cache; latent and kpe are set per layer.
LayerPass forward_pass(const Model *m, ForwardState *s, const KVCache *kv, int T, int pos0, AttnMode mode);

// Kinds of decode work shared out by measured speed (decode.c): the products' rows (0), and the MoE
// gate/up rows shared out by an estimated cost (1), whose cut also corrects the estimate.
#define SHARE_KINDS 2

// Kind's cuts from one fraction per thread f (scaled to sum to 1), and all kinds' cuts equal (a
// new state; measured shares again).
void share_cuts_set(ForwardState *s, int kind, const double *f);
void share_cuts_equal(ForwardState *s);

// A decode step's kinds of work for its profile (DecodeProfile), indexes of a thread's line of prof.
enum { PROFILE_PRODUCTS, PROFILE_ATTENTION, PROFILE_MEETINGS, PROFILE_LAST, PROFILE_LINE = 8 };

// Floats of one decode thread's private vectors for steps of up to `rows` rows.
size_t decode_own_floats(const ModelConfig *c, int rows);

#endif
