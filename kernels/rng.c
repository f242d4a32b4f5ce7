// kernels/rng.c: counter-based generator (see rng.h).
#include "kernels/rng.h"

#include <math.h>

uint64_t mt_rng_bits(uint64_t seed, uint64_t counter) {
    uint64_t z = seed * 0x9e3779b97f4a7c15ull + (counter + 1) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    // a second round decorrelates neighbouring counters of nearby seeds
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

float mt_rng_uniform(uint64_t seed, uint64_t counter) {
    return (float)(mt_rng_bits(seed, counter) >> 40) * (1.0f / 16777216.0f);
}

float mt_rng_normal(uint64_t seed, uint64_t counter) {
    double u1 = ((double)(mt_rng_bits(seed, 2 * counter) >> 11) + 1.0) * (1.0 / 9007199254740993.0);
    double u2 = (double)(mt_rng_bits(seed, 2 * counter + 1) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}
