// Choosing the next token from logits: greedy at temperature 0, otherwise temperature, top-k and
// top-p (nucleus) filtering — top-p over the top-k set renormalised, as HF transformers, vLLM and
// llama.cpp chain them — then a draw from a seeded generator.
#ifndef DSV3_INFER_SAMPLER_H
#define DSV3_INFER_SAMPLER_H

#include "base/rng.h"

typedef struct Sampler {
    float temperature;  // 0: greedy
    int top_k;          // 0: off
    float top_p;        // 1: off
    Rng rng;
    int vocab;
    float *probs;       // (vocab) scratch
    int *order;         // (vocab) scratch
} Sampler;

int sampler_init(Sampler *s, int vocab, float temperature, int top_k, float top_p, unsigned long long seed);
void sampler_free(Sampler *s);
// logits: (vocab); returns the chosen id.
int sampler_sample(Sampler *s, const float *logits);
// The pieces of a draw at temperature > 0, for speculative sampling: sampler_distribution keeps
// the distribution the draw is from (the n ids it returns, s->order[0 .. n)); sampler_prob is
// p(id) in it; sampler_draw draws from it, leaving out `exclude` (-1: none) and renormalising
// (the residual distribution of a rejected greedy draft); sampler_uniform is a draw from [0, 1).
int sampler_distribution(Sampler *s, const float *logits);
double sampler_prob(const Sampler *s, int n, int id);
int sampler_draw(Sampler *s, int n, int exclude);
double sampler_uniform(Sampler *s);
// The id of the largest logit (the lowest id on ties).
int argmax_f32(const float *x, int n);

#endif
