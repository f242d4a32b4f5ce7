// bench/attention_bench.c: times the GPU attention op (forward, backward) at
// the shapes the benchmarks train, on random inputs: cuDNN's fused graphs
// (cudnn: the deterministic backward memtune runs by default; cudnn-nd: the
// non-deterministic one, model.deterministic_attention false) and memtune's
// own kernel (where it takes the head dim), each the median of 20
// runs timed with CUDA events after 3 warm-ups, as TFLOP/s of useful (causal)
// matrix work; and whether two backward runs give the same bits. Prints one
// line per (shape, path); bench/attention.py puts torch's SDPA beside it.
// Not a test; run on the GPU machine.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/device.h"
#include "kernels/dtype.h"
#include "kernels/mem.h"
#include "kernels/ops.h"
#include "kernels/rng.h"

static void *random_bf16(size_t n, uint64_t seed) {
    uint16_t *h = malloc(n * 2);
    for (size_t i = 0; i < n; i++) h[i] = mt_f32_to_bf16(2.0f * mt_rng_uniform(seed, i) - 1.0f);
    void *d = mt_device_malloc(n * 2);
    mt_copy_to_device(d, h, n * 2);
    free(h);
    return d;
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

enum { kWarm = 3, kRuns = 20 };

// 1 when two backward runs give the same dq, dk and dv bits.
static int backward_repeats(mt_backend *be, const mt_attention_shape *s, void **bufs, size_t nq, size_t nk) {
    void *q = bufs[0], *k = bufs[1], *v = bufs[2], *g = bufs[3], *o = bufs[4], *dq = bufs[5], *dk = bufs[6],
         *dv = bufs[7];
    float *lse = bufs[8];
    size_t bytes = (nq + 2 * nk) * 2;
    unsigned char *a = malloc(bytes), *b = malloc(bytes);
    for (int run = 0; run < 2; run++) {
        unsigned char *dst = run ? b : a;
        mt_op_attention_backward(be, s, dq, dk, dv, g, q, k, v, o, lse, NULL);
        mt_copy_to_host(dst, dq, nq * 2), mt_copy_to_host(dst + nq * 2, dk, nk * 2);
        mt_copy_to_host(dst + (nq + nk) * 2, dv, nk * 2);
    }
    int same = memcmp(a, b, bytes) == 0;
    free(a), free(b);
    return same;
}

static void bench(mt_backend *be, const char *name, const char *path, const mt_attention_shape *s) {
    int B = s->B, T = s->T, H = s->H, KV = s->KV, D = s->D;
    size_t nq = (size_t)B * H * T * D, nk = (size_t)B * KV * T * D;
    void *bufs[9] = {random_bf16(nq, 1),       random_bf16(nk, 2),       random_bf16(nk, 3),
                     random_bf16(nq, 4),       mt_device_malloc(nq * 2), mt_device_malloc(nq * 2),
                     mt_device_malloc(nk * 2), mt_device_malloc(nk * 2), mt_device_malloc((size_t)B * H * T * 4)};
    void *q = bufs[0], *k = bufs[1], *v = bufs[2], *g = bufs[3], *o = bufs[4], *dq = bufs[5], *dk = bufs[6],
         *dv = bufs[7];
    float *lse = bufs[8];
    if (mt_backend_reserve_workspace(be, mt_attention_workspace_bytes(be, s))) {
        printf("%-20s %-10s out of memory\n", name, path);
        return;
    }
    void *ev[3] = {mt_event_create(), mt_event_create(), mt_event_create()};
    float fwd[kRuns], bwd[kRuns];
    for (int rep = 0; rep < kWarm + kRuns; rep++) {
        mt_event_record(ev[0], NULL);
        mt_op_attention_forward(be, s, o, lse, q, k, v, NULL);
        mt_event_record(ev[1], NULL);
        mt_op_attention_backward(be, s, dq, dk, dv, g, q, k, v, o, lse, NULL);
        mt_event_record(ev[2], NULL);
        mt_event_synchronize(ev[2]);
        if (rep >= kWarm) {
            fwd[rep - kWarm] = mt_event_elapsed_ms(ev[0], ev[1]);
            bwd[rep - kWarm] = mt_event_elapsed_ms(ev[1], ev[2]);
        }
    }
    qsort(fwd, kRuns, sizeof(float), cmp_float), qsort(bwd, kRuns, sizeof(float), cmp_float);
    double t_fwd = fwd[kRuns / 2] / 1e3, t_bwd = bwd[kRuns / 2] / 1e3;
    double causal = (double)B * H * T * T * D;  // one causal T x T x D product = 2 * (T*T/2) * D flops
    int same = backward_repeats(be, s, bufs, nq, nk);
    printf("%-20s %-10s %9.3f %9.1f %9.3f %9.1f %s\n", name, path, 1e3 * t_fwd, 2 * causal / t_fwd / 1e12, 1e3 * t_bwd,
           5 * causal / t_bwd / 1e12, same ? "identical" : "DIFFER");
    for (int i = 0; i < 3; i++) mt_event_destroy(ev[i]);
    for (int i = 0; i < 9; i++) mt_device_free(bufs[i]);
}

int main(int argc, char **argv) {
    if (mt_device_count() == 0) return printf("attention_bench: no GPU\n"), 77;
    mt_backend be;
    if (mt_backend_init(&be, 0)) return 1;
    mt_attention_shape shapes[] = {{4, 1024, 32, 4, 64, 0, 0, 0.0f, 0, 0},
                                   {4, 1024, 32, 32, 128, 0, 0, 0.0f, 0, 0},
                                   {1, 4096, 32, 8, 128, 0, 0, 0.0f, 0, 0},
                                   {1, 16384, 32, 8, 128, 0, 0, 0.0f, 0, 0}};
    const char *names[] = {"TinyLlama-1.1B", "Llama-2-7B", "Llama-3-8B T=4096", "Llama-3-8B T=16384"};
    int own = argc < 2 || strcmp(argv[1], "--cudnn-only") != 0;
    printf("%-20s %-10s %9s %9s %9s %9s %s\n", "shape", "path", "fwd ms", "fwd TF/s", "bwd ms", "bwd TF/s",
           "backward twice");
    for (int i = 0; i < 4; i++) {
        if (be.cudnn) {
            bench(&be, names[i], "cudnn", &shapes[i]);
            mt_attention_shape nd = shapes[i];  // cuDNN's non-deterministic backward
            nd.nondeterministic = 1;
            bench(&be, names[i], "cudnn-nd", &nd);
        }
        struct mt_cudnn *saved = be.cudnn;
        be.cudnn = NULL;
        if (own) bench(&be, names[i], "own", &shapes[i]);
        be.cudnn = saved;
    }
    mt_backend_free(&be);
    return 0;
}
