// bench/cpu_adam_bench.c: throughput of memtune's CPU AdamW (offload/
// cpu_adam.h) in parameters per second, on every instruction path this
// processor has, with fp32 or bf16 gradients (bf16 weights written back, as
// the offloaded step does), at the thread counts given. Prints one JSON line
// per case; bench/offload.py sets it beside torch's CPU AdamW. Then one pass
// of the offloaded step's store (fp32 moments, int8 moments) at the last
// thread count, best of the repeats.
//   mt_cpu_adam_bench [parameters (M)] [repeats] [threads,threads,...]
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/common.h"
#include "kernels/dtype.h"
#include "offload/cpu_adam.h"
#include "offload/store.h"

// A piece of a store block's update (mt_store_update_pieces), as offload.c's.
typedef struct {
    const mt_cpu_adam_step *s;
    const mt_store_block *b;
    const uint16_t *gh;
    uint16_t *out;
} store_piece;

static void update_piece(void *ctx, size_t lo, size_t hi, float *m, float *v) {
    const store_piece *p = ctx;
    mt_cpu_adam_update(mt_cpu_adam_best_path(), p->s, p->b->master + (lo - p->b->offset), m, v, p->gh + lo, 1,
                       p->out + lo, hi - lo);
}

int main(int argc, char **argv) {
    size_t n = (size_t)((argc > 1 ? atof(argv[1]) : 256.0) * 1e6);
    int repeats = argc > 2 ? atoi(argv[2]) : 5;
    const char *thread_list = argc > 3 ? argv[3] : "";
    float *master = malloc(n * 4), *m = malloc(n * 4), *v = malloc(n * 4), *g = malloc(n * 4);
    uint16_t *gh = malloc(n * 2), *out = malloc(n * 2);
    if (!master || !m || !v || !g || !gh || !out) {
        fprintf(stderr, "out of memory for %zu parameters\n", n);
        return 1;
    }
#pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        master[i] = (float)(i % 1000) * 1e-3f - 0.5f;
        m[i] = 0.0f;
        v[i] = 0.0f;
        g[i] = (float)((i * 7919) % 2001) * 1e-3f - 1.0f;
        gh[i] = mt_f32_to_bf16(g[i]);
    }
    int counts[16], n_counts = 0;
    for (const char *p = thread_list; *p && n_counts < 16;) {
        counts[n_counts++] = atoi(p);
        p = strchr(p, ',');
        if (!p) break;
        p++;
    }
    if (n_counts == 0) counts[n_counts++] = omp_get_max_threads();
    for (int c = 0; c < n_counts; c++) {
        omp_set_num_threads(counts[c]);
        for (int path = 0; path < MT_CPU_ADAM_NPATHS; path++) {
            if (!mt_cpu_adam_path_available((mt_cpu_adam_path)path)) continue;
            for (int bf16 = 0; bf16 < 2; bf16++) {
                mt_cpu_adam_step s;
                int step = 1;
                mt_cpu_adam_prepare(&s, 1e-4f, 0.9f, 0.95f, 1e-8f, 0.01f, step++, 1.0f);
                mt_cpu_adam_update((mt_cpu_adam_path)path, &s, master, m, v, bf16 ? (void *)gh : (void *)g, bf16, out,
                                   n);
                double t0 = mt_now();
                for (int r = 0; r < repeats; r++) {
                    mt_cpu_adam_prepare(&s, 1e-4f, 0.9f, 0.95f, 1e-8f, 0.01f, step++, 1.0f);
                    mt_cpu_adam_update((mt_cpu_adam_path)path, &s, master, m, v, bf16 ? (void *)gh : (void *)g, bf16,
                                       out, n);
                }
                double dt = (mt_now() - t0) / repeats;
                // bytes moved: master, m, v read and written, the gradient read, the bf16 weight written
                double bytes = (double)n * (24 + (bf16 ? 2 : 4) + 2);
                printf(
                    "{\"impl\":\"memtune\",\"path\":\"%s\",\"grad\":\"%s\",\"threads\":%d,\"params\":%zu,"
                    "\"seconds\":%.5f,\"params_per_second\":%.4g,\"gb_per_second\":%.1f}\n",
                    mt_cpu_adam_path_name((mt_cpu_adam_path)path), bf16 ? "bf16" : "fp32", counts[c], n, dt, n / dt,
                    bytes / dt / 1e9);
                fflush(stdout);
            }
        }
    }
    free(master), free(m), free(v), free(g);
    // the offloaded step's pass over the store (offload/store.h, memory kind): moments in fp32, or int8 codes,
    // bf16 gradients, best path, all threads; each as offload.c runs it (pieces: int8 coded a piece at a time
    // beside the update) and as before (windows: the block decoded, updated and encoded in three passes)
    omp_set_num_threads(counts[n_counts - 1]);
    for (int int8 = 0; int8 < 2; int8++)
        for (int pieces = 1; pieces >= 0; pieces--) {
            size_t segment = 0;
            mt_store_config sc = {MT_STORE_MEMORY, NULL, n, 0, 1, 0, 0, 0, int8, &segment, 1};
            mt_store *st;
            if (mt_store_open(&st, &sc)) {
                fprintf(stderr, "%s\n", mt_last_error());
                return 1;
            }
            double best = 0.0;
            for (int r = 0; r <= repeats; r++) {  // the first pass (pages touched) untimed
                mt_cpu_adam_step s;
                mt_cpu_adam_prepare(&s, 1e-4f, 0.9f, 0.95f, 1e-8f, 0.01f, r + 1, 1.0f);
                double t0 = mt_now();
                mt_store_begin(st, 0, n, pieces ? MT_STORE_UPDATE_PIECES : MT_STORE_UPDATE);
                mt_store_block b;
                while (mt_store_next(st, &b)) {
                    if (pieces) {
                        store_piece ctx = {&s, &b, gh, out};
                        mt_store_update_pieces(st, &b, update_piece, &ctx);
                    } else {
                        mt_cpu_adam_update(mt_cpu_adam_best_path(), &s, b.master, b.m, b.v, gh + b.offset, 1,
                                           out + b.offset, b.count);
                    }
                    mt_store_done(st, &b);
                }
                if (mt_store_end(st)) return 1;
                double dt = mt_now() - t0;
                if (r && (best == 0.0 || dt < best)) best = dt;
            }
            printf(
                "{\"impl\":\"memtune store pass\",\"moments\":\"%s\",\"pass\":\"%s\",\"threads\":%d,\"params\":%zu,"
                "\"seconds\":%.5f,\"params_per_second\":%.4g}\n",
                int8 ? "int8" : "fp32", pieces ? "pieces" : "windows", counts[n_counts - 1], n, best, n / best);
            mt_store_close(st);
        }
    free(gh), free(out);
    return 0;
}
