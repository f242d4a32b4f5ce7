// trainer/forecast.c: see forecast.h. The model's bytes come from
// mt_model_plan_bytes (the model's own tables and activation layout); the
// updaters' from the same sizes their init functions allocate (optim/,
// offload/): keep the two in step when either changes (tests/test_plan.sh
// compares forecasts with the tallies of real runs).
#define _POSIX_C_SOURCE 200809L
#include "trainer/forecast.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>

#include "kernels/device.h"
#include "kernels/ops.h"
#include "offload/store.h"
#include "optim/galore.h"
#include "trainer/dist.h"
#include "trainer/hf.h"
#include "trainer/model.h"
#include "trainer/offload_plan.h"
#include "trainer/plan.h"

// The step-time model: FLOPs / R plus the offloaded updates / S. R and S
// come from one H100 (16 cores) with TinyLlama-1.1B's shape, B=4, T=1024,
// checkpointing (bench/results/2026-12-07-h100-offload-ratio-deepspeed-streaming):
// the full fine-tune's step, 82.0 ms for 4 x (2P + 2LTC) FLOPs a token,
// gives R; AdamW of the 1.10 G offloaded parameters took 288.7 ms on the
// CPU, S (the step with them offloaded measured 4.11x, this model 4.5x).
// The estimate is relative: different GPUs scale R.
static const double kFlopsPerSecond = 4.58e14, kOffloadParamsPerSecond = 3.8e9;
// pinned host memory to the GPU (H100 machines' PCIe, 55.1-55.5 GB/s measured for 1 GiB)
static const double kHostToDeviceBytesPerSecond = 5.5e10;
// offload/store.c's read-ahead for a file store (records in flight: it, plus 3)
enum { kSsdPrefetch = 2 };

// mt_alloc_host_large's rounding: whole 2 MiB pages.
static double huge_pages(double bytes) {
    const double huge = 2097152.0;
    return ceil(bytes / huge) * huge;
}

static void dummy_grad_ready(void *ctx, int param, float *grad) { (void)ctx, (void)param, (void)grad; }
static void dummy_grads_done(void *ctx, int bucket) { (void)ctx, (void)bucket; }

// The largest shard of n over `world` ranks (mt_dist_shard's rule: the last
// rank's).
static size_t largest_shard(size_t n, int world) {
    if (world <= 1) return n;
    size_t runs = (n + 15) / 16, lo = runs * (size_t)(world - 1) / (size_t)world * 16;
    return lo < n ? n - lo : 0;
}

// GaLore's state and its largest scratch, as optim/galore.c allocates them.
static void galore_bytes(const mt_config *cfg, const mt_plan *pl, double *state, double *work) {
    mt_galore_config gc = {.rank = (int)cfg->galore_rank,
                           .refresh = !strcmp(cfg->galore_refresh, "svd") ? MT_GALORE_SVD : MT_GALORE_RANDOMIZED,
                           .int8 = !strcmp(cfg->galore_moments, "int8")};
    size_t w = 0;
    *state = 0;
    for (int i = 0; i < pl->n_trained; i++) {
        const mt_param_info *p = &pl->trained[i];
        int projected = pl->selected[i] && p->ndim == 2;
        if (!projected && pl->offload) continue;  // the store's
        size_t bytes, floats;
        mt_galore_param_bytes(&gc, p->shape[0], p->ndim == 2 ? p->shape[1] : 0, projected, &bytes, &floats);
        *state += (double)bytes;
        if (floats > w) w = floats;
    }
    *work = (double)w * 4;
}

// What the store holds with offload (state.c's offload plan: the trained
// block, the largest rank's shard of it, or what GaLore does not project),
// and its largest forward unit's run (offload.c's device ring).
// The offloaded state's values, the largest bucket's span and the int8
// moments' quantization blocks; for a file store (ssd) its size on disk and
// one record's bytes; the store's parameters a block (int8: whether the
// moments are 8-bit codes).
static void offload_counts(const mt_plan *pl, int L, size_t shard, int int8, size_t *count, size_t *ring,
                           size_t *qblocks, size_t *file_bytes, size_t *record_bytes, size_t *block) {
    mt_offload_plan plan = mt_offload_plan_make(pl->trained, pl->n_trained, pl->trained_total - shard,
                                                pl->trained_total, pl->galore ? pl->selected : NULL, L);
    *count = plan.count, *ring = 0;
    size_t *seg = malloc((size_t)(2 * plan.n + 1) * sizeof *seg);
    MT_CHECK(seg != NULL, "offload segments");
    int n_seg = mt_offload_segments(plan.params, plan.n, plan.count, seg);
    *qblocks = mt_store_int8_blocks(seg, n_seg, plan.count);
    mt_store_config sc = {MT_STORE_FILE, NULL, plan.count, 0, 1, 0, 0, 0, int8, seg, n_seg};
    *file_bytes = mt_store_file_size(&sc, record_bytes, block);
    free(seg);
    for (int p = 0; p < plan.n;) {
        int q = p;
        while (q < plan.n && plan.params[q].bucket == plan.params[p].bucket) q++;
        size_t span = plan.params[q - 1].slot + plan.params[q - 1].count - plan.params[p].slot;
        if (span > *ring) *ring = span;
        p = q;
    }
    mt_offload_plan_free(&plan);
}

// mt_forecast_run; ask_gpu 0 for host memory alone (memory.host_check): no
// GPU is asked (attention's workspace, on the device, is the own kernel's).
static mt_err forecast_run(const mt_config *cfg, const mt_model_config *mc, int gpu, int world, int ask_gpu,
                           mt_forecast *f) {
    memset(f, 0, sizeof *f);
    f->gpu = gpu;
    mt_err err = mt_config_validate(cfg);
    if (err) return err;
    mt_dist *dist;
    if ((err = mt_dist_init(&dist))) return err;
    mt_plan pl;
    err = mt_plan_make(&pl, cfg, mc, dist, gpu);
    // a GPU forecast where this rank's GPU is visible asks its cuDNN (the run's attention)
    int local_rank = mt_dist_local_rank(dist);
    f->attention_device = gpu && ask_gpu && local_rank < mt_device_count() ? local_rank : -1;
    mt_dist_free(dist);
    if (err) return err;
    int zero = pl.zero && world > 1;
    size_t shard = zero ? largest_shard(pl.trained_total, world) : pl.trained_total;
    double *d = f->device, *h = gpu ? f->host : f->device;
    int streamed = pl.galore || (pl.offload_streamed && !pl.zero2_streamed) || pl.zero2_streamed;
    mt_model_options o = mt_plan_model_options(&pl, cfg);
    o.grad_ready = streamed ? dummy_grad_ready : NULL;
    o.grads_done = (world > 1 && !streamed) || pl.zero2_streamed ? dummy_grads_done : NULL;
    mt_model_bytes mb;
    mt_model_plan_bytes(gpu, f->attention_device, mc, &o, pl.mezo ? pl.selected : NULL, &mb, &f->attention_cudnn);
    d[MT_MEM_WEIGHTS] = (double)mb.weights;
    d[MT_MEM_ADAPTERS] = (double)mb.adapters;
    d[MT_MEM_GRADS] = (double)mb.grads;
    d[MT_MEM_ACTIVATIONS] = (double)mb.activations;
    d[MT_MEM_WORKSPACE] = (double)(mb.workspace + mb.perturbation);
    h[MT_MEM_OFFLOAD] += (double)(mb.offload_host + (o.weights_dir ? 0 : mb.weights_host));
    f->disk = o.weights_dir ? (double)mb.weights_host : 0;  // model.weights: ssd maps it from a file
    f->disk += (double)mb.offload_disk;                     // and model.ssd_layer_inputs' file
    double transient = (double)mb.staging;
    const char *state_where;
    if (pl.mezo) {
        state_where = "no gradients or optimizer state (MeZO: two forward passes a direction)";
    } else if (pl.galore) {
        double state, work;
        galore_bytes(cfg, &pl, &state, &work);
        d[MT_MEM_OPTIMIZER] = state / (zero ? world : 1);
        d[MT_MEM_WORKSPACE] += work;
        state_where = "GaLore's projected moments on the device";
    } else if (!pl.offload) {
        d[MT_MEM_OPTIMIZER] = (double)shard * (gpu ? 12 : 8);  // fp32 master (the GPU's), m, v
        if (pl.zero2_streamed) d[MT_MEM_GRADS] += (double)shard * 4;
        state_where = gpu ? "AdamW's fp32 master and moments on the GPU" : "AdamW's moments in host memory";
    } else if (pl.offload_split) {
        // offload.ratio: the first units' AdamW on the backend, their streamed gradients summed beside it
        d[MT_MEM_OPTIMIZER] = (double)pl.offload_split * (gpu ? 12 : 8);
        if (pl.offload_streamed) d[MT_MEM_GRADS] += (double)pl.offload_split * 4;
        state_where = gpu ? "AdamW's state of the first units on the GPU, the rest's offloaded"
                          : "AdamW's state of the first units in the backend's memory, the rest's offloaded";
    } else {
        state_where = "AdamW's state offloaded";
    }
    if (pl.offload) {
        size_t count, ring, qblocks, file_bytes, record_bytes, block;
        int int8 = !strcmp(cfg->offload_moments, "int8");
        offload_counts(&pl, mc->L, pl.galore ? pl.trained_total : shard - pl.offload_split, int8, &count, &ring,
                       &qblocks, &file_bytes, &record_bytes, &block);
        if (!strcmp(cfg->offload_optimizer, "ssd")) {  // its records' buffers (int8: and two fp32 windows)
            h[MT_MEM_OFFLOAD] += (double)(kSsdPrefetch + 3) * huge_pages((double)record_bytes) +
                                 (int8 ? 2 * huge_pages((double)block * 4) : 0);
            f->disk += (double)file_bytes * (pl.local_world > 0 ? pl.local_world : 1);  // a file a rank
        } else if (int8) {  // fp32 master, codes, absmax, two fp32 windows
            h[MT_MEM_OFFLOAD] += huge_pages((double)count * 4) + 2 * huge_pages((double)(count ? count : 1)) +
                                 2 * huge_pages((double)(qblocks ? qblocks : 1) * 4) +
                                 2 * huge_pages((double)block * 4);
        } else {
            h[MT_MEM_OFFLOAD] += 3 * huge_pages((double)count * 4);  // fp32 master, m, v
        }
        h[MT_MEM_OFFLOAD] += (double)count * (gpu ? 2 : 4) * (cfg->offload_delay ? 2 : 1);  // (delay: the weights)
        if (gpu) {
            if (pl.accum > 1 && pl.host_sum) h[MT_MEM_OFFLOAD] += huge_pages((double)count * 4);
            h[MT_MEM_OFFLOAD] += 4.0 * block * 2;
            d[MT_MEM_GRADS] += 2.0 * ring * 2;
        }
        f->step_time += (double)count / kOffloadParamsPerSecond;  // the CPU's AdamW
    }
    for (int c = 0; c < MT_MEM_NCATEGORIES; c++) f->device_peak += d[c];
    f->device_peak += transient;
    // the base's fp32 values on the host as it loads (a run that does not resume; a whole copy stays as the
    // trained block's host copy); the stores are allocated first
    mt_base_load load = mt_plan_base_load(&pl, 0);
    f->host_load = load == MT_LOAD_WHOLE
                       ? (double)pl.total * sizeof(float)
                       : (double)mt_hf_load_buffer_floats(mc, load == MT_LOAD_TENSORS) * sizeof(float);
    // the moments' host copies a checkpoint reads them into (trainer/train.c: not with offload, whose store
    // holds them, nor MeZO's or GaLore's)
    if (!pl.mezo && !pl.galore && !pl.offload && (cfg->checkpoint_every > 0 || cfg->checkpoint_final))
        f->host_copies = 2.0 * (double)shard * sizeof(float);
    f->host_ranks = pl.local_world > 0 ? pl.local_world : 1;
    if (gpu) {
        f->host_peak = f->host_load;
        for (int c = 0; c < MT_MEM_NCATEGORIES; c++) f->host_peak += f->host[c];
    }
    // FLOPs a token: forward 2P + 2LTC (the causal attention's two products)
    double P = (double)pl.total, fwd = 2 * P + 2.0 * mc->L * pl.T * mc->C;
    double passes = pl.mezo ? 2.0 * (double)cfg->mezo_samples : pl.lora ? 2.0 : 3.0;
    if (cfg->model_activation_checkpointing && !pl.mezo) passes += 1.0;
    // the MLP in tiles: backward computes each tile's gate and up again
    // (what the checkpointed recompute, which then stops before the MLP,
    // would have done; Gemma's recompute runs the MLP whole as well)
    double tiles_again = o.mlp_tile_rows > 0 && (long)o.mlp_tile_rows < (long)pl.B * pl.T && !pl.mezo &&
                                 (!cfg->model_activation_checkpointing || mc->gemma)
                             ? 4.0 * mc->L * mc->C * mc->F
                             : 0.0;
    f->tokens = (double)pl.B * pl.T * pl.accum * (world > 0 ? world : 1);
    double compute = (passes * fwd + tiles_again) * (double)pl.B * pl.T * pl.accum / kFlopsPerSecond;
    // streamed weights (the layers not resident) cross to the GPU once in
    // forward and once in backward a micro-batch (MeZO: once a direction,
    // both passes at once), beside the compute: the slower of the two binds
    double transfer = (double)mb.weights_streamed * (pl.mezo ? (double)cfg->mezo_samples : 2.0) * pl.accum /
                      kHostToDeviceBytesPerSecond;
    double gpu_time = gpu && transfer > compute ? transfer : compute;
    // offload.delay: the CPU's update runs beside the next step's forward and backward, the slower binds. (On an
    // H100 with the 1.1B shape the CPU bound and the step measured no shorter than exact, 317 against 300 ms,
    // where this says 289 against 432: bench/results/2026-12-05-h100-session-checks)
    if (pl.offload && cfg->offload_delay)
        f->step_time = f->step_time > gpu_time ? f->step_time : gpu_time;
    else
        f->step_time += gpu_time;
    snprintf(f->what, sizeof f->what, "%s%.2fM of %.2fM parameters trained; %s%s", pl.lora ? "LoRA: " : "",
             pl.trained_total / 1e6, P / 1e6, state_where, zero ? "; ZeRO shards over the ranks" : "");
    mt_plan_free(&pl);
    return MT_OK;
}

mt_err mt_forecast_run(const mt_config *cfg, const mt_model_config *mc, int gpu, int world, mt_forecast *f) {
    return forecast_run(cfg, mc, gpu, world, 1, f);
}

// Bytes in GiB, or MiB under one GiB.
static const char *size_text(double b, char *buf, size_t n) {
    if (b >= 1073741824.0)
        snprintf(buf, n, "%7.2f GiB", b / 1073741824.0);
    else
        snprintf(buf, n, "%7.1f MiB", b / 1048576.0);
    return buf;
}

static const char *trimmed(const char *s) {
    while (*s == ' ') s++;
    return s;
}

// Loads the config file with its --set assignments and `extra` ones.
static mt_err load(mt_config *cfg, const char *path, char *const *sets, int n_sets, const char *const *extra) {
    mt_config_defaults(cfg);
    mt_err err = mt_config_load_yaml(cfg, path);
    for (int i = 0; i < n_sets && !err; i++) err = mt_config_set_assignment(cfg, sets[i], "--set");
    // an alternative without offload: the file's offload.* keys go back to their defaults
    static const char *const no_offload[] = {"offload.path=",         "offload.io_threads=4", "offload.threads=0",
                                             "offload.grad_sum=auto", "offload.trace_step=0", "offload.delay=0",
                                             "offload.moments=fp32",  "offload.ratio=1",      NULL};
    for (int i = 0; extra && extra[i] && !err; i++) {
        err = mt_config_set_assignment(cfg, extra[i], "memtune plan");
        for (int k = 0; !err && !strcmp(extra[i], "offload.optimizer=none") && no_offload[k]; k++)
            if (k > 0 || strcmp(cfg->model_weights, "ssd"))  // the base's file keeps its folder
                err = mt_config_set_assignment(cfg, no_offload[k], "memtune plan");
    }
    // an alternative that offload.delay does not serve (GaLore, streamed weights) goes without it, and one that
    // offload.ratio does not (GaLore, LoRA, streamed weights) offloads all of the state it offloads
    int galore_or_streamed = strcmp(cfg->optim_kind, "adamw") || strcmp(cfg->model_weights, "gpu");
    if (!err && extra && cfg->offload_delay && galore_or_streamed) cfg->offload_delay = 0;
    if (!err && extra && cfg->offload_ratio < 1 && (galore_or_streamed || cfg->lora_r > 0)) cfg->offload_ratio = 1;
    return err;
}

static double host_memory_given;  // memtune plan --host-memory; 0: this machine's

void mt_forecast_set_host_memory(double bytes) { host_memory_given = bytes; }

// Host memory the kernel counts as available (MemAvailable), bytes; 0 when
// unknown; or what memtune plan was given.
static double host_available(void) {
    if (host_memory_given > 0) return host_memory_given;
    FILE *f = fopen("/proc/meminfo", "r");
    double kib = 0;
    char line[256];
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %lf kB", &kib) == 1) break;
    if (f) fclose(f);
    return kib * 1024.0;
}

// train.seq_len: max's ceiling: the model's max_position_embeddings, at most 2^20.
static long seq_len_limit(const mt_model_config *mc) {
    return mc->max_position > 0 && mc->max_position < (1L << 20) ? mc->max_position : (1L << 20);
}

// The MLP's tile when the planner may choose one (train.seq_len: max).
enum { kAutoMlpTileRows = 2048 };

// The share of the host's available memory a run may plan to hold (pinned
// offload buffers, a streamed base): the rest is the system's and the page
// cache's.
static const double kHostShare = 0.85;

double mt_host_plannable(void) { return kHostShare * host_available(); }

// What train.seq_len: max chose beyond the configuration: the MLP in tiles
// (model.mlp_tile_rows was 0), cuDNN's non-deterministic attention backward
// (model.deterministic_attention was auto), the adapters' AdamW state in host
// memory (offload.optimizer was none); and whether host memory (not the
// GPU's) stopped the length.
typedef struct {
    int tiles, attention, offload, host_binds;
    long kept;     // model.gpu_layer_inputs chosen where host memory bound the length (0: none)
    int filed;     // kept counts model.ssd_layer_inputs instead: the last inputs in a file under offload.path
    int streamed;  // model.weights auto: the base streamed from host memory (cpu)
} long_choices;

// Where host memory binds, which count train.seq_len: max raises: none (0),
// the layer inputs kept on the GPU (KEEP_ON_GPU) or those in a file under
// offload.path (KEEP_IN_FILE: no GPU memory, so preferred where the path is set).
enum { KEEP_ON_GPU = 1, KEEP_IN_FILE = 2 };

static long *keep_knob(mt_config *cfg, int may_keep) {
    return may_keep == KEEP_IN_FILE ? &cfg->model_ssd_layer_inputs : &cfg->model_gpu_layer_inputs;
}

// The fewest layer inputs kept out of host memory (on the GPU, or in the
// file: may_keep) with which the run at length T fits `host` bytes of host
// memory; -1 if none do.
static long fewest_kept(mt_config *cfg, const mt_model_config *mc, int gpu, int world, int may_keep, long T,
                        double host) {
    long lo = 0, hi = mc->L - 1, found = -1;
    cfg->train_seq_len = T;
    while (lo <= hi) {
        long k = lo + (hi - lo) / 2;
        *keep_knob(cfg, may_keep) = k;
        mt_forecast f;
        if (!mt_forecast_run(cfg, mc, gpu, world, &f) && f.host_peak <= host)
            found = k, hi = k - 1;
        else
            lo = k + 1;
    }
    return found;
}

// Where host memory binds the length of a run with its layer inputs
// offloaded: the longest length above `from` at which keeping the fewest
// layer inputs on the GPU that the host then fits still fits capacity on
// the GPU; those in *kept (from and 0 when none is longer).
static long longest_keeping_inputs(mt_config *cfg, const mt_model_config *mc, int gpu, int world, double capacity,
                                   long limit, int may_keep, long from, long *kept) {
    double host = mt_host_plannable();
    long saved_T = cfg->train_seq_len, best = from, lo = from + 1, hi = limit;
    *kept = 0;
    while (host > 0 && lo <= hi) {
        long mid = lo + (hi - lo) / 2, k = fewest_kept(cfg, mc, gpu, world, may_keep, mid, host);
        mt_forecast f;
        cfg->train_seq_len = mid, *keep_knob(cfg, may_keep) = k;
        if (k >= 0 && !mt_forecast_run(cfg, mc, gpu, world, &f) && f.device_peak <= capacity)
            best = mid, *kept = k, lo = mid + 1;
        else
            hi = mid - 1;
    }
    cfg->train_seq_len = saved_T, *keep_knob(cfg, may_keep) = 0;
    return best;
}

// Whether one token more than `len` fits the GPU but not the host.
static int host_binds(mt_config *cfg, const mt_model_config *mc, int gpu, int world, double capacity, long len,
                      long limit) {
    if (!gpu || len <= 0 || len >= limit) return 0;
    long saved = cfg->train_seq_len;
    mt_forecast f;
    cfg->train_seq_len = len + 1;
    int binds = !mt_forecast_run(cfg, mc, gpu, world, &f) && f.device_peak <= capacity;
    cfg->train_seq_len = saved;
    return binds;
}

// From the longest length as cfg stands (`plain`): where may_keep and host
// memory binds it, the longer one that keeping the fewest layer inputs on
// the GPU fits (those in *kept, else 0).
static long keeping_if_host_binds(mt_config *cfg, const mt_model_config *mc, int gpu, int world, double capacity,
                                  long limit, int may_keep, long plain, long *kept) {
    *kept = 0;
    if (!may_keep || !host_binds(cfg, mc, gpu, world, capacity, plain, limit)) return plain;
    return longest_keeping_inputs(cfg, mc, gpu, world, capacity, limit, may_keep, plain, kept);
}

// The longest length as cfg stands, with keeping_if_host_binds's choice.
static long longest_keeping(mt_config *cfg, const mt_model_config *mc, int gpu, int world, double capacity, long limit,
                            int may_keep, long *kept) {
    long plain = mt_forecast_longest_seq_len(cfg, mc, gpu, world, capacity, limit);
    return keeping_if_host_binds(cfg, mc, gpu, world, capacity, limit, may_keep, plain, kept);
}

// Sets key to value where that lengthens the longest fit (*best, with
// *kept), else puts back `was`; 1 when it stays.
static int keep_if_longer(mt_config *cfg, const mt_model_config *mc, int gpu, int world, double capacity, long limit,
                          int may_keep, const char *key, const char *value, const char *was, long *best, long *kept) {
    mt_config_set(cfg, key, value, "train.seq_len max");
    long k, len = longest_keeping(cfg, mc, gpu, world, capacity, limit, may_keep, &k);
    if (len > *best) {
        *best = len, *kept = k;
        return 1;
    }
    mt_config_set(cfg, key, was, "train.seq_len max");
    return 0;
}

// The longest seq_len up to limit whose forecast fits capacity on the device
// and, for a GPU run, kHostShare of the host's available memory. In turn,
// each of these is set where it fits a longer one (none changes what is
// computed): the MLP in tiles of kAutoMlpTileRows tokens where
// model.mlp_tile_rows is 0; on the GPU, model.deterministic_attention false
// (a workspace linear in T, not T x T) where it is auto; on the GPU, for
// LoRA's AdamW, offload.optimizer cpu where it is none (the adapters' master
// weights and moments in host memory: the host updates so few parameters in
// a small part of a long sequence's step); on the GPU, model.weights cpu
// where it is auto (the frozen base's layers streamed from host memory, as
// model.weights auto streams a base that does not fit: the GPU's memory
// goes to the sequence instead). Throughout, on the GPU, where
// host memory binds the length with the layer inputs offloaded and
// model.gpu_layer_inputs is 0, the fewest of them that let a longer length
// fit both stay on the GPU. *as_configured: the longest without any choice.
static long longest_choosing(mt_config *cfg, const mt_model_config *mc, int gpu, int world, double capacity, long limit,
                             long *as_configured, long_choices *chose) {
    // (a count the configuration fixes is not raised; with the file's fixed, the GPU's may be)
    int may_keep = !gpu || !cfg->model_offload_activations || cfg->model_gpu_layer_inputs ? 0
                   : cfg->offload_path[0] && !cfg->model_ssd_layer_inputs                 ? KEEP_IN_FILE
                                                                                          : KEEP_ON_GPU;
    long kept = 0, best = mt_forecast_longest_seq_len(cfg, mc, gpu, world, capacity, limit);
    *as_configured = best;
    *chose = (long_choices){0, 0, 0, 0, 0, may_keep == KEEP_IN_FILE, 0};
    best = keeping_if_host_binds(cfg, mc, gpu, world, capacity, limit, may_keep, best, &kept);
    // (first: where the base does not fit resident, the other choices are weighed with it streamed)
    if (gpu && !strcmp(cfg->model_weights, "auto"))
        chose->streamed = keep_if_longer(cfg, mc, gpu, world, capacity, limit, may_keep, "model.weights", "cpu", "auto",
                                         &best, &kept);
    char tile[16];
    snprintf(tile, sizeof tile, "%d", kAutoMlpTileRows);
    if (cfg->model_mlp_tile_rows == 0)
        chose->tiles = keep_if_longer(cfg, mc, gpu, world, capacity, limit, may_keep, "model.mlp_tile_rows", tile, "0",
                                      &best, &kept);
    if (gpu && !strcmp(cfg->model_deterministic_attention, "auto"))
        chose->attention = keep_if_longer(cfg, mc, gpu, world, capacity, limit, may_keep,
                                          "model.deterministic_attention", "false", "auto", &best, &kept);
    if (gpu && cfg->lora_r > 0 && !strcmp(cfg->optim_kind, "adamw") && !strcmp(cfg->offload_optimizer, "none"))
        chose->offload = keep_if_longer(cfg, mc, gpu, world, capacity, limit, may_keep, "offload.optimizer", "cpu",
                                        "none", &best, &kept);
    chose->kept = kept;
    if (may_keep) *keep_knob(cfg, may_keep) = kept;
    chose->host_binds = host_binds(cfg, mc, gpu, world, capacity, best, limit);
    return best;
}

// How a chosen length was reached, for the line that reports it.
static const char *choices_note(long_choices c, char *buf, size_t len) {
    char tiles[96], kept[128];
    snprintf(tiles, sizeof tiles, "the MLP in tiles of %d tokens (model.mlp_tile_rows: %d)", kAutoMlpTileRows,
             kAutoMlpTileRows);
    if (c.filed)
        snprintf(kept, sizeof kept,
                 "the last %ld layer inputs in a file under offload.path, not in host memory "
                 "(model.ssd_layer_inputs: %ld)",
                 c.kept, c.kept);
    else
        snprintf(kept, sizeof kept,
                 "the first %ld layer inputs kept on the GPU, not in host memory "
                 "(model.gpu_layer_inputs: %ld)",
                 c.kept, c.kept);
    const char *parts[5], *all[5] = {
                              tiles,
                              "cuDNN's non-deterministic attention backward (model.deterministic_attention: false; the "
                              "deterministic one's workspace grows as T x T)",
                              "the adapters' AdamW state in host memory (offload.optimizer: cpu; the same AdamW)",
                              "the base's layers streamed from host memory (model.weights auto: cpu)",
                              kept,
                          };
    int n = 0, on[5] = {c.tiles, c.attention, c.offload, c.streamed, c.kept > 0};
    for (int i = 0; i < 5; i++)
        if (on[i]) parts[n++] = all[i];
    size_t at = (size_t)snprintf(buf, len, "%s", n ? " with " : " as configured");
    for (int i = 0; i < n && at < len; i++)
        at += (size_t)snprintf(buf + at, len - at, "%s%s", i == 0 ? "" : i == n - 1 ? " and " : ", ", parts[i]);
    if (c.host_binds && at < len)
        snprintf(buf + at, len - at,
                 "; host memory binds it, not the GPU's (offloaded layer inputs and a streamed base may take %.0f%% "
                 "of the host's available memory)",
                 100 * kHostShare);
    return buf;
}

// Undoes longest_choosing's choices: the configuration as the file and --set say.
static void unchoose(mt_config *cfg, long_choices c) {
    if (c.tiles) cfg->model_mlp_tile_rows = 0;
    if (c.attention) mt_config_set(cfg, "model.deterministic_attention", "auto", "memtune plan");
    if (c.offload) mt_config_set(cfg, "offload.optimizer", "none", "memtune plan");
    if (c.streamed) mt_config_set(cfg, "model.weights", "auto", "memtune plan");
    if (c.kept) *keep_knob(cfg, c.filed ? KEEP_IN_FILE : KEEP_ON_GPU) = 0;
}

// Bytes free on the file system of path, or of the folder above it where
// path is not made yet (the run makes it); -1 when neither is there.
static double disk_free(const char *path) {
    char at[4096];
    snprintf(at, sizeof at, "%s", path[0] ? path : ".");
    struct statvfs fs;
    while (statvfs(at, &fs) != 0) {
        char *slash = strrchr(at, '/');
        if (!slash && !strcmp(at, ".")) return -1;
        if (!slash)
            snprintf(at, sizeof at, ".");  // a relative path's first folder: the working directory's disk
        else if (slash == at && at[1] == '\0')
            return -1;
        else
            slash[slash == at] = '\0';  // "/x" -> "/", "a/b" -> "a"
    }
    return (double)fs.f_bavail * (double)fs.f_frsize;
}

// memory.budget auto (and no budget on a GPU): the GPU's memory less this, for what the forecast does not
// see (the CUDA context, the libraries' workspaces)
static const double kAutoBudgetMargin = 1073741824.0;

static mt_err read_budget(const mt_config *cfg, int gpu, double *budget, char *source, size_t len);

// Where a length search found nothing: the configuration's own error at
// the shortest length (a key the forecast refuses at any length, such as
// optim.warmup_steps past train.steps), which is then the problem, not memory.
static mt_err shortest_error(mt_config *cfg, const mt_model_config *mc, int gpu, int world) {
    long saved = cfg->train_seq_len;
    cfg->train_seq_len = 16;
    mt_forecast f;
    mt_err err = mt_forecast_run(cfg, mc, gpu, world, &f);
    cfg->train_seq_len = saved;
    return err;
}

mt_err mt_forecast_print(FILE *out, const char *path, char *const *sets, int n_sets, int gpu, int world,
                         double capacity, const char *capacity_source, int brief) {
    mt_config cfg;
    mt_err err = load(&cfg, path, sets, n_sets, NULL);
    mt_model_config mc;
    if (!err) err = mt_hf_read_config(cfg.model_path, &mc);
    // the run keeps to memory.budget where it is below the device's memory (auto, on a GPU: its memory less 1 GiB)
    char budget_source[96];
    if (!err && cfg.memory_budget[0]) {
        double budget = capacity > 0 ? capacity - kAutoBudgetMargin : 0;
        if (!gpu || strcmp(cfg.memory_budget, "auto"))  // (auto on the CPU: the run's refusal)
            err = read_budget(&cfg, gpu, &budget, budget_source, sizeof budget_source);
        if (!err && budget > 0 && (capacity <= 0 || budget < capacity)) {
            snprintf(budget_source, sizeof budget_source, "memory.budget %s", cfg.memory_budget);
            capacity = budget, capacity_source = budget_source;
        }
    }
    long_choices chose = {0};  // what train.seq_len: max chose
    char note[512];
    // the last line's search takes model.weights as configured: what train.seq_len max and model.weights auto
    // choose (the base streamed, its resident layers, its file's folder) is put back for it
    char weights_was[16], *path_was = err ? NULL : strdup(cfg.offload_path);
    long resident_was = err ? 0 : cfg.model_resident_layers;
    MT_CHECK(err || path_was != NULL, "memtune plan");
    snprintf(weights_was, sizeof weights_was, "%s", err ? "" : cfg.model_weights);
    if (!err && cfg.train_seq_len == MT_SEQ_LEN_MAX) {  // the longest that fits the GPU's memory
        long as_configured = 0;
        cfg.train_seq_len =
            capacity > 0 ? longest_choosing(&cfg, &mc, gpu, world, capacity, seq_len_limit(&mc), &as_configured, &chose)
                         : 0;
        if (!cfg.train_seq_len && capacity > 0) err = shortest_error(&cfg, &mc, gpu, world);
        if (!cfg.train_seq_len && !err)
            err = mt_errorf(MT_ERR_CONFIG, "train.seq_len: max: %s",
                            capacity > 0 ? "not even 16 tokens fit the GPU's memory as configured"
                                         : "give the GPU's memory (--gpu-memory 80GiB) to find the longest length");
        else if (!err)
            fprintf(out, "train.seq_len max: %ld tokens, the longest that fits%s\n", cfg.train_seq_len,
                    choices_note(chose, note, sizeof note));
    }
    char why[512];
    if (!err) err = mt_forecast_choose_weights(&cfg, &mc, gpu, world, capacity, host_available(), why, sizeof why);
    if (!err && why[0]) fprintf(out, "model.weights auto: %s (%s)\n", cfg.model_weights, why);
    if (!err) err = mt_forecast_choose_attention(&cfg, &mc, gpu, world, capacity, why, sizeof why);
    if (!err && why[0]) fprintf(out, "model.deterministic_attention auto: false (%s)\n", why);
    mt_forecast f;
    if (!err) err = mt_forecast_run(&cfg, &mc, gpu, world, &f);
    if (err) {
        free(path_was);
        mt_config_free(&cfg);
        return err;
    }
    const char *dev = gpu ? "GPU" : "host";
    fprintf(out, "memtune plan: %s on %s | %s %d layers | B=%ld T=%ld accum=%ld", path,
            gpu ? "the GPU (bf16)" : "the CPU (fp32)", mc.architecture, mc.L, cfg.train_micro_batch, cfg.train_seq_len,
            cfg.train_grad_accum);
    if (world > 1) fprintf(out, " | %d ranks (each rank's share)", world);
    fputc('\n', out);
    fprintf(out, "%s\n\n", f.what);
    char b1[32], b2[32], b3[32], b4[32];
    fprintf(out, "%-12s %11s%s\n", "category", dev, gpu ? "        host" : "");
    for (int c = 0; c < MT_MEM_NCATEGORIES; c++) {
        if (f.device[c] == 0 && f.host[c] == 0) continue;
        fprintf(out, "%-12s %s", mt_mem_category_name((mt_mem_category)c), size_text(f.device[c], b1, sizeof b1));
        if (gpu && f.host[c] > 0) fprintf(out, " %s", size_text(f.host[c], b2, sizeof b2));
        fputc('\n', out);
    }
    if (f.disk > 0) {
        const char *files[3];
        int n_files = 0;
        if (!strcmp(cfg.offload_optimizer, "ssd")) files[n_files++] = "the optimizer state's file";
        if (!strcmp(cfg.model_weights, "ssd")) files[n_files++] = "the base's file";
        if (cfg.model_ssd_layer_inputs) files[n_files++] = "the last layer inputs' file (model.ssd_layer_inputs)";
        char what[200] = "";
        for (int k = 0; k < n_files; k++)
            snprintf(what + strlen(what), sizeof what - strlen(what), "%s%s",
                     k == 0            ? ""
                     : k + 1 < n_files ? ", "
                                       : " and ",
                     files[k]);
        int state_only = n_files == 1 && !strcmp(cfg.offload_optimizer, "ssd");  // (read and written with O_DIRECT)
        fprintf(out, "%-12s %s (%s under offload.path%s)\n", "disk", size_text(f.disk, b1, sizeof b1), what,
                state_only ? "" : "; the page cache holds what it can");
        double room = disk_free(cfg.offload_path);
        if (room >= 0)
            fprintf(out, "(disk: %s free at %s: %s)\n", trimmed(size_text(room, b1, sizeof b1)), cfg.offload_path,
                    f.disk <= room ? "fits" : "does NOT fit; the run stops at start, naming it");
    }
    fprintf(out, "%-12s %s", "peak", size_text(f.device_peak, b1, sizeof b1));
    if (gpu && f.host_peak > 0) fprintf(out, " %s", size_text(f.host_peak, b2, sizeof b2));
    if (capacity > 0)
        fprintf(out, "   of %.1f GiB (%s): %s", capacity / 1073741824.0, capacity_source,
                f.device_peak <= capacity ? "fits" : "does NOT fit");
    fputc('\n', out);
    double host = mt_host_plannable();
    if (gpu && f.host_peak > 0 && host > 0)
        fprintf(out,
                "(host memory: %s, with %s of the base's fp32 values while it loads, of the %s a run may plan, "
                "%.0f%% of %s (%s): %s)\n",
                trimmed(size_text(f.host_peak, b1, sizeof b1)), trimmed(size_text(f.host_load, b4, sizeof b4)),
                trimmed(size_text(host, b2, sizeof b2)), 100 * kHostShare,
                trimmed(size_text(host_available(), b3, sizeof b3)),
                host_memory_given > 0 ? "--host-memory" : "MemAvailable",
                f.host_peak <= host ? "fits" : "does NOT fit");
    if (gpu) {
        fprintf(out,
                "(the allocator's tally; the device also holds the CUDA context and the libraries' workspaces, "
                "about 0.5-1 GiB)\n");
        if (f.attention_cudnn)
            fprintf(out, "(attention's workspace: cuDNN's for this shape, asked on GPU %d)\n", f.attention_device);
        else if (f.attention_device < 0)
            fprintf(out,
                    "(attention's workspace: memtune's own kernel's. No GPU is visible here: where cuDNN serves the "
                    "run, its workspace differs (cuDNN 9.19: 288.5 MiB against 64.5 MiB for TinyLlama-1.1B at B=4, "
                    "T=1024; its deterministic backward's grows as T x T); plan on the GPU's machine for its "
                    "figure)\n");
    }
    fputc('\n', out);
    if (brief) {
        free(path_was);
        mt_config_free(&cfg);
        return MT_OK;
    }
    // the alternatives
    char mb2[64], mbh[64], acc2[64];
    snprintf(mb2, sizeof mb2, "train.micro_batch=%ld", cfg.train_micro_batch * 2);
    snprintf(mbh, sizeof mbh, "train.micro_batch=%ld", cfg.train_micro_batch > 1 ? cfg.train_micro_batch / 2 : 1);
    snprintf(acc2, sizeof acc2, "train.grad_accum=%ld", cfg.train_grad_accum * 2);
    const char *alternatives[][8] = {
        {"as configured", NULL},
        {"activation checkpointing", "model.activation_checkpointing=true", NULL},
        {"checkpointing + offloaded activations", "model.activation_checkpointing=true",
         "model.offload_activations=true", NULL},
        {"LoRA r=16, all linear", "lora.r=16", "model.quantize=none", "optim.kind=adamw", "offload.optimizer=none",
         NULL},
        {"LoRA r=16 + checkpointing", "lora.r=16", "model.quantize=none", "optim.kind=adamw", "offload.optimizer=none",
         "model.activation_checkpointing=true"},
        {"QLoRA (NF4) r=16 + checkpointing", "lora.r=16", "model.quantize=nf4", "optim.kind=adamw",
         "offload.optimizer=none", "model.activation_checkpointing=true"},
        {"GaLore r=128 + checkpointing", "lora.r=0", "model.quantize=none", "optim.kind=galore", "train.grad_accum=1",
         "optim.grad_clip=0", "model.activation_checkpointing=true"},
        {"MeZO (all weights)", "lora.r=0", "model.quantize=none", "optim.kind=mezo", "offload.optimizer=none", NULL},
        {"AdamW state in host memory + ckpt", "lora.r=0", "model.quantize=none", "optim.kind=adamw",
         "offload.optimizer=cpu", "offload.ratio=1", "model.activation_checkpointing=true"},
        {"half AdamW state in host memory + ckpt", "lora.r=0", "model.quantize=none", "optim.kind=adamw",
         "offload.optimizer=cpu", "offload.ratio=0.5", "model.activation_checkpointing=true"},
        {"MLP in tiles of 2048 tokens", "model.mlp_tile_rows=2048", NULL},
        {"base in host memory, streamed", "model.weights=cpu", NULL},
        {"micro-batch x2", mb2, NULL},
        {"micro-batch /2, accumulation x2", mbh, acc2, NULL},
    };
    double base_time = f.step_time / f.tokens;
    fprintf(out, "%-40s %11s %8s %14s\n", "alternative", dev, capacity > 0 ? "fits" : "", "time per token");
    for (size_t a = 0; a < sizeof alternatives / sizeof alternatives[0]; a++) {
        mt_config alt;
        mt_forecast fa;
        mt_err e = load(&alt, path, sets, n_sets, alternatives[a] + 1);
        if (!e && alt.train_seq_len == MT_SEQ_LEN_MAX) {  // at the length chosen above
            alt.train_seq_len = cfg.train_seq_len;
            if (chose.tiles && !alt.model_mlp_tile_rows) alt.model_mlp_tile_rows = cfg.model_mlp_tile_rows;
        }
        if (!e && !strcmp(alt.model_deterministic_attention, "auto"))  // as the configured run resolved it
            e = mt_config_set(&alt, "model.deterministic_attention", cfg.model_deterministic_attention, "memtune plan");
        if (!e && !strcmp(alt.model_weights, "auto"))  // as a run of this alternative would resolve it
            e = mt_forecast_choose_weights(&alt, &mc, gpu, world, capacity, host_available(), why, sizeof why);
        if (!e) e = mt_forecast_run(&alt, &mc, gpu, world, &fa);
        if (e)
            fprintf(out, "%-40s %11s   refused: %.100s\n", alternatives[a][0], "-", mt_last_error());
        else
            fprintf(out, "%-40s %s %8s %13.2fx\n", alternatives[a][0], size_text(fa.device_peak, b1, sizeof b1),
                    capacity <= 0                ? ""
                    : fa.device_peak <= capacity ? "yes"
                                                 : "no",
                    fa.step_time / fa.tokens / base_time);
        mt_config_free(&alt);
    }
    fprintf(out,
            "(time per token relative to the configured run: a FLOP count and offload's CPU update, from H100 "
            "measurements; docs/plan.md)\n");
    // the longest seq_len that fits, as configured
    if (capacity > 0) {
        // long contexts: the MLP's (tokens x intermediate) buffers in tiles
        unchoose(&cfg, chose);  // "as configured": as the file and --set say
        mt_config_set(&cfg, "model.weights", weights_was, "memtune plan");
        mt_config_set(&cfg, "offload.path", path_was, "memtune plan");
        cfg.model_resident_layers = resident_was;
        long best = 0, longest = longest_choosing(&cfg, &mc, gpu, world, capacity, 1L << 20, &best, &chose);
        if (best)
            fprintf(out, "\nlongest train.seq_len that fits as configured: %ld\n", best);
        else
            fprintf(out, "\nno train.seq_len fits as configured\n");
        if (longest > best) fprintf(out, "%s: %ld\n", choices_note(chose, note, sizeof note) + 1, longest);
    }
    free(path_was);
    mt_config_free(&cfg);
    return MT_OK;
}

// "24GiB", "80G", "900MiB", "1.5T", or bytes with their unit ("4096B");
// -1 when not a size. A bare number is refused: "80" read as bytes would be
// a budget nothing fits.
double mt_parse_size(const char *v) {
    char *end;
    double x = strtod(v, &end);
    if (end == v || x <= 0 || !*end) return -1;
    double unit = 1;
    if (*end == 'K' || *end == 'k')
        unit = 1024.0, end++;
    else if (*end == 'M' || *end == 'm')
        unit = 1048576.0, end++;
    else if (*end == 'G' || *end == 'g')
        unit = 1073741824.0, end++;
    else if (*end == 'T' || *end == 't')
        unit = 1099511627776.0, end++;
    if (unit > 1 && (*end == 'i' || *end == 'I')) end++;
    if (*end == 'B' || *end == 'b') end++;
    return *end ? -1 : x * unit;
}

// The settings a budget may change: what keeps the training the same.
typedef struct {
    int ckpt, offload_acts;
    long micro_batch, accum;
    int offload_cpu;  // AdamW's state to host memory (from none): 0 no, else kOffloadRatios[offload_cpu - 1] of it
} knobs;
// The shares of a full fine-tune's AdamW state the budget may offload (offload.ratio; the rest stays on the GPU).
static const char *const kOffloadRatios[] = {"1", "0.75", "0.5", "0.25"};
enum { kOffloadChoices = sizeof kOffloadRatios / sizeof *kOffloadRatios };

static void set_knobs(mt_config *cfg, const knobs *k, const char *offload_was, double ratio_was) {
    cfg->model_activation_checkpointing = k->ckpt;
    cfg->model_offload_activations = k->offload_acts;
    cfg->train_micro_batch = k->micro_batch, cfg->train_grad_accum = k->accum;
    mt_config_set(cfg, "offload.optimizer", k->offload_cpu ? "cpu" : offload_was, "memory.budget");
    cfg->offload_ratio = k->offload_cpu ? atof(kOffloadRatios[k->offload_cpu - 1]) : ratio_was;
}

static void describe_knobs(const knobs *k, const knobs *was, char *buf, size_t n) {
    buf[0] = '\0';
    size_t at = 0;
    if (k->ckpt != was->ckpt) at += (size_t)snprintf(buf + at, n - at, "model.activation_checkpointing=true ");
    if (at < n && k->offload_acts != was->offload_acts)
        at += (size_t)snprintf(buf + at, n - at, "model.offload_activations=true ");
    if (at < n && k->micro_batch != was->micro_batch)
        at +=
            (size_t)snprintf(buf + at, n - at, "train.micro_batch=%ld train.grad_accum=%ld ", k->micro_batch, k->accum);
    if (at < n && k->offload_cpu != was->offload_cpu)
        at += (size_t)snprintf(buf + at, n - at, "offload.optimizer=cpu ");
    if (at < n && k->offload_cpu > 1)
        at += (size_t)snprintf(buf + at, n - at, "offload.ratio=%s ", kOffloadRatios[k->offload_cpu - 1]);
    if (at > 0 && at <= n) buf[at - 1] = '\0';
}

// This rank's GPU's free memory (its local rank's device: no context on another).
static double rank_gpu_free_bytes(void) {
    mt_dist *d;
    int local = 0;
    if (mt_dist_init(&d) == MT_OK) local = mt_dist_local_rank(d);
    mt_dist_free(d);
    mt_device_select(local);
    return (double)mt_device_free_bytes();
}

// memory.budget in bytes, and where it came from (a size, or auto: the GPU's free memory less 1 GiB).
static mt_err read_budget(const mt_config *cfg, int gpu, double *budget, char *source, size_t len) {
    if (!strcmp(cfg->memory_budget, "auto")) {
        if (!gpu)
            return mt_errorf(MT_ERR_CONFIG,
                             "memory.budget auto takes the GPU's free memory, and this run is on the "
                             "CPU; give a size (memory.budget: 16GiB) or none");
        *budget = rank_gpu_free_bytes() - kAutoBudgetMargin;
        snprintf(source, len, "auto: the GPU's free memory less 1 GiB");
        return MT_OK;
    }
    *budget = mt_parse_size(cfg->memory_budget);
    if (*budget <= 0)
        return mt_errorf(MT_ERR_CONFIG,
                         "memory.budget %s: expected a size with its unit (24GiB, 16G, 900MiB), auto, or empty",
                         cfg->memory_budget);
    snprintf(source, len, "%s", cfg->memory_budget);
    return MT_OK;
}

// model.weights auto chose to stream (cfg says cpu or ssd; f is that run's
// forecast): the first layers that fit `capacity` beside it stay on the GPU
// (model.resident_layers, where 0 and the run takes it: the config's rules
// refuse it where the layers are updated in host memory). Each kept layer
// takes a slot's bytes, so the peak grows with their count: the most that
// fit, by bisection. *f becomes the chosen run's forecast; `kept` says what
// was kept ("" none).
static void keep_resident_layers(mt_config *cfg, const mt_model_config *mc, int gpu, int world, double capacity,
                                 mt_forecast *f, char *kept, size_t len) {
    kept[0] = '\0';
    if (cfg->model_resident_layers > 0 || capacity <= 0 || f->device_peak > capacity) return;
    cfg->model_resident_layers = 1;
    int refused = mt_config_validate(cfg) != MT_OK;
    cfg->model_resident_layers = 0;
    if (refused) {
        mt_clear_error();
        return;
    }
    long lo = 1, hi = mc->L, best = 0;
    mt_forecast g, best_f = *f;
    while (lo <= hi) {
        long mid = lo + (hi - lo) / 2;
        cfg->model_resident_layers = mid;
        if (!mt_forecast_run(cfg, mc, gpu, world, &g) && g.device_peak <= capacity)
            best = mid, best_f = g, lo = mid + 1;
        else
            hi = mid - 1;
    }
    cfg->model_resident_layers = 0;
    if (!best) return;
    char value[24], b1[32];
    snprintf(value, sizeof value, "%ld", best);
    mt_config_set(cfg, "model.resident_layers", value, "model.weights auto");
    *f = best_f;
    if (best == mc->L)
        snprintf(kept, len, "; with every layer's slot on the GPU, %s",
                 trimmed(size_text(f->device_peak, b1, sizeof b1)));
    else
        snprintf(kept, len,
                 ", %s keeping the first %ld of %d layers on the GPU (model.resident_layers) and streaming "
                 "the other %ld",
                 trimmed(size_text(f->device_peak, b1, sizeof b1)), best, mc->L, mc->L - best);
}

static mt_err choose_weights(mt_config *cfg, const mt_model_config *mc, int gpu, int world, double capacity,
                             double host, const char *ssd_path, char *why, size_t len);

mt_err mt_forecast_choose_weights(mt_config *cfg, const mt_model_config *mc, int gpu, int world, double capacity,
                                  double host, char *why, size_t len) {
    why[0] = '\0';
    if (strcmp(cfg->model_weights, "auto")) return MT_OK;
    // an offload.path that serves nothing but auto's ssd choice (no offloaded optimizer or layer inputs) is
    // refused beside gpu and cpu: their forecasts, and the run unless it takes ssd, go without it
    char *ssd_path = NULL;
    if (cfg->offload_path[0] && !strcmp(cfg->offload_optimizer, "none") && !cfg->model_offload_activations) {
        ssd_path = strdup(cfg->offload_path);
        MT_CHECK(ssd_path != NULL, "offload.path");
        mt_config_set(cfg, "offload.path", "", "model.weights auto");
    }
    mt_err err = choose_weights(cfg, mc, gpu, world, capacity, host, ssd_path, why, len);
    if (ssd_path && (err || !strcmp(cfg->model_weights, "ssd") || !strcmp(cfg->model_weights, "auto")))
        mt_config_set(cfg, "offload.path", ssd_path, "model.weights auto");
    free(ssd_path);
    return err;
}

static mt_err choose_weights(mt_config *cfg, const mt_model_config *mc, int gpu, int world, double capacity,
                             double host, const char *ssd_path, char *why, size_t len) {
    char b1[32], b2[32], b3[32], b4[32];
    const char *choice = "gpu";
    mt_forecast f;
    mt_config_set(cfg, "model.weights", "gpu", "model.weights auto");
    mt_err err = mt_forecast_run(cfg, mc, gpu, world, &f);
    if (err) return err;
    if (!gpu) {
        snprintf(why, len, "the CPU backend computes where the weights are");
    } else if (capacity <= 0 || f.device_peak <= capacity) {
        snprintf(why, len, "the run fits the GPU's %s as it is (%s)",
                 capacity > 0 ? trimmed(size_text(capacity, b1, sizeof b1)) : "memory (its size unknown here)",
                 trimmed(size_text(f.device_peak, b2, sizeof b2)));
    } else {
        double resident = f.device_peak;
        mt_config_set(cfg, "model.weights", "cpu", "model.weights auto");
        if (mt_forecast_run(cfg, mc, gpu, world, &f)) {  // streaming is refused for this run: resident it stays
            snprintf(why, len, "streaming does not serve this run (%.120s)", mt_last_error());
            mt_config_set(cfg, "model.weights", "gpu", "model.weights auto");
        } else if (host <= 0 || f.host_peak <= kHostShare * host) {
            choice = "cpu";
            char b5[32], kept[256];
            double streamed = f.device_peak;
            keep_resident_layers(cfg, mc, gpu, world, capacity, &f, kept, sizeof kept);
            snprintf(why, len,
                     "resident it needs %s of the GPU's %s, streamed %s%s; host memory holds the base (%s of %s "
                     "available)",
                     trimmed(size_text(resident, b1, sizeof b1)), trimmed(size_text(capacity, b2, sizeof b2)),
                     trimmed(size_text(streamed, b5, sizeof b5)), kept, trimmed(size_text(f.host_peak, b3, sizeof b3)),
                     host > 0 ? trimmed(size_text(host, b4, sizeof b4)) : "unknown");
        } else if (ssd_path || cfg->offload_path[0]) {
            choice = "ssd";
            char kept[256];
            double host_peak = f.host_peak;
            if (ssd_path) mt_config_set(cfg, "offload.path", ssd_path, "model.weights auto");
            mt_config_set(cfg, "model.weights", "ssd", "model.weights auto");
            keep_resident_layers(cfg, mc, gpu, world, capacity, &f, kept, sizeof kept);
            snprintf(why, len,
                     "it fits neither the GPU's %s resident nor host memory (%s needed, %s available): "
                     "the base goes to a file under %s%s",
                     trimmed(size_text(capacity, b1, sizeof b1)), trimmed(size_text(host_peak, b2, sizeof b2)),
                     trimmed(size_text(host, b3, sizeof b3)), cfg->offload_path, kept);
        } else {
            mt_config_set(cfg, "model.weights", "auto", "model.weights auto");
            return mt_errorf(MT_ERR_CONFIG,
                             "model.weights auto: the run fits neither the GPU's %s resident nor host memory "
                             "(%s needed with the base there, %s available); set offload.path to a folder on a "
                             "local SSD for model.weights: ssd",
                             trimmed(size_text(capacity, b1, sizeof b1)),
                             trimmed(size_text(f.host_peak, b2, sizeof b2)), trimmed(size_text(host, b3, sizeof b3)));
        }
    }
    mt_config_set(cfg, "model.weights", choice, "model.weights auto");
    return MT_OK;
}

// memory.budget, else (on a GPU) its free memory less 1 GiB, else 0 (unknown).
static mt_err auto_capacity(mt_config *cfg, int gpu, double *capacity) {
    char source[64];
    *capacity = 0;
    if (cfg->memory_budget[0]) return read_budget(cfg, gpu, capacity, source, sizeof source);
    if (gpu) *capacity = rank_gpu_free_bytes() - kAutoBudgetMargin;
    return MT_OK;
}

mt_err mt_forecast_weights_auto(mt_config *cfg, int gpu, int world) {
    if (strcmp(cfg->model_weights, "auto")) return MT_OK;
    double capacity = 0;  // memory.budget, else what its auto takes
    char why[512];
    mt_model_config mc;
    mt_err err = auto_capacity(cfg, gpu, &capacity);
    if (!err) err = mt_hf_read_config(cfg->model_path, &mc);
    if (!err) err = mt_forecast_choose_weights(cfg, &mc, gpu, world, capacity, host_available(), why, sizeof why);
    if (!err) mt_info("model.weights auto: %s (%s)", cfg->model_weights, why);
    return err;
}

mt_err mt_forecast_choose_attention(mt_config *cfg, const mt_model_config *mc, int gpu, int world, double capacity,
                                    char *why, size_t len) {
    why[0] = '\0';
    if (strcmp(cfg->model_deterministic_attention, "auto")) return MT_OK;
    mt_config_set(cfg, "model.deterministic_attention", "true", "model.deterministic_attention auto");
    if (!gpu || capacity <= 0) return MT_OK;  // the CPU's attention is deterministic; an unknown GPU: keep it
    mt_forecast f;
    mt_err err = mt_forecast_run(cfg, mc, gpu, world, &f);
    if (err || f.device_peak <= capacity) return err;
    double deterministic = f.device_peak;
    mt_config_set(cfg, "model.deterministic_attention", "false", "model.deterministic_attention auto");
    if (mt_forecast_run(cfg, mc, gpu, world, &f) || f.device_peak > capacity) {  // no help: the budget's check says
        mt_config_set(cfg, "model.deterministic_attention", "true", "model.deterministic_attention auto");
        return MT_OK;
    }
    char b1[32], b2[32], b3[32];
    snprintf(why, len,
             "with cuDNN's deterministic attention backward the run needs %s of the GPU's %s, with the "
             "non-deterministic one %s; a resumed run then equals an uninterrupted one to fp32 rounding, not bit for "
             "bit",
             trimmed(size_text(deterministic, b1, sizeof b1)), trimmed(size_text(capacity, b2, sizeof b2)),
             trimmed(size_text(f.device_peak, b3, sizeof b3)));
    return MT_OK;
}

mt_err mt_forecast_attention_auto(mt_config *cfg, int gpu, int world) {
    if (strcmp(cfg->model_deterministic_attention, "auto")) return MT_OK;
    double capacity = 0;
    char why[512];
    mt_model_config mc;
    if (!gpu) return mt_config_set(cfg, "model.deterministic_attention", "true", "model.deterministic_attention auto");
    mt_err err = mt_hf_read_config(cfg->model_path, &mc);
    if (err) return err;
    // cuDNN's deterministic backward on Hopper: B x heads x T (64s) x T (128s) bf16. Without a budget, below
    // 1 GiB it stays, unasked (the forecast would open a cuDNN handle of its own on the GPU for the run's life)
    double T = (double)cfg->train_seq_len,
           dp = (double)cfg->train_micro_batch * mc.H * (ceil(T / 64) * 64) * (ceil(T / 128) * 128) * 2;
    if (!cfg->memory_budget[0] && dp < 1073741824.0) {
        mt_config_set(cfg, "model.deterministic_attention", "true", "model.deterministic_attention auto");
        return MT_OK;
    }
    err = auto_capacity(cfg, gpu, &capacity);
    if (!err) err = mt_forecast_choose_attention(cfg, &mc, gpu, world, capacity, why, sizeof why);
    if (!err && why[0]) mt_info("model.deterministic_attention auto: false (%s)", why);
    return err;
}

long mt_forecast_longest_seq_len(mt_config *cfg, const mt_model_config *mc, int gpu, int world, double capacity,
                                 long limit) {
    long saved = cfg->train_seq_len, lo = 16, hi = limit, best = 0;
    // the host's bound, where it binds the length: 0 for a CPU run (its device is the host), where the host's
    // memory is unknown, and where even the shortest length does not fit it (the run's host memory, not its
    // length, is then the problem, and this machine may not be the one that runs it)
    double host = gpu ? mt_host_plannable() : 0;
    mt_forecast shortest;
    cfg->train_seq_len = lo;
    if (host > 0 && !mt_forecast_run(cfg, mc, gpu, world, &shortest) && shortest.host_peak > host) host = 0;
    while (lo <= hi) {
        long mid = lo + (hi - lo) / 2;
        cfg->train_seq_len = mid;
        mt_forecast f;
        if (!mt_forecast_run(cfg, mc, gpu, world, &f) && f.device_peak <= capacity &&
            (host <= 0 || f.host_peak <= host))
            best = mid, lo = mid + 1;
        else
            hi = mid - 1;
    }
    cfg->train_seq_len = saved;
    return best;
}

mt_err mt_forecast_seq_len_max(mt_config *cfg, int gpu, int world) {
    if (cfg->train_seq_len != MT_SEQ_LEN_MAX) return MT_OK;
    if (!cfg->memory_budget[0])
        return mt_errorf(MT_ERR_CONFIG,
                         "train.seq_len: max takes the longest length that fits memory.budget; set one "
                         "(memory.budget: 24GiB, or auto on a GPU), or give train.seq_len a number");
    double budget = 0.0;
    char source[64], b1[32];
    mt_model_config mc;
    mt_err err = read_budget(cfg, gpu, &budget, source, sizeof source);
    if (!err) err = mt_hf_read_config(cfg->model_path, &mc);
    if (err) return err;
    long limit = seq_len_limit(&mc), as_configured = 0;
    long_choices chose;
    char note[512];
    long best = longest_choosing(cfg, &mc, gpu, world, budget, limit, &as_configured, &chose);
    if (!best && (err = shortest_error(cfg, &mc, gpu, world))) return err;
    if (!best)
        return mt_errorf(MT_ERR_CONFIG,
                         "train.seq_len: max: not even 16 tokens fit memory.budget %s (%s) as configured; raise the "
                         "budget or train less (memtune plan shows the alternatives)",
                         source, trimmed(size_text(budget, b1, sizeof b1)));
    cfg->train_seq_len = best;
    mt_info("train.seq_len max: %ld tokens, the longest that fits memory.budget %s (%s)%s%s", best, source,
            trimmed(size_text(budget, b1, sizeof b1)), choices_note(chose, note, sizeof note),
            best == limit ? " (the model's max_position_embeddings)" : "");
    return MT_OK;
}

mt_err mt_forecast_fit_budget(mt_config *cfg, int gpu, int world) {
    if (!cfg->memory_budget || !cfg->memory_budget[0]) return MT_OK;
    double budget = 0.0;
    char source[64];
    mt_err err = read_budget(cfg, gpu, &budget, source, sizeof source);
    if (err) return err;
    mt_model_config mc;
    if ((err = mt_hf_read_config(cfg->model_path, &mc))) return err;
    char *offload_was = strdup(cfg->offload_optimizer);
    MT_CHECK(offload_was != NULL, "budget");
    double ratio_was = cfg->offload_ratio;
    knobs was = {(int)cfg->model_activation_checkpointing, (int)cfg->model_offload_activations, cfg->train_micro_batch,
                 cfg->train_grad_accum, 0};
    mt_forecast f;
    if ((err = mt_forecast_run(cfg, &mc, gpu, world, &f))) {
        free(offload_was);
        return err;
    }
    double need = f.device_peak;
    if (need <= budget) {
        char b1[32], b2[32];
        mt_info("memory.budget %s (%s): the configuration's forecast is %s; it runs as it is", source,
                trimmed(size_text(budget, b1, sizeof b1)), trimmed(size_text(need, b2, sizeof b2)));
        free(offload_was);
        return MT_OK;
    }
    knobs best = was, smallest = was;
    double best_time = INFINITY, best_peak = 0, smallest_peak = need, base_time = f.step_time / f.tokens;
    int can_offload = gpu && !strcmp(offload_was, "none") && strcmp(cfg->optim_kind, "mezo");
    for (int ckpt = was.ckpt; ckpt <= 1; ckpt++)
        for (int acts = was.offload_acts; acts <= ckpt; acts++)
            for (long mb = was.micro_batch, acc = was.accum; mb >= 1; mb /= 2, acc *= 2) {
                if (mb != was.micro_batch && strcmp(cfg->optim_kind, "galore") == 0) break;  // GaLore: accum 1
                // (offload.ratio below 1 only where it is built: the forecast refuses it elsewhere)
                for (int off = 0; off <= (can_offload ? kOffloadChoices : 0); off++) {
                    knobs k = {ckpt, acts, mb, acc, off};
                    set_knobs(cfg, &k, offload_was, ratio_was);
                    mt_forecast fk;
                    if (mt_forecast_run(cfg, &mc, gpu, world, &fk)) continue;
                    double t = fk.step_time / fk.tokens;
                    if (fk.device_peak < smallest_peak) smallest = k, smallest_peak = fk.device_peak;
                    if (fk.device_peak <= budget && t < best_time) best = k, best_time = t, best_peak = fk.device_peak;
                }
                if (mb % 2) break;
            }
    char what[256];
    if (isinf(best_time)) {
        set_knobs(cfg, &was, offload_was, ratio_was);
        describe_knobs(&smallest, &was, what, sizeof what);
        free(offload_was);
        char b1[32], b2[32], b3[32];
        return mt_errorf(MT_ERR_CONFIG,
                         "memory.budget %s (%s): the configuration needs %s, and no setting that keeps this training "
                         "fits: the smallest (%s) needs %s. Raise the budget, or train less (lora.r, model.quantize: "
                         "nf4, optim.kind: galore or mezo; memtune plan shows them)",
                         source, trimmed(size_text(budget, b1, sizeof b1)), trimmed(size_text(need, b2, sizeof b2)),
                         what[0] ? what : "as configured", trimmed(size_text(smallest_peak, b3, sizeof b3)));
    }
    set_knobs(cfg, &best, offload_was, ratio_was);
    describe_knobs(&best, &was, what, sizeof what);
    char b1[32], b2[32], b3[32];
    mt_info(
        "memory.budget %s (%s): the configuration needs %s; running with %s (forecast %s, %.2fx the time per "
        "token), the fastest of the settings that keep this training and fit",
        source, trimmed(size_text(budget, b1, sizeof b1)), trimmed(size_text(need, b2, sizeof b2)), what,
        trimmed(size_text(best_peak, b3, sizeof b3)), best_time / base_time);
    free(offload_was);
    return MT_OK;
}

mt_err mt_forecast_check_host(const mt_config *cfg, int gpu, int world) {
    if (!cfg->memory_host_check) return MT_OK;
    double host = host_available();
    mt_model_config mc;
    mt_forecast f;
    // unknown available memory, or a run the forecast does not serve (the trainer speaks for it): no check.
    // (Host memory alone: every GPU run passes here, and asking its cuDNN would open a handle for nothing.)
    if (host <= 0 || mt_hf_read_config(cfg->model_path, &mc) || forecast_run(cfg, &mc, gpu, world, 0, &f)) {
        mt_clear_error();
        return MT_OK;
    }
    // the CPU backend computes in host memory: its "device" is the host (its host categories are counted there)
    double one = (gpu ? f.host_peak : f.device_peak + f.host_load) + f.host_copies;
    int ranks = f.host_ranks;
    double need = one * ranks;
    if (need <= host) return MT_OK;
    char b1[32], b2[32], b3[32], per[96] = "";
    if (ranks > 1)
        snprintf(per, sizeof per, " (%d ranks on this host, %s each)", ranks, trimmed(size_text(one, b3, sizeof b3)));
    return mt_errorf(
        MT_ERR_NOMEM,
        "this run needs about %s of host memory%s by memtune's forecast (%s: %s), and this machine has %s "
        "available (MemAvailable): the kernel would kill it part way. Hold less: %s; `memtune plan` lists what each "
        "needs. memory.host_check: false runs it anyway",
        trimmed(size_text(need, b1, sizeof b1)), per, gpu ? "the GPU run's host side" : "the CPU backend", f.what,
        trimmed(size_text(host, b2, sizeof b2)),
        gpu ? "offload.moments: int8 (8-bit AdamW moments in the store), offload.optimizer: ssd, offload.ratio "
              "below 1 (part of the state on the GPU), model.weights: gpu, or LoRA/QLoRA (lora.r, model.quantize: nf4)"
            : "LoRA or QLoRA (lora.r, model.quantize: nf4), optim.kind: galore or mezo, a smaller train.micro_batch "
              "or train.seq_len, or a GPU (train.device: gpu)");
}
