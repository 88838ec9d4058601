// logfmt.h: LogFMT-nBit tiles, scalar (the all-to-all payloads are small next to the experts).
#include <math.h>
#include <string.h>

#include "kernels/logfmt.h"

size_t logfmt_row_bytes(int d, int bits) {
    size_t bytes = 0;
    for (int c = 0; c < d; c += LOGFMT_TILE) {
        int n = d - c < LOGFMT_TILE ? d - c : LOGFMT_TILE;
        bytes += 2 * sizeof(float) + ((size_t)n * bits + 7) / 8;
    }
    return bytes;
}

float logfmt_level(float min, float step, int k) { return expf(min + (float)(k - 1) * step); }

// n-bit fields, little-endian from the lowest bit of the first byte.
static void put_bits(uint8_t *p, size_t at, int bits, unsigned v) {
    for (int b = 0; b < bits; b++, at++) {
        uint8_t m = (uint8_t)(1u << (at % 8));
        if (v >> b & 1) p[at / 8] |= m;
        else p[at / 8] &= (uint8_t)~m;
    }
}

static unsigned get_bits(const uint8_t *p, size_t at, int bits) {
    unsigned v = 0;
    for (int b = 0; b < bits; b++, at++) v |= (unsigned)(p[at / 8] >> (at % 8) & 1) << b;
    return v;
}

// The code of magnitude a > 0: the nearest level in linear space.
static int nearest(float a, float min, float step, int kmax) {
    float lo = logfmt_level(min, step, 1);
    if (a <= lo) return a < 0.5f * lo ? 0 : 1;
    int k = step > 0 ? 1 + (int)floorf((logf(a) - min) / step) : 1;
    if (k >= kmax) return kmax;
    if (k < 1) k = 1;
    // logf may land one level off: settle on the bracket [level k, level k + 1] that holds a
    while (k > 1 && logfmt_level(min, step, k) > a) k--;
    while (k < kmax && logfmt_level(min, step, k + 1) <= a) k++;
    if (k == kmax) return kmax;
    float below = logfmt_level(min, step, k), above = logfmt_level(min, step, k + 1);
    return a - below <= above - a ? k : k + 1;  // a tie goes to the smaller magnitude
}

void logfmt_encode_row(uint8_t *dst, const float *x, int d, int bits) {
    int kmax = (1 << (bits - 1)) - 1;
    for (int c = 0; c < d; c += LOGFMT_TILE) {
        int n = d - c < LOGFMT_TILE ? d - c : LOGFMT_TILE;
        const float *t = x + c;
        float lmin = INFINITY, lmax = -INFINITY;
        for (int i = 0; i < n; i++) {
            float a = fabsf(t[i]);
            if (a == 0 || !isfinite(a)) continue;
            float l = logf(a);
            lmin = l < lmin ? l : lmin;
            lmax = l > lmax ? l : lmax;
        }
        float min = 0, step = 0;
        if (lmax >= lmin) {  // a non-zero value
            float floor_ = lmax - 32.0f * (float)M_LN2;
            min = lmin > floor_ ? lmin : floor_;
            step = (lmax - min) / (float)(kmax - 1);
        }
        memcpy(dst, &min, sizeof min);
        memcpy(dst + 4, &step, sizeof step);
        uint8_t *codes = dst + 8;
        for (int i = 0; i < n; i++) {
            float a = fabsf(t[i]);
            int k = (a == 0 || !(lmax >= lmin)) ? 0 : !isfinite(a) ? kmax : nearest(a, min, step, kmax);
            put_bits(codes, (size_t)i * bits, bits, (unsigned)(signbit(t[i]) ? 1 : 0) << (bits - 1) | (unsigned)k);
        }
        dst = codes + ((size_t)n * bits + 7) / 8;
    }
}

void logfmt_decode_row(float *x, const uint8_t *src, int d, int bits) {
    unsigned kmask = (1u << (bits - 1)) - 1;
    for (int c = 0; c < d; c += LOGFMT_TILE) {
        int n = d - c < LOGFMT_TILE ? d - c : LOGFMT_TILE;
        float min, step;
        memcpy(&min, src, sizeof min);
        memcpy(&step, src + 4, sizeof step);
        const uint8_t *codes = src + 8;
        for (int i = 0; i < n; i++) {
            unsigned v = get_bits(codes, (size_t)i * bits, bits), k = v & kmask;
            float a = k ? logfmt_level(min, step, (int)k) : 0.0f;
            x[c + i] = v >> (bits - 1) ? -a : a;
        }
        src = codes + ((size_t)n * bits + 7) / 8;
    }
}
