// tests/test_model_gpu.c: the whole model on the GPU (bf16) against the CPU
// reference (fp32) on the same weights and batch: loss, logits and every
// parameter's gradient; checkpointing; and a short GPU training run.
// Run with CK_FORK=no; exits 77 without a GPU.
#include <check.h>
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/device.h"
#include "kernels/dtype.h"
#include "kernels/mem.h"
#include "kernels/nf4.h"
#include "kernels/rng.h"
#include "offload/offload.h"
#include "optim/galore.h"
#include "optim/mezo.h"
#include "testutil.h"
#include "trainer/config.h"
#include "trainer/lora.h"
#include "trainer/model.h"
#include "trainer/train.h"

static double cosine(const float *a, const float *b, size_t n) {
    double ab = 0, aa = 0, bb = 0;
    for (size_t i = 0; i < n; i++) ab += (double)a[i] * b[i], aa += (double)a[i] * a[i], bb += (double)b[i] * b[i];
    return ab / (sqrt(aa * bb) + 1e-30);
}

// Two training steps of a LoRA model from the given base and adapters (the
// second with inputs and targets swapped), its dropout seeded: the losses,
// and the adapters' gradients summed over both (malloc'd host copy).
static float *two_lora_steps(mt_model *m, const float *params, const float *adapters, uint64_t dropout_seed,
                             const int32_t *in, const int32_t *tg, int N, double loss[2]) {
    ck_assert_int_eq(mt_model_set_weights(m, params), MT_OK);
    mt_model_set_adapters(m, adapters);
    mt_model_set_dropout_seed(m, dropout_seed);
    mt_model_zero_grads(m);
    loss[0] = mt_model_step(m, in, tg, 1.0f / N, 1);
    loss[1] = mt_model_step(m, tg, in, 1.0f / N, 1);
    mt_trainable t;
    mt_model_trainable(m, &t);
    float *grads = malloc(t.total * 4);
    mt_copy_to_host(grads, t.grads, t.total * 4);
    return grads;
}

static void small_config(mt_model_config *c, int qwen_like) {
    memset(c, 0, sizeof *c);
    snprintf(c->architecture, sizeof c->architecture, "%s", qwen_like ? "Qwen2ForCausalLM" : "LlamaForCausalLM");
    c->V = 1031, c->C = 256, c->F = 688, c->L = 3, c->H = 8, c->KV = qwen_like ? 2 : 4, c->D = 32;
    c->max_position = 1024, c->rms_eps = 1e-5f, c->rope_theta = 10000.0f, c->init_std = 0.05f;
    c->tie_embeddings = qwen_like, c->qkv_bias = qwen_like;
    c->dtype = MT_DTYPE_BF16;
}

// Llama, Qwen2 (tied, biases, 4 heads a kv head), Llama with packed
// documents (data.document_mask: positions restart, memtune's kernel), and
// Qwen3 (head norms, head_dim 64 with hidden/heads 32), and Gemma 3 (norms by
// 1 + w, sandwich norms, GeGLU, the embedding and score scales, sliding
// layers of window 48 and a global one with linear RoPE scaling), and Phi-3
// (fused qkv_proj and gate_up_proj).
static void family_config(mt_model_config *c, int variant) {
    small_config(c, variant == 1 || variant == 3 || variant == 4);
    if (variant == 3) {
        snprintf(c->architecture, sizeof c->architecture, "Qwen3ForCausalLM");
        c->qk_norm = 1, c->qkv_bias = 0, c->D = 64;
    }
    if (variant == 4) {
        snprintf(c->architecture, sizeof c->architecture, "Gemma3ForCausalLM");
        c->gemma = c->qk_norm = 1, c->qkv_bias = 0, c->D = 64;
        c->embed_scale = 16.0f, c->attn_scale = 0.125f, c->global_every = 3, c->sliding_window = 48;
        c->rope_local_theta = 10000.0f, c->rope_linear_factor = 8.0f;
    }
    if (variant == 5) snprintf(c->architecture, sizeof c->architecture, "Phi3ForCausalLM"), c->fused = 1;
}

// Positions of N tokens in rows of T packed with documents of 1 to longest
// tokens (drawn from seed): 0 at each document's and each row's start.
static int32_t *packed_positions(int N, int T, uint64_t seed, int longest) {
    int32_t *pos = malloc((size_t)N * 4);
    for (int i = 0, left = 0, k = 0; i < N; i++) {
        int start = i % T == 0 || left == 0;
        if (start) left = 1 + (int)(mt_rng_bits(seed, k++) % (uint64_t)longest);
        pos[i] = start ? 0 : pos[i - 1] + 1;
        left--;
    }
    return pos;
}

// LoRA adapters for a test: mt_lora_init_params (seed), the B matrices
// non-zero (seed + 1), rounded to bf16; their table in *table (na, ta).
static float *test_adapters(const mt_model_config *c, const mt_lora_config *l, uint64_t seed, mt_param_info **table,
                            int *na, size_t *ta) {
    *table = mt_lora_param_table(c, l, na, ta);
    float *adapters = calloc(*ta, 4);
    mt_lora_init_params(*table, *na, adapters, seed);
    for (int i = 0; i < *na; i++)
        if (strstr((*table)[i].name, "lora_B"))
            for (size_t j = 0; j < (*table)[i].count; j++)
                adapters[(*table)[i].offset + j] = 0.05f * mt_rng_normal(seed + 1, (*table)[i].offset + j);
    for (size_t i = 0; i < *ta; i++) adapters[i] = mt_round_bf16(adapters[i]);
    return adapters;
}

// One training step of each of n models from the same base weights and
// adapters over N random tokens (inputs drawn from seed, targets from
// seed + 1): model k's mean loss into loss[k].
static void lora_step_each(mt_model **models, int n, const float *params, const float *adapters,
                           const mt_model_config *c, int N, uint64_t seed, double *loss) {
    int32_t *in = malloc(N * 4), *tg = malloc(N * 4);
    for (int i = 0; i < N; i++)
        in[i] = (int32_t)(mt_rng_bits(seed, i) % c->V), tg[i] = (int32_t)(mt_rng_bits(seed + 1, i) % c->V);
    float scale = 1.0f / N;
    for (int k = 0; k < n; k++) {
        ck_assert_int_eq(mt_model_set_weights(models[k], params), MT_OK);
        mt_model_set_adapters(models[k], adapters);
        mt_model_zero_grads(models[k]);
        loss[k] = mt_model_step(models[k], in, tg, scale, 1) * scale;
    }
    free(in), free(tg);
}

// Each adapter gradient of the GPU (gg) against the CPU's (gc): cosine above
// 0.99 and relative error below 0.1 (what: the run, in a failure); the
// worst cosine.
static double expect_adapter_grads(const mt_param_info *table, int na, const float *gg, const float *gc,
                                   const char *what) {
    double worst = 1.0;
    for (int i = 0; i < na; i++) {
        double cs = cosine(gg + table[i].offset, gc + table[i].offset, table[i].count);
        double rel = tu_norm_rel_error(gg + table[i].offset, gc + table[i].offset, table[i].count);
        if (cs < worst) worst = cs;
        ck_assert_msg(cs > 0.99 && rel < 0.1, "%s %s: gradient cosine %.5f, relative error %.3g", what, table[i].name,
                      cs, rel);
    }
    return worst;
}

START_TEST(gpu_model_matches_cpu_reference) {
    for (int variant = 0; variant < 6; variant++) {
        mt_model_config c;
        family_config(&c, variant);
        int B = 2, T = 127, N = B * T, docs = variant == 2;
        mt_backend cpu, gpu;
        ck_assert_int_eq(mt_backend_init(&cpu, -1), MT_OK);
        ck_assert_int_eq(mt_backend_init(&gpu, 0), MT_OK);
        mt_model *mc, *mg, *mg_ckpt;
        mt_model_options o = {.B = B, .T = T, .document_mask = docs}, ok = o;
        ok.activation_checkpointing = 1;
        ck_assert_int_eq(mt_model_create_with(&mc, &cpu, &c, &o), MT_OK);
        ck_assert_int_eq(mt_model_create_with(&mg, &gpu, &c, &o), MT_OK);
        ck_assert_int_eq(mt_model_create_with(&mg_ckpt, &gpu, &c, &ok), MT_OK);
        if (docs) {
            // documents of 1 to 90 tokens, across the kernel's 64-row tiles
            int32_t *pos = packed_positions(N, T, 7, 90);
            mt_model_set_positions(mc, pos), mt_model_set_positions(mg, pos), mt_model_set_positions(mg_ckpt, pos);
            free(pos);
        }
        size_t total = mt_model_num_params(mc);
        float *params = malloc(total * 4);
        mt_model_init_random(&c, params, 77);
        for (size_t i = 0; i < total; i++) params[i] = mt_round_bf16(params[i] + 0.02f * mt_rng_normal(78, i));
        int32_t *in = malloc(N * 4), *tg = malloc(N * 4);
        for (int i = 0; i < N; i++)
            in[i] = (int32_t)(mt_rng_bits(5, i) % c.V), tg[i] = (int32_t)(mt_rng_bits(6, i) % c.V);
        tg[10] = -1;
        mt_model_set_weights(mc, params);
        mt_model_set_weights(mg, params);
        mt_model_set_weights(mg_ckpt, params);
        mt_model_zero_grads(mc), mt_model_zero_grads(mg), mt_model_zero_grads(mg_ckpt);
        float scale = 1.0f / (N - 1);
        double lc = mt_model_step(mc, in, tg, scale, 1) * scale;
        double lg = mt_model_step(mg, in, tg, scale, 1) * scale;
        double lk = mt_model_step(mg_ckpt, in, tg, scale, 1) * scale;
        printf("%s%s: loss cpu %.6f gpu %.6f (rel %.2e) gpu+checkpointing %.6f\n", c.architecture,
               docs ? " (packed documents)" : "", lc, lg, fabs(lg - lc) / lc, lk);
        ck_assert_double_lt(fabs(lg - lc) / lc, 1e-2);
        ck_assert_double_eq_tol(lk, lg, 1e-6 * lg);
        // deterministic: the same step again gives the same bits (no atomics anywhere)
        {
            size_t bytes = mt_model_num_params(mg) * 4;
            float *first = malloc(bytes), *second = malloc(bytes);
            mt_copy_to_host(first, mt_model_grads(mg), bytes);
            mt_model_zero_grads(mg);
            double again = mt_model_step(mg, in, tg, scale, 1) * scale;
            mt_copy_to_host(second, mt_model_grads(mg), bytes);
            ck_assert_msg(again == lg, "loss %.17g then %.17g", lg, again);
            ck_assert_msg(memcmp(first, second, bytes) == 0, "gradients differ between two identical steps");
            free(first), free(second);
        }
        float *gc = malloc(total * 4), *gg = malloc(total * 4), *gk = malloc(total * 4);
        memcpy(gc, mt_model_grads(mc), total * 4);
        mt_copy_to_host(gg, mt_model_grads(mg), total * 4);
        mt_copy_to_host(gk, mt_model_grads(mg_ckpt), total * 4);
        int np;
        const mt_param_info *info = mt_model_params(mc, &np);
        double worst = 1.0;
        for (int i = 0; i < np; i++) {
            double cs = cosine(gg + info[i].offset, gc + info[i].offset, info[i].count);
            double rel = tu_norm_rel_error(gg + info[i].offset, gc + info[i].offset, info[i].count);
            if (cs < worst) worst = cs;
            ck_assert_msg(cs > 0.99 && rel < 0.1, "%s: gradient cosine %.5f, relative error %.3g", info[i].name, cs,
                          rel);
            double ck = cosine(gk + info[i].offset, gg + info[i].offset, info[i].count);
            ck_assert_msg(ck > 0.9999, "%s: checkpointing changed the gradient (cosine %.6f)", info[i].name, ck);
        }
        printf("%s: worst gradient cosine vs CPU %.5f over %d tensors\n", c.architecture, worst, np);
        float *zc = malloc((size_t)N * c.V * 4), *zg = malloc((size_t)N * c.V * 4);
        mt_model_logits(mc, in, zc);
        mt_model_logits(mg, in, zg);
        double zr = tu_norm_rel_error(zg, zc, (size_t)N * c.V);
        printf("%s: logits relative error %.3e\n", c.architecture, zr);
        ck_assert_double_lt(zr, 2e-2);
        mt_model_free(mc), mt_model_free(mg), mt_model_free(mg_ckpt);
        mt_backend_free(&cpu), mt_backend_free(&gpu);
        free(params), free(in), free(tg), free(gc), free(gg), free(gk), free(zc), free(zg);
    }
}
END_TEST

// Decoding (memtune generate's GPU path) in every family: three rows at
// their own positions (one starting over midway) through the key/value
// caches give the CPU reference's decoding logits, and the GPU's full
// forward's logits at each row's position. The steps replayed as a CUDA
// Graph give the same logits bit for bit as the same steps op by op
// (MT_CUDA_GRAPHS=0 at a model's first step).
START_TEST(gpu_decoding_matches_cpu_and_full_forward) {
    for (int variant = 0; variant < 6; variant++) {
        if (variant == 2) continue;  // packed documents: a training setting
        mt_model_config c;
        family_config(&c, variant);
        enum { B = 3, S = 96 };
        mt_backend cpu, gpu;
        ck_assert_int_eq(mt_backend_init(&cpu, -1), MT_OK);
        ck_assert_int_eq(mt_backend_init(&gpu, 0), MT_OK);
        mt_model_options od = {.B = B, .T = 1, .forward_only = 1, .decode_len = S};
        mt_model_options of = {.B = 1, .T = S, .forward_only = 1};
        mt_model *dc, *dg, *de, *fg;
        ck_assert_int_eq(mt_model_create_with(&dc, &cpu, &c, &od), MT_OK);
        ck_assert_int_eq(mt_model_create_with(&dg, &gpu, &c, &od), MT_OK);
        ck_assert_int_eq(mt_model_create_with(&de, &gpu, &c, &od), MT_OK);
        ck_assert_int_eq(mt_model_create_with(&fg, &gpu, &c, &of), MT_OK);
        size_t total = mt_model_num_params(dc);
        float *params = malloc(total * 4);
        mt_model_init_random(&c, params, 91);
        for (size_t i = 0; i < total; i++) params[i] = mt_round_bf16(params[i] + 0.02f * mt_rng_normal(92, i));
        mt_model_set_weights(dc, params), mt_model_set_weights(dg, params), mt_model_set_weights(fg, params);
        mt_model_set_weights(de, params);
        int32_t seq[S];
        for (int i = 0; i < S; i++) seq[i] = (int32_t)(mt_rng_bits(93, i) % c.V);
        float *full = malloc((size_t)S * c.V * 4), *lc = malloc((size_t)B * c.V * 4), *lg = malloc((size_t)B * c.V * 4);
        float *le = malloc((size_t)B * c.V * 4);
        mt_model_logits(fg, seq, full);
        double worst_cpu = 0.0, worst_full = 0.0, worst_eager = 0.0;
        int differ = 0;
        for (int step = 0; step < S + 20; step++) {
            // row 0 from the start; row 1 starts over at step 20; row 2 runs 7 behind
            int32_t pos[B] = {step < S ? step : S - 1, step < 20 ? step : (step - 20) % S, step < 7 ? 0 : step - 7};
            if (pos[2] >= S) pos[2] = S - 1;
            int32_t tok[B];
            for (int b = 0; b < B; b++) tok[b] = seq[pos[b]];
            mt_model_decode(dc, tok, pos, lc);
            mt_model_decode(dg, tok, pos, lg);
            if (step == 0) setenv("MT_CUDA_GRAPHS", "0", 1);
            mt_model_decode(de, tok, pos, le);
            if (step == 0) unsetenv("MT_CUDA_GRAPHS");
            worst_eager = fmax(worst_eager, tu_norm_rel_error(lg, le, (size_t)B * c.V));
            differ += memcmp(lg, le, (size_t)B * c.V * 4) != 0;
            worst_cpu = fmax(worst_cpu, tu_norm_rel_error(lg, lc, (size_t)B * c.V));
            for (int b = 0; b < B; b++)
                worst_full =
                    fmax(worst_full, tu_norm_rel_error(lg + (size_t)b * c.V, full + (size_t)pos[b] * c.V, (size_t)c.V));
        }
        printf(
            "%s decoding: logits relative error vs CPU %.3e, vs the GPU's full forward %.3e; as a CUDA Graph "
            "(%s) vs op by op (%s): %d of %d steps differ, relative error %.3e\n",
            c.architecture, worst_cpu, worst_full, mt_model_decode_graph(dg) ? mt_model_decode_graph(dg) : "yes",
            mt_model_decode_graph(de) ? mt_model_decode_graph(de) : "a graph", differ, S + 20, worst_eager);
        ck_assert_double_lt(worst_cpu, 2e-2);
        ck_assert_double_lt(worst_full, 2e-2);
        ck_assert_ptr_null(mt_model_decode_graph(dg));
        ck_assert_ptr_nonnull(mt_model_decode_graph(de));
        ck_assert_int_eq(differ, 0);
        mt_model_free(dc), mt_model_free(dg), mt_model_free(de), mt_model_free(fg);
        mt_backend_free(&cpu), mt_backend_free(&gpu);
        free(params), free(full), free(lc), free(lg), free(le);
    }
}
END_TEST

// model.weights: cpu on the GPU: the base in pinned host memory, layers
// copied into two slots on a side stream beside the compute, gives the
// resident model's losses and adapter gradients bit for bit (LoRA, QLoRA
// with checkpointing, two steps), with the base's layers off the GPU; and
// model.weights: ssd, the base in a mapped file (LoRA), likewise; and QLoRA
// with the first 3 of 6 layers resident (model.resident_layers).
START_TEST(gpu_streamed_weights_equal_resident) {
    char file_dir[] = "/tmp/memtune-gpu-weights-XXXXXX";
    ck_assert(mkdtemp(file_dir) != NULL);
    for (int variant = 0; variant < 4; variant++) {
        mt_model_config c;
        small_config(&c, 0);
        c.L = 6;
        int B = 2, T = 128, N = B * T, nf4 = variant == 1 || variant == 3;
        mt_backend gpu;
        ck_assert_int_eq(mt_backend_init(&gpu, 0), MT_OK);
        mt_model_options o = {.B = B,
                              .T = T,
                              .activation_checkpointing = nf4,
                              .lora = {8, 16.0f, 0.1f, 0, (1u << MT_LORA_MODULES) - 1},
                              .quantize_nf4 = nf4},
                         so = o;
        so.stream_weights = 1;
        so.weights_dir = variant == 2 ? file_dir : NULL;
        so.resident_layers = variant == 3 ? 3 : 0;  // half the layers kept on the GPU, the rest streamed
        mt_model *a, *b;
        ck_assert_int_eq(mt_model_create_with(&a, &gpu, &c, &o), MT_OK);
        mt_mem_tally before, after;
        mt_mem_get_tally(MT_DEVICE, &before);
        ck_assert_int_eq(mt_model_create_with(&b, &gpu, &c, &so), MT_OK);
        mt_mem_get_tally(MT_DEVICE, &after);
        size_t total = mt_model_num_params(a);
        float *params = malloc(total * 4);
        mt_model_init_random(&c, params, 81);
        int na;
        size_t ta;
        free(mt_lora_param_table(&c, &o.lora, &na, &ta));
        float *ad = malloc(ta * 4);
        for (size_t i = 0; i < ta; i++) ad[i] = 0.05f * mt_rng_normal(82, i);
        int32_t *in = malloc(N * 4), *tg = malloc(N * 4);
        for (int i = 0; i < N; i++)
            in[i] = (int32_t)(mt_rng_bits(83, i) % c.V), tg[i] = (int32_t)(mt_rng_bits(84, i) % c.V);
        mt_model *models[2] = {a, b};
        double loss[2][2];
        float *grads[2];
        for (int k = 0; k < 2; k++) grads[k] = two_lora_steps(models[k], params, ad, 9, in, tg, N, loss[k]);
        printf(
            "streamed weights (%s): losses %.9g %.9g, resident %.9g %.9g; the streamed model holds %.1f MiB of "
            "weights on the GPU, the resident %.1f MiB\n",
            variant == 3   ? "QLoRA, checkpointing, 3 of 6 layers resident"
            : nf4          ? "QLoRA, checkpointing"
            : variant == 2 ? "LoRA, the base in a mapped file"
                           : "LoRA",
            loss[1][0], loss[1][1], loss[0][0], loss[0][1],
            (after.current[MT_MEM_WEIGHTS] - before.current[MT_MEM_WEIGHTS]) / 1048576.0,
            before.current[MT_MEM_WEIGHTS] / 1048576.0);
        ck_assert(loss[0][0] == loss[1][0] && loss[0][1] == loss[1][1]);
        mt_trainable t;
        mt_model_trainable(a, &t);
        ck_assert_mem_eq(grads[0], grads[1], t.total * 4);
        ck_assert_uint_lt(after.current[MT_MEM_WEIGHTS] - before.current[MT_MEM_WEIGHTS],
                          before.current[MT_MEM_WEIGHTS]);
        mt_model_free(a), mt_model_free(b);
        mt_backend_free(&gpu);
        free(params), free(ad), free(in), free(tg), free(grads[0]), free(grads[1]);
    }
    rmdir(file_dir);  // (the mapped file is deleted as it is made)
}
END_TEST

// LoRA's fused A products (one read of a group's input with dropout's mask
// drawn on the way; the group's input gradient in one pass), all of them
// (MT_LORA_FUSED=all), against the dropout and cuBLAS products they replace
// (MT_LORA_FUSED=0): r = 16 and
// widths the kernels take (F 768), with and without dropout and
// checkpointing, two steps: the same losses and adapter gradients up to bf16
// rounding (the mask is the same).
START_TEST(gpu_lora_fused_matches_composed) {
    mt_model_config c;
    small_config(&c, 0);
    c.F = 768;
    int B = 2, T = 96, N = B * T;
    mt_backend gpu;
    ck_assert_int_eq(mt_backend_init(&gpu, 0), MT_OK);
    size_t total = 0;
    float *params = NULL;
    for (int variant = 0; variant < 3; variant++) {
        float dropout = variant == 0 ? 0.0f : 0.1f;
        mt_model_options o = {.B = B,
                              .T = T,
                              .lora = {16, 32.0f, dropout, 0, (1u << MT_LORA_MODULES) - 1},
                              .activation_checkpointing = variant == 2};
        mt_model *models[2];
        for (int k = 0; k < 2; k++) ck_assert_int_eq(mt_model_create_with(&models[k], &gpu, &c, &o), MT_OK);
        if (!params) {
            total = mt_model_num_params(models[0]);
            params = malloc(total * 4);
            mt_model_init_random(&c, params, 91);
        }
        int na;
        size_t ta;
        mt_param_info *table = mt_lora_param_table(&c, &o.lora, &na, &ta);
        float *ad = malloc(ta * 4);
        for (size_t i = 0; i < ta; i++) ad[i] = mt_round_bf16(0.05f * mt_rng_normal(92, i));
        int32_t *in = malloc(N * 4), *tg = malloc(N * 4);
        for (int i = 0; i < N; i++)
            in[i] = (int32_t)(mt_rng_bits(93, i) % c.V), tg[i] = (int32_t)(mt_rng_bits(94, i) % c.V);
        double loss[2][2];
        float *grads[2];
        for (int k = 0; k < 2; k++) {
            setenv("MT_LORA_FUSED", k == 0 ? "all" : "0", 1);
            grads[k] = two_lora_steps(models[k], params, ad, 7, in, tg, N, loss[k]);
        }
        unsetenv("MT_LORA_FUSED");
        double worst = 1.0;
        for (int i = 0; i < na; i++) {
            double cs = cosine(grads[0] + table[i].offset, grads[1] + table[i].offset, table[i].count);
            if (cs < worst) worst = cs;
            ck_assert_msg(cs > 0.999, "%s: fused vs composed gradient cosine %.6f", table[i].name, cs);
        }
        printf(
            "LoRA fused A products (dropout %g%s): losses %.7g %.7g, composed %.7g %.7g; worst adapter gradient "
            "cosine %.7f\n",
            dropout, variant == 2 ? ", checkpointing" : "", loss[0][0], loss[0][1], loss[1][0], loss[1][1], worst);
        for (int s = 0; s < 2; s++) ck_assert_double_lt(fabs(loss[0][s] - loss[1][s]) / loss[1][s], 2e-3);
        for (int k = 0; k < 2; k++) mt_model_free(models[k]), free(grads[k]);
        free(ad), free(in), free(tg), free(table);
    }
    mt_backend_free(&gpu);
    free(params);
}
END_TEST

// model.mlp_tile_rows on the GPU: the MLP over tiles of 100 rows (the last
// short) against the whole batch at once, full fine-tune and LoRA with
// dropout (each tile its rows' part of the mask), with checkpointing; and
// likewise cuDNN's non-deterministic attention backward
// (model.deterministic_attention false) against the deterministic one.
START_TEST(gpu_tiled_mlp_matches_untiled) {
    for (int variant = 0; variant < 4; variant++) {
        int lora = variant & 1, attention = variant >> 1;
        mt_model_config c;
        small_config(&c, 0);
        int B = 2, T = 127, N = B * T;
        mt_backend gpu;
        ck_assert_int_eq(mt_backend_init(&gpu, 0), MT_OK);
        mt_model_options o = {.B = B, .T = T, .activation_checkpointing = 1}, ot;
        if (lora) o.lora = (mt_lora_config){8, 16.0f, 0.1f, 0, (1u << MT_LORA_MODULES) - 1};
        ot = o;
        if (attention)
            ot.attention_nondeterministic = 1;
        else
            ot.mlp_tile_rows = 100;
        mt_model *a, *b;
        ck_assert_int_eq(mt_model_create_with(&a, &gpu, &c, &o), MT_OK);
        ck_assert_int_eq(mt_model_create_with(&b, &gpu, &c, &ot), MT_OK);
        size_t total = mt_model_num_params(a);
        float *params = malloc(total * 4);
        mt_model_init_random(&c, params, 71);
        int na;
        size_t ta = 0;
        if (lora) free(mt_lora_param_table(&c, &o.lora, &na, &ta));
        float *ad = malloc((ta ? ta : 1) * 4);
        for (size_t i = 0; i < ta; i++) ad[i] = 0.05f * mt_rng_normal(72, i);
        int32_t *in = malloc(N * 4), *tg = malloc(N * 4);
        for (int i = 0; i < N; i++)
            in[i] = (int32_t)(mt_rng_bits(73, i) % c.V), tg[i] = (int32_t)(mt_rng_bits(74, i) % c.V);
        mt_model *models[2] = {a, b};
        double loss[2];
        float *grads[2];
        for (int k = 0; k < 2; k++) {
            ck_assert_int_eq(mt_model_set_weights(models[k], params), MT_OK);
            if (lora) mt_model_set_adapters(models[k], ad);
            mt_model_set_dropout_seed(models[k], 3);
            mt_model_zero_grads(models[k]);
            loss[k] = mt_model_step(models[k], in, tg, 1.0f / N, 1);
            mt_trainable t;
            mt_model_trainable(models[k], &t);
            grads[k] = malloc(t.total * 4);
            mt_copy_to_host(grads[k], t.grads, t.total * 4);
        }
        mt_trainable t;
        mt_model_trainable(a, &t);
        double cs = cosine(grads[1], grads[0], t.total), rel = fabs(loss[1] - loss[0]) / loss[0];
        printf("%s (%s): loss %.9g, as before %.9g (rel %.1e), gradient cosine %.7f\n",
               attention ? "non-deterministic attention backward" : "tiled MLP", lora ? "LoRA" : "full", loss[1],
               loss[0], rel, cs);
        ck_assert_double_lt(rel, 1e-3);
        ck_assert_double_gt(cs, 0.9999);
        mt_model_free(a), mt_model_free(b);
        mt_backend_free(&gpu);
        free(params), free(ad), free(in), free(tg), free(grads[0]), free(grads[1]);
    }
}
END_TEST

// LoRA and QLoRA on the GPU against the CPU reference: the same base and
// adapters (B non-zero) give the loss and every adapter gradient; the base
// has no gradient buffer; checkpointing changes nothing; QLoRA's GPU model is
// compared with the CPU's QLoRA model (both dequantize the same NF4 codes).
START_TEST(gpu_lora_matches_cpu_reference) {
    for (int quantized = 0; quantized < 2; quantized++) {
        mt_model_config c;
        small_config(&c, quantized);
        int B = 2, T = 96, N = B * T;
        mt_backend cpu, gpu;
        ck_assert_int_eq(mt_backend_init(&cpu, -1), MT_OK);
        ck_assert_int_eq(mt_backend_init(&gpu, 0), MT_OK);
        mt_model_options o = {.B = B,
                              .T = T,
                              .lora = {16, 32.0f, 0.0f, quantized, (1u << MT_LORA_MODULES) - 1},
                              .quantize_nf4 = quantized};
        mt_model_options ok = o, off = o, off1;
        ok.activation_checkpointing = 1;
        off.activation_checkpointing = off.offload_activations = 1;
        // the first layer input stays, the other (of L = 3) is copied out to a mapped file and back
        // (model.ssd_layer_inputs: pageable memory)
        char file_dir[256];
        tu_tempdir(file_dir, sizeof file_dir);
        off1 = off, off1.gpu_layer_inputs = 1, off1.ssd_layer_inputs = 1, off1.activations_dir = file_dir;
        mt_model *mc, *mg, *mk, *mo, *m1;
        ck_assert_int_eq(mt_model_create_with(&mc, &cpu, &c, &o), MT_OK);
        ck_assert_int_eq(mt_model_create_with(&mg, &gpu, &c, &o), MT_OK);
        ck_assert_int_eq(mt_model_create_with(&mk, &gpu, &c, &ok), MT_OK);
        ck_assert_int_eq(mt_model_create_with(&mo, &gpu, &c, &off), MT_OK);
        ck_assert_int_eq(mt_model_create_with(&m1, &gpu, &c, &off1), MT_OK);
        ck_assert_ptr_null(mt_model_grads(mg));
        size_t total = mt_model_num_params(mc);
        float *params = malloc(total * 4);
        mt_model_init_random(&c, params, 77);
        int na;
        size_t ta;
        mt_param_info *table;
        float *adapters = test_adapters(&c, &o.lora, 5, &table, &na, &ta);
        mt_model *models[5] = {mc, mg, mk, mo, m1};
        double loss[5];
        lora_step_each(models, 5, params, adapters, &c, N, 5, loss);
        printf("%s: loss cpu %.6f gpu %.6f (rel %.2e) gpu+checkpointing %.6f; base %.3f bytes/param\n",
               quantized ? "QLoRA" : "LoRA", loss[0], loss[1], fabs(loss[1] - loss[0]) / loss[0], loss[2],
               (double)mt_model_base_weight_bytes(mg) / (double)total);
        ck_assert_double_lt(fabs(loss[1] - loss[0]) / loss[0], 1e-2);
        ck_assert_double_eq_tol(loss[2], loss[1], 1e-6 * loss[1]);
        mt_trainable tc, tgpu, tk;
        mt_model_trainable(mc, &tc);
        mt_model_trainable(mg, &tgpu);
        mt_model_trainable(mk, &tk);
        float *gc = malloc(ta * 4), *gg = malloc(ta * 4), *gk = malloc(ta * 4);
        memcpy(gc, tc.grads, ta * 4);
        mt_copy_to_host(gg, tgpu.grads, ta * 4);
        mt_copy_to_host(gk, tk.grads, ta * 4);
        ck_assert_msg(cosine(gk, gg, ta) > 0.9999, "checkpointing changed the adapter gradients");
        // offloading the checkpointed layer inputs moves bytes only: bit-identical
        mt_trainable to;
        mt_model_trainable(mo, &to);
        float *go = malloc(ta * 4);
        mt_copy_to_host(go, to.grads, ta * 4);
        ck_assert_msg(loss[3] == loss[2], "offload changed the loss: %.17g vs %.17g", loss[3], loss[2]);
        ck_assert_msg(memcmp(go, gk, ta * 4) == 0, "offload changed the adapter gradients");
        mt_model_trainable(m1, &to);
        mt_copy_to_host(go, to.grads, ta * 4);
        ck_assert_msg(loss[4] == loss[2], "offload keeping 1, the other in a file, changed the loss: %.17g vs %.17g",
                      loss[4], loss[2]);
        ck_assert_msg(memcmp(go, gk, ta * 4) == 0, "offload keeping 1, the other in a file, changed the gradients");
        free(go);
        double worst = expect_adapter_grads(table, na, gg, gc, quantized ? "QLoRA" : "LoRA");
        printf("%s: worst adapter gradient cosine vs CPU %.5f over %d tensors\n", quantized ? "QLoRA" : "LoRA", worst,
               na);
        if (quantized) {
            double per_param = (double)mt_model_base_weight_bytes(mg) / (double)total;
            ck_assert_double_lt(per_param, 2.0);
        }
        for (int k = 0; k < 5; k++) mt_model_free(models[k]);
        rmdir(file_dir);  // (the file was deleted at its creation)
        mt_backend_free(&cpu), mt_backend_free(&gpu);
        free(params), free(adapters), free(table), free(gc), free(gg), free(gk);
    }
}
END_TEST

// A long window on a small model (issue 28's long-context path): QLoRA r=16
// on all linear modules, one row of T = 4096 tokens, the GPU with the MLP
// in tiles of 1024 tokens, checkpointing with the layer inputs in host
// memory and cuDNN's non-deterministic attention backward, against the CPU
// reference's plain step over the same row; and the same with the row
// packed with documents of up to 1500 tokens (positions restart; memtune's
// attention kernel). The loss and every adapter gradient agree as the short
// rows' checks above do.
START_TEST(gpu_long_window_matches_cpu_reference) {
    for (int docs = 0; docs < 2; docs++) {
        mt_model_config c;
        small_config(&c, 0);
        c.C = 128, c.F = 344, c.L = 2, c.H = 4, c.KV = 2, c.max_position = 8192;
        int B = 1, T = 4096, N = B * T;
        mt_backend cpu, gpu;
        ck_assert_int_eq(mt_backend_init(&cpu, -1), MT_OK);
        ck_assert_int_eq(mt_backend_init(&gpu, 0), MT_OK);
        mt_model_options o = {.B = B,
                              .T = T,
                              .lora = {16, 32.0f, 0.0f, 1, (1u << MT_LORA_MODULES) - 1},
                              .quantize_nf4 = 1,
                              .document_mask = docs},
                         og = o;
        og.activation_checkpointing = og.offload_activations = 1;
        og.mlp_tile_rows = 1024;
        og.attention_nondeterministic = !docs;  // (with documents memtune's kernel runs, deterministic)
        mt_model *mc, *mg;
        ck_assert_int_eq(mt_model_create_with(&mc, &cpu, &c, &o), MT_OK);
        ck_assert_int_eq(mt_model_create_with(&mg, &gpu, &c, &og), MT_OK);
        if (docs) {
            int32_t *pos = packed_positions(N, T, 17, 1500);
            mt_model_set_positions(mc, pos), mt_model_set_positions(mg, pos);
            free(pos);
        }
        size_t total = mt_model_num_params(mc);
        float *params = malloc(total * 4);
        mt_model_init_random(&c, params, 81);
        int na;
        size_t ta;
        mt_param_info *table;
        float *adapters = test_adapters(&c, &o.lora, 8, &table, &na, &ta);
        mt_model *models[2] = {mc, mg};
        double loss[2];
        lora_step_each(models, 2, params, adapters, &c, N, 15, loss);
        mt_trainable tc, tgpu;
        mt_model_trainable(mc, &tc);
        mt_model_trainable(mg, &tgpu);
        float *gc = malloc(ta * 4), *gg = malloc(ta * 4);
        memcpy(gc, tc.grads, ta * 4);
        mt_copy_to_host(gg, tgpu.grads, ta * 4);
        double worst = expect_adapter_grads(table, na, gg, gc, docs ? "long window (documents)" : "long window");
        printf(
            "QLoRA, one row of %d tokens%s: loss cpu %.6f gpu (tiles, offloaded inputs%s) %.6f (rel %.2e); worst "
            "adapter gradient cosine %.5f over %d tensors\n",
            T, docs ? " packed with documents" : "", loss[0], docs ? "" : ", non-deterministic attention backward",
            loss[1], fabs(loss[1] - loss[0]) / loss[0], worst, na);
        ck_assert_double_lt(fabs(loss[1] - loss[0]) / loss[0], 1e-2);
        mt_model_free(mc), mt_model_free(mg);
        mt_backend_free(&cpu), mt_backend_free(&gpu);
        free(params), free(adapters), free(table), free(gc), free(gg);
    }
}
END_TEST

START_TEST(gpu_out_of_memory_is_a_clear_error) {
    mt_model_config c;
    small_config(&c, 0);
    // Llama-70B's width at 240 layers: ~414 GB of bf16 weights, more than any one GPU holds (80 layers, 138 GB,
    // fit an H200's 141 GB: the failure then came later, for gradients)
    c.V = 32000, c.C = 8192, c.F = 28672, c.L = 240, c.H = 64, c.KV = 8, c.D = 128;
    mt_backend gpu;
    ck_assert_int_eq(mt_backend_init(&gpu, 0), MT_OK);
    mt_model *m = (mt_model *)1;
    ck_assert_int_eq(mt_model_create(&m, &gpu, &c, 1, 128, 1), MT_ERR_NOMEM);
    ck_assert_ptr_null(m);
    const char *msg = mt_last_error();
    printf("out-of-memory message: %s\n", msg);
    ck_assert_ptr_nonnull(strstr(msg, "out of GPU memory"));
    ck_assert_ptr_nonnull(strstr(msg, "for weights"));
    ck_assert_ptr_nonnull(strstr(msg, "use a GPU with more memory"));
    // nothing was left behind and the device still works
    small_config(&c, 0);
    ck_assert_int_eq(mt_model_create(&m, &gpu, &c, 1, 16, 0), MT_OK);
    mt_model_free(m);
    mt_backend_free(&gpu);
}
END_TEST

// MeZO on the GPU: the forward-only model computes what the training model
// computes; perturbed losses match the CPU's (same z up to ~1e-6); an update
// from the same losses moves the bf16 weights to within one bf16 step of the
// CPU's fp32 result.
START_TEST(gpu_mezo_matches_cpu_reference) {
    for (int variant = 0; variant < 2; variant++) {
        mt_model_config c;
        small_config(&c, variant);
        int B = 2, T = 64, N = B * T;
        mt_backend cpu, gpu;
        ck_assert_int_eq(mt_backend_init(&cpu, -1), MT_OK);
        ck_assert_int_eq(mt_backend_init(&gpu, 0), MT_OK);
        mt_model_options o = {.B = B, .T = T, .forward_only = 1};
        mt_model *mc, *mg, *mtrain;
        ck_assert_int_eq(mt_model_create_with(&mc, &cpu, &c, &o), MT_OK);
        ck_assert_int_eq(mt_model_create_with(&mg, &gpu, &c, &o), MT_OK);
        ck_assert_int_eq(mt_model_create(&mtrain, &gpu, &c, B, T, 0), MT_OK);
        ck_assert_ptr_null(mt_model_grads(mg));
        size_t total = mt_model_num_params(mc);
        float *params = malloc(total * 4);
        mt_model_init_random(&c, params, 77);
        for (size_t i = 0; i < total; i++) params[i] = mt_round_bf16(params[i] + 0.02f * mt_rng_normal(78, i));
        int32_t *in = malloc(N * 4), *tg = malloc(N * 4);
        for (int i = 0; i < N; i++)
            in[i] = (int32_t)(mt_rng_bits(5, i) % c.V), tg[i] = (int32_t)(mt_rng_bits(6, i) % c.V);
        ck_assert_int_eq(mt_model_set_weights(mc, params), MT_OK);
        ck_assert_int_eq(mt_model_set_weights(mg, params), MT_OK);
        ck_assert_int_eq(mt_model_set_weights(mtrain, params), MT_OK);
        double plain = mt_model_step(mg, in, tg, 0, 0);
        ck_assert_msg(plain == mt_model_step(mtrain, in, tg, 0, 0), "forward-only changed the loss");
        ck_assert_int_eq(mt_model_enable_perturbation(mc, NULL), MT_OK);
        ck_assert_int_eq(mt_model_enable_perturbation(mg, NULL), MT_OK);
        double losses[2];
        for (int k = 0; k < 2; k++) {
            float scale = k ? -1e-2f : 1e-2f;
            mt_model_set_perturbation(mc, 99, scale), mt_model_set_perturbation(mg, 99, scale);
            double lc = mt_model_step(mc, in, tg, 0, 0) / N, lg = mt_model_step(mg, in, tg, 0, 0) / N;
            printf("MeZO %s, scale %+g: loss cpu %.6f gpu %.6f (rel %.2e), unperturbed %.6f\n",
                   variant ? "tied+bias" : "llama", scale, lc, lg, fabs(lg - lc) / lc, plain / N);
            ck_assert_double_lt(fabs(lg - lc) / lc, 1e-2);
            ck_assert(fabs(lg - plain / N) > 1e-4);
            losses[k] = lc;
        }
        mt_model_set_perturbation(mc, 0, 0.0f), mt_model_set_perturbation(mg, 0, 0.0f);
        // one update from the CPU's losses on both backends
        mt_trainable tc, tgpu;
        mt_model_trainable(mc, &tc);
        mt_model_trainable(mg, &tgpu);
        mt_param_group *groups = malloc((size_t)tc.count * sizeof *groups);
        for (int i = 0; i < tc.count; i++)
            groups[i] = (mt_param_group){tc.params[i].offset, tc.params[i].count, tc.params[i].decay};
        mt_mezo_config zc = {1e-2f, 1, 0.1f, 7};
        mt_mezo *zcpu, *zgpu;
        ck_assert_int_eq(mt_mezo_init(&zcpu, &cpu, &zc, tc.weights, groups, tc.count), MT_OK);
        ck_assert_int_eq(mt_mezo_init(&zgpu, &gpu, &zc, tgpu.weights, groups, tc.count), MT_OK);
        // the losses above came from seed 99; any seed's update is compared the same way
        mt_mezo_info ic, ig;
        mt_mezo_update(zcpu, 3, losses, 1e-2f, &ic);
        mt_mezo_update(zgpu, 3, losses, 1e-2f, &ig);
        float *wc = malloc(total * 4), *wg = malloc(total * 4);
        mt_model_get_trainable(mc, wc);
        mt_model_get_trainable(mg, wg);
        size_t moved = 0;
        for (size_t i = 0; i < total; i++) {
            ck_assert_msg(fabsf(wg[i] - wc[i]) <= fabsf(wc[i]) / 128 + 1e-6f, "weight %zu: gpu %g cpu %g", i, wg[i],
                          wc[i]);
            moved += wg[i] != params[i];
        }
        printf("MeZO update (projected gradient %.4f): %zu of %zu bf16 weights changed\n", ic.projected_grad_rms, moved,
               total);
        ck_assert(moved > total / 10);
        mt_mezo_free(zcpu), mt_mezo_free(zgpu);
        mt_model_free(mc), mt_model_free(mg), mt_model_free(mtrain);
        mt_backend_free(&cpu), mt_backend_free(&gpu);
        free(params), free(in), free(tg), free(groups), free(wc), free(wg);
    }
}
END_TEST

static void defer_to(void *model, const mt_zo_directions *d, float lr, float weight_decay, uint64_t round_seed) {
    mt_model_defer_update(model, d, lr, weight_decay, round_seed);
}

typedef struct {
    mt_model *model;
    const int32_t *in, *tg;
} gpu_loss_ctx;

static double gpu_loss(void *p, uint64_t seed, float scale) {
    gpu_loss_ctx *c = p;
    mt_model_set_perturbation(c->model, seed, scale);
    double loss = mt_model_step(c->model, c->in, c->tg, 0, 0);
    mt_model_set_perturbation(c->model, 0, 0.0f);
    return loss;
}

static void gpu_pair(void *p, uint64_t seed, float eps, double *plus, double *minus) {
    gpu_loss_ctx *c = p;
    mt_model_forward_pair(c->model, c->in, c->tg, seed, eps, plus, minus);
}

// The fused update + perturbation kernel gives bit for bit what the update
// kernel and the perturbation kernel give (bf16, stochastic rounding), and so
// does the base streamed from host memory through the paired passes (the
// update applied in a slot and written back beside the next layer's copy in),
// also with the first two of its three layers resident (model.resident_layers).
// Where the perturbation scratch (sized for the lm_head) has room past the
// widest layer matrix, the paired passes' + kernels also write the - pass's
// reads: 7 of a layer's 12 tensors in the tied Qwen-like model (q's and k's
// weights and biases, v's bias, both norms), all 9 with an untied lm_head of
// 4099 rows.
static void deferred_mezo_case(const mt_model_config *cfg, int all_mirrored) {
    mt_model_config c = *cfg;
    int B = 2, T = 64, N = B * T;
    mt_backend gpu;
    ck_assert_int_eq(mt_backend_init(&gpu, 0), MT_OK);
    // 0: updated at once; 1: deferred into the next forward; 2: deferred, the
    // base streamed from host memory (model.weights: cpu); 3: the same with two layers resident
    mt_model_options o = {.B = B, .T = T, .forward_only = 1}, so = o, sr;
    so.stream_weights = 1;
    sr = so, sr.resident_layers = 2;
    mt_model *m[4];
    mt_mezo *mz[4];
    size_t total = 0;
    float *params = NULL;
    mt_mezo_config zc = {1e-3f, 2, 0.1f, 23};
    int32_t *in = malloc(N * 4), *tg = malloc(N * 4);
    for (int i = 0; i < N; i++) in[i] = (int32_t)(mt_rng_bits(7, i) % c.V), tg[i] = (int32_t)(mt_rng_bits(8, i) % c.V);
    for (int k = 0; k < 4; k++) {
        ck_assert_int_eq(mt_model_create_with(&m[k], &gpu, &c, k == 3 ? &sr : k == 2 ? &so : &o), MT_OK);
        if (!params) {
            total = mt_model_num_params(m[k]);
            params = malloc(total * 4);
            mt_model_init_random(&c, params, 91);
        }
        ck_assert_int_eq(mt_model_set_weights(m[k], params), MT_OK);
        ck_assert_int_eq(mt_model_enable_perturbation(m[k], NULL), MT_OK);
        mt_trainable t;
        mt_model_trainable(m[k], &t);
        mt_param_group *g = malloc((size_t)t.count * sizeof *g);
        for (int i = 0; i < t.count; i++)
            g[i] = (mt_param_group){t.params[i].offset, t.params[i].count, t.params[i].decay};
        ck_assert_int_eq(mt_mezo_init(&mz[k], &gpu, &zc, t.weights, g, t.count), MT_OK);
        free(g);
    }
    mt_mezo_defer_updates(mz[1], defer_to, m[1]);
    mt_mezo_defer_updates(mz[2], defer_to, m[2]);
    mt_mezo_defer_updates(mz[3], defer_to, m[3]);
    for (int step = 0; step < 6; step++) {
        double l[4][4];
        for (int k = 0; k < 4; k++) {
            gpu_loss_ctx ctx = {m[k], in, tg};
            if (k >= 2)  // the streamed base through MeZO's paired passes, as the trainer runs them
                mt_mezo_losses_paired(mz[k], step, gpu_pair, &ctx, l[k]);
            else
                mt_mezo_losses(mz[k], step, gpu_loss, &ctx, l[k]);
            mt_mezo_info info;
            mt_mezo_update(mz[k], step, l[k], 1e-3f, &info);
        }
        for (int j = 0; j < 4; j++)
            ck_assert_msg(l[0][j] == l[1][j] && l[0][j] == l[2][j] && l[0][j] == l[3][j], "step %d loss %d differs",
                          step, j);
    }
    // MeZO's paired passes (as the trainer runs them) on the pending update
    // of the deferred models: the two separate passes' losses bit for bit
    gpu_loss_ctx c0 = {m[0], in, tg};
    double p0 = gpu_loss(&c0, 5, 1e-3f), n0 = gpu_loss(&c0, 5, -1e-3f), p1, n1, p2, n2;
    mt_model_forward_pair(m[1], in, tg, 5, 1e-3f, &p1, &n1);
    mt_model_forward_pair(m[2], in, tg, 5, 1e-3f, &p2, &n2);
    ck_assert_msg(p0 == p1 && n0 == n1 && p0 == p2 && n0 == n2, "paired passes differ");
    float *a = malloc(total * 4), *b = malloc(total * 4);
    mt_model_get_trainable(m[0], a);
    mt_model_get_trainable(m[1], b);
    ck_assert_msg(memcmp(a, b, total * 4) == 0, "deferred update changed the weights");
    mt_model_get_trainable(m[2], b);
    ck_assert_msg(memcmp(a, b, total * 4) == 0, "streamed weights changed the weights");
    mt_model_get_trainable(m[3], b);
    ck_assert_msg(memcmp(a, b, total * 4) == 0, "resident layers changed the weights");
    size_t saved = mt_model_mirror_saved(m[3]);
    printf("paired passes: %zu perturbation passes spared (%s)\n", saved, c.architecture);
    ck_assert(saved > 0 && saved % (size_t)(all_mirrored ? 9 * c.L : 7 * c.L) == 0);
    ck_assert_uint_eq(mt_model_mirror_saved(m[0]), 0);
    for (int k = 0; k < 4; k++) mt_mezo_free(mz[k]), mt_model_free(m[k]);
    mt_backend_free(&gpu);
    free(params), free(in), free(tg), free(a), free(b);
}

START_TEST(gpu_deferred_mezo_update_is_bit_identical) {
    mt_model_config c;
    small_config(&c, 1);
    deferred_mezo_case(&c, 0);
    small_config(&c, 0);
    c.V = 4099;
    deferred_mezo_case(&c, 1);
}
END_TEST

// GaLore on the GPU: streamed gradients equal the gradient block, and three
// GaLore steps (refresh included) move the weights as the CPU's do.
typedef struct {
    mt_galore *galore;
    void *weights;
    size_t act;
    const mt_param_info *table;
    float *host;  // collect mode: gradients copied here (NULL: update)
    int gpu;
} gpu_hook;

static void gpu_hook_fn(void *ctx, int param, float *grad) {
    gpu_hook *h = ctx;
    const mt_param_info *p = &h->table[param];
    if (h->host) {
        mt_copy_to_host(h->host + p->offset, grad, p->count * 4);
        return;
    }
    mt_galore_update(h->galore, param, grad, (char *)h->weights + p->offset * h->act);
}

START_TEST(gpu_galore_matches_cpu_reference) {
    for (int variant = 0; variant < 2; variant++) {
        mt_model_config c;
        small_config(&c, variant);
        int B = 2, T = 64, N = B * T;
        mt_backend cpu, gpu;
        ck_assert_int_eq(mt_backend_init(&cpu, -1), MT_OK);
        ck_assert_int_eq(mt_backend_init(&gpu, 0), MT_OK);
        gpu_hook hg = {0}, hc = {0};
        mt_model_options og = {.B = B,
                               .T = T,
                               .activation_checkpointing = 1,
                               .grad_ready = gpu_hook_fn,
                               .grad_ready_ctx = &hg},
                         oc = og;
        oc.grad_ready_ctx = &hc;
        mt_model *plain, *mg, *mc;
        ck_assert_int_eq(mt_model_create(&plain, &gpu, &c, B, T, 1), MT_OK);
        ck_assert_int_eq(mt_model_create_with(&mg, &gpu, &c, &og), MT_OK);
        ck_assert_int_eq(mt_model_create_with(&mc, &cpu, &c, &oc), MT_OK);
        int n;
        const mt_param_info *table = mt_model_params(mc, &n);
        size_t total = mt_model_num_params(mc);
        float *params = malloc(total * 4), *g_block = malloc(total * 4), *g_streamed = calloc(total, 4);
        mt_model_init_random(&c, params, 77);
        for (size_t i = 0; i < total; i++) params[i] = mt_round_bf16(params[i]);
        int32_t *in = malloc(N * 4), *tg = malloc(N * 4);
        for (int i = 0; i < N; i++) in[i] = (int32_t)(mt_rng_bits(5, i) % c.V), tg[i] = (int32_t)((in[i] + 1) % c.V);
        ck_assert_int_eq(mt_model_set_weights(plain, params), MT_OK);
        ck_assert_int_eq(mt_model_set_weights(mg, params), MT_OK);
        ck_assert_int_eq(mt_model_set_weights(mc, params), MT_OK);
        mt_model_zero_grads(plain);
        mt_model_step(plain, in, tg, 1.0f / N, 1);
        mt_copy_to_host(g_block, mt_model_grads(plain), total * 4);
        hg = (gpu_hook){NULL, NULL, 2, table, g_streamed, 1};
        mt_model_step(mg, in, tg, 1.0f / N, 1);
        double gerr = tu_norm_rel_error(g_streamed, g_block, total);
        printf("GaLore %s: streamed GPU gradients vs the block: relative error %.3g\n", variant ? "tied+bias" : "llama",
               gerr);
        ck_assert_msg(gerr == 0.0, "streamed gradients differ from the block's: %g", gerr);
        // three steps of GaLore (rank 8, refresh at step 1) on each backend
        mt_galore_param *gp = tu_galore_layer_params(table, n);
        for (int int8 = 0; int8 < 2; int8++) {
            mt_galore_config gc = {0.9f, 0.95f, 1e-8f, 0.0f, 8, 100, 0.25f, MT_GALORE_RANDOMIZED, int8, 3};
            ck_assert_int_eq(mt_model_set_weights(mg, params), MT_OK);
            ck_assert_int_eq(mt_model_set_weights(mc, params), MT_OK);
            ck_assert_int_eq(mt_galore_init(&hg.galore, &gpu, &gc, gp, n), MT_OK);
            ck_assert_int_eq(mt_galore_init(&hc.galore, &cpu, &gc, gp, n), MT_OK);
            hg.host = NULL, hg.weights = mt_model_weights(mg);
            hc = (gpu_hook){hc.galore, mt_model_weights(mc), 4, table, NULL, 0};
            for (int step = 0; step < 3; step++) {
                // a new batch each step: with a fixed one Adam's direction is
                // +-1 whatever the moments' precision, and int8 would not show
                for (int i = 0; i < N; i++)
                    in[i] = (int32_t)(mt_rng_bits(40 + (uint64_t)step, i) % c.V), tg[i] = (int32_t)((in[i] + 1) % c.V);
                mt_step_info ig, ic;
                mt_galore_begin_step(hg.galore, 2e-3f), mt_galore_begin_step(hc.galore, 2e-3f);
                mt_model_step(mg, in, tg, 1.0f / N, 1), mt_model_step(mc, in, tg, 1.0f / N, 1);
                mt_galore_end_step(hg.galore, &ig), mt_galore_end_step(hc.galore, &ic);
                ck_assert_msg(fabs(ig.grad_norm - ic.grad_norm) < 0.03 * ic.grad_norm, "grad norms %g %g", ig.grad_norm,
                              ic.grad_norm);
            }
            float *wg = malloc(total * 4), *dg = malloc(total * 4), *dc = malloc(total * 4);
            mt_model_get_trainable(mg, wg);
            const float *wc = mt_model_weights(mc);
            for (size_t i = 0; i < total; i++) dg[i] = wg[i] - params[i], dc[i] = wc[i] - params[i];
            double cos = cosine(dg, dc, total);
            double ng = 0, nc = 0;
            for (size_t i = 0; i < total; i++) ng += (double)dg[i] * dg[i], nc += (double)dc[i] * dc[i];
            printf("GaLore %s %s moments: 3 steps, GPU vs CPU weight change cosine %.4f, norms %.4g / %.4g\n",
                   variant ? "tied+bias" : "llama", int8 ? "int8" : "fp32", cos, sqrt(ng), sqrt(nc));
            ck_assert_msg(cos > 0.95, "GaLore GPU update direction vs CPU: cosine %g", cos);
            ck_assert_msg(fabs(sqrt(ng) / sqrt(nc) - 1) < 0.1, "update norms %g %g", sqrt(ng), sqrt(nc));
            free(wg), free(dg), free(dc);
            mt_galore_free(hg.galore), mt_galore_free(hc.galore);
        }
        free(gp), free(params), free(g_block), free(g_streamed), free(in), free(tg);
        mt_model_free(plain), mt_model_free(mg), mt_model_free(mc);
        mt_backend_free(&gpu), mt_backend_free(&cpu);
    }
}
END_TEST

// The offloaded optimizer on the GPU, through `memtune train` on the tiny
// model: gradients cross in bf16, so the losses follow the GPU-resident
// AdamW's closely but not exactly; the SSD store gives the host store's
// values bit for bit; the timeline names every stage.
static void gpu_run(const char *dir, const char *name, const char *const *extra, double *losses) {
    char data[300], folder[300], out[400];
    snprintf(data, sizeof data, "%s/data.h5", dir);
    tu_write_sequence_data(data);
    // the tiny model with head dimension 16, which the GPU attention takes
    static const char *const json =
        "{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":13,\"hidden_size\":64,\"intermediate_size\":96,"
        "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"num_key_value_heads\":2,\"rms_norm_eps\":1e-5,"
        "\"rope_theta\":10000.0,\"tie_word_embeddings\":false,\"torch_dtype\":\"float32\"}";
    tu_model_folder(dir, "tiny-gpu", json, folder, sizeof folder);
    snprintf(out, sizeof out, "%s/%s", dir, name);
    mt_config cfg;
    mt_train_result r;
    tu_tiny_run_config(&cfg, folder, data, out, extra);
    ck_assert_int_eq(mt_config_set(&cfg, "train.device", "gpu", "t"), MT_OK);
    ck_assert_msg(mt_train(&cfg, &r) == MT_OK, "%s: %s", name, mt_last_error());
    ck_assert_int_eq(tu_read_losses(out, losses, 12), 12);
    mt_config_free(&cfg);
}

// Spans of an offload trace (Chrome's format) whose names hold each of
// needles[0..n): counts[i].
static void trace_spans(const char *path, const char *const *needles, int n, int *counts) {
    FILE *f = fopen(path, "r");
    ck_assert_msg(f != NULL, "no %s", path);
    static char text[1 << 20];
    size_t len = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[len] = 0;
    cJSON *doc = cJSON_Parse(text);
    ck_assert_msg(doc != NULL, "%s is not JSON", path);
    const cJSON *events = cJSON_GetObjectItemCaseSensitive(doc, "traceEvents"), *e;
    for (int i = 0; i < n; i++) counts[i] = 0;
    cJSON_ArrayForEach(e, events) {
        const char *nm = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(e, "name"));
        const cJSON *dur = cJSON_GetObjectItemCaseSensitive(e, "dur");
        if (!nm || !cJSON_IsNumber(dur)) continue;  // (the tracks' names)
        ck_assert_msg(dur->valuedouble >= 0.0, "%s: span %s lasts %g us", path, nm, dur->valuedouble);
        for (int i = 0; i < n; i++) counts[i] += strstr(nm, needles[i]) != NULL;
    }
    cJSON_Delete(doc);
}

START_TEST(gpu_offload_follows_gpu_adamw) {
    char dir[256], ssd[300], trace[400];
    tu_tempdir(dir, sizeof dir);
    snprintf(ssd, sizeof ssd, "%s/ssd", dir);
    // clang-format off
    const char *const variants[][12] = {{"optim.grad_clip", "1", NULL}, {"optim.grad_clip", "0", NULL},
                                        {"train.grad_accum", "2", NULL}, {"lora.r", "4", NULL},
                                        // summed on the GPU in the gradient block, handed over after backward
                                        {"train.grad_accum", "2", "offload.grad_sum", "gpu", NULL},
                                        // GaLore: its unprojected parameters' state offloaded
                                        {"optim.kind", "galore", "optim.grad_clip", "0", "galore.rank", "4", NULL}};
    // clang-format on
    for (int k = 0; k < (int)(sizeof variants / sizeof *variants); k++) {
        double base[12], cpu[12], file[12];
        const char *cpu_extra[20], *ssd_extra[20];
        int n = 0;
        for (; variants[k][n]; n++) cpu_extra[n] = ssd_extra[n] = variants[k][n];
        const char *const cpu_tail[] = {"offload.optimizer", "cpu", "offload.trace_step", "3", NULL};
        const char *const ssd_tail[] = {"offload.optimizer", "ssd", "offload.path", ssd, NULL};
        for (int i = 0; i < 5; i++) cpu_extra[n + i] = cpu_tail[i], ssd_extra[n + i] = ssd_tail[i];
        const char *resident[20];
        tu_pairs_without(variants[k], "offload.", resident);  // (the run without offload takes no offload.* keys)
        gpu_run(dir, "resident", resident, base);
        gpu_run(dir, "cpu", cpu_extra, cpu);
        gpu_run(dir, "ssd", ssd_extra, file);
        double worst = 0.0;
        for (int i = 0; i < 12; i++) {
            worst = fmax(worst, fabs(cpu[i] - base[i]) / fabs(base[i]));
            ck_assert_msg(file[i] == cpu[i], "variant %d step %d: ssd %.17g vs host %.17g", k, i + 1, file[i], cpu[i]);
        }
        printf(
            "offload variant %d (%s=%s): losses vs the optimizer on the GPU: worst relative difference %.3g; %.4f -> "
            "%.4f\n",
            k, variants[k][0], variants[k][1], worst, cpu[0], cpu[11]);
        ck_assert_msg(worst < 1e-2, "variant %d: offloaded losses drift from the GPU-resident run's by %g", k, worst);
        ck_assert_msg(cpu[11] < cpu[0], "variant %d: no learning", k);
        // the timeline of steps 3 and 4
        snprintf(trace, sizeof trace, "%s/cpu/offload-trace.json", dir);
        static const char *const kinds[] = {"AdamW", "weights", "gradients", "forward"};
        int c[4];
        trace_spans(trace, kinds, 4, c);
        // per step, 4 buckets (embedding, 2 layers, head; GaLore's: the layers' norms), or the 2 layers' adapters
        // with LoRA
        int spans = 2 * (k == 3 ? 2 : 4);
        ck_assert_msg(c[0] == spans && c[1] == spans && c[2] == spans && c[3] == spans,
                      "variant %d trace spans: AdamW %d, weights %d, gradients %d, forward %d (want %d)", k, c[0], c[1],
                      c[2], c[3], spans);
    }
}
END_TEST

// offload.delay on the GPU through the offload API (test_offload checks the
// CPU backend the same way): bf16 weights on the device, three parameters
// each its own bucket; every step waits for each unit as a forward would
// (mt_offload_wait_bucket), reads the weights it then sees and hands over
// gradients 2 (w - target), which cross to the host as bf16. With delay the
// weights a step sees must be the master after s - 2 updates (rounded to
// bf16), without it after s - 1; the reference is AdamW over host arrays with
// the same CPU kernel on those bf16 gradients: bit for bit, with and without
// clipping. This is what exercises the delayed copies' events and stream.
START_TEST(gpu_offload_delay_takes_each_gradient_two_steps_back) {
    enum { kSteps = 6, kParams = 3 };
    const size_t counts[kParams] = {37, 3000, 5};
    size_t offs[kParams];
    mt_offload_param params[kParams];
    size_t total = tu_delay_params(counts, kParams, params, offs);
    float *init = malloc(total * 4), *target = malloc(total * 4), *seen = malloc(total * 4), *g = malloc(total * 4);
    float *master = malloc(total * 4), *m = malloc(total * 4), *v = malloc(total * 4);
    uint16_t *wb = malloc(total * 2), *gb = malloc(total * 2);
    for (size_t i = 0; i < total; i++) init[i] = mt_rng_normal(21, i), target[i] = mt_rng_normal(22, i);
    mt_backend gpu;
    ck_assert_int_eq(mt_backend_init(&gpu, 0), MT_OK);
    void *w_d = mt_device_malloc(total * 2);
    float *g_d = mt_device_malloc(total * 4);
    char dir[256], trace[300];
    tu_tempdir(dir, sizeof dir);
    snprintf(trace, sizeof trace, "%s/offload-trace.json", dir);
    for (int variant = 0; variant < 4; variant++) {
        int delay = variant & 1;
        float clip = variant >> 1 ? 0.5f : 0.0f, lr = 0.05f, wd = 0.1f;
        mt_offload_config oc = tu_delay_config(wd, clip, 2, delay);
        oc.trace_path = trace, oc.trace_step = 3, oc.layers = 1;  // written as step 5 begins
        remove(trace);
        for (size_t i = 0; i < total; i++) wb[i] = mt_f32_to_bf16(init[i]);
        mt_copy_to_device(w_d, wb, total * 2);
        memcpy(master, init, total * 4), memcpy(seen, init, total * 4);
        memset(m, 0, total * 4), memset(v, 0, total * 4);
        mt_offload *o;
        ck_assert_int_eq(mt_offload_init(&o, &gpu, &oc, params, kParams, total, w_d, init, NULL, NULL, 0), MT_OK);
        for (int s = 1; s <= kSteps; s++) {
            mt_offload_begin_step(o, lr);
            for (int p = 0; p < kParams; p++) mt_offload_wait_bucket(o, p);  // the forward, unit by unit
            mt_device_synchronize();
            mt_copy_to_host(wb, w_d, total * 2);
            for (size_t i = 0; i < total; i++) {
                ck_assert_msg(wb[i] == mt_f32_to_bf16(seen[i]),
                              "variant %d (delay %d, clip %g) step %d: weight %zu is %g, expected %g", variant, delay,
                              clip, s, i, mt_bf16_to_f32(wb[i]), mt_round_bf16(seen[i]));
                g[i] = 2.0f * (mt_bf16_to_f32(wb[i]) - target[i]);
                gb[i] = mt_f32_to_bf16(g[i]);  // as it crosses to the host
            }
            mt_copy_to_device(g_d, g, total * 4);
            for (int p = kParams - 1; p >= 0; p--) mt_offload_grad(o, p, g_d + offs[p]);  // backward order
            double norm;
            int finite;
            ck_assert_int_eq(mt_offload_end_step(o, &norm, &finite), MT_OK);
            double ref =
                tu_delay_reference_step(params, kParams, gb, 1, s, lr, wd, clip, delay, master, m, v, seen, total);
            ck_assert_msg(finite && ref == norm, "variant %d step %d: norm %.17g, reference %.17g", variant, s, norm,
                          ref);
        }
        ck_assert_int_eq(mt_offload_sync(o), MT_OK);
        float *state = malloc(total * 4);
        ck_assert_int_eq(mt_offload_read_state(o, state, NULL, NULL), MT_OK);
        ck_assert_msg(memcmp(state, master, total * 4) == 0, "variant %d: the master", variant);
        free(state);
        mt_offload_free(o);
        // the timeline of steps 3 and 4, 3 buckets each; with delay step 4's weights are still pending, and the
        // training thread's waits for the last update are a track of their own
        static const char *const kinds[] = {"AdamW", "weights", "gradients", "waits for"};
        int c[4];
        trace_spans(trace, kinds, 4, c);
        ck_assert_msg(c[0] == 6 && c[1] == (delay ? 3 : 6) && c[2] == 6 && c[3] == (delay ? 6 : 0),
                      "variant %d trace spans: AdamW %d, weights %d, gradients %d, waits %d", variant, c[0], c[1], c[2],
                      c[3]);
        printf("offload API on the GPU, delay %d, clip %g: %d steps as the reference, bit for bit\n", delay, clip,
               kSteps);
    }
    mt_device_free(w_d), mt_device_free(g_d);
    mt_backend_free(&gpu);
    free(init), free(target), free(seen), free(g), free(master), free(m), free(v), free(wb), free(gb);
}
END_TEST

int main(void) {
    if (mt_device_count() == 0) {
        printf("test_model_gpu: no GPU, skipped\n");
        return 77;
    }
    Suite *s = suite_create("model_gpu");
    TCase *tc = tcase_create("gpu vs cpu model");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, gpu_model_matches_cpu_reference);
    tcase_add_test(tc, gpu_decoding_matches_cpu_and_full_forward);
    tcase_add_test(tc, gpu_lora_matches_cpu_reference);
    tcase_add_test(tc, gpu_lora_fused_matches_composed);
    tcase_add_test(tc, gpu_streamed_weights_equal_resident);
    tcase_add_test(tc, gpu_tiled_mlp_matches_untiled);
    tcase_add_test(tc, gpu_long_window_matches_cpu_reference);
    tcase_add_test(tc, gpu_mezo_matches_cpu_reference);
    tcase_add_test(tc, gpu_deferred_mezo_update_is_bit_identical);
    tcase_add_test(tc, gpu_galore_matches_cpu_reference);
    tcase_add_test(tc, gpu_out_of_memory_is_a_clear_error);
    tcase_add_test(tc, gpu_offload_follows_gpu_adamw);
    tcase_add_test(tc, gpu_offload_delay_takes_each_gradient_two_steps_back);
    suite_add_tcase(s, tc);
    return tu_run_suite(s, 1);
}
