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
// 64 bits for (seed, group) at a sixth of Philox's cost, where independent
// bits suffice (dropout's masks, MeZO's rounding bits on the GPU): SplitMix64's
// finaliser of seed ^ (group * 0x9e3779b97f4a7c15).
uint64_t mt_rng_hash(uint64_t seed, uint64_t group);
// Dropout's mask (the CPU's and the GPU's): index i is kept when its 16-bit
// draw, bits 16 (i % 4) .. 16 (i % 4) + 15 of mt_rng_hash(seed, i / 4), is at
// least mt_dropout_threshold(p) = p * 65536 rounded (p to 1/65536).
uint32_t mt_dropout_threshold(float p);
int mt_dropout_kept(uint64_t seed, uint64_t i, uint32_t threshold);
// The four of one hash: bit q set when index 4 group + q is kept.
unsigned mt_dropout_keep4(uint64_t seed, uint64_t group, uint32_t threshold);
// Uniform in [0, 1) with 24 bits.
float mt_rng_uniform(uint64_t seed, uint64_t counter);
// Standard normal (Box-Muller on two uniforms drawn at 2*counter, 2*counter+1).
float mt_rng_normal(uint64_t seed, uint64_t counter);
// Four standard normals of group g at a third of mt_rng_normal's cost each
// (random initialisation): the words of mt_rng_bits(seed, 2g) and (seed,
// 2g + 1), low half first, make two Box-Muller pairs in single precision
// from 24-bit uniforms u1 = (w >> 8 + 1) / 2^24 in (0, 1] and u2 = (w >> 8)
// / 2^24: out = r cos(2 pi u2), r sin(2 pi u2), r = sqrt(-2 ln u1) (so |out|
// <= 5.8).
void mt_rng_normal4(uint64_t seed, uint64_t group, float out[4]);

// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2,
// 3", SC 2011): 4 x 32 random bits for a 128-bit counter and a 64-bit key.
// The same function as cuRAND's curand_Philox4x32_10, which the GPU calls.
void mt_philox4x32_10(const uint32_t counter[4], const uint32_t key[2], uint32_t out[4]);

// The perturbation stream of MeZO (and GaLore's random matrices): z(seed, i),
// i = 0, 1, ..., standard normal. Group g = i / 4 is one Philox call keyed
// by the seed at counter (g low, g high, 0, 0); its words (a, b) and (c, d)
// give two Box-Muller pairs from 23-bit uniforms made by placing a word's
// top 23 bits in a float's mantissa, u1 = 2 - 1.m(a) in (0, 1] and
// u2 = 1.m(b) - 1 in [0, 1) (exact in single precision, no integer-to-float
// conversion): z[4g] = r cos(2 pi u2), z[4g+1] = r sin(2 pi u2),
// r = sqrt(-2 ln u1), likewise z[4g+2], z[4g+3] from (c, d). The GPU draws
// the same words from cuRAND and differs only by its single-precision
// hardware log/sqrt/sin/cos: absolute differences near 1e-6, and about
// 1e-7 / r for a pair whose radius r is tiny (u1 within 1e-6 of 1).
void mt_rng_gauss4(uint64_t seed, uint64_t group, float out[4]);
// 1.m in [1, 2): the word's top 23 bits as the mantissa of a float.
float mt_rng_mantissa_float(uint32_t word);
float mt_rng_gauss(uint64_t seed, uint64_t i);
// 32 random bits number i of the stream keyed by seed (Philox group i / 4,
// word i % 4): the stochastic-rounding bits of the GPU's MeZO update.
uint32_t mt_rng_philox_word(uint64_t seed, uint64_t i);

#ifdef __cplusplus
}
#endif
#endif
