// DeepSeekMoE routing (SPEC §2.2): which experts a token reaches, and with what weight.
#ifndef DSV3_MODEL_MOE_H
#define DSV3_MODEL_MOE_H

#include "model/config.h"

// logits: (N_r) router outputs W_g x for one token; bias: (N_r) e_score_correction_bias or NULL.
// scores: (N_r) scratch, filled with the scoring function's output s (sigmoid or softmax).
// idx, weight: (K_r) the chosen experts and their gating weights, ordered by selection score.
void moe_route(const ModelConfig *c, const float *logits, const float *bias, float *scores, int *idx, float *weight);

#endif
