// trainer/state.c: reading a run's trained state back and writing
// checkpoints of it (state.h).
#define _POSIX_C_SOURCE 200809L
#include "trainer/state.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "trainer/hf.h"
#include "trainer/lora.h"

mt_offload_plan mt_offload_plan_make(const mt_param_info *table, int n, size_t lo, size_t hi,
                                     const unsigned char *projected, int L) {
    mt_offload_plan p = {malloc((size_t)(n ? n : 1) * sizeof *p.params), 0, projected != NULL,
                         malloc((size_t)(n ? n : 1) * sizeof *p.index), 0};
    MT_CHECK(p.params && p.index, "offload plan");
    for (int i = 0; i < n; i++) {
        size_t a = table[i].offset, b = a + table[i].count;
        p.index[i] = -1;
        if ((projected && projected[i]) || !mt_range_clip(&a, &b, lo, hi)) continue;
        p.index[i] = p.n;
        p.params[p.n++] = (mt_offload_param){a, b - a, table[i].decay, mt_param_forward_unit(table[i].name, L),
                                             projected ? p.count : a - lo};
        p.count += b - a;
    }
    if (!projected) p.count = hi - lo;
    return p;
}

void mt_offload_plan_free(mt_offload_plan *p) {
    free(p->params);
    free(p->index);
}

// Packed state arrays <-> the weights' layout.
void mt_offload_plan_scatter(const mt_offload_plan *p, const float *packed, float *weights_layout) {
    for (int k = 0; k < p->n; k++)
        memcpy(weights_layout + p->params[k].offset, packed + p->params[k].slot, p->params[k].count * sizeof(float));
}

void mt_offload_plan_gather(const mt_offload_plan *p, const float *weights_layout, float *packed) {
    for (int k = 0; k < p->n; k++)
        memcpy(packed + p->params[k].slot, weights_layout + p->params[k].offset, p->params[k].count * sizeof(float));
}

// The packed parameters' moments as checkpoint tensors, over m and v.
mt_state_tensor *mt_offload_plan_moments(const mt_offload_plan *p, const mt_param_info *table, int n, float *m,
                                         float *v) {
    mt_state_tensor *t = malloc((size_t)(2 * p->n + 1) * sizeof *t);
    MT_CHECK(t != NULL, "offload checkpoint tensors");
    for (int i = 0, k = 0; i < n; i++) {
        if (p->index[i] < 0) continue;
        const mt_offload_param *q = &p->params[p->index[i]];
        t[k++] = (mt_state_tensor){table[i].name, "exp_avg", 0, q->count, m + q->slot};
        t[k++] = (mt_state_tensor){table[i].name, "exp_avg_sq", 0, q->count, v + q->slot};
    }
    return t;
}

mt_err mt_state_copy_alloc(size_t n, int arrays, float **block) {
    *block = malloc((n ? n : 1) * (size_t)arrays * sizeof(float));
    if (*block) return MT_OK;
    return mt_errorf(MT_ERR_NOMEM,
                     "out of host memory for a copy of the offloaded optimizer state (%.1f GiB for checkpoints and the "
                     "saved model); free host memory, or save less often",
                     arrays * n * 4.0 / 1073741824.0);
}

// AdamW's whole master (on the GPU, or offloaded without GaLore) into dst,
// and with offload the moments of this rank's shard into m, v (NULL: not
// read); ZeRO: every rank gets every shard's master.
static mt_err read_master(mt_run_state *c, float *dst, float *m, float *v) {
    mt_err err = MT_OK;
    if (c->opt)
        mt_optimizer_get_master(c->opt, dst + c->shard_lo);
    else
        err = mt_offload_read_state(c->offload, dst + c->shard_lo, m, v);
    if (c->sharded) mt_dist_share_shards_host(c->dist, dst, c->trained_total);
    return err;
}

mt_err mt_run_state_get_trained(mt_run_state *c, float *dst, float *packed) {
    if ((c->offload && !c->plan->packed) || c->opt) return read_master(c, dst, NULL, NULL);
    float *own = NULL;
    mt_err err = MT_OK;
    if (c->offload) {
        size_t count = c->plan->count;
        if (!packed && (err = mt_state_copy_alloc(count, 1, &own))) return err;
        err = packed ? mt_offload_read_state(c->offload, packed, packed + count, packed + 2 * count)
                     : mt_offload_read_state(c->offload, own, NULL, NULL);
    }
    mt_model_get_trainable(c->model, dst);  // after the offloaded updates' copies (read_state waits for them)
    if (c->offload && !err) mt_offload_plan_scatter(c->plan, packed ? packed : own, dst);
    // GaLore under ZeRO: the store held only this rank's parameters' master
    if (c->offload && c->sharded && c->owned) mt_dist_share_ranges_host(c->dist, dst, c->owned);
    free(own);
    return err;
}

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

mt_err mt_run_state_save(mt_run_state *c, long steps_done) {
    float *master = c->master, *m = c->m, *v = c->v, *copy = NULL;
    mt_err err = MT_OK;
    int packed = c->offload && c->plan->packed;
    if (c->offload && !packed) {
        // the whole master (ZeRO: every rank's shard of it), this rank's moments
        size_t n = c->shard_hi - c->shard_lo;
        if ((err = mt_state_copy_alloc(c->trained_total + 2 * n, 1, &copy))) return err;
        master = copy, m = copy + c->trained_total, v = m + n;
        err = read_master(c, master, m, v);
    } else {
        if (packed && (err = mt_state_copy_alloc(c->plan->count, 3, &copy))) return err;
        err = mt_run_state_get_trained(c, master, copy);
        if (c->opt) mt_optimizer_get_moments(c->opt, m, v);
    }
    mt_state_tensor *extra = NULL, *all = NULL;
    int n_extra = 0;
    if (c->galore) {
        n_extra = mt_galore_state(c->galore, &extra);
        mt_galore_state_download(c->galore);
    }
    if (packed) {
        // GaLore's tensors, then those of the offloaded parameters
        size_t count = c->plan->count;
        mt_state_tensor *mine =
            mt_offload_plan_moments(c->plan, c->table, c->n_trained, copy + count, copy + 2 * count);
        all = malloc((size_t)(n_extra + 2 * c->plan->n + 1) * sizeof *all);
        MT_CHECK(all != NULL, "checkpoint tensors");
        memcpy(all, extra, (size_t)n_extra * sizeof *all);
        memcpy(all + n_extra, mine, (size_t)(2 * c->plan->n) * sizeof *all);
        free(mine);
        extra = all, n_extra += 2 * c->plan->n;
    }
    mt_cursor cursor = mt_loader_get_cursor(c->train);
    int optimizer_steps = c->opt       ? mt_optimizer_steps_taken(c->opt)
                          : c->galore  ? mt_galore_steps_taken(c->galore)
                          : c->offload ? mt_offload_steps_taken(c->offload)
                                       : (int)steps_done;
    mt_checkpoint_meta meta = {steps_done, cursor.epoch, cursor.batch, optimizer_steps, mt_config_training_hash(c->cfg),
                               0};
    double t0 = mt_now();
    if (!err && c->sharded)
        err = write_sharded(c, &meta, master, m, v, extra, n_extra);
    else if (!err && mt_dist_rank(c->dist) == 0)  // every rank holds the same state; rank 0 writes it
        err = mt_checkpoint_write(c->cfg->output_dir, c->cfg->model_path, c->mc, c->lora, master, m, v, extra, n_extra,
                                  &meta, (int)c->cfg->checkpoint_keep);
    if (mt_dist_any(c->dist, err != MT_OK) && !err)
        err = mt_errorf(MT_ERR_IO, "rank 0 could not write the checkpoint of step %ld (its log says why)", steps_done);
    mt_dist_heartbeat(c->dist);
    free(all);
    free(copy);
    if (!err) mt_info("checkpoint: %s/checkpoints/step-%08ld (%.1fs)", c->cfg->output_dir, steps_done, mt_now() - t0);
    return err;
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
        err = mt_run_state_get_trained(s, *trained, NULL);
        snprintf(path, sizeof path, "%s/adapter", cfg->output_dir);
        if (!err && rank == 0) err = mt_lora_save(path, s->lora, cfg->model_path, s->table, s->n_trained, *trained);
        if (!err)
            mt_info("saved %s (PEFT layout; merge with: memtune merge --model %s --adapter %s -o MERGED)", path,
                    cfg->model_path, path);
        return err;
    }
    if (!*host_params) err = mt_state_copy_alloc(s->trained_total, 1, host_params);
    if (!err) err = mt_run_state_get_trained(s, *host_params, NULL);
    mt_dtype dtype = !strcmp(cfg->output_save_dtype, "F32")    ? MT_DTYPE_F32
                     : !strcmp(cfg->output_save_dtype, "BF16") ? MT_DTYPE_BF16
                     : random_init                             ? MT_DTYPE_F32
                                                               : s->mc->dtype;
    snprintf(path, sizeof path, "%s/model", cfg->output_dir);
    if (!err && rank == 0) err = mt_hf_save(path, cfg->model_path, s->mc, *host_params, dtype);
    if (!err) mt_info("saved %s (%s, Hugging Face layout)", path, mt_dtype_name(dtype));
    return err;
}
