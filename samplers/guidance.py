"""Classifier-free guidance (Ho & Salimans 2022) as a closure over any label-conditioned model."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def guided(model: Callable[..., Tensor], y: Tensor, scale: float,
           null_label: int = -1) -> Callable[[Tensor, Tensor], Tensor]:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): out = uncond + scale * (cond - uncond).

    scale = 1 + w in the paper's notation: 1 is plain conditional sampling, 0 unconditional. Both
    branches run in ONE forward on the doubled batch [x, x] with labels [y, null_label]. Because
    eps, x0 and v are affine in one another at fixed (x_t, t), the rule fits any prediction kind.

    Args:
        model: called as `model(x, t, y=labels)`; `null_label` (default -1) means "no label".
        y: [B] long class labels, one per image of the batch the sampler passes in.
        scale: guidance scale.
        null_label: the label value of the unconditional branch.
    Returns:
        A denoiser `(x_t, t) -> out` for any sampler.
    """
    y = torch.as_tensor(y)

    def denoiser(x: Tensor, t: Tensor) -> Tensor:
        if len(y) != len(x):
            raise ValueError(f"guided() got {len(y)} labels for a batch of {len(x)}; pass one label per image")
        cond, uncond = both_branches(model, x, t, y.to(x.device), null_label)
        return uncond + scale * (cond - uncond)

    return denoiser


def both_branches(model: Callable[..., Tensor], x: Tensor, t, labels: Tensor,
                  null_label: int = -1) -> tuple[Tensor, Tensor]:
    """(conditional, unconditional) outputs [B, ...] each, from ONE forward on the doubled batch [x, x] with
    labels [labels, null_label]; t is a scalar or [B]."""
    t = torch.as_tensor(t, device=x.device).expand(len(x))                          # [B]
    out = model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([labels, torch.full_like(labels, null_label)]))
    return out.chunk(2)
