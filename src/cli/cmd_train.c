// dsv3 train: pre-train (or continue) a DeepSeek-V3-architecture model on prepared token shards.
// The options are the rows of trainer_options[] (src/train/trainer.c); this file only parses
// them, adds --resume and --help, and prints.
#include <libgen.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "base/file.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "cli/util.h"
#include "dist/dist.h"
#include "train/trainer.h"

#define MAX_NAMES 64

// The names args_parse accepts: every valued row and --resume; every flag row and --help.
static int option_names(const char **valued, const char **flags, Error *err) {
    int nv = 0, nf = 0;
    valued[nv++] = "resume";
    flags[nf++] = "help";
    for (const TrainerOption *t = trainer_options; t->name; t++) {
        if (nv >= MAX_NAMES - 1 || nf >= MAX_NAMES - 1) return err_set(err, "more than %d options", MAX_NAMES - 2);
        if (t->type == TOPT_FLAG) flags[nf++] = t->name;
        else valued[nv++] = t->name;
    }
    valued[nv] = flags[nf] = NULL;
    return 0;
}

// Options given on the command line override the defaults (a new run) or the checkpoint's (a
// resumed run); those not given keep them.
static int apply(const Args *a, TrainerOptions *o, Error *err) {
    for (const TrainerOption *t = trainer_options; t->name; t++) {
        if (t->type == TOPT_FLAG) {
            if (args_flag(a, t->name)) trainer_option_set_integer(o, t, (long long)t->lo);
            continue;
        }
        const char *s = args_str(a, t->name, NULL);
        if (!s) continue;
        if (t->type == TOPT_STRING) {
            if (trainer_option_set_string(o, t, s)) return err_set(err, "--%s: longer than %zu bytes", t->name, t->size - 1);
        } else if (t->type == TOPT_FLOAT) {
            double x;
            if (args_double(a, t->name, 0, t->lo, t->hi, &x, err)) return -1;
            trainer_option_set_real(o, t, x);
        } else {
            long v;
            if (args_long(a, t->name, 0, (long)t->lo, (long)t->hi, &v, err)) return -1;
            trainer_option_set_integer(o, t, v);
        }
    }
    return 0;
}

static void print_help(FILE *f) {
    fprintf(f, "usage: dsv3 train (--config FILE | --init MODEL_DIR) --data DIR --out DIR [options]\n"
               "       dsv3 train --resume DIR [options]\n\n"
               "--resume takes a checkpoint or a run directory (its newest checkpoint). The resumed run keeps\n"
               "the options saved with it, except those given again and");
    const char *sep = " ";
    for (const TrainerOption *t = trainer_options; t->name; t++)
        if (!t->key) {
            fprintf(f, "%s--%s", sep, t->name);
            sep = ", ";
        }
    fprintf(f, ".\n\n");
    for (const TrainerOption *t = trainer_options; t->name; t++) {
        char head[64], dflt[64] = "";
        snprintf(head, sizeof head, "%s%s%s", t->name, t->arg ? " " : "", t->arg ? t->arg : "");
        if (t->type == TOPT_FLOAT) snprintf(dflt, sizeof dflt, "; default %g", t->dflt);
        else if (t->type != TOPT_STRING && t->type != TOPT_FLAG && t->dflt >= t->lo)
            snprintf(dflt, sizeof dflt, "; default %.0f", t->dflt);
        fprintf(f, "  --%-22s %s%s\n", head, t->help, dflt);
    }
}

static void print_result(const TrainerResult *res, const char *out) {
    printf("%s step %ld (%lld tokens): loss %.4f", res->step < res->steps ? "stopped at" : "trained to", res->step,
           res->tokens, res->loss);
    if (!isnan(res->val_loss)) printf(", validation loss %.4f", res->val_loss);
    printf("; checkpoint %s/step-%ld", out, res->step);
    if (res->peak_bytes) printf("; peak memory %.0f MB", res->peak_bytes / 1e6);
    printf("\n");
    if (res->profile_steps > 0) {
        char line[1024];
        backend_profile_summary(line, sizeof line, &res->profile, res->profile_s, res->profile_steps);
        printf("where the %ld steps went (%.3f s a step): %s\n", res->profile_steps, res->profile_s / res->profile_steps,
               line);
        backend_profile_ops(line, sizeof line, &res->profile, res->profile_steps, 8);
        printf("the longest operations, a step: %s\n", line);
    }
    if (res->ranks > 1) {
        printf("%d ranks (data parallel %d x expert parallel %d): gradient sum %.1f MB sent per step by a rank, "
               "%.1f ms alone, %.1f ms per step spent in it after the backward pass",
               res->ranks, res->data_parallel, res->expert_parallel, res->sync_bytes / 1e6, res->sync_alone_s * 1e3,
               res->sync_exposed_s * 1e3);
        if (res->sync_exposed_s <= res->sync_alone_s)  // more: ranks waited for each other, not for the sum
            printf(" (%.0f%% hidden)", res->sync_alone_s > 0 ? 100.0 * (1 - res->sync_exposed_s / res->sync_alone_s) : 0.0);
        printf("\n");
    }
    if (res->expert_parallel > 1)
        printf("expert parallel: a rank holds %lld of the %lld parameters; a token reached %.2f ranks; per step a "
               "rank sent %.2f MB dispatching and %.2f MB combining; the all-to-alls were %.1f ms in flight, %.1f ms "
               "of it waited for (%.0f%% hidden)\n",
               res->params_held, res->params_total, res->ranks_per_token, res->a2a_dispatch_bytes / 1e6,
               res->a2a_combine_bytes / 1e6, res->a2a_s * 1e3, res->a2a_wait_s * 1e3,
               res->a2a_s > 0 ? 100.0 * (1 - res->a2a_wait_s / res->a2a_s) : 0.0);
    if (res->expert_parallel > 1)
        printf("nodes of %d ranks: a token's routed experts lay on %.2f nodes (at most %d); per routed token and MoE "
               "layer a rank sent %.0f B within its node and %.0f B to other nodes\n",
               res->ranks_per_node, res->nodes_per_token, res->max_nodes, res->intra_node_bytes_per_token,
               res->inter_node_bytes_per_token);
}

// Under mpirun (main.c starts MPI for this command) every rank runs this; a failure every rank
// meets alike (the arguments, the run's setup) is reported by rank 0 alone.
int cmd_train(int argc, char **argv) {
    const char *cmd = "dsv3 train";
    Error err = {0};
    Args a;
    const char *valued[MAX_NAMES], *flags[MAX_NAMES];
    if (option_names(valued, flags, &err) || args_parse(&a, cmd, argc, argv, valued, flags, &err))
        return cli_fail_once(cmd, &err);
    if (args_flag(&a, "help")) {
        print_help(stdout);
        return 0;
    }
    if (a.npos > 0) {
        err_set(&err, "unexpected argument '%s'", a.pos[0]);
        return cli_fail_once(cmd, &err);
    }
    TrainerOptions o = trainer_defaults();
    const char *resume = args_str(&a, "resume", NULL);
    char ckpt[4096];
    if (resume) {
        // the run continues where its checkpoint lives unless --out says otherwise
        if (trainer_find_checkpoint(resume, ckpt, sizeof ckpt, &err) || trainer_read_options(ckpt, &o, &err))
            return cli_fail_once(cmd, &err);
        char parent[4096];
        snprintf(parent, sizeof parent, "%s", ckpt);
        snprintf(o.out, sizeof o.out, "%s", dirname(parent));
    } else if (!!args_str(&a, "config", NULL) == !!args_str(&a, "init", NULL) || !args_str(&a, "data", NULL) ||
               !args_str(&a, "out", NULL)) {
        err_set(&err, "a new run needs (--config FILE | --init MODEL_DIR) --data DIR --out DIR, or --resume DIR");
        return cli_fail_once(cmd, &err);
    }
    o.progress = isatty(STDERR_FILENO);  // --no-progress turns it off
    if (apply(&a, &o, &err)) return cli_fail_once(cmd, &err);
    TrainerResult res;
    if (trainer_run(&o, resume ? ckpt : NULL, &res, &err)) {
        int rank = dist_rank(dist_world());
        if (res.failed_rank < 0) {  // this rank failed alone mid-step: the others may wait for it forever
            fprintf(stderr, "%s: rank %d: %s\n", cmd, rank, err.msg);
            dist_abort(1);
        }
        if (res.failed_rank == rank) cli_fail(cmd, &err);
        return 1;
    }
    if (dist_rank(dist_world()) == 0) print_result(&res, o.out);
    return 0;
}
