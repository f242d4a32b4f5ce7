#!/usr/bin/env bash
# Per-kernel GPU time of one training step (Nsight Compute), on the
# TinyLlama-1.1B shape (22 layers, random weights) at B=4, T=1024, or with
# MT_PROFILE_SHAPE=7B the Llama-2-7B shape (32 layers), or a model folder's
# config.json (MT_PROFILE_SHAPE=DIR; token ids below 32000): the third step alone
# (MT_PROFILE_STEP brackets it with the profiler's capture range).
# Modes (arguments; default "full lora lora-dropout mezo"):
#   full          full fine-tune (AdamW), configs/quickstart.yaml's settings
#   lora          LoRA r=16 on all linear modules, dropout 0
#   lora-dropout  the same with dropout 0.05
#   lora-ckpt     LoRA dropout 0 with activation checkpointing
#   lora-ckpt-dropout  the same with dropout 0.05
#   mezo          MeZO on all weights
#   galore        GaLore r=128, fp32 moments, activation checkpointing (configs/galore.yaml)
# Each mode also runs 8 steps without the profiler for its step time. Run on
# the GPU machine from the repo root after tests/gpu/run.sh has set up the
# library path (or through its stage `profile`); writes $OUT/profile-MODE.csv
# and a table, $OUT/profile-MODE.md (profile-7B-MODE.* for the 7B shape, profile-DIRNAME-MODE.*
# for a folder's).
set -euo pipefail
OUT=${OUT:-/tmp}
BUILD=${MT_BUILD_DIR:-build}
W=/tmp/mt-profile
mkdir -p $W/model
SHAPE=${MT_PROFILE_SHAPE:-1.1B}
case $SHAPE in
    1.1B) TAG= ;;
    7B) TAG=7B- ;;
    *) [ -f "$SHAPE/config.json" ] ||
        { echo "profile_step.sh: MT_PROFILE_SHAPE is $SHAPE; it must be 1.1B, 7B or a folder holding a config.json"; exit 2; }
       TAG=$(basename "$SHAPE")- ;;
esac
python3 - "$SHAPE" <<'PY'
import json, os, sys, numpy as np, h5py
cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
       "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4, "rms_norm_eps": 1e-5,
       "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
       "max_position_embeddings": 2048}
if sys.argv[1] == "7B":
    cfg.update(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_key_value_heads=32,
               max_position_embeddings=4096)
if os.path.isdir(sys.argv[1]):  # another shape (e.g. one of bench/lora_ft.py's families): its config.json
    cfg = json.load(open(os.path.join(sys.argv[1], "config.json")))
json.dump(cfg, open("/tmp/mt-profile/model/config.json", "w"))
with h5py.File("/tmp/mt-profile/tokens.h5", "w") as f:
    n = 200000
    V = min(cfg["vocab_size"], 32000)
    f["tokens"] = np.random.default_rng(0).integers(0, V, n).astype(np.uint32)
    f["doc_offsets"] = np.array([0, n], dtype=np.uint64)
    f.attrs["format_version"] = np.int32(1); f.attrs["vocab_size"] = np.int64(V); f.attrs["tokenizer"] = "random"
PY
common=(--set model.path=$W/model --set model.init=random --set data.train=$W/tokens.h5 --set data.eval_fraction=0
        --set train.eval_batches=0 --set optim.warmup_steps=0 --set train.micro_batch=4 --set train.seq_len=1024
        --set train.grad_accum=1 --set train.log_every=1 --set train.device=gpu --set output.dir=$W/run
        --set output.save_model=false --set checkpoint.every=0 --set checkpoint.final=false)
modes=${*:-full lora lora-dropout mezo}
for mode in $modes; do
    case $mode in
        full) cfg=(configs/quickstart.yaml) ;;
        lora) cfg=(configs/llama-lora.yaml --set lora.dropout=0 --set model.activation_checkpointing=false) ;;
        lora-dropout) cfg=(configs/llama-lora.yaml --set lora.dropout=0.05 --set model.activation_checkpointing=false) ;;
        lora-ckpt) cfg=(configs/llama-lora.yaml --set lora.dropout=0 --set model.activation_checkpointing=true) ;;
        lora-ckpt-dropout)
            cfg=(configs/llama-lora.yaml --set lora.dropout=0.05 --set model.activation_checkpointing=true) ;;
        mezo) cfg=(configs/mezo.yaml --set train.micro_batch=4) ;;
        galore) cfg=(configs/galore.yaml) ;;
        *) echo "profile_step.sh: unknown mode $mode (full lora lora-dropout lora-ckpt lora-ckpt-dropout mezo galore)"; exit 2 ;;
    esac
    rm -rf $W/run
    "$BUILD/memtune" train "${cfg[@]}" "${common[@]}" --set train.steps=8 > $W/$mode-timed.log 2>&1 ||
        { tail -20 $W/$mode-timed.log; exit 1; }
    rm -rf $W/run
    MT_PROFILE_STEP=3 ncu --csv --clock-control none --profile-from-start off --metrics gpu__time_duration.sum \
        "$BUILD/memtune" train "${cfg[@]}" "${common[@]}" --set train.steps=3 > $OUT/profile-$TAG$mode.csv 2> $W/ncu.err ||
        { tail -20 $W/ncu.err; exit 1; }
    python3 - "$OUT/profile-$TAG$mode.csv" "$W/$mode-timed.log" "$TAG$mode" > $OUT/profile-$TAG$mode.md <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head = rows[0]; ki = head.index("Kernel Name"); vi = head.index("Metric Value"); ui = head.index("Metric Unit")
tot = collections.Counter(); cnt = collections.Counter()
for r in rows[1:]:
    scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0}.get(r[ui], 1e-6)
    name = r[ki].split("(")[0].replace("void ", "").split("<")[0][:70]
    tot[name] += float(r[vi].replace(",", "")) * scale; cnt[name] += 1
s = sum(tot.values())
print(f"### {sys.argv[3]}: {s:.2f} ms of kernels in one step, {sum(cnt.values())} launches")
log = [l for l in open(sys.argv[2]) if "step" in l and "tok/s" in l]
if log: print(f"last timed step (no profiler): `{log[-1].strip()}`")
print("\n| kernel | ms | share | launches |\n|---|---|---|---|")
for k, v in tot.most_common(30): print(f"| {k} | {v:.3f} | {100*v/s:.1f}% | {cnt[k]} |")
PY
    cat $OUT/profile-$TAG$mode.md
done
