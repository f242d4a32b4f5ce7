// trainer/route.c: the gradient's way (route.h).
#include "trainer/route.h"

// A streamed gradient (GaLore's, offload's) is summed over the ranks before
// it is used (GaLore projects the sum): into every rank's buffer, or with
// root >= 0 into root's only.
static void reduce_now(mt_dist *d, float *grad, size_t n, int root) {
    if (mt_dist_world(d) == 1) return;
    mt_dist_after_compute(d);
    if (root >= 0)
        mt_dist_reduce_to(d, grad, n, root);
    else
        mt_dist_allreduce(d, grad, n);
    mt_dist_wait(d);
}

void mt_route_galore_owners(mt_dist *d, const mt_param_info *table, int n, size_t total, int *owner, size_t *bounds) {
    int world = mt_dist_world(d), r = 0;
    size_t lo, hi;
    bounds[0] = 0;
    for (int i = 0; i < n; i++) {
        size_t mid = table[i].offset + table[i].count / 2;
        // the next rank's run starts here once a middle reaches its shard
        while (r + 1 < world && (mt_dist_shard(d, r + 1, total, &lo, &hi), mid >= lo)) bounds[++r] = table[i].offset;
        owner[i] = r;
    }
    while (r < world) bounds[++r] = total;
}

void mt_route_dp_grads_done(void *ctx, int unit) {
    mt_dp_hook *h = ctx;
    if (!h->active || !h->grads || unit >= h->units || h->lo[unit] >= h->hi[unit]) return;
    mt_dist_after_compute(h->dist);
    if (h->zero_stage == 2)
        mt_dist_reduce_to_owners(h->dist, h->grads + h->lo[unit], h->lo[unit], h->hi[unit], h->grads + h->shard_lo,
                                 h->total);
    else
        mt_dist_allreduce(h->dist, h->grads + h->lo[unit], h->hi[unit] - h->lo[unit]);
}

void mt_route_zero2_grad_ready(void *ctx, int param, float *grad) {
    mt_zero2_hook *h = ctx;
    size_t a = h->table[param].offset, b = a + h->table[param].count, oa = a, ob = b;
    if (h->shard && !h->first && mt_range_clip(&oa, &ob, h->lo, h->hi))
        mt_op_add_f32(h->be, grad + (oa - a), grad + (oa - a), h->shard + (oa - h->lo), ob - oa);
    mt_dist_after_compute(h->dist);
    mt_dist_reduce_to_owners(h->dist, grad, a, b, h->shard, h->total);
    if (h->shard) return;
    int *n = &h->n_pending[h->cur];
    MT_CHECK(*n < MT_ZERO2_UNIT_PARAMS, "more than %d parameters in a forward unit", MT_ZERO2_UNIT_PARAMS);
    h->pending[h->cur][(*n)++] = (mt_zero2_piece){param, grad};
}

// This rank's parts of a unit's reduced gradients to the store.
static void zero2_to_store(mt_zero2_hook *h, int list) {
    for (int i = 0; i < h->n_pending[list]; i++) {
        const mt_zero2_piece *q = &h->pending[list][i];
        int k = h->plan->index[q->param];
        if (k >= 0) mt_offload_grad(*h->offload, k, q->grad + (h->plan->params[k].offset - h->table[q->param].offset));
    }
    h->n_pending[list] = 0;
}

void mt_route_zero2_grads_done(void *ctx, int unit) {
    mt_zero2_hook *h = ctx;
    mt_dist_wait_previous(h->dist);
    if (h->shard) return;
    zero2_to_store(h, h->cur ^ 1);  // the previous unit's collectives are waited for
    if (unit == 0) {                // backward's last: wait for its own too
        mt_dist_wait(h->dist);
        zero2_to_store(h, h->cur);
    }
    h->cur ^= 1;
}

int mt_route_any_rank(void *dist, int flag) { return mt_dist_any(dist, flag); }

double mt_route_sum_over_ranks(void *ctx, double local) {
    mt_dist_sum_host(ctx, &local, 1);
    return local;
}

void mt_route_galore_grad_ready(void *ctx, int param, float *grad) {
    mt_galore_hook *h = ctx;
    int root = h->owner ? h->owner[param] : -1;
    reduce_now(h->dist, grad, h->table[param].count, root);
    if (root >= 0 && root != mt_dist_rank(h->dist)) return;  // another rank's to update
    if (h->offloaded && h->offloaded[param] >= 0)
        mt_offload_grad(*h->offload, h->offloaded[param], grad);
    else
        mt_galore_update(h->galore, param, grad, h->weights + h->table[param].offset * h->act);
}

void mt_route_offload_grad_ready(void *ctx, int param, float *grad) {
    mt_offload_hook *h = ctx;
    reduce_now(h->dist, grad, h->table[param].count, -1);
    size_t offset = h->table[param].offset;
    if (offset < h->split)
        mt_op_add_f32(h->be, h->resident + offset, h->resident + offset, grad, h->table[param].count);
    else
        mt_offload_grad(*h->offload, h->index[param], grad);
}

void mt_route_offload_weights_needed(void *ctx, int bucket) {
    mt_offload_hook *h = ctx;
    if (!*h->offload) return;
    mt_offload_wait_bucket(*h->offload, bucket);
    if (!h->gather || !h->stale[bucket]) return;
    h->stale[bucket] = 0;
    if (h->lo[bucket] >= h->hi[bucket]) return;
    mt_dist_after_compute(h->dist);  // after the copy of this rank's updated part
    mt_dist_share_shards(h->dist, h->weights, h->lo[bucket], h->hi[bucket], h->total, h->elem);
    mt_dist_wait(h->dist);
}

void mt_route_share_owned(mt_dist *d, void *weights, const size_t *bounds, size_t elem) {
    mt_dist_after_compute(d);
    mt_dist_share_ranges(d, weights, bounds, elem);
    mt_dist_wait(d);
}

void mt_route_share_shards(mt_dist *d, void *weights, size_t total, size_t elem) {
    mt_dist_after_compute(d);
    mt_dist_share_shards(d, weights, 0, total, total, elem);
    mt_dist_wait(d);
}

void mt_route_install(const mt_plan *pl, int L, mt_dist *dist, int world, mt_offload **ofl, mt_model_options *o,
                      mt_dp_hook *dp, mt_zero2_hook *z, mt_galore_hook *g, mt_offload_hook *oh) {
    *oh = (mt_offload_hook){ofl, dist, pl->trained, 0, NULL, NULL, NULL, NULL, 0, 0, NULL, 0, NULL, NULL};
    dp->dist = dist, dp->zero_stage = pl->zero;
    if (pl->galore) o->grad_ready = mt_route_galore_grad_ready, o->grad_ready_ctx = g;
    if (pl->offload_streamed && !pl->galore && !pl->zero2_streamed)
        o->grad_ready = mt_route_offload_grad_ready, o->grad_ready_ctx = oh;
    // (streamed gradients, GaLore's and offload's, are reduced as each is handed over)
    if (world > 1 && !o->grad_ready) o->grads_done = mt_route_dp_grads_done, o->grads_done_ctx = dp;
    if (pl->zero2_streamed) {
        o->grad_ready = mt_route_zero2_grad_ready, o->grad_ready_ctx = z;
        o->grads_done = mt_route_zero2_grads_done, o->grads_done_ctx = z;
    }
    if (pl->offload) o->weights_needed = mt_route_offload_weights_needed, o->weights_needed_ctx = oh;
    // each forward unit's range of the trained block, for the gradient reduction
    dp->units = L + 2;
    dp->lo = calloc((size_t)dp->units, sizeof *dp->lo);
    dp->hi = calloc((size_t)dp->units, sizeof *dp->hi);
    MT_CHECK(dp->lo && dp->hi, "unit ranges");
    for (int i = 0; i < pl->n_trained; i++) {
        int unit = mt_param_forward_unit(pl->trained[i].name, L);
        size_t a = pl->trained[i].offset, b = a + pl->trained[i].count;
        if (dp->lo[unit] == dp->hi[unit] || a < dp->lo[unit]) dp->lo[unit] = a;
        if (b > dp->hi[unit]) dp->hi[unit] = b;
    }
}
