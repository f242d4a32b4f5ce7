// datasets/dataset.h: HDF5 token datasets (format in docs/formats.md) and the
// loader that turns them into (B, T) training batches. Owns the schema check
// at open, windowing, seeded shuffling, per-rank sharding, the held-out eval
// split and the resumable cursor.
#ifndef MT_DATASET_H
#define MT_DATASET_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MT_DATASET_FORMAT_VERSION 1

typedef struct mt_dataset mt_dataset;

// Opens and validates `path`: dataset names, dtypes, ranks and lengths,
// doc_offsets monotone from 0 to the token count, every token id below the
// file's vocab_size attribute and below model_vocab_size (when > 0).
// Errors name the file, the field, what was expected and what was found.
mt_err mt_dataset_open(mt_dataset **out, const char *path, int model_vocab_size);
void mt_dataset_free(mt_dataset *ds);

uint64_t mt_dataset_num_tokens(const mt_dataset *ds);
uint64_t mt_dataset_num_docs(const mt_dataset *ds);
int mt_dataset_vocab_size(const mt_dataset *ds);
const char *mt_dataset_tokenizer(const mt_dataset *ds);
// > 0: the file holds one example per window of this many tokens (memtune
// tokenize --pack pad); the loader then requires T to equal it.
int mt_dataset_window(const mt_dataset *ds);

typedef enum { MT_SPLIT_TRAIN, MT_SPLIT_EVAL } mt_split;

typedef struct {
    int B, T;              // rows per batch, tokens per row
    uint64_t seed;         // shuffle seed
    int rank, world;       // data-parallel shard
    double eval_fraction;  // share of windows held out for eval (at the end)
    int documents;         // rows keep documents apart: positions restart at each document's
                           // start and no target crosses into the next document
} mt_loader_config;

// Where a loader is: restoring it restores the exact batch sequence.
typedef struct {
    uint64_t epoch, batch;
} mt_cursor;

typedef struct mt_loader mt_loader;

// The token stream is cut into windows of T+1 tokens at stride T; the last
// eval_fraction of them (at least one when eval_fraction > 0) are the eval
// split. Train windows are shuffled per epoch from (seed, epoch); rank r of
// `world` takes every world-th window of that order. Eval is sequential.
mt_err mt_loader_init(mt_loader **out, const mt_dataset *ds, const mt_loader_config *cfg, mt_split split);
void mt_loader_free(mt_loader *l);

// Fills inputs and targets (B*T each); a target is -1 where the dataset's
// loss_mask is 0 and, with documents, where it is the first token of the
// next document (doc_offsets). Returns the number of targets that count.
mt_err mt_loader_next(mt_loader *l, int32_t *inputs, int32_t *targets, int *valid);
// With documents: the (B, T) positions of the inputs mt_loader_next gave
// last, each token's place in its document (0 at a document's start and at
// each row's start), for mt_model_set_positions; NULL without.
const int32_t *mt_loader_positions(const mt_loader *l);
uint64_t mt_loader_batches_per_epoch(const mt_loader *l);
mt_cursor mt_loader_get_cursor(const mt_loader *l);
void mt_loader_set_cursor(mt_loader *l, mt_cursor c);

// Writes a dataset file as it streams in, under a temporary name that
// closing renames (commit) or removes: tokens (and their loss mask when
// with_mask) are added in order, end_doc closes a document. Memory stays
// bounded by a fixed buffer, whatever the file's size.
typedef struct mt_dataset_writer mt_dataset_writer;
mt_err mt_dataset_writer_open(mt_dataset_writer **out, const char *path, int with_mask);
// mask NULL: every token trained.
void mt_dataset_writer_add(mt_dataset_writer *w, const uint32_t *tokens, const uint8_t *mask, size_t n);
void mt_dataset_writer_end_doc(mt_dataset_writer *w);
uint64_t mt_dataset_writer_tokens(const mt_dataset_writer *w);
// window > 0 records the packing window (mt_dataset_window). A failed write
// (or commit 0) leaves no file behind.
mt_err mt_dataset_writer_close(mt_dataset_writer *w, int commit, int vocab_size, const char *tokenizer, int window);

// Writes a whole dataset file at once (tests). loss_mask may be NULL.
mt_err mt_dataset_write(const char *path, const uint32_t *tokens, uint64_t num_tokens, const uint64_t *doc_offsets,
                        uint64_t num_docs, const uint8_t *loss_mask, int vocab_size, const char *tokenizer);

#ifdef __cplusplus
}
#endif
#endif
