"""Images out of the model: the [-1, 1] <-> uint8 conversions, grids, and image files (PNG by default).

Samples, inpainting rows and training previews all end here: `to_uint8` turns the model's range into
pixels, `make_grid` tiles a batch into one picture, `save_image` writes it atomically, so a kill
mid-write leaves the previous file whole. `to_model_range` is the way in, for training batches.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from PIL import Image

from .atomic import atomic_write


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [-1, 1]: x = u / 127.5 - 1."""
    return images.float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float in [-1, 1] -> uint8: u = round((clip(x, -1, 1) + 1) * 127.5); NaN becomes 128."""
    return ((x.detach().float().nan_to_num(0.0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 0) -> torch.Tensor:
    """Tile images into one picture.

    Args:
        images: [N, C, H, W] (or one [C, H, W]) uint8, or float in [-1, 1].
        nrow: images per row; None = ceil(sqrt(N)).
        padding: pixels between and around the images.
        pad_value: 0..255 value of the padding.

    Returns:
        uint8 [C, rows * (H + padding) + padding, nrow * (W + padding) + padding].
    """
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"make_grid needs images [N, C, H, W] with N >= 1; got shape {tuple(images.shape)}")
    if images.is_floating_point():
        images = to_uint8(images)
    count, channels, height, width = images.shape
    columns = min(nrow or math.ceil(math.sqrt(count)), count)
    rows = math.ceil(count / columns)
    grid = torch.full((channels, rows * (height + padding) + padding, columns * (width + padding) + padding),
                      pad_value, dtype=torch.uint8)
    for i, image in enumerate(images.cpu()):
        top, left = padding + (i // columns) * (height + padding), padding + (i % columns) * (width + padding)
        grid[:, top:top + height, left:left + width] = image
    return grid


def save_image(image: torch.Tensor, path: str | os.PathLike) -> None:
    """Write one image [C, H, W] (or a batch [N, C, H, W], tiled by make_grid) atomically.

    Args:
        image: uint8, or float in [-1, 1]; C = 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA).
        path: the file; its suffix picks the format (PNG when Pillow does not know it).
    """
    if image.dim() == 4:
        image = make_grid(image)
    if image.is_floating_point():
        image = to_uint8(image)
    if image.dim() != 3 or image.shape[0] not in (1, 2, 3, 4):
        raise ValueError(f"save_image needs [C, H, W] or [N, C, H, W] with C in 1..4; got {tuple(image.shape)}")
    array = image.cpu().permute(1, 2, 0).numpy()  # [H, W, C]
    picture = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    image_format = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    atomic_write(path, lambda temp: picture.save(temp, format=image_format))
