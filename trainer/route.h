// trainer/route.h: the way a gradient goes once backward has computed it:
// summed over the data-parallel ranks (all-reduced, or reduced to the rank
// that owns it: ZeRO-2's shards, GaLore's owners), then handed to what
// updates it (AdamW's block, GaLore, the offload store). Each way is a hook
// the model calls (model.h's grad_ready, grads_done, weights_needed) with one
// of these contexts; the loop fills them in and installs them.
#ifndef MT_ROUTE_H
#define MT_ROUTE_H

#include <stddef.h>

#include "offload/offload.h"
#include "optim/galore.h"
#include "trainer/dist.h"
#include "trainer/model.h"
#include "trainer/offload_plan.h"
#include "trainer/params.h"
#include "trainer/plan.h"

#ifdef __cplusplus
extern "C" {
#endif

// GaLore: each parameter's gradient goes to its update as soon as the
// model's backward has finished it.
typedef struct {
    mt_galore *galore;
    char *weights;  // the compute weights (the parameter table's offsets)
    size_t act;
    const mt_param_info *table;
    const int *offloaded;  // with offload: the parameter's index there (mt_offload_plan.index), or -1
    mt_offload *const *offload;
    mt_dist *dist;
    const int *owner;  // ZeRO: the rank that keeps each parameter's state and updates it (NULL: every rank)
} mt_galore_hook;

// Data parallelism over the gradient block: each forward unit's range is
// reduced as soon as backward has finished it in the step's last
// micro-batch, on the communication stream, beside the rest of backward:
// all-reduced, or with ZeRO-2 reduced to the owners of its shards.
typedef struct {
    mt_dist *dist;
    int zero_stage, active;
    float *grads;  // the trained block's (NULL: streamed)
    size_t total, shard_lo;
    size_t *lo, *hi;  // per forward unit
    int units;
} mt_dp_hook;

// ZeRO-2 of a full fine-tune: the model-sized gradient block never exists.
// Backward hands each parameter's gradient over in one of two buffers used
// in turn (a layer's each); its shards are reduced on the communication
// stream to their owners, each owner's part into its shard's gradient, while
// backward fills the other buffer. Over micro-batches the owner adds its
// running sum into its part before the reduce.
// With offload and one micro-batch a step there are no shard sums either:
// the owner's part is reduced in place, and when the next unit's backward is
// done (the compute stream then waits for the previous unit's collectives)
// it goes to the store, before backward reuses its buffer.
#define MT_ZERO2_UNIT_PARAMS 32  // the most parameters a forward unit has
typedef struct {
    int param;
    float *grad;
} mt_zero2_piece;

typedef struct {
    mt_dist *dist;
    mt_backend *be;
    const mt_param_info *table;
    float *shard;  // this rank's [lo, hi) of the summed gradient (NULL: to the store)
    size_t lo, hi, total;
    int first;  // the step's first micro-batch: the shard is overwritten
    // to the store: the offload and its plan; the pieces of the unit in
    // backward (pending[cur]) and of the one before it
    mt_offload **offload;
    const mt_offload_plan *plan;
    mt_zero2_piece pending[2][MT_ZERO2_UNIT_PARAMS];
    int n_pending[2], cur;
} mt_zero2_hook;

// Offloaded AdamW: gradients stream to the host as backward completes them,
// and each forward unit waits for its own update only. ctx: the mt_offload *
// (made after the model, whose weights it updates).
typedef struct {
    mt_offload **offload;
    mt_dist *dist;
    const mt_param_info *table;
    // ZeRO over several ranks: each offloads its shard; after a step, each
    // forward unit's weights are all-gathered before the first forward reads them
    int gather;
    unsigned char *stale;  // per forward unit
    const size_t *lo, *hi;
    void *weights;
    size_t total, elem;
    // each trained parameter's entry in the store (mt_offload_plan.index)
    const int *index;
    // offload.ratio < 1: the parameters [0, split) of the block keep their
    // state on the backend; their gradients are summed into resident (split
    // fp32 where the backend computes, zeroed at each step's start)
    size_t split;
    float *resident;
    mt_backend *be;
} mt_offload_hook;

// GaLore under ZeRO: each parameter's owner is the rank whose shard of the
// trained block holds its middle, so each rank owns whole parameters, a run
// of them in table order: rank r's are [bounds[r], bounds[r + 1]) of the block.
void mt_route_galore_owners(mt_dist *d, const mt_param_info *table, int n, size_t total, int *owner, size_t *bounds);
// grads_done with an mt_dp_hook: the block's unit reduced (last micro-batch only).
void mt_route_dp_grads_done(void *ctx, int unit);
// grad_ready and grads_done with an mt_zero2_hook.
void mt_route_zero2_grad_ready(void *ctx, int param, float *grad);
void mt_route_zero2_grads_done(void *ctx, int unit);
// grad_ready with an mt_galore_hook: reduced (to the owner), then GaLore's
// update or the store's.
void mt_route_galore_grad_ready(void *ctx, int param, float *grad);
// grad_ready and weights_needed with an mt_offload_hook.
void mt_route_offload_grad_ready(void *ctx, int param, float *grad);
void mt_route_offload_weights_needed(void *ctx, int bucket);
// The model's agreement (mt_model_set_agreement) over the ranks (ctx: the mt_dist).
int mt_route_any_rank(void *dist, int flag);
// ZeRO's shard norms into the whole gradient's (ctx: the mt_dist).
double mt_route_sum_over_ranks(void *ctx, double local);

// The hooks the plan asks the model to call, installed in o, with each
// hook's state: the data-parallel reduce (and its L + 2 forward units'
// ranges of the trained block), ZeRO-2's streamed reduce, GaLore's and
// offload's gradient streams, offload's weights. ofl: where the offload
// engine will be once built.
void mt_route_install(const mt_plan *pl, int L, mt_dist *dist, int world, mt_offload **ofl, mt_model_options *o,
                      mt_dp_hook *dp, mt_zero2_hook *z, mt_galore_hook *g, mt_offload_hook *oh);

// After an update: every rank gets the weights the others updated, in place
// on the backend (elem bytes an element): GaLore's owned runs (bounds, a
// rank's run each), or ZeRO's shards of a block of `total`.
void mt_route_share_owned(mt_dist *d, void *weights, const size_t *bounds, size_t elem);
void mt_route_share_shards(mt_dist *d, void *weights, size_t total, size_t elem);

#ifdef __cplusplus
}
#endif
#endif
