// Training throughput of the ~10M-parameter DeepSeek-V3-layout model (bench/configs/
// v3-10m-train.json: q_lora, 16 experts top-4 in 4 groups, one MTP module) at batch 8 × seq 256:
// tokens per second of full steps (forward, backward, clipping, AdamW, bias update) and the model
// FLOPs utilisation against this machine's fp32 GEMM peak, measured here with the same sgemm.
//
// FLOPs per token = 6 × (active matmul parameters: attention projections, dense FFN or router +
// K_r routed + shared experts, output head, and the MTP module's eh_proj, layer and head)
// + the causal attention products (QKᵀ and PV: 2·H·(qk + v)·(T+1)/2 multiply-adds forward, twice
// that backward) per layer. The embedding look-up and element-wise work count nothing.
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>

#include "bench_common.h"
#include "model/config.h"
#include "model/tensors.h"
#include "train/optim.h"
#include "train/train_model.h"

// Best GFLOP/s of an n×n×n sgemm over reps runs on all cores, the better of two ways: OpenBLAS
// threading it itself, and OpenMP threads each running a single-threaded sgemm on a block of rows
// (as the training code does).
static double sgemm_peak(int n, int reps) {
    float *a = malloc(sizeof(float) * n * n), *b = malloc(sizeof(float) * n * n), *c = malloc(sizeof(float) * n * n);
    for (long i = 0; i < (long)n * n; i++) a[i] = b[i] = (float)((i % 17) - 8) * 0.01f;
    double best = 0;
    int blas_threads = openblas_get_num_threads(), nt = omp_get_max_threads();
    for (int way = 0; way < 2; way++) {
        if (way == 1) openblas_set_num_threads(1);
        for (int r = 0; r < reps; r++) {
            double t0 = bench_now();
            if (way == 0) {
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
            } else {
#pragma omp parallel for schedule(static)
                for (int p = 0; p < nt; p++) {
                    int q = (n + nt - 1) / nt, o = p * q, m = n - o < q ? n - o : q;
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, n, 1.0f, a + (size_t)o * n, n, b, n,
                                0.0f, c + (size_t)o * n, n);
                }
            }
            double g = 2.0 * n * n * n / (bench_now() - t0) / 1e9;
            best = g > best ? g : best;
        }
    }
    openblas_set_num_threads(blas_threads);
    free(a), free(b), free(c);
    return best;
}

// Matmul parameters a token is multiplied by (tensor_cost), in the main model and in each MTP
// module.
typedef struct MatmulParams {
    const ModelConfig *c;
    double main;
    double *mtp;  // (num_nextn_predict_layers)
} MatmulParams;

static int add_matmul(const TensorSpec *t, void *ctx) {
    MatmulParams *p = ctx;
    double n = (double)tensor_cost(p->c, t).matmul;
    if (t->mtp < 0) p->main += n;
    else p->mtp[t->mtp] += n;
    return 0;
}

static double attention_flops(const ModelConfig *c, int T) {
    return 3.0 * 2.0 * c->num_attention_heads * (config_qk_head_dim(c) + c->v_head_dim) * (T + 1) / 2.0;
}

int main(void) {
    double peak = sgemm_peak(2048, 5);
    const char *cfg_path = "bench/configs/v3-10m-train.json";
    enum { B = 8, T = 256, WARM = 2, STEPS = 6 };
    Error err = {0};
    ModelConfig c;
    TrainModel m;
    AdamW opt;
    if (config_load(&c, cfg_path, &err) || train_model_new(&m, &c, B, T, &err) ||
        adamw_init(&opt, &m, adamw_defaults(), &err)) {
        fprintf(stderr, "bench_train: %s\n", err.msg);
        return 1;
    }
    train_model_init_random(&m, 1);
    int *tok = malloc(sizeof(int) * B * (T + 1));
    long long *loads = calloc((size_t)m.n_moe * c.n_routed_experts, sizeof *loads);
    MatmulParams mp = {&c, 0, calloc(c.num_nextn_predict_layers + 1, sizeof(double))};
    tensor_walk(&c, c.num_nextn_predict_layers, NULL, add_matmul, &mp);
    double per_token = 6 * mp.main + c.num_hidden_layers * attention_flops(&c, T);
    // MTP module k predicts from T - 1 - k of the T positions
    for (int k = 0; k < c.num_nextn_predict_layers; k++)
        per_token += (6 * mp.mtp[k] + attention_flops(&c, T - 1 - k)) * (T - 1.0 - k) / T;
    free(mp.mtp);
    double times[STEPS];
    for (int s = 0; s < WARM + STEPS; s++) {
        for (int i = 0; i < B * (T + 1); i++) tok[i] = (int)((i * 7919L + s * 104729L) % c.vocab_size);
        double t0 = bench_now();
        train_model_zero_grad(&m);
        if (train_model_forward(&m, tok, &err)) {
            fprintf(stderr, "bench_train: %s\n", err.msg);
            return 1;
        }
        if (train_model_backward(&m, 1.0f, &err)) return 1;
        if (adamw_update(&opt, &m, 3e-4f, grad_global_norm(&m), &err)) return 1;
        memcpy(loads, m.expert_load, sizeof *loads * m.n_moe * c.n_routed_experts);
        moe_bias_update(&m, loads, 0.001f);
        if (s >= WARM) times[s - WARM] = bench_now() - t0;
    }
    double t = bench_median(times, STEPS), tps = B * T / t;
    printf("train %s: batch %d x seq %d, %d threads, %.1f MFLOP per token\n", cfg_path, B, T, omp_get_max_threads(),
           per_token / 1e6);
    printf("  step %.3f s (median of %d), %.0f tokens/s, %.1f GFLOP/s\n", t, STEPS, tps, tps * per_token / 1e9);
    printf("  fp32 sgemm peak (2048^3) %.1f GFLOP/s: MFU %.1f%%\n", peak, 100 * tps * per_token / 1e9 / peak);
    free(tok);
    free(loads);
    adamw_free(&opt);
    train_model_free(&m);
    return 0;
}
