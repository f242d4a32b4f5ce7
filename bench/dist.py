#!/usr/bin/env python3
"""Data parallelism on the GPUs of one machine, in one run.

1. Loss curves: the quickstart's tiny model on the KJV data, LoRA, full
   fine-tuning with ZeRO-2 and MeZO, on 2 GPUs against 1 GPU with twice the
   gradient accumulation (the same windows each step): the largest relative
   difference of the losses, which should be bf16 rounding. Also GaLore
   with ZeRO-2 (and offload) by --variants, its 1-GPU run with twice the
   micro-batch (GaLore takes no accumulation).
2. Scaling: the TinyLlama-1.1B shape (random init), B=4 rows of T=1024 per
   GPU, activation checkpointing: tokens/s on 1 GPU and on 2, and the
   efficiency tokens/s(2) / (2 x tokens/s(1)), for LoRA, full fine-tuning
   with ZeRO-2 and MeZO. Targets (issue 8): >= 0.9 for LoRA and full
   fine-tuning, >= 0.95 for MeZO.

3. Path (--parts path, one GPU is enough): each ZeRO variant as one process
   (the same code: streamed gradients, the reduce a copy) against the same
   run without ZeRO, same shape: the step time ratio and allocator peaks,
   what the ZeRO code costs on the compute side.

Ranks start with memtune's MT_RANK / MT_WORLD_SIZE / MT_RENDEZVOUS variables
(docs/multi-gpu.md), or with mpirun when MT_DIST_LAUNCHER=mpirun. With
--shared-gpu (curves only) every rank runs on GPU 0, NCCL between them over
its socket transport on the loopback (each rank its own NCCL_HOSTID): the
loss curves of the NCCL code path on a machine with one GPU.
Writes dist_bench.json to --out and prints a table.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from full_ft import write_dataset  # noqa: E402
from lora_ft import shape_folder  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("MT_BUILD_DIR", os.path.join(ROOT, "build"))


SHARED_GPU = {"MT_LOCAL_RANK": "0", "MT_LOCAL_WORLD_SIZE": "1", "NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1",
              "NCCL_IB_DISABLE": "1", "NCCL_NET": "Socket", "NCCL_SOCKET_IFNAME": "lo"}
shared_gpu = False
# GaLore takes no accumulation: its 1-GPU curve doubles the micro-batch instead (the same windows)
GALORE = ["--set", "optim.kind=galore", "--set", "optim.grad_clip=0"]


def quickstart_micro_batch():
    with open(os.path.join(ROOT, "configs", "quickstart.yaml")) as f:
        return int(re.search(r"^\s*micro_batch:\s*(\d+)", f.read(), re.M).group(1))


def launch(n, args_list, log, timeout):
    """memtune with args_list on n GPUs (n ranks on GPU 0 with --shared-gpu); returns the exit status."""
    exe = [os.path.join(BUILD, "memtune")] + args_list
    env = dict(os.environ)
    with open(log, "w") as out:
        if n == 1:
            return subprocess.run(exe, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
        if os.environ.get("MT_DIST_LAUNCHER") == "mpirun":
            # (--bind-to none: Open MPI binds each of 2 ranks to one core, which starves offload's CPU AdamW)
            cmd = ["mpirun", "-np", str(n), "--allow-run-as-root", "--bind-to", "none", "-x", "LD_LIBRARY_PATH", "-x",
                   "NCCL_NVLS_ENABLE"]
            return subprocess.run(cmd + exe, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
        rdv = tempfile.mkdtemp(prefix="mt-rdv-")
        procs = []
        for r in range(n):
            e = dict(env, MT_RANK=str(r), MT_WORLD_SIZE=str(n), MT_LOCAL_RANK=str(r), MT_RENDEZVOUS=rdv)
            if shared_gpu:
                e.update(SHARED_GPU, NCCL_HOSTID=f"memtune-bench-rank{r}")
            procs.append(subprocess.Popen(exe, stdout=out, stderr=subprocess.STDOUT, env=e))
        codes = [p.wait(timeout=timeout) for p in procs]
        return max(codes)


def losses(run):
    return [json.loads(line)["loss"] for line in open(os.path.join(run, "metrics.jsonl"))]


def timing(run, steps, warmup):
    recs = {r["step"]: r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl")))}
    dt = recs[steps]["elapsed_seconds"] - recs[warmup]["elapsed_seconds"]
    return dt / (steps - warmup), recs[steps]["peak_memory_bytes"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--kjv", default="/tmp/kjv.h5")
    ap.add_argument("--parts", default="curves,scaling")
    ap.add_argument("--variants", default="lora,full-zero2,mezo",
                    help="of lora, full-zero1, full-zero2, full-zero1-offload, full-zero2-offload, mezo, "
                    "galore-zero2, galore-zero2-offload")
    ap.add_argument("--shared-gpu", action="store_true", help="every rank on GPU 0 (loss curves only)")
    ap.add_argument("--out", default=".")
    ap.add_argument("--work", default="/tmp/mt-dist-bench")
    args = ap.parse_args()
    global shared_gpu
    shared_gpu = args.shared_gpu
    if shared_gpu and (args.parts != "curves" or os.environ.get("MT_DIST_LAUNCHER") == "mpirun"):
        ap.error("--shared-gpu times nothing and starts the ranks itself: use it with --parts curves, without mpirun")
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    n = args.gpus
    res = {"gpus": n, "launcher": os.environ.get("MT_DIST_LAUNCHER", "env"), "shared_gpu": shared_gpu,
           "curves": {}, "scaling": {}}
    variants = {
        "lora": ["--set", "lora.r=8", "--set", "lora.dropout=0"],
        "full-zero2": ["--set", "dist.zero_stage=2"],
        "full-zero1": ["--set", "dist.zero_stage=1"],
        "full-zero2-offload": ["--set", "dist.zero_stage=2", "--set", "offload.optimizer=cpu"],
        "full-zero1-offload": ["--set", "dist.zero_stage=1", "--set", "offload.optimizer=cpu"],
        "mezo": ["--set", "optim.kind=mezo", "--set", "optim.lr=1e-4", "--set", "mezo.samples=1"],
        "galore-zero2": GALORE + ["--set", "dist.zero_stage=2"],
        "galore-zero2-offload": GALORE + ["--set", "dist.zero_stage=2", "--set", "offload.optimizer=cpu"],
    }
    variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}

    def alone(extra):  # the 1-GPU reference runs without ZeRO (in one process it only changes the code path)
        return [x for i, x in enumerate(extra) if not (x.startswith("dist.zero_stage") or
                                                       (x == "--set" and extra[i + 1].startswith("dist.zero_stage")))]
    if "curves" in args.parts:
        base = ["train", os.path.join(ROOT, "configs", "quickstart.yaml"), "--set", f"data.train={args.kjv}",
                "--set", "train.device=gpu", "--set", "train.steps=40", "--set", "train.log_every=1",
                "--set", "train.eval_every=0", "--set", "checkpoint.every=0", "--set", "checkpoint.final=false",
                "--set", "output.save_model=false"]
        for name, extra in variants.items():
            one, two = os.path.join(args.work, f"{name}-1"), os.path.join(args.work, f"{name}-{n}")
            wider = (f"train.micro_batch={n * quickstart_micro_batch()}" if name.startswith("galore")
                     else f"train.grad_accum={n}")
            r1 = launch(1, base + alone(extra) + ["--set", wider, "--set", f"output.dir={one}"], one + ".log", 600)
            r2 = launch(n, base + extra + ["--set", f"output.dir={two}"], two + ".log", 600)
            if r1 or r2:
                res["curves"][name] = {"error": f"exit {r1}, {r2}; see {one}.log, {two}.log"}
            else:
                a, b = losses(one), losses(two)
                worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
                res["curves"][name] = {"steps": len(a), "worst_relative_difference": worst,
                                       "first": a[0], "last_1gpu": a[-1], "last_ngpu": b[-1]}
            print(json.dumps({"curves": name, **res["curves"][name]}), flush=True)
    if "scaling" in args.parts or "path" in args.parts:
        data = os.path.join(args.work, "data.h5")
        write_dataset(data, (args.steps + 10) * n * args.B * (args.T + 1), 32000)
        folder, _ = shape_folder(args.work, "TinyLlama-1.1B")
        base = ["train", os.path.join(ROOT, "configs", "full-offload-cpu.yaml"), "--set", f"model.path={folder}",
                "--set", "model.init=random", "--set", f"data.train={data}", "--set", "data.eval_fraction=0",
                "--set", "train.eval_batches=0", "--set", f"train.steps={args.steps}", "--set",
                f"train.micro_batch={args.B}", "--set", f"train.seq_len={args.T}", "--set", "train.log_every=1",
                "--set", "train.device=gpu", "--set", "optim.lr=1e-5", "--set", "optim.warmup_steps=0",
                "--set", "output.save_model=false", "--set", "checkpoint.every=0", "--set", "checkpoint.final=false",
                "--set", "model.activation_checkpointing=true", "--set", "offload.optimizer=none"]
        for name, extra in variants.items():
            if "path" not in args.parts or alone(extra) == extra:
                continue
            row = {}
            for label, ex in (("alone", alone(extra)), ("zero", extra)):
                run = os.path.join(args.work, f"path-{name}-{label}")
                shutil.rmtree(run, ignore_errors=True)
                if launch(1, base + ex + ["--set", f"output.dir={run}"], run + ".log", 900):
                    row[label] = {"error": open(run + ".log").read()[-600:]}
                    continue
                step, peak = timing(run, args.steps, args.warmup)
                row[label] = {"step_s": step, "allocator_peak_gib": peak / 2 ** 30}
            if "step_s" in row["alone"] and "step_s" in row["zero"]:
                row["step_ratio"] = row["zero"]["step_s"] / row["alone"]["step_s"]
            res.setdefault("path", {})[name] = row
            print(json.dumps({"path": name, **row}), flush=True)
        for name, extra in variants.items():
            if "scaling" not in args.parts:
                break
            row = {}
            for g in (1, n):
                run = os.path.join(args.work, f"scale-{name}-{g}")
                shutil.rmtree(run, ignore_errors=True)
                rc = launch(g, base + (alone(extra) if g == 1 else extra) + ["--set", f"output.dir={run}"],
                            run + ".log", 900)
                if rc:
                    row[f"{g}gpu"] = {"error": open(run + ".log").read()[-600:]}
                    continue
                step, peak = timing(run, args.steps, args.warmup)
                row[f"{g}gpu"] = {"step_s": step, "tokens_per_second": g * args.B * args.T / step,
                                  "allocator_peak_gib": peak / 2 ** 30}
            if all("error" not in row.get(f"{g}gpu", {"error": 1}) for g in (1, n)):
                row["efficiency"] = row[f"{n}gpu"]["tokens_per_second"] / (n * row["1gpu"]["tokens_per_second"])
            res["scaling"][name] = row
            print(json.dumps({"scaling": name, **row}), flush=True)
    with open(os.path.join(args.out, "dist_bench.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nlauncher: {res['launcher']}" + (f", the {n} ranks on GPU 0 (NCCL over sockets)" if shared_gpu else ""))
    print(f"| run | loss curves: worst relative difference, {n} GPUs vs 1 GPU with {n}x the accumulation "
          "(GaLore: the micro-batch) |")
    print("|---|---|")
    for k, v in res["curves"].items():
        print(f"| {k} | {v.get('worst_relative_difference', v.get('error'))} |")
    print(f"\n| run (TinyLlama-1.1B, B={args.B}, T={args.T} per GPU) | 1 GPU tok/s | {n} GPUs tok/s | efficiency "
          f"| allocator peak per GPU, 1 / {n} GPUs (GiB) |")
    print("|---|---|---|---|---|")
    for k, v in res["scaling"].items():
        one, many = v.get("1gpu", {}), v.get(f"{n}gpu", {})
        t1, tn = one.get("tokens_per_second", float("nan")), many.get("tokens_per_second", float("nan"))
        p1, pn = one.get("allocator_peak_gib", float("nan")), many.get("allocator_peak_gib", float("nan"))
        print(f"| {k} | {t1:.0f} | {tn:.0f} | {v.get('efficiency', float('nan')):.3f} | {p1:.2f} / {pn:.2f} |")


if __name__ == "__main__":
    main()
