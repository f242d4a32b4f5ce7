#!/usr/bin/env python3
"""Full fine-tuning, memtune vs PyTorch + transformers, in one run on one GPU.

TinyLlama-1.1B shape (random initialisation: speed and memory do not depend
on the weights), B=4, T=1024, bf16 compute, fp32 master weights and AdamW
state, 200 steps each, AdamW at a constant lr of 1e-4 (no warm-up) and
gradient clipping at 1.0 on both sides. Tokens/s are
measured after 20 warm-up steps. Peak GPU memory is measured the same way for
both: the device's used memory (nvidia-smi, sampled every 50 ms) minus what
was used before the process started; each side's own allocator figure is
reported too. PyTorch runs eager and, with --compile, torch.compile'd too; the
ratios are against its faster run. Writes bench.json and prints a table with
the ratios.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("MT_BUILD_DIR", os.path.join(ROOT, "build"))

TINYLLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
             "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
             "rope_theta": 10000.0, "initializer_range": 0.02, "tie_word_embeddings": False,
             "attention_bias": False, "hidden_act": "silu", "torch_dtype": "float32"}


# Dense bf16 tensor-core peak (TFLOP/s) by the name nvidia-smi gives: H100
# SXM and H200 both 989.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}


def gpu_peak_tflops():
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                         capture_output=True, text=True).stdout
    return next((v for k, v in PEAK_TFLOPS.items() if k in out), None)


def layer_windows(cfg):
    """Each layer's sliding window from a config.json dict (None: global):
    layer_types' sliding layers (Gemma 3, Qwen2), else every layer where a
    sliding_window is set and not switched off (Mistral, Phi-3)."""
    L, window = cfg["num_hidden_layers"], cfg.get("sliding_window")
    if "layer_types" in cfg:
        return [window if t == "sliding_attention" else None for t in cfg["layer_types"]]
    return [window if window and cfg.get("use_sliding_window", True) else None] * L


def mean_keys(T, window):
    """The keys a query attends to, on average over T causal positions (i + 1
    at position i, at most window)."""
    w = min(T, window or T)
    return (w * (w + 1) / 2 + (T - w) * w) / T


def model_flops_per_token(cfg, T, mode):
    """Model FLOPs a trained token costs (no recompute counted), from a
    config.json dict: the linear layers' 2 FLOPs a weight per pass and
    attention's 4 (H D) a key a query sees per layer and pass (T / 2 keys on
    average when causal; fewer in a sliding window shorter than T). full:
    forward + backward with weight gradients (3 passes of the linears, 3 of
    attention); lora: the base's weight gradients skipped (2 passes of the
    linears, 3 of attention; the adapters are under 2% at r=16); mezo: two
    forwards."""
    C, F, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    H, KV = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    D = cfg.get("head_dim") or C // H
    linear = L * (C * H * D + 2 * C * KV * D + H * D * C + 3 * C * F) + C * cfg["vocab_size"]
    attention = sum(4 * mean_keys(T, window) * H * D for window in layer_windows(cfg))
    passes = {"full": (3, 3), "lora": (2, 3), "mezo": (2, 2)}[mode]
    return 2 * linear * passes[0] + attention * passes[1]


def mfu_text(cfg, T, mode, tokens_per_second):
    """'MFU 41.2%' against the GPU's dense bf16 peak, or '' on another GPU."""
    peak = gpu_peak_tflops()
    if not peak or not tokens_per_second:
        return ""
    return f"MFU {100 * model_flops_per_token(cfg, T, mode) * tokens_per_second / (peak * 1e12):.1f}%"


def gpu_used_mib():
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[0])


class PeakSampler:
    def __init__(self):
        self.base = gpu_used_mib()
        self.peak = self.base
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop:
            self.peak = max(self.peak, gpu_used_mib())
            time.sleep(0.05)

    def finish(self):
        self.stop = True
        self.thread.join()
        return (self.peak - self.base) * 1048576


def write_dataset(path, n, vocab):
    import h5py
    with h5py.File(path, "w") as f:
        f.create_dataset("tokens", data=np.random.default_rng(0).integers(0, vocab, n).astype(np.uint32))
        f.create_dataset("doc_offsets", data=np.array([0, n], dtype=np.uint64))
        f.attrs["format_version"] = np.int32(1)
        f.attrs["vocab_size"] = np.int64(vocab)
        f.attrs["tokenizer"] = "random"


def timed_run_sets(folder, data, run, sets):
    """The --set keys every bench's memtune run shares, then the bench's own
    (sets, which may override them): random weights of the folder's shape,
    the data with no evaluation, on the GPU, and nothing written after the
    timed steps (no model, no checkpoint: checkpoint.final defaults to true)."""
    return {"model.path": folder, "model.init": "random", "data.train": data, "data.eval_fraction": 0,
            "train.eval_batches": 0, "train.device": "gpu", "output.dir": run, "output.save_model": "false",
            "checkpoint.every": 0, "checkpoint.final": "false", **sets}


def run_memtune(args, folder, data, run):
    cmd = [os.environ.get("MT_MEMTUNE_BIN", os.path.join(BUILD, "memtune")), "train",
           os.path.join(ROOT, "configs", "quickstart.yaml")]
    sets = timed_run_sets(folder, data, run, {
        "train.steps": args.steps, "train.micro_batch": args.B, "train.seq_len": args.T, "train.log_every": 10,
        "optim.lr": 1e-4, "optim.warmup_steps": 0,
        "optim.schedule": "constant",  # torch_train.py's AdamW: lr 1e-4 throughout
        "optim.weight_decay": 0.0, "optim.beta2": 0.95,
        "model.activation_checkpointing": "true" if args.checkpointing else "false"})
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    sampler = PeakSampler()
    subprocess.run(cmd, check=True)
    peak = sampler.finish()
    recs = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    by_step = {r["step"]: r for r in recs}
    w = args.warmup
    dt = by_step[args.steps]["elapsed_seconds"] - by_step[w]["elapsed_seconds"]
    return {"tokens_per_second": (args.steps - w) * args.B * args.T / dt, "step_ms": 1000 * dt / (args.steps - w),
            "peak_gpu_used": peak, "allocator_peak": by_step[args.steps]["peak_memory_bytes"],
            "first_loss": recs[0]["loss"], "last_loss": recs[-1]["loss"]}


def run_torch(args, config_path, compiled=False):
    sampler = PeakSampler()
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "torch_full_ft.py"), "--config", config_path,
                          "--steps", str(args.steps), "--warmup", str(args.warmup), "--B", str(args.B), "--T", str(args.T)]
                         + (["--compile"] if compiled else []), capture_output=True, text=True)
    peak = sampler.finish()
    if out.returncode:
        print(out.stderr[-3000:])
        raise SystemExit("pytorch run failed")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["peak_gpu_used"] = peak
    r["allocator_peak"] = r["max_memory_allocated"]
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time PyTorch torch.compile'd")
    ap.add_argument("--memtune-only", action="store_true", help="skip the PyTorch run (A/B of memtune builds)")
    ap.add_argument("--work", default="/tmp/mt-bench")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/mt-bench"))
    args = ap.parse_args()
    if args.steps % 10 or args.warmup % 10 or args.warmup >= args.steps:
        ap.error("--steps and --warmup must be multiples of 10 (memtune logs every 10 steps), warmup below steps")
    os.makedirs(args.work, exist_ok=True)
    folder = os.path.join(args.work, "tinyllama")
    os.makedirs(folder, exist_ok=True)
    config_path = os.path.join(folder, "config.json")
    with open(config_path, "w") as f:
        json.dump(TINYLLAMA, f, indent=1)
    data = os.path.join(args.work, "tokens.h5")
    write_dataset(data, (args.steps + 10) * args.B * (args.T + 1), TINYLLAMA["vocab_size"])
    m = run_memtune(args, folder, data, os.path.join(args.work, "run"))
    if args.memtune_only:
        print(f"memtune {m['tokens_per_second']:.0f} tokens/s, {m['step_ms']:.1f} ms/step "
              f"{mfu_text(TINYLLAMA, args.T, 'full', m['tokens_per_second'])}")
        return
    print(f"memtune: {json.dumps(m)}", flush=True)
    peers = {"pytorch": run_torch(args, config_path)}
    print(f"pytorch: {json.dumps(peers['pytorch'])}", flush=True)
    if args.compile:
        try:
            peers["pytorch compiled"] = run_torch(args, config_path, compiled=True)
            print(f"pytorch compiled: {json.dumps(peers['pytorch compiled'])}", flush=True)
        except SystemExit as e:  # eager still gives a ratio
            print(f"torch.compile'd run: {e}")
    best = max(peers, key=lambda k: peers[k]["tokens_per_second"])
    t = peers[best]
    gib = 1024 ** 3
    result = {"shape": "TinyLlama-1.1B", "B": args.B, "T": args.T, "steps": args.steps, "memtune": m, "peer": best,
              **peers, "ratio_tokens_per_second": m["tokens_per_second"] / t["tokens_per_second"],
              "ratio_peak_gpu_used": m["peak_gpu_used"] / t["peak_gpu_used"],
              "ratio_allocator_peak": m["allocator_peak"] / t["allocator_peak"]}
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nfull fine-tune, TinyLlama-1.1B shape, B={args.B} T={args.T}, {args.steps} steps (timed after {args.warmup})")
    print(f"{'':17s} {'tokens/s':>10s} {'step ms':>8s} {'peak GPU used':>14s} {'allocator peak':>15s} {'loss first->last':>18s}")
    for name, r in (("memtune", m), *peers.items()):
        print(f"{name:17s} {r['tokens_per_second']:10.0f} {r['step_ms']:8.1f} {r['peak_gpu_used'] / gib:11.2f} GiB"
              f" {r['allocator_peak'] / gib:12.2f} GiB {r['first_loss']:8.3f} -> {r['last_loss']:.3f}"
              f"  {mfu_text(TINYLLAMA, args.T, 'full', r['tokens_per_second'])}")
    print(f"ratio memtune/{best}: tokens/s {result['ratio_tokens_per_second']:.3f}, peak GPU used "
          f"{result['ratio_peak_gpu_used']:.3f}, allocator peak {result['ratio_allocator_peak']:.3f}")

if __name__ == "__main__":
    main()
