// offload/offload.c: the offloaded optimizer step (offload.h). The main
// thread issues device work (casts, copies, stream waits) and never computes;
// one worker thread owns the CPU side (norm sums, AdamW over the store,
// copies back), fed through a queue. Per-step device events come in two sets
// (step parity), because the next step's forward waits on this step's
// updates while its own backward records new ones.
#define _GNU_SOURCE  // sched_getaffinity
#include "offload/offload.h"

#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "kernels/dtype.h"
#include "kernels/mem.h"
#include "kernels/ops.h"
#include "offload/cpu_adam.h"

#define STAGES 4  // bf16 weight buffers between the CPU update and the copy back

typedef struct {
    int unit;                          // the model's forward unit it belongs to
    int first, end;                    // its parameters, [first, end) of params
    size_t offset, count;              // its state's slots (padding included)
    int remaining;                     // parameters still to arrive this step
    int ring;                          // device staging buffer of this step (GPU)
    double sumsq;                      // of this step's gradients
    long arrived, ready;               // last step whose sum is in / whose update is issued (or skipped)
    long sent, taken;                  // accumulation: landings copied to the host / added to the sum
    long updated, copied;              // delay: last step whose update is in `shadow` / was copied to the weights
                                       // (-1: none; 0: a resumed state's, mt_offload_set_pending)
    double t_sum[2][2], t_adam[2][2];  // trace: host seconds, per step parity
    double t_wait[2][2];               // trace, delay: the training thread's wait for the bucket's last update
} bucket;

enum {
    MSG_ARRIVE,  // the step's (last micro-batch's) gradients are in: sum their squares
    MSG_UPDATE,  // apply the update
    MSG_ADD      // an earlier micro-batch's gradients are in: add them to the sum
};

typedef struct {
    int kind;  // MSG_*
    int bucket;
    long step;
    int micro;  // the micro-batch (MSG_ADD, MSG_ARRIVE)
} message;

struct mt_offload {
    double (*norm_sum)(void *ctx, double local);  // ZeRO: the shard's sum of squares -> the whole's
    void *norm_ctx;
    mt_backend *be;
    mt_offload_config cfg;
    char trace_path[1024];
    mt_cpu_adam_path path;
    mt_offload_param *params;
    int n_params;
    bucket *buckets;
    int n_buckets;
    int *unit_bucket;  // the model's forward unit -> its bucket, or -1
    int n_units;
    size_t total;
    mt_store *store;
    void *weights;
    void *grad_host;  // total values: bf16 (GPU; pinned) or fp32 (CPU; with accumulation, the sum)
    float *grad_sum;  // accumulation from a GPU: the fp32 sum over the micro-batches (else NULL)
    int gpu;
    // device side
    void *ring[2];  // bf16 gradients of one bucket each
    void *ring_free[2];
    int ring_next;
    size_t ring_count;
    void *d2h, *h2d, *marker;
    void **ev;  // 6 kinds x 2 parities x n_buckets
    uint16_t *stage[STAGES];
    void *stage_done[STAGES];
    int stage_next;
    void *shadow;  // delay: the updated weights in the slots' layout (bf16, pinned, from a GPU; fp32 on the CPU)
    // the worker
    pthread_t worker;
    int has_worker, stop;
    pthread_mutex_t lock;
    pthread_cond_t changed;
    message *queue;
    int queue_head, queue_len, queue_cap;
    // the step
    long gen;     // steps begun
    int in_step;  // between begin and end
    int steps;    // updates applied (AdamW's t)
    int micro;    // the micro-batch handing its gradients over
    int step_finite, applied;
    float lr;
    mt_cpu_adam_step adam_decay, adam_plain;
    mt_err error;
    char error_msg[1024];
    // trace
    void *origin;
    double origin_host;
    int trace_written;
};

enum { EV_FORWARD, EV_GRADS, EV_D2H_START, EV_D2H, EV_H2D_START, EV_UPDATED, EV_KINDS };

static void *event(mt_offload *o, int kind, long step, int b) {
    return o->ev[((size_t)kind * 2 + (size_t)(step & 1)) * o->n_buckets + b];
}

static void post(mt_offload *o, int kind, int b, long step) {
    pthread_mutex_lock(&o->lock);
    MT_CHECK(o->queue_len < o->queue_cap, "offload queue full");
    o->queue[(o->queue_head + o->queue_len) % o->queue_cap] = (message){kind, b, step, o->micro};
    o->queue_len++;
    pthread_cond_broadcast(&o->changed);
    pthread_mutex_unlock(&o->lock);
}

static void mark_ready(mt_offload *o, int b, long step, int applied) {
    pthread_mutex_lock(&o->lock);
    o->buckets[b].ready = step;
    if (applied) o->buckets[b].updated = step;
    o->applied += applied;
    pthread_cond_broadcast(&o->changed);
    pthread_mutex_unlock(&o->lock);
}

static void record_error(mt_offload *o, mt_err err) {
    pthread_mutex_lock(&o->lock);
    if (!o->error) {
        o->error = err;
        snprintf(o->error_msg, sizeof o->error_msg, "%s", mt_last_error());
    }
    pthread_cond_broadcast(&o->changed);
    pthread_mutex_unlock(&o->lock);
}

// The gradients the norm and the update read at a slot: the fp32 sum
// (accumulation from a GPU) or what crossed (bf16 from a GPU, fp32 on the CPU).
static int grads_bf16(const mt_offload *o) { return o->gpu && !o->grad_sum; }
static const void *grads_at(const mt_offload *o, size_t slot) {
    if (o->grad_sum) return o->grad_sum + slot;
    return (const char *)o->grad_host + slot * (o->gpu ? 2 : 4);
}

// A block's AdamW, a piece at a time on every thread (mt_store_update_pieces):
// each parameter's part of piece [lo, hi), its bf16 weights into out (the
// block's staging buffer, with delay the shadow, or none).
typedef struct {
    mt_offload *o;
    const bucket *k;
    const mt_store_block *blk;
    uint16_t *stage;
} piece_update;

static void update_piece(void *ctx, size_t lo, size_t hi, float *m, float *v) {
    const piece_update *u = ctx;
    mt_offload *o = u->o;
    for (int p = u->k->first; p < u->k->end; p++) {
        const mt_offload_param *pa = &o->params[p];
        size_t a = pa->slot > lo ? pa->slot : lo, e = pa->slot + pa->count < hi ? pa->slot + pa->count : hi;
        if (a >= e) continue;
        size_t at = a - u->blk->offset;
        uint16_t *out = o->cfg.delay && o->gpu ? (uint16_t *)o->shadow + a : u->stage ? u->stage + at : NULL;
        mt_cpu_adam_update(o->path, pa->decay ? &o->adam_decay : &o->adam_plain, u->blk->master + at, m + (a - lo),
                           v + (a - lo), grads_at(o, a), grads_bf16(o), out, e - a);
    }
}

// AdamW over bucket b's state, block by block, each block's bf16 weights
// copied back as soon as it is done; with delay the new weights go to the
// shadow instead (in the slots' layout), once its last copy to the weights
// has been made.
static void update_bucket(mt_offload *o, int b, long step) {
    bucket *k = &o->buckets[b];
    int delay = o->cfg.delay, copies = o->gpu && !delay;  // this thread copies the weights to the GPU
    k->t_adam[step & 1][0] = mt_now();
    if (delay && o->gpu && k->copied >= 0) mt_event_synchronize(event(o, EV_UPDATED, k->copied, b));
    mt_store_begin(o->store, k->offset, k->offset + k->count, MT_STORE_UPDATE_PIECES);
    mt_store_block blk;
    int first = 1;
    while (mt_store_next(o->store, &blk)) {
        uint16_t *stage = NULL;
        int s = 0;
        if (copies) {
            s = o->stage_next;
            o->stage_next = (o->stage_next + 1) % STAGES;
            mt_event_synchronize(o->stage_done[s]);  // its previous copy is done
            stage = o->stage[s];
            if (first) mt_event_record(event(o, EV_H2D_START, step, b), o->h2d);
            first = 0;
        }
        piece_update pu = {o, k, &blk, stage};
        mt_store_update_pieces(o->store, &blk, update_piece, &pu);
        size_t blk_end = blk.offset + blk.count;
        // the weights go back in runs: parameters the same distance apart in
        // both layouts share a copy (all of a block, when slots are offsets)
        size_t run_w = 0, run_at = 0, run_n = 0;
        for (int p = k->first; p < k->end; p++) {
            const mt_offload_param *pa = &o->params[p];
            size_t lo = pa->slot > blk.offset ? pa->slot : blk.offset;
            size_t hi = pa->slot + pa->count < blk_end ? pa->slot + pa->count : blk_end;
            if (lo >= hi) continue;
            size_t at = lo - blk.offset, w = pa->offset + (lo - pa->slot);
            if (!o->gpu) {  // the CPU's weights (with delay its shadow) are the master values
                memcpy(delay ? (float *)o->shadow + lo : (float *)o->weights + w, blk.master + at,
                       (hi - lo) * sizeof(float));
            } else if (copies && run_n && w - run_w == at - run_at) {
                run_n = at + (hi - lo) - run_at;
            } else if (copies) {
                if (run_n) mt_memcpy_async((uint16_t *)o->weights + run_w, stage + run_at, run_n * 2, o->h2d);
                run_w = w, run_at = at, run_n = hi - lo;
            }
        }
        if (copies) {
            if (run_n) mt_memcpy_async((uint16_t *)o->weights + run_w, stage + run_at, run_n * 2, o->h2d);
            mt_event_record(o->stage_done[s], o->h2d);
        }
        mt_store_done(o->store, &blk);
    }
    mt_err err = mt_store_end(o->store);
    if (err) record_error(o, err);
    if (copies) mt_event_record(event(o, EV_UPDATED, step, b), o->h2d);
    k->t_adam[step & 1][1] = mt_now();
    mark_ready(o, b, step, !err);
}

// Delay: bucket b's last update, from the shadow into the weights, if not
// there yet; from a GPU on the copy stream after `after` (recorded on the
// compute stream once nothing reads the bucket's weights any more). The
// main thread calls it once the update is ready.
static void copy_bucket(mt_offload *o, int b, void *after) {
    bucket *k = &o->buckets[b];
    if (k->updated <= k->copied) return;
    if (o->gpu && after) mt_stream_wait_event(o->h2d, after);
    if (o->gpu) mt_event_record(event(o, EV_H2D_START, k->updated, b), o->h2d);  // (the trace's)
    for (int p = k->first; p < k->end; p++) {
        const mt_offload_param *pa = &o->params[p];
        if (o->gpu)
            mt_memcpy_async((uint16_t *)o->weights + pa->offset, (uint16_t *)o->shadow + pa->slot, pa->count * 2,
                            o->h2d);
        else
            memcpy((float *)o->weights + pa->offset, (float *)o->shadow + pa->slot, pa->count * sizeof(float));
    }
    if (o->gpu) mt_event_record(event(o, EV_UPDATED, k->updated, b), o->h2d);
    k->copied = k->updated;
}

// Delay: blocks until the update of bucket b from `step` is done (or skipped).
static void wait_ready(mt_offload *o, int b, long step) {
    pthread_mutex_lock(&o->lock);
    while (!o->error && o->buckets[b].ready < step) pthread_cond_wait(&o->changed, &o->lock);
    pthread_mutex_unlock(&o->lock);
}

// Accumulation from a GPU: bucket b's bf16 gradients, landed, into the fp32
// sum, parameter by parameter (padding between slots stays 0); then the
// landing may take the next micro-batch's.
static void add_landed(mt_offload *o, int b, long step, int micro) {
    bucket *k = &o->buckets[b];
    mt_event_synchronize(event(o, EV_D2H, step, b));
    for (int p = k->first; p < k->end; p++) {
        const mt_offload_param *pa = &o->params[p];
        mt_cpu_accumulate(o->grad_sum + pa->slot, (const uint16_t *)o->grad_host + pa->slot, 1, pa->count, micro == 0);
    }
    pthread_mutex_lock(&o->lock);
    k->taken++;
    pthread_cond_broadcast(&o->changed);
    pthread_mutex_unlock(&o->lock);
}

// Bucket b's gradients (the step's last) are in host memory: their sum of
// squares, and without clipping the update right away.
static void arrive(mt_offload *o, int b, long step, int micro) {
    bucket *k = &o->buckets[b];
    if (o->grad_sum)
        add_landed(o, b, step, micro);
    else if (o->gpu)
        mt_event_synchronize(event(o, EV_D2H, step, b));
    k->t_sum[step & 1][0] = mt_now();
    double sum = mt_cpu_sumsq(grads_at(o, k->offset), grads_bf16(o), k->count);
    k->t_sum[step & 1][1] = mt_now();
    pthread_mutex_lock(&o->lock);
    k->sumsq = sum;
    k->arrived = step;
    if (!isfinite(sum)) o->step_finite = 0;
    int apply = o->step_finite;
    pthread_cond_broadcast(&o->changed);
    pthread_mutex_unlock(&o->lock);
    if (o->cfg.grad_clip > 0.0f) return;
    if (apply)
        update_bucket(o, b, step);
    else
        mark_ready(o, b, step, 0);
}

static void *worker_main(void *arg) {
    mt_offload *o = arg;
    int cores;  // (0: one rank's; one core stays with the thread that drives the GPU)
    omp_set_num_threads(o->cfg.threads > 0 ? o->cfg.threads : mt_offload_auto_threads(1, 1, &cores));
    pthread_mutex_lock(&o->lock);
    for (;;) {
        while (!o->stop && o->queue_len == 0) pthread_cond_wait(&o->changed, &o->lock);
        if (o->stop) break;
        message msg = o->queue[o->queue_head];
        o->queue_head = (o->queue_head + 1) % o->queue_cap;
        o->queue_len--;
        pthread_mutex_unlock(&o->lock);
        if (msg.kind == MSG_UPDATE)
            update_bucket(o, msg.bucket, msg.step);
        else if (msg.kind == MSG_ADD)
            add_landed(o, msg.bucket, msg.step, msg.micro);
        else
            arrive(o, msg.bucket, msg.step, msg.micro);
        pthread_mutex_lock(&o->lock);
    }
    pthread_mutex_unlock(&o->lock);
    return NULL;
}

int mt_offload_segments(const mt_offload_param *params, int n_params, size_t total, size_t *seg) {
    int n = 0;
    seg[n++] = 0;
    for (int p = 0; p < n_params; p++) {
        size_t edges[2] = {params[p].slot, params[p].slot + params[p].count};
        for (int e = 0; e < 2; e++)
            if (edges[e] > seg[n - 1] && edges[e] < total) seg[n++] = edges[e];
    }
    return n;
}

mt_err mt_offload_init(mt_offload **out, mt_backend *be, const mt_offload_config *cfg, const mt_offload_param *params,
                       int n_params, size_t total, void *weights, const float *master, const float *m, const float *v,
                       int steps) {
    *out = NULL;
    mt_offload *o = calloc(1, sizeof *o);
    MT_CHECK(o != NULL, "offload");
    o->be = be;
    o->cfg = *cfg;
    o->gpu = be->gpu;
    o->weights = weights;
    o->total = total;
    o->path = mt_cpu_adam_best_path();
    if (cfg->trace_path) snprintf(o->trace_path, sizeof o->trace_path, "%s", cfg->trace_path);
    o->cfg.trace_path = cfg->trace_path ? o->trace_path : NULL;
    o->params = malloc((size_t)(n_params ? n_params : 1) * sizeof *params);
    MT_CHECK(o->params != NULL, "offload params");
    memcpy(o->params, params, (size_t)n_params * sizeof *params);
    o->n_params = n_params;
    pthread_mutex_init(&o->lock, NULL);
    pthread_cond_init(&o->changed, NULL);

    // buckets: runs of parameters with the same forward unit, in offset
    // order; a unit without trained parameters (the embedding, with LoRA)
    // has no bucket, so the model's unit ids map to bucket indices
    for (int p = 0; p < n_params; p++) {
        MT_CHECK(p == 0 || params[p].offset >= params[p - 1].offset + params[p - 1].count, "offload params unsorted");
        MT_CHECK((p == 0 || params[p].slot >= params[p - 1].slot + params[p - 1].count) &&
                     params[p].slot + params[p].count <= total,
                 "offload slots must ascend, apart, within the %zu values (parameter %d)", total, p);
        MT_CHECK(params[p].bucket >= 0 && (p == 0 || params[p].bucket >= params[p - 1].bucket),
                 "offload buckets must be contiguous and ascending (parameter %d)", p);
    }
    o->n_units = n_params ? params[n_params - 1].bucket + 1 : 0;
    o->buckets = calloc((size_t)(o->n_units ? o->n_units : 1), sizeof *o->buckets);
    o->unit_bucket = malloc((size_t)(o->n_units ? o->n_units : 1) * sizeof *o->unit_bucket);
    MT_CHECK(o->buckets && o->unit_bucket, "offload buckets");
    for (int u = 0; u < o->n_units; u++) o->unit_bucket[u] = -1;
    for (int p = 0; p < n_params;) {
        int q = p;
        while (q < n_params && params[q].bucket == params[p].bucket) q++;
        int b = o->n_buckets++;
        bucket *k = &o->buckets[b];
        k->unit = params[p].bucket;
        k->first = p;
        k->end = q;
        k->offset = params[p].slot;
        k->count = params[q - 1].slot + params[q - 1].count - k->offset;
        k->updated = k->copied = -1;
        if (k->count > o->ring_count) o->ring_count = k->count;
        o->unit_bucket[params[p].bucket] = b;
        for (; p < q; p++) o->params[p].bucket = b;
    }

    // int8 moments: quantization blocks never cross a bucket's start or end
    size_t *segments = malloc((size_t)(2 * n_params + 1) * sizeof *segments);
    MT_CHECK(segments != NULL, "offload segments");
    int n_segments = mt_offload_segments(params, n_params, total, segments);
    mt_store_config sc = {cfg->kind,         cfg->dir,        total, cfg->rank,         cfg->world > 0 ? cfg->world : 1,
                          cfg->block_params, cfg->io_threads, 0,     cfg->int8_moments, segments,
                          n_segments};
    mt_err err = mt_store_open(&o->store, &sc);
    free(segments);
    if (!err && master) err = mt_store_write_all(o->store, master, m, v);
    o->steps = steps;
    if (!err) err = mt_alloc(&o->grad_host, (total ? total : 1) * (o->gpu ? 2 : 4), MT_MEM_OFFLOAD, MT_HOST);
    if (!err && o->gpu && cfg->micro_batches > 1)
        err = mt_alloc_host_large((void **)&o->grad_sum, (total ? total : 1) * sizeof(float), MT_MEM_OFFLOAD);
    if (!err && cfg->delay) err = mt_alloc(&o->shadow, (total ? total : 1) * (o->gpu ? 2 : 4), MT_MEM_OFFLOAD, MT_HOST);
    if (!err && o->gpu) {
        for (int r = 0; r < 2 && !err; r++)
            err = mt_alloc(&o->ring[r], (o->ring_count ? o->ring_count : 1) * 2, MT_MEM_GRADS, MT_DEVICE);
        for (int s = 0; s < STAGES && !err; s++) {
            err = mt_alloc((void **)&o->stage[s], mt_store_block_params(o->store) * 2, MT_MEM_OFFLOAD, MT_HOST);
            o->stage_done[s] = mt_event_create();
        }
        o->d2h = mt_stream_create();
        o->h2d = mt_stream_create();
        o->marker = mt_stream_create();
        o->origin = mt_event_create();
        o->ev = calloc((size_t)EV_KINDS * 2 * o->n_buckets, sizeof *o->ev);
        MT_CHECK(o->ev != NULL, "offload events");
        for (size_t e = 0; e < (size_t)EV_KINDS * 2 * o->n_buckets; e++) o->ev[e] = mt_event_create();
        o->queue_cap = 4 * o->n_buckets + 4;
        o->queue = calloc((size_t)o->queue_cap, sizeof *o->queue);
        MT_CHECK(o->queue != NULL, "offload queue");
        if (!err) {
            MT_CHECK(pthread_create(&o->worker, NULL, worker_main, o) == 0, "offload worker");
            o->has_worker = 1;
        }
    } else if (!err && cfg->threads > 0) {
        omp_set_num_threads(cfg->threads);
    }
    if (err) {
        mt_offload_free(o);
        return err;
    }
    *out = o;
    return MT_OK;
}

mt_err mt_offload_write_state(mt_offload *o, size_t offset, size_t count, const float *values, const float *m,
                              const float *v) {
    size_t end = offset + count, lo_slot = SIZE_MAX, hi_slot = 0;
    for (int p = 0; p < o->n_params; p++) {  // the slots the range's parameters take
        const mt_offload_param *pa = &o->params[p];
        if (pa->offset + pa->count <= offset || pa->offset >= end) continue;
        size_t a = pa->offset > offset ? pa->offset : offset,
               b = pa->offset + pa->count < end ? pa->offset + pa->count : end;
        if (pa->slot + (a - pa->offset) < lo_slot) lo_slot = pa->slot + (a - pa->offset);
        if (pa->slot + (b - pa->offset) > hi_slot) hi_slot = pa->slot + (b - pa->offset);
    }
    if (lo_slot >= hi_slot) return MT_OK;
    mt_store_begin(o->store, lo_slot, hi_slot, MT_STORE_UPDATE);
    mt_store_block blk;
    while (mt_store_next(o->store, &blk)) {
        size_t blk_end = blk.offset + blk.count;
        for (int p = 0; p < o->n_params; p++) {
            const mt_offload_param *pa = &o->params[p];
            size_t a = pa->offset > offset ? pa->offset : offset,
                   b = pa->offset + pa->count < end ? pa->offset + pa->count : end;
            if (a >= b) continue;
            size_t s0 = pa->slot + (a - pa->offset), s1 = pa->slot + (b - pa->offset);  // their slots, in the block
            if (s0 < blk.offset) s0 = blk.offset;
            if (s1 > blk_end) s1 = blk_end;
            if (s0 >= s1) continue;
            size_t at = pa->offset + (s0 - pa->slot) - offset, bytes = (s1 - s0) * sizeof(float);
            memcpy(blk.master + (s0 - blk.offset), values + at, bytes);
            if (m) memcpy(blk.m + (s0 - blk.offset), m + at, bytes);
            if (v) memcpy(blk.v + (s0 - blk.offset), v + at, bytes);
        }
        mt_store_done(o->store, &blk);
    }
    return mt_store_end(o->store);
}

void mt_offload_free(mt_offload *o) {
    if (!o) return;
    if (o->has_worker) {
        pthread_mutex_lock(&o->lock);
        o->stop = 1;
        pthread_cond_broadcast(&o->changed);
        pthread_mutex_unlock(&o->lock);
        pthread_join(o->worker, NULL);
    }
    if (o->gpu) {
        mt_device_synchronize();
        for (size_t e = 0; o->ev && e < (size_t)EV_KINDS * 2 * o->n_buckets; e++) mt_event_destroy(o->ev[e]);
        for (int s = 0; s < STAGES; s++) {
            mt_event_destroy(o->stage_done[s]);
            mt_free((void **)&o->stage[s]);
        }
        mt_event_destroy(o->origin);
        mt_stream_destroy(o->d2h);
        mt_stream_destroy(o->h2d);
        mt_stream_destroy(o->marker);
        for (int r = 0; r < 2; r++) mt_free(&o->ring[r]);
    }
    free(o->ev);
    free(o->queue);
    mt_free(&o->grad_host);
    mt_free((void **)&o->grad_sum);
    mt_free(&o->shadow);
    mt_store_close(o->store);
    pthread_mutex_destroy(&o->lock);
    pthread_cond_destroy(&o->changed);
    free(o->buckets);
    free(o->unit_bucket);
    free(o->params);
    free(o);
}

static void prepare(mt_offload *o, int t, float scale) {
    const mt_offload_config *c = &o->cfg;
    mt_cpu_adam_prepare(&o->adam_decay, o->lr, c->beta1, c->beta2, c->eps, c->weight_decay, t, scale);
    mt_cpu_adam_prepare(&o->adam_plain, o->lr, c->beta1, c->beta2, c->eps, 0.0f, t, scale);
}

static void write_trace(mt_offload *o);

// Every parameter's gradient is due (once) from the next backward.
static void expect_gradients(mt_offload *o) {
    for (int b = 0; b < o->n_buckets; b++) {
        o->buckets[b].remaining = o->buckets[b].end - o->buckets[b].first;
        o->buckets[b].ring = -1;
    }
}

void mt_offload_micro_batch(mt_offload *o, int micro) {
    MT_CHECK(o->in_step && micro == o->micro + 1 && micro < o->cfg.micro_batches,
             "micro-batch %d announced after micro-batch %d of %d (or outside a step)", micro, o->micro,
             o->cfg.micro_batches);
    for (int b = 0; b < o->n_buckets; b++)
        MT_CHECK(o->buckets[b].remaining == 0, "micro-batch %d began before micro-batch %d's gradients were all in",
                 micro, o->micro);
    o->micro = micro;
    expect_gradients(o);
}

void mt_offload_begin_step(mt_offload *o, float lr) {
    if (o->gpu && o->cfg.trace_path && !o->trace_written && o->gen == o->cfg.trace_step + 1) write_trace(o);
    pthread_mutex_lock(&o->lock);
    o->gen++;
    o->in_step = 1;
    o->step_finite = 1;
    o->applied = 0;
    o->lr = lr;
    o->micro = 0;
    pthread_mutex_unlock(&o->lock);
    expect_gradients(o);
    // without clipping the factor is 1 and the update can start per bucket
    if (o->cfg.grad_clip <= 0.0f) prepare(o, o->steps + 1, 1.0f);
    if (o->gpu && o->cfg.trace_path && o->gen == o->cfg.trace_step) {
        mt_event_record(o->origin, o->marker);  // the marker stream is idle: this is now
        o->origin_host = mt_now();
    }
}

void mt_offload_grad(mt_offload *o, int param, const float *grad) {
    const mt_offload_param *pa = &o->params[param];
    int b = pa->bucket;
    bucket *k = &o->buckets[b];
    MT_CHECK(o->in_step && k->remaining > 0, "gradient of parameter %d outside a step or twice", param);
    int last = o->micro + 1 >= o->cfg.micro_batches;  // the step's last micro-batch (or no accumulation)
    if (!o->gpu) {
        // (with accumulation grad_host is the sum)
        mt_cpu_accumulate((float *)o->grad_host + pa->slot, grad, 0, pa->count, o->micro == 0);
    } else {
        if (k->ring < 0) {
            k->ring = o->ring_next;
            o->ring_next ^= 1;
            if (o->ring_free[k->ring]) mt_stream_wait_event(NULL, o->ring_free[k->ring]);
        }
        mt_op_cast_from_f32(o->be, (uint16_t *)o->ring[k->ring] + (pa->slot - k->offset), grad, pa->count);
    }
    if (--k->remaining > 0) return;
    if (!o->gpu) {
        if (o->cfg.delay && last) copy_bucket(o, b, NULL);  // the last update (made inline) now reaches the weights
        if (last) arrive(o, b, o->gen, o->micro);
        return;
    }
    // delay: the last update must be done before its weights are copied, and before these gradients land where
    // it reads them (the landing, without a separate sum)
    if (o->cfg.delay && (last || !o->grad_sum)) {
        k->t_wait[o->gen & 1][0] = mt_now();
        wait_ready(o, b, o->gen - 1);
        k->t_wait[o->gen & 1][1] = mt_now();
    }
    if (o->grad_sum) {
        // the landing is free once the worker has added the micro-batch before
        pthread_mutex_lock(&o->lock);
        while (k->taken < k->sent) pthread_cond_wait(&o->changed, &o->lock);
        pthread_mutex_unlock(&o->lock);
        k->sent++;
    }
    mt_event_record(event(o, EV_GRADS, o->gen, b), NULL);
    mt_stream_wait_event(o->d2h, event(o, EV_GRADS, o->gen, b));
    mt_event_record(event(o, EV_D2H_START, o->gen, b), o->d2h);
    mt_memcpy_async((uint16_t *)o->grad_host + k->offset, o->ring[k->ring], k->count * 2, o->d2h);
    mt_event_record(event(o, EV_D2H, o->gen, b), o->d2h);
    o->ring_free[k->ring] = event(o, EV_D2H, o->gen, b);
    if (o->cfg.delay && last) copy_bucket(o, b, event(o, EV_GRADS, o->gen, b));  // backward is done with them
    post(o, last ? MSG_ARRIVE : MSG_ADD, b, o->gen);
}

mt_err mt_offload_end_step(mt_offload *o, double *grad_norm, int *finite) {
    int clip = o->cfg.grad_clip > 0.0f;
    double sum = 0.0;
    pthread_mutex_lock(&o->lock);
    for (int b = 0; b < o->n_buckets && !o->error; b++) {
        while (!o->error && (clip ? o->buckets[b].arrived : o->buckets[b].ready) < o->gen)
            pthread_cond_wait(&o->changed, &o->lock);
        sum += o->buckets[b].sumsq;
    }
    mt_err err = o->error;
    int applied = o->applied, step_finite = o->step_finite;
    pthread_mutex_unlock(&o->lock);
    if (o->norm_sum) sum = o->norm_sum(o->norm_ctx, sum);  // a shard's: over the ranks
    *grad_norm = sqrt(sum);
    *finite = isfinite(*grad_norm) && step_finite && !err;
    if (!clip) {
        if (applied) o->steps++;
    } else if (*finite) {
        float scale = *grad_norm > o->cfg.grad_clip ? (float)(o->cfg.grad_clip / (*grad_norm + 1e-6)) : 1.0f;
        o->steps++;
        prepare(o, o->steps, scale);
        // forward order: the next forward's first reads are the first ready; with delay backward order, as the
        // next backward is what waits for them
        for (int i = 0; i < o->n_buckets; i++) {
            int b = o->cfg.delay ? o->n_buckets - 1 - i : i;
            if (o->gpu)
                post(o, MSG_UPDATE, b, o->gen);
            else
                update_bucket(o, b, o->gen);
        }
    } else {
        for (int b = 0; b < o->n_buckets; b++) mark_ready(o, b, o->gen, 0);
    }
    o->in_step = 0;
    if (err) return mt_errorf(err, "%s", o->error_msg);
    return MT_OK;
}

void mt_offload_set_norm_sum(mt_offload *o, double (*sum)(void *ctx, double local), void *ctx) {
    o->norm_sum = sum, o->norm_ctx = ctx;
}

void mt_offload_cancel_step(mt_offload *o) {
    for (int b = 0; b < o->n_buckets; b++) mark_ready(o, b, o->gen, 0);
    o->in_step = 0;
}

void mt_offload_wait_bucket(mt_offload *o, int unit) {
    if (!o->gpu || unit < 0 || unit >= o->n_units || o->unit_bucket[unit] < 0) return;
    int b = o->unit_bucket[unit];
    if (o->cfg.delay) {  // the last copy made (by this thread: nothing to wait for on the host)
        if (o->buckets[b].copied >= 0) mt_stream_wait_event(NULL, event(o, EV_UPDATED, o->buckets[b].copied, b));
        if (o->in_step) mt_event_record(event(o, EV_FORWARD, o->gen, b), NULL);
        return;
    }
    long needed = o->in_step ? o->gen - 1 : o->gen;
    if (needed > 0) {
        pthread_mutex_lock(&o->lock);
        while (!o->error && o->buckets[b].ready < needed) pthread_cond_wait(&o->changed, &o->lock);
        pthread_mutex_unlock(&o->lock);
        mt_stream_wait_event(NULL, event(o, EV_UPDATED, needed, b));
    }
    if (o->in_step) mt_event_record(event(o, EV_FORWARD, o->gen, b), NULL);
}

mt_err mt_offload_sync(mt_offload *o) {
    if (o->gpu && o->cfg.trace_path && !o->trace_written && o->gen == o->cfg.trace_step + 1) write_trace(o);
    pthread_mutex_lock(&o->lock);
    for (int b = 0; b < o->n_buckets; b++)
        while (!o->error && o->buckets[b].ready < o->gen) pthread_cond_wait(&o->changed, &o->lock);
    mt_err err = o->error;
    pthread_mutex_unlock(&o->lock);
    for (int b = 0; o->gpu && b < o->n_buckets; b++) {
        if (!o->cfg.delay && o->gen > 0)
            mt_event_synchronize(event(o, EV_UPDATED, o->gen, b));
        else if (o->cfg.delay && o->buckets[b].copied >= 0)  // the copies made; the last update stays pending
            mt_event_synchronize(event(o, EV_UPDATED, o->buckets[b].copied, b));
    }
    if (err) return mt_errorf(err, "%s", o->error_msg);
    return MT_OK;
}

mt_err mt_offload_set_pending(mt_offload *o) {
    MT_CHECK(o->cfg.delay && o->gen == 0, "mt_offload_set_pending: only with delay, before the first step");
    // the master into the shadow, a store block at a time (from a GPU rounded to bf16, as cpu_adam rounds its output)
    mt_store_begin(o->store, 0, o->total, MT_STORE_READ);
    mt_store_block blk;
    while (mt_store_next(o->store, &blk)) {
        for (size_t i = 0; i < blk.count; i++) {
            if (o->gpu)
                ((uint16_t *)o->shadow)[blk.offset + i] = mt_f32_to_bf16(blk.master[i]);
            else
                ((float *)o->shadow)[blk.offset + i] = blk.master[i];
        }
        mt_store_done(o->store, &blk);
    }
    mt_err err = mt_store_end(o->store);
    for (int b = 0; !err && b < o->n_buckets; b++) o->buckets[b].updated = 0;
    return err;
}

int mt_offload_steps_taken(const mt_offload *o) { return o->steps; }
const mt_store *mt_offload_store(const mt_offload *o) { return o->store; }
const char *mt_offload_cpu_path(const mt_offload *o) { return mt_cpu_adam_path_name(o->path); }

mt_err mt_offload_read_state(mt_offload *o, float *master, float *m, float *v) {
    mt_err err = mt_offload_sync(o);
    return err ? err : mt_store_read_all(o->store, master, m, v);
}

mt_err mt_offload_read_range(mt_offload *o, size_t lo, size_t hi, float *master, float *m, float *v) {
    return mt_store_read_range(o->store, lo, hi, master, m, v);
}

size_t mt_offload_snapshot_bytes(const mt_offload *o) { return o->cfg.delay ? 0 : mt_store_snapshot_bytes(o->store); }

mt_err mt_offload_snapshot(mt_offload *o, mt_store **copy) {
    *copy = NULL;
    MT_CHECK(mt_offload_snapshot_bytes(o) > 0, "a snapshot of a file store or of a delayed update");
    mt_err err = mt_offload_sync(o);
    return err ? err : mt_store_snapshot(o->store, copy);
}

size_t mt_offload_host_bytes(const mt_offload *o) {
    size_t stages = o->gpu ? STAGES * mt_store_block_params(o->store) * 2 : 0;
    return mt_store_host_bytes(o->store) + o->total * (o->gpu ? 2 : 4) * (o->shadow ? 2 : 1) +
           (o->grad_sum ? o->total * 4 : 0) + stages;
}

size_t mt_offload_device_bytes(const mt_offload *o) { return o->gpu ? 2 * o->ring_count * 2 : 0; }

// ---- the timeline of steps trace_step and trace_step + 1 (Chrome's trace
// event format: open it in chrome://tracing or ui.perfetto.dev)

static void bucket_name(const mt_offload *o, int b, char *buf, size_t len) {
    int unit = o->buckets[b].unit;
    if (unit == 0)
        snprintf(buf, len, "embedding");
    else if (unit == o->cfg.layers + 1)
        snprintf(buf, len, "head");
    else
        snprintf(buf, len, "layer %d", unit - 1);
}

// Times are host seconds; the file counts microseconds from the origin.
static void span(FILE *f, int *first, const char *name, double origin, int track, double t0, double t1) {
    if (!(t1 >= t0)) return;  // NaN: an event of a bucket that was skipped
    fprintf(f, "%s{\"name\":\"%s\",\"ph\":\"X\",\"pid\":1,\"tid\":%d,\"ts\":%.1f,\"dur\":%.1f}", *first ? "" : ",\n",
            name, track, (t0 - origin) * 1e6, (t1 - t0) * 1e6);
    *first = 0;
}

static void write_trace(mt_offload *o) {
    o->trace_written = 1;
    mt_offload_sync(o);
    mt_device_synchronize();
    FILE *f = fopen(o->trace_path, "w");
    if (!f) {
        mt_warn("offload trace: cannot write %s", o->trace_path);
        return;
    }
    static const char *const tracks[] = {"",
                                         "GPU compute",
                                         "copy GPU to host (gradients)",
                                         "CPU (norm, AdamW)",
                                         "copy host to GPU (weights)",
                                         "training thread (waits for the delayed update)"};
    int delay = o->cfg.delay;
    fprintf(f, "{\"traceEvents\":[\n");
    int first = 1;
    for (int t = 1; t <= (delay ? 5 : 4); t++) {
        fprintf(f, "%s{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":1,\"tid\":%d,\"args\":{\"name\":\"%s\"}}",
                first ? "" : ",\n", t, tracks[t]);
        first = 0;
    }
    for (long step = o->cfg.trace_step; step <= o->cfg.trace_step + 1; step++) {
#define GPU_TIME(kind, b) (o->origin_host + mt_event_elapsed_ms(o->origin, event(o, kind, step, b)) / 1e3)
        for (int b = 0; b < o->n_buckets; b++) {
            char unit[32], name[80];
            bucket_name(o, b, unit, sizeof unit);
            int last = b == o->n_buckets - 1;
            snprintf(name, sizeof name, "step %ld forward %s%s", step, unit, last ? " + loss + backward" : "");
            span(f, &first, name, o->origin_host, 1, GPU_TIME(EV_FORWARD, b),
                 last ? GPU_TIME(EV_GRADS, b) : GPU_TIME(EV_FORWARD, b + 1));
            if (!last) {
                snprintf(name, sizeof name, "step %ld backward %s", step, unit);
                span(f, &first, name, o->origin_host, 1, GPU_TIME(EV_GRADS, b + 1), GPU_TIME(EV_GRADS, b));
            }
            snprintf(name, sizeof name, "step %ld gradients %s", step, unit);
            span(f, &first, name, o->origin_host, 2, GPU_TIME(EV_D2H_START, b), GPU_TIME(EV_D2H, b));
            const bucket *k = &o->buckets[b];
            snprintf(name, sizeof name, "step %ld norm %s", step, unit);
            span(f, &first, name, o->origin_host, 3, k->t_sum[step & 1][0], k->t_sum[step & 1][1]);
            snprintf(name, sizeof name, "step %ld AdamW %s", step, unit);
            span(f, &first, name, o->origin_host, 3, k->t_adam[step & 1][0], k->t_adam[step & 1][1]);
            // with delay, step s's weights cross in step s + 1's backward: the last step's are still pending
            if (!delay || step <= k->copied) {
                snprintf(name, sizeof name, "step %ld weights %s", step, unit);
                span(f, &first, name, o->origin_host, 4, GPU_TIME(EV_H2D_START, b), GPU_TIME(EV_UPDATED, b));
            }
            if (delay) {
                snprintf(name, sizeof name, "step %ld waits for %s's update", step, unit);
                span(f, &first, name, o->origin_host, 5, k->t_wait[step & 1][0], k->t_wait[step & 1][1]);
            }
        }
#undef GPU_TIME
    }
    fprintf(f, "\n]}\n");
    fclose(f);
    mt_info("offload: timeline of steps %ld-%ld written to %s", o->cfg.trace_step, o->cfg.trace_step + 1,
            o->trace_path);
}

int mt_offload_host_sum_fits(int state_on_host, size_t total, size_t shard, int ranks, double have, double *need) {
    double per_param = (state_on_host ? 12.0 : 0.0) + 2.0 + 4.0;
    *need = ranks * (per_param * (double)shard + 4.0 * (double)total);
    return *need <= 0.85 * have;
}

int mt_offload_auto_threads(int local_ranks, int gpu, int *cores) {
    cpu_set_t set;
    int online = (int)sysconf(_SC_NPROCESSORS_ONLN);
    int mine = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : online;
    int share = online / (local_ranks > 1 ? local_ranks : 1);
    *cores = mine < share ? mine : share;
    if (*cores < 1) *cores = 1;
    int threads = *cores - (gpu ? 1 : 0);
    return threads > 0 ? threads : 1;
}
