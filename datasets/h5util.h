// datasets/h5util.h: small HDF5 helpers shared by the dataset files and the
// trainer's checkpoint state (both HDF5): scalar attributes and 1-D datasets.
#ifndef MT_H5UTIL_H
#define MT_H5UTIL_H

#include <hdf5.h>

#include "kernels/common.h"

#ifdef __cplusplus
extern "C" {
#endif

// Writes a scalar attribute `name` of `type` on loc; returns 1 on success.
int mt_h5_write_scalar(hid_t loc, const char *name, hid_t type, const void *value);
// Writes a 1-D dataset of n elements (file type `filetype`, memory type
// `memtype`), chunked so that large ones need no contiguous file extent;
// returns 1 on success.
int mt_h5_write_vector(hid_t loc, const char *name, hid_t filetype, hid_t memtype, const void *data,
                       unsigned long long n);
// The same for k (at most 4) vectors of n fp32 values each, vector j named
// names[j] and read from srcs[j] (from its value `offset`), a chunk of buf_n
// at a time through buf, the k vectors' chunks in turn; 0 on failure, with
// *src_err the source's error where it was a source that failed (else MT_OK).
int mt_h5_write_floats_from(hid_t loc, const char *const *names, const mt_f32_source *const *srcs, int k, size_t offset,
                            size_t n, float *buf, size_t buf_n, mt_err *src_err);
// Reads a scalar attribute converted to `type`; returns 0 if absent or unreadable.
int mt_h5_read_scalar(hid_t loc, const char *name, hid_t type, void *value);

#ifdef __cplusplus
}
#endif
#endif
