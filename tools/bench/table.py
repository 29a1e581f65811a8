"""One Markdown table from the logs of compare.sh: this library, OpenVINO and PyTorch.

    python3 tools/bench/table.py LOG [LOG ...]

Reads the lines of `cargo bench -p sd-benches --bench networks` (f32 and `--bf16`),
tools/bench/pytorch_networks.py and tools/bench/openvino_networks.py, in any order and in
any number of files (a later line for the same network and column wins), and prints one row per
network: the median times of ours, OpenVINO and PyTorch in f32 and in bf16 (ours: bf16
products; OpenVINO: INFERENCE_PRECISION_HINT bf16; PyTorch: bf16 autocast), and ours /
OpenVINO (below 1: ours is faster). Under the table, OpenVINO's f32 agreement with PyTorch.
Standard library only.
"""

import re
import sys

ROWS = [
    ("clip", "CLIP, 77 tokens"),
    ("unet32", "UNet 32x32 b2"),
    ("vae32", "VAE decoder 32x32"),
    ("unet64", "UNet 64x64 b1"),
]
NAME = r"^(?P<name>clip|unet32|unet64|vae32|xl64|xl128)\s+"
MS = r"\s+(?P<ms>[0-9.]+) ms\b"
PATTERNS = [
    # sd-benches networks: "unet32  SD 1.5 UNet 32x32 batch 2 (F32 weights, f32)   2381.0 ms ..."
    ("ours", re.compile(NAME + r"SD.*?(?P<mode>f32|bf16 products)\)" + MS)),
    # pytorch_networks.py: "unet32  torch 2.15.0 f32        2990.1 ms  (runs: ...) ..."
    ("torch", re.compile(NAME + r"torch \S+ (?P<mode>f32|bf16 autocast|bf16 model)" + MS)),
    # openvino_networks.py: "unet32  openvino 2026.4.1 f32   2501.3 ms  (runs: ...) ..."
    ("openvino", re.compile(NAME + r"openvino \S+ (?P<mode>f32|bf16)\s" + MS)),
]
ERR = re.compile(NAME + r"openvino \S+ f32\s.*max rel err vs torch f32 (?P<err>\S+)")


def parse(lines):
    times, errs = {}, {}
    for line in lines:
        for tool, pattern in PATTERNS:
            m = pattern.search(line)
            if m:
                precision = "f32" if m["mode"] == "f32" else "bf16"
                times[(tool, precision, m["name"])] = float(m["ms"])
                break
        m = ERR.search(line)
        if m:
            errs[m["name"]] = m["err"]
    return times, errs


def show(ms):
    if ms is None:
        return "-"
    return f"{ms / 1e3:.2f} s" if ms >= 1000 else f"{ms:.0f} ms"


def ratio(a, b):
    return "-" if a is None or b is None else f"{a / b:.2f}"


def table(times, errs):
    out = [
        "| network | ours f32 | OpenVINO f32 | PyTorch f32 | ours bf16 | OpenVINO bf16 "
        "| PyTorch bf16 | ours / OpenVINO f32 | ours / OpenVINO bf16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, label in ROWS:
        get = {(tool, p): times.get((tool, p, name))
               for tool in ("ours", "openvino", "torch") for p in ("f32", "bf16")}
        cells = [show(get[(tool, p)]) for p in ("f32", "bf16")
                 for tool in ("ours", "openvino", "torch")]
        cells += [ratio(get[("ours", p)], get[("openvino", p)]) for p in ("f32", "bf16")]
        out.append(f"| {name} ({label}) | " + " | ".join(cells) + " |")
    out.append("")
    out.append("ours: bf16 products (`--bf16`); OpenVINO: INFERENCE_PRECISION_HINT; "
               "PyTorch: bf16 autocast. ours / OpenVINO below 1: ours is faster.")
    if errs:
        out.append("OpenVINO f32 against PyTorch f32, max |ov - torch| / max |torch|: "
                   + ", ".join(f"{n} {errs[n]}" for n, _ in ROWS if n in errs) + ".")
    return "\n".join(out)


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    lines = []
    for path in sys.argv[1:]:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines += f.read().splitlines()
    print(table(*parse(lines)))


if __name__ == "__main__":
    main()
