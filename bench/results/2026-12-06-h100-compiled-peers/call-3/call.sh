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
bench peer-d0 TinyLlama-1.1B 150 --steps 20 --warmup 5 --dropout 0 --only memtune_LoRA,PEFT_LoRA_compiled
bench ckpt-compiled TinyLlama-1.1B 210 --steps 20 --warmup 5 --dropout 0 --only PEFT_LoRA_ckpt_compiled
# AdamW in one pass (new) against one pass a tensor (old binary)
bench new TinyLlama-1.1B 45 --steps 20 --warmup 5 --dropout 0 --memtune-only --only memtune_LoRA
MT_MEMTUNE_BIN=$PWD/.gpu/memtune-old bench old TinyLlama-1.1B 45 --steps 20 --warmup 5 --dropout 0 --memtune-only --only memtune_LoRA
left=$(( 530 - ($(date +%s) - T0) ))
[ $left -gt 100 ] && { MT_CTEST_FILTER=gpu timeout $left bash tests/gpu/run.sh --stages ctest > /tmp/ctest.txt 2>&1; stamp "ctest gpu rc=$?"; tail -6 /tmp/ctest.txt | tee -a $OUT/log.txt; grep -E ":F:|:E:|Checks" $OUT/ctest-verbose.log | head -8 | tee -a $OUT/log.txt; }
rm -f $OUT/ctest.log
