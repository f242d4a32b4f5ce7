// trainer/config.c: everything MT_CONFIG_TABLE generates (config.h).
#define _POSIX_C_SOURCE 200809L
#include "trainer/config.h"

#include "trainer/params.h"

#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

typedef enum { TYPE_INT, TYPE_FLOAT, TYPE_BOOL, TYPE_STR, TYPE_ENUM } key_type;

typedef struct {
    const char *section, *key, *dotted, *def, *choices, *help;
    key_type type;
    double lo, hi;
    size_t offset;
} key_info;

#define MT_X_INFO(sec, k, type, def, lo, hi, choices, help) \
    {#sec, #k, #sec "." #k, def, choices, help, TYPE_##type, lo, hi, offsetof(mt_config, sec##_##k)},
static const key_info keys[] = {MT_CONFIG_TABLE(MT_X_INFO)};
#undef MT_X_INFO
static const int num_keys = (int)(sizeof keys / sizeof keys[0]);

static const char *const type_names[] = {"integer", "number", "boolean", "string", "choice"};

static const key_info *find_key(const char *dotted) {
    for (int i = 0; i < num_keys; i++)
        if (strcmp(keys[i].dotted, dotted) == 0) return &keys[i];
    return NULL;
}

static size_t edit_distance(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b), row[128];
    if (lb >= 127) return 1000;
    for (size_t j = 0; j <= lb; j++) row[j] = j;
    for (size_t i = 1; i <= la; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t up = row[j], best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best) best = up + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            diag = up;
            row[j] = best;
        }
    }
    return row[lb];
}

static const char *nearest_key(const char *dotted) {
    const char *best = NULL;
    size_t best_d = (size_t)-1;
    for (int i = 0; i < num_keys; i++) {
        size_t d = edit_distance(dotted, keys[i].dotted);
        // also compare without the section, for a key put under the wrong one
        const char *dot = strchr(dotted, '.');
        if (dot) {
            size_t d2 = edit_distance(dot + 1, keys[i].key) + 1;
            if (d2 < d) d = d2;
        }
        if (d < best_d) best_d = d, best = keys[i].dotted;
    }
    return best_d <= 4 ? best : NULL;
}

static int choice_ok(const char *choices, const char *value) {
    size_t len = strlen(value);
    for (const char *p = choices; *p;) {
        const char *end = strchr(p, '|');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        if (n == len && strncmp(p, value, n) == 0) return 1;
        if (!end) break;
        p = end + 1;
    }
    return 0;
}

static mt_err set_value(mt_config *cfg, const key_info *k, const char *value, const char *origin) {
    char *field = (char *)cfg + k->offset;
    switch (k->type) {
        case TYPE_INT: {
            long v;
            if (!strcmp(k->dotted, "train.seq_len") && !strcmp(value, "max")) {
                *(long *)field = MT_SEQ_LEN_MAX;
                break;
            }
            if (mt_parse_long(value, (long)k->lo, (long)k->hi, &v))
                return mt_errorf(MT_ERR_CONFIG, "%s: %s = '%s': expected an integer in [%ld, %ld]", origin, k->dotted,
                                 value, (long)k->lo, (long)k->hi);
            *(long *)field = v;
            break;
        }
        case TYPE_FLOAT: {
            double v;
            if (mt_parse_double(value, k->lo, k->hi, &v))
                return mt_errorf(MT_ERR_CONFIG, "%s: %s = '%s': expected a number in [%g, %g]", origin, k->dotted,
                                 value, k->lo, k->hi);
            *(double *)field = v;
            break;
        }
        case TYPE_BOOL:
            if (!strcmp(value, "true") || !strcmp(value, "yes") || !strcmp(value, "on") || !strcmp(value, "1"))
                *(int *)field = 1;
            else if (!strcmp(value, "false") || !strcmp(value, "no") || !strcmp(value, "off") || !strcmp(value, "0"))
                *(int *)field = 0;
            else
                return mt_errorf(MT_ERR_CONFIG, "%s: %s = '%s': expected true or false", origin, k->dotted, value);
            break;
        case TYPE_ENUM:
            if (!choice_ok(k->choices, value))
                return mt_errorf(MT_ERR_CONFIG, "%s: %s = '%s': expected one of %s", origin, k->dotted, value,
                                 k->choices);
            /* fall through */
        case TYPE_STR: {
            char *copy = strdup(value);
            MT_CHECK(copy != NULL, "config string");
            free(*(char **)field);
            *(char **)field = copy;
            break;
        }
    }
    return MT_OK;
}

void mt_config_defaults(mt_config *cfg) {
    memset(cfg, 0, sizeof *cfg);
    for (int i = 0; i < num_keys; i++) {
        mt_err err = set_value(cfg, &keys[i], keys[i].def, "default");
        MT_CHECK(err == MT_OK, "default of %s does not pass its own check: %s", keys[i].dotted, mt_last_error());
    }
}

void mt_config_free(mt_config *cfg) {
    for (int i = 0; i < num_keys; i++)
        if (keys[i].type == TYPE_STR || keys[i].type == TYPE_ENUM) {
            char **field = (char **)((char *)cfg + keys[i].offset);
            free(*field);
            *field = NULL;
        }
}

mt_err mt_config_set(mt_config *cfg, const char *dotted_key, const char *value, const char *origin) {
    const key_info *k = find_key(dotted_key);
    if (!k) {
        const char *near = nearest_key(dotted_key);
        return mt_errorf(MT_ERR_CONFIG, "%s: unknown key '%s'%s%s%s. `memtune train --help` lists every key.", origin,
                         dotted_key, near ? " (did you mean '" : "", near ? near : "", near ? "'?)" : "");
    }
    return set_value(cfg, k, value, origin);
}

mt_err mt_config_set_assignment(mt_config *cfg, const char *assignment, const char *origin) {
    const char *eq = strchr(assignment, '=');
    if (!eq || eq == assignment)
        return mt_errorf(MT_ERR_USAGE, "%s '%s': expected section.key=value, e.g. --set optim.lr=1e-4", origin,
                         assignment);
    char key[256];
    size_t n = (size_t)(eq - assignment);
    if (n >= sizeof key) n = sizeof key - 1;
    memcpy(key, assignment, n);
    key[n] = '\0';
    return mt_config_set(cfg, key, eq + 1, origin);
}

// ---------------------------------------------------------------- YAML file

static mt_err yaml_fail(const char *path, const yaml_parser_t *p) {
    return mt_errorf(MT_ERR_CONFIG, "%s:%zu:%zu: YAML syntax error: %s", path, p->problem_mark.line + 1,
                     p->problem_mark.column + 1, p->problem ? p->problem : "unknown");
}

mt_err mt_config_load_yaml(mt_config *cfg, const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return mt_errorf(MT_ERR_IO, "%s: cannot open the config file", path);
    yaml_parser_t parser;
    yaml_parser_initialize(&parser);
    yaml_parser_set_input_file(&parser, f);
    // States: 0 top level (expect section name), 1 in a section (expect key), 2 expect value
    int depth = 0, state = 0;
    char section[128] = "", key[128] = "", origin[1200];
    mt_err err = MT_OK;
    for (int done = 0; !done && !err;) {
        yaml_event_t ev;
        if (!yaml_parser_parse(&parser, &ev)) {
            err = yaml_fail(path, &parser);
            break;
        }
        size_t line = ev.start_mark.line + 1;
        switch (ev.type) {
            case YAML_STREAM_END_EVENT: done = 1; break;
            case YAML_MAPPING_START_EVENT:
                depth++;
                if (depth == 2 && state == 2)
                    state = 1;
                else if (depth > 2 || (depth == 2 && state != 1))
                    err = mt_errorf(MT_ERR_CONFIG, "%s:%zu: '%s%s%s' should be a plain value, not a mapping", path,
                                    line, section, depth == 2 ? "" : ".", key);
                if (depth == 1) state = 0;
                break;
            case YAML_MAPPING_END_EVENT:
                depth--;
                state = 0;
                break;
            case YAML_SEQUENCE_START_EVENT:
                err = mt_errorf(MT_ERR_CONFIG, "%s:%zu: lists are not used in memtune configs ('%s.%s')", path, line,
                                section, key);
                break;
            case YAML_SCALAR_EVENT: {
                const char *value = (const char *)ev.data.scalar.value;
                if (depth == 1 && state == 0) {
                    snprintf(section, sizeof section, "%s", value);
                    state = 2;  // expect the section's mapping
                } else if (depth == 1 && state == 2) {
                    err = mt_errorf(MT_ERR_CONFIG,
                                    "%s:%zu: '%s' should be a section holding keys (e.g. %s:\\n  key: "
                                    "value), not a value",
                                    path, line, section, section);
                } else if (depth == 2 && state == 1) {
                    snprintf(key, sizeof key, "%s", value);
                    state = 3;
                } else if (depth == 2 && state == 3) {
                    char dotted[300];
                    snprintf(dotted, sizeof dotted, "%s.%s", section, key);
                    snprintf(origin, sizeof origin, "%s:%zu", path, line);
                    err = mt_config_set(cfg, dotted, value, origin);
                    state = 1;
                } else if (depth == 0) {
                    if (value[0])
                        err = mt_errorf(MT_ERR_CONFIG, "%s:%zu: the file must be a mapping of sections", path, line);
                }
                break;
            }
            default: break;
        }
        yaml_event_delete(&ev);
    }
    yaml_parser_delete(&parser);
    fclose(f);
    return err;
}

// ------------------------------------------------------------ output, docs

static void write_value(const mt_config *cfg, const key_info *k, FILE *f) {
    const char *field = (const char *)cfg + k->offset;
    switch (k->type) {
        case TYPE_INT: fprintf(f, "%ld", *(const long *)field); break;
        case TYPE_FLOAT: fprintf(f, "%.17g", *(const double *)field); break;
        case TYPE_BOOL: fprintf(f, "%s", *(const int *)field ? "true" : "false"); break;
        default: fprintf(f, "\"%s\"", *(char *const *)field); break;
    }
}

void mt_config_write_yaml(const mt_config *cfg, FILE *f) {
    const char *section = "";
    for (int i = 0; i < num_keys; i++) {
        if (strcmp(section, keys[i].section)) fprintf(f, "%s:\n", section = keys[i].section);
        fprintf(f, "  %s: ", keys[i].key);
        write_value(cfg, &keys[i], f);
        fputc('\n', f);
    }
}

static const char *const outside_training_hash[] = {
    "train.resume", "train.stop_after", "train.log_every", "train.eval_every", "train.eval_batches", "train.device",
    "train.sample_every", "train.sample_prompts", "train.sample_tokens", "output.dir", "output.save_model",
    "output.save_dtype", "checkpoint.every", "checkpoint.keep", "checkpoint.final",
    // where the optimizer state lives changes no value it holds: a run may
    // resume with it moved (onto a smaller GPU, say)
    "offload.optimizer", "offload.path", "offload.io_threads", "offload.threads", "offload.trace_step",
    "offload.grad_sum", "offload.ratio",
    // nor which of a streamed base's layers stay on the GPU (the same values, copied once)
    "model.resident_layers",
    // a checkpoint resumes whatever the sharding (docs/checkpoints.md)
    "dist.zero_stage", "dist.timeout",
    // the settings it picks are in the hash themselves
    "memory.budget", "memory.host_check"};

// FNV-1a over KEY=VALUE lines of every key, or of those that change what
// training computes.
static unsigned long long hash_keys(const mt_config *cfg, int training_only) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    MT_CHECK(f != NULL, "memstream");
    for (int i = 0; i < num_keys; i++) {
        int skip = 0;
        for (size_t j = 0; j < sizeof outside_training_hash / sizeof *outside_training_hash && training_only; j++)
            skip |= !strcmp(keys[i].dotted, outside_training_hash[j]);
        if (skip) continue;
        fprintf(f, "%s=", keys[i].dotted);
        write_value(cfg, &keys[i], f);
        fputc('\n', f);
    }
    fclose(f);
    unsigned long long h = 1469598103934665603ull;
    for (size_t i = 0; i < len; i++) h = (h ^ (unsigned char)buf[i]) * 1099511628211ull;
    free(buf);
    return h;
}

unsigned long long mt_config_training_hash(const mt_config *cfg) { return hash_keys(cfg, 1); }

unsigned long long mt_config_hash(const mt_config *cfg) { return hash_keys(cfg, 0); }

void mt_config_write_reference(FILE *f, int markdown) {
    const char *section = "";
    if (markdown)
        fprintf(f,
                "# Configuration reference\n\n"
                "Generated by `memtune config-docs` from the table in trainer/config.h; do not edit by hand.\n"
                "Every key can be set in the YAML file (`section:` then `  key: value`) or on the command\n"
                "line with `--set section.key=value`, which wins over the file.\n");
    for (int i = 0; i < num_keys; i++) {
        const key_info *k = &keys[i];
        if (strcmp(section, k->section)) {
            section = k->section;
            if (markdown)
                fprintf(f, "\n## %s\n\n| key | type | default | allowed | meaning |\n|---|---|---|---|---|\n", section);
            else
                fprintf(f, "\n%s:\n", section);
        }
        char allowed[128] = "";
        if (k->type == TYPE_INT)
            snprintf(allowed, sizeof allowed, "%ld .. %ld", (long)k->lo, (long)k->hi);
        else if (k->type == TYPE_FLOAT)
            snprintf(allowed, sizeof allowed, "%g .. %g", k->lo, k->hi);
        else if (k->type == TYPE_ENUM)
            snprintf(allowed, sizeof allowed, "%s", k->choices);
        else if (k->type == TYPE_BOOL)
            snprintf(allowed, sizeof allowed, "true|false");
        if (markdown) {
            fprintf(f, "| `%s` | %s | `%s` | ", k->dotted, type_names[k->type], k->def);
            for (const char *p = allowed; *p; p++) fputs(*p == '|' ? "\\|" : (char[2]){*p, 0}, f);
            fprintf(f, " | %s |\n", k->help);
        } else {
            fprintf(f, "  %-36s %s (default %s%s%s%s)\n      %s\n", k->dotted, type_names[k->type],
                    k->def[0] ? k->def : "none", allowed[0] ? "; " : "", allowed, "", k->help);
        }
    }
}

// Whether a key of `section` other than `except` (NULL: none) differs from its default.
// Whether any key of `section` differs from its default, leaving out the
// keys named in `except` (NULL-terminated; NULL: none).
static int section_changed(const mt_config *cfg, const char *section, const char *const *except) {
    mt_config d;
    mt_config_defaults(&d);
    int changed = 0;
    for (int i = 0; i < num_keys && !changed; i++) {
        const key_info *k = &keys[i];
        int left_out = 0;
        for (int e = 0; except && except[e]; e++) left_out |= !strcmp(k->key, except[e]);
        if (strcmp(k->section, section) || left_out) continue;
        const char *a = (const char *)cfg + k->offset, *b = (const char *)&d + k->offset;
        if (k->type == TYPE_INT)
            changed = *(const long *)a != *(const long *)b;
        else if (k->type == TYPE_FLOAT)
            changed = *(const double *)a != *(const double *)b;
        else if (k->type == TYPE_BOOL)
            changed = *(const int *)a != *(const int *)b;
        else
            changed = strcmp(*(char *const *)a, *(char *const *)b) != 0;
    }
    mt_config_free(&d);
    return changed;
}

mt_err mt_config_validate(const mt_config *cfg) {
    if (cfg->train_seq_len == MT_SEQ_LEN_MAX)
        return mt_errorf(MT_ERR_CONFIG,
                         "train.seq_len: max is resolved by `memtune train` against memory.budget (or by `memtune "
                         "plan` against the GPU's memory); here it needs a number");
    if (!cfg->model_path[0])
        return mt_errorf(MT_ERR_CONFIG,
                         "model.path is not set: name a Hugging Face model folder (config.json + "
                         "safetensors), e.g. --set model.path=models/tiny");
    if (!cfg->data_train[0])
        return mt_errorf(MT_ERR_CONFIG,
                         "data.train is not set: name an HDF5 token dataset made by `memtune "
                         "tokenize`");
    if (cfg->model_offload_activations && !cfg->model_activation_checkpointing)
        return mt_errorf(MT_ERR_CONFIG,
                         "model.offload_activations needs model.activation_checkpointing: true (it offloads the "
                         "layer inputs that checkpointing keeps)");
    if (cfg->model_ssd_layer_inputs > 0 && !cfg->model_offload_activations)
        return mt_errorf(MT_ERR_CONFIG,
                         "model.ssd_layer_inputs is %ld, but model.offload_activations is false (no layer input "
                         "leaves the GPU); set model.offload_activations: true, or model.ssd_layer_inputs: 0",
                         cfg->model_ssd_layer_inputs);
    if (cfg->model_ssd_layer_inputs > 0 && !cfg->offload_path[0])
        return mt_errorf(MT_ERR_CONFIG,
                         "model.ssd_layer_inputs needs offload.path: a folder on a local disk with room for those "
                         "layer inputs (memtune plan gives their size on its disk line)");
    if (cfg->model_gpu_layer_inputs > 0 && !cfg->model_offload_activations)
        return mt_errorf(MT_ERR_CONFIG,
                         "model.gpu_layer_inputs is %ld, but model.offload_activations is false (then every layer "
                         "input stays on the GPU); set model.offload_activations: true, or model.gpu_layer_inputs: 0",
                         cfg->model_gpu_layer_inputs);
    if (!strcmp(cfg->model_quantize, "nf4") && cfg->lora_r == 0)
        return mt_errorf(MT_ERR_CONFIG,
                         "model.quantize is nf4 but lora.r is 0: a quantized base cannot be trained itself; "
                         "set lora.r (e.g. --set lora.r=16) for QLoRA, or model.quantize: none");
    const char *w = cfg->model_weights;
    int streamed = !strcmp(w, "cpu") || !strcmp(w, "ssd"), adamw = !strcmp(cfg->optim_kind, "adamw");
    if (streamed && !strcmp(cfg->optim_kind, "galore"))
        return mt_errorf(MT_ERR_CONFIG,
                         "model.weights: %s streams the base's layers through the GPU, which GaLore does not take "
                         "yet; set model.weights: gpu, or train with LoRA, MeZO or offload.optimizer: cpu",
                         w);
    if (streamed && adamw && cfg->lora_r == 0 && !strcmp(cfg->offload_optimizer, "none"))
        return mt_errorf(MT_ERR_CONFIG,
                         "model.weights: %s with a full fine-tune needs AdamW's state off the GPU too "
                         "(offload.optimizer: cpu or ssd), which updates the weights where they live",
                         w);
    if (streamed && cfg->dist_zero_stage > 0)
        return mt_errorf(MT_ERR_CONFIG,
                         "model.weights: %s keeps every rank's whole base in its host memory; ZeRO's gather of "
                         "updated shards into it is not built: set dist.zero_stage: 0",
                         w);
    if (cfg->model_resident_layers > 0 && !streamed && strcmp(w, "auto"))
        return mt_errorf(MT_ERR_CONFIG,
                         "model.resident_layers is %ld, but model.weights is %s: every layer is on the GPU already; "
                         "set model.resident_layers: 0, or model.weights: cpu to stream the layers after the first %ld",
                         cfg->model_resident_layers, w, cfg->model_resident_layers);
    if (cfg->model_resident_layers > 0 && adamw && cfg->lora_r == 0)
        return mt_errorf(
            MT_ERR_CONFIG,
            "model.resident_layers is %ld, but a full fine-tune's offloaded optimizer writes every updated "
            "layer into host memory, so a layer kept on the GPU would be copied there each step all the "
            "same; set model.resident_layers: 0 (or offload.ratio below 1 keeps the first units' state "
            "and weights on the GPU with model.weights: gpu)",
            cfg->model_resident_layers);
    if (!strcmp(w, "ssd") && !cfg->offload_path[0])
        return mt_errorf(MT_ERR_CONFIG,
                         "model.weights ssd needs offload.path: a folder on a fast local disk (NVMe) with room for "
                         "the base (2 bytes a parameter, about 0.56 with model.quantize: nf4)");
    unsigned targets;
    if (cfg->lora_r > 0 && mt_lora_parse_targets(cfg->lora_targets, &targets)) {
        char why[512];
        snprintf(why, sizeof why, "%s", mt_last_error());
        return mt_errorf(MT_ERR_CONFIG, "lora.targets: %s", why);
    }
    if (cfg->lora_init[0] && cfg->lora_r == 0)
        return mt_errorf(MT_ERR_CONFIG, "lora.init names an adapter but lora.r is 0; set lora.r to the adapter's r");
    int mezo = !strcmp(cfg->optim_kind, "mezo");
    if (mezo && cfg->model_offload_activations)
        return mt_errorf(MT_ERR_CONFIG,
                         "model.offload_activations does nothing with optim.kind: mezo (its forward passes keep one "
                         "layer's activations); set it to false");
    if (!mezo && section_changed(cfg, "mezo", NULL))
        return mt_errorf(MT_ERR_CONFIG, "mezo.* keys need optim.kind: mezo (it is %s)", cfg->optim_kind);
    if (!cfg->mezo_trainable[0])
        return mt_errorf(MT_ERR_CONFIG, "mezo.trainable is empty; use * to train every trainable parameter");
    int galore = !strcmp(cfg->optim_kind, "galore");
    if (!galore && section_changed(cfg, "galore", NULL))
        return mt_errorf(MT_ERR_CONFIG, "galore.* keys need optim.kind: galore (it is %s)", cfg->optim_kind);
    if (galore && cfg->lora_r > 0)
        return mt_errorf(MT_ERR_CONFIG,
                         "optim.kind galore trains every parameter, but lora.r is %ld; set lora.r: 0 (GaLore) or "
                         "optim.kind: adamw (LoRA)",
                         cfg->lora_r);
    if (galore && cfg->train_grad_accum > 1)
        return mt_errorf(MT_ERR_CONFIG,
                         "optim.kind galore applies each layer's update during backward, so train.grad_accum must be "
                         "1 (it is %ld); raise train.micro_batch instead",
                         cfg->train_grad_accum);
    if (galore && cfg->optim_grad_clip > 0)
        return mt_errorf(MT_ERR_CONFIG,
                         "optim.grad_clip is %g, but optim.kind galore updates each layer before the global gradient "
                         "norm is known; set optim.grad_clip: 0 (configs/galore.yaml does)",
                         cfg->optim_grad_clip);
    if (galore && !cfg->galore_targets[0])
        return mt_errorf(MT_ERR_CONFIG, "galore.targets is empty; the default projects the attention and MLP matrices");
    int offload = strcmp(cfg->offload_optimizer, "none") != 0;
    if (offload && mezo)
        return mt_errorf(MT_ERR_CONFIG,
                         "offload.optimizer %s moves AdamW's state, but optim.kind is mezo, which keeps none; set "
                         "offload.optimizer: none, or optim.kind: adamw or galore",
                         cfg->offload_optimizer);
    if (cfg->dist_zero_stage > 0 && mezo)
        return mt_errorf(MT_ERR_CONFIG,
                         "dist.zero_stage %ld shards the optimizer's state, but optim.kind is mezo, which keeps none; "
                         "set dist.zero_stage: 0",
                         cfg->dist_zero_stage);
    // offload.path also serves model.weights ssd (auto may choose it) and the layer inputs' file
    // (model.ssd_layer_inputs, which train.seq_len: max may set); offload.trace_step streamed weights' timeline
    int weights_file =
        !strcmp(cfg->model_weights, "ssd") || !strcmp(cfg->model_weights, "auto") || cfg->model_offload_activations;
    int may_stream = strcmp(cfg->model_weights, "gpu") != 0;
    const char *except[3] = {NULL, NULL, NULL}, **next = except;
    if (weights_file) *next++ = "path";
    if (may_stream) *next++ = "trace_step";
    if (!offload && section_changed(cfg, "offload", except))
        return mt_errorf(MT_ERR_CONFIG, "offload.* keys need offload.optimizer: cpu or ssd (it is none)%s%s",
                         weights_file ? ", except offload.path for model.weights' and the layer inputs' files" : "",
                         may_stream ? (weights_file ? " and offload.trace_step for the streamed weights' timeline"
                                                    : ", except offload.trace_step for the streamed weights' timeline")
                                    : "");
    if (cfg->offload_delay) {
        const char *why = galore                     ? "optim.kind galore updates most weights itself"
                          : cfg->dist_zero_stage > 0 ? "dist.zero_stage above 0 shares each rank's updated shard"
                          : strcmp(cfg->model_weights, "gpu") ? "the base's layers are streamed (model.weights)"
                                                              : NULL;
        if (why)
            return mt_errorf(MT_ERR_CONFIG,
                             "offload.delay 1 is built for AdamW on one GPU's resident weights, and here %s; set "
                             "offload.delay: 0",
                             why);
    }
    if (cfg->offload_ratio < 1) {
        const char *why = galore                     ? "optim.kind galore keeps its own state"
                          : cfg->lora_r > 0          ? "LoRA's adapters are few; offload them all or none"
                          : cfg->dist_zero_stage > 0 ? "dist.zero_stage above 0 shards the state over the ranks"
                          : strcmp(cfg->model_weights, "gpu") ? "the base's layers are streamed (model.weights)"
                                                              : NULL;
        if (why)
            return mt_errorf(MT_ERR_CONFIG,
                             "offload.ratio %g keeps the AdamW state of a full fine-tune's first units on the GPU, "
                             "but %s; set offload.ratio: 1",
                             cfg->offload_ratio, why);
        if (cfg->offload_ratio <= 0)
            return mt_errorf(MT_ERR_CONFIG,
                             "offload.ratio 0 offloads nothing: set offload.optimizer: none to keep the whole state "
                             "on the GPU, or a ratio above 0");
    }
    if (!strcmp(cfg->offload_optimizer, "ssd") && !cfg->offload_path[0])
        return mt_errorf(MT_ERR_CONFIG,
                         "offload.optimizer ssd needs offload.path: a folder on a fast local disk (NVMe) with room for "
                         "12 bytes per trained parameter");
    if (cfg->optim_warmup_steps >= cfg->train_steps && cfg->optim_warmup_steps > 0)
        return mt_errorf(MT_ERR_CONFIG, "optim.warmup_steps (%ld) must be below train.steps (%ld)",
                         cfg->optim_warmup_steps, cfg->train_steps);
    return MT_OK;
}
