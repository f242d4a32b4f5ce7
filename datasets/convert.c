// datasets/convert.c: see convert.h. The input is read in batches of items
// (a JSONL line or a text document); each batch's items are parsed,
// rendered and tokenized in parallel (OpenMP) and then written in order.
#define _POSIX_C_SOURCE 200809L
#include "datasets/convert.h"

#include <cjson/cJSON.h>
#include <omp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "datasets/chat.h"
#include "datasets/dataset.h"
#include "datasets/hf_tokenizer.h"
#include "datasets/tokenizer.h"

enum { BATCH_ITEMS = 8192, BATCH_BYTES = 32 << 20 };

void mt_convert_defaults(mt_convert_options *o) {
    *o = (mt_convert_options){.format = MT_FORMAT_TEXT, .text_field = "text", .chat_template = "auto"};
}

// ------------------------------------------------------------- the encoder

typedef struct {
    mt_tokenizer *hf;  // NULL: memtune's bytes
    int bos, eos, pad, vocab;
    char name[128];
    mt_chat_template chat;
} encoder;

static void encode(const encoder *e, const char *s, size_t n, mt_ids *out) {
    if (e->hf) {
        mt_tokenizer_encode(e->hf, s, n, out);
        return;
    }
    mt_bytes_encode(s, n, out);
}

// ------------------------------------------------------------- one example

typedef struct {
    long line;         // where it starts in the input (1-based)
    const char *text;  // the line or document
    size_t len;
} item;

typedef enum { EX_OK, EX_BAD, EX_EMPTY } ex_status;

typedef struct {
    ex_status status;
    int straddled;
    mt_ids ids;
    uint8_t *mask;
    size_t mask_cap;
    char why[256];
} example;

// A worker's scratch.
typedef struct {
    mt_render render;
    mt_ids a, b;
    mt_chat_message *msgs;
    int msg_cap;
} scratch;

static void mask_push(example *ex, int trained) {
    if (ex->ids.n > ex->mask_cap) {
        ex->mask_cap = 2 * ex->ids.n + 64;
        ex->mask = realloc(ex->mask, ex->mask_cap);
        MT_CHECK(ex->mask != NULL, "mask buffer");
    }
    ex->mask[ex->ids.n - 1] = (uint8_t)trained;
}

static void push_id(example *ex, int id, int trained) {
    if (id < 0) return;
    mt_ids_push(&ex->ids, (uint32_t)id);
    mask_push(ex, trained);
}

// Where in the ids of the whole render the text before `cut` ends: after the
// common prefix of the ids of text[0..cut) and of the whole. When they part
// before the former ends, the whole's next token holds text from both sides
// of the cut; it counts with the side where it starts, the earlier one
// (*straddle is set).
static size_t token_boundary(const encoder *e, const mt_render *r, size_t cut, const mt_ids *whole, mt_ids *tmp,
                             int *straddle) {
    tmp->n = 0;
    encode(e, r->text, cut, tmp);
    size_t c = 0;
    while (c < tmp->n && c < whole->n && tmp->ids[c] == whole->ids[c]) c++;
    if (c < tmp->n && c < whole->n) {
        *straddle = 1;
        c++;
    }
    return c;
}

// Appends the ids of a render, each masked as its segment: the ids are those
// of the whole text (as the tokenizer gives them, so identical to
// apply_chat_template's); when the segments' own ids differ from them (a
// token across a segment boundary), the boundaries are found by encoding the
// text before each.
static void tokenize_render(const encoder *e, const mt_render *r, example *ex, scratch *sc) {
    if (r->n == 0) return;
    sc->a.n = 0;
    encode(e, r->text, r->len, &sc->a);
    if (r->n == 1) {
        for (size_t t = 0; t < sc->a.n; t++) push_id(ex, (int)sc->a.ids[t], r->trained[0]);
        return;
    }
    sc->b.n = 0;
    size_t *ends = malloc((size_t)r->n * sizeof *ends);
    MT_CHECK(ends != NULL, "segment ends");
    for (int i = 0, start = 0; i < r->n; i++) {
        encode(e, r->text + start, r->ends[i] - (size_t)start, &sc->b);
        ends[i] = sc->b.n;
        start = (int)r->ends[i];
    }
    int same = sc->a.n == sc->b.n && !memcmp(sc->a.ids, sc->b.ids, sc->a.n * sizeof *sc->a.ids);
    if (!same) {
        mt_ids tmp = {0};
        size_t prev = 0;
        for (int i = 0; i + 1 < r->n; i++) {
            size_t c = token_boundary(e, r, r->ends[i], &sc->a, &tmp, &ex->straddled);
            ends[i] = c < prev ? prev : c;
            prev = ends[i];
        }
        ends[r->n - 1] = sc->a.n;
        mt_ids_free(&tmp);
    }
    for (int i = 0, t = 0; i < r->n; i++)
        for (; t < (int)ends[i]; t++) push_id(ex, (int)sc->a.ids[t], r->trained[i]);
    free(ends);
}

static const char *json_string(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

__attribute__((format(printf, 2, 3))) static int bad(example *ex, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ex->why, sizeof ex->why, fmt, ap);
    va_end(ap);
    ex->status = EX_BAD;
    return -1;
}

// The conversation of a chat line: OpenAI's messages or ShareGPT's
// conversations.
static int chat_messages(const cJSON *obj, scratch *sc, example *ex, int *n) {
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(obj, "messages");
    const char *role_key = "role", *content_key = "content";
    if (!list) {
        list = cJSON_GetObjectItemCaseSensitive(obj, "conversations");
        role_key = "from", content_key = "value";
    }
    if (!cJSON_IsArray(list)) return bad(ex, "no \"messages\" list (OpenAI) or \"conversations\" list (ShareGPT)");
    int count = cJSON_GetArraySize(list);
    if (count > sc->msg_cap) {
        sc->msg_cap = 2 * count;
        sc->msgs = realloc(sc->msgs, (size_t)sc->msg_cap * sizeof *sc->msgs);
        MT_CHECK(sc->msgs != NULL, "messages");
    }
    int i = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, list) {
        const char *role = json_string(m, role_key), *content = json_string(m, content_key);
        if (!role || !content)
            return bad(ex,
                       "a message without a string \"%s\" and \"%s\" (content given as a list of parts is "
                       "not supported)",
                       role_key, content_key);
        mt_chat_role r;
        if (!strcmp(role, "system"))
            r = MT_ROLE_SYSTEM;
        else if (!strcmp(role, "user") || !strcmp(role, "human"))
            r = MT_ROLE_USER;
        else if (!strcmp(role, "assistant") || !strcmp(role, "gpt"))
            r = MT_ROLE_ASSISTANT;
        else
            return bad(ex, "role \"%s\" is not one memtune renders (system, user or human, assistant or gpt)", role);
        sc->msgs[i++] = (mt_chat_message){r, content, strlen(content)};
    }
    *n = i;
    return 0;
}

// The widely used Alpaca prompt (Stanford Alpaca's), with and without input.
static void render_alpaca(mt_render *r, const char *instruction, const char *input, const char *output) {
    mt_render_add(r, "Below is an instruction that describes a task", 45, 0);
    if (input && input[0]) {
        const char *s =
            ", paired with an input that provides further context. Write a response that "
            "appropriately completes the request.\n\n### Instruction:\n";
        mt_render_add(r, s, strlen(s), 0);
        mt_render_add(r, instruction, strlen(instruction), 0);
        mt_render_add(r, "\n\n### Input:\n", 13, 0);
        mt_render_add(r, input, strlen(input), 0);
    } else {
        const char *s = ". Write a response that appropriately completes the request.\n\n### Instruction:\n";
        mt_render_add(r, s, strlen(s), 0);
        mt_render_add(r, instruction, strlen(instruction), 0);
    }
    mt_render_add(r, "\n\n### Response:\n", 16, 0);
    mt_render_add(r, output, strlen(output), 1);
}

// Parses, renders and tokenizes one item into ex.
static void make_example(const mt_convert_options *o, const encoder *e, const item *it, scratch *sc, example *ex) {
    ex->status = EX_OK;
    ex->straddled = 0;
    ex->ids.n = 0;
    ex->why[0] = '\0';
    mt_render *r = &sc->render;
    mt_render_reset(r);
    int chat = o->format == MT_FORMAT_CHAT, wraps = !chat;  // BOS and EOS ids around the render
    if (o->format == MT_FORMAT_TEXT) {
        mt_render_add(r, it->text, it->len, 1);
    } else {
        cJSON *obj = cJSON_ParseWithLength(it->text, it->len);
        if (!cJSON_IsObject(obj)) {
            cJSON_Delete(obj);
            bad(ex, "not a JSON object");
            return;
        }
        int failed = 0;
        if (o->format == MT_FORMAT_JSONL) {
            const char *text = json_string(obj, o->text_field);
            if (!text)
                failed = bad(ex, "no string field \"%s\" (pass --text-field NAME)", o->text_field);
            else
                mt_render_add(r, text, strlen(text), 1);
        } else if (o->format == MT_FORMAT_PROMPT_COMPLETION) {
            const char *p = json_string(obj, "prompt"), *c = json_string(obj, "completion");
            if (!p || !c)
                failed =
                    bad(ex, "needs string fields \"prompt\" and \"completion\" (message lists: use --format chat)");
            else
                mt_render_add(r, p, strlen(p), 0), mt_render_add(r, c, strlen(c), 1);
        } else if (o->format == MT_FORMAT_ALPACA) {
            const char *ins = json_string(obj, "instruction"), *in = json_string(obj, "input"),
                       *out = json_string(obj, "output");
            const cJSON *input_item = cJSON_GetObjectItemCaseSensitive(obj, "input");
            if (!ins || !out || (input_item && !cJSON_IsString(input_item) && !cJSON_IsNull(input_item)))
                failed = bad(ex,
                             "needs string fields \"instruction\" and \"output\" (and \"input\", a string, when "
                             "present)");
            else
                render_alpaca(r, ins, in, out);
        } else {
            int n = 0;
            char why[200];
            failed = chat_messages(obj, sc, ex, &n);
            if (!failed && mt_chat_render(&e->chat, sc->msgs, n, r, why, sizeof why)) failed = bad(ex, "%s", why);
        }
        cJSON_Delete(obj);
        if (failed) return;
    }
    int plain = o->format == MT_FORMAT_TEXT || o->format == MT_FORMAT_JSONL;  // every token trained
    if (wraps) push_id(ex, e->bos, o->train_on_inputs || plain);
    tokenize_render(e, r, ex, sc);
    if (wraps) push_id(ex, e->eos, 1);
    int trained = 0;
    for (size_t i = 0; i < ex->ids.n; i++) {
        if (o->train_on_inputs) ex->mask[i] = 1;
        trained |= ex->mask[i];
    }
    if (!trained) ex->status = EX_EMPTY;
}

// ------------------------------------------------------------- the input

typedef struct {
    FILE *f;
    mt_input_format format;
    char *line;
    size_t line_cap;
    long lineno;
    int eof;
    // this batch's text: items point into arena
    char *arena;
    size_t arena_len, arena_cap;
    item *items;
    int n_items;
    uint64_t bytes;
} reader;

static size_t arena_add(reader *rd, const char *s, size_t n) {
    if (rd->arena_len + n + 1 > rd->arena_cap) {
        rd->arena_cap = 2 * (rd->arena_len + n + 1);
        rd->arena = realloc(rd->arena, rd->arena_cap);
        MT_CHECK(rd->arena != NULL, "input buffer");
    }
    size_t at = rd->arena_len;
    memcpy(rd->arena + at, s, n);
    rd->arena_len += n;
    rd->arena[rd->arena_len++] = '\0';
    return at;
}

static int blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n') return 0;
    return 1;
}

// Trims blank space at both ends.
static void trim(const char **s, size_t *n) {
    while (*n && strchr(" \t\r\n", **s)) (*s)++, (*n)--;
    while (*n && strchr(" \t\r\n", (*s)[*n - 1])) (*n)--;
}

// Reads the next batch of items; 0 when the input is done.
static int read_batch(reader *rd) {
    rd->arena_len = 0;
    rd->n_items = 0;
    size_t *offsets = malloc(BATCH_ITEMS * sizeof *offsets);
    MT_CHECK(offsets != NULL, "batch");
    long doc_line = 0;
    size_t doc_start = 0;
    int in_doc = 0;
    ssize_t got;
    while (rd->n_items < BATCH_ITEMS && (rd->arena_len < BATCH_BYTES || in_doc) &&
           (got = getline(&rd->line, &rd->line_cap, rd->f)) >= 0) {
        rd->lineno++;
        rd->bytes += (uint64_t)got;
        if (rd->format != MT_FORMAT_TEXT) {
            if (blank(rd->line, (size_t)got)) continue;
            offsets[rd->n_items] = arena_add(rd, rd->line, (size_t)got);
            rd->items[rd->n_items++] = (item){rd->lineno, NULL, (size_t)got};
            continue;
        }
        // text: a blank line ends a document; lines inside one keep their newline
        if (blank(rd->line, (size_t)got)) {
            if (in_doc) {
                offsets[rd->n_items] = doc_start;
                rd->items[rd->n_items++] = (item){doc_line, NULL, rd->arena_len - doc_start};
                rd->arena[rd->arena_len++] = '\0';  // arena_add left room for it
                in_doc = 0;
            }
            continue;
        }
        if (!in_doc) doc_start = rd->arena_len, doc_line = rd->lineno, in_doc = 1;
        arena_add(rd, rd->line, (size_t)got);
        rd->arena_len--;  // no NUL between the lines of a document
    }
    if (in_doc) {
        offsets[rd->n_items] = doc_start;
        rd->items[rd->n_items++] = (item){doc_line, NULL, rd->arena_len - doc_start};
        rd->arena[rd->arena_len++] = '\0';
    }
    for (int i = 0; i < rd->n_items; i++) {
        item *it = &rd->items[i];
        it->text = rd->arena + offsets[i];
        trim(&it->text, &it->len);
    }
    free(offsets);
    return rd->n_items > 0;
}

// ------------------------------------------------------------- the output

typedef struct {
    const mt_convert_options *o;
    const encoder *e;
    mt_dataset_writer *w;
    mt_convert_stats *st;
    uint32_t *pad_ids;
    uint8_t *pad_mask;  // zeros
} emitter;

static void count_mask(emitter *em, const uint8_t *mask, size_t n) {
    for (size_t i = 0; i < n; i++) em->st->trained += mask[i], em->st->masked += !mask[i];
}

// One window of MT_PACK_PAD: tokens[0..n), padded to seq_len. Its first
// token is never a target (it has nothing before it in the window).
static void emit_window(emitter *em, const uint32_t *ids, uint8_t *mask, size_t n) {
    size_t T = (size_t)em->o->seq_len;
    mask[0] = 0;
    mt_dataset_writer_add(em->w, ids, mask, n);
    count_mask(em, mask, n);
    mt_dataset_writer_add(em->w, em->pad_ids, em->pad_mask, T - n);
    em->st->padded += T - n;
    mt_dataset_writer_end_doc(em->w);
}

static void emit(emitter *em, example *ex) {
    size_t n = ex->ids.n, T = (size_t)em->o->seq_len;
    if (em->o->pack == MT_PACK_CONCAT) {
        mt_dataset_writer_add(em->w, ex->ids.ids, ex->mask, n);
        count_mask(em, ex->mask, n);
        mt_dataset_writer_end_doc(em->w);
        em->st->kept++;
        return;
    }
    if (n > T) {
        if (em->o->long_mode == MT_LONG_DROP) {
            em->st->dropped_long++;
            return;
        }
        if (em->o->long_mode == MT_LONG_TRUNCATE) {
            em->st->truncated++;
            n = T;
        } else {
            // windows overlap by one token, so every token after the first is a target once
            em->st->split++;
            for (size_t s = 0; s + 1 < n; s += T - 1) {
                size_t k = n - s < T ? n - s : T;
                uint8_t keep = ex->mask[s];
                emit_window(em, ex->ids.ids + s, ex->mask + s, k);
                ex->mask[s] = keep;
            }
            em->st->kept++;
            return;
        }
    }
    emit_window(em, ex->ids.ids, ex->mask, n);
    em->st->kept++;
}

// ------------------------------------------------------------- the run

static mt_err open_encoder(const mt_convert_options *o, encoder *e, mt_convert_stats *st) {
    memset(e, 0, sizeof *e);
    if (!o->tokenizer) {
        if (o->format == MT_FORMAT_CHAT)
            return mt_errorf(MT_ERR_USAGE,
                             "--format chat needs the model's tokenizer and chat template: pass --tokenizer MODEL_DIR");
        e->bos = MT_TOKEN_BOS, e->eos = MT_TOKEN_EOS, e->pad = MT_TOKEN_EOS, e->vocab = MT_BYTE_VOCAB;
        snprintf(e->name, sizeof e->name, "%s", MT_BYTE_TOKENIZER_NAME);
        return MT_OK;
    }
    mt_err err = mt_tokenizer_load(&e->hf, o->tokenizer);
    if (err) return err;
    e->bos = mt_tokenizer_bos(e->hf), e->eos = mt_tokenizer_eos(e->hf), e->pad = mt_tokenizer_pad(e->hf);
    e->vocab = mt_tokenizer_vocab_size(e->hf);
    if (e->pad < 0) e->pad = e->eos;
    snprintf(e->name, sizeof e->name, "%s (%s)", mt_tokenizer_describe(e->hf), o->tokenizer);
    if (e->eos < 0 && o->format != MT_FORMAT_CHAT)
        return mt_errorf(MT_ERR_USAGE,
                         "%s: tokenizer_config.json names no eos_token, and every example ends with one (a model "
                         "that never sees it never stops); add eos_token to tokenizer_config.json",
                         o->tokenizer);
    if (o->format == MT_FORMAT_CHAT) {
        const char *bos = e->bos >= 0 ? mt_tokenizer_token(e->hf, (uint32_t)e->bos) : NULL;
        const char *eos = e->eos >= 0 ? mt_tokenizer_token(e->hf, (uint32_t)e->eos) : NULL;
        err = mt_chat_template_pick(&e->chat, o->chat_template, mt_tokenizer_chat_template(e->hf), bos, eos,
                                    o->tokenizer);
        if (err) return err;
        snprintf(st->template_name, sizeof st->template_name, "%s", e->chat.name);
        if (e->pad < 0) e->pad = 0;
    }
    return MT_OK;
}

static mt_err check_options(const mt_convert_options *o) {
    if (!o->input || !o->output) return mt_errorf(MT_ERR_USAGE, "tokenize needs --input FILE and --output DATA.h5");
    struct stat a, b;
    if (stat(o->input, &a) != 0) return mt_errorf(MT_ERR_IO, "%s: cannot open the input file", o->input);
    if (S_ISDIR(a.st_mode)) return mt_errorf(MT_ERR_IO, "%s is a folder; --input takes a file", o->input);
    if (stat(o->output, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino)
        return mt_errorf(MT_ERR_USAGE, "--output %s is the input file; name another", o->output);
    if (o->pack == MT_PACK_PAD && o->seq_len < 2)
        return mt_errorf(MT_ERR_USAGE, "--pack pad needs --seq-len N (the train.seq_len you will train with), N >= 2");
    return MT_OK;
}

static void progress(const mt_convert_stats *st, uint64_t total_bytes, double start, int final) {
    double t = mt_now() - start;
    double frac = total_bytes ? (double)st->bytes_read / (double)total_bytes : 0.0;
    char eta[32] = "";
    if (!final && frac > 0.0 && frac < 1.0) snprintf(eta, sizeof eta, " | ETA %.0fs", t / frac - t);
    fprintf(stderr, "%stokenize: %.1f of %.1f MB (%.0f%%) | %llu examples | %llu tokens | %.2fM tokens/s%s%s",
            isatty(2) ? "\r" : "", (double)st->bytes_read / 1e6, (double)total_bytes / 1e6, 100.0 * frac,
            (unsigned long long)st->examples, (unsigned long long)st->tokens, t > 0 ? st->tokens / t / 1e6 : 0.0, eta,
            isatty(2) && !final ? "   " : "\n");
}

// Tokenizes the batch in parallel, then writes it in order. Returns the
// first bad item's error unless skipping.
static mt_err run_batch(const mt_convert_options *o, const encoder *e, reader *rd, example *exs, scratch *scs,
                        emitter *em) {
    int n = rd->n_items;
#pragma omp parallel for schedule(dynamic, 8)
    for (int i = 0; i < n; i++) make_example(o, e, &rd->items[i], &scs[omp_get_thread_num()], &exs[i]);
    for (int i = 0; i < n; i++) {
        example *ex = &exs[i];
        em->st->examples++;
        if (ex->status == EX_BAD) {
            if (!o->skip_bad_lines)
                return mt_errorf(MT_ERR_DATASET,
                                 "%s:%ld: %s. Fix the line, or pass --on-bad-line skip to skip such lines (they are "
                                 "counted)",
                                 o->input, rd->items[i].line, ex->why);
            em->st->bad_lines++;
            continue;
        }
        if (ex->status == EX_EMPTY) {
            em->st->dropped_empty++;
            continue;
        }
        em->st->straddled += (uint64_t)ex->straddled;
        emit(em, ex);
    }
    em->st->tokens = mt_dataset_writer_tokens(em->w);
    return MT_OK;
}

mt_err mt_convert(const mt_convert_options *o, mt_convert_stats *stats) {
    mt_convert_stats st = {0};
    double start = mt_now();
    mt_err err = check_options(o);
    encoder e;
    if (!err)
        err = open_encoder(o, &e, &st);
    else
        memset(&e, 0, sizeof e);
    FILE *f = err ? NULL : fopen(o->input, "rb");
    if (!err && !f) err = mt_errorf(MT_ERR_IO, "%s: cannot open the input file", o->input);
    int has_mask = o->format != MT_FORMAT_TEXT && o->format != MT_FORMAT_JSONL;
    has_mask |= o->pack == MT_PACK_PAD;
    mt_dataset_writer *w = NULL;
    if (!err) err = mt_dataset_writer_open(&w, o->output, has_mask);
    if (err) {
        if (f) fclose(f);
        mt_tokenizer_free(e.hf);
        return err;
    }
    snprintf(st.tokenizer, sizeof st.tokenizer, "%s", e.name);
    struct stat sb;
    uint64_t total_bytes = fstat(fileno(f), &sb) == 0 ? (uint64_t)sb.st_size : 0;
    int threads = o->threads > 0 ? o->threads : omp_get_max_threads();
    omp_set_num_threads(threads);
    reader rd = {.f = f, .format = o->format};
    rd.items = malloc(BATCH_ITEMS * sizeof *rd.items);
    example *exs = calloc(BATCH_ITEMS, sizeof *exs);
    scratch *scs = calloc((size_t)threads, sizeof *scs);
    size_t T = o->pack == MT_PACK_PAD ? (size_t)o->seq_len : 1;
    emitter em = {o, &e, w, &st, malloc(T * sizeof(uint32_t)), calloc(T, 1)};
    MT_CHECK(rd.items && exs && scs && em.pad_ids && em.pad_mask, "converter buffers");
    for (size_t i = 0; i < T; i++) em.pad_ids[i] = (uint32_t)e.pad;
    double last = mt_now();
    while (!err && read_batch(&rd)) {
        st.bytes_read = rd.bytes;
        err = run_batch(o, &e, &rd, exs, scs, &em);
        if (o->progress && mt_now() - last > (isatty(2) ? 1.0 : 30.0)) {
            progress(&st, total_bytes, start, 0);
            last = mt_now();
        }
    }
    if (!err && ferror(f)) err = mt_errorf(MT_ERR_IO, "%s: read error", o->input);
    if (!err && o->pack == MT_PACK_PAD && st.kept) {  // the last window's T+1-th token
        mt_dataset_writer_add(w, em.pad_ids, em.pad_mask, 1);
        mt_dataset_writer_end_doc(w);
        st.padded++;
        st.tokens = mt_dataset_writer_tokens(w);
    }
    if (!err && st.kept == 0)
        err = mt_errorf(MT_ERR_DATASET,
                        "%s: nothing to write: %llu examples read, %llu with nothing to train, %llu "
                        "too long, %llu bad lines",
                        o->input, (unsigned long long)st.examples, (unsigned long long)st.dropped_empty,
                        (unsigned long long)st.dropped_long, (unsigned long long)st.bad_lines);
    mt_err close_err = mt_dataset_writer_close(w, !err, e.vocab, e.name, o->pack == MT_PACK_PAD ? o->seq_len : 0);
    if (!err) err = close_err;
    st.seconds = mt_now() - start;
    if (!err && o->progress && isatty(2) && st.seconds > 1.0) progress(&st, total_bytes, start, 1);
    fclose(f);
    for (int i = 0; i < BATCH_ITEMS; i++) mt_ids_free(&exs[i].ids), free(exs[i].mask);
    for (int i = 0; i < threads; i++) {
        mt_render_free(&scs[i].render);
        mt_ids_free(&scs[i].a), mt_ids_free(&scs[i].b);
        free(scs[i].msgs);
    }
    free(exs), free(scs), free(rd.items), free(rd.arena), free(rd.line);
    free(em.pad_ids), free(em.pad_mask);
    mt_tokenizer_free(e.hf);
    if (!err && stats) *stats = st;
    return err;
}
