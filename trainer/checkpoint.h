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
#include "trainer/params.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    long step;                        // optimizer steps done
    uint64_t data_epoch, data_batch;  // the train loader's cursor
    int optimizer_steps;              // AdamW's own count (bias corrections)
    unsigned long long config_hash;   // mt_config_training_hash of the run that wrote it
    int shards;                       // 0: AdamW's moments in state.h5; N: in N shard files (ZeRO)
} mt_checkpoint_meta;

// Writes checkpoint `meta->step` under run_dir/checkpoints and deletes all but
// the newest `keep` complete ones. master, m and v are the trained values and
// AdamW's moments (host memory, in the order of the model's parameter table,
// or of the adapter table when lora is not NULL and lora->r > 0). m and v
// may be NULL (MeZO and GaLore: no AdamW moments of the parameters' shapes).
// extra: n_extra more optimizer tensors (GaLore's projectors and moments),
// each written as optimizer/PARAM/NAME.
// Whether checkpoints may be written on another thread while the loader
// reads the dataset: the HDF5 library was built thread-safe.
int mt_checkpoint_background_ok(void);
mt_err mt_checkpoint_write(const char *run_dir, const char *src_model_dir, const mt_model_config *mc,
                           const mt_lora_config *lora, const float *master, const float *m, const float *v,
                           const mt_state_tensor *extra, int n_extra, const mt_checkpoint_meta *meta, int keep);
// The same for a full fine-tune whose values and moments are read a chunk at
// a time from from[0] (the values), from[1] (exp_avg) and from[2]
// (exp_avg_sq), each in the model's table's layout: no host copy of the
// whole state is made.
mt_err mt_checkpoint_write_from(const char *run_dir, const char *src_model_dir, const mt_model_config *mc,
                                const mt_f32_source from[3], const mt_state_tensor *extra, int n_extra,
                                const mt_checkpoint_meta *meta, int keep);
// Sharded checkpoints (data parallelism with ZeRO): rank 0 prepares the
// folder being built (OUTPUT/checkpoints/.step-N.tmp.TAG, TAG the same on
// every rank); every rank writes its shard [lo, hi) of the moments into it
// (state-rank-R-of-W.h5, fsynced; m, v NULL: none) with its own extra
// tensors (GaLore's, of the parameters it keeps); after a barrier rank 0
// publishes it with meta->shards = W and m = v = NULL: state.h5, written last, marks it
// complete, and the folder is renamed into place. mt_checkpoint_write is
// prepare + publish in one process.
void mt_checkpoint_folder_name(const char *run_dir, long step, long tag, char *tmp, size_t len);
mt_err mt_checkpoint_prepare(const char *run_dir, long step, long tag, char *tmp, size_t len);
mt_err mt_checkpoint_write_shard(const char *tmp, int rank, int world, size_t lo, size_t hi, size_t total,
                                 const float *m, const float *v, const mt_state_tensor *extra, int n_extra);
mt_err mt_checkpoint_publish(const char *tmp, const char *run_dir, const char *src_model_dir, const mt_model_config *mc,
                             const mt_lora_config *lora, const float *master, const float *m, const float *v,
                             const mt_state_tensor *extra, int n_extra, const mt_checkpoint_meta *meta, int keep);
// Removes a folder that will not be published (a rank failed).
void mt_checkpoint_abandon(const char *tmp);
// The newest complete checkpoint folder of run_dir into out ("" if none).
void mt_checkpoint_find_latest(const char *run_dir, char *out, size_t len);
// Reads a checkpoint folder written for model config mc (and adapters lora):
// the whole master (NULL: not read), and the moments [lo, hi) of the trained
// block into m and v (hi - lo values each; NULL: not read), from state.h5 or from the shard
// files of a sharded one, whatever number of ranks wrote it.
mt_err mt_checkpoint_read(const char *dir, const mt_model_config *mc, const mt_lora_config *lora, float *master,
                          size_t lo, size_t hi, float *m, float *v, mt_checkpoint_meta *meta);
// Reads the extra optimizer tensors of a checkpoint folder into their data
// (each must be there with exactly its count), from state.h5 or, sharded,
// from whichever rank's shard file holds it.
mt_err mt_checkpoint_read_extra(const char *dir, const mt_state_tensor *extra, int n_extra);
// Values [lo, hi) of one such tensor (t->count its whole length) into dst.
mt_err mt_checkpoint_read_extra_range(const char *dir, const mt_state_tensor *t, size_t lo, size_t hi, void *dst);

#ifdef __cplusplus
}
#endif
#endif
