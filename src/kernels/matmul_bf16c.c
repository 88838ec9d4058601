// BF16 compute of the x · Wᵀ products (MatView.compute_bf16; `--compute bf16`): each activation
// rounded to BF16 (nearest even), each weight taken as a BF16 value — BF16 as stored, F32 and F16
// rounded to nearest even, FP8 E4M3 exactly (every E4M3 value is a BF16 value) with its block scale
// applied in fp32 to each 128-column chunk's sum — and the products summed in fp32: on AVX512_BF16
// dot products where the CPU has them, else the same arithmetic in portable C.
//
// Order of the sums, fixed per output element whatever the number of activation rows, the other
// rows and the thread split (batch invariance; one order for prefill, decode and verification):
// the columns go in steps of 32, one 16-lane dot product each, lane i adding its two columns'
// products (the odd one first, as the instruction does) to its running sum; FP8: the sum restarts
// at every 128-column chunk (four steps) and each chunk's lane sums × the chunk's scale are added
// (fused) to the lane totals. The 16 lanes are then folded in halves (lane i + lane i + 8, then + 4,
// + 2, + 1). One running sum per output element: the instruction latency is hidden by the other
// elements of a tile (16 weight rows in a decode step), not by splitting an element's sum.
// Which columns a lane holds depends on the weight type (step_column): FP8 codes are widened 64
// at a time by byte table look-ups whose unpacking interleaves groups of 8 columns, and the
// activations are laid out the same way, so that a code costs a few byte shuffles, not arithmetic.
//
// The portable path follows the same order with the instruction's documented arithmetic (each
// product exact in fp32, each add rounded): the same bits (tests/test_bf16c.c), except where the
// instruction treats a subnormal BF16 input as zero or flushes a subnormal sum.
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "kernels/avx512_util.h"
#include "kernels/convert.h"
#include "kernels/kernels_cpu.h"
#include "kernels/matmul.h"
#include "kernels/weight_words.h"

// Weight rows widened (or copied) into scratch at a time.
#define BF16C_ROW_BLOCK 16
// BF16 weights are read where they lie. For up to this many activation rows each weight row goes
// against all of them, row after row (bandwidth-bound: one stream for the prefetchers); beyond,
// the tiles interleave a block of 16 rows, each weight vector reused across several activation
// rows (compute-bound). (Copying the block into scratch first, as FP8 widens it, cost 15-35% at
// 8-16 rows: one thread, 512x512 N=8 122 -> 167 GFLOP/s, N=16 144 -> 169.)
#define BF16C_DIRECT_MAX_N 4
// FP8 codes are widened in registers for up to this many activation rows (each code once, for all);
// beyond, a block of rows is widened once into scratch and read back for every activation row.
#define BF16C_FP8_INREG_MAX_N 4
// FP8 codes widened in registers go two rows at a time below this many columns, one row at a time
// from it: two interleaved streams of short rows read as one, but rows of 2 KB and more make each
// pair two new short streams that the prefetchers keep re-learning (one thread, N = 1, matrices
// streamed from memory: 512 x 2048 10.0 -> 19.0 GB/s, 2048 x 7168 (a V3 expert) 11.7 -> 15.6;
// 256 x 512 stays with pairs, 17.8 against 15.8 one at a time).
#define BF16C_PAIR_MAX_COLS 1024

// E4M3 code → its value as BF16 (exact; the NaN codes S.1111.111 → a NaN), and the two bytes of
// the positive codes' values for the byte look-ups.
static uint16_t fp8_bf16[256];
static uint8_t fp8_bf16_lo[128], fp8_bf16_hi[128];
static pthread_once_t tables_once = PTHREAD_ONCE_INIT;

static void tables_init(void) {
    for (int c = 0; c < 256; c++) {
        fp8_bf16[c] = (c & 0x7f) == 0x7f ? (uint16_t)(0x7fc0 | (c & 0x80) << 8) : bf16_from_f32(fp8_e4m3_to_f32((uint8_t)c));
        if (c < 128) fp8_bf16_lo[c] = (uint8_t)fp8_bf16[c], fp8_bf16_hi[c] = (uint8_t)(fp8_bf16[c] >> 8);
    }
}

// The column that lane `lane` of step s multiplies in its `half` (0: the even word, 1: the odd).
// Natural layout (BF16, F32, F16): step s holds columns 32s .. 32s + 31 in order. FP8 layout: in
// 64-column group g, step 2g holds in lane 4q + k the columns 64g + 16q + 2k (+1), step 2g + 1 the
// same + 8 (the byte unpacking of 128-bit lanes).
static int step_column(int fp8, int s, int lane, int half) {
    if (!fp8) return 32 * s + 2 * lane + half;
    return 64 * (s / 2) + 16 * (lane / 4) + 8 * (s % 2) + 2 * (lane % 4) + half;
}

static int step_count(int fp8, int cols) { return fp8 ? 2 * ((cols + 63) / 64) : (cols + 31) / 32; }

// The BF16 value weight (r, c) is taken as, in fp32 (FP8: the code's value, before the scale).
static float weight_bf16(const MatView *w, int r, int c) {
    size_t i = (size_t)r * w->cols + c;
    switch (w->dtype) {
    case DT_F32: return bf16_to_f32(bf16_from_f32(((const float *)w->data)[i]));
    case DT_BF16: return bf16_to_f32(((const uint16_t *)w->data)[i]);
    case DT_F16: return bf16_to_f32(bf16_from_f32(f16_to_f32(((const uint16_t *)w->data)[i])));
    default: return bf16_to_f32(fp8_bf16[((const uint8_t *)w->data)[i]]);
    }
}

static float fp8_scale(const MatView *w, int r, int chunk) {
    return w->scale_inv[(size_t)((w->row0 + r) / w->block) * w->scale_cols + chunk];
}

// The 16 lane sums folded in halves.
static float fold_lanes(const float l[16]) {
    float a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) a[i] = l[i] + l[i + 8];
    for (int i = 0; i < 4; i++) b[i] = a[i] + a[i + 4];
    for (int i = 0; i < 2; i++) c[i] = b[i] + b[i + 2];
    return c[0] + c[1];
}

static void bf16c_rows_portable(float *out, int ldo, const float *x, int ldx, int N, const MatView *w, int r0,
                                int r1) {
    const int cols = w->cols, fp8 = w->dtype == DT_F8_E4M3, steps = step_count(fp8, cols);
    for (int n = 0; n < N; n++)
        for (int r = r0; r < r1; r++) {
            const float *xn = x + (size_t)n * ldx;
            float lane[16] = {0}, chunk[16] = {0}, *acc = fp8 ? chunk : lane;
            for (int s = 0; s < steps; s++) {
                if (fp8 && s % 4 == 0) memset(chunk, 0, sizeof chunk);
                for (int i = 0; i < 16; i++) {
                    float p[2];
                    for (int h = 0; h < 2; h++) {
                        int c = step_column(fp8, s, i, h);
                        p[h] = c < cols ? weight_bf16(w, r, c) * bf16_to_f32(bf16_from_f32(xn[c])) : 0.0f;
                    }
                    acc[i] = (acc[i] + p[1]) + p[0];
                }
                if (fp8 && (s % 4 == 3 || s == steps - 1)) {
                    float sc = fp8_scale(w, r, s / 4);
                    for (int i = 0; i < 16; i++) lane[i] = fmaf(chunk[i], sc, lane[i]);
                }
            }
            out[(size_t)n * ldo + r] = fold_lanes(lane);
        }
}

// ---- AVX512_BF16 with AVX512_VBMI's byte look-ups (Zen 4, Sapphire Rapids and later) ----
// (fp8_widen64, weight_words.h: the codes' BF16 values in the FP8 layout, two steps at a time)
#define BF16C AVX512BF16_VBMI
#define BF16C_INLINE AVX512BF16_VBMI_INLINE

// The operands of a tile. Weights: BF16 rows (wb, row stride wld elements, in the view's layout;
// masked past cols when they are the view's own rows) or, in_reg, FP8 codes (codes, row stride
// cld bytes). xb: BF16 activations, row stride kpad, zero past cols. Rows past nr (weights) and
// nc (activations) repeat the last one: computed, not stored.
typedef struct Tile {
    const uint16_t *wb;
    size_t wld;
    const uint8_t *codes;
    size_t cld;
    const uint16_t *xb;
    int kpad, cols, nr, nc;
    const MatView *w;  // FP8: the scales; r: the tile's first row in w
    int r;
    int in_order;      // weights from memory (their own rows): read row after row, not interleaved
    size_t prefetch;   // bytes ahead of a weight row's position to prefetch (in order: a few KB; else the
                       // next block of rows, on the first pass over the block); 0: none
    float *out;        // element (row i, activation j) at out[j * ldo + i]
    int ldo;
} Tile;

// A tile's R × C sums (element (i, j) in v[i * C + j]) folded and stored: activation row j's R
// outputs are contiguous in out.
BF16C_INLINE void tile_store(const int R, const int C, const Tile *t, const __m512 v[16]) {
    int idx[16] = {0};
#pragma GCC unroll 16
    for (int e = 0; e < R * C; e++) idx[(e % C) * R + e / C] = 4 * (e % 4) + e / 4;  // fold16_ps's lane of v[e]
    float sum[32];
    _mm512_storeu_ps(sum, _mm512_permutexvar_ps(_mm512_loadu_si512(idx), fold16_ps(v)));
    __mmask16 m = tail_mask(t->nr);
    for (int j = 0; j < t->nc; j++) _mm512_mask_storeu_ps(t->out + (size_t)j * t->ldo, m, _mm512_loadu_ps(sum + j * R));
}

// R weight rows × C activation rows, BF16 weights in the natural layout.
BF16C_INLINE void tile_bf16(const int R, const int C, const Tile *t) {
    __m512 acc[16];
#pragma GCC unroll 16
    for (int e = 0; e < 16; e++) acc[e] = _mm512_setzero_ps();
    const uint16_t *wr[16];
#pragma GCC unroll 16
    for (int i = 0; i < R; i++) wr[i] = t->wb + (size_t)(i < t->nr ? i : t->nr - 1) * t->wld;
    const int steps = (t->cols + 31) / 32, full = t->cols / 32;
    const uint16_t *xr[4];
#pragma GCC unroll 4
    for (int j = 0; j < C; j++) xr[j] = t->xb + (size_t)(j < t->nc ? j : t->nc - 1) * t->kpad;
    if (t->in_order)  // weights from memory: row after row, so that memory is read in order
#pragma GCC unroll 16
        for (int i = 0; i < R; i++) {
            for (int s = 0; s < full; s++) {
                if (t->prefetch) _mm_prefetch((const char *)(wr[i] + 32 * s) + t->prefetch, _MM_HINT_T0);
                __m512bh wv = (__m512bh)_mm512_loadu_si512(wr[i] + 32 * s);
#pragma GCC unroll 4
                for (int j = 0; j < C; j++)
                    acc[i * C + j] = _mm512_dpbf16_ps(acc[i * C + j], wv, (__m512bh)_mm512_loadu_si512(xr[j] + 32 * s));
            }
            if (full < steps) {
                __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16((1u << (t->cols - 32 * full)) - 1, wr[i] + 32 * full);
#pragma GCC unroll 4
                for (int j = 0; j < C; j++)
                    acc[i * C + j] = _mm512_dpbf16_ps(acc[i * C + j], wv, (__m512bh)_mm512_loadu_si512(xr[j] + 32 * full));
            }
        }
    else
    for (int s = 0; s < steps; s++) {
        __mmask32 m = s < full ? 0xffffffffu : (1u << (t->cols - 32 * s)) - 1;
        __m512bh xv[4];
#pragma GCC unroll 4
        for (int j = 0; j < C; j++) xv[j] = (__m512bh)_mm512_loadu_si512(xr[j] + 32 * s);
#pragma GCC unroll 16
        for (int i = 0; i < R; i++) {
            if (t->prefetch) _mm_prefetch((const char *)(wr[i] + 32 * s) + t->prefetch, _MM_HINT_T0);
            __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, wr[i] + 32 * s);
#pragma GCC unroll 4
            for (int j = 0; j < C; j++) acc[i * C + j] = _mm512_dpbf16_ps(acc[i * C + j], wv, xv[j]);
        }
    }
    tile_store(R, C, t, acc);
}

// The scaled sums of one 128-column chunk (steps s0 .. s0 + n - 1) of a tile whose FP8 weights
// were widened into scratch: acc restarted, then × each row's scale into tot.
#define FP8_CHUNK_STEPS(NSTEPS)                                                                     \
    do {                                                                                            \
        _Pragma("GCC unroll 16") for (int e = 0; e < R * C; e++) acc[e] = _mm512_setzero_ps();      \
        _Pragma("GCC unroll 4") for (int s = s0; s < s0 + (NSTEPS); s++) {                          \
            __m512bh xv[4];                                                                         \
            _Pragma("GCC unroll 4") for (int j = 0; j < C; j++) xv[j] =                             \
                (__m512bh)_mm512_loadu_si512(t->xb + (size_t)(j < t->nc ? j : t->nc - 1) * t->kpad + 32 * s); \
            _Pragma("GCC unroll 16") for (int i = 0; i < R; i++) {                                  \
                __m512bh wv = (__m512bh)_mm512_loadu_si512(t->wb + rows[i] * t->wld + 32 * s);      \
                _Pragma("GCC unroll 4") for (int j = 0; j < C; j++) acc[i * C + j] =                \
                    _mm512_dpbf16_ps(acc[i * C + j], wv, xv[j]);                                    \
            }                                                                                       \
        }                                                                                           \
    } while (0)

// R weight rows × C activation rows, FP8 weights (IN_REG: codes widened here, else BF16 values in
// the FP8 layout in scratch, where step s is at 32 s), each 128-column chunk's sums scaled into
// the totals.
BF16C_INLINE void tile_fp8(const int R, const int C, const int IN_REG, const Tile *t) {
    __m512 tot[16], acc[16];
#pragma GCC unroll 16
    for (int e = 0; e < 16; e++) tot[e] = _mm512_setzero_ps();
    __m512i tab[4];
    if (IN_REG)
        for (int k = 0; k < 2; k++)
            tab[k] = _mm512_loadu_si512(fp8_bf16_lo + 64 * k), tab[2 + k] = _mm512_loadu_si512(fp8_bf16_hi + 64 * k);
    int rows[16];
#pragma GCC unroll 16
    for (int i = 0; i < R; i++) rows[i] = i < t->nr ? i : t->nr - 1;
    const int groups = (t->cols + 63) / 64, steps = 2 * groups;
    const float *srow[16];
#pragma GCC unroll 16
    for (int i = 0; i < R; i++)
        srow[i] = t->w->scale_inv + (size_t)((t->w->row0 + t->r + rows[i]) / t->w->block) * t->w->scale_cols;
    if (C == 1 || IN_REG) {  // weights from memory (codes) or one activation row: row after row
        const int whole = IN_REG ? t->cols / 128 * 2 : 0;  // groups in whole 128-column chunks
        // the bulk without masks, whole chunks: two short rows at a time for one or two activation
        // rows (two or four chains in flight), else one row at a time
        const int HR = C <= 2 && t->cols < BF16C_PAIR_MAX_COLS ? 2 : 1;
#pragma GCC unroll 8
        for (int i = 0; i < R; i += HR)
            if (IN_REG)
                for (int g0 = 0; g0 < whole; g0 += 2) {
                    __m512 a[2][4];
#pragma GCC unroll 2
                    for (int h = 0; h < HR; h++) {
                        const uint8_t *p = t->codes + rows[i + h] * t->cld + 64 * g0;
                        if (t->prefetch) {
                            _mm_prefetch((const char *)p + t->prefetch, _MM_HINT_T0);
                            _mm_prefetch((const char *)p + 64 + t->prefetch, _MM_HINT_T0);
                        }
                        __m512i w[4];
                        fp8_widen64(_mm512_loadu_si512(p), tab, &w[0], &w[1]);
                        fp8_widen64(_mm512_loadu_si512(p + 64), tab, &w[2], &w[3]);
#pragma GCC unroll 4
                        for (int j = 0; j < C; j++) {
                            const uint16_t *xr = t->xb + (size_t)(j < t->nc ? j : t->nc - 1) * t->kpad + 64 * g0;
                            a[h][j] = _mm512_setzero_ps();
#pragma GCC unroll 4
                            for (int k = 0; k < 4; k++)
                                a[h][j] = _mm512_dpbf16_ps(a[h][j], (__m512bh)w[k], (__m512bh)_mm512_loadu_si512(xr + 32 * k));
                        }
                    }
#pragma GCC unroll 2
                    for (int h = 0; h < HR; h++) {
                        __m512 sc = _mm512_set1_ps(srow[i + h][g0 / 2]);
#pragma GCC unroll 4
                        for (int j = 0; j < C; j++) tot[(i + h) * C + j] = _mm512_fmadd_ps(a[h][j], sc, tot[(i + h) * C + j]);
                    }
                }
#pragma GCC unroll 16
        for (int i = 0; i < R; i++)
            for (int g0 = whole; g0 < groups; g0 += 2) {
                __m512 a[4];
#pragma GCC unroll 4
                for (int j = 0; j < C; j++) a[j] = _mm512_setzero_ps();
                for (int g = g0; g < g0 + 2 && g < groups; g++) {
                    __m512i wa, wb;
                    if (IN_REG) {
                        const uint8_t *p = t->codes + rows[i] * t->cld + 64 * g;
                        if (t->prefetch) _mm_prefetch((const char *)p + t->prefetch, _MM_HINT_T0);
                        int left = t->cols - 64 * g;
                        fp8_widen64(_mm512_maskz_loadu_epi8(left >= 64 ? ~0ull : (1ull << left) - 1, p), tab, &wa, &wb);
                    } else {
                        wa = _mm512_loadu_si512(t->wb + rows[i] * t->wld + 64 * g);
                        wb = _mm512_loadu_si512(t->wb + rows[i] * t->wld + 64 * g + 32);
                    }
#pragma GCC unroll 4
                    for (int j = 0; j < C; j++) {
                        const uint16_t *xr = t->xb + (size_t)(j < t->nc ? j : t->nc - 1) * t->kpad + 64 * g;
                        a[j] = _mm512_dpbf16_ps(a[j], (__m512bh)wa, (__m512bh)_mm512_loadu_si512(xr));
                        a[j] = _mm512_dpbf16_ps(a[j], (__m512bh)wb, (__m512bh)_mm512_loadu_si512(xr + 32));
                    }
                }
                __m512 sc = _mm512_set1_ps(srow[i][g0 / 2]);
#pragma GCC unroll 4
                for (int j = 0; j < C; j++) tot[i * C + j] = _mm512_fmadd_ps(a[j], sc, tot[i * C + j]);
            }
    } else {  // weights widened into scratch, many activation rows: each weight vector for C of them
        for (int s0 = 0; s0 < steps; s0 += 4) {
            if (s0 + 4 <= steps) FP8_CHUNK_STEPS(4);
            else FP8_CHUNK_STEPS(2);  // (steps is even)
#pragma GCC unroll 16
            for (int i = 0; i < R; i++) {
                __m512 sc = _mm512_set1_ps(srow[i][s0 / 4]);
#pragma GCC unroll 4
                for (int j = 0; j < C; j++) tot[i * C + j] = _mm512_fmadd_ps(acc[i * C + j], sc, tot[i * C + j]);
            }
        }
    }
    tile_store(R, C, t, tot);
}
#undef FP8_CHUNK_STEPS

// One row of FP8 codes (p) against one activation row (xb, in the FP8 layout): the row's 16 lane
// totals in tile_fp8's order — per 128-column chunk four steps from zero, then × the chunk's scale
// into the totals; a last partial chunk in masked groups of 64. The decode steps' product (one
// activation row), read from the row's start to its end. A chunk's four steps are one dependent
// chain, so four chunks go at once (four chains in flight; their scaled sums still join the totals
// in chunk order): one thread, a 768 x 1024 matrix in cache, 26-34 -> 47-53 GB/s of codes.
#define FP8_ROW_CHUNKS 4
// One 128-column chunk of the row: its four steps from zero (one dependent chain).
BF16C_INLINE __m512 fp8_chunk_dot(const uint8_t *c, const uint16_t *xr, const __m512i tab[4], size_t prefetch) {
    if (prefetch) {
        _mm_prefetch((const char *)c + prefetch, _MM_HINT_T0);
        _mm_prefetch((const char *)c + 64 + prefetch, _MM_HINT_T0);
    }
    __m512i w[4];
    fp8_widen64(_mm512_loadu_si512(c), tab, &w[0], &w[1]);
    fp8_widen64(_mm512_loadu_si512(c + 64), tab, &w[2], &w[3]);
    __m512 a = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int k = 0; k < 4; k++) a = _mm512_dpbf16_ps(a, (__m512bh)w[k], (__m512bh)_mm512_loadu_si512(xr + 32 * k));
    return a;
}

BF16C_INLINE __m512 fp8_row_dot(const uint8_t *p, const uint16_t *xb, int cols, const float *scales,
                                const __m512i tab[4], size_t prefetch) {
    __m512 tot = _mm512_setzero_ps();
    const int whole = cols / 128, groups = (cols + 63) / 64;
    int q = 0;
    for (; q + FP8_ROW_CHUNKS <= whole; q += FP8_ROW_CHUNKS) {
        __m512 a[FP8_ROW_CHUNKS];
#pragma GCC unroll 4
        for (int u = 0; u < FP8_ROW_CHUNKS; u++) a[u] = fp8_chunk_dot(p + 128 * (q + u), xb + 128 * (q + u), tab, prefetch);
#pragma GCC unroll 4
        for (int u = 0; u < FP8_ROW_CHUNKS; u++) tot = _mm512_fmadd_ps(a[u], _mm512_set1_ps(scales[q + u]), tot);
    }
    for (; q < whole; q++)
        tot = _mm512_fmadd_ps(fp8_chunk_dot(p + 128 * q, xb + 128 * q, tab, prefetch), _mm512_set1_ps(scales[q]), tot);
    if (2 * whole < groups) {
        __m512 a = _mm512_setzero_ps();
        for (int g = 2 * whole; g < groups; g++) {
            int left = cols - 64 * g;
            __m512i wa, wb;
            fp8_widen64(_mm512_maskz_loadu_epi8(left >= 64 ? ~0ull : (1ull << left) - 1, p + 64 * g), tab, &wa, &wb);
            a = _mm512_dpbf16_ps(a, (__m512bh)wa, (__m512bh)_mm512_loadu_si512(xb + 64 * g));
            a = _mm512_dpbf16_ps(a, (__m512bh)wb, (__m512bh)_mm512_loadu_si512(xb + 64 * g + 32));
        }
        tot = _mm512_fmadd_ps(a, _mm512_set1_ps(scales[whole]), tot);
    }
    return tot;
}

// Activation rows in BF16 into xb (N × kpad, zero past cols), in the FP8 layout when fp8.
BF16C static void widen_x(uint16_t *xb, int kpad, const float *x, int ldx, int N, int cols, int fp8) {
    __m512i ia = _mm512_setzero_si512(), ib = ia;
    if (fp8) {
        uint16_t a[32], b[32];
        for (int p = 0; p < 32; p++) a[p] = (uint16_t)(16 * (p / 8) + p % 8), b[p] = (uint16_t)(a[p] + 8);
        ia = _mm512_loadu_si512(a), ib = _mm512_loadu_si512(b);
    }
    for (int n = 0; n < N; n++) {
        const float *xr = x + (size_t)n * ldx;
        uint16_t *d = xb + (size_t)n * kpad;
        for (int c = 0; c < kpad; c += 64) {
            __m512i v[2];
            for (int h = 0; h < 2; h++) {
                int b = c + 32 * h;
                __mmask16 ml = tail_mask(cols - b > 0 ? cols - b : 0), mh = tail_mask(cols - b - 16 > 0 ? cols - b - 16 : 0);
                v[h] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(mh, xr + b + 16), _mm512_maskz_loadu_ps(ml, xr + b));
            }
            if (fp8) {
                _mm512_storeu_si512(d + c, _mm512_permutex2var_epi16(v[0], ia, v[1]));
                _mm512_storeu_si512(d + c + 32, _mm512_permutex2var_epi16(v[0], ib, v[1]));
            } else {
                _mm512_storeu_si512(d + c, v[0]);
                if (c + 32 < kpad) _mm512_storeu_si512(d + c + 32, v[1]);
            }
        }
    }
}

// Rows [r, r + nr) of an F32, F16 or FP8 w as BF16 values into wb (nr × kpad, zero past cols), in
// the FP8 layout for FP8 (BF16 rows are read where they lie); the bytes `ahead` past each line read
// prefetched (0: none).
BF16C static void widen_w(uint16_t *wb, int kpad, const MatView *w, int r, int nr, size_t ahead) {
    const int cols = w->cols;
    __m512i tab[4];
    for (int k = 0; k < 2; k++)
        tab[k] = _mm512_loadu_si512(fp8_bf16_lo + 64 * k), tab[2 + k] = _mm512_loadu_si512(fp8_bf16_hi + 64 * k);
    for (int i = 0; i < nr; i++) {
        uint16_t *d = wb + (size_t)i * kpad;
        size_t row = (size_t)(r + i) * cols;
        if (w->dtype == DT_F8_E4M3) {
            const uint8_t *codes = (const uint8_t *)w->data + row;
            for (int c = 0; c < kpad; c += 64) {
                if (ahead) _mm_prefetch((const char *)(codes + c) + ahead, _MM_HINT_T0);
                int left = cols - c;
                __mmask64 m = left >= 64 ? ~0ull : left > 0 ? (1ull << left) - 1 : 0;
                __m512i a, b;
                fp8_widen64(_mm512_maskz_loadu_epi8(m, codes + c), tab, &a, &b);
                _mm512_storeu_si512(d + c, a);
                _mm512_storeu_si512(d + c + 32, b);
            }
            continue;
        }
        for (int c = 0; c < kpad; c += 32) {
            __mmask16 ml = tail_mask(cols - c > 0 ? cols - c : 0), mh = tail_mask(cols - c - 16 > 0 ? cols - c - 16 : 0);
            __m512 lo, hi;
            if (ahead) {  // (a line holds 16 F32 or 32 F16 values)
                const char *p = (const char *)w->data + (row + c) * dtype_size(w->dtype) + ahead;
                _mm_prefetch(p, _MM_HINT_T0);
                if (w->dtype == DT_F32) _mm_prefetch(p + 64, _MM_HINT_T0);
            }
            if (w->dtype == DT_F32) {
                lo = _mm512_maskz_loadu_ps(ml, (const float *)w->data + row + c);
                hi = _mm512_maskz_loadu_ps(mh, (const float *)w->data + row + c + 16);
            } else {  // F16
                lo = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(ml, (const uint16_t *)w->data + row + c));
                hi = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mh, (const uint16_t *)w->data + row + c + 16));
            }
            _mm512_storeu_si512(d + c, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    }
}

// One tile of R rows × C activation rows at rows [r, r + nr) of the block and activation rows
// [n, n + nc): the tile's operands set from the block's.
#define BF16C_TILE(R, C, CALL)                                                                       \
    for (int i0 = 0; i0 < nrb; i0 += (R)) {                                                          \
        Tile u = t;                                                                                  \
        u.nr = nrb - i0 < (R) ? nrb - i0 : (R), u.nc = nc, u.r = rb + i0;                            \
        u.wb = t.wb ? t.wb + (size_t)i0 * t.wld : NULL, u.codes = t.codes ? t.codes + (size_t)i0 * t.cld : NULL; \
        u.xb = xb + (size_t)n0 * kpad, u.out = out + (size_t)n0 * ldo + rb + i0;                     \
        u.in_order = from_memory, u.prefetch = from_memory ? 4096 : n0 == 0 && !widen ? block_bytes : 0; \
        CALL;                                                                                        \
    }

// Rows [r0, r1) of w against N activation rows: the activations widened once, then the weight
// rows in blocks of 16 — each block (FP8 and F32/F16 widened into scratch, BF16 where it lies, or
// FP8 codes widened in registers for up to four activation rows) against every activation row
// while it is in cache, so that a batch reads the weights from memory once.
BF16C static int bf16c_rows_avx512(float *out, int ldo, const float *x, int ldx, int N, const MatView *w, int r0,
                                   int r1) {
    const int cols = w->cols, fp8 = w->dtype == DT_F8_E4M3, kpad = fp8 ? (cols + 63) & ~63 : (cols + 31) & ~31;
    const int in_reg = fp8 && N <= BF16C_FP8_INREG_MAX_N, direct = w->dtype == DT_BF16 && N <= BF16C_DIRECT_MAX_N;
    const int widen = w->dtype != DT_BF16 && !in_reg;  // BF16 rows are used where they lie
    size_t xn = (size_t)N * kpad, wn = widen ? (size_t)BF16C_ROW_BLOCK * kpad : 0;
    uint16_t *xb = (uint16_t *)kernels_scratch((xn + wn) / 2 + 32);  // (N, kpad) BF16, then (16, kpad)
    if (!xb) return -1;
    uint16_t *wb = xb + xn;  // (kpad: a multiple of 32 elements, so 64-byte aligned)
    widen_x(xb, kpad, x, ldx, N, cols, fp8);
    Tile t = {.kpad = kpad, .cols = cols, .w = w, .ldo = ldo};
    __m512i tab[4];  // the E4M3 -> BF16 byte look-ups
    for (int k = 0; k < 2; k++)
        tab[k] = _mm512_loadu_si512(fp8_bf16_lo + 64 * k), tab[2 + k] = _mm512_loadu_si512(fp8_bf16_hi + 64 * k);
    // few activation rows: the weights' own rows are read in memory order, one row after another
    // (the hardware prefetchers follow one stream, not 16 interleaved ones), a few KB ahead
    // prefetched (past the matrix: harmless)
    const int from_memory = direct || in_reg;
    // more activation rows (compute-bound tiles that interleave a block's rows): the next block of
    // rows prefetched while this one is read or widened (its first pass), so that its misses overlap
    // the tiles' arithmetic (one thread, 256 x 512 expert matrices streamed from memory, N = 6 and
    // 16: BF16 7.7-8.3 -> 19.6-20.4 and 6.0-6.2 -> 10.5-10.9 GB/s, FP8 codes 5.0 -> 11.6-12.4 and
    // 3.3 -> 4.7-5.0)
    const size_t block_bytes = (size_t)BF16C_ROW_BLOCK * cols * dtype_size(w->dtype);
    for (int rb = r0; rb < r1; rb += BF16C_ROW_BLOCK) {
        int nrb = r1 - rb < BF16C_ROW_BLOCK ? r1 - rb : BF16C_ROW_BLOCK;
        if (widen) {
            widen_w(wb, kpad, w, rb, nrb, block_bytes);
            t.wb = wb, t.wld = kpad;
        } else if (w->dtype == DT_BF16) {
            t.wb = (const uint16_t *)w->data + (size_t)rb * cols, t.wld = cols;
        } else {
            t.codes = (const uint8_t *)w->data + (size_t)rb * cols, t.cld = cols;
        }
        if (in_reg && N == 1) {  // a decode step's product: row after row, all in registers
            __m512 v[BF16C_ROW_BLOCK];
            for (int i = 0; i < BF16C_ROW_BLOCK; i++) {
                int r = rb + (i < nrb ? i : nrb - 1);
                const float *scales = w->scale_inv + (size_t)((w->row0 + r) >> 7) * w->scale_cols;  // (block 128)
                v[i] = i < nrb ? fp8_row_dot(t.codes + (size_t)i * cols, xb, cols, scales, tab, 4096) : v[nrb - 1];
            }
            Tile u = t;
            u.nr = nrb, u.nc = 1, u.out = out + rb;
            tile_store(BF16C_ROW_BLOCK, 1, &u, v);
            continue;
        }
        for (int n0 = 0; n0 < N;) {
            int nc = N - n0;
            if (!fp8) {
                nc = nc > 4 ? 4 : nc;
                if (nc == 1) BF16C_TILE(16, 1, tile_bf16(16, 1, &u))
                else if (nc == 2) BF16C_TILE(8, 2, tile_bf16(8, 2, &u))
                else BF16C_TILE(4, 4, tile_bf16(4, 4, &u))
            } else {
                if (in_reg) {  // (2 to 4 rows: one row took fp8_row_dot above)
                    nc = nc > 4 ? 4 : nc;
                    if (nc == 2) BF16C_TILE(8, 2, tile_fp8(8, 2, 1, &u))
                    else BF16C_TILE(4, 4, tile_fp8(4, 4, 1, &u))
                } else {
                    nc = nc > 3 ? 3 : nc;
                    if (nc == 1) BF16C_TILE(16, 1, tile_fp8(16, 1, 0, &u))
                    else if (nc == 2) BF16C_TILE(4, 2, tile_fp8(4, 2, 0, &u))
                    else BF16C_TILE(4, 3, tile_fp8(4, 3, 0, &u))
                }
            }
            n0 += nc;
        }
    }
    return 0;
}
#undef BF16C_TILE

int matmul_nt_bf16c(float *out, int ldo, const float *x, int ldx, const MatView *w, int N, int r0, int r1) {
    if (N <= 0 || r1 <= r0) return 0;
    if (w->dtype == DT_F8_E4M3 && (w->block != 128 || !w->scale_inv)) return -1;  // (the release's blocks)
    pthread_once(&tables_once, tables_init);
    if (kernels_cpu_avx512bf16_vbmi()) return bf16c_rows_avx512(out, ldo, x, ldx, N, w, r0, r1);
    bf16c_rows_portable(out, ldo, x, ldx, N, w, r0, r1);
    return 0;
}

int matmul_bf16c_fast(void) { return kernels_cpu_avx512bf16_vbmi(); }

const uint16_t *fp8_bf16_values(void) {
    pthread_once(&tables_once, tables_init);
    return fp8_bf16;
}
