"""Gaussian noise that does not depend on the batch size or the device."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

Generators = torch.Generator | Sequence[torch.Generator] | None  # one for the batch, or one per image


def randn(shape: Sequence[int], generator: Generators = None, device: torch.device | str | None = None,
          dtype: torch.dtype | None = None) -> Tensor:
    """Standard normal noise, drawn in float32 on the generator's device (the CPU for CPU generators), then moved.

    With a list of per-image generators, image i is drawn from generator i alone, so it is the same
    whether it is made in a batch of 1, 7 or 64, on any device and in any dtype.

    Args:
        shape: [B, ...] shape of the noise.
        generator: None (the global RNG), one torch.Generator, or a list of B generators.
        device: where the result goes (default: the CPU).
        dtype: the result's dtype (default: torch's default float dtype).
    Returns:
        Tensor of `shape` on `device` in `dtype`.
    """
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per image")
        noise = torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator])
    else:
        noise = torch.randn(shape, generator=generator, device=generator.device if generator is not None else "cpu")
    return noise.to(device=device, dtype=dtype or torch.get_default_dtype())
