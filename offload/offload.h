// offload/offload.h: ZeRO-Offload's optimizer step (Ren et al., 2021) for
// whatever memtune trains. The GPU keeps only the bf16 compute weights; the
// fp32 master weights and Adam's moments live in an mt_store (host memory or
// a file on an SSD), and AdamW runs on the CPU (cpu_adam.h).
//
// The pipeline on a GPU, per bucket (the parameters one forward unit reads:
// the embedding, each layer, the head):
//   backward finishes bucket b -> its fp32 gradients are cast to bf16 into one
//   of two device staging buffers -> copied to pinned host memory on a copy
//   stream -> a worker thread sums its squares (the global norm) and, once
//   the clip factor is known, updates the state block by block -> each
//   block's new bf16 weights are copied back on a second stream -> the next
//   forward waits (on the device) only for the bucket it is about to read.
// Without clipping (optim.grad_clip: 0) a bucket is updated as soon as its
// gradients land, beside the rest of backward; with clipping the update
// waits for the norm and then runs in forward order, beside the next
// forward. On the CPU backend the same steps run inline, with fp32 gradients.
//
// With delay (ZeRO-Offload's DPU), a step's forward and backward do not wait
// for the previous step's update: the update of step s is computed on the
// CPU beside step s + 1 and its weights reach the model once step s + 1's
// backward has finished with each bucket, for step s + 2 to read. The
// gradient of step s is thus taken at the weights of step s - 2 (the
// initial ones for steps 1 and 2): this changes the math. The last update
// stays pending between steps (mt_offload_sync waits for it to be computed,
// not copied): a checkpoint keeps the weights as they are beside the state,
// and a resumed run sets them back and calls mt_offload_set_pending.
#ifndef MT_OFFLOAD_H
#define MT_OFFLOAD_H

#include <stddef.h>

#include "kernels/common.h"
#include "kernels/device.h"
#include "offload/store.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    size_t offset, count;  // its compute weights in the trainable block
    int decay;             // weight decay applies
    int bucket;            // forward unit that reads it: 0 the embedding, 1 + l layer l, L + 1 the head
    size_t slot;           // where its state lies in the store (and in the host arrays below)
} mt_offload_param;

typedef struct {
    mt_store_kind kind;   // memory (offload.optimizer: cpu) or file (ssd)
    const char *dir;      // file: offload.path
    size_t block_params;  // store block (0: its default)
    int io_threads;       // file: I/O threads (0: the store's default)
    float beta1, beta2, eps, weight_decay;
    float grad_clip;         // <= 0: off, and buckets update as their gradients land
    int threads;             // OpenMP threads of the CPU AdamW (0: mt_offload_auto_threads for one rank, with a GPU)
    const char *trace_path;  // Chrome trace JSON of steps trace_step and trace_step + 1, or NULL
    long trace_step;
    int layers;         // L: names the units in the trace (1 + l layer l, L + 1 the head)
    int rank, world;    // data parallelism: names the store's file (0, 1 without)
    int micro_batches;  // gradient accumulation: micro-batches whose gradients stream in a step (0, 1: none)
    int int8_moments;   // Adam's moments as blockwise 8-bit codes (store.h), never split by a bucket
    int delay;          // 1: ZeRO-Offload's delayed parameter update (below); 0: exact
} mt_offload_config;

typedef struct mt_offload mt_offload;

// weights: the trainable block's compute weights where the backend computes
// (bf16 device memory, or fp32 host memory on the CPU), params sorted by
// offset with their buckets contiguous. The state holds `total` values: each
// parameter's at its slot (slots ascending, not overlapping). Slots equal to
// the offsets keep the weights' layout (every trained parameter offloaded);
// packed slots keep only some (GaLore's unprojected parameters). Where two
// parameters are the same distance apart in both layouts, the weights
// between them are written too: leave such gaps only over padding. The
// state starts as master, m and v (host fp32 in the slots' layout; m, v
// NULL: zero) after `steps` updates (0 fresh, a checkpoint's count on
// resume), written to the store once. master NULL: zero, the master values
// written afterwards with mt_offload_write_state.
mt_err mt_offload_init(mt_offload **out, mt_backend *be, const mt_offload_config *cfg, const mt_offload_param *params,
                       int n_params, size_t total, void *weights, const float *master, const float *m, const float *v,
                       int steps);
void mt_offload_free(mt_offload *o);
// Before the first step: the master values (and, unless NULL, the moments)
// of the trainable block's elements [offset, offset + count) (the weights'
// offsets; values, m, v from index 0), into the slots of the parameters they
// cover (others, of other ranks' shards, are left).
mt_err mt_offload_write_state(mt_offload *o, size_t offset, size_t count, const float *values, const float *m,
                              const float *v);
// int8 moments: the store's quantization segments for these params (as
// mt_offload_init takes them): 0, then each parameter's first slot and the
// end of its last, ascending and below total, so that a block never holds
// two parameters (a checkpoint keeps each parameter's codes as they are) nor
// crosses a bucket's edge (a bucket's update pass never splits one). seg
// holds 2 n + 1; returns the count.
int mt_offload_segments(const mt_offload_param *params, int n_params, size_t total, size_t *seg);

// One optimizer step: begin, every parameter's whole gradient once (fp32,
// where the backend computes; the buffer may be reused when the call
// returns), then end, which returns the global gradient norm (before
// clipping) and whether it was finite. With micro_batches > 1 every
// parameter's gradient comes once per micro-batch instead, each
// micro-batch announced by mt_offload_micro_batch: they cross to the host
// as they come (bf16 from a GPU) and are summed there in fp32, so no
// gradient block ever sits on the GPU; the last micro-batch's arrivals sum
// the squares and update, as a step's do without accumulation. A non-finite norm applies nothing
// with clipping; without it, the buckets before the first non-finite one
// have been applied. Errors are the store's (I/O, checksum), possibly of
// the previous step's updates.
void mt_offload_begin_step(mt_offload *o, float lr);
void mt_offload_grad(mt_offload *o, int param, const float *grad);
// Before micro-batch `micro` (0 .. micro_batches - 1) of the step hands its
// gradients over; micro-batch 0 needs no call (begin_step starts it).
void mt_offload_micro_batch(mt_offload *o, int micro);
mt_err mt_offload_end_step(mt_offload *o, double *grad_norm, int *finite);
// Data parallelism with ZeRO (each rank offloads its shard): `sum` turns the
// shard's sum of squares of the gradient into the whole's (over the ranks);
// end_step calls it on every rank.
void mt_offload_set_norm_sum(mt_offload *o, double (*sum)(void *ctx, double local), void *ctx);
// The backward did not run (a non-finite loss): nothing is applied.
void mt_offload_cancel_step(mt_offload *o);
// Before a forward reads forward unit `unit` (mt_offload_param.bucket's
// numbering): the update of its bucket from the last step is issued and the
// compute stream waits for its copy (the host blocks only until the worker
// has issued it). A unit with nothing trained returns at once.
void mt_offload_wait_bucket(mt_offload *o, int unit);
// Waits for every update, the copies of the weights back included (with
// delay the last update's copy stays pending); returns the first store error.
mt_err mt_offload_sync(mt_offload *o);

// Delay, resuming: the weights hold the state's master one update behind
// (as a checkpoint kept them); the next step's backward brings the master
// in, as the uninterrupted run's did. Before the first step.
mt_err mt_offload_set_pending(mt_offload *o);
int mt_offload_steps_taken(const mt_offload *o);
// The whole state as host arrays in the slots' layout (checkpoints; m, v may
// be NULL), after every pending update.
mt_err mt_offload_read_state(mt_offload *o, float *master, float *m, float *v);
// Slots [lo, hi) of the state into master, m, v from index 0 (each NULL: not
// read). No step may run meanwhile; call mt_offload_sync first.
mt_err mt_offload_read_range(mt_offload *o, size_t lo, size_t hi, float *master, float *m, float *v);
// After every pending update, a copy of the state in host memory, in the
// store's encoding, that steps may run beside (mt_store_snapshot: read it
// with mt_store_read_range, free it with mt_store_close). The file kind has
// none: mt_offload_snapshot_bytes is then 0, and so it is with delay (its
// weights, one update behind, are the model's).
size_t mt_offload_snapshot_bytes(const mt_offload *o);
mt_err mt_offload_snapshot(mt_offload *o, mt_store **copy);
// Host bytes held: the store, the gradient buffers (with accumulation from
// a GPU an fp32 sum as well: 4 bytes a parameter), the staging buffers
// (with delay the updated weights: 2 bytes a parameter from a GPU, 4 on the
// CPU).
size_t mt_offload_host_bytes(const mt_offload *o);
// Device bytes held: the two gradient staging buffers.
size_t mt_offload_device_bytes(const mt_offload *o);
const mt_store *mt_offload_store(const mt_offload *o);

// offload.threads 0: the CPU AdamW's threads for a rank. Its cores are
// those of its CPU affinity, but no more than its share of the node's among
// the node's `local_ranks` ranks (unbound ranks, or ranks bound to a socket,
// share theirs); *cores gets that count. With a GPU one of them drives it.
int mt_offload_auto_threads(int local_ranks, int gpu, int *cores);

// offload.grad_sum auto: whether host memory can also sum the micro-batches'
// gradients. Each of the node's `ranks` holds the weights' fp32 copy (4
// bytes a parameter of the model's `total`) and, per parameter of its
// `shard`, the state if it lives in host memory (12), the bf16 landing (2)
// and the fp32 sum (4). *need gets that (bytes); it fits when at most 85% of
// the node's `have` bytes.
int mt_offload_host_sum_fits(int state_on_host, size_t total, size_t shard, int ranks, double have, double *need);
const char *mt_offload_cpu_path(const mt_offload *o);

#ifdef __cplusplus
}
#endif
#endif
