"""Ancestral sampling (Ho et al. 2020, Algorithm 2) over all steps or a subset, on any Gaussian path."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .noise import Generators, randn
from .path import Denoiser, GaussianPath, denoise, step_pairs


@torch.no_grad()
def ddpm(model: Denoiser, x: Tensor, schedule: GaussianPath, steps: int | None = None, *,
         prediction: str = "eps", variance: str = "small", spacing: str = "trailing",
         clip_x0: float | None = None, generator: Generators = None, progress: bool = False) -> Tensor:
    """DDPM: draw x_s ~ q(x_s | x_t, x0_hat) at each step t -> s (Ho et al. 2020, Algorithm 2, eqs. 6-7),
    with the posterior in alpha/sigma form (Kingma et al. 2021, "Variational Diffusion Models", eqs. 32-34):
        alpha_ts = alpha_t / alpha_s,   sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2,
        mean = alpha_ts sigma_s^2 / sigma_t^2 x_t + alpha_s sigma_ts^2 / sigma_t^2 x0_hat,
        variance = sigma_ts^2 sigma_s^2 / sigma_t^2 ("small", beta_tilde) or sigma_ts^2 ("large", beta).
    On a discrete schedule with steps < T this is the respaced chain of Nichol & Dhariwal 2021 (sec. 4).
    The last step returns the posterior mean at alpha = 1, which is x0_hat itself: no noise is added.

    Args:
        model: denoiser, called as `model(x_t, t)` with t a [B] tensor of model times.
        x: starting noise [B, ...] at the first timestep (T-1 for trailing spacing).
        schedule: any path (`NoiseSchedule`, `RectifiedFlow`).
        steps: number of model evaluations; None = all T of a discrete schedule (required for a flow).
        prediction: what the model outputs: "eps", "x0", "v" or "flow".
        variance: "small" = posterior variance beta_tilde, "large" = beta (Ho et al. 2020, sec. 3.2).
        spacing: timestep spacing, see the schedule's `timesteps`.
        clip_x0: clip x0_hat to [-clip_x0, clip_x0]; None = no clipping.
        generator: None, a torch.Generator, or a list of per-image generators (see `randn`).
        progress: show a tqdm bar.
    Returns:
        The denoised batch, same shape, device and dtype as x.
    """
    if variance not in ("small", "large"):
        raise ValueError(f"variance must be 'small' or 'large'; got {variance!r}")
    if steps is None:
        if not hasattr(schedule, "num_timesteps"):
            raise ValueError("steps=None means every step of a discrete schedule; pass steps for a continuous path")
        steps = schedule.num_timesteps
    for t, t_next in tqdm(step_pairs(schedule, steps, spacing), desc="ddpm", disable=not progress):
        _, x0 = denoise(model, x, t, schedule, prediction, clip_x0)
        if t_next is None:
            x = x0                                        # alpha = 1, sigma = 0: mean = x0_hat, no noise
            continue
        alpha, sigma = schedule.alpha_sigma_at(t)
        alpha_next, sigma_next = schedule.alpha_sigma_at(t_next)
        alpha_ts = alpha / alpha_next
        sigma_ts2 = max(0.0, sigma**2 - alpha_ts**2 * sigma_next**2)
        mean = (alpha_ts * sigma_next**2 / sigma**2) * x + (alpha_next * sigma_ts2 / sigma**2) * x0
        # Algorithm 2, line 4: x_s = mean + std z
        std = math.sqrt(sigma_ts2 * sigma_next**2 / sigma**2 if variance == "small" else sigma_ts2)
        x = mean + std * randn(x.shape, generator, device=x.device, dtype=x.dtype)
    return x
