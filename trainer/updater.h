// trainer/updater.h: what updates the trained block, behind one lifecycle:
// AdamW on the backend (each rank its ZeRO shard), GaLore (projected
// matrices; the rest AdamW, or the store's when offloaded), AdamW with its
// state offloaded to host memory or an SSD, and MeZO (whose step the loop
// drives: mt_mezo). The run fills in the inputs, mt_updater_build makes the
// rest from the plan; then each step with gradients is begin, (micro_batch
// per further micro-batch), and end, or cancel when the step is lost.
#ifndef MT_UPDATER_H
#define MT_UPDATER_H

#include <stddef.h>

#include "kernels/device.h"
#include "offload/offload.h"
#include "optim/galore.h"
#include "optim/mezo.h"
#include "optim/optimizer.h"
#include "trainer/checkpoint.h"
#include "trainer/config.h"
#include "trainer/dist.h"
#include "trainer/model.h"
#include "trainer/offload_plan.h"
#include "trainer/plan.h"
#include "trainer/route.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    // the run's, set before mt_updater_build
    const mt_config *cfg;
    const mt_plan *pl;
    const mt_model_config *mc;
    mt_backend *be;
    mt_model *model;
    mt_trainable tr;
    mt_dist *dist;
    int rank, world, accum;
    const char *resume_dir;  // "" when not resuming
    const mt_checkpoint_meta *resume;
    // the run's host copies: the trained values, the base's fp32 values,
    // AdamW's moments (a checkpoint's); with offload the store takes the
    // values over and the copies are released (set to NULL)
    float **trained, **host_params, **moment_m, **moment_v;
    // the hooks the model calls (route.h), completed here
    mt_dp_hook *dp;
    mt_zero2_hook *zhook;
    mt_galore_hook *ghook;
    mt_offload_hook *ohook;
    // what mt_updater_build makes
    mt_optimizer *opt;
    mt_mezo *mz;
    mt_galore *gal;
    mt_galore_param *gparams;
    mt_offload *ofl;
    mt_offload_plan plan;
    int offload_threads;  // the CPU AdamW's (offload.threads, or mt_offload_auto_threads)
    int *gowner;          // GaLore under ZeRO: each parameter's rank
    size_t *gbounds;      // and each rank's run of the block (mt_route_galore_owners)
    float *shard_grads;   // ZeRO-2's sums of this rank's shard
    float *opt_grads;     // what AdamW reads: the block's shard, or ZeRO-2's sums
    // offload.ratio < 1: AdamW on the backend keeps [0, pl->offload_split) of
    // the block (opt), the store the rest; streamed gradients of that part
    // are summed into resident_grads (owned) for it; both see the norm over
    // the whole block (norm_total, the store's part plus opt's)
    float *resident_grads;
    double norm_total;
    size_t selected_count, projected_count;
} mt_updater;

mt_err mt_updater_build(mt_updater *u);
// Before the step's first backward.
void mt_updater_begin(mt_updater *u, float lr);
// Before micro-batch a (> 0) of a step whose gradients stream off the GPU.
void mt_updater_micro_batch(mt_updater *u, int a);
// After the step's backward: the updates that wait for the whole step
// (AdamW, the store's, the sharing of ZeRO's and GaLore's owned parts), and
// the norm of the step's gradient in info. refresh_seconds: GaLore's
// projector refresh.
mt_err mt_updater_end(mt_updater *u, int step, float lr, mt_step_info *info, double *refresh_seconds);
// A step whose backward was skipped: nothing is applied.
void mt_updater_cancel(mt_updater *u);

// `arrays` host arrays of n values in one allocation, for a copy of state
// that lives off the host or off the run's buffers; the run keeps none
// between uses (they would double its host memory).
mt_err mt_state_copy_alloc(size_t n, int arrays, float **block);
// The trained values as fp32 host values (every rank calls: ZeRO shares the
// shards): AdamW's master copy (on the GPU or offloaded), or with MeZO and
// GaLore (no master) the compute weights, and then the offloaded master of
// what GaLore does not project. packed: NULL, or a copy of the packed state
// to fill (master, m, v: 3 arrays of plan.count), which checkpoints keep.
mt_err mt_updater_get_trained(mt_updater *u, float *dst, float *packed);

typedef struct mt_state_reader mt_state_reader;
// What a checkpoint keeps of the updater, read back to the host, or (from)
// to be read from the offload store while the run waits.
typedef struct {
    float *master;                 // the trained block's values (NULL when reading failed to start or streamed)
    float *m, *v;                  // AdamW's moments of this rank's shard, or NULL
    const mt_state_tensor *extra;  // GaLore's tensors, then the packed offloaded parameters' moments; streamed:
                                   // offload.delay's weights, then int8 moments' codes
    int n_extra;
    int optimizer_steps;  // updates applied (MeZO: the steps done)
    float *copy;          // owned: the host copy of offloaded state
    mt_state_tensor *all;
    int streamed;                // the state is read from `from` (values, exp_avg, exp_avg_sq) as it is written
    mt_f32_source from[3];       // (int8 moments: from[1], from[2] have no read; extra holds their codes)
    mt_f32_source weights_from;  // and offload.delay's weights (extra's first tensor) from the model
    mt_state_reader *reader;     // owned: what `from` reads the store through
    mt_store *snapshot;          // owned: MT_STATE_SNAPSHOT's copy of the store, which `from` reads
} mt_updater_state;
// Whether a checkpoint can be written straight from the offload store: a
// full fine-tune's whole state offloaded on this rank (no ZeRO shards, no
// GaLore; offload.delay's weights read from the model). copy_bytes: what a
// host copy of the state takes; snapshot_bytes: what a copy of the store in
// its own encoding takes (mt_store_snapshot: int8 moments stay codes), 0
// where there is none (the SSD tier, offload.delay).
int mt_updater_state_streams(const mt_updater *u, size_t *copy_bytes, size_t *snapshot_bytes);
typedef enum {
    MT_STATE_COPY,      // host copies of the state (master, m, v, extra)
    MT_STATE_STREAM,    // (where it streams) read through `from` from the store itself: no step may run until
                        // it is written
    MT_STATE_SNAPSHOT,  // (where snapshot_bytes > 0) read through `from` from a copy of the store: steps may run
} mt_state_read;
// Every rank calls it. steps_done: the run's steps (MeZO's update count).
mt_err mt_updater_read_state(mt_updater *u, long steps_done, mt_state_read how, mt_updater_state *s);
void mt_updater_state_free(mt_updater_state *s);
// Logs the start-up lines of MeZO, GaLore and offload (count: the model's
// parameters).
void mt_updater_report(const mt_updater *u, size_t count);
void mt_updater_free(mt_updater *u);

#ifdef __cplusplus
}
#endif
#endif
