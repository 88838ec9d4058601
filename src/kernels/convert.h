// Scalar codecs between fp32 and the stored types. fp32 → narrow conversions round to nearest,
// ties to even; the FP8 quantisers saturate to ±max (E4M3 448, E5M2 57344).
#ifndef DSV3_KERNELS_CONVERT_H
#define DSV3_KERNELS_CONVERT_H

#include <stddef.h>
#include <stdint.h>

float bf16_to_f32(uint16_t h);
uint16_t bf16_from_f32(float f);
float f16_to_f32(uint16_t h);
uint16_t f16_from_f32(float f);
float fp8_e4m3_to_f32(uint8_t c);
uint8_t fp8_e4m3_from_f32(float f);   // saturating, NaN stays NaN (S.1111.111)
float fp8_e5m2_to_f32(uint8_t c);
uint8_t fp8_e5m2_from_f32(float f);   // saturating to ±57344 (inf/NaN kept)

// Bulk conversions (vectorised where the CPU allows).
void bf16_to_f32_n(float *out, const uint16_t *in, size_t n);
void bf16_from_f32_n(uint16_t *out, const float *in, size_t n);

#endif
