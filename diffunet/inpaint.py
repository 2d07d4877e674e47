"""`diffunet inpaint`: fill in the masked-out part of an image with a trained run, no retraining (RePaint).

Writes one row: the original, the mask, then the K completions. The mask is a picture of the same size,
WHITE = KEEP: pixels at 128 or brighter keep the original, darker ones are filled in.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
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
    """Load the run, read image and mask, run `samplers.repaint`, write the grid."""
    from samplers import randn
    from samplers.repaint import repaint

    from .cli import _check_label_and_guidance
    from .generate import _bind_labels, image_generators
    from .images import make_grid, save_image, to_model_range, to_uint8
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
    if args.steps > run.schedule.num_timesteps:
        raise UserError(f"--steps must be at most the run's {run.schedule.num_timesteps} diffusion timesteps; "
                        f"got {args.steps}")
    channels, height, width = run.image_shape
    image = _read_picture(args.image, "--image", channels, height, width)             # [1, C, H, W] uint8
    keep = _read_picture(args.mask, "--mask", 1, height, width) >= 128                # [1, 1, H, W] bool
    _check_label_and_guidance(args, run.num_classes)
    labels = run.labels(args.num, args.label) if args.label is not None else _no_labels(run, args.num, args.guidance)
    guidance = args.guidance if args.guidance is not None else run.guidance
    denoiser = _bind_labels(run.model, labels.to(run.device) if labels is not None else None, guidance)

    generators = image_generators(args.seed, 0, args.num)
    x = randn((args.num, channels, height, width), generators, device=run.device)
    known = to_model_range(image).to(run.device).expand_as(x)                         # [K, C, H, W] in [-1, 1]
    with torch.inference_mode():
        filled = repaint(denoiser, x, run.schedule, known, keep.float().to(run.device), args.steps,
                         jump_length=args.jump_length, resamples=args.resamples, prediction=run.prediction,
                         clip_x0=1.0, generator=generators, progress=args.progress)
    mask_picture = (keep.to(torch.uint8) * 255).expand(1, channels, height, width).clone()
    if channels in (2, 4):
        mask_picture[:, -1] = 255                                                      # opaque alpha
    row = torch.cat([image, mask_picture, to_uint8(filled.float().cpu())])            # [K + 2, C, H, W]
    save_image(make_grid(row, nrow=len(row)), args.out)
    print(f"wrote the original, the mask and {args.num} completions to {args.out}")


def _no_labels(run, num: int, guidance: float | None) -> torch.Tensor | None:
    """Labels for completions without --label: "no label" (-1) for a class-conditional run, so the known
    pixels alone decide the class; None for an unconditional one."""
    if not run.num_classes:
        return None
    if guidance is not None:
        raise UserError("--guidance needs --label: guidance pushes towards a class, and none was given")
    if not run.train_config.get("label_dropout", 0) > 0:
        raise UserError(f"{run.path} was trained without label dropout, so it cannot complete an image without a "
                        f"class; give --label")
    return torch.full((num,), -1)


def _read_picture(path: str, flag: str, channels: int, height: int, width: int) -> torch.Tensor:
    """A picture file as uint8 [1, channels, H, W]; a size other than the model's is a one-line UserError."""
    from .data import _convert_channels, _read_image

    if not Path(path).is_file():
        raise UserError(f"{flag} {path} does not exist; give an image file")
    array = _read_image(Path(path))                                                    # [H, W, 1..4] uint8
    if array.shape[:2] != (height, width):
        raise UserError(f"{flag} {path} is {array.shape[1]}x{array.shape[0]} but the model makes {width}x{height} "
                        f"images; resize or crop it to {width}x{height}")
    array = np.array(_convert_channels(array, channels))                               # a writable copy
    return torch.from_numpy(array).permute(2, 0, 1)[None]
