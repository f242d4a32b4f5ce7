#!/usr/bin/env bash
# Builds memtune (warnings as errors; the CUDA backend too where nvcc exists)
# and runs every test suite with CTest. GPU suites skip without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cmake -S . -B build -DMT_WERROR=ON
cmake --build build -j"$(nproc)"
ctest --test-dir build --output-on-failure
