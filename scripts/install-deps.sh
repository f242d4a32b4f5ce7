#!/usr/bin/env bash
# Installs the Debian packages memtune builds and tests with. Idempotent:
# when every package is already present it only checks and returns.
# The CUDA toolkit is not a Debian package here; it is checked, not installed.
set -euo pipefail

PACKAGES=(build-essential cmake pkg-config libhdf5-dev check libyaml-dev
          libcjson-dev libopenmpi-dev openmpi-bin bible-kjv)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    echo "install-deps: all packages present"
fi

if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
    echo "install-deps: CUDA toolkit found ($(PATH=$PATH:/usr/local/cuda/bin nvcc --version | tail -1))"
else
    echo "install-deps: no CUDA toolkit (nvcc) found: building the CPU backend only." \
         "Install the CUDA Toolkit under /usr/local/cuda for the GPU backend."
fi
