// trainer/main.c: the memtune command line. Subcommands: train, tokenize,
// plan, eval, merge, config-docs. Every user-facing failure ends here as one message and a
// non-zero exit.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "datasets/convert.h"
#include "kernels/common.h"
#include "kernels/device.h"
#include "trainer/config.h"
#include "trainer/eval.h"
#include "trainer/forecast.h"
#include "trainer/merge.h"
#include "trainer/train.h"

static void usage(FILE *f) {
    fprintf(f,
            "memtune: fine-tune LLaMA-family models in little GPU memory\n\n"
            "usage:\n"
            "  memtune train CONFIG.yaml [--set section.key=value ...]\n"
            "  memtune tokenize --input FILE --output DATA.h5 [--tokenizer MODEL_DIR] [--format F] ...\n"
            "                                 text, JSONL, prompt/completion, Alpaca or chat data to tokens\n"
            "                                 (memtune tokenize --help)\n"
            "  memtune plan CONFIG.yaml [--set ...] [--gpu-memory SIZE] [--device gpu|cpu] [--ranks N]\n"
            "                                 what the run will hold, before it runs, and alternatives\n"
            "  memtune eval --model DIR [--adapter DIR] --data DATA.h5\n"
            "                                 mean loss and perplexity over a dataset's trained targets\n"
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
    // memory.budget: the settings that fit, before anything is allocated
    if (!err && cfg.memory_budget[0]) {
        const char *ws = getenv("OMPI_COMM_WORLD_SIZE") ? getenv("OMPI_COMM_WORLD_SIZE") : getenv("MT_WORLD_SIZE");
        int gpu = strcmp(cfg.train_device, "cpu") && mt_device_count() > 0;
        err = mt_forecast_fit_budget(&cfg, gpu, ws ? atoi(ws) : 1);
    }
    mt_train_result result;
    if (!err) err = mt_train(&cfg, &result);
    if (!err && result.rank == 0)
        printf("done: %d steps, loss %.4f -> %.4f, run folder %s\n", result.steps_done, result.first_loss,
               result.last_loss, cfg.output_dir);
    mt_config_free(&cfg);
    return err ? fail(err) : 0;
}

static const char TOKENIZE_HELP[] =
    "usage: memtune tokenize --input FILE --output DATA.h5 [options]\n\n"
    "  --format F           text (documents separated by blank lines; the default), jsonl ({\"text\": ...}),\n"
    "                       prompt-completion ({\"prompt\", \"completion\"}), alpaca ({\"instruction\", \"input\",\n"
    "                       \"output\"}), chat ({\"messages\": [{\"role\", \"content\"}]} or ShareGPT's\n"
    "                       {\"conversations\": [{\"from\", \"value\"}]})\n"
    "  --tokenizer DIR      the model folder (tokenizer.json, tokenizer_config.json); without it memtune's\n"
    "                       byte tokenizer (for models trained from scratch with it)\n"
    "  --text-field NAME    jsonl's text field (text)\n"
    "  --chat-template T    auto (recognise the model's own; the default), llama3, llama2, mistral,\n"
    "                       mistral-v0.1, chatml, qwen2\n"
    "  --train-on-inputs    train prompts too (default: prompt-completion, alpaca and chat train the\n"
    "                       answers and the end-of-turn token that closes each)\n"
    "  --pack P             concat (examples one after another; training windows cross them) or pad\n"
    "                       (each example alone in a window of --seq-len tokens, padding masked). Default:\n"
    "                       concat for text and jsonl, pad for the others\n"
    "  --seq-len N          pad's window: the train.seq_len you will train with\n"
    "  --long L             pad: examples longer than a window: split (the default), truncate or drop\n"
    "  --on-bad-line B      error (the default: stop, naming the line) or skip (count and go on)\n"
    "  --threads N          tokenizing threads (default: every core)\n"
    "  --quiet              no progress line\n";

static int parse_choice(const char *opt, const char *v, const char *const *names, int n, int *out) {
    for (int i = 0; i < n; i++)
        if (!strcmp(v, names[i])) return *out = i, 0;
    char list[256] = "";
    for (int i = 0; i < n; i++)
        snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", i ? ", " : "", names[i]);
    return fail(mt_errorf(MT_ERR_USAGE, "%s %s: expected one of %s", opt, v, list));
}

static int cmd_tokenize(int argc, char **argv) {
    static const char *const formats[] = {"text", "jsonl", "prompt-completion", "alpaca", "chat"};
    static const char *const packs[] = {"concat", "pad"}, *const longs[] = {"split", "truncate", "drop"},
                             *const bad[] = {"error", "skip"};
    mt_convert_options o;
    mt_convert_defaults(&o);
    o.progress = 1;
    int format = 0, pack = -1, long_mode = 0, on_bad = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) return printf("%s", TOKENIZE_HELP), 0;
        if (!strcmp(a, "--train-on-inputs") || !strcmp(a, "--quiet")) {
            if (a[2] == 't')
                o.train_on_inputs = 1;
            else
                o.progress = 0;
            continue;
        }
        if (!v) return fail(mt_errorf(MT_ERR_USAGE, "%s needs a value (memtune tokenize --help)", a));
        int rc = 0;
        if (!strcmp(a, "--input"))
            o.input = v;
        else if (!strcmp(a, "--output"))
            o.output = v;
        else if (!strcmp(a, "--text-field"))
            o.text_field = v;
        else if (!strcmp(a, "--tokenizer"))
            o.tokenizer = v;
        else if (!strcmp(a, "--chat-template"))
            o.chat_template = v;
        else if (!strcmp(a, "--format"))
            rc = parse_choice(a, v, formats, 5, &format);
        else if (!strcmp(a, "--pack"))
            rc = parse_choice(a, v, packs, 2, &pack);
        else if (!strcmp(a, "--long"))
            rc = parse_choice(a, v, longs, 3, &long_mode);
        else if (!strcmp(a, "--on-bad-line"))
            rc = parse_choice(a, v, bad, 2, &on_bad);
        else if (!strcmp(a, "--seq-len") || !strcmp(a, "--threads")) {
            char *end;
            long n = strtol(v, &end, 10);
            if (*end || n < 1 || n > (1L << 30))
                return fail(mt_errorf(MT_ERR_USAGE, "%s %s: expected a positive whole number", a, v));
            if (a[2] == 's')
                o.seq_len = (int)n;
            else
                o.threads = (int)n;
        } else
            return fail(mt_errorf(MT_ERR_USAGE, "unknown option %s (memtune tokenize --help)", a));
        if (rc) return rc;
        i++;
    }
    o.format = (mt_input_format)format;
    if (pack < 0) {  // examples with masks are padded unless asked otherwise
        pack = format >= MT_FORMAT_PROMPT_COMPLETION;
        if (pack && !o.seq_len)
            return fail(mt_errorf(MT_ERR_USAGE,
                                  "--format %s puts each example alone in a window, padded: pass --seq-len N (your "
                                  "train.seq_len), or --pack concat to let examples share windows (they then "
                                  "attend to each other)",
                                  formats[format]));
    }
    o.pack = (mt_pack_mode)pack, o.long_mode = (mt_long_mode)long_mode, o.skip_bad_lines = on_bad;
    mt_convert_stats st;
    mt_err err = mt_convert(&o, &st);
    if (err) return fail(err);
    printf(
        "wrote %s: %llu examples of %llu (%s%s%s), %llu tokens: %llu trained, %llu masked, %llu padding; "
        "%.1f s, %.2fM tokens/s\n",
        o.output, (unsigned long long)st.kept, (unsigned long long)st.examples, st.tokenizer,
        st.template_name[0] ? ", chat template " : "", st.template_name, (unsigned long long)st.tokens,
        (unsigned long long)st.trained, (unsigned long long)st.masked, (unsigned long long)st.padded, st.seconds,
        st.seconds > 0 ? st.tokens / st.seconds / 1e6 : 0.0);
    if (st.split || st.truncated || st.dropped_long)
        printf("  longer than --seq-len %d: %llu split, %llu truncated, %llu dropped\n", o.seq_len,
               (unsigned long long)st.split, (unsigned long long)st.truncated, (unsigned long long)st.dropped_long);
    if (st.dropped_empty)
        printf("  %llu examples had nothing to train (no answer) and were left out\n",
               (unsigned long long)st.dropped_empty);
    if (st.bad_lines) printf("  %llu bad lines skipped (--on-bad-line skip)\n", (unsigned long long)st.bad_lines);
    if (st.straddled)
        printf("  %llu examples have a token across a prompt/answer boundary; it counts with the text after it\n",
               (unsigned long long)st.straddled);
    return 0;
}

static const char EVAL_HELP[] =
    "usage: memtune eval --model DIR [--adapter DIR] --data DATA.h5 [options]\n\n"
    "The mean cross-entropy over the dataset's trained targets (its loss mask), every target weighing the\n"
    "same, and its perplexity; the model in bf16 on the GPU (fp32 on the CPU), a LoRA adapter applied on the\n"
    "fly.\n\n"
    "  --seq-len N          window length (default: the file's window, else 1024)\n"
    "  --batch B            rows a batch (4); the last partial batch is left out\n"
    "  --batches N          evaluate the first N batches only\n"
    "  --device D           auto (the default), cpu, gpu\n"
    "  --quiet              no progress line\n";

static int cmd_eval(int argc, char **argv) {
    mt_eval_options o;
    mt_eval_defaults(&o);
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) return printf("%s", EVAL_HELP), 0;
        if (!strcmp(a, "--quiet")) {
            o.progress = 0;
            continue;
        }
        if (!v) return fail(mt_errorf(MT_ERR_USAGE, "%s needs a value (memtune eval --help)", a));
        if (!strcmp(a, "--model"))
            o.model = v;
        else if (!strcmp(a, "--adapter"))
            o.adapter = v;
        else if (!strcmp(a, "--data"))
            o.data = v;
        else if (!strcmp(a, "--device"))
            o.device = v;
        else if (!strcmp(a, "--seq-len") || !strcmp(a, "--batch") || !strcmp(a, "--batches")) {
            char *end;
            long n = strtol(v, &end, 10);
            if (*end || n < 1 || n > (1L << 30))
                return fail(mt_errorf(MT_ERR_USAGE, "%s %s: expected a positive whole number", a, v));
            if (!strcmp(a, "--seq-len"))
                o.seq_len = (int)n;
            else if (!strcmp(a, "--batch"))
                o.batch = (int)n;
            else
                o.max_batches = n;
        } else
            return fail(mt_errorf(MT_ERR_USAGE, "unknown option %s (memtune eval --help)", a));
        i++;
    }
    mt_eval_result r;
    mt_err err = mt_eval_run(&o, &r);
    if (err) return fail(err);
    printf("eval %s%s%s on %s: %ld windows of %d tokens (of %ld), %ld targets: loss %.6f, perplexity %.4f (%.1f s)\n",
           o.model, o.adapter ? " + " : "", o.adapter ? o.adapter : "", o.data, r.windows, r.seq_len, r.windows_total,
           r.targets, r.loss, r.perplexity, r.seconds);
    return 0;
}

static int cmd_plan(int argc, char **argv) {
    const char *path = NULL, *device = NULL;
    char **sets = calloc((size_t)argc + 2, sizeof *sets);
    int n_sets = 0, ranks = 1;
    double capacity = 0;
    const char *source = "";
    MT_CHECK(sets != NULL, "plan arguments");
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            printf(
                "usage: memtune plan CONFIG.yaml [--set section.key=value ...] [--gpu-memory SIZE] [--device gpu|cpu] "
                "[--ranks N]\n\nForecasts the run's memory by category on the device (and host memory for "
                "offload), without a GPU and without loading weights, with alternatives that fit or not and the "
                "longest train.seq_len that fits. SIZE: 80GiB, 24G, ... (default: the GPU's, when one is "
                "visible). docs/plan.md.\n");
            free(sets);
            return 0;
        }
        if (a[0] == '-' && !v) return free(sets), fail(mt_errorf(MT_ERR_USAGE, "%s needs a value", a));
        if (!strcmp(a, "--set"))
            sets[n_sets++] = argv[++i];
        else if (!strcmp(a, "--device"))
            device = argv[++i];
        else if (!strcmp(a, "--ranks"))
            ranks = atoi(argv[++i]);
        else if (!strcmp(a, "--gpu-memory")) {
            capacity = mt_parse_size(argv[++i]);
            source = "--gpu-memory";
            if (capacity <= 0)
                return free(sets),
                       fail(mt_errorf(MT_ERR_USAGE, "--gpu-memory %s: expected a size such as 80GiB or 24G", v));
        } else if (a[0] == '-')
            return free(sets), fail(mt_errorf(MT_ERR_USAGE, "unknown option %s (memtune plan --help)", a));
        else if (path)
            return free(sets), fail(mt_errorf(MT_ERR_USAGE, "one config file expected, got %s and %s", path, a));
        else
            path = a;
    }
    if (!path) return free(sets), fail(mt_errorf(MT_ERR_USAGE, "memtune plan needs a config file"));
    if (ranks < 1) return free(sets), fail(mt_errorf(MT_ERR_USAGE, "--ranks takes a positive number"));
    if (device && strcmp(device, "gpu") && strcmp(device, "cpu"))
        return free(sets), fail(mt_errorf(MT_ERR_USAGE, "--device %s: expected gpu or cpu", device));
    int gpu = !device || !strcmp(device, "gpu");
    if (gpu && capacity <= 0 && mt_device_total_bytes() > 0)
        capacity = (double)mt_device_total_bytes(), source = "this GPU";
    static char set_device[32];
    snprintf(set_device, sizeof set_device, "train.device=%s", gpu ? "gpu" : "cpu");
    sets[n_sets++] = set_device;
    // plan forecasts a GPU run on any machine: the plan's device check is the trainer's, so it sees one
    mt_err err = mt_forecast_print(stdout, path, sets, n_sets, gpu, ranks, capacity, source);
    free(sets);
    return err ? fail(err) : 0;
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
    if (!strcmp(argv[1], "eval")) return cmd_eval(argc - 2, argv + 2);
    if (!strcmp(argv[1], "plan")) return cmd_plan(argc - 2, argv + 2);
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
