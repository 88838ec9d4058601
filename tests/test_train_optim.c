// AdamW, clipping, the schedule, gradient accumulation, and the loss-free balancing rule.
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "train/optim.h"
#include "train/train_model.h"
#include "kernels/backend.h"
#include "kernels/convert.h"
#include "kernels/matmul.h"
#include "test.h"

static int tiny_model(TrainModel *m, const char *name, int B, int T) {
    char path[512];
    snprintf(path, sizeof path, "%s/train_grad/%s/config.json", test_datadir(), name);
    ModelConfig c;
    Error err = {0};
    if (config_load(&c, path, &err) || train_model_new(m, &c, B, T, &err)) return -1;
    snprintf(path, sizeof path, "%s/train_grad/%s", test_datadir(), name);
    return train_model_load(m, path, &err);
}

// The gradient norm's Σ x² (the backend's sum_squares): the AVX-512 path and the portable one give
// the same bits at every length around its lanes (32: four vectors of 8) and its chunks (16,384), and both equal the
// sum of the squares in double to its rounding; all the lengths' vectors in one call give each
// vector the bits it has alone.
TEST(test_sum_squares_same_bits_on_both_paths) {
    Backend *be = backend_cpu();
    const long lens[] = {0, 1, 7, 8, 9, 15, 17, 31, 32, 33, 40, 63, 64, 65, 1000, 16383, 16384, 16385, 65537, 200003};
    float *x = malloc(sizeof(float) * 200003);
    unsigned s = 12345;
    for (long i = 0; i < 200003; i++) {
        s = s * 1103515245u + 12345u;
        x[i] = ((float)(s >> 8) / 16777216.0f - 0.5f) * (i % 97 == 0 ? 1e3f : 1.0f);
    }
    enum { LENS = sizeof lens / sizeof *lens };
    double alone[LENS], together[LENS];
    const float *xs[LENS];
    for (int k = 0; k < LENS; k++) {
        const float *xk = x + k;  // (each vector starting elsewhere)
        long n = lens[k] - (lens[k] > k ? k : lens[k]);
        double vec, por, ref = 0;
        CHECK(be->ops->sum_squares(be, &vec, &xk, &n, 1) == 0);
        CHECK(kernels_set_isa("scalar") == 0);
        CHECK(be->ops->sum_squares(be, &por, &xk, &n, 1) == 0);
        CHECK(kernels_set_isa("auto") == 0);
        for (long i = 0; i < n; i++) ref += (double)xk[i] * xk[i];
        CHECK_MSG(memcmp(&vec, &por, sizeof vec) == 0, "n %ld: %.17g vs %.17g", n, vec, por);
        CHECK_MSG(fabs(vec - ref) <= 1e-12 * ref, "n %ld: %.17g vs %.17g", n, vec, ref);
        alone[k] = vec, xs[k] = xk;
    }
    long ns[LENS];
    for (int k = 0; k < LENS; k++) ns[k] = lens[k] - (lens[k] > k ? k : lens[k]);
    CHECK(be->ops->sum_squares(be, together, xs, ns, LENS) == 0);
    CHECK(memcmp(alone, together, sizeof alone) == 0);
    free(x);
}

// The backend's AdamW over many tensors at once: one call for ~4.5M parameters (past the size at
// which the update writes around the cache) gives the bits of calls a tensor at a time (below it),
// whatever the tensors' offsets — on a line, part-way into one, and moments not lying on the
// parameters' lines (which must not take the streaming stores) — and equals adamw_elem's update
// written out here to fp32 rounding.
TEST(test_adamw_one_call_for_all_tensors_same_bits) {
    Backend *be = backend_cpu();
    enum { TENSORS = 6 };
    const long len[TENSORS] = {1, 17, 2000003, 2500000, 31, 65};
    const long gap[TENSORS] = {0, 3, 16, 5, 1, 2};  // floats left before each tensor (tensor 4 moves its
                                                    // moments one along: 2 keep them off tensor 5's)
    long total = 0;
    for (int i = 0; i < TENSORS; i++) total += gap[i] + len[i];
    float *a[2][4];  // two copies of p, m, v, g (64-byte aligned, as the trainer's)
    for (int c = 0; c < 2; c++)
        for (int k = 0; k < 4; k++) {
            a[c][k] = aligned_alloc(64, sizeof(float) * (size_t)(total + 16) / 16 * 16 + 64);
            CHECK(a[c][k] != NULL);
        }
    unsigned s = 777;
    for (long j = 0; j < total + 1; j++)
        for (int k = 0; k < 4; k++) {
            s = s * 1103515245u + 12345u;
            float r = (float)(s >> 8) / 16777216.0f - 0.5f;
            float x = k == 0 ? r : k == 1 ? 0.1f * r : k == 2 ? 0.01f * (r + 0.5f) : 0.3f * r;
            a[0][k][j] = a[1][k][j] = x;
        }
    float *was[3];  // p, m, v before the step
    for (int k = 0; k < 3; k++) {
        was[k] = malloc(sizeof(float) * (size_t)(total + 1));
        memcpy(was[k], a[0][k], sizeof(float) * (size_t)(total + 1));
    }
    AdamWStep st = {.lr = 1e-3f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .bc1 = 0.19f, .bc2 = 0.0975f, .clip = 0.7f};
    AdamWTensor t[2][TENSORS];
    for (int c = 0; c < 2; c++)
        for (long i = 0, off = 0; i < TENSORS; off += gap[i] + len[i], i++) {
            long o = off + gap[i], mo = o + (i == 4 ? 1 : 0);  // tensor 4: its moments a float along
            t[c][i] = (AdamWTensor){.p = a[c][0] + o, .m = a[c][1] + mo, .v = a[c][2] + mo, .g = a[c][3] + o,
                                    .n = len[i], .shrink = i % 2 ? 1.0f : 0.9999f};
        }
    CHECK(be->ops->adamw(be, t[0], TENSORS, &st) == 0);
    for (int i = 0; i < TENSORS; i++) CHECK(be->ops->adamw(be, &t[1][i], 1, &st) == 0);
    for (int k = 0; k < 3; k++)
        CHECK_MSG(memcmp(a[0][k], a[1][k], sizeof(float) * (size_t)(total + 1)) == 0, "array %d differs", k);
    double worst = 0;  // the update in double from the values before it, every 997th parameter
    for (int i = 0; i < TENSORS; i++)
        for (long j = 0; j < len[i]; j += 997) {
            const AdamWTensor *u = &t[1][i];
            long at = u->p - a[1][0] + j, mat = (const float *)u->m - a[1][1] + j;
            double g = (double)a[1][3][at] * st.clip;
            double m1 = st.beta1 * (double)was[1][mat] + (1 - (double)st.beta1) * g;
            double v1 = st.beta2 * (double)was[2][mat] + (1 - (double)st.beta2) * g * g;
            double kept = was[0][at] * (double)u->shrink, step = st.lr * (m1 / st.bc1) / (sqrt(v1 / st.bc2) + st.eps);
            // (p and m against the size of their two terms: they may cancel)
            const double got[3] = {a[1][0][at], ((float *)u->m)[j], ((float *)u->v)[j]}, ref[3] = {kept - step, m1, v1};
            const double size[3] = {fabs(kept) + fabs(step), fabs(st.beta1 * (double)was[1][mat]) + fabs(0.1 * g), v1};
            for (int k = 0; k < 3; k++) {
                double d = fabs(got[k] - ref[k]) / (size[k] + 1e-30);
                worst = d > worst ? d : worst;
            }
        }
    CHECK_MSG(worst < 1e-6, "largest relative difference %g", worst);
    for (int c = 0; c < 2; c++)
        for (int k = 0; k < 4; k++) free(a[c][k]);
    for (int k = 0; k < 3; k++) free(was[k]);
}

// Two AdamW steps against the update written out in double: a matrix decays, a norm does not,
// the router bias does not move; clipping scales the gradients that enter the moments.
TEST(test_adamw_matches_reference) {
    TrainModel m;
    CHECK(tiny_model(&m, "v3", 1, 4) == 0);
    AdamW o;
    Error err = {0};
    AdamWConfig cfg = adamw_defaults();
    cfg.grad_clip = 0.5f;
    CHECK(adamw_init(&o, &m, cfg, &err) == 0);
    const TrainTensor *mat = train_model_tensor(&m, "model.layers.0.self_attn.q_a_proj.weight");
    const TrainTensor *nrm = train_model_tensor(&m, "model.layers.0.input_layernorm.weight");
    const TrainTensor *bias = train_model_tensor(&m, "model.layers.1.mlp.gate.e_score_correction_bias");
    CHECK(mat && nrm && bias);
    float b0 = m.params[bias->offset + 3];
    double p[2] = {m.params[mat->offset + 5], m.params[nrm->offset + 2]}, mm[2] = {0, 0}, vv[2] = {0, 0};
    const TrainTensor *which[2] = {mat, nrm};
    float lrs[2] = {1e-2f, 5e-3f};
    for (int step = 1; step <= 2; step++) {
        for (size_t i = 0; i < m.n_params; i++) m.grads[i] = (float)(((i * 7919 + step * 13) % 101) - 50) * 1e-2f;
        double norm = grad_global_norm(&m), want = 0;
        for (int i = 0; i < m.n_tensors; i++) {
            const TrainTensor *t = &m.tensors[i];
            if (t->shared || t->kind == TENSOR_BIAS) continue;
            for (size_t j = 0; j < t->numel; j++) want += (double)m.grads[t->offset + j] * m.grads[t->offset + j];
        }
        CHECK_NEAR(norm, sqrt(want), 1e-9 * sqrt(want));
        CHECK(norm > cfg.grad_clip);
        double clip = cfg.grad_clip / norm, lr = lrs[step - 1];
        for (int k = 0; k < 2; k++) {
            size_t off = which[k]->offset + (k ? 2 : 5);
            double g = m.grads[off] * clip;
            mm[k] = 0.9 * mm[k] + 0.1 * g;
            vv[k] = 0.95 * vv[k] + 0.05 * g * g;
            double mh = mm[k] / (1 - pow(0.9, step)), vh = vv[k] / (1 - pow(0.95, step));
            p[k] = p[k] * (k == 0 ? 1 - lr * 0.1 : 1.0) - lr * mh / (sqrt(vh) + 1e-8);
        }
        CHECK(adamw_update(&o, &m, (float)lr, norm, &err) == 0);
        CHECK_NEAR(m.params[mat->offset + 5], p[0], 1e-6);
        CHECK_NEAR(m.params[nrm->offset + 2], p[1], 1e-6);
        CHECK_NEAR(o.m[mat->offset + 5], mm[0], 1e-7);
    }
    CHECK(m.params[bias->offset + 3] == b0);
    // the moments survive a save and a load bit for bit
    char path[512];
    snprintf(path, sizeof path, "%s/adamw.safetensors", test_tmpdir());
    CHECK_MSG(adamw_save(&o, &m, path, &err) == 0, "%s", err.msg);
    AdamW o2;
    CHECK(adamw_init(&o2, &m, cfg, &err) == 0);
    CHECK_MSG(adamw_load(&o2, &m, path, &err) == 0, "%s", err.msg);
    CHECK(memcmp(o.m, o2.m, sizeof(float) * 2 * o.n) == 0);
    adamw_free(&o2);
    adamw_free(&o);
    train_model_free(&m);
}

// BF16 moments (--moments bf16): each step's moments are the fp32 update of the stored BF16
// values rounded to nearest even, the parameters move as with fp32 moments to within the BF16
// rounding, and the moments save as BF16 and load back bit for bit (an F32 file loads rounded).
TEST(test_adamw_bf16_moments) {
    TrainModel m;
    CHECK(tiny_model(&m, "v3", 1, 4) == 0);
    Error err = {0};
    AdamWConfig cfg = adamw_defaults();
    cfg.moments_bf16 = 1;
    AdamW o, f;
    CHECK(adamw_init(&o, &m, cfg, &err) == 0 && o.m16 && !o.m);
    cfg.moments_bf16 = 0;
    CHECK(adamw_init(&f, &m, cfg, &err) == 0 && f.m);
    const TrainTensor *mat = train_model_tensor(&m, "model.layers.0.self_attn.q_a_proj.weight");
    CHECK(mat);
    float *p0 = malloc(sizeof(float) * m.n_params), *pf = malloc(sizeof(float) * m.n_params);
    memcpy(p0, m.params, sizeof(float) * m.n_params);
    size_t off = mat->offset + 5;
    double mm = 0;
    for (int step = 1; step <= 3; step++) {
        for (size_t i = 0; i < m.n_params; i++) m.grads[i] = (float)(((i * 7919 + step * 13) % 101) - 50) * 1e-3f;
        double g = m.grads[off];
        // fp32 moments on a copy of the parameters
        memcpy(pf, m.params, sizeof(float) * m.n_params);
        float *keep = m.params;
        m.params = pf;
        CHECK(adamw_update(&f, &m, 1e-3f, 0.0, &err) == 0);
        m.params = keep;
        CHECK(adamw_update(&o, &m, 1e-3f, 0.0, &err) == 0);
        mm = bf16_to_f32(bf16_from_f32((float)(0.9 * mm + 0.1 * g)));
        CHECK_MSG(fabs(bf16_to_f32(o.m16[off]) - mm) <= 0x1p-8 * fabs(mm), "step %d: m %.9g, want %.9g", step,
                  bf16_to_f32(o.m16[off]), mm);
        // the same update to within the moments' rounding (a few 2^-9 relative of a step of ~lr)
        CHECK_MSG(fabs(pf[off] - m.params[off]) <= 1e-3 * 0x1p-5, "step %d: %.9g vs fp32 moments %.9g", step,
                  m.params[off], pf[off]);
    }
    double moved = fabs(m.params[off] - p0[off]);
    CHECK(moved > 1e-4);  // three steps of lr 1e-3 with a steady gradient sign
    free(p0), free(pf);
    char path[512];
    snprintf(path, sizeof path, "%s/adamw_bf16.safetensors", test_tmpdir());
    CHECK_MSG(adamw_save(&o, &m, path, &err) == 0, "%s", err.msg);
    AdamW o2;
    cfg.moments_bf16 = 1;
    CHECK(adamw_init(&o2, &m, cfg, &err) == 0);
    CHECK_MSG(adamw_load(&o2, &m, path, &err) == 0, "%s", err.msg);
    CHECK(memcmp(o.m16, o2.m16, sizeof(uint16_t) * 2 * o.n) == 0);
    snprintf(path, sizeof path, "%s/adamw_f32.safetensors", test_tmpdir());
    CHECK_MSG(adamw_save(&f, &m, path, &err) == 0, "%s", err.msg);
    CHECK_MSG(adamw_load(&o2, &m, path, &err) == 0, "%s", err.msg);
    CHECK(o2.m16[off] == bf16_from_f32(f.m[off]) && o2.v16[off + 1] == bf16_from_f32(f.v[off + 1]));
    adamw_free(&o2);
    adamw_free(&o);
    adamw_free(&f);
    train_model_free(&m);
}

TEST(test_lr_schedule_warmup_constant_cosine) {
    LrSchedule s = {1e-3f, 10, 100, 40, 0.1f};
    CHECK_NEAR(lr_at(&s, 0), 1e-4, 1e-9);       // the first warmup step
    CHECK_NEAR(lr_at(&s, 4), 5e-4, 1e-9);
    CHECK_NEAR(lr_at(&s, 9), 1e-3, 1e-9);       // warmup ends at the peak
    CHECK_NEAR(lr_at(&s, 59), 1e-3, 1e-9);      // constant until the decay
    CHECK(lr_at(&s, 60) < 1e-3f);               // the first decay step moves
    CHECK_NEAR(lr_at(&s, 79), 0.55e-3, 1e-8);   // half way down the cosine: (1 + 0.1) / 2
    CHECK_NEAR(lr_at(&s, 99), 1e-4, 1e-9);      // the last step lands on 10%
    for (long i = 60; i < 99; i++) CHECK(lr_at(&s, i + 1) <= lr_at(&s, i));
}

TEST(test_moe_bias_update_and_max_vio) {
    TrainModel m;
    CHECK(tiny_model(&m, "v3", 1, 4) == 0);
    CHECK(m.n_moe == 2);  // layer 1 and the MTP layer
    int Nr = m.cfg.n_routed_experts;
    long long loads[16] = {4, 1, 3, 3, 2, 3, 3, 5,   // layer 1: mean 3
                           3, 3, 3, 3, 3, 3, 3, 3};  // MTP layer: even
    float before[16];
    for (int j = 0; j < 2; j++) memcpy(before + j * Nr, m.moe_bias[j], sizeof(float) * Nr);
    moe_bias_update(&m, loads, 0.001f);
    float want[8] = {-0.001f, 0.001f, 0, 0, 0.001f, 0, 0, -0.001f};
    for (int i = 0; i < Nr; i++) {
        CHECK_NEAR(m.moe_bias[0][i] - before[i], want[i], 1e-8);
        CHECK(m.moe_bias[1][i] == before[Nr + i]);
    }
    double mean, worst;
    moe_max_vio(loads, 2, Nr, &mean, &worst);
    CHECK_NEAR(worst, 2.0 / 3.0, 1e-12);
    CHECK_NEAR(mean, 1.0 / 3.0, 1e-12);
    train_model_free(&m);
}

// Two micro-batches of one sequence with scale 1/2 give the gradient of the batch of two.
TEST(test_gradient_accumulation_equals_full_batch) {
    TrainModel full, half;
    CHECK(tiny_model(&full, "v3", 2, 6) == 0);
    CHECK(tiny_model(&half, "v3", 1, 6) == 0);
    full.obj.seq_aux_alpha = half.obj.seq_aux_alpha = 0.05f;
    int tok[14] = {0, 5, 9, 33, 2, 17, 40, 0, 11, 11, 7, 30, 45, 3};
    Error err = {0};
    CHECK(train_model_forward(&full, tok, &err) == 0);
    train_model_zero_grad(&full);
    CHECK(train_model_backward(&full, 1.0f, &err) == 0);
    train_model_zero_grad(&half);
    double loss = 0;
    for (int b = 0; b < 2; b++) {
        CHECK(train_model_forward(&half, tok + 7 * b, &err) == 0);
        loss += half.loss.loss / 2;
        CHECK(train_model_backward(&half, 0.5f, &err) == 0);
    }
    CHECK_NEAR(loss, full.loss.loss, 1e-5 * full.loss.loss);
    double scale = 0, diff = 0;
    for (size_t i = 0; i < full.n_params; i++) {
        scale = fmax(scale, fabs(full.grads[i]));
        diff = fmax(diff, fabs(full.grads[i] - half.grads[i]));
    }
    CHECK_MSG(diff <= 1e-5 * scale, "accumulated gradients differ by %.3g (largest %.3g)", diff, scale);
    train_model_free(&full);
    train_model_free(&half);
}

// The heads run fused with their loss, TRAIN_HEAD_ROWS rows at a time: with B·T = 10 × 60 rows
// (chunks of 256, 256 and 88; the MTP module's 590 rows likewise) the loss and the head's weight
// gradient equal the formula written out in double over the logits of the same head inputs —
// mean over rows of lse − logit[target] (main), and scale · (Σ_main (softmax − onehot) ⊗ h / N +
// λ/D · Σ_MTP (softmax − onehot) ⊗ h / N_k). A backward pass needs a forward of its own.
TEST(test_fused_head_matches_formula) {
    TrainModel m;
    int B = 10, T = 60;
    CHECK(tiny_model(&m, "v3", B, T) == 0);
    CHECK(B * T > 2 * TRAIN_HEAD_ROWS && (B * T) % TRAIN_HEAD_ROWS != 0);
    m.obj.mtp_lambda = 0.3f;
    int V = m.cfg.vocab_size, d = m.cfg.hidden_size, D = m.cfg.num_nextn_predict_layers, N = B * T;
    CHECK(D == 1);
    int *tok = malloc(sizeof(int) * B * (T + 1));
    for (int i = 0; i < B * (T + 1); i++) tok[i] = (int)((i * 7919L + 13) % V);
    Error err = {0};
    const float scale = 0.5f;
    CHECK_MSG(train_model_forward(&m, tok, &err) == 0, "%s", err.msg);
    CHECK(m.mtp_ran);
    train_model_zero_grad(&m);
    // the head inputs and logits of the forward, before the backward pass changes nothing of them
    int Nk = m.a.mtp[0].N;
    float *lm = malloc(sizeof(float) * N * V), *lk = malloc(sizeof(float) * Nk * V);
    CHECK_MSG(train_model_logits(&m, 0, lm, &err) == 0 && train_model_logits(&m, 1, lk, &err) == 0, "%s", err.msg);
    CHECK_MSG(train_model_backward(&m, scale, &err) == 0, "%s", err.msg);
    double *want = calloc((size_t)V * d, sizeof(double)), loss = 0;
    for (int k = 0; k <= D; k++) {
        int rows = k ? Nk : N, Tk = T - k;
        const float *lg = k ? lk : lm, *h = k ? m.a.mtp[0].h_out : m.a.lnf;
        double w = k ? (double)m.obj.mtp_lambda / D / rows : 1.0 / rows;
        for (int n = 0; n < rows; n++) {
            int b = n / Tk, i = n % Tk, target = tok[b * (T + 1) + i + k + 1];
            const float *l = lg + (size_t)n * V;
            double mx = -INFINITY, s = 0;
            for (int v = 0; v < V; v++) mx = fmax(mx, l[v]);
            for (int v = 0; v < V; v++) s += exp(l[v] - mx);
            if (!k) loss += (mx + log(s) - l[target]) / rows;
            for (int v = 0; v < V; v++) {
                double g = (exp(l[v] - mx) / s - (v == target)) * w * scale;
                for (int j = 0; j < d; j++) want[(size_t)v * d + j] += g * h[(size_t)n * d + j];
            }
        }
    }
    CHECK_NEAR(m.loss.main, loss, 1e-6 * loss);
    const TrainTensor *head = train_model_tensor(&m, "lm_head.weight");
    CHECK(head);
    double worst = 0, big = 0;
    for (size_t i = 0; i < (size_t)V * d; i++) {
        worst = fmax(worst, fabs(m.grads[head->offset + i] - want[i]));
        big = fmax(big, fabs(want[i]));
    }
    printf("    fused head (%d + %d rows in chunks of %d): max|dW - formula| %.2g of max|dW| (tol 1e-5)\n", N, Nk,
           TRAIN_HEAD_ROWS, worst / big);
    CHECK_MSG(worst <= 1e-5 * big, "head gradient off by %.3g (largest %.3g)", worst, big);
    // consumed: a second backward, or one after an evaluation, is refused
    CHECK(train_model_backward(&m, scale, &err) != 0 && strstr(err.msg, "train_model_forward"));
    CHECK_MSG(train_model_evaluate(&m, tok, &err) == 0, "%s", err.msg);
    CHECK_NEAR(m.loss.main, loss, 1e-6 * loss);
    CHECK(train_model_backward(&m, scale, &err) != 0);
    CHECK(train_model_logits(&m, 2, lm, &err) != 0 && strstr(err.msg, "module 2"));
    free(want), free(lm), free(lk), free(tok);
    train_model_free(&m);
}

// The backend's profile (BackendOps.profile): a bf16 training step timed by kind of operation gives
// the same loss and gradients bit for bit as untimed; its products' FLOPs add up to the count
// written out here from the config — 6 per token and weight a token is multiplied by (forward,
// input and weight gradients): attention projections, the dense FFN, the router, the routed and
// shared experts, the head, and the MTP module (eh_proj, its layer, the shared head) over T - 1
// positions — the BF16 ones in one kind and the fp32 ones (head, router) in the other, and the
// attention core's to the causal count; every kind a step runs is timed, within the step's time;
// by operation, the same time and calls, each operation named once; off, nothing more is counted.
TEST(test_backend_profile_counts_a_steps_products) {
    enum { B = 2, T = 8 };
    TrainModel m;
    Error err = {0};
    CHECK(tiny_model(&m, "v3", B, T) == 0);
    LinearRecipe bf16 = {.fmt = LOWP_BF16, .grad_fmt = LOWP_BF16};
    CHECK_MSG(train_model_set_recipe(&m, &bf16, &err) == 0, "%s", err.msg);
    const ModelConfig *c = &m.cfg;
    int tok[B * (T + 1)];
    for (int i = 0; i < B * (T + 1); i++) tok[i] = (i * 7 + 3) % c->vocab_size;
    float *g0 = malloc(sizeof(float) * m.n_params);
    train_model_zero_grad(&m);
    CHECK_MSG(train_model_forward(&m, tok, &err) == 0 && train_model_backward(&m, 1.0f, &err) == 0, "%s", err.msg);
    double loss0 = m.loss.loss;
    memcpy(g0, m.grads, sizeof(float) * m.n_params);

    BackendProfile p = {0};
    m.be->ops->profile(m.be, &p);
    double t0 = omp_get_wtime();
    train_model_zero_grad(&m);
    CHECK_MSG(train_model_forward(&m, tok, &err) == 0 && train_model_backward(&m, 1.0f, &err) == 0, "%s", err.msg);
    double norm = grad_global_norm(&m), wall = omp_get_wtime() - t0;
    m.be->ops->profile(m.be, NULL);
    CHECK(!isnan(norm));
    CHECK(memcmp(&loss0, &m.loss.loss, sizeof loss0) == 0);
    CHECK(memcmp(g0, m.grads, sizeof(float) * m.n_params) == 0);

    double d = c->hidden_size, H = c->num_attention_heads, qk = c->qk_nope_head_dim + c->qk_rope_head_dim;
    double attn = c->q_lora_rank * d + H * qk * c->q_lora_rank + (c->kv_lora_rank + c->qk_rope_head_dim) * d +
                  H * (c->qk_nope_head_dim + c->v_head_dim) * c->kv_lora_rank + d * H * c->v_head_dim;
    double dense = 3.0 * c->intermediate_size * d, F = c->moe_intermediate_size;
    double moe = c->n_routed_experts * d + (c->num_experts_per_tok + c->n_shared_experts) * 3 * F * d;
    double head = (double)c->vocab_size * d, lowp = 0, f32 = 0;
    for (int l = 0; l < c->num_hidden_layers; l++) lowp += attn + (l < c->first_k_dense_replace ? dense : moe);
    f32 = head + c->n_routed_experts * d * (c->num_hidden_layers - c->first_k_dense_replace);
    lowp -= c->n_routed_experts * d * (c->num_hidden_layers - c->first_k_dense_replace);  // (the routers are fp32)
    double mtp_lowp = d * 2 * d + attn + moe - c->n_routed_experts * d, mtp_f32 = head + c->n_routed_experts * d;
    double want_lowp = 6 * (lowp * B * T + mtp_lowp * B * (T - 1)), want_f32 = 6 * (f32 * B * T + mtp_f32 * B * (T - 1));
    CHECK_MSG(fabs(p.flops[BACKEND_LOWP_PRODUCTS] - want_lowp) <= 1e-9 * want_lowp, "bf16 products: %.0f FLOPs, want %.0f",
              p.flops[BACKEND_LOWP_PRODUCTS], want_lowp);
    CHECK_MSG(fabs(p.flops[BACKEND_F32_PRODUCTS] - want_f32) <= 1e-9 * want_f32, "fp32 products: %.0f FLOPs, want %.0f",
              p.flops[BACKEND_F32_PRODUCTS], want_f32);
    // the attention core: (qk + v) multiply-adds a head, row and position it sees, causal, the
    // backward twice the forward; the MTP module's layer over T - 1 positions
    double hv = H * (qk + c->v_head_dim), want_attn = 3 * 2 * hv * B * (c->num_hidden_layers * T * (T + 1) / 2.0 +
                                                                           (T - 1) * T / 2.0);
    CHECK_MSG(fabs(p.flops[BACKEND_ATTENTION] - want_attn) <= 1e-9 * want_attn, "attention: %.0f FLOPs, want %.0f",
              p.flops[BACKEND_ATTENTION], want_attn);
    double sum = 0;
    for (int k = 0; k < BACKEND_KINDS; k++) {
        CHECK_MSG(p.calls[k] > 0 && p.seconds[k] > 0, "%s: %ld calls, %g s", backend_kind_names[k], p.calls[k], p.seconds[k]);
        CHECK(k <= BACKEND_ATTENTION || p.flops[k] == 0);
        sum += p.seconds[k];
    }
    CHECK_MSG(sum <= wall, "the kinds' %g s against the step's %g s", sum, wall);
    // by operation: the same time and calls, each operation once, the step's own among them
    double op_sum = 0;
    long op_calls = 0, kind_calls = 0;
    int seen = 0;
    for (int k = 0; k < BACKEND_KINDS; k++) kind_calls += p.calls[k];
    for (int i = 0; i < p.n_ops; i++) {
        op_sum += p.op_seconds[i], op_calls += p.op_calls[i];
        for (int j = 0; j < i; j++) CHECK(strcmp(p.op_name[i], p.op_name[j]) != 0);
        seen += strcmp(p.op_name[i], "matmul_backward") == 0 || strcmp(p.op_name[i], "latent_attention_backward") == 0 ||
                strcmp(p.op_name[i], "experts_backward") == 0 || strcmp(p.op_name[i], "sum_squares") == 0;
    }
    CHECK_MSG(fabs(op_sum - sum) <= 1e-9 * sum && op_calls == kind_calls && seen == 4,
              "operations: %g s and %ld calls against %g s and %ld; %d of 4 named", op_sum, op_calls, sum, kind_calls, seen);
    char ops[1024];
    backend_profile_ops(ops, sizeof ops, &p, 1, 3);
    int longest = 0;
    for (int i = 1; i < p.n_ops; i++) longest = p.op_seconds[i] > p.op_seconds[longest] ? i : longest;
    CHECK_MSG(strncmp(ops, p.op_name[longest], strlen(p.op_name[longest])) == 0 && strstr(ops, " calls), "), "%s", ops);
    BackendProfile before = p;
    train_model_zero_grad(&m);
    CHECK(train_model_forward(&m, tok, &err) == 0);
    CHECK(memcmp(&before, &p, sizeof p) == 0);
    free(g0);
    train_model_free(&m);
}
