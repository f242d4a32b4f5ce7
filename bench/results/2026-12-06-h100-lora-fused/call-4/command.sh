#!/usr/bin/env bash
OUT=$1
ln -sfn .gpu/build build
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/stamps.txt; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt
cat $OUT/env.txt
MT_CTEST_FILTER=gpu timeout 150 bash tests/gpu/run.sh --stages ctest > $OUT/ctest.txt 2>&1; stamp "ctest rc=$?"
tail -4 $OUT/ctest.txt; grep -E ":F:|:E:|LoRA fused|LoRA: " $OUT/ctest-verbose.log | head -12
cudnn=$(python3 -c 'import os, nvidia.cudnn; print(os.path.join(list(nvidia.cudnn.__path__)[0], "lib"))' 2>/dev/null)
LD_LIBRARY_PATH=/tmp/mt-libs:$PWD/build/gpu-libs:$cudnn:$LD_LIBRARY_PATH timeout 40 build/mt_lora_bench 50 > $OUT/lora_ops.txt 2>&1; stamp "lora ops rc=$?"
cat $OUT/lora_ops.txt
for d in 0.05 0; do
  for f in 1 0 dx; do
    only=memtune_LoRA,memtune_LoRA_ckpt; [ $f = dx ] && only=memtune_LoRA
    MT_LORA_FUSED=$f MT_LORA_SHAPES=TinyLlama-1.1B MT_LORA_ARGS="--steps 20 --warmup 5 --memtune-only --only $only --dropout $d --out $OUT/f$f-d$d" \
      timeout 60 bash tests/gpu/run.sh --stages lora-bench > $OUT/f$f-d$d.txt 2>&1; stamp "fused=$f dropout=$d rc=$?"
    grep -E "^memtune" $OUT/f$f-d$d.txt | cut -c1-120
  done
done
