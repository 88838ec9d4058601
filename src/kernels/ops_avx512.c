// AVX-512 versions of the element-wise ops whose cost is exp: softmax rows (attention, routers),
// cross-entropy rows over the vocabulary, SwiGLU; and RMSNorm's backward pass, whose row sum the
// compiler would otherwise leave serial. Called by ops.c after kernels_cpu_avx512().
#include <math.h>

#include "kernels/avx512_util.h"
#include "kernels/kernels_cpu.h"

// e^x lane by lane, within 2 ulp of expf over the normal range: x = n ln2 + r with n = round(x
// log2 e) and r reduced in two steps (ln2 = C1 + C2, C1 exact in few bits), e^r = 1 + r + r² P(r)
// with Cephes' degree-5 P on |r| ≤ ln2 / 2, then × 2^n by vscalefps (which also gives 0, subnormals
// and inf past the ends). x is first clamped to [-104, 89] (e^-104 and e^89 are already 0 and inf
// in fp32), NaN passing through the clamp.
AVX512_INLINE __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    __m512 e = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(e, n);
}

AVX512 void exp_n_avx512(float *out, const float *x, long n, float shift) {
    __m512 s = _mm512_set1_ps(shift);
    for (long i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask((int)(n - i < 16 ? n - i : 16));
        _mm512_mask_storeu_ps(out + i, m, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), s)));
    }
}

NO_FP_CONTRACT AVX512 void add_scale_avx512(float *x, const float *y, long n, float f) {
    FP_CONTRACT_OFF
    const __m512 fv = _mm512_set1_ps(f);
    for (long i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask((int)(n - i < 16 ? n - i : 16));
        __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        if (y) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, y + i));
        _mm512_mask_storeu_ps(x + i, m, _mm512_mul_ps(v, fv));
    }
}

AVX512 void softmax_avx512(float *x, int n) {
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        mv = _mm512_mask_max_ps(mv, m, mv, _mm512_maskz_loadu_ps(m, x + i));
    }
    __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(mv)), s = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        __m512 e = _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), mx)));
        _mm512_mask_storeu_ps(x + i, m, e);
        s = _mm512_add_ps(s, e);
    }
    __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(s));
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        _mm512_mask_storeu_ps(x + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), inv));
    }
}

AVX512 double sum_exp_avx512(float *out, const float *x, int n, float shift) {
    __m512 s = _mm512_set1_ps(shift);
    __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();  // summed in double, as the scalar path
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        __m512 e = _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), s)));
        if (out) _mm512_mask_storeu_ps(out + i, m, e);
        lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
        hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))));
    }
    return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
}

// lane += x[j .. j + 7]² in double (a float's square is exact there, so the fused multiply-add
// rounds once, as the multiplication and addition of the portable path do); the elements past n
// load as 0 and add +0, which leaves a lane as it was
AVX512_INLINE __m512d add_squares_pd(__m512d lane, const float *x, long j, long n) {
    long left = n - j;
    __mmask8 k = left >= 8 ? 0xff : left > 0 ? (__mmask8)((1u << left) - 1) : 0;
    __m512d v = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(k, x + j));
    return _mm512_fmadd_pd(v, v, lane);
}

AVX512 double sum_squares_avx512(const float *x, long n) {
    // lane k of the 32 (vector k / 8, element k % 8): the elements j ≡ k (mod 32), in order
    __m512d a0 = _mm512_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
    long j = 0;
    for (; j + 32 <= n; j += 32) {
        __m512d v0 = _mm512_cvtps_pd(_mm256_loadu_ps(x + j)), v1 = _mm512_cvtps_pd(_mm256_loadu_ps(x + j + 8));
        __m512d v2 = _mm512_cvtps_pd(_mm256_loadu_ps(x + j + 16)), v3 = _mm512_cvtps_pd(_mm256_loadu_ps(x + j + 24));
        a0 = _mm512_fmadd_pd(v0, v0, a0), a1 = _mm512_fmadd_pd(v1, v1, a1);
        a2 = _mm512_fmadd_pd(v2, v2, a2), a3 = _mm512_fmadd_pd(v3, v3, a3);
    }
    if (j < n) {
        a0 = add_squares_pd(a0, x, j, n), a1 = add_squares_pd(a1, x, j + 8, n);
        a2 = add_squares_pd(a2, x, j + 16, n), a3 = add_squares_pd(a3, x, j + 24, n);
    }
    // folded in halves: k + 16, k + 8, then within the vector k + 4, k + 2, k + 1
    return _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(a0, a2), _mm512_add_pd(a1, a3)));
}

// (four running maxima: one would wait on each comparison's latency — the cross-entropy's pass over
// a 4,096-wide row 1.6x faster; the maximum is the same whatever the order)
AVX512 float max_finite_avx512(const float *x, int n) {
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
    int i = 0;
    for (; i + 64 <= n; i += 64) {  // max_ps(v, m) gives m where v is NaN: NaNs never win
        m0 = _mm512_max_ps(_mm512_loadu_ps(x + i), m0), m1 = _mm512_max_ps(_mm512_loadu_ps(x + i + 16), m1);
        m2 = _mm512_max_ps(_mm512_loadu_ps(x + i + 32), m2), m3 = _mm512_max_ps(_mm512_loadu_ps(x + i + 48), m3);
    }
    for (; i < n; i += 16)
        m0 = _mm512_mask_max_ps(m0, tail_mask(n - i), _mm512_maskz_loadu_ps(tail_mask(n - i), x + i), m0);
    return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
}

AVX512 int first_equal_avx512(const float *x, int n, float v) {
    __m512 vv = _mm512_set1_ps(v);
    for (int i = 0; i < n; i += 16) {
        __mmask16 eq = _mm512_mask_cmp_ps_mask(tail_mask(n - i), _mm512_maskz_loadu_ps(tail_mask(n - i), x + i), vv, _CMP_EQ_OQ);
        if (eq) return i + __builtin_ctz(eq);
    }
    return -1;
}

NO_FP_CONTRACT AVX512 void axpy_avx512(float *y, float a, const float *x, long n) {
    FP_CONTRACT_OFF
    const __m512 av = _mm512_set1_ps(a);
    for (long i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask((int)(n - i < 16 ? n - i : 16));
        _mm512_mask_storeu_ps(y + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + i),
                                                      _mm512_mul_ps(av, _mm512_maskz_loadu_ps(m, x + i))));
    }
}

NO_FP_CONTRACT AVX512 float scale_and_dot_avx512(float *out, float a, const float *x, const float *y, long n) {
    FP_CONTRACT_OFF
    const __m512 av = _mm512_set1_ps(a);
    __m512 acc = _mm512_setzero_ps();
    for (long i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask((int)(n - i < 16 ? n - i : 16));
        __m512 xv = _mm512_maskz_loadu_ps(m, x + i);
        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(av, xv));
        acc = _mm512_add_ps(acc, _mm512_mul_ps(xv, _mm512_maskz_loadu_ps(m, y + i)));
    }
    return _mm512_reduce_add_ps(acc);  // (folded in halves: lanes k + 8, then k + 4, k + 2, k + 1)
}

AVX512 void swiglu_forward_avx512(float *out, const float *gate, const float *up, long n) {
    for (long i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask((int)(n - i < 16 ? n - i : 16));
        __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
        __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, up + i)));
    }
}

AVX512 void swiglu_backward_avx512(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
                                   long n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (long i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask((int)(n - i < 16 ? n - i : 16));
        __m512 g = _mm512_maskz_loadu_ps(m, gate + i), d = _mm512_maskz_loadu_ps(m, dout + i);
        __m512 s = _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        __m512 silu = _mm512_mul_ps(g, s);
        _mm512_mask_storeu_ps(dup + i, m, _mm512_mul_ps(d, silu));
        // s (1 + g (1 - s))
        __m512 ds = _mm512_mul_ps(s, _mm512_fmadd_ps(g, _mm512_sub_ps(one, s), one));
        _mm512_mask_storeu_ps(dgate + i, m, _mm512_mul_ps(_mm512_mul_ps(d, _mm512_maskz_loadu_ps(m, up + i)), ds));
    }
}

// One AdamW update of 16 (fewer where k says) parameters, moments fp32; stream: p, m and v are
// 64-byte aligned and written around the cache.
AVX512_INLINE void adamw16(float *p, float *m, float *v, const float *g, __mmask16 k, int stream, __m512 b1,
                           __m512 b2, __m512 c1, __m512 c2, __m512 vc, __m512 vb1, __m512 vb2, __m512 ve, __m512 vlr,
                           __m512 vs) {
    __m512 gj = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, g), vc);
    __m512 mj = _mm512_fmadd_ps(b1, _mm512_maskz_loadu_ps(k, m), _mm512_mul_ps(c1, gj));
    __m512 vj = _mm512_fmadd_ps(b2, _mm512_maskz_loadu_ps(k, v), _mm512_mul_ps(_mm512_mul_ps(c2, gj), gj));
    __m512 mh = _mm512_div_ps(mj, vb1), vh = _mm512_div_ps(vj, vb2);
    __m512 step = _mm512_div_ps(_mm512_mul_ps(vlr, mh), _mm512_add_ps(_mm512_sqrt_ps(vh), ve));
    __m512 pj = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, p), vs, step);
    if (stream) {
        _mm512_stream_ps(p, pj), _mm512_stream_ps(m, mj), _mm512_stream_ps(v, vj);
    } else {
        _mm512_mask_storeu_ps(p, k, pj), _mm512_mask_storeu_ps(m, k, mj), _mm512_mask_storeu_ps(v, k, vj);
    }
}

// AdamW on n parameters with fp32 moments (backend_cpu.c's adamw_elem, 16 at a time): the
// divisions and the square root are IEEE-exact in both, so only contraction into fused
// multiply-adds can make a last-bit difference between the two. stream: the stores bypass the
// cache where p, m and v lie alike on its lines (non-temporal: an update of more parameters than
// the cache holds then writes them without reading their lines first — v3-10m-train's 10M
// parameters, 2 threads: 2.8-3.7 ms against 4.8-7.7), then a fence, so the next reader (another
// thread after the team's barrier) sees them.
AVX512 void adamw_avx512(float *p, float *m, float *v, const float *g, long n, float lr, float beta1, float beta2,
                         float eps, float bc1, float bc2, float clip, float shrink, int stream) {
    const __m512 b1 = _mm512_set1_ps(beta1), b2 = _mm512_set1_ps(beta2), c1 = _mm512_set1_ps(1.0f - beta1);
    const __m512 c2 = _mm512_set1_ps(1.0f - beta2), vc = _mm512_set1_ps(clip), vb1 = _mm512_set1_ps(bc1);
    const __m512 vb2 = _mm512_set1_ps(bc2), ve = _mm512_set1_ps(eps), vlr = _mm512_set1_ps(lr), vs = _mm512_set1_ps(shrink);
    uintptr_t line = (uintptr_t)p & 63;
    stream = stream && ((uintptr_t)m & 63) == line && ((uintptr_t)v & 63) == line;
    long i = 0, body_end = 0;
    if (stream) {
        long head = line ? (64 - (long)line) / 4 : 0;  // parameters before p's next line
        if (head > n) head = n;
        if (head) adamw16(p, m, v, g, tail_mask((int)head), 0, b1, b2, c1, c2, vc, vb1, vb2, ve, vlr, vs);
        i = head;
        body_end = i + (n - i) / 16 * 16;
        for (; i < body_end; i += 16)
            adamw16(p + i, m + i, v + i, g + i, 0xffff, 1, b1, b2, c1, c2, vc, vb1, vb2, ve, vlr, vs);
        _mm_sfence();
    }
    for (; i < n; i += 16)
        adamw16(p + i, m + i, v + i, g + i, tail_mask((int)(n - i < 16 ? n - i : 16)), 0, b1, b2, c1, c2, vc, vb1,
                vb2, ve, vlr, vs);
}

AVX512 void rmsnorm_forward_avx512(float *out, float *rstd, const float *inp, const float *weight, int N, int C,
                                   float eps) {
    for (int n = 0; n < N; n++) {
        const float *x = inp + (long)n * C;
        float *o = out + (long)n * C;
        __m512 ss = _mm512_setzero_ps();
        for (int i = 0; i < C; i += 16) {
            __m512 v = _mm512_maskz_loadu_ps(tail_mask(C - i < 16 ? C - i : 16), x + i);
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        float r = 1.0f / sqrtf(_mm512_reduce_add_ps(ss) / C + eps);
        __m512 rv = _mm512_set1_ps(r);
        for (int i = 0; i < C; i += 16) {
            __mmask16 m = tail_mask(C - i < 16 ? C - i : 16);
            _mm512_mask_storeu_ps(o + i, m, _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), rv),
                                                          _mm512_maskz_loadu_ps(m, weight + i)));
        }
        if (rstd) rstd[n] = r;
    }
}

AVX512 void rmsnorm_backward_avx512(float *dinp, float *dweight, const float *dout, const float *inp,
                                    const float *weight, const float *rstd, int N, int C) {
    for (int n = 0; n < N; n++) {
        const float *x = inp + (long)n * C, *dy = dout + (long)n * C;
        float *dx = dinp + (long)n * C;
        __m512 dot = _mm512_setzero_ps();
        for (int i = 0; i < C; i += 16) {
            __mmask16 m = tail_mask(C - i < 16 ? C - i : 16);
            __m512 d = _mm512_maskz_loadu_ps(m, dy + i), w = _mm512_maskz_loadu_ps(m, weight + i);
            dot = _mm512_fmadd_ps(_mm512_mul_ps(d, w), _mm512_maskz_loadu_ps(m, x + i), dot);
        }
        // dx_j = r w_j dy_j − r³/C x_j Σ_i dy_i w_i x_i;  dw_j += dy_j x_j r
        float r = rstd[n], k = r * r * r / C * _mm512_reduce_add_ps(dot);
        __m512 rv = _mm512_set1_ps(r), kv = _mm512_set1_ps(k);
        for (int i = 0; i < C; i += 16) {
            __mmask16 m = tail_mask(C - i < 16 ? C - i : 16);
            __m512 d = _mm512_maskz_loadu_ps(m, dy + i), xv = _mm512_maskz_loadu_ps(m, x + i);
            __m512 g = _mm512_fmsub_ps(_mm512_mul_ps(rv, _mm512_maskz_loadu_ps(m, weight + i)), d,
                                       _mm512_mul_ps(kv, xv));
            _mm512_mask_storeu_ps(dx + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, dx + i), g));
            _mm512_mask_storeu_ps(dweight + i, m,
                                  _mm512_fmadd_ps(_mm512_mul_ps(d, xv), rv, _mm512_maskz_loadu_ps(m, dweight + i)));
        }
    }
}
