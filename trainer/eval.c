// trainer/eval.c: see eval.h.
#define _POSIX_C_SOURCE 200809L
#include "trainer/eval.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/device.h"
#include "trainer/hf.h"
#include "trainer/lora.h"
#include "trainer/params.h"

typedef void (*progress_fn)(void *ctx, int done, int total, double sum, long count);

static mt_err eval_batches(mt_model *model, mt_loader *loader, int batches, int B, int T, double *loss, long *targets,
                           progress_fn progress, void *ctx) {
    mt_loader_set_cursor(loader, (mt_cursor){0, 0});  // the same batches every time
    int32_t *inputs = malloc((size_t)B * T * 4), *tgt = malloc((size_t)B * T * 4);
    MT_CHECK(inputs && tgt, "eval batch");
    double sum = 0.0;
    long count = 0;
    mt_err err = MT_OK;
    for (int i = 0; i < batches && !err; i++) {
        int valid;
        if ((err = mt_loader_next(loader, inputs, tgt, &valid))) break;
        if (mt_loader_positions(loader)) mt_model_set_positions(model, mt_loader_positions(loader));
        sum += mt_model_step(model, inputs, tgt, 0.0f, 0);
        count += valid;
        if (progress) progress(ctx, i + 1, batches, sum, count);
    }
    free(inputs);
    free(tgt);
    *loss = count ? sum / (double)count : NAN;
    if (targets) *targets = count;
    return err;
}

mt_err mt_eval_loss(mt_model *model, mt_loader *loader, int batches, int B, int T, double *loss, long *targets) {
    return eval_batches(model, loader, batches, B, T, loss, targets, NULL, NULL);
}

void mt_eval_defaults(mt_eval_options *o) { *o = (mt_eval_options){.device = "auto", .batch = 4, .progress = 1}; }

typedef struct {
    double start, last;
    long tokens_per_batch;
} progress_state;

static void show_progress(void *ctx, int done, int total, double sum, long count) {
    progress_state *p = ctx;
    double t = mt_now();
    if (t - p->last < (isatty(2) ? 1.0 : 30.0) && done < total) return;
    p->last = t;
    double tps = (double)done * p->tokens_per_batch / (t - p->start);
    fprintf(stderr, "%seval: batch %d/%d | loss %.4f | %.0f tok/s | ETA %.0fs%s", isatty(2) ? "\r" : "", done, total,
            count ? sum / count : NAN, tps, (total - done) * (t - p->start) / done,
            isatty(2) && done < total ? "   " : "\n");
}

mt_err mt_eval_run(const mt_eval_options *o, mt_eval_result *r) {
    memset(r, 0, sizeof *r);
    double start = mt_now();
    if (!o->model || !o->data)
        return mt_errorf(MT_ERR_USAGE, "eval needs --model DIR and --data FILE.h5 (memtune eval --help)");
    if (o->quantize_nf4 && !o->adapter)
        return mt_errorf(MT_ERR_USAGE,
                         "--quantize nf4 evaluates a QLoRA adapter over its NF4 base: give the adapter with --adapter "
                         "DIR");
    mt_model_config mc;
    mt_err err = mt_hf_read_config(o->model, &mc);
    if (err) return err;
    mt_lora_config lora = {0};
    float *adapters = NULL;
    if (o->adapter && (err = mt_lora_read_folder(o->adapter, &mc, &lora, &adapters))) return err;
    lora.dropout = 0.0f;  // evaluation: no dropout
    mt_dataset *ds = NULL;
    mt_loader *loader = NULL;
    mt_model *model = NULL;
    mt_backend be;
    int backend_ready = 0;
    if ((err = mt_dataset_open(&ds, o->data, mc.V))) {
        free(adapters);
        return err;
    }
    int T = o->seq_len > 0 ? o->seq_len : mt_dataset_window(ds) > 0 ? mt_dataset_window(ds) : 1024;
    uint64_t windows = mt_dataset_num_tokens(ds) > 1 ? (mt_dataset_num_tokens(ds) - 1) / (uint64_t)T : 0;
    int B = o->batch > 0 ? o->batch : 4;
    if (windows > 0 && windows < (uint64_t)B) B = (int)windows;  // a small file: one batch of all of it
    if (windows == 0)
        err = mt_errorf(MT_ERR_DATASET, "%s: %llu tokens make no window of %d+1; pass a smaller --seq-len", o->data,
                        (unsigned long long)mt_dataset_num_tokens(ds), T);
    mt_loader_config lc = {B, T, 0, 0, 1, 0.0, o->document_mask};
    if (!err) err = mt_loader_init(&loader, ds, &lc, MT_SPLIT_TRAIN);
    int gpu = strcmp(o->device, "cpu") && mt_device_count() > 0;
    if (!err && !strcmp(o->device, "gpu") && !gpu)
        err = mt_errorf(MT_ERR_DEVICE, "--device gpu but no GPU is visible; use --device cpu or auto");
    if (!err && strcmp(o->device, "cpu") && strcmp(o->device, "gpu") && strcmp(o->device, "auto"))
        err = mt_errorf(MT_ERR_USAGE, "--device %s: expected auto, cpu or gpu", o->device);
    if (!err && mt_backend_init(&be, gpu ? 0 : -1) == MT_OK) backend_ready = 1;
    if (!err && !backend_ready) err = mt_errorf(MT_ERR_DEVICE, "the %s backend did not start", gpu ? "GPU" : "CPU");
    mt_model_options mo = {.B = B,
                           .T = T,
                           .lora = lora,
                           .quantize_nf4 = o->quantize_nf4,
                           .forward_only = 1,
                           .document_mask = o->document_mask,
                           .stream_weights = o->stream_weights,
                           .weights_dir = o->weights_dir,
                           .resident_layers = o->resident_layers};
    if (!err) err = mt_model_create_with(&model, &be, &mc, &mo);
    if (!err) err = mt_hf_set_model(model, o->model, 0);  // a layer at a time: no whole fp32 copy
    if (!err && adapters) mt_model_set_adapters(model, adapters);
    long batches = loader ? (long)mt_loader_batches_per_epoch(loader) : 0;
    if (o->max_batches > 0 && o->max_batches < batches) batches = o->max_batches;
    if (!err) {
        if (gpu)
            mt_device_describe(r->device, sizeof r->device);
        else
            snprintf(r->device, sizeof r->device, "CPU (fp32)");
        progress_state ps = {mt_now(), mt_now(), (long)B * T};
        err = eval_batches(model, loader, (int)batches, B, T, &r->loss, &r->targets, o->progress ? show_progress : NULL,
                           &ps);
    }
    if (!err) {
        r->perplexity = exp(r->loss);
        r->windows = batches * B, r->windows_total = (long)windows, r->seq_len = T;
        r->seconds = mt_now() - start;
        if (r->targets == 0)
            err = mt_errorf(MT_ERR_DATASET, "%s: no target counts in the evaluated windows (the loss mask is all 0)",
                            o->data);
    }
    mt_model_free(model);
    if (backend_ready) mt_backend_free(&be);
    free(adapters);
    mt_loader_free(loader);
    mt_dataset_free(ds);
    return err;
}
