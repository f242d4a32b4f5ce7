// optim/optimizer.h: the optimizer interface the trainer calls, and AdamW
// behind it. The optimizer owns the trainable parameters' fp32 master copy
// and its moments (one block each, charged to "optimizer"), and updates the
// compute weights (bf16 on the GPU; on the CPU the master is the weights).
#ifndef MT_OPTIMIZER_H
#define MT_OPTIMIZER_H

#include <stddef.h>

#include "kernels/common.h"
#include "kernels/device.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    float lr;  // peak; the schedule gives each step's value
    float beta1, beta2, eps, weight_decay;
    float grad_clip;  // global-norm clip; <= 0 turns it off
} mt_adamw_config;

// A contiguous range of the parameter block and whether it is decayed
// (matrices and embeddings are; norms and biases are not, as in HF Trainer).
typedef struct {
    size_t offset, count;
    int decay;
} mt_param_group;

typedef struct mt_optimizer mt_optimizer;

// master: fp32 values of all n parameters (host memory; copied in).
// weights: the compute weights the model reads (device bf16 on the GPU; on
// the CPU the fp32 block itself, which then serves as the master).
mt_err mt_optimizer_init(mt_optimizer **out, mt_backend *be, const mt_adamw_config *cfg, float *weights,
                         const float *master_init, size_t n, const mt_param_group *groups, int num_groups);
void mt_optimizer_free(mt_optimizer *opt);

typedef struct {
    double grad_norm;  // before clipping
    int finite;        // 0 when the gradient had inf/NaN (step skipped)
} mt_step_info;

// One AdamW step with learning rate lr from the gradient block grad (n
// fp32, where the backend computes). Clips by global norm; if the norm is
// not finite the step is skipped and info->finite is 0.
void mt_optimizer_step(mt_optimizer *opt, const float *grad, float lr, mt_step_info *info);
int mt_optimizer_steps_taken(const mt_optimizer *opt);
// Update passes (launches on the GPU) a step makes: one per run of groups
// that follow each other in the block with the same decay.
int mt_optimizer_passes(const mt_optimizer *opt);
// A sharded optimizer (ZeRO) sees its shard of the gradient: `sum` turns its
// shard's sum of squares into the whole gradient's (over the ranks).
void mt_optimizer_set_norm_sum(mt_optimizer *opt, double (*sum)(void *ctx, double local), void *ctx);
// fp32 master values (host copy written to dst, n floats), for saving.
void mt_optimizer_get_master(const mt_optimizer *opt, float *dst);
// AdamW's moments (host copies, n floats each), for checkpoints.
void mt_optimizer_get_moments(const mt_optimizer *opt, float *m, float *v);
// Restores moments and the step count from a checkpoint (the master weights
// come in through mt_optimizer_init).
void mt_optimizer_set_moments(mt_optimizer *opt, const float *m, const float *v, int steps);

#ifdef __cplusplus
}
#endif
#endif
