// bench/lora_bench.c: LoRA's A products of one input (mt_op_lora_down and
// its backward) on the GPU, every fused kernel (MT_LORA_FUSED=all; the
// default version, and version 1, MT_LORA_KERNELS=1: its u kernel, dA and
// dx kernels apart, each also timed alone) against the ops they replace
// (MT_LORA_FUSED=0: a dropout, then a cuBLAS product each), at the layer
// shapes of the TinyLlama-1.1B and Llama-2-7B benches (B=4, T=1024, r=16),
// with and without dropout; and a device-to-device copy of the input, the
// floor for a pass that reads it. Prints a table: microseconds per call of
// GPU time, from a CUDA Graph of ITERS calls replayed (a call's host-side
// launches would otherwise bound the small ones: on 2026-12-06 the table
// was wall time per call, launches included), or wall time per call where
// the graph cannot be recorded (the line says so).
// Usage: mt_lora_bench [ITERS]
#include <stdio.h>
#include <stdlib.h>

#include "kernels/common.h"
#include "kernels/device.h"
#include "kernels/dtype.h"
#include "kernels/ops.h"
#include "kernels/ops_cuda.h"
#include "kernels/rng.h"

static void *dev_random(size_t n, float scale, uint64_t seed) {
    uint16_t *h = malloc(n * 2);
    for (size_t i = 0; i < n; i++) h[i] = mt_f32_to_bf16(scale * (float)((mt_rng_bits(seed, i) % 2001) / 1000.0 - 1.0));
    void *d = mt_device_malloc(n * 2);
    MT_CHECK(d != NULL, "device memory for the bench");
    mt_copy_to_device(d, h, n * 2);
    free(h);
    return d;
}

static int graphs_failed;  // a graph could not be recorded: wall times instead

// Microseconds a call of op(arg) takes: iters calls recorded as one CUDA
// Graph and replayed 5 times after one replay, or without a graph their
// wall time, over iters calls after 3.
static double time_us(mt_backend *be, void (*op)(void *), void *arg, int iters) {
    for (int i = 0; i < 3; i++) op(arg);
    mt_device_synchronize();
    mt_graph_begin(be);
    for (int i = 0; i < iters; i++) op(arg);
    char why[256];
    void *graph = mt_graph_end(be, why, sizeof why);
    if (!graph) {
        if (!graphs_failed++) printf("(no CUDA Graph: %s; wall times per call instead)\n", why);
        double t0 = mt_now();
        for (int i = 0; i < iters; i++) op(arg);
        mt_device_synchronize();
        return 1e6 * (mt_now() - t0) / iters;
    }
    mt_graph_launch(be, graph);
    mt_device_synchronize();
    double t0 = mt_now();
    for (int k = 0; k < 5; k++) mt_graph_launch(be, graph);
    mt_device_synchronize();
    mt_graph_free(graph);
    return 1e6 * (mt_now() - t0) / (5.0 * iters);
}

typedef struct {
    mt_backend *be;
    int R, IN, r, count;
    float p;
    void *x, *dx, *scratch, *copy;
    void *u[3], *a[3], *du[3];
    float *da[3];
} bench;

static void forward(void *arg) {
    bench *b = arg;
    mt_op_lora_down(b->be, b->u, (const void *const *)b->a, b->count, b->x, b->scratch, (size_t)b->R * b->IN * 2, b->R,
                    b->IN, b->r, b->p, 5, 0);
}

static void backward(void *arg) {
    bench *b = arg;
    mt_op_lora_down_backward(b->be, b->dx, b->da, (const void *const *)b->du, (const void *const *)b->a, b->count, b->x,
                             b->scratch, (size_t)b->R * b->IN * 2, b->R, b->IN, b->r, b->p, 5, 0);
}

// The backward's two fused parts alone: every dA, and dx.
static void wgrad(void *arg) {
    bench *b = arg;
    MT_CHECK(mt_lora_down_wgrad_cuda(b->be, b->da, (const void *const *)b->du, b->count, b->x, b->scratch,
                                     (size_t)b->R * b->IN * 2, b->R, b->IN, b->r, b->p, 5, 0),
             "the fused dA kernel does not take the shape");
}

static void dx(void *arg) {
    bench *b = arg;
    MT_CHECK(mt_lora_down_dx_cuda(b->be, b->dx, (const void *const *)b->du, (const void *const *)b->a, b->count, b->R,
                                  b->IN, b->r, b->p, 5, 0),
             "the fused dx kernel does not take the shape");
}

static void copy(void *arg) {
    bench *b = arg;
    mt_memcpy_async(b->copy, b->x, (size_t)b->R * b->IN * 2, b->be->stream);  // recorded in the graph
}

int main(int argc, char **argv) {
    int iters = argc > 1 ? atoi(argv[1]) : 50;
    if (mt_device_count() == 0) return fprintf(stderr, "mt_lora_bench: no GPU\n"), 77;
    mt_backend be;
    if (mt_backend_init(&be, 0)) return 1;
    char name[256];
    mt_device_describe(name, sizeof name);
    printf("mt_lora_bench on %s, %d calls each; microseconds a call\n", name, iters);
    struct {
        const char *what;
        int IN, count;
    } shapes[] = {{"1.1B q,k,v", 2048, 3}, {"1.1B gate,up", 2048, 2}, {"1.1B o", 2048, 1},  {"1.1B down", 5632, 1},
                  {"7B q,k,v", 4096, 3},   {"7B gate,up", 4096, 2},   {"7B down", 11008, 1}};
    printf("%-14s %5s %7s %9s %9s %9s %9s %9s %9s %9s %9s\n", "input", "p", "copy", "fwd", "fwd v1", "fwd cmp", "bwd",
           "bwd v1", "dA", "dx", "bwd cmp");
    for (int s = 0; s < 7; s++) {
        bench b = {.be = &be, .R = 4096, .IN = shapes[s].IN, .r = 16, .count = shapes[s].count};
        size_t nx = (size_t)b.R * b.IN;
        b.x = dev_random(nx, 1.0f, 1), b.dx = dev_random(nx, 0.01f, 2), b.scratch = dev_random(nx, 1.0f, 3);
        b.copy = dev_random(nx, 1.0f, 4);
        for (int g = 0; g < b.count; g++) {
            b.a[g] = dev_random((size_t)b.r * b.IN, 0.1f, 10 + g),
            b.du[g] = dev_random((size_t)b.R * b.r, 0.1f, 20 + g);
            b.u[g] = dev_random((size_t)b.R * b.r, 1.0f, 30 + g);
            b.da[g] = mt_device_malloc((size_t)b.r * b.IN * 4);
            mt_device_memset(b.da[g], 0, (size_t)b.r * b.IN * 4);
        }
        double copy_us = time_us(&be, copy, &b, iters);
        for (int d = 0; d < 2; d++) {
            b.p = d ? 0.05f : 0.0f;
            double t[8];
            setenv("MT_LORA_FUSED", "0", 1);
            t[2] = time_us(&be, forward, &b, iters), t[7] = time_us(&be, backward, &b, iters);
            setenv("MT_LORA_FUSED", "all", 1);  // the kernels without dropout too
            setenv("MT_LORA_KERNELS", "1", 1);  // version 1: its u kernel, dA and dx apart
            t[1] = time_us(&be, forward, &b, iters), t[4] = time_us(&be, backward, &b, iters);
            unsetenv("MT_LORA_KERNELS");
            t[0] = time_us(&be, forward, &b, iters), t[3] = time_us(&be, backward, &b, iters);
            t[5] = time_us(&be, wgrad, &b, iters), t[6] = time_us(&be, dx, &b, iters);
            printf("%-14s %5.2f %7.1f %9.1f %9.1f %9.1f %9.1f %9.1f %9.1f %9.1f %9.1f\n", shapes[s].what, b.p, copy_us,
                   t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]);
            fflush(stdout);
        }
        mt_device_free(b.x), mt_device_free(b.dx), mt_device_free(b.scratch), mt_device_free(b.copy);
        for (int g = 0; g < b.count; g++)
            mt_device_free(b.a[g]), mt_device_free(b.du[g]), mt_device_free(b.u[g]), mt_device_free(b.da[g]);
    }
    unsetenv("MT_LORA_FUSED");
    mt_backend_free(&be);
    return 0;
}
