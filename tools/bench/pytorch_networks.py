"""PyTorch's time for the networks `cargo bench -p sd-benches --bench networks` times.

The same networks (Stable Diffusion 1.5's UNet, VAE decoder and CLIP text encoder, built
from the presets in crates/sd-models/presets/sd15 with random weights), the same input
shapes, on the CPU with the same number of threads, so that the two can run side by side
on one machine:

    .venv/bin/python tools/bench/pytorch_networks.py [--runs 3] [--threads 2] [NAME ...]

Names: unet32 (UNet, 32x32 latent, batch 2), unet64 (64x64, batch 1), vae32 (VAE decoder,
32x32 latent), clip (77 tokens). Each runs in a child process of its own, f32 and then under
bf16 autocast (oneDNN; what PyTorch users run for speed on a CPU), and prints the median
of --runs timed passes after one warm-up pass, and the child's peak resident memory.

Only when named: xl64 and xl128, SDXL base's UNet (presets/sdxl) at a 64x64 latent, batch 1,
and at 128x128, batch 2 (one guided step of a 1024x1024 image), with pooled embeddings and
size ids; they run with the whole model in bfloat16 (`model.to(torch.bfloat16)`, what fits
a 24 GiB machine beside the other), the counterpart of `networks -- xl128 --dtype bf16
--bf16`.
"""

import argparse
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
PRESETS = ROOT / "crates/sd-models/presets/sd15"
NAMES = ["unet32", "unet64", "vae32", "clip"]
XL_NAMES = ["xl64", "xl128"]


def preset(name, folder=PRESETS):
    config = json.loads((folder / name).read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def network(name, bf16_model=False):
    """The network `name` as a module whose forward takes plain tensors and returns the output
    tensor, with its seeded inputs: `(module, inputs)`, `module(*inputs)` being one pass.
    openvino_networks.py converts the same module with the same inputs."""
    import torch

    class Call(torch.nn.Module):
        def __init__(self, inner, call):
            super().__init__()
            self.inner = inner
            self.call = call

        def forward(self, *inputs):
            return self.call(self.inner, *inputs)

    torch.manual_seed(0)
    if name in XL_NAMES:
        from diffusers import UNet2DConditionModel

        hw, batch = (64, 1) if name == "xl64" else (128, 2)
        dtype = torch.bfloat16 if bf16_model else torch.float32
        config = preset("unet.json", ROOT / "crates/sd-models/presets/sdxl")
        model = UNet2DConditionModel(**config).eval().to(dtype)
        x = torch.randn(batch, 4, hw, hw, dtype=dtype)
        text = torch.randn(batch, 77, 2048, dtype=dtype)
        side = 8.0 * hw
        pooled = torch.randn(batch, 1280, dtype=dtype)
        ids = torch.tensor([[side, side, 0.0, 0.0, side, side]] * batch, dtype=dtype)
        t = torch.tensor([500.0] * batch)
        return Call(model, lambda m, x, t, text, pooled, ids: m(
            x, t, encoder_hidden_states=text,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}, return_dict=False,
        )[0]), (x, t, text, pooled, ids)
    if name.startswith("unet"):
        from diffusers import UNet2DConditionModel

        hw, batch = (32, 2) if name == "unet32" else (64, 1)
        model = UNet2DConditionModel(**preset("unet.json")).eval()
        x = torch.randn(batch, 4, hw, hw)
        text = torch.randn(batch, 77, 768)
        t = torch.tensor([500.0] * batch)
        return Call(model, lambda m, x, t, text: m(
            x, t, encoder_hidden_states=text, return_dict=False
        )[0]), (x, t, text)
    if name == "vae32":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL(**preset("vae.json")).eval()
        z = torch.randn(1, 4, 32, 32)
        return Call(vae, lambda m, z: m.decode(z, return_dict=False)[0]), (z,)
    if name == "clip":
        from transformers import CLIPTextConfig, CLIPTextModel

        config = preset("text_encoder.json")
        for k in ["architectures", "torch_dtype", "transformers_version", "_name_or_path"]:
            config.pop(k, None)
        model = CLIPTextModel(CLIPTextConfig(**config)).eval()
        ids = torch.tensor([[49406] + [320 + 37 * i for i in range(20)] + [49407] * 56])
        return Call(model, lambda m, ids: m(input_ids=ids).last_hidden_state), (ids,)
    raise SystemExit(f"unknown network {name}")


def build(name, bf16_model=False):
    module, inputs = network(name, bf16_model)
    return lambda: module(*inputs)


def child(name, runs, threads, autocast):
    import torch

    torch.set_num_threads(threads)
    bf16_model = name in XL_NAMES
    forward = build(name, bf16_model)
    ctx = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if autocast
        else torch.autocast("cpu", enabled=False)
    )
    times = []
    with torch.inference_mode(), ctx:
        forward()
        for _ in range(runs):
            t0 = time.perf_counter()
            forward()
            times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    mode = "bf16 model" if bf16_model else "bf16 autocast" if autocast else "f32"
    print(
        f"{name:<7} torch {torch.__version__} {mode:<13} {statistics.median(times) * 1e3:9.1f} ms"
        f"  (runs: {', '.join(f'{t * 1e3:.0f}' for t in times)} ms)  peak RSS {rss:.2f} GiB",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=NAMES)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--autocast", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.names[0], args.runs, args.threads, args.autocast)
        return
    for name in args.names:
        for autocast in [False] if name in XL_NAMES else [False, True]:
            cmd = [sys.executable, __file__, "--child", name, "--runs", str(args.runs),
                   "--threads", str(args.threads)]
            if autocast:
                cmd.append("--autocast")
            subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
