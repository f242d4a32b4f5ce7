#!/usr/bin/env python3
"""Weight streaming (model.weights: cpu) against the same run with the weights
resident on the GPU, in one run on one GPU (issue: models bigger than the GPU).

Cases (random initialisation, `memtune train`, tokens/s after the warm-up
steps, GPU peak from nvidia-smi and the allocator, host peak from VmRSS):
  qlora-70b  QLoRA r=16 on all linear modules over a Llama-2-70B shape, NF4
             base, activation checkpointing, B=1, T=2048: streamed from host
             memory (target: at most 10 GiB of GPU memory) and resident.
  mezo-13b   MeZO over a Llama-2-13B shape, bf16, at two batch sizes: where
             the transfer binds and where compute covers it (target: 0.9x of
             resident); the host-to-device bandwidth is measured first.
  mezo-30b   MeZO over Llama-1-33B's shape (60 layers of hidden 6656, 32.5 B
             parameters, 61 GiB in bf16: resident on an 80 GB GPU too), at
             batch 1 and 8 with the MLP in tiles of 4096 rows on both sides
             (target: at most 6 GiB of GPU memory streamed, 0.9x resident
             where compute covers the transfer).
  full-3b    full fine-tuning of a 3B Llama shape with AdamW's state in host
             memory (offload.optimizer: cpu), checkpointing: weights and
             state off the GPU against the weights resident.
  full-7b    the same on Llama-2-7B's shape, with 8-bit moments
             (offload.moments: int8), which the GPU machine's host holds.
--weights takes, comma-separated: gpu (resident), cpu (streamed), cpu:N (streamed
with the first N layers resident, model.resident_layers: N) and auto@SIZE
(model.weights: auto under memory.budget: SIZE, which keeps on the GPU the first
layers that fit and streams the rest; the run's start-up line says how many).
Writes streaming_bench.json and prints one line per run.

  python3 bench/streaming.py --out $OUT [--cases qlora-70b,mezo-30b,mezo-13b,full-3b,full-7b] [--batches 8] [--weights cpu,cpu:30,auto@40GiB,gpu]
"""
import argparse
import json
import os
import re
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from full_ft import timed_run_sets, write_dataset  # noqa: E402
from lora_ft import BASE, shape_folder, train_and_time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("MT_BUILD_DIR", os.path.join(ROOT, "build"))
GIB = 1024 ** 3
SHAPES = {
    "70b": dict(BASE, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),
    "13b": dict(BASE, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40),
    "33b": dict(BASE, hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                num_key_value_heads=52),
    # Llama-3.2-3B's layers (head dimension 128; OpenLLaMA-3B's 100 is not a multiple of 8, which cuDNN asks)
    "3b": dict(BASE, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8),
    "7b": dict(BASE, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
}


def h2d_bandwidth():
    """Pinned host to device, bytes a second, of a 1 GiB copy (torch)."""
    try:
        import torch
        src = torch.empty(1 << 29, dtype=torch.bfloat16, pin_memory=True)
        dst = torch.empty_like(src, device="cuda")
        for _ in range(2):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        return 5 * src.numel() * 2 / (time.perf_counter() - t)
    except Exception as e:  # noqa: BLE001 - reported, the bench goes on
        print(f"host-to-device bandwidth not measured: {e}")
        return None


def placement(spec):
    """A --weights entry as (label, memtune settings): gpu, cpu, cpu:N, auto@SIZE."""
    if spec.startswith("cpu:"):
        return f"cpu-r{int(spec[4:])}", {"model.weights": "cpu", "model.resident_layers": int(spec[4:])}
    if spec.startswith("auto@"):
        return f"auto-{spec[5:]}", {"model.weights": "auto", "memory.budget": spec[5:]}
    if spec not in ("gpu", "cpu", "ssd"):
        sys.exit(f"--weights: {spec!r} is not gpu, cpu, cpu:N or auto@SIZE")
    return spec, {"model.weights": spec}


def run(args, case, folder, data, B, T, sets, spec):
    weights, where = placement(spec)
    ns = argparse.Namespace(steps=args.steps, warmup=args.warmup, B=B, T=T)
    out = os.path.join(args.work, f"{case}-{weights}-B{B}")
    base = timed_run_sets(folder, data, out, {
        "train.steps": args.steps, "train.micro_batch": B, "train.seq_len": T, "train.grad_accum": 1,
        "train.log_every": 1, "optim.warmup_steps": 1, **where, **sets})
    if args.trace_step and weights != "gpu":
        base["offload.trace_step"] = args.trace_step
    cmd = [os.path.join(BUILD, "memtune"), "train", os.path.join(ROOT, "configs", "quickstart.yaml")]
    r = train_and_time(ns, cmd, base, out, ("base weights", "memory (GPU)", "memory (host)", "model.weights auto"))
    trace = os.path.join(out, "streaming-trace.json")
    if args.trace_step and weights != "gpu" and os.path.exists(trace):
        shutil.copy(trace, os.path.join(args.out, f"{case}-B{B}-streaming-trace.json"))
    line = (f"{case} {weights} B={B} T={T}: " + (f"{r['tokens_per_second']:.0f} tok/s, "
            f"{r['step_ms']:.0f} ms a step, GPU peak "
            f"{r['device_peak'] / GIB:.2f} GiB (allocator {r['allocator_peak'] / GIB:.2f}), host peak "
            f"{r['host_peak'] / GIB:.1f} GiB" if "error" not in r else f"error {r['error']}"))
    print(line, flush=True)
    for mark in r.get("log", []):  # memtune's own tallies, beside the sampled peaks
        print(f"  {mark}", flush=True)
    return r


def batches(args, default):
    return [int(b) for b in args.batches.split(",")] if args.batches else default


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="qlora-70b,mezo-30b,full-3b")
    ap.add_argument("--batches", default="", help="mezo-13b's and mezo-30b's batch sizes, comma-separated "
                    "(default: 1,16 and 8,1)")
    ap.add_argument("--weights", default="cpu,gpu", help="streamed (cpu), resident (gpu) or both, comma-separated")
    ap.add_argument("--trace-step", type=int, default=0,
                    help="offload.trace_step for the streamed runs: their timeline of that step and the next goes to "
                    "--out as <case>-B<batch>-streaming-trace.json (docs/offload.md)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--work", default="/tmp/mt-streaming-bench")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/mt-streaming-bench"))
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    bw = h2d_bandwidth()
    results = {"h2d_bytes_per_second": bw, "runs": {}}
    if bw:
        print(f"host-to-device bandwidth (pinned, 1 GiB): {bw / 1e9:.1f} GB/s", flush=True)
    data = os.path.join(args.work, "data.h5")
    write_dataset(data, 4 << 20, 32000)
    for case in args.cases.split(","):
        if case == "qlora-70b":
            folder, _ = shape_folder(args.work, "70b", SHAPES)
            sets = {"lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.05, "lora.targets": "all-linear",
                    "model.quantize": "nf4", "model.activation_checkpointing": "true",
                    "model.offload_activations": "true", "optim.lr": 1e-4}
            for w in args.weights.split(","):
                results["runs"][f"{case}-{placement(w)[0]}"] = run(args, case, folder, data, 1, 2048, sets, w)
        elif case == "mezo-13b":
            folder, _ = shape_folder(args.work, "13b", SHAPES)
            sets = {"optim.kind": "mezo", "optim.lr": 1e-6, "mezo.eps": 1e-3}
            for B in batches(args, (1, 16)):
                for w in args.weights.split(","):
                    results["runs"][f"{case}-{placement(w)[0]}-B{B}"] = run(args, case, folder, data, B, 1024, sets, w)
        elif case == "mezo-30b":
            folder, _ = shape_folder(args.work, "33b", SHAPES)
            sets = {"optim.kind": "mezo", "optim.lr": 1e-6, "mezo.eps": 1e-3, "model.mlp_tile_rows": 4096}
            for B in batches(args, (8, 1)):  # the pair the target is about first: each run draws 32.5 G random values on the host
                for w in args.weights.split(","):
                    results["runs"][f"{case}-{placement(w)[0]}-B{B}"] = run(args, case, folder, data, B, 1024, sets, w)
        elif case in ("full-3b", "full-7b"):
            folder, _ = shape_folder(args.work, case[5:], SHAPES)
            sets = {"offload.optimizer": "cpu", "model.activation_checkpointing": "true", "optim.lr": 1e-5}
            if case == "full-7b":  # 8-bit moments: memtune plan puts the host at 63.8 GiB (101.2 with fp32 ones)
                sets["offload.moments"] = "int8"
            for w in args.weights.split(","):
                results["runs"][f"{case}-{placement(w)[0]}"] = run(args, case, folder, data, 4, 1024, sets, w)
    for key, r in results["runs"].items():  # each placement against the resident run of its case and batch
        twin = re.sub(r"-(cpu|ssd|cpu-r\d+|auto-[^-]+)(-B\d+)?$", r"-gpu\2", key)
        if key != twin and "tokens_per_second" in r and "tokens_per_second" in results["runs"].get(twin, {}):
            r["vs_resident"] = r["tokens_per_second"] / results["runs"][twin]["tokens_per_second"]
            print(f"{key}: {r['vs_resident']:.2f}x the resident run's tokens/s", flush=True)
    with open(os.path.join(args.out, "streaming_bench.json"), "w") as f:
        json.dump(results, f, indent=1)
    sys.exit(0 if all("error" not in r for r in results["runs"].values()) else 1)


if __name__ == "__main__":
    main()
