#!/usr/bin/env bash
# session 2026-12-06b: GPU suites (the one-read cross-entropy kernel's test), Gemma-3-1B LoRA new vs the build before
# (memtune-old = cbc73d0), then weight streaming's first GPU run (MeZO, Llama-1-33B shape, host memory vs resident)
OUT=$1
ln -sfn .gpu/build build
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/stamps.txt; }
END=${END:-575}
lim() { local left=$(( END - ($(date +%s) - T0) )); [ $left -lt 1 ] && left=1; [ $left -lt $1 ] && echo $left || echo $1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; free -g | sed -n 2p
MT_CTEST_FILTER=gpu timeout $(lim 150) bash tests/gpu/run.sh --stages ctest > $OUT/ctest.txt 2>&1; stamp "ctest rc=$?"
tail -4 $OUT/ctest.txt; grep -E ":F:|:E:" $OUT/ctest-verbose.log | head -10
row() { grep -E "^(memtune|PEFT)" $OUT/$1 | sed "s/^/$2 /"; grep "x[0-9]" $OUT/$1; }
A="--steps 12 --warmup 4"
ab() {  # shape old|new
    local bin=$PWD/.gpu/memtune-old; [ $2 = new ] && bin=$PWD/build/memtune
    MT_MEMTUNE_BIN=$bin MT_LORA_SHAPES=$1 MT_LORA_ARGS="$A --memtune-only --only memtune_LoRA" \
        timeout $(lim 60) bash tests/gpu/run.sh --stages lora-bench > $OUT/l-$1-$2.txt 2>&1; stamp "$1 $2 rc=$?"
    row l-$1-$2.txt "$2"
}
ab Gemma-3-1B new
[ "${SKIP_OLD:-0}" = 1 ] || ab Gemma-3-1B old
MT_STREAMING_ARGS="--cases mezo-30b --steps 6 --warmup 2" timeout $(lim 600) bash tests/gpu/run.sh --stages streaming-bench > $OUT/stream.txt 2>&1; stamp "streaming rc=$?"
grep -vE "^\s*$" $OUT/stream.txt | grep -v "^  " | tail -25
cd $OUT && tar czf logs.tgz l-*.txt ctest*.log stream.txt 2>/dev/null; rm -f l-*.txt
