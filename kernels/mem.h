// kernels/mem.h: every allocation of memtune goes through here and is charged
// to a category, on the host or on the device. The running and peak totals per
// category are the memory report, compared with `memtune plan`.
#ifndef MT_MEM_H
#define MT_MEM_H

#include <stddef.h>

#include "kernels/common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MT_MEM_CATEGORY_TABLE(X)         \
    X(MT_MEM_WEIGHTS, "weights")         \
    X(MT_MEM_ADAPTERS, "adapters")       \
    X(MT_MEM_GRADS, "grads")             \
    X(MT_MEM_OPTIMIZER, "optimizer")     \
    X(MT_MEM_ACTIVATIONS, "activations") \
    X(MT_MEM_WORKSPACE, "workspace")     \
    X(MT_MEM_OFFLOAD, "offload")         \
    X(MT_MEM_DATA, "data")

// The X-macro expansion confuses clang-format's indentation here.
// clang-format off
typedef enum {
#define MT_X_CAT(name, label) name,
    MT_MEM_CATEGORY_TABLE(MT_X_CAT)
#undef MT_X_CAT
    MT_MEM_NCATEGORIES
} mt_mem_category;
// clang-format on

typedef enum { MT_HOST = 0, MT_DEVICE = 1 } mt_mem_place;

const char *mt_mem_category_name(mt_mem_category cat);

// Allocates `bytes` (zeroed) on the host or the device and charges `cat`.
// Host memory of the offload category is page-locked (for async copies)
// when a GPU is present.
// On failure returns MT_ERR_NOMEM with a message naming the category, the
// size asked for, what is already held by category, and *out = NULL.
mt_err mt_alloc(void **out, size_t bytes, mt_mem_category cat, mt_mem_place place);
// Host memory for large arrays only the CPU reads and writes (the offloaded
// optimizer state): 2 MiB-aligned, advised for huge pages, zeroed by every
// OpenMP thread, never page-locked (no copy engine reads it). Aligned enough
// for O_DIRECT. Freed with mt_free.
mt_err mt_alloc_host_large(void **out, size_t bytes, mt_mem_category cat);
// Memory backed by a file under `dir` (created if missing), for data larger
// than host memory should hold (model.weights: ssd): the file takes its whole
// size on disk at once (a disk too small fails here), is deleted at once (the
// mapping keeps it; nothing outlives the process, kill -9 included) and is
// mapped shared, zeroed, never page-locked. Its resident pages are the
// kernel's page cache, which reads them in on use and drops them under
// pressure. Not charged to the tally (it is disk): mt_mem_mapped_bytes says
// how much is mapped. Freed with mt_free.
mt_err mt_alloc_file(void **out, size_t bytes, mt_mem_category cat, const char *dir);
size_t mt_mem_mapped_bytes(void);
// Host memory for a large copy made now and then (a checkpoint's state):
// 2 MiB-aligned and advised for huge pages, not zeroed, not tallied; NULL
// when out of memory; freed with free(). Where mt_copy_parallel fills it,
// its pages are faulted and zeroed by every core rather than by one.
void *mt_host_alloc_copy(size_t bytes);
// memcpy between host arrays by every OpenMP thread, in 2 MiB pieces (by the
// caller alone below 8 MiB, or inside a parallel region).
void mt_copy_parallel(void *dst, const void *src, size_t bytes);
// Frees what mt_alloc, mt_alloc_host_large or mt_alloc_file gave and sets *p
// to NULL; NULL is a no-op.
void mt_free(void **p);

typedef struct {
    size_t current[MT_MEM_NCATEGORIES];
    size_t peak[MT_MEM_NCATEGORIES];
    size_t current_total, peak_total;
} mt_mem_tally;

void mt_mem_get_tally(mt_mem_place place, mt_mem_tally *out);
// The peak of all categories together at `place`.
size_t mt_mem_peak_total(mt_mem_place place);
// One line per category with current and peak, for logs and errors.
void mt_mem_format(mt_mem_place place, char *buf, size_t len);

#ifdef __cplusplus
}
#endif
#endif
