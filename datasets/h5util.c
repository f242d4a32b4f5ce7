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

// A chunked 1-D dataset of n elements (negative on failure).
static hid_t create_vector(hid_t loc, const char *name, hid_t filetype, unsigned long long n) {
    hsize_t dims[1] = {n};
    hid_t space = H5Screate_simple(1, dims, NULL);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    if (n > 0) {
        hsize_t chunk[1] = {n < (1u << 16) ? n : (1u << 16)};
        H5Pset_chunk(dcpl, 1, chunk);
    }
    hid_t d = H5Dcreate2(loc, name, filetype, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    H5Pclose(dcpl);
    H5Sclose(space);
    return d;
}

int mt_h5_write_vector(hid_t loc, const char *name, hid_t filetype, hid_t memtype, const void *data,
                       unsigned long long n) {
    hid_t d = create_vector(loc, name, filetype, n);
    int ok = d >= 0 && (n == 0 || H5Dwrite(d, memtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) >= 0);
    if (d >= 0) H5Dclose(d);
    return ok;
}

int mt_h5_write_floats_from(hid_t loc, const char *const *names, const mt_f32_source *const *srcs, int k, size_t offset,
                            size_t n, float *buf, size_t buf_n, mt_err *src_err) {
    enum { kMost = 4 };
    *src_err = MT_OK;
    hid_t d[kMost], space[kMost];
    int ok = k > 0 && k <= kMost, made = 0;
    for (; ok && made < k; made++) {  // a failed one counts too: its handles that opened are closed below
        d[made] = create_vector(loc, names[made], H5T_IEEE_F32LE, n);
        space[made] = d[made] >= 0 ? H5Dget_space(d[made]) : -1;
        ok = d[made] >= 0 && space[made] >= 0;
    }
    // chunk by chunk, each vector's in turn: a source that read the chunk's window for one serves the others
    for (size_t done = 0; done < n && ok; done += buf_n) {
        hsize_t start[1] = {done}, count[1] = {n - done < buf_n ? n - done : buf_n};
        hid_t mem = H5Screate_simple(1, count, NULL);
        for (int j = 0; j < k && ok; j++) {
            if ((*src_err = srcs[j]->read(srcs[j]->ctx, offset + done, (size_t)count[0], buf))) {
                ok = 0;
                break;
            }
            ok = H5Sselect_hyperslab(space[j], H5S_SELECT_SET, start, NULL, count, NULL) >= 0 &&
                 H5Dwrite(d[j], H5T_NATIVE_FLOAT, mem, space[j], H5P_DEFAULT, buf) >= 0;
        }
        H5Sclose(mem);
    }
    for (int j = 0; j < made; j++) {
        if (space[j] >= 0) H5Sclose(space[j]);
        if (d[j] >= 0) H5Dclose(d[j]);
    }
    return ok;
}
