// trainer/eval.h: the loss of a model over held-out batches, as the mean
// over their counted targets (the loss mask's), every target weighing the
// same; and `memtune eval`: a saved model (with a LoRA adapter applied on
// the fly, or not) over a whole dataset.
#ifndef MT_EVAL_H
#define MT_EVAL_H

#include "datasets/dataset.h"
#include "kernels/common.h"
#include "trainer/model.h"

#ifdef __cplusplus
extern "C" {
#endif

// The first `batches` batches of `loader` (B x T, as the model was built),
// from its start each time; *loss NAN when no target counts. *targets (when
// not NULL): how many counted.
mt_err mt_eval_loss(mt_model *model, mt_loader *loader, int batches, int B, int T, double *loss, long *targets);

typedef struct {
    const char *model;        // a Hugging Face model folder
    const char *adapter;      // a PEFT LoRA adapter folder, or NULL
    const char *data;         // a dataset file (memtune tokenize)
    const char *device;       // auto, cpu, gpu
    int seq_len;              // 0: the file's window, else 1024
    int batch;                // rows a batch (4)
    long max_batches;         // 0: every whole batch of the file
    int progress;             // a progress line on stderr
    int document_mask;        // documents attend only within themselves (data.document_mask)
    int quantize_nf4;         // the base's linear weights in NF4, as QLoRA trained them (needs adapter)
    int stream_weights;       // the base in host memory, a layer at a time on the backend (model.weights: cpu)
    const char *weights_dir;  // with stream_weights: NULL, or the folder of the base's file (model.weights: ssd)
    int resident_layers;      // with stream_weights: the first n layers stay on the backend (model.resident_layers)
} mt_eval_options;

typedef struct {
    double loss, perplexity;
    long targets;
    long windows, windows_total;  // evaluated, and in the file (the last partial batch is left out)
    int seq_len;
    double seconds;
    char device[256];
} mt_eval_result;

void mt_eval_defaults(mt_eval_options *o);
mt_err mt_eval_run(const mt_eval_options *o, mt_eval_result *r);

#ifdef __cplusplus
}
#endif
#endif
