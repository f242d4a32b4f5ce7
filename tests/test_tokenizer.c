// tests/test_tokenizer.c: Hugging Face tokenizer.json in C against the
// `tokenizers` library, with no Python at test time: for each fixture of
// tests/tokenizer/fixtures (tokenizers trained with released models'
// settings: Llama-3, Qwen2, GPT-2 byte-level BPE; Llama-2 and Mistral
// SentencePiece-style BPE with byte fallback) the ids of
// tests/tokenizer/sample.txt (mixed text with invalid UTF-8) and their
// decode equal what the library gave (tests/tokenizer/make_fixtures.py
// --expect wrote them). Also: added tokens, the sanitiser's U+FFFD, BOS/EOS,
// thread safety, and the errors for what memtune does not implement.
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
    variant(dir, "\"type\": \"BPE\"", "\"type\": \"WordPiece\"");
    expect_refused(dir, MT_ERR_FORMAT, "model type WordPiece");
    variant(dir, "\"normalizer\": null", "\"normalizer\": {\"type\": \"Lowercase\"}");
    expect_refused(dir, MT_ERR_FORMAT, "normalizer Lowercase");
    variant(dir, "\"behavior\": \"Isolated\"", "\"behavior\": \"Sideways\"");
    expect_refused(dir, MT_ERR_FORMAT, "behavior Sideways");
    variant(dir, "\"decoder\": {\n    \"type\": \"ByteLevel\"", "\"decoder\": {\n    \"type\": \"WordPiece\"");
    expect_refused(dir, MT_ERR_FORMAT, "decoder WordPiece");
    variant(dir, "\"merges\": [", "\"merges\": [\"Ġ zzzz-not-a-token\", ");
    expect_refused(dir, MT_ERR_FORMAT, "not in the vocabulary");
    variant(dir, "\"version\": \"1.0\"", "\"version\" : ] broken");
    expect_refused(dir, MT_ERR_FORMAT, "not valid JSON");
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
    suite_add_tcase(s, tc);
    return tu_run_suite(s, 0);
}
