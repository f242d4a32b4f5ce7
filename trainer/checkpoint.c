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
#include "trainer/fsutil.h"
#include "trainer/hf.h"
#include "trainer/lora.h"

#define MT_CHECKPOINT_FORMAT 1
#define MT_VERSION_STRING "0.1.0"

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

static mt_err write_state(const char *path, const mt_param_info *table, int n, const float *m, const float *v,
                          const mt_state_tensor *extra, int n_extra, const mt_checkpoint_meta *meta) {
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
    H5Tclose(str);
    hid_t opt = ok ? H5Gcreate2(file, "optimizer", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT) : -1;
    ok = ok && opt >= 0;
    for (int i = 0; i < n && ok && m; i++) {  // MeZO keeps no moments: an empty group
        // one group per parameter, named as torch's AdamW names its state
        hid_t g = H5Gcreate2(opt, table[i].name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        ok = g >= 0 &&
             mt_h5_write_vector(g, "exp_avg", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, m + table[i].offset, table[i].count) &&
             mt_h5_write_vector(g, "exp_avg_sq", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, v + table[i].offset, table[i].count);
        if (g >= 0) H5Gclose(g);
    }
    for (int i = 0; i < n_extra && ok; i++) {
        hid_t g = param_group(opt, extra[i].param);
        ok = g >= 0 && (extra[i].is_u8 ? mt_h5_write_vector(g, extra[i].name, H5T_STD_U8LE, H5T_NATIVE_UCHAR,
                                                            extra[i].data, extra[i].count)
                                       : mt_h5_write_vector(g, extra[i].name, H5T_IEEE_F32LE, H5T_NATIVE_FLOAT,
                                                            extra[i].data, extra[i].count));
        if (g >= 0) H5Gclose(g);
    }
    if (opt >= 0) H5Gclose(opt);
    ok = H5Fclose(file) >= 0 && ok;
    if (ok && mt_fsync_path(path) != 0) ok = 0;
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

mt_err mt_checkpoint_write(const char *run_dir, const char *src_model_dir, const mt_model_config *mc,
                           const mt_lora_config *lora, const float *master, const float *m, const float *v,
                           const mt_state_tensor *extra, int n_extra, const mt_checkpoint_meta *meta, int keep) {
    char dir[1100], tmp[1200], final[1200], path[1300];
    snprintf(dir, sizeof dir, "%s/checkpoints", run_dir);
    mt_err err = mt_make_dirs(dir);
    if (err) return err;
    snprintf(tmp, sizeof tmp, "%s/.step-%08ld.tmp.%d", dir, meta->step, (int)getpid());
    snprintf(final, sizeof final, "%s/step-%08ld", dir, meta->step);
    mt_remove_tree(tmp);
    if ((err = mt_make_dirs(tmp))) return err;
    int n;
    size_t total;
    mt_param_info *table = trained_table(mc, lora, &n, &total);
    if (lora && lora->r > 0) {
        snprintf(path, sizeof path, "%s/adapter", tmp);
        err = mt_lora_save(path, lora, src_model_dir, table, n, master);
    } else {
        snprintf(path, sizeof path, "%s/model", tmp);
        err = mt_hf_save(path, src_model_dir, mc, master, MT_DTYPE_F32);
    }
    snprintf(path, sizeof path, "%s/state.h5", tmp);
    if (!err) err = write_state(path, table, n, m, v, extra, n_extra, meta);
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

void mt_checkpoint_find_latest(const char *run_dir, char *out, size_t len) {
    long *steps;
    int count = list_checkpoints(run_dir, &steps);
    if (count)
        snprintf(out, len, "%s/checkpoints/step-%08ld", run_dir, steps[count - 1]);
    else if (len)
        out[0] = '\0';
    free(steps);
}

static int read_vector(hid_t loc, const char *name, hid_t memtype, void *data, size_t n) {
    if (H5Lexists(loc, name, H5P_DEFAULT) <= 0) return 0;
    hid_t d = H5Dopen2(loc, name, H5P_DEFAULT);
    if (d < 0) return 0;
    hid_t space = H5Dget_space(d);
    hsize_t dims[1] = {0};
    int ok = H5Sget_simple_extent_ndims(space) == 1 && H5Sget_simple_extent_dims(space, dims, NULL) == 1 &&
             dims[0] == n && H5Dread(d, memtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) >= 0;
    H5Sclose(space);
    H5Dclose(d);
    return ok;
}

mt_err mt_checkpoint_read(const char *dir, const mt_model_config *mc, const mt_lora_config *lora, float *master,
                          float *m, float *v, mt_checkpoint_meta *meta) {
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
    for (int i = 0; i < n && !err && m; i++) {
        hid_t g = H5Lexists(opt, table[i].name, H5P_DEFAULT) > 0 ? H5Gopen2(opt, table[i].name, H5P_DEFAULT) : -1;
        if (g < 0 || !read_vector(g, "exp_avg", H5T_NATIVE_FLOAT, m + table[i].offset, table[i].count) ||
            !read_vector(g, "exp_avg_sq", H5T_NATIVE_FLOAT, v + table[i].offset, table[i].count))
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
    } else if (!err) {
        snprintf(path, sizeof path, "%s/model", dir);
        err = mt_hf_load_weights(path, mc, master);
    }
    if (!err) *meta = (mt_checkpoint_meta){(long)step, epoch, batch, (int)opt_steps, hash};
    return err;
}

mt_err mt_checkpoint_read_extra(const char *dir, const mt_state_tensor *extra, int n_extra) {
    char path[1300];
    snprintf(path, sizeof path, "%s/state.h5", dir);
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (file < 0) return mt_errorf(MT_ERR_IO, "%s: cannot open the checkpoint state", path);
    hid_t opt = H5Lexists(file, "optimizer", H5P_DEFAULT) > 0 ? H5Gopen2(file, "optimizer", H5P_DEFAULT) : -1;
    mt_err err = opt < 0 ? mt_errorf(MT_ERR_FORMAT, "%s: no optimizer group", path) : MT_OK;
    for (int i = 0; i < n_extra && !err; i++) {
        const mt_state_tensor *t = &extra[i];
        hid_t g = H5Lexists(opt, t->param, H5P_DEFAULT) > 0 ? H5Gopen2(opt, t->param, H5P_DEFAULT) : -1;
        if (g < 0 || !read_vector(g, t->name, t->is_u8 ? H5T_NATIVE_UCHAR : H5T_NATIVE_FLOAT, t->data, t->count))
            err = mt_errorf(MT_ERR_FORMAT,
                            "%s: optimizer/%s/%s is missing or has the wrong size (want %zu values); the checkpoint "
                            "was written with other optim or galore settings (with galore.moments int8, also another "
                            "offload.optimizer: none against cpu or ssd); resume with the settings it was written with",
                            path, t->param, t->name, t->count);
        if (g >= 0) H5Gclose(g);
    }
    if (opt >= 0) H5Gclose(opt);
    H5Fclose(file);
    return err;
}
