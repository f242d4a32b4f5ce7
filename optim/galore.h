// optim/galore.h: GaLore (Zhao et al., "GaLore: Memory-Efficient LLM Training
// by Gradient Low-Rank Projection", 2024). Each selected matrix W (m, n)
// keeps Adam's moments for its gradient projected to rank r on the smaller
// side, R = P^T G (m <= n) or G P (m > n), with P (min(m, n), r)
// orthonormal: the top-r singular subspace of the gradient, recomputed every
// update_gap steps. The update is Adam's direction of R brought back to W's
// shape, times scale; every other parameter takes plain AdamW. There is no
// fp32 master copy: on the GPU the bf16 weights are updated with stochastic
// rounding (ops.h: mt_op_apply_update).
//
// Updates are per parameter, as soon as its gradient is complete (the
// model's grad_ready callback), so no model-sized gradient block exists; the
// global gradient norm is only known after the last update, which rules out
// clipping by it.
#ifndef MT_GALORE_H
#define MT_GALORE_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/common.h"
#include "kernels/device.h"
#include "optim/optimizer.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { MT_GALORE_RANDOMIZED, MT_GALORE_SVD } mt_galore_refresh;

typedef struct {
    float beta1, beta2, eps, weight_decay;
    int rank;        // r (capped at min(m, n) per matrix)
    int update_gap;  // steps between projector refreshes (the first step makes them)
    float scale;     // of the projected matrices' updates
    mt_galore_refresh refresh;
    int int8;       // 8-bit blockwise moments (ops.h mt_adam_state), projected and plain
    uint64_t seed;  // the randomized refresh's test matrices and the rounding
} mt_galore_config;

typedef struct mt_galore mt_galore;

// One parameter as GaLore sees it (the model's table order).
typedef struct {
    const char *name;
    int64_t rows, cols;  // cols 0: a vector
    int decay;           // weight decay applies
    int project;         // a matrix to project (else plain AdamW)
    int external;        // not projected and updated elsewhere (offload.h): no state here, never handed over
    int elsewhere;       // another rank's (ZeRO): no state here, never handed over, projected or not
} mt_galore_param;

// What mt_galore_init allocates for one parameter of rows x cols (cols 0:
// a vector), projected or not: its state's bytes (moments, and the
// projector) and the scratch floats it needs (X, or the refresh's; the
// optimizer keeps the largest over its parameters). memtune plan counts with it.
void mt_galore_param_bytes(const mt_galore_config *cfg, int64_t rows, int64_t cols, int project, size_t *state,
                           size_t *work_floats);

mt_err mt_galore_init(mt_galore **out, mt_backend *be, const mt_galore_config *cfg, const mt_galore_param *params,
                      int n);
void mt_galore_free(mt_galore *g);

// A step: begin (learning rate; whether projectors are refreshed this step
// follows from the step count), one update per parameter with its gradient
// (fp32, where the backend computes; overwritten) and its compute weights,
// then end (the gradient norm over all parameters, and whether every
// gradient was finite; a non-finite one's update is skipped).
void mt_galore_begin_step(mt_galore *g, float lr);
void mt_galore_update(mt_galore *g, int param, float *grad, void *weights);
void mt_galore_end_step(mt_galore *g, mt_step_info *info);
// Takes back a step begun but given no update (a non-finite loss: the
// model's backward handed nothing over).
void mt_galore_cancel_step(mt_galore *g);
// Whether the step begun last refreshes projectors, and the seconds and
// count of those refreshes once it has ended.
int mt_galore_refreshing(const mt_galore *g);
double mt_galore_last_refresh_seconds(const mt_galore *g, int *matrices);
int mt_galore_steps_taken(const mt_galore *g);
// Bytes of projectors and moments (on the backend).
size_t mt_galore_state_bytes(const mt_galore *g);

// The state for checkpoints, as named host tensors grouped by parameter:
// projected matrices have "projector" (a, r column-major), moments of the
// projected shape, attributes rank and side; all have exp_avg / exp_avg_sq
// (fp32) or their 8-bit codes and block absmax. mt_galore_state lists them
// (host buffers owned by g); _download fills them from the backend,
// _upload sets the backend's state (and the step count) from them.
typedef struct {
    const char *param;  // parameter name
    const char *name;   // "projector", "exp_avg", "exp_avg_q8", ...
    int is_u8;          // uint8 (else fp32)
    size_t count;
    void *data;  // NULL: fp32 values read from source (checkpoints written a chunk at a time)
    const mt_f32_source *source;
} mt_state_tensor;
int mt_galore_state(mt_galore *g, mt_state_tensor **tensors);
void mt_galore_state_download(mt_galore *g);
void mt_galore_state_upload(mt_galore *g, int steps);

// Tests: sets matrix `param`'s projector (a * r floats, host, column-major)
// and counts it as refreshed at the current step.
void mt_galore_set_projector(mt_galore *g, int param, const float *host);
// The shape GaLore uses for parameter `param`: a (the projected side), b,
// r, left (1: R = P^T G); 0 when it is not projected.
int mt_galore_shape(const mt_galore *g, int param, int *a, int *b, int *r, int *left);

#ifdef __cplusplus
}
#endif
#endif
