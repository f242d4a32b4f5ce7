// trainer/state.c: reading a run's trained state back and writing
// checkpoints of it (state.h).
#define _POSIX_C_SOURCE 200809L
#include "trainer/state.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kernels/device.h"
#include "trainer/forecast.h"
#include "trainer/hf.h"
#include "trainer/lora.h"

// ZeRO over several ranks: each rank writes its shard of the moments into
// the folder rank 0 prepared (named by rank 0's pid, the same on every rank);
// once all are on disk, rank 0 writes the weights and state.h5, the
// completion marker, and renames the folder into place. The moments are
// never gathered.
static mt_err write_sharded(mt_run_state *c, mt_checkpoint_meta *meta, const float *master, const float *m,
                            const float *v, const mt_state_tensor *extra, int n_extra) {
    int rank = mt_dist_rank(c->dist), world = mt_dist_world(c->dist);
    const char *run = c->cfg->output_dir;
    double tag = rank == 0 ? (double)getpid() : 0.0;
    mt_dist_sum_host(c->dist, &tag, 1);
    char tmp[1200];
    mt_err err = MT_OK;
    if (rank == 0)
        err = mt_checkpoint_prepare(run, meta->step, (long)tag, tmp, sizeof tmp);
    else
        mt_checkpoint_folder_name(run, meta->step, (long)tag, tmp, sizeof tmp);
    if (mt_dist_any(c->dist, err != MT_OK))
        return err ? err : mt_errorf(MT_ERR_IO, "rank 0 could not make %s (its log says why)", tmp);
    // (GaLore: no moments of the block's shape; its tensors of this rank's parameters)
    err = mt_checkpoint_write_shard(tmp, rank, world, m ? c->shard_lo : 0, m ? c->shard_hi : 0, c->trained_total, m, v,
                                    extra, n_extra);
    if (mt_dist_any(c->dist, err != MT_OK)) {
        if (rank == 0) mt_checkpoint_abandon(tmp);
        return err ? err
                   : mt_errorf(MT_ERR_IO,
                               "a rank could not write its shard of the checkpoint of step %ld (its log says "
                               "why)",
                               meta->step);
    }
    meta->shards = world;
    if (rank == 0)
        err = mt_checkpoint_publish(tmp, run, c->cfg->model_path, c->mc, c->lora, master, NULL, NULL, NULL, 0, meta,
                                    (int)c->cfg->checkpoint_keep);
    return err;
}

// A checkpoint written in the background: the state read back (owned until
// written), what to write, and how it went.
struct mt_ckpt_writer {
    pthread_t thread;
    int joinable;  // 0: no thread could be made; it was written in place
    mt_run_state *c;
    mt_updater_state us;
    mt_checkpoint_meta meta;
    double start;
    mt_err err;
    char message[2048];  // the error's (mt_last_error is per thread)
};

static double write_delay;  // mt_run_state_delay_writes

void mt_run_state_delay_writes(double seconds) { write_delay = seconds; }

static void *write_in_background(void *arg) {
    mt_ckpt_writer *w = arg;
    if (write_delay > 0) {
        struct timespec ts = {(time_t)write_delay, (long)((write_delay - (double)(time_t)write_delay) * 1e9)};
        nanosleep(&ts, NULL);
    }
    const mt_run_state *c = w->c;
    const mt_updater_state *us = &w->us;
    w->err = us->streamed
                 ? mt_checkpoint_write_from(c->cfg->output_dir, c->cfg->model_path, c->mc, us->from, us->extra,
                                            us->n_extra, &w->meta, (int)c->cfg->checkpoint_keep)
                 : mt_checkpoint_write(c->cfg->output_dir, c->cfg->model_path, c->mc, c->lora, us->master, us->m, us->v,
                                       us->extra, us->n_extra, &w->meta, (int)c->cfg->checkpoint_keep);
    if (w->err)
        snprintf(w->message, sizeof w->message, "%s", mt_last_error());
    else
        mt_info("checkpoint: %s/checkpoints/step-%08ld written (%.1fs after its step)", c->cfg->output_dir,
                w->meta.step, mt_now() - w->start);
    return NULL;
}

mt_err mt_run_state_wait(mt_run_state *c, int collective) {
    mt_err err = MT_OK;
    long step = 0;
    if (c->writer) {
        if (c->writer->joinable) pthread_join(c->writer->thread, NULL);
        step = c->writer->meta.step;
        if (c->writer->err) err = mt_errorf(c->writer->err, "%s", c->writer->message);
        mt_updater_state_free(&c->writer->us);
        free(c->writer);
        c->writer = NULL;
    }
    if (collective && mt_dist_any(c->dist, err != MT_OK) && !err)
        err = mt_errorf(MT_ERR_IO, "rank 0 could not write the checkpoint of step %ld (its log says why)", step);
    return err;
}

// How a checkpoint reads the state (every rank decides alike). An offloaded
// full fine-tune writes in the background from a snapshot of the store (its
// arrays copied in its own encoding); where there is none (the SSD tier,
// offload.delay) from a host copy of the state. It writes straight from the
// store where it is written in place anyway, or where the copy would not fit;
// the loop then waits for the write. *can_stream: whether it may.
static mt_state_read read_way(const mt_run_state *c, int background, int *can_stream) {
    static int told;
    size_t copy_bytes, snapshot_bytes;
    *can_stream = mt_updater_state_streams(c->up, &copy_bytes, &snapshot_bytes);
    double host = *can_stream && background ? mt_host_plannable() : 0;  // (read only where it decides)
    mt_state_read how = MT_STATE_COPY;
    if (*can_stream && !background)
        how = MT_STATE_STREAM;
    else if (*can_stream && snapshot_bytes > 0 && !(host > 0 && (double)snapshot_bytes > host))
        how = MT_STATE_SNAPSHOT;
    else if (*can_stream && host > 0 && (double)copy_bytes > host)
        how = MT_STATE_STREAM;
    if (how == MT_STATE_STREAM && background && !told++)
        mt_info(
            "checkpoint: written straight from the offload store while training waits: a copy for a background "
            "write takes %.1f GiB, more than the %.1f GiB of host memory the run may still take",
            (double)(snapshot_bytes > 0 ? snapshot_bytes : copy_bytes) / 1073741824.0, host / 1073741824.0);
    return how;
}

mt_err mt_run_state_save(mt_run_state *c, long steps_done) {
    mt_err err = mt_run_state_wait(c, 1);  // the last one first: its host copies are about to be read again
    if (err) return err;
    double t0 = mt_now();
    static int warned;
    int background = c->cfg->checkpoint_async && mt_checkpoint_background_ok();
    if (c->cfg->checkpoint_async && !background && !warned++)
        mt_warn(
            "checkpoint.async: this HDF5 library is not thread-safe (the loader reads with it meanwhile); "
            "checkpoints are written in place");
    int can_stream;
    mt_state_read how = read_way(c, background, &can_stream);
    int rank = mt_dist_rank(c->dist), in_background = !c->sharded && background && how != MT_STATE_STREAM;
    // ranks other than 0 write nothing in the background, so they read nothing either (only wait for updates)
    mt_updater_state us;
    err =
        mt_updater_read_state(c->up, steps_done, in_background && rank != 0 && can_stream ? MT_STATE_STREAM : how, &us);
    if (err && !us.master && !us.streamed) return err;  // no host copy for it
    float *master = us.master, *m = us.m, *v = us.v;
    int streamed = us.streamed;
    const mt_state_tensor *extra = us.extra;
    int n_extra = us.n_extra;
    mt_cursor cursor = mt_loader_get_cursor(c->train);
    mt_checkpoint_meta meta = {
        steps_done, cursor.epoch, cursor.batch, us.optimizer_steps, mt_config_training_hash(c->cfg), 0};
    if (in_background) {
        // rank 0 writes on its own thread; every rank learns how it went at the next wait
        if (!err && rank == 0) {
            mt_ckpt_writer *w = calloc(1, sizeof *w);
            MT_CHECK(w != NULL, "checkpoint writer");
            *w = (mt_ckpt_writer){.c = c, .us = us, .meta = meta, .start = t0};
            w->joinable = pthread_create(&w->thread, NULL, write_in_background, w) == 0;
            if (w->joinable)
                mt_info("checkpoint: step %ld %s in %.1fs; writing it in the background", steps_done,
                        us.snapshot ? "copied from the offload store" : "read back", mt_now() - t0);
            else
                write_in_background(w);  // no thread: here, its outcome reported at the next wait all the same
            c->writer = w;
            return MT_OK;
        }
        mt_updater_state_free(&us);
        return err;  // (a rank that failed to read stops; the others learn of it from the dist layer)
    }
    if (!err && c->sharded)
        err = write_sharded(c, &meta, master, m, v, extra, n_extra);
    else if (!err && streamed && rank == 0)
        err = mt_checkpoint_write_from(c->cfg->output_dir, c->cfg->model_path, c->mc, us.from, extra, n_extra, &meta,
                                       (int)c->cfg->checkpoint_keep);
    else if (!err && rank == 0)  // every rank holds the same state; rank 0 writes it
        err = mt_checkpoint_write(c->cfg->output_dir, c->cfg->model_path, c->mc, c->lora, master, m, v, extra, n_extra,
                                  &meta, (int)c->cfg->checkpoint_keep);
    if (mt_dist_any(c->dist, err != MT_OK) && !err)
        err = mt_errorf(MT_ERR_IO, "rank 0 could not write the checkpoint of step %ld (its log says why)", steps_done);
    mt_dist_heartbeat(c->dist);
    mt_updater_state_free(&us);
    if (!err)
        mt_info("checkpoint: %s/checkpoints/step-%08ld (%.1fs%s)", c->cfg->output_dir, steps_done, mt_now() - t0,
                streamed ? ", read straight from the offload store" : "");
    return err;
}

// A GPU run that checkpoints as it trains, with AdamW on the GPU: the host
// copies each checkpoint reads the master and the moments back into are
// page-locked once, here (which faults their pages in). A checkpoint's
// read-back, which training waits for, then runs at the copy engines'
// speed. Pageable, it went through the driver's staging copies and the
// first one faulted the moments' fresh pages in (H100, TinyLlama-1.1B
// shape: 5.7 s for the first read-back, 0.9 s for the next).
void mt_run_state_pin_copies(mt_run_state *c) {
    const mt_updater *u = c->up;
    if (!u->pl->use_gpu || !u->opt || c->cfg->checkpoint_every <= 0) return;
    size_t n = c->shard_hi - c->shard_lo;
    float *arrays[3] = {*u->trained, *u->moment_m, *u->moment_v};
    size_t bytes[3] = {c->trained_total * sizeof(float), n * sizeof(float), n * sizeof(float)};
    double t0 = mt_now(), pinned = 0, refused = 0;
    for (int k = 0; k < 3; k++) {
        // (small ones, LoRA's adapters say, copy fast anyway, and may share a page with another)
        if (!arrays[k] || bytes[k] < ((size_t)16 << 20)) continue;
        if (mt_host_register(arrays[k], bytes[k]))
            c->pinned[k] = arrays[k], pinned += (double)bytes[k];
        else
            refused += (double)bytes[k];
    }
    if (pinned > 0)
        mt_info(
            "checkpoint: %.2f GiB of host copies of the weights and moments page-locked in %.1fs (read back at "
            "the copy engines' speed)",
            pinned / 1073741824.0, mt_now() - t0);
    if (refused > 0)
        mt_warn(
            "checkpoint: %.2f GiB of host copies could not be page-locked (ulimit -l?); each checkpoint reads the "
            "state back through pageable copies, and training waits longer",
            refused / 1073741824.0);
}

void mt_run_state_unpin_copies(mt_run_state *c) {
    for (int k = 0; k < 3; k++) {
        if (c->pinned[k]) mt_host_unregister(c->pinned[k]);
        c->pinned[k] = NULL;
    }
}

mt_err mt_run_state_read_resume(const char *dir, const mt_config *cfg, const mt_model_config *mc,
                                const mt_lora_config *lora, float *trained, size_t shard_lo, size_t shard_hi, float *m,
                                float *v, mt_checkpoint_meta *meta) {
    mt_err err = mt_checkpoint_read(dir, mc, lora, trained, shard_lo, shard_hi, m, v, meta);
    if (err) return err;
    if (meta->config_hash != mt_config_training_hash(cfg))
        return mt_errorf(MT_ERR_CONFIG,
                         "%s was written by a run with a different configuration (model, data, train or optim "
                         "keys differ; see its run's config.yaml). Resume with the same settings, or start fresh "
                         "with --set train.resume= (empty) and another output.dir.",
                         dir);
    if (meta->step >= cfg->train_steps)
        return mt_errorf(MT_ERR_CONFIG, "%s is at step %ld, and train.steps is %ld: nothing left to train", dir,
                         meta->step, cfg->train_steps);
    return MT_OK;
}

mt_err mt_run_state_save_outputs(mt_run_state *s, int rank, int random_init, float **trained, float **host_params) {
    const mt_config *cfg = s->cfg;
    char path[1200];
    mt_err err = MT_OK;
    if (s->lora) {
        err = mt_updater_get_trained(s->up, *trained, NULL);
        snprintf(path, sizeof path, "%s/adapter", cfg->output_dir);
        if (!err && rank == 0) err = mt_lora_save(path, s->lora, cfg->model_path, s->table, s->n_trained, *trained);
        if (!err)
            mt_info("saved %s (PEFT layout; merge with: memtune merge --model %s --adapter %s -o MERGED)", path,
                    cfg->model_path, path);
        return err;
    }
    if (!*host_params) err = mt_state_copy_alloc(s->trained_total, 1, host_params);
    if (!err) err = mt_updater_get_trained(s->up, *host_params, NULL);
    mt_dtype dtype = !strcmp(cfg->output_save_dtype, "F32")    ? MT_DTYPE_F32
                     : !strcmp(cfg->output_save_dtype, "BF16") ? MT_DTYPE_BF16
                     : random_init                             ? MT_DTYPE_F32
                                                               : s->mc->dtype;
    snprintf(path, sizeof path, "%s/model", cfg->output_dir);
    if (!err && rank == 0) err = mt_hf_save(path, cfg->model_path, s->mc, *host_params, dtype);
    if (!err) mt_info("saved %s (%s, Hugging Face layout)", path, mt_dtype_name(dtype));
    return err;
}
