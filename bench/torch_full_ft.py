#!/usr/bin/env python3
"""The PyTorch + transformers side of bench/full_ft.py: full fine-tuning with
fp32 master weights, bf16 autocast, fused AdamW and SDPA attention, on random
tokens. Prints one JSON line: tokens/s over the timed steps and peak memory."""
import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=1024)
    args = ap.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig.from_json_file(args.config)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).cuda().float()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(1)
    torch.cuda.reset_peak_memory_stats()
    losses, t_start = [], None
    for step in range(args.steps):
        if step == args.warmup:
            torch.cuda.synchronize()
            t_start = time.perf_counter()
        ids = torch.randint(0, config.vocab_size, (args.B, args.T), device="cuda", generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t_start
    tokens = (args.steps - args.warmup) * args.B * args.T
    print(json.dumps({"tokens_per_second": tokens / elapsed, "step_ms": 1000 * elapsed / (args.steps - args.warmup),
                      "max_memory_allocated": torch.cuda.max_memory_allocated(),
                      "max_memory_reserved": torch.cuda.max_memory_reserved(),
                      "first_loss": losses[0], "last_loss": losses[-1]}), flush=True)


if __name__ == "__main__":
    main()
