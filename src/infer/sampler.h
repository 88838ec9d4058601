// Choosing the next token from logits. The logits first take their bias (OpenAI's logit_bias,
// added to the logit of an id) and are penalised for the tokens this sampler has emitted (OpenAI's
// and vLLM's definition: logit − presence·[count > 0] − frequency·count, the counts over generated
// tokens only; sampler_accept counts one); then greedy at temperature 0,
// otherwise temperature, top-k, top-p (nucleus) and min-p filtering — top-p over the top-k set
// renormalised, as HF transformers, vLLM and llama.cpp chain them; min-p keeps the ids whose
// probability is at least min_p times the largest — then a draw from a seeded generator.
#ifndef DSV3_INFER_SAMPLER_H
#define DSV3_INFER_SAMPLER_H

#include "base/rng.h"

typedef struct Sampler {
    float temperature;  // 0: greedy
    int top_k;          // 0: off
    float top_p;        // 1: off
    float min_p;        // 0: off
    float presence_penalty, frequency_penalty;  // 0: off
    Rng rng;
    int vocab;
    float *probs;       // (vocab) scratch
    int *order;         // (vocab) scratch
    int *counts;        // (vocab) times each id was accepted; only while a penalty is set
    float *bias;        // (vocab) added to each logit; only when a bias is set
    float *penalised;   // (vocab) scratch: the logits biased and penalised; only when either is set
} Sampler;

int sampler_init(Sampler *s, int vocab, float temperature, int top_k, float top_p, unsigned long long seed);
// min_p in [0, 1]; the penalties in [-2, 2] as OpenAI allows. Returns -1 when memory runs out.
int sampler_set_filters(Sampler *s, float min_p, float presence_penalty, float frequency_penalty);
// bias[i] is added to the logit of ids[i] from now on (ids outside the vocabulary are ignored; the
// caller checks them). Returns -1 when memory runs out.
int sampler_set_bias(Sampler *s, const int *ids, const float *bias, int n);
// Whether the logits are changed before the choice (a bias or a penalty): greedy then is not the
// logits' own argmax.
int sampler_adjusts(const Sampler *s);
void sampler_free(Sampler *s);
// The token emitted after a sample: the penalties count it.
void sampler_accept(Sampler *s, int token);
// logits: (vocab); returns the chosen id (at temperature 0 the argmax of the penalised logits).
int sampler_sample(Sampler *s, const float *logits);
// The pieces of a draw at temperature > 0, for speculative sampling: sampler_distribution keeps
// the distribution the draw is from (the n ids it returns, s->order[0 .. n)); sampler_prob is
// p(id) in it; sampler_draw draws from it, leaving out `exclude` (-1: none) and renormalising
// (the residual distribution of a rejected greedy draft); sampler_uniform is a draw from [0, 1).
int sampler_distribution(Sampler *s, const float *logits);
double sampler_prob(const Sampler *s, int n, int id);
int sampler_draw(Sampler *s, int n, int exclude);
double sampler_uniform(Sampler *s);

#endif
