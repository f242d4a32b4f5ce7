// optim/mezo.h: MeZO, zeroth-order SGD in the memory of inference (Malladi
// et al., "Fine-Tuning Language Models with Just Forward Passes", 2023).
// Each step draws directions z_k (k < samples) that are never stored, only
// regenerated from a seed: z_k of step t comes from (run seed, t, k) through
// ops.h's z stream, element by element from the parameter's place in the
// trainable block. For each z_k two losses, at w + eps z_k and w - eps z_k,
// give the projected gradient g_k = (loss+ - loss-) / (2 eps) (SPSA); the
// update is w -= lr * (mean_k g_k z_k + weight_decay * w).
//
// A step has two halves so that data parallelism moves two floats per
// direction: mt_mezo_losses evaluates the pairs of losses on this rank's
// batch; the data-parallel layer averages those 2 * samples numbers across
// ranks; mt_mezo_update applies the same update on every rank.
//
// How w + eps z is read is the caller's choice: the loss callback gets the
// direction's seed and scale. The model applies it as it reads each weight
// (mt_model_set_perturbation: nothing changes in memory, nothing to
// restore); a plain weight block can be perturbed in place with
// mt_mezo_perturb_in_place (+eps, -2 eps, +eps, as the paper's algorithm
// does, with the rounding that brings).
#ifndef MT_MEZO_H
#define MT_MEZO_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/common.h"
#include "kernels/device.h"
#include "kernels/ops.h"
#include "optim/optimizer.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    float eps;           // perturbation scale
    int samples;         // directions per step (n-SPSA), 1..MT_ZO_MAX_DIRECTIONS
    float weight_decay;  // on the groups marked decay
    uint64_t seed;       // the run's seed
} mt_mezo_config;

typedef struct mt_mezo mt_mezo;

// weights: the trained block's compute weights (backend's activation type,
// where it computes); groups: the ranges MeZO trains, at their offsets in
// that block (which also place them in the z stream).
mt_err mt_mezo_init(mt_mezo **out, mt_backend *be, const mt_mezo_config *cfg, void *weights,
                    const mt_param_group *groups, int num_groups);
void mt_mezo_free(mt_mezo *mz);

// The seed of direction k of step `step`.
uint64_t mt_mezo_direction_seed(const mt_mezo *mz, long step, int k);

// The loss of the caller's batch with the trained weights read as
// w + scale * z(seed); scale 0: unperturbed.
typedef double (*mt_mezo_loss_fn)(void *ctx, uint64_t seed, float scale);

// losses[2k], losses[2k + 1]: the loss at +eps z_k and at -eps z_k.
void mt_mezo_losses(mt_mezo *mz, long step, mt_mezo_loss_fn loss, void *ctx, double *losses);
// The same from a callback that gives both of a direction's losses at once
// (*plus at +eps z(seed), *minus at -eps z(seed)).
typedef void (*mt_mezo_pair_fn)(void *ctx, uint64_t seed, float eps, double *plus, double *minus);
void mt_mezo_losses_paired(mt_mezo *mz, long step, mt_mezo_pair_fn pair, void *ctx, double *losses);

typedef struct {
    double projected_grad_rms;  // root mean square of the g_k
    double loss;                // mean of all the losses
    int finite;                 // 0: a loss was inf/NaN, nothing updated
} mt_mezo_info;

// The update of step `step` from the (all-reduced) losses, learning rate lr.
void mt_mezo_update(mt_mezo *mz, long step, const double *losses, float lr, mt_mezo_info *info);

// Hands each step's update to `defer` instead of applying it (the model
// applies it where its next forward reads each tensor: mt_model_defer_update).
// weight_decay is the config's; the receiver applies it where groups decay.
typedef void (*mt_mezo_defer_fn)(void *ctx, const mt_zo_directions *d, float lr, float weight_decay,
                                 uint64_t round_seed);
void mt_mezo_defer_updates(mt_mezo *mz, mt_mezo_defer_fn defer, void *ctx);

// w += scale * z(seed) over the groups, in place (for a loss that reads the
// weight block directly).
void mt_mezo_perturb_in_place(mt_mezo *mz, uint64_t seed, float scale);

#ifdef __cplusplus
}
#endif
#endif
