// trainer/params.h: what a model's parameters are, before any of them exist:
// the LLaMA-family configuration, the parameter table of the base model
// (Hugging Face's names and order, one block) and of LoRA adapters (PEFT's
// names: layer by layer, modules in q, k, v, o, gate, up, down order, lora_A
// before lora_B), and the names of the modules adapters target. Every other
// module of trainer/ (config, hf, lora, model, checkpoints) builds on this one
// and it on none of them.
#ifndef MT_PARAMS_H
#define MT_PARAMS_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/common.h"
#include "kernels/dtype.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MT_MAX_ROPE_FACTORS 256  // longrope's per-frequency factors: head dims up to 512

typedef struct {
    char architecture[64];
    int V, C, F, L, H, KV, D;  // vocab, hidden, ffn, layers, heads, kv heads, head dim
    int max_position;
    float rms_eps, rope_theta, init_std;
    int rope_llama3;  // rope_scaling / rope_parameters of type llama3
    float rope_factor, rope_low_freq_factor, rope_high_freq_factor;
    int rope_original_max_position;
    // Phi-3's longrope (rope type "longrope", formerly "su"): each frequency
    // divided by its factor, the long ones where a table covers more than
    // rope_original_max_position positions, and cos and sin scaled by
    // rope_attention_factor
    int rope_longrope;
    float rope_long_factor[MT_MAX_ROPE_FACTORS], rope_short_factor[MT_MAX_ROPE_FACTORS], rope_attention_factor;
    int tie_embeddings;
    int qkv_bias, o_bias;  // Qwen2: qkv; Llama attention_bias: qkv and o
    int qk_norm;           // Qwen3, Gemma 3: RMSNorm of each head's query and key (head_dim weights) before RoPE
    // Gemma 3: every RMSNorm scales by (1 + w); norms after attention and
    // around the MLP (post_attention, pre_ and post_feedforward); GeGLU with
    // the tanh GELU; the embedding scaled; its own score scale; sliding and
    // global layers with their own RoPE bases
    int gemma;
    int fused;  // Phi-3: q, k, v in one qkv_proj and gate, up in one gate_up_proj (row blocks, in that order)
    // Gemma3ForConditionalGeneration: the language model of a multimodal
    // folder, its tensors named text_prefix + "layers..." in the files
    // ("model.language_model." or "language_model.model."; "model." for any
    // other model); the rest of the folder is carried through unchanged
    int multimodal;
    char text_prefix[32];
    float embed_scale;         // embeddings times this (0: none)
    float attn_scale;          // the scores' scale (0: 1/sqrt(head dim))
    int global_every;          // > 0: layer l global when (l + 1) % global_every == 0, else in sliding_window
    float rope_local_theta;    // the sliding layers' RoPE base (global_every > 0; no scaling there)
    float rope_linear_factor;  // rope type linear: positions divided by this (0: none)
    long sliding_window;       // 0: none
    mt_dtype dtype;            // the folder's declared dtype (for saving)
} mt_model_config;

typedef struct {
    char name[128];
    int ndim;
    int64_t shape[2];
    size_t offset, count;  // in elements of the parameter block
    int decay;             // matrices and embeddings
} mt_param_info;

// The linear modules that can carry a LoRA adapter, named as PEFT's
// target_modules.
typedef enum {
    MT_LORA_Q,
    MT_LORA_K,
    MT_LORA_V,
    MT_LORA_O,
    MT_LORA_GATE,
    MT_LORA_UP,
    MT_LORA_DOWN,
    MT_LORA_MODULES
} mt_lora_module;
extern const char *const mt_lora_module_names[MT_LORA_MODULES];  // "q_proj", ...

// LoRA (Hu et al., 2021): y = W x + scale * B A dropout(x), A (r, IN), B (OUT,
// r), scale alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023).
// Whether layer l attends within sliding_window with the local RoPE base
// (Gemma 3's sliding layers); with global_every 0 every layer is alike.
int mt_layer_local(const mt_model_config *c, int l);

typedef struct {
    int r;             // rank; 0: no adapters
    float alpha;       // lora_alpha
    float dropout;     // on the adapter's input, in training only
    int rslora;        // use_rslora
    unsigned targets;  // bit (1 << mt_lora_module) set: that module has an adapter
} mt_lora_config;

float mt_lora_scale(const mt_lora_config *lora);

// The base model's parameters in Hugging Face's order: embedding, each
// layer's, final norm, lm_head (absent when tied). Offsets are 16-element
// aligned. The caller frees the table.
mt_param_info *mt_model_param_table(const mt_model_config *cfg, int *count, size_t *total);

// Parses PEFT's target_modules as written in a config: a comma-separated list
// of module names, or "all-linear". Unknown names are an error naming them.
mt_err mt_lora_parse_targets(const char *text, unsigned *targets);
// The same as text ("q_proj,k_proj,..."; Phi-3's fused names for model c),
// for logs and configs.
void mt_lora_format_targets(const mt_model_config *c, unsigned targets, char *buf, size_t len);
// Phi-3's fused modules: the module whose tensor module t is a row block of
// (q for k and v in qkv_proj, gate for up in gate_up_proj; t itself for any
// other, and in any other model), whether t is such a part (it shares the
// owner's LoRA A and holds a row block of its B), and the owner's output rows
// before t's (0 for the owner itself).
int mt_lora_fused_owner(const mt_model_config *c, int t);
int mt_lora_fused_part(const mt_model_config *c, int t);
size_t mt_lora_fused_rows(const mt_model_config *c, int t);

// The adapter table: (r, IN) lora_A and (OUT, r) lora_B of every targeted
// module, named "base_model.model.model.layers.L.self_attn.q_proj.lora_A.weight"
// (Phi-3: one pair for qkv_proj and for gate_up_proj, B over the parts).
mt_param_info *mt_lora_param_table(const mt_model_config *cfg, const mt_lora_config *lora, int *count, size_t *total);
// The module names of an adapter table, in its order, each once
// ("q_proj,k_proj,..."; Phi-3's "qkv_proj,...").
void mt_lora_table_targets(const mt_param_info *table, int n, char *buf, size_t len);
// Layer, module and A/B of an adapter tensor name; 0 if it is not one.
int mt_lora_parse_name(const char *name, int *layer, int *module, int *is_b);
// The base weight a module adapts: "model.layers.L.self_attn.q_proj.weight"
// (Phi-3: the fused tensor the module is part of).
void mt_lora_base_name(const mt_model_config *c, char *buf, size_t len, int layer, mt_lora_module module);
// The forward unit that reads a trainable parameter (model.h's buckets): 0
// the embedding, 1 + l layer l (its adapters too), L + 1 the head.
int mt_param_forward_unit(const char *name, int L);
// [*a, *b) cut to [lo, hi); whether anything is left.
int mt_range_clip(size_t *a, size_t *b, size_t lo, size_t hi);

// The next item of a list written "a,b c" (commas or spaces between items):
// 1 with *item and *len set and *cursor past it, 0 at the end.
int mt_list_next_item(const char **cursor, const char **item, size_t *len);

#ifdef __cplusplus
}
#endif
#endif
