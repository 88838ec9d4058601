// gemm_lowp on the AVX512_BF16 dot products. vdpbf16ps adds to each fp32 lane the two products of
// a pair of BF16 values (elements k and k + 1 of K), so both operands are packed as 32-bit words
// holding such pairs, rounded (or FP8-quantised, the value carried as BF16) on the way:
//   A: tiles of MR rows, word (kp, i) at ap[kp * mr + i], broadcast one at a time;
//   B: panels of NR = 32 columns, word (kp, j) at bp[kp * 32 + j], two vectors per pair.
// The register tile is MR × 32 fp32 sums (24 vectors); over a KC slice it accumulates in fp32,
// then adds into C — in FP8 mode once per 128-chunk, multiplied by the chunk's two scales (the
// C tile stays in L1 between its chunks).
#include <math.h>
#include <omp.h>
#include <string.h>

#include "kernels/avx512_util.h"
#include "kernels/kernels_cpu.h"
#include "kernels/weight_words.h"

enum {
    MR = 12,   // rows of A per register tile
    NR = 32,   // columns of B per register tile
    KC = 256,  // depth of one packed slice (two FP8 chunks)
    MC = 192,  // rows of A packed at a time: MC × KC BF16 (96 KiB, L2)
    NC = 1024, // columns of B packed at a time: NC × KC BF16 (512 KiB, L2); a panel 16 KiB (L1).
               // A's blocks are packed again for every NC columns, which with 256 cost a fifth of
               // a 2048³ product (BF16 405 -> 495 GFLOP/s) and more with FP8's quantising packs
    CH = LOWP_FP8_CHUNK,
    KCH = KC / CH,  // chunks per slice
    PF_PAIRS = 4,   // row pairs a transposed operand's pack prefetches ahead
    PF_AHEAD = 128, // values along a row an operand's pack prefetches ahead (8 lines)
};

// x rounded to BF16 (nearest even, NaN quieted), the result's low 16 bits zero — the same integer
// rounding as bf16_from_f32; vcvtne2ps2bf16 is not used because it flushes subnormals.
AVX512_INLINE __m512 round_bf16(__m512 x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    r = _mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u));
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, _mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)),
                             _mm512_set1_epi32(0x00400000));
    return _mm512_castsi512_ps(r);
}

// The FP8 value of x (already divided by its scale): nearest even with `mbits` mantissa bits,
// subnormals on the grid of the binade at `min_normal`, saturated at ±max, NaN kept — the scalar
// codecs of convert.c, lane by lane. The fp32 adder rounds: for |x| in the binade [2^e, 2^(e+1)),
// big = 2^(e + 23 - mbits) has an ulp of 2^(e - mbits), the FP8 grid there, so |x| + big rounds
// |x| to that grid (to nearest even: big is an even multiple of it) and subtracting big is exact.
// Saturating first is the same as rounding first: past ±max the codecs saturate either way.
AVX512_INLINE __m512 round_fp8(__m512 x, const int mbits, float min_normal, float max) {
    __m512i u = _mm512_castps_si512(x);
    __m512 a = _mm512_min_ps(_mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff))),
                             _mm512_set1_ps(max));  // (a NaN lane becomes max: restored below)
    __m512 binade = _mm512_max_ps(_mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a),
                                                                       _mm512_set1_epi32(0x7f800000))),
                                  _mm512_set1_ps(min_normal));
    __m512 big = _mm512_mul_ps(binade, _mm512_set1_ps((float)(1 << (23 - mbits))));
    __m512 v = _mm512_sub_ps(_mm512_add_ps(a, big), big);
    v = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v),
                                            _mm512_and_si512(u, _mm512_set1_epi32((int)0x80000000u))));
    return _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}

// x / s rounded as fmt packs it (s ignored for BF16).
AVX512_INLINE __m512 round_value(const int fmt, __m512 x, __m512 s) {
    switch (fmt) {
    case LOWP_BF16: return round_bf16(x);
    case LOWP_E4M3: return round_fp8(_mm512_div_ps(x, s), 3, 0x1p-6f, 448.0f);
    default: return round_fp8(_mm512_div_ps(x, s), 2, 0x1p-14f, 57344.0f);
    }
}

AVX512 long lowp_values_avx512(float *out, const float *x, long n, LowpFormat fmt, float scale) {
    long i = 0;
    __m512 s = _mm512_set1_ps(scale);
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        switch (fmt) {
        case LOWP_BF16: v = round_value(LOWP_BF16, v, s); break;
        case LOWP_E4M3: v = round_value(LOWP_E4M3, v, s); break;
        default: v = round_value(LOWP_E5M2, v, s); break;
        }
        _mm512_storeu_ps(out + i, v);
    }
    return i;
}

// The largest |x[k]| of n values, NaN ignored (vmaxps returns its second operand when either is
// NaN, as the scalar comparison keeps the running maximum); 0 when n is 0.
AVX512 float lowp_absmax_avx512(const float *x, long n) {
    const __m512 abs_bits = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    __m512 m0 = _mm512_setzero_ps(), m1 = m0;
    long k = 0;
    for (; k + 32 <= n; k += 32) {
        m0 = _mm512_max_ps(_mm512_and_ps(_mm512_loadu_ps(x + k), abs_bits), m0);
        m1 = _mm512_max_ps(_mm512_and_ps(_mm512_loadu_ps(x + k + 16), abs_bits), m1);
    }
    for (; k < n; k += 16)
        m0 = _mm512_max_ps(_mm512_and_ps(_mm512_maskz_loadu_ps(tail_mask((int)(n - k)), x + k), abs_bits), m0);
    return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
}

// m[i] = the largest of m[i] and |x[k * ld + i]| over k < kn, for i < n: the maxima of n columns
// down kn rows (a transposed operand's 128 × 1 tiles), NaN ignored as above.
AVX512 void lowp_colmax_avx512(float *m, const float *x, long ld, int n, int kn) {
    const __m512 abs_bits = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    for (int i = 0; i < n; i += 64) {  // four vectors of columns at a time, kept in registers
        __mmask16 l[4];
        __m512 v[4];
        for (int q = 0; q < 4; q++) {
            l[q] = tail_mask(n - i - 16 * q > 0 ? n - i - 16 * q : 0);
            v[q] = _mm512_maskz_loadu_ps(l[q], m + i + 16 * q);
        }
        for (int k = 0; k < kn; k++)
            for (int q = 0; q < 4; q++)
                v[q] = _mm512_max_ps(_mm512_and_ps(_mm512_maskz_loadu_ps(l[q], x + k * ld + i + 16 * q), abs_bits), v[q]);
        for (int q = 0; q < 4; q++) _mm512_mask_storeu_ps(m + i + 16 * q, l[q], v[q]);
    }
}

// E4M3 codes of x / scale over the leading multiple of 16 of n (returns how many): the value
// round_fp8 gives (nearest even, saturated at ±448, NaN kept), then its code — sign, and for
// normal values the exponent and mantissa bits moved down (the bias 127 → 7), for subnormal ones
// value × 2^9 — as convert.c's fp8_e4m3_from_f32 encodes it (NaN 0x7f with the sign).
AVX512 long lowp_e4m3_codes_avx512(uint8_t *codes, const float *x, long n, float scale) {
    const __m512 s = _mm512_set1_ps(scale);
    const __m512i abs_bits = _mm512_set1_epi32(0x7fffffff);
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = round_value(LOWP_E4M3, _mm512_loadu_ps(x + i), s);
        __m512i u = _mm512_castps_si512(v), a = _mm512_and_si512(u, abs_bits);
        __m512i sign = _mm512_and_si512(_mm512_srli_epi32(u, 24), _mm512_set1_epi32(0x80));
        __m512i normal = _mm512_sub_epi32(_mm512_srli_epi32(a, 20), _mm512_set1_epi32((127 - 7) << 3));
        __m512i sub = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_castsi512_ps(a), _mm512_set1_ps(512.0f)));
        __m512i code = _mm512_mask_blend_epi32(_mm512_cmplt_epi32_mask(a, _mm512_set1_epi32(0x3c800000)), normal, sub);
        code = _mm512_mask_mov_epi32(code, _mm512_cmpgt_epi32_mask(a, _mm512_set1_epi32(0x7f800000)),
                                     _mm512_set1_epi32(0x7f));
        _mm_storeu_si128((__m128i *)(codes + i), _mm512_cvtepi32_epi8(_mm512_or_si512(code, sign)));
    }
    return i;
}

// code × scale over the leading multiple of 16 of n (returns how many): each E4M3 code's value as
// convert.c's fp8_e4m3_to_f32 gives it (exponent and mantissa bits moved up, the bias 7 → 127;
// subnormal codes m × 2^-9; S.1111.111 NaN), times the scale in fp32.
AVX512 long lowp_e4m3_scaled_avx512(float *x, const uint8_t *codes, long n, float scale) {
    const __m512 s = _mm512_set1_ps(scale);
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + i)));
        __m512i em = _mm512_and_si512(c, _mm512_set1_epi32(0x7f));
        __m512i normal = _mm512_slli_epi32(_mm512_add_epi32(em, _mm512_set1_epi32((127 - 7) << 3)), 20);
        __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(em), _mm512_set1_ps(0x1p-9f));
        __m512 v = _mm512_mask_blend_ps(_mm512_cmplt_epi32_mask(em, _mm512_set1_epi32(8)), _mm512_castsi512_ps(normal),
                                        sub);
        v = _mm512_mask_mov_ps(v, _mm512_cmpeq_epi32_mask(em, _mm512_set1_epi32(0x7f)), _mm512_set1_ps(NAN));
        __m512i sign = _mm512_slli_epi32(_mm512_and_si512(c, _mm512_set1_epi32(0x80)), 24);
        v = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), sign));
        _mm512_storeu_ps(x + i, _mm512_mul_ps(v, s));
    }
    return i;
}

// Words of BF16 pairs from rounded values: (even k, odd k) → even in the low half.
AVX512_INLINE __m512i pair_words(__m512 even, __m512 odd) {
    return _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(even), 16),
                           _mm512_and_si512(_mm512_castps_si512(odd), _mm512_set1_epi32((int)0xffff0000u)));
}

// BF16 operands are rounded by vcvtne2ps2bf16 (nearest even, one instruction for 32 values)
// rather than round_bf16: it flushes subnormal inputs to zero, but the dot products read subnormal
// BF16 inputs as zero anyway (AVX512_BF16 and AMX alike), so the products are the same bits.
// 32 values x[0..31] as 16 words in order: x[2p] low, x[2p + 1] high.
AVX512BF16_INLINE __m512i bf16_words(__m512 lo16, __m512 hi16) {
    return (__m512i)_mm512_cvtne2ps_pbh(hi16, lo16);
}

// Words of BF16 pairs (even[i], odd[i]) from two vectors of 16 fp32 values each.
AVX512BF16_INLINE __m512i bf16_pair_words(__m512 even, __m512 odd) {
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(odd, even));
}


// Packs rows [i0, i0 + n) (n <= 16) × K slice [k0, k0 + kc) of an operand as words
// out[kp * stride + (i - i0)], kp < ceil(kc / 2) (a missing odd element is 0). FP8: the slice lies
// in chunks of its own (k0 a multiple of 128), so each element's scale is its row's for its chunk.
AVX512BF16_INLINE void pack_group(const int fmt, uint32_t *out, int stride, const LowpOperand *o, int i0, int n, int k0,
                              int kc, int K) {
    const int kp_n = (kc + 1) / 2;
    const __mmask16 lanes = tail_mask(n);
    if (o->trans) {
        // element (i, k) at data[k * ld + i]: a pair of rows of the source gives 16 words at once
        __m512 s = _mm512_set1_ps(1.0f);
        for (int kp = 0; kp < kp_n; kp++) {
            int k = k0 + 2 * kp;
            if (fmt != LOWP_BF16 && (kp == 0 || k % CH == 0)) {  // the rows' scales for this chunk
                float sv[16];
                for (int l = 0; l < 16; l++) sv[l] = l < n ? lowp_scale_of(o, i0 + l, k) : 1.0f;
                s = _mm512_loadu_ps(sv);
            }
            __m512 e = _mm512_maskz_loadu_ps(lanes, o->data + (long)k * o->ld + i0);
            __m512 d = k + 1 < K && 2 * kp + 1 < kc ? _mm512_maskz_loadu_ps(lanes, o->data + (long)(k + 1) * o->ld + i0)
                                                    : _mm512_setzero_ps();
            _mm512_mask_storeu_epi32(out + (size_t)kp * stride, lanes,
                                     fmt == LOWP_BF16 ? bf16_pair_words(e, d)
                                                      : pair_words(round_value(fmt, e, s), round_value(fmt, d, s)));
        }
        return;
    }
    // element (i, k) at data[i * ld + k]: 32 values of a row make 16 words; 16 rows are transposed.
    // Each row's values PF_AHEAD on are requested first — past the slice's end, those of the same
    // row of the next group (n rows on, where pack goes next): 12-16 rows read 128 bytes at a time
    // are too many short streams for the hardware's prefetchers, and an operand fresh from memory
    // (an expert's rows, out of cache in a training step) made the pack as slow as the products
    // (652 × 128 × 256 from memory: 155 -> 82 us).
    for (int kk = 0; kk < kc; kk += 32) {
        __m512 v[16];
        int m = kc - kk < 32 ? kc - kk : 32, ahead = kk + PF_AHEAD;
        for (int l = 0; l < n; l++) {
            const float *pf = o->data + (long)(i0 + l + ahead / kc * n) * o->ld + k0 + ahead % kc;
            _mm_prefetch((const char *)pf, _MM_HINT_T0);  // (a hint: never faults past the operand)
            _mm_prefetch((const char *)(pf + 16), _MM_HINT_T0);
        }
        for (int l = 0; l < 16; l++) {
            if (l >= n) {
                v[l] = _mm512_setzero_ps();
                continue;
            }
            const float *src = o->data + (long)(i0 + l) * o->ld + k0 + kk;
            if (fmt == LOWP_BF16) {
                v[l] = _mm512_castsi512_ps(bf16_words(_mm512_maskz_loadu_ps(tail_mask(m), src),
                                                      _mm512_maskz_loadu_ps(tail_mask(m - 16 > 0 ? m - 16 : 0), src + 16)));
                continue;
            }
            __m512 s = _mm512_set1_ps(lowp_scale_of(o, i0 + l, k0 + kk));
            __m512 lo = round_value(fmt, _mm512_maskz_loadu_ps(tail_mask(m), src), s);
            __m512 hi = round_value(fmt, _mm512_maskz_loadu_ps(tail_mask(m - 16 > 0 ? m - 16 : 0), src + 16), s);
            // 32 BF16 in k order = 16 pair words
            __m256i l16 = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(lo), 16));
            __m256i h16 = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(hi), 16));
            v[l] = _mm512_castsi512_ps(_mm512_inserti64x4(_mm512_castsi256_si512(l16), h16, 1));
        }
        transpose16(v);  // v[p]: pair kk/2 + p of the 16 rows
        int pairs = (m + 1) / 2;
        for (int p = 0; p < pairs; p++)
            _mm512_mask_storeu_epi32(out + (size_t)(kk / 2 + p) * stride, lanes, _mm512_castps_si512(v[p]));
    }
}

// Packs rows [i0, i0 + len) (len <= 256) of a transposed operand into tiles of W rows (W = MR or
// NR): tile t at out + t * W * kp_alloc (kp_alloc >= kp_n: the AMX kernel pads K), word (kp, i)
// at kp * W + i within it — or kp * (its width) for a narrower last tile when narrow_last (A's
// tiles; B's panels keep NR). The same words as
// pack_group, but walking the source a row pair at a time across all of [i0, i0 + len): each pair
// is two sequential reads, where a group at a time would read 64 bytes from each of kc rows.
AVX512BF16_INLINE void pack_trans_span(const int fmt, uint32_t *out, int W, int narrow_last, const LowpOperand *o, int i0,
                                   int len, int k0, int kc, int K, int kp_alloc) {
    const int kp_n = (kc + 1) / 2, seg = W < 16 ? W : 16, last = (len - 1) / W;
    float sv[256];
    for (int kp = 0; kp < kp_n; kp++) {
        int k = k0 + 2 * kp;
        if (fmt != LOWP_BF16 && (kp == 0 || k % CH == 0))  // the rows' scales for this chunk
            for (int i = 0; i < len; i++) sv[i] = lowp_scale_of(o, i0 + i, k);
        const float *re = o->data + (long)k * o->ld + i0;
        const float *ro = k + 1 < K && 2 * kp + 1 < kc ? re + o->ld : NULL;
        if (kp + PF_PAIRS < kp_n)
            for (int s = 0; s < len; s += 16) {
                _mm_prefetch((const char *)(re + (long)2 * PF_PAIRS * o->ld + s), _MM_HINT_T0);
                _mm_prefetch((const char *)(re + (long)(2 * PF_PAIRS + 1) * o->ld + s), _MM_HINT_T0);
            }
        for (int s = 0; s < len; s += seg) {
            int n = len - s < seg ? len - s : seg, t = s / W;
            int stride = narrow_last && t == last ? len - t * W : W;
            __mmask16 m = tail_mask(n);
            __m512 sc = fmt != LOWP_BF16 ? _mm512_maskz_loadu_ps(m, sv + s) : _mm512_set1_ps(1.0f);
            __m512 e = _mm512_maskz_loadu_ps(m, re + s);
            __m512 d = ro ? _mm512_maskz_loadu_ps(m, ro + s) : _mm512_setzero_ps();
            _mm512_mask_storeu_epi32(out + (size_t)t * W * kp_alloc + (size_t)kp * stride + s % W, m,
                                     fmt == LOWP_BF16 ? bf16_pair_words(e, d)
                                                      : pair_words(round_value(fmt, e, sc), round_value(fmt, d, sc)));
        }
    }
}

// Rows [i0, i0 + len) of an operand into tiles of W rows, as pack_trans_span lays them out. A
// transposed operand goes in spans of 256 rows, whole tiles when len > 256 (B's panels: W = 32).
AVX512BF16 static void pack(uint32_t *out, int W, int narrow_last, const LowpOperand *o, int i0, int len, int k0,
                            int kc, int K, int kp_alloc) {
    if (o->trans) {
        for (int s = 0; s < len; s += 256) {
            int n = len - s < 256 ? len - s : 256;
            uint32_t *dst = out + (size_t)(s / W) * W * kp_alloc;
            switch (o->fmt) {
            case LOWP_BF16: pack_trans_span(LOWP_BF16, dst, W, narrow_last, o, i0 + s, n, k0, kc, K, kp_alloc); break;
            case LOWP_E4M3: pack_trans_span(LOWP_E4M3, dst, W, narrow_last, o, i0 + s, n, k0, kc, K, kp_alloc); break;
            default: pack_trans_span(LOWP_E5M2, dst, W, narrow_last, o, i0 + s, n, k0, kc, K, kp_alloc); break;
            }
        }
        return;
    }
    const int seg = W < 16 ? W : 16, last = (len - 1) / W;
    for (int s = 0; s < len; s += seg) {
        int n = len - s < seg ? len - s : seg, t = s / W;
        int stride = narrow_last && t == last ? len - t * W : W;
        uint32_t *dst = out + (size_t)t * W * kp_alloc + s % W;
        switch (o->fmt) {
        case LOWP_BF16: pack_group(LOWP_BF16, dst, stride, o, i0 + s, n, k0, kc, K); break;
        case LOWP_E4M3: pack_group(LOWP_E4M3, dst, stride, o, i0 + s, n, k0, kc, K); break;
        default: pack_group(LOWP_E5M2, dst, stride, o, i0 + s, n, k0, kc, K); break;
        }
    }
}

AVX512BF16 void lowp_pack_panels(uint32_t *out, int W, const LowpOperand *o, int i0, int len, int K, int kp_alloc) {
    const int kp_n = (K + 1) / 2;
    for (int s = 0; s < len; s += 256) {
        int n = len - s < 256 ? len - s : 256;
        uint32_t *dst = out + (size_t)(s / W) * W * kp_alloc;
        if (n % W) memset(dst + (size_t)(n / W) * W * kp_alloc, 0, sizeof(uint32_t) * W * kp_alloc);  // ragged panel
        pack(dst, W, 0, o, i0 + s, n, 0, K, K, kp_alloc);
        for (int t = 0; t * W < n; t++)  // the pairs past K
            memset(dst + (size_t)t * W * kp_alloc + (size_t)kp_n * W, 0, sizeof(uint32_t) * W * (kp_alloc - kp_n));
    }
}

// C tile (MR_ × 32, columns masked by m0 / m1) from kp_n pair words. FP8 (sa set): the slice's
// chunks one after the other, each sum multiplied by sa[chunk][i] · sb[chunk][j] and added to C;
// BF16: one sum, added to C (or stored, !add).
AVX512BF16_INLINE void micro_tile(const int MR_, int kp_n, const uint32_t *ap, const uint32_t *bp, float *c, int ldc,
                                  __mmask16 m0, __mmask16 m1, int add, const float *sa, const float *sb, int sa_ld) {
    const int chunk_pairs = sa ? CH / 2 : kp_n;
    // C's lines are requested before the sums: an output fresh from memory (a gradient added to,
    // a result stored) then arrives while the dot products run instead of stalling the stores
    // (652 × 256 × 128 added into an output from memory: 114 -> 80 us)
#pragma GCC unroll 12
    for (int i = 0; i < MR_; i++) {
        _mm_prefetch((const char *)(c + (size_t)i * ldc), _MM_HINT_T0);
        _mm_prefetch((const char *)(c + (size_t)i * ldc + 16), _MM_HINT_T0);
    }
    for (int kp0 = 0, ch = 0; kp0 < kp_n; kp0 += chunk_pairs, ch++) {
        int kp1 = kp0 + chunk_pairs < kp_n ? kp0 + chunk_pairs : kp_n;
        __m512 acc[MR][2];
#pragma GCC unroll 12
        for (int i = 0; i < MR_; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
        for (int kp = kp0; kp < kp1; kp++) {
            __m512bh b0 = (__m512bh)_mm512_loadu_si512(bp + (size_t)kp * NR);
            __m512bh b1 = (__m512bh)_mm512_loadu_si512(bp + (size_t)kp * NR + 16);
#pragma GCC unroll 12
            for (int i = 0; i < MR_; i++) {
                __m512bh a = (__m512bh)_mm512_set1_epi32((int)ap[(size_t)kp * MR_ + i]);
                acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, b0);
                acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, b1);
            }
        }
        int add_here = add || kp0 > 0;
        __m512 s0 = _mm512_set1_ps(1.0f), s1 = s0;
        if (sa) {
            s0 = _mm512_maskz_loadu_ps(m0, sb + (size_t)ch * NC);
            s1 = _mm512_maskz_loadu_ps(m1, sb + (size_t)ch * NC + 16);
        }
#pragma GCC unroll 12
        for (int i = 0; i < MR_; i++) {
            float *ci = c + (size_t)i * ldc;
            __m512 c0 = add_here ? _mm512_maskz_loadu_ps(m0, ci) : _mm512_setzero_ps();
            __m512 c1 = add_here ? _mm512_maskz_loadu_ps(m1, ci + 16) : _mm512_setzero_ps();
            if (sa) {
                __m512 f = _mm512_set1_ps(sa[(size_t)ch * sa_ld + i]);
                c0 = _mm512_fmadd_ps(acc[i][0], _mm512_mul_ps(f, s0), c0);
                c1 = _mm512_fmadd_ps(acc[i][1], _mm512_mul_ps(f, s1), c1);
            } else {
                c0 = _mm512_add_ps(acc[i][0], c0);
                c1 = _mm512_add_ps(acc[i][1], c1);
            }
            _mm512_mask_storeu_ps(ci, m0, c0);
            _mm512_mask_storeu_ps(ci + 16, m1, c1);
        }
    }
}

AVX512BF16 static void micro(int mr, int kp_n, const uint32_t *ap, const uint32_t *bp, float *c, int ldc, __mmask16 m0,
                             __mmask16 m1, int add, const float *sa, const float *sb, int sa_ld) {
    switch (mr) {
    case 1: micro_tile(1, kp_n, ap, bp, c, ldc, m0, m1, add, sa, sb, sa_ld); break;
    case 2: micro_tile(2, kp_n, ap, bp, c, ldc, m0, m1, add, sa, sb, sa_ld); break;
    case 3: micro_tile(3, kp_n, ap, bp, c, ldc, m0, m1, add, sa, sb, sa_ld); break;
    case 4: micro_tile(4, kp_n, ap, bp, c, ldc, m0, m1, add, sa, sb, sa_ld); break;
    case 5: micro_tile(5, kp_n, ap, bp, c, ldc, m0, m1, add, sa, sb, sa_ld); break;
    case 6: micro_tile(6, kp_n, ap, bp, c, ldc, m0, m1, add, sa, sb, sa_ld); break;
    case 7: micro_tile(7, kp_n, ap, bp, c, ldc, m0, m1, add, sa, sb, sa_ld); break;
    case 8: micro_tile(8, kp_n, ap, bp, c, ldc, m0, m1, add, sa, sb, sa_ld); break;
    case 9: micro_tile(9, kp_n, ap, bp, c, ldc, m0, m1, add, sa, sb, sa_ld); break;
    case 10: micro_tile(10, kp_n, ap, bp, c, ldc, m0, m1, add, sa, sb, sa_ld); break;
    case 11: micro_tile(11, kp_n, ap, bp, c, ldc, m0, m1, add, sa, sb, sa_ld); break;
    default: micro_tile(12, kp_n, ap, bp, c, ldc, m0, m1, add, sa, sb, sa_ld); break;
    }
}

AVX512BF16 int gemm_lowp_avx512bf16(float *C, int ldc, const LowpOperand *A, const LowpOperand *B, int K, int add,
                                    int m_begin, int m_end, int n_begin, int n_end) {
    if (n_end <= n_begin || m_end <= m_begin) return 0;
    const int fp8 = A->fmt != LOWP_BF16;
    // scratch: B slice (NC × KC/2 words), A block (MC × KC/2 words), FP8 scales of both per chunk
    size_t words_b = (size_t)NC * KC / 2, words_a = (size_t)MC * KC / 2;
    float *scratch = kernels_scratch(words_b + words_a + (size_t)KCH * (NC + MC));
    if (!scratch) return -1;
    uint32_t *bp = (uint32_t *)scratch, *ap = bp + words_b;
    float *sb = (float *)(ap + words_a), *sa = sb + (size_t)KCH * NC;
    if (K == 0 && !add)
        for (int i = m_begin; i < m_end; i++) memset(C + (size_t)i * ldc + n_begin, 0, sizeof(float) * (n_end - n_begin));
    for (int nb = n_begin; nb < n_end; nb += NC) {
        int nc = n_end - nb < NC ? n_end - nb : NC;
        for (int k0 = 0; k0 < K; k0 += KC) {
            int kc = K - k0 < KC ? K - k0 : KC, kp_n = (kc + 1) / 2;
            // B: panels of 32 columns, each kp_n × 32 words; FP8 scales per (chunk, column)
            pack(bp, NR, 0, B, nb, nc, k0, kc, K, kp_n);
            if (fp8)
                for (int ch = 0; ch * CH < kc; ch++)
                    for (int j = 0; j < nc; j++) sb[(size_t)ch * NC + j] = lowp_scale_of(B, nb + j, k0 + ch * CH);
            for (int m0 = m_begin; m0 < m_end; m0 += MC) {
                int mc = m_end - m0 < MC ? m_end - m0 : MC;
                pack(ap, MR, 1, A, m0, mc, k0, kc, K, kp_n);  // tiles of MR rows, the last one mr wide
                if (fp8)
                    for (int ch = 0; ch * CH < kc; ch++)
                        for (int i = 0; i < mc; i++) sa[(size_t)ch * MC + i] = lowp_scale_of(A, m0 + i, k0 + ch * CH);
                for (int t = 0; t * MR < mc; t++) {
                    int mr = mc - t * MR < MR ? mc - t * MR : MR;
                    for (int p = 0; p * NR < nc; p++) {
                        int n = nc - p * NR;
                        micro(mr, kp_n, ap + (size_t)t * MR * kp_n, bp + (size_t)p * NR * kp_n,
                              C + (size_t)(m0 + t * MR) * ldc + nb + p * NR, ldc, tail_mask(n),
                              tail_mask(n > 16 ? n - 16 : 0), add || k0 > 0, fp8 ? sa + t * MR : NULL,
                              fp8 ? sb + p * NR : NULL, MC);
                    }
                }
            }
        }
    }
    return 0;
}

// Rows [r0, r0 + len) (len <= NC) × columns [k0, k0 + kc) of a stored weight matrix as B's
// panels (pack's layout with W = NR), each value as weight_words32 gives it; 16 rows at a time,
// 32 columns of each, transposed. A group's rows are 16 streams of a few lines each (a row's
// slice), too short for the hardware's prefetchers to learn, so the next group's lines are
// requested while this one is transposed.
AVX512BF16 static void pack_weights(uint32_t *out, const MatView *w, int r0, int len, int k0, int kc, int kp_alloc) {
    __m512i tab[4];
    weight_words_tables(w, tab);
    const size_t esz = dtype_size(w->dtype), row_bytes = (size_t)w->cols * esz;
    for (int s = 0; s < len; s += 16) {
        int n = len - s < 16 ? len - s : 16, ahead = len - s - 16 < 16 ? len - s - 16 : 16;
        uint32_t *dst = out + (size_t)(s / NR) * NR * kp_alloc + s % NR;
        const __mmask16 lanes = tail_mask(n);
        const char *next = (const char *)w->data + (size_t)(r0 + s + 16) * row_bytes + (size_t)k0 * esz;
        for (int kk = 0; kk < kc; kk += 32) {
            int m = kc - kk < 32 ? kc - kk : 32;
            for (int l = 0; l < ahead; l++)
                for (size_t b = 0; b < 32 * esz; b += 64) _mm_prefetch(next + l * row_bytes + kk * esz + b, _MM_HINT_T0);
            __mmask32 mk = m >= 32 ? ~0u : (1u << m) - 1;
            __m512 v[16];
            for (int l = 0; l < 16; l++)
                v[l] = l < n ? _mm512_castsi512_ps(weight_words32(w, (size_t)(r0 + s + l) * w->cols + k0 + kk, mk, tab))
                             : _mm512_setzero_ps();
            transpose16(v);  // v[p]: pair kk/2 + p of the 16 rows
            for (int p = 0; p < (m + 1) / 2; p++)
                _mm512_mask_storeu_epi32(dst + (size_t)(kk / 2 + p) * NR, lanes, _mm512_castps_si512(v[p]));
        }
    }
}

// first[i]: the row of a stack of weight matrices (ws[0]'s rows, then ws[1]'s, ...) member i starts
// at, first[n_ws] all of them; -1 unless the members are alike (the same columns, FP8 or not) and
// every one but the last is a whole number of panels.
static int stack_rows(const MatView *const *ws, int n_ws, int first[8]) {
    if (n_ws < 1 || n_ws > 7) return -1;
    const int fp8 = ws[0]->dtype == DT_F8_E4M3;
    first[0] = 0;
    for (int i = 0; i < n_ws; i++) {
        if (ws[i]->cols != ws[0]->cols || (ws[i]->dtype == DT_F8_E4M3) != fp8 || (i + 1 < n_ws && ws[i]->rows % NR))
            return -1;
        first[i + 1] = first[i] + ws[i]->rows;
    }
    return 0;
}

// Rows [r0, r1) of a stack of weight matrices with the same columns (ws[0]'s rows, then ws[1]'s,
// ...; every one but the last a whole number of panels, r0 on a panel when there are several)
// against the same activations, each member's outputs into its own out[i] (row stride ldo[i]):
// the activations packed once for all of them.
AVX512BF16 static int lowp_nt_stack(float *const *out, const int *ldo, const MatView *const *ws, int n_ws,
                                    const float *x, int ldx, int N, int r0, int r1) {
    if (N <= 0 || r1 <= r0) return 0;
    const int K = ws[0]->cols, fp8 = ws[0]->dtype == DT_F8_E4M3;
    int first[8];
    if (stack_rows(ws, n_ws, first) || (n_ws > 1 && r0 % NR)) return -1;
    for (int i = 0; i < n_ws; i++)
        if (fp8 && (ws[i]->block != 128 || !ws[i]->scale_inv)) return -1;  // (the release's FP8 blocks)
    if (K <= 0) {
        for (int i = 0; i < n_ws; i++) {
            int a = r0 > first[i] ? r0 : first[i], b = r1 < first[i + 1] ? r1 : first[i + 1];
            for (int n = 0; n < N && a < b; n++) memset(out[i] + (size_t)n * ldo[i] + a - first[i], 0, sizeof(float) * (b - a));
        }
        return 0;
    }
    // scratch as gemm_lowp_avx512bf16's: the weights' slice, an activation block, FP8 scales
    size_t words_b = (size_t)NC * KC / 2, words_a = (size_t)MC * KC / 2;
    float *scratch = kernels_scratch(words_b + words_a + (size_t)KCH * (NC + MC));
    if (!scratch) return -1;
    uint32_t *bp = (uint32_t *)scratch, *ap = bp + words_b;
    float *sb = (float *)(ap + words_a), *sa = sb + (size_t)KCH * NC;
    for (int i = 0; i < KCH * MC; i++) sa[i] = 1.0f;  // the activations carry no scale
    const LowpOperand xo = {.data = x, .ld = ldx, .fmt = LOWP_BF16};
    for (int nb = r0; nb < r1; nb += NC) {
        int nc = r1 - nb < NC ? r1 - nb : NC;
        for (int k0 = 0; k0 < K; k0 += KC) {
            int kc = K - k0 < KC ? K - k0 : KC, kp_n = (kc + 1) / 2;
            for (int i = 0; i < n_ws; i++) {  // each member's rows in the slice, whole panels apart
                int a = nb > first[i] ? nb : first[i], b = nb + nc < first[i + 1] ? nb + nc : first[i + 1];
                if (a >= b) continue;
                const MatView *w = ws[i];
                pack_weights(bp + (size_t)(a - nb) * kp_n, w, a - first[i], b - a, k0, kc, kp_n);
                if (fp8)
                    for (int ch = 0; ch * CH < kc; ch++)
                        for (int j = a; j < b; j++)
                            sb[(size_t)ch * NC + j - nb] =
                                w->scale_inv[(size_t)((w->row0 + j - first[i]) / 128) * w->scale_cols + (k0 + ch * CH) / CH];
            }
            for (int m0 = 0; m0 < N; m0 += MC) {
                int mc = N - m0 < MC ? N - m0 : MC;
                pack(ap, MR, 1, &xo, m0, mc, k0, kc, K, kp_n);
                for (int t = 0; t * MR < mc; t++) {
                    int mr = mc - t * MR < MR ? mc - t * MR : MR;
                    for (int p = 0, i = 0; p * NR < nc; p++) {
                        int n = nc - p * NR, j0 = nb + p * NR;
                        while (j0 >= first[i + 1]) i++;
                        if (n > first[i + 1] - j0) n = first[i + 1] - j0;  // (the last member's edge)
                        micro(mr, kp_n, ap + (size_t)t * MR * kp_n, bp + (size_t)p * NR * kp_n,
                              out[i] + (size_t)(m0 + t * MR) * ldo[i] + (j0 - first[i]), ldo[i], tail_mask(n),
                              tail_mask(n > 16 ? n - 16 : 0), k0 > 0, fp8 ? sa : NULL, fp8 ? sb + p * NR : NULL, MC);
                    }
                }
            }
        }
    }
    return 0;
}

AVX512BF16 int matmul_nt_lowp_avx512(float *out, int ldo, const float *x, int ldx, const MatView *w, int N, int r0,
                                     int r1) {
    return lowp_nt_stack(&out, &ldo, &w, 1, x, ldx, N, r0, r1);
}

AVX512BF16 int matmul_nt2_lowp_avx512(float *out_a, int ldo_a, float *out_b, int ldo_b, const float *x, int ldx,
                                      const MatView *wa, const MatView *wb, int N) {
    float *const out[2] = {out_a, out_b};
    const int ldo[2] = {ldo_a, ldo_b};
    const MatView *const ws[2] = {wa, wb};
    return lowp_nt_stack(out, ldo, ws, 2, x, ldx, N, 0, wa->rows + wb->rows);
}

// ---- Weight panels (matmul.h): the blocked BF16-compute product on weights packed at load ----
// The same order of sums as matmul_nt_lowp_avx512 (the panels hold the values pack_weights would
// pack; micro_tile sums them), so a product on panels is that kernel's bits — for every N. Up to
// SKINNY_MAX_N activation rows the panels go straight into registers (FP8 codes widened there,
// not into scratch), several at once for the fewest rows, whose own tile would have too few sums
// in flight to hide the instruction's latency; each output is still one chain per 256 columns
// (FP8: per 128-column chunk, scaled into the total) as micro_tile sums it.

enum {
    SKINNY_MAX_N = 12,
    SKINNY_AHEAD = 1536,  // bytes of a panel prefetched ahead (one thread, N = 1..4: 1,024-1,536 best)
};

static size_t panel_pairs(const MatView *w) { return ((size_t)w->cols + 1) / 2; }

size_t weight_panel_bytes(const MatView *w) { return panel_pairs(w) * (w->dtype == DT_F8_E4M3 ? 64 : 128); }

size_t weight_panels_bytes(const MatView *w) {
    if (!kernels_cpu_avx512bf16_vbmi() || w->rows <= 0 || w->cols <= 0 || w->row0 % NR) return 0;
    if (w->dtype == DT_F8_E4M3 ? w->block != 128 || !w->scale_inv
                               : w->dtype != DT_BF16 && w->dtype != DT_F32 && w->dtype != DT_F16)
        return 0;
    return (size_t)((w->rows + NR - 1) / NR) * weight_panel_bytes(w);
}

// Panel p of FP8 w: per pair kp, 64 codes placed so that fp8_widen64 unpacks rows 0-15 of the
// panel into its first word vector and rows 16-31 into its second, each row's two columns a word:
// row j's word (columns 2 kp and 2 kp + 1, zero past the matrix) is word
// 8 (j % 16 / 4) + 4 (j / 16) + j % 4 of the pair's 32. A whole panel's pairs go 32 at a time
// through registers (fp8_panel_32pairs); the rest — a last panel's fewer rows, the pairs after the
// last 32, an odd last column — a row at a time, two codes per load and store. (Byte by byte, each
// byte's place computed, packing ran 0.7 GB/s a thread; a row at a time 2.4-4.2; through the
// registers 9.4-11.2, 2 threads 17-25, 4096 × 4096 with the pages already touched — the same bytes
// for 13 shapes, ragged ones included. `generate` of one token, load included, the builds taking
// turns five times: v3-wide FP8 0.18-0.20 -> 0.14-0.15 s, v3-deep 0.14-0.15 -> 0.13-0.14.)
//
// fp8_panel_32pairs: row j's 32 words (64 codes) loaded into vector 8 (j % 16 / 4) + 4 (j / 16) +
// j % 4, the 32 × 32 words transposed (five rounds of two-source word permutes, each swapping the
// off-diagonal blocks of half the size), vector m then being pair m's 64 bytes.
AVX512BF16_VBMI_INLINE void fp8_panel_32pairs(uint8_t *dst, const uint8_t *src, size_t cols, const __m512i idx[5][2]) {
    __m512i v[32];
#pragma GCC unroll 32
    for (int j = 0; j < NR; j++) v[8 * (j % 16 / 4) + 4 * (j / 16) + j % 4] = _mm512_loadu_si512(src + (size_t)j * cols);
#pragma GCC unroll 5
    for (int b = 0; b < 5; b++) {
        const int B = 1 << b;
#pragma GCC unroll 32
        for (int i = 0; i < NR; i++) {
            if (i & B) continue;
            __m512i lo = _mm512_permutex2var_epi16(v[i], idx[b][0], v[i + B]);
            v[i + B] = _mm512_permutex2var_epi16(v[i], idx[b][1], v[i + B]);
            v[i] = lo;
        }
    }
#pragma GCC unroll 32
    for (int m = 0; m < NR; m++) _mm512_storeu_si512(dst + (size_t)m * 64, v[m]);
}

// fp8_panel_32pairs' permutes: in round b, word c of the lower vector of a pair (i, i + 2^b) takes
// the lower's word c, or the upper's word c - 2^b where c has bit b; of the upper, the lower's
// word c + 2^b, or its own.
AVX512BF16_VBMI_INLINE void fp8_panel_rounds(__m512i idx[5][2]) {
    for (int b = 0; b < 5; b++) {
        uint16_t lo[32], hi[32];
        for (int c = 0; c < 32; c++) {
            const int B = 1 << b;
            lo[c] = (uint16_t)(c & B ? 32 + c - B : c);
            hi[c] = (uint16_t)(c & B ? 32 + c : c + B);
        }
        idx[b][0] = _mm512_loadu_si512(lo), idx[b][1] = _mm512_loadu_si512(hi);
    }
}

// idx: fp8_panel_rounds'.
AVX512BF16_VBMI static void fp8_panel(uint8_t *dst, const MatView *w, int p, size_t kp_all, const __m512i idx[5][2]) {
    const size_t cols = (size_t)w->cols, pairs = cols / 2;  // (whole pairs; an odd last column after them)
    size_t kp0 = 0;
    if (NR * p + NR <= w->rows) {
        const uint8_t *s = (const uint8_t *)w->data + (size_t)NR * p * cols;
        for (; kp0 + 32 <= pairs; kp0 += 32) fp8_panel_32pairs(dst + kp0 * 64, s + 2 * kp0, cols, idx);
    }
    for (int j = 0; j < NR; j++) {
        const int r = NR * p + j;
        uint8_t *d = dst + 2 * (8 * (j % 16 / 4) + 4 * (j / 16) + j % 4);
        if (r >= w->rows) {
            for (size_t kp = 0; kp < kp_all; kp++) memset(d + kp * 64, 0, 2);
            continue;
        }
        const uint8_t *s = (const uint8_t *)w->data + (size_t)r * cols;
        for (size_t kp = kp0; kp < pairs; kp++) memcpy(d + kp * 64, s + 2 * kp, 2);
        if (pairs < kp_all) d[pairs * 64] = s[2 * pairs], d[pairs * 64 + 1] = 0;
    }
}

AVX512BF16_VBMI static void panels_pack(void *dst, const MatView *w) {
    const int np = (w->rows + NR - 1) / NR;
    const size_t kp_all = panel_pairs(w), pb = weight_panel_bytes(w);
    const int nt = omp_in_parallel() ? 1 : omp_get_max_threads();
    __m512i idx[5][2];
    if (w->dtype == DT_F8_E4M3) fp8_panel_rounds(idx);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int p = 0; p < np; p++) {
        char *d = (char *)dst + (size_t)p * pb;
        int len = w->rows - NR * p < NR ? w->rows - NR * p : NR;
        if (w->dtype == DT_F8_E4M3) {
            fp8_panel((uint8_t *)d, w, p, kp_all, (const __m512i(*)[2])idx);
        } else {
            if (len < NR) memset(d, 0, pb);
            pack_weights((uint32_t *)d, w, NR * p, len, 0, w->cols, (int)kp_all);
        }
    }
}

int weight_panels_pack(void *dst, const MatView *w) {
    if (!weight_panels_bytes(w)) return -1;
    panels_pack(dst, w);
    return 0;
}

// One panel of a product: its weights (at pair 0), the outputs of its lane 0 (activation row n's
// at out + n · ldo), the lanes stored, FP8: its block row's scales (one per 128-column chunk).
typedef struct Panel {
    const void *w;
    float *out;
    int ldo;
    __mmask16 m0, m1;
    const float *scales;
} Panel;

// Stacked panel p (rows [32p, 32p + 32) of the stack of ws, first[i] the row member i starts at)
// limited to rows [r0, r1).
static Panel panel_at(float *const *out, const int *ldo, const MatView *const *ws, const int *first, int p, int r0,
                      int r1) {
    int i = 0;
    while (NR * p >= first[i + 1]) i++;
    const MatView *w = ws[i];
    int q = p - first[i] / NR, lo = r0 - NR * p, hi = (r1 < first[i + 1] ? r1 : first[i + 1]) - NR * p;
    lo = lo > 0 ? lo : 0, hi = hi < NR ? hi : NR;
    uint32_t lanes = (hi >= 32 ? ~0u : (1u << hi) - 1) & ~((1u << lo) - 1);
    return (Panel){.w = (const char *)w->panels + (size_t)q * weight_panel_bytes(w),
                   .out = out[i] + (size_t)NR * q,
                   .ldo = ldo[i],
                   .m0 = (__mmask16)lanes,
                   .m1 = (__mmask16)(lanes >> 16),
                   .scales = w->dtype == DT_F8_E4M3 ? w->scale_inv + (size_t)((w->row0 + NR * q) / 128) * w->scale_cols
                                                    : NULL};
}

// N_ activation rows (row n's words at ap + n · kp_all) against P_ panels at once, all of K.
AVX512BF16_VBMI_INLINE void skinny(const int N_, const int P_, const int fp8, const Panel *pn, const uint32_t *ap,
                                   int kp_all, const __m512i tab[4], const Panel *next) {
    const int chain = fp8 ? CH / 2 : KC / 2;  // pairs summed from zero: micro_tile's chunk / slice
    const size_t step_bytes = fp8 ? 64 : 128, panel_bytes = (size_t)kp_all * step_bytes;  // (a pair's, a panel's)
    __m512 tot[SKINNY_MAX_N][4][2];  // (only [N_][P_] used: at most 24 sums, N_ · P_ <= 12)
#pragma GCC unroll 12
    for (int n = 0; n < N_; n++)
#pragma GCC unroll 4
        for (int q = 0; q < P_; q++) tot[n][q][0] = tot[n][q][1] = _mm512_setzero_ps();
    for (int k0 = 0, ch = 0; k0 < kp_all; k0 += chain, ch++) {
        int k1 = k0 + chain < kp_all ? k0 + chain : kp_all;
        __m512 acc[SKINNY_MAX_N][4][2];
#pragma GCC unroll 12
        for (int n = 0; n < N_; n++)
#pragma GCC unroll 4
            for (int q = 0; q < P_; q++) acc[n][q][0] = acc[n][q][1] = _mm512_setzero_ps();
        for (int kp = k0; kp < k1; kp++) {
            __m512bh b[4][2];
#pragma GCC unroll 4
            for (int q = 0; q < P_; q++) {
                // the stream SKINNY_AHEAD bytes on: in this panel, else in the next group's
                const size_t ahead = (size_t)kp * step_bytes + SKINNY_AHEAD;
                const char *at = ahead < panel_bytes ? (const char *)pn[q].w + ahead
                                 : next ? (const char *)next[q].w + (ahead - panel_bytes) : NULL;
                if (at) {
                    _mm_prefetch(at, _MM_HINT_T0);
                    if (!fp8) _mm_prefetch(at + 64, _MM_HINT_T0);
                }
                if (fp8) {
                    const uint8_t *c = (const uint8_t *)pn[q].w + (size_t)kp * 64;
                    __m512i lo, hi;
                    fp8_widen64(_mm512_loadu_si512(c), tab, &lo, &hi);
                    b[q][0] = (__m512bh)lo, b[q][1] = (__m512bh)hi;
                } else {
                    const uint32_t *c = (const uint32_t *)pn[q].w + (size_t)kp * NR;
                    b[q][0] = (__m512bh)_mm512_loadu_si512(c);
                    b[q][1] = (__m512bh)_mm512_loadu_si512(c + 16);
                }
            }
#pragma GCC unroll 12
            for (int n = 0; n < N_; n++) {
                __m512bh a = (__m512bh)_mm512_set1_epi32((int)ap[(size_t)n * kp_all + kp]);
#pragma GCC unroll 4
                for (int q = 0; q < P_; q++) {
                    acc[n][q][0] = _mm512_dpbf16_ps(acc[n][q][0], a, b[q][0]);
                    acc[n][q][1] = _mm512_dpbf16_ps(acc[n][q][1], a, b[q][1]);
                }
            }
        }
#pragma GCC unroll 4
        for (int q = 0; q < P_; q++) {
            __m512 sc = fp8 ? _mm512_set1_ps(pn[q].scales[ch]) : _mm512_setzero_ps();
#pragma GCC unroll 12
            for (int n = 0; n < N_; n++)
#pragma GCC unroll 2
                for (int v = 0; v < 2; v++)
                    tot[n][q][v] = fp8 ? _mm512_fmadd_ps(acc[n][q][v], sc, tot[n][q][v]) : _mm512_add_ps(acc[n][q][v], tot[n][q][v]);
        }
    }
#pragma GCC unroll 4
    for (int q = 0; q < P_; q++)
#pragma GCC unroll 12
        for (int n = 0; n < N_; n++) {
            float *o = pn[q].out + (size_t)n * pn[q].ldo;
            _mm512_mask_storeu_ps(o, pn[q].m0, tot[n][q][0]);
            _mm512_mask_storeu_ps(o + 16, pn[q].m1, tot[n][q][1]);
        }
}

// Panels at once for N activation rows: as many as keep the sums in registers. (From 7 rows one
// panel at a time: micro_tile's shape, but FP8 codes widened in registers rather than into
// scratch — FP8 products at N = 8, 256 x 512 from memory, 2 threads (bench_kernels): 179 -> 335
// GFLOP/s; BF16 213 -> 236.)
static int skinny_panels(int N) { return N <= 3 ? 4 : N == 4 ? 3 : N <= 6 ? 2 : 1; }

AVX512BF16_VBMI static void skinny_run(int N, int P, int fp8, const Panel *pn, const uint32_t *ap, int kp_all,
                                       const __m512i tab[4], const Panel *next) {
#define SKINNY_CASE(N_, P_)                                                                     \
    if (N == N_ && P == P_) {                                                                   \
        if (fp8) skinny(N_, P_, 1, pn, ap, kp_all, tab, next);                                  \
        else skinny(N_, P_, 0, pn, ap, kp_all, tab, next);                                      \
        return;                                                                                 \
    }
    SKINNY_CASE(1, 4) SKINNY_CASE(2, 4) SKINNY_CASE(3, 4) SKINNY_CASE(4, 3) SKINNY_CASE(5, 2) SKINNY_CASE(6, 2)
    SKINNY_CASE(1, 3) SKINNY_CASE(2, 3) SKINNY_CASE(3, 3) SKINNY_CASE(1, 2) SKINNY_CASE(2, 2) SKINNY_CASE(3, 2)
    SKINNY_CASE(4, 2) SKINNY_CASE(1, 1) SKINNY_CASE(2, 1) SKINNY_CASE(3, 1) SKINNY_CASE(4, 1) SKINNY_CASE(5, 1) SKINNY_CASE(6, 1)
    SKINNY_CASE(7, 1) SKINNY_CASE(8, 1) SKINNY_CASE(9, 1) SKINNY_CASE(10, 1) SKINNY_CASE(11, 1) SKINNY_CASE(12, 1)
#undef SKINNY_CASE
    // (a group that no case above takes: its panels one at a time, the same sums)
    for (int q = 0; P > 1 && q < P; q++) skinny_run(N, 1, fp8, pn + q, ap, kp_all, tab, NULL);
}

// Rows [0, N) of x (K columns) as BF16 pair words, row n's kp words at ap + n · kp (zero past K),
// then rows [N, rows) zero.
AVX512BF16_INLINE void pair_rows(uint32_t *ap, int kp, int rows, const float *x, int ldx, int N, int K) {
    for (int n = 0; n < rows; n++) {
        uint32_t *dst = ap + (size_t)n * kp;
        if (n >= N) {
            memset(dst, 0, sizeof(uint32_t) * kp);
            continue;
        }
        const float *xr = x + (size_t)n * ldx;
        int k = 0;
        // whole steps of 32 values unmasked (with masks computed for every step: 0.12 ns a value
        // against 0.10-0.11, 512 rows of 512 from L2, the two builds taking turns)
        for (; k + 32 <= K; k += 32)
            _mm512_storeu_si512(dst + k / 2, bf16_words(_mm512_loadu_ps(xr + k), _mm512_loadu_ps(xr + k + 16)));
        for (; k < 2 * kp; k += 32) {  // the ragged end, then zero words up to kp
            int left = K - k, words = kp - k / 2 < 16 ? kp - k / 2 : 16;
            _mm512_mask_storeu_epi32(dst + k / 2, tail_mask(words),
                                     bf16_words(_mm512_maskz_loadu_ps(tail_mask(left > 0 ? left : 0), xr + k),
                                                _mm512_maskz_loadu_ps(tail_mask(left - 16 > 0 ? left - 16 : 0), xr + k + 16)));
        }
    }
}

AVX512BF16 void amx_pair_rows(uint32_t *ap, const float *x, int ldx, int N, int K, int n0, int n1) {
    const int kpa = ((K + 1) / 2 + 15) / 16 * 16, real = N - n0 < 0 ? 0 : N - n0 < n1 - n0 ? N - n0 : n1 - n0;
    if (n1 > n0) pair_rows(ap + (size_t)n0 * kpa, kpa, n1 - n0, x + (size_t)(real ? n0 : 0) * ldx, ldx, real, K);
}

// The products on panels on the AMX tiles (MatView.panels_tiles): the activations as rows of BF16
// pairs, padded with zeros to whole tile steps (and past 16 rows to whole groups of 16), then the
// panels 16 at a time. fn: panels_nt_amx or its C model.
typedef int (*PanelsTilesFn)(const AmxPanel *pn, int np, const uint32_t *ap, int kpa, int N, int kp_all, int fp8,
                             float *scratch);
AVX512BF16 static int panels_on_tiles(PanelsTilesFn fn, float *const *out, const int *ldo, const MatView *const *ws,
                                      const int *first, const float *x, int ldx, int N, int r0, int r1) {
    const int K = ws[0]->cols, fp8 = ws[0]->dtype == DT_F8_E4M3, kp_all = (K + 1) / 2, kpa = (kp_all + 15) / 16 * 16;
    const int rows = N <= 16 ? N : (N + 15) / 16 * 16;
    float *scratch = kernels_scratch((size_t)rows * kpa + 2 * NR * NR + (size_t)NR * kpa);
    if (!scratch) return -1;
    uint32_t *ap = (uint32_t *)(scratch + 2 * NR * NR + (size_t)NR * kpa);
    pair_rows(ap, kpa, rows, x, ldx, N, K);
    for (int p = r0 / NR, p1 = (r1 - 1) / NR; p <= p1;) {
        AmxPanel pn[16];
        int np = 0;
        for (; np < 16 && p <= p1; np++, p++) {
            Panel q = panel_at(out, ldo, ws, first, p, r0, r1);
            pn[np] = (AmxPanel){q.w, q.out, q.ldo, (uint32_t)q.m0 | (uint32_t)q.m1 << 16, q.scales};
        }
        if (fn(pn, np, ap, kpa, N, kp_all, fp8, scratch)) return -1;
    }
    return 0;
}

// lowp_nt_stack's product with every member's weights read from its panels.
AVX512BF16_VBMI static int panels_nt_stack(float *const *out, const int *ldo, const MatView *const *ws, int n_ws,
                                           const float *x, int ldx, int N, int r0, int r1) {
    if (N <= 0 || r1 <= r0) return 0;
    const int K = ws[0]->cols, fp8 = ws[0]->dtype == DT_F8_E4M3;
    int first[8];
    if (stack_rows(ws, n_ws, first) || K <= 0) return -1;  // (panels have columns)
    for (int i = 0; i < n_ws; i++)
        if (!ws[i]->panels) return -1;
    const int p0 = r0 / NR, p1 = (r1 - 1) / NR;
    if (ws[0]->panels_tiles && kernels_cpu_amx())
        return panels_on_tiles(panels_nt_amx, out, ldo, ws, first, x, ldx, N, r0, r1);
    if (N <= PIECES_MAX_N) {  // the members' rows of [r0, r1) as a list of pieces: their group loop
        NtPiece pc[7];
        for (int m = 0; m < n_ws; m++) {
            int lo = r0 - first[m], hi = r1 - first[m];
            pc[m] = (NtPiece){.w = ws[m], .r0 = lo > 0 ? lo : 0, .r1 = hi < ws[m]->rows ? hi : ws[m]->rows, .x = x,
                              .ldx = ldx, .N = N, .out = out[m], .ldo = ldo[m]};
            if (pc[m].r1 < pc[m].r0) pc[m].r1 = pc[m].r0;
        }
        return matmul_nt_pieces_panels(pc, n_ws);
    }
    __m512i tab[4];
    if (fp8) fp8_widen_tables(tab);
    const LowpOperand xo = {.data = x, .ld = ldx, .fmt = LOWP_BF16};
    // Blocks of activation rows packed whole (every slice of K; up to MC rows, at most ~512 KiB), then
    // each panel read from its first pair to its last — one stream from memory per panel (slice
    // after slice of all the panels instead: 16 KiB pieces 32 KiB apart at K = 512, a third slower).
    const int slices = (K + KC - 1) / KC;
    int mb = (int)((128 << 10) / ((size_t)slices * KC / 2)) / MR * MR;
    mb = mb < MR ? MR : mb > MC ? MC : mb;
    // scratch: the activation block (mb rows × every slice), one FP8 panel's slice widened (NR × KC/2),
    // the activations' unit scales and the panel's scales per chunk (micro_tile's operands)
    size_t words_a = (size_t)mb * slices * KC / 2, words_b = (size_t)NR * KC / 2;
    float *scratch = kernels_scratch(words_a + words_b + (size_t)KCH * (MC + NC));
    if (!scratch) return -1;
    uint32_t *ap = (uint32_t *)scratch, *bw = ap + words_a;
    float *sa = (float *)(bw + words_b), *sb = sa + (size_t)KCH * MC;
    for (int i = 0; i < KCH * MC; i++) sa[i] = 1.0f;
    for (int m0 = 0; m0 < N; m0 += mb) {
        int mc = N - m0 < mb ? N - m0 : mb;
        for (int k0 = 0; k0 < K; k0 += KC) {
            int kc = K - k0 < KC ? K - k0 : KC;
            pack(ap + (size_t)(k0 / KC) * mb * KC / 2, MR, 1, &xo, m0, mc, k0, kc, K, (kc + 1) / 2);
        }
        for (int p = p0; p <= p1; p++) {
            Panel pn = panel_at(out, ldo, ws, first, p, r0, r1);
            for (int k0 = 0; k0 < K; k0 += KC) {
                int kc = K - k0 < KC ? K - k0 : KC, kp_n = (kc + 1) / 2;
                const uint32_t *bp = (const uint32_t *)pn.w + (size_t)(k0 / 2) * NR, *as = ap + (size_t)(k0 / KC) * mb * KC / 2;
                if (fp8) {
                    const uint8_t *c = (const uint8_t *)pn.w + (size_t)(k0 / 2) * 64;
                    for (int kp = 0; kp < kp_n; kp++) {
                        __m512i lo, hi;
                        fp8_widen64(_mm512_loadu_si512(c + (size_t)kp * 64), tab, &lo, &hi);
                        _mm512_storeu_si512(bw + (size_t)kp * NR, lo);
                        _mm512_storeu_si512(bw + (size_t)kp * NR + 16, hi);
                    }
                    for (int ch = 0; ch * CH < kc; ch++)
                        for (int j = 0; j < NR; j++) sb[(size_t)ch * NC + j] = pn.scales[(k0 + ch * CH) / CH];
                    bp = bw;
                }
                for (int t = 0; t * MR < mc; t++) {
                    int mr = mc - t * MR < MR ? mc - t * MR : MR;
                    micro(mr, kp_n, as + (size_t)t * MR * kp_n, bp, pn.out + (size_t)(m0 + t * MR) * pn.ldo, pn.ldo,
                          pn.m0, pn.m1, k0 > 0, fp8 ? sa : NULL, fp8 ? sb : NULL, MC);
                }
            }
        }
    }
    return 0;
}

// A piece's rows in the first of its groups of rows (all of them up to SKINNY_MAX_N, else half).
static int split_rows(int N) { return N <= SKINNY_MAX_N ? N : (N + 1) / 2; }

// Panels at once for a piece of N rows (one for two groups of rows).
static int piece_group(int N) { return N <= SKINNY_MAX_N ? skinny_panels(N) : 1; }

// A piece's panels (none for a piece without rows).
static int piece_panel_count(const NtPiece *pc) {
    return pc->r1 > pc->r0 && pc->N > 0 ? (pc->r1 - 1) / NR - pc->r0 / NR + 1 : 0;
}

// Do two pieces multiply the same activation rows (so their panels can go in one group)?
static int same_rows(const NtPiece *a, const NtPiece *b) {
    return a->x == b->x && a->ldx == b->ldx && a->N == b->N && a->w->cols == b->w->cols;
}

// The pieces [i0, end) after i0 that multiply its rows: a run whose panels are grouped together.
static int run_end(const NtPiece *pc, int n, int i0) {
    int i = i0 + 1;
    while (i < n && same_rows(&pc[i], &pc[i0])) i++;
    return i;
}

// The panels of the run of pieces [i0, i1).
static int run_panel_count(const NtPiece *pc, int i0, int i1) {
    int count = 0;
    for (int i = i0; i < i1; i++) count += piece_panel_count(&pc[i]);
    return count;
}

// Group g of the run of pieces from i0 with `count` panels (pn[0 .. returned count)), as
// matmul_nt_panels would take each panel (its view's panels_at on a stack of one), the lanes past
// a piece's rows unstored.
//
// The groups of a run of pieces' panels (taken in order, piece after piece). With P at once, the
// panels split into P lanes of consecutive ones (the first count % P lanes one longer), and group
// g takes panel g of every lane that has one. So each of a group's streams goes on in the next
// group at the next panel — a piece's panels lie one after another, one stretch of memory — where
// groups of P consecutive panels ended all P streams every group and began P new ones: the memory
// system's prefetchers start each stream afresh, and a short one (an FP8 panel of K = 512 is 16
// KiB) never gets up to speed (2 threads from memory, FP8 panels of K = 512 read at ~53 GB/s, of
// K = 1,024 at ~60, as BF16's of 512 — its panels twice the bytes). The same panels with the same
// outputs: the same bits. (Taking turns with the old groups: FP8 K = 512 from memory, 2 threads,
// 448 rows +23%, 2,048 rows 58.7 -> 72.4 GB/s; BF16 +7-16%; decode at 512-640 positions, v3-deep
// and v3-108m, FP8 and BF16, +11-13%, 13-15 of 16 rounds. Pieces with different activations in
// one run — every expert's down projection, each panel with its own — gained 1.1-1.6% in 13 of
// 24 and 13 of 16 rounds: not kept.)
static int run_panels(Panel *pn, const NtPiece *pc, int i0, int count, int g) {
    const int P = piece_group(pc[i0].N), m = count / P, rem = count % P;
    int np = 0;
    for (int q = 0; q < P && (g < m || q < rem); q++) {
        int at = q * m + (q < rem ? q : rem) + g;  // (lane q: m panels, m + 1 for q < rem, from q m + min(q, rem))
        int i = i0;
        while (at >= piece_panel_count(&pc[i])) at -= piece_panel_count(&pc[i]), i++;
        const int first[2] = {0, pc[i].w->rows};
        float *const out[1] = {pc[i].out};
        pn[np++] = panel_at(out, &pc[i].ldo, &pc[i].w, first, pc[i].r0 / NR + at, pc[i].r0, pc[i].r1);
    }
    return np;
}

// The first piece at or after i with rows.
static int next_with_rows(const NtPiece *pc, int n, int i) {
    while (i < n && !piece_panel_count(&pc[i])) i++;
    return i;
}

// The first group of panels of the pieces from i (pn[0 .. returned count)), their first `head`
// bytes requested.
static int first_group(Panel *pn, const NtPiece *pc, int n, int i, size_t head) {
    int np = run_panels(pn, pc, i, run_panel_count(pc, i, run_end(pc, n, i)), 0);
    if (head > weight_panel_bytes(pc[i].w)) head = weight_panel_bytes(pc[i].w);  // (a run's panels: one size)
    for (int q = 0; q < np; q++)
        for (size_t b = 0; b < head; b += 64) _mm_prefetch((const char *)pn[q].w + b, _MM_HINT_T0);
    return np;
}

void matmul_nt_pieces_panels_ahead(const NtPiece *pc, int n) {
    int i = next_with_rows(pc, n, 0);
    if (i < n) {
        Panel pn[4];
        first_group(pn, pc, n, i, PIECES_AHEAD);
    }
}

// Up to SKINNY_MAX_N rows at once; up to twice that in two groups, the second right after the first
// on each panel (from L1): FP8 codes widened twice in registers rather than once into scratch
// (bench_kernels, FP8 256 x 512, N = 16: 306-321 -> 398-407 GFLOP/s; BF16 the same; a 16-sequence
// FP8 decode step of v3-108m 5.04-5.17 -> 4.90-5.07 ms). Row n's BF16 pairs at ap + n · kp, as they
// come: the kernel broadcasts one word of each row per pair, from N short streams in L1 (a
// pair-major copy, transposed word by word, cost a 16-row step of v3-108m ~7% of its time). Groups
// of P panels of a run of pieces on the same rows (then fewer), each panel one stream; a stream's
// prefetches run on into the same stream of the next group, across runs too, and the first
// group's heads are requested before it starts: without either, every group began with a pipeline
// of misses (FP8, 2 threads from memory, taking turns: 256 x 512 +2.5%, 1024 x 512 +10%; a v3-deep
// FP8 decode step 5% faster, 19 of 20 rounds).
AVX512BF16_VBMI int matmul_nt_pieces_panels(const NtPiece *pc, int n) {
    if (n <= 0) return 0;
    const int fp8 = pc[0].w->dtype == DT_F8_E4M3;
    // each piece's activations as BF16 pair words (a piece with the same rows as the one before
    // shares its words)
    size_t words = 0;
    for (int i = 0; i < n; i++) words += (size_t)pc[i].N * ((pc[i].w->cols + 1) / 2);
    uint32_t *ap = (uint32_t *)kernels_scratch(words), *at[n];
    if (!ap) return -1;
    size_t used = 0;
    for (int i = 0; i < n; i++) {
        const int kp = (pc[i].w->cols + 1) / 2;
        if (i > 0 && same_rows(&pc[i], &pc[i - 1])) {
            at[i] = at[i - 1];
            continue;
        }
        at[i] = ap + used;
        pair_rows(at[i], kp, pc[i].N, pc[i].x, pc[i].ldx, pc[i].N, pc[i].w->cols);
        used += (size_t)pc[i].N * kp;
    }
    __m512i tab[4];
    if (fp8) fp8_widen_tables(tab);
    // groups of panels run after run: (run [i, e) of `count` panels, group g); a group's streams
    // run on into the next group's, across runs too
    int i = next_with_rows(pc, n, 0);
    if (i == n) return 0;
    Panel pn[4], nx[4];
    int e = run_end(pc, n, i), count = run_panel_count(pc, i, e), g = 0, np = first_group(pn, pc, n, i, SKINNY_AHEAD);
    for (;;) {
        int j = i, ej = e, cj = count, gj = g + 1, P = piece_group(pc[i].N);
        if (gj == (count + P - 1) / P) {  // the next group starts the next run with rows
            j = next_with_rows(pc, n, e), gj = 0;
            ej = j < n ? run_end(pc, n, j) : n;
            cj = run_panel_count(pc, j, ej);
        }
        int nn = 0;
        if (j < n) {
            nn = run_panels(nx, pc, j, cj, gj);
            for (int q = nn; q < np; q++) nx[q] = nx[nn - 1];  // (only prefetched: as many as this group has)
        }
        const int kp = (pc[i].w->cols + 1) / 2, n1 = split_rows(pc[i].N), n2 = pc[i].N - n1;
        skinny_run(n1, np, fp8, pn, at[i], kp, tab, j < n ? nx : NULL);
        if (n2) {  // (np is 1)
            pn[0].out += (size_t)n1 * pn[0].ldo;
            skinny_run(n2, 1, fp8, pn, at[i] + (size_t)n1 * kp, kp, tab, NULL);
        }
        if (j == n) return 0;
        for (int q = 0; q < nn; q++) pn[q] = nx[q];
        i = j, e = ej, count = cj, g = gj, np = nn;
    }
}

int matmul_nt_panels(float *out, int ldo, const float *x, int ldx, const MatView *w, int N, int r0, int r1) {
    return panels_nt_stack(&out, &ldo, &w, 1, x, ldx, N, r0, r1);
}

int matmul_nt_panels_tiles_emulated(float *out, int ldo, const float *x, int ldx, const MatView *w, int N, int r0,
                                    int r1) {
    int first[8];
    if (N <= 0 || r1 <= r0) return 0;
    if (!w->panels || w->cols <= 0 || stack_rows(&w, 1, first)) return -1;
    return panels_on_tiles(panels_nt_amx_emulated, &out, &ldo, &w, first, x, ldx, N, r0, r1);
}

int matmul_nt2_panels(float *out_a, int ldo_a, float *out_b, int ldo_b, const float *x, int ldx, const MatView *wa,
                      const MatView *wb, int N) {
    float *const out[2] = {out_a, out_b};
    const int ldo[2] = {ldo_a, ldo_b};
    const MatView *const ws[2] = {wa, wb};
    return panels_nt_stack(out, ldo, ws, 2, x, ldx, N, 0, wa->rows + wb->rows);
}

// The emulated limited accumulation (gemm_lowp.c's accum_group, LowpAccum): rows [i0, i1) of C from
// a (rows of K values) and bt (K rows of N values, the B operand transposed), each chunk of K (all
// of it without promotion) summed in groups of 32 products on the grid 2^(e - bits) of the group's
// largest magnitude (running sum included), then promoted with sa[i * nch + chunk] ·
// sbt[chunk * N + j] (promote) or added. The sum is kept in units of the grid, exact in fp32 for
// bits <= 18: 33 values below 2^bits units never need more than 24 bits. A lane whose largest
// magnitude is inf or NaN sums plainly, as the scalar path does. Register-blocked, R rows × 32
// columns at a time (2R independent sums), because the sums are chains of dependent adds.
AVX512_INLINE void emulated_block(float *C, int ldc, const float *a, const float *bt,
                                                                 int N, int K, int i, int R, int j, int chunk,
                                                                 int bits, int promote, const float *sa,
                                                                 const float *sbt, int add) {
    enum { RMAX = 4 };
    const int nch = (K + chunk - 1) / chunk;
    const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff)), one = _mm512_set1_ps(1.0f);
    const __m512 fbits = _mm512_set1_ps((float)bits), inf = _mm512_set1_ps(INFINITY);
    const __mmask16 m0 = tail_mask(N - j), m1 = tail_mask(N - j - 16 > 0 ? N - j - 16 : 0);
    __m512 out[RMAX][2];
    #pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        float *c = C + (size_t)(i + r) * ldc + j;
        out[r][0] = add ? _mm512_maskz_loadu_ps(m0, c) : _mm512_setzero_ps();
        out[r][1] = add ? _mm512_maskz_loadu_ps(m1, c + 16) : _mm512_setzero_ps();
    }
    for (int ch = 0; ch < nch; ch++) {
        int k0 = ch * chunk, k1 = k0 + chunk < K ? k0 + chunk : K;
        __m512 acc[RMAX][2];
        #pragma GCC unroll 4
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        for (int g = k0; g < k1; g += 32) {
            int n = k1 - g < 32 ? k1 - g : 32;
            __m512 big[RMAX][2], q[RMAX][2], iq[RMAX][2], s[RMAX][2];
            #pragma GCC unroll 4
            for (int r = 0; r < R; r++)
                #pragma GCC unroll 4
                for (int v = 0; v < 2; v++) big[r][v] = _mm512_and_ps(acc[r][v], abs_mask);
            for (int k = 0; k < n; k++) {
                const float *b = bt + (size_t)(g + k) * N + j;
                __m512 b0 = _mm512_maskz_loadu_ps(m0, b), b1 = _mm512_maskz_loadu_ps(m1, b + 16);
                #pragma GCC unroll 4
                for (int r = 0; r < R; r++) {
                    __m512 x = _mm512_set1_ps(a[(size_t)(i + r) * K + g + k]);
                    big[r][0] = _mm512_max_ps(big[r][0], _mm512_and_ps(_mm512_mul_ps(x, b0), abs_mask));
                    big[r][1] = _mm512_max_ps(big[r][1], _mm512_and_ps(_mm512_mul_ps(x, b1), abs_mask));
                }
            }
            __mmask16 finite = 0xffff;
            #pragma GCC unroll 4
            for (int r = 0; r < R; r++)
                #pragma GCC unroll 4
                for (int v = 0; v < 2; v++) {
                    __mmask16 fin = _mm512_cmp_ps_mask(big[r][v], inf, _CMP_LT_OQ);
                    __mmask16 zero = _mm512_cmp_ps_mask(big[r][v], _mm512_setzero_ps(), _CMP_EQ_OQ);
                    finite &= fin;
                    // big in [2^(e-1), 2^e): e = floor(log2 big) + 1; the grid q = 2^(e - bits)
                    __m512 e = _mm512_maskz_mov_ps(fin & ~zero, _mm512_add_ps(_mm512_getexp_ps(big[r][v]), one));
                    q[r][v] = _mm512_scalef_ps(one, _mm512_sub_ps(e, fbits));
                    iq[r][v] = _mm512_scalef_ps(one, _mm512_sub_ps(fbits, e));
                    s[r][v] = _mm512_roundscale_ps(_mm512_mul_ps(acc[r][v], iq[r][v]),
                                                   _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
                }
            if (finite == 0xffff) {
                for (int k = 0; k < n; k++) {
                    const float *b = bt + (size_t)(g + k) * N + j;
                    __m512 b0 = _mm512_maskz_loadu_ps(m0, b), b1 = _mm512_maskz_loadu_ps(m1, b + 16);
                    #pragma GCC unroll 4
                    for (int r = 0; r < R; r++) {
                        __m512 x = _mm512_set1_ps(a[(size_t)(i + r) * K + g + k]);
                        s[r][0] = _mm512_add_ps(s[r][0], _mm512_roundscale_ps(_mm512_mul_ps(_mm512_mul_ps(x, b0), iq[r][0]),
                                                                              _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC));
                        s[r][1] = _mm512_add_ps(s[r][1], _mm512_roundscale_ps(_mm512_mul_ps(_mm512_mul_ps(x, b1), iq[r][1]),
                                                                              _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC));
                    }
                }
                #pragma GCC unroll 4
                for (int r = 0; r < R; r++)
                    #pragma GCC unroll 4
                    for (int v = 0; v < 2; v++) acc[r][v] = _mm512_mul_ps(s[r][v], q[r][v]);
            } else {  // some lane saw inf or NaN: those lanes sum plainly
                #pragma GCC unroll 4
                for (int r = 0; r < R; r++)
                    #pragma GCC unroll 4
                    for (int v = 0; v < 2; v++) {
                        __mmask16 mv = v ? m1 : m0;
                        __mmask16 fin = _mm512_cmp_ps_mask(big[r][v], inf, _CMP_LT_OQ);
                        __m512 plain = acc[r][v];
                        for (int k = 0; k < n; k++) {
                            __m512 t = _mm512_mul_ps(_mm512_set1_ps(a[(size_t)(i + r) * K + g + k]),
                                                     _mm512_maskz_loadu_ps(mv, bt + (size_t)(g + k) * N + j + 16 * v));
                            s[r][v] = _mm512_add_ps(s[r][v], _mm512_roundscale_ps(_mm512_mul_ps(t, iq[r][v]),
                                                                                  _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC));
                            plain = _mm512_add_ps(plain, t);
                        }
                        acc[r][v] = _mm512_mask_blend_ps(fin, plain, _mm512_mul_ps(s[r][v], q[r][v]));
                    }
            }
        }
        #pragma GCC unroll 4
        for (int r = 0; r < R; r++)
            #pragma GCC unroll 4
            for (int v = 0; v < 2; v++) {
                if (promote) {
                    __m512 scale = _mm512_mul_ps(_mm512_set1_ps(sa[(size_t)(i + r) * nch + ch]),
                                                 _mm512_maskz_loadu_ps(v ? m1 : m0, sbt + (size_t)ch * N + j + 16 * v));
                    out[r][v] = _mm512_fmadd_ps(acc[r][v], scale, out[r][v]);
                } else {
                    out[r][v] = _mm512_add_ps(out[r][v], acc[r][v]);
                }
            }
    }
    #pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        float *c = C + (size_t)(i + r) * ldc + j;
        _mm512_mask_storeu_ps(c, m0, out[r][0]);
        _mm512_mask_storeu_ps(c + 16, m1, out[r][1]);
    }
}

AVX512 void emulated_rows_avx512(float *C, int ldc, const float *a, const float *bt, int N, int K, int i0, int i1,
                                 int chunk, int bits, int promote, const float *sa, const float *sbt, int add) {
    for (int j = 0; j < N; j += 32) {
        int i = i0;
        for (; i + 4 <= i1; i += 4) emulated_block(C, ldc, a, bt, N, K, i, 4, j, chunk, bits, promote, sa, sbt, add);
        for (; i < i1; i++) emulated_block(C, ldc, a, bt, N, K, i, 1, j, chunk, bits, promote, sa, sbt, add);
    }
}
