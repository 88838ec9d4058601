#include <math.h>

#include "kernels/ops.h"

void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight, int N, int C, float eps) {
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

void swiglu_forward(float *out, const float *gate, const float *up, long n) {
    for (long i = 0; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

void swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up, long n) {
    for (long i = 0; i < n; i++) {
        float s = 1.0f / (1.0f + expf(-gate[i]));
        float silu = gate[i] * s;
        dup[i] = dout[i] * silu;
        dgate[i] = dout[i] * up[i] * (s * (1.0f + gate[i] * (1.0f - s)));
    }
}

void softmax_inplace(float *x, int n) {
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

static void rope_rotate(float *x, int r, int pos, const double *inv_freq, float mscale, double sign) {
    for (int i = 0; i < r / 2; i++) {
        double a = (double)pos * inv_freq[i];
        float c = (float)cos(a) * mscale, s = (float)(sign * sin(a)) * mscale;
        float x0 = x[2 * i], x1 = x[2 * i + 1];
        x[2 * i] = x0 * c - x1 * s;
        x[2 * i + 1] = x0 * s + x1 * c;
    }
}

void rope_forward(float *x, int r, int pos, const double *inv_freq, float mscale) {
    rope_rotate(x, r, pos, inv_freq, mscale, 1.0);
}

void rope_backward(float *dx, int r, int pos, const double *inv_freq, float mscale) {
    rope_rotate(dx, r, pos, inv_freq, mscale, -1.0);
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
