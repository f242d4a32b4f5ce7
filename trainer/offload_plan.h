// trainer/offload_plan.h: which of the trained parameters offload's store
// holds and where its state sits, from the parameter table alone (the
// updater builds the store from it; memtune plan counts it).
#ifndef MT_OFFLOAD_PLAN_H
#define MT_OFFLOAD_PLAN_H

#include <stddef.h>

#include "offload/offload.h"
#include "optim/galore.h"
#include "trainer/params.h"

#ifdef __cplusplus
extern "C" {
#endif

// Which trained parameters offload's store holds, and where. Without GaLore
// all of them in [lo, hi) (ZeRO: this rank's shard; parameters cut at its
// ends), each state at its weights' offset less lo; with GaLore those it
// does not project (embeddings, norms, the head), packed one after another. In
// checkpoints the packed ones' moments are named tensors as GaLore names its
// own (fp32 exp_avg, exp_avg_sq), so a GaLore run resumes with offload on or off.
typedef struct {
    mt_offload_param *params;
    int n, packed;
    int *index;    // trained parameter -> its entry in params, or -1
    size_t count;  // state values
} mt_offload_plan;

mt_offload_plan mt_offload_plan_make(const mt_param_info *table, int n, size_t lo, size_t hi,
                                     const unsigned char *projected, int L);
void mt_offload_plan_free(mt_offload_plan *p);
// Packed state arrays <-> the weights' layout.
void mt_offload_plan_scatter(const mt_offload_plan *p, const float *packed, float *weights_layout);
void mt_offload_plan_gather(const mt_offload_plan *p, const float *weights_layout, float *packed);
// The packed parameters' moments as checkpoint tensors, over m and v.
mt_state_tensor *mt_offload_plan_moments(const mt_offload_plan *p, const mt_param_info *table, int n, float *m,
                                         float *v);
// With int8 moments, each parameter's codes and block absmax as the store st
// holds them, as checkpoint tensors named as GaLore names its 8-bit moments
// (exp_avg_q8, exp_avg_sq_q8: uint8; exp_avg_absmax, exp_avg_sq_absmax: one
// fp32 per block of MT_QBLOCK values from the parameter's first), pointing
// into st's arrays, 4 a parameter from index `at` of a tensors array that
// holds at + 4 p->n; 0 (nothing written) where the moments are fp32 or a
// parameter's values are not a quantization segment of their own.
int mt_offload_plan_codes(const mt_offload_plan *p, const mt_param_info *table, int n, const mt_store *st,
                          mt_state_tensor *tensors, int at);

#ifdef __cplusplus
}
#endif
#endif
