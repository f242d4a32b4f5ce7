// tests/testutil.h: helpers shared by the Check suites: seeded random
// tensors, error measures, finite-difference gradient checks, temp folders.
#ifndef MT_TESTUTIL_H
#define MT_TESTUTIL_H

#include <check.h>
#include <stddef.h>
#include <stdint.h>

#include "offload/offload.h"
#include "optim/galore.h"
#include "trainer/model.h"

// Fills x with uniform values in [lo, hi) drawn from (seed, i).
void tu_fill_uniform(float *x, size_t n, float lo, float hi, uint64_t seed);
float *tu_random(size_t n, float lo, float hi, uint64_t seed);  // malloc'd
// ||a - b|| / ||b||
double tu_norm_rel_error(const float *a, const float *b, size_t n);

// The floats that probe an encoder to an 8-bit map (kernels/qmap.h, 256
// ascending values): the least, the greatest and 4 random floats (from seed)
// of every 16-bit prefix of a float's bits, every value and midpoint of map
// and their neighbours 3 ulps either side, then infinities, NaNs and signed
// zeros, each handed to each(x, ctx). Returns how many.
long tu_qmap_cases(const float *map, uint64_t seed, void (*each)(float x, void *ctx), void *ctx);

// Central finite differences of `loss` with respect to x[i] for `samples`
// indices spread over x; returns the worst |fd - analytic| / (|fd| + |analytic| + floor).
typedef double (*tu_loss_fn)(void *ctx);
double tu_fd_check(tu_loss_fn loss, void *ctx, float *x, const float *analytic, size_t n, int samples, double h);

// config.json of the tiny Llama the suites train (V 13, C 16, 2 layers, GQA).
extern const char *const tu_tiny_llama_json;
// parent/name holding config.json with `json` (path written to out).
void tu_model_folder(const char *parent, const char *name, const char *json, char *out, size_t len);
// The losses of run/metrics.jsonl by step into losses[step - 1]; checks one
// record per step, in order, at most max; returns the count.
int tu_read_losses(const char *run, double *losses, int max);
// Asserts that runs `expect` and `got` both logged `steps` losses (steps <=
// 64) and that they are the same bits, step by step; `expect`'s losses go to
// losses unless it is NULL.
void tu_assert_same_losses(const char *expect, const char *got, int steps, double *losses);

// GaLore's view of a model table: every layer matrix projected, the rest
// plain AdamW (malloc'd, n entries).
mt_galore_param *tu_galore_layer_params(const mt_param_info *table, int n);

// An mt_config for the tiny CPU runs the suites train: defaults, model.path
// folder with random init, data.train data, output.dir out, 12 steps of 16
// tokens, eval every 4; then each "section.key", "value" pair of the
// NULL-terminated extra (every assignment asserted).
void tu_tiny_run_config(void *cfg, const char *folder, const char *data, const char *out, const char *const *extra);

// A 20000-token dataset over the tiny vocabulary (13) at path: mostly
// token i + 1 after token i, so that a few steps visibly learn.
void tu_write_sequence_data(const char *path);
// The NULL-ended key/value pairs whose keys do not start with prefix, into
// out (room for all of them and the NULL).
void tu_pairs_without(const char *const *pairs, const char *prefix, const char **out);

// Asserts that got is want and that the last error's message holds fragment.
void tu_expect_error(mt_err got, mt_err want, const char *fragment);

// A fresh empty folder under /tmp (path written to buf).
void tu_tempdir(char *buf, size_t len);

// Runs every test of `s` (in this process when `no_fork`, as GPU suites
// must) and returns the exit status for main: 0 when all passed.
int tu_run_suite(Suite *s, int no_fork);

// The offload.delay checks' problem (test_offload on the CPU backend,
// test_model_gpu on the GPU): n parameters of counts[p] values laid out one
// after another (slots = offsets), each its own bucket, weight decay on all
// but the second; offs gets their offsets; returns the total.
size_t tu_delay_params(const size_t *counts, int n, mt_offload_param *params, size_t *offs);
// Their offload: AdamW (betas 0.9, 0.95, eps 1e-8, weight decay wd), clipping at clip (0: none), threads, delay.
mt_offload_config tu_delay_config(float wd, float clip, int threads, int delay);
// Their reference for step s: the norm of grad (bf16 codes when grad_bf16)
// summed bucket by bucket as the offload sums it, its clip factor, and AdamW
// over master, m, v with the CPU kernel. seen (the weights the next step's
// gradient is taken at) becomes the master before this update with delay
// (from step 2 on), after it without. Returns the norm.
double tu_delay_reference_step(const mt_offload_param *params, int n, const void *grad, int grad_bf16, int s, float lr,
                               float wd, float clip, int delay, float *master, float *m, float *v, float *seen,
                               size_t total);

#endif
