#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/safetensors.h"
#include "kernels/convert.h"
#include "train/optim.h"

AdamWConfig adamw_defaults(void) {
    return (AdamWConfig){.beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f, .grad_clip = 1.0f};
}

int adamw_init(AdamW *o, const TrainModel *model, AdamWConfig cfg, Error *err) {
    memset(o, 0, sizeof *o);
    o->cfg = cfg;
    o->n = model->n_params;
    o->be = model->be;
    // one block of the backend's memory (zeroed, m on a 64-byte line as the parameters are); fp32:
    // v a whole number of lines after m, so that the update can write p, m and v around the cache
    size_t stride = cfg.moments_bf16 ? o->n : (o->n + 15) & ~(size_t)15;
    size_t elem = cfg.moments_bf16 ? sizeof(uint16_t) : sizeof(float);
    void *block = o->be->ops->alloc(o->be, 2 * stride * elem, cfg.moments_bf16 ? "AdamW moments (BF16)" : "AdamW moments");
    if (!block) return err_set(err, "%s", o->be->err.msg);
    if (cfg.moments_bf16) o->m16 = block, o->v16 = o->m16 + stride;
    else o->m = block, o->v = o->m + stride;
    return 0;
}

// Moment k (0: m, 1: v) of the parameter at offset off, as stored.
static void *moment(const AdamW *o, int k, size_t off) {
    if (o->m16) return (k ? o->v16 : o->m16) + off;
    return (k ? o->v : o->m) + off;
}

void adamw_free(AdamW *o) {
    if (o->be) o->be->ops->free(o->be, o->m16 ? (void *)o->m16 : (void *)o->m);
    memset(o, 0, sizeof *o);
}

// Trained by AdamW (the router bias has its own rule), and held by this rank.
static int is_trained(const TrainTensor *t) { return !t->shared && t->kind != TENSOR_BIAS; }
static int is_updated_here(const TrainTensor *t) { return is_trained(t) && !t->remote; }
static int decays(const TrainTensor *t) { return t->ndim == 2; }

double grad_global_norm(const TrainModel *model) {
    double parts[2];
    return grad_sum_squares(model, parts) ? NAN : sqrt(parts[0] + parts[1]);
}

int grad_sum_squares(const TrainModel *model, double parts[2]) {
    parts[0] = parts[1] = 0;
    int count = 0, nt = model->n_tensors, *expert = malloc(sizeof(int) * (nt + 1));  // (count) each sum's part
    const float **x = calloc(nt + 1, sizeof(float *));
    long *n = calloc(nt + 1, sizeof(long));
    double *sums = malloc(sizeof(double) * (nt + 1));
    int rc = -1;
    if (!expert || !x || !n || !sums) {
        err_set(&model->be->err, "out of memory for the gradient norm");
        goto done;
    }
    for (int i = 0; i < nt; i++) {
        const TrainTensor *t = &model->tensors[i];
        if (!is_updated_here(t)) continue;
        expert[count] = t->expert >= 0, x[count] = model->grads + t->offset, n[count++] = (long)t->numel;
    }
    if (model->be->ops->sum_squares(model->be, sums, x, n, count)) goto done;
    for (int k = 0; k < count; k++) parts[expert[k]] += sums[k];  // (in tensor order)
    rc = 0;
done:
    free(expert), free(x), free(n), free(sums);
    return rc;
}

int adamw_update(AdamW *o, TrainModel *model, float lr, double grad_norm, Error *err) {
    const AdamWConfig *c = &o->cfg;
    Backend *be = model->be;
    o->step++;
    AdamWStep s = {.lr = lr, .beta1 = c->beta1, .beta2 = c->beta2, .eps = c->eps, .clip = 1.0f,
                   .moments_bf16 = o->m16 != NULL};
    if (c->grad_clip > 0 && grad_norm > c->grad_clip) s.clip = (float)(c->grad_clip / grad_norm);
    s.bc1 = 1.0f - powf(c->beta1, (float)o->step);
    s.bc2 = 1.0f - powf(c->beta2, (float)o->step);
    AdamWTensor *u = malloc(sizeof *u * (model->n_tensors + 1));  // (count) the tensors updated here
    if (!u) return err_set(err, "AdamW: out of memory");
    int count = 0;
    for (int i = 0; i < model->n_tensors; i++) {
        const TrainTensor *t = &model->tensors[i];
        if (!is_updated_here(t)) continue;
        u[count++] = (AdamWTensor){.p = model->params + t->offset, .m = moment(o, 0, t->offset),
                                   .v = moment(o, 1, t->offset), .g = model->grads + t->offset,
                                   .n = (long)t->numel, .shrink = decays(t) ? 1.0f - lr * c->weight_decay : 1.0f};
    }
    int rc = be->ops->adamw(be, u, count, &s);
    free(u);
    return rc ? err_set(err, "AdamW: %s", be->err.msg) : 0;
}

int adamw_save(const AdamW *o, const TrainModel *model, const char *path, Error *err) {
    return adamw_save_values(o, model, path, NULL, err);
}

int adamw_save_values(const AdamW *o, const TrainModel *model, const char *path, const void *const *moments[2],
                      Error *err) {
    StTensorDesc *desc = xcalloc(err, 2 * model->n_tensors, sizeof *desc, "optimiser tensor list");
    char (*names)[160] = xcalloc(err, 2 * model->n_tensors, sizeof *names, "optimiser tensor names");
    int n = 0, rc = -1;
    if (!desc || !names) goto done;
    for (int i = 0; i < model->n_tensors; i++) {
        const TrainTensor *t = &model->tensors[i];
        if (!is_trained(t)) continue;
        if (t->remote && !moments) {
            err_set(err, "%s: %s is held by another rank", path, t->name);
            goto done;
        }
        for (int k = 0; k < 2; k++) {
            snprintf(names[n], sizeof names[n], "%s.%s", k ? "exp_avg_sq" : "exp_avg", t->name);
            desc[n] = (StTensorDesc){names[n], o->m16 ? DT_BF16 : DT_F32, t->ndim, {t->shape[0], t->shape[1]},
                                     moments ? moments[k][i] : moment(o, k, t->offset)};
            n++;
        }
    }
    rc = st_write(path, desc, n, err);
done:
    free(desc);
    free(names);
    return rc;
}

int adamw_load(AdamW *o, const TrainModel *model, const char *path, Error *err) {
    StFile f;
    if (st_open(&f, path, err)) return -1;
    int rc = -1;
    for (int i = 0; i < model->n_tensors; i++) {
        const TrainTensor *t = &model->tensors[i];
        if (!is_updated_here(t)) continue;
        for (int k = 0; k < 2; k++) {
            char name[160];
            snprintf(name, sizeof name, "%s.%s", k ? "exp_avg_sq" : "exp_avg", t->name);
            const StTensor *s = st_find(&f, name);
            int ok = s && ((s->dtype == DT_F32 && s->nbytes == t->numel * sizeof(float)) ||
                           (s->dtype == DT_BF16 && s->nbytes == t->numel * sizeof(uint16_t)));
            if (!ok) {
                err_set(err, "%s: tensor %s: %s", path, name, s ? "not F32 or BF16 of the parameter's shape" : "missing");
                goto done;
            }
            void *dst = moment(o, k, t->offset);
            if ((s->dtype == DT_BF16) == (o->m16 != NULL)) memcpy(dst, s->data, s->nbytes);
            else if (o->m16) bf16_from_f32_n(dst, s->data, t->numel);
            else bf16_to_f32_n(dst, s->data, t->numel);
        }
    }
    rc = 0;
done:
    st_close(&f);
    return rc;
}

float lr_at(const LrSchedule *s, long step) {
    if (s->warmup > 0 && step < s->warmup) return s->peak * (float)(step + 1) / (float)s->warmup;
    long decay_start = s->total - s->decay_steps;
    if (s->decay_steps <= 0 || step < decay_start) return s->peak;
    // the first decay step already moves, the last one lands on final_frac · peak
    double x = (double)(step - decay_start + 1) / (double)s->decay_steps;
    if (x > 1) x = 1;
    double f = s->final_frac + (1.0 - s->final_frac) * 0.5 * (1.0 + cos(M_PI * x));
    return (float)(s->peak * f);
}

void moe_bias_update(TrainModel *model, const long long *loads, float gamma) {
    int Nr = model->cfg.n_routed_experts;
    for (int j = 0; j < model->n_moe; j++) {
        float *b = model->moe_bias[j];
        if (!b) continue;
        const long long *l = loads + (size_t)j * Nr;
        long long total = 0;
        for (int i = 0; i < Nr; i++) total += l[i];
        double mean = (double)total / Nr;
        // an overloaded expert loses bias, an underloaded one gains it; exact balance leaves it
        for (int i = 0; i < Nr; i++) b[i] += gamma * (float)((mean > l[i]) - (mean < l[i]));
    }
}

void moe_max_vio(const long long *loads, int n_moe, int n_experts, double *mean, double *worst) {
    *mean = *worst = 0;
    int counted = 0;
    for (int j = 0; j < n_moe; j++) {
        const long long *l = loads + (size_t)j * n_experts;
        long long total = 0, mx = 0;
        for (int i = 0; i < n_experts; i++) {
            total += l[i];
            mx = l[i] > mx ? l[i] : mx;
        }
        if (total == 0) continue;
        double avg = (double)total / n_experts, v = (mx - avg) / avg;
        *mean += v;
        *worst = v > *worst ? v : *worst;
        counted++;
    }
    if (counted) *mean /= counted;
}
