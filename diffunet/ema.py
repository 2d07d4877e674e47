"""Moving average of the weights: a plain copy of the model plus an update function.

Sampling from the EMA weights instead of the raw ones gives visibly cleaner images (Ho et al. 2020,
Sec. 4 and App. B, decay 0.9999). The EMA is an ordinary `nn.Module`, so it is saved, loaded and
sampled from exactly like the model itself; nothing here keeps hidden state. Two decay schedules, each
a function of the step alone (so a resumed run continues exactly):

- `ema_decay`: the classic exponential EMA, decay (1 + t) / (10 + t) capped at a maximum;
- `power_ema_decay`: the power-function EMA of Karras et al. 2024 (EDM2), whose averaging window is a
  fixed fraction of the run so far (its relative standard deviation sigma_rel, `power_ema_exponent`).
"""
from __future__ import annotations

import copy
import math

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
    step 8, 0.9 at step 80, 0.99 at step 890, 0.9955 at step 1999, 0.999 only from step 8990. This is
    the `num_updates` rule of TensorFlow's ExponentialMovingAverage that Ho et al. 2020 trained with.
    Early on the EMA then follows the fast-changing weights closely instead of averaging in the random
    initialisation for thousands of steps, which matters for short runs; `max_decay` is a cap on that
    ramp, so in a run shorter than (10 max_decay - 1) / (1 - max_decay) steps it never binds.

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


POWER_EMA_MAX_STD = math.sqrt(1 / 12)  # sigma_rel at gamma = 0 (a uniform average of the whole run)


def power_ema_exponent(sigma_rel: float) -> float:
    """The exponent gamma of the power-function EMA whose relative standard deviation is `sigma_rel`.

    Karras et al. 2024 ("Analyzing and Improving the Training Dynamics of Diffusion Models", App. C,
    eq. 123) give sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)), which falls from 1/12 at
    gamma = 0 towards 0; their eq. 126 / Algorithm 2 takes the largest real root of the cubic
    gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2). That root is the gamma >= 0
    found here by bisection on the falling branch. sigma_rel 0.05 gives gamma = 16.97, 0.10 gives 6.94.

    Args:
        sigma_rel: the width of the averaging window as a fraction of the steps so far, in (0, 0.2887).

    Returns:
        gamma for `power_ema_decay`.
    """
    if not 0 < sigma_rel < POWER_EMA_MAX_STD:
        raise ValueError(f"the power EMA's sigma_rel must be in (0, {POWER_EMA_MAX_STD:.4f}) (0.05-0.10 in EDM2); "
                         f"got {sigma_rel}")

    def relative_std(gamma: float) -> float:
        return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))

    low, high = 0.0, 1.0
    while relative_std(high) > sigma_rel:
        low, high = high, 2 * high
    for _ in range(100):  # halves [low, high] down to float precision
        middle = (low + high) / 2
        low, high = (middle, high) if relative_std(middle) > sigma_rel else (low, middle)
    return (low + high) / 2


def power_ema_decay(step: int, gamma: float) -> float:
    """The power-function EMA decay to use after optimizer step `step` (0-based).

    beta_t = (1 - 1/t)^(gamma + 1) with t = step + 1 the number of updates so far (Karras et al. 2024,
    Sec. 3.1): 0 at the first update (the EMA starts as the model), then the EMA after n updates is
    the average of the weights theta_1 ... theta_n with weights (s^(gamma+1) - (s-1)^(gamma+1)) / n^(gamma+1),
    the discrete form of their profile (gamma + 1) tau^gamma / t^(gamma+1). For gamma = 6.94
    (sigma_rel 0.10) the decay is 0.9960 at step 1999 and 0.99960 at step 19999.

    Args:
        step: optimizer steps taken before this update (0 for the first update).
        gamma: the exponent, >= 0; see `power_ema_exponent`.

    Returns:
        The decay for `ema_update`.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0; got {step}")
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0; got {gamma}")
    return (1 - 1 / (step + 1)) ** (gamma + 1)
