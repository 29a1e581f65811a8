"""PyTorch's time for the UNet step `cargo bench -p sd-benches --bench gpu_unet` times.

Stable Diffusion 1.5's UNet built by diffusers from the preset in
crates/sd-models/presets/sd15/unet.json with random weights, in eager mode (no
torch.compile), with diffusers' default attention processor (AttnProcessor2_0, that is
torch's scaled_dot_product_attention) and cuDNN convolutions (cudnn.benchmark on, as
PyTorch users run it):

    python tools/bench/unet_step_torch.py [--device cuda] [--dtype float16] [--size 64]
        [--batch 2] [--runs 20]

It prints the versions, the median of --runs timed steps after three warm-up steps (each
step synchronised), and a last line `RESULT ms=<median>` that the Rust bench reads.
diffusers may be missing on a GPU machine without network: crates/sd-cuda/ci/gpu-prepare.sh
downloads its wheel here, and crates/sd-cuda/ci/gpu-run.sh installs it there.
"""

import argparse
import json
import pathlib
import statistics
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
PRESET = ROOT / "crates/sd-models/presets/sd15/unet.json"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()

    import diffusers
    import torch
    from diffusers import UNet2DConditionModel

    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    config = {k: v for k, v in json.loads(PRESET.read_text()).items() if not k.startswith("_")}
    unet = UNet2DConditionModel(**config).eval().to(device=device, dtype=dtype)
    b, s = args.batch, args.size
    x = torch.randn(b, 4, s, s, device=device, dtype=dtype)
    text = torch.randn(b, 77, 768, device=device, dtype=dtype)
    t = torch.tensor([500.0] * b, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    with torch.inference_mode():
        for _ in range(3):
            unet(x, t, encoder_hidden_states=text)
        sync()
        for _ in range(args.runs):
            t0 = time.perf_counter()
            unet(x, t, encoder_hidden_states=text)
            sync()
            times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"torch   {torch.__version__} diffusers {diffusers.__version__} on {name}, "
        f"SD 1.5 UNet step {s}x{s} batch {b} {args.dtype} eager, SDPA: {ms:8.2f} ms "
        f"(min {min(times) * 1e3:.2f}, max {max(times) * 1e3:.2f})",
        flush=True,
    )
    print(f"RESULT ms={ms:.4f}", flush=True)


if __name__ == "__main__":
    main()
