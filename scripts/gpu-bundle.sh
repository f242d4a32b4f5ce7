#!/usr/bin/env bash
# Makes .gpu/build: what the GPU machine needs of a build made here, small
# enough for the device tool's 64 MiB: the programs and test binaries
# (stripped), CTest's files, the cache, and the shared libraries the
# binaries use that GPU machines lack (gpu-libs: libyaml, cJSON, Check's
# subunit, HDF5 and its compression libraries; CUDA's, cuDNN's, MPI's and
# the system's are there). tests/gpu/run.sh puts only the missing ones on the
# library path. Carry `.gpu` and start the command with
# `ln -sfn .gpu/build build` (docs/development.md).
set -euo pipefail
BUILD=${1:-build}
OUT=.gpu/build
rm -rf "$OUT"
mkdir -p "$OUT/tests" "$OUT/gpu-libs"
cp "$BUILD/CMakeCache.txt" "$BUILD/CTestTestfile.cmake" "$OUT/"
cp "$BUILD/tests/CTestTestfile.cmake" "$OUT/tests/"
bins=("$BUILD/memtune" "$BUILD"/mt_*_bench "$BUILD"/tests/test_* "$BUILD/tests/mt_parity")
for bin in "${bins[@]}"; do
    dest=$OUT/${bin#"$BUILD"/}
    cp "$bin" "$dest"
    strip --strip-unneeded "$dest"
done
for bin in "${bins[@]}"; do
    ldd "$bin"
done | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u |
    grep -E '/(libyaml|libcjson|libsubunit|libhdf5|libsz|libaec|libutf8proc)[^/]*\.so' |
    while read -r lib; do cp -L "$lib" "$OUT/gpu-libs/"; done
echo "gpu-bundle: $(ls "$OUT/gpu-libs" | wc -l) libraries in $OUT/gpu-libs; $OUT is $(du -sh "$OUT" | cut -f1)"
