#include <math.h>
#include <omp.h>

#include "kernels/convert.h"
#include "kernels/fp8_quant.h"
#include "kernels/kernels_cpu.h"

// One block: its amax over the rows' segments [c0, c1), NaN ignored (fmaxf's, and the vector
// maximum's with the running value second), then each code from a division by the scale — on the
// AVX-512 path by lowp_e4m3_codes_avx512, which gives fp8_e4m3_from_f32's code for every input
// (tests/test_gemm_lowp.c holds them together), so the bytes do not depend on the path.
static void quantize_block(uint8_t *codes, float *scale_out, const float *w, int r0, int r1, int c0, int c1, int cols,
                           int vec) {
    float amax = 0;
    for (int r = r0; r < r1; r++) {
        const float *row = w + (long)r * cols;
        int c = c0;
        if (vec) amax = fmaxf(amax, lowp_absmax_avx512(row + c0, c1 - c0)), c = c1;
        for (; c < c1; c++) amax = fmaxf(amax, fabsf(row[c]));
    }
    float scale = fmaxf(amax, 1e-4f) / 448.0f;
    *scale_out = scale;
    for (int r = r0; r < r1; r++) {
        const float *row = w + (long)r * cols;
        uint8_t *out = codes + (long)r * cols;
        long c = c0;
        if (vec) c += lowp_e4m3_codes_avx512(out + c0, row + c0, c1 - c0, scale);
        for (; c < c1; c++) out[c] = fp8_e4m3_from_f32(row[c] / scale);
    }
}

// Blocks are independent (each its own codes and scale): spread over the threads when there are
// enough of them. (Scalar and on one thread, `dsv3 convert` of v3-wide's 1.1 GB of BF16 weights
// to FP8 took 2.95-5.39 s, ~70% of it here; now 0.74-1.51 s, the same bytes — the two builds
// taking turns, four runs each.)
void fp8_quantize_blocks(uint8_t *codes, float *scale_inv, const float *w, int rows, int cols, int block) {
    const int sr = (rows + block - 1) / block, sc = (cols + block - 1) / block, vec = kernels_cpu_avx512();
    const long n = (long)sr * sc;
#pragma omp parallel for schedule(static) if (!omp_in_parallel() && (long)rows * cols >= (1L << 16))
    for (long b = 0; b < n; b++) {
        int br = (int)(b / sc) * block, bc = (int)(b % sc) * block;
        int re = br + block < rows ? br + block : rows, ce = bc + block < cols ? bc + block : cols;
        quantize_block(codes, scale_inv + b, w, br, re, bc, ce, cols, vec);
    }
}
