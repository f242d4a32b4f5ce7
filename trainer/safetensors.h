// trainer/safetensors.h: reading and writing the safetensors format (an
// 8-byte little-endian header length, a JSON header naming each tensor's
// dtype, shape and byte range, then the data). Every header field is checked
// against the file before any tensor is read.
#ifndef MT_SAFETENSORS_H
#define MT_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/common.h"
#include "kernels/dtype.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MT_MAX_DIMS 4

typedef struct {
    char name[256];
    mt_dtype dtype;
    int ndim;
    int64_t shape[MT_MAX_DIMS];
    uint64_t begin, end;  // byte range within the data section
} mt_st_tensor;

typedef struct mt_safetensors mt_safetensors;

mt_err mt_safetensors_open(mt_safetensors **out, const char *path);
void mt_safetensors_close(mt_safetensors *st);
int mt_safetensors_count(const mt_safetensors *st);
const mt_st_tensor *mt_safetensors_get(const mt_safetensors *st, int i);
const mt_st_tensor *mt_safetensors_find(const mt_safetensors *st, const char *name);
// Reads a tensor converted to fp32 into dst (element count of its shape).
mt_err mt_safetensors_read_f32(const mt_safetensors *st, const mt_st_tensor *t, float *dst);

typedef struct {
    const char *name;
    int ndim;
    int64_t shape[MT_MAX_DIMS];
    const float *data;  // fp32 host values, converted to the file dtype
} mt_st_write_tensor;

// Writes tensors (in the given order) with dtype `dtype` to path, via a
// temporary file that is fsynced and renamed: never a half-written file.
mt_err mt_safetensors_write(const char *path, const mt_st_write_tensor *tensors, int count, mt_dtype dtype,
                            const char *format_metadata);
// The same where the values of the tensors whose data is NULL are read from
// source a chunk at a time, tensor i's from source value source_at[i] on.
mt_err mt_safetensors_write_from(const char *path, const mt_st_write_tensor *tensors, int count, mt_dtype dtype,
                                 const char *format_metadata, const mt_f32_source *source, const size_t *source_at);

#ifdef __cplusplus
}
#endif
#endif
