#!/usr/bin/env bash
OUT=$1
ln -sfn .gpu/build build
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/log.txt; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/log.txt
bench() {  # name shapes timeout args
  local name=$1 shapes=$2 t=$3; shift 3
  MT_LORA_SHAPES=$shapes MT_LORA_ARGS="$* --out /tmp/$name" timeout $t bash tests/gpu/run.sh --stages lora-bench > /tmp/$name.txt 2>&1
  stamp "$name rc=$?"
  grep -vE "^(==|run.sh|name,|NVIDIA)" /tmp/$name.txt | grep -E "tokens/s|^(memtune|PEFT)|x[0-9]|rror|failed" | tee -a $OUT/log.txt
}
bench 7B-d0 Llama-2-7B 330 --steps 10 --warmup 4 --dropout 0 --only memtune_LoRA_ckpt,PEFT_LoRA_ckpt,PEFT_LoRA_ckpt_compiled
bench 7B-d0.05m Llama-2-7B 60 --steps 10 --warmup 4 --dropout 0.05 --memtune-only --only memtune_LoRA_ckpt
tail -30 /tmp/7B-d0.txt > $OUT/7B-d0-tail.txt
left=$(( 560 - ($(date +%s) - T0) ))
[ $left -gt 100 ] && { MT_CTEST_FILTER=gpu timeout $left bash tests/gpu/run.sh --stages ctest > /tmp/ctest.txt 2>&1; stamp "ctest gpu rc=$?"; tail -6 /tmp/ctest.txt | tee -a $OUT/log.txt; grep -E ":F:|:E:|Checks" $OUT/ctest-verbose.log | head -8 | tee -a $OUT/log.txt; }
rm -f $OUT/ctest.log
