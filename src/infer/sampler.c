#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "infer/sampler.h"
#include "kernels/ops.h"

int sampler_init(Sampler *s, int vocab, float temperature, int top_k, float top_p, unsigned long long seed) {
    memset(s, 0, sizeof *s);
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

int sampler_set_filters(Sampler *s, float min_p, float presence_penalty, float frequency_penalty) {
    s->min_p = min_p;
    s->presence_penalty = presence_penalty;
    s->frequency_penalty = frequency_penalty;
    if ((presence_penalty != 0 || frequency_penalty != 0) && !s->counts) {
        s->counts = calloc(s->vocab, sizeof(int));
        if (!s->counts) return -1;
    }
    if (s->counts && !s->penalised && !(s->penalised = malloc(sizeof(float) * s->vocab))) return -1;
    return 0;
}

int sampler_set_bias(Sampler *s, const int *ids, const float *bias, int n) {
    if (n <= 0) return 0;
    if (!s->bias && !(s->bias = calloc(s->vocab, sizeof(float)))) return -1;
    if (!s->penalised && !(s->penalised = malloc(sizeof(float) * s->vocab))) return -1;
    for (int i = 0; i < n; i++)
        if (ids[i] >= 0 && ids[i] < s->vocab) s->bias[ids[i]] = bias[i];
    return 0;
}

int sampler_adjusts(const Sampler *s) { return s->penalised != NULL; }

void sampler_free(Sampler *s) {
    free(s->probs);
    free(s->order);
    free(s->counts);
    free(s->bias);
    free(s->penalised);
    s->probs = NULL;
    s->order = NULL;
    s->counts = NULL;
    s->bias = NULL;
    s->penalised = NULL;
}

void sampler_accept(Sampler *s, int token) {
    if (s->counts && token >= 0 && token < s->vocab) s->counts[token]++;
}

static const float *sort_probs;
static int by_prob_desc(const void *a, const void *b) {
    float x = sort_probs[*(const int *)a], y = sort_probs[*(const int *)b];
    if (x != y) return x < y ? 1 : -1;
    return *(const int *)a - *(const int *)b;
}

// The logits the filters see: plus the bias, less the penalties, when either is set (into
// s->penalised).
static const float *penalise(Sampler *s, const float *logits) {
    if (!s->penalised) return logits;
    for (int i = 0; i < s->vocab; i++) {
        float v = s->bias ? logits[i] + s->bias[i] : logits[i];
        int c = s->counts ? s->counts[i] : 0;
        s->penalised[i] = c ? v - s->presence_penalty - s->frequency_penalty * (float)c : v;
    }
    return s->penalised;
}

int sampler_distribution(Sampler *s, const float *logits) {
    int V = s->vocab;
    logits = penalise(s, logits);
    float m = logits[argmax_f32(logits, V)];
    double sum = 0;
    for (int i = 0; i < V; i++) {
        s->probs[i] = expf((logits[i] - m) / s->temperature);
        sum += s->probs[i];
    }
    for (int i = 0; i < V; i++) s->probs[i] = (float)(s->probs[i] / sum);
    int n = V;
    for (int i = 0; i < V; i++) s->order[i] = i;
    if ((s->top_k > 0 && s->top_k < V) || s->top_p < 1 || s->min_p > 0) {
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
        if (s->min_p > 0) {
            // relative to the most probable id, so renormalising after top-k / top-p changes nothing
            float floor = s->min_p * s->probs[s->order[0]];
            int keep = 1;
            while (keep < n && s->probs[s->order[keep]] >= floor) keep++;
            n = keep;
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
    if (s->temperature <= 0) return argmax_f32(penalise(s, logits), s->vocab);
    return sampler_draw(s, sampler_distribution(s, logits), -1);
}
