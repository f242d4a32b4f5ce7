// offload/store.h: where the optimizer state of offloaded parameters lives:
// fp32 master weights and Adam's two moments, for one shard of the trainable
// parameters. Two kinds behind one interface:
//   memory  three arrays in (page-locked when a GPU is present) host memory;
//   file    one file under a folder (ZeRO-Infinity's NVMe tier, Rajbhandari
//           et al., 2021), read and written in blocks with O_DIRECT from
//           aligned buffers by a few I/O threads: blocks are read ahead of the
//           one being updated and written behind it, and each block carries a
//           CRC-32C checked on every read.
// The state is visited in passes over a range of parameters, block by block;
// a caller updates each block in place and hands it back. A shard is
// (rank, world) and names its file, so data-parallel ranks each keep theirs.
#ifndef MT_STORE_H
#define MT_STORE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "kernels/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { MT_STORE_MEMORY = 0, MT_STORE_FILE } mt_store_kind;

typedef struct {
    mt_store_kind kind;
    const char *dir;      // file: the folder (created) holding state-rank<R>-of-<W>.bin
    size_t count;         // parameters in this shard
    int rank, world;      // the shard (0, 1 without data parallelism)
    size_t block_params;  // parameters per block (rounded up to 1024; 0: 2^21, 24 MiB of state)
    int io_threads;       // file: concurrent reads and writes (0: 4)
    int prefetch;         // file: blocks read ahead of the one in use (0: 2)
    // Adam's moments as 8-bit codes (offload.moments int8), the quantization
    // GaLore's 8-bit moments use (kernels/ops.h mt_adam_state: blocks of
    // MT_QBLOCK values, each with its absmax), in host memory or in the file
    // (6 bytes a value instead of 12 each way a pass). Blocks start at each
    // segment start (sorted, the first 0) and every MT_QBLOCK values after
    // it, so that a pass over whole segments never splits one (give the
    // ends of what is updated apart as segment starts too). A window
    // (mt_store_next) then gives the moments decoded to fp32 and, in the
    // update modes, encodes them back when it is done; passes must begin at
    // a block start and end at one (or at a segment's or the shard's end).
    // The file kind's records then hold whole quantization blocks: each ends
    // at the start of the block that block_params values from its own start
    // would cut (so records hold block_params - 255 to block_params values).
    int int8;
    const size_t *segments;
    int n_segments;
} mt_store_config;

typedef struct mt_store mt_store;

// Creates the store with every value zero. The file kind takes the whole
// file's size on disk at once (so a disk too small fails here, before any
// training), locks it against a second run using the same folder, and
// deletes it on close: the state that outlives a run is in checkpoints.
mt_err mt_store_open(mt_store **out, const mt_store_config *cfg);
void mt_store_close(mt_store *s);
size_t mt_store_count(const mt_store *s);
// Parameters per block: the largest window mt_store_next gives.
size_t mt_store_block_params(const mt_store *s);
// int8 moments: the quantization blocks of a shard of count values cut into
// n_segments segments (store config's segments).
size_t mt_store_int8_blocks(const size_t *segments, int n_segments, size_t count);
// Host memory the store holds (arrays, or the file kind's block buffers): 12
// bytes a value, or with int8 moments 6 and the blocks' absmax (8 bytes a
// block of 256) and two fp32 windows.
size_t mt_store_host_bytes(const mt_store *s);
// The file kind's size on disk (its records; 0 for the memory kind).
size_t mt_store_file_bytes(const mt_store *s);
// The size a file store of config c takes on disk (0 for the memory kind),
// one record's bytes into record_bytes and its parameters a block (what
// mt_store_block_params gives once open) into block_params (each unless
// NULL): what mt_store_open reserves, without opening it.
size_t mt_store_file_size(const mt_store_config *c, size_t *record_bytes, size_t *block_params);
// The file's path ("" for the memory kind) and whether it uses O_DIRECT
// (some filesystems, tmpfs among them, refuse it; then the page cache is used).
const char *mt_store_path(const mt_store *s);
int mt_store_direct_io(const mt_store *s);

// A window of the state: parameters [offset, offset + count) of the shard.
typedef struct {
    size_t offset, count;
    float *master, *m, *v;
    int slot;  // the store's buffer (file kind)
} mt_store_block;

typedef enum {
    MT_STORE_READ,          // look only
    MT_STORE_UPDATE,        // read, change in place, write back
    MT_STORE_OVERWRITE,     // every value is set: no read (the values start undefined)
    MT_STORE_UPDATE_PIECES  // MT_STORE_UPDATE through mt_store_update_pieces (int8 moments: the blocks' m
                            // and v are not decoded; each piece's are, beside its update)
} mt_store_mode;

// A pass over [begin, end): mt_store_next gives its blocks in order (waiting
// for their reads and checking their checksums), mt_store_done returns each
// (written behind in the update modes), mt_store_end waits for the writes and
// returns the pass's first error (an I/O error or a checksum mismatch, with a
// message naming the file, the block and what to do). Blocks are whole store
// blocks clipped to the range. One pass at a time; next returns 0 at the end
// or after an error.
void mt_store_begin(mt_store *s, size_t begin, size_t end, mt_store_mode mode);
int mt_store_next(mt_store *s, mt_store_block *block);
void mt_store_done(mt_store *s, const mt_store_block *block);
mt_err mt_store_end(mt_store *s);
// In an MT_STORE_UPDATE_PIECES pass: fn(ctx, lo, hi, m, v) over the block
// [lo, hi) (store offsets), its moments in m and v from index 0 (m[0] is
// lo's). With int8 moments it runs over consecutive pieces of about 16 K
// values (whole quantization blocks) on every OpenMP thread, each thread
// decoding its piece into a buffer of its own and encoding it back after
// fn, so the fp32 moments stay in its cache (decoding, updating and encoding
// the whole block in three passes moves about 32 bytes a value more through
// memory); fn must then not depend on the pieces' order, and its own work
// runs on the one thread. Otherwise fn runs once, over the whole block and
// its own m and v, and its work may use every thread.
void mt_store_update_pieces(mt_store *s, const mt_store_block *block,
                            void (*fn)(void *ctx, size_t lo, size_t hi, float *m, float *v), void *ctx);

// Copies between the state and host arrays of the whole shard (checkpoints,
// resume). m or v NULL: not copied (read) or set to zero (write).
mt_err mt_store_read_all(mt_store *s, float *master, float *m, float *v);
// Values [lo, hi) of the shard into master, m, v (each NULL: not read),
// which get them from index 0 on; any range (with int8 moments the pass
// covers the whole quantization blocks that hold it).
mt_err mt_store_read_range(mt_store *s, size_t lo, size_t hi, float *master, float *m, float *v);
mt_err mt_store_write_all(mt_store *s, const float *master, const float *m, const float *v);

// int8 moments: the codes and block absmax of values [lo, hi) where that is
// one whole segment (a segment starts at lo and ends at hi), as they are in
// the store (pointers into its arrays, valid while it is open and no pass
// runs): m's and v's codes from lo, and their `blocks` absmax values; 0 if
// [lo, hi) is not a segment or the moments are fp32.
typedef struct {
    const uint8_t *mq, *vq;
    const float *m_absmax, *v_absmax;
    size_t blocks;
} mt_store_codes;
int mt_store_segment_codes(const mt_store *s, size_t lo, size_t hi, mt_store_codes *out);

// A copy of a memory store as it is now, in its own encoding (int8 moments
// stay codes), every array copied by every thread: a checkpoint written in
// the background reads the copy (with mt_store_read_range) while training
// goes on changing the store. No pass may run on s meanwhile. The copy is a
// store of its own (mt_store_close frees it); its host memory is not counted
// in the memory report's categories. mt_store_snapshot_bytes: what it takes
// (0: the file kind has none).
size_t mt_store_snapshot_bytes(const mt_store *s);
mt_err mt_store_snapshot(const mt_store *s, mt_store **copy);

// CRC-32C (Castagnoli) of len bytes continuing from crc (0 to start); the
// SSE4.2 instruction where the processor has it.
uint32_t mt_crc32c(uint32_t crc, const void *data, size_t len);

// Tests: replace pread/pwrite of the file kind (NULL restores them), to make
// short transfers, ENOSPC and EIO happen on demand.
typedef ssize_t (*mt_store_pread_fn)(int fd, void *buf, size_t len, off_t offset);
typedef ssize_t (*mt_store_pwrite_fn)(int fd, const void *buf, size_t len, off_t offset);
void mt_store_set_io(mt_store *s, mt_store_pread_fn pread_fn, mt_store_pwrite_fn pwrite_fn);
// Tests: every file store opened after this call fails its write number
// after_writes + 1 (and later ones) with errno err; after_writes < 0 stops it.
void mt_store_inject_write_fault(int after_writes, int err);

#ifdef __cplusplus
}
#endif
#endif
