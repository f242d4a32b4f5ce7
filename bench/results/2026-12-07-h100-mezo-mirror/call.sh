#!/usr/bin/env bash
# session 2026-12-07e call 3: GPU suites, then MeZO with and without the mirrored - pass (MT_MEZO_MIRROR=0)
O=$OUT
ln -sfn .gpu/build build
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $O/stamps.txt; }
END=${END:-585}
lim() { local left=$(( END - ($(date +%s) - T0) )); [ $left -lt 1 ] && left=1; [ $left -lt $1 ] && echo $left || echo $1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; free -g | sed -n 2p
MT_CTEST_FILTER=gpu timeout $(lim 150) bash tests/gpu/run.sh --stages ctest > $O/ctest.txt 2>&1; stamp "ctest rc=$?"
grep -E "tests passed|Failed|\*\*\*|spared" $O/ctest.txt | head; grep -rh "spared" $O 2>/dev/null | head -4
run() { # tag env shape extra limit
  mkdir -p $O/$1; env $2 OUT=$O/$1 MT_MEZO_ARGS="--shapes $3 --steps 8 --warmup 2 --forward-iters 5 $4" timeout $(lim $5) bash tests/gpu/run.sh --stages mezo-bench > $O/$1/run.log 2>&1
  stamp "$1 rc=$?"; grep -hE "tok|ratio|two forwards|step" $O/$1/run.log | tail -4; }
run on-1b MT_MEZO_MIRROR=1 TinyLlama-1.1B "" 90
run off-1b MT_MEZO_MIRROR=0 TinyLlama-1.1B --skip-torch 50
run on2-1b MT_MEZO_MIRROR=1 TinyLlama-1.1B --skip-torch 50
run on-7b MT_MEZO_MIRROR=1 Llama-2-7B --skip-torch 110
run off-7b MT_MEZO_MIRROR=0 Llama-2-7B --skip-torch 110
