// Matrix products with fp32 activations against weights stored as F32, BF16, F16 or block-scaled
// F8_E4M3. Weights are read in their stored type and widened to fp32 inside the kernel (a whole
// model is never expanded); accumulation is fp32. Work is split over OpenMP threads; the ISA
// (AVX-512, AVX-512-BF16, scalar) is chosen once at run time from CPUID.
#ifndef DSV3_KERNELS_MATMUL_H
#define DSV3_KERNELS_MATMUL_H

#include <stdint.h>

#include "base/dtype.h"

// A row-major weight matrix W[rows][cols] (HF layout [out, in]) in its stored type.
// F8_E4M3: the value is code × scale_inv[(row0 + r) / block][c / block] (block = 128 in released
// checkpoints; edge blocks are partial). row0 lets a view start inside a matrix (a head's rows of
// kv_b_proj) while the scale grid stays that of the whole matrix.
typedef struct MatView {
    DType dtype;
    int rows, cols;
    const void *data;          // points at row 0 of this view
    const float *scale_inv;    // F8_E4M3 only: the whole matrix's [ceil(R/block)][ceil(cols/block)]
    int scale_cols;            // ceil(cols / block)
    int block;                 // 128
    int row0;                  // first row of this view within the scaled matrix
    int compute_bf16;          // 1: x · Wᵀ products take x and W as BF16 values, fp32 sums (matmul_nt_bf16c)
    const void *panels;        // compute_bf16: this view's rows as weight_panels_pack laid them out (its row 0 on
                               // a panel's first row), which the BF16-compute products then read; NULL: none
    int panels_tiles;          // 1: the products on these panels run on the AMX tiles, for every N (where the
                               // CPU has them; see panels_nt_amx in kernels_cpu.h); 0: the register tiles
} MatView;

// Weight panels: a matrix's copy for the BF16-compute products on the AVX512_BF16 register tiles,
// packed once (at load) so that every product — a decode step's one row, a batch's few, a
// prompt's many — streams it as the tiles want it, with the same order of sums whatever N:
// panels of 32 rows, K in pairs of columns; per pair of a panel its 32 rows' BF16 value pairs
// (128 bytes: BF16 as stored, F32 and F16 rounded to nearest even) or, for FP8, the 64 codes (64
// bytes, in the order the byte look-ups unpack). Rows past the matrix and the column past an odd
// K are zero. weight_panels_bytes: the size for w (0: none for it — no AVX512_BF16 with VBMI here,
// or FP8 scales other than the release's 128 × 128 blocks); weight_panels_pack fills dst (that
// many bytes) on the calling thread's team (-1: w takes none).
size_t weight_panels_bytes(const MatView *w);
int weight_panels_pack(void *dst, const MatView *w);
// 1 when the BF16-compute x · Wᵀ products of a view with panels read nothing else (prefill's AMX
// tiles read them too); the stored matrix is then read only by other products (x · W) and
// look-ups.
int weight_panels_only(void);
// 1 when a view's panels_tiles puts its products on the AMX tiles here (the CPU has them).
int weight_panels_tiles(void);
// 1 when w's BF16-compute x · Wᵀ products read its weight panels here (it has them, and this CPU
// runs them): a view whose panels are its only copy (data NULL) is usable only then.
int matmul_on_panels(const MatView *w);

// out[n * ldo + r] = x[n * ldx ..] · W[r] for r in [r0, r1) with BF16 compute (matmul_bf16c.c):
// x rounded to BF16, W as BF16 values (FP8: codes, the block scale applied per 128-column chunk),
// fp32 sums in one order per output element whatever N (batch invariant): the AVX512_BF16
// register tiles packing w per call (matmul_nt_lowp_avx512), else a portable path with the same
// bits. The matmul_nt family takes this path for views with compute_bf16 set and no weight
// panels (with panels: the same tiles reading them, the same bits). No fork.
int matmul_nt_bf16c(float *out, int ldo, const float *x, int ldx, const MatView *w, int N, int r0, int r1);
// 1 when those products run fast here: AVX512_BF16 with AVX512_VBMI, so weight panels (FP8 widened
// by byte look-ups); 0 where a decode step's products would pack the weights per call or take the
// portable path, slower than fp32 (so `--compute auto` picks f32 there).
int matmul_bf16c_fast(void);

// Rows [r0, r0 + n) of w, as a view.
MatView matview_rows(const MatView *w, int r0, int n);

// Every product returns 0, or -1 when the view's dtype is not a weight type (F32, BF16, F16,
// F8_E4M3 with its scales) or scratch memory ran out; the backend turns that into an Error.
// out[N][rows] = x[N][cols] · Wᵀ   (a linear layer y = W x for N tokens)
int matmul_nt(float *out, const float *x, const MatView *w, int N);
// The same product for an F32 view through gemm_f32 (oneDNN) in blocks per thread: faster at
// training's sizes, but a row's bits may depend on N. -1 for other types.
int matmul_nt_gemm(float *out, const float *x, const MatView *w, int N);
// out[N][cols] = x[N][rows] · W    (the transposed product, e.g. folding W_UK into a query)
int matmul_nn(float *out, const float *x, const MatView *w, int N);
// One thread's share of the same products, computed on the calling thread without forking: for
// callers that run their own parallel region (a decode step forks once per token, not once per
// matrix). matmul_nt_part writes output features [r0, r1) of every row of out[N][rows];
// matmul_nn_part writes columns [c0, c1) of out[N][cols].
int matmul_nt_part(float *out, const float *x, const MatView *w, int N, int r0, int r1);
int matmul_nn_part(float *out, const float *x, const MatView *w, int N, int c0, int c1);
// out_a[N][wa rows] = x · waᵀ and out_b = x · wbᵀ on the calling thread, the bits of two
// matmul_nt_part over all rows (an expert's gate and up products: the blocked BF16-compute kernel
// packs x once for both where it takes them).
int matmul_nt2_part(float *out_a, float *out_b, const float *x, const MatView *wa, const MatView *wb, int N);
// Batch-invariant shares of the same products for any N, with row strides (ldo, ldx floats):
// every output element is ONE chain of fused multiply-adds in a fixed order, whatever N, the
// other rows and the split of the output — so a row's bits never depend on what it is batched
// with (batched decoding, speculative verification; tests/test_kernels.c). Weights are still read
// from memory once for all N rows (row groups follow each other over a tile kept in cache), but
// for large N the blocked product of matmul_nt is faster. With compute_bf16 these are the BF16
// products of matmul_nt_bf16c's order — on the view's weight panels where it has them, the same
// kernel as matmul_nt's, so there the two entries give the same bits.
// matmul_nt_invariant: out[n * ldo + r] = x[n * ldx ..] · W[r] for r in [r0, r1).
// matmul_nn_invariant: out[n * ldo + c] (add: +=, the chain going on from out) Σ_r x[n * ldx + r]
// W[r][c] for c in [c0, c1): a sum over row blocks, block after block, is the one chain.
int matmul_nt_invariant(float *out, int ldo, const float *x, int ldx, const MatView *w, int N, int r0, int r1);
int matmul_nn_invariant(float *out, int ldo, const float *x, int ldx, const MatView *w, int N, int c0, int c1, int add);
// Several matmul_nt_invariant products one after another, each piece rows [r0, r1) of its own w
// against its own N rows of x: on weight panels (with few rows) the pieces' panels are one stream,
// the next piece's first lines requested while the last group of this one is multiplied — a
// product of a few panels alone began with a pipeline of misses (`bench_kernels`, FP8 256 x 512,
// 64 KB a thread, 2 threads from memory: 47.8 GB/s one by one, 53.7 as lists of 8; scratch runs
// 52-57 against 58-62). Each output has matmul_nt_invariant's bits.
typedef struct NtPiece {
    const MatView *w;
    int r0, r1;        // w's rows
    const float *x;    // (N, w->cols), rows ldx apart
    int ldx, N;
    float *out;        // out[n · ldo + r] for r in [r0, r1)
    int ldo;
} NtPiece;
int matmul_nt_pieces(const NtPiece *pieces, int n);
// Requests the first lines matmul_nt_pieces(pieces, n) will read (none where it would not run on
// panels): issued before a meeting of the threads, they arrive while it lasts.
void matmul_nt_pieces_ahead(const NtPiece *pieces, int n);
// The backward pass of out = x · Wᵀ, the other two GEMMs of a linear layer:
// dx (N, cols) += dout · W (skipped when dx is NULL; any weight type) and
// dw (rows, cols) += doutᵀ · x (dw: an F32 view over writable memory, the gradient of w).
// dout: (N, rows)  x: (N, cols). Threads split the products in fixed blocks: for a given thread
// count the result is the same bits every run.
int matmul_backward(float *dx, const MatView *dw, const float *dout, const float *x, const MatView *w, int N);
// The writable fp32 data of an F32 view over memory the caller owns (gradients, training
// weights); NULL for any other dtype.
float *matview_f32_data(const MatView *w);
// An F32 view of rows × cols floats.
MatView matview_f32(const float *data, int rows, int cols);

// C (M×N, ldc) = alpha op(A) op(B) + beta C with fp32 operands, row-major, op = transpose when ta /
// tb (oneDNN's sgemm): on the calling thread inside a parallel region (the small products of one
// attention head in a parallel loop), on the OpenMP threads outside one.
// A parallel region calling it is bracketed by gemm_f32_serial_begin / _end, which keep the BLAS
// library from starting threads of its own under ours (returns and restores its setting).
int gemm_f32_serial_begin(void);
void gemm_f32_serial_end(int saved);
void gemm_f32(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
              float beta, float *C, int ldc);

// Dequantises row r of w into out[cols] (embedding look-ups).
int matview_row_f32(const MatView *w, int r, float *out);

// Which instruction set the kernels chose ("amx", "avx512bf16", "avx512", "scalar").
const char *kernels_isa(void);
// 1 when the CPU has AMX-BF16 tiles and Linux granted this process their state, whether or not
// kernels_set_isa left them in use (benchmarks measure the unit's peak either way).
int kernels_amx_present(void);
// Makes later calls use "scalar" (portable C + OpenBLAS), "avx512" (no BF16 dot products),
// "avx512bf16" (no AMX tiles) or the best the CPU has ("auto" or "amx"), so tests and benchmarks
// can compare the paths in one process (a set the CPU lacks stays off). The environment variable
// DSV3_ISA, read at the first product, sets the same from outside. Returns 0, or -1 for an unknown
// name. Not to be called while kernels run on other threads.
int kernels_set_isa(const char *isa);

#endif
