// trainer/checkpoint.c: writing, finding and reading checkpoints (checkpoint.h).
#define _POSIX_C_SOURCE 200809L
#include "trainer/checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "datasets/h5util.h"
#include "kernels/ops.h"
#include "offload/cpu_adam.h"
#include "trainer/fsutil.h"
#include "trainer/hf.h"
#include "trainer/lora.h"

#define MT_CHECKPOINT_FORMAT 1
#define MT_VERSION_STRING "0.1.0"

// Values read from a source at a time (4 MiB of fp32).
enum { kSourceChunk = 1 << 20 };

// The trained parameters' table: the model's, or the adapters' with LoRA.
static mt_param_info *trained_table(const mt_model_config *mc, const mt_lora_config *lora, int *n, size_t *total) {
    return lora && lora->r > 0 ? mt_lora_param_table(mc, lora, n, total) : mt_model_param_table(mc, n, total);
}

// state.h5: the attributes of meta and AdamW's moments by the table's names.
// The group optimizer/NAME, made if it is not there yet.
static hid_t param_group(hid_t opt, const char *name) {
    if (H5Lexists(opt, name, H5P_DEFAULT) > 0) return H5Gopen2(opt, name, H5P_DEFAULT);
    return H5Gcreate2(opt, name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
}

// Optimizer tensors by parameter: opt/PARAM/NAME; those without data read
// from their source a chunk at a time (*src_err: its error, if it failed).
static int write_tensors(hid_t opt, const mt_state_tensor *extra, int n_extra, mt_err *src_err) {
    int ok = 1;
    float *buf = NULL;
    *src_err = MT_OK;
    for (int i = 0; i < n_extra && ok; i++) {
        const mt_state_tensor *t = &extra[i];
        hid_t g = param_group(opt, t->param);
        if (!t->data && !buf) MT_CHECK((buf = malloc(kSourceChunk * sizeof *buf)) != NULL, "checkpoint buffer");
        ok = g >= 0 &&
             (!t->data   ? mt_h5_write_floats_from(g, &t->name, &t->source, 1, 0, t->count, buf, kSourceChunk, src_err)
              : t->is_u8 ? mt_h5_write_vector(g, t->name, H5T_STD_U8LE, H5T_NATIVE_UCHAR, t->data, t->count)
                         : mt_h5_write_vector(g, t->name, H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, t->data, t->count));
        if (g >= 0) H5Gclose(g);
    }
    free(buf);
    return ok;
}

// Parameter p's moments from the arrays m and v, or from their sources
// (from[1] exp_avg, from[2] exp_avg_sq) through buf, a chunk of each in turn.
static int write_moments(hid_t g, const mt_param_info *p, const float *m, const float *v, const mt_f32_source *from,
                         float *buf, mt_err *src_err) {
    if (m)
        return mt_h5_write_vector(g, "exp_avg", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, m + p->offset, p->count) &&
               mt_h5_write_vector(g, "exp_avg_sq", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, v + p->offset, p->count);
    static const char *const names[2] = {"exp_avg", "exp_avg_sq"};
    const mt_f32_source *const srcs[2] = {&from[1], &from[2]};
    return mt_h5_write_floats_from(g, names, srcs, 2, p->offset, p->count, buf, kSourceChunk, src_err);
}

static mt_err write_state(const char *path, const mt_param_info *table, int n, const float *m, const float *v,
                          const mt_f32_source *from, const mt_state_tensor *extra, int n_extra,
                          const mt_checkpoint_meta *meta) {
    hid_t file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (file < 0) return mt_errorf(MT_ERR_IO, "%s: cannot create the checkpoint state", path);
    int format = MT_CHECKPOINT_FORMAT;
    long long step = meta->step, opt_steps = meta->optimizer_steps;
    unsigned long long epoch = meta->data_epoch, batch = meta->data_batch, hash = meta->config_hash;
    hid_t str = H5Tcopy(H5T_C_S1);
    H5Tset_size(str, strlen(MT_VERSION_STRING) + 1);
    int ok = mt_h5_write_scalar(file, "format_version", H5T_NATIVE_INT, &format) &&
             mt_h5_write_scalar(file, "memtune_version", str, MT_VERSION_STRING) &&
             mt_h5_write_scalar(file, "step", H5T_NATIVE_LLONG, &step) &&
             mt_h5_write_scalar(file, "optimizer_steps", H5T_NATIVE_LLONG, &opt_steps) &&
             mt_h5_write_scalar(file, "data_epoch", H5T_NATIVE_ULLONG, &epoch) &&
             mt_h5_write_scalar(file, "data_batch", H5T_NATIVE_ULLONG, &batch) &&
             mt_h5_write_scalar(file, "config_hash", H5T_NATIVE_ULLONG, &hash);
    int shards = meta->shards;
    if (ok && shards > 0) ok = mt_h5_write_scalar(file, "moment_shards", H5T_NATIVE_INT, &shards);
    H5Tclose(str);
    hid_t opt = ok ? H5Gcreate2(file, "optimizer", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT) : -1;
    ok = ok && opt >= 0;
    // MeZO keeps no moments (an empty group); sharded, they are in the shard files
    float *buf = from ? malloc(kSourceChunk * sizeof *buf) : NULL;
    MT_CHECK(!from || buf, "checkpoint buffer");
    mt_err src_err = MT_OK;
    int fp32 = m || (from && from[1].read);  // (else the moments are extra's 8-bit codes, or there are none)
    for (int i = 0; i < n && ok && fp32 && shards == 0; i++) {
        // one group per parameter, named as torch's AdamW names its state
        hid_t g = H5Gcreate2(opt, table[i].name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        ok = g >= 0 && write_moments(g, &table[i], m, v, from, buf, &src_err);
        if (g >= 0) H5Gclose(g);
    }
    free(buf);
    mt_err tensors_err = MT_OK;
    ok = ok && write_tensors(opt, extra, n_extra, &tensors_err);
    if (!src_err) src_err = tensors_err;
    if (opt >= 0) H5Gclose(opt);
    ok = H5Fclose(file) >= 0 && ok;
    if (ok && mt_fsync_path(path) != 0) ok = 0;
    if (src_err) return src_err;  // its message names the problem
    return ok ? MT_OK : mt_errorf(MT_ERR_IO, "%s: writing the checkpoint state failed (disk full?)", path);
}

static int parse_step_name(const char *name, long *step) {
    char *end = NULL;
    if (strncmp(name, "step-", 5) != 0) return 0;
    long s = strtol(name + 5, &end, 10);
    if (end == name + 5 || *end != '\0' || s < 0) return 0;
    *step = s;
    return 1;
}

// Complete checkpoints of run_dir, sorted by step (ascending); count returned.
static int list_checkpoints(const char *run_dir, long **steps) {
    char dir[1100];
    snprintf(dir, sizeof dir, "%s/checkpoints", run_dir);
    *steps = NULL;
    DIR *d = opendir(dir);
    if (!d) return 0;
    int count = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        long s;
        char state[1400];
        if (!parse_step_name(e->d_name, &s)) continue;
        snprintf(state, sizeof state, "%s/%s/state.h5", dir, e->d_name);
        if (access(state, R_OK) != 0) continue;
        if (count == cap) *steps = realloc(*steps, (size_t)(cap = cap ? 2 * cap : 8) * sizeof **steps);
        (*steps)[count++] = s;
    }
    closedir(d);
    for (int i = 1; i < count; i++)  // few entries: insertion sort
        for (int j = i; j > 0 && (*steps)[j - 1] > (*steps)[j]; j--) {
            long t = (*steps)[j];
            (*steps)[j] = (*steps)[j - 1];
            (*steps)[j - 1] = t;
        }
    return count;
}

void mt_checkpoint_folder_name(const char *run_dir, long step, long tag, char *tmp, size_t len) {
    snprintf(tmp, len, "%s/checkpoints/.step-%08ld.tmp.%ld", run_dir, step, tag);
}

mt_err mt_checkpoint_prepare(const char *run_dir, long step, long tag, char *tmp, size_t len) {
    mt_checkpoint_folder_name(run_dir, step, tag, tmp, len);
    mt_remove_tree(tmp);  // a stale one of an earlier attempt
    return mt_make_dirs(tmp);
}

void mt_checkpoint_abandon(const char *tmp) { mt_remove_tree(tmp); }

static void shard_file_name(const char *folder, int rank, int world, char *path, size_t len) {
    snprintf(path, len, "%s/state-rank-%05d-of-%05d.h5", folder, rank, world);
}

mt_err mt_checkpoint_write_shard(const char *tmp, int rank, int world, size_t lo, size_t hi, size_t total,
                                 const float *m, const float *v, const mt_state_tensor *extra, int n_extra) {
    char path[1300];
    shard_file_name(tmp, rank, world, path, sizeof path);
    hid_t file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (file < 0) return mt_errorf(MT_ERR_IO, "%s: cannot create the checkpoint shard", path);
    unsigned long long a = lo, b = hi, n = total;
    mt_err src_err = MT_OK;
    int ok = mt_h5_write_scalar(file, "rank", H5T_NATIVE_INT, &rank) &&
             mt_h5_write_scalar(file, "world", H5T_NATIVE_INT, &world) &&
             mt_h5_write_scalar(file, "lo", H5T_NATIVE_ULLONG, &a) &&
             mt_h5_write_scalar(file, "hi", H5T_NATIVE_ULLONG, &b) &&
             mt_h5_write_scalar(file, "total", H5T_NATIVE_ULLONG, &n);
    if (ok && m)
        ok = mt_h5_write_vector(file, "exp_avg", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, m, hi - lo) &&
             mt_h5_write_vector(file, "exp_avg_sq", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, v, hi - lo);
    if (ok && n_extra > 0) {
        hid_t opt = H5Gcreate2(file, "optimizer", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        ok = opt >= 0 && write_tensors(opt, extra, n_extra, &src_err);
        if (opt >= 0) H5Gclose(opt);
    }
    ok = H5Fclose(file) >= 0 && ok;
    if (ok && mt_fsync_path(path) != 0) ok = 0;
    if (src_err) return src_err;  // its message names the problem
    return ok ? MT_OK : mt_errorf(MT_ERR_IO, "%s: writing the checkpoint shard failed (disk full?)", path);
}

// mt_checkpoint_publish, with the state from host arrays or (from not NULL, full fine-tunes) read from sources.
static mt_err publish(const char *tmp, const char *run_dir, const char *src_model_dir, const mt_model_config *mc,
                      const mt_lora_config *lora, const float *master, const float *m, const float *v,
                      const mt_f32_source *from, const mt_state_tensor *extra, int n_extra,
                      const mt_checkpoint_meta *meta, int keep) {
    char dir[1100], final[1200], path[1300];
    snprintf(dir, sizeof dir, "%s/checkpoints", run_dir);
    snprintf(final, sizeof final, "%s/step-%08ld", dir, meta->step);
    int n;
    size_t total;
    mt_param_info *table = trained_table(mc, lora, &n, &total);
    mt_err err;
    if (lora && lora->r > 0) {
        snprintf(path, sizeof path, "%s/adapter", tmp);
        err = mt_lora_save(path, lora, src_model_dir, table, n, master);
    } else {
        snprintf(path, sizeof path, "%s/model", tmp);
        err = from ? mt_hf_save_from(path, src_model_dir, mc, &from[0], MT_DTYPE_F32)
                   : mt_hf_save(path, src_model_dir, mc, master, MT_DTYPE_F32);
    }
    // state.h5 last: with shards, it is the completion marker of a folder
    // whose shard files every rank has written and fsynced
    snprintf(path, sizeof path, "%s/state.h5", tmp);
    if (!err) err = write_state(path, table, n, m, v, from, extra, n_extra, meta);
    free(table);
    if (!err && mt_fsync_path(tmp) != 0) err = mt_errorf(MT_ERR_IO, "%s: fsync failed (%s)", tmp, strerror(errno));
    if (!err) {
        mt_remove_tree(final);  // a complete checkpoint of the same step (a rerun) is replaced
        if (rename(tmp, final) != 0 || mt_fsync_path(dir) != 0)
            err = mt_errorf(MT_ERR_IO, "%s: cannot move the checkpoint into place (%s)", final, strerror(errno));
    }
    if (err) {
        mt_remove_tree(tmp);
        return err;
    }
    long *steps;
    int count = list_checkpoints(run_dir, &steps);
    for (int i = 0; i + keep < count; i++) {
        snprintf(path, sizeof path, "%s/step-%08ld", dir, steps[i]);
        mt_remove_tree(path);
    }
    free(steps);
    return MT_OK;
}

mt_err mt_checkpoint_publish(const char *tmp, const char *run_dir, const char *src_model_dir, const mt_model_config *mc,
                             const mt_lora_config *lora, const float *master, const float *m, const float *v,
                             const mt_state_tensor *extra, int n_extra, const mt_checkpoint_meta *meta, int keep) {
    return publish(tmp, run_dir, src_model_dir, mc, lora, master, m, v, NULL, extra, n_extra, meta, keep);
}

int mt_checkpoint_background_ok(void) {
    hbool_t safe = 0;
    return H5is_library_threadsafe(&safe) >= 0 && safe;
}

// Prepare and publish in one process.
static mt_err write_checkpoint(const char *run_dir, const char *src_model_dir, const mt_model_config *mc,
                               const mt_lora_config *lora, const float *master, const float *m, const float *v,
                               const mt_f32_source *from, const mt_state_tensor *extra, int n_extra,
                               const mt_checkpoint_meta *meta, int keep) {
    char tmp[1200];
    mt_err err = mt_checkpoint_prepare(run_dir, meta->step, (long)getpid(), tmp, sizeof tmp);
    if (err) return err;
    return publish(tmp, run_dir, src_model_dir, mc, lora, master, m, v, from, extra, n_extra, meta, keep);
}

mt_err mt_checkpoint_write(const char *run_dir, const char *src_model_dir, const mt_model_config *mc,
                           const mt_lora_config *lora, const float *master, const float *m, const float *v,
                           const mt_state_tensor *extra, int n_extra, const mt_checkpoint_meta *meta, int keep) {
    return write_checkpoint(run_dir, src_model_dir, mc, lora, master, m, v, NULL, extra, n_extra, meta, keep);
}

mt_err mt_checkpoint_write_from(const char *run_dir, const char *src_model_dir, const mt_model_config *mc,
                                const mt_f32_source from[3], const mt_state_tensor *extra, int n_extra,
                                const mt_checkpoint_meta *meta, int keep) {
    return write_checkpoint(run_dir, src_model_dir, mc, NULL, NULL, NULL, NULL, from, extra, n_extra, meta, keep);
}

void mt_checkpoint_find_latest(const char *run_dir, char *out, size_t len) {
    long *steps;
    int count = list_checkpoints(run_dir, &steps);
    if (count)
        snprintf(out, len, "%s/checkpoints/step-%08ld", run_dir, steps[count - 1]);
    else if (len)
        out[0] = '\0';
    free(steps);
}

// Values [start, start + count) of the 1-D dataset `name`, which must hold n.
static int read_slice(hid_t loc, const char *name, hid_t memtype, void *data, size_t n, size_t start, size_t count) {
    if (H5Lexists(loc, name, H5P_DEFAULT) <= 0) return 0;
    hid_t d = H5Dopen2(loc, name, H5P_DEFAULT);
    if (d < 0) return 0;
    hid_t space = H5Dget_space(d);
    hsize_t dims[1] = {0}, at[1] = {start}, len[1] = {count};
    int ok = H5Sget_simple_extent_ndims(space) == 1 && H5Sget_simple_extent_dims(space, dims, NULL) == 1 &&
             dims[0] == n && start + count <= n;
    if (ok && count > 0) {
        hid_t mem = H5Screate_simple(1, len, NULL);
        ok = H5Sselect_hyperslab(space, H5S_SELECT_SET, at, NULL, len, NULL) >= 0 &&
             H5Dread(d, memtype, mem, space, H5P_DEFAULT, data) >= 0;
        H5Sclose(mem);
    }
    H5Sclose(space);
    H5Dclose(d);
    return ok;
}

static int read_vector(hid_t loc, const char *name, hid_t memtype, void *data, size_t n) {
    return read_slice(loc, name, memtype, data, n, 0, n);
}

// Values [start, start + count) of a parameter of n values whose moments are
// kept as 8-bit codes (exp_avg_q8, exp_avg_sq_q8, and exp_avg_absmax,
// exp_avg_sq_absmax per block of MT_QBLOCK values from its first: offload's
// int8 moments), decoded into m and v as the store decodes them.
static int read_coded_slice(hid_t g, size_t n, size_t start, size_t count, float *m, float *v) {
    size_t b0 = start / MT_QBLOCK, b1 = (start + count + MT_QBLOCK - 1) / MT_QBLOCK, blocks = b1 - b0;
    size_t lo = b0 * MT_QBLOCK, hi = b1 * MT_QBLOCK < n ? b1 * MT_QBLOCK : n, len = hi - lo;
    uint8_t *q = malloc(2 * len);
    float *absmax = malloc(2 * blocks * sizeof *absmax), *dm = malloc(2 * len * sizeof *dm);
    MT_CHECK(q && absmax && dm, "checkpoint codes");
    size_t all = (n + MT_QBLOCK - 1) / MT_QBLOCK;
    int ok = read_slice(g, "exp_avg_q8", H5T_NATIVE_UCHAR, q, n, lo, len) &&
             read_slice(g, "exp_avg_sq_q8", H5T_NATIVE_UCHAR, q + len, n, lo, len) &&
             read_slice(g, "exp_avg_absmax", H5T_NATIVE_FLOAT, absmax, all, b0, blocks) &&
             read_slice(g, "exp_avg_sq_absmax", H5T_NATIVE_FLOAT, absmax + blocks, all, b0, blocks);
    if (ok) {
        mt_cpu_qblocks_code(q, q + len, absmax, absmax + blocks, dm, dm + len, len, 0);
        memcpy(m, dm + (start - lo), count * sizeof *m);
        memcpy(v, dm + len + (start - lo), count * sizeof *v);
    }
    free(q), free(absmax), free(dm);
    return ok;
}

// Values [start, start + count) of a parameter's moments, fp32 or 8-bit codes.
static int read_moments(hid_t g, size_t n, size_t start, size_t count, float *m, float *v) {
    if (H5Lexists(g, "exp_avg_q8", H5P_DEFAULT) > 0) return read_coded_slice(g, n, start, count, m, v);
    return read_slice(g, "exp_avg", H5T_NATIVE_FLOAT, m, n, start, count) &&
           read_slice(g, "exp_avg_sq", H5T_NATIVE_FLOAT, v, n, start, count);
}

// The moments [lo, hi) of the trained block from the shard files of a
// checkpoint written by `shards` ranks (any number may read it).
static mt_err read_sharded_moments(const char *dir, int shards, size_t total, size_t lo, size_t hi, float *m,
                                   float *v) {
    size_t covered = 0;
    for (int r = 0; r < shards; r++) {
        char path[1300];
        shard_file_name(dir, r, shards, path, sizeof path);
        hid_t file = access(path, R_OK) == 0 ? H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT) : -1;
        if (file < 0)
            return mt_errorf(MT_ERR_FORMAT, "%s: missing; the checkpoint's optimizer state is incomplete", path);
        unsigned long long a = 0, b = 0, n = 0;
        int ok = mt_h5_read_scalar(file, "lo", H5T_NATIVE_ULLONG, &a) &&
                 mt_h5_read_scalar(file, "hi", H5T_NATIVE_ULLONG, &b) &&
                 mt_h5_read_scalar(file, "total", H5T_NATIVE_ULLONG, &n) && n == total && a <= b && b <= n;
        size_t from = a > lo ? a : lo, to = b < hi ? b : hi;
        if (ok && from < to) {
            ok = read_slice(file, "exp_avg", H5T_NATIVE_FLOAT, m + (from - lo), b - a, from - a, to - from) &&
                 read_slice(file, "exp_avg_sq", H5T_NATIVE_FLOAT, v + (from - lo), b - a, from - a, to - from);
            covered += to - from;
        }
        H5Fclose(file);
        if (!ok)
            return mt_errorf(MT_ERR_FORMAT,
                             "%s: bad shard (its range or size does not fit a block of %zu values); the checkpoint "
                             "was written for another model",
                             path, total);
    }
    if (covered != hi - lo)
        return mt_errorf(MT_ERR_FORMAT, "%s: the %d shard files cover %zu of the %zu optimizer values wanted", dir,
                         shards, covered, hi - lo);
    return MT_OK;
}

mt_err mt_checkpoint_read(const char *dir, const mt_model_config *mc, const mt_lora_config *lora, float *master,
                          size_t lo, size_t hi, float *m, float *v, mt_checkpoint_meta *meta) {
    char path[1300];
    snprintf(path, sizeof path, "%s/state.h5", dir);
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t file = access(path, R_OK) == 0 ? H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT) : -1;
    if (file < 0)
        return mt_errorf(MT_ERR_IO,
                         "%s: no readable state.h5; train.resume must name a checkpoint folder "
                         "(OUTPUT/checkpoints/step-N) or be auto",
                         dir);
    int format = 0;
    long long step = 0, opt_steps = 0;
    unsigned long long epoch = 0, batch = 0, hash = 0;
    int ok = mt_h5_read_scalar(file, "format_version", H5T_NATIVE_INT, &format) && format == MT_CHECKPOINT_FORMAT &&
             mt_h5_read_scalar(file, "step", H5T_NATIVE_LLONG, &step) &&
             mt_h5_read_scalar(file, "optimizer_steps", H5T_NATIVE_LLONG, &opt_steps) &&
             mt_h5_read_scalar(file, "data_epoch", H5T_NATIVE_ULLONG, &epoch) &&
             mt_h5_read_scalar(file, "data_batch", H5T_NATIVE_ULLONG, &batch) &&
             mt_h5_read_scalar(file, "config_hash", H5T_NATIVE_ULLONG, &hash);
    int shards = 0;
    if (ok && !mt_h5_read_scalar(file, "moment_shards", H5T_NATIVE_INT, &shards)) shards = 0;
    mt_err err = ok ? MT_OK
                    : mt_errorf(MT_ERR_FORMAT,
                                "%s: missing or bad attributes (format_version %d; this memtune "
                                "reads %d)",
                                path, format, MT_CHECKPOINT_FORMAT);
    int n;
    size_t total;
    mt_param_info *table = trained_table(mc, lora, &n, &total);
    hid_t opt = !err && H5Lexists(file, "optimizer", H5P_DEFAULT) > 0 ? H5Gopen2(file, "optimizer", H5P_DEFAULT) : -1;
    if (!err && opt < 0) err = mt_errorf(MT_ERR_FORMAT, "%s: no optimizer group", path);
    if (m && hi > lo) memset(m, 0, (hi - lo) * sizeof(float)), memset(v, 0, (hi - lo) * sizeof(float));  // gaps
    if (!err && m && shards > 0) err = read_sharded_moments(dir, shards, total, lo, hi, m, v);
    for (int i = 0; i < n && !err && m && shards == 0; i++) {
        size_t a = table[i].offset, b = a + table[i].count, from = a > lo ? a : lo, to = b < hi ? b : hi;
        if (from >= to) continue;
        hid_t g = H5Lexists(opt, table[i].name, H5P_DEFAULT) > 0 ? H5Gopen2(opt, table[i].name, H5P_DEFAULT) : -1;
        if (g < 0 || !read_moments(g, table[i].count, from - a, to - from, m + (from - lo), v + (from - lo)))
            err = mt_errorf(MT_ERR_FORMAT,
                            "%s: optimizer state of %s is missing or has the wrong size; the "
                            "checkpoint was written for another model",
                            path, table[i].name);
        if (g >= 0) H5Gclose(g);
    }
    if (opt >= 0) H5Gclose(opt);
    H5Fclose(file);
    free(table);
    if (!err && lora && lora->r > 0) {
        snprintf(path, sizeof path, "%s/adapter", dir);
        err = mt_lora_load(path, mc, lora, master);
    } else if (!err && master) {
        snprintf(path, sizeof path, "%s/model", dir);
        err = mt_hf_load_weights(path, mc, master);
    }
    if (!err) *meta = (mt_checkpoint_meta){(long)step, epoch, batch, (int)opt_steps, hash, shards};
    return err;
}

// The extra tensors into their data, or (into not NULL) values [lo, hi) of
// the one tensor extra[0] into `into`.
static mt_err read_extra(const char *dir, const mt_state_tensor *extra, int n_extra, size_t lo, size_t hi, void *into) {
    char path[1300];
    snprintf(path, sizeof path, "%s/state.h5", dir);
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (file < 0) return mt_errorf(MT_ERR_IO, "%s: cannot open the checkpoint state", path);
    // sharded (ZeRO): a tensor not in state.h5 is in the shard file of the rank that kept it
    int shards = 0;
    if (!mt_h5_read_scalar(file, "moment_shards", H5T_NATIVE_INT, &shards) || shards < 0) shards = 0;
    hid_t *groups = malloc((size_t)(2 * (shards + 1)) * sizeof *groups), *files = groups + shards + 1;
    MT_CHECK(groups != NULL, "checkpoint groups");
    files[0] = file;
    for (int r = 0; r < shards; r++) {
        char shard[1300];
        shard_file_name(dir, r, shards, shard, sizeof shard);
        files[r + 1] = access(shard, R_OK) == 0 ? H5Fopen(shard, H5F_ACC_RDONLY, H5P_DEFAULT) : -1;
    }
    for (int k = 0; k <= shards; k++)
        groups[k] = files[k] >= 0 && H5Lexists(files[k], "optimizer", H5P_DEFAULT) > 0
                        ? H5Gopen2(files[k], "optimizer", H5P_DEFAULT)
                        : -1;
    mt_err err = MT_OK;
    for (int i = 0; i < n_extra && !err; i++) {
        const mt_state_tensor *t = &extra[i];
        int found = 0;
        for (int k = 0; k <= shards && !found; k++) {
            hid_t g = groups[k] >= 0 && H5Lexists(groups[k], t->param, H5P_DEFAULT) > 0
                          ? H5Gopen2(groups[k], t->param, H5P_DEFAULT)
                          : -1;
            hid_t type = t->is_u8 ? H5T_NATIVE_UCHAR : H5T_NATIVE_FLOAT;
            found = g >= 0 && (into ? read_slice(g, t->name, type, into, t->count, lo, hi - lo)
                                    : read_vector(g, t->name, type, t->data, t->count));
            if (g >= 0) H5Gclose(g);
        }
        if (!found)
            err = mt_errorf(MT_ERR_FORMAT,
                            "%s: optimizer/%s/%s is missing%s or has the wrong size (want %zu values); the checkpoint "
                            "was written with other optim or galore settings (with galore.moments int8, also another "
                            "offload.optimizer: none against cpu or ssd); resume with the settings it was written with",
                            path, t->param, t->name, shards ? " (from it and its shard files)" : "", t->count);
    }
    for (int k = 0; k <= shards; k++) {
        if (groups[k] >= 0) H5Gclose(groups[k]);
        if (files[k] >= 0) H5Fclose(files[k]);
    }
    free(groups);
    return err;
}

mt_err mt_checkpoint_read_extra(const char *dir, const mt_state_tensor *extra, int n_extra) {
    return read_extra(dir, extra, n_extra, 0, 0, NULL);
}

mt_err mt_checkpoint_read_extra_range(const char *dir, const mt_state_tensor *t, size_t lo, size_t hi, void *dst) {
    return read_extra(dir, t, 1, lo, hi, dst);
}
