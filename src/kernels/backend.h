// The backend interface: the operations the model needs, as one table of functions (in the
// manner of ggml's ggml_backend_i). The model says what to compute; a backend decides how —
// threads, BLAS threading and the instruction set live inside it. The CPU backend implements it
// today (backend_cpu.c over the kernels of this folder); a CUDA backend implements the same table.
//
// Every operation returns 0, or -1 with be->err saying what failed. Buffers are fp32 unless a
// MatView says otherwise (weights in their stored type: F32, BF16, F16, F8_E4M3 with block
// scales). Backward operations ACCUMULATE (+=) into their gradient outputs unless said otherwise.
#ifndef DSV3_KERNELS_BACKEND_H
#define DSV3_KERNELS_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "base/error.h"
#include "kernels/attention.h"
#include "kernels/gemm_lowp.h"
#include "kernels/matmul.h"

typedef struct Backend Backend;

// One AdamW step's constants (the optimiser computes them; the backend applies them).
typedef struct AdamWStep {
    float lr, beta1, beta2, eps;
    float bc1, bc2;  // bias corrections 1 − βᵗ
    float clip;      // gradient scale from global-norm clipping (1: none)
    int moments_bf16;  // m and v are BF16 (uint16_t), updated in fp32 and rounded to nearest even
} AdamWStep;

// One tensor's part of an AdamW step: n parameters p with gradients g and moments m, v (float, or
// BF16 as the step says).
typedef struct AdamWTensor {
    float *p;
    void *m, *v;
    const float *g;
    long n;
    float shrink;  // decoupled weight decay factor 1 − lr·wd (1 for vectors)
} AdamWTensor;

// How the three GEMMs of a linear layer take their operands (training's --precision, SPEC §3). A
// NULL recipe means fp32 operands through the kernels inference uses, whose rows are independent
// of how many there are (the engine's batches and prefix cache rely on it). The report keeps the
// embedding, the output head, the router, the norms and the attention core in higher precision in
// every mode.
//   f32: fp32 operands through a library GEMM (gemm_f32: oneDNN), faster at training's sizes but
//   free to round a row differently with the rows beside it — training's fp32 layers and heads.
//   BF16: x, W and the output gradient rounded to BF16, fp32 accumulation.
//   FP8: activations and activation gradients in 1 x 128 tiles along the reduction (the weight
//   gradient's operands so in 128 x 1 tiles: along the tokens), weights in 128 x 128 blocks, or one
//   scale per tensor; partial sums promoted to fp32 every 128 (kernels/gemm_lowp.h).
typedef struct LinearRecipe {
    LowpFormat fmt;       // LOWP_BF16 or LOWP_E4M3 (activations and weights)
    LowpFormat grad_fmt;  // the output gradients': fmt for BF16; E4M3 (the report) or E5M2 for FP8
    int tensor_scaling;   // FP8: one scale per tensor instead of tiles and blocks (an ablation)
    LowpAccum accum;      // FP8: {0, 1} fp32 accumulation; bits > 0 emulates the H800's (ablations)
    int pow2_scales;      // FP8: the activations' and gradients' scales powers of two (UE8M0); weights' fp32
    int f32;              // 1: fp32 operands on F32 weights, the fields above unused
} LinearRecipe;

// Where a backend's operations spent their time (BackendOps.profile turns the timing on): seconds
// and calls by kind of operation, and the FLOPs of the products and the attention core (2 per
// multiply-add, from each call's shapes; the rest count none).
typedef enum BackendOpKind {
    BACKEND_LOWP_PRODUCTS,  // GEMMs under a BF16 or FP8 recipe: matmul, experts and their backward
    BACKEND_F32_PRODUCTS,   // fp32 ones: the output heads, the router, layers without a recipe
    BACKEND_ATTENTION,      // the attention core, forward and backward
    BACKEND_LOSS,           // cross-entropy over the vocabulary
    BACKEND_OPTIMIZER,      // the gradient norm's sums and AdamW
    BACKEND_OTHER,          // norms, SwiGLU, RoPE, residuals, the MoE's dispatch and combine, embeddings, ...
    BACKEND_KINDS
} BackendOpKind;

// Operations a profile names one by one (a backend's whole table fits).
#define BACKEND_PROFILE_OPS 40

typedef struct BackendProfile {
    double seconds[BACKEND_KINDS];
    double flops[BACKEND_KINDS];
    long calls[BACKEND_KINDS];
    // the same time and calls by operation, in the order each first ran (op_name: the backend's
    // name for it, a string it keeps)
    int n_ops;
    const char *op_name[BACKEND_PROFILE_OPS];
    double op_seconds[BACKEND_PROFILE_OPS];
    long op_calls[BACKEND_PROFILE_OPS];
} BackendProfile;

// Short names of the kinds, for reports ("bf16/fp8 products", "fp32 products", ...).
extern const char *const backend_kind_names[BACKEND_KINDS];

// One line of where `steps` steps of `seconds` in all went: each kind's mean milliseconds a step,
// its share of the time and GFLOP/s where it counts FLOPs, then the time outside the backend's
// operations (the caller's own work), and all the FLOPs counted over the whole time (for a training
// step: the model FLOPs MFU is taken from). Returns what snprintf returns.
int backend_profile_summary(char *buf, size_t n, const BackendProfile *p, double seconds, long steps);
// The `top` operations that took the longest, longest first: each one's mean milliseconds and calls
// a step over `steps` steps. Returns what snprintf returns.
int backend_profile_ops(char *buf, size_t n, const BackendProfile *p, long steps, int top);

typedef struct BackendOps {
    const char *name;
    // memory: 64-byte aligned, zeroed; NULL with be->err naming `what` when it runs out
    void *(*alloc)(Backend *be, size_t bytes, const char *what);
    void (*free)(Backend *be, void *p);
    // waits until every operation issued so far has finished (the CPU backend runs them in order)
    int (*synchronize)(Backend *be);

    // the three GEMMs of a linear layer: out (N, rows) = x (N, cols) Wᵀ;
    // dx (N, cols) += dout W (dx may be NULL), dw (rows, cols) += doutᵀ x (dw an F32 view);
    // recipe NULL: fp32 operands, any weight type; otherwise an F32 w (training's master weights)
    int (*matmul)(Backend *be, float *out, const float *x, const MatView *w, int N, const LinearRecipe *recipe);
    int (*matmul_backward)(Backend *be, float *dx, const MatView *dw, const float *dout, const float *x,
                           const MatView *w, int N, const LinearRecipe *recipe);
    // out[i] (cols) = row idx[i] of w, widened (embedding look-ups); dw[idx[i]] += dout[i] in row order
    int (*embedding)(Backend *be, float *out, const MatView *w, const int *idx, int n);
    int (*embedding_backward)(Backend *be, const MatView *dw, const float *dout, const int *idx, int n);

    // the routed experts' SwiGLU FFNs in one call (the MoE seam's grouped product): expert e takes
    // rows [off[e], off[e + 1]) of x (d each) into gate, up, h (its intermediate size F each) and
    // out (d each), with its weights w[3e], w[3e + 1], w[3e + 2] (gate (F, d), up, down (d, F)) as
    // matmul takes them — the bits matmul and swiglu give expert by expert; a backend may run the
    // experts side by side.
    int (*experts)(Backend *be, float *out, float *gate, float *up, float *h, const float *x, const MatView *const *w,
                   int n_experts, const int *off, const LinearRecipe *recipe);
    // their backward: from dout (rows of d) and the forward's x, gate, up, h, expert e adds its
    // input gradient into dx's rows and its weight gradients into dw[3e], dw[3e + 1], dw[3e + 2]
    // (F32 views, as matmul_backward); dgate, dup, dh (F each per row) are overwritten scratch.
    // Each expert's bits are those matmul_backward and swiglu_backward give for its rows.
    int (*experts_backward)(Backend *be, float *dx, const MatView *const *dw, const float *dout, const float *x,
                            const float *gate, const float *up, const float *h, float *dgate, float *dup, float *dh,
                            const MatView *const *w, int n_experts, const int *off, const LinearRecipe *recipe);
    // RMSNorm over N rows of C: out row n at out + n·ldo, input row at x + n·ldx; rstd (N) or NULL
    int (*rmsnorm)(Backend *be, float *out, int ldo, float *rstd, const float *x, int ldx, const float *weight,
                   int N, int C, float eps);
    // dx (N, C) += ..., dweight (C) += ... (summed over rows in a fixed order)
    int (*rmsnorm_backward)(Backend *be, float *dx, float *dweight, const float *dout, const float *x,
                            const float *weight, const float *rstd, int N, int C);
    // h = silu(gate) · up over n elements (its backward is the experts_backward op's)
    int (*swiglu)(Backend *be, float *h, const float *gate, const float *up, long n);
    // RoPE on N rows × heads vectors of width r (x + (n·heads + h)·stride), row n at table row n % T;
    // the backward applies the transposed rotation to the gradient in place
    int (*rope)(Backend *be, float *x, int N, int T, int heads, int stride, int r, const float *cos_t,
                const float *sin_t);
    int (*rope_backward)(Backend *be, float *dx, int N, int T, int heads, int stride, int r, const float *cos_t,
                         const float *sin_t);
    // out = a + b over n elements (the residual stream)
    int (*add)(Backend *be, float *out, const float *a, const float *b, long n);
    // x (n) = 0: a gradient the next operations add into
    int (*zero)(Backend *be, float *x, long n);
    // dst (n) = src rounded to BF16, to nearest even (a BF16 cache's rows)
    int (*to_bf16)(Backend *be, uint16_t *dst, const float *src, long n);
    // an activation kept for the backward pass in FP8: rows × cols → E4M3 codes and a scale per
    // 1 × 128 tile of a row (kernels/gemm_lowp.h; a power of two when pow2), and back into fp32
    int (*fp8_save)(Backend *be, uint8_t *codes, float *scales, const float *x, long rows, int cols, int pow2);
    int (*fp8_restore)(Backend *be, float *x, const uint8_t *codes, const float *scales, long rows, int cols);

    // attention over a latent cache (kernels/attention.h), forward and (plain, saved) backward
    int (*latent_attention)(Backend *be, const LatentAttention *a);
    int (*latent_attention_backward)(Backend *be, const LatentAttention *a, const float *dout, float *dq, float *dkv,
                                     float *dkpe, float *dkpe_heads);

    // the MoE's dispatch and combine: out[i] (d) = src[rows[i]];
    // y[t] += Σ_k weight[t·K + k] · src[slot[t·K + k]] over t < N;
    // its backward: dsrc[slot[t·K + k]] = weight · dy[t] (overwritten), dweight[t·K + k] = dy[t] · src[slot]
    int (*gather_rows)(Backend *be, float *out, const float *src, const int *rows, long n, int d);
    int (*combine)(Backend *be, float *y, const float *src, const int *slot, const float *weight, int N, int K,
                   int d);
    int (*combine_backward)(Backend *be, float *dsrc, float *dweight, const float *dy, const float *src,
                            const int *slot, const float *weight, int N, int K, int d);
    // gather_rows' backward: dx[rows[i]] += dout[i], i in order
    int (*scatter_add_rows)(Backend *be, float *dx, const float *dout, const int *rows, long n, int d);

    // cross-entropy of N rows of logits (N, V): losses, lse (N) written, *sum = Σ losses (double);
    // with its gradient: the same, and in place the logits become (softmax − onehot) · dloss
    int (*crossentropy)(Backend *be, double *sum, float *losses, float *lse, const float *logits, const int *targets,
                        int N, int V);
    int (*crossentropy_grad)(Backend *be, double *sum, float *losses, float *lse, float *logits, const int *targets,
                             int N, int V, float dloss);

    // the optimiser: sums[i] = Σ x[i][j]² over the n[i] elements of each of count vectors (double, in
    // a fixed order: each vector's bits whatever the others are), one call for all of a gradient's
    // tensors; AdamW on count tensors, one call for all of a step's
    int (*sum_squares)(Backend *be, double *sums, const float *const *x, const long *n, int count);
    int (*adamw)(Backend *be, const AdamWTensor *t, int count, const AdamWStep *s);

    // from now on every operation issued through be adds its time to *p (zeroed by the caller);
    // NULL: no more timing. Timing costs two clock reads an operation and changes no result.
    void (*profile)(Backend *be, BackendProfile *p);
} BackendOps;

struct Backend {
    const BackendOps *ops;
    Error err;                 // the last failure
    BackendProfile *profile;   // where the operations' time goes (ops->profile), or NULL
};

// The process's CPU backend (OpenMP threads, AVX-512 when CPUID has it, OpenBLAS for fp32 GEMMs).
Backend *backend_cpu(void);

#endif
