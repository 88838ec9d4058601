// Training throughput of the ~10M-parameter DeepSeek-V3-layout model (bench/configs/
// v3-10m-train.json: q_lora, 16 experts top-4 in 4 groups, one MTP module) at batch 8 × seq 256,
// in each precision of the linear layers (fp32, bf16, fp8): tokens per second of full steps
// (forward, backward, clipping, AdamW, bias update) and the model FLOPs utilisation against this
// machine's peak for that precision's GEMM, measured here: the faster sgemm (OpenBLAS or oneDNN,
// which the training code uses) for fp32, gemm_lowp with
// BF16 operands for bf16 and fp8 (whose E4M3 values run on the same BF16 dot products).
//
// FLOPs per token = 6 × (active matmul parameters: attention projections, dense FFN or router +
// K_r routed + shared experts, output head, and the MTP module's eh_proj, layer and head)
// + the causal attention products (QKᵀ and PV: 2·H·(qk + v)·(T+1)/2 multiply-adds forward, twice
// that backward) per layer. The embedding look-up and element-wise work count nothing.
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/procmem.h"
#include "bench_common.h"
#include "kernels/gemm_lowp.h"
#include "kernels/matmul.h"
#include "model/config.h"
#include "model/tensors.h"
#include "train/optim.h"
#include "train/trainer.h"
#include "train/train_model.h"

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

// Median step time of one precision ("fp32", "bf16", "fp8").
static int time_steps(const ModelConfig *c, const char *precision, int B, int T, int warm, int steps, double *step_s,
                      size_t *act_bytes, size_t *peak, Error *err) {
    TrainModel m;
    AdamW opt;
    TrainerOptions o = trainer_defaults();
    snprintf(o.precision, sizeof o.precision, "%s", precision);
    if (train_model_new(&m, c, B, T, err)) return -1;
    LinearRecipe recipe;
    const LinearRecipe *lowp;
    if (trainer_recipe(&o, &recipe, &lowp, err) || train_model_set_recipe(&m, lowp, err) ||
        adamw_init(&opt, &m, adamw_defaults(), err)) {
        train_model_free(&m);
        return -1;
    }
    train_model_init_random(&m, 1);
    int *tok = malloc(sizeof(int) * B * (T + 1));
    long long *loads = calloc((size_t)m.n_moe * c->n_routed_experts, sizeof *loads);
    double times[16];
    procmem_reset_peak();
    int rc = 0;
    for (int s = 0; s < warm + steps && rc == 0; s++) {
        for (int i = 0; i < B * (T + 1); i++) tok[i] = (int)((i * 7919L + s * 104729L) % c->vocab_size);
        double t0 = bench_now();
        train_model_zero_grad(&m);
        rc = train_model_forward(&m, tok, err) || train_model_backward(&m, 1.0f, err) ||
             adamw_update(&opt, &m, 3e-4f, grad_global_norm(&m), err);
        memcpy(loads, m.expert_load, sizeof *loads * m.n_moe * c->n_routed_experts);
        moe_bias_update(&m, loads, 0.001f);
        if (s >= warm) times[s - warm] = bench_now() - t0;
    }
    *step_s = bench_median(times, steps);
    *act_bytes = m.act_bytes;
    *peak = procmem_peak_bytes();
    free(tok);
    free(loads);
    adamw_free(&opt);
    train_model_free(&m);
    return rc ? -1 : 0;
}

// bench_train [PRECISION...]: the named precisions only (default: fp32 bf16 fp8).
int main(int argc, char **argv) {
    const char *prec[3] = {"fp32", "bf16", "fp8"};
    int run[3] = {argc < 2, argc < 2, argc < 2};
    for (int a = 1; a < argc; a++) {
        int p = 0;
        while (p < 3 && strcmp(argv[a], prec[p])) p++;
        if (p == 3) {
            fprintf(stderr, "bench_train: unknown precision '%s' (fp32, bf16 or fp8)\n", argv[a]);
            return 2;
        }
        run[p] = 1;
    }
    double peak32 = bench_sgemm_peak(2048, 5), peak16 = bench_bf16_gemm_peak(2048, 5), unit16 = bench_bf16_unit_peak();
    const char *cfg_path = "bench/configs/v3-10m-train.json";
    enum { B = 8, T = 256, WARM = 2, STEPS = 6 };
    Error err = {0};
    ModelConfig c;
    if (config_load(&c, cfg_path, &err)) {
        fprintf(stderr, "bench_train: %s\n", err.msg);
        return 1;
    }
    MatmulParams mp = {&c, 0, calloc(c.num_nextn_predict_layers + 1, sizeof(double))};
    tensor_walk(&c, c.num_nextn_predict_layers, NULL, add_matmul, &mp);
    double per_token = 6 * mp.main + c.num_hidden_layers * attention_flops(&c, T);
    // MTP module k predicts from T - 1 - k of the T positions
    for (int k = 0; k < c.num_nextn_predict_layers; k++)
        per_token += (6 * mp.mtp[k] + attention_flops(&c, T - 1 - k)) * (T - 1.0 - k) / T;
    free(mp.mtp);
    printf("train %s: batch %d x seq %d, %d threads, kernels %s, %.1f MFLOP per token\n", cfg_path, B, T,
           omp_get_max_threads(), kernels_isa(), per_token / 1e6);
    printf("  GEMM peaks (2048^3): fp32 sgemm %.1f GFLOP/s, bf16 gemm_lowp (%s) %.1f GFLOP/s; the %s on registers "
           "%.1f GFLOP/s\n", peak32, gemm_lowp_isa(), peak16, bench_bf16_unit, unit16);
    double base = 0;
    for (int p = 0; p < 3; p++) {
        if (!run[p]) continue;
        double t;
        size_t act, peak;
        if (time_steps(&c, prec[p], B, T, WARM, STEPS, &t, &act, &peak, &err)) {
            fprintf(stderr, "bench_train: %s: %s\n", prec[p], err.msg);
            return 1;
        }
        double tps = B * T / t, peak_g = p == 0 ? peak32 : peak16;
        if (p == 0) base = t;
        double gf = tps * per_token / 1e9;
        char unit[64] = "";
        if (p > 0 && unit16 > 0) snprintf(unit, sizeof unit, " (%.1f%% of the unit)", 100 * gf / unit16);
        char rel[32] = "";
        if (base > 0) snprintf(rel, sizeof rel, ", %.2fx fp32's step", t / base);
        printf("  %-4s: step %.3f s (median of %d), %5.0f tokens/s, %5.1f GFLOP/s, MFU %4.1f%% of the %s GEMM peak%s"
               "%s; activations %.0f MB, peak resident %.0f MB\n",
               prec[p], t, STEPS, tps, gf, 100 * gf / peak_g, p == 0 ? "fp32" : "bf16", unit, rel, act / 1e6,
               peak / 1e6);
    }
    return 0;
}
