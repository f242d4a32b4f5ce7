// kernels/linalg.cu: linalg.h on the GPU: cuBLAS products in TF32, cuSOLVER
// QR and symmetric eigendecomposition. The solver handle and its scratch are
// made on first use and kept (the projector refresh calls these in bursts).
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include "kernels/cuda_check.h"
#include "kernels/linalg.h"
#include "kernels/mem.h"

#define CUSOLVER_CHECK(call)                                                                            \
    do {                                                                                                \
        cusolverStatus_t mt_cusolver_st_ = (call);                                                      \
        if (mt_cusolver_st_ != CUSOLVER_STATUS_SUCCESS)                                                 \
            mt_fatal(__FILE__, __LINE__, "%s failed: cuSOLVER status %d", #call, (int)mt_cusolver_st_); \
    } while (0)

static cusolverDnHandle_t solver;
static void *scratch;  // tau, the info word, then the solver's work space
static size_t scratch_bytes;

static void *solver_scratch(size_t bytes) {
    if (!solver) {
        CUSOLVER_CHECK(cusolverDnCreate(&solver));
        CUSOLVER_CHECK(cusolverDnSetStream(solver, 0));
    }
    if (bytes > scratch_bytes) {
        mt_free(&scratch);
        scratch_bytes = 0;
        MT_CHECK(mt_alloc(&scratch, bytes, MT_MEM_WORKSPACE, MT_DEVICE) == MT_OK, "solver scratch of %zu bytes: %s",
                 bytes, mt_last_error());
        scratch_bytes = bytes;
    }
    return scratch;
}

static void check_info(const int *info, const char *what) {
    int host = 0;
    CUDA_CHECK(cudaMemcpy(&host, info, sizeof host, cudaMemcpyDeviceToHost));
    MT_CHECK(host == 0, "%s reported info %d", what, host);
}

extern "C" void mt_la_gemm_cuda(const mt_backend *be, int trans_a, int trans_b, int M, int N, int K, float alpha,
                                const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    if (M == 0 || N == 0) return;
    CUBLAS_CHECK(cublasGemmEx((cublasHandle_t)be->cublas, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                              trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, M, N, K, &alpha, A, CUDA_R_32F, lda, B, CUDA_R_32F,
                              ldb, &beta, C, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT));
}

extern "C" void mt_la_orthonormalize_cuda(mt_backend *be, float *Q, int a, int k) {
    (void)be;
    int lwork_qr = 0, lwork_org = 0;
    solver_scratch(256);  // the handle, for the size queries
    CUSOLVER_CHECK(cusolverDnSgeqrf_bufferSize(solver, a, k, Q, a, &lwork_qr));
    size_t head = ((size_t)k * sizeof(float) + 255) / 256 * 256 + 256;
    float *tau = (float *)solver_scratch(head + (size_t)(lwork_qr > 0 ? lwork_qr : 1) * sizeof(float));
    CUSOLVER_CHECK(cusolverDnSorgqr_bufferSize(solver, a, k, k, Q, a, tau, &lwork_org));
    int lwork = lwork_qr > lwork_org ? lwork_qr : lwork_org;
    char *base = (char *)solver_scratch(head + (size_t)(lwork > 0 ? lwork : 1) * sizeof(float));
    tau = (float *)base;
    int *info = (int *)(base + head - 256);
    float *work = (float *)(base + head);
    CUSOLVER_CHECK(cusolverDnSgeqrf(solver, a, k, Q, a, tau, work, lwork, info));
    check_info(info, "cusolverDnSgeqrf");
    CUSOLVER_CHECK(cusolverDnSorgqr(solver, a, k, k, Q, a, tau, work, lwork, info));
    check_info(info, "cusolverDnSorgqr");
}

extern "C" void mt_la_symmetric_eigen_cuda(mt_backend *be, float *S, float *w, int k) {
    (void)be;
    int lwork = 0;
    solver_scratch(256);
    CUSOLVER_CHECK(
        cusolverDnSsyevd_bufferSize(solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, k, S, k, w, &lwork));
    char *base = (char *)solver_scratch(256 + (size_t)(lwork > 0 ? lwork : 1) * sizeof(float));
    int *info = (int *)base;
    CUSOLVER_CHECK(cusolverDnSsyevd(solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, k, S, k, w,
                                    (float *)(base + 256), lwork, info));
    check_info(info, "cusolverDnSsyevd");
}

extern "C" void mt_la_copy_cuda(float *dst, const float *src, size_t n) {
    CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, 0));
}

extern "C" void mt_la_release_cuda(void) {
    mt_free(&scratch);
    scratch_bytes = 0;
    if (solver) cusolverDnDestroy(solver);
    solver = NULL;
}
