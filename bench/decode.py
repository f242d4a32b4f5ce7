#!/usr/bin/env python3
"""Decoding speed: memtune generate on the GPU against transformers'
generate, in one run on one GPU.

Shapes TinyLlama-1.1B and Llama-2-7B (bf16, random weights saved by
transformers; the llama2 test fixture's tokenizer, 8000 ids of the 32000
vocabulary: speed does not depend on the text), greedy, a one-word prompt,
--new tokens at batch 1 and batch 16. memtune: `memtune generate --device
gpu --input` (its own summary line times the decoding, not the loading).
transformers: generate with its dynamic cache (eager), and with the static
cache (which transformers compiles with torch.compile itself) where it runs;
both after a warm-up generate; min_new_tokens forces the same length. The batch-1 bound:
the bf16 weight bytes a token reads (every weight once, of the untied
embedding table one row) over the GPU's copy bandwidth (measured here: a
device-to-device copy, bytes read plus written).
memtune times its decoding after one set-up step (kernels loaded, the step
recorded as a CUDA Graph), as transformers is timed after its warm-up.
--variants also runs memtune with parts turned off, for an A/B in one call:
no-graph (MT_CUDA_GRAPHS=0: the step op by op), no-skinny (MT_SKINNY=0:
cuBLAS for the one-row products), neither (both: the step's launches as
they were before 2026-12-06, timed after the same set-up step), pdl
(MT_PDL=1: the graph's kernels with programmatic dependent launch),
baseline (another memtune binary, --baseline: the build before a change).
Writes decode_bench.json; prints tokens/s and the ratios.

  python3 bench/decode.py --out $OUT [--shapes TinyLlama-1.1B,Llama-2-7B] [--new 128]
                          [--variants default,no-graph,no-skinny,neither,pdl,baseline] [--baseline BIN]
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("MT_BUILD_DIR", os.path.join(ROOT, "build"))
FIXTURE = os.path.join(ROOT, "tests", "tokenizer", "fixtures", "llama2")
BASE = dict(vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
SHAPES = {
    "TinyLlama-1.1B": dict(BASE, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4),
    "Llama-2-7B": dict(BASE, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32),
}


def copy_bandwidth():
    """Bytes read plus written per second of a 2 GiB device-to-device copy."""
    a = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    bw = 10 * 2 * a.numel() * 2 / (time.perf_counter() - t)
    del a, b
    torch.cuda.empty_cache()
    return bw


VARIANTS = {"default": {}, "no-graph": {"MT_CUDA_GRAPHS": "0"}, "no-skinny": {"MT_SKINNY": "0"},
            "neither": {"MT_CUDA_GRAPHS": "0", "MT_SKINNY": "0"}, "pdl": {"MT_PDL": "1"}, "baseline": {}}


def memtune_decode(folder, batch, new, variant="default", binary=None):
    prompts = os.path.join(folder, "prompts.jsonl")
    with open(prompts, "w") as f:
        for i in range(batch):
            f.write(json.dumps({"prompt": "Hello"}) + "\n")
    out = subprocess.run([binary or os.path.join(BUILD, "memtune"), "generate", "--model", folder, "--input", prompts,
                          "--batch", str(batch), "--max-new-tokens", str(new), "--device", "gpu"],
                         capture_output=True, text=True, env=dict(os.environ, **VARIANTS[variant]))
    m = re.search(r"(\d+) new tokens in ([0-9.]+) s", out.stderr)
    step = re.search(r"a decoding step runs (.*)", out.stderr)
    split = re.search(r"steps of ([0-9.]+) ms in the model, ([0-9.]+) ms a step in sampling", out.stderr)
    if out.returncode or not m:
        print(out.stderr[-2000:])
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    tokens, seconds = int(m.group(1)), float(m.group(2))
    r = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "step": step.group(1) if step else "?"}
    if split:
        r["model_ms_per_step"], r["host_ms_per_step"] = float(split.group(1)), float(split.group(2))
    return r


def torch_decode(model, batch, new, static):
    ids = torch.full((batch, 2), 15043, dtype=torch.long, device="cuda")
    ids[:, 0] = 1
    # every row the same unpadded prompt: the mask says so (transformers warns without one)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=2,
              attention_mask=torch.ones_like(ids))
    if static:
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        model.generate(ids, **kw)  # warm-up (compiles)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(ids, **kw)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
    tokens = (out.shape[1] - ids.shape[1]) * batch
    return {"tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/memtune-gpu"))
    ap.add_argument("--work", default="/tmp/mt-decode-bench")
    ap.add_argument("--shapes", default="TinyLlama-1.1B,Llama-2-7B")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--variants", default="default", help="memtune variants: " + ",".join(VARIANTS))
    ap.add_argument("--baseline", help="the memtune binary of the variant baseline")
    args = ap.parse_args()
    if "baseline" in args.variants.split(",") and not args.baseline:
        ap.error("the variant baseline needs --baseline BIN (the memtune binary to compare with)")
    os.makedirs(args.out, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    results = {"gpu": gpu, "copy_bandwidth_GBps": bw / 1e9, "new_tokens": args.new, "shapes": {}}
    print(f"decode bench on {gpu}: copy bandwidth {bw / 1e9:.0f} GB/s (read + write)", flush=True)
    for shape in args.shapes.split(","):
        folder = os.path.join(args.work, shape)
        shutil.rmtree(folder, ignore_errors=True)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], torch_dtype="bfloat16")).to(torch.bfloat16).eval()
        model.save_pretrained(folder)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(FIXTURE, f), folder)
        weight_bytes = sum(p.numel() for p in model.parameters()) * 2
        # a step reads every weight once but of the (untied) embedding table one row a sequence
        emb = model.get_input_embeddings().weight
        tied = model.config.tie_word_embeddings
        read_bytes = weight_bytes - (0 if tied else (emb.numel() - emb.shape[1]) * 2)
        row = {"weight_bytes": weight_bytes, "bytes_read_per_token": read_bytes, "batches": {}}
        for batch in [int(b) for b in args.batches.split(",")]:
            r = {"memtune": memtune_decode(folder, batch, args.new)}
            for v in args.variants.split(","):
                if v != "default":
                    r["memtune_" + v] = memtune_decode(folder, batch, args.new, v,
                                                       args.baseline if v == "baseline" else None)
            r["transformers_eager"] = torch_decode(model, batch, args.new, static=False)
            if not args.no_compile:
                # transformers compiles the forward itself for a static cache
                # (generation_config.compile_config); compiling model.forward by
                # hand with CUDA graphs broke on reused outputs (2026-12-05, H100)
                try:
                    r["transformers_static_compiled"] = torch_decode(model, batch, args.new, static=True)
                except Exception as e:  # noqa: BLE001 - reported, the bench goes on
                    r["transformers_static_compiled"] = {"error": str(e).splitlines()[0][:300]}
                torch._dynamo.reset()
            mt = r["memtune"].get("tokens_per_s")
            best = max([v.get("tokens_per_s", 0) for k, v in r.items() if k.startswith("transformers")] or [0])
            if mt and best:
                r["ratio_vs_best_transformers"] = mt / best
            if mt and batch == 1:
                r["memtune_bandwidth_fraction"] = read_bytes * mt / bw
                for k, v in list(r.items()):
                    if k.startswith("memtune_") and isinstance(v, dict) and "tokens_per_s" in v:
                        v["bandwidth_fraction"] = read_bytes * v["tokens_per_s"] / bw
            row["batches"][str(batch)] = r
            line = " | ".join(f"{k} {v['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in v else f"{k} {v.get('error')}"
                              for k, v in r.items() if isinstance(v, dict))
            extra = f" | ratio {r['ratio_vs_best_transformers']:.2f}x" if "ratio_vs_best_transformers" in r else ""
            if "memtune_bandwidth_fraction" in r:
                extra += f" | {100 * r['memtune_bandwidth_fraction']:.0f}% of the bandwidth bound"
            m = r["memtune"]
            print(f"{shape} batch {batch}: {line}{extra} | memtune's step: {m.get('step')}, "
                  f"{m.get('model_ms_per_step')} ms in the model, {m.get('host_ms_per_step')} ms on the host",
                  flush=True)
        results["shapes"][shape] = row
        del model
        torch.cuda.empty_cache()
        shutil.rmtree(folder, ignore_errors=True)
    with open(os.path.join(args.out, "decode_bench.json"), "w") as f:
        json.dump(results, f, indent=1)
    ok = all("tokens_per_s" in r["memtune"] for s in results["shapes"].values() for r in s["batches"].values())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
