#!/usr/bin/env python3
"""LoRA and QLoRA fine-tuning, memtune vs PyTorch + PEFT (+ bitsandbytes), in
one run on one GPU.

Shapes TinyLlama-1.1B and Llama-2-7B by default, and Qwen3-1.7B, Gemma-3-1B
and Phi-3-mini (3.8B; fused qkv_proj and gate_up_proj) on request (random
initialisation: speed and memory do not depend on the weights), B=4, T=1024,
LoRA r=16, alpha=32, dropout 0.05 on every linear module of the layers, fp32
adapters and AdamW state, gradient clipping at 1.0, bf16 compute. Runs per shape: PEFT LoRA without
and with gradient checkpointing, PEFT + bitsandbytes QLoRA with
checkpointing (when bitsandbytes imports), memtune LoRA without and with
activation checkpointing, memtune QLoRA with checkpointing, without and with
the checkpointed layer inputs offloaded to host memory. Tokens/s are
measured after the warm-up steps. Memory: each side's allocator peak during
training (memtune's tally; torch.cuda.max_memory_allocated after setup), and
the device's used memory minus what was used before the process (memtune:
the whole process, sampled with nvidia-smi; PEFT: from the first training
step, sampled in the process, so its set-up is not counted against it).
Writes lora_bench.json and prints a table with the ratios.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from full_ft import PeakSampler, gpu_used_mib, mfu_text, timed_run_sets, write_dataset  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("MT_BUILD_DIR", os.path.join(ROOT, "build"))

BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "initializer_range": 0.02,
        "tie_word_embeddings": False, "attention_bias": False, "hidden_act": "silu", "torch_dtype": "bfloat16"}
SHAPES = {
    "TinyLlama-1.1B": dict(BASE, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4),
    "Llama-2-7B": dict(BASE, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32),
    # issue 25's families, at the shapes of their released 1-4B models
    "Qwen3-1.7B": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
                   "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
                   "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
                   "attention_bias": False, "hidden_act": "silu", "use_sliding_window": False,
                   "initializer_range": 0.02, "torch_dtype": "bfloat16"},
    "Gemma-3-1B": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144,
                   "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
                   "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 512,
                   "sliding_window_pattern": 6,
                   "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(26)],
                   "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                   "rope_local_base_freq": 10000.0, "hidden_activation": "gelu_pytorch_tanh",
                   "tie_word_embeddings": True, "attention_bias": False, "initializer_range": 0.02,
                   "torch_dtype": "bfloat16"},
    "Phi-3-mini": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 32064,
                   "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 32, "max_position_embeddings": 4096,
                   "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                   "sliding_window": 2047, "hidden_act": "silu", "tie_word_embeddings": False, "pad_token_id": 32000,
                   "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0, "initializer_range": 0.02,
                   "torch_dtype": "bfloat16"},
}
GIB = 1024 ** 3


def shape_folder(work, shape, shapes=None):
    """A model folder under work holding the shape's config.json (random
    initialisation: speed and memory do not depend on the weights); shapes:
    the table it comes from (this file's SHAPES by default)."""
    folder = os.path.join(work, shape)
    os.makedirs(folder, exist_ok=True)
    config_path = os.path.join(folder, "config.json")
    with open(config_path, "w") as f:
        json.dump((shapes or SHAPES)[shape], f, indent=1)
    return folder, config_path


def run_memtune(args, folder, data, run, checkpointing, qlora, offload=False):
    cmd = [os.environ.get("MT_MEMTUNE_BIN", os.path.join(BUILD, "memtune")), "train",
           os.path.join(ROOT, "configs", "llama-lora.yaml")]
    sets = timed_run_sets(folder, data, run, {
        "train.steps": args.steps, "train.micro_batch": args.B, "train.seq_len": args.T, "train.grad_accum": 1,
        "train.log_every": 1, "optim.warmup_steps": 2, "lora.r": args.r, "lora.alpha": args.alpha,
        "lora.dropout": args.dropout, "model.quantize": "nf4" if qlora else "none",
            "model.activation_checkpointing": "true" if checkpointing else "false",
            "model.offload_activations": "true" if offload else "false"})
    for kv in args.memtune_set:  # e.g. model.mlp_tile_rows=2048: memtune's runs only
        key, _, value = kv.partition("=")
        if not key or not _:
            raise SystemExit(f"--memtune-set takes KEY=VALUE, got {kv!r}")
        sets[key] = value
    return train_and_time(args, cmd, sets, run, ("base weights", "memory (GPU)"))


class HostSampler:
    """Peak resident host memory (VmRSS, pinned pages included) of a running
    process, sampled every 50 ms."""

    def __init__(self, pid):
        self.pid, self.peak, self.stop = pid, 0, False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop:
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(0.05)

    def finish(self):
        self.stop = True
        self.thread.join()
        return self.peak


def train_and_time(args, cmd, sets, run, log_marks):
    """Runs `memtune train` (cmd plus --set for each of sets) and reads its
    metrics.jsonl: tokens/s and step ms after args.warmup steps, the
    allocator's and the device's peaks, and the log lines holding log_marks."""
    for k, v in sets.items():
        cmd = cmd + ["--set", f"{k}={v}"]
    sampler = PeakSampler()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    host = HostSampler(proc.pid)
    stdout, stderr = proc.communicate()
    out = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    peak = sampler.finish()
    host_peak = host.finish()
    if out.returncode:
        print(out.stderr[-3000:])
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    info = [line for line in out.stderr.splitlines() if any(mark in line for mark in log_marks)]
    recs = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    by_step = {r["step"]: r for r in recs}
    w = args.warmup
    dt = by_step[args.steps]["elapsed_seconds"] - by_step[w]["elapsed_seconds"]
    return {"tokens_per_second": (args.steps - w) * args.B * args.T / dt, "step_ms": 1000 * dt / (args.steps - w),
            "device_peak": peak, "allocator_peak": by_step[args.steps]["peak_memory_bytes"], "host_peak": host_peak,
            "first_loss": recs[0]["loss"], "last_loss": recs[-1]["loss"], "log": info}


def run_peft(args, config_path, checkpointing, qlora, compiled=False):
    base = gpu_used_mib()
    cmd = [sys.executable, os.path.join(ROOT, "bench", "peft_lora_ft.py"), "--config", config_path,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--B", str(args.B), "--T", str(args.T),
           "--r", str(args.r), "--alpha", str(args.alpha), "--dropout", str(args.dropout)]
    cmd += (["--checkpointing"] if checkpointing else []) + (["--qlora"] if qlora else [])
    cmd += ["--compile"] if compiled else []
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        print(out.stderr[-3000:])
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["device_peak"] = r["device_used_peak"] - base * 1048576
    r["allocator_peak"] = r["max_memory_allocated"]
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="TinyLlama-1.1B,Llama-2-7B")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--memtune-only", action="store_true")
    ap.add_argument("--memtune-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a further memtune setting for its runs (repeatable), e.g. model.mlp_tile_rows=2048")
    ap.add_argument("--only", default="", help="run only these runs, comma-separated, spaces in names as _ (memtune_LoRA_ckpt)")
    ap.add_argument("--work", default="/tmp/mt-lora-bench")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/mt-lora-bench"))
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    try:
        import bitsandbytes  # noqa: F401
        have_bnb = True
    except Exception as e:  # noqa: BLE001
        print(f"bitsandbytes not importable ({e}): PEFT QLoRA not run")
        have_bnb = False
    data = os.path.join(args.work, "tokens.h5")
    write_dataset(data, (args.steps + 10) * args.B * (args.T + 1), 32000)
    results = {}
    for shape in args.shapes.split(","):
        folder, config_path = shape_folder(args.work, shape)
        runs = {}
        wanted = [w for w in args.only.split(",") if w]
        for name, ckpt, qlora, offload in (("memtune LoRA", False, False, False),
                                           ("memtune LoRA ckpt", True, False, False),
                                           ("memtune QLoRA ckpt", True, True, False),
                                           ("memtune QLoRA ckpt+offload", True, True, True)):
            if wanted and name.replace(" ", "_") not in wanted:
                continue
            runs[name] = run_memtune(args, folder, data,
                                     os.path.join(args.work, f"run-{shape}-{ckpt}-{qlora}-{offload}"), ckpt, qlora,
                                     offload)
            print(f"{shape} {name}: {json.dumps(runs[name])}", flush=True)
        if not args.memtune_only:
            for name, ckpt, qlora, compiled in (("PEFT LoRA", False, False, False),
                                                ("PEFT LoRA compiled", False, False, True),
                                                ("PEFT LoRA ckpt", True, False, False),
                                                ("PEFT LoRA ckpt compiled", True, False, True),
                                                ("PEFT+bnb QLoRA ckpt", True, True, False)):
                if (qlora and not have_bnb) or (wanted and name.replace(" ", "_") not in wanted):
                    continue
                runs[name] = run_peft(args, config_path, ckpt, qlora, compiled)
                print(f"{shape} {name}: {json.dumps(runs[name])}", flush=True)
        results[shape] = runs
        print(f"\n{shape}, B={args.B} T={args.T}, LoRA r={args.r} on all linear modules, {args.steps} steps "
              f"(timed after {args.warmup})")
        print(f"{'':26s} {'tokens/s':>9s} {'step ms':>8s} {'allocator peak':>15s} {'device peak':>12s}")
        for name, r in runs.items():
            if "error" in r:
                print(f"{name:26s} failed: {r['error']}")
                continue
            print(f"{name:26s} {r['tokens_per_second']:9.0f} {r['step_ms']:8.1f} {r['allocator_peak'] / GIB:11.2f} GiB"
                  f" {r['device_peak'] / GIB:8.2f} GiB  {mfu_text(SHAPES[shape], args.T, 'lora', r['tokens_per_second'])}")
        ratios = {}
        for ours, theirs in (("memtune LoRA", "PEFT LoRA"), ("memtune LoRA", "PEFT LoRA compiled"),
                             ("memtune LoRA", "PEFT LoRA ckpt"), ("memtune LoRA ckpt", "PEFT LoRA ckpt"),
                             ("memtune LoRA ckpt", "PEFT LoRA ckpt compiled"), ("memtune QLoRA ckpt", "PEFT+bnb QLoRA ckpt"),
                             ("memtune QLoRA ckpt+offload", "PEFT+bnb QLoRA ckpt")):
            a, b = runs.get(ours, {}), runs.get(theirs, {})
            if "tokens_per_second" in a and "tokens_per_second" in b:
                ratios[f"{ours} / {theirs}"] = {
                    "tokens_per_second": a["tokens_per_second"] / b["tokens_per_second"],
                    "allocator_peak": a["allocator_peak"] / b["allocator_peak"],
                    "device_peak": a["device_peak"] / b["device_peak"]}
        for k, v in ratios.items():
            print(f"  {k}: tokens/s x{v['tokens_per_second']:.2f}, allocator peak x{v['allocator_peak']:.2f}, "
                  f"device peak x{v['device_peak']:.2f}")
        results[shape + " ratios"] = ratios
        with open(os.path.join(args.out, f"lora_bench-dropout{args.dropout:g}.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
