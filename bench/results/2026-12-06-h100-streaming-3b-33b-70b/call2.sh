#!/usr/bin/env bash
# session 2026-12-06d call 2: the 24 GiB long-context row (issue 28), then streamed QLoRA 70B and full 3B
# against what fits resident (issue 26), while time lasts
OUT=$1
ln -sfn .gpu/build build
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/stamps.txt; }
END=${END:-560}
lim() { local left=$(( END - ($(date +%s) - T0) )); [ $left -lt 1 ] && left=1; [ $left -lt $1 ] && echo $left || echo $1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
MT_LONG_ARGS="--budgets 24" timeout $(lim 260) bash tests/gpu/run.sh --stages long-context > $OUT/long.txt 2>&1; stamp "long rc=$?"
grep -iE "tokens|GiB|chose|keeps|unsloth|error" $OUT/long.txt | tail -6
MT_STREAMING_ARGS="--cases full-3b,qlora-70b --steps 4 --warmup 1" timeout $(lim 300) bash tests/gpu/run.sh --stages streaming-bench > $OUT/stream.txt 2>&1; stamp "streaming rc=$?"
grep -E "^(qlora|full|mezo)|bandwidth|x the resident|rror|forecast" $OUT/stream.txt | head -20
cd $OUT && tar czf logs.tgz long.txt stream.txt streaming_bench.json long_context.json long_context.log stamps.txt 2>/dev/null; rm -f long_context.log streaming_bench.log
