#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/file.h"
#include "base/procmem.h"
#include "dist/dist.h"
#include "dist/expert_parallel.h"
#include "model/config.h"
#include "model/convert_checkpoint.h"
#include "train/data.h"
#include "train/optim.h"
#include "train/train_model.h"
#include "train/trainer.h"

// ---- the options ----

// A row's field: its offset, after a compile-time check that the field has the row's C type (a
// mismatch makes a negative array size), and its size.
#define FIELD(f, ctype)                                                                                   \
    .offset = offsetof(TrainerOptions, f) +                                                               \
              0 * sizeof(char[_Generic(((TrainerOptions *)0)->f, ctype: 1, default: -1)]),                \
    .size = sizeof(((TrainerOptions *)0)->f)
#define OPT(type_, ctype, name_, key_, f, dflt_, lo_, hi_, arg_, help_)                                  \
    {.name = name_, .key = key_, .type = type_, FIELD(f, ctype), .dflt = dflt_, .lo = lo_, .hi = hi_,     \
     .arg = arg_, .help = help_}
// (name, key, field, default, lo, hi, placeholder, help)
#define INT_OPT(...) OPT(TOPT_INT, int, __VA_ARGS__)
#define LONG_OPT(...) OPT(TOPT_LONG, long, __VA_ARGS__)
#define UINT64_OPT(...) OPT(TOPT_UINT64, uint64_t, __VA_ARGS__)
#define FLOAT_OPT(...) OPT(TOPT_FLOAT, float, __VA_ARGS__)
#define STRING_OPT(name_, key_, f, arg_, help_) OPT(TOPT_STRING, char *, name_, key_, f, 0, 0, 0, arg_, help_)
// a flag is never saved; giving it stores `value`
#define FLAG_OPT(name_, f, dflt_, value, help_) OPT(TOPT_FLAG, int, name_, NULL, f, dflt_, value, value, NULL, help_)

#define STEPS_MAX (double)(1L << 40)

// Every option of `dsv3 train`, in the order of trainer_state.json and --help. A key of NULL: not
// saved with the run. progress defaults to off in the library; the command turns it on when
// stderr is a terminal, and --no-progress stores 0.
const TrainerOption trainer_options[] = {
    STRING_OPT("config", "config", config, "FILE", "model config.json of a new run (a resumed run has its checkpoint's)"),
    STRING_OPT("init", "init", init, "MODEL_DIR", "or start from this model's config and weights (any stored dtype)"),
    STRING_OPT("data", "data", data, "DIR", "data directory from `dsv3 prepare`"),
    STRING_OPT("out", NULL, out, "DIR", "run directory (a resumed run: its checkpoint's)"),
    LONG_OPT("steps", "steps", steps, 1000, 1, STEPS_MAX, "N", "optimiser steps of the whole run (a resumed run included)"),
    INT_OPT("batch", "batch", batch, 8, 1, 1 << 20, "B", "sequences per micro-batch"),
    INT_OPT("seq", "seq", seq, 256, 2, 1 << 20, "T", "positions per sequence"),
    INT_OPT("accum", "accum", accum, 1, 1, 1 << 20, "A", "micro-batches per step"),
    FLOAT_OPT("lr", "lr", lr, 3e-4, 0, 10, "LR", "peak learning rate"),
    LONG_OPT("warmup", "warmup", warmup, 100, 0, STEPS_MAX, "N", "linear warmup steps"),
    LONG_OPT("decay-steps", "decay_steps", decay_steps, -1, 0, STEPS_MAX, "N",
             "cosine decay over the last N steps; default: the last quarter of the run"),
    FLOAT_OPT("lr-final", "lr_final_frac", lr_final_frac, 0.1, 0, 1, "F", "the decay ends at F x the peak learning rate"),
    FLOAT_OPT("weight-decay", "weight_decay", weight_decay, 0.1, 0, 10, "W", "AdamW's decoupled weight decay (matrices only)"),
    FLOAT_OPT("grad-clip", "grad_clip", grad_clip, 1.0, 0, 1e9, "C", "clip the global gradient norm to C (0: no clipping)"),
    FLOAT_OPT("bias-update-speed", "bias_update_speed", bias_update_speed, 0.001, 0, 1, "G",
              "gamma of the auxiliary-loss-free balancing (0: off)"),
    FLOAT_OPT("seq-aux-alpha", "seq_aux_alpha", seq_aux_alpha, 0.0001, 0, 10, "A",
              "alpha of the sequence-wise balance loss (0: off)"),
    FLOAT_OPT("mtp-lambda", "mtp_lambda", mtp_lambda, 0.3, 0, 10, "L", "lambda of the MTP loss (0: the MTP modules do not run)"),
    STRING_OPT("precision", "precision", precision, "P",
               "operands of the linear layers' GEMMs: fp32 (default), bf16, or fp8 (the V3 report's recipe)"),
    STRING_OPT("fp8-grad", "fp8_grad", fp8_grad, "F", "fp8: the output gradients' format, e4m3 (default, the report's) or e5m2"),
    STRING_OPT("fp8-scaling", "fp8_scaling", fp8_scaling, "S",
               "fp8: tile (default: 1x128 activation tiles, 128x128 weight blocks) or tensor (one scale each)"),
    STRING_OPT("fp8-scale-format", "fp8_scale_format", fp8_scale_format, "F",
               "fp8: fp32 (default) or ue8m0 (activation and gradient scales rounded up to powers of two)"),
    INT_OPT("fp8-accum-bits", "fp8_accum_bits", fp8_accum_bits, 0, 0, 23, "B",
            "fp8: emulate a tensor core keeping B bits per 32-product group (H800: ~14; 0: fp32, the default; slow)"),
    STRING_OPT("fp8-promotion", "fp8_promotion", fp8_promotion, "P",
               "fp8: on (default: each 128-chunk promoted to fp32 with its scales) or off (needs --fp8-accum-bits)"),
    STRING_OPT("moments", "moments", moments, "T", "AdamW moments stored as f32 (default) or bf16 (the report's)"),
    STRING_OPT("head-precision", "head_precision", head_precision, "P",
               "the output heads' GEMMs: fp32 (default, as the report keeps the head) or bf16 (BF16 operands, fp32 sums)"),
    LONG_OPT("eval-every", "eval_every", eval_every, 100, 0, STEPS_MAX, "K",
             "validation loss at step 0 and every K steps (0: at the last)"),
    LONG_OPT("eval-batches", "eval_batches", eval_batches, 8, 0, 1L << 30, "N", "batches per evaluation (0: no evaluation)"),
    LONG_OPT("save-every", "save_every", save_every, 500, 0, STEPS_MAX, "K", "a checkpoint every K steps (0: at the last)"),
    LONG_OPT("stop-at", NULL, stop_at, 0, 0, STEPS_MAX, "N",
             "stop after step N with a checkpoint, as if interrupted (0: never)"),
    UINT64_OPT("seed", "seed", seed, 1, 0, 0x7fffffffffffL, "S", "weight init and data order"),
    STRING_OPT("save-dtype", "save_dtype", save_dtype, "f32|bf16|fp8",
               "dtype of the checkpoints' weights; default f32, the master weights (bf16, fp8: master/ keeps them)"),
    FLAG_OPT("no-progress", progress, 0, 0, "no live progress line on stderr (shown when stderr is a terminal)"),
    FLAG_OPT("profile", profile, 0, 1,
             "time the steps' operations by kind (products, attention, loss, optimiser, the rest) and print where "
             "they went"),
    INT_OPT("data-parallel", NULL, data_parallel, 0, 0, 1 << 20, "D",
            "under mpirun: groups of --expert-parallel ranks, D x E = the processes (0: that quotient)"),
    INT_OPT("expert-parallel", NULL, expert_parallel, 1, 1, 1 << 20, "E",
            "under mpirun: ranks that split the routed experts; every rank takes batch/(D x E) sequences"),
    STRING_OPT("ep-overlap", NULL, ep_overlap, "on|off",
               "expert parallel: run one half of a layer's tokens while the other half's all-to-all is in flight"),
    INT_OPT("ranks-per-node", NULL, ranks_per_node, 0, 0, 1 << 20, "R",
            "expert parallel: ranks per node for the traffic counts (0: as the launcher placed them)"),
    STRING_OPT("a2a-dtype", NULL, a2a_dtype, "T",
               "expert parallel payloads: fp32 (default, exact), bf16, fp8 or logfmt8|10 (dispatch so, BF16 combine)"),
    {0},
};

static void *field(TrainerOptions *o, const TrainerOption *t) { return (char *)o + t->offset; }

void trainer_option_set_integer(TrainerOptions *o, const TrainerOption *t, long long v) {
    void *p = field(o, t);
    switch (t->type) {
    case TOPT_INT:
    case TOPT_FLAG: *(int *)p = (int)v; break;
    case TOPT_LONG: *(long *)p = (long)v; break;
    case TOPT_UINT64: *(uint64_t *)p = (uint64_t)v; break;
    case TOPT_FLOAT: *(float *)p = (float)v; break;
    case TOPT_STRING: break;
    }
}

void trainer_option_set_real(TrainerOptions *o, const TrainerOption *t, double v) {
    if (t->type == TOPT_FLOAT) *(float *)field(o, t) = (float)v;
    else trainer_option_set_integer(o, t, (long long)v);
}

int trainer_option_set_string(TrainerOptions *o, const TrainerOption *t, const char *v) {
    if (t->type != TOPT_STRING || strlen(v) >= t->size) return -1;
    memcpy(field(o, t), v, strlen(v) + 1);
    return 0;
}

TrainerOptions trainer_defaults(void) {
    TrainerOptions o;
    memset(&o, 0, sizeof o);
    for (const TrainerOption *t = trainer_options; t->name; t++)
        if (t->type == TOPT_FLOAT) trainer_option_set_real(&o, t, t->dflt);
        else if (t->type != TOPT_STRING) trainer_option_set_integer(&o, t, (long long)t->dflt);
    return o;
}

json_t *trainer_options_json(const TrainerOptions *o, Error *err) {
    json_t *obj = json_object();
    if (!obj) return err_set(err, "out of memory"), NULL;
    for (const TrainerOption *t = trainer_options; t->name; t++) {
        if (!t->key) continue;
        const void *p = (const char *)o + t->offset;
        json_t *v = NULL;
        switch (t->type) {
        case TOPT_INT:
        case TOPT_FLAG: v = json_integer(*(const int *)p); break;
        case TOPT_LONG: v = json_integer(*(const long *)p); break;
        case TOPT_UINT64: v = json_integer((json_int_t) * (const uint64_t *)p); break;
        case TOPT_FLOAT: v = json_real(*(const float *)p); break;
        case TOPT_STRING: v = json_string(p); break;
        }
        if (!v || json_object_set_new(obj, t->key, v)) {
            json_decref(obj);
            if (t->type == TOPT_STRING) err_set(err, "--%s: '%s' is not valid UTF-8", t->name, (const char *)p);
            else err_set(err, "out of memory");
            return NULL;
        }
    }
    return obj;
}

// One saved option back into o. Its range is the command line's, or its default (−1 = auto).
static int read_option(TrainerOptions *o, const TrainerOption *t, json_t *v, const char *path, Error *err) {
    if (t->type == TOPT_STRING) {
        if (!json_is_string(v)) return err_set(err, "%s: options.%s: not a string", path, t->key);
        if (trainer_option_set_string(o, t, json_string_value(v)))
            return err_set(err, "%s: options.%s: longer than %zu bytes", path, t->key, t->size - 1);
        return 0;
    }
    if (!json_is_number(v)) return err_set(err, "%s: options.%s: not a number", path, t->key);
    double x = json_number_value(v);
    if (t->type == TOPT_FLOAT) {
        if (!(x >= t->lo && x <= t->hi) && (float)x != (float)t->dflt)
            return err_set(err, "%s: options.%s: %g is outside [%g, %g]", path, t->key, x, t->lo, t->hi);
        trainer_option_set_real(o, t, x);
        return 0;
    }
    if (!json_is_integer(v) && (x != floor(x) || fabs(x) > 9e18)) return err_set(err, "%s: options.%s: %g is not an integer", path, t->key, x);
    long long n = json_is_integer(v) ? (long long)json_integer_value(v) : (long long)x;
    if ((n < (long long)t->lo || n > (long long)t->hi) && n != (long long)t->dflt)
        return err_set(err, "%s: options.%s: %lld is outside [%lld, %lld]", path, t->key, n, (long long)t->lo,
                       (long long)t->hi);
    trainer_option_set_integer(o, t, n);
    return 0;
}

int trainer_read_options(const char *ckpt, TrainerOptions *o, Error *err) {
    char path[4096];
    if (path_join(path, sizeof path, ckpt, "trainer_state.json", err)) return -1;
    if (!path_exists(path)) return err_set(err, "%s: missing", path);
    json_t *st = file_read_json(path, 0, err);
    if (!st) return -1;
    json_t *op = json_object_get(st, "options");
    *o = trainer_defaults();
    int rc = json_is_object(op) ? 0 : err_set(err, "%s: options: missing", path);
    for (const TrainerOption *t = trainer_options; t->name && !rc; t++) {
        json_t *v = t->key ? json_object_get(op, t->key) : NULL;
        if (v) rc = read_option(o, t, v, path, err);
    }
    json_decref(st);
    return rc;
}

// ---- checkpoints ----

static int has_state(const char *dir) {
    char p[4400];
    Error e;
    return path_join(p, sizeof p, dir, "trainer_state.json", &e) == 0 && path_exists(p);
}

int trainer_find_checkpoint(const char *dir, char *out, size_t n, Error *err) {
    if (!path_is_dir(dir)) return err_set(err, "%s: --resume: no such directory", dir);
    if (has_state(dir)) {
        snprintf(out, n, "%s", dir);
        return 0;
    }
    DIR *d = opendir(dir);
    if (!d) return err_set(err, "%s: cannot list", dir);
    long best = -1;
    struct dirent *e;
    while ((e = readdir(d))) {
        char *end;
        if (strncmp(e->d_name, "step-", 5) != 0) continue;
        long s = strtol(e->d_name + 5, &end, 10);
        char p[4400];
        snprintf(p, sizeof p, "%.4096s/%.256s", dir, e->d_name);
        if (*end == 0 && s > best && has_state(p)) best = s;  // step-N.tmp is never complete
    }
    closedir(d);
    if (best < 0) return err_set(err, "%s: --resume: neither a checkpoint nor a run with one (no step-N/trainer_state.json)", dir);
    if ((size_t)snprintf(out, n, "%s/step-%ld", dir, best) >= n) return err_set(err, "%s: path too long", dir);
    return 0;
}

typedef struct Run {
    TrainerOptions o;
    TrainModel m;
    DistComm *world;    // all of the run's processes
    int rank, W;        // this rank, their number; each takes B / W sequences of a micro-batch
    int D, E;           // data parallel x expert parallel = W: E ranks share the routed experts
    int R;              // ranks per node
    DistComm *ep_comm;  // this rank's expert-parallel group: ranks E·(rank / E) .. E·(rank / E) + E − 1
    DistComm *edp_comm; // the D ranks holding the same experts as this one: rank % E alike
    ExpertParallel *ep;
    DistSum *sync_experts;  // the routed experts' gradient sum over edp_comm (E > 1)
    struct SyncSeg {
        size_t offset, n;
        int experts;  // routed experts' gradients: summed over the ranks holding them (edp_comm)
    } *segs;          // each gradient group's runs of tensors, in group order
    int *seg_of;      // (n_grad_groups + 1) group g's runs: segs[seg_of[g] .. seg_of[g + 1])
    DistSum *sync;      // the gradient sum in flight
    unsigned char *synced;  // (n_grad_groups) the groups started in this step's sum
    AdamW opt;
    DataLoader train, val;
    int have_val;
    DType save_dtype;   // of the checkpoints' model.safetensors
    long step;          // steps done
    long long tokens;   // tokens trained on
} Run;

// ---- the ranks ----

// The model's parameters, the experts other ranks hold included (the MTP copies of the embedding
// and head are the originals).
static long long params_total(const TrainModel *m) {
    long long n = 0;
    for (int i = 0; i < m->n_tensors; i++) n += m->tensors[i].shared ? 0 : (long long)m->tensors[i].numel;
    return n;
}

// The expert-parallel groups: E consecutive ranks each, the routed experts split over a group's
// ranks and the MoE layers exchanging tokens within it; and the groups of D ranks that hold the
// same experts, over which their gradients are summed. Collective over the world.
static int start_expert_parallel(Run *r, Error *err) {
    TRY(dist_split(r->world, r->rank / r->E, r->rank, &r->ep_comm, err));
    TRY(dist_split(r->world, r->rank % r->E, r->rank, &r->edp_comm, err));
    A2aDtype t = A2A_FP32;
    if (r->o.a2a_dtype[0]) a2a_dtype_parse(r->o.a2a_dtype, &t);  // checked in prepare
    r->ep = expert_parallel_new(r->ep_comm, &r->m.cfg, t, err);
    if (!r->ep || expert_parallel_set_nodes(r->ep, r->R < r->E ? r->R : r->E, err)) return -1;
    expert_parallel_set_overlap(r->ep, strcmp(r->o.ep_overlap, "off") != 0);
    r->m.moe_parallel = expert_parallel_seam(r->ep);
    r->sync_experts = dist_sum_new(r->edp_comm, err);
    return r->sync_experts ? 0 : -1;
}

// Each gradient group's runs of held tensors, cut where the routed experts' begin and end (with
// expert parallelism they are summed over the ranks holding them, the rest over all ranks).
static int plan_sync(Run *r, Error *err) {
    TrainModel *m = &r->m;
    r->segs = calloc(m->n_tensors + 1, sizeof *r->segs);
    r->seg_of = calloc(m->n_grad_groups + 1, sizeof *r->seg_of);
    if (!r->segs || !r->seg_of) return err_set(err, "out of memory");
    int n = 0;
    for (int g = 0; g < m->n_grad_groups; g++) {
        r->seg_of[g] = n;
        for (int i = 0; i < m->n_tensors; i++) {
            const TrainTensor *t = &m->tensors[i];
            if (t->group != g || t->shared || t->remote) continue;
            int experts = r->E > 1 && t->expert >= 0;
            if (n > r->seg_of[g] && r->segs[n - 1].experts == experts &&
                r->segs[n - 1].offset + r->segs[n - 1].n == t->offset)
                r->segs[n - 1].n += t->numel;
            else r->segs[n++] = (struct SyncSeg){t->offset, t->numel, experts};
        }
    }
    r->seg_of[m->n_grad_groups] = n;
    return 0;
}

// The global gradient norm: every rank holds the dense gradients whole; the routed experts' are
// spread over an expert-parallel group, whose parts add up.
static int global_norm(Run *r, double *norm, Error *err) {
    if (r->E == 1) {
        *norm = grad_global_norm(&r->m);
        return 0;
    }
    double parts[2];
    if (grad_sum_squares(&r->m, parts)) return err_set(err, "gradient norm: %s", r->m.be->err.msg);
    TRY(dist_sum_f64(r->ep_comm, &parts[1], 1, err));
    *norm = sqrt(parts[0] + parts[1]);
    return 0;
}

// Remote experts' values for a checkpoint: rank 0 gets a pointer to every tensor's values (held
// ones in base, an array laid out like the parameter block with elem-byte entries; the others
// gathered into *gathered, which the caller frees) in ptrs (n_tensors). The ranks of rank 0's
// expert-parallel group take part, the others return at once.
static int gather_experts(Run *r, const void *base, size_t elem, const void **ptrs, void **gathered, Error *err) {
    TrainModel *m = &r->m;
    *gathered = NULL;
    for (int i = 0; i < m->n_tensors; i++) ptrs[i] = (const char *)base + m->tensors[i].offset * elem;
    if (r->E == 1 || r->rank >= r->E) return 0;
    size_t mine = 0;  // this rank's experts, packed in tensor order
    for (int i = 0; i < m->n_tensors; i++)
        if (m->tensors[i].expert >= 0 && !m->tensors[i].remote) mine += m->tensors[i].numel * elem;
    char *send = malloc(mine + 1), *all = r->rank == 0 ? malloc(mine * r->E + 1) : NULL;
    if (!send || (r->rank == 0 && !all)) {
        free(send);
        free(all);
        return err_set(err, "checkpoint: out of memory gathering the experts");
    }
    size_t at = 0;
    for (int i = 0; i < m->n_tensors; i++)
        if (m->tensors[i].expert >= 0 && !m->tensors[i].remote) {
            memcpy(send + at, ptrs[i], m->tensors[i].numel * elem);
            at += m->tensors[i].numel * elem;
        }
    int rc = dist_gather(r->ep_comm, send, mine, all, 0, err);
    free(send);
    if (rc || r->rank != 0) {
        free(all);
        return rc;
    }
    int per = m->cfg.n_routed_experts / r->E;
    size_t *pos = calloc(r->E, sizeof *pos);  // how far into each rank's part the walk is
    if (!pos) {
        free(all);
        return err_set(err, "out of memory");
    }
    for (int i = 0; i < m->n_tensors; i++) {
        const TrainTensor *t = &m->tensors[i];
        if (t->expert < 0) continue;
        int owner = t->expert / per;
        ptrs[i] = all + owner * mine + pos[owner];
        pos[owner] += t->numel * elem;
    }
    free(pos);
    *gathered = all;
    return 0;
}

// ---- checkpoints of the run ----

static int write_checkpoint(Run *r, const float *const *values, const void *const *moments[2], Error *err);

// Every rank comes here: the routed experts other ranks hold are gathered to rank 0, which writes.
static int save_checkpoint(Run *r, Error *err) {
    int n = r->m.n_tensors;
    const void **ptrs = calloc(3 * (size_t)n + 1, sizeof *ptrs);
    void *bufs[3] = {0};
    if (!ptrs) return err_set(err, "out of memory");
    size_t melem = r->opt.m16 ? sizeof(uint16_t) : sizeof(float);
    const void *mom[2] = {r->opt.m16 ? (const void *)r->opt.m16 : (const void *)r->opt.m,
                          r->opt.m16 ? (const void *)r->opt.v16 : (const void *)r->opt.v};
    int rc = gather_experts(r, r->m.params, sizeof(float), ptrs, &bufs[0], err);
    for (int k = 0; k < 2 && !rc; k++) rc = gather_experts(r, mom[k], melem, ptrs + (k + 1) * n, &bufs[k + 1], err);
    if (!rc && r->rank == 0) {
        const void *const *moments[2] = {ptrs + n, ptrs + 2 * n};
        rc = write_checkpoint(r, (const float *const *)ptrs, moments, err);
    }
    for (int k = 0; k < 3; k++) free(bufs[k]);
    free(ptrs);
    return rc;
}

static int write_checkpoint(Run *r, const float *const *values, const void *const *moments[2], Error *err) {
    char dir[4200], tmp[4300], old[4300];
    snprintf(dir, sizeof dir, "%s/step-%ld", r->o.out, r->step);
    snprintf(tmp, sizeof tmp, "%s.tmp", dir);
    snprintf(old, sizeof old, "%s.old", dir);
    path_remove_tree(tmp);
    char path[4400];
    if (train_model_save_values(&r->m, tmp, values, r->save_dtype, (size_t)4 << 30, err)) return -1;
    // a BF16 or FP8 model.safetensors has lost bits the run needs: --resume reads these
    snprintf(path, sizeof path, "%s/master", tmp);
    if (r->save_dtype != DT_F32 && train_model_save_values(&r->m, path, values, DT_F32, (size_t)4 << 30, err))
        return -1;
    snprintf(path, sizeof path, "%s/optimizer.safetensors", tmp);
    if (adamw_save_values(&r->opt, &r->m, path, moments, err)) return -1;
    if (file_copy_if_exists(r->o.data, tmp, "tokenizer.json", err) ||
        file_copy_if_exists(r->o.data, tmp, "tokenizer_config.json", err))
        return -1;
    json_t *opts = trainer_options_json(&r->o, err);
    if (!opts) return -1;
    json_t *st = json_pack("{s:s, s:I, s:I, s:I, s:{s:I, s:I, s:I}, s:o}", "made_by", "dsv3 train", "step",
                           (json_int_t)r->step, "tokens", (json_int_t)r->tokens, "adamw_step", (json_int_t)r->opt.step,
                           "data", "epoch", (json_int_t)r->train.epoch, "pos", (json_int_t)r->train.pos, "windows",
                           (json_int_t)r->train.n_windows, "options", opts);
    if (!st) return err_set(err, "out of memory");
    char *js = json_dumps(st, JSON_INDENT(2));
    json_decref(st);
    snprintf(path, sizeof path, "%s/trainer_state.json", tmp);
    int rc = js ? file_write_all(path, js, strlen(js), err) : err_set(err, "out of memory");
    free(js);
    if (rc) return -1;
    // the old checkpoint of this step (a resumed run passing it again) stays until the new one is in place
    path_remove_tree(old);
    if (path_exists(dir) && rename(dir, old)) return err_set(err, "%s: cannot move aside: %s", dir, strerror(errno));
    if (rename(tmp, dir)) return err_set(err, "%s: cannot rename into place: %s", dir, strerror(errno));
    path_remove_tree(old);
    return 0;
}

static int load_checkpoint(Run *r, const char *ckpt, Error *err) {
    char path[4200];
    snprintf(path, sizeof path, "%s/master", ckpt);  // the master weights of a bf16 or fp8 checkpoint
    if (train_model_load(&r->m, path_is_dir(path) ? path : ckpt, err)) return -1;
    snprintf(path, sizeof path, "%s/optimizer.safetensors", ckpt);
    if (adamw_load(&r->opt, &r->m, path, err)) return -1;
    snprintf(path, sizeof path, "%s/trainer_state.json", ckpt);
    json_t *st = file_read_json(path, 0, err);
    if (!st) return -1;
    json_t *data = json_object_get(st, "data");
    json_t *v[] = {json_object_get(st, "step"), json_object_get(st, "tokens"), json_object_get(st, "adamw_step"),
                   json_object_get(data, "epoch"), json_object_get(data, "pos"), json_object_get(data, "windows")};
    static const char *const name[] = {"step", "tokens", "adamw_step", "data.epoch", "data.pos", "data.windows"};
    for (int i = 0; i < 6; i++) {
        int is_int = json_is_integer(v[i]);
        long long x = (long long)json_integer_value(v[i]);  // (0 when not an integer)
        if (is_int && x >= 0) continue;
        json_decref(st);  // (v[i] with it)
        if (!is_int) return err_set(err, "%s: step, tokens, adamw_step or data position missing", path);
        return err_set(err, "%s: %s is %lld; it must not be negative", path, name[i], x);
    }
    r->step = (long)json_integer_value(v[0]);
    r->tokens = (long long)json_integer_value(v[1]);
    r->opt.step = (long)json_integer_value(v[2]);
    long epoch = (long)json_integer_value(v[3]), pos = (long)json_integer_value(v[4]);
    long windows = (long)json_integer_value(v[5]);
    json_decref(st);
    if (windows != r->train.n_windows)
        return err_set(err, "%s: the run had %ld training windows per epoch, %s now gives %ld (different data or --seq)",
                       path, windows, r->o.data, r->train.n_windows);
    return loader_seek(&r->train, epoch, pos, err);
}

// ---- metrics ----

// Keeps the lines of metrics.jsonl up to step `upto` (a resumed run rewrites what follows).
static int truncate_metrics(const char *path, long upto, Error *err) {
    if (!path_exists(path)) return 0;
    size_t n;
    char *s = file_read_all(path, &n, err);
    if (!s) return -1;
    size_t keep = 0;
    for (char *line = s; *line;) {
        char *nl = strchr(line, '\n');
        if (!nl) break;  // a torn last line is dropped
        long st = -1;
        if (sscanf(line, "{\"step\": %ld", &st) != 1 || st > upto) break;
        keep = (size_t)(nl + 1 - s);
        line = nl + 1;
    }
    int rc = file_write_all(path, s, keep, err);
    free(s);
    return rc;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// Mean main loss over eval_batches batches from the start of the validation split, and the
// MaxVio of the whole evaluation set's loads (mean over layers).
static int evaluate(Run *r, int *tokens, double *val_loss, double *val_max_vio, Error *err) {
    TrainModel *m = &r->m;
    TrainObjective keep = m->obj;
    m->obj.mtp_lambda = 0;  // the validation loss is the main model's
    m->obj.seq_aux_alpha = 0;
    int Nr = m->cfg.n_routed_experts > 0 ? m->cfg.n_routed_experts : 1;
    long long *loads = calloc((size_t)(m->n_moe > 0 ? m->n_moe : 1) * Nr, sizeof *loads);
    if (!loads) return err_set(err, "out of memory");
    loader_rewind(&r->val);
    double sum = 0;
    int rc = 0;
    for (long b = 0; b < r->o.eval_batches && !rc; b++) {
        loader_next_batch(&r->val, tokens, r->o.batch);  // the whole batch; this rank takes its share
        rc = train_model_evaluate(m, tokens + (size_t)r->rank * m->B * (m->T + 1), err);
        sum += m->loss.main / r->W;
        for (size_t i = 0; i < (size_t)m->n_moe * Nr; i++) loads[i] += m->expert_load[i];
    }
    m->obj = keep;
    if (!rc) rc = dist_sum_f64(r->world, &sum, 1, err) || dist_sum_i64(r->world, loads, m->n_moe * Nr, err) ? -1 : 0;
    double worst;
    // the MTP layers did not run: only the main model's MoE layers have loads
    int main_moe = 0;
    for (int l = 0; l < m->cfg.num_hidden_layers; l++) main_moe += m->p.layers[l].is_moe;
    moe_max_vio(loads, main_moe, Nr, val_max_vio, &worst);
    free(loads);
    *val_loss = sum / (r->o.eval_batches > 0 ? r->o.eval_batches : 1);
    return rc;
}

static void fmt_duration(char *out, size_t n, double s) {
    if (s < 60) snprintf(out, n, "%.0fs", s);
    else if (s < 3600) snprintf(out, n, "%dm%02ds", (int)(s / 60), (int)s % 60);
    else snprintf(out, n, "%dh%02dm", (int)(s / 3600), (int)(s / 60) % 60);
}

// ---- the run ----

// The linear layers' recipe from --precision and the fp8 options: *lowp NULL for fp32.
int trainer_recipe(const TrainerOptions *o, LinearRecipe *recipe, const LinearRecipe **lowp, Error *err) {
    const char *p = o->precision[0] ? o->precision : "fp32";
    int fp8 = strcmp(p, "fp8") == 0;
    if (!fp8 && strcmp(p, "fp32") != 0 && strcmp(p, "bf16") != 0)
        return err_set(err, "--precision: unknown value '%s' (fp32, bf16 or fp8)", p);
    if (!fp8 && (o->fp8_grad[0] || o->fp8_scaling[0] || o->fp8_promotion[0] || o->fp8_scale_format[0] || o->fp8_accum_bits))
        return err_set(err, "--%s: only with --precision fp8 (the run's precision is %s)",
                       o->fp8_grad[0]           ? "fp8-grad"
                       : o->fp8_scaling[0]      ? "fp8-scaling"
                       : o->fp8_promotion[0]    ? "fp8-promotion"
                       : o->fp8_scale_format[0] ? "fp8-scale-format"
                                                : "fp8-accum-bits",
                       p);
    const char *sf = o->fp8_scale_format[0] ? o->fp8_scale_format : "fp32";
    if (strcmp(sf, "fp32") != 0 && strcmp(sf, "ue8m0") != 0)
        return err_set(err, "--fp8-scale-format: unknown value '%s' (fp32 or ue8m0)", sf);
    const char *pr = o->fp8_promotion[0] ? o->fp8_promotion : "on";
    if (strcmp(pr, "on") != 0 && strcmp(pr, "off") != 0)
        return err_set(err, "--fp8-promotion: unknown value '%s' (on or off)", pr);
    if (strcmp(pr, "off") == 0 && o->fp8_accum_bits == 0)
        return err_set(err, "--fp8-promotion off: needs --fp8-accum-bits B (with fp32 accumulation there is nothing to "
                            "promote from)");
    const char *g = o->fp8_grad[0] ? o->fp8_grad : "e4m3", *s = o->fp8_scaling[0] ? o->fp8_scaling : "tile";
    if (o->moments[0] && strcmp(o->moments, "f32") != 0 && strcmp(o->moments, "bf16") != 0)
        return err_set(err, "--moments: unknown value '%s' (f32 or bf16)", o->moments);
    if (o->head_precision[0] && strcmp(o->head_precision, "fp32") != 0 && strcmp(o->head_precision, "bf16") != 0)
        return err_set(err, "--head-precision: unknown value '%s' (fp32 or bf16)", o->head_precision);
    if (strcmp(g, "e4m3") != 0 && strcmp(g, "e5m2") != 0)
        return err_set(err, "--fp8-grad: unknown value '%s' (e4m3 or e5m2)", g);
    if (strcmp(s, "tile") != 0 && strcmp(s, "tensor") != 0)
        return err_set(err, "--fp8-scaling: unknown value '%s' (tile or tensor)", s);
    *lowp = NULL;
    if (strcmp(p, "fp32") == 0) return 0;
    *recipe = (LinearRecipe){.fmt = fp8 ? LOWP_E4M3 : LOWP_BF16,
                             .grad_fmt = !fp8 ? LOWP_BF16 : strcmp(g, "e5m2") == 0 ? LOWP_E5M2 : LOWP_E4M3,
                             .tensor_scaling = strcmp(s, "tensor") == 0,
                             .accum = {.bits = o->fp8_accum_bits, .promote = strcmp(pr, "on") == 0},
                             .pow2_scales = strcmp(sf, "ue8m0") == 0};
    *lowp = recipe;
    return 0;
}

static int setup(Run *r, const char *resume, char *ckpt, size_t ckpt_n, Error *err) {
    ModelConfig c;
    char cfg_path[4200];
    if (resume) {
        if (trainer_find_checkpoint(resume, ckpt, ckpt_n, err)) return -1;
        snprintf(cfg_path, sizeof cfg_path, "%s/config.json", ckpt);
    } else if (r->o.init[0]) {
        snprintf(cfg_path, sizeof cfg_path, "%.4000s/config.json", r->o.init);
    } else {
        snprintf(cfg_path, sizeof cfg_path, "%s", r->o.config);
    }
    if (config_load(&c, cfg_path, err)) return -1;
    if (r->E > 1 && (c.n_routed_experts <= 0 || c.n_routed_experts % r->E))
        return err_set(err, "--expert-parallel %d: the model's %d routed experts do not split evenly over %d ranks",
                       r->E, c.n_routed_experts, r->E);
    if (train_model_new_sharded(&r->m, &c, r->o.batch / r->W, r->o.seq, r->E, r->rank % r->E, err)) return -1;
    LinearRecipe recipe;
    const LinearRecipe *lowp;
    if (trainer_recipe(&r->o, &recipe, &lowp, err) || train_model_set_recipe(&r->m, lowp, err)) return -1;
    r->m.head_bf16 = strcmp(r->o.head_precision, "bf16") == 0;
    r->m.obj.mtp_lambda = r->o.mtp_lambda;
    r->m.obj.seq_aux_alpha = r->o.seq_aux_alpha;
    AdamWConfig ac = adamw_defaults();
    ac.weight_decay = r->o.weight_decay;
    ac.grad_clip = r->o.grad_clip;
    ac.moments_bf16 = strcmp(r->o.moments, "bf16") == 0;
    if (adamw_init(&r->opt, &r->m, ac, err)) return -1;
    if (loader_open(&r->train, r->o.data, "train", r->o.seq, r->o.seed, 1, c.vocab_size, err)) return -1;
    long long nval = 0;
    if (data_split_tokens(r->o.data, "val", &nval, err)) return -1;
    if (nval > r->o.seq && r->o.eval_batches > 0) {
        if (loader_open(&r->val, r->o.data, "val", r->o.seq, 0, 0, c.vocab_size, err)) return -1;
        r->have_val = 1;
    }
    if (resume) return load_checkpoint(r, ckpt, err);
    if (r->o.init[0]) return train_model_load(&r->m, r->o.init, err);
    train_model_init_random(&r->m, r->o.seed);
    return 0;
}

// ---- the gradient sum over the ranks ----

// TrainGradsDone: a group's gradients are final on this rank; its sum over the ranks starts now and
// runs while the backward pass goes on.
static int sync_group(void *ctx, int group, Error *err) {
    Run *r = ctx;
    r->synced[group] = 1;
    for (int i = r->seg_of[group]; i < r->seg_of[group + 1]; i++) {
        const struct SyncSeg *sg = &r->segs[i];
        TRY(dist_sum_start(sg->experts ? r->sync_experts : r->sync, r->m.grads + sg->offset, sg->n, err));
    }
    return 0;
}

// Starts the groups the backward pass did not report (the MTP modules when they did not run: their
// gradients are zero on every rank), in group order, and completes the sum.
static int sync_finish(Run *r, DistSumStats *st, Error *err) {
    for (int g = 0; g < r->m.n_grad_groups; g++)
        if (!r->synced[g] && sync_group(r, g, err)) return -1;
    memset(r->synced, 0, r->m.n_grad_groups);
    DistSumStats se = {0};
    TRY(dist_sum_wait(r->sync, st, err));
    if (r->sync_experts) TRY(dist_sum_wait(r->sync_experts, &se, err));
    if (st) st->busy_s += se.busy_s, st->wait_s += se.wait_s, st->bytes_sent += se.bytes_sent;
    return 0;
}

// The time of a blocking sum of the whole gradient (the zeroed block), for the share of it a step
// hides: the fastest of three after one that sets up the connections.
static int sync_alone(Run *r, double *seconds, Error *err) {
    *seconds = INFINITY;
    for (int rep = 0; rep < 4; rep++) {
        double t0 = now_s();
        for (int g = 0; g < r->m.n_grad_groups; g++)
            if (sync_group(r, g, err)) return -1;
        TRY(sync_finish(r, NULL, err));
        if (rep > 0 && now_s() - t0 < *seconds) *seconds = now_s() - t0;
    }
    return 0;
}

// Everything before the first step: options, the data-parallel split, the model, the data, the
// checkpoint. Rank 0 alone creates the run directory.
static int prepare(Run *r, const char *resume, char *ckpt, size_t ckpt_n, Error *err) {
    const TrainerOptions *o = &r->o;
    char metrics[4200];
    snprintf(metrics, sizeof metrics, "%s/metrics.jsonl", o->out);
    if (o->steps < 1 || o->batch < 1 || o->seq < 1 || o->accum < 1)
        return err_set(err, "--steps, --batch, --seq and --accum must be positive");
    if (ckpt_dtype_parse(o->save_dtype[0] ? o->save_dtype : "f32", "--save-dtype", &r->save_dtype, err)) return -1;
    if (!o->data[0] || !o->out[0]) return err_set(err, "a run needs --data and --out");
    int world = dist_size(r->world);
    r->W = world;
    r->E = o->expert_parallel;
    if (world % r->E)
        return err_set(err, "--expert-parallel %d: the run's %d processes do not split into groups of %d", r->E, world,
                       r->E);
    r->D = o->data_parallel > 0 ? o->data_parallel : world / r->E;
    if (r->D * r->E != world)
        return err_set(err, "--data-parallel %d x --expert-parallel %d is %d ranks, the run has %d processes", r->D,
                       r->E, r->D * r->E, world);
    if (o->batch % world)
        return err_set(err, "--batch %d: not divisible by the %d ranks (each takes an equal share)", o->batch, world);
    const char *a2a = o->a2a_dtype;
    if (o->ep_overlap[0] && strcmp(o->ep_overlap, "on") != 0 && strcmp(o->ep_overlap, "off") != 0)
        return err_set(err, "--ep-overlap: unknown value '%s' (on or off)", o->ep_overlap);
    A2aDtype a2a_t;
    if (a2a[0] && a2a_dtype_parse(a2a, &a2a_t))
        return err_set(err, "--a2a-dtype: unknown value '%s' (fp32, bf16, fp8, logfmt8 or logfmt10)", a2a);
    if (a2a[0] && r->E == 1) return err_set(err, "--a2a-dtype %s: only with --expert-parallel", a2a);
    r->R = o->ranks_per_node > 0 ? o->ranks_per_node : dist_local_size();
    if (world % r->R || (r->E % r->R && r->R % r->E))
        return err_set(err, "--ranks-per-node %d: %d ranks in groups of %d expert-parallel ranks do not make whole nodes",
                       r->R, world, r->E);
    // (rank 0 alone looks: the others could see the file rank 0 has just begun)
    if (r->rank == 0 && !resume && path_exists(metrics))
        return err_set(err, "%s: the run directory already holds a run; continue it with --resume %s", o->out, o->out);
    LinearRecipe recipe;
    const LinearRecipe *lowp;
    TRY(trainer_recipe(o, &recipe, &lowp, err));
    TRY(setup(r, resume, ckpt, ckpt_n, err));  // reads only: the options and the model are checked first
    if (r->rank == 0) TRY(make_dirs(o->out, err));
    if (r->rank == 0 && resume) TRY(truncate_metrics(metrics, r->step, err));
    if (r->step >= o->steps)
        return err_set(err, "%s: the checkpoint is at step %ld; --steps %ld leaves nothing to do", ckpt, r->step,
                       o->steps);
    if (o->stop_at > 0 && o->stop_at < o->steps && r->step >= o->stop_at)
        return err_set(err, "--stop-at %ld: the run is already at step %ld", o->stop_at, r->step);
    r->sync = dist_sum_new(r->world, err);
    r->synced = calloc(r->m.n_grad_groups, 1);
    if (!r->sync || !r->synced) return err_set(err, "out of memory");
    return plan_sync(r, err);
}

// Rank 0 appends a line to metrics.jsonl.
static int metrics_line(Run *r, FILE *mf, const char *line, const char *path, Error *err) {
    if (r->rank != 0) return 0;
    if (fputs(line, mf) == EOF || fflush(mf)) return err_set(err, "%s: write failed", path);
    return 0;
}

int trainer_run(const TrainerOptions *opts, const char *resume, TrainerResult *res, Error *err) {
    res->failed_rank = -1;
    Run *r = calloc(1, sizeof *r);
    if (!r) return err_set(err, "out of memory");
    r->o = *opts;
    r->world = dist_world();
    r->rank = dist_rank(r->world);
    r->D = r->E = r->W = 1;
    const TrainerOptions *o = &r->o;
    int rc = -1, *tokens = NULL, agreed = 0;
    long long *loads = NULL;
    FILE *mf = NULL;
    char metrics[4200], ckpt[4200] = "", line[1024];
    snprintf(metrics, sizeof metrics, "%s/metrics.jsonl", o->out);
    int prc = prepare(r, resume, ckpt, sizeof ckpt, err);
    TrainModel *m = &r->m;
    int Nr = m->cfg.n_routed_experts > 0 ? m->cfg.n_routed_experts : 1;
    size_t nload = (size_t)(m->n_moe > 0 ? m->n_moe : 1) * Nr;
    if (!prc) {
        mf = r->rank == 0 ? fopen(metrics, "a") : NULL;
        tokens = malloc(sizeof(int) * (size_t)o->batch * (o->seq + 1));
        loads = calloc(nload, sizeof *loads);
        if ((r->rank == 0 && !mf) || !tokens || !loads)
            prc = err_set(err, "%s: cannot open for appending (or out of memory)", metrics);
    }
    // every rank got here; one that failed reports, all leave
    if (dist_agree(r->world, prc, &res->failed_rank)) {
        if (res->failed_rank != r->rank) err_set(err, "rank %d failed", res->failed_rank);
        agreed = 1;
        goto done;
    }
    double sync_alone_s = 0, exposed_sum = 0;
    ExpertParallelStats a2a = {0};
    if (r->E > 1 && start_expert_parallel(r, err)) goto done;
    if (r->W > 1 && sync_alone(r, &sync_alone_s, err)) goto done;
    LrSchedule sched = {o->lr, o->warmup, o->steps, o->decay_steps >= 0 ? o->decay_steps : o->steps / 4,
                        o->lr_final_frac};
    double t_start = now_s();
    long first = r->step;
    double val_loss = NAN, last_loss = NAN, sync_bytes = 0;
    long stop = o->stop_at > 0 && o->stop_at < o->steps ? o->stop_at : o->steps;
    size_t share = (size_t)r->rank * m->B * (o->seq + 1);  // this rank's sequences in a micro-batch
    if (r->step == 0 && r->have_val && o->eval_every > 0) {  // the untrained model's validation loss
        double v0, vmv0;
        char l0[256];
        if (evaluate(r, tokens, &v0, &vmv0, err)) goto done;
        snprintf(l0, sizeof l0, "{\"step\": 0, \"val_loss\": %.9g, \"val_max_vio\": %.9g}\n", v0, vmv0);
        if (metrics_line(r, mf, l0, metrics, err)) goto done;
    }
    BackendProfile prof = {0};
    long prof_steps = 0;
    double prof_s = 0;
    while (r->step < stop) {
        double t0 = now_s();
        if (o->profile) m->be->ops->profile(m->be, &prof);
        train_model_zero_grad(m);
        memset(loads, 0, sizeof *loads * nload);
        double parts[4] = {0};  // loss, main, mtp, balance: this rank's share of the step's means
        for (int a = 0; a < o->accum; a++) {
            loader_next_batch(&r->train, tokens, o->batch);
            if (train_model_forward(m, tokens + share, err)) goto done;
            // the last micro-batch's backward completes the gradients: their sum starts group by group
            m->grads_done = r->W > 1 && a == o->accum - 1 ? sync_group : NULL;
            m->grads_done_ctx = r;
            if (train_model_backward(m, 1.0f / ((float)o->accum * r->W), err)) goto done;
            double w = 1.0 / ((double)o->accum * r->W);
            parts[0] += m->loss.loss * w, parts[1] += m->loss.main * w;
            parts[2] += m->loss.mtp * w, parts[3] += m->loss.balance * w;
            for (size_t i = 0; i < nload; i++) loads[i] += m->expert_load[i];
        }
        m->grads_done = NULL;
        if (r->W > 1) {
            DistSumStats st;
            if (sync_finish(r, &st, err) || dist_sum_f64(r->world, parts, 4, err) ||
                dist_sum_i64(r->world, loads, (int)nload, err))
                goto done;
            exposed_sum += st.busy_s;  // blocked, and summing chunks between layers
            sync_bytes = (double)st.bytes_sent;
        }
        ExpertParallelStats st = {0};
        double step_nodes = 0;
        if (r->ep) {  // the training step's exchanges (evaluation's are taken and dropped below)
            st = expert_parallel_take_stats(r->ep);
            step_nodes = st.max_nodes;  // the most nodes a token of any rank reached this step
            if (dist_max_f64(r->world, &step_nodes, 1, err)) goto done;
            a2a.dispatch_bytes += st.dispatch_bytes, a2a.combine_bytes += st.combine_bytes;
            a2a.exchange_s += st.exchange_s, a2a.tokens += st.tokens, a2a.token_ranks += st.token_ranks;
            a2a.wait_s += st.wait_s;
            a2a.token_nodes += st.token_nodes, a2a.intra_node_bytes += st.intra_node_bytes;
            a2a.inter_node_bytes += st.inter_node_bytes;
            if (st.max_nodes > a2a.max_nodes) a2a.max_nodes = st.max_nodes;
        }
        TrainLosses acc = {parts[0], parts[1], parts[2], parts[3]};
        last_loss = acc.loss;
        double gnorm = 0;
        if (global_norm(r, &gnorm, err)) goto done;
        float lr = lr_at(&sched, r->step);
        if (adamw_update(&r->opt, m, lr, gnorm, err)) goto done;
        moe_bias_update(m, loads, o->bias_update_speed);
        double vio, vio_worst;
        moe_max_vio(loads, m->n_moe, Nr, &vio, &vio_worst);
        r->step++;
        long long step_tokens = (long long)o->accum * o->batch * o->seq;
        r->tokens += step_tokens;
        double dt = now_s() - t0;
        if (o->profile) m->be->ops->profile(m->be, NULL), prof_steps++, prof_s += dt;
        int n = snprintf(line, sizeof line,
                         "{\"step\": %ld, \"loss\": %.9g, \"main_loss\": %.9g, \"mtp_loss\": %.9g, \"balance_loss\": "
                         "%.9g, \"lr\": %.9g, \"grad_norm\": %.9g, \"max_vio\": %.9g, \"max_vio_worst\": %.9g, "
                         "\"tokens\": %lld, \"tokens_per_s\": %.1f",
                         r->step, acc.loss, acc.main, acc.mtp, acc.balance, lr, gnorm, vio, vio_worst, r->tokens,
                         step_tokens / dt);
        if (r->ep && st.tokens > 0)
            n += snprintf(line + n, sizeof line - n,
                          ", \"a2a_intra_node_bytes_per_token\": %.1f, \"a2a_inter_node_bytes_per_token\": %.1f, "
                          "\"max_nodes\": %d, \"a2a_wait_s\": %.6f",
                          st.intra_node_bytes / st.tokens, st.inter_node_bytes / st.tokens, (int)step_nodes, st.wait_s);
        int last = r->step == o->steps;
        if (r->have_val && ((o->eval_every > 0 && r->step % o->eval_every == 0) || last)) {
            double vmv;
            if (evaluate(r, tokens, &val_loss, &vmv, err)) goto done;
            if (r->ep) expert_parallel_take_stats(r->ep);
            n += snprintf(line + n, sizeof line - n, ", \"val_loss\": %.9g, \"val_max_vio\": %.9g", val_loss, vmv);
        }
        snprintf(line + n, sizeof line - n, "}\n");
        int wrc = metrics_line(r, mf, line, metrics, err);
        if (!wrc && ((o->save_every > 0 && r->step % o->save_every == 0) || last || r->step == stop))
            wrc = save_checkpoint(r, err);
        if (r->W > 1) {  // rank 0's writes: all ranks go on or stop together
            int first_failed;
            if (dist_agree(r->world, wrc, &first_failed)) {
                res->failed_rank = first_failed;
                if (first_failed != r->rank) err_set(err, "rank %d failed", first_failed);
                agreed = 1;
                goto done;
            }
        } else if (wrc) {
            goto done;
        }
        if (o->progress && r->rank == 0) {
            double el = now_s() - t_start, eta = el / (r->step - first) * (o->steps - r->step);
            char es[32];
            fmt_duration(es, sizeof es, eta);
            fprintf(stderr, "\r\033[Kstep %ld/%ld  loss %.4f  main %.4f  lr %.2e  |g| %.3f  maxvio %.3f  %.0f tok/s  eta %s",
                    r->step, o->steps, acc.loss, acc.main, lr, gnorm, vio, step_tokens / dt, es);
            if (!isnan(val_loss) && last) fprintf(stderr, "  val %.4f", val_loss);
            fflush(stderr);
        }
    }
    if (o->progress && r->rank == 0) fputc('\n', stderr);
    if (r->ep) {  // the most nodes any token reached, over all ranks
        double most = a2a.max_nodes;
        if (dist_max_f64(r->world, &most, 1, err)) goto done;
        a2a.max_nodes = (int)most;
    }
    if (r->rank == 0) {
        char svg[4200];
        snprintf(svg, sizeof svg, "%s/metrics.svg", o->out);
        fclose(mf);
        mf = NULL;
        if (trainer_plot(metrics, svg, err)) goto done;
    }
    long ran = r->step > first ? r->step - first : 1;
    *res = (TrainerResult){.step = r->step, .steps = o->steps, .tokens = r->tokens, .loss = last_loss,
                           .val_loss = val_loss, .peak_bytes = procmem_peak_bytes(), .ranks = r->W,
                           .data_parallel = r->D, .expert_parallel = r->E, .sync_bytes = sync_bytes,
                           .sync_alone_s = sync_alone_s, .sync_exposed_s = exposed_sum / ran,
                           .a2a_dispatch_bytes = a2a.dispatch_bytes / ran, .a2a_combine_bytes = a2a.combine_bytes / ran,
                           .a2a_s = a2a.exchange_s / ran, .a2a_wait_s = a2a.wait_s / ran,
                           .ranks_per_token = a2a.tokens ? (double)a2a.token_ranks / a2a.tokens : 0,
                           .params_held = (long long)m->n_params, .params_total = params_total(m),
                           .nodes_per_token = a2a.tokens ? (double)a2a.token_nodes / a2a.tokens : 0,
                           .intra_node_bytes_per_token = a2a.tokens ? a2a.intra_node_bytes / a2a.tokens : 0,
                           .inter_node_bytes_per_token = a2a.tokens ? a2a.inter_node_bytes / a2a.tokens : 0,
                           .max_nodes = a2a.max_nodes, .ranks_per_node = r->R,
                           .profile_steps = prof_steps, .profile_s = prof_s, .profile = prof,
                           .failed_rank = -1};
    rc = 0;
done:
    if (m->be) m->be->ops->profile(m->be, NULL);  // (a step that failed half-way: its timing stops here)
    if (rc && r->W > 1 && !agreed) res->failed_rank = -1;  // failed alone: the caller ends the run
    else if (rc && r->W == 1) res->failed_rank = 0;
    if (mf) fclose(mf);
    free(tokens);
    free(loads);
    dist_sum_free(r->sync);
    dist_sum_free(r->sync_experts);
    free(r->segs);
    free(r->seg_of);
    expert_parallel_free(r->ep);
    dist_comm_free(r->ep_comm);
    dist_comm_free(r->edp_comm);
    free(r->synced);
    loader_close(&r->train);
    loader_close(&r->val);
    adamw_free(&r->opt);
    train_model_free(&r->m);
    free(r);
    return rc;
}
