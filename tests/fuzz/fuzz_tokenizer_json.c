// tests/fuzz/fuzz_tokenizer_json.c: any bytes as a model folder's
// tokenizer.json: loading must refuse what it does not implement with an
// error, never crash; a tokenizer that loads encodes and decodes a mixed
// sample (ASCII, CJK, emoji, combining marks, invalid UTF-8).
#include <stdlib.h>
#include <string.h>

#include "datasets/hf_tokenizer.h"
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    char path[256];
    snprintf(path, sizeof path, "%s/tokenizer.json", fuzz_dir());
    fuzz_write(path, data, size);
    mt_tokenizer *t = NULL;
    if (mt_tokenizer_load(&t, path) != MT_OK) return 0;
    static const char sample[] =
        "Hello  world!\n\n\tcafe\xcc\x81 \xe4\xb8\xad\xe6\x96\x87 \xf0\x9f\x99\x82 12345 "
        "\xff\xc3 <s></s><|endoftext|> don't";
    mt_ids ids = {0};
    mt_tokenizer_encode(t, sample, sizeof sample - 1, &ids);
    size_t len;
    free(mt_tokenizer_decode(t, ids.ids, ids.n, 0, &len));
    free(mt_tokenizer_decode(t, ids.ids, ids.n, 1, &len));
    mt_ids_free(&ids);
    mt_tokenizer_free(t);
    return 0;
}
