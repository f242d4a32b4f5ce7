// datasets/tokenizer.h: the byte-level tokenizer memtune ships (ids 0..255 are
// bytes, 256 is begin-of-text, 257 end-of-text) and the converter that turns
// plain text or JSONL into the HDF5 token format. Models with their own
// tokenizer are fed datasets tokenized elsewhere (docs/formats.md).
#ifndef MT_TOKENIZER_H
#define MT_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MT_BYTE_TOKENIZER_NAME "memtune-bytes-v1"
#define MT_BYTE_VOCAB 258
#define MT_TOKEN_BOS 256
#define MT_TOKEN_EOS 257

typedef enum { MT_INPUT_TEXT, MT_INPUT_JSONL } mt_input_format;

typedef struct {
    uint64_t docs, tokens;
} mt_convert_stats;

// Reads `input` (text: documents separated by blank lines; JSONL: one object
// per line with a string field `text_field`), tokenizes each document as
// BOS bytes EOS, and writes `output`. Fails on unreadable input, bad JSON
// (naming the line) or an empty result; never leaves a partial output.
mt_err mt_convert_to_dataset(const char *input, mt_input_format format, const char *text_field, const char *output,
                             mt_convert_stats *stats);

#ifdef __cplusplus
}
#endif
#endif
