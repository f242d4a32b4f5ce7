#!/usr/bin/env python3
"""MeZO, memtune vs PyTorch in-place MeZO and vs memtune's own forward pass,
in one run on one GPU.

Shapes TinyLlama-1.1B and Llama-2-7B (random initialisation), B=4, T=1024,
every weight trained, one direction per step (two forward passes), eps 1e-3,
bf16 weights. Runs per shape: mt_forward_bench (memtune's forward-only
model: ms per forward pass, allocator peak = memtune's inference peak),
`memtune train` with optim.kind: mezo, and bench/torch_mezo.py. Step times
are measured after the warm-up steps. Memory: each side's allocator peak
(weights included) and the device's used memory minus what was used before
the process (nvidia-smi samples). Targets (issue 5): MeZO step <= 1.15 x two
forward passes, MeZO peak <= 1.05 x inference peak, tokens/s >= 1.5 x
PyTorch MeZO's. Writes mezo_bench.json and prints the ratios.
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


def failed(out):
    print(out.stderr[-3000:])
    return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}


def run_forward(args, folder):
    sampler = PeakSampler()
    out = subprocess.run([os.path.join(BUILD, "mt_forward_bench"), folder, str(args.B), str(args.T),
                          str(args.forward_iters)], capture_output=True, text=True)
    peak = sampler.finish()
    if out.returncode:
        return failed(out)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["device_peak"] = peak
    return r


def run_memtune(args, folder, data, run):
    cmd = [os.path.join(BUILD, "memtune"), "train", os.path.join(ROOT, "configs", "mezo.yaml")]
    sets = timed_run_sets(folder, data, run, {
        "train.steps": args.steps, "train.micro_batch": args.B, "train.seq_len": args.T, "train.grad_accum": 1,
        "train.log_every": 1, "optim.lr": args.lr, "optim.warmup_steps": 0, "mezo.eps": args.eps})
    return train_and_time(args, cmd, sets, run, ("MeZO", "memory (GPU)"))


def run_torch(args, config_path):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "torch_mezo.py"), "--config", config_path, "--steps",
           str(args.steps), "--warmup", str(args.warmup), "--B", str(args.B), "--T", str(args.T), "--eps",
           str(args.eps), "--lr", str(args.lr)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return failed(out)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="TinyLlama-1.1B,Llama-2-7B")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--forward-iters", type=int, default=10)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--skip-torch", action="store_true",
                    help="memtune's runs alone (an A/B of two builds through MT_BUILD_DIR)")
    ap.add_argument("--work", default="/tmp/mt-mezo-bench")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/mt-mezo-bench"))
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    data = os.path.join(args.work, "tokens.h5")
    write_dataset(data, (args.steps + 10) * args.B * (args.T + 1), 32000)
    results = {}
    for shape in args.shapes.split(","):
        folder, config_path = shape_folder(args.work, shape)
        runs = {"memtune forward": run_forward(args, folder)}
        print(f"{shape} memtune forward: {json.dumps(runs['memtune forward'])}", flush=True)
        runs["memtune MeZO"] = run_memtune(args, folder, data, os.path.join(args.work, f"run-{shape}"))
        print(f"{shape} memtune MeZO: {json.dumps(runs['memtune MeZO'])}", flush=True)
        runs["PyTorch MeZO"] = {"error": "not run (--skip-torch)"} if args.skip_torch else run_torch(args, config_path)
        print(f"{shape} PyTorch MeZO: {json.dumps(runs['PyTorch MeZO'])}", flush=True)
        results[shape] = runs
        fwd, ours, theirs = runs["memtune forward"], runs["memtune MeZO"], runs["PyTorch MeZO"]
        print(f"\n{shape}, B={args.B} T={args.T}, MeZO on every weight, 1 direction, {args.steps} steps "
              f"(timed after {args.warmup})")
        print(f"{'':18s} {'tokens/s':>9s} {'ms':>8s} {'allocator peak':>15s} {'device peak':>12s}")
        if "forward_ms" in fwd:
            print(f"{'memtune forward':18s} {args.B * args.T / fwd['forward_ms'] * 1000:9.0f} "
                  f"{fwd['forward_ms']:8.1f} {fwd['allocator_peak'] / GIB:11.2f} GiB {fwd['device_peak'] / GIB:8.2f} GiB")
        for name in ("memtune MeZO", "PyTorch MeZO"):
            r = runs[name]
            if "error" in r:
                print(f"{name:18s} failed: {r['error']}")
                continue
            print(f"{name:18s} {r['tokens_per_second']:9.0f} {r['step_ms']:8.1f} {r['allocator_peak'] / GIB:11.2f} GiB"
                  f" {r['device_peak'] / GIB:8.2f} GiB  {mfu_text(SHAPES[shape], args.T, 'mezo', r['tokens_per_second'])}")
        ratios = {}
        if "forward_ms" in fwd and "step_ms" in ours:
            ratios["MeZO step / two forward passes"] = ours["step_ms"] / (2 * fwd["forward_ms"])
            ratios["MeZO allocator peak / inference allocator peak"] = ours["allocator_peak"] / fwd["allocator_peak"]
            ratios["MeZO device peak / inference device peak"] = ours["device_peak"] / fwd["device_peak"]
        if "step_ms" in ours and "step_ms" in theirs:
            ratios["tokens/s memtune / PyTorch"] = ours["tokens_per_second"] / theirs["tokens_per_second"]
            ratios["allocator peak memtune / PyTorch"] = ours["allocator_peak"] / theirs["allocator_peak"]
            ratios["device peak memtune / PyTorch"] = ours["device_peak"] / theirs["device_peak"]
        for k, v in ratios.items():
            print(f"  {k}: x{v:.3f}")
        results[shape + " ratios"] = ratios
        with open(os.path.join(args.out, "mezo_bench.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
