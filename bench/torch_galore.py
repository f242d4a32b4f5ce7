#!/usr/bin/env python3
"""galore-torch, the peer of memtune's GaLore in bench/galore.py: the
published optimizer (GaLoreAdamW, or GaLoreAdamW8bit over bitsandbytes) on a
transformers LlamaForCausalLM in bf16, with the per-layer weight updates of
the GaLore repository's torchrun_main.py (one optimizer per parameter,
stepped from a post-accumulate-grad hook, so no full gradient is kept): the
attention and MLP matrices projected at --rank, every other parameter plain
(8-bit) AdamW. Gradient checkpointing with --checkpointing. Prints one JSON
line: tokens/s and step ms after the warm-up, the first step's ms (it
computes the projectors: torch.linalg.svd of every projected gradient), the
allocator's peak (weights included) and the device's peak."""
import argparse
import json
import os
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from full_ft import PeakSampler  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--update-gap", type=int, default=200)
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--checkpointing", action="store_true")
    args = ap.parse_args()
    import galore_torch
    sampler = PeakSampler()
    cfg = LlamaConfig(**json.load(open(args.config)))
    cfg.use_cache = False
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    if args.int8:
        import bitsandbytes as bnb
        galore_cls, plain_cls = galore_torch.GaLoreAdamW8bit, bnb.optim.AdamW8bit
    else:
        galore_cls, plain_cls = galore_torch.GaLoreAdamW, torch.optim.AdamW
    optimizers = {}
    for name, p in model.named_parameters():
        if p.dim() == 2 and ("self_attn" in name or "mlp" in name):
            optimizers[p] = galore_cls([{"params": [p], "rank": args.rank, "update_proj_gap": args.update_gap,
                                         "scale": args.scale, "proj_type": "std"}], lr=args.lr, weight_decay=0.0)
        else:
            optimizers[p] = plain_cls([p], lr=args.lr, weight_decay=0.0)

    def step_hook(p):
        optimizers[p].step()
        optimizers[p].zero_grad(set_to_none=True)

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(step_hook)
    gen = torch.Generator(device="cuda").manual_seed(1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(args.steps):
        x = torch.randint(0, cfg.vocab_size, (args.B, args.T), device="cuda", generator=gen)
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    dt = sum(times[args.warmup:])
    n = args.steps - args.warmup
    print(json.dumps({"tokens_per_second": n * args.B * args.T / dt, "step_ms": 1000 * dt / n,
                      "first_step_ms": 1000 * times[0], "allocator_peak": torch.cuda.max_memory_allocated(),
                      "device_peak": sampler.finish(), "first_loss": losses[0], "last_loss": losses[-1]}))


if __name__ == "__main__":
    main()
