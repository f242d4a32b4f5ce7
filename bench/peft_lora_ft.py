#!/usr/bin/env python3
"""The PyTorch + PEFT side of bench/lora_ft.py: LoRA (r, alpha, dropout on all
linear modules of the layers (the seven of LLaMA; Phi-3's fused qkv_proj and
gate_up_proj), PEFT's defaults otherwise) on a bf16 base, or QLoRA with
bitsandbytes (NF4, double quantization, bf16 compute), with bf16 autocast,
fp32 adapters and fused AdamW, optionally with gradient checkpointing, on
random tokens, optionally torch.compile'd. The model is built in bf16 on the GPU (random weights: speed
and memory do not depend on them); for QLoRA its linear layers are then
replaced by bitsandbytes' Linear4bit. Peaks are measured from the first
training step on: the allocator's, and the device's used memory sampled
every 50 ms. Prints one JSON line."""
import argparse
import json
import os
import threading
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from torch_train import train


def layer_linears(model):
    """The names of the linear modules inside the decoder layers (PEFT's
    target names): q_proj ... down_proj, or Phi-3's qkv_proj, o_proj,
    gate_up_proj and down_proj."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and ".layers." in n})


class DeviceSampler:
    def __init__(self):
        self.peak, self.stop = 0, False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop:
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            time.sleep(0.05)

    def finish(self):
        self.stop = True
        self.thread.join()
        return self.peak


def quantize_linears(model, modules):
    import bitsandbytes as bnb
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if name not in modules:
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, blocksize=64).cuda()
                setattr(parent, name, q)
                del child
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--qlora", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the PEFT model (compiled in the warm-up)")
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(args.config)))
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    torch.set_default_dtype(torch.float32)
    modules = layer_linears(model)
    if args.qlora:
        quantize_linears(model, modules)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    lcfg = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=modules,
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)  # adapters in fp32 (autocast_adapter_dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if args.compile:
        model = torch.compile(model)
    trainable = sum(p.numel() for p in params)
    # ids below 32000, as lora_ft.py's data for memtune: the two sides' losses on one scale
    result = train(model, params, min(config.vocab_size, 32000), args, DeviceSampler)
    result["trainable"] = trainable
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
