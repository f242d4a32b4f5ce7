#!/usr/bin/env bash
# issue 25: the Gemma-3-1B and Phi-3-mini LoRA rows beside PEFT (eager and compiled)
OUT=$1
ln -sfn .gpu/build build
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/stamps.txt; }
MT_LORA_SHAPES=Gemma-3-1B,Phi-3-mini MT_LORA_ARGS="--steps 12 --warmup 4 --only memtune_LoRA,PEFT_LoRA,PEFT_LoRA_compiled" \
    timeout 540 bash tests/gpu/run.sh --stages lora-bench > $OUT/lora-gemma-phi.txt 2>&1; stamp "lora gemma phi rc=$?"
grep -vE "^\s*$" $OUT/lora-gemma-phi.txt | cut -c1-400 | tail -40
