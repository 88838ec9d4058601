// Products on the AMX tiles (Sapphire Rapids and later Xeons): BF16 operands, fp32 sums.
//   gemm_lowp_amx — the BF16 and FP8 GEMMs of mixed-precision training (gemm_lowp.h), both
//                   operands rounded (or FP8-quantised) from fp32 by gemm_lowp's packers;
//   matmul_nt_amx_rows — x · Wᵀ with BF16 compute (`--compute bf16`) for the blocked products
//                   (prefill) on the weight panels: x rounded to BF16, W as the BF16 values
//                   matmul_bf16c.c takes (FP8 codes exactly, each 128-column chunk's sum × its
//                   block scale); matmul_nt_amx the same on a view's stored rows (no panels);
//   panels_nt_amx — the same product on weight panels, for the decode steps of the matrices an
//                   engine puts on the tiles (MatView.panels_tiles).
//
// TDPBF16PS adds to a 16 × 16 tile of fp32 sums the products of an "A" tile (16 rows, each 32 BF16
// values of K in order: 16 words of pairs) and a "B" tile (16 rows of K pairs, row p holding for
// each of 16 columns the word of its elements 2p and 2p + 1). B is gemm_lowp's packed panel of 32
// columns (word (kp, j) at kp * 32 + j): two B tiles side by side. A is rows of pair words, which
// is how a weight matrix lies in memory; a training operand is packed into 16-row panels and
// transposed. K is padded with zero pairs to a multiple of 32 values, so every tile is full.
//
// The blocks of C are 32 × 32 (tiles 0-3 the sums, 4-5 the two A tiles, 6-7 the two B tiles),
// each over the whole of K: the B side is packed once per call (its N × K), the A side 32 rows at
// a time, so no operand is rounded twice in a call and the sums stay in the tiles. FP8: every 128
// values of K (four tile steps) the sums are stored and added × the chunk's scales into an fp32
// block, the report's promotion; BF16: the tiles sum all of K.
//
// The hardware's order and rounding inside a tile instruction are its own (measured on a Xeon
// against the documented sequence — each product added with its own rounding — and against one
// rounding per pair or per tile row: about 44% of results differ from each), so these products
// are not the bits of the AVX512_BF16 kernels; an output element's sum is the same instructions
// over the same K steps whatever the other rows and columns of its block (a block of at most 16
// activation rows uses half the B tiles), so a row's bits do not depend on its company (tested).
// matmul.c takes these kernels for the blocked products (training, prefill); decode's products on
// weight panels have their own (panels_nt_amx).
//
// Linux hands out the tile state only to a process that asked for it (arch_prctl, matmul.c's
// detection); a call loads the tile configuration it needs unless the thread's tiles hold it
// already, and leaves it loaded (tile_config_rows). matmul_amx_emulated.c compiles this file again against a C model of the four
// tile instructions (the documented sequence), so the blocking and the packing are tested on every
// CPU with AVX512_BF16; the hardware path only where there are tiles.
#include <stdint.h>
#include <string.h>

#include "kernels/avx512_util.h"
#include "kernels/convert.h"
#include "kernels/kernels_cpu.h"
#include "kernels/weight_words.h"

#ifdef AMX_EMULATE
#define AMX_FN(name) name##_emulated
#define AMX_TARGET AVX512BF16_TARGET

static __thread uint8_t emu_tile[8][16][64];  // the eight tile registers, 16 rows of 64 bytes
static __thread int emu_rows[8];               // the rows each is configured with

static void emu_config(int m) {
    for (int t = 0; t < 8; t++) emu_rows[t] = t < 6 ? m : 16;
}
// A load or store moves the configured rows only (a row past them is neither read nor written);
// the rest of the tile is zero after a load, as the hardware leaves it.
static void emu_load(int t, const void *p, long stride) {
    memset(emu_tile[t], 0, sizeof emu_tile[t]);
    for (int r = 0; r < emu_rows[t]; r++) memcpy(emu_tile[t][r], (const char *)p + r * stride, 64);
}
static void emu_store(int t, void *p, long stride) {
    for (int r = 0; r < emu_rows[t]; r++) memcpy((char *)p + r * stride, emu_tile[t][r], 64);
}
static float emu_bf16(const uint8_t *row, int i) {
    uint16_t h;
    memcpy(&h, row + 2 * i, 2);
    return bf16_to_f32(h);
}
// TDPBF16PS as the SDM writes it: per pair, the even product added, then the odd one.
static void emu_dp(int c, int a, int b) {
    for (int m = 0; m < emu_rows[c]; m++) {
        float acc[16];
        memcpy(acc, emu_tile[c][m], 64);
        for (int k = 0; k < emu_rows[b]; k++)
            for (int n = 0; n < 16; n++) {
                acc[n] += emu_bf16(emu_tile[a][m], 2 * k) * emu_bf16(emu_tile[b][k], 2 * n);
                acc[n] += emu_bf16(emu_tile[a][m], 2 * k + 1) * emu_bf16(emu_tile[b][k], 2 * n + 1);
            }
        memcpy(emu_tile[c][m], acc, 64);
    }
}
#define TILE_CONFIG() emu_config(16)
#define TILE_CONFIG_ROWS(m) emu_config(m)
#define TILE_ZERO(t) memset(emu_tile[t], 0, sizeof emu_tile[t])
#define TILE_LOAD(t, p, stride) emu_load(t, p, stride)
#define TILE_STORE(t, p, stride) emu_store(t, p, stride)
#define TILE_DP(c, a, b) emu_dp(c, a, b)
#else
#define AMX_FN(name) name
#define AMX_TARGET AVX512BF16_TARGET ",amx-tile,amx-bf16"

// Palette 1, all eight tiles 16 rows × 64 bytes.
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

// Tiles 0-5 of m rows, 6-7 of 16, every row 64 bytes (m = 16: all eight full, as the blocked
// kernels want them), unless the tiles hold that already: the configuration stays loaded between
// calls (no tilerelease) — loading one costs ~120 ns, reading it back ~12, and a decode step makes
// hundreds of small products per thread. Read back, not remembered: other code on the thread (a
// library's kernels, a benchmark) may load its own or release the tiles. (Not GCC 12's
// _tile_loadconfig: its asm names only the first 8 bytes of the configuration as read, so the
// compiler may drop the stores of the rest — seen as a fault in the benchmark.)
__attribute__((target(AMX_TARGET))) static void tile_config_rows(int m) {
    TileConfig want, now;
    memset(&want, 0, sizeof want);
    want.palette = 1;
    for (int t = 0; t < 8; t++) want.rows[t] = t < 6 ? m : 16, want.colsb[t] = 64;
    __asm__ volatile("sttilecfg %0" : "=m"(now));
    if (memcmp(&now, &want, sizeof want) != 0) __asm__ volatile("ldtilecfg %0" ::"m"(want));
}
#define TILE_CONFIG() tile_config_rows(16)
#define TILE_CONFIG_ROWS(m) tile_config_rows(m)
#define TILE_ZERO(t) _tile_zero(t)
#define TILE_LOAD(t, p, stride) _tile_loadd(t, p, stride)
#define TILE_STORE(t, p, stride) _tile_stored(t, p, stride)
#define TILE_DP(c, a, b) _tile_dpbf16ps(c, a, b)
#endif

#define AMX __attribute__((target(AMX_TARGET)))
#define AMX_INLINE static inline __attribute__((always_inline, target(AMX_TARGET)))

enum {
    BLK = 32,                // rows and columns of a block of C
    STEP_PAIRS = 16,         // K pairs per tile step (32 values)
    CHUNK_STEPS = 128 / 32,  // tile steps per FP8 chunk of 128
};

// K's pairs padded to whole tile steps (zero pairs past K).
static int pairs_padded(int K) { return ((K + 1) / 2 + STEP_PAIRS - 1) / STEP_PAIRS * STEP_PAIRS; }

// Steps [s0, s1) of a block: a (32 rows of pair words, a_ld words apart), b (a panel, 32 words
// per K pair). wide 0: the panel's columns 16-31 are padding (at most 16 activation rows), so
// tiles 1 and 3 are left alone — a column's sums are the same instructions either way.
AMX_INLINE void block_steps(const uint32_t *a, long a_ld, const uint32_t *b, int s0, int s1, int wide) {
    for (int s = s0; s < s1; s++) {
        TILE_LOAD(4, a + s * STEP_PAIRS, 4 * a_ld);
        TILE_LOAD(5, a + 16 * a_ld + s * STEP_PAIRS, 4 * a_ld);
        TILE_LOAD(6, b + (size_t)s * STEP_PAIRS * BLK, 4L * BLK);
        TILE_DP(0, 4, 6);
        TILE_DP(2, 5, 6);
        if (wide) {
            TILE_LOAD(7, b + (size_t)s * STEP_PAIRS * BLK + 16, 4L * BLK);
            TILE_DP(1, 4, 7);
            TILE_DP(3, 5, 7);
        }
    }
}

AMX_INLINE void tiles_zero(void) {
    TILE_ZERO(0);
    TILE_ZERO(1);
    TILE_ZERO(2);
    TILE_ZERO(3);
}

// The four sum tiles into a 32 × 32 row-major block.
AMX_INLINE void tiles_store(float *blk) {
    TILE_STORE(0, blk, 4L * BLK);
    TILE_STORE(1, blk + 16, 4L * BLK);
    TILE_STORE(2, blk + 16 * BLK, 4L * BLK);
    TILE_STORE(3, blk + 16 * BLK + 16, 4L * BLK);
}

// acc (32 × 32) = the block's sums over all of K (kpa pairs): BF16 in the tiles; FP8 the sum over
// chunks of (chunk sum × sa[ch * BLK + i] · sb[ch * sb_ld + j]) — sb NULL: × sa alone. part: 32 × 32
// scratch. Not wide: columns 16-31 of acc are not written.
AMX_INLINE void block_product(float *acc, float *part, const uint32_t *a, long a_ld, const uint32_t *b, int kpa,
                              int fp8, const float *sa, const float *sb, int sb_ld, int wide) {
    const int steps = kpa / STEP_PAIRS;
    tiles_zero();
    if (!fp8) {
        block_steps(a, a_ld, b, 0, steps, wide);
        tiles_store(acc);
        return;
    }
    memset(acc, 0, sizeof(float) * BLK * BLK);
    for (int s0 = 0, ch = 0; s0 < steps; s0 += CHUNK_STEPS, ch++) {
        if (s0) tiles_zero();
        block_steps(a, a_ld, b, s0, s0 + CHUNK_STEPS < steps ? s0 + CHUNK_STEPS : steps, wide);
        tiles_store(part);
        __m512 s0v = _mm512_set1_ps(1.0f), s1v = s0v;
        if (sb) s0v = _mm512_loadu_ps(sb + (size_t)ch * sb_ld), s1v = _mm512_loadu_ps(sb + (size_t)ch * sb_ld + 16);
        for (int i = 0; i < BLK; i++) {
            __m512 f = _mm512_set1_ps(sa[ch * BLK + i]);
            float *ai = acc + i * BLK, *pi = part + i * BLK;
            _mm512_storeu_ps(ai, _mm512_fmadd_ps(_mm512_loadu_ps(pi), _mm512_mul_ps(f, s0v), _mm512_loadu_ps(ai)));
            _mm512_storeu_ps(ai + 16,
                             _mm512_fmadd_ps(_mm512_loadu_ps(pi + 16), _mm512_mul_ps(f, s1v), _mm512_loadu_ps(ai + 16)));
        }
    }
}

// The first mr rows × nr columns of acc into C: C[i * ldc + j] (add: +=), or transposed,
// C[j * ldc + i] (stored).
AMX_INLINE void block_out(float *C, long ldc, int trans, const float *acc, int mr, int nr, int add) {
    if (!trans) {
        __mmask16 m0 = tail_mask(nr), m1 = tail_mask(nr > 16 ? nr - 16 : 0);
        for (int i = 0; i < mr; i++) {
            float *c = C + i * ldc;
            __m512 v0 = _mm512_loadu_ps(acc + i * BLK), v1 = _mm512_loadu_ps(acc + i * BLK + 16);
            if (add) v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, c)), v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, c + 16));
            _mm512_mask_storeu_ps(c, m0, v0);
            _mm512_mask_storeu_ps(c + 16, m1, v1);
        }
        return;
    }
    for (int ib = 0; ib * 16 < mr; ib++)
        for (int jb = 0; jb * 16 < nr; jb++) {
            __m512 v[16];
            for (int r = 0; r < 16; r++) v[r] = _mm512_loadu_ps(acc + (ib * 16 + r) * BLK + jb * 16);
            transpose16(v);  // v[c]: column jb·16 + c, rows ib·16 ..
            __mmask16 rows = tail_mask(mr - ib * 16);
            int cols = nr - jb * 16 < 16 ? nr - jb * 16 : 16;
            for (int c = 0; c < cols; c++) _mm512_mask_storeu_ps(C + (jb * 16 + c) * ldc + ib * 16, rows, v[c]);
        }
}

// Two k-major panels of 16 rows (word (kp, i) at kmaj[h * 16 * kpa + kp * 16 + i]) as 32 rows of
// pair words (word (i, kp) at rows[(h * 16 + i) * kpa + kp]).
AMX_INLINE void panels_to_rows(uint32_t *rows, const uint32_t *kmaj, int kpa) {
    for (int h = 0; h < 2; h++)
        for (int k0 = 0; k0 < kpa; k0 += 16) {
            __m512 v[16];
            for (int p = 0; p < 16; p++) v[p] = _mm512_loadu_ps((const float *)kmaj + (size_t)h * 16 * kpa + (size_t)(k0 + p) * 16);
            transpose16(v);
            for (int i = 0; i < 16; i++) _mm512_storeu_ps((float *)rows + (size_t)(h * 16 + i) * kpa + k0, v[i]);
        }
}

AMX int AMX_FN(gemm_lowp_amx)(float *C, int ldc, const LowpOperand *A, const LowpOperand *B, int K, int add,
                              int m_begin, int m_end, int n_begin, int n_end) {
    if (n_end <= n_begin || m_end <= m_begin) return 0;
    const int fp8 = A->fmt != LOWP_BF16, N = n_end - n_begin, npan = (N + BLK - 1) / BLK;
    const int kpa = pairs_padded(K), nch = (K + 127) / 128;
    if (K == 0) {
        if (!add)
            for (int i = m_begin; i < m_end; i++) memset(C + (size_t)i * ldc + n_begin, 0, sizeof(float) * N);
        return 0;
    }
    // scratch: B panels (npan·32 × kpa words), the A block (32 × kpa) and its k-major panels, FP8
    // scales of B (nch × npan·32) and of the A block (nch × 32), two 32 × 32 blocks of sums
    size_t wb = (size_t)npan * BLK * kpa, wa = (size_t)BLK * kpa, nsb = fp8 ? (size_t)nch * npan * BLK : 0;
    size_t nsa = fp8 ? (size_t)nch * BLK : 0;
    float *scratch = kernels_scratch(wb + 2 * wa + nsb + nsa + 2 * BLK * BLK);
    if (!scratch) return -1;
    float *acc = scratch, *part = acc + BLK * BLK;  // (64-byte aligned first)
    uint32_t *bp = (uint32_t *)(part + BLK * BLK), *ap = bp + wb, *kmaj = ap + wa;
    float *sb = (float *)(kmaj + wa), *sa = sb + nsb;
    lowp_pack_panels(bp, BLK, B, n_begin, N, K, kpa);
    if (fp8)
        for (int ch = 0; ch < nch; ch++)
            for (int j = 0; j < npan * BLK; j++) sb[(size_t)ch * npan * BLK + j] = j < N ? lowp_scale_of(B, n_begin + j, ch * 128) : 1.0f;
    TILE_CONFIG();
    for (int m0 = m_begin; m0 < m_end; m0 += BLK) {
        int mr = m_end - m0 < BLK ? m_end - m0 : BLK;
        lowp_pack_panels(kmaj, 16, A, m0, mr, K, kpa);
        if (mr <= 16) memset(kmaj + (size_t)16 * kpa, 0, sizeof(uint32_t) * 16 * kpa);
        panels_to_rows(ap, kmaj, kpa);
        if (fp8)
            for (int ch = 0; ch < nch; ch++)
                for (int i = 0; i < BLK; i++) sa[ch * BLK + i] = i < mr ? lowp_scale_of(A, m0 + i, ch * 128) : 1.0f;
        for (int p = 0; p < npan; p++) {
            int nr = N - p * BLK < BLK ? N - p * BLK : BLK;
            block_product(acc, part, ap, kpa, bp + (size_t)p * BLK * kpa, kpa, fp8, sa, fp8 ? sb + p * BLK : NULL,
                          npan * BLK, nr > 16);
            block_out(C + (size_t)m0 * ldc + n_begin + p * BLK, ldc, 0, acc, mr, nr, add);
        }
    }
    return 0;
}

// Rows [r, r + nr) of w as rows of BF16 pairs (row i at out + i * kpa words, zero past the
// columns and for rows past nr up to 32), the values weight_words32 gives.
AMX_INLINE void widen_rows(uint32_t *out, const MatView *w, int r, int nr, int kpa) {
    const int cols = w->cols;
    __m512i tab[4];
    weight_words_tables(w, tab);
    for (int i = 0; i < BLK; i++) {
        uint16_t *d = (uint16_t *)(out + (size_t)i * kpa);
        if (i >= nr) {
            memset(d, 0, sizeof(uint32_t) * kpa);
            continue;
        }
        size_t row = (size_t)(r + i) * cols;
        for (int c = 0; c < 2 * kpa; c += 32) {
            int left = cols - c > 0 ? cols - c : 0;
            _mm512_storeu_si512(d + c, weight_words32(w, row + c, left >= 32 ? ~0u : (1u << left) - 1, tab));
        }
    }
}

#ifndef AMX_EMULATE
size_t amx_panel_words(int N, int K) { return (size_t)(N + BLK - 1) / BLK * BLK * pairs_padded(K); }
#endif

// Rows [r0, r1) of out = the packed activations bp (N rows) · Wᵀ; scratch: two 32 × 32 blocks of
// sums, a block of weight rows (32 × kpa words) and its FP8 scales (nch × 32), 64-byte aligned.
AMX_INLINE void nt_on_panels(float *out, int ldo, const uint32_t *bp, int N, const MatView *w, int r0, int r1,
                             float *scratch) {
    const int K = w->cols, fp8 = w->dtype == DT_F8_E4M3, npan = (N + BLK - 1) / BLK;
    const int kpa = pairs_padded(K), nch = (K + 127) / 128;
    float *acc = scratch, *part = acc + BLK * BLK;
    uint32_t *ap = (uint32_t *)(part + BLK * BLK);
    float *sa = (float *)(ap + (size_t)BLK * kpa);
    TILE_CONFIG();
    for (int rb = r0; rb < r1; rb += BLK) {
        int mr = r1 - rb < BLK ? r1 - rb : BLK;
        // BF16 rows whose length is a whole number of steps are the A tiles where they lie
        const uint32_t *a = ap;
        long a_ld = kpa;
        if (w->dtype == DT_BF16 && K % 32 == 0 && mr == BLK && N > 16)  // (few rows: one stream per row, copied)
            a = (const uint32_t *)((const uint16_t *)w->data + (size_t)rb * K), a_ld = K / 2;
        else
            widen_rows(ap, w, rb, mr, kpa);
        if (fp8)
            for (int ch = 0; ch < nch; ch++)
                for (int i = 0; i < BLK; i++)
                    sa[ch * BLK + i] = i < mr ? w->scale_inv[(size_t)((w->row0 + rb + i) / w->block) * w->scale_cols + ch] : 1.0f;
        for (int p = 0; p < npan; p++) {
            int nr = N - p * BLK < BLK ? N - p * BLK : BLK;
            block_product(acc, part, a, a_ld, bp + (size_t)p * BLK * kpa, kpa, fp8, sa, NULL, 0, nr > 16);
            block_out(out + (size_t)p * BLK * ldo + rb, ldo, 1, acc, mr, nr, 0);
        }
    }
}

// Floats of nt_on_panels' scratch.
static size_t nt_scratch_floats(const MatView *w) {
    const int kpa = pairs_padded(w->cols), nch = (w->cols + 127) / 128;
    return 2 * BLK * BLK + (size_t)BLK * kpa + (w->dtype == DT_F8_E4M3 ? (size_t)nch * BLK : 0);
}

// Nonzero when nt_on_panels cannot take w (or when there is nothing to do: *done set).
static int nt_trivial(float *out, int ldo, const MatView *w, int N, int r0, int r1, int *done) {
    *done = 1;
    if (N <= 0 || r1 <= r0) return 0;
    if (w->dtype == DT_F8_E4M3 && (w->block != 128 || !w->scale_inv)) return -1;  // (the release's blocks)
    if (w->cols <= 0) {
        for (int n = 0; n < N; n++) memset(out + (size_t)n * ldo + r0, 0, sizeof(float) * (r1 - r0));
        return 0;
    }
    *done = 0;
    return 0;
}

AMX int AMX_FN(matmul_nt_amx)(float *out, int ldo, const float *x, int ldx, const MatView *w, int N, int r0, int r1) {
    int done, rc = nt_trivial(out, ldo, w, N, r0, r1, &done);
    if (done || rc) return rc;
    // scratch: nt_on_panels', then the activations' panels
    size_t own = nt_scratch_floats(w);
    float *scratch = kernels_scratch(own + amx_panel_words(N, w->cols));
    if (!scratch) return -1;
    uint32_t *bp = (uint32_t *)(scratch + own);
    if (w->cols > 0) {  // (nt_trivial: a view without columns was zeroed)
        LowpOperand xo = {.data = x, .ld = ldx, .trans = 0, .fmt = LOWP_BF16};
        lowp_pack_panels(bp, BLK, &xo, 0, N, w->cols, pairs_padded(w->cols));
    }
    nt_on_panels(out, ldo, bp, N, w, r0, r1, scratch);
    return 0;
}

// ---- x · Wᵀ on weight panels (MatView.panels_tiles: an engine's batched steps) ----
// A weight panel (matmul.h: 32 rows, per K pair their 32 BF16 pair words) is two B tiles side by
// side, 128 bytes a row: the activations are the A tiles (up to 16 rows of 16 pair words each) and
// the sums come out as rows of activations, no transposition. A tile instruction costs the same for
// 1 activation row as for 16 (~6.5 ns on a Sapphire Rapids core, measured): from ~8 rows these
// products beat the register tiles, at one row they stream ~0.7x as fast. FP8 panels are widened
// into BF16 rows (fp8_widen64, the byte look-ups) and promoted every 128 columns × the panel's
// block scale, as matmul_bf16c sums them. A row's sums are the same instructions over the same K
// steps whatever the other rows (an activation row is one row of an A tile; padding rows are
// zero), so a row's bits do not depend on its company.

#define AMX_VBMI __attribute__((target(AMX_TARGET ",avx512vbmi")))

enum { PF_STEPS = 2 };

// Step s of a panel as tiles 6 (its rows 0-15) and 7 (rows 16-31); pf: the lines PF_STEPS steps
// ahead requested.
AMX_INLINE void panel_b_tiles(const uint32_t *b, int s, int pf) {
    const uint32_t *bs = b + (size_t)s * STEP_PAIRS * BLK;
    if (pf)
        for (int l = 0; l < 32; l++) _mm_prefetch((const char *)(bs + PF_STEPS * STEP_PAIRS * BLK) + 64 * l, _MM_HINT_T0);
    TILE_LOAD(6, bs, 4L * BLK);
    TILE_LOAD(7, bs + 16, 4L * BLK);
}

// A BF16 panel's last step where the panel's kp_all pairs end inside it (kpa: whole steps): its
// pairs copied to the same place in wb, zero-padded to the step's end.
AMX_INLINE void pad_last_step(uint32_t *wb, const uint32_t *b, int kp_all, int kpa) {
    size_t s0 = (size_t)(kpa - STEP_PAIRS);
    memcpy(wb + s0 * BLK, b + s0 * BLK, sizeof(uint32_t) * BLK * (kp_all - s0));
    memset(wb + (size_t)kp_all * BLK, 0, sizeof(uint32_t) * BLK * (kpa - kp_all));
}

// Sums of steps [s0, s1) for a group of activation rows (the A tile at a, kpa words apart) against
// a panel's pairs at b (32 words per pair; BF16 panels in memory: the lines PF_STEPS steps ahead
// requested — the tile loads stall on lines from memory), even steps into tiles 0-1, odd ones into
// 2-3: two chains, so each instruction waits on one two steps back.
AMX_INLINE void panel_steps(const uint32_t *a, int kpa, const uint32_t *b, int s0, int s1, int pf) {
    for (int s = s0; s < s1; s++) {
        panel_b_tiles(b, s, pf);
        if (s % 2 == 0) {
            TILE_LOAD(4, a + s * STEP_PAIRS, 4L * kpa);
            TILE_DP(0, 4, 6);
            TILE_DP(1, 4, 7);
        } else {
            TILE_LOAD(5, a + s * STEP_PAIRS, 4L * kpa);
            TILE_DP(2, 5, 6);
            TILE_DP(3, 5, 7);
        }
    }
}

// acc rows [0, m) (32 floats apart) = (+=, add) tiles 0 + 2 | 1 + 3, × f.
AMX_INLINE void panel_sums(float *acc, float *part, int m, __m512 f, int add) {
    TILE_STORE(0, part, 4L * 64);
    TILE_STORE(1, part + 16, 4L * 64);
    TILE_STORE(2, part + 32, 4L * 64);
    TILE_STORE(3, part + 48, 4L * 64);
    for (int i = 0; i < m; i++)
        for (int h = 0; h < 2; h++) {
            __m512 v = _mm512_mul_ps(_mm512_add_ps(_mm512_loadu_ps(part + i * 64 + 16 * h), _mm512_loadu_ps(part + i * 64 + 32 + 16 * h)), f);
            _mm512_storeu_ps(acc + i * BLK + 16 * h, add ? _mm512_add_ps(v, _mm512_loadu_ps(acc + i * BLK + 16 * h)) : v);
        }
}

// Pairs [kp0, kp1) of an FP8 panel's codes widened into BF16 pair words at wb (32 per pair), zero
// from kp_all on. Widened a chunk at a time right before its steps, the tile loads find them in L1
// (the whole panel widened first: FP8 products at N = 1-16 streamed at ~60% of this rate).
AMX_VBMI static inline void widen_pairs(uint32_t *wb, const uint8_t *codes, int kp0, int kp1, int kp_all,
                                        const __m512i tab[4]) {
    int k = kp1 < kp_all ? kp1 : kp_all;
    for (int kp = kp0; kp < k; kp++) {
        __m512i lo, hi;
        _mm_prefetch((const char *)codes + (size_t)kp * 64 + 1536, _MM_HINT_T0);
        fp8_widen64(_mm512_loadu_si512(codes + (size_t)kp * 64), tab, &lo, &hi);
        _mm512_storeu_si512(wb + (size_t)kp * BLK, lo);
        _mm512_storeu_si512(wb + (size_t)kp * BLK + 16, hi);
    }
    if (k < kp0) k = kp0;
    if (k < kp1) memset(wb + (size_t)k * BLK, 0, sizeof(uint32_t) * BLK * (kp1 - k));
}

AMX_VBMI int AMX_FN(panels_nt_amx)(const AmxPanel *pn, int np, const uint32_t *ap, int kpa, int N, int kp_all, int fp8,
                                   float *scratch) {
    const int steps = kpa / STEP_PAIRS;
    float *acc = scratch, *part = acc + 16 * BLK;  // (16 × 32, 16 × 64)
    uint32_t *wb = (uint32_t *)(part + 16 * 64);   // (kpa × 32 words: an FP8 panel widened, a BF16 one's last step)
    __m512i tab[4] = {0};
    if (fp8) fp8_widen_tables(tab);
    TILE_CONFIG_ROWS(N < 16 ? N : 16);  // (past 16 rows, ap's rows are padded to whole groups)
    for (int q = 0; q < np; q++) {
        const AmxPanel *p = &pn[q];
        const uint32_t *b = p->w;
        if (fp8) {
            // more than one group of 16 rows: widened once for them all; else a chunk at a time
            if (N > 16) widen_pairs(wb, p->w, 0, kpa, kp_all, tab);
            b = wb;
        } else if (kp_all < kpa) {  // the last step's pairs past the panel: a zero-padded copy
            pad_last_step(wb, b, kp_all, kpa);
        }
        for (int m0 = 0; m0 < N; m0 += 16) {
            const int m = N - m0 < 16 ? N - m0 : 16;
            const uint32_t *a = ap + (size_t)m0 * kpa;
            tiles_zero();
            if (!fp8) {
                int whole = kp_all < kpa ? steps - 1 : steps;
                panel_steps(a, kpa, b, 0, whole, m0 == 0);
                panel_steps(a, kpa, wb, whole, steps, 0);
                panel_sums(acc, part, m, _mm512_set1_ps(1.0f), 0);
            } else
                for (int s0 = 0; s0 < steps; s0 += CHUNK_STEPS) {  // 128 columns a chunk, × its scale
                    int s1 = s0 + CHUNK_STEPS < steps ? s0 + CHUNK_STEPS : steps;
                    if (N <= 16) widen_pairs(wb, p->w, s0 * STEP_PAIRS, s1 * STEP_PAIRS, kp_all, tab);
                    panel_steps(a, kpa, b, s0, s1, 0);
                    panel_sums(acc, part, m, _mm512_set1_ps(p->scales[s0 / CHUNK_STEPS]), s0 > 0);
                    tiles_zero();
                }
            for (int i = 0; i < m; i++) {
                float *o = p->out + (size_t)(m0 + i) * p->ldo;
                _mm512_mask_storeu_ps(o, (__mmask16)p->lanes, _mm512_loadu_ps(acc + i * BLK));
                _mm512_mask_storeu_ps(o + 16, (__mmask16)(p->lanes >> 16), _mm512_loadu_ps(acc + i * BLK + 16));
            }
        }
    }
    return 0;
}

// ---- x · Wᵀ on weight panels for many activation rows (prefill) ----
// Two groups of 16 activation rows (A tiles 4-5, rows of BF16 pair words) against a panel's two B
// tiles per step: four sums for four tile loads (panels_nt_amx's single group: two for three),
// written straight into the output rows (the stored-row kernel, nt_on_panels, transposes its
// blocks on the way out), and the weights read as the panels decode reads — so a model on this
// CPU holds one copy of them. One chain per sum over the steps, rows padded with zeros to groups of
// 32: a row's bits do not depend on how many rows come with it. BF16 panels' lines are requested
// PF_STEPS steps ahead during the first group; FP8 panels are widened whole first (every group
// reads them) and each 128-column chunk's sums promoted × the panel's block scale.
// two 0: the group's rows 16-31 are padding (tiles 2 and 3 left alone: a row's sums are the same
// instructions either way).
AMX_INLINE void wide_steps(const uint32_t *a, int kpa, const uint32_t *b, int s0, int s1, int pf, int two) {
    for (int s = s0; s < s1; s++) {
        panel_b_tiles(b, s, pf);
        TILE_LOAD(4, a + s * STEP_PAIRS, 4L * kpa);
        TILE_DP(0, 4, 6);
        TILE_DP(1, 4, 7);
        if (two) {
            TILE_LOAD(5, a + (size_t)16 * kpa + s * STEP_PAIRS, 4L * kpa);
            TILE_DP(2, 5, 6);
            TILE_DP(3, 5, 7);
        }
    }
}

AMX_VBMI int AMX_FN(matmul_nt_amx_rows)(float *out, int ldo, const uint32_t *ap, int N, const MatView *w, int r0,
                                        int r1) {
    if (N <= 0 || r1 <= r0) return 0;
    if (!w->panels || r0 % BLK || w->cols <= 0) return -1;
    const int K = w->cols, fp8 = w->dtype == DT_F8_E4M3, kp_all = (K + 1) / 2, kpa = pairs_padded(K);
    const int steps = kpa / STEP_PAIRS, whole = fp8 || kp_all == kpa ? steps : steps - 1;
    const size_t pb = weight_panel_bytes(w);
    float *acc = kernels_scratch(2 * BLK * BLK + (size_t)BLK * kpa);  // acc, part (32 × 32), wb (32 × kpa words)
    if (!acc) return -1;
    float *part = acc + BLK * BLK;
    uint32_t *wb = (uint32_t *)(part + BLK * BLK);  // an FP8 panel widened, a BF16 one's last step
    __m512i tab[4] = {0};
    if (fp8) fp8_widen_tables(tab);
    TILE_CONFIG();
    for (int rb = r0; rb < r1; rb += BLK) {
        const int nr = r1 - rb < BLK ? r1 - rb : BLK;
        const void *panel = (const char *)w->panels + (size_t)(rb / BLK) * pb;
        const uint32_t *b = panel;
        const float *scales = fp8 ? w->scale_inv + (size_t)((w->row0 + rb) / 128) * w->scale_cols : NULL;
        if (fp8) {
            widen_pairs(wb, panel, 0, kpa, kp_all, tab);
            b = wb;
        } else if (whole < steps) {  // the last step's pairs past the panel: a zero-padded copy
            pad_last_step(wb, b, kp_all, kpa);
        }
        for (int g = 0; g * BLK < N; g++) {
            const uint32_t *a = ap + (size_t)g * BLK * kpa;
            const int m = N - g * BLK < BLK ? N - g * BLK : BLK;
            float *o = out + (size_t)g * BLK * ldo + rb;
            tiles_zero();
            if (!fp8) {
                wide_steps(a, kpa, b, 0, whole, g == 0, m > 16);
                wide_steps(a, kpa, wb, whole, steps, 0, m > 16);
                if (m == BLK && nr == BLK) {
                    TILE_STORE(0, o, 4L * ldo);
                    TILE_STORE(1, o + 16, 4L * ldo);
                    TILE_STORE(2, o + (size_t)16 * ldo, 4L * ldo);
                    TILE_STORE(3, o + (size_t)16 * ldo + 16, 4L * ldo);
                    continue;
                }
                tiles_store(acc);
            } else
                for (int s0 = 0; s0 < steps; s0 += CHUNK_STEPS) {
                    if (s0) tiles_zero();
                    wide_steps(a, kpa, b, s0, s0 + CHUNK_STEPS < steps ? s0 + CHUNK_STEPS : steps, 0, m > 16);
                    tiles_store(part);
                    // acc = Σ chunk sum × scale, fused, from zero: block_product's arithmetic, so
                    // the stored-row kernel's bits
                    __m512 f = _mm512_set1_ps(scales[s0 / CHUNK_STEPS]);
                    for (int i = 0; i < m; i++)
                        for (int h = 0; h < 2; h++) {
                            float *ai = acc + i * BLK + 16 * h;
                            __m512 sum = s0 ? _mm512_loadu_ps(ai) : _mm512_setzero_ps();
                            _mm512_storeu_ps(ai, _mm512_fmadd_ps(_mm512_loadu_ps(part + i * BLK + 16 * h), f, sum));
                        }
                }
            block_out(o, ldo, 0, acc, m, nr, 0);
        }
    }
    return 0;
}
