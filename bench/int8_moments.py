#!/usr/bin/env python3
"""8-bit AdamW moments in the offload store against fp32 ones, over a run.

Issue 27: "7B in host memory with int8 moments: at most 8 bytes a parameter
of host memory, GPU memory unchanged; losses within the 8-bit reference's
tolerance over 200 steps of the quickstart data".

Runs `memtune train configs/full-offload-cpu.yaml` on a shape's random
initialisation over the quickstart's tokenized Bible (data/kjv.h5, made with
`memtune tokenize` from data/kjv.txt when missing): B=8, T=128, lr 3e-4
(cosine, 10 warm-up steps), clipping 1.0, an eval every 50 steps on 4
batches of the held-out 1%, the training loss every 10 steps. Runs (--runs,
in order):

  int8    offload.moments: int8, the whole run in one command;
  int8-1  the same, steps 1 .. --split, then a checkpoint (train.stop_after);
  int8-2  its resume (train.resume: auto) to the end: int8-1 and int8-2 in two
          commands keep each under the device tool's 600 s where the whole
          run is not (7B: about 3.2 s a step);
  fp32    the reference: fp32 moments, with the state where --ref-optimizer
          says (none: AdamW on the GPU, where it fits, as on an H200 at 7B;
          cpu: the same store, fp32);
  compare the two runs' losses (any earlier command's, read from --work).

A run's host RSS peak (pinned pages included) and memtune's allocator peak
are recorded, and the int8 run's host bytes a parameter. The comparison
gives each eval and every tenth training loss, their relative differences
and the largest; it passes when the largest eval difference is within
--eval-tol and the largest training difference within --train-tol
(defaults: 0.75% and 1.5%, the differences the same comparison gave on the
TinyLlama-1.1B shape on an H100 on 2026-12-07).

--bnb adds the 8-bit reference itself: PyTorch's fused AdamW against
bitsandbytes' AdamW8bit (bench/torch_int8_moments.py) on the same shape,
tokens, batch, schedule and clipping, in the same call: their own largest
differences then replace the default tolerances (where they are larger).
It needs bitsandbytes (.whl/bnb carried) and, for the fp32 AdamW, room for
16 bytes a parameter on the GPU (not 7B on an H100: --bnb-shape names a
smaller shape).

Writes int8_moments.json to --out and prints the table.
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_ft import BASE, SHAPES, HostSampler, shape_folder  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("MT_BUILD_DIR", os.path.join(ROOT, "build"))
MEMTUNE = os.environ.get("MT_MEMTUNE_BIN", os.path.join(BUILD, "memtune"))
GIB = 1024 ** 3
RUNS = ("int8", "int8-1", "int8-2", "fp32", "compare")
# bench/lora_ft.py's shapes, and a small one for a smoke run of this script on the CPU
TABLE = dict(SHAPES, smoke=dict(BASE, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2))


def run_sets(args, folder, run_dir, moments, optimizer):
    return {"model.path": folder, "model.init": "random", "data.train": args.data, "data.eval_fraction": 0.01,
            "train.steps": args.steps, "train.micro_batch": args.B, "train.seq_len": args.T,
            "train.eval_every": args.eval_every, "train.eval_batches": 4, "train.log_every": 10,
            "optim.lr": args.lr, "optim.warmup_steps": 10, "checkpoint.every": 0, "checkpoint.final": "false",
            "output.save_model": "false", "output.dir": run_dir, "offload.optimizer": optimizer,
            "offload.moments": moments, "train.device": args.device}


def memtune_run(args, name, sets):
    """One `memtune train`: its log in --out, its host RSS peak sampled."""
    cmd = [MEMTUNE, "train", os.path.join(ROOT, "configs", "full-offload-cpu.yaml")]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    print("$ " + " ".join(cmd), flush=True)
    log_path = os.path.join(args.out, f"int8_moments-{name}.log")
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        host = HostSampler(proc.pid)
        try:
            proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        host_peak = host.finish()
    seconds = time.time() - start
    lines = open(log_path).read().splitlines()
    res = {"run": name, "seconds": round(seconds, 1), "host_peak": host_peak, "returncode": proc.returncode,
           "log": [line for line in lines if any(m in line for m in ("resuming", "stopping", "host memory",
                                                                        "offload", "error"))][-12:]}
    if proc.returncode:
        res["error"] = lines[-1] if lines else "failed"
        print("\n".join(lines[-20:]))
    return res


def metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    return {r["step"]: r for r in (json.loads(line) for line in open(path) if line.strip())}


def compare(int8, fp32):
    """Each eval and logged training loss of both runs, and the differences."""
    rows, worst = [], {"eval": 0.0, "train": 0.0}
    for step in sorted(set(int8) & set(fp32)):
        a, b = int8[step], fp32[step]
        row = {"step": step, "train_int8": a["loss"], "train_fp32": b["loss"],
               "train_diff": (a["loss"] - b["loss"]) / b["loss"]}
        worst["train"] = max(worst["train"], abs(row["train_diff"]))
        if "eval_loss" in a and "eval_loss" in b:
            row.update(eval_int8=a["eval_loss"], eval_fp32=b["eval_loss"],
                       eval_diff=(a["eval_loss"] - b["eval_loss"]) / b["eval_loss"])
            worst["eval"] = max(worst["eval"], abs(row["eval_diff"]))
        rows.append(row)
    return rows, worst


def params_of(config):
    c = config
    h, f, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    return n * layer + h + v * h * (1 if c.get("tie_word_embeddings") else 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/mt-int8-moments")
    ap.add_argument("--work", default="/tmp/mt-int8-moments-work",
                    help="model folder and run outputs (kept between commands for int8-2 and compare)")
    ap.add_argument("--shape", default="TinyLlama-1.1B", help="bench/lora_ft.py's shapes, or smoke (tiny, for the CPU)")
    ap.add_argument("--runs", default="int8,fp32,compare", help=f"comma-separated, in order, of {', '.join(RUNS)}")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--split", type=int, default=100, help="the last step of int8-1")
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--ref-optimizer", default="none", choices=("none", "cpu"),
                    help="where the fp32 reference keeps AdamW's state")
    ap.add_argument("--device", default="gpu", help="train.device (cpu: a smoke run of this script)")
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "kjv.h5"))
    ap.add_argument("--timeout", type=int, default=560, help="seconds a memtune command may run")
    ap.add_argument("--eval-tol", type=float, default=0.0075)
    ap.add_argument("--train-tol", type=float, default=0.015)
    ap.add_argument("--bnb", action="store_true", help="measure PyTorch AdamW against bitsandbytes' AdamW8bit")
    ap.add_argument("--bnb-shape", default=None, help="the shape of that measurement (default --shape)")
    args = ap.parse_args()
    runs = [r for r in args.runs.split(",") if r]
    for r in runs:
        if r not in RUNS:
            raise SystemExit(f"--runs: unknown run {r!r} (one of {', '.join(RUNS)})")
    if not 0 < args.split < args.steps and ("int8-1" in runs or "int8-2" in runs):
        raise SystemExit(f"--split {args.split} must lie between 0 and --steps {args.steps}")
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    if not os.path.exists(args.data):
        text = os.path.splitext(args.data)[0] + ".txt"
        if not os.path.exists(text):
            raise SystemExit(f"{args.data} and {text} are missing: carry data/kjv.txt (scripts/quickstart.sh makes it)")
        if subprocess.run([MEMTUNE, "tokenize", "--input", text, "--output", args.data]).returncode:
            raise SystemExit(f"could not tokenize {text} into {args.data} (memtune's error above)")
    if args.shape not in TABLE:
        raise SystemExit(f"--shape {args.shape}: one of {', '.join(TABLE)}")
    folder, config_path = shape_folder(args.work, args.shape, TABLE)
    n_params = params_of(json.load(open(config_path)))
    dirs = {"int8": os.path.join(args.work, "run-int8"), "fp32": os.path.join(args.work, "run-fp32")}
    result_path = os.path.join(args.out, "int8_moments.json")
    old_path = os.path.join(args.work, "int8_moments.json")  # the earlier commands' records
    result = json.load(open(old_path)) if os.path.exists(old_path) else {}
    result.update(shape=args.shape, parameters=n_params, steps=args.steps, B=args.B, T=args.T, lr=args.lr)
    result.setdefault("runs", {})
    status = 0
    for r in runs:
        if r == "compare":
            continue
        moments = "fp32" if r == "fp32" else "int8"
        optimizer = args.ref_optimizer if r == "fp32" else "cpu"
        sets = run_sets(args, folder, dirs[moments], moments, optimizer)
        if r in ("int8", "int8-1", "fp32"):
            subprocess.run(["rm", "-rf", dirs[moments]], check=True)
        if r == "int8-1":
            sets.update({"checkpoint.every": args.split, "train.stop_after": args.split})
        if r == "int8-2":
            if not os.path.isdir(dirs["int8"]):
                raise SystemExit(f"int8-2 resumes int8-1's run in {dirs['int8']}, which is missing")
            sets["train.resume"] = "auto"
        res = memtune_run(args, r, sets)
        res["last_step"] = max(metrics(dirs[moments]) or [0])
        if r != "fp32":
            res["host_bytes_per_parameter"] = res["host_peak"] / n_params
        result["runs"][r] = res
        if res["returncode"] or (r == "int8-1" and res["last_step"] != args.split):
            status = 1
        print(f"{r}: {res['seconds']} s, last step {res['last_step']}, host RSS peak {res['host_peak'] / GIB:.2f} GiB"
              + (f" ({res['host_bytes_per_parameter']:.2f} B a parameter)" if r != "fp32" else "")
              + (f", ERROR {res['error']}" if res.get("error") else ""), flush=True)
    if args.bnb:
        cmd = [sys.executable, os.path.join(ROOT, "bench", "torch_int8_moments.py"), "--shape",
               args.bnb_shape or args.shape, "--data", args.data, "--steps", str(args.steps), "--B", str(args.B),
               "--T", str(args.T), "--lr", str(args.lr), "--eval-every", str(args.eval_every)]
        print("$ " + " ".join(cmd), flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode or not lines:
            print(out.stderr[-3000:])
            result["bnb"] = {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
            status = 1
        else:
            result["bnb"] = json.loads(lines[-1])
    if "compare" in runs:
        int8, fp32 = metrics(dirs["int8"]), metrics(dirs["fp32"])
        if not int8 or not fp32 or max(int8) != args.steps or max(fp32) != args.steps:
            print(f"compare: both runs must reach step {args.steps} (int8: {max(int8 or [0])}, "
                  f"fp32: {max(fp32 or [0])})")
            status = 1
        else:
            rows, worst = compare(int8, fp32)
            tol = {"eval": args.eval_tol, "train": args.train_tol, "from": "defaults"}
            bnb = result.get("bnb", {})
            if "worst" in bnb:
                tol = {"eval": max(args.eval_tol, bnb["worst"]["eval"]),
                       "train": max(args.train_tol, bnb["worst"]["train"]), "from": "bitsandbytes and defaults"}
            ok = worst["eval"] <= tol["eval"] and worst["train"] <= tol["train"]
            result["compare"] = {"rows": rows, "worst": worst, "tolerance": tol, "pass": ok}
            print(f"\n{args.shape}, {args.steps} steps, B={args.B}, T={args.T}: int8 moments against fp32")
            print("| step | train fp32 | train int8 | diff | eval fp32 | eval int8 | diff |")
            print("|---|---|---|---|---|---|---|")
            for row in rows:
                ev = (f"{row['eval_fp32']:.4f} | {row['eval_int8']:.4f} | {100 * row['eval_diff']:+.3f}%"
                      if "eval_diff" in row else " | | ")
                print(f"| {row['step']} | {row['train_fp32']:.4f} | {row['train_int8']:.4f} | "
                      f"{100 * row['train_diff']:+.3f}% | {ev} |")
            print(f"largest: eval {100 * worst['eval']:.2f}% (tolerance {100 * tol['eval']:.2f}%), training "
                  f"{100 * worst['train']:.2f}% (tolerance {100 * tol['train']:.2f}%; {tol['from']}): "
                  + ("PASS" if ok else "FAIL"))
            if not ok:
                status = 1
    for path in (result_path, old_path):
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    sys.exit(status)


if __name__ == "__main__":
    main()
