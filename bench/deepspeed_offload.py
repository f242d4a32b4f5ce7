#!/usr/bin/env python3
"""DeepSpeed's ZeRO-Offload, the peer of bench/offload.py's `cpu` mode: full
fine-tuning of a Hugging Face LlamaForCausalLM (the shape's config.json,
random initialisation, SDPA attention, activation checkpointing) with ZeRO
stage 2 and the optimizer offloaded to the CPU (DeepSpeedCPUAdam in AdamW
mode, pinned host memory, overlapped communication), bf16 weights and
gradients with fp32 master weights and moments on the host, clipping at 1.0,
on random tokens, one process on one GPU. A user of ZeRO-Offload would write
it this way (DeepSpeed's ZeRO-Offload tutorial's settings).

DeepSpeed builds its CPU Adam with torch's extension loader (ninja and the
host compiler) the first time; that build is done before the timed steps and
reported apart. Prints one JSON line: step ms and tokens/s over the steps
after the warm-up, torch's allocator peak, the first and last loss, the
build's seconds. bench/offload.py --deepspeed runs it beside memtune and
samples the device's and the host's peaks the same way for both.

DeepSpeed is not installed on the GPU machine: its wheel (built from the
sdist here, pure Python) and what it needs travel in .whl/ds
(docs/development.md), which this script puts on its path."""
import argparse
import importlib.util
import json
import os
import sys
import time

# DeepSpeed from .whl/ds where the machine's Python has none (only for this process: its newer
# typing-extensions stays out of the other benches)
if importlib.util.find_spec("deepspeed") is None:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".whl", "ds"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="the shape's config.json")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-5)
    args = ap.parse_args()
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29517"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/mt-deepspeed-ext")

    import torch
    import deepspeed
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    deepspeed.init_distributed(dist_backend="nccl")
    t0 = time.perf_counter()
    config = LlamaConfig.from_json_file(args.config)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    ds_config = {
        "train_micro_batch_size_per_gpu": args.B,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "zero_optimization": {
            "stage": 2,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": 5e8,
            "allgather_bucket_size": 5e8,
        },
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    build = time.perf_counter()
    optimizer = DeepSpeedCPUAdam(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                 adamw_mode=True)
    build = time.perf_counter() - build
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    setup = time.perf_counter() - t0
    gen = torch.Generator(device="cuda").manual_seed(1)
    losses, t_start = [], None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps):
        if step == args.warmup:
            torch.cuda.synchronize()
            t_start = time.perf_counter()
        ids = torch.randint(0, config.vocab_size, (args.B, args.T), device=engine.device, generator=gen)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t_start
    timed = args.steps - args.warmup
    print(json.dumps({"tokens_per_second": timed * args.B * args.T / elapsed, "step_ms": 1000 * elapsed / timed,
                      "max_memory_allocated": torch.cuda.max_memory_allocated(),
                      "max_memory_reserved": torch.cuda.max_memory_reserved(),
                      "first_loss": losses[0].item(), "last_loss": losses[-1].item(),
                      "cpu_adam_build_s": build, "setup_s": setup, "deepspeed": deepspeed.__version__,
                      "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
