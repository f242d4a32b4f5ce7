#!/usr/bin/env bash
# Copies the shared libraries memtune's binaries use, other than glibc, the
# C++ runtime and CUDA's, into BUILD/gpu-libs, so that a build made here runs
# on a GPU machine that lacks HDF5, libyaml or cJSON (tests/gpu/run.sh puts
# only the ones missing there on the library path).
set -euo pipefail
BUILD=${1:-build}
mkdir -p "$BUILD/gpu-libs"
for bin in "$BUILD/memtune" "$BUILD"/tests/test_* "$BUILD/tests/mt_parity" "$BUILD"/mt_*_bench; do
    ldd "$bin"
done | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u |
    grep -v -E '/(libc|libm|libdl|librt|libpthread|libstdc\+\+|libgcc_s|libcublas|libcublasLt|libcudart|libcusolver|libcusparse|libnvJitLink|libcurand|libnccl)\.so' |
    while read -r lib; do cp -L "$lib" "$BUILD/gpu-libs/"; done
echo "gpu-bundle: $(ls "$BUILD/gpu-libs" | wc -l) libraries, $(du -sh "$BUILD/gpu-libs" | cut -f1) in $BUILD/gpu-libs"
# Configure-time scratch programs (compiler identification, library probes)
# are not needed to run anything; the device tool carries at most 64 MiB.
find "$BUILD/CMakeFiles" \( -path '*/CompilerId*/tmp' -o -name a.out \) -prune -exec rm -rf {} + 2> /dev/null || true
echo "gpu-bundle: $BUILD is $(du -sh "$BUILD" | cut -f1)"
