#include <math.h>
#include <stdlib.h>

#include "kernels/kernels_cpu.h"
#include "kernels/ops.h"

void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight, int N, int C, float eps) {
    if (kernels_cpu_avx512()) {  // (the scalar sum of squares was ~3% of a 16-sequence decode step)
        rmsnorm_forward_avx512(out, rstd, inp, weight, N, C, eps);
        return;
    }
    for (int n = 0; n < N; n++) {
        const float *x = inp + (long)n * C;
        float *o = out + (long)n * C;
        float ss = 0;
        for (int i = 0; i < C; i++) ss += x[i] * x[i];
        float r = 1.0f / sqrtf(ss / C + eps);
        for (int i = 0; i < C; i++) o[i] = x[i] * r * weight[i];
        if (rstd) rstd[n] = r;
    }
}

void rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp, const float *weight,
                      const float *rstd, int N, int C) {
    if (kernels_cpu_avx512()) {
        rmsnorm_backward_avx512(dinp, dweight, dout, inp, weight, rstd, N, C);
        return;
    }
    for (int n = 0; n < N; n++) {
        const float *x = inp + (long)n * C, *dy = dout + (long)n * C;
        float *dx = dinp + (long)n * C;
        float r = rstd[n];
        // y_i = w_i x_i r;  dx_j = r w_j dy_j − r³/C x_j Σ_i dy_i w_i x_i
        float dot = 0;
        for (int i = 0; i < C; i++) dot += dy[i] * weight[i] * x[i];
        float k = r * r * r / C * dot;
        for (int i = 0; i < C; i++) {
            dx[i] += r * weight[i] * dy[i] - k * x[i];
            dweight[i] += dy[i] * x[i] * r;
        }
    }
}

float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

// The largest of n values that is not a NaN (−inf when none).
static float max_not_nan(const float *x, int n) {
    if (kernels_cpu_avx512()) return max_finite_avx512(x, n);  // (the same value; a zero's sign aside)
    float m = -INFINITY;
    for (int i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

// 16 running sums folded in halves (lane k + 8, then + 4, + 2, + 1: the tree of
// _mm512_reduce_add_ps, which the vector paths use).
static float fold16_halves(float lane[16]) {
    for (int h = 8; h >= 1; h /= 2)
        for (int k = 0; k < h; k++) lane[k] += lane[k + h];
    return lane[0];
}

NO_FP_CONTRACT void axpy_f32(float *y, float a, const float *x, long n) {
    FP_CONTRACT_OFF
    if (kernels_cpu_avx512()) {
        axpy_avx512(y, a, x, n);
        return;
    }
    for (long i = 0; i < n; i++) y[i] += a * x[i];
}

NO_FP_CONTRACT float scale_and_dot_f32(float *out, float a, const float *x, const float *y, long n) {
    FP_CONTRACT_OFF
    if (kernels_cpu_avx512()) return scale_and_dot_avx512(out, a, x, y, n);
    float lane[16] = {0};
    for (long i = 0; i < n; i++) {
        out[i] = a * x[i];
        lane[i % 16] += x[i] * y[i];
    }
    return fold16_halves(lane);
}

void swiglu_forward(float *out, const float *gate, const float *up, long n) {
    if (kernels_cpu_avx512()) {
        swiglu_forward_avx512(out, gate, up, n);
        return;
    }
    for (long i = 0; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

void swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up, long n) {
    if (kernels_cpu_avx512()) {
        swiglu_backward_avx512(dgate, dup, dout, gate, up, n);
        return;
    }
    for (long i = 0; i < n; i++) {
        float s = 1.0f / (1.0f + expf(-gate[i]));
        float silu = gate[i] * s;
        dup[i] = dout[i] * silu;
        dgate[i] = dout[i] * up[i] * (s * (1.0f + gate[i] * (1.0f - s)));
    }
}

float exp_shifted_inplace(float *x, int n, float *max) {
    float m = max_not_nan(x, n);
    *max = m;
    if (n == 0) return 0.0f;
    if (kernels_cpu_avx512()) exp_n_avx512(x, x, n, m);
    else
        for (int i = 0; i < n; i++) x[i] = expf(x[i] - m);
    float lane[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int k = 0; k < 16; k++) lane[k] += x[i + k];
    for (int k = 0; i + k < n; k++) lane[k] += x[i + k];
    return fold16_halves(lane);
}

int argmax_f32(const float *x, int n) {
    if (n <= 1 || isnan(x[0])) return 0;
    if (kernels_cpu_avx512()) return first_equal_avx512(x, n, max_finite_avx512(x, n));  // (x[0] is a candidate)
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

void softmax_inplace(float *x, int n) {
    if (kernels_cpu_avx512()) {
        softmax_avx512(x, n);
        return;
    }
    float m = -INFINITY;
    for (int i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    float s = 0;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - m);
        s += x[i];
    }
    float inv = 1.0f / s;
    for (int i = 0; i < n; i++) x[i] *= inv;
}

void rope_cos_sin(float *cos_t, float *sin_t, int r, int pos, const double *inv_freq, float mscale) {
    for (int i = 0; i < r / 2; i++) {
        double a = (double)pos * inv_freq[i];
        cos_t[i] = (float)cos(a) * mscale;
        sin_t[i] = (float)sin(a) * mscale;
    }
}

void rope_table(float *cos_t, float *sin_t, int T, int r, int pos0, const double *inv_freq, float mscale) {
    for (int t = 0; t < T; t++)
        rope_cos_sin(cos_t + (size_t)t * (r / 2), sin_t + (size_t)t * (r / 2), r, pos0 + t, inv_freq, mscale);
}

// sign +1: the rotation R; sign −1: its transpose.
static void rope_rotate(float *x, int r, const float *c, const float *s, float sign) {
    for (int i = 0; i < r / 2; i++) {
        float x0 = x[2 * i], x1 = x[2 * i + 1], si = sign * s[i];
        x[2 * i] = x0 * c[i] - x1 * si;
        x[2 * i + 1] = x0 * si + x1 * c[i];
    }
}

void rope_forward(float *x, int r, const float *cos_t, const float *sin_t) { rope_rotate(x, r, cos_t, sin_t, 1.0f); }

void rope_backward(float *dx, int r, const float *cos_t, const float *sin_t) { rope_rotate(dx, r, cos_t, sin_t, -1.0f); }

static void rope_rows(float *x, int N, int T, int heads, int stride, int r, const float *cos_t, const float *sin_t,
                      float sign) {
#pragma omp parallel for schedule(static) if (N > 1)
    for (int n = 0; n < N; n++) {
        const float *c = cos_t + (size_t)(n % T) * (r / 2), *s = sin_t + (size_t)(n % T) * (r / 2);
        for (int h = 0; h < heads; h++) rope_rotate(x + ((size_t)n * heads + h) * stride, r, c, s, sign);
    }
}

void rope_rows_forward(float *x, int N, int T, int heads, int stride, int r, const float *cos_t, const float *sin_t) {
    rope_rows(x, N, T, heads, stride, r, cos_t, sin_t, 1.0f);
}

void rope_rows_backward(float *dx, int N, int T, int heads, int stride, int r, const float *cos_t,
                        const float *sin_t) {
    rope_rows(dx, N, T, heads, stride, r, cos_t, sin_t, -1.0f);
}

// Row chunk of the fixed-order reductions: partial sums per chunk of rows, added in chunk order,
// give the same bits however the chunks are scheduled.
#define ROW_CHUNK 64
#define ELEM_CHUNK 4096L

void rmsnorm_rows_forward(float *out, float *rstd, const float *inp, const float *weight, int N, int C, float eps) {
#pragma omp parallel for schedule(static) if (N > ROW_CHUNK)
    for (int n0 = 0; n0 < N; n0 += ROW_CHUNK) {
        int n = N - n0 < ROW_CHUNK ? N - n0 : ROW_CHUNK;
        rmsnorm_forward(out + (size_t)n0 * C, rstd ? rstd + n0 : NULL, inp + (size_t)n0 * C, weight, n, C, eps);
    }
}

void rmsnorm_rows_backward(float *dinp, float *dweight, const float *dout, const float *inp, const float *weight,
                           const float *rstd, int N, int C) {
    int chunks = (N + ROW_CHUNK - 1) / ROW_CHUNK;
    float *part = calloc((size_t)chunks * C, sizeof(float));  // (chunks, C) per-chunk dweight
    if (!part) {  // no memory for the partials: the serial pass gives the same sums row by row
        rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, N, C);
        return;
    }
#pragma omp parallel for schedule(static)
    for (int ch = 0; ch < chunks; ch++) {
        int n0 = ch * ROW_CHUNK, n = N - n0 < ROW_CHUNK ? N - n0 : ROW_CHUNK;
        rmsnorm_backward(dinp + (size_t)n0 * C, part + (size_t)ch * C, dout + (size_t)n0 * C, inp + (size_t)n0 * C,
                         weight, rstd + n0, n, C);
    }
    for (int ch = 0; ch < chunks; ch++)
        for (int i = 0; i < C; i++) dweight[i] += part[(size_t)ch * C + i];
    free(part);
}

void swiglu_rows_forward(float *h, const float *gate, const float *up, long n) {
#pragma omp parallel for schedule(static) if (n > ELEM_CHUNK)
    for (long i = 0; i < n; i += ELEM_CHUNK) swiglu_forward(h + i, gate + i, up + i, n - i < ELEM_CHUNK ? n - i : ELEM_CHUNK);
}

void swiglu_rows_backward(float *dgate, float *dup, const float *dh, const float *gate, const float *up, long n) {
#pragma omp parallel for schedule(static) if (n > ELEM_CHUNK)
    for (long i = 0; i < n; i += ELEM_CHUNK)
        swiglu_backward(dgate + i, dup + i, dh + i, gate + i, up + i, n - i < ELEM_CHUNK ? n - i : ELEM_CHUNK);
}

// Both cross-entropies: each row's loss and log-sum-exp, and with grad (the logits themselves, in
// place) the gradient from the same exponentials, kept and scaled by dloss / Σ.
static double crossentropy_rows(float *losses, float *lse, const float *logits, float *grad, const int *targets, int N,
                                int V, float dloss) {
    // rows handed out a few at a time: the two threads of this workplace's machines often run at
    // different speeds, and each row's values are the same whichever thread computes them
#pragma omp parallel for schedule(dynamic, 4)
    for (int n = 0; n < N; n++) {
        const float *l = logits + (size_t)n * V;
        float *g = grad ? grad + (size_t)n * V : NULL, mx = max_not_nan(l, V), target = l[targets[n]];
        double s = 0;  // Σ e^(l - max) in double, the values kept in g
        if (kernels_cpu_avx512()) s = sum_exp_avx512(g, l, V, mx);
        else
            for (int i = 0; i < V; i++) {
                float e = expf(l[i] - mx);
                if (g) g[i] = e;
                s += e;
            }
        lse[n] = mx + (float)log(s);
        losses[n] = lse[n] - target;
        if (!g) continue;
        float f = (float)(dloss / s);  // softmax · dloss = e^(l - max) · (dloss / Σ)
        if (kernels_cpu_avx512()) add_scale_avx512(g, NULL, V, f);
        else
            for (int i = 0; i < V; i++) g[i] *= f;
        g[targets[n]] -= dloss;
    }
    double sum = 0;
    for (int n = 0; n < N; n++) sum += losses[n];
    return sum;
}

double crossentropy_forward(float *losses, float *lse, const float *logits, const int *targets, int N, int V) {
    return crossentropy_rows(losses, lse, logits, NULL, targets, N, V, 0.0f);
}

double crossentropy_forward_backward(float *losses, float *lse, float *logits, const int *targets, int N, int V,
                                     float dloss) {
    return crossentropy_rows(losses, lse, logits, logits, targets, N, V, dloss);
}

// The rotary dimension whose wavelength completes n rotations over the original context.
static double yarn_correction_dim(double n, int r, double theta, int max_pos) {
    return r * log(max_pos / (n * 2 * M_PI)) / (2 * log(theta));
}

void rope_inv_freq(double *inv_freq, int r, double theta, int yarn, double factor, int original_max_pos,
                   double beta_fast, double beta_slow) {
    for (int i = 0; i < r / 2; i++) inv_freq[i] = pow(theta, -2.0 * i / r);
    if (!yarn || factor <= 1) return;
    double low = floor(yarn_correction_dim(beta_fast, r, theta, original_max_pos));
    double high = ceil(yarn_correction_dim(beta_slow, r, theta, original_max_pos));
    if (low < 0) low = 0;
    if (high > r - 1) high = r - 1;
    if (high == low) high += 0.001;  // avoid a zero-width ramp
    for (int i = 0; i < r / 2; i++) {
        double ramp = (i - low) / (high - low);
        ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
        inv_freq[i] = inv_freq[i] / factor * ramp + inv_freq[i] * (1 - ramp);
    }
}
