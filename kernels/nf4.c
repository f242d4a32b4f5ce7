// kernels/nf4.c: NF4 quantization, CPU reference and host side (nf4.h).
#include "kernels/nf4.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/mem.h"
#ifdef MT_HAVE_CUDA
#include "kernels/nf4_cuda.h"
#endif

// Quantiles of N(0, 1) normalised to [-1, 1] with an exact zero (QLoRA,
// appendix E); these are the fp32 values bitsandbytes ships.
const float mt_nf4_code[16] = {-1.0f,
                               -0.6961928009986877f,
                               -0.5250730514526367f,
                               -0.39491748809814453f,
                               -0.28444138169288635f,
                               -0.18477343022823334f,
                               -0.09105003625154495f,
                               0.0f,
                               0.07958029955625534f,
                               0.16093020141124725f,
                               0.24611230194568634f,
                               0.33791524171829224f,
                               0.44070982933044434f,
                               0.5626170039176941f,
                               0.7229568362236023f,
                               1.0f};

// torch.linspace(start, end, steps) in fp32 (ATen's CPU kernel: the first
// half counts up from start, the second half down from end).
static void linspace_f32(float *out, float start, float end, int steps) {
    float step = (end - start) / (float)(steps - 1);
    int halfway = steps / 2;
    for (int i = 0; i < steps; i++)
        out[i] = i < halfway ? start + step * (float)i : end - step * (float)(steps - i - 1);
}

static int compare_floats(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

void mt_nf4_dynamic_map(float code[256]) {
    // Dettmers (2016), 8-bit approximations: a sign bit, a run of zero bits
    // giving the decimal exponent -6..0, and a linear fraction in the rest.
    // With 8 bits and 7 exponent bits, exponent i gets 2^i fraction values:
    // the midpoints of linspace(0.1, 1, 2^i + 1) scaled by 10^(i-6).
    int n = 0;
    float bounds[65], means[64];
    for (int i = 0; i < 7; i++) {
        int items = (1 << i) + 1;
        linspace_f32(bounds, 0.1f, 1.0f, items);
        for (int j = 0; j + 1 < items; j++) means[j] = (bounds[j] + bounds[j + 1]) / 2.0f;
        float scale = (float)pow(10.0, i - 6);
        for (int j = 0; j + 1 < items; j++) code[n++] = scale * means[j];
        for (int j = 0; j + 1 < items; j++) code[n++] = -scale * means[j];
    }
    code[n++] = 0.0f;
    code[n++] = 1.0f;
    MT_CHECK(n == 256, "dynamic map has %d values", n);
    qsort(code, 256, sizeof(float), compare_floats);
}

size_t mt_nf4_blocks(size_t n) { return (n + MT_NF4_BLOCK - 1) / MT_NF4_BLOCK; }
size_t mt_nf4_groups(size_t n) { return (mt_nf4_blocks(n) + MT_NF4_GROUP - 1) / MT_NF4_GROUP; }

static size_t align256(size_t bytes) { return (bytes + 255) & ~(size_t)255; }

size_t mt_nf4_storage_bytes(size_t n) {
    return align256((n + 1) / 2) + align256(mt_nf4_blocks(n)) + align256(mt_nf4_groups(n) * sizeof(float));
}

void mt_nf4_bind(mt_nf4 *q, void *storage, size_t n) {
    char *p = storage;
    q->n = n;
    q->codes = (uint8_t *)p;
    p += align256((n + 1) / 2);
    q->absmax_q = (uint8_t *)p;
    p += align256(mt_nf4_blocks(n));
    q->absmax2 = (float *)p;
    q->offset = 0.0f;
}

// ------------------------------------------------------------ reference

void mt_nf4_absmax_ref(float *absmax, const float *x, size_t n) {
    size_t blocks = mt_nf4_blocks(n);
#pragma omp parallel for
    for (size_t b = 0; b < blocks; b++) {
        size_t end = (b + 1) * MT_NF4_BLOCK < n ? (b + 1) * MT_NF4_BLOCK : n;
        float m = 0.0f;
        for (size_t i = b * MT_NF4_BLOCK; i < end; i++) m = fmaxf(m, fabsf(x[i]));
        absmax[b] = fmaxf(m, 1e-38f);
    }
}

// Index of the nearest code: the number of midpoints strictly below v
// (torch.bucketize over the midpoints, as bitsandbytes' reference does).
static int nearest_code(const float *code, int count, float v) {
    int lo = 0, hi = count - 1;  // answer in [lo, hi]
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        float midpoint = (code[mid] + code[mid + 1]) / 2.0f;
        if (v > midpoint)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static float clamp_unit(float v) { return v < -1.0f ? -1.0f : v > 1.0f ? 1.0f : v; }

// A block at a time: one reciprocal of its absmax, and each value's code as
// the count of the 15 midpoints (nearest_code's) strictly below it, which is
// what the bisection finds and lets the compiler vectorize over the values
// (a 70B base's 69 G values are quantized here when it streams from the host).
void mt_nf4_codes_ref(uint8_t *codes, const float *x, size_t n, const float *absmax) {
    float mid[15];
    for (int j = 0; j < 15; j++) mid[j] = (mt_nf4_code[j] + mt_nf4_code[j + 1]) / 2.0f;
    size_t blocks = mt_nf4_blocks(n);
#pragma omp parallel for
    for (size_t b = 0; b < blocks; b++) {
        size_t i0 = b * MT_NF4_BLOCK, len = n - i0 < MT_NF4_BLOCK ? n - i0 : MT_NF4_BLOCK;
        float inverse = 1.0f / absmax[b];
        uint8_t c[MT_NF4_BLOCK + 1];
        for (size_t i = 0; i < len; i++) {
            float v = clamp_unit(x[i0 + i] * inverse);
            uint8_t k = 0;
            for (int j = 0; j < 15; j++) k += v > mid[j];
            c[i] = k;
        }
        c[len] = 7;  // an odd tail is padded with a zero value (blocks are even, so only the last)
        for (size_t i = 0; i < len; i += 2) codes[(i0 + i) / 2] = (uint8_t)(c[i] << 4 | c[i + 1]);
    }
}

void mt_nf4_quantize_absmax(uint8_t *absmax_q, float *absmax2, float *offset, const float *absmax, size_t blocks) {
    float map[256];
    mt_nf4_dynamic_map(map);
    double sum = 0.0;
    for (size_t b = 0; b < blocks; b++) sum += absmax[b];
    float mean = blocks ? (float)(sum / (double)blocks) : 0.0f;
    *offset = mean;
    size_t groups = (blocks + MT_NF4_GROUP - 1) / MT_NF4_GROUP;
#pragma omp parallel for
    for (size_t g = 0; g < groups; g++) {
        size_t end = (g + 1) * MT_NF4_GROUP < blocks ? (g + 1) * MT_NF4_GROUP : blocks;
        float m = 0.0f;
        for (size_t b = g * MT_NF4_GROUP; b < end; b++) m = fmaxf(m, fabsf(absmax[b] - mean));
        m = fmaxf(m, 1e-38f);
        absmax2[g] = m;
        float inverse = 1.0f / m;
        for (size_t b = g * MT_NF4_GROUP; b < end; b++)
            absmax_q[b] = (uint8_t)nearest_code(map, 256, clamp_unit((absmax[b] - mean) * inverse));
    }
}

float mt_nf4_block_scale(const mt_nf4 *q, const float dynamic_map[256], size_t b) {
    float scaled = dynamic_map[q->absmax_q[b]] * q->absmax2[b / MT_NF4_GROUP];
    return scaled + q->offset;
}

void mt_nf4_dequantize_ref(float *out, const mt_nf4 *q) {
    float map[256];
    mt_nf4_dynamic_map(map);
    size_t blocks = mt_nf4_blocks(q->n);
#pragma omp parallel for
    for (size_t b = 0; b < blocks; b++) {
        float scale = mt_nf4_block_scale(q, map, b);
        size_t end = (b + 1) * MT_NF4_BLOCK < q->n ? (b + 1) * MT_NF4_BLOCK : q->n;
        for (size_t i = b * MT_NF4_BLOCK; i < end; i++) {
            int code = i % 2 ? q->codes[i / 2] & 15 : q->codes[i / 2] >> 4;
            out[i] = mt_nf4_code[code] * scale;
        }
    }
}

// ----------------------------------------------------------- on backend

mt_err mt_nf4_quantize(const mt_backend *be, mt_nf4 *q, const float *host_values) {
    size_t n = q->n, blocks = mt_nf4_blocks(n), groups = mt_nf4_groups(n);
    float *absmax = malloc(blocks * sizeof(float) + 1);
    uint8_t *absmax_q = be->gpu ? malloc(blocks + 1) : q->absmax_q;
    float *absmax2 = be->gpu ? malloc(groups * sizeof(float) + 1) : q->absmax2;
    if (!absmax || !absmax_q || !absmax2) {
        free(absmax);
        if (be->gpu) free(absmax_q), free(absmax2);
        return mt_errorf(MT_ERR_NOMEM, "out of host memory quantizing a tensor of %zu values to NF4", n);
    }
    mt_err err = MT_OK;
    if (!be->gpu) {
        mt_nf4_absmax_ref(absmax, host_values, n);
        mt_nf4_codes_ref(q->codes, host_values, n, absmax);
        mt_nf4_quantize_absmax(q->absmax_q, q->absmax2, &q->offset, absmax, blocks);
    } else {
#ifdef MT_HAVE_CUDA
        err = mt_nf4_codes_cuda(q->codes, absmax, host_values, n);
        if (!err) {
            mt_nf4_quantize_absmax(absmax_q, absmax2, &q->offset, absmax, blocks);
            mt_copy_to_device(q->absmax_q, absmax_q, blocks);
            mt_copy_to_device(q->absmax2, absmax2, groups * sizeof(float));
        }
#else
        MT_CHECK(0, "GPU backend in a CPU-only build");
#endif
        free(absmax_q);
        free(absmax2);
    }
    free(absmax);
    return err;
}

void mt_nf4_dequantize(const mt_backend *be, void *out, const mt_nf4 *q) {
    if (!be->gpu) {
        mt_nf4_dequantize_ref(out, q);
        return;
    }
#ifdef MT_HAVE_CUDA
    mt_nf4_dequantize_cuda(be, out, q);
#else
    MT_CHECK(0, "GPU backend in a CPU-only build");
#endif
}
