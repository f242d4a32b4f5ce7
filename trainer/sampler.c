// trainer/sampler.c: see sampler.h.
#define _POSIX_C_SOURCE 200809L
#include "trainer/sampler.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "datasets/hf_tokenizer.h"
#include "datasets/tokenizer.h"
#include "kernels/mem.h"
#include "trainer/forecast.h"
#include "trainer/generate.h"
#include "trainer/hf.h"
#include "trainer/model.h"

struct mt_sampler {
    const mt_config *cfg;
    mt_model_config mc;
    float *values;      // the model's fp32 host copy (LoRA: the base, loaded once)
    float *adapters;    // LoRA: the adapters' values, read back at each sample
    int base_loaded;    // LoRA: values hold the base (QLoRA's: its NF4 round trip)
    mt_tokenizer *tok;  // NULL: memtune's bytes
    char *prompts;      // the list, split in place
    char **prompt;
    int n, tokens;
    int cpu_only;  // a GPU run found no room for a decoding copy once: the CPU from then on
};

mt_err mt_sampler_open(mt_sampler **out, const mt_config *cfg, const mt_model_config *mc) {
    *out = NULL;
    if (cfg->train_sample_every <= 0) return MT_OK;
    if (!cfg->train_sample_prompts[0])
        return mt_errorf(MT_ERR_CONFIG,
                         "train.sample_every is %ld but train.sample_prompts is empty: give prompts "
                         "separated by | (e.g. \"And God said|In the beginning\")",
                         cfg->train_sample_every);
    mt_sampler *s = calloc(1, sizeof *s);
    MT_CHECK(s != NULL, "sampler");
    s->cfg = cfg, s->mc = *mc, s->tokens = (int)cfg->train_sample_tokens;
    char path[1200];
    snprintf(path, sizeof path, "%s/tokenizer.json", cfg->model_path);
    if (access(path, F_OK) == 0) {
        mt_err err = mt_tokenizer_load(&s->tok, cfg->model_path);
        if (err) {
            free(s);
            return err;
        }
    } else if (mc->V != MT_BYTE_VOCAB) {
        free(s);
        return mt_errorf(MT_ERR_CONFIG, "train.sample_every needs the model's tokenizer.json in %s", cfg->model_path);
    }
    s->prompts = strdup(cfg->train_sample_prompts);
    s->prompt = calloc(strlen(s->prompts) + 1, sizeof *s->prompt);
    MT_CHECK(s->prompts && s->prompt, "sample prompts");
    for (char *p = s->prompts, *save = NULL, *t; (t = strtok_r(p, "|", &save)); p = NULL) s->prompt[s->n++] = t;
    *out = s;
    return MT_OK;
}

// Room in the cache for the longest prompt and the new tokens.
static int sample_len(const mt_sampler *s) {
    int longest = 0;
    for (int i = 0; i < s->n; i++)
        if ((int)strlen(s->prompt[i]) > longest) longest = (int)strlen(s->prompt[i]);
    return longest + 2 + s->tokens;  // a token a byte at most, BOS
}

static mt_generate_options greedy_options(const mt_sampler *s) {
    return (mt_generate_options){
        {0.0f, 0, 1.0f, 0.0f, 1.0f, 0}, s->tokens, s->tok ? mt_tokenizer_eos(s->tok) : MT_TOKEN_EOS, -1, {NULL}, 0};
}

mt_err mt_sampler_run(mt_sampler *s, const float *params, const mt_lora_config *lora, const float *adapters, int step,
                      mt_metrics *metrics) {
    mt_generator *g;
    mt_err err = mt_generator_init(&g, &s->mc, params, sample_len(s));
    if (!err && lora) mt_generator_set_adapter(g, lora, adapters);
    mt_generate_options greedy = greedy_options(s);
    for (int i = 0; i < s->n && !err; i++) {
        mt_ids ids = {0};
        char *text = NULL;
        mt_generate_prompt(s->tok, s->prompt[i], &ids);
        err = mt_generate_text(g, s->tok, &ids, &greedy, NULL, &text);
        if (!err) mt_metrics_sample(metrics, step, s->prompt[i], text);
        free(text);
        mt_ids_free(&ids);
    }
    mt_generator_free(g);
    return err;
}

typedef struct {
    mt_sampler *s;
    mt_metrics *metrics;
    int step;
} sample_sink;

static void record_sample(void *ctx, int index, const char *text) {
    sample_sink *k = ctx;
    mt_metrics_sample(k->metrics, k->step, k->s->prompt[index], text);
}

// The decoding copy: every prompt a row of one cache.
static mt_model_options decode_options(const mt_sampler *s, const mt_lora_config *lora) {
    mt_model_options mo = {.B = s->n, .T = 1, .forward_only = 1, .decode_len = sample_len(s)};
    if (lora) mo.lora = *lora, mo.lora.dropout = 0.0f;
    return mo;
}

// On the run's GPU: a decoding copy of the model (bf16, a key/value cache
// for every prompt at once) on a backend of its own (the run's workspace is
// not touched), made for the samples and freed after them, so the GPU holds
// it only while it samples. No room for it: *fits 0 and nothing was sampled.
static mt_err run_gpu(mt_sampler *s, int device, const float *params, const mt_lora_config *lora, const float *adapters,
                      int step, mt_metrics *metrics, int *fits) {
    mt_model_options mo = decode_options(s, lora);
    mt_backend be;
    mt_model *m = NULL;
    mt_err err = mt_backend_init(&be, device);
    if (!err) {
        err = mt_model_create_with(&m, &be, &s->mc, &mo);
        if (err) mt_backend_free(&be);
    }
    *fits = err != MT_ERR_NOMEM;
    if (err) return *fits ? err : MT_OK;
    err = mt_model_set_weights(m, params);
    if (!err && lora) mt_model_set_adapters(m, adapters);
    mt_ids *ids = calloc((size_t)s->n, sizeof *ids);
    MT_CHECK(ids != NULL, "sample prompts");
    for (int i = 0; i < s->n; i++) mt_generate_prompt(s->tok, s->prompt[i], &ids[i]);
    mt_generate_options greedy = greedy_options(s);
    sample_sink sink = {s, metrics, step};
    if (!err) err = mt_generate_batch(m, s->tok, ids, s->n, &greedy, NULL, record_sample, &sink, NULL);
    for (int i = 0; i < s->n; i++) mt_ids_free(&ids[i]);
    free(ids);
    mt_model_free(m);
    mt_backend_free(&be);
    return err;
}

// Rank 0's samples: on the run's GPU, or on the CPU (a CPU run, or no room
// on the GPU, which is said once).
static mt_err sample(mt_sampler *s, mt_run_state *state, const float *params, const mt_lora_config *lora,
                     const float *adapters, int step, mt_metrics *metrics) {
    mt_backend *be = state->up->be;
    double budget = s->cfg->memory_budget[0] ? mt_parse_size(s->cfg->memory_budget) : 0;  // (auto: < 0)
    if (be->gpu && !s->cpu_only && budget > 0) {
        // memory.budget: the copy only where the run's GPU memory stays within it
        mt_model_options mo = decode_options(s, lora);
        mt_model_bytes b;
        mt_model_plan_bytes(1, -1, &s->mc, &mo, NULL, &b, NULL);
        mt_mem_tally held;
        mt_mem_get_tally(MT_DEVICE, &held);
        double copy = (double)(b.weights + b.adapters + b.activations + b.workspace + b.staging);
        if ((double)held.current_total + copy > budget) {
            s->cpu_only = 1;
            mt_warn(
                "train.sample_every: a decoding copy of the model (%.2f GiB) beside the run's %.2f GiB would pass "
                "memory.budget %s; samples decode on the CPU in fp32, which is slower",
                copy / 1073741824.0, held.current_total / 1073741824.0, s->cfg->memory_budget);
        }
    }
    if (be->gpu && !s->cpu_only) {
        int fits;
        mt_err err = run_gpu(s, be->device, params, lora, adapters, step, metrics, &fits);
        if (err || fits) return err;
        s->cpu_only = 1;
        mt_warn(
            "train.sample_every: no room on the GPU for a decoding copy of the model (%s); samples decode on the "
            "CPU in fp32 from now on, which is slower",
            mt_last_error());
    }
    return mt_sampler_run(s, params, lora, adapters, step, metrics);
}

// LoRA: the base the adapters train over, once: as loaded or initialised,
// and for QLoRA its NF4 round trip (what the forward computes with).
static mt_err load_base(mt_sampler *s, int random_init) {
    int n;
    size_t total;
    free(mt_model_param_table(&s->mc, &n, &total));
    mt_err err = mt_state_copy_alloc(total, 1, &s->values);
    if (!err && random_init)
        mt_model_init_random(&s->mc, s->values, (uint64_t)s->cfg->train_seed);
    else if (!err)
        err = mt_hf_load_weights(s->cfg->model_path, &s->mc, s->values);
    if (!err && !strcmp(s->cfg->model_quantize, "nf4")) err = mt_generate_quantize_nf4(&s->mc, s->values);
    s->base_loaded = !err;
    return err;
}

mt_err mt_sampler_after_step(mt_sampler *s, mt_run_state *state, int rank, int random_init, int step,
                             mt_metrics *metrics) {
    if (!s || (step > 0 && step % s->cfg->train_sample_every)) return MT_OK;
    mt_err err = MT_OK;
    if (state->lora) {
        // the adapters applied on the fly over the base, as memtune generate
        // --adapter does: the base is read once, not at every sample
        if (!s->adapters) err = mt_state_copy_alloc(state->trained_total, 1, &s->adapters);
        if (!err) err = mt_updater_get_trained(state->up, s->adapters, NULL);
        if (!err && rank == 0 && !s->base_loaded) err = load_base(s, random_init);
        if (!err && rank == 0) err = sample(s, state, s->values, state->lora, s->adapters, step, metrics);
        return err;
    }
    int n;
    size_t total;
    free(mt_model_param_table(&s->mc, &n, &total));
    if (!s->values) err = mt_state_copy_alloc(total, 1, &s->values);
    if (!err) err = mt_updater_get_trained(state->up, s->values, NULL);
    if (!err && rank == 0) err = sample(s, state, s->values, NULL, NULL, step, metrics);
    return err;
}

void mt_sampler_free(mt_sampler *s) {
    if (!s) return;
    free(s->values), free(s->adapters);
    mt_tokenizer_free(s->tok);
    free(s->prompts), free(s->prompt);
    free(s);
}
