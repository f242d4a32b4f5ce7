// datasets/tokenizer.c: byte tokenizer and text/JSONL -> HDF5 converter.
#define _POSIX_C_SOURCE 200809L
#include "datasets/tokenizer.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "datasets/dataset.h"

typedef struct {
    uint32_t *tokens;
    uint64_t count, capacity;
    uint64_t *offsets;
    uint64_t docs, doc_capacity;
} token_buffer;

static void push_token(token_buffer *b, uint32_t t) {
    if (b->count == b->capacity) {
        b->capacity = b->capacity ? 2 * b->capacity : 1 << 16;
        b->tokens = realloc(b->tokens, b->capacity * sizeof *b->tokens);
        MT_CHECK(b->tokens != NULL, "token buffer");
    }
    b->tokens[b->count++] = t;
}

static void push_document(token_buffer *b, const char *text, size_t len) {
    if (b->docs + 2 > b->doc_capacity) {
        b->doc_capacity = b->doc_capacity ? 2 * b->doc_capacity : 1024;
        b->offsets = realloc(b->offsets, b->doc_capacity * sizeof *b->offsets);
        MT_CHECK(b->offsets != NULL, "offset buffer");
    }
    if (b->docs == 0) b->offsets[0] = 0;
    push_token(b, MT_TOKEN_BOS);
    for (size_t i = 0; i < len; i++) push_token(b, (unsigned char)text[i]);
    push_token(b, MT_TOKEN_EOS);
    b->offsets[++b->docs] = b->count;
}

// Trims blank space at both ends; returns the new length.
static size_t trim(const char **text, size_t len) {
    const char *s = *text;
    while (len && (*s == ' ' || *s == '\n' || *s == '\t' || *s == '\r')) s++, len--;
    while (len && (s[len - 1] == ' ' || s[len - 1] == '\n' || s[len - 1] == '\t' || s[len - 1] == '\r')) len--;
    *text = s;
    return len;
}

mt_err mt_convert_to_dataset(const char *input, mt_input_format format, const char *text_field, const char *output,
                             mt_convert_stats *stats) {
    FILE *f = fopen(input, "rb");
    if (!f) return mt_errorf(MT_ERR_IO, "%s: cannot open the input file", input);
    token_buffer b = {0};
    char *line = NULL, *doc = NULL;
    size_t line_cap = 0, doc_len = 0, doc_cap = 0;
    ssize_t n;
    long lineno = 0;
    mt_err err = MT_OK;
    while ((n = getline(&line, &line_cap, f)) >= 0) {
        lineno++;
        const char *s = line;
        size_t len = trim(&s, (size_t)n);
        if (format == MT_INPUT_JSONL) {
            if (len == 0) continue;
            cJSON *obj = cJSON_ParseWithLength(s, len);
            cJSON *field = obj ? cJSON_GetObjectItemCaseSensitive(obj, text_field) : NULL;
            if (!cJSON_IsString(field)) {
                err = mt_errorf(MT_ERR_DATASET,
                                "%s:%ld: %s. Each line must be a JSON object with a string field "
                                "\"%s\" (or pass --text-field).",
                                input, lineno, obj ? "no string field by that name" : "not valid JSON", text_field);
                cJSON_Delete(obj);
                break;
            }
            push_document(&b, field->valuestring, strlen(field->valuestring));
            cJSON_Delete(obj);
            continue;
        }
        // text: a blank line ends a document; lines inside one keep their newline
        if (len == 0) {
            const char *body = doc;
            size_t body_len = doc_len ? trim(&body, doc_len) : 0;
            if (body_len) push_document(&b, body, body_len);
            doc_len = 0;
            continue;
        }
        if (doc_len + (size_t)n + 1 > doc_cap) {
            doc_cap = 2 * (doc_len + (size_t)n + 1);
            doc = realloc(doc, doc_cap);
            MT_CHECK(doc != NULL, "document buffer");
        }
        memcpy(doc + doc_len, line, (size_t)n);
        doc_len += (size_t)n;
    }
    if (!err && ferror(f)) err = mt_errorf(MT_ERR_IO, "%s: read error", input);
    fclose(f);
    if (!err && format == MT_INPUT_TEXT && doc_len) {
        const char *s = doc;
        size_t len = trim(&s, doc_len);
        if (len) push_document(&b, s, len);
    }
    if (!err && b.docs == 0)
        err = mt_errorf(MT_ERR_DATASET, "%s: no documents found (the file is empty or blank)", input);
    if (!err)
        err =
            mt_dataset_write(output, b.tokens, b.count, b.offsets, b.docs, NULL, MT_BYTE_VOCAB, MT_BYTE_TOKENIZER_NAME);
    if (!err && stats) *stats = (mt_convert_stats){b.docs, b.count};
    free(line);
    free(doc);
    free(b.tokens);
    free(b.offsets);
    return err;
}
