#include <math.h>

#include "kernels/convert.h"
#include "kernels/fp8_quant.h"

void fp8_quantize_blocks(uint8_t *codes, float *scale_inv, const float *w, int rows, int cols, int block) {
    int sc = (cols + block - 1) / block;
    for (int br = 0; br < rows; br += block)
        for (int bc = 0; bc < cols; bc += block) {
            int re = br + block < rows ? br + block : rows, ce = bc + block < cols ? bc + block : cols;
            float amax = 0;
            for (int r = br; r < re; r++)
                for (int c = bc; c < ce; c++) amax = fmaxf(amax, fabsf(w[(long)r * cols + c]));
            float scale = fmaxf(amax, 1e-4f) / 448.0f;
            scale_inv[(br / block) * sc + bc / block] = scale;
            for (int r = br; r < re; r++)
                for (int c = bc; c < ce; c++) codes[(long)r * cols + c] = fp8_e4m3_from_f32(w[(long)r * cols + c] / scale);
        }
}
