// kernels/dtype.h: element types of tensors on disk and in memory, and the
// host-side bf16/fp16 conversions (round to nearest even, as PyTorch does).
#ifndef MT_DTYPE_H
#define MT_DTYPE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { MT_DTYPE_F32, MT_DTYPE_BF16, MT_DTYPE_F16, MT_DTYPE_NONE } mt_dtype;

size_t mt_dtype_size(mt_dtype t);
// "F32"/"BF16"/"F16" (safetensors names) <-> enum; MT_DTYPE_NONE if unknown.
const char *mt_dtype_name(mt_dtype t);
mt_dtype mt_dtype_from_name(const char *name);

static inline uint16_t mt_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float mt_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float mt_round_bf16(float f) { return mt_bf16_to_f32(mt_f32_to_bf16(f)); }

float mt_f16_to_f32(uint16_t h);
uint16_t mt_f32_to_f16(float f);

// Converts n elements of `src` (type t) to fp32 and back.
void mt_convert_to_f32(float *dst, const void *src, mt_dtype t, size_t n);
void mt_convert_from_f32(void *dst, const float *src, mt_dtype t, size_t n);

#ifdef __cplusplus
}
#endif
#endif
