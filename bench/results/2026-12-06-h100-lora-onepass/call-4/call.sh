#!/usr/bin/env bash
OUT=$1
ln -sfn .gpu/build build
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/log.txt; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/log.txt
MT_CTEST_FILTER=gpu timeout 150 bash tests/gpu/run.sh --stages ctest > /tmp/ctest.txt 2>&1; stamp "ctest rc=$?"
tail -3 /tmp/ctest.txt | tee -a $OUT/log.txt; grep -E ":F:|:E:|Checks|LoRA fused" $OUT/ctest-verbose.log | head -8 | tee -a $OUT/log.txt
rm -f $OUT/ctest.log
timeout 40 bash tests/gpu/run.sh --stages lora-ops > /tmp/lora-ops-stage.txt 2>&1; stamp "lora ops rc=$?"
grep -v "^==" /tmp/lora-ops-stage.txt | tail -16 | tee -a $OUT/log.txt; rm -f $OUT/lora_ops.log
for round in 1 2; do
  for d in 0 0.05; do
    name=r$round-d$d
    MT_LORA_SHAPES=TinyLlama-1.1B MT_LORA_ARGS="--steps 20 --warmup 5 --memtune-only --only memtune_LoRA,memtune_LoRA_ckpt --dropout $d --out /tmp/$name" \
      timeout 45 bash tests/gpu/run.sh --stages lora-bench > /tmp/$name.txt 2>&1; stamp "$name rc=$?"
    grep -E "^memtune" /tmp/$name.txt | cut -c1-100 | tee -a $OUT/log.txt
  done
done
rm -f $OUT/lora_bench.log
