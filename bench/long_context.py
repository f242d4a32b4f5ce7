#!/usr/bin/env python3
"""The longest trainable context per GPU memory budget, memtune next to
Unsloth's published table, and tokens/s at long lengths next to PEFT.

Part 1 (issue: long context): Llama-3.1-8B's shape (random weights, its
llama3 rope scaling; max_position_embeddings raised so that lengths past
131072 are allowed, as Unsloth's table goes past it), QLoRA r=32 alpha 64 on
all linear modules, dropout 0, batch 1, activation checkpointing with the
layer inputs offloaded to host memory. For each budget that the GPU holds,
`memtune train` with `memory.budget: <budget>` and `train.seq_len: max`
picks the longest length its forecast fits (MLP tiles included) and trains
2 steps at it; the table gives that length, whether both steps ran, the
allocator's peak and the step time, with Unsloth's length and the ratio.
Unsloth's column is their published one (not run here).

Part 2 (--throughput): tokens/s at T = 32768 and 65536 (batch 1, the same
adapters, checkpointing), memtune against PEFT + bitsandbytes with
checkpointing and SDPA where PEFT fits, each side over 3 steps timed after
the first. Writes long_context.json.

  python3 bench/long_context.py --out $OUT [--budgets 16,24] [--throughput]
      [--inputs-path DIR [--ssd-layer-inputs N]] [--stop-after 1 | --resume]

A budget whose two steps take longer than one command may run (the GPU
machine's 10 minutes: 48 GiB, about 5 minutes a step) trains in two parts:
`--stop-after 1` trains the first step and leaves its state in --work (keep
it on a warm machine: a folder under .gpu/, which travels nowhere), then
`--resume` (same --work and --budgets) trains the second at the length the
first part chose; the row counts both parts' steps.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from full_ft import timed_run_sets, write_dataset  # noqa: E402
from lora_ft import run_peft  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("MT_BUILD_DIR", os.path.join(ROOT, "build"))
MEMTUNE = os.environ.get("MT_MEMTUNE_BIN", os.path.join(BUILD, "memtune"))
# Unsloth's published longest context (Llama 3.1 8B, QLoRA r=32 all linear, batch 1), by GPU memory in GB
UNSLOTH = {16: 40724, 24: 78475, 40: 153977, 48: 191728, 80: 342733}
GIB = 1024 ** 3


def model_folder(work):
    with open(os.path.join(ROOT, "configs", "models", "llama-3.1-8b", "config.json")) as f:
        cfg = json.load(f)
    cfg["max_position_embeddings"] = 1 << 20  # lengths past 131072, as the table's are
    folder = os.path.join(work, "llama-3.1-8b")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "config.json")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)
    return folder, path


def memtune_train(folder, data, run, sets, timeout):
    """memtune train of configs/llama-qlora.yaml with the shared settings and sets; its log and metrics."""
    base = timed_run_sets(folder, data, run, {
        "train.micro_batch": 1, "train.grad_accum": 1, "train.log_every": 1, "optim.warmup_steps": 0, "lora.r": 32,
        "lora.alpha": 64, "lora.dropout": 0, "model.activation_checkpointing": "true",
        "model.offload_activations": "true", **sets})
    cmd = [MEMTUNE, "train", os.path.join(ROOT, "configs", "llama-qlora.yaml")]
    for k, v in base.items():
        cmd += ["--set", f"{k}={v}"]
    t0 = time.time()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout} s"}
    log = out.stdout + out.stderr
    r = {"seconds": time.time() - t0, "returncode": out.returncode}
    m = re.search(r"train\.seq_len max: (\d+) tokens[^\n]*", log)
    if m:
        r["seq_len"], r["choice"] = int(m.group(1)), m.group(0)
    report = re.search(r"memory \(GPU\): (.*)", log)
    if report:
        r["allocator_peak"] = sum(float(p) for p in re.findall(r"\(peak ([\d.]+)\)", report.group(1))) * 2 ** 20
    metrics = os.path.join(run, "metrics.jsonl")
    recs = [json.loads(line) for line in open(metrics)] if os.path.exists(metrics) else []
    r["steps"] = len(recs)
    r["elapsed"] = [x["elapsed_seconds"] for x in recs]
    if len(recs) >= 2:  # the steps after the first
        r["step_seconds"] = (recs[-1]["elapsed_seconds"] - recs[0]["elapsed_seconds"]) / (len(recs) - 1)
    if out.returncode:
        r["error"] = log.strip().splitlines()[-1] if log.strip() else "failed"
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="16,24,40,48,80",
                    help="GiB, those above the GPU's memory are skipped; empty: none. A budget below a "
                         "card's size (15: a 16 GB card less its CUDA context) is compared with that card's row")
    ap.add_argument("--throughput", action="store_true", help="also tokens/s at T=32768 and 65536 against PEFT")
    ap.add_argument("--lengths", default="32768,65536")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per memtune run")
    ap.add_argument("--inputs-path", default="",
                    help="offload.path for the budgets' runs: where host memory binds, train.seq_len: max puts the "
                         "last layer inputs in a file there (model.ssd_layer_inputs)")
    ap.add_argument("--ssd-layer-inputs", type=int, default=0, help="with --inputs-path: that count, fixed")
    ap.add_argument("--stop-after", type=int, default=0,
                    help="stop each budget's run after this many steps, its state kept in --work for --resume")
    ap.add_argument("--resume", action="store_true",
                    help="go on with the budgets' runs that --stop-after left in --work, at the lengths they chose")
    ap.add_argument("--work", default="/tmp/mt-long-context")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/mt-long-context"))
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    folder, config_path = model_folder(args.work)
    data = os.path.join(args.work, "tokens.h5")
    write_dataset(data, 3 * 800000 + 10, 128256)
    total = int(subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"],
                               capture_output=True, text=True).stdout.split()[0]) / 1024
    results = {"gpu_memory_gib": total, "budgets": {}, "throughput": {}}
    print(f"{'budget':>7s} {'memtune T':>10s} {'2 steps':>8s} {'peak':>10s} {'step s':>8s} {'Unsloth T':>10s} {'ratio':>6s}")
    for b in (int(x) for x in args.budgets.split(",") if x):
        if b > total:
            print(f"{b:5d} GiB: skipped, the GPU has {total:.0f} GiB")
            continue
        sets = {"memory.budget": f"{b}GiB", "train.seq_len": "max", "train.steps": 2}
        if args.inputs_path:
            sets["offload.path"] = args.inputs_path
        if args.inputs_path and args.ssd_layer_inputs:
            sets["model.ssd_layer_inputs"] = args.ssd_layer_inputs
        run = os.path.join(args.work, f"run-{b}")
        part = os.path.join(run, "long-context-part.json")  # what the first part chose
        if args.stop_after:
            sets["train.stop_after"] = args.stop_after
        if args.resume:
            if not os.path.exists(part):
                print(f"{b:5d} GiB: nothing to resume in {run} (run --stop-after first, with the same --work)")
                continue
            with open(part) as f:
                first = json.load(f)
            sets.update({"train.resume": "auto", "train.seq_len": first["seq_len"]})
            for k in ("model.mlp_tile_rows", "model.deterministic_attention", "offload.optimizer",
                      "model.gpu_layer_inputs", "model.ssd_layer_inputs"):
                if k in first.get("chosen", {}):
                    sets[k] = first["chosen"][k]
        r = memtune_train(folder, data, run, sets, args.timeout)
        if args.stop_after and "seq_len" in r:
            chosen = dict(re.findall(r"\((model\.[a-z_]+|offload\.optimizer): ([a-z0-9]+)[;)]", r.get("choice", "")))
            with open(part, "w") as f:
                json.dump({"seq_len": r["seq_len"], "chosen": chosen, "steps": r.get("steps", 0)}, f)
        if args.resume:
            r["seq_len"], r["choice"] = first["seq_len"], f"resumed at the first part's {first['seq_len']} tokens"
            # this part's elapsed time starts again at its first step: its steps' own times
            own = r.get("elapsed", [])[first.get("steps", 0):]
            times = own[:1] + [b2 - a2 for a2, b2 in zip(own, own[1:])]
            if times:
                r["step_seconds"] = sum(times) / len(times)
        results["budgets"][b] = r
        T = r.get("seq_len", 0)
        ok = r.get("steps", 0) >= 2 and "error" not in r
        row = min([k for k in UNSLOTH if k >= b] or [max(UNSLOTH)])  # a budget below a card's size: that card's row
        r["unsloth_row_gb"] = row
        first_part = args.stop_after and r.get("steps", 0) >= 1 and "error" not in r  # the rest by --resume
        if first_part and "step_seconds" not in r:
            r["step_seconds"] = r["elapsed"][0]
        peak = f"{r['allocator_peak'] / GIB:.2f} GiB" if "allocator_peak" in r else "-"
        step = f"{r['step_seconds']:.1f}" if "step_seconds" in r else "-"
        print(f"{b:5d} GiB {T:10d} {'yes' if ok else 'part 1' if first_part else 'NO':>8s} {peak:>10s} {step:>8s} "
              f"{UNSLOTH[row]:10d} {T / UNSLOTH[row]:6.2f}" + ("" if ok or first_part else f"  {r.get('error', '')[:150]}"),
              flush=True)
    if args.throughput:
        for T in (int(x) for x in args.lengths.split(",")):
            m = memtune_train(folder, data, os.path.join(args.work, f"run-T{T}"),
                              {"train.seq_len": T, "train.steps": 3}, args.timeout)
            if "step_seconds" in m:
                m["tokens_per_second"] = T / m["step_seconds"]
            ns = argparse.Namespace(steps=3, warmup=1, B=1, T=T, r=32, alpha=64, dropout=0.0)
            p = run_peft(ns, config_path, True, True)
            results["throughput"][T] = {"memtune": m, "peft_bnb": p}
            mt = f"{m['tokens_per_second']:.0f} tok/s, {m['allocator_peak'] / GIB:.2f} GiB" \
                if "tokens_per_second" in m and "allocator_peak" in m else f"failed: {m.get('error', '')[:120]}"
            pt = f"{p['tokens_per_second']:.0f} tok/s, {p['allocator_peak'] / GIB:.2f} GiB" \
                if "tokens_per_second" in p else f"failed: {p.get('error', '')[:120]}"
            print(f"T={T}: memtune {mt}; PEFT + bitsandbytes (checkpointing, SDPA) {pt}", flush=True)
    with open(os.path.join(args.out, "long_context.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
