#!/usr/bin/env bash
# per-kernel profiles of the LoRA step (dropout 0): Gemma-3-1B and Qwen3-1.7B shapes, and TinyLlama-1.1B
OUT=$1
ln -sfn .gpu/build build
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/stamps.txt; }
python3 -c "import sys; sys.path.insert(0, 'bench'); import lora_ft; [lora_ft.shape_folder('/tmp/fam', s) for s in ('Gemma-3-1B', 'Qwen3-1.7B')]"
for shape in /tmp/fam/Gemma-3-1B /tmp/fam/Qwen3-1.7B 1.1B; do
    MT_PROFILE_SHAPE=$shape MT_PROFILE_MODES=lora timeout 160 bash tests/gpu/run.sh --stages profile > $OUT/prof.txt 2>&1
    stamp "profile $shape rc=$?"
    grep -E "attention:|tok/s" /tmp/mt-profile/lora-timed.log | tail -2 | cut -c1-300
    tail -5 $OUT/profile.log
    for f in $OUT/profile-*lora.md; do head -32 $f; mv $f $f.done; done
done
cd $OUT && tar czf profiles.tgz profile-*.csv profile-*.done && rm -f profile-*.csv
