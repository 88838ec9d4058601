// Internal to src/kernels: the CPU feature check, per-thread scratch, and the AVX-512 kernels
// behind matmul.h and convert.h (those only called after kernels_cpu_avx512() returned 1).
#ifndef DSV3_KERNELS_KERNELS_CPU_H
#define DSV3_KERNELS_KERNELS_CPU_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/gemm_lowp.h"
#include "kernels/matmul.h"

// For a function whose products must be rounded before they are added: GCC fuses a multiply and an
// add into one FMA wherever the target has it, intrinsics included (NO_FP_CONTRACT, on the
// definition); clang fuses within one source expression (FP_CONTRACT_OFF, first in a block).
#if defined(__clang__)
#define NO_FP_CONTRACT
#define FP_CONTRACT_OFF _Pragma("clang fp contract(off)")
#else
#define NO_FP_CONTRACT __attribute__((optimize("fp-contract=off")))
#define FP_CONTRACT_OFF
#endif

// 1 when the AVX-512 kernels are in use: F/BW/VL/DQ present (checked once) and not turned off
// with kernels_set_isa("scalar").
int kernels_cpu_avx512(void);
// 1 when, in addition, the CPU has the AVX512_BF16 dot products (and they are not turned off with
// kernels_set_isa("avx512") or "scalar").
int kernels_cpu_avx512bf16(void);
// 1 when, in addition, the CPU has AMX-BF16 tiles, Linux granted this process their state
// (arch_prctl), and they are not turned off with kernels_set_isa("avx512bf16") or below.
int kernels_cpu_amx(void);
// 1 when, in addition, the CPU has AVX512_VBMI's byte permutes (every AVX512_BF16 CPU but Cooper
// Lake): the BF16-compute products (matmul_bf16c.c) widen FP8 codes with them.
int kernels_cpu_avx512bf16_vbmi(void);

// Per-thread scratch of at least n floats, 64-byte aligned, kept between calls and freed when the
// thread exits (the kernels run many times per token; allocating each time would fault pages in).
// NULL when memory runs out: the caller's product then fails with -1.
float *kernels_scratch(size_t n);
// The same in one of a thread's slots: KERNELS_SCRATCH_OWN is kernels_scratch's, which a kernel
// uses for itself; KERNELS_SCRATCH_SHARED holds an operand that a caller packs once and hands to
// several kernels or to the threads of its team (they may use their own slot meanwhile).
typedef enum { KERNELS_SCRATCH_OWN, KERNELS_SCRATCH_SHARED, KERNELS_SCRATCH_SLOTS } KernelsScratch;
float *kernels_scratch_slot(KernelsScratch slot, size_t n);

// Bulk bf16 conversions; each returns how many leading elements it converted (the caller does
// the rest with the scalar codec).
size_t bf16_to_f32_n_avx512(float *out, const uint16_t *in, size_t n);
size_t bf16_from_f32_n_avx512(uint16_t *out, const float *in, size_t n);

// Can the AVX-512 paths take this view? FP8 needs block % 64 == 0 (released checkpoints: 128)
// and a caller without denormals-are-zero (MXCSR.DAZ).
int matview_avx512_ok(const MatView *w);

// The products return 0, or -1 when their scratch could not be allocated.
// Few activation rows (decode, speculative drafts), every weight read from memory once:
// out[n * ldo + r] = x[n * ldx ..] · W[r] for rows r in [r_begin, r_end), n < N;
int gemv_nt_avx512(float *out, int ldo, const float *x, int ldx, int N, const MatView *w,
                    int r_begin, int r_end);
// out[n * ldo + c] (add: +=) Σ_r x[n * ldx + r] W[r][c] for columns c in [c_begin, c_end).
// FP8: c_begin must be a multiple of 16 (one scale per 16-column vector), as for gemm_avx512 with
// transpose_w = 0; matmul_nn_part does a ragged head itself. Not for an FP8 view whose scales need
// the split path (the caller checks fp8_scales_need_split).
int gemv_nn_avx512(float *out, int ldo, const float *x, int ldx, int N, const MatView *w, int c_begin, int c_end,
                   int add);
// 1 when some block scale of an FP8 view is too large for the kernels' folded 2^120.
int fp8_scales_need_split(const MatView *w);

// Up to this many activation rows an fp32 product x · Wᵀ streams each weight row once against all
// of them (gemv_nt_avx512: decode, speculative drafts); beyond it the packed blocked product
// (gemm_avx512) wins.
#define GEMV_MAX_N 8

// One thread's share of a blocked product: output features [f_begin, f_end) of all N rows.
// transpose_w = 1: out[N][rows] = x · Wᵀ (features are rows of W, K = cols);
// transpose_w = 0: out[N][cols] = x · W  (features are cols of W, K = rows).
int gemm_avx512(float *out, const float *x, const MatView *w, int N, int transpose_w, int f_begin,
                 int f_end);
// gemm_avx512 on an F32 right operand packed once for several products (plain attention: a head's
// keys or values against each of its query chunks): f32_panels_pack packs W (transpose_w 1: F × K,
// out = x · Wᵀ; 0: K × F, out = x · W) into f32_panels_floats(F, K) floats; f32_panels_product
// computes columns [0, f_end) of out (ldo apart) from x's N rows (ldx apart) over W's rows [0,
// k_end) of K — gemm_avx512's bits for the same operands cut to f_end and k_end.
size_t f32_panels_floats(int F, int K);
void f32_panels_pack(float *bp, const MatView *w, int transpose_w, int F, int K);
int f32_panels_product(float *out, int ldo, const float *x, int ldx, int N, const float *bp, int F, int K, int f_end,
                       int k_end);

// Dequantises columns [c0, c0 + n) of row r into out[n].
void matview_row_avx512(const MatView *w, int r, int c0, int n, float *out);

// ops.c's exp-bound loops (ops_avx512.c): out = e^(x - shift); x = (x + y) · f (y NULL: x · f; a
// rounded sum then a rounded product, as the portable loops); a softmax row in place;
// Σ e^(x - shift) in double (the values stored into out too unless it is NULL); SwiGLU forward
// and backward.
void exp_n_avx512(float *out, const float *x, long n, float shift);
void add_scale_avx512(float *x, const float *y, long n, float f);
void softmax_avx512(float *x, int n);
double sum_exp_avx512(float *out, const float *x, int n, float shift);
void swiglu_forward_avx512(float *out, const float *gate, const float *up, long n);
void axpy_avx512(float *y, float a, const float *x, long n);
float scale_and_dot_avx512(float *out, float a, const float *x, const float *y, long n);
// argmax_f32's two passes: the largest value that is not a NaN (−inf when none), and the first
// index holding a value equal to v (−1 when none).
float max_finite_avx512(const float *x, int n);
// Σ x² over n values in double, in the order of backend_cpu.c's portable sum: 32 running sums,
// element j in sum j mod 32, then folded in halves (16 onto 0-15, 8 onto 0-7, ..., 1 onto 0).
double sum_squares_avx512(const float *x, long n);
int first_equal_avx512(const float *x, int n, float v);
void adamw_avx512(float *p, float *m, float *v, const float *g, long n, float lr, float beta1, float beta2, float eps,
                  float bc1, float bc2, float clip, float shrink, int stream);
void swiglu_backward_avx512(float *dgate, float *dup, const float *dout, const float *gate, const float *up, long n);
// ops.c's rmsnorm_forward with each row's Σ x² summed in 16 lanes, then folded (one row at a time:
// a row's bits do not depend on the others); its rmsnorm_backward with each row's Σ dy·w·x so.
void rmsnorm_forward_avx512(float *out, float *rstd, const float *inp, const float *weight, int N, int C, float eps);
void rmsnorm_backward_avx512(float *dinp, float *dweight, const float *dout, const float *inp, const float *weight,
                             const float *rstd, int N, int C);

// Absorbed attention's scores (attention_avx512.c): s[e * lds + j] = scale · (qa[e] · latent[j] +
// qp[e] · kpe[j]) for entries e < n and cached positions j < run (rows of L and r values, F32 or
// BF16 when bf16), one running sum per score over both halves then one lane fold: the same bits
// whatever n.
void latent_scores_avx512(float *s, int lds, const float *qa, const float *qp, int n, const void *lat,
                          const void *kpe, int bf16, int run, int L, int r, float scale);

// gemm_lowp's pieces: lowp_values over the leading multiple of 16 (returns how many), the FP8
// tiles' maxima (of n values; of n columns down kn rows, into m), and one thread's share of the
// product, the block rows [m_begin, m_end) × columns [n_begin, n_end) of C.
long lowp_values_avx512(float *out, const float *x, long n, LowpFormat fmt, float scale);
long lowp_e4m3_codes_avx512(uint8_t *codes, const float *x, long n, float scale);
long lowp_e4m3_scaled_avx512(float *x, const uint8_t *codes, long n, float scale);
float lowp_absmax_avx512(const float *x, long n);
void lowp_colmax_avx512(float *m, const float *x, long ld, int n, int kn);
void emulated_rows_avx512(float *C, int ldc, const float *a, const float *bt, int N, int K, int i0, int i1, int chunk,
                          int bits, int promote, const float *sa, const float *sbt, int add);
int gemm_lowp_avx512bf16(float *C, int ldc, const LowpOperand *A, const LowpOperand *B, int K, int add, int m_begin,
                         int m_end, int n_begin, int n_end);
// Rows [i0, i0 + len) × all K of an operand packed as gemm_lowp's panels of W rows (W 16 or 32;
// panel t at out + t * W * kp_alloc, word (kp, i) — elements 2kp and 2kp + 1 of row i0 + t·W + i,
// rounded as the operand's format says — at kp * W + i), pairs from ceil(K / 2) to kp_alloc and the
// rows past len in the last panel zero.
void lowp_pack_panels(uint32_t *out, int W, const LowpOperand *o, int i0, int len, int K, int kp_alloc);

// x · Wᵀ with BF16 compute for rows [r0, r1) of w on the AVX512_BF16 dot products as a blocked
// product (gemm_lowp's packing and register tiles), the weights packed per call: each output
// element summed along K in pairs (one fp32 chain per 256 columns, added in order; FP8: per
// 128-column chunk, × the block scale into the total) — matmul_nt_bf16c's order; a row's bits do
// not depend on N, the other rows or the split of [r0, r1). (gemm_lowp_avx512.c)
int matmul_nt_lowp_avx512(float *out, int ldo, const float *x, int ldx, const MatView *w, int N, int r0, int r1);
// Two such products of the same activations at once (out_a = x · waᵀ, out_b = x · wbᵀ, all rows,
// the activations packed once): each output the bits of matmul_nt_lowp_avx512's. -1 unless the
// matrices have the same columns and type and wa's rows are a multiple of 32.
int matmul_nt2_lowp_avx512(float *out_a, int ldo_a, float *out_b, int ldo_b, const float *x, int ldx,
                           const MatView *wa, const MatView *wb, int N);

// matmul_nt_lowp_avx512's and matmul_nt2_lowp_avx512's products, their bits, with the weights read
// from the views' panels (MatView.panels; a decode step's few rows stream several panels at once).
// -1 where a view has none (or, for the pair, where wa's rows are not a multiple of 32).
// (gemm_lowp_avx512.c; only where weight_panels_bytes is not 0.) weight_panel_bytes: one panel's.
int matmul_nt_panels(float *out, int ldo, const float *x, int ldx, const MatView *w, int N, int r0, int r1);
int matmul_nt2_panels(float *out_a, int ldo_a, float *out_b, int ldo_b, const float *x, int ldx, const MatView *wa,
                      const MatView *wb, int N);
size_t weight_panel_bytes(const MatView *w);
// matmul_nt_pieces on the views' panels: every piece's view has panels on the register tiles (not
// AMX), the pieces all FP8 or none, each N <= PIECES_MAX_N. -1 when scratch runs out.
#define PIECES_MAX_N 24  // (twice the register tiles' rows: two groups of rows)
int matmul_nt_pieces_panels(const NtPiece *pieces, int n);
// matmul_nt_pieces_ahead on panels: the first group's first PIECES_AHEAD bytes a panel.
#define PIECES_AHEAD 256
void matmul_nt_pieces_panels_ahead(const NtPiece *pieces, int n);

// Each E4M3 code's value as BF16 (256 entries, exact; the NaN codes a NaN), from matmul_bf16c.c.
const uint16_t *fp8_bf16_values(void);

// The AMX kernels (matmul_amx.c): gemm_lowp_avx512bf16's contract on tiles, and x · Wᵀ with BF16
// compute for rows [r0, r1) of w (matmul_nt_bf16c's arithmetic, the hardware's order of sums).
// Only after kernels_cpu_amx() returned 1; the _emulated twins run anywhere with AVX512_BF16 (a C
// model of the tile instructions: tests).
int gemm_lowp_amx(float *C, int ldc, const LowpOperand *A, const LowpOperand *B, int K, int add, int m_begin,
                  int m_end, int n_begin, int n_end);
// matmul_nt_amx reads w's stored rows (a view without panels).
int matmul_nt_amx(float *out, int ldo, const float *x, int ldx, const MatView *w, int N, int r0, int r1);
// x · Wᵀ for many activation rows on w's panels (matmul.h; prefill), in two parts so that
// activations shared by several products, or by the threads of a team, are rounded once:
// amx_pair_rows rounds rows [n0, n1) of x into BF16 pair words (rows past N zero: the rows are
// padded to a multiple of 32, amx_panel_words(N, K) words in all), matmul_nt_amx_rows multiplies
// them by rows [r0, r1) of w (r0 a multiple of 32) — -1 where w has no panels.
size_t amx_panel_words(int N, int K);
void amx_pair_rows(uint32_t *ap, const float *x, int ldx, int N, int K, int n0, int n1);
int matmul_nt_amx_rows(float *out, int ldo, const uint32_t *ap, int N, const MatView *w, int r0, int r1);
int matmul_nt_amx_rows_emulated(float *out, int ldo, const uint32_t *ap, int N, const MatView *w, int r0, int r1);
// x · Wᵀ on weight panels (matmul.h) on the tiles: np panels, each its words (BF16 pairs or FP8
// codes, K's kp_all pairs), where its 32 outputs of activation row 0 go (row n's at out + n · ldo;
// lanes: the outputs stored) and, FP8, its block row's scales per 128-column chunk; ap: N activation
// rows of BF16 pair words, kpa apart (kp_all padded with zeros to a multiple of 16), and past 16
// rows zero rows up to a multiple of 16; scratch: 2 · 32 · 32 + 32 · kpa floats.
typedef struct AmxPanel {
    const void *w;
    float *out;
    int ldo;
    uint32_t lanes;
    const float *scales;
} AmxPanel;
int panels_nt_amx(const AmxPanel *pn, int np, const uint32_t *ap, int kpa, int N, int kp_all, int fp8, float *scratch);
int panels_nt_amx_emulated(const AmxPanel *pn, int np, const uint32_t *ap, int kpa, int N, int kp_all, int fp8,
                           float *scratch);
// matmul_nt_panels as a view with panels_tiles runs it on AMX CPUs, on the C model of the tiles
// (tests; any CPU with AVX512_BF16 and VBMI).
int matmul_nt_panels_tiles_emulated(float *out, int ldo, const float *x, int ldx, const MatView *w, int N, int r0,
                                    int r1);
int gemm_lowp_amx_emulated(float *C, int ldc, const LowpOperand *A, const LowpOperand *B, int K, int add, int m_begin,
                           int m_end, int n_begin, int n_end);
int matmul_nt_amx_emulated(float *out, int ldo, const float *x, int ldx, const MatView *w, int N, int r0, int r1);

#endif
