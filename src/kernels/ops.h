// Element-wise and row-wise operations of the transformer, each a forward/backward pair where
// training needs one. Shapes are given per argument; all math is fp32 (RoPE angles in fp64).
#ifndef DSV3_KERNELS_OPS_H
#define DSV3_KERNELS_OPS_H

// RMSNorm over the last dimension: out = inp / sqrt(mean(inp²) + eps) * weight.
// out, inp: (N, C)   weight: (C)   rstd: (N) or NULL, saved for the backward pass
void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight, int N, int C, float eps);
// dinp += ..., dweight += ... (backward passes accumulate; the caller zeroes once per step)
void rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp, const float *weight,
                      const float *rstd, int N, int C);

// SwiGLU activation: out = silu(gate) * up.   out, gate, up: (n)
void swiglu_forward(float *out, const float *gate, const float *up, long n);
// dgate = dout * up * silu'(gate), dup = dout * silu(gate)  (overwrite, not accumulate)
void swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up, long n);

// y (n) += a · x: the product rounded, then the sum (no fused multiply-add: the vector and the
// portable paths give the same bits) — a gated expert output into its token's sum.
void axpy_f32(float *y, float a, const float *x, long n);
// out (n) = a · x, and the return Σ x·y: 16 running sums (element j in sum j mod 16, each product
// rounded before its addition), folded in halves — the same bits on the vector and portable paths.
// A gated expert output's backward: its gradient, and its gate's.
float scale_and_dot_f32(float *out, float a, const float *x, const float *y, long n);

// In-place softmax of x (n), max-subtracted, fp32.
void softmax_inplace(float *x, int n);
// In place x (n) = e^(x − max x); *max gets the max (−inf when n = 0) and the sum of the exps is
// returned (16 lane sums in order, folded in halves: the same bits for the same x).
float exp_shifted_inplace(float *x, int n, float *max);
float sigmoidf_(float x);
// The index of the largest of x (n >= 1), the lowest on ties; NaNs never win, and a NaN at x[0]
// gives 0 (what `if (x[i] > x[best]) best = i` gives, in two vector passes).
int argmax_f32(const float *x, int n);

// RoPE on interleaved pairs (x[2i], x[2i+1]) rotated by the angle pos · inv_freq[i] and scaled by
// mscale (YaRN's cos/sin factor). The angles of a position are computed once (rope_cos_sin, angles
// in fp64) and applied to every vector of that position: the shared rotary key and each head's query.
// cos, sin: (r/2) for one position
void rope_cos_sin(float *cos_t, float *sin_t, int r, int pos, const double *inv_freq, float mscale);
// cos_t, sin_t: (T, r/2) for positions pos0 .. pos0 + T − 1
void rope_table(float *cos_t, float *sin_t, int T, int r, int pos0, const double *inv_freq, float mscale);
// x: (r) rotated in place by one position's cos/sin; the backward pass applies the inverse (the
// transpose) to the gradient: dx ← Rᵀ dx.
void rope_forward(float *x, int r, const float *cos_t, const float *sin_t);
void rope_backward(float *dx, int r, const float *cos_t, const float *sin_t);
// Rows n = 0..N-1, each holding `heads` vectors of width r at x + (n * heads + h) * stride, row n at
// table row n % T (B sequences of T positions); threaded over rows.
void rope_rows_forward(float *x, int N, int T, int heads, int stride, int r, const float *cos_t, const float *sin_t);
void rope_rows_backward(float *dx, int N, int T, int heads, int stride, int r, const float *cos_t,
                        const float *sin_t);

// Row-parallel forms of the ops above for many rows, split over the OpenMP threads in fixed chunks
// so a result never depends on scheduling (dweight: per-chunk partials added in chunk order).
// rstd may be NULL when no backward pass follows.
void rmsnorm_rows_forward(float *out, float *rstd, const float *inp, const float *weight, int N, int C, float eps);
void rmsnorm_rows_backward(float *dinp, float *dweight, const float *dout, const float *inp, const float *weight,
                           const float *rstd, int N, int C);
void swiglu_rows_forward(float *h, const float *gate, const float *up, long n);
void swiglu_rows_backward(float *dgate, float *dup, const float *dh, const float *gate, const float *up, long n);

// Cross-entropy of N rows of logits (N, V) against targets (N): lse (N) saves each row's
// log-sum-exp; losses (N) gets −log p(target). Returns Σ losses in double.
double crossentropy_forward(float *losses, float *lse, const float *logits, const int *targets, int N, int V);
// The same, and in place the logits (N, V) become dlogits = (softmax − onehot) · dloss (the loss's
// weight per row): one exponential per logit, kept and scaled by dloss / Σ (the fused head's loss).
double crossentropy_forward_backward(float *losses, float *lse, float *logits, const int *targets, int N, int V,
                                     float dloss);

// Inverse frequencies theta^(-2i/r), i < r/2, optionally corrected by YaRN (factor > 1):
// f_i ← f_i/factor · ramp_i + f_i · (1 − ramp_i) with the ramp between the correction dimensions
// of beta_fast and beta_slow (SPEC §2.1).
void rope_inv_freq(double *inv_freq, int r, double theta, int yarn, double factor, int original_max_pos,
                   double beta_fast, double beta_slow);

#endif
