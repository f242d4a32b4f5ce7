#!/usr/bin/env bash
# Installs the Debian packages memtune builds and tests with. Idempotent:
# when every package is already present it only checks and returns.
# The CUDA toolkit is not a Debian package here; it is checked, not installed.
set -euo pipefail

PACKAGES=(build-essential cmake pkg-config libhdf5-dev check libyaml-dev
          libcjson-dev libpcre2-dev libutf8proc-dev libopenmpi-dev openmpi-bin bible-kjv)

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

# cuDNN's frontend (header-only C++, the graph API memtune's attention is
# built with): the headers of PyPI's nvidia-cudnn-frontend wheel, unpacked
# into .deps/cudnn-frontend/include. The wheel is fetched for any Python (only
# its headers are used). Without it, or without cuDNN itself, CMake builds the
# GPU backend with memtune's own attention kernel.
CUDNN_FRONTEND_VERSION=1.32.0
install_cudnn_frontend() {
    local dest=.deps/cudnn-frontend
    if [ -f "$dest/include/cudnn_frontend.h" ]; then
        echo "install-deps: cuDNN frontend headers present ($dest)"
        return
    fi
    local header found=""
    for header in /usr/local/cuda/include/cudnn.h /usr/include/cudnn.h /usr/include/x86_64-linux-gnu/cudnn.h \
        "${CUDNN_PATH:-/nonexistent}/include/cudnn.h"; do
        [ -f "$header" ] && found=$header
    done
    if [ -z "$found" ]; then
        echo "install-deps: no cuDNN (cudnn.h) found: the GPU backend will use memtune's own attention kernel"
        return
    fi
    local tmp
    tmp=$(mktemp -d)
    if python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d "$tmp" \
        "nvidia-cudnn-frontend==$CUDNN_FRONTEND_VERSION" 2> "$tmp/log" &&
        python3 - "$tmp" "$dest" << 'PY'
import glob, os, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
members = [n for n in wheel.namelist() if n.startswith("include/")]
wheel.extractall(os.path.join(tmp, "x"), members)
os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
os.rename(os.path.join(tmp, "x"), dest)
print(f"install-deps: cuDNN frontend {len(members)} headers in {dest}/include")
PY
    then
        :
    else
        echo "install-deps: could not fetch nvidia-cudnn-frontend $CUDNN_FRONTEND_VERSION from PyPI" \
             "($(tail -1 "$tmp/log" 2> /dev/null)): the GPU backend will use memtune's own attention kernel"
    fi
    rm -rf "$tmp"
}

if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
    echo "install-deps: CUDA toolkit found ($(PATH=$PATH:/usr/local/cuda/bin nvcc --version | tail -1))"
    install_cudnn_frontend
else
    echo "install-deps: no CUDA toolkit (nvcc) found: building the CPU backend only." \
         "Install the CUDA Toolkit under /usr/local/cuda for the GPU backend."
fi
