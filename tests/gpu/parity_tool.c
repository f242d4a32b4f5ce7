// tests/gpu/parity_tool.c: dumps what memtune computes for one batch, for
// the comparison with Hugging Face transformers (tests/gpu/hf_parity.py):
// logits, the mean loss and (with --grads) every parameter's gradient, as a
// safetensors file. Not a user command.
//
// usage: mt_parity --model DIR --tokens FILE --batch B --seq T --device cpu|gpu
//                  --out FILE [--grads] [--checkpointing]
// FILE of tokens: B*(T+1) little-endian int32; inputs are [:, :T], targets [:, 1:].
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/device.h"
#include "trainer/hf.h"
#include "trainer/model.h"
#include "trainer/safetensors.h"

static int die(mt_err err) {
    fprintf(stderr, "mt_parity: %s\n", mt_last_error()[0] ? mt_last_error() : mt_err_message(err));
    return 1;
}

int main(int argc, char **argv) {
    const char *model_dir = NULL, *tokens_path = NULL, *out = NULL, *device = "cpu";
    int B = 0, T = 0, grads = 0, checkpointing = 0;
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
        else
            return fprintf(stderr, "mt_parity: unknown argument %s\n", a), 2;
    }
    if (!model_dir || !tokens_path || !out || B <= 0 || T <= 0)
        return fprintf(stderr, "mt_parity: missing arguments\n"), 2;
    mt_model_config cfg;
    mt_err err = mt_hf_read_config(model_dir, &cfg);
    if (err) return die(err);
    int n;
    size_t total;
    mt_param_info *table = mt_model_param_table(&cfg, &n, &total);
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
    mt_model *m;
    if ((err = mt_model_create(&m, &be, &cfg, B, T, checkpointing))) return die(err);
    mt_model_set_weights(m, params);
    mt_model_zero_grads(m);
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
            mt_copy_to_host(g, mt_model_grads(m), total * sizeof(float));
        else
            memcpy(g, mt_model_grads(m), total * sizeof(float));
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
