// The training model's gradients: against golden gradients from an independent float64 torch
// autograd reference (tools/ref_grad.py → tests/data/train_grad/<case>), against central finite
// differences of the whole model tensor by tensor, and its forward against the inference engine.
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/rng.h"
#include "base/safetensors.h"
#include "kernels/ops.h"
#include "model/model.h"
#include "train/train_model.h"
#include "test.h"

typedef struct {
    ModelConfig cfg;
    TrainModel m;
    int *tokens;  // (B, T + 1)
    json_t *golden;
} GoldenCase;

static void golden_free(GoldenCase *g) {
    train_model_free(&g->m);
    free(g->tokens);
    json_decref(g->golden);
}

// Loads tests/data/train_grad/<name>: the checkpoint into a training model, the batch and the
// objective from golden.json. Returns 0 or fills why.
static int golden_load(GoldenCase *g, const char *name, char *why, size_t n) {
    memset(g, 0, sizeof *g);
    char dir[512], path[600];
    snprintf(dir, sizeof dir, "%s/train_grad/%s", test_datadir(), name);
    snprintf(path, sizeof path, "%s/golden.json", dir);
    json_error_t je;
    g->golden = json_load_file(path, 0, &je);
    if (!g->golden) return snprintf(why, n, "%s: %s", path, je.text), -1;
    int B = (int)json_integer_value(json_object_get(g->golden, "B"));
    int T = (int)json_integer_value(json_object_get(g->golden, "T"));
    Error err = {0};
    snprintf(path, sizeof path, "%s/config.json", dir);
    if (config_load(&g->cfg, path, &err) || train_model_new(&g->m, &g->cfg, B, T, &err) ||
        train_model_load(&g->m, dir, &err))
        return snprintf(why, n, "%s", err.msg), -1;
    g->m.obj.mtp_lambda = (float)json_number_value(json_object_get(g->golden, "mtp_lambda"));
    g->m.obj.seq_aux_alpha = (float)json_number_value(json_object_get(g->golden, "seq_aux_alpha"));
    g->tokens = malloc(sizeof(int) * B * (T + 1));
    json_t *rows = json_object_get(g->golden, "tokens");
    for (int b = 0; b < B; b++)
        for (int i = 0; i <= T; i++)
            g->tokens[b * (T + 1) + i] = (int)json_integer_value(json_array_get(json_array_get(rows, b), i));
    return 0;
}

static int compare_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double golden_loss(const GoldenCase *g, const char *part) {
    return json_number_value(json_object_get(json_object_get(g->golden, "losses"), part));
}

// Every trained tensor's gradient within 5e-5 × (its largest golden entry) of the float64 reference,
// every loss within 1e-5 relative: float32 rounding sits near 1e-6, any wrong term far above.
static void check_golden(const char *name) {
    GoldenCase g;
    char why[1024] = "";
    int rc = golden_load(&g, name, why, sizeof why);
    CHECK_MSG(rc == 0, "%s: %s", name, why);
    Error err = {0};
    CHECK_MSG(train_model_forward(&g.m, g.tokens, &err) == 0, "%s", err.msg);
    const char *parts[] = {"loss", "main", "mtp", "balance"};
    double got[] = {g.m.loss.loss, g.m.loss.main, g.m.loss.mtp, g.m.loss.balance};
    for (int i = 0; i < 4; i++) {
        double want = golden_loss(&g, parts[i]);
        CHECK_MSG(fabs(got[i] - want) <= 1e-5 * fabs(want) + 1e-7, "%s: %s loss %.9g, golden %.9g", name, parts[i],
                  got[i], want);
    }
    train_model_zero_grad(&g.m);
    CHECK(train_model_backward(&g.m, 1.0f, &err) == 0);
    char path[600];
    snprintf(path, sizeof path, "%s/train_grad/%s/grads.safetensors", test_datadir(), name);
    StFile st;
    CHECK_MSG(st_open(&st, path, &err) == 0, "%s", err.msg);
    int compared = 0;
    double worst = 0;
    const char *worst_name = "";
    for (int i = 0; i < g.m.n_tensors; i++) {
        const TrainTensor *t = &g.m.tensors[i];
        if (t->shared || t->kind == TENSOR_BIAS) continue;
        const StTensor *ref = st_find(&st, t->name);
        CHECK_MSG(ref && ref->dtype == DT_F32 && ref->nbytes == t->numel * sizeof(float), "%s: golden %s missing",
                  name, t->name);
        const float *gr = ref->data, *gc = g.m.grads + t->offset;
        double scale = 0, diff = 0;
        for (size_t j = 0; j < t->numel; j++) {
            scale = fmax(scale, fabs(gr[j]));
            diff = fmax(diff, test_absdiff(gr[j], gc[j]));
        }
        CHECK_MSG(scale > 0, "%s: golden gradient of %s is zero", name, t->name);
        if (diff / scale > worst) {
            worst = diff / scale;
            worst_name = t->name;
        }
        compared++;
    }
    st_close(&st);
    printf("    %s: worst gradient off by %.2g of its largest entry (%s; tol 5e-5)\n", name, worst, worst_name);
    CHECK_MSG(worst <= 5e-5, "%s: gradient of %s off by %.3g of its largest entry", name, worst_name, worst);
    CHECK(compared > 20);
    golden_free(&g);
}

TEST(test_train_golden_grad_v3) { check_golden("v3"); }
TEST(test_train_golden_grad_v2lite) { check_golden("v2lite"); }
TEST(test_train_golden_grad_mtp2_tied) { check_golden("mtp2"); }

// The training forward computes the inference engine's function: a checkpoint saved by the
// trainer, loaded by model_load, gives the same main and MTP logits (plain attention prefill and
// absorbed decode) to 1e-5 of the largest logit, as two float32 computations of one function
// should (they agree to ~1e-6). MTP module 2 is fed module 1's output after its shared_head.norm.
static void check_inference(const char *name) {
    GoldenCase g;
    char why[1024] = "";
    int rc = golden_load(&g, name, why, sizeof why);
    CHECK_MSG(rc == 0, "%s: %s", name, why);
    Error err = {0};
    CHECK_MSG(train_model_forward(&g.m, g.tokens, &err) == 0, "%s", err.msg);
    char dir[600];
    snprintf(dir, sizeof dir, "%s/train_infer_%s", test_tmpdir(), name);
    CHECK_MSG(train_model_save(&g.m, dir, DT_F32, (size_t)1 << 30, &err) == 0, "%s", err.msg);
    const ModelConfig *c = &g.cfg;
    int B = g.m.B, T = g.m.T, V = c->vocab_size, d = c->hidden_size, D = g.m.mtp_ran ? c->num_nextn_predict_layers : 0;
    Model mm;
    CHECK_MSG(model_load(&mm, dir, D > 0, &err) == 0, "%s", err.msg);
    float *logits = malloc(sizeof(float) * T * V), *hidden = malloc(sizeof(float) * T * d);
    float *hout = malloc(sizeof(float) * T * d);
    float *train_logits[4] = {0};  // module k's (main: 0) from the training forward's head inputs
    CHECK(D < 4);
    for (int k = 0; k <= D; k++) {
        train_logits[k] = malloc(sizeof(float) * B * (T - k) * V);
        CHECK_MSG(train_model_logits(&g.m, k, train_logits[k], &err) == 0, "%s", err.msg);
    }
    double worst = 0, scale = 0;
    for (int b = 0; b < B; b++) {
        const int *tok = g.tokens + b * (T + 1);
        KVCache kv;
        CHECK(kvcache_init(&kv, c, D, T, &err) == 0);
        ForwardState *s = forward_state_new(&mm, T, T, &err);
        CHECK(s);
        CHECK_MSG(model_forward(&mm, s, &kv, tok, T, ATTN_PLAIN, logits, NULL, hidden, &err) == 0, "%s", err.msg);
        const float *ref = train_logits[0] + (size_t)b * T * V;
        for (long i = 0; i < (long)T * V; i++) {
            worst = fmax(worst, test_absdiff(logits[i], ref[i]));
            scale = fmax(scale, fabs(ref[i]));
        }
        for (int k = 1; k <= D; k++) {
            int Tk = T - k;
            CHECK_MSG(model_mtp_forward(&mm, s, &kv, k - 1, tok + k, hidden, Tk, ATTN_PLAIN, logits, hout, &err) == 0,
                      "%s", err.msg);
            ref = train_logits[k] + (size_t)b * Tk * V;
            for (long i = 0; i < (long)Tk * V; i++) worst = fmax(worst, test_absdiff(logits[i], ref[i]));
            memcpy(hidden, hout, sizeof(float) * Tk * d);  // module k's normed output feeds module k + 1
        }
        kvcache_free(&kv);
        // the same one token at a time through the decode step (absorbed attention), MTP chain included
        CHECK(kvcache_init(&kv, c, D, T, &err) == 0);
        for (int t = 0; t < T; t++) {
            CHECK_MSG(model_forward(&mm, s, &kv, tok + t, 1, ATTN_ABSORBED, logits, NULL, hidden + (size_t)t * d, &err) == 0,
                      "%s", err.msg);
            ref = train_logits[0] + ((size_t)b * T + t) * V;
            for (int i = 0; i < V; i++) worst = fmax(worst, test_absdiff(logits[i], ref[i]));
        }
        for (int k = 1; k <= D; k++) {
            int Tk = T - k;
            for (int t = 0; t < Tk; t++) {
                CHECK_MSG(model_mtp_forward(&mm, s, &kv, k - 1, tok + k + t, hidden + (size_t)t * d, 1, ATTN_ABSORBED, logits,
                                            hout + (size_t)t * d, &err) == 0,
                          "%s", err.msg);
                ref = train_logits[k] + ((size_t)b * Tk + t) * V;
                for (int i = 0; i < V; i++) worst = fmax(worst, test_absdiff(logits[i], ref[i]));
            }
            memcpy(hidden, hout, sizeof(float) * Tk * d);
        }
        forward_state_free(s);
        kvcache_free(&kv);
    }
    for (int k = 0; k <= D; k++) free(train_logits[k]);
    free(logits);
    free(hidden);
    free(hout);
    model_free(&mm);
    golden_free(&g);
    printf("    %s: inference vs training forward: max|diff| %.2g of max|logit| (tol 1e-5)\n", name, worst / scale);
    CHECK_MSG(worst <= 1e-5 * scale, "%s: logits differ by %.3g (largest logit %.3g)", name, worst, scale);
}

TEST(test_train_forward_matches_inference_v3) { check_inference("v3"); }
TEST(test_train_forward_matches_inference_v2lite) { check_inference("v2lite"); }
TEST(test_train_forward_matches_inference_mtp2_tied) { check_inference("mtp2"); }

// Central difference (L(w + h·u) − L(w − h·u)) / 2h of the loss along u in tensor t, whose
// unperturbed values are w0; leaves the tensor at w0. NaN if a forward fails.
static double central_difference(TrainModel *m, const int *tokens, const TrainTensor *t, const float *u,
                                 const float *w0, double h) {
    float *w = m->params + t->offset;
    double L[2];
    Error err = {0};
    for (int side = 0; side < 2; side++) {
        for (size_t j = 0; j < t->numel; j++) w[j] = (float)(w0[j] + (side ? -h : h) * u[j]);
        L[side] = train_model_evaluate(m, tokens, &err) == 0 ? m->loss.loss : NAN;
    }
    memcpy(w, w0, sizeof(float) * t->numel);
    return (L[0] - L[1]) / (2 * h);
}

// One tensor's directional derivative along u: g·u from the backward pass against finite
// differences, with the error those finite differences are estimated to have in this run.
//
// fd is Richardson's extrapolation (4 D(h) − D(2h)) / 3 of the central differences D at the steps
// h and 2h, h = 1.2e-2 × rms(w): it cancels the h² term of D's truncation error. Its error has
// two parts, and err estimates both:
//   truncation  |D(h) − D(2h)| ≈ 3 × D(h)'s own truncation error, which is larger than fd's;
//   rounding    each loss is off by about eps (see loss_rounding), so D(h) by eps/h, D(2h) by
//               eps/2h, and fd by at most (4 eps/h + eps/2h) / 3 = 1.5 eps/h.
// The test allows |fd − g·u| <= FD_RTOL × max(|fd|, |g·u|) + err, with no floor: FD_RTOL covers
// the float32 rounding of g·u itself (it agrees with the float64 torch reference to ~3e-5), and
// a gradient that is wrong by more than the finite differences can resolve fails, however small
// it is.
typedef struct {
    double an, fd, err, tol;
} FdProbe;

#define FD_RTOL 1e-3

static FdProbe fd_probe(TrainModel *m, const int *tokens, const TrainTensor *t, const float *u, double eps) {
    float *w = m->params + t->offset, *w0 = malloc(sizeof(float) * t->numel);
    double rmsw = 0, an = 0;
    for (size_t j = 0; j < t->numel; j++) {
        rmsw += (double)w[j] * w[j];
        an += (double)m->grads[t->offset + j] * u[j];
    }
    memcpy(w0, w, sizeof(float) * t->numel);
    double h = 1.2e-2 * sqrt(rmsw / t->numel);
    double d1 = central_difference(m, tokens, t, u, w0, h), d2 = central_difference(m, tokens, t, u, w0, 2 * h);
    free(w0);
    FdProbe p = {.an = an, .fd = (4 * d1 - d2) / 3};
    p.err = fabs(d1 - d2) + 1.5 * eps / h;
    p.tol = FD_RTOL * fmax(fabs(p.fd), fabs(p.an)) + p.err;
    return p;
}

// The rounding error of a float32 forward's loss, measured in this run where it can be: at the
// unperturbed weights against the float64 reference's loss, and never below float32's unit
// roundoff at the loss's size (the loss is summed in double, so it can land closer than that by
// chance; the perturbed losses need not).
static double loss_rounding(double loss, double reference) {
    return fmax(fabs(loss - reference), ldexp(fabs(loss), -24));
}

typedef struct {
    int checked, bad;
    double worst;             // the largest |fd − g·u| / tol
    double tol_median;        // of tol / |g·u|
    double loosest;           // the largest tol / |g·u|
    char loosest_name[128];
    char first_bad[512];
} FdReport;

// Central differences of the whole objective along a random ±1 direction in each tensor, with
// the expert choice held (it is piecewise constant and not differentiated), against g·u, within
// the tolerance fd_probe explains. only: probe just this tensor (NULL: all); before probing, the
// gradient of tensor `corrupt` (or none) is replaced by scale × itself — a planted mistake the
// check must catch. Returns 0 or fills why.
static int finite_differences(const char *name, const char *only, const char *corrupt, double scale, FdReport *rep,
                              char *why, size_t n) {
    memset(rep, 0, sizeof *rep);
    GoldenCase g;
    if (golden_load(&g, name, why, n)) return -1;
    Error err = {0};
    TrainModel *m = &g.m;
    if (train_model_forward(m, g.tokens, &err)) return snprintf(why, n, "%s", err.msg), golden_free(&g), -1;
    double eps = loss_rounding(m->loss.loss, golden_loss(&g, "loss"));
    train_model_zero_grad(m);
    if (train_model_backward(m, 1.0f, &err))
        return snprintf(why, n, "%s", err.msg), golden_free(&g), -1;
    if (corrupt) {
        const TrainTensor *t = train_model_tensor(m, corrupt);
        if (!t) return snprintf(why, n, "%s: no tensor %s", name, corrupt), golden_free(&g), -1;
        for (size_t j = 0; j < t->numel; j++) m->grads[t->offset + j] = (float)(scale * m->grads[t->offset + j]);
    }
    m->freeze_routing = 1;
    Rng rng;
    rng_seed(&rng, 7);
    double tol_rel[512];
    for (int i = 0; i < m->n_tensors && rep->checked < 512; i++) {
        const TrainTensor *t = &m->tensors[i];
        if (t->shared || t->kind == TENSOR_BIAS) continue;
        float *u = malloc(sizeof(float) * t->numel);
        for (size_t j = 0; j < t->numel; j++) u[j] = (rng_next(&rng) >> 63) ? 1.0f : -1.0f;
        if (only && strcmp(t->name, only) != 0) {  // the same direction as in a full run, unprobed
            free(u);
            continue;
        }
        FdProbe p = fd_probe(m, g.tokens, t, u, eps);
        free(u);
        double r = fabs(p.fd - p.an) / p.tol;
        if (!(r <= 1) && !rep->bad++)
            snprintf(rep->first_bad, sizeof rep->first_bad, "%s: g·u %.9g, finite differences %.9g: |diff| %.3g > tol %.3g",
                     t->name, p.an, p.fd, fabs(p.fd - p.an), p.tol);
        rep->worst = fmax(rep->worst, r == r ? r : INFINITY);
        tol_rel[rep->checked++] = p.tol / fabs(p.an);
        if (p.tol / fabs(p.an) > rep->loosest) {
            rep->loosest = p.tol / fabs(p.an);
            snprintf(rep->loosest_name, sizeof rep->loosest_name, "%s", t->name);
        }
    }
    golden_free(&g);
    qsort(tol_rel, rep->checked, sizeof(double), compare_double);
    rep->tol_median = rep->checked ? tol_rel[rep->checked / 2] : 0;
    return 0;
}

static void check_finite_differences(const char *name) {
    FdReport r;
    char why[1024];
    CHECK_MSG(finite_differences(name, NULL, NULL, 1, &r, why, sizeof why) == 0, "%s", why);
    CHECK(r.checked > 20);
    printf("    %s: %d tensors, worst |fd - g.u| %.2g of its tolerance; tolerance median %.2g of |g.u|, loosest %.2g (%s)\n",
           name, r.checked, r.worst, r.tol_median, r.loosest, r.loosest_name);
    CHECK_MSG(r.bad == 0, "%s: %d tensors off, first %s", name, r.bad, r.first_bad);
}

TEST(test_train_finite_differences_v3) { check_finite_differences("v3"); }
TEST(test_train_finite_differences_v2lite) { check_finite_differences("v2lite"); }
TEST(test_train_finite_differences_mtp2_tied) { check_finite_differences("mtp2"); }

// The check above can fail: planted mistakes are caught — the gradient of the tensor with the
// smallest directional derivative in v3 (|g·u| ~ 1e-3, the case a tolerance floor used to hide)
// left out or halved; a large one 2% too big; a norm weight's gradient with its sign flipped.
TEST(test_finite_differences_catch_planted_mistakes) {
    const struct {
        const char *tensor;
        double scale;
    } plant[] = {
        {"model.layers.2.mlp.experts.1.up_proj.weight", 0},
        {"model.layers.2.mlp.experts.1.up_proj.weight", 0.5},
        {"model.layers.1.self_attn.kv_b_proj.weight", 1.02},
        {"model.layers.2.enorm.weight", -1},
    };
    for (size_t i = 0; i < sizeof plant / sizeof plant[0]; i++) {
        FdReport r;
        char why[1024];
        int rc = finite_differences("v3", plant[i].tensor, NULL, 1, &r, why, sizeof why);
        CHECK_MSG(rc == 0 && r.checked == 1 && r.bad == 0, "%s unplanted: %s %s", plant[i].tensor, why, r.first_bad);
        rc = finite_differences("v3", plant[i].tensor, plant[i].tensor, plant[i].scale, &r, why, sizeof why);
        CHECK_MSG(rc == 0 && r.checked == 1, "%s", why);
        printf("    gradient x %g caught: %s\n", plant[i].scale, r.bad ? r.first_bad : "no");
        CHECK_MSG(r.bad == 1, "planted mistake in %s not caught", plant[i].tensor);
    }
}

// Checkpoints in any stored dtype (BF16, F16, F32, FP8 with block scales) load into the training
// model and give the golden logits of the independent numpy reference (tests/data/<case>,
// tools/ref_model.py) to 1e-5 of the largest logit, main and MTP rows alike, as the inference
// engine does (tests/test_model.c).
static void check_golden_logits(const char *name) {
    char dir[512], path[600];
    snprintf(dir, sizeof dir, "%s/%s", test_datadir(), name);
    snprintf(path, sizeof path, "%s/tokens.txt", dir);
    char *s = test_read_file(path, NULL);
    CHECK_MSG(s, "%s missing", path);
    int tok[64], n = 0;
    for (char *p = s; *p && n < 64;) {
        tok[n++] = (int)strtol(p, &p, 10);
        while (*p == ',' || *p == ' ' || *p == '\n') p++;
    }
    free(s);
    ModelConfig c;
    TrainModel m;
    Error err = {0};
    snprintf(path, sizeof path, "%s/config.json", dir);
    CHECK_MSG(config_load(&c, path, &err) == 0 && train_model_new(&m, &c, 1, n - 1, &err) == 0 &&
                  train_model_load(&m, dir, &err) == 0,
              "%s", err.msg);
    CHECK(train_model_evaluate(&m, tok, &err) == 0);
    CHECK(m.mtp_ran == (c.num_nextn_predict_layers > 0));  // the MTP rows are compared too
    int V = c.vocab_size;
    float *tl = malloc(sizeof(float) * (n - 1) * V), *tm = malloc(sizeof(float) * (n - 1) * V);
    CHECK_MSG(train_model_logits(&m, 0, tl, &err) == 0 && (!m.mtp_ran || train_model_logits(&m, 1, tm, &err) == 0), "%s",
              err.msg);
    size_t len;
    snprintf(path, sizeof path, "%s/logits.f32", dir);
    float *ref = test_read_file(path, &len);
    CHECK(ref && len == sizeof(float) * n * V);
    double worst = 0, scale = 0;
    for (long i = 0; i < (long)(n - 1) * V; i++) {
        worst = fmax(worst, test_absdiff(tl[i], ref[i]));
        scale = fmax(scale, fabs(ref[i]));
    }
    free(ref);
    if (m.mtp_ran) {
        snprintf(path, sizeof path, "%s/mtp_logits.f32", dir);
        ref = test_read_file(path, &len);
        CHECK(ref && len == sizeof(float) * (n - 1) * V);
        for (long i = 0; i < (long)(n - 2) * V; i++) {
            worst = fmax(worst, test_absdiff(tm[i], ref[i]));
            scale = fmax(scale, fabs(ref[i]));
        }
        free(ref);
    }
    free(tl);
    free(tm);
    train_model_free(&m);
    printf("    %s: training forward vs golden: max|diff| %.2g of max|logit| (tol 1e-5)\n", name, worst / scale);
    CHECK_MSG(worst <= 1e-5 * scale, "%s: logits differ from the reference by %.3g (largest %.3g)", name, worst, scale);
}

TEST(test_train_forward_matches_golden_logits_v3_bf16) { check_golden_logits("v3"); }
TEST(test_train_forward_matches_golden_logits_v2lite_f16) { check_golden_logits("v2lite"); }
TEST(test_train_forward_matches_golden_logits_v2group) { check_golden_logits("v2group"); }
TEST(test_train_forward_matches_golden_logits_fp8) { check_golden_logits("fp8"); }
TEST(test_train_forward_matches_golden_logits_sharded) { check_golden_logits("v3_sharded"); }

// FP8 storage (--precision fp8): the forward pass is the same bits as with fp32 storage (the kept
// buffers are read again only by the backward pass), so are the gradients computed before any
// layer's backward pass (the head's, the MTP module's final norm); every other gradient moves by FP8 amounts
// (each kept value is off by at most 2^-4 relative plus half a subnormal unit of its tile's scale)
// and the activation plan shrinks.
TEST(test_train_fp8_storage_changes_only_the_layers_gradients) {
    GoldenCase g[2];
    char why[1024] = "";
    Error err = {0};
    LinearRecipe fp8 = {.fmt = LOWP_E4M3, .grad_fmt = LOWP_E4M3, .accum = {0, 1}};
    for (int i = 0; i < 2; i++) {
        CHECK_MSG(golden_load(&g[i], "v3", why, sizeof why) == 0, "%s", why);
        if (i == 0) {  // the recipe without the FP8 plan
            g[i].m.recipe = fp8;
            g[i].m.lowp = &g[i].m.recipe;
        } else {
            CHECK_MSG(train_model_set_recipe(&g[i].m, &fp8, &err) == 0, "%s", err.msg);
        }
        CHECK_MSG(train_model_forward(&g[i].m, g[i].tokens, &err) == 0, "%s", err.msg);
        train_model_zero_grad(&g[i].m);
        CHECK_MSG(train_model_backward(&g[i].m, 1.0f, &err) == 0, "%s", err.msg);
    }
    CHECK(g[1].m.fp8_storage && !g[0].m.fp8_storage && g[1].m.act_bytes < g[0].m.act_bytes);
    CHECK(g[0].m.loss.loss == g[1].m.loss.loss && g[0].m.loss.mtp == g[1].m.loss.mtp);
    int same = 0, moved = 0;
    double worst = 0;
    for (int i = 0; i < g[0].m.n_tensors; i++) {
        const TrainTensor *t = &g[0].m.tensors[i];
        if (t->shared || t->kind == TENSOR_BIAS) continue;  // (the router bias has no gradient)
        const float *a = g[0].m.grads + t->offset, *b = g[1].m.grads + t->offset;
        // the gradients computed before any layer's backward pass: the output head (shared by the
        // MTP module) and the MTP module's final norm (the main one also takes the MTP module's
        // input gradient, which comes through its layer)
        int kept_input = !(strstr(t->name, "lm_head") || strstr(t->name, "shared_head.norm"));
        double diff = 0, scale = 0;
        for (size_t j = 0; j < t->numel; j++) {
            diff = fmax(diff, test_absdiff(a[j], b[j]));
            scale = fmax(scale, fabs(a[j]));
        }
        if (!kept_input) {
            CHECK_MSG(diff == 0, "%s: gradient changed by %.3g with FP8 storage", t->name, diff);
            same++;
        } else {  // (the last layer's router reads no kept buffer: it may stay the same)
            // at most two kept values meet in one product (SwiGLU's backward: up × σ'(gate)):
            // (1 + 2^-4)² − 1 ≈ 0.13 of the largest entry, and less once summed
            CHECK_MSG(diff <= 0.15 * scale, "%s: gradient changed by %.3g of %.3g", t->name, diff, scale);
            worst = fmax(worst, diff / scale);
            moved += diff > 0;
        }
    }
    printf("    %d gradients the same bits, %d moved by at most %.2g of their largest entry; "
           "activations %.1f KB -> %.1f KB\n", same, moved, worst, g[0].m.act_bytes / 1e3, g[1].m.act_bytes / 1e3);
    CHECK(same >= 2 && moved > 50);
    golden_free(&g[0]);
    golden_free(&g[1]);
}
