// trainer/updater.c: see updater.h. Moved from train.c (build_galore,
// build_offload, build_updater, finish_update) with the run's fields in
// mt_updater.
#define _POSIX_C_SOURCE 200809L
#include "trainer/updater.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/mem.h"
#include "trainer/checkpoint.h"
#include "trainer/hf.h"

// MeZO's update rides on the model's next forward.
static void defer_to_model(void *model, const mt_zo_directions *d, float lr, float weight_decay, uint64_t round_seed) {
    mt_model_defer_update(model, d, lr, weight_decay, round_seed);
}

// GaLore over the trained block: projected matrices, the rest AdamW (or the
// store's), each rank its own parameters under ZeRO.
static mt_err build_galore(mt_updater *u) {
    const mt_config *cfg = u->cfg;
    const mt_plan *pl = u->pl;
    int n = pl->n_trained;
    u->gparams = calloc((size_t)(n ? n : 1), sizeof *u->gparams);
    MT_CHECK(u->gparams != NULL, "galore parameters");
    if (pl->zero) {  // each rank keeps and updates the state of its own parameters only
        u->gowner = malloc((size_t)(n ? n : 1) * sizeof *u->gowner);
        u->gbounds = malloc((size_t)(u->world + 1) * sizeof *u->gbounds);
        MT_CHECK(u->gowner && u->gbounds, "galore owners");
        mt_route_galore_owners(u->dist, pl->trained, n, pl->trained_total, u->gowner, u->gbounds);
    }
    for (int i = 0; i < n; i++) {
        const mt_param_info *p = &pl->trained[i];
        u->gparams[i] = (mt_galore_param){p->name,
                                          p->shape[0],
                                          p->ndim == 2 ? p->shape[1] : 0,
                                          p->decay,
                                          pl->selected[i],
                                          pl->offload && !pl->selected[i],
                                          u->gowner && u->gowner[i] != u->rank};
        if (pl->selected[i]) u->projected_count += p->count;
    }
    mt_galore_config gc = {(float)cfg->optim_beta1,
                           (float)cfg->optim_beta2,
                           (float)cfg->optim_eps,
                           (float)cfg->optim_weight_decay,
                           (int)cfg->galore_rank,
                           (int)cfg->galore_update_gap,
                           (float)cfg->galore_scale,
                           !strcmp(cfg->galore_refresh, "svd") ? MT_GALORE_SVD : MT_GALORE_RANDOMIZED,
                           !strcmp(cfg->galore_moments, "int8"),
                           (uint64_t)cfg->train_seed};
    mt_err err = mt_galore_init(&u->gal, u->be, &gc, u->gparams, n);
    *u->ghook =
        (mt_galore_hook){u->gal, u->tr.weights, mt_act_size(u->be), pl->trained, NULL, &u->ofl, u->dist, u->gowner};
    if (!err && u->resume_dir[0]) {
        mt_state_tensor *state;
        int n_state = mt_galore_state(u->gal, &state);
        err = mt_checkpoint_read_extra(u->resume_dir, state, n_state);
        if (!err) mt_galore_state_upload(u->gal, u->resume->optimizer_steps);
    }
    return err;
}
// offload.delay's checkpoint tensor: the trained block's weights as the model
// holds them, one update behind the master (data, or read from source).
static mt_state_tensor delayed_weights_tensor(size_t total, float *data, const mt_f32_source *source) {
    return (mt_state_tensor){"offload", "delayed_weights", 0, total, data, source};
}

// An offloaded full fine-tune without the trained block's fp32 host copy:
// each unit's values (mt_hf_set_model's walk of the base, or of a
// checkpoint's model) into the model and into the store's master slots of
// this rank's parameters; resuming, the unit's moments from the checkpoint
// with them (m, v: room for the widest unit so far).
typedef struct {
    mt_updater *u;
    float *m, *v, *w;  // w: offload.delay's weights of the unit
    size_t room;
    float *resident;  // offload.ratio < 1: master, m, v of [0, split) (3 x split), for AdamW on the backend
} unit_fill;

static mt_err fill_unit(void *ctx, int first, int count, const float *values) {
    unit_fill *f = ctx;
    mt_updater *u = f->u;
    int n;
    const mt_param_info *table = mt_model_params(u->model, &n);
    size_t lo = table[first].offset, span = table[first + count - 1].offset + table[first + count - 1].count - lo;
    int resuming = u->resume_dir[0] != 0, delayed = resuming && u->cfg->offload_delay;
    mt_err err = MT_OK;
    if (resuming && span > f->room) {
        free(f->m);
        f->m = f->v = f->w = NULL, f->room = 0;
        if (!(err = mt_state_copy_alloc(span, 3, &f->m))) f->v = f->m + span, f->w = f->v + span, f->room = span;
    }
    mt_checkpoint_meta meta;
    if (!err && resuming) err = mt_checkpoint_read(u->resume_dir, u->mc, NULL, NULL, lo, lo + span, f->m, f->v, &meta);
    if (!err && delayed) {  // the model takes the weights the checkpoint's model held, one update behind
        mt_state_tensor t = delayed_weights_tensor(u->pl->trained_total, NULL, NULL);
        err = mt_checkpoint_read_extra_range(u->resume_dir, &t, lo, lo + span, f->w);
    }
    if (!err) err = mt_model_set_params(u->model, first, count, delayed ? f->w : values);
    if (err) return err;
    size_t split = u->pl->offload_split;
    if (lo < split) {  // (units are whole on either side of it)
        size_t len = (lo + span < split ? lo + span : split) - lo;
        memcpy(f->resident + lo, values, len * sizeof(float));
        if (resuming) {
            memcpy(f->resident + split + lo, f->m, len * sizeof(float));
            memcpy(f->resident + 2 * split + lo, f->v, len * sizeof(float));
        }
    }
    return mt_offload_write_state(u->ofl, lo, span, values, resuming ? f->m : NULL, resuming ? f->v : NULL);
}

// offload.delay, resuming: the model's weights as the checkpoint kept them
// (one update behind its master), and the offload told that the master's
// update is pending.
static mt_err resume_delayed(mt_updater *u) {
    size_t total = u->pl->trained_total;
    float *w = NULL;
    mt_err err = mt_state_copy_alloc(total, 1, &w);
    if (err) return err;
    mt_state_tensor t = delayed_weights_tensor(total, w, NULL);
    err = mt_checkpoint_read_extra(u->resume_dir, &t, 1);
    if (!err && u->pl->lora)
        mt_model_set_adapters(u->model, w);
    else if (!err)
        err = mt_model_set_weights(u->model, w);
    free(w);
    return err ? err : mt_offload_set_pending(u->ofl);
}

// AdamW on the backend over groups (clipped to [lo, hi) of the block, the
// shard) from master (host fp32 values of [lo, hi)).
static mt_err build_adamw(mt_updater *u, mt_param_group *groups, int n_groups, size_t lo, size_t hi,
                          const float *master) {
    const mt_config *cfg = u->cfg;
    mt_adamw_config ac = {(float)cfg->optim_lr,  (float)cfg->optim_beta1,        (float)cfg->optim_beta2,
                          (float)cfg->optim_eps, (float)cfg->optim_weight_decay, (float)cfg->optim_grad_clip};
    int n = 0;
    for (int g = 0; g < n_groups; g++) {
        size_t a = groups[g].offset, b = a + groups[g].count;
        if (mt_range_clip(&a, &b, lo, hi)) groups[n++] = (mt_param_group){a - lo, b - a, groups[g].decay};
    }
    return mt_optimizer_init(&u->opt, u->be, &ac, (float *)((char *)u->tr.weights + lo * mt_act_size(u->be)), master,
                             hi - lo, groups, n);
}

// offload.ratio < 1: the store's update (mt_offload_end_step) asks first,
// with its part's sum of squares, and AdamW on the backend then takes the
// same total, so both clip by the norm of the whole gradient.
static double store_norm_sum(void *ctx, double local) {
    mt_updater *u = ctx;
    u->norm_total = local + mt_op_sumsq(u->be, u->opt_grads, u->pl->offload_split);
    return u->norm_total;
}
static double resident_norm_sum(void *ctx, double local) {
    (void)local;
    return ((mt_updater *)ctx)->norm_total;
}

// offload.ratio < 1: AdamW on the backend over [0, split) of the block (the
// trained parameters' groups, clipped to it), from the values (and,
// resuming, the moments) the walk of the units collected; its gradients
// summed from the stream (or the block's, when the GPU sums the micro-batches).
static mt_err build_resident(mt_updater *u, const float *resident, mt_param_group *groups, int n_groups) {
    const mt_plan *pl = u->pl;
    size_t split = pl->offload_split;
    mt_err err = build_adamw(u, groups, n_groups, 0, split, resident);
    if (!err && u->resume_dir[0])
        mt_optimizer_set_moments(u->opt, resident + split, resident + 2 * split, u->resume->optimizer_steps);
    if (!err && pl->offload_streamed) {
        err = mt_alloc((void **)&u->resident_grads, split * sizeof(float), MT_MEM_GRADS,
                       pl->use_gpu ? MT_DEVICE : MT_HOST);
        if (!err) mt_op_zero(u->be, u->resident_grads, split * sizeof(float));
    }
    if (err) return err;
    u->opt_grads = u->resident_grads ? u->resident_grads : u->tr.grads;
    mt_offload_set_norm_sum(u->ofl, store_norm_sum, u);
    mt_optimizer_set_norm_sum(u->opt, resident_norm_sum, u);
    mt_offload_hook *h = u->ohook;
    h->split = split, h->resident = u->resident_grads, h->be = u->be;
    return MT_OK;
}

// AdamW's state in a store off the GPU (host memory or a file): with GaLore
// the parameters it does not project, packed; else the trained block (ZeRO:
// this rank's shard). groups: the trained parameters' (offload.ratio's
// AdamW on the backend takes them).
static mt_err build_offload(mt_updater *u, mt_param_group *groups, int n_groups) {
    const mt_config *cfg = u->cfg;
    const mt_plan *pl = u->pl;
    int cores;
    u->offload_threads = mt_offload_auto_threads(pl->local_world, pl->use_gpu, &cores);
    if (cfg->offload_threads > 0)
        u->offload_threads = (int)cfg->offload_threads;
    else if (pl->use_gpu && cores < 4)
        mt_warn(
            "offload: this rank may run on %d core%s (its CPU affinity, or its share of the node's), so the "
            "CPU AdamW has %d thread%s and will hold the GPU back; with mpirun, start with --bind-to none, or "
            "--map-by slot:PE=N to give each rank N cores",
            cores, cores == 1 ? "" : "s", u->offload_threads, u->offload_threads == 1 ? "" : "s");
    // (GaLore under ZeRO: the unprojected ones of this rank's parameters)
    mt_offload_plan *plan = &u->plan;
    // (offload.ratio < 1: what follows the units AdamW keeps on the backend)
    *plan = mt_offload_plan_make(
        pl->trained, pl->n_trained, u->gbounds ? u->gbounds[u->rank] : pl->shard_lo + pl->offload_split,
        u->gbounds ? u->gbounds[u->rank + 1] : pl->shard_hi, pl->galore ? pl->selected : NULL, u->mc->L);
    u->ghook->offloaded = u->ohook->index = plan->index;
    char trace[1200];
    snprintf(trace, sizeof trace, "%s/offload-trace.json", cfg->output_dir);
    mt_offload_config oc = {!strcmp(cfg->offload_optimizer, "ssd") ? MT_STORE_FILE : MT_STORE_MEMORY,
                            cfg->offload_path,
                            0,
                            (int)cfg->offload_io_threads,
                            (float)cfg->optim_beta1,
                            (float)cfg->optim_beta2,
                            (float)cfg->optim_eps,
                            (float)cfg->optim_weight_decay,
                            (float)cfg->optim_grad_clip,
                            u->offload_threads,
                            cfg->offload_trace_step > 0 ? trace : NULL,
                            cfg->offload_trace_step,
                            u->mc->L,
                            u->rank,
                            u->world,
                            pl->offload_streamed ? u->accum : 1,
                            !strcmp(cfg->offload_moments, "int8"),
                            (int)cfg->offload_delay};
    int ranks = pl->zero && u->world > 1;
    mt_err err = MT_OK;
    if (plan->packed) {
        // GaLore's unprojected parameters: their master from the weights
        // (a checkpoint's are the offloaded fp32 values), moments from
        // the checkpoint's tensors
        float *packed = NULL;
        int moments = u->resume_dir[0] ? 3 : 1;
        err = mt_state_copy_alloc(plan->count, moments, &packed);
        if (!err) mt_offload_plan_gather(plan, *u->trained, packed);
        if (!err && moments == 3) {
            mt_state_tensor *t = mt_offload_plan_moments(plan, pl->trained, pl->n_trained, packed + plan->count,
                                                         packed + 2 * plan->count);
            err = mt_checkpoint_read_extra(u->resume_dir, t, 2 * plan->n);
            free(t);
        }
        if (!err)
            err = mt_offload_init(&u->ofl, u->be, &oc, plan->params, plan->n, plan->count, u->tr.weights, packed,
                                  moments == 3 ? packed + plan->count : NULL,
                                  moments == 3 ? packed + 2 * plan->count : NULL, u->resume->optimizer_steps);
        free(packed);
        if (!err && ranks) mt_offload_set_norm_sum(u->ofl, mt_route_sum_over_ranks, u->dist);
        return err;
    }
    // moment_m and moment_v exist only when resuming with the trained block's host copy (resume.optimizer_steps
    // is 0 otherwise); without it the model's values, the master and a checkpoint's moments come a unit at a
    // time (fill_unit)
    err = mt_offload_init(&u->ofl, u->be, &oc, plan->params, plan->n, plan->count, u->tr.weights,
                          *u->trained ? *u->trained + pl->shard_lo : NULL, *u->moment_m, *u->moment_v,
                          u->resume->optimizer_steps);
    int filled = !*u->trained;
    MT_CHECK(filled || !pl->offload_split, "offload.ratio < 1 with the trained block's host copy");
    if (!err && filled) {
        char dir[1200];
        snprintf(dir, sizeof dir, "%s/model", u->resume_dir);  // resuming: the checkpoint's master
        unit_fill fill = {u, NULL, NULL, NULL, 0, NULL};
        if (pl->offload_split) err = mt_state_copy_alloc(pl->offload_split, 3, &fill.resident);
        if (!err)
            err = mt_hf_each_unit(u->model,
                                  u->resume_dir[0]                    ? dir
                                  : strcmp(cfg->model_init, "random") ? cfg->model_path
                                                                      : NULL,
                                  (uint64_t)cfg->train_seed, fill_unit, &fill);
        if (!err && pl->offload_split) err = build_resident(u, fill.resident, groups, n_groups);
        free(fill.m);
        free(fill.resident);
    }
    // offload.delay: the master's update pending (filled, the model already holds the checkpoint's weights)
    if (!err && cfg->offload_delay && u->resume_dir[0])
        err = filled ? mt_offload_set_pending(u->ofl) : resume_delayed(u);
    if (!err && ranks) {
        mt_offload_hook *h = u->ohook;
        mt_offload_set_norm_sum(u->ofl, mt_route_sum_over_ranks, u->dist);
        h->gather = 1, h->lo = u->dp->lo, h->hi = u->dp->hi, h->weights = u->tr.weights;
        h->total = pl->trained_total, h->elem = mt_act_size(u->be);
        h->stale = calloc((size_t)u->dp->units, 1);
        MT_CHECK(h->stale != NULL, "offload units");
    }
    // the store holds the values now: the host copies go (at 7B they are 28 GB each)
    free(*u->moment_m);
    free(*u->moment_v);
    *u->moment_m = *u->moment_v = NULL;
    if (!pl->lora) {
        free(*u->host_params);
        *u->host_params = *u->trained = NULL;
    }
    return err;
}
// What updates the trained block: GaLore, MeZO, AdamW on the backend, or
// AdamW with its state offloaded (alone or beside GaLore).
mt_err mt_updater_build(mt_updater *u) {
    const mt_config *cfg = u->cfg;
    const mt_plan *pl = u->pl;
    int n = pl->n_trained, n_groups = 0;
    mt_param_group *groups = malloc((size_t)(n ? n : 1) * sizeof *groups);
    MT_CHECK(groups, "parameter groups");
    for (int i = 0; i < n; i++) {
        if (pl->mezo && !pl->selected[i]) continue;
        groups[n_groups++] = (mt_param_group){pl->trained[i].offset, pl->trained[i].count, pl->trained[i].decay};
        u->selected_count += pl->trained[i].count;
    }
    mt_err err = MT_OK;
    if (pl->galore) {
        err = build_galore(u);
    } else if (pl->mezo) {
        mt_mezo_config zc = {(float)cfg->mezo_eps, (int)cfg->mezo_samples, (float)cfg->optim_weight_decay,
                             (uint64_t)cfg->train_seed};
        err = mt_model_enable_perturbation(u->model, pl->selected);
        if (!err) err = mt_mezo_init(&u->mz, u->be, &zc, u->tr.weights, groups, n_groups);
        // each update rides on the next forward's first read of each tensor
        if (!err) mt_mezo_defer_updates(u->mz, defer_to_model, u->model);
    }
    if (pl->zero2_streamed && !pl->offload_streamed && !err) {
        size_t count = pl->shard_hi - pl->shard_lo;
        err = mt_alloc((void **)&u->shard_grads, (count ? count : 1) * sizeof(float), MT_MEM_GRADS,
                       pl->use_gpu ? MT_DEVICE : MT_HOST);
        if (!err) mt_op_zero(u->be, u->shard_grads, (count ? count : 1) * sizeof(float));  // alignment gaps stay 0
    }
    mt_zero2_hook *z = u->zhook;
    z->dist = u->dist, z->be = u->be, z->table = pl->trained, z->shard = u->shard_grads;
    z->lo = pl->shard_lo, z->hi = pl->shard_hi, z->total = pl->trained_total, z->first = 1;
    z->offload = &u->ofl, z->plan = &u->plan;
    if (pl->offload && !err) {
        err = build_offload(u, groups, n_groups);
    } else if (!pl->galore && !pl->mezo && !err) {
        // ZeRO 1, 2: this rank's shard of the block
        err = build_adamw(u, groups, n_groups, pl->shard_lo, pl->shard_hi, *u->trained + pl->shard_lo);
        if (!err && pl->zero && u->world > 1) mt_optimizer_set_norm_sum(u->opt, mt_route_sum_over_ranks, u->dist);
    }
    free(groups);
    if (err) return err;
    if (u->resume_dir[0] && u->opt && !u->ofl)  // (offload.ratio's got theirs with the units)
        mt_optimizer_set_moments(u->opt, *u->moment_m, *u->moment_v, u->resume->optimizer_steps);
    u->dp->grads = u->tr.grads, u->dp->total = pl->trained_total, u->dp->shard_lo = pl->shard_lo;
    if (!pl->offload_split) u->opt_grads = pl->zero2_streamed ? u->shard_grads : u->tr.grads + pl->shard_lo;
    return MT_OK;
}
// After backward: the updates that wait for the whole step (AdamW, the
// store's, the sharing of ZeRO's and GaLore's owned parts), and the norm of
// the step's gradient in info. refresh_seconds: GaLore's projector refresh.
mt_err mt_updater_end(mt_updater *u, int step, float lr, mt_step_info *info, double *refresh_seconds) {
    const mt_plan *pl = u->pl;
    if (pl->galore) mt_galore_end_step(u->gal, info);
    int matrices = 0;
    double seconds = pl->galore ? mt_galore_last_refresh_seconds(u->gal, &matrices) : 0.0;
    int share_owned = pl->galore && u->gowner && u->world > 1;
    if (share_owned) {
        // each rank updated (and refreshed) its own parameters: the
        // norm, the verdict and the count over all of them (the
        // seconds stay rank 0's); every rank gets the weights below
        double sum[3] = {info->grad_norm * info->grad_norm, !info->finite, matrices};
        mt_dist_sum_host(u->dist, sum, 3);
        *info = (mt_step_info){sqrt(sum[0]), sum[1] == 0};
        matrices = (int)sum[2];
    }
    mt_err err;
    if (u->ofl) {
        // adapters, or gradients summed over micro-batches: the whole block now, last layer first
        // (ZeRO: the sums of this rank's shard)
        if (!pl->offload_streamed)
            for (int k = u->plan.n - 1; k >= 0; k--)
                mt_offload_grad(u->ofl, k, u->opt_grads + (u->plan.params[k].offset - pl->shard_lo));
        mt_step_info off;
        if ((err = mt_offload_end_step(u->ofl, &off.grad_norm, &off.finite))) return err;
        if (u->ohook->gather) memset(u->ohook->stale, 1, (size_t)u->dp->units);
        // with GaLore, the norm over both parts
        *info = pl->galore ? (mt_step_info){hypot(info->grad_norm, off.grad_norm), info->finite && off.finite} : off;
        // GaLore under ZeRO: the store's updates of this rank's
        // unprojected parameters are in the weights before they are shared
        if (share_owned && (err = mt_offload_sync(u->ofl))) return err;
    }
    if (share_owned) {
        mt_route_share_owned(u->dist, u->tr.weights, u->gbounds, mt_act_size(u->be));
    }
    if (u->opt) mt_optimizer_step(u->opt, u->opt_grads, lr, info);
    if (u->opt && pl->zero && info->finite) {
        mt_route_share_shards(u->dist, u->tr.weights, pl->trained_total, mt_act_size(u->be));
    }
    if (pl->galore && matrices) {
        *refresh_seconds = seconds;
        mt_info("step %d: GaLore refreshed %d projectors in %.2fs (%s)", step + 1, matrices, seconds,
                u->cfg->galore_refresh);
    }
    return MT_OK;
}

// The start-up lines of MeZO, GaLore and offload: what each keeps, where.
void mt_updater_report(const mt_updater *u, size_t count) {
    const mt_config *cfg = u->cfg;
    const mt_plan *pl = u->pl;
    const mt_lora_config *lora = pl->lora ? &pl->lora_cfg : NULL;
    if (pl->mezo) {
        mt_info(
            "MeZO eps=%g samples=%d: %d of %d trainable tensors, %.2fM parameters (%s); no gradients or optimizer "
            "state, %.1f MiB perturbation scratch",
            cfg->mezo_eps, (int)cfg->mezo_samples, pl->n_selected, pl->n_trained, u->selected_count / 1e6,
            cfg->mezo_trainable, mt_model_perturbation_bytes(u->model) / 1048576.0);
        if (lora && lora->dropout > 0)
            mt_info("lora.dropout %g is not applied: MeZO's two forward passes must see the same function",
                    lora->dropout);
    }
    if (pl->galore)
        mt_info(
            "GaLore rank %ld, update_gap %ld, scale %g, %s refresh, %s moments: %d matrices projected (%.2fM of "
            "%.2fM parameters), the rest AdamW%s; optimizer state %.2f GiB, gradient buffers %.1f MiB (no "
            "fp32 master copy%s%s)",
            cfg->galore_rank, cfg->galore_update_gap, cfg->galore_scale, cfg->galore_refresh, cfg->galore_moments,
            pl->n_selected, u->projected_count / 1e6, count / 1e6, pl->offload ? " with its state offloaded" : "",
            mt_galore_state_bytes(u->gal) / 1073741824.0, mt_model_streamed_grad_bytes(u->model) / 1048576.0,
            pl->offload ? " of the projected matrices" : "",
            pl->use_gpu ? "; bf16 weights updated with stochastic rounding" : "");
    if (pl->offload) {
        const mt_store *st = mt_offload_store(u->ofl);
        int int8 = !strcmp(cfg->offload_moments, "int8");
        mt_info(
            "AdamW state offloaded to %s: %.2fM parameters%s, %.2f GiB (%s)%s%s; CPU AdamW %s, %d "
            "thread%s; gradients %s, %.1f MiB of GPU staging; host memory %.2f GiB",
            !strcmp(cfg->offload_optimizer, "ssd") ? "SSD" : "host memory", u->plan.count / 1e6,
            u->plan.packed     ? (u->gbounds && u->world > 1 ? " (those GaLore does not project, of this rank's "
                                                               "parameters)"
                                                             : " (those GaLore does not project)")
            : u->ohook->gather ? " (this rank's shard)"
                               : "",
            u->plan.count * (int8 ? 6.0 : 12.0) / 1073741824.0,
            int8 ? "fp32 master, m and v as 8-bit codes with an absmax per 256" : "fp32 master, m, v",
            st && mt_store_path(st)[0] ? " in " : "", st ? mt_store_path(st) : "", mt_offload_cpu_path(u->ofl),
            u->offload_threads, u->offload_threads == 1 ? "" : "s",
            lora                    ? "sent after backward"
            : !pl->offload_streamed ? "summed over the micro-batches where computed, sent after backward"
            : u->accum > 1          ? "streamed per layer and summed on the host over the micro-batches"
                                    : "streamed per layer",
            mt_offload_device_bytes(u->ofl) / 1048576.0, mt_offload_host_bytes(u->ofl) / 1073741824.0);
        if (cfg->offload_ratio < 1 && !pl->offload_split && pl->n_trained > 0) {
            size_t first = 0;  // the first forward unit's values
            int unit = mt_param_forward_unit(pl->trained[0].name, u->mc->L);
            for (int i = 0; i < pl->n_trained && mt_param_forward_unit(pl->trained[i].name, u->mc->L) == unit; i++)
                first = pl->trained[i].offset + pl->trained[i].count;
            mt_warn(
                "offload.ratio %g keeps no forward unit out of the store: the first alone (%.2fM parameters) is more "
                "than %g of the trained ones; all the state is offloaded (lower offload.ratio to keep units)",
                cfg->offload_ratio, first / 1e6, 1 - cfg->offload_ratio);
        }
        if (pl->offload_split) {
            char layers[64] = "";
            if (pl->resident_units > 1) snprintf(layers, sizeof layers, " and layers 0-%d", pl->resident_units - 2);
            mt_info(
                "offload.ratio %g: the AdamW state of the embedding%s (%.2fM parameters, %.2f GiB with their "
                "gradients) stays %s, updated there after backward; the store holds the rest",
                cfg->offload_ratio, layers, pl->offload_split / 1e6,
                pl->offload_split * (u->resident_grads ? 16.0 : 12.0) / 1073741824.0,
                pl->use_gpu ? "on the GPU" : "with the CPU backend's weights");
        }
        if (pl->host_need > 0.0 && !pl->host_sum)
            mt_info(
                "offload.grad_sum auto: summed in host memory, the gradients would bring this node's ranks to about "
                "%.1f GiB at the start, over 85%% of its %.1f GiB: the GPU sums them (4 bytes a parameter there; "
                "offload.grad_sum: host forces the host)",
                pl->host_need / 1073741824.0, pl->host_have / 1073741824.0);
        if (!strcmp(cfg->offload_optimizer, "ssd") && !mt_store_direct_io(st))
            mt_warn("%s does not take O_DIRECT (tmpfs?): the state goes through the page cache", cfg->offload_path);
    }
}

void mt_updater_begin(mt_updater *u, float lr) {
    if (u->resident_grads) mt_op_zero(u->be, u->resident_grads, u->pl->offload_split * sizeof(float));
    if (u->gal) mt_galore_begin_step(u->gal, lr);
    if (u->ofl) mt_offload_begin_step(u->ofl, lr);
}

void mt_updater_micro_batch(mt_updater *u, int a) {
    if (u->ofl && u->pl->offload_streamed) mt_offload_micro_batch(u->ofl, a);
}

void mt_updater_cancel(mt_updater *u) {
    if (u->gal) mt_galore_cancel_step(u->gal);
    if (u->ofl) mt_offload_cancel_step(u->ofl);
}

// --------------------------------------------------------------- state

mt_err mt_state_copy_alloc(size_t n, int arrays, float **block) {
    *block = mt_host_alloc_copy((n ? n : 1) * (size_t)arrays * sizeof(float));
    if (*block) return MT_OK;
    return mt_errorf(MT_ERR_NOMEM,
                     "out of host memory for a copy of the offloaded optimizer state (%.1f GiB for checkpoints and the "
                     "saved model); free host memory, or save less often",
                     arrays * n * 4.0 / 1073741824.0);
}

// ZeRO over several ranks: each rank holds the AdamW state of its shard.
static int sharded(const mt_updater *u) { return u->pl->zero > 0 && u->world > 1; }

// AdamW's whole master (on the GPU, or offloaded without GaLore) into dst,
// and with offload the moments of this rank's shard into m, v (NULL: not
// read); ZeRO: every rank gets every shard's master.
static mt_err read_master(mt_updater *u, float *dst, float *m, float *v) {
    const mt_plan *pl = u->pl;
    size_t split = pl->offload_split;  // (offload.ratio < 1: the backend's AdamW keeps [0, split), the store the rest)
    mt_err err = MT_OK;
    if (u->opt) mt_optimizer_get_master(u->opt, dst + pl->shard_lo);
    if (u->opt && u->ofl && m) mt_optimizer_get_moments(u->opt, m, v);
    if (u->ofl)
        err = mt_offload_read_state(u->ofl, dst + pl->shard_lo + split, m ? m + split : NULL, v ? v + split : NULL);
    if (sharded(u)) mt_dist_share_shards_host(u->dist, dst, pl->trained_total);
    return err;
}

mt_err mt_updater_get_trained(mt_updater *u, float *dst, float *packed) {
    if ((u->ofl && !u->plan.packed) || u->opt) return read_master(u, dst, NULL, NULL);
    float *own = NULL;
    mt_err err = MT_OK;
    if (u->ofl) {
        size_t count = u->plan.count;
        if (!packed && (err = mt_state_copy_alloc(count, 1, &own))) return err;
        err = packed ? mt_offload_read_state(u->ofl, packed, packed + count, packed + 2 * count)
                     : mt_offload_read_state(u->ofl, own, NULL, NULL);
    }
    mt_model_get_trainable(u->model, dst);  // after the offloaded updates' copies (read_state waits for them)
    if (u->ofl && !err) mt_offload_plan_scatter(&u->plan, packed ? packed : own, dst);
    // GaLore under ZeRO: the store held only this rank's parameters' master
    if (u->ofl && sharded(u) && u->gbounds) mt_dist_share_ranges_host(u->dist, dst, u->gbounds);
    free(own);
    return err;
}

int mt_updater_state_streams(const mt_updater *u, size_t *copy_bytes, size_t *snapshot_bytes) {
    const mt_plan *pl = u->pl;
    int delayed = u->ofl && u->cfg->offload_delay;
    size_t total = pl->trained_total, n = pl->shard_hi - pl->shard_lo;
    *copy_bytes = u->ofl && !u->plan.packed ? (total + 2 * n + (delayed ? total : 0)) * sizeof(float) : 0;
    int streams = u->ofl && !u->plan.packed && !u->gal && !u->opt && !pl->lora && !sharded(u) && n == total;
    *snapshot_bytes = streams ? mt_offload_snapshot_bytes(u->ofl) : 0;
    return streams;
}

// A checkpoint's reads of the store (mt_f32_source's, ctx a window_array):
// a window of it, read in one store pass, serves the chunks the writer asks
// for; the master alone (the model file), or both moments (state.h5, whose
// writer takes a chunk of each in turn).
enum { kStoreWindow = 2 << 20 };  // values: no fewer than the writer's chunk
typedef struct {
    mt_offload *o;
    mt_store *snapshot;    // read instead of o's store where set
    size_t total, lo, hi;  // the window [lo, hi) holds
    int moments;           // 0: the master, 1: m and v
    float *win;            // master or m (kStoreWindow), then v (kStoreWindow)
} store_window;
typedef struct {
    store_window *w;
    int array;  // 0 master, 1 m, 2 v
} window_array;
struct mt_state_reader {
    store_window w;
    window_array arrays[3];
};

static mt_err read_window(void *ctx, size_t offset, size_t count, float *dst) {
    window_array *a = ctx;
    store_window *w = a->w;
    int moments = a->array > 0;
    if (offset < w->lo || offset + count > w->hi || moments != w->moments) {
        size_t hi = w->total - offset < kStoreWindow ? w->total : offset + kStoreWindow;
        MT_CHECK(offset + count <= hi, "a read of %zu values past the window of %d", count, (int)kStoreWindow);
        w->lo = w->hi = 0;
        float *master = moments ? NULL : w->win, *m = moments ? w->win : NULL,
              *v = moments ? w->win + kStoreWindow : NULL;
        mt_err err = w->snapshot ? mt_store_read_range(w->snapshot, offset, hi, master, m, v)
                                 : mt_offload_read_range(w->o, offset, hi, master, m, v);
        if (err) return err;
        w->lo = offset, w->hi = hi, w->moments = moments;
    }
    memcpy(dst, w->win + (a->array == 2 ? kStoreWindow : 0) + (offset - w->lo), count * sizeof(float));
    return MT_OK;
}
// offload.delay's weights, as the model holds them (ctx the model).
static mt_err read_weights_range(void *ctx, size_t offset, size_t count, float *dst) {
    return mt_model_get_trainable_range(ctx, offset, count, dst);
}

static int steps_taken(const mt_updater *u, long steps_done) {
    return u->opt   ? mt_optimizer_steps_taken(u->opt)
           : u->gal ? mt_galore_steps_taken(u->gal)
           : u->ofl ? mt_offload_steps_taken(u->ofl)
                    : (int)steps_done;
}

mt_err mt_updater_read_state(mt_updater *u, long steps_done, mt_state_read how, mt_updater_state *s) {
    const mt_plan *pl = u->pl;
    *s = (mt_updater_state){0};
    float *master = *u->trained, *m = *u->moment_m, *v = *u->moment_v;
    mt_err err = MT_OK;
    int packed = u->ofl && u->plan.packed;
    int delayed = u->ofl && u->cfg->offload_delay;
    size_t copy_bytes, snapshot_bytes;
    int streams = mt_updater_state_streams(u, &copy_bytes, &snapshot_bytes);
    MT_CHECK(how == MT_STATE_COPY || (streams && (how == MT_STATE_STREAM || snapshot_bytes > 0)),
             "a checkpoint read of %s where there is none", how == MT_STATE_STREAM ? "the store" : "a snapshot");
    if (how != MT_STATE_COPY) {
        mt_state_reader *r = calloc(1, sizeof *r);
        float *win = malloc(2 * (size_t)kStoreWindow * sizeof *win);
        if (!r || !win) {
            free(r), free(win);
            return mt_errorf(MT_ERR_NOMEM, "out of host memory for the checkpoint's window of the store");
        }
        r->w = (store_window){u->ofl, NULL, pl->trained_total, 0, 0, 0, win};
        s->reader = r, s->streamed = 1;
        for (int j = 0; j < 3; j++) {
            r->arrays[j] = (window_array){&r->w, j};
            s->from[j] = (mt_f32_source){read_window, &r->arrays[j]};
        }
        s->optimizer_steps = steps_taken(u, steps_done);
        if (how == MT_STATE_SNAPSHOT) {  // (no delay: its weights would be read from the model as it trains)
            err = mt_offload_snapshot(u->ofl, &s->snapshot);
            r->w.snapshot = s->snapshot;
        } else {
            err = mt_offload_sync(u->ofl);  // every update in the store
        }
        if (err) return err;
        s->all = malloc((size_t)(4 * u->plan.n + 1) * sizeof *s->all);
        MT_CHECK(s->all != NULL, "checkpoint tensors");
        if (delayed) {  // and the weights one update behind, read from the model as they are written
            s->weights_from = (mt_f32_source){read_weights_range, u->model};
            s->all[s->n_extra++] = delayed_weights_tensor(pl->trained_total, NULL, &s->weights_from);
        }
        // int8 moments: each parameter's codes and block absmax as the store holds them (a quarter of fp32
        // moments' bytes), in place of exp_avg and exp_avg_sq
        const mt_store *st = s->snapshot ? s->snapshot : mt_offload_store(u->ofl);
        if (mt_offload_plan_codes(&u->plan, pl->trained, pl->n_trained, st, s->all, s->n_extra)) {
            s->n_extra += 4 * u->plan.n;
            s->from[1] = s->from[2] = (mt_f32_source){NULL, NULL};
        }
        s->extra = s->all;
        return MT_OK;
    }
    if (u->ofl && !packed) {
        // the whole master (ZeRO: every rank's shard of it), this rank's moments; with offload.delay the
        // weights as the model holds them too (one update behind the master)
        size_t n = pl->shard_hi - pl->shard_lo, total = pl->trained_total;
        if ((err = mt_state_copy_alloc(total + 2 * n + (delayed ? total : 0), 1, &s->copy))) return err;
        master = s->copy, m = s->copy + total, v = m + n;
        err = read_master(u, master, m, v);
        if (!err && delayed) {
            mt_model_get_trainable(u->model, v + n);
            s->all = malloc(sizeof *s->all);
            MT_CHECK(s->all != NULL, "checkpoint tensors");
            s->all[0] = delayed_weights_tensor(total, v + n, NULL);
        }
    } else if (!master && !packed) {  // no lasting host copy (MeZO read its weights a layer at a time): one now
        if ((err = mt_state_copy_alloc(pl->trained_total, 1, &s->copy))) return err;
        master = s->copy;
        err = mt_updater_get_trained(u, master, NULL);
    } else {
        if (packed && (err = mt_state_copy_alloc(u->plan.count, 3, &s->copy))) return err;
        err = mt_updater_get_trained(u, master, s->copy);
        if (u->opt) mt_optimizer_get_moments(u->opt, m, v);
    }
    mt_state_tensor *extra = NULL;
    int n_extra = 0;
    if (u->gal) {
        n_extra = mt_galore_state(u->gal, &extra);
        mt_galore_state_download(u->gal);
    }
    if (packed) {
        // GaLore's tensors, then those of the offloaded parameters
        size_t count = u->plan.count;
        mt_state_tensor *mine =
            mt_offload_plan_moments(&u->plan, pl->trained, pl->n_trained, s->copy + count, s->copy + 2 * count);
        s->all = malloc((size_t)(n_extra + 2 * u->plan.n + 1) * sizeof *s->all);
        MT_CHECK(s->all != NULL, "checkpoint tensors");
        memcpy(s->all, extra, (size_t)n_extra * sizeof *s->all);
        memcpy(s->all + n_extra, mine, (size_t)(2 * u->plan.n) * sizeof *s->all);
        free(mine);
        extra = s->all, n_extra += 2 * u->plan.n;
    }
    if (delayed && !packed && s->all) extra = s->all, n_extra = 1;
    s->master = master, s->m = m, s->v = v, s->extra = extra, s->n_extra = n_extra;
    s->optimizer_steps = steps_taken(u, steps_done);
    return err;
}

void mt_updater_state_free(mt_updater_state *s) {
    free(s->all);
    free(s->copy);
    if (s->reader) free(s->reader->w.win);
    free(s->reader);
    mt_store_close(s->snapshot);
    *s = (mt_updater_state){0};
}

void mt_updater_free(mt_updater *u) {
    free(u->gparams);
    free(u->gowner);
    free(u->gbounds);
    mt_galore_free(u->gal);
    mt_mezo_free(u->mz);
    mt_optimizer_free(u->opt);
    mt_offload_free(u->ofl);
    mt_offload_plan_free(&u->plan);
    mt_free((void **)&u->shard_grads);
    mt_free((void **)&u->resident_grads);
    u->gparams = NULL, u->gowner = NULL, u->gbounds = NULL, u->gal = NULL, u->mz = NULL, u->opt = NULL;
    u->ofl = NULL;
}
