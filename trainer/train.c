// trainer/train.c: the training loop (train.h).
#define _POSIX_C_SOURCE 200809L
#include "trainer/train.h"

#include <errno.h>
#include <fnmatch.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
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

mt_err mt_train(const mt_config *cfg, mt_train_result *result) {
    memset(result, 0, sizeof *result);
    result->last_eval_loss = NAN;
    mt_err err = mt_config_validate(cfg);
    if (err) return err;
    int B = (int)cfg->train_micro_batch, T = (int)cfg->train_seq_len, accum = (int)cfg->train_grad_accum;

    // ---- everything checked before the first device allocation
    mt_model_config mc;
    if ((err = mt_hf_read_config(cfg->model_path, &mc))) return err;
    mt_dataset *ds = NULL;
    if ((err = mt_dataset_open(&ds, cfg->data_train, mc.V))) return err;
    // data parallelism: this process's rank (world 1 without a launcher)
    mt_dist *dist = NULL;
    mt_loader *train = NULL, *eval = NULL;
    mt_dp_hook dp = {0};  // (before the first goto: out_data frees its ranges)
    if ((err = mt_dist_init(&dist))) goto out_data;
    // ZeRO with one process changes only the code path (tests compare it)
    int rank = mt_dist_rank(dist), world = mt_dist_world(dist), zero = (int)cfg->dist_zero_stage;
    result->rank = rank;
    // each rank its share of the training windows; every rank the same eval
    mt_loader_config lc = {B, T, (uint64_t)cfg->train_seed, rank, world, cfg->data_eval_fraction};
    mt_loader_config ec = {B, T, (uint64_t)cfg->train_seed, 0, 1, cfg->data_eval_fraction};
    if ((err = mt_loader_init(&train, ds, &lc, MT_SPLIT_TRAIN))) goto out_data;
    if (cfg->data_eval_fraction > 0 && cfg->train_eval_batches > 0 &&
        (err = mt_loader_init(&eval, ds, &ec, MT_SPLIT_EVAL)))
        goto out_data;
    mt_plan pl;
    int ngpu = mt_device_count();
    if ((err = mt_plan_make(&pl, cfg, &mc, dist, ngpu))) goto out_data;
    int mezo = pl.mezo, galore = pl.galore, offload = pl.offload, zero2_streamed = pl.zero2_streamed;
    int offload_streamed = pl.offload_streamed, use_gpu = pl.use_gpu;
    const mt_lora_config *lora = pl.lora ? &pl.lora_cfg : NULL;
    mt_param_info *trained_table = pl.trained;
    int n_trained = pl.n_trained;
    size_t total = pl.total, trained_total = pl.trained_total, shard_lo = pl.shard_lo, shard_hi = pl.shard_hi;
    unsigned char *selected = pl.selected;
    mt_model_options opts = {B,
                             T,
                             (int)cfg->model_activation_checkpointing,
                             pl.lora_cfg,
                             !strcmp(cfg->model_quantize, "nf4"),
                             (int)cfg->model_offload_activations,
                             mezo,
                             NULL,
                             NULL,
                             NULL,
                             NULL,
                             NULL,
                             NULL};
    mt_galore_hook hook = {0};
    mt_offload *ofl = NULL;
    mt_offload_hook ohook = {&ofl, dist, trained_table, 0, NULL, NULL, NULL, NULL, 0, 0};
    mt_offload_plan plan = {0};
    dp.dist = dist, dp.zero_stage = zero;
    mt_zero2_hook zhook = {0};
    float *shard_grads = NULL;
    if (galore) opts.grad_ready = mt_route_galore_grad_ready, opts.grad_ready_ctx = &hook;
    if (offload_streamed && !galore && !zero2_streamed)
        opts.grad_ready = mt_route_offload_grad_ready, opts.grad_ready_ctx = &ohook;
    // (streamed gradients, GaLore's and offload's, are reduced as each is handed over)
    if (world > 1 && !opts.grad_ready) opts.grads_done = mt_route_dp_grads_done, opts.grads_done_ctx = &dp;
    if (zero2_streamed) {
        opts.grad_ready = mt_route_zero2_grad_ready, opts.grad_ready_ctx = &zhook;
        opts.grads_done = mt_route_zero2_grads_done, opts.grads_done_ctx = &zhook;
    }
    if (offload) opts.weights_needed = mt_route_offload_weights_needed, opts.weights_needed_ctx = &ohook;
    // each forward unit's range of the trained block, for the gradient reduction
    dp.units = mc.L + 2;
    dp.lo = calloc((size_t)dp.units, sizeof *dp.lo);
    dp.hi = calloc((size_t)dp.units, sizeof *dp.hi);
    MT_CHECK(dp.lo && dp.hi, "unit ranges");
    for (int i = 0; i < n_trained; i++) {
        int u = mt_param_forward_unit(trained_table[i].name, mc.L);
        size_t a = trained_table[i].offset, b = a + trained_table[i].count;
        if (dp.lo[u] == dp.hi[u] || a < dp.lo[u]) dp.lo[u] = a;
        if (b > dp.hi[u]) dp.hi[u] = b;
    }
    float *host_params = calloc(total, sizeof(float)), *moment_m = NULL, *moment_v = NULL;
    float *trained = lora ? calloc(trained_total ? trained_total : 1, sizeof(float)) : host_params;
    if (!host_params || !trained) {
        err = mt_errorf(MT_ERR_NOMEM, "out of host memory for the %.2fM parameters' fp32 copy (%.1f GiB)", total / 1e6,
                        total * 4.0 / 1073741824.0);
        goto out_params;
    }
    if (lora && cfg->lora_init[0]) {
        if ((err = mt_lora_load(cfg->lora_init, &mc, lora, trained))) goto out_params;
    } else if (lora) {
        mt_lora_init_params(trained_table, n_trained, trained, (uint64_t)cfg->train_seed);
    }
    int random_init = !strcmp(cfg->model_init, "random");
    if (random_init)
        mt_model_init_random(&mc, host_params, (uint64_t)cfg->train_seed);
    else if ((err = mt_hf_load_weights(cfg->model_path, &mc, host_params)))
        goto out_params;
    if ((err = mt_make_dirs(cfg->output_dir))) goto out_params;
    char resume_dir[1200] = "";
    if (!strcmp(cfg->train_resume, "auto"))
        mt_checkpoint_find_latest(cfg->output_dir, resume_dir, sizeof resume_dir);
    else if (cfg->train_resume[0])
        snprintf(resume_dir, sizeof resume_dir, "%s", cfg->train_resume);
    // AdamW's moments' host copies for checkpoints, of this rank's shard (MeZO
    // has none, GaLore its own); with offload the moments live in the store:
    // host copies only to resume
    int host_moments = !mezo && !galore && (!offload || resume_dir[0]);
    size_t n_moments = shard_hi - shard_lo;
    if (host_moments) {
        moment_m = malloc((n_moments ? n_moments : 1) * sizeof(float));
        moment_v = malloc((n_moments ? n_moments : 1) * sizeof(float));
    }
    if (host_moments && (!moment_m || !moment_v)) {
        err = mt_errorf(MT_ERR_NOMEM, "out of host memory for the optimizer state's checkpoint copies (%.1f GiB)",
                        n_moments * 8.0 / 1073741824.0);
        goto out_params;
    }
    mt_checkpoint_meta resume = {0};
    if (resume_dir[0]) {
        if ((err = mt_checkpoint_read(resume_dir, &mc, lora, trained, shard_lo, shard_hi, moment_m, moment_v, &resume)))
            goto out_params;
        if (resume.config_hash != mt_config_training_hash(cfg)) {
            err = mt_errorf(MT_ERR_CONFIG,
                            "%s was written by a run with a different configuration (model, data, train or optim "
                            "keys differ; see its run's config.yaml). Resume with the same settings, or start fresh "
                            "with --set train.resume= (empty) and another output.dir.",
                            resume_dir);
            goto out_params;
        }
        if (resume.step >= cfg->train_steps) {
            err = mt_errorf(MT_ERR_CONFIG, "%s is at step %ld, and train.steps is %ld: nothing left to train",
                            resume_dir, resume.step, cfg->train_steps);
            goto out_params;
        }
        mt_loader_set_cursor(train, (mt_cursor){resume.data_epoch, resume.data_batch});
    }

    // ---- backend, model, optimizer
    mt_backend be;
    if ((err = mt_backend_init(&be, use_gpu ? mt_dist_local_rank(dist) : -1))) goto out_params;
    if ((err = mt_dist_connect(dist, &be, cfg->dist_timeout))) goto out_backend;
    if (world > 1 && (err = mt_dist_check_same(dist, mt_config_hash(cfg), "the configuration"))) goto out_backend;
    char devname[256];
    if (use_gpu)
        mt_device_describe(devname, sizeof devname);
    else
        snprintf(devname, sizeof devname, "CPU (fp32 reference backend)");
    mt_model *model = NULL;
    mt_optimizer *opt = NULL;
    mt_mezo *mz = NULL;
    mt_galore *gal = NULL;
    mt_galore_param *gparams = NULL;
    int offload_threads = 0;  // the CPU AdamW's (offload.threads, or mt_offload_auto_threads)
    int *gowner = NULL;       // GaLore under ZeRO: each parameter's rank
    size_t *gbounds = NULL;   // and each rank's run of the block (mt_route_galore_owners)
    if ((err = mt_model_create_with(&model, &be, &mc, &opts))) goto out_backend;
    if (world > 1 && opts.grad_ready) mt_model_set_agreement(model, mt_route_any_rank, dist);
    if ((err = mt_model_set_weights(model, host_params))) goto out_model;
    if (lora) {
        mt_model_set_adapters(model, trained);
        free(host_params);  // the frozen base lives on the backend now
        host_params = NULL;
    }
    mt_trainable tr;
    mt_model_trainable(model, &tr);
    mt_param_group *groups = malloc((size_t)(n_trained ? n_trained : 1) * sizeof *groups);
    MT_CHECK(groups, "parameter groups");
    int n_groups = 0, n_selected = pl.n_selected;
    size_t selected_count = 0;
    for (int i = 0; i < n_trained; i++) {
        if (mezo && !selected[i]) continue;
        groups[n_groups++] = (mt_param_group){trained_table[i].offset, trained_table[i].count, trained_table[i].decay};
        selected_count += trained_table[i].count;
    }
    int n_projected = galore ? pl.n_selected : 0;
    size_t projected_count = 0;
    if (galore) {
        gparams = calloc((size_t)(n_trained ? n_trained : 1), sizeof *gparams);
        MT_CHECK(gparams != NULL, "galore parameters");
        if (zero) {  // each rank keeps and updates the state of its own parameters only
            gowner = malloc((size_t)(n_trained ? n_trained : 1) * sizeof *gowner);
            gbounds = malloc((size_t)(world + 1) * sizeof *gbounds);
            MT_CHECK(gowner && gbounds, "galore owners");
            mt_route_galore_owners(dist, trained_table, n_trained, trained_total, gowner, gbounds);
        }
        for (int i = 0; i < n_trained; i++) {
            const mt_param_info *p = &trained_table[i];
            gparams[i] = (mt_galore_param){p->name,
                                           p->shape[0],
                                           p->ndim == 2 ? p->shape[1] : 0,
                                           p->decay,
                                           selected[i],
                                           offload && !selected[i],
                                           gowner && gowner[i] != rank};
            if (selected[i]) projected_count += p->count;
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
        if (!err) err = mt_galore_init(&gal, &be, &gc, gparams, n_trained);
        hook = (mt_galore_hook){gal, tr.weights, mt_act_size(&be), trained_table, NULL, &ofl, dist, gowner};
        if (!err && resume_dir[0]) {
            mt_state_tensor *state;
            int n_state = mt_galore_state(gal, &state);
            err = mt_checkpoint_read_extra(resume_dir, state, n_state);
            if (!err) mt_galore_state_upload(gal, resume.optimizer_steps);
        }
    } else if (mezo) {
        mt_mezo_config zc = {(float)cfg->mezo_eps, (int)cfg->mezo_samples, (float)cfg->optim_weight_decay,
                             (uint64_t)cfg->train_seed};
        err = mt_model_enable_perturbation(model, selected);
        if (!err) err = mt_mezo_init(&mz, &be, &zc, tr.weights, groups, n_groups);
        // each update rides on the next forward's first read of each tensor
        if (!err) mt_mezo_defer_updates(mz, defer_to_model, model);
    }
    if (zero2_streamed && !offload_streamed && !err) {
        size_t n = shard_hi - shard_lo;
        err = mt_alloc((void **)&shard_grads, (n ? n : 1) * sizeof(float), MT_MEM_GRADS, use_gpu ? MT_DEVICE : MT_HOST);
        if (!err) mt_op_zero(&be, shard_grads, (n ? n : 1) * sizeof(float));  // alignment gaps stay 0
    }
    zhook.dist = dist, zhook.be = &be, zhook.table = trained_table, zhook.shard = shard_grads;
    zhook.lo = shard_lo, zhook.hi = shard_hi, zhook.total = trained_total, zhook.first = 1;
    zhook.offload = &ofl, zhook.plan = &plan;
    if (offload && !err) {
        int cores;
        offload_threads = mt_offload_auto_threads(mt_dist_local_world(dist), use_gpu, &cores);
        if (cfg->offload_threads > 0)
            offload_threads = (int)cfg->offload_threads;
        else if (use_gpu && cores < 4)
            mt_warn(
                "offload: this rank may run on %d core%s (its CPU affinity, or its share of the node's), so the "
                "CPU AdamW has %d thread%s and will hold the GPU back; with mpirun, start with --bind-to none, or "
                "--map-by slot:PE=N to give each rank N cores",
                cores, cores == 1 ? "" : "s", offload_threads, offload_threads == 1 ? "" : "s");
        // (GaLore under ZeRO: the unprojected ones of this rank's parameters)
        plan = mt_offload_plan_make(trained_table, n_trained, gbounds ? gbounds[rank] : shard_lo,
                                    gbounds ? gbounds[rank + 1] : shard_hi, galore ? selected : NULL, mc.L);
        hook.offloaded = plan.index;
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
                                offload_threads,
                                cfg->offload_trace_step > 0 ? trace : NULL,
                                cfg->offload_trace_step,
                                mc.L,
                                rank,
                                world,
                                offload_streamed ? accum : 1};
        float *packed = NULL;
        if (plan.packed) {
            // GaLore's unprojected parameters: their master from the weights
            // (a checkpoint's are the offloaded fp32 values), moments from
            // the checkpoint's tensors
            int moments = resume_dir[0] ? 3 : 1;
            err = mt_state_copy_alloc(plan.count, moments, &packed);
            if (!err) mt_offload_plan_gather(&plan, trained, packed);
            if (!err && moments == 3) {
                mt_state_tensor *t = mt_offload_plan_moments(&plan, trained_table, n_trained, packed + plan.count,
                                                             packed + 2 * plan.count);
                err = mt_checkpoint_read_extra(resume_dir, t, 2 * plan.n);
                free(t);
            }
            if (!err)
                err = mt_offload_init(&ofl, &be, &oc, plan.params, plan.n, plan.count, tr.weights, packed,
                                      moments == 3 ? packed + plan.count : NULL,
                                      moments == 3 ? packed + 2 * plan.count : NULL, resume.optimizer_steps);
            free(packed);
            if (!err && zero && world > 1) mt_offload_set_norm_sum(ofl, mt_route_sum_over_ranks, dist);
        } else {
            // moment_m and moment_v exist only when resuming (resume.optimizer_steps is 0 otherwise)
            err = mt_offload_init(&ofl, &be, &oc, plan.params, plan.n, plan.count, tr.weights, trained + shard_lo,
                                  moment_m, moment_v, resume.optimizer_steps);
            if (!err && zero && world > 1) {
                mt_offload_set_norm_sum(ofl, mt_route_sum_over_ranks, dist);
                ohook.gather = 1, ohook.lo = dp.lo, ohook.hi = dp.hi, ohook.weights = tr.weights;
                ohook.total = trained_total, ohook.elem = mt_act_size(&be);
                ohook.stale = calloc((size_t)dp.units, 1);
                MT_CHECK(ohook.stale != NULL, "offload units");
            }
            // the store holds the values now: the host copies go (at 7B they are 28 GB each)
            free(moment_m);
            free(moment_v);
            moment_m = moment_v = NULL;
            if (!lora) {
                free(host_params);
                host_params = trained = NULL;
            }
        }
    } else if (!galore && !mezo && !err) {
        mt_adamw_config ac = {(float)cfg->optim_lr,  (float)cfg->optim_beta1,        (float)cfg->optim_beta2,
                              (float)cfg->optim_eps, (float)cfg->optim_weight_decay, (float)cfg->optim_grad_clip};
        // ZeRO 1, 2: this rank's shard of the block, its groups clipped to it
        int n_shard = 0;
        for (int g = 0; g < n_groups; g++) {
            size_t a = groups[g].offset, b = a + groups[g].count;
            if (mt_range_clip(&a, &b, shard_lo, shard_hi))
                groups[n_shard++] = (mt_param_group){a - shard_lo, b - a, groups[g].decay};
        }
        if (!err)
            err = mt_optimizer_init(&opt, &be, &ac, (float *)((char *)tr.weights + shard_lo * mt_act_size(&be)),
                                    trained + shard_lo, shard_hi - shard_lo, groups, n_shard);
        if (!err && zero && world > 1) mt_optimizer_set_norm_sum(opt, mt_route_sum_over_ranks, dist);
    }
    free(groups);
    if (err) goto out_model;
    if (resume_dir[0] && opt) mt_optimizer_set_moments(opt, moment_m, moment_v, resume.optimizer_steps);
    dp.grads = tr.grads, dp.total = trained_total, dp.shard_lo = shard_lo;
    // what AdamW reads: the block's shard, or ZeRO-2's streamed sums
    float *opt_grads = zero2_streamed ? shard_grads : tr.grads + shard_lo;

    // ---- run folder (rank 0's)
    char path[1200];
    mt_metrics *metrics = NULL;
    if (rank == 0) {
        snprintf(path, sizeof path, "%s/config.yaml", cfg->output_dir);
        FILE *f = fopen(path, "w");
        if (f) mt_config_write_yaml(cfg, f);
        if (!f || fclose(f) != 0) err = mt_errorf(MT_ERR_IO, "%s: cannot write (%s)", path, strerror(errno));
    }
    mt_metrics_config metrics_cfg = {cfg->output_dir,
                                     rank == 0,
                                     cfg->train_steps,
                                     resume.step,
                                     cfg->train_log_every,
                                     eval ? cfg->train_eval_every : 0,
                                     mezo};
    if (!err) err = mt_metrics_open(&metrics, &metrics_cfg);
    if (mt_dist_any(dist, err != MT_OK) && !err)
        err = mt_errorf(MT_ERR_IO, "rank 0 could not write to %s", cfg->output_dir);
    if (err) {
        mt_metrics_close(metrics, 0);
        goto out_model;
    }
    size_t count = mt_model_num_params(model);
    mt_info("memtune %s | %s | %s %d layers, %.2fM params | B=%d T=%d accum=%d | %s", MT_VERSION, devname,
            mc.architecture, mc.L, count / 1e6, B, T, accum, random_init ? "random init" : cfg->model_path);
    char attention[256];
    mt_model_describe_attention(model, attention, sizeof attention);
    mt_info("attention: %s", attention);
    if (lora) {
        char targets[128];
        mt_lora_format_targets(lora->targets, targets, sizeof targets);
        size_t adapter_count = 0;
        for (int i = 0; i < n_trained; i++) adapter_count += trained_table[i].count;
        mt_info("LoRA r=%d alpha=%g dropout=%g%s on %s: %.2fM trainable (%.3f%% of the base)%s%s", lora->r, lora->alpha,
                lora->dropout, lora->rslora ? " rsLoRA" : "", targets, adapter_count / 1e6,
                100.0 * adapter_count / (double)count, cfg->lora_init[0] ? ", from " : "", cfg->lora_init);
        mt_info("base weights frozen%s: %.2f GiB on the %s, %.3f bytes per parameter",
                opts.quantize_nf4 ? " in NF4" : "", mt_model_base_weight_bytes(model) / 1073741824.0,
                use_gpu ? "GPU" : "host", (double)mt_model_base_weight_bytes(model) / (double)count);
    }
    if (mezo) {
        mt_info(
            "MeZO eps=%g samples=%d: %d of %d trainable tensors, %.2fM parameters (%s); no gradients or optimizer "
            "state, %.1f MiB perturbation scratch",
            cfg->mezo_eps, (int)cfg->mezo_samples, n_selected, n_trained, selected_count / 1e6, cfg->mezo_trainable,
            mt_model_perturbation_bytes(model) / 1048576.0);
        if (lora && lora->dropout > 0)
            mt_info("lora.dropout %g is not applied: MeZO's two forward passes must see the same function",
                    lora->dropout);
    }
    if (galore)
        mt_info(
            "GaLore rank %ld, update_gap %ld, scale %g, %s refresh, %s moments: %d matrices projected (%.2fM of "
            "%.2fM parameters), the rest AdamW%s; optimizer state %.2f GiB, gradient buffers %.1f MiB (no "
            "fp32 master copy%s%s)",
            cfg->galore_rank, cfg->galore_update_gap, cfg->galore_scale, cfg->galore_refresh, cfg->galore_moments,
            n_projected, projected_count / 1e6, count / 1e6, offload ? " with its state offloaded" : "",
            mt_galore_state_bytes(gal) / 1073741824.0, mt_model_streamed_grad_bytes(model) / 1048576.0,
            offload ? " of the projected matrices" : "",
            use_gpu ? "; bf16 weights updated with stochastic rounding" : "");
    if (offload) {
        const mt_store *st = mt_offload_store(ofl);
        mt_info(
            "AdamW state offloaded to %s: %.2fM parameters%s, %.2f GiB (fp32 master, m, v)%s%s; CPU AdamW %s, %d "
            "thread%s; gradients %s, %.1f MiB of GPU staging; host memory %.2f GiB",
            !strcmp(cfg->offload_optimizer, "ssd") ? "SSD" : "host memory", plan.count / 1e6,
            plan.packed    ? (gbounds && world > 1 ? " (those GaLore does not project, of this rank's parameters)"
                                                   : " (those GaLore does not project)")
            : ohook.gather ? " (this rank's shard)"
                           : "",
            plan.count * 12.0 / 1073741824.0, st && mt_store_path(st)[0] ? " in " : "", st ? mt_store_path(st) : "",
            mt_offload_cpu_path(ofl), offload_threads, offload_threads == 1 ? "" : "s",
            lora                ? "sent after backward"
            : !offload_streamed ? "summed over the micro-batches where computed, sent after backward"
            : accum > 1         ? "streamed per layer and summed on the host over the micro-batches"
                                : "streamed per layer",
            mt_offload_device_bytes(ofl) / 1048576.0, mt_offload_host_bytes(ofl) / 1073741824.0);
        if (pl.host_need > 0.0 && !pl.host_sum)
            mt_info(
                "offload.grad_sum auto: summed in host memory, the gradients would bring this node's ranks to about "
                "%.1f GiB at the start, over 85%% of its %.1f GiB: the GPU sums them (4 bytes a parameter there; "
                "offload.grad_sum: host forces the host)",
                pl.host_need / 1073741824.0, pl.host_have / 1073741824.0);
        if (!strcmp(cfg->offload_optimizer, "ssd") && !mt_store_direct_io(st))
            mt_warn("%s does not take O_DIRECT (tmpfs?): the state goes through the page cache", cfg->offload_path);
    }
    mt_info("data %s: %llu tokens in %llu docs, %llu train batches/epoch", cfg->data_train,
            (unsigned long long)mt_dataset_num_tokens(ds), (unsigned long long)mt_dataset_num_docs(ds),
            (unsigned long long)mt_loader_batches_per_epoch(train));
    if (resume_dir[0]) mt_info("resuming from %s at step %ld", resume_dir, resume.step);
    if (world > 1)
        mt_info("data parallel: %d ranks (%s), %d on this node; %d x %d x %d tokens a step; ZeRO stage %d%s", world,
                mt_dist_launcher(dist), mt_dist_local_world(dist), world, accum, B * T, zero,
                zero ? " (each rank keeps 1/N of AdamW's state)" : "");

    mt_schedule sched = {!strcmp(cfg->optim_schedule, "linear")     ? MT_SCHEDULE_LINEAR
                         : !strcmp(cfg->optim_schedule, "constant") ? MT_SCHEDULE_CONSTANT
                                                                    : MT_SCHEDULE_COSINE,
                         (float)cfg->optim_lr, (float)cfg->optim_min_lr_ratio, (int)cfg->optim_warmup_steps,
                         (int)cfg->train_steps};
    batch_set bs;
    bs.inputs = malloc((size_t)accum * B * T * 4);
    bs.targets = malloc((size_t)accum * B * T * 4);
    bs.valid = malloc((size_t)accum * sizeof(int));
    mt_run_state ckpt = {
        cfg,      &mc,    lora,    opt,      gal,      ofl,           &plan, trained_table,         n_trained,
        model,    train,  trained, moment_m, moment_v, trained_total, dist,  zero > 0 && world > 1, shard_lo,
        shard_hi, gbounds};
    stop_signal = 0;
    struct sigaction action = {0}, old_int, old_term;
    action.sa_handler = on_stop_signal;
    sigemptyset(&action.sa_mask);
    sigaction(SIGINT, &action, &old_int);
    sigaction(SIGTERM, &action, &old_term);
    int skipped = 0, stopped = 0;
    for (int step = (int)resume.step; step < cfg->train_steps && !err; step++) {
        // all micro-batches first: the loss is the mean over all their targets
        long valid_total = 0;
        for (int a = 0; a < accum && !err; a++) {
            err = mt_loader_next(train, bs.inputs + (size_t)a * B * T, bs.targets + (size_t)a * B * T, &bs.valid[a]);
            valid_total += bs.valid[a];
        }
        if (err) break;
        float lr = mt_schedule_lr(&sched, step);
        double loss, refresh_seconds = NAN;
        // a non-finite loss or gradient stops the run before any update is applied
        mt_step_info info = {NAN, 0};
        if (mezo) {
            mezo_batch mb = {model, &bs, accum, B, T, valid_total, dist};
            double pair_losses[2 * MT_ZO_MAX_DIRECTIONS];
            mt_mezo_losses(mz, step, mezo_batch_loss, &mb, pair_losses);
            mt_mezo_info zi;
            mt_mezo_update(mz, step, pair_losses, lr, &zi);
            loss = zi.loss;
            info = (mt_step_info){zi.projected_grad_rms, zi.finite};
        } else {
            // GaLore applies each parameter's update inside backward, as its
            // gradient completes (grad_accum is 1 then); AdamW steps after
            if (galore) mt_galore_begin_step(gal, lr);
            if (ofl) mt_offload_begin_step(ofl, lr);
            // the loss is the mean over every rank's targets
            double valid_all = (double)valid_total;
            mt_dist_sum_host(dist, &valid_all, 1);
            float dscale = valid_all > 0 ? 1.0f / (float)valid_all : 0.0f;
            mt_model_zero_grads(model);
            double loss_sum = 0.0;
            // once a streamed backward is skipped (a non-finite loss, on any
            // rank) the step is lost: the rest of its micro-batches only add
            // their losses (nothing more goes to the store, which would
            // otherwise update on the last one's gradients)
            int backward = 1;
            for (int a = 0; a < accum; a++) {
                // dropout masks: a fresh draw per micro-batch (and rank), the same after a resume
                mt_model_set_dropout_seed(
                    model, mt_rng_bits((uint64_t)cfg->train_seed, ((uint64_t)step * accum + a) * world + rank));
                dp.active = a == accum - 1;  // the gradients are reduced in the last micro-batch's backward
                zhook.first = a == 0;
                if (a > 0 && backward && ofl && offload_streamed) mt_offload_micro_batch(ofl, a);
                loss_sum += mt_model_step(model, bs.inputs + (size_t)a * B * T, bs.targets + (size_t)a * B * T, dscale,
                                          backward);
                if (mt_model_backward_skipped(model)) backward = 0;
                if (zero2_streamed) mt_dist_wait(dist);  // the next micro-batch adds to the shard's sums
            }
            mt_dist_sum_host(dist, &loss_sum, 1);
            mt_dist_wait(dist);  // what follows reads the reduced gradients
            loss = valid_all > 0 ? loss_sum / valid_all : NAN;
            if (!isfinite(loss)) {
                // the backward was skipped: nothing was applied
                if (galore) mt_galore_cancel_step(gal);
                if (ofl) mt_offload_cancel_step(ofl);
            } else {
                if (galore) mt_galore_end_step(gal, &info);
                int matrices = 0;
                double seconds = galore ? mt_galore_last_refresh_seconds(gal, &matrices) : 0.0;
                int share_owned = galore && gowner && world > 1;
                if (share_owned) {
                    // each rank updated (and refreshed) its own parameters: the
                    // norm, the verdict and the count over all of them (the
                    // seconds stay rank 0's); every rank gets the weights below
                    double sum[3] = {info.grad_norm * info.grad_norm, !info.finite, matrices};
                    mt_dist_sum_host(dist, sum, 3);
                    info = (mt_step_info){sqrt(sum[0]), sum[1] == 0};
                    matrices = (int)sum[2];
                }
                if (ofl) {
                    // adapters, or gradients summed over micro-batches: the whole block now, last layer first
                    // (ZeRO: the sums of this rank's shard)
                    if (!offload_streamed)
                        for (int k = plan.n - 1; k >= 0; k--)
                            mt_offload_grad(ofl, k, opt_grads + (plan.params[k].offset - shard_lo));
                    mt_step_info off;
                    if ((err = mt_offload_end_step(ofl, &off.grad_norm, &off.finite))) break;
                    if (ohook.gather) memset(ohook.stale, 1, (size_t)dp.units);
                    // with GaLore, the norm over both parts
                    info =
                        galore ? (mt_step_info){hypot(info.grad_norm, off.grad_norm), info.finite && off.finite} : off;
                    // GaLore under ZeRO: the store's updates of this rank's
                    // unprojected parameters are in the weights before they are shared
                    if (share_owned && (err = mt_offload_sync(ofl))) break;
                }
                if (share_owned) {
                    mt_dist_after_compute(dist);
                    mt_dist_share_ranges(dist, tr.weights, gbounds, mt_act_size(&be));
                    mt_dist_wait(dist);
                }
                if (opt) mt_optimizer_step(opt, opt_grads, lr, &info);
                if (opt && zero && info.finite) {
                    // each rank updated its shard: every rank gets all of them
                    mt_dist_after_compute(dist);
                    mt_dist_share_shards(dist, tr.weights, 0, trained_total, trained_total, mt_act_size(&be));
                    mt_dist_wait(dist);
                }
                if (galore && matrices) {
                    refresh_seconds = seconds;
                    mt_info("step %d: GaLore refreshed %d projectors in %.2fs (%s)", step + 1, matrices, seconds,
                            cfg->galore_refresh);
                }
            }
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
            if (step > (int)resume.step) {
                mt_err ckerr = mt_run_state_save(&ckpt, step);
                if (ckerr) err = ckerr;
            }
            break;
        }
        if (step == (int)resume.step) result->first_loss = loss;
        result->last_loss = loss;
        result->steps_done = step + 1;
        mt_dist_heartbeat(dist);
        double eval_loss = NAN;
        int last = step + 1 == cfg->train_steps;
        if (eval && ((cfg->train_eval_every > 0 && (step + 1) % cfg->train_eval_every == 0) || last)) {
            if ((err = evaluate(model, eval, (int)cfg->train_eval_batches, B, T, &eval_loss))) break;
            result->last_eval_loss = eval_loss;
        }
        mt_step_record rec = {
            step, loss, eval_loss, lr, info.grad_norm, (long)accum * B * T * world, refresh_seconds, peak_bytes(&be)};
        double tps = mt_metrics_step(metrics, &rec);
        if (isfinite(tps)) result->tokens_per_second = tps;
        int run_steps = step + 1 - (int)resume.step;
        // every rank stops at the same step
        int stop_now =
            mt_dist_any(dist, stop_signal) || (cfg->train_stop_after > 0 && run_steps >= cfg->train_stop_after);
        if (stop_now && !last) {
            if ((err = mt_run_state_save(&ckpt, step + 1))) break;
            mt_info("stopped after step %d (%s). Resume with: memtune train CONFIG --set train.resume=auto", step + 1,
                    stop_signal ? "signal" : "train.stop_after");
            stopped = 1;
            break;
        }
        if ((last && cfg->checkpoint_final) || (cfg->checkpoint_every > 0 && (step + 1) % cfg->checkpoint_every == 0))
            if ((err = mt_run_state_save(&ckpt, step + 1))) break;
    }
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    if (skipped) mt_warn("%d step(s) skipped for non-finite values", skipped);
    result->stopped_early = stopped;
    mt_metrics_close(metrics, result->steps_done);
    free(bs.inputs);
    free(bs.targets);
    free(bs.valid);
    if (!err) {
        char report[1024];
        mt_mem_format(use_gpu ? MT_DEVICE : MT_HOST, report, sizeof report);
        mt_info("memory (%s): %s", use_gpu ? "GPU" : "host", report);
    }
    if (!err && !stopped && cfg->output_save_model && lora) {
        err = mt_run_state_get_trained(&ckpt, trained, NULL);
        snprintf(path, sizeof path, "%s/adapter", cfg->output_dir);
        if (!err && rank == 0) err = mt_lora_save(path, lora, cfg->model_path, trained_table, n_trained, trained);
        if (!err)
            mt_info("saved %s (PEFT layout; merge with: memtune merge --model %s --adapter %s -o MERGED)", path,
                    cfg->model_path, path);
    } else if (!err && !stopped && cfg->output_save_model) {
        if (!host_params) err = mt_state_copy_alloc(total, 1, &host_params);
        if (!err) err = mt_run_state_get_trained(&ckpt, host_params, NULL);
        mt_dtype dtype = !strcmp(cfg->output_save_dtype, "F32")    ? MT_DTYPE_F32
                         : !strcmp(cfg->output_save_dtype, "BF16") ? MT_DTYPE_BF16
                         : random_init                             ? MT_DTYPE_F32
                                                                   : mc.dtype;
        snprintf(path, sizeof path, "%s/model", cfg->output_dir);
        if (!err && rank == 0) err = mt_hf_save(path, cfg->model_path, &mc, host_params, dtype);
        if (!err) mt_info("saved %s (%s, Hugging Face layout)", path, mt_dtype_name(dtype));
    }
out_model:
    free(gparams);
    free(gowner);
    free(gbounds);
    mt_galore_free(gal);
    mt_mezo_free(mz);
    mt_optimizer_free(opt);
    mt_offload_free(ofl);
    mt_offload_plan_free(&plan);
    mt_free((void **)&shard_grads);
    free(ohook.stale);
    mt_model_free(model);
out_backend:
    mt_backend_free(&be);
out_params:
    free(moment_m);
    free(moment_v);
    if (trained != host_params) free(trained);
    free(host_params);
    mt_plan_free(&pl);
out_data:
    free(dp.lo);
    free(dp.hi);
    mt_dist_free(dist);
    mt_loader_free(train);
    mt_loader_free(eval);
    mt_dataset_free(ds);
    return err;
}
