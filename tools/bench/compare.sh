#!/usr/bin/env bash
# The numbers of docs/performance.md's CPU tables in one run, on one machine: this library's
# networks in f32 and with bf16 products, OpenVINO and PyTorch on the same networks and shapes,
# one Markdown table of the three with ours / OpenVINO, and a whole 512x512 generation.
# PyTorch and OpenVINO come from a venv made from tools/bench/requirements.txt (VENV=path to
# use another). Every tool runs with THREADS threads (default: all CPUs). The logs stay in
# LOGS (default: a new folder under /tmp, printed at the end). About 30 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${VENV:-.venv-bench}"
THREADS="${THREADS:-$(nproc)}"
LOGS="${LOGS:-$(mktemp -d /tmp/sd-bench.XXXXXX)}"
mkdir -p "$LOGS"
export RAYON_NUM_THREADS="$THREADS"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -r tools/bench/requirements.txt
fi
NETS=(clip unet32 vae32 unet64)
echo "== $(date -u +%FT%TZ), $THREADS threads, logs in $LOGS"
lscpu | grep -E "Model name|^CPU\(s\)"
echo "== f32"
cargo bench -q -p sd-benches --bench networks -- "${NETS[@]}" --runs 3 --profile | tee "$LOGS/ours-f32.log"
echo "== bf16 products"
cargo bench -q -p sd-benches --bench networks -- "${NETS[@]}" --runs 3 --profile --bf16 | tee "$LOGS/ours-bf16.log"
echo "== PyTorch"
"$VENV/bin/python" tools/bench/pytorch_networks.py "${NETS[@]}" --runs 3 --threads "$THREADS" | tee "$LOGS/pytorch.log"
echo "== OpenVINO"
"$VENV/bin/python" tools/bench/openvino_networks.py "${NETS[@]}" --runs 3 --threads "$THREADS" --precision both | tee "$LOGS/openvino.log"
echo "== a whole generation, 512x512"
cargo bench -q -p sd-benches --bench generate -- --steps 2 --bf16
cargo bench -q -p sd-benches --bench generate -- --steps 2 --dtype f16
echo "== ours, OpenVINO and PyTorch ($THREADS threads, median of 3)"
python3 tools/bench/table.py "$LOGS"/ours-f32.log "$LOGS"/ours-bf16.log "$LOGS"/pytorch.log "$LOGS"/openvino.log | tee "$LOGS/table.md"
