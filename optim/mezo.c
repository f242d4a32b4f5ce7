// optim/mezo.c: MeZO's two halves over the z stream (mezo.h).
#include "optim/mezo.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/rng.h"

struct mt_mezo {
    mt_backend *be;
    mt_mezo_config cfg;
    void *weights;
    mt_param_group *groups;
    int num_groups;
    mt_mezo_defer_fn defer;
    void *defer_ctx;
};

// Domain separators: directions and the update's rounding bits come from
// streams no other use of the run seed shares.
enum { STREAM_DIRECTIONS = 0x4d655a4f, STREAM_ROUNDING = 0x524f554e };

mt_err mt_mezo_init(mt_mezo **out, mt_backend *be, const mt_mezo_config *cfg, void *weights,
                    const mt_param_group *groups, int num_groups) {
    *out = NULL;
    if (cfg->samples < 1 || cfg->samples > MT_ZO_MAX_DIRECTIONS)
        return mt_errorf(MT_ERR_CONFIG, "mezo.samples is %d; it must be 1 to %d", cfg->samples, MT_ZO_MAX_DIRECTIONS);
    if (!(cfg->eps > 0.0f)) return mt_errorf(MT_ERR_CONFIG, "mezo.eps is %g; it must be above 0", cfg->eps);
    mt_mezo *mz = calloc(1, sizeof *mz);
    MT_CHECK(mz != NULL, "mezo");
    mz->be = be;
    mz->cfg = *cfg;
    mz->weights = weights;
    mz->groups = malloc((size_t)(num_groups ? num_groups : 1) * sizeof *groups);
    MT_CHECK(mz->groups != NULL, "mezo groups");
    memcpy(mz->groups, groups, (size_t)num_groups * sizeof *groups);
    mz->num_groups = num_groups;
    *out = mz;
    return MT_OK;
}

void mt_mezo_free(mt_mezo *mz) {
    if (!mz) return;
    free(mz->groups);
    free(mz);
}

uint64_t mt_mezo_direction_seed(const mt_mezo *mz, long step, int k) {
    uint64_t step_seed = mt_rng_bits(mz->cfg.seed ^ (uint64_t)STREAM_DIRECTIONS, (uint64_t)step);
    return mt_rng_bits(step_seed, (uint64_t)k);
}

void mt_mezo_losses(mt_mezo *mz, long step, mt_mezo_loss_fn loss, void *ctx, double *losses) {
    for (int k = 0; k < mz->cfg.samples; k++) {
        uint64_t seed = mt_mezo_direction_seed(mz, step, k);
        losses[2 * k] = loss(ctx, seed, mz->cfg.eps);
        losses[2 * k + 1] = loss(ctx, seed, -mz->cfg.eps);
    }
}

void mt_mezo_losses_paired(mt_mezo *mz, long step, mt_mezo_pair_fn pair, void *ctx, double *losses) {
    for (int k = 0; k < mz->cfg.samples; k++)
        pair(ctx, mt_mezo_direction_seed(mz, step, k), mz->cfg.eps, &losses[2 * k], &losses[2 * k + 1]);
}

void mt_mezo_update(mt_mezo *mz, long step, const double *losses, float lr, mt_mezo_info *info) {
    int n = mz->cfg.samples;
    mt_zo_directions d = {n, {0}, {0}};
    double sum_loss = 0.0, sum_sq = 0.0;
    info->finite = 1;
    for (int k = 0; k < n; k++) {
        double g = (losses[2 * k] - losses[2 * k + 1]) / (2.0 * mz->cfg.eps);
        if (!isfinite(losses[2 * k]) || !isfinite(losses[2 * k + 1])) info->finite = 0;
        d.seed[k] = mt_mezo_direction_seed(mz, step, k);
        d.coef[k] = (float)(g / n);
        sum_loss += losses[2 * k] + losses[2 * k + 1];
        sum_sq += g * g;
    }
    info->loss = sum_loss / (2.0 * n);
    info->projected_grad_rms = sqrt(sum_sq / n);
    if (!info->finite) return;
    uint64_t round_seed = mt_rng_bits(mz->cfg.seed ^ (uint64_t)STREAM_ROUNDING, (uint64_t)step);
    if (mz->defer) {
        mz->defer(mz->defer_ctx, &d, lr, mz->cfg.weight_decay, round_seed);
        return;
    }
    size_t act = mt_act_size(mz->be);
    for (int i = 0; i < mz->num_groups; i++) {
        const mt_param_group *g = &mz->groups[i];
        mt_op_zo_update(mz->be, (char *)mz->weights + g->offset * act, g->count, g->offset, &d, lr,
                        g->decay ? mz->cfg.weight_decay : 0.0f, round_seed);
    }
}

void mt_mezo_defer_updates(mt_mezo *mz, mt_mezo_defer_fn defer, void *ctx) {
    mz->defer = defer;
    mz->defer_ctx = ctx;
}

void mt_mezo_perturb_in_place(mt_mezo *mz, uint64_t seed, float scale) {
    size_t act = mt_act_size(mz->be);
    for (int i = 0; i < mz->num_groups; i++) {
        const mt_param_group *g = &mz->groups[i];
        void *w = (char *)mz->weights + g->offset * act;
        mt_op_perturb(mz->be, w, w, g->count, scale, seed, g->offset);
    }
}
