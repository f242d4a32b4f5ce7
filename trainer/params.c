// trainer/params.c: parameter tables and adapter names (params.h).
#include "trainer/params.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void add_param(mt_param_info *t, int *n, size_t *offset, const char *name, int64_t d0, int64_t d1) {
    mt_param_info *p = &t[(*n)++];
    snprintf(p->name, sizeof p->name, "%s", name);
    p->ndim = d1 ? 2 : 1;
    p->shape[0] = d0;
    p->shape[1] = d1;
    p->count = (size_t)d0 * (size_t)(d1 ? d1 : 1);
    p->offset = *offset;
    p->decay = p->ndim == 2;
    // keep every tensor 16-element aligned: vector loads and cuBLAS like it
    *offset += (p->count + 15) & ~(size_t)15;
}

mt_param_info *mt_model_param_table(const mt_model_config *c, int *count, size_t *total) {
    int max = 3 + c->L * 17;  // a layer has at most 17 tensors (4 biases, 2 head norms, Gemma's 2 more norms)
    mt_param_info *t = calloc((size_t)max, sizeof *t);
    MT_CHECK(t != NULL, "param table");
    int n = 0;
    size_t off = 0;
    char name[128];
    int64_t HD = (int64_t)c->H * c->D, KVD = (int64_t)c->KV * c->D;
    add_param(t, &n, &off, "model.embed_tokens.weight", c->V, c->C);
    for (int l = 0; l < c->L; l++) {
#define LAYER_PARAM(suffix, d0, d1)                               \
    snprintf(name, sizeof name, "model.layers.%d.%s", l, suffix); \
    add_param(t, &n, &off, name, d0, d1)
        LAYER_PARAM("input_layernorm.weight", c->C, 0);
        if (c->fused) {  // Phi-3: q, k, v are row blocks of qkv_proj (no biases there)
            LAYER_PARAM("self_attn.qkv_proj.weight", HD + 2 * KVD, c->C);
        } else {
            LAYER_PARAM("self_attn.q_proj.weight", HD, c->C);
        }
        if (c->qkv_bias) {
            LAYER_PARAM("self_attn.q_proj.bias", HD, 0);
        }
        if (!c->fused) {
            LAYER_PARAM("self_attn.k_proj.weight", KVD, c->C);
        }
        if (c->qkv_bias) {
            LAYER_PARAM("self_attn.k_proj.bias", KVD, 0);
        }
        if (!c->fused) {
            LAYER_PARAM("self_attn.v_proj.weight", KVD, c->C);
        }
        if (c->qkv_bias) {
            LAYER_PARAM("self_attn.v_proj.bias", KVD, 0);
        }
        if (c->qk_norm) {
            LAYER_PARAM("self_attn.q_norm.weight", c->D, 0);
            LAYER_PARAM("self_attn.k_norm.weight", c->D, 0);
        }
        LAYER_PARAM("self_attn.o_proj.weight", c->C, HD);
        if (c->o_bias) {
            LAYER_PARAM("self_attn.o_proj.bias", c->C, 0);
        }
        // Llama's post_attention_layernorm is the MLP's input norm; Gemma's
        // normalises the attention's output, pre_feedforward_layernorm the MLP's input
        LAYER_PARAM("post_attention_layernorm.weight", c->C, 0);
        if (c->gemma) {
            LAYER_PARAM("pre_feedforward_layernorm.weight", c->C, 0);
        }
        if (c->fused) {  // Phi-3: gate, then up, in gate_up_proj
            LAYER_PARAM("mlp.gate_up_proj.weight", 2 * (int64_t)c->F, c->C);
        } else {
            LAYER_PARAM("mlp.gate_proj.weight", c->F, c->C);
            LAYER_PARAM("mlp.up_proj.weight", c->F, c->C);
        }
        LAYER_PARAM("mlp.down_proj.weight", c->C, c->F);
        if (c->gemma) {
            LAYER_PARAM("post_feedforward_layernorm.weight", c->C, 0);
        }
#undef LAYER_PARAM
    }
    add_param(t, &n, &off, "model.norm.weight", c->C, 0);
    if (!c->tie_embeddings) add_param(t, &n, &off, "lm_head.weight", c->V, c->C);
    *count = n;
    *total = off;
    return t;
}

int mt_layer_local(const mt_model_config *c, int l) { return c->global_every > 0 && (l + 1) % c->global_every != 0; }

const char *const mt_lora_module_names[MT_LORA_MODULES] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                           "gate_proj", "up_proj", "down_proj"};

float mt_lora_scale(const mt_lora_config *lora) {
    return lora->rslora ? lora->alpha / sqrtf((float)lora->r) : lora->alpha / (float)lora->r;
}

static const char *module_parent(int t) { return t <= MT_LORA_O ? "self_attn" : "mlp"; }

// Input and output widths of module t.
static void module_shape(const mt_model_config *c, int t, int64_t *in, int64_t *out) {
    int64_t HD = (int64_t)c->H * c->D, KVD = (int64_t)c->KV * c->D;
    switch (t) {
        case MT_LORA_Q: *in = c->C, *out = HD; break;
        case MT_LORA_K:
        case MT_LORA_V: *in = c->C, *out = KVD; break;
        case MT_LORA_O: *in = HD, *out = c->C; break;
        case MT_LORA_GATE:
        case MT_LORA_UP: *in = c->C, *out = c->F; break;
        default: *in = c->F, *out = c->C; break;  // down_proj
    }
}

// Phi-3's fused modules: q, k, v in qkv_proj (named at q), gate, up in
// gate_up_proj (named at gate); k, v and up have no module of their own there.
static const char *fused_name(int t) { return t == MT_LORA_Q ? "qkv_proj" : t == MT_LORA_GATE ? "gate_up_proj" : NULL; }
int mt_lora_fused_owner(const mt_model_config *c, int t) {
    if (!c->fused) return t;
    return t == MT_LORA_K || t == MT_LORA_V ? MT_LORA_Q : t == MT_LORA_UP ? MT_LORA_GATE : t;
}
int mt_lora_fused_part(const mt_model_config *c, int t) { return mt_lora_fused_owner(c, t) != t; }
size_t mt_lora_fused_rows(const mt_model_config *c, int t) {
    size_t rows = 0;
    int64_t in, out;
    for (int k = mt_lora_fused_owner(c, t); k < t; k++) module_shape(c, k, &in, &out), rows += (size_t)out;
    return rows;
}
// The module name PEFT gives module t of model c.
static const char *module_name(const mt_model_config *c, int t) {
    return c->fused && fused_name(t) ? fused_name(t) : mt_lora_module_names[t];
}

// A name of one module, with an optional "self_attn." / "mlp." prefix; a
// fused module's name (qkv_proj, gate_up_proj) stands for its parts.
static unsigned module_bits(const char *name, size_t len) {
    for (int t = 0; t <= MT_LORA_GATE; t += MT_LORA_GATE) {
        const char *fused = fused_name(t);  // (q and gate name theirs)
        char with_parent[64];
        if (!fused) continue;
        snprintf(with_parent, sizeof with_parent, "%s.%s", module_parent(t), fused);
        if ((strlen(fused) == len && !strncmp(name, fused, len)) ||
            (strlen(with_parent) == len && !strncmp(name, with_parent, len)))
            return t == MT_LORA_Q ? 1u << MT_LORA_Q | 1u << MT_LORA_K | 1u << MT_LORA_V
                                  : 1u << MT_LORA_GATE | 1u << MT_LORA_UP;
    }
    for (int t = 0; t < MT_LORA_MODULES; t++) {
        const char *base = mt_lora_module_names[t];
        char with_parent[64];
        snprintf(with_parent, sizeof with_parent, "%s.%s", module_parent(t), base);
        if ((strlen(base) == len && !strncmp(name, base, len)) ||
            (strlen(with_parent) == len && !strncmp(name, with_parent, len)))
            return 1u << t;
    }
    return 0;
}

mt_err mt_lora_parse_targets(const char *text, unsigned *targets) {
    *targets = 0;
    if (!strcmp(text, "all-linear")) {
        *targets = (1u << MT_LORA_MODULES) - 1;
        return MT_OK;
    }
    const char *cursor = text, *item;
    size_t len;
    while (mt_list_next_item(&cursor, &item, &len)) {
        unsigned bits = module_bits(item, len);
        if (!bits)
            return mt_errorf(MT_ERR_CONFIG,
                             "LoRA target module '%.*s' is not one memtune adapts; use any of q_proj, k_proj, "
                             "v_proj, o_proj, gate_proj, up_proj, down_proj (Phi-3: qkv_proj, o_proj, gate_up_proj, "
                             "down_proj), or all-linear",
                             (int)len, item);
        *targets |= bits;
    }
    if (!*targets)
        return mt_errorf(MT_ERR_CONFIG, "no LoRA target modules given; name some (e.g. q_proj,v_proj) or all-linear");
    return MT_OK;
}

void mt_lora_format_targets(const mt_model_config *c, unsigned targets, char *buf, size_t len) {
    size_t used = 0;
    buf[0] = '\0';
    for (int t = 0; t < MT_LORA_MODULES; t++)
        if (targets >> t & 1 && !mt_lora_fused_part(c, t) && used < len)
            used += (size_t)snprintf(buf + used, len - used, "%s%s", used ? "," : "", module_name(c, t));
}

mt_param_info *mt_lora_param_table(const mt_model_config *c, const mt_lora_config *lora, int *count, size_t *total) {
    int max = c->L * MT_LORA_MODULES * 2;
    mt_param_info *table = calloc((size_t)(max ? max : 1), sizeof *table);
    MT_CHECK(table != NULL, "adapter table");
    int n = 0;
    size_t offset = 0;
    for (int l = 0; l < c->L; l++)
        for (int t = 0; t < MT_LORA_MODULES; t++) {
            if (!(lora->targets >> t & 1) || mt_lora_fused_part(c, t)) continue;
            int64_t in, out, part_in, part_out;
            module_shape(c, t, &in, &out);
            // a fused module's B covers its parts' outputs (q, k, v; gate, up)
            for (int k = t + 1; k < MT_LORA_MODULES; k++)
                if (mt_lora_fused_owner(c, k) == t) module_shape(c, k, &part_in, &part_out), out += part_out;
            for (int is_b = 0; is_b < 2; is_b++) {
                mt_param_info *p = &table[n++];
                snprintf(p->name, sizeof p->name, "base_model.model.%slayers.%d.%s.%s.lora_%c.weight",
                         c->multimodal ? c->text_prefix : "model.", l, module_parent(t), module_name(c, t),
                         is_b ? 'B' : 'A');
                p->ndim = 2;
                p->shape[0] = is_b ? out : lora->r;
                p->shape[1] = is_b ? lora->r : in;
                p->count = (size_t)(p->shape[0] * p->shape[1]);
                p->offset = offset;
                p->decay = 1;
                offset += (p->count + 15) & ~(size_t)15;
            }
        }
    *count = n;
    *total = offset;
    return table;
}

void mt_lora_table_targets(const mt_param_info *table, int n, char *buf, size_t len) {
    size_t used = 0;
    buf[0] = '\0';
    for (int i = 0; i < n; i++) {
        // "...layers.L.PARENT.MODULE.lora_A.weight": MODULE, once each
        const char *end = strstr(table[i].name, ".lora_");
        if (!end) continue;
        const char *start = end;
        while (start > table[i].name && start[-1] != '.') start--;
        char module[64];
        snprintf(module, sizeof module, "%.*s", (int)(end - start), start);
        char padded[80];
        snprintf(padded, sizeof padded, ",%s,", module);
        char have[600];
        snprintf(have, sizeof have, ",%s,", buf);
        if (strstr(have, padded) || used >= len) continue;
        used += (size_t)snprintf(buf + used, len - used, "%s%s", used ? "," : "", module);
    }
}

int mt_lora_parse_name(const char *name, int *layer, int *module, int *is_b) {
    int l, used = 0;
    char parent[16], rest[160];
    // PEFT's names over the language model: model.layers..., or a multimodal
    // Gemma 3's model.language_model.layers... / language_model.model.layers...
    static const char *const prefixes[] = {"base_model.model.model.language_model.",
                                           "base_model.model.language_model.model.", "base_model.model.model."};
    const char *p = NULL;
    for (int i = 0; i < 3 && !p; i++)
        if (!strncmp(name, prefixes[i], strlen(prefixes[i]))) p = name + strlen(prefixes[i]);
    if (!p || sscanf(p, "layers.%d.%15[a-z_].%159s%n", &l, parent, rest, &used) != 3 || p[used] != '\0' || l < 0)
        return 0;
    for (int t = 0; t < MT_LORA_MODULES; t++)
        for (int b = 0; b < 2; b++)
            for (int fused = 0; fused <= (fused_name(t) != NULL); fused++) {
                char expect[64];
                snprintf(expect, sizeof expect, "%s.lora_%c.weight", fused ? fused_name(t) : mt_lora_module_names[t],
                         b ? 'B' : 'A');
                if (!strcmp(parent, module_parent(t)) && !strcmp(rest, expect)) {
                    *layer = l, *module = t, *is_b = b;
                    return 1;
                }
            }
    return 0;
}

void mt_lora_base_name(const mt_model_config *c, char *buf, size_t len, int layer, mt_lora_module module) {
    int t = mt_lora_fused_owner(c, (int)module);  // Phi-3: the fused tensor it is part of
    snprintf(buf, len, "model.layers.%d.%s.%s.weight", layer, module_parent(t), module_name(c, t));
}

int mt_list_next_item(const char **cursor, const char **item, size_t *len) {
    const char *p = *cursor;
    while (*p == ' ' || *p == ',') p++;
    if (!*p) return 0;
    const char *end = p;
    while (*end && *end != ',' && *end != ' ') end++;
    *item = p, *len = (size_t)(end - p), *cursor = end;
    return 1;
}

// The forward unit that reads a trainable parameter (model.h's buckets):
// the embedding, a layer (its adapters too), or the head.
int mt_param_forward_unit(const char *name, int L) {
    const char *layer = strstr(name, "layers.");
    if (layer) return 1 + atoi(layer + strlen("layers."));
    return strstr(name, "embed_tokens") ? 0 : L + 1;
}

// [*a, *b) cut to [lo, hi); whether anything is left.
int mt_range_clip(size_t *a, size_t *b, size_t lo, size_t hi) {
    if (*a < lo) *a = lo;
    if (*b > hi) *b = hi;
    return *a < *b;
}
