// datasets/tokenizer.c: memtune's byte tokenizer (tokenizer.h).
#include "datasets/tokenizer.h"

#include <stdlib.h>

void mt_bytes_encode(const char *text, size_t n, mt_ids *out) {
    for (size_t i = 0; i < n; i++) mt_ids_push(out, (unsigned char)text[i]);
}

char *mt_bytes_decode(const uint32_t *ids, size_t n, size_t *len) {
    char *out = malloc(n + 1);
    MT_CHECK(out != NULL, "decode");
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 256) out[k++] = (char)ids[i];
    out[k] = '\0';
    *len = k;
    return out;
}
