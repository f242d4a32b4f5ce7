// kernels/ops_ref.h: the CPU reference of every op, fp32, plain loops (OpenMP
// across rows). These define what each op means; the CUDA versions in
// ops_cuda.h take the same arguments (bf16 activations) and must match.
//
// Shapes: N = B*T rows; C hidden; H heads, KV kv-heads, D head dim; F ffn;
// V vocab. Linear weights are (OUT, IN) row-major as in Hugging Face.
// "+=" in a comment means the op accumulates into that output.
#ifndef MT_OPS_REF_H
#define MT_OPS_REF_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/ops.h"

#ifdef __cplusplus
extern "C" {
#endif

// out (N, C) = wte[tokens[n]]; dwte (V, C) += scatter of dout.
void mt_embedding_forward_ref(float *out, const int32_t *tokens, const float *wte, int N, int C);
void mt_embedding_backward_ref(float *dwte, const int32_t *tokens, const float *dout, int N, int C);

// y = x * rsqrt(mean(x^2) + eps) * weight (plus_one: * (1 + weight)); rstd
// (N) saved for backward.
void mt_rmsnorm_forward_ref(float *out, float *rstd, const float *inp, const float *weight, int N, int C, float eps,
                            int plus_one);
// dinp (N, C) +=, dweight (C) +=.
void mt_rmsnorm_backward_ref(float *dinp, float *dweight, const float *dout, const float *inp, const float *weight,
                             const float *rstd, int N, int C, int plus_one);

// Rotary embedding in the "rotate half" convention of Hugging Face Llama, fused
// with the layout change (B, T, H, D) -> (B, H, T, D). cos/sin are (T, D/2).
// rotate == 0 only permutes (for v). pos (B, T): each token's position (the
// row of the tables), NULL for t (packed documents restart their positions).
void mt_rope_forward_ref(float *out, const float *inp, const float *cos_table, const float *sin_table,
                         const int32_t *pos, int B, int T, int H, int D, int rotate);
// dinp (B, T, H, D) = transpose of the above applied to dout (B, H, T, D).
void mt_rope_backward_ref(float *dinp, const float *dout, const float *cos_table, const float *sin_table,
                          const int32_t *pos, int B, int T, int H, int D, int rotate);
// cos/sin (T, D/2) for positions 0..T-1 from the inverse frequencies (D/2).
void mt_rope_tables(float *cos_table, float *sin_table, const float *inv_freq, int T, int D);

// Causal scaled-dot-product attention with grouped-query heads.
// q (B, H, T, D), k/v (B, KV, T, D); out (B, T, H, D); scores scaled by
// scale (0: 1/sqrt(D));
// lse (B, H, T) = log-sum-exp of each row's scaled scores (kept for backward).
// window > 0: query t attends to keys max(0, t - window + 1) .. t only.
// pos (B, T), or NULL: each token's position in its document; query t then
// sees no key before its document's start, t - pos[t] (documents packed into
// one row attend only within themselves).
void mt_attention_forward_ref(float *out, float *lse, const float *q, const float *k, const float *v, int B, int T,
                              int H, int KV, int D, int window, const int32_t *pos, float scale);
// Decoding, one new token per sequence: row b's k/v (B, KV, D) go into the
// caches (B, KV, S, D) at position pos[b].
void mt_kv_store_ref(float *kcache, float *vcache, const float *k, const float *v, const int32_t *pos, int B, int KV,
                     int D, int S);
// out (B, H, D): row b's query heads q (B, H, D) against its cached keys and
// values at positions first..pos[b] (first: pos[b] - window + 1 with a
// window that binds, else 0), scores scaled by scale (0: 1/sqrt(D)).
void mt_attention_decode_ref(float *out, const float *q, const float *kcache, const float *vcache, const int32_t *pos,
                             int B, int H, int KV, int D, int S, int window, float scale);
// dq/dk/dv are overwritten. out and lse are what forward produced (the CUDA
// version uses them; the reference recomputes P from q and k instead).
void mt_attention_backward_ref(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                               const float *v, const float *out, const float *lse, int B, int T, int H, int KV, int D,
                               int window, const int32_t *pos, float scale);

// out = act(gate) * up, elementwise over n (silu, or GELU's tanh approximation).
void mt_glu_forward_ref(float *out, const float *gate, const float *up, size_t n, mt_act act);
void mt_glu_backward_ref(float *dgate, float *dup, const float *dout, const float *gate, const float *up, size_t n,
                         mt_act act);

// out (N, OUT) = inp (N, IN) @ weight^T (+ bias (OUT) when not NULL).
void mt_matmul_forward_ref(float *out, const float *inp, const float *weight, const float *bias, int N, int IN,
                           int OUT);
// out (N, OUT) += alpha * inp (N, IN) @ weight^T.
void mt_matmul_forward_add_ref(float *out, const float *inp, const float *weight, int N, int IN, int OUT, float alpha);
// dinp (N, IN) = (or += when accumulate) alpha * dout @ weight, skipped when
// NULL; dweight (OUT, IN) += alpha * dout^T @ inp and dbias (OUT) += alpha *
// column sums, when dweight / dbias are not NULL (dbias only with dweight).
void mt_matmul_backward_ref(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                            const float *weight, int N, int IN, int OUT, float alpha, int accumulate);
// out = inp * keep / (1 - p), keep = uniform(seed, i) >= p: the mask depends
// only on (seed, i), so backward regenerates it. out may alias inp.
void mt_dropout_ref(float *out, const float *inp, size_t n, float p, uint64_t seed, uint64_t offset, int accumulate);

// MeZO's perturbation and update over z = mt_rng_gauss (see ops.h).
void mt_perturb_ref(float *dst, const float *src, size_t n, float scale, uint64_t seed, uint64_t offset);
void mt_perturb_rows_ref(float *x, const int32_t *tokens, int N, int C, float scale, uint64_t seed, uint64_t offset);
void mt_zo_update_ref(float *w, size_t n, uint64_t offset, int count, const uint64_t *seeds, const float *coefs,
                      float lr, float weight_decay);

// losses (N): -log softmax(logits)[target], 0 where target < 0.
// dlogits (N, V) (may alias logits, may be NULL) = (softmax - onehot) * dscale,
// 0 on ignored rows.
void mt_crossentropy_ref(float *losses, float *dlogits, const float *logits, const int32_t *targets, int N, int V,
                         float dscale);

// out = a + b (out may alias a or b).
void mt_add_ref(float *out, const float *a, const float *b, size_t n);

// AdamW as torch.optim.AdamW: p *= 1 - lr*wd; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps),
// with the gradient multiplied by grad_scale first (clipping).
void mt_adamw_ref(float *param, const float *grad, float *m, float *v, size_t n, float lr, float beta1, float beta2,
                  float eps, float weight_decay, float bias_correction1, float bias_correction2, float grad_scale);

// GaLore's pieces (ops.h: mt_op_adam_direction, mt_op_apply_update, mt_op_gauss).
void mt_adam_direction_ref(float *dir, const float *grad, const mt_adam_state *s, size_t n, float beta1, float beta2,
                           float eps, float bias_correction1, float bias_correction2);
void mt_apply_update_ref(float *w, const float *update, size_t n, float lr, float scale, float weight_decay);
void mt_gauss_ref(float *dst, size_t n, uint64_t seed);
// The code of map (mt_qmap) nearest to x (ties to the lower code).
uint8_t mt_qmap_encode(const float *map, float x);
// mt_qmap_encode's code as a count: mt_qmap_encode(map, x) is, for x > map[0] (else
// 0), start[p] + (x >= up[start[p]]) with p x's 16-bit prefix, where
// *most_steps <= 1. Returns start (65536 entries and 4 bytes of padding);
// *up: 256 thresholds, up[c] the least float whose code exceeds c (NaN at
// 255).
const uint8_t *mt_qmap_thresholds(int is_signed, const float **up, int *most_steps);
// One 8-bit block of Adam's moments (len <= MT_QBLOCK values): decoded to
// fp32 with its absmax, or encoded with a new absmax (the block's largest |m|
// and largest v; a nonzero v never gets code 0). GaLore's 8-bit moments and
// the offload store's int8 moments are these.
void mt_qblock_decode(const uint8_t *mq, const uint8_t *vq, float m_absmax, float v_absmax, float *m, float *v,
                      size_t len);
void mt_qblock_encode(const float *m, const float *v, size_t len, uint8_t *mq, uint8_t *vq, float *m_absmax,
                      float *v_absmax);

// Sum of squares in double precision.
double mt_sumsq_ref(const float *x, size_t n);

// bf16 round-to-nearest-even of every element (the cast the GPU does).
void mt_cast_bf16_ref(uint16_t *out, const float *inp, size_t n);

#ifdef __cplusplus
}
#endif
#endif
