// tests/fuzz/fuzz_yaml.c: any bytes as an experiment YAML file, over the
// defaults; an accepted config is validated and written back.
#include <stdio.h>

#include "fuzz_common.h"
#include "trainer/config.h"

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    char path[256];
    snprintf(path, sizeof path, "%s/c.yaml", fuzz_dir());
    fuzz_write(path, data, size);
    mt_config cfg;
    mt_config_defaults(&cfg);
    if (mt_config_load_yaml(&cfg, path) == MT_OK) {
        mt_config_validate(&cfg);
        FILE *null = fopen("/dev/null", "w");
        mt_config_write_yaml(&cfg, null);
        fclose(null);
        (void)mt_config_training_hash(&cfg);
    }
    mt_config_free(&cfg);
    return 0;
}
