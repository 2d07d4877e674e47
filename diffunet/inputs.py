"""A user's inputs to the sampling commands (`diffunet sample`, `diffunet inpaint`): pictures, condition
folders, and the --label / --guidance flags checked against the run, each bad one a one-line UserError."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import convert_channels, image_names, read_image
from .errors import UserError


def read_cond(args, run) -> tuple[list[str], torch.Tensor | None, torch.Tensor | None]:
    """--cond (a picture or a folder of them) and --mask: (input names, uint8 [N, C', h, w] or None, keep mask)."""
    if args.cond is None:
        if args.mask is not None:
            raise UserError("--mask goes with --cond (the image to fill in) for an inpaint run")
        return [], None, None
    folder = Path(args.cond)
    if not folder.exists():
        raise UserError(f"--cond {folder} does not exist; give an image or a folder of images")
    names = image_names(folder) if folder.is_dir() else [folder.name]
    if not names:
        raise UserError(f"--cond {folder} holds no images; put the inputs there as PNG files")
    paths = [folder / name for name in names] if folder.is_dir() else [folder]
    channels = {"pairs": run.task.cond_channels, "colorize": 3}.get(run.task.kind, run.image_shape[0])
    arrays = [convert_channels(read_image(path), channels) for path in paths]     # each [h, w, C']
    if any(array.shape != arrays[0].shape for array in arrays):
        odd = next(name for name, array in zip(names, arrays) if array.shape != arrays[0].shape)
        raise UserError(f"--cond {folder}: {odd} is not the size of {names[0]}; give inputs of one size")
    cond = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()      # [N, C', h, w] uint8
    _, height, width = run.output_shape(cond)    # a direct run's at the input's size, a diffusion run's its own
    mask = None if args.mask is None else (read_picture(args.mask, "--mask", 1, height, width) >= 128).float()
    return names, cond, mask


def check_label_and_guidance(args, num_classes: int | None) -> None:
    """--label and --guidance errors in the words of the flags (Run.sample checks the same, in its own)."""
    if not num_classes:
        if args.label is not None:
            raise UserError("--label was given but this model is unconditional (trained without labels)")
        if args.guidance is not None:
            raise UserError("--guidance needs a class-conditional model; this one was trained without labels")
    elif args.label is not None and not 0 <= args.label < num_classes:
        raise UserError(f"--label must be in 0..{num_classes - 1} for this model; got {args.label}")


def read_picture(path: str, flag: str, channels: int, height: int, width: int) -> torch.Tensor:
    """A picture file as uint8 [1, channels, H, W]; a size other than the model's is a one-line UserError."""
    if not Path(path).is_file():
        raise UserError(f"{flag} {path} does not exist; give an image file")
    array = read_image(Path(path))                                                    # [H, W, 1..4] uint8
    if array.shape[:2] != (height, width):
        raise UserError(f"{flag} {path} is {array.shape[1]}x{array.shape[0]} but the model makes {width}x{height} "
                        f"images; resize or crop it to {width}x{height}")
    array = np.array(convert_channels(array, channels))                               # a writable copy
    return torch.from_numpy(array).permute(2, 0, 1)[None]
