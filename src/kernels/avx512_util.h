// Internal to src/kernels: the AVX-512 target attributes and small register helpers shared by the
// kernels compiled for it (each function carries its target; the files build without -mavx512f).
#ifndef DSV3_KERNELS_AVX512_UTIL_H
#define DSV3_KERNELS_AVX512_UTIL_H

#include <immintrin.h>

#define AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512dq,fma"
#define AVX512 __attribute__((target(AVX512_TARGET)))
#define AVX512_INLINE static inline __attribute__((always_inline, target(AVX512_TARGET)))
// The same with the BF16 dot products (AVX512_BF16: Zen 4, Cooper Lake, Sapphire Rapids on)
#define AVX512BF16_TARGET AVX512_TARGET ",avx512bf16"
#define AVX512BF16 __attribute__((target(AVX512BF16_TARGET)))
#define AVX512BF16_INLINE static inline __attribute__((always_inline, target(AVX512BF16_TARGET)))
// ... and AVX512_VBMI's byte permutes (Zen 4, Sapphire Rapids on): FP8 codes widened by byte look-ups
#define AVX512BF16_VBMI_TARGET AVX512BF16_TARGET ",avx512vbmi"
#define AVX512BF16_VBMI __attribute__((target(AVX512BF16_VBMI_TARGET)))
#define AVX512BF16_VBMI_INLINE static inline __attribute__((always_inline, target(AVX512BF16_VBMI_TARGET)))

// The first n of 16 lanes.
static inline __mmask16 tail_mask(int n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }

// The 16 lanes of each of 16 vectors added by one tree — halves (lane i + lane i + 8), then
// + 4, + 2, + 1, the tree of _mm512_reduce_add_ps — all at once: lane 4q + p of the result is the
// sum of v[4p + q]. So a tile's sums are the bits a reduction per vector would give.
AVX512_INLINE __m512 fold16_ps(const __m512 v[16]) {
    __m512 a[8], b[4], c[2];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xee));
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++)
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xdd));
#pragma GCC unroll 2
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44), _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xee));
    return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xdd));
}

// Transposes 16 vectors (rows) into 16 vectors (columns) in place.
AVX512_INLINE void transpose16(__m512 v[16]) {
    __m512 t[16];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
    }
    // v[4g + q]: in 128-bit lane L, column 4L + q of rows 4g .. 4g + 3
#pragma GCC unroll 4
    for (int g = 0; g < 4; g++) {
        __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
        __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
        v[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        v[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        v[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        v[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++) {
        __m512 a = _mm512_shuffle_f32x4(v[q], v[4 + q], 0x88), b = _mm512_shuffle_f32x4(v[q], v[4 + q], 0xdd);
        __m512 c = _mm512_shuffle_f32x4(v[8 + q], v[12 + q], 0x88), d = _mm512_shuffle_f32x4(v[8 + q], v[12 + q], 0xdd);
        t[q] = _mm512_shuffle_f32x4(a, c, 0x88);
        t[8 + q] = _mm512_shuffle_f32x4(a, c, 0xdd);
        t[4 + q] = _mm512_shuffle_f32x4(b, d, 0x88);
        t[12 + q] = _mm512_shuffle_f32x4(b, d, 0xdd);
    }
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) v[i] = t[i];
}

#endif
