#!/usr/bin/env bash
# session 2026-12-07d: the GPU suites (GaLore's gates), then GaLore r=128 at the Llama-2-7B shape, this
# build (new) against the one before it (old, .gpu/old/memtune), memtune alone, in one call
O=$OUT
ln -sfn .gpu/build build
export LD_LIBRARY_PATH=$PWD/.gpu/build/gpu-libs:${LD_LIBRARY_PATH:-}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $O/stamps.txt; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
MT_CTEST_FILTER=gpu timeout 150 bash tests/gpu/run.sh --stages ctest > $O/ctest.txt 2>&1; stamp "ctest rc=$?"
grep -E "tests passed|Passed|Failed|\*\*\*" $O/ctest.txt | head -6
i=0
for v in ${ORDER:-new old new}; do
  i=$((i + 1))
  d=$PWD/.gpu/build; [ $v = old ] && d=$PWD/.gpu/old
  MT_BUILD_DIR=$d timeout 120 python3 bench/galore.py --shapes Llama-2-7B --ranks 128 --moments fp32 --torch-ranks '' \
    --no-adamw --steps 6 --warmup 2 --out $O/$i-$v > $O/galore-$i-$v.txt 2>&1; stamp "$v rc=$?"
  grep -E "memtune GaLore r128 fp32 " $O/galore-$i-$v.txt | tail -1
done
