// kernels/attention_cudnn.h: cuDNN's fused scaled-dot-product attention
// (forward and backward, bf16, causal, grouped-query heads without repeating
// K/V, optional sliding window, deterministic backward unless the shape asks
// otherwise) behind a C API. The
// graphs are built through the cuDNN frontend (C++, kernels/attention_cudnn.cpp)
// once per shape and kept in the handle, which the backend owns.
//
// Layouts are those of the attention op (ops.h): q (B, H, T, D), k/v
// (B, KV, T, D), out and dout (B, T, H, D), lse (B, H, T) the natural-log
// log-sum-exp of each row's scaled scores; cuDNN reads and writes them in
// place through strides, so nothing is copied or transposed.
//
// A build without cuDNN compiles kernels/attention_cudnn_none.c instead, whose
// init says so; callers need no #ifdefs.
#ifndef MT_ATTENTION_CUDNN_H
#define MT_ATTENTION_CUDNN_H

#include <stddef.h>

#include "kernels/ops.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mt_cudnn mt_cudnn;

// Creates cuDNN's handle on the current device. NULL when cuDNN cannot serve
// (not built in, library missing or too old): `why` then says which.
mt_cudnn *mt_cudnn_init(char *why, size_t len);
void mt_cudnn_free(mt_cudnn *c);
// "cuDNN 9.19.0" (the library loaded, not the headers built against).
const char *mt_cudnn_describe(const mt_cudnn *c);

// Builds (once) the forward and backward graphs of this shape; 1 when cuDNN
// serves both, with the larger workspace either needs in *workspace, 0 when
// it does not (memtune's own kernel then runs; the reason is logged once).
int mt_cudnn_attention_prepare(mt_cudnn *c, const mt_attention_shape *s, size_t *workspace);
// Both run on `stream` (NULL: the legacy default stream the ops use) after a
// successful prepare of the same shape; workspace holds at least what prepare
// returned.
void mt_cudnn_attention_forward(mt_cudnn *c, const mt_attention_shape *s, void *out, float *lse, const void *q,
                                const void *k, const void *v, void *workspace, void *stream);
void mt_cudnn_attention_backward(mt_cudnn *c, const mt_attention_shape *s, void *dq, void *dk, void *dv,
                                 const void *dout, const void *q, const void *k, const void *v, const void *out,
                                 const float *lse, void *workspace, void *stream);

#ifdef __cplusplus
}
#endif
#endif
