#!/usr/bin/env bash
# Installs NVRTC (the CUDA run-time compiler) from PyPI into a cache folder, so that the
# kernel-compilation test of sd-cuda runs on a machine with no GPU and no CUDA toolkit.
#
# Usage:
#   export LD_LIBRARY_PATH="$(bash crates/sd-cuda/ci/install-nvrtc.sh [CACHE_DIR])${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
#   cargo test -p sd-cuda
#
# CACHE_DIR defaults to $SD_CUDA_NVRTC_CACHE, then to ~/.cache/sd-cuda. A second run finds the
# installed copy and downloads nothing. The only line on stdout is the folder holding
# libnvrtc.so.13 (the value to put in LD_LIBRARY_PATH); progress goes to stderr. Needs Python 3
# with pip and access to PyPI; exits non-zero (with a message) when it cannot install.
#
# The version matches cudarc's `cuda-13000` bindings (libnvrtc.so.13 is the first versioned
# name they try). PYTHON chooses the interpreter (default: python3).
set -euo pipefail

NVRTC_VERSION="13.5.37"
cache="${1:-${SD_CUDA_NVRTC_CACHE:-${HOME:-/tmp}/.cache/sd-cuda}}"
target="$cache/nvidia-cuda-nvrtc-$NVRTC_VERSION"
python="${PYTHON:-python3}"

find_lib_dir() {
    local lib
    lib="$(find "$target" -name 'libnvrtc.so.13*' -not -name '*builtins*' 2>/dev/null | sort | head -n 1)"
    if [[ -n "$lib" ]]; then
        dirname "$lib"
    fi
}

dir="$(find_lib_dir)"
if [[ -z "$dir" ]]; then
    echo "install-nvrtc: installing nvidia-cuda-nvrtc==$NVRTC_VERSION into $target" >&2
    mkdir -p "$cache"
    tmp="$(mktemp -d "$cache/.install.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    # --target installs into a plain folder (no environment is touched, so PEP 668 does not
    # apply); --no-deps: the wheel has none that matter here.
    PIP_ROOT_USER_ACTION=ignore "$python" -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "$tmp" "nvidia-cuda-nvrtc==$NVRTC_VERSION" >&2
    rm -rf "$target"
    mv "$tmp" "$target"
    trap - EXIT
    dir="$(find_lib_dir)"
fi

if [[ -z "$dir" ]]; then
    echo "install-nvrtc: libnvrtc.so.13 not found under $target after installing" >&2
    exit 1
fi
# The soname cudarc asks for must resolve in that folder.
if [[ ! -e "$dir/libnvrtc.so.13" ]]; then
    ln -sf "$(basename "$(find "$dir" -maxdepth 1 -name 'libnvrtc.so.13*' -not -name '*builtins*' | sort | head -n 1)")" "$dir/libnvrtc.so.13"
fi
echo "install-nvrtc: NVRTC $NVRTC_VERSION in $dir" >&2
echo "$dir"
