"""OpenVINO's time for the networks `cargo bench -p sd-benches --bench networks` times.

An anchor beside PyTorch: the very modules pytorch_networks.py builds (same presets, same
seeded random weights, same inputs) converted with `openvino.convert_model`, compiled for the
CPU with INFERENCE_NUM_THREADS = --threads, PERFORMANCE_HINT=LATENCY and
INFERENCE_PRECISION_HINT f32 and/or bf16, and timed:

    .venv-bench/bin/python tools/bench/openvino_networks.py [--runs 3] [--threads N]
        [--precision f32|bf16|both] [NAME ...]

Names as pytorch_networks.py's: unet32, unet64, vae32, clip (the default), xl64 and xl128
(only when named; converted from the bfloat16 model, as pytorch_networks.py runs them).

For each network one child process builds the PyTorch module, runs it once in f32 for the
reference output, converts it (the time printed is `convert_model`'s, tracing included) and
saves the IR with f32 weights (`compress_to_fp16=False`; the default would round the weights to
f16) to a temporary folder. Then one child per precision reads the IR, compiles it, runs one
warm-up pass and --runs timed passes, and prints the median, the passes, its peak resident
memory (OpenVINO only: no PyTorch in that process), the compile time, the precision the
compiled model reports and how many of its convolutions and matrix products run in bf16, and
the agreement with PyTorch: max |openvino - torch| / max |torch| over the output, which is
~1e-6..1e-5 when OpenVINO really computes in f32, and ~1e-2 in bf16.
"""

import argparse
import os
import pathlib
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from pytorch_networks import NAMES, XL_NAMES, network  # noqa: E402

PRECISIONS = {"f32": ["f32"], "bf16": ["bf16"], "both": ["f32", "bf16"]}


def short_version():
    import openvino

    return openvino.__version__.split("-")[0]


def convert(name, threads, folder):
    """Builds the PyTorch module, saves its inputs and f32 output, converts it, saves the IR."""
    import numpy as np
    import openvino as ov
    import torch

    torch.set_num_threads(threads)
    module, inputs = network(name, bf16_model=name in XL_NAMES)
    with torch.inference_mode():
        reference = module(*inputs).float().numpy()
    np.savez(folder / "io.npz", reference=reference,
             **{f"in{i}": x.float().numpy() if x.dtype == torch.bfloat16 else x.numpy()
                for i, x in enumerate(inputs)})
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.trace's deprecation
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    t0 = time.perf_counter()
    model = ov.convert_model(module, example_input=inputs)
    seconds = time.perf_counter() - t0
    # The traced inputs have dynamic dimensions; the bench's shapes are fixed, as ours are.
    model.reshape({model.input(i): ov.PartialShape(list(x.shape)) for i, x in enumerate(inputs)})
    if any(p.get_element_type() == ov.Type.bf16 for p in model.inputs + model.outputs):
        # The bfloat16 SDXL model: f32 tensors in and out, like the saved inputs.
        steps = ov.preprocess.PrePostProcessor(model)
        for i, p in enumerate(model.inputs):
            if p.get_element_type() == ov.Type.bf16:
                steps.input(i).tensor().set_element_type(ov.Type.f32)
        for i, p in enumerate(model.outputs):
            if p.get_element_type() == ov.Type.bf16:
                steps.output(i).tensor().set_element_type(ov.Type.f32)
        model = steps.build()
    ov.save_model(model, folder / "model.xml", compress_to_fp16=False)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{name:<7} openvino {short_version()} converted in {seconds:.1f} s "
          f"(convert_model from torch {torch.__version__}, tracing included; "
          f"peak RSS {rss:.2f} GiB with PyTorch)", flush=True)


def bf16_ops(compiled):
    """(convolutions and matrix products the compiled model runs in bf16, all of them)."""
    heavy, low = 0, 0
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else ""
        if kind in ("Convolution", "MatMul", "FullyConnected", "Deconvolution"):
            heavy += 1
            if "runtimePrecision" in info and "bf16" in info["runtimePrecision"].astype(str).lower():
                low += 1
    return low, heavy


def time_ir(name, runs, threads, precision, folder):
    import numpy as np
    import openvino as ov

    core = ov.Core()
    config = {
        "INFERENCE_NUM_THREADS": str(threads),
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": precision,
    }
    io = np.load(folder / "io.npz")
    inputs = [io[f"in{i}"] for i in range(len(io.files) - 1)]
    reference = io["reference"]
    t0 = time.perf_counter()
    compiled = core.compile_model(str(folder / "model.xml"), "CPU", config)
    compile_s = time.perf_counter() - t0
    request = compiled.create_infer_request()

    def forward():
        return request.infer(inputs)[compiled.output(0)]

    out = forward()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        forward()
        times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    with open("/proc/self/statm") as f:
        now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    err = float(np.abs(out.astype(np.float64) - reference).max() / np.abs(reference).max())
    got = compiled.get_property("INFERENCE_PRECISION_HINT")
    low, heavy = bf16_ops(compiled)
    against = "torch bf16 model" if name in XL_NAMES else "torch f32"
    note = ""
    if precision == "bf16" and low == 0:
        caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        note = f"  BF16 HINT NOT APPLIED (CPU capabilities: {' '.join(caps)})"
    print(
        f"{name:<7} openvino {short_version()} {precision:<13} {statistics.median(times) * 1e3:9.1f} ms"
        f"  (runs: {', '.join(f'{t * 1e3:.0f}' for t in times)} ms)  peak RSS {rss:.2f} GiB"
        f" ({now:.2f} after the runs)  compile {compile_s:.1f} s  max rel err vs {against} {err:.1e}"
        f"  (precision {got.get_type_name()}, {low}/{heavy} conv/matmul in bf16, {threads} threads){note}",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=NAMES)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="both")
    parser.add_argument("--child", choices=["convert", "time"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in args.names:
        if name not in NAMES + XL_NAMES:
            raise SystemExit(f"unknown network {name}; names are {NAMES + XL_NAMES}")
    if args.child == "convert":
        convert(args.names[0], args.threads, pathlib.Path(args.folder))
        return
    if args.child == "time":
        time_ir(args.names[0], args.runs, args.threads, args.precision, pathlib.Path(args.folder))
        return
    # openvino-telemetry (an openvino dependency) sends usage events from convert_model unless
    # opted out, and stays off in CI jobs: keep it off, and off the timings.
    env = dict(os.environ, CI="true")
    for name in args.names:
        folder = pathlib.Path(tempfile.mkdtemp(prefix=f"openvino-{name}-"))
        try:
            base = [sys.executable, __file__, name, "--threads", str(args.threads),
                    "--folder", str(folder)]
            subprocess.run(base + ["--child", "convert"], check=True, env=env)
            for precision in PRECISIONS[args.precision]:
                subprocess.run(base + ["--child", "time", "--runs", str(args.runs),
                                       "--precision", precision], check=True, env=env)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

if __name__ == "__main__":
    main()
