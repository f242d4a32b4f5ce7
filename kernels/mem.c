// kernels/mem.c: categorised allocation with a tally. The live allocations are
// few (blocks carved per category), so a small table maps pointer -> record.
#include "kernels/mem.h"

#include <errno.h>
#include <fcntl.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kernels/device.h"

static const char *const category_names[] = {
#define MT_X_CAT(name, label) label,
    MT_MEM_CATEGORY_TABLE(MT_X_CAT)
#undef MT_X_CAT
};

const char *mt_mem_category_name(mt_mem_category cat) {
    return (cat >= 0 && cat < MT_MEM_NCATEGORIES) ? category_names[cat] : "?";
}

typedef struct {
    void *ptr;
    size_t bytes;
    mt_mem_category cat;
    mt_mem_place place;
    int pinned;  // page-locked host memory (freed by the device layer)
    int mapped;  // a file's mapping (mt_alloc_file): unmapped, never charged
} allocation;

static allocation *live;
static size_t live_count, live_capacity, mapped_bytes;
static mt_mem_tally tallies[2];

static void charge(mt_mem_place place, mt_mem_category cat, size_t bytes) {
    mt_mem_tally *t = &tallies[place];
    t->current[cat] += bytes;
    t->current_total += bytes;
    if (t->current[cat] > t->peak[cat]) t->peak[cat] = t->current[cat];
    if (t->current_total > t->peak_total) t->peak_total = t->current_total;
}

void mt_mem_format(mt_mem_place place, char *buf, size_t len) {
    const mt_mem_tally *t = &tallies[place];
    size_t used = 0;
    buf[0] = '\0';
    for (int c = 0; c < MT_MEM_NCATEGORIES && used < len; c++) {
        if (!t->peak[c]) continue;
        used += (size_t)snprintf(buf + used, len - used, "%s%s %.1f MiB (peak %.1f)", used ? ", " : "",
                                 category_names[c], t->current[c] / 1048576.0, t->peak[c] / 1048576.0);
    }
    if (!used) snprintf(buf, len, "nothing allocated");
}

static mt_err out_of_memory(size_t bytes, mt_mem_category cat, mt_mem_place place) {
    char held[1024];
    mt_mem_format(place, held, sizeof held);
    // what to change depends on what did not fit
    const char *hint = (cat == MT_MEM_ACTIVATIONS || cat == MT_MEM_WORKSPACE)
                           ? "Lower train.micro_batch or train.seq_len, or turn on model.activation_checkpointing."
                       : (cat == MT_MEM_WEIGHTS || cat == MT_MEM_GRADS || cat == MT_MEM_OPTIMIZER)
                           ? "The model's weights, gradients and AdamW state (18 bytes per parameter on the GPU) "
                             "do not fit: train a smaller model or use a GPU with more memory."
                       : cat == MT_MEM_OFFLOAD
                           ? "The offloaded optimizer state needs 12 bytes per trained parameter of host memory "
                             "(offload.optimizer: cpu), plus 2 for gradients: use offload.optimizer: ssd, or a "
                             "machine with more memory."
                           : "Free memory or lower the batch size.";
    return mt_errorf(MT_ERR_NOMEM, "out of %s memory allocating %.1f MiB for %s (already held: %s). %s",
                     place == MT_DEVICE ? "GPU" : "host", bytes / 1048576.0, category_names[cat], held, hint);
}

static void record(void *p, size_t bytes, mt_mem_category cat, mt_mem_place place, int pinned, int mapped) {
    if (live_count == live_capacity) {
        live_capacity = live_capacity ? 2 * live_capacity : 64;
        live = realloc(live, live_capacity * sizeof *live);
        MT_CHECK(live != NULL, "allocation table");
    }
    live[live_count++] = (allocation){p, bytes, cat, place, pinned, mapped};
    if (mapped)
        mapped_bytes += bytes;
    else
        charge(place, cat, bytes);
}

mt_err mt_alloc(void **out, size_t bytes, mt_mem_category cat, mt_mem_place place) {
    MT_CHECK(cat >= 0 && cat < MT_MEM_NCATEGORIES, "bad category %d", (int)cat);
    *out = NULL;
    if (bytes == 0) bytes = 1;
    void *p = NULL;
    int pinned = 0;
    if (place == MT_DEVICE) {
        p = mt_device_malloc(bytes);
        if (p) mt_device_memset(p, 0, bytes);
    } else {
        pinned = cat == MT_MEM_OFFLOAD && mt_device_count() > 0;
        p = pinned ? mt_host_malloc_pinned(bytes) : calloc(1, bytes);
    }
    if (!p) return out_of_memory(bytes, cat, place);
    record(p, bytes, cat, place, pinned, 0);
    *out = p;
    return MT_OK;
}

mt_err mt_alloc_host_large(void **out, size_t bytes, mt_mem_category cat) {
    MT_CHECK(cat >= 0 && cat < MT_MEM_NCATEGORIES, "bad category %d", (int)cat);
    *out = NULL;
    const size_t huge = (size_t)2 << 20;
    bytes = (bytes + huge - 1) / huge * huge;
    void *p = NULL;
    if (posix_memalign(&p, huge, bytes) != 0) return out_of_memory(bytes, cat, MT_HOST);
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);  // a hint: fewer TLB misses on long streams
#endif
    // zeroed by every thread, so the pages are spread as the threads that use them
    size_t pages = bytes / huge;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < pages; i++) memset((char *)p + i * huge, 0, huge);
    record(p, bytes, cat, MT_HOST, 0, 0);
    *out = p;
    return MT_OK;
}

void *mt_host_alloc_copy(size_t bytes) {
    const size_t huge = (size_t)2 << 20;
    bytes = (bytes ? bytes + huge - 1 : huge) / huge * huge;
    void *p = NULL;
    if (posix_memalign(&p, huge, bytes) != 0) return NULL;
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);  // a hint: a fault per 2 MiB
#endif
    return p;
}

void mt_copy_parallel(void *dst, const void *src, size_t bytes) {
    const size_t piece = (size_t)2 << 20;
    if (bytes < 4 * piece || omp_in_parallel()) {
        memcpy(dst, src, bytes);
        return;
    }
    size_t pieces = (bytes + piece - 1) / piece;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < pieces; i++) {
        size_t at = i * piece, n = bytes - at < piece ? bytes - at : piece;
        memcpy((char *)dst + at, (const char *)src + at, n);
    }
}

mt_err mt_alloc_file(void **out, size_t bytes, mt_mem_category cat, const char *dir) {
    MT_CHECK(cat >= 0 && cat < MT_MEM_NCATEGORIES, "bad category %d", (int)cat);
    *out = NULL;
    if (bytes == 0) bytes = 1;
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return mt_errorf(MT_ERR_IO,
                         "%s: cannot create the folder for the %s file (%s); set offload.path to a folder "
                         "on a local disk",
                         dir, category_names[cat], strerror(errno));
    char path[4096];
    snprintf(path, sizeof path, "%s/memtune-%s-XXXXXX", dir, category_names[cat]);
    int fd = mkstemp(path);
    if (fd < 0)
        return mt_errorf(MT_ERR_IO, "%s: cannot create the %s file (%s); set offload.path to a writable folder", dir,
                         category_names[cat], strerror(errno));
    unlink(path);  // the mapping keeps the file: nothing is left behind, whatever ends the process
    int e = posix_fallocate(fd, 0, (off_t)bytes);
    void *p = e ? MAP_FAILED : mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED && !e) e = errno;
    close(fd);
    if (p == MAP_FAILED)
        return mt_errorf(MT_ERR_IO,
                         "%s: cannot take %.2f GiB for the %s file (%s); free space there or set "
                         "offload.path to a larger disk",
                         dir, bytes / 1073741824.0, category_names[cat], strerror(e));
    record(p, bytes, cat, MT_HOST, 0, 1);
    *out = p;
    return MT_OK;
}

size_t mt_mem_mapped_bytes(void) { return mapped_bytes; }

void mt_free(void **p) {
    if (!p || !*p) return;
    for (size_t i = 0; i < live_count; i++) {
        if (live[i].ptr != *p) continue;
        allocation a = live[i];
        live[i] = live[--live_count];
        if (a.mapped) {
            mapped_bytes -= a.bytes;
            munmap(a.ptr, a.bytes);
            *p = NULL;
            return;
        }
        tallies[a.place].current[a.cat] -= a.bytes;
        tallies[a.place].current_total -= a.bytes;
        if (a.place == MT_DEVICE)
            mt_device_free(a.ptr);
        else if (a.pinned)
            mt_host_free_pinned(a.ptr);
        else
            free(a.ptr);
        *p = NULL;
        return;
    }
    mt_fatal(__FILE__, __LINE__, "mt_free of a pointer mt_alloc did not give: %p", *p);
}

void mt_mem_get_tally(mt_mem_place place, mt_mem_tally *out) { *out = tallies[place]; }

size_t mt_mem_peak_total(mt_mem_place place) {
    mt_mem_tally t;
    mt_mem_get_tally(place, &t);
    return t.peak_total;
}
