// datasets/dataset.c: HDF5 token datasets and the batch loader (dataset.h).
#define _POSIX_C_SOURCE 200809L
#include "datasets/dataset.h"

#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "datasets/h5util.h"
#include "kernels/rng.h"

struct mt_dataset {
    char path[1024];
    hid_t file, tokens, mask;  // mask < 0 when absent
    hid_t offsets;             // doc_offsets, kept open for the loader's document bounds
    uint64_t num_tokens, num_docs;
    int vocab_size;
    int window;  // > 0: packed one example per window of this many tokens
    char tokenizer[128];
};

// HDF5 prints its own error stack by default; we report our own messages.
static void quiet_hdf5(void) { H5Eset_auto2(H5E_DEFAULT, NULL, NULL); }

static mt_err schema_error(const mt_dataset *ds, const char *what) {
    return mt_errorf(MT_ERR_DATASET, "%s: %s. Make datasets with `memtune tokenize` (format: docs/formats.md).",
                     ds->path, what);
}

// Checks that `name` is a 1-D dataset of the given integer class/size/sign.
static mt_err open_vector(mt_dataset *ds, const char *name, size_t elem_size, H5T_sign_t sign, hid_t *out,
                          uint64_t *length) {
    char msg[512];
    if (H5Lexists(ds->file, name, H5P_DEFAULT) <= 0) {
        snprintf(msg, sizeof msg, "missing dataset '%s'", name);
        return schema_error(ds, msg);
    }
    hid_t d = H5Dopen2(ds->file, name, H5P_DEFAULT);
    if (d < 0) {
        snprintf(msg, sizeof msg, "cannot open dataset '%s'", name);
        return schema_error(ds, msg);
    }
    hid_t type = H5Dget_type(d), space = H5Dget_space(d);
    int rank = H5Sget_simple_extent_ndims(space);
    hsize_t dims[1] = {0};
    int ok_type = H5Tget_class(type) == H5T_INTEGER && H5Tget_size(type) == elem_size && H5Tget_sign(type) == sign;
    if (rank == 1) H5Sget_simple_extent_dims(space, dims, NULL);
    H5Tclose(type);
    H5Sclose(space);
    if (!ok_type || rank != 1) {
        H5Dclose(d);
        snprintf(msg, sizeof msg, "dataset '%s' must be a 1-D %s%zu array (found rank %d%s)", name,
                 sign == H5T_SGN_NONE ? "uint" : "int", elem_size * 8, rank, ok_type ? "" : ", wrong element type");
        return schema_error(ds, msg);
    }
    *out = d;
    *length = dims[0];
    return MT_OK;
}

static mt_err read_int_attribute(mt_dataset *ds, const char *name, long *value) {
    if (H5Aexists(ds->file, name) <= 0) {
        char msg[256];
        snprintf(msg, sizeof msg, "missing attribute '%s'", name);
        return schema_error(ds, msg);
    }
    long long v = 0;
    if (!mt_h5_read_scalar(ds->file, name, H5T_NATIVE_LLONG, &v))
        return schema_error(ds, "an integer attribute could not be read");
    *value = (long)v;
    return MT_OK;
}

static void read_string_attribute(mt_dataset *ds, const char *name, char *buf, size_t len) {
    buf[0] = '\0';
    if (H5Aexists(ds->file, name) <= 0) return;
    hid_t a = H5Aopen(ds->file, name, H5P_DEFAULT), type = H5Aget_type(a);
    if (H5Tget_class(type) == H5T_STRING) {
        hid_t mem = H5Tcopy(H5T_C_S1);
        if (H5Tis_variable_str(type) > 0) {
            H5Tset_size(mem, H5T_VARIABLE);
            char *s = NULL;
            if (H5Aread(a, mem, &s) >= 0 && s) {
                snprintf(buf, len, "%s", s);
                H5free_memory(s);
            }
        } else {
            H5Tset_size(mem, len);
            H5Tset_strpad(mem, H5T_STR_NULLTERM);
            H5Aread(a, mem, buf);
        }
        H5Tclose(mem);
    }
    H5Tclose(type);
    H5Aclose(a);
}

static herr_t read_range(hid_t d, hid_t memtype, uint64_t start, uint64_t count, void *buf) {
    hid_t space = H5Dget_space(d);
    hsize_t off[1] = {start}, cnt[1] = {count};
    H5Sselect_hyperslab(space, H5S_SELECT_SET, off, NULL, cnt, NULL);
    hid_t mem = H5Screate_simple(1, cnt, NULL);
    herr_t st = H5Dread(d, memtype, mem, space, H5P_DEFAULT, buf);
    H5Sclose(mem);
    H5Sclose(space);
    return st;
}

static mt_err validate(mt_dataset *ds, int model_vocab_size) {
    long version = 0, vocab = 0;
    mt_err err;
    if ((err = read_int_attribute(ds, "format_version", &version))) return err;
    if (version != MT_DATASET_FORMAT_VERSION) {
        char msg[256];
        snprintf(msg, sizeof msg, "format_version is %ld, this memtune reads version %d", version,
                 MT_DATASET_FORMAT_VERSION);
        return schema_error(ds, msg);
    }
    if ((err = read_int_attribute(ds, "vocab_size", &vocab))) return err;
    if (vocab <= 0 || vocab > (1L << 31)) return schema_error(ds, "attribute vocab_size must be positive");
    ds->vocab_size = (int)vocab;
    read_string_attribute(ds, "tokenizer", ds->tokenizer, sizeof ds->tokenizer);
    long window = 0;
    if (H5Aexists(ds->file, "window") > 0 && (err = read_int_attribute(ds, "window", &window))) return err;
    if (window < 0 || window > (1L << 30)) return schema_error(ds, "attribute window must be positive");
    ds->window = (int)window;
    if ((err = open_vector(ds, "tokens", 4, H5T_SGN_NONE, &ds->tokens, &ds->num_tokens))) return err;
    uint64_t num_offsets;
    if ((err = open_vector(ds, "doc_offsets", 8, H5T_SGN_NONE, &ds->offsets, &num_offsets))) return err;
    hid_t offsets = ds->offsets;
    char msg[512];
    if (num_offsets < 2) return schema_error(ds, "doc_offsets needs at least 2 entries (0 and the token count)");
    ds->num_docs = num_offsets - 1;
    // stream through offsets and tokens in blocks, so validation needs no big buffer
    const uint64_t block = 1 << 20;
    uint64_t *obuf = malloc(block * sizeof *obuf);
    uint32_t *tbuf = malloc(block * sizeof *tbuf);
    MT_CHECK(obuf && tbuf, "validation buffers");
    uint64_t prev = 0;
    err = MT_OK;
    for (uint64_t i = 0; i < num_offsets && !err; i += block) {
        uint64_t n = num_offsets - i < block ? num_offsets - i : block;
        if (read_range(offsets, H5T_NATIVE_UINT64, i, n, obuf) < 0) {
            err = schema_error(ds, "doc_offsets could not be read");
            break;
        }
        for (uint64_t j = 0; j < n; j++) {
            uint64_t o = obuf[j], idx = i + j;
            if ((idx == 0 && o != 0) || o < prev || (idx == num_offsets - 1 && o != ds->num_tokens)) {
                snprintf(msg, sizeof msg,
                         "doc_offsets[%llu] = %llu breaks the rule: start at 0, never decrease, end at the "
                         "token count %llu",
                         (unsigned long long)idx, (unsigned long long)o, (unsigned long long)ds->num_tokens);
                err = schema_error(ds, msg);
                break;
            }
            prev = o;
        }
    }
    int limit = ds->vocab_size;
    if (model_vocab_size > 0 && model_vocab_size < limit) limit = model_vocab_size;
    for (uint64_t i = 0; i < ds->num_tokens && !err; i += block) {
        uint64_t n = ds->num_tokens - i < block ? ds->num_tokens - i : block;
        if (read_range(ds->tokens, H5T_NATIVE_UINT32, i, n, tbuf) < 0) {
            err = schema_error(ds, "tokens could not be read");
            break;
        }
        for (uint64_t j = 0; j < n; j++)
            if (tbuf[j] >= (uint32_t)limit) {
                snprintf(msg, sizeof msg,
                         "token %llu has id %u, but ids must be below %d (%s vocab_size); the dataset was made "
                         "with another tokenizer (%s) than this model's",
                         (unsigned long long)(i + j), tbuf[j], limit,
                         limit == ds->vocab_size ? "the file's" : "the model's",
                         ds->tokenizer[0] ? ds->tokenizer : "unnamed");
                err = schema_error(ds, msg);
                break;
            }
    }
    free(obuf);
    free(tbuf);
    if (err) return err;
    ds->mask = -1;
    if (H5Lexists(ds->file, "loss_mask", H5P_DEFAULT) > 0) {
        uint64_t mask_len;
        if ((err = open_vector(ds, "loss_mask", 1, H5T_SGN_NONE, &ds->mask, &mask_len))) return err;
        if (mask_len != ds->num_tokens) {
            snprintf(msg, sizeof msg, "loss_mask has %llu entries, tokens has %llu: they must match",
                     (unsigned long long)mask_len, (unsigned long long)ds->num_tokens);
            return schema_error(ds, msg);
        }
    }
    return MT_OK;
}

mt_err mt_dataset_open(mt_dataset **out, const char *path, int model_vocab_size) {
    *out = NULL;
    quiet_hdf5();
    mt_dataset *ds = calloc(1, sizeof *ds);
    MT_CHECK(ds != NULL, "dataset handle");
    snprintf(ds->path, sizeof ds->path, "%s", path);
    ds->tokens = ds->mask = ds->offsets = -1;
    if (access(path, R_OK) != 0) {
        free(ds);
        return mt_errorf(MT_ERR_IO,
                         "%s: dataset file not found or not readable. Make one with `memtune tokenize "
                         "--input TEXT --output %s`.",
                         path, path);
    }
    ds->file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (ds->file < 0) {
        free(ds);
        return mt_errorf(MT_ERR_DATASET,
                         "%s: not an HDF5 file. memtune datasets are HDF5 (docs/formats.md); "
                         "convert text with `memtune tokenize`.",
                         path);
    }
    mt_err err = validate(ds, model_vocab_size);
    if (err) {
        mt_dataset_free(ds);
        return err;
    }
    *out = ds;
    return MT_OK;
}

void mt_dataset_free(mt_dataset *ds) {
    if (!ds) return;
    if (ds->mask >= 0) H5Dclose(ds->mask);
    if (ds->offsets >= 0) H5Dclose(ds->offsets);
    if (ds->tokens >= 0) H5Dclose(ds->tokens);
    if (ds->file >= 0) H5Fclose(ds->file);
    free(ds);
}

uint64_t mt_dataset_num_tokens(const mt_dataset *ds) { return ds->num_tokens; }
uint64_t mt_dataset_num_docs(const mt_dataset *ds) { return ds->num_docs; }
int mt_dataset_vocab_size(const mt_dataset *ds) { return ds->vocab_size; }
const char *mt_dataset_tokenizer(const mt_dataset *ds) { return ds->tokenizer; }
int mt_dataset_window(const mt_dataset *ds) { return ds->window; }

// ------------------------------------------------------------------- loader

struct mt_loader {
    const mt_dataset *ds;
    mt_loader_config cfg;
    mt_split split;
    uint64_t first_window, num_windows;  // this split's windows
    uint64_t *order;                     // this epoch's window order (train)
    uint64_t order_epoch;
    mt_cursor cursor;
    uint32_t *tokbuf;
    uint8_t *maskbuf;
    uint8_t *starts;  // documents: starts[t] = 1 where the window's token t begins one
    int32_t *pos;     // documents: (B, T) positions of the last batch's inputs
};

static void shuffle_epoch(mt_loader *l, uint64_t epoch) {
    for (uint64_t i = 0; i < l->num_windows; i++) l->order[i] = l->first_window + i;
    // Fisher-Yates with counter-based draws: the order depends only on (seed, epoch)
    for (uint64_t i = l->num_windows - 1; i > 0; i--) {
        uint64_t j = mt_rng_bits(l->cfg.seed ^ (0x5bd1e995ull * (epoch + 1)), i) % (i + 1);
        uint64_t t = l->order[i];
        l->order[i] = l->order[j];
        l->order[j] = t;
    }
    l->order_epoch = epoch;
}

mt_err mt_loader_init(mt_loader **out, const mt_dataset *ds, const mt_loader_config *cfg, mt_split split) {
    *out = NULL;
    MT_CHECK(cfg->B > 0 && cfg->T > 0 && cfg->world > 0 && cfg->rank >= 0 && cfg->rank < cfg->world, "loader cfg");
    if (ds->window > 0 && ds->window != cfg->T)
        return mt_errorf(MT_ERR_DATASET,
                         "%s was packed one example per window of %d tokens (memtune tokenize --seq-len %d), but "
                         "windows of %d were asked for: set train.seq_len: %d (memtune eval: --seq-len %d), or "
                         "tokenize again with --seq-len %d",
                         ds->path, ds->window, ds->window, cfg->T, ds->window, ds->window, cfg->T);
    uint64_t total = ds->num_tokens > 0 ? (ds->num_tokens - 1) / (uint64_t)cfg->T : 0;
    uint64_t eval = 0;
    if (cfg->eval_fraction > 0.0) {
        eval = (uint64_t)(total * cfg->eval_fraction);
        if (eval == 0) eval = 1;
    }
    if (eval >= total)
        return mt_errorf(MT_ERR_DATASET,
                         "%s: %llu tokens make %llu windows of %d+1 tokens, too few to hold out "
                         "%.3g of them for eval and train on the rest. Use more data, a shorter train.seq_len, or "
                         "data.eval_fraction: 0.",
                         ds->path, (unsigned long long)ds->num_tokens, (unsigned long long)total, cfg->T,
                         cfg->eval_fraction);
    mt_loader *l = calloc(1, sizeof *l);
    MT_CHECK(l != NULL, "loader");
    l->ds = ds;
    l->cfg = *cfg;
    l->split = split;
    l->first_window = split == MT_SPLIT_TRAIN ? 0 : total - eval;
    l->num_windows = split == MT_SPLIT_TRAIN ? total - eval : eval;
    uint64_t per_rank = l->num_windows / (uint64_t)cfg->world;
    if (per_rank < (uint64_t)cfg->B) {
        uint64_t windows = l->num_windows;
        free(l);
        return mt_errorf(MT_ERR_DATASET,
                         "%s: the %s split has %llu windows of %d+1 tokens, fewer than one batch "
                         "(%d rows x %d ranks). Use more data or lower train.micro_batch / train.seq_len.",
                         ds->path, split == MT_SPLIT_TRAIN ? "train" : "eval", (unsigned long long)windows, cfg->T,
                         cfg->B, cfg->world);
    }
    l->order = malloc(l->num_windows * sizeof *l->order);
    l->tokbuf = malloc(((size_t)cfg->T + 1) * sizeof *l->tokbuf);
    l->maskbuf = malloc((size_t)cfg->T + 1);
    MT_CHECK(l->order && l->tokbuf && l->maskbuf, "loader buffers");
    if (cfg->documents) {
        l->starts = malloc((size_t)cfg->T + 1);
        l->pos = malloc((size_t)cfg->B * cfg->T * sizeof *l->pos);
        MT_CHECK(l->starts && l->pos, "loader buffers");
    }
    if (split == MT_SPLIT_TRAIN)
        shuffle_epoch(l, 0);
    else
        for (uint64_t i = 0; i < l->num_windows; i++) l->order[i] = l->first_window + i;
    *out = l;
    return MT_OK;
}

void mt_loader_free(mt_loader *l) {
    if (!l) return;
    free(l->order);
    free(l->tokbuf);
    free(l->maskbuf);
    free(l->starts);
    free(l->pos);
    free(l);
}

const int32_t *mt_loader_positions(const mt_loader *l) { return l->pos; }

uint64_t mt_loader_batches_per_epoch(const mt_loader *l) {
    return l->num_windows / (uint64_t)l->cfg.world / (uint64_t)l->cfg.B;
}

mt_cursor mt_loader_get_cursor(const mt_loader *l) { return l->cursor; }

void mt_loader_set_cursor(mt_loader *l, mt_cursor c) {
    l->cursor = c;
    if (l->split == MT_SPLIT_TRAIN && l->order_epoch != c.epoch) shuffle_epoch(l, c.epoch);
}

// starts[t] = 1 (0 < t <= T) where token start + t begins a document: a
// binary search for the first offset past start, then the offsets up to
// start + T. Window tokens all lie before the token count, so every offset
// met there begins a document (empty ones included).
static herr_t document_starts(const mt_loader *l, uint64_t start, uint8_t *starts) {
    int T = l->cfg.T;
    memset(starts, 0, (size_t)T + 1);
    uint64_t lo = 1, hi = l->ds->num_docs, v;  // offsets[num_docs] = the token count > start
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (read_range(l->ds->offsets, H5T_NATIVE_UINT64, mid, 1, &v) < 0) return -1;
        if (v > start)
            hi = mid;
        else
            lo = mid + 1;
    }
    uint64_t block[64];
    for (uint64_t i = lo; i < l->ds->num_docs; i += 64) {
        uint64_t n = l->ds->num_docs - i < 64 ? l->ds->num_docs - i : 64;
        if (read_range(l->ds->offsets, H5T_NATIVE_UINT64, i, n, block) < 0) return -1;
        for (uint64_t j = 0; j < n; j++) {
            if (block[j] > start + (uint64_t)T) return 0;
            starts[block[j] - start] = 1;
        }
    }
    return 0;
}

mt_err mt_loader_next(mt_loader *l, int32_t *inputs, int32_t *targets, int *valid) {
    if (l->cursor.batch >= mt_loader_batches_per_epoch(l)) {
        l->cursor.batch = 0;
        l->cursor.epoch++;
        if (l->split == MT_SPLIT_TRAIN) shuffle_epoch(l, l->cursor.epoch);
    }
    int B = l->cfg.B, T = l->cfg.T, count = 0;
    for (int b = 0; b < B; b++) {
        uint64_t slot = (l->cursor.batch * (uint64_t)B + (uint64_t)b) * (uint64_t)l->cfg.world + (uint64_t)l->cfg.rank;
        uint64_t start = l->order[slot] * (uint64_t)T;
        if (read_range(l->ds->tokens, H5T_NATIVE_UINT32, start, (uint64_t)T + 1, l->tokbuf) < 0 ||
            (l->ds->mask >= 0 && read_range(l->ds->mask, H5T_NATIVE_UINT8, start, (uint64_t)T + 1, l->maskbuf) < 0))
            return mt_errorf(MT_ERR_IO, "%s: reading tokens %llu..%llu failed", l->ds->path, (unsigned long long)start,
                             (unsigned long long)(start + T));
        if (l->pos && document_starts(l, start, l->starts) < 0)
            return mt_errorf(MT_ERR_IO, "%s: reading doc_offsets near token %llu failed", l->ds->path,
                             (unsigned long long)start);
        for (int t = 0; t < T; t++) {
            inputs[b * T + t] = (int32_t)l->tokbuf[t];
            int keep = l->ds->mask < 0 || l->maskbuf[t + 1];
            if (l->pos) {
                // a row restarts positions where a document does; its last
                // token predicts nothing (the next token is another document's)
                l->pos[b * T + t] = t == 0 || l->starts[t] ? 0 : l->pos[b * T + t - 1] + 1;
                keep = keep && !l->starts[t + 1];
            }
            targets[b * T + t] = keep ? (int32_t)l->tokbuf[t + 1] : -1;
            count += keep;
        }
    }
    l->cursor.batch++;
    *valid = count;
    return MT_OK;
}

// ------------------------------------------------------------------- writer

struct mt_dataset_writer {
    char path[1024], tmp[1100];
    hid_t file, sets[3];  // tokens, doc_offsets, loss_mask (< 0 without one)
    uint64_t written[3];  // elements in the file
    uint32_t *tokens;     // buffered, not yet written
    uint8_t *mask;
    uint64_t *offsets;
    size_t n_tokens, n_offsets;
    uint64_t count;  // tokens so far, buffered ones included
    int failed;
};

enum { WRITER_BUFFER = 1 << 20 };

static hid_t extendable(hid_t file, const char *name, hid_t filetype) {
    hsize_t dims[1] = {0}, maxdims[1] = {H5S_UNLIMITED}, chunk[1] = {1 << 16};
    hid_t space = H5Screate_simple(1, dims, maxdims), dcpl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(dcpl, 1, chunk);
    hid_t d = H5Dcreate2(file, name, filetype, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    H5Pclose(dcpl);
    H5Sclose(space);
    return d;
}

static int append(mt_dataset_writer *w, int which, hid_t memtype, const void *data, size_t n) {
    if (n == 0 || w->sets[which] < 0) return 1;
    hsize_t size[1] = {w->written[which] + n}, off[1] = {w->written[which]}, cnt[1] = {n};
    if (H5Dset_extent(w->sets[which], size) < 0) return 0;
    hid_t space = H5Dget_space(w->sets[which]), mem = H5Screate_simple(1, cnt, NULL);
    H5Sselect_hyperslab(space, H5S_SELECT_SET, off, NULL, cnt, NULL);
    int ok = H5Dwrite(w->sets[which], memtype, mem, space, H5P_DEFAULT, data) >= 0;
    H5Sclose(mem);
    H5Sclose(space);
    w->written[which] += n;
    return ok;
}

static int flush(mt_dataset_writer *w) {
    int ok = append(w, 0, H5T_NATIVE_UINT32, w->tokens, w->n_tokens) &&
             append(w, 2, H5T_NATIVE_UINT8, w->mask, w->n_tokens) &&
             append(w, 1, H5T_NATIVE_UINT64, w->offsets, w->n_offsets);
    w->n_tokens = w->n_offsets = 0;
    if (!ok) w->failed = 1;
    return ok;
}

mt_err mt_dataset_writer_open(mt_dataset_writer **out, const char *path, int with_mask) {
    *out = NULL;
    quiet_hdf5();
    mt_dataset_writer *w = calloc(1, sizeof *w);
    MT_CHECK(w != NULL, "dataset writer");
    snprintf(w->path, sizeof w->path, "%s", path);
    snprintf(w->tmp, sizeof w->tmp, "%s.tmp.%d", path, (int)getpid());
    w->file = H5Fcreate(w->tmp, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (w->file < 0) {
        free(w);
        return mt_errorf(MT_ERR_IO, "%s: cannot create the file (does the folder exist and is it writable?)", path);
    }
    w->sets[0] = extendable(w->file, "tokens", H5T_STD_U32LE);
    w->sets[1] = extendable(w->file, "doc_offsets", H5T_STD_U64LE);
    w->sets[2] = with_mask ? extendable(w->file, "loss_mask", H5T_STD_U8LE) : -1;
    w->tokens = malloc(WRITER_BUFFER * sizeof *w->tokens);
    w->mask = malloc(WRITER_BUFFER);
    w->offsets = malloc(WRITER_BUFFER * sizeof *w->offsets);
    MT_CHECK(w->tokens && w->mask && w->offsets, "dataset writer buffers");
    w->failed = w->sets[0] < 0 || w->sets[1] < 0 || (with_mask && w->sets[2] < 0);
    w->offsets[w->n_offsets++] = 0;
    *out = w;
    return MT_OK;
}

void mt_dataset_writer_add(mt_dataset_writer *w, const uint32_t *tokens, const uint8_t *mask, size_t n) {
    while (n > 0) {
        size_t room = WRITER_BUFFER - w->n_tokens, k = n < room ? n : room;
        memcpy(w->tokens + w->n_tokens, tokens, k * sizeof *tokens);
        if (mask)
            memcpy(w->mask + w->n_tokens, mask, k);
        else
            memset(w->mask + w->n_tokens, 1, k);
        w->n_tokens += k, w->count += k, tokens += k, n -= k;
        if (mask) mask += k;
        if (w->n_tokens == WRITER_BUFFER) flush(w);
    }
}

void mt_dataset_writer_end_doc(mt_dataset_writer *w) {
    if (w->n_offsets == WRITER_BUFFER) flush(w);
    w->offsets[w->n_offsets++] = w->count;
}

uint64_t mt_dataset_writer_tokens(const mt_dataset_writer *w) { return w->count; }

mt_err mt_dataset_writer_close(mt_dataset_writer *w, int commit, int vocab_size, const char *tokenizer, int window) {
    if (!w) return MT_OK;
    int ok = commit && !w->failed && flush(w);
    if (ok) {
        int version = MT_DATASET_FORMAT_VERSION;
        long long vocab = vocab_size, win = window;
        hid_t str = H5Tcopy(H5T_C_S1);
        H5Tset_size(str, strlen(tokenizer) + 1);
        ok = mt_h5_write_scalar(w->file, "format_version", H5T_STD_I32LE, &version) &&
             mt_h5_write_scalar(w->file, "vocab_size", H5T_STD_I64LE, &vocab) &&
             mt_h5_write_scalar(w->file, "tokenizer", str, tokenizer) &&
             (window <= 0 || mt_h5_write_scalar(w->file, "window", H5T_STD_I64LE, &win));
        H5Tclose(str);
    }
    for (int i = 0; i < 3; i++)
        if (w->sets[i] >= 0) H5Dclose(w->sets[i]);
    ok = H5Fclose(w->file) >= 0 && ok;
    mt_err err = MT_OK;
    if (!ok || rename(w->tmp, w->path) != 0) {
        unlink(w->tmp);
        if (commit) err = mt_errorf(MT_ERR_IO, "%s: writing the dataset failed (disk full?)", w->path);
    }
    free(w->tokens), free(w->mask), free(w->offsets);
    free(w);
    return err;
}

mt_err mt_dataset_write(const char *path, const uint32_t *tokens, uint64_t num_tokens, const uint64_t *doc_offsets,
                        uint64_t num_docs, const uint8_t *loss_mask, int vocab_size, const char *tokenizer) {
    mt_dataset_writer *w;
    mt_err err = mt_dataset_writer_open(&w, path, loss_mask != NULL);
    if (err) return err;
    mt_dataset_writer_add(w, tokens, loss_mask, (size_t)num_tokens);
    w->n_offsets = 0;  // the offsets as given (tests write broken ones on purpose)
    for (uint64_t d = 0; d <= num_docs; d++) {
        if (w->n_offsets == WRITER_BUFFER) flush(w);
        w->offsets[w->n_offsets++] = doc_offsets[d];
    }
    return mt_dataset_writer_close(w, 1, vocab_size, tokenizer, 0);
}
