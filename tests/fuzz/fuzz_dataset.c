// tests/fuzz/fuzz_dataset.c: the dataset schema check and loader, fed HDF5
// files whose structure comes from the fuzz input: which datasets exist, their
// element types and lengths, the offsets, the attributes, token values. (Raw
// bytes would fuzz libhdf5's own parser, not memtune's checks.)
#include <hdf5.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "datasets/dataset.h"
#include "fuzz_common.h"

typedef struct {
    const unsigned char *p;
    size_t n;
} reader;

static unsigned take(reader *r, unsigned bits) {
    unsigned v = 0;
    for (unsigned i = 0; i < (bits + 7) / 8; i++) v = (v << 8) | (r->n ? (r->n--, *r->p++) : 0);
    return bits >= 32 ? v : v & ((1u << bits) - 1);
}

static void vector(hid_t file, const char *name, hid_t type, hid_t memtype, const void *data, hsize_t n) {
    hid_t space = H5Screate_simple(1, &n, NULL);
    hid_t d = H5Dcreate2(file, name, type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (d >= 0 && n) H5Dwrite(d, memtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, data);
    if (d >= 0) H5Dclose(d);
    H5Sclose(space);
}

static void attribute(hid_t file, const char *name, hid_t type, const void *value) {
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(file, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    if (a >= 0) H5Awrite(a, type, value), H5Aclose(a);
    H5Sclose(space);
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    reader r = {data, size};
    char path[256];
    snprintf(path, sizeof path, "%s/d.h5", fuzz_dir());
    unsigned flags = take(&r, 8), ntok = take(&r, 12), ndoc = take(&r, 6), vocab = take(&r, 10);
    hid_t file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (file < 0) abort();
    uint32_t *tok = malloc((ntok + 1) * sizeof *tok);
    uint64_t *off = malloc((ndoc + 2) * sizeof *off);
    uint8_t *mask = malloc(ntok + 1);
    for (unsigned i = 0; i < ntok; i++) tok[i] = take(&r, 10), mask[i] = (uint8_t)take(&r, 1);
    off[0] = 0;
    for (unsigned i = 1; i <= ndoc; i++) off[i] = (flags & 64) ? take(&r, 12) : (uint64_t)ntok * i / (ndoc ? ndoc : 1);
    if (flags & 1)
        vector(file, "tokens", H5T_STD_U32LE, H5T_NATIVE_UINT32, tok, ntok);
    else if (flags & 2)
        vector(file, "tokens", H5T_STD_I64LE, H5T_NATIVE_UINT32, tok, ntok);
    if (!(flags & 4)) vector(file, "doc_offsets", H5T_STD_U64LE, H5T_NATIVE_UINT64, off, ndoc + 1);
    if (flags & 8) vector(file, "loss_mask", H5T_STD_U8LE, H5T_NATIVE_UINT8, mask, (flags & 128) ? ntok / 2 : ntok);
    int version = (flags & 16) ? 2 : 1;
    if (!(flags & 32)) attribute(file, "format_version", H5T_NATIVE_INT, &version);
    long long v = vocab;
    attribute(file, "vocab_size", H5T_NATIVE_LLONG, &v);
    H5Fclose(file);
    mt_dataset *ds = NULL;
    if (mt_dataset_open(&ds, path, (int)take(&r, 10)) == MT_OK) {
        mt_loader_config cfg = {(int)take(&r, 3) + 1, (int)take(&r, 5) + 1, take(&r, 8),     0,
                                (int)take(&r, 2) + 1, take(&r, 3) / 10.0,   (int)take(&r, 1)};
        cfg.rank = (int)take(&r, 2) % cfg.world;
        mt_loader *l = NULL;
        if (mt_loader_init(&l, ds, &cfg, (mt_split)(take(&r, 1))) == MT_OK) {
            int32_t *in = malloc((size_t)cfg.B * cfg.T * 4), *tg = malloc((size_t)cfg.B * cfg.T * 4);
            int valid;
            for (int i = 0; i < 5; i++) mt_loader_next(l, in, tg, &valid);
            free(in), free(tg);
            mt_loader_free(l);
        }
        mt_dataset_free(ds);
    }
    free(tok), free(off), free(mask);
    return 0;
}
