#!/usr/bin/env bash
# next session: issue 28's 48 GiB row, part 1 (the first step; state kept in .gpu/long-work on the warm machine).
# Run part 2 (.gpu/s13.sh) at once after it, on the same warm machine (idle release is 30 s).
O=$OUT
ln -sfn .gpu/build build
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
OUT=$O/long MT_LONG_ARGS="--budgets 48 --stop-after 1 --work $PWD/.gpu/long-work --timeout 560" \
  timeout 580 bash tests/gpu/run.sh --stages long-context > $O/long1.txt 2>&1; echo "rc=$?"
tail -3 $O/long1.txt; cat .gpu/long-work/run-48/long-context-part.json
#!/usr/bin/env bash
# session 2026-12-07f call 1: issue 28's 48 GiB row part 1, then (time allowing) the int8 store pass before/after on 16 cores
bash .gpu/s12.sh
export LD_LIBRARY_PATH=$PWD/.gpu/build/gpu-libs:${LD_LIBRARY_PATH:-}
left=$((585 - SECONDS)); echo "left for int8: $left s"
if [ $left -gt 40 ]; then
  timeout $((left - 5)) bash -c 'nproc; lscpu | grep -E "Model name"; for i in 1 2; do
    echo "-- before"; .gpu/build/old_cpu_adam_bench 64 3 15 | grep "store pass"
    echo "-- after"; .gpu/build/mt_cpu_adam_bench 64 3 15 | grep "store pass"; done' > $OUT/int8.txt 2>&1
  cat $OUT/int8.txt
fi
