// bench/sample_bench.c: host time of one sampled token (mt_sample,
// trainer/generate.c) over a vocabulary of V logits drawn from a normal
// distribution times `sharpness` (1: flat, as a random-weight model's; 4 or
// more: peaked, as a trained model's), for temperature alone, top-p, min-p
// and top-k with top-p. Prints one line per case: milliseconds a token
// and a checksum of the ids drawn (equal across builds that draw the same).
//   mt_sample_bench [V] [sharpness] [draws]
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/common.h"
#include "kernels/rng.h"
#include "trainer/generate.h"

int main(int argc, char **argv) {
    int V = argc > 1 ? atoi(argv[1]) : 32000, draws = argc > 3 ? atoi(argv[3]) : 200;
    float sharpness = argc > 2 ? (float)atof(argv[2]) : 1.0f;
    if (V < 1 || draws < 1) {
        fprintf(stderr, "usage: mt_sample_bench [V >= 1] [sharpness] [draws >= 1]\n");
        return 2;
    }
    float *logits = malloc((size_t)V * 4), *work = malloc((size_t)V * 4);
    if (!logits || !work) {
        fprintf(stderr, "out of memory for %d logits\n", V);
        return 1;
    }
    for (int v = 0; v < V; v++) logits[v] = sharpness * mt_rng_normal(1, (uint64_t)v);
    struct {
        const char *name;
        mt_sampling s;
    } cases[] = {{"temperature 1", {1.0f, 0, 1.0f, 0.0f, 1.0f, 7}},
                 {"temperature 0.8, top-p 0.9", {0.8f, 0, 0.9f, 0.0f, 1.0f, 7}},
                 {"temperature 0.8, min-p 0.05", {0.8f, 0, 1.0f, 0.05f, 1.0f, 7}},
                 {"temperature 0.8, top-k 50, top-p 0.9", {0.8f, 50, 0.9f, 0.0f, 1.0f, 7}}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        long long checksum = 0;
        double t0 = mt_now();
        for (int d = 0; d < draws; d++) {
            memcpy(work, logits, (size_t)V * 4);
            checksum += mt_sample(work, V, &cases[c].s, NULL, 0, (uint64_t)d);
        }
        printf("V=%d sharpness %g, %-38s %.3f ms a token (checksum %lld)\n", V, sharpness, cases[c].name,
               (mt_now() - t0) / draws * 1e3, checksum);
    }
    free(logits), free(work);
    return 0;
}
