// Optimisation of the training model (SPEC §4): AdamW with decoupled weight decay, global-norm
// gradient clipping, the learning-rate schedule, and the auxiliary-loss-free balancing of the
// MoE routers (SPEC §2.4) with its MaxVio metric.
//
// Which tensors decay: every matrix (linear weights, the embedding, the output head, the router),
// as Megatron-style trainers (DeepSeek's HAI-LLM among them) do by default; vectors (RMSNorm
// weights) do not, since decay would pull a norm's gain towards 0 rather than regularise. The
// e_score_correction_bias is not an AdamW parameter at all: it has no gradient and moves only by
// the load rule below.
#ifndef DSV3_TRAIN_OPTIM_H
#define DSV3_TRAIN_OPTIM_H

#include "base/error.h"
#include "train/train_model.h"

typedef struct AdamWConfig {
    float beta1, beta2;    // 0.9, 0.95
    float eps;             // 1e-8
    float weight_decay;    // 0.1, on matrices only
    float grad_clip;       // 1.0: the global gradient norm is clipped to this (0: no clipping)
    int moments_bf16;      // keep m and v in BF16 (the V3 report's choice), updated in fp32
} AdamWConfig;

AdamWConfig adamw_defaults(void);

typedef struct AdamW {
    AdamWConfig cfg;
    size_t n;       // floats, = the model's n_params (the layouts match)
    float *m, *v;   // (n) first and second moments, one allocation (fp32 moments), or NULL
    uint16_t *m16, *v16;  // (n) the same in BF16 (cfg.moments_bf16), or NULL
    long step;      // updates taken
    Backend *be;    // whose memory holds the moments (the model's)
} AdamW;

int adamw_init(AdamW *o, const TrainModel *model, AdamWConfig cfg, Error *err);
void adamw_free(AdamW *o);

// The L2 norm of every trained gradient (the router bias has none), summed in double over fixed
// chunks in a fixed order: the same bits for any number of threads. NaN when the backend failed.
double grad_global_norm(const TrainModel *model);
// The squared norm of the gradients held here in two parts: parts[0] the dense tensors', parts[1]
// the routed experts' (expert parallel: each rank adds its own, the caller sums them). -1 on error.
int grad_sum_squares(const TrainModel *model, double parts[2]);

// One update at learning rate lr: gradients are first scaled by min(1, clip / norm) (norm from
// grad_global_norm), then p ← p − lr·wd·p (matrices) and p ← p − lr·m̂/(√v̂ + eps).
// Runs on the model's backend; 0, or -1 with err set.
int adamw_update(AdamW *o, TrainModel *model, float lr, double grad_norm, Error *err);

// The moments as a safetensors file: "exp_avg.<tensor>" and "exp_avg_sq.<tensor>" (F32, or BF16
// with BF16 moments) for every trained tensor. The step count travels in the trainer's state.
// Loading accepts either type (a BF16 file into fp32 moments exactly; an F32 file into BF16
// moments rounded to nearest even).
int adamw_save(const AdamW *o, const TrainModel *model, const char *path, Error *err);
// The same with every tensor's moments given: moments[k][i] (k 0: m, 1: v) for model->tensors[i],
// stored as o's moments are (remote experts' gathered from their ranks by the caller).
int adamw_save_values(const AdamW *o, const TrainModel *model, const char *path, const void *const *moments[2],
                      Error *err);
int adamw_load(AdamW *o, const TrainModel *model, const char *path, Error *err);

// Learning rate at a step (0-based): linear warmup over `warmup` steps to `peak`, constant, then a
// cosine decay over the last `decay_steps` of `total` steps, the last step at final_frac · peak.
typedef struct LrSchedule {
    float peak;
    long warmup, total, decay_steps;
    float final_frac;  // 0.1
} LrSchedule;

float lr_at(const LrSchedule *s, long step);

// Auxiliary-loss-free balancing, after each step: for every MoE layer with a correction bias,
// b_i ← b_i + γ · sign(mean load − load_i), the loads counted over the whole step's batch.
// loads: (n_moe, N_r) tokens per expert.
void moe_bias_update(TrainModel *model, const long long *loads, float gamma);

// MaxVio = (max_i load_i − mean load) / mean load per MoE layer; *mean gets the mean over the
// layers, *worst the largest. Both 0 when the model has no MoE layer.
void moe_max_vio(const long long *loads, int n_moe, int n_experts, double *mean, double *worst);

#endif
