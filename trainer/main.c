// trainer/main.c: the memtune command line. Subcommands: train, tokenize,
// merge, config-docs. Every user-facing failure ends here as one message and a
// non-zero exit.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "datasets/tokenizer.h"
#include "kernels/common.h"
#include "trainer/config.h"
#include "trainer/merge.h"
#include "trainer/train.h"

static void usage(FILE *f) {
    fprintf(f,
            "memtune: fine-tune LLaMA-family models in little GPU memory\n\n"
            "usage:\n"
            "  memtune train CONFIG.yaml [--set section.key=value ...]\n"
            "  memtune tokenize --input FILE [--format text|jsonl] [--text-field text] --output DATA.h5\n"
            "  memtune merge --model DIR --adapter DIR -o OUT_DIR\n"
            "                                 write the model with a LoRA adapter (PEFT layout) merged in\n"
            "  memtune config-docs            print docs/configs.md (every config key)\n"
            "  memtune train --help           list every config key\n\n"
            "Docs: README.md and docs/ in the source tree.\n");
}

static int fail(mt_err err) {
    const char *msg = mt_last_error();
    fprintf(stderr, "memtune: error: %s\n", msg[0] ? msg : mt_err_message(err));
    return err == MT_ERR_USAGE ? 2 : 1;
}

static int cmd_train(int argc, char **argv) {
    const char *config_path = NULL;
    for (int i = 0; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: memtune train CONFIG.yaml [--set section.key=value ...]\n\nconfig keys:\n");
            mt_config_write_reference(stdout, 0);
            return 0;
        }
    mt_config cfg;
    mt_config_defaults(&cfg);
    mt_err err = MT_OK;
    for (int i = 0; i < argc && !err; i++) {
        if (!strcmp(argv[i], "--set")) {
            if (i + 1 >= argc)
                err = mt_errorf(MT_ERR_USAGE, "--set needs section.key=value");
            else
                i++;  // applied after the file, below
        } else if (!strncmp(argv[i], "--", 2)) {
            err = mt_errorf(MT_ERR_USAGE, "unknown option %s (see memtune train --help)", argv[i]);
        } else if (config_path) {
            err = mt_errorf(MT_ERR_USAGE, "one config file expected, got %s and %s", config_path, argv[i]);
        } else {
            config_path = argv[i];
        }
    }
    if (!err && !config_path)
        err = mt_errorf(MT_ERR_USAGE, "memtune train needs a config file, e.g. memtune train configs/quickstart.yaml");
    if (!err) err = mt_config_load_yaml(&cfg, config_path);
    for (int i = 0; i < argc && !err; i++)
        if (!strcmp(argv[i], "--set")) err = mt_config_set_assignment(&cfg, argv[++i], "--set");
    mt_train_result result;
    if (!err) err = mt_train(&cfg, &result);
    if (!err && result.rank == 0)
        printf("done: %d steps, loss %.4f -> %.4f, run folder %s\n", result.steps_done, result.first_loss,
               result.last_loss, cfg.output_dir);
    mt_config_free(&cfg);
    return err ? fail(err) : 0;
}

static int cmd_tokenize(int argc, char **argv) {
    const char *input = NULL, *output = NULL, *field = "text";
    mt_input_format format = MT_INPUT_TEXT;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) return fail(mt_errorf(MT_ERR_USAGE, "%s needs a value", a));
        if (!strcmp(a, "--input"))
            input = v;
        else if (!strcmp(a, "--output"))
            output = v;
        else if (!strcmp(a, "--text-field"))
            field = v;
        else if (!strcmp(a, "--format")) {
            if (!strcmp(v, "text"))
                format = MT_INPUT_TEXT;
            else if (!strcmp(v, "jsonl"))
                format = MT_INPUT_JSONL;
            else
                return fail(mt_errorf(MT_ERR_USAGE, "--format %s: expected text or jsonl", v));
        } else
            return fail(mt_errorf(MT_ERR_USAGE, "unknown option %s", a));
        i++;
    }
    if (!input || !output) return fail(mt_errorf(MT_ERR_USAGE, "tokenize needs --input FILE and --output DATA.h5"));
    mt_convert_stats stats;
    mt_err err = mt_convert_to_dataset(input, format, field, output, &stats);
    if (err) return fail(err);
    printf("wrote %s: %llu documents, %llu tokens (%s)\n", output, (unsigned long long)stats.docs,
           (unsigned long long)stats.tokens, MT_BYTE_TOKENIZER_NAME);
    return 0;
}

static int cmd_merge(int argc, char **argv) {
    const char *model = NULL, *adapter = NULL, *out = NULL;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) return fail(mt_errorf(MT_ERR_USAGE, "%s needs a value", a));
        if (!strcmp(a, "--model"))
            model = v;
        else if (!strcmp(a, "--adapter"))
            adapter = v;
        else if (!strcmp(a, "-o") || !strcmp(a, "--output"))
            out = v;
        else
            return fail(mt_errorf(MT_ERR_USAGE, "unknown option %s (merge takes --model, --adapter, -o)", a));
        i++;
    }
    if (!model || !adapter || !out)
        return fail(mt_errorf(MT_ERR_USAGE, "merge needs --model DIR --adapter DIR -o OUT_DIR"));
    mt_err err = mt_lora_merge_folders(model, adapter, out);
    if (err) return fail(err);
    printf("wrote %s: %s with the adapter %s merged in\n", out, model, adapter);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "train")) return cmd_train(argc - 2, argv + 2);
    if (!strcmp(argv[1], "tokenize")) return cmd_tokenize(argc - 2, argv + 2);
    if (!strcmp(argv[1], "merge")) return cmd_merge(argc - 2, argv + 2);
    if (!strcmp(argv[1], "config-docs")) {
        mt_config_write_reference(stdout, 1);
        return 0;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("memtune 0.1.0\n");
        return 0;
    }
    fprintf(stderr, "memtune: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
