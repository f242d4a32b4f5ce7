#!/usr/bin/env bash
# session 2026-12-07 (b) call 1: the GPU suites (first GPU run of the page-locked checkpoint copies, the parallel
# copy, the int8 pieces, the streaming timeline), the 16-core store pass, the offload bench on the 1.1B shape
# (issue 27), full-3b streamed with its timeline, then full-7b streamed against resident (issue 26)
OUT=$1
ln -sfn .gpu/build build
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/stamps.txt; }
END=${END:-570}
lim() { local left=$(( END - ($(date +%s) - T0) )); [ $left -lt 1 ] && left=1; [ $left -lt $1 ] && echo $left || echo $1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; free -g | sed -n 2p
MT_CTEST_FILTER=gpu timeout $(lim 150) bash tests/gpu/run.sh --stages ctest > $OUT/ctest.txt 2>&1; stamp "ctest rc=$?"
grep -E "tests passed|Passed|Failed|\*\*\*" $OUT/ctest.txt | head -8
timeout $(lim 40) build/mt_cpu_adam_bench 256 5 15 > $OUT/adam.txt 2>&1; stamp "adam rc=$?"
tail -8 $OUT/adam.txt
MT_OFFLOAD_ARGS="--shapes TinyLlama-1.1B --modes none,none-ckpt,cpu,cpu-int8,cpu-ckpt --skip-adam --steps 12 --warmup 4" \
  timeout $(lim 200) bash tests/gpu/run.sh --stages offload-bench > $OUT/offload.txt 2>&1; stamp "offload rc=$?"
grep -vE "^\s*$" $OUT/offload.txt | tail -30
MT_STREAMING_ARGS="--cases full-3b --steps 4 --warmup 1 --trace-step 2" timeout $(lim 120) bash tests/gpu/run.sh --stages streaming-bench > $OUT/stream3b.txt 2>&1; stamp "full-3b rc=$?"
grep -E "^(qlora|full|mezo)|^  (memory|base)|bandwidth|x the resident|rror|forecast|trace" $OUT/stream3b.txt | head -20
mv $OUT/streaming_bench.json $OUT/streaming_bench_3b.json 2>/dev/null
MT_STREAMING_ARGS="--cases full-7b --steps 3 --warmup 1" timeout $(lim 400) bash tests/gpu/run.sh --stages streaming-bench > $OUT/stream7b.txt 2>&1; stamp "full-7b rc=$?"
grep -E "^(qlora|full|mezo)|^  (memory|base)|bandwidth|x the resident|rror|forecast" $OUT/stream7b.txt | head -20
cd $OUT && find . -name '*.json' | head; tar czf logs.tgz *.txt *.json 2>/dev/null; rm -f $OUT/*.log
