#!/usr/bin/env bash
# issue 25 on the GPU: the family parity shapes at two sizes and the saved models, then the Qwen3-1.7B LoRA row
OUT=$1
ln -sfn .gpu/build build
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/stamps.txt; }
MT_PARITY_ARGS="--only qwen3-small,qwen3-0.6b,gemma3-small,gemma3-1b,phi3-small,phi3-mini-4-layers,saved" \
    timeout 270 bash tests/gpu/run.sh --stages parity > $OUT/parity.txt 2>&1; stamp "parity rc=$?"
grep -E "^== |loss: |logits rel|min cos|FAIL|passed|Error|error|  [a-z_.]+ +[0-9]+ +[0-9.]+ " $OUT/parity.txt | cut -c1-200 | head -120
left=$(( 510 - ($(date +%s) - T0) ))
MT_LORA_SHAPES=Qwen3-1.7B MT_LORA_ARGS="--steps 12 --warmup 4 --only memtune_LoRA,PEFT_LoRA,PEFT_LoRA_compiled" \
    timeout $left bash tests/gpu/run.sh --stages lora-bench > $OUT/lora-qwen3.txt 2>&1; stamp "lora qwen3 rc=$?"
grep -vE "^\s*$" $OUT/lora-qwen3.txt | cut -c1-400 | tail -30
