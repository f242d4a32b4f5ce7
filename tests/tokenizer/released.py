#!/usr/bin/env python3
"""tokenizer.json files of released models, from the vocabularies those
models ship, for tests/tokenizer/compare.py (which then checks memtune's ids
against Hugging Face `tokenizers` on them).

The released files themselves are not in any public repository this project
can read, but the vocabularies they were converted from are:

  llama2  Llama 2's SentencePiece model (tokenizer.model, 32000 pieces; it is
          in karpathy/llama2.c), laid out as the Llama-2 and TinyLlama
          tokenizer.json files are: Prepend + Replace normalisers, BPE with
          byte fallback, <unk> <s> </s>.
  qwen2   Qwen's BPE ranks (qwen.tiktoken, 151643 tokens; the Qwen-VL and
          Qwen-7B repositories ship it), the vocabulary Qwen2's tokenizer.json
          holds, laid out as Qwen2's is: NFC, Qwen2's split regex, byte-level,
          <|endoftext|> <|im_start|> <|im_end|>.

Each conversion is checked against the model's own tokenizer library
(sentencepiece, tiktoken) on the corpus before it is written: the ids must
be the same, document by document. Both libraries install from PyPI.

  python3 tests/tokenizer/released.py --llama2 tokenizer.model --qwen2 qwen.tiktoken \\
      --corpus /tmp/mixed10.txt --out /tmp/released
  python3 tests/tokenizer/compare.py --corpus /tmp/mixed10.txt \\
      --tokenizers /tmp/released/llama2,/tmp/released/qwen2

With --chat (needs transformers) each folder also gets its family's released
chat template (Llama-2-chat's; Qwen2-Instruct's ChatML), and `memtune
tokenize --format chat` renders tests/tokenizer/chat.jsonl with it: ids and
answer masks must equal transformers' apply_chat_template, conversation by
conversation (as test_tokenizer does for the fixtures).
"""
import argparse
import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import unicodedata

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def byte_chars():
    """GPT-2's byte-to-character table (printable bytes stand for themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def merges_from_ranks(ranks, text_of):
    """BPE merges implied by a vocabulary ordered by rank: every split of a
    token into two tokens, in the order of the token they make, ties by the
    parts' ranks."""
    merges = []
    for tok, rank in ranks.items():
        pairs = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
        pairs.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges.extend((rank, a, b) for a, b in pairs)
    merges.sort(key=lambda m: m[0])
    return [(text_of(a), text_of(b)) for _, a, b in merges]


def around_specials(specials, encode):
    """The truth as `tokenizers` treats special tokens written in the text:
    each is its own id, and the text between them is encoded piece by piece."""
    pattern = re.compile("(" + "|".join(re.escape(t) for t in specials) + ")")

    def truth(text):
        ids = []
        for piece in pattern.split(text):
            if piece in specials:
                ids.append(specials[piece])
            elif piece:
                ids.extend(encode(piece))
        return ids

    return truth


def llama2(model_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_path)
    n = sp.vocab_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    # SentencePiece BPE merges by the score of the piece they make (higher first)
    scored = {p: -sp.get_score(i) for p, i in vocab.items() if not sp.is_control(i) and not sp.is_unknown(i)}
    merges = []
    for piece in scored:
        for i in range(1, len(piece)):
            a, b = piece[:i], piece[i:]
            if a in scored and b in scored:
                merges.append((scored[piece], vocab[a], vocab[b], a, b))
    merges.sort()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token="<unk>",
                               fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
              "add_eos_token": False, "tokenizer_class": "PreTrainedTokenizerFast"}

    return tok, config, around_specials({"<unk>": 0, "<s>": 1, "</s>": 2}, sp.encode)


def qwen2(tiktoken_path):
    import tiktoken

    ranks = {}
    with open(tiktoken_path, "rb") as f:
        for line in f:
            if line.strip():
                b64, rank = line.split()
                ranks[base64.b64decode(b64)] = int(rank)
    table = byte_chars()

    def text_of(b):
        return "".join(table[x] for x in b)

    vocab = {text_of(t): r for t, r in ranks.items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges_from_ranks(ranks, text_of), ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    config = {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast"}
    enc = tiktoken.Encoding("qwen", pat_str=QWEN2_SPLIT, mergeable_ranks=ranks,
                            special_tokens={t: len(ranks) + i for i, t in enumerate(specials)})

    # Qwen2's tokenizer.json normalises to NFC before splitting
    return tok, config, around_specials({t: len(ranks) + i for i, t in enumerate(specials)},
                                        lambda t: enc.encode(unicodedata.normalize("NFC", t), disallowed_special=()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama2", help="Llama 2's SentencePiece tokenizer.model")
    ap.add_argument("--qwen2", help="Qwen's qwen.tiktoken")
    ap.add_argument("--corpus", required=True, help="the compare.py corpus (make_fixtures.py --corpus)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--chat", action="store_true", help="also check chat rendering against transformers")
    args = ap.parse_args()
    with open(args.corpus, "rb") as f:
        docs = [d.decode("utf-8", errors="replace") for d in f.read().split(b"\n\n")]
    failed = 0
    for name, path, make in (("llama2", args.llama2, llama2), ("qwen2", args.qwen2, qwen2)):
        if not path:
            continue
        tok, config, truth = make(path)
        got = tok.encode_batch(docs, add_special_tokens=False)
        bad = [i for i, (d, e) in enumerate(zip(docs, got)) if e.ids != truth(d)]
        print(f"{name}: {len(docs)} documents, {sum(len(e.ids) for e in got)} tokens; "
              f"{len(bad)} differ from {'sentencepiece' if name == 'llama2' else 'tiktoken'}")
        if bad:
            failed = 1
            i = bad[0]
            print(f"  first: document {i}: {docs[i][:80]!r}\n  tokenizers {got[i].ids[:20]}\n  truth {truth(docs[i])[:20]}")
            continue
        folder = os.path.join(args.out, name)
        os.makedirs(folder, exist_ok=True)
        tok.save(os.path.join(folder, "tokenizer.json"))
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=1)
        print(f"  wrote {folder}")
        if args.chat and not failed:
            failed |= check_chat(name, folder)
    raise SystemExit(failed)


def check_chat(name, folder):
    """The family's released chat template on this vocabulary: memtune tokenize's ids and masks against
    transformers' apply_chat_template (make_fixtures.chat_expect writes the expectation)."""
    import h5py
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import make_fixtures as mf
    template = {"llama2": mf.LLAMA2_TEMPLATE, "qwen2": mf.QWEN2_TEMPLATE}[name]
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["chat_template"] = template
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)
    parent = os.path.dirname(folder)
    mf.chat_expect(parent, [(name, "auto", template)])
    with open(os.path.join(folder, "chat-auto.expected")) as f:
        expected = f.read().splitlines()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    memtune = os.path.join(os.environ.get("MT_BUILD_DIR", os.path.join(root, "build")), "memtune")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "chat.h5")
        subprocess.run([memtune, "tokenize", "--tokenizer", folder, "--format", "chat", "--pack", "concat",
                        "--on-bad-line", "skip", "--input", os.path.join(root, "tests", "tokenizer", "chat.jsonl"),
                        "--output", out], check=True, capture_output=True)
        with h5py.File(out) as f:
            tokens, mask, offsets = f["tokens"][:], f["loss_mask"][:], f["doc_offsets"][:]
    doc, differ, compared = 0, 0, 0
    for line in expected:
        if line == "refused":
            continue
        ids, want = line.split("\t")
        ids = [int(x) for x in ids.split()]
        a, b = offsets[doc], offsets[doc + 1]
        got_ids, got_mask = tokens[a:b].tolist(), "".join(str(int(x)) for x in mask[a:b])
        differ += got_ids != ids or got_mask != want
        compared += 1
        doc += 1
    differ += doc != len(offsets) - 1
    print(f"  chat ({name}'s released template): {compared} conversations, {differ} differ from "
          f"apply_chat_template (ids or answer masks)")
    return 1 if differ else 0


if __name__ == "__main__":
    main()
