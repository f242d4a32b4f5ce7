#!/usr/bin/env python3
"""The 8-bit reference of bench/int8_moments.py: how far bitsandbytes'
AdamW8bit's losses move from PyTorch's fp32 AdamW's on the same run.

A shape of bench/lora_ft.py's table, random initialisation (seed 0), fp32
weights with bf16 autocast and SDPA, over the tokens of a memtune dataset
(.h5: windows of T + 1 tokens at a stride of T, shuffled with seed 0, the
last 1% held out): B rows a step, lr with 10 linear warm-up steps and a
cosine to a tenth (memtune's schedule), global-norm clipping at 1.0, no
weight decay. The same run twice, torch.optim.AdamW(fused=True) and
bnb.optim.AdamW8bit, from the same weights over the same batches. Prints
one JSON line: the training loss every 10 steps, the eval loss (4 batches of
the held-out windows) every --eval-every steps, for both, and the largest
relative differences."""
import argparse
import json
import math
import os
import sys

import h5py
import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_ft import SHAPES  # noqa: E402


def lr_at(step, steps, lr, warmup=10):
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def run(config, windows, train_idx, eval_idx, optimizer, args):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").cuda().float()
    model.train()
    params = list(model.parameters())
    if optimizer == "bnb":
        import bitsandbytes as bnb
        opt = bnb.optim.AdamW8bit(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)

    def loss_of(rows):
        batch = torch.from_numpy(windows[rows].astype(np.int64)).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=batch[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 batch[:, 1:].reshape(-1))

    train, evals = {}, {}
    for step in range(args.steps):
        rows = train_idx[(step * args.B + np.arange(args.B)) % len(train_idx)]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        loss = loss_of(rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 10 == 0:
            train[step + 1] = loss.item()
        if (step + 1) % args.eval_every == 0:
            model.eval()
            with torch.no_grad():
                evals[step + 1] = sum(loss_of(eval_idx[b * args.B:(b + 1) * args.B]).item() for b in range(4)) / 4
            model.train()
    del model, opt, params
    torch.cuda.empty_cache()
    return train, evals


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="TinyLlama-1.1B")
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--eval-every", type=int, default=50)
    args = ap.parse_args()
    config = AutoConfig.for_model(**{k: v for k, v in SHAPES[args.shape].items() if k != "architectures"})
    with h5py.File(args.data, "r") as f:
        tokens = np.asarray(f["tokens"][:])
    n = (len(tokens) - 1) // args.T
    windows = np.stack([tokens[i * args.T:i * args.T + args.T + 1] for i in range(n)])
    order = np.random.default_rng(0).permutation(n)
    held = max(4 * args.B, n // 100)
    train_idx, eval_idx = order[:-held], order[-held:]
    out = {"shape": args.shape, "steps": args.steps, "B": args.B, "T": args.T}
    for name in ("fp32", "bnb"):
        out[name] = dict(zip(("train", "eval"), run(config, windows, train_idx, eval_idx, name, args)))
    worst = {"train": 0.0, "eval": 0.0}
    for kind in worst:
        for step, ref in out["fp32"][kind].items():
            worst[kind] = max(worst[kind], abs(out["bnb"][kind][step] - ref) / ref)
    out["worst"] = worst
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
