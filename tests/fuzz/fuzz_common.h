// tests/fuzz/fuzz_common.h: helpers for the libFuzzer targets: the parsers
// read files, so each input is written to a scratch file first.
#ifndef MT_FUZZ_COMMON_H
#define MT_FUZZ_COMMON_H

#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

// A per-process scratch folder (memory-backed when /dev/shm exists).
static const char *fuzz_dir(void) {
    static char dir[128];
    if (!dir[0]) {
        snprintf(dir, sizeof dir, "%s/memtune-fuzz-%d", access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp",
                 (int)getpid());
        mkdir(dir, 0700);
    }
    return dir;
}

static void fuzz_write(const char *path, const unsigned char *data, size_t size) {
    FILE *f = fopen(path, "wb");
    if (!f) abort();
    if (size && fwrite(data, 1, size, f) != size) abort();
    fclose(f);
}

#endif
