// tests/test_offload.c: the offload module on the CPU. The CPU AdamW against
// the reference AdamW bit for bit on every instruction path this processor
// has; the SSD store's round trip and its error paths (short transfers,
// ENOSPC, EIO, checksum, a second user, a disk too small); training with the
// state offloaded against the same run without it, resume, and a disk that
// fills mid-run leaving the last checkpoint whole.
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kernels/dtype.h"
#include "kernels/ops.h"
#include "kernels/ops_ref.h"
#include "kernels/rng.h"
#include "offload/cpu_adam.h"
#include "offload/offload.h"
#include "offload/store.h"
#include "testutil.h"
#include "trainer/checkpoint.h"
#include "trainer/config.h"
#include "trainer/dist.h"
#include "trainer/forecast.h"
#include "trainer/hf.h"
#include "trainer/params.h"
#include "trainer/plan.h"
#include "trainer/state.h"
#include "trainer/train.h"

static char dir[256];

// ---------------------------------------------------------------- CPU AdamW

START_TEST(cpu_adam_equals_the_reference_bit_for_bit) {
    const size_t sizes[] = {1, 22, 1025, 1000003};
    int paths = 0;
    for (int path = 0; path < MT_CPU_ADAM_NPATHS; path++) {
        if (!mt_cpu_adam_path_available((mt_cpu_adam_path)path)) continue;
        paths++;
        for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++) {
            size_t n = sizes[si];
            for (int bf16 = 0; bf16 < 2; bf16++) {
                float lr = 3e-3f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = bf16 ? 0.1f : 0.0f, scale = 0.7f;
                int t = 3 + bf16 * 40;
                float *master = tu_random(n, -0.5f, 0.5f, 1 + si), *m = tu_random(n, -0.01f, 0.01f, 2 + si);
                float *v = tu_random(n, 0.0f, 1e-4f, 3 + si), *g = tu_random(n, -2.0f, 2.0f, 4 + si);
                uint16_t *gh = malloc(n * 2), *out = malloc(n * 2);
                for (size_t i = 0; i < n; i++) {
                    if (i % 97 == 5) g[i] = 0.0f;  // zeros and a tiny value among them
                    if (i % 1013 == 7) g[i] = 1e-30f;
                    gh[i] = mt_f32_to_bf16(g[i]);
                    if (bf16) g[i] = mt_bf16_to_f32(gh[i]);  // the reference sees what the bf16 path reads
                }
                float *rm = malloc(n * 4), *rmm = malloc(n * 4), *rv = malloc(n * 4);
                memcpy(rm, master, n * 4), memcpy(rmm, m, n * 4), memcpy(rv, v, n * 4);
                float bc1 = 1.0f - powf(b1, (float)t), bc2 = 1.0f - powf(b2, (float)t);
                mt_adamw_ref(rm, g, rmm, rv, n, lr, b1, b2, eps, wd, bc1, bc2, scale);
                mt_cpu_adam_step s;
                mt_cpu_adam_prepare(&s, lr, b1, b2, eps, wd, t, scale);
                mt_cpu_adam_update((mt_cpu_adam_path)path, &s, master, m, v, bf16 ? (const void *)gh : g, bf16, out, n);
                const char *name = mt_cpu_adam_path_name((mt_cpu_adam_path)path);
                ck_assert_msg(memcmp(master, rm, n * 4) == 0, "%s n=%zu bf16=%d: master differs", name, n, bf16);
                ck_assert_msg(memcmp(m, rmm, n * 4) == 0, "%s n=%zu: m differs", name, n);
                ck_assert_msg(memcmp(v, rv, n * 4) == 0, "%s n=%zu: v differs", name, n);
                for (size_t i = 0; i < n; i++)
                    ck_assert_msg(out[i] == mt_f32_to_bf16(rm[i]), "%s n=%zu: bf16 weight %zu is %04x, not %04x", name,
                                  n, i, out[i], mt_f32_to_bf16(rm[i]));
                free(master), free(m), free(v), free(g), free(gh), free(out), free(rm), free(rmm), free(rv);
            }
        }
    }
    fprintf(stderr, "cpu_adam: %d path(s) checked, best %s\n", paths, mt_cpu_adam_path_name(mt_cpu_adam_best_path()));
    ck_assert_int_ge(paths, 1);
#if defined(__x86_64__)
    ck_assert_msg(paths >= 2 || !__builtin_cpu_supports("avx2"), "the AVX2 path was not tested on an AVX2 machine");
#endif
}
END_TEST

// The store's int8 encoder and decoder (AVX-512 where the processor has it)
// give the reference's codes, absmax and decoded values bit for bit: first
// every code's own case, in
// blocks whose absmax is 1 (so each value is its own scaled value): the
// least, the greatest and 4 random floats of every 16-bit prefix in [-1, 1],
// every map value and midpoint and their neighbours 3 ulps either side; then
// 2000 blocks of 1 to 256 values, moments spread over 12 decades, with
// zeros, negative zeros, map values, denormals, infinities and NaNs mixed in;
// then blocks whose absmax is tiny (down to 2^-127) or huge (up to 2^127).
static void encoders_agree(const float *m, const float *v, size_t len, const char *what) {
    float am[2], av[2];
    uint8_t mq[2][256], vq[2][256];
    mt_qblock_encode(m, v, len, mq[0], vq[0], &am[0], &av[0]);
    mt_cpu_qblock_encode(m, v, len, mq[1], vq[1], &am[1], &av[1]);
    ck_assert_msg(memcmp(&am[0], &am[1], sizeof am[0]) == 0 && memcmp(&av[0], &av[1], sizeof av[0]) == 0,
                  "%s: absmax %g %g, reference %g %g", what, am[1], av[1], am[0], av[0]);
    for (size_t k = 0; k < len; k++)
        ck_assert_msg(mq[0][k] == mq[1][k] && vq[0][k] == vq[1][k],
                      "%s, value %zu (%g, %g): codes %d %d, reference %d %d", what, k, m[k], v[k], mq[1][k], vq[1][k],
                      mq[0][k], vq[0][k]);
    float dm[2][256], dv[2][256];  // and decoded back, both ways
    mt_qblock_decode(mq[0], vq[0], am[0], av[0], dm[0], dv[0], len);
    mt_cpu_qblock_decode(mq[1], vq[1], am[1], av[1], dm[1], dv[1], len);
    for (size_t k = 0; k < len; k++)
        ck_assert_msg(
            memcmp(&dm[0][k], &dm[1][k], sizeof(float)) == 0 && memcmp(&dv[0][k], &dv[1][k], sizeof(float)) == 0,
            "%s, value %zu: decoded %g %g, reference %g %g", what, k, dm[1][k], dv[1][k], dm[0][k], dv[0][k]);
}

// A block of scaled values (value 0 is 1, both absmax): x (m) and |x| (v)
// appended for every x in [-1, 1], sent through both encoders when full.
typedef struct {
    float m[256], v[256];
    size_t n;
} code_block;

static void code_case(float x, void *ctx) {
    code_block *b = ctx;
    if (!(fabsf(x) <= 1.0f)) return;
    b->m[b->n] = x, b->v[b->n] = fabsf(x);
    if (++b->n == 256) encoders_agree(b->m, b->v, 256, "codes"), b->n = 1;
}

START_TEST(int8_encoder_equals_the_reference) {
    code_block cb = {{1.0f}, {1.0f}, 1};
    for (int sgn = 0; sgn < 2; sgn++) tu_qmap_cases(mt_qmap(sgn), 34, code_case, &cb);
    encoders_agree(cb.m, cb.v, cb.n, "codes");
    const float *smap = mt_qmap(1), *umap = mt_qmap(0);
    float m[256], v[256];
    for (int b = 0; b < 2000; b++) {
        size_t len = b < 256 ? (size_t)b + 1 : 1 + mt_rng_bits(31, (uint64_t)b) % 256;
        for (size_t k = 0; k < len; k++) {
            uint64_t r = mt_rng_bits(32, (uint64_t)b * 256 + k);
            float mag = powf(10.0f, -(float)(r % 12)) * mt_rng_uniform(33, (uint64_t)b * 256 + k);
            m[k] = r & 1024 ? -mag : mag;
            v[k] = mag * mag;
            switch (r >> 40 & 31) {
                case 0: m[k] = 0.0f, v[k] = 0.0f; break;
                case 1: m[k] = -0.0f; break;
                case 2: m[k] = smap[r % 256], v[k] = umap[r % 256]; break;
                case 3: m[k] = 1e-42f, v[k] = 1e-44f; break;
                case 4:
                    if (b % 7 == 0) m[k] = INFINITY;
                    break;
                case 5:
                    if (b % 11 == 0) v[k] = NAN;
                    break;
                default: break;
            }
        }
        encoders_agree(m, v, len, "random block");
    }
    // blocks of tiny and of huge moments (absmax 2^-127 to 2^-96 and 2^100 to 2^127): the scaled values as a
    // division gives them where the encoder multiplies by the absmax's reciprocal (and where it must divide)
    for (int b = 0; b < 640; b++) {
        size_t len = 1 + mt_rng_bits(34, (uint64_t)b) % 256;
        float scale = b % 2 ? ldexpf(1.0f, 100 + b / 2 % 28) : ldexpf(1.0f, -96 - b / 2 % 32);
        for (size_t k = 0; k < len; k++) {
            uint64_t r = mt_rng_bits(35, (uint64_t)b * 256 + k);
            m[k] = scale * mt_rng_uniform(36, (uint64_t)b * 256 + k) * (r & 1 ? -1.0f : 1.0f);
            v[k] = scale * mt_rng_uniform(37, (uint64_t)b * 256 + k);
        }
        encoders_agree(m, v, len, b % 2 ? "huge block" : "tiny block");
    }
}
END_TEST

// The encoder's scaling by a block's absmax (mt_cpu_divide) equals a
// division bit for bit: divisors over the whole exponent range with
// quotients in [-1, 1], among them the values near the divisor, tiny values
// whose remainder would be subnormal, zeros of both signs, infinities
// (divisor infinite) and NaN.
START_TEST(divide_equals_a_division) {
    enum { N = 4096 };
    float x[N], q[N];
    for (int b = 0; b < 3000; b++) {
        uint64_t r0 = mt_rng_bits(40, (uint64_t)b);
        float d = ldexpf(1.0f + (float)(r0 % 8388608) / 8388608.0f, (int)(r0 >> 32) % 254 - 126);
        if (b == 0) d = INFINITY;
        if (b == 1) d = 0x1p-140f;  // subnormal
        for (int k = 0; k < N; k++) {
            uint64_t r = mt_rng_bits(41, (uint64_t)b * N + k);
            float f;
            switch (r % 5) {
                case 0: f = d * mt_rng_uniform(42, (uint64_t)b * N + k); break;
                case 1: f = nextafterf(d, 0.0f) - (float)(r >> 40 & 63) * d * 0x1p-24f; break;
                case 2: f = ldexpf(1.0f + (float)(r >> 20 & 0xFFFFF) / 1048576.0f, -100 - (int)(r >> 44 & 31)); break;
                case 3: f = (r >> 8 & 3) == 0 ? NAN : 0.0f; break;
                default: f = d * ldexpf(mt_rng_uniform(43, (uint64_t)b * N + k), -(int)(r >> 40 & 63)); break;
            }
            if (!(fabsf(f) <= d) && f == f) f = d;
            x[k] = r >> 39 & 1 ? -f : f;
        }
        mt_cpu_divide(q, x, d, N);
        for (int k = 0; k < N; k++) {
            float ref = x[k] / d;
            ck_assert_msg(memcmp(&ref, &q[k], sizeof ref) == 0, "%a / %a: %a, a division gives %a", x[k], d, q[k], ref);
        }
    }
}
END_TEST

START_TEST(sumsq_is_the_same_for_any_thread_count) {
    size_t n = 1000003;
    float *g = tu_random(n, -3.0f, 3.0f, 9);
    double serial = 0.0;
    for (size_t i = 0; i < n; i++) serial += (double)g[i] * g[i];
    int before = omp_get_max_threads();
    omp_set_num_threads(1);
    double one = mt_cpu_sumsq(g, 0, n);
    omp_set_num_threads(3);
    double three = mt_cpu_sumsq(g, 0, n);
    omp_set_num_threads(before);
    ck_assert_msg(one == three, "%.17g vs %.17g", one, three);
    ck_assert_msg(fabs(one - serial) <= 1e-12 * serial, "%.17g vs %.17g", one, serial);
    // every path the processor has gives the scalar path's sum, bit for bit, of fp32 and of bf16 values,
    // whatever the stripes' tails (sizes below, at and past a stripe of eight-value groups)
    uint16_t *h = malloc(n * sizeof *h);
    ck_assert(h != NULL);
    for (size_t i = 0; i < n; i++) h[i] = mt_f32_to_bf16(g[i]);
    const size_t sizes[] = {0, 7, 8, 2048, 2048 * 8 + 5, n};
    for (int p = 1; p < MT_CPU_ADAM_NPATHS; p++) {
        if (!mt_cpu_adam_path_available((mt_cpu_adam_path)p)) continue;
        for (size_t k = 0; k < sizeof sizes / sizeof *sizes; k++)
            for (int bf16 = 0; bf16 < 2; bf16++) {
                const void *x = bf16 ? (const void *)h : (const void *)g;
                double want = mt_cpu_sumsq_path(MT_CPU_ADAM_SCALAR, x, bf16, sizes[k]),
                       got = mt_cpu_sumsq_path((mt_cpu_adam_path)p, x, bf16, sizes[k]);
                ck_assert_msg(got == want, "%s, %zu %s values: %.17g vs %.17g",
                              mt_cpu_adam_path_name((mt_cpu_adam_path)p), sizes[k], bf16 ? "bf16" : "fp32", got, want);
            }
    }
    g[n / 2] = INFINITY;
    ck_assert(!isfinite(mt_cpu_sumsq(g, 0, n)));
    h[n / 3] = 0x7fc0;  // a bf16 NaN
    for (int p = 0; p < MT_CPU_ADAM_NPATHS; p++)
        if (mt_cpu_adam_path_available((mt_cpu_adam_path)p))
            ck_assert(!isfinite(mt_cpu_sumsq_path((mt_cpu_adam_path)p, h, 1, n)));
    free(h);
    free(g);
}
END_TEST

// Accumulation over micro-batches: the sum of fp32 or bf16 gradients, each
// element's the plain fp32 sum in order, whatever the chunks and threads.
START_TEST(accumulate_sums_micro_batches_in_fp32) {
    const size_t sizes[] = {1, 22, 16385, 1000003};
    int before = omp_get_max_threads();
    for (size_t k = 0; k < sizeof sizes / sizeof *sizes; k++) {
        size_t n = sizes[k];
        float *a = tu_random(n, -3.0f, 3.0f, 21), *b = tu_random(n, -3.0f, 3.0f, 22);
        uint16_t *h = malloc(n * sizeof *h);
        float *sum = malloc(n * sizeof *sum);
        for (size_t i = 0; i < n; i++) h[i] = mt_f32_to_bf16(b[i]);
        for (int bf16 = 0; bf16 <= 1; bf16++) {
            omp_set_num_threads(bf16 ? 3 : 1);
            for (size_t i = 0; i < n; i++) sum[i] = NAN;  // the first micro-batch overwrites
            mt_cpu_accumulate(sum, a, 0, n, 1);
            mt_cpu_accumulate(sum, bf16 ? (const void *)h : (const void *)b, bf16, n, 0);
            mt_cpu_accumulate(sum, a, 0, n, 0);
            for (size_t i = 0; i < n; i++) {
                float want = a[i] + (bf16 ? mt_bf16_to_f32(h[i]) : b[i]);
                want += a[i];
                ck_assert_msg(sum[i] == want, "n=%zu bf16=%d [%zu]: %.9g vs %.9g", n, bf16, i, sum[i], want);
            }
            mt_cpu_accumulate(sum, h, 1, n, 1);  // bf16, first
            for (size_t i = 0; i < n; i++) ck_assert(sum[i] == mt_bf16_to_f32(h[i]));
        }
        omp_set_num_threads(before);
        free(a), free(b), free(h), free(sum);
    }
}
END_TEST

// ---------------------------------------------------------------- the store

// offload.threads 0: a rank's share of the node's cores, or fewer when its
// affinity gives it fewer (mpirun's --bind-to core)
START_TEST(auto_threads_share_the_node_or_follow_the_binding) {
    int online = (int)sysconf(_SC_NPROCESSORS_ONLN), cores = 0;
    cpu_set_t all, one;
    ck_assert_int_eq(sched_getaffinity(0, sizeof all, &all), 0);
    if (CPU_COUNT(&all) == online) {  // the whole node (CI, a shell)
        ck_assert_int_eq(mt_offload_auto_threads(1, 1, &cores), online > 1 ? online - 1 : 1);
        ck_assert_int_eq(cores, online);
        ck_assert_int_eq(mt_offload_auto_threads(1, 0, &cores), online);
        mt_offload_auto_threads(2, 0, &cores);
        ck_assert_int_eq(cores, online / 2 > 0 ? online / 2 : 1);
    }
    // bound to one core (this test runs in a child of its own): one thread,
    // whatever the ranks
    CPU_ZERO(&one);
    for (int c = 0; c < CPU_SETSIZE; c++)
        if (CPU_ISSET(c, &all)) {
            CPU_SET(c, &one);
            break;
        }
    ck_assert_int_eq(sched_setaffinity(0, sizeof one, &one), 0);
    ck_assert_int_eq(mt_offload_auto_threads(2, 1, &cores), 1);
    ck_assert_int_eq(cores, 1);
    ck_assert_int_eq(mt_offload_auto_threads(1, 0, &cores), 1);
    sched_setaffinity(0, sizeof all, &all);
}
END_TEST

// offload.grad_sum auto's arithmetic, on the shapes docs/offload.md names
START_TEST(host_sum_fits_below_85_percent_of_the_node) {
    const double gib = 1073741824.0, node = 125.9 * gib;  // the H100 machine's MemTotal
    double need = 0.0;
    size_t p7 = 6738415616, p1 = 1100048384;  // Llama-2-7B, TinyLlama-1.1B
    // 7B, cpu state: 12 + 2 + 4 bytes a parameter and the 4-byte copy, 138.1 GiB: the GPU sums
    ck_assert(!mt_offload_host_sum_fits(1, p7, p7, 1, node, &need));
    ck_assert_double_eq_tol(need / gib, 22.0 * p7 / gib, 1e-9);
    ck_assert_double_eq_tol(need / gib, 138.06, 0.01);
    // the state on disk (ssd): 10 bytes a parameter, 62.8 GiB: the host
    ck_assert(mt_offload_host_sum_fits(0, p7, p7, 1, node, &need));
    ck_assert_double_eq_tol(need, 10.0 * p7, 1.0);
    // 1.1B: the host, also for 2 ranks of ZeRO each with half
    ck_assert(mt_offload_host_sum_fits(1, p1, p1, 1, node, &need));
    ck_assert(mt_offload_host_sum_fits(1, p1, p1 / 2, 2, node, &need));
    ck_assert_double_eq_tol(need, 2.0 * (18.0 * (p1 / 2) + 4.0 * p1), 1.0);
    // 8 ranks of 7B on a node of twice the memory: each its eighth, but each
    // the whole fp32 copy (313.7 GiB)
    ck_assert(!mt_offload_host_sum_fits(1, p7, p7 / 8, 8, 2 * node, &need));
    ck_assert_double_eq_tol(need, 8.0 * (18.0 * (p7 / 8) + 4.0 * p7), 1.0);
    // the edge: at 85% it fits, just above it does not
    mt_offload_host_sum_fits(1, p1, p1, 1, node, &need);
    ck_assert(mt_offload_host_sum_fits(1, p1, p1, 1, need / 0.85, &need));
    ck_assert(!mt_offload_host_sum_fits(1, p1, p1, 1, need / 0.85 * (1 - 1e-9), &need));
}
END_TEST

START_TEST(crc32c_known_answer_and_continuation) {
    ck_assert_uint_eq(mt_crc32c(0, "123456789", 9), 0xE3069283u);
    unsigned char buf[1000];
    for (int i = 0; i < 1000; i++) buf[i] = (unsigned char)mt_rng_bits(3, (uint64_t)i);
    uint32_t whole = mt_crc32c(0, buf, sizeof buf);
    for (size_t cut = 0; cut <= 1000; cut += 37)
        ck_assert_uint_eq(mt_crc32c(mt_crc32c(0, buf, cut), buf + cut, 1000 - cut), whole);
    buf[500] ^= 1;
    ck_assert_uint_ne(mt_crc32c(0, buf, sizeof buf), whole);
}
END_TEST

static mt_store *open_store(mt_store_kind kind, const char *sub, size_t count, size_t block) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, sub);
    mt_store_config c = {kind, path, count, 0, 1, block, 3, 2, 0, NULL, 0};
    mt_store *s = NULL;
    ck_assert_msg(mt_store_open(&s, &c) == MT_OK, "%s", mt_last_error());
    return s;
}

// Ranges read alone (a checkpoint's tensors, a chunk at a time) equal the
// same values of the whole state x, y, z: ranges that start and end inside
// blocks, cross blocks and segments, and are empty, each array on its own.
static void ranges_equal_whole(mt_store *s, size_t n, const float *x, const float *y, const float *z) {
    float *r = malloc((n ? n : 1) * sizeof *r);
    for (int k = 0; k < 40; k++) {
        size_t lo = k == 0 ? 0 : mt_rng_bits(7, (uint64_t)k) % n;
        size_t hi = k == 0 ? n : lo + mt_rng_bits(8, (uint64_t)k) % (n - lo + 1);
        const float *want = k % 3 == 0 ? x : k % 3 == 1 ? y : z;
        ck_assert_msg(mt_store_read_range(s, lo, hi, k % 3 == 0 ? r : NULL, k % 3 == 1 ? r : NULL,
                                          k % 3 == 2 ? r : NULL) == MT_OK,
                      "%s", mt_last_error());
        ck_assert_msg(memcmp(r, want + lo, (hi - lo) * sizeof *r) == 0, "array %d, [%zu, %zu) of %zu", k % 3, lo, hi,
                      n);
    }
    free(r);
}

// Writes random state, reads it back, changes an odd sub-range in place and
// reads again: every value must be the one written.
static void round_trip(mt_store *s, size_t n, uint64_t seed) {
    float *a = tu_random(n, -1, 1, seed), *b = tu_random(n, -1, 1, seed + 1), *c = tu_random(n, 0, 1, seed + 2);
    float *x = malloc(n * 4), *y = malloc(n * 4), *z = malloc(n * 4);
    ck_assert_msg(mt_store_write_all(s, a, b, c) == MT_OK, "%s", mt_last_error());
    ck_assert_msg(mt_store_read_all(s, x, y, z) == MT_OK, "%s", mt_last_error());
    ck_assert(memcmp(a, x, n * 4) == 0 && memcmp(b, y, n * 4) == 0 && memcmp(c, z, n * 4) == 0);
    size_t lo = n > 20 ? 17 : 0, hi = n > 20 ? n - 3 : n;
    mt_store_begin(s, lo, hi, MT_STORE_UPDATE);
    mt_store_block blk;
    size_t seen = 0;
    while (mt_store_next(s, &blk)) {
        ck_assert_uint_eq(blk.offset, lo + seen);
        for (size_t i = 0; i < blk.count; i++) {
            ck_assert(blk.master[i] == a[blk.offset + i] && blk.v[i] == c[blk.offset + i]);
            blk.master[i] += 1.0f, blk.m[i] *= 2.0f;
        }
        seen += blk.count;
        mt_store_done(s, &blk);
    }
    ck_assert_msg(mt_store_end(s) == MT_OK, "%s", mt_last_error());
    ck_assert_uint_eq(seen, hi - lo);
    for (size_t i = lo; i < hi; i++) a[i] += 1.0f, b[i] *= 2.0f;
    ck_assert_msg(mt_store_read_all(s, x, y, z) == MT_OK, "%s", mt_last_error());
    ck_assert(memcmp(a, x, n * 4) == 0 && memcmp(b, y, n * 4) == 0 && memcmp(c, z, n * 4) == 0);
    ranges_equal_whole(s, n, x, y, z);
    free(a), free(b), free(c), free(x), free(y), free(z);
}

START_TEST(store_round_trip_is_bit_exact_at_odd_sizes) {
    const size_t counts[] = {1, 1025, 3000007};
    const size_t blocks[] = {1024, 5000, 0};
    for (size_t i = 0; i < 3; i++)
        for (size_t j = 0; j < 3; j++) {
            for (int kind = 0; kind < 2; kind++) {
                mt_store *s = open_store((mt_store_kind)kind, "rt", counts[i], blocks[j]);
                ck_assert_uint_eq(mt_store_count(s), counts[i]);
                mt_store_config c = {(mt_store_kind)kind, NULL, counts[i], 0, 1, blocks[j], 0, 0, 0, NULL, 0};
                size_t block_params;
                ck_assert_uint_eq(mt_store_file_size(&c, NULL, &block_params), mt_store_file_bytes(s));
                ck_assert_uint_eq(block_params, mt_store_block_params(s));
                if (kind) ck_assert_uint_ge(mt_store_file_bytes(s), counts[i] * 12);
                round_trip(s, counts[i], 10 * i + j);
                char path[1200];
                snprintf(path, sizeof path, "%s", mt_store_path(s));
                mt_store_close(s);
                if (kind == MT_STORE_FILE) ck_assert_msg(access(path, F_OK) != 0, "%s left behind", path);
            }
        }
}
END_TEST

// The int8 store's moments as the reference quantizes them: blocks of
// MT_QBLOCK from each segment start, encoded with mt_qblock_encode and
// decoded back; m, v replaced by what decoding gives.
static void int8_reference(float *m, float *v, const size_t *seg, int n_seg, size_t n) {
    for (int k = 0; k < n_seg; k++) {
        size_t end = k + 1 < n_seg ? seg[k + 1] : n;
        for (size_t i = seg[k]; i < end; i += MT_QBLOCK) {
            size_t len = end - i < MT_QBLOCK ? end - i : MT_QBLOCK;
            uint8_t mq[MT_QBLOCK], vq[MT_QBLOCK];
            float ma, va;
            mt_qblock_encode(m + i, v + i, len, mq, vq, &ma, &va);
            mt_qblock_decode(mq, vq, ma, va, m + i, v + i, len);
        }
    }
}

// offload.moments int8: the store keeps master in fp32 and the moments as
// 8-bit codes in blocks that restart at every segment; windows (smaller than
// the passes here) hand them over decoded and take them back encoded. What
// is read equals the reference's quantization bit for bit, writing back what
// was read changes nothing (a checkpoint's round trip), and an update pass
// over two segments re-encodes exactly those, block by block. In host
// memory and in the file, whose records (1024 values at most here) end at
// quantization blocks' starts inside segments: 6 bytes a value on disk and
// the same values. int8_store_passes: the passes on a store of config c.
static void int8_store_passes(const mt_store_config *c) {
    size_t n = c->count;
    const size_t *seg = c->segments;
    int n_seg = c->n_segments;
    mt_store *s = NULL;
    ck_assert_msg(mt_store_open(&s, c) == MT_OK, "%s", mt_last_error());
    ck_assert_uint_eq(mt_store_int8_blocks(seg, n_seg, n), 3 + 3 + 11 + 1 + 20);
    if (c->kind == MT_STORE_MEMORY) {
        ck_assert_uint_eq(mt_store_host_bytes(s), n * 6 + 2 * 38 * 4 + 2 * 1024 * 4);
        ck_assert_uint_eq(mt_store_file_bytes(s), 0);
    } else {  // records [0, 956), [956, 1813), ...: at most 5 blocks of 256, 6 KiB + 40 B rounded to 8 KiB
        size_t record;
        ck_assert_uint_eq(mt_store_file_bytes(s), 10 * 8192);
        ck_assert_uint_eq(mt_store_file_size(c, &record, NULL), 10 * 8192);
        ck_assert_uint_eq(record, 8192);
    }
    float *a = tu_random(n, -1, 1, 3), *m = tu_random(n, -1e-3f, 1e-3f, 4), *v = tu_random(n, 0, 1e-6f, 5);
    for (size_t i = 900; i < 1000; i++) m[i] = v[i] = 0.0f;  // an all-zero stretch
    float *x = malloc(n * 4), *y = malloc(n * 4), *z = malloc(n * 4);
    ck_assert_msg(mt_store_write_all(s, a, m, v) == MT_OK, "%s", mt_last_error());
    ck_assert_msg(mt_store_read_all(s, x, y, z) == MT_OK, "%s", mt_last_error());
    int8_reference(m, v, seg, n_seg, n);
    ck_assert_mem_eq(x, a, n * 4);
    ck_assert_mem_eq(y, m, n * 4);
    ck_assert_mem_eq(z, v, n * 4);
    ck_assert_msg(mt_store_write_all(s, x, y, z) == MT_OK, "%s", mt_last_error());
    float *x2 = malloc(n * 4), *y2 = malloc(n * 4), *z2 = malloc(n * 4);
    ck_assert_msg(mt_store_read_all(s, x2, y2, z2) == MT_OK, "%s", mt_last_error());
    ck_assert_mem_eq(y2, y, n * 4);
    ck_assert_mem_eq(z2, z, n * 4);
    // an update of [700, 4000): every window's moments scaled, master shifted
    mt_store_begin(s, 700, 4000, MT_STORE_UPDATE);
    mt_store_block b;
    size_t seen = 0;
    while (mt_store_next(s, &b)) {
        ck_assert_uint_le(b.count, 1024);
        for (size_t i = 0; i < b.count; i++) b.master[i] += 1.0f, b.m[i] *= -0.5f, b.v[i] *= 3.0f;
        seen += b.count;
        mt_store_done(s, &b);
    }
    ck_assert_int_eq(mt_store_end(s), MT_OK);
    ck_assert_uint_eq(seen, 3300);
    for (size_t i = 700; i < 4000; i++) a[i] += 1.0f, m[i] *= -0.5f, v[i] *= 3.0f;
    int8_reference(m, v, seg, n_seg, n);
    ck_assert_msg(mt_store_read_all(s, x, y, z) == MT_OK, "%s", mt_last_error());
    ck_assert_mem_eq(x, a, n * 4);
    ck_assert_mem_eq(y, m, n * 4);
    ck_assert_mem_eq(z, v, n * 4);
    ranges_equal_whole(s, n, x, y, z);  // (a pass over the whole blocks that hold each range)
    mt_store_close(s);
    free(a), free(m), free(v), free(x), free(y), free(z), free(x2), free(y2), free(z2);
}

// A state larger than the disk is refused before anything is written,
// naming what it needs and the ways out: with fp32 moments int8 ones too.
START_TEST(store_larger_than_the_disk_is_refused) {
    char path[512];
    snprintf(path, sizeof path, "%s/huge", dir);
    for (int int8 = 0; int8 < 2; int8++) {
        size_t seg = 0;
        mt_store_config c = {MT_STORE_FILE, path, (size_t)1 << 44, 0, 1, 0, 2, 0, int8, &seg, 1};  // 17.6 T values
        mt_store *s = NULL;
        ck_assert_int_eq(mt_store_open(&s, &c), MT_ERR_IO);
        ck_assert(s == NULL);
        const char *e = mt_last_error();
        ck_assert_msg(strstr(e, "the optimizer state needs") && strstr(e, "GiB free") && strstr(e, "larger disk"), "%s",
                      e);
        ck_assert_msg((strstr(e, "offload.moments: int8") != NULL) == !int8, "int8 %d: %s", int8, e);
    }
}
END_TEST

START_TEST(store_int8_moments_quantize_by_segment) {
    for (int kind = 0; kind < 2; kind++) {
        size_t n = 9000, seg[] = {0, 700, 1301, 4000, 4001};
        int n_seg = 5;
        char path[512];
        snprintf(path, sizeof path, "%s/int8", dir);
        mt_store_config c = {(mt_store_kind)kind, path, n, 0, 1, 1024, 2, 0, 1, seg, n_seg};
        int8_store_passes(&c);
    }
}
END_TEST

// A snapshot of a memory store (fp32 and int8 moments) reads as the store
// did when it was taken, whole and by range, while a pass changes the store,
// and takes what the store's arrays take.
START_TEST(store_snapshot_keeps_the_state_it_was_taken_at) {
    size_t n = 9000, seg[] = {0, 700, 1301, 4000, 4001};
    for (int int8 = 0; int8 <= 1; int8++) {
        mt_store_config c = {MT_STORE_MEMORY, NULL, n, 0, 1, 1024, 0, 0, int8, seg, 5};
        mt_store *s = NULL, *snap = NULL;
        ck_assert_msg(mt_store_open(&s, &c) == MT_OK, "%s", mt_last_error());
        float *a = tu_random(n, -1, 1, 3), *m = tu_random(n, -1e-3f, 1e-3f, 4), *v = tu_random(n, 0, 1e-6f, 5);
        float *x = malloc(n * 4), *y = malloc(n * 4), *z = malloc(n * 4);
        ck_assert_msg(mt_store_write_all(s, a, m, v) == MT_OK, "%s", mt_last_error());
        ck_assert_msg(mt_store_read_all(s, a, m, v) == MT_OK, "%s", mt_last_error());  // (int8: as coded)
        ck_assert_msg(mt_store_snapshot(s, &snap) == MT_OK, "%s", mt_last_error());
        ck_assert_uint_eq(mt_store_snapshot_bytes(s), mt_store_host_bytes(s));
        mt_store_begin(s, 0, n, MT_STORE_UPDATE);
        mt_store_block b;
        while (mt_store_next(s, &b)) {
            for (size_t i = 0; i < b.count; i++) b.master[i] += 1.0f, b.m[i] *= -0.5f, b.v[i] *= 3.0f;
            mt_store_done(s, &b);
        }
        ck_assert_int_eq(mt_store_end(s), MT_OK);
        ck_assert_msg(mt_store_read_all(s, x, NULL, NULL) == MT_OK, "%s", mt_last_error());
        ck_assert_float_eq(x[17], a[17] + 1.0f);  // the store changed
        ck_assert_msg(mt_store_read_all(snap, x, y, z) == MT_OK, "%s", mt_last_error());
        ck_assert_mem_eq(x, a, n * 4);
        ck_assert_mem_eq(y, m, n * 4);
        ck_assert_mem_eq(z, v, n * 4);
        ranges_equal_whole(snap, n, x, y, z);
        mt_store_close(snap);
        mt_store_close(s);
        free(a), free(m), free(v), free(x), free(y), free(z);
    }
}
END_TEST

// An MT_STORE_UPDATE_PIECES pass (what the offloaded update runs) leaves
// the store as an MT_STORE_UPDATE pass with the same change does, bit for
// bit: int8 moments coded a piece at a time on every thread (windows of
// several pieces, segments that do not start on a piece's bound, a pass
// that starts past the first), and fp32 moments, handed over whole; in
// memory and in the file (whose int8 values are the memory store's).
typedef struct {
    const mt_store_block *b;
    size_t calls;
} piece_change;

static void change_piece(void *ctx, size_t lo, size_t hi, float *m, float *v) {
    piece_change *c = ctx;
    for (size_t i = lo; i < hi; i++)
        c->b->master[i - c->b->offset] += 1.0f, m[i - lo] = m[i - lo] * -0.5f + 1e-4f, v[i - lo] *= 3.0f;
#pragma omp atomic
    c->calls++;
}

START_TEST(store_update_pieces_equal_windows) {
    size_t n = 100000, seg[] = {0, 700, 20001, 61001};
    int n_seg = 4;
    float *a = tu_random(n, -1, 1, 13), *m = tu_random(n, -1e-3f, 1e-3f, 14), *v = tu_random(n, 0, 1e-6f, 15);
    float *want[3], *got[3], *in_memory[3];
    for (int k = 0; k < 3; k++) want[k] = malloc(n * 4), got[k] = malloc(n * 4), in_memory[k] = malloc(n * 4);
    char path[512];
    snprintf(path, sizeof path, "%s/pieces", dir);
    for (int variant = 0; variant < 4; variant++) {
        int int8 = variant & 1, kind = variant >> 1;
        for (int pieces = 0; pieces < 2; pieces++) {
            mt_store_config c = {(mt_store_kind)kind, path, n, 0, 1, 40000, 2, 0, int8, seg, n_seg};
            mt_store *s = NULL;
            ck_assert_msg(mt_store_open(&s, &c) == MT_OK, "%s", mt_last_error());
            ck_assert_msg(mt_store_write_all(s, a, m, v) == MT_OK, "%s", mt_last_error());
            mt_store_begin(s, 700, n, pieces ? MT_STORE_UPDATE_PIECES : MT_STORE_UPDATE);
            mt_store_block b;
            size_t calls = 0;
            while (mt_store_next(s, &b)) {
                piece_change pc = {&b, 0};
                if (pieces)
                    mt_store_update_pieces(s, &b, change_piece, &pc);
                else
                    change_piece(&pc, b.offset, b.offset + b.count, b.m, b.v);
                calls += pc.calls;
                mt_store_done(s, &b);
            }
            ck_assert_int_eq(mt_store_end(s), MT_OK);
            if (pieces && int8) ck_assert_uint_gt(calls, 6);  // windows of 40000 cut into pieces of about 16384
            float **dst = pieces ? got : want;
            ck_assert_msg(mt_store_read_all(s, dst[0], dst[1], dst[2]) == MT_OK, "%s", mt_last_error());
            mt_store_close(s);
        }
        for (int k = 0; k < 3; k++)
            ck_assert_msg(!memcmp(got[k], want[k], n * 4), "int8 %d, kind %d: array %d differs", int8, kind, k);
        if (int8 && kind == MT_STORE_FILE)  // the file's windows and pieces give the memory store's values
            for (int k = 0; k < 3; k++)
                ck_assert_msg(!memcmp(got[k], in_memory[k], n * 4), "file vs memory: array %d", k);
        if (int8 && kind == MT_STORE_MEMORY)
            for (int k = 0; k < 3; k++) memcpy(in_memory[k], got[k], n * 4);
    }
    free(a), free(m), free(v);
    for (int k = 0; k < 3; k++) free(want[k]), free(got[k]), free(in_memory[k]);
}
END_TEST

// pread/pwrite doubles: short transfers, no progress, ENOSPC, EIO
static ssize_t short_pread(int fd, void *buf, size_t len, off_t at) {
    return pread(fd, buf, len < 4096 ? len : 4096, at);
}
static ssize_t short_pwrite(int fd, const void *buf, size_t len, off_t at) {
    return pwrite(fd, buf, len < 8192 ? len : 8192, at);
}
static ssize_t stuck_pwrite(int fd, const void *buf, size_t len, off_t at) {
    (void)fd, (void)buf, (void)len, (void)at;
    return 0;
}
static ssize_t full_pwrite(int fd, const void *buf, size_t len, off_t at) {
    ssize_t half = pwrite(fd, buf, len / 2, at);  // part lands, then the disk is full
    (void)half;
    errno = ENOSPC;
    return -1;
}
static ssize_t failing_pread(int fd, void *buf, size_t len, off_t at) {
    (void)fd, (void)buf, (void)len, (void)at;
    errno = EIO;
    return -1;
}

START_TEST(store_errors_are_clear_and_values) {
    size_t n = 5000;
    float *a = tu_random(n, -1, 1, 5);
    mt_store *s = open_store(MT_STORE_FILE, "errors", n, 1024);
    // short transfers continue where they stopped
    mt_store_set_io(s, short_pread, short_pwrite);
    round_trip(s, n, 40);
    // ENOSPC
    mt_store_set_io(s, NULL, full_pwrite);
    ck_assert_int_eq(mt_store_write_all(s, a, NULL, NULL), MT_ERR_IO);
    ck_assert_msg(strstr(mt_last_error(), "no space left") && strstr(mt_last_error(), "offload.path"), "%s",
                  mt_last_error());
    // a write that makes no progress
    mt_store_set_io(s, NULL, stuck_pwrite);
    ck_assert_int_eq(mt_store_write_all(s, a, NULL, NULL), MT_ERR_IO);
    ck_assert_msg(strstr(mt_last_error(), "short transfer") && strstr(mt_last_error(), "writing"), "%s",
                  mt_last_error());
    // EIO on read
    mt_store_set_io(s, NULL, NULL);
    ck_assert_int_eq(mt_store_write_all(s, a, NULL, NULL), MT_OK);
    mt_store_set_io(s, failing_pread, NULL);
    float *x = malloc(n * 4);
    ck_assert_int_eq(mt_store_read_all(s, x, NULL, NULL), MT_ERR_IO);
    ck_assert_msg(strstr(mt_last_error(), strerror(EIO)) && strstr(mt_last_error(), "reading"), "%s", mt_last_error());
    // one flipped byte behind the store's back fails the checksum
    mt_store_set_io(s, NULL, NULL);
    ck_assert_int_eq(mt_store_read_all(s, x, NULL, NULL), MT_OK);
    ck_assert(memcmp(a, x, n * 4) == 0);
    int fd = open(mt_store_path(s), O_RDWR);
    ck_assert_int_ge(fd, 0);
    unsigned char byte;
    ck_assert_int_eq(pread(fd, &byte, 1, 3 * 1024 * 4 * 2 + 100), 1);
    byte ^= 0x10;
    ck_assert_int_eq(pwrite(fd, &byte, 1, 3 * 1024 * 4 * 2 + 100), 1);
    fsync(fd);
    close(fd);
    ck_assert_int_eq(mt_store_read_all(s, x, NULL, NULL), MT_ERR_IO);
    ck_assert_msg(strstr(mt_last_error(), "CRC-32C") && strstr(mt_last_error(), "block 2"), "%s", mt_last_error());
    // a second user of the same file is refused
    char path[512];
    snprintf(path, sizeof path, "%s/errors", dir);
    mt_store_config c = {MT_STORE_FILE, path, n, 0, 1, 1024, 1, 1, 0, NULL, 0};
    mt_store *other = NULL;
    ck_assert_int_eq(mt_store_open(&other, &c), MT_ERR_IO);
    ck_assert_msg(strstr(mt_last_error(), "in use"), "%s", mt_last_error());
    ck_assert_ptr_null(other);
    mt_store_close(s);
    // a disk too small fails at open, and leaves no file
    c.count = (size_t)1 << 52;
    c.block_params = 0;
    ck_assert_int_eq(mt_store_open(&other, &c), MT_ERR_IO);
    ck_assert_msg(strstr(mt_last_error(), "GiB"), "%s", mt_last_error());
    snprintf(path, sizeof path, "%s/errors/state-rank0-of-1.bin", dir);
    ck_assert_msg(access(path, F_OK) != 0, "%s left behind", path);
    free(a);
    free(x);
}
END_TEST

// ---------------------------------------------------------------- training

// The dataset and the tiny model's folder the training tests share.
static void data_and_model(char *data, char *folder) {
    snprintf(data, 300, "%s/data.h5", dir);
    if (access(data, R_OK) != 0) tu_write_sequence_data(data);
    tu_model_folder(dir, "tiny", tu_tiny_llama_json, folder, 300);
}

static void run_config(mt_config *cfg, const char *folder, const char *data, const char *out,
                       const char *const *extra) {
    const char *const none[] = {NULL};
    tu_tiny_run_config(cfg, folder, data, out, extra ? extra : none);
    ck_assert_int_eq(mt_config_set(cfg, "optim.weight_decay", "0.1", "t"), MT_OK);
}

static void train_losses(const char *name, const char *const *extra, double *losses) {
    char data[300], folder[300], out[300];
    data_and_model(data, folder);
    snprintf(out, sizeof out, "%s/%s", dir, name);
    mt_config cfg;
    mt_train_result r;
    run_config(&cfg, folder, data, out, extra);
    ck_assert_msg(mt_train(&cfg, &r) == MT_OK, "%s: %s", name, mt_last_error());
    ck_assert_int_eq(tu_read_losses(out, losses, 12), 12);
    mt_config_free(&cfg);
}

// A run stopped after 5 of its 12 steps and resumed has the uninterrupted
// run's losses bit for bit (run folders NAME-whole and NAME-split).
static void resumed_equals_whole(const char *name, const char *const *extra) {
    char data[300], folder[300], whole[300], split[300];
    data_and_model(data, folder);
    snprintf(whole, sizeof whole, "%s/%s-whole", dir, name);
    snprintf(split, sizeof split, "%s/%s-split", dir, name);
    for (int shift = 0; shift < 3; shift++) {
        mt_config cfg;
        mt_train_result r;
        run_config(&cfg, folder, data, shift ? split : whole, extra);
        if (shift == 1) ck_assert_int_eq(mt_config_set(&cfg, "train.stop_after", "5", "t"), MT_OK);
        if (shift == 2) ck_assert_int_eq(mt_config_set(&cfg, "train.resume", "auto", "t"), MT_OK);
        ck_assert_msg(mt_train(&cfg, &r) == MT_OK, "%s: %s", name, mt_last_error());
        ck_assert_int_eq(r.steps_done, shift == 1 ? 5 : 12);
        mt_config_free(&cfg);
    }
    tu_assert_same_losses(whole, split, 12, NULL);
}

START_TEST(offloaded_runs_follow_the_run_without_offload) {
    char ssd[400];
    snprintf(ssd, sizeof ssd, "%s/ssd", dir);
    // clang-format off
    const char *const variants[][12] = {
        {NULL},  // with clipping (optim.grad_clip 1, the default)
        {"optim.grad_clip", "0", NULL},  // buckets update as their gradients land
        {"train.grad_accum", "2", NULL},  // each micro-batch's gradients streamed, summed on the host
        {"train.grad_accum", "2", "offload.grad_sum", "gpu", NULL},  // summed in the block, sent after backward
        {"lora.r", "4", "lora.dropout", "0", NULL},  // adapters
    };
    // clang-format on
    for (size_t k = 0; k < sizeof variants / sizeof *variants; k++) {
        double base[12], cpu[12], file[12];
        const char *plain[16], *off_cpu[16], *off_ssd[16];
        int n = 0;
        while (variants[k][n]) n++;
        tu_pairs_without(variants[k], "offload.", plain);  // (the run without offload takes no offload.* keys)
        for (int i = 0; i <= n; i++) off_cpu[i] = off_ssd[i] = variants[k][i];
        off_cpu[n] = "offload.optimizer", off_cpu[n + 1] = "cpu", off_cpu[n + 2] = NULL;
        off_ssd[n] = "offload.optimizer", off_ssd[n + 1] = "ssd", off_ssd[n + 2] = "offload.path", off_ssd[n + 3] = ssd,
        off_ssd[n + 4] = NULL;
        train_losses("plain", plain, base);
        train_losses("cpu", off_cpu, cpu);
        train_losses("ssd", off_ssd, file);
        for (int i = 0; i < 12; i++) {
            // the same arithmetic; only the norm's summation order differs
            ck_assert_msg(fabs(cpu[i] - base[i]) <= 1e-5 * fabs(base[i]), "variant %zu step %d: %.9g vs %.9g", k, i + 1,
                          cpu[i], base[i]);
            ck_assert_msg(file[i] == cpu[i], "variant %zu step %d: ssd %.17g vs cpu %.17g", k, i + 1, file[i], cpu[i]);
        }
        ck_assert_msg(base[11] < base[0], "variant %zu: loss %g -> %g", k, base[0], base[11]);
    }
}
END_TEST

// offload.ratio: the plan keeps the whole first units that fit in 1 - ratio
// of the trained block (the tiny model: embedding 208 values, a layer 1952,
// the head 224, of 4336): none at 1 or 0.99, the embedding at 0.9, the
// embedding and layer 0 at 0.5, all but the head at 0.05.
START_TEST(ratio_splits_the_state_at_whole_units) {
    char data[300], folder[300];
    data_and_model(data, folder);
    mt_model_config mc;
    ck_assert_int_eq(mt_hf_read_config(folder, &mc), MT_OK);
    mt_dist *dist = NULL;
    ck_assert_int_eq(mt_dist_init(&dist), MT_OK);
    const char *ratios[] = {"1", "0.99", "0.9", "0.5", "0.05"};
    const int units[] = {0, 0, 1, 2, 3};
    for (int k = 0; k < 5; k++) {
        mt_config cfg;
        run_config(&cfg, folder, data, dir, NULL);
        ck_assert_int_eq(mt_config_set(&cfg, "train.device", "cpu", "t"), MT_OK);
        ck_assert_int_eq(mt_config_set(&cfg, "offload.optimizer", "cpu", "t"), MT_OK);
        ck_assert_int_eq(mt_config_set(&cfg, "offload.ratio", ratios[k], "t"), MT_OK);
        mt_plan pl;
        ck_assert_msg(mt_plan_make(&pl, &cfg, &mc, dist, 0) == MT_OK, "%s", mt_last_error());
        ck_assert_int_eq(pl.resident_units, units[k]);
        size_t split = 0;  // the first offset of the first unit offloaded
        for (int i = pl.n_trained - 1; i >= 0; i--)
            if (mt_param_forward_unit(pl.trained[i].name, mc.L) >= units[k]) split = pl.trained[i].offset;
        ck_assert_uint_eq(pl.offload_split, split);
        ck_assert_msg((double)split <= (1 - atof(ratios[k])) * (double)pl.trained_total, "ratio %s", ratios[k]);
        mt_plan_free(&pl);
        mt_config_free(&cfg);
    }
    mt_dist_free(dist);
}
END_TEST

// memory.budget on a GPU (forecast here, with no GPU): a 1.1B full fine-tune
// (19.3 GiB as configured, checkpointing, B=4, T=1024) runs with the
// largest share of AdamW's state on the GPU that fits: a quarter offloaded
// at 16 GiB (forecast 15.5), half at 12 (11.6), three quarters at 8 (7.0),
// all at 4 (3.4); and the budget never changes a ratio the user set.
START_TEST(budget_keeps_what_fits_of_the_state_on_the_gpu) {
    char data[300], folder[300];
    data_and_model(data, folder);
    const char *budgets[] = {"16GiB", "12GiB", "8GiB", "4GiB"};
    const double ratios[] = {0.25, 0.5, 0.75, 1};
    for (int k = 0; k < 5; k++) {
        mt_config cfg;
        run_config(&cfg, "configs/models/tinyllama-1.1b", data, dir, NULL);
        const char *const sets[][2] = {{"train.micro_batch", "4"},
                                       {"train.seq_len", "1024"},
                                       {"model.activation_checkpointing", "true"},
                                       {"memory.budget", k < 4 ? budgets[k] : "12GiB"}};
        for (int i = 0; i < 4; i++) ck_assert_int_eq(mt_config_set(&cfg, sets[i][0], sets[i][1], "t"), MT_OK);
        if (k == 4) {  // offloaded as the user said: left as it is (it fits)
            ck_assert_int_eq(mt_config_set(&cfg, "offload.optimizer", "cpu", "t"), MT_OK);
            ck_assert_int_eq(mt_config_set(&cfg, "offload.ratio", "0.9", "t"), MT_OK);
        }
        ck_assert_msg(mt_forecast_fit_budget(&cfg, 1, 1) == MT_OK, "%s", mt_last_error());
        ck_assert_str_eq(cfg.offload_optimizer, "cpu");
        ck_assert_msg(cfg.offload_ratio == (k < 4 ? ratios[k] : 0.9), "budget %s: offload.ratio %g",
                      k < 4 ? budgets[k] : "12GiB, ratio 0.9", cfg.offload_ratio);
        ck_assert_int_eq(cfg.train_micro_batch, 4);
        mt_config_free(&cfg);
    }
}
END_TEST

// memory.host_check (forecast here, the host's memory given as
// memtune plan --host-memory gives it): a 1.1B full fine-tune with AdamW's
// state in host memory (about 15 GiB of host memory on a GPU) starts with 64
// GiB available and is refused, naming the fix, with 8; 8-bit moments fit 12
// GiB; the key false lets it start. On the CPU backend everything counts
// (16 B a parameter, the fp32 copy it loads 4 more, and 8 for the moments'
// host copies once a checkpoint is written: 28.8 GiB), and two ranks on one
// host count twice.
START_TEST(host_check_refuses_what_host_memory_cannot_hold) {
    char data[300], folder[300];
    data_and_model(data, folder);
    mt_config cfg;
    run_config(&cfg, "configs/models/tinyllama-1.1b", data, dir, NULL);
    ck_assert_int_eq(mt_config_set(&cfg, "model.activation_checkpointing", "true", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "offload.optimizer", "cpu", "t"), MT_OK);
    const double gib = 1073741824.0;
    mt_forecast_set_host_memory(64 * gib);
    ck_assert_msg(mt_forecast_check_host(&cfg, 1, 1) == MT_OK, "%s", mt_last_error());
    mt_forecast_set_host_memory(8 * gib);
    ck_assert_int_eq(mt_forecast_check_host(&cfg, 1, 1), MT_ERR_NOMEM);
    ck_assert_msg(strstr(mt_last_error(), "offload.moments: int8") && strstr(mt_last_error(), "memory.host_check"),
                  "%s", mt_last_error());
    mt_forecast_set_host_memory(12 * gib);
    ck_assert_int_eq(mt_forecast_check_host(&cfg, 1, 1), MT_ERR_NOMEM);
    ck_assert_int_eq(mt_config_set(&cfg, "offload.moments", "int8", "t"), MT_OK);
    ck_assert_msg(mt_forecast_check_host(&cfg, 1, 1) == MT_OK, "%s", mt_last_error());
    mt_forecast_set_host_memory(8 * gib);
    ck_assert_int_eq(mt_config_set(&cfg, "memory.host_check", "false", "t"), MT_OK);
    ck_assert_int_eq(mt_forecast_check_host(&cfg, 1, 1), MT_OK);
    mt_config_free(&cfg);
    // the CPU backend: weights, gradients and moments all in host memory
    run_config(&cfg, "configs/models/tinyllama-1.1b", data, dir, NULL);
    mt_forecast_set_host_memory(32 * gib);
    ck_assert_msg(mt_forecast_check_host(&cfg, 0, 1) == MT_OK, "%s", mt_last_error());
    mt_forecast_set_host_memory(24 * gib);
    ck_assert_int_eq(mt_forecast_check_host(&cfg, 0, 1), MT_ERR_NOMEM);
    ck_assert_msg(strstr(mt_last_error(), "lora.r"), "%s", mt_last_error());
    ck_assert_int_eq(mt_config_set(&cfg, "checkpoint.final", "false", "t"), MT_OK);  // no moments' host copies
    ck_assert_msg(mt_forecast_check_host(&cfg, 0, 1) == MT_OK, "%s", mt_last_error());
    mt_forecast_set_host_memory(32 * gib);
    setenv("MT_WORLD_SIZE", "4", 1);  // the env launcher: 4 ranks, 2 of them on this host
    setenv("MT_RANK", "0", 1);
    setenv("MT_RENDEZVOUS", dir, 1);
    setenv("MT_LOCAL_WORLD_SIZE", "2", 1);
    ck_assert_int_eq(mt_forecast_check_host(&cfg, 0, 4), MT_ERR_NOMEM);
    ck_assert_msg(strstr(mt_last_error(), "2 ranks on this host"), "%s", mt_last_error());
    unsetenv("MT_LOCAL_WORLD_SIZE");
    setenv("MT_WORLD_SIZE", "2", 1);  // the env launcher without a local count: all of its ranks here
    ck_assert_int_eq(mt_forecast_check_host(&cfg, 0, 2), MT_ERR_NOMEM);
    ck_assert_msg(strstr(mt_last_error(), "2 ranks on this host"), "%s", mt_last_error());
    unsetenv("MT_WORLD_SIZE"), unsetenv("MT_RANK"), unsetenv("MT_RENDEZVOUS");
    ck_assert_msg(mt_forecast_check_host(&cfg, 0, 1) == MT_OK, "%s", mt_last_error());
    mt_forecast_set_host_memory(0);
    mt_config_free(&cfg);
}
END_TEST

// offload.ratio 0.5: the embedding and the first layer keep their AdamW
// state on the backend, the store the rest (the split: the test above).
// The runs follow the run without offload as the fully offloaded ones do
// (the norm is summed in two parts), with clipping, without, with either
// place of the micro-batches' sums, from host memory or the SSD alike; a
// stopped run resumes bit for bit, and its checkpoint resumes as well with
// everything offloaded (the state is one block either way).
START_TEST(ratio_keeps_the_first_units_on_the_backend) {
    char ssd[400];
    snprintf(ssd, sizeof ssd, "%s/ssd-ratio", dir);
    // clang-format off
    const char *const variants[][8] = {
        {NULL},
        {"optim.grad_clip", "0", NULL},
        {"train.grad_accum", "2", NULL},
        {"train.grad_accum", "2", "offload.grad_sum", "gpu", NULL},
    };
    // clang-format on
    for (size_t k = 0; k < sizeof variants / sizeof *variants; k++) {
        double base[12], half[12], file[12];
        const char *plain[12], *off_cpu[12], *off_ssd[16];
        int n = 0;
        while (variants[k][n]) n++;
        tu_pairs_without(variants[k], "offload.", plain);
        for (int i = 0; i <= n; i++) off_cpu[i] = off_ssd[i] = variants[k][i];
        const char *const cpu_keys[] = {"offload.optimizer", "cpu", "offload.ratio", "0.5", NULL};
        const char *const ssd_keys[] = {"offload.optimizer", "ssd", "offload.path", ssd, "offload.ratio", "0.5", NULL};
        for (int i = 0; i < 5; i++) off_cpu[n + i] = cpu_keys[i];
        for (int i = 0; i < 7; i++) off_ssd[n + i] = ssd_keys[i];
        train_losses("ratio-plain", plain, base);
        train_losses("ratio-cpu", off_cpu, half);
        train_losses("ratio-ssd", off_ssd, file);
        for (int i = 0; i < 12; i++) {
            ck_assert_msg(fabs(half[i] - base[i]) <= 1e-5 * fabs(base[i]), "variant %zu step %d: %.9g vs %.9g", k,
                          i + 1, half[i], base[i]);
            ck_assert_msg(file[i] == half[i], "variant %zu step %d: ssd %.17g vs cpu %.17g", k, i + 1, file[i],
                          half[i]);
        }
        ck_assert_msg(half[11] < half[0], "variant %zu: loss %g -> %g", k, half[0], half[11]);
    }
    const char *const ratio[] = {"offload.optimizer", "cpu", "offload.ratio", "0.5", NULL};
    resumed_equals_whole("ratio", ratio);
    // stopped at step 5 with offload.ratio 0.5, resumed with everything offloaded
    char data[300], folder[300], out[300], whole[300];
    data_and_model(data, folder);
    snprintf(out, sizeof out, "%s/ratio-switch", dir);
    snprintf(whole, sizeof whole, "%s/ratio-whole", dir);
    const char *const stop[] = {"offload.optimizer", "cpu", "offload.ratio", "0.5", "train.stop_after", "5", NULL};
    const char *const all[] = {"offload.optimizer", "cpu", "train.resume", "auto", NULL};
    for (int part = 0; part < 2; part++) {
        mt_config cfg;
        mt_train_result r;
        run_config(&cfg, folder, data, out, part ? all : stop);
        ck_assert_msg(mt_train(&cfg, &r) == MT_OK, "%s", mt_last_error());
        ck_assert_int_eq(r.steps_done, part ? 12 : 5);
        mt_config_free(&cfg);
    }
    double a[12], b[12];
    ck_assert_int_eq(tu_read_losses(whole, a, 12), 12);
    ck_assert_int_eq(tu_read_losses(out, b, 12), 12);
    for (int i = 0; i < 12; i++)
        ck_assert_msg(fabs(b[i] - a[i]) <= 1e-5 * fabs(a[i]), "step %d: %.9g vs %.9g", i + 1, b[i], a[i]);
}
END_TEST

// offload.trace_step 3 of a streamed run's 12 steps: output.dir's
// streaming-trace.json holds steps 3 and 4 alone, each layer's compute in
// both (backward too where there is one), the copies in where the slots are
// refilled each forward (full fine-tuning: the optimizer's updates), MeZO's
// copies back out; spans in order on the compute track, none negative; no
// copy of the first `resident` layers (model.resident_layers: their slots
// were filled at step 1 and MeZO's updates stay in them).
static void check_streaming_trace(const char *out, int refills, int backward, int writebacks, int resident) {
    char path[1400];
    snprintf(path, sizeof path, "%s/streaming-trace.json", out);
    FILE *f = fopen(path, "r");
    ck_assert_msg(f != NULL, "%s missing", path);
    char *text = calloc(1, 1 << 20);
    ck_assert(text != NULL);
    size_t len = fread(text, 1, (1 << 20) - 1, f);
    fclose(f);
    ck_assert_uint_gt(len, 0);
    cJSON *doc = cJSON_Parse(text);
    ck_assert_msg(doc != NULL, "%s is not JSON", path);
    const cJSON *events = cJSON_GetObjectItemCaseSensitive(doc, "traceEvents"), *e;
    int forward[2] = {0}, back[2] = {0}, copies[3] = {0};
    double last = -1.0;
    cJSON_ArrayForEach(e, events) {
        const char *ph = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(e, "ph"));
        if (!ph || strcmp(ph, "X")) continue;
        const char *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(e, "name"));
        int tid = (int)cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(e, "tid"));
        double ts = cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(e, "ts")),
               dur = cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(e, "dur"));
        int step = 0, layer = -1;
        ck_assert_msg(name && sscanf(name, "step %d", &step) == 1 && (step == 3 || step == 4), "span %s", name);
        ck_assert_msg(tid == 1 || (sscanf(name, "step %d layer %d", &step, &layer) == 2 && layer >= resident),
                      "a copy of a resident layer: %s on track %d", name, tid);
        ck_assert_msg(ts >= 0 && dur >= 0, "span %s at %g for %g", name, ts, dur);
        ck_assert(tid >= 1 && tid <= 3);
        copies[tid - 1]++;
        if (tid == 1) {
            ck_assert_msg(ts >= last, "compute span %s at %g before the one before it (%g)", name, ts, last);
            last = ts;
            if (strstr(name, "forward layer")) forward[step - 3]++;
            if (strstr(name, "backward layer")) back[step - 3]++;
        }
    }
    cJSON_Delete(doc);
    free(text);
    for (int k = 0; k < 2; k++) {
        ck_assert_msg(forward[k] >= 2, "step %d: %d forward layers", k + 3, forward[k]);
        ck_assert_msg(backward ? back[k] >= 2 : back[k] == 0, "step %d: %d backward layers", k + 3, back[k]);
    }
    if (refills) ck_assert_msg(copies[1] >= 4, "%d copies in", copies[1]);
    ck_assert_msg(writebacks ? copies[2] > 0 : copies[2] == 0, "%d copies out", copies[2]);
}

// model.weights: cpu (the base's layers streamed from a host store through
// two slots) and ssd (from a file under offload.path) change nothing in a
// run: the same losses bit for bit and the same saved model, for full
// fine-tuning with the offloaded optimizer (with and without clipping, with
// accumulation, on the SSD tier), LoRA with checkpointing, and MeZO (these
// two streamed with the first layer resident, model.resident_layers: 1); and
// a streamed run stopped and resumed is the uninterrupted one. The streamed
// runs from host memory take a timeline of steps 3 and 4 as well.
START_TEST(streamed_weights_runs_equal_resident_runs) {
    char ssd[400], data[300], folder[300], weights_dir[400];
    snprintf(ssd, sizeof ssd, "%s/ssd-streamed", dir);
    snprintf(weights_dir, sizeof weights_dir, "%s/weights-file", dir);
    data_and_model(data, folder);
    // clang-format off
    const char *const variants[][12] = {
        {"offload.optimizer", "cpu", NULL},
        {"offload.optimizer", "cpu", "optim.grad_clip", "0", "train.grad_accum", "2", NULL},
        {"offload.optimizer", "ssd", "offload.path", ssd, "model.activation_checkpointing", "true", NULL},
        {"lora.r", "4", "model.activation_checkpointing", "true", NULL},
        {"optim.kind", "mezo", "optim.lr", "1e-3", "mezo.samples", "2", NULL},
    };
    // clang-format on
    for (size_t k = 0; k < sizeof variants / sizeof *variants; k++) {
        static const char *const places[] = {"gpu", "cpu", "ssd"};
        char out[3][300];
        double losses[3][12];
        for (int w = 0; w < 3; w++) {
            snprintf(out[w], sizeof out[w], "%s/streamed-%zu-%s", dir, k, places[w]);
            mt_config cfg;
            mt_train_result r;
            run_config(&cfg, folder, data, out[w], variants[k]);
            ck_assert_int_eq(mt_config_set(&cfg, "model.weights", places[w], "t"), MT_OK);
            if (w == 2 && !cfg.offload_path[0])
                ck_assert_int_eq(mt_config_set(&cfg, "offload.path", weights_dir, "t"), MT_OK);
            if (w == 1) ck_assert_int_eq(mt_config_set(&cfg, "offload.trace_step", "3", "t"), MT_OK);
            int resident = w > 0 && k >= 3;
            if (resident) ck_assert_int_eq(mt_config_set(&cfg, "model.resident_layers", "1", "t"), MT_OK);
            ck_assert_msg(mt_train(&cfg, &r) == MT_OK, "variant %zu, %s: %s", k, places[w], mt_last_error());
            if (w == 1) check_streaming_trace(out[w], k <= 2, k != 4, k == 4, resident);
            ck_assert_int_eq(tu_read_losses(out[w], losses[w], 12), 12);
            mt_config_free(&cfg);
        }
        for (int w = 1; w < 3; w++) {
            for (int i = 0; i < 12; i++)
                ck_assert_msg(losses[w][i] == losses[0][i], "variant %zu step %d: %s %.17g, resident %.17g", k, i + 1,
                              places[w], losses[w][i], losses[0][i]);
            char cmd[1400];
            const char *file = k == 3 ? "adapter/adapter_model.safetensors" : "model/model.safetensors";
            snprintf(cmd, sizeof cmd, "cmp -s %s/%s %s/%s", out[0], file, out[w], file);
            ck_assert_msg(system(cmd) == 0, "variant %zu, %s: the saved %s differs", k, places[w], file);
        }
    }
    // stopped after 5 steps and resumed, streamed with the offloaded optimizer
    const char *const extra[] = {"offload.optimizer", "cpu", "model.weights", "cpu", NULL};
    resumed_equals_whole("streamed", extra);
}
END_TEST

START_TEST(ssd_offload_resumes_bit_identically) {
    char ssd[400], data[300], folder[300], whole[300], split[300];
    snprintf(ssd, sizeof ssd, "%s/ssd-resume", dir);
    data_and_model(data, folder);
    snprintf(whole, sizeof whole, "%s/whole", dir);
    snprintf(split, sizeof split, "%s/split", dir);
    const char *const extra[] = {"offload.optimizer", "ssd", "offload.path", ssd, NULL};
    mt_config cfg;
    mt_train_result r;
    for (int shift = 0; shift < 3; shift++) {
        run_config(&cfg, folder, data, shift ? split : whole, extra);
        if (shift == 1) ck_assert_int_eq(mt_config_set(&cfg, "train.stop_after", "5", "t"), MT_OK);
        if (shift == 2) ck_assert_int_eq(mt_config_set(&cfg, "train.resume", "auto", "t"), MT_OK);
        // the second shift takes the state back onto the CPU store: where it lives is not part of it
        if (shift == 2) ck_assert_int_eq(mt_config_set(&cfg, "offload.optimizer", "cpu", "t"), MT_OK);
        if (shift == 2) ck_assert_int_eq(mt_config_set(&cfg, "offload.path", "", "t"), MT_OK);
        ck_assert_msg(mt_train(&cfg, &r) == MT_OK, "%s", mt_last_error());
        ck_assert_int_eq(r.steps_done, shift == 1 ? 5 : 12);
        mt_config_free(&cfg);
    }
    tu_assert_same_losses(whole, split, 12, NULL);
    char cmd[1400];
    snprintf(cmd, sizeof cmd, "cmp -s %s/model/model.safetensors %s/model/model.safetensors", whole, split);
    ck_assert_int_eq(system(cmd), 0);
}
END_TEST

START_TEST(a_full_disk_mid_run_leaves_the_last_checkpoint_whole) {
    char ssd[400], data[300], folder[300], out[300], path[1400];
    snprintf(ssd, sizeof ssd, "%s/ssd-full", dir);
    data_and_model(data, folder);
    snprintf(out, sizeof out, "%s/full", dir);
    const char *const extra[] = {"offload.optimizer", "ssd", "offload.path", ssd, "checkpoint.every", "4", NULL};
    mt_config cfg;
    mt_train_result r;
    run_config(&cfg, folder, data, out, extra);
    // the tiny model is one store block: 1 write to start, 4 per step (one per
    // bucket: embedding, 2 layers, head); the 27th write is in step 7
    mt_store_inject_write_fault(26, ENOSPC);
    mt_err err = mt_train(&cfg, &r);
    mt_store_inject_write_fault(-1, 0);
    ck_assert_int_eq(err, MT_ERR_IO);
    ck_assert_msg(strstr(mt_last_error(), "no space left") && strstr(mt_last_error(), "untouched"), "%s",
                  mt_last_error());
    snprintf(path, sizeof path, "%s/checkpoints/step-00000004/state.h5", out);
    ck_assert_msg(access(path, R_OK) == 0, "the step-4 checkpoint is gone");
    snprintf(path, sizeof path, "%s/checkpoints/step-00000008", out);
    ck_assert_msg(access(path, F_OK) != 0, "a checkpoint past the failure exists");
    // resume from it: the run ends as an uninterrupted one does
    ck_assert_int_eq(mt_config_set(&cfg, "train.resume", "auto", "t"), MT_OK);
    ck_assert_msg(mt_train(&cfg, &r) == MT_OK, "%s", mt_last_error());
    mt_config_free(&cfg);
    double expect[12];
    const char *const same[] = {"offload.optimizer", "ssd", "offload.path", ssd, NULL};
    train_losses("unbroken", same, expect);
    snprintf(path, sizeof path, "%s/unbroken", dir);
    tu_assert_same_losses(path, out, 12, NULL);
}
END_TEST

// GaLore with offload: what GaLore does not project (the embedding, norms,
// head) takes the offloaded AdamW; the run follows GaLore's own to rounding
// (the two AdamWs order their operations differently), SSD and host stores
// agree bit for bit, and a checkpoint resumes exactly, with offload or without.
START_TEST(galore_offloads_what_it_does_not_project) {
    char ssd[400], data[300], folder[300], out[400];
    snprintf(ssd, sizeof ssd, "%s/ssd-galore", dir);
    data_and_model(data, folder);
    // clang-format off
    const char *const galore[] = {"optim.kind", "galore", "optim.grad_clip", "0", "galore.rank", "2",
                                  "galore.update_gap", "3", NULL};
    const char *const off_cpu[] = {"optim.kind", "galore", "optim.grad_clip", "0", "galore.rank", "2",
                                   "galore.update_gap", "3", "offload.optimizer", "cpu", NULL};
    const char *const off_ssd[] = {"optim.kind", "galore", "optim.grad_clip", "0", "galore.rank", "2",
                                   "galore.update_gap", "3", "offload.optimizer", "ssd", "offload.path", ssd, NULL};
    // clang-format on
    double base[12], cpu[12], file[12];
    train_losses("galore", galore, base);
    train_losses("galore-cpu", off_cpu, cpu);
    train_losses("galore-ssd", off_ssd, file);
    for (int i = 0; i < 12; i++) {
        ck_assert_msg(fabs(cpu[i] - base[i]) <= 1e-5 * fabs(base[i]), "step %d: %.9g vs %.9g", i + 1, cpu[i], base[i]);
        ck_assert_msg(file[i] == cpu[i], "step %d: ssd %.17g vs cpu %.17g", i + 1, file[i], cpu[i]);
    }
    ck_assert_msg(base[11] < base[0], "loss %g -> %g", base[0], base[11]);
    // stop after 5 steps on the SSD store, go on from the checkpoint: on the
    // host store (bit-identical), and without offload (to rounding)
    mt_config cfg;
    mt_train_result r;
    for (int resume_with = 0; resume_with < 2; resume_with++) {
        snprintf(out, sizeof out, "%s/galore-split-%d", dir, resume_with);
        run_config(&cfg, folder, data, out, off_ssd);
        ck_assert_int_eq(mt_config_set(&cfg, "train.stop_after", "5", "t"), MT_OK);
        ck_assert_msg(mt_train(&cfg, &r) == MT_OK, "%s", mt_last_error());
        ck_assert_int_eq(r.steps_done, 5);
        mt_config_free(&cfg);
        run_config(&cfg, folder, data, out, resume_with ? galore : off_cpu);
        ck_assert_int_eq(mt_config_set(&cfg, "train.resume", "auto", "t"), MT_OK);
        ck_assert_msg(mt_train(&cfg, &r) == MT_OK, "%s", mt_last_error());
        ck_assert_int_eq(r.steps_done, 12);
        mt_config_free(&cfg);
        double split[12];
        ck_assert_int_eq(tu_read_losses(out, split, 12), 12);
        for (int i = 0; i < 12; i++)
            if (resume_with == 0)
                ck_assert_msg(split[i] == cpu[i], "resumed step %d: %.17g vs %.17g", i + 1, split[i], cpu[i]);
            else
                ck_assert_msg(fabs(split[i] - cpu[i]) <= 1e-5 * fabs(cpu[i]),
                              "resumed without offload, step %d: %.9g "
                              "vs %.9g",
                              i + 1, split[i], cpu[i]);
    }
    snprintf(out, sizeof out, "%s/galore-cpu", dir);
    char cmd[1400];
    snprintf(cmd, sizeof cmd, "cmp -s %s/model/model.safetensors %s/galore-split-0/model/model.safetensors", out, dir);
    ck_assert_int_eq(system(cmd), 0);
}
END_TEST

// offload.moments int8: a run follows the fp32-moments run within the 8-bit
// moments' rounding (and learns), holds 6 bytes of state a parameter
// instead of 12, and stopped and resumed it is the uninterrupted run bit
// for bit (its checkpoints keep the decoded moments, which encode back to
// the same codes); with the SSD tier the same run, bit for bit, which
// resumes as well, also from a checkpoint of the run in host memory.
START_TEST(int8_moments_follow_fp32_and_resume_bit_identically) {
    const char *const fp32[] = {"offload.optimizer", "cpu", NULL};
    const char *const int8[] = {"offload.optimizer", "cpu", "offload.moments", "int8", NULL};
    double a[12], b[12];
    train_losses("moments-fp32", fp32, a);
    train_losses("moments-int8", int8, b);
    double worst = 0;
    for (int i = 0; i < 12; i++) worst = fmax(worst, fabs(b[i] - a[i]) / fabs(a[i]));
    printf("int8 moments: worst relative loss difference to fp32 moments over 12 steps %.3g (%.4f -> %.4f)\n", worst,
           b[0], b[11]);
    ck_assert_msg(worst > 0 && worst < 2e-2, "int8 vs fp32 moments: worst relative difference %g", worst);
    ck_assert(b[11] < b[0]);
    resumed_equals_whole("int8", int8);
    // with offload.ratio 0.5 the store's half keeps 8-bit moments (its quantization segments start at the
    // split): between the fp32 run and the fully 8-bit one, and it resumes bit for bit
    const char *const half[] = {"offload.optimizer", "cpu", "offload.moments", "int8", "offload.ratio", "0.5", NULL};
    double h[12];
    train_losses("moments-int8-half", half, h);
    double to_fp32 = 0;
    for (int i = 0; i < 12; i++) to_fp32 = fmax(to_fp32, fabs(h[i] - a[i]) / fabs(a[i]));
    ck_assert_msg(to_fp32 > 0 && to_fp32 < 2e-2, "int8 moments, ratio 0.5, vs fp32: worst relative difference %g",
                  to_fp32);
    ck_assert_msg(memcmp(h, b, sizeof h) != 0, "ratio 0.5 with int8 moments gave the fully offloaded run's losses");
    resumed_equals_whole("int8-half", half);
    char ssd[400];
    snprintf(ssd, sizeof ssd, "%s/ssd-int8", dir);
    const char *const on_disk[] = {"offload.optimizer", "ssd", "offload.path", ssd, "offload.moments", "int8", NULL};
    double d[12];
    train_losses("moments-int8-ssd", on_disk, d);
    for (int i = 0; i < 12; i++)
        ck_assert_msg(d[i] == b[i], "int8 moments on disk, step %d: %.17g vs in host memory %.17g", i + 1, d[i], b[i]);
    resumed_equals_whole("int8-ssd", on_disk);
    // a run stopped with its moments' codes in host memory (the checkpoint keeps them as codes) resumes with
    // them on disk, and goes on as the uninterrupted run in host memory did
    char data[300], folder[300], split[300], whole[300];
    data_and_model(data, folder);
    snprintf(split, sizeof split, "%s/int8-cpu-then-ssd", dir);
    snprintf(whole, sizeof whole, "%s/moments-int8", dir);
    for (int part = 0; part < 2; part++) {
        mt_config cfg;
        mt_train_result r;
        run_config(&cfg, folder, data, split, part ? on_disk : int8);
        ck_assert_int_eq(mt_config_set(&cfg, part ? "train.resume" : "train.stop_after", part ? "auto" : "5", "t"),
                         MT_OK);
        ck_assert_msg(mt_train(&cfg, &r) == MT_OK, "int8, host memory then disk: %s", mt_last_error());
        mt_config_free(&cfg);
    }
    tu_assert_same_losses(whole, split, 12, NULL);
}
END_TEST

// One step of the offload API on the CPU backend for
// delayed_update_takes_each_gradient_two_steps_back: three parameters, each
// its own bucket, handed over in backward order, each gradient 2 (w - target)
// from the weights as they are when it is taken.
static double delayed_step(mt_offload *o, float *weights, const float *target, float *grad, const size_t *offs,
                           const size_t *counts, int n, float lr) {
    mt_offload_begin_step(o, lr);
    for (int p = n - 1; p >= 0; p--) {
        for (size_t i = offs[p]; i < offs[p] + counts[p]; i++) grad[i] = 2.0f * (weights[i] - target[i]);
        mt_offload_grad(o, p, grad + offs[p]);
    }
    double norm;
    int finite;
    ck_assert_int_eq(mt_offload_end_step(o, &norm, &finite), MT_OK);
    ck_assert(finite);
    return norm;
}

// offload.delay on the CPU backend, through the offload API alone, on a
// model whose gradient says which weights it was taken at. With delay, step
// s's gradient must be taken at the master after s - 2 updates (the first
// two at the initial weights), and the weights must follow the master one
// update behind, also after mt_offload_sync; without, after s updates. The
// reference is AdamW over plain arrays with the same CPU kernel, the same
// per-bucket sums and clip factor: bit for bit, with and without clipping.
// Then a second offload built from the first's state and weights (a resume,
// with mt_offload_set_pending) takes the next steps as the first does.
START_TEST(delayed_update_takes_each_gradient_two_steps_back) {
    enum { kSteps = 6, kParams = 3 };
    const size_t counts[kParams] = {37, 100, 5};
    size_t offs[kParams];
    mt_offload_param params[kParams];
    size_t total = tu_delay_params(counts, kParams, params, offs);
    float *init = malloc(total * 4), *target = malloc(total * 4), *weights = malloc(total * 4);
    float *grad = malloc(total * 4), *ref_g = malloc(total * 4), *weights2 = malloc(total * 4);
    float *master = malloc(total * 4), *m = calloc(total, 4), *v = calloc(total, 4);
    float *seen = malloc(total * 4);  // the weights the reference's next gradient is taken at
    float *state = malloc(3 * total * 4);
    for (size_t i = 0; i < total; i++) init[i] = mt_rng_normal(11, i), target[i] = mt_rng_normal(12, i);
    mt_backend cpu;
    mt_backend_init(&cpu, -1);
    for (int variant = 0; variant < 4; variant++) {
        int delay = variant & 1;
        float clip = variant >> 1 ? 0.5f : 0.0f, lr = 0.05f, wd = 0.1f;
        mt_offload_config oc = tu_delay_config(wd, clip, 1, delay);
        memcpy(weights, init, total * 4), memcpy(master, init, total * 4), memcpy(seen, init, total * 4);
        memset(m, 0, total * 4), memset(v, 0, total * 4);
        mt_offload *o;
        ck_assert_int_eq(mt_offload_init(&o, &cpu, &oc, params, kParams, total, weights, init, NULL, NULL, 0), MT_OK);
        for (int s = 1; s <= kSteps; s++) {
            double norm = delayed_step(o, weights, target, grad, offs, counts, kParams, lr);
            // the reference: the gradient at `seen`, then its step
            for (size_t i = 0; i < total; i++) ref_g[i] = 2.0f * (seen[i] - target[i]);
            double ref =
                tu_delay_reference_step(params, kParams, ref_g, 0, s, lr, wd, clip, delay, master, m, v, seen, total);
            ck_assert_msg(ref == norm, "variant %d step %d: norm %.17g, reference %.17g", variant, s, norm, ref);
            // the model's weights: the master one update behind with delay (s - 1 updates), else all s
            ck_assert_msg(memcmp(weights, seen, total * 4) == 0, "variant %d (delay %d, clip %g) step %d: weights",
                          variant, delay, clip, s);
        }
        ck_assert_int_eq(mt_offload_sync(o), MT_OK);
        ck_assert_msg(memcmp(weights, seen, total * 4) == 0, "variant %d: sync moved the weights", variant);
        ck_assert_int_eq(mt_offload_read_state(o, state, state + total, state + 2 * total), MT_OK);
        ck_assert(memcmp(state, master, total * 4) == 0);
        if (delay) {  // a resume from this state and these weights continues as the first offload does
            memcpy(weights2, weights, total * 4);
            mt_offload *o2;
            ck_assert_int_eq(mt_offload_init(&o2, &cpu, &oc, params, kParams, total, weights2, state, state + total,
                                             state + 2 * total, kSteps),
                             MT_OK);
            ck_assert_int_eq(mt_offload_set_pending(o2), MT_OK);
            for (int s = kSteps + 1; s <= kSteps + 3; s++) {
                double n1 = delayed_step(o, weights, target, grad, offs, counts, kParams, lr);
                double n2 = delayed_step(o2, weights2, target, grad, offs, counts, kParams, lr);
                ck_assert_msg(n1 == n2 && memcmp(weights, weights2, total * 4) == 0,
                              "variant %d step %d: the resumed offload differs", variant, s);
            }
            mt_offload_free(o2);
        }
        mt_offload_free(o);
    }
    mt_backend_free(&cpu);
    free(init), free(target), free(weights), free(grad), free(ref_g), free(master), free(m), free(v), free(seen);
    free(weights2), free(state);
}
END_TEST

// offload.delay in a training run: it trains (the loss falls), differs from the exact run after step 1, and
// a run stopped and resumed is the uninterrupted one (the checkpoint keeps the delayed weights)
START_TEST(delayed_update_trains_and_resumes_bit_identically) {
    const char *const exact[] = {"offload.optimizer", "cpu", NULL};
    const char *const delayed[] = {"offload.optimizer", "cpu", "offload.delay", "1", NULL};
    double a[12], b[12], c[12], d[12];
    train_losses("exact", exact, a);
    train_losses("delayed", delayed, b);
    // with offload.ratio the first units update at once, the store's one step late: neither run's losses
    const char *const half_exact[] = {"offload.optimizer", "cpu", "offload.ratio", "0.5", NULL};
    const char *const half_delayed[] = {"offload.optimizer", "cpu", "offload.ratio", "0.5", "offload.delay", "1", NULL};
    train_losses("half-exact", half_exact, c);
    train_losses("half-delayed", half_delayed, d);
    ck_assert_msg(d[0] == c[0], "ratio 0.5: step 1 sees the initial weights either way: %.17g vs %.17g", d[0], c[0]);
    ck_assert_msg(d[1] != c[1] && d[11] != c[11], "ratio 0.5: offload.delay changed nothing");
    ck_assert_msg(d[1] != b[1] && d[11] != b[11], "ratio 0.5 with offload.delay: the fully delayed run's losses");
    ck_assert_msg(d[11] < d[0], "ratio 0.5, offload.delay: loss %g -> %g", d[0], d[11]);
    // (nearer the exact run than delaying every unit)
    printf("offload.ratio 0.5, offload.delay 1: losses %.5f -> %.5f (exact %.5f, every unit delayed %.5f)\n", d[0],
           d[11], c[11], b[11]);
    resumed_equals_whole("half-delayed", half_delayed);
    ck_assert_msg(a[0] == b[0], "step 1 sees the initial weights either way: %.17g vs %.17g", a[0], b[0]);
    ck_assert_msg(b[1] != a[1] && b[11] != a[11], "offload.delay changed nothing");
    ck_assert_msg(b[11] < b[0], "offload.delay: loss %g -> %g", b[0], b[11]);
    printf("offload.delay 1: losses %.5f -> %.5f (exact %.5f -> %.5f)\n", b[0], b[11], a[0], a[11]);
    resumed_equals_whole("delayed", delayed);
    // adapters (handed over after backward), likewise
    const char *const delayed_lora[] = {
        "offload.optimizer", "cpu", "offload.delay", "1", "lora.r", "4", "lora.dropout", "0", NULL};
    resumed_equals_whole("delayed-lora", delayed_lora);
}
END_TEST

// A checkpoint of an offloaded full fine-tune written in place
// (checkpoint.async false) is read straight from the store a chunk at a
// time, with no host copy of the state (its log line says so): it holds
// what a background write's copy holds (the saved model byte for byte), and
// a run resumed from it is the uninterrupted one; for fp32 and int8
// moments in host memory, for the SSD tier, and with offload.delay (its
// weights, one update behind, read from the model a chunk at a time), also
// with int8 moments; int8 moments are kept as codes (expect_coded_moments). The
// wide model (an 80000-token vocabulary: 2.56M parameters, its embedding
// and head 1.28M each) is larger than the reader's 2M-value window of the
// store, and its embedding and head take two of the writer's 1M-value
// chunks each: the window moves, over int8 moments' quantization blocks.
static const char kWideLlamaJson[] =
    "{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":80000,\"hidden_size\":16,\"intermediate_size\":24,"
    "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"num_key_value_heads\":2,\"rms_norm_eps\":1e-5,"
    "\"rope_theta\":10000.0,\"tie_word_embeddings\":false,\"torch_dtype\":\"float32\"}";

// Sends this process's stderr (the runs' logs) into the file `log` until
// stderr_back(the returned descriptor).
static int stderr_to(const char *log) {
    fflush(stderr);
    int saved = dup(2), fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ck_assert(saved >= 0 && fd >= 0 && dup2(fd, 2) >= 0);
    close(fd);
    return saved;
}

static void stderr_back(int saved) {
    fflush(stderr);
    dup2(saved, 2), close(saved);
}

static off_t file_size(const char *path) {
    struct stat st;
    ck_assert_msg(stat(path, &st) == 0, "%s", path);
    return st.st_size;
}

// An offloaded run with int8 moments keeps each parameter's moments in its
// checkpoint as the store holds them (exp_avg_q8, exp_avg_sq_q8 and the
// blocks' absmax), with no fp32 copy; read back a range at a time, cut
// anywhere (within parameters and quantization blocks), they equal one read
// of the whole block, and they are not all zero.
static void expect_coded_moments(const char *ckpt, const char *model_dir) {
    mt_model_config mc;
    ck_assert_int_eq(mt_hf_read_config(model_dir, &mc), MT_OK);
    int n;
    size_t total;
    mt_param_info *table = mt_model_param_table(&mc, &n, &total);
    char path[1400], name[400];
    snprintf(path, sizeof path, "%s/state.h5", ckpt);
    hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    ck_assert_msg(file >= 0, "%s", path);
    for (int i = 0; i < n; i++) {
        static const char *const kept[] = {"exp_avg_q8", "exp_avg_sq_q8", "exp_avg_absmax", "exp_avg_sq_absmax"};
        for (int j = 0; j < 4; j++) {
            snprintf(name, sizeof name, "optimizer/%s/%s", table[i].name, kept[j]);
            ck_assert_msg(H5Lexists(file, name, H5P_DEFAULT) > 0, "%s: no %s", path, name);
        }
        snprintf(name, sizeof name, "optimizer/%s/exp_avg", table[i].name);
        ck_assert_msg(H5Lexists(file, name, H5P_DEFAULT) <= 0, "%s: fp32 moments %s beside the codes", path, name);
    }
    H5Fclose(file);
    float *m = malloc(total * 4), *v = malloc(total * 4), *m2 = malloc(total * 4), *v2 = malloc(total * 4);
    mt_checkpoint_meta meta;
    ck_assert_int_eq(mt_checkpoint_read(ckpt, &mc, NULL, NULL, 0, total, m, v, &meta), MT_OK);
    for (size_t lo = 0, k = 0; lo < total; k++) {
        size_t hi = lo + 300 + 97 * (k % 11);
        if (hi > total) hi = total;
        ck_assert_int_eq(mt_checkpoint_read(ckpt, &mc, NULL, NULL, lo, hi, m2 + lo, v2 + lo, &meta), MT_OK);
        lo = hi;
    }
    ck_assert_msg(memcmp(m, m2, total * 4) == 0 && memcmp(v, v2, total * 4) == 0,
                  "%s: moments read in pieces differ from one read", ckpt);
    size_t nonzero = 0;
    for (size_t i = 0; i < total; i++) nonzero += m[i] != 0.0f && v[i] > 0.0f;
    ck_assert_msg(nonzero > total / 2, "%s: %zu of %zu moments non-zero", ckpt, nonzero, total);
    free(m), free(v), free(m2), free(v2), free(table);
}

START_TEST(checkpoints_written_from_the_store_resume_bit_identically) {
    char ssd[400], data[300], folder[300], wide[300], copied[300], log[300], a[1400], b[3000];
    snprintf(ssd, sizeof ssd, "%s/ssd-stream", dir);
    data_and_model(data, folder);
    tu_model_folder(dir, "wide", kWideLlamaJson, wide, sizeof wide);
    // clang-format off
    const char *const variants[][8] = {
        {"offload.optimizer", "cpu", NULL},
        {"offload.optimizer", "cpu", "offload.moments", "int8", NULL},
        {"offload.optimizer", "ssd", "offload.path", ssd, NULL},
        {"offload.optimizer", "cpu", "offload.delay", "1", NULL},
        {"offload.optimizer", "cpu", "offload.moments", "int8", "model.path", wide, NULL},
        {"offload.optimizer", "cpu", "offload.moments", "int8", "offload.delay", "1", NULL},
    };
    // clang-format on
    for (size_t k = 0; k < sizeof variants / sizeof *variants; k++) {
        const char *in_place[12];
        int n = 0;
        while (variants[k][n]) in_place[n] = variants[k][n], n++;
        in_place[n] = "checkpoint.async", in_place[n + 1] = "false", in_place[n + 2] = NULL;
        char name[32];
        snprintf(name, sizeof name, "stream-%zu", k);
        // the log of the three runs (whole, stopped, resumed) into a file
        snprintf(log, sizeof log, "%s/%s.log", dir, name);
        int saved = stderr_to(log);
        resumed_equals_whole(name, in_place);
        stderr_back(saved);
        snprintf(a, sizeof a, "grep -q 'step-00000005 (.*read straight from the offload store' %s", log);
        ck_assert_msg(system(a) == 0, "%s: the stopped run's checkpoint was not read from the store (%s)", name, log);
        // the same stop, written in the background (from a snapshot of a host-memory store, or from a host
        // copy with the SSD tier and offload.delay)
        snprintf(copied, sizeof copied, "%s/%s-copied", dir, name);
        mt_config cfg;
        mt_train_result r;
        run_config(&cfg, folder, data, copied, variants[k]);
        ck_assert_int_eq(mt_config_set(&cfg, "train.stop_after", "5", "t"), MT_OK);
        ck_assert_msg(mt_train(&cfg, &r) == MT_OK, "%s: %s", name, mt_last_error());
        mt_config_free(&cfg);
        snprintf(a, sizeof a, "%s/%s-split/checkpoints/step-00000005/model/model.safetensors", dir, name);
        snprintf(b, sizeof b, "cmp -s %s %s/checkpoints/step-00000005/model/model.safetensors", a, copied);
        ck_assert_msg(system(b) == 0, "%s: the checkpoint read from the store differs from the copied one", name);
        if (k == 1 || k == 4 || k == 5) {  // int8 moments: codes in place, and from the snapshot (not with delay)
            const char *model_dir = k == 4 ? wide : folder;
            snprintf(a, sizeof a, "%s/%s-split/checkpoints/step-00000005", dir, name);
            expect_coded_moments(a, model_dir);
            snprintf(a, sizeof a, "%s/checkpoints/step-00000005", copied);
            if (k != 5) expect_coded_moments(a, model_dir);
        }
    }
    // the wide model's state.h5 with codes: about 2 bytes a parameter (fp32 moments take 8)
    mt_model_config mc;
    ck_assert_int_eq(mt_hf_read_config(wide, &mc), MT_OK);
    int n;
    size_t total;
    free(mt_model_param_table(&mc, &n, &total));
    snprintf(a, sizeof a, "%s/stream-4-split/checkpoints/step-00000005/state.h5", dir);
    off_t codes = file_size(a);
    printf("state.h5 with int8 moments: %lld bytes for %zu parameters\n", (long long)codes, total);
    ck_assert_msg(codes < 3 * (off_t)total, "int8 moments' state.h5 %lld bytes for %zu parameters", (long long)codes,
                  total);
}
END_TEST

// A background checkpoint of an offloaded full fine-tune with its state in
// host memory (fp32 and int8 moments) is written from a snapshot of the
// store (its log says so) while the next steps change the store: with its
// writer held back until two more steps have run (mt_run_state_delay_writes),
// the checkpoint still holds its own step's state, and a run resumed from it
// is the uninterrupted one.
START_TEST(background_checkpoints_write_a_snapshot_of_the_store) {
    char data[300], folder[300], whole[300], run[300], log[400], cmd[1400], from[400];
    data_and_model(data, folder);
    const char *const variants[][6] = {{"offload.optimizer", "cpu", NULL},
                                       {"offload.optimizer", "cpu", "offload.moments", "int8", NULL}};
    for (int k = 0; k < 2; k++) {
        char name[32];
        double losses[12];
        snprintf(name, sizeof name, "snapshot-%d-whole", k);
        train_losses(name, variants[k], losses);
        snprintf(whole, sizeof whole, "%s/%s", dir, name);
        snprintf(run, sizeof run, "%s/snapshot-%d", dir, k);
        snprintf(log, sizeof log, "%s/snapshot-%d.log", dir, k);
        mt_config cfg;
        mt_train_result r;
        // checkpoints at 4 (in the background, written after steps 5 and 6) and 6 (the stop)
        run_config(&cfg, folder, data, run, variants[k]);
        ck_assert_int_eq(mt_config_set(&cfg, "checkpoint.every", "4", "t"), MT_OK);
        ck_assert_int_eq(mt_config_set(&cfg, "checkpoint.keep", "3", "t"), MT_OK);
        ck_assert_int_eq(mt_config_set(&cfg, "train.stop_after", "6", "t"), MT_OK);
        int saved = stderr_to(log);
        mt_run_state_delay_writes(0.3);
        mt_err err = mt_train(&cfg, &r);
        mt_run_state_delay_writes(0);
        stderr_back(saved);
        ck_assert_msg(err == MT_OK, "%s", mt_last_error());
        mt_config_free(&cfg);
        snprintf(cmd, sizeof cmd, "grep -q 'step 4 copied from the offload store in' %s", log);
        ck_assert_msg(system(cmd) == 0, "variant %d: the checkpoint of step 4 was not a snapshot (%s)", k, log);
        // resumed from step 4's checkpoint (step 6's stays): the uninterrupted run's losses
        snprintf(from, sizeof from, "%s/checkpoints/step-00000004", run);
        run_config(&cfg, folder, data, run, variants[k]);
        ck_assert_int_eq(mt_config_set(&cfg, "train.resume", from, "t"), MT_OK);
        ck_assert_msg(mt_train(&cfg, &r) == MT_OK, "%s", mt_last_error());
        ck_assert_int_eq(r.steps_done, 12);
        mt_config_free(&cfg);
        tu_assert_same_losses(whole, run, 12, NULL);
    }
}
END_TEST

// offload.optimizer cpu with key = value, and refusals[k]'s key = value on
// top (the first, GaLore, without clipping): refused by validation, the
// error naming refusals[k][2], and for the first `named` of them `fix` too.
static void expect_offload_refusals(const char *folder, const char *data, const char *out, const char *key,
                                    const char *value, const char *const (*refusals)[3], int n, int named,
                                    const char *fix) {
    for (int k = 0; k < n; k++) {
        mt_config cfg;
        run_config(&cfg, folder, data, out, NULL);
        ck_assert_int_eq(mt_config_set(&cfg, "offload.optimizer", "cpu", "t"), MT_OK);
        ck_assert_int_eq(mt_config_set(&cfg, key, value, "t"), MT_OK);
        if (k == 0) ck_assert_int_eq(mt_config_set(&cfg, "optim.grad_clip", "0", "t"), MT_OK);
        ck_assert_int_eq(mt_config_set(&cfg, refusals[k][0], refusals[k][1], "t"), MT_OK);
        tu_expect_error(mt_config_validate(&cfg), MT_ERR_CONFIG, refusals[k][2]);
        if (k < named) ck_assert_msg(strstr(mt_last_error(), fix), "%s", mt_last_error());
        mt_config_free(&cfg);
    }
}

START_TEST(offload_config_errors_name_the_fix) {
    char data[300], folder[300], out[300];
    data_and_model(data, folder);
    snprintf(out, sizeof out, "%s/bad", dir);
    mt_config cfg;
    mt_train_result r;
    run_config(&cfg, folder, data, out, NULL);
    ck_assert_int_eq(mt_config_set(&cfg, "offload.optimizer", "ssd", "t"), MT_OK);
    tu_expect_error(mt_config_validate(&cfg), MT_ERR_CONFIG, "offload.path");
    ck_assert_int_eq(mt_config_set(&cfg, "offload.path", "/proc/memtune-cannot-be-here", "t"), MT_OK);
    tu_expect_error(mt_train(&cfg, &r), MT_ERR_IO, "offload.path");
    ck_assert_int_eq(mt_config_set(&cfg, "optim.kind", "mezo", "t"), MT_OK);
    tu_expect_error(mt_config_validate(&cfg), MT_ERR_CONFIG, "optim.kind: adamw or galore");
    mt_config_free(&cfg);
    run_config(&cfg, folder, data, out, NULL);
    ck_assert_int_eq(mt_config_set(&cfg, "offload.threads", "2", "t"), MT_OK);
    tu_expect_error(mt_config_validate(&cfg), MT_ERR_CONFIG, "offload.optimizer: cpu or ssd");
    mt_config_free(&cfg);
    // model.weights ssd: needs offload.path (the only offload key it takes without offload.optimizer), and a
    // folder it can create its file in
    run_config(&cfg, folder, data, out, NULL);
    ck_assert_int_eq(mt_config_set(&cfg, "lora.r", "4", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "model.weights", "ssd", "t"), MT_OK);
    tu_expect_error(mt_config_validate(&cfg), MT_ERR_CONFIG, "model.weights ssd needs offload.path");
    ck_assert_int_eq(mt_config_set(&cfg, "offload.path", "/proc/memtune-cannot-be-here", "t"), MT_OK);
    ck_assert_int_eq(mt_config_validate(&cfg), MT_OK);
    tu_expect_error(mt_train(&cfg, &r), MT_ERR_IO, "/proc/memtune-cannot-be-here");
    ck_assert_msg(strstr(mt_last_error(), "offload.path"), "%s", mt_last_error());
    ck_assert_int_eq(mt_config_set(&cfg, "offload.io_threads", "2", "t"), MT_OK);
    tu_expect_error(mt_config_validate(&cfg), MT_ERR_CONFIG, "except offload.path");
    mt_config_free(&cfg);
    // a full fine-tune keeping AdamW's state on the GPU: refused, naming the value it was given
    run_config(&cfg, folder, data, out, NULL);
    ck_assert_int_eq(mt_config_set(&cfg, "model.weights", "ssd", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "offload.path", dir, "t"), MT_OK);
    tu_expect_error(mt_config_validate(&cfg), MT_ERR_CONFIG, "model.weights: ssd with a full fine-tune");
    mt_config_free(&cfg);
    // model.resident_layers: nothing to keep with the base on the GPU, and not for a full fine-tune (its
    // offloaded optimizer updates the layers in host memory)
    run_config(&cfg, folder, data, out, NULL);
    ck_assert_int_eq(mt_config_set(&cfg, "lora.r", "4", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "model.resident_layers", "1", "t"), MT_OK);
    tu_expect_error(mt_config_validate(&cfg), MT_ERR_CONFIG, "model.weights is gpu: every layer is on the GPU");
    ck_assert_int_eq(mt_config_set(&cfg, "model.weights", "cpu", "t"), MT_OK);
    ck_assert_int_eq(mt_config_validate(&cfg), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "lora.r", "0", "t"), MT_OK);
    ck_assert_int_eq(mt_config_set(&cfg, "offload.optimizer", "cpu", "t"), MT_OK);
    tu_expect_error(mt_config_validate(&cfg), MT_ERR_CONFIG, "set model.resident_layers: 0");
    mt_config_free(&cfg);
    // offload.delay where it is not built: GaLore, ZeRO, streamed weights
    const char *const delay_refusals[][3] = {{"optim.kind", "galore", "optim.kind galore"},
                                             {"dist.zero_stage", "1", "dist.zero_stage above 0"},
                                             {"model.weights", "cpu", "streamed (model.weights)"}};
    expect_offload_refusals(folder, data, out, "offload.delay", "1", delay_refusals, 3, 3, "set offload.delay: 0");
    // offload.ratio below 1 where it is not built, at 0, and without offload
    const char *const ratio_refusals[][3] = {{"optim.kind", "galore", "optim.kind galore"},
                                             {"lora.r", "4", "LoRA's adapters"},
                                             {"dist.zero_stage", "1", "dist.zero_stage above 0"},
                                             {"model.weights", "cpu", "streamed (model.weights)"},
                                             {"offload.ratio", "0", "set offload.optimizer: none"},
                                             {"offload.optimizer", "none", "need offload.optimizer: cpu or ssd"}};
    expect_offload_refusals(folder, data, out, "offload.ratio", "0.5", ratio_refusals, 6, 4, "set offload.ratio: 1");
    // auto on the CPU backend: resident
    run_config(&cfg, folder, data, out, NULL);
    ck_assert_int_eq(mt_config_set(&cfg, "model.weights", "auto", "t"), MT_OK);
    ck_assert_int_eq(mt_forecast_weights_auto(&cfg, 0, 1), MT_OK);
    ck_assert_str_eq(cfg.model_weights, "gpu");
    mt_config_free(&cfg);
}
END_TEST

int main(void) {
    tu_tempdir(dir, sizeof dir);
    Suite *s = suite_create("offload");
    TCase *tc = tcase_create("offload");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, cpu_adam_equals_the_reference_bit_for_bit);
    tcase_add_test(tc, int8_encoder_equals_the_reference);
    tcase_add_test(tc, divide_equals_a_division);
    tcase_add_test(tc, sumsq_is_the_same_for_any_thread_count);
    tcase_add_test(tc, accumulate_sums_micro_batches_in_fp32);
    tcase_add_test(tc, host_sum_fits_below_85_percent_of_the_node);
    tcase_add_test(tc, auto_threads_share_the_node_or_follow_the_binding);
    tcase_add_test(tc, crc32c_known_answer_and_continuation);
    tcase_add_test(tc, store_round_trip_is_bit_exact_at_odd_sizes);
    tcase_add_test(tc, store_errors_are_clear_and_values);
    tcase_add_test(tc, store_larger_than_the_disk_is_refused);
    tcase_add_test(tc, store_int8_moments_quantize_by_segment);
    tcase_add_test(tc, store_update_pieces_equal_windows);
    tcase_add_test(tc, store_snapshot_keeps_the_state_it_was_taken_at);
    tcase_add_test(tc, offloaded_runs_follow_the_run_without_offload);
    tcase_add_test(tc, ratio_splits_the_state_at_whole_units);
    tcase_add_test(tc, budget_keeps_what_fits_of_the_state_on_the_gpu);
    tcase_add_test(tc, host_check_refuses_what_host_memory_cannot_hold);
    tcase_add_test(tc, ratio_keeps_the_first_units_on_the_backend);
    tcase_add_test(tc, ssd_offload_resumes_bit_identically);
    tcase_add_test(tc, streamed_weights_runs_equal_resident_runs);
    tcase_add_test(tc, a_full_disk_mid_run_leaves_the_last_checkpoint_whole);
    tcase_add_test(tc, checkpoints_written_from_the_store_resume_bit_identically);
    tcase_add_test(tc, background_checkpoints_write_a_snapshot_of_the_store);
    tcase_add_test(tc, galore_offloads_what_it_does_not_project);
    tcase_add_test(tc, offload_config_errors_name_the_fix);
    tcase_add_test(tc, int8_moments_follow_fp32_and_resume_bit_identically);
    tcase_add_test(tc, delayed_update_takes_each_gradient_two_steps_back);
    tcase_add_test(tc, delayed_update_trains_and_resumes_bit_identically);
    suite_add_tcase(s, tc);
    return tu_run_suite(s, 0);
}
