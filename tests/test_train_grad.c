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

static double golden_loss(const GoldenCase *g, const char *part) {
    return json_number_value(json_object_get(json_object_get(g->golden, "losses"), part));
}

// Every trained tensor's gradient within 2e-4 × (its largest golden entry) of the float64 reference,
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
            diff = fmax(diff, fabs(gr[j] - gc[j]));
        }
        CHECK_MSG(scale > 0, "%s: golden gradient of %s is zero", name, t->name);
        if (diff / scale > worst) {
            worst = diff / scale;
            worst_name = t->name;
        }
        compared++;
    }
    st_close(&st);
    CHECK_MSG(worst <= 2e-4, "%s: gradient of %s off by %.3g of its largest entry", name, worst_name, worst);
    CHECK(compared > 20);
    golden_free(&g);
}

TEST(test_train_golden_grad_v3) { check_golden("v3"); }
TEST(test_train_golden_grad_v2lite) { check_golden("v2lite"); }
TEST(test_train_golden_grad_mtp2_tied) { check_golden("mtp2"); }

// The training forward computes the inference engine's function: a checkpoint saved by the
// trainer, loaded by model_load, gives the same main and MTP logits (plain attention) to 1e-4 of
// the largest logit. MTP module 2 is fed module 1's output after its shared_head.norm.
static void check_inference(const char *name) {
    GoldenCase g;
    char why[1024] = "";
    int rc = golden_load(&g, name, why, sizeof why);
    CHECK_MSG(rc == 0, "%s: %s", name, why);
    Error err = {0};
    CHECK_MSG(train_model_forward(&g.m, g.tokens, &err) == 0, "%s", err.msg);
    char dir[600];
    snprintf(dir, sizeof dir, "%s/train_infer_%s", test_tmpdir(), name);
    CHECK_MSG(train_model_save(&g.m, dir, (size_t)1 << 30, &err) == 0, "%s", err.msg);
    const ModelConfig *c = &g.cfg;
    int B = g.m.B, T = g.m.T, V = c->vocab_size, d = c->hidden_size, D = g.m.mtp_ran ? c->num_nextn_predict_layers : 0;
    Model mm;
    CHECK_MSG(model_load(&mm, dir, D > 0, &err) == 0, "%s", err.msg);
    float *logits = malloc(sizeof(float) * T * V), *hidden = malloc(sizeof(float) * T * d);
    float *hout = malloc(sizeof(float) * T * d);
    double worst = 0, scale = 0;
    for (int b = 0; b < B; b++) {
        const int *tok = g.tokens + b * (T + 1);
        KVCache kv;
        CHECK(kvcache_init(&kv, c, D, T, &err) == 0);
        ForwardState *s = forward_state_new(&mm, T, T, &err);
        CHECK(s);
        CHECK_MSG(model_forward(&mm, s, &kv, tok, T, ATTN_PLAIN, logits, NULL, hidden, &err) == 0, "%s", err.msg);
        const float *ref = g.m.a.logits + (size_t)b * T * V;
        for (long i = 0; i < (long)T * V; i++) {
            worst = fmax(worst, fabs(logits[i] - ref[i]));
            scale = fmax(scale, fabs(ref[i]));
        }
        for (int k = 1; k <= D; k++) {
            int Tk = T - k;
            CHECK_MSG(model_mtp_forward(&mm, s, &kv, k - 1, tok + k, hidden, Tk, ATTN_PLAIN, logits, hout, &err) == 0,
                      "%s", err.msg);
            ref = g.m.a.mtp[k - 1].logits + (size_t)b * Tk * V;
            for (long i = 0; i < (long)Tk * V; i++) worst = fmax(worst, fabs(logits[i] - ref[i]));
            memcpy(hidden, hout, sizeof(float) * Tk * d);  // module k's normed output feeds module k + 1
        }
        kvcache_free(&kv);
        // the same one token at a time through the decode step (absorbed attention), MTP chain included
        CHECK(kvcache_init(&kv, c, D, T, &err) == 0);
        for (int t = 0; t < T; t++) {
            CHECK_MSG(model_forward(&mm, s, &kv, tok + t, 1, ATTN_ABSORBED, logits, NULL, hidden + (size_t)t * d, &err) == 0,
                      "%s", err.msg);
            ref = g.m.a.logits + ((size_t)b * T + t) * V;
            for (int i = 0; i < V; i++) worst = fmax(worst, fabs(logits[i] - ref[i]));
        }
        for (int k = 1; k <= D; k++) {
            int Tk = T - k;
            for (int t = 0; t < Tk; t++) {
                CHECK_MSG(model_mtp_forward(&mm, s, &kv, k - 1, tok + k + t, hidden + (size_t)t * d, 1, ATTN_ABSORBED, logits,
                                            hout + (size_t)t * d, &err) == 0,
                          "%s", err.msg);
                ref = g.m.a.mtp[k - 1].logits + ((size_t)b * Tk + t) * V;
                for (int i = 0; i < V; i++) worst = fmax(worst, fabs(logits[i] - ref[i]));
            }
            memcpy(hidden, hout, sizeof(float) * Tk * d);
        }
        forward_state_free(s);
        kvcache_free(&kv);
    }
    free(logits);
    free(hidden);
    free(hout);
    model_free(&mm);
    golden_free(&g);
    CHECK_MSG(worst <= 1e-4 * scale, "%s: logits differ by %.3g (largest logit %.3g)", name, worst, scale);
}

TEST(test_train_forward_matches_inference_v3) { check_inference("v3"); }
TEST(test_train_forward_matches_inference_v2lite) { check_inference("v2lite"); }
TEST(test_train_forward_matches_inference_mtp2_tied) { check_inference("mtp2"); }

// Central differences of the whole objective along a random ±1 direction in each tensor, with
// the expert choice held (it is piecewise constant and not differentiated), against g·u.
static void check_finite_differences(const char *name) {
    GoldenCase g;
    char why[1024] = "";
    int rc = golden_load(&g, name, why, sizeof why);
    CHECK_MSG(rc == 0, "%s: %s", name, why);
    Error err = {0};
    TrainModel *m = &g.m;
    CHECK(train_model_forward(m, g.tokens, &err) == 0);
    train_model_zero_grad(m);
    CHECK(train_model_backward(m, 1.0f, &err) == 0);
    m->freeze_routing = 1;
    Rng rng;
    rng_seed(&rng, 7);
    int checked = 0;
    double worst = 0;
    const char *worst_name = "";
    for (int i = 0; i < m->n_tensors; i++) {
        const TrainTensor *t = &m->tensors[i];
        if (t->shared || t->kind == TENSOR_BIAS) continue;
        float *w = m->params + t->offset, *u = malloc(sizeof(float) * t->numel), *w0 = malloc(sizeof(float) * t->numel);
        double rmsw = 0, an = 0;
        for (size_t j = 0; j < t->numel; j++) {
            u[j] = (rng_next(&rng) >> 63) ? 1.0f : -1.0f;
            rmsw += (double)w[j] * w[j];
            an += (double)m->grads[t->offset + j] * u[j];
        }
        memcpy(w0, w, sizeof(float) * t->numel);
        float eps = (float)(3e-3 * sqrt(rmsw / t->numel));
        double L[2];
        for (int side = 0; side < 2; side++) {
            for (size_t j = 0; j < t->numel; j++) w[j] = w0[j] + (side ? -eps : eps) * u[j];
            CHECK(train_model_forward(m, g.tokens, &err) == 0);
            L[side] = m->loss.loss;
        }
        memcpy(w, w0, sizeof(float) * t->numel);
        free(u);
        free(w0);
        double fd = (L[0] - L[1]) / (2.0 * eps), rel = fabs(fd - an) / (fabs(an) + 1e-3);
        if (rel > worst) {
            worst = rel;
            worst_name = t->name;
        }
        checked++;
    }
    golden_free(&g);
    CHECK(checked > 20);
    CHECK_MSG(worst <= 2e-2, "%s: %s: finite difference and gradient differ by %.3g relative", name, worst_name, worst);
}

TEST(test_train_finite_differences_v3) { check_finite_differences("v3"); }
TEST(test_train_finite_differences_v2lite) { check_finite_differences("v2lite"); }

// Checkpoints in any stored dtype (BF16, F16, F32, FP8 with block scales) load into the training
// model and give the golden logits of the independent numpy reference (tests/data/<case>,
// tools/ref_model.py) within its stated 1e-3, main and MTP rows alike.
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
    CHECK(train_model_forward(&m, tok, &err) == 0);
    int V = c.vocab_size;
    size_t len;
    snprintf(path, sizeof path, "%s/logits.f32", dir);
    float *ref = test_read_file(path, &len);
    CHECK(ref && len == sizeof(float) * n * V);
    double worst = 0;
    for (long i = 0; i < (long)(n - 1) * V; i++) worst = fmax(worst, fabs(m.a.logits[i] - ref[i]));
    free(ref);
    if (m.mtp_ran) {
        snprintf(path, sizeof path, "%s/mtp_logits.f32", dir);
        ref = test_read_file(path, &len);
        CHECK(ref && len == sizeof(float) * (n - 1) * V);
        for (long i = 0; i < (long)(n - 2) * V; i++) worst = fmax(worst, fabs(m.a.mtp[0].logits[i] - ref[i]));
        free(ref);
    }
    train_model_free(&m);
    CHECK_MSG(worst <= 1e-3, "%s: logits differ from the reference by %.3g", name, worst);
}

TEST(test_train_forward_matches_golden_logits_v3_bf16) { check_golden_logits("v3"); }
TEST(test_train_forward_matches_golden_logits_v2lite_f16) { check_golden_logits("v2lite"); }
TEST(test_train_forward_matches_golden_logits_v2group) { check_golden_logits("v2group"); }
TEST(test_train_forward_matches_golden_logits_fp8) { check_golden_logits("fp8"); }
TEST(test_train_forward_matches_golden_logits_sharded) { check_golden_logits("v3_sharded"); }
