// AVX-512 kernels for matmul.h. Two shapes of work:
//  - few activation rows (decode and speculative drafts: N <= 8 for x · Wᵀ, N <= 4 for x · W):
//    every weight is read from memory once, widened to fp32 in registers and multiplied against
//    all N activation rows (gemv_nt_avx512, gemv_nn_avx512);
//  - many activation rows (prefill, batches): a blocked product that widens a slice of W once
//    into an fp32 panel laid out for a 12 x 32 register tile, so each widened weight is reused
//    by all N rows at the FMA rate (gemm_avx512).
// FP8 E4M3: the code's bits are moved into an fp32 pattern worth code × 2^-120 (sign extension,
// shift, mask: three instructions per 16 codes; subnormal codes land on fp32 subnormals, still
// exact), and the 2^120 is folded into the block scale, so the dequantised weight is
// fp32(code × scale) with a single rounding, as the reference computes it. When a block scale is
// so large that scale × 2^120 would overflow, the code is first multiplied by 2^120 on its own
// (exact) and then by the scale. Subnormal codes are slower (fp32 subnormal inputs), but a block
// quantiser with amax ~ 4.5 sigma gives them to about one weight in 10^4.
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "kernels/avx512_util.h"
#include "kernels/convert.h"
#include "kernels/kernels_cpu.h"


enum { W_F32, W_BF16, W_F16, W_FP8 };

static int weight_kind(DType t) {
    switch (t) {
    case DT_F32: return W_F32;
    case DT_BF16: return W_BF16;
    case DT_F16: return W_F16;
    default: return W_FP8;
    }
}

int matview_avx512_ok(const MatView *w) {
    switch (w->dtype) {
    case DT_F32:
    case DT_BF16:
    case DT_F16: return 1;
    // Subnormal E4M3 codes pass through fp32 subnormals here (see top), which a caller that set
    // denormals-are-zero (MXCSR.DAZ) would read as 0: leave such callers to the portable code.
    case DT_F8_E4M3: return w->block > 0 && w->block % 64 == 0 && !(_mm_getcsr() & 0x0040);
    default: return 0;
    }
}

// 1 when some block scale of the view is finite but too large for the folded 2^120 (see top).
int fp8_scales_need_split(const MatView *w) {
    if (w->dtype != DT_F8_E4M3 || w->rows <= 0) return 0;
    int b0 = w->row0 / w->block, b1 = (w->row0 + w->rows - 1) / w->block;
    for (int b = b0; b <= b1; b++)
        for (int j = 0; j < w->scale_cols; j++) {
            float s = w->scale_inv[(size_t)b * w->scale_cols + j];
            if (isfinite(s) && fabsf(s) >= 256.0f) return 1;
        }
    return 0;
}

AVX512 size_t bf16_to_f32_n_avx512(float *out, const uint16_t *in, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(in + i)));
        _mm512_storeu_ps(out + i, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
    }
    return i;
}

// Same integer rounding as bf16_from_f32 (nearest-even, NaN quieted), lane by lane; the
// AVX512_BF16 instruction is not used because it flushes subnormals.
AVX512 size_t bf16_from_f32_n_avx512(uint16_t *out, const float *in, size_t n) {
    const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
    const __m512i half = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1), quiet = _mm512_set1_epi32(0x40);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i u = _mm512_loadu_si512(in + i);
        __m512i hi = _mm512_srli_epi32(u, 16);
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, half), _mm512_and_si512(hi, one)), 16);
        __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs_mask), inf);
        r = _mm512_mask_or_epi32(r, nan, hi, quiet);
        _mm256_storeu_si256((__m256i *)(out + i), _mm512_cvtepi32_epi16(r));
    }
    return i;
}

// E4M3 codes → fp32 patterns worth code × 2^-120: sign to bit 31, exponent and mantissa to bits
// 20..26 (sign extension, shift, mask).
AVX512_INLINE __m512 fp8_raw(__m128i codes) {
    __m512i d = _mm512_cvtepi8_epi32(codes);
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(d, 20), _mm512_set1_epi32((int)0x87f00000u)));
}

// 16 weights of a row starting at element c, widened (FP8: before its scale).
AVX512_INLINE __m512 wload(const int kind, const char *row, int c) {
    switch (kind) {
    case W_F32: return _mm512_loadu_ps((const float *)row + c);
    case W_BF16:
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + c))), 16));
    case W_F16: return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + c)));
    default: return fp8_raw(_mm_loadu_si128((const __m128i *)(row + c)));
    }
}

// The same for the lanes in m; the others are zero and read nothing.
AVX512_INLINE __m512 wload_mask(const int kind, const char *row, int c, __mmask16 m) {
    switch (kind) {
    case W_F32: return _mm512_maskz_loadu_ps(m, (const float *)row + c);
    case W_BF16:
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)row + c)), 16));
    case W_F16: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)row + c));
    default: return fp8_raw(_mm_maskz_loadu_epi8(m, row + c));
    }
}

static inline size_t elem_size(int kind) { return kind == W_F32 ? 4 : kind == W_FP8 ? 1 : 2; }

// Scale row of the scaled matrix that holds view row r.
static inline const float *scale_row(const MatView *w, int r) {
    return w->scale_inv + (size_t)((w->row0 + r) / w->block) * w->scale_cols;
}

// Does row r hold an E4M3 NaN code (S.1111.111)? Only asked after the kernel saw one nearby.
static int fp8_row_has_nan(const MatView *w, int r) {
    const uint8_t *p = (const uint8_t *)w->data + (size_t)r * w->cols;
    for (int c = 0; c < w->cols; c++)
        if ((p[c] & 0x7f) == 0x7f) return 1;
    return 0;
}

// ---- few activation rows: each weight row streamed once --------------------------------------

// How far ahead of the loads the weight streams are prefetched, in bytes: one stream per thread
// (a row at a time) gains from running far ahead (~+10-25% on the machine this was tuned on,
// more when the memory is busy); four interleaved streams (groups of 4 rows) from less.
#define PREFETCH_ROW 4096
#define PREFETCH_TILE 1024
// FP8 tiles: each of the four rows' streams runs on into the same lane's rows of the next tiles
// (rows r + i + 4, r + i + 8, ...), so a tile starts on lines already requested: with the groups'
// own streams only (1,024 bytes ahead, stopping at the row's end) a one-row product of 4096 x 4096
// from memory read 30-33 GB/s, with the run-on 38-44 (2 threads, 2,048 or 4,096 bytes alike).
#define PREFETCH_TILE_FP8 2048
// The activation rows one weight row at a time may sweep: a half of the 32 KiB L1 data cache.
#define ROW_STREAM_X_BYTES 16384

// out[j][r] = x[j] · W[r] for one weight row and NB <= 4 activation rows, with U partial sums per
// activation row so that with few rows the FMA latency does not limit the stream. A thread walking
// its rows one at a time reads its part of W as a single sequential stream.
AVX512_INLINE void gemv_row(const int kind, const int NB, const int U, float *out, int ldo, const float *x, int ldx,
                            const MatView *w, int r) {
    const int cols = w->cols;
    const char *row = (const char *)w->data + (size_t)r * cols * elem_size(kind);
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int j = 0; j < NB; j++)
#pragma GCC unroll 4
        for (int u = 0; u < U; u++) acc[j][u] = _mm512_setzero_ps();

    if (kind == W_FP8) {
        const int blk = w->block;
        const float *srow = scale_row(w, r);
        // A code ORed with 0x80 is 0xff exactly for the NaN codes (S.1111.111): a running byte
        // maximum finds one without touching the arithmetic.
        __m512i nan_seen = _mm512_setzero_si512();
        const __m512i sign = _mm512_set1_epi8((char)0x80);
        for (int c0 = 0, cb = 0; c0 < cols; c0 += blk, cb++) {
            __m512 s = _mm512_set1_ps(srow[cb] * 0x1p120f);
            int c1 = cols < c0 + blk ? cols : c0 + blk, c = c0;
            for (; c + 64 <= c1; c += 64) {
                _mm_prefetch(row + c + PREFETCH_ROW, _MM_HINT_T0);
                nan_seen = _mm512_max_epu8(nan_seen, _mm512_or_si512(_mm512_loadu_si512(row + c), sign));
#pragma GCC unroll 4
                for (int q = 0; q < 4; q++) {
                    __m512 wv = _mm512_mul_ps(wload(kind, row, c + 16 * q), s);
#pragma GCC unroll 4
                    for (int j = 0; j < NB; j++)
                        acc[j][q % U] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + (size_t)j * ldx + c + 16 * q), acc[j][q % U]);
                }
            }
            for (; c < c1; c += 16) {
                __mmask16 m = tail_mask(c1 - c);
                __m128i codes = _mm_maskz_loadu_epi8(m, row + c);
                nan_seen = _mm512_max_epu8(nan_seen, _mm512_castsi128_si512(_mm_or_si128(codes, _mm_set1_epi8((char)0x80))));
                // masked so that lanes past the end stay 0 even when the scale is inf or NaN
                __m512 wv = _mm512_maskz_mul_ps(m, fp8_raw(codes), s);
#pragma GCC unroll 4
                for (int j = 0; j < NB; j++)
                    acc[j][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + (size_t)j * ldx + c), acc[j][0]);
            }
        }
        int nan = _mm512_cmpeq_epi8_mask(nan_seen, _mm512_set1_epi8((char)0xff)) && fp8_row_has_nan(w, r);
#pragma GCC unroll 4
        for (int j = 0; j < NB; j++) {
#pragma GCC unroll 4
            for (int u = 1; u < U; u++) acc[j][0] = _mm512_add_ps(acc[j][0], acc[j][u]);
            out[(size_t)j * ldo + r] = nan ? NAN : _mm512_reduce_add_ps(acc[j][0]);
        }
        return;
    }

    const int esz = (int)elem_size(kind);
    int c = 0;
    for (; c + 64 <= cols; c += 64) {
        for (int b = 0; b < 64 * esz; b += 64) _mm_prefetch(row + (size_t)c * esz + PREFETCH_ROW + b, _MM_HINT_T0);
#pragma GCC unroll 4
        for (int q = 0; q < 4; q++) {
            __m512 wv = wload(kind, row, c + 16 * q);
#pragma GCC unroll 4
            for (int j = 0; j < NB; j++)
                acc[j][q % U] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + (size_t)j * ldx + c + 16 * q), acc[j][q % U]);
        }
    }
    for (; c < cols; c += 16) {
        __mmask16 m = tail_mask(cols - c);
        __m512 wv = wload_mask(kind, row, c, m);
#pragma GCC unroll 4
        for (int j = 0; j < NB; j++) acc[j][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + (size_t)j * ldx + c), acc[j][0]);
    }
#pragma GCC unroll 4
    for (int j = 0; j < NB; j++) {
#pragma GCC unroll 4
        for (int u = 1; u < U; u++) acc[j][0] = _mm512_add_ps(acc[j][0], acc[j][u]);
        out[(size_t)j * ldo + r] = _mm512_reduce_add_ps(acc[j][0]);
    }
}

// A 4 × NB tile's sums (acc[i][j]: weight row i, activation row j) reduced as
// _mm512_reduce_add_ps would, sixteen at once, into out[j * ldo + i].
AVX512_INLINE void tile4_store(const int NB, float *out, int ldo, __m512 acc[4][4]) {
    __m512 v[16];
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++)
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) v[4 * i + j] = j < NB ? acc[i][j] : _mm512_setzero_ps();
    float s[16];
    _mm512_storeu_ps(s, fold16_ps(v));  // lane 4j + i: the sum of v[4i + j]
    for (int j = 0; j < NB; j++) memcpy(out + (size_t)j * ldo, s + 4 * j, sizeof(float) * 4);
}

// out[j][r + i] for 4 weight rows and NB <= 4 activation rows: every activation vector loaded
// serves the 4 rows, which keeps the activations' cache traffic below the weights' when N > 1.
AVX512_INLINE void gemv_tile4(const int kind, const int NB, float *out, int ldo, const float *x, int ldx,
                              const MatView *w, int r) {
    const int cols = w->cols, esz = (int)elem_size(kind);
    const char *row[4];
    for (int i = 0; i < 4; i++) row[i] = (const char *)w->data + (size_t)(r + i) * cols * esz;
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++)
#pragma GCC unroll 4
        for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();

    if (kind == W_FP8) {
        const int blk = w->block;
        const float *srow[4];
        for (int i = 0; i < 4; i++) srow[i] = scale_row(w, r + i);
        __m512i nan_seen = _mm512_setzero_si512();
        const __m512i sign = _mm512_set1_epi8((char)0x80);
        // the prefetch point PREFETCH_TILE_FP8 bytes on along lane i's rows: row i + pf_row / cols, column pf_col
        size_t pf_row = cols > 0 ? (size_t)(PREFETCH_TILE_FP8 / cols) * 4 * cols : 0,
               pf_col = cols > 0 ? PREFETCH_TILE_FP8 % cols : 0;
        for (int c0 = 0, cb = 0; c0 < cols; c0 += blk, cb++) {
            __m512 s[4];
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) s[i] = _mm512_set1_ps(srow[i][cb] * 0x1p120f);
            int c1 = cols < c0 + blk ? cols : c0 + blk, c = c0;
            for (; c + 64 <= c1; c += 64) {
#pragma GCC unroll 4
                for (int i = 0; i < 4; i++) {
                    _mm_prefetch(row[i] + pf_row + pf_col, _MM_HINT_T0);
                    nan_seen = _mm512_max_epu8(nan_seen, _mm512_or_si512(_mm512_loadu_si512(row[i] + c), sign));
                }
                for (pf_col += 64; pf_col >= (size_t)cols; pf_col -= cols) pf_row += 4 * (size_t)cols;
#pragma GCC unroll 4
                for (int q = 0; q < 4; q++) {
                    __m512 xv[4];
#pragma GCC unroll 4
                    for (int j = 0; j < NB; j++) xv[j] = _mm512_loadu_ps(x + (size_t)j * ldx + c + 16 * q);
#pragma GCC unroll 4
                    for (int i = 0; i < 4; i++) {
                        __m512 wv = _mm512_mul_ps(wload(kind, row[i], c + 16 * q), s[i]);
#pragma GCC unroll 4
                        for (int j = 0; j < NB; j++) acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
                    }
                }
            }
            for (; c < c1; c += 16) {
                for (pf_col += 16; pf_col >= (size_t)cols; pf_col -= cols) pf_row += 4 * (size_t)cols;
                __mmask16 m = tail_mask(c1 - c);
                __m512 xv[4];
#pragma GCC unroll 4
                for (int j = 0; j < NB; j++) xv[j] = _mm512_maskz_loadu_ps(m, x + (size_t)j * ldx + c);
#pragma GCC unroll 4
                for (int i = 0; i < 4; i++) {
                    __m128i codes = _mm_maskz_loadu_epi8(m, row[i] + c);
                    nan_seen = _mm512_max_epu8(nan_seen, _mm512_castsi128_si512(_mm_or_si128(codes, _mm_set1_epi8((char)0x80))));
                    __m512 wv = _mm512_maskz_mul_ps(m, fp8_raw(codes), s[i]);
#pragma GCC unroll 4
                    for (int j = 0; j < NB; j++) acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
                }
            }
        }
        tile4_store(NB, out + r, ldo, acc);
        if (_mm512_cmpeq_epi8_mask(nan_seen, _mm512_set1_epi8((char)0xff)))
            for (int i = 0; i < 4; i++)
                if (fp8_row_has_nan(w, r + i))
                    for (int j = 0; j < NB; j++) out[(size_t)j * ldo + r + i] = NAN;
        return;
    }

    int c = 0;
    for (; c + 32 <= cols; c += 32) {
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) _mm_prefetch(row[i] + (size_t)c * esz + PREFETCH_TILE, _MM_HINT_T0);
        if (kind == W_F32) {
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) _mm_prefetch(row[i] + (size_t)c * esz + PREFETCH_TILE + 64, _MM_HINT_T0);
        }
#pragma GCC unroll 2
        for (int q = 0; q < 2; q++) {
            __m512 xv[4];
#pragma GCC unroll 4
            for (int j = 0; j < NB; j++) xv[j] = _mm512_loadu_ps(x + (size_t)j * ldx + c + 16 * q);
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                __m512 wv = wload(kind, row[i], c + 16 * q);
#pragma GCC unroll 4
                for (int j = 0; j < NB; j++) acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
            }
        }
    }
    for (; c < cols; c += 16) {
        __mmask16 m = tail_mask(cols - c);
        __m512 xv[4];
#pragma GCC unroll 4
        for (int j = 0; j < NB; j++) xv[j] = _mm512_maskz_loadu_ps(m, x + (size_t)j * ldx + c);
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) {
            __m512 wv = wload_mask(kind, row[i], c, m);
#pragma GCC unroll 4
            for (int j = 0; j < NB; j++) acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
        }
    }
    tile4_store(NB, out + r, ldo, acc);
}

// Rows [r0, r1) against N activation rows. One weight row at a time against all N activation rows
// while those stay in L1 (N <= 4, N x cols floats <= ROW_STREAM_X_BYTES): the weights arrive as one
// stream, which the hardware prefetchers follow best. Otherwise groups of 4 weight rows against
// groups of up to 4 activation rows, so that each activation vector loaded serves 4 weight rows;
// the groups of one row block follow each other while its weights are still in L1/L2, so W is read
// from memory once whatever N is. (Zen 4, 2 threads, BF16, bench_kernels' "invariant" lines: an
// expert's 256 x 512 at N = 2 streams ~25-33 GB/s one row at a time against ~17-19 GB/s in groups
// of 4; at 2048 columns the single stream still wins at N = 2 and loses at N = 4.)
// Batch invariance: every output element is ONE running sum over the 16-column vectors of its row
// (no split partial sums), then one lane reduction, in every path — so a row's result is the same
// bits for any N <= GEMV_MAX_N and any split of the rows (tests/test_kernels.c). One chain of fused
// multiply-adds keeps up with memory for F32, BF16 and F16 (32-64 bytes of weights per
// multiply-add). Not for FP8 (16 bytes, each widened and scaled): one row's chain took codes at
// ~20 GB/s a thread from L1, below a thread's share of the read bandwidth, so FP8 rows always go
// four at a time — four chains, each still its row's one sum: the same bits — ~32 GB/s from L1
// (bench_kernels' "f32 compute" line), and a one-sequence `--compute f32` decode of v3-108m FP8
// 856-1,058 -> 1,157-1,303 tokens/s, v3-deep 179-264 -> 259-312 (five rounds taking turns).
// (Short rows took the tiles for a while, for attention's scores over latent rows; the scores have
// their own kernel now, and the tiles cost a speculative verification of the demo model — every
// row 256 values or fewer, 2 activation rows — half its speed: K = 1 1,516 -> 2,890 tokens/s.)
AVX512_INLINE void gemv_rows(const int kind, float *out, int ldo, const float *x, int ldx, int N, const MatView *w,
                             int r0, int r1) {
    if (kind != W_FP8 && N <= 4 && (size_t)N * w->cols * sizeof(float) <= ROW_STREAM_X_BYTES) {
        for (int r = r0; r < r1; r++) switch (N) {
            case 1: gemv_row(kind, 1, 1, out, ldo, x, ldx, w, r); break;
            case 2: gemv_row(kind, 2, 1, out, ldo, x, ldx, w, r); break;
            case 3: gemv_row(kind, 3, 1, out, ldo, x, ldx, w, r); break;
            default: gemv_row(kind, 4, 1, out, ldo, x, ldx, w, r); break;
            }
        return;
    }
    if (kind != W_FP8 && N == 1) {
        for (int r = r0; r < r1; r++) gemv_row(kind, 1, 1, out, ldo, x, ldx, w, r);
        return;
    }
    int r = r0;
    for (; r + 4 <= r1; r += 4)
        for (int n0 = 0; n0 < N; n0 += 4) {
            float *o = out + (size_t)n0 * ldo;
            const float *xn = x + (size_t)n0 * ldx;
            switch (N - n0) {
            case 1: gemv_tile4(kind, 1, o, ldo, xn, ldx, w, r); break;
            case 2: gemv_tile4(kind, 2, o, ldo, xn, ldx, w, r); break;
            case 3: gemv_tile4(kind, 3, o, ldo, xn, ldx, w, r); break;
            default: gemv_tile4(kind, 4, o, ldo, xn, ldx, w, r); break;
            }
        }
    for (; r < r1; r++)
        for (int n0 = 0; n0 < N; n0 += 4) {
            float *o = out + (size_t)n0 * ldo;
            const float *xn = x + (size_t)n0 * ldx;
            switch (N - n0) {
            case 1: gemv_row(kind, 1, 1, o, ldo, xn, ldx, w, r); break;
            case 2: gemv_row(kind, 2, 1, o, ldo, xn, ldx, w, r); break;
            case 3: gemv_row(kind, 3, 1, o, ldo, xn, ldx, w, r); break;
            default: gemv_row(kind, 4, 1, o, ldo, xn, ldx, w, r); break;
            }
        }
}

AVX512 static void gemv_rows_f32(float *out, int ldo, const float *x, int ldx, int N, const MatView *w, int r0, int r1) {
    gemv_rows(W_F32, out, ldo, x, ldx, N, w, r0, r1);
}
AVX512 static void gemv_rows_bf16(float *out, int ldo, const float *x, int ldx, int N, const MatView *w, int r0, int r1) {
    gemv_rows(W_BF16, out, ldo, x, ldx, N, w, r0, r1);
}
AVX512 static void gemv_rows_f16(float *out, int ldo, const float *x, int ldx, int N, const MatView *w, int r0, int r1) {
    gemv_rows(W_F16, out, ldo, x, ldx, N, w, r0, r1);
}
AVX512 static void gemv_rows_fp8(float *out, int ldo, const float *x, int ldx, int N, const MatView *w, int r0, int r1) {
    gemv_rows(W_FP8, out, ldo, x, ldx, N, w, r0, r1);
}

AVX512 int gemv_nt_avx512(float *out, int ldo, const float *x, int ldx, int N, const MatView *w, int r_begin,
                          int r_end) {
    if (fp8_scales_need_split(w)) {
        // Rare: widen each group of rows exactly into scratch and run the fp32 kernel on it.
        float *buf = kernels_scratch((size_t)4 * w->cols);
        if (!buf) return -1;
        MatView f = {.dtype = DT_F32, .rows = 4, .cols = w->cols, .data = buf};
        for (int r = r_begin; r < r_end; r += 4) {
            int rb = r_end - r < 4 ? r_end - r : 4;
            for (int i = 0; i < rb; i++) matview_row_avx512(w, r + i, 0, w->cols, buf + (size_t)i * w->cols);
            gemv_rows_f32(out + r, ldo, x, ldx, N, &f, 0, rb);
        }
        return 0;
    }
    if (N == 1 && ((uintptr_t)x & 31) == 0) {
        // A one-row GEMV streaming its weights from memory runs faster when x is NOT 32-byte
        // aligned (Zen 4, one thread, 512 BF16 matrices 256 x 512 = 128 MB streamed per pass: x
        // aligned 17.2-20.1 GB/s, x 4 or 60 bytes past a line 21.0-23.2 GB/s), and a decode step
        // of the 108M model with 64-byte aligned activations lost 10-15% to it. So x is read from
        // a copy 4 bytes past a line; the copy is cols floats against rows x cols weights.
        float *copy = kernels_scratch((size_t)w->cols + 16);
        if (!copy) return -1;
        memcpy(copy + 1, x, sizeof(float) * w->cols);
        x = copy + 1;
    }
    switch (weight_kind(w->dtype)) {
    case W_F32: gemv_rows_f32(out, ldo, x, ldx, N, w, r_begin, r_end); break;
    case W_BF16: gemv_rows_bf16(out, ldo, x, ldx, N, w, r_begin, r_end); break;
    case W_F16: gemv_rows_f16(out, ldo, x, ldx, N, w, r_begin, r_end); break;
    default: gemv_rows_fp8(out, ldo, x, ldx, N, w, r_begin, r_end); break;
    }
    return 0;
}

// ---- out = x · W with few activation rows: column tiles, every weight row streamed once ------

// out[j][c0 .. c0 + nc) (add: +=) for NB activation rows and a tile of V vectors (nc <= 16 V; FULL
// when nc == 16 V): walks all rows of W, each adding x[j][r] · W[r][tile] into registers — per
// output element one chain of fused multiply-adds in row order, whatever NB, V or the tile.
AVX512_INLINE void gemv_nn_tile(const int kind, const int NB, const int V, const int FULL, float *out, int ldo,
                                const float *x, int ldx, const MatView *w, int c0, int nc, int add) {
    const int rows = w->rows, cols = w->cols, esz = (int)elem_size(kind);
    __m512 acc[4][16];
    __mmask16 mv[16];
#pragma GCC unroll 16
    for (int v = 0; v < V; v++) {
        mv[v] = FULL ? (__mmask16)0xffff : tail_mask(nc - 16 * v > 0 ? nc - 16 * v : 0);
#pragma GCC unroll 4
        for (int j = 0; j < NB; j++)  // add: the chain goes on from out's values
            acc[j][v] = add ? _mm512_maskz_loadu_ps(mv[v], out + (size_t)j * ldo + c0 + 16 * v) : _mm512_setzero_ps();
    }
    float sbuf[16];
    int cbv[16];
    const float *srow_cur = NULL;
    __m512i nan_seen = _mm512_setzero_si512();
    const __m512i sign = _mm512_set1_epi8((char)0x80);
    if (kind == W_FP8)
        for (int v = 0; v < V; v++) cbv[v] = c0 + 16 * v < cols ? (c0 + 16 * v) / w->block : 0;
    for (int r = 0; r < rows; r++) {
        const char *row = (const char *)w->data + ((size_t)r * cols + c0) * esz;
        if (kind == W_FP8) {
            const float *sr = scale_row(w, r);
            if (sr != srow_cur) {
                srow_cur = sr;
                for (int v = 0; v < V; v++) sbuf[v] = sr[cbv[v]] * 0x1p120f;
            }
            for (int b = 0; b < 16 * V; b += 64) {
                __mmask64 m = FULL || nc - b >= 64 ? ~0ull : nc - b > 0 ? (1ull << (nc - b)) - 1 : 0;
                nan_seen = _mm512_max_epu8(nan_seen, _mm512_or_si512(_mm512_maskz_loadu_epi8(m, row + b), sign));
            }
        }
        __m512 xr[4];
#pragma GCC unroll 4
        for (int j = 0; j < NB; j++) xr[j] = _mm512_set1_ps(x[(size_t)j * ldx + r]);
#pragma GCC unroll 16
        for (int v = 0; v < V; v++) {
            __m512 wv = FULL ? wload(kind, row, 16 * v) : wload_mask(kind, row, 16 * v, mv[v]);
            // masked so that lanes past the end stay 0 even when the scale is inf or NaN
            if (kind == W_FP8) wv = _mm512_maskz_mul_ps(mv[v], wv, _mm512_set1_ps(sbuf[v]));
#pragma GCC unroll 4
            for (int j = 0; j < NB; j++) acc[j][v] = _mm512_fmadd_ps(xr[j], wv, acc[j][v]);
        }
    }
#pragma GCC unroll 16
    for (int v = 0; v < V; v++)
#pragma GCC unroll 4
        for (int j = 0; j < NB; j++) _mm512_mask_storeu_ps(out + (size_t)j * ldo + c0 + 16 * v, mv[v], acc[j][v]);
    if (kind == W_FP8 && _mm512_cmpeq_epi8_mask(nan_seen, _mm512_set1_epi8((char)0xff))) {
        // a NaN code makes its column's products NaN whatever the activations
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < nc; c++)
                if ((((const uint8_t *)w->data)[(size_t)r * cols + c0 + c] & 0x7f) == 0x7f)
                    for (int j = 0; j < NB; j++) out[(size_t)j * ldo + c0 + c] = NAN;
    }
}

// Columns [c_begin, c_end) in tiles as wide as the registers allow: 256 columns for one
// activation row, 128 for two, 64 for three or four.
AVX512_INLINE void gemv_nn_cols(const int kind, float *out, int ldo, const float *x, int ldx, int N, const MatView *w,
                                int c_begin, int c_end, int add) {
    for (int n0 = 0; n0 < N; n0 += 4) {
        int nb = N - n0 < 4 ? N - n0 : 4, tile = nb == 1 ? 256 : nb == 2 ? 128 : 64;
        float *o = out + (size_t)n0 * ldo;
        const float *xn = x + (size_t)n0 * ldx;
        for (int c = c_begin; c < c_end; c += tile) {
            int nc = c_end - c < tile ? c_end - c : tile;
#define NN_TILE(NB_, V_)                                                                       \
    (nc == 16 * (V_) ? gemv_nn_tile(kind, NB_, V_, 1, o, ldo, xn, ldx, w, c, nc, add)         \
                     : gemv_nn_tile(kind, NB_, V_, 0, o, ldo, xn, ldx, w, c, nc, add))
            switch (nb) {
            case 1: NN_TILE(1, 16); break;
            case 2: NN_TILE(2, 8); break;
            case 3: NN_TILE(3, 4); break;
            default: NN_TILE(4, 4); break;
            }
#undef NN_TILE
        }
    }
}

AVX512 static void gemv_nn_f32(float *out, int ldo, const float *x, int ldx, int N, const MatView *w, int c0, int c1,
                           int add) {
    gemv_nn_cols(W_F32, out, ldo, x, ldx, N, w, c0, c1, add);
}
AVX512 static void gemv_nn_bf16(float *out, int ldo, const float *x, int ldx, int N, const MatView *w, int c0, int c1,
                           int add) {
    gemv_nn_cols(W_BF16, out, ldo, x, ldx, N, w, c0, c1, add);
}
AVX512 static void gemv_nn_f16(float *out, int ldo, const float *x, int ldx, int N, const MatView *w, int c0, int c1,
                           int add) {
    gemv_nn_cols(W_F16, out, ldo, x, ldx, N, w, c0, c1, add);
}
AVX512 static void gemv_nn_fp8(float *out, int ldo, const float *x, int ldx, int N, const MatView *w, int c0, int c1,
                           int add) {
    gemv_nn_cols(W_FP8, out, ldo, x, ldx, N, w, c0, c1, add);
}

AVX512 int gemv_nn_avx512(float *out, int ldo, const float *x, int ldx, int N, const MatView *w, int c_begin, int c_end,
                          int add) {
    if (c_end <= c_begin) return 0;
    switch (weight_kind(w->dtype)) {
    case W_F32: gemv_nn_f32(out, ldo, x, ldx, N, w, c_begin, c_end, add); break;
    case W_BF16: gemv_nn_bf16(out, ldo, x, ldx, N, w, c_begin, c_end, add); break;
    case W_F16: gemv_nn_f16(out, ldo, x, ldx, N, w, c_begin, c_end, add); break;
    default: gemv_nn_fp8(out, ldo, x, ldx, N, w, c_begin, c_end, add); break;
    }
    return 0;
}

// ---- row dequantisation --------------------------------------------------------------------

// 16 weights of row r from column c (lanes in m), FP8 scaled; split = the scale-overflow case.
AVX512_INLINE __m512 wload_scaled(const int kind, const MatView *w, const char *row, int r, int c, __mmask16 m,
                                  int split) {
    __m512 v = m == 0xffff ? wload(kind, row, c) : wload_mask(kind, row, c, m);
    if (kind != W_FP8) return v;
    float s = scale_row(w, r)[c / w->block];
    if (split) v = _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(0x1p120f)), _mm512_set1_ps(s));
    else v = _mm512_mul_ps(v, _mm512_set1_ps(s * 0x1p120f));
    __m128i codes = m == 0xffff ? _mm_loadu_si128((const __m128i *)(row + c)) : _mm_maskz_loadu_epi8(m, row + c);
    __mmask16 nan = _mm_cmpeq_epi8_mask(_mm_or_si128(codes, _mm_set1_epi8((char)0x80)), _mm_set1_epi8((char)0xff));
    v = _mm512_mask_mov_ps(v, nan, _mm512_set1_ps(NAN));
    return _mm512_maskz_mov_ps(m, v);
}

AVX512_INLINE void row_dequant(const int kind, const MatView *w, int r, int c0, int n, float *out, int split) {
    const char *row = (const char *)w->data + (size_t)r * w->cols * elem_size(kind);
    for (int c = 0; c < n; c += 16) {
        __mmask16 m = tail_mask(n - c);
        _mm512_mask_storeu_ps(out + c, m, wload_scaled(kind, w, row, r, c0 + c, m, split));
    }
}

AVX512 void matview_row_avx512(const MatView *w, int r, int c0, int n, float *out) {
    switch (weight_kind(w->dtype)) {
    case W_F32: memcpy(out, (const float *)w->data + (size_t)r * w->cols + c0, sizeof(float) * n); break;
    case W_BF16: row_dequant(W_BF16, w, r, c0, n, out, 0); break;
    case W_F16: row_dequant(W_F16, w, r, c0, n, out, 0); break;
    default: {
        // The split form is exact for every scale; the folded one only below 2^8, so choose per row.
        const float *sr = scale_row(w, r);
        int split = 0;
        for (int j = c0 / w->block; j <= (c0 + n - 1) / w->block && n > 0; j++)
            if (isfinite(sr[j]) && fabsf(sr[j]) >= 256.0f) split = 1;
        row_dequant(W_FP8, w, r, c0, n, out, split);
    }
    }
}

// ---- many activation rows: packed panels and a 12 x 32 register tile ------------------------

enum {
    MR = 12,   // activation rows per register tile
    NR = 32,   // output features per register tile (two vectors)
    KC = 256,  // depth of one packed slice
    FB = 128,  // output features packed at a time: the weight panel is FB × KC floats (128 KiB, L2)
    MC = 192,  // activation rows packed at a time: MC × KC floats (192 KiB)
};

// 16 dequantised weights of a row from column c, the lanes outside m zero. FP8: s is the block's
// scale, already multiplied by 2^120 unless split; NaN codes are dealt with by the caller.
AVX512_INLINE __m512 wdequant(const int kind, const char *row, int c, __mmask16 m, float s, int split) {
    __m512 v = m == 0xffff ? wload(kind, row, c) : wload_mask(kind, row, c, m);
    if (kind != W_FP8) return v;
    if (split) v = _mm512_mul_ps(v, _mm512_set1_ps(0x1p120f));
    return _mm512_maskz_mul_ps(m, v, _mm512_set1_ps(s));
}

// Does the block rows [r0, r0 + nr) × cols [c0, c0 + nc) of an FP8 view hold a NaN code?
AVX512 static int fp8_block_has_nan(const MatView *w, int r0, int nr, int c0, int nc) {
    __m512i seen = _mm512_setzero_si512();
    const __m512i sign = _mm512_set1_epi8((char)0x80);
    for (int r = 0; r < nr; r++) {
        const char *p = (const char *)w->data + (size_t)(r0 + r) * w->cols + c0;
        for (int c = 0; c < nc; c += 64) {
            __mmask64 m = nc - c >= 64 ? ~0ull : (1ull << (nc - c)) - 1;
            seen = _mm512_max_epu8(seen, _mm512_or_si512(_mm512_maskz_loadu_epi8(m, p + c), sign));
        }
    }
    return _mm512_cmpeq_epi8_mask(seen, _mm512_set1_epi8((char)0xff)) != 0;
}

// Packs W rows [f, f + nf) × cols [k0, k0 + kc) (out = x · Wᵀ) as panels of NR features:
// bp[p][k][j] = W[f + 32p + j][k0 + k], zero past nf. 16 × 16 blocks are widened row by row and
// transposed in registers.
AVX512_INLINE void pack_w_nt(const int kind, float *bp, const MatView *w, int f, int nf, int k0, int kc, int split) {
    const size_t esz = elem_size(kind);
    const float pre = split ? 1.0f : 0x1p120f;
    for (int p = 0; p * NR < nf; p++)
        for (int h = 0; h < 2; h++) {
            int r0 = f + p * NR + h * 16, nrow = nf - (p * NR + h * 16);
            if (nrow > 16) nrow = 16;
            const char *rows[16];
            const float *srows[16];
            for (int i = 0; i < 16; i++) {
                rows[i] = (const char *)w->data + (size_t)(r0 + i) * w->cols * esz;
                if (kind == W_FP8 && i < nrow) srows[i] = scale_row(w, r0 + i);
            }
            for (int kk = 0; kk < kc; kk += 16) {
                __mmask16 m = tail_mask(kc - kk);
                int cb = kind == W_FP8 ? (k0 + kk) / w->block : 0;
                __m512 v[16];
                // The rows of a panel are many short streams that the hardware prefetchers do not
                // follow: fetch the next slice of each row while this one is packed.
#pragma GCC unroll 16
                for (int i = 0; i < 16; i++)
                    if (i < nrow) _mm_prefetch(rows[i] + (size_t)(k0 + kc + kk) * esz, _MM_HINT_T0);
#pragma GCC unroll 16
                for (int i = 0; i < 16; i++)
                    v[i] = i < nrow ? wdequant(kind, rows[i], k0 + kk, m, kind == W_FP8 ? srows[i][cb] * pre : 0.0f, split)
                                    : _mm512_setzero_ps();
                transpose16(v);
                float *dst = bp + (size_t)p * NR * kc + (size_t)kk * NR + h * 16;
                if (kc - kk >= 16) {
#pragma GCC unroll 16
                    for (int k = 0; k < 16; k++) _mm512_storeu_ps(dst + (size_t)k * NR, v[k]);
                } else {
#pragma GCC unroll 16
                    for (int k = 0; k < 16; k++)
                        if (k < kc - kk) _mm512_storeu_ps(dst + (size_t)k * NR, v[k]);
                }
            }
        }
}

// Packs W rows [k0, k0 + kc) × cols [f, f + nf) (out = x · W): bp[p][k][j] = W[k0 + k][f + 32p + j].
AVX512_INLINE void pack_w_nn(const int kind, float *bp, const MatView *w, int f, int nf, int k0, int kc, int split) {
    const size_t esz = elem_size(kind);
    const float pre = split ? 1.0f : 0x1p120f;
    for (int p = 0; p * NR < nf; p++) {
        int c = f + p * NR, n = nf - p * NR;
        __mmask16 m0 = tail_mask(n), m1 = tail_mask(n > 16 ? n - 16 : 0);
        // block is 0 for unscaled weights: the scale columns are only read for FP8
        int cb0 = w->block ? c / w->block : 0, cb1 = w->block ? (c + 16) / w->block : 0;
        for (int k = 0; k < kc; k++) {
            const char *row = (const char *)w->data + (size_t)(k0 + k) * w->cols * esz;
            const float *sr = kind == W_FP8 ? scale_row(w, k0 + k) : NULL;
            // the next panel's part of this row, which the hardware prefetchers would not foresee
            _mm_prefetch(row + (size_t)(c + NR) * esz, _MM_HINT_T0);
            float *dst = bp + (size_t)p * NR * kc + (size_t)k * NR;
            _mm512_storeu_ps(dst, wdequant(kind, row, c, m0, kind == W_FP8 ? sr[cb0] * pre : 0.0f, split));
            _mm512_storeu_ps(dst + 16, m1 ? wdequant(kind, row, c + 16, m1, kind == W_FP8 ? sr[cb1] * pre : 0.0f, split)
                                          : _mm512_setzero_ps());
        }
    }
}

AVX512 static void pack_w(float *bp, const MatView *w, int transpose_w, int f, int nf, int k0, int kc, int split) {
    switch (weight_kind(w->dtype) * 2 + (transpose_w != 0)) {
    case W_F32 * 2: pack_w_nn(W_F32, bp, w, f, nf, k0, kc, 0); break;
    case W_F32 * 2 + 1: pack_w_nt(W_F32, bp, w, f, nf, k0, kc, 0); break;
    case W_BF16 * 2: pack_w_nn(W_BF16, bp, w, f, nf, k0, kc, 0); break;
    case W_BF16 * 2 + 1: pack_w_nt(W_BF16, bp, w, f, nf, k0, kc, 0); break;
    case W_F16 * 2: pack_w_nn(W_F16, bp, w, f, nf, k0, kc, 0); break;
    case W_F16 * 2 + 1: pack_w_nt(W_F16, bp, w, f, nf, k0, kc, 0); break;
    case W_FP8 * 2: pack_w_nn(W_FP8, bp, w, f, nf, k0, kc, split); break;
    default: pack_w_nt(W_FP8, bp, w, f, nf, k0, kc, split); break;
    }
    if (w->dtype != DT_F8_E4M3) return;
    // NaN codes (S.1111.111) are rare enough to be found by a scan and patched in afterwards.
    int has_nan = transpose_w ? fp8_block_has_nan(w, f, nf, k0, kc) : fp8_block_has_nan(w, k0, kc, f, nf);
    if (!has_nan) return;
    const uint8_t *d = w->data;
    for (int j = 0; j < nf; j++)
        for (int k = 0; k < kc; k++) {
            size_t at = transpose_w ? (size_t)(f + j) * w->cols + k0 + k : (size_t)(k0 + k) * w->cols + f + j;
            if ((d[at] & 0x7f) == 0x7f) bp[(size_t)(j / NR) * NR * kc + (size_t)k * NR + j % NR] = NAN;
        }
}

// Activation rows [0, mc) × [k0, k0 + kc) as tiles of MR rows: xp[t][k][i] = x[MR t + i][k0 + k]
// (the last tile has mc - MR t rows and that stride). A tile's rows go 16 columns at a time through
// a register transpose: a scalar loop of one load and one store per element cost a third of an
// attention weighted sum, whose activation operand (the probabilities) is used for only 64 columns.
AVX512 static void pack_x(float *xp, const float *x, int ldx, int mc, int k0, int kc) {
    for (int t = 0; t * MR < mc; t++) {
        int mr = mc - t * MR < MR ? mc - t * MR : MR;
        float *dst = xp + (size_t)t * MR * kc;
        const float *src = x + (size_t)t * MR * ldx + k0;
        __mmask16 rows = tail_mask(mr);
        for (int kk = 0; kk < kc; kk += 16) {
            __mmask16 m = tail_mask(kc - kk);
            __m512 v[16];
#pragma GCC unroll 16
            for (int i = 0; i < 16; i++)
                v[i] = i < mr ? _mm512_maskz_loadu_ps(m, src + (size_t)i * ldx + kk) : _mm512_setzero_ps();
            transpose16(v);  // v[k]: column kk + k of the tile's rows
            int n = kc - kk < 16 ? kc - kk : 16;
#pragma GCC unroll 16
            for (int k = 0; k < 16; k++)
                if (k < n) _mm512_mask_storeu_ps(dst + (size_t)(kk + k) * mr, rows, v[k]);
        }
    }
}

// c[i][0..32) (= or +=) Σ_k xp[k][i] · bp[k][0..32) for i < MR_; m0, m1 mask the features kept.
AVX512_INLINE void micro_tile(const int MR_, int kc, const float *xp, const float *bp, float *c, int ldc,
                              __mmask16 m0, __mmask16 m1, int add) {
    __m512 acc[MR][2];
#pragma GCC unroll 12
    for (int i = 0; i < MR_; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int k = 0; k < kc; k++) {
        __m512 b0 = _mm512_loadu_ps(bp + (size_t)k * NR), b1 = _mm512_loadu_ps(bp + (size_t)k * NR + 16);
#pragma GCC unroll 12
        for (int i = 0; i < MR_; i++) {
            __m512 a = _mm512_set1_ps(xp[(size_t)k * MR_ + i]);
            acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
        }
    }
#pragma GCC unroll 12
    for (int i = 0; i < MR_; i++) {
        float *ci = c + (size_t)i * ldc;
        if (add) {
            acc[i][0] = _mm512_add_ps(acc[i][0], _mm512_maskz_loadu_ps(m0, ci));
            acc[i][1] = _mm512_add_ps(acc[i][1], _mm512_maskz_loadu_ps(m1, ci + 16));
        }
        _mm512_mask_storeu_ps(ci, m0, acc[i][0]);
        _mm512_mask_storeu_ps(ci + 16, m1, acc[i][1]);
    }
}

AVX512 static void micro(int mr, int kc, const float *xp, const float *bp, float *c, int ldc, __mmask16 m0,
                         __mmask16 m1, int add) {
    switch (mr) {
    case 1: micro_tile(1, kc, xp, bp, c, ldc, m0, m1, add); break;
    case 2: micro_tile(2, kc, xp, bp, c, ldc, m0, m1, add); break;
    case 3: micro_tile(3, kc, xp, bp, c, ldc, m0, m1, add); break;
    case 4: micro_tile(4, kc, xp, bp, c, ldc, m0, m1, add); break;
    case 5: micro_tile(5, kc, xp, bp, c, ldc, m0, m1, add); break;
    case 6: micro_tile(6, kc, xp, bp, c, ldc, m0, m1, add); break;
    case 7: micro_tile(7, kc, xp, bp, c, ldc, m0, m1, add); break;
    case 8: micro_tile(8, kc, xp, bp, c, ldc, m0, m1, add); break;
    case 9: micro_tile(9, kc, xp, bp, c, ldc, m0, m1, add); break;
    case 10: micro_tile(10, kc, xp, bp, c, ldc, m0, m1, add); break;
    case 11: micro_tile(11, kc, xp, bp, c, ldc, m0, m1, add); break;
    default: micro_tile(12, kc, xp, bp, c, ldc, m0, m1, add); break;
    }
}

AVX512 int gemm_avx512(float *out, const float *x, const MatView *w, int N, int transpose_w, int f_begin,
                       int f_end) {
    if (f_end <= f_begin) return 0;
    const int K = transpose_w ? w->cols : w->rows, F = transpose_w ? w->rows : w->cols;
    const int split = fp8_scales_need_split(w);
    float *bp = kernels_scratch((size_t)(FB + MC) * KC);
    if (!bp) return -1;
    float *xp = bp + (size_t)FB * KC;
    for (int n0 = 0; n0 < N; n0 += MC) {
        int mc = N - n0 < MC ? N - n0 : MC;
        for (int k0 = 0; k0 < K; k0 += KC) {
            int kc = K - k0 < KC ? K - k0 : KC;
            pack_x(xp, x + (size_t)n0 * K, K, mc, k0, kc);
            for (int fb = f_begin; fb < f_end; fb += FB) {
                int nf = f_end - fb < FB ? f_end - fb : FB;
                pack_w(bp, w, transpose_w, fb, nf, k0, kc, split);
                for (int t = 0; t * MR < mc; t++) {
                    int mr = mc - t * MR < MR ? mc - t * MR : MR;
                    for (int p = 0; p * NR < nf; p++) {
                        int n = nf - p * NR;
                        micro(mr, kc, xp + (size_t)t * MR * kc, bp + (size_t)p * NR * kc,
                              out + (size_t)(n0 + t * MR) * F + fb + p * NR, F, tail_mask(n), tail_mask(n > 16 ? n - 16 : 0),
                              k0 > 0);
                    }
                }
            }
        }
    }
    return 0;
}

// ---- fp32 products on a right operand packed once (gemm_avx512's panels, kept) ----
// Slice s (KC deep, the last kc_s = K - KC s) of W holds its ceil(F / NR) panels one after
// another, each NR × kc_s: features f of slice s at bp + s · KC · Fp + (f / NR) · NR · kc_s.

static size_t panels_fp(int F) { return (size_t)(F + NR - 1) / NR * NR; }

size_t f32_panels_floats(int F, int K) { return panels_fp(F) * (size_t)K; }

AVX512 void f32_panels_pack(float *bp, const MatView *w, int transpose_w, int F, int K) {
    const size_t Fp = panels_fp(F);
    for (int k0 = 0; k0 < K; k0 += KC) {
        int kc = K - k0 < KC ? K - k0 : KC;
        for (int fb = 0; fb < F; fb += FB)
            pack_w(bp + (size_t)k0 * Fp + (size_t)fb * kc, w, transpose_w, fb, F - fb < FB ? F - fb : FB, k0, kc, 0);
    }
}

AVX512 int f32_panels_product(float *out, int ldo, const float *x, int ldx, int N, const float *bp, int F, int K,
                              int f_end, int k_end) {
    const size_t Fp = panels_fp(F);
    float *xp = kernels_scratch((size_t)MC * KC);
    if (!xp) return -1;
    for (int n0 = 0; n0 < N; n0 += MC) {
        int mc = N - n0 < MC ? N - n0 : MC;
        for (int k0 = 0; k0 < k_end; k0 += KC) {
            int kc = k_end - k0 < KC ? k_end - k0 : KC, kc_s = K - k0 < KC ? K - k0 : KC;  // (used, as packed)
            pack_x(xp, x + (size_t)n0 * ldx, ldx, mc, k0, kc);
            const float *bs = bp + (size_t)k0 * Fp;
            for (int t = 0; t * MR < mc; t++) {
                int mr = mc - t * MR < MR ? mc - t * MR : MR;
                for (int p = 0; p * NR < f_end; p++) {
                    int n = f_end - p * NR;
                    micro(mr, kc, xp + (size_t)t * MR * kc, bs + (size_t)p * NR * kc_s,
                          out + (size_t)(n0 + t * MR) * ldo + p * NR, ldo, tail_mask(n), tail_mask(n > 16 ? n - 16 : 0),
                          k0 > 0);
                }
            }
        }
    }
    return 0;
}
