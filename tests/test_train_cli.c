// `dsv3 prepare` and `dsv3 train` end to end: the shard format, the loader's windows and order,
// bit-exact resume, determinism, checkpoints the inference commands load, and bad input.
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "kernels/backend.h"
#include "model/config.h"
#include "train/data.h"
#include "train/train_model.h"
#include "train/trainer.h"
#include "test.h"

#define TINY_CONFIG TEST_TINY_V3_CONFIG

static int sanitized(void) { return getenv("DSV3_TEST_SANITIZED") != NULL; }

TEST(test_prepare_bytes_shards) {
    const char *dir = test_train_corpus();
    char path[600];
    snprintf(path, sizeof path, "%s/data/train-00000.bin", dir);
    size_t n;
    unsigned char *b = test_read_file(path, &n);
    CHECK_MSG(b, "%s missing", path);
    CHECK(memcmp(b, "DSV3TOKS", 8) == 0);
    uint32_t ver, hb, vocab;
    uint64_t count;
    memcpy(&ver, b + 8, 4);
    memcpy(&hb, b + 12, 4);
    memcpy(&count, b + 16, 8);
    memcpy(&vocab, b + 24, 4);
    CHECK(ver == 1 && hb == 32 && vocab == 258);
    CHECK(n == 32 + 4 * count);
    // the first document: BOS, its bytes shifted by 2, EOS
    const uint32_t *tok = (const uint32_t *)(b + 32);
    const char *start = "document 0 line 0:";
    CHECK(tok[0] == 0);
    for (size_t i = 0; i < strlen(start); i++) CHECK(tok[1 + i] == (uint32_t)(unsigned char)start[i] + 2);
    snprintf(path, sizeof path, "%s/doc0.txt", dir);
    size_t doc0;
    free(test_read_file(path, &doc0));
    CHECK(tok[1 + doc0] == 1);  // EOS closes the document
    CHECK(tok[2 + doc0] == 0);  // and BOS opens the next
    // validation: whole documents from the end (doc2, longer than 30% alone? then the last one)
    long long ntr = 0, nval = 0;
    Error err = {0};
    snprintf(path, sizeof path, "%s/data", dir);
    CHECK(data_split_tokens(path, "train", &ntr, &err) == 0 && data_split_tokens(path, "val", &nval, &err) == 0);
    CHECK(ntr == (long long)count && nval > 0);
    free(b);
}

// prepare into a directory an earlier preparation left: its shards beyond the new ones go (data.json
// no longer lists them); other files stay.
TEST(test_prepare_over_an_earlier_one) {
    const char *dir = test_train_corpus();
    char out[4096], path[700];
    snprintf(path, sizeof path, "%s/again", dir);
    int rc = test_run(out, sizeof out,
                      "rm -rf '%s' && %s prepare --tokenizer bytes --out '%s' --shard-tokens 2048 '%s/doc0.txt' '%s/doc1.txt' "
                      "'%s/doc2.txt' >/dev/null && touch '%s/notes.txt' '%s/train-1.bin' && ls '%s' | grep -c -e train-00010 -e val-00000",
                      path, test_bin(), path, dir, dir, dir, path, path, path);
    CHECK_MSG(rc == 0 && atoi(out) == 2, "%s", out);  // eleven training shards or more, one of validation
    rc = test_run(out, sizeof out, "%s prepare --tokenizer bytes --out '%s' --shard-tokens 2048 --val-fraction 0 '%s/doc0.txt' "
                  ">/dev/null && ls '%s' | tr '\\n' ' '", test_bin(), path, dir, path);
    CHECK_MSG(rc == 0 && strstr(out, "train-00000.bin") && strstr(out, "notes.txt") && strstr(out, "train-1.bin") &&
                  !strstr(out, "val-"),
              "%s", out);
    long long ntr = 0;
    Error err = {0};
    CHECK_MSG(data_split_tokens(path, "train", &ntr, &err) == 0, "%s", err.msg);
    rc = test_run(out, sizeof out, "ls '%s' | grep -c '^train-0'", path);
    CHECK_MSG(rc == 0 && atoll(out) == (ntr + 2047) / 2048, "%s train shards for %lld tokens", out, ntr);
}

TEST(test_loader_windows_and_order) {
    char data[600];
    snprintf(data, sizeof data, "%s/data", test_train_corpus());
    Error err = {0};
    DataLoader a, b, c;
    int T = 16;
    CHECK_MSG(loader_open(&a, data, "train", T, 7, 1, 258, &err) == 0, "%s", err.msg);
    CHECK(loader_open(&b, data, "train", T, 7, 1, 258, &err) == 0);
    CHECK(loader_open(&c, data, "train", T, 8, 1, 258, &err) == 0);
    long W = a.n_windows;
    CHECK(W == (long)((a.total - 1) / T));
    int *x = malloc(sizeof(int) * (T + 1) * W), *y = malloc(sizeof(int) * (T + 1) * W), *z = malloc(sizeof(int) * (T + 1) * W);
    loader_next_batch(&a, x, (int)W);
    loader_next_batch(&b, y, (int)W);
    loader_next_batch(&c, z, (int)W);
    CHECK(memcmp(x, y, sizeof(int) * (T + 1) * W) == 0);  // the same seed, the same order
    CHECK(memcmp(x, z, sizeof(int) * (T + 1) * W) != 0);  // another seed, another order
    // one epoch visits every window once: each window's first token index w·T is hit once
    char *seen = calloc(W, 1);
    for (long i = 0; i < W; i++) {
        long w = a.perm[i];
        CHECK(w >= 0 && w < W && !seen[w]);
        seen[w] = 1;
    }
    // the next epoch continues; a loader moved to (epoch, pos) continues identically
    int *n1 = malloc(sizeof(int) * (T + 1) * 5), *n2 = malloc(sizeof(int) * (T + 1) * 5);
    loader_next_batch(&a, n1, 3);
    CHECK(a.epoch == 1 && a.pos == 3);
    loader_next_batch(&a, n1, 5);
    CHECK(loader_seek(&c, 1, 3, &err) == 0);
    c.seed = 7;
    CHECK(loader_seek(&c, 1, 3, &err) == 0);
    loader_next_batch(&c, n2, 5);
    CHECK(memcmp(n1, n2, sizeof(int) * (T + 1) * 5) == 0);
    CHECK(loader_seek(&c, 0, W + 1, &err) != 0);
    free(x), free(y), free(z), free(seen), free(n1), free(n2);
    loader_close(&a);
    loader_close(&b);
    loader_close(&c);
}

// The metrics file without the wall-clock field.
static char *metrics_without_timing(const char *run) {
    char path[600];
    snprintf(path, sizeof path, "%s/metrics.jsonl", run);
    char *s = test_read_file(path, NULL);
    if (!s) return NULL;
    char *w = s;
    for (char *r = s; *r;) {
        if (strncmp(r, ", \"tokens_per_s\": ", 18) == 0) {
            r += 18;
            while (*r && *r != ',' && *r != '}') r++;
            continue;
        }
        *w++ = *r++;
    }
    *w = 0;
    return s;
}

static int train(char *out, size_t n, const char *run, long steps, const char *extra) {
    const char *dir = test_train_corpus();
    return test_run(out, n,
                    "%s train --config '%s/config.json' --data '%s/data' --out '%s' --steps %ld --batch 2 --seq 24 "
                    "--warmup 2 --lr 3e-3 --eval-every 2 --eval-batches 2 --save-every 2 --seq-aux-alpha 0.01 "
                    "--bias-update-speed 0.01 --seed 5 %s",
                    test_bin(), dir, dir, run, steps, extra);
}

// A run interrupted and resumed equals the uninterrupted run: metrics (but the wall clock) and the
// final weights byte for byte. `extra`: the options of both legs; `tag` names the run directories.
static void check_resume(const char *extra, const char *tag) {
    long N = sanitized() ? 2 : 4;
    char a[600], b[600], out[4096];
    snprintf(a, sizeof a, "%s/run_full%s", test_train_corpus(), tag);
    snprintf(b, sizeof b, "%s/run_resumed%s", test_train_corpus(), tag);
    int rc = train(out, sizeof out, a, 2 * N, extra);
    CHECK_MSG(rc == 0, "%s", out);
    char stop[256];  // the first leg is interrupted after step N of the same 2N-step run
    snprintf(stop, sizeof stop, "%s --stop-at %ld", extra, N);
    rc = train(out, sizeof out, b, 2 * N, stop);
    CHECK_MSG(rc == 0, "%s", out);
    char said[64];  // the command prints the trainer's summary
    snprintf(said, sizeof said, "stopped at step %ld (", N);
    CHECK_MSG(strstr(out, said), "%s", out);
    rc = test_run(out, sizeof out, "%s train --resume '%s'", test_bin(), b);
    CHECK_MSG(rc == 0, "%s", out);
    snprintf(said, sizeof said, "trained to step %ld (", 2 * N);
    CHECK_MSG(strstr(out, said) && strstr(out, "validation loss"), "%s", out);
    char *ma = metrics_without_timing(a), *mb = metrics_without_timing(b);
    CHECK(ma && mb);
    CHECK_MSG(strcmp(ma, mb) == 0, "metrics differ:\n%s\nvs\n%s", ma, mb);
    int lines = 0;
    for (char *p = ma; *p; p++) lines += *p == '\n';
    CHECK(lines == 2 * N + 1);  // the step-0 validation line, then one per step
    CHECK(strstr(ma, "\"val_loss\"") && strstr(ma, "\"max_vio\"") && strstr(ma, "\"mtp_loss\""));
    free(ma);
    free(mb);
    char pa[700], pb[700];
    snprintf(pa, sizeof pa, "%s/step-%ld/model.safetensors", a, 2 * N);
    snprintf(pb, sizeof pb, "%s/step-%ld/model.safetensors", b, 2 * N);
    size_t na, nb;
    char *wa = test_read_file(pa, &na), *wb = test_read_file(pb, &nb);
    CHECK(wa && wb && na == nb && memcmp(wa, wb, na) == 0);
    free(wa);
    free(wb);
    snprintf(pa, sizeof pa, "%s/metrics.svg", a);
    char *svg = test_read_file(pa, NULL);
    CHECK(svg && strstr(svg, "<svg") && strstr(svg, "MaxVio"));
    free(svg);
}

TEST(test_train_resume_is_bit_exact) { check_resume("", ""); }

// A checkpoint whose trainer_state.json holds a negative count is refused by --resume with a
// one-line error naming the file and the field, before any step runs.
TEST(test_train_resume_refuses_bad_state) {
    char run[600], path[700], out[4096];
    snprintf(run, sizeof run, "%s/run_bad_state", test_train_corpus());
    int rc = train(out, sizeof out, run, 2, "");
    CHECK_MSG(rc == 0, "%s", out);
    snprintf(path, sizeof path, "%s/step-2/trainer_state.json", run);
    char *good = test_read_file(path, NULL);
    CHECK(good != NULL);
    static const char *const field[][2] = {{"\"step\": 2", "\"step\": -4"},
                                           {"\"tokens\": ", "\"tokens\": -"},
                                           {"\"adamw_step\": 2", "\"adamw_step\": -1"},
                                           {"\"pos\": ", "\"pos\": -"}};
    static const char *const said[] = {": step is -4;", ": tokens is -", ": adamw_step is -1;", ": data.pos is -"};
    for (int i = 0; good && i < 4; i++) {
        const char *at = strstr(good, field[i][0]);
        CHECK_MSG(at, "%s: no %s", path, field[i][0]);
        if (!at) continue;
        char bad[8192];
        snprintf(bad, sizeof bad, "%.*s%s%s", (int)(at - good), good, field[i][1], at + strlen(field[i][0]));
        test_write_text(path, bad);
        rc = test_run(out, sizeof out, "%s train --resume '%s'", test_bin(), run);
        CHECK_MSG(rc == 1 && strstr(out, "trainer_state.json") && strstr(out, said[i]) && test_count_lines(out) == 1,
                  "%s: %s", field[i][1], out);
    }
    if (good) test_write_text(path, good);
    free(good);
}

// The line of out that starts with head (copied into line, without its newline); 0 when none.
static int output_line(char *line, size_t n, const char *out, const char *head) {
    const char *p = strstr(out, head);
    if (!p) return 0;
    size_t len = strcspn(p, "\n");
    snprintf(line, n, "%.*s", (int)len, p);
    return 1;
}

// The same in FP8 with BF16 moments: the quantised products and the rounded moments are
// deterministic too, and both options travel with the checkpoint.
TEST(test_train_resume_is_bit_exact_fp8_bf16_moments) { check_resume("--precision fp8 --moments bf16", "_fp8"); }

TEST(test_train_deterministic_and_learns) {
    long N = sanitized() ? 3 : 8;
    char a[600], b[600], out[4096];
    snprintf(a, sizeof a, "%s/run_det_a", test_train_corpus());
    snprintf(b, sizeof b, "%s/run_det_b", test_train_corpus());
    int rc = train(out, sizeof out, a, N, "--no-progress");
    CHECK_MSG(rc == 0, "%s", out);
    CHECK(!strstr(out, "steps went"));
    // the second run times its steps' operations (--profile), which changes nothing it computes:
    // where they went, by kind, each share a number, the shares (outside the backend included)
    // adding up to the steps' time (rounded: within 4%); then the eight longest operations, each
    // "name X ms (Y calls)", the longest first
    rc = train(out, sizeof out, b, N, "--no-progress --profile");
    CHECK_MSG(rc == 0, "%s", out);
    char *ma = metrics_without_timing(a), *mb = metrics_without_timing(b);
    CHECK(ma && mb && strcmp(ma, mb) == 0);
    char head[64], line[2048];
    snprintf(head, sizeof head, "where the %ld steps went (", N);
    CHECK_MSG(output_line(line, sizeof line, out, head), "%s", out);
    double total = 0;
    int kinds = 0;
    for (const char *p = line; (p = strstr(p, " ms (")); p += 5) {
        double share = -1;
        CHECK_MSG(sscanf(p + 5, "%lf%%", &share) == 1 && share >= 0, "%s", line);
        total += share, kinds++;
    }
    CHECK_MSG(kinds == BACKEND_KINDS + 1 && total >= 96 && total <= 104, "%d kinds, %.0f%%: %s", kinds, total, line);
    CHECK_MSG(strstr(line, "fp32 products") && strstr(line, "GFLOP/s") && strstr(line, "outside the backend"), "%s", line);
    CHECK_MSG(output_line(line, sizeof line, out, "the longest operations, a step: "), "%s", out);
    int ops = 0;
    double prev = 1e30;
    for (const char *p = line + strlen("the longest operations, a step: "); *p; ops++) {
        char name[64];
        double ms = -1, calls = -1;
        int used = 0;
        CHECK_MSG(sscanf(p, "%63s %lf ms (%lf calls)%n", name, &ms, &calls, &used) == 3 && used > 0, "%s", p);
        if (used <= 0) break;
        CHECK_MSG(ms >= 0 && ms <= prev && calls > 0, "%s", line);
        prev = ms, p += used;
        if (strncmp(p, ", ", 2) == 0) p += 2;
    }
    CHECK_MSG(ops == 8 && strstr(line, "matmul"), "%d operations: %s", ops, line);
    // the loss falls on this repetitive text
    double first = 0, last = 0;
    CHECK(sscanf(strstr(ma, "\"main_loss\": ") + 13, "%lf", &first) == 1);
    char *p = ma, *q;
    while ((q = strstr(p + 1, "\"main_loss\": "))) p = q;
    CHECK(sscanf(p + 13, "%lf", &last) == 1);
    CHECK_MSG(last < first - (sanitized() ? 0.1 : 0.3), "main loss %g → %g", first, last);
    free(ma);
    free(mb);
}

// The last "main_loss" of a run's metrics (NAN when there is none).
static double last_main_loss(const char *metrics) {
    const char *p = NULL, *q = metrics;
    while (q && (q = strstr(q, "\"main_loss\": "))) p = q++;
    double v = NAN;
    if (!p || sscanf(p + 13, "%lf", &v) != 1) return NAN;
    return v;
}

// A short run in each precision learns; bf16 and fp8 really change the arithmetic (their curves
// differ from fp32's and from each other) yet stay close to fp32: within 0.5% of its loss after
// the run (measured: bf16 ~0.002%, fp8 ~0.03% after 8 steps; the report's gap is 0.25% over a
// long run). So does bf16 with the output heads' GEMMs in BF16 too (--head-precision bf16), whose
// run differs from bf16's.
TEST(test_train_precisions_learn_and_stay_close) {
    long N = sanitized() ? 3 : 8;
    enum { RUNS = 5 };
    const char *prec[RUNS] = {"fp32", "bf16", "fp8", "fp8 --fp8-scale-format ue8m0", "bf16 --head-precision bf16"};
    const char *dirs[RUNS] = {"fp32", "bf16", "fp8", "ue8m0", "bf16head"};
    double loss[RUNS];
    char *runs[RUNS];
    for (int p = 0; p < RUNS; p++) {
        char run[600], extra[96], out[4096];
        snprintf(run, sizeof run, "%s/run_prec_%s", test_train_corpus(), dirs[p]);
        snprintf(extra, sizeof extra, "--no-progress --precision %s", prec[p]);
        int rc = train(out, sizeof out, run, N, extra);
        CHECK_MSG(rc == 0, "%s", out);
        double peak_mb = 0;  // the summary line ends with the process's peak memory
        CHECK_MSG(strstr(out, "; peak memory ") && sscanf(strstr(out, "; peak memory ") + 14, "%lf", &peak_mb) == 1 &&
                      peak_mb > 1,
                  "%s", out);
        runs[p] = metrics_without_timing(run);
        CHECK(runs[p]);
        double first = 0;
        CHECK(sscanf(strstr(runs[p], "\"main_loss\": ") + 13, "%lf", &first) == 1);
        loss[p] = last_main_loss(runs[p]);
        CHECK_MSG(loss[p] < first - (sanitized() ? 0.1 : 0.3), "%s: main loss %g -> %g", prec[p], first, loss[p]);
        printf("    %s: main loss %.4f -> %.4f\n", prec[p], first, loss[p]);
    }
    CHECK(strcmp(runs[0], runs[1]) != 0 && strcmp(runs[1], runs[2]) != 0 && strcmp(runs[0], runs[2]) != 0);
    CHECK(strcmp(runs[2], runs[3]) != 0);  // UE8M0 scales change the run
    CHECK(strcmp(runs[1], runs[4]) != 0);  // and so do BF16 heads
    CHECK(loss[1] != loss[0] && loss[2] != loss[1]);
    for (int p = 1; p < RUNS; p++)
        CHECK_MSG(fabs(loss[p] - loss[0]) < 0.005 * loss[0], "%s: loss %.4f vs fp32 %.4f", prec[p], loss[p], loss[0]);
    for (int p = 0; p < RUNS; p++) free(runs[p]);
    // the precision is saved with the run: a resumed fp8 run stays fp8
    char run[600], path[700];
    snprintf(run, sizeof run, "%s/run_prec_fp8", test_train_corpus());
    snprintf(path, sizeof path, "%s/step-%ld/trainer_state.json", run, N - N % 2);
    char *state = test_read_file(path, NULL);
    CHECK_MSG(state && strstr(state, "\"precision\": \"fp8\""), "%s", state ? state : path);
    free(state);
}

TEST(test_train_precision_bad_options) {
    const char *dir = test_train_corpus();
    const char *bad[][2] = {{"--precision fp16", "--precision: unknown value 'fp16'"},
                            {"--precision bf16 --fp8-grad e5m2", "--fp8-grad: only with --precision fp8"},
                            {"--precision fp8 --fp8-scaling block", "--fp8-scaling: unknown value 'block'"},
                            {"--precision fp8 --fp8-scale-format e8m0", "--fp8-scale-format: unknown value 'e8m0'"},
                            {"--precision bf16 --fp8-scale-format ue8m0", "--fp8-scale-format: only with --precision fp8"},
                            {"--precision fp8 --fp8-grad e3m4", "--fp8-grad: unknown value 'e3m4'"},
                            {"--fp8-accum-bits 14", "--fp8-accum-bits: only with --precision fp8"},
                            {"--precision fp8 --fp8-promotion off", "--fp8-promotion off: needs --fp8-accum-bits"},
                            {"--precision fp8 --fp8-accum-bits 40", "--fp8-accum-bits"},
                            {"--moments fp16", "--moments: unknown value 'fp16'"},
                            {"--head-precision fp8", "--head-precision: unknown value 'fp8'"}};
    for (int i = 0; i < (int)(sizeof bad / sizeof bad[0]); i++) {
        char out[4096], run[600], probe[700];
        snprintf(run, sizeof run, "%s/run_prec_bad%d", dir, i);
        int rc = train(out, sizeof out, run, 1, bad[i][0]);
        CHECK_MSG(rc == 1 && strstr(out, bad[i][1]), "%s: %s", bad[i][0], out);
        struct stat sb;
        snprintf(probe, sizeof probe, "%s", run);
        CHECK_MSG(stat(probe, &sb) != 0, "%s: the run directory was created", bad[i][0]);
    }
}

// max |a - ref| / max |ref| over n values (INFINITY on a NaN).
static double rel_diff(const float *a, const float *ref, long n) {
    double md = 0, mr = 0;
    for (long i = 0; i < n; i++) {
        md = fmax(md, test_absdiff(a[i], ref[i]));
        mr = fmax(mr, fabs(ref[i]));
    }
    return mr > 0 ? md / mr : INFINITY;
}

// A checkpoint is a HuggingFace model directory the inference commands read, and they compute
// the function that was trained: the training forward of the checkpoint (train_model_load) and
// `dsv3 logits` on it, by prefill and by decode, give the same main and MTP logits to 1e-5 of the
// largest (both are float32 computations of one function; they agree to ~1e-6).
TEST(test_train_checkpoint_logits_match_inference) {
    char a[600], out[4096];
    snprintf(a, sizeof a, "%s/run_det_a", test_train_corpus());
    char ck[700], path[800];
    snprintf(ck, sizeof ck, "%s/step-2", a);
    snprintf(path, sizeof path, "%s/config.json", ck);
    char *probe = test_read_file(path, NULL);
    if (!probe) {
        int rc = train(out, sizeof out, a, 2, "--no-progress");
        CHECK_MSG(rc == 0, "%s", out);
    }
    free(probe);
    // a window of T + 1 tokens: BOS, then bytes shifted by 2
    const char *text = "the lazy dog jumps";
    int T = (int)strlen(text), tok[64];
    tok[0] = 0;
    for (int i = 0; i < T; i++) tok[i + 1] = (unsigned char)text[i] + 2;
    ModelConfig c;
    TrainModel m;
    Error err = {0};
    CHECK_MSG(config_load(&c, path, &err) == 0 && train_model_new(&m, &c, 1, T, &err) == 0, "%s", err.msg);
    CHECK_MSG(train_model_load(&m, ck, &err) == 0, "%s", err.msg);
    m.obj.mtp_lambda = 0.3f;  // the MTP module runs only with a weight in the objective
    CHECK_MSG(train_model_evaluate(&m, tok, &err) == 0, "%s", err.msg);
    CHECK(m.mtp_ran);
    int V = c.vocab_size;
    float *tl = malloc(sizeof(float) * T * V), *tm = malloc(sizeof(float) * (T - 1) * V);
    CHECK_MSG(train_model_logits(&m, 0, tl, &err) == 0 && train_model_logits(&m, 1, tm, &err) == 0, "%s", err.msg);
    char ids[512] = "", lf[700], mf[700];
    for (int i = 0; i < T; i++) snprintf(ids + strlen(ids), sizeof ids - strlen(ids), "%s%d", i ? "," : "", tok[i]);
    snprintf(lf, sizeof lf, "%s/ck_logits.f32", test_tmpdir());
    snprintf(mf, sizeof mf, "%s/ck_mtp.f32", test_tmpdir());
    for (int decode = 0; decode < 2; decode++) {
        int rc = test_run(out, sizeof out, "%s logits --model '%s' --tokens %s --out '%s' --mtp-out '%s'%s", test_bin(), ck,
                          ids, lf, mf, decode ? " --decode" : "");
        CHECK_MSG(rc == 0, "%s", out);
        size_t nl, nm;
        float *l = test_read_file(lf, &nl), *lm = test_read_file(mf, &nm);
        CHECK(l && lm && nl == sizeof(float) * T * V && nm == sizeof(float) * (T - 1) * V);
        // row i of both: the distribution after tokens 0..i; MTP row i: token i+1 with h_i
        double rm = rel_diff(l, tl, (long)T * V), rt = rel_diff(lm, tm, (long)(T - 1) * V);
        free(l);
        free(lm);
        printf("    dsv3 logits%s vs training forward: main max|diff| %.2g, MTP %.2g of max|logit| (tol 1e-5)\n",
               decode ? " --decode" : "", rm, rt);
        CHECK_MSG(rm <= 1e-5 && rt <= 1e-5, "main %.3g, MTP %.3g of the largest logit", rm, rt);
    }
    free(tl);
    free(tm);
    train_model_free(&m);
    int rc = test_run(out, sizeof out, "%s generate --model '%s' --tokens 0,70 --max-new 3", test_bin(), ck);
    CHECK_MSG(rc == 0, "%s", out);
}

TEST(test_train_bad_input) {
    const char *dir = test_train_corpus();
    char out[4096], run[600];
    // an existing run is never started over
    snprintf(run, sizeof run, "%s/run_once", dir);
    int rc = train(out, sizeof out, run, 1, "");
    CHECK_MSG(rc == 0, "%s", out);
    char before[700], *m0, *m1;
    snprintf(before, sizeof before, "%s/metrics.jsonl", run);
    m0 = test_read_file(before, NULL);
    rc = train(out, sizeof out, run, 2, "");
    CHECK_MSG(rc == 1 && strstr(out, "already holds a run"), "%s", out);
    m1 = test_read_file(before, NULL);
    CHECK(m0 && m1 && strcmp(m0, m1) == 0);
    free(m0);
    free(m1);
    // a missing input file
    rc = test_run(out, sizeof out, "%s prepare --tokenizer bytes --out '%s/bad' '%s/nope.txt'", test_bin(), dir, dir);
    CHECK(rc == 1 && strstr(out, "nope.txt"));
    // a shard whose tokens do not fit the model's vocabulary
    char cfg[600];
    snprintf(cfg, sizeof cfg, "%s/small_vocab.json", dir);
    char *c = strdup(TINY_CONFIG);
    memcpy(strstr(c, "264"), "100", 3);  // 'x' is byte token 122
    test_write_text(cfg, c);
    free(c);
    rc = test_run(out, sizeof out, "%s train --config '%s' --data '%s/data' --out '%s/run_bad' --steps 1 --batch 1 --seq 8",
                  test_bin(), cfg, dir, dir);
    CHECK_MSG(rc == 1 && strstr(out, "train-00000.bin") && strstr(out, "vocabulary of 100"), "%s", out);
    // a truncated shard
    char path[600];
    snprintf(path, sizeof path, "%s/data_cut", dir);
    rc = test_run(out, sizeof out, "cp -r '%s/data' '%s' && truncate -s 100 '%s/train-00000.bin'", dir, path, path);
    CHECK(rc == 0);
    rc = test_run(out, sizeof out, "%s train --config '%s/config.json' --data '%s' --out '%s/run_bad2' --steps 1 --batch 1 --seq 8",
                  test_bin(), dir, path, dir);
    CHECK_MSG(rc == 1 && strstr(out, "train-00000.bin") && strstr(out, "header says"), "%s", out);
    // a sequence longer than the model's positions, and a resume without a checkpoint
    rc = test_run(out, sizeof out, "%s train --config '%s/config.json' --data '%s/data' --out '%s/run_bad3' --seq 1000",
                  test_bin(), dir, dir, dir);
    CHECK_MSG(rc == 1 && strstr(out, "max_position_embeddings"), "%s", out);
    rc = test_run(out, sizeof out, "%s train --resume '%s/data'", test_bin(), dir);
    CHECK_MSG(rc == 1 && strstr(out, "--resume"), "%s", out);
}

// A byte-level BPE tokenizer.json of the HuggingFace layout: the 256 byte symbols (GPT-2's
// byte-to-unicode map) at ids 2..257 after <s> and </s>, and the merges t+h, th+e, Ġ+the.
static void write_tiny_tokenizer(const char *dir) {
    json_t *vocab = json_object();
    json_object_set_new(vocab, "<s>", json_integer(0));
    json_object_set_new(vocab, "</s>", json_integer(1));
    int n = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        unsigned cp = printable ? (unsigned)b : 256u + n++;
        char u[3] = {(char)(0xC0 | cp >> 6), (char)(0x80 | (cp & 0x3F)), 0}, a[2] = {(char)cp, 0};
        json_object_set_new(vocab, cp < 0x80 ? a : u, json_integer(b + 2));
    }
    json_object_set_new(vocab, "th", json_integer(258));
    json_object_set_new(vocab, "the", json_integer(259));
    json_object_set_new(vocab, "\xC4\xA0the", json_integer(260));
    json_t *tok = json_pack(
        "{s:s, s:[{s:i, s:s, s:b, s:b, s:b, s:b, s:b}, {s:i, s:s, s:b, s:b, s:b, s:b, s:b}], s:n, s:{s:s, s:b, s:b, s:b},"
        " s:n, s:{s:s, s:b, s:b, s:b}, s:{s:s, s:o, s:[s, s, s]}}",
        "version", "1.0", "added_tokens", "id", 0, "content", "<s>", "single_word", 0, "lstrip", 0, "rstrip", 0,
        "normalized", 0, "special", 1, "id", 1, "content", "</s>", "single_word", 0, "lstrip", 0, "rstrip", 0,
        "normalized", 0, "special", 1, "normalizer", "pre_tokenizer", "type", "ByteLevel", "add_prefix_space", 0,
        "trim_offsets", 1, "use_regex", 1, "post_processor", "decoder", "type", "ByteLevel", "add_prefix_space", 1,
        "trim_offsets", 1, "use_regex", 1, "model", "type", "BPE", "vocab", vocab, "merges", "t h", "th e",
        "\xC4\xA0 the");
    char path[700];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    json_dump_file(tok, path, 0);
    json_decref(tok);
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    test_write_text(path, "{\"bos_token\": \"<s>\", \"eos_token\": \"</s>\"}");
}

// `prepare` through a real tokenizer.json: BOS, the BPE ids, EOS; the tokenizer travels into the
// data directory and from there into every checkpoint.
TEST(test_prepare_with_tokenizer_json) {
    char dir[600], out[4096], path[700];
    snprintf(dir, sizeof dir, "%s/tok", test_train_corpus());
    test_run(out, sizeof out, "mkdir -p '%s'", dir);
    write_tiny_tokenizer(dir);
    snprintf(path, sizeof path, "%s/doc.txt", dir);
    test_write_text(path, "the cat the dog");
    int rc = test_run(out, sizeof out, "%s prepare --tokenizer '%s' --out '%s/data' --val-fraction 0 '%s'", test_bin(),
                      dir, dir, path);
    CHECK_MSG(rc == 0, "%s", out);
    snprintf(path, sizeof path, "%s/data/train-00000.bin", dir);
    size_t n;
    unsigned char *b = test_read_file(path, &n);
    CHECK(b && n == 32 + 4 * 12);
    // <s> "the" "Ġ" "c" "a" "t" "Ġthe" "Ġ" "d" "o" "g" </s>  (bytes at their value + 2)
    uint32_t want[12] = {0, 259, ' ' + 2, 'c' + 2, 'a' + 2, 't' + 2, 260, ' ' + 2, 'd' + 2, 'o' + 2, 'g' + 2, 1};
    CHECK(memcmp(b + 32, want, sizeof want) == 0);
    free(b);
    snprintf(path, sizeof path, "%s/data/tokenizer.json", dir);
    char *copied = test_read_file(path, NULL);
    CHECK(copied && strstr(copied, "\"merges\""));
    free(copied);
    // a model trained on it carries the tokenizer in its checkpoints
    for (int i = 0; i < 8; i++) {  // enough text for a window of 17 tokens
        snprintf(path, sizeof path, "%s/doc%d.txt", dir, i);
        test_write_text(path, "the cat sat on the mat and the dog sat on the log");
    }
    rc = test_run(out, sizeof out,
                  "%s prepare --tokenizer '%s/tokenizer.json' --out '%s/data2' --val-fraction 0 '%s'/doc?.txt && "
                  "%s train --config '%s/config.json' --data '%s/data2' --out '%s/run' --steps 1 --batch 1 --seq 16",
                  test_bin(), dir, dir, dir, test_bin(), test_train_corpus(), dir, dir);
    CHECK_MSG(rc == 0, "%s", out);
    snprintf(path, sizeof path, "%s/run/step-1/tokenizer.json", dir);
    copied = test_read_file(path, NULL);
    CHECK(copied && strstr(copied, "\"merges\""));
    free(copied);
}

// Fine-tuning starts from a released-format checkpoint (FP8 block-scaled here); the checkpoints
// it writes hold F32 master weights without a quantization_config.
TEST(test_train_init_from_fp8_checkpoint) {
    const char *dir = test_train_corpus();
    char out[4096], run[600];
    snprintf(run, sizeof run, "%s/run_init", dir);
    int rc = test_run(out, sizeof out, "%s train --init '%s/fp8' --data '%s/data' --out '%s' --steps 2 --batch 1 --seq 8",
                      test_bin(), test_datadir(), dir, run);
    CHECK_MSG(rc == 0, "%s", out);
    char path[700];
    snprintf(path, sizeof path, "%s/step-2/config.json", run);
    char *cfg = test_read_file(path, NULL);
    CHECK(cfg && !strstr(cfg, "quantization_config") && strstr(cfg, "float32"));
    free(cfg);
    rc = test_run(out, sizeof out, "%s train --init '%s/fp8' --config '%s/config.json' --data '%s/data' --out '%s/x'",
                  test_bin(), test_datadir(), dir, dir, dir);
    CHECK_MSG(rc == 1 && strstr(out, "--init"), "%s", out);
}

// `dsv3 plot` compares runs: every run's label and its validation points are in the SVG, steps
// before --from are left out, and bad input is a one-line error with no file written.
TEST(test_plot_compares_runs) {
    char a[600], b[600], svg[700], out[4096], path[700];
    snprintf(a, sizeof a, "%s/plot_a", test_tmpdir());
    snprintf(b, sizeof b, "%s/plot_b", test_tmpdir());
    snprintf(svg, sizeof svg, "%s/plot.svg", test_tmpdir());
    CHECK(test_run(out, sizeof out, "mkdir -p '%s' '%s' && rm -f '%s'", a, b, svg) == 0);
    snprintf(path, sizeof path, "%s/metrics.jsonl", a);
    test_write_text(path, "{\"step\": 0, \"val_loss\": 9.5}\n{\"step\": 1, \"main_loss\": 9.0, \"max_vio\": 1.5}\n"
                     "{\"step\": 2, \"main_loss\": 8.0, \"max_vio\": 0.5, \"val_loss\": 7.25}\n");
    snprintf(path, sizeof path, "%s/metrics.jsonl", b);
    test_write_text(path, "{\"step\": 1, \"main_loss\": 9.5, \"max_vio\": 2.5}\n{\"step\": 2, \"main_loss\": 8.5, \"max_vio\": 2.0, \"val_loss\": 7.5}\n");
    int rc = test_run(out, sizeof out, "%s plot --out '%s' --smooth 1 --from 1 first=%s %s/", test_bin(), svg, a, b);
    CHECK_MSG(rc == 0, "%s", out);
    char *s = test_read_file(svg, NULL);
    CHECK(s != NULL);
    if (s) {
        CHECK_MSG(strstr(s, ">first<") && strstr(s, ">plot_b<"), "labels missing");
        int circles = 0;
        for (const char *p = s; (p = strstr(p, "<circle")); p++) circles++;
        CHECK_MSG(circles == 2, "%d validation points, want 2 (step 0 is before --from)", circles);
        free(s);
    }
    CHECK(test_run(out, sizeof out, "rm -f '%s'", svg) == 0);
    // a torn last line (a run stopped mid-write) is left out, as --resume leaves it out
    test_write_text(path, "{\"step\": 1, \"main_loss\": 9.5}\n{\"step\": 2, \"main_lo");
    rc = test_run(out, sizeof out, "%s plot --out '%s' %s %s", test_bin(), svg, a, b);
    CHECK_MSG(rc == 0, "%s", out);
    CHECK(test_run(out, sizeof out, "rm -f '%s'", svg) == 0);
    test_write_text(path, "{\"step\": 1, \"main_loss\": 9.5}\nnot json\n");
    rc = test_run(out, sizeof out, "%s plot --out '%s' %s %s", test_bin(), svg, a, b);
    CHECK_MSG(rc == 1 && strstr(out, "metrics.jsonl: line 2") && test_count_lines(out) == 1, "%s", out);
    CHECK_MSG(fopen(svg, "r") == NULL, "an SVG was written from bad input");
    rc = test_run(out, sizeof out, "%s plot --out '%s' %s/missing", test_bin(), svg, a);
    CHECK_MSG(rc == 1 && strstr(out, "missing/metrics.jsonl"), "%s", out);
    rc = test_run(out, sizeof out, "%s plot --out '%s'", test_bin(), svg);
    CHECK_MSG(rc == 1 && strstr(out, "run directories"), "%s", out);
}

static const void *option_field(const TrainerOptions *o, const TrainerOption *t) { return (const char *)o + t->offset; }

static int option_is(const TrainerOptions *a, const TrainerOptions *b, const TrainerOption *t) {
    return memcmp(option_field(a, t), option_field(b, t), t->size) == 0;
}

// Writes {"options": opts} as dir/trainer_state.json (opts is stolen).
static void write_state(const char *dir, json_t *opts) {
    char path[700];
    snprintf(path, sizeof path, "%s/trainer_state.json", dir);
    json_t *st = json_pack("{s:o}", "options", opts);
    json_dump_file(st, path, JSON_INDENT(2));
    json_decref(st);
}

// Every saved option comes back from trainer_state.json as it was written; the unsaved ones
// come back as their defaults.
TEST(test_train_options_round_trip_state) {
    char dir[600], out[4096];
    snprintf(dir, sizeof dir, "%s/options_state", test_tmpdir());
    CHECK(test_run(out, sizeof out, "mkdir -p '%s'", dir) == 0);
    TrainerOptions dflt = trainer_defaults(), want = trainer_defaults(), got;
    int saved = 0;
    for (const TrainerOption *t = trainer_options; t->name; t++) {
        double x = t->lo + (t->hi - t->lo) * 0.3712345;  // inside the range, not a round number
        char s[64];
        switch (t->type) {
        case TOPT_STRING:
            snprintf(s, sizeof s, "dir/%s-\xC3\xA9", t->name);
            CHECK(trainer_option_set_string(&want, t, s) == 0);
            break;
        case TOPT_FLOAT: trainer_option_set_real(&want, t, x); break;
        case TOPT_FLAG: trainer_option_set_integer(&want, t, !(long long)t->dflt); break;
        default: trainer_option_set_integer(&want, t, (long long)x); break;
        }
        CHECK_MSG(!option_is(&want, &dflt, t), "--%s: the test value is the default", t->name);
        saved += t->key != NULL;
    }
    Error err = {0};
    json_t *opts = trainer_options_json(&want, &err);
    CHECK_MSG(opts, "%s", err.msg);
    CHECK_MSG((int)json_object_size(opts) == saved, "%zu keys, %d saved options", json_object_size(opts), saved);
    write_state(dir, opts);
    CHECK_MSG(trainer_read_options(dir, &got, &err) == 0, "%s", err.msg);
    for (const TrainerOption *t = trainer_options; t->name; t++)
        CHECK_MSG(option_is(&got, t->key ? &want : &dflt, t), "--%s (%s) does not round-trip", t->name,
                  t->key ? t->key : "not saved");
    // a saved value out of its range, or of the wrong type, is an error naming the key
    opts = trainer_options_json(&want, &err);
    json_object_set_new(opts, "batch", json_integer(0));
    write_state(dir, opts);
    CHECK(trainer_read_options(dir, &got, &err) == -1);
    CHECK_MSG(strstr(err.msg, "options.batch: 0 is outside [1, 1048576]"), "%s", err.msg);
    opts = trainer_options_json(&want, &err);
    json_object_set_new(opts, "lr", json_string("fast"));
    write_state(dir, opts);
    CHECK(trainer_read_options(dir, &got, &err) == -1 && strstr(err.msg, "options.lr: not a number"));
}

// trainer_state.json as the code before the option table wrote it (keys, order, float formatting)
// still reads: a resumed run of an existing checkpoint gets its options back.
TEST(test_train_options_read_existing_state) {
    char dir[600], out[4096], path[700];
    snprintf(dir, sizeof dir, "%s/options_old", test_tmpdir());
    CHECK(test_run(out, sizeof out, "mkdir -p '%s'", dir) == 0);
    snprintf(path, sizeof path, "%s/trainer_state.json", dir);
    test_write_text(path, "{\"made_by\": \"dsv3 train\", \"step\": 3, \"tokens\": 288, \"adamw_step\": 3,"
                     " \"data\": {\"epoch\": 0, \"pos\": 12, \"windows\": 683},"
                     " \"options\": {\"config\": \"c/config.json\", \"init\": \"\", \"data\": \"d\", \"steps\": 3,"
                     " \"batch\": 2, \"seq\": 24, \"accum\": 2, \"lr\": 0.0020000000949949026, \"warmup\": 1,"
                     " \"decay_steps\": 2, \"lr_final_frac\": 0.20000000298023224, \"weight_decay\": 0.05000000074505806,"
                     " \"grad_clip\": 0.5, \"bias_update_speed\": 0.0020000000949949026,"
                     " \"seq_aux_alpha\": 0.0010000000474974513, \"mtp_lambda\": 0.25, \"eval_every\": 3,"
                     " \"eval_batches\": 1, \"save_every\": 3, \"seed\": 123456789012}}");
    TrainerOptions o;
    Error err = {0};
    CHECK_MSG(trainer_read_options(dir, &o, &err) == 0, "%s", err.msg);
    CHECK(strcmp(o.config, "c/config.json") == 0 && o.init[0] == 0 && strcmp(o.data, "d") == 0 && o.out[0] == 0);
    CHECK(o.steps == 3 && o.batch == 2 && o.seq == 24 && o.accum == 2 && o.warmup == 1 && o.decay_steps == 2);
    CHECK(o.lr == 2e-3f && o.lr_final_frac == 0.2f && o.weight_decay == 0.05f && o.grad_clip == 0.5f);
    CHECK(o.bias_update_speed == 0.002f && o.seq_aux_alpha == 0.001f && o.mtp_lambda == 0.25f);
    CHECK(o.eval_every == 3 && o.eval_batches == 1 && o.save_every == 3 && o.seed == 123456789012ULL);
    CHECK(o.stop_at == 0 && o.progress == 0);
    // and writes back the same object, key for key (options newer than the file add their keys)
    json_t *st = json_load_file(path, 0, NULL), *again = trainer_options_json(&o, &err);
    CHECK(st && again);
    const char *key;
    json_t *val;
    void *next;
    json_object_foreach_safe(again, next, key, val) if (!json_object_get(json_object_get(st, "options"), key))
        json_object_del(again, key);
    CHECK_MSG(json_equal(json_object_get(st, "options"), again), "the options object changed");
    json_decref(st);
    json_decref(again);
    // a key the file lacks (an option newer than the run) keeps its default
    test_write_text(path, "{\"options\": {\"data\": \"d\", \"steps\": 7}}");
    CHECK_MSG(trainer_read_options(dir, &o, &err) == 0, "%s", err.msg);
    CHECK(o.steps == 7 && o.batch == trainer_defaults().batch && o.decay_steps == -1);
}

// A number option outside its range, or not a number, is a one-line error naming the option and
// exit status 1, before anything is written.
TEST(test_train_option_out_of_range) {
    char out[4096], run[600];
    snprintf(run, sizeof run, "%s/run_range", test_tmpdir());
    int tried = 0;
    for (const TrainerOption *t = trainer_options; t->name; t++) {
        if (t->type == TOPT_STRING || t->type == TOPT_FLAG) continue;
        char vals[3][64], want[128];
        if (t->type == TOPT_FLOAT) {
            snprintf(vals[0], sizeof vals[0], "%.17g", t->lo - 1);
            snprintf(vals[1], sizeof vals[1], "%.17g", t->hi * 2 + 1);
        } else {
            snprintf(vals[0], sizeof vals[0], "%lld", (long long)t->lo - 1);
            snprintf(vals[1], sizeof vals[1], "%lld", (long long)t->hi * 2 + 1);
        }
        snprintf(vals[2], sizeof vals[2], "x%.40s", vals[0]);
        snprintf(want, sizeof want, "dsv3 train: --%s: ", t->name);
        for (int i = 0; i < 3; i++) {
            int rc = test_run(out, sizeof out, "%s train --config c.json --data d --out '%s' --%s %s", test_bin(), run,
                              t->name, vals[i]);
            CHECK_MSG(rc == 1 && strncmp(out, want, strlen(want)) == 0 && test_count_lines(out) == 1,
                      "--%s %s: exit %d, %s", t->name, vals[i], rc, out);
            tried++;
        }
    }
    CHECK(tried >= 3 * 18);
    CHECK_MSG(fopen(run, "r") == NULL, "%s was created", run);
}

// `dsv3 train --help` lists every option of the table.
TEST(test_train_help_lists_every_option) {
    char out[16384], name[80];
    int rc = test_run(out, sizeof out, "%s train --help", test_bin());
    CHECK_MSG(rc == 0, "%s", out);
    CHECK(strstr(out, "--resume DIR"));
    for (const TrainerOption *t = trainer_options; t->name; t++) {
        snprintf(name, sizeof name, "  --%s ", t->name);
        CHECK_MSG(strstr(out, name) && strstr(out, t->help), "--%s missing from --help", t->name);
    }
}
