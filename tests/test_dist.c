// Several processes under mpirun (src/dist): data-parallel training equals one process, every rank
// leaves together on bad input, and rank 0 alone writes. Run over shared memory and, once, over
// TCP (`--mca btl self,tcp`) so the network path is exercised. Skipped when the build has no MPI or
// mpirun is missing.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dist/dist.h"
#include "dist/expert_parallel.h"
#include "model/config.h"
#include "train/optim.h"
#include "train/train_model.h"
#include "test.h"

// Why the MPI tests cannot run here, or NULL.
static const char *no_mpi(void) {
    if (!dist_have_mpi()) return "built without MPI (OpenMPI not installed at build time)";
    if (test_run(NULL, 0, "command -v mpirun") != 0) return "mpirun not found";
    return NULL;
}

// mpirun as root too, one OpenMP thread per rank (2 or 4 ranks share this machine's cores), ranks
// yielding while they wait, shared memory without the single-copy mechanism (cross-process reads
// that containers often forbid), and a time limit so that a hang fails the test instead of the suite.
#define MPIRUN                                                                                                 \
    "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1 OMP_NUM_THREADS=1 " \
    "OMPI_MCA_btl_vader_single_copy_mechanism=none timeout 300 mpirun --oversubscribe"

static int dp_train(char *out, size_t n, const char *launch, const char *run, long steps, const char *extra) {
    const char *dir = test_train_corpus();
    return test_run(out, n,
                    "%s %s train --config '%s/config.json' --data '%s/data' --out '%s' --steps %ld --batch 4 --seq 24 "
                    "--warmup 2 --lr 3e-3 --eval-every 3 --eval-batches 2 --save-every 3 --seq-aux-alpha 0.01 "
                    "--bias-update-speed 0.01 --seed 5 --no-progress %s",
                    launch, test_bin(), dir, dir, run, steps, extra);
}

// The numbers of metrics.jsonl in order (keys, the wall-clock tokens_per_s and the expert-parallel
// traffic fields dropped); with key, only that key's ("main_loss").
static int metric_key(const char *run, const char *key, double *v, int max) {
    char path[700];
    snprintf(path, sizeof path, "%s/metrics.jsonl", run);
    char *s = test_read_file(path, NULL);
    if (!s) return -1;
    int n = 0;
    for (char *p = s; (p = strstr(p, "\": ")) && n < max;) {
        // the wall clock, and what only expert parallelism reports (its traffic), are not compared
        const char *k = p;
        while (k > s && k[-1] != '"') k--;
        int timing = strncmp(k, "tokens_per_s\"", 13) == 0 || strncmp(k, "a2a_", 4) == 0 ||
                     strncmp(k, "max_nodes\"", 10) == 0;
        size_t kl = key ? strlen(key) : 0;
        int wanted = !key || (p - s >= (long)kl + 1 && strncmp(p - kl, key, kl) == 0 && p[-(long)kl - 1] == '"');
        p += 3;
        double x = strtod(p, &p);
        if (!timing && wanted) v[n++] = x;
    }
    free(s);
    return n;
}

static int metric_values(const char *run, double *v, int max) { return metric_key(run, NULL, v, max); }

// max |a − b| / max |b| of the float32 tensors of two safetensors files with one layout.
static double weights_rel_diff(const char *fa, const char *fb) {
    size_t na, nb;
    unsigned char *a = test_read_file(fa, &na), *b = test_read_file(fb, &nb);
    double md = INFINITY, mr = 0;
    if (a && b && na == nb && na > 8) {
        unsigned long long h;
        memcpy(&h, a, 8);
        md = memcmp(a, b, 8 + h) == 0 ? 0 : INFINITY;  // the same header: same tensors at the same offsets
        for (size_t i = 8 + h; i + 4 <= na && isfinite(md); i += 4) {
            float x, y;
            memcpy(&x, a + i, 4);
            memcpy(&y, b + i, 4);
            md = fmax(md, test_absdiff(x, y));
            mr = fmax(mr, fabs(y));
        }
    }
    free(a);
    free(b);
    return mr > 0 ? md / mr : INFINITY;
}

// Runs the one-process reference once and then each launch; every run's metrics (every loss,
// gradient norm, MaxVio and validation figure of every step) must be within tol_metrics relative
// of the reference's and its final weights (router biases included) within tol_weights of their
// largest.
static void check_close_to_one_process(const char *tag, const char *const *launch, const char *const *extra, int n,
                                       double tol_metrics, double tol_weights) {
    const char *dir = test_train_corpus();
    char ref[600], out[8192];
    snprintf(ref, sizeof ref, "%s/dist_one", dir);
    static int ref_done;
    if (!ref_done) {
        int rc = dp_train(out, sizeof out, "", ref, 6, "");
        CHECK_MSG(rc == 0, "one process: %s", out);
        ref_done = 1;
    }
    double v0[400], v[400];
    int n0 = metric_values(ref, v0, 400);
    CHECK(n0 > 6 * 8);
    for (int i = 0; i < n; i++) {
        char run[600];
        snprintf(run, sizeof run, "%s/%s%d", dir, tag, i);
        int rc = dp_train(out, sizeof out, launch[i], run, 6, extra[i]);
        CHECK_MSG(rc == 0, "%s %s: %s", launch[i], extra[i], out);
        CHECK_MSG(strstr(out, "trained to step 6") && strstr(out, " ranks (data parallel ") &&
                      !strstr(strstr(out, "trained to step 6") + 1, "trained to step"),
                  "one summary from rank 0: %s", out);
        int nv = metric_values(run, v, 400);
        CHECK_MSG(nv == n0, "%s %s: %d values, one process %d", launch[i], extra[i], nv, n0);
        double worst = 0;
        for (int k = 0; k < n0 && k < nv; k++) worst = fmax(worst, fabs(v[k] - v0[k]) / fmax(fabs(v0[k]), 1e-3));
        CHECK_MSG(worst < tol_metrics, "%s %s: metrics differ from one process by %.3g relative", launch[i], extra[i],
                  worst);
        char wa[700], wb[700];
        snprintf(wa, sizeof wa, "%s/step-6/model.safetensors", run);
        snprintf(wb, sizeof wb, "%s/step-6/model.safetensors", ref);
        double wd = weights_rel_diff(wa, wb);
        CHECK_MSG(wd < tol_weights, "%s %s: final weights differ by %.3g of the largest", launch[i], extra[i], wd);
        printf("    %s %s: metrics within %.2g, weights within %.2g of one process\n", strstr(launch[i], "-np"),
               extra[i], worst, wd);
    }
}

// Data parallel: the same global batch on 2 ranks (over TCP) and 4 gives the run of one process;
// two runs on 2 ranks are identical to the bit; a checkpoint continues on another number of ranks.
TEST(test_dist_data_parallel_equals_one_process) {
    const char *why = no_mpi();
    if (why) SKIP("%s", why);
    const char *launch[] = {MPIRUN " -np 2 --mca btl self,tcp", MPIRUN " -np 4", MPIRUN " -np 2"};
    const char *extra[] = {"", "", ""};
    check_close_to_one_process("dp", launch, extra, 3, 1e-6, 3e-6);
    const char *dir = test_train_corpus();
    char ma[700], mb[700];
    snprintf(ma, sizeof ma, "%s/dp0/step-6/model.safetensors", dir);
    snprintf(mb, sizeof mb, "%s/dp2/step-6/model.safetensors", dir);
    CHECK_MSG(weights_rel_diff(ma, mb) == 0, "two runs on 2 ranks differ");
    double a[400], b[400];
    snprintf(ma, sizeof ma, "%s/dp0", dir);
    snprintf(mb, sizeof mb, "%s/dp2", dir);
    int na = metric_values(ma, a, 400), nb = metric_values(mb, b, 400);
    CHECK(na > 0 && na == nb && memcmp(a, b, sizeof(double) * na) == 0);
    // the checkpoint of the 4-rank run continues on 2
    char out[8192], ref[600];
    int rc = test_run(out, sizeof out, "%s -np 2 %s train --resume '%s/dp1/step-3' --no-progress", MPIRUN, test_bin(),
                      dir);
    CHECK_MSG(rc == 0 && strstr(out, "trained to step 6"), "%s", out);
    snprintf(ma, sizeof ma, "%s/dp1", dir);
    snprintf(ref, sizeof ref, "%s/dist_one", dir);
    na = metric_values(ma, a, 400), nb = metric_values(ref, b, 400);
    CHECK(na == nb);
    double worst = 0;
    for (int k = 0; k < na && k < nb; k++) worst = fmax(worst, fabs(a[k] - b[k]) / fmax(fabs(b[k]), 1e-3));
    CHECK_MSG(worst < 1e-6, "resumed on 2 ranks: %.3g from one process", worst);
}

// Low-precision payloads (--a2a-dtype): BF16 both ways, or FP8 / LogFMT-8 / LogFMT-10 dispatch with
// BF16 combine, change the run by the rounding of what crosses the wire: the main loss of every step
// and the validation losses within 1e-3 relative of one process's (measured: bf16 1.9e-5, fp8
// 5.1e-5, logfmt8 3.1e-4, logfmt10 1.8e-6), where fp32 payloads agree to 1e-6. (MaxVio is not
// compared: a rounded input may flip a near-tie routing choice.)
TEST(test_dist_expert_parallel_low_precision_payloads) {
    const char *why = no_mpi();
    if (why) SKIP("%s", why);
    const char *dir = test_train_corpus();
    const char *types[] = {"bf16", "fp8", "logfmt8", "logfmt10"};
    char ref[600], out[8192];
    snprintf(ref, sizeof ref, "%s/ep_lowp_ref", dir);
    int rc = dp_train(out, sizeof out, "", ref, 6, "");
    CHECK_MSG(rc == 0, "%s", out);
    const char *keys[] = {"main_loss", "val_loss"};
    for (int i = 0; i < 4; i++) {
        char run[600], extra[64];
        snprintf(run, sizeof run, "%s/ep_lowp%d", dir, i);
        snprintf(extra, sizeof extra, "--expert-parallel 2 --a2a-dtype %s", types[i]);
        rc = dp_train(out, sizeof out, MPIRUN " -np 2", run, 6, extra);
        CHECK_MSG(rc == 0 && strstr(out, "trained to step 6"), "%s", out);
        double worst = 0;
        for (int k = 0; k < 2; k++) {
            double a[64], b[64];
            int na = metric_key(run, keys[k], a, 64), nb = metric_key(ref, keys[k], b, 64);
            CHECK(na == nb && na >= 3);
            for (int j = 0; j < na && j < nb; j++) worst = fmax(worst, fabs(a[j] - b[j]) / fabs(b[j]));
        }
        CHECK_MSG(worst < 1e-3, "--a2a-dtype %s: losses differ by %.3g relative", types[i], worst);
        printf("    --a2a-dtype %s: losses within %.2g of one process\n", types[i], worst);
    }
    // they really round: the runs differ from the exact one (bf16 and fp8 compared here)
    char a[600], b[600], c[600];
    snprintf(a, sizeof a, "%s/ep_lowp0/step-6/model.safetensors", dir);
    snprintf(b, sizeof b, "%s/ep_lowp1/step-6/model.safetensors", dir);
    snprintf(c, sizeof c, "%s/ep_lowp_ref/step-6/model.safetensors", dir);
    CHECK(weights_rel_diff(a, c) > 0 && weights_rel_diff(b, c) > 0 && weights_rel_diff(a, b) > 0);
}

// Expert parallel: the tiny model's 8 routed experts (its MoE layer and its MTP module's) split over
// 2 and 4 ranks, alone and with 2 data-parallel groups, gives the run of one process — forward,
// every gradient (the weights after six AdamW steps) and the bias updates. The 4-way split runs
// over TCP.
TEST(test_dist_expert_parallel_equals_one_process) {
    const char *why = no_mpi();
    if (why) SKIP("%s", why);
    const char *launch[] = {MPIRUN " -np 2", MPIRUN " -np 4", MPIRUN " -np 4 --mca btl self,tcp", MPIRUN " -np 2"};
    const char *extra[] = {"--expert-parallel 2", "--expert-parallel 2", "--expert-parallel 4",
                           "--expert-parallel 2 --ep-overlap off"};
    check_close_to_one_process("ep", launch, extra, 4, 1e-6, 3e-6);
    // each rank holds its share of the experts; rank 0 gathers them (and their AdamW moments) into
    // whole checkpoints, which continue on another split and on one process
    const char *dir = test_train_corpus();
    char out[8192], run[600], ref[600];
    snprintf(ref, sizeof ref, "%s/dist_one", dir);
    const char *again[][2] = {{MPIRUN " -np 4", "--expert-parallel 4"}, {"", ""}};
    for (int i = 0; i < 2; i++) {
        snprintf(run, sizeof run, "%s/ep%d", dir, i);
        int rc = test_run(out, sizeof out, "%s %s train --resume '%s/step-3' --no-progress %s", again[i][0],
                          test_bin(), run, again[i][1]);
        CHECK_MSG(rc == 0 && strstr(out, "trained to step 6"), "%s", out);
        double a[400], b[400];
        int na = metric_values(run, a, 400), nb = metric_values(ref, b, 400);
        CHECK(na == nb && na > 0);
        double worst = 0;
        for (int k = 0; k < na && k < nb; k++) worst = fmax(worst, fabs(a[k] - b[k]) / fmax(fabs(b[k]), 1e-3));
        CHECK_MSG(worst < 1e-6, "resumed %s: %.3g from one process", again[i][1], worst);
    }
    // the summary says what a rank holds: the dense tensors and 2 of the 8 experts of each MoE layer
    snprintf(run, sizeof run, "%s/ep_held", dir);
    int rc = dp_train(out, sizeof out, MPIRUN " -np 4", run, 1, "--expert-parallel 4");
    long held = 0, total = 0;
    const char *h = strstr(out, "a rank holds ");
    CHECK_MSG(rc == 0 && h && sscanf(h, "a rank holds %ld of the %ld parameters", &held, &total) == 2, "%s", out);
    CHECK_MSG(held > 0 && held < total, "%s", out);
}

// Node-limited routing (report §2.1.2): the tiny model's 8 experts form 2 groups of which a token
// keeps 1; on 2 ranks of one node each, a group is a node, so every token's experts lie on exactly
// one node (the counts come from the routing decisions of every rank); on one node of 2 ranks
// nothing crosses nodes.
TEST(test_dist_node_limited_routing) {
    const char *why = no_mpi();
    if (why) SKIP("%s", why);
    const char *dir = test_train_corpus();
    char run[600], out[8192];
    snprintf(run, sizeof run, "%s/ep_nodes1", dir);
    int rc = dp_train(out, sizeof out, MPIRUN " -np 2", run, 2, "--expert-parallel 2 --ranks-per-node 1");
    double nodes = 0, intra = -1, inter = -1;
    int most = 0;
    const char *l = strstr(out, "routed experts lay on ");
    CHECK_MSG(rc == 0 && l && sscanf(l, "routed experts lay on %lf nodes (at most %d)", &nodes, &most) == 2, "%s", out);
    CHECK_MSG(nodes == 1.0 && most == 1, "a token reached %.2f nodes, at most %d (topk_group 1): %s", nodes, most, out);
    l = strstr(out, "a rank sent ");
    l = l ? strstr(l + 1, "a rank sent ") : NULL;  // the second: the per-node figures
    CHECK_MSG(l && sscanf(l, "a rank sent %lf B within its node and %lf B to other nodes", &intra, &inter) == 2, "%s", out);
    CHECK_MSG(intra == 0 && inter > 0, "%s", out);
    snprintf(run, sizeof run, "%s/ep_nodes2", dir);
    rc = dp_train(out, sizeof out, MPIRUN " -np 2", run, 2, "--expert-parallel 2 --ranks-per-node 2");
    CHECK_MSG(rc == 0 && strstr(out, "B to other nodes") && strstr(out, " 0 B to other nodes"), "%s", out);
}

// Options every rank rejects alike: one line from rank 0, a non-zero exit of every rank, no run
// directory, no hang.
TEST(test_dist_bad_options_one_line_from_rank0) {
    const char *why = no_mpi();
    if (why) SKIP("%s", why);
    const char *dir = test_train_corpus();
    const char *bad[][3] = {
        {"2", "--batch 3", "--batch 3: not divisible by the 2 ranks"},
        {"2", "--data-parallel 4", "--data-parallel 4 x --expert-parallel 1 is 4 ranks, the run has 2 processes"},
        {"2", "--expert-parallel 3", "--expert-parallel 3: the run's 2 processes do not split into groups of 3"},
        {"3", "--batch 3 --expert-parallel 3", "--expert-parallel 3: the model's 8 routed experts do not split evenly"},
        {"2", "--expert-parallel 2 --ranks-per-node 3", "--ranks-per-node 3: 2 ranks in groups of 2"},
        {"2", "--expert-parallel 2 --a2a-dtype fp4", "--a2a-dtype: unknown value 'fp4'"},
        {"2", "--precision fp16", "--precision: unknown value 'fp16'"}};
    for (int i = 0; i < (int)(sizeof bad / sizeof bad[0]); i++) {
        char run[600], out[8192], launch[300];
        snprintf(run, sizeof run, "%s/dp_bad%d", dir, i);
        snprintf(launch, sizeof launch, "%s -np %s", MPIRUN, bad[i][0]);
        int rc = dp_train(out, sizeof out, launch, run, 2, bad[i][1]);
        CHECK_MSG(rc != 0 && rc != 124, "%s: exit %d: %s", bad[i][1], rc, out);
        CHECK_MSG(strstr(out, bad[i][2]), "%s: %s", bad[i][1], out);
        char *first = strstr(out, "dsv3 train: ");
        CHECK_MSG(first && !strstr(first + 1, "dsv3 train: "), "%s: not one line: %s", bad[i][1], out);
        struct stat sb;
        CHECK_MSG(stat(run, &sb) != 0, "%s: the run directory was created", bad[i][1]);
    }
}

// Inference with the experts split (`dsv3 logits --expert-parallel E` under mpirun -np E): the
// golden models' logits, main and MTP, by prefill and by --decode (the batched decode step, where
// the ranks' partial sums are added inside its OpenMP region), on 2 and 4 ranks equal one
// process's to 2e-6 of the largest
// logit (the ranks' partial sums are added in another order; measured: up to 5.6e-7) and the numpy
// reference's to 1e-5 as one process does; each rank reads only its share of the experts' bytes.
static void check_ep_logits(const char *name) {
    char dir[300], path[600], ids[1024], o[8192];
    snprintf(dir, sizeof dir, "%s/%s", test_datadir(), name);
    CHECK_MSG(test_golden_ids(name, ids, sizeof ids) > 0, "%s/tokens.txt missing", dir);
    for (int decode = 0; decode < 2; decode++) {
        const char *how = decode ? " --decode" : "";
        char one[600], onem[600];
        snprintf(one, sizeof one, "%s/ep_logits_%s_1.f32", test_tmpdir(), name);
        snprintf(onem, sizeof onem, "%s/ep_logits_%s_1m.f32", test_tmpdir(), name);
        int rc = test_run(o, sizeof o, "%s logits --model %s --tokens %s --out %s --mtp-out %s%s", test_bin(), dir, ids, one,
                          onem, how);
        CHECK_MSG(rc == 0, "%s", o);
        size_t n1, n1m, ng;
        float *l1 = test_read_file(one, &n1), *m1 = test_read_file(onem, &n1m);
        snprintf(path, sizeof path, "%s/logits.f32", dir);
        float *g = test_read_file(path, &ng);
        CHECK(l1 && m1 && g && ng == n1);
        for (int np = 2; np <= 4; np += 2) {
            char lf[600], mf[600];
            snprintf(lf, sizeof lf, "%s/ep_logits_%s_%d.f32", test_tmpdir(), name, np);
            snprintf(mf, sizeof mf, "%s/ep_logits_%s_%dm.f32", test_tmpdir(), name, np);
            rc = test_run(o, sizeof o, "%s -np %d %s logits --model %s --tokens %s --out %s --mtp-out %s --expert-parallel %d%s",
                          MPIRUN, np, test_bin(), dir, ids, lf, mf, np, how);
            CHECK_MSG(rc == 0, "%s", o);
            size_t nl, nm;
            float *l = test_read_file(lf, &nl), *lm = test_read_file(mf, &nm);
            CHECK(l && lm && nl == n1 && nm == n1m);
            double md = 0, mx = 0, mdm = 0, mxm = 0, mdg = 0;
            for (size_t i = 0; l && i < n1 / 4; i++) {
                md = fmax(md, test_absdiff(l[i], l1[i])), mx = fmax(mx, fabs(l1[i]));
                mdg = fmax(mdg, test_absdiff(l[i], g[i]));
            }
            for (size_t i = 0; lm && i < n1m / 4; i++) mdm = fmax(mdm, test_absdiff(lm[i], m1[i])), mxm = fmax(mxm, fabs(m1[i]));
            printf("    %s%s on %d ranks: max|diff| %.2g, MTP %.2g of max|logit| from one process; %.2g from the reference\n",
                   name, how, np, md / mx, mdm / mxm, mdg / mx);
            CHECK_MSG(md <= 2e-6 * mx && mdm <= 2e-6 * mxm && mdg <= 1e-5 * mx, "%s on %d ranks: %.3g, MTP %.3g, ref %.3g",
                      name, np, md / mx, mdm / mxm, mdg / mx);
            free(l);
            free(lm);
            // one line per rank from rank 0: the weights it reads are the dense ones and its experts
            for (int r = 0; r < np; r++) {
                char key[64];
                snprintf(key, sizeof key, "rank %d: reads ", r);
                const char *p = strstr(o, key);
                double used = 0, all = 0;
                CHECK_MSG(p && sscanf(p + strlen(key), "%lf MB of the %lf MB", &used, &all) == 2 && used < all && used > 0,
                          "%s", o);
            }
        }
        free(l1);
        free(m1);
        free(g);
    }
}

TEST(test_dist_logits_expert_parallel_golden_v3) {
    const char *why = no_mpi();
    if (why) SKIP("%s", why);
    check_ep_logits("v3");
}

TEST(test_dist_logits_expert_parallel_golden_fp8) {
    const char *why = no_mpi();
    if (why) SKIP("%s", why);
    check_ep_logits("fp8");
}

// Bad splits: one line from rank 0, every rank exits non-zero.
TEST(test_dist_logits_bad_split) {
    const char *why = no_mpi();
    if (why) SKIP("%s", why);
    char dir[300], o[8192], out[600];
    snprintf(dir, sizeof dir, "%s/v3", test_datadir());
    snprintf(out, sizeof out, "%s/ep_bad.f32", test_tmpdir());
    const char *cases[][3] = {
        {"3", "--expert-parallel 3", "16 routed experts do not split evenly over 3 ranks"},
        {"2", "--expert-parallel 4", "--expert-parallel 4: the run has 2 processes"},
        {"2", "--expert-parallel two", "--expert-parallel"}};
    for (int i = 0; i < 3; i++) {
        int rc = test_run(o, sizeof o, "%s -np %s %s logits --model %s --tokens 5,17,3 --out %s %s", MPIRUN, cases[i][0],
                          test_bin(), dir, out, cases[i][1]);
        char *first = strstr(o, "dsv3 logits: ");
        CHECK_MSG(rc != 0 && rc != 124 && strstr(o, cases[i][2]) && first && !strstr(first + 1, "dsv3 logits: "),
                  "%s: exit %d: %s", cases[i][1], rc, o);
    }
    int rc = test_run(o, sizeof o, "%s logits --model %s --tokens 5,17,3 --out %s --expert-parallel 2", test_bin(), dir, out);
    CHECK_MSG(rc == 1 && strstr(o, "the run has 1 processes (start it with mpirun -np 2)"), "%s", o);
}

// Generation with the experts split (`generate --expert-parallel E`): every rank runs the engine
// over the same sequences (prefill, the batched decode step, MTP drafts), so greedy decoding on 2
// and 4 ranks gives one process's tokens — single, batched (--batch-file at --parallel 2) and
// speculative — and rank 0 alone prints.
TEST(test_dist_generate_expert_parallel) {
    const char *why = no_mpi();
    if (why) SKIP("%s", why);
    char dir[300], batch[600], o1[8192], o[8192];
    snprintf(dir, sizeof dir, "%s/v3", test_datadir());
    snprintf(batch, sizeof batch, "%s/ep_batch.txt", test_tmpdir());
    test_write_text(batch, "5,17,3\n90,2,44,8\n7\n");
    const char *runs[] = {"--tokens 5,17,3 --max-new 16", "--batch-file BATCH --max-new 10 --parallel 2",
                          "--tokens 5,17,3 --max-new 16 --speculative 2"};
    for (int i = 0; i < 3; i++) {
        char opts[700];
        snprintf(opts, sizeof opts, "%s", runs[i]);
        char *b = strstr(opts, "BATCH");
        if (b) {
            char rest[200];
            snprintf(rest, sizeof rest, "%s", b + 5);
            snprintf(b, sizeof opts - (size_t)(b - opts), "%s%s", batch, rest);
        }
        int rc = test_run(o1, sizeof o1, "%s generate --model %s %s --temperature 0 2>/dev/null", test_bin(), dir, opts);
        CHECK_MSG(rc == 0 && strlen(o1) > 4, "%s", o1);
        for (int np = 2; np <= 4; np += 2) {
            rc = test_run(o, sizeof o, "%s -np %d %s generate --model %s %s --temperature 0 --expert-parallel %d 2>/dev/null",
                          MPIRUN, np, test_bin(), dir, opts, np);
            CHECK_MSG(rc == 0 && strcmp(o, o1) == 0, "%s on %d ranks:\n%s\none process:\n%s", runs[i], np, o, o1);
        }
    }
}

// Run under mpirun by the test below (DSV3_TEST_INNER set): every rank computes the one-process
// gradients of a micro-batch (the whole model, all B sequences) and its expert-parallel share of
// them (its B/W sequences, its experts, the all-to-all), then checks tensor by tensor: a dense
// tensor's gradient summed over the ranks, and each routed expert's gradient on the rank holding
// it, within 1e-5 of the largest entry of the one-process gradient (measured: printed, ~1e-7);
// the expert loads (summed) exactly; and the bias update from them the same bits.
static void ep_gradients_inner(void) {
    Error err = {0};
    CHECK_MSG(dist_init(&err) == 0, "%s", err.msg);
    DistComm *w = dist_world();
    int W = dist_size(w), rank = dist_rank(w), B = 4, T = 16;
    // (the outer test wrote the config: the ranks share, and each clears, their test directory)
    const char *cfg_path = getenv("DSV3_TEST_EP_CONFIG");
    ModelConfig c;
    CHECK_MSG(cfg_path && config_load(&c, cfg_path, &err) == 0, "%s", err.msg);
    int tokens[4 * 17];
    uint64_t st = 11;
    for (int i = 0; i < B * (T + 1); i++) tokens[i] = (int)((st = st * 6364136223846793005ULL + 1) >> 33) % c.vocab_size;
    TrainModel ref, ep;
    CHECK(train_model_new(&ref, &c, B, T, &err) == 0);
    CHECK_MSG(train_model_new_sharded(&ep, &c, B / W, T, W, rank, &err) == 0, "%s", err.msg);
    train_model_init_random(&ref, 3);
    train_model_init_random(&ep, 3);
    TrainObjective obj = {.mtp_lambda = 0.3f, .seq_aux_alpha = 0.01f};
    ref.obj = ep.obj = obj;
    ExpertParallel *x = expert_parallel_new(w, &c, A2A_FP32, &err);
    CHECK_MSG(x, "%s", err.msg);
    ep.moe_parallel = expert_parallel_seam(x);
    train_model_zero_grad(&ref);
    train_model_zero_grad(&ep);
    CHECK(train_model_forward(&ref, tokens, &err) == 0 && train_model_backward(&ref, 1.0f, &err) == 0);
    CHECK_MSG(train_model_forward(&ep, tokens + (size_t)rank * (B / W) * (T + 1), &err) == 0 &&
                  train_model_backward(&ep, 1.0f / W, &err) == 0,
              "%s", err.msg);
    DistSum *sum = dist_sum_new(w, &err);
    CHECK(sum);
    int checked = 0;
    double worst = 0;
    for (int i = 0; i < ep.n_tensors; i++) {
        const TrainTensor *t = &ep.tensors[i], *rt = &ref.tensors[i];
        if (t->shared || t->remote || t->kind == TENSOR_BIAS) continue;
        float *g = ep.grads + t->offset;
        const float *want = ref.grads + rt->offset;
        if (t->expert < 0) {  // every rank's share of the batch: summed over the ranks
            CHECK(dist_sum_start(sum, g, t->numel, &err) == 0 && dist_sum_wait(sum, NULL, &err) == 0);
        }
        double md = 0, mx = 0;
        for (size_t j = 0; j < t->numel; j++) md = fmax(md, test_absdiff(g[j], want[j])), mx = fmax(mx, fabs(want[j]));
        CHECK_MSG(md <= 1e-5 * mx + 1e-12, "rank %d: %s: gradient off by %.3g of its largest %.3g", rank, t->name,
                  md / (mx > 0 ? mx : 1), mx);
        if (mx > 0) worst = fmax(worst, md / mx);
        checked++;
    }
    // the loads of every MoE layer (main and MTP), summed over the ranks, are the one process's
    int Nr = c.n_routed_experts;
    long long *loads = malloc(sizeof(long long) * ep.n_moe * Nr);
    memcpy(loads, ep.expert_load, sizeof(long long) * ep.n_moe * Nr);
    CHECK(dist_sum_i64(w, loads, ep.n_moe * Nr, &err) == 0);
    CHECK(memcmp(loads, ref.expert_load, sizeof(long long) * ep.n_moe * Nr) == 0);
    moe_bias_update(&ep, loads, 0.01f);
    moe_bias_update(&ref, ref.expert_load, 0.01f);
    for (int l = 0; l < ep.n_moe; l++) CHECK(memcmp(ep.moe_bias[l], ref.moe_bias[l], sizeof(float) * Nr) == 0);
    if (rank == 0) printf("    %d ranks: %d gradient tensors checked on rank 0, within %.2g\n", W, checked, worst);
    free(loads);
    dist_sum_free(sum);
    expert_parallel_free(x);
    train_model_free(&ep);
    train_model_free(&ref);
    dist_finalize();
}

// Expert parallel gradients, tensor by tensor, against one process (the inner part above), on 2
// and 4 ranks — the direct check behind the training-curve comparisons.
TEST(test_dist_expert_parallel_gradients_every_tensor) {
    if (getenv("DSV3_TEST_INNER")) {
        ep_gradients_inner();
        return;
    }
    const char *why = no_mpi();
    if (why) SKIP("%s", why);
    char self[4096], o[16384], cfg[600];
    snprintf(cfg, sizeof cfg, "%s/ep_grad_config.json", test_tmpdir());
    test_write_text(cfg, TEST_TINY_V3_CONFIG);
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    CHECK(n > 0);
    self[n > 0 ? n : 0] = 0;
    for (int np = 2; np <= 4; np += 2) {
        int rc = test_run(o, sizeof o, "DSV3_TEST_INNER=1 DSV3_TEST_EP_CONFIG='%s' TEST_TMP='%s/inner%d' %s -np %d '%s' "
                          "test_dist_expert_parallel_gradients_every_tensor", cfg, test_tmpdir(), np, MPIRUN, np, self);
        CHECK_MSG(rc == 0 && !strstr(o, "FAIL") && strstr(o, "1 passed, 0 failed"), "%d ranks: %s", np, o);
        const char *line = strstr(o, " gradient tensors checked");
        while (line && line > o && line[-1] != '\n') line--;
        if (line) printf("%.*s\n", (int)strcspn(line, "\n"), line);
    }
}
