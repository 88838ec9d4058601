#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/file.h"
#include "kernels/convert.h"
#include "kernels/fp8_quant.h"
#include "model/convert_checkpoint.h"
#include "model/weights.h"

#define FP8_BLOCK 128

int ckpt_dtype_parse(const char *s, const char *what, DType *out, Error *err) {
    if (strcmp(s, "f32") == 0) *out = DT_F32;
    else if (strcmp(s, "bf16") == 0) *out = DT_BF16;
    else if (strcmp(s, "fp8") == 0) *out = DT_F8_E4M3;
    else return err_set(err, "%s: '%s' is not f32, bf16 or fp8", what, s);
    return 0;
}

static int is_float(DType t) { return t == DT_F32 || t == DT_BF16 || t == DT_F16 || t == DT_F8_E4M3; }

// The rule of convert_checkpoint.h for any tensor: fp8_linear, one of the FP8 set; bias, the
// router's e_score_correction_bias.
static DType target_dtype(int fp8_linear, int bias, DType stored, DType target) {
    if (!is_float(stored)) return stored;
    if (target == DT_F8_E4M3) return fp8_linear ? DT_F8_E4M3 : stored;
    if (target == DT_BF16 && bias) return DT_F32;  // as released: the router bias stays F32
    return target;
}

DType ckpt_tensor_dtype(const TensorSpec *t, DType stored, DType target) {
    return target_dtype(t->fp8, t->kind == TENSOR_BIAS, stored, target);
}

// ---- the writer ----

// Which tensor (and whether its scale grid) each entry of the safetensors list is, and the
// buffers the conversion reuses from tensor to tensor.
typedef struct Writer {
    const CkptTensor *t;
    int *tensor_of;     // (entries) index into t
    char *is_scale;     // (entries)
    float *rows;        // (up to 128, cols) source rows widened to fp32
    size_t rows_cap;    // floats
    float *scales;      // the scale grid of tensor scales_of, quantised last
    size_t scales_cap;  // floats
    int scales_of;
} Writer;

static int grow(float **p, size_t *cap, size_t n, const char *what, Error *err) {
    if (n <= *cap) return 0;
    float *q = realloc(*p, sizeof(float) * n);
    if (!q) return err_set(err, "%s: out of memory (%zu floats)", what, n);
    *p = q;
    *cap = n;
    return 0;
}

static int widen_rows(Writer *W, const CkptTensor *t, int r0, int n) {
    for (int r = 0; r < n; r++)
        if (matview_row_f32(&t->src, r0 + r, W->rows + (size_t)r * t->src.cols)) return -1;
    return 0;
}

// The codes of t (rows, cols) into codes and its scale grid into W->scales, 128 rows at a time.
static int quantise(Writer *W, const CkptTensor *t, uint8_t *codes, Error *err) {
    int rows = t->src.rows, cols = t->src.cols;
    int sr = (rows + FP8_BLOCK - 1) / FP8_BLOCK, sc = (cols + FP8_BLOCK - 1) / FP8_BLOCK;
    if (grow(&W->scales, &W->scales_cap, (size_t)sr * sc, t->name, err) ||
        grow(&W->rows, &W->rows_cap, (size_t)FP8_BLOCK * cols, t->name, err))
        return -1;
    W->scales_of = -1;
    for (int r0 = 0; r0 < rows; r0 += FP8_BLOCK) {
        int n = rows - r0 < FP8_BLOCK ? rows - r0 : FP8_BLOCK;
        if (widen_rows(W, t, r0, n))
            return err_set(err, "tensor %s: dtype %s cannot be converted", t->name, dtype_name(t->src.dtype));
        for (size_t i = 0; i < (size_t)n * cols; i++)
            if (!isfinite(W->rows[i]))
                return err_set(err, "tensor %s: value %g at [%d, %zu] cannot be quantised to FP8", t->name,
                               W->rows[i], r0 + (int)(i / cols), i % cols);
        if (fp8_quantize_blocks(codes + (size_t)r0 * cols, W->scales + (size_t)(r0 / FP8_BLOCK) * sc, W->rows, n, cols))
            return err_set(err, "tensor %s: out of memory quantising it", t->name);
    }
    W->scales_of = (int)(t - W->t);
    return 0;
}

static int fill_one(Writer *W, int i, void *buf, Error *err) {
    const CkptTensor *t = &W->t[W->tensor_of[i]];
    int rows = t->src.rows, cols = t->src.cols;
    if (W->is_scale[i]) {
        // written right after its codes, so the grid is the one quantise just made
        if (W->scales_of != W->tensor_of[i]) {
            uint8_t *codes = xmalloc(err, (size_t)rows * cols, t->name);
            int rc = !codes || quantise(W, t, codes, err);
            free(codes);
            if (rc) return -1;
        }
        memcpy(buf, W->scales, sizeof(float) * ((rows + FP8_BLOCK - 1) / FP8_BLOCK) * ((cols + FP8_BLOCK - 1) / FP8_BLOCK));
        return 0;
    }
    if (t->dtype == DT_F8_E4M3) return quantise(W, t, buf, err);
    if (grow(&W->rows, &W->rows_cap, (size_t)cols, t->name, err)) return -1;
    for (int r = 0; r < rows; r++) {
        if (widen_rows(W, t, r, 1))
            return err_set(err, "tensor %s: dtype %s cannot be converted to %s", t->name, dtype_name(t->src.dtype),
                           dtype_name(t->dtype));
        if (t->dtype == DT_F32) memcpy((float *)buf + (size_t)r * cols, W->rows, sizeof(float) * cols);
        else if (t->dtype == DT_BF16) bf16_from_f32_n((uint16_t *)buf + (size_t)r * cols, W->rows, cols);
        else return err_set(err, "tensor %s: cannot be stored as %s", t->name, dtype_name(t->dtype));
    }
    return 0;
}

static int fill(void *ctx, int i, void *buf, Error *err) {
    Writer *W = ctx;
    const CkptTensor *t = &W->t[W->tensor_of[i]];
    if (fill_one(W, i, buf, err)) return t->file ? err_prefix(err, "%s", t->file) : -1;
    return 0;
}

// Stored bytes pass through untouched: the same dtype, or FP8 codes whose grid is already 128×128.
static int passes_through(const CkptTensor *t) {
    if (t->src.dtype != t->dtype) return 0;
    return t->dtype != DT_F8_E4M3 || (t->src.block == FP8_BLOCK && t->src.row0 == 0 && t->src.scale_inv);
}

int ckpt_write_tensors(const char *dir, const CkptTensor *t, int n, size_t shard_bytes, int *fp8, Error *err) {
    int nf = 0;
    for (int i = 0; i < n; i++) nf += t[i].dtype == DT_F8_E4M3;
    int ne = n + nf, rc = -1;
    Writer W = {.t = t, .scales_of = -1};
    StTensorDesc *desc = xcalloc(err, ne ? ne : 1, sizeof *desc, "tensor list");
    char (*names)[160] = xcalloc(err, nf ? nf : 1, sizeof *names, "scale names");
    W.tensor_of = xcalloc(err, ne ? ne : 1, sizeof *W.tensor_of, "tensor list");
    W.is_scale = xcalloc(err, ne ? ne : 1, 1, "tensor list");
    if (!desc || !names || !W.tensor_of || !W.is_scale) goto done;
    for (int i = 0, e = 0, s = 0; i < n; i++) {
        const CkptTensor *c = &t[i];
        int through = passes_through(c);
        desc[e] = (StTensorDesc){c->name, c->dtype, c->ndim, {0}, through ? c->src.data : NULL};
        memcpy(desc[e].shape, c->shape, sizeof c->shape);
        W.tensor_of[e++] = i;
        if (c->dtype != DT_F8_E4M3) continue;
        if (c->ndim != 2) {
            err_set(err, "tensor %s: a %d-D tensor cannot be stored as F8_E4M3", c->name, c->ndim);
            goto done;
        }
        if ((size_t)snprintf(names[s], sizeof names[s], "%s_scale_inv", c->name) >= sizeof names[s]) {
            err_set(err, "tensor %s: name too long", c->name);
            goto done;
        }
        desc[e] = (StTensorDesc){names[s++], DT_F32, 2,
                                 {(c->shape[0] + FP8_BLOCK - 1) / FP8_BLOCK, (c->shape[1] + FP8_BLOCK - 1) / FP8_BLOCK},
                                 through ? c->src.scale_inv : NULL};
        W.tensor_of[e] = i;
        W.is_scale[e++] = 1;
    }
    rc = st_write_model_fill(dir, desc, ne, shard_bytes, fill, &W, err);
    if (fp8) *fp8 = nf;
done:
    free(desc);
    free(names);
    free(W.tensor_of);
    free(W.is_scale);
    free(W.rows);
    free(W.scales);
    return rc;
}

// A rows × cols view of a tensor: its last dimension is the row (a vector is one row).
static MatView view_of(DType dt, const void *data, int ndim, const int64_t *shape) {
    int64_t cols = ndim ? shape[ndim - 1] : 1, n = st_numel(shape, ndim);
    return (MatView){.dtype = dt, .rows = (int)(cols ? n / cols : 0), .cols = (int)cols, .data = data,
                     .block = FP8_BLOCK};
}

int ckpt_save_f32(const char *dir, const ModelConfig *c, const float *const *values, DType target,
                  size_t shard_bytes, Error *err) {
    TensorSpec *specs;
    int n;
    if (tensor_specs(c, &specs, &n, err)) return -1;
    CkptTensor *t = xcalloc(err, n ? n : 1, sizeof *t, "tensor list");
    int rc = -1;
    if (!t) goto done;
    for (int i = 0; i < n; i++) {
        const TensorSpec *s = &specs[i];
        t[i] = (CkptTensor){.name = s->name, .ndim = s->ndim, .shape = {s->shape[0], s->shape[1]},
                            .dtype = ckpt_tensor_dtype(s, DT_F32, target)};
        t[i].src = view_of(DT_F32, values[i], s->ndim, t[i].shape);
    }
    ModelConfig out = *c;
    out.fp8 = target == DT_F8_E4M3;
    out.fp8_block[0] = out.fp8_block[1] = out.fp8 ? FP8_BLOCK : 0;
    snprintf(out.torch_dtype, sizeof out.torch_dtype, "%s", target == DT_BF16 ? "bfloat16" : "float32");
    char path[4096];
    rc = make_dirs(dir, err) || ckpt_write_tensors(dir, t, n, shard_bytes, NULL, err) ||
                 path_join(path, sizeof path, dir, "config.json", err) || config_save(&out, path, err)
             ? -1
             : 0;
done:
    free(t);
    free(specs);
    return rc;
}

// ---- dsv3 convert ----

// The tensors to write, the names they own and the names of the input they account for.
typedef struct Plan {
    const StModel *st;
    DType target;
    CkptTensor *t;
    int n, cap;
    char (*names)[160];     // (cap) t[i].name
    const char **used;      // (2 cap) input tensors accounted for: the weights and their scales
    int nused;
    Error *err;
} Plan;

static int plan_add(Plan *p, const StTensor *s, MatView src, DType dtype) {
    if (p->n == p->cap) {
        int cap = p->cap ? 2 * p->cap : 256;
        CkptTensor *t = realloc(p->t, sizeof *t * cap);
        if (t) p->t = t;
        char(*nm)[160] = realloc(p->names, sizeof *nm * cap);
        if (nm) p->names = nm;
        const char **u = realloc(p->used, sizeof *u * 2 * cap);
        if (u) p->used = u;
        if (!t || !nm || !u) return err_set(p->err, "out of memory listing tensors");
        p->cap = cap;
    }
    snprintf(p->names[p->n], sizeof p->names[p->n], "%s", s->name);
    CkptTensor *c = &p->t[p->n];
    *c = (CkptTensor){.file = s->file, .ndim = s->ndim, .src = src, .dtype = dtype};
    memcpy(c->shape, s->shape, sizeof(int64_t) * s->ndim);
    p->n++;
    return 0;
}

// One tensor of the table: the view weights_bind made of it (it checked its dtype, shape and scale
// grid), or, for a vector, its stored bytes.
static int plan_table_tensor(const TensorSpec *t, void *ctx) {
    Plan *p = ctx;
    const StTensor *s = st_model_find(p->st, t->name);
    if (!s) return err_set(p->err, "%s: tensor %s: missing", p->st->dir, t->name);
    MatView src = t->mat ? *t->mat : view_of(s->dtype, s->data, s->ndim, s->shape);
    return plan_add(p, s, src, ckpt_tensor_dtype(t, s->dtype, p->target));
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

static int is_used(const Plan *p, const char *name) {
    return bsearch(&name, p->used, p->nused, sizeof *p->used, cmp_str) != NULL;
}

// Tensors of the files outside the table (an lm_head beside tied embeddings, anything else dsv3
// does not read): floating ones follow the dtype rule for a non-linear, integer ones are copied;
// FP8 codes without a place in the table, or a scale of a weight that is not FP8, cannot be.
static int plan_extras(Plan *p) {
    int n_table = p->n;
    // the names the files own, which stay put while the plan grows
    for (int i = 0; i < n_table; i++) {
        p->used[p->nused++] = st_model_find(p->st, p->names[i])->name;
        if (p->t[i].src.dtype != DT_F8_E4M3) continue;
        char sname[200];
        snprintf(sname, sizeof sname, "%s_scale_inv", p->names[i]);
        const StTensor *s = st_model_find(p->st, sname);
        if (s) p->used[p->nused++] = s->name;
    }
    qsort(p->used, p->nused, sizeof *p->used, cmp_str);
    for (int f = 0; f < p->st->nfiles; f++) {
        const StFile *sf = &p->st->files[f];
        for (int i = 0; i < sf->n; i++) {
            const StTensor *s = &sf->tensors[i];
            if (is_used(p, s->name)) continue;
            size_t len = strlen(s->name);
            if (len > 10 && strcmp(s->name + len - 10, "_scale_inv") == 0) {
                char base[200];
                snprintf(base, sizeof base, "%.*s", (int)(len - 10), s->name);
                if (is_used(p, base))
                    return err_set(p->err, "%s: tensor %s: a scale of %s, which is not stored as F8_E4M3", s->file,
                                   s->name, base);
            }
            if (s->dtype == DT_F8_E4M3)
                return err_set(p->err, "%s: tensor %s: F8_E4M3 outside the model's tensor table cannot be converted",
                               s->file, s->name);
            int bias = len > 23 && strcmp(s->name + len - 23, "e_score_correction_bias") == 0;
            if (plan_add(p, s, view_of(s->dtype, s->data, s->ndim, s->shape), target_dtype(0, bias, s->dtype, p->target)))
                return -1;
        }
    }
    return 0;
}

// config.json of the output: the input's, with how the weights are now stored.
static int write_config(const char *in, const char *dir, DType target, Error *err) {
    char from[4096], to[4096];
    if (path_join(from, sizeof from, in, "config.json", err) || path_join(to, sizeof to, dir, "config.json", err))
        return -1;
    json_t *root = file_read_json(from, 0, err);
    if (!root) return -1;
    const char *td = json_string_value(json_object_get(root, "torch_dtype"));
    char keep[32];
    snprintf(keep, sizeof keep, "%s", td ? td : "bfloat16");
    // fp8: the tensors outside the FP8 set kept their dtype, which torch_dtype still describes
    config_json_set_storage(root, target == DT_F8_E4M3 ? FP8_BLOCK : 0,
                            target == DT_F32 ? "float32" : target == DT_BF16 ? "bfloat16" : keep);
    char *s = json_dumps(root, JSON_INDENT(2));
    json_decref(root);
    if (!s) return err_set(err, "%s: cannot encode", to);
    size_t n = strlen(s);
    s[n] = '\n';  // in the terminating NUL's place
    int rc = file_write_all(to, s, n + 1, err);
    free(s);
    return rc;
}

// Replaces out (absent, an empty directory, or, when the caller allowed it, a full one) by tmp.
static int move_into_place(const char *tmp, const char *out, Error *err) {
    char old[4200] = "";
    if (path_exists(out)) {
        if (dir_is_empty(out)) {
            if (rmdir(out)) return err_set(err, "%s: cannot remove the empty directory: %s", out, strerror(errno));
        } else {
            snprintf(old, sizeof old, "%s.old-XXXXXX", out);
            if (!mkdtemp(old) || rename(out, old)) {
                int e = errno;
                if (old[0] && !strstr(old, "XXXXXX")) rmdir(old);
                return err_set(err, "%s: cannot move aside: %s", out, strerror(e));
            }
        }
    }
    if (rename(tmp, out)) {
        int e = errno;
        if (old[0]) rename(old, out);
        return err_set(err, "%s: cannot rename %s into place: %s", out, tmp, strerror(e));
    }
    if (old[0]) path_remove_tree(old);
    return 0;
}

// 1 when directory in is out or lies inside it (replacing out would delete the input).
static int inside(const char *in, const char *out) {
    char ri[PATH_MAX], ro[PATH_MAX];
    if (!realpath(in, ri) || !realpath(out, ro)) return 0;
    size_t n = strlen(ro);
    return strncmp(ri, ro, n) == 0 && (ri[n] == 0 || ri[n] == '/' || n == 1);
}

int checkpoint_convert(const char *in, const char *out_arg, DType target, size_t shard_bytes, int force,
                       ConvertStats *stats, Error *err) {
    if (target != DT_F32 && target != DT_BF16 && target != DT_F8_E4M3)
        return err_set(err, "convert: dtype %s is not f32, bf16 or fp8", dtype_name(target));
    char out[4096];
    size_t len = strlen(out_arg);
    while (len > 1 && out_arg[len - 1] == '/') len--;  // "dir/" names dir: the temporary goes beside it
    if (len == 0 || len >= sizeof out - 64) return err_set(err, "%s: not a usable output path", out_arg);
    memcpy(out, out_arg, len);
    out[len] = 0;
    if (path_exists(out)) {
        if (!path_is_dir(out)) return err_set(err, "%s: exists and is not a directory", out);
        if (inside(in, out)) return err_set(err, "%s: is the input directory or holds it", out);
        if (!force && !dir_is_empty(out)) return err_set(err, "%s: exists and is not empty (--force replaces it)", out);
    }
    ModelConfig c;
    StModel st;
    ModelWeights w;
    char path[4096], tmp[4200] = "";
    if (st_model_open(&st, in, err)) return -1;
    Plan p = {.st = &st, .target = target, .err = err};
    int rc = -1, bound = 0;
    if (path_join(path, sizeof path, in, "config.json", err) || config_load(&c, path, err) ||
        weights_bind(&w, &c, &st, 0, err))
        goto done;
    bound = 1;
    if (tensor_walk(&c, w.n_mtp, &w, plan_table_tensor, &p) || plan_extras(&p)) goto done;
    for (int i = 0; i < p.n; i++) p.t[i].name = p.names[i];
    // the temporary directory beside out, so that the rename stays on one file system
    char parent[4096];
    snprintf(parent, sizeof parent, "%s", out);
    char *slash = strrchr(parent, '/');
    if (slash && slash != parent) {
        *slash = 0;
        if (make_dirs(parent, err)) goto done;
    }
    snprintf(tmp, sizeof tmp, "%s.tmp-XXXXXX", out);
    if (!mkdtemp(tmp)) {
        err_set(err, "%s: cannot create: %s", tmp, strerror(errno));
        tmp[0] = 0;
        goto done;
    }
    int fp8 = 0;
    if (ckpt_write_tensors(tmp, p.t, p.n, shard_bytes, &fp8, err) || write_config(in, tmp, target, err)) goto done;
    static const char *const copied[] = {"tokenizer.json", "tokenizer_config.json", "generation_config.json"};
    for (size_t i = 0; i < sizeof copied / sizeof *copied; i++)
        if (file_copy_if_exists(in, tmp, copied[i], err)) goto done;
    if (move_into_place(tmp, out, err)) goto done;
    tmp[0] = 0;
    if (stats) {
        *stats = (ConvertStats){.tensors = p.n + fp8, .fp8 = fp8};
        for (int i = 0; i < p.n; i++) {
            int64_t numel = st_numel(p.t[i].shape, p.t[i].ndim);
            stats->bytes += (size_t)numel * dtype_size(p.t[i].dtype);
            if (p.t[i].dtype == DT_F8_E4M3)
                stats->bytes += sizeof(float) * (size_t)((p.t[i].shape[0] + FP8_BLOCK - 1) / FP8_BLOCK) *
                                (size_t)((p.t[i].shape[1] + FP8_BLOCK - 1) / FP8_BLOCK);
        }
    }
    rc = 0;
done:
    if (tmp[0]) path_remove_tree(tmp);
    free(p.t);
    free(p.names);
    free(p.used);
    if (bound) weights_free(&w, &c);
    st_model_close(&st);
    return rc;
}
