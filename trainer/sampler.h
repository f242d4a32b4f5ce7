// trainer/sampler.h: train.sample_every: the model's text for a few prompts
// while it trains (greedy, trainer/generate.h: on a GPU run by a decoding
// copy of the model in bf16, made for the samples and freed after them; on
// the CPU from an fp32 host copy of the values on a CPU run, or when the GPU
// has no room for the copy), printed and recorded in metrics.jsonl.
#ifndef MT_SAMPLER_H
#define MT_SAMPLER_H

#include "trainer/config.h"
#include "trainer/metrics.h"
#include "trainer/params.h"
#include "trainer/state.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mt_sampler mt_sampler;

// The model folder's tokenizer (or memtune's bytes for a 258-token model)
// and the prompts; refuses a configuration it cannot sample, before training.
mt_err mt_sampler_open(mt_sampler **out, const mt_config *cfg, const mt_model_config *mc);
// One greedy sample a prompt from the model's values (fp32, the parameter
// table's layout) after `step`, with a LoRA adapter's values (lora's table
// layout) applied on the fly when lora is not NULL.
mt_err mt_sampler_run(mt_sampler *s, const float *params, const mt_lora_config *lora, const float *adapters, int step,
                      mt_metrics *metrics);
// After `step` (0: before training), when it is one to sample (s NULL: none):
// the run's values on the host (every rank calls: reading them back may be
// collective), then rank 0's samples. A LoRA adapter is applied on the fly
// over the base, which rank 0 reads once (as loaded, random_init: as
// initialised; QLoRA: its NF4 round trip).
mt_err mt_sampler_after_step(mt_sampler *s, mt_run_state *state, int rank, int random_init, int step,
                             mt_metrics *metrics);
void mt_sampler_free(mt_sampler *s);

#ifdef __cplusplus
}
#endif
#endif
