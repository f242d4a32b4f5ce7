// trainer/state.h: a run's trained state, wherever it lives: AdamW's fp32
// master and moments (on the GPU, or offloaded to a store, one shard per rank
// under ZeRO), GaLore's projectors and moments, or the weights themselves
// (MeZO, GaLore). Reads the trained values back as fp32 host values (for
// checkpoints and the saved model) and writes checkpoints of it (every rank
// its shard under ZeRO, rank 0 the rest). Also the offload plan: which
// trained parameters the offload store holds, and where.
#ifndef MT_STATE_H
#define MT_STATE_H

#include <stddef.h>

#include "datasets/dataset.h"
#include "kernels/common.h"
#include "offload/offload.h"
#include "optim/galore.h"
#include "optim/optimizer.h"
#include "trainer/checkpoint.h"
#include "trainer/config.h"
#include "trainer/dist.h"
#include "trainer/model.h"

#ifdef __cplusplus
extern "C" {
#endif

// Which trained parameters offload's store holds, and where. Without GaLore
// all of them in [lo, hi) (ZeRO: this rank's shard; parameters cut at its
// ends), each state at its weights' offset less lo; with GaLore those it
// does not project (embeddings, norms, the head), packed one after another. In
// checkpoints the packed ones' moments are named tensors as GaLore names its
// own (fp32 exp_avg, exp_avg_sq), so a GaLore run resumes with offload on or off.
typedef struct {
    mt_offload_param *params;
    int n, packed;
    int *index;    // trained parameter -> its entry in params, or -1
    size_t count;  // state values
} mt_offload_plan;

mt_offload_plan mt_offload_plan_make(const mt_param_info *table, int n, size_t lo, size_t hi,
                                     const unsigned char *projected, int L);
void mt_offload_plan_free(mt_offload_plan *p);
// Packed state arrays <-> the weights' layout.
void mt_offload_plan_scatter(const mt_offload_plan *p, const float *packed, float *weights_layout);
void mt_offload_plan_gather(const mt_offload_plan *p, const float *weights_layout, float *packed);
// The packed parameters' moments as checkpoint tensors, over m and v.
mt_state_tensor *mt_offload_plan_moments(const mt_offload_plan *p, const mt_param_info *table, int n, float *m,
                                         float *v);

typedef struct {
    const mt_config *cfg;
    const mt_model_config *mc;
    const mt_lora_config *lora;   // NULL: full fine-tune
    mt_optimizer *opt;            // AdamW; NULL with MeZO and GaLore
    mt_galore *galore;            // GaLore's projectors and moments, or NULL
    mt_offload *offload;          // AdamW with its state off the GPU, or NULL
    const mt_offload_plan *plan;  // what offload holds (packed with GaLore)
    const mt_param_info *table;   // the trained parameters
    int n_trained;
    mt_model *model;
    mt_loader *train;
    float *master;  // host buffer of the parameter count (NULL with offload)
    float *m, *v;   // host buffers of AdamW's moments of [shard_lo, shard_hi) (NULL with MeZO, GaLore, offload)
    size_t trained_total;
    mt_dist *dist;
    int sharded;  // ZeRO 1, 2 over several ranks: the AdamW state of [shard_lo, shard_hi) is this rank's
    size_t shard_lo, shard_hi;
    const size_t *owned;  // GaLore under ZeRO: each rank's run of parameters (galore_owners), or NULL
} mt_run_state;

// `arrays` host arrays of the trained block's n values, in one allocation,
// for a copy of an offloaded state; the run keeps none between checkpoints
// (they would double its host memory).
mt_err mt_state_copy_alloc(size_t n, int arrays, float **block);
// The trained values as fp32 host values: AdamW's master copy (on the GPU or
// offloaded), or with MeZO and GaLore (no master) the compute weights, and
// then the offloaded master of what GaLore does not project. packed: NULL,
// or a copy of the packed state to fill (master, m, v: 3 arrays of
// plan->count), which checkpoints keep.
mt_err mt_run_state_get_trained(mt_run_state *c, float *dst, float *packed);
// Writes the checkpoint of `steps_done` steps (every rank calls it).
mt_err mt_run_state_save(mt_run_state *c, long steps_done);

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
