// Causal attention of one query against a cache, for decoding: the keys of a position are the
// concatenation of two arrays (k1 | k2) and its value is a row of v. MLA's absorbed decode uses
// k1 = v = the cached latents and k2 = the rotary keys; plain attention uses k1 = the no-rope
// keys and v the values. Vectorised loops, chosen per ISA at load time (target_clones).
#ifndef DSV3_KERNELS_ATTENTION_H
#define DSV3_KERNELS_ATTENTION_H

// out (dv) = Σ_j softmax_j((q1·k1[j] + q2·k2[j]) * scale) v[j] over j < S.
// q1: (d1)  q2: (d2)  k1: (S, ld1)  k2: (S, d2)  v: (S, ldv)  scores: (S) scratch
void attention_one_query(float *out, const float *q1, const float *q2, const float *k1, int d1, int ld1,
                         const float *k2, int d2, const float *v, int dv, int ldv, int S, float scale,
                         float *scores);

#endif
