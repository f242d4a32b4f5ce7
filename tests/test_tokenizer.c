// tests/test_tokenizer.c: Hugging Face tokenizer.json in C against the
// `tokenizers` library, with no Python at test time: for each fixture of
// tests/tokenizer/fixtures (tokenizers trained with released models'
// settings: Llama-3, Qwen2, GPT-2 byte-level BPE; Llama-2 and Mistral
// SentencePiece-style BPE with byte fallback) the ids of
// tests/tokenizer/sample.txt (mixed text with invalid UTF-8) and their
// decode equal what the library gave (tests/tokenizer/make_fixtures.py
// --expect wrote them). Also: added tokens, the sanitiser's U+FFFD, BOS/EOS,
// thread safety, and the errors for what memtune does not implement.
// Chat: `memtune tokenize --format chat` of tests/tokenizer/chat.jsonl gives
// the ids of transformers' apply_chat_template with the released models'
// templates, and masks that train exactly the answers and their end-of-turn
// tokens (make_fixtures.py --chat wrote both).
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <hdf5.h>

#include "datasets/chat.h"
#include "datasets/convert.h"
#include "datasets/hf_tokenizer.h"
#include "kernels/common.h"
#include "testutil.h"

static const char *const kFixtures[] = {"llama3", "qwen2", "gpt2", "llama2", "mistral"};

static char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot read %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = malloc((size_t)n + 1);
    ck_assert_uint_eq(fread(s, 1, (size_t)n, f), (size_t)n);
    s[n] = '\0';
    fclose(f);
    *len = (size_t)n;
    return s;
}

static mt_tokenizer *fixture(const char *name) {
    char path[256];
    snprintf(path, sizeof path, "tests/tokenizer/fixtures/%s", name);
    mt_tokenizer *t = NULL;
    ck_assert_msg(mt_tokenizer_load(&t, path) == MT_OK, "%s: %s", name, mt_last_error());
    return t;
}

START_TEST(ids_and_decode_equal_the_library) {
    const char *name = kFixtures[_i];
    mt_tokenizer *t = fixture(name);
    size_t len, n_expected = 0;
    char *sample = slurp("tests/tokenizer/sample.txt", &len);
    char path[256];
    snprintf(path, sizeof path, "tests/tokenizer/fixtures/%s/expected.ids", name);
    size_t elen;
    char *expected = slurp(path, &elen);
    mt_ids want = {0}, got = {0};
    for (char *p = expected, *end; *p && *p != '\n'; p = end) {
        mt_ids_push(&want, (uint32_t)strtoul(p, &end, 10));
        if (end == p) break;
        n_expected++;
    }
    mt_tokenizer_encode(t, sample, len, &got);
    size_t k = 0;
    while (k < got.n && k < want.n && got.ids[k] == want.ids[k]) k++;
    ck_assert_msg(got.n == want.n && k == want.n, "%s: %zu ids, the library's %zu; first difference at %zu (%u vs %u)",
                  name, got.n, want.n, k, k < got.n ? got.ids[k] : 0, k < want.n ? want.ids[k] : 0);
    size_t dlen, wlen;
    char *text = mt_tokenizer_decode(t, got.ids, got.n, 0, &dlen);
    snprintf(path, sizeof path, "tests/tokenizer/fixtures/%s/expected.decoded", name);
    char *want_text = slurp(path, &wlen);
    ck_assert_msg(dlen == wlen && !memcmp(text, want_text, wlen), "%s: the decode differs from the library's", name);
    free(text), free(want_text), free(sample), free(expected);
    mt_ids_free(&want), mt_ids_free(&got);
    mt_tokenizer_free(t);
}
END_TEST

START_TEST(invalid_utf8_reads_as_replacement_characters) {
    // one U+FFFD per maximal invalid subsequence, as Python's "replace"
    struct {
        const char *in;
        const char *out;
    } cases[] = {
        {"a\x80"
         "b",
         "a\xEF\xBF\xBD"
         "b"},
        {"\xC3", "\xEF\xBF\xBD"},
        {"\xE2\x82", "\xEF\xBF\xBD"},  // a truncated 3-byte sequence: one
        {"\xE2\x82x", "\xEF\xBF\xBDx"},
        {"\xC0\xAF", "\xEF\xBF\xBD\xEF\xBF\xBD"},                  // overlong: two
        {"\xED\xA0\x80", "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"},  // a surrogate: three
        {"\xF0\x9F\x98", "\xEF\xBF\xBD"},
        {"\xF0\x9F\x98\x80", "\xF0\x9F\x98\x80"},  // valid
        {"\xF5\x80", "\xEF\xBF\xBD\xEF\xBF\xBD"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        size_t n;
        char *s = mt_utf8_sanitize(cases[i].in, strlen(cases[i].in), &n);
        ck_assert_msg(n == strlen(cases[i].out) && !memcmp(s, cases[i].out, n), "case %zu", i);
        free(s);
    }
}
END_TEST

START_TEST(added_tokens_bos_eos_and_threads) {
    mt_tokenizer *t = fixture("qwen2");
    int start = mt_tokenizer_token_id(t, "<|im_start|>"), end = mt_tokenizer_token_id(t, "<|im_end|>");
    ck_assert_int_ge(start, 0);
    ck_assert_int_eq(mt_tokenizer_eos(t), mt_tokenizer_token_id(t, "<|endoftext|>"));
    ck_assert_int_eq(mt_tokenizer_bos(t), -1);  // Qwen2 has none
    ck_assert(mt_tokenizer_is_special(t, (uint32_t)start));
    const char *chat = "<|im_start|>user\nHi<|im_end|>";
    mt_ids ids = {0};
    mt_tokenizer_encode(t, chat, strlen(chat), &ids);
    ck_assert_uint_ge(ids.n, 4);
    ck_assert_uint_eq(ids.ids[0], (uint32_t)start);
    ck_assert_uint_eq(ids.ids[ids.n - 1], (uint32_t)end);
    size_t len;
    char *all = mt_tokenizer_decode(t, ids.ids, ids.n, 0, &len),
         *plain = mt_tokenizer_decode(t, ids.ids, ids.n, 1, &len);
    ck_assert_str_eq(all, chat);
    ck_assert_str_eq(plain, "user\nHi");
    free(all), free(plain);
    // the same ids from several threads at once
    size_t n;
    char *sample = slurp("tests/tokenizer/sample.txt", &n);
    mt_ids one = {0};
    mt_tokenizer_encode(t, sample, n, &one);
    int differ = 0;
#pragma omp parallel for reduction(+ : differ)
    for (int k = 0; k < 8; k++) {
        mt_ids again = {0};
        mt_tokenizer_encode(t, sample, n, &again);
        differ += again.n != one.n || memcmp(again.ids, one.ids, one.n * sizeof *one.ids);
        mt_ids_free(&again);
    }
    ck_assert_int_eq(differ, 0);
    mt_ids_free(&one), mt_ids_free(&ids);
    free(sample);
    mt_tokenizer_free(t);
    // Llama-2's <s> and </s> from tokenizer_config.json
    t = fixture("llama2");
    ck_assert_int_eq(mt_tokenizer_bos(t), mt_tokenizer_token_id(t, "<s>"));
    ck_assert_int_eq(mt_tokenizer_eos(t), mt_tokenizer_token_id(t, "</s>"));
    mt_tokenizer_free(t);
}
END_TEST

// Writes dir/tokenizer.json: the llama3 fixture with `from` replaced by `to`.
static void variant(const char *dir, const char *from, const char *to) {
    size_t len;
    char *s = slurp("tests/tokenizer/fixtures/llama3/tokenizer.json", &len), *at = strstr(s, from);
    ck_assert_msg(at != NULL, "%s not in the fixture", from);
    char path[512];
    snprintf(path, sizeof path, "mkdir -p %s", dir);
    ck_assert_int_eq(system(path), 0);
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    FILE *f = fopen(path, "wb");
    fwrite(s, 1, (size_t)(at - s), f);
    fputs(to, f);
    fputs(at + strlen(from), f);
    fclose(f);
    free(s);
}

static void expect_refused(const char *dir, mt_err code, const char *words) {
    mt_tokenizer *t = NULL;
    ck_assert_int_eq(mt_tokenizer_load(&t, dir), code);
    ck_assert_ptr_null(t);
    ck_assert_msg(strstr(mt_last_error(), words) != NULL, "'%s' does not say '%s'", mt_last_error(), words);
}

START_TEST(what_memtune_does_not_implement_is_refused) {
    char dir[256];
    tu_tempdir(dir, sizeof dir);
    expect_refused("/nonexistent-tokenizer", MT_ERR_IO, "no such tokenizer");
    static const char *const cases[][3] = {
        // in the llama3 fixture: from, to, what the error says
        {"\"type\": \"BPE\"", "\"type\": \"WordPiece\"", "model type WordPiece"},
        {"\"normalizer\": null", "\"normalizer\": {\"type\": \"Lowercase\"}", "normalizer Lowercase"},
        {"\"behavior\": \"Isolated\"", "\"behavior\": \"Sideways\"", "behavior Sideways"},
        {"\"decoder\": {\n    \"type\": \"ByteLevel\"", "\"decoder\": {\n    \"type\": \"WordPiece\"",
         "decoder WordPiece"},
        {"\"merges\": [", "\"merges\": [\"Ġ zzzz-not-a-token\", ", "not in the vocabulary"},
        {"\"<|eot_id|>\"", "\"\xbd<|eot_id|>\"", "not valid UTF-8"},
        {"\"version\": \"1.0\"", "\"version\" : ] broken", "not valid JSON"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        variant(dir, cases[i][0], cases[i][1]);
        expect_refused(dir, MT_ERR_FORMAT, cases[i][2]);
    }
}
END_TEST

static void *read_vector(hid_t f, const char *name, hid_t type, size_t size, uint64_t *n) {
    hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
    ck_assert_int_ge(d, 0);
    hid_t sp = H5Dget_space(d);
    hsize_t dims[1];
    H5Sget_simple_extent_dims(sp, dims, NULL);
    *n = dims[0];
    void *buf = malloc(dims[0] * size + 1);
    ck_assert_int_ge(H5Dread(d, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf), 0);
    H5Sclose(sp);
    H5Dclose(d);
    return buf;
}

static const struct {
    const char *fixture, *choice;
} kChatCases[] = {{"llama3", "auto"}, {"qwen2", "auto"},   {"qwen2", "chatml"},
                  {"llama2", "auto"}, {"mistral", "auto"}, {"mistral", "mistral-v0.1"}};

START_TEST(chat_renders_equal_transformers) {
    const char *name = kChatCases[_i].fixture, *choice = kChatCases[_i].choice;
    char dir[256], out[300], tok_dir[256], expect_path[300];
    tu_tempdir(dir, sizeof dir);
    snprintf(out, sizeof out, "%s/chat.h5", dir);
    snprintf(tok_dir, sizeof tok_dir, "tests/tokenizer/fixtures/%s", name);
    snprintf(expect_path, sizeof expect_path, "%s/chat-%s.expected", tok_dir, choice);
    mt_convert_options o;
    mt_convert_defaults(&o);
    o.input = "tests/tokenizer/chat.jsonl", o.output = out;
    o.format = MT_FORMAT_CHAT, o.tokenizer = tok_dir, o.chat_template = choice;
    o.pack = MT_PACK_CONCAT, o.skip_bad_lines = 1;
    mt_convert_stats st;
    ck_assert_msg(mt_convert(&o, &st) == MT_OK, "%s", mt_last_error());
    ck_assert_str_eq(st.template_name, strcmp(choice, "auto")     ? choice
                                       : !strcmp(name, "qwen2")   ? "chatml"
                                       : !strcmp(name, "mistral") ? "mistral"
                                                                  : name);
    hid_t f = H5Fopen(out, H5F_ACC_RDONLY, H5P_DEFAULT);
    uint64_t n_tok, n_mask, n_off;
    uint32_t *tok = read_vector(f, "tokens", H5T_NATIVE_UINT32, 4, &n_tok);
    uint8_t *mask = read_vector(f, "loss_mask", H5T_NATIVE_UINT8, 1, &n_mask);
    uint64_t *off = read_vector(f, "doc_offsets", H5T_NATIVE_UINT64, 8, &n_off);
    H5Fclose(f);
    ck_assert_uint_eq(n_tok, n_mask);
    size_t len;
    char *expect = slurp(expect_path, &len), *save = NULL;
    uint64_t doc = 0, refused = 0, conv = 0;
    for (char *line = strtok_r(expect, "\n", &save); line; line = strtok_r(NULL, "\n", &save), conv++) {
        if (!strcmp(line, "refused")) {
            refused++;
            continue;
        }
        ck_assert_uint_lt(doc + 1, n_off);
        char *tab = strchr(line, '\t');
        ck_assert_ptr_nonnull(tab);
        *tab = '\0';
        uint64_t i = off[doc], end = off[doc + 1];
        char *p = line;
        for (; *p; i++) {
            char *next;
            unsigned long id = strtoul(p, &next, 10);
            ck_assert_msg(i < end, "%s %s conversation %llu: memtune has fewer ids", name, choice,
                          (unsigned long long)conv + 1);
            ck_assert_msg(tok[i] == id, "%s %s conversation %llu, id %llu: memtune %u, transformers %lu", name, choice,
                          (unsigned long long)conv + 1, (unsigned long long)(i - off[doc]), tok[i], id);
            ck_assert_msg(mask[i] == (uint8_t)(tab[1 + i - off[doc]] - '0'),
                          "%s %s conversation %llu, token %llu (id %u): mask %d, expected %c", name, choice,
                          (unsigned long long)conv + 1, (unsigned long long)(i - off[doc]), tok[i], mask[i],
                          tab[1 + i - off[doc]]);
            p = next + (*next == ' ');
        }
        ck_assert_uint_eq(i, end);
        doc++;
    }
    ck_assert_uint_eq(doc, n_off - 1);
    ck_assert_uint_eq(st.bad_lines, refused);
    // the fixtures' vocabularies (trained without SentencePiece's whitespace
    // split) have tokens such as "]▁" across a prompt/answer boundary
    if (st.straddled) printf("%s %s: %llu boundaries inside a token\n", name, choice, (unsigned long long)st.straddled);
    free(expect), free(tok), free(mask), free(off);
}
END_TEST

static void expect_template(const char *jinja, const char *choice, mt_err code, const char *words) {
    mt_chat_template t;
    mt_err err = mt_chat_template_pick(&t, choice, jinja, "<s>", "</s>", "MODEL");
    ck_assert_int_eq(err, code);
    if (code == MT_OK)
        ck_assert_str_eq(t.name, words);
    else
        ck_assert_msg(strstr(mt_last_error(), words) != NULL, "'%s' does not say '%s'", mt_last_error(), words);
}

START_TEST(chat_templates_recognised_or_refused) {
    static const char *const names[] = {"llama3", "chatml", "llama2", "mistral"};
    static const char *const fixtures[] = {"llama3", "qwen2", "llama2", "mistral"};
    for (int i = 0; i < 4; i++) {
        mt_tokenizer *t = fixture(fixtures[i]);
        expect_template(mt_tokenizer_chat_template(t), "auto", MT_OK, names[i]);
        mt_tokenizer_free(t);
    }
    mt_tokenizer *t = fixture("qwen2");
    mt_chat_template ct;
    ck_assert_int_eq(mt_chat_template_pick(&ct, "auto", mt_tokenizer_chat_template(t), NULL, "<|endoftext|>", "q"),
                     MT_OK);
    ck_assert_str_eq(ct.default_system, "You are a helpful assistant.");
    mt_tokenizer_free(t);
    t = fixture("gpt2");  // no chat template: the user must name one
    ck_assert_ptr_null(mt_tokenizer_chat_template(t));
    expect_template(NULL, "auto", MT_ERR_USAGE, "--chat-template NAME");
    mt_tokenizer_free(t);
    expect_template("{{ messages }}<|start_header_id|>...<|eot_id|> Cutting Knowledge Date", "auto", MT_ERR_USAGE,
                    "Llama-3.1");
    expect_template("<|im_start|>{{ '<think>' }}<|im_end|>", "auto", MT_ERR_USAGE, "reasoning");
    expect_template("[INST] [AVAILABLE_TOOLS]", "auto", MT_ERR_USAGE, "v0.3");
    expect_template("{% for m in messages %}<start_of_turn>{% endfor %}", "auto", MT_ERR_USAGE, "--chat-template");
    expect_template("{% for m in messages %}<start_of_turn>{% endfor %}", "llama2", MT_OK, "llama2");
    expect_template(NULL, "vicuna", MT_ERR_USAGE, "expected auto or one of");
    ck_assert_int_eq(mt_chat_template_pick(&ct, "llama3", NULL, NULL, "</s>", "m"), MT_ERR_USAGE);
    ck_assert_ptr_nonnull(strstr(mt_last_error(), "BOS"));
    // a conversation the template cannot render is an error naming why
    mt_chat_message m[2] = {{MT_ROLE_ASSISTANT, "hi", 2}, {MT_ROLE_USER, "yo", 2}};
    mt_render r = {0};
    char why[200];
    ck_assert_int_eq(mt_chat_template_pick(&ct, "mistral", NULL, "<s>", "</s>", "m"), MT_OK);
    ck_assert_int_ne(mt_chat_render(&ct, m, 2, &r, why, sizeof why), 0);
    ck_assert_ptr_nonnull(strstr(why, "user first"));
    mt_render_free(&r);
}
END_TEST

int main(void) {
    Suite *s = suite_create("tokenizer");
    TCase *tc = tcase_create("tokenizer");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, ids_and_decode_equal_the_library, 0, 5);
    tcase_add_test(tc, invalid_utf8_reads_as_replacement_characters);
    tcase_add_test(tc, added_tokens_bos_eos_and_threads);
    tcase_add_test(tc, what_memtune_does_not_implement_is_refused);
    tcase_add_loop_test(tc, chat_renders_equal_transformers, 0, 6);
    tcase_add_test(tc, chat_templates_recognised_or_refused);
    suite_add_tcase(s, tc);
    return tu_run_suite(s, 0);
}
