// trainer/config.h: the experiment configuration. One table, MT_CONFIG_TABLE,
// defines every key with its type, default, range or choices and help line;
// from it come the struct, the defaults, the YAML and --set parsers, the
// validation, `memtune train --help` and docs/configs.md, so none can drift.
#ifndef MT_CONFIG_H
#define MT_CONFIG_H

#include <stdio.h>

#include "kernels/common.h"

#ifdef __cplusplus
extern "C" {
#endif

// X(section, key, TYPE, default, min, max, choices, help)
// TYPE: INT (long), FLOAT (double), BOOL, STR (path or text), ENUM (one of
// the '|'-separated choices). min/max apply to INT and FLOAT.
#define MT_CONFIG_TABLE(X)                                                                                             \
    X(model, path, STR, "", 0, 0, "",                                                                                  \
      "Hugging Face model folder: config.json plus model.safetensors or sharded safetensors with their index")         \
    X(model, init, ENUM, "pretrained", 0, 0, "pretrained|random",                                                      \
      "pretrained: load the folder's weights; random: initialise from config.json (normal, std "                       \
      "initializer_range; norms 1) with train.seed")                                                                   \
    X(model, activation_checkpointing, BOOL, "false", 0, 0, "",                                                        \
      "keep only each layer's input and recompute the layer in backward: less memory, ~1/3 more compute")              \
    X(model, offload_activations, BOOL, "false", 0, 0, "",                                                             \
      "with activation_checkpointing: keep the saved layer inputs in pinned host memory, copied out in forward and "   \
      "back in backward beside the compute (frees L-1 of them on the GPU)")                                            \
    X(model, gpu_layer_inputs, INT, "0", 0, 1048576, "",                                                               \
      "with offload_activations: the first N saved layer inputs stay on the GPU and only the others go to host "       \
      "memory (train.seq_len: max raises it where host memory binds the length)")                                      \
    X(model, ssd_layer_inputs, INT, "0", 0, 1048576, "",                                                               \
      "with offload_activations: the last N offloaded layer inputs live in a file under offload.path (deleted at "     \
      "once and mapped: the kernel's page cache holds what it can, the disk the rest) instead of pinned host "         \
      "memory, for lengths whose layer inputs exceed host memory; their copies are slower (pageable memory). "         \
      "train.seq_len: max sets it where offload.path is set and host memory binds")                                    \
    X(model, weights, ENUM, "gpu", 0, 0, "gpu|cpu|ssd|auto",                                                           \
      "where the base's layers live: gpu, cpu (host memory; each layer is copied to the GPU just before it runs, "     \
      "the next beside the compute: GPU memory independent of the model's depth; LoRA/QLoRA, MeZO, and full "          \
      "fine-tuning with offload.optimizer: cpu or ssd), ssd (as cpu, from a file under offload.path that the "         \
      "kernel's page cache reads in: host memory independent of the model's size) or auto (gpu when the run fits "     \
      "memory.budget or the GPU's free memory, else cpu when host memory holds the base, else ssd, keeping on the "    \
      "GPU the first layers that fit (model.resident_layers); says which; with train.seq_len max, cpu where that "     \
      "fits a longer length)")                                                                                         \
    X(model, resident_layers, INT, "0", 0, 1048576, "",                                                                \
      "with model.weights cpu or ssd (LoRA/QLoRA, MeZO): the first N layers' weights stay on the GPU, copied there "   \
      "once, and only the others are streamed each pass (less to copy a step, more GPU memory: a layer each); "        \
      "model.weights auto sets it to the most that fits and says so")                                                  \
    X(model, mlp_tile_rows, INT, "0", 0, 1 << 30, "",                                                                  \
      "0: the MLP runs over the whole micro-batch; N > 0: over tiles of N tokens, so its intermediate (tokens x "      \
      "intermediate_size, 3-4 such buffers) exists for one tile at a time; backward recomputes each tile's gate and "  \
      "up (long sequences: e.g. 4096)")                                                                                \
    X(model, deterministic_attention, ENUM, "auto", 0, 0, "auto|true|false",                                           \
      "true: the GPU's attention backward is cuDNN's deterministic algorithm (the same bits every run: resumes "       \
      "bit-identical), whose workspace is B x heads x T x T bf16 (1 GiB at T=4096 with 32 heads, 256 GiB at 64k); "    \
      "false: its non-deterministic one, workspace linear in T (resumes exact to fp32 rounding, not bit for bit); "    \
      "auto: true unless only false fits memory.budget or the GPU's free memory (says so)")                            \
    X(model, quantize, ENUM, "none", 0, 0, "none|nf4",                                                                 \
      "nf4: QLoRA, the frozen base's linear weights stored in 4-bit NormalFloat with double quantization "             \
      "(bitsandbytes' format, ~0.52 bytes per weight); needs lora.r > 0")                                              \
    X(lora, r, INT, "0", 0, 4096, "",                                                                                  \
      "LoRA rank: 0 trains every weight (full fine-tune); above 0 trains adapters on a frozen base")                   \
    X(lora, alpha, FLOAT, "16", 0, 1e6, "",                                                                            \
      "adapter output scale alpha / r (alpha / sqrt(r) with lora.rslora), PEFT's lora_alpha")                          \
    X(lora, dropout, FLOAT, "0.05", 0, 0.95, "",                                                                       \
      "dropout on the adapters' input while training (PEFT's lora_dropout)")                                           \
    X(lora, targets, STR, "all-linear", 0, 0, "",                                                                      \
      "modules with adapters, PEFT's names comma-separated (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"            \
      "down_proj) or all-linear")                                                                                      \
    X(lora, rslora, BOOL, "false", 0, 0, "", "rank-stabilized scale alpha / sqrt(r) (PEFT's use_rslora)")              \
    X(lora, init, STR, "", 0, 0, "",                                                                                   \
      "PEFT adapter folder to start from (its r, lora_alpha, target_modules and use_rslora must equal lora.*); "       \
      "empty: PEFT's default init, A Kaiming-uniform and B zero")                                                      \
    X(data, train, STR, "", 0, 0, "", "HDF5 token dataset (make one with `memtune tokenize`)")                         \
    X(data, eval_fraction, FLOAT, "0.02", 0, 0.5, "", "share of the dataset's windows held out for eval loss")         \
    X(data, document_mask, BOOL, "false", 0, 0, "",                                                                    \
      "documents packed into one row (the dataset's doc_offsets) attend only within themselves, positions restart "    \
      "at each, and no token is trained to predict the next document's first")                                         \
    X(train, steps, INT, "100", 1, 1000000000, "", "optimizer steps to run")                                           \
    X(train, micro_batch, INT, "4", 1, 65536, "", "rows per forward/backward pass (B)")                                \
    X(train, seq_len, INT, "512", 2, 1048576, "",                                                                      \
      "tokens per row (T); max: the longest that fits memory.budget; on the way it sets model.weights cpu (where "     \
      "auto, on a GPU: the base streamed), model.mlp_tile_rows 2048 (where 0), model.deterministic_attention false "   \
      "(where auto, on a GPU) and, for LoRA, offload.optimizer cpu (where none, on a GPU) wherever each fits a "       \
      "longer one, and says so (memtune plan lists it)")                                                               \
    X(train, grad_accum, INT, "1", 1, 65536, "",                                                                       \
      "micro-batches per optimizer step; the loss is the mean over all their tokens")                                  \
    X(train, seed, INT, "1337", 0, 2147483647, "", "seed for data order and random initialisation")                    \
    X(train, device, ENUM, "auto", 0, 0, "auto|cpu|gpu",                                                               \
      "auto: the GPU when one is visible, else the CPU; gpu: fail if there is none")                                   \
    X(train, log_every, INT, "1", 1, 1000000, "", "steps between progress lines and metrics records")                  \
    X(train, eval_every, INT, "50", 0, 1000000000, "", "steps between eval losses (0: only at the end)")               \
    X(train, eval_batches, INT, "4", 0, 100000, "", "micro-batches per eval loss (0: no eval)")                        \
    X(train, sample_every, INT, "0", 0, 1000000000, "",                                                                \
      "steps between samples of the model's text from train.sample_prompts (greedy, on the run's GPU in bf16, or the " \
      "CPU in fp32 on a CPU run or when the GPU has no room for a decoding copy; printed and in metrics.jsonl; 0: "    \
      "none)")                                                                                                         \
    X(train, sample_prompts, STR, "", 0, 0, "", "prompts for train.sample_every, separated by |")                      \
    X(train, sample_tokens, INT, "48", 1, 4096, "", "new tokens per sample")                                           \
    X(train, resume, STR, "", 0, 0, "",                                                                                \
      "auto: continue from the newest complete checkpoint in output.dir (or start fresh if there is none); "           \
      "a checkpoint folder: continue from it; empty: start fresh")                                                     \
    X(train, stop_after, INT, "0", 0, 1000000000, "",                                                                  \
      "stop with a checkpoint after this many steps in this run (0: run to train.steps); to split a job into shifts")  \
    X(train, on_nonfinite, ENUM, "stop", 0, 0, "stop|skip",                                                            \
      "a non-finite loss or gradient: stop (keeping the last good checkpoint) or skip that step's update")             \
    X(checkpoint, every, INT, "0", 0, 1000000000, "",                                                                  \
      "steps between checkpoints in output.dir/checkpoints (0: only at the end and on stop)")                          \
    X(checkpoint, keep, INT, "2", 1, 1000000, "", "complete checkpoints to keep; older ones are deleted")              \
    X(checkpoint, final, BOOL, "true", 0, 0, "",                                                                       \
      "write a checkpoint after the last step too (false: the run ends with output.dir/model only)")                   \
    X(checkpoint, async, BOOL, "true", 0, 0, "",                                                                       \
      "write checkpoints on a background thread while training goes on (the state is read back first; the next "       \
      "checkpoint and the end of the run wait for it; ZeRO's sharded checkpoints stay synchronous)")                   \
    X(optim, kind, ENUM, "adamw", 0, 0, "adamw|mezo|galore",                                                           \
      "update rule: adamw (backward pass, AdamW moments), mezo (zeroth-order SGD from two forward passes per "         \
      "direction: the memory of inference; see the mezo.* keys) or galore (full-parameter AdamW with the matrices' "   \
      "moments in a low-rank projection of their gradients, updated layer by layer in backward; see galore.*)")        \
    X(optim, lr, FLOAT, "3e-4", 0, 10, "", "peak learning rate")                                                       \
    X(optim, schedule, ENUM, "cosine", 0, 0, "cosine|linear|constant", "decay after warmup")                           \
    X(optim, warmup_steps, INT, "0", 0, 1000000000, "", "linear warmup steps")                                         \
    X(optim, min_lr_ratio, FLOAT, "0.1", 0, 1, "", "final learning rate as a fraction of optim.lr")                    \
    X(optim, beta1, FLOAT, "0.9", 0, 0.999999, "", "AdamW first-moment decay")                                         \
    X(optim, beta2, FLOAT, "0.95", 0, 0.999999, "", "AdamW second-moment decay")                                       \
    X(optim, eps, FLOAT, "1e-8", 0, 1, "", "AdamW denominator epsilon")                                                \
    X(optim, weight_decay, FLOAT, "0.0", 0, 10, "",                                                                    \
      "decoupled weight decay on matrices and embeddings (not on norms and biases)")                                   \
    X(optim, grad_clip, FLOAT, "1.0", 0, 1e9, "", "clip the global gradient norm to this (0: off)")                    \
    X(mezo, eps, FLOAT, "1e-3", 0, 1, "", "MeZO: perturbation scale of the two-point (SPSA) gradient estimate")        \
    X(mezo, samples, INT, "1", 1, 16, "",                                                                              \
      "MeZO: random directions per step (n-SPSA), averaged; each costs two forward passes")                            \
    X(mezo, trainable, STR, "*", 0, 0, "",                                                                             \
      "MeZO: what it trains, comma-separated glob patterns over the trainable parameters' names (Hugging Face "        \
      "names; PEFT adapter names with lora.r > 0), e.g. model.layers.*.self_attn.*; * for all")                        \
    X(galore, rank, INT, "128", 1, 65536, "",                                                                          \
      "GaLore: rank r of each projected matrix's gradient (capped at its smaller side)")                               \
    X(galore, update_gap, INT, "200", 1, 1000000000, "",                                                               \
      "GaLore: steps between projector refreshes (each from the current gradient's top-r singular subspace)")          \
    X(galore, scale, FLOAT, "0.25", 0, 1e6, "",                                                                        \
      "GaLore: factor on the projected matrices' updates (the paper's alpha)")                                         \
    X(galore, targets, STR, "*.self_attn.*_proj.weight,*.mlp.*_proj.weight", 0, 0, "",                                 \
      "GaLore: which matrices are projected, comma-separated glob patterns over Hugging Face names; every other "      \
      "parameter (norms, embeddings, lm_head) takes plain AdamW")                                                      \
    X(galore, refresh, ENUM, "randomized", 0, 0, "randomized|svd",                                                     \
      "GaLore: how projectors are computed: randomized (range finder with 2 subspace iterations, 8 extra columns) "    \
      "or svd (eigenvectors of the full Gram matrix, exact; slower); docs/galore.md compares them")                    \
    X(galore, moments, ENUM, "fp32", 0, 0, "fp32|int8",                                                                \
      "GaLore: Adam moments in fp32, or int8 (blockwise 8-bit, 256 values per block with an absmax; ~1/4 the bytes)")  \
    X(offload, optimizer, ENUM, "none", 0, 0, "none|cpu|ssd",                                                          \
      "where AdamW's fp32 master weights and moments live: none (the GPU), cpu (host memory; AdamW runs on "           \
      "the CPU beside the GPU's work, gradients and weights cross in bf16) or ssd (a file under offload.path, read "   \
      "ahead and written behind with O_DIRECT); with optim.kind galore, the state of what GaLore does not project "    \
      "(embeddings, norms, head); see docs/offload.md")                                                                \
    X(offload, moments, ENUM, "fp32", 0, 0, "fp32|int8",                                                               \
      "AdamW's offloaded moments (host memory or the ssd file) as fp32, or int8 (blockwise 8-bit codes, 256 values "   \
      "per block with an absmax, as galore.moments int8; 6 bytes a trained parameter of state instead of 12, in "      \
      "memory or on disk; changes the math within the 8-bit moments' rounding)")                                       \
    X(offload, path, STR, "", 0, 0, "",                                                                                \
      "offload.optimizer ssd: folder on a fast local disk for the state file (12 bytes per trained parameter, 6 "      \
      "with offload.moments int8, reserved at start, deleted at the end; checkpoints keep the state); also "           \
      "model.weights ssd's base file and "                                                                             \
      "model.ssd_layer_inputs' file")                                                                                  \
    X(offload, io_threads, INT, "4", 1, 64, "", "offload.optimizer ssd: reads and writes in flight at once")           \
    X(offload, threads, INT, "0", 0, 4096, "",                                                                         \
      "CPU threads of the offloaded AdamW (0: the cores this rank may run on, at most its share of the node's, "       \
      "less one that drives the GPU when there is one)")                                                               \
    X(offload, grad_sum, ENUM, "auto", 0, 0, "auto|host|gpu",                                                          \
      "with train.grad_accum > 1, where a step's gradients add up over its micro-batches: host (each micro-batch's "   \
      "stream out and host memory sums them in fp32, 4 bytes a trained parameter; none on the GPU), gpu (the fp32 "    \
      "block on the GPU, 4 bytes a parameter there) or auto (host when the run's host memory then stays within 85% "   \
      "of the node's; LoRA's adapters always on the GPU)")                                                             \
    X(offload, delay, INT, "0", 0, 1, "",                                                                              \
      "1: ZeRO-Offload's delayed parameter update: a step's forward and backward do not wait for the CPU's update "    \
      "of the step before, which reaches the weights a step later (each gradient is taken at the weights of two "      \
      "steps before; checkpoints keep the weights one update behind beside the master, and resumes continue bit for "  \
      "bit); changes the math; 0: exact")                                                                              \
    X(offload, ratio, FLOAT, "1", 0, 1, "",                                                                            \
      "the share of a full fine-tune's trained parameters whose AdamW state is offloaded (DeepSpeed's "                \
      "offload_optimizer.ratio); the first forward units (the embedding, then the first layers) keep the rest on "     \
      "the GPU (16 bytes a parameter: master, moments, gradient), updated there after backward while the CPU updates " \
      "the others beside the next forward (with offload.delay 1, a step late, beside the next step: only those "       \
      "change the math); rounded down to whole units on the GPU; 1: all offloaded")                                    \
    X(offload, trace_step, INT, "0", 0, 1000000000, "",                                                                \
      "write the timeline of this step and the next (1-based) in Chrome's trace format (chrome://tracing, "            \
      "ui.perfetto.dev): offload.optimizer's copies and CPU updates to output.dir/offload-trace.json (GPU), "          \
      "model.weights cpu or ssd's layer copies and compute to output.dir/streaming-trace.json (rank 0's); 0: none")    \
    X(dist, zero_stage, INT, "0", 0, 2, "",                                                                            \
      "data parallelism (mpirun -np N): 0 every rank keeps the whole AdamW state; 1 each keeps (or, with offload, "    \
      "offloads) its shard (1/N); 2 also the gradient: each rank holds its shard's sums, reduced to it as backward "   \
      "finishes each layer (with offload, stage 1 does the same: only the owner's store reads a gradient); with "      \
      "GaLore (1 or 2) each rank keeps and updates its own parameters' projectors and moments; see "                   \
      "docs/multi-gpu.md (one process: the same code path, nothing saved)")                                            \
    X(dist, timeout, FLOAT, "1800", 10, 1e7, "",                                                                       \
      "data parallelism: seconds without a finished step (or checkpoint) before a rank gives up on the others and "    \
      "exits with a message")                                                                                          \
    X(output, dir, STR, "runs/default", 0, 0, "",                                                                      \
      "run folder: resolved config, metrics.jsonl, final model (created; an existing run's files are replaced)")       \
    X(output, save_model, BOOL, "true", 0, 0, "", "write the trained model to output.dir/model at the end")            \
    X(output, save_dtype, ENUM, "auto", 0, 0, "auto|F32|BF16",                                                         \
      "dtype of saved weights; auto: the dtype the model folder declares (F32 for random init)")                       \
    X(memory, budget, STR, "", 0, 0, "",                                                                               \
      "the most the run may hold where it computes (SIZE with its unit: 24GiB, 16G, 900MiB, 4096B; a bare number is "  \
      "refused; auto: the GPU's free memory less 1 GiB): when the configuration needs more, memtune runs the "         \
      "fastest of the settings that keep the same training (activation checkpointing, offloaded activations, "         \
      "smaller micro-batches with more accumulation, AdamW's state in host memory, all of it or for a full "           \
      "fine-tune the share the GPU cannot hold, in quarters: offload.ratio) that fits, and says which; "               \
      "empty: no budget (docs/plan.md)")                                                                               \
    X(memory, host_check, BOOL, "true", 0, 0, "",                                                                      \
      "refuse at start, naming the need and the fixes, a run whose forecast host memory (memtune plan's; all of it "   \
      "on the CPU backend, times the ranks on this host) is more than the host's MemAvailable; false: run it anyway")

// train.seq_len: max, until the budget resolves it (mt_forecast_seq_len_max)
#define MT_SEQ_LEN_MAX 0L

#define MT_CFG_CTYPE_INT long
#define MT_CFG_CTYPE_FLOAT double
#define MT_CFG_CTYPE_BOOL int
#define MT_CFG_CTYPE_STR char *
#define MT_CFG_CTYPE_ENUM char *

typedef struct {
#define MT_X_FIELD(sec, key, type, def, lo, hi, choices, help) MT_CFG_CTYPE_##type sec##_##key;
    MT_CONFIG_TABLE(MT_X_FIELD)
#undef MT_X_FIELD
} mt_config;

// Every key at its default.
void mt_config_defaults(mt_config *cfg);
void mt_config_free(mt_config *cfg);
// Reads a YAML file of `section: {key: value}` mappings over cfg. Errors name
// the file and line, and for unknown keys suggest the nearest one.
mt_err mt_config_load_yaml(mt_config *cfg, const char *path);
// Applies "section.key=value" (from --set); `origin` names it in errors.
mt_err mt_config_set_assignment(mt_config *cfg, const char *assignment, const char *origin);
// Sets one key from its text value.
mt_err mt_config_set(mt_config *cfg, const char *dotted_key, const char *value, const char *origin);
// Checks what single keys cannot: required keys, combinations.
mt_err mt_config_validate(const mt_config *cfg);
// The resolved configuration as YAML.
void mt_config_write_yaml(const mt_config *cfg, FILE *f);
// 64-bit FNV-1a over the keys that change what training computes: not logging,
// eval, output, checkpoint cadence, the device, train.resume or
// train.stop_after. A resumed run must match its checkpoint's.
unsigned long long mt_config_training_hash(const mt_config *cfg);
// The same over every key (the ranks of a data-parallel run must agree on all).
unsigned long long mt_config_hash(const mt_config *cfg);
// Reference of every key: markdown (docs/configs.md) or plain text (--help).
void mt_config_write_reference(FILE *f, int markdown);

#ifdef __cplusplus
}
#endif
#endif
