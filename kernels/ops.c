// kernels/ops.c: routes each op to its CPU reference or its CUDA version.
#include "kernels/ops.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "kernels/common.h"
#include "kernels/ops_ref.h"
#ifdef MT_HAVE_CUDA
#include "kernels/ops_cuda.h"
#define MT_GPU(be, call) \
    if ((be)->gpu) {     \
        call;            \
        return;          \
    }
#else
#define MT_GPU(be, call) MT_CHECK(!(be)->gpu, "GPU backend in a CPU-only build")
#endif

size_t mt_act_size(const mt_backend *be) { return be->gpu ? 2 : 4; }

void mt_op_embedding_forward(const mt_backend *be, void *out, const int32_t *tokens, const void *wte, int N, int C) {
    MT_GPU(be, mt_embedding_forward_cuda(be, out, tokens, wte, N, C));
    mt_embedding_forward_ref(out, tokens, wte, N, C);
}

void mt_op_embedding_backward(const mt_backend *be, float *dwte, const int32_t *tokens, const void *dout, int N,
                              int C) {
    MT_GPU(be, mt_embedding_backward_cuda(be, dwte, tokens, dout, N, C));
    mt_embedding_backward_ref(dwte, tokens, dout, N, C);
}

void mt_op_rmsnorm_forward(const mt_backend *be, void *out, float *rstd, const void *inp, const void *weight, int N,
                           int C, float eps, int plus_one) {
    MT_GPU(be, mt_rmsnorm_forward_cuda(be, out, rstd, inp, weight, N, C, eps, plus_one));
    mt_rmsnorm_forward_ref(out, rstd, inp, weight, N, C, eps, plus_one);
}

void mt_op_add_rmsnorm_forward(const mt_backend *be, void *sum, void *out, float *rstd, const void *a, const void *b,
                               const void *weight, int N, int C, float eps, int plus_one) {
    MT_GPU(be, mt_add_rmsnorm_forward_cuda(be, sum, out, rstd, a, b, weight, N, C, eps, plus_one));
    mt_add_ref(sum, a, b, (size_t)N * C);
    mt_rmsnorm_forward_ref(out, rstd, sum, weight, N, C, eps, plus_one);
}

void mt_op_rmsnorm_backward(const mt_backend *be, void *dinp, float *dweight, const void *dout, const void *inp,
                            const void *weight, const float *rstd, int N, int C, int plus_one) {
    MT_GPU(be, mt_rmsnorm_backward_cuda(be, dinp, dweight, dout, inp, weight, rstd, N, C, plus_one));
    mt_rmsnorm_backward_ref(dinp, dweight, dout, inp, weight, rstd, N, C, plus_one);
}

void mt_op_rope_forward(const mt_backend *be, void *out, const void *inp, const float *cos_table,
                        const float *sin_table, const int32_t *pos, int B, int T, int H, int D, int rotate) {
    MT_GPU(be, mt_rope_forward_cuda(be, out, inp, cos_table, sin_table, pos, B, T, H, D, rotate));
    mt_rope_forward_ref(out, inp, cos_table, sin_table, pos, B, T, H, D, rotate);
}

void mt_op_rope_forward_many(const mt_backend *be, const mt_rope_part *p, int count, const float *cos_table,
                             const float *sin_table, const int32_t *pos, int B, int T, int D) {
    MT_CHECK(count >= 1 && count <= MT_MAX_ROPE_PARTS, "%d RoPE parts (1 to %d)", count, MT_MAX_ROPE_PARTS);
    MT_GPU(be, mt_rope_forward_many_cuda(be, p, count, cos_table, sin_table, pos, B, T, D));
    for (int k = 0; k < count; k++)
        mt_rope_forward_ref(p[k].dst, p[k].src, cos_table, sin_table, pos, B, T, p[k].H, D, p[k].rotate);
}

void mt_op_rope_backward(const mt_backend *be, void *dinp, const void *dout, const float *cos_table,
                         const float *sin_table, const int32_t *pos, int B, int T, int H, int D, int rotate) {
    MT_GPU(be, mt_rope_backward_cuda(be, dinp, dout, cos_table, sin_table, pos, B, T, H, D, rotate));
    mt_rope_backward_ref(dinp, dout, cos_table, sin_table, pos, B, T, H, D, rotate);
}

int mt_attention_supports(mt_backend *be, const mt_attention_shape *s) {
#ifdef MT_HAVE_CUDA
    if (be->gpu) return mt_attention_supports_cuda(be, s);
#endif
    (void)be;
    return s->KV > 0 && s->H % s->KV == 0;
}

void mt_attention_describe(mt_backend *be, const mt_attention_shape *s, char *buf, size_t len) {
#ifdef MT_HAVE_CUDA
    if (be->gpu) {
        mt_attention_describe_cuda(be, s, buf, len);
        return;
    }
#endif
    (void)be, (void)s;
    snprintf(buf, len, "the fp32 reference (CPU)");
}

size_t mt_attention_workspace_bytes(mt_backend *be, const mt_attention_shape *s) {
#ifdef MT_HAVE_CUDA
    if (be->gpu) return mt_attention_workspace_bytes_cuda(be, s);
#endif
    (void)be, (void)s;
    return 0;
}

size_t mt_attention_planned_workspace_bytes(int device, const mt_attention_shape *s, int *cudnn) {
    *cudnn = 0;
#ifdef MT_HAVE_CUDA
    if (device >= 0 && device < mt_device_count()) return mt_attention_planned_workspace_bytes_cuda(device, s, cudnn);
#endif
    (void)device;
    return mt_attention_own_workspace_bytes(s);
}

// Own kernel: delta (B, H, T), then the per-head fp32 dK and dV partials
// (B, H, T_pad, D) each, T_pad a multiple of the 64-query tile: all for the
// backward (the forward takes none).
size_t mt_attention_own_workspace_bytes(const mt_attention_shape *s) {
    if (s->forward_only) return 0;
    size_t T_pad = (size_t)(s->T + 63) / 64 * 64;
    return (size_t)s->B * s->H * s->T * sizeof(float) + 2 * (size_t)s->B * s->H * T_pad * s->D * sizeof(float) + 256;
}

// RMSNorm backward: a weight-gradient partial per 32-row block; embedding
// backward: the positions grouped by token.
size_t mt_norm_embedding_workspace_bytes_gpu(int N, int C) {
    size_t rms = ((size_t)N + 31) / 32 * (size_t)C * sizeof(float);
    size_t emb = (size_t)(3 * N + 1) * sizeof(int32_t);
    return rms > emb ? rms : emb;
}

size_t mt_norm_embedding_workspace_bytes(const mt_backend *be, int N, int C) {
#ifdef MT_HAVE_CUDA
    if (be->gpu) return mt_norm_embedding_workspace_bytes_cuda(N, C);
#endif
    (void)be, (void)N, (void)C;
    return 0;
}

void mt_op_attention_forward(mt_backend *be, const mt_attention_shape *s, void *out, float *lse, const void *q,
                             const void *k, const void *v, const int32_t *pos) {
    MT_CHECK(!s->docs == !pos, "attention: positions are given exactly when documents are packed");
    MT_GPU(be, mt_attention_forward_cuda(be, s, out, lse, q, k, v, pos));
    mt_attention_forward_ref(out, lse, q, k, v, s->B, s->T, s->H, s->KV, s->D, s->window, pos, s->scale);
}

void mt_op_attention_backward(mt_backend *be, const mt_attention_shape *s, void *dq, void *dk, void *dv,
                              const void *dout, const void *q, const void *k, const void *v, const void *out,
                              const float *lse, const int32_t *pos) {
    MT_CHECK(!s->docs == !pos, "attention: positions are given exactly when documents are packed");
    MT_GPU(be, mt_attention_backward_cuda(be, s, dq, dk, dv, dout, q, k, v, out, lse, pos));
    mt_attention_backward_ref(dq, dk, dv, dout, q, k, v, out, lse, s->B, s->T, s->H, s->KV, s->D, s->window, pos,
                              s->scale);
}

void mt_op_kv_store(const mt_backend *be, void *kcache, void *vcache, const void *k, const void *v, const int32_t *pos,
                    int B, int KV, int D, int S) {
    MT_GPU(be, mt_kv_store_cuda(be, kcache, vcache, k, v, pos, B, KV, D, S));
    mt_kv_store_ref(kcache, vcache, k, v, pos, B, KV, D, S);
}

void mt_op_attention_decode(const mt_backend *be, void *out, const void *q, const void *kcache, const void *vcache,
                            const int32_t *pos, int B, int H, int KV, int D, int S, int window, float scale) {
    MT_GPU(be, mt_attention_decode_cuda(be, out, q, kcache, vcache, pos, B, H, KV, D, S, window, scale));
    mt_attention_decode_ref(out, q, kcache, vcache, pos, B, H, KV, D, S, window, scale);
}

void mt_op_glu_forward(const mt_backend *be, void *out, const void *gate, const void *up, size_t n, mt_act act) {
    MT_GPU(be, mt_glu_forward_cuda(be, out, gate, up, n, act));
    mt_glu_forward_ref(out, gate, up, n, act);
}

void mt_op_matmul_glu_forward(const mt_backend *be, void *out, void *gate, void *up, const void *inp, const void *wg,
                              const void *wu, int N, int IN, int F, mt_act act) {
    MT_GPU(be, mt_matmul_glu_forward_cuda(be, out, gate, up, inp, wg, wu, N, IN, F, act));
    mt_matmul_forward_ref(gate, inp, wg, NULL, N, IN, F);
    mt_matmul_forward_ref(up, inp, wu, NULL, N, IN, F);
    mt_op_glu_forward(be, out, gate, up, (size_t)N * F, act);
}

void mt_op_glu_backward(const mt_backend *be, void *dgate, void *dup, const void *dout, const void *gate,
                        const void *up, size_t n, mt_act act) {
    MT_GPU(be, mt_glu_backward_cuda(be, dgate, dup, dout, gate, up, n, act));
    mt_glu_backward_ref(dgate, dup, dout, gate, up, n, act);
}

void mt_op_scale(const mt_backend *be, void *x, size_t n, float s) {
    MT_GPU(be, mt_scale_cuda(be, x, n, s));
    float *f = x;
    for (size_t i = 0; i < n; i++) f[i] *= s;
}

void mt_op_matmul_forward(const mt_backend *be, void *out, const void *inp, const void *weight, const void *bias, int N,
                          int IN, int OUT) {
    MT_GPU(be, mt_matmul_forward_cuda(be, out, inp, weight, bias, N, IN, OUT));
    mt_matmul_forward_ref(out, inp, weight, bias, N, IN, OUT);
}

void mt_op_matmul_forward_many(const mt_backend *be, const mt_product *p, int count, const void *inp, int N, int IN) {
    MT_CHECK(count >= 1 && count <= MT_MAX_PRODUCTS, "%d products of one input (1 to %d)", count, MT_MAX_PRODUCTS);
    MT_GPU(be, mt_matmul_forward_many_cuda(be, p, count, inp, N, IN));
    for (int k = 0; k < count; k++) mt_matmul_forward_ref(p[k].out, inp, p[k].weight, p[k].bias, N, IN, p[k].OUT);
}

void mt_op_matmul_backward(const mt_backend *be, void *dinp, float *dweight, float *dbias, const void *dout,
                           const void *inp, const void *weight, int N, int IN, int OUT, int accumulate) {
    MT_GPU(be, mt_matmul_backward_cuda(be, dinp, dweight, dbias, dout, inp, weight, N, IN, OUT, 1.0f, accumulate));
    mt_matmul_backward_ref(dinp, dweight, dbias, dout, inp, weight, N, IN, OUT, 1.0f, accumulate);
}

void mt_op_matmul_forward_add(const mt_backend *be, void *out, const void *inp, const void *weight, int N, int IN,
                              int OUT, float alpha) {
    MT_GPU(be, mt_matmul_forward_add_cuda(be, out, inp, weight, N, IN, OUT, alpha));
    mt_matmul_forward_add_ref(out, inp, weight, N, IN, OUT, alpha);
}

void mt_op_matmul_backward_scaled(const mt_backend *be, void *dinp, float *dweight, const void *dout, const void *inp,
                                  const void *weight, int N, int IN, int OUT, float alpha, int accumulate) {
    MT_GPU(be, mt_matmul_backward_cuda(be, dinp, dweight, NULL, dout, inp, weight, N, IN, OUT, alpha, accumulate));
    mt_matmul_backward_ref(dinp, dweight, NULL, dout, inp, weight, N, IN, OUT, alpha, accumulate);
}

void mt_op_dropout(const mt_backend *be, void *out, const void *inp, size_t n, float p, uint64_t seed,
                   uint64_t offset) {
    MT_GPU(be, mt_dropout_cuda(be, out, inp, n, p, seed, offset, 0));
    mt_dropout_ref(out, inp, n, p, seed, offset, 0);
}

void mt_op_dropout_add(const mt_backend *be, void *out, const void *inp, size_t n, float p, uint64_t seed,
                       uint64_t offset) {
    MT_GPU(be, mt_dropout_cuda(be, out, inp, n, p, seed, offset, 1));
    mt_dropout_ref(out, inp, n, p, seed, offset, 1);
}

// dropout(x) into scratch where p > 0 (the composed LoRA ops' input), else x.
static const void *lora_dropped(const mt_backend *be, const void *x, void *scratch, size_t scratch_bytes, size_t n,
                                float p, uint64_t seed, uint64_t offset) {
    if (p <= 0.0f) return x;
    MT_CHECK(scratch != NULL && scratch_bytes >= n * mt_act_size(be), "LoRA dropout without room for dropout(x)");
    mt_op_dropout(be, scratch, x, n, p, seed, offset);
    return scratch;
}

void mt_op_lora_down(const mt_backend *be, void *const *u, const void *const *a, int count, const void *x,
                     void *scratch, size_t scratch_bytes, int R, int IN, int r, float p, uint64_t seed,
                     uint64_t offset) {
#ifdef MT_HAVE_CUDA
    if (be->gpu && mt_lora_down_cuda(be, u, a, count, x, scratch, scratch_bytes, R, IN, r, p, seed, offset)) return;
#endif
    const void *in = lora_dropped(be, x, scratch, scratch_bytes, (size_t)R * IN, p, seed, offset);
    for (int g = 0; g < count; g++) mt_op_matmul_forward(be, u[g], in, a[g], NULL, R, IN, r);
}

void mt_op_lora_down_backward(const mt_backend *be, void *dx, float *const *da, const void *const *du,
                              const void *const *a, int count, const void *x, void *scratch, size_t scratch_bytes,
                              int R, int IN, int r, float p, uint64_t seed, uint64_t offset) {
    int fused_da = 0, fused_dx = 0;
#ifdef MT_HAVE_CUDA
    if (be->gpu && da &&
        mt_lora_down_backward_cuda(be, dx, da, du, a, count, x, scratch, scratch_bytes, R, IN, r, p, seed, offset))
        return;
    if (be->gpu && da)
        fused_da = mt_lora_down_wgrad_cuda(be, da, du, count, x, scratch, scratch_bytes, R, IN, r, p, seed, offset);
#endif
    if (da && !fused_da) {
        const void *in = lora_dropped(be, x, scratch, scratch_bytes, (size_t)R * IN, p, seed, offset);
        for (int g = 0; g < count; g++)
            mt_op_matmul_backward_scaled(be, NULL, da[g], du[g], in, a[g], R, IN, r, 1.0f, 0);
    }
#ifdef MT_HAVE_CUDA
    if (be->gpu) fused_dx = mt_lora_down_dx_cuda(be, dx, du, a, count, R, IN, r, p, seed, offset);
#endif
    if (fused_dx) return;
    if (p > 0.0f) {
        MT_CHECK(scratch != NULL && scratch_bytes >= (size_t)R * IN * mt_act_size(be),
                 "LoRA dropout without room for its gradient");
        for (int g = 0; g < count; g++)
            mt_op_matmul_backward_scaled(be, scratch, NULL, du[g], NULL, a[g], R, IN, r, 1.0f, g > 0);
        mt_op_dropout_add(be, dx, scratch, (size_t)R * IN, p, seed, offset);
    } else {
        for (int g = 0; g < count; g++)
            mt_op_matmul_backward_scaled(be, dx, NULL, du[g], NULL, a[g], R, IN, r, 1.0f, 1);
    }
}

void mt_op_perturb(const mt_backend *be, void *dst, const void *src, size_t n, float scale, uint64_t seed,
                   uint64_t offset) {
    mt_op_perturb_pair(be, dst, NULL, src, n, scale, seed, offset);
}

void mt_op_perturb_pair(const mt_backend *be, void *plus, void *minus, const void *src, size_t n, float scale,
                        uint64_t seed, uint64_t offset) {
    MT_CHECK(!minus || (minus != src && minus != plus), "perturb_pair: the mirror aliases an input or the output");
    MT_GPU(be, mt_perturb_cuda(be, plus, minus, src, n, scale, seed, offset));
    if (minus) mt_perturb_ref(minus, src, n, -scale, seed, offset);  // before plus, which may alias src
    mt_perturb_ref(plus, src, n, scale, seed, offset);
}

void mt_op_perturb_rows(const mt_backend *be, void *x, const int32_t *tokens, int N, int C, float scale, uint64_t seed,
                        uint64_t offset) {
    MT_GPU(be, mt_perturb_rows_cuda(be, x, tokens, N, C, scale, seed, offset));
    mt_perturb_rows_ref(x, tokens, N, C, scale, seed, offset);
}

void mt_op_zo_update(const mt_backend *be, void *w, size_t n, uint64_t offset, const mt_zo_directions *d, float lr,
                     float weight_decay, uint64_t round_seed) {
    MT_CHECK(d->count >= 1 && d->count <= MT_ZO_MAX_DIRECTIONS, "zo_update: %d directions", d->count);
    MT_GPU(be, mt_zo_update_cuda(be, w, n, offset, d, lr, weight_decay, round_seed, NULL, NULL, 0.0f, 0));
    (void)round_seed;  // fp32 on the CPU: no rounding to draw
    mt_zo_update_ref(w, n, offset, d->count, d->seed, d->coef, lr, weight_decay);
}

void mt_op_zo_update_perturb(const mt_backend *be, void *w, void *perturbed, void *mirror, size_t n, uint64_t offset,
                             const mt_zo_directions *d, float lr, float weight_decay, uint64_t round_seed, float scale,
                             uint64_t seed) {
    MT_CHECK(d->count >= 1 && d->count <= MT_ZO_MAX_DIRECTIONS, "zo_update: %d directions", d->count);
    MT_CHECK(mirror != w && mirror != perturbed, "zo_update_perturb: the mirror aliases the weights or the output");
    MT_GPU(be, mt_zo_update_cuda(be, w, n, offset, d, lr, weight_decay, round_seed, perturbed, mirror, scale, seed));
    (void)round_seed;
    mt_zo_update_ref(w, n, offset, d->count, d->seed, d->coef, lr, weight_decay);
    mt_perturb_ref(perturbed, w, n, scale, seed, offset);
    if (mirror) mt_perturb_ref(mirror, w, n, -scale, seed, offset);
}

void mt_op_logits_forward(const mt_backend *be, float *logits, const void *inp, const void *weight, int N, int C,
                          int V) {
    MT_GPU(be, mt_logits_forward_cuda(be, logits, inp, weight, N, C, V));
    mt_matmul_forward_ref(logits, inp, weight, NULL, N, C, V);
}

void mt_op_crossentropy(const mt_backend *be, float *losses, void *dlogits, const float *logits, const int32_t *targets,
                        int N, int V, float dscale) {
    MT_GPU(be, mt_crossentropy_cuda(be, losses, dlogits, logits, targets, N, V, dscale));
    mt_crossentropy_ref(losses, dlogits, logits, targets, N, V, dscale);
}

void mt_op_add(const mt_backend *be, void *out, const void *a, const void *b, size_t n) {
    MT_GPU(be, mt_add_cuda(be, out, a, b, n));
    mt_add_ref(out, a, b, n);
}

void mt_op_add_f32(const mt_backend *be, float *out, const float *a, const float *b, size_t n) {
    MT_GPU(be, mt_add_f32_cuda(be, out, a, b, n));
    mt_add_ref(out, a, b, n);
}

void mt_op_adamw(const mt_backend *be, float *master, void *param_copy, const float *grad, float *m, float *v, size_t n,
                 float lr, float beta1, float beta2, float eps, float weight_decay, float bias_correction1,
                 float bias_correction2, float grad_scale) {
    MT_GPU(be, mt_adamw_cuda(be, master, param_copy, grad, m, v, n, lr, beta1, beta2, eps, weight_decay,
                             bias_correction1, bias_correction2, grad_scale));
    (void)param_copy;  // the CPU trains its fp32 master weights directly
    mt_adamw_ref(master, grad, m, v, n, lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2,
                 grad_scale);
}

void mt_op_adam_direction(const mt_backend *be, float *dir, const float *grad, const mt_adam_state *s, size_t n,
                          float beta1, float beta2, float eps, float bias_correction1, float bias_correction2,
                          const double *gate) {
    MT_CHECK(s->m ? s->v != NULL : s->mq && s->vq && s->m_absmax && s->v_absmax, "adam_direction: incomplete state");
    MT_GPU(be,
           mt_adam_direction_cuda(be, dir, grad, s, n, beta1, beta2, eps, bias_correction1, bias_correction2, gate));
    if (gate && !isfinite(*gate)) return;
    mt_adam_direction_ref(dir, grad, s, n, beta1, beta2, eps, bias_correction1, bias_correction2);
}

void mt_op_apply_update(const mt_backend *be, void *w, const float *update, size_t n, float lr, float scale,
                        float weight_decay, uint64_t round_seed, const double *gate) {
    MT_GPU(be, mt_apply_update_cuda(be, w, update, n, lr, scale, weight_decay, round_seed, gate));
    (void)round_seed;  // fp32 on the CPU: nothing to round
    if (gate && !isfinite(*gate)) return;
    mt_apply_update_ref(w, update, n, lr, scale, weight_decay);
}

void mt_op_gauss(const mt_backend *be, float *dst, size_t n, uint64_t seed) {
    MT_GPU(be, mt_gauss_cuda(be, dst, n, seed));
    mt_gauss_ref(dst, n, seed);
}

double mt_op_sumsq(const mt_backend *be, const float *x, size_t n) {
#ifdef MT_HAVE_CUDA
    if (be->gpu) return mt_sumsq_cuda(be, x, n, 1);
#endif
    MT_CHECK(!be->gpu, "GPU backend in a CPU-only build");
    return mt_sumsq_ref(x, n);
}

void mt_op_sumsq_to(const mt_backend *be, const float *x, size_t n, double *dst) {
    MT_GPU(be, mt_sumsq_to_cuda(be, x, n, dst));
    *dst = mt_sumsq_ref(x, n);
}

double mt_op_sum(const mt_backend *be, const float *x, size_t n) {
#ifdef MT_HAVE_CUDA
    if (be->gpu) return mt_sumsq_cuda(be, x, n, 0);
#endif
    MT_CHECK(!be->gpu, "GPU backend in a CPU-only build");
    double sum = 0.0;
    for (size_t i = 0; i < n; i++) sum += x[i];
    return sum;
}

void mt_op_cast_from_f32(const mt_backend *be, void *dst, const float *src, size_t n) {
    MT_GPU(be, mt_cast_from_f32_cuda(be, dst, src, n));
    memmove(dst, src, n * sizeof(float));
}

void mt_op_cast_to_f32(const mt_backend *be, float *dst, const void *src, size_t n) {
    MT_GPU(be, mt_cast_to_f32_cuda(be, dst, src, n));
    memmove(dst, src, n * sizeof(float));
}

void mt_op_zero(const mt_backend *be, void *dst, size_t bytes) {
    if (be->gpu)
        mt_device_memset_on(dst, 0, bytes, be->stream);
    else
        memset(dst, 0, bytes);
}
