// A small deterministic random generator (xoshiro256** seeded by splitmix64): the same seed gives
// the same stream on every machine, which init, sampling and training rely on.
#ifndef DSV3_BASE_RNG_H
#define DSV3_BASE_RNG_H

#include <stdint.h>

typedef struct Rng {
    uint64_t s[4];
} Rng;

void rng_seed(Rng *r, uint64_t seed);
uint64_t rng_next(Rng *r);
// Uniform in [0, 1) with 24 bits (exactly representable in fp32).
float rng_uniform(Rng *r);
// Standard normal (Box-Muller).
float rng_normal(Rng *r);

#endif
