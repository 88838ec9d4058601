// Several processes under mpirun (src/dist): data-parallel training equals one process, every rank
// leaves together on bad input, and rank 0 alone writes. Run over shared memory and, once, over
// TCP (`--mca btl self,tcp`) so the network path is exercised. Skipped when the build has no MPI or
// mpirun is missing.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "dist/dist.h"
#include "test.h"

// Why the MPI tests cannot run here, or NULL.
static const char *no_mpi(void) {
    if (!dist_have_mpi()) return "built without MPI (OpenMPI not installed at build time)";
    if (test_run(NULL, 0, "command -v mpirun") != 0) return "mpirun not found";
    return NULL;
}

// mpirun as root too, one OpenMP thread per rank (2 or 4 ranks share this machine's cores), ranks
// yielding while they wait, and a time limit so that a hang fails the test instead of the suite.
#define MPIRUN                                                                                                 \
    "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1 OMP_NUM_THREADS=1 " \
    "timeout 300 mpirun --oversubscribe"

static int dp_train(char *out, size_t n, const char *launch, const char *run, long steps, const char *extra) {
    const char *dir = test_train_corpus();
    return test_run(out, n,
                    "%s %s train --config '%s/config.json' --data '%s/data' --out '%s' --steps %ld --batch 4 --seq 24 "
                    "--warmup 2 --lr 3e-3 --eval-every 3 --eval-batches 2 --save-every 3 --seq-aux-alpha 0.01 "
                    "--bias-update-speed 0.01 --seed 5 --no-progress %s",
                    launch, test_bin(), dir, dir, run, steps, extra);
}

// The numbers of metrics.jsonl in order (keys and the wall-clock tokens_per_s dropped).
static int metric_values(const char *run, double *v, int max) {
    char path[700];
    snprintf(path, sizeof path, "%s/metrics.jsonl", run);
    char *s = test_read_file(path, NULL);
    if (!s) return -1;
    int n = 0;
    for (char *p = s; (p = strstr(p, "\": ")) && n < max;) {
        int timing = p - s >= 12 && strncmp(p - 12, "tokens_per_s", 12) == 0;
        p += 3;
        double x = strtod(p, &p);
        if (!timing) v[n++] = x;
    }
    free(s);
    return n;
}

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

// The same global batch on 1, 2 and 4 ranks gives the same run: every loss, gradient norm, MaxVio
// and validation figure of every step within 1e-6 relative (measured: 2.5e-8 to 3.6e-8, the
// summation order of fp32 means and gradient sums), and the final weights within 3e-6 of their
// largest (measured 1.3e-7 to 3e-7). Two runs on
// the same number of ranks are identical to the bit. Rank 0 alone prints and writes.
TEST(test_dist_data_parallel_equals_one_process) {
    const char *why = no_mpi();
    if (why) SKIP("%s", why);
    const char *dir = test_train_corpus();
    long steps = 6;
    const char *runs[4] = {"dp_one", "dp_np2_tcp", "dp_np4", "dp_np2_again"};
    const char *launch[4] = {"", MPIRUN " -np 2 --mca btl self,tcp", MPIRUN " -np 4", MPIRUN " -np 2"};
    char path[4][600];
    double v[4][400];
    int nv[4];
    for (int i = 0; i < 4; i++) {
        char out[8192];
        snprintf(path[i], sizeof path[i], "%s/%s", dir, runs[i]);
        int rc = dp_train(out, sizeof out, launch[i], path[i], steps, "");
        CHECK_MSG(rc == 0, "%s: %s", runs[i], out);
        CHECK_MSG(test_count_lines(out) == (i == 0 ? 1 : 2), "%s: one summary from rank 0: %s", runs[i], out);
        CHECK_MSG(strstr(out, "trained to step 6") && (i == 0 || strstr(out, "data parallel over")), "%s", out);
        nv[i] = metric_values(path[i], v[i], 400);
        CHECK(nv[i] > 6 * 8);
    }
    for (int i = 1; i < 3; i++) {
        CHECK_MSG(nv[i] == nv[0], "%s: %d values, one process %d", runs[i], nv[i], nv[0]);
        double worst = 0;
        for (int k = 0; k < nv[0]; k++) worst = fmax(worst, fabs(v[i][k] - v[0][k]) / fmax(fabs(v[0][k]), 1e-3));
        CHECK_MSG(worst < 1e-6, "%s: metrics differ from one process by %.3g relative", runs[i], worst);
        char wa[700], wb[700];
        snprintf(wa, sizeof wa, "%s/step-6/model.safetensors", path[i]);
        snprintf(wb, sizeof wb, "%s/step-6/model.safetensors", path[0]);
        double wd = weights_rel_diff(wa, wb);
        CHECK_MSG(wd < 3e-6, "%s: final weights differ by %.3g of the largest", runs[i], wd);
        printf("    %s: metrics within %.2g, weights within %.2g of one process\n", runs[i], worst, wd);
    }
    char ma[700], mb[700];
    snprintf(ma, sizeof ma, "%s/step-6/model.safetensors", path[1]);
    snprintf(mb, sizeof mb, "%s/step-6/model.safetensors", path[3]);
    CHECK_MSG(weights_rel_diff(ma, mb) == 0, "two runs on 2 ranks differ");
    CHECK(nv[1] == nv[3] && memcmp(v[1], v[3], sizeof(double) * nv[1]) == 0);
    // the checkpoint of a data-parallel run continues on another number of ranks
    char out[8192];
    int rc = test_run(out, sizeof out, "%s -np 2 %s train --resume '%s/step-3' --no-progress", MPIRUN, test_bin(),
                      path[2]);
    CHECK_MSG(rc == 0 && strstr(out, "trained to step 6"), "%s", out);
    double r[400];
    int nr = metric_values(path[2], r, 400);
    CHECK(nr == nv[2]);
    double worst = 0;
    for (int k = 0; k < nr; k++) worst = fmax(worst, fabs(r[k] - v[0][k]) / fmax(fabs(v[0][k]), 1e-3));
    CHECK_MSG(worst < 1e-6, "resumed on 2 ranks: %.3g from one process", worst);
}

// Options every rank rejects alike: one line from rank 0, a non-zero exit of every rank, no run
// directory, no hang.
TEST(test_dist_bad_options_one_line_from_rank0) {
    const char *why = no_mpi();
    if (why) SKIP("%s", why);
    const char *dir = test_train_corpus();
    const char *bad[][2] = {{"--batch 3", "--batch 3: not divisible by the 2 data-parallel ranks"},
                            {"--data-parallel 4", "--data-parallel 4: the run has 2 processes"},
                            {"--precision fp16", "--precision: unknown value 'fp16'"}};
    for (int i = 0; i < 3; i++) {
        char run[600], out[8192];
        snprintf(run, sizeof run, "%s/dp_bad%d", dir, i);
        int rc = dp_train(out, sizeof out, MPIRUN " -np 2", run, 2, bad[i][0]);
        CHECK_MSG(rc != 0 && rc != 124, "%s: exit %d: %s", bad[i][0], rc, out);
        CHECK_MSG(strstr(out, bad[i][1]), "%s: %s", bad[i][0], out);
        char *first = strstr(out, "dsv3 train: ");
        CHECK_MSG(first && !strstr(first + 1, "dsv3 train: "), "%s: not one line: %s", bad[i][0], out);
        struct stat sb;
        CHECK_MSG(stat(run, &sb) != 0, "%s: the run directory was created", bad[i][0]);
    }
}
