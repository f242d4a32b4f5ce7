#!/usr/bin/env python3
"""The PyTorch + transformers side of bench/full_ft.py: full fine-tuning with
fp32 master weights, bf16 autocast, fused AdamW and SDPA attention, on random
tokens, optionally torch.compile'd (compiled in the warm-up). Prints one JSON
line: tokens/s over the timed steps and peak memory."""
import argparse
import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from torch_train import train


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = ap.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig.from_json_file(args.config)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).cuda().float()
    model.train()
    params = list(model.parameters())
    if args.compile:
        model = torch.compile(model)
    print(json.dumps(train(model, params, config.vocab_size, args)), flush=True)


if __name__ == "__main__":
    main()
