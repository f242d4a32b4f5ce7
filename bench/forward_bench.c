// bench/forward_bench.c: memtune's inference baseline for the MeZO bench
// (bench/mezo.py): the forward-only model of a config.json with random
// weights, timed over random tokens. Prints one JSON line: milliseconds per
// forward pass (loss included), the allocator's peak per category, and the
// milliseconds of MeZO's own passes over all the weights (one perturbation
// into a scratch copy, tensor by tensor, and one update), for the step's
// overhead.
// Usage: mt_forward_bench MODEL_DIR B T ITERS [WARMUP]
#include <stdio.h>
#include <stdlib.h>

#include "kernels/common.h"
#include "kernels/device.h"
#include "kernels/mem.h"
#include "kernels/ops.h"
#include "kernels/rng.h"
#include "trainer/hf.h"
#include "trainer/model.h"

int main(int argc, char **argv) {
    if (argc < 5) return fprintf(stderr, "usage: mt_forward_bench MODEL_DIR B T ITERS [WARMUP]\n"), 2;
    int B = atoi(argv[2]), T = atoi(argv[3]), iters = atoi(argv[4]), warmup = argc > 5 ? atoi(argv[5]) : 2;
    mt_model_config c;
    mt_err err = mt_hf_read_config(argv[1], &c);
    if (err) return fprintf(stderr, "%s\n", mt_last_error()), 1;
    int gpu = mt_device_count() > 0;
    mt_backend be;
    if (mt_backend_init(&be, gpu ? 0 : -1)) return 1;
    int n;
    size_t total;
    free(mt_model_param_table(&c, &n, &total));
    float *params = malloc(total * 4);
    if (!params) return fprintf(stderr, "out of host memory\n"), 1;
    mt_model_init_random(&c, params, 1);
    mt_model_options o = {.B = B, .T = T, .forward_only = 1};
    mt_model *m;
    if ((err = mt_model_create_with(&m, &be, &c, &o)) || (err = mt_model_set_weights(m, params)))
        return fprintf(stderr, "%s\n", mt_last_error()), 1;
    free(params);
    int32_t *in = malloc((size_t)B * T * 4), *tg = malloc((size_t)B * T * 4);
    for (int i = 0; i < B * T; i++)
        in[i] = (int32_t)(mt_rng_bits(1, i) % (uint64_t)c.V), tg[i] = (int32_t)(mt_rng_bits(2, i) % (uint64_t)c.V);
    double loss = 0;
    for (int i = 0; i < warmup; i++) loss = mt_model_step(m, in, tg, 0, 0);
    double t0 = mt_now();
    for (int i = 0; i < iters; i++) loss = mt_model_step(m, in, tg, 0, 0);  // returns a host sum: synchronised
    double ms = 1000.0 * (mt_now() - t0) / iters;
    mt_mem_tally t;
    mt_mem_get_tally(gpu ? MT_DEVICE : MT_HOST, &t);
    // MeZO's passes over the weights, outside the tally above
    mt_trainable tr;
    mt_model_trainable(m, &tr);
    size_t widest = 0, act = mt_act_size(&be);
    for (int i = 0; i < tr.count; i++)
        if (tr.params[i].count > widest) widest = tr.params[i].count;
    void *scratch = NULL;
    double perturb_ms = 0, update_ms = 0;
    if (mt_alloc(&scratch, widest * act, MT_MEM_WORKSPACE, gpu ? MT_DEVICE : MT_HOST) == MT_OK) {
        mt_zo_directions d = {1, {7}, {1e-9f}};
        for (int rep = 0; rep < 3; rep++) {
            double a = mt_now();
            for (int i = 0; i < tr.count; i++)
                mt_op_perturb(&be, scratch, (char *)tr.weights + tr.params[i].offset * act, tr.params[i].count, 1e-3f,
                              5, tr.params[i].offset);
            mt_op_sum(&be, (const float *)scratch, 1);  // waits for the device
            double b = mt_now();
            for (int i = 0; i < tr.count; i++)
                mt_op_zo_update(&be, (char *)tr.weights + tr.params[i].offset * act, tr.params[i].count,
                                tr.params[i].offset, &d, 1e-6f, 0.0f, 9);
            mt_op_sum(&be, (const float *)scratch, 1);
            perturb_ms = 1000.0 * (b - a), update_ms = 1000.0 * (mt_now() - b);
        }
        mt_free(&scratch);
    }
    printf(
        "{\"forward_ms\": %.3f, \"loss\": %.5f, \"allocator_peak\": %zu, \"weights\": %zu, \"activations\": %zu, "
        "\"workspace\": %zu, \"perturb_pass_ms\": %.3f, \"update_pass_ms\": %.3f, \"parameters\": %zu}\n",
        ms, loss / (B * T), t.peak_total, t.peak[MT_MEM_WEIGHTS], t.peak[MT_MEM_ACTIVATIONS], t.peak[MT_MEM_WORKSPACE],
        perturb_ms, update_ms, tr.total);
    mt_model_free(m);
    mt_backend_free(&be);
    free(in), free(tg);
    return 0;
}
