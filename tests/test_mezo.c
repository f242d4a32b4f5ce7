// tests/test_mezo.c: MeZO on the CPU reference. The z stream (Philox4x32-10
// against the published test vectors, normal statistics, the ops against
// their element-by-element definition), the drift of in-place perturbation
// over 1000 cycles, the model's perturbation against explicitly perturbed
// weights (full model, tied embeddings, biases, adapters, a selection), and
// MeZO itself: it lowers a convex loss and the tiny model's loss, the
// average of many projected gradients points along the true gradient, and
// `memtune train` with optim.kind: mezo resumes bit-identically.
#include <check.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "datasets/dataset.h"
#include "kernels/ops.h"
#include "kernels/ops_ref.h"
#include "kernels/rng.h"
#include "optim/mezo.h"
#include "testutil.h"
#include "trainer/config.h"
#include "trainer/hf.h"
#include "trainer/lora.h"
#include "trainer/model.h"
#include "trainer/train.h"

static char dir[256];

// ------------------------------------------------------------- the z stream

START_TEST(philox_matches_the_published_vectors) {
    // Random123's known-answer vectors for philox4x32-10
    static const uint32_t counter[3][4] = {
        {0, 0, 0, 0}, {~0u, ~0u, ~0u, ~0u}, {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}};
    static const uint32_t key[3][2] = {{0, 0}, {~0u, ~0u}, {0xa4093822u, 0x299f31d0u}};
    static const uint32_t expect[3][4] = {{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u},
                                          {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu},
                                          {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}};
    for (int v = 0; v < 3; v++) {
        uint32_t out[4];
        mt_philox4x32_10(counter[v], key[v], out);
        for (int i = 0; i < 4; i++)
            ck_assert_msg(out[i] == expect[v][i], "vector %d word %d: %08x != %08x", v, i, out[i], expect[v][i]);
    }
}
END_TEST

START_TEST(gauss4_follows_its_definition) {
    // the uniforms: a word's top 23 bits as a mantissa, exactly
    ck_assert_float_eq(mt_rng_mantissa_float(0), 1.0f);
    ck_assert_float_eq(mt_rng_mantissa_float(0xffffffffu), 2.0f - 0x1p-23f);
    ck_assert_float_eq(mt_rng_mantissa_float(0x80000000u), 1.5f);
    ck_assert_float_eq(mt_rng_mantissa_float(0x000001ffu), 1.0f);  // the low 9 bits are dropped
    // group g's normals from Philox's words at counter g, as rng.h writes them
    for (uint64_t g = 0; g < 3; g++) {
        float z[4];
        mt_rng_gauss4(7, g, z);
        for (int pair = 0; pair < 2; pair++) {
            double u1 = 2.0 - mt_rng_mantissa_float(mt_rng_philox_word(7, 4 * g + 2 * (uint64_t)pair));
            double u2 = mt_rng_mantissa_float(mt_rng_philox_word(7, 4 * g + 2 * (uint64_t)pair + 1)) - 1.0;
            double r = sqrt(-2.0 * log(u1));
            ck_assert_float_eq(z[2 * pair], (float)(r * cos(6.283185307179586 * u2)));
            ck_assert_float_eq(z[2 * pair + 1], (float)(r * sin(6.283185307179586 * u2)));
            ck_assert_float_eq(mt_rng_gauss(7, 4 * g + 2 * (uint64_t)pair), z[2 * pair]);
        }
    }
}
END_TEST

START_TEST(gauss_stream_is_standard_normal) {
    const int n = 1 << 20;
    double sum = 0, sq = 0, fourth = 0, cross = 0;
    for (int i = 0; i < n; i++) {
        double z = mt_rng_gauss(42, (uint64_t)i), other = mt_rng_gauss(43, (uint64_t)i);
        sum += z, sq += z * z, fourth += z * z * z * z, cross += z * other;
    }
    double mean = sum / n, var = sq / n - mean * mean;
    ck_assert_msg(fabs(mean) < 5e-3, "mean %g", mean);
    ck_assert_msg(fabs(var - 1.0) < 1e-2, "variance %g", var);
    ck_assert_msg(fabs(fourth / n - 3.0) < 5e-2, "fourth moment %g", fourth / n);
    ck_assert_msg(fabs(cross / n) < 5e-3, "streams of seeds 42 and 43 correlate: %g", cross / n);
    // neighbours within a group and across groups are not correlated
    double lag = 0;
    for (int i = 0; i + 1 < n; i++) lag += (double)mt_rng_gauss(42, (uint64_t)i) * mt_rng_gauss(42, (uint64_t)i + 1);
    ck_assert_msg(fabs(lag / n) < 5e-3, "lag-1 correlation %g", lag / n);
}
END_TEST

START_TEST(perturb_and_update_follow_their_definition) {
    static const size_t sizes[] = {1, 3, 7, 22, 257};
    static const uint64_t offsets[] = {0, 1, 3, 6, 1001};
    for (int s = 0; s < 5; s++)
        for (int o = 0; o < 5; o++) {
            size_t n = sizes[s];
            uint64_t off = offsets[o];
            float *w = tu_random(n, -1, 1, 7 + s), *got = malloc(n * 4), *want = malloc(n * 4);
            mt_perturb_ref(got, w, n, 0.25f, 99, off);
            for (size_t j = 0; j < n; j++) {
                float expect = w[j] + 0.25f * mt_rng_gauss(99, off + j);
                ck_assert_msg(got[j] == expect, "n %zu offset %llu j %zu", n, (unsigned long long)off, j);
            }
            uint64_t seeds[2] = {5, 6};
            float coefs[2] = {0.5f, -2.0f};
            memcpy(got, w, n * 4);
            mt_zo_update_ref(got, n, off, 2, seeds, coefs, 0.1f, 0.01f);
            for (size_t j = 0; j < n; j++) {
                double step = 0.5 * mt_rng_gauss(5, off + j) - 2.0 * mt_rng_gauss(6, off + j) + 0.01 * w[j];
                want[j] = (float)(w[j] - 0.1 * step);
                ck_assert_msg(fabsf(got[j] - want[j]) <= 1e-6f * (1 + fabsf(want[j])), "update at %zu", j);
            }
            // rows: x[n, c] gets z at the table element tokens[n] * C + c
            int32_t tokens[3] = {4, 0, 4};
            float x[3 * 5] = {0};
            mt_perturb_rows_ref(x, tokens, 3, 5, 2.0f, 11, off);
            for (int r = 0; r < 3; r++)
                for (int c = 0; c < 5; c++)
                    ck_assert(x[r * 5 + c] == 2.0f * mt_rng_gauss(11, off + (uint64_t)tokens[r] * 5 + c));
            free(w), free(got), free(want);
        }
}
END_TEST

// The paper's in-place cycle (+eps, -2 eps, +eps) on fp32 values: each
// addition rounds, so the values wander by a few ulps over many cycles; the
// model avoids this by never writing the perturbation (next tests).
START_TEST(in_place_drift_after_1000_cycles_stays_within_rounding) {
    mt_backend be;
    mt_backend_init(&be, -1);
    const size_t n = 4096;
    float *w = malloc(n * 4), *w0 = malloc(n * 4);
    for (size_t j = 0; j < n; j++) w[j] = w0[j] = 0.02f * mt_rng_gauss(1, j);
    mt_param_group g = {0, n, 1};
    mt_mezo_config cfg = {1e-3f, 1, 0.0f, 5};
    mt_mezo *mz;
    ck_assert_int_eq(mt_mezo_init(&mz, &be, &cfg, w, &g, 1), MT_OK);
    const int cycles = 1000;
    double worst = 0, worst_ulps = 0, largest = 0;
    for (int t = 0; t < cycles; t++) {
        uint64_t seed = mt_mezo_direction_seed(mz, t, 0);
        mt_mezo_perturb_in_place(mz, seed, cfg.eps);
        mt_mezo_perturb_in_place(mz, seed, -2 * cfg.eps);
        mt_mezo_perturb_in_place(mz, seed, cfg.eps);
    }
    for (size_t j = 0; j < n; j++) {
        double d = fabs((double)w[j] - w0[j]);
        if (d > worst) worst = d;
        // in ulps of the largest magnitude the value reached (|w| + eps |z|)
        double reach = fabs(w0[j]) + 2e-3 * 6.0, ulp = reach * FLT_EPSILON;
        if (d / ulp > worst_ulps) worst_ulps = d / ulp;
        if (fabs(w0[j]) > largest) largest = fabs(w0[j]);
    }
    printf("in-place perturbation drift after %d cycles (fp32, eps 1e-3, |w| <= %.3f): max %.3g (%.1f ulps)\n", cycles,
           largest, worst, worst_ulps);
    // each of the 3000 additions rounds by at most half an ulp of what it reached
    ck_assert_msg(worst_ulps <= 3.0 * cycles * 0.5, "drift %g ulps", worst_ulps);
    ck_assert(worst < 1e-4);
    mt_mezo_free(mz);
    mt_backend_free(&be);
    free(w), free(w0);
}
END_TEST

// ------------------------------------------------------------------ model

enum { B = 2, T = 6, N = B * T };

static void tiny(mt_model_config *c, int tied, int bias) {
    memset(c, 0, sizeof *c);
    snprintf(c->architecture, sizeof c->architecture, "LlamaForCausalLM");
    c->V = 13, c->C = 16, c->F = 24, c->L = 2, c->H = 4, c->KV = 2, c->D = 4;
    c->max_position = 64;
    c->rms_eps = 1e-5f, c->rope_theta = 10000.0f, c->init_std = 0.3f;
    c->tie_embeddings = tied;
    c->qkv_bias = c->o_bias = bias;
    c->dtype = MT_DTYPE_F32;
}

static float *random_weights(const mt_model_config *c, size_t *total) {
    int n;
    mt_param_info *t = mt_model_param_table(c, &n, total);
    float *w = malloc(*total * 4);
    mt_model_init_random(c, w, 3);
    // norms and biases away from 1 and 0, so that perturbing them matters
    for (int i = 0; i < n; i++)
        if (t[i].ndim == 1)
            for (size_t j = 0; j < t[i].count; j++) w[t[i].offset + j] += 0.2f * mt_rng_gauss(4, t[i].offset + j);
    free(t);
    return w;
}

static void random_batch(int32_t *inputs, int32_t *targets, int V, uint64_t seed) {
    for (int i = 0; i < N; i++) {
        inputs[i] = (int32_t)(mt_rng_bits(seed, (uint64_t)i) % (uint64_t)V);
        targets[i] = (int32_t)(mt_rng_bits(seed + 1, (uint64_t)i) % (uint64_t)V);
    }
}

static mt_model *make_model(mt_backend *be, const mt_model_config *c, const mt_lora_config *lora, int forward_only) {
    mt_model_options o = {.B = B, .T = T, .forward_only = forward_only};
    if (lora) o.lora = *lora;
    mt_model *m;
    ck_assert_int_eq(mt_model_create_with(&m, be, c, &o), MT_OK);
    return m;
}

// selected[i] of the trainable table, or all when NULL: w + scale z on the host
static void perturb_host(float *w, const mt_param_info *t, int n, const unsigned char *selected, uint64_t seed,
                         float scale) {
    for (int i = 0; i < n; i++)
        if (!selected || selected[i])
            for (size_t j = 0; j < t[i].count; j++) w[t[i].offset + j] += scale * mt_rng_gauss(seed, t[i].offset + j);
}

// The perturbed forward equals the forward of explicitly perturbed weights,
// and leaves the stored weights as they were.
static void check_perturbation(const mt_model_config *c, const mt_lora_config *lora, const unsigned char *selected) {
    mt_backend be;
    mt_backend_init(&be, -1);
    size_t total;
    float *w = random_weights(c, &total);
    mt_model *lazy = make_model(&be, c, lora, 1), *explicit_model = make_model(&be, c, lora, 1);
    ck_assert_int_eq(mt_model_set_weights(lazy, w), MT_OK);
    ck_assert_int_eq(mt_model_set_weights(explicit_model, w), MT_OK);
    mt_trainable tr;
    mt_model_trainable(lazy, &tr);
    float *adapters = NULL;
    if (lora) {
        adapters = calloc(tr.total, 4);
        mt_lora_init_params(tr.params, tr.count, adapters, 9);
        for (size_t j = 0; j < tr.total; j++) adapters[j] += 0.1f * mt_rng_gauss(10, j);  // B non-zero
        mt_model_set_adapters(lazy, adapters);
    }
    float *before = malloc(tr.total * 4), *after = malloc(tr.total * 4), *host = malloc(tr.total * 4);
    mt_model_get_trainable(lazy, before);
    ck_assert_int_eq(mt_model_enable_perturbation(lazy, selected), MT_OK);
    int32_t inputs[N], targets[N];
    random_batch(inputs, targets, c->V, 21);
    double plain = mt_model_step(lazy, inputs, targets, 0, 0);
    for (int sign = -1; sign <= 1; sign += 2) {
        float scale = 0.05f * sign;
        mt_model_set_perturbation(lazy, 77, scale);
        double got = mt_model_step(lazy, inputs, targets, 0, 0);
        memcpy(host, before, tr.total * 4);
        perturb_host(host, tr.params, tr.count, selected, 77, scale);
        if (lora)
            mt_model_set_adapters(explicit_model, host);
        else
            ck_assert_int_eq(mt_model_set_weights(explicit_model, host), MT_OK);
        double want = mt_model_step(explicit_model, inputs, targets, 0, 0);
        ck_assert_msg(fabs(got - want) <= 1e-5 * fabs(want), "scale %g: %.9g != %.9g", scale, got, want);
        ck_assert_msg(fabs(got - plain) > 1e-4 * fabs(plain), "scale %g changed nothing", scale);
    }
    mt_model_set_perturbation(lazy, 0, 0.0f);
    ck_assert(mt_model_step(lazy, inputs, targets, 0, 0) == plain);
    mt_model_get_trainable(lazy, after);
    ck_assert(memcmp(before, after, tr.total * 4) == 0);
    mt_model_free(lazy);
    mt_model_free(explicit_model);
    mt_backend_free(&be);
    free(w), free(adapters), free(before), free(after), free(host);
}

START_TEST(model_perturbation_equals_perturbed_weights) {
    mt_model_config c;
    tiny(&c, 0, 0);
    check_perturbation(&c, NULL, NULL);
    tiny(&c, 1, 1);  // tied embeddings (one z for lookup and lm_head), biases
    check_perturbation(&c, NULL, NULL);
    // a selection: only the attention of layer 1 and the final norm
    int n;
    size_t total;
    mt_param_info *t = mt_model_param_table(&c, &n, &total);
    unsigned char *selected = calloc((size_t)n, 1);
    for (int i = 0; i < n; i++)
        selected[i] = strstr(t[i].name, "layers.1.self_attn") || !strcmp(t[i].name, "model.norm.weight");
    check_perturbation(&c, NULL, selected);
    free(selected);
    free(t);
    // LoRA: only the adapters move
    tiny(&c, 0, 0);
    mt_lora_config lora = {2, 4.0f, 0.0f, 0, (1u << MT_LORA_MODULES) - 1};
    check_perturbation(&c, &lora, NULL);
}
END_TEST

// 1000 MeZO steps with lr 0 on the model: the stored weights are exactly the
// same (the drift of the model's perturbation is 0 by construction).
START_TEST(model_perturbation_leaves_no_drift) {
    mt_backend be;
    mt_backend_init(&be, -1);
    mt_model_config c;
    tiny(&c, 0, 0);
    size_t total;
    float *w = random_weights(&c, &total), *after = malloc(total * 4);
    mt_model *m = make_model(&be, &c, NULL, 1);
    ck_assert_int_eq(mt_model_set_weights(m, w), MT_OK);
    ck_assert_int_eq(mt_model_enable_perturbation(m, NULL), MT_OK);
    mt_trainable tr;
    mt_model_trainable(m, &tr);
    int32_t inputs[N], targets[N];
    random_batch(inputs, targets, c.V, 5);
    for (int t = 0; t < 1000; t++) {
        mt_model_set_perturbation(m, (uint64_t)t, 1e-3f);
        double plus = mt_model_step(m, inputs, targets, 0, 0);
        mt_model_set_perturbation(m, (uint64_t)t, -1e-3f);
        double minus = mt_model_step(m, inputs, targets, 0, 0);
        ck_assert(plus != minus);
    }
    mt_model_set_perturbation(m, 0, 0.0f);
    mt_model_get_trainable(m, after);
    double drift = 0;
    for (size_t j = 0; j < total; j++) drift = fmax(drift, fabs((double)after[j] - w[j]));
    printf("model perturbation drift after 1000 cycles: %g\n", drift);
    ck_assert(drift == 0.0);
    mt_model_free(m);
    mt_backend_free(&be);
    free(w), free(after);
}
END_TEST

// ------------------------------------------------------------------- MeZO

typedef struct {
    mt_mezo *mz;
    float *w;
    const float *a, *center;
    size_t n;
} convex_ctx;

static double convex_value(const convex_ctx *c) {
    double f = 0;
    for (size_t j = 0; j < c->n; j++) f += 0.5 * c->a[j] * (c->w[j] - c->center[j]) * (c->w[j] - c->center[j]);
    return f;
}

// f(w + scale z) with the weights perturbed in place and put back
static double convex_loss(void *p, uint64_t seed, float scale) {
    convex_ctx *c = p;
    mt_mezo_perturb_in_place(c->mz, seed, scale);
    double f = convex_value(c);
    mt_mezo_perturb_in_place(c->mz, seed, -scale);
    return f;
}

START_TEST(mezo_minimises_a_convex_quadratic) {
    mt_backend be;
    mt_backend_init(&be, -1);
    const size_t n = 64;
    float *w = calloc(n, 4), *a = malloc(n * 4), *center = malloc(n * 4);
    for (size_t j = 0; j < n; j++) a[j] = 0.5f + (float)j / n, center[j] = mt_rng_gauss(8, j);
    mt_param_group g = {0, n, 0};
    mt_mezo_config cfg = {1e-3f, 4, 0.0f, 3};
    convex_ctx ctx = {NULL, w, a, center, n};
    ck_assert_int_eq(mt_mezo_init(&ctx.mz, &be, &cfg, w, &g, 1), MT_OK);
    double f0 = convex_value(&ctx), losses[8];
    for (int t = 0; t < 600; t++) {
        mt_mezo_losses(ctx.mz, t, convex_loss, &ctx, losses);
        mt_mezo_info info;
        mt_mezo_update(ctx.mz, t, losses, 0.02f, &info);
        ck_assert(info.finite);
    }
    double f1 = convex_value(&ctx);
    printf("convex quadratic (n=%zu): %.4f -> %.6f after 600 MeZO steps\n", n, f0, f1);
    ck_assert_msg(f1 < 0.01 * f0, "%g -> %g", f0, f1);
    mt_mezo_free(ctx.mz);
    mt_backend_free(&be);
    free(w), free(a), free(center);
}
END_TEST

typedef struct {
    mt_model *model;
    const int32_t *inputs, *targets;
} model_ctx;

static double model_loss(void *p, uint64_t seed, float scale) {
    model_ctx *c = p;
    mt_model_set_perturbation(c->model, seed, scale);
    double loss = mt_model_step(c->model, c->inputs, c->targets, 0, 0) / N;
    mt_model_set_perturbation(c->model, 0, 0.0f);
    return loss;
}

static mt_param_group *all_groups(const mt_trainable *tr) {
    mt_param_group *g = malloc((size_t)tr->count * sizeof *g);
    for (int i = 0; i < tr->count; i++) g[i] = (mt_param_group){tr->params[i].offset, tr->params[i].count, 1};
    return g;
}

START_TEST(mezo_lowers_the_tiny_model_loss) {
    mt_backend be;
    mt_backend_init(&be, -1);
    mt_model_config c;
    tiny(&c, 0, 0);
    c.init_std = 0.05f;
    size_t total;
    float *w = random_weights(&c, &total);
    mt_model *m = make_model(&be, &c, NULL, 1);
    ck_assert_int_eq(mt_model_set_weights(m, w), MT_OK);
    ck_assert_int_eq(mt_model_enable_perturbation(m, NULL), MT_OK);
    mt_trainable tr;
    mt_model_trainable(m, &tr);
    mt_param_group *groups = all_groups(&tr);
    mt_mezo_config cfg = {1e-3f, 1, 0.0f, 11};
    mt_mezo *mz;
    ck_assert_int_eq(mt_mezo_init(&mz, &be, &cfg, tr.weights, groups, tr.count), MT_OK);
    int32_t inputs[N], targets[N];
    random_batch(inputs, targets, c.V, 31);
    model_ctx ctx = {m, inputs, targets};
    double before = model_loss(&ctx, 0, 0.0f), losses[2];
    for (int t = 0; t < 400; t++) {
        mt_mezo_losses(mz, t, model_loss, &ctx, losses);
        mt_mezo_info info;
        mt_mezo_update(mz, t, losses, 1e-3f, &info);
    }
    double after = model_loss(&ctx, 0, 0.0f);
    printf("tiny model, one batch: loss %.4f -> %.4f after 400 MeZO steps\n", before, after);
    ck_assert_msg(after < before - 0.1, "%g -> %g", before, after);
    mt_mezo_free(mz);
    mt_model_free(m);
    mt_backend_free(&be);
    free(w), free(groups);
}
END_TEST

// E[g z] = the gradient (for small eps): averaged over many directions the
// projected gradients point along the true gradient, computed by backward.
START_TEST(projected_gradients_average_to_the_gradient) {
    mt_backend be;
    mt_backend_init(&be, -1);
    mt_model_config c;
    tiny(&c, 0, 0);
    size_t total;
    float *w = random_weights(&c, &total);
    int32_t inputs[N], targets[N];
    random_batch(inputs, targets, c.V, 41);
    // the true gradient of the mean token loss
    mt_model *full = make_model(&be, &c, NULL, 0);
    ck_assert_int_eq(mt_model_set_weights(full, w), MT_OK);
    mt_model_zero_grads(full);
    mt_model_step(full, inputs, targets, 1.0f / N, 1);
    const float *grad = mt_model_grads(full);
    // MeZO over the norms and the first layer's attention output (a few
    // hundred parameters: the estimate's variance grows with their number)
    int n;
    const mt_param_info *t = mt_model_params(full, &n);
    unsigned char *selected = calloc((size_t)n, 1);
    mt_param_group groups[16];
    int ng = 0;
    size_t d = 0;
    for (int i = 0; i < n; i++)
        if (strstr(t[i].name, "norm") || !strcmp(t[i].name, "model.layers.0.self_attn.o_proj.weight")) {
            selected[i] = 1, d += t[i].count;
            groups[ng++] = (mt_param_group){t[i].offset, t[i].count, 1};
        }
    mt_model *m = make_model(&be, &c, NULL, 1);
    ck_assert_int_eq(mt_model_set_weights(m, w), MT_OK);
    ck_assert_int_eq(mt_model_enable_perturbation(m, selected), MT_OK);
    mt_trainable tr;
    mt_model_trainable(m, &tr);
    mt_mezo_config cfg = {1e-3f, 1, 0.0f, 13};
    mt_mezo *mz;
    ck_assert_int_eq(mt_mezo_init(&mz, &be, &cfg, tr.weights, groups, ng), MT_OK);
    model_ctx ctx = {m, inputs, targets};
    double *estimate = calloc(total, sizeof(double)), losses[2];
    const int K = 6000;
    for (int k = 0; k < K; k++) {
        mt_mezo_losses(mz, k, model_loss, &ctx, losses);
        double g = (losses[0] - losses[1]) / (2.0 * cfg.eps);
        uint64_t seed = mt_mezo_direction_seed(mz, k, 0);
        for (int i = 0; i < ng; i++)
            for (size_t j = 0; j < groups[i].count; j++) {
                size_t at = groups[i].offset + j;
                estimate[at] += g * mt_rng_gauss(seed, at) / K;
            }
    }
    double dot = 0, ee = 0, gg = 0;
    for (int i = 0; i < ng; i++)
        for (size_t j = 0; j < groups[i].count; j++) {
            size_t at = groups[i].offset + j;
            dot += estimate[at] * grad[at], ee += estimate[at] * estimate[at], gg += (double)grad[at] * grad[at];
        }
    double cosine = dot / sqrt(ee * gg);
    printf("mean of %d projected gradients vs backward's gradient over %zu parameters: cosine %.4f, norm ratio %.3f\n",
           K, d, cosine, sqrt(ee / gg));
    ck_assert_msg(cosine > 0.9, "cosine %g", cosine);
    mt_mezo_free(mz);
    mt_model_free(m);
    mt_model_free(full);
    mt_backend_free(&be);
    free(w), free(selected), free(estimate);
}
END_TEST

static void defer_to(void *model, const mt_zo_directions *d, float lr, float weight_decay, uint64_t round_seed) {
    mt_model_defer_update(model, d, lr, weight_decay, round_seed);
}

// Two MeZO runs from the same weights, directions and batch: model a with
// options oa (its update applied at once, or deferred with defer_a), model b
// with ob and its update deferred. The tensors named like `unselected` are not
// trained. Every step's losses must agree bit for bit, an eval at eval_step
// and a read-back at read_step (-1: none) change nothing after them, and the
// final weights agree (and moved).
static void mezo_runs_agree(const mt_model_config *c, const mt_model_options *oa, const mt_model_options *ob,
                            int defer_a, const char *unselected, uint64_t seed, int steps, int eval_step,
                            int read_step) {
    mt_backend be;
    mt_backend_init(&be, -1);
    size_t total;
    float *w = random_weights(c, &total), *wa = malloc(total * 4), *wb = malloc(total * 4);
    mt_model *models[2];
    ck_assert_int_eq(mt_model_create_with(&models[0], &be, c, oa), MT_OK);
    ck_assert_int_eq(mt_model_create_with(&models[1], &be, c, ob), MT_OK);
    mt_trainable t[2];
    mt_model_trainable(models[0], &t[0]);
    mt_model_trainable(models[1], &t[1]);
    unsigned char *selected = malloc((size_t)t[0].count);
    mt_param_group *groups = malloc((size_t)t[0].count * sizeof *groups);
    int ng = 0;
    for (int i = 0; i < t[0].count; i++) {
        selected[i] = !strstr(t[0].params[i].name, unselected);
        if (selected[i])
            groups[ng++] = (mt_param_group){t[0].params[i].offset, t[0].params[i].count, t[0].params[i].decay};
    }
    mt_mezo *mz[2];
    mt_mezo_config cfg = {1e-3f, 2, 0.1f, seed};
    for (int k = 0; k < 2; k++) {
        ck_assert_int_eq(mt_model_set_weights(models[k], w), MT_OK);
        ck_assert_int_eq(mt_model_enable_perturbation(models[k], selected), MT_OK);
        ck_assert_int_eq(mt_mezo_init(&mz[k], &be, &cfg, t[k].weights, groups, ng), MT_OK);
        if (k == 1 || defer_a) mt_mezo_defer_updates(mz[k], defer_to, models[k]);
    }
    int32_t inputs[N], targets[N];
    random_batch(inputs, targets, c->V, seed + 34);
    for (int step = 0; step < steps; step++) {
        double l[2][4];
        model_ctx ctx[2] = {{models[0], inputs, targets}, {models[1], inputs, targets}};
        for (int k = 0; k < 2; k++) mt_mezo_losses(mz[k], step, model_loss, &ctx[k], l[k]);
        for (int j = 0; j < 4; j++)
            ck_assert_msg(l[0][j] == l[1][j], "step %d loss %d: %.17g vs %.17g", step, j, l[0][j], l[1][j]);
        for (int k = 0; k < 2; k++) {
            mt_mezo_info info;
            mt_mezo_update(mz[k], step, l[k], 1e-2f, &info);
        }
        if (step == eval_step) {
            ck_assert(model_loss(&ctx[1], 0, 0.0f) == model_loss(&ctx[0], 0, 0.0f));  // flushes
            // one tensor of layer 0 set anew: its layer's other tensors keep their updates (a resident slot's too)
            int i0 = 0;
            while (i0 < t[0].count && !strstr(t[0].params[i0].name, "layers.0.")) i0++;
            ck_assert_int_lt(i0, t[0].count);
            for (int k = 0; k < 2; k++)
                ck_assert_int_eq(mt_model_set_params(models[k], i0, 1, w + t[0].params[i0].offset), MT_OK);
        }
        if (step == read_step) {  // a read-back mid-run (a checkpoint) changes nothing after it
            mt_model_get_trainable(models[0], wa);
            mt_model_get_trainable(models[1], wb);
            ck_assert(memcmp(wa, wb, total * 4) == 0);
        }
    }
    mt_model_get_trainable(models[0], wa);
    mt_model_get_trainable(models[1], wb);  // flushes the last step's update
    ck_assert(memcmp(wa, wb, total * 4) == 0);
    ck_assert(memcmp(wa, w, total * 4) != 0);
    for (int k = 0; k < 2; k++) mt_mezo_free(mz[k]), mt_model_free(models[k]);
    mt_backend_free(&be);
    free(w), free(wa), free(wb), free(selected), free(groups);
}

// The update deferred into the next forward's reads gives the same losses and
// weights as the update applied at once (tied embeddings: the gathered rows
// must see it too; a selection with decayed and undecayed tensors).
START_TEST(deferred_update_equals_immediate) {
    mt_model_config c;
    tiny(&c, 1, 1);
    mt_model_options o = {.B = B, .T = T, .forward_only = 1};
    mezo_runs_agree(&c, &o, &o, 0, "layers.0.mlp", 17, 20, 10, -1);
}
END_TEST

// model.weights: cpu under MeZO: the base's layers streamed through two slots
// (the deferred update applied in a slot and written back to the store
// before the slot is reused; an eval and the read-back flush it) give the
// resident model's losses and weights bit for bit, with tied embeddings (the
// outer tensors updated where they live) and a partial selection; and with
// the first two layers resident (model.resident_layers: their update stays in
// their slots, which go back to the store only when it is read).
START_TEST(streamed_weights_under_mezo_equal_resident) {
    mt_model_config c;
    tiny(&c, 1, 1);
    c.L = 4;
    mt_model_options o = {.B = B, .T = T, .forward_only = 1}, so = o;
    so.stream_weights = 1;
    mezo_runs_agree(&c, &o, &so, 1, "layers.1.self_attn", 19, 12, 5, 8);
    so.resident_layers = 2;
    mezo_runs_agree(&c, &o, &so, 1, "*", 19, 12, 5, 8);
}
END_TEST

// MeZO's paired passes (mt_model_forward_pair: each layer read once for +eps
// and -eps) give the two separate passes' losses bit for bit, with a deferred
// update pending (applied at the first perturbed read), resident and with the
// base streamed, tied embeddings and a Gemma 3 model. With an untied lm_head
// wider than the layers' matrices the + pass also writes the - pass's reads
// of as many of a layer's 13 tensors as the scratch's spare room holds, in
// the order the layer reads them (v 4: all but o_proj's weight and the MLP's
// 3; v 5: all 13; v 6: the same with MT_MEZO_MIRROR=0, none).
START_TEST(paired_passes_equal_two_passes) {
    mt_backend be;
    mt_backend_init(&be, -1);
    for (int v = 0; v < 7; v++) {
        mt_model_config c;
        tiny(&c, v < 4, 1);
        c.L = 3;
        if (v == 2) c.gemma = 1, c.embed_scale = 4.0f;
        if (v >= 4) c.V = v == 4 ? 64 : 200;  // lm_head 1024 or 3200 values; the widest layer matrix 384
        if (v == 6) setenv("MT_MEZO_MIRROR", "0", 1);
        size_t total;
        float *w = random_weights(&c, &total);
        mt_model_options o = {.B = B,
                              .T = T,
                              .forward_only = 1,
                              .stream_weights = v == 1 || v == 3 || v == 5,
                              .resident_layers = v == 3 || v == 5 ? 2 : 0};
        mt_model *ma, *mb;
        ck_assert_int_eq(mt_model_create_with(&ma, &be, &c, &o), MT_OK);
        ck_assert_int_eq(mt_model_create_with(&mb, &be, &c, &o), MT_OK);
        mt_model *models[2] = {ma, mb};
        mt_zo_directions d = {1, {99}, {0.5f}};
        for (int k = 0; k < 2; k++) {
            ck_assert_int_eq(mt_model_set_weights(models[k], w), MT_OK);
            ck_assert_int_eq(mt_model_enable_perturbation(models[k], NULL), MT_OK);
            mt_model_defer_update(models[k], &d, 1e-2f, 0.1f, 7);
        }
        int32_t inputs[N], targets[N];
        random_batch(inputs, targets, c.V, 57);
        for (int round = 0; round < 2; round++) {
            mt_model_set_perturbation(ma, 31 + round, 1e-2f);
            double plus = mt_model_step(ma, inputs, targets, 0, 0);
            mt_model_set_perturbation(ma, 31 + round, -1e-2f);
            double minus = mt_model_step(ma, inputs, targets, 0, 0);
            mt_model_set_perturbation(ma, 0, 0.0f);
            double p2, m2;
            mt_model_forward_pair(mb, inputs, targets, 31 + round, 1e-2f, &p2, &m2);
            ck_assert_msg(plus == p2 && minus == m2, "variant %d round %d: %.17g %.17g vs %.17g %.17g", v, round, plus,
                          minus, p2, m2);
            ck_assert(plus != minus);
        }
        float *wa = malloc(total * 4), *wb = malloc(total * 4);
        mt_model_get_trainable(ma, wa);
        mt_model_get_trainable(mb, wb);
        ck_assert(memcmp(wa, wb, total * 4) == 0);
        // mirrored tensors a layer, times 3 layers and 2 rounds
        size_t mirrored = v == 4 ? 9 : v == 5 ? 13 : 0;
        ck_assert_uint_eq(mt_model_mirror_saved(mb), mirrored * c.L * 2);
        ck_assert_uint_eq(mt_model_mirror_saved(ma), 0);
        unsetenv("MT_MEZO_MIRROR");
        free(w), free(wa), free(wb);
        mt_model_free(ma), mt_model_free(mb);
    }
    mt_backend_free(&be);
}
END_TEST

// ---------------------------------------------------------- memtune train

static void mezo_config(mt_config *cfg, const char *folder, const char *data, const char *out) {
    // clang-format off
    const char *const extra[] = {
        "train.grad_accum", "2",
        "optim.kind", "mezo",
        "optim.lr", "1e-3",
        "optim.weight_decay", "0.1",
        "mezo.samples", "2",
        NULL};
    // clang-format on
    tu_tiny_run_config(cfg, folder, data, out, extra);
}

START_TEST(mezo_training_resumes_bit_identically) {
    char data[300], folder[300], whole[300], split[300];
    snprintf(data, sizeof data, "%s/data.h5", dir);
    uint64_t n = 20000;
    uint32_t *tok = malloc(n * 4);
    for (uint64_t i = 0; i < n; i++) tok[i] = (uint32_t)(mt_rng_bits(17, i) % 13);
    uint64_t offsets[2] = {0, n};
    ck_assert_int_eq(mt_dataset_write(data, tok, n, offsets, 1, NULL, 13, "test"), MT_OK);
    free(tok);
    tu_model_folder(dir, "tiny", tu_tiny_llama_json, folder, sizeof folder);
    snprintf(whole, sizeof whole, "%s/whole", dir);
    snprintf(split, sizeof split, "%s/split", dir);
    mt_config cfg;
    mt_train_result r;
    for (int shift = 0; shift < 3; shift++) {
        mezo_config(&cfg, folder, data, shift ? split : whole);
        if (shift == 1) ck_assert_int_eq(mt_config_set(&cfg, "train.stop_after", "5", "t"), MT_OK);
        if (shift == 2) ck_assert_int_eq(mt_config_set(&cfg, "train.resume", "auto", "t"), MT_OK);
        ck_assert_int_eq(mt_train(&cfg, &r), MT_OK);
        ck_assert_int_eq(r.steps_done, shift == 1 ? 5 : 12);
        mt_config_free(&cfg);
    }
    tu_assert_same_losses(whole, split, 12, NULL);
    char a[1400], b[400];
    snprintf(a, sizeof a, "cmp -s %s/model/model.safetensors %s/model/model.safetensors", whole, split);
    ck_assert_int_eq(system(a), 0);
    // the weights moved
    snprintf(b, sizeof b, "%s/checkpoints/step-00000005/model/model.safetensors", split);
    ck_assert_int_eq(access(b, R_OK), 0);
    snprintf(a, sizeof a, "cmp -s %s %s/model/model.safetensors", b, whole);
    ck_assert_int_ne(system(a), 0);

    // MeZO on LoRA adapters over an NF4 base, a selection of them by name
    char lora_run[300];
    snprintf(lora_run, sizeof lora_run, "%s/lora", dir);
    mezo_config(&cfg, folder, data, lora_run);
    ck_assert_int_eq(mt_config_set(&cfg, "lora.r", "2", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "model.quantize", "nf4", "t"), MT_OK);  // MeZO on QLoRA
    ck_assert_int_eq(mt_config_set(&cfg, "mezo.trainable", "*.q_proj.*, *.v_proj.*", "t"), MT_OK);
    ck_assert_int_eq(mt_train(&cfg, &r), MT_OK);
    ck_assert_int_eq(r.steps_done, 12);
    snprintf(a, sizeof a, "%s/adapter/adapter_model.safetensors", lora_run);
    ck_assert_int_eq(access(a, R_OK), 0);
    {
        // B starts at zero: the selected q/v adapters moved, the others did not
        mt_model_config mc;
        mt_lora_config lc;
        snprintf(a, sizeof a, "%s/adapter", lora_run);
        ck_assert_int_eq(mt_hf_read_config(folder, &mc), MT_OK);
        ck_assert_int_eq(mt_lora_read_config(a, &lc), MT_OK);
        int count;
        size_t total;
        mt_param_info *t = mt_lora_param_table(&mc, &lc, &count, &total);
        float *adapter = malloc(total * 4);
        ck_assert_int_eq(mt_lora_load(a, &mc, &lc, adapter), MT_OK);
        for (int i = 0; i < count; i++) {
            if (!strstr(t[i].name, "lora_B")) continue;
            double norm = 0;
            for (size_t j = 0; j < t[i].count; j++) norm += fabs(adapter[t[i].offset + j]);
            int selected = strstr(t[i].name, ".q_proj.") || strstr(t[i].name, ".v_proj.");
            ck_assert_msg(selected ? norm > 0 : norm == 0, "%s: |B| %g", t[i].name, norm);
        }
        free(adapter), free(t);
    }
    // a pattern that selects nothing is refused with the names it could take
    ck_assert_int_eq(mt_config_set(&cfg, "mezo.trainable", "*.nothing", "t"), MT_OK);
    ck_assert_int_eq(mt_train(&cfg, &r), MT_ERR_CONFIG);
    ck_assert_msg(strstr(mt_last_error(), "matches none") && strstr(mt_last_error(), "lora_"), "%s", mt_last_error());
    mt_config_free(&cfg);
    // mezo keys without mezo
    mt_config_defaults(&cfg);
    ck_assert_int_eq(mt_config_set(&cfg, "model.path", folder, "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "data.train", data, "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "mezo.samples", "4", "t"), MT_OK);
    ck_assert_int_eq(mt_config_validate(&cfg), MT_ERR_CONFIG);
    ck_assert_msg(strstr(mt_last_error(), "optim.kind: mezo") != NULL, "%s", mt_last_error());
    mt_config_free(&cfg);
}
END_TEST

int main(void) {
    tu_tempdir(dir, sizeof dir);
    Suite *s = suite_create("mezo");
    TCase *tc = tcase_create("mezo");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, philox_matches_the_published_vectors);
    tcase_add_test(tc, gauss4_follows_its_definition);
    tcase_add_test(tc, gauss_stream_is_standard_normal);
    tcase_add_test(tc, perturb_and_update_follow_their_definition);
    tcase_add_test(tc, in_place_drift_after_1000_cycles_stays_within_rounding);
    tcase_add_test(tc, model_perturbation_equals_perturbed_weights);
    tcase_add_test(tc, model_perturbation_leaves_no_drift);
    tcase_add_test(tc, mezo_minimises_a_convex_quadratic);
    tcase_add_test(tc, mezo_lowers_the_tiny_model_loss);
    tcase_add_test(tc, projected_gradients_average_to_the_gradient);
    tcase_add_test(tc, streamed_weights_under_mezo_equal_resident);
    tcase_add_test(tc, paired_passes_equal_two_passes);
    tcase_add_test(tc, deferred_update_equals_immediate);
    tcase_add_test(tc, mezo_training_resumes_bit_identically);
    suite_add_tcase(s, tc);
    return tu_run_suite(s, 0);
}
