// trainer/train.c: the training loop (train.h).
#define _POSIX_C_SOURCE 200809L
#include "trainer/train.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "datasets/dataset.h"
#include "kernels/device.h"
#include "kernels/mem.h"
#include "kernels/rng.h"
#include "offload/offload.h"
#include "optim/galore.h"
#include "optim/mezo.h"
#include "optim/optimizer.h"
#include "optim/schedule.h"
#include "trainer/checkpoint.h"
#include "trainer/dist.h"
#include "trainer/fsutil.h"
#include "trainer/hf.h"
#include "trainer/lora.h"
#include "trainer/metrics.h"
#include "trainer/model.h"
#include "trainer/plan.h"
#include "trainer/route.h"
#include "trainer/state.h"

#define MT_VERSION "0.1.0"

static size_t peak_bytes(mt_backend *be) {
    mt_mem_tally t;
    mt_mem_get_tally(be->gpu ? MT_DEVICE : MT_HOST, &t);
    return t.peak_total;
}

typedef struct {
    int32_t *inputs, *targets;
    int *valid;
} batch_set;

static mt_err evaluate(mt_model *model, mt_loader *eval, int batches, int B, int T, double *loss) {
    mt_loader_set_cursor(eval, (mt_cursor){0, 0});  // the same batches every time
    int32_t *inputs = malloc((size_t)B * T * 4), *targets = malloc((size_t)B * T * 4);
    double sum = 0.0;
    long count = 0;
    mt_err err = MT_OK;
    for (int i = 0; i < batches && !err; i++) {
        int valid;
        if ((err = mt_loader_next(eval, inputs, targets, &valid))) break;
        sum += mt_model_step(model, inputs, targets, 0.0f, 0);
        count += valid;
    }
    free(inputs);
    free(targets);
    *loss = count ? sum / (double)count : NAN;
    return err;
}

// SIGINT/SIGTERM: the first asks the loop to finish its step, write a
// checkpoint and exit cleanly; a second one exits at once (the newest
// complete checkpoint is untouched: checkpoints are published by rename).
static volatile sig_atomic_t stop_signal;

static void on_stop_signal(int sig) {
    if (stop_signal) _exit(128 + sig);
    stop_signal = sig;
    static const char msg[] =
        "\nmemtune: stopping after this step (a checkpoint will be written); "
        "signal again to exit at once\n";
    ssize_t ignored = write(STDERR_FILENO, msg, sizeof msg - 1);
    (void)ignored;
}

// MeZO's loss callback: the step's micro-batches under the perturbation
// (seed, scale), as the mean over all their targets.
typedef struct {
    mt_model *model;
    const batch_set *batch;
    int accum, B, T;
    long valid_total;  // this rank's
    mt_dist *dist;
} mezo_batch;

static double mezo_batch_loss(void *ctx, uint64_t seed, float scale) {
    mezo_batch *b = ctx;
    mt_model_set_perturbation(b->model, seed, scale);
    double sum = 0.0;
    for (int a = 0; a < b->accum; a++) {
        size_t at = (size_t)a * b->B * b->T;
        sum += mt_model_step(b->model, b->batch->inputs + at, b->batch->targets + at, 0.0f, 0);
    }
    mt_model_set_perturbation(b->model, 0, 0.0f);
    // data parallelism: the mean over every rank's targets, two scalars a call
    double both[2] = {sum, (double)b->valid_total};
    mt_dist_sum_host(b->dist, both, 2);
    return both[1] > 0 ? both[0] / both[1] : NAN;
}

static void defer_to_model(void *model, const mt_zo_directions *d, float lr, float weight_decay, uint64_t round_seed) {
    mt_model_defer_update(model, d, lr, weight_decay, round_seed);
}

// Everything a run holds, from the plan to the saved result; each phase of
// mt_train fills in its part and run_free releases whatever was made.
typedef struct {
    const mt_config *cfg;
    mt_train_result *result;
    int B, T, accum;
    mt_model_config mc;
    mt_plan pl;
    int planned;
    mt_dataset *ds;
    mt_dist *dist;
    mt_loader *train, *eval;
    int rank, world;
    // the hooks the model calls (route.h) and the options that install them
    mt_model_options opts;
    mt_dp_hook dp;
    mt_zero2_hook zhook;
    mt_galore_hook hook;
    mt_offload_hook ohook;
    // host copies: the base's fp32 values (until on the backend), the
    // trained values (the adapters', or the base's), AdamW's moments
    float *host_params, *trained, *moment_m, *moment_v;
    int random_init;
    char resume_dir[1200];
    mt_checkpoint_meta resume;
    mt_backend be;
    int backend_ready;
    char devname[256];
    mt_model *model;
    mt_trainable tr;
    // what updates the trained block
    mt_optimizer *opt;
    mt_mezo *mz;
    mt_galore *gal;
    mt_galore_param *gparams;
    mt_offload *ofl;
    mt_offload_plan plan;
    int offload_threads;  // the CPU AdamW's (offload.threads, or mt_offload_auto_threads)
    int *gowner;          // GaLore under ZeRO: each parameter's rank
    size_t *gbounds;      // and each rank's run of the block (mt_route_galore_owners)
    float *shard_grads;   // ZeRO-2's sums of this rank's shard
    float *opt_grads;     // what AdamW reads: the block's shard, or ZeRO-2's sums
    size_t selected_count, projected_count;
    mt_metrics *metrics;
    mt_run_state ckpt;
} run;

// The data, the ranks, the plan, and the hooks the plan asks for.
static mt_err open_run(run *r) {
    const mt_config *cfg = r->cfg;
    mt_err err;
    if ((err = mt_hf_read_config(cfg->model_path, &r->mc))) return err;
    if ((err = mt_dataset_open(&r->ds, cfg->data_train, r->mc.V))) return err;
    // data parallelism: this process's rank (world 1 without a launcher)
    if ((err = mt_dist_init(&r->dist))) return err;
    r->rank = mt_dist_rank(r->dist), r->world = mt_dist_world(r->dist);
    r->result->rank = r->rank;
    // each rank its share of the training windows; every rank the same eval
    mt_loader_config lc = {r->B, r->T, (uint64_t)cfg->train_seed, r->rank, r->world, cfg->data_eval_fraction};
    mt_loader_config ec = {r->B, r->T, (uint64_t)cfg->train_seed, 0, 1, cfg->data_eval_fraction};
    if ((err = mt_loader_init(&r->train, r->ds, &lc, MT_SPLIT_TRAIN))) return err;
    if (cfg->data_eval_fraction > 0 && cfg->train_eval_batches > 0 &&
        (err = mt_loader_init(&r->eval, r->ds, &ec, MT_SPLIT_EVAL)))
        return err;
    if ((err = mt_plan_make(&r->pl, cfg, &r->mc, r->dist, mt_device_count()))) return err;
    r->planned = 1;
    const mt_plan *pl = &r->pl;
    mt_model_options *o = &r->opts;
    *o = (mt_model_options){.B = r->B,
                            .T = r->T,
                            .activation_checkpointing = (int)cfg->model_activation_checkpointing,
                            .lora = pl->lora_cfg,
                            .quantize_nf4 = !strcmp(cfg->model_quantize, "nf4"),
                            .offload_activations = (int)cfg->model_offload_activations,
                            .forward_only = pl->mezo};
    r->ohook = (mt_offload_hook){&r->ofl, r->dist, pl->trained, 0, NULL, NULL, NULL, NULL, 0, 0};
    r->dp.dist = r->dist, r->dp.zero_stage = pl->zero;
    if (pl->galore) o->grad_ready = mt_route_galore_grad_ready, o->grad_ready_ctx = &r->hook;
    if (pl->offload_streamed && !pl->galore && !pl->zero2_streamed)
        o->grad_ready = mt_route_offload_grad_ready, o->grad_ready_ctx = &r->ohook;
    // (streamed gradients, GaLore's and offload's, are reduced as each is handed over)
    if (r->world > 1 && !o->grad_ready) o->grads_done = mt_route_dp_grads_done, o->grads_done_ctx = &r->dp;
    if (pl->zero2_streamed) {
        o->grad_ready = mt_route_zero2_grad_ready, o->grad_ready_ctx = &r->zhook;
        o->grads_done = mt_route_zero2_grads_done, o->grads_done_ctx = &r->zhook;
    }
    if (pl->offload) o->weights_needed = mt_route_offload_weights_needed, o->weights_needed_ctx = &r->ohook;
    // each forward unit's range of the trained block, for the gradient reduction
    mt_dp_hook *dp = &r->dp;
    dp->units = r->mc.L + 2;
    dp->lo = calloc((size_t)dp->units, sizeof *dp->lo);
    dp->hi = calloc((size_t)dp->units, sizeof *dp->hi);
    MT_CHECK(dp->lo && dp->hi, "unit ranges");
    for (int i = 0; i < pl->n_trained; i++) {
        int u = mt_param_forward_unit(pl->trained[i].name, r->mc.L);
        size_t a = pl->trained[i].offset, b = a + pl->trained[i].count;
        if (dp->lo[u] == dp->hi[u] || a < dp->lo[u]) dp->lo[u] = a;
        if (b > dp->hi[u]) dp->hi[u] = b;
    }
    return MT_OK;
}

// The values to start from, on the host: the base model's (loaded or
// random), the adapters' (lora.init or PEFT's initialisation), and a
// checkpoint's when resuming.
static mt_err load_values(run *r) {
    const mt_config *cfg = r->cfg;
    const mt_plan *pl = &r->pl;
    const mt_lora_config *lora = pl->lora ? &pl->lora_cfg : NULL;
    mt_err err;
    r->host_params = calloc(pl->total, sizeof(float));
    r->trained = lora ? calloc(pl->trained_total ? pl->trained_total : 1, sizeof(float)) : r->host_params;
    if (!r->host_params || !r->trained)
        return mt_errorf(MT_ERR_NOMEM, "out of host memory for the %.2fM parameters' fp32 copy (%.1f GiB)",
                         pl->total / 1e6, pl->total * 4.0 / 1073741824.0);
    if (lora && cfg->lora_init[0]) {
        if ((err = mt_lora_load(cfg->lora_init, &r->mc, lora, r->trained))) return err;
    } else if (lora) {
        mt_lora_init_params(pl->trained, pl->n_trained, r->trained, (uint64_t)cfg->train_seed);
    }
    r->random_init = !strcmp(cfg->model_init, "random");
    if (r->random_init)
        mt_model_init_random(&r->mc, r->host_params, (uint64_t)cfg->train_seed);
    else if ((err = mt_hf_load_weights(cfg->model_path, &r->mc, r->host_params)))
        return err;
    if ((err = mt_make_dirs(cfg->output_dir))) return err;
    if (!strcmp(cfg->train_resume, "auto"))
        mt_checkpoint_find_latest(cfg->output_dir, r->resume_dir, sizeof r->resume_dir);
    else if (cfg->train_resume[0])
        snprintf(r->resume_dir, sizeof r->resume_dir, "%s", cfg->train_resume);
    // AdamW's moments' host copies for checkpoints, of this rank's shard (MeZO
    // has none, GaLore its own); with offload the moments live in the store:
    // host copies only to resume
    int host_moments = !pl->mezo && !pl->galore && (!pl->offload || r->resume_dir[0]);
    size_t n_moments = pl->shard_hi - pl->shard_lo;
    if (host_moments) {
        r->moment_m = malloc((n_moments ? n_moments : 1) * sizeof(float));
        r->moment_v = malloc((n_moments ? n_moments : 1) * sizeof(float));
    }
    if (host_moments && (!r->moment_m || !r->moment_v))
        return mt_errorf(MT_ERR_NOMEM, "out of host memory for the optimizer state's checkpoint copies (%.1f GiB)",
                         n_moments * 8.0 / 1073741824.0);
    if (!r->resume_dir[0]) return MT_OK;
    if ((err = mt_checkpoint_read(r->resume_dir, &r->mc, lora, r->trained, pl->shard_lo, pl->shard_hi, r->moment_m,
                                  r->moment_v, &r->resume)))
        return err;
    if (r->resume.config_hash != mt_config_training_hash(cfg))
        return mt_errorf(MT_ERR_CONFIG,
                         "%s was written by a run with a different configuration (model, data, train or optim "
                         "keys differ; see its run's config.yaml). Resume with the same settings, or start fresh "
                         "with --set train.resume= (empty) and another output.dir.",
                         r->resume_dir);
    if (r->resume.step >= cfg->train_steps)
        return mt_errorf(MT_ERR_CONFIG, "%s is at step %ld, and train.steps is %ld: nothing left to train",
                         r->resume_dir, r->resume.step, cfg->train_steps);
    mt_loader_set_cursor(r->train, (mt_cursor){r->resume.data_epoch, r->resume.data_batch});
    return MT_OK;
}

// The backend, the connection between ranks, and the model with its values.
static mt_err build_model(run *r) {
    const mt_config *cfg = r->cfg;
    mt_err err;
    if ((err = mt_backend_init(&r->be, r->pl.use_gpu ? mt_dist_local_rank(r->dist) : -1))) return err;
    r->backend_ready = 1;
    if ((err = mt_dist_connect(r->dist, &r->be, cfg->dist_timeout))) return err;
    if (r->world > 1 && (err = mt_dist_check_same(r->dist, mt_config_hash(cfg), "the configuration"))) return err;
    if (r->pl.use_gpu)
        mt_device_describe(r->devname, sizeof r->devname);
    else
        snprintf(r->devname, sizeof r->devname, "CPU (fp32 reference backend)");
    if ((err = mt_model_create_with(&r->model, &r->be, &r->mc, &r->opts))) return err;
    if (r->world > 1 && r->opts.grad_ready) mt_model_set_agreement(r->model, mt_route_any_rank, r->dist);
    if ((err = mt_model_set_weights(r->model, r->host_params))) return err;
    if (r->pl.lora) {
        mt_model_set_adapters(r->model, r->trained);
        free(r->host_params);  // the frozen base lives on the backend now
        r->host_params = NULL;
    }
    mt_model_trainable(r->model, &r->tr);
    return MT_OK;
}

// GaLore over the trained block: projected matrices, the rest AdamW (or the
// store's), each rank its own parameters under ZeRO.
static mt_err build_galore(run *r) {
    const mt_config *cfg = r->cfg;
    const mt_plan *pl = &r->pl;
    int n = pl->n_trained;
    r->gparams = calloc((size_t)(n ? n : 1), sizeof *r->gparams);
    MT_CHECK(r->gparams != NULL, "galore parameters");
    if (pl->zero) {  // each rank keeps and updates the state of its own parameters only
        r->gowner = malloc((size_t)(n ? n : 1) * sizeof *r->gowner);
        r->gbounds = malloc((size_t)(r->world + 1) * sizeof *r->gbounds);
        MT_CHECK(r->gowner && r->gbounds, "galore owners");
        mt_route_galore_owners(r->dist, pl->trained, n, pl->trained_total, r->gowner, r->gbounds);
    }
    for (int i = 0; i < n; i++) {
        const mt_param_info *p = &pl->trained[i];
        r->gparams[i] = (mt_galore_param){p->name,
                                          p->shape[0],
                                          p->ndim == 2 ? p->shape[1] : 0,
                                          p->decay,
                                          pl->selected[i],
                                          pl->offload && !pl->selected[i],
                                          r->gowner && r->gowner[i] != r->rank};
        if (pl->selected[i]) r->projected_count += p->count;
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
    mt_err err = mt_galore_init(&r->gal, &r->be, &gc, r->gparams, n);
    r->hook =
        (mt_galore_hook){r->gal, r->tr.weights, mt_act_size(&r->be), pl->trained, NULL, &r->ofl, r->dist, r->gowner};
    if (!err && r->resume_dir[0]) {
        mt_state_tensor *state;
        int n_state = mt_galore_state(r->gal, &state);
        err = mt_checkpoint_read_extra(r->resume_dir, state, n_state);
        if (!err) mt_galore_state_upload(r->gal, r->resume.optimizer_steps);
    }
    return err;
}

// AdamW's state in a store off the GPU (host memory or a file): with GaLore
// the parameters it does not project, packed; else the trained block (ZeRO:
// this rank's shard).
static mt_err build_offload(run *r) {
    const mt_config *cfg = r->cfg;
    const mt_plan *pl = &r->pl;
    int cores;
    r->offload_threads = mt_offload_auto_threads(pl->local_world, pl->use_gpu, &cores);
    if (cfg->offload_threads > 0)
        r->offload_threads = (int)cfg->offload_threads;
    else if (pl->use_gpu && cores < 4)
        mt_warn(
            "offload: this rank may run on %d core%s (its CPU affinity, or its share of the node's), so the "
            "CPU AdamW has %d thread%s and will hold the GPU back; with mpirun, start with --bind-to none, or "
            "--map-by slot:PE=N to give each rank N cores",
            cores, cores == 1 ? "" : "s", r->offload_threads, r->offload_threads == 1 ? "" : "s");
    // (GaLore under ZeRO: the unprojected ones of this rank's parameters)
    mt_offload_plan *plan = &r->plan;
    *plan = mt_offload_plan_make(pl->trained, pl->n_trained, r->gbounds ? r->gbounds[r->rank] : pl->shard_lo,
                                 r->gbounds ? r->gbounds[r->rank + 1] : pl->shard_hi, pl->galore ? pl->selected : NULL,
                                 r->mc.L);
    r->hook.offloaded = plan->index;
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
                            r->offload_threads,
                            cfg->offload_trace_step > 0 ? trace : NULL,
                            cfg->offload_trace_step,
                            r->mc.L,
                            r->rank,
                            r->world,
                            pl->offload_streamed ? r->accum : 1};
    int ranks = pl->zero && r->world > 1;
    mt_err err = MT_OK;
    if (plan->packed) {
        // GaLore's unprojected parameters: their master from the weights
        // (a checkpoint's are the offloaded fp32 values), moments from
        // the checkpoint's tensors
        float *packed = NULL;
        int moments = r->resume_dir[0] ? 3 : 1;
        err = mt_state_copy_alloc(plan->count, moments, &packed);
        if (!err) mt_offload_plan_gather(plan, r->trained, packed);
        if (!err && moments == 3) {
            mt_state_tensor *t = mt_offload_plan_moments(plan, pl->trained, pl->n_trained, packed + plan->count,
                                                         packed + 2 * plan->count);
            err = mt_checkpoint_read_extra(r->resume_dir, t, 2 * plan->n);
            free(t);
        }
        if (!err)
            err = mt_offload_init(&r->ofl, &r->be, &oc, plan->params, plan->n, plan->count, r->tr.weights, packed,
                                  moments == 3 ? packed + plan->count : NULL,
                                  moments == 3 ? packed + 2 * plan->count : NULL, r->resume.optimizer_steps);
        free(packed);
        if (!err && ranks) mt_offload_set_norm_sum(r->ofl, mt_route_sum_over_ranks, r->dist);
        return err;
    }
    // moment_m and moment_v exist only when resuming (resume.optimizer_steps is 0 otherwise)
    err = mt_offload_init(&r->ofl, &r->be, &oc, plan->params, plan->n, plan->count, r->tr.weights,
                          r->trained + pl->shard_lo, r->moment_m, r->moment_v, r->resume.optimizer_steps);
    if (!err && ranks) {
        mt_offload_hook *h = &r->ohook;
        mt_offload_set_norm_sum(r->ofl, mt_route_sum_over_ranks, r->dist);
        h->gather = 1, h->lo = r->dp.lo, h->hi = r->dp.hi, h->weights = r->tr.weights;
        h->total = pl->trained_total, h->elem = mt_act_size(&r->be);
        h->stale = calloc((size_t)r->dp.units, 1);
        MT_CHECK(h->stale != NULL, "offload units");
    }
    // the store holds the values now: the host copies go (at 7B they are 28 GB each)
    free(r->moment_m);
    free(r->moment_v);
    r->moment_m = r->moment_v = NULL;
    if (!pl->lora) {
        free(r->host_params);
        r->host_params = r->trained = NULL;
    }
    return err;
}

// What updates the trained block: GaLore, MeZO, AdamW on the backend, or
// AdamW with its state offloaded (alone or beside GaLore).
static mt_err build_updater(run *r) {
    const mt_config *cfg = r->cfg;
    const mt_plan *pl = &r->pl;
    int n = pl->n_trained, n_groups = 0;
    mt_param_group *groups = malloc((size_t)(n ? n : 1) * sizeof *groups);
    MT_CHECK(groups, "parameter groups");
    for (int i = 0; i < n; i++) {
        if (pl->mezo && !pl->selected[i]) continue;
        groups[n_groups++] = (mt_param_group){pl->trained[i].offset, pl->trained[i].count, pl->trained[i].decay};
        r->selected_count += pl->trained[i].count;
    }
    mt_err err = MT_OK;
    if (pl->galore) {
        err = build_galore(r);
    } else if (pl->mezo) {
        mt_mezo_config zc = {(float)cfg->mezo_eps, (int)cfg->mezo_samples, (float)cfg->optim_weight_decay,
                             (uint64_t)cfg->train_seed};
        err = mt_model_enable_perturbation(r->model, pl->selected);
        if (!err) err = mt_mezo_init(&r->mz, &r->be, &zc, r->tr.weights, groups, n_groups);
        // each update rides on the next forward's first read of each tensor
        if (!err) mt_mezo_defer_updates(r->mz, defer_to_model, r->model);
    }
    if (pl->zero2_streamed && !pl->offload_streamed && !err) {
        size_t count = pl->shard_hi - pl->shard_lo;
        err = mt_alloc((void **)&r->shard_grads, (count ? count : 1) * sizeof(float), MT_MEM_GRADS,
                       pl->use_gpu ? MT_DEVICE : MT_HOST);
        if (!err) mt_op_zero(&r->be, r->shard_grads, (count ? count : 1) * sizeof(float));  // alignment gaps stay 0
    }
    mt_zero2_hook *z = &r->zhook;
    z->dist = r->dist, z->be = &r->be, z->table = pl->trained, z->shard = r->shard_grads;
    z->lo = pl->shard_lo, z->hi = pl->shard_hi, z->total = pl->trained_total, z->first = 1;
    z->offload = &r->ofl, z->plan = &r->plan;
    if (pl->offload && !err) {
        err = build_offload(r);
    } else if (!pl->galore && !pl->mezo && !err) {
        mt_adamw_config ac = {(float)cfg->optim_lr,  (float)cfg->optim_beta1,        (float)cfg->optim_beta2,
                              (float)cfg->optim_eps, (float)cfg->optim_weight_decay, (float)cfg->optim_grad_clip};
        // ZeRO 1, 2: this rank's shard of the block, its groups clipped to it
        int n_shard = 0;
        for (int g = 0; g < n_groups; g++) {
            size_t a = groups[g].offset, b = a + groups[g].count;
            if (mt_range_clip(&a, &b, pl->shard_lo, pl->shard_hi))
                groups[n_shard++] = (mt_param_group){a - pl->shard_lo, b - a, groups[g].decay};
        }
        err = mt_optimizer_init(&r->opt, &r->be, &ac,
                                (float *)((char *)r->tr.weights + pl->shard_lo * mt_act_size(&r->be)),
                                r->trained + pl->shard_lo, pl->shard_hi - pl->shard_lo, groups, n_shard);
        if (!err && pl->zero && r->world > 1) mt_optimizer_set_norm_sum(r->opt, mt_route_sum_over_ranks, r->dist);
    }
    free(groups);
    if (err) return err;
    if (r->resume_dir[0] && r->opt)
        mt_optimizer_set_moments(r->opt, r->moment_m, r->moment_v, r->resume.optimizer_steps);
    r->dp.grads = r->tr.grads, r->dp.total = pl->trained_total, r->dp.shard_lo = pl->shard_lo;
    r->opt_grads = pl->zero2_streamed ? r->shard_grads : r->tr.grads + pl->shard_lo;
    r->ckpt = (mt_run_state){cfg,
                             &r->mc,
                             pl->lora ? &pl->lora_cfg : NULL,
                             r->opt,
                             r->gal,
                             r->ofl,
                             &r->plan,
                             pl->trained,
                             pl->n_trained,
                             r->model,
                             r->train,
                             r->trained,
                             r->moment_m,
                             r->moment_v,
                             pl->trained_total,
                             r->dist,
                             pl->zero > 0 && r->world > 1,
                             pl->shard_lo,
                             pl->shard_hi,
                             r->gbounds};
    return MT_OK;
}

// The run folder (rank 0's): config.yaml and the metrics.
static mt_err open_outputs(run *r) {
    const mt_config *cfg = r->cfg;
    mt_err err = MT_OK;
    if (r->rank == 0) {
        char path[1200];
        snprintf(path, sizeof path, "%s/config.yaml", cfg->output_dir);
        FILE *f = fopen(path, "w");
        if (f) mt_config_write_yaml(cfg, f);
        if (!f || fclose(f) != 0) err = mt_errorf(MT_ERR_IO, "%s: cannot write (%s)", path, strerror(errno));
    }
    mt_metrics_config mc = {cfg->output_dir, r->rank == 0,         cfg->train_steps,
                            r->resume.step,  cfg->train_log_every, r->eval ? cfg->train_eval_every : 0,
                            r->pl.mezo};
    if (!err) err = mt_metrics_open(&r->metrics, &mc);
    if (mt_dist_any(r->dist, err != MT_OK) && !err)
        err = mt_errorf(MT_ERR_IO, "rank 0 could not write to %s", cfg->output_dir);
    return err;
}

// The start-up lines: the run, the attention, the strategy, the data.
static void report(run *r) {
    const mt_config *cfg = r->cfg;
    const mt_plan *pl = &r->pl;
    const mt_lora_config *lora = pl->lora ? &pl->lora_cfg : NULL;
    size_t count = mt_model_num_params(r->model);
    mt_info("memtune %s | %s | %s %d layers, %.2fM params | B=%d T=%d accum=%d | %s", MT_VERSION, r->devname,
            r->mc.architecture, r->mc.L, count / 1e6, r->B, r->T, r->accum,
            r->random_init ? "random init" : cfg->model_path);
    char attention[256];
    mt_model_describe_attention(r->model, attention, sizeof attention);
    mt_info("attention: %s", attention);
    if (lora) {
        char targets[128];
        mt_lora_format_targets(lora->targets, targets, sizeof targets);
        size_t adapter_count = 0;
        for (int i = 0; i < pl->n_trained; i++) adapter_count += pl->trained[i].count;
        mt_info("LoRA r=%d alpha=%g dropout=%g%s on %s: %.2fM trainable (%.3f%% of the base)%s%s", lora->r, lora->alpha,
                lora->dropout, lora->rslora ? " rsLoRA" : "", targets, adapter_count / 1e6,
                100.0 * adapter_count / (double)count, cfg->lora_init[0] ? ", from " : "", cfg->lora_init);
        mt_info("base weights frozen%s: %.2f GiB on the %s, %.3f bytes per parameter",
                r->opts.quantize_nf4 ? " in NF4" : "", mt_model_base_weight_bytes(r->model) / 1073741824.0,
                pl->use_gpu ? "GPU" : "host", (double)mt_model_base_weight_bytes(r->model) / (double)count);
    }
    if (pl->mezo) {
        mt_info(
            "MeZO eps=%g samples=%d: %d of %d trainable tensors, %.2fM parameters (%s); no gradients or optimizer "
            "state, %.1f MiB perturbation scratch",
            cfg->mezo_eps, (int)cfg->mezo_samples, pl->n_selected, pl->n_trained, r->selected_count / 1e6,
            cfg->mezo_trainable, mt_model_perturbation_bytes(r->model) / 1048576.0);
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
            pl->n_selected, r->projected_count / 1e6, count / 1e6, pl->offload ? " with its state offloaded" : "",
            mt_galore_state_bytes(r->gal) / 1073741824.0, mt_model_streamed_grad_bytes(r->model) / 1048576.0,
            pl->offload ? " of the projected matrices" : "",
            pl->use_gpu ? "; bf16 weights updated with stochastic rounding" : "");
    if (pl->offload) {
        const mt_store *st = mt_offload_store(r->ofl);
        mt_info(
            "AdamW state offloaded to %s: %.2fM parameters%s, %.2f GiB (fp32 master, m, v)%s%s; CPU AdamW %s, %d "
            "thread%s; gradients %s, %.1f MiB of GPU staging; host memory %.2f GiB",
            !strcmp(cfg->offload_optimizer, "ssd") ? "SSD" : "host memory", r->plan.count / 1e6,
            r->plan.packed    ? (r->gbounds && r->world > 1 ? " (those GaLore does not project, of this rank's "
                                                              "parameters)"
                                                            : " (those GaLore does not project)")
            : r->ohook.gather ? " (this rank's shard)"
                              : "",
            r->plan.count * 12.0 / 1073741824.0, st && mt_store_path(st)[0] ? " in " : "", st ? mt_store_path(st) : "",
            mt_offload_cpu_path(r->ofl), r->offload_threads, r->offload_threads == 1 ? "" : "s",
            lora                    ? "sent after backward"
            : !pl->offload_streamed ? "summed over the micro-batches where computed, sent after backward"
            : r->accum > 1          ? "streamed per layer and summed on the host over the micro-batches"
                                    : "streamed per layer",
            mt_offload_device_bytes(r->ofl) / 1048576.0, mt_offload_host_bytes(r->ofl) / 1073741824.0);
        if (pl->host_need > 0.0 && !pl->host_sum)
            mt_info(
                "offload.grad_sum auto: summed in host memory, the gradients would bring this node's ranks to about "
                "%.1f GiB at the start, over 85%% of its %.1f GiB: the GPU sums them (4 bytes a parameter there; "
                "offload.grad_sum: host forces the host)",
                pl->host_need / 1073741824.0, pl->host_have / 1073741824.0);
        if (!strcmp(cfg->offload_optimizer, "ssd") && !mt_store_direct_io(st))
            mt_warn("%s does not take O_DIRECT (tmpfs?): the state goes through the page cache", cfg->offload_path);
    }
    mt_info("data %s: %llu tokens in %llu docs, %llu train batches/epoch", cfg->data_train,
            (unsigned long long)mt_dataset_num_tokens(r->ds), (unsigned long long)mt_dataset_num_docs(r->ds),
            (unsigned long long)mt_loader_batches_per_epoch(r->train));
    if (r->resume_dir[0]) mt_info("resuming from %s at step %ld", r->resume_dir, r->resume.step);
    if (r->world > 1)
        mt_info("data parallel: %d ranks (%s), %d on this node; %d x %d x %d tokens a step; ZeRO stage %d%s", r->world,
                mt_dist_launcher(r->dist), pl->local_world, r->world, r->accum, r->B * r->T, pl->zero,
                pl->zero ? " (each rank keeps 1/N of AdamW's state)" : "");
}

// After backward: the updates that wait for the whole step (AdamW, the
// store's, the sharing of ZeRO's and GaLore's owned parts), and the norm of
// the step's gradient in info. refresh_seconds: GaLore's projector refresh.
static mt_err finish_update(run *r, int step, float lr, mt_step_info *info, double *refresh_seconds) {
    const mt_plan *pl = &r->pl;
    if (pl->galore) mt_galore_end_step(r->gal, info);
    int matrices = 0;
    double seconds = pl->galore ? mt_galore_last_refresh_seconds(r->gal, &matrices) : 0.0;
    int share_owned = pl->galore && r->gowner && r->world > 1;
    if (share_owned) {
        // each rank updated (and refreshed) its own parameters: the
        // norm, the verdict and the count over all of them (the
        // seconds stay rank 0's); every rank gets the weights below
        double sum[3] = {info->grad_norm * info->grad_norm, !info->finite, matrices};
        mt_dist_sum_host(r->dist, sum, 3);
        *info = (mt_step_info){sqrt(sum[0]), sum[1] == 0};
        matrices = (int)sum[2];
    }
    mt_err err;
    if (r->ofl) {
        // adapters, or gradients summed over micro-batches: the whole block now, last layer first
        // (ZeRO: the sums of this rank's shard)
        if (!pl->offload_streamed)
            for (int k = r->plan.n - 1; k >= 0; k--)
                mt_offload_grad(r->ofl, k, r->opt_grads + (r->plan.params[k].offset - pl->shard_lo));
        mt_step_info off;
        if ((err = mt_offload_end_step(r->ofl, &off.grad_norm, &off.finite))) return err;
        if (r->ohook.gather) memset(r->ohook.stale, 1, (size_t)r->dp.units);
        // with GaLore, the norm over both parts
        *info = pl->galore ? (mt_step_info){hypot(info->grad_norm, off.grad_norm), info->finite && off.finite} : off;
        // GaLore under ZeRO: the store's updates of this rank's
        // unprojected parameters are in the weights before they are shared
        if (share_owned && (err = mt_offload_sync(r->ofl))) return err;
    }
    if (share_owned) {
        mt_dist_after_compute(r->dist);
        mt_dist_share_ranges(r->dist, r->tr.weights, r->gbounds, mt_act_size(&r->be));
        mt_dist_wait(r->dist);
    }
    if (r->opt) mt_optimizer_step(r->opt, r->opt_grads, lr, info);
    if (r->opt && pl->zero && info->finite) {
        // each rank updated its shard: every rank gets all of them
        mt_dist_after_compute(r->dist);
        mt_dist_share_shards(r->dist, r->tr.weights, 0, pl->trained_total, pl->trained_total, mt_act_size(&r->be));
        mt_dist_wait(r->dist);
    }
    if (pl->galore && matrices) {
        *refresh_seconds = seconds;
        mt_info("step %d: GaLore refreshed %d projectors in %.2fs (%s)", step + 1, matrices, seconds,
                r->cfg->galore_refresh);
    }
    return MT_OK;
}

// One step with gradients: forward and backward over the step's
// micro-batches (the loss their mean over every rank's targets), then the
// update. A non-finite loss skips the backward (nothing is applied).
static mt_err gradient_step(run *r, const batch_set *bs, long valid_total, int step, float lr, double *loss,
                            mt_step_info *info, double *refresh_seconds) {
    const mt_plan *pl = &r->pl;
    int B = r->B, T = r->T, accum = r->accum;
    // GaLore applies each parameter's update inside backward, as its
    // gradient completes (grad_accum is 1 then); AdamW steps after
    if (pl->galore) mt_galore_begin_step(r->gal, lr);
    if (r->ofl) mt_offload_begin_step(r->ofl, lr);
    // the loss is the mean over every rank's targets
    double valid_all = (double)valid_total;
    mt_dist_sum_host(r->dist, &valid_all, 1);
    float dscale = valid_all > 0 ? 1.0f / (float)valid_all : 0.0f;
    mt_model_zero_grads(r->model);
    double loss_sum = 0.0;
    // once a streamed backward is skipped (a non-finite loss, on any
    // rank) the step is lost: the rest of its micro-batches only add
    // their losses (nothing more goes to the store, which would
    // otherwise update on the last one's gradients)
    int backward = 1;
    for (int a = 0; a < accum; a++) {
        // dropout masks: a fresh draw per micro-batch (and rank), the same after a resume
        mt_model_set_dropout_seed(
            r->model, mt_rng_bits((uint64_t)r->cfg->train_seed, ((uint64_t)step * accum + a) * r->world + r->rank));
        r->dp.active = a == accum - 1;  // the gradients are reduced in the last micro-batch's backward
        r->zhook.first = a == 0;
        if (a > 0 && backward && r->ofl && pl->offload_streamed) mt_offload_micro_batch(r->ofl, a);
        loss_sum +=
            mt_model_step(r->model, bs->inputs + (size_t)a * B * T, bs->targets + (size_t)a * B * T, dscale, backward);
        if (mt_model_backward_skipped(r->model)) backward = 0;
        if (pl->zero2_streamed) mt_dist_wait(r->dist);  // the next micro-batch adds to the shard's sums
    }
    mt_dist_sum_host(r->dist, &loss_sum, 1);
    mt_dist_wait(r->dist);  // what follows reads the reduced gradients
    *loss = valid_all > 0 ? loss_sum / valid_all : NAN;
    if (isfinite(*loss)) return finish_update(r, step, lr, info, refresh_seconds);
    // the backward was skipped: nothing was applied
    if (pl->galore) mt_galore_cancel_step(r->gal);
    if (r->ofl) mt_offload_cancel_step(r->ofl);
    return MT_OK;
}

// The steps from the resume point: each its micro-batches, its update, and
// then the checks, eval, metrics, stop and checkpoints. *stopped: by a signal
// or train.stop_after, with a checkpoint.
static mt_err train_steps(run *r, int *stopped) {
    const mt_config *cfg = r->cfg;
    mt_train_result *result = r->result;
    int B = r->B, T = r->T, accum = r->accum;
    mt_schedule sched = {!strcmp(cfg->optim_schedule, "linear")     ? MT_SCHEDULE_LINEAR
                         : !strcmp(cfg->optim_schedule, "constant") ? MT_SCHEDULE_CONSTANT
                                                                    : MT_SCHEDULE_COSINE,
                         (float)cfg->optim_lr, (float)cfg->optim_min_lr_ratio, (int)cfg->optim_warmup_steps,
                         (int)cfg->train_steps};
    batch_set bs = {malloc((size_t)accum * B * T * 4), malloc((size_t)accum * B * T * 4),
                    malloc((size_t)accum * sizeof(int))};
    MT_CHECK(bs.inputs && bs.targets && bs.valid, "batches");
    int skipped = 0;
    mt_err err = MT_OK;
    for (int step = (int)r->resume.step; step < cfg->train_steps && !err; step++) {
        // all micro-batches first: the loss is the mean over all their targets
        long valid_total = 0;
        for (int a = 0; a < accum && !err; a++) {
            err = mt_loader_next(r->train, bs.inputs + (size_t)a * B * T, bs.targets + (size_t)a * B * T, &bs.valid[a]);
            valid_total += bs.valid[a];
        }
        if (err) break;
        float lr = mt_schedule_lr(&sched, step);
        double loss, refresh_seconds = NAN;
        // a non-finite loss or gradient stops the run before any update is applied
        mt_step_info info = {NAN, 0};
        if (r->pl.mezo) {
            mezo_batch mb = {r->model, &bs, accum, B, T, valid_total, r->dist};
            double pair_losses[2 * MT_ZO_MAX_DIRECTIONS];
            mt_mezo_losses(r->mz, step, mezo_batch_loss, &mb, pair_losses);
            mt_mezo_info zi;
            mt_mezo_update(r->mz, step, pair_losses, lr, &zi);
            loss = zi.loss;
            info = (mt_step_info){zi.projected_grad_rms, zi.finite};
        } else if ((err = gradient_step(r, &bs, valid_total, step, lr, &loss, &info, &refresh_seconds))) {
            break;
        }
        if ((!isfinite(loss) || !info.finite) && !strcmp(cfg->train_on_nonfinite, "skip")) {
            mt_warn("step %d: loss %g, gradient norm %g: update skipped (train.on_nonfinite: skip)", step + 1, loss,
                    info.grad_norm);
            skipped++;
            continue;
        }
        if (!isfinite(loss) || !info.finite) {
            err = mt_errorf(MT_ERR_NONFINITE,
                            "step %d: loss %g, gradient norm %g; the update was not applied. Lower optim.lr or raise "
                            "optim.warmup_steps, or set train.on_nonfinite: skip.",
                            step + 1, loss, info.grad_norm);
            // the last good state, with the data cursor past the batch that failed
            if (step > (int)r->resume.step) {
                mt_err ckerr = mt_run_state_save(&r->ckpt, step);
                if (ckerr) err = ckerr;
            }
            break;
        }
        if (step == (int)r->resume.step) result->first_loss = loss;
        result->last_loss = loss;
        result->steps_done = step + 1;
        mt_dist_heartbeat(r->dist);
        double eval_loss = NAN;
        int last = step + 1 == cfg->train_steps;
        if (r->eval && ((cfg->train_eval_every > 0 && (step + 1) % cfg->train_eval_every == 0) || last)) {
            if ((err = evaluate(r->model, r->eval, (int)cfg->train_eval_batches, B, T, &eval_loss))) break;
            result->last_eval_loss = eval_loss;
        }
        mt_step_record rec = {step,
                              loss,
                              eval_loss,
                              lr,
                              info.grad_norm,
                              (long)accum * B * T * r->world,
                              refresh_seconds,
                              peak_bytes(&r->be)};
        double tps = mt_metrics_step(r->metrics, &rec);
        if (isfinite(tps)) result->tokens_per_second = tps;
        int run_steps = step + 1 - (int)r->resume.step;
        // every rank stops at the same step
        int stop_now =
            mt_dist_any(r->dist, stop_signal) || (cfg->train_stop_after > 0 && run_steps >= cfg->train_stop_after);
        if (stop_now && !last) {
            if ((err = mt_run_state_save(&r->ckpt, step + 1))) break;
            mt_info("stopped after step %d (%s). Resume with: memtune train CONFIG --set train.resume=auto", step + 1,
                    stop_signal ? "signal" : "train.stop_after");
            *stopped = 1;
            break;
        }
        if ((last && cfg->checkpoint_final) || (cfg->checkpoint_every > 0 && (step + 1) % cfg->checkpoint_every == 0))
            if ((err = mt_run_state_save(&r->ckpt, step + 1))) break;
    }
    if (skipped) mt_warn("%d step(s) skipped for non-finite values", skipped);
    free(bs.inputs);
    free(bs.targets);
    free(bs.valid);
    return err;
}

// The trained result: the adapter (PEFT's layout) or the model (Hugging
// Face's).
static mt_err save_outputs(run *r) {
    const mt_config *cfg = r->cfg;
    const mt_plan *pl = &r->pl;
    char path[1200];
    mt_err err = MT_OK;
    if (pl->lora) {
        err = mt_run_state_get_trained(&r->ckpt, r->trained, NULL);
        snprintf(path, sizeof path, "%s/adapter", cfg->output_dir);
        if (!err && r->rank == 0)
            err = mt_lora_save(path, &pl->lora_cfg, cfg->model_path, pl->trained, pl->n_trained, r->trained);
        if (!err)
            mt_info("saved %s (PEFT layout; merge with: memtune merge --model %s --adapter %s -o MERGED)", path,
                    cfg->model_path, path);
        return err;
    }
    if (!r->host_params) err = mt_state_copy_alloc(pl->total, 1, &r->host_params);
    if (!err) err = mt_run_state_get_trained(&r->ckpt, r->host_params, NULL);
    mt_dtype dtype = !strcmp(cfg->output_save_dtype, "F32")    ? MT_DTYPE_F32
                     : !strcmp(cfg->output_save_dtype, "BF16") ? MT_DTYPE_BF16
                     : r->random_init                          ? MT_DTYPE_F32
                                                               : r->mc.dtype;
    snprintf(path, sizeof path, "%s/model", cfg->output_dir);
    if (!err && r->rank == 0) err = mt_hf_save(path, cfg->model_path, &r->mc, r->host_params, dtype);
    if (!err) mt_info("saved %s (%s, Hugging Face layout)", path, mt_dtype_name(dtype));
    return err;
}

static void run_free(run *r) {
    mt_metrics_close(r->metrics, r->result->steps_done);
    free(r->gparams);
    free(r->gowner);
    free(r->gbounds);
    mt_galore_free(r->gal);
    mt_mezo_free(r->mz);
    mt_optimizer_free(r->opt);
    mt_offload_free(r->ofl);
    mt_offload_plan_free(&r->plan);
    mt_free((void **)&r->shard_grads);
    free(r->ohook.stale);
    mt_model_free(r->model);
    if (r->backend_ready) mt_backend_free(&r->be);
    free(r->moment_m);
    free(r->moment_v);
    if (r->trained != r->host_params) free(r->trained);
    free(r->host_params);
    if (r->planned) mt_plan_free(&r->pl);
    free(r->dp.lo);
    free(r->dp.hi);
    mt_dist_free(r->dist);
    mt_loader_free(r->train);
    mt_loader_free(r->eval);
    mt_dataset_free(r->ds);
}

mt_err mt_train(const mt_config *cfg, mt_train_result *result) {
    memset(result, 0, sizeof *result);
    result->last_eval_loss = NAN;
    mt_err err = mt_config_validate(cfg);
    if (err) return err;
    run r = {.cfg = cfg, .result = result};
    r.B = (int)cfg->train_micro_batch, r.T = (int)cfg->train_seq_len, r.accum = (int)cfg->train_grad_accum;
    // everything checked before the first device allocation
    err = open_run(&r);
    if (!err) err = load_values(&r);
    // backend, model, optimizer, run folder
    if (!err) err = build_model(&r);
    if (!err) err = build_updater(&r);
    if (!err) err = open_outputs(&r);
    int stopped = 0;
    if (!err) {
        report(&r);
        stop_signal = 0;
        struct sigaction action = {0}, old_int, old_term;
        action.sa_handler = on_stop_signal;
        sigemptyset(&action.sa_mask);
        sigaction(SIGINT, &action, &old_int);
        sigaction(SIGTERM, &action, &old_term);
        err = train_steps(&r, &stopped);
        sigaction(SIGINT, &old_int, NULL);
        sigaction(SIGTERM, &old_term, NULL);
        result->stopped_early = stopped;
        mt_metrics_close(r.metrics, result->steps_done);
        r.metrics = NULL;
    }
    if (!err) {
        char memory[1024];
        mt_mem_format(r.pl.use_gpu ? MT_DEVICE : MT_HOST, memory, sizeof memory);
        mt_info("memory (%s): %s", r.pl.use_gpu ? "GPU" : "host", memory);
    }
    if (!err && !stopped && cfg->output_save_model) err = save_outputs(&r);
    run_free(&r);
    return err;
}
