// datasets/h5util.c: see h5util.h.
#include "datasets/h5util.h"

int mt_h5_write_scalar(hid_t loc, const char *name, hid_t type, const void *value) {
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(loc, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    int ok = a >= 0 && H5Awrite(a, type, value) >= 0;
    if (a >= 0) H5Aclose(a);
    H5Sclose(space);
    return ok;
}

int mt_h5_read_scalar(hid_t loc, const char *name, hid_t type, void *value) {
    if (H5Aexists(loc, name) <= 0) return 0;
    hid_t a = H5Aopen(loc, name, H5P_DEFAULT);
    int ok = a >= 0 && H5Aread(a, type, value) >= 0;
    if (a >= 0) H5Aclose(a);
    return ok;
}
