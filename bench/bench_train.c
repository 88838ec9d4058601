// Training throughput of the ~10M-parameter DeepSeek-V3-layout model (bench/configs/
// v3-10m-train.json: q_lora, 16 experts top-4 in 4 groups, one MTP module) at batch 8 × seq 256,
// in each precision of the linear layers (fp32, bf16, fp8; bf16h: bf16 with the output heads' GEMMs in
// BF16 too, `--head-precision bf16`, which the default keeps fp32): tokens per second of full steps
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
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/procmem.h"
#include "bench_common.h"
#include "kernels/backend.h"
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

// One precision's training run ("fp32", "bf16", "fp8", "bf16h"): its model, optimiser and batch.
typedef struct Run {
    const ModelConfig *c;
    int B, T, steps;
    TrainModel m;
    AdamW opt;
    int *tok;
    long long *loads;
} Run;

static void run_free(Run *r) {
    free(r->tok);
    free(r->loads);
    adamw_free(&r->opt);
    train_model_free(&r->m);
}

static int run_init(Run *r, const ModelConfig *c, const char *precision, int B, int T, Error *err) {
    memset(r, 0, sizeof *r);
    r->c = c, r->B = B, r->T = T;
    TrainerOptions o = trainer_defaults();
    int head_bf16 = strcmp(precision, "bf16h") == 0;
    snprintf(o.precision, sizeof o.precision, "%s", head_bf16 ? "bf16" : precision);
    if (train_model_new(&r->m, c, B, T, err)) return -1;
    r->m.head_bf16 = head_bf16;
    LinearRecipe recipe;
    const LinearRecipe *lowp;
    if (trainer_recipe(&o, &recipe, &lowp, err) || train_model_set_recipe(&r->m, lowp, err) ||
        adamw_init(&r->opt, &r->m, adamw_defaults(), err)) {
        train_model_free(&r->m);
        return -1;
    }
    train_model_init_random(&r->m, 1);
    r->tok = malloc(sizeof(int) * B * (T + 1));
    r->loads = calloc((size_t)r->m.n_moe * c->n_routed_experts, sizeof *r->loads);
    if (!r->tok || !r->loads) {
        run_free(r);
        return err_set(err, "out of memory for the batch");
    }
    return 0;
}

// One full step (forward, backward, clipping, AdamW, bias update); its seconds, or -1.
static double run_step(Run *r, Error *err) {
    const ModelConfig *c = r->c;
    int n = r->B * (r->T + 1), s = r->steps++;
    for (int i = 0; i < n; i++) r->tok[i] = (int)((i * 7919L + s * 104729L) % c->vocab_size);
    double t0 = bench_now();
    train_model_zero_grad(&r->m);
    if (train_model_forward(&r->m, r->tok, err) || train_model_backward(&r->m, 1.0f, err) ||
        adamw_update(&r->opt, &r->m, 3e-4f, grad_global_norm(&r->m), err))
        return -1;
    memcpy(r->loads, r->m.expert_load, sizeof *r->loads * r->m.n_moe * c->n_routed_experts);
    moe_bias_update(&r->m, r->loads, 0.001f);
    return bench_now() - t0;
}

// Where the timed steps went, by kind of backend operation, and what ran outside the backend
// (routing, bookkeeping); then the products against the GEMM peaks measured at the start (peak16
// for the BF16/FP8 ones, peak32 for fp32), and the step if they ran at those peaks with the rest as
// it is — how much of the gap to the peak the products are.
static void print_profile(const BackendProfile *p, const double *times, int n, double peak16, double peak32) {
    double total = 0;
    for (int i = 0; i < n; i++) total += times[i];
    char line[1024];
    backend_profile_summary(line, sizeof line, p, total, n);
    printf("        a step by kind of operation (BackendProfile, the timed steps' mean): %s\n", line);
    backend_profile_ops(line, sizeof line, p, n, 8);
    printf("        the longest operations, a step: %s\n", line);
    const double *f = p->flops, *sec = p->seconds;
    double lo = f[BACKEND_LOWP_PRODUCTS] / n / 1e9, hi = f[BACKEND_F32_PRODUCTS] / n / 1e9;
    double products = (sec[BACKEND_LOWP_PRODUCTS] + sec[BACKEND_F32_PRODUCTS]) / n;
    double at_peak = lo / peak16 + hi / peak32, step = total / n - products + at_peak;
    printf("        the products against the GEMM peaks above:");
    if (lo > 0) printf(" bf16/fp8 %.0f%%,", 100 * lo / (sec[BACKEND_LOWP_PRODUCTS] / n) / peak16);
    if (hi > 0) printf(" fp32 %.0f%%;", 100 * hi / (sec[BACKEND_F32_PRODUCTS] / n) / peak32);
    printf(" at those peaks, with the rest as it is, a step would take %.3f s instead of %.3f\n", step, total / n);
}

static double gemm_peak_of(int p) { return p == 0 ? bench_sgemm_peak(2048, 1) : bench_bf16_gemm_peak(2048, 2); }

// bench_train [PRECISION...]: the named precisions only (default: fp32 bf16 fp8 bf16h).
int main(int argc, char **argv) {
    const char *prec[4] = {"fp32", "bf16", "fp8", "bf16h"};
    int run[4] = {argc < 2, argc < 2, argc < 2, argc < 2};
    for (int a = 1; a < argc; a++) {
        int p = 0;
        while (p < 4 && strcmp(argv[a], prec[p])) p++;
        if (p == 4) {
            fprintf(stderr, "bench_train: unknown precision '%s' (fp32, bf16, fp8 or bf16h)\n", argv[a]);
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
    // Each precision alone (its peak resident memory its own): every timed step right after a GEMM
    // peak of its precision, the MFU taken step by step — this host's GEMM rate moved 2x from one
    // minute to the next (an AMX unit shared with another tenant's thread at times).
    double base = 0, bf16_step = 0;
    for (int p = 0; p < 4; p++) {
        if (!run[p]) continue;
        Run r;
        double times[STEPS], mfu[STEPS], peaks[STEPS];
        double gflop = B * T * per_token / 1e9;
        malloc_trim(0);  // (the peak resident this precision's own, not the heap freed before it)
        procmem_reset_peak();
        if (run_init(&r, &c, prec[p], B, T, &err)) {
            fprintf(stderr, "bench_train: %s: %s\n", prec[p], err.msg);
            return 1;
        }
        size_t resident = 0;  // (over the warm-up steps: the GEMM peaks' own buffers come after)
        BackendProfile prof = {0};  // the timed steps' operations, by kind
        for (int s = 0; s < WARM + STEPS; s++) {
            if (s == WARM) resident = procmem_peak_bytes(), r.m.be->ops->profile(r.m.be, &prof);
            double pk = s >= WARM ? gemm_peak_of(p) : 0, t = run_step(&r, &err);
            if (t < 0) {
                fprintf(stderr, "bench_train: %s: %s\n", prec[p], err.msg);
                return 1;
            }
            if (s >= WARM) times[s - WARM] = t, peaks[s - WARM] = pk, mfu[s - WARM] = gflop / t / pk;
        }
        r.m.be->ops->profile(r.m.be, NULL);
        size_t act = r.m.act_bytes;
        run_free(&r);
        double mlo, mhi, plo, phi;
        bench_range(mfu, STEPS, &mlo, &mhi);
        bench_range(peaks, STEPS, &plo, &phi);
        double t = bench_median(times, STEPS), tps = B * T / t, gf = tps * per_token / 1e9;
        if (p == 0) base = t;
        if (p == 1) bf16_step = t;
        char unit[64] = "";
        if (p > 0 && unit16 > 0) snprintf(unit, sizeof unit, " (%.1f%% of the unit)", 100 * gf / unit16);
        char rel[32] = "";
        if (base > 0 && p > 0) snprintf(rel, sizeof rel, ", %.2fx fp32's step", t / base);
        printf("  %-5s: step %.3f s (median of %d), %5.0f tokens/s, %5.1f GFLOP/s%s%s; activations %.0f MB, peak "
               "resident %.0f MB\n        MFU step by step against the %s GEMM peak taken before it: median %.1f%% "
               "(range %.1f-%.1f%%; the peak %.0f-%.0f GFLOP/s)\n",
               prec[p], t, STEPS, tps, gf, unit, rel, act / 1e6, resident / 1e6, p == 0 ? "fp32" : "bf16",
               100 * bench_median(mfu, STEPS), 100 * mlo, 100 * mhi, plo, phi);
        print_profile(&prof, times, STEPS, peak16, peak32);
    }
    // fp8 against bf16 step for step, the two runs alive together and taking turns (sequential
    // medians compare two moments of a drifting host)
    if (run[1] && run[2] && bf16_step > 0) {
        Run r16, r8;
        double ratio[STEPS];
        if (run_init(&r16, &c, "bf16", B, T, &err) || run_init(&r8, &c, "fp8", B, T, &err)) {
            fprintf(stderr, "bench_train: %s\n", err.msg);
            return 1;
        }
        for (int s = 0; s < WARM + STEPS; s++) {
            double t16 = run_step(&r16, &err), t8 = t16 < 0 ? -1 : run_step(&r8, &err);
            if (t8 < 0) {
                fprintf(stderr, "bench_train: %s\n", err.msg);
                return 1;
            }
            if (s >= WARM) ratio[s - WARM] = t8 / t16;
        }
        run_free(&r16);
        run_free(&r8);
        double lo, hi;
        bench_range(ratio, STEPS, &lo, &hi);
        printf("  fp8 / bf16 step, taking turns: median %.2fx (range %.2f-%.2fx)\n", bench_median(ratio, STEPS), lo, hi);
    }
    return 0;
}
