#!/usr/bin/env bash
OUT=$1
ln -sfn .gpu/build build
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/stamps.txt; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/env.txt
MT_CTEST_FILTER=gpu timeout 150 bash tests/gpu/run.sh --stages ctest > $OUT/ctest.txt 2>&1; stamp "ctest rc=$?"
tail -4 $OUT/ctest.txt; grep -E ":F:|:E:" $OUT/ctest-verbose.log | head -10
L="python3 bench/lora_ft.py --shapes TinyLlama-1.1B --steps 20 --warmup 5 --memtune-only --only memtune_LoRA,memtune_LoRA_ckpt"
for d in 0.05 0; do
  timeout 60 $L --dropout $d --out $OUT/fused-d$d > $OUT/fused-d$d.txt 2>&1; stamp "fused d$d rc=$?"
  MT_LORA_FUSED=0 timeout 60 $L --dropout $d --out $OUT/unfused-d$d > $OUT/unfused-d$d.txt 2>&1; stamp "unfused d$d rc=$?"
done
grep -h "^memtune\|TinyLlama-1.1B memtune" $OUT/*fused-d*.txt | cut -c1-160
left=$(( 540 - ($(date +%s) - T0) ))
timeout $left python3 bench/lora_ft.py --shapes TinyLlama-1.1B --steps 20 --warmup 5 --dropout 0 \
  --only PEFT_LoRA_compiled,PEFT_LoRA_ckpt --out $OUT/peft-d0 > $OUT/peft-d0.txt 2>&1; stamp "peft d0 rc=$?"
grep -h "^PEFT\|tokens/s x" $OUT/peft-d0.txt
