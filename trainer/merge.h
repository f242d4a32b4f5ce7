// trainer/merge.h: `memtune merge`: a Hugging Face model folder with a PEFT
// adapter folder merged in, written as a new model folder.
#ifndef MT_MERGE_H
#define MT_MERGE_H

#include "kernels/common.h"

#ifdef __cplusplus
extern "C" {
#endif

// `memtune merge`: the model folder with the adapter folder merged in, written
// as a new Hugging Face folder out_dir (which must not exist) in the model's
// dtype.
mt_err mt_lora_merge_folders(const char *model_dir, const char *adapter_dir, const char *out_dir);

#ifdef __cplusplus
}
#endif
#endif
