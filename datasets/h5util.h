// datasets/h5util.h: small HDF5 helpers shared by the dataset files and the
// trainer's checkpoint state (both HDF5): scalar attributes.
#ifndef MT_H5UTIL_H
#define MT_H5UTIL_H

#include <hdf5.h>

#ifdef __cplusplus
extern "C" {
#endif

// Writes a scalar attribute `name` of `type` on loc; returns 1 on success.
int mt_h5_write_scalar(hid_t loc, const char *name, hid_t type, const void *value);
// Reads a scalar attribute converted to `type`; returns 0 if absent or unreadable.
int mt_h5_read_scalar(hid_t loc, const char *name, hid_t type, void *value);

#ifdef __cplusplus
}
#endif
#endif
