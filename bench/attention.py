#!/usr/bin/env python3
"""Causal bf16 attention, memtune against torch's scaled_dot_product_attention
in the same call on the same GPU: torch's flash and cuDNN backends (grouped-
query heads through enable_gqa where the backend takes it, else K/V repeated
outside the timed region), memtune's cuDNN path and its own kernel
(build/mt_attention_bench). Forward and backward each timed with CUDA events,
median of 20 runs after 3 warm-ups, as TFLOP/s of causal work (forward 2 x
B*H*T*T*D, backward 2.5x that). Prints a table with memtune over torch's
fastest backend per shape and direction; writes attention_bench.json."""
import argparse
import json
import os
import subprocess

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("MT_BUILD_DIR", os.path.join(ROOT, "build"))
SHAPES = [("TinyLlama-1.1B", 4, 1024, 32, 4, 64), ("Llama-2-7B", 4, 1024, 32, 32, 128),
          ("Llama-3-8B T=4096", 1, 4096, 32, 8, 128), ("Llama-3-8B T=16384", 1, 16384, 32, 8, 128)]
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def median_ms(fn, warm=3, runs=20):
    times = []
    for i in range(warm + runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        if i >= warm:
            times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def torch_case(backend, B, T, H, KV, D):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = (torch.rand(B, H, T, D, device="cuda", generator=g) * 2 - 1).bfloat16().requires_grad_()
    k = (torch.rand(B, KV, T, D, device="cuda", generator=g) * 2 - 1).bfloat16().requires_grad_()
    v = (torch.rand(B, KV, T, D, device="cuda", generator=g) * 2 - 1).bfloat16().requires_grad_()
    dout = (torch.rand(B, H, T, D, device="cuda", generator=g) * 2 - 1).bfloat16()
    with sdpa_kernel([BACKENDS[backend]]):
        gqa = {"enable_gqa": True} if KV != H else {}
        try:
            F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa).backward(dout)
            kk, vv = k, v
        except RuntimeError:  # the backend does not take grouped heads: repeat them, untimed
            gqa = {}
            kk = k.detach().repeat_interleave(H // KV, dim=1).requires_grad_()
            vv = v.detach().repeat_interleave(H // KV, dim=1).requires_grad_()
        holder = {}

        def fwd():
            holder["o"] = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, **gqa)

        def bwd():
            torch.autograd.grad(holder["o"], (q, kk, vv), dout, retain_graph=True)

        t_fwd = median_ms(fwd)
        fwd()
        t_bwd = median_ms(bwd)
    return t_fwd, t_bwd, "enable_gqa" if gqa else ("repeated K/V" if KV != H else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/mt-attention-bench"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for name, B, T, H, KV, D in SHAPES:
        causal = B * H * T * T * D
        for backend in BACKENDS:
            try:
                f, b, note = torch_case(backend, B, T, H, KV, D)
                results[(name, "torch " + backend)] = (2 * causal / f / 1e9, 5 * causal / b / 1e9, note)
            except RuntimeError as e:
                print(f"{name} torch {backend}: {str(e).splitlines()[0]}")
            torch.cuda.empty_cache()
    out = subprocess.run([os.path.join(BUILD, "mt_attention_bench")], capture_output=True, text=True)
    print(out.stdout)
    if out.returncode:
        print(out.stderr[-2000:])
    for line in out.stdout.splitlines()[1:]:
        for name, *_ in SHAPES:
            if line.startswith(name + " "):
                parts = line[len(name):].split()
                if len(parts) == 6:  # path fwd-ms fwd-TF/s bwd-ms bwd-TF/s repeat (else "out of memory")
                    results[(name, "memtune " + parts[0])] = (float(parts[2]), float(parts[4]), parts[5])
    print(f"{'shape':20s} {'path':16s} {'fwd TF/s':>9s} {'bwd TF/s':>9s}  note")
    for (name, path), (f, b, note) in results.items():
        print(f"{name:20s} {path:16s} {f:9.1f} {b:9.1f}  {note}")
    print("\nmemtune (cuDNN path) / torch's fastest backend, per direction:")
    ratios = {}
    for name, *_ in SHAPES:
        ours = results.get((name, "memtune cudnn"))
        peers = [results[(name, "torch " + b)] for b in BACKENDS if (name, "torch " + b) in results]
        if not ours or not peers:
            continue
        best_f, best_b = max(p[0] for p in peers), max(p[1] for p in peers)
        ratios[name] = {"forward": ours[0] / best_f, "backward": ours[1] / best_b, "backward_repeat": ours[2]}
        nd = results.get((name, "memtune cudnn-nd"))
        if nd:
            ratios[name]["backward_nondeterministic"] = nd[1] / best_b
        print(f"  {name:20s} forward x{ours[0] / best_f:.3f}  backward x{ours[1] / best_b:.3f}  "
              f"(two backward runs: {ours[2]})" + (f"; non-deterministic backward x{nd[1] / best_b:.3f}" if nd else ""))
    with open(os.path.join(args.out, "attention_bench.json"), "w") as f:
        json.dump({"results": {f"{k[0]} | {k[1]}": v for k, v in results.items()}, "ratios": ratios,
                   "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "torch_cudnn": torch.backends.cudnn.version()}, f, indent=1)


if __name__ == "__main__":
    main()
