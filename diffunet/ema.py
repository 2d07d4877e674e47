"""Exponential moving average of the weights: a plain copy of the model plus an update function.

Sampling from the EMA weights instead of the raw ones gives visibly cleaner images (Ho et al. 2020,
Sec. 4 and App. B, decay 0.9999). The EMA is an ordinary `nn.Module`, so it is saved, loaded and
sampled from exactly like the model itself; nothing here keeps hidden state.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def ema_copy(model: nn.Module) -> nn.Module:
    """Start an EMA of `model`: a deep copy in eval mode whose parameters need no gradient.

    Args:
        model: the network being trained.

    Returns:
        A separate module with the same weights, ready for `ema_update`.
    """
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Move the EMA weights toward the model's, in place: ema = decay * ema + (1 - decay) * model.

    Written as `ema.lerp_(model, 1 - decay)`, which is the same formula. Buffers (for example
    normalization statistics) are not averaged but copied, so they always match the model's.

    Args:
        ema: the module returned by `ema_copy(model)`.
        model: the network being trained (same architecture).
        decay: in [0, 1]; 0 copies the model, 1 keeps the EMA unchanged. See `ema_decay`.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1]; got {decay}")
    ema_parameters, model_parameters = list(ema.parameters()), list(model.parameters())
    ema_buffers, model_buffers = list(ema.buffers()), list(model.buffers())
    if len(ema_parameters) != len(model_parameters) or len(ema_buffers) != len(model_buffers):
        raise ValueError("the EMA and the model have different architectures; make the EMA with ema_copy(model)")
    for ema_parameter, parameter in zip(ema_parameters, model_parameters):
        ema_parameter.lerp_(parameter.detach().to(ema_parameter.dtype), 1.0 - decay)
    for ema_buffer, buffer in zip(ema_buffers, model_buffers):
        ema_buffer.copy_(buffer)


def ema_decay(step: int, max_decay: float = 0.9999, *, warmup: bool = True) -> float:
    """The EMA decay to use after optimizer step `step` (0-based).

    With warm-up the decay is min(max_decay, (1 + step) / (10 + step)): 0.1 at step 0, 0.5 at
    step 8, 0.9 at step 80, 0.99 at step 890. This is the `num_updates` rule of TensorFlow's
    ExponentialMovingAverage that Ho et al. 2020 trained with. Early on the EMA then follows the
    fast-changing weights closely instead of averaging in the random initialisation for
    thousands of steps, which matters for short runs.

    Args:
        step: optimizer steps taken before this update (0 for the first update).
        max_decay: the decay after warm-up, in [0, 1).
        warmup: False returns `max_decay` at every step.

    Returns:
        The decay for `ema_update`.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0; got {step}")
    if not 0.0 <= max_decay < 1.0:
        raise ValueError(f"max_decay must be in [0, 1); got {max_decay}")
    if not warmup:
        return max_decay
    return min(max_decay, (1 + step) / (10 + step))
