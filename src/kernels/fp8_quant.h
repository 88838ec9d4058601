// Block-scaled FP8 quantisation (SPEC §3): one fp32 scale per 128×128 tile of a matrix,
// scale = max(amax, 1e-4) / 448, code = E4M3(w / scale); dequantised value = code × scale.
#ifndef DSV3_KERNELS_FP8_QUANT_H
#define DSV3_KERNELS_FP8_QUANT_H

#include <stdint.h>

// Blocks of 128 × 128 (the release's). w: (rows, cols) fp32   codes: (rows, cols)
// scale_inv: (ceil(rows/128), ceil(cols/128)). -1 when scratch memory ran out.
int fp8_quantize_blocks(uint8_t *codes, float *scale_inv, const float *w, int rows, int cols);

#endif
