#!/usr/bin/env python3
"""memtune's tokenizers against Hugging Face `tokenizers` (the truth), on the
same documents: the corpus's bytes cut at every blank line, each decoded
with errors="replace" (as memtune reads invalid UTF-8). For each tokenizer
(a fixture name or a folder holding tokenizer.json): the documents whose ids
differ (the first shown), decode round-trips against `tokenizers`' decode,
and the throughput of both in the same run (memtune's OpenMP threads, the
library's encode_batch with all its threads).

  python3 tests/tokenizer/compare.py --corpus /tmp/mixed.txt [--tokenizers llama3,qwen2,...]

Make the corpus with make_fixtures.py --corpus FILE --mb 10. Exit 1 when any
ids differ."""
import argparse
import os
import subprocess
import sys
import time

from tokenizers import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BUILD = os.environ.get("MT_BUILD_DIR", os.path.join(ROOT, "build"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--tokenizers", default="llama3,qwen2,gpt2,llama2,mistral")
    args = ap.parse_args()
    with open(args.corpus, "rb") as f:
        data = f.read()
    docs = [d.decode("utf-8", errors="replace") for d in data.split(b"\n\n")]
    print(f"corpus {args.corpus}: {len(data) / 1e6:.1f} MB, {len(docs)} documents")
    failed = 0
    for name in args.tokenizers.split(","):
        folder = name if os.path.isdir(name) else os.path.join(HERE, "fixtures", name)
        tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        t0 = time.perf_counter()
        want = [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
        hf_seconds = time.perf_counter() - t0
        out = os.path.join("/tmp", f"mt-ids-{os.path.basename(folder)}.txt")
        run = subprocess.run([os.path.join(BUILD, "tests", "mt_tokenize_ids"), folder, args.corpus, out],
                             capture_output=True, text=True,
                             env=dict(os.environ, MT_DECODE_CHECK="1", MT_DECODE_OUT=out + ".decoded"))
        if run.returncode:
            print(run.stderr)
            failed += 1
            continue
        with open(out) as f:
            got = [[int(x) for x in line.split()] for line in f]
        n_ids = sum(len(w) for w in want)
        bad = [i for i in range(len(docs)) if i >= len(got) or got[i] != want[i]]
        mt_line = run.stderr.strip().splitlines()[0]
        mt_tps = float(mt_line.split("(")[1].split()[0])
        # decode: memtune's (through the tool's check against the text) and the library's on the same ids
        hf_text = [tok.decode(w, skip_special_tokens=False) for w in want]
        roundtrip_hf = sum(1 for i, d in enumerate(docs) if hf_text[i] != d)
        with open(out + ".decoded", "rb") as f:
            mt_text = [x.decode("utf-8") for x in f.read().split(b"\x1e")[:-1]]
        decode_differs = sum(1 for i in range(len(docs)) if i >= len(mt_text) or mt_text[i] != hf_text[i])
        print(f"{name}: {n_ids} ids; {len(bad)} of {len(docs)} documents differ; "
              f"tokens/s memtune {mt_tps:.0f}, tokenizers {n_ids / hf_seconds:.0f} "
              f"(x{mt_tps / (n_ids / hf_seconds):.2f}); documents whose decode is not their text: "
              f"tokenizers {roundtrip_hf}, memtune {run.stderr.strip().splitlines()[-1].split()[1]}; "
              f"decodes that differ from tokenizers' decode: {decode_differs}")
        if bad or decode_differs:
            failed += 1
        if decode_differs:
            i = next(i for i in range(len(docs)) if i >= len(mt_text) or mt_text[i] != hf_text[i])
            print(f"  first decode difference: document {i}: memtune {mt_text[i][:120]!r}")
            print(f"                           tokenizers {hf_text[i][:120]!r}")
        if bad:
            i = bad[0]
            g = got[i] if i < len(got) else []
            k = next((j for j in range(min(len(g), len(want[i]))) if g[j] != want[i][j]), min(len(g), len(want[i])))
            print(f"  first: document {i} at id {k}: memtune {g[k:k + 8]} tokenizers {want[i][k:k + 8]}")
            print(f"  tokens: memtune {[tok.id_to_token(x) for x in g[k:k + 8]]}")
            print(f"          tokenizers {[tok.id_to_token(x) for x in want[i][k:k + 8]]}")
            print(f"  text near it: {docs[i][:0]}{tok.decode(want[i][max(0, k - 8):k + 8])!r}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
