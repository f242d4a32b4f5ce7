#!/usr/bin/env bash
# session 2026-12-06c call 1: GPU suites and resume checks with the new random init (43db726) and the
# forward-only attention workspace (bf339b1), the datty alias and model.gpu_layer_inputs (test_model_gpu);
# the 8B QLoRA r=32 long context at 15 GiB (train.seq_len: max's new choices); full fine-tune 1.1B vs PyTorch
OUT=$1
ln -sfn .gpu/build build
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/stamps.txt; }
END=${END:-580}
lim() { local left=$(( END - ($(date +%s) - T0) )); [ $left -lt 1 ] && left=1; [ $left -lt $1 ] && echo $left || echo $1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; free -g | sed -n 2p
MT_CTEST_FILTER=gpu timeout $(lim 150) bash tests/gpu/run.sh --stages ctest > $OUT/ctest.txt 2>&1; stamp "ctest rc=$?"
tail -4 $OUT/ctest.txt; grep -E ":F:|:E:" $OUT/ctest-verbose.log | head -10
MT_RESUME_ONLY="^(full|MeZO|QLoRA)$" timeout $(lim 120) bash tests/gpu/run.sh --stages resume > $OUT/resume.txt 2>&1; stamp "resume rc=$?"
grep -E "resume on the GPU|NOT RUN" $OUT/resume.txt
MT_LONG_ARGS="--budgets 15 --timeout 150" timeout $(lim 170) bash tests/gpu/run.sh --stages long-context > $OUT/long.txt 2>&1; stamp "long-context rc=$?"
grep -vE "^\s*$" $OUT/long.txt | grep -v "^  " | tail -8
MT_FULL_ARGS="--steps 40 --warmup 10" timeout $(lim 300) bash tests/gpu/run.sh --stages full-bench > $OUT/full.txt 2>&1; stamp "full rc=$?"
grep -vE "^\s*$" $OUT/full.txt | grep -v "^  " | tail -14
cd $OUT && tar czf logs.tgz ctest*.log resume*.txt resume.log long.txt full.txt 2>/dev/null
