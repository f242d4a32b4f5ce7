#!/usr/bin/env python3
"""`memtune tokenize` against Hugging Face `tokenizers`' batch encoding on the
same machine, same data, in one run; and memtune's peak memory on a large
input.

  python3 bench/tokenize_bench.py --corpus /tmp/mixed10.txt [--tokenizer tests/tokenizer/fixtures/llama3]
                            [--big-gb 2] [--out results.json]

Two inputs are made from the corpus (make it with
tests/tokenizer/make_fixtures.py --corpus FILE --mb 10): JSONL documents (the
corpus cut at blank lines) and chat JSONL (those documents as alternating
user and assistant turns, three exchanges a conversation). memtune's time is
the whole command (reading and parsing the JSONL, rendering the chat
template, tokenizing, the loss masks, writing HDF5) with every core;
`tokenizers` is timed on encode_batch alone over strings already in memory
(chat: already rendered with transformers' apply_chat_template), with all
its threads: the library's best case. --big-gb repeats the chat input to
that size and reports memtune's peak resident memory (/usr/bin/time)."""
import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("MT_BUILD_DIR", os.path.join(ROOT, "build"))


def documents(corpus):
    with open(corpus, "rb") as f:
        data = f.read().decode("utf-8", errors="replace")
    return [d.strip() for d in re.split(r"\n\s*\n", data) if d.strip()]


def memtune(args, inp, out, extra):
    cmd = [os.path.join(BUILD, "memtune"), "tokenize", "--input", inp, "--output", out, "--tokenizer", args.tokenizer,
           "--quiet"] + extra
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if res.returncode:
        sys.exit(f"memtune tokenize failed: {res.stderr}")
    tokens = int(re.search(r"examples of \d+ \(.*\), (\d+) tokens", res.stdout).group(1))
    return tokens, seconds, res.stdout.strip()


def library(tok, texts):
    tok.encode_batch(texts[:64], add_special_tokens=False)  # warm
    t = time.perf_counter()
    enc = tok.encode_batch(texts, add_special_tokens=False)
    seconds = time.perf_counter() - t
    return sum(len(e.ids) for e in enc), seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--tokenizer", default=os.path.join(ROOT, "tests/tokenizer/fixtures/llama3"))
    ap.add_argument("--work", default="/tmp/memtune-tokenize-bench")
    ap.add_argument("--big-gb", type=float, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    os.makedirs(args.work, exist_ok=True)
    docs = documents(args.corpus)
    tok = Tokenizer.from_file(os.path.join(args.tokenizer, "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(args.tokenizer)
    results = {"cores": os.cpu_count(), "documents": len(docs), "tokenizer": args.tokenizer}

    text_path = os.path.join(args.work, "text.jsonl")
    with open(text_path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    convs = []
    for i in range(0, len(docs) - 5, 6):
        convs.append([{"role": "user" if k % 2 == 0 else "assistant", "content": docs[i + k]} for k in range(6)])
    chat_path = os.path.join(args.work, "chat.jsonl")
    with open(chat_path, "w", encoding="utf-8") as f:
        for c in convs:
            f.write(json.dumps({"messages": c}, ensure_ascii=False) + "\n")
    rendered = [hf.apply_chat_template(c, tokenize=False) for c in convs]

    for name, path, texts, extra in (("jsonl text", text_path, docs, ["--format", "jsonl"]),
                                     ("chat", chat_path, rendered, ["--format", "chat", "--pack", "concat"])):
        mt_tokens, mt_s, line = memtune(args, path, os.path.join(args.work, "out.h5"), extra)
        lib_tokens, lib_s = library(tok, texts)
        ratio = (mt_tokens / mt_s) / (lib_tokens / lib_s)
        print(f"{name}: {os.path.getsize(path) / 1e6:.1f} MB; memtune tokenize {mt_tokens / mt_s / 1e6:.2f}M tokens/s "
              f"({mt_s:.2f} s, whole command), tokenizers encode_batch {lib_tokens / lib_s / 1e6:.2f}M tokens/s "
              f"({lib_s:.2f} s, encoding alone): x{ratio:.2f}")
        print(f"  memtune: {line.splitlines()[0]}")
        results[name] = {"bytes": os.path.getsize(path), "memtune_tokens": mt_tokens, "memtune_seconds": mt_s,
                         "library_tokens": lib_tokens, "library_seconds": lib_s, "ratio": ratio}

    if args.big_gb > 0:
        big = os.path.join(args.work, "big.jsonl")
        chunk = open(chat_path, "rb").read()
        with open(big, "wb") as f:
            for _ in range(max(1, int(args.big_gb * 1e9 / len(chunk)))):
                f.write(chunk)
        cmd = ["/usr/bin/time", "-v", os.path.join(BUILD, "memtune"), "tokenize", "--input", big, "--output",
               os.path.join(args.work, "big.h5"), "--tokenizer", args.tokenizer, "--format", "chat", "--pack",
               "concat", "--quiet"]
        t = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1)) * 1024
        print(f"big chat input: {os.path.getsize(big) / 1e9:.2f} GB in {seconds:.0f} s, peak resident memory "
              f"{rss / 2**20:.0f} MiB; {res.stdout.strip().splitlines()[0]}")
        results["big"] = {"bytes": os.path.getsize(big), "seconds": seconds, "peak_rss": rss}
        os.remove(big)
        os.remove(os.path.join(args.work, "big.h5"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
