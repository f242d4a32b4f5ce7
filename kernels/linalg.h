// kernels/linalg.h: the dense fp32 linear algebra GaLore's projectors need,
// column-major as BLAS and LAPACK store matrices: products (cuBLAS on the GPU,
// TF32 tensor cores with fp32 accumulation), a thin QR's Q (cuSOLVER geqrf +
// orgqr) and a symmetric eigendecomposition (cuSOLVER syevd). The CPU
// references are plain loops (modified Gram-Schmidt, applied twice; cyclic
// Jacobi rotations), meant for the sizes of tests and small models.
//
// A row-major (m, n) tensor is, read column-major, its (n, m) transpose with
// leading dimension n; optim/galore.c works with that view.
#ifndef MT_LINALG_H
#define MT_LINALG_H

#include <stddef.h>

#include "kernels/device.h"

#ifdef __cplusplus
extern "C" {
#endif

// C (M, N) = alpha op(A) op(B) + beta C, op(X) = X or X^T (trans), every
// matrix column-major with its leading dimension: BLAS sgemm.
void mt_la_gemm(const mt_backend *be, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                int lda, const float *B, int ldb, float beta, float *C, int ldc);
// Q (a, k), k <= a, leading dimension a, replaced by an orthonormal basis of
// its column space (a thin QR's Q, column j spanning what columns 0..j do).
void mt_la_orthonormalize(mt_backend *be, float *Q, int a, int k);
// S (k, k) symmetric replaced by its eigenvectors as columns, in ascending
// order of the eigenvalues (written to w, k floats, where the backend
// computes).
void mt_la_symmetric_eigen(mt_backend *be, float *S, float *w, int k);
// dst = src, n floats where the backend computes.
void mt_la_copy(const mt_backend *be, float *dst, const float *src, size_t n);
// Releases the GPU solver handle and its scratch (process exit needs nothing).
void mt_la_release(void);

#ifdef __cplusplus
}
#endif
#endif
