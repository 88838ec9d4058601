// The scores of absorbed attention on AVX-512 (attention.c's latent_scores): every entry's latent
// query and rotary query against a run of cached positions, both halves in one running sum.
//
// Each score is one chain of fused multiply-adds over the 16-value vectors of the latent, then of
// k_pe, and one fold of its 16 lanes (fold16_ps's tree), then × the softmax scale — the same bits
// whatever tile computed it, so however the entries are grouped (a thread's heads, a verify pass's
// rows) a score never changes. A tile is 24 scores: 6 positions × 4 entries (TILE_P). (Zen 4, one thread,
// 8 entries, 128 + 32 values, a chunk in L2: ~71 GFLOP/s; from memory ~61 GFLOP/s = 15 GB/s of
// f32 cache with the prefetch below, against 31-33 for the two products it replaces. 2 × 8 tiles
// were slower. Fourteenth session, the prefetch once per four positions: 32,768 positions from
// memory 88-92 GFLOP/s f32, 118-122 with a BF16 cache; DeepSeek-V3's 128 heads × (512 + 64)
// 115-124 and 145-146. Eighteenth session: an entry's four scores of a tile go out as one
// vector, not four scalars — in L2, per position, 8 entries f32 19.6-28.2 -> 17.4-23.8 ns, BF16
// 17.3-27.2 -> 15.9-23.2; 128 entries f32 326-399 -> 264-343 — and see SCORE_WIDE_ENTRIES.
// Thirty-sixth session, Zen 5: tiles of 6 positions; a BF16 cache's rows requested into L2 in among
// the FMAs and not into L1; see TILE_P and SCORE_PREFETCH_L2_ROWS.)
#include <stdint.h>

#include "kernels/avx512_util.h"
#include "kernels/kernels_cpu.h"

// Cached rows are requested into L2 SCORE_PREFETCH_L2_ROWS positions ahead of the tile that reads
// them (past the run's end: harmless, a prefetch never faults), and an f32 cache's into L1
// SCORE_PREFETCH_ROWS ahead. The L2 requests made a v3-deep FP8 decode step at 576-640 positions
// 3.3% faster (24 of 30 rounds taking turns; 16 sequences at 200-264 positions +3%, 7 of 10); the
// L1 requests helped a cache read from memory by both threads at once (~20 GB/s a thread). On
// Zen 5 a BF16 cache's L1 requests only took issue slots from the loads (without them 1.04-1.09x,
// from memory 1.06x); an f32 cache's rows, twice as long, read from L3 at 0.93x without. A BF16
// cache's L2 requests go a few a step into the FMA loop of the tile of the first group of entries
// (Ahead), not in a burst before the tile: 1.03-1.11x, in L2, L3 and from memory, taking turns
// (an f32 cache's, twice as many with the L1 ones, gained from memory but lost up to 0.80x in
// cache that way; with many entries, widened once a tile, the burst is a small part).
#define SCORE_PREFETCH_ROWS 8
#define SCORE_PREFETCH_L2_ROWS 32

// A BF16 cache's rows are widened into a stack buffer once per four positions, for all groups of
// entries, when there are at least SCORE_WIDE_ENTRIES entries (below, widening each row again for
// each group of four costs less than storing and loading it: one thread, 1,024 positions of
// 128 + 32 values in L2, per position 8 entries 17 -> 22 ns, 16: 33 -> 36; 32: 63 -> 58; 128:
// 270-294 -> 226-249) and the latent and rotary widths fit (DeepSeek-V3's 512 + 64 do).
#define SCORE_WIDE_ENTRIES 32
#define SCORE_WIDE_MAX 1152

// Values [k, k + 16) of a cached row (lanes in m), widened from BF16 when BF.
AVX512_INLINE __m512 cached(const int BF, const void *row, int k, __mmask16 m) {
    if (BF) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)row + k)), 16));
    return _mm512_maskz_loadu_ps(m, (const float *)row + k);
}

// A tile of scores: TILE_P positions × TILE_E entries, every fused multiply-add reading a cached
// vector and a query vector that serve the tile's other side too (loads per FMA 1/E + 1/P). As long
// in positions as the registers allow: 24 sums + 6 cached vectors + a query's. (Zen 5, one thread,
// against 4 × 4 tiles with L1 requests for both caches, the two kernels taking turns, the same
// bits: v3-108m's 4 entries × (128 + 32) values, 576 positions in L2, BF16 1.06x, f32 1.09x;
// 1,024 of 32,768 from L3 1.08x and 1.07x; DeepSeek-V3's 64 entries × (512 + 64) BF16 1.11x, f32
// 1.17x. The loop alone reaches the FMA peak, ~200 GFLOP/s a core; the tiles' set-up, folds and
// stores keep the kernel at 40-85% of it.) score_tile takes TILE_E = 4, an entry per 128-bit lane
// of a fold, and TILE_P <= 8, two folds.
#define TILE_P 6
#define TILE_E 4

// The lines of [p, end) requested into L2 a few at a time over the steps of a loop, in among its
// loads and multiply-adds (p NULL: none).
typedef struct {
    const char *p, *end;
    int per_step;
} Ahead;

static inline Ahead ahead_over(const char *p, size_t bytes, int steps) {
    size_t lines = (bytes + 63) / 64;
    return (Ahead){p, p ? p + bytes : NULL, p ? (int)((lines + steps - 1) / steps) : 0};
}

AVX512_INLINE void ahead_step(Ahead *a) {
    for (int i = 0; i < a->per_step && a->p < a->end; i++, a->p += 64) _mm_prefetch(a->p, _MM_HINT_T1);
}

// Adds q[e] · row[p] over n values into acc[p · TILE_E + e], 16 at a time (a masked tail), the
// lines of ahead requested as it goes.
AVX512_INLINE void score_steps(const int BF, __m512 acc[TILE_P * TILE_E], const float *q[TILE_E],
                               const char *row[TILE_P], int n, Ahead *ahead) {
    int k = 0;
    for (; k + 16 <= n; k += 16) {
        ahead_step(ahead);
        __m512 c[TILE_P];
#pragma GCC unroll 8
        for (int p = 0; p < TILE_P; p++) c[p] = cached(BF, row[p], k, 0xffff);
#pragma GCC unroll 4
        for (int e = 0; e < TILE_E; e++) {
            __m512 qv = _mm512_loadu_ps(q[e] + k);
#pragma GCC unroll 8
            for (int p = 0; p < TILE_P; p++) acc[p * TILE_E + e] = _mm512_fmadd_ps(c[p], qv, acc[p * TILE_E + e]);
        }
    }
    if (k < n) {
        ahead_step(ahead);
        __mmask16 m = tail_mask(n - k);
        __m512 c[TILE_P];
#pragma GCC unroll 8
        for (int p = 0; p < TILE_P; p++) c[p] = cached(BF, row[p], k, m);
#pragma GCC unroll 4
        for (int e = 0; e < TILE_E; e++) {
            __m512 qv = _mm512_maskz_loadu_ps(m, q[e] + k);
#pragma GCC unroll 8
            for (int p = 0; p < TILE_P; p++) acc[p * TILE_E + e] = _mm512_fmadd_ps(c[p], qv, acc[p * TILE_E + e]);
        }
    }
}

// The tile's scores of positions [j, j + np) and entries [e0, e0 + ne) (np <= TILE_P, ne <= TILE_E;
// the rest repeat the last one: computed, not stored).
AVX512_INLINE void score_tile(const int BF, float *s, int lds, const float *qa, const float *qp, int e0, int ne,
                              const char *lat, const char *kpe, int j, int np, int L, int r, float scale,
                              const char *lat_ahead, const char *kpe_ahead) {
    const size_t esz = BF ? 2 : 4;
    const float *qal[TILE_E], *qpl[TILE_E];
    const char *lr[TILE_P], *kr[TILE_P];
#pragma GCC unroll 4
    for (int e = 0; e < TILE_E; e++) {
        int i = e0 + (e < ne ? e : ne - 1);
        qal[e] = qa + (size_t)i * L, qpl[e] = qp + (size_t)i * r;
    }
#pragma GCC unroll 8
    for (int p = 0; p < TILE_P; p++) {
        size_t i = (size_t)j + (p < np ? p : np - 1);
        lr[p] = lat + i * L * esz, kr[p] = kpe + i * r * esz;
    }
    __m512 acc[TILE_P * TILE_E];
#pragma GCC unroll 32
    for (int i = 0; i < TILE_P * TILE_E; i++) acc[i] = _mm512_setzero_ps();
    // (the tile's rows SCORE_PREFETCH_L2_ROWS positions on, where asked)
    const size_t ahead = SCORE_PREFETCH_L2_ROWS;
    Ahead a = ahead_over(lat_ahead ? lat_ahead + ahead * L * esz : NULL, (size_t)TILE_P * L * esz, (L + 15) / 16);
    score_steps(BF, acc, qal, lr, L, &a);
    a = ahead_over(kpe_ahead ? kpe_ahead + ahead * r * esz : NULL, (size_t)TILE_P * r * esz, (r + 15) / 16);
    score_steps(BF, acc, qpl, kr, r, &a);
    // Four positions at a time: fold16_ps puts the sum of acc[16 g + 4 p + e] (position 4 g + p,
    // entry e) in lane 4 e + p, so entry e's four scores are the result's 128-bit lane e, stored
    // from the register. A last group of two positions folds its 8 sums twice over.
#pragma GCC unroll 2
    for (int g = 0; g < (TILE_P + 3) / 4; g++) {
        if (4 * g >= np) break;
        const int sums = TILE_P * TILE_E - 16 * g < 16 ? TILE_P * TILE_E - 16 * g : 16;  // (the group's)
        __m512 v[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) v[i] = acc[16 * g + i % sums];
        __m512 sc = _mm512_mul_ps(fold16_ps(v), _mm512_set1_ps(scale));
        int n4 = np - 4 * g < 4 ? np - 4 * g : 4;
        const __mmask8 pm = (__mmask8)((1u << n4) - 1);
        float *row = s + (size_t)e0 * lds + j + 4 * g;
        _mm_mask_storeu_ps(row, pm, _mm512_castps512_ps128(sc));
        if (ne > 1) _mm_mask_storeu_ps(row + lds, pm, _mm512_extractf32x4_ps(sc, 1));
        if (ne > 2) _mm_mask_storeu_ps(row + 2 * (size_t)lds, pm, _mm512_extractf32x4_ps(sc, 2));
        if (ne > 3) _mm_mask_storeu_ps(row + 3 * (size_t)lds, pm, _mm512_extractf32x4_ps(sc, 3));
    }
}

// TILE_P positions at a time, each against every group of TILE_E entries while its rows are in L1.
// A long cache comes from memory: the rows a few tiles ahead are requested once per tile of
// positions (not once per group of entries: with many heads that was as many prefetches as loads).
AVX512_INLINE void scores(const int BF, const int WIDEN, float *s, int lds, const float *qa, const float *qp, int n,
                          const char *lat, const char *kpe, int run, int L, int r, float scale, float *wide) {
    const size_t esz = BF ? 2 : 4;
    for (int j = 0; j < run; j += TILE_P) {
        int np = run - j < TILE_P ? run - j : TILE_P;
        for (int p = 0; p < TILE_P && (WIDEN || !BF); p++) {
            size_t near = (size_t)j + p + SCORE_PREFETCH_ROWS, far = (size_t)j + p + SCORE_PREFETCH_L2_ROWS;
            for (size_t b = 0; b < L * esz; b += 64) {
                if (!BF) _mm_prefetch(lat + near * L * esz + b, _MM_HINT_T0);
                _mm_prefetch(lat + far * L * esz + b, _MM_HINT_T1);
            }
            for (size_t b = 0; b < r * esz; b += 64) {
                if (!BF) _mm_prefetch(kpe + near * r * esz + b, _MM_HINT_T0);
                _mm_prefetch(kpe + far * r * esz + b, _MM_HINT_T1);
            }
        }
        if (WIDEN) {  // a BF16 cache's rows widened once for all groups of entries, not once a group
            for (int p = 0; p < np; p++) {
                const char *lr = lat + ((size_t)j + p) * L * 2, *kr = kpe + ((size_t)j + p) * r * 2;
                for (int k = 0; k < L; k += 16)
                    _mm512_mask_storeu_ps(wide + (size_t)p * L + k, tail_mask(L - k), cached(1, lr, k, tail_mask(L - k)));
                for (int k = 0; k < r; k += 16)
                    _mm512_mask_storeu_ps(wide + (size_t)TILE_P * L + (size_t)p * r + k, tail_mask(r - k),
                                          cached(1, kr, k, tail_mask(r - k)));
            }
            for (int e0 = 0; e0 < n; e0 += TILE_E)
                score_tile(0, s + j, lds, qa, qp, e0, n - e0 < TILE_E ? n - e0 : TILE_E, (const char *)wide,
                           (const char *)(wide + (size_t)TILE_P * L), 0, np, L, r, scale, NULL, NULL);
            continue;
        }
        for (int e0 = 0; e0 < n; e0 += TILE_E) {  // (a BF16 cache's rows ahead requested by the first group's tile)
            const int ask = BF && e0 == 0;
            score_tile(BF, s, lds, qa, qp, e0, n - e0 < TILE_E ? n - e0 : TILE_E, lat, kpe, j, np, L, r, scale,
                       ask ? lat + (size_t)j * L * esz : NULL, ask ? kpe + (size_t)j * r * esz : NULL);
        }
    }
}

AVX512 void latent_scores_avx512(float *s, int lds, const float *qa, const float *qp, int n, const void *lat,
                                 const void *kpe, int bf16, int run, int L, int r, float scale) {
    float wide[TILE_P * SCORE_WIDE_MAX];  // a BF16 cache's tile of rows [latent × TILE_P | k_pe × TILE_P] in fp32
    if (bf16 && n >= SCORE_WIDE_ENTRIES && L + r <= SCORE_WIDE_MAX)
        scores(1, 1, s, lds, qa, qp, n, lat, kpe, run, L, r, scale, wide);
    else if (bf16) scores(1, 0, s, lds, qa, qp, n, lat, kpe, run, L, r, scale, NULL);
    else scores(0, 0, s, lds, qa, qp, n, lat, kpe, run, L, r, scale, NULL);
}
