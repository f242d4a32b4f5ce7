// bench/disk_bench.c: how fast the offload store's file kind (offload.optimizer:
// ssd) moves optimizer state through a folder's disk, with the store's own
// block I/O (O_DIRECT where the filesystem allows, CRC-32C on every block),
// beside what the disk gives plain threads (fio-style: each thread writes,
// then reads, its stripes of 8 MiB blocks of one file with O_DIRECT): a pass
// that only writes (the store being filled), one that only reads (a
// checkpoint read from it) and one that reads, changes and writes back every
// block (an optimizer step's update), at each I/O thread count given. Prints
// one JSON line per count: GB/s of state each way, and parameters a second
// of the update pass. bench/offload.py runs it on offload.path beside its
// ssd runs: a step moves 12 bytes a parameter each way (6 with int8
// moments), so the update pass's rate is the floor of the ssd step. With
// moments int8 (or both) the store keeps 8-bit moments (offload.moments:
// int8), the same parameters (state GiB / 12 of them) in half the bytes, and
// the update pass decodes and encodes them a piece at a time on every core,
// as a step does.
//   mt_disk_bench FOLDER [state GiB] [io_threads,io_threads,...] [fp32|int8|both]
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/common.h"
#include "offload/store.h"

// The update pass's change to a piece: the first value of each (so that
// every block is written back as a step's would be).
static void touch(void *ctx, size_t lo, size_t hi, float *m, float *v) {
    const mt_store_block *b = ctx;
    (void)hi, (void)v;
    b->master[lo - b->offset] += 1.0f;
    m[0] += 1e-9f;
}

// One pass over the whole store; seconds, or a negative number on an error.
static double pass(mt_store *s, mt_store_mode mode) {
    double t0 = mt_now();
    mt_store_begin(s, 0, mt_store_count(s), mode);
    mt_store_block b;
    while (mt_store_next(s, &b)) {
        if (mode == MT_STORE_OVERWRITE) {
            memset(b.master, 0, b.count * sizeof(float));
            memset(b.m, 0, b.count * sizeof(float));
            memset(b.v, 0, b.count * sizeof(float));
        } else if (mode == MT_STORE_UPDATE_PIECES) {
            mt_store_update_pieces(s, &b, touch, &b);
        }
        mt_store_done(s, &b);
    }
    mt_err err = mt_store_end(s);
    if (err) fprintf(stderr, "mt_disk_bench: %s\n", mt_last_error());
    return err ? -1.0 : mt_now() - t0;
}

enum { kRawBlock = 8 << 20 };

typedef struct {
    int fd, thread, threads, writing, failed;
    size_t blocks;
} raw_job;

static void *raw_stripes(void *arg) {
    raw_job *j = arg;
    void *buf = NULL;
    if (posix_memalign(&buf, 4096, kRawBlock)) return j->failed = 1, NULL;
    memset(buf, 0x5a, kRawBlock);
    for (size_t b = (size_t)j->thread; b < j->blocks && !j->failed; b += (size_t)j->threads) {
        off_t at = (off_t)(b * (size_t)kRawBlock);
        ssize_t done = j->writing ? pwrite(j->fd, buf, kRawBlock, at) : pread(j->fd, buf, kRawBlock, at);
        if (done != kRawBlock) j->failed = 1;
    }
    free(buf);
    return NULL;
}

// Plain threads over one file of `bytes` in FOLDER: GB/s written (fsync
// included) and read; 0, 0 when O_DIRECT or the I/O fails.
static void raw_rates(const char *folder, double bytes, int threads, double *write, double *read) {
    char path[4096];
    snprintf(path, sizeof path, "%s/mt-disk-bench-raw.%d", folder, (int)getpid());
    *write = *read = 0;
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_DIRECT, 0600);
    if (fd < 0) return;
    unlink(path);  // gone when closed
    size_t blocks = (size_t)(bytes / kRawBlock);
    raw_job jobs[64];
    pthread_t t[64];
    int n = threads < 64 ? threads : 64, failed = 0;
    for (int writing = 1; writing >= 0 && !failed; writing--) {
        double t0 = mt_now();
        for (int k = 0; k < n; k++) {
            jobs[k] = (raw_job){fd, k, n, writing, 0, blocks};
            pthread_create(&t[k], NULL, raw_stripes, &jobs[k]);
        }
        for (int k = 0; k < n; k++) pthread_join(t[k], NULL), failed |= jobs[k].failed;
        if (writing && fsync(fd) != 0) failed = 1;
        double rate = (double)blocks * kRawBlock / (mt_now() - t0) / 1e9;
        *(writing ? write : read) = failed ? 0 : rate;
    }
    close(fd);
}

int main(int argc, char **argv) {
    const char *moments = argc > 4 ? argv[4] : "fp32";
    if (argc < 2 || (strcmp(moments, "fp32") && strcmp(moments, "int8") && strcmp(moments, "both"))) {
        fprintf(stderr, "usage: mt_disk_bench FOLDER [state GiB] [io_threads,io_threads,...] [fp32|int8|both]\n");
        return 2;
    }
    double gib = argc > 2 ? atof(argv[2]) : 4.0;
    const char *list = argc > 3 ? argv[3] : "1,4,8";
    size_t count = (size_t)(gib * 1073741824.0 / 12.0), seg = 0;  // fp32: master, m, v, 12 bytes a parameter
    for (const char *p = list; p && *p; p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL) {
        int threads = atoi(p);
        double raw_w = 0, raw_r = 0;
        for (int int8 = 0; int8 < 2; int8++) {
            if (!strcmp(moments, int8 ? "fp32" : "int8")) continue;
            mt_store_config c = {MT_STORE_FILE, argv[1], count, 0, 1, 0, threads, 0, int8, &seg, 1};
            mt_store *s = NULL;
            if (mt_store_open(&s, &c)) {
                fprintf(stderr, "mt_disk_bench: %s\n", mt_last_error());
                return 1;
            }
            double bytes = (double)mt_store_file_bytes(s);
            double w = pass(s, MT_STORE_OVERWRITE), r = pass(s, MT_STORE_READ), u = pass(s, MT_STORE_UPDATE_PIECES);
            int direct = mt_store_direct_io(s);
            mt_store_close(s);
            if (w < 0 || r < 0 || u < 0) return 1;
            if (raw_w == 0) raw_rates(argv[1], bytes, threads, &raw_w, &raw_r);
            printf(
                "{\"io_threads\": %d, \"moments\": \"%s\", \"direct_io\": %d, \"state_gib\": %.2f, "
                "\"write_gb_per_s\": %.3f, \"read_gb_per_s\": %.3f, \"update_gb_per_s_each_way\": %.3f, "
                "\"update_seconds\": %.3f, \"update_params_per_s\": %.4g, \"raw_write_gb_per_s\": %.3f, "
                "\"raw_read_gb_per_s\": %.3f}\n",
                threads, int8 ? "int8" : "fp32", direct, bytes / 1073741824.0, bytes / w / 1e9, bytes / r / 1e9,
                bytes / u / 1e9, u, count / u, raw_w, raw_r);
            fflush(stdout);
        }
    }
    return 0;
}
