// trainer/lora.h: LoRA adapters as PEFT defines and stores them. The
// adapter parameter table (PEFT's key names, layer by layer, modules in
// q, k, v, o, gate, up, down order, lora_A before lora_B), PEFT's default
// initialisation, the adapter folder (adapter_config.json +
// adapter_model.safetensors) both ways, and merging an adapter into the base
// weights (`memtune merge`).
#ifndef MT_LORA_H
#define MT_LORA_H

#include <stddef.h>

#include "kernels/common.h"
#include "trainer/model.h"

#ifdef __cplusplus
extern "C" {
#endif

// Parses PEFT's target_modules as written in a config: a comma-separated list
// of module names, or "all-linear". Unknown names are an error naming them.
mt_err mt_lora_parse_targets(const char *text, unsigned *targets);
// The same as text ("q_proj,k_proj,..."), for logs and configs.
void mt_lora_format_targets(unsigned targets, char *buf, size_t len);

// The adapter table: (r, IN) lora_A and (OUT, r) lora_B of every targeted
// module, named "base_model.model.model.layers.L.self_attn.q_proj.lora_A.weight".
mt_param_info *mt_lora_param_table(const mt_model_config *cfg, const mt_lora_config *lora, int *count, size_t *total);
// Layer, module and A/B of an adapter tensor name; 0 if it is not one.
int mt_lora_parse_name(const char *name, int *layer, int *module, int *is_b);
// The base weight a module adapts: "model.layers.L.self_attn.q_proj.weight".
void mt_lora_base_name(char *buf, size_t len, int layer, mt_lora_module module);
// PEFT's default initialisation: A ~ U(-1/sqrt(IN), 1/sqrt(IN)) (Kaiming
// uniform with a = sqrt(5)), B = 0. Counter-based draws from seed.
void mt_lora_init_params(const mt_param_info *table, int count, float *params, uint64_t seed);

// Writes dir/adapter_config.json and dir/adapter_model.safetensors (fp32) in
// PEFT's layout, built under a temporary name and renamed into place.
// base_model names the base (base_model_name_or_path).
mt_err mt_lora_save(const char *dir, const mt_lora_config *lora, const char *base_model, const mt_param_info *table,
                    int count, const float *params);
// Reads dir/adapter_config.json: a LoRA adapter memtune can train or apply
// (no DoRA, per-layer ranks, bias training or extra trained modules).
mt_err mt_lora_read_config(const char *dir, mt_lora_config *lora);
// Reads dir/adapter_model.safetensors into params (the table of `lora` for
// cfg); every tensor must be present with its shape, and nothing else.
mt_err mt_lora_load(const char *dir, const mt_model_config *cfg, const mt_lora_config *lora, float *params);

// Adds scale * B A of every adapted module into the base parameters
// (mt_model_param_table's layout), in fp32 on the host.
void mt_lora_merge(const mt_model_config *cfg, const mt_lora_config *lora, float *base_params,
                   const float *adapter_params);

// `memtune merge`: the model folder with the adapter folder merged in, written
// as a new Hugging Face folder out_dir (which must not exist) in the model's
// dtype.
mt_err mt_lora_merge_folders(const char *model_dir, const char *adapter_dir, const char *out_dir);

#ifdef __cplusplus
}
#endif
#endif
