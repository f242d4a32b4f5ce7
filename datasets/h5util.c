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

int mt_h5_write_vector(hid_t loc, const char *name, hid_t filetype, hid_t memtype, const void *data,
                       unsigned long long n) {
    hsize_t dims[1] = {n};
    hid_t space = H5Screate_simple(1, dims, NULL);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    if (n > 0) {
        hsize_t chunk[1] = {n < (1u << 16) ? n : (1u << 16)};
        H5Pset_chunk(dcpl, 1, chunk);
    }
    hid_t d = H5Dcreate2(loc, name, filetype, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    int ok = d >= 0 && (n == 0 || H5Dwrite(d, memtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) >= 0);
    if (d >= 0) H5Dclose(d);
    H5Pclose(dcpl);
    H5Sclose(space);
    return ok;
}
