#!/usr/bin/env bash
# Builds memtune (warnings as errors; the CUDA backend too where nvcc exists)
# and runs every test suite with CTest, as many at once as there are cores
# (their OpenMP threads wait passively, so that suites sharing the cores do
# not spin against each other). GPU suites skip without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cmake -S . -B build -DMT_WERROR=ON
cmake --build build -j"$(nproc)"
OMP_WAIT_POLICY=passive ctest --test-dir build --output-on-failure -j"$(nproc)"
