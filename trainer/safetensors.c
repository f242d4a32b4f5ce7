// trainer/safetensors.c: safetensors reading and writing (safetensors.h).
#define _POSIX_C_SOURCE 200809L
#include "trainer/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct mt_safetensors {
    char path[1024];
    int fd;
    uint64_t data_start, data_size;
    mt_st_tensor *tensors;
    int count;
};

static mt_err bad(const char *path, const char *what, const char *name) {
    return mt_errorf(MT_ERR_FORMAT,
                     "%s: malformed safetensors file: %s%s%s. The file is damaged or not "
                     "safetensors; re-download or re-save it.",
                     path, what, name ? " for tensor " : "", name ? name : "");
}

static mt_err parse_header(mt_safetensors *st, const char *json, uint64_t len) {
    cJSON *root = cJSON_ParseWithLength(json, len);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return bad(st->path, "the header is not a JSON object", NULL);
    }
    int n = 0;
    for (cJSON *e = root->child; e; e = e->next) n += strcmp(e->string, "__metadata__") != 0;
    st->tensors = calloc(n ? (size_t)n : 1, sizeof *st->tensors);
    MT_CHECK(st->tensors != NULL, "tensor table");
    mt_err err = MT_OK;
    for (cJSON *e = root->child; e && !err; e = e->next) {
        if (!strcmp(e->string, "__metadata__")) continue;
        mt_st_tensor *t = &st->tensors[st->count];
        if (strlen(e->string) >= sizeof t->name) {
            err = bad(st->path, "tensor name too long", NULL);
            break;
        }
        snprintf(t->name, sizeof t->name, "%s", e->string);
        cJSON *dtype = cJSON_GetObjectItemCaseSensitive(e, "dtype");
        cJSON *shape = cJSON_GetObjectItemCaseSensitive(e, "shape");
        cJSON *offsets = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
        if (!cJSON_IsString(dtype) || !cJSON_IsArray(shape) || !cJSON_IsArray(offsets) ||
            cJSON_GetArraySize(offsets) != 2) {
            err = bad(st->path, "missing or mistyped dtype/shape/data_offsets", t->name);
            break;
        }
        t->dtype = mt_dtype_from_name(dtype->valuestring);
        if (t->dtype == MT_DTYPE_NONE) {
            err = mt_errorf(MT_ERR_FORMAT, "%s: tensor %s has dtype %s; memtune reads F32, BF16 and F16", st->path,
                            t->name, dtype->valuestring);
            break;
        }
        t->ndim = cJSON_GetArraySize(shape);
        if (t->ndim > MT_MAX_DIMS) {
            err = bad(st->path, "more than 4 dimensions", t->name);
            break;
        }
        uint64_t elems = 1;
        for (int d = 0; d < t->ndim; d++) {
            cJSON *dim = cJSON_GetArrayItem(shape, d);
            if (!cJSON_IsNumber(dim) || dim->valuedouble < 0 || dim->valuedouble > 9.0e15 ||
                dim->valuedouble != (double)(int64_t)dim->valuedouble) {
                err = bad(st->path, "a shape entry is not a non-negative integer", t->name);
                break;
            }
            t->shape[d] = (int64_t)dim->valuedouble;
            if (t->shape[d] && elems > UINT64_MAX / 8 / (uint64_t)t->shape[d]) {
                err = bad(st->path, "shape too large", t->name);
                break;
            }
            elems *= (uint64_t)t->shape[d];
        }
        if (err) break;
        cJSON *b = cJSON_GetArrayItem(offsets, 0), *en = cJSON_GetArrayItem(offsets, 1);
        if (!cJSON_IsNumber(b) || !cJSON_IsNumber(en) || b->valuedouble < 0 || en->valuedouble < b->valuedouble ||
            en->valuedouble > (double)st->data_size) {
            err = bad(st->path, "data_offsets out of the file's data range", t->name);
            break;
        }
        t->begin = (uint64_t)b->valuedouble;
        t->end = (uint64_t)en->valuedouble;
        if (t->end - t->begin != elems * mt_dtype_size(t->dtype)) {
            err = bad(st->path, "data_offsets length does not match shape x dtype size", t->name);
            break;
        }
        st->count++;
    }
    cJSON_Delete(root);
    return err;
}

mt_err mt_safetensors_open(mt_safetensors **out, const char *path) {
    *out = NULL;
    mt_safetensors *st = calloc(1, sizeof *st);
    MT_CHECK(st != NULL, "safetensors handle");
    snprintf(st->path, sizeof st->path, "%s", path);
    st->fd = open(path, O_RDONLY);
    if (st->fd < 0) {
        free(st);
        return mt_errorf(MT_ERR_IO, "%s: cannot open (%s)", path, strerror(errno));
    }
    struct stat sb;
    uint8_t lenbuf[8];
    mt_err err = MT_OK;
    if (fstat(st->fd, &sb) != 0 || pread(st->fd, lenbuf, 8, 0) != 8) {
        err = bad(path, "shorter than the 8-byte header length", NULL);
    } else {
        uint64_t hlen = 0;
        for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | lenbuf[i];
        uint64_t size = (uint64_t)sb.st_size;
        if (hlen < 2 || hlen > 100000000 || hlen > size - 8) {
            err = bad(path, "header length is past the end of the file", NULL);
        } else {
            char *json = malloc(hlen);
            MT_CHECK(json != NULL, "header buffer");
            if (pread(st->fd, json, hlen, 8) != (ssize_t)hlen) err = bad(path, "truncated header", NULL);
            st->data_start = 8 + hlen;
            st->data_size = size - st->data_start;
            if (!err) err = parse_header(st, json, hlen);
            free(json);
        }
    }
    if (err) {
        mt_safetensors_close(st);
        return err;
    }
    *out = st;
    return MT_OK;
}

void mt_safetensors_close(mt_safetensors *st) {
    if (!st) return;
    if (st->fd >= 0) close(st->fd);
    free(st->tensors);
    free(st);
}

int mt_safetensors_count(const mt_safetensors *st) { return st->count; }
const mt_st_tensor *mt_safetensors_get(const mt_safetensors *st, int i) { return &st->tensors[i]; }

const mt_st_tensor *mt_safetensors_find(const mt_safetensors *st, const char *name) {
    for (int i = 0; i < st->count; i++)
        if (!strcmp(st->tensors[i].name, name)) return &st->tensors[i];
    return NULL;
}

mt_err mt_safetensors_read_f32(const mt_safetensors *st, const mt_st_tensor *t, float *dst) {
    uint64_t bytes = t->end - t->begin, elems = bytes / mt_dtype_size(t->dtype);
    void *raw = t->dtype == MT_DTYPE_F32 ? (void *)dst : malloc(bytes ? bytes : 1);
    MT_CHECK(raw != NULL, "tensor buffer");
    uint64_t done = 0;
    while (done < bytes) {
        ssize_t n = pread(st->fd, (char *)raw + done, bytes - done, (off_t)(st->data_start + t->begin + done));
        if (n <= 0) {
            if (raw != dst) free(raw);
            return mt_errorf(MT_ERR_IO, "%s: reading tensor %s failed (%s)", st->path, t->name,
                             n < 0 ? strerror(errno) : "unexpected end of file");
        }
        done += (uint64_t)n;
    }
    if (raw != dst) {
        mt_convert_to_f32(dst, raw, t->dtype, elems);
        free(raw);
    }
    return MT_OK;
}

static int write_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        p += n, len -= (size_t)n;
    }
    return 0;
}

mt_err mt_safetensors_write(const char *path, const mt_st_write_tensor *tensors, int count, mt_dtype dtype,
                            const char *format_metadata) {
    return mt_safetensors_write_from(path, tensors, count, dtype, format_metadata, NULL, NULL);
}

mt_err mt_safetensors_write_from(const char *path, const mt_st_write_tensor *tensors, int count, mt_dtype dtype,
                                 const char *format_metadata, const mt_f32_source *source, const size_t *source_at) {
    cJSON *root = cJSON_CreateObject();
    cJSON *meta = cJSON_AddObjectToObject(root, "__metadata__");
    cJSON_AddStringToObject(meta, "format", format_metadata ? format_metadata : "pt");
    uint64_t offset = 0, esize = mt_dtype_size(dtype);
    for (int i = 0; i < count; i++) {
        const mt_st_write_tensor *t = &tensors[i];
        uint64_t elems = 1;
        cJSON *entry = cJSON_AddObjectToObject(root, t->name);
        cJSON_AddStringToObject(entry, "dtype", mt_dtype_name(dtype));
        cJSON *shape = cJSON_AddArrayToObject(entry, "shape");
        for (int d = 0; d < t->ndim; d++) {
            cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)t->shape[d]));
            elems *= (uint64_t)t->shape[d];
        }
        cJSON *offsets = cJSON_AddArrayToObject(entry, "data_offsets");
        cJSON_AddItemToArray(offsets, cJSON_CreateNumber((double)offset));
        offset += elems * esize;
        cJSON_AddItemToArray(offsets, cJSON_CreateNumber((double)offset));
    }
    char *json = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    MT_CHECK(json != NULL, "header json");
    size_t jlen = strlen(json), padded = (jlen + 7) & ~(size_t)7;  // data 8-byte aligned
    char tmp[1100];
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        free(json);
        return mt_errorf(MT_ERR_IO, "%s: cannot create (%s)", path, strerror(errno));
    }
    uint8_t lenbuf[8];
    for (int i = 0; i < 8; i++) lenbuf[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    int fail = write_all(fd, lenbuf, 8) || write_all(fd, json, jlen);
    for (size_t i = jlen; i < padded && !fail; i++) fail = write_all(fd, " ", 1);
    free(json);
    size_t chunk_elems = 1 << 20;
    void *buf = malloc(chunk_elems * esize);
    float *values = source ? malloc(chunk_elems * sizeof(float)) : NULL;  // a source's chunk
    MT_CHECK(buf && (values || !source), "write buffer");
    for (int i = 0; i < count; i++) MT_CHECK(tensors[i].data || source, "tensor %s has no values", tensors[i].name);
    mt_err source_err = MT_OK;
    for (int i = 0; i < count && !fail; i++) {
        const mt_st_write_tensor *t = &tensors[i];
        uint64_t elems = 1;
        for (int d = 0; d < t->ndim; d++) elems *= (uint64_t)t->shape[d];
        for (uint64_t done = 0; done < elems && !fail; done += chunk_elems) {
            size_t n = elems - done < chunk_elems ? (size_t)(elems - done) : chunk_elems;
            const float *from = t->data ? t->data + done : values;
            if (!t->data && (source_err = source->read(source->ctx, source_at[i] + done, n, values))) break;
            mt_convert_from_f32(buf, from, dtype, n);
            fail = write_all(fd, buf, n * esize);
        }
        fail = fail || source_err;
    }
    free(values);
    free(buf);
    if (source_err) {  // its message stands
        close(fd);
        unlink(tmp);
        return source_err;
    }
    int saved_errno = errno;
    if (!fail) fail = fsync(fd) != 0, saved_errno = errno;
    if (close(fd) != 0 && !fail) fail = 1, saved_errno = errno;
    if (!fail && rename(tmp, path) != 0) fail = 1, saved_errno = errno;
    if (fail) {
        unlink(tmp);
        return mt_errorf(MT_ERR_IO, "%s: writing failed (%s); nothing was replaced", path, strerror(saved_errno));
    }
    return MT_OK;
}
