// trainer/mezo_step.c: see mezo_step.h.
#include "trainer/mezo_step.h"

#include <math.h>

// The loss callback: the step's micro-batches under the perturbation (seed,
// scale), as the mean over all their targets.
static double batches_loss(void *ctx, uint64_t seed, float scale) {
    mt_zo_batches *b = ctx;
    mt_model_set_perturbation(b->model, seed, scale);
    double sum = 0.0;
    for (int a = 0; a < b->accum; a++) {
        size_t at = (size_t)a * b->B * b->T;
        if (b->pos) mt_model_set_positions(b->model, b->pos + at);
        sum += mt_model_step(b->model, b->inputs + at, b->targets + at, 0.0f, 0);
    }
    mt_model_set_perturbation(b->model, 0, 0.0f);
    // data parallelism: the mean over every rank's targets, two scalars a call
    double both[2] = {sum, (double)b->valid_total};
    mt_dist_sum_host(b->dist, both, 2);
    return both[1] > 0 ? both[0] / both[1] : NAN;
}

void mt_mezo_step(mt_mezo *mz, mt_zo_batches *b, int step, float lr, double *loss, mt_step_info *info) {
    double pair_losses[2 * MT_ZO_MAX_DIRECTIONS];
    mt_mezo_losses(mz, step, batches_loss, b, pair_losses);
    mt_mezo_info zi;
    mt_mezo_update(mz, step, pair_losses, lr, &zi);
    *loss = zi.loss;
    *info = (mt_step_info){zi.projected_grad_rms, zi.finite};
}
