#!/usr/bin/env python3
"""The PyTorch + PEFT side of bench/lora_ft.py: LoRA (r, alpha, dropout on all
seven linear modules, PEFT's defaults otherwise) on a bf16 base, or QLoRA with
bitsandbytes (NF4, double quantization, bf16 compute), with bf16 autocast,
fp32 adapters and fused AdamW, optionally with gradient checkpointing, on
random tokens. The model is built in bf16 on the GPU (random weights: speed
and memory do not depend on them); for QLoRA its linear layers are then
replaced by bitsandbytes' Linear4bit. Peaks are measured from the first
training step on: the allocator's, and the device's used memory sampled
every 50 ms. Prints one JSON line."""
import argparse
import json
import threading
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


def quantize_linears(model):
    import bitsandbytes as bnb
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if name not in MODULES:
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
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    config = LlamaConfig.from_json_file(args.config)
    config._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    if args.qlora:
        quantize_linears(model)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    lcfg = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=MODULES,
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)  # adapters in fp32 (autocast_adapter_dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    sampler = DeviceSampler()
    losses, t_start = [], None
    for step in range(args.steps):
        if step == args.warmup:
            torch.cuda.synchronize()
            t_start = time.perf_counter()
        ids = torch.randint(0, config.vocab_size, (args.B, args.T), device="cuda", generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t_start
    device_peak = sampler.finish()
    tokens = (args.steps - args.warmup) * args.B * args.T
    print(json.dumps({"tokens_per_second": tokens / elapsed, "step_ms": 1000 * elapsed / (args.steps - args.warmup),
                      "max_memory_allocated": torch.cuda.max_memory_allocated(),
                      "max_memory_reserved": torch.cuda.max_memory_reserved(),
                      "device_used_peak": device_peak, "trainable": trainable,
                      "first_loss": losses[0], "last_loss": losses[-1]}), flush=True)


if __name__ == "__main__":
    main()
