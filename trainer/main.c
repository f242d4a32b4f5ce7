// trainer/main.c: the memtune command line. Subcommands: train, tokenize,
// plan, generate, eval, merge, config-docs. Every user-facing failure ends here as one message and a
// non-zero exit.
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include "datasets/chat.h"
#include "datasets/convert.h"
#include "datasets/hf_tokenizer.h"
#include "datasets/tokenizer.h"
#include "kernels/common.h"
#include "kernels/device.h"
#include "trainer/config.h"
#include "trainer/dist.h"
#include "trainer/eval.h"
#include "trainer/forecast.h"
#include "trainer/generate.h"
#include "trainer/hf.h"
#include "trainer/lora.h"
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
            "  memtune plan CONFIG.yaml [--set ...] [--gpu-memory SIZE] [--host-memory SIZE] [--device gpu|cpu] "
            "[--ranks N]\n"
            "                                 what the run will hold, before it runs, and alternatives\n"
            "  memtune generate --model DIR [--adapter DIR] (--prompt TEXT | --chat TEXT | --input FILE.jsonl)\n"
            "                                 text from the model (KV cache, GPU or CPU; memtune generate --help)\n"
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
    // train.seq_len max, model.weights auto, model.deterministic_attention auto, then memory.budget: the settings
    // that fit, before anything is allocated
    int gpu = strcmp(cfg.train_device, "cpu") && mt_device_count() > 0;
    if (!err) err = mt_forecast_seq_len_max(&cfg, gpu, mt_dist_launched_world());
    if (!err) err = mt_forecast_weights_auto(&cfg, gpu, mt_dist_launched_world());
    if (!err) err = mt_forecast_attention_auto(&cfg, gpu, mt_dist_launched_world());
    if (!err && cfg.memory_budget[0]) err = mt_forecast_fit_budget(&cfg, gpu, mt_dist_launched_world());
    if (!err) err = mt_forecast_check_host(&cfg, gpu, mt_dist_launched_world());
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
    "  --pack P             concat (examples one after another, windows crossing them; data.document_mask\n"
    "                       keeps them apart in training) or pad (each example alone in a window of --seq-len\n"
    "                       tokens, padding masked). Default: concat for text and jsonl, pad for the others\n"
    "  --seq-len N          pad's window: the train.seq_len you will train with\n"
    "  --long L             pad: examples longer than a window: split (the default), truncate or drop\n"
    "  --on-bad-line B      error (the default: stop, naming the line) or skip (count and go on)\n"
    "  --threads N          tokenizing threads (default: every core)\n"
    "  --quiet              no progress line\n";

// A positive whole number option value (at most 2^30); the exit code of its
// error, or 0.
static int positive_option(const char *opt, const char *v, long *out) {
    if (mt_parse_long(v, 1, 1L << 30, out) == 0) return 0;
    return fail(mt_errorf(MT_ERR_USAGE, "%s %s: expected a positive whole number", opt, v));
}

// --quantize of eval and generate: index 1 is NF4.
static const char *const quantizations[] = {"none", "nf4"};
// --weights of eval and generate: index 1 streams the base from host memory, 2 from a file under
// --weights-dir (model.weights).
static const char *const weight_places[] = {"gpu", "cpu", "ssd"};

// --weights' choice (an index of weight_places) and --weights-dir: whether
// the base streams, and the folder of its file with ssd (--weights-dir,
// default $TMPDIR, else /var/tmp: disk, where /tmp may be memory), else NULL.
static const char *weights_file_dir(int place, const char *dir, int *stream) {
    *stream = place > 0;
    if (place != 2) return NULL;
    const char *t = getenv("TMPDIR");
    return dir ? dir : t && t[0] ? t : "/var/tmp";
}

// --resident-layers N of eval and generate: with --weights cpu or ssd only.
static int resident_option(const char *v, int stream, int *out) {
    long n;
    if (mt_parse_long(v, 0, 1L << 20, &n))
        return fail(mt_errorf(MT_ERR_USAGE, "--resident-layers %s: expected a whole number of layers", v));
    if (n > 0 && !stream)
        return fail(mt_errorf(MT_ERR_USAGE,
                              "--resident-layers %ld keeps the first layers of a streamed base on the GPU: it needs "
                              "--weights cpu or ssd (with --weights gpu every layer is there already)",
                              n));
    *out = (int)n;
    return 0;
}

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
            long n;
            if ((rc = positive_option(a, v, &n))) return rc;
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
    "  --quantize nf4       the base as QLoRA trained it (linear weights in NF4); needs --adapter\n"
    "  --weights W          gpu (the default), cpu: the base's layers in host memory, each copied to the\n"
    "                       GPU as it runs (a model larger than the GPU; model.weights in training), or ssd:\n"
    "                       as cpu, from a file under --weights-dir (default $TMPDIR, else /var/tmp)\n"
    "  --resident-layers N  with --weights cpu or ssd: the first N layers stay on the GPU, copied once (0)\n"
    "  --document-mask      documents packed into a window attend only within themselves and restart their\n"
    "                       positions (as data.document_mask trains); a window's last token of a document\n"
    "                       does not count\n"
    "  --quiet              no progress line\n";

static int cmd_eval(int argc, char **argv) {
    mt_eval_options o;
    mt_eval_defaults(&o);
    int place = 0;  // --weights
    const char *weights_dir = NULL, *resident = NULL;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) return printf("%s", EVAL_HELP), 0;
        if (!strcmp(a, "--quiet") || !strcmp(a, "--document-mask")) {
            if (a[2] == 'q')
                o.progress = 0;
            else
                o.document_mask = 1;
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
        else if (!strcmp(a, "--weights")) {
            int rc = parse_choice(a, v, weight_places, 3, &place);
            if (rc) return rc;
        } else if (!strcmp(a, "--weights-dir")) {
            weights_dir = v;
        } else if (!strcmp(a, "--resident-layers")) {
            resident = v;
        } else if (!strcmp(a, "--quantize")) {
            int rc = parse_choice(a, v, quantizations, 2, &o.quantize_nf4);
            if (rc) return rc;
        } else if (!strcmp(a, "--seq-len") || !strcmp(a, "--batch") || !strcmp(a, "--batches")) {
            long n;
            int rc = positive_option(a, v, &n);
            if (rc) return rc;
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
    o.weights_dir = weights_file_dir(place, weights_dir, &o.stream_weights);  // --weights-dir counts with ssd only
    if (resident) {
        int rc = resident_option(resident, o.stream_weights, &o.resident_layers);
        if (rc) return rc;
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
    int n_sets = 0, ranks = 1, brief = 0;
    double capacity = 0;
    const char *source = "";
    MT_CHECK(sets != NULL, "plan arguments");
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            printf(
                "usage: memtune plan CONFIG.yaml [--set section.key=value ...] [--gpu-memory SIZE] [--host-memory "
                "SIZE] [--device gpu|cpu] [--ranks N] [--brief]\n\nForecasts the run's memory by category on the "
                "device (and host memory for offload), without a GPU and without loading weights, with alternatives "
                "that fit or not and the longest train.seq_len that fits (--brief: the run's forecast alone). SIZE: "
                "80GiB, 24G, ... (--gpu-memory: default the GPU's, when one is visible; --host-memory: the host "
                "memory available to the run, default this machine's MemAvailable, of which the offloaded layer "
                "inputs and a streamed base may plan 85%%). docs/plan.md.\n");
            free(sets);
            return 0;
        }
        if (!strcmp(a, "--brief")) {
            brief = 1;
            continue;
        }
        if (a[0] == '-' && !v) return free(sets), fail(mt_errorf(MT_ERR_USAGE, "%s needs a value", a));
        if (!strcmp(a, "--set"))
            sets[n_sets++] = argv[++i];
        else if (!strcmp(a, "--device"))
            device = argv[++i];
        else if (!strcmp(a, "--ranks")) {
            long n;
            int rc = positive_option(a, argv[++i], &n);
            if (rc) return free(sets), rc;
            ranks = (int)n;
        } else if (!strcmp(a, "--gpu-memory") || !strcmp(a, "--host-memory")) {
            int gpu_memory = !strcmp(a, "--gpu-memory");
            double bytes = mt_parse_size(argv[++i]);
            if (bytes <= 0)
                return free(sets), fail(mt_errorf(MT_ERR_USAGE, "%s %s: expected a size with its unit, such as %s", a,
                                                  v, gpu_memory ? "80GiB or 24G" : "120GiB or 64G"));
            if (gpu_memory)
                capacity = bytes, source = "--gpu-memory";
            else
                mt_forecast_set_host_memory(bytes);
        } else if (a[0] == '-')
            return free(sets), fail(mt_errorf(MT_ERR_USAGE, "unknown option %s (memtune plan --help)", a));
        else if (path)
            return free(sets), fail(mt_errorf(MT_ERR_USAGE, "one config file expected, got %s and %s", path, a));
        else
            path = a;
    }
    if (!path) return free(sets), fail(mt_errorf(MT_ERR_USAGE, "memtune plan needs a config file"));
    if (device && strcmp(device, "gpu") && strcmp(device, "cpu"))
        return free(sets), fail(mt_errorf(MT_ERR_USAGE, "--device %s: expected gpu or cpu", device));
    int gpu = !device || !strcmp(device, "gpu");
    if (gpu && capacity <= 0 && mt_device_total_bytes() > 0)
        capacity = (double)mt_device_total_bytes(), source = "this GPU";
    static char set_device[32];
    snprintf(set_device, sizeof set_device, "train.device=%s", gpu ? "gpu" : "cpu");
    sets[n_sets++] = set_device;
    // plan forecasts a GPU run on any machine: the plan's device check is the trainer's, so it sees one
    mt_err err = mt_forecast_print(stdout, path, sets, n_sets, gpu, ranks, capacity, source, brief);
    free(sets);
    return err ? fail(err) : 0;
}

static const char GENERATE_HELP[] =
    "usage: memtune generate --model DIR [--adapter DIR] (--prompt TEXT | --chat TEXT | --input FILE.jsonl)\n\n"
    "Text from a model folder (its tokenizer.json and chat template), one token at a time with a key/value cache:\n"
    "on a GPU in bf16, rows of --input decoded together; on the CPU in fp32.\n\n"
    "  --device D             auto (a GPU when one is visible), gpu or cpu\n"
    "  --weights W            on a GPU: gpu (the default), cpu (the model's layers in host memory, each copied\n"
    "                         to the GPU as it runs: a model larger than the GPU, slowly, every token reads them)\n"
    "                         or ssd (as cpu, from a file under --weights-dir DIR, default $TMPDIR or /var/tmp)\n"
    "  --resident-layers N    with --weights cpu or ssd: the first N layers stay on the GPU, copied there once\n"
    "  --adapter DIR          a PEFT LoRA adapter, applied on the fly (the base's values untouched)\n"
    "  --merge                fold the adapter into the base first instead (the same function)\n"
    "  --quantize nf4         the base as QLoRA trained it: its linear weights through NF4 (on a GPU with\n"
    "                         --adapter and no --merge kept as NF4 codes, a quarter of bf16's memory)\n"
    "  --prompt TEXT          continue TEXT (BOS first when the tokenizer has one)\n"
    "  --chat TEXT            TEXT as the user's message, rendered with the model's chat template\n"
    "  --system TEXT          a system message before --chat's\n"
    "  --input FILE.jsonl     one {\"prompt\": ...} or {\"messages\": [...]} a line; writes JSONL to stdout,\n"
    "                         in the file's order\n"
    "  --batch N              --input's lines generated at once: rows decoded together on a GPU (default 16),\n"
    "                         each on a core of its own on the CPU (default: the OpenMP threads)\n"
    "  --chat-template T      auto (the model's) or a name, as memtune tokenize takes\n"
    "  --max-new-tokens N     (128)\n"
    "  --temperature T        0: greedy (the default)\n"
    "  --top-k K  --top-p P  --min-p M  --repetition-penalty R  --seed S\n"
    "  --stop TEXT            stop when the text ends with TEXT (repeatable)\n";

typedef struct {
    mt_tokenizer *tok;  // NULL: memtune's bytes
    mt_generate_options o;
    const mt_model_config *mc;
    const float *params;         // the whole base in fp32, or NULL: read from model_dir into the GPU's model
    const char *model_dir;       // a layer at a time (as training reads a frozen base)
    int nf4;                     // --quantize nf4: the base's linear weights through NF4
    const mt_lora_config *lora;  // an adapter on the fly, or NULL
    const float *adapter;
    int max_len, batch, gpu, stream_weights, resident_layers;
    const char *weights_dir;  // --weights ssd: the base's file is there
} gen_ctx;

// One line of a --input file (or the one prompt): its JSON, the prompt's
// ids, and then the completion or the error.
typedef struct {
    cJSON *obj;
    mt_ids ids;
    char *text;
    mt_err err;
    char message[1024];
} gen_item;

// The completion of one item on the CPU, on a generator of its own (a
// key/value cache as long as the prompt and the new tokens need).
static void generate_item(const gen_ctx *c, gen_item *it, FILE *stream) {
    mt_generator *g = NULL;
    int need = (int)it->ids.n + c->o.max_new;
    it->err = mt_generator_init(&g, c->mc, c->params, need < c->max_len ? need : c->max_len);
    if (!it->err && c->adapter) mt_generator_set_adapter(g, c->lora, c->adapter);
    if (!it->err) it->err = mt_generate_text(g, c->tok, &it->ids, &c->o, stream, &it->text);
    if (it->err) snprintf(it->message, sizeof it->message, "%s", mt_last_error());
    mt_generator_free(g);
}

// The prompt's ids: a chat rendered with the template and its generation
// prompt, or text after BOS.
static mt_err prompt_ids(const mt_tokenizer *tok, const mt_chat_template *tmpl, const mt_chat_message *msgs, int n,
                         const char *text, mt_ids *ids) {
    ids->n = 0;
    if (msgs) {
        mt_render r = {0};
        char why[200];
        if (mt_chat_render(tmpl, msgs, n, &r, why, sizeof why)) {
            mt_render_free(&r);
            return mt_errorf(MT_ERR_USAGE, "the conversation cannot be rendered: %s", why);
        }
        mt_chat_add_generation_prompt(tmpl, &r);
        mt_tokenizer_encode(tok, r.text, r.len, ids);
        mt_render_free(&r);
        return MT_OK;
    }
    mt_generate_prompt(tok, text, ids);
    return MT_OK;
}

// --input: every line's {"prompt"} or {"messages"} and its prompt ids; a
// line that is neither stops the command before anything is generated.
static mt_err read_items(const char *input, const mt_tokenizer *tok, const mt_chat_template *tmpl, int uses_chat,
                         gen_item **out, int *count) {
    *out = NULL, *count = 0;
    FILE *f = fopen(input, "rb");
    if (!f) return mt_errorf(MT_ERR_IO, "%s: cannot open the input file", input);
    mt_err err = MT_OK;
    char *line = NULL;
    size_t cap = 0;
    long lineno = 0;
    int n = 0, room = 0;
    gen_item *items = NULL;
    while (!err && getline(&line, &cap, f) >= 0) {
        lineno++;
        if (n == room) {
            room = room ? 2 * room : 64;
            gen_item *grown = realloc(items, (size_t)room * sizeof *items);
            MT_CHECK(grown != NULL, "generation items");
            items = grown;
        }
        gen_item *it = &items[n];
        *it = (gen_item){0};
        it->obj = cJSON_Parse(line);
        const cJSON *p = it->obj ? cJSON_GetObjectItemCaseSensitive(it->obj, "prompt") : NULL;
        const cJSON *list = it->obj ? cJSON_GetObjectItemCaseSensitive(it->obj, "messages") : NULL;
        mt_chat_message msgs[64];
        int k = 0;
        const cJSON *m;
        if (cJSON_IsArray(list)) cJSON_ArrayForEach(m, list) {
                const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
                const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
                if (k == 64 || !cJSON_IsString(role) || !cJSON_IsString(content)) break;
                mt_chat_role rl = !strcmp(role->valuestring, "system")      ? MT_ROLE_SYSTEM
                                  : !strcmp(role->valuestring, "assistant") ? MT_ROLE_ASSISTANT
                                                                            : MT_ROLE_USER;
                msgs[k++] = (mt_chat_message){rl, content->valuestring, strlen(content->valuestring)};
            }
        if (!cJSON_IsString(p) && !(cJSON_IsArray(list) && uses_chat))
            err = mt_errorf(MT_ERR_DATASET, "%s:%ld: expected {\"prompt\": \"...\"}%s", input, lineno,
                            uses_chat ? " or {\"messages\": [...]}" : " (no chat template for messages)");
        if (!err)
            err = prompt_ids(tok, tmpl, cJSON_IsString(p) ? NULL : msgs, k, cJSON_IsString(p) ? p->valuestring : NULL,
                             &it->ids);
        if (err) {
            cJSON_Delete(it->obj);
            mt_ids_free(&it->ids);
        } else {
            n++;
        }
    }
    free(line);
    fclose(f);
    *out = items, *count = n;
    return err;
}

// A completion, printed as its input line with "completion" added.
static void print_completion(void *ctx, int i, const char *text) {
    gen_item *it = &((gen_item *)ctx)[i];
    cJSON_AddStringToObject(it->obj, "completion", text);
    char *out = cJSON_PrintUnformatted(it->obj);
    printf("%s\n", out);
    fflush(stdout);
    free(out);
}

// On the CPU: --batch items at a time, each on its own thread and
// generator; the results in the input's order, up to the first failure.
static mt_err generate_cpu(const gen_ctx *c, gen_item *items, int n, FILE *stream) {
    mt_err err = MT_OK;
    for (int first = 0; first < n && !err; first += c->batch) {
        int count = n - first < c->batch ? n - first : c->batch;
#pragma omp parallel for schedule(dynamic, 1)
        for (int i = first; i < first + count; i++) generate_item(c, &items[i], stream);
        for (int i = first; i < first + count && !err; i++) {
            if (items[i].err) err = mt_errorf(items[i].err, "%s", items[i].message);
            if (!err && !stream) print_completion(items, i, items[i].text);
        }
    }
    return err;
}

// One decoding step before the clock starts, as a warmed-up peer is timed:
// kernels loaded, cuBLAS set up and the step recorded as a CUDA Graph (its
// cache writes at position 0 are overwritten by every sequence's first token).
static void decode_set_up(mt_model *m, int rows, int V) {
    double t0 = mt_now();
    int32_t *zeros = calloc((size_t)rows * 2, sizeof *zeros);
    float *logits = malloc((size_t)rows * V * sizeof *logits);
    MT_CHECK(zeros && logits, "decoding's set-up step");
    mt_model_decode(m, zeros, zeros + rows, logits);
    free(zeros), free(logits);
    const char *why = mt_model_decode_graph(m);
    fprintf(stderr, "generate: set-up step %.0f ms; a decoding step runs %s%s%s\n", 1e3 * (mt_now() - t0),
            why ? "op by op (" : "as one CUDA Graph", why ? why : "", why ? ")" : "");
}

// On a GPU: one model with a key/value cache for --batch rows, as long as
// the longest prompt and the new tokens need (at most the model's context),
// every item through mt_generate_batch.
static mt_err generate_gpu(const gen_ctx *c, gen_item *items, int n, FILE *stream) {
    int len = 1;
    for (int i = 0; i < n; i++)
        if ((int)items[i].ids.n + c->o.max_new > len) len = (int)items[i].ids.n + c->o.max_new;
    if (len > c->max_len) len = c->max_len;
    int rows = n < c->batch ? n : c->batch;
    mt_backend be;
    mt_err err = mt_backend_init(&be, 0);
    if (err) return err;
    // without params: the base read a layer at a time, its linear weights kept as NF4 codes with --quantize nf4
    // (dequantized a weight at a time, as QLoRA trains)
    mt_model_options mo = {.B = rows,
                           .T = 1,
                           .forward_only = 1,
                           .decode_len = len,
                           .stream_weights = c->stream_weights,
                           .weights_dir = c->weights_dir,
                           .resident_layers = c->resident_layers,
                           .quantize_nf4 = !c->params && c->nf4};
    if (c->lora) mo.lora = *c->lora, mo.lora.dropout = 0.0f;
    mt_model *m = NULL;
    err = mt_model_create_with(&m, &be, c->mc, &mo);
    if (!err) err = c->params ? mt_model_set_weights(m, c->params) : mt_hf_set_model(m, c->model_dir, 0);
    if (!err && c->lora) mt_model_set_adapters(m, c->adapter);
    mt_ids *prompts = malloc((size_t)(n ? n : 1) * sizeof *prompts);
    MT_CHECK(prompts != NULL, "prompts");
    for (int i = 0; i < n; i++) prompts[i] = items[i].ids;
    char device[200];
    mt_device_describe(device, sizeof device);
    if (!err)
        fprintf(stderr, "generate: %s, bf16, %d row%s, a cache of %d positions (%.1f MiB)\n", device, rows,
                rows > 1 ? "s" : "", len, mt_model_kv_cache_bytes(1, c->mc, rows, len) / 1048576.0);
    if (!err) decode_set_up(m, rows, c->mc->V);
    double t0 = mt_now();
    mt_generate_stats st = {0};
    if (!err)
        err = mt_generate_batch(m, c->tok, prompts, n, &c->o, stream, stream ? NULL : print_completion, items, &st);
    double dt = mt_now() - t0;
    if (!err && st.steps)
        fprintf(stderr,
                "generate: %d completion%s, %ld new tokens in %.3f s (%.1f tokens/s); %ld steps of %.2f ms in the "
                "model, %.2f ms a step in sampling and text\n",
                n, n > 1 ? "s" : "", st.new_tokens, dt, st.new_tokens / (dt > 0 ? dt : 1e-9), st.steps,
                1e3 * st.step_seconds / st.steps, 1e3 * (dt - st.step_seconds) / st.steps);
    free(prompts);
    mt_model_free(m);
    mt_backend_free(&be);
    return err;
}

static int cmd_generate(int argc, char **argv) {
    const char *model = NULL, *adapter = NULL, *prompt = NULL, *chat = NULL, *system = NULL, *input = NULL,
               *template_name = "auto", *device = "auto", *weights = "gpu", *weights_dir = NULL, *resident = NULL;
    gen_ctx c = {.o = {.max_new = 128, .sampling = {0.0f, 0, 1.0f, 0.0f, 1.0f, 0}}};
    int merge = 0, nf4 = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) return printf("%s", GENERATE_HELP), 0;
        if (!strcmp(a, "--merge")) {
            merge = 1;
            continue;
        }
        if (!v) return fail(mt_errorf(MT_ERR_USAGE, "%s needs a value (memtune generate --help)", a));
        char *end = NULL;
        const struct {
            const char *name;
            const char **dst;
        } strings[] = {{"--model", &model},
                       {"--adapter", &adapter},
                       {"--prompt", &prompt},
                       {"--chat", &chat},
                       {"--system", &system},
                       {"--input", &input},
                       {"--device", &device},
                       {"--chat-template", &template_name},
                       {"--weights", &weights},
                       {"--weights-dir", &weights_dir},
                       {"--resident-layers", &resident}};
        int taken = 0;
        for (size_t k = 0; k < sizeof strings / sizeof strings[0] && !taken; k++)
            if (!strcmp(a, strings[k].name)) *strings[k].dst = v, taken = 1;
        if (taken) {
            i++;
            continue;
        }
        if (!strcmp(a, "--quantize")) {
            int rc = parse_choice(a, v, quantizations, 2, &nf4);
            if (rc) return rc;
        } else if (!strcmp(a, "--stop")) {
            if (c.o.n_stops == 8) return fail(mt_errorf(MT_ERR_USAGE, "at most 8 --stop strings"));
            c.o.stops[c.o.n_stops++] = v;
        } else if (!strcmp(a, "--max-new-tokens"))
            c.o.max_new = (int)strtol(v, &end, 10);
        else if (!strcmp(a, "--top-k"))
            c.o.sampling.top_k = (int)strtol(v, &end, 10);
        else if (!strcmp(a, "--batch"))
            c.batch = (int)strtol(v, &end, 10);
        else if (!strcmp(a, "--seed"))
            c.o.sampling.seed = strtoull(v, &end, 10);
        else if (!strcmp(a, "--temperature"))
            c.o.sampling.temperature = strtof(v, &end);
        else if (!strcmp(a, "--top-p"))
            c.o.sampling.top_p = strtof(v, &end);
        else if (!strcmp(a, "--min-p"))
            c.o.sampling.min_p = strtof(v, &end);
        else if (!strcmp(a, "--repetition-penalty"))
            c.o.sampling.repetition_penalty = strtof(v, &end);
        else
            return fail(mt_errorf(MT_ERR_USAGE, "unknown option %s (memtune generate --help)", a));
        if (end && (*end || end == v)) return fail(mt_errorf(MT_ERR_USAGE, "%s %s: expected a number", a, v));
        i++;
    }
    if (!model || (!!prompt + !!chat + !!input) != 1)
        return fail(mt_errorf(MT_ERR_USAGE, "generate needs --model DIR and one of --prompt, --chat, --input"));
    if (merge && !adapter) return fail(mt_errorf(MT_ERR_USAGE, "--merge needs --adapter DIR"));
    if (c.o.max_new < 1 || c.o.sampling.top_k < 0 || c.o.sampling.temperature < 0 || c.o.sampling.top_p <= 0 ||
        c.o.sampling.top_p > 1 || c.o.sampling.min_p < 0 || c.o.sampling.min_p >= 1 ||
        c.o.sampling.repetition_penalty <= 0)
        return fail(mt_errorf(MT_ERR_USAGE, "a sampling setting is out of range (memtune generate --help)"));
    if (c.batch < 0 || c.batch > 4096) return fail(mt_errorf(MT_ERR_USAGE, "--batch %d: expected 1 to 4096", c.batch));
    static const char *const devices[] = {"auto", "cpu", "gpu"};
    int dev;
    int rc = parse_choice("--device", device, devices, 3, &dev);
    if (rc) return rc;
    int place;
    if ((rc = parse_choice("--weights", weights, weight_places, 3, &place))) return rc;
    c.weights_dir = weights_file_dir(place, weights_dir, &c.stream_weights);
    if (resident && (rc = resident_option(resident, c.stream_weights, &c.resident_layers))) return rc;
    c.gpu = dev != 1 && mt_device_count() > 0;
    if (dev == 2 && !c.gpu)
        return fail(mt_errorf(MT_ERR_DEVICE, "--device gpu but no GPU is visible; use --device cpu or auto"));
    mt_model_config mc;
    mt_err err = mt_hf_read_config(model, &mc);
    mt_tokenizer *tok = NULL;
    char tokenizer_file[1100];
    snprintf(tokenizer_file, sizeof tokenizer_file, "%s/tokenizer.json", model);
    int bytes = !err && access(tokenizer_file, F_OK) != 0 && mc.V == MT_BYTE_VOCAB;  // memtune's byte tokenizer
    if (!err && !bytes) err = mt_tokenizer_load(&tok, model);
    if (!err && bytes && chat)
        err =
            mt_errorf(MT_ERR_USAGE, "%s has memtune's byte tokenizer, which has no chat template: use --prompt", model);
    // the CPU generator and --merge work on the whole base in fp32 host memory (so does NF4 without an
    // adapter: QLoRA's model has one); a GPU reads it a layer at a time
    float *params = NULL;
    int n_params, whole = !c.gpu || merge || (nf4 && !adapter);
    size_t total = 0;
    if (!err && whole) {
        free(mt_model_param_table(&mc, &n_params, &total));
        params = malloc(total * sizeof(float));
        if (!params) err = mt_errorf(MT_ERR_NOMEM, "out of host memory for the model (%.1f GiB)", total * 4.0 / 1e9);
    }
    if (!err && whole) err = mt_hf_load_weights(model, &mc, params);
    if (!err && whole && nf4) err = mt_generate_quantize_nf4(&mc, params);
    mt_lora_config lora;
    float *ad = NULL;
    if (!err && adapter) err = mt_lora_read_folder(adapter, &mc, &lora, &ad);
    if (!err && ad && merge) mt_lora_merge(&mc, &lora, params, ad);
    mt_chat_template tmpl;
    int uses_chat = (chat || input) && tok;  // memtune's bytes: plain prompts only
    if (!err && uses_chat) {
        int b = mt_tokenizer_bos(tok), e = mt_tokenizer_eos(tok);
        err = mt_chat_template_pick(&tmpl, template_name, mt_tokenizer_chat_template(tok),
                                    b >= 0 ? mt_tokenizer_token(tok, (uint32_t)b) : NULL,
                                    e >= 0 ? mt_tokenizer_token(tok, (uint32_t)e) : NULL, model);
        if (err && input) err = MT_OK, uses_chat = 0;  // a file of plain prompts needs no template
    }
    c.tok = tok, c.o.eos = tok ? mt_tokenizer_eos(tok) : MT_TOKEN_EOS, c.o.eot = -1;
    if (!err && uses_chat) c.o.eot = mt_tokenizer_token_id(tok, mt_chat_end_of_turn(&tmpl));
    // the key/value cache holds the prompt and the new tokens, at most max_position_embeddings
    c.max_len = mc.max_position > 0 ? mc.max_position : 4096;
    c.mc = &mc, c.params = params, c.lora = ad && !merge ? &lora : NULL, c.adapter = ad && !merge ? ad : NULL;
    c.model_dir = model, c.nf4 = nf4;
    gen_item one = {0}, *items = &one;
    int n = 1;
    if (!err && !input) {
        mt_chat_message msgs[2];
        int k = 0;
        if (system) msgs[k++] = (mt_chat_message){MT_ROLE_SYSTEM, system, strlen(system)};
        if (chat) msgs[k++] = (mt_chat_message){MT_ROLE_USER, chat, strlen(chat)};
        err = prompt_ids(tok, &tmpl, chat ? msgs : NULL, k, prompt, &one.ids);
    } else if (!err) {
        err = read_items(input, tok, &tmpl, uses_chat, &items, &n);
    }
    if (c.batch <= 0) c.batch = c.gpu ? 16 : omp_get_max_threads();
    FILE *stream = input ? NULL : stdout;
    if (!err && n > 0) err = c.gpu ? generate_gpu(&c, items, n, stream) : generate_cpu(&c, items, n, stream);
    for (int i = 0; i < n && items; i++) {
        free(items[i].text);
        cJSON_Delete(items[i].obj);
        mt_ids_free(&items[i].ids);
    }
    if (items != &one) free(items);
    mt_tokenizer_free(tok);
    free(params);
    free(ad);
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
    if (!strcmp(argv[1], "generate")) return cmd_generate(argc - 2, argv + 2);
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
