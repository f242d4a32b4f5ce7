#!/usr/bin/env bash
OUT=$1
ln -sfn .gpu/build build
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/stamps.txt; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt
MT_CTEST_FILTER=gpu timeout 170 bash tests/gpu/run.sh --stages ctest > $OUT/ctest.txt 2>&1; stamp "ctest rc=$?"
tail -4 $OUT/ctest.txt; grep -E ":F:|:E:|LoRA fused|LoRA: " $OUT/ctest-verbose.log | head -12
for d in 0.05 0; do
  for f in 1 0; do
    MT_LORA_FUSED=$f MT_LORA_SHAPES=TinyLlama-1.1B MT_LORA_ARGS="--steps 20 --warmup 5 --memtune-only --only memtune_LoRA,memtune_LoRA_ckpt --dropout $d --out $OUT/f$f-d$d" \
      timeout 80 bash tests/gpu/run.sh --stages lora-bench > $OUT/f$f-d$d.txt 2>&1; stamp "fused=$f dropout=$d rc=$?"
    grep -E "^memtune" $OUT/f$f-d$d.txt | cut -c1-120
  done
done
