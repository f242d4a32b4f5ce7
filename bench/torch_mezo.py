#!/usr/bin/env python3
"""PyTorch in-place MeZO, the peer of memtune's MeZO in bench/mezo.py: the
reference algorithm of Malladi et al.'s trainer (zo_perturb_parameters,
zo_step, zo_update) on a transformers LlamaForCausalLM in bf16. Each step
draws a seed; z is regenerated per parameter with torch.normal under
torch.manual_seed(seed); the parameters are perturbed in place by +eps z,
-2 eps z and +eps z around two forward passes in inference mode; the update
p -= lr (g z + wd p) (no decay on norms and biases) regenerates z again.
Prints one JSON line: tokens/s and step ms over the steps after the warm-up,
the allocator's peaks (model weights included) and the device's peak."""
import argparse
import json
import os
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from full_ft import PeakSampler  # noqa: E402


def perturb(params, seed, scale):
    torch.manual_seed(seed)
    for _, p in params:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
        p.data.add_(z, alpha=scale)


def update(params, seed, projected_grad, lr, weight_decay):
    torch.manual_seed(seed)
    for name, p in params:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
        decay = 0.0 if ("bias" in name or "norm" in name) else weight_decay
        if decay:
            p.data.add_(projected_grad * z + decay * p.data, alpha=-lr)
        else:  # no pass over p for a zero decay (as a user would write it)
            p.data.add_(z, alpha=-lr * projected_grad)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    args = ap.parse_args()
    sampler = PeakSampler()
    cfg = LlamaConfig(**json.load(open(args.config)))
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    model.eval()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gen = torch.Generator(device="cuda").manual_seed(1)
    seeds = torch.Generator().manual_seed(2)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    losses, t_start = [], None
    for step in range(args.steps):
        if step == args.warmup:
            torch.cuda.synchronize()
            t_start = time.perf_counter()
        ids = torch.randint(0, cfg.vocab_size, (args.B, args.T), device="cuda", generator=gen)
        seed = int(torch.randint(0, 1_000_000_000, (1,), generator=seeds))
        with torch.inference_mode():
            perturb(params, seed, args.eps)
            loss1 = model(input_ids=ids, labels=ids).loss
            perturb(params, seed, -2 * args.eps)
            loss2 = model(input_ids=ids, labels=ids).loss
            perturb(params, seed, args.eps)
            projected_grad = ((loss1 - loss2) / (2 * args.eps)).item()
            update(params, seed, projected_grad, args.lr, args.weight_decay)
        losses.append((loss1.item() + loss2.item()) / 2)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t_start
    tokens = (args.steps - args.warmup) * args.B * args.T
    print(json.dumps({"tokens_per_second": tokens / elapsed, "step_ms": 1000 * elapsed / (args.steps - args.warmup),
                      "allocator_peak": torch.cuda.max_memory_allocated(),
                      "max_memory_reserved": torch.cuda.max_memory_reserved(), "device_peak": sampler.finish(),
                      "first_loss": losses[0], "last_loss": losses[-1],
                      "attention": model.config._attn_implementation, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
