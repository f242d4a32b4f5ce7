// kernels/rng.c: counter-based generator (see rng.h).
#include "kernels/rng.h"

#include <math.h>
#include <string.h>

// SplitMix64's finaliser.
static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

uint64_t mt_rng_bits(uint64_t seed, uint64_t counter) {
    uint64_t z = mix64(seed * 0x9e3779b97f4a7c15ull + (counter + 1) * 0xbf58476d1ce4e5b9ull);
    // a second round decorrelates neighbouring counters of nearby seeds
    return mix64(z + 0x9e3779b97f4a7c15ull);
}

uint64_t mt_rng_hash(uint64_t seed, uint64_t group) { return mix64(seed ^ (group * 0x9e3779b97f4a7c15ull)); }

uint32_t mt_dropout_threshold(float p) { return (uint32_t)lrintf(p * 65536.0f); }

unsigned mt_dropout_keep4(uint64_t seed, uint64_t group, uint32_t threshold) {
    uint64_t bits = mt_rng_hash(seed, group);
    unsigned keep = 0;
    for (int q = 0; q < 4; q++) keep |= (unsigned)(((bits >> (16 * q)) & 0xffffu) >= threshold) << q;
    return keep;
}

int mt_dropout_kept(uint64_t seed, uint64_t i, uint32_t threshold) {
    return mt_dropout_keep4(seed, i / 4, threshold) >> (i % 4) & 1;
}

float mt_rng_uniform(uint64_t seed, uint64_t counter) {
    return (float)(mt_rng_bits(seed, counter) >> 40) * (1.0f / 16777216.0f);
}

float mt_rng_normal(uint64_t seed, uint64_t counter) {
    double u1 = ((double)(mt_rng_bits(seed, 2 * counter) >> 11) + 1.0) * (1.0 / 9007199254740993.0);
    double u2 = (double)(mt_rng_bits(seed, 2 * counter + 1) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

void mt_rng_normal4(uint64_t seed, uint64_t group, float out[4]) {
    uint64_t a = mt_rng_bits(seed, 2 * group), b = mt_rng_bits(seed, 2 * group + 1);
    uint32_t w[4] = {(uint32_t)a, (uint32_t)(a >> 32), (uint32_t)b, (uint32_t)(b >> 32)};
    for (int pair = 0; pair < 2; pair++) {
        float u1 = ((float)(w[2 * pair] >> 8) + 1.0f) * (1.0f / 16777216.0f);
        float u2 = (float)(w[2 * pair + 1] >> 8) * (1.0f / 16777216.0f);
        float r = sqrtf(-2.0f * logf(u1)), angle = 6.28318530717958648f * u2;
        out[2 * pair] = r * cosf(angle);
        out[2 * pair + 1] = r * sinf(angle);
    }
}

// One Philox round: two 32x32->64 multiplies mix the counter words, the key
// is added by xor (the constants are the paper's).
static void philox_round(uint32_t c[4], const uint32_t k[2]) {
    uint64_t p0 = (uint64_t)0xD2511F53u * c[0], p1 = (uint64_t)0xCD9E8D57u * c[2];
    uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0, hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
    uint32_t next[4] = {hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0};
    memcpy(c, next, sizeof next);
}

void mt_philox4x32_10(const uint32_t counter[4], const uint32_t key[2], uint32_t out[4]) {
    uint32_t c[4] = {counter[0], counter[1], counter[2], counter[3]}, k[2] = {key[0], key[1]};
    for (int round = 0; round < 10; round++) {
        if (round) k[0] += 0x9E3779B9u, k[1] += 0xBB67AE85u;  // the key schedule's Weyl constants
        philox_round(c, k);
    }
    memcpy(out, c, sizeof c);
}

static void philox_group(uint64_t seed, uint64_t group, uint32_t out[4]) {
    uint32_t counter[4] = {(uint32_t)group, (uint32_t)(group >> 32), 0, 0};
    uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    mt_philox4x32_10(counter, key, out);
}

float mt_rng_mantissa_float(uint32_t word) {
    uint32_t bits = 0x3f800000u | (word >> 9);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

void mt_rng_gauss4(uint64_t seed, uint64_t group, float out[4]) {
    uint32_t w[4];
    philox_group(seed, group, w);
    for (int pair = 0; pair < 2; pair++) {
        double u1 = 2.0 - (double)mt_rng_mantissa_float(w[2 * pair]);
        double u2 = (double)mt_rng_mantissa_float(w[2 * pair + 1]) - 1.0;
        double r = sqrt(-2.0 * log(u1)), angle = 6.283185307179586 * u2;
        out[2 * pair] = (float)(r * cos(angle));
        out[2 * pair + 1] = (float)(r * sin(angle));
    }
}

float mt_rng_gauss(uint64_t seed, uint64_t i) {
    float z[4];
    mt_rng_gauss4(seed, i / 4, z);
    return z[i % 4];
}

uint32_t mt_rng_philox_word(uint64_t seed, uint64_t i) {
    uint32_t w[4];
    philox_group(seed, i / 4, w);
    return w[i % 4];
}
