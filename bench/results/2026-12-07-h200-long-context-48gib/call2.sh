#!/usr/bin/env bash
# next session: issue 28's 48 GiB row, part 2 (resume at part 1's length)
O=$OUT
ln -sfn .gpu/build build
OUT=$O/long MT_LONG_ARGS="--budgets 48 --resume --work $PWD/.gpu/long-work --timeout 560" \
  timeout 580 bash tests/gpu/run.sh --stages long-context > $O/long2.txt 2>&1; echo "rc=$?"
tail -3 $O/long2.txt; cp .gpu/long-work/run-48/metrics.jsonl $O/run48-metrics.jsonl
