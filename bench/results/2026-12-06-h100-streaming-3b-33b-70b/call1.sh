#!/usr/bin/env bash
# session 2026-12-06d call 1: the GPU suites (5595686's copy streams, the branchless mt_qmap_round), then
# streamed MeZO 33B at B=8 against its resident twin after the two-stream fix (issue 26), then the
# 16 GiB long-context row (issue 28) while time lasts
OUT=$1
ln -sfn .gpu/build build
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/stamps.txt; }
END=${END:-560}
lim() { local left=$(( END - ($(date +%s) - T0) )); [ $left -lt 1 ] && left=1; [ $left -lt $1 ] && echo $left || echo $1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; free -g | sed -n 2p
MT_CTEST_FILTER=gpu timeout $(lim 150) bash tests/gpu/run.sh --stages ctest > $OUT/ctest.txt 2>&1; stamp "ctest rc=$?"
grep -E "tests passed|Passed|Failed|\*\*\*" $OUT/ctest.txt | head -8
MT_STREAMING_ARGS="--cases mezo-30b --batches 8 --steps 6 --warmup 2" timeout $(lim 300) bash tests/gpu/run.sh --stages streaming-bench > $OUT/stream.txt 2>&1; stamp "streaming rc=$?"
grep -E "^mezo|bandwidth|x the resident|error|memory \(GPU\)|memory \(host\)|forecast|plan" $OUT/stream.txt | head -20
MT_LONG_ARGS="--budgets 16" timeout $(lim 200) bash tests/gpu/run.sh --stages long-context > $OUT/long.txt 2>&1; stamp "long rc=$?"
grep -iE "tokens|GiB|chose|keeps|unsloth|error" $OUT/long.txt | tail -12
cd $OUT && tar czf logs.tgz ctest.txt stream.txt long.txt streaming_bench.json long_context.json stamps.txt 2>/dev/null
