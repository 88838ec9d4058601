#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/procmem.h"
#include "cli/util.h"
#include "text/token_list.h"

int parse_token_list(const char *s, int **out, int *n, Error *err) {
    return token_list_parse(s, out, n, err) ? err_prefix(err, "--tokens") : 0;
}

int cli_fail_once(const char *cmd, const Error *err) {
    if (dist_rank(dist_world()) == 0) cli_fail(cmd, err);
    return 1;
}

int cli_fail(const char *cmd, const Error *err) {
    fprintf(stderr, "%s: %s\n", cmd, err->msg);
    return 1;
}

int parse_logit_bias(const Args *a, int **ids, float **values, int *n, Error *err) {
    const char *v = args_str(a, "logit-bias", NULL);
    *ids = NULL;
    *values = NULL;
    *n = 0;
    if (!v) return 0;
    int cap = 1;
    for (const char *p = v; *p; p++) cap += *p == ',';
    *ids = malloc(sizeof(int) * cap);
    *values = malloc(sizeof(float) * cap);
    if (!*ids || !*values) return err_set(err, "--logit-bias: out of memory");
    for (const char *p = v;;) {
        char *end;
        long id = strtol(p, &end, 10);
        double b = 0;
        int ok = end != p && *end == '=' && id >= 0 && id <= 0x7fffffff;
        if (ok) {
            const char *q = end + 1;
            b = strtod(q, &end);
            ok = end != q && (*end == ',' || *end == '\0') && b >= -100 && b <= 100;
        }
        if (!ok) return err_set(err, "--logit-bias '%.60s': give ID=BIAS pairs separated by commas, BIAS in [-100, 100]", v);
        (*ids)[*n] = (int)id;
        (*values)[(*n)++] = (float)b;
        if (*end == '\0') return 0;
        p = end + 1;
    }
}

int parse_sampling(const Args *a, SeqParams *sp, Error *err) {
    long max_new, top_k, seed;
    double temp, top_p;
    if (args_long(a, "max-new", sp->max_new, 1, 1 << 20, &max_new, err) ||
        args_long(a, "top-k", sp->top_k, 0, 1 << 30, &top_k, err) ||
        args_long(a, "seed", (long)sp->seed, 0, 0x7fffffffL, &seed, err) ||
        args_double(a, "temperature", sp->temperature, 0.0, 100.0, &temp, err) ||
        args_double(a, "top-p", sp->top_p, 0.0, 1.0, &top_p, err))
        return -1;
    sp->max_new = (int)max_new;
    sp->top_k = (int)top_k;
    sp->seed = (unsigned long long)seed;
    sp->temperature = (float)temp;
    sp->top_p = (float)top_p;
    return 0;
}

int parse_kv_dtype(const Args *a, const char *dflt, DType *out, int *is_auto, Error *err) {
    const char *s = args_str(a, "kv-dtype", dflt);
    *is_auto = 0, *out = DT_F32;
    if (!strcmp(s, "bf16")) *out = DT_BF16;
    else if (!strcmp(s, "auto")) *is_auto = 1;
    else if (strcmp(s, "f32") != 0) return err_set(err, "--kv-dtype: '%s' is not f32, bf16 or auto", s);
    return 0;
}

double cli_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int cli_expert_parallel_size(const Args *a, long *E, Error *err) {
    int world = dist_size(dist_world());
    TRY(args_long(a, "expert-parallel", 1, 1, 1 << 20, E, err));
    if (*E != world)
        return err_set(err, "--expert-parallel %ld: the run has %d processes (start it with mpirun -np %ld)", *E, world,
                       *E);
    return 0;
}

int cli_expert_parallel_start(Model *m, ExpertParallel **ep, Error *err) {
    *ep = expert_parallel_new(dist_world(), &m->cfg, A2A_FP32, err);
    if (!*ep) return -1;
    m->moe_parallel = expert_parallel_seam_replicated(*ep);
    return 0;
}

int cli_report_expert_ranks(const ExpertParallel *ep, Model *m, Error *err) {
    DistComm *w = dist_world();
    int n = dist_size(w);
    long long used, all;
    expert_parallel_weight_bytes(ep, &m->cfg, &m->w, &used, &all);
    double mine[3] = {(double)used, (double)all, (double)procmem_resident_bytes()}, *every = malloc(sizeof mine * n);
    if (!every) return err_set(err, "out of memory");
    int rc = dist_gather(w, mine, sizeof mine, every, 0, err);
    if (!rc && dist_rank(w) == 0)
        for (int r = 0; r < n; r++)
            fprintf(stderr, "rank %d: reads %.1f MB of the %.1f MB of weights (its experts only); resident %.1f MB\n", r,
                    every[3 * r] / 1e6, every[3 * r + 1] / 1e6, every[3 * r + 2] / 1e6);
    free(every);
    return rc;
}

int parse_decode_tiles(const Args *a, long parallel, long *rows, Error *err) {
    const char *s = args_str(a, "decode-tiles", "auto");
    if (strcmp(s, "auto") != 0 && strcmp(s, "on") != 0 && strcmp(s, "off") != 0)
        return err_set(err, "--decode-tiles: unknown value '%s' (auto, on or off)", s);
    *rows = strcmp(s, "auto") == 0 ? parallel : strcmp(s, "on") == 0 ? MODEL_PANEL_TILES_ALL : 0;
    return 0;
}

int parse_compute(const Args *a, const char *dflt, ComputeMode *mode, Error *err) {
    const char *s = args_str(a, "compute", dflt);
    if (strcmp(s, "f32") != 0 && strcmp(s, "bf16") != 0 && strcmp(s, "auto") != 0)
        return err_set(err, "--compute: unknown value '%s' (f32, bf16 or auto)", s);
    *mode = strcmp(s, "bf16") == 0 ? COMPUTE_BF16 : strcmp(s, "auto") == 0 ? COMPUTE_AUTO : COMPUTE_F32;
    return 0;
}
