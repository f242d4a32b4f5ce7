// trainer/merge.c: `memtune merge` (merge.h): reads the model and the
// adapter, folds scale * B A into each adapted weight (lora.h) and writes the
// folder in the model's dtype (hf.h).
#include "trainer/merge.h"

#include <stdlib.h>
#include <sys/stat.h>

#include "trainer/hf.h"
#include "trainer/lora.h"
#include "trainer/params.h"

mt_err mt_lora_merge_folders(const char *model_dir, const char *adapter_dir, const char *out_dir) {
    struct stat st;
    if (stat(out_dir, &st) == 0)
        return mt_errorf(MT_ERR_USAGE, "%s already exists; merge writes a new folder: name one that does not exist",
                         out_dir);
    mt_model_config cfg;
    mt_lora_config lora;
    float *adapter = NULL;
    mt_err err = mt_hf_read_config(model_dir, &cfg);
    if (!err) err = mt_lora_read_folder(adapter_dir, &cfg, &lora, &adapter);
    if (err) return err;
    int n_base;
    size_t total_base;
    free(mt_model_param_table(&cfg, &n_base, &total_base));
    float *base = malloc(total_base * sizeof(float));
    if (!base) {
        free(adapter);
        return mt_errorf(MT_ERR_NOMEM, "out of host memory for the model's fp32 copy (%.1f GiB)",
                         total_base * 4.0 / 1073741824.0);
    }
    err = mt_hf_load_weights(model_dir, &cfg, base);
    if (!err) {
        mt_lora_merge(&cfg, &lora, base, adapter);
        err = mt_hf_save(out_dir, model_dir, &cfg, base, cfg.dtype);
    }
    free(base);
    free(adapter);
    return err;
}
