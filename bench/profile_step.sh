#!/usr/bin/env bash
# Per-kernel GPU time of training steps (Nsight Compute), on a 2-layer model
# of the TinyLlama-1.1B width at B=4, T=1024: per-layer kernels are the same
# as the full model's. Run on the GPU machine from the repo root after
# tests/gpu/run.sh has set up the library path; writes $OUT/profile.csv.
set -euo pipefail
OUT=${OUT:-/tmp}
W=/tmp/mt-profile
mkdir -p $W/model
python3 - <<'PY'
import json, numpy as np, h5py
cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
       "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 4, "rms_norm_eps": 1e-5,
       "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32"}
json.dump(cfg, open("/tmp/mt-profile/model/config.json", "w"))
with h5py.File("/tmp/mt-profile/tokens.h5", "w") as f:
    n = 40000
    f["tokens"] = np.random.default_rng(0).integers(0, 32000, n).astype(np.uint32)
    f["doc_offsets"] = np.array([0, n], dtype=np.uint64)
    f.attrs["format_version"] = np.int32(1); f.attrs["vocab_size"] = np.int64(32000); f.attrs["tokenizer"] = "random"
PY
# the second step's kernels: skip the first step (and start-up)
ncu --csv --metrics gpu__time_duration.sum --launch-skip 150 --launch-count 150 \
    build/memtune train configs/quickstart.yaml --set model.path=$W/model --set model.init=random \
    --set data.train=$W/tokens.h5 --set data.eval_fraction=0 --set train.eval_batches=0 --set train.steps=3 --set optim.warmup_steps=0 \
    --set train.micro_batch=4 --set train.seq_len=1024 --set train.device=gpu --set output.dir=$W/run \
    --set output.save_model=false > $OUT/profile.csv 2> $W/ncu.err || { tail -20 $W/ncu.err; exit 1; }
python3 - "$OUT/profile.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head = rows[0]; ki = head.index("Kernel Name"); vi = head.index("Metric Value"); ui = head.index("Metric Unit")
tot = collections.Counter(); cnt = collections.Counter()
for r in rows[1:]:
    scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0}.get(r[ui], 1e-6)
    name = r[ki].split("(")[0].replace("void ", "")[:60]
    tot[name] += float(r[vi].replace(",", "")) * scale; cnt[name] += 1
s = sum(tot.values())
print(f"total {s:.2f} ms over {sum(cnt.values())} kernels")
for k, v in tot.most_common(25): print(f"{v:8.3f} ms {100*v/s:5.1f}%  x{cnt[k]:<4d} {k}")
PY
