// The low-precision GEMMs of mixed-precision training (SPEC §3; the V3 report §3.3):
// C (M × N) = A (M × K) · B (N × K)ᵀ with both operands read from fp32 and rounded as they are
// packed, accumulating in fp32.
//   BF16: each operand rounded to nearest even; one fp32 accumulation over K.
//   FP8:  each operand quantised with its own scales, code = E4M3 or E5M2 of (x / scale), round to
//         nearest even, saturating; each 128-element chunk of K is summed in fp32 and then
//         multiplied by the two scales and added to the fp32 result (the report's promotion).
// Every E4M3 / E5M2 value is exactly a BF16 value, so both run on the same BF16 dot products
// (AVX512_BF16, chosen at run time) with a portable fallback (operands rounded into fp32 buffers,
// OpenBLAS sgemm). The dot-product instruction treats subnormal BF16 inputs as zero and flushes
// subnormal results; FP8 values are never subnormal as BF16, so only BF16 operands below 2^-126
// (and the fallback, which keeps them) can differ there.
#ifndef DSV3_KERNELS_GEMM_LOWP_H
#define DSV3_KERNELS_GEMM_LOWP_H

#include <limits.h>
#include <stdint.h>

typedef enum { LOWP_BF16, LOWP_E4M3, LOWP_E5M2 } LowpFormat;

// The chunk of K whose partial sum is promoted, and the width of a fine-grained FP8 tile.
#define LOWP_FP8_CHUNK 128

// One operand: element (i, k) of a rows × K matrix is data[i * ld + k] (trans 0: rows along K, as
// activations x (tokens × features) and weights W (out × in) are stored) or data[k * ld + i]
// (trans 1: the transposed view, as the backward passes read W and the activations).
// FP8 scale of element (i, k): scale[(i / scale_rows) * scale_ld + (k / 128) * scale_kstep]:
//   1 × 128 tiles:   scale_rows 1,   scale_ld = ceil(K / 128), scale_kstep 1
//   128 × 128 blocks: scale_rows 128, scale_ld = ceil(K / 128), scale_kstep 1
//   one per tensor:   scale_rows INT_MAX, scale_ld 0, scale_kstep 0
// (lowp_fp8_scales fills them; any strides that address the array are accepted).
typedef struct LowpOperand {
    const float *data;
    int ld, trans;
    LowpFormat fmt;
    int pow2;  // FP8: scales computed by lowp_fp8_scales rounded up to a power of two (lowp_ue8m0)
    const float *scale;
    int scale_rows, scale_ld, scale_kstep;
} LowpOperand;

typedef enum { LOWP_TILE_1x128, LOWP_BLOCK_128x128, LOWP_TENSOR } LowpScaling;

// The FP8 scale of element (i, k) of an operand (the formula above).
static inline float lowp_scale_of(const LowpOperand *o, int i, int k) {
    return o->scale[(long)(i / o->scale_rows) * o->scale_ld + (long)(k / LOWP_FP8_CHUNK) * o->scale_kstep];
}

// The largest finite value of an FP8 format (E4M3 448, E5M2 57344).
float lowp_fp8_max(LowpFormat fmt);
// s rounded up to a power of two, 2^ceil(log2 s): a UE8M0 scale (an exponent only, as DeepSeek's
// later FP8 kernels and the report's power-of-two scaling factors use). The tile's amax then maps
// to between half the format's max and its max, never past it. s > 0 and finite.
float lowp_ue8m0(float s);

// Floats lowp_fp8_scales writes for a rows × K operand.
long lowp_fp8_scale_count(int rows, int K, LowpScaling how);
// Computes op's scales over its rows × K elements into scale (lowp_fp8_scale_count floats) and
// points op at them: scale = max(amax of the tile, 1e-4) / max of op->fmt (DeepSeek's act_quant and
// weight quantiser), rounded up to a power of two when op->pow2. op->fmt must be an FP8 format. -1
// when scratch memory ran out.
int lowp_fp8_scales(LowpOperand *op, float *scale, int rows, int K, LowpScaling how);

// The value an element is packed as (exactly representable in BF16): bf16(x), or the FP8 value
// fmt(x / scale) (without the scale). Scalar; the reference the vector packers are tested against.
float lowp_value(LowpFormat fmt, float x, float scale);
// The same over n values with one scale, vectorised where the CPU allows (tests, tools).
void lowp_values(float *out, const float *x, long n, LowpFormat fmt, float scale);

// C (M × N, row stride ldc) = (add: +=) A · Bᵀ as above. A and B must be both BF16 or both FP8
// (the two FP8 formats may differ). Splits the work over OpenMP threads (one when called inside a
// parallel region). Returns 0, or -1 on mismatched formats or when scratch memory ran out.
int gemm_lowp(float *C, int ldc, const LowpOperand *A, const LowpOperand *B, int M, int N, int K, int add);

// How an FP8 product accumulates. bits 0: in fp32 (the default). bits B > 0: emulates the H800
// tensor core the V3 report describes — each group of 32 products aligned to the largest exponent
// among them and the running sum, keeping B bits (13-14 on the H800), truncated. promote 1: that
// only within each 128-chunk, promoted to fp32 with the scales (the report's fix); 0: one such sum
// over all of K of the scaled products. The emulation is far slower than the units (ablations, tables).
typedef struct LowpAccum {
    int bits;
    int promote;
} LowpAccum;

// The same, first computing the scales of an FP8 operand whose scaling is given (a LowpScaling;
// -1: the operand's scales are already set) into the caller's buffer of lowp_fp8_scale_count
// floats, in the same team of threads as the product (one fork per product, not three). The
// operand is pointed at its buffer as lowp_fp8_scales does. accum NULL: fp32 accumulation.
int gemm_lowp_scaled(float *C, int ldc, LowpOperand *A, int scale_a_how, float *scale_a, LowpOperand *B,
                     int scale_b_how, float *scale_b, int M, int N, int K, int add, const LowpAccum *accum);

// Activations kept for the backward pass in FP8 (the report's low-precision storage): rows × cols
// fp32 → E4M3 codes (rows × cols bytes) with one scale per 1 × 128 tile of a row (rows ×
// ceil(cols / 128) floats, max(amax, 1e-4) / 448, a power of two when pow2) — the codes the forward
// GEMM quantises the same rows to — and back, code × scale in fp32. Threads over rows.
void lowp_fp8_save_rows(uint8_t *codes, float *scales, const float *x, long rows, int cols, int pow2);
// The E4M3 codes of an operand set up by lowp_fp8_scales (not transposed, op->fmt LOWP_E4M3): code
// (i, k) = E4M3(x / lowp_scale_of(op, i, k)), a division, as convert.h's codec gives it. Threads
// over rows.
void lowp_e4m3_codes(uint8_t *codes, const LowpOperand *op, long rows, int cols);
void lowp_fp8_restore_rows(float *x, const uint8_t *codes, const float *scales, long rows, int cols);

// Which path gemm_lowp takes: "avx512bf16" or "portable".
const char *gemm_lowp_isa(void);

#endif
