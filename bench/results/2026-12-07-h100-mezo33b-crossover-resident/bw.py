import time, torch
n = 1 << 29  # 1 GiB of bf16
h = torch.empty(n, dtype=torch.bfloat16, pin_memory=True); h2 = torch.empty_like(h, pin_memory=True)
d = torch.empty(n, dtype=torch.bfloat16, device="cuda"); d2 = torch.empty_like(d)
s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
def run(up, down, reps=5):
    for k in range(reps + 1):
        if k == 1:
            torch.cuda.synchronize(); t = time.perf_counter()
        if up:
            with torch.cuda.stream(s1): d.copy_(h, non_blocking=True)
        if down:
            with torch.cuda.stream(s2): h2.copy_(d2, non_blocking=True)
    torch.cuda.synchronize()
    return reps * n * 2 / (time.perf_counter() - t) / 1e9
print(f"host to device alone {run(1,0):.1f} GB/s; device to host alone {run(0,1):.1f} GB/s; both at once: {run(1,1):.1f} GB/s each way")
