"""DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep ODE solver in data prediction."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .noise import Generators
from .schedule import Denoiser, NoiseSchedule


@torch.no_grad()
def dpmpp_2m(model: Denoiser, x: Tensor, schedule: NoiseSchedule, steps: int = 20, *, prediction: str = "eps",
             spacing: str = "trailing", clip_x0: float | None = None, generator: Generators = None,
             progress: bool = False) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), stepping in lambda = log(alpha / sigma):
        x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (exp(-h_i) - 1) D_i,   h_i = lambda_i - lambda_{i-1},
        D_i = (1 + 1 / (2 r_i)) x0_{i-1} - 1 / (2 r_i) x0_{i-2},             r_i = h_{i-1} / h_i.
    The first step uses D_i = x0_{i-1} (first order), and so does any step that ends at t <= 0: the
    last step goes to alpha_bar = 1 (sigma = 0, lambda = inf), where the first-order step is exactly
    x0_hat and r_i = 0 would make the extrapolation blow up; a step into index 0 (linspace or leading
    spacing) has a large h_i, where it overshoots (lower order at the end, as in the authors' code).

    Args:
        model: denoiser, called as `model(x_t, t)` with t a [B] long tensor.
        x: starting noise [B, ...] at the first timestep (T-1 for trailing spacing).
        steps: number of model evaluations (1..T).
        prediction: what the model outputs: "eps", "x0" or "v".
        spacing: timestep spacing, see `NoiseSchedule.timesteps`.
        clip_x0: clip x0_hat to [-clip_x0, clip_x0]; None = no clipping.
        generator: unused (the solver is deterministic); accepted so all samplers share options.
        progress: show a tqdm bar.
    Returns:
        The denoised batch, same shape, device and dtype as x.
    """
    timesteps = schedule.timesteps(steps, spacing).tolist()      # descending; -1 below = clean data
    x0_prev = h_prev = None
    for t, t_next in tqdm(list(zip(timesteps, timesteps[1:] + [-1])), desc="dpmpp_2m", disable=not progress):
        _, x0 = schedule.to_eps_x0(model(x, torch.full((len(x),), t, device=x.device)), x, t, prediction, clip_x0)
        _, sigma, lambda_ = _alpha_sigma_lambda(schedule.alpha_bar_at(t))
        alpha_next, sigma_next, lambda_next = _alpha_sigma_lambda(schedule.alpha_bar_at(t_next))
        h = lambda_next - lambda_
        # multistep: extrapolate the data prediction linearly in lambda from the last two points;
        # first order at the start and into t <= 0 (see the docstring)
        if x0_prev is None or t_next <= 0:
            D = x0
        else:
            r = h_prev / h
            D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        # exact integration of the linear part of the ODE, exponential integrator for the rest
        x = (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * D
        x0_prev, h_prev = x0, h
    return x


def _alpha_sigma_lambda(alpha_bar: float) -> tuple[float, float, float]:
    """alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), lambda = log(alpha / sigma), +-inf at the ends."""
    alpha, sigma = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    if alpha == 0 or sigma == 0:
        return alpha, sigma, math.inf if sigma == 0 else -math.inf
    return alpha, sigma, math.log(alpha / sigma)
