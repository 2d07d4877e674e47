"""Euler's method on the probability-flow ODE (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", sec. 3 and eq. 4), on any Gaussian path."""
from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .noise import Generators
from .path import Denoiser, GaussianPath, denoise, step_pairs


@torch.no_grad()
def euler(model: Denoiser, x: Tensor, schedule: GaussianPath, steps: int = 20, *, prediction: str = "eps",
          spacing: str = "trailing", clip_x0: float | None = None, generator: Generators = None,
          progress: bool = False) -> Tensor:
    """First-order ODE solver. Written in the scaled variable x~ = x / alpha and sigma~ = sigma / alpha,
    the ODE is dx~/dsigma~ = eps_hat (Karras et al. 2022, eq. 4 with s(t) = alpha, sigma(t) = sigma~), and
    one Euler step from sigma~_t to sigma~_s reads, back in x,
        x_s = alpha_s (x_t / alpha_t + (sigma~_s - sigma~_t) eps_hat) = alpha_s x0_hat + sigma_s eps_hat,
    the form used here (it holds at alpha_t = 0 too). On the rectified flow this is exactly
    x_s = x_t + (tau_s - tau_t) u_hat with u = eps - x0, the flow-matching Euler step (Liu et al. 2023);
    on every path it is the same integrator as DDIM with eta = 0 (Song et al. 2021, eq. 14).

    Args:
        model: denoiser, called as `model(x_t, t)` with t a [B] tensor of model times.
        x: starting noise [B, ...] at the first timestep.
        schedule: any path (`NoiseSchedule`, `RectifiedFlow`).
        steps: number of model evaluations.
        prediction: what the model outputs: "eps", "x0", "v" or "flow".
        spacing: timestep spacing, see the schedule's `timesteps` ("karras" for Karras et al.'s grid).
        clip_x0: clip x0_hat to [-clip_x0, clip_x0]; None = no clipping.
        generator: unused (the solver is deterministic); accepted so all samplers share options.
        progress: show a tqdm bar.
    Returns:
        The denoised batch, same shape, device and dtype as x.
    """
    for t, t_next in tqdm(step_pairs(schedule, steps, spacing), desc="euler", disable=not progress):
        eps, x0 = denoise(model, x, t, schedule, prediction, clip_x0)
        alpha_next, sigma_next = schedule.alpha_sigma_at(t_next)
        x = alpha_next * x0 + sigma_next * eps                    # eps_hat held fixed over the step
    return x
