"""Writes assets/digits/digits.safetensors: scikit-learn's 8x8 digits, for the Rust tests.

The Rust quality test of the embedded digits model (crates/sd-models/tests/digits.rs) fits
its k-nearest-neighbour classifier on the real training digits and measures how close the
generated samples come to them; it needs the data without Python. This script writes it
as two uint8 tensors, in load_digits() order:

- "images": [1797, 64], the 8x8 digits row-major, values 0..16;
- "labels": [1797], the digit each image shows.

The held-out indices are those of assets/digits/split.json (written by train.py); this
script re-derives the split and fails if it disagrees, so the two files cannot drift.

Needs only numpy, scikit-learn and safetensors (versions pinned in requirements.txt):

    .venv/bin/python tools/digits/export_data.py
"""

import argparse
import json
import pathlib

import numpy as np
from safetensors.numpy import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

ROOT = pathlib.Path(__file__).resolve().parents[2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "assets/digits/digits.safetensors"))
    parser.add_argument("--split", default=str(ROOT / "assets/digits/split.json"))
    args = parser.parse_args()

    d = load_digits()
    images = d.images.astype(np.uint8).reshape(len(d.target), 64)
    labels = d.target.astype(np.uint8)
    assert images.max() <= 16 and np.array_equal(images, d.images.reshape(-1, 64))

    # The same split as common.load_split (kept free of torch here).
    idx = np.arange(len(labels))
    _, test_idx = train_test_split(idx, test_size=0.2, stratify=labels, random_state=0)
    with open(args.split) as f:
        split = json.load(f)
    if sorted(test_idx.tolist()) != split["test_indices"]:
        raise SystemExit(f"{args.split} disagrees with the split scikit-learn gives here")

    save_file(
        {"images": np.ascontiguousarray(images), "labels": np.ascontiguousarray(labels)},
        args.out,
        metadata={
            "source": "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits, test part)",
            "layout": "images [N, 64] uint8 0..16 row-major 8x8; labels [N] uint8",
        },
    )
    print(f"wrote {args.out}: {images.shape[0]} digits")


if __name__ == "__main__":
    main()
