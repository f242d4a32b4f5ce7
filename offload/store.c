// offload/store.c: the optimizer-state store (store.h). The file kind keeps
// block b's master, m and v as one contiguous 3 * block_params * 4-byte record
// at b * record bytes, so each block is one aligned read and one aligned
// write; with int8 moments a record holds whole quantization blocks (at most
// block_params values: master, m's and v's codes, their blocks' absmax). A
// small pool of I/O threads serves a queue of slot requests; the caller's
// thread only waits for the block it needs next.
#define _GNU_SOURCE
#include "offload/store.h"

#include <errno.h>
#include <fcntl.h>
#include <omp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "kernels/mem.h"
#include "kernels/ops.h"
#include "kernels/ops_ref.h"
#include "offload/cpu_adam.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MT_X86 1
#endif

// ---- CRC-32C

static uint32_t crc_table[256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_make_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0x82f63b78u : c >> 1;  // reflected Castagnoli
        crc_table[i] = c;
    }
}

static uint32_t crc_bytes(uint32_t c, const unsigned char *p, size_t len) {
    pthread_once(&crc_once, crc_make_table);
    for (size_t i = 0; i < len; i++) c = crc_table[(c ^ p[i]) & 0xff] ^ (c >> 8);
    return c;
}

#ifdef MT_X86
__attribute__((target("sse4.2"))) static uint32_t crc_sse42(uint32_t c, const unsigned char *p, size_t len) {
    uint64_t c64 = c;
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t word;
        memcpy(&word, p + i, 8);
        c64 = _mm_crc32_u64(c64, word);
    }
    c = (uint32_t)c64;
    for (; i < len; i++) c = _mm_crc32_u8(c, p[i]);
    return c;
}
#endif

uint32_t mt_crc32c(uint32_t crc, const void *data, size_t len) {
    uint32_t c = ~crc;
#ifdef MT_X86
    if (__builtin_cpu_supports("sse4.2")) return ~crc_sse42(c, data, len);
#endif
    return ~crc_bytes(c, data, len);
}

// ---- the store

typedef enum { SLOT_FREE, SLOT_READING, SLOT_READY, SLOT_WRITING } slot_state;

typedef struct {
    float *buffer;  // 3 * block_params floats, 2 MiB-aligned: master | m | v
    size_t block;
    slot_state state;
} slot;

struct mt_store {
    mt_store_kind kind;
    size_t count, block_params, blocks, record_bytes;
    // memory kind
    float *master, *m, *v;
    // int8 moments (memory kind): codes, each block's absmax, the segments'
    // starts and first block, and the window's moments in fp32
    int int8;
    int pieces;  // the pass is MT_STORE_UPDATE_PIECES's: int8 windows are coded a piece at a time
    uint8_t *mq, *vq;
    float *m_absmax, *v_absmax;
    size_t *seg, *seg_block;
    int n_seg;
    float *win_m, *win_v;
    size_t cursor;  // the next window's first value
    int snapshot;   // mt_store_snapshot's copy: its arrays are mt_host_alloc_copy's (not counted), freed with free
    // file kind (with int8 moments record r holds values [rec_start[r], rec_start[r + 1]), at byte offsets
    // rec_mq, rec_vq, rec_mabs, rec_vabs its codes and absmax, after its master)
    size_t *rec_start, rec_q;  // (rec_q: a record's room for quantization blocks)
    size_t rec_mq, rec_vq, rec_mabs, rec_vabs;
    char path[1100];
    int fd, direct, prefetch;
    uint32_t *crc;  // per block, of its whole record
    slot *slots;
    int n_slots;
    pthread_t *threads;
    int n_threads, stop;
    int *queue, queue_head, queue_len;  // slot indices with a request
    pthread_mutex_t lock;
    pthread_cond_t changed;
    mt_store_pread_fn pread_fn;
    mt_store_pwrite_fn pwrite_fn;
    // the pass
    size_t begin, end, next_block, issued;
    mt_store_mode mode;
    int error;  // errno of the first failure (EBADMSG: checksum), 0 if none
    size_t error_block;
    int error_writing;
    size_t transferred;                    // bytes moved by the failing call before it failed
    int fault_after, fault_errno, writes;  // mt_store_inject_write_fault
};

static int fault_after = -1, fault_errno;

void mt_store_inject_write_fault(int after_writes, int err) {
    fault_after = after_writes;
    fault_errno = err;
}

static ssize_t plain_pread(int fd, void *buf, size_t len, off_t offset) { return pread(fd, buf, len, offset); }
static ssize_t plain_pwrite(int fd, const void *buf, size_t len, off_t offset) { return pwrite(fd, buf, len, offset); }

// Whole transfers: a short count continues where it stopped; no progress at
// all is an error of its own (EIO), as is any errno but EINTR.
static int transfer(mt_store *s, int writing, void *buf, size_t len, off_t offset, size_t *done) {
    *done = 0;
    while (*done < len) {
        ssize_t r = writing ? s->pwrite_fn(s->fd, (char *)buf + *done, len - *done, offset + (off_t)*done)
                            : s->pread_fn(s->fd, (char *)buf + *done, len - *done, offset + (off_t)*done);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return errno ? errno : EIO;
        if (r == 0) return EIO;
        *done += (size_t)r;
    }
    return 0;
}

static void *io_thread(void *arg) {
    mt_store *s = arg;
    pthread_mutex_lock(&s->lock);
    for (;;) {
        while (!s->stop && s->queue_len == 0) pthread_cond_wait(&s->changed, &s->lock);
        if (s->stop) break;
        int k = s->queue[s->queue_head];
        s->queue_head = (s->queue_head + 1) % s->n_slots;
        s->queue_len--;
        slot *sl = &s->slots[k];
        int writing = sl->state == SLOT_WRITING;
        size_t block = sl->block;
        pthread_mutex_unlock(&s->lock);

        off_t at = (off_t)(block * s->record_bytes);
        size_t done = 0;
        int err = 0;
        if (writing) {
            uint32_t crc = mt_crc32c(0, sl->buffer, s->record_bytes);
            pthread_mutex_lock(&s->lock);
            int fault = s->fault_after >= 0 && s->writes++ >= s->fault_after;
            pthread_mutex_unlock(&s->lock);
            err = fault ? s->fault_errno : transfer(s, 1, sl->buffer, s->record_bytes, at, &done);
            if (!err) s->crc[block] = crc;  // only this thread touches the block now
        } else {
            err = transfer(s, 0, sl->buffer, s->record_bytes, at, &done);
            if (!err && mt_crc32c(0, sl->buffer, s->record_bytes) != s->crc[block]) err = EBADMSG;
        }

        pthread_mutex_lock(&s->lock);
        if (err && !s->error) {
            s->error = err;
            s->error_block = block;
            s->error_writing = writing;
            s->transferred = done;
        }
        sl->state = writing || err ? SLOT_FREE : SLOT_READY;
        pthread_cond_broadcast(&s->changed);
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

static void enqueue(mt_store *s, int k) {  // with the lock held
    s->queue[(s->queue_head + s->queue_len) % s->n_slots] = k;
    s->queue_len++;
    pthread_cond_broadcast(&s->changed);
}

size_t mt_store_count(const mt_store *s) { return s->count; }
size_t mt_store_block_params(const mt_store *s) { return s->block_params; }
const char *mt_store_path(const mt_store *s) { return s->path; }
int mt_store_direct_io(const mt_store *s) { return s->direct; }

// The last of n ascending starts at or below i (starts[0] <= i).
static size_t start_of(const size_t *starts, size_t n, size_t i) {
    size_t lo = 0, hi = n - 1;
    while (lo < hi) {
        size_t mid = (lo + hi + 1) / 2;
        if (starts[mid] <= i)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

// int8 moments: the segment holding value i.
static int segment_of(const mt_store *s, size_t i) { return (int)start_of(s->seg, (size_t)s->n_seg, i); }

static size_t segment_end(const mt_store *s, int k) { return k + 1 < s->n_seg ? s->seg[k + 1] : s->count; }

// Whether a quantization block starts at value i (or i ends the shard).
static int block_start(const mt_store *s, size_t i) {
    if (i >= s->count) return 1;
    int k = segment_of(s, i);
    return (i - s->seg[k]) % MT_QBLOCK == 0;
}

// The quantization block holding value i (int8 moments): its index in the shard.
static size_t qblock_of(const mt_store *s, size_t i) {
    int k = segment_of(s, i);
    return s->seg_block[k] + (i - s->seg[k]) / MT_QBLOCK;
}

// Where codes are (int8 moments): value i's at mq[i - value0] and vq[i -
// value0], quantization block j's absmax at m_absmax[j - block0] and
// v_absmax[j - block0]: the memory kind's arrays, or a file record's; values
// and blocks are how many they hold.
typedef struct {
    uint8_t *mq, *vq;
    float *m_absmax, *v_absmax;
    size_t value0, block0, values, blocks;
} codes_at;

// The codes a window of the store reads and writes: the arrays (memory
// kind), or the record in the window's slot.
static codes_at codes_of(const mt_store *s, const mt_store_block *block) {
    if (block->slot < 0)
        return (codes_at){s->mq, s->vq, s->m_absmax, s->v_absmax, 0, 0, s->count, s->seg_block[s->n_seg]};
    char *rec = (char *)s->slots[block->slot].buffer;
    size_t r = s->slots[block->slot].block, first = s->rec_start[r];
    return (codes_at){(uint8_t *)rec + s->rec_mq,
                      (uint8_t *)rec + s->rec_vq,
                      (float *)(rec + s->rec_mabs),
                      (float *)(rec + s->rec_vabs),
                      first,
                      qblock_of(s, first),
                      s->rec_start[r + 1] - first,
                      s->rec_q};
}

// Decodes (encode 0) or encodes the moments of values [a, b), whole blocks,
// between the codes at c and fp32 arrays m, v (m[0] is a's).
static void code_range(const mt_store *s, const codes_at *c, size_t a, size_t b, float *m, float *v, int encode) {
    for (int k = segment_of(s, a); k < s->n_seg && s->seg[k] < b; k++) {
        size_t lo = s->seg[k] > a ? s->seg[k] : a, hi = segment_end(s, k) < b ? segment_end(s, k) : b;
        size_t first = s->seg_block[k] + (lo - s->seg[k]) / MT_QBLOCK - c->block0;
        MT_CHECK(lo >= c->value0 && hi - c->value0 <= c->values &&
                     first + (hi - lo + MT_QBLOCK - 1) / MT_QBLOCK <= c->blocks,
                 "store codes [%zu, %zu) outside their array or record", lo, hi);
        mt_cpu_qblocks_code(c->mq + (lo - c->value0), c->vq + (lo - c->value0), c->m_absmax + first,
                            c->v_absmax + first, m + (lo - a), v + (lo - a), hi - lo, encode);
    }
}

// A window's moments between its codes and the store's fp32 windows.
static void code_window(mt_store *s, const mt_store_block *block, int encode) {
    codes_at c = codes_of(s, block);
    code_range(s, &c, block->offset, block->offset + block->count, s->win_m, s->win_v, encode);
}

int mt_store_segment_codes(const mt_store *s, size_t lo, size_t hi, mt_store_codes *out) {
    if (!s->int8 || s->kind != MT_STORE_MEMORY || lo >= hi || hi > s->count) return 0;
    int k = segment_of(s, lo);
    if (s->seg[k] != lo || segment_end(s, k) != hi) return 0;
    *out = (mt_store_codes){s->mq + lo, s->vq + lo, s->m_absmax + s->seg_block[k], s->v_absmax + s->seg_block[k],
                            s->seg_block[k + 1] - s->seg_block[k]};
    return 1;
}

size_t mt_store_int8_blocks(const size_t *segments, int n_segments, size_t count) {
    size_t blocks = 0;
    for (int k = 0; k < n_segments; k++) {
        size_t end = k + 1 < n_segments ? segments[k + 1] : count;
        blocks += (end - segments[k] + MT_QBLOCK - 1) / MT_QBLOCK;
    }
    return blocks;
}

static size_t block_floor(const mt_store *s, size_t i);

// int8 moments: the segments and the first quantization block of each.
static void set_segments(mt_store *s, const size_t *segments, int n_segments) {
    s->int8 = 1;
    s->n_seg = n_segments > 0 ? n_segments : 1;
    s->seg = calloc((size_t)s->n_seg, sizeof *s->seg);
    s->seg_block = calloc((size_t)s->n_seg + 1, sizeof *s->seg_block);
    MT_CHECK(s->seg && s->seg_block, "store segments");
    for (int k = 0; k < n_segments; k++) s->seg[k] = segments[k];
    MT_CHECK(s->seg[0] == 0, "store segments start at 0");
    for (int k = 0; k < s->n_seg; k++) {
        MT_CHECK(k == 0 || s->seg[k] > s->seg[k - 1], "store segments ascend");
        MT_CHECK(s->seg[k] <= s->count, "store segment %d beyond the shard", k);
        s->seg_block[k + 1] = s->seg_block[k] + (segment_end(s, k) - s->seg[k] + MT_QBLOCK - 1) / MT_QBLOCK;
    }
}

// The file kind with int8 moments: records of whole quantization blocks,
// each ending where block_params values from its start would cut one, moved
// back to that block's start (blocks are 256 values, records 1024 or more).
// Their number; their starts into rec_start (records + 1 of them) unless
// NULL; into most the most quantization blocks a record holds.
static size_t int8_records(const mt_store *s, size_t *rec_start, size_t *most) {
    size_t n = 0;
    *most = 1;
    for (size_t a = 0; a < s->count; n++) {
        if (rec_start) rec_start[n] = a;
        size_t b = a + s->block_params < s->count ? block_floor(s, a + s->block_params) : s->count;
        size_t q = qblock_of(s, b - 1) - qblock_of(s, a) + 1;
        if (q > *most) *most = q;
        a = b;
    }
    if (rec_start) rec_start[n] = s->count;
    return n;
}

// A record's layout for int8 moments: master, m's and v's codes, their
// blocks' absmax (room for `most`), in whole 4 KiB (O_DIRECT's alignment).
static void int8_record_layout(mt_store *s, size_t most) {
    s->rec_q = most;
    s->rec_mq = s->block_params * sizeof(float), s->rec_vq = s->rec_mq + s->block_params;
    s->rec_mabs = s->rec_vq + s->block_params, s->rec_vabs = s->rec_mabs + most * sizeof(float);
    s->record_bytes = (s->rec_vabs + most * sizeof(float) + 4095) / 4096 * 4096;
}

// int8 moments: segments and their blocks, the windows; the memory kind's
// codes, or the file kind's records.
static mt_err open_int8(mt_store *s, const mt_store_config *c) {
    set_segments(s, c->segments, c->n_segments);
    mt_err err = mt_alloc_host_large((void **)&s->win_m, s->block_params * sizeof(float), MT_MEM_OFFLOAD);
    if (!err) err = mt_alloc_host_large((void **)&s->win_v, s->block_params * sizeof(float), MT_MEM_OFFLOAD);
    if (err) return err;
    if (c->kind == MT_STORE_FILE) {
        size_t most;
        s->blocks = int8_records(s, NULL, &most);
        s->rec_start = malloc((s->blocks + 1) * sizeof *s->rec_start);
        MT_CHECK(s->rec_start != NULL, "store records");
        int8_records(s, s->rec_start, &most);
        int8_record_layout(s, most);
        return MT_OK;
    }
    size_t n = s->count ? s->count : 1, blocks = s->seg_block[s->n_seg] ? s->seg_block[s->n_seg] : 1;
    err = mt_alloc_host_large((void **)&s->mq, n, MT_MEM_OFFLOAD);
    if (!err) err = mt_alloc_host_large((void **)&s->vq, n, MT_MEM_OFFLOAD);
    if (!err) err = mt_alloc_host_large((void **)&s->m_absmax, blocks * sizeof(float), MT_MEM_OFFLOAD);
    if (!err) err = mt_alloc_host_large((void **)&s->v_absmax, blocks * sizeof(float), MT_MEM_OFFLOAD);
    return err;
}

size_t mt_store_host_bytes(const mt_store *s) {
    size_t windows = s->int8 ? 2 * s->block_params * sizeof(float) : 0;
    if (s->kind == MT_STORE_FILE) return (size_t)s->n_slots * s->record_bytes + s->blocks * sizeof(uint32_t) + windows;
    if (s->int8) return s->count * (sizeof(float) + 2) + 2 * s->seg_block[s->n_seg] * sizeof(float) + windows;
    return 3 * s->count * sizeof(float);
}

size_t mt_store_file_bytes(const mt_store *s) { return s->kind == MT_STORE_FILE ? s->blocks * s->record_bytes : 0; }

void mt_store_set_io(mt_store *s, mt_store_pread_fn pread_fn, mt_store_pwrite_fn pwrite_fn) {
    s->pread_fn = pread_fn ? pread_fn : plain_pread;
    s->pwrite_fn = pwrite_fn ? pwrite_fn : plain_pwrite;
}

static mt_err open_file(mt_store *s, const mt_store_config *c) {
    if (mkdir(c->dir, 0755) != 0 && errno != EEXIST)
        return mt_errorf(MT_ERR_IO,
                         "offload.path %s: cannot create the folder (%s); set offload.path to a folder on a "
                         "local disk you can write",
                         c->dir, strerror(errno));
    snprintf(s->path, sizeof s->path, "%s/state-rank%d-of-%d.bin", c->dir, c->rank, c->world);
    s->fd = open(s->path, O_RDWR | O_CREAT | O_DIRECT | O_CLOEXEC, 0600);
    s->direct = s->fd >= 0;
    if (s->fd < 0 && errno == EINVAL) s->fd = open(s->path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (s->fd < 0)
        return mt_errorf(MT_ERR_IO, "offload.path: cannot open %s (%s); set offload.path to a folder you can write",
                         s->path, strerror(errno));
    if (flock(s->fd, LOCK_EX | LOCK_NB) != 0) {
        close(s->fd);
        s->fd = -1;
        return mt_errorf(MT_ERR_IO, "%s is in use by another memtune run; give each run its own offload.path (or rank)",
                         s->path);
    }
    off_t bytes = (off_t)(s->blocks * s->record_bytes);
    // the space is checked first, so that a disk too small is not filled
    // to the brim by a reservation that then fails
    struct statvfs fs;
    double free_gib = fstatvfs(s->fd, &fs) == 0 ? (double)fs.f_bavail * fs.f_frsize / 1073741824.0 : -1.0;
    int err = ftruncate(s->fd, 0) != 0 ? errno : 0;
    if (!err)
        err = free_gib >= 0 && free_gib * 1073741824.0 < (double)bytes ? ENOSPC : posix_fallocate(s->fd, 0, bytes);
    if (err) {
        if (ftruncate(s->fd, 0) == 0 && fstatvfs(s->fd, &fs) == 0)
            free_gib = (double)fs.f_bavail * fs.f_frsize / 1073741824.0;
        unlink(s->path);
        close(s->fd);
        s->fd = -1;
        if (err == ENOSPC)
            return mt_errorf(
                MT_ERR_IO,
                "offload.path %s: the optimizer state needs %.2f GiB and the disk has %.2f GiB free; "
                "free space there or set offload.path to a larger disk%s",
                c->dir, bytes / 1073741824.0, free_gib,
                s->int8 ? "" : ", or keep the moments as 8-bit codes (offload.moments: int8: half the bytes)");
        return mt_errorf(MT_ERR_IO, "%s: cannot reserve %.2f GiB (%s)", s->path, bytes / 1073741824.0, strerror(err));
    }
    // every record starts as zeros, as posix_fallocate leaves them
    float *zeros = calloc(1, s->record_bytes);
    MT_CHECK(zeros != NULL, "store");
    uint32_t zero_crc = mt_crc32c(0, zeros, s->record_bytes);
    free(zeros);
    s->crc = malloc(s->blocks * sizeof(uint32_t));
    MT_CHECK(s->crc != NULL, "store checksums");
    for (size_t b = 0; b < s->blocks; b++) s->crc[b] = zero_crc;

    s->n_slots = s->prefetch + 3;  // the block in use, its write, the read-ahead, one spare
    s->slots = calloc((size_t)s->n_slots, sizeof *s->slots);
    s->queue = calloc((size_t)s->n_slots, sizeof *s->queue);
    MT_CHECK(s->slots && s->queue, "store slots");
    for (int k = 0; k < s->n_slots; k++) {  // O_DIRECT needs aligned buffers
        mt_err alloc_err = mt_alloc_host_large((void **)&s->slots[k].buffer, s->record_bytes, MT_MEM_OFFLOAD);
        if (alloc_err) return alloc_err;
    }
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->changed, NULL);
    s->threads = calloc((size_t)s->n_threads, sizeof *s->threads);
    MT_CHECK(s->threads != NULL, "store threads");
    for (int t = 0; t < s->n_threads; t++) MT_CHECK(pthread_create(&s->threads[t], NULL, io_thread, s) == 0, "thread");
    return MT_OK;
}

// The sizes every kind starts from: block_params, blocks, fp32 records.
static void set_blocks(mt_store *s, const mt_store_config *c) {
    s->kind = c->kind;
    s->count = c->count;
    size_t bp = c->block_params ? c->block_params : (size_t)1 << 21;
    if (bp > c->count) bp = c->count ? c->count : 1;  // a small shard is one block
    s->block_params = (bp + 1023) / 1024 * 1024;
    s->blocks = (c->count + s->block_params - 1) / s->block_params;
    s->record_bytes = 3 * s->block_params * sizeof(float);
}

size_t mt_store_file_size(const mt_store_config *c, size_t *record_bytes, size_t *block_params) {
    mt_store s = {0};
    set_blocks(&s, c);
    if (block_params) *block_params = s.block_params;
    if (c->int8) {
        size_t most;
        set_segments(&s, c->segments, c->n_segments);
        s.blocks = int8_records(&s, NULL, &most);
        int8_record_layout(&s, most);
        free(s.seg), free(s.seg_block);
    }
    if (record_bytes) *record_bytes = s.record_bytes;
    return c->kind == MT_STORE_FILE ? s.blocks * s.record_bytes : 0;
}

mt_err mt_store_open(mt_store **out, const mt_store_config *c) {
    *out = NULL;
    mt_store *s = calloc(1, sizeof *s);
    MT_CHECK(s != NULL, "store");
    set_blocks(s, c);
    s->fd = -1;
    s->n_threads = c->io_threads > 0 ? c->io_threads : 4;
    s->prefetch = c->prefetch > 0 ? c->prefetch : 2;
    mt_store_set_io(s, NULL, NULL);
    s->fault_after = fault_after;
    s->fault_errno = fault_errno;
    mt_err err = MT_OK;
    if (c->kind == MT_STORE_MEMORY) {
        // plain (not page-locked) memory: only the CPU touches the state
        size_t bytes = (c->count ? c->count : 1) * sizeof(float);
        err = mt_alloc_host_large((void **)&s->master, bytes, MT_MEM_OFFLOAD);
        if (!err && c->int8) err = open_int8(s, c);
        if (!err && !c->int8) err = mt_alloc_host_large((void **)&s->m, bytes, MT_MEM_OFFLOAD);
        if (!err && !c->int8) err = mt_alloc_host_large((void **)&s->v, bytes, MT_MEM_OFFLOAD);
    } else {
        if (c->int8) err = open_int8(s, c);
        if (!err) err = open_file(s, c);
    }
    if (err) {
        mt_store_close(s);
        return err;
    }
    *out = s;
    return MT_OK;
}

void mt_store_close(mt_store *s) {
    if (!s) return;
    if (s->threads) {
        pthread_mutex_lock(&s->lock);
        s->stop = 1;
        pthread_cond_broadcast(&s->changed);
        pthread_mutex_unlock(&s->lock);
        for (int t = 0; t < s->n_threads; t++) pthread_join(s->threads[t], NULL);
        free(s->threads);
        pthread_mutex_destroy(&s->lock);
        pthread_cond_destroy(&s->changed);
    }
    if (s->fd >= 0) {
        unlink(s->path);
        close(s->fd);
    }
    for (int k = 0; s->slots && k < s->n_slots; k++) mt_free((void **)&s->slots[k].buffer);
    free(s->slots);
    free(s->queue);
    free(s->crc);
    void **arrays[] = {(void **)&s->master,   (void **)&s->m,     (void **)&s->v,
                       (void **)&s->mq,       (void **)&s->vq,    (void **)&s->m_absmax,
                       (void **)&s->v_absmax, (void **)&s->win_m, (void **)&s->win_v};
    for (size_t k = 0; k < sizeof arrays / sizeof *arrays; k++) {
        if (s->snapshot)
            free(*arrays[k]), *arrays[k] = NULL;
        else
            mt_free(arrays[k]);
    }
    free(s->seg);
    free(s->seg_block);
    free(s->rec_start);
    free(s);
}

// The file kind's record r: its first value, and the record holding value i (< count).
static size_t record_first(const mt_store *s, size_t r) { return s->rec_start ? s->rec_start[r] : r * s->block_params; }
static size_t record_of(const mt_store *s, size_t i) {
    return s->rec_start ? start_of(s->rec_start, s->blocks, i) : i / s->block_params;
}

void mt_store_begin(mt_store *s, size_t begin, size_t end, mt_store_mode mode) {
    MT_CHECK(begin <= end && end <= s->count, "store pass [%zu, %zu) of %zu", begin, end, s->count);
    s->begin = begin;
    s->end = end;
    s->pieces = mode == MT_STORE_UPDATE_PIECES;
    s->mode = s->pieces ? MT_STORE_UPDATE : mode;
    s->next_block = begin < s->count ? record_of(s, begin) : s->blocks;
    s->issued = s->next_block;
    s->cursor = begin;
    if (s->int8)
        MT_CHECK(block_start(s, begin) && block_start(s, end), "store pass [%zu, %zu) splits a block of 8-bit moments",
                 begin, end);
}

static int find_slot(mt_store *s, size_t block) {  // with the lock held
    for (int k = 0; k < s->n_slots; k++)
        if (s->slots[k].state != SLOT_FREE && s->slots[k].block == block && s->slots[k].state != SLOT_WRITING) return k;
    return -1;
}

static int free_slot(mt_store *s) {
    for (int k = 0; k < s->n_slots; k++)
        if (s->slots[k].state == SLOT_FREE) return k;
    return -1;
}

// int8 moments: a window's moments in win_m and win_v, decoded (zero to be
// overwritten; in a pieces pass, left to mt_store_update_pieces).
static void int8_window(mt_store *s, mt_store_block *out) {
    out->m = s->win_m, out->v = s->win_v;
    if (s->mode == MT_STORE_OVERWRITE) {
        memset(s->win_m, 0, out->count * sizeof(float));
        memset(s->win_v, 0, out->count * sizeof(float));
    } else if (!s->pieces) {
        code_window(s, out, 0);
    }
}

// int8 moments, memory kind: windows of whole quantization blocks, at most
// block_params values.
static int next_int8(mt_store *s, mt_store_block *out) {
    size_t a = s->cursor;
    if (a >= s->end) return 0;
    size_t b = a + s->block_params < s->end ? a + s->block_params : s->end;
    if (b < s->end) {  // back to the start of the block it cuts (past a: a starts a block, windows span 1024 or more)
        int k = segment_of(s, b);
        b = s->seg[k] + (b - s->seg[k]) / MT_QBLOCK * MT_QBLOCK;
    }
    s->cursor = b;
    out->offset = a, out->count = b - a, out->slot = -1;
    out->master = s->master + a;
    int8_window(s, out);
    return 1;
}

int mt_store_next(mt_store *s, mt_store_block *out) {
    if (s->int8 && s->kind == MT_STORE_MEMORY) return next_int8(s, out);
    size_t b = s->next_block;
    if (b >= s->blocks || record_first(s, b) >= s->end || s->begin == s->end) return 0;
    size_t first = record_first(s, b), offset = first > s->begin ? first : s->begin;
    size_t last = record_first(s, b + 1) < s->end ? record_first(s, b + 1) : s->end;
    out->offset = offset;
    out->count = last - offset;
    s->next_block++;
    if (s->kind == MT_STORE_MEMORY) {
        out->master = s->master + offset;
        out->m = s->m + offset;
        out->v = s->v + offset;
        out->slot = -1;
        return 1;
    }
    size_t end_block = record_of(s, s->end - 1) + 1;
    pthread_mutex_lock(&s->lock);
    int k;
    for (;;) {
        if (s->error) {
            pthread_mutex_unlock(&s->lock);
            return 0;
        }
        // read ahead: blocks up to b + prefetch, while buffers are free
        while (s->issued < end_block && s->issued <= b + (size_t)s->prefetch && (k = free_slot(s)) >= 0) {
            // a block still being written (the previous pass's) is read after its write
            int busy = 0;
            for (int j = 0; j < s->n_slots; j++)
                busy |= s->slots[j].state == SLOT_WRITING && s->slots[j].block == s->issued;
            if (busy) break;
            slot *sl = &s->slots[k];
            sl->block = s->issued++;
            if (s->mode == MT_STORE_OVERWRITE) {
                memset(sl->buffer, 0, s->record_bytes);
                sl->state = SLOT_READY;
            } else {
                sl->state = SLOT_READING;
                enqueue(s, k);
            }
        }
        k = find_slot(s, b);
        if (k >= 0 && s->slots[k].state == SLOT_READY) break;
        pthread_cond_wait(&s->changed, &s->lock);
    }
    pthread_mutex_unlock(&s->lock);
    float *buf = s->slots[k].buffer;
    size_t within = offset - first;
    out->master = buf + within;
    out->slot = k;
    if (s->int8) {
        int8_window(s, out);
    } else {
        out->m = buf + s->block_params + within;
        out->v = buf + 2 * s->block_params + within;
    }
    return 1;
}

static size_t block_ceil(const mt_store *s, size_t i);

enum { kPiece = 16384 };  // values: 128 KiB of fp32 moments, whole quantization blocks

void mt_store_update_pieces(mt_store *s, const mt_store_block *block,
                            void (*fn)(void *ctx, size_t lo, size_t hi, float *m, float *v), void *ctx) {
    MT_CHECK(s->pieces, "mt_store_update_pieces outside an MT_STORE_UPDATE_PIECES pass");
    size_t a = block->offset, end = a + block->count;
    if (!s->int8) {  // fp32 moments in place: the whole block at once, fn's work on every thread
        fn(ctx, a, end, block->m, block->v);
        return;
    }
    // piece boundaries: about kPiece values each, each ending where a quantization block does
    size_t n = 0, room = block->count / kPiece + (size_t)s->n_seg + 2, *at = malloc(room * sizeof *at);
    MT_CHECK(at != NULL, "store pieces");
    at[n++] = a;
    while (at[n - 1] < end) {
        size_t next = at[n - 1] + kPiece < end ? block_ceil(s, at[n - 1] + kPiece) : end;
        MT_CHECK(n < room, "store pieces: %zu of %zu", n, room);
        at[n++] = next < end ? next : end;
    }
    codes_at c = codes_of(s, block);
#pragma omp parallel
    {
        // a piece spans at most kPiece values and one block more
        float *m = malloc(2 * (kPiece + MT_QBLOCK) * sizeof *m), *v = m + kPiece + MT_QBLOCK;
        MT_CHECK(m != NULL, "store piece buffers");
        size_t pieces = n - 1;
#pragma omp for schedule(static)
        for (size_t k = 0; k < pieces; k++) {
            size_t lo = at[k], hi = at[k + 1];
            code_range(s, &c, lo, hi, m, v, 0);
            fn(ctx, lo, hi, m, v);
            code_range(s, &c, lo, hi, m, v, 1);
        }
        free(m);
    }
    free(at);
}

void mt_store_done(mt_store *s, const mt_store_block *block) {
    if (s->int8 && s->mode != MT_STORE_READ && !s->pieces) code_window(s, block, 1);
    if (s->kind == MT_STORE_MEMORY || block->slot < 0) return;
    pthread_mutex_lock(&s->lock);
    slot *sl = &s->slots[block->slot];
    if (s->mode == MT_STORE_READ || s->error) {
        sl->state = SLOT_FREE;
        pthread_cond_broadcast(&s->changed);
    } else {
        sl->state = SLOT_WRITING;
        enqueue(s, block->slot);
    }
    pthread_mutex_unlock(&s->lock);
}

mt_err mt_store_end(mt_store *s) {
    if (s->kind == MT_STORE_MEMORY) return MT_OK;
    pthread_mutex_lock(&s->lock);
    for (;;) {
        int busy = 0;
        for (int k = 0; k < s->n_slots; k++)
            busy |= s->slots[k].state == SLOT_READING || s->slots[k].state == SLOT_WRITING;
        if (!busy) break;
        pthread_cond_wait(&s->changed, &s->lock);
    }
    for (int k = 0; k < s->n_slots; k++) s->slots[k].state = SLOT_FREE;  // read-ahead past the range is dropped
    int err = s->error;
    size_t block = s->error_block, done = s->transferred;
    int writing = s->error_writing;
    s->error = 0;
    pthread_mutex_unlock(&s->lock);
    if (!err) return MT_OK;
    double mib = s->record_bytes / 1048576.0;
    if (err == EBADMSG)
        return mt_errorf(MT_ERR_IO,
                         "%s: block %zu of the optimizer state fails its CRC-32C check: the file was changed or the "
                         "disk returned other bytes than were written. Resume from the last checkpoint "
                         "(train.resume: auto); if it happens again, check the disk.",
                         s->path, block);
    if (err == ENOSPC)
        return mt_errorf(MT_ERR_IO,
                         "%s: no space left on the device writing block %zu of the optimizer state (%.1f MiB); free "
                         "space there or set offload.path to a larger disk, then resume from the last checkpoint "
                         "(it is untouched: checkpoints are written elsewhere)",
                         s->path, block, mib);
    return mt_errorf(MT_ERR_IO,
                     "%s: %s %s block %zu of the optimizer state (%zu of %.1f MiB moved)%s; the last checkpoint is "
                     "untouched: check the disk, then resume from it (train.resume: auto)",
                     s->path, strerror(err), writing ? "writing" : "reading", block, done, mib,
                     err == EIO && done < s->record_bytes ? ", a short transfer that made no progress" : "");
}

mt_err mt_store_write_all(mt_store *s, const float *master, const float *m, const float *v) {
    MT_CHECK(master != NULL, "mt_store_write_all needs the master values");
    mt_store_begin(s, 0, s->count, MT_STORE_OVERWRITE);
    mt_store_block b;
    while (mt_store_next(s, &b)) {
        size_t bytes = b.count * sizeof(float);
        memcpy(b.master, master + b.offset, bytes);
        if (m) memcpy(b.m, m + b.offset, bytes);
        if (v) memcpy(b.v, v + b.offset, bytes);
        if (s->kind == MT_STORE_MEMORY && !m) memset(b.m, 0, bytes);
        if (s->kind == MT_STORE_MEMORY && !v) memset(b.v, 0, bytes);
        mt_store_done(s, &b);
    }
    return mt_store_end(s);
}

// The start of the quantization block holding value i (with int8 moments; i itself otherwise).
static size_t block_floor(const mt_store *s, size_t i) {
    if (!s->int8 || i >= s->count) return i;
    int k = segment_of(s, i);
    return s->seg[k] + (i - s->seg[k]) / MT_QBLOCK * MT_QBLOCK;
}

// The first block start at or after value i.
static size_t block_ceil(const mt_store *s, size_t i) {
    size_t a = block_floor(s, i);
    if (a == i) return i;
    size_t end = segment_end(s, segment_of(s, i));
    return a + MT_QBLOCK < end ? a + MT_QBLOCK : end;
}

mt_err mt_store_read_range(mt_store *s, size_t lo, size_t hi, float *master, float *m, float *v) {
    MT_CHECK(lo <= hi && hi <= s->count, "store read [%zu, %zu) of %zu", lo, hi, s->count);
    if (s->kind == MT_STORE_MEMORY && !s->int8) {  // the arrays as they are, each copied by every thread
        size_t bytes = (hi - lo) * sizeof(float);
        if (master) mt_copy_parallel(master, s->master + lo, bytes);
        if (m) mt_copy_parallel(m, s->m + lo, bytes);
        if (v) mt_copy_parallel(v, s->v + lo, bytes);
        return MT_OK;
    }
    // a pass over the whole quantization blocks that hold the range; what lies outside it is not copied
    mt_store_begin(s, block_floor(s, lo), block_ceil(s, hi), MT_STORE_READ);
    mt_store_block b;
    while (mt_store_next(s, &b)) {
        size_t a = b.offset > lo ? b.offset : lo, e = b.offset + b.count < hi ? b.offset + b.count : hi;
        if (a < e) {
            size_t bytes = (e - a) * sizeof(float), at = a - b.offset;
            if (master) mt_copy_parallel(master + (a - lo), b.master + at, bytes);
            if (m) mt_copy_parallel(m + (a - lo), b.m + at, bytes);
            if (v) mt_copy_parallel(v + (a - lo), b.v + at, bytes);
        }
        mt_store_done(s, &b);
    }
    return mt_store_end(s);
}

mt_err mt_store_read_all(mt_store *s, float *master, float *m, float *v) {
    return mt_store_read_range(s, 0, s->count, master, m, v);
}

size_t mt_store_snapshot_bytes(const mt_store *s) { return s->kind == MT_STORE_MEMORY ? mt_store_host_bytes(s) : 0; }

// One array of a snapshot: a fresh array of `bytes`, src copied into it
// (NULL src: left as it comes, for a window).
static mt_err snapshot_array(void **dst, const void *src, size_t bytes) {
    *dst = mt_host_alloc_copy(bytes);
    if (!*dst)
        return mt_errorf(MT_ERR_NOMEM, "out of host memory for a snapshot of the offload store (%.2f GiB more)",
                         bytes / 1073741824.0);
    if (src) mt_copy_parallel(*dst, src, bytes);
    return MT_OK;
}

mt_err mt_store_snapshot(const mt_store *s, mt_store **out) {
    MT_CHECK(s->kind == MT_STORE_MEMORY, "a snapshot of a file store");
    *out = NULL;
    mt_store *c = calloc(1, sizeof *c);
    MT_CHECK(c != NULL, "store snapshot");
    c->kind = MT_STORE_MEMORY, c->snapshot = 1, c->fd = -1;
    c->count = s->count, c->block_params = s->block_params, c->blocks = s->blocks, c->record_bytes = s->record_bytes;
    c->int8 = s->int8, c->n_seg = s->n_seg;
    size_t n = s->count ? s->count : 1, floats = n * sizeof(float);
    mt_err err = snapshot_array((void **)&c->master, s->master, floats);
    if (!err && !s->int8) err = snapshot_array((void **)&c->m, s->m, floats);
    if (!err && !s->int8) err = snapshot_array((void **)&c->v, s->v, floats);
    if (!err && s->int8) {
        size_t blocks = s->seg_block[s->n_seg] ? s->seg_block[s->n_seg] : 1;
        c->seg = malloc((size_t)s->n_seg * sizeof *c->seg);
        c->seg_block = malloc(((size_t)s->n_seg + 1) * sizeof *c->seg_block);
        MT_CHECK(c->seg && c->seg_block, "store snapshot segments");
        memcpy(c->seg, s->seg, (size_t)s->n_seg * sizeof *c->seg);
        memcpy(c->seg_block, s->seg_block, ((size_t)s->n_seg + 1) * sizeof *c->seg_block);
        err = snapshot_array((void **)&c->mq, s->mq, n);
        if (!err) err = snapshot_array((void **)&c->vq, s->vq, n);
        if (!err) err = snapshot_array((void **)&c->m_absmax, s->m_absmax, blocks * sizeof(float));
        if (!err) err = snapshot_array((void **)&c->v_absmax, s->v_absmax, blocks * sizeof(float));
        // (its own windows to decode into: the store's serve its passes meanwhile)
        if (!err) err = snapshot_array((void **)&c->win_m, NULL, s->block_params * sizeof(float));
        if (!err) err = snapshot_array((void **)&c->win_v, NULL, s->block_params * sizeof(float));
    }
    if (err) {
        mt_store_close(c);
        return err;
    }
    *out = c;
    return MT_OK;
}
