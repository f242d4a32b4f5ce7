// kernels/linalg.c: routing and the CPU references of linalg.h.
#include "kernels/linalg.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/common.h"

#ifdef MT_HAVE_CUDA
void mt_la_gemm_cuda(const mt_backend *be, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                     int lda, const float *B, int ldb, float beta, float *C, int ldc);
void mt_la_orthonormalize_cuda(mt_backend *be, float *Q, int a, int k);
void mt_la_symmetric_eigen_cuda(mt_backend *be, float *S, float *w, int k);
void mt_la_copy_cuda(float *dst, const float *src, size_t n);
void mt_la_release_cuda(void);
#define MT_LA_GPU(be, call) \
    if ((be)->gpu) {        \
        call;               \
        return;             \
    }
#else
#define MT_LA_GPU(be, call) MT_CHECK(!(be)->gpu, "GPU backend in a CPU-only build")
#endif

// Element (i, j) of op(X), X column-major with leading dimension ld.
static inline float op_at(const float *X, int ld, int trans, int i, int j) {
    return trans ? X[(size_t)i * ld + j] : X[(size_t)j * ld + i];
}

void mt_la_gemm(const mt_backend *be, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    MT_LA_GPU(be, mt_la_gemm_cuda(be, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc));
#pragma omp parallel for
    for (int j = 0; j < N; j++)
        for (int i = 0; i < M; i++) {
            double sum = 0.0;
            for (int p = 0; p < K; p++) sum += (double)op_at(A, lda, trans_a, i, p) * op_at(B, ldb, trans_b, p, j);
            float *c = &C[(size_t)j * ldc + i];
            *c = (float)(alpha * sum + (beta != 0.0f ? (double)beta * *c : 0.0));
        }
}

// Removes from column j its components along columns 0..j-1; returns its norm.
static double orthogonalize_against(double *Q, int a, int j) {
    for (int pass = 0; pass < 2; pass++)  // the second pass restores what rounding lost
        for (int i = 0; i < j; i++) {
            double d = 0.0;
            for (int r = 0; r < a; r++) d += Q[(size_t)i * a + r] * Q[(size_t)j * a + r];
            for (int r = 0; r < a; r++) Q[(size_t)j * a + r] -= d * Q[(size_t)i * a + r];
        }
    double norm = 0.0;
    for (int r = 0; r < a; r++) norm += Q[(size_t)j * a + r] * Q[(size_t)j * a + r];
    return sqrt(norm);
}

void mt_la_orthonormalize(mt_backend *be, float *Q, int a, int k) {
    MT_CHECK(k <= a, "orthonormalize: %d columns of height %d", k, a);
    MT_LA_GPU(be, mt_la_orthonormalize_cuda(be, Q, a, k));
    double *q = malloc((size_t)a * k * sizeof *q);
    MT_CHECK(q != NULL, "orthonormalize scratch");
    for (size_t i = 0; i < (size_t)a * k; i++) q[i] = Q[i];
    for (int j = 0; j < k; j++) {
        double before = 0.0;
        for (int r = 0; r < a; r++) before += q[(size_t)j * a + r] * q[(size_t)j * a + r];
        double norm = orthogonalize_against(q, a, j);
        // a column inside the span of the earlier ones (a rank-deficient
        // input): any unit vector orthogonal to them completes the basis, as
        // Householder QR would give
        for (int e = 0; norm <= 1e-10 * sqrt(before) + 1e-300 && e < a; e++) {
            for (int r = 0; r < a; r++) q[(size_t)j * a + r] = r == (e + j) % a ? 1.0 : 0.0;
            norm = orthogonalize_against(q, a, j);
            if (norm < 0.5) norm = 0.0;  // too close to the span: try the next
        }
        for (int r = 0; r < a; r++) q[(size_t)j * a + r] /= norm;
    }
    for (size_t i = 0; i < (size_t)a * k; i++) Q[i] = (float)q[i];
    free(q);
}

void mt_la_symmetric_eigen(mt_backend *be, float *S, float *w, int k) {
    MT_LA_GPU(be, mt_la_symmetric_eigen_cuda(be, S, w, k));
    double *A = malloc((size_t)k * k * sizeof *A), *V = calloc((size_t)k * k, sizeof *V);
    int *order = malloc((size_t)k * sizeof *order);
    MT_CHECK(A && V && order, "eigen scratch");
    for (size_t i = 0; i < (size_t)k * k; i++) A[i] = S[i];
    for (int i = 0; i < k; i++) V[(size_t)i * k + i] = 1.0;
#define AT(M, r, c) M[(size_t)(c)*k + (r)]
    // cyclic Jacobi: rotate away each off-diagonal entry until none is left
    for (int sweep = 0; sweep < 100; sweep++) {
        double off = 0.0, all = 0.0;
        for (int c = 0; c < k; c++)
            for (int r = 0; r < k; r++) {
                all += AT(A, r, c) * AT(A, r, c);
                if (r != c) off += AT(A, r, c) * AT(A, r, c);
            }
        if (off <= 1e-26 * all || off == 0.0) break;
        for (int p = 0; p < k - 1; p++)
            for (int q = p + 1; q < k; q++) {
                double apq = AT(A, p, q);
                if (fabs(apq) < 1e-300) continue;
                double theta = (AT(A, q, q) - AT(A, p, p)) / (2.0 * apq);
                double t = (theta >= 0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1.0));
                double c = 1.0 / sqrt(t * t + 1.0), s = t * c;
                for (int r = 0; r < k; r++) {  // A J
                    double arp = AT(A, r, p), arq = AT(A, r, q);
                    AT(A, r, p) = c * arp - s * arq, AT(A, r, q) = s * arp + c * arq;
                }
                for (int r = 0; r < k; r++) {  // J^T (A J)
                    double apr = AT(A, p, r), aqr = AT(A, q, r);
                    AT(A, p, r) = c * apr - s * aqr, AT(A, q, r) = s * apr + c * aqr;
                }
                for (int r = 0; r < k; r++) {  // V J
                    double vrp = AT(V, r, p), vrq = AT(V, r, q);
                    AT(V, r, p) = c * vrp - s * vrq, AT(V, r, q) = s * vrp + c * vrq;
                }
            }
    }
    for (int i = 0; i < k; i++) order[i] = i;
    for (int i = 1; i < k; i++)  // ascending eigenvalues: insertion sort of the order
        for (int j = i; j > 0 && AT(A, order[j - 1], order[j - 1]) > AT(A, order[j], order[j]); j--) {
            int t = order[j];
            order[j] = order[j - 1];
            order[j - 1] = t;
        }
    for (int j = 0; j < k; j++) {
        w[j] = (float)AT(A, order[j], order[j]);
        for (int r = 0; r < k; r++) S[(size_t)j * k + r] = (float)AT(V, r, order[j]);
    }
#undef AT
    free(A);
    free(V);
    free(order);
}

void mt_la_copy(const mt_backend *be, float *dst, const float *src, size_t n) {
    MT_LA_GPU(be, mt_la_copy_cuda(dst, src, n));
    memmove(dst, src, n * sizeof(float));
}

void mt_la_release(void) {
#ifdef MT_HAVE_CUDA
    mt_la_release_cuda();
#endif
}
