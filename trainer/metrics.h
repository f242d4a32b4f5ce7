// trainer/metrics.h: what a run reports as it goes: the progress line on
// stderr, metrics.jsonl (one record per logged step), and at the end
// loss.svg, the loss curve. A resumed run continues metrics.jsonl from its
// checkpoint's step. Only the process that writes (rank 0) prints and writes;
// every rank keeps the curve and the throughput.
#ifndef MT_METRICS_H
#define MT_METRICS_H

#include <stddef.h>

#include "kernels/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mt_metrics mt_metrics;

typedef struct {
    const char *dir;   // output.dir: metrics.jsonl and loss.svg go there
    int write;         // this process prints and writes (rank 0)
    long steps;        // train.steps
    long first_step;   // the step this run starts from (> 0: resumed)
    long log_every;    // train.log_every
    long eval_every;   // train.eval_every (0: at the end only)
    int zeroth_order;  // MeZO: the gradient column is the projected gradient's rms
} mt_metrics_config;

// Opens (rank 0: creates, or trims and appends to) metrics.jsonl. An error
// names the file; nothing is written then.
mt_err mt_metrics_open(mt_metrics **out, const mt_metrics_config *c);

// What one step did. eval_loss and refresh_seconds are NAN when there was
// none; peak_bytes is the allocator's peak so far.
typedef struct {
    int step;  // 0-based
    double loss, eval_loss;
    float lr;
    double grad;  // the gradient's norm (MeZO: the projected gradient's rms)
    long tokens;  // trained this step, every rank's
    double refresh_seconds;
    size_t peak_bytes;
} mt_step_record;

// Adds the step to the curve; on a logged step (every log_every, the last,
// and where there is an eval loss) prints the progress line and writes a
// record. Returns the tokens/s since the last logged step when it logged,
// NAN otherwise.
double mt_metrics_step(mt_metrics *m, const mt_step_record *r);
// Closes metrics.jsonl and writes loss.svg of the steps done (rank 0).
void mt_metrics_close(mt_metrics *m, int steps_done);
// A sample of the model's text after step: printed, and a record
// {"step", "sample_prompt", "sample"} in metrics.jsonl.
void mt_metrics_sample(mt_metrics *m, int step, const char *prompt, const char *text);

#ifdef __cplusplus
}
#endif
#endif
