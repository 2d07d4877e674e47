"""DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep ODE solver in data prediction."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .noise import Generators
from .path import Denoiser, GaussianPath, denoise, log_snr_of, step_pairs


@torch.no_grad()
def dpmpp_2m(model: Denoiser, x: Tensor, schedule: GaussianPath, steps: int = 20, *, prediction: str = "eps",
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
        model: denoiser, called as `model(x_t, t)` with t a [B] tensor of model times.
        x: starting noise [B, ...] at the first timestep (T-1 for trailing spacing).
        steps: number of model evaluations (1..T).
        schedule: any path (`NoiseSchedule`, `RectifiedFlow`): the solver only reads alpha, sigma, lambda.
        prediction: what the model outputs: "eps", "x0", "v" or "flow".
        spacing: timestep spacing, see the schedule's `timesteps`.
        clip_x0: clip x0_hat to [-clip_x0, clip_x0]; None = no clipping.
        generator: unused (the solver is deterministic); accepted so all samplers share options.
        progress: show a tqdm bar.
    Returns:
        The denoised batch, same shape, device and dtype as x.
    """
    x0_prev = h_prev = None
    for t, t_next in tqdm(step_pairs(schedule, steps, spacing), desc="dpmpp_2m", disable=not progress):
        _, x0 = denoise(model, x, t, schedule, prediction, clip_x0)
        alpha, sigma = schedule.alpha_sigma_at(t)
        alpha_next, sigma_next = schedule.alpha_sigma_at(t_next)
        h = log_snr_of(alpha_next, sigma_next) - log_snr_of(alpha, sigma)
        # multistep: extrapolate the data prediction linearly in lambda from the last two points;
        # first order at the start and into t <= 0 (see the docstring)
        if x0_prev is None or t_next is None or t_next <= 0:
            D = x0
        else:
            r = h_prev / h
            D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        # exact integration of the linear part of the ODE, exponential integrator for the rest
        x = (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * D
        x0_prev, h_prev = x0, h
    return x
