#!/usr/bin/env bash
# session 2026-12-07 call 1: the GPU suites (test_model_gpu's file-backed layer input, the tensor-at-a-time
# load), the attention bench (T=16384 row), the offload bench with int8 moments and background checkpoints
# on the TinyLlama-1.1B shape (issue 27), the 16-core store pass, then full-3b streamed against resident (issue 26)
OUT=$1
ln -sfn .gpu/build build
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/stamps.txt; }
END=${END:-565}
lim() { local left=$(( END - ($(date +%s) - T0) )); [ $left -lt 1 ] && left=1; [ $left -lt $1 ] && echo $left || echo $1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; free -g | sed -n 2p
MT_CTEST_FILTER=gpu timeout $(lim 150) bash tests/gpu/run.sh --stages ctest > $OUT/ctest.txt 2>&1; stamp "ctest rc=$?"
grep -E "tests passed|Passed|Failed|\*\*\*" $OUT/ctest.txt | head -8
timeout $(lim 90) bash tests/gpu/run.sh --stages attention-bench > $OUT/attn.txt 2>&1; stamp "attention rc=$?"
tail -22 $OUT/attn.txt
timeout $(lim 40) build/mt_cpu_adam_bench 256 5 15 > $OUT/adam.txt 2>&1; stamp "adam rc=$?"
tail -8 $OUT/adam.txt
MT_OFFLOAD_ARGS="--shapes TinyLlama-1.1B --modes none,none-ckpt,cpu,cpu-int8,cpu-int8-delay,cpu-ckpt --skip-adam --steps 12 --warmup 4" \
  timeout $(lim 220) bash tests/gpu/run.sh --stages offload-bench > $OUT/offload.txt 2>&1; stamp "offload rc=$?"
grep -vE "^\s*$" $OUT/offload.txt | tail -30
MT_STREAMING_ARGS="--cases full-3b --steps 4 --warmup 1" timeout $(lim 200) bash tests/gpu/run.sh --stages streaming-bench > $OUT/stream3b.txt 2>&1; stamp "full-3b rc=$?"
grep -E "^(qlora|full|mezo)|^  (memory|base)|bandwidth|x the resident|rror|forecast" $OUT/stream3b.txt | head -20
cd $OUT && tar czf logs.tgz *.txt *.json 2>/dev/null; rm -f $OUT/*.log
