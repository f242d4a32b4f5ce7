// tests/test_optim.c: learning-rate schedules and the AdamW optimizer
// (parameter groups, decay, clipping, non-finite gradients).
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops_ref.h"
#include "optim/optimizer.h"
#include "optim/schedule.h"
#include "testutil.h"

START_TEST(schedules) {
    mt_schedule s = {MT_SCHEDULE_COSINE, 1.0f, 0.1f, 4, 104};
    ck_assert_float_eq_tol(mt_schedule_lr(&s, 0), 0.25f, 1e-7);
    ck_assert_float_eq_tol(mt_schedule_lr(&s, 3), 1.0f, 1e-7);
    ck_assert_float_eq_tol(mt_schedule_lr(&s, 4), 1.0f, 1e-6);
    ck_assert_float_eq_tol(mt_schedule_lr(&s, 103), 0.1f, 1e-6);
    float mid = mt_schedule_lr(&s, 4 + 99 / 2);
    ck_assert_float_eq_tol(mid, 0.55f, 0.01f);
    s.kind = MT_SCHEDULE_LINEAR;
    ck_assert_float_eq_tol(mt_schedule_lr(&s, 103), 0.1f, 1e-6);
    ck_assert_float_eq_tol(mt_schedule_lr(&s, 4 + 33), 1.0f - 0.9f * 33.0f / 99.0f, 1e-6);
    s.kind = MT_SCHEDULE_CONSTANT;
    ck_assert_float_eq(mt_schedule_lr(&s, 50), 1.0f);
}
END_TEST

START_TEST(adamw_groups_and_clipping) {
    mt_backend be;
    ck_assert_int_eq(mt_backend_init(&be, -1), MT_OK);
    size_t n = 100;
    float *w = calloc(n, 4), *init = tu_random(n, -1, 1, 1), *g = tu_random(n, -3, 3, 2);
    mt_param_group groups[2] = {{0, 60, 1}, {60, 40, 0}};
    mt_adamw_config cfg = {0.1f, 0.9f, 0.99f, 1e-8f, 0.5f, 1.0f};
    mt_optimizer *opt;
    ck_assert_int_eq(mt_optimizer_init(&opt, &be, &cfg, w, init, n, groups, 2), MT_OK);
    ck_assert_mem_eq(w, init, n * 4);
    mt_step_info info;
    mt_optimizer_step(opt, g, 0.1f, &info);
    double norm = sqrt(mt_sumsq_ref(g, n));
    ck_assert(info.finite);
    ck_assert_double_eq_tol(info.grad_norm, norm, 1e-6 * norm);
    // the reference: clipped gradient, decay only on the first group
    float *ref = malloc(n * 4), *m = calloc(n, 4), *v = calloc(n, 4);
    memcpy(ref, init, n * 4);
    float scale = (float)(1.0 / (norm + 1e-6));
    mt_adamw_ref(ref, g, m, v, 60, 0.1f, 0.9f, 0.99f, 1e-8f, 0.5f, 0.1f, 1 - 0.99f, scale);
    mt_adamw_ref(ref + 60, g + 60, m + 60, v + 60, 40, 0.1f, 0.9f, 0.99f, 1e-8f, 0.0f, 0.1f, 1 - 0.99f, scale);
    for (size_t i = 0; i < n; i++) ck_assert_float_eq_tol(w[i], ref[i], 1e-6);
    ck_assert_int_eq(mt_optimizer_steps_taken(opt), 1);
    // a non-finite gradient is refused and changes nothing
    memcpy(ref, w, n * 4);
    g[5] = NAN;
    mt_optimizer_step(opt, g, 0.1f, &info);
    ck_assert(!info.finite);
    ck_assert_mem_eq(w, ref, n * 4);
    ck_assert_int_eq(mt_optimizer_steps_taken(opt), 1);
    float *master = malloc(n * 4);
    mt_optimizer_get_master(opt, master);
    ck_assert_mem_eq(master, w, n * 4);
    mt_optimizer_free(opt);
    mt_backend_free(&be);
    free(w), free(init), free(g), free(ref), free(m), free(v), free(master);
}
END_TEST

// Groups that follow each other with the same decay are updated in one
// pass; the values are those of the groups updated one by one.
START_TEST(adamw_adjacent_groups_one_pass) {
    mt_backend be;
    ck_assert_int_eq(mt_backend_init(&be, -1), MT_OK);
    size_t n = 128;
    float *w = calloc(n, 4), *init = tu_random(n, -1, 1, 3), *g = tu_random(n, -1, 1, 4);
    // 0-16-32 decayed, 32-64 not, 64-80 not, a gap, 96-128 not: three passes
    mt_param_group groups[5] = {{0, 16, 1}, {16, 16, 1}, {32, 32, 0}, {64, 16, 0}, {96, 32, 0}};
    mt_adamw_config cfg = {0.1f, 0.9f, 0.99f, 1e-8f, 0.5f, 0.0f};
    mt_optimizer *opt;
    ck_assert_int_eq(mt_optimizer_init(&opt, &be, &cfg, w, init, n, groups, 5), MT_OK);
    ck_assert_int_eq(mt_optimizer_passes(opt), 3);
    mt_step_info info;
    mt_optimizer_step(opt, g, 0.1f, &info);
    // each group alone, by an optimizer of its own (no clipping: independent)
    float *ref = malloc(n * 4);
    memcpy(ref, init, n * 4);
    for (int k = 0; k < 5; k++) {
        mt_optimizer *one;
        ck_assert_int_eq(mt_optimizer_init(&one, &be, &cfg, ref, ref, n, &groups[k], 1), MT_OK);
        ck_assert_int_eq(mt_optimizer_passes(one), 1);
        mt_optimizer_step(one, g, 0.1f, &info);
        mt_optimizer_free(one);
    }
    ck_assert_mem_eq(w, ref, n * 4);  // the gap (80-96) untouched in both
    mt_optimizer_free(opt);
    mt_backend_free(&be);
    free(w), free(init), free(g), free(ref);
}
END_TEST

int main(void) {
    Suite *s = suite_create("optim");
    TCase *tc = tcase_create("adamw");
    tcase_add_test(tc, schedules);
    tcase_add_test(tc, adamw_groups_and_clipping);
    tcase_add_test(tc, adamw_adjacent_groups_one_pass);
    suite_add_tcase(s, tc);
    return tu_run_suite(s, 0);
}
