// offload/cpu_adam.c: the CPU AdamW (cpu_adam.h). One scalar element
// function defines the arithmetic; the AVX2 and AVX-512 loops repeat it
// lane-wise with the same operations in the same order, compiled for their
// instruction sets through target attributes and chosen at run time with
// __builtin_cpu_supports, so one binary runs on any x86-64. The update is
// memory-bound (28 bytes per parameter with bf16 gradient and weights), so
// the work is split across OpenMP threads in fixed chunks.
#include "offload/cpu_adam.h"

#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <string.h>

#include "kernels/common.h"
#include "kernels/dtype.h"
#include "kernels/ops.h"
#include "kernels/ops_ref.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MT_X86 1
#endif

// Elements per OpenMP work item: a multiple of every vector width, large
// enough that scheduling costs nothing next to the memory traffic.
#define CHUNK 16384

static const char *const path_names[MT_CPU_ADAM_NPATHS] = {"scalar", "avx2", "avx512"};

const char *mt_cpu_adam_path_name(mt_cpu_adam_path path) {
    return path >= 0 && path < MT_CPU_ADAM_NPATHS ? path_names[path] : "?";
}

int mt_cpu_adam_path_available(mt_cpu_adam_path path) {
    switch (path) {
        case MT_CPU_ADAM_SCALAR: return 1;
#ifdef MT_X86
        case MT_CPU_ADAM_AVX2: return __builtin_cpu_supports("avx2");
        case MT_CPU_ADAM_AVX512: return __builtin_cpu_supports("avx512f");
#endif
        default: return 0;
    }
}

mt_cpu_adam_path mt_cpu_adam_best_path(void) {
    for (int p = MT_CPU_ADAM_NPATHS - 1; p > 0; p--)
        if (mt_cpu_adam_path_available((mt_cpu_adam_path)p)) return (mt_cpu_adam_path)p;
    return MT_CPU_ADAM_SCALAR;
}

void mt_cpu_adam_prepare(mt_cpu_adam_step *s, float lr, float beta1, float beta2, float eps, float weight_decay,
                         int step, float grad_scale) {
    float bc1 = 1.0f - powf(beta1, (float)step), bc2 = 1.0f - powf(beta2, (float)step);
    s->beta1 = beta1;
    s->beta2 = beta2;
    s->eps = eps;
    s->step_size = lr / bc1;
    s->bc2_sqrt = sqrtf(bc2);
    s->decay = 1.0f - lr * weight_decay;
    s->grad_scale = grad_scale;
}

// The reference's arithmetic for one element (mt_adamw_ref), operation for
// operation.
static inline float adam_one(const mt_cpu_adam_step *s, float *master, float *m, float *v, float grad) {
    float g = grad * s->grad_scale;
    float mi = s->beta1 * *m + (1.0f - s->beta1) * g;
    float vi = s->beta2 * *v + (1.0f - s->beta2) * g * g;
    float p = *master * s->decay;
    p = p - s->step_size * mi / (sqrtf(vi) / s->bc2_sqrt + s->eps);
    *m = mi;
    *v = vi;
    *master = p;
    return p;
}

static void adam_scalar(const mt_cpu_adam_step *s, float *master, float *m, float *v, const void *grad, int grad_bf16,
                        uint16_t *out, size_t n) {
    const float *gf = grad;
    const uint16_t *gh = grad;
    for (size_t i = 0; i < n; i++) {
        float p = adam_one(s, master + i, m + i, v + i, grad_bf16 ? mt_bf16_to_f32(gh[i]) : gf[i]);
        if (out) out[i] = mt_f32_to_bf16(p);
    }
}

#ifdef MT_X86
__attribute__((target("avx2"))) static void adam_avx2(const mt_cpu_adam_step *s, float *master, float *m, float *v,
                                                      const void *grad, int grad_bf16, uint16_t *out, size_t n) {
    const __m256 b1 = _mm256_set1_ps(s->beta1), b2 = _mm256_set1_ps(s->beta2);
    const __m256 omb1 = _mm256_set1_ps(1.0f - s->beta1), omb2 = _mm256_set1_ps(1.0f - s->beta2);
    const __m256 eps = _mm256_set1_ps(s->eps), step = _mm256_set1_ps(s->step_size);
    const __m256 bc2 = _mm256_set1_ps(s->bc2_sqrt), decay = _mm256_set1_ps(s->decay);
    const __m256 gscale = _mm256_set1_ps(s->grad_scale);
    const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    const __m256i round = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1), quiet = _mm256_set1_epi32(0x40);
    const float *gf = grad;
    const uint16_t *gh = grad;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 g = grad_bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(
                                   _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(gh + i))), 16))
                             : _mm256_loadu_ps(gf + i);
        g = _mm256_mul_ps(g, gscale);
        __m256 mi = _mm256_add_ps(_mm256_mul_ps(b1, _mm256_loadu_ps(m + i)), _mm256_mul_ps(omb1, g));
        __m256 vi = _mm256_add_ps(_mm256_mul_ps(b2, _mm256_loadu_ps(v + i)), _mm256_mul_ps(_mm256_mul_ps(omb2, g), g));
        __m256 p = _mm256_mul_ps(_mm256_loadu_ps(master + i), decay);
        __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), bc2), eps);
        p = _mm256_sub_ps(p, _mm256_div_ps(_mm256_mul_ps(step, mi), denom));
        _mm256_storeu_ps(m + i, mi);
        _mm256_storeu_ps(v + i, vi);
        _mm256_storeu_ps(master + i, p);
        if (out) {  // mt_f32_to_bf16 lane-wise: round to nearest even, NaN kept quiet
            __m256i u = _mm256_castps_si256(p);
            __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs_mask), inf);
            __m256i rounded =
                _mm256_add_epi32(u, _mm256_add_epi32(round, _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
            __m256i h = _mm256_blendv_epi8(_mm256_srli_epi32(rounded, 16),
                                           _mm256_or_si256(_mm256_srli_epi32(u, 16), quiet), nan);
            __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);
            _mm_storeu_si128((__m128i *)(out + i), _mm256_castsi256_si128(packed));
        }
    }
    if (i < n)
        adam_scalar(s, master + i, m + i, v + i, grad_bf16 ? (const void *)(gh + i) : (const void *)(gf + i), grad_bf16,
                    out ? out + i : NULL, n - i);
}

__attribute__((target("avx512f"))) static void adam_avx512(const mt_cpu_adam_step *s, float *master, float *m, float *v,
                                                           const void *grad, int grad_bf16, uint16_t *out, size_t n) {
    const __m512 b1 = _mm512_set1_ps(s->beta1), b2 = _mm512_set1_ps(s->beta2);
    const __m512 omb1 = _mm512_set1_ps(1.0f - s->beta1), omb2 = _mm512_set1_ps(1.0f - s->beta2);
    const __m512 eps = _mm512_set1_ps(s->eps), step = _mm512_set1_ps(s->step_size);
    const __m512 bc2 = _mm512_set1_ps(s->bc2_sqrt), decay = _mm512_set1_ps(s->decay);
    const __m512 gscale = _mm512_set1_ps(s->grad_scale);
    const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
    const __m512i round = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1), quiet = _mm512_set1_epi32(0x40);
    const float *gf = grad;
    const uint16_t *gh = grad;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 g = grad_bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                   _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(gh + i))), 16))
                             : _mm512_loadu_ps(gf + i);
        g = _mm512_mul_ps(g, gscale);
        __m512 mi = _mm512_add_ps(_mm512_mul_ps(b1, _mm512_loadu_ps(m + i)), _mm512_mul_ps(omb1, g));
        __m512 vi = _mm512_add_ps(_mm512_mul_ps(b2, _mm512_loadu_ps(v + i)), _mm512_mul_ps(_mm512_mul_ps(omb2, g), g));
        __m512 p = _mm512_mul_ps(_mm512_loadu_ps(master + i), decay);
        __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi), bc2), eps);
        p = _mm512_sub_ps(p, _mm512_div_ps(_mm512_mul_ps(step, mi), denom));
        _mm512_storeu_ps(m + i, mi);
        _mm512_storeu_ps(v + i, vi);
        _mm512_storeu_ps(master + i, p);
        if (out) {
            __m512i u = _mm512_castps_si512(p);
            __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs_mask), inf);
            __m512i rounded =
                _mm512_add_epi32(u, _mm512_add_epi32(round, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
            __m512i h = _mm512_mask_blend_epi32(nan, _mm512_srli_epi32(rounded, 16),
                                                _mm512_or_si512(_mm512_srli_epi32(u, 16), quiet));
            _mm256_storeu_si256((__m256i *)(out + i), _mm512_cvtepi32_epi16(h));
        }
    }
    if (i < n)
        adam_scalar(s, master + i, m + i, v + i, grad_bf16 ? (const void *)(gh + i) : (const void *)(gf + i), grad_bf16,
                    out ? out + i : NULL, n - i);
}
#endif

typedef void (*adam_fn)(const mt_cpu_adam_step *, float *, float *, float *, const void *, int, uint16_t *, size_t);

void mt_cpu_adam_update(mt_cpu_adam_path path, const mt_cpu_adam_step *s, float *master, float *m, float *v,
                        const void *grad, int grad_bf16, uint16_t *weights_bf16, size_t n) {
    adam_fn fn = adam_scalar;
#ifdef MT_X86
    if (path == MT_CPU_ADAM_AVX2) fn = adam_avx2;
    if (path == MT_CPU_ADAM_AVX512) fn = adam_avx512;
#else
    (void)path;
#endif
    size_t chunks = (n + CHUNK - 1) / CHUNK, gsize = grad_bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) if (!omp_in_parallel())
    for (size_t c = 0; c < chunks; c++) {
        size_t at = c * CHUNK, len = n - at < CHUNK ? n - at : CHUNK;
        fn(s, master + at, m + at, v + at, (const char *)grad + at * gsize, grad_bf16,
           weights_bf16 ? weights_bf16 + at : NULL, len);
    }
}

// The sum is split into a fixed number of stripes, each summed in order and
// then added in order: the same value for any thread count or schedule.
// Within a stripe, eight lanes each add the squares of every eighth value
// (no chain of dependent adds to wait on), and the tail goes to lane 0; the
// vector paths hold the same eight lanes in registers and do the same
// multiplies and adds (bf16 and fp32 values widen to double exactly).
#define STRIPES 256

static void sumsq_lanes_scalar(const void *grad, int grad_bf16, size_t i, size_t end, double *lane) {
    const float *gf = grad;
    const uint16_t *gh = grad;
    for (; i + 8 <= end; i += 8)
        for (int j = 0; j < 8; j++) {
            double g = grad_bf16 ? mt_bf16_to_f32(gh[i + j]) : gf[i + j];
            lane[j] += g * g;
        }
    for (; i < end; i++) {
        double g = grad_bf16 ? mt_bf16_to_f32(gh[i]) : gf[i];
        lane[0] += g * g;
    }
}

#ifdef MT_X86
// Eight values from i as fp32: bf16 bit patterns shifted into place, or loaded.
__attribute__((target("avx2"))) static __m256 sumsq_load8(const void *grad, int grad_bf16, size_t i) {
    if (!grad_bf16) return _mm256_loadu_ps((const float *)grad + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)grad + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

__attribute__((target("avx2"))) static void sumsq_lanes_avx2(const void *grad, int grad_bf16, size_t i, size_t end,
                                                             double *lane) {
    __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();  // lanes 0-3 and 4-7
    for (; i + 8 <= end; i += 8) {
        __m256 g = sumsq_load8(grad, grad_bf16, i);
        __m256d a = _mm256_cvtps_pd(_mm256_castps256_ps128(g)), b = _mm256_cvtps_pd(_mm256_extractf128_ps(g, 1));
        lo = _mm256_add_pd(lo, _mm256_mul_pd(a, a));
        hi = _mm256_add_pd(hi, _mm256_mul_pd(b, b));
    }
    _mm256_storeu_pd(lane, lo);
    _mm256_storeu_pd(lane + 4, hi);
    sumsq_lanes_scalar(grad, grad_bf16, i, end, lane);
}

__attribute__((target("avx512f"))) static void sumsq_lanes_avx512(const void *grad, int grad_bf16, size_t i, size_t end,
                                                                  double *lane) {
    __m512d acc = _mm512_setzero_pd();
    for (; i + 8 <= end; i += 8) {
        __m512d g = _mm512_cvtps_pd(sumsq_load8(grad, grad_bf16, i));
        acc = _mm512_add_pd(acc, _mm512_mul_pd(g, g));
    }
    _mm512_storeu_pd(lane, acc);
    sumsq_lanes_scalar(grad, grad_bf16, i, end, lane);
}
#endif

double mt_cpu_sumsq_path(mt_cpu_adam_path path, const void *grad, int grad_bf16, size_t n) {
    MT_CHECK(mt_cpu_adam_path_available(path), "CPU path %s is not available here", mt_cpu_adam_path_name(path));
    void (*lanes)(const void *, int, size_t, size_t, double *) = sumsq_lanes_scalar;
#ifdef MT_X86
    if (path == MT_CPU_ADAM_AVX2) lanes = sumsq_lanes_avx2;
    if (path == MT_CPU_ADAM_AVX512) lanes = sumsq_lanes_avx512;
#endif
    double part[STRIPES];
#pragma omp parallel for schedule(static)
    for (int k = 0; k < STRIPES; k++) {
        size_t extra = n % STRIPES, kk = (size_t)k;
        size_t begin = n / STRIPES * kk + (kk < extra ? kk : extra);
        size_t end = begin + n / STRIPES + (kk < extra);
        double lane[8] = {0};
        lanes(grad, grad_bf16, begin, end, lane);
        part[k] = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    }
    double sum = 0.0;
    for (int k = 0; k < STRIPES; k++) sum += part[k];
    return sum;
}

double mt_cpu_sumsq(const void *grad, int grad_bf16, size_t n) {
    return mt_cpu_sumsq_path(mt_cpu_adam_best_path(), grad, grad_bf16, n);
}

void mt_cpu_accumulate(float *sum, const void *grad, int grad_bf16, size_t n, int first) {
    const float *gf = grad;
    const uint16_t *gh = grad;
    size_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static)
    for (size_t c = 0; c < chunks; c++) {
        size_t at = c * CHUNK, end = n - at < CHUNK ? n : at + CHUNK;
        // (plain loops: the compiler vectorizes them)
        if (grad_bf16 && first)
            for (size_t i = at; i < end; i++) sum[i] = mt_bf16_to_f32(gh[i]);
        else if (grad_bf16)
            for (size_t i = at; i < end; i++) sum[i] += mt_bf16_to_f32(gh[i]);
        else if (first)
            memcpy(sum + at, gf + at, (end - at) * sizeof(float));
        else
            for (size_t i = at; i < end; i++) sum[i] += gf[i];
    }
}

// ------------------------------------------------ int8 moments' encoding

#ifdef MT_X86
// The codes of mt_qmap_thresholds in one table a map: for each 16-bit prefix
// p, its code start[p] (bits 0-7) and, in bits 15-31, the least of its 16
// low bits at which the code is one more (0x10000: nowhere in the prefix),
// the low bits counted in value order (complemented where the sign is set:
// a larger negative float has larger bits). Built once from start and up
// (at most one threshold in any prefix, which the caller checks), so a
// value's code takes one gather instead of two.
static uint32_t qcode_table[2][65536];
static pthread_once_t qcode_once = PTHREAD_ONCE_INIT;

static float f32_of_bits(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void build_qcode_tables(void) {
    for (int t = 0; t < 2; t++) {
        const float *up;
        int steps;
        const uint8_t *start = mt_qmap_thresholds(t, &up, &steps);
        for (uint32_t p = 0; p < 65536; p++) {
            uint32_t flip = p & 0x8000 ? 0xFFFFu : 0u, c = start[p];
            // the code one more at value-ordered low bits k: x >= up[c], false for NaN
#define QCODE_PAST(k) (f32_of_bits(p << 16 | ((k) ^ flip)) >= up[c])
            uint32_t split = 0x10000;
            if (QCODE_PAST(0xFFFFu)) {
                uint32_t lo = 0, hi = 0xFFFF;  // the least k past: the codes are monotone in k
                while (lo < hi) {
                    uint32_t mid = (lo + hi) / 2;
                    if (QCODE_PAST(mid))
                        hi = mid;
                    else
                        lo = mid + 1;
                }
                split = lo;
            }
#undef QCODE_PAST
            qcode_table[t][p] = c | split << 15;
        }
    }
}

// 16 values' codes on a map, as kernels/ops_ref.c's qmap_code gives them:
// the code of x's prefix, one more past the prefix's split (qcode_table); 0
// unless x > map[0] (NaN included).
__attribute__((target("avx512f"))) static __m512i qcodes16(__m512 x, float map0, const uint32_t *table) {
    __m512i bits = _mm512_castps_si512(x);
    __m512i e = _mm512_i32gather_epi32(_mm512_srli_epi32(bits, 16), (const void *)table, 4);
    __m512i flip = _mm512_srli_epi32(_mm512_srai_epi32(bits, 31), 16);  // 0xFFFF where the sign is set
    __m512i low = _mm512_xor_si512(_mm512_and_si512(bits, _mm512_set1_epi32(0xFFFF)), flip);
    __m512i c = _mm512_and_si512(e, _mm512_set1_epi32(0xFF));
    __mmask16 past = _mm512_cmp_epu32_mask(low, _mm512_srli_epi32(e, 15), _MM_CMPINT_NLT);
    c = _mm512_mask_add_epi32(c, past, c, _mm512_set1_epi32(1));
    return _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(x, _mm512_set1_ps(map0), _CMP_GT_OQ), c);
}

// x / d for 16 values, the quotient correctly rounded as a division gives
// it, at a multiply's cost: q = x r with r = 1 / d rounded, then one
// correction q + (x - q d) r (Markstein), exact for d in [2^-126, 2^126] and
// |x| >= 2^-100 (the remainder stays normal); smaller x, zeros (their sign)
// among them, are divided.
__attribute__((target("avx512f"))) static __m512 quotient16(__m512 x, __m512 d, __m512 r) {
    __m512 q = _mm512_mul_ps(x, r);
    q = _mm512_fmadd_ps(_mm512_fnmadd_ps(q, d, x), r, q);
    __mmask16 tiny = _mm512_cmp_ps_mask(_mm512_abs_ps(x), _mm512_set1_ps(0x1p-100f), _CMP_LT_OQ);
    return tiny ? _mm512_mask_div_ps(q, tiny, x, d) : q;
}

// Whether quotient16 serves divisor d.
static int quotient_fast(float d) { return d >= 0x1p-126f && d <= 0x1p126f; }

// x / d as a division rounds it: quotient16 where it serves d (fast), else divided.
__attribute__((target("avx512f"))) static __m512 divide16(__m512 x, __m512 d, __m512 r, int fast) {
    return fast ? quotient16(x, d, r) : _mm512_div_ps(x, d);
}

__attribute__((target("avx512f"))) static void qencode_avx512(const float *m, const float *v, size_t len, uint8_t *mq,
                                                              uint8_t *vq, float *m_absmax, float *v_absmax) {
    const float *smap = mt_qmap(1), *umap = mt_qmap(0);
    const uint32_t *stable = qcode_table[1], *utable = qcode_table[0];
    // the absmax: max_ps(a, b) is a > b ? a : b, the reference's compare (a NaN never wins); the lanes hold
    // +0 or larger, so their order does not matter
    __m512 mx = _mm512_setzero_ps(), vx = _mm512_setzero_ps();
    for (size_t k = 0; k < len; k += 16) {
        __mmask16 in = len - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (len - k)) - 1);
        mx = _mm512_mask_max_ps(mx, in, _mm512_abs_ps(_mm512_maskz_loadu_ps(in, m + k)), mx);
        vx = _mm512_mask_max_ps(vx, in, _mm512_maskz_loadu_ps(in, v + k), vx);
    }
    float m_max = _mm512_reduce_max_ps(mx), v_max = _mm512_reduce_max_ps(vx);
    *m_absmax = m_max, *v_absmax = v_max;
    __m512 md = _mm512_set1_ps(m_max), vd = _mm512_set1_ps(v_max), zero = _mm512_setzero_ps();
    __m512 mr = _mm512_set1_ps(1.0f / m_max), vr = _mm512_set1_ps(1.0f / v_max);
    int m_fast = quotient_fast(m_max), v_fast = quotient_fast(v_max);
    for (size_t k = 0; k < len; k += 16) {
        __mmask16 in = len - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (len - k)) - 1);
        __m512 mv = _mm512_maskz_loadu_ps(in, m + k), vv = _mm512_maskz_loadu_ps(in, v + k);
        __m512 sm = m_max > 0.0f ? divide16(mv, md, mr, m_fast) : zero;
        __m512 sv = v_max > 0.0f ? divide16(vv, vd, vr, v_fast) : zero;
        __m512i mc = qcodes16(sm, smap[0], stable), vc = qcodes16(sv, umap[0], utable);
        // a nonzero v never decodes to 0
        __mmask16 lift =
            _mm512_cmp_epi32_mask(vc, _mm512_setzero_si512(), _MM_CMPINT_EQ) & _mm512_cmp_ps_mask(vv, zero, _CMP_GT_OQ);
        vc = _mm512_mask_mov_epi32(vc, lift, _mm512_set1_epi32(1));
        _mm512_mask_cvtepi32_storeu_epi8(mq + k, in, mc);
        _mm512_mask_cvtepi32_storeu_epi8(vq + k, in, vc);
    }
}

// 16 codes at a time: each a gather of its map value, times the absmax (the reference's product).
__attribute__((target("avx512f"))) static void qdecode_avx512(const uint8_t *mq, const uint8_t *vq, float m_absmax,
                                                              float v_absmax, float *m, float *v, size_t len) {
    const float *smap = mt_qmap(1), *umap = mt_qmap(0);
    __m512 ma = _mm512_set1_ps(m_absmax), va = _mm512_set1_ps(v_absmax);
    for (size_t k = 0; k < len; k += 16) {
        __mmask16 in = len - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (len - k)) - 1);
        uint8_t mt[16] = {0}, vt[16] = {0};  // (a block's tail: its codes, then code 0)
        const uint8_t *mp = mq + k, *vp = vq + k;
        if (len - k < 16) {
            memcpy(mt, mp, len - k), memcpy(vt, vp, len - k);
            mp = mt, vp = vt;
        }
        __m512i mc = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)mp));
        __m512i vc = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)vp));
        _mm512_mask_storeu_ps(m + k, in, _mm512_mul_ps(_mm512_i32gather_ps(mc, smap, 4), ma));
        _mm512_mask_storeu_ps(v + k, in, _mm512_mul_ps(_mm512_i32gather_ps(vc, umap, 4), va));
    }
}
#endif

#ifdef MT_X86
__attribute__((target("avx512f"))) static void divide_avx512(float *q, const float *x, float d, size_t n) {
    __m512 dv = _mm512_set1_ps(d), r = _mm512_set1_ps(1.0f / d);
    int fast = quotient_fast(d);
    for (size_t k = 0; k < n; k += 16) {
        __mmask16 in = n - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - k)) - 1);
        _mm512_mask_storeu_ps(q + k, in, divide16(_mm512_maskz_loadu_ps(in, x + k), dv, r, fast));
    }
}
#endif

void mt_cpu_divide(float *q, const float *x, float d, size_t n) {
#ifdef MT_X86
    if (mt_cpu_adam_path_available(MT_CPU_ADAM_AVX512)) {
        divide_avx512(q, x, d, n);
        return;
    }
#endif
    for (size_t i = 0; i < n; i++) q[i] = x[i] / d;
}

void mt_cpu_qblock_decode(const uint8_t *mq, const uint8_t *vq, float m_absmax, float v_absmax, float *m, float *v,
                          size_t len) {
#ifdef MT_X86
    if (mt_cpu_adam_path_available(MT_CPU_ADAM_AVX512)) {
        qdecode_avx512(mq, vq, m_absmax, v_absmax, m, v, len);
        return;
    }
#endif
    mt_qblock_decode(mq, vq, m_absmax, v_absmax, m, v, len);
}

void mt_cpu_qblocks_code(uint8_t *mq, uint8_t *vq, float *m_absmax, float *v_absmax, float *m, float *v, size_t n,
                         int encode) {
    size_t blocks = (n + MT_QBLOCK - 1) / MT_QBLOCK;
#pragma omp parallel for if (!omp_in_parallel())
    for (size_t j = 0; j < blocks; j++) {
        size_t i = j * MT_QBLOCK, len = n - i < MT_QBLOCK ? n - i : MT_QBLOCK;
        if (encode)
            mt_cpu_qblock_encode(m + i, v + i, len, mq + i, vq + i, &m_absmax[j], &v_absmax[j]);
        else
            mt_cpu_qblock_decode(mq + i, vq + i, m_absmax[j], v_absmax[j], m + i, v + i, len);
    }
}

void mt_cpu_qblock_encode(const float *m, const float *v, size_t len, uint8_t *mq, uint8_t *vq, float *m_absmax,
                          float *v_absmax) {
#ifdef MT_X86
    int s_steps, u_steps;
    const float *sup, *uup;
    mt_qmap_thresholds(1, &sup, &s_steps), mt_qmap_thresholds(0, &uup, &u_steps);
    if (s_steps <= 1 && u_steps <= 1 && mt_cpu_adam_path_available(MT_CPU_ADAM_AVX512)) {
        pthread_once(&qcode_once, build_qcode_tables);
        qencode_avx512(m, v, len, mq, vq, m_absmax, v_absmax);
        return;
    }
#endif
    mt_qblock_encode(m, v, len, mq, vq, m_absmax, v_absmax);
}
