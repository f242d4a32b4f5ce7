// trainer/generate.h: `memtune generate`: text from a model folder (with a
// LoRA adapter applied on the fly or merged, over a base that may be QLoRA's
// NF4 round trip), one token at a time with a
// key/value cache: on the CPU in fp32 through the reference ops' arithmetic
// (mt_generator), or batched on a backend through the model's decoding mode
// (mt_generate_batch); greedy or sampled (temperature, top-k, top-p, min-p,
// repetition penalty, seed), stopping at the tokenizer's EOS, the chat
// template's end of turn or a stop string.
#ifndef MT_GENERATE_H
#define MT_GENERATE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "datasets/hf_tokenizer.h"
#include "kernels/common.h"
#include "trainer/model.h"
#include "trainer/params.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mt_generator mt_generator;

// The model's values (fp32, mt_model_param_table's layout; the generator
// keeps the pointer) and a cache for max_len positions.
mt_err mt_generator_init(mt_generator **out, const mt_model_config *cfg, const float *params, int max_len);
void mt_generator_free(mt_generator *g);
// A LoRA adapter applied on the fly: after each adapted module's product,
// y += scale * B (A x) (no dropout), the base values untouched. values:
// lora's table layout (mt_lora_read_folder), kept by pointer.
void mt_generator_set_adapter(mt_generator *g, const mt_lora_config *lora, const float *values);
// QLoRA's base as training saw it: every layer's linear weights (the seven
// modules LoRA can adapt) replaced in place by their NF4 round trip
// (bitsandbytes' format with double quantization, kernels/nf4.h).
mt_err mt_generate_quantize_nf4(const mt_model_config *cfg, float *params);
// Forgets the cached positions.
void mt_generator_reset(mt_generator *g);
// Feeds one token at the next position; logits (V) of what follows (may be
// NULL for prompt tokens but the last). Fails past max_len.
mt_err mt_generator_step(mt_generator *g, int32_t token, float *logits);
int mt_generator_position(const mt_generator *g);

typedef struct {
    float temperature;         // 0: greedy
    int top_k;                 // 0: all
    float top_p, min_p;        // 1, 0: off
    float repetition_penalty;  // 1: off (transformers' rule: divide positive logits, multiply negative)
    uint64_t seed;
} mt_sampling;

// Picks the next token from logits (changed in place) given the ids so far
// (for the repetition penalty); draw: the sample's index (a new uniform per
// draw from seed).
int32_t mt_sample(float *logits, int V, const mt_sampling *s, const uint32_t *history, size_t n_history, uint64_t draw);

typedef struct {
    mt_sampling sampling;
    int max_new;           // new tokens at most
    int eos, eot;          // ids that end the text (-1: none)
    const char *stops[8];  // texts that end it (left out of it)
    int n_stops;
} mt_generate_options;

// BOS (the tokenizer's when it has one; tok NULL: memtune's bytes) and the
// ids of text.
void mt_generate_prompt(const mt_tokenizer *tok, const char *text, mt_ids *ids);
// From the start of the cache: the prompt, then new tokens until an end id,
// a stop text or max_new; *text (malloc'd) their text, streamed to `stream`
// as it grows (NULL: quiet; text that may still turn into a stop waits).
mt_err mt_generate_text(mt_generator *g, const mt_tokenizer *tok, const mt_ids *prompt, const mt_generate_options *o,
                        FILE *stream, char **text);

// Called with each completion, in the prompts' order, as soon as it and the
// ones before it are final (the text stays the caller's only during the call).
typedef void (*mt_generated_fn)(void *ctx, int index, const char *text);
// Batched decoding on a backend (a model created with decode_len, weights
// and adapters set; on a GPU in bf16): its B rows' sequences at once, each row
// taking the next prompt as soon as its sequence ends, prompt tokens fed one
// step at a time beside other rows' new ones. A single prompt (n 1) streams
// to `stream`. Stops at the first sequence that outgrows the cache (the
// completions before it were handed over).
// stats (may be NULL): how many tokens the completions hold, and the steps
// and the wall time spent in them (mt_model_decode: the model and the
// logits' copy to the host; the rest is sampling and text).
typedef struct {
    long new_tokens;
    long steps;
    double step_seconds;
} mt_generate_stats;
mt_err mt_generate_batch(mt_model *m, const mt_tokenizer *tok, const mt_ids *prompts, int n,
                         const mt_generate_options *o, FILE *stream, mt_generated_fn ready, void *ctx,
                         mt_generate_stats *stats);

#ifdef __cplusplus
}
#endif
#endif
