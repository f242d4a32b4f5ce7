#!/usr/bin/env bash
OUT=$1
ln -sfn .gpu/build build
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/stamps.txt; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt
cat $OUT/env.txt
MT_CTEST_FILTER=gpu timeout 150 bash tests/gpu/run.sh --stages ctest > $OUT/ctest.txt 2>&1; stamp "ctest rc=$?"
tail -4 $OUT/ctest.txt; grep -E ":F:|:E:|LoRA fused|LoRA: " $OUT/ctest-verbose.log | head -12
timeout 60 bash tests/gpu/run.sh --stages lora-ops > $OUT/lora-ops-stage.txt 2>&1; stamp "lora ops rc=$?"
grep -v "^==" $OUT/lora-ops-stage.txt | head -30
run() {  # name dropout env...
  local name=$1 d=$2; shift 2
  env "$@" MT_LORA_SHAPES=TinyLlama-1.1B MT_LORA_ARGS="--steps 20 --warmup 5 --memtune-only --only memtune_LoRA,memtune_LoRA_ckpt --dropout $d --out $OUT/$name" \
    timeout 60 bash tests/gpu/run.sh --stages lora-bench > $OUT/$name.txt 2>&1; stamp "$name rc=$?"
  grep -E "^memtune" $OUT/$name.txt | cut -c1-110
}
run v2-d0.05 0.05 MT_LORA_KERNELS=2
run v1-d0.05 0.05 MT_LORA_KERNELS=1
run dflt-d0 0 MT_LORA_KERNELS=2
run all-d0 0 MT_LORA_FUSED=all
MT_PROFILE_SHAPE=7B MT_PROFILE_MODES=lora-ckpt-dropout timeout 240 bash tests/gpu/run.sh --stages profile > $OUT/profile-stage.txt 2>&1; stamp "profile 7B rc=$?"
tail -45 $OUT/profile-stage.txt
