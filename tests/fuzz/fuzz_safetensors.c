// tests/fuzz/fuzz_safetensors.c: any bytes as a safetensors file; every
// tensor the header accepts is then read.
#include <stdint.h>
#include <stdlib.h>

#include "fuzz_common.h"
#include "trainer/safetensors.h"

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    char path[256];
    snprintf(path, sizeof path, "%s/t.safetensors", fuzz_dir());
    fuzz_write(path, data, size);
    mt_safetensors *st = NULL;
    if (mt_safetensors_open(&st, path) != MT_OK) return 0;
    for (int i = 0; i < mt_safetensors_count(st); i++) {
        const mt_st_tensor *t = mt_safetensors_get(st, i);
        size_t elems = (size_t)(t->end - t->begin) / mt_dtype_size(t->dtype);
        float *out = malloc((elems ? elems : 1) * sizeof(float));
        if (!out) abort();
        mt_safetensors_read_f32(st, t, out);
        free(out);
    }
    mt_safetensors_close(st);
    return 0;
}
