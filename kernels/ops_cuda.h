// kernels/ops_cuda.h: CUDA versions of the ops in ops_ref.h, same arguments
// with bf16 activations (`void *`), fp32 where ops_ref.h says fp32, device
// pointers, and the backend (stream, cuBLAS handle, workspace) first.
#ifndef MT_OPS_CUDA_H
#define MT_OPS_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/device.h"
#include "kernels/ops.h"

#ifdef __cplusplus
extern "C" {
#endif

void mt_embedding_forward_cuda(const mt_backend *be, void *out, const int32_t *tokens, const void *wte, int N, int C);
void mt_embedding_backward_cuda(const mt_backend *be, float *dwte, const int32_t *tokens, const void *dout, int N,
                                int C);
void mt_rmsnorm_forward_cuda(const mt_backend *be, void *out, float *rstd, const void *inp, const void *weight, int N,
                             int C, float eps, int plus_one);
void mt_add_rmsnorm_forward_cuda(const mt_backend *be, void *sum, void *out, float *rstd, const void *a, const void *b,
                                 const void *weight, int N, int C, float eps, int plus_one);
void mt_rmsnorm_backward_cuda(const mt_backend *be, void *dinp, float *dweight, const void *dout, const void *inp,
                              const void *weight, const float *rstd, int N, int C, int plus_one);
void mt_rope_forward_cuda(const mt_backend *be, void *out, const void *inp, const float *cos_table,
                          const float *sin_table, const int32_t *pos, int B, int T, int H, int D, int rotate);
void mt_rope_forward_many_cuda(const mt_backend *be, const mt_rope_part *p, int count, const float *cos_table,
                               const float *sin_table, const int32_t *pos, int B, int T, int D);
void mt_rope_backward_cuda(const mt_backend *be, void *dinp, const void *dout, const float *cos_table,
                           const float *sin_table, const int32_t *pos, int B, int T, int H, int D, int rotate);
// Attention: cuDNN's fused graphs where the backend has them for the shape,
// memtune's own kernel otherwise (see ops.h).
int mt_attention_supports_cuda(mt_backend *be, const mt_attention_shape *s);
void mt_attention_describe_cuda(mt_backend *be, const mt_attention_shape *s, char *buf, size_t len);
size_t mt_norm_embedding_workspace_bytes_cuda(int N, int C);
size_t mt_attention_workspace_bytes_cuda(mt_backend *be, const mt_attention_shape *s);
size_t mt_attention_planned_workspace_bytes_cuda(int device, const mt_attention_shape *s, int *cudnn);
void mt_attention_forward_cuda(mt_backend *be, const mt_attention_shape *s, void *out, float *lse, const void *q,
                               const void *k, const void *v, const int32_t *pos);
void mt_attention_backward_cuda(mt_backend *be, const mt_attention_shape *s, void *dq, void *dk, void *dv,
                                const void *dout, const void *q, const void *k, const void *v, const void *out,
                                const float *lse, const int32_t *pos);
void mt_kv_store_cuda(const mt_backend *be, void *kcache, void *vcache, const void *k, const void *v,
                      const int32_t *pos, int B, int KV, int D, int S);
void mt_attention_decode_cuda(const mt_backend *be, void *out, const void *q, const void *kcache, const void *vcache,
                              const int32_t *pos, int B, int H, int KV, int D, int S, int window, float scale);
void mt_glu_forward_cuda(const mt_backend *be, void *out, const void *gate, const void *up, size_t n, mt_act act);
void mt_scale_cuda(const mt_backend *be, void *x, size_t n, float s);
void mt_glu_backward_cuda(const mt_backend *be, void *dgate, void *dup, const void *dout, const void *gate,
                          const void *up, size_t n, mt_act act);
void mt_matmul_forward_cuda(const mt_backend *be, void *out, const void *inp, const void *weight, const void *bias,
                            int N, int IN, int OUT);
void mt_matmul_forward_many_cuda(const mt_backend *be, const mt_product *p, int count, const void *inp, int N, int IN);
void mt_matmul_glu_forward_cuda(const mt_backend *be, void *out, void *gate, void *up, const void *inp, const void *wg,
                                const void *wu, int N, int IN, int F, mt_act act);
void mt_matmul_forward_add_cuda(const mt_backend *be, void *out, const void *inp, const void *weight, int N, int IN,
                                int OUT, float alpha);
void mt_dropout_cuda(const mt_backend *be, void *out, const void *inp, size_t n, float p, uint64_t seed,
                     uint64_t offset, int accumulate);
// LoRA's fused A products (mt_op_lora_down, mt_op_lora_down_backward's dA
// and dx parts); 0: the kernels do not take these shapes or this scratch
// (the caller composes the op).
int mt_lora_down_cuda(const mt_backend *be, void *const *u, const void *const *a, int count, const void *x,
                      void *scratch, size_t scratch_bytes, int R, int IN, int r, float p, uint64_t seed,
                      uint64_t offset);
int mt_lora_down_wgrad_cuda(const mt_backend *be, float *const *da, const void *const *du, int count, const void *x,
                            void *scratch, size_t scratch_bytes, int R, int IN, int r, float p, uint64_t seed,
                            uint64_t offset);
int mt_lora_down_dx_cuda(const mt_backend *be, void *dx, const void *const *du, const void *const *a, int count, int R,
                         int IN, int r, float p, uint64_t seed, uint64_t offset);
// Both parts in one pass (the dA kernel's blocks also writing dx, one mask
// draw for both), for groups of up to 64 adapter rows; MT_LORA_KERNELS=1
// keeps them apart.
int mt_lora_down_backward_cuda(const mt_backend *be, void *dx, float *const *da, const void *const *du,
                               const void *const *a, int count, const void *x, void *scratch, size_t scratch_bytes,
                               int R, int IN, int r, float p, uint64_t seed, uint64_t offset);
// mirror: NULL, or where src - scale * z(seed) goes (mt_op_perturb_pair).
void mt_perturb_cuda(const mt_backend *be, void *dst, void *mirror, const void *src, size_t n, float scale,
                     uint64_t seed, uint64_t offset);
void mt_perturb_rows_cuda(const mt_backend *be, void *x, const int32_t *tokens, int N, int C, float scale,
                          uint64_t seed, uint64_t offset);
// perturbed: NULL, or where w_new + scale * z(seed) goes, and mirror NULL or
// where w_new - scale * z(seed) goes (mt_op_zo_update_perturb).
void mt_zo_update_cuda(const mt_backend *be, void *w, size_t n, uint64_t offset, const mt_zo_directions *d, float lr,
                       float weight_decay, uint64_t round_seed, void *perturbed, void *mirror, float scale,
                       uint64_t seed);
// Philox words of groups [0, groups) keyed by seed, 4 per group (tests: the
// GPU's stream equals the CPU's).
void mt_philox_words_cuda(uint32_t *out, size_t groups, uint64_t seed);
void mt_matmul_backward_cuda(const mt_backend *be, void *dinp, float *dweight, float *dbias, const void *dout,
                             const void *inp, const void *weight, int N, int IN, int OUT, float alpha, int accumulate);
void mt_logits_forward_cuda(const mt_backend *be, float *logits, const void *inp, const void *weight, int N, int C,
                            int V);
void mt_crossentropy_cuda(const mt_backend *be, float *losses, void *dlogits, const float *logits,
                          const int32_t *targets, int N, int V, float dscale);
void mt_add_cuda(const mt_backend *be, void *out, const void *a, const void *b, size_t n);
void mt_add_f32_cuda(const mt_backend *be, float *out, const float *a, const float *b, size_t n);
void mt_adamw_cuda(const mt_backend *be, float *master, void *param_copy, const float *grad, float *m, float *v,
                   size_t n, float lr, float beta1, float beta2, float eps, float weight_decay, float bias_correction1,
                   float bias_correction2, float grad_scale);
void mt_adam_direction_cuda(const mt_backend *be, float *dir, const float *grad, const mt_adam_state *s, size_t n,
                            float beta1, float beta2, float eps, float bias_correction1, float bias_correction2,
                            const double *gate);
void mt_apply_update_cuda(const mt_backend *be, void *w, const float *update, size_t n, float lr, float scale,
                          float weight_decay, uint64_t round_seed, const double *gate);
void mt_gauss_cuda(const mt_backend *be, float *dst, size_t n, uint64_t seed);
double mt_sumsq_cuda(const mt_backend *be, const float *x, size_t n, int squares);
void mt_sumsq_to_cuda(const mt_backend *be, const float *x, size_t n, double *dst);
void mt_cast_from_f32_cuda(const mt_backend *be, void *dst, const float *src, size_t n);
void mt_cast_to_f32_cuda(const mt_backend *be, float *dst, const void *src, size_t n);

#ifdef __cplusplus
}
#endif
#endif
