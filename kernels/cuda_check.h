// kernels/cuda_check.h: fatal checks for CUDA runtime and cuBLAS calls, for
// use inside .cu files only. They print the call, file:line and device.
#ifndef MT_CUDA_CHECK_H
#define MT_CUDA_CHECK_H

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "kernels/common.h"
#include "kernels/device.h"

#define CUDA_CHECK(call)                                                               \
    do {                                                                               \
        cudaError_t mt_cuda_err_ = (call);                                             \
        if (mt_cuda_err_ != cudaSuccess) {                                             \
            int mt_dev_ = -1;                                                          \
            cudaGetDevice(&mt_dev_);                                                   \
            mt_fatal(__FILE__, __LINE__, "%s failed on device %d: %s", #call, mt_dev_, \
                     cudaGetErrorString(mt_cuda_err_));                                \
        }                                                                              \
    } while (0)

#define CUBLAS_CHECK(call)                                                                              \
    do {                                                                                                \
        cublasStatus_t mt_cublas_st_ = (call);                                                          \
        if (mt_cublas_st_ != CUBLAS_STATUS_SUCCESS)                                                     \
            mt_fatal(__FILE__, __LINE__, "%s failed: %s", #call, cublasGetStatusString(mt_cublas_st_)); \
    } while (0)

// After every launch: a bad configuration shows here, not three kernels later.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

// The stream an op's kernels and copies go to: the backend's (NULL, the
// legacy stream, unless a caller such as a CUDA Graph capture set one).
static inline cudaStream_t mt_stream_of(const mt_backend *be) { return (cudaStream_t)be->stream; }

#endif
