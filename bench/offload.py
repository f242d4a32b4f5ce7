#!/usr/bin/env python3
"""ZeRO-style offload of AdamW's state, in one run on one GPU.

Full fine-tuning (every weight) of the TinyLlama-1.1B and Llama-2-7B shapes
(random initialisation), B=4, T=1024, activation checkpointing, global-norm
clipping at 1.0, with the optimizer state (fp32 master weights and moments)
on the GPU (`offload.optimizer: none`), in pinned host memory (`cpu`) and in
a file on the machine's disk (`ssd`); on the 1.1B shape also `cpu` without
clipping, where each layer updates as its gradients land. Per run: step time
after the warm-up steps (from metrics.jsonl), the device's used memory
minus what was used before (nvidia-smi, sampled), memtune's allocator peak,
and the process's peak resident host memory (VmRSS, pinned pages included).
The cpu run of the 1.1B shape writes the copy/update timeline of two steps
(offload-trace.json, Chrome's trace format) to --out, and each -rN mode's
run (below) its own (offload-trace-MODE.json); --trace-modes names modes
to trace at every shape (offload-trace-SHAPE-MODE.json), the delayed
update's included. Modes galore and
galore-cpu: GaLore (optim.kind galore, its defaults, no clipping) with the
AdamW state of what it does not project (embeddings, norms, head) on the
GPU or offloaded to host memory. A suffix -accumN on a mode (none-accum2,
cpu-accum2) runs N micro-batches a step (train.grad_accum): offloaded, each
micro-batch's gradients stream to the host, which sums them, so the GPU
holds no gradient block; on the GPU the block holds the sums. A further
suffix -gpusum (cpu-accum2-gpusum) keeps the offloaded run's sums on the GPU
(offload.grad_sum: gpu). A suffix -delay (cpu-delay, cpu-noclip-delay) turns
on ZeRO-Offload's delayed parameter update (offload.delay: 1), -int8 the
store's 8-bit moments (offload.moments: int8; cpu-int8, cpu-int8-delay, ssd-int8), -rN
offloads N% of the state (offload.ratio N/100; cpu-r25: the first units'
other 75% stay on the GPU). A suffix -ckpt
writes a checkpoint every 6 steps in the background (checkpoint.async, the
default), -ckptsync in place (checkpoint.async: false; offloaded, straight
from the store): the run reports each checkpoint's stall, the time its step
took beyond the median step (metrics.jsonl), and the log's checkpoint lines.

Before an ssd run, the disk under --ssd-path alone (bench/disk_bench.c:
the store's write, read and update passes at 4 and 8 I/O threads beside
plain O_DIRECT threads): each ssd run then reports its step against the
floor the update pass sets (12 bytes a parameter read and written; with an
ssd-int8 mode the disk is also measured with int8 records, 6 bytes a
parameter, which set that mode's floor).

With --deepspeed, after memtune's runs of each shape, DeepSpeed's
ZeRO-Offload (bench/deepspeed_offload.py: stage 2, CPU Adam, the same
shape, B, T, checkpointing, clipping and steps) in the same call, its device
and host peaks sampled as memtune's are; the table then gives memtune's
`cpu` step and host peak against it.

Then the CPU AdamW alone: memtune's (bench/cpu_adam_bench.c, every
instruction path, fp32 and bf16 gradients) against torch's CPU AdamW
(bench/torch_cpu_adam.py: the default and fused=True) on the same
parameters and cores, in parameters per second.

Targets (issue 7): the 7B full fine-tune fits on one GPU with peak GPU
memory <= 24 GiB; CPU AdamW >= 4 x torch's; the cpu-offload step of the 1.1B
shape <= 1.3 x the GPU-resident step. Writes offload_bench.json and prints
the table and the ratios.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from full_ft import PeakSampler, timed_run_sets, write_dataset  # noqa: E402
from lora_ft import HostSampler, shape_folder, train_and_time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("MT_BUILD_DIR", os.path.join(ROOT, "build"))
GIB = 1024 ** 3


def run_memtune(args, folder, data, run, mode, trace_step=0):
    parts = [p for p in mode.split("-") if not p.startswith("accum") and not re.fullmatch(r"r\d+", p)
             and p not in ("gpusum", "delay", "ckpt", "ckptsync", "int8")]
    ratio = [int(p[1:]) for p in mode.split("-") if re.fullmatch(r"r\d+", p)]
    accum = [int(p[len("accum"):]) for p in mode.split("-") if p.startswith("accum")]
    galore = parts[0] == "galore"
    offload = (parts[1] if len(parts) > 1 else "none") if galore else parts[0]
    cmd = [os.path.join(BUILD, "memtune"), "train", os.path.join(ROOT, "configs", "full-offload-cpu.yaml")]
    sets = timed_run_sets(folder, data, run, {
        "train.steps": args.steps, "train.micro_batch": args.B, "train.seq_len": args.T, "train.log_every": 1,
        "optim.lr": 1e-5, "optim.warmup_steps": 0,
        "optim.grad_clip": 0 if "noclip" in mode.split("-") or galore else 1.0,
        "model.activation_checkpointing": "true", "offload.optimizer": offload})
    if galore:
        sets["optim.kind"] = "galore"
    if accum:
        sets["train.grad_accum"] = accum[0]
    if mode.endswith("-gpusum"):
        sets["offload.grad_sum"] = "gpu"
    if "delay" in mode.split("-"):
        sets["offload.delay"] = 1
    if "int8" in mode.split("-"):
        sets["offload.moments"] = "int8"
    if ratio:
        sets["offload.ratio"] = ratio[0] / 100
    ckpt = [p for p in mode.split("-") if p in ("ckpt", "ckptsync")]
    if ckpt:
        sets.update({"checkpoint.every": 6, "checkpoint.keep": 1, "checkpoint.async": str(ckpt[0] == "ckpt").lower()})
    if offload == "ssd":
        sets["offload.path"] = args.ssd_path
    if trace_step:
        sets["offload.trace_step"] = trace_step
    shutil.rmtree(run, ignore_errors=True)
    r = train_and_time(args, cmd, sets, run, ("offloaded", "memory (GPU)", "O_DIRECT", "timeline", "grad_sum",
                                              "checkpoint:", "offload.ratio"))
    if ckpt and "error" not in r:
        recs = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
        t = {rec["step"]: rec["elapsed_seconds"] for rec in recs if "elapsed_seconds" in rec}
        steps = sorted(t)
        dur = {s: t[s] - t[p] for p, s in zip(steps, steps[1:])}
        median = sorted(dur.values())[len(dur) // 2]
        # a checkpoint after step s shows in step s + 1's time (the write or the copy happens between them)
        r["checkpoint_stall_s"] = {s: dur[s + 1] - median for s in steps if s % 6 == 0 and s + 1 in dur}
        r["median_step_s"] = median
        shutil.rmtree(run, ignore_errors=True)  # the checkpoints (13 GB each at 1.1B)
    return r


def run_deepspeed(args, config_path):
    """bench/deepspeed_offload.py on the shape, sampled as memtune's runs are."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", "deepspeed_offload.py"), "--config", config_path,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--B", str(args.B), "--T", str(args.T)]
    sampler = PeakSampler()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    host = HostSampler(proc.pid)
    try:
        stdout, stderr = proc.communicate(timeout=args.deepspeed_timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        stderr += f"\ntimed out after {args.deepspeed_timeout}s"
    peak, host_peak = sampler.finish(), host.finish()
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not rows:
        print(stderr[-3000:])
        return {"error": stderr.strip().splitlines()[-1] if stderr.strip() else "failed"}
    r = rows[-1]
    r.update({"device_peak": peak, "allocator_peak": r["max_memory_allocated"], "host_peak": host_peak})
    return r


def json_lines(cmd, timeout):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{"error": f"timed out after {timeout}s"}]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode:
        rows.append({"error": out.stderr.strip()[-500:]})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="TinyLlama-1.1B,Llama-2-7B")
    ap.add_argument("--modes", default="none,cpu,cpu-noclip,ssd,galore,galore-cpu")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--ssd-path", default="/tmp/memtune-offload-bench")
    ap.add_argument("--adam-millions", type=float, default=256)
    ap.add_argument("--skip-adam", action="store_true")
    ap.add_argument("--deepspeed", action="store_true",
                    help="DeepSpeed's ZeRO-Offload on each shape too (bench/deepspeed_offload.py; .whl/ds)")
    ap.add_argument("--deepspeed-timeout", type=int, default=600)
    ap.add_argument("--trace-modes", default="",
                    help="modes whose steps 6-7 are traced at every shape (offload.trace_step), as offload-trace-SHAPE-MODE.json")
    ap.add_argument("--out", default=".")
    ap.add_argument("--work", default="/tmp/mt-offload-bench")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    data = os.path.join(args.work, "data.h5")
    write_dataset(data, (args.steps + 10) * args.B * (args.T + 1), 32000)
    disk = shutil.disk_usage(os.path.dirname(args.ssd_path.rstrip("/")) or "/")
    results = {"B": args.B, "T": args.T, "steps": args.steps, "warmup": args.warmup, "cores": os.cpu_count(),
               "ssd_path": args.ssd_path, "disk_free_gib": disk.free / GIB, "shapes": {}}
    if any(m.split("-")[0] == "ssd" for m in args.modes.split(",")):
        os.makedirs(args.ssd_path, exist_ok=True)
        int8 = any(m.split("-")[0] == "ssd" and "int8" in m.split("-") for m in args.modes.split(","))
        results["disk"] = json_lines([os.path.join(BUILD, "mt_disk_bench"), args.ssd_path, "4", "4,8",
                                      "both" if int8 else "fp32"], 600)
        for row in results["disk"]:
            print(json.dumps({"disk": row}), flush=True)
    # the update pass's parameters a second, the fastest thread count's, by the moments' kind
    update_rate = {kind: max([r.get("update_params_per_s", 0) for r in results.get("disk", [])
                              if r.get("moments", "fp32") == kind] + [0]) for kind in ("fp32", "int8")}
    for shape in args.shapes.split(","):
        folder, config_path = shape_folder(args.work, shape)
        res = results["shapes"][shape] = {}
        for mode in args.modes.split(","):
            if mode == "cpu-noclip" and shape != "TinyLlama-1.1B":
                continue
            # the timelines of the plain offloaded run and of partial offload (-rN), 1.1B shape
            traced = mode == "cpu" or re.fullmatch(r"cpu(-noclip)?-r\d+", mode)
            asked = mode in args.trace_modes.split(",")
            trace = 6 if (traced and shape == "TinyLlama-1.1B") or asked else 0
            run = os.path.join(args.work, f"{shape}-{mode}")
            r = run_memtune(args, folder, data, run, mode, trace)
            if trace and os.path.exists(os.path.join(run, "offload-trace.json")):
                name = (f"offload-trace-{shape}-{mode}.json" if asked
                        else "offload-trace.json" if mode == "cpu" else f"offload-trace-{mode}.json")
                shutil.copy(os.path.join(run, "offload-trace.json"), os.path.join(args.out, name))
            found = re.search(r"offloaded to [^:]*: ([\d.]+)M parameters", " ".join(r.get("log", [])))
            rate = update_rate["int8" if "int8" in mode.split("-") else "fp32"]
            if mode.split("-")[0] == "ssd" and "error" not in r and rate > 0 and found:
                # the offloaded parameters over the rate of the disk's update pass (12 bytes a parameter each way,
                # 6 with int8 moments)
                r["disk_floor_ms"] = 1000 * float(found.group(1)) * 1e6 / rate
                r["step_vs_disk_floor"] = r["step_ms"] / r["disk_floor_ms"]
            res[mode] = r
            print(json.dumps({"shape": shape, "mode": mode, **r}), flush=True)
        if args.deepspeed:
            r = res["deepspeed-zero2-cpu"] = run_deepspeed(args, config_path)
            print(json.dumps({"shape": shape, "mode": "deepspeed-zero2-cpu", **r}), flush=True)
            for mode in [m for m, v in res.items() if isinstance(v, dict) and m.split("-")[0] == "cpu"]:
                if "error" not in r and "error" not in res[mode]:
                    res[f"ratio_{mode}_step_vs_deepspeed"] = res[mode]["step_ms"] / r["step_ms"]
                    res[f"ratio_{mode}_host_peak_vs_deepspeed"] = res[mode]["host_peak"] / r["host_peak"]
                    res[f"ratio_{mode}_device_peak_vs_deepspeed"] = res[mode]["device_peak"] / r["device_peak"]
        if "error" not in res.get("none", {"error": 1}) and "error" not in res.get("cpu", {"error": 1}):
            res["ratio_cpu_step_vs_gpu"] = res["cpu"]["step_ms"] / res["none"]["step_ms"]
        if "error" not in res.get("none", {"error": 1}) and "error" not in res.get("cpu-noclip", {"error": 1}):
            res["ratio_cpu_noclip_step_vs_gpu"] = res["cpu-noclip"]["step_ms"] / res["none"]["step_ms"]
        for mode in [m for m, r in res.items() if isinstance(r, dict) and re.search(r"-r\d+", m)]:  # part on the GPU
            if "error" not in res[mode] and "error" not in res.get("none", {"error": 1}):
                res[f"ratio_{mode}_step_vs_gpu"] = res[mode]["step_ms"] / res["none"]["step_ms"]
        for mode in [m for m in res if m.endswith("-delay")]:  # the delayed update against its exact twin
            twin = mode[:-len("-delay")]
            if "error" not in res[mode] and "error" not in res.get(twin, {"error": 1}):
                res[f"ratio_{mode}_step_vs_{twin}"] = res[mode]["step_ms"] / res[twin]["step_ms"]
                if "error" not in res.get("none", {"error": 1}):
                    res[f"ratio_{mode}_step_vs_gpu"] = res[mode]["step_ms"] / res["none"]["step_ms"]
        if "error" not in res.get("galore", {"error": 1}) and "error" not in res.get("galore-cpu", {"error": 1}):
            res["ratio_galore_cpu_step_vs_galore"] = res["galore-cpu"]["step_ms"] / res["galore"]["step_ms"]
            res["galore_cpu_device_peak_saved_gib"] = \
                (res["galore"]["device_peak"] - res["galore-cpu"]["device_peak"]) / GIB
        # accumulation against one micro-batch a step: memory, and time per token
        for mode, r in list(res.items()):
            base = res.get(mode.split("-accum")[0]) if "-accum" in mode else None
            if mode.endswith("-gpusum"):
                base = res.get(mode[:-len("-gpusum")])  # against the host's sums
            if isinstance(r, dict) and isinstance(base, dict) and "error" not in r and "error" not in base:
                than = "host_sums" if mode.endswith("-gpusum") else "one_micro_batch"
                res[f"{mode}_allocator_peak_minus_{than}_gib"] = (r["allocator_peak"] - base["allocator_peak"]) / GIB
                res[f"{mode}_tokens_per_second_vs_{than}"] = r["tokens_per_second"] / base["tokens_per_second"]

    if not args.skip_adam:
        cores = os.cpu_count()
        threads = f"{cores},{max(cores - 1, 1)}"
        mem = json_lines([os.path.join(BUILD, "mt_cpu_adam_bench"), str(args.adam_millions), "5", threads], 600)
        tor = json_lines([sys.executable, os.path.join(ROOT, "bench", "torch_cpu_adam.py"), "--millions",
                          str(args.adam_millions), "--threads", threads], 900)
        results["cpu_adam"] = {"memtune": mem, "torch": tor}
        for row in mem + tor:
            print(json.dumps(row), flush=True)
        best = {}
        for row in mem:
            if "params_per_second" in row and "grad" in row:  # (not the store passes, fp32 and int8 moments)
                key = (row["grad"], row["threads"])
                best[key] = max(best.get(key, 0), row["params_per_second"])
        ratios = {}
        for row in tor:
            if "params_per_second" not in row:
                continue
            for grad in ("fp32", "bf16"):
                if (grad, row["threads"]) in best:
                    ratios[f"memtune_{grad}_grads_vs_torch_{row['variant']}_{row['threads']}_threads"] = \
                        best[(grad, row["threads"])] / row["params_per_second"]
        results["cpu_adam"]["ratios"] = ratios

    with open(os.path.join(args.out, "offload_bench.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n| shape | optimizer state | step ms | tok/s | GPU used peak GiB | allocator peak GiB | host RSS peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for shape, res in results["shapes"].items():
        for mode, r in res.items():
            if not isinstance(r, dict):
                continue
            if "error" in r:
                print(f"| {shape} | {mode} | error: {r['error'][:150]} | | | | |")
            else:
                print(f"| {shape} | {mode} | {r['step_ms']:.0f} | {r['tokens_per_second']:.0f} | "
                      f"{r['device_peak'] / GIB:.2f} | {r['allocator_peak'] / GIB:.2f} | {r['host_peak'] / GIB:.1f} |")
        for k, v in res.items():
            if isinstance(v, float):
                print(f"{shape} {k}: {v:.2f}")
            if isinstance(v, dict) and "step_vs_disk_floor" in v:
                print(f"{shape} {k}: step {v['step_ms']:.0f} ms against the disk's floor {v['disk_floor_ms']:.0f} ms: "
                      f"{v['step_vs_disk_floor']:.2f}x")
    for k, v in results.get("cpu_adam", {}).get("ratios", {}).items():
        print(f"CPU AdamW {k}: {v:.2f}")


if __name__ == "__main__":
    main()
