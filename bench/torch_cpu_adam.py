#!/usr/bin/env python3
"""torch's CPU AdamW on one fp32 parameter of N elements (fp32 gradient),
timed per step.step() after a warm-up: the default implementation (foreach)
and fused=True where this torch has it on the CPU. One JSON line per case,
in parameters per second; bench/offload.py sets them beside memtune's."""
import argparse
import json
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--millions", type=float, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default="")
    args = ap.parse_args()
    n = int(args.millions * 1e6)
    counts = [int(t) for t in args.threads.split(",") if t] or [torch.get_num_threads()]
    p = torch.nn.Parameter(torch.linspace(-0.5, 0.5, n))
    p.grad = torch.linspace(-1, 1, n)
    for threads in counts:
        torch.set_num_threads(threads)
        for variant in ("default", "fused"):
            kw = {"fused": True} if variant == "fused" else {}
            try:
                opt = torch.optim.AdamW([p], lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, **kw)
                opt.step()
            except (RuntimeError, TypeError) as e:
                print(json.dumps({"impl": "torch", "variant": variant, "threads": threads, "error": str(e)[:200]}))
                continue
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                opt.step()
            dt = (time.perf_counter() - t0) / args.repeats
            print(json.dumps({"impl": "torch", "variant": variant, "threads": threads, "params": n, "seconds": dt,
                              "params_per_second": n / dt, "torch": torch.__version__}), flush=True)
            del opt


if __name__ == "__main__":
    main()
