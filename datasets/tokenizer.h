// datasets/tokenizer.h: the byte-level tokenizer memtune ships (ids 0..255 are
// bytes, 256 is begin-of-text, 257 end-of-text), which `memtune tokenize`
// uses when no model tokenizer is named (convert.h); models' own tokenizers
// are hf_tokenizer.h.
#ifndef MT_TOKENIZER_H
#define MT_TOKENIZER_H

#include <stddef.h>

#include "datasets/hf_tokenizer.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MT_BYTE_TOKENIZER_NAME "memtune-bytes-v1"
#define MT_BYTE_VOCAB 258
#define MT_TOKEN_BOS 256
#define MT_TOKEN_EOS 257

// Appends the ids of text[0..n): its bytes.
void mt_bytes_encode(const char *text, size_t n, mt_ids *out);
// The text of ids, BOS and EOS left out (malloc'd, NUL-terminated; *len its length).
char *mt_bytes_decode(const uint32_t *ids, size_t n, size_t *len);

#ifdef __cplusplus
}
#endif
#endif
