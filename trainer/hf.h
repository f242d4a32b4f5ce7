// trainer/hf.h: Hugging Face model folders. Reads config.json (Llama,
// Mistral, Qwen2; anything else is refused naming the field), loads the
// weights from model.safetensors or a sharded index, checking each tensor's
// name, shape and dtype against the config, and writes a folder back that
// transformers loads.
#ifndef MT_HF_H
#define MT_HF_H

#include "kernels/common.h"
#include "trainer/params.h"

#ifdef __cplusplus
extern "C" {
#endif

mt_err mt_hf_read_config(const char *dir, mt_model_config *cfg);
// params: fp32 host block of mt_model_param_table's total size.
mt_err mt_hf_load_weights(const char *dir, const mt_model_config *cfg, float *params);
// Writes dir/config.json (the source folder's, or one made from cfg when
// src_dir is NULL) and dir/model.safetensors in `dtype`. The folder is built
// under a temporary name and renamed over `dir` when complete.
mt_err mt_hf_save(const char *dir, const char *src_dir, const mt_model_config *cfg, const float *params,
                  mt_dtype dtype);

#ifdef __cplusplus
}
#endif
#endif
