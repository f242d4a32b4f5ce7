// kernels/dtype.c: dtype names and host conversions.
#include "kernels/dtype.h"

#include <math.h>

size_t mt_dtype_size(mt_dtype t) { return t == MT_DTYPE_F32 ? 4 : (t == MT_DTYPE_NONE ? 0 : 2); }

static const char *const dtype_names[] = {"F32", "BF16", "F16"};

const char *mt_dtype_name(mt_dtype t) { return t < MT_DTYPE_NONE ? dtype_names[t] : "?"; }

mt_dtype mt_dtype_from_name(const char *name) {
    for (int t = 0; t < MT_DTYPE_NONE; t++)
        if (strcmp(name, dtype_names[t]) == 0) return (mt_dtype)t;
    return MT_DTYPE_NONE;
}

float mt_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    float v;
    if (exponent == 0)
        v = ldexpf((float)mantissa, -24);  // zero / subnormal
    else if (exponent == 31)
        v = mantissa ? NAN : INFINITY;
    else
        v = ldexpf((float)(mantissa | 0x400), (int)exponent - 25);
    uint32_t u;
    memcpy(&u, &v, 4);
    u |= sign;
    memcpy(&v, &u, 4);
    return v;
}

uint16_t mt_f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    float a = fabsf(f);
    if (isnan(f)) return sign | 0x7e00;
    if (a >= 65520.0f) return sign | 0x7c00;
    if (a < 6.103515625e-05f) return sign | (uint16_t)lrintf(a * 16777216.0f);  // subnormal, 2^-24 steps
    int e;
    float m = frexpf(a, &e);  // a = m * 2^e, m in [0.5, 1)
    uint32_t mant = (uint32_t)lrintf((m * 2.0f - 1.0f) * 1024.0f);
    int exponent = e - 1 + 15;
    if (mant == 1024) {
        mant = 0;
        exponent++;
    }
    if (exponent >= 31) return sign | 0x7c00;
    return sign | (uint16_t)(exponent << 10) | (uint16_t)mant;
}

void mt_convert_to_f32(float *dst, const void *src, mt_dtype t, size_t n) {
    const uint16_t *h = src;
    switch (t) {
        case MT_DTYPE_F32: memcpy(dst, src, n * 4); break;
        case MT_DTYPE_BF16:
            for (size_t i = 0; i < n; i++) dst[i] = mt_bf16_to_f32(h[i]);
            break;
        case MT_DTYPE_F16:
            for (size_t i = 0; i < n; i++) dst[i] = mt_f16_to_f32(h[i]);
            break;
        default: break;
    }
}

void mt_convert_from_f32(void *dst, const float *src, mt_dtype t, size_t n) {
    uint16_t *h = dst;
    switch (t) {
        case MT_DTYPE_F32: memcpy(dst, src, n * 4); break;
        case MT_DTYPE_BF16:
            for (size_t i = 0; i < n; i++) h[i] = mt_f32_to_bf16(src[i]);
            break;
        case MT_DTYPE_F16:
            for (size_t i = 0; i < n; i++) h[i] = mt_f32_to_f16(src[i]);
            break;
        default: break;
    }
}
