// bench/attention_bench.c: times the GPU attention op (forward, backward) at
// the shapes the benchmarks train, on random inputs, and reports ms and the
// rate of useful (causal) matrix FLOPs. Not a test; run on the GPU machine.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

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

int main(void) {
    if (mt_device_count() == 0) return printf("attention_bench: no GPU\n"), 77;
    mt_backend be;
    if (mt_backend_init(&be, 0)) return 1;
    int shapes[][5] = {{4, 1024, 32, 4, 64}, {4, 1024, 32, 32, 128}, {1, 4096, 32, 8, 128}};
    const char *names[] = {"TinyLlama-1.1B", "Llama-2-7B", "Llama-3-8B T=4096"};
    printf("%-20s %9s %9s %9s %9s\n", "shape", "fwd ms", "fwd TF/s", "bwd ms", "bwd TF/s");
    for (int s = 0; s < 3; s++) {
        int B = shapes[s][0], T = shapes[s][1], H = shapes[s][2], KV = shapes[s][3], D = shapes[s][4];
        size_t nq = (size_t)B * H * T * D, nk = (size_t)B * KV * T * D;
        void *q = random_bf16(nq, 1), *k = random_bf16(nk, 2), *v = random_bf16(nk, 3), *g = random_bf16(nq, 4);
        void *o = mt_device_malloc(nq * 2), *dq = mt_device_malloc(nq * 2), *dk = mt_device_malloc(nk * 2),
             *dv = mt_device_malloc(nk * 2);
        float *lse = mt_device_malloc((size_t)B * H * T * 4);
        if (mt_backend_reserve_workspace(&be, mt_attention_workspace_bytes(&be, B, T, H, D))) return 1;
        double causal = (double)B * H * T * T * D;  // one causal T x T x D product = 2 * (T*T/2) * D flops
        double t_fwd = 1e30, t_bwd = 1e30;
        for (int rep = 0; rep < 12; rep++) {
            mt_device_synchronize();
            double t0 = mt_now();
            mt_op_attention_forward(&be, o, lse, q, k, v, B, T, H, KV, D);
            mt_device_synchronize();
            double t1 = mt_now();
            mt_op_attention_backward(&be, dq, dk, dv, g, q, k, v, o, lse, B, T, H, KV, D);
            mt_device_synchronize();
            double t2 = mt_now();
            if (rep >= 2) {  // after warm-up: the best of ten
                t_fwd = fmin(t_fwd, t1 - t0);
                t_bwd = fmin(t_bwd, t2 - t1);
            }
        }
        printf("%-20s %9.3f %9.1f %9.3f %9.1f\n", names[s], 1e3 * t_fwd, 2 * causal / t_fwd / 1e12, 1e3 * t_bwd,
               5 * causal / t_bwd / 1e12);
        mt_device_free(q), mt_device_free(k), mt_device_free(v), mt_device_free(g), mt_device_free(o);
        mt_device_free(dq), mt_device_free(dk), mt_device_free(dv), mt_device_free(lse);
    }
    mt_backend_free(&be);
    return 0;
}
