// MTP speculative decoding (engine.h, --speculative K) on a model whose MTP head is trained here in
// a second (a tiny V3 model on a repetitive text, so drafts are often right): greedy output equals
// plain decoding for many prompts and K = 1..3, also on the golden models; the acceptance count
// agrees with a simulation from plain decoding and `dsv3 logits --mtp-out`; speculative sampling
// draws from plain sampling's distribution (a chi-square test of homogeneity, with a check that
// the same test rejects a different distribution); bad input.
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "infer/engine.h"
#include "model/model.h"
#include "test.h"

// The trained checkpoint's directory, made once per run.
static const char *trained(void) {
    static char ck[600];
    static int done;
    if (done) return ck[0] ? ck : NULL;
    done = 1;
    char dir[512], path[600], out[4096];
    snprintf(dir, sizeof dir, "%s/speculative", test_tmpdir());
    snprintf(path, sizeof path, "%s/doc.txt", dir);
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s'", dir, dir);
    if (system(cmd) != 0) return NULL;
    FILE *f = fopen(path, "w");
    if (!f) return NULL;
    const char *words[] = {"the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "and", "runs", "far"};
    for (int i = 0; i < 400; i++) {
        for (int j = 0; j < 12; j++) fprintf(f, "%s%s", j ? " " : "", words[(i % 5 + j) % 12]);
        fprintf(f, ".\n");
    }
    fclose(f);
    snprintf(path, sizeof path, "%s/config.json", dir);
    f = fopen(path, "w");
    if (!f) return NULL;
    fputs(TEST_TINY_V3_CONFIG, f);
    fclose(f);
    int rc = test_run(out, sizeof out,
                      "%s prepare --tokenizer bytes --out '%s/data' --val-fraction 0.1 '%s/doc.txt' && "
                      "%s train --config '%s/config.json' --data '%s/data' --out '%s/run' --steps 150 --batch 4 --seq 64 "
                      "--warmup 10 --lr 3e-3 --save-every 150 --eval-every 150 --seed 1",
                      test_bin(), dir, dir, test_bin(), dir, dir, dir);
    if (rc != 0) {
        fprintf(stderr, "%s", out);
        return NULL;
    }
    snprintf(ck, sizeof ck, "%s/run/step-150", dir);
    return ck;
}

// Prompts: pieces of the training text as byte ids (id = byte + 2 would be the byte tokenizer's
// offset; any ids in the vocabulary serve).
static int prompt(int k, int *ids) {
    const char *text[] = {"the quick", "fox jumps over", "lazy dog and", "runs far the", "brown", "over the lazy dog",
                          "jumps", "and runs far the quick brown"};
    int n = (int)strlen(text[k % 8]);
    for (int i = 0; i < n; i++) ids[i] = (unsigned char)text[k % 8][i] + 2 + (k / 8);
    return n;
}

typedef struct {
    int tok[64][48], n[64];
} Out;

static void collect(void *owner, int seq, const EngineToken *t) {
    Out *o = owner;
    if (t->token >= 0 && o->n[seq] < 48) o->tok[seq][o->n[seq]++] = t->token;
}

// Runs `np` prompts (prompt(k)) with K drafts, parallel 3; fills out and the stats.
static int run_prompts(const Model *m, int K, int np, const SeqParams *sp, int seed_base, Out *o, EngineStats *st,
                       Error *err) {
    EngineOptions eo = {.parallel = 3, .ctx = 80, .prefill_chunk = 7, .speculative = K};
    Engine *e = engine_new(m, &eo, err);
    if (!e) return -1;
    memset(o, 0, sizeof *o);
    int rc = 0, ids[64];
    for (int k = 0; k < np && rc == 0; k++) {
        SeqParams p = *sp;
        p.seed = seed_base + k;
        int n = prompt(k, ids);
        rc = engine_add(e, ids, n, &p, collect, o, err) < 0;
    }
    int live = 1;
    while (rc == 0 && (live = engine_step(e, err)) > 0) {
    }
    if (live < 0) rc = -1;
    if (st) *st = *engine_stats(e);
    engine_free(e);
    return rc ? -1 : 0;
}

TEST(test_speculative_greedy_equals_plain) {
    const char *ck = trained();
    CHECK_MSG(ck, "training the tiny model failed");
    const char *models[] = {ck, "tests/data/v3", "tests/data/fp8"};
    for (int mi = 0; mi < 3; mi++) {
        Model m;
        Error err = {0};
        CHECK_MSG(model_load(&m, models[mi], 1, &err) == 0, "%s", err.msg);
        SeqParams sp = seq_params_default();
        sp.max_new = 40;
        sp.stop_at_eos = 0;
        static Out plain, spec;
        EngineStats st;
        CHECK_MSG(run_prompts(&m, 0, 16, &sp, 0, &plain, NULL, &err) == 0, "%s", err.msg);
        for (int K = 1; K <= 3; K++) {
            CHECK_MSG(run_prompts(&m, K, 16, &sp, 0, &spec, &st, &err) == 0, "%s", err.msg);
            for (int k = 0; k < 16; k++)
                CHECK_MSG(spec.n[k] == 40 && memcmp(spec.tok[k], plain.tok[k], sizeof(int) * 40) == 0,
                          "%s K=%d prompt %d: speculative output differs from plain", models[mi], K, k);
            CHECK(st.accepted_tokens <= st.draft_tokens && st.generated_tokens == 16 * 40);
            if (mi == 0) {
                printf("    trained tiny model, K=%d: %ld of %ld drafts accepted (%.0f%%)\n", K, st.accepted_tokens,
                       st.draft_tokens, 100.0 * st.accepted_tokens / st.draft_tokens);
                CHECK_MSG(st.accepted_tokens * 5 > st.draft_tokens, "the trained MTP head is rarely right");
            }
        }
        model_free(&m);
    }
}

// Long contexts (at least two LATENT_CHUNKs of cache per thread): a decode step spreads the
// sequence's attention chunks over the threads. Its greedy output is the same bits alone, among short
// sequences, on one thread, with bf16 cache or not aside, and verified speculatively (K + 1 rows
// at once against single steps).
typedef struct {
    int tok[3][24], n[3];
    float top[3][24][4];  // the top log-probabilities: the logits' bits, not just their argmax
} LongOut;

static void collect_long(void *owner, int seq, const EngineToken *t) {
    LongOut *o = owner;
    if (t->token < 0 || o->n[seq] >= 24) return;
    memcpy(o->top[seq][o->n[seq]], t->top_logprobs, sizeof o->top[seq][0]);
    o->tok[seq][o->n[seq]++] = t->token;
}

static int run_long(const Model *m, int K, int with_short, int kv_bf16, int prefill_chunk, LongOut *o, Error *err) {
    // five chunks of cache: spread over up to two threads (two chunks each); with prefill chunks of
    // 256 the prompt is 16 plain chunks and a tail of 104 positions absorbed in the batched forward
    // (beside the short ones)
    enum { P = 4200 };
    EngineOptions eo = {.parallel = 3, .ctx = P + 32, .prefill_chunk = prefill_chunk, .speculative = K,
                        .kv_dtype = kv_bf16 ? DT_BF16 : DT_F32};
    Engine *e = engine_new(m, &eo, err);
    if (!e) return -1;
    memset(o, 0, sizeof *o);
    SeqParams sp = seq_params_default();
    sp.max_new = 24;
    sp.stop_at_eos = 0;
    sp.logprobs = 1;
    sp.top_logprobs = 4;
    static int ids[P];
    for (int i = 0; i < P; i++) ids[i] = (i * 37 + (i / 7) * 11 + 3) % m->cfg.vocab_size;
    int rc = 0;
    if (with_short) rc |= engine_add(e, ids + 100, 9, &sp, collect_long, o, err) < 0;
    rc |= engine_add(e, ids, P, &sp, collect_long, o, err) < 0;
    if (with_short) rc |= engine_add(e, ids + 7, 30, &sp, collect_long, o, err) < 0;
    int live = 1;
    while (rc == 0 && (live = engine_step(e, err)) > 0) {
    }
    engine_free(e);
    return rc || live < 0 ? -1 : 0;
}

TEST(test_long_context_decode_invariant) {
    Model m;
    Error err = {0};
    CHECK_MSG(model_load(&m, "tests/data/v3", 1, &err) == 0, "%s", err.msg);
    for (int kv = 0; kv < 2; kv++) {
        static LongOut alone, mixed, spec, one;
        CHECK_MSG(run_long(&m, 0, 0, kv, 256, &alone, &err) == 0, "%s", err.msg);
        CHECK_MSG(run_long(&m, 0, 1, kv, 256, &mixed, &err) == 0, "%s", err.msg);
        CHECK_MSG(run_long(&m, 2, 0, kv, 256, &spec, &err) == 0, "%s", err.msg);
        int threads = omp_get_max_threads();
        omp_set_num_threads(1);
        CHECK_MSG(run_long(&m, 0, 0, kv, 256, &one, &err) == 0, "%s", err.msg);
        omp_set_num_threads(threads);
        CHECK(alone.n[0] == 24 && mixed.n[1] == 24 && spec.n[0] == 24 && one.n[0] == 24);
        CHECK_MSG(memcmp(alone.tok[0], mixed.tok[1], sizeof alone.tok[0]) == 0 &&
                      memcmp(alone.top[0], mixed.top[1], sizeof alone.top[0]) == 0, "kv %d: among short sequences", kv);
        CHECK_MSG(memcmp(alone.tok[0], spec.tok[0], sizeof alone.tok[0]) == 0, "kv %d: speculative K=2", kv);
        CHECK_MSG(memcmp(alone.tok[0], one.tok[0], sizeof alone.tok[0]) == 0 &&
                      memcmp(alone.top[0], one.top[0], sizeof alone.top[0]) == 0, "kv %d: one thread", kv);
    }
    model_free(&m);
}

// A long prompt run absorbed in pieces of 16 rows (prefill chunks of 16): from its second chunk of
// cache on each piece spreads its attention chunks over the threads, in waves of as many chunks as
// the step's parts hold — 64 · threads / rows: four at one thread, so the 5-chunk cache takes two
// waves there and one at two or three threads. The chunks are merged in order whatever the waves,
// so the output's bits are the same at every thread count.
TEST(test_long_context_waves_any_thread_count) {
    Model m;
    Error err = {0};
    CHECK_MSG(model_load(&m, "tests/data/v3", 1, &err) == 0, "%s", err.msg);
    int threads = omp_get_max_threads();
    static LongOut out[3];
    for (int t = 0; t < 3; t++) {
        omp_set_num_threads(t + 1);
        CHECK_MSG(run_long(&m, 0, 0, 0, 16, &out[t], &err) == 0, "%s", err.msg);
    }
    omp_set_num_threads(threads);
    for (int t = 1; t < 3; t++) {
        CHECK(out[t].n[0] == 24);
        CHECK_MSG(memcmp(out[0].tok[0], out[t].tok[0], sizeof out[0].tok[0]) == 0 &&
                      memcmp(out[0].top[0], out[t].top[0], sizeof out[0].top[0]) == 0,
                  "%d threads against one", t + 1);
    }
    model_free(&m);
}

// K = 1 by hand: with plain greedy output x (prompt + generated), the step that feeds x_n drafts the
// MTP argmax of row n − 1 (h_{n−1}, x_n), i.e. a prediction of x_{n+1}: accepted, the step gives
// x_{n+1} and x_{n+2}; rejected, x_{n+1} only. The MTP logits come from `dsv3 logits --mtp-out`.
TEST(test_speculative_acceptance_matches_simulation) {
    const char *ck = trained();
    CHECK_MSG(ck, "training the tiny model failed");
    Model m;
    Error err = {0};
    CHECK_MSG(model_load(&m, ck, 1, &err) == 0, "%s", err.msg);
    int V = m.cfg.vocab_size;
    for (int k = 0; k < 4; k++) {
        SeqParams sp = seq_params_default();
        sp.max_new = 30;
        sp.stop_at_eos = 0;
        static Out plain;
        EngineStats st;
        int ids[96], n = prompt(k, ids);
        // this prompt alone: its plain output, then its speculative stats
        EngineOptions eo = {.parallel = 1, .ctx = 80, .prefill_chunk = 64, .speculative = 1};
        Engine *e = engine_new(&m, &eo, &err);
        CHECK_MSG(e, "%s", err.msg);
        memset(&plain, 0, sizeof plain);
        CHECK(engine_add(e, ids, n, &sp, collect, &plain, &err) == 0);
        while (engine_step(e, &err) > 0) {
        }
        st = *engine_stats(e);
        engine_free(e);
        CHECK(plain.n[0] == 30);
        memcpy(ids + n, plain.tok[0], sizeof(int) * 30);
        int T = n + 30;
        char list[1024], path[600], out[2048];
        int w = 0;
        for (int t = 0; t < T; t++) w += snprintf(list + w, sizeof list - w, t ? ",%d" : "%d", ids[t]);
        snprintf(path, sizeof path, "%s/spec_mtp.f32", test_tmpdir());
        int rc = test_run(out, sizeof out, "%s logits --model '%s' --tokens %s --mtp-out '%s' --decode", test_bin(), ck,
                          list, path);
        CHECK_MSG(rc == 0, "%s", out);
        size_t len;
        float *mtp = test_read_file(path, &len);
        CHECK(mtp && len == sizeof(float) * (size_t)(T - 1) * V);
        long drafts = 0, accepted = 0;
        int produced = 1, row = n - 1;  // the prefill produced x_n
        while (produced < 30) {
            const float *r = mtp + (size_t)row * V;
            int best = 0;
            for (int v = 1; v < V; v++) best = r[v] > r[best] ? v : best;
            drafts++;
            if (best == ids[row + 2]) {
                accepted++;
                produced += 2;
                row += 2;
            } else {
                produced += 1;
                row += 1;
            }
        }
        free(mtp);
        CHECK_MSG(st.draft_tokens == drafts && st.accepted_tokens == accepted,
                  "prompt %d: engine %ld of %ld accepted, simulation %ld of %ld", k, st.accepted_tokens, st.draft_tokens,
                  accepted, drafts);
    }
    model_free(&m);
}

// Counts of the 3rd generated token (the first decided by a verify row with a draft in front of
// it when K = 2) over seeded samples; chi-square homogeneity statistic of two such histograms with
// categories pooled until each expected count is at least 5. *df: its degrees of freedom.
static double chi2_homogeneity(const long *a, const long *b, int V, int *df) {
    long na = 0, nb = 0;
    for (int v = 0; v < V; v++) na += a[v], nb += b[v];
    double stat = 0, ca = 0, cb = 0;
    int cats = 0;
    for (int v = 0; v < V; v++) {
        ca += a[v];
        cb += b[v];
        double tot = ca + cb, ea = tot * na / (na + nb), eb = tot * nb / (na + nb);
        if ((ea < 5 || eb < 5) && v < V - 1) continue;  // pool with the next category
        if (tot > 0 && ea > 0 && eb > 0) {
            stat += (ca - ea) * (ca - ea) / ea + (cb - eb) * (cb - eb) / eb;
            cats++;
        }
        ca = cb = 0;
    }
    *df = cats - 1;
    return stat;
}

// The chi-square quantile (Wilson–Hilferty): the value exceeded with probability p (z its normal
// quantile).
static double chi2_critical(int df, double z) {
    double h = 2.0 / (9.0 * df);
    return df * pow(1 - h + z * sqrt(h), 3);
}

static void histogram(const Out *o, int np, int at, long *h) {
    for (int k = 0; k < np; k++)
        if (o->n[k] > at) h[o->tok[k][at]]++;
}

TEST(test_speculative_sampling_keeps_the_distribution) {
    const char *ck = trained();
    CHECK_MSG(ck, "training the tiny model failed");
    Model m;
    Error err = {0};
    CHECK_MSG(model_load(&m, ck, 1, &err) == 0, "%s", err.msg);
    int V = m.cfg.vocab_size, rounds = getenv("DSV3_TEST_SANITIZED") ? 20 : 60;
    long *plain = calloc(V, sizeof(long)), *spec = calloc(V, sizeof(long)), *hot = calloc(V, sizeof(long));
    SeqParams sp = seq_params_default();
    sp.max_new = 4;
    sp.stop_at_eos = 0;
    sp.temperature = 1.0f;
    sp.top_k = 20;
    static Out o;
    EngineStats st;
    long drafts = 0, accepted = 0;
    for (int r = 0; r < rounds; r++) {  // 64 seeded samples of the same 8 prompts per round
        CHECK_MSG(run_prompts(&m, 0, 64, &sp, 1000 * r, &o, NULL, &err) == 0, "%s", err.msg);
        histogram(&o, 64, 2, plain);
        CHECK_MSG(run_prompts(&m, 2, 64, &sp, 500000 + 1000 * r, &o, &st, &err) == 0, "%s", err.msg);
        histogram(&o, 64, 2, spec);
        drafts += st.draft_tokens;
        accepted += st.accepted_tokens;
        SeqParams hs = sp;  // a different distribution the test must tell apart
        hs.temperature = 1.6f;
        CHECK_MSG(run_prompts(&m, 0, 64, &hs, 900000 + 1000 * r, &o, NULL, &err) == 0, "%s", err.msg);
        histogram(&o, 64, 2, hot);
    }
    int df, df2;
    double same = chi2_homogeneity(plain, spec, V, &df), diff = chi2_homogeneity(plain, hot, V, &df2);
    double crit = chi2_critical(df, 3.09), crit2 = chi2_critical(df2, 3.09);  // p = 0.001
    printf("    %d samples each: plain vs speculative K=2 chi2 %.1f (df %d, p=0.001 critical %.1f); plain vs "
           "temperature 1.6 chi2 %.1f (critical %.1f); %ld of %ld drafts accepted\n",
           rounds * 64, same, df, crit, diff, crit2, accepted, drafts);
    CHECK_MSG(df >= 3 && same < crit, "speculative sampling's histogram differs from plain sampling's");
    CHECK_MSG(diff > crit2, "the test cannot tell temperature 1.6 from 1.0: it has no power");
    CHECK(accepted > 0 && accepted < drafts);
    free(plain);
    free(spec);
    free(hot);
    model_free(&m);
}

TEST(test_speculative_bad_input) {
    char o[4096];
    // a model without MTP layers, K out of range
    int rc = test_run(o, sizeof o, "%s generate --model tests/data/v2lite --tokens 1,2,3 --speculative 2", test_bin());
    CHECK_MSG(rc == 1 && strstr(o, "MTP"), "%s", o);
    rc = test_run(o, sizeof o, "%s generate --model tests/data/v3 --tokens 1,2,3 --speculative 9", test_bin());
    CHECK_MSG(rc == 1 && strstr(o, "speculative"), "%s", o);
    rc = test_run(o, sizeof o, "%s generate --model tests/data/v3 --tokens 1,2,3 --speculative -1", test_bin());
    CHECK_MSG(rc == 1 && strstr(o, "speculative"), "%s", o);
    // the CLI prints what plain decoding prints, with the figures in --stats-json
    char plain[1024], spec[1024], js[600];
    snprintf(js, sizeof js, "%s/spec_stats.json", test_tmpdir());
    CHECK(test_run(plain, sizeof plain, "%s generate --model tests/data/v3 --tokens 5,17,3 --max-new 12", test_bin()) == 0);
    CHECK(test_run(spec, sizeof spec, "%s generate --model tests/data/v3 --tokens 5,17,3 --max-new 12 --speculative 3 --stats-json %s",
                   test_bin(), js) == 0);
    CHECK_MSG(strcmp(plain, spec) == 0, "%s vs %s", plain, spec);
    char *text = test_read_file(js, NULL);
    CHECK(text && strstr(text, "\"draft_tokens\": ") && !strstr(text, "\"draft_tokens\": 0,"));
    free(text);
}
