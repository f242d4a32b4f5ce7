// kernels/ops.h: the op API the model and the optimizers call. Each op runs
// its CPU reference (ops_ref.h, fp32) when the backend is the CPU, and its CUDA
// version (ops_cuda.h) when it is a GPU; there "act" pointers hold bf16 and
// parameter gradients, master weights and moments stay fp32.
//
// Pointers typed `void *` hold the backend's activation type (fp32 on the
// CPU, bf16 on the GPU); `float *` is fp32 on both. All pointers live where
// the backend computes (host memory for the CPU, device memory for the GPU).
#ifndef MT_OPS_H
#define MT_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/device.h"

#ifdef __cplusplus
extern "C" {
#endif

// Bytes of one activation element on this backend.
size_t mt_act_size(const mt_backend *be);

void mt_op_embedding_forward(const mt_backend *be, void *out, const int32_t *tokens, const void *wte, int N, int C);
void mt_op_embedding_backward(const mt_backend *be, float *dwte, const int32_t *tokens, const void *dout, int N, int C);
// plus_one: the weight scales by (1 + w), computed in fp32 before the result
// is rounded (Gemma's RMSNorm); else by w, the normalised value rounded first
// (Llama's).
void mt_op_rmsnorm_forward(const mt_backend *be, void *out, float *rstd, const void *inp, const void *weight, int N,
                           int C, float eps, int plus_one);
// sum = a + b (a residual, rounded as mt_op_add rounds it), then out =
// RMSNorm(sum) as mt_op_rmsnorm_forward: the same values as the two ops, in
// one pass on the GPU.
void mt_op_add_rmsnorm_forward(const mt_backend *be, void *sum, void *out, float *rstd, const void *a, const void *b,
                               const void *weight, int N, int C, float eps, int plus_one);
// dweight may be NULL (a frozen norm).
void mt_op_rmsnorm_backward(const mt_backend *be, void *dinp, float *dweight, const void *dout, const void *inp,
                            const void *weight, const float *rstd, int N, int C, int plus_one);
// pos (B, T) where the backend computes, or NULL: each token's position (its
// row of the tables); NULL means t. Packed documents restart it at 0.
void mt_op_rope_forward(const mt_backend *be, void *out, const void *inp, const float *cos_table,
                        const float *sin_table, const int32_t *pos, int B, int T, int H, int D, int rotate);
// Several RoPE passes over the same positions (a layer's q, k and v: rotate
// 0 only moves v to the attention's layout), each as mt_op_rope_forward with
// its head count; on the GPU one launch where the rows allow 16-byte loads.
typedef struct {
    void *dst;
    const void *src;
    int H, rotate;
} mt_rope_part;
enum { MT_MAX_ROPE_PARTS = 3 };
void mt_op_rope_forward_many(const mt_backend *be, const mt_rope_part *p, int count, const float *cos_table,
                             const float *sin_table, const int32_t *pos, int B, int T, int D);
void mt_op_rope_backward(const mt_backend *be, void *dinp, const void *dout, const float *cos_table,
                         const float *sin_table, const int32_t *pos, int B, int T, int H, int D, int rotate);
// One attention problem: q (B, H, T, D), k/v (B, KV, T, D) with H a multiple
// of KV (grouped-query heads share a kv head), causal. window > 0: query t
// sees only keys t - window + 1 .. t (sliding-window attention, Mistral's
// sliding_window); 0: every key up to t. docs: each row holds documents
// packed one after another, and query t sees no key before its document's
// start; the ops then take pos (B, T), each token's position in its document
// (0 where a document starts, else the position before plus 1).
// nondeterministic: the backward may sum dQ in any order (cuDNN's
// non-deterministic algorithm, whose workspace grows as T where the
// deterministic one's grows as T x T); 0 keeps every path bit-reproducible.
// memtune's own kernel and the CPU are deterministic either way.
// forward_only: no backward runs on this shape (MeZO, evaluation), so the
// workspace is the forward's alone (cuDNN's forward graph; none for memtune's
// kernel) instead of the larger backward's.
typedef struct {
    int B, T, H, KV, D;
    int window;
    int docs;
    float scale;  // the scores' scale; 0: 1/sqrt(D) (Gemma: query_pre_attn_scalar^-1/2)
    int nondeterministic;
    int forward_only;
} mt_attention_shape;
// Whether the backend's attention handles this shape: on the GPU cuDNN's fused
// attention where the library serves it (built with cuDNN, found at run time),
// else memtune's own kernel (head dims 16, 32, 64, 80, 96 and 128); the CPU takes any.
// On the GPU this builds cuDNN's graphs for the shape (once, cached).
int mt_attention_supports(mt_backend *be, const mt_attention_shape *s);
// Which attention runs this shape, in words, for the start-up line.
void mt_attention_describe(mt_backend *be, const mt_attention_shape *s, char *buf, size_t len);
// Workspace the attention ops need for this shape (reserve it on the backend).
size_t mt_attention_workspace_bytes(mt_backend *be, const mt_attention_shape *s);
// Workspace the RMSNorm and embedding backward ops need for N rows of width C
// (on the GPU they reduce through it in a fixed order: deterministic).
size_t mt_norm_embedding_workspace_bytes(const mt_backend *be, int N, int C);
// What the GPU path's kernels need, by formula (no GPU needed; memtune plan):
// memtune's own attention kernel's backward scratch, and the RMSNorm and
// embedding backward's.
size_t mt_attention_own_workspace_bytes(const mt_attention_shape *s);
// The attention workspace a GPU run on GPU `device` will reserve, for a
// forecast made before the run: cuDNN's for a shape it serves there (its
// handle opened on the first call and kept for the process; *cudnn = 1),
// memtune's own kernel's where cuDNN does not serve or no such GPU is visible
// (device < 0 included; *cudnn = 0).
size_t mt_attention_planned_workspace_bytes(int device, const mt_attention_shape *s, int *cudnn);
size_t mt_norm_embedding_workspace_bytes_gpu(int N, int C);
// out (B, T, H, D); lse (B, H, T) fp32, the log-sum-exp of each row's scaled
// scores, is written by forward and read by backward. Both are deterministic:
// the same inputs give the same bits.
void mt_op_attention_forward(mt_backend *be, const mt_attention_shape *s, void *out, float *lse, const void *q,
                             const void *k, const void *v, const int32_t *pos);
// dq/dk/dv (the layouts of q/k/v) are overwritten; dout (B, T, H, D).
void mt_op_attention_backward(mt_backend *be, const mt_attention_shape *s, void *dq, void *dk, void *dv,
                              const void *dout, const void *q, const void *k, const void *v, const void *out,
                              const float *lse, const int32_t *pos);
// Decoding (memtune generate): each row b of a batch is one sequence, its new
// token at position pos[b] (where the backend computes). kv_store puts its
// k/v (B, KV, D) into the caches (B, KV, S, D) at pos[b]; attention_decode
// gives out (B, H, D) for its query heads q (B, H, D) over the cached
// positions first..pos[b] (first = pos[b] - window + 1 with a window that
// binds, else 0), scores scaled by scale (0: 1/sqrt(D)).
void mt_op_kv_store(const mt_backend *be, void *kcache, void *vcache, const void *k, const void *v, const int32_t *pos,
                    int B, int KV, int D, int S);
void mt_op_attention_decode(const mt_backend *be, void *out, const void *q, const void *kcache, const void *vcache,
                            const int32_t *pos, int B, int H, int KV, int D, int S, int window, float scale);
// Gated linear unit: out = act(gate) * up, elementwise over n. SiLU: SwiGLU
// (Llama); GELU's tanh approximation: GeGLU (Gemma's gelu_pytorch_tanh).
typedef enum { MT_ACT_SILU, MT_ACT_GELU_TANH } mt_act;
void mt_op_glu_forward(const mt_backend *be, void *out, const void *gate, const void *up, size_t n, mt_act act);
void mt_op_glu_backward(const mt_backend *be, void *dgate, void *dup, const void *dout, const void *gate,
                        const void *up, size_t n, mt_act act);
// The MLP's first half without adapters: out (N, F) = act(inp wg^T) * inp
// wu^T, each product rounded to the activation type as mt_op_matmul_forward
// rounds it, then mt_op_glu_forward's arithmetic (the same values as the three
// ops). gate and up (N, F) are scratch: the GPU leaves them alone where one
// launch serves (a decoding step's few rows).
void mt_op_matmul_glu_forward(const mt_backend *be, void *out, void *gate, void *up, const void *inp, const void *wg,
                              const void *wu, int N, int IN, int F, mt_act act);
// x *= s over n activations (rounded to the activation type, as s * x in it).
void mt_op_scale(const mt_backend *be, void *x, size_t n, float s);
void mt_op_matmul_forward(const mt_backend *be, void *out, const void *inp, const void *weight, const void *bias, int N,
                          int IN, int OUT);
// Products of one input (a layer's q, k and v; gate and up), each as
// mt_op_matmul_forward; on the GPU one launch where a decoding step's few
// rows let the skinny kernel serve all of them.
typedef struct {
    void *out;
    const void *weight;
    const void *bias;  // NULL: none
    int OUT;
} mt_product;
enum { MT_MAX_PRODUCTS = 3 };
void mt_op_matmul_forward_many(const mt_backend *be, const mt_product *p, int count, const void *inp, int N, int IN);
void mt_op_matmul_backward(const mt_backend *be, void *dinp, float *dweight, float *dbias, const void *dout,
                           const void *inp, const void *weight, int N, int IN, int OUT, int accumulate);
// out (N, OUT) += alpha * inp (N, IN) @ weight (OUT, IN)^T.
void mt_op_matmul_forward_add(const mt_backend *be, void *out, const void *inp, const void *weight, int N, int IN,
                              int OUT, float alpha);
// dinp = (or += with accumulate) alpha * dout @ weight; dweight += alpha *
// dout^T @ inp; either may be NULL.
void mt_op_matmul_backward_scaled(const mt_backend *be, void *dinp, float *dweight, const void *dout, const void *inp,
                                  const void *weight, int N, int IN, int OUT, float alpha, int accumulate);
// out = inp * keep / (1 - p) with keep drawn from (seed, element index) alone:
// the same seed gives the same mask (the CPU's counter-based draws; cuRAND's
// Philox on the GPU, a different but equally fixed mask). Element i is index
// offset + i of the mask (a block of rows sees its rows' part of the whole
// tensor's mask). out may alias inp.
void mt_op_dropout(const mt_backend *be, void *out, const void *inp, size_t n, float p, uint64_t seed, uint64_t offset);
// out += dropout(inp) with the same mask (backward through a dropout into a
// gradient that already holds other parts); out must not alias inp.
void mt_op_dropout_add(const mt_backend *be, void *out, const void *inp, size_t n, float p, uint64_t seed,
                       uint64_t offset);
// LoRA's down-projections of one input that up to MT_MAX_PRODUCTS adapters
// share (q, k and v read the attention's norm; gate and up the MLP's):
// u[g] (R, r) = dropout(x) (R, IN) a[g]^T for a[g] (r, IN), the dropout
// mt_op_dropout's with (p, seed, offset) and none where p is 0. scratch:
// scratch_bytes of room, or NULL; its contents afterwards are undefined.
// The CPU forms dropout(x) there (p > 0 needs (R, IN) activations of room)
// and runs the products: the same values as those ops. With dropout the GPU
// reads x once for the whole group, drawing the mask on the way, with
// partial sums in the scratch; without dropout, where its kernels do not
// take the shapes, or where the scratch is too small, it composes the ops
// as the CPU does (ops.cu's lora_fused_enabled says which runs when).
void mt_op_lora_down(const mt_backend *be, void *const *u, const void *const *a, int count, const void *x,
                     void *scratch, size_t scratch_bytes, int R, int IN, int r, float p, uint64_t seed,
                     uint64_t offset);
// Its backward from du[g] (R, r): da[g] (r, IN, fp32) += du[g]^T dropout(x)
// (da NULL: none; parts of a fused module may share one), and dx (R, IN) +=
// dropout's backward (the same mask) of sum_g du[g] a[g]. The GPU writes dx
// in one pass, and with dropout reads x once for all the dA.
void mt_op_lora_down_backward(const mt_backend *be, void *dx, float *const *da, const void *const *du,
                              const void *const *a, int count, const void *x, void *scratch, size_t scratch_bytes,
                              int R, int IN, int r, float p, uint64_t seed, uint64_t offset);
// Zeroth-order (MeZO) perturbations. z(seed, i) is the stream of rng.h's
// mt_rng_gauss: Philox4x32-10 and Box-Muller, cuRAND's Philox on the GPU with
// the same words; nothing of a parameter's size is stored for it.
// dst = src + scale * z(seed, offset + j) for j < n; dst may alias src.
void mt_op_perturb(const mt_backend *be, void *dst, const void *src, size_t n, float scale, uint64_t seed,
                   uint64_t offset);
// Both signs from one draw of z: plus = src + scale * z and, unless minus is
// NULL, minus = src - scale * z, each the same values as mt_op_perturb with
// that sign. plus may alias src; minus aliases neither.
void mt_op_perturb_pair(const mt_backend *be, void *plus, void *minus, const void *src, size_t n, float scale,
                        uint64_t seed, uint64_t offset);
// x (N, C) += scale * z(seed, offset + tokens[n] * C + c): the rows an
// embedding lookup gathered, perturbed as the table itself would be.
void mt_op_perturb_rows(const mt_backend *be, void *x, const int32_t *tokens, int N, int C, float scale, uint64_t seed,
                        uint64_t offset);
#define MT_ZO_MAX_DIRECTIONS 16
typedef struct {
    int count;
    uint64_t seed[MT_ZO_MAX_DIRECTIONS];  // the stream of each direction z_k
    float coef[MT_ZO_MAX_DIRECTIONS];     // its weight: projected gradient / count
} mt_zo_directions;
// w -= lr * (sum_k coef_k z(seed_k, offset + j) + weight_decay * w). On the
// GPU the bf16 result is rounded stochastically with 16 random bits per
// element keyed by round_seed (a SplitMix64 hash of the element's group):
// unbiased, so steps far below bf16's resolution still count.
void mt_op_zo_update(const mt_backend *be, void *w, size_t n, uint64_t offset, const mt_zo_directions *d, float lr,
                     float weight_decay, uint64_t round_seed);
// The update, then perturbed = w_new + scale * z(seed, offset + j) and, unless
// mirror is NULL, mirror = w_new - scale * z(seed, offset + j), in one pass:
// the same values as mt_op_zo_update followed by mt_op_perturb_pair.
void mt_op_zo_update_perturb(const mt_backend *be, void *w, void *perturbed, void *mirror, size_t n, uint64_t offset,
                             const mt_zo_directions *d, float lr, float weight_decay, uint64_t round_seed, float scale,
                             uint64_t seed);
// logits (N, V) fp32 = inp (N, C) @ weight (V, C)^T.
void mt_op_logits_forward(const mt_backend *be, float *logits, const void *inp, const void *weight, int N, int C,
                          int V);
// dlogits is in the activation type (NULL: loss only). On the CPU it may
// alias logits.
void mt_op_crossentropy(const mt_backend *be, float *losses, void *dlogits, const float *logits, const int32_t *targets,
                        int N, int V, float dscale);
void mt_op_add(const mt_backend *be, void *out, const void *a, const void *b, size_t n);
// The same over fp32 buffers (gradients) on either backend; out may alias a or b.
void mt_op_add_f32(const mt_backend *be, float *out, const float *a, const float *b, size_t n);
// param_copy: bf16 copy to refresh on the GPU; NULL on the CPU.
void mt_op_adamw(const mt_backend *be, float *master, void *param_copy, const float *grad, float *m, float *v, size_t n,
                 float lr, float beta1, float beta2, float eps, float weight_decay, float bias_correction1,
                 float bias_correction2, float grad_scale);
// Adam's moments of n values: fp32 (m, v), or 8-bit blockwise (mq, vq with
// one fp32 absmax per MT_QBLOCK values; m on mt_qmap(1), v on mt_qmap(0)).
#define MT_QBLOCK 256
typedef struct {
    float *m, *v;                // fp32 moments, or NULL with 8-bit
    uint8_t *mq, *vq;            // 8-bit codes
    float *m_absmax, *v_absmax;  // (n + MT_QBLOCK - 1) / MT_QBLOCK each
} mt_adam_state;
// Bytes of the state of n values (fp32, or 8-bit codes with their absmax).
size_t mt_adam_state_bytes(size_t n, int int8);
// Adam's direction without the step: m, v updated from grad, then
// dir = (m / bc1) / (sqrt(v / bc2) + eps). dir may alias grad. With 8-bit
// moments each block is decoded, updated in fp32 and encoded again with its
// new absmax (the direction uses the fp32 values). gate: NULL, or a double
// on the backend (mt_op_sumsq_to's): where it is not finite nothing changes
// (the GPU reads it there, so no host wait decides it).
void mt_op_adam_direction(const mt_backend *be, float *dir, const float *grad, const mt_adam_state *s, size_t n,
                          float beta1, float beta2, float eps, float bias_correction1, float bias_correction2,
                          const double *gate);
// w = w * (1 - lr * weight_decay) - lr * scale * update. On the GPU the bf16
// result is rounded stochastically (16 bits of a SplitMix64 hash of
// (round_seed, element), as mt_op_zo_update does): no fp32 master copy, and
// updates below bf16's resolution still count on average.
// gate as mt_op_adam_direction's.
void mt_op_apply_update(const mt_backend *be, void *w, const float *update, size_t n, float lr, float scale,
                        float weight_decay, uint64_t round_seed, const double *gate);
// dst (fp32) = z(seed, j), j < n: the z stream of mt_op_perturb.
void mt_op_gauss(const mt_backend *be, float *dst, size_t n, uint64_t seed);
// The 8-bit moment maps: 256 ascending values in [-1, 1] (signed: 0, and
// +-127 magnitudes over 7 decades, linear within each, densest near 1) or
// [0, 1] (unsigned: 0 and 255 magnitudes over 8 decades). A value x of a
// block with absmax s is stored as the code nearest to x / s.
const float *mt_qmap(int is_signed);
// Sum of squares of n fp32 values, returned on the host (synchronises).
double mt_op_sumsq(const mt_backend *be, const float *x, size_t n);
// The same sum written to *dst on the backend (device memory on a GPU), the
// host not waiting for it: the same bits as mt_op_sumsq.
void mt_op_sumsq_to(const mt_backend *be, const float *x, size_t n, double *dst);
// Sum of n fp32 values, returned on the host (synchronises).
double mt_op_sum(const mt_backend *be, const float *x, size_t n);
// dst (activation type) <- src fp32, n elements (a copy on the CPU).
void mt_op_cast_from_f32(const mt_backend *be, void *dst, const float *src, size_t n);
// dst fp32 <- src (activation type).
void mt_op_cast_to_f32(const mt_backend *be, float *dst, const void *src, size_t n);
void mt_op_zero(const mt_backend *be, void *dst, size_t bytes);

#ifdef __cplusplus
}
#endif
#endif
