"""RePaint (Lugmayr et al. 2022): inpainting with any unconditional denoiser, no training."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .noise import Generators, randn
from .schedule import Denoiser, NoiseSchedule


@torch.no_grad()
def repaint(model: Denoiser, x: Tensor, schedule: NoiseSchedule, known: Tensor, mask: Tensor, steps: int = 50, *,
            jump_length: int = 10, resamples: int = 10, prediction: str = "eps", clip_x0: float | None = None,
            generator: Generators = None, progress: bool = False) -> Tensor:
    """RePaint (Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion Probabilistic Models", Algorithm 1):
    ancestral sampling in which, at every step t -> s (s less noisy), the two regions are drawn apart and joined:
        x_s^known   ~ q(x_s | x0 = known) = N(alpha_s known, sigma_s^2 I)                          (eq. 8a)
        x_s^unknown ~ q(x_s | x_t, x0_hat) = N(mean, var I)                                        (eq. 8b)
        x_s = mask * x_s^known + (1 - mask) * x_s^unknown                                          (eq. 8c)
    with the posterior in alpha/sigma form (Kingma et al. 2021, "Variational Diffusion Models", eqs. 32-34):
        alpha_ts = alpha_t / alpha_s,  sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2,
        mean = alpha_ts sigma_s^2 / sigma_t^2 x_t + alpha_s sigma_ts^2 / sigma_t^2 x0_hat,
        var = sigma_ts^2 sigma_s^2 / sigma_t^2.
    Resampling (sec. 4.2 and the appendix's jump schedule): after descending `jump_length` steps to a
    grid point j = 0, J, 2J, ..., x is diffused back up J steps with q(x_t | x_s) = N(alpha_ts x_s,
    sigma_ts^2 I) and the segment descended again, so each segment is traversed `resamples` times and the
    model can harmonise the unknown region with the known one. resamples = 1 is plain replacement.
    The timestep grid is DDPM's, `schedule.timesteps(steps, "trailing")`; the last step returns x0_hat.

    Args:
        model: denoiser, called as `model(x_t, t)` with t a [B] tensor of the schedule's timesteps.
        x: starting noise [B, ...] at the first timestep (T-1).
        known: [B, ...] the image whose region mask == 1 is kept, same shape as x, in the model's range.
        mask: broadcastable to x (e.g. [B, 1, H, W] or [1, 1, H, W]); 1 = keep `known`, 0 = fill in.
        steps: number of timesteps in the descent (1..T); model calls grow with the resampling.
        jump_length: J, steps descended between jumps back up.
        resamples: R, times each J-step segment is traversed (R - 1 jumps back per grid point).
        prediction: what the model outputs: "eps", "x0" or "v".
        clip_x0: clip x0_hat to [-clip_x0, clip_x0]; None = no clipping.
        generator: None, a torch.Generator, or a list of per-image generators (see `randn`).
        progress: show a tqdm bar.
    Returns:
        The inpainted batch, shape, device and dtype of x, equal to `known` exactly where mask == 1.
    """
    _check_inputs(x, known, mask, jump_length, resamples)
    known, mask = known.to(x), mask.to(x)
    timesteps = schedule.timesteps(steps, "trailing")                   # descending; level k = timesteps[-1 - k]
    levels = _jump_schedule(len(timesteps), jump_length, resamples)     # -1 = clean data
    noise = lambda: randn(x.shape, generator, device=x.device, dtype=x.dtype)
    for k, k_next in tqdm(list(zip(levels, levels[1:])), desc="repaint", disable=not progress):
        t, s = timesteps[-1 - k], (timesteps[-1 - k_next] if k_next >= 0 else None)
        alpha_t, sigma_t = _alpha_sigma(schedule, t)
        alpha_s, sigma_s = _alpha_sigma(schedule, s)
        if k_next > k:                                     # jump back up: x_s ~ q(x_s | x_t), s noisier than t
            alpha_st = alpha_s / alpha_t
            x = alpha_st * x + math.sqrt(max(0.0, sigma_s**2 - alpha_st**2 * sigma_t**2)) * noise()
            continue
        # the unknown region: one ancestral step with the posterior q(x_s | x_t, x0_hat)   (eq. 8b)
        t_batch = t.repeat(len(x)).to(x.device)
        _, x0 = schedule.to_eps_x0(model(x, t_batch), x, t_batch, prediction, clip_x0)
        alpha_ts = alpha_t / alpha_s
        sigma_ts2 = max(0.0, sigma_t**2 - alpha_ts**2 * sigma_s**2)
        unknown = alpha_ts * sigma_s**2 / sigma_t**2 * x + alpha_s * sigma_ts2 / sigma_t**2 * x0
        if sigma_s > 0:
            unknown = unknown + math.sqrt(sigma_ts2 * sigma_s**2 / sigma_t**2) * noise()
        # the known region: the original noised to the new level                          (eq. 8a)
        known_s = alpha_s * known + sigma_s * noise() if sigma_s > 0 else known
        x = mask * known_s + (1 - mask) * unknown                                          # (eq. 8c)
    return mask * known + (1 - mask) * x


def _jump_schedule(num_levels: int, jump_length: int, resamples: int) -> list[int]:
    """Levels visited, N-1 ... -1 (Lugmayr et al. 2022, appendix, get_schedule_jump): at j = 0, J, 2J, ... below
    N - J, jump back up J levels R - 1 times. Level k is the k-th smallest timestep; -1 is the clean data."""
    jumps = {j: resamples - 1 for j in range(0, num_levels - jump_length, jump_length)}
    level, levels = num_levels - 1, [num_levels - 1]
    while level >= 0:
        level -= 1
        levels.append(level)
        if jumps.get(level, 0) > 0:
            jumps[level] -= 1
            level += jump_length
            levels.append(level)
    return levels


def _alpha_sigma(schedule: NoiseSchedule, t: Tensor | None) -> tuple[float, float]:
    """(alpha_t, sigma_t) as floats for one timestep t (a 0-d tensor); None is the clean data (1, 0)."""
    if t is None:
        return 1.0, 0.0
    if hasattr(schedule, "alpha_sigma"):
        alpha, sigma = schedule.alpha_sigma(t.reshape(1))
        return float(alpha), float(sigma)
    alpha_bar = schedule.alpha_bar[t].item()
    return math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)


def _check_inputs(x: Tensor, known: Tensor, mask: Tensor, jump_length: int, resamples: int) -> None:
    """One-line ValueErrors for shapes, mask values and the resampling counts."""
    if known.shape != x.shape:
        raise ValueError(f"known must have x's shape {tuple(x.shape)}; got {tuple(known.shape)}. "
                         f"Repeat the image once per sample, e.g. known.expand_as(x)")
    try:
        broadcast = torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError:
        broadcast = None
    if broadcast != x.shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to x's {tuple(x.shape)}; "
                         f"give it as [B, 1, H, W] or [1, 1, H, W]")
    if not bool(((mask >= 0) & (mask <= 1)).all()):
        raise ValueError("mask values must lie in [0, 1] (1 = keep known, 0 = fill in); divide a 0..255 mask by 255")
    for name, value in (("jump_length", jump_length), ("resamples", resamples)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1; got {value!r} (resamples=1 turns resampling off)")
