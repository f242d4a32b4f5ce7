// trainer/state.h: a run's checkpoints and its saved result, over what the
// updater holds (trainer/updater.h reads the state back wherever it lives:
// AdamW's master and moments on the GPU or offloaded, one shard per rank
// under ZeRO, GaLore's projectors and moments, or the weights themselves):
// checkpoints written every rank its shard under ZeRO, rank 0 the rest; the
// adapter or model at the end; the checks on a checkpoint to resume from.
#ifndef MT_STATE_H
#define MT_STATE_H

#include <stddef.h>

#include "datasets/dataset.h"
#include "kernels/common.h"
#include "trainer/checkpoint.h"
#include "trainer/config.h"
#include "trainer/dist.h"
#include "trainer/updater.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mt_ckpt_writer mt_ckpt_writer;

typedef struct {
    const mt_config *cfg;
    const mt_model_config *mc;
    const mt_lora_config *lora;  // NULL: full fine-tune
    mt_updater *up;              // what holds the trained state
    mt_ckpt_writer *writer;      // checkpoint.async: the one in flight, or NULL
    const mt_param_info *table;  // the trained parameters
    int n_trained;
    mt_loader *train;
    size_t trained_total;
    mt_dist *dist;
    int sharded;  // ZeRO 1, 2 over several ranks: the AdamW state of [shard_lo, shard_hi) is this rank's
    size_t shard_lo, shard_hi;
    float *pinned[3];  // the updater's host copies page-locked by mt_run_state_pin_copies
} mt_run_state;

// Writes the checkpoint of `steps_done` steps (every rank calls it). With
// checkpoint.async (and one writing rank: not ZeRO's shards) the state is
// read back to the host now (an offload store in host memory: copied as it
// is, mt_store_snapshot) and written by a background thread while training
// goes on; the previous one is waited for first, and its failure is this
// call's error.
mt_err mt_run_state_save(mt_run_state *c, long steps_done);
// Tests: background writes start `seconds` after their checkpoint's step,
// so that the next steps run before the state is read.
void mt_run_state_delay_writes(double seconds);
// Waits for a checkpoint in flight (every rank calls it, before the run's
// host copies of the state are read again and at the end of the run): its
// error, on any rank. collective 0: this rank alone (a run already failing).
mt_err mt_run_state_wait(mt_run_state *c, int collective);
// A GPU run that checkpoints as it trains with AdamW on the GPU: the host
// copies its checkpoints read the master and moments back into, page-locked
// once at start (each read-back, which training waits for, then runs at the
// copy engines' speed); unpinned before the backend goes.
void mt_run_state_pin_copies(mt_run_state *c);
void mt_run_state_unpin_copies(mt_run_state *c);

// The trained result at the end of a run: the adapter (PEFT's layout) or the
// model (Hugging Face's; output.save_dtype, or F32 for a random init, else
// the input's dtype), written by rank 0. trained / host_params: the run's
// host buffers for the values (host_params allocated when absent).
mt_err mt_run_state_save_outputs(mt_run_state *s, int rank, int random_init, float **trained, float **host_params);

// Reads a checkpoint to resume from (checkpoint.h's mt_checkpoint_read) and
// refuses one that another configuration wrote, or one at or past
// train.steps.
mt_err mt_run_state_read_resume(const char *dir, const mt_config *cfg, const mt_model_config *mc,
                                const mt_lora_config *lora, float *trained, size_t shard_lo, size_t shard_hi, float *m,
                                float *v, mt_checkpoint_meta *meta);

#ifdef __cplusplus
}
#endif
#endif
