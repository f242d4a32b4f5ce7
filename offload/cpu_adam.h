// offload/cpu_adam.h: AdamW on the CPU over fp32 master weights and moments
// in host memory (ZeRO-Offload's CPU step, Ren et al., 2021). The same update
// as the reference (kernels/ops_ref.c mt_adamw_ref), element for element and
// bit for bit: the vector paths do the reference's multiplies, adds, square
// roots and divisions in its order (no fused multiply-add, which would round
// differently), so any path may serve any run. Gradients come in fp32 (the
// CPU backend) or bf16 (what the GPU streams over); the updated weights can
// also be written as bf16 (round to nearest even), ready to copy back.
#ifndef MT_CPU_ADAM_H
#define MT_CPU_ADAM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// The instruction-set paths; the best one the processor has is picked at run
// time (mt_cpu_adam_best_path), the others stay callable for tests.
typedef enum { MT_CPU_ADAM_SCALAR = 0, MT_CPU_ADAM_AVX2, MT_CPU_ADAM_AVX512, MT_CPU_ADAM_NPATHS } mt_cpu_adam_path;

const char *mt_cpu_adam_path_name(mt_cpu_adam_path path);
// Whether this processor (and this build) can run the path.
int mt_cpu_adam_path_available(mt_cpu_adam_path path);
mt_cpu_adam_path mt_cpu_adam_best_path(void);

// Everything that is the same for every element of one step, computed once:
// the bias corrections enter as step_size = lr / (1 - beta1^t) and
// sqrt(1 - beta2^t), exactly as optim/optimizer.c computes them.
typedef struct {
    float beta1, beta2, eps;
    float step_size;   // lr / (1 - beta1^t)
    float bc2_sqrt;    // sqrt(1 - beta2^t)
    float decay;       // 1 - lr * weight_decay; 1 for parameters without decay
    float grad_scale;  // the clipping factor (1: no clipping)
} mt_cpu_adam_step;

// step: the optimizer step count after this update (1 for the first).
void mt_cpu_adam_prepare(mt_cpu_adam_step *s, float lr, float beta1, float beta2, float eps, float weight_decay,
                         int step, float grad_scale);

// One AdamW update of n parameters: master, m, v (fp32) in place from grad
// (fp32, or bf16 bit patterns with grad_bf16), and weights_bf16 (may be
// NULL) set to the new master rounded to bf16. OpenMP threads share the
// elements in fixed chunks (inside a parallel region, the caller does all).
void mt_cpu_adam_update(mt_cpu_adam_path path, const mt_cpu_adam_step *s, float *master, float *m, float *v,
                        const void *grad, int grad_bf16, uint16_t *weights_bf16, size_t n);

// One block of int8 moments encoded (offload.moments int8): the codes and
// absmax values kernels/ops_ref.h's mt_qblock_encode gives, bit for bit, 16
// values at a time where the processor has AVX-512 (else that function).
void mt_cpu_qblock_encode(const float *m, const float *v, size_t len, uint8_t *mq, uint8_t *vq, float *m_absmax,
                          float *v_absmax);

// q[i] = x[i] / d as a division rounds it, n values: the encoder's scaling
// of a block by its absmax, by the reciprocal and one correction where the
// processor has AVX-512 (else divided).
void mt_cpu_divide(float *q, const float *x, float d, size_t n);

// One block of int8 moments decoded: kernels/ops_ref.h's mt_qblock_decode,
// bit for bit, 16 values at a time where the processor has AVX-512.
void mt_cpu_qblock_decode(const uint8_t *mq, const uint8_t *vq, float m_absmax, float v_absmax, float *m, float *v,
                          size_t len);

// n consecutive values' int8 moments in blocks of MT_QBLOCK from the first
// (the last may be short), block j's absmax at m_absmax[j], v_absmax[j]:
// decoded into m and v (encode 0), or m and v encoded into them (encode 1),
// a block per OpenMP thread unless called from a parallel region.
void mt_cpu_qblocks_code(uint8_t *mq, uint8_t *vq, float *m_absmax, float *v_absmax, float *m, float *v, size_t n,
                         int encode);

// Sum of squares of grad (fp32 or bf16), accumulated in double: the
// global-norm clip's input. The same sum for any thread count and on every
// path (mt_cpu_sumsq: the best). Not finite when any value is not.
double mt_cpu_sumsq(const void *grad, int grad_bf16, size_t n);
double mt_cpu_sumsq_path(mt_cpu_adam_path path, const void *grad, int grad_bf16, size_t n);

// Gradient accumulation over micro-batches: sum = grad (first) or
// sum + grad, in fp32, over n values; grad fp32 or bf16. OpenMP threads
// share the elements; each element's sum is the same for any thread count.
void mt_cpu_accumulate(float *sum, const void *grad, int grad_bf16, size_t n, int first);

#ifdef __cplusplus
}
#endif
#endif
