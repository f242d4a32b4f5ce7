#!/usr/bin/env bash
# session 2026-12-06c call 2: streamed MeZO 33B at B=8 against its resident twin (issue 26), then the
# quickstart and the QLoRA and MeZO resume checks that resume its model
OUT=$1
ln -sfn .gpu/build build
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/stamps.txt; }
END=${END:-560}
lim() { local left=$(( END - ($(date +%s) - T0) )); [ $left -lt 1 ] && left=1; [ $left -lt $1 ] && echo $left || echo $1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; free -g | sed -n 2p
MT_STREAMING_ARGS="--cases mezo-30b --batches 8 --steps 6 --warmup 2" timeout $(lim 420) bash tests/gpu/run.sh --stages streaming-bench > $OUT/stream.txt 2>&1; stamp "streaming rc=$?"
grep -E "^mezo|bandwidth|x the resident|error|memory \(GPU\)|memory \(host\)|forecast|plan" $OUT/stream.txt | head -20
MT_RESUME_ONLY="^(QLoRA|MeZO)$" timeout $(lim 200) bash tests/gpu/run.sh --stages "quickstart resume" > $OUT/resume.txt 2>&1; stamp "quickstart+resume rc=$?"
grep -E "resume on the GPU|NOT RUN|quickstart" $OUT/resume.txt | tail -8
cd $OUT && tar czf logs.tgz stream.txt resume.txt resume.log streaming_bench.json stamps.txt 2>/dev/null
