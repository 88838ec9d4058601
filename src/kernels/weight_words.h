// Internal to src/kernels: stored weights as the BF16 values the BF16-compute products take
// (matmul_bf16c.c's contract: BF16 as stored, F32 and F16 rounded to nearest even, FP8 E4M3 codes
// exactly — their block scale is applied to each 128-column chunk's sum), 32 values of a row at a
// time as 16 words of pairs (element 2p in the low half of word p). For the kernels that copy
// weight rows before multiplying: the AMX tiles' A rows and the AVX512_BF16 blocked product's
// panels.
#ifndef DSV3_KERNELS_WEIGHT_WORDS_H
#define DSV3_KERNELS_WEIGHT_WORDS_H

#include <stdint.h>

#include "kernels/avx512_util.h"
#include "kernels/kernels_cpu.h"
#include "kernels/matmul.h"

// The look-up tables weight_words32 needs: for FP8 weights the positive codes' values (four
// vectors of 32 words), else zeros.
AVX512BF16_INLINE void weight_words_tables(const MatView *w, __m512i tab[4]) {
    const uint16_t *t = w->dtype == DT_F8_E4M3 ? fp8_bf16_values() : NULL;
    for (int k = 0; k < 4; k++) tab[k] = t ? _mm512_loadu_si512(t + 32 * k) : _mm512_setzero_si512();
}

// Elements [i, i + 32) of w's data (element i = row · cols + column; lanes outside m are zero) as
// 16 words of BF16 pairs.
AVX512BF16_INLINE __m512i weight_words32(const MatView *w, size_t i, __mmask32 m, const __m512i tab[4]) {
    if (w->dtype == DT_BF16) return _mm512_maskz_loadu_epi16(m, (const uint16_t *)w->data + i);
    if (w->dtype == DT_F8_E4M3) {  // the magnitude's value looked up, the sign ORed in
        __m512i code = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(m, (const uint8_t *)w->data + i));
        __m512i mag = _mm512_and_si512(code, _mm512_set1_epi16(0x7f));
        __m512i lo = _mm512_permutex2var_epi16(tab[0], mag, tab[1]), hi = _mm512_permutex2var_epi16(tab[2], mag, tab[3]);
        __m512i v = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(mag, _mm512_set1_epi16(0x40)), lo, hi);
        return _mm512_or_si512(v, _mm512_slli_epi16(_mm512_and_si512(code, _mm512_set1_epi16(0x80)), 8));
    }
    __mmask16 ml = (__mmask16)m, mh = (__mmask16)(m >> 16);
    __m512 lo, hi;
    if (w->dtype == DT_F32) {
        lo = _mm512_maskz_loadu_ps(ml, (const float *)w->data + i);
        hi = _mm512_maskz_loadu_ps(mh, (const float *)w->data + i + 16);
    } else {
        lo = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(ml, (const uint16_t *)w->data + i));
        hi = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mh, (const uint16_t *)w->data + i + 16));
    }
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

// 64 E4M3 codes → their BF16 values (exact; the NaN codes a NaN) as words a and b: the low and the
// high byte of each value looked up by the code's 7 magnitude bits, the sign ORed into the high
// byte, the bytes unpacked into words — which interleaves within 128-bit lanes: word e of a comes
// from code byte 16(e / 8) + e % 8, word e of b from byte 16(e / 8) + 8 + e % 8. t: the tables of
// fp8_widen_tables.
AVX512BF16_VBMI_INLINE void fp8_widen64(__m512i codes, const __m512i t[4], __m512i *a, __m512i *b) {
    __m512i lo = _mm512_permutex2var_epi8(t[0], codes, t[1]);
    __m512i hi = _mm512_permutex2var_epi8(t[2], codes, t[3]);
    hi = _mm512_ternarylogic_epi32(hi, codes, _mm512_set1_epi8((char)0x80), 0xf8);  // hi | (codes & 0x80)
    *a = _mm512_unpacklo_epi8(lo, hi);
    *b = _mm512_unpackhi_epi8(lo, hi);
}

// fp8_widen64's look-up tables: the low bytes of the positive codes' BF16 values (codes 0-63,
// 64-127), then the high bytes.
AVX512BF16_VBMI_INLINE void fp8_widen_tables(__m512i t[4]) {
    const uint16_t *v = fp8_bf16_values();
    for (int k = 0; k < 2; k++) {
        __m512i a = _mm512_loadu_si512(v + 64 * k), b = _mm512_loadu_si512(v + 64 * k + 32);
        t[k] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi16_epi8(a)), _mm512_cvtepi16_epi8(b), 1);
        t[2 + k] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi16_epi8(_mm512_srli_epi16(a, 8))),
                                      _mm512_cvtepi16_epi8(_mm512_srli_epi16(b, 8)), 1);
    }
}

#endif
