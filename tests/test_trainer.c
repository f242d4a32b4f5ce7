// tests/test_trainer.c: the config table (YAML, --set, errors with lines and
// suggestions, generated docs), safetensors (round trip, malformed files),
// Hugging Face folders (config.json checks, save/load), the whole model's
// gradients against finite differences, checkpointing equivalence, a short
// training run whose loss falls, bit-identical resume (full fine-tune and
// QLoRA with dropout), starting from a PEFT adapter, and a full disk.
#include <check.h>
#include <cjson/cJSON.h>
#include <dirent.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "datasets/dataset.h"
#include "datasets/hf_tokenizer.h"
#include "datasets/tokenizer.h"
#include "kernels/rng.h"
#include "testutil.h"
#include "trainer/checkpoint.h"
#include "trainer/config.h"
#include "trainer/eval.h"
#include "trainer/generate.h"
#include "trainer/hf.h"
#include "trainer/lora.h"
#include "trainer/model.h"
#include "trainer/safetensors.h"
#include "trainer/train.h"

static char dir[256];

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
}

// ------------------------------------------------------------------ config

START_TEST(config_yaml_set_and_errors) {
    char path[300];
    snprintf(path, sizeof path, "%s/c.yaml", dir);
    mt_config cfg;
    mt_config_defaults(&cfg);
    ck_assert_int_eq(cfg.train_micro_batch, 4);
    ck_assert_str_eq(cfg.optim_schedule, "cosine");
    write_text(path,
               "# comment\ntrain:\n  steps: 7\n  micro_batch: 2\noptim:\n  lr: 1e-3\n  schedule: linear\n"
               "model:\n  activation_checkpointing: true\n  path: some/dir\n");
    ck_assert_int_eq(mt_config_load_yaml(&cfg, path), MT_OK);
    ck_assert_int_eq(cfg.train_steps, 7);
    ck_assert_double_eq(cfg.optim_lr, 1e-3);
    ck_assert_str_eq(cfg.optim_schedule, "linear");
    ck_assert_int_eq(cfg.model_activation_checkpointing, 1);
    ck_assert_int_eq(mt_config_set_assignment(&cfg, "train.steps=9", "--set"), MT_OK);
    ck_assert_int_eq(cfg.train_steps, 9);
    tu_expect_error(mt_config_set_assignment(&cfg, "train.stesp=9", "--set"), MT_ERR_CONFIG,
                    "did you mean 'train.steps'");
    tu_expect_error(mt_config_set_assignment(&cfg, "steps", "--set"), MT_ERR_USAGE, "expected section.key=value");
    write_text(path, "train:\n  steps: 7\n  micro_bach: 2\n");
    tu_expect_error(mt_config_load_yaml(&cfg, path), MT_ERR_CONFIG,
                    "c.yaml:3: unknown key 'train.micro_bach' (did you mean 'train.micro_batch'?)");
    write_text(path, "optim:\n  lr: fast\n");
    tu_expect_error(mt_config_load_yaml(&cfg, path), MT_ERR_CONFIG, "c.yaml:2: optim.lr = 'fast': expected a number");
    write_text(path, "train:\n  steps: 0\n");
    tu_expect_error(mt_config_load_yaml(&cfg, path), MT_ERR_CONFIG, "expected an integer in [1, 1000000000]");
    write_text(path, "optim:\n  schedule: cosin\n");
    tu_expect_error(mt_config_load_yaml(&cfg, path), MT_ERR_CONFIG, "expected one of cosine|linear|constant");
    write_text(path, "train:\n  steps: \"unterminated\n");
    tu_expect_error(mt_config_load_yaml(&cfg, path), MT_ERR_CONFIG, "YAML syntax error");
    write_text(path, "train: 5\n");
    tu_expect_error(mt_config_load_yaml(&cfg, path), MT_ERR_CONFIG, "should be a section");
    snprintf(path, sizeof path, "%s/none.yaml", dir);
    tu_expect_error(mt_config_load_yaml(&cfg, path), MT_ERR_IO, "cannot open the config file");
    mt_config_free(&cfg);
}
END_TEST

START_TEST(config_docs_are_generated_from_the_table) {
    char *generated = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&generated, &len);
    mt_config_write_reference(f, 1);
    fclose(f);
    FILE *doc = fopen("docs/configs.md", "r");
    ck_assert_msg(doc != NULL, "docs/configs.md missing (run from the repo root)");
    char *text = calloc(1, len + 2);
    size_t got = fread(text, 1, len + 1, doc);
    fclose(doc);
    ck_assert_msg(got == len && memcmp(text, generated, len) == 0,
                  "docs/configs.md is stale: regenerate it with `memtune config-docs > docs/configs.md`");
    free(text);
    free(generated);
}
END_TEST

// ------------------------------------------------------------- safetensors

START_TEST(safetensors_round_trip_and_malformed) {
    char path[300];
    snprintf(path, sizeof path, "%s/t.safetensors", dir);
    float a[6] = {1, -2, 3.5f, 0.1f, 1e-3f, 7}, b[3] = {4, 5, 6};
    mt_st_write_tensor ts[2] = {{"alpha", 2, {2, 3}, a}, {"beta.weight", 1, {3}, b}};
    for (int dt = MT_DTYPE_F32; dt <= MT_DTYPE_BF16; dt++) {
        ck_assert_int_eq(mt_safetensors_write(path, ts, 2, (mt_dtype)dt, "pt"), MT_OK);
        mt_safetensors *st;
        ck_assert_int_eq(mt_safetensors_open(&st, path), MT_OK);
        ck_assert_int_eq(mt_safetensors_count(st), 2);
        const mt_st_tensor *t = mt_safetensors_find(st, "alpha");
        ck_assert_ptr_nonnull(t);
        ck_assert_int_eq(t->ndim, 2);
        ck_assert_int_eq(t->shape[1], 3);
        float out[6];
        ck_assert_int_eq(mt_safetensors_read_f32(st, t, out), MT_OK);
        for (int i = 0; i < 6; i++)
            ck_assert_float_eq_tol(out[i], a[i], (dt == MT_DTYPE_F32 ? 1e-7f : fabsf(a[i]) * 4e-3f));
        ck_assert_ptr_null(mt_safetensors_find(st, "gamma"));
        mt_safetensors_close(st);
    }
    // malformed files: each is refused with a specific message
    struct {
        const char *header;
        const char *fragment;
    } cases[] = {
        {"{not json", "not a JSON object"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,800]}}", "out of the file's data range"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", "does not match shape"},
        {"{\"x\":{\"dtype\":\"Q4\",\"shape\":[2],\"data_offsets\":[0,8]}}", "dtype Q4"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", "not a non-negative integer"},
        {"{\"x\":{\"shape\":[2],\"data_offsets\":[0,8]}}", "missing or mistyped"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        FILE *f = fopen(path, "wb");
        uint64_t n = strlen(cases[c].header);
        fwrite(&n, 8, 1, f);
        fputs(cases[c].header, f);
        fwrite(a, 4, 2, f);
        fclose(f);
        mt_safetensors *st = (mt_safetensors *)1;
        tu_expect_error(mt_safetensors_open(&st, path), MT_ERR_FORMAT, cases[c].fragment);
        ck_assert_ptr_null(st);
    }
    FILE *f = fopen(path, "wb");
    uint64_t huge = 1ull << 40;
    fwrite(&huge, 8, 1, f);
    fclose(f);
    mt_safetensors *st;
    tu_expect_error(mt_safetensors_open(&st, path), MT_ERR_FORMAT, "header length is past the end");
    write_text(path, "abc");
    tu_expect_error(mt_safetensors_open(&st, path), MT_ERR_FORMAT, "shorter than the 8-byte header");
}
END_TEST

// ---------------------------------------------------------------- HF config

// dir/name: n tokens below 13 drawn from seed, one document.
static void random_dataset(char *path, size_t len, const char *name, uint64_t n, uint64_t seed) {
    snprintf(path, len, "%s/%s", dir, name);
    uint32_t *tok = malloc(n * 4);
    for (uint64_t i = 0; i < n; i++) tok[i] = (uint32_t)(mt_rng_bits(seed, i) % 13);
    uint64_t offsets[2] = {0, n};
    ck_assert_int_eq(mt_dataset_write(path, tok, n, offsets, 1, NULL, 13, "test"), MT_OK);
    free(tok);
}

static void make_folder(const char *name, const char *json, char *out, size_t len) {
    tu_model_folder(dir, name, json, out, len);
}

START_TEST(hf_config_checks) {
    char folder[300];
    mt_model_config c;
    make_folder("llama", tu_tiny_llama_json, folder, sizeof folder);
    ck_assert_int_eq(mt_hf_read_config(folder, &c), MT_OK);
    ck_assert_int_eq(c.D, 4);
    ck_assert_int_eq(c.KV, 2);
    ck_assert_int_eq(c.qkv_bias, 0);
    make_folder("qwen",
                "{\"architectures\":[\"Qwen2ForCausalLM\"],\"vocab_size\":13,\"hidden_size\":16,"
                "\"intermediate_size\":24,\"num_hidden_layers\":1,\"num_attention_heads\":2,\"num_key_value_heads\":1,"
                "\"tie_word_embeddings\":true,\"sliding_window\":4096,\"use_sliding_window\":false,"
                "\"rope_parameters\":{\"rope_type\":\"default\",\"rope_theta\":1000000.0}}",
                folder, sizeof folder);
    ck_assert_int_eq(mt_hf_read_config(folder, &c), MT_OK);
    ck_assert(c.qkv_bias && !c.o_bias && c.tie_embeddings && c.sliding_window == 0 && !c.qk_norm);
    ck_assert_float_eq(c.rope_theta, 1e6f);
    // Qwen3: head norms, its own head_dim, no biases unless attention_bias (then on q, k, v and o)
    make_folder("qwen3",
                "{\"architectures\":[\"Qwen3ForCausalLM\"],\"vocab_size\":13,\"hidden_size\":16,"
                "\"intermediate_size\":24,\"num_hidden_layers\":1,\"num_attention_heads\":4,\"num_key_value_heads\":2,"
                "\"head_dim\":8,\"tie_word_embeddings\":true,\"attention_bias\":false}",
                folder, sizeof folder);
    ck_assert_int_eq(mt_hf_read_config(folder, &c), MT_OK);
    ck_assert(c.qk_norm && !c.qkv_bias && !c.o_bias && c.D == 8 && !c.gemma);

    {
        int n;
        size_t total;
        mt_param_info *t = mt_model_param_table(&c, &n, &total);
        int found = 0;
        for (int i = 0; i < n; i++)
            found += (!strcmp(t[i].name, "model.layers.0.self_attn.q_norm.weight") ||
                      !strcmp(t[i].name, "model.layers.0.self_attn.k_norm.weight")) &&
                     t[i].count == 8 && !t[i].decay;
        ck_assert_int_eq(found, 2);
        free(t);
    }
    char gjson[1024];
    // Gemma 3 as transformers 5 writes it: layer_types, rope_parameters per layer type; tied by default
    const char *gemma =
        "{\"architectures\":[\"Gemma3ForCausalLM\"],\"vocab_size\":13,\"hidden_size\":16,\"intermediate_size\":24,"
        "\"num_hidden_layers\":4,\"num_attention_heads\":2,\"num_key_value_heads\":1,\"head_dim\":32,"
        "\"query_pre_attn_scalar\":64,\"sliding_window\":512,\"hidden_activation\":\"gelu_pytorch_tanh\","
        "\"final_logit_softcapping\":%s,\"layer_types\":[\"sliding_attention\",\"full_attention\",%s],"
        "\"rope_parameters\":{\"full_attention\":{\"rope_type\":\"linear\",\"factor\":8.0,\"rope_theta\":"
        "1000000.0},\"sliding_attention\":{\"rope_type\":\"default\",\"rope_theta\":10000.0}}}";
    snprintf(gjson, sizeof gjson, gemma, "null", "\"sliding_attention\",\"full_attention\"");
    make_folder("gemma3", gjson, folder, sizeof folder);
    ck_assert_int_eq(mt_hf_read_config(folder, &c), MT_OK);
    ck_assert(c.gemma && c.qk_norm && c.tie_embeddings && c.D == 32 && c.global_every == 2 && c.sliding_window == 512);
    ck_assert_float_eq(c.attn_scale, 0.125f);
    ck_assert_float_eq_tol(c.embed_scale, 4.0f, 1e-6);
    ck_assert_float_eq(c.rope_theta, 1e6f);
    ck_assert_float_eq(c.rope_local_theta, 1e4f);
    ck_assert_float_eq(c.rope_linear_factor, 8.0f);
    ck_assert(mt_layer_local(&c, 0) && !mt_layer_local(&c, 1) && mt_layer_local(&c, 2));
    snprintf(gjson, sizeof gjson, gemma, "30.0", "\"sliding_attention\",\"full_attention\"");
    make_folder("gemma3-softcap", gjson, folder, sizeof folder);
    tu_expect_error(mt_hf_read_config(folder, &c), MT_ERR_MODEL, "final_logit_softcapping");
    snprintf(gjson, sizeof gjson, gemma, "null", "\"full_attention\",\"full_attention\"");
    make_folder("gemma3-pattern", gjson, folder, sizeof folder);
    tu_expect_error(mt_hf_read_config(folder, &c), MT_ERR_MODEL, "layer_types[2]");
    // Phi-3: fused qkv_proj and gate_up_proj in the table; partial RoPE refused
    const char *phi3 =
        "{\"architectures\":[\"Phi3ForCausalLM\"],\"vocab_size\":13,\"hidden_size\":16,"
        "\"intermediate_size\":24,\"num_hidden_layers\":1,\"num_attention_heads\":4,"
        "\"num_key_value_heads\":2%s}";
    snprintf(gjson, sizeof gjson, phi3, "");
    make_folder("phi3", gjson, folder, sizeof folder);
    ck_assert_int_eq(mt_hf_read_config(folder, &c), MT_OK);
    {
        int n;
        size_t total;
        mt_param_info *t = mt_model_param_table(&c, &n, &total);
        ck_assert(c.fused && n == 3 + 6 && !strcmp(t[2].name, "model.layers.0.self_attn.qkv_proj.weight"));
        ck_assert(t[2].shape[0] == 16 + 2 * 8 && !strcmp(t[5].name, "model.layers.0.mlp.gate_up_proj.weight"));
        ck_assert_int_eq(t[5].shape[0], 48);
        free(t);
    }
    snprintf(gjson, sizeof gjson, phi3, ",\"partial_rotary_factor\":0.75");
    make_folder("phi4-mini", gjson, folder, sizeof folder);
    tu_expect_error(mt_hf_read_config(folder, &c), MT_ERR_MODEL, "partial_rotary_factor 0.75");
    // Qwen2's window from layer max_window_layers on: all full when that is every layer; refused between
    const char *qwen_window =
        "{\"architectures\":[\"Qwen2ForCausalLM\"],\"vocab_size\":13,\"hidden_size\":16,\"intermediate_size\":24,"
        "\"num_hidden_layers\":4,\"num_attention_heads\":2,\"num_key_value_heads\":1,\"sliding_window\":8,"
        "\"use_sliding_window\":true,\"max_window_layers\":%d}";
    char json[512];
    snprintf(json, sizeof json, qwen_window, 4);
    make_folder("qwen-window-none", json, folder, sizeof folder);
    ck_assert_int_eq(mt_hf_read_config(folder, &c), MT_OK);
    ck_assert_int_eq(c.sliding_window, 0);
    snprintf(json, sizeof json, qwen_window, 0);
    make_folder("qwen-window-all", json, folder, sizeof folder);
    ck_assert_int_eq(mt_hf_read_config(folder, &c), MT_OK);
    ck_assert_int_eq(c.sliding_window, 8);
    snprintf(json, sizeof json, qwen_window, 2);
    make_folder("qwen-window-some", json, folder, sizeof folder);
    tu_expect_error(mt_hf_read_config(folder, &c), MT_ERR_MODEL, "max_window_layers");
    make_folder("gpt", "{\"architectures\":[\"GPT2LMHeadModel\"],\"vocab_size\":5}", folder, sizeof folder);
    tu_expect_error(mt_hf_read_config(folder, &c), MT_ERR_MODEL,
                    "architecture 'GPT2LMHeadModel' (field architectures)");
    make_folder("nolayers",
                "{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":5,\"hidden_size\":8,"
                "\"intermediate_size\":8,\"num_attention_heads\":2}",
                folder, sizeof folder);
    tu_expect_error(mt_hf_read_config(folder, &c), MT_ERR_MODEL, "field num_hidden_layers is missing");
    make_folder("yarn",
                "{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":5,\"hidden_size\":8,"
                "\"intermediate_size\":8,\"num_hidden_layers\":1,\"num_attention_heads\":2,"
                "\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":4}}",
                folder, sizeof folder);
    tu_expect_error(mt_hf_read_config(folder, &c), MT_ERR_MODEL, "rope type 'yarn'");
    make_folder("llama3",
                "{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":5,\"hidden_size\":8,"
                "\"intermediate_size\":8,\"num_hidden_layers\":1,\"num_attention_heads\":2,\"rope_theta\":500000.0,"
                "\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8.0,\"low_freq_factor\":1.0,"
                "\"high_freq_factor\":4.0,\"original_max_position_embeddings\":8192}}",
                folder, sizeof folder);
    ck_assert_int_eq(mt_hf_read_config(folder, &c), MT_OK);
    ck_assert(c.rope_llama3 && c.rope_factor == 8.0f && c.rope_original_max_position == 8192);
    // longrope as transformers 5 writes a Phi3Config (rope_parameters, the original length at the top level
    // too): tables longer than the original length take the long factors, cos and sin scaled by
    // sqrt(1 + ln(512 / 32) / ln(32)); the factors' count is checked
    const char *longrope =
        "{\"architectures\":[\"Phi3ForCausalLM\"],\"vocab_size\":13,\"hidden_size\":32,\"intermediate_size\":24,"
        "\"num_hidden_layers\":1,\"num_attention_heads\":4,\"num_key_value_heads\":2,"
        "\"max_position_embeddings\":512,\"original_max_position_embeddings\":32,\"rope_parameters\":{"
        "\"rope_type\":\"%s\",\"rope_theta\":10000.0,\"original_max_position_embeddings\":32,"
        "\"long_factor\":[1.0,1.5,2.0%s],\"short_factor\":[1.0,1.1,1.2,1.3]}}";
    snprintf(gjson, sizeof gjson, longrope, "longrope", ",2.5");
    make_folder("phi3-longrope", gjson, folder, sizeof folder);
    ck_assert_int_eq(mt_hf_read_config(folder, &c), MT_OK);
    ck_assert(c.rope_longrope && c.rope_original_max_position == 32 && c.D == 8);
    ck_assert_float_eq(c.rope_attention_factor, (float)sqrt(1.0 + log(16.0) / log(32.0)));
    for (int P = 32; P <= 33; P++) {  // 32 positions: the short factors; 33: the long ones
        float cs[33 * 4], sn[33 * 4];
        mt_model_rope_tables(&c, 0, P, cs, sn);
        const float *ext = P > 32 ? c.rope_long_factor : c.rope_short_factor;
        for (int t = 0; t < P; t++)
            for (int i = 0; i < 4; i++) {
                // transformers: 1 / (ext * base ** (arange(0, dim, 2) / dim)) in fp32, then cos(t * inv) * factor
                float inv = 1.0f / (ext[i] * powf(10000.0f, (float)(2 * i) / 8.0f)), angle = (float)t * inv;
                ck_assert_float_eq_tol(cs[t * 4 + i], cosf(angle) * c.rope_attention_factor, 2e-6f);
                ck_assert_float_eq_tol(sn[t * 4 + i], sinf(angle) * c.rope_attention_factor, 2e-6f);
            }
    }
    ck_assert_float_eq(c.rope_long_factor[3], 2.5f);
    ck_assert_float_eq(c.rope_short_factor[3], 1.3f);
    snprintf(gjson, sizeof gjson, longrope, "su", "");  // Phi-3's first name for it; three long factors, not four
    make_folder("phi3-longrope-short-list", gjson, folder, sizeof folder);
    tu_expect_error(mt_hf_read_config(folder, &c), MT_ERR_MODEL, "long_factor and short_factor, 4 numbers each");
    tu_expect_error(mt_hf_read_config("/nonexistent-folder", &c), MT_ERR_MODEL, "no config.json");
    // a relative model.path says where it was looked for
    tu_expect_error(mt_hf_read_config("nonexistent-folder", &c), MT_ERR_MODEL, "read from the working directory");
    // found by fuzzing: a huge number is refused, not converted (that was undefined behaviour)
    make_folder("huge",
                "{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":258,\"hidden_size\":128,"
                "\"intermediate_size\":359999999999999999999999999999992,\"num_hidden_layers\":1,"
                "\"num_attention_heads\":2}",
                folder, sizeof folder);
    tu_expect_error(mt_hf_read_config(folder, &c), MT_ERR_MODEL,
                    "field intermediate_size is missing or not a positive");
    make_folder("enormous",
                "{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":1000000,\"hidden_size\":1000000,"
                "\"intermediate_size\":4000000,\"num_hidden_layers\":1000,\"num_attention_heads\":1000}",
                folder, sizeof folder);
    tu_expect_error(mt_hf_read_config(folder, &c), MT_ERR_MODEL, "beyond any model memtune can train");
}
END_TEST

// ------------------------------------------------------------------- model

typedef struct {
    mt_model *model;
    float *params;
    int32_t *inputs, *targets;
    size_t total;
} model_ctx;

static double model_loss(void *p) {
    model_ctx *c = p;
    mt_model_set_weights(c->model, c->params);
    return mt_model_step(c->model, c->inputs, c->targets, 0.0f, 0);
}

static void tiny_config(mt_model_config *c, int tie, int bias) {
    char folder[300];
    make_folder("cfg", tu_tiny_llama_json, folder, sizeof folder);
    ck_assert_int_eq(mt_hf_read_config(folder, c), MT_OK);
    c->tie_embeddings = tie;
    c->qkv_bias = c->o_bias = bias;
    c->init_std = 0.3f;
}

START_TEST(model_gradients_match_finite_differences) {
    for (int variant = 0; variant < 5; variant++) {
        mt_model_config c;
        tiny_config(&c, variant == 1, variant == 1);          // untied without bias; tied with biases
        if (variant == 4) c.fused = 1, c.sliding_window = 4;  // Phi-3: qkv_proj and gate_up_proj, a window
        if (variant == 2) c.qk_norm = 1, c.D = 6;             // Qwen3: head norms, head_dim not hidden/heads
        if (variant == 3) {  // Gemma 3: layer 0 sliding (window 3 of T 5), layer 1 global
            c.gemma = c.qk_norm = c.tie_embeddings = 1, c.D = 6;
            c.embed_scale = 4.0f, c.attn_scale = 0.3f, c.global_every = 2, c.sliding_window = 3;
            c.rope_local_theta = 100.0f, c.rope_linear_factor = 2.0f;
        }
        mt_backend be;
        mt_backend_init(&be, -1);
        int B = 2, T = 5, N = B * T;
        mt_model *m;
        ck_assert_int_eq(mt_model_create(&m, &be, &c, B, T, 0), MT_OK);
        model_ctx ctx = {m, NULL, malloc(N * 4), malloc(N * 4), mt_model_num_params(m)};
        ctx.params = malloc(ctx.total * 4);
        mt_model_init_random(&c, ctx.params, 3);
        for (size_t i = 0; i < ctx.total; i++) ctx.params[i] += 0.1f * mt_rng_normal(9, i);  // non-trivial norms/biases
        for (int i = 0; i < N; i++)
            ctx.inputs[i] = (int32_t)(mt_rng_bits(4, i) % 13), ctx.targets[i] = (int32_t)(mt_rng_bits(5, i) % 13);
        ctx.targets[3] = -1;
        mt_model_set_weights(m, ctx.params);
        mt_model_zero_grads(m);
        mt_model_step(m, ctx.inputs, ctx.targets, 1.0f, 1);
        float *grads = malloc(ctx.total * 4);
        memcpy(grads, mt_model_grads(m), ctx.total * 4);
        int np;
        const mt_param_info *info = mt_model_params(m, &np);
        for (int i = 0; i < np; i++) {
            double err = tu_fd_check(model_loss, &ctx, ctx.params + info[i].offset, grads + info[i].offset,
                                     info[i].count, 6, 1e-2);
            ck_assert_msg(err < 3e-2, "%s: finite-difference error %g", info[i].name, err);
        }
        // activation checkpointing gives the same gradients and loss
        mt_model *mc;
        ck_assert_int_eq(mt_model_create(&mc, &be, &c, B, T, 1), MT_OK);
        mt_model_set_weights(mc, ctx.params);
        mt_model_set_weights(m, ctx.params);
        mt_model_zero_grads(m);
        mt_model_zero_grads(mc);
        double l1 = mt_model_step(m, ctx.inputs, ctx.targets, 1.0f, 1);
        double l2 = mt_model_step(mc, ctx.inputs, ctx.targets, 1.0f, 1);
        ck_assert_double_eq(l1, l2);
        ck_assert_mem_eq(mt_model_grads(m), mt_model_grads(mc), ctx.total * 4);
        // loss from logits equals the step's loss
        float *logits = malloc((size_t)N * c.V * 4);
        mt_model_logits(m, ctx.inputs, logits);
        double manual = 0;
        for (int n = 0; n < N; n++) {
            if (ctx.targets[n] < 0) continue;
            double mx = -1e30, s = 0;
            for (int v = 0; v < c.V; v++) mx = fmax(mx, logits[n * c.V + v]);
            for (int v = 0; v < c.V; v++) s += exp(logits[n * c.V + v] - mx);
            manual += log(s) + mx - logits[n * c.V + ctx.targets[n]];
        }
        ck_assert_double_eq_tol(manual, l1, 1e-4 * fabs(l1));
        mt_model_free(m);
        mt_model_free(mc);
        mt_backend_free(&be);
        free(ctx.params), free(ctx.inputs), free(ctx.targets), free(grads), free(logits);
    }
}
END_TEST

// data.document_mask at the model: documents packed into rows (positions
// restarting, attention kept inside each) give every document the logits,
// loss and gradients it has alone in a row of its own length.
START_TEST(packed_documents_train_like_each_document_alone) {
    mt_model_config c;
    tiny_config(&c, 0, 1);
    mt_backend be;
    mt_backend_init(&be, -1);
    enum { B = 2, T = 9, N = B * T };
    int lengths[B][3] = {{4, 5, 0}, {2, 7, 0}};
    int32_t inputs[N], targets[N], pos[N];
    for (int i = 0; i < N; i++) inputs[i] = (int32_t)(mt_rng_bits(14, i) % 13);
    for (int b = 0; b < B; b++)
        for (int d = 0, t = 0; lengths[b][d]; d++)
            for (int p = 0; p < lengths[b][d]; p++, t++) {
                pos[b * T + t] = p;
                // the last token of a document predicts nothing
                targets[b * T + t] = p + 1 < lengths[b][d] ? inputs[b * T + t + 1] : -1;
            }
    mt_model_options o = {.B = B, .T = T, .document_mask = 1};
    mt_model *packed;
    ck_assert_int_eq(mt_model_create_with(&packed, &be, &c, &o), MT_OK);
    size_t total = mt_model_num_params(packed);
    float *params = malloc(total * 4), *sum = calloc(total, 4), *logits = malloc((size_t)N * c.V * 4);
    mt_model_init_random(&c, params, 21);
    mt_model_set_weights(packed, params);
    mt_model_set_positions(packed, pos);
    mt_model_zero_grads(packed);
    double packed_loss = mt_model_step(packed, inputs, targets, 1.0f, 1);
    mt_model_logits(packed, inputs, logits);
    double alone_loss = 0;
    for (int b = 0; b < B; b++)
        for (int d = 0, t0 = 0; lengths[b][d]; t0 += lengths[b][d], d++) {
            int n = lengths[b][d];
            mt_model *m;
            ck_assert_int_eq(mt_model_create(&m, &be, &c, 1, n, 0), MT_OK);
            mt_model_set_weights(m, params);
            mt_model_zero_grads(m);
            alone_loss += mt_model_step(m, inputs + b * T + t0, targets + b * T + t0, 1.0f, 1);
            for (size_t i = 0; i < total; i++) sum[i] += mt_model_grads(m)[i];
            float *own = malloc((size_t)n * c.V * 4);
            mt_model_logits(m, inputs + b * T + t0, own);
            for (int i = 0; i < n * c.V; i++)
                ck_assert_float_eq_tol(logits[(size_t)(b * T + t0) * c.V + i], own[i], 1e-5);
            free(own);
            mt_model_free(m);
        }
    ck_assert_double_eq_tol(packed_loss, alone_loss, 1e-5 * fabs(alone_loss));
    double diff = 0, norm = 0;
    for (size_t i = 0; i < total; i++) {
        double e = (double)mt_model_grads(packed)[i] - sum[i];
        diff += e * e, norm += (double)sum[i] * sum[i];
    }
    ck_assert_msg(sqrt(diff / norm) < 1e-5, "packed gradients differ from the documents' alone: %g", sqrt(diff / norm));
    // without the positions (one document a row) the same batch gives other logits
    float *plain = malloc((size_t)N * c.V * 4);
    mt_model_set_positions(packed, NULL);
    mt_model_logits(packed, inputs, plain);
    ck_assert(memcmp(plain, logits, (size_t)N * c.V * 4) != 0);
    mt_model_free(packed);
    mt_backend_free(&be);
    free(params), free(sum), free(logits), free(plain);
}
END_TEST

START_TEST(save_and_load_round_trip) {
    mt_model_config c;
    tiny_config(&c, 0, 1);
    int n;
    size_t total;
    mt_param_info *table = mt_model_param_table(&c, &n, &total);
    float *params = malloc(total * 4), *back = calloc(total, 4);
    mt_model_init_random(&c, params, 11);
    char out[300];
    snprintf(out, sizeof out, "%s/saved", dir);
    ck_assert_int_eq(mt_hf_save(out, NULL, &c, params, MT_DTYPE_F32), MT_OK);
    mt_model_config c2;
    ck_assert_int_eq(mt_hf_read_config(out, &c2), MT_OK);
    ck_assert_int_eq(c2.L, c.L);
    ck_assert_int_eq(c2.qkv_bias, 1);
    ck_assert_int_eq(mt_hf_load_weights(out, &c2, back), MT_OK);
    for (int i = 0; i < n; i++) ck_assert_mem_eq(back + table[i].offset, params + table[i].offset, table[i].count * 4);
    // a second save replaces the folder whole; a tensor missing is named
    ck_assert_int_eq(mt_hf_save(out, NULL, &c, params, MT_DTYPE_BF16), MT_OK);
    // a tensor whose shape disagrees with config.json is named with both shapes
    c2.F = 32;
    float *wide = calloc(total * 2, 4);
    tu_expect_error(mt_hf_load_weights(out, &c2, wide), MT_ERR_MODEL,
                    "tensor model.layers.0.mlp.gate_proj.weight has shape [24, 16], config.json implies [32, 16]");
    free(wide);
    c2.F = c.F;
    c2.L = 3;
    int n3;
    size_t total3;
    free(mt_model_param_table(&c2, &n3, &total3));
    float *back3 = calloc(total3, 4);
    tu_expect_error(mt_hf_load_weights(out, &c2, back3), MT_ERR_MODEL,
                    "model.layers.2.input_layernorm.weight is missing");
    free(params), free(back), free(back3), free(table);
}
END_TEST

// mt_hf_set_model (a frozen base a layer at a time through one layer-sized
// buffer) sets what the whole fp32 copy sets: the same logits from the folder
// and from a random draw, with bf16-range and NF4 bases, resident and
// streamed, and for generate's NF4 decoding; a tensor missing from the folder
// is named.
START_TEST(a_base_set_a_layer_at_a_time_equals_the_whole_copy) {
    mt_model_config c;
    tiny_config(&c, 0, 1);
    int n;
    size_t total;
    mt_param_info *table = mt_model_param_table(&c, &n, &total);
    float *params = calloc(total, 4);
    mt_model_init_random(&c, params, 13);
    char out[300];
    snprintf(out, sizeof out, "%s/by-layer", dir);
    ck_assert_int_eq(mt_hf_save(out, NULL, &c, params, MT_DTYPE_F32), MT_OK);
    mt_backend be;
    ck_assert_int_eq(mt_backend_init(&be, -1), MT_OK);
    enum { B = 2, T = 6, N = B * T };
    int32_t in[N];
    for (int i = 0; i < N; i++) in[i] = (int32_t)(mt_rng_bits(14, i) % c.V);
    float *la = malloc((size_t)N * c.V * 4), *lb = malloc((size_t)N * c.V * 4);
    for (int v = 0; v < 4; v++) {
        mt_model_options o = {.B = B,
                              .T = T,
                              .forward_only = 1,
                              .lora = {v >= 2 ? 2 : 0, 4.0f, 0.0f, 0, v >= 2 ? (1u << MT_LORA_MODULES) - 1 : 0},
                              .quantize_nf4 = v >= 2,
                              .stream_weights = v & 1};
        mt_model *a, *b;
        ck_assert_int_eq(mt_model_create_with(&a, &be, &c, &o), MT_OK);
        ck_assert_int_eq(mt_model_create_with(&b, &be, &c, &o), MT_OK);
        if (v >= 2) {  // zero adapters: the base alone
            mt_trainable t;
            mt_model_trainable(a, &t);
            float *zero = calloc(t.total, 4);
            mt_model_set_adapters(a, zero), mt_model_set_adapters(b, zero);
            free(zero);
        }
        for (int random = 0; random <= 1; random++) {
            ck_assert_int_eq(mt_model_set_weights(a, params), MT_OK);
            ck_assert_int_eq(mt_hf_set_model(b, random ? NULL : out, 13), MT_OK);
            mt_model_logits(a, in, la);
            mt_model_logits(b, in, lb);
            ck_assert_msg(!memcmp(la, lb, (size_t)N * c.V * 4), "variant %d, %s: logits differ", v,
                          random ? "random" : "loaded");
        }
        mt_model_free(a), mt_model_free(b);
    }
    // memtune generate on a GPU with --quantize nf4 and an adapter: the decoding model keeps NF4 codes, read from
    // the folder a layer at a time; its logits are those of the base through NF4 and back (the CPU generator's)
    mt_model_options oq = {.B = B,
                           .T = 1,
                           .forward_only = 1,
                           .decode_len = T,
                           .lora = {2, 4.0f, 0.0f, 0, (1u << MT_LORA_MODULES) - 1},
                           .quantize_nf4 = 1},
                     or = oq;
    or.quantize_nf4 = 0;
    mt_model *q, *r;
    ck_assert_int_eq(mt_model_create_with(&q, &be, &c, &oq), MT_OK);
    ck_assert_int_eq(mt_model_create_with(&r, &be, &c, & or), MT_OK);
    mt_trainable ta;
    mt_model_trainable(q, &ta);
    float *adapters = calloc(ta.total, 4), *round_trip = malloc(total * 4);
    tu_fill_uniform(adapters, ta.total, -0.2f, 0.2f, 77);  // lora_B too: the adapters count
    memcpy(round_trip, params, total * 4);
    ck_assert_int_eq(mt_generate_quantize_nf4(&c, round_trip), MT_OK);
    ck_assert_int_eq(mt_hf_set_model(q, out, 0), MT_OK);
    ck_assert_int_eq(mt_model_set_weights(r, round_trip), MT_OK);
    mt_model_set_adapters(q, adapters), mt_model_set_adapters(r, adapters);
    float *dq = malloc((size_t)B * c.V * 4), *dr = malloc((size_t)B * c.V * 4);
    for (int step = 0; step < T; step++) {
        int32_t pos[B] = {step, step / 2}, tok[B] = {in[step], in[T + step]};
        mt_model_decode(q, tok, pos, dq);
        mt_model_decode(r, tok, pos, dr);
        ck_assert_msg(!memcmp(dq, dr, (size_t)B * c.V * 4), "NF4 decoding, step %d: logits differ", step);
    }
    mt_model_bytes bq, br;
    mt_model_plan_bytes(0, -1, &c, &oq, NULL, &bq, NULL);
    mt_model_plan_bytes(0, -1, &c, & or, NULL, &br, NULL);
    ck_assert_uint_lt(bq.weights, br.weights);  // codes, not the compute type
    mt_model_free(q), mt_model_free(r);
    free(adapters), free(round_trip), free(dq), free(dr);
    c.L = 3;  // a layer the folder does not have
    mt_model_options o = {.B = B, .T = T, .forward_only = 1};
    mt_model *m;
    ck_assert_int_eq(mt_model_create_with(&m, &be, &c, &o), MT_OK);
    tu_expect_error(mt_hf_set_model(m, out, 0), MT_ERR_MODEL, "model.layers.2.input_layernorm.weight is missing");
    mt_model_free(m);
    mt_backend_free(&be);
    free(params), free(table), free(la), free(lb);
}
END_TEST

// ---------------------------------------------------------------- training

// The config of the model folder and random fp32 values for it (malloc'd).
static float *random_params(const char *folder, mt_model_config *mc, uint64_t seed) {
    ck_assert_int_eq(mt_hf_read_config(folder, mc), MT_OK);
    int n_params;
    size_t total;
    free(mt_model_param_table(mc, &n_params, &total));
    float *params = malloc(total * sizeof(float));
    mt_model_init_random(mc, params, seed);
    return params;
}

// A CPU run of the model folder, from random values, on data into out.
static void base_config(mt_config *cfg, const char *folder, const char *data, const char *out, const char *steps,
                        const char *seq_len) {
    mt_config_defaults(cfg);
    ck_assert_int_eq(mt_config_set(cfg, "model.path", folder, "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(cfg, "model.init", "random", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(cfg, "data.train", data, "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(cfg, "output.dir", out, "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(cfg, "train.steps", steps, "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(cfg, "train.seq_len", seq_len, "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(cfg, "train.device", "cpu", "t"), MT_OK);
}

START_TEST(training_reduces_loss_and_saves) {
    char data[300], folder[300], out[300];
    snprintf(data, sizeof data, "%s/train.h5", dir);
    // a learnable stream: a repeating pattern of 13 symbols
    uint64_t n = 20000;
    uint32_t *tok = malloc(n * 4);
    for (uint64_t i = 0; i < n; i++) tok[i] = (uint32_t)((i * 5 + i / 13) % 13);
    uint64_t offsets[2] = {0, n};
    ck_assert_int_eq(mt_dataset_write(data, tok, n, offsets, 1, NULL, 13, "test"), MT_OK);
    free(tok);
    make_folder("train-model", tu_tiny_llama_json, folder, sizeof folder);
    snprintf(out, sizeof out, "%s/run", dir);
    mt_config cfg;
    base_config(&cfg, folder, data, out, "60", "32");  // head dim 4: CPU only
    ck_assert_int_eq(mt_config_set(&cfg, "train.grad_accum", "2", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "train.log_every", "20", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "optim.lr", "1e-2", "t"), MT_OK);
    mt_train_result r;
    ck_assert_int_eq(mt_train(&cfg, &r), MT_OK);
    ck_assert_int_eq(r.steps_done, 60);
    ck_assert_msg(r.last_loss < 0.5 * r.first_loss, "loss %g -> %g", r.first_loss, r.last_loss);
    ck_assert(isfinite(r.last_eval_loss));
    char path[400];
    snprintf(path, sizeof path, "%s/model/model.safetensors", out);
    ck_assert_int_eq(access(path, R_OK), 0);
    snprintf(path, sizeof path, "%s/metrics.jsonl", out);
    ck_assert_int_eq(access(path, R_OK), 0);
    snprintf(path, sizeof path, "%s/loss.svg", out);
    FILE *svg = fopen(path, "r");
    ck_assert_ptr_nonnull(svg);
    char head[64] = "";
    ck_assert_ptr_nonnull(fgets(head, sizeof head, svg));
    fclose(svg);
    ck_assert_ptr_nonnull(strstr(head, "<svg"));
    // a model with a NaN weight stops at step 1 with a clear error, and no model is written
    mt_model_config mc;
    float *params = random_params(folder, &mc, 5);
    params[7] = NAN;  // inside the embedding
    char bad[300], bad_run[300];
    snprintf(bad, sizeof bad, "%s/nan-model", dir);
    snprintf(bad_run, sizeof bad_run, "%s/nan-run", dir);
    ck_assert_int_eq(mt_hf_save(bad, NULL, &mc, params, MT_DTYPE_F32), MT_OK);
    free(params);
    ck_assert_int_eq(mt_config_set(&cfg, "model.path", bad, "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "model.init", "pretrained", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "output.dir", bad_run, "t"), MT_OK);
    tu_expect_error(mt_train(&cfg, &r), MT_ERR_NONFINITE, "step 1: loss nan");
    ck_assert_ptr_nonnull(strstr(mt_last_error(), "the update was not applied"));
    snprintf(path, sizeof path, "%s/model", bad_run);
    ck_assert_int_ne(access(path, F_OK), 0);
    // with on_nonfinite: skip the run goes on, every update skipped
    ck_assert_int_eq(mt_config_set(&cfg, "train.on_nonfinite", "skip", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "train.steps", "3", "t"), MT_OK);
    ck_assert_int_eq(mt_train(&cfg, &r), MT_OK);
    ck_assert_int_eq(r.steps_done, 0);
    ck_assert_int_eq(mt_config_set(&cfg, "train.on_nonfinite", "stop", "t"), MT_OK);
    // a missing dataset is a clear error before anything runs
    ck_assert_int_eq(mt_config_set(&cfg, "data.train", "/nonexistent.h5", "t"), MT_OK);
    tu_expect_error(mt_train(&cfg, &r), MT_ERR_IO, "/nonexistent.h5: dataset file not found");
    // too little data for one eval batch: refused, and the early exit frees
    // only what it made (it once freed the unset unit ranges)
    char small[300];
    snprintf(small, sizeof small, "%s/small.h5", dir);
    uint32_t few[400];
    for (int i = 0; i < 400; i++) few[i] = (uint32_t)(i % 13);
    uint64_t few_offsets[2] = {0, 400};
    ck_assert_int_eq(mt_dataset_write(small, few, 400, few_offsets, 1, NULL, 13, "test"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "data.train", small, "t"), MT_OK);
    tu_expect_error(mt_train(&cfg, &r), MT_ERR_DATASET, "fewer than one batch");
    mt_config_free(&cfg);
}
END_TEST

// The loss (and so the gradient) is the mean over the step's trained tokens,
// whatever micro-batches they come in: with very unequal masks per row, one
// micro-batch of 2 rows and 2 micro-batches of 1 row give the same losses (a
// mean per micro-batch would not).
START_TEST(loss_is_the_mean_over_the_steps_trained_tokens) {
    char data[300], folder[300], one[300], two[300];
    snprintf(data, sizeof data, "%s/masked.h5", dir);
    const uint64_t T = 16, windows = 240, n = T * windows + 1;
    uint32_t *tok = malloc(n * 4);
    uint8_t *mask = malloc(n);
    for (uint64_t i = 0; i < n; i++) {
        tok[i] = (uint32_t)(mt_rng_bits(23, i) % 13);
        uint64_t w = i / T, t = i % T;
        mask[i] = w % 3 == 0 || t >= T - 2;  // a third of the windows fully trained, the rest 2 tokens
    }
    uint64_t offsets[2] = {0, n};
    ck_assert_int_eq(mt_dataset_write(data, tok, n, offsets, 1, mask, 13, "test"), MT_OK);
    free(tok), free(mask);
    make_folder("masked-model", tu_tiny_llama_json, folder, sizeof folder);
    snprintf(one, sizeof one, "%s/masked-one", dir);
    snprintf(two, sizeof two, "%s/masked-two", dir);
    const int steps = 8;
    double a[8], b[8];
    for (int run = 0; run < 2; run++) {
        mt_config cfg;
        base_config(&cfg, folder, data, run ? two : one, "8", "16");
        ck_assert_int_eq(mt_config_set(&cfg, "data.eval_fraction", "0", "t"), MT_OK);
        ck_assert_int_eq(mt_config_set(&cfg, "train.micro_batch", run ? "1" : "2", "t"), MT_OK);
        ck_assert_int_eq(mt_config_set(&cfg, "train.grad_accum", run ? "2" : "1", "t"), MT_OK);
        ck_assert_int_eq(mt_config_set(&cfg, "train.log_every", "1", "t"), MT_OK);
        ck_assert_int_eq(mt_config_set(&cfg, "train.eval_every", "0", "t"), MT_OK);
        ck_assert_int_eq(mt_config_set(&cfg, "optim.lr", "1e-2", "t"), MT_OK);
        mt_train_result r;
        ck_assert_int_eq(mt_train(&cfg, &r), MT_OK);
        ck_assert_int_eq(tu_read_losses(run ? two : one, run ? b : a, steps), steps);
        // the steps' rows: some steps pair a fully trained row with a 2-token one
        if (run == 1) {
            mt_dataset *ds;
            ck_assert_int_eq(mt_dataset_open(&ds, data, 13), MT_OK);
            mt_loader *l;
            mt_loader_config lc = {1, (int)T, (uint64_t)cfg.train_seed, 0, 1, 0.0, 0};
            ck_assert_int_eq(mt_loader_init(&l, ds, &lc, MT_SPLIT_TRAIN), MT_OK);
            int32_t in[16], tg[16];
            int unequal = 0;
            for (int s = 0; s < steps; s++) {
                int v0, v1;
                ck_assert_int_eq(mt_loader_next(l, in, tg, &v0), MT_OK);
                ck_assert_int_eq(mt_loader_next(l, in, tg, &v1), MT_OK);
                unequal += v0 != v1;
            }
            ck_assert_int_ge(unequal, 2);
            mt_loader_free(l);
            mt_dataset_free(ds);
        }
        mt_config_free(&cfg);
    }
    for (int s = 0; s < steps; s++)
        ck_assert_msg(fabs(a[s] - b[s]) <= 1e-6 * fabs(a[s]),
                      "step %d: loss %.9g (1 micro-batch of 2 rows) vs %.9g "
                      "(2 of 1)",
                      s + 1, a[s], b[s]);
}
END_TEST

// memtune eval: the mean cross-entropy over the trained targets of every
// window, as computed here from the model's logits; an adapter applied on
// the fly gives the loss of the merged model.
START_TEST(eval_matches_logits_and_adapter) {
    char folder[300], model_dir[300], data[300], adapter[300], merged[300];
    make_folder("eval-config", tu_tiny_llama_json, folder, sizeof folder);
    snprintf(model_dir, sizeof model_dir, "%s/eval-model", dir);
    snprintf(data, sizeof data, "%s/eval.h5", dir);
    snprintf(adapter, sizeof adapter, "%s/eval-adapter", dir);
    snprintf(merged, sizeof merged, "%s/eval-merged", dir);
    mt_model_config mc;
    float *params = random_params(folder, &mc, 9);
    ck_assert_int_eq(mt_hf_save(model_dir, NULL, &mc, params, MT_DTYPE_F32), MT_OK);
    const int T = 16, windows = 12;
    uint64_t n = (uint64_t)T * windows + 1;
    uint32_t *tok = malloc(n * 4);
    uint8_t *mask = malloc(n);
    for (uint64_t i = 0; i < n; i++) tok[i] = (uint32_t)(mt_rng_bits(31, i) % 13), mask[i] = (i % 5) < 2;
    uint64_t offsets[2] = {0, n};
    ck_assert_int_eq(mt_dataset_write(data, tok, n, offsets, 1, mask, 13, "test"), MT_OK);
    mt_eval_options o;
    mt_eval_defaults(&o);
    o.model = model_dir, o.data = data, o.device = "cpu", o.seq_len = T, o.batch = 3, o.progress = 0;
    mt_eval_result r;
    ck_assert_msg(mt_eval_run(&o, &r) == MT_OK, "%s", mt_last_error());
    ck_assert_int_eq(r.windows, windows);
    // by hand: logits of each window, cross-entropy at the trained targets
    mt_backend be;
    ck_assert_int_eq(mt_backend_init(&be, -1), MT_OK);
    mt_model *m;
    ck_assert_int_eq(mt_model_create(&m, &be, &mc, 1, T, 0), MT_OK);
    ck_assert_int_eq(mt_model_set_weights(m, params), MT_OK);
    float *logits = malloc((size_t)T * mc.V * sizeof(float));
    double sum = 0.0;
    long count = 0;
    for (int w = 0; w < windows; w++) {
        int32_t in[16];
        for (int t = 0; t < T; t++) in[t] = (int32_t)tok[w * T + t];
        mt_model_logits(m, in, logits);
        for (int t = 0; t < T; t++) {
            if (!mask[w * T + t + 1]) continue;
            const float *row = logits + (size_t)t * mc.V;
            double mx = row[0], z = 0.0;
            for (int v = 1; v < mc.V; v++) mx = row[v] > mx ? row[v] : mx;
            for (int v = 0; v < mc.V; v++) z += exp(row[v] - mx);
            sum += log(z) + mx - row[tok[w * T + t + 1]];
            count++;
        }
    }
    mt_model_free(m);
    mt_backend_free(&be);
    ck_assert_int_eq(r.targets, count);
    ck_assert_msg(fabs(r.loss - sum / count) < 1e-5 * (sum / count), "eval %.9g, by hand %.9g", r.loss, sum / count);
    ck_assert_double_eq_tol(r.perplexity, exp(r.loss), 1e-9 * r.perplexity);
    // an adapter with non-zero A and B, on the fly and merged
    mt_lora_config lora = {.r = 2, .alpha = 4, .targets = 0x7f};
    int n_ad;
    size_t ad_total;
    mt_param_info *table = mt_lora_param_table(&mc, &lora, &n_ad, &ad_total);
    float *ad = tu_random(ad_total, -0.3f, 0.3f, 77);
    ck_assert_int_eq(mt_lora_save(adapter, &lora, model_dir, table, n_ad, ad), MT_OK);
    o.adapter = adapter;
    mt_eval_result ra, rs;
    ck_assert_msg(mt_eval_run(&o, &ra) == MT_OK, "%s", mt_last_error());
    o.stream_weights = 1;  // --weights cpu: the base streamed a layer at a time, the same loss bit for bit
    ck_assert_msg(mt_eval_run(&o, &rs) == MT_OK, "%s", mt_last_error());
    ck_assert_msg(rs.loss == ra.loss, "streamed %.17g, resident %.17g", rs.loss, ra.loss);
    o.weights_dir = dir;  // --weights ssd: from a file there (deleted at once), the same loss again
    ck_assert_msg(mt_eval_run(&o, &rs) == MT_OK, "%s", mt_last_error());
    ck_assert_msg(rs.loss == ra.loss, "from a file %.17g, resident %.17g", rs.loss, ra.loss);
    o.resident_layers = 1;  // --resident-layers 1: the first layer kept, the same loss again
    ck_assert_msg(mt_eval_run(&o, &rs) == MT_OK, "%s", mt_last_error());
    ck_assert_msg(rs.loss == ra.loss, "one layer resident %.17g, resident %.17g", rs.loss, ra.loss);
    o.stream_weights = 0, o.weights_dir = NULL, o.resident_layers = 0;
    mt_lora_merge(&mc, &lora, params, ad);
    ck_assert_int_eq(mt_hf_save(merged, NULL, &mc, params, MT_DTYPE_F32), MT_OK);
    o.adapter = NULL, o.model = merged;
    mt_eval_result rm;
    ck_assert_int_eq(mt_eval_run(&o, &rm), MT_OK);
    // random tokens keep every loss near ln 13 whatever the weights: the
    // adapter's effect is small, but ten times the 1e-5 within which the
    // two paths agree (one that ignored the adapter would give r's loss)
    ck_assert_msg(fabs(ra.loss - r.loss) > 1e-4 * r.loss, "the adapter changed nothing (%.9g against %.9g)", ra.loss,
                  r.loss);
    ck_assert_msg(fabs(ra.loss - rm.loss) < 1e-5 * rm.loss, "on the fly %.9g, merged %.9g", ra.loss, rm.loss);
    // a file too short for one window, and a missing model, are clear errors
    o.seq_len = 4096;
    tu_expect_error(mt_eval_run(&o, &rm), MT_ERR_DATASET, "no window of 4096+1");
    o.seq_len = T, o.model = "/nonexistent";
    ck_assert_int_ne(mt_eval_run(&o, &rm), MT_OK);
    free(table), free(ad), free(params), free(tok), free(mask), free(logits);
}
END_TEST

// Generation with a key/value cache gives, at every position, the logits of
// the whole-sequence forward (the model checked against transformers) and so
// the same greedy tokens; a sliding window and tied embeddings too. Sampling:
// temperature 0 is argmax, top-k 1 is argmax, draws are reproducible by seed.
// Small models of each family: a Llama (the tiny one, NULL here), Qwen2 with
// tied embeddings and a sliding window, Qwen3, Gemma 3 (sliding and global
// layers, linear RoPE scaling), Phi-3.
static const char *const family_configs[] = {
    NULL,  // the tiny Llama
    "{\"architectures\":[\"Qwen2ForCausalLM\"],\"model_type\":\"qwen2\",\"vocab_size\":13,\"hidden_size\":12,"
    "\"intermediate_size\":20,\"num_hidden_layers\":2,\"num_attention_heads\":3,\"num_key_value_heads\":1,"
    "\"max_position_embeddings\":64,\"rms_norm_eps\":1e-6,\"rope_theta\":1000.0,\"tie_word_embeddings\":true,"
    "\"sliding_window\":5,\"use_sliding_window\":true,\"max_window_layers\":0}",
    "{\"architectures\":[\"Qwen3ForCausalLM\"],\"model_type\":\"qwen3\",\"vocab_size\":13,\"hidden_size\":12,"
    "\"intermediate_size\":20,\"num_hidden_layers\":2,\"num_attention_heads\":4,\"num_key_value_heads\":2,"
    "\"head_dim\":8,\"max_position_embeddings\":64,\"rms_norm_eps\":1e-6,\"rope_theta\":1000.0,"
    "\"tie_word_embeddings\":true}",
    "{\"architectures\":[\"Gemma3ForCausalLM\"],\"model_type\":\"gemma3_text\",\"vocab_size\":13,\"hidden_size\":"
    "12,"
    "\"intermediate_size\":20,\"num_hidden_layers\":3,\"num_attention_heads\":4,\"num_key_value_heads\":1,"
    "\"head_dim\":8,\"max_position_embeddings\":64,\"query_pre_attn_scalar\":6,\"sliding_window\":5,"
    "\"sliding_window_pattern\":3,\"rope_theta\":1000.0,\"rope_local_base_freq\":100.0,"
    "\"rope_scaling\":{\"rope_type\":\"linear\",\"factor\":2.0}}",
    "{\"architectures\":[\"Phi3ForCausalLM\"],\"model_type\":\"phi3\",\"vocab_size\":13,\"hidden_size\":16,"
    "\"intermediate_size\":20,\"num_hidden_layers\":2,\"num_attention_heads\":4,\"num_key_value_heads\":2,"
    "\"max_position_embeddings\":64,\"rms_norm_eps\":1e-5,\"rope_theta\":10000.0,\"sliding_window\":7,"
    "\"resid_pdrop\":0.0,\"embd_pdrop\":0.0,\"attention_dropout\":0.0,\"tie_word_embeddings\":false}"};
static const char *const family_names[] = {"gen-llama", "gen-qwen", "gen-qwen3", "gen-gemma3", "gen-phi3"};

// Family `variant`'s folder, its config and random fp32 values (malloc'd).
static float *family_params(int variant, mt_model_config *mc, uint64_t seed) {
    char folder[300];
    make_folder(family_names[variant], variant ? family_configs[variant] : tu_tiny_llama_json, folder, sizeof folder);
    return random_params(folder, mc, seed);
}

// model.mlp_tile_rows: the MLP over tiles of rows (the last one short) gives
// the untiled model's loss bit for bit and its gradients within fp32's
// reordering of the weight gradients' sums over tiles, in every family, with
// and without checkpointing; its (rows, intermediate) buffers shrink.
START_TEST(tiled_mlp_equals_untiled) {
    for (int variant = 0; variant < 5; variant++) {
        mt_model_config mc;
        float *params = family_params(variant, &mc, 61 + variant);
        mt_backend be;
        ck_assert_int_eq(mt_backend_init(&be, -1), MT_OK);
        enum { B = 2, T = 11, N = B * T };
        int32_t in[N], tg[N];
        for (int i = 0; i < N; i++)
            in[i] = (int32_t)(mt_rng_bits(62, i) % mc.V), tg[i] = (int32_t)(mt_rng_bits(63, i) % mc.V);
        for (int ckpt = 0; ckpt <= 1; ckpt++) {
            mt_model_options o = {.B = B, .T = T, .activation_checkpointing = ckpt}, ot = o;
            ot.mlp_tile_rows = 5;  // 4 tiles of 5 rows and one of 2
            mt_model *a, *b;
            ck_assert_int_eq(mt_model_create_with(&a, &be, &mc, &o), MT_OK);
            ck_assert_int_eq(mt_model_create_with(&b, &be, &mc, &ot), MT_OK);
            ck_assert_int_eq(mt_model_set_weights(a, params), MT_OK);
            ck_assert_int_eq(mt_model_set_weights(b, params), MT_OK);
            double la = mt_model_step(a, in, tg, 1.0f, 1), lb = mt_model_step(b, in, tg, 1.0f, 1);
            ck_assert_msg(la == lb, "variant %d checkpointing %d: loss %.17g tiled %.17g", variant, ckpt, la, lb);
            size_t total = mt_model_num_params(a);
            double err = tu_norm_rel_error(mt_model_grads(b), mt_model_grads(a), total);
            ck_assert_msg(err < 1e-6, "variant %d checkpointing %d: gradients differ by %g", variant, ckpt, err);
            mt_model_bytes ba, bb;
            mt_model_plan_bytes(0, -1, &mc, &o, NULL, &ba, NULL);
            mt_model_plan_bytes(0, -1, &mc, &ot, NULL, &bb, NULL);
            ck_assert_uint_lt(bb.activations, ba.activations);
            mt_model_free(a), mt_model_free(b);
        }
        mt_backend_free(&be);
        free(params);
    }
}
END_TEST

// The loss over several chunks of logits: a 70000-token vocabulary makes a
// chunk 256 rows (its floor), so 3 sequences of 100 take two chunks, the
// second of 44 rows. Its loss (a sum over tokens) and gradients equal the sums
// of each sequence run alone (one chunk each), to fp32's reordering.
START_TEST(loss_over_logit_chunks_equals_the_sequences_alone) {
    char folder[300];
    make_folder("wide-vocab",
                "{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":70000,\"hidden_size\":8,"
                "\"intermediate_size\":12,\"num_hidden_layers\":1,\"num_attention_heads\":2,"
                "\"num_key_value_heads\":1,\"rms_norm_eps\":1e-5,\"rope_theta\":10000.0,"
                "\"tie_word_embeddings\":false}",
                folder, sizeof folder);
    mt_model_config mc;
    float *params = random_params(folder, &mc, 71);
    mt_backend be;
    ck_assert_int_eq(mt_backend_init(&be, -1), MT_OK);
    enum { B = 3, T = 100, N = B * T };
    int32_t in[N], tg[N];
    for (int i = 0; i < N; i++)
        in[i] = (int32_t)(mt_rng_bits(72, i) % mc.V), tg[i] = (int32_t)(mt_rng_bits(73, i) % mc.V);
    tg[5] = tg[150] = tg[299] = -1;  // masked targets in both chunks
    mt_model_options o = {.B = B, .T = T}, one = {.B = 1, .T = T};
    mt_model *whole, *alone;
    ck_assert_int_eq(mt_model_create_with(&whole, &be, &mc, &o), MT_OK);
    ck_assert_int_eq(mt_model_create_with(&alone, &be, &mc, &one), MT_OK);
    ck_assert_int_eq(mt_model_set_weights(whole, params), MT_OK);
    ck_assert_int_eq(mt_model_set_weights(alone, params), MT_OK);
    double loss = mt_model_step(whole, in, tg, 1.0f, 1), sum = 0.0;
    for (int b = 0; b < B; b++)  // the gradients accumulate over the three steps
        sum += mt_model_step(alone, in + b * T, tg + b * T, 1.0f, 1);
    ck_assert_msg(fabs(loss - sum) <= 1e-9 * fabs(sum), "loss %.17g, the sequences alone %.17g", loss, sum);
    double err = tu_norm_rel_error(mt_model_grads(whole), mt_model_grads(alone), mt_model_num_params(whole));
    ck_assert_msg(err < 1e-5, "gradients differ from the sequences' sum by %g", err);
    mt_model_free(whole), mt_model_free(alone);
    mt_backend_free(&be);
    free(params);
}
END_TEST

// The sampler by its definition: every candidate sorted by (logit desc, id
// asc) up front, the normaliser summed in id order, the walks in sorted
// order, the last token of any weight the pick's walk passed as its end.
static const float *ws_scaled;
static int ws_by_desc(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    if (ws_scaled[x] != ws_scaled[y]) return ws_scaled[x] < ws_scaled[y] ? 1 : -1;
    return x - y;
}

static int32_t sample_whole_sort(const float *logits, int V, const mt_sampling *s, uint64_t draw) {
    float *x = malloc((size_t)V * 4);
    int *order = malloc((size_t)V * sizeof *order);
    unsigned char *in = calloc((size_t)V, 1);
    for (int v = 0; v < V; v++) x[v] = logits[v] / s->temperature, order[v] = v;
    ws_scaled = x;
    qsort(order, (size_t)V, sizeof *order, ws_by_desc);
    int n = s->top_k > 0 && s->top_k < V ? s->top_k : V;
    for (int i = 0; i < n; i++) in[order[i]] = 1;
    double top = x[order[0]], z = 0.0;
    for (int v = 0; v < V; v++)
        if (in[v]) z += exp((double)x[v] - top);
    int keep = n;
    for (int i = 1; s->min_p > 0.0f && i < keep; i++)
        if (exp((double)x[order[i]] - top) < s->min_p) keep = i;
    double mass = 0.0, total = z;
    for (int i = 0; s->top_p < 1.0f && i < keep; i++)
        if ((mass += exp((double)x[order[i]] - top) / z) >= s->top_p) keep = i + 1;
    if (keep < n) {
        total = 0.0;
        for (int i = 0; i < keep; i++) total += exp((double)x[order[i]] - top);
    }
    double u = (double)(mt_rng_bits(s->seed, draw) >> 11) * (1.0 / 9007199254740992.0) * total, acc = 0.0;
    int32_t pick = order[0];
    for (int i = 0; i < keep; i++) {
        double p = exp((double)x[order[i]] - top);
        if (p > 0.0) pick = order[i];
        if ((acc += p) > u) break;
    }
    free(x), free(order), free(in);
    return pick;
}

// mt_sample sorts only as far as its walks reach (a heap or quickselect
// for the next candidates): the same token as the whole sort, for flat and
// peaked logits, ties, and each cut alone and together.
START_TEST(sampling_equals_the_whole_sort) {
    enum { NV = 5000 };
    float *l = malloc(NV * 4), *work = malloc(NV * 4);
    mt_sampling cfgs[] = {{1.0f, 0, 1.0f, 0.0f, 1.0f, 3},    {0.8f, 0, 0.9f, 0.0f, 1.0f, 4},
                          {0.8f, 0, 1.0f, 0.05f, 1.0f, 5},   {0.7f, 7, 0.9f, 0.0f, 1.0f, 6},
                          {1.0f, 333, 1.0f, 0.0f, 1.0f, 7},  {0.9f, 0, 0.3f, 0.2f, 1.0f, 8},
                          {1.3f, 2000, 0.99f, 0.0f, 1.0f, 9}};
    int ncfg = (int)(sizeof cfgs / sizeof cfgs[0]), mismatches = 0, checked = 0;
    for (int kind = 0; kind < 3; kind++) {
        for (int v = 0; v < NV; v++) {
            float g = mt_rng_normal(21, (uint64_t)v);
            l[v] = kind == 0 ? g : kind == 1 ? 6.0f * g : (float)(mt_rng_bits(22, (uint64_t)v) % 41) / 4.0f;
        }
        for (int c = 0; c < ncfg; c++)
            for (int d = 0; d < 30; d++) {
                memcpy(work, l, NV * 4);
                int32_t got = mt_sample(work, NV, &cfgs[c], NULL, 0, (uint64_t)d);
                int32_t want = sample_whole_sort(l, NV, &cfgs[c], (uint64_t)d);
                if (got != want && mismatches++ < 5)
                    fprintf(stderr, "logits %d, sampling %d, draw %d: %d, the whole sort %d\n", kind, c, d, got, want);
                checked++;
            }
    }
    ck_assert_msg(mismatches == 0, "%d of %d draws differ from the whole sort", mismatches, checked);
    // NaN logits (a broken model's) are never drawn, and the walks stay in bounds
    for (int v = 0; v < NV; v++) l[v] = v % 3 ? NAN : mt_rng_normal(23, (uint64_t)v);
    for (int c = 0; c < ncfg; c++)
        for (int d = 0; d < 10; d++) {
            memcpy(work, l, NV * 4);
            int32_t got = mt_sample(work, NV, &cfgs[c], NULL, 0, (uint64_t)d);
            ck_assert_msg(got >= 0 && got < NV && got % 3 == 0, "sampling %d drew %d (a NaN logit)", c, got);
        }
    free(l), free(work);
}
END_TEST

START_TEST(generation_matches_the_full_forward) {
    for (int variant = 0; variant < 5; variant++) {
        mt_model_config mc;
        float *params = family_params(variant, &mc, 21 + variant);
        int n_params;
        size_t n_values;
        free(mt_model_param_table(&mc, &n_params, &n_values));
        for (size_t i = 0; i < n_values; i++) params[i] += 0.05f * mt_rng_normal(29, i);  // norms away from 1 (or 0)
        const int T = 24;
        mt_generator *g;
        ck_assert_int_eq(mt_generator_init(&g, &mc, params, T), MT_OK);
        mt_backend be;
        ck_assert_int_eq(mt_backend_init(&be, -1), MT_OK);
        mt_model *m;
        ck_assert_int_eq(mt_model_create(&m, &be, &mc, 1, T, 0), MT_OK);
        ck_assert_int_eq(mt_model_set_weights(m, params), MT_OK);
        int32_t seq[24] = {1, 5, 2};
        int n = 3;
        float *logits = malloc((size_t)mc.V * 4), *full = malloc((size_t)T * mc.V * 4);
        mt_sampling greedy = {0.0f, 0, 1.0f, 0.0f, 1.0f, 0};
        for (int i = 0; i < n; i++) ck_assert_int_eq(mt_generator_step(g, seq[i], i == n - 1 ? logits : NULL), MT_OK);
        double worst = 0.0;
        while (n < T) {
            int32_t in[24] = {0};
            memcpy(in, seq, (size_t)n * 4);
            mt_model_logits(m, in, full);  // causal: rows < n see only the sequence so far
            const float *row = full + (size_t)(n - 1) * mc.V;
            for (int v = 0; v < mc.V; v++) {
                double d = fabs(row[v] - logits[v]);
                worst = d > worst ? d : worst;
            }
            int32_t next = mt_sample(logits, mc.V, &greedy, NULL, 0, 0);
            int32_t want = 0;
            for (int v = 1; v < mc.V; v++) want = row[v] > row[want] ? v : want;
            ck_assert_int_eq(next, want);
            seq[n++] = next;
            if (n < T) ck_assert_int_eq(mt_generator_step(g, next, logits), MT_OK);
        }
        ck_assert_msg(worst < 1e-4, "variant %d: logits differ by %g", variant, worst);
        // the backend's decoding (memtune generate on a GPU; here the CPU
        // backend): two rows, the second 5 positions behind after it starts
        // over, each row's logits the full forward's at its position
        // (and with the base streamed, its first layer resident: generate --weights cpu --resident-layers 1,
        // the same logits bit for bit)
        mt_model_options od = {.B = 2, .T = 1, .forward_only = 1, .decode_len = T}, os = od;
        os.stream_weights = 1, os.resident_layers = 1;
        mt_model *dec, *decs;
        ck_assert_int_eq(mt_model_create_with(&dec, &be, &mc, &od), MT_OK);
        ck_assert_int_eq(mt_model_create_with(&decs, &be, &mc, &os), MT_OK);
        ck_assert_int_eq(mt_model_set_weights(dec, params), MT_OK);
        ck_assert_int_eq(mt_model_set_weights(decs, params), MT_OK);
        mt_model_logits(m, seq, full);
        float *two = malloc(2 * (size_t)mc.V * 4), *twos = malloc(2 * (size_t)mc.V * 4);
        double worst_dec = 0.0;
        for (int step = 0; step < T + 5; step++) {
            int32_t pos[2] = {step < T ? step : T - 1, step < 5 ? step : step - 5};
            int32_t tok[2] = {seq[pos[0]], seq[pos[1]]};
            mt_model_decode(dec, tok, pos, two);
            mt_model_decode(decs, tok, pos, twos);
            ck_assert_msg(memcmp(two, twos, 2 * (size_t)mc.V * 4) == 0, "variant %d step %d: streamed decoding differs",
                          variant, step);
            for (int b = 0; b < 2; b++)
                for (int v = 0; v < mc.V; v++)
                    worst_dec = fmax(worst_dec, fabs(two[(size_t)b * mc.V + v] - full[(size_t)pos[b] * mc.V + v]));
        }
        ck_assert_msg(worst_dec < 1e-4, "variant %d: decoding's logits differ by %g", variant, worst_dec);
        mt_model_free(dec), mt_model_free(decs);
        free(two), free(twos);
        ck_assert_int_eq(mt_generator_step(g, 1, logits), MT_OK);         // the cache's last position
        ck_assert_int_eq(mt_generator_step(g, 1, logits), MT_ERR_USAGE);  // past it
        mt_model_free(m);
        mt_backend_free(&be);
        mt_generator_free(g);
        free(params), free(logits), free(full);
    }
    // sampling
    float l[6] = {0.1f, 2.0f, -1.0f, 1.9f, 0.0f, -3.0f}, c[6];
    mt_sampling s = {1.0f, 1, 1.0f, 0.0f, 1.0f, 7};
    memcpy(c, l, sizeof l);
    ck_assert_int_eq(mt_sample(c, 6, &s, NULL, 0, 3), 1);  // top-k 1
    s.top_k = 0, s.top_p = 0.5f;
    int counts[6] = {0};
    for (int d = 0; d < 2000; d++) {
        memcpy(c, l, sizeof l);
        counts[mt_sample(c, 6, &s, NULL, 0, (uint64_t)d)]++;
    }
    ck_assert_int_eq(counts[0] + counts[2] + counts[4] + counts[5], 0);  // top-p 0.5: tokens 1 and 3 only
    // token 1's share: e^2 / (e^2 + e^1.9) = 0.525, within 4 standard deviations of 2000 draws
    ck_assert_msg(fabs(counts[1] / 2000.0 - 0.525) < 0.045, "token 1 drawn %d times of 2000", counts[1]);
    memcpy(c, l, sizeof l);
    int32_t a = mt_sample(c, 6, &s, NULL, 0, 11);
    memcpy(c, l, sizeof l);
    ck_assert_int_eq(mt_sample(c, 6, &s, NULL, 0, 11), a);  // same seed and draw, same token
    // repetition penalty 2: token 1 (2.0 -> 1.0) falls below token 3 (1.9)
    mt_sampling rp = {0.0f, 0, 1.0f, 0.0f, 2.0f, 0};
    uint32_t hist[2] = {1, 1};
    memcpy(c, l, sizeof l);
    ck_assert_int_eq(mt_sample(c, 6, &rp, hist, 2, 0), 3);
    ck_assert_float_eq(c[1], 1.0f);  // once, though seen twice
    // a long history of few ids: each seen id's logit divided (positive) or
    // multiplied (negative) by the penalty exactly once, the rest untouched
    uint32_t longh[500];
    for (int i = 0; i < 500; i++) longh[i] = (uint32_t)(mt_rng_bits(9, (uint64_t)i) % 5);  // ids 0..4
    memcpy(c, l, sizeof l);
    mt_sample(c, 6, &rp, longh, 500, 0);
    for (int v = 0; v < 6; v++) {
        int in = 0;
        for (int i = 0; i < 500; i++) in |= longh[i] == (uint32_t)v;
        float want = !in ? l[v] : l[v] > 0 ? l[v] / 2.0f : l[v] * 2.0f;
        ck_assert_msg(c[v] == want, "logit %d: %g after the penalty, %g expected", v, c[v], want);
    }
    // top-k selects its head without sorting the rest: the same token as the
    // whole sort over logits whose tokens past the k best (ties by id) are
    // -inf, for every draw; logits drawn from few values, so ties cross k
    enum { NV = 3000 };
    float *big = malloc(NV * 4), *work = malloc(NV * 4), *masked = malloc(NV * 4);
    int32_t *rank = malloc(NV * 4);
    for (int v = 0; v < NV; v++) big[v] = (float)(mt_rng_bits(5, (uint64_t)v) % 97) / 9.0f, rank[v] = v;
    for (int i = 1; i < NV; i++)  // insertion sort by (logit desc, id asc): the test's own order
        for (int j = i;
             j > 0 && (big[rank[j]] > big[rank[j - 1]] || (big[rank[j]] == big[rank[j - 1]] && rank[j] < rank[j - 1]));
             j--) {
            int32_t t = rank[j];
            rank[j] = rank[j - 1], rank[j - 1] = t;
        }
    int ks[] = {1, 2, 7, 50, 333, NV - 1};
    for (int t = 0; t < 6; t++) {
        for (int v = 0; v < NV; v++) masked[v] = -INFINITY;
        for (int i = 0; i < ks[t]; i++) masked[rank[i]] = big[rank[i]];
        mt_sampling topk = {0.7f, ks[t], 0.9f, 0.01f, 1.0f, 13}, whole = topk;
        whole.top_k = 0;
        for (int d = 0; d < 40; d++) {
            memcpy(work, big, NV * 4);
            int32_t got = mt_sample(work, NV, &topk, NULL, 0, (uint64_t)d);
            memcpy(work, masked, NV * 4);
            ck_assert_int_eq(got, mt_sample(work, NV, &whole, NULL, 0, (uint64_t)d));
        }
    }
    free(big), free(work), free(masked), free(rank);
}
END_TEST

// Batched decoding (memtune generate on a GPU; here on the CPU backend):
// prompts of different lengths, two rows taking the next prompt as each
// sequence ends, give the texts the fp32 generator gives one by one, greedy
// and sampled, with a stop string; completions arrive in the prompts' order;
// a sequence that outgrows the cache is an error after the ones before it.
typedef struct {
    int count;
    char texts[6][64];
} batch_seen;

static void batch_ready(void *ctx, int i, const char *text) {
    batch_seen *seen = ctx;
    ck_assert_int_eq(i, seen->count);
    snprintf(seen->texts[seen->count++], sizeof seen->texts[0], "%s", text);
}

START_TEST(batched_decoding_gives_the_generators_texts) {
    char folder[300];
    make_folder("gen-batch",
                "{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":258,\"hidden_size\":32,"
                "\"intermediate_size\":48,\"num_hidden_layers\":2,\"num_attention_heads\":4,"
                "\"num_key_value_heads\":2,\"max_position_embeddings\":64,\"rms_norm_eps\":1e-5}",
                folder, sizeof folder);
    mt_model_config mc;
    float *params = random_params(folder, &mc, 41);
    int n_params;
    size_t total;
    free(mt_model_param_table(&mc, &n_params, &total));
    for (size_t i = 0; i < total; i++) params[i] *= 8.0f;  // peaked logits: no near-ties between fp32 paths
    static const char *const texts[] = {"a", "longer prompt here", "xy", "", "Q:", "the end"};
    enum { N = 6, NEW = 12 };
    mt_ids prompts[N] = {{0}};
    for (int i = 0; i < N; i++) mt_generate_prompt(NULL, texts[i], &prompts[i]);
    mt_backend be;
    ck_assert_int_eq(mt_backend_init(&be, -1), MT_OK);
    mt_model_options od = {.B = 2, .T = 1, .forward_only = 1, .decode_len = 40};
    mt_model *m;
    ck_assert_int_eq(mt_model_create_with(&m, &be, &mc, &od), MT_OK);
    ck_assert_int_eq(mt_model_set_weights(m, params), MT_OK);
    for (int sampled = 0; sampled <= 1; sampled++) {
        mt_generate_options o = {.sampling = {sampled ? 1.0f : 0.0f, 0, sampled ? 0.9f : 1.0f, 0.0f, 1.0f, 5},
                                 .max_new = NEW,
                                 .eos = MT_TOKEN_EOS,
                                 .eot = -1,
                                 .stops = {"e"},
                                 .n_stops = sampled};
        batch_seen seen = {0};
        ck_assert_int_eq(mt_generate_batch(m, NULL, prompts, N, &o, NULL, batch_ready, &seen, NULL), MT_OK);
        ck_assert_int_eq(seen.count, N);
        for (int i = 0; i < N; i++) {
            mt_generator *g;
            ck_assert_int_eq(mt_generator_init(&g, &mc, params, 40), MT_OK);
            char *want;
            ck_assert_int_eq(mt_generate_text(g, NULL, &prompts[i], &o, NULL, &want), MT_OK);
            ck_assert_msg(!strcmp(seen.texts[i], want), "%s prompt %d: batched \"%s\", generator \"%s\"",
                          sampled ? "sampled" : "greedy", i, seen.texts[i], want);
            free(want);
            mt_generator_free(g);
        }
    }
    // a cache of 10 positions: the second prompt (19 ids) outgrows it
    mt_model_free(m);
    od.B = 1, od.decode_len = 10;
    ck_assert_int_eq(mt_model_create_with(&m, &be, &mc, &od), MT_OK);
    ck_assert_int_eq(mt_model_set_weights(m, params), MT_OK);
    mt_generate_options o = {.sampling = {0.0f, 0, 1.0f, 0.0f, 1.0f, 0}, .max_new = 3, .eos = -1, .eot = -1};
    batch_seen seen = {0};
    ck_assert_int_eq(mt_generate_batch(m, NULL, prompts, N, &o, NULL, batch_ready, &seen, NULL), MT_ERR_USAGE);
    ck_assert_int_eq(seen.count, 1);
    mt_model_free(m);
    mt_backend_free(&be);
    for (int i = 0; i < N; i++) mt_ids_free(&prompts[i]);
    free(params);
}
END_TEST

// train.sample_every: greedy samples of the model (full, and LoRA over its
// base) in metrics.jsonl at the steps asked, the same text the generator
// gives from the saved model; no prompts is refused before training.
// memtune generate --adapter: the adapter applied on the fly gives the full
// LoRA model's logits, and the same greedy text as the adapter merged into
// the base; with --quantize nf4 the base is QLoRA's (the model with NF4 base
// weights gives the same logits).
START_TEST(generation_applies_adapters_on_the_fly_and_over_nf4) {
    // a Llama, and Phi-3 (fused qkv_proj and gate_up_proj adapters)
    static const char *const phi3 =
        "{\"architectures\":[\"Phi3ForCausalLM\"],\"vocab_size\":13,\"hidden_size\":16,\"intermediate_size\":24,"
        "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"num_key_value_heads\":2,\"rms_norm_eps\":1e-5}";
    for (int family = 0; family < 2; family++) {
        char folder[300];
        make_folder(family ? "gen-lora-phi3" : "gen-lora", family ? phi3 : tu_tiny_llama_json, folder, sizeof folder);
        mt_model_config mc;
        float *params = random_params(folder, &mc, 31);
        mt_lora_config lora = {4, 8.0f, 0.0f, 0, (1u << MT_LORA_MODULES) - 1};
        int na;
        size_t ta;
        mt_param_info *table = mt_lora_param_table(&mc, &lora, &na, &ta);
        free(table);
        float *ad = malloc(ta * 4);
        for (size_t i = 0; i < ta; i++) ad[i] = 0.3f * mt_rng_normal(32, i);  // B non-zero: the adapter matters
        int32_t full_seq[3] = {1, 5, 2};
        enum { T = 40, NEW = T - 3 };
        int n_base;
        size_t total;
        free(mt_model_param_table(&mc, &n_base, &total));
        for (int nf4 = 0; nf4 <= 1; nf4++) {
            float *base = malloc(total * 4), *merged = malloc(total * 4);
            memcpy(base, params, total * 4);
            if (nf4) ck_assert_int_eq(mt_generate_quantize_nf4(&mc, base), MT_OK);
            memcpy(merged, base, total * 4);
            mt_lora_merge(&mc, &lora, merged, ad);
            mt_generator *fly, *folded;
            ck_assert_int_eq(mt_generator_init(&fly, &mc, base, T), MT_OK);
            ck_assert_int_eq(mt_generator_init(&folded, &mc, merged, T), MT_OK);
            mt_generator_set_adapter(fly, &lora, ad);
            // the training model with the same adapters (and NF4 base weights)
            mt_backend be;
            ck_assert_int_eq(mt_backend_init(&be, -1), MT_OK);
            mt_model_options o = {.B = 1, .T = T, .lora = lora, .quantize_nf4 = nf4, .forward_only = 1};
            mt_model *m;
            ck_assert_int_eq(mt_model_create_with(&m, &be, &mc, &o), MT_OK);
            ck_assert_int_eq(mt_model_set_weights(m, params), MT_OK);
            mt_model_set_adapters(m, ad);
            float *lf = malloc((size_t)mc.V * 4), *lm = malloc((size_t)mc.V * 4), *full = malloc((size_t)T * mc.V * 4);
            int32_t seq_fly[T], seq_folded[T];
            memcpy(seq_fly, full_seq, sizeof full_seq), memcpy(seq_folded, full_seq, sizeof full_seq);
            for (int i = 0; i < 3; i++) {
                ck_assert_int_eq(mt_generator_step(fly, full_seq[i], lf), MT_OK);
                ck_assert_int_eq(mt_generator_step(folded, full_seq[i], lm), MT_OK);
            }
            mt_sampling greedy = {0.0f, 0, 1.0f, 0.0f, 1.0f, 0};
            double worst_model = 0, worst_merged = 0;
            for (int n = 3; n < T; n++) {
                for (int v = 0; v < mc.V; v++) worst_merged = fmax(worst_merged, fabs(lf[v] - lm[v]));
                seq_fly[n] = mt_sample(lf, mc.V, &greedy, NULL, 0, 0);
                seq_folded[n] = mt_sample(lm, mc.V, &greedy, NULL, 0, 0);
                if (n + 1 < T) {
                    ck_assert_int_eq(mt_generator_step(fly, seq_fly[n], lf), MT_OK);
                    ck_assert_int_eq(mt_generator_step(folded, seq_folded[n], lm), MT_OK);
                }
            }
            ck_assert_mem_eq(seq_fly, seq_folded, sizeof seq_fly);  // the same greedy text
            mt_model_logits(m, seq_fly, full);
            mt_generator_reset(fly);
            for (int n = 0; n < T; n++) {
                ck_assert_int_eq(mt_generator_step(fly, seq_fly[n], lf), MT_OK);
                for (int v = 0; v < mc.V; v++)
                    worst_model = fmax(worst_model, fabs(lf[v] - full[(size_t)n * mc.V + v]));
            }
            ck_assert_msg(worst_model < 1e-4 && worst_merged < 1e-4,
                          "%s: on the fly vs the LoRA model %g, vs merged %g (logits)", nf4 ? "nf4" : "bf16",
                          worst_model, worst_merged);
            // the NF4 round trip changed the base (so the check above is QLoRA's)
            if (nf4) ck_assert(memcmp(base, params, total * 4) != 0);
            mt_model_free(m);
            mt_backend_free(&be);
            mt_generator_free(fly), mt_generator_free(folded);
            free(base), free(merged), free(lf), free(lm), free(full);
        }
        free(params), free(ad);
    }
}
END_TEST

START_TEST(training_samples_its_text) {
    char folder[300], data[300], out[300], path[400];
    make_folder("sample-model",
                "{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":258,\"hidden_size\":16,"
                "\"intermediate_size\":24,\"num_hidden_layers\":2,\"num_attention_heads\":2,\"num_key_value_heads\":1,"
                "\"max_position_embeddings\":128,\"rms_norm_eps\":1e-5}",
                folder, sizeof folder);
    snprintf(data, sizeof data, "%s/sample.h5", dir);
    uint64_t n = 4000;
    uint32_t *tok = malloc(n * 4);
    for (uint64_t i = 0; i < n; i++) tok[i] = (uint32_t)('a' + i % 7);
    uint64_t offsets[2] = {0, n};
    ck_assert_int_eq(mt_dataset_write(data, tok, n, offsets, 1, NULL, 258, "test"), MT_OK);
    free(tok);
    for (int run = 0; run < 3; run++) {  // full, LoRA, QLoRA
        int lora = run > 0, nf4 = run == 2;
        snprintf(out, sizeof out, "%s/sample-run-%d", dir, run);
        mt_config cfg;
        base_config(&cfg, folder, data, out, "4", "16");
        ck_assert_int_eq(mt_config_set(&cfg, "optim.warmup_steps", "0", "t"), MT_OK);
        // enough to move the text off the untrained model's bytes above 0x7f
        // (which all read back as U+FFFD and would make texts compare equal)
        ck_assert_int_eq(mt_config_set(&cfg, "optim.lr", "0.01", "t"), MT_OK);
        ck_assert_int_eq(mt_config_set(&cfg, "train.sample_every", "2", "t"), MT_OK);
        if (lora) ck_assert_int_eq(mt_config_set(&cfg, "lora.r", "4", "t"), MT_OK);
        if (nf4) ck_assert_int_eq(mt_config_set(&cfg, "model.quantize", "nf4", "t"), MT_OK);
        mt_train_result r;
        tu_expect_error(mt_train(&cfg, &r), MT_ERR_CONFIG, "train.sample_prompts is empty");
        ck_assert_int_eq(mt_config_set(&cfg, "train.sample_prompts", "abc|de", "t"), MT_OK);
        ck_assert_int_eq(mt_config_set(&cfg, "train.sample_tokens", "6", "t"), MT_OK);
        ck_assert_int_eq(mt_train(&cfg, &r), MT_OK);
        snprintf(path, sizeof path, "%s/metrics.jsonl", out);
        FILE *f = fopen(path, "r");
        ck_assert_ptr_nonnull(f);
        char line[512];
        int samples = 0, last_step = 0;
        char last_text[256] = "";
        while (fgets(line, sizeof line, f)) {
            cJSON *rec = cJSON_Parse(line);
            ck_assert_ptr_nonnull(rec);
            const cJSON *text = cJSON_GetObjectItemCaseSensitive(rec, "sample");
            if (cJSON_IsString(text)) {
                samples++;
                const cJSON *prompt = cJSON_GetObjectItemCaseSensitive(rec, "sample_prompt");
                ck_assert_str_eq(prompt->valuestring, samples % 2 ? "abc" : "de");
                last_step = cJSON_GetObjectItemCaseSensitive(rec, "step")->valueint;
                if (samples == 5) snprintf(last_text, sizeof last_text, "%s", text->valuestring);
            }
            cJSON_Delete(rec);
        }
        fclose(f);
        ck_assert_int_eq(samples, 6);  // before training, steps 2 and 4, two prompts each
        ck_assert_int_eq(last_step, 4);
        // the text of step 4 for "abc" is the saved model's greedy text, as
        // recorded (valid UTF-8): the adapter on the fly over the base as
        // initialised (QLoRA: its NF4 round trip), as memtune generate
        // --adapter [--quantize nf4] gives it. (The round trip does not
        // change this small model's greedy text: the QLoRA run checks the
        // path, not that the base was rounded.)
        mt_model_config mc;
        float *values = random_params(folder, &mc, 0), *ad = NULL;
        mt_lora_config lc;
        char saved[400];
        snprintf(saved, sizeof saved, "%s/%s", out, lora ? "adapter" : "model");
        if (lora) {
            mt_model_init_random(&mc, values, (uint64_t)cfg.train_seed);
            if (nf4) ck_assert_int_eq(mt_generate_quantize_nf4(&mc, values), MT_OK);
            ck_assert_int_eq(mt_lora_read_folder(saved, &mc, &lc, &ad), MT_OK);
        } else {
            ck_assert_int_eq(mt_hf_load_weights(saved, &mc, values), MT_OK);
        }
        mt_generator *g;
        ck_assert_int_eq(mt_generator_init(&g, &mc, values, 16), MT_OK);
        if (lora) mt_generator_set_adapter(g, &lc, ad);
        float *logits = malloc((size_t)mc.V * 4);
        int32_t prompt[4] = {256, 'a', 'b', 'c'};
        for (int k = 0; k < 4; k++) ck_assert_int_eq(mt_generator_step(g, prompt[k], logits), MT_OK);
        char raw[16] = "";
        size_t n_raw = 0;
        mt_sampling greedy = {0.0f, 0, 1.0f, 0.0f, 1.0f, 0};
        for (int k = 0; k < 6; k++) {
            int32_t next = mt_sample(logits, mc.V, &greedy, NULL, 0, 0);
            if (next == 257) break;
            if (next < 256) raw[n_raw++] = (char)next;
            ck_assert_int_eq(mt_generator_step(g, next, logits), MT_OK);
        }
        size_t want_len;
        char *want = mt_utf8_sanitize(raw, n_raw, &want_len);
        ck_assert_msg(!strcmp(last_text, want), "step 4 sampled '%s', the saved model gives '%s'", last_text, want);
        free(want);
        mt_generator_free(g);
        free(logits), free(values), free(ad);
        mt_config_free(&cfg);
    }
}
END_TEST

// ------------------------------------------------------------- checkpoints

// The "loss" of every record of a metrics.jsonl, by step (losses[step - 1]).

static void checkpoint_config(mt_config *cfg, const char *folder, const char *data, const char *out) {
    mt_config_defaults(cfg);
    ck_assert_int_eq(mt_config_set(cfg, "model.path", folder, "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(cfg, "model.init", "random", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(cfg, "data.train", data, "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(cfg, "output.dir", out, "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(cfg, "train.steps", "14", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(cfg, "train.seq_len", "16", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(cfg, "train.grad_accum", "2", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(cfg, "train.device", "cpu", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(cfg, "train.eval_every", "4", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(cfg, "optim.warmup_steps", "3", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(cfg, "optim.weight_decay", "0.1", "t"), MT_OK);
}

START_TEST(resume_is_bit_identical) {
    char data[300], folder[300], whole[300], split[300], path[400];
    random_dataset(data, sizeof data, "resume.h5", 30000, 17);
    make_folder("resume-model", tu_tiny_llama_json, folder, sizeof folder);
    snprintf(whole, sizeof whole, "%s/whole", dir);
    snprintf(split, sizeof split, "%s/split", dir);
    mt_config cfg;
    mt_train_result r;
    // 14 steps in one go
    checkpoint_config(&cfg, folder, data, whole);
    ck_assert_int_eq(mt_train(&cfg, &r), MT_OK);
    mt_config_free(&cfg);
    double expect[14], got[14];
    ck_assert_int_eq(tu_read_losses(whole, expect, 14), 14);
    // the same run in three shifts: 5 steps, 4 steps, the rest
    checkpoint_config(&cfg, folder, data, split);
    ck_assert_int_eq(mt_config_set(&cfg, "train.stop_after", "5", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "checkpoint.every", "2", "t"), MT_OK);
    ck_assert_int_eq(mt_train(&cfg, &r), MT_OK);
    ck_assert(r.stopped_early);
    ck_assert_int_eq(r.steps_done, 5);
    // keep 2: steps 2 and 4 and 5 were written, 4 and 5 remain; no model yet
    snprintf(path, sizeof path, "%s/checkpoints/step-00000002", split);
    ck_assert_int_ne(access(path, F_OK), 0);
    snprintf(path, sizeof path, "%s/checkpoints/step-00000005/state.h5", split);
    ck_assert_int_eq(access(path, R_OK), 0);
    snprintf(path, sizeof path, "%s/model", split);
    ck_assert_int_ne(access(path, F_OK), 0);
    ck_assert_int_eq(mt_config_set(&cfg, "train.resume", "auto", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "train.stop_after", "4", "t"), MT_OK);
    ck_assert_int_eq(mt_train(&cfg, &r), MT_OK);
    ck_assert_int_eq(r.steps_done, 9);
    // a leftover temporary folder (a crash while writing) is never taken for a checkpoint
    snprintf(path, sizeof path, "%s/checkpoints/.step-00000013.tmp.1", split);
    ck_assert_int_eq(mkdir(path, 0755), 0);
    ck_assert_int_eq(mt_config_set(&cfg, "train.stop_after", "0", "t"), MT_OK);
    ck_assert_int_eq(mt_train(&cfg, &r), MT_OK);
    ck_assert_int_eq(r.steps_done, 14);
    ck_assert_int_eq(tu_read_losses(split, got, 14), 14);
    for (int i = 0; i < 14; i++)
        ck_assert_msg(got[i] == expect[i], "step %d: %.17g != %.17g", i + 1, got[i], expect[i]);
    // the final weights are bit-identical too
    mt_model_config mc;
    ck_assert_int_eq(mt_hf_read_config(folder, &mc), MT_OK);
    int np;
    size_t total;
    free(mt_model_param_table(&mc, &np, &total));
    float *a = malloc(total * 4), *b = malloc(total * 4);
    snprintf(path, sizeof path, "%s/model", whole);
    ck_assert_int_eq(mt_hf_load_weights(path, &mc, a), MT_OK);
    snprintf(path, sizeof path, "%s/model", split);
    ck_assert_int_eq(mt_hf_load_weights(path, &mc, b), MT_OK);
    ck_assert_mem_eq(a, b, total * 4);
    free(a), free(b);
    // resuming with other training settings is refused; a finished run has nothing left
    ck_assert_int_eq(mt_config_set(&cfg, "train.steps", "20", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "optim.lr", "1e-3", "t"), MT_OK);
    tu_expect_error(mt_train(&cfg, &r), MT_ERR_CONFIG, "different configuration");
    ck_assert_int_eq(mt_config_set(&cfg, "train.steps", "14", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "optim.lr", "3e-4", "t"), MT_OK);
    tu_expect_error(mt_train(&cfg, &r), MT_ERR_CONFIG, "nothing left to train");
    ck_assert_int_eq(mt_config_set(&cfg, "train.resume", "/nonexistent/step-1", "t"), MT_OK);
    tu_expect_error(mt_train(&cfg, &r), MT_ERR_IO, "no readable state.h5");
    mt_config_free(&cfg);
    // the runs above wrote their checkpoints in the background (checkpoint.async, the default); written
    // in place they hold the same values
    char sync[300];
    snprintf(sync, sizeof sync, "%s/whole-sync", dir);
    checkpoint_config(&cfg, folder, data, sync);
    ck_assert_int_eq(mt_config_set(&cfg, "checkpoint.async", "false", "t"), MT_OK);
    ck_assert_int_eq(mt_train(&cfg, &r), MT_OK);
    mt_config_free(&cfg);
    float *wa = malloc(total * 4), *ma = malloc(total * 4), *va = malloc(total * 4);
    float *wb = malloc(total * 4), *mb = malloc(total * 4), *vb = malloc(total * 4);
    mt_checkpoint_meta ka, kb;
    snprintf(path, sizeof path, "%s/checkpoints/step-00000014", whole);
    ck_assert_int_eq(mt_checkpoint_read(path, &mc, NULL, wa, 0, total, ma, va, &ka), MT_OK);
    snprintf(path, sizeof path, "%s/checkpoints/step-00000014", sync);
    ck_assert_int_eq(mt_checkpoint_read(path, &mc, NULL, wb, 0, total, mb, vb, &kb), MT_OK);
    ck_assert_mem_eq(wa, wb, total * 4);
    ck_assert_mem_eq(ma, mb, total * 4);
    ck_assert_mem_eq(va, vb, total * 4);
    ck_assert(ka.step == kb.step && ka.optimizer_steps == kb.optimizer_steps && ka.data_batch == kb.data_batch);
    free(wa), free(ma), free(va), free(wb), free(mb), free(vb);
}
END_TEST

// QLoRA with dropout: a run split in two shifts matches the whole run, and
// both end with the same PEFT adapter (and no full model).
START_TEST(lora_resume_is_bit_identical) {
    char data[300], folder[300], whole[300], split[300], path[400];
    snprintf(data, sizeof data, "%s/resume.h5", dir);
    make_folder("resume-lora-model", tu_tiny_llama_json, folder, sizeof folder);
    snprintf(whole, sizeof whole, "%s/lora-whole", dir);
    snprintf(split, sizeof split, "%s/lora-split", dir);
    mt_config cfg;
    mt_train_result r;
    double expect[14];
    for (int shift = 0; shift < 3; shift++) {
        checkpoint_config(&cfg, folder, data, shift ? split : whole);
        ck_assert_int_eq(mt_config_set(&cfg, "lora.r", "4", "t"), MT_OK);
        ck_assert_int_eq(mt_config_set(&cfg, "lora.dropout", "0.2", "t"), MT_OK);
        ck_assert_int_eq(mt_config_set(&cfg, "optim.lr", "1e-2", "t"), MT_OK);
        ck_assert_int_eq(mt_config_set(&cfg, "model.quantize", "nf4", "t"), MT_OK);
        if (shift == 1) ck_assert_int_eq(mt_config_set(&cfg, "train.stop_after", "6", "t"), MT_OK);
        if (shift == 2) ck_assert_int_eq(mt_config_set(&cfg, "train.resume", "auto", "t"), MT_OK);
        ck_assert_int_eq(mt_train(&cfg, &r), MT_OK);
        ck_assert_int_eq(r.steps_done, shift == 1 ? 6 : 14);
        mt_config_free(&cfg);
    }
    tu_assert_same_losses(whole, split, 14, expect);
    // the updates landed: every lora_B starts at zero and is not zero now (the
    // loss of this tiny model moves by noise alone over 14 steps)
    mt_safetensors *st;
    snprintf(path, sizeof path, "%s/adapter/adapter_model.safetensors", whole);
    ck_assert_int_eq(mt_safetensors_open(&st, path), MT_OK);
    int trained_b = 0;
    for (int i = 0; i < mt_safetensors_count(st); i++) {
        const mt_st_tensor *t = mt_safetensors_get(st, i);
        if (!strstr(t->name, "lora_B")) continue;
        size_t count = (size_t)t->shape[0] * (size_t)t->shape[1];
        float *v = malloc(count * 4);
        ck_assert_int_eq(mt_safetensors_read_f32(st, t, v), MT_OK);
        double sum = 0;
        for (size_t k = 0; k < count; k++) sum += fabs(v[k]);
        ck_assert_msg(sum > 0, "%s is still zero", t->name);
        trained_b++;
        free(v);
    }
    mt_safetensors_close(st);
    ck_assert_int_gt(trained_b, 0);
    snprintf(path, sizeof path, "%s/checkpoints/step-00000006/adapter/adapter_model.safetensors", split);
    ck_assert_int_eq(access(path, R_OK), 0);
    snprintf(path, sizeof path, "%s/model", whole);
    ck_assert_int_ne(access(path, F_OK), 0);
    FILE *fa, *fb;
    snprintf(path, sizeof path, "%s/adapter/adapter_model.safetensors", whole);
    ck_assert_ptr_nonnull(fa = fopen(path, "rb"));
    snprintf(path, sizeof path, "%s/adapter/adapter_model.safetensors", split);
    ck_assert_ptr_nonnull(fb = fopen(path, "rb"));
    int ca, cb, same = 1;
    long bytes = 0;
    do {
        ca = fgetc(fa), cb = fgetc(fb), same &= ca == cb, bytes++;
    } while (ca != EOF && cb != EOF);
    fclose(fa), fclose(fb);
    ck_assert(same && bytes > 1000);
}
END_TEST

// lora.init: training starts from a PEFT adapter folder (with lr 0 the saved
// adapter is that adapter); one whose r differs from lora.r is refused.
START_TEST(lora_starts_from_an_adapter_folder) {
    char data[300], folder[300], adapter[300], run[300], path[400];
    snprintf(data, sizeof data, "%s/resume.h5", dir);
    make_folder("init-lora-model", tu_tiny_llama_json, folder, sizeof folder);
    mt_model_config mc;
    ck_assert_int_eq(mt_hf_read_config(folder, &mc), MT_OK);
    mt_lora_config lora = {4, 16.0f, 0.05f, 0, 0};
    ck_assert_int_eq(mt_lora_parse_targets("all-linear", &lora.targets), MT_OK);
    int n;
    size_t total;
    mt_param_info *table = mt_lora_param_table(&mc, &lora, &n, &total);
    float *init = calloc(total, 4), *back = calloc(total, 4);
    for (size_t i = 0; i < total; i++) init[i] = 0.05f * mt_rng_normal(31, i);
    snprintf(adapter, sizeof adapter, "%s/init-adapter", dir);
    ck_assert_int_eq(mt_lora_save(adapter, &lora, folder, table, n, init), MT_OK);
    snprintf(run, sizeof run, "%s/init-run", dir);
    mt_config cfg;
    mt_train_result r;
    checkpoint_config(&cfg, folder, data, run);
    ck_assert_int_eq(mt_config_set(&cfg, "lora.r", "4", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "lora.init", adapter, "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "optim.lr", "0", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "train.steps", "4", "t"), MT_OK);
    ck_assert_int_eq(mt_train(&cfg, &r), MT_OK);
    snprintf(path, sizeof path, "%s/adapter", run);
    ck_assert_int_eq(mt_lora_load(path, &mc, &lora, back), MT_OK);
    for (int i = 0; i < n; i++) ck_assert_mem_eq(back + table[i].offset, init + table[i].offset, table[i].count * 4);
    ck_assert_int_eq(mt_config_set(&cfg, "lora.r", "8", "t"), MT_OK);
    snprintf(path, sizeof path, "%s/init-run-refused", dir);
    ck_assert_int_eq(mt_config_set(&cfg, "output.dir", path, "t"), MT_OK);
    tu_expect_error(mt_train(&cfg, &r), MT_ERR_CONFIG, "set lora.* to the adapter's values");
    ck_assert_int_ne(access(path, F_OK), 0);  // refused before anything was written
    mt_config_free(&cfg);
    free(table), free(init), free(back);
}
END_TEST

// A multimodal Gemma 3 folder (Gemma3ForConditionalGeneration, the
// language model under "language_model.model." as transformers 4.50 saved it,
// a vision tower and a projector beside it): memtune trains its language
// model, writes it back under the same names with the other tensors
// unchanged, and names a LoRA adapter's tensors as PEFT does on that model.
START_TEST(multimodal_gemma3_folder_round_trip) {
    char folder[300], data[300], run[300], path[400];
    make_folder(
        "gemma3-mm",
        "{\"architectures\":[\"Gemma3ForConditionalGeneration\"],\"model_type\":\"gemma3\","
        "\"torch_dtype\":\"float32\",\"vision_config\":{\"hidden_size\":8},\"text_config\":{"
        "\"vocab_size\":13,\"hidden_size\":16,\"intermediate_size\":24,\"num_hidden_layers\":2,"
        "\"num_attention_heads\":2,\"num_key_value_heads\":1,\"head_dim\":8,\"query_pre_attn_scalar\":8,"
        "\"sliding_window\":4,\"sliding_window_pattern\":2,\"rope_local_base_freq\":100.0,\"rope_theta\":1000.0}}",
        folder, sizeof folder);
    mt_model_config mc;
    ck_assert_int_eq(mt_hf_read_config(folder, &mc), MT_OK);  // no weights yet: the newer prefix
    ck_assert(mc.multimodal && mc.gemma && mc.tie_embeddings && mc.D == 8 && mc.global_every == 2);
    ck_assert_str_eq(mc.text_prefix, "model.language_model.");
    int n;
    size_t total;
    mt_param_info *table = mt_model_param_table(&mc, &n, &total);
    float *params = malloc(total * 4), vision[15], proj[16];
    mt_model_init_random(&mc, params, 5);
    for (int i = 0; i < 15; i++) vision[i] = 0.01f * (float)i;
    for (int i = 0; i < 16; i++) proj[i] = -0.5f + 0.03f * (float)i;
    mt_st_write_tensor *t = calloc((size_t)n + 2, sizeof *t);
    char(*names)[300] = calloc((size_t)n, sizeof *names);
    for (int i = 0; i < n; i++) {
        snprintf(names[i], sizeof names[i], "language_model.model.%s", table[i].name + strlen("model."));
        t[i] = (mt_st_write_tensor){
            names[i], table[i].ndim, {table[i].shape[0], table[i].shape[1]}, params + table[i].offset};
    }
    t[n] = (mt_st_write_tensor){"vision_tower.vision_model.w", 2, {3, 5}, vision};
    t[n + 1] = (mt_st_write_tensor){"multi_modal_projector.mm_input_projection_weight", 2, {4, 4}, proj};
    snprintf(path, sizeof path, "%s/model.safetensors", folder);
    ck_assert_int_eq(mt_safetensors_write(path, t, n + 2, MT_DTYPE_F32, "pt"), MT_OK);
    free(t), free(names);
    ck_assert_int_eq(mt_hf_read_config(folder, &mc), MT_OK);
    ck_assert_str_eq(mc.text_prefix, "language_model.model.");
    float *back = calloc(total, 4);  // the table's alignment padding stays 0, as in params
    ck_assert_int_eq(mt_hf_load_weights(folder, &mc, back), MT_OK);
    ck_assert_mem_eq(back, params, total * 4);
    // train it (full, then LoRA) from the folder
    random_dataset(data, sizeof data, "mm.h5", 3000, 23);
    snprintf(run, sizeof run, "%s/mm-run", dir);
    mt_config cfg;
    mt_train_result r;
    base_config(&cfg, folder, data, run, "3", "8");
    ck_assert_int_eq(mt_config_set(&cfg, "model.init", "pretrained", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "optim.warmup_steps", "0", "t"), MT_OK);
    ck_assert_int_eq(mt_train(&cfg, &r), MT_OK);
    snprintf(path, sizeof path, "%s/model", run);
    mt_model_config saved;
    ck_assert_int_eq(mt_hf_read_config(path, &saved), MT_OK);
    ck_assert(saved.multimodal);
    ck_assert_str_eq(saved.text_prefix, "language_model.model.");
    ck_assert_int_eq(mt_hf_load_weights(path, &saved, back), MT_OK);
    ck_assert(memcmp(back, params, total * 4) != 0);  // trained
    snprintf(path, sizeof path, "%s/model/model.safetensors", run);
    mt_safetensors *st;
    ck_assert_int_eq(mt_safetensors_open(&st, path), MT_OK);
    ck_assert_int_eq(mt_safetensors_count(st), n + 2);
    const mt_st_tensor *v = mt_safetensors_find(st, "vision_tower.vision_model.w");
    const mt_st_tensor *pj = mt_safetensors_find(st, "multi_modal_projector.mm_input_projection_weight");
    ck_assert(v && pj && !mt_safetensors_find(st, "model.layers.0.input_layernorm.weight"));
    float got[16];
    ck_assert_int_eq(mt_safetensors_read_f32(st, v, got), MT_OK);
    ck_assert_mem_eq(got, vision, sizeof vision);
    ck_assert_int_eq(mt_safetensors_read_f32(st, pj, got), MT_OK);
    ck_assert_mem_eq(got, proj, sizeof proj);
    mt_safetensors_close(st);
    mt_config_free(&cfg);
    snprintf(run, sizeof run, "%s/mm-lora", dir);
    base_config(&cfg, folder, data, run, "3", "8");
    ck_assert_int_eq(mt_config_set(&cfg, "model.init", "pretrained", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "optim.warmup_steps", "0", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "lora.r", "2", "t"), MT_OK);
    ck_assert_int_eq(mt_train(&cfg, &r), MT_OK);
    snprintf(path, sizeof path, "%s/adapter/adapter_model.safetensors", run);
    ck_assert_int_eq(mt_safetensors_open(&st, path), MT_OK);
    ck_assert_ptr_nonnull(
        mt_safetensors_find(st, "base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    mt_safetensors_close(st);
    mt_config_free(&cfg);
    free(params), free(back), free(table);
}
END_TEST

START_TEST(checkpoint_on_a_full_disk_leaves_the_last_one_intact) {
    mt_model_config mc;
    char folder[300], run[300], path[400];
    make_folder("full-disk-model", tu_tiny_llama_json, folder, sizeof folder);
    ck_assert_int_eq(mt_hf_read_config(folder, &mc), MT_OK);
    int np;
    size_t total;
    free(mt_model_param_table(&mc, &np, &total));
    float *w = calloc(total, 4), *m = calloc(total, 4), *v = calloc(total, 4);
    mt_model_init_random(&mc, w, 3);
    snprintf(run, sizeof run, "%s/full-disk-run", dir);
    mt_checkpoint_meta meta = {3, 0, 7, 3, 42, 0};
    ck_assert_int_eq(mt_checkpoint_write(run, NULL, &mc, NULL, w, m, v, NULL, 0, &meta, 2), MT_OK);
    // a file size limit makes every write past 4 KiB fail with EFBIG, as a full disk would
    struct rlimit old, tight = {4096, 0};
    ck_assert_int_eq(getrlimit(RLIMIT_FSIZE, &old), 0);
    tight.rlim_max = old.rlim_max;
    signal(SIGXFSZ, SIG_IGN);
    ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &tight), 0);
    meta.step = 4;
    mt_err err = mt_checkpoint_write(run, NULL, &mc, NULL, w, m, v, NULL, 0, &meta, 2);
    ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &old), 0);
    ck_assert_int_eq(err, MT_ERR_IO);
    // the newest complete checkpoint is still step 3, and nothing half-written is left
    mt_checkpoint_find_latest(run, path, sizeof path);
    ck_assert_ptr_nonnull(strstr(path, "step-00000003"));
    float *w2 = calloc(total, 4), *m2 = calloc(total, 4), *v2 = calloc(total, 4);
    mt_checkpoint_meta back;
    ck_assert_int_eq(mt_checkpoint_read(path, &mc, NULL, w2, 0, total, m2, v2, &back), MT_OK);
    ck_assert_int_eq(back.step, 3);
    ck_assert_uint_eq(back.data_batch, 7);
    ck_assert_mem_eq(w2, w, total * 4);
    snprintf(path, sizeof path, "%s/checkpoints", run);
    DIR *d = opendir(path);
    ck_assert_ptr_nonnull(d);
    struct dirent *e;
    int entries = 0;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.' || strncmp(e->d_name, ".step-", 6) == 0) {
            ck_assert_msg(strncmp(e->d_name, ".step-", 6) != 0, "temporary folder %s left behind", e->d_name);
            entries++;
        }
    closedir(d);
    ck_assert_int_eq(entries, 1);
    free(w), free(m), free(v), free(w2), free(m2), free(v2);
    // a checkpoint that fails on the background thread fails the run at the next wait, and leaves nothing
    char data[300];
    random_dataset(data, sizeof data, "full-disk.h5", 4000, 19);
    snprintf(run, sizeof run, "%s/full-disk-async", dir);
    mt_config cfg;
    base_config(&cfg, folder, data, run, "4", "16");
    ck_assert_int_eq(mt_config_set(&cfg, "checkpoint.every", "2", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "optim.warmup_steps", "0", "t"), MT_OK);
    tight.rlim_cur = 8192;  // the run's small files fit; a checkpoint's weights do not
    ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &tight), 0);
    mt_train_result r;
    err = mt_train(&cfg, &r);
    ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &old), 0);
    ck_assert_int_eq(err, MT_ERR_IO);
    ck_assert_int_eq(r.steps_done, 4);  // stopped at the next checkpoint (step 4), which waited for the failed one
    snprintf(path, sizeof path, "%s/checkpoints", run);
    d = opendir(path);
    entries = 0;
    while (d && (e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) entries++;
    if (d) closedir(d);
    ck_assert_int_eq(entries, 0);
    mt_config_free(&cfg);
}
END_TEST

// Sharded checkpoints (ZeRO): 3 "ranks" write their shards of the moments,
// rank 0 publishes; any range reads back the written values, from the shards
// and from an unsharded checkpoint of the same state; a missing shard is named.
START_TEST(sharded_checkpoint_reads_any_range) {
    mt_model_config mc;
    char folder[300], run[300], tmp[1300], path[1400];
    make_folder("sharded-model", tu_tiny_llama_json, folder, sizeof folder);
    ck_assert_int_eq(mt_hf_read_config(folder, &mc), MT_OK);
    int np;
    size_t total;
    mt_param_info *table = mt_model_param_table(&mc, &np, &total);
    float *w = calloc(total, 4), *m = calloc(total, 4), *v = calloc(total, 4);
    mt_model_init_random(&mc, w, 5);
    // moments in the parameters only (the alignment gaps read back as 0)
    for (int i = 0; i < np; i++)
        for (size_t j = 0; j < table[i].count; j++) {
            m[table[i].offset + j] = (float)(i + 1) + 1e-3f * (float)j;
            v[table[i].offset + j] = 1.0f / (float)(j + 1 + i);
        }
    snprintf(run, sizeof run, "%s/sharded-run", dir);
    mt_checkpoint_meta meta = {6, 1, 2, 6, 99, 0};
    ck_assert_int_eq(mt_checkpoint_write(run, NULL, &mc, NULL, w, m, v, NULL, 0, &meta, 5), MT_OK);
    meta.step = 7;
    ck_assert_int_eq(mt_checkpoint_prepare(run, meta.step, 1234, tmp, sizeof tmp), MT_OK);
    size_t cut[4] = {0, total / 3 & ~(size_t)15, 2 * total / 3 & ~(size_t)15, total};
    for (int r = 0; r < 3; r++)
        ck_assert_int_eq(
            mt_checkpoint_write_shard(tmp, r, 3, cut[r], cut[r + 1], total, m + cut[r], v + cut[r], NULL, 0), MT_OK);
    meta.shards = 3;
    ck_assert_int_eq(mt_checkpoint_publish(tmp, run, NULL, &mc, NULL, w, NULL, NULL, NULL, 0, &meta, 5), MT_OK);
    mt_checkpoint_find_latest(run, path, sizeof path);
    ck_assert_ptr_nonnull(strstr(path, "step-00000007"));
    size_t ranges[][2] = {{0, total}, {0, total / 2}, {total / 2, total}, {cut[1] - 5, cut[2] + 7}, {3, 4}};
    for (int step = 6; step <= 7; step++)
        for (int k = 0; k < 5; k++) {
            size_t lo = ranges[k][0], hi = ranges[k][1];
            float *w2 = calloc(total, 4), *m2 = malloc((hi - lo) * 4), *v2 = malloc((hi - lo) * 4);
            mt_checkpoint_meta back;
            snprintf(path, sizeof path, "%s/checkpoints/step-%08d", run, step);
            ck_assert_int_eq(mt_checkpoint_read(path, &mc, NULL, w2, lo, hi, m2, v2, &back), MT_OK);
            ck_assert_int_eq(back.shards, step == 7 ? 3 : 0);
            ck_assert_mem_eq(w2, w, total * 4);
            ck_assert_msg(memcmp(m2, m + lo, (hi - lo) * 4) == 0 && memcmp(v2, v + lo, (hi - lo) * 4) == 0,
                          "step %d, range [%zu, %zu): moments differ", step, lo, hi);
            free(w2), free(m2), free(v2);
        }
    // a shard gone: the error names it
    snprintf(path, sizeof path, "%s/checkpoints/step-00000007/state-rank-00001-of-00003.h5", run);
    ck_assert_int_eq(unlink(path), 0);
    snprintf(path, sizeof path, "%s/checkpoints/step-00000007", run);
    float *m2 = malloc(total * 4), *v2 = malloc(total * 4);
    mt_checkpoint_meta back;
    ck_assert_int_eq(mt_checkpoint_read(path, &mc, NULL, w, 0, total, m2, v2, &back), MT_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(mt_last_error(), "state-rank-00001-of-00003.h5: missing"));
    free(m2), free(v2), free(w), free(m), free(v), free(table);
}
END_TEST

int main(void) {
    tu_tempdir(dir, sizeof dir);
    Suite *s = suite_create("trainer");
    TCase *tc = tcase_create("trainer");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, config_yaml_set_and_errors);
    tcase_add_test(tc, config_docs_are_generated_from_the_table);
    tcase_add_test(tc, safetensors_round_trip_and_malformed);
    tcase_add_test(tc, hf_config_checks);
    tcase_add_test(tc, model_gradients_match_finite_differences);
    tcase_add_test(tc, packed_documents_train_like_each_document_alone);
    tcase_add_test(tc, save_and_load_round_trip);
    tcase_add_test(tc, training_reduces_loss_and_saves);
    tcase_add_test(tc, loss_is_the_mean_over_the_steps_trained_tokens);
    tcase_add_test(tc, eval_matches_logits_and_adapter);
    tcase_add_test(tc, generation_matches_the_full_forward);
    tcase_add_test(tc, sampling_equals_the_whole_sort);
    tcase_add_test(tc, generation_applies_adapters_on_the_fly_and_over_nf4);
    tcase_add_test(tc, batched_decoding_gives_the_generators_texts);
    tcase_add_test(tc, tiled_mlp_equals_untiled);
    tcase_add_test(tc, loss_over_logit_chunks_equals_the_sequences_alone);
    tcase_add_test(tc, a_base_set_a_layer_at_a_time_equals_the_whole_copy);
    tcase_add_test(tc, training_samples_its_text);
    tcase_add_test(tc, resume_is_bit_identical);
    tcase_add_test(tc, lora_resume_is_bit_identical);
    tcase_add_test(tc, lora_starts_from_an_adapter_folder);
    tcase_add_test(tc, checkpoint_on_a_full_disk_leaves_the_last_one_intact);
    tcase_add_test(tc, multimodal_gemma3_folder_round_trip);
    tcase_add_test(tc, sharded_checkpoint_reads_any_range);
    suite_add_tcase(s, tc);
    return tu_run_suite(s, 0);
}
