#!/usr/bin/env bash
# session 2026-12-07d: the GPU suites (model.resident_layers' CUDA path: its tickets, resident MeZO slots), then
# issue 26's MeZO 33B crossover: streamed, half resident (cpu:30) and resident at the batches in BATCHES
O=$OUT
ln -sfn .gpu/build build
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $O/stamps.txt; }
END=${END:-585}
lim() { local left=$(( END - ($(date +%s) - T0) )); [ $left -lt 1 ] && left=1; [ $left -lt $1 ] && echo $left || echo $1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; free -g | sed -n 2p
if [ "${CT:-0}" = 1 ]; then
  MT_CTEST_FILTER=gpu timeout $(lim 150) bash tests/gpu/run.sh --stages ctest > $O/ctest.txt 2>&1; stamp "ctest rc=$?"
  grep -E "tests passed|Passed|Failed|\*\*\*|streamed weights|resident" $O/ctest.txt | head -12
fi
OUT=$O/stream MT_STREAMING_ARGS="--cases mezo-30b --batches ${BATCHES:-1,2} --weights ${W:-gpu,cpu,cpu:30} --steps ${STEPS:-5} --warmup 2" \
  timeout $(lim 560) bash tests/gpu/run.sh --stages streaming-bench > $O/stream.txt 2>&1; stamp "streaming rc=$?"
grep -E "^mezo|bandwidth|x the resident|error|memory \(GPU\)|auto" $O/stream.txt | head -40
