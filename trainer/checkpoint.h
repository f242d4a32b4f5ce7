// trainer/checkpoint.h: training checkpoints. A checkpoint is a folder
// OUTPUT/checkpoints/step-NNNNNNNN holding the fp32 master weights as a
// Hugging Face folder (model/) and state.h5 (step, data cursor, AdamW state by
// parameter name, config hash, memtune version; layout in docs/checkpoints.md).
// It is built under a hidden temporary name, every file fsynced, then renamed
// into place, so a folder with that name is always complete.
#ifndef MT_CHECKPOINT_H
#define MT_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/common.h"
#include "optim/galore.h"
#include "trainer/model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    long step;                        // optimizer steps done
    uint64_t data_epoch, data_batch;  // the train loader's cursor
    int optimizer_steps;              // AdamW's own count (bias corrections)
    unsigned long long config_hash;   // mt_config_training_hash of the run that wrote it
} mt_checkpoint_meta;

// Writes checkpoint `meta->step` under run_dir/checkpoints and deletes all but
// the newest `keep` complete ones. master, m and v are the trained values and
// AdamW's moments (host memory, in the order of the model's parameter table,
// or of the adapter table when lora is not NULL and lora->r > 0). m and v
// may be NULL (MeZO and GaLore: no AdamW moments of the parameters' shapes).
// extra: n_extra more optimizer tensors (GaLore's projectors and moments),
// each written as optimizer/PARAM/NAME.
mt_err mt_checkpoint_write(const char *run_dir, const char *src_model_dir, const mt_model_config *mc,
                           const mt_lora_config *lora, const float *master, const float *m, const float *v,
                           const mt_state_tensor *extra, int n_extra, const mt_checkpoint_meta *meta, int keep);
// The newest complete checkpoint folder of run_dir into out ("" if none).
void mt_checkpoint_find_latest(const char *run_dir, char *out, size_t len);
// Reads a checkpoint folder written for model config mc (and adapters lora);
// m and v NULL: the moments are not read.
mt_err mt_checkpoint_read(const char *dir, const mt_model_config *mc, const mt_lora_config *lora, float *master,
                          float *m, float *v, mt_checkpoint_meta *meta);
// Reads the extra optimizer tensors of a checkpoint folder into their data
// (each must be there with exactly its count).
mt_err mt_checkpoint_read_extra(const char *dir, const mt_state_tensor *extra, int n_extra);

#ifdef __cplusplus
}
#endif
#endif
