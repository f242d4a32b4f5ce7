// trainer/lora.c: LoRA adapters in PEFT's names and files (lora.h).
#define _POSIX_C_SOURCE 200809L
#include "trainer/lora.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "kernels/rng.h"
#include "trainer/fsutil.h"
#include "trainer/safetensors.h"

void mt_lora_init_params(const mt_param_info *table, int count, float *params, uint64_t seed) {
    for (int i = 0; i < count; i++) {
        const mt_param_info *p = &table[i];
        float *w = params + p->offset;
        size_t len = strlen(p->name);
        int is_b = len > 8 && !strcmp(p->name + len - 8, "B.weight");
        // kaiming_uniform_(a=sqrt(5)): gain sqrt(2 / (1 + 5)), bound gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in)
        float bound = 1.0f / sqrtf((float)p->shape[1]);
        for (size_t j = 0; j < p->count; j++)
            w[j] = is_b ? 0.0f : bound * (2.0f * mt_rng_uniform(seed, p->offset + j) - 1.0f);
    }
}

// ------------------------------------------------------------ PEFT files

mt_err mt_lora_save(const char *dir, const mt_lora_config *lora, const char *base_model, const mt_param_info *table,
                    int count, const float *params) {
    char tmp[1100], path[1200];
    mt_err err = mt_dir_stage(dir, tmp, sizeof tmp);
    if (err) return err;
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "peft_type", "LORA");
    cJSON_AddStringToObject(j, "task_type", "CAUSAL_LM");
    cJSON_AddStringToObject(j, "base_model_name_or_path", base_model ? base_model : "");
    cJSON_AddNumberToObject(j, "r", lora->r);
    cJSON_AddNumberToObject(j, "lora_alpha", lora->alpha);
    cJSON_AddNumberToObject(j, "lora_dropout", lora->dropout);
    cJSON *targets = cJSON_AddArrayToObject(j, "target_modules");
    char names[256];
    mt_lora_table_targets(table, count, names, sizeof names);
    for (const char *cursor = names, *item; *cursor;) {
        size_t len;
        if (!mt_list_next_item(&cursor, &item, &len)) break;
        char one[64];
        snprintf(one, sizeof one, "%.*s", (int)len, item);
        cJSON_AddItemToArray(targets, cJSON_CreateString(one));
    }
    cJSON_AddStringToObject(j, "bias", "none");
    cJSON_AddBoolToObject(j, "use_rslora", lora->rslora);
    cJSON_AddBoolToObject(j, "use_dora", 0);
    cJSON_AddBoolToObject(j, "fan_in_fan_out", 0);
    cJSON_AddBoolToObject(j, "init_lora_weights", 1);
    cJSON_AddNullToObject(j, "modules_to_save");
    cJSON_AddNullToObject(j, "layers_to_transform");
    cJSON_AddObjectToObject(j, "rank_pattern");
    cJSON_AddObjectToObject(j, "alpha_pattern");
    cJSON_AddBoolToObject(j, "inference_mode", 1);
    char *text = cJSON_Print(j);
    cJSON_Delete(j);
    snprintf(path, sizeof path, "%s/adapter_config.json", tmp);
    err = mt_write_text(path, text);
    free(text);
    if (!err) {
        mt_st_write_tensor *tensors = calloc((size_t)(count ? count : 1), sizeof *tensors);
        MT_CHECK(tensors != NULL, "adapter tensors");
        for (int i = 0; i < count; i++)
            tensors[i] = (mt_st_write_tensor){
                table[i].name, 2, {table[i].shape[0], table[i].shape[1]}, params + table[i].offset};
        snprintf(path, sizeof path, "%s/adapter_model.safetensors", tmp);
        err = mt_safetensors_write(path, tensors, count, MT_DTYPE_F32, "pt");
        free(tensors);
    }
    return mt_dir_publish(tmp, dir, err);
}

static int is_empty_or_null(const cJSON *v) {
    return !v || cJSON_IsNull(v) || ((cJSON_IsObject(v) || cJSON_IsArray(v)) && cJSON_GetArraySize(v) == 0);
}

mt_err mt_lora_read_config(const char *dir, mt_lora_config *lora) {
    char path[1200];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    mt_err err = MT_OK;
    cJSON *j = mt_read_json(path, &err);
    if (!j) return err;
    memset(lora, 0, sizeof *lora);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, "peft_type");
    if (v && !(cJSON_IsString(v) && !strcmp(v->valuestring, "LORA"))) {
        err = mt_errorf(MT_ERR_MODEL, "%s: peft_type is %s; memtune reads LORA adapters only", path,
                        cJSON_IsString(v) ? v->valuestring : "not a string");
        goto out;
    }
    v = cJSON_GetObjectItemCaseSensitive(j, "r");
    if (!cJSON_IsNumber(v) || v->valuedouble < 1 || v->valuedouble > 65536 || v->valuedouble != floor(v->valuedouble)) {
        err = mt_errorf(MT_ERR_FORMAT, "%s: \"r\" must be a whole number from 1 to 65536", path);
        goto out;
    }
    lora->r = (int)v->valuedouble;
    v = cJSON_GetObjectItemCaseSensitive(j, "lora_alpha");
    lora->alpha = cJSON_IsNumber(v) ? (float)v->valuedouble : 8.0f;  // PEFT's default
    v = cJSON_GetObjectItemCaseSensitive(j, "lora_dropout");
    lora->dropout = cJSON_IsNumber(v) ? (float)v->valuedouble : 0.0f;
    if (!(lora->dropout >= 0.0f && lora->dropout < 1.0f)) {
        err = mt_errorf(MT_ERR_FORMAT, "%s: lora_dropout %g is outside [0, 1)", path, lora->dropout);
        goto out;
    }
    lora->rslora = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, "use_rslora"));
    static const char *const unsupported_true[] = {"use_dora", "fan_in_fan_out"};
    for (size_t i = 0; i < sizeof unsupported_true / sizeof *unsupported_true; i++)
        if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, unsupported_true[i]))) {
            err = mt_errorf(MT_ERR_MODEL, "%s: %s is true; memtune supports plain LoRA adapters only", path,
                            unsupported_true[i]);
            goto out;
        }
    static const char *const must_be_empty[] = {"modules_to_save", "layers_to_transform", "rank_pattern",
                                                "alpha_pattern"};
    for (size_t i = 0; i < sizeof must_be_empty / sizeof *must_be_empty; i++)
        if (!is_empty_or_null(cJSON_GetObjectItemCaseSensitive(j, must_be_empty[i]))) {
            err = mt_errorf(MT_ERR_MODEL,
                            "%s: %s is set; memtune supports one rank and alpha for every module and no extra "
                            "trained modules",
                            path, must_be_empty[i]);
            goto out;
        }
    v = cJSON_GetObjectItemCaseSensitive(j, "bias");
    if (v && !(cJSON_IsString(v) && !strcmp(v->valuestring, "none"))) {
        err = mt_errorf(MT_ERR_MODEL, "%s: bias is not \"none\"; memtune trains no biases in LoRA", path);
        goto out;
    }
    v = cJSON_GetObjectItemCaseSensitive(j, "target_modules");
    if (cJSON_IsString(v)) {
        if (strcmp(v->valuestring, "all-linear") != 0) {
            err = mt_errorf(MT_ERR_MODEL,
                            "%s: target_modules is the pattern '%s'; memtune reads a list of module names or "
                            "all-linear",
                            path, v->valuestring);
            goto out;
        }
        lora->targets = (1u << MT_LORA_MODULES) - 1;
    } else if (cJSON_IsArray(v)) {
        const cJSON *item;
        cJSON_ArrayForEach(item, v) {
            unsigned one;
            if (!cJSON_IsString(item)) {
                err = mt_errorf(MT_ERR_FORMAT, "%s: target_modules holds a non-string", path);
                goto out;
            }
            if (mt_lora_parse_targets(item->valuestring, &one)) {
                err = mt_errorf(MT_ERR_MODEL,
                                "%s: target module '%s' is not one memtune adapts (q_proj, k_proj, v_proj, o_proj, "
                                "gate_proj, up_proj, down_proj)",
                                path, item->valuestring);
                goto out;
            }
            lora->targets |= one;
        }
    }
    if (!lora->targets) err = mt_errorf(MT_ERR_FORMAT, "%s: no target_modules", path);
out:
    cJSON_Delete(j);
    return err;
}

mt_err mt_lora_load(const char *dir, const mt_model_config *cfg, const mt_lora_config *lora, float *params) {
    char path[1200];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    mt_safetensors *st = NULL;
    mt_err err = mt_safetensors_open(&st, path);
    if (err) return err;
    int count;
    size_t total;
    mt_param_info *table = mt_lora_param_table(cfg, lora, &count, &total);
    memset(params, 0, total * sizeof(float));
    for (int i = 0; i < count && !err; i++) {
        const mt_st_tensor *t = mt_safetensors_find(st, table[i].name);
        if (!t) {
            err = mt_errorf(MT_ERR_FORMAT, "%s: tensor %s is missing (the adapter's config names its module)", path,
                            table[i].name);
        } else if (t->ndim != 2 || t->shape[0] != table[i].shape[0] || t->shape[1] != table[i].shape[1]) {
            err = mt_errorf(MT_ERR_MODEL,
                            "%s: %s has shape (%lld, %lld), expected (%lld, %lld) from the model's config.json and "
                            "r=%d; was the adapter trained on another base model?",
                            path, table[i].name, (long long)t->shape[0], (long long)(t->ndim > 1 ? t->shape[1] : 0),
                            (long long)table[i].shape[0], (long long)table[i].shape[1], lora->r);
        } else {
            err = mt_safetensors_read_f32(st, t, params + table[i].offset);
        }
    }
    for (int i = 0; i < mt_safetensors_count(st) && !err; i++) {
        const char *name = mt_safetensors_get(st, i)->name;
        int l, module, is_b;
        if (!mt_lora_parse_name(name, &l, &module, &is_b) || l >= cfg->L || !(lora->targets >> module & 1))
            err = mt_errorf(MT_ERR_MODEL, "%s: tensor %s is not part of a LoRA adapter on %s for this model", path,
                            name, "q/k/v/o/gate/up/down_proj");
    }
    free(table);
    mt_safetensors_close(st);
    return err;
}

void mt_lora_merge(const mt_model_config *cfg, const mt_lora_config *lora, float *base_params,
                   const float *adapter_params) {
    int n_base, n_adapter;
    size_t total_base, total_adapter;
    mt_param_info *base = mt_model_param_table(cfg, &n_base, &total_base);
    mt_param_info *adapter = mt_lora_param_table(cfg, lora, &n_adapter, &total_adapter);
    float scale = mt_lora_scale(lora);
    for (int i = 0; i + 1 < n_adapter; i += 2) {
        const mt_param_info *a = &adapter[i], *b = &adapter[i + 1];  // lora_A then lora_B
        int l, module, is_b;
        MT_CHECK(mt_lora_parse_name(a->name, &l, &module, &is_b) && !is_b, "adapter table order");
        char name[160];
        mt_lora_base_name(cfg, name, sizeof name, l, (mt_lora_module)module);
        const mt_param_info *w = NULL;
        for (int k = 0; k < n_base && !w; k++)
            if (!strcmp(base[k].name, name)) w = &base[k];
        MT_CHECK(w != NULL, "no base weight %s", name);
        int64_t out = b->shape[0], in = a->shape[1], r = a->shape[0];
        const float *A = adapter_params + a->offset, *B = adapter_params + b->offset;
        float *W = base_params + w->offset;
#pragma omp parallel for
        for (int64_t o = 0; o < out; o++)
            for (int64_t k = 0; k < r; k++) {
                float s = scale * B[o * r + k];
                for (int64_t c = 0; c < in; c++) W[o * in + c] += s * A[k * in + c];
            }
    }
    free(base);
    free(adapter);
}

void mt_lora_report(const mt_lora_config *lora, const mt_param_info *trained, int n, size_t base_count,
                    size_t base_bytes, int nf4, const char *where, const char *init) {
    char targets[256];
    mt_lora_table_targets(trained, n, targets, sizeof targets);
    size_t adapter_count = 0;
    for (int i = 0; i < n; i++) adapter_count += trained[i].count;
    mt_info("LoRA r=%d alpha=%g dropout=%g%s on %s: %.2fM trainable (%.3f%% of the base)%s%s", lora->r, lora->alpha,
            lora->dropout, lora->rslora ? " rsLoRA" : "", targets, adapter_count / 1e6,
            100.0 * adapter_count / (double)base_count, init[0] ? ", from " : "", init);
    mt_info("base weights frozen%s: %.2f GiB on the %s, %.3f bytes per parameter", nf4 ? " in NF4" : "",
            base_bytes / 1073741824.0, where, (double)base_bytes / (double)base_count);
}

mt_err mt_lora_read_folder(const char *dir, const mt_model_config *cfg, mt_lora_config *lora, float **values) {
    *values = NULL;
    mt_err err = mt_lora_read_config(dir, lora);
    if (err) return err;
    int n;
    size_t total;
    free(mt_lora_param_table(cfg, lora, &n, &total));
    float *v = calloc(total ? total : 1, sizeof(float));
    if (!v) return mt_errorf(MT_ERR_NOMEM, "out of host memory for the adapter %s", dir);
    if ((err = mt_lora_load(dir, cfg, lora, v))) {
        free(v);
        return err;
    }
    *values = v;
    return MT_OK;
}
