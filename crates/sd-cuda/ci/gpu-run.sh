#!/usr/bin/env bash
# The GPU checks of sd-cuda in one run, on a GPU machine with CUDA and PyTorch and no Rust
# toolchain, from the repository root, with .device/ from gpu-prepare.sh carried there.
# Each step's log goes to $OUT (default /tmp/sd-cuda-gpu) and a summary line to stdout; a step
# that fails does not stop the others. Steps, most important first:
#   1. gpu          tests/gpu.rs: conformance (f32, f16, bf16) and every kernel at SD shapes
#   2. networks     tests/networks.rs: the fixture networks and pipeline end to end
#   3. gpu_unet     the SD 1.5 UNet step 64x64 batch 2 f16, ours and PyTorch eager (diffusers)
#   4. gpu_bench    each kernel's TFLOP/s against cuBLAS, f16 and bf16
#   5. sanitizer    compute-sanitizer memcheck on the f16 conformance suite and racecheck on
#                   the bf16 one (skipped, and said so, where a short probe cannot attach, as
#                   on gVisor)
# The exit status is 0 only if every step that ran passed.
# STEPS="1 2 3" runs a subset. DEADLINE (seconds, default 540) bounds the whole run: each step
# gets its own limit or what is left, whichever is less, and is skipped with under 20 s left.
set -uo pipefail
out="${OUT:-/tmp/sd-cuda-gpu}"
mkdir -p "$out"
rm -f "$out"/*.log
steps=" ${STEPS:-1 2 3 4 5} "
bin=.device/bin
[[ -x $bin/gpu ]] || { echo "gpu-run: no $bin/gpu; run gpu-prepare.sh first and carry .device" >&2; exit 2; }

# NVRTC and cuBLAS: the CUDA install's, else the ones PyTorch's wheels carry.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [[ -d $d ]] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
py_nvidia="$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null || true)"
if [[ -n $py_nvidia ]]; then
    for d in "$py_nvidia"/nvidia/*/lib; do
        [[ -d $d ]] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
    done
fi
if ls .device/whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/sd-site .device/whl/*.whl && export PYTHONPATH=/tmp/sd-site
fi
export SD_FIXTURES="$PWD/fixtures"

deadline=$((SECONDS + ${DEADLINE:-540}))
failed=0
step() { # step N NAME TIMEOUT COMMAND...
    local n=$1 name=$2 limit=$3
    shift 3
    [[ $steps == *" $n "* ]] || return 0
    local left=$((deadline - SECONDS))
    if ((left < 20)); then
        echo "== $name: skipped, the deadline is near"
        return 0
    fi
    ((limit > left)) && limit=$left
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    ((rc == 0)) || failed=1
    local summary
    summary="$(grep -E '^test result:' "$out/$name.log" | tail -n 1)"
    echo "== $name: rc=$rc in $((SECONDS - t0)) s ${summary}"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
date -u +%FT%TZ
step 1 gpu 300 "$bin/gpu" --ignored --test-threads 1 --nocapture
step 2 networks 240 "$bin/networks" --ignored --test-threads 1 --nocapture
step 3 gpu_unet 240 "$bin/gpu_unet" --dtype f16 --size 64 --batch 2 --runs 20 --pytorch python3
step 4 gpu_bench_f16 120 "$bin/gpu_bench" f16
step 4 gpu_bench_bf16 120 "$bin/gpu_bench" bf16
sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
if [[ $steps == *" 5 "* ]]; then
    # A short probe first: on gVisor the sanitizer cannot attach, and the steps would only
    # spend the deadline failing.
    if [[ -z $sanitizer ]]; then
        echo "== sanitizer: skipped, compute-sanitizer not found"
    elif ! timeout 60 "$sanitizer" --tool memcheck "$bin/gpu" --ignored --test-threads 1 \
        a_missing_device_is_an_error >"$out/sanitizer_probe.log" 2>&1; then
        echo "== sanitizer: skipped, it cannot attach here (see sanitizer_probe.log)"
    else
        step 5 memcheck 240 "$sanitizer" --tool memcheck --error-exitcode 9 \
            "$bin/gpu" --ignored --test-threads 1 conformance_f16
        step 5 racecheck 240 "$sanitizer" --tool racecheck --error-exitcode 9 \
            "$bin/gpu" --ignored --test-threads 1 conformance_bf16
    fi
fi
for f in gpu_unet gpu_bench_f16; do
    [[ -f $out/$f.log ]] && { echo "== $f.log"; tail -n 40 "$out/$f.log"; }
done
grep -h -E "FAILED|panicked" "$out"/*.log | head -n 40 || true
exit "$failed"
