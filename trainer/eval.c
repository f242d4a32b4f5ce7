// trainer/eval.c: see eval.h.
#include "trainer/eval.h"

#include <math.h>
#include <stdlib.h>

mt_err mt_eval_loss(mt_model *model, mt_loader *loader, int batches, int B, int T, double *loss, long *targets) {
    mt_loader_set_cursor(loader, (mt_cursor){0, 0});  // the same batches every time
    int32_t *inputs = malloc((size_t)B * T * 4), *tgt = malloc((size_t)B * T * 4);
    MT_CHECK(inputs && tgt, "eval batch");
    double sum = 0.0;
    long count = 0;
    mt_err err = MT_OK;
    for (int i = 0; i < batches && !err; i++) {
        int valid;
        if ((err = mt_loader_next(loader, inputs, tgt, &valid))) break;
        sum += mt_model_step(model, inputs, tgt, 0.0f, 0);
        count += valid;
    }
    free(inputs);
    free(tgt);
    *loss = count ? sum / (double)count : NAN;
    if (targets) *targets = count;
    return err;
}
