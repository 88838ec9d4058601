// BF16 compute of the x · Wᵀ products (MatView.compute_bf16; `--compute bf16`): each activation
// rounded to BF16 (nearest even), each weight taken as a BF16 value — BF16 as stored, F32 and F16
// rounded to nearest even, FP8 E4M3 exactly (every E4M3 value is a BF16 value) with its block scale
// applied in fp32 to each 128-column chunk's sum — and the products summed in fp32: on AVX512_BF16
// dot products (two products per lane per instruction) where the CPU has them, else the same
// arithmetic in portable C (products and pair sums in fp32, so the two paths may differ in the last
// bits of a sum, not in what is rounded).
//
// Order of the sums, fixed per output element (batch invariance): per 32 columns one 16-lane step
// (lane i adds columns 2i and 2i+1) into one of four sums, step s into sum s % 4 (FP8: each step's
// products × the scale of its 128-column chunk, added to its sum), then the sums added pairwise and
// the 16 lanes added. Four sums, so that the dot products' latency does not bound the stream.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels/avx512_util.h"
#include "kernels/convert.h"
#include "kernels/kernels_cpu.h"
#include "kernels/matmul.h"

// The BF16 value weight (r, c) is taken as, in fp32 (FP8: the code's value, before the scale).
static float weight_bf16(const MatView *w, int r, int c) {
    size_t i = (size_t)r * w->cols + c;
    switch (w->dtype) {
    case DT_F32: return bf16_to_f32(bf16_from_f32(((const float *)w->data)[i]));
    case DT_BF16: return bf16_to_f32(((const uint16_t *)w->data)[i]);
    case DT_F16: return bf16_to_f32(bf16_from_f32(f16_to_f32(((const uint16_t *)w->data)[i])));
    default: return fp8_e4m3_to_f32(((const uint8_t *)w->data)[i]);
    }
}

static float fp8_scale(const MatView *w, int r, int c) {
    return w->scale_inv[(size_t)((w->row0 + r) / w->block) * w->scale_cols + c / w->block];
}

// The portable path: the same roundings, the sums in the documented order.
static void bf16c_rows_portable(float *out, int ldo, const float *x, int ldx, int N, const MatView *w, int r0,
                                int r1) {
    int cols = w->cols, fp8 = w->dtype == DT_F8_E4M3;
    for (int n = 0; n < N; n++)
        for (int r = r0; r < r1; r++) {
            const float *xn = x + (size_t)n * ldx;
            float acc[4][16] = {{0}};
            for (int c0 = 0; c0 < cols; c0 += 32) {
                float part[16] = {0};
                for (int c = c0; c < cols && c < c0 + 32; c++)
                    part[(c - c0) / 2] += weight_bf16(w, r, c) * bf16_to_f32(bf16_from_f32(xn[c]));
                float *a = acc[(c0 / 32) % 4], s = fp8 ? fp8_scale(w, r, c0) : 1.0f;
                for (int i = 0; i < 16; i++) a[i] = fp8 ? fmaf(part[i], s, a[i]) : a[i] + part[i];
            }
            float t[16], a[8];
            for (int i = 0; i < 16; i++) t[i] = (acc[0][i] + acc[1][i]) + (acc[2][i] + acc[3][i]);
            for (int i = 0; i < 8; i++) a[i] = t[i] + t[i + 8];  // reduce4's tree
            float sum = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
            if (fp8)  // an E4M3 NaN code makes its row's products NaN, as the fp32 path does
                for (int c = 0; c < cols; c++)
                    if ((((const uint8_t *)w->data)[(size_t)r * cols + c] & 0x7f) == 0x7f) sum = NAN;
            out[(size_t)n * ldo + r] = sum;
        }
}

// 32 weights of a row from column c as BF16 (lanes from column c), m: the columns that exist.
AVX512BF16_INLINE __m512i weights32(const DType kind, const char *row, int c, __mmask32 m) {
    switch (kind) {
    case DT_BF16: return _mm512_maskz_loadu_epi16(m, (const uint16_t *)row + c);
    case DT_F32: {
        __m512 lo = _mm512_maskz_loadu_ps((__mmask16)m, (const float *)row + c);
        __m512 hi = _mm512_maskz_loadu_ps((__mmask16)(m >> 16), (const float *)row + c + 16);
        return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
    }
    case DT_F16: {
        __m512 lo = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)m, (const uint16_t *)row + c));
        __m512 hi = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)(m >> 16), (const uint16_t *)row + c + 16));
        return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
    }
    default: {
        // E4M3 → BF16 exactly: the sign-extended code shifted so that its exponent and mantissa
        // land in place and its sign at bit 15 (the mask clears the sign's other copies), the
        // exponent rebased (+120); the codes whose exponent field is 0 (zero and the subnormals,
        // m · 2^-9: rare in weights) from a table
        __m512i s16 = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, row + c));
        __m512i v = _mm512_add_epi16(_mm512_and_si512(_mm512_slli_epi16(s16, 4), _mm512_set1_epi16((short)0x87f0)),
                                     _mm512_set1_epi16(0x3c00));
        __mmask32 low = _mm512_testn_epi16_mask(s16, _mm512_set1_epi16(0x78));
        if (low) {
            const __m512i table = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                   0x3c60, 0x3c40, 0x3c20, 0x3c00, 0x3bc0, 0x3b80, 0x3b00, 0);
            __m512i sub = _mm512_permutexvar_epi16(_mm512_and_si512(s16, _mm512_set1_epi16(7)), table);
            v = _mm512_mask_mov_epi16(v, low, _mm512_or_si512(sub, _mm512_and_si512(s16, _mm512_set1_epi16((short)0x8000))));
        }
        return v;
    }
    }
}

// The sums of 16 lanes of four vectors, each by the same tree (halves, then pairs): a row's sum is
// the same bits whichever rows share the call.
AVX512BF16_INLINE __m128 reduce4(__m512 t0, __m512 t1, __m512 t2, __m512 t3) {
    __m256 a0 = _mm256_add_ps(_mm512_castps512_ps256(t0), _mm512_extractf32x8_ps(t0, 1));
    __m256 a1 = _mm256_add_ps(_mm512_castps512_ps256(t1), _mm512_extractf32x8_ps(t1, 1));
    __m256 a2 = _mm256_add_ps(_mm512_castps512_ps256(t2), _mm512_extractf32x8_ps(t2, 1));
    __m256 a3 = _mm256_add_ps(_mm512_castps512_ps256(t3), _mm512_extractf32x8_ps(t3, 1));
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// Row r against NB <= 4 activation rows xb (BF16, zero-padded to cpad columns); KIND: w's dtype.
// t[j]: the row's 16 lane sums for activation row j (reduce4 adds them); returns 1 when the row
// holds an FP8 NaN code.
AVX512BF16_INLINE int bf16c_row(const DType KIND, const int NB, __m512 *t, const uint16_t *xb, int cpad,
                                const MatView *w, int r) {
    const int cols = w->cols, fp8 = KIND == DT_F8_E4M3;
    const char *row = (const char *)w->data + (size_t)r * cols * (KIND == DT_F32 ? 4 : KIND == DT_F8_E4M3 ? 1 : 2);
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int j = 0; j < NB; j++)
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) acc[j][u] = _mm512_setzero_ps();
    int nan = 0;
    const size_t esz = KIND == DT_F32 ? 4 : KIND == DT_F8_E4M3 ? 1 : 2;
    const float *srow = fp8 ? w->scale_inv + (size_t)((w->row0 + r) / w->block) * w->scale_cols : NULL;
    // A code ORed with 0x80 is 0xff exactly for the NaN codes (S.1111.111): a running byte maximum
    // finds one without touching the arithmetic.
    __m512i nan_seen = _mm512_setzero_si512();
    const __m512i sign = _mm512_set1_epi8((char)0x80);
    const int full = cols & ~127;
    // whole 128-column blocks (four steps, one per sum, one FP8 scale), without masks
    for (int c4 = 0, cb = 0; c4 < full; c4 += 128, cb++) {
        for (size_t b = 0; b < 128 * esz; b += 64) _mm_prefetch(row + c4 * esz + b + 4096, _MM_HINT_T0);
        __m512 s = _mm512_setzero_ps();
        if (fp8) {
            nan_seen = _mm512_max_epu8(nan_seen, _mm512_or_si512(_mm512_loadu_si512(row + c4), sign));
            nan_seen = _mm512_max_epu8(nan_seen, _mm512_or_si512(_mm512_loadu_si512(row + c4 + 64), sign));
            s = _mm512_set1_ps(srow[cb]);
        }
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) {
            int c = c4 + 32 * u;
            __m512bh wv = (__m512bh)weights32(KIND, row, c, 0xffffffffu);
#pragma GCC unroll 4
            for (int j = 0; j < NB; j++) {
                __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + (size_t)j * cpad + c);
                if (fp8) acc[j][u] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), wv, xv), s, acc[j][u]);
                else acc[j][u] = _mm512_dpbf16_ps(acc[j][u], wv, xv);
            }
        }
    }
    // the rest: the same steps, masked
    for (int c = full, u = 0; c < cols; c += 32, u++) {
        __mmask32 m = cols - c >= 32 ? 0xffffffffu : (1u << (cols - c)) - 1;
        __m512bh wv = (__m512bh)weights32(KIND, row, c, m);
        __m512 s = _mm512_setzero_ps();
        if (fp8) {
            nan_seen = _mm512_max_epu8(nan_seen, _mm512_castsi256_si512(_mm256_or_si256(
                                                     _mm256_maskz_loadu_epi8(m, row + c), _mm256_set1_epi8((char)0x80))));
            s = _mm512_set1_ps(srow[full / 128]);
        }
#define BF16C_TAIL_STEP(U)                                                                                   \
    acc[j][U] = fp8 ? _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), wv, xv), s, acc[j][U])              \
                    : _mm512_dpbf16_ps(acc[j][U], wv, xv)
#pragma GCC unroll 4
        for (int j = 0; j < NB; j++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + (size_t)j * cpad + c);
            switch (u) {  // (the sums by name, so that they stay in registers)
            case 0: BF16C_TAIL_STEP(0); break;
            case 1: BF16C_TAIL_STEP(1); break;
            case 2: BF16C_TAIL_STEP(2); break;
            default: BF16C_TAIL_STEP(3); break;
            }
        }
#undef BF16C_TAIL_STEP
    }
    if (fp8 && _mm512_cmpeq_epi8_mask(nan_seen, _mm512_set1_epi8((char)0xff)))
        for (int c = 0; c < cols && !nan; c++) nan = (((const uint8_t *)row)[c] & 0x7f) == 0x7f;
#pragma GCC unroll 4
    for (int j = 0; j < NB; j++) t[j] = _mm512_add_ps(_mm512_add_ps(acc[j][0], acc[j][1]), _mm512_add_ps(acc[j][2], acc[j][3]));
    return nan;
}

// Rows [r0, r1) of w against NB activation rows, four weight rows at a time for the lane sums.
AVX512BF16_INLINE void bf16c_rows(const DType KIND, const int NB, float *out, int ldo, const uint16_t *xb, int cpad,
                                  const MatView *w, int r0, int r1) {
    for (int r = r0; r < r1; r += 4) {
        __m512 t[4][4];
        int nan[4] = {0};
        for (int i = 0; i < 4; i++) {
            if (r + i < r1) nan[i] = bf16c_row(KIND, NB, t[i], xb, cpad, w, r + i);
            else
                for (int j = 0; j < NB; j++) t[i][j] = _mm512_setzero_ps();
        }
        for (int j = 0; j < NB; j++) {
            float sum[4];
            _mm_storeu_ps(sum, reduce4(t[0][j], t[1][j], t[2][j], t[3][j]));
            for (int i = 0; i < 4 && r + i < r1; i++) out[(size_t)j * ldo + r + i] = nan[i] ? NAN : sum[i];
        }
    }
}

// Every activation row in BF16 (zero-padded to cpad), then the weight rows in blocks of 16: each
// block against all the activation rows, four at a time, while the block is still in cache — so
// that a batch reads the weights from memory once.
AVX512BF16 static int bf16c_rows_avx512(float *out, int ldo, const float *x, int ldx, int N, const MatView *w, int r0,
                                        int r1) {
    const int cols = w->cols, cpad = (cols + 31) & ~31;
    uint16_t *xb = (uint16_t *)kernels_scratch((size_t)N * cpad / 2 + 16);  // (N, cpad) BF16, the thread's scratch
    if (!xb) return -1;
    for (int n = 0; n < N; n++) {
        const float *xr = x + (size_t)n * ldx;
        uint16_t *d = xb + (size_t)n * cpad;
        for (int c = 0; c < cpad; c += 32) {
            __mmask16 ml = cols - c >= 16 ? 0xffff : cols - c > 0 ? (__mmask16)((1u << (cols - c)) - 1) : 0;
            __mmask16 mh = cols - c >= 32 ? 0xffff : cols - c > 16 ? (__mmask16)((1u << (cols - c - 16)) - 1) : 0;
            __m512bh v = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(mh, xr + c + 16), _mm512_maskz_loadu_ps(ml, xr + c));
            _mm512_storeu_si512(d + c, (__m512i)v);
        }
    }
    for (int rb = r0; rb < r1; rb += 16) {
        int re = rb + 16 < r1 ? rb + 16 : r1;
        for (int n0 = 0; n0 < N; n0 += 4) {
            int nb = N - n0 < 4 ? N - n0 : 4;
            float *o = out + (size_t)n0 * ldo;
            const uint16_t *xg = xb + (size_t)n0 * cpad;
#define BF16C_ROWS(KIND)                                                                \
    switch (nb) {                                                                       \
    case 1: bf16c_rows(KIND, 1, o, ldo, xg, cpad, w, rb, re); break;                    \
    case 2: bf16c_rows(KIND, 2, o, ldo, xg, cpad, w, rb, re); break;                    \
    case 3: bf16c_rows(KIND, 3, o, ldo, xg, cpad, w, rb, re); break;                    \
    default: bf16c_rows(KIND, 4, o, ldo, xg, cpad, w, rb, re); break;                   \
    }
            switch (w->dtype) {
            case DT_F32: BF16C_ROWS(DT_F32); break;
            case DT_BF16: BF16C_ROWS(DT_BF16); break;
            case DT_F16: BF16C_ROWS(DT_F16); break;
            default: BF16C_ROWS(DT_F8_E4M3); break;
            }
#undef BF16C_ROWS
        }
    }
    return 0;
}

int matmul_nt_bf16c(float *out, int ldo, const float *x, int ldx, const MatView *w, int N, int r0, int r1) {
    if (N <= 0 || r1 <= r0) return 0;
    if (w->dtype == DT_F8_E4M3 && (w->block != 128 || !w->scale_inv)) return -1;  // (the release's blocks)
    if (kernels_cpu_avx512bf16()) return bf16c_rows_avx512(out, ldo, x, ldx, N, w, r0, r1);
    bf16c_rows_portable(out, ldo, x, ldx, N, w, r0, r1);
    return 0;
}
