// The operations of the training forward and backward passes over fp32 buffers, each a
// *_forward / *_backward pair. Big products go through cblas_sgemm over all batch×sequence rows at
// once (called from serial code: OpenBLAS threads them itself); row-wise and element-wise work is
// split over OpenMP threads in fixed chunks, so a result never depends on scheduling.
//
// Backward passes ACCUMULATE into their gradient outputs (+=); the caller zeroes once per step.
#ifndef DSV3_TRAIN_TRAIN_OPS_H
#define DSV3_TRAIN_TRAIN_OPS_H

#include <stddef.h>

#include "model/config.h"

// A linear layer y = x Wᵀ (HF layout W[out][in]).
// out: (N, OC)   inp: (N, C)   weight: (OC, C)
void linear_forward(float *out, const float *inp, const float *weight, int N, int C, int OC);
// dinp (N, C) += dout W (skipped when dinp is NULL);  dweight (OC, C) += doutᵀ inp
void linear_backward(float *dinp, float *dweight, const float *dout, const float *inp, const float *weight, int N,
                     int C, int OC);

// RMSNorm over rows, threaded (kernels/ops.h does the arithmetic).
// out, inp: (N, C)   weight: (C)   rstd: (N)
void rmsnorm_rows_forward(float *out, float *rstd, const float *inp, const float *weight, int N, int C, float eps);
// dinp += ..., dweight += ...; dweight is summed over rows in a fixed order (per-thread partials
// added in thread order), so it is bit-reproducible for a given thread count.
void rmsnorm_rows_backward(float *dinp, float *dweight, const float *dout, const float *inp, const float *weight,
                           const float *rstd, int N, int C);

// SwiGLU, threaded: h = silu(gate) · up.  h, gate, up: (n)
void swiglu_rows_forward(float *h, const float *gate, const float *up, long n);
// dgate, dup (n) from dh (n): overwritten, like kernels/ops.h's swiglu_backward
void swiglu_rows_backward(float *dgate, float *dup, const float *dh, const float *gate, const float *up, long n);

// RoPE tables for positions 0..T-1: cos_t, sin_t: (T, r/2), the YaRN cos/sin factor folded in. The
// values are those kernels/ops.h's rope_forward computes, so training and inference rotate alike.
void rope_table(float *cos_t, float *sin_t, int T, int r, const double *inv_freq, float mscale);
// Rotates interleaved pairs of N rows × heads vectors of width r in place; row n sits at position
// n % T. Vector (n, h) starts at x + (n * heads + h) * stride.
void rope_rows_forward(float *x, int N, int T, int heads, int stride, int r, const float *cos_t, const float *sin_t);
// dx ← Rᵀ dx, the same layout (the gradient of a rotation is the transposed rotation).
void rope_rows_backward(float *dx, int N, int T, int heads, int stride, int r, const float *cos_t,
                        const float *sin_t);

// Causal MLA attention over B sequences of T tokens: per head the key is [k_nope | k_pe] with one
// rotary key per token shared by every head (SPEC §2.1), the value comes from kv_b_proj.
// q: (B*T, H, nope + r)   kv: (B*T, H, nope + v) [k_nope | v]   kpe: (B*T, r)
// att: (B, H, T, T) softmax probabilities, saved (the upper triangle holds 0)   out: (B*T, H, v)
void mla_attention_forward(float *out, float *att, const float *q, const float *kv, const float *kpe, int B, int T,
                           int H, int nope, int r, int v, float scale);
// dq, dkv, dkpe += ...;  scratch: dkpe_heads (B, H, T, r), datt (B, H, T, T)
void mla_attention_backward(float *dq, float *dkv, float *dkpe, float *dkpe_heads, float *datt, const float *dout,
                            const float *att, const float *q, const float *kv, const float *kpe, int B, int T, int H,
                            int nope, int r, int v, float scale);

// Cross-entropy of N rows of logits (N, V) against targets (N): lse (N) saves each row's
// log-sum-exp; losses (N) gets −log p(target). Returns Σ losses in double.
double crossentropy_forward(float *losses, float *lse, const float *logits, const int *targets, int N, int V);
// In place: logits (N, V) become dlogits = (softmax − onehot) · dloss (the loss's weight per row).
void crossentropy_backward(float *logits, const float *lse, const int *targets, int N, int V, float dloss);

// The router scores s are sigmoid or softmax of the router outputs (moe_route computes them).
// dlogits (N_r) += ∂L/∂logits from dscores (N_r)
void moe_scores_backward(float *dlogits, const float *dscores, const float *scores, int N_r, ScoringFunc f);
// The chosen experts' gating weights as a function of the scores, the selection held fixed (it
// is a discrete choice and is not differentiated): w_k = rsf · s_{e_k} / Σ_j s_{e_j} with
// norm_topk_prob, else rsf · s_{e_k} (moe_route computes the forward). dscores (N_r) += ... from
// dweight (K_r).
void moe_gate_backward(float *dscores, const float *dweight, const float *scores, const int *idx,
                       const ModelConfig *c);

// The complementary sequence-wise balance loss of one sequence of T tokens (SPEC §2.4):
// α Σ_i f_i P_i with f_i = N_r/(K_r T) Σ_t 1[i chosen for t] (a constant) and
// P_i = (1/T) Σ_t s_{i,t} / Σ_j s_{j,t}.   scores: (T, N_r)   idx: (T, K_r)   f: (N_r) saved
double moe_balance_forward(float *f, const float *scores, const int *idx, int T, int N_r, int K_r, float alpha);
// dscores (T, N_r) += ∂(dloss · loss)/∂s
void moe_balance_backward(float *dscores, const float *f, const float *scores, int T, int N_r, float alpha,
                          float dloss);

#endif
