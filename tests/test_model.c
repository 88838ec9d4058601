// The forward pass against golden logits from the independent numpy reference (tools/ref_model.py,
// made by tools/make_golden.py), and the engine's paths against each other: decode vs prefill,
// absorbed vs plain attention, a few new positions in one absorbed call, FP8 vs the same weights
// in F32, sharded vs single-file.
//
// Tolerance: max |diff| <= 1e-5 × max |logit| over every row, and the same argmax in every row.
// The reference runs in float64; the same reference in float32 moves the logits by ~1e-6 of the
// largest (tests/data/README.md), so 1e-5 is ~10× above fp32 rounding, while the weakest mistake
// tools/test_ref_model.py plants (the YaRN ramp left out) moves them by ~1e-2. Every comparison
// prints its measured margin.
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "test.h"

#define GOLDEN_RTOL 1e-5
#define STR_(x) #x
#define STR(x) STR_(x)

// A golden case: its checkpoint loaded once, the prompt and the reference logits.
typedef struct {
    const char *name;
    char dir[256];
    Model m;
    int tok[256];
    int T, V, d, has_mtp;
    float *logits;  // (T, V) tools/ref_model.py
    float *mtp;     // (T-1, V) or NULL
} Golden;

static float *read_f32(const char *dir, const char *name, size_t count) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    size_t len;
    float *v = test_read_file(path, &len);
    if (v && len != count * sizeof(float)) {
        free(v);
        return NULL;
    }
    return v;
}

static int read_tokens(const char *dir, int *tok, int max) {
    char path[512];
    snprintf(path, sizeof path, "%s/tokens.txt", dir);
    char *s = test_read_file(path, NULL);
    if (!s) return -1;
    int n = 0;
    for (char *p = s; *p && n < max;) {
        tok[n++] = (int)strtol(p, &p, 10);
        while (*p == ',' || *p == ' ' || *p == '\n') p++;
    }
    free(s);
    return n;
}

static void golden_free(Golden *g) {
    free(g->logits);
    free(g->mtp);
    model_free(&g->m);
}

// Loads tests/data/<name>; returns 0 or fills why.
static int golden_load(Golden *g, const char *name, int has_mtp, char *why, size_t n) {
    memset(g, 0, sizeof *g);
    g->name = name;
    g->has_mtp = has_mtp;
    snprintf(g->dir, sizeof g->dir, "%s/%s", test_datadir(), name);
    g->T = read_tokens(g->dir, g->tok, 256);
    if (g->T < 7) return snprintf(why, n, "%s: tokens.txt missing or shorter than 7", g->dir), -1;
    Error err = {0};
    if (model_load(&g->m, g->dir, has_mtp, &err)) return snprintf(why, n, "%s", err.msg), -1;
    g->V = g->m.cfg.vocab_size;
    g->d = g->m.cfg.hidden_size;
    g->logits = read_f32(g->dir, "logits.f32", (size_t)g->T * g->V);
    if (has_mtp) g->mtp = read_f32(g->dir, "mtp_logits.f32", (size_t)(g->T - 1) * g->V);
    if (!g->logits || (has_mtp && !g->mtp)) {
        golden_free(g);
        return snprintf(why, n, "%s: golden logits missing or of the wrong size", g->dir), -1;
    }
    return 0;
}

// Measures a against ref over rows × V: max |a - ref| / max |ref|, or INFINITY when a logit is
// NaN or infinite or some row's argmax differs; says which in why.
static double margin(const float *a, const float *ref, int rows, int V, char *why, size_t n) {
    double maxref = 0, maxdiff = 0;
    for (long i = 0; i < (long)rows * V; i++) {
        maxref = fmax(maxref, fabs(ref[i]));
        maxdiff = fmax(maxdiff, test_absdiff(a[i], ref[i]));
    }
    if (isinf(maxdiff)) return snprintf(why, n, "NaN or infinity in the logits"), INFINITY;
    for (int r = 0; r < rows; r++) {
        int ia = 0, ib = 0;
        for (int v = 1; v < V; v++) {
            if (a[(long)r * V + v] > a[(long)r * V + ia]) ia = v;
            if (ref[(long)r * V + v] > ref[(long)r * V + ib]) ib = v;
        }
        if (ia != ib) return snprintf(why, n, "row %d: argmax %d, reference %d", r, ia, ib), INFINITY;
    }
    snprintf(why, n, "max|diff| %.2g of max|logit| %.3g", maxdiff / maxref, maxref);
    return maxref > 0 ? maxdiff / maxref : INFINITY;
}

// Compares and prints "    <label>: max|diff| 3.1e-07 of max|logit| (tol 1e-5)" unless quiet.
// Returns the margin; on failure fills why.
static double compare(const char *label, const float *a, const float *ref, int rows, int V, int quiet, char *why,
                      size_t n) {
    char w[256];
    double r = margin(a, ref, rows, V, w, sizeof w);
    if (!quiet && isfinite(r)) printf("    %s: max|diff| %.2g of max|logit| (tol " STR(GOLDEN_RTOL) ")\n", label, r);
    if (!(r <= GOLDEN_RTOL)) snprintf(why, n, "%s: %s > " STR(GOLDEN_RTOL), label, w);
    return r;
}

// Runs the whole prompt: in one call (prefill) or one token per call (decode); main logits
// (T, V) and, with the MTP module, its logits (T-1, V).
static int run_prompt(Golden *g, int decode, AttnMode mode, float *logits, float *mtp, Error *err) {
    Model *m = &g->m;
    int T = g->T, V = g->V, d = g->d, rc = -1;
    KVCache kv;
    if (kvcache_init(&kv, &m->cfg, mtp ? 1 : 0, T, err)) return -1;
    float *hidden = malloc(sizeof(float) * T * d);
    ForwardState *s = forward_state_new(m, decode ? 1 : T, T, err);
    if (!s || !hidden) goto done;
    if (!decode) {
        if (model_forward(m, s, &kv, g->tok, T, mode, logits, NULL, hidden, err)) goto done;
        if (mtp && model_mtp_forward(m, s, &kv, 0, g->tok + 1, hidden, T - 1, mode, mtp, NULL, err)) goto done;
    } else {
        for (int t = 0; t < T; t++) {
            if (model_forward(m, s, &kv, g->tok + t, 1, mode, NULL, logits + (size_t)t * V, hidden + (size_t)t * d, err))
                goto done;
            if (mtp && t > 0 &&
                model_mtp_forward(m, s, &kv, 0, g->tok + t, hidden + (size_t)(t - 1) * d, 1, mode,
                                  mtp + (size_t)(t - 1) * V, NULL, err))
                goto done;
        }
    }
    rc = 0;
done:
    forward_state_free(s);
    kvcache_free(&kv);
    free(hidden);
    return rc;
}

// Prefill with plain attention, prefill with absorbed attention, and decode (absorbed, one token
// per call), main and MTP rows, against the golden logits. *worst: the largest margin seen.
static int check_golden(const char *name, int has_mtp, int quiet, double *worst, char *why, size_t n) {
    Golden g;
    if (golden_load(&g, name, has_mtp, why, n)) return -1;
    int T = g.T, V = g.V, rc = 0;
    float *l = malloc(sizeof(float) * T * V), *lm = has_mtp ? malloc(sizeof(float) * (T - 1) * V) : NULL;
    Error err = {0};
    *worst = 0;
    const char *what[] = {"prefill", "absorbed prefill", "decode"};
    for (int pass = 0; pass < 3 && rc == 0; pass++) {
        AttnMode mode = pass == 0 ? ATTN_PLAIN : ATTN_ABSORBED;
        if (run_prompt(&g, pass == 2, mode, l, lm, &err)) {
            snprintf(why, n, "%s %s: %s", name, what[pass], err.msg);
            rc = -1;
            break;
        }
        char label[128];
        snprintf(label, sizeof label, "%s %s", name, what[pass]);
        double r = compare(label, l, g.logits, T, V, quiet, why, n);
        *worst = fmax(*worst, r);
        if (!(r <= GOLDEN_RTOL)) rc = -1;
        if (rc == 0 && has_mtp) {
            snprintf(label, sizeof label, "%s MTP %s", name, what[pass]);
            r = compare(label, lm, g.mtp, T - 1, V, quiet, why, n);
            *worst = fmax(*worst, r);
            if (!(r <= GOLDEN_RTOL)) rc = -1;
        }
    }
    free(l);
    free(lm);
    golden_free(&g);
    return rc;
}

// Each case's prefill (plain and absorbed attention) and decode, main and MTP rows, give the
// reference's logits.
#define GOLDEN_TEST(test, name, has_mtp)                                                    \
    TEST(test) {                                                                            \
        char why[2048];                                                                     \
        double worst;                                                                       \
        CHECK_MSG(check_golden(name, has_mtp, 0, &worst, why, sizeof why) == 0, "%s", why); \
    }

GOLDEN_TEST(test_prefill_and_decode_match_golden_v3, "v3", 1)
GOLDEN_TEST(test_prefill_and_decode_match_golden_v2lite, "v2lite", 0)
GOLDEN_TEST(test_prefill_and_decode_match_golden_v2group, "v2group", 0)
GOLDEN_TEST(test_prefill_and_decode_match_golden_fp8, "fp8", 1)
GOLDEN_TEST(test_prefill_and_decode_match_golden_fp8_as_f32, "fp8_f32", 1)
GOLDEN_TEST(test_prefill_and_decode_match_golden_v3_sharded, "v3_sharded", 1)

// Speculative verification scores a few drafted tokens in one call after a cached prefix: after
// a plain prefill of the first T - k tokens, k = 2..5 new tokens in ONE absorbed call (up to 4
// take the few-rows path of attention_absorbed, 5 the matmul path, both against a cache with a
// prefix) give the golden rows, and the same rows as one plain call. So does the MTP module fed
// the main model's hidden states, its last k rows in one call.
static int check_absorbed_chunk(const char *name, int has_mtp, char *why, size_t n) {
    Golden g;
    if (golden_load(&g, name, has_mtp, why, n)) return -1;
    Model *m = &g.m;
    int T = g.T, V = g.V, d = g.d, rc = 0;
    Error err = {0};
    float *hidden = malloc(sizeof(float) * T * d), *out[2], *mout[2];
    for (int i = 0; i < 2; i++) {
        out[i] = malloc(sizeof(float) * 5 * V);
        mout[i] = malloc(sizeof(float) * 5 * V);
    }
    ForwardState *s = forward_state_new(m, T, T, &err);
    for (int k = 2; k <= 5 && rc == 0 && s; k++) {
        int P = T - k;  // prefix; main rows P..T-1 and MTP rows P-1..T-2 come in one call
        for (int pass = 0; pass < 2 && rc == 0; pass++) {
            AttnMode mode = pass == 0 ? ATTN_ABSORBED : ATTN_PLAIN;
            KVCache kv;
            if (kvcache_init(&kv, &m->cfg, has_mtp, T, &err)) {
                rc = -1;
                break;
            }
            rc = model_forward(m, s, &kv, g.tok, P, ATTN_PLAIN, NULL, NULL, hidden, &err) ||
                 model_forward(m, s, &kv, g.tok + P, k, mode, out[pass], NULL, hidden + (size_t)P * d, &err);
            if (rc == 0 && has_mtp)
                rc = model_mtp_forward(m, s, &kv, 0, g.tok + 1, hidden, P - 1, ATTN_PLAIN, NULL, NULL, &err) ||
                     model_mtp_forward(m, s, &kv, 0, g.tok + P, hidden + (size_t)(P - 1) * d, k, mode, mout[pass],
                                       NULL, &err);
            kvcache_free(&kv);
            if (rc) snprintf(why, n, "%s: %s", name, err.msg);
        }
        if (rc) break;
        char label[128];
        struct {
            const char *what;
            const float *a, *ref;
        } cmp[4] = {
            {"vs golden", out[0], g.logits + (size_t)P * V},
            {"vs plain", out[0], out[1]},
            {"MTP vs golden", mout[0], has_mtp ? g.mtp + (size_t)(P - 1) * V : NULL},
            {"MTP vs plain", mout[0], mout[1]},
        };
        for (int c = 0; c < (has_mtp ? 4 : 2) && rc == 0; c++) {
            snprintf(label, sizeof label, "%s, %d new positions in one absorbed call, %s", name, k, cmp[c].what);
            if (!(compare(label, cmp[c].a, cmp[c].ref, k, V, 0, why, n) <= GOLDEN_RTOL)) rc = -1;
        }
    }
    if (!s) rc = -1, snprintf(why, n, "%s", err.msg);
    forward_state_free(s);
    free(hidden);
    for (int i = 0; i < 2; i++) free(out[i]), free(mout[i]);
    golden_free(&g);
    return rc;
}

TEST(test_absorbed_few_new_positions_match_golden_v3) {
    char why[2048];
    CHECK_MSG(check_absorbed_chunk("v3", 1, why, sizeof why) == 0, "%s", why);
}

TEST(test_absorbed_few_new_positions_match_golden_v2lite) {
    char why[2048];
    CHECK_MSG(check_absorbed_chunk("v2lite", 0, why, sizeof why) == 0, "%s", why);
}

TEST(test_absorbed_few_new_positions_match_golden_v2group) {
    char why[2048];
    CHECK_MSG(check_absorbed_chunk("v2group", 0, why, sizeof why) == 0, "%s", why);
}

TEST(test_absorbed_few_new_positions_match_golden_fp8) {
    char why[2048];
    CHECK_MSG(check_absorbed_chunk("fp8", 1, why, sizeof why) == 0, "%s", why);
}

// Two checkpoints that hold the same numbers give the same logits: FP8 codes × scales against
// their dequantised F32 copy, and three shards against one file.
static int check_same(const char *a, const char *b, float tol, char *why, size_t n) {
    Golden ga, gb;
    if (golden_load(&ga, a, 0, why, n)) return -1;
    if (golden_load(&gb, b, 0, why, n)) return golden_free(&ga), -1;
    int T = ga.T, V = ga.V;
    float *la = malloc(sizeof(float) * T * V), *lb = malloc(sizeof(float) * T * V);
    Error err = {0};
    int rc = run_prompt(&ga, 0, ATTN_PLAIN, la, NULL, &err) || run_prompt(&gb, 0, ATTN_PLAIN, lb, NULL, &err);
    if (rc) snprintf(why, n, "%s", err.msg);
    float md = 0;
    for (long i = 0; rc == 0 && i < (long)T * V; i++) md = fmaxf(md, test_absdiff(la[i], lb[i]));
    if (rc == 0) {
        printf("    %s vs %s: max|diff| %.2g (tol %.2g)\n", a, b, md, tol);
        snprintf(why, n, "%s vs %s: max |diff| %.3g > %.3g", a, b, md, tol);
        rc = md <= tol ? 0 : -1;
    }
    free(la);
    free(lb);
    golden_free(&ga);
    golden_free(&gb);
    return rc;
}

TEST(test_fp8_matches_dequantised_f32) {
    char why[2048];
    CHECK_MSG(check_same("fp8", "fp8_f32", 1e-4f, why, sizeof why) == 0, "%s", why);
}

TEST(test_sharded_matches_single_file) {
    char why[2048];
    CHECK_MSG(check_same("v3", "v3_sharded", 0.0f, why, sizeof why) == 0, "%s", why);
}

// The decode step splits every product between the threads of its team: with 1, 3 and 5 threads
// (uneven shares, a thread with no head of its own) it still gives the golden logits.
TEST(test_decode_matches_golden_any_thread_count) {
    int saved = omp_get_max_threads();
    const int counts[] = {1, 3, 5};
    const char *cases[] = {"v3", "fp8"};
    char why[2048] = "";
    int rc = 0, count = 0;
    for (int i = 0; i < 3 && rc == 0; i++) {
        omp_set_num_threads(counts[i]);
        count = counts[i];
        for (int c = 0; c < 2 && rc == 0; c++) {
            double worst;
            rc = check_golden(cases[c], 1, 1, &worst, why, sizeof why);
            if (rc == 0)
                printf("    %s, %d threads: max|diff| %.2g of max|logit| at worst (tol " STR(GOLDEN_RTOL) ")\n",
                       cases[c], counts[i], worst);
        }
    }
    omp_set_num_threads(saved);
    CHECK_MSG(rc == 0, "%d threads: %s", count, why);
}
