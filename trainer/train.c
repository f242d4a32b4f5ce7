// trainer/train.c: the training loop (train.h).
#define _POSIX_C_SOURCE 200809L
#include "trainer/train.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "datasets/dataset.h"
#include "kernels/device.h"
#include "kernels/mem.h"
#include "optim/optimizer.h"
#include "optim/schedule.h"
#include "trainer/hf.h"
#include "trainer/model.h"

#define MT_VERSION "0.1.0"

// mkdir -p
static mt_err make_dirs(const char *path) {
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1;; p++) {
        char c = *p;
        if (c != '/' && c != '\0') continue;
        *p = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST)
            return mt_errorf(MT_ERR_IO, "%s: cannot create the folder (%s); set output.dir to a writable place", buf,
                             strerror(errno));
        *p = c;
        if (c == '\0') break;
    }
    return MT_OK;
}

static void format_duration(double s, char *buf, size_t len) {
    if (!isfinite(s) || s < 0) snprintf(buf, len, "?");
    else if (s < 60) snprintf(buf, len, "%.0fs", s);
    else if (s < 3600) snprintf(buf, len, "%dm%02ds", (int)s / 60, (int)s % 60);
    else snprintf(buf, len, "%dh%02dm", (int)s / 3600, ((int)s % 3600) / 60);
}

static size_t peak_bytes(mt_backend *be) {
    mt_mem_tally t;
    mt_mem_get_tally(be->gpu ? MT_DEVICE : MT_HOST, &t);
    return t.peak_total;
}

typedef struct {
    int32_t *inputs, *targets;
    int *valid;
} batch_set;

static mt_err evaluate(mt_model *model, mt_loader *eval, int batches, int B, int T, double *loss) {
    mt_loader_set_cursor(eval, (mt_cursor){0, 0});  // the same batches every time
    int32_t *inputs = malloc((size_t)B * T * 4), *targets = malloc((size_t)B * T * 4);
    double sum = 0.0;
    long count = 0;
    mt_err err = MT_OK;
    for (int i = 0; i < batches && !err; i++) {
        int valid;
        if ((err = mt_loader_next(eval, inputs, targets, &valid))) break;
        sum += mt_model_step(model, inputs, targets, 0.0f, 0);
        count += valid;
    }
    free(inputs);
    free(targets);
    *loss = count ? sum / (double)count : NAN;
    return err;
}

mt_err mt_train(const mt_config *cfg, mt_train_result *result) {
    memset(result, 0, sizeof *result);
    result->last_eval_loss = NAN;
    mt_err err = mt_config_validate(cfg);
    if (err) return err;
    int B = (int)cfg->train_micro_batch, T = (int)cfg->train_seq_len, accum = (int)cfg->train_grad_accum;

    // ---- everything checked before the first device allocation
    mt_model_config mc;
    if ((err = mt_hf_read_config(cfg->model_path, &mc))) return err;
    if (mc.sliding_window > 0 && mc.sliding_window < T)
        return mt_errorf(MT_ERR_MODEL, "%s: sliding_window %ld is shorter than train.seq_len %d; memtune does not "
                         "implement sliding-window attention. Lower train.seq_len to %ld or less.",
                         cfg->model_path, mc.sliding_window, T, mc.sliding_window);
    mt_dataset *ds = NULL;
    if ((err = mt_dataset_open(&ds, cfg->data_train, mc.V))) return err;
    mt_loader_config lc = {B, T, (uint64_t)cfg->train_seed, 0, 1, cfg->data_eval_fraction};
    mt_loader *train = NULL, *eval = NULL;
    if ((err = mt_loader_init(&train, ds, &lc, MT_SPLIT_TRAIN))) goto out_data;
    if (cfg->data_eval_fraction > 0 && cfg->train_eval_batches > 0 &&
        (err = mt_loader_init(&eval, ds, &lc, MT_SPLIT_EVAL)))
        goto out_data;
    int n_params;
    size_t total;
    mt_param_info *table = mt_model_param_table(&mc, &n_params, &total);
    float *host_params = malloc(total * sizeof(float));
    MT_CHECK(host_params != NULL, "host parameter block (%zu floats)", total);
    memset(host_params, 0, total * sizeof(float));
    int random_init = !strcmp(cfg->model_init, "random");
    if (random_init) mt_model_init_random(&mc, host_params, (uint64_t)cfg->train_seed);
    else if ((err = mt_hf_load_weights(cfg->model_path, &mc, host_params))) goto out_params;
    if ((err = make_dirs(cfg->output_dir))) goto out_params;

    // ---- backend, model, optimizer
    int want_gpu = !strcmp(cfg->train_device, "gpu"), ngpu = mt_device_count();
    if (want_gpu && ngpu == 0) {
        err = mt_errorf(MT_ERR_DEVICE, "train.device is gpu but no GPU is visible%s; set train.device: auto or cpu",
#ifdef MT_HAVE_CUDA
                        ""
#else
                        " (this memtune was built without CUDA)"
#endif
        );
        goto out_params;
    }
    int use_gpu = strcmp(cfg->train_device, "cpu") && ngpu > 0;
    mt_backend be;
    if ((err = mt_backend_init(&be, use_gpu ? 0 : -1))) goto out_params;
    char devname[256];
    if (use_gpu) mt_device_describe(devname, sizeof devname);
    else snprintf(devname, sizeof devname, "CPU (fp32 reference backend)");
    mt_model *model = NULL;
    mt_optimizer *opt = NULL;
    if ((err = mt_model_create(&model, &be, &mc, B, T, cfg->model_activation_checkpointing))) goto out_backend;
    mt_model_set_weights(model, host_params);
    mt_param_group *groups = malloc((size_t)n_params * sizeof *groups);
    for (int i = 0; i < n_params; i++) groups[i] = (mt_param_group){table[i].offset, table[i].count, table[i].decay};
    mt_adamw_config ac = {(float)cfg->optim_lr, (float)cfg->optim_beta1, (float)cfg->optim_beta2,
                          (float)cfg->optim_eps, (float)cfg->optim_weight_decay, (float)cfg->optim_grad_clip};
    err = mt_optimizer_init(&opt, &be, &ac, use_gpu ? mt_model_weights(model) : (float *)mt_model_weights(model),
                            host_params, total, groups, n_params);
    free(groups);
    if (err) goto out_model;

    // ---- run folder
    char path[1200];
    snprintf(path, sizeof path, "%s/config.yaml", cfg->output_dir);
    FILE *f = fopen(path, "w");
    if (!f) {
        err = mt_errorf(MT_ERR_IO, "%s: cannot write (%s)", path, strerror(errno));
        goto out_model;
    }
    mt_config_write_yaml(cfg, f);
    fclose(f);
    snprintf(path, sizeof path, "%s/metrics.jsonl", cfg->output_dir);
    FILE *metrics = fopen(path, "w");
    if (!metrics) {
        err = mt_errorf(MT_ERR_IO, "%s: cannot write (%s)", path, strerror(errno));
        goto out_model;
    }
    size_t count = mt_model_num_params(model);
    mt_info("memtune %s | %s | %s %d layers, %.2fM params | B=%d T=%d accum=%d | %s", MT_VERSION, devname,
            mc.architecture, mc.L, count / 1e6, B, T, accum, random_init ? "random init" : cfg->model_path);
    mt_info("data %s: %llu tokens in %llu docs, %llu train batches/epoch", cfg->data_train,
            (unsigned long long)mt_dataset_num_tokens(ds), (unsigned long long)mt_dataset_num_docs(ds),
            (unsigned long long)mt_loader_batches_per_epoch(train));

    mt_schedule sched = {!strcmp(cfg->optim_schedule, "linear") ? MT_SCHEDULE_LINEAR
                         : !strcmp(cfg->optim_schedule, "constant") ? MT_SCHEDULE_CONSTANT : MT_SCHEDULE_COSINE,
                         (float)cfg->optim_lr, (float)cfg->optim_min_lr_ratio, (int)cfg->optim_warmup_steps,
                         (int)cfg->train_steps};
    batch_set bs;
    bs.inputs = malloc((size_t)accum * B * T * 4);
    bs.targets = malloc((size_t)accum * B * T * 4);
    bs.valid = malloc((size_t)accum * sizeof(int));
    double t_start = mt_now(), t_last = t_start;
    long tokens_since = 0;
    for (int step = 0; step < cfg->train_steps && !err; step++) {
        // all micro-batches first: the loss is the mean over all their targets
        long valid_total = 0;
        for (int a = 0; a < accum && !err; a++) {
            err = mt_loader_next(train, bs.inputs + (size_t)a * B * T, bs.targets + (size_t)a * B * T, &bs.valid[a]);
            valid_total += bs.valid[a];
        }
        if (err) break;
        float dscale = valid_total ? 1.0f / (float)valid_total : 0.0f;
        mt_model_zero_grads(model);
        double loss_sum = 0.0;
        for (int a = 0; a < accum; a++)
            loss_sum += mt_model_step(model, bs.inputs + (size_t)a * B * T, bs.targets + (size_t)a * B * T, dscale, 1);
        double loss = valid_total ? loss_sum / (double)valid_total : NAN;
        float lr = mt_schedule_lr(&sched, step);
        mt_step_info info;
        mt_optimizer_step(opt, mt_model_grads(model), lr, &info);
        if (!isfinite(loss) || !info.finite) {
            err = mt_errorf(MT_ERR_NONFINITE, "step %d: loss %g, gradient norm %g. Training stopped before applying "
                            "it; lower optim.lr or raise optim.warmup_steps.", step + 1, loss, info.grad_norm);
            break;
        }
        if (step == 0) result->first_loss = loss;
        result->last_loss = loss;
        result->steps_done = step + 1;
        tokens_since += (long)accum * B * T;
        double eval_loss = NAN;
        int last = step + 1 == cfg->train_steps;
        if (eval && ((cfg->train_eval_every > 0 && (step + 1) % cfg->train_eval_every == 0) || last)) {
            if ((err = evaluate(model, eval, (int)cfg->train_eval_batches, B, T, &eval_loss))) break;
            result->last_eval_loss = eval_loss;
        }
        if ((step + 1) % cfg->train_log_every == 0 || last || isfinite(eval_loss)) {
            double now = mt_now(), tps = tokens_since / (now - t_last + 1e-9);
            char eta[32], evaltext[48] = "";
            format_duration((now - t_start) / (step + 1) * (cfg->train_steps - step - 1), eta, sizeof eta);
            if (isfinite(eval_loss)) snprintf(evaltext, sizeof evaltext, " | eval %.4f", eval_loss);
            fprintf(stderr, "step %*d/%ld | loss %.4f%s | lr %.2e | grad norm %.3f | %.0f tok/s | peak mem %.2f GiB | "
                    "ETA %s\n", (int)(log10((double)cfg->train_steps) + 1), step + 1, cfg->train_steps, loss, evaltext,
                    lr, info.grad_norm, tps, peak_bytes(&be) / 1073741824.0, eta);
            cJSON *rec = cJSON_CreateObject();
            cJSON_AddNumberToObject(rec, "step", step + 1);
            cJSON_AddNumberToObject(rec, "loss", loss);
            if (isfinite(eval_loss)) cJSON_AddNumberToObject(rec, "eval_loss", eval_loss);
            cJSON_AddNumberToObject(rec, "lr", lr);
            cJSON_AddNumberToObject(rec, "grad_norm", info.grad_norm);
            cJSON_AddNumberToObject(rec, "tokens_per_second", tps);
            cJSON_AddNumberToObject(rec, "peak_memory_bytes", (double)peak_bytes(&be));
            cJSON_AddNumberToObject(rec, "elapsed_seconds", now - t_start);
            char *line = cJSON_PrintUnformatted(rec);
            fprintf(metrics, "%s\n", line);
            fflush(metrics);
            free(line);
            cJSON_Delete(rec);
            result->tokens_per_second = tps;
            t_last = now;
            tokens_since = 0;
        }
    }
    fclose(metrics);
    free(bs.inputs);
    free(bs.targets);
    free(bs.valid);
    if (!err) {
        char report[1024];
        mt_mem_format(use_gpu ? MT_DEVICE : MT_HOST, report, sizeof report);
        mt_info("memory (%s): %s", use_gpu ? "GPU" : "host", report);
    }
    if (!err && cfg->output_save_model) {
        mt_optimizer_get_master(opt, host_params);
        mt_dtype dtype = !strcmp(cfg->output_save_dtype, "F32")    ? MT_DTYPE_F32
                         : !strcmp(cfg->output_save_dtype, "BF16") ? MT_DTYPE_BF16
                         : random_init ? MT_DTYPE_F32 : mc.dtype;
        snprintf(path, sizeof path, "%s/model", cfg->output_dir);
        err = mt_hf_save(path, cfg->model_path, &mc, host_params, dtype);
        if (!err) mt_info("saved %s (%s, Hugging Face layout)", path, mt_dtype_name(dtype));
    }
out_model:
    mt_optimizer_free(opt);
    mt_model_free(model);
out_backend:
    mt_backend_free(&be);
out_params:
    free(host_params);
    free(table);
out_data:
    mt_loader_free(train);
    mt_loader_free(eval);
    mt_dataset_free(ds);
    return err;
}
