#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/bufplan.h"
#include "kernels/convert.h"
#include "model/tensors.h"
#include "model/weights.h"

// Binding runs twice, as an allocation plan (base/bufplan.h): the first pass only measures the
// fp32 vectors, the second lays them over one block. Both passes check every tensor, so errors
// surface on the first.
typedef struct Binder {
    const StModel *st;
    const ModelConfig *c;
    BufPlan plan;  // over no memory in the measuring pass
    Error *err;
} Binder;

static const StTensor *need(Binder *b, const char *name) {
    const StTensor *t = st_model_find(b->st, name);
    if (!t) err_set(b->err, "%s: tensor %s: missing", b->st->dir, name);
    return t;
}

static int shape_error(Binder *b, const StTensor *t, const char *want) {
    char got[128] = "";
    size_t n = 0;
    for (int i = 0; i < t->ndim; i++) n += snprintf(got + n, sizeof got - n, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
    return err_set(b->err, "%s: tensor %s: shape [%s] disagrees with config.json (expected [%s])", t->file, t->name, got, want);
}

static int bind_vector(Binder *b, float **out, const char *name, int n) {
    const StTensor *t = need(b, name);
    if (!t) return -1;
    char want[32];
    snprintf(want, sizeof want, "%d", n);
    if (t->ndim != 1 || t->shape[0] != n) return shape_error(b, t, want);
    if (t->dtype != DT_F32 && t->dtype != DT_BF16 && t->dtype != DT_F16)
        return err_set(b->err, "%s: tensor %s: dtype %s is not F32, BF16 or F16", t->file, name, dtype_name(t->dtype));
    float *v = PLAN_F(&b->plan, n);  // (n)
    if (v) {
        for (int i = 0; i < n; i++) {
            if (t->dtype == DT_F32) memcpy(&v[i], (const char *)t->data + 4 * i, 4);
            else {
                uint16_t h;
                memcpy(&h, (const char *)t->data + 2 * i, 2);
                v[i] = t->dtype == DT_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
            }
        }
        *out = v;
    }
    return 0;
}

static int bind_matrix(Binder *b, MatView *m, const char *name, int rows, int cols) {
    const StTensor *t = need(b, name);
    if (!t) return -1;
    char want[64];
    snprintf(want, sizeof want, "%d, %d", rows, cols);
    if (t->ndim != 2 || t->shape[0] != rows || t->shape[1] != cols) return shape_error(b, t, want);
    memset(m, 0, sizeof *m);
    m->dtype = t->dtype;
    m->rows = rows;
    m->cols = cols;
    m->data = t->data;
    if (t->dtype == DT_F8_E4M3) {
        int bs = b->c->fp8 ? b->c->fp8_block[0] : 128;
        if (b->c->fp8 && b->c->fp8_block[0] != b->c->fp8_block[1])
            return err_set(b->err, "%s: tensor %s: only square FP8 blocks are supported", t->file, name);
        char sname[512];
        snprintf(sname, sizeof sname, "%s_scale_inv", name);
        const StTensor *s = need(b, sname);
        if (!s) return -1;
        int sr = (rows + bs - 1) / bs, sc = (cols + bs - 1) / bs;
        snprintf(want, sizeof want, "%d, %d", sr, sc);
        if (s->ndim != 2 || s->shape[0] != sr || s->shape[1] != sc) return shape_error(b, s, want);
        if (s->dtype != DT_F32)
            return err_set(b->err, "%s: tensor %s: dtype %s is not F32", s->file, sname, dtype_name(s->dtype));
        m->scale_inv = s->data;
        m->scale_cols = sc;
        m->block = bs;
    } else if (t->dtype != DT_F32 && t->dtype != DT_BF16 && t->dtype != DT_F16) {
        return err_set(b->err, "%s: tensor %s: dtype %s is not a weight type (F32, BF16, F16, F8_E4M3)", t->file, name,
                       dtype_name(t->dtype));
    }
    return 0;
}

// One tensor of the table into its slot.
static int bind_one(const TensorSpec *t, void *ctx) {
    Binder *b = ctx;
    if (t->mat) return bind_matrix(b, t->mat, t->name, (int)t->shape[0], (int)t->shape[1]);
    return bind_vector(b, t->vec, t->name, (int)t->shape[0]);
}

static int bind_all(Binder *b, ModelWeights *w) {
    const ModelConfig *c = b->c;
    if (tensor_walk(c, w->n_mtp, w, bind_one, b)) return -1;
    // the table lists no lm_head when tied; a checkpoint may still carry one
    if (!c->tie_word_embeddings) return 0;
    if (!st_model_find(b->st, "lm_head.weight")) {
        w->lm_head = w->embed_tokens;
        return 0;
    }
    return bind_matrix(b, &w->lm_head, "lm_head.weight", c->vocab_size, c->hidden_size);
}

int weights_alloc_tables(ModelWeights *w, const ModelConfig *c, int n_mtp, Error *err) {
    memset(w, 0, sizeof *w);
    w->n_mtp = n_mtp;
    w->layers = xcalloc(err, c->num_hidden_layers, sizeof *w->layers, "layer table");
    w->mtp = xcalloc(err, n_mtp > 0 ? n_mtp : 1, sizeof *w->mtp, "MTP table");
    if (!w->layers || !w->mtp) goto fail;
    for (int li = 0; li < c->num_hidden_layers + n_mtp; li++) {
        LayerWeights *L = li < c->num_hidden_layers ? &w->layers[li] : &w->mtp[li - c->num_hidden_layers].layer;
        L->is_moe = config_is_moe_layer(c, li);
        if (!L->is_moe) continue;
        L->moe.experts = xcalloc(err, c->n_routed_experts, sizeof(FfnWeights), "expert table");
        if (!L->moe.experts) goto fail;
    }
    return 0;
fail:
    weights_free(w, c);
    return -1;
}

int weights_bind(ModelWeights *w, const ModelConfig *c, const StModel *st, int need_mtp, Error *err) {
    memset(w, 0, sizeof *w);
    char probe[128];
    snprintf(probe, sizeof probe, "model.layers.%d.eh_proj.weight", c->num_hidden_layers);
    int have_mtp = c->num_nextn_predict_layers > 0 && st_model_find(st, probe) != NULL;
    if (need_mtp && c->num_nextn_predict_layers > 0 && !have_mtp)
        return err_set(err, "%s: tensor %s: missing (config.json asks for %d MTP modules)", st->dir, probe,
                       c->num_nextn_predict_layers);
    if (weights_alloc_tables(w, c, have_mtp ? c->num_nextn_predict_layers : 0, err)) return -1;
    Binder b = {st, c, {NULL, 0}, err};
    if (bind_all(&b, w)) goto fail;
    w->vectors = aligned_alloc(64, (b.plan.used + 63) / 64 * 64 + 64);
    if (!w->vectors) {
        err_set(err, "%s: out of memory for %zu bytes of norm weights", st->dir, b.plan.used);
        goto fail;
    }
    b.plan = (BufPlan){(char *)w->vectors, 0};
    if (bind_all(&b, w)) goto fail;
    return 0;
fail:
    weights_free(w, c);
    return -1;
}

void weights_free(ModelWeights *w, const ModelConfig *c) {
    if (w->layers)
        for (int i = 0; i < c->num_hidden_layers; i++) free(w->layers[i].moe.experts);
    if (w->mtp)
        for (int k = 0; k < w->n_mtp; k++) free(w->mtp[k].layer.moe.experts);
    free(w->layers);
    free(w->mtp);
    free(w->vectors);
    memset(w, 0, sizeof *w);
}
