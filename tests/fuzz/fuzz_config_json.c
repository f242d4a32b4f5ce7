// tests/fuzz/fuzz_config_json.c: any bytes as a model folder's config.json;
// an accepted config then builds its parameter table.
#include <stdlib.h>

#include "fuzz_common.h"
#include "trainer/hf.h"

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    char path[256];
    snprintf(path, sizeof path, "%s/config.json", fuzz_dir());
    fuzz_write(path, data, size);
    mt_model_config cfg;
    if (mt_hf_read_config(fuzz_dir(), &cfg) != MT_OK) return 0;
    // keep the table small enough to build: the fuzzer may accept huge dimensions
    if ((double)cfg.L * cfg.C < 1e7) {
        int n;
        size_t total;
        free(mt_model_param_table(&cfg, &n, &total));
    }
    return 0;
}
