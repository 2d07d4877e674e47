"""Ancestral sampling (Ho et al. 2020, Algorithm 2) over all T steps or a respaced subset."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .noise import Generators, randn
from .schedule import Denoiser, NoiseSchedule


@torch.no_grad()
def ddpm(model: Denoiser, x: Tensor, schedule: NoiseSchedule, steps: int | None = None, *,
         prediction: str = "eps", variance: str = "small", spacing: str = "trailing",
         clip_x0: float | None = None, generator: Generators = None, progress: bool = False) -> Tensor:
    """DDPM: draw x_{t-1} ~ q(x_{t-1} | x_t, x0_hat) from t = T-1 down to 0 (Ho et al. 2020, Algorithm 2, eqs. 6-7).

    With steps < T the chain visits `schedule.timesteps(steps, spacing)` only; between kept steps
    s < t it uses beta = 1 - alpha_bar_t / alpha_bar_s, the posterior of the respaced process
    (Nichol & Dhariwal 2021, sec. 4). The last step returns the posterior mean at alpha_bar = 1,
    which is x0_hat itself: no noise is added.

    Args:
        model: denoiser, called as `model(x_t, t)` with t a [B] long tensor.
        x: starting noise [B, ...] at the first timestep (T-1 for trailing spacing).
        steps: number of model evaluations; None = all T.
        prediction: what the model outputs: "eps", "x0" or "v".
        variance: "small" = posterior variance beta_tilde, "large" = beta (Ho et al. 2020, sec. 3.2).
        clip_x0: clip x0_hat to [-clip_x0, clip_x0]; None = no clipping.
        generator: None, a torch.Generator, or a list of per-image generators (see `randn`).
        progress: show a tqdm bar.
    Returns:
        The denoised batch, same shape, device and dtype as x.
    """
    if variance not in ("small", "large"):
        raise ValueError(f"variance must be 'small' or 'large'; got {variance!r}")
    steps = schedule.num_timesteps if steps is None else steps
    timesteps = schedule.timesteps(steps, spacing).tolist()            # descending
    spaced = schedule.respace(timesteps)                 # spaced index i <-> i-th smallest kept step
    for t, i in zip(tqdm(timesteps, desc="ddpm", disable=not progress), reversed(range(len(timesteps)))):
        # predict x0, then the posterior of the (respaced) chain q(x_{t-1} | x_t, x0)  (eqs. 6-7)
        _, x0 = schedule.to_eps_x0(model(x, torch.full((len(x),), t, device=x.device)), x, t, prediction, clip_x0)
        mean, posterior_variance, _ = spaced.posterior_mean_variance(x0, x, i)
        if i == 0:
            x = mean                                      # alpha_bar_{-1} = 1: mean = x0_hat, no noise
            continue
        # Algorithm 2, line 4: x_{t-1} = mean + sigma_t z with sigma_t^2 = beta_tilde_t or beta_t
        std = posterior_variance.sqrt() if variance == "small" else math.sqrt(spaced.betas[i].item())
        x = mean + std * randn(x.shape, generator, device=x.device, dtype=x.dtype)
    return x
