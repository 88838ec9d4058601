#define _GNU_SOURCE  // nftw
#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/file.h"
#include "model/config.h"
#include "train/data.h"
#include "train/optim.h"
#include "train/train_model.h"
#include "train/trainer.h"

TrainerOptions trainer_defaults(void) {
    TrainerOptions o;
    memset(&o, 0, sizeof o);
    o.steps = 1000;
    o.batch = 8;
    o.seq = 256;
    o.accum = 1;
    o.lr = 3e-4f;
    o.warmup = 100;
    o.decay_steps = -1;  // −1: the last quarter of the run
    o.lr_final_frac = 0.1f;
    o.weight_decay = 0.1f;
    o.grad_clip = 1.0f;
    o.bias_update_speed = 0.001f;
    o.seq_aux_alpha = 0.0001f;
    o.mtp_lambda = 0.3f;
    o.eval_every = 100;
    o.eval_batches = 8;
    o.save_every = 500;
    o.seed = 1;
    return o;
}

// ---- options as JSON ----

static json_t *options_json(const TrainerOptions *o) {
    return json_pack("{s:s, s:s, s:s, s:I, s:i, s:i, s:i, s:f, s:I, s:I, s:f, s:f, s:f, s:f, s:f, s:f, s:I, s:I, s:I, s:I}",
                     "config", o->config, "init", o->init, "data", o->data, "steps", (json_int_t)o->steps, "batch", o->batch, "seq",
                     o->seq, "accum", o->accum, "lr", (double)o->lr, "warmup", (json_int_t)o->warmup, "decay_steps",
                     (json_int_t)o->decay_steps, "lr_final_frac", (double)o->lr_final_frac, "weight_decay",
                     (double)o->weight_decay, "grad_clip", (double)o->grad_clip, "bias_update_speed",
                     (double)o->bias_update_speed, "seq_aux_alpha", (double)o->seq_aux_alpha, "mtp_lambda",
                     (double)o->mtp_lambda, "eval_every", (json_int_t)o->eval_every, "eval_batches",
                     (json_int_t)o->eval_batches, "save_every", (json_int_t)o->save_every, "seed",
                     (json_int_t)o->seed);
}

static int read_num(json_t *obj, const char *path, const char *key, double *out, Error *err) {
    json_t *v = json_object_get(obj, key);
    if (!json_is_number(v)) return err_set(err, "%s: options.%s: missing", path, key);
    *out = json_number_value(v);
    return 0;
}

int trainer_read_options(const char *ckpt, TrainerOptions *o, Error *err) {
    char path[4096];
    if (path_join(path, sizeof path, ckpt, "trainer_state.json", err)) return -1;
    json_error_t je;
    json_t *st = json_load_file(path, 0, &je);
    if (!st) return err_set(err, "%s: %s", path, path_exists(path) ? je.text : "missing");
    json_t *op = json_object_get(st, "options");
    *o = trainer_defaults();
    const char *keys[] = {"steps", "batch", "seq", "accum", "lr", "warmup", "decay_steps", "lr_final_frac",
                          "weight_decay", "grad_clip", "bias_update_speed", "seq_aux_alpha", "mtp_lambda",
                          "eval_every", "eval_batches", "save_every", "seed"};
    double v[17];
    int rc = -1;
    for (int i = 0; i < 17; i++)
        if (read_num(op, path, keys[i], &v[i], err)) goto done;
    const char *cfg = json_string_value(json_object_get(op, "config")), *data = json_string_value(json_object_get(op, "data"));
    if (!cfg || !data) {
        err_set(err, "%s: options.config / options.data: missing", path);
        goto done;
    }
    snprintf(o->config, sizeof o->config, "%s", cfg);
    snprintf(o->data, sizeof o->data, "%s", data);
    const char *init = json_string_value(json_object_get(op, "init"));
    snprintf(o->init, sizeof o->init, "%s", init ? init : "");
    o->steps = (long)v[0];
    o->batch = (int)v[1];
    o->seq = (int)v[2];
    o->accum = (int)v[3];
    o->lr = (float)v[4];
    o->warmup = (long)v[5];
    o->decay_steps = (long)v[6];
    o->lr_final_frac = (float)v[7];
    o->weight_decay = (float)v[8];
    o->grad_clip = (float)v[9];
    o->bias_update_speed = (float)v[10];
    o->seq_aux_alpha = (float)v[11];
    o->mtp_lambda = (float)v[12];
    o->eval_every = (long)v[13];
    o->eval_batches = (long)v[14];
    o->save_every = (long)v[15];
    o->seed = (uint64_t)v[16];
    rc = 0;
done:
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

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

static void rm_tree(const char *path) {
    if (path_exists(path)) nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static int copy_if_exists(const char *from_dir, const char *to_dir, const char *name, Error *err) {
    char from[4200], to[4200];
    snprintf(from, sizeof from, "%s/%s", from_dir, name);
    snprintf(to, sizeof to, "%s/%s", to_dir, name);
    return path_exists(from) ? file_copy(from, to, err) : 0;
}

typedef struct Run {
    TrainerOptions o;
    TrainModel m;
    AdamW opt;
    DataLoader train, val;
    int have_val;
    long step;          // steps done
    long long tokens;   // tokens trained on
} Run;

static int save_checkpoint(Run *r, Error *err) {
    char dir[4200], tmp[4300], old[4300];
    snprintf(dir, sizeof dir, "%s/step-%ld", r->o.out, r->step);
    snprintf(tmp, sizeof tmp, "%s.tmp", dir);
    snprintf(old, sizeof old, "%s.old", dir);
    rm_tree(tmp);
    char path[4400];
    if (train_model_save(&r->m, tmp, (size_t)4 << 30, err)) return -1;
    snprintf(path, sizeof path, "%s/optimizer.safetensors", tmp);
    if (adamw_save(&r->opt, &r->m, path, err)) return -1;
    if (copy_if_exists(r->o.data, tmp, "tokenizer.json", err) ||
        copy_if_exists(r->o.data, tmp, "tokenizer_config.json", err))
        return -1;
    json_t *st = json_pack("{s:s, s:I, s:I, s:I, s:{s:I, s:I, s:I}, s:o}", "made_by", "dsv3 train", "step",
                           (json_int_t)r->step, "tokens", (json_int_t)r->tokens, "adamw_step", (json_int_t)r->opt.step,
                           "data", "epoch", (json_int_t)r->train.epoch, "pos", (json_int_t)r->train.pos, "windows",
                           (json_int_t)r->train.n_windows, "options", options_json(&r->o));
    char *js = json_dumps(st, JSON_INDENT(2));
    json_decref(st);
    snprintf(path, sizeof path, "%s/trainer_state.json", tmp);
    int rc = js ? file_write_all(path, js, strlen(js), err) : err_set(err, "out of memory");
    free(js);
    if (rc) return -1;
    // the old checkpoint of this step (a resumed run passing it again) stays until the new one is in place
    rm_tree(old);
    if (path_exists(dir) && rename(dir, old)) return err_set(err, "%s: cannot move aside: %s", dir, strerror(errno));
    if (rename(tmp, dir)) return err_set(err, "%s: cannot rename into place: %s", dir, strerror(errno));
    rm_tree(old);
    return 0;
}

static int load_checkpoint(Run *r, const char *ckpt, Error *err) {
    char path[4200];
    if (train_model_load(&r->m, ckpt, err)) return -1;
    snprintf(path, sizeof path, "%s/optimizer.safetensors", ckpt);
    if (adamw_load(&r->opt, &r->m, path, err)) return -1;
    snprintf(path, sizeof path, "%s/trainer_state.json", ckpt);
    json_error_t je;
    json_t *st = json_load_file(path, 0, &je);
    if (!st) return err_set(err, "%s: %s", path, je.text);
    json_t *data = json_object_get(st, "data");
    json_t *v[] = {json_object_get(st, "step"), json_object_get(st, "tokens"), json_object_get(st, "adamw_step"),
                   json_object_get(data, "epoch"), json_object_get(data, "pos"), json_object_get(data, "windows")};
    for (int i = 0; i < 6; i++)
        if (!json_is_integer(v[i])) {
            json_decref(st);
            return err_set(err, "%s: step, tokens, adamw_step or data position missing", path);
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
        loader_next_batch(&r->val, tokens, m->B);
        rc = train_model_forward(m, tokens, err);
        sum += m->loss.main;
        for (size_t i = 0; i < (size_t)m->n_moe * Nr; i++) loads[i] += m->expert_load[i];
    }
    m->obj = keep;
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
    if (train_model_new(&r->m, &c, r->o.batch, r->o.seq, err)) return -1;
    r->m.obj.mtp_lambda = r->o.mtp_lambda;
    r->m.obj.seq_aux_alpha = r->o.seq_aux_alpha;
    AdamWConfig ac = adamw_defaults();
    ac.weight_decay = r->o.weight_decay;
    ac.grad_clip = r->o.grad_clip;
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

int trainer_run(const TrainerOptions *opts, const char *resume, Error *err) {
    Run *r = calloc(1, sizeof *r);
    if (!r) return err_set(err, "out of memory");
    r->o = *opts;
    const TrainerOptions *o = &r->o;
    int rc = -1, *tokens = NULL;
    FILE *mf = NULL;
    char metrics[4200], ckpt[4200] = "", line[1024];
    snprintf(metrics, sizeof metrics, "%s/metrics.jsonl", o->out);
    if (o->steps < 1 || o->batch < 1 || o->seq < 1 || o->accum < 1) {
        err_set(err, "--steps, --batch, --seq and --accum must be positive");
        goto done;
    }
    if (!resume && path_exists(metrics)) {
        err_set(err, "%s: the run directory already holds a run; continue it with --resume %s", o->out, o->out);
        goto done;
    }
    if (make_dirs(o->out, err) || setup(r, resume, ckpt, sizeof ckpt, err)) goto done;
    if (resume && truncate_metrics(metrics, r->step, err)) goto done;
    if (r->step >= o->steps) {
        err_set(err, "%s: the checkpoint is at step %ld; --steps %ld leaves nothing to do", ckpt, r->step, o->steps);
        goto done;
    }
    mf = fopen(metrics, "a");
    tokens = malloc(sizeof(int) * (size_t)o->batch * (o->seq + 1));
    if (!mf || !tokens) {
        err_set(err, "%s: cannot open for appending", metrics);
        goto done;
    }
    TrainModel *m = &r->m;
    int Nr = m->cfg.n_routed_experts > 0 ? m->cfg.n_routed_experts : 1;
    size_t nload = (size_t)(m->n_moe > 0 ? m->n_moe : 1) * Nr;
    long long *loads = calloc(nload, sizeof *loads);
    if (!loads) {
        err_set(err, "out of memory");
        goto done;
    }
    LrSchedule sched = {o->lr, o->warmup, o->steps, o->decay_steps >= 0 ? o->decay_steps : o->steps / 4,
                        o->lr_final_frac};
    double t_start = now_s();
    long first = r->step;
    double val_loss = NAN, last_loss = NAN;
    long stop = o->stop_at > 0 && o->stop_at < o->steps ? o->stop_at : o->steps;
    if (r->step >= stop) {
        err_set(err, "--stop-at %ld: the run is already at step %ld", o->stop_at, r->step);
        goto done_loads;
    }
    if (r->step == 0 && r->have_val && o->eval_every > 0) {  // the untrained model's validation loss
        double v0, vmv0;
        char l0[256];
        if (evaluate(r, tokens, &v0, &vmv0, err)) goto done_loads;
        snprintf(l0, sizeof l0, "{\"step\": 0, \"val_loss\": %.9g, \"val_max_vio\": %.9g}\n", v0, vmv0);
        if (fputs(l0, mf) == EOF || fflush(mf)) {
            err_set(err, "%s: write failed", metrics);
            goto done_loads;
        }
    }
    while (r->step < stop) {
        double t0 = now_s();
        train_model_zero_grad(m);
        memset(loads, 0, sizeof *loads * nload);
        TrainLosses acc = {0};
        for (int a = 0; a < o->accum; a++) {
            loader_next_batch(&r->train, tokens, o->batch);
            if (train_model_forward(m, tokens, err)) goto done_loads;
            if (train_model_backward(m, 1.0f / o->accum, err)) goto done_loads;
            acc.loss += m->loss.loss / o->accum;
            acc.main += m->loss.main / o->accum;
            acc.mtp += m->loss.mtp / o->accum;
            acc.balance += m->loss.balance / o->accum;
            for (size_t i = 0; i < nload; i++) loads[i] += m->expert_load[i];
        }
        last_loss = acc.loss;
        double gnorm = grad_global_norm(m);
        float lr = lr_at(&sched, r->step);
        adamw_update(&r->opt, m, lr, gnorm);
        moe_bias_update(m, loads, o->bias_update_speed);
        double vio, vio_worst;
        moe_max_vio(loads, m->n_moe, Nr, &vio, &vio_worst);
        r->step++;
        long long step_tokens = (long long)o->accum * o->batch * o->seq;
        r->tokens += step_tokens;
        double dt = now_s() - t0;
        int n = snprintf(line, sizeof line,
                         "{\"step\": %ld, \"loss\": %.9g, \"main_loss\": %.9g, \"mtp_loss\": %.9g, \"balance_loss\": "
                         "%.9g, \"lr\": %.9g, \"grad_norm\": %.9g, \"max_vio\": %.9g, \"max_vio_worst\": %.9g, "
                         "\"tokens\": %lld, \"tokens_per_s\": %.1f",
                         r->step, acc.loss, acc.main, acc.mtp, acc.balance, lr, gnorm, vio, vio_worst, r->tokens,
                         step_tokens / dt);
        int last = r->step == o->steps;
        if (r->have_val && ((o->eval_every > 0 && r->step % o->eval_every == 0) || last)) {
            double vmv;
            if (evaluate(r, tokens, &val_loss, &vmv, err)) goto done_loads;
            n += snprintf(line + n, sizeof line - n, ", \"val_loss\": %.9g, \"val_max_vio\": %.9g", val_loss, vmv);
        }
        snprintf(line + n, sizeof line - n, "}\n");
        if (fputs(line, mf) == EOF || fflush(mf)) {
            err_set(err, "%s: write failed", metrics);
            goto done_loads;
        }
        if ((o->save_every > 0 && r->step % o->save_every == 0) || last || r->step == stop)
            if (save_checkpoint(r, err)) goto done_loads;
        if (o->progress) {
            double el = now_s() - t_start, eta = el / (r->step - first) * (o->steps - r->step);
            char es[32];
            fmt_duration(es, sizeof es, eta);
            fprintf(stderr, "\r\033[Kstep %ld/%ld  loss %.4f  main %.4f  lr %.2e  |g| %.3f  maxvio %.3f  %.0f tok/s  eta %s",
                    r->step, o->steps, acc.loss, acc.main, lr, gnorm, vio, step_tokens / dt, es);
            if (!isnan(val_loss) && last) fprintf(stderr, "  val %.4f", val_loss);
            fflush(stderr);
        }
    }
    if (o->progress) fputc('\n', stderr);
    {
        char svg[4200];
        snprintf(svg, sizeof svg, "%s/metrics.svg", o->out);
        fclose(mf);
        mf = NULL;
        if (trainer_plot(metrics, svg, err)) goto done_loads;
    }
    printf("%s step %ld (%lld tokens): loss %.4f", r->step < o->steps ? "stopped at" : "trained to", r->step,
           r->tokens, last_loss);
    if (!isnan(val_loss)) printf(", validation loss %.4f", val_loss);
    printf("; checkpoint %s/step-%ld\n", o->out, r->step);
    rc = 0;
done_loads:
    free(loads);
done:
    if (mf) fclose(mf);
    free(tokens);
    loader_close(&r->train);
    loader_close(&r->val);
    adamw_free(&r->opt);
    train_model_free(&r->m);
    free(r);
    return rc;
}
