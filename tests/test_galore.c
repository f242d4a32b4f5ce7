// tests/test_galore.c: GaLore on the CPU reference. The linear algebra
// (products against their definition, QR's Q orthonormal with the input's
// span, the symmetric eigendecomposition), the 8-bit moment maps and Adam
// over them, the model's streamed gradients against the gradient block, the
// projection / Adam / back-projection of one update against a direct
// computation on both sides, the refresh recovering a planted singular
// subspace (randomized and exact), full-rank GaLore with an identity
// projector equal to AdamW on the tiny model, and `memtune train` with
// optim.kind: galore lowering the loss at small rank and resuming
// bit-identically (fp32 and int8 moments).
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "datasets/dataset.h"
#include "kernels/linalg.h"
#include "kernels/ops.h"
#include "kernels/ops_ref.h"
#include "kernels/qmap.h"
#include "kernels/rng.h"
#include "optim/galore.h"
#include "optim/optimizer.h"
#include "testutil.h"
#include "trainer/config.h"
#include "trainer/hf.h"
#include "trainer/model.h"
#include "trainer/train.h"

static char dir[256];
static mt_backend cpu;

// ------------------------------------------------------------ linear algebra

START_TEST(gemm_matches_its_definition) {
    const int M = 7, N = 5, K = 6;
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            int lda = (ta ? K : M) + 1, ldb = (tb ? N : K) + 2, ldc = M + 3;
            float *A = tu_random((size_t)lda * (ta ? M : K), -1, 1, 1),
                  *B = tu_random((size_t)ldb * (tb ? K : N), -1, 1, 2);
            float *C = tu_random((size_t)ldc * N, -1, 1, 3), *C0 = malloc((size_t)ldc * N * 4);
            memcpy(C0, C, (size_t)ldc * N * 4);
            mt_la_gemm(&cpu, ta, tb, M, N, K, 0.5f, A, lda, B, ldb, 2.0f, C, ldc);
            for (int j = 0; j < N; j++)
                for (int i = 0; i < M; i++) {
                    double s = 0;
                    for (int p = 0; p < K; p++) {
                        double a = ta ? A[i * lda + p] : A[p * lda + i], b = tb ? B[p * ldb + j] : B[j * ldb + p];
                        s += a * b;
                    }
                    double want = 0.5 * s + 2.0 * C0[j * ldc + i];
                    ck_assert_msg(fabs(C[j * ldc + i] - want) < 1e-5, "ta %d tb %d (%d,%d): %g != %g", ta, tb, i, j,
                                  C[j * ldc + i], want);
                }
            free(A), free(B), free(C), free(C0);
        }
}
END_TEST

// max |Q^T Q - I| for Q (a, k)
static double orthonormality_error(const float *Q, int a, int k) {
    double worst = 0;
    for (int i = 0; i < k; i++)
        for (int j = 0; j < k; j++) {
            double d = 0;
            for (int r = 0; r < a; r++) d += (double)Q[i * a + r] * Q[j * a + r];
            worst = fmax(worst, fabs(d - (i == j)));
        }
    return worst;
}

START_TEST(orthonormalize_keeps_the_span) {
    const int a = 20, k = 6;
    float *Y = tu_random((size_t)a * k, -1, 1, 4), *Q = malloc((size_t)a * k * 4);
    memcpy(Q, Y, (size_t)a * k * 4);
    mt_la_orthonormalize(&cpu, Q, a, k);
    ck_assert_msg(orthonormality_error(Q, a, k) < 1e-6, "Q^T Q - I: %g", orthonormality_error(Q, a, k));
    // Y = Q (Q^T Y): nothing of Y lies outside Q's span
    float *QtY = malloc((size_t)k * k * 4), *back = malloc((size_t)a * k * 4);
    mt_la_gemm(&cpu, 1, 0, k, k, a, 1.0f, Q, a, Y, a, 0.0f, QtY, k);
    mt_la_gemm(&cpu, 0, 0, a, k, k, 1.0f, Q, a, QtY, k, 0.0f, back, a);
    ck_assert_msg(tu_norm_rel_error(back, Y, (size_t)a * k) < 1e-6, "span lost: %g",
                  tu_norm_rel_error(back, Y, (size_t)a * k));
    // a rank-deficient input (column 3 = column 1 + column 2) still gives an orthonormal Q
    for (int r = 0; r < a; r++) Y[3 * a + r] = Y[a + r] + Y[2 * a + r];
    mt_la_orthonormalize(&cpu, Y, a, k);
    ck_assert_msg(orthonormality_error(Y, a, k) < 1e-6, "rank-deficient Q^T Q - I: %g", orthonormality_error(Y, a, k));
    free(Y), free(Q), free(QtY), free(back);
}
END_TEST

START_TEST(symmetric_eigen_diagonalizes) {
    const int k = 9;
    float *X = tu_random((size_t)k * k, -1, 1, 5), *S = malloc((size_t)k * k * 4), *S0 = malloc((size_t)k * k * 4);
    float w[9];
    mt_la_gemm(&cpu, 1, 0, k, k, k, 1.0f, X, k, X, k, 0.0f, S, k);  // X^T X, positive semi-definite
    memcpy(S0, S, (size_t)k * k * 4);
    mt_la_symmetric_eigen(&cpu, S, w, k);
    ck_assert_msg(orthonormality_error(S, k, k) < 1e-6, "eigenvectors not orthonormal");
    for (int j = 0; j < k; j++) {
        if (j) ck_assert_msg(w[j - 1] <= w[j], "eigenvalues not ascending: %g > %g", w[j - 1], w[j]);
        for (int i = 0; i < k; i++) {  // (S0 v_j)_i = w_j v_ij
            double s = 0;
            for (int p = 0; p < k; p++) s += (double)S0[p * k + i] * S[j * k + p];
            ck_assert_msg(fabs(s - w[j] * S[j * k + i]) < 1e-5 * (fabs(w[k - 1]) + 1), "S v != w v at %d,%d", i, j);
        }
    }
    free(X), free(S), free(S0);
}
END_TEST

// -------------------------------------------------------- 8-bit moments

START_TEST(qmaps_are_sorted_and_encode_to_the_nearest) {
    for (int sgn = 0; sgn < 2; sgn++) {
        const float *map = mt_qmap(sgn);
        ck_assert(map[255] == 1.0f);
        ck_assert(sgn ? map[0] == -1.0f : map[0] == 0.0f);
        int zero = 0;
        for (int i = 0; i < 256; i++) {
            if (i) ck_assert_msg(map[i - 1] <= map[i], "map %d not sorted at %d", sgn, i);
            zero += map[i] == 0.0f;
        }
        ck_assert_int_eq(zero, 1);
        for (int t = 0; t < 20000; t++) {
            float x = sgn ? mt_rng_uniform(7, (uint64_t)t) * 2 - 1 : mt_rng_uniform(7, (uint64_t)t);
            x = x * fabsf(x) * fabsf(x);  // dense near 0, as moments are
            uint8_t c = mt_qmap_encode(map, x);
            for (int i = 0; i < 256; i++)
                ck_assert_msg(fabsf(map[c] - x) <= fabsf(map[i] - x), "%g: code %d (%g) but %d (%g) is nearer", x, c,
                              map[c], i, map[i]);
        }
    }
    // the relative error of a code within the top decade is at most ~1.6%
    const float *s = mt_qmap(1);
    ck_assert(fabsf(s[mt_qmap_encode(s, 0.5f)] - 0.5f) < 0.5f * 0.016f);
}
END_TEST

// mt_qmap_encode starts from a table of each float's 16-bit prefix instead of
// bisecting (the CPU's encoder; the GPU's bisects): the same code as
// mt_qmap_nearest for the least, the greatest and 4 random floats of every
// prefix, every map value and midpoint and their neighbours 3 ulps either
// side, infinities and NaNs (tu_qmap_cases).
static void code_equals_the_bisection(float x, void *ctx) {
    const float *map = ctx;
    uint8_t want = mt_qmap_nearest(map, x), got = mt_qmap_encode(map, x);
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    ck_assert_msg(got == want, "map %s, bits 0x%08x: code %d, bisection %d", map[0] < 0.0f ? "signed" : "unsigned",
                  bits, got, want);
}

START_TEST(qmap_encode_equals_the_bisection) {
    long checked = 0;
    for (int sgn = 0; sgn < 2; sgn++)
        checked += tu_qmap_cases(mt_qmap(sgn), 11, code_equals_the_bisection, (void *)mt_qmap(sgn));
    ck_assert_int_gt(checked, 780000);
}
END_TEST

START_TEST(adam_with_8bit_moments_follows_fp32_adam) {
    const size_t n = 1000;  // 3 full blocks and a partial one
    float *m = calloc(n, 4), *v = calloc(n, 4), *dir32 = malloc(n * 4), *dir8 = malloc(n * 4);
    size_t blocks = (n + MT_QBLOCK - 1) / MT_QBLOCK;
    uint8_t *mq = calloc(n, 1), *vq = calloc(n, 1);
    float *ma = calloc(blocks, 4), *va = calloc(blocks, 4);
    mt_adam_state s32 = {m, v, NULL, NULL, NULL, NULL}, s8 = {NULL, NULL, mq, vq, ma, va};
    double worst = 0;
    for (int step = 1; step <= 30; step++) {
        float *g = tu_random(n, -1, 1, 100 + (uint64_t)step);
        for (size_t i = 0; i < n; i++) g[i] *= 0.5f + (float)(i % 7);  // varied scales within a block
        float bc1 = 1 - powf(0.9f, (float)step), bc2 = 1 - powf(0.999f, (float)step);
        mt_op_adam_direction(&cpu, dir32, g, &s32, n, 0.9f, 0.999f, 1e-8f, bc1, bc2, NULL);
        mt_op_adam_direction(&cpu, dir8, g, &s8, n, 0.9f, 0.999f, 1e-8f, bc1, bc2, NULL);
        worst = fmax(worst, tu_norm_rel_error(dir8, dir32, n));
        free(g);
    }
    ck_assert_msg(worst < 0.05, "8-bit Adam's direction drifts from fp32's: %g", worst);
    ck_assert_msg(worst > 0, "8-bit moments cost nothing: the 8-bit path is not taken");
    free(m), free(v), free(dir32), free(dir8), free(mq), free(vq), free(ma), free(va);
}
END_TEST

// --------------------------------------------------------- streamed gradients

typedef struct {
    const mt_param_info *table;
    float *grads;  // (total) host
    int calls, order[64];
} collect;

static void collect_grad(void *ctx, int param, float *grad) {
    collect *c = ctx;
    memcpy(c->grads + c->table[param].offset, grad, c->table[param].count * 4);
    c->order[c->calls++] = param;
}

static const char *const tied_llama_json =
    "{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":13,\"hidden_size\":16,\"intermediate_size\":24,"
    "\"num_hidden_layers\":3,\"num_attention_heads\":4,\"num_key_value_heads\":2,\"rms_norm_eps\":1e-5,"
    "\"rope_theta\":10000.0,\"tie_word_embeddings\":true,\"torch_dtype\":\"float32\"}";

START_TEST(streamed_gradients_equal_the_gradient_block) {
    for (int tied = 0; tied < 2; tied++) {
        char folder[300];
        tu_model_folder(dir, tied ? "tied" : "tiny", tied ? tied_llama_json : tu_tiny_llama_json, folder,
                        sizeof folder);
        mt_model_config mc;
        ck_assert_int_eq(mt_hf_read_config(folder, &mc), MT_OK);
        const int B = 2, T = 8;
        mt_model *plain, *streamed;
        ck_assert_int_eq(mt_model_create(&plain, &cpu, &mc, B, T, 0), MT_OK);
        int n;
        const mt_param_info *table = mt_model_params(plain, &n);
        size_t total = mt_model_num_params(plain);
        collect c = {table, calloc(total, 4), 0, {0}};
        mt_model_options o = {.B = B,  // with checkpointing
                              .T = T,
                              .activation_checkpointing = 1,
                              .grad_ready = collect_grad,
                              .grad_ready_ctx = &c};
        ck_assert_int_eq(mt_model_create_with(&streamed, &cpu, &mc, &o), MT_OK);
        float *w = malloc(total * 4);
        mt_model_init_random(&mc, w, 3);
        ck_assert_int_eq(mt_model_set_weights(plain, w), MT_OK);
        ck_assert_int_eq(mt_model_set_weights(streamed, w), MT_OK);
        int32_t in[16], tg[16];
        for (int i = 0; i < B * T; i++) in[i] = (int32_t)(mt_rng_bits(9, (uint64_t)i) % 13), tg[i] = (i * 5) % 13;
        tg[3] = -1;
        mt_model_zero_grads(plain);
        double l1 = mt_model_step(plain, in, tg, 0.1f, 1), l2 = mt_model_step(streamed, in, tg, 0.1f, 1);
        ck_assert_msg(fabs(l1 - l2) < 1e-9 * fabs(l1), "losses %g %g", l1, l2);
        ck_assert_ptr_null(mt_model_grads(streamed));  // no gradient block
        ck_assert_int_eq(c.calls, n);                  // every parameter once
        ck_assert_msg(tu_norm_rel_error(c.grads, mt_model_grads(plain), total) < 1e-6, "tied %d: %g", tied,
                      tu_norm_rel_error(c.grads, mt_model_grads(plain), total));
        // lm_head (untied) first, the embedding last, the last layer before the first
        ck_assert_str_eq(table[c.order[0]].name, tied ? "model.norm.weight" : "lm_head.weight");
        ck_assert_str_eq(table[c.order[n - 1]].name, "model.embed_tokens.weight");
        ck_assert_msg(strstr(table[c.order[tied ? 1 : 2]].name, tied ? "layers.2." : "layers.1."), "%s",
                      table[c.order[2]].name);
        ck_assert_msg(mt_model_streamed_grad_bytes(streamed) < total * 4, "streamed buffers %zu >= block %zu",
                      mt_model_streamed_grad_bytes(streamed), total * 4);
        // a non-finite loss hands nothing over
        c.calls = 0;
        w[table[0].offset] = NAN;
        ck_assert_int_eq(mt_model_set_weights(streamed, w), MT_OK);
        for (int i = 0; i < B * T; i++) in[i] = 0;
        ck_assert(!isfinite(mt_model_step(streamed, in, tg, 0.1f, 1)));
        ck_assert_int_eq(c.calls, 0);
        free(w), free(c.grads);
        mt_model_free(plain), mt_model_free(streamed);
    }
}
END_TEST

// ------------------------------------------------------ one GaLore update

START_TEST(one_update_matches_a_direct_computation) {
    // m < n projects on the left (P^T G), m > n on the right (G P)
    const int shapes[2][2] = {{6, 10}, {12, 5}};
    for (int s = 0; s < 2; s++) {
        int m = shapes[s][0], n = shapes[s][1], left = m <= n, a = left ? m : n, b = left ? n : m, r = 3;
        mt_galore_param gp = {"w", m, n, 1, 1, 0, 0};
        mt_galore_config gc = {0.9f, 0.95f, 1e-8f, 0.1f, r, 1000, 0.5f, MT_GALORE_RANDOMIZED, 0, 1};
        mt_galore *g;
        ck_assert_int_eq(mt_galore_init(&g, &cpu, &gc, &gp, 1), MT_OK);
        int ga, gb, gr, gl;
        ck_assert(mt_galore_shape(g, 0, &ga, &gb, &gr, &gl));
        ck_assert(ga == a && gb == b && gr == r && gl == left);
        float *P = tu_random((size_t)a * r, -1, 1, 11);
        mt_la_orthonormalize(&cpu, P, a, r);
        mt_galore_set_projector(g, 0, P);
        float *w = tu_random((size_t)m * n, -1, 1, 12), *w0 = malloc((size_t)m * n * 4);
        memcpy(w0, w, (size_t)m * n * 4);
        float *G = tu_random((size_t)m * n, -1, 1, 13), *G0 = malloc((size_t)m * n * 4);
        memcpy(G0, G, (size_t)m * n * 4);
        const float lr = 0.01f;
        mt_galore_begin_step(g, lr);
        mt_galore_update(g, 0, G, w);
        mt_step_info info;
        mt_galore_end_step(g, &info);
        ck_assert(info.finite);
        // direct: R = P^T G (left) or G P (right); step 1 of Adam; U = P D or D P^T
        double *R = calloc((size_t)m * n, sizeof *R), norm = 0;
        for (int i = 0; i < m * n; i++) norm += (double)G0[i] * G0[i];
        ck_assert_msg(fabs(info.grad_norm - sqrt(norm)) < 1e-5 * sqrt(norm), "grad norm %g != %g", info.grad_norm,
                      sqrt(norm));
        // R indexed (row, col) of its own shape: left (r, n), right (m, r)
        int rr = left ? r : m, rc = left ? n : r;
        for (int i = 0; i < rr; i++)
            for (int j = 0; j < rc; j++) {
                double x = 0;
                for (int t = 0; t < a; t++)
                    x += left ? (double)P[i * a + t] * G0[t * n + j] : (double)G0[i * n + t] * P[j * a + t];
                // Adam's first step: m = (1-b1) x, v = (1-b2) x^2, bias-corrected: x / (|x| + eps)
                double mhat = x, vhat = x * x;
                R[i * rc + j] = mhat / (sqrt(vhat) + 1e-8);
            }
        double worst = 0;
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++) {
                double u = 0;
                for (int t = 0; t < r; t++)
                    u += left ? (double)P[t * a + i] * R[t * rc + j] : R[i * rc + t] * P[t * a + j];
                double want = w0[i * n + j] * (1 - lr * 0.1) - lr * 0.5 * u;
                worst = fmax(worst, fabs(w[i * n + j] - want));
            }
        ck_assert_msg(worst < 1e-5, "shape %dx%d: worst |w - direct| %g", m, n, worst);
        free(P), free(w), free(w0), free(G), free(G0), free(R);
        mt_galore_free(g);
    }
}
END_TEST

// A parameter whose gradient is not finite keeps its weights and moments,
// and the others update as they would alone: its sum of squares gates its
// ops where they run (no host wait a parameter); the step then reports a
// non-finite norm. A projected matrix (after its refresh step) and a plain
// vector, each poisoned in turn, fp32 and int8 moments.
START_TEST(a_non_finite_gradient_leaves_its_parameter_alone) {
    const int m = 6, n = 10;
    mt_galore_param gp[2] = {{"w", m, n, 1, 1, 0, 0}, {"b", n, 0, 0, 0, 0, 0}};
    size_t sizes[2] = {(size_t)m * n, (size_t)n};
    for (int v = 0; v < 4; v++) {
        int bad = v % 2, int8 = v / 2;
        mt_galore_config gc = {0.9f, 0.95f, 1e-8f, 0.1f, 3, 1000, 0.5f, MT_GALORE_RANDOMIZED, int8, 1};
        mt_galore *g[2];  // 0: both gradients finite; 1: parameter `bad`'s poisoned at step 2
        float *w[2][2], *grad[2][2];
        for (int k = 0; k < 2; k++) {
            ck_assert_int_eq(mt_galore_init(&g[k], &cpu, &gc, gp, 2), MT_OK);
            for (int i = 0; i < 2; i++) w[k][i] = tu_random(sizes[i], -1, 1, 20 + i);
        }
        for (int step = 1; step <= 3; step++) {
            mt_step_info info[2];
            for (int k = 0; k < 2; k++) {
                mt_galore_begin_step(g[k], 0.01f);
                for (int i = 0; i < 2; i++) {
                    grad[k][i] = tu_random(sizes[i], -1, 1, (uint64_t)(30 + 10 * step + i));
                    if (k == 1 && i == bad && step == 2) grad[k][i][3] = NAN;
                    mt_galore_update(g[k], i, grad[k][i], w[k][i]);
                }
                mt_galore_end_step(g[k], &info[k]);
            }
            ck_assert(info[0].finite && isfinite(info[0].grad_norm));
            ck_assert_msg(step == 2 ? !info[1].finite : info[1].finite, "variant %d step %d", v, step);
            int other = 1 - bad;
            ck_assert_mem_eq(w[0][other], w[1][other], sizes[other] * 4);  // the other went on as alone
            if (step == 1) ck_assert_mem_eq(w[0][bad], w[1][bad], sizes[bad] * 4);
            if (step == 2) {  // the poisoned one kept its values: one step behind the clean run's from here
                float *w1 = w[1][bad];
                for (size_t j = 0; j < sizes[bad]; j++) ck_assert(isfinite(w1[j]));
                ck_assert(memcmp(w[0][bad], w1, sizes[bad] * 4) != 0);
            }
            for (int k = 0; k < 2; k++)
                for (int i = 0; i < 2; i++) free(grad[k][i]);
        }
        // its moments did not take the poisoned step either: a third run that skips parameter `bad`'s update
        // at step 2 altogether ends where run 1 did
        mt_galore *h;
        ck_assert_int_eq(mt_galore_init(&h, &cpu, &gc, gp, 2), MT_OK);
        float *wh[2] = {tu_random(sizes[0], -1, 1, 20), tu_random(sizes[1], -1, 1, 21)};
        for (int step = 1; step <= 3; step++) {
            mt_step_info info;
            mt_galore_begin_step(h, 0.01f);
            for (int i = 0; i < 2; i++) {
                float *gi = tu_random(sizes[i], -1, 1, (uint64_t)(30 + 10 * step + i));
                if (!(i == bad && step == 2)) mt_galore_update(h, i, gi, wh[i]);
                free(gi);
            }
            mt_galore_end_step(h, &info);
        }
        for (int i = 0; i < 2; i++) ck_assert_mem_eq(wh[i], w[1][i], sizes[i] * 4);
        for (int i = 0; i < 2; i++) free(wh[i]);
        mt_galore_free(h);
        for (int k = 0; k < 2; k++) {
            for (int i = 0; i < 2; i++) free(w[k][i]);
            mt_galore_free(g[k]);
        }
    }
}
END_TEST

// G = U diag(s) V^T with a known U: the refreshed projector must span U's
// top-r columns.
START_TEST(refresh_recovers_the_top_singular_subspace) {
    const int m = 24, n = 40, r = 4;
    float *U = tu_random((size_t)m * m, -1, 1, 21), *V = tu_random((size_t)n * m, -1, 1, 22);
    mt_la_orthonormalize(&cpu, U, m, m);
    mt_la_orthonormalize(&cpu, V, n, m);
    for (int right = 0; right < 2; right++)
        for (int how = 0; how < 2; how++) {
            // left: G (m, n) row-major; right: G^T of that, (n, m), so A = the same matrix
            int rows = right ? n : m, cols = right ? m : n;
            float *G = malloc((size_t)m * n * 4);
            for (int i = 0; i < m; i++)
                for (int j = 0; j < n; j++) {
                    double x = 0;
                    for (int t = 0; t < m; t++) x += U[t * m + i] * pow(0.6, t) * V[t * n + j];
                    if (right)
                        G[j * m + i] = (float)x;
                    else
                        G[i * n + j] = (float)x;
                }
            mt_galore_param gp = {"w", rows, cols, 0, 1, 0, 0};
            mt_galore_config gc = {0.9f, 0.95f, 1e-8f, 0.0f, r, 5, 1.0f, how ? MT_GALORE_SVD : MT_GALORE_RANDOMIZED,
                                   0,    7};
            mt_galore *g;
            ck_assert_int_eq(mt_galore_init(&g, &cpu, &gc, &gp, 1), MT_OK);
            float *w = calloc((size_t)m * n, 4);
            mt_galore_begin_step(g, 0.0f);
            ck_assert(mt_galore_refreshing(g));
            mt_galore_update(g, 0, G, w);
            int matrices;
            mt_galore_last_refresh_seconds(g, &matrices);
            ck_assert_int_eq(matrices, 1);
            mt_state_tensor *t;
            int nt = mt_galore_state(g, &t);
            mt_galore_state_download(g);
            ck_assert_str_eq(t[0].name, "projector");
            ck_assert_int_eq(nt, 3);
            const float *P = t[0].data;  // (m, r)
            // ||U_r^T P||_F^2 = r when span(P) = span(U_r)
            double captured = 0;
            for (int i = 0; i < r; i++)
                for (int j = 0; j < r; j++) {
                    double d = 0;
                    for (int q = 0; q < m; q++) d += (double)U[i * m + q] * P[j * m + q];
                    captured += d * d;
                }
            ck_assert_msg(fabs(captured - r) < 1e-3, "%s %s: captured %g of %d", right ? "right" : "left",
                          how ? "svd" : "randomized", captured, r);
            free(G), free(w);
            mt_galore_free(g);
        }
    free(U), free(V);
}
END_TEST

// ------------------------------------------- full rank, identity = AdamW

typedef struct {
    mt_galore *g;
    float *weights;
    const mt_param_info *table;
} hook_ctx;

static void hook(void *ctx, int param, float *grad) {
    hook_ctx *h = ctx;
    mt_galore_update(h->g, param, grad, h->weights + h->table[param].offset);
}

START_TEST(full_rank_identity_galore_equals_adamw) {
    char folder[300];
    tu_model_folder(dir, "tiny", tu_tiny_llama_json, folder, sizeof folder);
    mt_model_config mc;
    ck_assert_int_eq(mt_hf_read_config(folder, &mc), MT_OK);
    const int B = 2, T = 8, steps = 6;
    hook_ctx h = {0};
    mt_model *ref, *gm;
    ck_assert_int_eq(mt_model_create(&ref, &cpu, &mc, B, T, 0), MT_OK);
    mt_model_options o = {.B = B, .T = T, .grad_ready = hook, .grad_ready_ctx = &h};
    ck_assert_int_eq(mt_model_create_with(&gm, &cpu, &mc, &o), MT_OK);
    int n;
    const mt_param_info *table = mt_model_params(ref, &n);
    size_t total = mt_model_num_params(ref);
    float *w = malloc(total * 4);
    mt_model_init_random(&mc, w, 5);
    ck_assert_int_eq(mt_model_set_weights(ref, w), MT_OK);
    ck_assert_int_eq(mt_model_set_weights(gm, w), MT_OK);
    mt_param_group *groups = malloc((size_t)n * sizeof *groups);
    mt_galore_param *gp = tu_galore_layer_params(table, n);
    for (int i = 0; i < n; i++) groups[i] = (mt_param_group){table[i].offset, table[i].count, table[i].decay};
    mt_adamw_config ac = {1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.0f};
    mt_optimizer *opt;
    ck_assert_int_eq(mt_optimizer_init(&opt, &cpu, &ac, mt_model_weights(ref), w, total, groups, n), MT_OK);
    // rank 1000 > every side: full rank; projectors set to the identity, no refresh within the run
    mt_galore_config gc = {0.9f, 0.95f, 1e-8f, 0.1f, 1000, 1000, 1.0f, MT_GALORE_RANDOMIZED, 0, 1};
    ck_assert_int_eq(mt_galore_init(&h.g, &cpu, &gc, gp, n), MT_OK);
    h.weights = mt_model_weights(gm), h.table = table;
    int projected = 0;
    for (int i = 0; i < n; i++) {
        int a, b, r, left;
        if (!mt_galore_shape(h.g, i, &a, &b, &r, &left)) continue;
        ck_assert_int_eq(r, a);
        float *I = calloc((size_t)a * a, 4);
        for (int k = 0; k < a; k++) I[k * a + k] = 1.0f;
        mt_galore_set_projector(h.g, i, I);
        free(I);
        projected++;
    }
    ck_assert_int_eq(projected, 2 * 7);
    int32_t in[16], tg[16];
    for (int step = 0; step < steps; step++) {
        for (int i = 0; i < B * T; i++)
            in[i] = (int32_t)(mt_rng_bits(30 + (uint64_t)step, (uint64_t)i) % 13), tg[i] = (in[i] + step) % 13;
        mt_model_zero_grads(ref);
        mt_model_step(ref, in, tg, 1.0f / (B * T), 1);
        mt_step_info a, b;
        mt_optimizer_step(opt, mt_model_grads(ref), 1e-2f, &a);
        mt_galore_begin_step(h.g, 1e-2f);
        ck_assert(!mt_galore_refreshing(h.g) || step == 0);
        mt_model_step(gm, in, tg, 1.0f / (B * T), 1);
        mt_galore_end_step(h.g, &b);
        ck_assert_msg(fabs(a.grad_norm - b.grad_norm) < 1e-4 * a.grad_norm, "step %d: grad norms %g %g", step,
                      a.grad_norm, b.grad_norm);
    }
    double err = tu_norm_rel_error(mt_model_weights(gm), mt_model_weights(ref), total);
    ck_assert_msg(err < 1e-6, "full-rank identity GaLore vs AdamW after %d steps: %g", steps, err);
    // and the weights did move
    ck_assert_msg(tu_norm_rel_error(mt_model_weights(ref), w, total) > 1e-3, "AdamW did not move the weights");
    free(w), free(groups), free(gp);
    mt_optimizer_free(opt);
    mt_galore_free(h.g);
    mt_model_free(ref), mt_model_free(gm);
}
END_TEST

// ------------------------------------------------------------ memtune train

static void galore_config(mt_config *cfg, const char *folder, const char *data, const char *out) {
    // clang-format off
    const char *const extra[] = {
        "model.activation_checkpointing", "true",
        "optim.kind", "galore",
        "optim.lr", "1e-2",
        "optim.grad_clip", "0",
        "optim.weight_decay", "0.1",
        "galore.rank", "2",
        "galore.update_gap", "3",
        "galore.scale", "1",
        NULL};
    // clang-format on
    tu_tiny_run_config(cfg, folder, data, out, extra);
}

START_TEST(galore_training_lowers_the_loss_and_resumes_bit_identically) {
    char data[300], folder[300], whole[300], split[300], a[1400];
    snprintf(data, sizeof data, "%s/galore-data.h5", dir);
    tu_write_sequence_data(data);
    tu_model_folder(dir, "tiny", tu_tiny_llama_json, folder, sizeof folder);
    for (int int8 = 0; int8 < 2; int8++) {
        snprintf(whole, sizeof whole, "%s/whole%d", dir, int8);
        snprintf(split, sizeof split, "%s/split%d", dir, int8);
        mt_config cfg;
        mt_train_result r;
        for (int shift = 0; shift < 3; shift++) {
            galore_config(&cfg, folder, data, shift ? split : whole);
            if (int8) ck_assert_int_eq(mt_config_set(&cfg, "galore.moments", "int8", "t"), MT_OK);
            // the split run stops after step 5, between refreshes (steps 1, 4, 7, 10)
            if (shift == 1) ck_assert_int_eq(mt_config_set(&cfg, "train.stop_after", "5", "t"), MT_OK);
            if (shift == 2) ck_assert_int_eq(mt_config_set(&cfg, "train.resume", "auto", "t"), MT_OK);
            ck_assert_int_eq(mt_train(&cfg, &r), MT_OK);
            ck_assert_int_eq(r.steps_done, shift == 1 ? 5 : 12);
            mt_config_free(&cfg);
        }
        double expect[12];
        tu_assert_same_losses(whole, split, 12, expect);
        snprintf(a, sizeof a, "cmp -s %s/model/model.safetensors %s/model/model.safetensors", whole, split);
        ck_assert_int_eq(system(a), 0);
        // rank 2 of 8..24-wide matrices still learns the sequence
        ck_assert_msg(expect[11] < expect[0] - 0.3, "int8 %d: loss %g -> %g", int8, expect[0], expect[11]);
        snprintf(a, sizeof a, "%s/checkpoints/step-00000012/state.h5", whole);
        ck_assert_int_eq(access(a, R_OK), 0);
    }
}
END_TEST

START_TEST(galore_config_errors_name_the_fix) {
    char data[300], folder[300], out[300];
    snprintf(data, sizeof data, "%s/galore-data.h5", dir);
    tu_write_sequence_data(data);
    tu_model_folder(dir, "tiny", tu_tiny_llama_json, folder, sizeof folder);
    snprintf(out, sizeof out, "%s/bad", dir);
    mt_config cfg;
    mt_train_result r;
    galore_config(&cfg, folder, data, out);
    ck_assert_int_eq(mt_config_set(&cfg, "optim.grad_clip", "1", "t"), MT_OK);
    ck_assert_int_eq(mt_config_validate(&cfg), MT_ERR_CONFIG);
    ck_assert_msg(strstr(mt_last_error(), "optim.grad_clip: 0") != NULL, "%s", mt_last_error());
    ck_assert_int_eq(mt_config_set(&cfg, "optim.grad_clip", "0", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "train.grad_accum", "2", "t"), MT_OK);
    ck_assert_int_eq(mt_config_validate(&cfg), MT_ERR_CONFIG);
    ck_assert_msg(strstr(mt_last_error(), "train.micro_batch") != NULL, "%s", mt_last_error());
    ck_assert_int_eq(mt_config_set(&cfg, "train.grad_accum", "1", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "galore.targets", "*norm*", "t"), MT_OK);
    ck_assert_int_eq(mt_train(&cfg, &r), MT_ERR_CONFIG);
    ck_assert_msg(strstr(mt_last_error(), "a vector") != NULL, "%s", mt_last_error());
    ck_assert_int_eq(mt_config_set(&cfg, "galore.targets", "*.nothing", "t"), MT_OK);
    ck_assert_int_eq(mt_train(&cfg, &r), MT_ERR_CONFIG);
    ck_assert_msg(strstr(mt_last_error(), "matches none") != NULL, "%s", mt_last_error());
    ck_assert_int_eq(mt_config_set(&cfg, "lora.r", "4", "t"), MT_OK);
    ck_assert_int_eq(mt_config_validate(&cfg), MT_ERR_CONFIG);
    ck_assert_msg(strstr(mt_last_error(), "lora.r: 0") != NULL, "%s", mt_last_error());
    ck_assert_int_eq(mt_config_set(&cfg, "lora.r", "0", "t"), MT_OK);
    // ZeRO shards GaLore's state, also with its unprojected rest offloaded
    ck_assert_int_eq(mt_config_set(&cfg, "galore.targets", "*.mlp.*_proj.weight", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "dist.zero_stage", "2", "t"), MT_OK);
    ck_assert_int_eq(mt_config_validate(&cfg), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "offload.optimizer", "cpu", "t"), MT_OK);
    ck_assert_int_eq(mt_config_validate(&cfg), MT_OK);
    mt_config_free(&cfg);
    // galore keys without galore
    mt_config_defaults(&cfg);
    ck_assert_int_eq(mt_config_set(&cfg, "model.path", folder, "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "data.train", data, "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "galore.rank", "64", "t"), MT_OK);
    ck_assert_int_eq(mt_config_validate(&cfg), MT_ERR_CONFIG);
    ck_assert_msg(strstr(mt_last_error(), "optim.kind: galore") != NULL, "%s", mt_last_error());
    mt_config_free(&cfg);
}
END_TEST

int main(void) {
    tu_tempdir(dir, sizeof dir);
    mt_backend_init(&cpu, -1);
    Suite *s = suite_create("galore");
    TCase *tc = tcase_create("galore");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, gemm_matches_its_definition);
    tcase_add_test(tc, orthonormalize_keeps_the_span);
    tcase_add_test(tc, symmetric_eigen_diagonalizes);
    tcase_add_test(tc, qmaps_are_sorted_and_encode_to_the_nearest);
    tcase_add_test(tc, qmap_encode_equals_the_bisection);
    tcase_add_test(tc, adam_with_8bit_moments_follows_fp32_adam);
    tcase_add_test(tc, streamed_gradients_equal_the_gradient_block);
    tcase_add_test(tc, one_update_matches_a_direct_computation);
    tcase_add_test(tc, a_non_finite_gradient_leaves_its_parameter_alone);
    tcase_add_test(tc, refresh_recovers_the_top_singular_subspace);
    tcase_add_test(tc, full_rank_identity_galore_equals_adamw);
    tcase_add_test(tc, galore_training_lowers_the_loss_and_resumes_bit_identically);
    tcase_add_test(tc, galore_config_errors_name_the_fix);
    suite_add_tcase(s, tc);
    int status = tu_run_suite(s, 0);
    mt_backend_free(&cpu);
    return status;
}
