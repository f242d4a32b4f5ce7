// datasets/hf_tokenizer.h: Hugging Face tokenizers in C, read from a model
// folder's tokenizer.json (and tokenizer_config.json for BOS/EOS), giving the
// same ids as the `tokenizers` library: BPE over byte-level pre-tokenization
// with the file's split regex (Llama-3, Qwen2, GPT-2 style) and
// SentencePiece-style BPE with byte fallback and the Prepend/Replace
// normalisers or the Metaspace pre-tokenizer (Llama-2, Mistral, TinyLlama);
// added and special tokens; decoding. Regexes run on PCRE2 (Unicode
// properties), normalisation forms on utf8proc. A component memtune does not
// implement is refused at load, naming the field.
//
// Text in is bytes: invalid UTF-8 is read as U+FFFD per maximal invalid
// subsequence, as Python's bytes.decode("utf-8", "replace") does, so ids
// equal those of `tokenizers` on the decoded string. A loaded tokenizer is
// read-only: encode and decode may run on several threads at once.
#ifndef MT_HF_TOKENIZER_H
#define MT_HF_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mt_tokenizer mt_tokenizer;

// A growable array of token ids.
typedef struct {
    uint32_t *ids;
    size_t n, cap;
} mt_ids;
void mt_ids_push(mt_ids *v, uint32_t id);
void mt_ids_free(mt_ids *v);

// path: a model folder holding tokenizer.json (and optionally
// tokenizer_config.json), or a tokenizer.json file.
mt_err mt_tokenizer_load(mt_tokenizer **out, const char *path);
void mt_tokenizer_free(mt_tokenizer *t);

// One more than the largest id (vocabulary and added tokens).
int mt_tokenizer_vocab_size(const mt_tokenizer *t);
// BOS and EOS ids as tokenizer_config.json names them (-1: none).
int mt_tokenizer_bos(const mt_tokenizer *t);
int mt_tokenizer_eos(const mt_tokenizer *t);
// PAD as tokenizer_config.json names it (-1: none).
int mt_tokenizer_pad(const mt_tokenizer *t);
// The model's chat template (Jinja source) from tokenizer_config.json or
// chat_template.jinja; NULL when the folder has none.
const char *mt_tokenizer_chat_template(const mt_tokenizer *t);
// The id of a token string (vocabulary or added), or -1.
int mt_tokenizer_token_id(const mt_tokenizer *t, const char *token);
// The token string of an id (NULL: none), and whether it is a special token.
const char *mt_tokenizer_token(const mt_tokenizer *t, uint32_t id);
int mt_tokenizer_is_special(const mt_tokenizer *t, uint32_t id);
// What the file is, for dataset attributes and logs: "bpe-bytelevel" or
// "bpe-sentencepiece" and the vocabulary size.
const char *mt_tokenizer_describe(const mt_tokenizer *t);

// Appends the ids of text[0..len) to out, as tokenizers'
// encode(text, add_special_tokens=False): added tokens in the text are
// matched, nothing is added around it.
void mt_tokenizer_encode(const mt_tokenizer *t, const char *text, size_t len, mt_ids *out);
// The text of ids (special tokens left out when skip_special), malloc'd and
// NUL-terminated, *len its length: tokenizers' decode.
char *mt_tokenizer_decode(const mt_tokenizer *t, const uint32_t *ids, size_t n, int skip_special, size_t *len);

// Replaces each maximal invalid UTF-8 subsequence of s[0..len) with U+FFFD;
// returns a malloc'd string and its length in *out_len.
char *mt_utf8_sanitize(const char *s, size_t len, size_t *out_len);

#ifdef __cplusplus
}
#endif
#endif
