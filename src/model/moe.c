#include <math.h>

#include "kernels/ops.h"
#include "model/moe.h"

// Index of the largest v[i] with allowed[i]; ties go to the lowest index, like a stable top-k.
static int argmax_masked(const float *v, const unsigned char *allowed, int n) {
    int best = -1;
    for (int i = 0; i < n; i++)
        if (allowed[i] && (best < 0 || v[i] > v[best])) best = i;
    return best;
}

void moe_route(const ModelConfig *c, const float *logits, const float *bias, float *scores, int *idx, float *weight) {
    int N = c->n_routed_experts, K = c->num_experts_per_tok, G = c->n_group, per = N / G;
    if (c->scoring_func == SCORING_SIGMOID) {
        for (int i = 0; i < N; i++) scores[i] = sigmoidf_(logits[i]);
    } else {
        for (int i = 0; i < N; i++) scores[i] = logits[i];
        softmax_inplace(scores, N);
    }
    // selection scores: the bias only steers selection; the gate weights use the unbiased score
    float sel[N];
    unsigned char allowed[N];
    for (int i = 0; i < N; i++) {
        sel[i] = scores[i] + (c->topk_method == TOPK_NOAUX_TC && bias ? bias[i] : 0.0f);
        allowed[i] = 1;
    }
    if (c->topk_method != TOPK_GREEDY && G > 1) {
        float gscore[G];
        unsigned char gkeep[G];
        for (int g = 0; g < G; g++) {
            const float *s = sel + g * per;
            if (c->topk_method == TOPK_NOAUX_TC) {  // sum of the two best in the group
                int a = 0;
                for (int i = 1; i < per; i++)
                    if (s[i] > s[a]) a = i;
                int b = a == 0 ? 1 : 0;
                for (int i = 0; i < per; i++)
                    if (i != a && s[i] > s[b]) b = i;
                gscore[g] = s[a] + s[b];
            } else {  // group_limited_greedy: the best in the group
                float m = s[0];
                for (int i = 1; i < per; i++) m = s[i] > m ? s[i] : m;
                gscore[g] = m;
            }
            gkeep[g] = 0;
        }
        unsigned char gfree[G];
        for (int g = 0; g < G; g++) gfree[g] = 1;
        for (int k = 0; k < c->topk_group; k++) {
            int g = argmax_masked(gscore, gfree, G);
            gkeep[g] = 1;
            gfree[g] = 0;
        }
        for (int i = 0; i < N; i++) allowed[i] = gkeep[i / per];
    }
    float sum = 0;
    for (int k = 0; k < K; k++) {
        int e = argmax_masked(sel, allowed, N);
        allowed[e] = 0;
        idx[k] = e;
        weight[k] = scores[e];
        sum += scores[e];
    }
    float norm = c->norm_topk_prob ? 1.0f / (sum + 1e-20f) : 1.0f;
    for (int k = 0; k < K; k++) weight[k] *= norm * c->routed_scaling_factor;
}
