// The sampler (src/infer/sampler.h) against the definitions of its filters:
//   temperature T > 0   p_i ∝ exp(logit_i / T); T = 0 is greedy: the argmax, the lowest id on ties
//   top-k               keep the k most probable ids (the lower id first among equals), 0 = off
//   top-p (nucleus)     keep the smallest set of most probable ids whose probability reaches p, 1 = off
// and the draw is from the kept ids with their probabilities renormalised. The target distribution
// is computed here in double, independently, and many seeded draws are compared with it by a
// chi-square statistic; every draw must also fall inside the kept set. The bound (the statistic's
// mean plus 6 standard deviations) does not flake, and the same draws measured against a slightly
// wrong distribution (temperature 10% off, one id too many or too few) fail it by far.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "infer/sampler.h"
#include "kernels/matmul.h"
#include "kernels/ops.h"
#include "test.h"

#define NV 10
#define DRAWS 200000

static const float LOGITS[NV] = {1.2f, 2.0f, -0.3f, 0.8f, 1.5f, 0.1f, -1.5f, 0.5f, -0.9f, 2.0f};

// Sorting by probability, larger first, the lower id first among equals.
static const double *g_p;
static int by_p_desc(const void *a, const void *b) {
    int i = *(const int *)a, j = *(const int *)b;
    if (g_p[i] != g_p[j]) return g_p[i] > g_p[j] ? -1 : 1;
    return i - j;
}

// The target distribution q (NV) of the filters above; returns how many ids are kept.
static int target(const float *logits, double T, int top_k, double top_p, double *q) {
    double p[NV], mx = logits[0], z = 0;
    for (int i = 1; i < NV; i++) mx = fmax(mx, logits[i]);
    for (int i = 0; i < NV; i++) z += p[i] = exp((logits[i] - mx) / T);
    for (int i = 0; i < NV; i++) p[i] /= z;
    int order[NV];
    for (int i = 0; i < NV; i++) order[i] = i;
    g_p = p;
    qsort(order, NV, sizeof(int), by_p_desc);
    int n = top_k > 0 && top_k < NV ? top_k : NV;
    if (top_p < 1) {  // against the top-k set renormalised
        double c = 0, topk = 0;
        for (int i = 0; i < n; i++) topk += p[order[i]];
        for (int i = 0; i < n; i++)
            if ((c += p[order[i]] / topk) >= top_p) {
                n = i + 1;
                break;
            }
    }
    double kept = 0;
    for (int i = 0; i < NV; i++) q[i] = 0;
    for (int i = 0; i < n; i++) kept += p[order[i]];
    for (int i = 0; i < n; i++) q[order[i]] = p[order[i]] / kept;
    return n;
}

// Pearson's chi-square of counts against q over the ids q keeps (ids expected fewer than 20 times
// pooled into one bin), infinite if an id q drops was drawn; *df: degrees of freedom.
static double chi_square(const long *count, const double *q, long draws, int *df) {
    double chi = 0, pool_e = 0, pool_o = 0;
    int bins = 0;
    for (int i = 0; i < NV; i++) {
        if (q[i] == 0 && count[i] > 0) chi = INFINITY;
        if (q[i] == 0) continue;
        double e = q[i] * draws;
        if (e < 20) {
            pool_e += e;
            pool_o += count[i];
            continue;
        }
        chi += (count[i] - e) * (count[i] - e) / e;
        bins++;
    }
    if (pool_e > 0) {
        chi += (pool_o - pool_e) * (pool_o - pool_e) / pool_e;
        bins++;
    }
    *df = bins - 1;
    return chi;
}

static double chi_bound(int df) { return df + 6 * sqrt(2.0 * df); }

// Draws DRAWS ids; returns the number that fell outside the ids q keeps.
static long draw(float T, int top_k, float top_p, unsigned long long seed, const double *q, long *count) {
    Sampler s;
    if (sampler_init(&s, NV, T, top_k, top_p, seed)) return -1;
    long outside = 0;
    memset(count, 0, sizeof(long) * NV);
    for (long d = 0; d < DRAWS; d++) {
        int id = sampler_sample(&s, LOGITS);
        if (id < 0 || id >= NV || q[id] == 0) {
            outside++;
            continue;
        }
        count[id]++;
    }
    sampler_free(&s);
    return outside;
}

// One setting: every draw is kept, the frequencies fit the target, and they do not fit `wrong`
// (a distribution the sampler must not be drawing from).
static void check_setting(const char *what, float T, int top_k, float top_p, int want_kept, float wrong_T,
                          int wrong_k, float wrong_p) {
    double q[NV], w[NV];
    int kept = target(LOGITS, T, top_k, top_p, q);
    CHECK_MSG(kept == want_kept, "%s: the target keeps %d ids, the test expects %d", what, kept, want_kept);
    long count[NV];
    long outside = draw(T, top_k, top_p, 1234, q, count);
    CHECK_MSG(outside == 0, "%s: %ld draws outside the %d kept ids", what, outside, kept);
    int df, wdf;
    double chi = chi_square(count, q, DRAWS, &df);
    target(LOGITS, wrong_T, wrong_k, wrong_p, w);
    double wchi = chi_square(count, w, DRAWS, &wdf);
    printf("    %s: chi-square %.1f on %d df (bound %.1f); against T %g, top-k %d, top-p %g: %.3g\n", what, chi, df,
           chi_bound(df), wrong_T, wrong_k, wrong_p, wchi);
    CHECK_MSG(chi <= chi_bound(df), "%s: chi-square %.1f > %.1f on %d df", what, chi, chi_bound(df), df);
    CHECK_MSG(wchi > chi_bound(wdf), "%s: the draws fit the wrong distribution too (%.1f)", what, wchi);
}

TEST(test_sampler_temperature_one_is_softmax) { check_setting("T 1", 1.0f, 0, 1.0f, NV, 1.1f, 0, 1.0f); }
TEST(test_sampler_low_temperature_sharpens) { check_setting("T 0.5", 0.5f, 0, 1.0f, NV, 0.55f, 0, 1.0f); }
TEST(test_sampler_high_temperature_flattens) { check_setting("T 2", 2.0f, 0, 1.0f, NV, 1.8f, 0, 1.0f); }

// top-k keeps the k most probable: ids 1 and 9 tie for the top (both 2.0), then 4 and 0.
TEST(test_sampler_top_k_keeps_k_most_probable) {
    check_setting("top-k 3", 1.0f, 3, 1.0f, 3, 1.0f, 4, 1.0f);
    check_setting("top-k 1", 1.0f, 1, 1.0f, 1, 1.0f, 2, 1.0f);  // a tie at the top: the lower id, 1
    check_setting("top-k 4, T 0.7", 0.7f, 4, 1.0f, 4, 0.7f, 3, 1.0f);
}

// top-p keeps the smallest prefix of the sorted probabilities that reaches p: at T 1 they are
// 0.255 0.255 0.155 0.115 0.077 ... (ids 1 9 4 0 3 ...), cumulative 0.255 0.511 0.666 0.781 0.857.
TEST(test_sampler_top_p_keeps_smallest_nucleus) {
    check_setting("top-p 0.5", 1.0f, 0, 0.5f, 2, 1.0f, 0, 0.6f);
    check_setting("top-p 0.7", 1.0f, 0, 0.7f, 4, 1.0f, 0, 0.65f);
    check_setting("top-p 0.2", 1.0f, 0, 0.2f, 1, 1.0f, 0, 0.3f);  // of the tied two, the lower id
}

// Both filters: top-k first, then top-p against the top-k set renormalised (HF transformers, vLLM,
// llama.cpp). top-k 4 holds 0.781: 0.255 + 0.255 = 0.654 of it reaches 0.4. top-k 3 holds 0.666:
// the first two are 0.767 of it and reach 0.7, so two are kept — measured against the whole
// distribution (0.511 < 0.7) all three would be.
TEST(test_sampler_top_k_then_top_p) {
    check_setting("top-k 4, top-p 0.4", 1.0f, 4, 0.4f, 2, 1.0f, 4, 1.0f);
    check_setting("top-k 3, top-p 0.7", 1.0f, 3, 0.7f, 2, 1.0f, 3, 1.0f);
}

// Temperature 0 is greedy: the argmax every time, the lowest id on ties, whatever the filters.
TEST(test_sampler_temperature_zero_is_argmax) {
    Sampler s;
    CHECK(sampler_init(&s, NV, 0.0f, 3, 0.5f, 99) == 0);
    for (int i = 0; i < 100; i++) CHECK(sampler_sample(&s, LOGITS) == 1);  // ids 1 and 9 tie at 2.0
    float neg[NV];
    for (int i = 0; i < NV; i++) neg[i] = -100.0f - i;
    neg[7] = -3.0f;
    CHECK(sampler_sample(&s, neg) == 7);
    sampler_free(&s);
    float flat[5] = {0.5f, 0.5f, 0.5f, 0.5f, 0.5f};
    CHECK(argmax_f32(flat, 5) == 0);
    CHECK(argmax_f32(LOGITS, NV) == 1);
}

// argmax_f32 (two vector passes) picks what the one-line loop picks — the first of the largest,
// NaNs never winning, a NaN at 0 giving 0 — for lengths around the vector width, ties, −0 and +0,
// infinities and NaNs, on the vector and the portable path.
TEST(test_argmax_matches_the_loop) {
    unsigned seed = 12345;
    float x[70];
    for (int trial = 0; trial < 4000; trial++) {
        int n = 1 + trial % 70;
        for (int i = 0; i < n; i++) {
            seed = seed * 1103515245u + 12345u;
            int k = (seed >> 16) % 12;
            x[i] = k == 0 ? NAN : k == 1 ? -INFINITY : k == 2 ? (trial % 3 ? 2.0f : INFINITY) : k == 3 ? -0.0f : k == 4 ? 0.0f
                                                                                               : (float)((int)((seed >> 8) % 7) - 3);
            if (x[i] != x[i] && trial % 5) x[i] = 1.0f;  // NaNs in a fifth of the trials
        }
        int best = 0;
        for (int i = 1; i < n; i++)
            if (x[i] > x[best]) best = i;
        for (int isa = 0; isa < 2; isa++) {
            CHECK(kernels_set_isa(isa ? "scalar" : "auto") == 0);
            int got = argmax_f32(x, n);
            CHECK_MSG(got == best, "trial %d n %d %s: %d, the loop %d", trial, n, isa ? "scalar" : "vector", got, best);
        }
    }
    CHECK(kernels_set_isa("auto") == 0);
}

// Probabilities come from logits relative to the largest: logits near 1e4 neither overflow nor
// lose the distribution (ids 0 and 1 one logit apart: 1 : e).
TEST(test_sampler_large_logits_keep_their_distribution) {
    float big[NV];
    for (int i = 0; i < NV; i++) big[i] = 10000.0f - 50.0f * i;
    big[0] = 9999.0f;
    big[1] = 10000.0f;
    Sampler s;
    CHECK(sampler_init(&s, NV, 1.0f, 0, 1.0f, 5) == 0);
    long n1 = 0, n = 100000;
    for (long d = 0; d < n; d++) {
        int id = sampler_sample(&s, big);
        CHECK_MSG(id == 0 || id == 1, "drew %d", id);
        n1 += id == 1;
    }
    sampler_free(&s);
    double p1 = exp(1.0) / (1 + exp(1.0)), sd = sqrt(n * p1 * (1 - p1));
    CHECK_MSG(fabs(n1 - n * p1) <= 6 * sd, "id 1 drawn %ld times of %ld, expected %.0f", n1, n, n * p1);
}

// The same seed draws the same sequence; another seed another one.
TEST(test_sampler_seeded_draws_repeat) {
    Sampler a, b, c;
    CHECK(sampler_init(&a, NV, 1.0f, 0, 0.9f, 42) == 0 && sampler_init(&b, NV, 1.0f, 0, 0.9f, 42) == 0 &&
          sampler_init(&c, NV, 1.0f, 0, 0.9f, 43) == 0);
    int same = 1, differ = 0;
    for (int i = 0; i < 1000; i++) {
        int x = sampler_sample(&a, LOGITS), y = sampler_sample(&b, LOGITS), z = sampler_sample(&c, LOGITS);
        same &= x == y;
        differ |= x != z;
    }
    sampler_free(&a);
    sampler_free(&b);
    sampler_free(&c);
    CHECK(same && differ);
}

// The independent definitions of the filters added for the server (OpenAI / vLLM):
//   penalties    logit_i − presence·[c_i > 0] − frequency·c_i, c_i = times id i was generated
//   min-p        after top-k / top-p, keep the ids with p_i ≥ min_p · max_j p_j
// q (NV): the target; returns how many ids are kept.
static int target_ext(const float *logits, const int *counts, double presence, double frequency, double T, int top_k,
                      double top_p, double min_p, double *q) {
    float pen[NV];
    for (int i = 0; i < NV; i++) pen[i] = (float)(logits[i] - presence * (counts[i] > 0) - frequency * counts[i]);
    int n = target(pen, T, top_k, top_p, q);
    double mx = 0, kept = 0;
    for (int i = 0; i < NV; i++) mx = fmax(mx, q[i]);
    for (int i = 0; i < NV; i++)
        if (q[i] < min_p * mx) q[i] = 0;
    n = 0;
    for (int i = 0; i < NV; i++) kept += q[i], n += q[i] > 0;
    for (int i = 0; i < NV; i++) q[i] /= kept;
    return n;
}

// The sampler's distribution equals q id for id, and DRAWS draws fit it (and not `wrong`).
static int check_ext(const char *what, const int *counts, float presence, float frequency, float T, int top_k,
                     float top_p, float min_p, int want_kept, const double *wrong) {
    double q[NV];
    int kept = target_ext(LOGITS, counts, presence, frequency, T, top_k, top_p, min_p, q);
    if (kept != want_kept) {
        test_fail(__FILE__, __LINE__, "%s: the target keeps %d ids, the test expects %d", what, kept, want_kept);
        return -1;
    }
    Sampler s;
    if (sampler_init(&s, NV, T, top_k, top_p, 77) || sampler_set_filters(&s, min_p, presence, frequency)) return -1;
    for (int i = 0; i < NV; i++)
        for (int c = 0; c < counts[i]; c++) sampler_accept(&s, i);
    int n = sampler_distribution(&s, LOGITS), rc = 0;
    double maxdiff = 0;
    for (int i = 0; i < NV; i++) maxdiff = fmax(maxdiff, test_absdiff(sampler_prob(&s, n, i), q[i]));
    if (n != kept || maxdiff > 1e-6) {
        test_fail(__FILE__, __LINE__, "%s: the sampler keeps %d ids (want %d), max |p − q| %.3g", what, n, kept, maxdiff);
        rc = -1;
    }
    long count[NV] = {0}, outside = 0;
    for (long d = 0; d < DRAWS && rc == 0; d++) {
        int id = sampler_sample(&s, LOGITS);  // the counts stay: no sampler_accept between draws
        if (q[id] == 0) outside++;
        else count[id]++;
    }
    sampler_free(&s);
    if (rc) return rc;
    int df, wdf;
    double chi = chi_square(count, q, DRAWS, &df), wchi = chi_square(count, wrong, DRAWS, &wdf);
    printf("    %s: chi-square %.1f on %d df (bound %.1f); against the wrong distribution %.3g\n", what, chi, df,
           chi_bound(df), wchi);
    if (outside || chi > chi_bound(df) || wchi <= chi_bound(wdf)) {
        test_fail(__FILE__, __LINE__, "%s: %ld draws outside, chi-square %.1f (bound %.1f), wrong fits %.1f", what,
                  outside, chi, chi_bound(df), wchi);
        return -1;
    }
    return 0;
}

// min-p 0.5 at T 1: the largest p is 0.255 (ids 1, 9), the floor 0.128: ids 1, 9 and 4 (0.155) are
// kept, 0 (0.115) is not.
TEST(test_sampler_min_p_keeps_ids_near_the_top) {
    int none[NV] = {0};
    double wrong[NV];
    target_ext(LOGITS, none, 0, 0, 1.0, 0, 1.0, 0.4, wrong);  // one id more
    CHECK(check_ext("min-p 0.5", none, 0, 0, 1.0f, 0, 1.0f, 0.5f, 3, wrong) == 0);
    target_ext(LOGITS, none, 0, 0, 0.7, 0, 1.0, 0.0, wrong);  // no min-p at all
    CHECK(check_ext("min-p 0.2, T 0.7", none, 0, 0, 0.7f, 0, 1.0f, 0.2f, 4, wrong) == 0);
    // after top-k 2 the floor is still relative to the top: min-p 0.9 keeps both tied ids
    target_ext(LOGITS, none, 0, 0, 1.0, 1, 1.0, 0.0, wrong);
    CHECK(check_ext("top-k 2, min-p 0.9", none, 0, 0, 1.0f, 2, 1.0f, 0.9f, 2, wrong) == 0);
}

// Penalties subtract from the logits of generated ids: presence once, frequency per occurrence.
TEST(test_sampler_penalties_follow_the_counts) {
    int counts[NV] = {0};
    counts[1] = 3;  // id 1 generated three times, id 4 once
    counts[4] = 1;
    double wrong[NV];
    target_ext(LOGITS, counts, 0.5, 0.0, 1.0, 0, 1.0, 0.0, wrong);  // the frequency term left out
    CHECK(check_ext("presence 0.5, frequency 0.3", counts, 0.5f, 0.3f, 1.0f, 0, 1.0f, 0.0f, NV, wrong) == 0);
    target_ext(LOGITS, counts, 0.0, 0.0, 1.0, 0, 1.0, 0.0, wrong);  // no penalty
    CHECK(check_ext("presence -1 (a bonus)", counts, -1.0f, 0.0f, 1.0f, 0, 1.0f, 0.0f, NV, wrong) == 0);
    target_ext(LOGITS, counts, 0.0, 0.4, 1.0, 0, 1.0, 0.0, wrong);  // counted once per id, not per use
    // penalised: 9 2.0, 0 1.2, 3 0.8, 4 0.7, 7 0.5, ... 1 −0.4: top-p 0.8 keeps the first five
    CHECK(check_ext("frequency 0.8, top-p 0.8", counts, 0.0f, 0.8f, 1.0f, 0, 0.8f, 0.0f, 5, wrong) == 0);
}

// Greedy decoding sees the penalised logits: ids 1 and 9 tie at 2.0; once 1 is generated a small
// presence penalty makes 9 the argmax, and once both are, 4 (1.5) wins with a penalty of 0.6.
TEST(test_sampler_greedy_with_penalties) {
    Sampler s;
    CHECK(sampler_init(&s, NV, 0.0f, 0, 1.0f, 1) == 0 && sampler_set_filters(&s, 0, 0.1f, 0) == 0);
    CHECK(sampler_sample(&s, LOGITS) == 1);
    sampler_accept(&s, 1);
    CHECK(sampler_sample(&s, LOGITS) == 9);
    sampler_accept(&s, 9);
    CHECK(sampler_sample(&s, LOGITS) == 1);  // both penalised by 0.1: the tie again, the lower id
    sampler_free(&s);
    CHECK(sampler_init(&s, NV, 0.0f, 0, 1.0f, 1) == 0 && sampler_set_filters(&s, 0, 0.6f, 0) == 0);
    sampler_accept(&s, 1);
    sampler_accept(&s, 9);
    CHECK(sampler_sample(&s, LOGITS) == 4);
    sampler_free(&s);
}
