// trainer/eval.h: the loss of a model over held-out batches, as the mean
// over their counted targets (the loss mask's), every target weighing the
// same.
#ifndef MT_EVAL_H
#define MT_EVAL_H

#include "datasets/dataset.h"
#include "trainer/model.h"

#ifdef __cplusplus
extern "C" {
#endif

// The first `batches` batches of `loader` (B x T, as the model was built),
// from its start each time; *loss NAN when no target counts. *targets (when
// not NULL): how many counted.
mt_err mt_eval_loss(mt_model *model, mt_loader *loader, int batches, int B, int T, double *loss, long *targets);

#ifdef __cplusplus
}
#endif
#endif
