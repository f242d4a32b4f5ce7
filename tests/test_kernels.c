// tests/test_kernels.c: the CPU reference ops. Forward ops are checked against
// direct formulas; every backward against central finite differences of a
// random projection of the forward output.
#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/common.h"
#include "kernels/dtype.h"
#include "kernels/mem.h"
#include "kernels/ops_ref.h"
#include "kernels/rng.h"
#include "testutil.h"

static const double kFdTolerance = 2e-2;

static double dot(const float *a, const float *b, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}

// ----------------------------------------------------------------- rmsnorm
typedef struct {
    int N, C, plus_one;
    float *x, *w, *y, *rstd, *r;
} rms_ctx;

static double rms_loss(void *p) {
    rms_ctx *c = p;
    mt_rmsnorm_forward_ref(c->y, c->rstd, c->x, c->w, c->N, c->C, 1e-5f, c->plus_one);
    return dot(c->y, c->r, (size_t)c->N * c->C);
}

START_TEST(rmsnorm_forward_and_backward) {
    rms_ctx c = {.N = 7, .C = 22};
    size_t n = (size_t)c.N * c.C;
    c.x = tu_random(n, -2, 2, 1);
    c.w = tu_random(c.C, 0.5f, 1.5f, 2);
    c.r = tu_random(n, -1, 1, 3);
    c.y = malloc(n * 4);
    c.rstd = malloc(c.N * 4);
    rms_loss(&c);
    // forward: mean of (y/w)^2 is 1 (up to eps)
    double ms = 0;
    for (int i = 0; i < c.C; i++) ms += pow(c.y[i] / c.w[i], 2);
    ck_assert_double_eq_tol(ms / c.C, 1.0, 1e-3);
    float *dx = calloc(n, 4), *dw = calloc(c.C, 4);
    mt_rmsnorm_backward_ref(dx, dw, c.r, c.x, c.w, c.rstd, c.N, c.C, 0);
    ck_assert_double_lt(tu_fd_check(rms_loss, &c, c.x, dx, n, 40, 1e-2), kFdTolerance);
    ck_assert_double_lt(tu_fd_check(rms_loss, &c, c.w, dw, c.C, 22, 1e-2), kFdTolerance);
    // dinp accumulates
    float *dx2 = malloc(n * 4);
    for (size_t i = 0; i < n; i++) dx2[i] = 1.0f;
    float *dw2 = calloc(c.C, 4);
    mt_rmsnorm_backward_ref(dx2, dw2, c.r, c.x, c.w, c.rstd, c.N, c.C, 0);
    for (size_t i = 0; i < n; i++) ck_assert_float_eq_tol(dx2[i], dx[i] + 1.0f, 1e-5);
    free(c.x), free(c.w), free(c.r), free(c.y), free(c.rstd), free(dx), free(dw), free(dx2), free(dw2);
}
END_TEST

// Gemma's RMSNorm scales by (1 + w): a weight of 0 is the plain norm, and the
// backward matches finite differences.
START_TEST(rmsnorm_plus_one) {
    rms_ctx c = {.N = 5, .C = 19, .plus_one = 1};
    size_t n = (size_t)c.N * c.C;
    c.x = tu_random(n, -2, 2, 101);
    c.w = tu_random(c.C, -0.5f, 0.5f, 102);
    c.r = tu_random(n, -1, 1, 103);
    c.y = malloc(n * 4), c.rstd = malloc(c.N * 4);
    rms_loss(&c);
    float *ones = malloc(c.C * 4), *zeros = calloc(c.C, 4), *a = malloc(n * 4), *b = malloc(n * 4), r[5];
    for (int i = 0; i < c.C; i++) ones[i] = 1.0f + c.w[i];
    mt_rmsnorm_forward_ref(a, r, c.x, ones, c.N, c.C, 1e-5f, 0);  // (1 + w) as a plain weight
    for (size_t i = 0; i < n; i++) ck_assert_float_eq_tol(c.y[i], a[i], 1e-6);
    mt_rmsnorm_forward_ref(a, r, c.x, zeros, c.N, c.C, 1e-5f, 1);
    for (int i = 0; i < c.C; i++) ones[i] = 1.0f;
    mt_rmsnorm_forward_ref(b, r, c.x, ones, c.N, c.C, 1e-5f, 0);
    ck_assert_mem_eq(a, b, n * 4);
    float *dx = calloc(n, 4), *dw = calloc(c.C, 4);
    mt_rmsnorm_backward_ref(dx, dw, c.r, c.x, c.w, c.rstd, c.N, c.C, 1);
    ck_assert_double_lt(tu_fd_check(rms_loss, &c, c.x, dx, n, 40, 1e-2), kFdTolerance);
    ck_assert_double_lt(tu_fd_check(rms_loss, &c, c.w, dw, c.C, 19, 1e-2), kFdTolerance);
    free(c.x), free(c.w), free(c.r), free(c.y), free(c.rstd), free(dx), free(dw), free(ones), free(zeros), free(a),
        free(b);
}
END_TEST

// -------------------------------------------------------------------- rope
typedef struct {
    int B, T, H, D, rotate;
    float *x, *y, *r, *cos_table, *sin_table;
    const int32_t *pos;
} rope_ctx;

static double rope_loss(void *p) {
    rope_ctx *c = p;
    mt_rope_forward_ref(c->y, c->x, c->cos_table, c->sin_table, c->pos, c->B, c->T, c->H, c->D, c->rotate);
    return dot(c->y, c->r, (size_t)c->B * c->T * c->H * c->D);
}

START_TEST(rope_forward_and_backward) {
    for (int rotate = 0; rotate <= 1; rotate++) {
        rope_ctx c = {.B = 2, .T = 5, .H = 3, .D = 8, .rotate = rotate};
        size_t n = (size_t)c.B * c.T * c.H * c.D;
        float inv_freq[4];
        for (int i = 0; i < 4; i++) inv_freq[i] = powf(10000.0f, -2.0f * i / c.D);
        c.cos_table = malloc(c.T * 4 * 4);
        c.sin_table = malloc(c.T * 4 * 4);
        mt_rope_tables(c.cos_table, c.sin_table, inv_freq, c.T, c.D);
        c.x = tu_random(n, -1, 1, 4);
        c.r = tu_random(n, -1, 1, 5);
        c.y = malloc(n * 4);
        rope_loss(&c);
        // position 0 is the identity (up to the layout change)
        for (int d = 0; d < c.D; d++) ck_assert_float_eq_tol(c.y[d], c.x[d], 1e-6);
        // element (b=1, t=3, h=2) lands at (b=1, h=2, t=3)
        const float *src = c.x + ((1 * c.T + 3) * c.H + 2) * c.D, *dst = c.y + ((1 * c.H + 2) * c.T + 3) * c.D;
        float ang = 3 * inv_freq[1];
        float expect = rotate ? src[1] * cosf(ang) - src[5] * sinf(ang) : src[1];
        ck_assert_float_eq_tol(dst[1], expect, 1e-5);
        float *dx = malloc(n * 4);
        mt_rope_backward_ref(dx, c.r, c.cos_table, c.sin_table, NULL, c.B, c.T, c.H, c.D, c.rotate);
        ck_assert_double_lt(tu_fd_check(rope_loss, &c, c.x, dx, n, 60, 1e-2), kFdTolerance);
        free(c.x), free(c.r), free(c.y), free(dx), free(c.cos_table), free(c.sin_table);
    }
}
END_TEST

// --------------------------------------------------------------- attention
typedef struct {
    int B, T, H, KV, D, window;
    float *q, *k, *v, *y, *r, *lse;
    const int32_t *pos;  // packed documents, or NULL
    float scale;         // 0: 1/sqrt(D)
} att_ctx;

static double att_loss(void *p) {
    att_ctx *c = p;
    mt_attention_forward_ref(c->y, c->lse, c->q, c->k, c->v, c->B, c->T, c->H, c->KV, c->D, c->window, c->pos,
                             c->scale);
    return dot(c->y, c->r, (size_t)c->B * c->T * c->H * c->D);
}

// Output row (b, t, h) of attention over keys j0..t alone, in double.
static void att_row_by_hand(const att_ctx *c, int b, int t, int h, int j0, double *y) {
    const float *q = c->q + (((size_t)b * c->H + h) * c->T + t) * c->D;
    size_t kv = ((size_t)b * c->KV + h / (c->H / c->KV)) * c->T * c->D;
    double s[64], max = -INFINITY, sum = 0;
    for (int j = j0; j <= t; j++) {
        s[j] = 0;
        for (int d = 0; d < c->D; d++) s[j] += (double)q[d] * c->k[kv + (size_t)j * c->D + d];
        s[j] /= sqrt(c->D);
        if (s[j] > max) max = s[j];
    }
    for (int j = j0; j <= t; j++) sum += exp(s[j] - max);
    for (int d = 0; d < c->D; d++) {
        y[d] = 0;
        for (int j = j0; j <= t; j++) y[d] += exp(s[j] - max) / sum * c->v[kv + (size_t)j * c->D + d];
    }
}

// Random q, k, v and upstream gradient r (seeds seed..seed+3), room for y and lse.
static void att_init(att_ctx *c, uint64_t seed, size_t *nq, size_t *nk) {
    *nq = (size_t)c->B * c->H * c->T * c->D, *nk = (size_t)c->B * c->KV * c->T * c->D;
    c->q = tu_random(*nq, -1, 1, seed);
    c->k = tu_random(*nk, -1, 1, seed + 1);
    c->v = tu_random(*nk, -1, 1, seed + 2);
    c->r = tu_random(*nq, -1, 1, seed + 3);
    c->y = malloc(*nq * 4);
    c->lse = malloc((size_t)c->B * c->H * c->T * 4);
}

START_TEST(attention_forward_and_backward) {
    att_ctx c = {.B = 2, .T = 7, .H = 4, .KV = 2, .D = 8};
    size_t nq, nk;
    att_init(&c, 6, &nq, &nk);
    att_loss(&c);
    // t = 0 attends only to itself: output equals v[0] of its kv head
    for (int h = 0; h < c.H; h++)
        for (int d = 0; d < c.D; d++)
            ck_assert_float_eq_tol(c.y[(size_t)h * c.D + d], c.v[(size_t)(h / 2) * c.T * c.D + d], 1e-6);
    // t = 1 of head 3 (kv head 1), batch 1: two-key softmax by hand
    {
        const float *q = c.q + (((size_t)1 * c.H + 3) * c.T + 1) * c.D;
        const float *k = c.k + (((size_t)1 * c.KV + 1) * c.T) * c.D, *v = c.v + (((size_t)1 * c.KV + 1) * c.T) * c.D;
        double s0 = 0, s1 = 0;
        for (int d = 0; d < c.D; d++) s0 += q[d] * k[d], s1 += q[d] * k[c.D + d];
        s0 /= sqrt(c.D), s1 /= sqrt(c.D);
        double p0 = 1.0 / (1.0 + exp(s1 - s0));
        const float *y = c.y + (((size_t)1 * c.T + 1) * c.H + 3) * c.D;
        for (int d = 0; d < c.D; d++) ck_assert_double_eq_tol(y[d], p0 * v[d] + (1 - p0) * v[c.D + d], 1e-5);
        ck_assert_double_eq_tol(c.lse[((size_t)1 * c.H + 3) * c.T + 1], log(exp(s0) + exp(s1)), 1e-5);
    }
    float *dq = malloc(nq * 4), *dk = malloc(nk * 4), *dv = malloc(nk * 4);
    mt_attention_backward_ref(dq, dk, dv, c.r, c.q, c.k, c.v, c.y, c.lse, c.B, c.T, c.H, c.KV, c.D, c.window, NULL,
                              0.0f);
    ck_assert_double_lt(tu_fd_check(att_loss, &c, c.q, dq, nq, 50, 1e-2), kFdTolerance);
    ck_assert_double_lt(tu_fd_check(att_loss, &c, c.k, dk, nk, 50, 1e-2), kFdTolerance);
    ck_assert_double_lt(tu_fd_check(att_loss, &c, c.v, dv, nk, 50, 1e-2), kFdTolerance);
    free(c.q), free(c.k), free(c.v), free(c.r), free(c.y), free(c.lse), free(dq), free(dk), free(dv);
}
END_TEST

// Mistral's sliding window: query t sees keys t - window + 1 .. t (transformers'
// sliding_window_overlay: kv_idx > q_idx - sliding_window); a window of T or
// more is no window; the backward matches finite differences.
START_TEST(attention_sliding_window) {
    att_ctx c = {.B = 2, .T = 13, .H = 4, .KV = 2, .D = 8, .window = 4};
    size_t nq, nk;
    att_init(&c, 60, &nq, &nk);
    att_loss(&c);
    int rows[][3] = {{0, 0, 0}, {1, 2, 3}, {0, 3, 1}, {1, 4, 2}, {1, 12, 3}, {0, 9, 0}};
    for (int i = 0; i < 6; i++) {
        int b = rows[i][0], t = rows[i][1], h = rows[i][2], j0 = t - c.window + 1 > 0 ? t - c.window + 1 : 0;
        double expect[8];
        att_row_by_hand(&c, b, t, h, j0, expect);
        const float *y = c.y + (((size_t)b * c.T + t) * c.H + h) * c.D;
        for (int d = 0; d < c.D; d++) ck_assert_double_eq_tol(y[d], expect[d], 1e-5);
    }
    float *full = malloc(nq * 4), *full_lse = malloc((size_t)c.B * c.H * c.T * 4);
    mt_attention_forward_ref(full, full_lse, c.q, c.k, c.v, c.B, c.T, c.H, c.KV, c.D, 0, NULL, 0.0f);
    mt_attention_forward_ref(c.y, c.lse, c.q, c.k, c.v, c.B, c.T, c.H, c.KV, c.D, c.T, NULL, 0.0f);
    ck_assert_mem_eq(full, c.y, nq * 4);
    mt_attention_forward_ref(c.y, c.lse, c.q, c.k, c.v, c.B, c.T, c.H, c.KV, c.D, c.window, NULL, 0.0f);
    ck_assert(memcmp(full, c.y, nq * 4) != 0);
    float *dq = malloc(nq * 4), *dk = malloc(nk * 4), *dv = malloc(nk * 4);
    mt_attention_backward_ref(dq, dk, dv, c.r, c.q, c.k, c.v, c.y, c.lse, c.B, c.T, c.H, c.KV, c.D, c.window, NULL,
                              0.0f);
    ck_assert_double_lt(tu_fd_check(att_loss, &c, c.q, dq, nq, 50, 1e-2), kFdTolerance);
    ck_assert_double_lt(tu_fd_check(att_loss, &c, c.k, dk, nk, 50, 1e-2), kFdTolerance);
    ck_assert_double_lt(tu_fd_check(att_loss, &c, c.v, dv, nk, 50, 1e-2), kFdTolerance);
    free(c.q), free(c.k), free(c.v), free(c.r), free(c.y), free(c.lse), free(dq), free(dk), free(dv), free(full);
    free(full_lse);
}
END_TEST

// Packed documents: each row holds documents one after another (positions
// restart at 0). Every document's outputs, lse and gradients equal that
// document's attention run alone (bit for bit: the same keys in the same
// order), with and without a sliding window; rope rotates each document from
// position 0; the backward matches finite differences.
START_TEST(attention_packed_documents_equal_each_document_alone) {
    enum { B = 2, T = 13, H = 4, KV = 2, D = 8 };
    int lengths[B][4] = {{5, 1, 7, 0}, {13, 0}};  // row 0: three documents; row 1: one
    int32_t pos[B * T];
    for (int b = 0; b < B; b++)
        for (int i = 0, t = 0; lengths[b][i]; i++)
            for (int p = 0; p < lengths[b][i]; p++, t++) pos[b * T + t] = p;
    for (int window = 0; window <= 3; window += 3) {
        att_ctx c = {.B = B, .T = T, .H = H, .KV = KV, .D = D, .window = window, .pos = pos};
        size_t nq, nk;
        att_init(&c, 80 + window, &nq, &nk);
        att_loss(&c);
        float *dq = malloc(nq * 4), *dk = malloc(nk * 4), *dv = malloc(nk * 4);
        mt_attention_backward_ref(dq, dk, dv, c.r, c.q, c.k, c.v, c.y, c.lse, B, T, H, KV, D, window, pos, 0.0f);
        for (int b = 0; b < B; b++)
            for (int i = 0, t0 = 0; lengths[b][i]; t0 += lengths[b][i], i++) {
                int n = lengths[b][i];
                // the document alone: rows t0..t0+n-1 of row b, as a batch of one
                att_ctx a = {.B = 1, .T = n, .H = H, .KV = KV, .D = D, .window = window};
                size_t aq = (size_t)H * n * D, ak = (size_t)KV * n * D;
                a.q = malloc(aq * 4), a.k = malloc(ak * 4), a.v = malloc(ak * 4), a.r = malloc(aq * 4);
                a.y = malloc(aq * 4), a.lse = malloc((size_t)H * n * 4);
                float *aq_d = malloc(aq * 4), *ak_d = malloc(ak * 4), *av_d = malloc(ak * 4);
                for (int h = 0; h < H; h++)
                    for (int t = 0; t < n; t++) {
                        memcpy(a.q + ((size_t)h * n + t) * D, c.q + (((size_t)b * H + h) * T + t0 + t) * D, D * 4);
                        memcpy(a.r + ((size_t)t * H + h) * D, c.r + (((size_t)b * T + t0 + t) * H + h) * D, D * 4);
                    }
                for (int g = 0; g < KV; g++)
                    for (int t = 0; t < n; t++) {
                        memcpy(a.k + ((size_t)g * n + t) * D, c.k + (((size_t)b * KV + g) * T + t0 + t) * D, D * 4);
                        memcpy(a.v + ((size_t)g * n + t) * D, c.v + (((size_t)b * KV + g) * T + t0 + t) * D, D * 4);
                    }
                att_loss(&a);
                mt_attention_backward_ref(aq_d, ak_d, av_d, a.r, a.q, a.k, a.v, a.y, a.lse, 1, n, H, KV, D, window,
                                          NULL, 0.0f);
                for (int h = 0; h < H; h++)
                    for (int t = 0; t < n; t++) {
                        ck_assert_mem_eq(a.y + ((size_t)t * H + h) * D, c.y + (((size_t)b * T + t0 + t) * H + h) * D,
                                         D * 4);
                        ck_assert_float_eq(a.lse[(size_t)h * n + t], c.lse[((size_t)b * H + h) * T + t0 + t]);
                        ck_assert_mem_eq(aq_d + ((size_t)h * n + t) * D, dq + (((size_t)b * H + h) * T + t0 + t) * D,
                                         D * 4);
                    }
                for (int g = 0; g < KV; g++)
                    for (int t = 0; t < n; t++) {
                        size_t at = ((size_t)g * n + t) * D, in = (((size_t)b * KV + g) * T + t0 + t) * D;
                        ck_assert_mem_eq(ak_d + at, dk + in, D * 4);
                        ck_assert_mem_eq(av_d + at, dv + in, D * 4);
                    }
                free(a.q), free(a.k), free(a.v), free(a.r), free(a.y), free(a.lse), free(aq_d), free(ak_d), free(av_d);
            }
        // the masks matter: without them row 0 differs
        float *plain = malloc(nq * 4);
        mt_attention_forward_ref(plain, c.lse, c.q, c.k, c.v, B, T, H, KV, D, window, NULL, 0.0f);
        ck_assert(memcmp(plain, c.y, (size_t)T * H * D * 4) != 0);
        free(plain);
        att_loss(&c);
        ck_assert_double_lt(tu_fd_check(att_loss, &c, c.q, dq, nq, 50, 1e-2), kFdTolerance);
        ck_assert_double_lt(tu_fd_check(att_loss, &c, c.k, dk, nk, 50, 1e-2), kFdTolerance);
        ck_assert_double_lt(tu_fd_check(att_loss, &c, c.v, dv, nk, 50, 1e-2), kFdTolerance);
        free(c.q), free(c.k), free(c.v), free(c.r), free(c.y), free(c.lse), free(dq), free(dk), free(dv);
    }
    // rope: a document's token p turns by angle p, wherever it sits in the row
    rope_ctx r = {.B = B, .T = T, .H = H, .D = D, .rotate = 1, .pos = pos};
    size_t n = (size_t)B * T * H * D;
    float inv_freq[D / 2];
    for (int i = 0; i < D / 2; i++) inv_freq[i] = powf(10000.0f, -2.0f * i / D);
    r.cos_table = malloc(T * D / 2 * 4), r.sin_table = malloc(T * D / 2 * 4);
    mt_rope_tables(r.cos_table, r.sin_table, inv_freq, T, D);
    r.x = tu_random(n, -1, 1, 90), r.r = tu_random(n, -1, 1, 91), r.y = malloc(n * 4);
    rope_loss(&r);
    float *dx = malloc(n * 4);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < H; h++) {
                int p = pos[b * T + t];
                const float *y = r.y + (((size_t)b * H + h) * T + t) * D, *x = r.x + (((size_t)b * T + t) * H + h) * D;
                for (int i = 0; i < D / 2; i++) {
                    float cth = cosf((float)p * inv_freq[i]), sth = sinf((float)p * inv_freq[i]);
                    ck_assert_float_eq_tol(y[i], x[i] * cth - x[i + D / 2] * sth, 1e-6);
                    ck_assert_float_eq_tol(y[i + D / 2], x[i + D / 2] * cth + x[i] * sth, 1e-6);
                }
            }
    mt_rope_backward_ref(dx, r.r, r.cos_table, r.sin_table, pos, B, T, H, D, 1);
    ck_assert_double_lt(tu_fd_check(rope_loss, &r, r.x, dx, n, 60, 1e-2), kFdTolerance);
    free(dx), free(r.x), free(r.r), free(r.y), free(r.cos_table), free(r.sin_table);
}
END_TEST

// The scores' scale (Gemma's query_pre_attn_scalar^-1/2): scaling q by s / (1
// / sqrt(D)) with the default scale gives the same output; the backward
// matches finite differences.
// Decoding one token at a time through the caches gives, at each position,
// the row causal attention over the whole sequence gives there (bit for bit:
// the same sums in the same order), with and without a window.
START_TEST(attention_decode_equals_causal_rows) {
    int B = 2, T = 37, H = 4, KV = 2, D = 16, S = 40;
    size_t nq = (size_t)B * H * T * D, nk = (size_t)B * KV * T * D;
    for (int window = 0; window <= 8; window += 8) {
        float *q = tu_random(nq, -1, 1, 71), *k = tu_random(nk, -1, 1, 72), *v = tu_random(nk, -1, 1, 73);
        float *out = malloc(nq * 4), *lse = malloc((size_t)B * H * T * 4);
        mt_attention_forward_ref(out, lse, q, k, v, B, T, H, KV, D, window, NULL, 0.0f);
        float *kc = calloc((size_t)B * KV * S * D, 4), *vc = calloc((size_t)B * KV * S * D, 4);
        float *qt = malloc((size_t)B * H * D * 4), *kt = malloc((size_t)B * KV * D * 4),
              *vt = malloc((size_t)B * KV * D * 4), *yt = malloc((size_t)B * H * D * 4);
        for (int t = 0; t < T; t++) {
            // row 1 runs 3 positions behind row 0 (a row of its own position)
            int32_t pos[2] = {t, t >= 3 ? t - 3 : t};
            for (int b = 0; b < B; b++) {
                for (int h = 0; h < H; h++)
                    memcpy(qt + ((size_t)b * H + h) * D, q + (((size_t)b * H + h) * T + pos[b]) * D, (size_t)D * 4);
                for (int h = 0; h < KV; h++) {
                    memcpy(kt + ((size_t)b * KV + h) * D, k + (((size_t)b * KV + h) * T + pos[b]) * D, (size_t)D * 4);
                    memcpy(vt + ((size_t)b * KV + h) * D, v + (((size_t)b * KV + h) * T + pos[b]) * D, (size_t)D * 4);
                }
            }
            mt_kv_store_ref(kc, vc, kt, vt, pos, B, KV, D, S);
            mt_attention_decode_ref(yt, qt, kc, vc, pos, B, H, KV, D, S, window, 0.0f);
            for (int b = 0; b < B; b++)
                for (int h = 0; h < H; h++)
                    for (int d = 0; d < D; d++)
                        ck_assert_msg(
                            yt[((size_t)b * H + h) * D + d] == out[(((size_t)b * T + pos[b]) * H + h) * D + d],
                            "window %d, row %d, position %d, head %d, dim %d", window, b, pos[b], h, d);
        }
        free(q), free(k), free(v), free(out), free(lse), free(kc), free(vc), free(qt), free(kt), free(vt), free(yt);
    }
}
END_TEST

START_TEST(attention_scale) {
    att_ctx c = {.B = 1, .T = 9, .H = 4, .KV = 2, .D = 8, .scale = 0.2f};
    size_t nq, nk;
    att_init(&c, 70, &nq, &nk);
    att_loss(&c);
    float *q2 = malloc(nq * 4), *y2 = malloc(nq * 4), *lse2 = malloc((size_t)c.H * c.T * 4);
    for (size_t i = 0; i < nq; i++) q2[i] = c.q[i] * 0.2f * sqrtf(8.0f);
    mt_attention_forward_ref(y2, lse2, q2, c.k, c.v, c.B, c.T, c.H, c.KV, c.D, 0, NULL, 0.0f);
    for (size_t i = 0; i < nq; i++) ck_assert_float_eq_tol(y2[i], c.y[i], 1e-5);
    float *dq = malloc(nq * 4), *dk = malloc(nk * 4), *dv = malloc(nk * 4);
    mt_attention_backward_ref(dq, dk, dv, c.r, c.q, c.k, c.v, c.y, c.lse, c.B, c.T, c.H, c.KV, c.D, 0, NULL, 0.2f);
    ck_assert_double_lt(tu_fd_check(att_loss, &c, c.q, dq, nq, 50, 1e-2), kFdTolerance);
    ck_assert_double_lt(tu_fd_check(att_loss, &c, c.k, dk, nk, 50, 1e-2), kFdTolerance);
    free(c.q), free(c.k), free(c.v), free(c.r), free(c.y), free(c.lse), free(dq), free(dk), free(dv), free(q2);
    free(y2), free(lse2);
}
END_TEST

// ------------------------------------------------------------------ swiglu
typedef struct {
    size_t n;
    float *g, *u, *y, *r;
    mt_act act;
} swiglu_ctx;

static double swiglu_loss(void *p) {
    swiglu_ctx *c = p;
    mt_glu_forward_ref(c->y, c->g, c->u, c->n, c->act);
    return dot(c->y, c->r, c->n);
}

START_TEST(swiglu_forward_and_backward) {
    swiglu_ctx c = {.n = 257};
    c.g = tu_random(c.n, -4, 4, 10);
    c.u = tu_random(c.n, -2, 2, 11);
    c.r = tu_random(c.n, -1, 1, 12);
    c.y = malloc(c.n * 4);
    swiglu_loss(&c);
    ck_assert_float_eq_tol(c.y[3], c.g[3] / (1 + expf(-c.g[3])) * c.u[3], 1e-6);
    float *dg = malloc(c.n * 4), *du = malloc(c.n * 4);
    mt_glu_backward_ref(dg, du, c.r, c.g, c.u, c.n, MT_ACT_SILU);
    ck_assert_double_lt(tu_fd_check(swiglu_loss, &c, c.g, dg, c.n, 60, 1e-3), kFdTolerance);
    ck_assert_double_lt(tu_fd_check(swiglu_loss, &c, c.u, du, c.n, 60, 1e-3), kFdTolerance);
    free(c.g), free(c.u), free(c.r), free(c.y), free(dg), free(du);
}
END_TEST

// GeGLU with GELU's tanh approximation (Gemma's gelu_pytorch_tanh): values
// of 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) at 1, -2, 0.5 computed
// in fp64, and the backward against finite differences.
START_TEST(geglu_forward_and_backward) {
    swiglu_ctx c = {.n = 257, .act = MT_ACT_GELU_TANH};
    c.g = tu_random(c.n, -4, 4, 20);
    c.u = tu_random(c.n, -2, 2, 21);
    c.r = tu_random(c.n, -1, 1, 22);
    c.y = malloc(c.n * 4);
    float gx[3] = {1.0f, -2.0f, 0.5f}, ones[3] = {1, 1, 1}, y[3];
    const double fp64[3] = {0.8411919906082768, -0.04540230591222494, 0.34571400982514394};
    mt_glu_forward_ref(y, gx, ones, 3, MT_ACT_GELU_TANH);
    for (int i = 0; i < 3; i++) ck_assert_double_eq_tol(y[i], fp64[i], 1e-6);
    swiglu_loss(&c);
    float *dg = malloc(c.n * 4), *du = malloc(c.n * 4);
    mt_glu_backward_ref(dg, du, c.r, c.g, c.u, c.n, MT_ACT_GELU_TANH);
    ck_assert_double_lt(tu_fd_check(swiglu_loss, &c, c.g, dg, c.n, 60, 1e-3), kFdTolerance);
    ck_assert_double_lt(tu_fd_check(swiglu_loss, &c, c.u, du, c.n, 60, 1e-3), kFdTolerance);
    free(c.g), free(c.u), free(c.r), free(c.y), free(dg), free(du);
}
END_TEST

// ------------------------------------------------------------------ matmul
typedef struct {
    int N, IN, OUT;
    float *x, *w, *b, *y, *r;
} mm_ctx;

static double mm_loss(void *p) {
    mm_ctx *c = p;
    mt_matmul_forward_ref(c->y, c->x, c->w, c->b, c->N, c->IN, c->OUT);
    return dot(c->y, c->r, (size_t)c->N * c->OUT);
}

START_TEST(matmul_forward_and_backward) {
    mm_ctx c = {.N = 7, .IN = 22, .OUT = 13};
    size_t nx = (size_t)c.N * c.IN, nw = (size_t)c.OUT * c.IN, ny = (size_t)c.N * c.OUT;
    c.x = tu_random(nx, -1, 1, 13);
    c.w = tu_random(nw, -1, 1, 14);
    c.b = tu_random(c.OUT, -1, 1, 15);
    c.r = tu_random(ny, -1, 1, 16);
    c.y = malloc(ny * 4);
    mm_loss(&c);
    double y23 = c.b[3];
    for (int i = 0; i < c.IN; i++) y23 += (double)c.x[2 * c.IN + i] * c.w[3 * c.IN + i];
    ck_assert_double_eq_tol(c.y[2 * c.OUT + 3], y23, 1e-5);
    float *dx = malloc(nx * 4), *dw = calloc(nw, 4), *db = calloc(c.OUT, 4);
    for (size_t i = 0; i < nx; i++) dx[i] = NAN;  // poisoned: overwrite mode must write all
    mt_matmul_backward_ref(dx, dw, db, c.r, c.x, c.w, c.N, c.IN, c.OUT, 1.0f, 0);
    ck_assert_double_lt(tu_fd_check(mm_loss, &c, c.x, dx, nx, 50, 1e-2), kFdTolerance);
    ck_assert_double_lt(tu_fd_check(mm_loss, &c, c.w, dw, nw, 50, 1e-2), kFdTolerance);
    ck_assert_double_lt(tu_fd_check(mm_loss, &c, c.b, db, c.OUT, 13, 1e-2), kFdTolerance);
    // accumulate mode adds; dweight always accumulates
    float *dx2 = malloc(nx * 4);
    memcpy(dx2, dx, nx * 4);
    mt_matmul_backward_ref(dx2, dw, NULL, c.r, c.x, c.w, c.N, c.IN, c.OUT, 1.0f, 1);
    for (size_t i = 0; i < nx; i++) ck_assert_float_eq_tol(dx2[i], 2 * dx[i], 1e-5);
    free(c.x), free(c.w), free(c.b), free(c.r), free(c.y), free(dx), free(dw), free(db), free(dx2);
}
END_TEST

// ----------------------------------------------------------- cross-entropy
typedef struct {
    int N, V;
    int32_t *targets;
    float *z, *losses;
} ce_ctx;

static double ce_loss(void *p) {
    ce_ctx *c = p;
    mt_crossentropy_ref(c->losses, NULL, c->z, c->targets, c->N, c->V, 1.0f);
    double s = 0;
    for (int n = 0; n < c->N; n++) s += c->losses[n];
    return s;
}

START_TEST(crossentropy_forward_and_backward) {
    ce_ctx c = {.N = 5, .V = 33};
    int32_t targets[5] = {3, -1, 0, 32, 17};
    c.targets = targets;
    c.z = tu_random((size_t)c.N * c.V, -3, 3, 17);
    c.losses = malloc(c.N * 4);
    ce_loss(&c);
    ck_assert_float_eq(c.losses[1], 0.0f);
    double sum = 0;
    for (int i = 0; i < c.V; i++) sum += exp(c.z[i]);
    ck_assert_double_eq_tol(c.losses[0], log(sum) - c.z[3], 1e-5);
    float *dz = malloc((size_t)c.N * c.V * 4);
    float scratch[5];
    mt_crossentropy_ref(scratch, dz, c.z, targets, c.N, c.V, 1.0f);
    for (int i = 0; i < c.V; i++) ck_assert_float_eq(dz[c.V + i], 0.0f);  // ignored row
    ck_assert_double_lt(tu_fd_check(ce_loss, &c, c.z, dz, (size_t)c.N * c.V, 80, 1e-2), kFdTolerance);
    free(c.z), free(c.losses), free(dz);
}
END_TEST

// --------------------------------------------------------------- embedding
START_TEST(embedding_forward_and_backward) {
    int N = 6, C = 5, V = 4;
    int32_t tokens[6] = {1, 3, 1, 0, 2, 1};
    float *wte = tu_random((size_t)V * C, -1, 1, 18), *out = malloc((size_t)N * C * 4);
    mt_embedding_forward_ref(out, tokens, wte, N, C);
    ck_assert_float_eq(out[1 * C + 2], wte[3 * C + 2]);
    float *dout = tu_random((size_t)N * C, -1, 1, 19), *dwte = calloc((size_t)V * C, 4);
    mt_embedding_backward_ref(dwte, tokens, dout, N, C);
    for (int c = 0; c < C; c++)
        ck_assert_float_eq_tol(dwte[1 * C + c], dout[c] + dout[2 * C + c] + dout[5 * C + c], 1e-6);
    free(wte), free(out), free(dout), free(dwte);
}
END_TEST

// ------------------------------------------------------------------- adamw
START_TEST(adamw_matches_torch_formula) {
    size_t n = 1025;
    float *p = tu_random(n, -1, 1, 20), *g = tu_random(n, -1, 1, 21);
    float *m = calloc(n, 4), *v = calloc(n, 4);
    double *pd = malloc(n * 8), *md = calloc(n, 8), *vd = calloc(n, 8);
    for (size_t i = 0; i < n; i++) pd[i] = p[i];
    float lr = 1e-2f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f, scale = 0.5f;
    for (int step = 1; step <= 3; step++) {
        float bc1 = 1 - powf(b1, step), bc2 = 1 - powf(b2, step);
        mt_adamw_ref(p, g, m, v, n, lr, b1, b2, eps, wd, bc1, bc2, scale);
        for (size_t i = 0; i < n; i++) {
            double gi = (double)g[i] * scale;
            md[i] = b1 * md[i] + (1 - b1) * gi;
            vd[i] = b2 * vd[i] + (1 - b2) * gi * gi;
            pd[i] *= 1 - (double)lr * wd;
            pd[i] -= lr / bc1 * md[i] / (sqrt(vd[i]) / sqrt(bc2) + eps);
        }
    }
    for (size_t i = 0; i < n; i++) ck_assert_double_eq_tol(p[i], pd[i], 1e-5);
    free(p), free(g), free(m), free(v), free(pd), free(md), free(vd);
}
END_TEST

START_TEST(sumsq_and_bf16_cast) {
    float x[4] = {1, -2, 3, 0.5f};
    ck_assert_double_eq_tol(mt_sumsq_ref(x, 4), 14.25, 1e-12);
    ck_assert_uint_eq(mt_f32_to_bf16(1.0f), 0x3f80);
    ck_assert_uint_eq(mt_f32_to_bf16(-2.0f), 0xc000);
    // 1 + 2^-8 is halfway between two bf16 values: ties to even (down)
    ck_assert_uint_eq(mt_f32_to_bf16(1.00390625f), 0x3f80);
    // 1 + 3*2^-8 ties up to the even 1 + 2^-6
    ck_assert_uint_eq(mt_f32_to_bf16(1.01171875f), 0x3f82);
    ck_assert(isnan(mt_bf16_to_f32(mt_f32_to_bf16(NAN))));
    ck_assert_float_eq(mt_f16_to_f32(0x3c00), 1.0f);
    ck_assert_uint_eq(mt_f32_to_f16(-2.5f), 0xc100);
    ck_assert_float_eq(mt_f16_to_f32(mt_f32_to_f16(0.1f)), mt_f16_to_f32(0x2e66));
}
END_TEST

// Dropout keeps x / (1 - p) where the element's draw is >= p, the same mask
// for the same (seed, index); accumulating adds exactly that to out, and a
// block at an offset is that block of the whole.
START_TEST(dropout_and_dropout_add) {
    size_t n = 1000;
    float p = 0.3f, *x = malloc(n * 4), *a = malloc(n * 4), *acc = malloc(n * 4), *part = malloc(n * 4);
    for (size_t i = 0; i < n; i++) x[i] = 0.5f + (float)(i % 13), acc[i] = (float)i;
    mt_dropout_ref(a, x, n, p, 9, 0, 0);
    mt_dropout_ref(acc, x, n, p, 9, 0, 1);
    size_t dropped = 0;
    for (size_t i = 0; i < n; i++) {
        float kept = x[i] * (1.0f / (1.0f - p));
        // the 16-bit draws of rng.h, written out here
        unsigned draw = (unsigned)(mt_rng_hash(9, i / 4) >> (16 * (i % 4))) & 0xffffu;
        ck_assert(draw >= 19661 ? a[i] == kept : a[i] == 0.0f);  // 0.3 * 65536 = 19660.8
        ck_assert_float_eq(acc[i], (float)i + a[i]);
        dropped += a[i] == 0.0f;
    }
    ck_assert(dropped > n / 5 && dropped < 2 * n / 5);
    mt_dropout_ref(part, x + 17, n - 17, p, 9, 17, 0);
    ck_assert_mem_eq(part, a + 17, (n - 17) * 4);
    free(x), free(a), free(acc), free(part);
}
END_TEST

START_TEST(rng_is_counter_based_and_well_spread) {
    ck_assert_uint_eq(mt_rng_bits(7, 123), mt_rng_bits(7, 123));
    ck_assert_uint_ne(mt_rng_bits(7, 123), mt_rng_bits(8, 123));
    double s = 0, s2 = 0;
    int n = 200000;
    for (int i = 0; i < n; i++) {
        float z = mt_rng_normal(42, i);
        s += z, s2 += (double)z * z;
        float u = mt_rng_uniform(42, i);
        ck_assert(u >= 0.0f && u < 1.0f);
    }
    ck_assert_double_lt(fabs(s / n), 0.01);
    ck_assert_double_lt(fabs(s2 / n - 1.0), 0.02);
}
END_TEST

// memtune's own attention kernel needs its workspace for the backward alone:
// a forward-only shape (MeZO, evaluation) reserves none, here and in the
// forecast made without a GPU
START_TEST(attention_forward_only_workspace) {
    mt_attention_shape s = {2, 1000, 32, 8, 128, 0, 0, 0.0f, 0, 0}, fwd = s;
    fwd.forward_only = 1;
    ck_assert_uint_gt(mt_attention_own_workspace_bytes(&s), (size_t)2 * 32 * 1024 * 128 * 4);
    ck_assert_uint_eq(mt_attention_own_workspace_bytes(&fwd), 0);
    int cudnn = 1;
    ck_assert_uint_eq(mt_attention_planned_workspace_bytes(-1, &fwd, &cudnn), 0);
    ck_assert_int_eq(cudnn, 0);
    ck_assert_uint_eq(mt_attention_planned_workspace_bytes(-1, &s, &cudnn), mt_attention_own_workspace_bytes(&s));
}
END_TEST

// mt_rng_normal4 (random initialisation): the same four for (seed, group),
// other seeds and groups other values, standard normal moments (mean, variance,
// kurtosis 3, the share beyond 2 sigma) and no value past the radius its
// 24-bit uniforms allow
START_TEST(rng_normal4_is_counter_based_and_normal) {
    float a[4], b[4];
    mt_rng_normal4(7, 123, a);
    mt_rng_normal4(7, 123, b);
    ck_assert_mem_eq(a, b, sizeof a);
    mt_rng_normal4(8, 123, b);
    ck_assert(memcmp(a, b, sizeof a) != 0);
    mt_rng_normal4(7, 124, b);
    ck_assert(memcmp(a, b, sizeof a) != 0);
    double s = 0, s2 = 0, s4 = 0, tail = 0, lag = 0;
    int groups = 250000, n = 4 * groups;
    float prev = 0.0f;
    for (int g = 0; g < groups; g++) {
        mt_rng_normal4(42, (uint64_t)g, a);
        for (int k = 0; k < 4; k++) {
            double z = a[k];
            ck_assert(isfinite(a[k]) && fabs(z) <= 5.8);
            s += z, s2 += z * z, s4 += z * z * z * z, tail += fabs(z) > 2.0, lag += z * prev;
            prev = a[k];
        }
    }
    ck_assert_double_lt(fabs(s / n), 0.005);
    ck_assert_double_lt(fabs(s2 / n - 1.0), 0.005);
    ck_assert_double_lt(fabs(s4 / n - 3.0), 0.05);
    ck_assert_double_lt(fabs(tail / n - 0.0455), 0.002);  // P(|z| > 2) = 0.0455
    ck_assert_double_lt(fabs(lag / n), 0.005);            // neighbours (a pair's cos and sin) uncorrelated
}
END_TEST

START_TEST(mem_tally_and_oom_message) {
    mt_mem_tally before, after;
    mt_mem_get_tally(MT_HOST, &before);
    void *p = NULL;
    ck_assert_int_eq(mt_alloc(&p, 1 << 20, MT_MEM_ACTIVATIONS, MT_HOST), MT_OK);
    mt_mem_get_tally(MT_HOST, &after);
    ck_assert_uint_eq(after.current[MT_MEM_ACTIVATIONS] - before.current[MT_MEM_ACTIVATIONS], 1 << 20);
    mt_free(&p);
    ck_assert_ptr_null(p);
    mt_free(&p);  // NULL is a no-op
    mt_mem_get_tally(MT_HOST, &after);
    ck_assert_uint_eq(after.current[MT_MEM_ACTIVATIONS], before.current[MT_MEM_ACTIVATIONS]);
    ck_assert_uint_ge(after.peak[MT_MEM_ACTIVATIONS], 1 << 20);
    ck_assert_int_eq(mt_alloc(&p, (size_t)1 << 62, MT_MEM_OPTIMIZER, MT_HOST), MT_ERR_NOMEM);
    ck_assert_ptr_null(p);
    ck_assert_ptr_nonnull(strstr(mt_last_error(), "optimizer"));
}
END_TEST

// Each log line reaches stderr whole, prefix and newline included, also
// past the formatting buffer (the ranks of a run share one log file)
START_TEST(log_lines_are_written_whole) {
    char path[] = "/tmp/memtune-log-XXXXXX";
    int fd = mkstemp(path), saved = dup(2);
    ck_assert(fd >= 0 && saved >= 0);
    ck_assert_int_eq(dup2(fd, 2), 2);
    mt_log_set_level(MT_LOG_INFO);
    size_t n = 5000;
    char *big = malloc(n + 1);
    memset(big, 'x', n);
    big[n] = '\0';
    mt_warn("%s", big);
    mt_info("step %d of %s", 7, "16");
    mt_log(MT_LOG_DEBUG, "not shown");
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    FILE *f = fdopen(fd, "r");
    rewind(f);
    char *got = calloc(n + 64, 1);
    size_t len = fread(got, 1, n + 63, f);
    fclose(f);
    unlink(path);
    char *want = malloc(n + 64);
    snprintf(want, n + 64, "warning: %s\nstep 7 of 16\n", big);
    ck_assert_uint_eq(len, strlen(want));
    ck_assert(memcmp(got, want, len) == 0);
    free(big);
    free(got);
    free(want);
}
END_TEST

// mt_copy_parallel gives memcpy's bytes: large copies in 2 MiB pieces over
// the threads (a tail shorter than a piece, an odd offset), small ones and
// those inside a parallel region by the caller; into mt_host_alloc_copy's
// 2 MiB-aligned memory.
START_TEST(copy_parallel_equals_memcpy) {
    const size_t sizes[] = {0, 1, 4095, (size_t)8 << 20, ((size_t)21 << 20) + 12345};
    for (size_t k = 0; k < sizeof sizes / sizeof *sizes; k++) {
        size_t n = sizes[k];
        unsigned char *src = malloc(n + 3), *dst = mt_host_alloc_copy(n + 3), *want = malloc(n + 3);
        ck_assert(src && dst && want);
        ck_assert_uint_eq((uintptr_t)dst % ((size_t)2 << 20), 0);
        for (size_t i = 0; i < n + 3; i++) src[i] = (unsigned char)(i * 2654435761u >> 13);
        memset(dst, 0xa5, n + 3);
        memset(want, 0xa5, n + 3);
        for (size_t i = 0; i < n; i++) want[i + 1] = src[i + 2];
        mt_copy_parallel(dst + 1, src + 2, n);
        ck_assert_msg(memcmp(dst, want, n + 3) == 0, "copy of %zu bytes", n);
        memset(dst, 0xa5, n + 3);
#pragma omp parallel num_threads(2)
        {
#pragma omp single
            mt_copy_parallel(dst + 1, src + 2, n);
        }
        ck_assert_msg(memcmp(dst, want, n + 3) == 0, "copy of %zu bytes inside a parallel region", n);
        free(src), free(dst), free(want);
    }
}
END_TEST

int main(void) {
    Suite *s = suite_create("kernels");
    TCase *tc = tcase_create("cpu reference");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, log_lines_are_written_whole);
    tcase_add_test(tc, rmsnorm_forward_and_backward);
    tcase_add_test(tc, rope_forward_and_backward);
    tcase_add_test(tc, attention_forward_and_backward);
    tcase_add_test(tc, attention_sliding_window);
    tcase_add_test(tc, attention_scale);
    tcase_add_test(tc, attention_decode_equals_causal_rows);
    tcase_add_test(tc, rmsnorm_plus_one);
    tcase_add_test(tc, geglu_forward_and_backward);
    tcase_add_test(tc, attention_packed_documents_equal_each_document_alone);
    tcase_add_test(tc, swiglu_forward_and_backward);
    tcase_add_test(tc, matmul_forward_and_backward);
    tcase_add_test(tc, crossentropy_forward_and_backward);
    tcase_add_test(tc, embedding_forward_and_backward);
    tcase_add_test(tc, adamw_matches_torch_formula);
    tcase_add_test(tc, sumsq_and_bf16_cast);
    tcase_add_test(tc, dropout_and_dropout_add);
    tcase_add_test(tc, rng_is_counter_based_and_well_spread);
    tcase_add_test(tc, rng_normal4_is_counter_based_and_normal);
    tcase_add_test(tc, attention_forward_only_workspace);
    tcase_add_test(tc, mem_tally_and_oom_message);
    tcase_add_test(tc, copy_parallel_equals_memcpy);
    suite_add_tcase(s, tc);
    return tu_run_suite(s, 0);
}
