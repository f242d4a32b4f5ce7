// trainer/mezo_step.c: see mezo_step.h.
#include "trainer/mezo_step.h"

#include <math.h>

// The pair callback: the step's micro-batches under the perturbations +eps
// and -eps of seed, both passes at once (each layer's weights read once for
// both), as the means over all their targets.
static void batches_pair(void *ctx, uint64_t seed, float eps, double *plus, double *minus) {
    mt_zo_batches *b = ctx;
    double sums[3] = {0.0, 0.0, (double)b->valid_total};
    for (int a = 0; a < b->accum; a++) {
        size_t at = (size_t)a * b->B * b->T;
        if (b->pos) mt_model_set_positions(b->model, b->pos + at);
        double p, m;
        mt_model_forward_pair(b->model, b->inputs + at, b->targets + at, seed, eps, &p, &m);
        sums[0] += p, sums[1] += m;
    }
    // data parallelism: the means over every rank's targets, three scalars a call
    mt_dist_sum_host(b->dist, sums, 3);
    *plus = sums[2] > 0 ? sums[0] / sums[2] : NAN;
    *minus = sums[2] > 0 ? sums[1] / sums[2] : NAN;
}

void mt_mezo_step(mt_mezo *mz, mt_zo_batches *b, int step, float lr, double *loss, mt_step_info *info) {
    double pair_losses[2 * MT_ZO_MAX_DIRECTIONS];
    mt_mezo_losses_paired(mz, step, batches_pair, b, pair_losses);
    mt_mezo_info zi;
    mt_mezo_update(mz, step, pair_losses, lr, &zi);
    *loss = zi.loss;
    *info = (mt_step_info){zi.projected_grad_rms, zi.finite};
}
