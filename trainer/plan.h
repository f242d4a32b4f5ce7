// trainer/plan.h: every decision a run makes before its first allocation:
// what is trained (the whole model or LoRA adapters, and which of them MeZO
// perturbs or GaLore projects), where it runs (CPU or which GPU), the
// gradient's way (all-reduced, reduced to ZeRO's shard owners or GaLore's,
// streamed out of backward to the offload store, summed over micro-batches
// on the host or the GPU), and where each rank's share of the optimizer
// state lives. A combination that cannot run is refused here, with what to
// set, before anything is allocated.
#ifndef MT_PLAN_H
#define MT_PLAN_H

#include <stddef.h>

#include "kernels/common.h"
#include "trainer/config.h"
#include "trainer/dist.h"
#include "trainer/model.h"
#include "trainer/params.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int B, T, accum;  // micro-batch rows, tokens a row, micro-batches a step
    // what is trained
    int mezo, galore;         // optim.kind (else AdamW)
    int offload;              // AdamW's state in a store off the GPU (offload.optimizer)
    size_t offload_split;     // offload.ratio < 1: the trained block's [0, split) keeps its state on the backend
    int resident_units;       // the forward units in it (0 the embedding, then layers)
    int lora;                 // adapters on a frozen base
    mt_lora_config lora_cfg;  // lora.* (r 0 without LoRA)
    mt_param_info *table;     // the base model's parameters
    int n_params;             //
    size_t total;             // elements of the base block
    mt_param_info *trained;   // what the optimizer trains: table, or the adapters'
    int n_trained;            //
    size_t trained_total;     // elements of the trained block
    unsigned char *selected;  // per trained parameter: MeZO perturbs it, or GaLore projects it
    int n_selected;           // how many (all of them for AdamW)
    // where it runs
    int use_gpu;  // the GPU (train.device, and whether one is visible)
    int rank, world, local_world;
    int zero;                   // dist.zero_stage
    size_t shard_lo, shard_hi;  // this rank's share of the trained block (all of it without ZeRO)
    // the gradient's way
    int zero2_streamed;           // ZeRO reduces each streamed gradient to its shard's owner (or the store)
    int host_sum;                 // offload with accumulation: the host sums the micro-batches
    int offload_streamed;         // offloaded gradients stream out of backward per layer
    double host_need, host_have;  // what offload.grad_sum auto weighed (bytes; need 0 when not weighed)
} mt_plan;

// Decides the run of cfg on the model mc as rank `rank` of `world` (local_world
// on this node, ngpu GPUs visible). Errors name what to set; on error nothing
// is left to free.
mt_err mt_plan_make(mt_plan *p, const mt_config *cfg, const mt_model_config *mc, mt_dist *dist, int ngpu);
void mt_plan_free(mt_plan *p);

// The model's options for the plan's run of cfg (the gradient's hooks aside:
// route.c installs them; the forecast counts with stand-ins).
mt_model_options mt_plan_model_options(const mt_plan *p, const mt_config *cfg);

// How the base's fp32 values reach the model (train.c's build_model): a
// tensor at a time (a frozen base; MeZO's weights unless a checkpoint's
// replace them), a unit at a time filling the offload store too (an offloaded
// full fine-tune), or through a whole fp32 copy kept on the host (the rest).
typedef enum { MT_LOAD_TENSORS, MT_LOAD_UNITS, MT_LOAD_WHOLE } mt_base_load;
mt_base_load mt_plan_base_load(const mt_plan *p, int resuming);

// mezo.trainable, galore.targets: which parameters match one of the listed
// glob patterns. Returns how many do.
int mt_plan_select(const char *patterns, const mt_param_info *table, int n, unsigned char *selected);

#ifdef __cplusplus
}
#endif
#endif
