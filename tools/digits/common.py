"""Shared pieces of the digits model: the data, the split, the model and scheduler configs.

Kept in one place so train.py and evaluate.py cannot disagree about the pixel mapping or
the held-out split.
"""

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SPLIT_SEED = 0
TEST_FRACTION = 0.2
IMAGE_SIZE = 16  # the 8x8 digits, nearest-neighbour upsampled 2x
NUM_CLASSES = 10

# diffusers.UNet2DModel arguments (everything else is the diffusers default).
UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    num_class_embeds=NUM_CLASSES,
    norm_num_groups=8,
    attention_head_dim=32,
)

# diffusers.DDPMScheduler arguments: the training schedule, saved as scheduler_config.json.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
    variance_type="fixed_small",
    clip_sample=True,
    clip_sample_range=1.0,
)


def load_split():
    """The sklearn digits (1797 images, 8x8, values 0..16) and the seeded stratified split.

    Returns (images uint8 [N,8,8], labels int64 [N], train_idx, test_idx); indices are into
    sklearn's order, sorted ascending.
    """
    d = load_digits()
    images = d.images.astype(np.uint8)
    labels = d.target.astype(np.int64)
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        idx, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return images, labels, np.sort(train_idx), np.sort(test_idx)


def to_model_space(images_0_16):
    """[N,8,8] in 0..16 -> float32 tensor [N,1,16,16] in [-1,1] (value/8 - 1, nearest 2x)."""
    x = torch.as_tensor(np.asarray(images_0_16), dtype=torch.float32) / 8.0 - 1.0
    x = x[:, None]
    return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def to_digit_space(samples):
    """[N,1,16,16] in [-1,1] -> float64 numpy [N,64] in 0..16 (2x2 average pool, (x+1)*8).

    The exact inverse of to_model_space on nearest-upsampled images.
    """
    x = torch.as_tensor(samples, dtype=torch.float32).clamp(-1, 1)
    x = torch.nn.functional.avg_pool2d(x, 2)
    return ((x[:, 0] + 1.0) * 8.0).reshape(len(x), 64).double().numpy()
