// trainer/hf.h: Hugging Face model folders. Reads config.json (Llama,
// Mistral, Qwen2; anything else is refused naming the field), loads the
// weights from model.safetensors or a sharded index, checking each tensor's
// name, shape and dtype against the config, and writes a folder back that
// transformers loads.
#ifndef MT_HF_H
#define MT_HF_H

#include "kernels/common.h"
#include "trainer/model.h"
#include "trainer/params.h"

#ifdef __cplusplus
extern "C" {
#endif

mt_err mt_hf_read_config(const char *dir, mt_model_config *cfg);
// params: fp32 host block of mt_model_param_table's total size.
mt_err mt_hf_load_weights(const char *dir, const mt_model_config *cfg, float *params);
// Parameters first .. first + count - 1 of the table only, into dst
// (dst[0] is parameter first's): a base loaded a layer at a time.
mt_err mt_hf_load_params(const char *dir, const mt_model_config *cfg, int first, int count, float *dst);
// The model's base weights from the folder dir (NULL: mt_model_init_random's
// values of seed), a tensor at a time through one fp32 host buffer the size of
// the widest tensor: host memory never holds a whole layer in fp32.
mt_err mt_hf_set_model(mt_model *m, const char *dir, uint64_t seed);
// The same walk by units (the embedding, a layer, the head: a layer's fp32
// values at a time) handing each unit's values (parameters first .. first +
// count - 1 of m's table, from the first one's offset; padding zero) to fn.
typedef mt_err (*mt_hf_unit_fn)(void *ctx, int first, int count, const float *values);
mt_err mt_hf_each_unit(mt_model *m, const char *dir, uint64_t seed, mt_hf_unit_fn fn, void *ctx);
// The fp32 values the walks' buffer holds: the widest tensor (by_tensor,
// mt_hf_set_model's) or the widest unit (mt_hf_each_unit's).
size_t mt_hf_load_buffer_floats(const mt_model_config *cfg, int by_tensor);
// Writes dir/config.json (the source folder's, or one made from cfg when
// src_dir is NULL) and dir/model.safetensors in `dtype`. The folder is built
// under a temporary name and renamed over `dir` when complete.
mt_err mt_hf_save(const char *dir, const char *src_dir, const mt_model_config *cfg, const float *params,
                  mt_dtype dtype);
// The same, the values (the model's table's layout) read from a source a
// chunk at a time.
mt_err mt_hf_save_from(const char *dir, const char *src_dir, const mt_model_config *cfg, const mt_f32_source *params,
                       mt_dtype dtype);

#ifdef __cplusplus
}
#endif
#endif
