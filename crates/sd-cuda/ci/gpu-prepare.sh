#!/usr/bin/env bash
# Builds, on a machine with a Rust toolchain (no GPU needed), everything the GPU checks run,
# into .device/ at the repository root (ignored by git), for a GPU machine that has CUDA and
# PyTorch but no Rust toolchain and no network:
#   .device/bin/gpu, networks      sd-cuda's GPU test binaries (tests/gpu.rs, tests/networks.rs)
#   .device/bin/gpu_bench          the kernel benchmark (examples/gpu_bench.rs)
#   .device/bin/gpu_unet           the UNet step against PyTorch (benches/benches/gpu_unet.rs)
#   .device/whl/                   diffusers' wheel, for the PyTorch side (the GPU image has
#                                  torch, transformers and diffusers' other needs, not diffusers)
# Then, there, from the repository root (with .device carried): bash crates/sd-cuda/ci/gpu-run.sh
#
# Usage: bash crates/sd-cuda/ci/gpu-prepare.sh     (PYTHON chooses the pip, default python3;
#                                                   PY_VERSION the GPU's Python, default 3.12)
set -euo pipefail
cd "$(dirname "$0")/../../.."
python="${PYTHON:-python3}"
py_version="${PY_VERSION:-3.12}"
DIFFUSERS_VERSION="0.42.1"

rm -rf .device
mkdir -p .device/bin .device/whl

# The executables cargo built, by target name, from its JSON messages.
executables() {
    "$python" -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"], m["executable"])
'
}

{
    cargo test -p sd-cuda --release --no-run --message-format=json
    cargo build -p sd-cuda --release --example gpu_bench --message-format=json
    cargo bench -p sd-benches --bench gpu_unet --no-run --message-format=json
} | executables | while read -r name path; do
    case "$name" in
        gpu | networks | gpu_bench | gpu_unet)
            cp "$path" ".device/bin/$name"
            strip ".device/bin/$name" 2>/dev/null || true
            ;;
    esac
done
for name in gpu networks gpu_bench gpu_unet; do
    [[ -x ".device/bin/$name" ]] || { echo "gpu-prepare: $name was not built" >&2; exit 1; }
done

"$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$py_version" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .device/whl "diffusers==$DIFFUSERS_VERSION"

du -sh .device/bin/* .device/whl/* >&2
echo "gpu-prepare: carry .device (and run crates/sd-cuda/ci/gpu-run.sh there)" >&2
