// BF16 compute of the x · Wᵀ products (MatView.compute_bf16; `--compute bf16`): each activation
// rounded to BF16 (nearest even), each weight taken as a BF16 value — BF16 as stored, F32 and F16
// rounded to nearest even, FP8 E4M3 exactly (every E4M3 value is a BF16 value) with its block scale
// applied in fp32 to each 128-column chunk's sum — and the products summed in fp32.
//
// One order of the sums per output element, whatever the number of activation rows, the other
// rows and the thread split (batch invariance): the columns in pairs, each pair's two products
// added to a running fp32 sum (the odd column's first, as vdpbf16ps adds them), one sum from zero
// per 256 columns, added in order to the total; FP8: one sum per 128-column chunk, added to the
// total fused with the chunk's scale. That is the order of the AVX512_BF16 register tiles
// (gemm_lowp_avx512.c: on the model's weight panels, or packing the weights per call as here),
// and the portable path below computes it with the instruction's documented arithmetic (each
// product exact in fp32, each add rounded): the same bits (tests/test_bf16c.c), except where the
// instruction treats a subnormal BF16 input as zero or flushes a subnormal sum. (Until the
// fifteenth session an AVX512_BF16 dot-product kernel here summed 16 lanes and folded them — its
// own order, bandwidth-bound at one row; the panels read as fast and share prefill's order.)
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "kernels/convert.h"
#include "kernels/kernels_cpu.h"
#include "kernels/matmul.h"

// E4M3 code → its value as BF16 (exact; the NaN codes S.1111.111 → a NaN).
static uint16_t fp8_bf16[256];
static pthread_once_t tables_once = PTHREAD_ONCE_INIT;

static void tables_init(void) {
    for (int c = 0; c < 256; c++)
        fp8_bf16[c] = (c & 0x7f) == 0x7f ? (uint16_t)(0x7fc0 | (c & 0x80) << 8) : bf16_from_f32(fp8_e4m3_to_f32((uint8_t)c));
}

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

static void bf16c_rows_portable(float *out, int ldo, const float *x, int ldx, int N, const MatView *w, int r0,
                                int r1) {
    const int cols = w->cols, fp8 = w->dtype == DT_F8_E4M3, chain = fp8 ? 128 : 256;
    for (int n = 0; n < N; n++) {
        const float *xn = x + (size_t)n * ldx;
        for (int r = r0; r < r1; r++) {
            float tot = 0.0f;
            for (int c0 = 0; c0 < cols; c0 += chain) {
                float acc = 0.0f;
                for (int c = c0; c < c0 + chain && c < cols; c += 2) {
                    float even = weight_bf16(w, r, c) * bf16_to_f32(bf16_from_f32(xn[c]));
                    float odd = c + 1 < cols ? weight_bf16(w, r, c + 1) * bf16_to_f32(bf16_from_f32(xn[c + 1])) : 0.0f;
                    acc = (acc + odd) + even;
                }
                tot = fp8 ? fmaf(acc, fp8_scale(w, r, c0 / 128), tot) : acc + tot;
            }
            out[(size_t)n * ldo + r] = tot;
        }
    }
}

int matmul_nt_bf16c(float *out, int ldo, const float *x, int ldx, const MatView *w, int N, int r0, int r1) {
    if (N <= 0 || r1 <= r0) return 0;
    if (w->dtype == DT_F8_E4M3 && (w->block != 128 || !w->scale_inv)) return -1;  // (the release's blocks)
    if (kernels_cpu_avx512bf16()) return matmul_nt_lowp_avx512(out, ldo, x, ldx, w, N, r0, r1);
    pthread_once(&tables_once, tables_init);
    bf16c_rows_portable(out, ldo, x, ldx, N, w, r0, r1);
    return 0;
}

int matmul_bf16c_fast(void) { return kernels_cpu_avx512bf16_vbmi(); }

const uint16_t *fp8_bf16_values(void) {
    pthread_once(&tables_once, tables_init);
    return fp8_bf16;
}
