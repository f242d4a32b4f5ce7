#!/usr/bin/env python3
"""GaLore, memtune vs memtune AdamW and vs galore-torch, in one run on one
GPU.

Shapes TinyLlama-1.1B and Llama-2-7B (random initialisation), B=4, T=1024,
activation checkpointing on, every weight trained. Runs per shape: `memtune
train` with optim.kind adamw (fp32 master and moments: the 7B does not fit
in 80 GB, and the run says so), memtune GaLore at each rank (--ranks) with
fp32 and int8 moments (--moments), and bench/torch_galore.py (galore-torch
with per-layer updates) at each rank where it runs. Step times are measured
after the warm-up steps; the first step computes the projectors, and its
refresh cost is reported separately: memtune's from metrics.jsonl
(projector_refresh_seconds, the refresh alone), galore-torch's as its first
step minus its mean step. Memory: each side's allocator peak (weights
included) and the device's used memory minus what was used before the
process. Target (issue 6): 7B GaLore under 22 GiB peak GPU memory. Writes
galore_bench.json and prints the table and the ratios.
"""
import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from full_ft import PeakSampler, mfu_text, timed_run_sets, write_dataset  # noqa: E402
from lora_ft import SHAPES, shape_folder, train_and_time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("MT_BUILD_DIR", os.path.join(ROOT, "build"))
GIB = 1024 ** 3


def run_memtune(args, folder, data, run, kind, rank=None, moments=None, refresh="randomized"):
    cmd = [os.path.join(BUILD, "memtune"), "train", os.path.join(ROOT, "configs", "galore.yaml")]
    sets = timed_run_sets(folder, data, run, {
        "train.steps": args.steps, "train.micro_batch": args.B, "train.seq_len": args.T, "train.log_every": 1,
        "optim.lr": args.lr, "optim.warmup_steps": 0, "model.activation_checkpointing": "true"})
    if kind == "adamw":
        sets.update({"optim.kind": "adamw", "optim.grad_clip": 1.0})
    else:
        sets.update({"galore.rank": rank, "galore.moments": moments, "galore.refresh": refresh,
                     "galore.update_gap": args.update_gap, "galore.scale": args.scale})
    r = train_and_time(args, cmd, sets, run, ("GaLore", "refreshed", "memory (GPU)"))
    if "error" not in r and kind != "adamw":
        first = json.loads(open(os.path.join(run, "metrics.jsonl")).readline())
        r["refresh_seconds"] = first.get("projector_refresh_seconds")
    return r


def run_torch(args, config_path, rank, int8):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "torch_galore.py"), "--config", config_path, "--steps",
           str(args.steps), "--warmup", str(args.warmup), "--B", str(args.B), "--T", str(args.T), "--rank",
           str(rank), "--update-gap", str(args.update_gap), "--scale", str(args.scale), "--lr", str(args.lr),
           "--checkpointing"] + (["--int8"] if int8 else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.torch_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish {args.steps} steps within {args.torch_timeout} s"}
    if out.returncode:
        print(out.stderr[-3000:])
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["refresh_seconds"] = (r["first_step_ms"] - r["step_ms"]) / 1000
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="TinyLlama-1.1B,Llama-2-7B")
    ap.add_argument("--ranks", default="128,512")
    ap.add_argument("--moments", default="fp32,int8")
    ap.add_argument("--torch-ranks", default="128,512", help="galore-torch ranks ('' for none)")
    ap.add_argument("--torch-int8", action="store_true", help="galore-torch with GaLoreAdamW8bit")
    ap.add_argument("--svd", action="store_true", help="also memtune with galore.refresh: svd at the first rank")
    ap.add_argument("--no-adamw", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--update-gap", type=int, default=200)
    ap.add_argument("--torch-timeout", type=int, default=300)
    ap.add_argument("--work", default="/tmp/mt-galore-bench")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/mt-galore-bench"))
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    data = os.path.join(args.work, "tokens.h5")
    write_dataset(data, (args.steps + 10) * args.B * (args.T + 1), 32000)
    results = {}
    path = os.path.join(args.out, "galore_bench.json")
    for shape in args.shapes.split(","):
        folder, config_path = shape_folder(args.work, shape)
        runs = {}

        def record(name, r):
            runs[name] = r
            print(f"{shape} {name}: {json.dumps(r)}", flush=True)
            results[shape] = runs
            with open(path, "w") as f:
                json.dump(results, f, indent=1)

        if not args.no_adamw:
            record("memtune AdamW", run_memtune(args, folder, data, os.path.join(args.work, "run"), "adamw"))
        for rank in [int(r) for r in args.ranks.split(",") if r]:
            for moments in args.moments.split(","):
                record(f"memtune GaLore r{rank} {moments}",
                       run_memtune(args, folder, data, os.path.join(args.work, "run"), "galore", rank, moments))
        if args.svd:
            rank = int(args.ranks.split(",")[0])
            record(f"memtune GaLore r{rank} fp32 svd refresh",
                   run_memtune(args, folder, data, os.path.join(args.work, "run"), "galore", rank, "fp32", "svd"))
        for rank in [int(r) for r in args.torch_ranks.split(",") if r]:
            name = f"galore-torch r{rank} {'int8' if args.torch_int8 else 'fp32'}"
            record(name, run_torch(args, config_path, rank, args.torch_int8))
        print(f"\n{shape}, B={args.B} T={args.T}, checkpointing, {args.steps} steps (timed after {args.warmup})")
        print(f"{'':34s} {'tokens/s':>9s} {'ms':>8s} {'allocator peak':>15s} {'device peak':>12s} {'refresh s':>10s}")
        for name, r in runs.items():
            if "error" in r:
                print(f"{name:34s} failed: {r['error']}")
                continue
            refresh = r.get("refresh_seconds")
            print(f"{name:34s} {r['tokens_per_second']:9.0f} {r['step_ms']:8.1f} {r['allocator_peak'] / GIB:11.2f} GiB"
                  f" {r['device_peak'] / GIB:8.2f} GiB {refresh if refresh is not None else float('nan'):10.2f}"
                  f"  {mfu_text(SHAPES[shape], args.T, 'full', r['tokens_per_second'])}")  # every weight trained
        ratios = {}
        for name, r in runs.items():
            if "error" in r or not name.startswith("galore-torch"):
                continue
            ours = runs.get(name.replace("galore-torch", "memtune GaLore"))
            if ours and "error" not in ours:
                ratios[f"{name}: tokens/s memtune / galore-torch"] = ours["tokens_per_second"] / r["tokens_per_second"]
                ratios[f"{name}: device peak memtune / galore-torch"] = ours["device_peak"] / r["device_peak"]
        adamw = runs.get("memtune AdamW")
        for name, r in runs.items():
            if adamw and "error" not in adamw and "error" not in r and name.startswith("memtune GaLore"):
                ratios[f"{name}: device peak / memtune AdamW"] = r["device_peak"] / adamw["device_peak"]
                ratios[f"{name}: tokens/s / memtune AdamW"] = r["tokens_per_second"] / adamw["tokens_per_second"]
        for k, v in ratios.items():
            print(f"  {k}: x{v:.3f}")
        results[shape + " ratios"] = ratios
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
