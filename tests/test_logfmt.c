// LogFMT-nBit (kernels/logfmt.h) against a brute-force reading of its definition: every decoded
// value is the level nearest the input in linear space among ALL of the tile's levels (and zero),
// the tile's smallest and largest magnitudes take codes 1 and 2^(n-1) - 1, a range wider than 2^32
// is cut from below, and the bytes are as stated.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/logfmt.h"
#include "test.h"

// The decoded value the definition asks for: sign × the nearest of {0, level 1 .. level kmax} in
// linear distance, ties to the smaller magnitude, with the tile's min and step as stored.
static float brute(float x, float min, float step, int kmax) {
    float a = fabsf(x), best = 0, bd = a;
    for (int k = 1; k <= kmax; k++) {
        float l = logfmt_level(min, step, k), dist = fabsf(l - a);
        if (dist < bd) bd = dist, best = l;
    }
    return signbit(x) ? -best : best;
}

static uint64_t lcg(uint64_t *s) { return *s = *s * 6364136223846793005ULL + 1442695040888963407ULL; }
static double uni(uint64_t *s) { return (double)(lcg(s) >> 11) / 9007199254740992.0; }

TEST(test_logfmt_nearest_level_everywhere) {
    uint64_t seed = 7;
    const int ds[] = {128, 300, 7};  // whole tiles, a ragged last tile, one short tile
    for (int bits = 6; bits <= 10; bits += 2)
        for (int di = 0; di < 3; di++)
            for (int kind = 0; kind < 4; kind++) {
                int d = ds[di], kmax = (1 << (bits - 1)) - 1;
                float x[300], y[300];
                for (int i = 0; i < d; i++) {
                    double g = sqrt(-2 * log(uni(&seed) + 1e-300)) * cos(6.283185307 * uni(&seed));
                    x[i] = kind == 0   ? (float)g                                    // normal activations
                           : kind == 1 ? (float)(exp(8 * g) * (uni(&seed) < 0.5 ? -1 : 1))  // wide range
                           : kind == 2 ? (uni(&seed) < 0.3 ? 0.0f : (float)g)          // zeros among them
                                       : (float)exp(fmax(-80, fmin(80, 25 * g)));     // wider than 2^32
                }
                size_t nb = logfmt_row_bytes(d, bits);
                uint8_t *w = malloc(nb);
                logfmt_encode_row(w, x, d, bits);
                logfmt_decode_row(y, w, d, bits);
                const uint8_t *tile = w;
                for (int c = 0; c < d; c += LOGFMT_TILE) {
                    int n = d - c < LOGFMT_TILE ? d - c : LOGFMT_TILE;
                    float min, step;
                    memcpy(&min, tile, 4);
                    memcpy(&step, tile + 4, 4);
                    float lmin = INFINITY, lmax = -INFINITY;
                    for (int i = c; i < c + n; i++)
                        if (x[i] != 0) lmin = fminf(lmin, logf(fabsf(x[i]))), lmax = fmaxf(lmax, logf(fabsf(x[i])));
                    // min is the smallest log-magnitude, cut to max − 32 ln 2; step spans the range
                    CHECK_MSG(fabsf(min - fmaxf(lmin, lmax - 32 * (float)M_LN2)) <= 1e-6f * fmaxf(1, fabsf(min)),
                              "bits %d kind %d: min %g, want %g", bits, kind, min, fmaxf(lmin, lmax - 32 * (float)M_LN2));
                    CHECK(fabsf(min + (kmax - 1) * step - lmax) <= 1e-5f * fmaxf(1, fabsf(lmax)));
                    for (int i = c; i < c + n; i++) {
                        float want = brute(x[i], min, step, kmax);
                        CHECK_MSG(y[i] == want, "bits %d kind %d d %d: x %.9g -> %.9g, nearest level %.9g", bits,
                                  kind, d, x[i], y[i], want);
                        if (lmin > lmax - 32 * (float)M_LN2 && x[i] != 0) {  // in range: within half a step
                            double rel = fabs(y[i] - x[i]) / fabs(x[i]);
                            CHECK_MSG(rel <= (exp(step) - 1) / 2 * 1.0001 + 1e-6, "rel %g step %g", rel, step);
                        }
                    }
                    tile += 8 + ((size_t)n * bits + 7) / 8;
                }
                CHECK(tile == w + nb);
                free(w);
            }
}

TEST(test_logfmt_extremes_and_bytes) {
    float x[128], y[128];
    for (int i = 0; i < 128; i++) x[i] = (float)(i + 1) * (i % 2 ? -1 : 1);
    uint8_t w[200];
    logfmt_encode_row(w, x, 128, 8);
    logfmt_decode_row(y, w, 128, 8);
    // the smallest and largest magnitudes are levels 1 and 127: 1 and 128 come back (to the ulp
    // of expf), with their signs
    CHECK(fabsf(y[0] - 1.0f) <= 1e-6f && fabsf(y[127] + 128.0f) <= 128 * 2e-6f);
    uint8_t c0 = w[8], c127 = w[8 + 127];
    CHECK(c0 == 0x01 && c127 == (0x80 | 0x7f));
    // zero is code 0; a tile of zeros decodes to zeros
    memset(x, 0, sizeof x);
    x[5] = -0.0f;
    logfmt_encode_row(w, x, 128, 8);
    logfmt_decode_row(y, w, 128, 8);
    for (int i = 0; i < 128; i++) CHECK(y[i] == 0);
    // bytes: per tile two floats and n bits per value
    CHECK(logfmt_row_bytes(128, 8) == 8 + 128 && logfmt_row_bytes(128, 10) == 8 + 160);
    CHECK(logfmt_row_bytes(300, 10) == 2 * (8 + 160) + 8 + (44 * 10 + 7) / 8);
    CHECK(logfmt_row_bytes(7168, 8) < 7168 * 2 && logfmt_row_bytes(7168, 8) > 7168);
}
