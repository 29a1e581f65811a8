#!/usr/bin/env bash
# The numbers of docs/performance.md's CPU tables in one run, on one machine: this library's
# networks in f32 and with bf16 products, PyTorch on the same networks and shapes, and a whole
# 512x512 generation. PyTorch comes from a venv made from tools/bench/requirements.txt
# (VENV=path to use another). About 15 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${VENV:-.venv-bench}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -r tools/bench/requirements.txt
fi
echo "== $(date -u +%FT%TZ)"
lscpu | grep -E "Model name|^CPU\(s\)"
echo "== f32"
cargo bench -q -p sd-benches --bench networks -- clip unet32 vae32 unet64 --runs 3 --profile
echo "== bf16 products"
cargo bench -q -p sd-benches --bench networks -- clip unet32 vae32 unet64 --runs 3 --profile --bf16
echo "== PyTorch"
"$VENV/bin/python" tools/bench/pytorch_networks.py clip unet32 vae32 unet64 --runs 3
echo "== a whole generation, 512x512"
cargo bench -q -p sd-benches --bench generate -- --steps 2 --bf16
cargo bench -q -p sd-benches --bench generate -- --steps 2 --dtype f16
