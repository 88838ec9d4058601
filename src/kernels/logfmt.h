// LogFMT-nBit (the DeepSeek-V3 hardware paper, ISCA '25 §3.2; SPEC §7): a logarithmic format for
// the expert-parallel all-to-all, per 1 × 128 tile of a row.
//
// Over a tile, min and max of log|x| over its non-zero values, with min raised to max − ln(2^32)
// when the range is wider; a value is a sign bit and an (n − 1)-bit code k: k = 0 is zero, k ≥ 1 is
// exp(min + (k − 1)·step) with step = (max − min) / (2^(n−1) − 2), so min ↦ S.00…01 and max ↦
// S.11…11. A value is rounded to the nearest level in LINEAR space (between two levels the
// threshold is their arithmetic mean; below the lowest level, between it and zero).
//
// On the wire a tile is its min and step (two fp32) and then its codes, n bits each, packed
// little-endian from the lowest bit: (sign << (n − 1)) | k.
#ifndef DSV3_KERNELS_LOGFMT_H
#define DSV3_KERNELS_LOGFMT_H

#include <stddef.h>
#include <stdint.h>

#define LOGFMT_TILE 128

// Bytes of a row of d values in LogFMT-bits (3 ≤ bits ≤ 16).
size_t logfmt_row_bytes(int d, int bits);
// One row of d values to and from the wire.
void logfmt_encode_row(uint8_t *dst, const float *x, int d, int bits);
void logfmt_decode_row(float *x, const uint8_t *src, int d, int bits);

// The level of code k ≥ 1 of a tile with this min and step (the one formula encode and decode use).
float logfmt_level(float min, float step, int k);

#endif
