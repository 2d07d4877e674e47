"""`train()` in one process of a test run, under torchrun or alone: `python ddp_worker.py OUT DATA BATCH STEPS MODE`
(continuing the run in OUT if it has one).

The loss draws each image's t and eps from a generator seeded by that image's bytes, so an image gets the
same draws whichever rank holds it, and 2 processes at batch 16 can be compared with 1 at batch 32.
Each rank writes OUT/rank{r}.json: the images it saw per step (their seeds), a digest of its global RNG
state when training starts, and the error that stopped it, if any.
MODE: "train", or "nan" (rank 1's loss is nan at step 2).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import zlib
from pathlib import Path

import torch

import diffunet.training as training
from diffunet.errors import UserError

TINY_MODEL = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(), norm_groups=4,
                  head_channels=8, zero_init=False)  # every weight gets a gradient from the first step


def main(out: str, data: str, batch_size: int, steps: int, mode: str) -> None:
    rank = int(os.environ.get("RANK", 0))
    record = {"images": [], "rng": None, "error": None}

    def per_image_noise_loss(model, x0, schedule, *, prediction, y=None, **_):
        """The v-MSE of Salimans & Ho 2022 with (t, eps) a function of each image: [B]."""
        seeds = [zlib.crc32(image.numpy().tobytes()) for image in x0]
        record["images"].append(seeds)
        if record["rng"] is None:
            record["rng"] = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        t = torch.stack([torch.randint(0, schedule.num_timesteps, (), generator=g) for g in generators])
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators])
        x_t = schedule.add_noise(x0, t, noise)
        output = model(x_t, t, y=y)
        loss = ((output.float() - schedule.training_target(x0, noise, t, prediction)) ** 2).mean(dim=(1, 2, 3))
        if mode == "nan" and rank == 1 and len(record["images"]) == 2:
            loss = loss * float("nan")
        return loss

    training.training_loss = per_image_noise_loss
    cfg = training.TrainConfig(data=data, out=out, steps=steps, batch_size=batch_size, label_dropout=0.0,
                               precision="fp32", device="cpu", save_every=3, sample_every=3, num_samples=2,
                               sample_steps=1, quiet=True, resume=True)
    try:
        training.train(cfg, TINY_MODEL)
    except UserError as error:
        record["error"] = str(error)
    finally:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, f"rank{rank}.json").write_text(json.dumps(record))
        if torch.distributed.is_initialized():  # left to interpreter exit, gloo's threads can abort the process
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
