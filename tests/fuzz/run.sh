#!/usr/bin/env bash
# Fuzzes memtune's parsers with libFuzzer (clang, ASan + UBSan) for a bounded
# time each, starting from the seed corpus in tests/fuzz/corpus/<target>/.
# usage: bash tests/fuzz/run.sh [SECONDS_PER_TARGET=60] [TARGET ...]
# Needs clang and libclang-rt-14-dev (apt). Prints executions per target;
# exits 1 if any target found a crash (the reproducer is under $FUZZ_OUT).
set -uo pipefail
cd "$(dirname "$0")/../.."
SECONDS_PER_TARGET=${1:-60}
shift || true
TARGETS=${*:-"safetensors config_json yaml dataset tokenizer_json jsonl"}
FUZZ_OUT=${FUZZ_OUT:-/tmp/memtune-fuzz}
mkdir -p "$FUZZ_OUT"
SOURCES=$(ls kernels/*.c datasets/*.c optim/*.c offload/*.c trainer/*.c | grep -v -E 'trainer/main.c|kernels/device_none.c')
CFLAGS="-g -O1 -std=c11 -D_DEFAULT_SOURCE -fopenmp -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -I. -Itests/fuzz -I/usr/include/hdf5/serial $(mpicc --showme:compile)"
LIBS="$(mpicc --showme:link) -L/usr/lib/x86_64-linux-gnu/hdf5/serial -lhdf5 -lcjson -lyaml -lpcre2-8 -lutf8proc -lpthread -lm"
status=0
for t in $TARGETS; do
    bin="$FUZZ_OUT/fuzz_$t"
    # shellcheck disable=SC2086
    clang $CFLAGS -Wno-unknown-pragmas tests/fuzz/fuzz_$t.c $SOURCES kernels/device_none.c -o "$bin" $LIBS ||
        { echo "fuzz: building $t failed"; exit 2; }
    mkdir -p "$FUZZ_OUT/corpus_$t"
    log="$FUZZ_OUT/$t.log"
    max_len=4096
    [ "$t" = tokenizer_json ] && max_len=16384  # a tokenizer.json needs its vocabulary and merges
    "$bin" -max_total_time="$SECONDS_PER_TARGET" -max_len=$max_len -rss_limit_mb=2048 -timeout=10 \
        -artifact_prefix="$FUZZ_OUT/crash_${t}_" "$FUZZ_OUT/corpus_$t" "tests/fuzz/corpus/$t" > "$log" 2>&1
    rc=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$')
    [ -z "$execs" ] && execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
    if [ $rc -ne 0 ]; then
        echo "fuzz $t: CRASH after ${execs:-?} executions; see $log and $FUZZ_OUT/crash_${t}_*"
        status=1
    else
        echo "fuzz $t: ${execs:-?} executions in ${SECONDS_PER_TARGET}s, no crash"
    fi
done
exit $status
