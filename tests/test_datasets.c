// tests/test_datasets.c: the HDF5 dataset format, its schema checks (as error
// values and messages), the loader (windows, masks, shuffling, shards, eval
// split, cursor) and the converter (formats, loss masks, packing, bad lines,
// threads).
#include <check.h>
#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "datasets/convert.h"
#include "datasets/dataset.h"
#include "datasets/tokenizer.h"
#include "kernels/rng.h"
#include "testutil.h"

static char dir[256];

static void make_dataset(const char *path, uint64_t n, int vocab, int with_mask) {
    uint32_t *tok = malloc(n * 4);
    uint8_t *mask = malloc(n);
    for (uint64_t i = 0; i < n; i++) tok[i] = (uint32_t)(i % (uint64_t)vocab), mask[i] = (i % 7) != 3;
    uint64_t offsets[3] = {0, n / 2, n};
    ck_assert_int_eq(mt_dataset_write(path, tok, n, offsets, 2, with_mask ? mask : NULL, vocab, "test"), MT_OK);
    free(tok);
    free(mask);
}

START_TEST(loader_windows_targets_and_mask) {
    char path[300];
    snprintf(path, sizeof path, "%s/a.h5", dir);
    make_dataset(path, 1001, 50, 1);
    mt_dataset *ds;
    ck_assert_int_eq(mt_dataset_open(&ds, path, 0), MT_OK);
    ck_assert_uint_eq(mt_dataset_num_tokens(ds), 1001);
    ck_assert_uint_eq(mt_dataset_num_docs(ds), 2);
    mt_loader_config cfg = {.B = 2, .T = 10, .seed = 1, .rank = 0, .world = 1, .eval_fraction = 0.0};
    mt_loader *l;
    ck_assert_int_eq(mt_loader_init(&l, ds, &cfg, MT_SPLIT_TRAIN), MT_OK);
    ck_assert_uint_eq(mt_loader_batches_per_epoch(l), 50);  // 100 windows / 2
    int32_t in[20], tg[20];
    int valid, expect = 0;
    ck_assert_int_eq(mt_loader_next(l, in, tg, &valid), MT_OK);
    for (int b = 0; b < 2; b++)
        for (int t = 0; t < 10; t++) {
            int32_t next = (in[b * 10 + t] + 1) % 50;
            if (tg[b * 10 + t] >= 0) {
                ck_assert_int_eq(tg[b * 10 + t], next);
                expect++;
            }
        }
    ck_assert_int_eq(valid, expect);
    ck_assert_int_lt(valid, 20);  // the mask removed some targets
    mt_loader_free(l);
    mt_dataset_free(ds);
}
END_TEST

// data.document_mask: token i == i names its place, documents of random
// lengths (some empty, some longer than a window). Every window's positions
// restart at each document's start (and at the row's), and no target is the
// first token of the next document; the rest are the plain loader's.
START_TEST(loader_documents_positions_and_boundaries) {
    char path[300];
    snprintf(path, sizeof path, "%s/docs.h5", dir);
    enum { N = 3001, T = 16 };
    uint32_t *tok = malloc(N * 4);
    uint64_t offsets[N + 1];
    uint8_t *starts = calloc(N + 1, 1);
    for (uint32_t i = 0; i < N; i++) tok[i] = i;
    uint64_t docs = 0, at = 0;
    offsets[0] = 0;
    while (at < N) {
        uint64_t len = mt_rng_bits(3, docs) % 40;  // 0 (empty) .. 39, some across windows
        at = at + len < N ? at + len : N;
        offsets[++docs] = at;
        starts[at] = 1;
    }
    ck_assert_int_eq(mt_dataset_write(path, tok, N, offsets, docs, NULL, N, "test"), MT_OK);
    mt_dataset *ds;
    ck_assert_int_eq(mt_dataset_open(&ds, path, 0), MT_OK);
    mt_loader_config plain = {.B = 3, .T = T, .seed = 5, .world = 1}, with = plain;
    with.documents = 1;
    mt_loader *a, *b;
    ck_assert_int_eq(mt_loader_init(&a, ds, &plain, MT_SPLIT_TRAIN), MT_OK);
    ck_assert_int_eq(mt_loader_init(&b, ds, &with, MT_SPLIT_TRAIN), MT_OK);
    ck_assert_ptr_null(mt_loader_positions(a));
    int32_t in_a[3 * T], tg_a[3 * T], in_b[3 * T], tg_b[3 * T];
    int restarts = 0, cut = 0;
    for (int batch = 0; batch < 40; batch++) {
        int va, vb;
        ck_assert_int_eq(mt_loader_next(a, in_a, tg_a, &va), MT_OK);
        ck_assert_int_eq(mt_loader_next(b, in_b, tg_b, &vb), MT_OK);
        ck_assert_mem_eq(in_a, in_b, sizeof in_a);
        const int32_t *pos = mt_loader_positions(b);
        int counted = 0;
        for (int r = 0; r < 3; r++)
            for (int t = 0; t < T; t++) {
                int i = r * T + t;
                uint32_t id = (uint32_t)in_b[i];
                // the token's place in its document, from the window's start at most
                int expect = 0;
                while (expect < t && !starts[id - (uint32_t)expect]) expect++;
                ck_assert_int_eq(pos[i], expect);
                restarts += t > 0 && pos[i] == 0;
                int crosses = starts[id + 1];
                ck_assert_int_eq(tg_b[i], crosses ? -1 : tg_a[i]);
                cut += crosses;
                counted += tg_b[i] >= 0;
            }
        ck_assert_int_eq(vb, counted);
    }
    ck_assert_int_gt(restarts, 20);
    ck_assert_int_gt(cut, 20);
    mt_loader_free(a);
    mt_loader_free(b);
    mt_dataset_free(ds);
    free(tok), free(starts);
}
END_TEST

START_TEST(loader_shuffle_cursor_shards_and_eval) {
    char path[300];
    snprintf(path, sizeof path, "%s/b.h5", dir);
    make_dataset(path, 4001, 4001, 0);  // token i == i: a window's first input names it
    mt_dataset *ds;
    ck_assert_int_eq(mt_dataset_open(&ds, path, 0), MT_OK);
    mt_loader_config cfg = {.B = 4, .T = 10, .seed = 7, .rank = 0, .world = 2, .eval_fraction = 0.1};
    mt_loader *r0, *r1, *again, *other_seed, *eval;
    ck_assert_int_eq(mt_loader_init(&r0, ds, &cfg, MT_SPLIT_TRAIN), MT_OK);
    ck_assert_int_eq(mt_loader_init(&again, ds, &cfg, MT_SPLIT_TRAIN), MT_OK);
    cfg.rank = 1;
    ck_assert_int_eq(mt_loader_init(&r1, ds, &cfg, MT_SPLIT_TRAIN), MT_OK);
    cfg.rank = 0, cfg.seed = 8;
    ck_assert_int_eq(mt_loader_init(&other_seed, ds, &cfg, MT_SPLIT_TRAIN), MT_OK);
    ck_assert_int_eq(mt_loader_init(&eval, ds, &cfg, MT_SPLIT_EVAL), MT_OK);
    // 400 windows: 40 eval (360..399), 360 train -> 180 per rank -> 45 batches
    ck_assert_uint_eq(mt_loader_batches_per_epoch(r0), 45);
    static char seen[400];
    int32_t in[40], tg[40], in2[40];
    int valid, differs = 0;
    for (int i = 0; i < 45; i++) {
        mt_loader_next(r0, in, tg, &valid);
        mt_loader_next(again, in2, tg, &valid);
        ck_assert_mem_eq(in, in2, sizeof in);  // same seed, same order
        for (int b = 0; b < 4; b++) seen[in[b * 10] / 10]++;
        mt_loader_next(r1, in, tg, &valid);
        for (int b = 0; b < 4; b++) seen[in[b * 10] / 10]++;
        mt_loader_next(other_seed, in2, tg, &valid);
        differs |= memcmp(in, in2, sizeof in) != 0;
    }
    ck_assert(differs);
    for (int w = 0; w < 360; w++) ck_assert_int_eq(seen[w], 1);    // every train window exactly once over both ranks
    for (int w = 360; w < 400; w++) ck_assert_int_eq(seen[w], 0);  // eval windows never trained on
    mt_loader_next(eval, in, tg, &valid);
    ck_assert_int_eq(in[0], 3600);
    // cursor: save, draw, restore, draw again -> identical (across an epoch boundary too)
    mt_cursor c = mt_loader_get_cursor(r0);
    ck_assert_uint_eq(c.batch, 45);
    mt_loader_next(r0, in, tg, &valid);  // starts epoch 1
    mt_loader_set_cursor(r0, c);
    mt_loader_next(r0, in2, tg, &valid);
    ck_assert_mem_eq(in, in2, sizeof in);
    ck_assert_uint_eq(mt_loader_get_cursor(r0).epoch, 1);
    mt_loader_free(r0), mt_loader_free(r1), mt_loader_free(again), mt_loader_free(other_seed), mt_loader_free(eval);
    mt_dataset_free(ds);
}
END_TEST

static void expect_open_error(const char *path, int vocab, mt_err code, const char *fragment) {
    mt_dataset *ds = (mt_dataset *)1;
    ck_assert_int_eq(mt_dataset_open(&ds, path, vocab), code);
    ck_assert_ptr_null(ds);
    ck_assert_msg(strstr(mt_last_error(), fragment), "message '%s' lacks '%s'", mt_last_error(), fragment);
}

START_TEST(schema_errors_are_specific) {
    char path[300];
    snprintf(path, sizeof path, "%s/missing.h5", dir);
    expect_open_error(path, 0, MT_ERR_IO, "not found");
    snprintf(path, sizeof path, "%s/text.h5", dir);
    FILE *f = fopen(path, "w");
    fputs("not hdf5", f);
    fclose(f);
    expect_open_error(path, 0, MT_ERR_DATASET, "not an HDF5 file");
    // token id beyond the model's vocabulary
    snprintf(path, sizeof path, "%s/c.h5", dir);
    make_dataset(path, 100, 50, 0);
    expect_open_error(path, 40, MT_ERR_DATASET, "token 40 has id 40");
    // tokens stored as int64, and doc_offsets not ending at the count
    snprintf(path, sizeof path, "%s/d.h5", dir);
    hid_t file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    hsize_t dims[1] = {4};
    hid_t space = H5Screate_simple(1, dims, NULL);
    long long v[4] = {1, 2, 3, 4};
    hid_t d = H5Dcreate2(file, "tokens", H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Dwrite(d, H5T_NATIVE_LLONG, H5S_ALL, H5S_ALL, H5P_DEFAULT, v);
    H5Dclose(d);
    hid_t aspace = H5Screate(H5S_SCALAR);
    int one = 1;
    hid_t a = H5Acreate2(file, "format_version", H5T_STD_I32LE, aspace, H5P_DEFAULT, H5P_DEFAULT);
    H5Awrite(a, H5T_NATIVE_INT, &one);
    H5Aclose(a);
    a = H5Acreate2(file, "vocab_size", H5T_STD_I32LE, aspace, H5P_DEFAULT, H5P_DEFAULT);
    int vocab = 10;
    H5Awrite(a, H5T_NATIVE_INT, &vocab);
    H5Aclose(a);
    H5Sclose(aspace);
    H5Sclose(space);
    H5Fclose(file);
    expect_open_error(path, 0, MT_ERR_DATASET, "'tokens' must be a 1-D uint32");
    uint32_t tok[4] = {1, 2, 3, 4};
    uint64_t bad_offsets[2] = {0, 3};
    snprintf(path, sizeof path, "%s/e.h5", dir);
    ck_assert_int_eq(mt_dataset_write(path, tok, 4, bad_offsets, 1, NULL, 10, "t"), MT_OK);
    expect_open_error(path, 0, MT_ERR_DATASET, "doc_offsets[1] = 3");
    // too little data for a batch is an error at loader init
    uint64_t offsets[2] = {0, 4};
    ck_assert_int_eq(mt_dataset_write(path, tok, 4, offsets, 1, NULL, 10, "t"), MT_OK);
    mt_dataset *ds;
    ck_assert_int_eq(mt_dataset_open(&ds, path, 0), MT_OK);
    mt_loader_config cfg = {.B = 2, .T = 3, .seed = 1, .world = 1};
    mt_loader *l = (mt_loader *)1;
    ck_assert_int_eq(mt_loader_init(&l, ds, &cfg, MT_SPLIT_TRAIN), MT_ERR_DATASET);
    ck_assert_ptr_null(l);
    ck_assert_ptr_nonnull(strstr(mt_last_error(), "fewer than one batch"));
    mt_dataset_free(ds);
}
END_TEST

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
}

// Converts `text` (written to in.<ext>) with memtune's bytes; returns the error.
static mt_err convert(mt_convert_options *o, const char *ext, const char *text, mt_convert_stats *st) {
    static char in[300], out[300];
    snprintf(in, sizeof in, "%s/in.%s", dir, ext);
    snprintf(out, sizeof out, "%s/out.h5", dir);
    write_file(in, text);
    o->input = in, o->output = out;
    return mt_convert(o, st);
}

// A dataset's tokens and loss mask (all ones when the file has none).
static uint64_t read_back(uint32_t **tokens, uint8_t **mask, int *window) {
    char path[300];
    snprintf(path, sizeof path, "%s/out.h5", dir);
    mt_dataset *ds;
    ck_assert_int_eq(mt_dataset_open(&ds, path, 0), MT_OK);
    uint64_t n = mt_dataset_num_tokens(ds);
    *window = mt_dataset_window(ds);
    mt_dataset_free(ds);
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    *tokens = malloc(n * sizeof **tokens);
    *mask = malloc(n);
    hid_t d = H5Dopen2(f, "tokens", H5P_DEFAULT);
    H5Dread(d, H5T_NATIVE_UINT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, *tokens);
    H5Dclose(d);
    if (H5Lexists(f, "loss_mask", H5P_DEFAULT) > 0) {
        d = H5Dopen2(f, "loss_mask", H5P_DEFAULT);
        H5Dread(d, H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, *mask);
        H5Dclose(d);
    } else {
        memset(*mask, 1, n);
    }
    H5Fclose(f);
    return n;
}

// The trained tokens as text (bytes), '|' between runs.
static void trained_text(const uint32_t *tok, const uint8_t *mask, uint64_t n, char *out, size_t cap) {
    size_t k = 0;
    for (uint64_t i = 0; i < n && k + 2 < cap; i++) {
        if (!mask[i]) {
            if (k && out[k - 1] != '|') out[k++] = '|';
            continue;
        }
        out[k++] = tok[i] == MT_TOKEN_EOS ? '$' : tok[i] == MT_TOKEN_BOS ? '^' : (char)tok[i];
    }
    if (k && out[k - 1] == '|') k--;
    out[k] = '\0';
}

START_TEST(converter_text_and_jsonl) {
    mt_convert_options o;
    mt_convert_defaults(&o);
    mt_convert_stats st;
    ck_assert_int_eq(convert(&o, "txt", "\nfirst doc\nline two\n\n\n second\n", &st), MT_OK);
    ck_assert_uint_eq(st.kept, 2);
    // BOS "first doc\nline two" EOS BOS "second" EOS
    ck_assert_uint_eq(st.tokens, 2 + 18 + 2 + 6);
    ck_assert_uint_eq(st.trained, st.tokens);
    mt_dataset *ds;
    ck_assert_int_eq(mt_dataset_open(&ds, o.output, MT_BYTE_VOCAB), MT_OK);
    ck_assert_str_eq(mt_dataset_tokenizer(ds), MT_BYTE_TOKENIZER_NAME);
    ck_assert_int_eq(mt_dataset_vocab_size(ds), MT_BYTE_VOCAB);
    ck_assert_uint_eq(mt_dataset_num_docs(ds), 2);
    mt_dataset_free(ds);
    o.format = MT_FORMAT_JSONL;
    ck_assert_int_eq(convert(&o, "jsonl", "{\"text\": \"ab\"}\n\n{\"text\": \"cde\"}\n", &st), MT_OK);
    ck_assert_uint_eq(st.kept, 2);
    ck_assert_uint_eq(st.tokens, 9);
    // a bad line names itself, and the previous output stays as it was
    ck_assert_int_eq(convert(&o, "jsonl", "{\"text\": \"ab\"}\n{\"body\": 1}\n", &st), MT_ERR_DATASET);
    ck_assert_ptr_nonnull(strstr(mt_last_error(), "in.jsonl:2"));
    ck_assert_ptr_nonnull(strstr(mt_last_error(), "--on-bad-line skip"));
    ck_assert_int_eq(mt_dataset_open(&ds, o.output, 0), MT_OK);
    ck_assert_uint_eq(mt_dataset_num_tokens(ds), 9);
    mt_dataset_free(ds);
    // or is skipped and counted when asked
    o.skip_bad_lines = 1;
    ck_assert_int_eq(convert(&o, "jsonl", "{\"text\": \"ab\"}\nnot json\n{\"body\": 1}\n{\"text\": \"x\"}\n", &st),
                     MT_OK);
    ck_assert_uint_eq(st.examples, 4);
    ck_assert_uint_eq(st.bad_lines, 2);
    ck_assert_uint_eq(st.kept, 2);
    ck_assert_uint_eq(st.tokens, 4 + 3);
}
END_TEST

START_TEST(converter_masks_answers) {
    mt_convert_options o;
    mt_convert_defaults(&o);
    o.pack = MT_PACK_CONCAT;
    mt_convert_stats st;
    uint32_t *tok;
    uint8_t *mask;
    int window;
    char text[512];
    o.format = MT_FORMAT_PROMPT_COMPLETION;
    ck_assert_int_eq(convert(&o, "jsonl", "{\"prompt\": \"Q: 2+2?\", \"completion\": \" A: 4\"}\n", &st), MT_OK);
    uint64_t n = read_back(&tok, &mask, &window);
    trained_text(tok, mask, n, text, sizeof text);
    ck_assert_str_eq(text, " A: 4$");  // the completion and its EOS; not BOS, not the prompt
    ck_assert_uint_eq(st.trained, 6);
    ck_assert_uint_eq(st.masked, 8);  // BOS and the prompt
    free(tok), free(mask);
    o.train_on_inputs = 1;
    ck_assert_int_eq(convert(&o, "jsonl", "{\"prompt\": \"Q\", \"completion\": \"A\"}\n", &st), MT_OK);
    ck_assert_uint_eq(st.trained, 4);
    o.train_on_inputs = 0;
    o.format = MT_FORMAT_ALPACA;
    ck_assert_int_eq(convert(&o, "jsonl",
                             "{\"instruction\": \"Add\", \"input\": \"2 2\", \"output\": \"4\"}\n"
                             "{\"instruction\": \"Say hi\", \"output\": \"hi\"}\n"
                             "{\"instruction\": \"No answer\", \"output\": \"\"}\n",
                             &st),
                     MT_OK);
    n = read_back(&tok, &mask, &window);
    trained_text(tok, mask, n, text, sizeof text);
    ck_assert_str_eq(text, "4$|hi$|$");
    ck_assert_uint_eq(st.kept, 3);  // an empty output still trains its EOS
    // the prompt is the Alpaca prompt, with and without input
    char *all = calloc(n + 1, 1);
    for (uint64_t i = 0; i < n; i++) all[i] = tok[i] < 256 ? (char)tok[i] : '^';
    ck_assert_ptr_nonnull(strstr(all, "^Below is an instruction that describes a task, paired with an input"));
    ck_assert_ptr_nonnull(strstr(all, "### Instruction:\nAdd\n\n### Input:\n2 2\n\n### Response:\n4^"));
    ck_assert_ptr_nonnull(strstr(all, "the request.\n\n### Instruction:\nSay hi\n\n### Response:\nhi^"));
    free(all), free(tok), free(mask);
    ck_assert_int_eq(convert(&o, "jsonl", "{\"instruction\": \"Add\", \"output\": 4}\n", &st), MT_ERR_DATASET);
    ck_assert_ptr_nonnull(strstr(mt_last_error(), "in.jsonl:1"));
    // chat needs a model's tokenizer
    o.format = MT_FORMAT_CHAT;
    ck_assert_int_eq(convert(&o, "jsonl", "{\"messages\": []}\n", &st), MT_ERR_USAGE);
    ck_assert_ptr_nonnull(strstr(mt_last_error(), "--tokenizer"));
}
END_TEST

START_TEST(converter_pads_windows) {
    mt_convert_options o;
    mt_convert_defaults(&o);
    o.format = MT_FORMAT_PROMPT_COMPLETION;
    o.pack = MT_PACK_PAD;
    o.seq_len = 8;
    mt_convert_stats st;
    uint32_t *tok;
    uint8_t *mask;
    int window;
    const char *data =
        "{\"prompt\": \"ab\", \"completion\": \"cd\"}\n"         // 6 tokens: one window
        "{\"prompt\": \"p\", \"completion\": \"0123456789\"}\n"  // 13 tokens: longer than 8
        "{\"prompt\": \"x\", \"completion\": \"y\"}\n";          // 4 tokens
    ck_assert_int_eq(convert(&o, "jsonl", data, &st), MT_OK);
    uint64_t n = read_back(&tok, &mask, &window);
    ck_assert_int_eq(window, 8);
    // windows: [^abcd$..] [^p012345] [56789$..] [^xy$....] and one closing pad
    ck_assert_uint_eq(n, 4 * 8 + 1);
    ck_assert_uint_eq(st.split, 1);
    ck_assert_uint_eq(st.kept, 3);
    for (uint64_t w = 0; w < 4; w++) ck_assert_int_eq(mask[w * 8], 0);  // a window's first token is no target
    ck_assert_uint_eq(tok[16], '5');                                    // split windows overlap by one token
    char text[256];
    trained_text(tok, mask, n, text, sizeof text);
    ck_assert_str_eq(text, "cd$|012345|6789$|y$");  // every completion token a target once
    ck_assert_uint_eq(st.padded, 2 + 0 + 2 + 4 + 1);
    free(tok), free(mask);
    // the loader takes it only at its window
    mt_dataset *ds;
    ck_assert_int_eq(mt_dataset_open(&ds, o.output, 0), MT_OK);
    mt_loader *l;
    mt_loader_config lc = {.B = 1, .T = 16, .seed = 1, .rank = 0, .world = 1};
    ck_assert_int_eq(mt_loader_init(&l, ds, &lc, MT_SPLIT_TRAIN), MT_ERR_DATASET);
    ck_assert_ptr_nonnull(strstr(mt_last_error(), "train.seq_len: 8"));
    lc.T = 8;
    ck_assert_int_eq(mt_loader_init(&l, ds, &lc, MT_SPLIT_TRAIN), MT_OK);
    ck_assert_uint_eq(mt_loader_batches_per_epoch(l), 4);
    mt_loader_free(l);
    mt_dataset_free(ds);
    o.long_mode = MT_LONG_TRUNCATE;
    ck_assert_int_eq(convert(&o, "jsonl", data, &st), MT_OK);
    ck_assert_uint_eq(st.truncated, 1);
    ck_assert_uint_eq(st.tokens, 3 * 8 + 1);
    o.long_mode = MT_LONG_DROP;
    ck_assert_int_eq(convert(&o, "jsonl", data, &st), MT_OK);
    ck_assert_uint_eq(st.dropped_long, 1);
    ck_assert_uint_eq(st.kept, 2);
    ck_assert_uint_eq(st.tokens, 2 * 8 + 1);
}
END_TEST

// The output does not depend on the thread count, across batches.
START_TEST(converter_threads_agree) {
    size_t cap = 1 << 22, k = 0;
    char *data = malloc(cap);
    for (int i = 0; i < 20000; i++)
        k += (size_t)snprintf(data + k, cap - k, "{\"prompt\": \"q%d\", \"completion\": \"%*d\"}\n", i, i % 13 + 1, i);
    mt_convert_options o;
    mt_convert_defaults(&o);
    o.format = MT_FORMAT_PROMPT_COMPLETION;
    o.pack = MT_PACK_PAD, o.seq_len = 16;
    mt_convert_stats st1, st4;
    uint32_t *t1, *t4;
    uint8_t *m1, *m4;
    int window;
    o.threads = 1;
    ck_assert_int_eq(convert(&o, "jsonl", data, &st1), MT_OK);
    uint64_t n1 = read_back(&t1, &m1, &window);
    o.threads = 4;
    ck_assert_int_eq(convert(&o, "jsonl", data, &st4), MT_OK);
    uint64_t n4 = read_back(&t4, &m4, &window);
    ck_assert_uint_eq(st1.examples, 20000);
    ck_assert_uint_eq(n1, n4);
    ck_assert_int_eq(memcmp(t1, t4, n1 * sizeof *t1), 0);
    ck_assert_int_eq(memcmp(m1, m4, n1), 0);
    ck_assert_uint_eq(st1.trained, st4.trained);
    free(t1), free(t4), free(m1), free(m4), free(data);
}
END_TEST

int main(void) {
    tu_tempdir(dir, sizeof dir);
    Suite *s = suite_create("datasets");
    TCase *tc = tcase_create("hdf5");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, loader_windows_targets_and_mask);
    tcase_add_test(tc, loader_shuffle_cursor_shards_and_eval);
    tcase_add_test(tc, loader_documents_positions_and_boundaries);
    tcase_add_test(tc, schema_errors_are_specific);
    tcase_add_test(tc, converter_text_and_jsonl);
    tcase_add_test(tc, converter_masks_answers);
    tcase_add_test(tc, converter_pads_windows);
    tcase_add_test(tc, converter_threads_agree);
    suite_add_tcase(s, tc);
    return tu_run_suite(s, 0);
}
