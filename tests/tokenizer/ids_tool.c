// tests/tokenizer/ids_tool.c: mt_tokenize_ids TOKENIZER FILE [OUT]: splits
// FILE's bytes into documents at every blank line ("\n\n"), encodes each
// with the tokenizer (OpenMP threads over documents), and writes one line of
// space-separated ids per document to OUT (or nothing); prints the documents,
// bytes, ids, seconds and tokens/s to stderr, and with MT_DECODE_CHECK=1 the
// documents whose decode differs from their text; MT_DECODE_OUT=FILE (with
// the check) writes each document's decode there, each followed by the byte
// 0x1e. tests/tokenizer/compare.py runs it beside Hugging Face `tokenizers`
// on the same documents.
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "datasets/hf_tokenizer.h"
#include "kernels/common.h"

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: mt_tokenize_ids TOKENIZER FILE [OUT]\n");
        return 2;
    }
    mt_tokenizer *t;
    if (mt_tokenizer_load(&t, argv[1])) {
        fprintf(stderr, "mt_tokenize_ids: %s\n", mt_last_error());
        return 1;
    }
    FILE *f = fopen(argv[2], "rb");
    if (!f) return fprintf(stderr, "mt_tokenize_ids: cannot read %s\n", argv[2]), 1;
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *data = malloc((size_t)size + 1);
    if (!data || fread(data, 1, (size_t)size, f) != (size_t)size) return fprintf(stderr, "read failed\n"), 1;
    fclose(f);
    // documents: [start[i], end[i])
    size_t cap = 1024, n = 0;
    size_t *start = malloc(cap * sizeof *start), *end = malloc(cap * sizeof *end);
    size_t at = 0;
    for (size_t i = 0; i + 1 < (size_t)size; i++)
        if (data[i] == '\n' && data[i + 1] == '\n') {
            if (n == cap) cap *= 2, start = realloc(start, cap * sizeof *start), end = realloc(end, cap * sizeof *end);
            start[n] = at, end[n++] = i, at = i + 2, i++;
        }
    if (n == cap) cap *= 2, start = realloc(start, cap * sizeof *start), end = realloc(end, cap * sizeof *end);
    start[n] = at, end[n++] = (size_t)size;
    mt_ids *ids = calloc(n, sizeof *ids);
    double t0 = mt_now();
#pragma omp parallel for schedule(dynamic, 16)
    for (size_t i = 0; i < n; i++) mt_tokenizer_encode(t, data + start[i], end[i] - start[i], &ids[i]);
    double seconds = mt_now() - t0;
    size_t total = 0;
    for (size_t i = 0; i < n; i++) total += ids[i].n;
    fprintf(stderr, "mt_tokenize_ids: %zu documents, %ld bytes, %zu ids in %.3f s (%.0f tokens/s, %d threads)\n", n,
            size, total, seconds, total / seconds, omp_get_max_threads());
    const char *decode_out = getenv("MT_DECODE_OUT");
    FILE *dec = decode_out ? fopen(decode_out, "wb") : NULL;
    if (getenv("MT_DECODE_CHECK")) {
        size_t differ = 0;
        for (size_t i = 0; i < n; i++) {
            size_t len, clean_len;
            char *text = mt_tokenizer_decode(t, ids[i].ids, ids[i].n, 0, &len);
            char *clean = mt_utf8_sanitize(data + start[i], end[i] - start[i], &clean_len);
            if (len != clean_len || memcmp(text, clean, len)) differ++;
            if (dec) fwrite(text, 1, len, dec), fputc(0x1e, dec);
            free(text), free(clean);
        }
        fprintf(stderr, "mt_tokenize_ids: %zu of %zu documents decode to other text\n", differ, n);
    }
    if (dec) fclose(dec);
    if (argc > 3) {
        FILE *out = fopen(argv[3], "w");
        if (!out) return fprintf(stderr, "cannot write %s\n", argv[3]), 1;
        for (size_t i = 0; i < n; i++) {
            for (size_t k = 0; k < ids[i].n; k++) fprintf(out, k ? " %u" : "%u", ids[i].ids[k]);
            fputc('\n', out);
        }
        fclose(out);
    }
    for (size_t i = 0; i < n; i++) mt_ids_free(&ids[i]);
    free(ids), free(start), free(end), free(data);
    mt_tokenizer_free(t);
    return 0;
}
