"""Denoising diffusion implicit models (Song et al. 2021): DDIM with eta."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .noise import Generators, randn
from .schedule import Denoiser, NoiseSchedule


@torch.no_grad()
def ddim(model: Denoiser, x: Tensor, schedule: NoiseSchedule, steps: int = 50, *, eta: float = 0.0,
         prediction: str = "eps", spacing: str = "trailing", clip_x0: float | None = None,
         generator: Generators = None, progress: bool = False) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12), from t = T-1 to the clean data:
        x_{t-1} = sqrt(alpha_bar_{t-1}) x0_hat + sqrt(1 - alpha_bar_{t-1} - sigma_t^2) eps_hat + sigma_t z,
        sigma_t = eta sqrt((1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_{t-1})  (eq. 16).
    eta = 0 is the deterministic DDIM; eta = 1 has DDPM's posterior variance. The last step goes to
    alpha_bar = 1, where sigma = 0 and x = x0_hat.

    Args:
        model: denoiser, called as `model(x_t, t)` with t a [B] long tensor.
        x: starting noise [B, ...] at the first timestep (T-1 for trailing spacing).
        steps: number of model evaluations (1..T).
        eta: stochasticity, >= 0.
        prediction: what the model outputs: "eps", "x0" or "v".
        spacing: timestep spacing, see `NoiseSchedule.timesteps`.
        clip_x0: clip x0_hat to [-clip_x0, clip_x0]; None = no clipping.
        generator: None, a torch.Generator, or a list of per-image generators (see `randn`).
        progress: show a tqdm bar.
    Returns:
        The denoised batch, same shape, device and dtype as x.
    """
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0; got {eta}")
    timesteps = schedule.timesteps(steps, spacing).tolist()      # descending; -1 below = clean data
    for t, t_prev in tqdm(list(zip(timesteps, timesteps[1:] + [-1])), desc="ddim", disable=not progress):
        alpha_bar, alpha_bar_prev = schedule.alpha_bar_at(t), schedule.alpha_bar_at(t_prev)
        eps, x0 = schedule.to_eps_x0(model(x, torch.full((len(x),), t, device=x.device)), x, t, prediction, clip_x0)
        # eq. 16: eta interpolates between deterministic DDIM (0) and the DDPM posterior (1)
        sigma = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
        # eq. 12: "predicted x0" + "direction pointing to x_t" + random noise
        x = math.sqrt(alpha_bar_prev) * x0 + math.sqrt(max(0.0, 1 - alpha_bar_prev - sigma**2)) * eps
        if sigma > 0:
            x = x + sigma * randn(x.shape, generator, device=x.device, dtype=x.dtype)
    return x
