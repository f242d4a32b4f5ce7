// datasets/hf_tokenizer.c: tokenizer.json's BPE tokenizers (hf_tokenizer.h).
// The pipeline is the `tokenizers` library's: added tokens are cut out of the
// text (those not normalised first, then the normalised ones after the
// normaliser ran), each remaining piece is normalised, pre-tokenized into
// words, and each word is merged by BPE in rank order, lowest rank and then
// leftmost first, as its merge_all does with a binary heap.
#define _POSIX_C_SOURCE 200809L
#include "datasets/hf_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <cjson/cJSON.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <utf8proc.h>

// ------------------------------------------------------------ small pieces

void mt_ids_push(mt_ids *v, uint32_t id) {
    if (v->n == v->cap) {
        v->cap = v->cap ? 2 * v->cap : 256;
        v->ids = realloc(v->ids, v->cap * sizeof *v->ids);
        MT_CHECK(v->ids != NULL, "token ids");
    }
    v->ids[v->n++] = id;
}

void mt_ids_free(mt_ids *v) {
    free(v->ids);
    v->ids = NULL, v->n = v->cap = 0;
}

typedef struct {
    char *s;
    size_t n, cap;
} buf;

static void buf_add(buf *b, const void *p, size_t n) {
    if (b->n + n + 1 > b->cap) {
        while (b->n + n + 1 > b->cap) b->cap = b->cap ? 2 * b->cap : 256;
        b->s = realloc(b->s, b->cap);
        MT_CHECK(b->s != NULL, "text buffer");
    }
    memcpy(b->s + b->n, p, n);
    b->n += n;
    b->s[b->n] = '\0';
}

// Length of the UTF-8 character at s (valid UTF-8).
static int utf8_len(unsigned char c) { return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4; }

char *mt_utf8_sanitize(const char *s, size_t len, size_t *out_len) {
    const unsigned char *u = (const unsigned char *)s;
    buf b = {0};
    buf_add(&b, "", 0);
    size_t i = 0;
    while (i < len) {
        unsigned char c = u[i];
        if (c < 0x80) {
            size_t j = i;
            while (j < len && u[j] < 0x80) j++;
            buf_add(&b, u + i, j - i);
            i = j;
            continue;
        }
        // the well-formed sequences (Unicode, table 3-7): lead byte, the
        // range of the second byte, the count of bytes
        int need = 0;
        unsigned char lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF)
            need = 2;
        else if (c == 0xE0)
            need = 3, lo = 0xA0;
        else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF)
            need = 3;
        else if (c == 0xED)
            need = 3, hi = 0x9F;
        else if (c == 0xF0)
            need = 4, lo = 0x90;
        else if (c >= 0xF1 && c <= 0xF3)
            need = 4;
        else if (c == 0xF4)
            need = 4, hi = 0x8F;
        size_t k = 1;
        while (need && k < (size_t)need && i + k < len) {
            unsigned char d = u[i + k];
            if (d < (k == 1 ? lo : 0x80) || d > (k == 1 ? hi : 0xBF)) break;
            k++;
        }
        if (need && k == (size_t)need) {
            buf_add(&b, u + i, k);
        } else {
            buf_add(&b, "\xEF\xBF\xBD", 3);  // one U+FFFD for the maximal subpart
        }
        i += need ? k : 1;
    }
    *out_len = b.n;
    return b.s;
}

// String -> int, open addressing (FNV-1a); keys are owned copies.
typedef struct {
    char **keys;
    size_t *lens;
    int *vals;
    size_t cap, count;
} strmap;

static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h;
}

static void strmap_init(strmap *m, size_t expected) {
    m->cap = 16;
    while (m->cap < 2 * expected + 16) m->cap *= 2;
    m->keys = calloc(m->cap, sizeof *m->keys);
    m->lens = calloc(m->cap, sizeof *m->lens);
    m->vals = calloc(m->cap, sizeof *m->vals);
    m->count = 0;
    MT_CHECK(m->keys && m->lens && m->vals, "string map");
}

static int strmap_get(const strmap *m, const char *s, size_t n) {
    if (!m->cap) return -1;
    for (size_t i = hash_bytes(s, n) & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
        if (!m->keys[i]) return -1;
        if (m->lens[i] == n && !memcmp(m->keys[i], s, n)) return m->vals[i];
    }
}

static void strmap_put(strmap *m, const char *s, size_t n, int val) {
    MT_CHECK(2 * (m->count + 1) <= m->cap, "string map full");
    size_t i = hash_bytes(s, n) & (m->cap - 1);
    while (m->keys[i] && !(m->lens[i] == n && !memcmp(m->keys[i], s, n))) i = (i + 1) & (m->cap - 1);
    if (!m->keys[i]) {
        m->keys[i] = malloc(n + 1);
        MT_CHECK(m->keys[i] != NULL, "string map key");
        memcpy(m->keys[i], s, n);
        m->keys[i][n] = '\0';
        m->lens[i] = n;
        m->count++;
    }
    m->vals[i] = val;
}

static void strmap_free(strmap *m) {
    for (size_t i = 0; i < m->cap; i++) free(m->keys[i]);
    free(m->keys), free(m->lens), free(m->vals);
    memset(m, 0, sizeof *m);
}

// (left id, right id) -> (rank, merged id).
typedef struct {
    uint64_t *keys;  // left << 32 | right, + 1 (0 is empty)
    int32_t *rank, *merged;
    size_t cap;
} pairmap;

static uint64_t mix64(uint64_t x) {
    x ^= x >> 33, x *= 0xff51afd7ed558ccdull, x ^= x >> 33, x *= 0xc4ceb9fe1a85ec53ull;
    return x ^ (x >> 33);
}

static void pairmap_init(pairmap *m, size_t expected) {
    m->cap = 16;
    while (m->cap < 2 * expected + 16) m->cap *= 2;
    m->keys = calloc(m->cap, sizeof *m->keys);
    m->rank = malloc(m->cap * sizeof *m->rank);
    m->merged = malloc(m->cap * sizeof *m->merged);
    MT_CHECK(m->keys && m->rank && m->merged, "merge map");
}

// Whether (a, b) merges; its rank and the merged id.
static int pairmap_get(const pairmap *m, uint32_t a, uint32_t b, int32_t *rank, int32_t *merged) {
    if (!m->cap) return 0;
    uint64_t key = ((uint64_t)a << 32 | b) + 1;
    for (size_t i = mix64(key) & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
        if (!m->keys[i]) return 0;
        if (m->keys[i] == key) {
            *rank = m->rank[i], *merged = m->merged[i];
            return 1;
        }
    }
}

static void pairmap_put(pairmap *m, uint32_t a, uint32_t b, int32_t rank, int32_t merged) {
    uint64_t key = ((uint64_t)a << 32 | b) + 1;
    size_t i = mix64(key) & (m->cap - 1);
    while (m->keys[i] && m->keys[i] != key) i = (i + 1) & (m->cap - 1);
    if (m->keys[i]) return;  // a repeated merge keeps its first (lowest) rank
    m->keys[i] = key, m->rank[i] = rank, m->merged[i] = merged;
}

static void pairmap_free(pairmap *m) {
    free(m->keys), free(m->rank), free(m->merged);
    memset(m, 0, sizeof *m);
}

// ------------------------------------------------------------ the pipeline

typedef enum { NORM_NFC, NORM_NFD, NORM_NFKC, NORM_NFKD, NORM_PREPEND, NORM_REPLACE } norm_kind;
typedef struct {
    norm_kind kind;
    char *a, *b;  // Prepend: a; Replace: a -> b (a literal string)
} norm_step;

typedef enum { SPLIT_ISOLATED, SPLIT_REMOVED, SPLIT_MERGED_PREV, SPLIT_MERGED_NEXT, SPLIT_CONTIGUOUS } split_behavior;
typedef enum { PRE_SPLIT, PRE_BYTELEVEL, PRE_METASPACE } pre_kind;
typedef enum { PREPEND_ALWAYS, PREPEND_FIRST, PREPEND_NEVER } prepend_scheme;
typedef struct {
    pre_kind kind;
    pcre2_code *re;           // Split (regex or literal), ByteLevel with use_regex
    split_behavior behavior;  // Split
    int add_prefix_space;     // ByteLevel
    char *replacement;        // Metaspace
    prepend_scheme scheme;    // Metaspace
    int split;                // Metaspace: split on the replacement
} pre_step;

typedef enum { DEC_BYTELEVEL, DEC_REPLACE, DEC_BYTEFALLBACK, DEC_FUSE, DEC_STRIP, DEC_METASPACE } dec_kind;
typedef struct {
    dec_kind kind;
    char *a, *b;            // Replace a -> b; Strip: content a; Metaspace: replacement a
    int start, stop;        // Strip
    prepend_scheme scheme;  // Metaspace
} dec_step;

typedef struct {
    uint32_t id;
    char *content;
    size_t len;
    int special, normalized, lstrip, rstrip, single_word;
} added_token;

struct mt_tokenizer {
    strmap vocab;   // token -> id (the model's vocabulary)
    char **tokens;  // id -> token (vocabulary and added), NULL where none
    unsigned char *special;
    int n_ids;
    pairmap merges;
    int byte_fallback, fuse_unk, ignore_merges, unk;  // unk: -1 when none
    int byte_ids[256];                                // <0xXX> ids, -1 where absent
    norm_step *norms;
    int n_norms;
    pre_step *pres;
    int n_pres;
    dec_step *decs;
    int n_decs;
    added_token *added;
    int n_added;
    int bos, eos, pad;
    char *chat_template;  // tokenizer_config.json's (or chat_template.jinja), NULL: none
    char describe[96];
    // ByteLevel: each byte's stand-in character, as UTF-8, and back
    char byte_char[256][3];
    unsigned char byte_char_len[256];
    int32_t char_byte[324];  // code point (< 324) -> byte, -1
};

// GPT-2's bytes_to_unicode: printable bytes stand for themselves, the
// others for 256, 257, ... in byte order.
static void byte_level_tables(mt_tokenizer *t) {
    int next = 256;
    for (int i = 0; i < 324; i++) t->char_byte[i] = -1;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
        int cp = printable ? b : next++;
        t->byte_char_len[b] = (unsigned char)utf8proc_encode_char(cp, (utf8proc_uint8_t *)t->byte_char[b]);
        t->char_byte[cp] = b;
    }
}

// The GPT-2 split of ByteLevel's use_regex, as `tokenizers` has it.
static const char *const kGpt2Split =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static pcre2_code *compile_regex(const char *pattern, int literal, const char *where, mt_err *err) {
    int code;
    PCRE2_SIZE at;
    // the pattern is checked as UTF-8 (a file may hold anything); the text
    // it runs on is sanitised first, so matching skips the check
    uint32_t options = PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0);
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pattern, PCRE2_ZERO_TERMINATED, options, &code, &at, NULL);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(code, msg, sizeof msg);
        *err = mt_errorf(MT_ERR_FORMAT, "%s: its pattern does not compile at offset %zu (%s): %s", where, (size_t)at,
                         (char *)msg, pattern);
        return NULL;
    }
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);  // where the JIT is there; the interpreter otherwise
    return re;
}

// ------------------------------------------------------------ loading

static char *dup_string(const char *s) {
    char *d = strdup(s ? s : "");
    MT_CHECK(d != NULL, "string");
    return d;
}

static const char *json_str(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static int json_bool(const cJSON *o, const char *key, int def) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsBool(v) ? cJSON_IsTrue(v) : def;
}

// A {"String": s} or {"Regex": r} pattern.
static const char *json_pattern(const cJSON *o, int *is_regex) {
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(o, "pattern");
    const char *s = json_str(p, "String");
    *is_regex = 0;
    if (s) return s;
    *is_regex = 1;
    return json_str(p, "Regex");
}

static mt_err unsupported(const char *path, const char *field, const char *what) {
    return mt_errorf(MT_ERR_FORMAT,
                     "%s: %s %s is not one memtune implements (it reads BPE with byte-level or SentencePiece-style "
                     "pre-tokenization: docs/formats.md lists the components); tokenize this data with the "
                     "`tokenizers` library instead",
                     path, field, what);
}

static mt_err load_normalizer(mt_tokenizer *t, const cJSON *n, const char *path) {
    if (!n || cJSON_IsNull(n)) return MT_OK;
    const char *type = json_str(n, "type");
    if (!type) return unsupported(path, "normalizer", "without a type");
    if (!strcmp(type, "Sequence")) {
        const cJSON *item;
        cJSON_ArrayForEach(item, cJSON_GetObjectItemCaseSensitive(n, "normalizers")) {
            mt_err err = load_normalizer(t, item, path);
            if (err) return err;
        }
        return MT_OK;
    }
    norm_step s = {0};
    if (!strcmp(type, "NFC"))
        s.kind = NORM_NFC;
    else if (!strcmp(type, "NFD"))
        s.kind = NORM_NFD;
    else if (!strcmp(type, "NFKC"))
        s.kind = NORM_NFKC;
    else if (!strcmp(type, "NFKD"))
        s.kind = NORM_NFKD;
    else if (!strcmp(type, "Prepend"))
        s.kind = NORM_PREPEND, s.a = dup_string(json_str(n, "prepend"));
    else if (!strcmp(type, "Replace")) {
        int is_regex;
        const char *pattern = json_pattern(n, &is_regex);
        if (!pattern || is_regex) return unsupported(path, "normalizer Replace", "with a regex pattern");
        s.kind = NORM_REPLACE, s.a = dup_string(pattern), s.b = dup_string(json_str(n, "content"));
    } else {
        return unsupported(path, "normalizer", type);
    }
    t->norms = realloc(t->norms, (size_t)(t->n_norms + 1) * sizeof *t->norms);
    MT_CHECK(t->norms != NULL, "normalizers");
    t->norms[t->n_norms++] = s;
    return MT_OK;
}

static mt_err parse_scheme(const cJSON *o, prepend_scheme *scheme, const char *path) {
    const char *s = json_str(o, "prepend_scheme");
    if (!s) {  // older files: add_prefix_space
        *scheme = json_bool(o, "add_prefix_space", 1) ? PREPEND_ALWAYS : PREPEND_NEVER;
        return MT_OK;
    }
    if (!strcmp(s, "always"))
        *scheme = PREPEND_ALWAYS;
    else if (!strcmp(s, "first"))
        *scheme = PREPEND_FIRST;
    else if (!strcmp(s, "never"))
        *scheme = PREPEND_NEVER;
    else
        return unsupported(path, "Metaspace prepend_scheme", s);
    return MT_OK;
}

static mt_err load_pre_tokenizer(mt_tokenizer *t, const cJSON *p, const char *path) {
    if (!p || cJSON_IsNull(p)) return MT_OK;
    const char *type = json_str(p, "type");
    if (!type) return unsupported(path, "pre_tokenizer", "without a type");
    if (!strcmp(type, "Sequence")) {
        const cJSON *item;
        cJSON_ArrayForEach(item, cJSON_GetObjectItemCaseSensitive(p, "pretokenizers")) {
            mt_err err = load_pre_tokenizer(t, item, path);
            if (err) return err;
        }
        return MT_OK;
    }
    pre_step s = {0};
    mt_err err = MT_OK;
    if (!strcmp(type, "Split")) {
        int is_regex;
        const char *pattern = json_pattern(p, &is_regex), *behavior = json_str(p, "behavior");
        if (!pattern) return unsupported(path, "pre_tokenizer Split", "without a pattern");
        if (json_bool(p, "invert", 0)) return unsupported(path, "pre_tokenizer Split", "with invert: true");
        if (!behavior) behavior = "";
        if (!strcmp(behavior, "Isolated"))
            s.behavior = SPLIT_ISOLATED;
        else if (!strcmp(behavior, "Removed"))
            s.behavior = SPLIT_REMOVED;
        else if (!strcmp(behavior, "MergedWithPrevious"))
            s.behavior = SPLIT_MERGED_PREV;
        else if (!strcmp(behavior, "MergedWithNext"))
            s.behavior = SPLIT_MERGED_NEXT;
        else if (!strcmp(behavior, "Contiguous"))
            s.behavior = SPLIT_CONTIGUOUS;
        else
            return unsupported(path, "pre_tokenizer Split behavior", behavior);
        s.kind = PRE_SPLIT;
        s.re = compile_regex(pattern, !is_regex, path, &err);
    } else if (!strcmp(type, "ByteLevel")) {
        s.kind = PRE_BYTELEVEL;
        s.add_prefix_space = json_bool(p, "add_prefix_space", 1);
        if (json_bool(p, "use_regex", 1)) s.re = compile_regex(kGpt2Split, 0, path, &err);
    } else if (!strcmp(type, "Metaspace")) {
        s.kind = PRE_METASPACE;
        s.replacement = dup_string(json_str(p, "replacement") ? json_str(p, "replacement") : "\xE2\x96\x81");
        s.split = json_bool(p, "split", 1);
        err = parse_scheme(p, &s.scheme, path);
    } else {
        return unsupported(path, "pre_tokenizer", type);
    }
    if (err) return err;
    t->pres = realloc(t->pres, (size_t)(t->n_pres + 1) * sizeof *t->pres);
    MT_CHECK(t->pres != NULL, "pre-tokenizers");
    t->pres[t->n_pres++] = s;
    return MT_OK;
}

static mt_err load_decoder(mt_tokenizer *t, const cJSON *d, const char *path) {
    if (!d || cJSON_IsNull(d)) return MT_OK;
    const char *type = json_str(d, "type");
    if (!type) return unsupported(path, "decoder", "without a type");
    if (!strcmp(type, "Sequence")) {
        const cJSON *item;
        cJSON_ArrayForEach(item, cJSON_GetObjectItemCaseSensitive(d, "decoders")) {
            mt_err err = load_decoder(t, item, path);
            if (err) return err;
        }
        return MT_OK;
    }
    dec_step s = {0};
    if (!strcmp(type, "ByteLevel"))
        s.kind = DEC_BYTELEVEL;
    else if (!strcmp(type, "ByteFallback"))
        s.kind = DEC_BYTEFALLBACK;
    else if (!strcmp(type, "Fuse"))
        s.kind = DEC_FUSE;
    else if (!strcmp(type, "Replace")) {
        int is_regex;
        const char *pattern = json_pattern(d, &is_regex);
        if (!pattern || is_regex) return unsupported(path, "decoder Replace", "with a regex pattern");
        s.kind = DEC_REPLACE, s.a = dup_string(pattern), s.b = dup_string(json_str(d, "content"));
    } else if (!strcmp(type, "Strip")) {
        const cJSON *start = cJSON_GetObjectItemCaseSensitive(d, "start"),
                    *stop = cJSON_GetObjectItemCaseSensitive(d, "stop");
        s.kind = DEC_STRIP, s.a = dup_string(json_str(d, "content"));
        s.start = cJSON_IsNumber(start) ? start->valueint : 0, s.stop = cJSON_IsNumber(stop) ? stop->valueint : 0;
    } else if (!strcmp(type, "Metaspace")) {
        s.kind = DEC_METASPACE;
        s.a = dup_string(json_str(d, "replacement") ? json_str(d, "replacement") : "\xE2\x96\x81");
        mt_err err = parse_scheme(d, &s.scheme, path);
        if (err) return err;
    } else {
        return unsupported(path, "decoder", type);
    }
    t->decs = realloc(t->decs, (size_t)(t->n_decs + 1) * sizeof *t->decs);
    MT_CHECK(t->decs != NULL, "decoders");
    t->decs[t->n_decs++] = s;
    return MT_OK;
}

// Token ids stay below this (the largest vocabularies have a few hundred thousand).
enum { MAX_ID = 1 << 24 };

static void set_token(mt_tokenizer *t, int id, const char *s) {
    if (id >= t->n_ids) {
        int n = id + 1;
        t->tokens = realloc(t->tokens, (size_t)n * sizeof *t->tokens);
        t->special = realloc(t->special, (size_t)n);
        MT_CHECK(t->tokens && t->special, "token table");
        for (int i = t->n_ids; i < n; i++) t->tokens[i] = NULL, t->special[i] = 0;
        t->n_ids = n;
    }
    free(t->tokens[id]);
    t->tokens[id] = dup_string(s);
}

static mt_err load_model(mt_tokenizer *t, const cJSON *m, const char *path) {
    const char *type = json_str(m, "type");
    if (!type || strcmp(type, "BPE")) return unsupported(path, "model type", type ? type : "(none)");
    const cJSON *dropout = cJSON_GetObjectItemCaseSensitive(m, "dropout");
    if (dropout && !cJSON_IsNull(dropout) && !(cJSON_IsNumber(dropout) && dropout->valuedouble == 0))
        return unsupported(path, "model.dropout", "other than null (BPE dropout is for training the tokenizer)");
    const char *prefix = json_str(m, "continuing_subword_prefix"), *suffix = json_str(m, "end_of_word_suffix");
    if ((prefix && prefix[0]) || (suffix && suffix[0]))
        return unsupported(path, "model.continuing_subword_prefix/end_of_word_suffix", "(word-piece style BPE)");
    t->byte_fallback = json_bool(m, "byte_fallback", 0);
    t->fuse_unk = json_bool(m, "fuse_unk", 0);
    t->ignore_merges = json_bool(m, "ignore_merges", 0);
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(m, "vocab"),
                *merges = cJSON_GetObjectItemCaseSensitive(m, "merges");
    if (!cJSON_IsObject(vocab) || !cJSON_IsArray(merges))
        return mt_errorf(MT_ERR_FORMAT, "%s: model.vocab (an object) or model.merges (a list) is missing", path);
    strmap_init(&t->vocab, (size_t)cJSON_GetArraySize(vocab));
    const cJSON *item;
    cJSON_ArrayForEach(item, vocab) {
        if (!cJSON_IsNumber(item) || item->valuedouble < 0 || item->valuedouble >= MAX_ID ||
            item->valuedouble != (double)item->valueint)
            return mt_errorf(MT_ERR_FORMAT, "%s: model.vocab[\"%s\"] is not an id (a whole number below %d)", path,
                             item->string, MAX_ID);
        strmap_put(&t->vocab, item->string, strlen(item->string), item->valueint);
        set_token(t, item->valueint, item->string);
    }
    const char *unk = json_str(m, "unk_token");
    t->unk = unk ? strmap_get(&t->vocab, unk, strlen(unk)) : -1;
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        t->byte_ids[b] = strmap_get(&t->vocab, name, strlen(name));
    }
    pairmap_init(&t->merges, (size_t)cJSON_GetArraySize(merges));
    int rank = 0;
    cJSON_ArrayForEach(item, merges) {
        char left[512], right[512];
        if (cJSON_IsString(item)) {
            const char *space = strchr(item->valuestring, ' ');
            if (!space || strchr(space + 1, ' ') || (size_t)(space - item->valuestring) >= sizeof left)
                return mt_errorf(MT_ERR_FORMAT, "%s: merge %d \"%s\" is not two tokens with one space", path, rank,
                                 item->valuestring);
            snprintf(left, sizeof left, "%.*s", (int)(space - item->valuestring), item->valuestring);
            snprintf(right, sizeof right, "%s", space + 1);
        } else if (cJSON_IsArray(item) && cJSON_GetArraySize(item) == 2 &&
                   cJSON_IsString(cJSON_GetArrayItem(item, 0)) && cJSON_IsString(cJSON_GetArrayItem(item, 1))) {
            snprintf(left, sizeof left, "%s", cJSON_GetArrayItem(item, 0)->valuestring);
            snprintf(right, sizeof right, "%s", cJSON_GetArrayItem(item, 1)->valuestring);
        } else {
            return mt_errorf(MT_ERR_FORMAT, "%s: merge %d is neither \"a b\" nor [\"a\", \"b\"]", path, rank);
        }
        char both[1024];
        snprintf(both, sizeof both, "%s%s", left, right);
        int a = strmap_get(&t->vocab, left, strlen(left)), b = strmap_get(&t->vocab, right, strlen(right)),
            ab = strmap_get(&t->vocab, both, strlen(both));
        if (a < 0 || b < 0 || ab < 0)
            return mt_errorf(MT_ERR_FORMAT, "%s: merge %d (\"%s\" + \"%s\") names a token not in the vocabulary", path,
                             rank, left, right);
        pairmap_put(&t->merges, (uint32_t)a, (uint32_t)b, rank, ab);
        rank++;
    }
    return MT_OK;
}

static mt_err load_added(mt_tokenizer *t, const cJSON *list, const char *path) {
    const cJSON *item;
    cJSON_ArrayForEach(item, list) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(item, "id");
        const char *content = json_str(item, "content");
        if (!cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble >= MAX_ID ||
            id->valuedouble != (double)id->valueint || !content || !content[0])
            return mt_errorf(MT_ERR_FORMAT, "%s: an added token has no id (a whole number below %d) or no content",
                             path, MAX_ID);
        added_token a = {(uint32_t)id->valueint,
                         dup_string(content),
                         strlen(content),
                         json_bool(item, "special", 0),
                         json_bool(item, "normalized", !json_bool(item, "special", 0)),
                         json_bool(item, "lstrip", 0),
                         json_bool(item, "rstrip", 0),
                         json_bool(item, "single_word", 0)};
        t->added = realloc(t->added, (size_t)(t->n_added + 1) * sizeof *t->added);
        MT_CHECK(t->added != NULL, "added tokens");
        t->added[t->n_added++] = a;
        set_token(t, id->valueint, content);
        t->special[id->valueint] = (unsigned char)a.special;
    }
    return MT_OK;
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    buf b = {0};
    char chunk[1 << 16];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) buf_add(&b, chunk, n);
    fclose(f);
    if (!b.s) buf_add(&b, "", 0);
    *len = b.n;
    return b.s;
}

// tokenizer_config.json's bos_token / eos_token: a string, or {"content": ...}.
static int config_token(const mt_tokenizer *t, const cJSON *cfg, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
    const char *s = cJSON_IsString(v) ? v->valuestring : json_str(v, "content");
    return s ? mt_tokenizer_token_id(t, s) : -1;
}

// The chat template: tokenizer_config.json's chat_template (a string, or a
// list of {name, template} of which "default" is the one), else the folder's
// chat_template.jinja, as transformers reads them.
static char *config_chat_template(const cJSON *cfg, const char *folder) {
    const cJSON *v = cfg ? cJSON_GetObjectItemCaseSensitive(cfg, "chat_template") : NULL;
    if (cJSON_IsString(v)) return strdup(v->valuestring);
    const cJSON *item;
    if (cJSON_IsArray(v)) cJSON_ArrayForEach(item, v) {
            const char *name = json_str(item, "name"), *text = json_str(item, "template");
            if (name && text && !strcmp(name, "default")) return strdup(text);
        }
    char path[1300];
    snprintf(path, sizeof path, "%s/chat_template.jinja", folder);
    size_t len;
    return read_file(path, &len);
}

mt_err mt_tokenizer_load(mt_tokenizer **out, const char *path) {
    *out = NULL;
    char file[1200], folder[1200];
    struct stat st;
    if (stat(path, &st) != 0)
        return mt_errorf(MT_ERR_IO, "%s: no such tokenizer (name a model folder holding tokenizer.json, or the file)",
                         path);
    if (S_ISDIR(st.st_mode)) {
        snprintf(folder, sizeof folder, "%s", path);
        snprintf(file, sizeof file, "%s/tokenizer.json", path);
    } else {
        snprintf(file, sizeof file, "%s", path);
        snprintf(folder, sizeof folder, "%s", path);
        char *slash = strrchr(folder, '/');
        if (slash)
            *slash = '\0';
        else
            snprintf(folder, sizeof folder, ".");
    }
    size_t len;
    char *text = read_file(file, &len);
    if (!text)
        return mt_errorf(MT_ERR_IO,
                         "%s: cannot read it; memtune reads the fast tokenizer's tokenizer.json (a folder with only "
                         "tokenizer.model: save it once with transformers' AutoTokenizer.save_pretrained)",
                         file);
    // JSON is UTF-8; a token or pattern with other bytes would match inside characters
    size_t clean_len;
    char *clean = mt_utf8_sanitize(text, len, &clean_len);
    int valid = clean_len == len && !memcmp(clean, text, len);
    free(clean);
    if (!valid) {
        free(text);
        return mt_errorf(MT_ERR_FORMAT, "%s: not valid UTF-8 (JSON files are UTF-8; was it saved in another encoding?)",
                         file);
    }
    cJSON *root = cJSON_ParseWithLength(text, len);
    free(text);
    if (!root) return mt_errorf(MT_ERR_FORMAT, "%s: not valid JSON", file);
    mt_tokenizer *t = calloc(1, sizeof *t);
    MT_CHECK(t != NULL, "tokenizer");
    t->bos = t->eos = t->pad = t->unk = -1;
    byte_level_tables(t);
    mt_err err = load_model(t, cJSON_GetObjectItemCaseSensitive(root, "model"), file);
    if (!err) err = load_added(t, cJSON_GetObjectItemCaseSensitive(root, "added_tokens"), file);
    if (!err) err = load_normalizer(t, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), file);
    if (!err) err = load_pre_tokenizer(t, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), file);
    if (!err) err = load_decoder(t, cJSON_GetObjectItemCaseSensitive(root, "decoder"), file);
    cJSON_Delete(root);
    if (err) {
        mt_tokenizer_free(t);
        return err;
    }
    int byte_level = 0;
    for (int i = 0; i < t->n_pres; i++) byte_level |= t->pres[i].kind == PRE_BYTELEVEL;
    snprintf(t->describe, sizeof t->describe, "%s, %d tokens", byte_level ? "bpe-bytelevel" : "bpe-sentencepiece",
             t->n_ids);
    char config_path[1300];
    snprintf(config_path, sizeof config_path, "%s/tokenizer_config.json", folder);
    char *config_text = read_file(config_path, &len);
    cJSON *config = config_text ? cJSON_ParseWithLength(config_text, len) : NULL;
    free(config_text);
    if (config) {
        t->bos = config_token(t, config, "bos_token");
        t->eos = config_token(t, config, "eos_token");
        t->pad = config_token(t, config, "pad_token");
    }
    t->chat_template = config_chat_template(config, folder);
    cJSON_Delete(config);
    *out = t;
    return MT_OK;
}

void mt_tokenizer_free(mt_tokenizer *t) {
    if (!t) return;
    strmap_free(&t->vocab);
    pairmap_free(&t->merges);
    for (int i = 0; i < t->n_ids; i++) free(t->tokens[i]);
    free(t->tokens), free(t->special);
    for (int i = 0; i < t->n_norms; i++) free(t->norms[i].a), free(t->norms[i].b);
    for (int i = 0; i < t->n_pres; i++) pcre2_code_free(t->pres[i].re), free(t->pres[i].replacement);
    for (int i = 0; i < t->n_decs; i++) free(t->decs[i].a), free(t->decs[i].b);
    for (int i = 0; i < t->n_added; i++) free(t->added[i].content);
    free(t->norms), free(t->pres), free(t->decs), free(t->added);
    free(t->chat_template);
    free(t);
}

int mt_tokenizer_vocab_size(const mt_tokenizer *t) { return t->n_ids; }
int mt_tokenizer_bos(const mt_tokenizer *t) { return t->bos; }
int mt_tokenizer_eos(const mt_tokenizer *t) { return t->eos; }
int mt_tokenizer_pad(const mt_tokenizer *t) { return t->pad; }
const char *mt_tokenizer_chat_template(const mt_tokenizer *t) { return t->chat_template; }
const char *mt_tokenizer_describe(const mt_tokenizer *t) { return t->describe; }

int mt_tokenizer_token_id(const mt_tokenizer *t, const char *token) {
    for (int i = 0; i < t->n_added; i++)
        if (!strcmp(t->added[i].content, token)) return (int)t->added[i].id;
    return strmap_get(&t->vocab, token, strlen(token));
}

const char *mt_tokenizer_token(const mt_tokenizer *t, uint32_t id) {
    return id < (uint32_t)t->n_ids ? t->tokens[id] : NULL;
}

int mt_tokenizer_is_special(const mt_tokenizer *t, uint32_t id) { return id < (uint32_t)t->n_ids && t->special[id]; }

// ------------------------------------------------------------ normalising

// The text after one normaliser, into out (cleared first).
static void normalize_step(const norm_step *s, const char *in, size_t n, buf *out) {
    out->n = 0;
    buf_add(out, "", 0);
    if (s->kind == NORM_PREPEND) {
        if (n) buf_add(out, s->a, strlen(s->a));
        buf_add(out, in, n);
    } else if (s->kind == NORM_REPLACE) {
        size_t pat = strlen(s->a), rep = strlen(s->b), i = 0;
        while (i < n) {
            if (pat && i + pat <= n && !memcmp(in + i, s->a, pat)) {
                buf_add(out, s->b, rep);
                i += pat;
            } else {
                buf_add(out, in + i, 1);
                i++;
            }
        }
    } else {
        int options = UTF8PROC_STABLE |
                      (s->kind == NORM_NFC || s->kind == NORM_NFKC ? UTF8PROC_COMPOSE : UTF8PROC_DECOMPOSE) |
                      (s->kind == NORM_NFKC || s->kind == NORM_NFKD ? UTF8PROC_COMPAT : 0);
        utf8proc_uint8_t *result = NULL;
        utf8proc_ssize_t len =
            utf8proc_map((const utf8proc_uint8_t *)in, (utf8proc_ssize_t)n, &result, (utf8proc_option_t)options);
        MT_CHECK(len >= 0, "utf8proc: %s", utf8proc_errmsg(len));
        buf_add(out, result, (size_t)len);
        free(result);
    }
}

// ------------------------------------------------------------ pre-tokenizing

// A word of the text being pre-tokenized: bytes [at, at + len) of the
// arena; first: it starts at the input's first byte (Metaspace's "first").
typedef struct {
    size_t at, len;
    int first;
} piece;

typedef struct {
    piece *p;
    int n, cap;
} pieces;

static void pieces_add(pieces *l, size_t at, size_t len, int first) {
    if (!len) return;
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->p = realloc(l->p, (size_t)l->cap * sizeof *l->p);
        MT_CHECK(l->p != NULL, "pieces");
    }
    l->p[l->n++] = (piece){at, len, first};
}

// [a, b) of word w as a word of its own.
static void emit(pieces *out, const piece *w, size_t a, size_t b) {
    pieces_add(out, w->at + a, b - a, w->first && a == 0);
}

// Split's behaviours over one word: the matches of re and the gaps between.
static void split_word(const pre_step *s, pcre2_match_data *md, const buf *arena, const piece *w, pieces *out) {
    const char *text = arena->s + w->at;
    size_t n = w->len, pos = 0, gap = 0;  // gap: where the unmatched text since the last match starts
    size_t pending = SIZE_MAX;            // MergedWithNext: a match waiting for what follows it
    while (pos <= n) {
        int rc = pcre2_match(s->re, (PCRE2_SPTR)text, n, pos, PCRE2_NO_UTF_CHECK, md, NULL);
        if (rc < 0) break;
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        size_t ms = ov[0], me = ov[1];
        if (me == ms) {  // an empty match splits nothing: look one character further
            if (ms >= n) break;
            pos = ms + (size_t)utf8_len((unsigned char)text[ms]);
            continue;
        }
        switch (s->behavior) {
            case SPLIT_ISOLATED: emit(out, w, gap, ms), emit(out, w, ms, me); break;
            case SPLIT_REMOVED: emit(out, w, gap, ms); break;
            case SPLIT_MERGED_PREV: emit(out, w, gap, me); break;
            case SPLIT_MERGED_NEXT:
                if (pending != SIZE_MAX)
                    emit(out, w, pending, ms);
                else
                    emit(out, w, gap, ms);
                pending = ms;
                break;
            case SPLIT_CONTIGUOUS:
                emit(out, w, gap, ms);
                if (out->n && gap == ms && out->p[out->n - 1].at + out->p[out->n - 1].len == w->at + ms)
                    out->p[out->n - 1].len += me - ms;  // joins the match just before it
                else
                    emit(out, w, ms, me);
                break;
        }
        gap = me;
        pos = me;
    }
    if (s->behavior == SPLIT_MERGED_NEXT && pending != SIZE_MAX)
        emit(out, w, pending, n);
    else
        emit(out, w, gap, n);
}

// One pre-tokenizer over every word: in -> out (words of arena, which grows).
static void pre_step_apply(const mt_tokenizer *t, const pre_step *s, pcre2_match_data *md, buf *arena, const pieces *in,
                           pieces *out) {
    out->n = 0;
    for (int i = 0; i < in->n; i++) {
        piece w = in->p[i];
        if (s->kind == PRE_SPLIT) {
            split_word(s, md, arena, &w, out);
            continue;
        }
        if (s->kind == PRE_METASPACE) {
            // spaces to the replacement, then the prepended one
            // (after the replacement, a word that starts with a space or the
            // replacement starts with the replacement: nothing is prepended)
            size_t rl = strlen(s->replacement), at = arena->n;
            int starts =
                (w.len && arena->s[w.at] == ' ') || (w.len >= rl && !memcmp(arena->s + w.at, s->replacement, rl));
            int prepend = s->scheme == PREPEND_ALWAYS || (s->scheme == PREPEND_FIRST && w.first);
            if (prepend && !starts) buf_add(arena, s->replacement, rl);
            for (size_t k = 0; k < w.len; k++) {
                char c = arena->s[w.at + k];  // (the arena may move: index through it)
                if (c == ' ')
                    buf_add(arena, s->replacement, rl);
                else
                    buf_add(arena, &c, 1);
            }
            piece m = {at, arena->n - at, w.first};
            if (!s->split) {
                pieces_add(out, m.at, m.len, m.first);
                continue;
            }
            // split before each replacement (MergedWithNext)
            size_t start = 0;
            for (size_t k = 1; k + rl <= m.len; k++)
                if (!memcmp(arena->s + m.at + k, s->replacement, rl)) {
                    pieces_add(out, m.at + start, k - start, m.first && start == 0);
                    start = k;
                }
            pieces_add(out, m.at + start, m.len - start, m.first && start == 0);
            continue;
        }
        // ByteLevel: the prefix space, the GPT-2 split, then each byte as its character
        if (s->add_prefix_space && !(w.len && arena->s[w.at] == ' ')) {
            size_t at = arena->n;
            buf_add(arena, " ", 1);
            for (size_t k = 0; k < w.len; k++) {
                char c = arena->s[w.at + k];  // (buf_add may move the arena)
                buf_add(arena, &c, 1);
            }
            w.at = at, w.len += 1;
        }
        pieces words = {0};
        if (s->re) {
            pre_step gpt2 = *s;
            gpt2.kind = PRE_SPLIT, gpt2.behavior = SPLIT_ISOLATED;
            split_word(&gpt2, md, arena, &w, &words);
        } else {
            pieces_add(&words, w.at, w.len, w.first);
        }
        for (int j = 0; j < words.n; j++) {
            size_t at = arena->n;
            for (size_t k = 0; k < words.p[j].len; k++) {
                unsigned char b = (unsigned char)arena->s[words.p[j].at + k];
                buf_add(arena, t->byte_char[b], t->byte_char_len[b]);
            }
            pieces_add(out, at, arena->n - at, words.p[j].first);
        }
        free(words.p);
    }
}

// ------------------------------------------------------------ BPE

typedef struct {
    uint32_t id;
    int prev, next, len;  // len 0: merged into its left neighbour
} symbol;

typedef struct {
    int32_t rank;
    int pos;
    int32_t merged;
} merge;

// A min-heap of merges by (rank, position): tokenizers' merge_all order.
static int merge_before(const merge *a, const merge *b) {
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static void heap_push(merge *h, int *n, merge m) {
    int i = (*n)++;
    h[i] = m;
    while (i > 0) {
        int parent = (i - 1) / 2;
        if (!merge_before(&h[i], &h[parent])) break;
        merge tmp = h[i];
        h[i] = h[parent], h[parent] = tmp;
        i = parent;
    }
}

static merge heap_pop(merge *h, int *n) {
    merge top = h[0];
    h[0] = h[--(*n)];
    int i = 0;
    for (;;) {
        int l = 2 * i + 1, r = l + 1, best = i;
        if (l < *n && merge_before(&h[l], &h[best])) best = l;
        if (r < *n && merge_before(&h[r], &h[best])) best = r;
        if (best == i) break;
        merge tmp = h[i];
        h[i] = h[best], h[best] = tmp;
        i = best;
    }
    return top;
}

typedef struct {
    symbol *sym;
    merge *heap;
    int cap;
} bpe_scratch;

static void add_symbol(bpe_scratch *w, int *n, uint32_t id, int len) {
    if (*n == w->cap) {
        w->cap = w->cap ? 2 * w->cap : 64;
        w->sym = realloc(w->sym, (size_t)w->cap * sizeof *w->sym);
        w->heap = realloc(w->heap, (size_t)w->cap * 2 * sizeof *w->heap);
        MT_CHECK(w->sym && w->heap, "BPE scratch");
    }
    w->sym[*n] = (symbol){id, *n - 1, *n + 1, len};
    (*n)++;
}

// The word's characters as vocabulary ids (byte fallback or unk where a
// character is not in it), then the merges.
static void bpe_word(const mt_tokenizer *t, const char *word, size_t len, bpe_scratch *w, mt_ids *out) {
    if (t->ignore_merges) {
        int id = strmap_get(&t->vocab, word, len);
        if (id >= 0) {
            mt_ids_push(out, (uint32_t)id);
            return;
        }
    }
    int n = 0, unk_len = 0;  // unk_len > 0: an unknown run waiting to be added
    for (size_t i = 0; i < len;) {
        int cl = utf8_len((unsigned char)word[i]);
        if (i + (size_t)cl > len) cl = (int)(len - i);
        int id = strmap_get(&t->vocab, word + i, (size_t)cl);
        if (id >= 0) {
            if (unk_len) add_symbol(w, &n, (uint32_t)t->unk, unk_len), unk_len = 0;
            add_symbol(w, &n, (uint32_t)id, cl);
        } else {
            int all = t->byte_fallback;
            for (int k = 0; k < cl && all; k++) all = t->byte_ids[(unsigned char)word[i + k]] >= 0;
            if (all) {
                if (unk_len) add_symbol(w, &n, (uint32_t)t->unk, unk_len), unk_len = 0;
                for (int k = 0; k < cl; k++) add_symbol(w, &n, (uint32_t)t->byte_ids[(unsigned char)word[i + k]], 1);
            } else if (t->unk >= 0) {
                if (unk_len && !t->fuse_unk) add_symbol(w, &n, (uint32_t)t->unk, unk_len), unk_len = 0;
                unk_len += cl;
            }
        }
        i += (size_t)cl;
    }
    if (unk_len) add_symbol(w, &n, (uint32_t)t->unk, unk_len);
    if (n == 0) return;
    w->sym[n - 1].next = -1;
    int heap_n = 0;
    int32_t rank, merged;
    for (int i = 0; i + 1 < n; i++)
        if (pairmap_get(&t->merges, w->sym[i].id, w->sym[i + 1].id, &rank, &merged))
            heap_push(w->heap, &heap_n, (merge){rank, i, merged});
    while (heap_n) {
        merge top = heap_pop(w->heap, &heap_n);
        symbol *s = &w->sym[top.pos];
        if (s->len == 0 || s->next < 0) continue;
        symbol *right = &w->sym[s->next];
        // a stale entry: the pair at pos is no longer the one it merged
        if (!pairmap_get(&t->merges, s->id, right->id, &rank, &merged) || merged != top.merged) continue;
        s->id = (uint32_t)top.merged;
        s->len += right->len;
        right->len = 0;
        s->next = right->next;
        if (s->next >= 0) w->sym[s->next].prev = top.pos;
        if (s->prev >= 0 && pairmap_get(&t->merges, w->sym[s->prev].id, s->id, &rank, &merged))
            heap_push(w->heap, &heap_n, (merge){rank, s->prev, merged});
        if (s->next >= 0 && pairmap_get(&t->merges, s->id, w->sym[s->next].id, &rank, &merged))
            heap_push(w->heap, &heap_n, (merge){rank, top.pos, merged});
    }
    for (int i = 0; i < n; i++)
        if (w->sym[i].len) mt_ids_push(out, w->sym[i].id);
}

// ------------------------------------------------------------ encoding

static int is_space_at(const char *s, size_t n, size_t i, int *len) {
    utf8proc_int32_t cp;
    utf8proc_ssize_t l = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &cp);
    *len = l > 0 ? (int)l : 1;
    if (l <= 0) return 0;
    utf8proc_category_t c = utf8proc_category(cp);
    return cp == ' ' || (cp >= 9 && cp <= 13) || cp == 0x85 || c == UTF8PROC_CATEGORY_ZS || c == UTF8PROC_CATEGORY_ZL ||
           c == UTF8PROC_CATEGORY_ZP;
}

static int is_word_char_before(const char *s, size_t i) {
    if (i == 0) return 0;
    size_t j = i - 1;
    while (j > 0 && ((unsigned char)s[j] & 0xC0) == 0x80) j--;
    utf8proc_int32_t cp;
    utf8proc_iterate((const utf8proc_uint8_t *)s + j, (utf8proc_ssize_t)(i - j), &cp);
    utf8proc_category_t c = utf8proc_category(cp);
    return cp == '_' || (c >= UTF8PROC_CATEGORY_LU && c <= UTF8PROC_CATEGORY_LO) ||
           (c >= UTF8PROC_CATEGORY_ND && c <= UTF8PROC_CATEGORY_NO);
}

static int is_word_char_at(const char *s, size_t n, size_t i) {
    if (i >= n) return 0;
    utf8proc_int32_t cp;
    utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &cp);
    utf8proc_category_t c = utf8proc_category(cp);
    return cp == '_' || (c >= UTF8PROC_CATEGORY_LU && c <= UTF8PROC_CATEGORY_LO) ||
           (c >= UTF8PROC_CATEGORY_ND && c <= UTF8PROC_CATEGORY_NO);
}

// The leftmost, then longest, added token of the given normalisation that
// matches in s[from..n): its index, and its span with lstrip/rstrip's
// whitespace; -1 when none.
static int find_added(const mt_tokenizer *t, int normalized, const char *s, size_t n, size_t from, size_t *start,
                      size_t *end) {
    for (size_t i = from; i < n; i++) {
        int best = -1;
        for (int k = 0; k < t->n_added; k++) {
            const added_token *a = &t->added[k];
            if (a->normalized != normalized || a->len > n - i || (best >= 0 && a->len <= t->added[best].len)) continue;
            if (memcmp(s + i, a->content, a->len)) continue;
            if (a->single_word && (is_word_char_before(s, i) || is_word_char_at(s, n, i + a->len))) continue;
            best = k;
        }
        if (best < 0) continue;
        size_t a = i, b = i + t->added[best].len;
        int l;
        if (t->added[best].lstrip)
            while (a > from) {
                size_t j = a - 1;
                while (j > from && ((unsigned char)s[j] & 0xC0) == 0x80) j--;
                if (!is_space_at(s, n, j, &l)) break;
                a = j;
            }
        if (t->added[best].rstrip)
            while (b < n && is_space_at(s, n, b, &l)) b += (size_t)l;
        *start = a, *end = b;
        return best;
    }
    return -1;
}

typedef struct {
    buf norm, tmp, arena;
    pieces a, b;
    bpe_scratch bpe;
    pcre2_match_data *md;
} encode_scratch;

// A piece of text with no non-normalised added token in it: normalised, cut
// at the normalised added tokens, pre-tokenized, BPE'd.
static void encode_segment(const mt_tokenizer *t, const char *text, size_t n, int first, encode_scratch *x,
                           mt_ids *out) {
    x->norm.n = 0;
    buf_add(&x->norm, text, n);
    for (int i = 0; i < t->n_norms; i++) {
        normalize_step(&t->norms[i], x->norm.s, x->norm.n, &x->tmp);
        buf swap = x->norm;
        x->norm = x->tmp, x->tmp = swap;
    }
    const char *s = x->norm.s;
    size_t len = x->norm.n, pos = 0;
    while (pos <= len) {
        size_t start = len, end = len;
        int k = find_added(t, 1, s, len, pos, &start, &end);
        if (start > pos) {
            x->arena.n = 0;
            buf_add(&x->arena, s + pos, start - pos);
            x->a.n = 0;
            pieces_add(&x->a, 0, start - pos, first && pos == 0);
            for (int i = 0; i < t->n_pres; i++) {
                pre_step_apply(t, &t->pres[i], x->md, &x->arena, &x->a, &x->b);
                pieces swap = x->a;
                x->a = x->b, x->b = swap;
            }
            for (int i = 0; i < x->a.n; i++) bpe_word(t, x->arena.s + x->a.p[i].at, x->a.p[i].len, &x->bpe, out);
        }
        if (k < 0) break;
        mt_ids_push(out, t->added[k].id);
        pos = end;
        if (pos == len) break;
    }
}

void mt_tokenizer_encode(const mt_tokenizer *t, const char *text, size_t len, mt_ids *out) {
    size_t n;
    char *s = mt_utf8_sanitize(text, len, &n);
    encode_scratch x = {0};
    x.md = pcre2_match_data_create(4, NULL);
    MT_CHECK(x.md != NULL, "regex match data");
    size_t pos = 0;
    while (pos < n) {
        size_t start = n, end = n;
        int k = find_added(t, 0, s, n, pos, &start, &end);
        if (start > pos) encode_segment(t, s + pos, start - pos, pos == 0, &x, out);
        if (k < 0) break;
        mt_ids_push(out, t->added[k].id);
        pos = end;
    }
    pcre2_match_data_free(x.md);
    free(x.norm.s), free(x.tmp.s), free(x.arena.s), free(x.a.p), free(x.b.p), free(x.bpe.sym), free(x.bpe.heap);
    free(s);
}

// ------------------------------------------------------------ decoding

// Tokens as strings being decoded: each [off[i], off[i + 1]) of text.
typedef struct {
    buf text;
    size_t *off;
    int n, cap;
} token_list;

static void tl_add(token_list *l, const char *s, size_t len) {
    if (l->n + 2 > l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->off = realloc(l->off, (size_t)l->cap * sizeof *l->off);
        MT_CHECK(l->off != NULL, "decode tokens");
    }
    if (l->n == 0) l->off[0] = l->text.n;
    buf_add(&l->text, s, len);
    l->off[++l->n] = l->text.n;
}

static int parse_byte_token(const char *s, size_t len) {
    if (len != 6 || strncmp(s, "<0x", 3) || s[5] != '>') return -1;
    char hex[3] = {s[3], s[4], 0}, *end;
    long v = strtol(hex, &end, 16);
    return *end || v < 0 ? -1 : (int)v;
}

static void decode_step(const mt_tokenizer *t, const dec_step *d, const token_list *in, token_list *out) {
    out->n = 0, out->text.n = 0;
    if (d->kind == DEC_FUSE) {  // one token of them all
        size_t a = in->n ? in->off[0] : 0, b = in->n ? in->off[in->n] : 0;
        tl_add(out, in->text.s + a, b - a);
        return;
    }
    buf cur = {0};
    for (int i = 0; i < in->n; i++) {
        const char *s = in->text.s + in->off[i];
        size_t len = in->off[i + 1] - in->off[i];
        cur.n = 0;
        buf_add(&cur, "", 0);
        switch (d->kind) {
            case DEC_BYTELEVEL:
                for (size_t k = 0; k < len;) {
                    utf8proc_int32_t cp;
                    utf8proc_ssize_t l =
                        utf8proc_iterate((const utf8proc_uint8_t *)s + k, (utf8proc_ssize_t)(len - k), &cp);
                    if (l <= 0) l = 1, cp = -1;
                    if (cp >= 0 && cp < 324 && t->char_byte[cp] >= 0) {
                        unsigned char b = (unsigned char)t->char_byte[cp];
                        buf_add(&cur, &b, 1);
                    } else {
                        buf_add(&cur, s + k, (size_t)l);
                    }
                    k += (size_t)l;
                }
                tl_add(out, cur.s, cur.n);
                break;
            case DEC_REPLACE: {
                size_t pat = strlen(d->a);
                for (size_t k = 0; k < len;)
                    if (pat && k + pat <= len && !memcmp(s + k, d->a, pat))
                        buf_add(&cur, d->b, strlen(d->b)), k += pat;
                    else
                        buf_add(&cur, s + k, 1), k++;
                tl_add(out, cur.s, cur.n);
                break;
            }
            case DEC_BYTEFALLBACK: {
                // a run of <0xXX> tokens: their bytes when they are UTF-8, else U+FFFD each
                int b = parse_byte_token(s, len);
                if (b < 0) {
                    tl_add(out, s, len);
                    break;
                }
                int j = i;
                buf bytes = {0};
                while (j < in->n) {
                    int v = parse_byte_token(in->text.s + in->off[j], in->off[j + 1] - in->off[j]);
                    if (v < 0) break;
                    unsigned char c = (unsigned char)v;
                    buf_add(&bytes, &c, 1);
                    j++;
                }
                size_t clean_len;
                char *clean = mt_utf8_sanitize(bytes.s, bytes.n, &clean_len);
                if (clean_len == bytes.n && !memcmp(clean, bytes.s, bytes.n)) {
                    tl_add(out, bytes.s, bytes.n);
                } else {
                    for (int k = i; k < j; k++) tl_add(out, "\xEF\xBF\xBD", 3);
                }
                free(clean), free(bytes.s);
                i = j - 1;
                break;
            }
            case DEC_FUSE: break;  // above
            case DEC_STRIP: {
                size_t cl = strlen(d->a), a = 0, b = len;
                for (int k = 0; k < d->start && cl && a + cl <= b && !memcmp(s + a, d->a, cl); k++) a += cl;
                for (int k = 0; k < d->stop && cl && b >= a + cl && !memcmp(s + b - cl, d->a, cl); k++) b -= cl;
                tl_add(out, s + a, b - a);
                break;
            }
            case DEC_METASPACE: {
                // the replacement is a space, and in the first token (unless
                // nothing was prepended) nothing: tokenizers' decode_chain
                size_t rl = strlen(d->a);
                int drop = i == 0 && d->scheme != PREPEND_NEVER;
                for (size_t k = 0; k < len;)
                    if (rl && k + rl <= len && !memcmp(s + k, d->a, rl)) {
                        if (!drop) buf_add(&cur, " ", 1);
                        k += rl;
                    } else {
                        buf_add(&cur, s + k, 1), k++;
                    }
                tl_add(out, cur.s, cur.n);
                break;
            }
        }
    }
    free(cur.s);
}

char *mt_tokenizer_decode(const mt_tokenizer *t, const uint32_t *ids, size_t n, int skip_special, size_t *len) {
    token_list a = {0}, b = {0};
    buf_add(&a.text, "", 0);
    buf_add(&b.text, "", 0);
    for (size_t i = 0; i < n; i++) {
        const char *s = mt_tokenizer_token(t, ids[i]);
        if (!s || (skip_special && mt_tokenizer_is_special(t, ids[i]))) continue;
        tl_add(&a, s, strlen(s));
    }
    for (int i = 0; i < t->n_decs; i++) {
        decode_step(t, &t->decs[i], &a, &b);
        token_list swap = a;
        a = b, b = swap;
    }
    // no decoder: tokens joined by spaces, as tokenizers does
    buf joined = {0};
    buf_add(&joined, "", 0);
    for (int i = 0; i < a.n; i++) {
        if (i && !t->n_decs) buf_add(&joined, " ", 1);
        buf_add(&joined, a.text.s + a.off[i], a.off[i + 1] - a.off[i]);
    }
    free(a.text.s), free(a.off), free(b.text.s), free(b.off);
    char *clean = mt_utf8_sanitize(joined.s, joined.n, len);
    free(joined.s);
    return clean;
}
