// trainer/model.h: the LLaMA-family decoder (Llama, Mistral, Qwen2 layouts):
// its configuration, its parameter table (Hugging Face names, one contiguous
// block), and forward/backward over the backend's ops with optional
// per-layer activation checkpointing. The loss is cross-entropy computed in
// row chunks, so B x T x V logits never exist at once.
#ifndef MT_MODEL_H
#define MT_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/common.h"
#include "kernels/device.h"
#include "kernels/dtype.h"
#include "kernels/ops.h"
#include "trainer/params.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mt_model mt_model;

// Streamed gradients: called in backward once parameter `param` (an index
// into the parameter table) has its whole gradient for this step, grad (fp32,
// where the backend computes, param's count values). The buffer is reused
// after the call returns: the callback applies its update there and then.
typedef void (*mt_grad_ready_fn)(void *ctx, int param, float *grad);

// Called in every forward before it first reads the weights of `bucket`:
// 0 the embedding, 1 + l layer l, L + 1 the final norm and lm_head (a tied
// lm_head is the embedding, read already). Offloaded updates land here.
typedef void (*mt_weights_needed_fn)(void *ctx, int bucket);

// Called in every backward when the gradients of `bucket` (the numbering
// above) are complete for this batch, in backward's order: the head, each
// layer from the last, the embedding. Data parallelism reduces them here,
// beside the rest of backward. With grad_ready too, the streamed buffers are
// two, one layer's each, used in turn: before the call returns, the
// communication of the bucket before must be waited for (its buffer is
// the next to be filled).
typedef void (*mt_grads_done_fn)(void *ctx, int bucket);

typedef struct {
    int B, T;                             // rows per batch, tokens per row
    int activation_checkpointing;         // keep layer inputs only; recompute in backward
    mt_lora_config lora;                  // lora.r > 0: adapters trained, the base frozen
    int quantize_nf4;                     // QLoRA: the base's linear weights in NF4 (needs lora.r > 0)
    int offload_activations;              // with checkpointing: layer inputs kept in (pinned) host memory
    int gpu_layer_inputs;                 // with offload_activations: the first n layer inputs stay on the backend
    int ssd_layer_inputs;                 // with offload_activations and activations_dir: the last n offloaded
                                          // layer inputs in a file there, mapped (mt_alloc_file), not in pinned
                                          // host memory (model.ssd_layer_inputs)
    const char *activations_dir;          // the folder of that file (offload.path), or NULL
    int forward_only;                     // inference memory: no gradients, no backward buffers, one
                                          // layer's activations (MeZO, evaluation)
    mt_grad_ready_fn grad_ready;          // full fine-tune: no model-sized gradient block; each
    void *grad_ready_ctx;                 // gradient is handed over as soon as it is complete (GaLore)
    mt_weights_needed_fn weights_needed;  // NULL, or the hook above (offloaded optimizer)
    void *weights_needed_ctx;
    mt_grads_done_fn grads_done;  // NULL, or the hook above (data parallelism)
    void *grads_done_ctx;
    int document_mask;               // rows hold packed documents: mt_model_set_positions gives each token's
                                     // position in its document, and attention stays inside the document
    int decode_len;                  // decoding (with forward_only and T 1): each of the B rows is a sequence
                                     // with a key/value cache of decode_len positions (mt_model_decode)
    int stream_weights;              // a frozen base (LoRA, QLoRA) or a forward-only model: the base's layers live in
                                     // host memory and each is copied into one of two slots on the backend before it
                                     // runs, the next beside the compute (the embedding, norm and lm_head stay)
    const char *weights_dir;         // with stream_weights: NULL, the base in host memory; a folder: in a file there,
                                     // mapped (mem.h mt_alloc_file; model.weights: ssd)
    int resident_layers;             // with stream_weights (a frozen base or a forward-only model): the first n layers
                                     // keep a slot of their own on the backend, filled once; only the others cross
    int mlp_tile_rows;               // > 0 and below B*T: the MLP runs over tiles of this many rows (tokens), its
                                     // (rows, intermediate) buffers sized by the tile; backward recomputes each
                                     // tile's gate and up from the kept norm output (0: the whole batch at once)
    int attention_nondeterministic;  // the GPU's attention backward may sum in any order (ops.h's
                                     // mt_attention_shape.nondeterministic; model.deterministic_attention false)
} mt_model_options;

// Builds the parameter tables and allocates weights, gradients (of the
// adapters only, with LoRA) and the activations on the backend.
mt_err mt_model_create_with(mt_model **out, mt_backend *be, const mt_model_config *cfg, const mt_model_options *opts);
// A full fine-tune: every parameter trainable.
// What mt_model_create_with allocates for (cfg, o) on a GPU (gpu) or the
// host, by category, counted from the same tables and layout without
// allocating (memtune plan). perturbation: MeZO's scratch (forward_only),
// for the trained tensors `perturbed` selects (NULL: all). device: the GPU
// whose cuDNN gives the attention workspace of a GPU forecast (ops.h's
// mt_attention_planned_workspace_bytes; -1: memtune's own kernel's);
// *attention_cudnn (when not NULL) says whether cuDNN's was counted.
typedef struct {
    size_t weights, adapters, grads, activations, workspace, perturbation;
    size_t staging;           // transient: the fp32 staging of weight uploads (GPU)
    size_t offload_host;      // pinned host memory of offloaded layer inputs
    size_t offload_disk;      // the last ssd_layer_inputs of them, in a file
    size_t weights_host;      // the host store of streamed weights (pinned on a GPU)
    size_t weights_streamed;  // of the store, the bytes copied to the backend each pass (the layers not resident)
} mt_model_bytes;
void mt_model_plan_bytes(int gpu, int device, const mt_model_config *cfg, const mt_model_options *o,
                         const unsigned char *perturbed, mt_model_bytes *b, int *attention_cudnn);

mt_err mt_model_create(mt_model **out, mt_backend *be, const mt_model_config *cfg, int B, int T,
                       int activation_checkpointing);
void mt_model_free(mt_model *m);

// What the optimizer trains, as one block: every base parameter (full
// fine-tune) or the adapters (LoRA, in PEFT's names and order).
typedef struct {
    const mt_param_info *params;
    int count;
    size_t total;   // elements, with alignment padding
    void *weights;  // compute copy (fp32 on the CPU, bf16 on the GPU)
    float *grads;   // fp32
} mt_trainable;
void mt_model_trainable(mt_model *m, mt_trainable *out);
// Sets the adapters' compute weights from fp32 host values (LoRA only).
void mt_model_set_adapters(mt_model *m, const float *host_params);
// Seed of the adapters' dropout masks for the next training step; each
// layer and module draws from its own stream of it.
void mt_model_set_dropout_seed(mt_model *m, uint64_t seed);
// Bytes that hold the base weights on the backend (NF4 storage included).
size_t mt_model_base_weight_bytes(const mt_model *m);
// The streamed base's layers that keep a slot of their own (resident_layers,
// at most L; 0 without streaming).
int mt_model_resident_layers(const mt_model *m);
// Which attention runs (cuDNN's, memtune's kernel, the CPU reference) and the
// sliding window when one binds, for the start-up line.
void mt_model_describe_attention(mt_model *m, char *buf, size_t len);

// MeZO (Malladi et al., 2023): the forward reads every selected trainable
// parameter w as w + scale * z(seed, offset + j), offset being its place in
// the trainable block (ops.h's z stream). The stored weights never change;
// each perturbed tensor is generated into a scratch buffer when a matmul or
// norm reads it (the embedding's gathered rows are perturbed in place), so
// +eps / -eps / restore cost no rounding. selected: one flag per trainable
// parameter (mt_model_trainable's order), NULL for all; it allocates that
// scratch (workspace: the widest selected matrix and vector).
mt_err mt_model_enable_perturbation(mt_model *m, const unsigned char *selected);
// The perturbation of the following forward passes; scale 0 turns it off.
void mt_model_set_perturbation(mt_model *m, uint64_t seed, float scale);
// MeZO's two passes over one batch at once: the sums of token losses under
// the perturbations +scale and -scale of seed, layer by layer, so each
// layer's weights are read once (and, streamed, copied to the GPU once) for
// both. The same values as two mt_model_step calls; the perturbation is off
// afterwards.
void mt_model_forward_pair(mt_model *m, const int32_t *inputs, const int32_t *targets, uint64_t seed, float scale,
                           double *plus, double *minus);
// MeZO's update w -= lr (sum_k coef_k z_k + decay w) of the selected
// parameters (weight_decay where the table marks decay), not applied now but
// where the next perturbed forward reads each tensor: the update and that
// read's perturbation share one pass over the weights (the same values as
// separate passes). Anything else that reads the weights (an unperturbed
// forward, mt_model_get_trainable, a new deferral) applies what is left.
void mt_model_defer_update(mt_model *m, const mt_zo_directions *d, float lr, float weight_decay, uint64_t round_seed);
// Applies a deferred update now (nothing if none is pending).
void mt_model_flush_update(mt_model *m);
// Bytes of the perturbation scratch.
size_t mt_model_perturbation_bytes(const mt_model *m);
// Perturbation passes over layer tensors that mt_model_forward_pair has
// spared so far: where the scratch has room past the widest layer matrix
// (the lm_head's is wider), the + pass's kernel of a layer's tensor also
// writes its - perturbation there, from the same draw of z, and the - pass
// reads it (the same values), for as many of the layer's tensors, in the
// order it reads them, as the room holds. The environment's MT_MEZO_MIRROR=0
// turns this off.
size_t mt_model_mirror_saved(const mt_model *m);
// The trainable block's compute weights as fp32 host values (total floats).
void mt_model_get_trainable(mt_model *m, float *dst);
// Values [offset, offset + count) of them into dst (not with streamed weights).
mt_err mt_model_get_trainable_range(mt_model *m, size_t offset, size_t count, float *dst);

const mt_model_config *mt_model_get_config(const mt_model *m);
const mt_param_info *mt_model_params(const mt_model *m, int *count);
size_t mt_model_num_params(const mt_model *m);
// The base's compute weights (fp32 host on the CPU, bf16 device on the GPU;
// NULL-free only without NF4) and its fp32 gradient block (NULL with LoRA),
// both in the parameter table's order.
void *mt_model_weights(mt_model *m);
float *mt_model_grads(mt_model *m);

// Random initialisation as transformers does it: normal(0, init_std) for
// matrices and embeddings, ones for norms, zeros for biases.
void mt_model_init_random(const mt_model_config *cfg, float *params, uint64_t seed);
// The same values of parameters first .. first + count - 1 only, into dst
// (dst[0] is parameter first's; padding between them is left as it is).
void mt_model_init_random_params(const mt_model_config *cfg, int first, int count, float *dst, uint64_t seed);

// Sets the base weights from fp32 host values (cast to bf16 on the GPU, or
// quantized to NF4).
mt_err mt_model_set_weights(mt_model *m, const float *host_params);
// Sets parameters first .. first + count - 1 of the table from their fp32
// host values (values[0] is parameter first's; the table's layout from there):
// a base can be set a layer at a time, never whole on the host.
mt_err mt_model_set_params(mt_model *m, int first, int count, const float *values);
void mt_model_zero_grads(mt_model *m);

// With document_mask: pos (B*T, host) is each input token's position in its
// document, 0 where one starts (mt_loader_positions); RoPE takes it and
// attention sees only the keys of the query's own document, for the
// following steps. NULL: every row is one document (positions 0..T-1).
void mt_model_set_positions(mt_model *m, const int32_t *pos);

// Forward over one (B, T) batch; with `backward`, also backward, adding
// dscale * d(sum of token losses) to the gradients. targets < 0 are ignored.
// Returns the sum of token losses. With grad_ready, backward hands over each
// gradient in this order: lm_head (when not tied), the final norm, each
// layer's parameters from the last layer to the first, the embedding; a
// non-finite loss skips the backward (nothing is handed over).
double mt_model_step(mt_model *m, const int32_t *inputs, const int32_t *targets, float dscale, int backward);
// Whether the last mt_model_step skipped its backward (streamed gradients and
// a non-finite loss, on this or, with the agreement, any rank).
int mt_model_backward_skipped(const mt_model *m);
// Bytes of the gradient buffers with grad_ready: one layer's parameters or
// one embedding-sized matrix, whichever is larger (two such with grads_done,
// used in turn), plus the final norm's and a tied embedding's.
size_t mt_model_streamed_grad_bytes(const mt_model *m);
// The streamed weights' timeline (model.weights cpu or ssd; offload.trace_step
// starts it): from mt_model_trace_begin on, each layer's compute (from its
// weights' arrival in their slot to the next layer's) and each copy of a
// layer's weights in, or (MeZO) its update back out, timed by events on the
// device (on the CPU backend by the host clock), labelled with the step
// mt_model_trace_step gives; mt_model_trace_write puts it in a Chrome trace
// file (chrome://tracing, ui.perfetto.dev; path NULL: nowhere) and stops.
// Without streamed weights they do nothing.
void mt_model_trace_begin(mt_model *m);
void mt_model_trace_step(mt_model *m, int step);
int mt_model_tracing(const mt_model *m);  // whether a timeline is being taken
mt_err mt_model_trace_write(mt_model *m, const char *path);
// Data parallelism with streamed gradients: any(ctx, flag) returns whether
// any rank set flag; backward is skipped on every rank when one rank's loss
// is not finite (else some ranks would wait in a collective for the others).
typedef int (*mt_agree_fn)(void *ctx, int flag);
void mt_model_set_agreement(mt_model *m, mt_agree_fn any, void *ctx);
// RoPE's tables for `positions` positions (positions x D/2 each, fp32) as
// transformers computes them: linear, llama3 and longrope scaling included
// (longrope takes its long factors when positions exceeds
// original_max_position_embeddings, as transformers does for a sequence that
// long, and scales cos and sin by its attention factor). local: Gemma's
// sliding layers' (rope_local_theta, no scaling).
void mt_model_rope_tables(const mt_model_config *c, int local, int positions, float *cos_table, float *sin_table);
// Full logits (B*T, V) fp32 into host memory `logits` (for tests and parity).
void mt_model_logits(mt_model *m, const int32_t *inputs, float *logits);
// Decoding: row b's token tokens[b] at position pos[b] (0 <= pos < decode_len)
// goes through the model, its keys and values into row b's cache at pos[b],
// attending to its cached positions up to pos[b]; logits (B, V) fp32 into
// host memory. Rows are independent: each may be at its own position, and a
// row restarted at 0 begins a new sequence.
void mt_model_decode(mt_model *m, const int32_t *tokens, const int32_t *pos, float *logits);
// Decoding: the cache's positions and the rows (B) decoded together.
int mt_model_decode_len(const mt_model *m);
int mt_model_decode_rows(const mt_model *m);
// Decoding on a GPU: NULL once a step replays as one CUDA Graph, else why it
// does not (set by the first mt_model_decode).
const char *mt_model_decode_graph(const mt_model *m);
// Bytes of the key/value caches of (cfg, B, decode_len) in the backend's
// compute type.
size_t mt_model_kv_cache_bytes(int gpu, const mt_model_config *cfg, int B, int decode_len);

#ifdef __cplusplus
}
#endif
#endif
