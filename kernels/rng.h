// kernels/rng.h: the CPU's counter-based random numbers. A value depends only
// on (seed, counter), never on call order, so any element of any stream can be
// regenerated (MeZO's z, initialisation of one tensor) without storing it.
#ifndef MT_RNG_H
#define MT_RNG_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// 64 random bits for (seed, counter): SplitMix64's finaliser applied to a
// Weyl sequence keyed by the seed (Steele et al., 2014).
uint64_t mt_rng_bits(uint64_t seed, uint64_t counter);
// Uniform in [0, 1) with 24 bits.
float mt_rng_uniform(uint64_t seed, uint64_t counter);
// Standard normal (Box-Muller on two uniforms drawn at 2*counter, 2*counter+1).
float mt_rng_normal(uint64_t seed, uint64_t counter);

#ifdef __cplusplus
}
#endif
#endif
