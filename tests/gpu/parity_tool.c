// tests/gpu/parity_tool.c: dumps what memtune computes for one batch, for
// the comparison with Hugging Face transformers and PEFT
// (tests/gpu/hf_parity.py, tests/gpu/peft_parity.py): logits, the mean loss
// and (with --grads) every trained parameter's gradient, as a safetensors
// file. With --adapter, a PEFT LoRA folder is applied (dropout off) and the
// gradients are the adapters'; --quantize nf4 makes it QLoRA. With --nf4, it
// dumps memtune's NF4 quantization of the tensor "weight" of a safetensors
// file instead (CPU and GPU), for the comparison with bitsandbytes. Not a
// user command.
//
// usage: mt_parity --model DIR --tokens FILE --batch B --seq T --device cpu|gpu
//                  --out FILE [--grads] [--checkpointing] [--adapter DIR] [--quantize nf4]
//        mt_parity --nf4 FILE --out FILE
// FILE of tokens: B*(T+1) little-endian int32; inputs are [:, :T], targets [:, 1:].
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/device.h"
#include "kernels/nf4.h"
#include "trainer/hf.h"
#include "trainer/lora.h"
#include "trainer/model.h"
#include "trainer/safetensors.h"

static int die(mt_err err) {
    fprintf(stderr, "mt_parity: %s\n", mt_last_error()[0] ? mt_last_error() : mt_err_message(err));
    return 1;
}

static float *bytes_as_floats(const uint8_t *bytes, size_t n) {
    float *f = malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) f[i] = bytes[i];
    return f;
}

// memtune's NF4 storage of `weight` from the CPU reference and the GPU.
static int dump_nf4(const char *in, const char *out) {
    mt_safetensors *st;
    mt_err err = mt_safetensors_open(&st, in);
    if (err) return die(err);
    const mt_st_tensor *t = mt_safetensors_find(st, "weight");
    if (!t) return fprintf(stderr, "mt_parity: %s has no tensor 'weight'\n", in), 1;
    size_t n = 1;
    for (int d = 0; d < t->ndim; d++) n *= (size_t)t->shape[d];
    float *w = malloc(n * sizeof(float));
    if ((err = mt_safetensors_read_f32(st, t, w))) return die(err);
    size_t bytes = mt_nf4_storage_bytes(n), blocks = mt_nf4_blocks(n), groups = mt_nf4_groups(n);
    mt_backend cpu, gpu;
    mt_backend_init(&cpu, -1);
    void *store = malloc(bytes), *gpu_store = NULL;
    mt_nf4 q, qg;
    mt_nf4_bind(&q, store, n);
    if ((err = mt_nf4_quantize(&cpu, &q, w))) return die(err);
    float *deq = malloc(n * sizeof(float)), map[256];
    mt_nf4_dequantize_ref(deq, &q);
    mt_nf4_dynamic_map(map);
    uint8_t *gpu_codes = malloc((n + 1) / 2);
    uint16_t *gpu_deq16 = malloc(n * 2);
    float *gpu_deq = malloc(n * sizeof(float));
    int have_gpu = mt_device_count() > 0 && mt_backend_init(&gpu, 0) == MT_OK;
    if (have_gpu) {
        gpu_store = mt_device_malloc(bytes);
        mt_nf4_bind(&qg, gpu_store, n);
        if ((err = mt_nf4_quantize(&gpu, &qg, w))) return die(err);
        mt_copy_to_host(gpu_codes, qg.codes, (n + 1) / 2);
        void *d = mt_device_malloc(n * 2);
        mt_nf4_dequantize(&gpu, d, &qg);
        mt_copy_to_host(gpu_deq16, d, n * 2);
        for (size_t i = 0; i < n; i++) gpu_deq[i] = mt_bf16_to_f32(gpu_deq16[i]);
    }
    float *codes = bytes_as_floats(q.codes, (n + 1) / 2), *absmax_q = bytes_as_floats(q.absmax_q, blocks);
    float *codes_gpu = bytes_as_floats(gpu_codes, have_gpu ? (n + 1) / 2 : 0);
    mt_st_write_tensor ts[] = {
        {"codes", 1, {(int64_t)((n + 1) / 2)}, codes},
        {"absmax_q", 1, {(int64_t)blocks}, absmax_q},
        {"absmax2", 1, {(int64_t)groups}, q.absmax2},
        {"offset", 1, {1}, &q.offset},
        {"dequantized", 1, {(int64_t)n}, deq},
        {"dynamic_map", 1, {256}, map},
        {"codes_gpu", 1, {(int64_t)((n + 1) / 2)}, codes_gpu},
        {"dequantized_gpu", 1, {(int64_t)n}, gpu_deq},
    };
    if ((err = mt_safetensors_write(out, ts, have_gpu ? 8 : 6, MT_DTYPE_F32, "pt"))) return die(err);
    fprintf(stderr, "mt_parity: NF4 of %zu values (%s)\n", n, have_gpu ? "CPU and GPU" : "CPU only");
    return 0;
}

int main(int argc, char **argv) {
    const char *model_dir = NULL, *tokens_path = NULL, *out = NULL, *device = "cpu", *adapter = NULL;
    const char *nf4_input = NULL;
    int B = 0, T = 0, grads = 0, checkpointing = 0, quantize = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : "";
        if (!strcmp(a, "--model"))
            model_dir = v, i++;
        else if (!strcmp(a, "--tokens"))
            tokens_path = v, i++;
        else if (!strcmp(a, "--out"))
            out = v, i++;
        else if (!strcmp(a, "--device"))
            device = v, i++;
        else if (!strcmp(a, "--batch"))
            B = atoi(v), i++;
        else if (!strcmp(a, "--seq"))
            T = atoi(v), i++;
        else if (!strcmp(a, "--grads"))
            grads = 1;
        else if (!strcmp(a, "--checkpointing"))
            checkpointing = 1;
        else if (!strcmp(a, "--adapter"))
            adapter = v, i++;
        else if (!strcmp(a, "--quantize"))
            quantize = !strcmp(v, "nf4"), i++;
        else if (!strcmp(a, "--nf4"))
            nf4_input = v, i++;
        else
            return fprintf(stderr, "mt_parity: unknown argument %s\n", a), 2;
    }
    if (nf4_input && out) return dump_nf4(nf4_input, out);
    if (!model_dir || !tokens_path || !out || B <= 0 || T <= 0)
        return fprintf(stderr, "mt_parity: missing arguments\n"), 2;
    mt_model_config cfg;
    mt_err err = mt_hf_read_config(model_dir, &cfg);
    if (err) return die(err);
    int n;
    size_t total;
    free(mt_model_param_table(&cfg, &n, &total));
    float *params = malloc(total * sizeof(float));
    if ((err = mt_hf_load_weights(model_dir, &cfg, params))) return die(err);
    int N = B * T;
    int32_t *raw = malloc((size_t)B * (T + 1) * 4), *in = malloc((size_t)N * 4), *tg = malloc((size_t)N * 4);
    FILE *f = fopen(tokens_path, "rb");
    if (!f || fread(raw, 4, (size_t)B * (T + 1), f) != (size_t)B * (T + 1))
        return fprintf(stderr, "mt_parity: bad tokens file\n"), 1;
    fclose(f);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) in[b * T + t] = raw[b * (T + 1) + t], tg[b * T + t] = raw[b * (T + 1) + t + 1];
    mt_backend be;
    if ((err = mt_backend_init(&be, strcmp(device, "gpu") ? -1 : 0))) return die(err);
    mt_model_options o = {.B = B, .T = T, .activation_checkpointing = checkpointing, .quantize_nf4 = quantize};
    float *adapters = NULL;
    if (adapter) {
        if ((err = mt_lora_read_config(adapter, &o.lora))) return die(err);
        o.lora.dropout = 0.0f;  // the comparison runs PEFT without dropout too
        int na;
        size_t ta;
        free(mt_lora_param_table(&cfg, &o.lora, &na, &ta));
        adapters = malloc((ta + 1) * sizeof(float));
        if ((err = mt_lora_load(adapter, &cfg, &o.lora, adapters))) return die(err);
    }
    mt_model *m;
    if ((err = mt_model_create_with(&m, &be, &cfg, &o))) return die(err);
    if ((err = mt_model_set_weights(m, params))) return die(err);
    if (adapters) mt_model_set_adapters(m, adapters);
    mt_model_zero_grads(m);
    mt_trainable tr;
    mt_model_trainable(m, &tr);
    // what is dumped: the trained parameters (the model's, or the adapters')
    const mt_param_info *table = tr.params;
    n = tr.count, total = tr.total;
    double t0 = mt_now();
    float loss = (float)(mt_model_step(m, in, tg, 1.0f / N, grads) / N);
    double t1 = mt_now();
    float *logits = malloc((size_t)N * cfg.V * sizeof(float));
    mt_model_logits(m, in, logits);
    fprintf(stderr, "mt_parity: %s on %s: loss %.6f (step %.2fs)\n", model_dir, device, loss, t1 - t0);
    int count = 2 + (grads ? n : 0);
    mt_st_write_tensor *ts = calloc((size_t)count, sizeof *ts);
    char **names = calloc((size_t)count, sizeof *names);
    ts[0] = (mt_st_write_tensor){"logits", 2, {N, cfg.V}, logits};
    ts[1] = (mt_st_write_tensor){"loss", 1, {1}, &loss};
    float *g = NULL;
    if (grads) {
        g = malloc(total * sizeof(float));
        if (be.gpu)
            mt_copy_to_host(g, tr.grads, total * sizeof(float));
        else
            memcpy(g, tr.grads, total * sizeof(float));
        for (int i = 0; i < n; i++) {
            names[2 + i] = malloc(160);
            snprintf(names[2 + i], 160, "grad.%s", table[i].name);
            ts[2 + i] = (mt_st_write_tensor){
                names[2 + i], table[i].ndim, {table[i].shape[0], table[i].shape[1]}, g + table[i].offset};
        }
    }
    if ((err = mt_safetensors_write(out, ts, count, MT_DTYPE_F32, "pt"))) return die(err);
    return 0;
}
