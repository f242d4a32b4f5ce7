// Throughput of MeZO perturbation kernel variants (dst = src + s z), 1 thread per 4 elements.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <curand_kernel.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
typedef __nv_bfloat16 bf16;

__device__ unsigned long long fin(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
__device__ float sqrt_approx(float x) {
    float r;
    asm("sqrt.approx.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// words: 0 philox, 1 splitmix. unif: 0 I2F, 1 bit trick. sq: 0 IEEE, 1 approx. sc: 0 MUFU, 1 sincospif
template <int WORDS, int UNIF, int SQ, int SC>
__device__ void gauss4(unsigned long long key, unsigned long long group, float z[4]) {
    unsigned words[4];
    if (WORDS == 0) {
        uint4 c = make_uint4((unsigned)group, (unsigned)(group >> 32), 0u, 0u);
        uint2 k = make_uint2((unsigned)key, (unsigned)(key >> 32));
        uint4 w = curand_Philox4x32_10(c, k);
        words[0] = w.x, words[1] = w.y, words[2] = w.z, words[3] = w.w;
    } else {
        unsigned long long st = key + (2 * group + 1) * 0x9e3779b97f4a7c15ull;
        unsigned long long a = fin(st), b = fin(st + 0x9e3779b97f4a7c15ull);
        words[0] = (unsigned)(a >> 32), words[1] = (unsigned)a, words[2] = (unsigned)(b >> 32), words[3] = (unsigned)b;
    }
    for (int p = 0; p < 2; p++) {
        float u1, u2;
        if (UNIF == 0) {
            u1 = (float)((words[2 * p] >> 8) + 1u) * (1.0f / 16777216.0f);
            u2 = (float)(words[2 * p + 1] >> 8) * (1.0f / 16777216.0f);
        } else {
            u1 = 2.0f - __uint_as_float(0x3f800000u | (words[2 * p] >> 9));
            u2 = __uint_as_float(0x3f800000u | (words[2 * p + 1] >> 9)) - 1.0f;
        }
        float x = -2.0f * __logf(u1);
        float r = SQ ? sqrt_approx(x) : sqrtf(x), s, c;
        if (SC == 0)
            __sincosf(6.283185307f * u2 - 3.141592654f, &s, &c);
        else
            sincospif(2.0f * u2 - 1.0f, &s, &c);
        z[2 * p] = -r * c, z[2 * p + 1] = -r * s;
    }
}

template <int W, int U, int Q, int S>
__global__ void perturb(bf16 *dst, const bf16 *src, size_t n, float scale, unsigned long long key,
                        unsigned long long offset) {
    size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (offset + n + 3) / 4 - offset / 4) return;
    float z[4];
    gauss4<W, U, Q, S>(key, offset / 4 + t, z);
    long long j0 = (long long)((offset / 4 + t) * 4) - (long long)offset;
    if (j0 >= 0 && (size_t)j0 + 4 <= n) {
        uint2 raw = *(const uint2 *)(src + j0);
        float2 a = __bfloat1622float2(*(__nv_bfloat162 *)&raw.x), b = __bfloat1622float2(*(__nv_bfloat162 *)&raw.y);
        __nv_bfloat162 lo = __floats2bfloat162_rn(a.x + scale * z[0], a.y + scale * z[1]);
        __nv_bfloat162 hi = __floats2bfloat162_rn(b.x + scale * z[2], b.y + scale * z[3]);
        uint2 o;
        o.x = *(unsigned *)&lo, o.y = *(unsigned *)&hi;
        *(uint2 *)(dst + j0) = o;
    }
}

// 8 elements (2 groups) per thread, 16-byte moves
template <int W, int U, int Q, int S>
__global__ void perturb8(bf16 *dst, const bf16 *src, size_t n, float scale, unsigned long long key) {
    size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (8 * t + 8 > n) return;
    float z[8];
    gauss4<W, U, Q, S>(key, 2 * t, z);
    gauss4<W, U, Q, S>(key, 2 * t + 1, z + 4);
    uint4 raw = *(const uint4 *)(src + 8 * t);
    unsigned in[4] = {raw.x, raw.y, raw.z, raw.w}, out[4];
    for (int i = 0; i < 4; i++) {
        float2 v = __bfloat1622float2(*(__nv_bfloat162 *)&in[i]);
        __nv_bfloat162 o = __floats2bfloat162_rn(v.x + scale * z[2 * i], v.y + scale * z[2 * i + 1]);
        out[i] = *(unsigned *)&o;
    }
    *(uint4 *)(dst + 8 * t) = make_uint4(out[0], out[1], out[2], out[3]);
}

__global__ void copyk(bf16 *dst, const bf16 *src, size_t n) {
    size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (8 * t + 8 <= n) *(uint4 *)(dst + 8 * t) = *(const uint4 *)(src + 8 * t);
}

__global__ void sink(const float *z, float *out) {}

template <int W, int U, int Q, int S>
__global__ void rng_only(float *out, size_t groups, unsigned long long key) {
    size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= groups) return;
    float z[4];
    gauss4<W, U, Q, S>(key, t, z);
    float s = z[0] + z[1] + z[2] + z[3];
    if (s == 12345.678f) out[0] = s;  // keeps the work
}

static float timeit(void (*launch)(void *), void *ctx, int reps) {
    if (reps == 0) {  // under the profiler: one launch
        launch(ctx);
        cudaDeviceSynchronize();
        return 0.0f;
    }
    cudaEvent_t a, b;
    cudaEventCreate(&a), cudaEventCreate(&b);
    launch(ctx);
    cudaEventRecord(a);
    for (int i = 0; i < reps; i++) launch(ctx);
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    return ms / reps;
}

struct Ctx {
    bf16 *dst, *src;
    size_t n;
    float *f;
};
#define P4(W, U, Q, S)                                                                               \
    [](void *c) {                                                                                    \
        Ctx *x = (Ctx *)c;                                                                           \
        size_t g = x->n / 4;                                                                         \
        perturb<W, U, Q, S><<<(g + 255) / 256, 256>>>(x->dst, x->src, x->n, 1e-3f, 0x1234567ull, 0); \
    }
#define P8(W, U, Q, S)                                                                             \
    [](void *c) {                                                                                  \
        Ctx *x = (Ctx *)c;                                                                         \
        size_t g = x->n / 8;                                                                       \
        perturb8<W, U, Q, S><<<(g + 255) / 256, 256>>>(x->dst, x->src, x->n, 1e-3f, 0x1234567ull); \
    }
#define R(W, U, Q, S)                                                          \
    [](void *c) {                                                              \
        Ctx *x = (Ctx *)c;                                                     \
        size_t g = x->n / 4;                                                   \
        rng_only<W, U, Q, S><<<(g + 255) / 256, 256>>>(x->f, g, 0x1234567ull); \
    }

int main() {
    Ctx c;
    c.n = getenv("ZB_PROFILE") ? (size_t)1 << 26 : (size_t)1 << 30;  // 1G bf16 = 2 GiB each
    cudaMalloc(&c.src, c.n * 2), cudaMalloc(&c.dst, c.n * 2), cudaMalloc(&c.f, 64);
    cudaMemset(c.src, 0, c.n * 2);
    struct {
        const char *name;
        void (*f)(void *);
    } v[] = {
        {"copy (memory floor, 16B)",
         [](void *p) {
             Ctx *x = (Ctx *)p;
             copyk<<<(x->n / 8 + 255) / 256, 256>>>(x->dst, x->src, x->n);
         }},
        {"perturb4 philox I2F ieee-sqrt mufu-sincos (old)", P4(0, 0, 0, 0)},
        {"perturb4 splitmix I2F approx-sqrt mufu (new)", P4(1, 0, 1, 0)},
        {"perturb4 philox I2F approx-sqrt mufu", P4(0, 0, 1, 0)},
        {"perturb4 philox bits approx-sqrt mufu", P4(0, 1, 1, 0)},
        {"perturb4 splitmix bits approx-sqrt mufu", P4(1, 1, 1, 0)},
        {"perturb4 philox bits approx-sqrt sincospif", P4(0, 1, 1, 1)},
        {"perturb4 splitmix bits approx-sqrt sincospif", P4(1, 1, 1, 1)},
        {"perturb8 philox I2F ieee mufu", P8(0, 0, 0, 0)},
        {"perturb8 philox bits approx mufu", P8(0, 1, 1, 0)},
        {"perturb8 splitmix bits approx mufu", P8(1, 1, 1, 0)},
        {"perturb8 philox bits approx sincospif", P8(0, 1, 1, 1)},
        {"perturb8 splitmix bits approx sincospif", P8(1, 1, 1, 1)},
        {"rng only philox I2F ieee mufu", R(0, 0, 0, 0)},
        {"rng only splitmix I2F approx mufu", R(1, 0, 1, 0)},
        {"rng only philox bits approx mufu", R(0, 1, 1, 0)},
        {"rng only splitmix bits approx mufu", R(1, 1, 1, 0)},
        {"rng only philox bits approx sincospif", R(0, 1, 1, 1)},
        {"rng only splitmix bits approx sincospif", R(1, 1, 1, 1)},
    };
    for (auto &x : v) {
        float ms = timeit(x.f, &c, getenv("ZB_PROFILE") ? 0 : 5);
        cudaError_t e = cudaGetLastError();
        printf("%-52s %8.3f ms  %7.1f GB/s (r+w)  %s\n", x.name, ms, 4.0 * c.n / ms / 1e6,
               e ? cudaGetErrorString(e) : "");
    }
    return 0;
}
