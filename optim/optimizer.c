// optim/optimizer.c: AdamW with global-norm clipping over parameter groups.
#include "optim/optimizer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/mem.h"
#include "kernels/ops.h"

struct mt_optimizer {
    mt_backend *be;
    mt_adamw_config cfg;
    size_t n;
    float *master;  // fp32; on the CPU this is the weights block itself
    void *weights;  // compute copy to refresh (GPU) or NULL
    float *m, *v;
    mt_param_group *groups;
    int num_groups, steps;
    double (*norm_sum)(void *ctx, double local);
    void *norm_ctx;
};

void mt_optimizer_set_norm_sum(mt_optimizer *opt, double (*sum)(void *ctx, double local), void *ctx) {
    opt->norm_sum = sum, opt->norm_ctx = ctx;
}

mt_err mt_optimizer_init(mt_optimizer **out, mt_backend *be, const mt_adamw_config *cfg, float *weights,
                         const float *master_init, size_t n, const mt_param_group *groups, int num_groups) {
    *out = NULL;
    mt_optimizer *opt = calloc(1, sizeof *opt);
    MT_CHECK(opt != NULL, "optimizer");
    opt->be = be;
    opt->cfg = *cfg;
    opt->n = n;
    mt_mem_place place = be->gpu ? MT_DEVICE : MT_HOST;
    mt_err err = MT_OK;
    if (be->gpu) {
        err = mt_alloc((void **)&opt->master, n * sizeof(float), MT_MEM_OPTIMIZER, place);
        if (!err) mt_copy_to_device(opt->master, master_init, n * sizeof(float));
        opt->weights = weights;
    } else {
        opt->master = weights;  // the fp32 weights are the master copy
        if (weights != master_init) memcpy(weights, master_init, n * sizeof(float));
    }
    if (!err) err = mt_alloc((void **)&opt->m, n * sizeof(float), MT_MEM_OPTIMIZER, place);
    if (!err) err = mt_alloc((void **)&opt->v, n * sizeof(float), MT_MEM_OPTIMIZER, place);
    if (err) {
        mt_optimizer_free(opt);
        return err;
    }
    // groups that follow each other in the block with the same decay are one
    // pass: an adapter's A and B and the layers' adapters one after another
    // make a single launch a step instead of one per tensor (element-wise
    // updates: the same values either way)
    opt->groups = malloc((size_t)(num_groups ? num_groups : 1) * sizeof *groups);
    MT_CHECK(opt->groups != NULL, "parameter groups");
    for (int g = 0; g < num_groups; g++) {
        mt_param_group *last = opt->num_groups ? &opt->groups[opt->num_groups - 1] : NULL;
        if (last && last->offset + last->count == groups[g].offset && last->decay == groups[g].decay)
            last->count += groups[g].count;
        else
            opt->groups[opt->num_groups++] = groups[g];
    }
    *out = opt;
    return MT_OK;
}

void mt_optimizer_free(mt_optimizer *opt) {
    if (!opt) return;
    if (opt->be->gpu) mt_free((void **)&opt->master);
    mt_free((void **)&opt->m);
    mt_free((void **)&opt->v);
    free(opt->groups);
    free(opt);
}

void mt_optimizer_step(mt_optimizer *opt, const float *grad, float lr, mt_step_info *info) {
    double sumsq = mt_op_sumsq(opt->be, grad, opt->n);
    double norm = sqrt(opt->norm_sum ? opt->norm_sum(opt->norm_ctx, sumsq) : sumsq);
    info->grad_norm = norm;
    info->finite = isfinite(norm);
    if (!info->finite) return;
    float scale = 1.0f;
    if (opt->cfg.grad_clip > 0.0f && norm > opt->cfg.grad_clip) scale = (float)(opt->cfg.grad_clip / (norm + 1e-6));
    opt->steps++;
    float bc1 = 1.0f - powf(opt->cfg.beta1, (float)opt->steps);
    float bc2 = 1.0f - powf(opt->cfg.beta2, (float)opt->steps);
    size_t act = mt_act_size(opt->be);
    for (int g = 0; g < opt->num_groups; g++) {
        const mt_param_group *pg = &opt->groups[g];
        void *copy = opt->weights ? (char *)opt->weights + pg->offset * act : NULL;
        mt_op_adamw(opt->be, opt->master + pg->offset, copy, grad + pg->offset, opt->m + pg->offset,
                    opt->v + pg->offset, pg->count, lr, opt->cfg.beta1, opt->cfg.beta2, opt->cfg.eps,
                    pg->decay ? opt->cfg.weight_decay : 0.0f, bc1, bc2, scale);
    }
}

int mt_optimizer_steps_taken(const mt_optimizer *opt) { return opt->steps; }

int mt_optimizer_passes(const mt_optimizer *opt) { return opt->num_groups; }

// Host <-> where the backend keeps the optimizer (device or host).
void mt_optimizer_get_master(const mt_optimizer *opt, float *dst) {
    mt_backend_to_host(opt->be, dst, opt->master, opt->n * sizeof(float));
}

void mt_optimizer_get_moments(const mt_optimizer *opt, float *m, float *v) {
    mt_backend_to_host(opt->be, m, opt->m, opt->n * sizeof(float));
    mt_backend_to_host(opt->be, v, opt->v, opt->n * sizeof(float));
}

void mt_optimizer_set_moments(mt_optimizer *opt, const float *m, const float *v, int steps) {
    mt_backend_from_host(opt->be, opt->m, m, opt->n * sizeof(float));
    mt_backend_from_host(opt->be, opt->v, v, opt->n * sizeof(float));
    opt->steps = steps;
}
