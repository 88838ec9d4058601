#include <math.h>
#include <string.h>

#include "kernels/attention.h"

// "omp simd reduction" lets the compiler reassociate the sums into vector lanes (fp32 accumulation
// in a different order, as every BLAS does).
__attribute__((target_clones("avx512f", "avx2", "default"))) void attention_one_query(
    float *out, const float *q1, const float *q2, const float *k1, int d1, int ld1, const float *k2, int d2,
    const float *v, int dv, int ldv, int S, float scale, float *scores) {
    float mx = -INFINITY;
    for (int j = 0; j < S; j++) {
        const float *a = k1 + (long)j * ld1, *b = k2 + (long)j * d2;
        float s = 0;
#pragma omp simd reduction(+ : s)
        for (int i = 0; i < d1; i++) s += q1[i] * a[i];
#pragma omp simd reduction(+ : s)
        for (int i = 0; i < d2; i++) s += q2[i] * b[i];
        s *= scale;
        scores[j] = s;
        mx = s > mx ? s : mx;
    }
    float sum = 0;
    for (int j = 0; j < S; j++) {
        scores[j] = expf(scores[j] - mx);
        sum += scores[j];
    }
    float inv = 1.0f / sum;
    memset(out, 0, sizeof(float) * dv);
    for (int j = 0; j < S; j++) {
        const float *vj = v + (long)j * ldv;
        float p = scores[j] * inv;
#pragma omp simd
        for (int i = 0; i < dv; i++) out[i] += p * vj[i];
    }
}
