#!/usr/bin/env bash
OUT=$1
ln -sfn .gpu/build build
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/log.txt; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/log.txt
MT_PROFILE_MODES=mezo timeout 150 bash tests/gpu/run.sh --stages profile > /tmp/prof.txt 2>&1; stamp "profile mezo rc=$?"
grep -E "^###|^last|^\|" /tmp/prof.txt | head -40 | tee -a $OUT/log.txt
MT_MEZO_ARGS="--shapes TinyLlama-1.1B --steps 8 --warmup 2 --forward-iters 5" timeout 150 bash tests/gpu/run.sh --stages mezo-bench > /tmp/mezo.txt 2>&1; stamp "mezo 1.1B rc=$?"
grep -vE "^(==|name,|NVIDIA)" /tmp/mezo.txt | grep -E "ms|x[0-9]|/|rror" | head -30 | tee -a $OUT/log.txt
bench() {  # name shapes timeout args
  local name=$1 shapes=$2 t=$3; shift 3
  MT_LORA_SHAPES=$shapes MT_LORA_ARGS="$* --out /tmp/$name" timeout $t bash tests/gpu/run.sh --stages lora-bench > /tmp/$name.txt 2>&1
  stamp "$name rc=$?"
  grep -vE "^(==|run.sh|name,|NVIDIA)" /tmp/$name.txt | grep -E "tokens/s|^(memtune|PEFT)|x[0-9]|rror|failed" | tee -a $OUT/log.txt
}
bench 1.1B-d0 TinyLlama-1.1B 260 --steps 20 --warmup 5 --dropout 0 --only memtune_LoRA,memtune_LoRA_ckpt,PEFT_LoRA_compiled,PEFT_LoRA_ckpt_compiled
left=$(( 570 - ($(date +%s) - T0) ))
[ $left -gt 60 ] && { MT_DECODE_ARGS="--shapes Llama-2-7B" timeout $left bash tests/gpu/run.sh --stages decode-bench > /tmp/dec.txt 2>&1; stamp "decode 7B rc=$?"; grep -vE "^(==|name,|NVIDIA)" /tmp/dec.txt | tail -25 | tee -a $OUT/log.txt; }
rm -f $OUT/ctest.log $OUT/*.csv
ls $OUT
