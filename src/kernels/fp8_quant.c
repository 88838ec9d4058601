#include "kernels/fp8_quant.h"
#include "kernels/gemm_lowp.h"

// The 128 × 128 block scales and the codes of the training recipe's FP8 weights (gemm_lowp.c:
// lowp_fp8_scales, lowp_e4m3_codes — their vector maxima and encoder held to the scalar codec by
// tests/test_gemm_lowp.c), so a checkpoint's blocks are quantised as the recipe quantises W. (One
// thread and scalar, `dsv3 convert` of v3-wide's 1.1 GB of BF16 weights to FP8 took 2.95-5.39 s,
// ~70% of it here; 0.74-1.51 s so, the same bytes — the two builds taking turns, four runs each.)
int fp8_quantize_blocks(uint8_t *codes, float *scale_inv, const float *w, int rows, int cols) {
    LowpOperand op = {.data = w, .ld = cols, .fmt = LOWP_E4M3};
    if (lowp_fp8_scales(&op, scale_inv, rows, cols, LOWP_BLOCK_128x128)) return -1;
    lowp_e4m3_codes(codes, &op, rows, cols);
    return 0;
}
