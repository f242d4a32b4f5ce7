// tests/test_kernels_gpu.c: every CUDA op against its CPU reference, on fresh
// random inputs at awkward sizes. Inputs are rounded to bf16 first so both
// sides see the same values; GPU outputs are poisoned (NaN) before each run
// so an unwritten element fails. Run with CK_FORK=no; exits 77 without a GPU.
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/attention_cudnn.h"
#include "kernels/common.h"
#include "kernels/device.h"
#include "kernels/dtype.h"
#include "kernels/linalg.h"
#include "kernels/nf4.h"
#include "kernels/nf4_cuda.h"
#include "kernels/ops.h"
#include "kernels/ops_cuda.h"
#include "kernels/ops_ref.h"
#include "kernels/rng.h"
#include "testutil.h"

static mt_backend be;
static uint64_t seed = 1000;

// bf16 tolerance for ||gpu - ref|| / ||ref||; single products land near 3e-3
static const double kBf16Tol = 1.5e-2;

static float *host_random(size_t n, float lo, float hi) {
    float *x = tu_random(n, lo, hi, seed++);
    for (size_t i = 0; i < n; i++) x[i] = mt_round_bf16(x[i]);
    return x;
}

static void *dev_bf16(const float *x, size_t n) {
    uint16_t *h = malloc((n ? n : 1) * 2);
    mt_cast_bf16_ref(h, x, n);
    void *d = mt_device_malloc(n * 2 + 2);
    ck_assert_ptr_nonnull(d);
    mt_copy_to_device(d, h, n * 2);
    free(h);
    return d;
}

static void *dev_f32(const float *x, size_t n) {
    void *d = mt_device_malloc(n * 4 + 4);
    ck_assert_ptr_nonnull(d);
    mt_copy_to_device(d, x, n * 4);
    return d;
}

// Positions of documents packed into B rows of T: random lengths from 1 to
// 150 (across the 64-row tiles; some rows one document), restarting at each
// row.
static int32_t *doc_positions(int B, int T) {
    int32_t *pos = malloc((size_t)B * T * sizeof *pos);
    uint64_t draw = 0;
    for (int b = 0; b < B; b++) {
        int left = 0;  // tokens left in the current document
        for (int t = 0; t < T; t++) {
            int start = t == 0 || (b % 3 != 2 && left == 0);
            if (start) left = 1 + (int)(mt_rng_bits(seed, draw++) % 150);
            pos[(size_t)b * T + t] = start ? 0 : pos[(size_t)b * T + t - 1] + 1;
            left--;
        }
    }
    return pos;
}

static void *dev_i32(const int32_t *x, size_t n) {
    void *d = mt_device_malloc(n * 4 + 4);
    ck_assert_ptr_nonnull(d);
    mt_copy_to_device(d, x, n * 4);
    return d;
}

static void *dev_poisoned(size_t bytes) {
    void *d = mt_device_malloc(bytes + 4);
    ck_assert_ptr_nonnull(d);
    mt_device_memset(d, 0xff, bytes);  // NaN in both bf16 and fp32
    return d;
}

static float *host_from_bf16(const void *d, size_t n) {
    uint16_t *h = malloc((n ? n : 1) * 2);
    float *x = malloc((n ? n : 1) * 4);
    mt_copy_to_host(h, d, n * 2);
    for (size_t i = 0; i < n; i++) x[i] = mt_bf16_to_f32(h[i]);
    free(h);
    return x;
}

static float *host_from_f32(const void *d, size_t n) {
    float *x = malloc((n ? n : 1) * 4);
    mt_copy_to_host(x, d, n * 4);
    return x;
}

static void expect_close(const char *what, const float *got, const float *ref, size_t n, double tol) {
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(isfinite(got[i]), "%s: element %zu not written or not finite", what, i);
    double err = tu_norm_rel_error(got, ref, n);
    ck_assert_msg(err < tol, "%s: relative error %.3g >= %.3g (n=%zu)", what, err, tol, n);
}

START_TEST(rmsnorm) {
    // the last two: Gemma's (1 + w) on rows of 2304 and on head-norm rows of 256
    int sizes[][3] = {{1, 7, 0}, {7, 22, 0}, {33, 257, 0}, {5, 2048, 0}, {9, 2304, 1}, {300, 256, 1}};
    for (int s = 0; s < 6; s++) {
        int N = sizes[s][0], C = sizes[s][1], one = sizes[s][2];
        size_t n = (size_t)N * C;
        float *x = host_random(n, -2, 2), *w = host_random(C, one ? -0.5f : 0.5f, one ? 0.5f : 1.5f),
              *g = host_random(n, -1, 1);
        float *y = malloc(n * 4), *rstd = malloc(N * 4), *dx = tu_random(n, -1, 1, seed++), *dw = calloc(C, 4);
        for (size_t i = 0; i < n; i++) dx[i] = mt_round_bf16(dx[i]);
        void *dx_d = dev_bf16(dx, n);
        mt_rmsnorm_forward_ref(y, rstd, x, w, N, C, 1e-5f, one);
        mt_rmsnorm_backward_ref(dx, dw, g, x, w, rstd, N, C, one);
        void *x_d = dev_bf16(x, n), *w_d = dev_bf16(w, C), *g_d = dev_bf16(g, n);
        void *y_d = dev_poisoned(n * 2), *rstd_d = dev_poisoned(N * 4), *dw_d = mt_device_malloc(C * 4);
        mt_device_memset(dw_d, 0, C * 4);
        mt_op_rmsnorm_forward(&be, y_d, rstd_d, x_d, w_d, N, C, 1e-5f, one);
        mt_op_rmsnorm_backward(&be, dx_d, dw_d, g_d, x_d, w_d, rstd_d, N, C, one);
        float *yg = host_from_bf16(y_d, n), *rg = host_from_f32(rstd_d, N), *dxg = host_from_bf16(dx_d, n),
              *dwg = host_from_f32(dw_d, C);
        expect_close("rmsnorm y", yg, y, n, kBf16Tol);
        expect_close("rmsnorm rstd", rg, rstd, N, 1e-5);
        expect_close("rmsnorm dx (accumulated)", dxg, dx, n, kBf16Tol);
        expect_close("rmsnorm dweight", dwg, dw, C, 1e-3);
        // the residual and the norm in one op: the sum rounded as the CPU's,
        // the norm of the rounded sum as the CPU's, and the same bits as
        // mt_op_add then mt_op_rmsnorm_forward on the GPU
        float *b = host_random(n, -2, 2), *sum = malloc(n * 4), *y2 = malloc(n * 4), *rstd2 = malloc(N * 4);
        mt_add_ref(sum, x, b, n);
        for (size_t i = 0; i < n; i++) sum[i] = mt_round_bf16(sum[i]);
        mt_rmsnorm_forward_ref(y2, rstd2, sum, w, N, C, 1e-5f, one);
        void *b_d = dev_bf16(b, n), *sum_d = dev_poisoned(n * 2), *y2_d = dev_poisoned(n * 2),
             *r2_d = dev_poisoned(N * 4), *sum1_d = dev_poisoned(n * 2), *y1_d = dev_poisoned(n * 2),
             *r1_d = dev_poisoned(N * 4);
        mt_op_add_rmsnorm_forward(&be, sum_d, y2_d, r2_d, x_d, b_d, w_d, N, C, 1e-5f, one);
        mt_op_add(&be, sum1_d, x_d, b_d, n);
        mt_op_rmsnorm_forward(&be, y1_d, r1_d, sum1_d, w_d, N, C, 1e-5f, one);
        float *sumg = host_from_bf16(sum_d, n), *y2g = host_from_bf16(y2_d, n), *r2g = host_from_f32(r2_d, N),
              *sum1g = host_from_bf16(sum1_d, n), *y1g = host_from_bf16(y1_d, n), *r1g = host_from_f32(r1_d, N);
        expect_close("add_rmsnorm sum", sumg, sum, n, 1e-7);
        expect_close("add_rmsnorm y", y2g, y2, n, kBf16Tol);
        expect_close("add_rmsnorm rstd", r2g, rstd2, N, 1e-5);
        ck_assert_msg(!memcmp(sumg, sum1g, n * 4) && !memcmp(y2g, y1g, n * 4) && !memcmp(r2g, r1g, N * 4),
                      "add_rmsnorm (N %d, C %d) differs from add then rmsnorm", N, C);
        free(b), free(sum), free(y2), free(rstd2), free(sumg), free(y2g), free(r2g), free(sum1g), free(y1g), free(r1g);
        mt_device_free(b_d), mt_device_free(sum_d), mt_device_free(y2_d), mt_device_free(r2_d);
        mt_device_free(sum1_d), mt_device_free(y1_d), mt_device_free(r1_d);
        // a frozen norm (LoRA): no dweight, the same dx
        void *dx2_d = dev_bf16(dx, n);
        mt_device_memset(dx2_d, 0, n * 2);
        mt_op_rmsnorm_backward(&be, dx2_d, NULL, g_d, x_d, w_d, rstd_d, N, C, one);
        float *dx_frozen = calloc(n, 4), *dx2g = host_from_bf16(dx2_d, n);
        mt_rmsnorm_backward_ref(dx_frozen, NULL, g, x, w, rstd, N, C, one);
        expect_close("rmsnorm dx without dweight", dx2g, dx_frozen, n, kBf16Tol);
        free(dx_frozen), free(dx2g), mt_device_free(dx2_d);
        free(x), free(w), free(g), free(y), free(rstd), free(dx), free(dw), free(yg), free(rg), free(dxg), free(dwg);
        mt_device_free(x_d), mt_device_free(w_d), mt_device_free(g_d), mt_device_free(y_d), mt_device_free(rstd_d);
        mt_device_free(dx_d), mt_device_free(dw_d);
    }
}
END_TEST

START_TEST(rope) {
    int shapes[][4] = {{1, 1, 1, 2}, {2, 7, 3, 8}, {3, 257, 5, 64}, {1, 33, 4, 128}};
    for (int s = 0; s < 4; s++)
        for (int rotate = 0; rotate <= 1; rotate++) {
            int B = shapes[s][0], T = shapes[s][1], H = shapes[s][2], D = shapes[s][3], half = D / 2;
            size_t n = (size_t)B * T * H * D;
            float *inv = malloc(half * 4), *cs = malloc((size_t)T * half * 8);
            for (int i = 0; i < half; i++) inv[i] = powf(10000.0f, -2.0f * i / D);
            mt_rope_tables(cs, cs + (size_t)T * half, inv, T, D);
            float *x = host_random(n, -1, 1), *y = malloc(n * 4), *dx = malloc(n * 4);
            void *cos_d = dev_f32(cs, (size_t)T * half), *sin_d = dev_f32(cs + (size_t)T * half, (size_t)T * half);
            void *x_d = dev_bf16(x, n), *y_d = dev_poisoned(n * 2), *dx_d = dev_poisoned(n * 2);
            // positions 0..T-1, then packed documents' restarting ones
            int32_t *pos = doc_positions(B, T);
            void *pos_d = dev_i32(pos, (size_t)B * T);
            for (int docs = 0; docs <= 1; docs++) {
                const int32_t *p = docs ? pos : NULL;
                mt_rope_forward_ref(y, x, cs, cs + (size_t)T * half, p, B, T, H, D, rotate);
                mt_rope_backward_ref(dx, x, cs, cs + (size_t)T * half, p, B, T, H, D, rotate);  // x as a grad
                mt_op_rope_forward(&be, y_d, x_d, cos_d, sin_d, docs ? pos_d : NULL, B, T, H, D, rotate);
                mt_op_rope_backward(&be, dx_d, x_d, cos_d, sin_d, docs ? pos_d : NULL, B, T, H, D, rotate);
                float *yg = host_from_bf16(y_d, n), *dxg = host_from_bf16(dx_d, n);
                expect_close(docs ? "rope forward (documents)" : "rope forward", yg, y, n, rotate ? 1e-2 : 1e-7);
                expect_close(docs ? "rope backward (documents)" : "rope backward", dxg, dx, n, rotate ? 1e-2 : 1e-7);
                free(yg), free(dxg);
                for (int shift = 0; rotate && shift <= (H > 1); shift++) {  // shifted: v's rows stay inside x
                    // q, k and v in one op (k and v with fewer heads, v moved only): each part the
                    // same bits as its own op, in one launch (aligned rows of 8) or one each (D 2,
                    // or v's rows shifted by an element)
                    int H2 = H > 1 ? H / 2 : 1;
                    size_t n2 = (size_t)B * T * H2 * D;
                    mt_rope_part parts[3] = {{dev_poisoned(n * 2), x_d, H, 1},
                                             {dev_poisoned(n2 * 2), x_d, H2, 1},
                                             {dev_poisoned(n2 * 2), (const char *)x_d + 2 * shift, H2, 0}};
                    mt_op_rope_forward_many(&be, parts, 3, cos_d, sin_d, docs ? pos_d : NULL, B, T, D);
                    for (int k = 0; k < 3; k++) {
                        size_t nk = k ? n2 : n;
                        void *one_d = dev_poisoned(nk * 2);
                        mt_op_rope_forward(&be, one_d, parts[k].src, cos_d, sin_d, docs ? pos_d : NULL, B, T,
                                           parts[k].H, D, parts[k].rotate);
                        float *many = host_from_bf16(parts[k].dst, nk), *alone = host_from_bf16(one_d, nk);
                        ck_assert_msg(!memcmp(many, alone, nk * 4), "rope part %d of three (B %d T %d H %d D %d)", k, B,
                                      T, parts[k].H, D);
                        free(many), free(alone), mt_device_free(one_d), mt_device_free(parts[k].dst);
                    }
                }
            }
            free(inv), free(cs), free(x), free(y), free(dx), free(pos);
            mt_device_free(cos_d), mt_device_free(sin_d), mt_device_free(x_d), mt_device_free(y_d),
                mt_device_free(dx_d), mt_device_free(pos_d);
        }
}
END_TEST

// One attention shape on the GPU (cuDNN's graphs, or memtune's kernel with
// be.cudnn NULL) against the CPU reference; the backward runs twice and must
// give the same bits (resumes rely on it).
static void attention_case(const mt_attention_shape *s, const char *path) {
    int B = s->B, T = s->T, H = s->H, KV = s->KV, D = s->D;
    size_t nq = (size_t)B * H * T * D, nk = (size_t)B * KV * T * D, nl = (size_t)B * H * T;
    float *q = host_random(nq, -1.5f, 1.5f), *k = host_random(nk, -1.5f, 1.5f), *v = host_random(nk, -1, 1);
    float *g = host_random(nq, -1, 1);
    float *y = malloc(nq * 4), *dq = malloc(nq * 4), *dk = malloc(nk * 4), *dv = malloc(nk * 4), *lse = malloc(nl * 4);
    int32_t *pos = s->docs ? doc_positions(B, T) : NULL;
    void *pos_d = pos ? dev_i32(pos, (size_t)B * T) : NULL;
    mt_attention_forward_ref(y, lse, q, k, v, B, T, H, KV, D, s->window, pos, s->scale);
    mt_attention_backward_ref(dq, dk, dv, g, q, k, v, y, lse, B, T, H, KV, D, s->window, pos, s->scale);
    ck_assert_int_eq(mt_backend_reserve_workspace(&be, mt_attention_workspace_bytes(&be, s)), MT_OK);
    void *q_d = dev_bf16(q, nq), *k_d = dev_bf16(k, nk), *v_d = dev_bf16(v, nk), *g_d = dev_bf16(g, nq);
    void *y_d = dev_poisoned(nq * 2), *dq_d = dev_poisoned(nq * 2), *dk_d = dev_poisoned(nk * 2),
         *dv_d = dev_poisoned(nk * 2), *lse_d = dev_poisoned(nl * 4);
    mt_op_attention_forward(&be, s, y_d, lse_d, q_d, k_d, v_d, pos_d);
    mt_op_attention_backward(&be, s, dq_d, dk_d, dv_d, g_d, q_d, k_d, v_d, y_d, lse_d, pos_d);
    float *yg = host_from_bf16(y_d, nq), *lseg = host_from_f32(lse_d, nl), *dqg = host_from_bf16(dq_d, nq),
          *dkg = host_from_bf16(dk_d, nk), *dvg = host_from_bf16(dv_d, nk);
    char what[128];
    snprintf(what, sizeof what, "%s attention B=%d T=%d H=%d KV=%d D=%d window=%d%s%s", path, B, T, H, KV, D, s->window,
             s->docs ? " packed documents" : "", s->nondeterministic ? " non-deterministic" : "");
    printf("%s\n", what);
    char part[160];
#define EXPECT(name, got, ref, n, tol) \
    snprintf(part, sizeof part, "%s %s", what, name), expect_close(part, got, ref, n, tol)
    EXPECT("out", yg, y, nq, kBf16Tol);
    EXPECT("lse", lseg, lse, nl, 1e-5);
    if (T > 1) {
        EXPECT("dq", dqg, dq, nq, 2 * kBf16Tol);
        EXPECT("dk", dkg, dk, nk, 2 * kBf16Tol);
    } else {
        // one key: the softmax is 1 whatever the scores, so dq and dk are 0
        // but for rounding (dout . v against dout . out summed in another
        // order), which a relative error of a norm near 0 cannot judge
        for (size_t i = 0; i < nq; i++) ck_assert_msg(fabsf(dqg[i]) < 1e-3f, "%s dq[%zu] = %g", what, i, dqg[i]);
        for (size_t i = 0; i < nk; i++) ck_assert_msg(fabsf(dkg[i]) < 1e-3f, "%s dk[%zu] = %g", what, i, dkg[i]);
    }
    EXPECT("dv", dvg, dv, nk, kBf16Tol);
#undef EXPECT
    // the same backward again: bit for bit (asked of every path but cuDNN's non-deterministic one)
    uint16_t *first = malloc((nq + 2 * nk) * 2), *second = malloc((nq + 2 * nk) * 2);
    mt_copy_to_host(first, dq_d, nq * 2), mt_copy_to_host(first + nq, dk_d, nk * 2);
    mt_copy_to_host(first + nq + nk, dv_d, nk * 2);
    mt_device_memset(dq_d, 0xff, nq * 2), mt_device_memset(dk_d, 0xff, nk * 2), mt_device_memset(dv_d, 0xff, nk * 2);
    mt_op_attention_backward(&be, s, dq_d, dk_d, dv_d, g_d, q_d, k_d, v_d, y_d, lse_d, pos_d);
    mt_copy_to_host(second, dq_d, nq * 2), mt_copy_to_host(second + nq, dk_d, nk * 2);
    mt_copy_to_host(second + nq + nk, dv_d, nk * 2);
    ck_assert_msg((s->nondeterministic && be.cudnn) || memcmp(first, second, (nq + 2 * nk) * 2) == 0,
                  "%s: two backward runs differ", what);
    free(first), free(second), free(lseg), free(lse), free(pos);
    if (pos_d) mt_device_free(pos_d);
    free(q), free(k), free(v), free(g), free(y), free(dq), free(dk), free(dv), free(yg), free(dqg), free(dkg),
        free(dvg);
    mt_device_free(q_d), mt_device_free(k_d), mt_device_free(v_d), mt_device_free(g_d), mt_device_free(y_d);
    mt_device_free(dq_d), mt_device_free(dk_d), mt_device_free(dv_d), mt_device_free(lse_d);
}

START_TEST(attention) {
    // head dims 16..256, T around the 64-row tiles, grouped and plain heads,
    // sliding windows shorter than T (Mistral) and one no shorter
    mt_attention_shape shapes[] = {{1, 1, 1, 1, 16, 0, 0, 0.0f, 0, 0},
                                   {2, 7, 4, 2, 16, 0, 0, 0.0f, 0, 0},
                                   {1, 257, 6, 2, 64, 0, 0, 0.0f, 0, 0},
                                   {2, 129, 8, 8, 128, 0, 0, 0.0f, 0, 0},
                                   {1, 1025, 4, 1, 64, 0, 0, 0.0f, 0, 0},
                                   {3, 64, 4, 4, 32, 0, 0, 0.0f, 0, 0},
                                   {1, 65, 8, 2, 128, 0, 0, 0.0f, 0, 0},
                                   {2, 200, 4, 2, 64, 37, 0, 0.0f, 0, 0},
                                   {1, 300, 8, 4, 128, 64, 0, 0.0f, 0, 0},
                                   {1, 33, 2, 1, 32, 40, 0, 0.0f, 0, 0},
                                   {2, 130, 4, 2, 80, 0, 0, 0.0f, 0, 0},
                                   {1, 257, 6, 3, 96, 0, 0, 0.0f, 0, 0},
                                   {1, 129, 4, 2, 96, 50, 0, 0.0f, 0, 0},
                                   {1, 100, 4, 1, 256, 0, 0, 0.0f, 0, 0},
                                   // packed documents (memtune's kernel: cuDNN's path does not take them)
                                   {3, 300, 4, 2, 64, 0, 1, 0.0f, 0, 0},
                                   {3, 257, 8, 4, 128, 0, 1, 0.0f, 0, 0},
                                   {2, 129, 4, 1, 32, 50, 1, 0.0f, 0, 0},
                                   {1, 1025, 4, 2, 64, 0, 1, 0.0f, 0, 0},
                                   // Gemma: scale query_pre_attn_scalar^-1/2 (here 1/sqrt(144)), window
                                   {2, 200, 4, 1, 128, 64, 0, 1.0f / 12.0f, 0, 0},
                                   // cuDNN's non-deterministic backward (model.deterministic_attention false)
                                   {2, 257, 8, 2, 128, 0, 0, 0.0f, 1, 0},
                                   {1, 300, 8, 4, 64, 64, 0, 0.0f, 1, 0}};
    int n = sizeof shapes / sizeof shapes[0], served = 0;
    for (int i = 0; i < n; i++) {
        mt_attention_shape *s = &shapes[i];
        // cuDNN's graphs, where the backend has them and they serve the shape
        if (be.cudnn && !s->docs && mt_attention_supports(&be, s)) {
            size_t workspace;
            if (mt_cudnn_attention_prepare(be.cudnn, s, &workspace)) served++, attention_case(s, "cuDNN");
        }
        // memtune's own kernel for the head dims it is compiled for
        if (s->D == 16 || s->D == 32 || s->D == 64 || s->D == 80 || s->D == 96 || s->D == 128) {
            struct mt_cudnn *saved = be.cudnn;
            be.cudnn = NULL;
            attention_case(s, "own kernel");
            be.cudnn = saved;
        }
    }
    if (be.cudnn) {
        printf("attention: %s served %d of %d shapes\n", mt_cudnn_describe(be.cudnn), served, n);
        // the shapes memtune trains (head dims 64 and 128, windows) must not
        // fall back silently
        ck_assert_msg(served >= 8, "cuDNN served only %d of %d attention shapes", served, n);
        // the two backward algorithms' workspaces at a long length (8B's
        // heads, T=8192): the deterministic one grows as T x T, the other as
        // T; the forecast asks the same of a handle of its own
        mt_attention_shape det = {1, 8192, 32, 8, 128, 0, 0, 0.0f, 0, 0}, nd = det;
        nd.nondeterministic = 1;
        size_t w_det = 0, w_nd = 0;
        int cudnn_det = 0, cudnn_nd = 0;
        if (mt_cudnn_attention_prepare(be.cudnn, &det, &w_det) && mt_cudnn_attention_prepare(be.cudnn, &nd, &w_nd)) {
            printf("attention workspace at B=1 T=8192 H=32: deterministic %.1f MiB, non-deterministic %.1f MiB\n",
                   w_det / 1048576.0, w_nd / 1048576.0);
            ck_assert_msg(w_nd * 4 < w_det, "non-deterministic workspace %zu not far below the deterministic %zu", w_nd,
                          w_det);
            ck_assert_uint_eq(mt_attention_planned_workspace_bytes(be.device, &nd, &cudnn_nd), w_nd);
            ck_assert_uint_eq(mt_attention_planned_workspace_bytes(be.device, &det, &cudnn_det), w_det);
            ck_assert(cudnn_det && cudnn_nd);
            // forward alone (MeZO, evaluation): the forward graph's workspace,
            // far below the deterministic backward's, in the run and the forecast
            mt_attention_shape fwd = det;
            fwd.forward_only = 1;
            size_t w_fwd = 0;
            int cudnn_fwd = 0;
            ck_assert(mt_cudnn_attention_prepare(be.cudnn, &fwd, &w_fwd));
            printf("attention workspace at B=1 T=8192 H=32, forward alone: %.1f MiB\n", w_fwd / 1048576.0);
            ck_assert_msg(w_fwd * 4 < w_det, "forward-only workspace %zu not far below %zu", w_fwd, w_det);
            ck_assert_uint_eq(mt_attention_workspace_bytes(&be, &fwd), w_fwd);
            ck_assert_uint_eq(mt_attention_planned_workspace_bytes(be.device, &fwd, &cudnn_fwd), w_fwd);
        }
    } else {
        printf("attention: no cuDNN (%s): memtune's kernel alone was tested\n", be.attention_note);
        const char *off = getenv("MT_CUDNN");
#ifdef MT_HAVE_CUDNN
        ck_assert_msg(off && strcmp(off, "0") == 0, "built with cuDNN but it did not load: %s", be.attention_note);
#endif
        (void)off;
    }
}
END_TEST

// Decoding: kv_store and attention over the caches against the CPU
// reference, rows at their own positions (0, mid-cache, the cache's last),
// head dims 64 to 256, grouped heads, windows that bind and one that does not.
START_TEST(attention_decode) {
    struct {
        int B, H, KV, D, S, window;
    } shapes[] = {{1, 4, 2, 64, 9, 0},   {4, 8, 2, 64, 300, 0}, {3, 32, 4, 128, 130, 0},
                  {2, 6, 3, 96, 77, 16}, {2, 8, 1, 256, 64, 0}, {5, 4, 4, 80, 200, 1000}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        int B = shapes[i].B, H = shapes[i].H, KV = shapes[i].KV, D = shapes[i].D, S = shapes[i].S;
        int window = shapes[i].window;
        size_t nc = (size_t)B * KV * S * D, nq = (size_t)B * H * D, nk = (size_t)B * KV * D;
        float *kc = host_random(nc, -1, 1), *vc = host_random(nc, -1, 1), *q = host_random(nq, -2, 2);
        float *k = host_random(nk, -1, 1), *v = host_random(nk, -1, 1), *ref = malloc(nq * 4);
        int32_t *pos = malloc((size_t)B * sizeof *pos);
        for (int b = 0; b < B; b++) pos[b] = b == 0 ? 0 : b == 1 ? S - 1 : (int)(mt_rng_bits(seed, (uint64_t)b) % S);
        void *dkc = dev_bf16(kc, nc), *dvc = dev_bf16(vc, nc), *dq = dev_bf16(q, nq), *dk = dev_bf16(k, nk),
             *dv = dev_bf16(v, nk), *dpos = dev_i32(pos, (size_t)B), *dout = dev_poisoned(nq * 2);
        mt_kv_store_ref(kc, vc, k, v, pos, B, KV, D, S);
        mt_attention_decode_ref(ref, q, kc, vc, pos, B, H, KV, D, S, window, 0.0f);
        mt_op_kv_store(&be, dkc, dvc, dk, dv, dpos, B, KV, D, S);
        mt_op_attention_decode(&be, dout, dq, dkc, dvc, dpos, B, H, KV, D, S, window, 0.0f);
        float *got = host_from_bf16(dout, nq), *gotk = host_from_bf16(dkc, nc);
        for (size_t j = 0; j < nc; j++) ck_assert_msg(gotk[j] == kc[j], "kv_store: key cache element %zu", j);
        char what[96];
        snprintf(what, sizeof what, "attention_decode B=%d H=%d KV=%d D=%d S=%d window=%d", B, H, KV, D, S, window);
        expect_close(what, got, ref, nq, kBf16Tol);
        free(kc), free(vc), free(q), free(k), free(v), free(ref), free(pos), free(got), free(gotk);
        mt_device_free(dkc), mt_device_free(dvc), mt_device_free(dq), mt_device_free(dk), mt_device_free(dv);
        mt_device_free(dpos), mt_device_free(dout);
    }
}
END_TEST

START_TEST(swiglu_add_and_embedding) {
    size_t sizes[] = {1, 7, 257, 100003};
    for (int s = 0; s < 4; s++) {
        size_t n = sizes[s];
        mt_act act = s % 2 ? MT_ACT_GELU_TANH : MT_ACT_SILU;  // GeGLU at two of the sizes
        float *gt = host_random(n, -5, 5), *up = host_random(n, -2, 2), *d = host_random(n, -1, 1);
        float *y = malloc(n * 4), *dg = malloc(n * 4), *du = malloc(n * 4), *sum = malloc(n * 4);
        mt_glu_forward_ref(y, gt, up, n, act);
        mt_glu_backward_ref(dg, du, d, gt, up, n, act);
        mt_add_ref(sum, gt, up, n);
        void *g_d = dev_bf16(gt, n), *u_d = dev_bf16(up, n), *d_d = dev_bf16(d, n);
        void *y_d = dev_poisoned(n * 2), *dg_d = dev_poisoned(n * 2), *du_d = dev_poisoned(n * 2),
             *s_d = dev_poisoned(n * 2);
        mt_op_glu_forward(&be, y_d, g_d, u_d, n, act);
        mt_op_glu_backward(&be, dg_d, du_d, d_d, g_d, u_d, n, act);
        mt_op_add(&be, s_d, g_d, u_d, n);
        float *yg = host_from_bf16(y_d, n), *dgg = host_from_bf16(dg_d, n), *dug = host_from_bf16(du_d, n),
              *sg = host_from_bf16(s_d, n);
        expect_close(act ? "geglu forward" : "swiglu forward", yg, y, n, 1e-2);
        expect_close(act ? "geglu dgate" : "swiglu dgate", dgg, dg, n, 1e-2);
        expect_close(act ? "geglu dup" : "swiglu dup", dug, du, n, 1e-2);
        expect_close("add", sg, sum, n, 1e-2);
        // scale (Gemma's embedding times sqrt(hidden)): bf16(x * bf16(s))
        {
            float s_bf = mt_round_bf16(48.0f * 1.0001f), *want = malloc(n * 4);
            for (size_t i = 0; i < n; i++) want[i] = mt_round_bf16(gt[i] * s_bf);
            mt_op_scale(&be, g_d, n, 48.0f * 1.0001f);
            float *got = host_from_bf16(g_d, n);
            ck_assert_msg(memcmp(got, want, n * 4) == 0, "scale differs from bf16(x * bf16(s)) (n %zu)", n);
            free(got), free(want);
        }
        // fp32 (gradient sums), in place as ZeRO-2 uses it: bit-exact
        float *a_d = dev_f32(gt, n), *b_d = dev_f32(up, n);
        mt_op_add_f32(&be, a_d, a_d, b_d, n);
        float *sf = host_from_f32(a_d, n);
        ck_assert_msg(memcmp(sf, sum, n * 4) == 0, "fp32 add differs from mt_add_ref (n %zu)", n);
        free(sf), mt_device_free(a_d), mt_device_free(b_d);
        free(gt), free(up), free(d), free(y), free(dg), free(du), free(sum), free(yg), free(dgg), free(dug), free(sg);
        mt_device_free(g_d), mt_device_free(u_d), mt_device_free(d_d), mt_device_free(y_d), mt_device_free(dg_d);
        mt_device_free(du_d), mt_device_free(s_d);
    }
    int N = 257, C = 22, V = 7;
    int32_t *tok = malloc(N * 4);
    for (int i = 0; i < N; i++) tok[i] = (int32_t)((i * 5 + 3) % V);
    float *wte = host_random((size_t)V * C, -1, 1), *dout = host_random((size_t)N * C, -1, 1);
    float *out = malloc((size_t)N * C * 4), *dwte = calloc((size_t)V * C, 4);
    mt_embedding_forward_ref(out, tok, wte, N, C);
    mt_embedding_backward_ref(dwte, tok, dout, N, C);
    void *tok_d = mt_device_malloc(N * 4);
    mt_copy_to_device(tok_d, tok, N * 4);
    void *w_d = dev_bf16(wte, (size_t)V * C), *do_d = dev_bf16(dout, (size_t)N * C),
         *o_d = dev_poisoned((size_t)N * C * 2);
    void *dw_d = mt_device_malloc((size_t)V * C * 4);
    mt_device_memset(dw_d, 0, (size_t)V * C * 4);
    mt_op_embedding_forward(&be, o_d, tok_d, w_d, N, C);
    mt_op_embedding_backward(&be, dw_d, tok_d, do_d, N, C);
    float *og = host_from_bf16(o_d, (size_t)N * C), *dwg = host_from_f32(dw_d, (size_t)V * C);
    expect_close("embedding forward", og, out, (size_t)N * C, 1e-7);
    expect_close("embedding backward", dwg, dwte, (size_t)V * C, 1e-5);
    free(tok), free(wte), free(dout), free(out), free(dwte), free(og), free(dwg);
    mt_device_free(tok_d), mt_device_free(w_d), mt_device_free(do_d), mt_device_free(o_d), mt_device_free(dw_d);
}
END_TEST

// w (n host values) twice over, as a new bf16 device array
static void *dev_bf16_twice(const float *w, size_t n) {
    float *h = malloc(2 * n * 4);
    memcpy(h, w, n * 4), memcpy(h + n, w, n * 4);
    void *d = dev_bf16(h, 2 * n);
    free(h);
    return d;
}

// A decoding layer's ops (each reads what the one before wrote) recorded as
// a CUDA Graph, as they are and with programmatic dependent launch
// (MT_PDL=1), give the bits of the same ops run one by one, replay after
// replay, with every intermediate poisoned and the caches restored in
// between: a kernel that read its input before the kernel writing it had
// finished would read NaN.
START_TEST(graph_of_decoding_ops_matches_op_by_op) {
    const int C = 2048, H = 16, KV = 4, D = 128, F = 5632, S = 64, V = 1000, KVD = KV * D;
    for (int run_kind = 0; run_kind < 4; run_kind++) {
        int N = run_kind % 2 ? 4 : 1;
        setenv("MT_PDL", run_kind < 2 ? "0" : "1", 1);
        float *x = host_random((size_t)N * C, -1, 1), *nw = host_random(C, 0.5f, 1.5f);
        float *wq = host_random((size_t)C * C, -0.05f, 0.05f), *wk = host_random((size_t)KVD * C, -0.05f, 0.05f);
        float *wv = host_random((size_t)KVD * C, -0.05f, 0.05f), *wo = host_random((size_t)C * C, -0.05f, 0.05f);
        float *wg = host_random((size_t)F * C, -0.05f, 0.05f), *wu = host_random((size_t)F * C, -0.05f, 0.05f);
        float *wd = host_random((size_t)C * F, -0.05f, 0.05f), *wl = host_random((size_t)V * C, -0.05f, 0.05f);
        size_t ncache = (size_t)N * KV * S * D;
        float *cache = host_random(ncache, -1, 1);
        int32_t pos[4];
        for (int b = 0; b < N; b++) pos[b] = 5 + 17 * b;
        void *x_d = dev_bf16(x, (size_t)N * C), *nw_d = dev_bf16(nw, C), *wq_d = dev_bf16(wq, (size_t)C * C),
             *wk_d = dev_bf16(wk, (size_t)KVD * C), *wv_d = dev_bf16(wv, (size_t)KVD * C),
             *wo_d = dev_bf16(wo, (size_t)C * C), *wg_d = dev_bf16(wg, (size_t)F * C),
             *wu_d = dev_bf16(wu, (size_t)F * C), *wd_d = dev_bf16(wd, (size_t)C * F),
             *wl_d = dev_bf16(wl, (size_t)V * C), *pos_d = dev_i32(pos, (size_t)N);
        void *kc = dev_bf16(cache, ncache), *vc = dev_bf16(cache, ncache);
        uint16_t *cache_h = malloc(ncache * 2);
        mt_copy_to_host(cache_h, kc, ncache * 2);
        // the intermediates, poisoned before every run: bf16 (N, width) each
        enum { LN, Q, K, VV, ATT, O, X2, LN2, HID, GATE, UP, DOWN, OUT, NBUF };
        int width[NBUF] = {C, C, KVD, KVD, C, C, C, C, F, F, F, C, C};
        void *buf[NBUF];
        for (int i = 0; i < NBUF; i++) buf[i] = dev_poisoned((size_t)N * width[i] * 2);
        float *rstd = mt_device_malloc((size_t)N * 4), *rstd2 = mt_device_malloc((size_t)N * 4);
        float *lg = mt_device_malloc((size_t)N * V * 4);
        mt_product qkv[3] = {{buf[Q], wq_d, NULL, C}, {buf[K], wk_d, NULL, KVD}, {buf[VV], wv_d, NULL, KVD}};
        size_t nout = (size_t)N * C * 2, nlg = (size_t)N * V * 4;
        void *out_ref = malloc(nout), *lg_ref = malloc(nlg), *out_got = malloc(nout), *lg_got = malloc(nlg);
        void *graph = NULL;
        for (int run = 0; run < 2 + 20; run++) {
            // run 0: op by op (the reference); run 1: recorded; then replays
            for (int i = 0; i < NBUF; i++) mt_device_memset(buf[i], 0xff, (size_t)N * width[i] * 2);
            mt_device_memset(rstd, 0xff, (size_t)N * 4), mt_device_memset(rstd2, 0xff, (size_t)N * 4);
            mt_device_memset(lg, 0xff, nlg);
            mt_copy_to_device(kc, cache_h, ncache * 2), mt_copy_to_device(vc, cache_h, ncache * 2);
            if (run >= 2) {
                mt_graph_launch(&be, graph);
            } else {
                if (run == 1) mt_graph_begin(&be);
                mt_op_rmsnorm_forward(&be, buf[LN], rstd, x_d, nw_d, N, C, 1e-5f, 0);
                mt_op_matmul_forward_many(&be, qkv, 3, buf[LN], N, C);
                mt_op_kv_store(&be, kc, vc, buf[K], buf[VV], pos_d, N, KV, D, S);
                mt_op_attention_decode(&be, buf[ATT], buf[Q], kc, vc, pos_d, N, H, KV, D, S, 0, 0.0f);
                mt_op_matmul_forward(&be, buf[O], buf[ATT], wo_d, NULL, N, C, C);
                mt_op_add_rmsnorm_forward(&be, buf[X2], buf[LN2], rstd2, x_d, buf[O], nw_d, N, C, 1e-5f, 0);
                mt_op_matmul_glu_forward(&be, buf[HID], buf[GATE], buf[UP], buf[LN2], wg_d, wu_d, N, C, F, MT_ACT_SILU);
                mt_op_matmul_forward(&be, buf[DOWN], buf[HID], wd_d, NULL, N, F, C);
                mt_op_add(&be, buf[OUT], buf[X2], buf[DOWN], (size_t)N * C);
                mt_op_logits_forward(&be, lg, buf[OUT], wl_d, N, C, V);
                if (run == 1) {
                    char why[160] = "";
                    graph = mt_graph_end(&be, why, sizeof why);
                    ck_assert_msg(graph != NULL, "recording the decoding ops failed: %s", why);
                    mt_graph_launch(&be, graph);
                }
            }
            mt_copy_to_host(run == 0 ? out_ref : out_got, buf[OUT], nout);
            mt_copy_to_host(run == 0 ? lg_ref : lg_got, lg, nlg);
            if (run == 0) {  // the reference read no poison either: every value finite
                for (size_t i = 0; i < (size_t)N * C; i++)
                    ck_assert_msg(isfinite(mt_bf16_to_f32(((const uint16_t *)out_ref)[i])), "rows %d: output %zu", N,
                                  i);
                for (size_t i = 0; i < (size_t)N * V; i++)
                    ck_assert_msg(isfinite(((const float *)lg_ref)[i]), "rows %d: logit %zu", N, i);
                continue;
            }
            ck_assert_msg(!memcmp(out_got, out_ref, nout) && !memcmp(lg_got, lg_ref, nlg),
                          "rows %d: the graph's run %d differs from the ops one by one", N, run - 1);
        }
        mt_graph_free(graph);
        printf("decoding ops as a CUDA Graph (rows %d, MT_PDL=%s): 21 runs equal the ops one by one, bit for bit\n", N,
               getenv("MT_PDL"));
        for (int i = 0; i < NBUF; i++) mt_device_free(buf[i]);
        void *dev[] = {x_d, nw_d, wq_d, wk_d, wv_d, wo_d, wg_d, wu_d, wd_d, wl_d, pos_d, kc, vc, rstd, rstd2, lg};
        for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++) mt_device_free(dev[i]);
        free(x), free(nw), free(wq), free(wk), free(wv), free(wo), free(wg), free(wu), free(wd), free(wl);
        free(cache), free(cache_h), free(out_ref), free(lg_ref), free(out_got), free(lg_got);
    }
    unsetenv("MT_PDL");
}
END_TEST

// Up to 8 rows with rows of whole 16-byte vectors go to the skinny kernel
// (decoding), the rest to cuBLAS: both are checked, the skinny one at one row
// of a 2048-wide model and at its widest (8 rows) with an output count that
// is not a multiple of its 8 warps a block.
START_TEST(matmul_and_logits) {
    int shapes[][3] = {{1, 1, 1},      {7, 22, 13},    {257, 64, 1025}, {1025, 257, 96},
                       {1, 2048, 333}, {3, 520, 1000}, {8, 64, 1025},   {9, 64, 100}};
    for (int s = 0; s < 8; s++) {
        int N = shapes[s][0], IN = shapes[s][1], OUT = shapes[s][2];
        size_t nx = (size_t)N * IN, nw = (size_t)OUT * IN, ny = (size_t)N * OUT;
        float *x = host_random(nx, -1, 1), *w = host_random(nw, -1, 1), *b = host_random(OUT, -1, 1);
        float *g = host_random(ny, -1, 1), *y = malloc(ny * 4), *dx = malloc(nx * 4), *dw = calloc(nw, 4),
              *db = calloc(OUT, 4), *lg = malloc(ny * 4);
        mt_matmul_forward_ref(y, x, w, b, N, IN, OUT);
        mt_matmul_forward_ref(lg, x, w, NULL, N, IN, OUT);
        mt_matmul_backward_ref(dx, dw, db, g, x, w, N, IN, OUT, 1.0f, 0);
        void *x_d = dev_bf16(x, nx), *w_d = dev_bf16(w, nw), *b_d = dev_bf16(b, OUT), *g_d = dev_bf16(g, ny);
        void *y_d = dev_poisoned(ny * 2), *dx_d = dev_poisoned(nx * 2), *lg_d = dev_poisoned(ny * 4);
        void *dw_d = mt_device_malloc(nw * 4), *db_d = mt_device_malloc(OUT * 4);
        mt_device_memset(dw_d, 0, nw * 4);
        mt_device_memset(db_d, 0, OUT * 4);
        mt_op_matmul_forward(&be, y_d, x_d, w_d, b_d, N, IN, OUT);
        mt_op_logits_forward(&be, lg_d, x_d, w_d, N, IN, OUT);
        mt_op_matmul_backward(&be, dx_d, dw_d, db_d, g_d, x_d, w_d, N, IN, OUT, 0);
        float *yg = host_from_bf16(y_d, ny), *lgg = host_from_f32(lg_d, ny), *dxg = host_from_bf16(dx_d, nx),
              *dwg = host_from_f32(dw_d, nw), *dbg = host_from_f32(db_d, OUT);
        expect_close("matmul forward", yg, y, ny, 1e-2);
        // three products of x in one op (q, k, v): each as the one product,
        // bit for bit (the second with the bias, the third twice as wide)
        mt_product p[3] = {{dev_poisoned(ny * 2), w_d, NULL, OUT},
                           {dev_poisoned(ny * 2), w_d, b_d, OUT},
                           {dev_poisoned(2 * ny * 2), dev_bf16_twice(w, nw), NULL, 2 * OUT}};
        mt_op_matmul_forward_many(&be, p, 3, x_d, N, IN);
        void *one_d = dev_poisoned(2 * ny * 2);
        for (int k = 0; k < 3; k++) {
            size_t nk = (size_t)N * p[k].OUT;
            mt_op_matmul_forward(&be, one_d, x_d, p[k].weight, p[k].bias, N, IN, p[k].OUT);
            float *many = host_from_bf16(p[k].out, nk), *alone = host_from_bf16(one_d, nk);
            ck_assert_msg(!memcmp(many, alone, nk * 4), "product %d of three (N %d, IN %d, OUT %d) differs from alone",
                          k, N, IN, OUT);
            if (k == 1) expect_close("three products: the biased one", many, y, ny, 1e-2);
            free(many), free(alone);
            mt_device_free(p[k].out);
        }
        mt_device_free(one_d), mt_device_free((void *)p[2].weight);
        // the MLP's first half (gate x, up x, the activation) in one op: the
        // same bits as the products and mt_op_glu_forward, and the CPU's values
        for (int act = 0; act < 2; act++) {
            float *w2 = host_random(nw, -1, 1), *ga = malloc(ny * 4), *up = malloc(ny * 4), *h = malloc(ny * 4);
            void *w2_d = dev_bf16(w2, nw), *h_d = dev_poisoned(ny * 2), *ga_d = dev_poisoned(ny * 2),
                 *up_d = dev_poisoned(ny * 2), *h1_d = dev_poisoned(ny * 2);
            mt_matmul_forward_ref(ga, x, w, NULL, N, IN, OUT);
            mt_matmul_forward_ref(up, x, w2, NULL, N, IN, OUT);
            for (size_t i = 0; i < ny; i++) ga[i] = mt_round_bf16(ga[i]), up[i] = mt_round_bf16(up[i]);
            mt_glu_forward_ref(h, ga, up, ny, (mt_act)act);
            mt_op_matmul_glu_forward(&be, h_d, ga_d, up_d, x_d, w_d, w2_d, N, IN, OUT, (mt_act)act);
            mt_op_matmul_forward(&be, ga_d, x_d, w_d, NULL, N, IN, OUT);
            mt_op_matmul_forward(&be, up_d, x_d, w2_d, NULL, N, IN, OUT);
            mt_op_glu_forward(&be, h1_d, ga_d, up_d, ny, (mt_act)act);
            float *hg = host_from_bf16(h_d, ny), *h1g = host_from_bf16(h1_d, ny);
            expect_close("matmul + glu", hg, h, ny, 1e-2);
            ck_assert_msg(!memcmp(hg, h1g, ny * 4),
                          "matmul + glu (N %d, IN %d, OUT %d, act %d) differs from the three ops", N, IN, OUT, act);
            free(w2), free(ga), free(up), free(h), free(hg), free(h1g);
            mt_device_free(w2_d), mt_device_free(h_d), mt_device_free(ga_d), mt_device_free(up_d), mt_device_free(h1_d);
        }
        expect_close("logits (fp32 out)", lgg, lg, ny, 1e-5);
        expect_close("matmul dinp", dxg, dx, nx, 1e-2);
        expect_close("matmul dweight (fp32)", dwg, dw, nw, 1e-5);
        expect_close("matmul dbias", dbg, db, OUT, 1e-5);
        // accumulate: dinp += again gives twice
        mt_op_matmul_backward(&be, dx_d, NULL, NULL, g_d, x_d, w_d, N, IN, OUT, 1);
        float *dx2 = host_from_bf16(dx_d, nx);
        for (size_t i = 0; i < nx; i++) dx[i] *= 2;
        expect_close("matmul dinp accumulate", dx2, dx, nx, 1e-2);
        free(x), free(w), free(b), free(g), free(y), free(dx), free(dw), free(db), free(lg), free(yg), free(lgg);
        free(dxg), free(dwg), free(dbg), free(dx2);
        mt_device_free(x_d), mt_device_free(w_d), mt_device_free(b_d), mt_device_free(g_d), mt_device_free(y_d);
        mt_device_free(dx_d), mt_device_free(lg_d), mt_device_free(dw_d), mt_device_free(db_d);
    }
}
END_TEST

// LoRA's products: y += alpha x W^T; dx (+)= alpha g W and dW += alpha g^T x.
START_TEST(scaled_matmuls) {
    int shapes[][3] = {{1, 1, 1}, {7, 22, 3}, {1025, 257, 16}, {257, 16, 1025}, {1, 2048, 16}, {5, 16, 2050}};
    for (int s = 0; s < 6; s++) {
        int N = shapes[s][0], IN = shapes[s][1], OUT = shapes[s][2];
        float alpha = 0.5f + (float)s;
        size_t nx = (size_t)N * IN, nw = (size_t)OUT * IN, ny = (size_t)N * OUT;
        float *x = host_random(nx, -1, 1), *w = host_random(nw, -1, 1), *y = host_random(ny, -1, 1);
        float *g = host_random(ny, -1, 1), *dx = host_random(nx, -1, 1), *dw = host_random(nw, -1, 1);
        void *x_d = dev_bf16(x, nx), *w_d = dev_bf16(w, nw), *y_d = dev_bf16(y, ny), *g_d = dev_bf16(g, ny);
        void *dx_d = dev_bf16(dx, nx), *dw_d = dev_f32(dw, nw);
        mt_matmul_forward_add_ref(y, x, w, N, IN, OUT, alpha);
        mt_matmul_backward_ref(dx, dw, NULL, g, x, w, N, IN, OUT, alpha, 1);
        mt_op_matmul_forward_add(&be, y_d, x_d, w_d, N, IN, OUT, alpha);
        mt_op_matmul_backward_scaled(&be, dx_d, dw_d, g_d, x_d, w_d, N, IN, OUT, alpha, 1);
        float *yg = host_from_bf16(y_d, ny), *dxg = host_from_bf16(dx_d, nx), *dwg = host_from_f32(dw_d, nw);
        expect_close("matmul forward add", yg, y, ny, 1e-2);
        expect_close("scaled dinp accumulate", dxg, dx, nx, 1e-2);
        expect_close("scaled dweight", dwg, dw, nw, 1e-5);
        // dinp overwritten (accumulate 0) into a poisoned buffer
        void *dx0_d = dev_poisoned(nx * 2);
        mt_op_matmul_backward_scaled(&be, dx0_d, NULL, g_d, NULL, w_d, N, IN, OUT, alpha, 0);
        float *dx0 = malloc(nx * 4), *dx0g = host_from_bf16(dx0_d, nx);
        mt_matmul_backward_ref(dx0, NULL, NULL, g, x, w, N, IN, OUT, alpha, 0);
        expect_close("scaled dinp", dx0g, dx0, nx, 1e-2);
        free(x), free(w), free(y), free(g), free(dx), free(dw), free(yg), free(dxg), free(dwg), free(dx0), free(dx0g);
        mt_device_free(x_d), mt_device_free(w_d), mt_device_free(y_d), mt_device_free(g_d), mt_device_free(dx_d);
        mt_device_free(dw_d), mt_device_free(dx0_d);
    }
}
END_TEST

// The mask is the CPU's (rng.h's mt_dropout_kept, element by element);
// every output is 0 or x/(1-p), the dropped share is p, the same seed gives
// the same mask (backward regenerates it), another seed another one.
START_TEST(dropout) {
    size_t sizes[] = {1, 7, 1025, 1 << 20};
    for (int s = 0; s < 4; s++) {
        size_t n = sizes[s];
        float p = 0.1f + 0.2f * (float)s;
        float *x = host_random(n, 0.5f, 1.5f);  // never zero
        void *x_d = dev_bf16(x, n), *a_d = dev_poisoned(n * 2), *b_d = dev_poisoned(n * 2), *c_d = dev_poisoned(n * 2);
        mt_op_dropout(&be, a_d, x_d, n, p, 42, 0);
        mt_op_dropout(&be, b_d, x_d, n, p, 42, 0);
        mt_op_dropout(&be, c_d, x_d, n, p, 43, 0);
        float *a = host_from_bf16(a_d, n), *b = host_from_bf16(b_d, n), *c = host_from_bf16(c_d, n);
        size_t dropped = 0, differ = 0;
        for (size_t i = 0; i < n; i++) {
            float kept = mt_round_bf16(x[i] * (1.0f / (1.0f - p)));
            ck_assert_msg(a[i] == 0.0f || a[i] == kept, "dropout %zu: %g from %g", i, a[i], x[i]);
            ck_assert_msg((a[i] != 0.0f) == mt_dropout_kept(42, i, mt_dropout_threshold(p)),
                          "dropout %zu: the CPU's mask", i);
            ck_assert_msg(a[i] == b[i], "the same seed gave another mask at %zu", i);
            dropped += a[i] == 0.0f;
            differ += (a[i] == 0.0f) != (c[i] == 0.0f);
        }
        if (n >= 1025) {
            double share = (double)dropped / (double)n, sd = sqrt(p * (1 - p) / (double)n);
            ck_assert_msg(fabs(share - p) < 5 * sd, "dropped %g, expected %g", share, p);
            ck_assert(differ > n / 20);
        }
        // in place (backward applies the mask to a gradient buffer)
        // a block of it at an offset: that block of the whole mask (rows of a tiled MLP)
        if (n > 7) {
            size_t off = 5, count = n - 7;
            void *part_d = dev_poisoned(count * 2);
            mt_op_dropout(&be, part_d, (const char *)x_d + off * 2, count, p, 42, off);
            float *part = host_from_bf16(part_d, count);
            ck_assert_mem_eq(part, a + off, count * 4);
            free(part);
            mt_device_free(part_d);
        }
        // accumulated into another tensor: bf16(out + the dropped-out value), also at odd offsets
        for (size_t off = 0; off < 3 && off < n; off++) {
            size_t count = n - off;
            float *o = host_random(count, -1.0f, 1.0f);
            void *o_d = dev_bf16(o, count);
            float *o_b = host_from_bf16(o_d, count);
            mt_op_dropout_add(&be, o_d, (const char *)x_d + off * 2, count, p, 42, off);
            float *got = host_from_bf16(o_d, count);
            for (size_t i = 0; i < count; i++)
                ck_assert_msg(got[i] == mt_round_bf16(o_b[i] + a[off + i]), "dropout_add %zu (offset %zu): %g", i, off,
                              got[i]);
            free(o), free(o_b), free(got);
            mt_device_free(o_d);
        }
        mt_op_dropout(&be, x_d, x_d, n, p, 42, 0);
        float *inplace = host_from_bf16(x_d, n);
        ck_assert_mem_eq(inplace, a, n * 4);
        free(x), free(a), free(b), free(c), free(inplace);
        mt_device_free(x_d), mt_device_free(a_d), mt_device_free(b_d), mt_device_free(c_d);
    }
}
END_TEST

// NF4: the GPU's absmax and codes equal the CPU reference's bit for bit; its
// bf16 dequantization is the reference's fp32 value rounded, bit for bit;
// quantizing from host memory (chunked staging) gives the same storage.
START_TEST(nf4_codes_and_dequantize) {
    size_t sizes[] = {1, 7, 64, 130, 257 * 64 + 6, (size_t)64 * 16384 * 2 + 64 * 3 + 8};
    for (int s = 0; s < 6; s++) {
        size_t n = sizes[s], blocks = mt_nf4_blocks(n), bytes = (n + 1) / 2;
        float *x = tu_random(n, -1, 1, seed++);
        for (size_t i = 0; i < n; i += 97) x[i] *= 8.0f;     // outliers set some blocks' absmax
        if (n > 200) memset(x + 64, 0, 64 * sizeof(float));  // an all-zero block
        if (n > 200) {  // an exact tie: block 2's absmax is 1, and x[130] sits on an NF4 midpoint
            for (size_t i = 128; i < 192; i++) x[i] *= 0.5f;
            x[131] = 1.0f;
            x[130] = 0.5f * (mt_nf4_code[9] + mt_nf4_code[10]);
        }
        float *absmax = malloc(blocks * 4), *absmax_g = malloc(blocks * 4);
        uint8_t *codes = malloc(bytes), *codes_g = malloc(bytes);
        mt_nf4_absmax_ref(absmax, x, n);
        mt_nf4_codes_ref(codes, x, n, absmax);
        void *x_d = dev_f32(x, n), *codes_d = dev_poisoned(bytes);
        mt_nf4_codes_device_cuda(codes_d, absmax_g, x_d, n);
        mt_copy_to_host(codes_g, codes_d, bytes);
        if (n > 200) ck_assert_uint_eq(codes_g[65] >> 4, 9u);  // the tie went to the lower code
        ck_assert_mem_eq(absmax_g, absmax, blocks * 4);
        ck_assert_mem_eq(codes_g, codes, bytes);
        // the whole path from host values, on both backends
        mt_backend cpu;
        mt_backend_init(&cpu, -1);
        void *store = malloc(mt_nf4_storage_bytes(n)), *store_d = dev_poisoned(mt_nf4_storage_bytes(n));
        mt_nf4 q, qd;
        mt_nf4_bind(&q, store, n);
        mt_nf4_bind(&qd, store_d, n);
        ck_assert_int_eq(mt_nf4_quantize(&cpu, &q, x), MT_OK);
        ck_assert_int_eq(mt_nf4_quantize(&be, &qd, x), MT_OK);
        ck_assert(q.offset == qd.offset);
        uint8_t *store_g = malloc(mt_nf4_storage_bytes(n));
        mt_copy_to_host(store_g, store_d, mt_nf4_storage_bytes(n));
        ck_assert_mem_eq(store_g, q.codes, bytes);
        ck_assert_mem_eq(store_g + (q.absmax_q - (uint8_t *)store), q.absmax_q, blocks);
        ck_assert_mem_eq(store_g + ((uint8_t *)q.absmax2 - (uint8_t *)store), q.absmax2, mt_nf4_groups(n) * 4);
        float *deq = malloc(n * 4);
        mt_nf4_dequantize_ref(deq, &q);
        void *out_d = dev_poisoned(n * 2);
        mt_nf4_dequantize(&be, out_d, &qd);
        float *deq_g = host_from_bf16(out_d, n);
        for (size_t i = 0; i < n; i++)
            ck_assert_msg(deq_g[i] == mt_round_bf16(deq[i]), "dequantize %zu of %zu: %g vs %g", i, n, deq_g[i], deq[i]);
        free(x), free(absmax), free(absmax_g), free(codes), free(codes_g), free(store), free(store_g), free(deq);
        free(deq_g);
        mt_device_free(x_d), mt_device_free(codes_d), mt_device_free(store_d), mt_device_free(out_d);
        mt_backend_free(&cpu);
    }
}
END_TEST

START_TEST(crossentropy) {
    // rows of float4 (V a multiple of 4) and of single floats; Gemma 3's 262k vocabulary
    int shapes[][2] = {{1, 2}, {7, 257}, {33, 32000}, {5, 151936}, {3, 262144}, {4, 32001}};
    for (int s = 0; s < 6; s++) {
        int N = shapes[s][0], V = shapes[s][1];
        size_t n = (size_t)N * V;
        float *z = tu_random(n, -8, 8, seed++), *loss = malloc(N * 4), *dz = malloc(n * 4);
        int32_t *t = malloc(N * 4);
        for (int i = 0; i < N; i++) t[i] = (i % 5 == 2) ? -1 : (int32_t)((i * 7919) % V);
        float scale = 1.0f / N;
        mt_crossentropy_ref(loss, dz, z, t, N, V, scale);
        void *z_d = dev_f32(z, n), *t_d = mt_device_malloc(N * 4), *l_d = dev_poisoned(N * 4),
             *dz_d = dev_poisoned(n * 2);
        mt_copy_to_device(t_d, t, N * 4);
        mt_op_crossentropy(&be, l_d, dz_d, z_d, t_d, N, V, scale);
        float *lg = host_from_f32(l_d, N), *dzg = host_from_bf16(dz_d, n);
        expect_close("cross-entropy loss", lg, loss, N, 1e-5);
        expect_close("cross-entropy dlogits", dzg, dz, n, 1e-2);
        free(lg);
        mt_device_free(l_d);
        l_d = dev_poisoned(N * 4);
        mt_op_crossentropy(&be, l_d, NULL, z_d, t_d, N, V, scale);  // the loss alone (evaluation, MeZO)
        lg = host_from_f32(l_d, N);
        expect_close("cross-entropy loss without dlogits", lg, loss, N, 1e-5);
        free(z), free(loss), free(dz), free(t), free(lg), free(dzg);
        mt_device_free(z_d), mt_device_free(t_d), mt_device_free(l_d), mt_device_free(dz_d);
    }
}
END_TEST

START_TEST(adamw_sums_and_casts) {
    size_t sizes[] = {1, 22, 1025, 1000003};
    for (int s = 0; s < 4; s++) {
        size_t n = sizes[s];
        float *p = tu_random(n, -1, 1, seed++), *g = tu_random(n, -1, 1, seed++),
              *m = tu_random(n, -0.1f, 0.1f, seed++);
        float *v = tu_random(n, 0, 0.01f, seed++);
        void *p_d = dev_f32(p, n), *g_d = dev_f32(g, n), *m_d = dev_f32(m, n), *v_d = dev_f32(v, n);
        void *c_d = dev_poisoned(n * 2);
        double ss = mt_sumsq_ref(g, n), gs = mt_op_sumsq(&be, g_d, n);
        // summed in double, as the reference: to double rounding, not float's
        ck_assert_double_eq_tol(gs, ss, 1e-12 * ss + 1e-15);
        if (n > 1) {  // from an address that is not 16-byte aligned (the scalar path)
            double ss1 = mt_sumsq_ref(g + 1, n - 1), gs1 = mt_op_sumsq(&be, (const float *)g_d + 1, n - 1);
            ck_assert_double_eq_tol(gs1, ss1, 1e-12 * ss1 + 1e-15);
        }
        double sum = 0;
        for (size_t i = 0; i < n; i++) sum += g[i];
        ck_assert_double_eq_tol(mt_op_sum(&be, g_d, n), sum, 1e-12 * sqrt(ss) * sqrt((double)n) + 1e-15);
        mt_adamw_ref(p, g, m, v, n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.19f, 0.0975f, 0.7f);
        mt_op_adamw(&be, p_d, c_d, g_d, m_d, v_d, n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.19f, 0.0975f, 0.7f);
        float *pg = host_from_f32(p_d, n), *mg = host_from_f32(m_d, n), *vg = host_from_f32(v_d, n);
        expect_close("adamw param", pg, p, n, 1e-6);
        expect_close("adamw m", mg, m, n, 1e-6);
        expect_close("adamw v", vg, v, n, 1e-6);
        // the bf16 copy is exactly the rounded master, bit for bit
        uint16_t *ref = malloc(n * 2), *got = malloc(n * 2);
        mt_cast_bf16_ref(ref, pg, n);
        mt_copy_to_host(got, c_d, n * 2);
        ck_assert_mem_eq(got, ref, n * 2);
        mt_device_memset(c_d, 0xff, n * 2);
        mt_op_cast_from_f32(&be, c_d, p_d, n);
        mt_copy_to_host(got, c_d, n * 2);
        ck_assert_mem_eq(got, ref, n * 2);
        void *back_d = dev_poisoned(n * 4);
        mt_op_cast_to_f32(&be, back_d, c_d, n);
        float *back = host_from_f32(back_d, n);
        for (size_t i = 0; i < n; i++) ck_assert_float_eq(back[i], mt_bf16_to_f32(ref[i]));
        free(p), free(g), free(m), free(v), free(pg), free(mg), free(vg), free(ref), free(got), free(back);
        mt_device_free(p_d), mt_device_free(g_d), mt_device_free(m_d), mt_device_free(v_d), mt_device_free(c_d);
        mt_device_free(back_d);
    }
}
END_TEST

// --------------------------------------------------------------------- MeZO

START_TEST(philox_words_equal_the_cpu_stream) {
    const size_t groups = 1025;
    uint32_t *d = mt_device_malloc(groups * 16), *h = malloc(groups * 16);
    ck_assert_ptr_nonnull(d);
    mt_philox_words_cuda(d, groups, 0x0123456789abcdefull);
    mt_copy_to_host(h, d, groups * 16);
    for (size_t i = 0; i < groups * 4; i++)
        ck_assert_msg(h[i] == mt_rng_philox_word(0x0123456789abcdefull, i), "word %zu", i);
    mt_device_free(d);
    free(h);
}
END_TEST

START_TEST(gauss_stream_equals_the_cpu_stream) {
    // a million values element by element (the norm-wise checks elsewhere
    // would hide a wrong word), the tails included
    const size_t n = (1u << 20) + 3;
    float *d = mt_device_malloc(n * 4), *ref = malloc(n * 4);
    ck_assert_ptr_nonnull(d);
    mt_op_gauss(&be, d, n, 0x0123456789abcdefull);
    mt_gauss_ref(ref, n, 0x0123456789abcdefull);
    float *got = host_from_f32(d, n), worst = 0.0f, largest = 0.0f;
    for (size_t i = 0; i < n; i++) {
        // MUFU's log2 is off by ~1e-7 absolute near 1, so where u1 is that
        // close to 1 the pair's radius r = sqrt(-2 ln u1) is off by ~1e-7 / r
        size_t p = i & ~(size_t)1;
        double r = p + 1 < n ? hypot(ref[p], ref[p + 1]) : fabs(ref[p]);
        double err = fabs((double)got[i] - ref[i]), bound = 2e-5 * fmax(1.0, fabs(ref[i])) + 3e-7 / fmax(r, 1e-6);
        ck_assert_msg(err <= bound, "z %zu: %.8g vs %.8g (bound %.3g)", i, got[i], ref[i], bound);
        worst = fmaxf(worst, (float)(err / bound)), largest = fmaxf(largest, fabsf(ref[i]));
    }
    printf("gauss stream: %zu values, largest |z| %.2f, worst error %.2f of its bound\n", n, largest, worst);
    ck_assert_float_gt(largest, 4.5f);
    mt_device_free(d);
    free(ref), free(got);
}
END_TEST

START_TEST(perturb_ops) {
    static const size_t sizes[] = {1, 7, 22, 257, 1025, 100003};
    // the last offset: group counters past 32 bits
    static const uint64_t offsets[] = {0, 1, 3, 4099, (1ull << 35) + 5};
    for (int si = 0; si < 6; si++)
        for (int oi = 0; oi < 5; oi++) {
            size_t n = sizes[si];
            uint64_t off = offsets[oi];
            float *w = host_random(n, -0.1f, 0.1f), *ref = malloc(n * 4);
            void *dw = dev_bf16(w, n), *dout = dev_poisoned(n * 2);
            mt_op_perturb(&be, dout, dw, n, 1e-2f, 31, off);
            mt_perturb_ref(ref, w, n, 1e-2f, 31, off);
            float *got = host_from_bf16(dout, n);
            // one bf16 rounding of the sum; z agrees to ~1e-6
            for (size_t j = 0; j < n; j++)
                ck_assert_msg(fabsf(got[j] - ref[j]) <= fabsf(ref[j]) * (1.0f / 256) + 1e-6f,
                              "perturb n=%zu offset=%llu j=%zu: %g vs %g", n, (unsigned long long)off, j, got[j],
                              ref[j]);
            // both signs from one draw: each the bits of its own pass
            void *dplus = dev_poisoned(n * 2), *dminus = dev_poisoned(n * 2), *dneg = dev_poisoned(n * 2);
            mt_op_perturb_pair(&be, dplus, dminus, dw, n, 1e-2f, 31, off);
            mt_op_perturb(&be, dneg, dw, n, -1e-2f, 31, off);
            float *plus = host_from_bf16(dplus, n), *minus = host_from_bf16(dminus, n), *neg = host_from_bf16(dneg, n);
            ck_assert(memcmp(plus, got, n * 4) == 0);
            ck_assert(memcmp(minus, neg, n * 4) == 0);
            // the deferred update with both signs' reads in one pass: the
            // update, then the pair, as separate launches
            mt_zo_directions d = {2, {101, 202}, {0.5f, -1.0f}};
            void *dw2 = dev_bf16(w, n);
            mt_op_zo_update_perturb(&be, dw, dplus, dminus, n, off, &d, 1e-3f, 0.1f, 77, 1e-2f, 31);
            mt_op_zo_update(&be, dw2, n, off, &d, 1e-3f, 0.1f, 77);
            mt_op_perturb_pair(&be, dout, dneg, dw2, n, 1e-2f, 31, off);
            float *w1 = host_from_bf16(dw, n), *w2 = host_from_bf16(dw2, n), *p1 = host_from_bf16(dplus, n),
                  *p2 = host_from_bf16(dout, n), *m1 = host_from_bf16(dminus, n), *m2 = host_from_bf16(dneg, n);
            ck_assert(memcmp(w1, w2, n * 4) == 0);
            ck_assert(memcmp(p1, p2, n * 4) == 0);
            ck_assert(memcmp(m1, m2, n * 4) == 0);
            ck_assert(n < 7 || memcmp(p1, m1, n * 4) != 0);
            free(plus), free(minus), free(neg), free(w1), free(w2), free(p1), free(p2), free(m1), free(m2);
            mt_device_free(dplus), mt_device_free(dminus), mt_device_free(dneg), mt_device_free(dw2);
            // in place (dst = src) gives the same values
            dw2 = dev_bf16(w, n);
            mt_op_perturb(&be, dw2, dw2, n, 1e-2f, 31, off);
            float *inplace = host_from_bf16(dw2, n);
            ck_assert(memcmp(inplace, got, n * 4) == 0);
            free(w), free(ref), free(got), free(inplace);
            mt_device_free(dw), mt_device_free(dw2), mt_device_free(dout);
        }
    // embedding rows
    int N = 37, C = 22, V = 11;
    int32_t *tokens = malloc(N * 4);
    for (int i = 0; i < N; i++) tokens[i] = (int32_t)(mt_rng_bits(3, i) % V);
    float *x = host_random((size_t)N * C, -1, 1), *ref = malloc((size_t)N * C * 4);
    memcpy(ref, x, (size_t)N * C * 4);
    void *dx = dev_bf16(x, (size_t)N * C), *dt = dev_f32((const float *)tokens, N);
    mt_op_perturb_rows(&be, dx, dt, N, C, 0.5f, 9, 13);
    mt_perturb_rows_ref(ref, tokens, N, C, 0.5f, 9, 13);
    float *got = host_from_bf16(dx, (size_t)N * C);
    for (int i = 0; i < N * C; i++) ck_assert_msg(fabsf(got[i] - ref[i]) <= fabsf(ref[i]) / 256 + 1e-6f, "row %d", i);
    free(tokens), free(x), free(ref), free(got);
    mt_device_free(dx), mt_device_free(dt);
}
END_TEST

START_TEST(zo_update_rounds_stochastically) {
    static const size_t sizes[] = {1, 7, 257, 100003};
    for (int si = 0; si < 4; si++) {
        size_t n = sizes[si];
        float *w = host_random(n, -0.5f, 0.5f), *ref = malloc(n * 4);
        memcpy(ref, w, n * 4);
        void *dw = dev_bf16(w, n);
        mt_zo_directions d = {3, {101, 202, 303}, {0.5f, -1.0f, 2.0f}};
        mt_op_zo_update(&be, dw, n, 5, &d, 1e-3f, 0.1f, 77);
        mt_zo_update_ref(ref, n, 5, d.count, d.seed, d.coef, 1e-3f, 0.1f);
        float *got = host_from_bf16(dw, n);
        // one of the two bf16 neighbours of the exact value
        for (size_t j = 0; j < n; j++)
            ck_assert_msg(fabsf(got[j] - ref[j]) <= fabsf(ref[j]) / 128 + 1e-6f, "update j=%zu: %g vs %g", j, got[j],
                          ref[j]);
        free(w), free(ref), free(got);
        mt_device_free(dw);
    }
    // a step of 1e-4 on values of 1.0 is below half a bf16 ulp (2^-9): round
    // to nearest would lose it, stochastic rounding keeps it on average
    size_t n = 1 << 20;
    float *ones = malloc(n * 4);
    for (size_t j = 0; j < n; j++) ones[j] = 1.0f;
    void *dw = dev_bf16(ones, n);
    mt_zo_directions d = {1, {1}, {0.0f}};
    mt_op_zo_update(&be, dw, n, 0, &d, 1e-3f, 0.1f, 5);  // w -= 1e-3 * 0.1 * w
    float *got = host_from_bf16(dw, n);
    double mean = 0;
    for (size_t j = 0; j < n; j++) {
        ck_assert(got[j] == 1.0f || got[j] == 1.0f - 1.0f / 256);
        mean += got[j];
    }
    mean /= n;
    printf("stochastic rounding: 1 - 1e-4 stored in bf16 averages %.7f over %zu values\n", mean, n);
    ck_assert_msg(fabs(mean - (1.0 - 1e-4)) < 5e-6, "mean %.8f", mean);
    free(ones), free(got);
    mt_device_free(dw);
}
END_TEST

// Why the model never perturbs bf16 weights in place: +eps, -2 eps, +eps
// each round to bf16 and the values wander.
START_TEST(in_place_bf16_drift_is_measured) {
    size_t n = 1 << 16;
    float *w = malloc(n * 4);
    for (size_t j = 0; j < n; j++) w[j] = mt_round_bf16(0.02f * mt_rng_gauss(1, j));
    void *dw = dev_bf16(w, n);
    for (int t = 0; t < 1000; t++) {
        mt_op_perturb(&be, dw, dw, n, 1e-3f, (uint64_t)t, 0);
        mt_op_perturb(&be, dw, dw, n, -2e-3f, (uint64_t)t, 0);
        mt_op_perturb(&be, dw, dw, n, 1e-3f, (uint64_t)t, 0);
    }
    float *got = host_from_bf16(dw, n);
    double worst = 0, sum = 0;
    for (size_t j = 0; j < n; j++) {
        double dlt = fabs((double)got[j] - w[j]);
        worst = fmax(worst, dlt), sum += dlt;
    }
    printf("bf16 in-place perturbation drift after 1000 cycles (|w| ~ 0.02, eps 1e-3): max %.3g, mean %.3g\n", worst,
           sum / n);
    ck_assert(worst > 0);  // it does drift: the reason for the model's scratch-buffer perturbation
    free(w), free(got);
    mt_device_free(dw);
}
END_TEST

// ------------------------------------------------------------------ GaLore

START_TEST(galore_adam_update_and_gauss) {
    // Adam's direction, fp32 moments: the same arithmetic as the CPU
    size_t n = 100003, blocks = (n + MT_QBLOCK - 1) / MT_QBLOCK;
    float *m = host_random(n, -0.1f, 0.1f), *v = host_random(n, 0.0f, 0.01f), *g = host_random(n, -1.0f, 1.0f);
    float *dm = dev_f32(m, n), *dv = dev_f32(v, n), *dg = dev_f32(g, n), *ddir = dev_poisoned(n * 4);
    float *dir = malloc(n * 4);
    mt_adam_state hs = {m, v, NULL, NULL, NULL, NULL}, ds = {dm, dv, NULL, NULL, NULL, NULL};
    mt_adam_direction_ref(dir, g, &hs, n, 0.9f, 0.95f, 1e-8f, 0.19f, 0.0975f);
    mt_op_adam_direction(&be, ddir, dg, &ds, n, 0.9f, 0.95f, 1e-8f, 0.19f, 0.0975f, NULL);
    float *got = host_from_f32(ddir, n), *gm = host_from_f32(dm, n);
    expect_close("adam direction", got, dir, n, 1e-6);
    expect_close("adam m", gm, m, n, 1e-6);
    free(got), free(gm);
    // 8-bit moments over 5 steps: codes and absmax as the CPU's (single
    // roundings on both), the direction within fp32 rounding
    uint8_t *mq = calloc(n, 1), *vq = calloc(n, 1);
    float *ma = calloc(blocks, 4), *va = calloc(blocks, 4);
    void *dmq = dev_poisoned(n), *dvq = dev_poisoned(n);
    float *dma = dev_f32(ma, blocks), *dva = dev_f32(va, blocks);
    mt_device_memset(dmq, 0, n), mt_device_memset(dvq, 0, n);
    mt_adam_state h8 = {NULL, NULL, mq, vq, ma, va}, d8 = {NULL, NULL, dmq, dvq, dma, dva};
    for (int step = 1; step <= 5; step++) {
        float *gs = host_random(n, -1.0f, 1.0f);
        mt_copy_to_device(dg, gs, n * 4);
        float bc1 = 1 - powf(0.9f, (float)step), bc2 = 1 - powf(0.95f, (float)step);
        mt_adam_direction_ref(dir, gs, &h8, n, 0.9f, 0.95f, 1e-8f, bc1, bc2);
        mt_op_adam_direction(&be, ddir, dg, &d8, n, 0.9f, 0.95f, 1e-8f, bc1, bc2, NULL);
        got = host_from_f32(ddir, n);
        // where the GPU's and the CPU's codes agree the directions agree to
        // fp32 rounding; a code may land on the other neighbour (at most 1 in
        // 1000, checked below), and its element's direction moves by a step
        size_t off = 0;
        for (size_t i = 0; i < n; i++) off += fabsf(got[i] - dir[i]) > 1e-4f * fabsf(dir[i]) + 1e-6f;
        ck_assert_msg(off <= n / 1000, "step %d: %zu of %zu 8-bit adam directions off", step, off, n);
        expect_close("8-bit adam direction", got, dir, n, 1e-3);
        free(got), free(gs);
    }
    uint8_t *gq = malloc(n);
    mt_copy_to_host(gq, dmq, n);
    size_t differ = 0;
    for (size_t i = 0; i < n; i++) differ += gq[i] != mq[i];
    ck_assert_msg(differ <= n / 1000, "%zu of %zu 8-bit m codes differ from the CPU's", differ, n);
    free(gq), free(mq), free(vq), free(ma), free(va);
    mt_device_free(dmq), mt_device_free(dvq), mt_device_free(dma), mt_device_free(dva);
    // the update into bf16 weights: one of the two neighbours of the exact value
    float *w = host_random(n, -0.5f, 0.5f), *ref = malloc(n * 4);
    for (size_t i = 0; i < n; i++) ref[i] = mt_bf16_to_f32(mt_f32_to_bf16(w[i]));
    void *dw = dev_bf16(w, n);
    mt_op_apply_update(&be, dw, dg, n, 1e-3f, 0.5f, 0.1f, 99, NULL);
    float *gs = host_from_f32(dg, n);
    mt_apply_update_ref(ref, gs, n, 1e-3f, 0.5f, 0.1f);
    got = host_from_bf16(dw, n);
    for (size_t j = 0; j < n; j++)
        ck_assert_msg(fabsf(got[j] - ref[j]) <= fabsf(ref[j]) / 128 + 1e-6f, "update j=%zu: %g vs %g", j, got[j],
                      ref[j]);
    // gated by a sum of squares on the device (mt_op_sumsq_to: mt_op_sumsq's bits, the host not waiting):
    // finite, the same bits as ungated; not finite, the weights and moments (fp32 and 8-bit) stay as they were
    double *dss = dev_poisoned(2 * sizeof(double)), ss_host = 0.0, nan_host = NAN;
    mt_op_sumsq_to(&be, dg, n, dss);
    mt_copy_to_host(&ss_host, dss, sizeof ss_host);
    double ss_sync = mt_op_sumsq(&be, dg, n);
    ck_assert_msg(memcmp(&ss_host, &ss_sync, sizeof ss_host) == 0, "sumsq_to %.17g, sumsq %.17g", ss_host, ss_sync);
    mt_copy_to_device(dss + 1, &nan_host, sizeof nan_host);
    void *dw2 = dev_bf16(w, n), *dw3 = dev_bf16(w, n);
    mt_op_apply_update(&be, dw2, dg, n, 1e-3f, 0.5f, 0.1f, 99, NULL);
    mt_op_apply_update(&be, dw3, dg, n, 1e-3f, 0.5f, 0.1f, 99, dss);
    uint16_t *b2 = malloc(n * 2), *b3 = malloc(n * 2), *b0 = malloc(n * 2);
    mt_copy_to_host(b2, dw2, n * 2), mt_copy_to_host(b3, dw3, n * 2);
    ck_assert_msg(memcmp(b2, b3, n * 2) == 0, "the update gated by a finite sum differs from the ungated one");
    mt_copy_to_host(b0, dw3, n * 2);
    mt_op_apply_update(&be, dw3, dg, n, 1e-3f, 0.5f, 0.1f, 99, dss + 1);
    mt_copy_to_host(b3, dw3, n * 2);
    ck_assert_msg(memcmp(b0, b3, n * 2) == 0, "the update gated by NaN changed the weights");
    float *m0 = host_from_f32(dm, n), *dir0 = host_from_f32(ddir, n);
    mt_op_adam_direction(&be, ddir, dg, &ds, n, 0.9f, 0.95f, 1e-8f, 0.19f, 0.0975f, dss + 1);
    float *m1 = host_from_f32(dm, n), *dir1 = host_from_f32(ddir, n);
    ck_assert_msg(memcmp(m0, m1, n * 4) == 0 && memcmp(dir0, dir1, n * 4) == 0, "gated adam direction ran");
    uint8_t *q0 = malloc(n), *q1 = malloc(n);
    void *dmq8 = dev_poisoned(n), *dvq8 = dev_poisoned(n);
    float *zeros = calloc(blocks, 4), *dma8 = dev_f32(zeros, blocks), *dva8 = dev_f32(zeros, blocks);
    mt_device_memset(dmq8, 0, n), mt_device_memset(dvq8, 0, n);
    mt_adam_state g8 = {NULL, NULL, dmq8, dvq8, dma8, dva8};
    mt_op_adam_direction(&be, ddir, dg, &g8, n, 0.9f, 0.95f, 1e-8f, 0.19f, 0.0975f, dss);  // finite: runs
    mt_copy_to_host(q0, dmq8, n);
    mt_op_adam_direction(&be, ddir, dg, &g8, n, 0.9f, 0.95f, 1e-8f, 0.19f, 0.0975f, dss + 1);
    mt_copy_to_host(q1, dmq8, n);
    size_t nonzero = 0;
    for (size_t i = 0; i < n; i++) nonzero += q0[i] != 0;
    ck_assert_msg(nonzero > n / 2 && memcmp(q0, q1, n) == 0, "8-bit codes: %zu set, gated step changed them", nonzero);
    free(b0), free(b2), free(b3), free(m0), free(m1), free(dir0), free(dir1), free(q0), free(q1), free(zeros);
    mt_device_free(dw2), mt_device_free(dw3), mt_device_free(dss), mt_device_free(dmq8), mt_device_free(dvq8);
    mt_device_free(dma8), mt_device_free(dva8);
    free(got), free(gs), free(w), free(ref);
    mt_device_free(dw);
    // the z stream in fp32
    float *z = malloc(n * 4);
    mt_gauss_ref(z, n, 1234);
    mt_op_gauss(&be, ddir, n, 1234);
    got = host_from_f32(ddir, n);
    expect_close("gauss", got, z, n, 1e-5);
    free(got), free(z), free(m), free(v), free(g), free(dir);
    mt_device_free(dm), mt_device_free(dv), mt_device_free(dg), mt_device_free(ddir);
}
END_TEST

START_TEST(galore_linear_algebra) {
    mt_backend cpu;
    mt_backend_init(&cpu, -1);
    // products in TF32 against the CPU's double sums, every transpose
    const int M = 300, N = 136, K = 1000;
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            int lda = ta ? K : M, ldb = tb ? N : K;
            size_t na = (size_t)lda * (ta ? M : K), nb = (size_t)ldb * (tb ? K : N), nc = (size_t)M * N;
            float *A = host_random(na, -1, 1), *B = host_random(nb, -1, 1), *C = malloc(nc * 4);
            float *dA = dev_f32(A, na), *dB = dev_f32(B, nb), *dC = dev_poisoned(nc * 4);
            mt_la_gemm(&cpu, ta, tb, M, N, K, 1.0f, A, lda, B, ldb, 0.0f, C, M);
            mt_la_gemm(&be, ta, tb, M, N, K, 1.0f, dA, lda, dB, ldb, 0.0f, dC, M);
            float *got = host_from_f32(dC, nc);
            expect_close("tf32 gemm", got, C, nc, 5e-3);
            free(A), free(B), free(C), free(got);
            mt_device_free(dA), mt_device_free(dB), mt_device_free(dC);
        }
    // QR's Q on the GPU: orthonormal, the same span as the CPU's
    const int a = 2048, k = 136;
    float *Y = host_random((size_t)a * k, -1, 1), *Q = malloc((size_t)a * k * 4);
    memcpy(Q, Y, (size_t)a * k * 4);
    float *dQ = dev_f32(Y, (size_t)a * k);
    mt_la_orthonormalize(&be, dQ, a, k);
    mt_la_orthonormalize(&cpu, Q, a, k);
    float *gq = host_from_f32(dQ, (size_t)a * k);
    double worst = 0, span = 0;
    for (int i = 0; i < k; i++)
        for (int j = 0; j < k; j++) {
            double d = 0, c = 0;
            for (int r = 0; r < a; r++)
                d += (double)gq[i * a + r] * gq[j * a + r], c += (double)gq[i * a + r] * Q[j * a + r];
            worst = fmax(worst, fabs(d - (i == j)));
            span += c * c;  // ||Q_gpu^T Q_cpu||_F^2 = k when the spans agree
        }
    ck_assert_msg(worst < 1e-4, "GPU Q^T Q - I: %g", worst);
    ck_assert_msg(fabs(span - k) < 1e-2, "GPU and CPU spans differ: %g of %d", span, k);
    free(Y), free(Q), free(gq);
    mt_device_free(dQ);
    // eigenvalues of a Gram matrix as the CPU's Jacobi finds them
    const int e = 96;
    float *X = host_random((size_t)e * e, -1, 1), *S = malloc((size_t)e * e * 4), w[96];
    mt_la_gemm(&cpu, 1, 0, e, e, e, 1.0f, X, e, X, e, 0.0f, S, e);
    float *dS = dev_f32(S, (size_t)e * e), *dw = dev_poisoned(e * 4);
    mt_la_symmetric_eigen(&cpu, S, w, e);
    mt_la_symmetric_eigen(&be, dS, dw, e);
    float *gw = host_from_f32(dw, e), *gS = host_from_f32(dS, (size_t)e * e);
    expect_close("eigenvalues", gw, w, e, 1e-4);
    // eigenvectors up to sign: |v_gpu . v_cpu| = 1 for the well-separated top ones
    for (int j = e - 8; j < e; j++) {
        double d = 0;
        for (int r = 0; r < e; r++) d += (double)gS[j * e + r] * S[j * e + r];
        ck_assert_msg(fabs(fabs(d) - 1) < 1e-3, "eigenvector %d: |dot| %g", j, fabs(d));
    }
    free(X), free(S), free(gw), free(gS);
    mt_device_free(dS), mt_device_free(dw);
    mt_la_release();
    mt_backend_free(&cpu);
}
END_TEST

// LoRA's fused A products (all of them, MT_LORA_FUSED=all) against the ops
// they replace on the GPU (the same cuRAND mask: a dropout, then cuBLAS
// products) and, without dropout, against the CPU reference: u, every dA
// and dx, in both versions (MT_LORA_KERNELS=1, then the default: its u
// kernel up to 3 fragments, and its backward's one pass for dA and dx up to
// 4, which must give the bits of the dA and dx kernels run apart). The
// fused kernels must take the first shapes (the mt_lora_down_*_cuda calls
// say so); the last ones (rows not in tiles of 16, r not a multiple of 16)
// are composed by the ops, and so is a scratch too small for the partial
// sums (version 2's u kernel then runs in one split).
START_TEST(lora_down_fused) {
    setenv("MT_LORA_FUSED", "all", 1);  // every kernel, without dropout too
    // R, IN, r, adapters, p, first row (the mask's offset: a tile of the MLP)
    struct {
        int R, IN, r, count;
        float p;
        int r0;
    } shapes[] = {{64, 128, 16, 3, 0.1f, 0},   {48, 192, 16, 2, 0.0f, 0},  {112, 320, 32, 2, 0.3f, 16},
                  {16, 64, 16, 1, 0.05f, 0},   {80, 640, 16, 3, 0.0f, 32}, {208, 2048, 64, 2, 0.05f, 0},
                  {512, 1024, 16, 3, 0.1f, 0}, {10, 128, 16, 3, 0.1f, 0},  {32, 128, 8, 2, 0.2f, 0}};
    // then the first shape twice more: without dropout and with 64 bytes of scratch; and with its first two
    // adapters sharing one dA (the parts of a fused module: their adds in order)
    for (int run = 0; run < 22; run++) {
        int version = run < 11 ? 1 : 2, s = run % 11;  // s: the shapes, then the small scratch, the shared dA
        if (s == 0) setenv("MT_LORA_KERNELS", version == 1 ? "1" : "2", 1);
        int k = s < 9 ? s : 0, shared = s == 10;
        int R = shapes[k].R, IN = shapes[k].IN, r = shapes[k].r, count = shapes[k].count;
        float p = s == 9 ? 0.0f : shapes[k].p;
        int fused = s < 7 || shared, small = s == 9;
        // version 2's u kernel needs no scratch in one split; its backward is one kernel up to 64 adapter rows
        int fused_u = fused || (small && version == 2), both = fused && version == 2 && count * r <= 64;
        uint64_t offset = (uint64_t)shapes[k].r0 * IN, mask_seed = 77 + (uint64_t)s;
        // scratch: dropout(x)'s room, and the partial sums of up to 4 splits of R for every dA
        size_t nx = (size_t)R * IN, nu = (size_t)R * r, na = (size_t)r * IN, room = nx * 2 + 16 * na * count,
               bytes = small ? 64 : room;
        float *x = host_random(nx, -1, 1), *dx0 = host_random(nx, -0.01f, 0.01f);
        float *a[3], *du[3], *da0[3];
        void *a_d[3], *du_d[3], *u_d[3], *uc_d[3];
        float *da_d[3], *dac_d[3];
        for (int g = 0; g < count; g++) {
            a[g] = host_random(na, -1, 1), du[g] = host_random(nu, -1, 1), da0[g] = host_random(na, -1, 1);
            a_d[g] = dev_bf16(a[g], na), du_d[g] = dev_bf16(du[g], nu);
            u_d[g] = dev_poisoned(nu * 2), uc_d[g] = dev_poisoned(nu * 2);
            da_d[g] = dev_f32(da0[g], na), dac_d[g] = dev_f32(da0[g], na);
        }
        if (shared) {
            mt_device_free(da_d[1]), mt_device_free(dac_d[1]);
            da_d[1] = da_d[0], dac_d[1] = dac_d[0];
        }
        void *x_d = dev_bf16(x, nx), *scratch_d = dev_poisoned(room), *dx_d = dev_bf16(dx0, nx),
             *dxc_d = dev_bf16(dx0, nx);
        const void *const *A = (const void *const *)a_d, *const *DU = (const void *const *)du_d;
        // forward: u
        ck_assert_int_eq(mt_lora_down_cuda(&be, u_d, A, count, x_d, scratch_d, bytes, R, IN, r, p, mask_seed, offset),
                         fused_u);
        mt_op_lora_down(&be, u_d, A, count, x_d, scratch_d, bytes, R, IN, r, p, mask_seed, offset);
        const void *in_d = x_d;
        if (p > 0.0f) mt_op_dropout(&be, scratch_d, x_d, nx, p, mask_seed, offset), in_d = scratch_d;
        for (int g = 0; g < count; g++) mt_op_matmul_forward(&be, uc_d[g], in_d, a_d[g], NULL, R, IN, r);
        for (int g = 0; g < count; g++) {
            float *ug = host_from_bf16(u_d[g], nu), *uc = host_from_bf16(uc_d[g], nu);
            expect_close("lora down (fused vs composed)", ug, uc, nu, 1e-2);
            if (p == 0.0f) {
                float *ref = malloc(nu * 4);
                mt_matmul_forward_ref(ref, x, a[g], NULL, R, IN, r);
                expect_close("lora down (fused vs CPU)", ug, ref, nu, 1e-2);
                free(ref);
            }
            free(ug), free(uc);
        }
        // backward: the dA and dx parts alone, then the op
        ck_assert_int_eq(
            mt_lora_down_wgrad_cuda(&be, da_d, DU, count, x_d, scratch_d, bytes, R, IN, r, p, mask_seed, offset),
            fused);
        ck_assert_int_eq(mt_lora_down_dx_cuda(&be, dx_d, DU, A, count, R, IN, r, p, mask_seed, offset), fused || small);
        // the two kernels' results, which the one-pass backward must give bit for bit
        float *apart_da[3], *apart_dx = host_from_bf16(dx_d, nx);
        for (int g = 0; g < count; g++) apart_da[g] = host_from_f32(da_d[g], na);
        for (int g = 0; g < count; g++)
            if (!(shared && g == 1)) mt_copy_to_device(da_d[g], da0[g], na * 4);
        mt_device_free(dx_d);
        dx_d = dev_bf16(dx0, nx);
        mt_op_lora_down_backward(&be, dx_d, da_d, DU, A, count, x_d, scratch_d, bytes, R, IN, r, p, mask_seed, offset);
        if (p > 0.0f) mt_op_dropout(&be, scratch_d, x_d, nx, p, mask_seed, offset);
        for (int g = 0; g < count; g++)
            mt_op_matmul_backward_scaled(&be, NULL, dac_d[g], du_d[g], in_d, a_d[g], R, IN, r, 1.0f, 0);
        if (p > 0.0f) {
            for (int g = 0; g < count; g++)
                mt_op_matmul_backward_scaled(&be, scratch_d, NULL, du_d[g], NULL, a_d[g], R, IN, r, 1.0f, g > 0);
            mt_op_dropout_add(&be, dxc_d, scratch_d, nx, p, mask_seed, offset);
        } else {
            for (int g = 0; g < count; g++)
                mt_op_matmul_backward_scaled(&be, dxc_d, NULL, du_d[g], NULL, a_d[g], R, IN, r, 1.0f, 1);
        }
        for (int g = 0; g < count; g++) {
            float *dag = host_from_f32(da_d[g], na), *dac = host_from_f32(dac_d[g], na);
            expect_close("lora dA (fused vs composed)", dag, dac, na, 1e-4);
            if (both) ck_assert_msg(memcmp(dag, apart_da[g], na * 4) == 0, "one-pass dA differs (shape %d)", s);
            free(apart_da[g]);
            if (p == 0.0f) {
                float *ref = malloc(na * 4);
                memcpy(ref, da0[g], na * 4);
                mt_matmul_backward_ref(NULL, ref, NULL, du[g], x, a[g], R, IN, r, 1.0f, 0);
                expect_close("lora dA (fused vs CPU)", dag, ref, na, 1e-4);
                free(ref);
            }
            free(dag), free(dac);
        }
        float *dxg = host_from_bf16(dx_d, nx), *dxc = host_from_bf16(dxc_d, nx), *dx0b = malloc(nx * 4);
        for (size_t i = 0; i < nx; i++) dx0b[i] = mt_round_bf16(dx0[i]);
        expect_close("lora dx (fused vs composed)", dxg, dxc, nx, 1e-2);
        if (both) ck_assert_msg(memcmp(dxg, apart_dx, nx * 4) == 0, "one-pass dx differs (shape %d)", s);
        free(apart_dx);
        // the same mask (dropout's of ones): where it drops, dx keeps its value
        if (p > 0.0f) {
            float *ones = malloc(nx * 4);
            for (size_t i = 0; i < nx; i++) ones[i] = 1.0f;
            void *mask_d = dev_bf16(ones, nx);
            mt_op_dropout(&be, mask_d, mask_d, nx, p, mask_seed, offset);
            float *mask = host_from_bf16(mask_d, nx);
            size_t dropped = 0;
            for (size_t i = 0; i < nx; i++) {
                if (mask[i] != 0.0f) continue;
                dropped++;
                ck_assert_msg(dxg[i] == dx0b[i], "lora dx: element %zu not dropped", i);
            }
            double share = (double)dropped / (double)nx, sd = sqrt(p * (1 - p) / (double)nx);
            ck_assert_msg(fabs(share - p) < 5 * sd + 1e-9, "lora dx dropped %g, expected %g", share, p);
            free(ones), free(mask);
            mt_device_free(mask_d);
        }
        if (p == 0.0f) {
            float *ref = malloc(nx * 4);
            memcpy(ref, dx0b, nx * 4);
            for (int g = 0; g < count; g++)
                mt_matmul_backward_ref(ref, NULL, NULL, du[g], NULL, a[g], R, IN, r, 1.0f, 1);
            expect_close("lora dx (fused vs CPU)", dxg, ref, nx, 1e-2);
            free(ref);
        }
        free(dxg), free(dxc), free(dx0b), free(x), free(dx0);
        for (int g = 0; g < count; g++) {
            free(a[g]), free(du[g]), free(da0[g]);
            mt_device_free(a_d[g]), mt_device_free(du_d[g]), mt_device_free(u_d[g]), mt_device_free(uc_d[g]);
            if (!(shared && g == 1)) mt_device_free(da_d[g]), mt_device_free(dac_d[g]);
        }
        mt_device_free(x_d), mt_device_free(scratch_d), mt_device_free(dx_d), mt_device_free(dxc_d);
    }
    unsetenv("MT_LORA_FUSED");
    unsetenv("MT_LORA_KERNELS");
}
END_TEST

int main(void) {
    if (mt_device_count() == 0) {
        printf("test_kernels_gpu: no GPU, skipped\n");
        return 77;
    }
    if (mt_backend_init(&be, 0) != MT_OK) return 1;
    // room for the RMSNorm/embedding reductions of every size below (attention grows it as needed)
    if (mt_backend_reserve_workspace(&be, mt_norm_embedding_workspace_bytes(&be, 1 << 14, 1 << 12)) != MT_OK) return 1;
    char name[256];
    mt_device_describe(name, sizeof name);
    printf("test_kernels_gpu on %s\n", name);
    Suite *s = suite_create("kernels_gpu");
    TCase *tc = tcase_create("cuda vs cpu reference");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, rmsnorm);
    tcase_add_test(tc, rope);
    tcase_add_test(tc, attention);
    tcase_add_test(tc, attention_decode);
    tcase_add_test(tc, graph_of_decoding_ops_matches_op_by_op);
    tcase_add_test(tc, swiglu_add_and_embedding);
    tcase_add_test(tc, matmul_and_logits);
    tcase_add_test(tc, scaled_matmuls);
    tcase_add_test(tc, dropout);
    tcase_add_test(tc, lora_down_fused);
    tcase_add_test(tc, nf4_codes_and_dequantize);
    tcase_add_test(tc, crossentropy);
    tcase_add_test(tc, adamw_sums_and_casts);
    tcase_add_test(tc, philox_words_equal_the_cpu_stream);
    tcase_add_test(tc, gauss_stream_equals_the_cpu_stream);
    tcase_add_test(tc, perturb_ops);
    tcase_add_test(tc, zo_update_rounds_stochastically);
    tcase_add_test(tc, in_place_bf16_drift_is_measured);
    tcase_add_test(tc, galore_adam_update_and_gauss);
    tcase_add_test(tc, galore_linear_algebra);
    suite_add_tcase(s, tc);
    int status = tu_run_suite(s, 1);
    mt_backend_free(&be);
    return status;
}
