// One decoder layer of DeepSeek-V3 (MLA, then a dense SwiGLU FFN or DeepSeekMoE) and the MTP
// module's input, each op written once, forward and backward. The inference forward (prefill,
// forward.c), the decode step (decode.c) and the training forward and backward (src/train) all call
// these; a pass says how (LayerPass) and where the activations go (LayerActs).
//
// Rows: a pass runs N = B·T rows, B sequences of T new positions pos0 .. pos0 + T − 1 each (row
// n = b·T + t). Inference runs B = 1 at pos0 = the cache length; training B windows at pos0 = 0.
//
// The latent store: MLA keeps per position and layer only the normalised latent c_kv and the
// rotated shared key k_pe (SPEC §2.1). The forward writes the new positions there and attends over
// positions 0 .. pos0 + T − 1 of each sequence. Inference points it at its KV cache; training at
// its saved activations (ckv, kpe), which are the same thing for a window that starts at 0.
//
// Every op runs on the pass's backend (kernels/backend.h) and returns 0, or -1 with be->err saying
// what failed. Backward passes ACCUMULATE into weight gradients and input gradients (+=) unless
// said otherwise; the caller zeroes once per step.
#ifndef DSV3_MODEL_LAYER_H
#define DSV3_MODEL_LAYER_H

#include <stddef.h>

#include "kernels/attention.h"
#include "kernels/backend.h"
#include "model/config.h"
#include "model/weights.h"

typedef enum { ATTN_PLAIN, ATTN_ABSORBED } AttnMode;

typedef struct LayerPass LayerPass;
typedef struct LayerActs LayerActs;
typedef struct LayerGradScratch LayerGradScratch;

// Expert parallelism (dist/expert_parallel.h implements it): the routed experts of every MoE layer
// are split over the ranks of a group, each rank computing the ones it holds for the tokens of every
// rank that chose them. The MoE layer calls these in place of its own dispatch → experts → combine;
// the route, the loads, the shared experts and the balance loss stay with the token's rank.
typedef struct MoeParallel MoeParallel;
typedef struct MoeParallelOps {
    // y (N, d) += Σ_k g_k E_k(ln2) over each token's routed experts (a->topk_idx, a->topk_w),
    // keeping what the backward pass reads when p->save.
    int (*forward)(MoeParallel *mp, const LayerPass *p, const MoeWeights *w, LayerActs *a, int N, float *y);
    // From dy (N, d): s->dln (N, d) += the routed experts' input gradient, s->dtopk_w (N, K) = the
    // gates' gradient, g's experts += their weight gradients.
    int (*backward)(MoeParallel *mp, const LayerPass *p, const MoeWeights *w, MoeWeights *g, LayerActs *a,
                    LayerGradScratch *s, const float *dy, int N);
    // For a schedule of its own (the batched decode step, where every rank runs the same rows):
    // whether routed expert e is computed here, and the sum over the ranks of n floats, in rank
    // order, the same bits on every rank. Called by one thread.
    int (*holds)(const MoeParallel *mp, int e);
    int (*sum_rows)(MoeParallel *mp, float *x, long n, Error *err);
} MoeParallelOps;
struct MoeParallel {
    const MoeParallelOps *ops;
};

// How a pass runs. Inference fills one per call; training one per micro-batch.
struct LayerPass {
    Backend *be;
    const ModelConfig *c;
    int B, T, pos0;
    const float *rope_cos, *rope_sin;  // (T, rope/2) the new positions' angles, YaRN mscale folded in
    float softmax_scale;
    void *latent;      // (B, ld, kv_lora) the latent store of this layer (see above)
    void *kpe;         // (B, ld, rope)
    int ld;            // positions per sequence in a contiguous store (T in training)
    const int *blocks; // a paged store (inference, B = 1): its block table (KVCache), or NULL
    int block_size;
    DType store;       // the store's element type: DT_F32 (training: always), or DT_BF16
    AttnMode mode;     // plain: per-head keys and values expanded through kv_b_proj; absorbed: not
    int save;          // keep what the backward pass reads (training)
    int freeze_routing;   // reuse the route already in the acts (training's finite-difference checks)
    float seq_aux_alpha;  // α of the sequence-wise balance loss (0: not computed)
    const LinearRecipe *recipe;  // the linear layers' operand precision (training), NULL: fp32
    float *scratch;    // (threads, per_thread) attention scratch, see attn_scratch_floats
    size_t per_thread;
    MoeParallel *moe_parallel;  // the routed experts split over ranks, or NULL: all of them here
    int layer;                  // the layer's HF index (MTP module k: num_hidden_layers + k), for moe_parallel
};

// Per-thread floats attention needs for query chunks against up to S positions.
size_t attn_scratch_floats(const ModelConfig *c, int S);
// The attention call of a pass over one layer's store (its attention weights w): B sequences of T
// rows at pos0.
LatentAttention mla_attention_call(const LayerPass *p, const MlaWeights *w, const float *q, float *out,
                                   float *kv_save, float *probs_save);
// w's W_UKᵀ panels where this CPU reads them, else NULL (W_UK from kv_b_proj's rows).
const MatView *mla_w_uk_t(const MlaWeights *w);

// What one layer's forward writes. Training lays out one per layer and keeps them for the backward
// pass; inference lays one over its scratch, shared by every layer, where the residual stream is
// updated in place (x_in = x_mid = x_out) and the saved-only fields are NULL.
struct LayerActs {
    float *x_in;               // (N, d) residual stream entering the layer
    float *ln1, *ln1_rstd;     // (N, d), (N) input_layernorm
    float *qa;                 // (N, q_lora) q_a_proj output
    float *cq, *cq_rstd;       // (N, q_lora), (N) after q_a_layernorm (inference: qa itself, normed in place)
    float *q;                  // (N, H, nope + rope) per head [q_nope | q_pe], q_pe rotated
    float *kva;                // (N, kv_lora + rope) kv_a_proj_with_mqa output
    float *ckv_pre;            // (N, kv_lora) saved: the latent before kv_a_layernorm (or NULL)
    float *ckv_rstd;           // (N) saved
    float *kv;                 // (N, H, nope + v) saved: kv_b_proj output [k_nope | v] per head (plain)
    float *att;                // (B, H, T, T) saved: attention probabilities (pos0 = 0)
    float *ao;                 // (N, H, v) attention output (o_proj input)
    float *y;                  // (N, d) a sub-layer's output before the residual add
    float *x_mid;              // (N, d) residual stream after attention
    float *ln2, *ln2_rstd;     // (N, d), (N) post_attention_layernorm
    float *ffn_gate, *ffn_up, *ffn_h;  // (N, F) the dense FFN, or the shared experts of a MoE layer
    // the MoE seam: route → dispatch → experts → combine
    float *router;             // (N, N_r) router outputs
    float *scores;             // (N, N_r) sigmoid / softmax scores
    int *topk_idx;             // (N, K_r) chosen experts
    float *topk_w;             // (N, K_r) their gating weights
    int *slot_of;              // (N, K_r) slot of choice (t, k) in the expert-sorted order
    int *slot_tk;              // (N·K_r) the choice t·K_r + k each slot serves
    int *slot_tk_token;        // (N·K_r) the token t each slot serves
    int *expert_off;           // (N_r + 1) each expert's slots
    float *xg;                 // (N·K_r, d) routed tokens' inputs gathered by slot
    float *e_gate, *e_up, *e_h;  // (N·K_r, moe_inter) routed experts' activations by slot
    float *e_out;              // (N·K_r, d) routed experts' outputs by slot
    float *bal_f;              // (B, N_r) saved: f_i of each sequence for the balance loss
    float *x_out;              // (N, d) residual stream leaving the layer
};

// Scratch of the backward pass of a layer, sized for N rows, shared by every layer.
struct LayerGradScratch {
    float *dln;               // (N, d) normed-input gradient
    float *dq;                // (N, H*qk)
    float *dqa, *dcq;         // (N, q_lora)
    float *dkv;               // (N, H*(nope + v))
    float *dckv, *dckv_pre;   // (N, kv_lora)
    float *dkpe;              // (N, rope)
    float *dkpe_heads;        // (B, H, T, rope) each head's share of dkpe
    float *dkva;              // (N, kv_lora + rope)
    float *dao;               // (N, H*v)
    float *dffn_gate, *dffn_up, *dffn_h;  // (N, F)
    float *de_out, *dxg;      // (N·K_r, d)
    float *de_gate, *de_up, *de_h;  // (N·K_r, moe_inter)
    float *dtopk_w;           // (N, K_r)
    float *dscores, *drouter; // (N, N_r)
};

// ---- ops ----

// v[0..2] = the FFN's gate, up and down projections (the order the experts ops take them in).
void ffn_views(const FfnWeights *f, const MatView **v);
// out (n, d) = down(silu(gate x) · up x) of x (n, d), width F; gate, up, h: (n, F) written.
int ffn_forward(Backend *be, const LinearRecipe *recipe, const FfnWeights *f, const float *x, float *gate, float *up, float *h, float *out,
                int n);
// dx (n, d) += ..., gf += ... from dout (n, d); dgate, dup, dh: (n, F) scratch.
int ffn_backward(Backend *be, const LinearRecipe *recipe, const FfnWeights *f, FfnWeights *gf, const float *dout, const float *x,
                 const float *gate, const float *up, const float *h, float *dx, float *dgate, float *dup, float *dh,
                 int n);

// x_mid = x_in + MLA(RMSNorm(x_in)), writing the new positions into the latent store.
int mla_forward(const LayerPass *p, const MlaWeights *w, const float *input_layernorm, LayerActs *a);
// dres (N, d): the gradient of x_mid on entry, of x_in on return.
int mla_backward(const LayerPass *p, const MlaWeights *w, MlaWeights *g, const float *input_layernorm,
                 float *dinput_layernorm, LayerActs *a, LayerGradScratch *s, float *dres);

// The MoE seam. moe_route (moe.h) picks each token's experts; moe_dispatch sorts the choices by
// expert (the tokens of each expert, in token order) and counts each expert's load; the experts
// run one product over their tokens; moe_combine adds the gated outputs back to their tokens. An
// expert-parallel all-to-all or FP8 dispatch goes between dispatch and experts, and between experts
// and combine.
int moe_route_rows(const LayerPass *p, const MoeWeights *w, LayerActs *a, int N);
void moe_dispatch(const ModelConfig *c, LayerActs *a, int N, long long *load);
int moe_experts_forward(const LayerPass *p, const MoeWeights *w, LayerActs *a, int N);
int moe_combine(const LayerPass *p, const LayerActs *a, float *y, int N);
// y (N, d) = shared experts + Σ_k g_k E_k(ln2), every token reaching its K_r experts (none
// dropped). load: (N_r) or NULL. *balance: the sequence-wise balance loss (0 when α = 0).
int moe_forward(const LayerPass *p, const MoeWeights *w, LayerActs *a, float *y, long long *load, double *balance);
// dln (N, d) += the MoE's input gradient from dy (N, d); balance_dloss weighs the balance loss.
int moe_backward(const LayerPass *p, const MoeWeights *w, MoeWeights *g, LayerActs *a, LayerGradScratch *s,
                 const float *dy, float balance_dloss);

// A decoder layer: x_out = x_mid + FFN(RMSNorm(x_mid)), x_mid = x_in + MLA(RMSNorm(x_in)).
// *balance: the layer's balance loss (0 for a dense layer or α = 0).
int layer_forward(const LayerPass *p, const LayerWeights *w, LayerActs *a, long long *load, double *balance);
// dres (N, d): the gradient of x_out on entry, of x_in on return. g: the layer's gradients.
int layer_backward(const LayerPass *p, const LayerWeights *w, LayerWeights *g, LayerActs *a, LayerGradScratch *s,
                   float *dres, float balance_dloss);

// The MTP module's input (SPEC §2.3): x (N, d) = eh_proj [enorm(emb) ; hnorm(h)], the embedding
// half first as in the released checkpoints. emb, h: (N, d); cat: (N, 2d) written;
// en_rstd, hn_rstd: (N) or NULL.
int mtp_input_forward(Backend *be, const LinearRecipe *recipe, const ModelConfig *c, const MtpWeights *w, const float *emb, const float *h,
                      float *cat, float *en_rstd, float *hn_rstd, float *x, int N);
// demb, dh (N, d) += ..., g += ... from dx (N, d); dcat: (N, 2d) scratch, den/dhn: (N, d) scratch.
int mtp_input_backward(Backend *be, const LinearRecipe *recipe, const ModelConfig *c, const MtpWeights *w, MtpWeights *g, const float *emb,
                       const float *h, const float *cat, const float *en_rstd, const float *hn_rstd, const float *dx,
                       float *dcat, float *den, float *dhn, float *demb, float *dh, int N);

#endif
