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
#include "optim/schedule.h"
#include "trainer/checkpoint.h"
#include "trainer/dist.h"
#include "trainer/eval.h"
#include "trainer/fsutil.h"
#include "trainer/hf.h"
#include "trainer/lora.h"
#include "trainer/metrics.h"
#include "trainer/mezo_step.h"
#include "trainer/model.h"
#include "trainer/plan.h"
#include "trainer/route.h"
#include "trainer/sampler.h"
#include "trainer/state.h"
#include "trainer/updater.h"

#define MT_VERSION "0.1.0"

typedef struct {
    int32_t *inputs, *targets;
    int *valid;
    int32_t *pos;  // data.document_mask: the inputs' positions in their documents, else NULL
} batch_set;

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
    int random_init, fill;  // fill: the base's values go to the model and the offload store together
    char resume_dir[1200];
    mt_checkpoint_meta resume;
    mt_backend be;
    int backend_ready;
    char devname[256];
    mt_model *model;
    mt_trainable tr;
    mt_updater up;  // what updates the trained block
    mt_metrics *metrics;
    mt_run_state ckpt;
    mt_sampler *sampler;  // train.sample_every
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
    int docs = (int)cfg->data_document_mask;
    mt_loader_config lc = {r->B, r->T, (uint64_t)cfg->train_seed, r->rank, r->world, cfg->data_eval_fraction, docs};
    mt_loader_config ec = {r->B, r->T, (uint64_t)cfg->train_seed, 0, 1, cfg->data_eval_fraction, docs};
    if ((err = mt_loader_init(&r->train, r->ds, &lc, MT_SPLIT_TRAIN))) return err;
    if (cfg->data_eval_fraction > 0 && cfg->train_eval_batches > 0 &&
        (err = mt_loader_init(&r->eval, r->ds, &ec, MT_SPLIT_EVAL)))
        return err;
    if ((err = mt_plan_make(&r->pl, cfg, &r->mc, r->dist, mt_device_count()))) return err;
    r->planned = 1;
    const mt_plan *pl = &r->pl;
    mt_model_options *o = &r->opts;
    *o = mt_plan_model_options(pl, cfg);
    mt_route_install(pl, r->mc.L, r->dist, r->world, &r->up.ofl, o, &r->dp, &r->zhook, &r->hook, &r->ohook);
    return mt_sampler_open(&r->sampler, cfg, &r->mc);
}

// The values to start from, on the host: the base model's (loaded or
// random), the adapters' (lora.init or PEFT's initialisation), and a
// checkpoint's when resuming.
static mt_err load_values(run *r) {
    const mt_config *cfg = r->cfg;
    const mt_plan *pl = &r->pl;
    const mt_lora_config *lora = pl->lora ? &pl->lora_cfg : NULL;
    mt_err err;
    if ((err = mt_make_dirs(cfg->output_dir))) return err;
    if (!strcmp(cfg->train_resume, "auto"))
        mt_checkpoint_find_latest(cfg->output_dir, r->resume_dir, sizeof r->resume_dir);
    else if (cfg->train_resume[0])
        snprintf(r->resume_dir, sizeof r->resume_dir, "%s", cfg->train_resume);
    // only MT_LOAD_WHOLE has a whole fp32 copy on the host (an offloaded full fine-tune's checkpoint master and
    // moments go into the store a unit at a time too: the updater's offload)
    mt_base_load load = mt_plan_base_load(pl, r->resume_dir[0] != 0);
    r->fill = load == MT_LOAD_UNITS;
    int whole = load == MT_LOAD_WHOLE;
    r->host_params = whole ? calloc(pl->total, sizeof(float)) : NULL;
    r->trained = lora ? calloc(pl->trained_total ? pl->trained_total : 1, sizeof(float)) : r->host_params;
    if ((whole && !r->host_params) || (lora && !r->trained))
        return mt_errorf(MT_ERR_NOMEM, "out of host memory for the %.2fM parameters' fp32 copy (%.1f GiB)",
                         pl->total / 1e6, pl->total * 4.0 / 1073741824.0);
    if (lora && cfg->lora_init[0]) {
        if ((err = mt_lora_load(cfg->lora_init, &r->mc, lora, r->trained))) return err;
    } else if (lora) {
        mt_lora_init_params(pl->trained, pl->n_trained, r->trained, (uint64_t)cfg->train_seed);
    }
    r->random_init = !strcmp(cfg->model_init, "random");
    if (!whole)
        ;
    else if (r->random_init)
        mt_model_init_random(&r->mc, r->host_params, (uint64_t)cfg->train_seed);
    else if ((err = mt_hf_load_weights(cfg->model_path, &r->mc, r->host_params)))
        return err;
    // AdamW's moments' host copies for checkpoints, of this rank's shard (MeZO
    // has none, GaLore its own); with offload the moments live in the store:
    // host copies only to resume
    int host_moments = !pl->mezo && !pl->galore && (!pl->offload || r->resume_dir[0]) && !r->fill;
    size_t n_moments = pl->shard_hi - pl->shard_lo;
    if (host_moments) {
        r->moment_m = malloc((n_moments ? n_moments : 1) * sizeof(float));
        r->moment_v = malloc((n_moments ? n_moments : 1) * sizeof(float));
    }
    if (host_moments && (!r->moment_m || !r->moment_v))
        return mt_errorf(MT_ERR_NOMEM, "out of host memory for the optimizer state's checkpoint copies (%.1f GiB)",
                         n_moments * 8.0 / 1073741824.0);
    if (!r->resume_dir[0]) return MT_OK;
    if ((err = mt_run_state_read_resume(r->resume_dir, cfg, &r->mc, lora, r->trained, pl->shard_lo, pl->shard_hi,
                                        r->moment_m, r->moment_v, &r->resume)))
        return err;
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
    if (!r->host_params && !r->fill) {  // a layer at a time (load_values; fill: the updater's offload)
        if ((err = mt_hf_set_model(r->model, r->random_init ? NULL : r->cfg->model_path, (uint64_t)r->cfg->train_seed)))
            return err;
        if (r->pl.lora) mt_model_set_adapters(r->model, r->trained);
    } else if (r->host_params && (err = mt_model_set_weights(r->model, r->host_params))) {
        return err;
    }
    mt_model_trainable(r->model, &r->tr);
    return MT_OK;
}

// What updates the trained block (updater.h), and the run's checkpoint state over it.
static mt_err build_updater(run *r) {
    const mt_plan *pl = &r->pl;
    const mt_config *cfg = r->cfg;
    mt_updater *u = &r->up;
    u->cfg = cfg, u->pl = pl, u->mc = &r->mc, u->be = &r->be, u->model = r->model, u->tr = r->tr;
    u->dist = r->dist, u->rank = r->rank, u->world = r->world, u->accum = r->accum;
    u->resume_dir = r->resume_dir, u->resume = &r->resume;
    u->trained = &r->trained, u->host_params = &r->host_params, u->moment_m = &r->moment_m;
    u->moment_v = &r->moment_v;
    u->dp = &r->dp, u->zhook = &r->zhook, u->ghook = &r->hook, u->ohook = &r->ohook;
    mt_err err = mt_updater_build(u);
    if (err) return err;
    r->ckpt = (mt_run_state){.cfg = cfg,
                             .mc = &r->mc,
                             .lora = pl->lora ? &pl->lora_cfg : NULL,
                             .up = u,
                             .table = pl->trained,
                             .n_trained = pl->n_trained,
                             .train = r->train,
                             .trained_total = pl->trained_total,
                             .dist = r->dist,
                             .sharded = pl->zero > 0 && r->world > 1,
                             .shard_lo = pl->shard_lo,
                             .shard_hi = pl->shard_hi};
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
    char where[512];  // the base's layers
    int kept = mt_model_resident_layers(r->model);
    char resident[96] = "";
    if (kept)
        snprintf(resident, sizeof resident, "; the first %d of %d layers stay %s (model.resident_layers)", kept,
                 r->mc.L, pl->use_gpu ? "on the GPU" : "in slots of their own");
    if (r->opts.stream_weights)
        snprintf(where, sizeof where, "%s%s%s, a layer at a time %s (model.weights: %s)%s",
                 r->opts.weights_dir ? "disk (a file under " : "host", r->opts.weights_dir ? r->opts.weights_dir : "",
                 r->opts.weights_dir ? ")" : "", pl->use_gpu ? "on the GPU" : "in a slot", cfg->model_weights,
                 resident);
    else
        snprintf(where, sizeof where, "%s", pl->use_gpu ? "GPU" : "host");
    if (lora)
        mt_lora_report(lora, pl->trained, pl->n_trained, count, mt_model_base_weight_bytes(r->model),
                       r->opts.quantize_nf4, where, cfg->lora_init);
    else if (r->opts.stream_weights)
        mt_info("base weights: %.2f GiB on the %s", mt_model_base_weight_bytes(r->model) / 1073741824.0, where);
    mt_updater_report(&r->up, count);
    mt_info("data %s: %llu tokens in %llu docs, %llu train batches/epoch", cfg->data_train,
            (unsigned long long)mt_dataset_num_tokens(r->ds), (unsigned long long)mt_dataset_num_docs(r->ds),
            (unsigned long long)mt_loader_batches_per_epoch(r->train));
    if (r->resume_dir[0]) mt_info("resuming from %s at step %ld", r->resume_dir, r->resume.step);
    if (r->world > 1)
        mt_info("data parallel: %d ranks (%s), %d on this node; %d x %d x %d tokens a step; ZeRO stage %d%s", r->world,
                mt_dist_launcher(r->dist), pl->local_world, r->world, r->accum, r->B * r->T, pl->zero,
                pl->zero ? " (each rank keeps 1/N of AdamW's state)" : "");
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
    mt_updater_begin(&r->up, lr);
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
        if (a > 0 && backward) mt_updater_micro_batch(&r->up, a);
        if (bs->pos) mt_model_set_positions(r->model, bs->pos + (size_t)a * B * T);
        loss_sum +=
            mt_model_step(r->model, bs->inputs + (size_t)a * B * T, bs->targets + (size_t)a * B * T, dscale, backward);
        if (mt_model_backward_skipped(r->model)) backward = 0;
        if (pl->zero2_streamed) mt_dist_wait(r->dist);  // the next micro-batch adds to the shard's sums
    }
    mt_dist_sum_host(r->dist, &loss_sum, 1);
    mt_dist_wait(r->dist);  // what follows reads the reduced gradients
    *loss = valid_all > 0 ? loss_sum / valid_all : NAN;
    if (isfinite(*loss)) return mt_updater_end(&r->up, step, lr, info, refresh_seconds);
    // the backward was skipped: nothing was applied
    mt_updater_cancel(&r->up);
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
                    malloc((size_t)accum * sizeof(int)),
                    cfg->data_document_mask ? malloc((size_t)accum * B * T * 4) : NULL};
    MT_CHECK(bs.inputs && bs.targets && bs.valid && (bs.pos || !cfg->data_document_mask), "batches");
    int skipped = 0;
    // MT_PROFILE_STEP=k: the profiler's capture range is step k (1-based) alone
    // (bench/profile_step.sh)
    const char *profile_env = getenv("MT_PROFILE_STEP");
    int profile_step = profile_env && r->pl.use_gpu ? atoi(profile_env) - 1 : -1;
    // a sample before training, to compare the later ones with
    mt_err err = r->resume.step == 0
                     ? mt_sampler_after_step(r->sampler, &r->ckpt, r->rank, r->random_init, 0, r->metrics)
                     : MT_OK;
    for (int step = (int)r->resume.step; step < cfg->train_steps && !err; step++) {
        // all micro-batches first: the loss is the mean over all their targets
        long valid_total = 0;
        for (int a = 0; a < accum && !err; a++) {
            err = mt_loader_next(r->train, bs.inputs + (size_t)a * B * T, bs.targets + (size_t)a * B * T, &bs.valid[a]);
            if (!err && bs.pos) memcpy(bs.pos + (size_t)a * B * T, mt_loader_positions(r->train), (size_t)B * T * 4);
            valid_total += bs.valid[a];
        }
        if (err) break;
        float lr = mt_schedule_lr(&sched, step);
        if (step == profile_step) mt_device_profile(1);
        // offload.trace_step: streamed weights' timeline of that step and the next (offload's has its own)
        if (cfg->offload_trace_step > 0 && step + 1 == cfg->offload_trace_step) mt_model_trace_begin(r->model);
        mt_model_trace_step(r->model, step + 1);
        double loss, refresh_seconds = NAN;
        // a non-finite loss or gradient stops the run before any update is applied
        mt_step_info info = {NAN, 0};
        if (r->pl.mezo) {
            mt_zo_batches zb = {r->model, r->dist, bs.inputs, bs.targets, accum, B, T, valid_total, bs.pos};
            mt_mezo_step(r->up.mz, &zb, step, lr, &loss, &info);
        } else if ((err = gradient_step(r, &bs, valid_total, step, lr, &loss, &info, &refresh_seconds))) {
            break;
        }
        if (step == profile_step) mt_device_profile(0);
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
            if ((err = mt_eval_loss(r->model, r->eval, (int)cfg->train_eval_batches, B, T, &eval_loss, NULL))) break;
            result->last_eval_loss = eval_loss;
        }
        mt_step_record rec = {step,
                              loss,
                              eval_loss,
                              lr,
                              info.grad_norm,
                              (long)accum * B * T * r->world,
                              refresh_seconds,
                              mt_mem_peak_total(r->pl.use_gpu ? MT_DEVICE : MT_HOST)};
        double tps = mt_metrics_step(r->metrics, &rec);
        if (isfinite(tps)) result->tokens_per_second = tps;
        if (mt_model_tracing(r->model) && (step + 1 == cfg->offload_trace_step + 1 || last)) {
            char path[1200];
            snprintf(path, sizeof path, "%s/streaming-trace.json", cfg->output_dir);
            if ((err = mt_model_trace_write(r->model, r->rank == 0 ? path : NULL))) break;
            if (r->rank == 0)
                mt_info("streamed weights: timeline of steps %ld-%d written to %s", cfg->offload_trace_step, step + 1,
                        path);
        }
        if ((err = mt_sampler_after_step(r->sampler, &r->ckpt, r->rank, r->random_init, step + 1, r->metrics))) break;
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
    free(bs.pos);
    free(bs.valid);
    return err;
}

static void run_free(run *r) {
    mt_metrics_close(r->metrics, r->result->steps_done);
    mt_updater_free(&r->up);
    mt_sampler_free(r->sampler);
    free(r->ohook.stale);
    mt_model_free(r->model);
    mt_run_state_unpin_copies(&r->ckpt);  // (on the backend's device)
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
    if (!err) mt_run_state_pin_copies(&r.ckpt);
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
        // a checkpoint still being written finishes first (its failure is the run's)
        mt_err written = mt_run_state_wait(&r.ckpt, !err);
        if (!err) err = written;
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
        if (r.pl.use_gpu) {  // what a GPU run keeps in host memory (offload stores, pinned buffers)
            mt_mem_format(MT_HOST, memory, sizeof memory);
            mt_info("memory (host): %s", memory);
        }
    }
    if (!err && !stopped && cfg->output_save_model)
        err = mt_run_state_save_outputs(&r.ckpt, r.rank, r.random_init, &r.trained, &r.host_params);
    run_free(&r);
    return err;
}
