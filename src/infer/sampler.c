#include <math.h>
#include <stdlib.h>

#include "infer/sampler.h"

int sampler_init(Sampler *s, int vocab, float temperature, int top_k, float top_p, unsigned long long seed) {
    s->temperature = temperature;
    s->top_k = top_k;
    s->top_p = top_p;
    s->vocab = vocab;
    rng_seed(&s->rng, seed);
    s->probs = malloc(sizeof(float) * vocab);
    s->order = malloc(sizeof(int) * vocab);
    if (!s->probs || !s->order) {
        sampler_free(s);
        return -1;
    }
    return 0;
}

void sampler_free(Sampler *s) {
    free(s->probs);
    free(s->order);
    s->probs = NULL;
    s->order = NULL;
}

int argmax_f32(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

static const float *sort_probs;
static int by_prob_desc(const void *a, const void *b) {
    float x = sort_probs[*(const int *)a], y = sort_probs[*(const int *)b];
    if (x != y) return x < y ? 1 : -1;
    return *(const int *)a - *(const int *)b;
}

int sampler_distribution(Sampler *s, const float *logits) {
    int V = s->vocab;
    float m = logits[argmax_f32(logits, V)];
    double sum = 0;
    for (int i = 0; i < V; i++) {
        s->probs[i] = expf((logits[i] - m) / s->temperature);
        sum += s->probs[i];
    }
    for (int i = 0; i < V; i++) s->probs[i] = (float)(s->probs[i] / sum);
    int n = V;
    for (int i = 0; i < V; i++) s->order[i] = i;
    if ((s->top_k > 0 && s->top_k < V) || s->top_p < 1) {
        sort_probs = s->probs;
        qsort(s->order, V, sizeof(int), by_prob_desc);
        if (s->top_k > 0 && s->top_k < n) n = s->top_k;
        if (s->top_p < 1) {
            // p is measured against the top-k set renormalised, as HF transformers, vLLM and
            // llama.cpp apply the two filters one after the other
            double kept = 0, c = 0;
            for (int i = 0; i < n; i++) kept += s->probs[s->order[i]];
            for (int i = 0; i < n; i++) {
                c += s->probs[s->order[i]];
                if (c >= s->top_p * kept) {
                    n = i + 1;
                    break;
                }
            }
        }
    }
    return n;
}

double sampler_prob(const Sampler *s, int n, int id) {
    double total = 0, p = 0;
    for (int i = 0; i < n; i++) {
        total += s->probs[s->order[i]];
        if (s->order[i] == id) p = s->probs[id];
    }
    return total > 0 ? p / total : 0;
}

int sampler_draw(Sampler *s, int n, int exclude) {
    double total = 0;
    for (int i = 0; i < n; i++)
        if (s->order[i] != exclude) total += s->probs[s->order[i]];
    double u = rng_uniform(&s->rng) * total, c = 0;
    int last = -1;
    for (int i = 0; i < n; i++) {
        if (s->order[i] == exclude) continue;
        c += s->probs[s->order[i]];
        last = s->order[i];
        if (u < c) return last;
    }
    return last >= 0 ? last : s->order[0];
}

double sampler_uniform(Sampler *s) { return rng_uniform(&s->rng); }

int sampler_sample(Sampler *s, const float *logits) {
    if (s->temperature <= 0) return argmax_f32(logits, s->vocab);
    return sampler_draw(s, sampler_distribution(s, logits), -1);
}
