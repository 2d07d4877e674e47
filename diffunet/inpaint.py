"""`diffunet inpaint`: fill in the masked-out part of an image with a trained run, no retraining (RePaint).

Writes one row: the original, the mask, then the K completions. The mask is a picture of the same size,
WHITE = KEEP: pixels at 128 or brighter keep the original, darker ones are filled in.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from .errors import UserError

MAX_COMPLETIONS = 256  # one batch; more than this from the CLI is almost certainly a typo


def add_inpaint_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `diffunet inpaint`."""
    parser.description = ("Fill in the dark part of --mask in --image with a trained run (RePaint, Lugmayr et al. "
                          "2022). Mask convention: WHITE = KEEP the original, BLACK = FILL IN.")
    parser.add_argument("--checkpoint", required=True, help="run folder or model.safetensors")
    parser.add_argument("--image", required=True, help="PNG (or any Pillow image) of the run's image size")
    parser.add_argument("--mask", required=True, help="same-size picture: WHITE (>= 128) = keep, BLACK = fill in")
    parser.add_argument("--out", default="inpainted.png", help="PNG: original, mask, then the completions")
    parser.add_argument("--num", type=int, default=4, help="completions K (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="completion i depends only on (seed, i)")
    parser.add_argument("--steps", type=int, default=50, help="timesteps of the descent (default: 50)")
    parser.add_argument("--jump-length", type=int, default=10, help="steps between jumps back up (default: 10)")
    parser.add_argument("--resamples", type=int, default=10,
                        help="times each segment is traversed; 1 = no resampling (default: 10)")
    parser.add_argument("--label", type=int, default=None,
                        help="class label for every completion (default: none; the class is read off the image)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def run_inpaint(args: argparse.Namespace) -> None:
    """Load the run, read image and mask, complete with `Run.inpaint`, write the grid."""
    from .images import make_grid, save_image, to_uint8
    from .inputs import check_label_and_guidance, read_picture
    from .run import load_run
    from .training import pick_device

    if not 0 < args.num <= MAX_COMPLETIONS:
        raise UserError(f"--num must be between 1 and {MAX_COMPLETIONS}; got {args.num}")
    for flag, value in (("--steps", args.steps), ("--jump-length", args.jump_length), ("--resamples", args.resamples)):
        if value <= 0:
            raise UserError(f"{flag} must be a positive integer; got {value}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise UserError(f"--guidance must be a finite number; got {args.guidance}")
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed must be in 0..{2**32 - 1}; got {args.seed}")
    if Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a folder; give a file path")
    run = load_run(args.checkpoint, device=pick_device(args.device))
    channels, height, width = run.image_shape
    image = read_picture(args.image, "--image", channels, height, width)              # [1, C, H, W] uint8
    keep = read_picture(args.mask, "--mask", 1, height, width) >= 128                 # [1, 1, H, W] bool
    check_label_and_guidance(args, run.num_classes)
    filled = run.inpaint(image, keep, args.num, seed=args.seed, label=args.label, guidance=args.guidance,
                         steps=args.steps, jump_length=args.jump_length, resamples=args.resamples,
                         batch_size=MAX_COMPLETIONS, progress=args.progress)        # [K, C, H, W] in [-1, 1]
    mask_picture = (keep.to(torch.uint8) * 255).expand(1, channels, height, width).clone()
    if channels in (2, 4):
        mask_picture[:, -1] = 255                                                      # opaque alpha
    row = torch.cat([image, mask_picture, to_uint8(filled)])                           # [K + 2, C, H, W]
    save_image(make_grid(row, nrow=len(row)), args.out)
    print(f"wrote the original, the mask and {args.num} completions to {args.out}")
