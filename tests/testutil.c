// tests/testutil.c: see testutil.h.
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <sys/stat.h>

#include "datasets/dataset.h"
#include "kernels/rng.h"
#include "offload/cpu_adam.h"
#include "trainer/config.h"

static float float_of(uint32_t bits) {
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

long tu_qmap_cases(const float *map, uint64_t seed, void (*each)(float x, void *ctx), void *ctx) {
    long count = 0;
    for (uint32_t p = 0; p < 65536; p++) {
        uint32_t lows[6] = {0, 0xFFFF, 0, 0, 0, 0};
        for (int k = 2; k < 6; k++) lows[k] = (uint32_t)(mt_rng_bits(seed, (uint64_t)p * 8 + (uint64_t)k) & 0xFFFF);
        for (int k = 0; k < 6; k++, count++) each(float_of(p << 16 | lows[k]), ctx);
    }
    for (int i = 0; i < 256; i++)
        for (int mid = 0; mid < 2 && (mid == 0 || i < 255); mid++) {
            float c = mid ? 0.5f * (map[i] + map[i + 1]) : map[i];
            uint32_t bits;
            memcpy(&bits, &c, sizeof bits);
            for (int d = -3; d <= 3; d++, count++) each(float_of(bits + (uint32_t)d), ctx);
        }
    const float odd[] = {INFINITY, -INFINITY, NAN, -NAN, float_of(0x7F800001u), float_of(0xFF800001u), 0.0f, -0.0f};
    for (size_t i = 0; i < sizeof odd / sizeof *odd; i++, count++) each(odd[i], ctx);
    return count;
}

void tu_fill_uniform(float *x, size_t n, float lo, float hi, uint64_t seed) {
    for (size_t i = 0; i < n; i++) x[i] = lo + (hi - lo) * mt_rng_uniform(seed, i);
}

float *tu_random(size_t n, float lo, float hi, uint64_t seed) {
    float *x = malloc((n ? n : 1) * sizeof(float));
    ck_assert_ptr_nonnull(x);
    tu_fill_uniform(x, n, lo, hi, seed);
    return x;
}

double tu_norm_rel_error(const float *a, const float *b, size_t n) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    if (isnan(num)) return INFINITY;
    return sqrt(num) / (sqrt(den) + 1e-30);
}

double tu_fd_check(tu_loss_fn loss, void *ctx, float *x, const float *analytic, size_t n, int samples, double h) {
    double worst = 0.0;
    size_t stride = n / (size_t)samples ? n / (size_t)samples : 1;
    for (size_t i = stride / 2; i < n; i += stride) {
        float saved = x[i];
        x[i] = (float)(saved + h);
        double plus = loss(ctx);
        x[i] = (float)(saved - h);
        double minus = loss(ctx);
        x[i] = saved;
        double fd = (plus - minus) / (2.0 * h);
        double err = fabs(fd - analytic[i]) / (fabs(fd) + fabs(analytic[i]) + 1e-2);
        if (!(err <= worst)) worst = err;
    }
    return worst;
}

void tu_expect_error(mt_err got, mt_err want, const char *fragment) {
    ck_assert_int_eq(got, want);
    ck_assert_msg(strstr(mt_last_error(), fragment) != NULL, "message '%s' lacks '%s'", mt_last_error(), fragment);
}

void tu_tempdir(char *buf, size_t len) {
    snprintf(buf, len, "/tmp/memtune-test-XXXXXX");
    if (!mkdtemp(buf)) {  // may run outside a test (in main), so no ck_assert
        perror("mkdtemp");
        exit(1);
    }
}

int tu_run_suite(Suite *s, int no_fork) {
    SRunner *sr = srunner_create(s);
    if (no_fork) srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

const char *const tu_tiny_llama_json =
    "{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":13,\"hidden_size\":16,\"intermediate_size\":24,"
    "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"num_key_value_heads\":2,\"rms_norm_eps\":1e-5,"
    "\"rope_theta\":10000.0,\"tie_word_embeddings\":false,\"torch_dtype\":\"float32\"}";

void tu_model_folder(const char *parent, const char *name, const char *json, char *out, size_t len) {
    snprintf(out, len, "%s/%s", parent, name);
    mkdir(out, 0755);
    char path[1200];
    snprintf(path, sizeof path, "%s/config.json", out);
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs(json, f);
    ck_assert_int_eq(fclose(f), 0);
}

int tu_read_losses(const char *run, double *losses, int max) {
    char path[1200];
    snprintf(path, sizeof path, "%s/metrics.jsonl", run);
    FILE *f = fopen(path, "r");
    ck_assert_ptr_nonnull(f);
    char line[4096];
    int count = 0;
    while (fgets(line, sizeof line, f)) {
        cJSON *rec = cJSON_Parse(line);
        ck_assert_ptr_nonnull(rec);
        int step = (int)cJSON_GetObjectItem(rec, "step")->valuedouble;
        ck_assert_int_eq(step, count + 1);  // one record per step, in order, no duplicates
        ck_assert_int_le(step, max);
        losses[step - 1] = cJSON_GetObjectItem(rec, "loss")->valuedouble;
        count++;
        cJSON_Delete(rec);
    }
    fclose(f);
    return count;
}

static void apply_pairs(void *cfg, const char *const *pairs) {
    for (int i = 0; pairs[i]; i += 2) {
        ck_assert_ptr_nonnull(pairs[i + 1]);
        ck_assert_msg(mt_config_set(cfg, pairs[i], pairs[i + 1], "test") == MT_OK, "%s=%s: %s", pairs[i], pairs[i + 1],
                      mt_last_error());
    }
}

void tu_tiny_run_config(void *cfg, const char *folder, const char *data, const char *out, const char *const *extra) {
    // clang-format off
    const char *const base[] = {
        "model.path", folder,
        "model.init", "random",
        "data.train", data,
        "output.dir", out,
        "train.steps", "12",
        "train.seq_len", "16",
        "train.device", "cpu",
        "train.eval_every", "4",
        NULL};
    // clang-format on
    mt_config_defaults(cfg);
    apply_pairs(cfg, base);
    apply_pairs(cfg, extra);
}

void tu_pairs_without(const char *const *pairs, const char *prefix, const char **out) {
    int n = 0;
    for (int i = 0; pairs[i]; i += 2)
        if (strncmp(pairs[i], prefix, strlen(prefix))) out[n++] = pairs[i], out[n++] = pairs[i + 1];
    out[n] = NULL;
}

void tu_write_sequence_data(const char *path) {
    uint64_t n = 20000;
    uint32_t *tok = malloc(n * 4);
    for (uint64_t i = 0; i < n; i++) tok[i] = (uint32_t)((i + (mt_rng_bits(17, i) % 8 == 0)) % 13);
    uint64_t offsets[2] = {0, n};
    ck_assert_int_eq(mt_dataset_write(path, tok, n, offsets, 1, NULL, 13, "test"), MT_OK);
    free(tok);
}

void tu_assert_same_losses(const char *expect, const char *got, int steps, double *losses) {
    double a[64], b[64];
    ck_assert_int_le(steps, 64);
    ck_assert_int_eq(tu_read_losses(expect, a, steps), steps);
    ck_assert_int_eq(tu_read_losses(got, b, steps), steps);
    for (int i = 0; i < steps; i++)
        ck_assert_msg(b[i] == a[i], "%s vs %s, step %d: %.17g != %.17g", got, expect, i + 1, b[i], a[i]);
    if (losses) memcpy(losses, a, (size_t)steps * sizeof *a);
}

mt_galore_param *tu_galore_layer_params(const mt_param_info *table, int n) {
    mt_galore_param *gp = malloc((size_t)n * sizeof *gp);
    ck_assert_ptr_nonnull(gp);
    for (int i = 0; i < n; i++)
        gp[i] = (mt_galore_param){table[i].name,
                                  table[i].shape[0],
                                  table[i].ndim == 2 ? table[i].shape[1] : 0,
                                  table[i].decay,
                                  table[i].ndim == 2 && strstr(table[i].name, "layers.") != NULL,
                                  0,
                                  0};
    return gp;
}

size_t tu_delay_params(const size_t *counts, int n, mt_offload_param *params, size_t *offs) {
    size_t total = 0;
    for (int p = 0; p < n; p++) {
        offs[p] = total;
        params[p] = (mt_offload_param){total, counts[p], p != 1, p, total};
        total += counts[p];
    }
    return total;
}

mt_offload_config tu_delay_config(float wd, float clip, int threads, int delay) {
    return (mt_offload_config){.kind = MT_STORE_MEMORY,
                               .beta1 = 0.9f,
                               .beta2 = 0.95f,
                               .eps = 1e-8f,
                               .weight_decay = wd,
                               .grad_clip = clip,
                               .threads = threads,
                               .delay = delay};
}

double tu_delay_reference_step(const mt_offload_param *params, int n, const void *grad, int grad_bf16, int s, float lr,
                               float wd, float clip, int delay, float *master, float *m, float *v, float *seen,
                               size_t total) {
    size_t elem = grad_bf16 ? 2 : 4;
    double sum = 0.0;
    for (int p = 0; p < n; p++)
        sum += mt_cpu_sumsq((const char *)grad + params[p].offset * elem, grad_bf16, params[p].count);
    double norm = sqrt(sum);
    float scale = clip > 0 && norm > clip ? (float)(clip / (norm + 1e-6)) : 1.0f;
    mt_cpu_adam_step decay, plain;
    mt_cpu_adam_prepare(&decay, lr, 0.9f, 0.95f, 1e-8f, wd, s, scale);
    mt_cpu_adam_prepare(&plain, lr, 0.9f, 0.95f, 1e-8f, 0.0f, s, scale);
    if (delay && s > 1) memcpy(seen, master, total * sizeof(float));  // the next step sees one update less
    for (int p = 0; p < n; p++) {
        size_t at = params[p].offset;
        mt_cpu_adam_update(mt_cpu_adam_best_path(), params[p].decay ? &decay : &plain, master + at, m + at, v + at,
                           (const char *)grad + at * elem, grad_bf16, NULL, params[p].count);
    }
    if (!delay) memcpy(seen, master, total * sizeof(float));
    return norm;
}
