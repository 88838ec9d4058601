// DeepSeekMoE routing (moe_route, SPEC §2.2) against its definition, on hand-built configurations:
//   scores      s = sigmoid(logits) or softmax(logits)
//   selection   s + e_score_correction_bias under noaux_tc (the bias only steers selection), s otherwise
//   groups      noaux_tc: a group's score is the sum of its two best selection scores;
//               group_limited_greedy: its best; the topk_group best groups are kept; greedy and
//               n_group 1 keep every expert
//   experts     the K best selection scores among the kept experts, in order of selection score
//   weights     the unbiased s of each, divided by their sum when norm_topk_prob, times
//               routed_scaling_factor
//   ties        go to the lowest index (of expert, and of group)
// The reference below computes this plainly in double, by sorting (not by the engine's repeated
// argmax), and is checked against the engine on many random configurations and on small cases
// built so that each rule decides the outcome.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/rng.h"
#include "model/config.h"
#include "model/moe.h"
#include "test.h"

#define MAX_E 64

static ModelConfig route_config(int N, int K, int G, int topk_group, TopkMethod method, ScoringFunc f, int norm,
                                float factor) {
    ModelConfig c;
    memset(&c, 0, sizeof c);
    c.n_routed_experts = N;
    c.num_experts_per_tok = K;
    c.n_group = G;
    c.topk_group = topk_group;
    c.topk_method = method;
    c.scoring_func = f;
    c.norm_topk_prob = norm;
    c.routed_scaling_factor = factor;
    return c;
}

// Sorting by value, larger first, the lower index first among equals.
static const double *g_key;
static int by_key_desc(const void *a, const void *b) {
    int i = *(const int *)a, j = *(const int *)b;
    if (g_key[i] != g_key[j]) return g_key[i] > g_key[j] ? -1 : 1;
    return i - j;
}

static void sort_desc(int *order, const double *key, int n) {
    for (int i = 0; i < n; i++) order[i] = i;
    g_key = key;
    qsort(order, n, sizeof(int), by_key_desc);
}

// The definition in the header comment. margin: the smallest gap between two values whose order
// decides the outcome (kept groups against the next, the chosen experts among themselves and
// against the next); a random case closer than float rounding to a tie is not used.
static void reference_route(const ModelConfig *c, const float *logits, const float *bias, double *s, int *idx,
                            double *weight, double *margin) {
    int N = c->n_routed_experts, K = c->num_experts_per_tok, G = c->n_group, per = N / G;
    if (c->scoring_func == SCORING_SIGMOID) {
        for (int i = 0; i < N; i++) s[i] = 1 / (1 + exp(-(double)logits[i]));
    } else {
        double mx = logits[0], sum = 0;
        for (int i = 1; i < N; i++) mx = fmax(mx, logits[i]);
        for (int i = 0; i < N; i++) sum += s[i] = exp((double)logits[i] - mx);
        for (int i = 0; i < N; i++) s[i] /= sum;
    }
    double sel[MAX_E];
    for (int i = 0; i < N; i++) sel[i] = s[i] + (c->topk_method == TOPK_NOAUX_TC && bias ? bias[i] : 0);
    int kept[MAX_E];
    for (int i = 0; i < N; i++) kept[i] = 1;
    *margin = INFINITY;
    if (c->topk_method != TOPK_GREEDY && G > 1) {
        double gscore[MAX_E];
        int order[MAX_E], gorder[MAX_E];
        for (int g = 0; g < G; g++) {
            sort_desc(order, sel + g * per, per);
            gscore[g] = c->topk_method == TOPK_NOAUX_TC ? sel[g * per + order[0]] + sel[g * per + order[1]]
                                                        : sel[g * per + order[0]];
        }
        sort_desc(gorder, gscore, G);
        for (int r = 0; r < G; r++)
            for (int i = 0; i < per; i++) kept[gorder[r] * per + i] = r < c->topk_group;
        if (c->topk_group < G) *margin = gscore[gorder[c->topk_group - 1]] - gscore[gorder[c->topk_group]];
    }
    double key[MAX_E];
    int order[MAX_E], n = 0;
    for (int i = 0; i < N; i++) key[i] = kept[i] ? sel[i] : -INFINITY;
    sort_desc(order, key, N);
    for (int i = 0; i < N; i++) n += kept[i];
    for (int k = 0; k + 1 < K + (n > K) && k + 1 < N; k++) *margin = fmin(*margin, key[order[k]] - key[order[k + 1]]);
    double sum = 0;
    for (int k = 0; k < K; k++) {
        idx[k] = order[k];
        weight[k] = s[order[k]];
        sum += weight[k];
    }
    for (int k = 0; k < K; k++) weight[k] = weight[k] / (c->norm_topk_prob ? sum : 1) * c->routed_scaling_factor;
}

// moe_route against the reference: the same experts in the same order, scores and weights to
// float precision. Returns 0 or fills why.
static int check_route(const ModelConfig *c, const float *logits, const float *bias, char *why, size_t n) {
    int N = c->n_routed_experts, K = c->num_experts_per_tok;
    float scores[MAX_E], weight[MAX_E];
    int idx[MAX_E];
    double rs[MAX_E], rw[MAX_E], margin;
    int ridx[MAX_E];
    moe_route(c, logits, bias, scores, idx, weight);
    reference_route(c, logits, bias, rs, ridx, rw, &margin);
    for (int i = 0; i < N; i++)
        if (!(fabs(scores[i] - rs[i]) <= 1e-6 * fabs(rs[i]) + 1e-12))
            return snprintf(why, n, "score %d: %.9g, reference %.9g", i, scores[i], rs[i]), -1;
    for (int k = 0; k < K; k++) {
        if (idx[k] != ridx[k]) {
            int l = snprintf(why, n, "choice %d: expert %d, reference %d (experts", k, idx[k], ridx[k]);
            for (int j = 0; j < K && l < (int)n; j++) l += snprintf(why + l, n - l, " %d/%d", idx[j], ridx[j]);
            snprintf(why + l, n - l > 0 ? n - l : 0, ")");
            return -1;
        }
        if (!(fabs(weight[k] - rw[k]) <= 2e-6 * fabs(rw[k]) + 1e-12))
            return snprintf(why, n, "weight %d (expert %d): %.9g, reference %.9g", k, idx[k], weight[k], rw[k]), -1;
    }
    return 0;
}

static const char *method_name(TopkMethod m) {
    return m == TOPK_NOAUX_TC ? "noaux_tc" : m == TOPK_GREEDY ? "greedy" : "group_limited_greedy";
}

// Random configurations of every method and scoring function, group counts 1..8, with and without
// the bias, normalisation and scaling: the engine routes as the definition says.
TEST(test_moe_route_matches_definition_random) {
    Rng rng;
    rng_seed(&rng, 11);
    const int Ns[] = {8, 16, 32, 64};
    int done = 0, tries = 0;
    while (done < 4000 && tries < 20000) {
        tries++;
        int N = Ns[rng_next(&rng) % 4];
        int Gs[] = {1, 2, 4, 8};
        int G = Gs[rng_next(&rng) % 4];
        TopkMethod method = (TopkMethod)(rng_next(&rng) % 3);
        ScoringFunc f = (ScoringFunc)(rng_next(&rng) % 2);
        int per = N / G, tg = 1 + (int)(rng_next(&rng) % G);
        if (method == TOPK_NOAUX_TC && G > 1 && per < 2) continue;  // config_load refuses it: no top two
        int maxK = method == TOPK_GREEDY || G == 1 ? N : tg * per;
        int K = 1 + (int)(rng_next(&rng) % (maxK < 8 ? maxK : 8));
        ModelConfig c = route_config(N, K, G, tg, method, f, (int)(rng_next(&rng) % 2),
                                     rng_next(&rng) % 2 ? 1.0f : 0.5f + 3 * rng_uniform(&rng));
        float logits[MAX_E], bias[MAX_E];
        double scale = f == SCORING_SOFTMAX ? 3 : 2;
        for (int i = 0; i < N; i++) {
            logits[i] = (float)(scale * rng_normal(&rng));
            bias[i] = 0.2f * rng_normal(&rng);
        }
        const float *b = rng_next(&rng) % 4 ? bias : NULL;
        double rs[MAX_E], rw[MAX_E], margin;
        int ridx[MAX_E];
        reference_route(&c, logits, b, rs, ridx, rw, &margin);
        if (margin < 1e-5) continue;  // closer to a tie than float rounding can resolve
        char why[512];
        CHECK_MSG(check_route(&c, logits, b, why, sizeof why) == 0,
                  "%s, %s, N %d, K %d, %d groups keep %d, norm %d, factor %g, bias %s: %s", method_name(method),
                  f == SCORING_SIGMOID ? "sigmoid" : "softmax", N, K, G, tg, c.norm_topk_prob,
                  c.routed_scaling_factor, b ? "yes" : "no", why);
        done++;
    }
    CHECK_MSG(done == 4000, "only %d usable random cases in %d", done, tries);
}

// The bias steers which experts are chosen, but their weights come from the unbiased scores.
TEST(test_moe_route_noaux_tc_bias_steers_selection_not_weights) {
    ModelConfig c = route_config(4, 2, 1, 1, TOPK_NOAUX_TC, SCORING_SIGMOID, 0, 1.0f);
    float logits[4] = {2.0f, 1.0f, 0.0f, -1.0f}, bias[4] = {0, 0, 0, 3.0f};
    float scores[4], w[2];
    int idx[2];
    moe_route(&c, logits, NULL, scores, idx, w);
    CHECK(idx[0] == 0 && idx[1] == 1);
    moe_route(&c, logits, bias, scores, idx, w);
    // expert 3: sigmoid(-1) + 3 = 3.27 beats expert 0's 0.88; its weight is sigmoid(-1) alone
    CHECK_MSG(idx[0] == 3 && idx[1] == 0, "chose %d, %d", idx[0], idx[1]);
    CHECK_NEAR(w[0], 1 / (1 + exp(1.0)), 1e-7);
    CHECK_NEAR(w[1], 1 / (1 + exp(-2.0)), 1e-7);
    CHECK_NEAR(scores[3], 1 / (1 + exp(1.0)), 1e-7);  // the scores handed back are unbiased too
    // the bias counts only under noaux_tc
    c.topk_method = TOPK_GREEDY;
    moe_route(&c, logits, bias, scores, idx, w);
    CHECK(idx[0] == 0 && idx[1] == 1);
}

// noaux_tc scores a group by the sum of its two best experts, so a group with one strong expert
// loses to a group with two good ones; group_limited_greedy scores by the best alone and keeps
// the other. Experts outside the kept groups are never chosen, even above every kept one.
TEST(test_moe_route_group_scores_top2_sum_vs_max) {
    // group 0: one strong expert (logit 3) and weak ones; group 1: two good ones (logit 2)
    float logits[8] = {3.0f, -3.0f, -3.0f, -3.0f, 2.0f, 2.0f, -3.0f, -3.0f};
    float scores[8], w[2];
    int idx[2];
    ModelConfig c = route_config(8, 2, 2, 1, TOPK_NOAUX_TC, SCORING_SIGMOID, 1, 1.0f);
    moe_route(&c, logits, NULL, scores, idx, w);
    // top-2 sums: 0.953 + 0.047 = 1.00 against 0.881 + 0.881 = 1.76: group 1, without expert 0
    CHECK_MSG(idx[0] == 4 && idx[1] == 5, "noaux_tc chose %d, %d", idx[0], idx[1]);
    CHECK_NEAR(w[0], 0.5, 1e-7);
    c = route_config(8, 2, 2, 1, TOPK_GROUP_LIMITED_GREEDY, SCORING_SOFTMAX, 0, 1.0f);
    moe_route(&c, logits, NULL, scores, idx, w);
    // the best in each: 3 against 2: group 0, whose second best is an expert of logit -3
    CHECK_MSG(idx[0] == 0 && idx[1] == 1, "group_limited_greedy chose %d, %d", idx[0], idx[1]);
    // greedy ignores the groups
    c.topk_method = TOPK_GREEDY;
    moe_route(&c, logits, NULL, scores, idx, w);
    CHECK_MSG(idx[0] == 0 && idx[1] == 4, "greedy chose %d, %d", idx[0], idx[1]);
}

// topk_group groups are kept: with 4 groups keeping 2, the experts come from the two best groups
// only; the bias moves a group in or out.
TEST(test_moe_route_keeps_topk_group_groups) {
    float logits[8] = {1.0f, 0.9f, 0.0f, 0.1f, 2.0f, -1.0f, 0.5f, 0.4f};  // groups of 2
    float bias[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    float scores[8], w[4];
    int idx[4];
    ModelConfig c = route_config(8, 4, 4, 2, TOPK_NOAUX_TC, SCORING_SIGMOID, 1, 2.5f);
    moe_route(&c, logits, bias, scores, idx, w);
    // group sums: g0 1.44, g1 1.05, g2 1.15, g3 1.22 → g0 and g3; expert 4 (the best) is in g2
    int want[4] = {0, 1, 6, 7};
    for (int k = 0; k < 4; k++) CHECK_MSG(idx[k] == want[k], "choice %d: %d, want %d", k, idx[k], want[k]);
    float sum = 0;
    for (int k = 0; k < 4; k++) sum += w[k];
    CHECK_NEAR(sum, 2.5, 1e-6);  // normalised, then scaled
    // a bias on expert 5 lifts g2's top-2 sum to 0.88 + (0.27 + 0.5) = 1.65: g2 and g0 now, and
    // by selection score 4 (0.88), 5 (0.77), 0 (0.73), 1 (0.71); expert 5 weighs its unbiased 0.27
    bias[5] = 0.5f;
    moe_route(&c, logits, bias, scores, idx, w);
    int want2[4] = {4, 5, 0, 1};
    for (int k = 0; k < 4; k++) CHECK_MSG(idx[k] == want2[k], "biased choice %d: %d, want %d", k, idx[k], want2[k]);
    double s[4] = {1 / (1 + exp(-2.0)), 1 / (1 + exp(1.0)), 1 / (1 + exp(-1.0)), 1 / (1 + exp(-0.9))};
    CHECK_NEAR(w[1], 2.5 * s[1] / (s[0] + s[1] + s[2] + s[3]), 1e-6);
}

// norm_topk_prob divides by the chosen scores' sum; routed_scaling_factor multiplies either way.
TEST(test_moe_route_norm_topk_prob_and_scaling) {
    float logits[4] = {1.0f, 0.5f, -0.5f, -2.0f};
    float scores[4], w[2];
    int idx[2];
    double s0 = 1 / (1 + exp(-1.0)), s1 = 1 / (1 + exp(-0.5));
    ModelConfig c = route_config(4, 2, 1, 1, TOPK_NOAUX_TC, SCORING_SIGMOID, 0, 1.0f);
    moe_route(&c, logits, NULL, scores, idx, w);
    CHECK_NEAR(w[0], s0, 1e-7);
    CHECK_NEAR(w[1], s1, 1e-7);
    c.routed_scaling_factor = 2.5f;
    moe_route(&c, logits, NULL, scores, idx, w);
    CHECK_NEAR(w[0], 2.5 * s0, 1e-6);
    c.norm_topk_prob = 1;
    moe_route(&c, logits, NULL, scores, idx, w);
    CHECK_NEAR(w[0], 2.5 * s0 / (s0 + s1), 1e-6);
    CHECK_NEAR(w[1], 2.5 * s1 / (s0 + s1), 1e-6);
    // softmax scores: the chosen ones' share of all experts' mass, renormalised or not
    c = route_config(4, 2, 1, 1, TOPK_GREEDY, SCORING_SOFTMAX, 0, 1.0f);
    double e[4], z = 0;
    for (int i = 0; i < 4; i++) z += e[i] = exp(logits[i]);
    moe_route(&c, logits, NULL, scores, idx, w);
    for (int i = 0; i < 4; i++) CHECK_NEAR(scores[i], e[i] / z, 1e-7);
    CHECK_NEAR(w[0], e[0] / z, 1e-7);
    c.norm_topk_prob = 1;
    moe_route(&c, logits, NULL, scores, idx, w);
    CHECK_NEAR(w[0] + w[1], 1.0, 1e-6);
    CHECK_NEAR(w[0], e[0] / (e[0] + e[1]), 1e-6);
}

// Ties go to the lowest index: among equal experts, and among equal groups.
TEST(test_moe_route_ties_go_to_lowest_index) {
    float flat[8] = {0};
    float scores[8], w[3];
    int idx[3];
    for (int m = 0; m < 3; m++) {
        ModelConfig c = route_config(8, 3, m == TOPK_GREEDY ? 1 : 4, 2, (TopkMethod)m, SCORING_SIGMOID, 1, 1.0f);
        moe_route(&c, flat, NULL, scores, idx, w);
        CHECK_MSG(idx[0] == 0 && idx[1] == 1 && idx[2] == 2, "%s: %d %d %d", method_name((TopkMethod)m), idx[0], idx[1],
                  idx[2]);
        CHECK_NEAR(w[0], 1.0 / 3, 1e-7);
    }
    // two equal pairs after a better one: the earlier of them first
    float pairs[8] = {0.5f, 1.0f, 0.5f, -1.0f, 1.0f, 0.5f, 0.0f, 0.0f};
    ModelConfig c = route_config(8, 3, 1, 1, TOPK_GREEDY, SCORING_SOFTMAX, 0, 1.0f);
    moe_route(&c, pairs, NULL, scores, idx, w);
    CHECK_MSG(idx[0] == 1 && idx[1] == 4 && idx[2] == 0, "%d %d %d", idx[0], idx[1], idx[2]);
    // equal groups: groups 1 and 3 tie for the one kept; group 1 wins
    float groups[8] = {-1.0f, -1.0f, 1.0f, 0.5f, -1.0f, -1.0f, 1.0f, 0.5f};
    c = route_config(8, 2, 4, 1, TOPK_NOAUX_TC, SCORING_SIGMOID, 0, 1.0f);
    moe_route(&c, groups, NULL, scores, idx, w);
    CHECK_MSG(idx[0] == 2 && idx[1] == 3, "%d %d", idx[0], idx[1]);
}
