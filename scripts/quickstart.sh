#!/usr/bin/env bash
# Builds memtune and runs the quickstart fine-tune: a tiny LLaMA-shaped model
# trained on the King James Bible (Debian's bible-kjv), on the GPU if there
# is one, else on the CPU (well under a minute on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cmake -S . -B build
cmake --build build -j"$(nproc)"
mkdir -p data
if [ ! -f data/kjv.h5 ]; then
    bible "Gen1:1-Rev22:21" > data/kjv.txt
    ./build/memtune tokenize --input data/kjv.txt --output data/kjv.h5
fi
./build/memtune train configs/quickstart.yaml "$@"
