// kernels/attention_cudnn_none.c: attention_cudnn.h in a build without cuDNN
// (CMake found no cuDNN library, cudnn.h or frontend headers): the backend
// runs memtune's own attention kernel, and the start-up line says why.
#include <stdio.h>

#include "kernels/attention_cudnn.h"
#include "kernels/common.h"

mt_cudnn *mt_cudnn_init(char *why, size_t len) {
    snprintf(why, len, "memtune was built without cuDNN; see docs/development.md");
    return NULL;
}

void mt_cudnn_free(mt_cudnn *c) { (void)c; }

const char *mt_cudnn_describe(const mt_cudnn *c) {
    (void)c;
    return "no cuDNN";
}

int mt_cudnn_attention_prepare(mt_cudnn *c, const mt_attention_shape *s, size_t *workspace) {
    (void)c, (void)s;
    if (workspace) *workspace = 0;
    return 0;
}

void mt_cudnn_attention_forward(mt_cudnn *c, const mt_attention_shape *s, void *out, float *lse, const void *q,
                                const void *k, const void *v, void *workspace, void *stream) {
    (void)c, (void)out, (void)lse, (void)q, (void)k, (void)v, (void)workspace, (void)stream;
    MT_CHECK(0, "cuDNN attention B=%d T=%d called in a build without cuDNN", s->B, s->T);
}

void mt_cudnn_attention_backward(mt_cudnn *c, const mt_attention_shape *s, void *dq, void *dk, void *dv,
                                 const void *dout, const void *q, const void *k, const void *v, const void *out,
                                 const float *lse, void *workspace, void *stream) {
    (void)c, (void)dq, (void)dk, (void)dv, (void)dout, (void)q, (void)k, (void)v, (void)out, (void)lse;
    (void)workspace, (void)stream;
    MT_CHECK(0, "cuDNN attention B=%d T=%d called in a build without cuDNN", s->B, s->T);
}
