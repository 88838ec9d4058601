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

// In-place softmax of x (n), max-subtracted, fp32.
void softmax_inplace(float *x, int n);
float sigmoidf_(float x);

// RoPE on interleaved pairs (x[2i], x[2i+1]) rotated by pos * inv_freq[i], scaled by mscale.
// x: (r)   inv_freq: (r/2)
void rope_forward(float *x, int r, int pos, const double *inv_freq, float mscale);
// The inverse rotation (the transpose), for the backward pass: dx ← Rᵀ dx.
void rope_backward(float *dx, int r, int pos, const double *inv_freq, float mscale);

// Inverse frequencies theta^(-2i/r), i < r/2, optionally corrected by YaRN (factor > 1):
// f_i ← f_i/factor · ramp_i + f_i · (1 − ramp_i) with the ramp between the correction dimensions
// of beta_fast and beta_slow (SPEC §2.1).
void rope_inv_freq(double *inv_freq, int r, double theta, int yarn, double factor, int original_max_pos,
                   double beta_fast, double beta_slow);

#endif
