#!/usr/bin/env bash
# session 2026-12-07e call 2: on an H200 issue 27's 7B offload ratios (AdamW state fits only there);
# on an H100 issue 28's 40 GiB long-context row
O=$OUT
ln -sfn .gpu/build build
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $O/stamps.txt; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; free -g | sed -n 2p
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if [ "$MEM" -gt 100000 ]; then
OUT=$O/big MT_OFFLOAD_ARGS="--shapes Llama-2-7B --modes ${BIG_MODES:-none,cpu,cpu-delay,cpu-r25-delay,cpu-r10-delay} --skip-adam --steps 8 --warmup 3" \
  timeout 570 bash tests/gpu/run.sh --stages offload-bench > $O/big.txt 2>&1; stamp "7B rc=$?"
grep -E '^\{"shape' $O/big.txt | python3 -c 'import sys,json
for l in sys.stdin:
    r=json.loads(l); print(r["mode"], {k:r.get(k) for k in ("step_ms","device_peak","host_peak","error")})'
else
OUT=$O/long MT_LONG_ARGS="--budgets 40 --timeout ${LT:-560}" timeout 575 bash tests/gpu/run.sh --stages long-context > $O/long.txt 2>&1
stamp "long rc=$?"
grep -iE "tokens|GiB|chose|unsloth|error|steps" $O/long.txt | tail -14
cp /tmp/mt-long-context/run-40/metrics.jsonl $O/run40-metrics.jsonl 2>/dev/null; cp $O/long/long_context.json $O/ 2>/dev/null
cp /tmp/mt-long-context/run-40/*.log $O/ 2>/dev/null; true
fi
cd $O && tar czf /tmp/all.tgz --exclude='*.tgz' . && mv /tmp/all.tgz $O/all.tgz
