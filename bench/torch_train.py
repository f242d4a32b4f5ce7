"""The PyTorch training loop the bench/ peers share: random tokens, bf16
autocast, loss through labels=, clipping at 1.0, fused AdamW (lr 1e-4, betas
0.9/0.95, no decay), tokens/s over the steps after the warm-up and the
allocator's peaks from the first step on (and the device's, with a sampler).
The losses stay on the GPU until the end: no host sync inside the loop."""
import time

import torch


def train(model, params, vocab, args, sampler_class=None):
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    sampler = sampler_class() if sampler_class else None
    losses, t_start = [], None
    for step in range(args.steps):
        if step == args.warmup:
            torch.cuda.synchronize()
            t_start = time.perf_counter()
        ids = torch.randint(0, vocab, (args.B, args.T), device="cuda", generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t_start
    tokens = (args.steps - args.warmup) * args.B * args.T
    result = {"tokens_per_second": tokens / elapsed, "step_ms": 1000 * elapsed / (args.steps - args.warmup),
              "max_memory_allocated": torch.cuda.max_memory_allocated(),
              "max_memory_reserved": torch.cuda.max_memory_reserved(),
              "first_loss": losses[0].item(), "last_loss": losses[-1].item()}
    if sampler:
        result["device_used_peak"] = sampler.finish()
    return result
