"""Denoising diffusion implicit models (Song et al. 2021): DDIM with eta, on any Gaussian path."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .noise import Generators, randn
from .path import Denoiser, GaussianPath, denoise, step_pairs


@torch.no_grad()
def ddim(model: Denoiser, x: Tensor, schedule: GaussianPath, steps: int = 50, *, eta: float = 0.0,
         prediction: str = "eps", spacing: str = "trailing", clip_x0: float | None = None,
         generator: Generators = None, progress: bool = False) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12), from the first timestep to the clean data, in alpha/sigma form:
        x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,
        c^2 = eta^2 sigma_s^2 (1 - SNR_t / SNR_s)      (eq. 16; the posterior variance at eta = 1).
    eta = 0 is the deterministic DDIM, the first-order solver of the probability-flow ODE in
    sigma / alpha (Karras et al. 2022, sec. 3); on the rectified flow it is Euler's method in tau.
    The last step goes to alpha = 1, sigma = 0, where x = x0_hat.

    Args:
        model: denoiser, called as `model(x_t, t)` with t a [B] tensor of model times.
        x: starting noise [B, ...] at the first timestep (T-1 for trailing spacing).
        schedule: any path (`NoiseSchedule`, `RectifiedFlow`).
        steps: number of model evaluations.
        eta: stochasticity, >= 0.
        prediction: what the model outputs: "eps", "x0", "v" or "flow".
        spacing: timestep spacing, see the schedule's `timesteps`.
        clip_x0: clip x0_hat to [-clip_x0, clip_x0]; None = no clipping.
        generator: None, a torch.Generator, or a list of per-image generators (see `randn`).
        progress: show a tqdm bar.
    Returns:
        The denoised batch, same shape, device and dtype as x.
    """
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0; got {eta}")
    for t, t_next in tqdm(step_pairs(schedule, steps, spacing), desc="ddim", disable=not progress):
        alpha, sigma = schedule.alpha_sigma_at(t)
        alpha_next, sigma_next = schedule.alpha_sigma_at(t_next)
        eps, x0 = denoise(model, x, t, schedule, prediction, clip_x0)
        # eq. 16: eta interpolates between deterministic DDIM (0) and the posterior variance (1)
        noise_std = eta * sigma_next * math.sqrt(max(0.0, 1 - (alpha * sigma_next) ** 2 / (alpha_next * sigma) ** 2))
        # eq. 12: "predicted x0" + "direction pointing to x_t" + random noise
        x = alpha_next * x0 + math.sqrt(max(0.0, sigma_next**2 - noise_std**2)) * eps
        if noise_std > 0:
            x = x + noise_std * randn(x.shape, generator, device=x.device, dtype=x.dtype)
    return x
