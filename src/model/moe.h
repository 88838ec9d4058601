// DeepSeekMoE routing (SPEC §2.2): which experts a token reaches, and with what weight.
#ifndef DSV3_MODEL_MOE_H
#define DSV3_MODEL_MOE_H

#include "model/config.h"

// logits: (N_r) router outputs W_g x for one token; bias: (N_r) e_score_correction_bias or NULL.
// scores: (N_r) scratch, filled with the scoring function's output s (sigmoid or softmax).
// idx, weight: (K_r) the chosen experts and their gating weights, ordered by selection score.
void moe_route(const ModelConfig *c, const float *logits, const float *bias, float *scores, int *idx, float *weight);
// The two halves of moe_route around the selection: scores (N_r) = sigmoid or softmax of logits;
// weight (K_r) = the gating weights of the experts idx (K_r) from the unbiased scores.
void moe_scores(const ModelConfig *c, const float *logits, float *scores);
void moe_gates(const ModelConfig *c, const float *scores, const int *idx, float *weight);

// Their backward passes (the selection is a discrete choice and is not differentiated):
// dlogits (N_r) += ∂L/∂logits from dscores (N_r)
void moe_scores_backward(float *dlogits, const float *dscores, const float *scores, int N_r, ScoringFunc f);
// dscores (N_r) += ... from dweight (K_r): w_k = rsf · s_{e_k} / Σ_j s_{e_j} with norm_topk_prob,
// else rsf · s_{e_k}
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
