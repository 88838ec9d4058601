// Scalar codecs between fp32 and the narrow stored types, done on the bit patterns so that the
// result never depends on the FPU's rounding mode or on denormal flushing.
#include <math.h>
#include <string.h>

#include "kernels/convert.h"
#include "kernels/kernels_cpu.h"

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

// |f| (finite, below the format's overflow point) rounded to nearest-even into a format with
// `mbits` mantissa bits and exponent bias `bias`; returns the code without its sign bit. The carry
// of a rounding that overflows the mantissa moves into the exponent field, which is the next code.
static uint32_t round_to_narrow(uint32_t abs_bits, int mbits, int bias) {
    uint32_t min_normal = (uint32_t)(127 - bias + 1) << 23;
    if (abs_bits >= min_normal) {
        int drop = 23 - mbits;
        uint32_t r = abs_bits - ((uint32_t)(127 - bias) << 23);
        r += (1u << (drop - 1)) - 1 + ((r >> drop) & 1);
        return r >> drop;
    }
    // Subnormal in the narrow format: count units of 2^(1 - bias - mbits). Scaling by a power of two
    // and splitting off the fraction are exact in fp32.
    float t = f32_from_bits(abs_bits) * ldexpf(1.0f, bias - 1 + mbits);
    uint32_t q = (uint32_t)t;
    float frac = t - (float)q;
    if (frac > 0.5f || (frac == 0.5f && (q & 1))) q++;
    return q;
}

float bf16_to_f32(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }

uint16_t bf16_from_f32(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040);  // quiet the NaN
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0) {
        float v = (float)m * 0x1p-24f;
        return sign ? -v : v;
    }
    if (e == 31) return f32_from_bits(sign | 0x7f800000u | (m << 13));
    return f32_from_bits(sign | ((e + 112) << 23) | (m << 13));
}

uint16_t f16_from_f32(float f) {
    uint32_t u = f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00 | (uint16_t)((a >> 13) & 0x3ff);
    if (a >= 0x477ff000u) return sign | 0x7c00;  // 65520 and above round to infinity
    return sign | (uint16_t)round_to_narrow(a, 10, 15);
}

float fp8_e4m3_to_f32(uint8_t c) {
    uint32_t e = (c >> 3) & 0xf, m = c & 7;
    float v;
    if (e == 15 && m == 7) v = NAN;
    else if (e == 0) v = (float)m * 0x1p-9f;
    else v = ldexpf(1.0f + (float)m / 8.0f, (int)e - 7);
    return (c & 0x80) ? -v : v;
}

uint8_t fp8_e4m3_from_f32(float f) {
    uint32_t u = f32_bits(f);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7f;
    // Above 448 nearest-even would give 480, which is the NaN code: saturate (infinity included).
    if (a >= 0x43e00000u) return sign | 0x7e;
    return sign | (uint8_t)round_to_narrow(a, 3, 7);
}

float fp8_e5m2_to_f32(uint8_t c) { return f16_to_f32((uint16_t)(c << 8)); }

uint8_t fp8_e5m2_from_f32(float f) {
    uint32_t u = f32_bits(f);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e;
    if (a == 0x7f800000u) return sign | 0x7c;
    if (a >= 0x47600000u) return sign | 0x7b;  // finite values past 57344 saturate
    return sign | (uint8_t)round_to_narrow(a, 2, 15);
}

void bf16_to_f32_n(float *out, const uint16_t *in, size_t n) {
    size_t i = 0;
    if (kernels_cpu_avx512()) i = bf16_to_f32_n_avx512(out, in, n);
    for (; i < n; i++) out[i] = bf16_to_f32(in[i]);
}

void bf16_from_f32_n(uint16_t *out, const float *in, size_t n) {
    size_t i = 0;
    if (kernels_cpu_avx512()) i = bf16_from_f32_n_avx512(out, in, n);
    for (; i < n; i++) out[i] = bf16_from_f32(in[i]);
}
