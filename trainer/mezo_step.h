// trainer/mezo_step.h: one MeZO step of the training loop: the loss of the
// step's micro-batches under each direction's two perturbations (the mean
// over every rank's targets), then optim/mezo's update, which the model
// applies in its next forward.
#ifndef MT_MEZO_STEP_H
#define MT_MEZO_STEP_H

#include <stdint.h>

#include "optim/mezo.h"
#include "optim/optimizer.h"
#include "trainer/dist.h"
#include "trainer/model.h"

#ifdef __cplusplus
extern "C" {
#endif

// The step's data: accum micro-batches of B x T inputs and targets, one
// after another; valid_total, this rank's count of targets; pos, their
// positions in packed documents (NULL without data.document_mask).
typedef struct {
    mt_model *model;
    mt_dist *dist;
    const int32_t *inputs, *targets;
    int accum, B, T;
    long valid_total;
    const int32_t *pos;
} mt_zo_batches;

// *loss: the step's loss (the mean of the pair's); info: the projected
// gradient's RMS and whether the losses were finite.
void mt_mezo_step(mt_mezo *mz, mt_zo_batches *b, int step, float lr, double *loss, mt_step_info *info);

#ifdef __cplusplus
}
#endif
#endif
