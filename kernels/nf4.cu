// kernels/nf4.cu: NF4 codes and dequantization on the GPU. Codes match the
// CPU reference bit for bit: the same fp32 operations, rounded to nearest
// with no fused multiply-add (__frcp_rn, __fmul_rn), the same comparisons.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/cuda_check.h"
#include "kernels/mem.h"
#include "kernels/nf4_cuda.h"

typedef __nv_bfloat16 bf16;

static const int kThreads = 256;

static unsigned grid_for(size_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }

__constant__ float nf4_code_device[16];
__constant__ float dynamic_map_device[256];

static void upload_tables(void) {
    static int done;
    if (done) return;
    float map[256];
    mt_nf4_dynamic_map(map);
    CUDA_CHECK(cudaMemcpyToSymbol(nf4_code_device, mt_nf4_code, sizeof(float) * 16));
    CUDA_CHECK(cudaMemcpyToSymbol(dynamic_map_device, map, sizeof map));
    done = 1;
}

// One warp per block of 64 values: two per lane, a warp max.
static __global__ void absmax_kernel(float *absmax, const float *x, size_t n) {
    size_t block = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    size_t blocks = (n + MT_NF4_BLOCK - 1) / MT_NF4_BLOCK;
    if (block >= blocks) return;
    int lane = threadIdx.x & 31;
    size_t i = block * MT_NF4_BLOCK + lane;
    float m = 0.0f;
    if (i < n) m = fabsf(x[i]);
    if (i + 32 < n) m = fmaxf(m, fabsf(x[i + 32]));
    for (int offset = 16; offset > 0; offset >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
    if (lane == 0) absmax[block] = fmaxf(m, 1e-38f);
}

static __device__ int nearest_nf4(float v) {
    int code = 0;  // midpoints strictly below v
#pragma unroll
    for (int j = 0; j < 15; j++) code += v > __fdiv_rn(__fadd_rn(nf4_code_device[j], nf4_code_device[j + 1]), 2.0f);
    return code;
}

static __global__ void codes_kernel(uint8_t *codes, const float *x, size_t n, const float *absmax) {
    size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= (n + 1) / 2) return;
    int pair[2] = {7, 7};
    for (int h = 0; h < 2; h++) {
        size_t i = 2 * k + h;
        if (i >= n) break;
        float inverse = __frcp_rn(absmax[i / MT_NF4_BLOCK]);
        float v = fminf(fmaxf(__fmul_rn(x[i], inverse), -1.0f), 1.0f);
        pair[h] = nearest_nf4(v);
    }
    codes[k] = (uint8_t)(pair[0] << 4 | pair[1]);
}

// Absmax (device) and packed codes of n device values; n a multiple of 64
// except at the tensor's end, so code bytes never straddle two calls.
static void codes_on_device(uint8_t *codes, float *dev_absmax, const float *values, size_t n) {
    size_t blocks = (n + MT_NF4_BLOCK - 1) / MT_NF4_BLOCK;
    absmax_kernel<<<grid_for(blocks * 32, kThreads), kThreads>>>(dev_absmax, values, n);
    CUDA_CHECK_LAUNCH();
    codes_kernel<<<grid_for((n + 1) / 2, kThreads), kThreads>>>(codes, values, n, dev_absmax);
    CUDA_CHECK_LAUNCH();
}

extern "C" void mt_nf4_codes_device_cuda(uint8_t *codes, float *absmax, const float *values, size_t n) {
    upload_tables();
    size_t blocks = (n + MT_NF4_BLOCK - 1) / MT_NF4_BLOCK;
    void *dev_absmax = NULL;
    MT_CHECK(mt_alloc(&dev_absmax, blocks * sizeof(float), MT_MEM_WORKSPACE, MT_DEVICE) == MT_OK,
             "out of device memory for %zu absmax values", blocks);
    codes_on_device(codes, (float *)dev_absmax, values, n);
    CUDA_CHECK(cudaMemcpy(absmax, dev_absmax, blocks * sizeof(float), cudaMemcpyDeviceToHost));
    mt_free(&dev_absmax);
}

extern "C" mt_err mt_nf4_codes_cuda(uint8_t *codes, float *absmax, const float *host_values, size_t n) {
    upload_tables();
    // chunks of whole 64-blocks and an even count: codes bytes never straddle
    const size_t chunk = (size_t)MT_NF4_BLOCK * 16384;
    size_t first = n < chunk ? n : chunk;
    void *staging = NULL;
    mt_err err = mt_alloc(&staging, first * sizeof(float) + (first / MT_NF4_BLOCK + 1) * sizeof(float),
                          MT_MEM_WORKSPACE, MT_DEVICE);
    if (err) return err;
    float *values = (float *)staging;
    float *absmax_scratch = values + first;
    for (size_t start = 0; start < n; start += chunk) {
        size_t count = n - start < chunk ? n - start : chunk, blocks = (count + MT_NF4_BLOCK - 1) / MT_NF4_BLOCK;
        CUDA_CHECK(cudaMemcpy(values, host_values + start, count * sizeof(float), cudaMemcpyHostToDevice));
        codes_on_device(codes + start / 2, absmax_scratch, values, count);
        CUDA_CHECK(
            cudaMemcpy(absmax + start / MT_NF4_BLOCK, absmax_scratch, blocks * sizeof(float), cudaMemcpyDeviceToHost));
    }
    mt_free(&staging);
    return MT_OK;
}

static __device__ float block_scale(const uint8_t *absmax_q, const float *absmax2, float offset, size_t b) {
    return __fadd_rn(__fmul_rn(dynamic_map_device[absmax_q[b]], absmax2[b / MT_NF4_GROUP]), offset);
}

// Eight values (four code bytes) per thread, one 16-byte store; n % 8 == 0.
static __global__ void dequantize8_kernel(bf16 *out, const uint8_t *codes, const uint8_t *absmax_q,
                                          const float *absmax2, float offset, size_t n) {
    __shared__ float table[16];
    if (threadIdx.x < 16) table[threadIdx.x] = nf4_code_device[threadIdx.x];
    __syncthreads();
    size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t * 8 >= n) return;
    float scale = block_scale(absmax_q, absmax2, offset, t * 8 / MT_NF4_BLOCK);
    uint32_t packed = reinterpret_cast<const uint32_t *>(codes)[t];
    __align__(16) bf16 values[8];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        uint32_t byte = (packed >> (8 * j)) & 255u;
        values[2 * j] = __float2bfloat16(__fmul_rn(table[byte >> 4], scale));
        values[2 * j + 1] = __float2bfloat16(__fmul_rn(table[byte & 15], scale));
    }
    reinterpret_cast<uint4 *>(out)[t] = *reinterpret_cast<const uint4 *>(values);
}

static __global__ void dequantize1_kernel(bf16 *out, const uint8_t *codes, const uint8_t *absmax_q,
                                          const float *absmax2, float offset, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int code = i % 2 ? codes[i / 2] & 15 : codes[i / 2] >> 4;
    out[i] =
        __float2bfloat16(__fmul_rn(nf4_code_device[code], block_scale(absmax_q, absmax2, offset, i / MT_NF4_BLOCK)));
}

extern "C" void mt_nf4_dequantize_cuda(const mt_backend *be, void *out, const mt_nf4 *q) {
    upload_tables();
    if (q->n % 8 == 0 && ((uintptr_t)out & 15) == 0 && ((uintptr_t)q->codes & 3) == 0)
        dequantize8_kernel<<<grid_for(q->n / 8, kThreads), kThreads, 0, mt_stream_of(be)>>>(
            (bf16 *)out, q->codes, q->absmax_q, q->absmax2, q->offset, q->n);
    else
        dequantize1_kernel<<<grid_for(q->n, kThreads), kThreads, 0, mt_stream_of(be)>>>(
            (bf16 *)out, q->codes, q->absmax_q, q->absmax2, q->offset, q->n);
    CUDA_CHECK_LAUNCH();
}
