// kernels/ops.cu: CUDA versions of the ops (see ops_ref.h for what each op
// means). Activations and weights are bf16, every sum is accumulated in fp32,
// parameter gradients are fp32. Matrix products, attention's included, go to
// cuBLAS with fp32 compute; the rest are simple memory-bound kernels.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <curand_kernel.h>
#include <math.h>
#include <mma.h>
#include <stdlib.h>
#include <string.h>

#include <type_traits>

#include "kernels/attention_cudnn.h"
#include "kernels/cuda_check.h"
#include "kernels/ops_cuda.h"
#include "kernels/qmap.h"

typedef __nv_bfloat16 bf16;

static const int kThreads = 256;

static unsigned grid_for(size_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }

static __device__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Programmatic dependent launch (sm_90), for the kernels a decoding step runs
// as a CUDA Graph: launched through launch_pdl while a graph is recorded with
// MT_PDL=1 (be->pdl), a kernel may be scheduled while the kernel before it
// still runs.
// Each such kernel calls pdl_next() first, so that the kernel after it may be
// scheduled in turn, and pdl_wait() before it reads anything an earlier kernel
// wrote or writes anything: pdl_wait() returns once the kernel before it has
// finished and its writes are visible (and that kernel waited for the one
// before it). Between the two it may only read what no kernel writes (the
// skinny products load their first weights there). Launched the ordinary way,
// both return at once.
static __device__ __forceinline__ void pdl_next() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

static __device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// kernel<<<grid, block, 0, the backend's stream>>>(args), with programmatic
// dependent launch while a graph is recorded. Only for kernels that call
// pdl_next() and pdl_wait() as above.
template <typename... P, typename... A>
static void launch_pdl(const mt_backend *be, void (*kernel)(P...), dim3 grid, dim3 block, A... args) {
    cudaLaunchAttribute attr = {};
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid, cfg.blockDim = block, cfg.dynamicSmemBytes = 0, cfg.stream = mt_stream_of(be);
    cfg.attrs = &attr, cfg.numAttrs = be->pdl ? 1 : 0;
    CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, static_cast<P>(args)...));
}

// Memory-bound kernels move 8 bf16 (16 bytes) a load where every pointer they
// touch is 16-byte aligned; vec8 says so for up to four pointers (NULL counts
// as aligned).
static const int kVec = 8;

static bool vec8(const void *a, const void *b = NULL, const void *c = NULL, const void *d = NULL) {
    return (((uintptr_t)a | (uintptr_t)b | (uintptr_t)c | (uintptr_t)d) & 15) == 0;
}

static __device__ void load8(float f[kVec], const bf16 *p) {
    uint4 u = *(const uint4 *)p;
    const bf16 *h = (const bf16 *)&u;
    for (int j = 0; j < kVec; j++) f[j] = __bfloat162float(h[j]);
}

static __device__ void store8(bf16 *p, const float f[kVec]) {
    uint4 u;
    bf16 *h = (bf16 *)&u;
    for (int j = 0; j < kVec; j++) h[j] = __float2bfloat16(f[j]);
    *(uint4 *)p = u;
}

// Elements [8t, 8t + 8) of n belong to thread t: f(i0, count, vector) with
// vector true when all 8 are in range and the kernel's pointers are aligned.
static unsigned grid_for8(size_t n) { return grid_for((n + kVec - 1) / kVec, kThreads); }

// Sum of v over the block, returned to every thread. blockDim.x must be a
// multiple of 32; callable repeatedly (the first barrier guards the scratch).
template <typename T>
static __device__ T block_sum(T v) {
    __shared__ T partial[32];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? partial[lane] : T(0);
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

// Orders positions by (token, position): each token's rows are then added in
// one fixed order. The key array is passed through a file-level pointer for
// qsort (the host side of one launch; not reentrant, like the op itself).
static const int32_t *sort_key_tokens;

static int compare_positions(const void *a, const void *b) {
    int32_t pa = *(const int32_t *)a, pb = *(const int32_t *)b;
    int32_t ta = sort_key_tokens[pa], tb = sort_key_tokens[pb];
    return ta != tb ? (ta < tb ? -1 : 1) : (pa < pb ? -1 : pa > pb);
}

static void sort_positions_by_token(int32_t *order, int N, const int32_t *tokens) {
    sort_key_tokens = tokens;
    qsort(order, (size_t)N, sizeof *order, compare_positions);
}

static __global__ void embedding_forward_kernel(bf16 *out, const int32_t *tokens, const bf16 *wte, int N, int C) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * C) return;
    size_t n = idx / C, c = idx % C;
    out[idx] = wte[(size_t)tokens[n] * C + c];
}

// One block per distinct token of the batch: its rows of dout are added in
// position order, so the result does not depend on scheduling (no atomics).
static __global__ void embedding_backward_kernel(float *dwte, const int32_t *unique_tokens, const int32_t *offsets,
                                                 const int32_t *positions, const bf16 *dout, int C) {
    int u = blockIdx.x, token = unique_tokens[u];
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float sum = 0.0f;
        for (int i = offsets[u]; i < offsets[u + 1]; i++) sum += __bfloat162float(dout[(size_t)positions[i] * C + c]);
        dwte[(size_t)token * C + c] += sum;
    }
}

extern "C" void mt_embedding_forward_cuda(const mt_backend *be, void *out, const int32_t *tokens, const void *wte,
                                          int N, int C) {
    (void)be;
    size_t n = (size_t)N * C;
    embedding_forward_kernel<<<grid_for(n, kThreads), kThreads, 0, mt_stream_of(be)>>>((bf16 *)out, tokens,
                                                                                       (const bf16 *)wte, N, C);
    CUDA_CHECK_LAUNCH();
}

extern "C" void mt_embedding_backward_cuda(const mt_backend *be, float *dwte, const int32_t *tokens, const void *dout,
                                           int N, int C) {
    // group the positions by token on the host (N is one batch: small), then
    // upload to the workspace: unique tokens (U), offsets (U + 1), positions (N)
    MT_CHECK(be->workspace_bytes >= (size_t)(3 * N + 1) * sizeof(int32_t), "embedding workspace too small");
    int32_t *host = (int32_t *)malloc((size_t)(4 * N + 1) * sizeof(int32_t));
    MT_CHECK(host != NULL, "embedding grouping buffer");
    int32_t *unique = host, *offsets = host + N, *order = host + 2 * N + 1, *tok = host + 3 * N + 1;
    CUDA_CHECK(cudaMemcpy(tok, tokens, (size_t)N * sizeof(int32_t), cudaMemcpyDeviceToHost));
    for (int i = 0; i < N; i++) order[i] = i;
    sort_positions_by_token(order, N, tok);
    int U = 0;
    for (int i = 0; i < N; i++)
        if (i == 0 || tok[order[i]] != tok[order[i - 1]]) unique[U] = tok[order[i]], offsets[U++] = i;
    offsets[U] = N;
    int32_t *dev = (int32_t *)be->workspace;
    CUDA_CHECK(cudaMemcpy(dev, unique, (size_t)U * sizeof(int32_t), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(dev + U, offsets, (size_t)(U + 1) * sizeof(int32_t), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(dev + 2 * U + 1, order, (size_t)N * sizeof(int32_t), cudaMemcpyHostToDevice));
    free(host);
    if (U == 0) return;
    embedding_backward_kernel<<<U, kThreads, 0, mt_stream_of(be)>>>(dwte, dev, dev + U, dev + 2 * U + 1,
                                                                    (const bf16 *)dout, C);
    CUDA_CHECK_LAUNCH();
}

// ------------------------------------------------------------------ rmsnorm

// As transformers: Llama normalises in fp32, casts to bf16, then scales by
// the weight; Gemma scales by (1 + w) in fp32 and casts once.
static __device__ float rms_scaled(float x, float r, float w, int plus_one) {
    return plus_one ? x * r * (1.0f + w) : __bfloat162float(__float2bfloat16(x * r)) * w;
}

// One warp per row, 8 columns a load where the row allows it. With `add`:
// sum = inp + add first (as add_kernel rounds it), each lane writing the
// columns it then reads back, and the norm of sum.
static __global__ void rmsnorm_forward_kernel(bf16 *out, float *rstd, const bf16 *inp, const bf16 *add, bf16 *sum,
                                              const bf16 *weight, int N, int C, float eps, int plus_one, int vector) {
    pdl_next();
    pdl_wait();
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (row >= N) return;
    const bf16 *x = inp + (size_t)row * C;
    bf16 *y = out + (size_t)row * C;
    if (add) {
        const bf16 *b = add + (size_t)row * C;
        bf16 *s = sum + (size_t)row * C;
        if (vector) {
            for (int c = lane * kVec; c < C; c += 32 * kVec) {
                float xv[kVec], bv[kVec];
                load8(xv, x + c), load8(bv, b + c);
                for (int j = 0; j < kVec; j++) xv[j] += bv[j];
                store8(s + c, xv);
            }
        } else {
            for (int c = lane; c < C; c += 32) s[c] = __float2bfloat16(__bfloat162float(x[c]) + __bfloat162float(b[c]));
        }
        x = s;
    }
    float ss = 0.0f;
    if (vector) {
        for (int c = lane * kVec; c < C; c += 32 * kVec) {
            float xv[kVec];
            load8(xv, x + c);
            for (int j = 0; j < kVec; j++) ss += xv[j] * xv[j];
        }
    } else {
        for (int c = lane; c < C; c += 32) ss += __bfloat162float(x[c]) * __bfloat162float(x[c]);
    }
    float r = rsqrtf(warp_sum(ss) / C + eps);
    if (lane == 0) rstd[row] = r;
    if (vector) {
        for (int c = lane * kVec; c < C; c += 32 * kVec) {
            float xv[kVec], wv[kVec];
            load8(xv, x + c), load8(wv, weight + c);
            for (int j = 0; j < kVec; j++) xv[j] = rms_scaled(xv[j], r, wv[j], plus_one);
            store8(y + c, xv);
        }
    } else {
        for (int c = lane; c < C; c += 32)
            y[c] = __float2bfloat16(rms_scaled(__bfloat162float(x[c]), r, __bfloat162float(weight[c]), plus_one));
    }
}

static const int kRmsRowsPerBlock = 32;  // rows per partial sum of the weight's gradient

// dx += the norm's backward, one warp per row (rows are independent; a
// block-wide reduction per row left the SMs waiting on memory). Each lane
// owns 8 columns in every 256; the row's dot product is summed in lane
// order (the same bits every run).
static __global__ void rmsnorm_backward_kernel(bf16 *dinp, const bf16 *dout, const bf16 *inp, const bf16 *weight,
                                               const float *rstd, int N, int C, float one, int vector) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (row >= N) return;
    const bf16 *x = inp + (size_t)row * C, *g = dout + (size_t)row * C;
    bf16 *dx = dinp + (size_t)row * C;
    float dot = 0.0f;
    if (vector) {
        for (int c = lane * kVec; c < C; c += 32 * kVec) {
            float xv[kVec], gv[kVec], wv[kVec];
            load8(xv, x + c), load8(gv, g + c), load8(wv, weight + c);
            for (int j = 0; j < kVec; j++) dot += gv[j] * (one + wv[j]) * xv[j];
        }
    } else {
        for (int c = lane; c < C; c += 32)
            dot += __bfloat162float(g[c]) * (one + __bfloat162float(weight[c])) * __bfloat162float(x[c]);
    }
    dot = warp_sum(dot);
    float r = rstd[row], k = dot * r * r * r / C;
    if (vector) {
        for (int c = lane * kVec; c < C; c += 32 * kVec) {
            float xv[kVec], gv[kVec], wv[kVec], d[kVec];
            load8(xv, x + c), load8(gv, g + c), load8(wv, weight + c), load8(d, dx + c);
            for (int j = 0; j < kVec; j++) d[j] += r * (one + wv[j]) * gv[j] - k * xv[j];
            store8(dx + c, d);
        }
    } else {
        for (int c = lane; c < C; c += 32) {
            float gv = __bfloat162float(g[c]), xv = __bfloat162float(x[c]);
            dx[c] = __float2bfloat16(__bfloat162float(dx[c]) + r * (one + __bfloat162float(weight[c])) * gv - k * xv);
        }
    }
}

// The weight's gradient over a chunk of kRmsRowsPerBlock rows per block row:
// partials[chunk][c] = sum over the chunk's rows of dout * x * rstd, a thread
// per column (reads along a row are coalesced).
static __global__ void rmsnorm_dweight_kernel(float *partials, const bf16 *dout, const bf16 *inp, const float *rstd,
                                              int N, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    int row_end = min(N, (int)(blockIdx.y + 1) * kRmsRowsPerBlock);
    float sum = 0.0f;
    for (int row = blockIdx.y * kRmsRowsPerBlock; row < row_end; row++)
        sum += __bfloat162float(dout[(size_t)row * C + c]) * __bfloat162float(inp[(size_t)row * C + c]) * rstd[row];
    partials[(size_t)blockIdx.y * C + c] = sum;
}

// dweight[c] += the blocks' partials, added in block order (deterministic).
static __global__ void sum_partials_kernel(float *dweight, const float *partials, int blocks, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float sum = 0.0f;
    for (int i = 0; i < blocks; i++) sum += partials[(size_t)i * C + c];
    dweight[c] += sum;
}

extern "C" void mt_rmsnorm_forward_cuda(const mt_backend *be, void *out, float *rstd, const void *inp,
                                        const void *weight, int N, int C, float eps, int plus_one) {
    mt_add_rmsnorm_forward_cuda(be, NULL, out, rstd, inp, NULL, weight, N, C, eps, plus_one);
}

extern "C" void mt_add_rmsnorm_forward_cuda(const mt_backend *be, void *sum, void *out, float *rstd, const void *a,
                                            const void *b, const void *weight, int N, int C, float eps, int plus_one) {
    int vector = C % kVec == 0 && vec8(out, a, weight) && vec8(b, sum);
    launch_pdl(be, rmsnorm_forward_kernel, dim3(grid_for((size_t)N, kThreads / 32)), dim3(kThreads), (bf16 *)out, rstd,
               (const bf16 *)a, (const bf16 *)b, (bf16 *)sum, (const bf16 *)weight, N, C, eps, plus_one, vector);
}

extern "C" void mt_rmsnorm_backward_cuda(const mt_backend *be, void *dinp, float *dweight, const void *dout,
                                         const void *inp, const void *weight, const float *rstd, int N, int C,
                                         int plus_one) {
    int vector = C % kVec == 0 && vec8(dinp, dout, inp, weight);
    rmsnorm_backward_kernel<<<grid_for((size_t)N, kThreads / 32), kThreads, 0, mt_stream_of(be)>>>(
        (bf16 *)dinp, (const bf16 *)dout, (const bf16 *)inp, (const bf16 *)weight, rstd, N, C, plus_one ? 1.0f : 0.0f,
        vector);
    CUDA_CHECK_LAUNCH();
    if (!dweight) return;  // a frozen norm
    unsigned chunks = grid_for((size_t)N, kRmsRowsPerBlock);
    MT_CHECK(be->workspace_bytes >= (size_t)chunks * C * sizeof(float), "rmsnorm workspace too small");
    float *partials = (float *)be->workspace;
    rmsnorm_dweight_kernel<<<dim3(grid_for((size_t)C, kThreads), chunks), kThreads, 0, mt_stream_of(be)>>>(
        partials, (const bf16 *)dout, (const bf16 *)inp, rstd, N, C);
    CUDA_CHECK_LAUNCH();
    sum_partials_kernel<<<grid_for((size_t)C, kThreads), kThreads, 0, mt_stream_of(be)>>>(dweight, partials,
                                                                                          (int)chunks, C);
    CUDA_CHECK_LAUNCH();
}

// --------------------------------------------------------------------- rope

// One thread per (b, t, h, i) with i < D/2 (rotate) or i < D (permute only).
static __global__ void rope_kernel(bf16 *dst, const bf16 *src, const float *cos_table, const float *sin_table,
                                   const int32_t *pos, int B, int T, int H, int D, int rotate, int backward) {
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
        if (backward)
            dst[bthd + i] = src[bhtd + i];
        else
            dst[bhtd + i] = src[bthd + i];
        return;
    }
    int half = D / 2;
    size_t row = (size_t)(pos ? pos[(size_t)b * T + t] : t) * half;
    float c = cos_table[row + i], s = sin_table[row + i];
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

// The same, 8 consecutive i a thread (16-byte loads): width and D/2 are
// multiples of 8 and the pointers aligned.
static __device__ __forceinline__ void rope8_item(bf16 *dst, const bf16 *src, const float *cos_table,
                                                  const float *sin_table, const int32_t *pos, size_t idx, int B, int T,
                                                  int H, int D, int rotate, int backward) {
    int width = rotate ? D / 2 : D;
    if (idx >= (size_t)B * T * H * (width / kVec)) return;
    int i = (int)(idx % (width / kVec)) * kVec;
    size_t rest = idx / (width / kVec);
    int h = rest % H;
    rest /= H;
    int t = rest % T;
    int b = rest / T;
    size_t bthd = (((size_t)b * T + t) * H + h) * D, bhtd = (((size_t)b * H + h) * T + t) * D;
    size_t from = backward ? bhtd : bthd, to = backward ? bthd : bhtd;
    if (!rotate) {
        *(uint4 *)(dst + to + i) = *(const uint4 *)(src + from + i);
        return;
    }
    int half = D / 2;
    size_t row = (size_t)(pos ? pos[(size_t)b * T + t] : t) * half;
    float x1[kVec], x2[kVec], y1[kVec], y2[kVec];
    load8(x1, src + from + i), load8(x2, src + from + i + half);
    for (int j = 0; j < kVec; j++) {
        float c = cos_table[row + i + j], sn = backward ? -sin_table[row + i + j] : sin_table[row + i + j];
        y1[j] = x1[j] * c - x2[j] * sn;
        y2[j] = x2[j] * c + x1[j] * sn;
    }
    store8(dst + to + i, y1), store8(dst + to + i + half, y2);
}

static __global__ void rope8_kernel(bf16 *dst, const bf16 *src, const float *cos_table, const float *sin_table,
                                    const int32_t *pos, int B, int T, int H, int D, int rotate, int backward) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    rope8_item(dst, src, cos_table, sin_table, pos, idx, B, T, H, D, rotate, backward);
}

// Up to MT_MAX_ROPE_PARTS passes of rope8_kernel in one launch: part k takes
// the threads first[k] .. first[k + 1] - 1.
struct rope_parts {
    bf16 *dst[MT_MAX_ROPE_PARTS];
    const bf16 *src[MT_MAX_ROPE_PARTS];
    int H[MT_MAX_ROPE_PARTS], rotate[MT_MAX_ROPE_PARTS];
    size_t first[MT_MAX_ROPE_PARTS + 1];
};

static __global__ void rope8_parts_kernel(rope_parts p, const float *cos_table, const float *sin_table,
                                          const int32_t *pos, int B, int T, int D, int backward) {
    static_assert(MT_MAX_ROPE_PARTS == 3, "the parts are read with constant indices");
    pdl_next();
    pdl_wait();
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= p.first[3]) return;
    int k = (idx >= p.first[1]) + (idx >= p.first[2]);
    // constant indices: a runtime index into a kernel parameter would copy it to local memory
    bf16 *dst = k == 0 ? p.dst[0] : k == 1 ? p.dst[1] : p.dst[2];
    const bf16 *src = k == 0 ? p.src[0] : k == 1 ? p.src[1] : p.src[2];
    int H = k == 0   ? p.H[0]
            : k == 1 ? p.H[1]
                     : p.H[2],
        rotate = k == 0   ? p.rotate[0]
                 : k == 1 ? p.rotate[1]
                          : p.rotate[2];
    size_t first = k == 0 ? p.first[0] : k == 1 ? p.first[1] : p.first[2];
    rope8_item(dst, src, cos_table, sin_table, pos, idx - first, B, T, H, D, rotate, backward);
}

static void rope_launch(const mt_backend *be, void *dst, const void *src, const float *cos_table,
                        const float *sin_table, const int32_t *pos, int B, int T, int H, int D, int rotate,
                        int backward) {
    int width = rotate ? D / 2 : D;
    size_t n = (size_t)B * T * H * width;
    if (width % kVec == 0 && vec8(dst, src)) {
        rope8_kernel<<<grid_for(n / kVec, kThreads), kThreads, 0, mt_stream_of(be)>>>(
            (bf16 *)dst, (const bf16 *)src, cos_table, sin_table, pos, B, T, H, D, rotate, backward);
    } else {
        rope_kernel<<<grid_for(n, kThreads), kThreads, 0, mt_stream_of(be)>>>(
            (bf16 *)dst, (const bf16 *)src, cos_table, sin_table, pos, B, T, H, D, rotate, backward);
    }
    CUDA_CHECK_LAUNCH();
}

extern "C" void mt_rope_forward_many_cuda(const mt_backend *be, const mt_rope_part *parts, int count,
                                          const float *cos_table, const float *sin_table, const int32_t *pos, int B,
                                          int T, int D) {
    rope_parts p = {};
    size_t threads = 0;
    int together = 1;
    for (int k = 0; k < MT_MAX_ROPE_PARTS; k++) {
        p.first[k] = threads;
        if (k >= count) continue;
        int width = parts[k].rotate ? D / 2 : D;
        together &= width % kVec == 0 && vec8(parts[k].dst, parts[k].src);
        p.dst[k] = (bf16 *)parts[k].dst, p.src[k] = (const bf16 *)parts[k].src;
        p.H[k] = parts[k].H, p.rotate[k] = parts[k].rotate;
        threads += (size_t)B * T * parts[k].H * (width / kVec);
    }
    p.first[MT_MAX_ROPE_PARTS] = threads;
    if (!together) {
        for (int k = 0; k < count; k++)
            rope_launch(be, parts[k].dst, parts[k].src, cos_table, sin_table, pos, B, T, parts[k].H, D, parts[k].rotate,
                        0);
        return;
    }
    if (threads == 0) return;
    launch_pdl(be, rope8_parts_kernel, dim3(grid_for(threads, kThreads)), dim3(kThreads), p, cos_table, sin_table, pos,
               B, T, D, 0);
}

extern "C" void mt_rope_forward_cuda(const mt_backend *be, void *out, const void *inp, const float *cos_table,
                                     const float *sin_table, const int32_t *pos, int B, int T, int H, int D,
                                     int rotate) {
    rope_launch(be, out, inp, cos_table, sin_table, pos, B, T, H, D, rotate, 0);
}

extern "C" void mt_rope_backward_cuda(const mt_backend *be, void *dinp, const void *dout, const float *cos_table,
                                      const float *sin_table, const int32_t *pos, int B, int T, int H, int D,
                                      int rotate) {
    rope_launch(be, dinp, dout, cos_table, sin_table, pos, B, T, H, D, rotate, 1);
}

// ---------------------------------------------------------------- attention
//
// Fused causal attention in the manner of FlashAttention-2 (Dao, 2023):
// scores live only in shared memory, a tile of 64 queries x 64 keys at a
// time, with the online softmax; forward saves the log-sum-exp per row.
// Backward is two kernels so that nothing needs atomics: one per key block
// accumulates dK and dV over every query block and every query head of the
// kv group (grouped-query attention sums there), one per query block
// accumulates dQ. Matrix products use the tensor cores through WMMA
// (bf16 in, fp32 accumulate). Head dims 16, 32, 64, 80, 96 and 128 are compiled.

using namespace nvcuda;

static const int kTile = 64;          // queries and keys per tile
static const int kAttnThreads = 128;  // 4 warps, 16 rows each
// Shared-memory row strides, padded so that rows start in different banks
// (an unpadded 128-byte row puts every row of a tile in the same bank).
static const int kLdS = kTile + 4;  // fp32 score rows
static const int kLdP = kTile + 8;  // bf16 probability rows
template <int D>
struct attn_ld {
    static const int tile = D + 8;  // bf16 q/k/v/dO rows
    static const int out = D + 4;   // fp32 output accumulator rows
};

typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> frag_a_row;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> frag_b_row;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> frag_b_col;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> frag_acc;

static __device__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Loads kTile rows x D of a tile starting at row r0 (zero past T); row r of
// the source is at src + r * stride.
template <int D>
static __device__ void load_tile(bf16 *dst, const bf16 *src, size_t stride, int r0, int T) {
    const int vecs = D / 8;  // 16-byte vectors per row
    for (int i = threadIdx.x; i < kTile * vecs; i += blockDim.x) {
        int r = i / vecs, c = (i % vecs) * 8;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (r0 + r < T) val = *reinterpret_cast<const uint4 *>(src + (size_t)(r0 + r) * stride + c);
        *reinterpret_cast<uint4 *>(dst + r * attn_ld<D>::tile + c) = val;
    }
}

// S (16 x 64, fp32 at s, ld kLdS) = A (16 x D at a) times B^T, B 64 x D at b.
template <int D>
static __device__ void mma_abt_store(float *s, const bf16 *a, const bf16 *b) {
    const int ld = attn_ld<D>::tile;
    frag_acc acc[4];
    frag_a_row fa;
    frag_b_col fb;
#pragma unroll
    for (int j = 0; j < 4; j++) wmma::fill_fragment(acc[j], 0.0f);
#pragma unroll
    for (int kk = 0; kk < D; kk += 16) {
        wmma::load_matrix_sync(fa, a + kk, ld);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            wmma::load_matrix_sync(fb, b + j * 16 * ld + kk, ld);
            wmma::mma_sync(acc[j], fa, fb, acc[j]);
        }
    }
#pragma unroll
    for (int j = 0; j < 4; j++) wmma::store_matrix_sync(s + j * 16, acc[j], kLdS, wmma::mem_row_major);
    __syncwarp();
}

// acc[dj] (16 x D in 16-column blocks) += P (16 x 64 bf16 at p, ld kLdP)
// times M (64 x D at m).
template <int D>
static __device__ void mma_pm(frag_acc *acc, const bf16 *p, const bf16 *m) {
    const int ld = attn_ld<D>::tile;
    frag_a_row fa;
    frag_b_row fb;
#pragma unroll
    for (int kk = 0; kk < kTile; kk += 16) {
        wmma::load_matrix_sync(fa, p + kk, kLdP);
#pragma unroll
        for (int dj = 0; dj < D / 16; dj++) {
            wmma::load_matrix_sync(fb, m + kk * ld + dj * 16, ld);
            wmma::mma_sync(acc[dj], fa, fb, acc[dj]);
        }
    }
}

// Writes a warp's 16 x D fp32 accumulators as bf16 rows dst + r * stride
// (rows at or past `limit` skipped), staging 64 columns at a time.
template <int D>
static __device__ void store_rows(bf16 *dst, size_t stride, int limit, frag_acc *acc, float *stage) {
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int d0 = 0; d0 < D; d0 += 64) {
        const int width = D - d0 < 64 ? D - d0 : 64;  // head dims 80 and 96 end in a narrower block
#pragma unroll
        for (int j = 0; j < width / 16; j++)
            wmma::store_matrix_sync(stage + j * 16, acc[d0 / 16 + j], kLdS, wmma::mem_row_major);
        __syncwarp();
        for (int r = 0; r < 16 && r < limit; r++)
            for (int c = lane; c < width; c += 32)
                dst[(size_t)r * stride + d0 + c] = __float2bfloat16(stage[r * kLdS + c]);
        __syncwarp();
    }
}

template <int D>
struct attn_forward_smem {
    static const size_t bytes = 3 * kTile * attn_ld<D>::tile * sizeof(bf16) + 4 * 16 * kLdS * sizeof(float) +
                                4 * 16 * kLdP * sizeof(bf16) + 4 * 16 * attn_ld<D>::out * sizeof(float);
};

// The first key query qi sees: its window's start (window is T without one)
// and, with packed documents (prow: the row's positions), its document's start.
static __device__ __forceinline__ int first_key(const int32_t *prow, int qi, int T, int window) {
    int lo = qi - window + 1;
    if (prow && qi < T && qi - prow[qi] > lo) lo = qi - prow[qi];
    return lo > 0 ? lo : 0;
}

// One block per (query tile, head, batch). Each warp owns 16 query rows; in
// the row-wise softmax a lane takes columns lane and lane + 32 of every row.
template <int D>
static __global__ void __launch_bounds__(kAttnThreads)
    flash_forward_kernel(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v, const int32_t *pos, int T,
                         int H, int KV, int window, float scale) {
    const int ldt = attn_ld<D>::tile, ldo = attn_ld<D>::out;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16 *sQ = (bf16 *)smem, *sK = sQ + kTile * ldt, *sV = sK + kTile * ldt;
    float *sS = (float *)(sV + kTile * ldt);
    bf16 *sP = (bf16 *)(sS + 4 * 16 * kLdS);
    float *sO = (float *)(sP + 4 * 16 * kLdP);
    // the last query tile has the most work: schedule it first
    int qb = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z, kv = h / (H / KV);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int q0 = qb * kTile + warp * 16;  // this warp's first query
    const bf16 *kbase = k + (size_t)(b * KV + kv) * T * D, *vbase = v + (size_t)(b * KV + kv) * T * D;
    load_tile<D>(sQ, q + (size_t)(b * H + h) * T * D, D, qb * kTile, T);
    float *sSw = sS + warp * 16 * kLdS, *sOw = sO + warp * 16 * ldo;
    bf16 *sPw = sP + warp * 16 * kLdP;
    for (int i = lane; i < 16 * ldo; i += 32) sOw[i] = 0.0f;
    float m_row[16], l_row[16];
    int lo_row[16];  // the first key each row sees
    const int32_t *prow = pos ? pos + (size_t)b * T : NULL;
#pragma unroll
    for (int r = 0; r < 16; r++) {
        m_row[r] = -INFINITY, l_row[r] = 0.0f;
        lo_row[r] = first_key(prow, q0 + r, T, window);
    }
    int kb0 = first_key(prow, qb * kTile, T, window) / kTile;  // the first key tile any query of this tile sees
    for (int kb = kb0; kb <= qb; kb++) {
        __syncthreads();
        load_tile<D>(sK, kbase, D, kb * kTile, T);
        load_tile<D>(sV, vbase, D, kb * kTile, T);
        __syncthreads();
        mma_abt_store<D>(sSw, sQ + warp * 16 * ldt, sK);
        int key0 = kb * kTile + lane, key1 = key0 + 32;
#pragma unroll
        for (int r = 0; r < 16; r++) {
            int qi = q0 + r;
            float s0 = (key0 <= qi && key0 >= lo_row[r] && key0 < T) ? sSw[r * kLdS + lane] * scale : -INFINITY;
            float s1 = (key1 <= qi && key1 >= lo_row[r] && key1 < T) ? sSw[r * kLdS + lane + 32] * scale : -INFINITY;
            float m_new = fmaxf(m_row[r], warp_max(fmaxf(s0, s1)));
            float p0 = s0 == -INFINITY ? 0.0f : __expf(s0 - m_new), p1 = s1 == -INFINITY ? 0.0f : __expf(s1 - m_new);
            float alpha = m_row[r] == -INFINITY ? 0.0f : __expf(m_row[r] - m_new);
            sPw[r * kLdP + lane] = __float2bfloat16(p0);
            sPw[r * kLdP + lane + 32] = __float2bfloat16(p1);
            l_row[r] = l_row[r] * alpha + warp_sum(p0 + p1);
            m_row[r] = m_new;
            for (int c = lane; c < D; c += 32) sOw[r * ldo + c] *= alpha;
        }
        __syncwarp();
        frag_acc o[D / 16];
#pragma unroll
        for (int dj = 0; dj < D / 16; dj++) wmma::load_matrix_sync(o[dj], sOw + dj * 16, ldo, wmma::mem_row_major);
        mma_pm<D>(o, sPw, sV);
#pragma unroll
        for (int dj = 0; dj < D / 16; dj++) wmma::store_matrix_sync(sOw + dj * 16, o[dj], ldo, wmma::mem_row_major);
        __syncwarp();
    }
#pragma unroll
    for (int r = 0; r < 16; r++) {
        int qi = q0 + r;
        if (qi >= T) break;
        float inv = 1.0f / l_row[r];
        bf16 *dst = out + (((size_t)b * T + qi) * H + h) * D;
        for (int c = lane; c < D; c += 32) dst[c] = __float2bfloat16(sOw[r * ldo + c] * inv);
        if (lane == 0) lse[((size_t)b * H + h) * T + qi] = m_row[r] + logf(l_row[r]);
    }
}

// delta[b,h,t] = sum_d dO * O (rows of the (B, T, H, D) layout), one warp per row.
static __global__ void attention_delta_kernel(float *delta, const bf16 *dout, const bf16 *out, int B, int T, int H,
                                              int D) {
    size_t row = (size_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    if (row >= (size_t)B * T * H) return;
    int lane = threadIdx.x & 31;
    const bf16 *g = dout + row * D, *o = out + row * D;
    float s = 0.0f;
    for (int d = lane; d < D; d += 32) s += __bfloat162float(g[d]) * __bfloat162float(o[d]);
    s = warp_sum(s);
    size_t h = row % H, bt = row / H, t = bt % T, b = bt / T;
    if (lane == 0) delta[(b * H + h) * T + t] = s;
}

template <int D>
struct attn_backward_smem {
    static const size_t bytes =
        4 * kTile * attn_ld<D>::tile * sizeof(bf16) + 4 * 16 * kLdS * sizeof(float) + 2 * 4 * 16 * kLdP * sizeof(bf16);
};

// One block per (key tile, query head, batch): that head's share of dK and
// dV over every query tile at or after the diagonal, in fp32 (B, H, T_pad, D);
// group_sum_kernel then adds the heads of each kv group. Each warp owns 16
// key rows; a lane takes query columns lane and lane + 32.
template <int D>
static __global__ void __launch_bounds__(kAttnThreads, D <= 64 ? 3 : 1)
    flash_backward_kv_kernel(float *dk_part, float *dv_part, const bf16 *dout, const bf16 *q, const bf16 *k,
                             const bf16 *v, const float *lse, const float *delta, const int32_t *pos, int T, int H,
                             int KV, int window, float scale) {
    const int ldt = attn_ld<D>::tile;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16 *sK = (bf16 *)smem, *sV = sK + kTile * ldt, *sQ = sV + kTile * ldt, *sG = sQ + kTile * ldt;
    float *sS = (float *)(sG + kTile * ldt);
    bf16 *sP = (bf16 *)(sS + 4 * 16 * kLdS), *sDS = sP + 4 * 16 * kLdP;
    // key tile 0 has the most work and comes first
    int nq = (T + kTile - 1) / kTile, kb = blockIdx.x, h = blockIdx.y, b = blockIdx.z, kv = h / (H / KV);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int k0 = kb * kTile + warp * 16;  // this warp's first key
    load_tile<D>(sK, k + (size_t)(b * KV + kv) * T * D, D, kb * kTile, T);
    load_tile<D>(sV, v + (size_t)(b * KV + kv) * T * D, D, kb * kTile, T);
    float *sSw = sS + warp * 16 * kLdS;
    bf16 *sPw = sP + warp * 16 * kLdP, *sDSw = sDS + warp * 16 * kLdP;
    frag_acc dk_acc[D / 16], dv_acc[D / 16];
#pragma unroll
    for (int dj = 0; dj < D / 16; dj++) wmma::fill_fragment(dk_acc[dj], 0.0f), wmma::fill_fragment(dv_acc[dj], 0.0f);
    const float *lse_h = lse + ((size_t)b * H + h) * T, *delta_h = delta + ((size_t)b * H + h) * T;
    // the last query tile that sees a key of this tile
    long last = (long)kb * kTile + kTile - 1 + window - 1;
    int qb1 = last / kTile < nq - 1 ? (int)(last / kTile) : nq - 1;
    const int32_t *prow = pos ? pos + (size_t)b * T : NULL;
    for (int qb = kb; qb <= qb1; qb++) {
        // documents: once a query tile's first query starts past this key tile, so do all later ones
        if (prow && first_key(prow, qb * kTile, T, T) > kb * kTile + kTile - 1) break;
        __syncthreads();
        load_tile<D>(sQ, q + (size_t)(b * H + h) * T * D, D, qb * kTile, T);
        load_tile<D>(sG, dout + ((size_t)b * T * H + h) * D, (size_t)H * D, qb * kTile, T);
        __syncthreads();
        int qi0 = qb * kTile + lane, qi1 = qi0 + 32;
        float lse0 = qi0 < T ? lse_h[qi0] : 0.0f, lse1 = qi1 < T ? lse_h[qi1] : 0.0f;
        float delta0 = qi0 < T ? delta_h[qi0] : 0.0f, delta1 = qi1 < T ? delta_h[qi1] : 0.0f;
        int lo0 = first_key(prow, qi0, T, window), lo1 = first_key(prow, qi1, T, window);
        mma_abt_store<D>(sSw, sK + warp * 16 * ldt, sQ);  // S^T (16 keys x 64 queries) = K_w Q^T
#pragma unroll
        for (int r = 0; r < 16; r++) {
            int key = k0 + r;
            bool see0 = qi0 >= key && key >= lo0 && qi0 < T && key < T;
            bool see1 = qi1 >= key && key >= lo1 && qi1 < T && key < T;
            float p0 = see0 ? __expf(sSw[r * kLdS + lane] * scale - lse0) : 0.0f;
            float p1 = see1 ? __expf(sSw[r * kLdS + lane + 32] * scale - lse1) : 0.0f;
            sPw[r * kLdP + lane] = __float2bfloat16(p0);
            sPw[r * kLdP + lane + 32] = __float2bfloat16(p1);
        }
        __syncwarp();
        mma_pm<D>(dv_acc, sPw, sG);                       // dV += P^T dO
        mma_abt_store<D>(sSw, sV + warp * 16 * ldt, sG);  // dP^T = V_w dO^T
        // dS from the bf16 P kept in shared memory (dS is rounded to bf16 anyway);
        // holding P in registers across the two products costs occupancy
#pragma unroll
        for (int r = 0; r < 16; r++) {
            float p0 = __bfloat162float(sPw[r * kLdP + lane]), p1 = __bfloat162float(sPw[r * kLdP + lane + 32]);
            sDSw[r * kLdP + lane] = __float2bfloat16(p0 * (sSw[r * kLdS + lane] - delta0) * scale);
            sDSw[r * kLdP + lane + 32] = __float2bfloat16(p1 * (sSw[r * kLdS + lane + 32] - delta1) * scale);
        }
        __syncwarp();
        mma_pm<D>(dk_acc, sDSw, sQ);  // dK += dS^T Q
    }
    if (k0 >= T) return;
    int T_pad = nq * kTile;
    size_t base = ((size_t)(b * H + h) * T_pad + k0) * D;
    // rows past T hold zeros (their P is 0); the partial buffer has room for whole tiles
    for (int dj = 0; dj < D / 16; dj++) {
        wmma::store_matrix_sync(dk_part + base + dj * 16, dk_acc[dj], D, wmma::mem_row_major);
        wmma::store_matrix_sync(dv_part + base + dj * 16, dv_acc[dj], D, wmma::mem_row_major);
    }
}

// dk (B, KV, T, D) bf16 = sum over the G heads of each group of the partials (B, H, T_pad, D).
static __global__ void group_sum_kernel(bf16 *dst, const float *part, int B, int KV, int G, int T, int T_pad, int D) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)B * KV * T * D) return;
    size_t d = i % D, rest = i / D, t = rest % T, bk = rest / T;  // bk = b * KV + kv
    const float *src = part + ((bk * G) * T_pad + t) * D + d;
    float sum = 0.0f;
    for (int g = 0; g < G; g++) sum += src[(size_t)g * T_pad * D];
    dst[i] = __float2bfloat16(sum);
}

template <int D>
struct attn_backward_q_smem {
    static const size_t bytes =
        4 * kTile * attn_ld<D>::tile * sizeof(bf16) + 4 * 16 * kLdS * sizeof(float) + 4 * 16 * kLdP * sizeof(bf16);
};

// One block per (query tile, head, batch): dQ over the key tiles up to the
// diagonal. Each warp owns 16 query rows; a lane takes key columns lane and
// lane + 32.
template <int D>
static __global__ void __launch_bounds__(kAttnThreads)
    flash_backward_q_kernel(bf16 *dq, const bf16 *dout, const bf16 *q, const bf16 *k, const bf16 *v, const float *lse,
                            const float *delta, const int32_t *pos, int T, int H, int KV, int window, float scale) {
    const int ldt = attn_ld<D>::tile;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16 *sQ = (bf16 *)smem, *sG = sQ + kTile * ldt, *sK = sG + kTile * ldt, *sV = sK + kTile * ldt;
    float *sS = (float *)(sV + kTile * ldt);
    bf16 *sDS = (bf16 *)(sS + 4 * 16 * kLdS);
    int qb = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z, kv = h / (H / KV);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int q0 = qb * kTile + warp * 16;
    load_tile<D>(sQ, q + (size_t)(b * H + h) * T * D, D, qb * kTile, T);
    load_tile<D>(sG, dout + ((size_t)b * T * H + h) * D, (size_t)H * D, qb * kTile, T);
    float row_lse[16], row_delta[16];
    int lo_row[16];  // the first key each row sees
    const int32_t *prow = pos ? pos + (size_t)b * T : NULL;
#pragma unroll
    for (int r = 0; r < 16; r++) {
        int qi = q0 + r;
        row_lse[r] = qi < T ? lse[((size_t)b * H + h) * T + qi] : 0.0f;
        row_delta[r] = qi < T ? delta[((size_t)b * H + h) * T + qi] : 0.0f;
        lo_row[r] = first_key(prow, qi, T, window);
    }
    float *sSw = sS + warp * 16 * kLdS;
    bf16 *sDSw = sDS + warp * 16 * kLdP;
    const bf16 *kbase = k + (size_t)(b * KV + kv) * T * D, *vbase = v + (size_t)(b * KV + kv) * T * D;
    frag_acc dq_acc[D / 16];
#pragma unroll
    for (int dj = 0; dj < D / 16; dj++) wmma::fill_fragment(dq_acc[dj], 0.0f);
    int kb0 = first_key(prow, qb * kTile, T, window) / kTile;
    for (int kb = kb0; kb <= qb; kb++) {
        __syncthreads();
        load_tile<D>(sK, kbase, D, kb * kTile, T);
        load_tile<D>(sV, vbase, D, kb * kTile, T);
        __syncthreads();
        mma_abt_store<D>(sSw, sQ + warp * 16 * ldt, sK);  // S = Q K^T
        int key0 = kb * kTile + lane, key1 = key0 + 32;
        // P is parked (bf16) where dS will go, each lane reading back what it wrote
#pragma unroll
        for (int r = 0; r < 16; r++) {
            int qi = q0 + r;
            bool see0 = key0 <= qi && key0 >= lo_row[r] && key0 < T;
            bool see1 = key1 <= qi && key1 >= lo_row[r] && key1 < T;
            float p0 = see0 ? __expf(sSw[r * kLdS + lane] * scale - row_lse[r]) : 0.0f;
            float p1 = see1 ? __expf(sSw[r * kLdS + lane + 32] * scale - row_lse[r]) : 0.0f;
            sDSw[r * kLdP + lane] = __float2bfloat16(p0);
            sDSw[r * kLdP + lane + 32] = __float2bfloat16(p1);
        }
        __syncwarp();
        mma_abt_store<D>(sSw, sG + warp * 16 * ldt, sV);  // dP = dO V^T
#pragma unroll
        for (int r = 0; r < 16; r++) {
            float p0 = __bfloat162float(sDSw[r * kLdP + lane]), p1 = __bfloat162float(sDSw[r * kLdP + lane + 32]);
            sDSw[r * kLdP + lane] = __float2bfloat16(p0 * (sSw[r * kLdS + lane] - row_delta[r]) * scale);
            sDSw[r * kLdP + lane + 32] = __float2bfloat16(p1 * (sSw[r * kLdS + lane + 32] - row_delta[r]) * scale);
        }
        __syncwarp();
        mma_pm<D>(dq_acc, sDSw, sK);  // dQ += dS K
    }
    store_rows<D>(dq + ((size_t)(b * H + h) * T + q0) * D, D, T - q0, dq_acc, sSw);
}

extern "C" size_t mt_norm_embedding_workspace_bytes_cuda(int N, int C) {
    static_assert(kRmsRowsPerBlock == 32, "mt_norm_embedding_workspace_bytes_gpu counts 32-row blocks");
    return mt_norm_embedding_workspace_bytes_gpu(N, C);
}

// memtune's own kernel: the head dims it is compiled for
static int own_kernel_supports(int D) { return D == 16 || D == 32 || D == 64 || D == 80 || D == 96 || D == 128; }

// cuDNN's fused attention runs a shape when the backend has cuDNN and the
// library builds both graphs for it (workspace: what they need).
static int cudnn_serves(mt_backend *be, const mt_attention_shape *s, size_t *workspace) {
    return !s->docs && be->cudnn && mt_cudnn_attention_prepare(be->cudnn, s, workspace);
}

extern "C" int mt_attention_supports_cuda(mt_backend *be, const mt_attention_shape *s) {
    return s->KV > 0 && s->H % s->KV == 0 && (cudnn_serves(be, s, NULL) || own_kernel_supports(s->D));
}

extern "C" void mt_attention_describe_cuda(mt_backend *be, const mt_attention_shape *s, char *buf, size_t len) {
    if (cudnn_serves(be, s, NULL))
        snprintf(buf, len, "%s fused attention (%s backward)", mt_cudnn_describe(be->cudnn),
                 s->nondeterministic ? "non-deterministic: model.deterministic_attention false" : "deterministic");
    else if (be->cudnn && s->docs)
        snprintf(buf, len, "memtune's kernel (packed-document masks do not go through %s yet)",
                 mt_cudnn_describe(be->cudnn));
    else if (be->cudnn)
        snprintf(buf, len, "memtune's kernel (%s does not serve this shape)", mt_cudnn_describe(be->cudnn));
    else
        snprintf(buf, len, "memtune's kernel (%s)", be->attention_note);
}

extern "C" size_t mt_attention_workspace_bytes_cuda(mt_backend *be, const mt_attention_shape *s) {
    size_t workspace = 0;
    if (cudnn_serves(be, s, &workspace)) return workspace;
    static_assert(kTile == 64, "mt_attention_own_workspace_bytes counts 64-query tiles");
    return mt_attention_own_workspace_bytes(s);
}

// A backend that holds only cuDNN's handle on `device`, opened on the first
// forecast and kept for the process: it builds the graphs a run would.
extern "C" size_t mt_attention_planned_workspace_bytes_cuda(int device, const mt_attention_shape *s, int *cudnn) {
    static mt_backend probe;
    static int probe_device = -1;
    if (probe_device != device) {
        mt_cudnn_free(probe.cudnn);
        memset(&probe, 0, sizeof probe);
        probe.gpu = 1, probe.device = device;
        if (cudaSetDevice(device) == cudaSuccess)
            probe.cudnn = mt_cudnn_open(probe.attention_note, sizeof probe.attention_note);
        else
            cudaGetLastError();
        probe_device = device;
    }
    size_t workspace = 0;
    *cudnn = cudnn_serves(&probe, s, &workspace);
    return *cudnn ? workspace : mt_attention_own_workspace_bytes(s);
}

// The scores' scale: the shape's, or 1/sqrt(D).
static float attention_scale(const mt_attention_shape *s) {
    return s->scale != 0.0f ? s->scale : 1.0f / sqrtf((float)s->D);
}

// a window of 0 (none) as the kernels take it: every key up to the query
static int kernel_window(const mt_attention_shape *s) { return s->window > 0 ? s->window : s->T; }

template <int D>
static void attention_forward_launch(const mt_backend *be, const mt_attention_shape *s, void *out, float *lse,
                                     const void *q, const void *k, const void *v, const int32_t *pos) {
    size_t smem = attn_forward_smem<D>::bytes;
    CUDA_CHECK(cudaFuncSetAttribute(flash_forward_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    dim3 grid((s->T + kTile - 1) / kTile, s->H, s->B);
    flash_forward_kernel<D><<<grid, kAttnThreads, smem, mt_stream_of(be)>>>(
        (bf16 *)out, lse, (const bf16 *)q, (const bf16 *)k, (const bf16 *)v, pos, s->T, s->H, s->KV, kernel_window(s),
        attention_scale(s));
    CUDA_CHECK_LAUNCH();
}

template <int D>
static void attention_backward_launch(const mt_backend *be, const mt_attention_shape *s, void *dq, void *dk, void *dv,
                                      const void *dout, const void *q, const void *k, const void *v, const float *lse,
                                      const float *delta, const int32_t *pos, float *dk_part, float *dv_part) {
    int B = s->B, T = s->T, H = s->H, KV = s->KV, window = kernel_window(s);
    float scale = attention_scale(s);
    size_t smem_kv = attn_backward_smem<D>::bytes, smem_q = attn_backward_q_smem<D>::bytes;
    CUDA_CHECK(
        cudaFuncSetAttribute(flash_backward_kv_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_kv));
    CUDA_CHECK(
        cudaFuncSetAttribute(flash_backward_q_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_q));
    int tiles = (T + kTile - 1) / kTile;
    flash_backward_kv_kernel<D><<<dim3(tiles, H, B), kAttnThreads, smem_kv, mt_stream_of(be)>>>(
        dk_part, dv_part, (const bf16 *)dout, (const bf16 *)q, (const bf16 *)k, (const bf16 *)v, lse, delta, pos, T, H,
        KV, window, scale);
    CUDA_CHECK_LAUNCH();
    size_t n = (size_t)B * KV * T * D;
    group_sum_kernel<<<grid_for(n, kThreads), kThreads, 0, mt_stream_of(be)>>>((bf16 *)dk, dk_part, B, KV, H / KV, T,
                                                                               tiles * kTile, D);
    CUDA_CHECK_LAUNCH();
    group_sum_kernel<<<grid_for(n, kThreads), kThreads, 0, mt_stream_of(be)>>>((bf16 *)dv, dv_part, B, KV, H / KV, T,
                                                                               tiles * kTile, D);
    CUDA_CHECK_LAUNCH();
    flash_backward_q_kernel<D><<<dim3(tiles, H, B), kAttnThreads, smem_q, mt_stream_of(be)>>>(
        (bf16 *)dq, (const bf16 *)dout, (const bf16 *)q, (const bf16 *)k, (const bf16 *)v, lse, delta, pos, T, H, KV,
        window, scale);
    CUDA_CHECK_LAUNCH();
}

extern "C" void mt_attention_forward_cuda(mt_backend *be, const mt_attention_shape *s, void *out, float *lse,
                                          const void *q, const void *k, const void *v, const int32_t *pos) {
    size_t workspace = 0;
    if (cudnn_serves(be, s, &workspace)) {
        MT_CHECK(be->workspace_bytes >= workspace, "attention workspace too small");
        mt_cudnn_attention_forward(be->cudnn, s, out, lse, q, k, v, be->workspace, be->stream);
        return;
    }
    MT_CHECK(s->H % s->KV == 0 && own_kernel_supports(s->D), "attention H=%d KV=%d D=%d", s->H, s->KV, s->D);
    switch (s->D) {
        case 16: attention_forward_launch<16>(be, s, out, lse, q, k, v, pos); break;
        case 32: attention_forward_launch<32>(be, s, out, lse, q, k, v, pos); break;
        case 64: attention_forward_launch<64>(be, s, out, lse, q, k, v, pos); break;
        case 80: attention_forward_launch<80>(be, s, out, lse, q, k, v, pos); break;
        case 96: attention_forward_launch<96>(be, s, out, lse, q, k, v, pos); break;
        default: attention_forward_launch<128>(be, s, out, lse, q, k, v, pos); break;
    }
}

extern "C" void mt_attention_backward_cuda(mt_backend *be, const mt_attention_shape *s, void *dq, void *dk, void *dv,
                                           const void *dout, const void *q, const void *k, const void *v,
                                           const void *out, const float *lse, const int32_t *pos) {
    MT_CHECK(!s->forward_only, "attention backward on a forward-only shape (its workspace is the forward's)");
    size_t workspace = 0;
    if (cudnn_serves(be, s, &workspace)) {
        MT_CHECK(be->workspace_bytes >= workspace, "attention workspace too small");
        mt_cudnn_attention_backward(be->cudnn, s, dq, dk, dv, dout, q, k, v, out, lse, be->workspace, be->stream);
        return;
    }
    MT_CHECK(s->H % s->KV == 0 && own_kernel_supports(s->D), "attention H=%d KV=%d D=%d", s->H, s->KV, s->D);
    MT_CHECK(be->workspace_bytes >= mt_attention_own_workspace_bytes(s), "attention workspace too small");
    int B = s->B, T = s->T, H = s->H, D = s->D;
    float *delta = (float *)be->workspace;
    size_t rows = (size_t)B * T * H, T_pad = (size_t)(T + kTile - 1) / kTile * kTile;
    float *dk_part = (float *)(((uintptr_t)(delta + rows) + 255) & ~(uintptr_t)255);
    float *dv_part = dk_part + (size_t)B * H * T_pad * D;
    attention_delta_kernel<<<grid_for(rows, 8), 256, 0, mt_stream_of(be)>>>(delta, (const bf16 *)dout,
                                                                            (const bf16 *)out, B, T, H, D);
    CUDA_CHECK_LAUNCH();
    switch (D) {
        case 16:
            attention_backward_launch<16>(be, s, dq, dk, dv, dout, q, k, v, lse, delta, pos, dk_part, dv_part);
            break;
        case 32:
            attention_backward_launch<32>(be, s, dq, dk, dv, dout, q, k, v, lse, delta, pos, dk_part, dv_part);
            break;
        case 64:
            attention_backward_launch<64>(be, s, dq, dk, dv, dout, q, k, v, lse, delta, pos, dk_part, dv_part);
            break;
        case 80:
            attention_backward_launch<80>(be, s, dq, dk, dv, dout, q, k, v, lse, delta, pos, dk_part, dv_part);
            break;
        case 96:
            attention_backward_launch<96>(be, s, dq, dk, dv, dout, q, k, v, lse, delta, pos, dk_part, dv_part);
            break;
        default:
            attention_backward_launch<128>(be, s, dq, dk, dv, dout, q, k, v, lse, delta, pos, dk_part, dv_part);
            break;
    }
}

// ------------------------------------------------------------------ decoding

// One thread per (b, kv head, d): the new token's key and value into the caches.
static __global__ void kv_store_kernel(bf16 *kcache, bf16 *vcache, const bf16 *k, const bf16 *v, const int32_t *pos,
                                       int B, int KV, int D, int S) {
    pdl_next();
    pdl_wait();
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)B * KV * D) return;
    size_t bh = idx / D, b = bh / KV;
    size_t at = (bh * S + (size_t)pos[b]) * D + idx % D;
    kcache[at] = k[idx];
    vcache[at] = v[idx];
}

extern "C" void mt_kv_store_cuda(const mt_backend *be, void *kcache, void *vcache, const void *k, const void *v,
                                 const int32_t *pos, int B, int KV, int D, int S) {
    (void)be;
    size_t n = (size_t)B * KV * D;
    launch_pdl(be, kv_store_kernel, dim3(grid_for(n, kThreads)), dim3(kThreads), (bf16 *)kcache, (bf16 *)vcache,
               (const bf16 *)k, (const bf16 *)v, pos, B, KV, D, S);
}

// One block per (query head, row), kDecodeWarps warps: warp w takes the
// cached positions first + w, first + w + kDecodeWarps, ..., each lane the
// dims lane, lane + 32, ... (head dims up to 32 kDecodeDims), with an online
// softmax; the warps' partial sums are merged at the end through shared memory.
// A position costs a warp a chain of dependent steps (the key's load, the
// sum across lanes, the exponentials), so the positions are spread over 16
// warps: at batch 1 the blocks are only the heads (32 on 132 SMs).
static const int kDecodeWarps = 16, kDecodeDims = 8;

static __global__ void attention_decode_kernel(bf16 *out, const bf16 *q, const bf16 *kcache, const bf16 *vcache,
                                               const int32_t *pos, int H, int KV, int D, int S, int window,
                                               float scale) {
    __shared__ float m_part[kDecodeWarps], l_part[kDecodeWarps], acc_part[kDecodeWarps][32 * kDecodeDims];
    pdl_next();
    pdl_wait();
    int h = blockIdx.x, b = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int t = pos[b], first = window > 0 && t >= window ? t - window + 1 : 0;
    size_t kv = (size_t)b * KV + h / (H / KV);
    const bf16 *K = kcache + kv * S * D, *V = vcache + kv * S * D, *qrow = q + ((size_t)b * H + h) * D;
    float qv[kDecodeDims], acc[kDecodeDims];
    for (int i = 0; i < kDecodeDims; i++) {
        int d = lane + 32 * i;
        qv[i] = d < D ? __bfloat162float(qrow[d]) * scale : 0.0f;
        acc[i] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int j = first + warp; j <= t; j += kDecodeWarps) {
        const bf16 *krow = K + (size_t)j * D, *vrow = V + (size_t)j * D;
        float s = 0.0f;
        for (int i = 0; i < kDecodeDims; i++) {
            int d = lane + 32 * i;
            if (d < D) s += qv[i] * __bfloat162float(krow[d]);
        }
        for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xffffffffu, s, offset);
        float m_new = fmaxf(m, s), keep = __expf(m - m_new), p = __expf(s - m_new);
        l = l * keep + p;
        for (int i = 0; i < kDecodeDims; i++) {
            int d = lane + 32 * i;
            if (d < D) acc[i] = acc[i] * keep + p * __bfloat162float(vrow[d]);
        }
        m = m_new;
    }
    if (lane == 0) m_part[warp] = m, l_part[warp] = l;
    for (int i = 0; i < kDecodeDims; i++) acc_part[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < kDecodeWarps; w++) M = fmaxf(M, m_part[w]);
    float L = 0.0f;
    for (int w = 0; w < kDecodeWarps; w++) L += m_part[w] == -INFINITY ? 0.0f : l_part[w] * __expf(m_part[w] - M);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float y = 0.0f;
        for (int w = 0; w < kDecodeWarps; w++)
            if (m_part[w] != -INFINITY) y += acc_part[w][d] * __expf(m_part[w] - M);
        out[((size_t)b * H + h) * D + d] = __float2bfloat16(y / L);
    }
}

extern "C" void mt_attention_decode_cuda(const mt_backend *be, void *out, const void *q, const void *kcache,
                                         const void *vcache, const int32_t *pos, int B, int H, int KV, int D, int S,
                                         int window, float scale) {
    (void)be;
    MT_CHECK(D <= 32 * kDecodeDims, "decoding attention: head dim %d above %d", D, 32 * kDecodeDims);
    if (scale == 0.0f) scale = 1.0f / sqrtf((float)D);
    launch_pdl(be, attention_decode_kernel, dim3((unsigned)H, (unsigned)B), dim3(32 * kDecodeWarps), (bf16 *)out,
               (const bf16 *)q, (const bf16 *)kcache, (const bf16 *)vcache, pos, H, KV, D, S, window, scale);
}

// ---------------------------------------------------------------------- glu

// The activation and its derivative at g: SiLU, or GELU's tanh approximation.
static __device__ __forceinline__ void glu_act(mt_act act, float g, float *a, float *da) {
    if (act == MT_ACT_SILU) {
        float sig = 1.0f / (1.0f + __expf(-g));
        *a = g * sig, *da = sig + *a * (1.0f - sig);
    } else {
        const float k0 = 0.7978845608028654f, k1 = 0.044715f;
        float t = tanhf(k0 * (g + k1 * g * g * g));
        *a = 0.5f * g * (1.0f + t);
        *da = 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * k0 * (1.0f + 3.0f * k1 * g * g);
    }
}

static __global__ void glu_forward_kernel(bf16 *out, const bf16 *gate, const bf16 *up, size_t n, mt_act act,
                                          int vector) {
    size_t i0 = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * kVec;
    if (i0 >= n) return;
    float a, da;
    if (vector && i0 + kVec <= n) {
        float g[kVec], u[kVec];
        load8(g, gate + i0), load8(u, up + i0);
        for (int j = 0; j < kVec; j++) glu_act(act, g[j], &a, &da), g[j] = a * u[j];
        store8(out + i0, g);
        return;
    }
    for (size_t i = i0; i < n && i < i0 + kVec; i++) {
        glu_act(act, __bfloat162float(gate[i]), &a, &da);
        out[i] = __float2bfloat16(a * __bfloat162float(up[i]));
    }
}

static __global__ void glu_backward_kernel(bf16 *dgate, bf16 *dup, const bf16 *dout, const bf16 *gate, const bf16 *up,
                                           size_t n, mt_act act, int vector) {
    size_t i0 = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * kVec;
    if (i0 >= n) return;
    float a, da;
    if (vector && i0 + kVec <= n) {
        float g[kVec], u[kVec], d[kVec];
        load8(g, gate + i0), load8(u, up + i0), load8(d, dout + i0);
        for (int j = 0; j < kVec; j++) glu_act(act, g[j], &a, &da), g[j] = d[j] * u[j] * da, u[j] = d[j] * a;
        store8(dgate + i0, g), store8(dup + i0, u);
        return;
    }
    for (size_t i = i0; i < n && i < i0 + kVec; i++) {
        float u = __bfloat162float(up[i]), d = __bfloat162float(dout[i]);
        glu_act(act, __bfloat162float(gate[i]), &a, &da);
        dgate[i] = __float2bfloat16(d * u * da);
        dup[i] = __float2bfloat16(d * a);
    }
}

extern "C" void mt_glu_forward_cuda(const mt_backend *be, void *out, const void *gate, const void *up, size_t n,
                                    mt_act act) {
    (void)be;
    if (n == 0) return;
    glu_forward_kernel<<<grid_for8(n), kThreads, 0, mt_stream_of(be)>>>((bf16 *)out, (const bf16 *)gate,
                                                                        (const bf16 *)up, n, act, vec8(out, gate, up));
    CUDA_CHECK_LAUNCH();
}

extern "C" void mt_glu_backward_cuda(const mt_backend *be, void *dgate, void *dup, const void *dout, const void *gate,
                                     const void *up, size_t n, mt_act act) {
    (void)be;
    if (n == 0) return;
    glu_backward_kernel<<<grid_for8(n), kThreads, 0, mt_stream_of(be)>>>((bf16 *)dgate, (bf16 *)dup, (const bf16 *)dout,
                                                                         (const bf16 *)gate, (const bf16 *)up, n, act,
                                                                         vec8(dgate, dup, dout, gate) && vec8(up));
    CUDA_CHECK_LAUNCH();
}

// x *= s in bf16: the product of x and s rounded to bf16 (s itself rounded first, as a bf16 tensor times a
// bf16 scalar in torch)
static __global__ void scale_kernel(bf16 *x, size_t n, float s) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = __float2bfloat16(__bfloat162float(x[i]) * s);
}

extern "C" void mt_scale_cuda(const mt_backend *be, void *x, size_t n, float s) {
    (void)be;
    scale_kernel<<<grid_for(n, kThreads), kThreads, 0, mt_stream_of(be)>>>((bf16 *)x, n,
                                                                           __bfloat162float(__float2bfloat16(s)));
    CUDA_CHECK_LAUNCH();
}

// ------------------------------------------------------------------- matmul
// Row-major X (r, c) is column-major X^T, so Y = X W^T is computed as
// Y^T = W X^T in cuBLAS's terms.

static void gemm(const mt_backend *be, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const void *A,
                 int lda, const void *B, int ldb, float alpha, float beta, void *C, cudaDataType ct, int ldc) {
    CUBLAS_CHECK(cublasGemmEx((cublasHandle_t)be->cublas, ta, tb, m, n, k, &alpha, A, CUDA_R_16BF, lda, B, CUDA_R_16BF,
                              ldb, &beta, C, ct, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

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

// ------------------------------------------------------- skinny products
// Y = X W^T for a few rows of X (decoding: a row a sequence). A warp per
// output column streams its row of W once, 16 bytes a lane, and takes the dot
// product with each row of X, which stays in L1. MT_SKINNY=0 in the
// environment turns the kernel off (cuBLAS for every product).
constexpr int kSkinnyRows = 8, kSkinnyWarps = 8;
static_assert(kSkinnyRows == 8, "launch_1_to_8 launches a kernel a row count");

static __device__ void store_out(bf16 *p, float y) { *p = __float2bfloat16(y); }
static __device__ void store_out(float *p, float y) { *p = y; }
static __device__ float load_out(const bf16 *p) { return __bfloat162float(*p); }
static __device__ float load_out(const float *p) { return *p; }

// Up to MT_MAX_PRODUCTS products of one input in one launch: product k takes
// blocks first[k] .. first[k + 1] - 1.
template <typename T>
struct skinny_set {
    T *out[MT_MAX_PRODUCTS];
    const bf16 *w[MT_MAX_PRODUCTS], *bias[MT_MAX_PRODUCTS];
    int OUT[MT_MAX_PRODUCTS], first[MT_MAX_PRODUCTS + 1];
};

// The set's entry k, read with constant indices (a runtime index into a
// kernel parameter would copy the set to local memory).
template <typename V>
static __device__ V pick(int k, const V (&v)[MT_MAX_PRODUCTS]) {
    static_assert(MT_MAX_PRODUCTS == 3, "pick reads three entries");
    return k == 0 ? v[0] : k == 1 ? v[1] : v[2];
}

// A lane's first kAhead vectors of a weight row (those in [0, IN)), loaded
// before pdl_wait(): the weights are not written by the kernels before.
static const int kAhead = 4;

static __device__ __forceinline__ void load_ahead(uint4 (&ahead)[kAhead], const bf16 *row, int lane, int IN) {
#pragma unroll
    for (int a = 0; a < kAhead; a++) {
        int i = (lane + 32 * a) * kVec;
        ahead[a] = i < IN ? __ldcs((const uint4 *)(row + i)) : make_uint4(0, 0, 0, 0);
    }
}

// acc[r] += the 8 weights of w times inputs r's 8 values at i (rows IN apart).
template <int R>
static __device__ __forceinline__ void dot8(float (&acc)[R], uint4 w, const bf16 *inp, int IN, int i) {
    const bf16 *wh = (const bf16 *)&w;
    float wf[kVec];
#pragma unroll
    for (int j = 0; j < kVec; j++) wf[j] = __bfloat162float(wh[j]);
#pragma unroll
    for (int r = 0; r < R; r++) {
        float xf[kVec];
        load8(xf, inp + (size_t)r * IN + i);
#pragma unroll
        for (int j = 0; j < kVec; j++) acc[r] = fmaf(wf[j], xf[j], acc[r]);
    }
}

// out (R, OUT) = alpha * inp (R, IN) W^T + beta * out, then + bias (as a
// separate rounding, as the cuBLAS path adds it), for each product of the
// set; IN % 8 == 0, rows aligned. A lane adds its products in the order of
// i (the first kAhead vectors loaded before pdl_wait, then the rest).
template <int R, typename T>
static __global__ void skinny_kernel(skinny_set<T> set, const bf16 *inp, int IN, float alpha, float beta) {
    pdl_next();
    int k = ((int)blockIdx.x >= set.first[1]) + ((int)blockIdx.x >= set.first[2]);
    int o = ((int)blockIdx.x - (k == 0   ? set.first[0]
                                : k == 1 ? set.first[1]
                                         : set.first[2])) *
                kSkinnyWarps +
            threadIdx.x / 32,
        lane = threadIdx.x % 32;
    int OUT = pick(k, set.OUT);
    if (o >= OUT) return;
    const bf16 *wr = pick(k, set.w) + (size_t)o * IN;
    uint4 ahead[kAhead];
    load_ahead(ahead, wr, lane, IN);  // read once: no cache line kept (__ldcs)
    pdl_wait();
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.0f;
#pragma unroll
    for (int a = 0; a < kAhead; a++)
        if ((lane + 32 * a) * kVec < IN) dot8(acc, ahead[a], inp, IN, (lane + 32 * a) * kVec);
#pragma unroll 4
    for (int i = (lane + 32 * kAhead) * kVec; i < IN; i += 32 * kVec)
        dot8(acc, __ldcs((const uint4 *)(wr + i)), inp, IN, i);
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = warp_sum(acc[r]);
    if (lane != 0) return;
    T *out = pick(k, set.out);
    const bf16 *bias = pick(k, set.bias);
#pragma unroll
    for (int r = 0; r < R; r++) {
        T *y = out + (size_t)r * OUT + o;
        store_out(y, beta != 0.0f ? alpha * acc[r] + beta * load_out(y) : alpha * acc[r]);
        if (bias) store_out(y, load_out(y) + __bfloat162float(bias[o]));
    }
}

static int skinny_enabled(void) {
    static int enabled = -1;
    if (enabled < 0) {
        const char *env = getenv("MT_SKINNY");
        enabled = !(env && strcmp(env, "0") == 0);
    }
    return enabled;
}

// Whether the skinny kernels take N rows of IN from inp: at most
// kSkinnyRows rows of whole 16-byte vectors (the weights' rows checked apart).
static bool skinny_serves(int N, int IN, const void *inp) {
    return N <= kSkinnyRows && IN % kVec == 0 && vec8(inp) && skinny_enabled();
}

// launch(std::integral_constant<int, n>()) for n from 1 to 8 (more: 8), then
// the launch check: a kernel compiled for each count (the skinny kernels'
// rows, the LoRA kernels' fragments).
template <typename F>
static void launch_1_to_8(int n, F launch) {
    switch (n) {
        case 1: launch(std::integral_constant<int, 1>()); break;
        case 2: launch(std::integral_constant<int, 2>()); break;
        case 3: launch(std::integral_constant<int, 3>()); break;
        case 4: launch(std::integral_constant<int, 4>()); break;
        case 5: launch(std::integral_constant<int, 5>()); break;
        case 6: launch(std::integral_constant<int, 6>()); break;
        case 7: launch(std::integral_constant<int, 7>()); break;
        default: launch(std::integral_constant<int, 8>()); break;
    }
    CUDA_CHECK_LAUNCH();
}

// Runs the skinny kernel over `count` products of inp when it serves; 0: the
// caller runs cuBLAS.
template <typename T>
static int skinny(const mt_backend *be, const mt_product *p, int count, const void *inp, int N, int IN, float alpha,
                  float beta) {
    if (!skinny_serves(N, IN, inp)) return 0;
    skinny_set<T> set = {};
    int blocks = 0;
    for (int k = 0; k < MT_MAX_PRODUCTS; k++) {
        set.first[k] = blocks;
        if (k >= count) continue;
        if (!vec8(p[k].weight)) return 0;
        set.out[k] = (T *)p[k].out, set.w[k] = (const bf16 *)p[k].weight, set.bias[k] = (const bf16 *)p[k].bias;
        set.OUT[k] = p[k].OUT;
        blocks += (p[k].OUT + kSkinnyWarps - 1) / kSkinnyWarps;
    }
    set.first[MT_MAX_PRODUCTS] = blocks;
    for (int k = count; k < MT_MAX_PRODUCTS; k++) set.first[k] = blocks;
    if (blocks == 0) return 1;
    const bf16 *x = (const bf16 *)inp;
    dim3 grid(blocks), block(32 * kSkinnyWarps);
    launch_1_to_8(N,
                  [&](auto rows) { launch_pdl(be, skinny_kernel<rows(), T>, grid, block, set, x, IN, alpha, beta); });
    return 1;
}

// One product through the skinny kernel where it serves.
template <typename T>
static int skinny1(const mt_backend *be, T *out, const void *inp, const void *weight, const void *bias, int N, int IN,
                   int OUT, float alpha, float beta) {
    mt_product p = {out, weight, bias, OUT};
    return skinny<T>(be, &p, 1, inp, N, IN, alpha, beta);
}

extern "C" void mt_matmul_forward_cuda(const mt_backend *be, void *out, const void *inp, const void *weight,
                                       const void *bias, int N, int IN, int OUT) {
    if (skinny1(be, (bf16 *)out, inp, weight, bias, N, IN, OUT, 1.0f, 0.0f)) return;
    gemm(be, CUBLAS_OP_T, CUBLAS_OP_N, OUT, N, IN, weight, IN, inp, IN, 1.0f, 0.0f, out, CUDA_R_16BF, OUT);
    if (bias) {
        size_t n = (size_t)N * OUT;
        add_bias_kernel<<<grid_for(n, kThreads), kThreads, 0, mt_stream_of(be)>>>((bf16 *)out, (const bf16 *)bias, n,
                                                                                  OUT);
        CUDA_CHECK_LAUNCH();
    }
}

extern "C" void mt_matmul_forward_many_cuda(const mt_backend *be, const mt_product *p, int count, const void *inp,
                                            int N, int IN) {
    if (skinny<bf16>(be, p, count, inp, N, IN, 1.0f, 0.0f)) return;
    for (int k = 0; k < count; k++) mt_matmul_forward_cuda(be, p[k].out, inp, p[k].weight, p[k].bias, N, IN, p[k].OUT);
}

// The MLP's first half for a few rows in one launch: a warp per output
// column streams its rows of both weights, rounds each product to bf16 as
// the skinny kernel stores it, and applies the activation as
// glu_forward_kernel does (the same bits as the three launches).
template <int R>
static __global__ void skinny_glu_kernel(bf16 *out, const bf16 *inp, const bf16 *wg, const bf16 *wu, int IN, int F,
                                         mt_act act) {
    pdl_next();
    int o = blockIdx.x * kSkinnyWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (o >= F) return;
    const bf16 *gr = wg + (size_t)o * IN, *ur = wu + (size_t)o * IN;
    uint4 gahead[kAhead], uahead[kAhead];
    load_ahead(gahead, gr, lane, IN);
    load_ahead(uahead, ur, lane, IN);
    pdl_wait();
    float ag[R], au[R];
#pragma unroll
    for (int r = 0; r < R; r++) ag[r] = 0.0f, au[r] = 0.0f;
#pragma unroll
    for (int a = 0; a < kAhead; a++) {
        int i = (lane + 32 * a) * kVec;
        if (i < IN) dot8(ag, gahead[a], inp, IN, i), dot8(au, uahead[a], inp, IN, i);
    }
#pragma unroll 2
    for (int i = (lane + 32 * kAhead) * kVec; i < IN; i += 32 * kVec)
        dot8(ag, __ldcs((const uint4 *)(gr + i)), inp, IN, i), dot8(au, __ldcs((const uint4 *)(ur + i)), inp, IN, i);
#pragma unroll
    for (int r = 0; r < R; r++) ag[r] = warp_sum(ag[r]), au[r] = warp_sum(au[r]);
    if (lane != 0) return;
#pragma unroll
    for (int r = 0; r < R; r++) {
        float a, da, g = __bfloat162float(__float2bfloat16(ag[r])), u = __bfloat162float(__float2bfloat16(au[r]));
        glu_act(act, g, &a, &da);
        out[(size_t)r * F + o] = __float2bfloat16(a * u);
    }
}

extern "C" void mt_matmul_glu_forward_cuda(const mt_backend *be, void *out, void *gate, void *up, const void *inp,
                                           const void *wg, const void *wu, int N, int IN, int F, mt_act act) {
    if (skinny_serves(N, IN, inp) && vec8(wg, wu)) {
        dim3 grid((F + kSkinnyWarps - 1) / kSkinnyWarps), block(32 * kSkinnyWarps);
        const bf16 *x = (const bf16 *)inp, *g = (const bf16 *)wg, *u = (const bf16 *)wu;
        bf16 *y = (bf16 *)out;
        launch_1_to_8(
            N, [&](auto rows) { launch_pdl(be, skinny_glu_kernel<rows()>, grid, block, y, x, g, u, IN, F, act); });
        return;
    }
    mt_product p[2] = {{gate, wg, NULL, F}, {up, wu, NULL, F}};
    mt_matmul_forward_many_cuda(be, p, 2, inp, N, IN);
    mt_glu_forward_cuda(be, out, gate, up, (size_t)N * F, act);
}

extern "C" void mt_matmul_forward_add_cuda(const mt_backend *be, void *out, const void *inp, const void *weight, int N,
                                           int IN, int OUT, float alpha) {
    if (skinny1(be, (bf16 *)out, inp, weight, NULL, N, IN, OUT, alpha, 1.0f)) return;
    gemm(be, CUBLAS_OP_T, CUBLAS_OP_N, OUT, N, IN, weight, IN, inp, IN, alpha, 1.0f, out, CUDA_R_16BF, OUT);
}

extern "C" void mt_matmul_backward_cuda(const mt_backend *be, void *dinp, float *dweight, float *dbias,
                                        const void *dout, const void *inp, const void *weight, int N, int IN, int OUT,
                                        float alpha, int accumulate) {
    if (dinp)
        gemm(be, CUBLAS_OP_N, CUBLAS_OP_N, IN, N, OUT, weight, IN, dout, OUT, alpha, accumulate ? 1.0f : 0.0f, dinp,
             CUDA_R_16BF, IN);
    if (dweight)
        gemm(be, CUBLAS_OP_N, CUBLAS_OP_T, IN, OUT, N, inp, IN, dout, OUT, alpha, 1.0f, dweight, CUDA_R_32F, IN);
    if (dbias) {
        bias_grad_kernel<<<grid_for((size_t)OUT, kThreads), kThreads, 0, mt_stream_of(be)>>>(dbias, (const bf16 *)dout,
                                                                                             N, OUT);
        CUDA_CHECK_LAUNCH();
    }
}

extern "C" void mt_logits_forward_cuda(const mt_backend *be, float *logits, const void *inp, const void *weight, int N,
                                       int C, int V) {
    if (skinny1(be, logits, inp, weight, NULL, N, C, V, 1.0f, 0.0f)) return;
    gemm(be, CUBLAS_OP_T, CUBLAS_OP_N, V, N, C, weight, C, inp, C, 1.0f, 0.0f, logits, CUDA_R_32F, V);
}

// ------------------------------------------------------------ cross-entropy

// A row's log-sum-exp as a running maximum m and the sum s of exp(z - m): one
// read of the logits instead of a pass for the maximum and one for the sum. A
// NaN makes the sum NaN; -inf adds nothing.
static __device__ void lse_add(float &m, float &s, float z) {
    if (z > m) {
        s = s * __expf(m - z) + 1.0f;
        m = z;
    } else if (z != -INFINITY)
        s += __expf(z - m);
}

static __device__ void lse_merge(float &m, float &s, float m2, float s2) {
    if (m2 > m) {
        s = s * __expf(m - m2) + s2;
        m = m2;
    } else if (s2 != 0.0f)
        s += s2 * __expf(m2 - m);
}

// (m, s) merged over the block, returned to every thread (blockDim.x a
// multiple of 32, at most 1024), in one fixed order.
static __device__ void block_lse(float &m, float &s) {
    __shared__ float pm[32], ps[32];
    for (int offset = 16; offset > 0; offset >>= 1)
        lse_merge(m, s, __shfl_xor_sync(0xffffffffu, m, offset), __shfl_xor_sync(0xffffffffu, s, offset));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) pm[warp] = m, ps[warp] = s;
    __syncthreads();
    int live = lane < (int)(blockDim.x >> 5);
    m = live ? pm[lane] : -INFINITY, s = live ? ps[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1)
        lse_merge(m, s, __shfl_xor_sync(0xffffffffu, m, offset), __shfl_xor_sync(0xffffffffu, s, offset));
}

static constexpr int kCrossEntropyThreads = 1024;

// One block a row: the log-sum-exp in one read, then dlogits (softmax minus
// the target's one-hot, times dscale) in a second. VEC 4: V a multiple of 4
// (rows of float4, dlogits 4 bf16 at a time); 1 otherwise.
template <int VEC>
static __global__ void __launch_bounds__(kCrossEntropyThreads)
    crossentropy_kernel(float *losses, bf16 *dlogits, const float *logits, const int32_t *targets, int V,
                        float dscale) {
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
    float m = -INFINITY, s = 0.0f;
    for (int i = threadIdx.x * VEC; i < V; i += blockDim.x * VEC) {
        if constexpr (VEC == 4) {
            float4 v = *(const float4 *)(z + i);
            lse_add(m, s, v.x), lse_add(m, s, v.y), lse_add(m, s, v.z), lse_add(m, s, v.w);
        } else
            lse_add(m, s, z[i]);
    }
    block_lse(m, s);
    float logsum = logf(s) + m;
    if (threadIdx.x == 0) losses[n] = logsum - z[target];
    if (!dz) return;
    for (int i = threadIdx.x * VEC; i < V; i += blockDim.x * VEC) {
        float f[VEC];
        if constexpr (VEC == 4) {
            float4 v = *(const float4 *)(z + i);
            f[0] = v.x, f[1] = v.y, f[2] = v.z, f[3] = v.w;
        } else
            f[0] = z[i];
        uint2 u;  // 4 bf16
        bf16 *h = (bf16 *)&u;
        for (int j = 0; j < VEC; j++)
            h[j] = __float2bfloat16((__expf(f[j] - logsum) - (i + j == target ? 1.0f : 0.0f)) * dscale);
        if constexpr (VEC == 4)
            *(uint2 *)(dz + i) = u;
        else
            dz[i] = h[0];
    }
}

extern "C" void mt_crossentropy_cuda(const mt_backend *be, float *losses, void *dlogits, const float *logits,
                                     const int32_t *targets, int N, int V, float dscale) {
    if (N == 0) return;
    cudaStream_t st = mt_stream_of(be);
    // float4 rows where every row starts 16-byte aligned (dlogits then 8-byte)
    if (V % 4 == 0 && ((uintptr_t)logits & 15) == 0 && ((uintptr_t)dlogits & 7) == 0)
        crossentropy_kernel<4><<<N, kCrossEntropyThreads, 0, st>>>(losses, (bf16 *)dlogits, logits, targets, V, dscale);
    else
        crossentropy_kernel<1><<<N, kCrossEntropyThreads, 0, st>>>(losses, (bf16 *)dlogits, logits, targets, V, dscale);
    CUDA_CHECK_LAUNCH();
}

// -------------------------------------------------------------- elementwise

static __global__ void add_kernel(bf16 *out, const bf16 *a, const bf16 *b, size_t n, int vector) {
    pdl_next();
    pdl_wait();
    size_t i0 = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * kVec;
    if (i0 >= n) return;
    if (vector && i0 + kVec <= n) {
        float x[kVec], y[kVec];
        load8(x, a + i0), load8(y, b + i0);
        for (int j = 0; j < kVec; j++) x[j] += y[j];
        store8(out + i0, x);
        return;
    }
    for (size_t i = i0; i < n && i < i0 + kVec; i++)
        out[i] = __float2bfloat16(__bfloat162float(a[i]) + __bfloat162float(b[i]));
}

extern "C" void mt_add_cuda(const mt_backend *be, void *out, const void *a, const void *b, size_t n) {
    (void)be;
    if (n == 0) return;
    launch_pdl(be, add_kernel, dim3(grid_for8(n)), dim3(kThreads), (bf16 *)out, (const bf16 *)a, (const bf16 *)b, n,
               (int)vec8(out, a, b));
}

static __global__ void add_f32_kernel(float *out, const float *a, const float *b, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] + b[i];
}

extern "C" void mt_add_f32_cuda(const mt_backend *be, float *out, const float *a, const float *b, size_t n) {
    (void)be;
    if (n == 0) return;
    add_f32_kernel<<<grid_for(n, kThreads), kThreads, 0, mt_stream_of(be)>>>(out, a, b, n);
    CUDA_CHECK_LAUNCH();
}

static __global__ void adamw_kernel(float *master, bf16 *copy, const float *grad, float *m, float *v, size_t n,
                                    float lr, float beta1, float beta2, float eps, float weight_decay, float step_size,
                                    float bc2_sqrt, float grad_scale) {
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
    adamw_kernel<<<grid_for(n, kThreads), kThreads, 0, mt_stream_of(be)>>>(
        master, (bf16 *)param_copy, grad, m, v, n, lr, beta1, beta2, eps, weight_decay, lr / bias_correction1,
        sqrtf(bias_correction2), grad_scale);
    CUDA_CHECK_LAUNCH();
}

static const int kSumBlocks = 256;  // partials fit the backend's 4 KiB reduce buffer (as doubles)

// Each block sums a fixed strided share into partials[block]; one thread then
// adds the partials in order: the same bits every run (no atomics).
// In double throughout, as the CPU reference: a float running sum would make
// the loss depend on how the tokens are grouped (2 micro-batches against one
// of twice the rows) by about 1e-7, which MeZO's difference of two losses
// over a small eps magnifies.
static __device__ double sum4(float4 v, int squares) {
    return squares ? (double)v.x * v.x + (double)v.y * v.y + (double)v.z * v.z + (double)v.w * v.w
                   : (double)v.x + (double)v.y + (double)v.z + (double)v.w;
}

static __global__ void sum_kernel(double *partials, const float *x, size_t n, int squares) {
    double sum = 0.0;
    size_t stride = (size_t)gridDim.x * blockDim.x, first = (size_t)blockIdx.x * blockDim.x + threadIdx.x, tail = 0;
    if (((uintptr_t)x & 15) == 0) {  // 4 floats a load: enough bytes in flight to fill the memory system
        const float4 *x4 = (const float4 *)x;
        size_t n4 = n / 4, i = first;
        for (; i + stride < n4; i += 2 * stride) {  // two loads in flight
            float4 v = x4[i], w = x4[i + stride];
            sum += sum4(v, squares) + sum4(w, squares);
        }
        if (i < n4) sum += sum4(x4[i], squares);
        tail = n / 4 * 4;
    }
    for (size_t i = tail + first; i < n; i += stride) sum += squares ? (double)x[i] * x[i] : (double)x[i];
    sum = block_sum(sum);
    if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

static __global__ void sum_partials_double_kernel(double *out, const double *partials, int count) {
    double sum = 0.0;
    for (int i = 0; i < count; i++) sum += partials[i];
    *out = sum;
}

// The sum (of squares) of x into *out on the device, on the backend's stream.
static void sum_to(const mt_backend *be, const float *x, size_t n, int squares, double *out) {
    double *partials = (double *)be->reduce_buffer;
    unsigned blocks = grid_for(n, kThreads);
    if (blocks > (unsigned)kSumBlocks) blocks = kSumBlocks;
    if (blocks == 0) blocks = 1;
    sum_kernel<<<blocks, kThreads, 0, mt_stream_of(be)>>>(partials, x, n, squares);
    CUDA_CHECK_LAUNCH();
    sum_partials_double_kernel<<<1, 1, 0, mt_stream_of(be)>>>(out, partials, (int)blocks);
    CUDA_CHECK_LAUNCH();
}

extern "C" double mt_sumsq_cuda(const mt_backend *be, const float *x, size_t n, int squares) {
    double *out = (double *)be->reduce_buffer + kSumBlocks, host = 0.0;
    sum_to(be, x, n, squares, out);
    CUDA_CHECK(cudaMemcpy(&host, out, sizeof host, cudaMemcpyDeviceToHost));
    return host;
}

extern "C" void mt_sumsq_to_cuda(const mt_backend *be, const float *x, size_t n, double *dst) {
    sum_to(be, x, n, 1, dst);
}

// A gated op (mt_op_adam_direction's gate) does nothing where its gate is not finite.
static __device__ bool gated_off(const double *gate) { return gate && !isfinite(*gate); }

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
    cast_from_f32_kernel<<<grid_for(n, kThreads), kThreads, 0, mt_stream_of(be)>>>((bf16 *)dst, src, n);
    CUDA_CHECK_LAUNCH();
}

extern "C" void mt_cast_to_f32_cuda(const mt_backend *be, float *dst, const void *src, size_t n) {
    (void)be;
    cast_to_f32_kernel<<<grid_for(n, kThreads), kThreads, 0, mt_stream_of(be)>>>(dst, (const bf16 *)src, n);
    CUDA_CHECK_LAUNCH();
}

// ------------------------------------------------------------------ dropout
// The keep mask is rng.h's (mt_dropout_kept, the CPU's too): index i (offset
// + i for element i of a call) is kept when its 16-bit draw, a field of
// splitmix_hash(seed, i / 4), is at least p * 65536 rounded. Any element's
// draw can be regenerated, so backward recomputes the mask instead of
// storing it. (Until 2026-12-06 each index drew a 32-bit uniform from cuRAND's
// Philox: two Philox calls and eight conversions to float for 8 elements,
// where this takes two hashes.)

// rng.h's mt_rng_hash.
static __device__ unsigned long long splitmix_hash(unsigned long long seed, unsigned long long group) {
    unsigned long long h = seed ^ (group * 0x9e3779b97f4a7c15ull);
    h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
    h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
    return h ^ (h >> 31);
}

static __device__ unsigned dropout_threshold(float p) { return __float2uint_rn(p * 65536.0f); }

// Bit j set: index 8 group + j is kept.
static __device__ unsigned dropout_keep8(unsigned long long seed, unsigned long long group, unsigned threshold) {
    unsigned keep = 0;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        unsigned long long bits = splitmix_hash(seed, 2 * group + h);
#pragma unroll
        for (int j = 0; j < 4; j++) keep |= (unsigned)(((bits >> (16 * j)) & 0xffffu) >= threshold) << (4 * h + j);
    }
    return keep;
}

// One thread per group of 8 mask indices: the groups from offset / 8 cover
// the n elements. accumulate: out += the dropped-out input (rounded to bf16
// first, as a dropout then an add). vector: offset is a multiple of 8 and
// the pointers 16-byte aligned, so a group's elements move in one load.
static __global__ void dropout_kernel(bf16 *out, const bf16 *inp, size_t n, float p, float keep_scale,
                                      unsigned long long seed, unsigned long long offset, int accumulate, int vector) {
    unsigned long long group = offset / 8 + (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (group * 8 >= offset + n) return;
    unsigned keep = dropout_keep8(seed, group, dropout_threshold(p));
    if (vector && group * 8 + 8 <= offset + n) {
        size_t i = group * 8 - offset;
        float x[kVec], o[kVec];
        load8(x, inp + i);
        if (accumulate) load8(o, out + i);
        for (int j = 0; j < kVec; j++) {
            float kept = keep >> j & 1 ? __bfloat162float(__float2bfloat16(x[j] * keep_scale)) : 0.0f;
            x[j] = accumulate ? o[j] + kept : kept;
        }
        store8(out + i, x);
        return;
    }
    for (int j = 0; j < 8; j++) {
        unsigned long long index = group * 8 + j;
        if (index < offset || index >= offset + n) continue;
        size_t i = index - offset;
        bf16 kept = keep >> j & 1 ? __float2bfloat16(__bfloat162float(inp[i]) * keep_scale) : __float2bfloat16(0.0f);
        out[i] = accumulate ? __float2bfloat16(__bfloat162float(out[i]) + __bfloat162float(kept)) : kept;
    }
}

extern "C" void mt_dropout_cuda(const mt_backend *be, void *out, const void *inp, size_t n, float p, uint64_t seed,
                                uint64_t offset, int accumulate) {
    (void)be;
    if (n == 0) return;
    size_t groups = (offset + n + 7) / 8 - offset / 8;
    int vector = offset % 8 == 0 && vec8(out, inp);
    dropout_kernel<<<grid_for(groups, kThreads), kThreads, 0, mt_stream_of(be)>>>(
        (bf16 *)out, (const bf16 *)inp, n, p, 1.0f / (1.0f - p), (unsigned long long)seed, (unsigned long long)offset,
        accumulate, vector);
    CUDA_CHECK_LAUNCH();
}

// ------------------------------------------------------ LoRA's A products
// The down-projections of one input that a group of adapters shares, and the
// input gradient through them, on the tensor cores (WMMA tiles of 16), with
// dropout's mask drawn where x is read and where dx is written: x passes
// through memory once forward, dx once backward, and dropout(x) is never
// stored. The mask is dropout_kernel's (the same draws for the same element
// index). Which of them run: lora_fused_enabled.
constexpr int kLoraWarps = 4, kLoraRows = 16 * kLoraWarps, kLoraCols = 64, kLoraLd = kLoraCols + 8;
constexpr int kLoraMaxFrags = 8;  // the group's r summed, over 16
static_assert(kLoraMaxFrags == 8, "launch_1_to_8 launches a kernel a fragment count");

struct lora_set {
    bf16 *out[MT_MAX_PRODUCTS];       // u (R, r) of each adapter
    const bf16 *a[MT_MAX_PRODUCTS];   // A (r, IN)
    const bf16 *du[MT_MAX_PRODUCTS];  // du (R, r)
    float *da[MT_MAX_PRODUCTS];       // dA (r, IN)
};

typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> frag_a_col;

// Which kernels run: every one by default, with or without dropout. On an
// H100 (2026-12-06, the 1.1B LoRA step without dropout, one call) they gave
// 79549 tokens/s against 78743 with cuBLAS's products for u and dA, whose
// dx kernel was then a variant (dx loaded first) that ran about 16 us a
// layer slower, some 0.7% of the step: without dropout the two ways are
// about level, and with it the kernels win (docs/development.md).
// MT_LORA_FUSED (read each time: tests compare the ways in one process): 0
// none, dx the dx kernel alone, dropout the dx kernel and the others with
// dropout only (the choice before), all (or unset) every one.
typedef enum { LORA_U, LORA_DA, LORA_DX } lora_kernel;
static bool lora_fused_enabled(lora_kernel k, float p) {
    const char *env = getenv("MT_LORA_FUSED");
    if (env && strcmp(env, "0") == 0) return false;
    if (env && strcmp(env, "dx") == 0) return k == LORA_DX;
    if (env && strcmp(env, "dropout") == 0) return k == LORA_DX || p > 0.0f;
    return true;
}

// Whether the kernels take the group: r a multiple of 16 (a fragment lies in
// one adapter) summing to at most kLoraMaxFrags fragments, whole 64-wide
// chunks of whole 16-row tiles, x (or dx) 16-byte aligned, and the mask's
// 8-element groups aligned with the chunks' vectors.
static bool lora_fused_serves(lora_kernel k, float p, int count, const void *x, int R, int IN, int r, uint64_t offset) {
    return lora_fused_enabled(k, p) && count >= 1 && count <= MT_MAX_PRODUCTS && r % 16 == 0 &&
           count * r <= 16 * kLoraMaxFrags && R % 16 == 0 && IN % kLoraCols == 0 && offset % 8 == 0 && vec8(x);
}

// Whether every one of the group's tensors (its A, or its du) is 16-byte aligned.
static bool lora_aligned(const void *const *t, int count) {
    for (int g = 0; g < count; g++)
        if (!vec8(t[g])) return false;
    return true;
}

// Whether every one is 32-byte aligned (WMMA's loads from global memory).
static bool lora_aligned32(const void *const *t, int count) {
    for (int g = 0; g < count; g++)
        if ((uintptr_t)t[g] % 32) return false;
    return true;
}

// 8 values with dropout's mask applied: bf16(v / (1 - p)) where bit j of
// keep is set, else 0.
static __device__ uint4 kept8(uint4 v, unsigned keep, float keep_scale) {
    bf16 *h = (bf16 *)&v;
#pragma unroll
    for (int j = 0; j < 8; j++)
        h[j] = keep >> j & 1 ? __float2bfloat16(__bfloat162float(h[j]) * keep_scale) : __float2bfloat16(0.0f);
    return v;
}

// x's 8 values at element index e (a multiple of 8) as the adapters read
// them: dropout's bf16(x / (1 - p)) or 0 where p > 0 (dropout_keep8's mask).
static __device__ uint4 dropped8(uint4 v, float p, float keep_scale, unsigned long long seed, unsigned long long e) {
    return p <= 0.0f ? v : kept8(v, dropout_keep8(seed, e / 8, dropout_threshold(p)), keep_scale);
}

// The adapters' A over the 64 columns from k0 into shared memory: row j of
// the group's (NF * 16, 64), their r side by side, rows kLoraLd apart.
template <int NF>
static __device__ void load_a_chunk(bf16 *as, const lora_set &set, int r, int IN, int k0) {
    for (int v = threadIdx.x; v < NF * 16 * (kLoraCols / 8); v += blockDim.x) {
        int j = v / (kLoraCols / 8), col = v % (kLoraCols / 8) * 8, g = j / r;
        *(uint4 *)&as[j * kLoraLd + col] = *(const uint4 *)(pick(g, set.a) + (size_t)(j % r) * IN + k0 + col);
    }
}

// A block: kLoraRows rows of x, 16 a warp; it takes every gridDim.y-th
// 64-wide chunk of IN from blockIdx.y and writes its partial sums (rows, NF *
// 16 columns: the adapters' r side by side) to ws[blockIdx.y] in fp32.
template <int NF>
static __global__ void lora_down_kernel(float *ws, lora_set set, const bf16 *x, int R, int IN, int r, float p,
                                        float keep_scale, unsigned long long seed, unsigned long long offset) {
    __shared__ __align__(32) bf16 xs[kLoraWarps][16 * kLoraLd];
    __shared__ __align__(32) bf16 as[NF * 16 * kLoraLd];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, row0 = blockIdx.x * kLoraRows + warp * 16;
    frag_acc acc[NF];
#pragma unroll
    for (int f = 0; f < NF; f++) wmma::fill_fragment(acc[f], 0.0f);
    for (int k0 = blockIdx.y * kLoraCols; k0 < IN; k0 += gridDim.y * kLoraCols) {
        load_a_chunk<NF>(as, set, r, IN, k0);
        // the warp's 16 rows of x over the chunk, 4 vectors a lane, masked
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int v = lane + 32 * i, rr = v / (kLoraCols / 8), col = v % (kLoraCols / 8) * 8, row = row0 + rr;
            uint4 val = make_uint4(0, 0, 0, 0);
            if (row < R) {
                size_t e = (size_t)row * IN + k0 + col;
                val = dropped8(__ldcs((const uint4 *)(x + e)), p, keep_scale, seed, offset + e);
            }
            *(uint4 *)&xs[warp][rr * kLoraLd + col] = val;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kLoraCols; kk += 16) {
            frag_a_row fa;
            wmma::load_matrix_sync(fa, &xs[warp][kk], kLoraLd);
#pragma unroll
            for (int f = 0; f < NF; f++) {
                frag_b_col fb;
                wmma::load_matrix_sync(fb, &as[f * 16 * kLoraLd + kk], kLoraLd);
                wmma::mma_sync(acc[f], fa, fb, acc[f]);
            }
        }
        __syncthreads();
    }
    if (row0 >= R) return;
    float *w = ws + ((size_t)blockIdx.y * R + row0) * (NF * 16);
#pragma unroll
    for (int f = 0; f < NF; f++) wmma::store_matrix_sync(w + f * 16, acc[f], NF * 16, wmma::mem_row_major);
}

// u[g] (R, r) = the splits' partial sums added in split order, in bf16
// (unrolled: a thread's loads are in flight together).
static __global__ void lora_down_sum_kernel(lora_set set, const float *ws, int splits, int R, int width, int r) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)R * width) return;
    size_t row = i / width, stride = (size_t)R * width;
    int j = (int)(i % width), g = j / r;
    float sum = 0.0f;
#pragma unroll 8
    for (int s = 0; s < splits; s++) sum += ws[s * stride + i];
    pick(g, set.out)[row * r + j % r] = __float2bfloat16(sum);
}

static int sm_count(void) {
    static int count = 0;
    if (!count) {
        int dev = 0;
        CUDA_CHECK(cudaGetDevice(&dev));
        CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev));
    }
    return count;
}

// Version 2 of the u kernel, for groups of up to kLora2Frags fragments (r =
// 16 on q, k and v): a block of kLora2Warps warps on 32 rows, each warp
// streaming its own chunks of IN with the next chunk's loads in flight while
// it multiplies the current one, and no block barrier until the end, where
// the warps' sums are added in a fixed tree in shared memory. The adapters'
// A is read as WMMA fragments straight from global memory, where every block
// finds it in L2. Splits of IN across blocks (partial sums in the scratch,
// lora_down_sum_kernel) only where one block of rows each would leave SMs
// idle. On an H100 (2026-12-06) it took 16.2 against version 1's 22.5 us on
// the 1.1B q, k and v without dropout; a dA kernel built the same way (a
// block an SM, 8 warps) was slower than version 1's (29.5 against 25.3 us)
// and was not kept. MT_LORA_KERNELS=1 in the environment keeps version 1
// (A/B runs, tests).
constexpr int kLora2Warps = 8, kLora2Frags = 3, kLora2Rows = 32;
constexpr int kLora2Stage = kLora2Rows * kLoraLd;  // a warp's staged 32 rows of 64 (bf16)

// MT_LORA_KERNELS=1: version 1 (read each time: tests run both in one process).
static bool lora_version1(void) {
    const char *env = getenv("MT_LORA_KERNELS");
    return env && strcmp(env, "1") == 0;
}

static bool lora_v2(int count, int r) { return count * r <= 16 * kLora2Frags && !lora_version1(); }

// The accumulators of the block's warps added into warp 0's, warp w adding
// warp w + h's for h = warps / 2, ..., 1 (a fixed order: the same bits every
// run), through `slots` warps' worth of fragments at buf.
template <int N>
static __device__ void sum_warps(frag_acc (&acc)[N], float *buf, int slots) {
    int warp = threadIdx.x / 32, warps = blockDim.x / 32;
    for (int half = warps / 2; half >= 1; half /= 2)
        for (int b = 0; b < half; b += slots) {
            int from = warp - half - b, to = warp - b;
            if (from >= 0 && from < slots && warp < 2 * half)
#pragma unroll
                for (int i = 0; i < N; i++)
                    wmma::store_matrix_sync(buf + (from * N + i) * 256, acc[i], 16, wmma::mem_row_major);
            __syncthreads();
            if (to >= 0 && to < slots && warp < half)
#pragma unroll
                for (int i = 0; i < N; i++) {
                    frag_acc o;
                    wmma::load_matrix_sync(o, buf + (to * N + i) * 256, 16, wmma::mem_row_major);
#pragma unroll
                    for (int e = 0; e < o.num_elements; e++) acc[i].x[e] += o.x[e];
                }
            __syncthreads();
        }
}

// A warp's 32 rows of x from row0 over the 64 columns from k0, 8 vectors a
// lane (rows past R read as 0): lane l takes rows l / 8 + 4 i, columns l % 8 * 8.
static __device__ void lora2_load(uint4 (&v)[8], const bf16 *x, int row0, int R, int IN, int k0, int lane) {
#pragma unroll
    for (int i = 0; i < 8; i++) {
        int row = row0 + lane / 8 + 4 * i;
        v[i] = row < R ? __ldcs((const uint4 *)(x + (size_t)row * IN + k0 + lane % 8 * 8)) : make_uint4(0, 0, 0, 0);
    }
}

// Those rows masked (dropped8) into the warp's stage.
static __device__ void lora2_stage(bf16 *xs, const uint4 (&v)[8], int row0, int IN, int k0, int lane, float p,
                                   float keep_scale, unsigned long long seed, unsigned long long offset) {
#pragma unroll
    for (int i = 0; i < 8; i++) {
        int rr = lane / 8 + 4 * i, col = lane % 8 * 8;
        size_t e = (size_t)(row0 + rr) * IN + k0 + col;
        *(uint4 *)&xs[rr * kLoraLd + col] = dropped8(v[i], p, keep_scale, seed, offset + e);
    }
}

// u: a block takes 32 rows and the 64-wide chunks of IN, warp w every
// (gridDim.y * kLora2Warps)-th chunk from blockIdx.y * kLora2Warps + w. One
// split: u[g] in bf16; several: the split's sums to ws[blockIdx.y] (R, NF *
// 16) for lora_down_sum_kernel.
template <int NF>
static __global__ void __launch_bounds__(32 * kLora2Warps)
    lora_down2_kernel(float *ws, lora_set set, const bf16 *x, int R, int IN, int r, float p, float keep_scale,
                      unsigned long long seed, unsigned long long offset) {
    constexpr int kWidth = NF * 16, kFrags = 2 * NF;
    __shared__ __align__(32) bf16 smem[kLora2Warps * kLora2Stage];
    static_assert(kLora2Warps * kLora2Stage * 2 >= kFrags * 256 * 4, "room for one warp's sums");
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, row0 = blockIdx.x * kLora2Rows;
    int chunks = IN / kLoraCols, step = gridDim.y * kLora2Warps, c = blockIdx.y * kLora2Warps + warp;
    bf16 *xs = smem + warp * kLora2Stage;
    frag_acc acc[kFrags];  // row tile t, fragment f at t * NF + f
#pragma unroll
    for (int i = 0; i < kFrags; i++) wmma::fill_fragment(acc[i], 0.0f);
    uint4 next[8];
    if (c < chunks) lora2_load(next, x, row0, R, IN, c * kLoraCols, lane);
    for (; c < chunks; c += step) {
        int k0 = c * kLoraCols;
        frag_b_col fb[kLoraCols / 16][NF];  // A^T over the chunk: (k, j) at a[j * IN + k]
#pragma unroll
        for (int kk = 0; kk < kLoraCols / 16; kk++)
#pragma unroll
            for (int f = 0; f < NF; f++)
                wmma::load_matrix_sync(fb[kk][f], pick(f * 16 / r, set.a) + (size_t)(f * 16 % r) * IN + k0 + kk * 16,
                                       IN);
        lora2_stage(xs, next, row0, IN, k0, lane, p, keep_scale, seed, offset);
        __syncwarp();
        if (c + step < chunks) lora2_load(next, x, row0, R, IN, (c + step) * kLoraCols, lane);
#pragma unroll
        for (int kk = 0; kk < kLoraCols / 16; kk++)
#pragma unroll
            for (int t = 0; t < 2; t++) {
                frag_a_row fa;
                wmma::load_matrix_sync(fa, xs + t * 16 * kLoraLd + kk * 16, kLoraLd);
#pragma unroll
                for (int f = 0; f < NF; f++) wmma::mma_sync(acc[t * NF + f], fa, fb[kk][f], acc[t * NF + f]);
            }
        __syncwarp();
    }
    __syncthreads();  // the stages are free: the sums go there
    float *buf = (float *)smem;
    sum_warps(acc, buf, kLora2Warps * kLora2Stage * 2 / (kFrags * 256 * 4));
    if (warp == 0)
#pragma unroll
        for (int t = 0; t < 2; t++)
#pragma unroll
            for (int f = 0; f < NF; f++)
                wmma::store_matrix_sync(buf + t * 16 * kWidth + f * 16, acc[t * NF + f], kWidth, wmma::mem_row_major);
    __syncthreads();
    for (int i = threadIdx.x; i < kLora2Rows * kWidth; i += blockDim.x) {
        int row = row0 + i / kWidth, j = i % kWidth;
        if (row >= R) continue;
        if (gridDim.y == 1)
            pick(j / r, set.out)[(size_t)row * r + j % r] = __float2bfloat16(buf[i]);
        else
            ws[((size_t)blockIdx.y * R + row) * kWidth + j] = buf[i];
    }
}

// Splits of IN across blocks only where one block of 32 rows each would leave
// more than half the SMs idle (their partial sums need the scratch; without
// room, one split).
static int lora_down2(const mt_backend *be, void *const *u, const void *const *a, int count, const void *x,
                      void *scratch, size_t scratch_bytes, int R, int IN, int r, float p, uint64_t seed,
                      uint64_t offset) {
    int NF = count * r / 16, width = NF * 16, row_blocks = (R + kLora2Rows - 1) / kLora2Rows, splits = 1;
    int chunks = IN / kLoraCols, sms = sm_count();
    if (row_blocks < sms / 2) {
        splits = (sms + row_blocks - 1) / row_blocks;
        int most = (chunks + kLora2Warps - 1) / kLora2Warps;  // a chunk a warp at least
        if (splits > most) splits = most;
        size_t room = scratch ? scratch_bytes / ((size_t)R * width * 4) : 0;
        if ((size_t)splits > room) splits = room > 1 ? (int)room : 1;
    }
    lora_set set = {};
    for (int g = 0; g < count; g++) set.out[g] = (bf16 *)u[g], set.a[g] = (const bf16 *)a[g];
    float *ws = (float *)scratch;
    cudaStream_t st = mt_stream_of(be);
    dim3 grid(row_blocks, splits), block(32 * kLora2Warps);
    float keep_scale = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
    launch_1_to_8(NF, [&](auto nf) {
        if constexpr (nf() <= kLora2Frags)
            lora_down2_kernel<nf()><<<grid, block, 0, st>>>(ws, set, (const bf16 *)x, R, IN, r, p, keep_scale,
                                                            (unsigned long long)seed, (unsigned long long)offset);
    });
    if (splits > 1) {
        size_t n = (size_t)R * width;
        lora_down_sum_kernel<<<grid_for(n, kThreads), kThreads, 0, st>>>(set, ws, splits, R, width, r);
        CUDA_CHECK_LAUNCH();
    }
    return 1;
}

extern "C" int mt_lora_down_cuda(const mt_backend *be, void *const *u, const void *const *a, int count, const void *x,
                                 void *scratch, size_t scratch_bytes, int R, int IN, int r, float p, uint64_t seed,
                                 uint64_t offset) {
    if (!lora_fused_serves(LORA_U, p, count, x, R, IN, r, offset) || !lora_aligned(a, count)) return 0;
    if (lora_v2(count, r) && lora_aligned32(a, count))
        return lora_down2(be, u, a, count, x, scratch, scratch_bytes, R, IN, r, p, seed, offset);
    if (!scratch) return 0;
    int NF = count * r / 16, width = NF * 16, row_blocks = (R + kLoraRows - 1) / kLoraRows;
    // splits of IN enough for about 4 blocks an SM, their partial sums (R, width) in fp32 within the scratch
    int chunks = IN / kLoraCols, splits = (4 * sm_count() + row_blocks - 1) / row_blocks;
    size_t room = scratch_bytes / ((size_t)R * width * 4);
    if (splits > chunks) splits = chunks;
    if ((size_t)splits > room) splits = (int)room;
    if (splits < 1 || (uintptr_t)scratch % 32) return 0;  // WMMA stores its tiles 32-byte aligned
    lora_set set = {};
    for (int g = 0; g < count; g++) set.out[g] = (bf16 *)u[g], set.a[g] = (const bf16 *)a[g];
    float *ws = (float *)scratch;
    cudaStream_t st = mt_stream_of(be);
    dim3 grid(row_blocks, splits), block(32 * kLoraWarps);
    const bf16 *xb = (const bf16 *)x;
    float keep_scale = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
    launch_1_to_8(NF, [&](auto nf) {
        lora_down_kernel<nf()><<<grid, block, 0, st>>>(ws, set, xb, R, IN, r, p, keep_scale, (unsigned long long)seed,
                                                       (unsigned long long)offset);
    });
    size_t n = (size_t)R * width;
    lora_down_sum_kernel<<<grid_for(n, kThreads), kThreads, 0, st>>>(set, ws, splits, R, width, r);
    CUDA_CHECK_LAUNCH();
    return 1;
}

// acc[f] += du^T x over a chunk of kLoraRows rows: du (the rows' NF * 16
// adapter columns) at dus with row stride ldu, the masked x at xs, the
// warp's 16 columns of it (dA's products, in one order for every kernel).
template <int NF>
static __device__ __forceinline__ void du_x_products(frag_acc (&acc)[NF], const bf16 *xs, const bf16 *dus, int ldu,
                                                     int warp) {
#pragma unroll
    for (int kk = 0; kk < kLoraRows; kk += 16) {
        frag_b_row fb;
        wmma::load_matrix_sync(fb, &xs[kk * kLoraLd + warp * 16], kLoraLd);
#pragma unroll
        for (int f = 0; f < NF; f++) {
            frag_a_col fa;  // du^T: (j, row) at dus[row][j]
            wmma::load_matrix_sync(fa, &dus[kk * ldu + f * 16], ldu);
            wmma::mma_sync(acc[f], fa, fb, acc[f]);
        }
    }
}

// A block: the group's dA over 64 columns of IN (NF * 16 rows: the
// adapters' r side by side), summed over its split of R's rows (every
// gridDim.y-th 64-row chunk from blockIdx.y): the chunk's du and masked x in
// shared memory, warp w the columns 16 w .. 16 w + 15 of each fragment row;
// the partial sums to ws[blockIdx.y] (NF * 16, IN) in fp32.
template <int NF>
static __global__ void lora_down_wgrad_kernel(float *ws, lora_set set, const bf16 *x, int R, int IN, int r, float p,
                                              float keep_scale, unsigned long long seed, unsigned long long offset) {
    constexpr int ldu = NF * 16 + 8;
    __shared__ __align__(32) bf16 xs[kLoraRows * kLoraLd];
    __shared__ __align__(32) bf16 dus[kLoraRows * ldu];
    int warp = threadIdx.x / 32, col0 = blockIdx.x * kLoraCols;
    frag_acc acc[NF];
#pragma unroll
    for (int f = 0; f < NF; f++) wmma::fill_fragment(acc[f], 0.0f);
    for (int row0 = blockIdx.y * kLoraRows; row0 < R; row0 += gridDim.y * kLoraRows) {
        for (int v = threadIdx.x; v < kLoraRows * (kLoraCols / 8); v += blockDim.x) {
            int rr = v / (kLoraCols / 8), col = v % (kLoraCols / 8) * 8, row = row0 + rr;
            uint4 val = make_uint4(0, 0, 0, 0);
            if (row < R) {
                size_t e = (size_t)row * IN + col0 + col;
                val = dropped8(__ldcs((const uint4 *)(x + e)), p, keep_scale, seed, offset + e);
            }
            *(uint4 *)&xs[rr * kLoraLd + col] = val;
        }
        for (int v = threadIdx.x; v < kLoraRows * NF * 2; v += blockDim.x) {
            int rr = v / (NF * 2), j = v % (NF * 2) * 8, g = j / r, row = row0 + rr;
            uint4 val = make_uint4(0, 0, 0, 0);
            if (row < R) val = *(const uint4 *)(pick(g, set.du) + (size_t)row * r + j % r);
            *(uint4 *)&dus[rr * ldu + j] = val;
        }
        __syncthreads();
        du_x_products(acc, xs, dus, ldu, warp);
        __syncthreads();
    }
#pragma unroll
    for (int f = 0; f < NF; f++)
        wmma::store_matrix_sync(ws + ((size_t)blockIdx.y * NF * 16 + f * 16) * IN + col0 + warp * 16, acc[f], IN,
                                wmma::mem_row_major);
}

// dA (r, IN) of each adapter += the splits' partial sums, added in split
// order (unrolled: a thread's loads are in flight together); a thread an
// element of one adapter's dA, or with `serial` (parts of a fused module
// share one dA) an element of all of them in turn, so their adds stay in
// order.
static __global__ void lora_down_wgrad_sum_kernel(lora_set set, const float *ws, int splits, int count, int r, int IN,
                                                  int serial) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x, plane = (size_t)r * IN, stride = count * plane;
    if (i >= (serial ? 1 : count) * plane) return;
    int first = serial ? 0 : (int)(i / plane), last = serial ? count - 1 : first;
    size_t e = i % plane;  // the element of dA[g]
    for (int g = first; g <= last; g++) {
        const float *w = ws + g * plane + e;
        float sum = 0.0f;
#pragma unroll 8
        for (int s = 0; s < splits; s++) sum += w[s * stride];
        pick(g, set.da)[e] += sum;
    }
}

// dA[g] += the splits' partial sums in ws (splits, NF * 16, IN).
static void lora_down_wgrad_sum(cudaStream_t st, const lora_set &set, float *const *da, const float *ws, int splits,
                                int count, int r, int IN) {
    int serial = 0;
    for (int g = 0; g < count; g++)
        for (int h = 0; h < g; h++) serial |= da[g] == da[h];
    size_t n = (size_t)(serial ? 1 : count) * r * IN;
    lora_down_wgrad_sum_kernel<<<grid_for(n, kThreads), kThreads, 0, st>>>(set, ws, splits, count, r, IN, serial);
    CUDA_CHECK_LAUNCH();
}

// Splits of R for dA's kernels: enough for about 4 blocks an SM, their
// partial sums (NF * 16, IN) in fp32 within the scratch (32-byte aligned for
// WMMA's stores); 0: no room.
static int lora_wgrad_splits(const void *scratch, size_t scratch_bytes, int R, int IN, int NF) {
    if (!scratch || (uintptr_t)scratch % 32) return 0;
    int col_blocks = IN / kLoraCols, row_chunks = (R + kLoraRows - 1) / kLoraRows;
    int splits = (4 * sm_count() + col_blocks - 1) / col_blocks;
    size_t room = scratch_bytes / ((size_t)NF * 16 * IN * 4);
    if (splits > row_chunks) splits = row_chunks;
    if ((size_t)splits > room) splits = (int)room;
    return splits;
}

extern "C" int mt_lora_down_wgrad_cuda(const mt_backend *be, float *const *da, const void *const *du, int count,
                                       const void *x, void *scratch, size_t scratch_bytes, int R, int IN, int r,
                                       float p, uint64_t seed, uint64_t offset) {
    if (!lora_fused_serves(LORA_DA, p, count, x, R, IN, r, offset) || !lora_aligned(du, count)) return 0;
    int NF = count * r / 16, col_blocks = IN / kLoraCols, splits = lora_wgrad_splits(scratch, scratch_bytes, R, IN, NF);
    if (splits < 1) return 0;
    lora_set set = {};
    for (int g = 0; g < count; g++) set.du[g] = (const bf16 *)du[g], set.da[g] = da[g];
    float *ws = (float *)scratch;
    cudaStream_t st = mt_stream_of(be);
    dim3 grid(col_blocks, splits), block(32 * kLoraWarps);
    const bf16 *xb = (const bf16 *)x;
    float keep_scale = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
    launch_1_to_8(NF, [&](auto nf) {
        lora_down_wgrad_kernel<nf()><<<grid, block, 0, st>>>(ws, set, xb, R, IN, r, p, keep_scale,
                                                             (unsigned long long)seed, (unsigned long long)offset);
    });
    lora_down_wgrad_sum(st, set, da, ws, splits, count, r, IN);
    return 1;
}

// dx's 8 values (v, their old ones) at dst + the sums' 8 (mask bits keep):
// bf16(v + bf16(bf16(sum) / (1 - p))) where kept, v where dropped, and
// bf16(v + sum) where p is 0.
static __device__ void add_dx8(bf16 *dst, uint4 v, const float *sum, unsigned keep, float p, float keep_scale) {
    float d[8];
    const bf16 *h = (const bf16 *)&v;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        float s = sum[j];
        if (p > 0.0f)
            s = keep >> j & 1 ? __bfloat162float(__float2bfloat16(__bfloat162float(__float2bfloat16(s)) * keep_scale))
                              : 0.0f;
        d[j] = __bfloat162float(h[j]) + s;
    }
    store8(dst, d);
}

// A warp's 16 rows of the group's sum of du A over 64 columns, into s (rows
// kLoraCols + 4 floats apart), then __syncwarp: du's fragment f (16 rows of
// 16 of the group's r side by side) at du_at(f), rows ld apart; A's (NF *
// 16, 64) at as (load_a_chunk's layout). The dx kernel and the one-pass
// backward both form dx's sums here, so they agree bit for bit.
template <int NF, typename DuAt>
static __device__ void du_a_sums(float *s, const bf16 *as, DuAt du_at, unsigned ld) {
    frag_acc acc[kLoraCols / 16];
#pragma unroll
    for (int c = 0; c < kLoraCols / 16; c++) wmma::fill_fragment(acc[c], 0.0f);
#pragma unroll
    for (int f = 0; f < NF; f++) {
        frag_a_row fa;
        wmma::load_matrix_sync(fa, du_at(f), ld);
#pragma unroll
        for (int c = 0; c < kLoraCols / 16; c++) {
            frag_b_row fb;
            wmma::load_matrix_sync(fb, &as[f * 16 * kLoraLd + c * 16], kLoraLd);
            wmma::mma_sync(acc[c], fa, fb, acc[c]);
        }
    }
#pragma unroll
    for (int c = 0; c < kLoraCols / 16; c++)
        wmma::store_matrix_sync(s + c * 16, acc[c], kLoraCols + 4, wmma::mem_row_major);
    __syncwarp();
}

// A block: 64 rows by 64 columns of dx, 16 rows a warp. The group's sum of
// du[g] A[g] over those columns, then dx = bf16(dx + kept), kept being
// dropout's bf16(bf16(sum) / (1 - p)) or 0 where p > 0 (as the sum stored,
// then dropped out and added), bf16(dx + sum) where p is 0.
template <int NF>
static __global__ void lora_down_backward_kernel(bf16 *dx, lora_set set, int R, int IN, int r, float p,
                                                 float keep_scale, unsigned long long seed, unsigned long long offset) {
    __shared__ __align__(32) bf16 as[NF * 16 * kLoraLd];
    __shared__ __align__(32) float sums[kLoraWarps][16 * (kLoraCols + 4)];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, row0 = blockIdx.y * kLoraRows + warp * 16;
    int col0 = blockIdx.x * kLoraCols;
    load_a_chunk<NF>(as, set, r, IN, col0);
    __syncthreads();
    if (row0 >= R) return;
    float *s = sums[warp];
    du_a_sums<NF>(
        s, as, [&](int f) { return pick(f * 16 / r, set.du) + (size_t)row0 * r + f * 16 % r; }, r);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int v = lane + 32 * i, rr = v / (kLoraCols / 8), col = v % (kLoraCols / 8) * 8;
        size_t e = (size_t)(row0 + rr) * IN + col0 + col;
        unsigned keep = p > 0.0f ? dropout_keep8(seed, (offset + e) / 8, dropout_threshold(p)) : 0xffu;
        add_dx8(dx + e, *(const uint4 *)(dx + e), s + rr * (kLoraCols + 4) + col, keep, p, keep_scale);
    }
}

extern "C" int mt_lora_down_dx_cuda(const mt_backend *be, void *dx, const void *const *du, const void *const *a,
                                    int count, int R, int IN, int r, float p, uint64_t seed, uint64_t offset) {
    if (!lora_fused_serves(LORA_DX, p, count, dx, R, IN, r, offset) || !lora_aligned(a, count)) return 0;
    if (!lora_aligned32(du, count)) return 0;  // WMMA loads its tiles 32-byte aligned
    lora_set set = {};
    for (int g = 0; g < count; g++) set.a[g] = (const bf16 *)a[g], set.du[g] = (const bf16 *)du[g];
    int NF = count * r / 16;
    dim3 grid(IN / kLoraCols, (R + kLoraRows - 1) / kLoraRows), block(32 * kLoraWarps);
    cudaStream_t st = mt_stream_of(be);
    float keep_scale = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
    launch_1_to_8(NF, [&](auto nf) {
        lora_down_backward_kernel<nf()><<<grid, block, 0, st>>>((bf16 *)dx, set, R, IN, r, p, keep_scale,
                                                                (unsigned long long)seed, (unsigned long long)offset);
    });
    return 1;
}

// dA and dx of a group in one pass, for up to kLoraBothFrags fragments: a
// block is lora_down_wgrad_kernel's (64 columns of IN over its split of R's
// 64-row chunks) and also writes dx over those columns for each chunk as
// lora_down_backward_kernel does: the same products in the same order, so
// the same bits as those two kernels, but the mask is drawn once for both
// (x's element and dx's at one index share it) and the next chunk's x, dx
// and du are loaded while the current one is multiplied. A thread's share of
// a chunk's x and dx: rows 16 warp + lane / 8 + 4 i, columns lane % 8 * 8.
constexpr int kLoraBothFrags = 4;

template <int NF>
static __global__ void __launch_bounds__(32 * kLoraWarps, 3)
    lora_down_both_kernel(bf16 *dx, float *ws, lora_set set, const bf16 *x, int R, int IN, int r, float p,
                          float keep_scale, unsigned long long seed, unsigned long long offset) {
    constexpr int ldu = NF * 16 + 8, kDuVecs = kLoraRows * NF * 2,
                  kDuPer = (kDuVecs + 32 * kLoraWarps - 1) / (32 * kLoraWarps);
    __shared__ __align__(32) bf16 xs[kLoraRows * kLoraLd];
    __shared__ __align__(32) bf16 dus[kLoraRows * ldu];
    __shared__ __align__(32) bf16 as[NF * 16 * kLoraLd];
    __shared__ __align__(32) float sums[kLoraWarps][16 * (kLoraCols + 4)];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, col0 = blockIdx.x * kLoraCols, step = gridDim.y * kLoraRows;
    unsigned threshold = dropout_threshold(p);
    uint4 xv[4], dxv[4], duv[kDuPer];
    auto load = [&](int row0) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int row = row0 + 16 * warp + lane / 8 + 4 * i;
            size_t e = (size_t)row * IN + col0 + lane % 8 * 8;
            xv[i] = row < R ? __ldcs((const uint4 *)(x + e)) : make_uint4(0, 0, 0, 0);
            dxv[i] = row < R ? *(const uint4 *)(dx + e) : make_uint4(0, 0, 0, 0);  // past R: never written back
        }
#pragma unroll
        for (int k = 0; k < kDuPer; k++) {
            int v = threadIdx.x + 32 * kLoraWarps * k, rr = v / (NF * 2), j = v % (NF * 2) * 8, row = row0 + rr;
            duv[k] = v < kDuVecs && row < R ? *(const uint4 *)(pick(j / r, set.du) + (size_t)row * r + j % r)
                                            : make_uint4(0, 0, 0, 0);
        }
    };
    load_a_chunk<NF>(as, set, r, IN, col0);
    frag_acc da_acc[NF];
#pragma unroll
    for (int f = 0; f < NF; f++) wmma::fill_fragment(da_acc[f], 0.0f);
    int row0 = blockIdx.y * kLoraRows;
    if (row0 < R) load(row0);
    for (; row0 < R; row0 += step) {
        unsigned keep[4];
        uint4 dcur[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int rr = 16 * warp + lane / 8 + 4 * i, col = lane % 8 * 8;
            size_t e = (size_t)(row0 + rr) * IN + col0 + col;
            keep[i] = p > 0.0f ? dropout_keep8(seed, (offset + e) / 8, threshold) : 0xffu;
            *(uint4 *)&xs[rr * kLoraLd + col] = p > 0.0f ? kept8(xv[i], keep[i], keep_scale) : xv[i];
            dcur[i] = dxv[i];
        }
#pragma unroll
        for (int k = 0; k < kDuPer; k++) {
            int v = threadIdx.x + 32 * kLoraWarps * k;
            if (v < kDuVecs) *(uint4 *)&dus[v / (NF * 2) * ldu + v % (NF * 2) * 8] = duv[k];
        }
        __syncthreads();
        if (row0 + step < R) load(row0 + step);  // in flight during the products
        // dA: the warp's 16 columns, every fragment (lora_down_wgrad_kernel's products)
        du_x_products(da_acc, xs, dus, ldu, warp);
        // dx: the warp's 16 rows, every column (lora_down_backward_kernel's products)
        if (row0 + 16 * warp < R) {
            float *s = sums[warp];
            du_a_sums<NF>(
                s, as, [&](int f) { return &dus[16 * warp * ldu + f * 16]; }, ldu);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int rr = lane / 8 + 4 * i, col = lane % 8 * 8;
                add_dx8(dx + (size_t)(row0 + 16 * warp + rr) * IN + col0 + col, dcur[i], s + rr * (kLoraCols + 4) + col,
                        keep[i], p, keep_scale);
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int f = 0; f < NF; f++)
        wmma::store_matrix_sync(ws + ((size_t)blockIdx.y * NF * 16 + f * 16) * IN + col0 + warp * 16, da_acc[f], IN,
                                wmma::mem_row_major);
}

extern "C" int mt_lora_down_backward_cuda(const mt_backend *be, void *dx, float *const *da, const void *const *du,
                                          const void *const *a, int count, const void *x, void *scratch,
                                          size_t scratch_bytes, int R, int IN, int r, float p, uint64_t seed,
                                          uint64_t offset) {
    int NF = count * r / 16;
    if (lora_version1() || NF > kLoraBothFrags || !lora_fused_serves(LORA_DA, p, count, x, R, IN, r, offset) ||
        !lora_fused_serves(LORA_DX, p, count, dx, R, IN, r, offset) || !lora_aligned(a, count) ||
        !lora_aligned(du, count))
        return 0;
    int splits = lora_wgrad_splits(scratch, scratch_bytes, R, IN, NF);
    if (splits < 1) return 0;
    lora_set set = {};
    for (int g = 0; g < count; g++) set.a[g] = (const bf16 *)a[g], set.du[g] = (const bf16 *)du[g], set.da[g] = da[g];
    float *ws = (float *)scratch;
    cudaStream_t st = mt_stream_of(be);
    dim3 grid(IN / kLoraCols, splits), block(32 * kLoraWarps);
    float keep_scale = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
    launch_1_to_8(NF, [&](auto nf) {
        if constexpr (nf() <= kLoraBothFrags)
            lora_down_both_kernel<nf()><<<grid, block, 0, st>>>((bf16 *)dx, ws, set, (const bf16 *)x, R, IN, r, p,
                                                                keep_scale, (unsigned long long)seed,
                                                                (unsigned long long)offset);
    });
    lora_down_wgrad_sum(st, set, da, ws, splits, count, r, IN);
    return 1;
}

// --------------------------------------------------------------------- MeZO
// z(seed, i) as rng.h defines it: Philox group i / 4 from cuRAND, Box-Muller
// on 23-bit uniforms in single precision. The weight passes give a thread
// two groups (thread_groups); the embedding rows' and GaLore's kernels one.

static __device__ uint4 philox_group(unsigned long long seed, unsigned long long group) {
    uint4 counter = make_uint4((unsigned)group, (unsigned)(group >> 32), 0u, 0u);
    uint2 key = make_uint2((unsigned)seed, (unsigned)(seed >> 32));
    return curand_Philox4x32_10(counter, key);
}

static __device__ float sqrt_approx(float x) {
    float r;
    asm("sqrt.approx.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// Box-Muller in hardware approximations (MUFU log2, sqrt, sin, cos: absolute
// errors near 1e-6, far below bf16's resolution), the angle taken in
// [-pi, pi) where __sincosf is accurate: cos(2 pi u - pi) = -cos(2 pi u).
// The uniforms are a word's top bits in a float's mantissa: no conversion
// unit (it shares the MUFU's throughput) and no IEEE square root.
static __device__ void gauss4(unsigned long long seed, unsigned long long group, float z[4]) {
    uint4 w = philox_group(seed, group);
    unsigned words[4] = {w.x, w.y, w.z, w.w};
    for (int pair = 0; pair < 2; pair++) {
        float u1 = 2.0f - __uint_as_float(0x3f800000u | (words[2 * pair] >> 9));
        float u2 = __uint_as_float(0x3f800000u | (words[2 * pair + 1] >> 9)) - 1.0f;
        float r = sqrt_approx(-2.0f * __logf(u1)), s, c;
        __sincosf(6.283185307f * u2 - 3.141592654f, &s, &c);
        z[2 * pair] = -r * c;
        z[2 * pair + 1] = -r * s;
    }
}

// Four bf16 at 8-byte aligned p, as floats and back.
static __device__ void load4(const bf16 *p, float v[4]) {
    uint2 raw = *(const uint2 *)p;
    __nv_bfloat162 lo = *(__nv_bfloat162 *)&raw.x, hi = *(__nv_bfloat162 *)&raw.y;
    float2 a = __bfloat1622float2(lo), b = __bfloat1622float2(hi);
    v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
}

static __device__ void store4(bf16 *p, const bf16 v[4]) {
    __nv_bfloat162 lo = __halves2bfloat162(v[0], v[1]), hi = __halves2bfloat162(v[2], v[3]);
    uint2 raw;
    raw.x = *(unsigned *)&lo, raw.y = *(unsigned *)&hi;
    *(uint2 *)p = raw;
}

// Whether a thread's four elements from j0 are whole and 8-byte aligned.
static __device__ bool whole4(const void *base, long long j0, size_t n) {
    return j0 >= 0 && (size_t)j0 + 4 <= n && (((uintptr_t)base + (size_t)j0 * 2) & 7) == 0;
}

// Element j0 + q (q < 4) of a range has z index 4 * group + q; j0 may be
// negative for the first group when offset is not a multiple of 4.
static __device__ long long group_start(size_t t, unsigned long long offset) {
    return (long long)((offset / 4 + t) * 4) - (long long)offset;
}

static size_t group_count(size_t n, uint64_t offset) { return (size_t)((offset + n + 3) / 4 - offset / 4); }

// Whether eight elements from j0 are whole and 16-byte aligned.
static __device__ bool whole8(const void *base, long long j0, size_t n) {
    return j0 >= 0 && (size_t)j0 + 8 <= n && (((uintptr_t)base + (size_t)j0 * 2) & 15) == 0;
}

// The MeZO kernels give each thread two consecutive groups (8 elements):
// the index arithmetic once, and one 16-byte load and store where aligned.
static __device__ int thread_groups(size_t n, unsigned long long offset, size_t *first) {
    size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x, groups = (offset + n + 3) / 4 - offset / 4;
    *first = 2 * t;
    return *first >= groups ? 0 : *first + 1 < groups ? 2 : 1;
}

static unsigned grid_for_groups(size_t groups) { return grid_for((groups + 1) / 2, kThreads); }

// Elements j0 + q (q < 4 * count) of src into v (zero outside [0, n)): one
// 16-byte load for both groups where aligned, else 8 bytes or one element
// at a time per group. Every loop has a constant bound and is unrolled, so
// the arrays stay in registers (a loop to `count` put them in local memory:
// on an H100 the 1.1B perturbation pass took 5.3 ms against 2.4).
static __device__ __forceinline__ void load_groups(const bf16 *src, long long j0, size_t n, int count, float v[8]) {
    if (count == 2 && whole8(src, j0, n)) {
        load8(v, src + j0);
        return;
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {
        long long jh = j0 + 4 * h;
        if (h < count && whole4(src, jh, n)) {
            load4(src + jh, v + 4 * h);
            continue;
        }
#pragma unroll
        for (int q = 0; q < 4; q++)
            v[4 * h + q] = h < count && jh + q >= 0 && (size_t)(jh + q) < n ? __bfloat162float(src[jh + q]) : 0.0f;
    }
}

static __device__ __forceinline__ void store_groups(bf16 *dst, long long j0, size_t n, int count, const bf16 out[8]) {
    if (count == 2 && whole8(dst, j0, n)) {
        uint4 u;
        memcpy(&u, out, sizeof u);
        *(uint4 *)(dst + j0) = u;
        return;
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {
        long long jh = j0 + 4 * h;
        if (h < count && whole4(dst, jh, n)) {
            store4(dst + jh, out + 4 * h);
            continue;
        }
#pragma unroll
        for (int q = 0; q < 4; q++)
            if (h < count && jh + q >= 0 && (size_t)(jh + q) < n) dst[jh + q] = out[4 * h + q];
    }
}

// The perturbation's read, and where `mirror` is not NULL the opposite
// sign's, src - scale z, written as the kernel with -scale writes it (the same
// rounding of the same fma).
static __device__ __forceinline__ void store_perturbed(bf16 *dst, bf16 *mirror, long long j0, size_t n, int count,
                                                       const float v[8], float scale, const float z[8]) {
    bf16 out[8];
#pragma unroll
    for (int q = 0; q < 8; q++) out[q] = __float2bfloat16(v[q] + scale * z[q]);
    store_groups(dst, j0, n, count, out);
    if (!mirror) return;
    float opposite = -scale;
#pragma unroll
    for (int q = 0; q < 8; q++) out[q] = __float2bfloat16(v[q] + opposite * z[q]);
    store_groups(mirror, j0, n, count, out);
}

static __global__ void perturb_kernel(bf16 *dst, bf16 *mirror, const bf16 *src, size_t n, float scale,
                                      unsigned long long seed, unsigned long long offset) {
    size_t t;
    int count = thread_groups(n, offset, &t);
    if (!count) return;
    float z[8], v[8];
#pragma unroll
    for (int h = 0; h < 2; h++) gauss4(seed, offset / 4 + t + h, z + 4 * h);  // a second past the end is unused
    long long j0 = group_start(t, offset);
    load_groups(src, j0, n, count, v);
    store_perturbed(dst, mirror, j0, n, count, v, scale, z);
}

extern "C" void mt_perturb_cuda(const mt_backend *be, void *dst, void *mirror, const void *src, size_t n, float scale,
                                uint64_t seed, uint64_t offset) {
    (void)be;
    if (n == 0) return;
    perturb_kernel<<<grid_for_groups(group_count(n, offset)), kThreads, 0, mt_stream_of(be)>>>(
        (bf16 *)dst, (bf16 *)mirror, (const bf16 *)src, n, scale, (unsigned long long)seed, (unsigned long long)offset);
    CUDA_CHECK_LAUNCH();
}

static __global__ void perturb_rows_kernel(bf16 *x, const int32_t *tokens, int N, int C, float scale,
                                           unsigned long long seed, unsigned long long offset) {
    size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (size_t)N * C) return;
    size_t row = e / C, c = e % C;
    unsigned long long i = offset + (unsigned long long)tokens[row] * C + c;
    float z[4];
    gauss4(seed, i / 4, z);
    x[e] = __float2bfloat16(__bfloat162float(x[e]) + scale * z[i % 4]);
}

extern "C" void mt_perturb_rows_cuda(const mt_backend *be, void *x, const int32_t *tokens, int N, int C, float scale,
                                     uint64_t seed, uint64_t offset) {
    (void)be;
    size_t n = (size_t)N * C;
    if (n == 0) return;
    perturb_rows_kernel<<<grid_for(n, kThreads), kThreads, 0, mt_stream_of(be)>>>(
        (bf16 *)x, tokens, N, C, scale, (unsigned long long)seed, (unsigned long long)offset);
    CUDA_CHECK_LAUNCH();
}

// fp32 -> bf16 rounded up in magnitude with probability equal to the
// fraction cut off (16 random bits added below the kept ones): E[result] = x.
static __device__ bf16 bf16_stochastic(float x, unsigned random_bits) {
    unsigned bits = __float_as_uint(x);
    if ((bits & 0x7f800000u) != 0x7f800000u) bits += random_bits >> 16;  // inf and NaN pass unchanged
    return __ushort_as_bfloat16((unsigned short)(bits >> 16));
}

// 16 rounding bits (in the high half) for each of the 4 elements of a group.
// The rounding needs independent bits, not Philox's quality: splitmix_hash
// gives them at a sixth of the cost.
static __device__ void round_bits4(unsigned long long seed, unsigned long long group, unsigned random[4]) {
    unsigned long long h = splitmix_hash(seed, group);
    random[0] = (unsigned)(h << 16), random[1] = (unsigned)h & 0xffff0000u;
    random[2] = (unsigned)(h >> 16) << 16, random[3] = (unsigned)(h >> 32) & 0xffff0000u;
}

// The update, and with `perturbed` also the next forward's read of the
// updated weights, w_new + scale * z(seed), in the same pass: the same values
// as the update kernel followed by the perturbation kernel, one read fewer.
static __global__ void zo_update_kernel(bf16 *w, size_t n, unsigned long long offset, mt_zo_directions d, float lr,
                                        float weight_decay, unsigned long long round_seed, bf16 *perturbed,
                                        bf16 *mirror, float scale, unsigned long long seed) {
    size_t t;
    int count = thread_groups(n, offset, &t);
    if (!count) return;
    float step[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f}, z[4], v[8];
    unsigned random[8];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        unsigned long long group = offset / 4 + t + h;
        for (int k = 0; k < d.count; k++) {
            gauss4(d.seed[k], group, z);
#pragma unroll
            for (int q = 0; q < 4; q++) step[4 * h + q] += d.coef[k] * z[q];
        }
        round_bits4(round_seed, group, random + 4 * h);
    }
    long long j0 = group_start(t, offset);
    load_groups(w, j0, n, count, v);
    bf16 out[8];
#pragma unroll
    for (int q = 0; q < 8; q++) out[q] = bf16_stochastic(v[q] - lr * (step[q] + weight_decay * v[q]), random[q]);
    store_groups(w, j0, n, count, out);
    if (!perturbed) return;
    float zn[8];
#pragma unroll
    for (int h = 0; h < 2; h++) gauss4(seed, offset / 4 + t + h, zn + 4 * h);
#pragma unroll
    for (int q = 0; q < 8; q++) v[q] = __bfloat162float(out[q]);
    store_perturbed(perturbed, mirror, j0, n, count, v, scale, zn);
}

extern "C" void mt_zo_update_cuda(const mt_backend *be, void *w, size_t n, uint64_t offset, const mt_zo_directions *d,
                                  float lr, float weight_decay, uint64_t round_seed, void *perturbed, void *mirror,
                                  float scale, uint64_t seed) {
    (void)be;
    if (n == 0) return;
    zo_update_kernel<<<grid_for_groups(group_count(n, offset)), kThreads, 0, mt_stream_of(be)>>>(
        (bf16 *)w, n, (unsigned long long)offset, *d, lr, weight_decay, (unsigned long long)round_seed,
        (bf16 *)perturbed, (bf16 *)mirror, scale, (unsigned long long)seed);
    CUDA_CHECK_LAUNCH();
}

static __global__ void philox_words_kernel(uint32_t *out, size_t groups, unsigned long long seed) {
    size_t g = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= groups) return;
    uint4 w = philox_group(seed, g);
    out[4 * g] = w.x, out[4 * g + 1] = w.y, out[4 * g + 2] = w.z, out[4 * g + 3] = w.w;
}

extern "C" void mt_philox_words_cuda(uint32_t *out, size_t groups, uint64_t seed) {
    if (groups == 0) return;
    philox_words_kernel<<<grid_for(groups, kThreads), kThreads>>>(out, groups, (unsigned long long)seed);
    CUDA_CHECK_LAUNCH();
}

// ------------------------------------------------------------------ GaLore

static __global__ void apply_update_kernel(bf16 *w, const float *update, size_t n, float keep, float step,
                                           unsigned long long round_seed, const double *gate) {
    size_t g = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    long long j0 = (long long)(4 * g);
    if ((size_t)j0 >= n || gated_off(gate)) return;
    unsigned random[4];
    round_bits4(round_seed, g, random);
    if (whole4(w, j0, n) && ((uintptr_t)(update + j0) & 15) == 0) {
        float v[4];
        bf16 out[4];
        load4(w + j0, v);
        float4 u = *(const float4 *)(update + j0);
        float us[4] = {u.x, u.y, u.z, u.w};
        for (int q = 0; q < 4; q++) out[q] = bf16_stochastic(v[q] * keep - step * us[q], random[q]);
        store4(w + j0, out);
        return;
    }
    for (int q = 0; q < 4 && (size_t)(j0 + q) < n; q++)
        w[j0 + q] = bf16_stochastic(__bfloat162float(w[j0 + q]) * keep - step * update[j0 + q], random[q]);
}

extern "C" void mt_apply_update_cuda(const mt_backend *be, void *w, const float *update, size_t n, float lr,
                                     float scale, float weight_decay, uint64_t round_seed, const double *gate) {
    (void)be;
    if (n == 0) return;
    size_t groups = (n + 3) / 4;
    apply_update_kernel<<<grid_for(groups, kThreads), kThreads, 0, mt_stream_of(be)>>>(
        (bf16 *)w, update, n, 1.0f - lr * weight_decay, lr * scale, (unsigned long long)round_seed, gate);
    CUDA_CHECK_LAUNCH();
}

static __global__ void gauss_kernel(float *dst, size_t n, unsigned long long seed) {
    size_t g = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (4 * g >= n) return;
    float z[4];
    gauss4(seed, g, z);
    for (int q = 0; q < 4 && 4 * g + q < n; q++) dst[4 * g + q] = z[q];
}

extern "C" void mt_gauss_cuda(const mt_backend *be, float *dst, size_t n, uint64_t seed) {
    (void)be;
    if (n == 0) return;
    gauss_kernel<<<grid_for((n + 3) / 4, kThreads), kThreads, 0, mt_stream_of(be)>>>(dst, n, (unsigned long long)seed);
    CUDA_CHECK_LAUNCH();
}

// Adam's moment updates in explicit single roundings (no fused multiply-add),
// as the CPU computes them: the 8-bit codes then come out the same.
static __device__ float ema(float beta, float old, float x) {
    return __fadd_rn(__fmul_rn(beta, old), __fmul_rn(1.0f - beta, x));
}

static __device__ float adam_dir(float m, float v, float bc1, float bc2_sqrt, float eps) {
    return __fdiv_rn(__fdiv_rn(m, bc1), __fadd_rn(__fdiv_rn(__fsqrt_rn(v), bc2_sqrt), eps));
}

static __global__ void adam_direction_kernel(float *dir, const float *grad, float *m, float *v, size_t n, float beta1,
                                             float beta2, float eps, float bc1, float bc2_sqrt, const double *gate) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n || gated_off(gate)) return;
    float g = grad[i];
    float mi = ema(beta1, m[i], g), vi = ema(beta2, v[i], __fmul_rn(g, g));
    m[i] = mi, v[i] = vi;
    dir[i] = adam_dir(mi, vi, bc1, bc2_sqrt, eps);
}

static __constant__ float c_qmap[2][256];  // [0] unsigned, [1] signed (mt_qmap)

// One block per MT_QBLOCK values, one thread per value.
static __global__ void adam_direction_8bit_kernel(float *dir, const float *grad, unsigned char *mq, unsigned char *vq,
                                                  float *m_absmax, float *v_absmax, size_t n, float beta1, float beta2,
                                                  float eps, float bc1, float bc2_sqrt, const double *gate) {
    if (gated_off(gate)) return;  // (the whole block: every thread reads the same gate)
    size_t b = blockIdx.x, i = b * MT_QBLOCK + threadIdx.x;
    bool live = i < n;
    float m = 0.0f, v = 0.0f;
    if (live) {
        float g = grad[i];
        m = ema(beta1, __fmul_rn(c_qmap[1][mq[i]], m_absmax[b]), g);
        v = ema(beta2, __fmul_rn(c_qmap[0][vq[i]], v_absmax[b]), __fmul_rn(g, g));
        dir[i] = adam_dir(m, v, bc1, bc2_sqrt, eps);
    }
    float m_max = block_max(fabsf(m)), v_max = block_max(v);
    if (threadIdx.x == 0) m_absmax[b] = m_max, v_absmax[b] = v_max;
    if (!live) return;
    mq[i] = mt_qmap_nearest(c_qmap[1], m_max > 0.0f ? __fdiv_rn(m, m_max) : 0.0f);
    unsigned char code = mt_qmap_nearest(c_qmap[0], v_max > 0.0f ? __fdiv_rn(v, v_max) : 0.0f);
    vq[i] = code == 0 && v > 0.0f ? 1 : code;
}

extern "C" void mt_adam_direction_cuda(const mt_backend *be, float *dir, const float *grad, const mt_adam_state *s,
                                       size_t n, float beta1, float beta2, float eps, float bias_correction1,
                                       float bias_correction2, const double *gate) {
    (void)be;
    if (n == 0) return;
    float bc2_sqrt = sqrtf(bias_correction2);
    if (s->m) {
        adam_direction_kernel<<<grid_for(n, kThreads), kThreads, 0, mt_stream_of(be)>>>(
            dir, grad, s->m, s->v, n, beta1, beta2, eps, bias_correction1, bc2_sqrt, gate);
    } else {
        static int maps_loaded;
        if (!maps_loaded) {
            float maps[2][256];
            memcpy(maps[0], mt_qmap(0), sizeof maps[0]);
            memcpy(maps[1], mt_qmap(1), sizeof maps[1]);
            CUDA_CHECK(cudaMemcpyToSymbol(c_qmap, maps, sizeof maps));
            maps_loaded = 1;
        }
        size_t blocks = (n + MT_QBLOCK - 1) / MT_QBLOCK;
        adam_direction_8bit_kernel<<<(unsigned)blocks, MT_QBLOCK, 0, mt_stream_of(be)>>>(
            dir, grad, s->mq, s->vq, s->m_absmax, s->v_absmax, n, beta1, beta2, eps, bias_correction1, bc2_sqrt, gate);
    }
    CUDA_CHECK_LAUNCH();
}
