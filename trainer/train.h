// trainer/train.h: the training run: validates everything before the first
// GPU allocation, builds model, data and optimizer, runs the steps with
// progress output, metrics and eval, and saves the result.
#ifndef MT_TRAIN_H
#define MT_TRAIN_H

#include "kernels/common.h"
#include "trainer/config.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int steps_done;
    double first_loss, last_loss, last_eval_loss;  // eval NAN when none ran
    double tokens_per_second;
    int stopped_early;  // by a signal or train.stop_after, with a checkpoint
    int rank;           // data parallelism: this process's (0 speaks for the run)
} mt_train_result;

mt_err mt_train(const mt_config *cfg, mt_train_result *result);

#ifdef __cplusplus
}
#endif
#endif
