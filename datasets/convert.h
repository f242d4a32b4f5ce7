// datasets/convert.h: `memtune tokenize`: text, JSONL, prompt/completion,
// Alpaca and chat data to the HDF5 token format (docs/formats.md), with the
// model's own tokenizer (hf_tokenizer.h) or memtune's bytes, loss masks that
// train the answers only, and packing. Streams: memory stays bounded whatever
// the input's size; examples are tokenized on all cores and written in input
// order, so the output does not depend on the thread count.
#ifndef MT_CONVERT_H
#define MT_CONVERT_H

#include <stdint.h>

#include "kernels/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    MT_FORMAT_TEXT,               // documents separated by blank lines
    MT_FORMAT_JSONL,              // {"text": ...} (the field named by text_field)
    MT_FORMAT_PROMPT_COMPLETION,  // {"prompt": ..., "completion": ...}
    MT_FORMAT_ALPACA,             // {"instruction": ..., "input": ..., "output": ...}
    MT_FORMAT_CHAT                // {"messages": [{"role", "content"}]} or {"conversations": [{"from", "value"}]}
} mt_input_format;

typedef enum {
    MT_PACK_CONCAT,  // examples one after another; training windows cut across them
    MT_PACK_PAD      // each example alone in a window of seq_len tokens, padded (masked)
} mt_pack_mode;

typedef enum { MT_LONG_SPLIT, MT_LONG_TRUNCATE, MT_LONG_DROP } mt_long_mode;

typedef struct {
    const char *input, *output;
    mt_input_format format;
    const char *text_field;     // MT_FORMAT_JSONL's field ("text")
    const char *tokenizer;      // a model folder or tokenizer.json; NULL: memtune's bytes
    const char *chat_template;  // "auto" (the model's own) or a name (chat.h)
    int train_on_inputs;        // train every token, prompts included
    mt_pack_mode pack;
    int seq_len;             // MT_PACK_PAD's window
    mt_long_mode long_mode;  // MT_PACK_PAD: examples longer than a window
    int skip_bad_lines;      // count and skip malformed lines instead of failing
    int threads;             // 0: every core
    int progress;            // a progress line on stderr
} mt_convert_options;

typedef struct {
    uint64_t examples;          // read from the input
    uint64_t kept;              // written
    uint64_t split, truncated;  // longer than a window: split over several, or cut
    uint64_t dropped_long;      // longer than a window, dropped (--long drop)
    uint64_t dropped_empty;     // nothing to train (no answer, or empty text)
    uint64_t bad_lines;         // skipped (--on-bad-line skip)
    uint64_t straddled;         // answers whose first token also holds prompt text
    uint64_t tokens, trained, masked, padded;
    uint64_t bytes_read;
    double seconds;
    char tokenizer[128];     // the dataset's tokenizer attribute
    char template_name[32];  // the chat template rendered ("" for none)
} mt_convert_stats;

void mt_convert_defaults(mt_convert_options *o);
// Converts o->input to o->output. Errors name the file, the line and the
// fix; on any error no output file is left.
mt_err mt_convert(const mt_convert_options *o, mt_convert_stats *stats);

#ifdef __cplusplus
}
#endif
#endif
