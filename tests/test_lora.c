// tests/test_lora.c: NF4 against bitsandbytes' definition (code tables,
// packing, ties, double quantization, the round-trip error bound), LoRA on
// the CPU reference (adapter gradients against finite differences, with and
// without dropout and checkpointing; B = 0 leaves the base's output; merging
// gives the adapted model's logits; QLoRA computes with the dequantized base),
// PEFT's adapter folder both ways and its refusals, and `memtune merge`.
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kernels/mem.h"
#include "kernels/nf4.h"
#include "kernels/rng.h"
#include "testutil.h"
#include "trainer/fsutil.h"
#include "trainer/hf.h"
#include "trainer/lora.h"
#include "trainer/merge.h"
#include "trainer/model.h"

static char dir[256];

// ------------------------------------------------------------------ NF4

START_TEST(nf4_tables_follow_bitsandbytes) {
    // NF4: 16 ascending values from -1 to 1 with an exact zero at index 7
    ck_assert_float_eq(mt_nf4_code[0], -1.0f);
    ck_assert_float_eq(mt_nf4_code[7], 0.0f);
    ck_assert_float_eq(mt_nf4_code[15], 1.0f);
    for (int i = 0; i < 15; i++) ck_assert(mt_nf4_code[i] < mt_nf4_code[i + 1]);
    // the dynamic map: 127 positive and 127 negative values, 0 and 1; the
    // exponent-0 decade holds the midpoints of linspace(0.1, 1, 65)
    float map[256];
    mt_nf4_dynamic_map(map);
    for (int i = 0; i < 255; i++) ck_assert_msg(map[i] < map[i + 1], "map not ascending at %d", i);
    ck_assert_float_eq(map[255], 1.0f);
    ck_assert_float_eq_tol(map[254], 0.99296875f, 1e-7f);
    ck_assert_float_eq_tol(map[0], -0.99296875f, 1e-7f);
    ck_assert_float_eq_tol(map[253], 0.97890625f, 1e-7f);
    int zero = -1, positives = 0;
    for (int i = 0; i < 256; i++) {
        if (map[i] == 0.0f) zero = i;
        positives += map[i] > 0.0f;
    }
    ck_assert_int_eq(zero, 127);
    ck_assert_int_eq(positives, 128);
    // the smallest magnitude: exponent -6, linspace(0.1, 1, 2)'s midpoint 0.55
    ck_assert_float_eq_tol(map[128], 5.5e-7f, 1e-13f);
    ck_assert_float_eq_tol(map[126], -5.5e-7f, 1e-13f);
    // 0.516 bytes per value
    ck_assert_double_eq_tol((double)mt_nf4_storage_bytes((size_t)1 << 24) / (double)(1 << 24), 0.51587, 1e-4);
}
END_TEST

START_TEST(nf4_codes_known_values_and_ties) {
    // one block of 64: absmax 2 (value -2 at index 1)
    float x[66] = {0};
    x[0] = 1.0f;    // 0.5: between 0.4407 (12) and 0.5626 (13), midpoint 0.5017 -> 12
    x[1] = -2.0f;   // -1 -> 0
    x[2] = 0.0f;    // 0 -> 7
    x[3] = 0.16f;   // 0.08 -> 8 (0.0796)
    x[4] = 2.0f;    // 1 -> 15
    x[5] = -0.37f;  // -0.185 -> 5 (-0.1848)
    // an exact midpoint goes to the lower code, the next float up to the upper
    float mid = (mt_nf4_code[9] + mt_nf4_code[10]) / 2.0f;
    x[6] = 2.0f * mid;  // exact: scaling by 2 and by 1/2 are exact
    x[7] = 2.0f * nextafterf(mid, 1.0f);
    // a second block of two values: absmax 0.5
    x[64] = 0.5f, x[65] = -0.25f;  // 1 -> 15; -0.5 -> -0.5251 (2)
    float absmax[2];
    mt_nf4_absmax_ref(absmax, x, 66);
    ck_assert_float_eq(absmax[0], 2.0f);
    ck_assert_float_eq(absmax[1], 0.5f);
    uint8_t codes[33];
    mt_nf4_codes_ref(codes, x, 66, absmax);
    ck_assert_uint_eq(codes[0], 12u << 4 | 0u);  // the first value in the high nibble
    ck_assert_uint_eq(codes[1], 7u << 4 | 8u);
    ck_assert_uint_eq(codes[2], 15u << 4 | 5u);
    ck_assert_uint_eq(codes[3], 9u << 4 | 10u);
    ck_assert_uint_eq(codes[4], 7u << 4 | 7u);  // zeros
    ck_assert_uint_eq(codes[32], 15u << 4 | 2u);
    // an all-zero block: absmax clamps to 1e-38 and every code is zero's
    float zeros[64] = {0};
    mt_nf4_absmax_ref(absmax, zeros, 64);
    ck_assert_float_eq(absmax[0], 1e-38f);
    mt_nf4_codes_ref(codes, zeros, 64, absmax);
    ck_assert_uint_eq(codes[0], 0x77u);
    // an odd count pads the last byte with zero's code
    mt_nf4_absmax_ref(absmax, x, 3);
    mt_nf4_codes_ref(codes, x, 3, absmax);
    ck_assert_uint_eq(codes[1], 7u << 4 | 7u);
}
END_TEST

// Every code is the number of midpoints below its value (the bisection's
// answer: an exact midpoint goes to the lower code) and no farther from the
// value than its neighbouring codes, over random values in blocks of absmax
// 1e-3 to 10, each midpoint and its neighbouring floats, and an odd tail.
START_TEST(nf4_codes_are_the_nearest) {
    size_t n = 64 * 600 + 31;
    float *x = malloc(n * sizeof(float)), *absmax = malloc(mt_nf4_blocks(n) * sizeof(float));
    uint8_t *codes = malloc((n + 1) / 2);
    for (size_t i = 0; i < n; i++) x[i] = powf(10.0f, (float)(i / 64 % 5) - 3.0f) * mt_rng_normal(11, i);
    for (int j = 0; j < 15; j++) {  // block 1: each midpoint exactly and one float either side, at absmax 1
        float mid = (mt_nf4_code[j] + mt_nf4_code[j + 1]) / 2.0f;
        x[64 + 3 * j] = mid, x[65 + 3 * j] = nextafterf(mid, -2.0f), x[66 + 3 * j] = nextafterf(mid, 2.0f);
    }
    x[64 + 45] = 1.0f;
    mt_nf4_absmax_ref(absmax, x, n);
    mt_nf4_codes_ref(codes, x, n, absmax);
    for (size_t i = 0; i < n; i++) {
        float v = x[i] * (1.0f / absmax[i / 64]);
        v = v < -1.0f ? -1.0f : v > 1.0f ? 1.0f : v;
        int best = 0;
        for (int k = 1; k < 16; k++) {
            float mid = (mt_nf4_code[k - 1] + mt_nf4_code[k]) / 2.0f;
            if (v > mid) best = k;
        }
        int got = i % 2 ? codes[i / 2] & 15 : codes[i / 2] >> 4;
        ck_assert_msg(got == best, "value %zu (%g of absmax %g): code %d, nearest %d", i, (double)x[i],
                      (double)absmax[i / 64], got, best);
        ck_assert(fabsf(v - mt_nf4_code[got]) <= fabsf(v - mt_nf4_code[got ? got - 1 : 0]) &&
                  fabsf(v - mt_nf4_code[got]) <= fabsf(v - mt_nf4_code[got < 15 ? got + 1 : 15]) * 1.000001f);
    }
    ck_assert_uint_eq(codes[n / 2] & 15, 7u);  // the odd tail's padding
    free(x), free(absmax), free(codes);
}
END_TEST

START_TEST(nf4_double_quantization_and_round_trip) {
    size_t n = 64 * 1000 + 40;  // 1001 blocks: 4 groups, the last partial
    float *x = malloc(n * 4), *back = malloc(n * 4), *absmax = malloc(mt_nf4_blocks(n) * 4);
    for (size_t i = 0; i < n; i++) x[i] = 0.02f * mt_rng_normal(7, i) * (1.0f + (float)(i / 64 % 7));
    mt_backend cpu;
    mt_backend_init(&cpu, -1);
    void *storage = malloc(mt_nf4_storage_bytes(n));
    mt_nf4 q;
    mt_nf4_bind(&q, storage, n);
    ck_assert_int_eq(mt_nf4_quantize(&cpu, &q, x), MT_OK);
    mt_nf4_absmax_ref(absmax, x, n);
    size_t blocks = mt_nf4_blocks(n);
    double mean = 0;
    for (size_t b = 0; b < blocks; b++) mean += absmax[b];
    mean /= (double)blocks;
    ck_assert_float_eq_tol(q.offset, (float)mean, 1e-7f);
    float map[256];
    mt_nf4_dynamic_map(map);
    for (size_t g = 0; g < mt_nf4_groups(n); g++) {
        float m = 0;
        for (size_t b = g * 256; b < blocks && b < (g + 1) * 256; b++) m = fmaxf(m, fabsf(absmax[b] - q.offset));
        ck_assert_float_eq(q.absmax2[g], m);
    }
    // each absmax comes back within half a gap of the dynamic map (at most
    // 0.9/64/2 of its group's scale), and codes were chosen with the exact one
    for (size_t b = 0; b < blocks; b++) {
        float scale = mt_nf4_block_scale(&q, map, b);
        ck_assert_msg(fabsf(scale - absmax[b]) <= 0.0070313f * q.absmax2[b / 256] + 1e-7f, "block %zu", b);
    }
    mt_nf4_dequantize_ref(back, &q);
    float widest_gap = 0;
    for (int i = 0; i < 15; i++) widest_gap = fmaxf(widest_gap, mt_nf4_code[i + 1] - mt_nf4_code[i]);
    double se = 0, sx = 0;
    for (size_t i = 0; i < n; i++) {
        size_t b = i / 64;
        float scale = mt_nf4_block_scale(&q, map, b);
        // half the widest NF4 gap (-1 to -0.696) of the block, plus the absmax's own error
        float bound = 0.5f * widest_gap * absmax[b] + fabsf(scale - absmax[b]) + 1e-6f;
        ck_assert_msg(fabsf(back[i] - x[i]) <= bound, "value %zu: %g vs %g (bound %g)", i, back[i], x[i], bound);
        se += (double)(back[i] - x[i]) * (back[i] - x[i]);
        sx += (double)x[i] * x[i];
    }
    // 4 bits on normal data: about a tenth of the signal's RMS
    double rel = sqrt(se / sx);
    ck_assert_msg(rel > 0.05 && rel < 0.12, "relative RMS error %g", rel);
    free(x), free(back), free(absmax), free(storage);
}
END_TEST

// ----------------------------------------------------------------- model

static void tiny_folder(char *out, size_t len) { tu_model_folder(dir, "tiny", tu_tiny_llama_json, out, len); }

// The tiny model's config, with weights drawn large enough to matter.
static void tiny_config(mt_model_config *c) {
    char folder[300];
    tiny_folder(folder, sizeof folder);
    ck_assert_int_eq(mt_hf_read_config(folder, c), MT_OK);
    c->init_std = 0.3f;
}

enum { B = 2, T = 5, N = B * T };

typedef struct {
    mt_model *model;
    float *adapters;
    int32_t inputs[N], targets[N];
    int training;  // evaluate the loss with dropout (as a backward step does)
} lora_ctx;

static double lora_loss(void *p) {
    lora_ctx *c = p;
    mt_model_set_adapters(c->model, c->adapters);
    return mt_model_step(c->model, c->inputs, c->targets, 0.0f, c->training);
}

static float *random_base(const mt_model_config *c) {
    int n;
    size_t total;
    free(mt_model_param_table(c, &n, &total));
    float *params = malloc(total * 4);
    mt_model_init_random(c, params, 3);
    return params;
}

static float *random_adapters(const mt_model_config *c, const mt_lora_config *lora, uint64_t seed) {
    int n;
    size_t total;
    mt_param_info *table = mt_lora_param_table(c, lora, &n, &total);
    float *params = calloc(total, 4);
    mt_lora_init_params(table, n, params, seed);
    // B non-zero, as after some training
    for (int i = 0; i < n; i++)
        if (strstr(table[i].name, "lora_B"))
            for (size_t j = 0; j < table[i].count; j++)
                params[table[i].offset + j] = 0.3f * mt_rng_normal(seed + 1, table[i].offset + j);
    free(table);
    return params;
}

START_TEST(lora_gradients_match_finite_differences) {
    mt_model_config c;
    mt_backend be;
    mt_backend_init(&be, -1);
    // dropout off and on (the mask is fixed by the seed, so the loss is a
    // function of the adapters); with and without checkpointing; a subset of
    // targets with rsLoRA; Phi-3's fused modules (k, v share qkv_proj's A and
    // take rows of its B; up gate_up_proj's)
    struct {
        float dropout;
        int checkpointing, rslora;
        const char *targets;
    } variants[] = {{0.0f, 0, 0, "all-linear"},
                    {0.25f, 1, 0, "all-linear"},
                    {0.1f, 0, 1, "q_proj,v_proj,down_proj"},
                    {0.1f, 1, 0, "qkv_proj,o_proj,gate_up_proj"}};
    for (int v = 0; v < 4; v++) {
        tiny_config(&c);
        c.fused = v == 3;
        float *base = random_base(&c);
        mt_model_options o = {.B = B,
                              .T = T,
                              .activation_checkpointing = variants[v].checkpointing,
                              .lora = {3, 6.0f, variants[v].dropout, variants[v].rslora, 0},
                              .offload_activations = variants[v].checkpointing};
        ck_assert_int_eq(mt_lora_parse_targets(variants[v].targets, &o.lora.targets), MT_OK);
        mt_model *m;
        ck_assert_int_eq(mt_model_create_with(&m, &be, &c, &o), MT_OK);
        ck_assert_int_eq(mt_model_set_weights(m, base), MT_OK);
        ck_assert_ptr_null(mt_model_grads(m));  // the base has no gradient buffer
        lora_ctx ctx = {m, random_adapters(&c, &o.lora, 11 + v), {0}, {0}, 1};
        for (int i = 0; i < N; i++)
            ctx.inputs[i] = (int32_t)(mt_rng_bits(4, i) % 13), ctx.targets[i] = (int32_t)(mt_rng_bits(5, i) % 13);
        ctx.targets[3] = -1;
        mt_model_set_dropout_seed(m, 99);
        mt_model_set_adapters(m, ctx.adapters);
        mt_model_zero_grads(m);
        mt_model_step(m, ctx.inputs, ctx.targets, 1.0f, 1);
        mt_trainable tr;
        mt_model_trainable(m, &tr);
        float *grads = malloc(tr.total * 4);
        memcpy(grads, tr.grads, tr.total * 4);
        double norm = 0;
        for (int i = 0; i < tr.count; i++) {
            // a step of 2e-3: 1e-2's curvature error reached 0.04 on some draws of the base, 1e-3's fp32
            // rounding 0.027; 2e-3 stays under 0.025 over base seeds 3 to 6
            double err = tu_fd_check(lora_loss, &ctx, ctx.adapters + tr.params[i].offset, grads + tr.params[i].offset,
                                     tr.params[i].count, 5, 2e-3);
            ck_assert_msg(err < 3e-2, "variant %d %s: finite-difference error %g", v, tr.params[i].name, err);
            for (size_t j = 0; j < tr.params[i].count; j++)
                norm += (double)grads[tr.params[i].offset + j] * grads[tr.params[i].offset + j];
        }
        ck_assert(norm > 1e-6);  // the check saw real gradients
        free(grads);
        free(ctx.adapters);
        mt_model_free(m);
        free(base);
    }
}
END_TEST

START_TEST(lora_zero_b_merge_and_qlora) {
    mt_model_config c;
    tiny_config(&c);
    mt_backend be;
    mt_backend_init(&be, -1);
    float *base = random_base(&c);
    int32_t inputs[N];
    for (int i = 0; i < N; i++) inputs[i] = (int32_t)(mt_rng_bits(4, i) % 13);
    size_t nl = (size_t)N * c.V;
    float *plain = malloc(nl * 4), *adapted = malloc(nl * 4), *merged = malloc(nl * 4);
    mt_model *full;
    ck_assert_int_eq(mt_model_create(&full, &be, &c, B, T, 0), MT_OK);
    ck_assert_int_eq(mt_model_set_weights(full, base), MT_OK);
    mt_model_logits(full, inputs, plain);
    // PEFT's init (B = 0): the adapted model computes the base's logits exactly
    mt_model_options o = {.B = B, .T = T, .lora = {4, 8.0f, 0.1f, 0, (1u << MT_LORA_MODULES) - 1}};
    int na;
    size_t ta;
    mt_param_info *table = mt_lora_param_table(&c, &o.lora, &na, &ta);
    ck_assert_int_eq(na, 2 * 7 * c.L);
    ck_assert_str_eq(table[0].name, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
    ck_assert_str_eq(table[13].name, "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight");
    float *adapters = calloc(ta, 4);
    mt_lora_init_params(table, na, adapters, 5);
    float bound = 1.0f / sqrtf(16.0f), amax = 0;
    for (size_t j = 0; j < table[0].count; j++) amax = fmaxf(amax, fabsf(adapters[table[0].offset + j]));
    ck_assert(amax <= bound && amax > 0.8f * bound);  // Kaiming-uniform A
    mt_model *m;
    ck_assert_int_eq(mt_model_create_with(&m, &be, &c, &o), MT_OK);
    ck_assert_int_eq(mt_model_set_weights(m, base), MT_OK);
    mt_model_set_adapters(m, adapters);
    mt_model_logits(m, inputs, adapted);
    ck_assert_mem_eq(adapted, plain, nl * 4);
    // trained adapters, merged into the base: the same logits as the adapted model
    free(adapters);
    adapters = random_adapters(&c, &o.lora, 21);
    mt_model_set_adapters(m, adapters);
    mt_model_logits(m, inputs, adapted);
    ck_assert(tu_norm_rel_error(adapted, plain, nl) > 1e-3);
    int nb;
    size_t tb;
    free(mt_model_param_table(&c, &nb, &tb));
    float *merged_base = malloc(tb * 4);
    memcpy(merged_base, base, tb * 4);
    mt_lora_merge(&c, &o.lora, merged_base, adapters);
    ck_assert_int_eq(mt_model_set_weights(full, merged_base), MT_OK);
    mt_model_logits(full, inputs, merged);
    ck_assert_msg(tu_norm_rel_error(merged, adapted, nl) < 1e-5, "merged %g", tu_norm_rel_error(merged, adapted, nl));
    // QLoRA: the NF4 model computes what the LoRA model computes on the
    // dequantized base, exactly (the CPU dequantizes to fp32)
    mt_model_options oq = o;
    oq.quantize_nf4 = 1;
    mt_model *mq;
    ck_assert_int_eq(mt_model_create_with(&mq, &be, &c, &oq), MT_OK);
    ck_assert_int_eq(mt_model_set_weights(mq, base), MT_OK);
    mt_model_set_adapters(mq, adapters);
    float *deq_base = malloc(tb * 4);
    memcpy(deq_base, base, tb * 4);
    int nparams;
    const mt_param_info *info = mt_model_params(m, &nparams);
    size_t quantized = 0;
    for (int i = 0; i < nparams; i++) {
        if (info[i].ndim != 2 || strstr(info[i].name, "embed") || strstr(info[i].name, "lm_head")) continue;
        void *storage = malloc(mt_nf4_storage_bytes(info[i].count));
        mt_nf4 q;
        mt_nf4_bind(&q, storage, info[i].count);
        ck_assert_int_eq(mt_nf4_quantize(&be, &q, base + info[i].offset), MT_OK);
        mt_nf4_dequantize_ref(deq_base + info[i].offset, &q);
        quantized += info[i].count;
        free(storage);
    }
    // per layer q 16x16, k and v 8x16, o 16x16, gate and up 24x16, down 16x24
    ck_assert_uint_eq(quantized, (size_t)c.L * 1920);
    ck_assert(mt_model_base_weight_bytes(mq) < mt_model_base_weight_bytes(m));
    ck_assert_int_eq(mt_model_set_weights(m, deq_base), MT_OK);
    float *qlogits = malloc(nl * 4);
    mt_model_logits(m, inputs, adapted);
    mt_model_logits(mq, inputs, qlogits);
    ck_assert_mem_eq(qlogits, adapted, nl * 4);
    // and the same gradients (with dropout: both draw the same masks)
    int32_t targets[N];
    for (int i = 0; i < N; i++) targets[i] = (int32_t)(mt_rng_bits(5, i) % 13);
    mt_model_set_dropout_seed(m, 7);
    mt_model_set_dropout_seed(mq, 7);
    mt_model_zero_grads(m);
    mt_model_zero_grads(mq);
    ck_assert_double_eq(mt_model_step(m, inputs, targets, 1.0f, 1), mt_model_step(mq, inputs, targets, 1.0f, 1));
    mt_trainable a, b;
    mt_model_trainable(m, &a);
    mt_model_trainable(mq, &b);
    ck_assert_mem_eq(a.grads, b.grads, a.total * 4);
    free(qlogits), free(deq_base), free(merged_base), free(adapters), free(table);
    free(plain), free(adapted), free(merged), free(base);
    mt_model_free(m), mt_model_free(mq), mt_model_free(full);
}
END_TEST

// A model of the comparisons below: the base, its adapters (NULL: none),
// the dropout seed, gradients zeroed.
static void set_model(mt_model *m, const float *base, const float *adapters, uint64_t dropout_seed) {
    ck_assert_int_eq(mt_model_set_weights(m, base), MT_OK);
    if (adapters) mt_model_set_adapters(m, adapters);
    mt_model_set_dropout_seed(m, dropout_seed);
    mt_model_zero_grads(m);
}

// Offloading the checkpointed layer inputs to host memory moves bytes, never
// values: loss and gradients are bit-identical (full fine-tune and QLoRA),
// whether all of them go (gpu_layer_inputs 0), the first few stay
// (1, 2), all but the last, which never leaves, stay (4 of L = 5), or more
// are asked than there are (9: as 4); and whether none, the last 2 or all of
// the offloaded ones (ssd_layer_inputs 9) live in a mapped file. Host memory
// holds the others only, the file the last ones.
START_TEST(offloaded_layer_inputs_change_nothing) {
    mt_model_config c;
    tiny_config(&c);
    c.L = 5;
    mt_backend be;
    mt_backend_init(&be, -1);
    float *base = random_base(&c);
    int32_t inputs[N], targets[N];
    for (int i = 0; i < N; i++)
        inputs[i] = (int32_t)(mt_rng_bits(4, i) % 13), targets[i] = (int32_t)(mt_rng_bits(5, i) % 13);
    const int kept[] = {0, 1, 2, 4, 9}, on_disk[] = {0, 2, 9};
    char file_dir[256];
    tu_tempdir(file_dir, sizeof file_dir);
    for (int lora = 0; lora < 2; lora++) {
        mt_model_options o = {.B = B,
                              .T = T,
                              .activation_checkpointing = 1,
                              .lora = {lora ? 4 : 0, 8.0f, 0.1f, 0, lora ? (1u << MT_LORA_MODULES) - 1 : 0},
                              .quantize_nf4 = lora};
        mt_model *a;
        ck_assert_int_eq(mt_model_create_with(&a, &be, &c, &o), MT_OK);
        float *adapters = lora ? random_adapters(&c, &o.lora, 3) : NULL;
        set_model(a, base, adapters, 5);
        double want = mt_model_step(a, inputs, targets, 1.0f, 1);
        want += mt_model_step(a, inputs, targets, 1.0f, 1);  // twice: the slots are reused
        mt_trainable ta;
        mt_model_trainable(a, &ta);
        for (size_t j = 0; j < sizeof kept / sizeof *kept * 3; j++) {
            size_t k = j / 3, d = j % 3;
            mt_mem_tally before, after;
            mt_mem_get_tally(MT_HOST, &before);
            size_t mapped = mt_mem_mapped_bytes();
            mt_model_options off = o;
            off.offload_activations = 1, off.gpu_layer_inputs = kept[k];
            off.ssd_layer_inputs = on_disk[d], off.activations_dir = on_disk[d] ? file_dir : NULL;
            mt_model *b;
            ck_assert_int_eq(mt_model_create_with(&b, &be, &c, &off), MT_OK);
            mt_mem_get_tally(MT_HOST, &after);
            int gone = c.L - 1 - (kept[k] < c.L - 1 ? kept[k] : c.L - 1), filed = on_disk[d] < gone ? on_disk[d] : gone;
            ck_assert_uint_eq(after.current[MT_MEM_OFFLOAD] - before.current[MT_MEM_OFFLOAD],
                              (size_t)(gone - filed) * N * c.C * 4);
            ck_assert_uint_eq(mt_mem_mapped_bytes() - mapped, (size_t)filed * N * c.C * 4);
            set_model(b, base, adapters, 5);
            double loss = mt_model_step(b, inputs, targets, 1.0f, 1);
            loss += mt_model_step(b, inputs, targets, 1.0f, 1);
            ck_assert_msg(loss == want,
                          "lora %d, %d layer inputs kept, %d in the file: loss %.17g, without offload %.17g", lora,
                          kept[k], filed, loss, want);
            mt_trainable tb;
            mt_model_trainable(b, &tb);
            ck_assert_mem_eq(ta.grads, tb.grads, ta.total * 4);
            mt_model_free(b);
        }
        free(adapters);
        mt_model_free(a);
    }
    rmdir(file_dir);  // (the files were deleted at their creation)
    free(base);
}
END_TEST

// model.weights: cpu: the frozen base in a host store, each layer copied
// into one of two slots before it runs, gives the resident model's losses
// and adapter gradients bit for bit (LoRA and QLoRA, with checkpointing and
// with offloaded layer inputs, Phi-3's fused modules, two steps: the slots
// refilled), and a forward-only model's logits; the slots hold two layers.
// With the first layers resident (model.resident_layers: none, 1, 2, all 4
// and 3 of the variants) the same, each such layer taking a slot's bytes
// more on the backend and crossing once.
START_TEST(streamed_weights_change_nothing) {
    mt_backend be;
    mt_backend_init(&be, -1);
    int32_t inputs[N], targets[N];
    for (int i = 0; i < N; i++)
        inputs[i] = (int32_t)(mt_rng_bits(4, i) % 13), targets[i] = (int32_t)(mt_rng_bits(5, i) % 13);
    for (int v = 0; v < 5; v++) {
        mt_model_config c;
        tiny_config(&c);
        c.L = 4, c.fused = v == 4;
        float *base = random_base(&c);
        int nf4 = v == 1 || v == 3 || v == 4, ckpt = v >= 2;
        mt_model_options o = {.B = B,
                              .T = T,
                              .activation_checkpointing = ckpt,
                              .offload_activations = v == 3,
                              .lora = {4, 8.0f, 0.1f, 0, (1u << MT_LORA_MODULES) - 1},
                              .quantize_nf4 = nf4};
        mt_model_options so = o;
        so.stream_weights = 1;
        char file_dir[256];
        tu_tempdir(file_dir, sizeof file_dir);
        so.weights_dir = v % 2 ? file_dir : NULL;  // LoRA's NF4 variants: the base in a file (model.weights: ssd)
        so.resident_layers = (const int[]){0, 1, 2, 4, 3}[v];
        mt_model *a, *b;
        ck_assert_int_eq(mt_model_create_with(&a, &be, &c, &o), MT_OK);
        size_t mapped = mt_mem_mapped_bytes();
        mt_mem_tally before, after;
        mt_mem_get_tally(MT_HOST, &before);
        ck_assert_int_eq(mt_model_create_with(&b, &be, &c, &so), MT_OK);
        mt_mem_get_tally(MT_HOST, &after);
        // in host memory's tally: the base's store unless it is mapped from the file (already deleted), and
        // the offloaded layer inputs
        mt_model_bytes planned;
        mt_model_plan_bytes(0, -1, &c, &so, NULL, &planned, NULL);
        size_t store = so.weights_dir ? 0 : mt_model_base_weight_bytes(a);
        ck_assert_uint_eq(after.current[MT_MEM_OFFLOAD] - before.current[MT_MEM_OFFLOAD], store + planned.offload_host);
        ck_assert_uint_eq(mt_mem_mapped_bytes() - mapped, so.weights_dir ? mt_model_base_weight_bytes(a) : 0);
        ck_assert_int_eq(rmdir(file_dir), 0);
        float *adapters = random_adapters(&c, &o.lora, 3);
        mt_model *models[2] = {a, b};
        double loss[2][2];
        for (int k = 0; k < 2; k++) {
            set_model(models[k], base, adapters, 5);
            loss[k][0] = mt_model_step(models[k], inputs, targets, 1.0f, 1);
            loss[k][1] = mt_model_step(models[k], targets, inputs, 1.0f, 1);
        }
        ck_assert_msg(loss[0][0] == loss[1][0] && loss[0][1] == loss[1][1],
                      "variant %d: losses %.17g %.17g, %.17g %.17g", v, loss[0][0], loss[1][0], loss[0][1], loss[1][1]);
        mt_trainable ta, tb;
        mt_model_trainable(a, &ta);
        mt_model_trainable(b, &tb);
        ck_assert_mem_eq(ta.grads, tb.grads, ta.total * 4);
        // on the backend: the outer tensors and two layer slots, not the base
        mt_model_bytes ra, rb;
        mt_model_plan_bytes(0, -1, &c, &o, NULL, &ra, NULL);
        mt_model_plan_bytes(0, -1, &c, &so, NULL, &rb, NULL);
        ck_assert_uint_eq(rb.weights_host, mt_model_base_weight_bytes(a));
        mt_model_options none = so;  // every layer streamed: each kept one adds its slot, and crosses no more
        none.resident_layers = 0;
        mt_model_bytes rn;
        mt_model_plan_bytes(0, -1, &c, &none, NULL, &rn, NULL);
        ck_assert_uint_lt(rn.weights, ra.weights);
        size_t layer = rn.weights_streamed / (size_t)c.L;
        ck_assert_uint_eq(rn.weights_streamed, layer * (size_t)c.L);
        ck_assert_uint_eq(rb.weights_streamed, (size_t)(c.L - so.resident_layers) * layer);
        ck_assert_uint_ge(rb.weights - rn.weights, (size_t)so.resident_layers * layer);
        ck_assert_uint_le(rb.weights - rn.weights, (size_t)so.resident_layers * (layer + 512));
        free(adapters);
        mt_model_free(a), mt_model_free(b);
        free(base);
    }
    // a forward-only model of the whole base (evaluation)
    mt_model_config c;
    tiny_config(&c);
    float *base = random_base(&c);
    mt_model_options o = {.B = B, .T = T, .forward_only = 1}, so = o;
    so.stream_weights = 1;
    mt_model *a, *b;
    ck_assert_int_eq(mt_model_create_with(&a, &be, &c, &o), MT_OK);
    ck_assert_int_eq(mt_model_create_with(&b, &be, &c, &so), MT_OK);
    ck_assert_int_eq(mt_model_set_weights(a, base), MT_OK);
    ck_assert_int_eq(mt_model_set_weights(b, base), MT_OK);
    float *la = malloc((size_t)N * c.V * 4), *lb = malloc((size_t)N * c.V * 4);
    mt_model_logits(a, inputs, la);
    mt_model_logits(b, inputs, lb);
    ck_assert_mem_eq(la, lb, (size_t)N * c.V * 4);
    free(la), free(lb), free(base);
    mt_model_free(a), mt_model_free(b);
}
END_TEST

// The MLP in tiles of rows under LoRA: each tile's adapters see their rows'
// part of the dropout mask, so the loss is the untiled model's bit for bit
// and the adapters' gradients within fp32's reordering over tiles (dropout,
// QLoRA, checkpointing, Phi-3's fused gate_up_proj; and without dropout,
// where the untiled model keeps k's, v's and up's du in f1 and the tiled
// one, whose 3-row f1 is too small for them, in lora_du's further slots).
START_TEST(tiled_mlp_under_lora_equals_untiled) {
    mt_backend be;
    mt_backend_init(&be, -1);
    int32_t inputs[N], targets[N];
    for (int i = 0; i < N; i++)
        inputs[i] = (int32_t)(mt_rng_bits(14, i) % 13), targets[i] = (int32_t)(mt_rng_bits(15, i) % 13);
    for (int v = 0; v < 5; v++) {
        mt_model_config c;
        tiny_config(&c);
        c.fused = v == 3;
        float *base = random_base(&c);
        mt_model_options o = {.B = B,
                              .T = T,
                              .activation_checkpointing = v >= 1 && v <= 3,
                              .lora = {4, 8.0f, v == 4 ? 0.0f : 0.25f, 0, (1u << MT_LORA_MODULES) - 1},
                              .quantize_nf4 = v == 2},
                         ot = o;
        ot.mlp_tile_rows = 3;
        mt_model *a, *b;
        ck_assert_int_eq(mt_model_create_with(&a, &be, &c, &o), MT_OK);
        ck_assert_int_eq(mt_model_create_with(&b, &be, &c, &ot), MT_OK);
        float *adapters = random_adapters(&c, &o.lora, 7);
        mt_model *models[2] = {a, b};
        double loss[2];
        for (int k = 0; k < 2; k++) {
            set_model(models[k], base, adapters, 17);
            loss[k] = mt_model_step(models[k], inputs, targets, 1.0f, 1);
        }
        ck_assert_msg(loss[0] == loss[1], "variant %d: loss %.17g, tiled %.17g", v, loss[0], loss[1]);
        mt_trainable ta, tb;
        mt_model_trainable(a, &ta);
        mt_model_trainable(b, &tb);
        double err = tu_norm_rel_error(tb.grads, ta.grads, ta.total);
        ck_assert_msg(err < 1e-6, "variant %d: adapter gradients differ by %g", v, err);
        free(adapters);
        mt_model_free(a), mt_model_free(b);
        free(base);
    }
}
END_TEST

// ------------------------------------------------------------ PEFT files

START_TEST(peft_folder_round_trip_and_refusals) {
    char folder[300], adapter[400], path[500];
    tiny_folder(folder, sizeof folder);
    mt_model_config c;
    ck_assert_int_eq(mt_hf_read_config(folder, &c), MT_OK);
    mt_lora_config lora = {4, 8.0f, 0.05f, 1, 0};
    ck_assert_int_eq(mt_lora_parse_targets("q_proj, v_proj,mlp.down_proj", &lora.targets), MT_OK);
    ck_assert_uint_eq(lora.targets, 1u << MT_LORA_Q | 1u << MT_LORA_V | 1u << MT_LORA_DOWN);
    int n;
    size_t total;
    mt_param_info *table = mt_lora_param_table(&c, &lora, &n, &total);
    // room for the larger tables tried below
    float *params = random_adapters(&c, &lora, 3), *back = malloc(4 * total * 4);
    snprintf(adapter, sizeof adapter, "%s/adapter", dir);
    ck_assert_int_eq(mt_lora_save(adapter, &lora, folder, table, n, params), MT_OK);
    mt_lora_config read;
    ck_assert_int_eq(mt_lora_read_config(adapter, &read), MT_OK);
    ck_assert_int_eq(read.r, 4);
    ck_assert_float_eq(read.alpha, 8.0f);
    ck_assert_float_eq_tol(read.dropout, 0.05f, 1e-7f);
    ck_assert_int_eq(read.rslora, 1);
    ck_assert_uint_eq(read.targets, lora.targets);
    ck_assert_int_eq(mt_lora_load(adapter, &c, &read, back), MT_OK);
    for (int i = 0; i < n; i++) ck_assert_mem_eq(back + table[i].offset, params + table[i].offset, table[i].count * 4);
    // refusals name the problem
    ck_assert_int_eq(mt_lora_parse_targets("q_proj,lm_head", &read.targets), MT_ERR_CONFIG);
    ck_assert(strstr(mt_last_error(), "'lm_head'") != NULL);
    static const struct {
        const char *json, *message;
        mt_err err;
    } bad[] = {
        {"{\"peft_type\":\"LORA\",\"r\":4,\"target_modules\":[\"q_proj\"],\"use_dora\":true}", "use_dora",
         MT_ERR_MODEL},
        {"{\"peft_type\":\"IA3\",\"r\":4,\"target_modules\":[\"q_proj\"]}", "LORA adapters only", MT_ERR_MODEL},
        {"{\"peft_type\":\"LORA\",\"r\":0,\"target_modules\":[\"q_proj\"]}", "\"r\" must be", MT_ERR_FORMAT},
        {"{\"peft_type\":\"LORA\",\"r\":4,\"target_modules\":\".*proj\"}", "pattern", MT_ERR_MODEL},
        {"{\"peft_type\":\"LORA\",\"r\":4,\"target_modules\":[\"q_proj\"],\"rank_pattern\":{\"q_proj\":8}}",
         "rank_pattern", MT_ERR_MODEL},
        {"{\"peft_type\":\"LORA\",\"r\":4,\"target_modules\":[\"q_proj\"],\"bias\":\"all\"}", "bias", MT_ERR_MODEL},
        {"{\"peft_type\":\"LORA\",\"r\":4,\"target_modules\":[\"embed_tokens\"]}", "embed_tokens", MT_ERR_MODEL},
        {"{\"peft_type\":\"LORA\",\"r\":4,\"target_modules\":[\"q_proj\"],\"modules_to_save\":[\"lm_head\"]}",
         "modules_to_save", MT_ERR_MODEL},
        {"not json", "not valid JSON", MT_ERR_FORMAT},
    };
    char bad_dir[400];
    snprintf(bad_dir, sizeof bad_dir, "%s/bad-adapter", dir);
    mkdir(bad_dir, 0755);
    snprintf(path, sizeof path, "%s/adapter_config.json", bad_dir);
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        ck_assert_int_eq(mt_write_text(path, bad[i].json), MT_OK);
        tu_expect_error(mt_lora_read_config(bad_dir, &read), bad[i].err, bad[i].message);
    }
    // tensors: one missing (the config names more modules), or of another shape (another base)
    mt_lora_config more = lora;
    more.targets |= 1u << MT_LORA_K;
    tu_expect_error(mt_lora_load(adapter, &c, &more, back), MT_ERR_FORMAT, "k_proj.lora_A.weight is missing");
    mt_lora_config wider = lora;
    wider.r = 5;
    tu_expect_error(mt_lora_load(adapter, &c, &wider, back), MT_ERR_MODEL, "another base model");
    mt_lora_config fewer = lora;
    fewer.targets = 1u << MT_LORA_Q;
    tu_expect_error(mt_lora_load(adapter, &c, &fewer, back), MT_ERR_MODEL, "is not part of a LoRA adapter");
    free(table), free(params), free(back);
}
END_TEST

START_TEST(merge_writes_a_new_folder) {
    char folder[300], adapter[400], out[400];
    tiny_folder(folder, sizeof folder);
    mt_model_config c;
    ck_assert_int_eq(mt_hf_read_config(folder, &c), MT_OK);
    c.init_std = 0.3f;
    float *base = random_base(&c);
    ck_assert_int_eq(mt_hf_save(folder, NULL, &c, base, MT_DTYPE_F32), MT_OK);
    mt_lora_config lora = {2, 4.0f, 0.0f, 0, (1u << MT_LORA_MODULES) - 1};
    int n;
    size_t total;
    mt_param_info *table = mt_lora_param_table(&c, &lora, &n, &total);
    float *adapters = random_adapters(&c, &lora, 8);
    snprintf(adapter, sizeof adapter, "%s/merge-adapter", dir);
    ck_assert_int_eq(mt_lora_save(adapter, &lora, folder, table, n, adapters), MT_OK);
    snprintf(out, sizeof out, "%s/merged", dir);
    ck_assert_int_eq(mt_lora_merge_folders(folder, adapter, out), MT_OK);
    int nb;
    size_t tb;
    free(mt_model_param_table(&c, &nb, &tb));
    float *expect = malloc(tb * 4), *got = malloc(tb * 4);
    memcpy(expect, base, tb * 4);
    mt_lora_merge(&c, &lora, expect, adapters);
    ck_assert_int_eq(mt_hf_load_weights(out, &c, got), MT_OK);
    ck_assert_mem_eq(got, expect, tb * 4);
    ck_assert(memcmp(got, base, tb * 4) != 0);
    // an existing output folder is never overwritten
    tu_expect_error(mt_lora_merge_folders(folder, adapter, out), MT_ERR_USAGE, "already exists");
    tu_expect_error(mt_lora_merge_folders(folder, "/nonexistent-adapter", adapter), MT_ERR_USAGE, "already exists");
    snprintf(out, sizeof out, "%s/merged2", dir);
    tu_expect_error(mt_lora_merge_folders(folder, "/nonexistent-adapter", out), MT_ERR_IO, "adapter_config.json");
    ck_assert_int_ne(access(out, F_OK), 0);
    free(table), free(adapters), free(base), free(expect), free(got);
}
END_TEST

int main(void) {
    tu_tempdir(dir, sizeof dir);
    Suite *s = suite_create("lora");
    TCase *tc = tcase_create("lora");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, nf4_tables_follow_bitsandbytes);
    tcase_add_test(tc, nf4_codes_known_values_and_ties);
    tcase_add_test(tc, nf4_codes_are_the_nearest);
    tcase_add_test(tc, nf4_double_quantization_and_round_trip);
    tcase_add_test(tc, lora_gradients_match_finite_differences);
    tcase_add_test(tc, lora_zero_b_merge_and_qlora);
    tcase_add_test(tc, offloaded_layer_inputs_change_nothing);
    tcase_add_test(tc, streamed_weights_change_nothing);
    tcase_add_test(tc, tiled_mlp_under_lora_equals_untiled);
    tcase_add_test(tc, peft_folder_round_trip_and_refusals);
    tcase_add_test(tc, merge_writes_a_new_folder);
    suite_add_tcase(s, tc);
    int status = tu_run_suite(s, 0);
    mt_remove_tree(dir);
    return status;
}
