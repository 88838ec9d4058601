// The forward pass against golden logits from the independent numpy reference (tools/ref_model.py,
// made by tools/make_golden.py), and the engine's paths against each other: decode vs prefill,
// absorbed vs plain attention, FP8 vs the same weights in F32, sharded vs single-file.
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "test.h"

typedef struct {
    float *logits, *mtp;  // (T, V), (T-1, V) or NULL
    int T, V;
} Logits;

static void logits_free(Logits *l) {
    free(l->logits);
    free(l->mtp);
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

// Runs the model over tok: by prefill (one call) or by decode (one token per call).
static int run_model(const char *dir, const int *tok, int T, int decode, AttnMode mode, int want_mtp, Logits *out,
                     Error *err) {
    Model m;
    memset(out, 0, sizeof *out);
    if (model_load(&m, dir, want_mtp, err)) return -1;
    int V = m.cfg.vocab_size, d = m.cfg.hidden_size, rc = -1;
    out->T = T;
    out->V = V;
    KVCache kv;
    ForwardState *s = NULL;
    float *hidden = malloc(sizeof(float) * T * d);
    out->logits = malloc(sizeof(float) * T * V);
    if (want_mtp) out->mtp = malloc(sizeof(float) * (T - 1) * V);
    if (kvcache_init(&kv, &m.cfg, want_mtp ? 1 : 0, T, err)) goto done;
    s = forward_state_new(&m, decode ? 1 : T, T, err);
    if (!s) goto done2;
    if (!decode) {
        if (model_forward(&m, s, &kv, tok, T, mode, out->logits, NULL, hidden, err)) goto done3;
        if (want_mtp && model_mtp_forward(&m, s, &kv, 0, tok + 1, hidden, T - 1, mode, out->mtp, NULL, err)) goto done3;
    } else {
        for (int t = 0; t < T; t++) {
            if (model_forward(&m, s, &kv, tok + t, 1, mode, NULL, out->logits + (size_t)t * V, hidden + (size_t)t * d, err))
                goto done3;
            if (want_mtp && t > 0 &&
                model_mtp_forward(&m, s, &kv, 0, tok + t, hidden + (size_t)(t - 1) * d, 1, mode, out->mtp + (size_t)(t - 1) * V,
                                  NULL, err))
                goto done3;
        }
    }
    rc = 0;
done3:
    forward_state_free(s);
done2:
    kvcache_free(&kv);
done:
    free(hidden);
    model_free(&m);
    return rc;
}

// max |a - b| <= 1e-3 * max |ref| and the same argmax in every row; returns 0 or fills why.
static int compare(const float *a, const float *ref, int rows, int V, char *why, size_t n) {
    float maxref = 0, maxdiff = 0;
    for (long i = 0; i < (long)rows * V; i++) {
        maxref = fabsf(ref[i]) > maxref ? fabsf(ref[i]) : maxref;
        float dd = fabsf(a[i] - ref[i]);
        maxdiff = dd > maxdiff || dd != dd ? dd : maxdiff;
    }
    if (!(maxdiff <= 1e-3f * maxref)) {
        snprintf(why, n, "max |diff| %.3g > 1e-3 x max |logit| %.3g", maxdiff, maxref);
        return -1;
    }
    for (int r = 0; r < rows; r++) {
        int ia = 0, ib = 0;
        for (int v = 1; v < V; v++) {
            if (a[(long)r * V + v] > a[(long)r * V + ia]) ia = v;
            if (ref[(long)r * V + v] > ref[(long)r * V + ib]) ib = v;
        }
        if (ia != ib) {
            snprintf(why, n, "row %d: argmax %d, reference %d", r, ia, ib);
            return -1;
        }
    }
    snprintf(why, n, "max |diff| %.3g (max |logit| %.3g)", maxdiff, maxref);
    return 0;
}

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

// Prefill (plain attention) and decode (absorbed) against the golden logits of a case.
static int check_golden(const char *name, int has_mtp, char *why, size_t n) {
    char dir[256];
    snprintf(dir, sizeof dir, "%s/%s", test_datadir(), name);
    int tok[256];
    int T = read_tokens(dir, tok, 256);
    if (T < 2) return snprintf(why, n, "%s: no tokens.txt", dir), -1;
    Error err = {0};
    for (int pass = 0; pass < 3; pass++) {
        int decode = pass == 2;
        AttnMode mode = pass == 0 ? ATTN_PLAIN : ATTN_ABSORBED;
        Logits l;
        if (run_model(dir, tok, T, decode, mode, has_mtp, &l, &err)) return snprintf(why, n, "%s", err.msg), -1;
        float *g = read_f32(dir, "logits.f32", (size_t)T * l.V);
        float *gm = has_mtp ? read_f32(dir, "mtp_logits.f32", (size_t)(T - 1) * l.V) : NULL;
        int bad = !g || (has_mtp && !gm);
        const char *what = pass == 0 ? "prefill" : pass == 1 ? "absorbed prefill" : "decode";
        char w[1536] = "golden file missing or of the wrong size";
        if (!bad) bad = compare(l.logits, g, T, l.V, w, sizeof w) != 0;
        if (!bad && has_mtp) {
            bad = compare(l.mtp, gm, T - 1, l.V, w, sizeof w) != 0;
            if (bad) what = pass == 2 ? "MTP decode" : "MTP prefill";
        }
        free(g);
        free(gm);
        logits_free(&l);
        if (bad) return snprintf(why, n, "%s: %s: %s", name, what, w), -1;
    }
    return 0;
}

TEST(test_golden_v3) {
    char why[2048];
    CHECK_MSG(check_golden("v3", 1, why, sizeof why) == 0, "%s", why);
}

TEST(test_golden_v2lite) {
    char why[2048];
    CHECK_MSG(check_golden("v2lite", 0, why, sizeof why) == 0, "%s", why);
}

TEST(test_golden_v2group) {
    char why[2048];
    CHECK_MSG(check_golden("v2group", 0, why, sizeof why) == 0, "%s", why);
}

TEST(test_golden_fp8) {
    char why[2048];
    CHECK_MSG(check_golden("fp8", 1, why, sizeof why) == 0, "%s", why);
}

TEST(test_golden_fp8_as_f32) {
    char why[2048];
    CHECK_MSG(check_golden("fp8_f32", 1, why, sizeof why) == 0, "%s", why);
}

TEST(test_golden_v3_sharded) {
    char why[2048];
    CHECK_MSG(check_golden("v3_sharded", 1, why, sizeof why) == 0, "%s", why);
}

// Two checkpoints that hold the same numbers give the same logits: FP8 codes × scales against
// their dequantised F32 copy, and three shards against one file.
static int check_same(const char *a, const char *b, float tol, char *why, size_t n) {
    char da[256], db[256];
    snprintf(da, sizeof da, "%s/%s", test_datadir(), a);
    snprintf(db, sizeof db, "%s/%s", test_datadir(), b);
    int tok[256];
    int T = read_tokens(da, tok, 256);
    Error err = {0};
    Logits la, lb;
    if (T < 1 || run_model(da, tok, T, 0, ATTN_PLAIN, 0, &la, &err)) return snprintf(why, n, "%s: %s", a, err.msg), -1;
    if (run_model(db, tok, T, 0, ATTN_PLAIN, 0, &lb, &err)) {
        logits_free(&la);
        return snprintf(why, n, "%s: %s", b, err.msg), -1;
    }
    float md = 0;
    for (long i = 0; i < (long)T * la.V; i++) md = fmaxf(md, fabsf(la.logits[i] - lb.logits[i]));
    logits_free(&la);
    logits_free(&lb);
    snprintf(why, n, "%s vs %s: max |diff| %.3g > %.3g", a, b, md, tol);
    return md <= tol ? 0 : -1;
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
TEST(test_golden_decode_any_thread_count) {
    int saved = omp_get_max_threads();
    const int counts[] = {1, 3, 5};
    for (int i = 0; i < 3; i++) {
        omp_set_num_threads(counts[i]);
        char why[2048];
        int rc = check_golden("v3", 1, why, sizeof why);
        if (rc == 0) rc = check_golden("fp8", 1, why, sizeof why);
        CHECK_MSG(rc == 0, "%d threads: %s", counts[i], why);
        if (rc) break;
    }
    omp_set_num_threads(saved);
}
