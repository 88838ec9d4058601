// The scores of absorbed attention on AVX-512 (attention.c's latent_scores): every entry's latent
// query and rotary query against a run of cached positions, both halves in one running sum.
//
// Each score is one chain of fused multiply-adds over the 16-value vectors of the latent, then of
// k_pe, and one fold of its 16 lanes (fold16_ps's tree), then × the softmax scale — the same bits
// whatever tile computed it, so however the entries are grouped (a thread's heads, a verify pass's
// rows) a score never changes. A tile is 16 scores: 4 positions × 4 entries. (Zen 4, one thread,
// 8 entries, 128 + 32 values, a chunk in L2: ~71 GFLOP/s; from memory ~61 GFLOP/s = 15 GB/s of
// f32 cache with the prefetch below, against 31-33 for the two products it replaces. 2 × 8 tiles
// were slower. Fourteenth session, the prefetch once per four positions: 32,768 positions from
// memory 88-92 GFLOP/s f32, 118-122 with a BF16 cache; DeepSeek-V3's 128 heads × (512 + 64)
// 115-124 and 145-146. Eighteenth session: an entry's four scores of a tile go out as one
// vector, not four scalars — in L2, per position, 8 entries f32 19.6-28.2 -> 17.4-23.8 ns, BF16
// 17.3-27.2 -> 15.9-23.2; 128 entries f32 326-399 -> 264-343 — and see SCORE_WIDE_ENTRIES.)
#include <stdint.h>

#include "kernels/avx512_util.h"
#include "kernels/kernels_cpu.h"

// Cached rows are requested into L1 this many positions ahead of the tile that reads them, and into
// L2 SCORE_PREFETCH_L2_ROWS ahead (past the run's end: harmless, a prefetch never faults). A cache
// read from memory by both threads at once (one sequence's heads split between them) came in at
// ~20 GB/s a thread with the L1 requests alone; the L2 requests made a v3-deep FP8 decode step at
// 576-640 positions 3.3% faster (24 of 30 rounds taking turns; 16 sequences at 200-264 positions
// +3%, 7 of 10; at 8K positions, compute-bound, 1.6% slower: the extra requests' issue slots).
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

// Adds q[e] · row[p] over n values into acc[p · E + e], 16 at a time (a masked tail).
AVX512_INLINE void score_steps(const int BF, const int P, const int E, __m512 acc[16], const float *q[4],
                               const char *row[4], int n) {
    int k = 0;
#pragma GCC unroll 2
    for (; k + 16 <= n; k += 16) {
        __m512 c[4];
#pragma GCC unroll 4
        for (int p = 0; p < P; p++) c[p] = cached(BF, row[p], k, 0xffff);
#pragma GCC unroll 4
        for (int e = 0; e < E; e++) {
            __m512 qv = _mm512_loadu_ps(q[e] + k);
#pragma GCC unroll 4
            for (int p = 0; p < P; p++) acc[p * E + e] = _mm512_fmadd_ps(c[p], qv, acc[p * E + e]);
        }
    }
    if (k < n) {
        __mmask16 m = tail_mask(n - k);
        __m512 c[4];
#pragma GCC unroll 4
        for (int p = 0; p < P; p++) c[p] = cached(BF, row[p], k, m);
#pragma GCC unroll 4
        for (int e = 0; e < E; e++) {
            __m512 qv = _mm512_maskz_loadu_ps(m, q[e] + k);
#pragma GCC unroll 4
            for (int p = 0; p < P; p++) acc[p * E + e] = _mm512_fmadd_ps(c[p], qv, acc[p * E + e]);
        }
    }
}

// The P × E scores of positions [j, j + np) and entries [e0, e0 + ne) (np <= P, ne <= E; the
// rest repeat the last one: computed, not stored).
AVX512_INLINE void score_tile(const int BF, const int P, const int E, float *s, int lds, const float *qa,
                              const float *qp, int e0, int ne, const char *lat, const char *kpe, int j, int np, int L,
                              int r, float scale) {
    const size_t esz = BF ? 2 : 4;
    const float *qal[4], *qpl[4];
    const char *lr[4], *kr[4];
#pragma GCC unroll 4
    for (int e = 0; e < E; e++) {
        int i = e0 + (e < ne ? e : ne - 1);
        qal[e] = qa + (size_t)i * L, qpl[e] = qp + (size_t)i * r;
    }
#pragma GCC unroll 4
    for (int p = 0; p < P; p++) {
        size_t i = (size_t)j + (p < np ? p : np - 1);
        lr[p] = lat + i * L * esz, kr[p] = kpe + i * r * esz;
    }
    __m512 acc[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    score_steps(BF, P, E, acc, qal, lr, L);
    score_steps(BF, P, E, acc, qpl, kr, r);
    // fold16_ps puts the sum of acc[i] in lane 4 (i % 4) + i / 4; entry e's P scores gathered
    // into lanes e P .. e P + P − 1
    int idx[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) {
        int e = i / P, p = i % P, a = p * E + e;
        idx[i] = 4 * (a % 4) + a / 4;
    }
    float out[16];
    _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_loadu_si512(idx), fold16_ps(acc)), _mm512_set1_ps(scale)));
    const __mmask8 pm = (__mmask8)((1u << np) - 1);
    for (int e = 0; e < ne; e++) _mm_mask_storeu_ps(s + (size_t)(e0 + e) * lds + j, pm, _mm_loadu_ps(out + e * P));
}

// Four positions at a time, each against every group of four entries while its rows are in L1.
// A long cache comes from memory: the rows a few tiles ahead are requested once per four positions
// (not once per group of entries: with many heads that was as many prefetches as loads).
AVX512_INLINE void scores(const int BF, const int WIDEN, float *s, int lds, const float *qa, const float *qp, int n,
                          const char *lat, const char *kpe, int run, int L, int r, float scale, float *wide) {
    const size_t esz = BF ? 2 : 4;
    for (int j = 0; j < run; j += 4) {
        int np = run - j < 4 ? run - j : 4;
        for (int p = 0; p < 4; p++) {
            size_t near = (size_t)j + p + SCORE_PREFETCH_ROWS, far = (size_t)j + p + SCORE_PREFETCH_L2_ROWS;
            for (size_t b = 0; b < L * esz; b += 64) {
                _mm_prefetch(lat + near * L * esz + b, _MM_HINT_T0);
                _mm_prefetch(lat + far * L * esz + b, _MM_HINT_T1);
            }
            for (size_t b = 0; b < r * esz; b += 64) {
                _mm_prefetch(kpe + near * r * esz + b, _MM_HINT_T0);
                _mm_prefetch(kpe + far * r * esz + b, _MM_HINT_T1);
            }
        }
        if (WIDEN) {  // a BF16 cache's four rows widened once for all groups of entries, not once a group
            for (int p = 0; p < np; p++) {
                const char *lr = lat + ((size_t)j + p) * L * 2, *kr = kpe + ((size_t)j + p) * r * 2;
                for (int k = 0; k < L; k += 16)
                    _mm512_mask_storeu_ps(wide + (size_t)p * L + k, tail_mask(L - k), cached(1, lr, k, tail_mask(L - k)));
                for (int k = 0; k < r; k += 16)
                    _mm512_mask_storeu_ps(wide + (size_t)4 * L + (size_t)p * r + k, tail_mask(r - k),
                                          cached(1, kr, k, tail_mask(r - k)));
            }
            for (int e0 = 0; e0 < n; e0 += 4)
                score_tile(0, 4, 4, s + j, lds, qa, qp, e0, n - e0 < 4 ? n - e0 : 4, (const char *)wide,
                           (const char *)(wide + (size_t)4 * L), 0, np, L, r, scale);
            continue;
        }
        for (int e0 = 0; e0 < n; e0 += 4)
            score_tile(BF, 4, 4, s, lds, qa, qp, e0, n - e0 < 4 ? n - e0 : 4, lat, kpe, j, np, L, r, scale);
    }
}

AVX512 void latent_scores_avx512(float *s, int lds, const float *qa, const float *qp, int n, const void *lat,
                                 const void *kpe, int bf16, int run, int L, int r, float scale) {
    float wide[4 * SCORE_WIDE_MAX];  // a BF16 cache's four rows [latent × 4 | k_pe × 4] in fp32
    if (bf16 && n >= SCORE_WIDE_ENTRIES && L + r <= SCORE_WIDE_MAX)
        scores(1, 1, s, lds, qa, qp, n, lat, kpe, run, L, r, scale, wide);
    else if (bf16) scores(1, 0, s, lds, qa, qp, n, lat, kpe, run, L, r, scale, NULL);
    else scores(0, 0, s, lds, qa, qp, n, lat, kpe, run, L, r, scale, NULL);
}
