// tests/fuzz/fuzz_jsonl.c: any bytes as `memtune tokenize` input in every
// format (the first byte picks the format and options): text, jsonl,
// prompt-completion and alpaca with memtune's bytes, chat with the qwen2
// fixture's tokenizer and ChatML template (run from the repository root).
// Bad lines must be errors naming the line or skipped and counted; nothing
// may crash, and an error leaves no output file.
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "datasets/convert.h"
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    if (size == 0) return 0;
    char in[256], out[256];
    snprintf(in, sizeof in, "%s/in.jsonl", fuzz_dir());
    snprintf(out, sizeof out, "%s/out.h5", fuzz_dir());
    fuzz_write(in, data + 1, size - 1);
    unlink(out);
    unsigned pick = data[0];
    mt_convert_options o;
    mt_convert_defaults(&o);
    o.input = in, o.output = out;
    o.format = (mt_input_format)(pick % 5);
    o.pack = (pick >> 3) & 1 ? MT_PACK_PAD : MT_PACK_CONCAT;
    o.seq_len = 2 + (int)((pick >> 4) & 7);
    o.long_mode = (mt_long_mode)(((pick >> 4) & 7) % 3);
    o.skip_bad_lines = (pick >> 7) & 1;
    o.train_on_inputs = (pick >> 6) & 1;
    o.threads = 1;
    if (o.format == MT_FORMAT_CHAT) o.tokenizer = "tests/tokenizer/fixtures/qwen2";
    mt_convert_stats st;
    if (mt_convert(&o, &st) != MT_OK && access(out, F_OK) == 0) abort();  // a failed run left a file
    return 0;
}
