// trainer/forecast.h: what a run will hold, before it runs (`memtune plan`):
// the bytes of every tallied category (kernels/mem.h) on the training device
// and in host memory, counted from the plan (trainer/plan.h) and the same
// tables and layout the model and updaters allocate from, for any machine
// (no GPU needed to forecast a GPU run); and a relative step time from a
// FLOP count and two H100 measurements (trainer/forecast.c says which).
#ifndef MT_FORECAST_H
#define MT_FORECAST_H

#include <stdio.h>

#include "kernels/mem.h"
#include "trainer/config.h"
#include "trainer/params.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int gpu;                            // forecast for the GPU backend (bf16), else the CPU's (fp32)
    double device[MT_MEM_NCATEGORIES];  // each category's peak where the run computes
    double device_peak;                 // all of them at once (resident plus the largest transient)
    double host[MT_MEM_NCATEGORIES];    // host memory of a GPU run (offload stores, pinned buffers)
    double host_peak;                   // with host_load
    double host_load;                   // the base's fp32 values on the host while it loads (a whole copy: kept)
    double host_copies;                 // AdamW's moments' host copies once a checkpoint is written (8 B a value)
    int host_ranks;                     // the launch's ranks on this host (trainer/dist.c's local world)
    double disk;                        // the base's file with model.weights: ssd (bytes)
    double step_time;                   // relative: FLOPs / R + offloaded updates / S (forecast.c)
    double tokens;                      // per step, over the ranks
    char what[256];                     // the run in words: what is trained, where the state lives
    int attention_device;  // GPU forecasts: the visible GPU whose cuDNN was asked for attention's workspace, or -1
    int attention_cudnn;   // and whether cuDNN serves there (else memtune's own kernel's workspace is counted)
} mt_forecast;

// Forecasts cfg's run with `world` ranks (ZeRO shards divide by it) on the
// GPU (gpu) or the CPU; model config mc (config.json's). Errors are the
// plan's (a combination the trainer would refuse).
mt_err mt_forecast_run(const mt_config *cfg, const mt_model_config *mc, int gpu, int world, mt_forecast *f);

// `memtune plan`: the forecast of the configured run, a table of
// alternatives (checkpointing, offloaded activations, LoRA, QLoRA, GaLore,
// MeZO, optimizer offload, micro-batch sizes) against `capacity` bytes of GPU
// memory (0: unknown), and the longest train.seq_len that fits. The config is
// the file at path with its --set assignments (sets). brief: the configured
// run's forecast alone (no alternatives, no longest length: on a GPU's
// machine each of those forecasts asks cuDNN for its attention's workspace).
mt_err mt_forecast_print(FILE *out, const char *path, char *const *sets, int n_sets, int gpu, int world,
                         double capacity, const char *capacity_source, int brief);

// memory.budget: when cfg's run would need more than the budget where it
// computes (gpu, world ranks), changes cfg to the fastest of the settings
// that keep the same training (activation checkpointing, offloaded
// activations, micro-batch halved with accumulation doubled, AdamW's state
// in host memory) whose forecast fits, and logs which and why; refuses with
// the smallest one's needs when none fits. No budget: nothing changes.
mt_err mt_forecast_fit_budget(mt_config *cfg, int gpu, int world);
// memory.host_check: refuses, naming the need and the fixes, a run whose
// forecast host memory (a GPU run's offload stores, pinned buffers and
// loading buffer; everything on the CPU backend; and the moments' host
// copies where checkpoints are written), times the ranks launched
// on this host, is more than the host's available memory; nothing is
// allocated yet. Unknown available memory, or the key false: nothing.
mt_err mt_forecast_check_host(const mt_config *cfg, int gpu, int world);
// The host memory the forecasts take as available (memtune plan --host-memory)
// instead of this machine's MemAvailable.
void mt_forecast_set_host_memory(double bytes);
// The longest train.seq_len, from 16 to limit, whose forecast fits capacity
// bytes with cfg's other settings (cfg is changed and restored); 0: none.
long mt_forecast_longest_seq_len(mt_config *cfg, const mt_model_config *mc, int gpu, int world, double capacity,
                                 long limit);
// train.seq_len: max (MT_SEQ_LEN_MAX): sets it to the longest length that
// fits memory.budget as configured (at most the model's
// max_position_embeddings) and logs it; refuses without a budget, or when
// nothing fits. Any other length: nothing changes.
mt_err mt_forecast_seq_len_max(mt_config *cfg, int gpu, int world);
// model.weights: auto: the first of gpu, cpu and ssd that serves cfg's run on
// mc: gpu when the resident forecast fits `capacity` bytes of GPU memory (0:
// unknown, so gpu) or the run is on the CPU (gpu 0); cpu when streaming from
// host memory serves the run and its host forecast is at most 85% of `host`
// available bytes (0: unknown); ssd when offload.path is set; else refused.
// Sets model.weights and says why in `why`. Other values: nothing changes.
mt_err mt_forecast_choose_weights(mt_config *cfg, const mt_model_config *mc, int gpu, int world, double capacity,
                                  double host, char *why, size_t len);
// The trainer's model.weights: auto, against memory.budget (or the GPU's
// free memory less 1 GiB) and the host's available memory; logs the choice.
mt_err mt_forecast_weights_auto(mt_config *cfg, int gpu, int world);
// model.deterministic_attention auto, resolved before the run: true (cuDNN's
// deterministic backward, bit-reproducible) where the run fits capacity with
// it, or no GPU computes, or capacity is unknown (<= 0); false where only the
// non-deterministic backward's workspace (linear in T, not T x T) fits. why:
// empty, or (for false) the two peaks and what false gives up.
mt_err mt_forecast_choose_attention(mt_config *cfg, const mt_model_config *mc, int gpu, int world, double capacity,
                                    char *why, size_t len);
// mt_forecast_choose_attention against memory.budget, else the GPU's free
// memory less 1 GiB; logs a choice of false. Without a budget, where the
// deterministic backward's workspace would stay under 1 GiB, true at once
// (no forecast: it would open a cuDNN handle of its own on the GPU).
mt_err mt_forecast_attention_auto(mt_config *cfg, int gpu, int world);
// "24GiB", "80G", "900MiB", "1.5T", or bytes; -1 when not a size.
double mt_parse_size(const char *v);
// The host memory a run may still plan to take: a share of what the kernel
// counts as available (MemAvailable), bytes; 0 when unknown.
double mt_host_plannable(void);

#ifdef __cplusplus
}
#endif
#endif
