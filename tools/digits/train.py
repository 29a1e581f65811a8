#!/usr/bin/env python3
"""Train the embedded default model: a class-conditional pixel-space DDPM on sklearn's digits.

A diffusers UNet2DModel (num_class_embeds=10) learns epsilon on the 8x8 handwritten digits
that scikit-learn ships, upsampled (nearest) to 16x16 and scaled to [-1, 1], with the standard
DDPM objective: MSE between the noise drawn and the noise predicted at a uniform timestep.
CPU only, one thread, seeded and deterministic.

Writes (under --out, default assets/digits):
  unet/config.json, unet/diffusion_pytorch_model.safetensors   (EMA weights, save_pretrained)
  scheduler/scheduler_config.json                              (the DDPMScheduler used)
  split.json                                                   (held-out test indices)
  training_log.json                                            (loss per epoch, time, settings)
"""

import argparse
import copy
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import diffusers  # noqa: E402
import sklearn  # noqa: E402
from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(os.path.dirname(here))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(repo, "assets", "digits"))
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="also save the EMA model every N epochs under OUT/checkpoints/ (0: never)")
    args = p.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    images, labels, train_idx, test_idx = common.load_split()
    x_train = common.to_model_space(images[train_idx])
    y_train = torch.as_tensor(labels[train_idx])
    n = len(train_idx)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "split.json"), "w") as f:
        json.dump({
            "dataset": "sklearn.datasets.load_digits (1797 images, 8x8, integer values 0..16)",
            "how": f"sklearn.model_selection.train_test_split(arange(1797), test_size={common.TEST_FRACTION}, "
                   f"stratify=target, random_state={common.SPLIT_SEED}); indices into load_digits() order, sorted",
            "sklearn_version": sklearn.__version__,
            "train_size": int(n),
            "test_size": int(len(test_idx)),
            "test_indices": [int(i) for i in test_idx],
            "test_labels": [int(labels[i]) for i in test_idx],
            "train_indices": [int(i) for i in train_idx],
        }, f)
        f.write("\n")

    model = UNet2DModel(**common.UNET_CONFIG)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    scheduler = DDPMScheduler(**common.SCHEDULER_CONFIG)
    scheduler.save_pretrained(os.path.join(args.out, "scheduler"))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"UNet2DModel: {n_params} parameters ({n_params * 4 / 2**20:.2f} MiB float32); train {n}, test {len(test_idx)}")

    steps_per_epoch = math.ceil(n / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    def lr_at(step):  # linear warm-up, then cosine decay to 0
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        t = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
        return args.lr * 0.5 * (1 + math.cos(math.pi * t))

    T = scheduler.config.num_train_timesteps
    log = []
    step = 0
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        losses = []
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
            x0, y = x_train[idx], y_train[idx]
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, T, (len(idx),), generator=gen)
            xt = scheduler.add_noise(x0, noise, t)
            pred = model(xt, t, class_labels=y).sample
            loss = torch.nn.functional.mse_loss(pred, noise)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - decay)
            losses.append(loss.item())
        elapsed = time.time() - t0
        log.append({"epoch": epoch + 1, "step": step, "loss": float(np.mean(losses)),
                    "lr": lr_at(step - 1), "elapsed_s": round(elapsed, 1)})
        print(f"epoch {epoch + 1:4d} step {step:6d} loss {np.mean(losses):.5f} lr {lr_at(step - 1):.2e} {elapsed:7.1f}s",
              flush=True)
        if args.checkpoint_every and (epoch + 1) % args.checkpoint_every == 0 and epoch + 1 < args.epochs:
            ema.save_pretrained(os.path.join(args.out, "checkpoints", f"epoch{epoch + 1:04d}"))
    wall = time.time() - t0

    ema.save_pretrained(os.path.join(args.out, "unet"))
    weights = os.path.join(args.out, "unet", "diffusion_pytorch_model.safetensors")

    def bucket(lo, hi):
        sel = [e["loss"] for e in log if lo < e["epoch"] <= hi]
        return float(np.mean(sel)) if sel else None

    every = max(1, args.epochs // 20)
    with open(os.path.join(args.out, "training_log.json"), "w") as f:
        json.dump({
            "what": "class-conditional pixel-space DDPM on sklearn digits (8x8 -> nearest 16x16, [-1,1]); "
                    "epsilon prediction, MSE objective; the saved unet/ holds the EMA weights",
            "wall_time_s": round(wall, 1),
            "machine": f"{platform.machine()} CPU, torch.set_num_threads(1), {platform.python_implementation()} {platform.python_version()}",
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "scikit-learn": sklearn.__version__, "numpy": np.__version__},
            "seeds": {"training": args.seed, "split_random_state": common.SPLIT_SEED},
            "dataset": {"train": int(n), "test": int(len(test_idx)), "test_fraction": common.TEST_FRACTION,
                        "stratified": True, "image_size": common.IMAGE_SIZE,
                        "pixel_mapping": "x = value/8 - 1, nearest-neighbour 2x upsampling"},
            "hyperparameters": {"epochs": args.epochs, "batch_size": args.batch_size,
                                "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                                "optimizer": "AdamW(weight_decay=0)", "lr": args.lr,
                                "lr_schedule": f"linear warm-up {args.warmup_steps} steps, cosine decay to 0",
                                "grad_clip_norm": 1.0, "ema_decay": args.ema_decay,
                                "ema_warmup": "decay = min(ema_decay, (1+step)/(10+step))",
                                "timesteps": "uniform over 0..num_train_timesteps-1"},
            "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in common.UNET_CONFIG.items()},
            "scheduler_config": common.SCHEDULER_CONFIG,
            "parameters": n_params,
            "weights_bytes": os.path.getsize(weights),
            "final_loss": log[-1]["loss"],
            "loss_every_epochs": every,
            "loss_by_epoch_bucket": [{"epochs": f"{lo + 1}-{min(lo + every, args.epochs)}",
                                      "mean_loss": bucket(lo, lo + every)}
                                     for lo in range(0, args.epochs, every)],
            "per_epoch": log,
        }, f, indent=1)
        f.write("\n")
    print(f"done in {wall:.0f}s; weights {os.path.getsize(weights)} bytes -> {args.out}")


if __name__ == "__main__":
    main()
