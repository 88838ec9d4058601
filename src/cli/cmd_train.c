// dsv3 train: pre-train (or continue) a DeepSeek-V3-architecture model on prepared token shards.
#include <libgen.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "base/file.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "cli/util.h"
#include "train/trainer.h"

static const char *const VALUED[] = {"config", "init", "data", "out", "steps", "batch", "seq", "accum", "lr", "warmup",
                                     "decay-steps", "lr-final", "weight-decay", "grad-clip", "bias-update-speed",
                                     "seq-aux-alpha", "mtp-lambda", "eval-every", "eval-batches", "save-every",
                                     "resume", "seed", "stop-at", NULL};
static const char *const FLAGS[] = {"no-progress", NULL};

// Options given on the command line override the defaults (a new run) or the checkpoint's (a
// resumed run); those not given keep them.
static int apply(const Args *a, TrainerOptions *o, Error *err) {
    long v;
    double x;
#define LONG_OPT(name, field, lo, hi)                                   \
    if (args_str(a, name, NULL)) {                                      \
        if (args_long(a, name, 0, lo, hi, &v, err)) return -1;         \
        o->field = v;                                                   \
    }
#define NUM_OPT(name, field, lo, hi)                                    \
    if (args_str(a, name, NULL)) {                                      \
        if (args_double(a, name, 0, lo, hi, &x, err)) return -1;       \
        o->field = (float)x;                                            \
    }
    LONG_OPT("steps", steps, 1, 1L << 40)
    LONG_OPT("batch", batch, 1, 1 << 20)
    LONG_OPT("seq", seq, 2, 1 << 20)
    LONG_OPT("accum", accum, 1, 1 << 20)
    LONG_OPT("warmup", warmup, 0, 1L << 40)
    LONG_OPT("decay-steps", decay_steps, 0, 1L << 40)
    LONG_OPT("eval-every", eval_every, 0, 1L << 40)
    LONG_OPT("eval-batches", eval_batches, 0, 1L << 30)
    LONG_OPT("save-every", save_every, 0, 1L << 40)
    LONG_OPT("seed", seed, 0, 0x7fffffffffffL)
    LONG_OPT("stop-at", stop_at, 0, 1L << 40)
    NUM_OPT("lr", lr, 0, 10)
    NUM_OPT("lr-final", lr_final_frac, 0, 1)
    NUM_OPT("weight-decay", weight_decay, 0, 10)
    NUM_OPT("grad-clip", grad_clip, 0, 1e9)
    NUM_OPT("bias-update-speed", bias_update_speed, 0, 1)
    NUM_OPT("seq-aux-alpha", seq_aux_alpha, 0, 10)
    NUM_OPT("mtp-lambda", mtp_lambda, 0, 10)
#undef LONG_OPT
#undef NUM_OPT
    const char *s;
    if ((s = args_str(a, "config", NULL))) snprintf(o->config, sizeof o->config, "%s", s);
    if ((s = args_str(a, "init", NULL))) snprintf(o->init, sizeof o->init, "%s", s);
    if ((s = args_str(a, "data", NULL))) snprintf(o->data, sizeof o->data, "%s", s);
    if ((s = args_str(a, "out", NULL))) snprintf(o->out, sizeof o->out, "%s", s);
    return 0;
}

int cmd_train(int argc, char **argv) {
    const char *cmd = "dsv3 train";
    Error err = {0};
    Args a;
    if (args_parse(&a, cmd, argc, argv, VALUED, FLAGS, &err)) return cli_fail(cmd, &err);
    if (a.npos > 0) {
        err_set(&err, "unexpected argument '%s'", a.pos[0]);
        return cli_fail(cmd, &err);
    }
    TrainerOptions o = trainer_defaults();
    const char *resume = args_str(&a, "resume", NULL);
    char ckpt[4096];
    if (resume) {
        // the run continues where its checkpoint lives unless --out says otherwise
        if (trainer_find_checkpoint(resume, ckpt, sizeof ckpt, &err) || trainer_read_options(ckpt, &o, &err))
            return cli_fail(cmd, &err);
        char parent[4096];
        snprintf(parent, sizeof parent, "%s", ckpt);
        snprintf(o.out, sizeof o.out, "%s", dirname(parent));
    } else if (!!args_str(&a, "config", NULL) == !!args_str(&a, "init", NULL) || !args_str(&a, "data", NULL) ||
               !args_str(&a, "out", NULL)) {
        err_set(&err, "a new run needs (--config FILE | --init MODEL_DIR) --data DIR --out DIR, or --resume DIR");
        return cli_fail(cmd, &err);
    }
    o.stop_at = 0;  // an interruption point is never inherited from the checkpoint
    if (apply(&a, &o, &err)) return cli_fail(cmd, &err);
    o.progress = !args_flag(&a, "no-progress") && isatty(STDERR_FILENO);
    if (trainer_run(&o, resume ? ckpt : NULL, &err)) return cli_fail(cmd, &err);
    return 0;
}
