// kernels/ops.cu: CUDA versions of the ops (see ops_ref.h for what each op
// means). Activations and weights are bf16, every sum is accumulated in fp32,
// parameter gradients are fp32. Matrix products, attention's included, go to
// cuBLAS with fp32 compute; the rest are simple memory-bound kernels.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>

#include "kernels/cuda_check.h"
#include "kernels/ops_cuda.h"

typedef __nv_bfloat16 bf16;

static const int kThreads = 256;

static unsigned grid_for(size_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }

// Sum of v over the block, returned to every thread. blockDim.x must be a
// multiple of 32; callable repeatedly (the first barrier guards the scratch).
static __device__ float block_sum(float v) {
    __shared__ float partial[32];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

static __device__ float block_max(float v) {
    __shared__ float partial[32];
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? partial[lane] : -INFINITY;
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// ---------------------------------------------------------------- embedding

static __global__ void embedding_forward_kernel(bf16 *out, const int32_t *tokens, const bf16 *wte, int N, int C) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * C) return;
    size_t n = idx / C, c = idx % C;
    out[idx] = wte[(size_t)tokens[n] * C + c];
}

static __global__ void embedding_backward_kernel(float *dwte, const int32_t *tokens, const bf16 *dout, int N,
                                                 int C) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * C) return;
    size_t n = idx / C, c = idx % C;
    atomicAdd(&dwte[(size_t)tokens[n] * C + c], __bfloat162float(dout[idx]));
}

extern "C" void mt_embedding_forward_cuda(const mt_backend *be, void *out, const int32_t *tokens, const void *wte,
                                          int N, int C) {
    (void)be;
    size_t n = (size_t)N * C;
    embedding_forward_kernel<<<grid_for(n, kThreads), kThreads>>>((bf16 *)out, tokens, (const bf16 *)wte, N, C);
    CUDA_CHECK_LAUNCH();
}

extern "C" void mt_embedding_backward_cuda(const mt_backend *be, float *dwte, const int32_t *tokens,
                                           const void *dout, int N, int C) {
    (void)be;
    size_t n = (size_t)N * C;
    embedding_backward_kernel<<<grid_for(n, kThreads), kThreads>>>(dwte, tokens, (const bf16 *)dout, N, C);
    CUDA_CHECK_LAUNCH();
}

// ------------------------------------------------------------------ rmsnorm

static __global__ void rmsnorm_forward_kernel(bf16 *out, float *rstd, const bf16 *inp, const bf16 *weight, int C,
                                              float eps) {
    const bf16 *x = inp + (size_t)blockIdx.x * C;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float v = __bfloat162float(x[c]);
        ss += v * v;
    }
    float r = rsqrtf(block_sum(ss) / C + eps);
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
    bf16 *y = out + (size_t)blockIdx.x * C;
    // as transformers: normalise in fp32, cast to bf16, then scale by the weight
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        y[c] = __float2bfloat16(__bfloat162float(__float2bfloat16(__bfloat162float(x[c]) * r)) *
                                __bfloat162float(weight[c]));
}

static const int kRmsRowsPerBlock = 32;

static __global__ void rmsnorm_backward_kernel(bf16 *dinp, float *dweight, const bf16 *dout, const bf16 *inp,
                                               const bf16 *weight, const float *rstd, int N, int C) {
    extern __shared__ float dw_partial[];  // (C)
    for (int c = threadIdx.x; c < C; c += blockDim.x) dw_partial[c] = 0.0f;
    int row_end = min(N, (int)(blockIdx.x + 1) * kRmsRowsPerBlock);
    for (int row = blockIdx.x * kRmsRowsPerBlock; row < row_end; row++) {
        const bf16 *x = inp + (size_t)row * C, *g = dout + (size_t)row * C;
        bf16 *dx = dinp + (size_t)row * C;
        float dot = 0.0f;
        for (int c = threadIdx.x; c < C; c += blockDim.x)
            dot += __bfloat162float(g[c]) * __bfloat162float(weight[c]) * __bfloat162float(x[c]);
        dot = block_sum(dot);
        float r = rstd[row], k = dot * r * r * r / C;
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            float gv = __bfloat162float(g[c]), xv = __bfloat162float(x[c]);
            dx[c] = __float2bfloat16(__bfloat162float(dx[c]) + r * __bfloat162float(weight[c]) * gv - k * xv);
            dw_partial[c] += gv * xv * r;
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < C; c += blockDim.x) atomicAdd(&dweight[c], dw_partial[c]);
}

extern "C" void mt_rmsnorm_forward_cuda(const mt_backend *be, void *out, float *rstd, const void *inp,
                                        const void *weight, int N, int C, float eps) {
    (void)be;
    rmsnorm_forward_kernel<<<N, kThreads>>>((bf16 *)out, rstd, (const bf16 *)inp, (const bf16 *)weight, C, eps);
    CUDA_CHECK_LAUNCH();
}

extern "C" void mt_rmsnorm_backward_cuda(const mt_backend *be, void *dinp, float *dweight, const void *dout,
                                         const void *inp, const void *weight, const float *rstd, int N, int C) {
    (void)be;
    size_t shared = (size_t)C * sizeof(float);
    MT_CHECK(shared <= 48 * 1024, "rmsnorm backward supports C <= 12288, got %d", C);
    unsigned blocks = grid_for((size_t)N, kRmsRowsPerBlock);
    rmsnorm_backward_kernel<<<blocks, kThreads, shared>>>((bf16 *)dinp, dweight, (const bf16 *)dout,
                                                          (const bf16 *)inp, (const bf16 *)weight, rstd, N, C);
    CUDA_CHECK_LAUNCH();
}

// --------------------------------------------------------------------- rope

// One thread per (b, t, h, i) with i < D/2 (rotate) or i < D (permute only).
static __global__ void rope_kernel(bf16 *dst, const bf16 *src, const float *cos_table, const float *sin_table,
                                   int B, int T, int H, int D, int rotate, int backward) {
    int width = rotate ? D / 2 : D;
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)B * T * H * width) return;
    int i = idx % width;
    size_t rest = idx / width;
    int h = rest % H;
    rest /= H;
    int t = rest % T;
    int b = rest / T;
    size_t bthd = (((size_t)b * T + t) * H + h) * D, bhtd = (((size_t)b * H + h) * T + t) * D;
    if (!rotate) {
        if (backward) dst[bthd + i] = src[bhtd + i];
        else dst[bhtd + i] = src[bthd + i];
        return;
    }
    int half = D / 2;
    float c = cos_table[(size_t)t * half + i], s = sin_table[(size_t)t * half + i];
    if (!backward) {
        float x1 = __bfloat162float(src[bthd + i]), x2 = __bfloat162float(src[bthd + i + half]);
        dst[bhtd + i] = __float2bfloat16(x1 * c - x2 * s);
        dst[bhtd + i + half] = __float2bfloat16(x2 * c + x1 * s);
    } else {
        float g1 = __bfloat162float(src[bhtd + i]), g2 = __bfloat162float(src[bhtd + i + half]);
        dst[bthd + i] = __float2bfloat16(g1 * c + g2 * s);
        dst[bthd + i + half] = __float2bfloat16(g2 * c - g1 * s);
    }
}

static void rope_launch(void *dst, const void *src, const float *cos_table, const float *sin_table, int B, int T,
                        int H, int D, int rotate, int backward) {
    size_t n = (size_t)B * T * H * (rotate ? D / 2 : D);
    rope_kernel<<<grid_for(n, kThreads), kThreads>>>((bf16 *)dst, (const bf16 *)src, cos_table, sin_table, B, T, H,
                                                     D, rotate, backward);
    CUDA_CHECK_LAUNCH();
}

extern "C" void mt_rope_forward_cuda(const mt_backend *be, void *out, const void *inp, const float *cos_table,
                                     const float *sin_table, int B, int T, int H, int D, int rotate) {
    (void)be;
    rope_launch(out, inp, cos_table, sin_table, B, T, H, D, rotate, 0);
}

extern "C" void mt_rope_backward_cuda(const mt_backend *be, void *dinp, const void *dout, const float *cos_table,
                                      const float *sin_table, int B, int T, int H, int D, int rotate) {
    (void)be;
    rope_launch(dinp, dout, cos_table, sin_table, B, T, H, D, rotate, 1);
}

// ---------------------------------------------------------------- attention
//
// The simple correct version: per batch chunk, S = scale * Q K^T (fp32) and
// P = causal softmax(S) (bf16) are materialised by cuBLAS strided-batched
// products over (b, kv-head); the heads of one kv group form one (G*T, D)
// matrix, so grouped-query attention needs no copies of K and V. Backward
// recomputes P. A fused kernel that never materialises T x T is a later issue.

static const size_t kAttentionChunkBytes = (size_t)2 << 30;

static int attention_batch_chunk(int B, int T, int H) {
    size_t per_b = (size_t)H * T * T * (sizeof(float) + sizeof(bf16));
    int chunk = (int)(kAttentionChunkBytes / (per_b ? per_b : 1));
    return chunk < 1 ? 1 : (chunk > B ? B : chunk);
}

extern "C" size_t mt_attention_workspace_bytes_cuda(int B, int T, int H, int D) {
    int chunk = attention_batch_chunk(B, T, H);
    return (size_t)chunk * H * T * T * (sizeof(float) + sizeof(bf16)) + (size_t)B * H * T * D * sizeof(bf16);
}

static void gemm_batched(const mt_backend *be, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                         float alpha, const void *A, cudaDataType at, int lda, long long stride_a, const void *B,
                         int ldb, long long stride_b, float beta, void *C, cudaDataType ct, int ldc,
                         long long stride_c, int batch) {
    cublasHandle_t handle = (cublasHandle_t)be->cublas;
    if (batch == 1)
        CUBLAS_CHECK(cublasGemmEx(handle, ta, tb, m, n, k, &alpha, A, at, lda, B, at, ldb, &beta, C, ct, ldc,
                                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    else
        CUBLAS_CHECK(cublasGemmStridedBatchedEx(handle, ta, tb, m, n, k, &alpha, A, at, lda, stride_a, B, at, ldb,
                                                stride_b, &beta, C, ct, ldc, stride_c, batch, CUBLAS_COMPUTE_32F,
                                                CUBLAS_GEMM_DEFAULT));
}

// Rows of S are ((b*KV + kv)*G + g)*T + t: the query position is row % T.
static __global__ void causal_softmax_kernel(bf16 *P, const float *S, int T) {
    size_t row = blockIdx.x;
    int t = row % T;
    const float *s = S + row * T;
    bf16 *p = P + row * T;
    float m = -INFINITY;
    for (int j = threadIdx.x; j <= t; j += blockDim.x) m = fmaxf(m, s[j]);
    m = block_max(m);
    float sum = 0.0f;
    for (int j = threadIdx.x; j <= t; j += blockDim.x) sum += __expf(s[j] - m);
    float inv = 1.0f / block_sum(sum);
    for (int j = threadIdx.x; j < T; j += blockDim.x)
        p[j] = __float2bfloat16(j <= t ? __expf(s[j] - m) * inv : 0.0f);
}

// dS = P * (dP - sum_j P dP) * scale, written over P.
static __global__ void causal_softmax_backward_kernel(bf16 *P, const float *dP, int T, float scale) {
    size_t row = blockIdx.x;
    int t = row % T;
    bf16 *p = P + row * T;
    const float *dp = dP + row * T;
    float dot = 0.0f;
    for (int j = threadIdx.x; j <= t; j += blockDim.x) dot += __bfloat162float(p[j]) * dp[j];
    dot = block_sum(dot);
    for (int j = threadIdx.x; j <= t; j += blockDim.x)
        p[j] = __float2bfloat16(__bfloat162float(p[j]) * (dp[j] - dot) * scale);
}

// (B, H, T, D) <-> (B, T, H, D)
static __global__ void permute_heads_kernel(bf16 *dst, const bf16 *src, int B, int T, int H, int D, int to_bthd) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)B * T * H * D) return;
    int d = idx % D;
    size_t rest = idx / D;
    int t = rest % T;
    rest /= T;
    int h = rest % H;
    int b = rest / H;  // idx enumerates (b, h, t, d)
    size_t bthd = (((size_t)b * T + t) * H + h) * D + d;
    if (to_bthd) dst[bthd] = src[idx];
    else dst[idx] = src[bthd];
}

static void permute_heads(void *dst, const void *src, int B, int T, int H, int D, int to_bthd) {
    size_t n = (size_t)B * T * H * D;
    permute_heads_kernel<<<grid_for(n, kThreads), kThreads>>>((bf16 *)dst, (const bf16 *)src, B, T, H, D, to_bthd);
    CUDA_CHECK_LAUNCH();
}

typedef struct {
    float *S;
    bf16 *P, *O;
    int chunk, G;
    long long q_stride, kv_stride, s_stride;  // per (b, kv) batch entry
} attention_plan;

static attention_plan attention_prepare(mt_backend *be, int B, int T, int H, int KV, int D) {
    MT_CHECK(H % KV == 0, "heads %d not a multiple of kv heads %d", H, KV);
    size_t need = mt_attention_workspace_bytes_cuda(B, T, H, D);
    MT_CHECK(be->workspace_bytes >= need, "attention workspace %zu < %zu: reserve it first", be->workspace_bytes,
             need);
    attention_plan plan;
    plan.chunk = attention_batch_chunk(B, T, H);
    plan.G = H / KV;
    plan.S = (float *)be->workspace;
    plan.P = (bf16 *)(plan.S + (size_t)plan.chunk * H * T * T);
    plan.O = plan.P + (size_t)plan.chunk * H * T * T;
    plan.q_stride = (long long)plan.G * T * D;
    plan.kv_stride = (long long)T * D;
    plan.s_stride = (long long)plan.G * T * T;
    return plan;
}

// S = scale Q K^T and P = softmax(S) for batches [b0, b0 + nb).
static void attention_probs(const mt_backend *be, const attention_plan *pl, const bf16 *q, const bf16 *k, int b0,
                            int nb, int T, int H, int KV, int D) {
    float scale = 1.0f / sqrtf((float)D);
    const bf16 *qb = q + (size_t)b0 * H * T * D, *kb = k + (size_t)b0 * KV * T * D;
    gemm_batched(be, CUBLAS_OP_T, CUBLAS_OP_N, T, pl->G * T, D, scale, kb, CUDA_R_16BF, D, pl->kv_stride, qb, D,
                 pl->q_stride, 0.0f, pl->S, CUDA_R_32F, T, pl->s_stride, nb * KV);
    causal_softmax_kernel<<<(unsigned)((size_t)nb * H * T), kThreads>>>(pl->P, pl->S, T);
    CUDA_CHECK_LAUNCH();
}

extern "C" void mt_attention_forward_cuda(mt_backend *be, void *out, const void *q, const void *k, const void *v,
                                          int B, int T, int H, int KV, int D) {
    attention_plan pl = attention_prepare(be, B, T, H, KV, D);
    for (int b0 = 0; b0 < B; b0 += pl.chunk) {
        int nb = B - b0 < pl.chunk ? B - b0 : pl.chunk;
        attention_probs(be, &pl, (const bf16 *)q, (const bf16 *)k, b0, nb, T, H, KV, D);
        const bf16 *vb = (const bf16 *)v + (size_t)b0 * KV * T * D;
        bf16 *ob = pl.O + (size_t)b0 * H * T * D;
        // O = P V
        gemm_batched(be, CUBLAS_OP_N, CUBLAS_OP_N, D, pl.G * T, T, 1.0f, vb, CUDA_R_16BF, D, pl.kv_stride, pl.P, T,
                     pl.s_stride, 0.0f, ob, CUDA_R_16BF, D, pl.q_stride, nb * KV);
    }
    permute_heads(out, pl.O, B, T, H, D, 1);
}

extern "C" void mt_attention_backward_cuda(mt_backend *be, void *dq, void *dk, void *dv, const void *dout,
                                           const void *q, const void *k, const void *v, int B, int T, int H, int KV,
                                           int D) {
    attention_plan pl = attention_prepare(be, B, T, H, KV, D);
    float scale = 1.0f / sqrtf((float)D);
    bf16 *dO = pl.O;
    permute_heads(dO, dout, B, T, H, D, 0);
    for (int b0 = 0; b0 < B; b0 += pl.chunk) {
        int nb = B - b0 < pl.chunk ? B - b0 : pl.chunk;
        attention_probs(be, &pl, (const bf16 *)q, (const bf16 *)k, b0, nb, T, H, KV, D);
        size_t qo = (size_t)b0 * H * T * D, ko = (size_t)b0 * KV * T * D;
        const bf16 *dOb = dO + qo, *qb = (const bf16 *)q + qo;
        const bf16 *kb = (const bf16 *)k + ko, *vb = (const bf16 *)v + ko;
        // dV = P^T dO (summed over the group's heads through k = G*T)
        gemm_batched(be, CUBLAS_OP_N, CUBLAS_OP_T, D, T, pl.G * T, 1.0f, dOb, CUDA_R_16BF, D, pl.q_stride, pl.P, T,
                     pl.s_stride, 0.0f, (bf16 *)dv + ko, CUDA_R_16BF, D, pl.kv_stride, nb * KV);
        // dP = dO V^T, into S
        gemm_batched(be, CUBLAS_OP_T, CUBLAS_OP_N, T, pl.G * T, D, 1.0f, vb, CUDA_R_16BF, D, pl.kv_stride, dOb, D,
                     pl.q_stride, 0.0f, pl.S, CUDA_R_32F, T, pl.s_stride, nb * KV);
        causal_softmax_backward_kernel<<<(unsigned)((size_t)nb * H * T), kThreads>>>(pl.P, pl.S, T, scale);
        CUDA_CHECK_LAUNCH();
        // dQ = dS K ; dK = dS^T Q
        gemm_batched(be, CUBLAS_OP_N, CUBLAS_OP_N, D, pl.G * T, T, 1.0f, kb, CUDA_R_16BF, D, pl.kv_stride, pl.P, T,
                     pl.s_stride, 0.0f, (bf16 *)dq + qo, CUDA_R_16BF, D, pl.q_stride, nb * KV);
        gemm_batched(be, CUBLAS_OP_N, CUBLAS_OP_T, D, T, pl.G * T, 1.0f, qb, CUDA_R_16BF, D, pl.q_stride, pl.P, T,
                     pl.s_stride, 0.0f, (bf16 *)dk + ko, CUDA_R_16BF, D, pl.kv_stride, nb * KV);
    }
}

// ------------------------------------------------------------------- swiglu

static __global__ void swiglu_forward_kernel(bf16 *out, const bf16 *gate, const bf16 *up, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = __bfloat162float(gate[i]);
    out[i] = __float2bfloat16(g / (1.0f + __expf(-g)) * __bfloat162float(up[i]));
}

static __global__ void swiglu_backward_kernel(bf16 *dgate, bf16 *dup, const bf16 *dout, const bf16 *gate,
                                              const bf16 *up, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = __bfloat162float(gate[i]), u = __bfloat162float(up[i]), d = __bfloat162float(dout[i]);
    float sig = 1.0f / (1.0f + __expf(-g)), silu = g * sig;
    dgate[i] = __float2bfloat16(d * u * (sig + silu * (1.0f - sig)));
    dup[i] = __float2bfloat16(d * silu);
}

extern "C" void mt_swiglu_forward_cuda(const mt_backend *be, void *out, const void *gate, const void *up, size_t n) {
    (void)be;
    swiglu_forward_kernel<<<grid_for(n, kThreads), kThreads>>>((bf16 *)out, (const bf16 *)gate, (const bf16 *)up, n);
    CUDA_CHECK_LAUNCH();
}

extern "C" void mt_swiglu_backward_cuda(const mt_backend *be, void *dgate, void *dup, const void *dout,
                                        const void *gate, const void *up, size_t n) {
    (void)be;
    swiglu_backward_kernel<<<grid_for(n, kThreads), kThreads>>>((bf16 *)dgate, (bf16 *)dup, (const bf16 *)dout,
                                                                (const bf16 *)gate, (const bf16 *)up, n);
    CUDA_CHECK_LAUNCH();
}

// ------------------------------------------------------------------- matmul
// Row-major X (r, c) is column-major X^T, so Y = X W^T is computed as
// Y^T = W X^T in cuBLAS's terms.

static __global__ void add_bias_kernel(bf16 *out, const bf16 *bias, size_t n, int OUT) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = __float2bfloat16(__bfloat162float(out[i]) + __bfloat162float(bias[i % OUT]));
}

static __global__ void bias_grad_kernel(float *dbias, const bf16 *dout, int N, int OUT) {
    int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= OUT) return;
    float sum = 0.0f;
    for (int n = 0; n < N; n++) sum += __bfloat162float(dout[(size_t)n * OUT + o]);
    dbias[o] += sum;
}

extern "C" void mt_matmul_forward_cuda(const mt_backend *be, void *out, const void *inp, const void *weight,
                                       const void *bias, int N, int IN, int OUT) {
    gemm_batched(be, CUBLAS_OP_T, CUBLAS_OP_N, OUT, N, IN, 1.0f, weight, CUDA_R_16BF, IN, 0, inp, IN, 0, 0.0f, out,
                 CUDA_R_16BF, OUT, 0, 1);
    if (bias) {
        size_t n = (size_t)N * OUT;
        add_bias_kernel<<<grid_for(n, kThreads), kThreads>>>((bf16 *)out, (const bf16 *)bias, n, OUT);
        CUDA_CHECK_LAUNCH();
    }
}

extern "C" void mt_matmul_backward_cuda(const mt_backend *be, void *dinp, float *dweight, float *dbias,
                                        const void *dout, const void *inp, const void *weight, int N, int IN,
                                        int OUT, int accumulate) {
    if (dinp)
        gemm_batched(be, CUBLAS_OP_N, CUBLAS_OP_N, IN, N, OUT, 1.0f, weight, CUDA_R_16BF, IN, 0, dout, OUT, 0,
                     accumulate ? 1.0f : 0.0f, dinp, CUDA_R_16BF, IN, 0, 1);
    if (dweight)
        gemm_batched(be, CUBLAS_OP_N, CUBLAS_OP_T, IN, OUT, N, 1.0f, inp, CUDA_R_16BF, IN, 0, dout, OUT, 0, 1.0f,
                     dweight, CUDA_R_32F, IN, 0, 1);
    if (dbias) {
        bias_grad_kernel<<<grid_for((size_t)OUT, kThreads), kThreads>>>(dbias, (const bf16 *)dout, N, OUT);
        CUDA_CHECK_LAUNCH();
    }
}

extern "C" void mt_logits_forward_cuda(const mt_backend *be, float *logits, const void *inp, const void *weight,
                                       int N, int C, int V) {
    gemm_batched(be, CUBLAS_OP_T, CUBLAS_OP_N, V, N, C, 1.0f, weight, CUDA_R_16BF, C, 0, inp, C, 0, 0.0f, logits,
                 CUDA_R_32F, V, 0, 1);
}

// ------------------------------------------------------------ cross-entropy

static __global__ void crossentropy_kernel(float *losses, bf16 *dlogits, const float *logits,
                                           const int32_t *targets, int V, float dscale) {
    size_t n = blockIdx.x;
    const float *z = logits + n * V;
    bf16 *dz = dlogits ? dlogits + n * V : NULL;
    int target = targets[n];
    if (target < 0) {
        if (threadIdx.x == 0) losses[n] = 0.0f;
        if (dz)
            for (int i = threadIdx.x; i < V; i += blockDim.x) dz[i] = __float2bfloat16(0.0f);
        return;
    }
    float m = -INFINITY;
    for (int i = threadIdx.x; i < V; i += blockDim.x) m = fmaxf(m, z[i]);
    m = block_max(m);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) sum += __expf(z[i] - m);
    float logsum = logf(block_sum(sum)) + m;
    if (threadIdx.x == 0) losses[n] = logsum - z[target];
    if (dz)
        for (int i = threadIdx.x; i < V; i += blockDim.x)
            dz[i] = __float2bfloat16((__expf(z[i] - logsum) - (i == target ? 1.0f : 0.0f)) * dscale);
}

extern "C" void mt_crossentropy_cuda(const mt_backend *be, float *losses, void *dlogits, const float *logits,
                                     const int32_t *targets, int N, int V, float dscale) {
    (void)be;
    if (N == 0) return;
    crossentropy_kernel<<<N, 512>>>(losses, (bf16 *)dlogits, logits, targets, V, dscale);
    CUDA_CHECK_LAUNCH();
}

// -------------------------------------------------------------- elementwise

static __global__ void add_kernel(bf16 *out, const bf16 *a, const bf16 *b, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __float2bfloat16(__bfloat162float(a[i]) + __bfloat162float(b[i]));
}

extern "C" void mt_add_cuda(const mt_backend *be, void *out, const void *a, const void *b, size_t n) {
    (void)be;
    add_kernel<<<grid_for(n, kThreads), kThreads>>>((bf16 *)out, (const bf16 *)a, (const bf16 *)b, n);
    CUDA_CHECK_LAUNCH();
}

static __global__ void adamw_kernel(float *master, bf16 *copy, const float *grad, float *m, float *v, size_t n,
                                    float lr, float beta1, float beta2, float eps, float weight_decay,
                                    float step_size, float bc2_sqrt, float grad_scale) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = grad[i] * grad_scale;
    float mi = beta1 * m[i] + (1.0f - beta1) * g;
    float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    float p = master[i] * (1.0f - lr * weight_decay);
    p -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    master[i] = p;
    if (copy) copy[i] = __float2bfloat16(p);
}

extern "C" void mt_adamw_cuda(const mt_backend *be, float *master, void *param_copy, const float *grad, float *m,
                              float *v, size_t n, float lr, float beta1, float beta2, float eps, float weight_decay,
                              float bias_correction1, float bias_correction2, float grad_scale) {
    (void)be;
    adamw_kernel<<<grid_for(n, kThreads), kThreads>>>(master, (bf16 *)param_copy, grad, m, v, n, lr, beta1, beta2,
                                                      eps, weight_decay, lr / bias_correction1,
                                                      sqrtf(bias_correction2), grad_scale);
    CUDA_CHECK_LAUNCH();
}

static __global__ void sum_kernel(double *out, const float *x, size_t n, int squares) {
    float sum = 0.0f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        sum += squares ? x[i] * x[i] : x[i];
    sum = block_sum(sum);
    if (threadIdx.x == 0) atomicAdd(out, (double)sum);
}

extern "C" double mt_sumsq_cuda(const mt_backend *be, const float *x, size_t n, int squares) {
    double *out = (double *)be->reduce_buffer, host = 0.0;
    CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(double), 0));
    unsigned blocks = grid_for(n, kThreads);
    if (blocks > 1024) blocks = 1024;
    if (blocks == 0) blocks = 1;
    sum_kernel<<<blocks, kThreads>>>(out, x, n, squares);
    CUDA_CHECK_LAUNCH();
    CUDA_CHECK(cudaMemcpy(&host, out, sizeof host, cudaMemcpyDeviceToHost));
    return host;
}

static __global__ void cast_from_f32_kernel(bf16 *dst, const float *src, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = __float2bfloat16(src[i]);
}

static __global__ void cast_to_f32_kernel(float *dst, const bf16 *src, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = __bfloat162float(src[i]);
}

extern "C" void mt_cast_from_f32_cuda(const mt_backend *be, void *dst, const float *src, size_t n) {
    (void)be;
    cast_from_f32_kernel<<<grid_for(n, kThreads), kThreads>>>((bf16 *)dst, src, n);
    CUDA_CHECK_LAUNCH();
}

extern "C" void mt_cast_to_f32_cuda(const mt_backend *be, float *dst, const void *src, size_t n) {
    (void)be;
    cast_to_f32_kernel<<<grid_for(n, kThreads), kThreads>>>(dst, (const bf16 *)src, n);
    CUDA_CHECK_LAUNCH();
}
