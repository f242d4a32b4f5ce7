// trainer/hf.c: Hugging Face model folders (hf.h).
#define _POSIX_C_SOURCE 200809L
#include "trainer/hf.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "trainer/fsutil.h"
#include "trainer/model.h"
#include "trainer/safetensors.h"

static int get_int(const cJSON *j, const char *key, int *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
    // range first: converting an out-of-range double to an integer is undefined
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= 1 && v->valuedouble <= 1e9) ||
        v->valuedouble != floor(v->valuedouble))
        return -1;
    *out = (int)v->valuedouble;
    return 0;
}

static int get_float(const cJSON *j, const char *key, float *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
    if (!cJSON_IsNumber(v)) return -1;
    *out = (float)v->valuedouble;
    return 0;
}

// key: an array of exactly n numbers into dst.
static int get_floats(const cJSON *j, const char *key, float *dst, int n) {
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(j, key);
    if (!cJSON_IsArray(a) || cJSON_GetArraySize(a) != n) return -1;
    int i = 0;
    for (const cJSON *v = a->child; v; v = v->next, i++) {
        if (!cJSON_IsNumber(v)) return -1;
        dst[i] = (float)v->valuedouble;
    }
    return 0;
}

// longrope (Phi-3 mini/medium 128k, Phi-3.5, Phi-4-mini) as transformers 5
// reads it: original_max_position_embeddings from the config's top level
// (else the rope's own, else max_position_embeddings), factor from the rope
// (else max / original), attention_factor from the rope (else sqrt(1 +
// ln(factor) / ln(original)), 1 for factor <= 1).
static mt_err read_longrope(const char *path, const cJSON *j, const cJSON *rope, mt_model_config *c) {
    int half = c->D / 2;
    if (half > MT_MAX_ROPE_FACTORS)
        return mt_errorf(MT_ERR_MODEL, "%s: longrope scaling with head_dim %d is not supported (at most %d)", path,
                         c->D, 2 * MT_MAX_ROPE_FACTORS);
    if (get_floats(rope, "long_factor", c->rope_long_factor, half) ||
        get_floats(rope, "short_factor", c->rope_short_factor, half))
        return mt_errorf(MT_ERR_MODEL,
                         "%s: longrope scaling needs long_factor and short_factor, %d numbers each (head_dim / 2)",
                         path, half);
    int orig = 0;
    if (get_int(j, "original_max_position_embeddings", &orig) || orig <= 0)
        if (get_int(rope, "original_max_position_embeddings", &orig) || orig <= 0) orig = c->max_position;
    float factor = 0.0f, attention = 0.0f;
    double f = get_float(rope, "factor", &factor) ? (double)c->max_position / orig : (double)factor;
    if (get_float(rope, "attention_factor", &attention))
        attention = f <= 1.0 ? 1.0f : (float)sqrt(1.0 + log(f) / log((double)orig));
    c->rope_longrope = 1;
    c->rope_original_max_position = orig;
    c->rope_attention_factor = attention;
    return MT_OK;
}

static mt_err read_rope(const char *path, const cJSON *j, mt_model_config *c) {
    // transformers 4.x: rope_theta + rope_scaling; 5.x: rope_parameters, for
    // Gemma 3 one per layer type (full_attention: the global layers')
    const cJSON *params = cJSON_GetObjectItemCaseSensitive(j, "rope_parameters");
    if (c->gemma && cJSON_IsObject(params) && cJSON_GetObjectItemCaseSensitive(params, "full_attention")) {
        const cJSON *local = cJSON_GetObjectItemCaseSensitive(params, "sliding_attention");
        const cJSON *local_type = cJSON_GetObjectItemCaseSensitive(local, "rope_type");
        if (cJSON_IsObject(local)) get_float(local, "rope_theta", &c->rope_local_theta);
        if (cJSON_IsString(local_type) && strcmp(local_type->valuestring, "default"))
            return mt_errorf(MT_ERR_MODEL,
                             "%s: rope type '%s' for the sliding layers (rope_parameters.sliding_attention) is not "
                             "supported; memtune supports default there",
                             path, local_type->valuestring);
        params = cJSON_GetObjectItemCaseSensitive(params, "full_attention");
    }
    const cJSON *scaling = cJSON_GetObjectItemCaseSensitive(j, "rope_scaling");
    const cJSON *rope = cJSON_IsObject(params) ? params : (cJSON_IsObject(scaling) ? scaling : NULL);
    c->rope_theta = c->gemma ? 1000000.0f : 10000.0f;  // Gemma3TextConfig's default base is 1e6
    get_float(j, "rope_theta", &c->rope_theta);
    if (rope) get_float(rope, "rope_theta", &c->rope_theta);
    if (!rope) return MT_OK;
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(rope, "rope_type");
    if (!cJSON_IsString(type)) type = cJSON_GetObjectItemCaseSensitive(rope, "type");
    const char *t = cJSON_IsString(type) ? type->valuestring : "default";
    if (!strcmp(t, "default")) return MT_OK;
    if (!strcmp(t, "linear")) {
        if (get_float(rope, "factor", &c->rope_linear_factor) || !(c->rope_linear_factor > 0))
            return mt_errorf(MT_ERR_MODEL, "%s: linear rope scaling needs a positive factor", path);
        return MT_OK;
    }
    if (!strcmp(t, "longrope") || !strcmp(t, "su")) return read_longrope(path, j, rope, c);
    if (strcmp(t, "llama3"))
        return mt_errorf(MT_ERR_MODEL,
                         "%s: rope type '%s' (field %s.rope_type) is not supported; memtune supports "
                         "default, linear, llama3 and longrope",
                         path, t, params ? "rope_parameters" : "rope_scaling");
    c->rope_llama3 = 1;
    if (get_float(rope, "factor", &c->rope_factor) || get_float(rope, "low_freq_factor", &c->rope_low_freq_factor) ||
        get_float(rope, "high_freq_factor", &c->rope_high_freq_factor) ||
        get_int(rope, "original_max_position_embeddings", &c->rope_original_max_position))
        return mt_errorf(MT_ERR_MODEL,
                         "%s: llama3 rope scaling needs factor, low_freq_factor, high_freq_factor and "
                         "original_max_position_embeddings",
                         path);
    return MT_OK;
}

// Phi-3 / Phi-4 (Phi3ForCausalLM): the fused projections; what it could set
// that memtune does not compute is refused by name.
static mt_err read_phi3(const char *path, const cJSON *j, mt_model_config *c) {
    c->fused = 1;
    const cJSON *partial = cJSON_GetObjectItemCaseSensitive(j, "partial_rotary_factor");
    if (cJSON_IsNumber(partial) && partial->valuedouble != 1.0)
        return mt_errorf(MT_ERR_MODEL,
                         "%s: partial_rotary_factor %g (RoPE on part of each head) is not supported; memtune "
                         "rotates whole heads",
                         path, partial->valuedouble);
    if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, "attention_bias")))
        return mt_errorf(MT_ERR_MODEL, "%s: attention_bias true is not supported for Phi3ForCausalLM", path);
    static const char *const dropouts[] = {"resid_pdrop", "embd_pdrop", "attention_dropout"};
    for (int i = 0; i < 3; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, dropouts[i]);
        if (cJSON_IsNumber(v) && v->valuedouble != 0.0)
            return mt_errorf(MT_ERR_MODEL, "%s: %s %g: memtune does not implement dropout there; set it to 0.0", path,
                             dropouts[i], v->valuedouble);
    }
    return MT_OK;
}

// Gemma 3's fields (Gemma3TextConfig's defaults where absent). Anything it
// could set that memtune does not compute is refused by name.
static mt_err read_gemma(const char *path, const cJSON *j, mt_model_config *c) {
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(j, "hidden_activation");
    if (!act) act = cJSON_GetObjectItemCaseSensitive(j, "hidden_act");
    if (act && (!cJSON_IsString(act) || strcmp(act->valuestring, "gelu_pytorch_tanh")))
        return mt_errorf(MT_ERR_MODEL,
                         "%s: hidden_activation '%s' is not supported for Gemma 3; memtune implements "
                         "gelu_pytorch_tanh (GeGLU)",
                         path, cJSON_IsString(act) ? act->valuestring : "?");
    static const char *const absent[] = {"final_logit_softcapping", "attn_logit_softcapping"};
    for (int i = 0; i < 2; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, absent[i]);
        if (v && !cJSON_IsNull(v))
            return mt_errorf(MT_ERR_MODEL, "%s: %s is set; memtune does not implement logit soft-capping", path,
                             absent[i]);
    }
    if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, "use_bidirectional_attention")))
        return mt_errorf(MT_ERR_MODEL, "%s: use_bidirectional_attention is true; memtune trains causal models", path);
    float scalar = 256.0f;
    get_float(j, "query_pre_attn_scalar", &scalar);
    if (!(scalar > 0)) return mt_errorf(MT_ERR_MODEL, "%s: query_pre_attn_scalar must be positive", path);
    c->attn_scale = (float)pow((double)scalar, -0.5);
    c->embed_scale = (float)sqrt((double)c->C);
    c->rope_local_theta = 10000.0f;
    get_float(j, "rope_local_base_freq", &c->rope_local_theta);
    c->sliding_window = 4096;
    int window = 0;
    if (!get_int(j, "sliding_window", &window)) c->sliding_window = window;
    // sliding and global layers: every global_every-th is global (layer_types must follow that pattern)
    c->global_every = 6;
    get_int(j, "sliding_window_pattern", &c->global_every);
    const cJSON *types = cJSON_GetObjectItemCaseSensitive(j, "layer_types");
    if (cJSON_IsArray(types)) {
        int n = cJSON_GetArraySize(types), first = 0;
        for (int l = 0; l < n && !first; l++) {
            const cJSON *t = cJSON_GetArrayItem(types, l);
            if (cJSON_IsString(t) && !strcmp(t->valuestring, "full_attention")) first = l + 1;
        }
        c->global_every = first ? first : n + 1;  // no global layer: all sliding
        for (int l = 0; l < n; l++) {
            const cJSON *t = cJSON_GetArrayItem(types, l);
            const char *want = mt_layer_local(c, l) ? "sliding_attention" : "full_attention";
            if (!cJSON_IsString(t) || strcmp(t->valuestring, want))
                return mt_errorf(MT_ERR_MODEL,
                                 "%s: layer_types[%d] is '%s' where memtune expects '%s': it supports one global layer "
                                 "every N (the first at N), the rest sliding",
                                 path, l, cJSON_IsString(t) ? t->valuestring : "?", want);
        }
    }
    return MT_OK;
}

// Gemma3TextConfig's defaults for the fields a config leaves out (the
// multimodal folders' text_config names few of them).
static void gemma_defaults(cJSON *j) {
    static const struct {
        const char *key;
        double value;
    } d[] = {{"vocab_size", 262208},      {"hidden_size", 2304},
             {"intermediate_size", 9216}, {"num_hidden_layers", 26},
             {"num_attention_heads", 8},  {"num_key_value_heads", 4},
             {"head_dim", 256},           {"max_position_embeddings", 131072},
             {"rms_norm_eps", 1e-6}};
    for (size_t i = 0; i < sizeof d / sizeof d[0]; i++)
        if (!cJSON_GetObjectItemCaseSensitive(j, d[i].key)) cJSON_AddNumberToObject(j, d[i].key, d[i].value);
}

static mt_err list_shards(const char *dir, char ***files, int *count);

// A multimodal folder's language model prefix, from its first file's tensor
// names: transformers before 4.52 saved "language_model.model.", later ones
// "model.language_model." (also the default without weights).
static void text_prefix(const char *dir, mt_model_config *c) {
    snprintf(c->text_prefix, sizeof c->text_prefix, "model.language_model.");
    char **files = NULL;
    int n = 0;
    mt_safetensors *st = NULL;
    if (!list_shards(dir, &files, &n) && n > 0 && !mt_safetensors_open(&st, files[0])) {
        for (int i = 0; i < mt_safetensors_count(st); i++)
            if (!strncmp(mt_safetensors_get(st, i)->name, "language_model.model.", 21)) {
                snprintf(c->text_prefix, sizeof c->text_prefix, "language_model.model.");
                break;
            }
        mt_safetensors_close(st);
    }
    mt_clear_error();
    for (int f = 0; f < n; f++) free(files[f]);
    free(files);
}

mt_err mt_hf_read_config(const char *dir, mt_model_config *c) {
    char path[1100];
    snprintf(path, sizeof path, "%s/config.json", dir);
    memset(c, 0, sizeof *c);
    mt_err err = MT_OK;
    cJSON *j = mt_read_json(path, &err);
    if (!j) {
        if (err != MT_ERR_IO) return err;
        // a relative path is taken from the working directory, not from the experiment file's folder
        char cwd[1024], where[1100] = "";
        if (dir[0] != '/' && getcwd(cwd, sizeof cwd))
            snprintf(where, sizeof where, " (a relative path is read from the working directory, here %s)", cwd);
        return mt_errorf(MT_ERR_MODEL, "%s: no config.json; model.path must be a Hugging Face model folder%s", dir,
                         where);
    }
    const cJSON *archs = cJSON_GetObjectItemCaseSensitive(j, "architectures");
    const cJSON *arch = cJSON_IsArray(archs) ? cJSON_GetArrayItem(archs, 0) : NULL;
    const cJSON *model_type = cJSON_GetObjectItemCaseSensitive(j, "model_type");
    const char *name = cJSON_IsString(arch) ? arch->valuestring : NULL;
    if (!name && cJSON_IsString(model_type)) {
        const char *mt = model_type->valuestring;
        name = !strcmp(mt, "llama")         ? "LlamaForCausalLM"
               : !strcmp(mt, "mistral")     ? "MistralForCausalLM"
               : !strcmp(mt, "qwen2")       ? "Qwen2ForCausalLM"
               : !strcmp(mt, "qwen3")       ? "Qwen3ForCausalLM"
               : !strcmp(mt, "gemma3_text") ? "Gemma3ForCausalLM"
               : !strcmp(mt, "phi3")        ? "Phi3ForCausalLM"
                                            : mt;
    }
    if (!name) name = "(none)";
    snprintf(c->architecture, sizeof c->architecture, "%s", name);
    int qwen2 = !strcmp(name, "Qwen2ForCausalLM"), qwen3 = !strcmp(name, "Qwen3ForCausalLM");
    int gemma = !strcmp(name, "Gemma3ForCausalLM"), phi3 = !strcmp(name, "Phi3ForCausalLM");
    cJSON *top = j;  // the folder's config: the text model's fields are in text_config for a multimodal one
    snprintf(c->text_prefix, sizeof c->text_prefix, "model.");
    if (!strcmp(name, "Gemma3ForConditionalGeneration")) {
        cJSON *text = cJSON_GetObjectItemCaseSensitive(j, "text_config");
        if (!cJSON_IsObject(text)) {
            err = mt_errorf(MT_ERR_MODEL, "%s: Gemma3ForConditionalGeneration without a text_config object", path);
            goto done;
        }
        gemma = c->multimodal = 1;
        j = text;
        text_prefix(dir, c);
    }
    if (gemma) gemma_defaults(j);
    if (strcmp(name, "LlamaForCausalLM") && strcmp(name, "MistralForCausalLM") && !qwen2 && !qwen3 && !gemma && !phi3) {
        err = mt_errorf(MT_ERR_MODEL,
                        "%s: architecture '%s' (field architectures) is not supported; memtune trains "
                        "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
                        "Gemma3ForCausalLM and Phi3ForCausalLM",
                        path, name);
        goto done;
    }
    if (phi3 && (err = read_phi3(path, j, c))) goto done;
    c->qk_norm = qwen3 || gemma;
    c->gemma = gemma;
    static const char *const required[] = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads"};
    int *targets[] = {&c->V, &c->C, &c->F, &c->L, &c->H};
    for (int i = 0; i < 5; i++)
        if (get_int(j, required[i], targets[i])) {
            err = mt_errorf(MT_ERR_MODEL, "%s: field %s is missing or not a positive integer", path, required[i]);
            goto done;
        }
    c->KV = c->H;
    if (cJSON_GetObjectItemCaseSensitive(j, "num_key_value_heads") && get_int(j, "num_key_value_heads", &c->KV)) {
        err = mt_errorf(MT_ERR_MODEL, "%s: field num_key_value_heads is not a positive integer", path);
        goto done;
    }
    c->D = gemma ? 256 : c->C / c->H;  // Gemma3TextConfig's default head_dim is 256
    const cJSON *hd = cJSON_GetObjectItemCaseSensitive(j, "head_dim");
    if (hd && !cJSON_IsNull(hd) && get_int(j, "head_dim", &c->D)) {
        err = mt_errorf(MT_ERR_MODEL, "%s: field head_dim is not a positive integer", path);
        goto done;
    }
    if (c->H % c->KV || c->D % 2 || (!hd && !gemma && c->C % c->H)) {
        err = mt_errorf(MT_ERR_MODEL,
                        "%s: num_attention_heads (%d) must be a multiple of num_key_value_heads (%d), "
                        "and the head dimension (%d) even and hidden_size/heads",
                        path, c->H, c->KV, c->D);
        goto done;
    }
    c->max_position = 2048;
    get_int(j, "max_position_embeddings", &c->max_position);
    c->rms_eps = 1e-6f;
    get_float(j, "rms_norm_eps", &c->rms_eps);
    c->init_std = 0.02f;
    get_float(j, "initializer_range", &c->init_std);
    const cJSON *tie = cJSON_GetObjectItemCaseSensitive(j, "tie_word_embeddings");
    c->tie_embeddings = tie ? cJSON_IsTrue(tie) : gemma;  // LlamaConfig's default is false, Gemma3's true
    const cJSON *bias = cJSON_GetObjectItemCaseSensitive(j, "attention_bias");
    int attention_bias = bias ? cJSON_IsTrue(bias) : 0;
    c->qkv_bias = qwen2 || attention_bias;  // Qwen3, Llama: attention_bias on q, k, v and o alike
    c->o_bias = !qwen2 && attention_bias;
    if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, "mlp_bias"))) {
        err = mt_errorf(MT_ERR_MODEL, "%s: mlp_bias true is not supported (field mlp_bias)", path);
        goto done;
    }
    if (gemma && (err = read_gemma(path, j, c))) goto done;
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(j, "hidden_act");
    if (!gemma && act && (!cJSON_IsString(act) || strcmp(act->valuestring, "silu"))) {
        err = mt_errorf(MT_ERR_MODEL, "%s: hidden_act '%s' is not supported; memtune implements silu (SwiGLU)", path,
                        cJSON_IsString(act) ? act->valuestring : "?");
        goto done;
    }
    const cJSON *window = cJSON_GetObjectItemCaseSensitive(j, "sliding_window");
    const cJSON *use_window = cJSON_GetObjectItemCaseSensitive(j, "use_sliding_window");
    if (!gemma && cJSON_IsNumber(window) && !(use_window && cJSON_IsFalse(use_window)))
        c->sliding_window = (long)window->valuedouble;
    // Qwen2: the window only from layer max_window_layers on (transformers' layer_types)
    const cJSON *window_layers = cJSON_GetObjectItemCaseSensitive(j, "max_window_layers");
    if (c->sliding_window > 0 && cJSON_IsTrue(use_window) && cJSON_IsNumber(window_layers) &&
        window_layers->valuedouble > 0) {
        if (window_layers->valuedouble >= c->L) {
            c->sliding_window = 0;  // every layer attends in full
        } else {
            err = mt_errorf(MT_ERR_MODEL,
                            "%s: sliding_window on layers %g and up only (max_window_layers) is not supported; "
                            "memtune applies one attention to every layer",
                            path, window_layers->valuedouble);
            goto done;
        }
    }
    // dimensions a GPU could never hold are refused here, before any allocation
    double params = (double)c->V * c->C * (c->tie_embeddings ? 1 : 2) +
                    (double)c->L * ((double)c->C * c->D * (c->H + c->KV) * 2 + 3.0 * c->C * c->F);
    if (c->C > (1 << 20) || c->F > (1 << 22) || c->D > 4096 || c->L > 10000 || c->V > (1 << 24) || params > 2e12) {
        err = mt_errorf(MT_ERR_MODEL,
                        "%s: the dimensions (hidden_size %d, intermediate_size %d, layers %d, "
                        "vocab_size %d, head_dim %d: %.3g parameters) are beyond any model memtune can train",
                        path, c->C, c->F, c->L, c->V, c->D, params);
        goto done;
    }
    if ((err = read_rope(path, j, c))) goto done;
    const cJSON *dtype = cJSON_GetObjectItemCaseSensitive(top, "torch_dtype");
    if (!cJSON_IsString(dtype)) dtype = cJSON_GetObjectItemCaseSensitive(top, "dtype");
    if (!cJSON_IsString(dtype)) dtype = cJSON_GetObjectItemCaseSensitive(j, "torch_dtype");
    c->dtype = MT_DTYPE_F32;
    if (cJSON_IsString(dtype))
        c->dtype = !strcmp(dtype->valuestring, "bfloat16")  ? MT_DTYPE_BF16
                   : !strcmp(dtype->valuestring, "float16") ? MT_DTYPE_F16
                                                            : MT_DTYPE_F32;
done:
    cJSON_Delete(top);
    return err;
}

// Shards to read: the index's files, or model.safetensors alone.
static mt_err list_shards(const char *dir, char ***files, int *count) {
    char path[1100];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    *files = NULL;
    *count = 0;
    if (access(path, F_OK) != 0) {
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        if (access(path, R_OK) != 0)
            return mt_errorf(MT_ERR_MODEL,
                             "%s: no model.safetensors or model.safetensors.index.json; set "
                             "model.init: random to start from config.json alone",
                             dir);
        *files = malloc(sizeof **files);
        (*files)[0] = strdup(path);
        *count = 1;
        return MT_OK;
    }
    mt_err err = MT_OK;
    cJSON *j = mt_read_json(path, &err);
    if (!j) return err;
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(j, "weight_map");
    if (!cJSON_IsObject(map)) {
        cJSON_Delete(j);
        return mt_errorf(MT_ERR_FORMAT, "%s: no weight_map object", path);
    }
    int cap = cJSON_GetArraySize(map);
    *files = calloc((size_t)cap + 1, sizeof **files);
    for (const cJSON *e = map->child; e; e = e->next) {
        if (!cJSON_IsString(e) || strchr(e->valuestring, '/')) {
            err = mt_errorf(MT_ERR_FORMAT, "%s: weight_map entry %s must name a file in the folder", path, e->string);
            break;
        }
        char shard[1100];
        snprintf(shard, sizeof shard, "%s/%s", dir, e->valuestring);
        int seen = 0;
        for (int i = 0; i < *count && !seen; i++) seen = !strcmp((*files)[i], shard);
        if (!seen) (*files)[(*count)++] = strdup(shard);
    }
    cJSON_Delete(j);
    return err;
}

// A parameter's name in the files: the table's ("model.layers...",
// "lm_head.weight"), with a multimodal folder's language model prefix.
static void file_name(const mt_model_config *c, const char *name, char *buf, size_t len) {
    if (!c->multimodal)
        snprintf(buf, len, "%s", name);
    else if (!strncmp(name, "model.", 6))
        snprintf(buf, len, "%s%s", c->text_prefix, name + 6);
    else  // lm_head: at the top since transformers 4.52, inside language_model before
        snprintf(buf, len, "%s%s", strncmp(c->text_prefix, "language_model.", 15) ? "" : "language_model.", name);
}

mt_err mt_hf_load_weights(const char *dir, const mt_model_config *cfg, float *params) {
    int n;
    size_t total;
    free(mt_model_param_table(cfg, &n, &total));
    return mt_hf_load_params(dir, cfg, 0, n, params);
}

// A folder's safetensors shards, each opened (its header read and checked)
// once, and the model's parameter table: what loading in parts reads from.
typedef struct {
    const char *dir;
    const mt_model_config *cfg;
    mt_param_info *table;
    int n;
    char **files;
    mt_safetensors **st;
    int nfiles;
} shards;

static void shards_close(shards *h) {
    for (int f = 0; f < h->nfiles; f++) {
        if (h->st) mt_safetensors_close(h->st[f]);
        free(h->files[f]);
    }
    free(h->files);
    free(h->st);
    free(h->table);
}

static mt_err shards_open(shards *h, const char *dir, const mt_model_config *cfg) {
    size_t total;
    *h = (shards){.dir = dir, .cfg = cfg};
    h->table = mt_model_param_table(cfg, &h->n, &total);
    mt_err err = list_shards(dir, &h->files, &h->nfiles);
    if (!err) {
        h->st = calloc((size_t)(h->nfiles ? h->nfiles : 1), sizeof *h->st);
        MT_CHECK(h->st != NULL, "shards");
    }
    for (int f = 0; f < h->nfiles && !err; f++) err = mt_safetensors_open(&h->st[f], h->files[f]);
    if (err) shards_close(h);
    return err;
}

// Parameters first .. first + count - 1 as fp32 into dst (their span of the
// table's layout, from the first one's offset).
static mt_err shards_load(const shards *h, int first, int count, float *dst) {
    const mt_param_info *table = h->table;
    MT_CHECK(first >= 0 && count >= 0 && first + count <= h->n, "parameters %d..%d of %d", first, first + count, h->n);
    char *loaded = calloc((size_t)(count ? count : 1), 1);
    MT_CHECK(loaded != NULL, "loaded flags");
    mt_err err = MT_OK;
    for (int f = 0; f < h->nfiles && !err; f++) {
        for (int i = first; i < first + count && !err; i++) {
            char name[300];
            file_name(h->cfg, table[i].name, name, sizeof name);
            const mt_st_tensor *t = mt_safetensors_find(h->st[f], name);
            if (!t) continue;
            int ok = t->ndim == table[i].ndim && t->shape[0] == table[i].shape[0] &&
                     (table[i].ndim == 1 || t->shape[1] == table[i].shape[1]);
            if (!ok) {
                err = mt_errorf(MT_ERR_MODEL, "%s: tensor %s has shape [%lld%s%lld], config.json implies [%lld%s%lld]",
                                h->files[f], t->name, (long long)t->shape[0], t->ndim > 1 ? ", " : "",
                                t->ndim > 1 ? (long long)t->shape[1] : 0LL, (long long)table[i].shape[0],
                                table[i].ndim > 1 ? ", " : "", table[i].ndim > 1 ? (long long)table[i].shape[1] : 0LL);
                break;
            }
            err = mt_safetensors_read_f32(h->st[f], t, dst + (table[i].offset - table[first].offset));
            loaded[i - first] = 1;
        }
    }
    for (int i = first; i < first + count && !err; i++)
        if (!loaded[i - first])
            err = mt_errorf(MT_ERR_MODEL, "%s: tensor %s is missing from the safetensors files (config.json says %s)",
                            h->dir, table[i].name, h->cfg->tie_embeddings ? "tied embeddings" : "untied embeddings");
    free(loaded);
    return err;
}

mt_err mt_hf_load_params(const char *dir, const mt_model_config *cfg, int first, int count, float *dst) {
    shards h;
    mt_err err = shards_open(&h, dir, cfg);
    if (err) return err;
    err = shards_load(&h, first, count, dst);
    shards_close(&h);
    return err;
}

static cJSON *config_from_model(const mt_model_config *c) {
    cJSON *j = cJSON_CreateObject();
    cJSON *archs = cJSON_AddArrayToObject(j, "architectures");
    cJSON_AddItemToArray(archs, cJSON_CreateString(c->architecture));
    int qwen2 = !strcmp(c->architecture, "Qwen2ForCausalLM");
    cJSON_AddStringToObject(j, "model_type",
                            qwen2                                            ? "qwen2"
                            : c->gemma                                       ? "gemma3_text"
                            : c->fused                                       ? "phi3"
                            : c->qk_norm                                     ? "qwen3"
                            : !strcmp(c->architecture, "MistralForCausalLM") ? "mistral"
                                                                             : "llama");
    cJSON_AddNumberToObject(j, "vocab_size", c->V);
    cJSON_AddNumberToObject(j, "hidden_size", c->C);
    cJSON_AddNumberToObject(j, "intermediate_size", c->F);
    cJSON_AddNumberToObject(j, "num_hidden_layers", c->L);
    cJSON_AddNumberToObject(j, "num_attention_heads", c->H);
    cJSON_AddNumberToObject(j, "num_key_value_heads", c->KV);
    cJSON_AddNumberToObject(j, "head_dim", c->D);
    cJSON_AddNumberToObject(j, "max_position_embeddings", c->max_position);
    cJSON_AddNumberToObject(j, "rms_norm_eps", c->rms_eps);
    cJSON_AddNumberToObject(j, "rope_theta", c->rope_theta);
    cJSON_AddNumberToObject(j, "initializer_range", c->init_std);
    cJSON_AddBoolToObject(j, "tie_word_embeddings", c->tie_embeddings);
    if (!qwen2) cJSON_AddBoolToObject(j, "attention_bias", c->qkv_bias);
    if (c->gemma) {
        cJSON_AddStringToObject(j, "hidden_activation", "gelu_pytorch_tanh");
        cJSON_AddNumberToObject(j, "query_pre_attn_scalar", 1.0 / ((double)c->attn_scale * c->attn_scale));
        cJSON_AddNumberToObject(j, "sliding_window", (double)c->sliding_window);
        cJSON_AddNumberToObject(j, "sliding_window_pattern", c->global_every);
        cJSON_AddNumberToObject(j, "rope_local_base_freq", c->rope_local_theta);
        if (c->rope_linear_factor > 0) {
            cJSON *s = cJSON_AddObjectToObject(j, "rope_scaling");
            cJSON_AddStringToObject(s, "rope_type", "linear");
            cJSON_AddNumberToObject(s, "factor", c->rope_linear_factor);
        }
    } else {
        cJSON_AddStringToObject(j, "hidden_act", "silu");
    }
    if (c->rope_longrope) {
        cJSON_AddNumberToObject(j, "original_max_position_embeddings", c->rope_original_max_position);
        cJSON *s = cJSON_AddObjectToObject(j, "rope_scaling");
        cJSON_AddStringToObject(s, "rope_type", "longrope");
        cJSON_AddNumberToObject(s, "attention_factor", c->rope_attention_factor);
        cJSON_AddItemToObject(s, "long_factor", cJSON_CreateFloatArray(c->rope_long_factor, c->D / 2));
        cJSON_AddItemToObject(s, "short_factor", cJSON_CreateFloatArray(c->rope_short_factor, c->D / 2));
    }
    return j;
}

// The tensors of a multimodal folder that are not its language model's
// (vision tower, projector), read as fp32 to be written back unchanged.
typedef struct {
    mt_st_write_tensor *tensors;
    float **data;
    char (*names)[256];
    int n;
} carried;

static void carried_free(carried *c) {
    for (int i = 0; i < c->n; i++) free(c->data[i]);
    free(c->tensors), free(c->data), free(c->names);
    *c = (carried){0};
}

static mt_err carry_other_tensors(const char *src_dir, const mt_model_config *cfg, carried *out) {
    char **files = NULL;
    int nfiles = 0;
    if (list_shards(src_dir, &files, &nfiles)) {  // a random init: nothing to carry
        mt_clear_error();
        return MT_OK;
    }
    mt_err err = MT_OK;
    size_t prefix = strlen(cfg->text_prefix);
    for (int f = 0; f < nfiles && !err; f++) {
        mt_safetensors *st = NULL;
        if ((err = mt_safetensors_open(&st, files[f]))) break;
        for (int i = 0; i < mt_safetensors_count(st) && !err; i++) {
            const mt_st_tensor *t = mt_safetensors_get(st, i);
            if (!strncmp(t->name, cfg->text_prefix, prefix) || strstr(t->name, "lm_head.weight")) continue;
            size_t count = 1;
            for (int d = 0; d < t->ndim; d++) count *= (size_t)t->shape[d];
            int k = out->n++;
            out->tensors = realloc(out->tensors, (size_t)out->n * sizeof *out->tensors);
            out->data = realloc(out->data, (size_t)out->n * sizeof *out->data);
            out->names = realloc(out->names, (size_t)out->n * sizeof *out->names);
            MT_CHECK(out->tensors && out->data && out->names, "carried tensors");
            out->data[k] = malloc((count ? count : 1) * sizeof(float));
            if (!out->data[k]) {
                err = mt_errorf(MT_ERR_NOMEM, "out of host memory carrying %s into the saved model", t->name);
                out->n--;
                break;
            }
            snprintf(out->names[k], sizeof out->names[k], "%s", t->name);
            err = mt_safetensors_read_f32(st, t, out->data[k]);
            out->tensors[k] = (mt_st_write_tensor){out->names[k], t->ndim, {0}, out->data[k]};
            for (int d = 0; d < t->ndim; d++) out->tensors[k].shape[d] = t->shape[d];
        }
        mt_safetensors_close(st);
    }
    // names point into out->names, which realloc may have moved
    for (int k = 0; k < out->n; k++) out->tensors[k].name = out->names[k];
    for (int f = 0; f < nfiles; f++) free(files[f]);
    free(files);
    return err;
}

static mt_err save(const char *dir, const char *src_dir, const mt_model_config *cfg, const float *params,
                   const mt_f32_source *source, mt_dtype dtype) {
    char tmp[1100], path[1200];
    mt_err err = mt_dir_stage(dir, tmp, sizeof tmp);
    if (err) return err;
    cJSON *j = NULL;
    if (src_dir) {
        snprintf(path, sizeof path, "%s/config.json", src_dir);
        j = mt_read_json(path, &err);
    }
    if (!j) j = config_from_model(cfg), err = MT_OK;
    const char *dtype_name = dtype == MT_DTYPE_BF16 ? "bfloat16" : dtype == MT_DTYPE_F16 ? "float16" : "float32";
    cJSON_DeleteItemFromObject(j, "torch_dtype");
    cJSON_DeleteItemFromObject(j, "dtype");
    cJSON_AddStringToObject(j, "torch_dtype", dtype_name);
    char *text = cJSON_Print(j);
    cJSON_Delete(j);
    snprintf(path, sizeof path, "%s/config.json", tmp);
    err = mt_write_text(path, text);
    free(text);
    if (!err) {
        int n;
        size_t total;
        mt_param_info *table = mt_model_param_table(cfg, &n, &total);
        carried extra = {0};
        if (cfg->multimodal && src_dir) err = carry_other_tensors(src_dir, cfg, &extra);
        mt_st_write_tensor *tensors = calloc((size_t)(n + extra.n), sizeof *tensors);
        char(*names)[300] = calloc((size_t)n + 1, sizeof *names);
        size_t *offsets = calloc((size_t)(n + extra.n), sizeof *offsets);
        MT_CHECK(tensors && names && offsets, "save tables");
        for (int i = 0; i < n; i++) {
            file_name(cfg, table[i].name, names[i], sizeof names[i]);
            tensors[i].name = names[i];
            tensors[i].ndim = table[i].ndim;
            tensors[i].shape[0] = table[i].shape[0];
            tensors[i].shape[1] = table[i].shape[1];
            tensors[i].data = params ? params + table[i].offset : NULL;
            offsets[i] = table[i].offset;
        }
        if (extra.n)  // the folder's other parts, as they were
            memcpy(tensors + n, extra.tensors, (size_t)extra.n * sizeof *tensors);
        snprintf(path, sizeof path, "%s/model.safetensors", tmp);
        if (!err) err = mt_safetensors_write_from(path, tensors, n + extra.n, dtype, "pt", source, offsets);
        carried_free(&extra);
        free(tensors);
        free(names);
        free(offsets);
        free(table);
    }
    return mt_dir_publish(tmp, dir, err);
}

mt_err mt_hf_save(const char *dir, const char *src_dir, const mt_model_config *cfg, const float *params,
                  mt_dtype dtype) {
    return save(dir, src_dir, cfg, params, NULL, dtype);
}

mt_err mt_hf_save_from(const char *dir, const char *src_dir, const mt_model_config *cfg, const mt_f32_source *params,
                       mt_dtype dtype) {
    return save(dir, src_dir, cfg, NULL, params, dtype);
}

// ------------------------------------------------------ a layer at a time

// The unit that starts at parameter first of the table (the embedding, a
// layer, or the head: mt_param_forward_unit's): the index after it.
static int unit_end(const mt_param_info *table, int n, int L, int first) {
    int unit = mt_param_forward_unit(table[first].name, L), next = first + 1;
    while (next < n && mt_param_forward_unit(table[next].name, L) == unit) next++;
    return next;
}

static size_t unit_span(const mt_param_info *table, int first, int end) {
    return table[end - 1].offset + table[end - 1].count - table[first].offset;
}

static size_t widest_range(const mt_param_info *table, int n, int L, int by_tensor) {
    size_t widest = 0;
    for (int first = 0, end; first < n; first = end) {
        end = by_tensor ? first + 1 : unit_end(table, n, L, first);
        if (unit_span(table, first, end) > widest) widest = unit_span(table, first, end);
    }
    return widest;
}

size_t mt_hf_load_buffer_floats(const mt_model_config *cfg, int by_tensor) {
    int n;
    size_t total;
    mt_param_info *table = mt_model_param_table(cfg, &n, &total);
    size_t widest = widest_range(table, n, cfg->L, by_tensor);
    free(table);
    return widest;
}

static mt_err set_unit(void *ctx, int first, int count, const float *values) {
    return mt_model_set_params(ctx, first, count, values);
}

// The walk of mt_hf_set_model (by_tensor) and mt_hf_each_unit: the units, or
// each tensor alone, through one buffer the size of the widest.
static mt_err each_range(mt_model *m, const char *dir, uint64_t seed, int by_tensor, mt_hf_unit_fn fn, void *ctx) {
    const mt_model_config *cfg = mt_model_get_config(m);
    int n;
    const mt_param_info *table = mt_model_params(m, &n);
    size_t widest = widest_range(table, n, cfg->L, by_tensor);
    float *buf = malloc((widest ? widest : 1) * sizeof(float));
    if (!buf)
        return mt_errorf(MT_ERR_NOMEM, "out of host memory for one %s's fp32 values (%.1f GiB)",
                         by_tensor ? "tensor" : "layer", widest * 4.0 / 1073741824.0);
    shards h;  // each shard's header read once for all the units
    mt_err err = dir ? shards_open(&h, dir, cfg) : MT_OK;
    if (err) {
        free(buf);
        return err;
    }
    for (int first = 0, end; first < n && !err; first = end) {
        end = by_tensor ? first + 1 : unit_end(table, n, cfg->L, first);
        memset(buf, 0, unit_span(table, first, end) * sizeof(float));  // the padding between tensors
        if (!dir)
            mt_model_init_random_params(cfg, first, end - first, buf, seed);
        else
            err = shards_load(&h, first, end - first, buf);
        if (!err) err = fn(ctx, first, end - first, buf);
    }
    if (dir) shards_close(&h);
    free(buf);
    return err;
}

// a tensor at a time: at 70B a layer's fp32 values take 3.2 GiB, its widest tensor's 1.0 (the store the
// values go to is allocated already, so this buffer adds to the host peak: memtune plan counts it)
mt_err mt_hf_set_model(mt_model *m, const char *dir, uint64_t seed) { return each_range(m, dir, seed, 1, set_unit, m); }

// whole units: the offload store's int8 moments are filled in blocks that no unit splits
mt_err mt_hf_each_unit(mt_model *m, const char *dir, uint64_t seed, mt_hf_unit_fn fn, void *ctx) {
    return each_range(m, dir, seed, 0, fn, ctx);
}
