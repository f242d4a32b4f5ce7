// trainer/lora.h: LoRA adapters as PEFT defines and stores them: PEFT's
// default initialisation, the adapter folder (adapter_config.json +
// adapter_model.safetensors) both ways, and merging an adapter into the base
// weights in memory (the adapter table and names are trainer/params.h's;
// `memtune merge` is trainer/merge.h's).
#ifndef MT_LORA_H
#define MT_LORA_H

#include <stddef.h>

#include "kernels/common.h"
#include "trainer/params.h"

#ifdef __cplusplus
extern "C" {
#endif

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
// Both: an adapter folder's config into lora and its values into *values
// (malloc'd, lora's table layout).
mt_err mt_lora_read_folder(const char *dir, const mt_model_config *cfg, mt_lora_config *lora, float **values);

// Adds scale * B A of every adapted module into the base parameters
// (mt_model_param_table's layout), in fp32 on the host.
void mt_lora_merge(const mt_model_config *cfg, const mt_lora_config *lora, float *base_params,
                   const float *adapter_params);

// Logs the start-up lines of a LoRA run: the adapters (n trained parameters
// of the table) and the frozen base (base_count parameters in base_bytes;
// nf4, where: how and where it is kept; init: lora.init or "").
void mt_lora_report(const mt_lora_config *lora, const mt_param_info *trained, int n, size_t base_count,
                    size_t base_bytes, int nf4, const char *where, const char *init);

#ifdef __cplusplus
}
#endif
#endif
