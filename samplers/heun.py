"""Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1), on any path."""
from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .noise import Generators
from .path import KARRAS_SIGMA_MAX, Denoiser, GaussianPath, denoise, step_pairs


@torch.no_grad()
def heun(model: Denoiser, x: Tensor, schedule: GaussianPath, steps: int = 10, *, prediction: str = "eps",
         spacing: str = "trailing", clip_x0: float | None = None, generator: Generators = None,
         progress: bool = False) -> Tensor:
    """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1) in x~ = x / alpha, sigma~ = sigma / alpha,
    where the ODE is dx~/dsigma~ = eps_hat (their eq. 4 with s(t) = alpha):
        Euler:  x~'   = x~_t + (sigma~_s - sigma~_t) eps_hat(x_t)                       (line 5)
        Heun:   x~_s  = x~_t + (sigma~_s - sigma~_t) (eps_hat(x_t) + eps_hat(x'_s)) / 2      (lines 7-8)
    The step into the clean data (sigma~ = 0) stays first order, as in Algorithm 1 (line 6), and so does
    a step that starts above EDM's sigma_max = 80 (Table 1), pure noise (sigma~ = inf) included: there
    the trapezoid is undefined or multiplies a tiny slope difference by a step of thousands (the cosine
    schedule starts at sigma~ ~ 3e4), while the Euler step from near-pure noise is close to exact.
    A run of N steps makes 2N - 1 model calls, one fewer per step that starts above sigma~ = 80.

    Args:
        model: denoiser, called as `model(x_t, t)` with t a [B] tensor of model times.
        x: starting noise [B, ...] at the first timestep.
        schedule: any path (`NoiseSchedule`, `RectifiedFlow`).
        steps: number of steps (not model calls; see above).
        prediction: what the model outputs: "eps", "x0", "v" or "flow".
        spacing: timestep spacing, see the schedule's `timesteps` ("karras" for Karras et al.'s rho = 7 grid).
        clip_x0: clip x0_hat to [-clip_x0, clip_x0]; None = no clipping.
        generator: unused (the solver is deterministic); accepted so all samplers share options.
        progress: show a tqdm bar.
    Returns:
        The denoised batch, same shape, device and dtype as x.
    """
    for t, t_next in tqdm(step_pairs(schedule, steps, spacing), desc="heun", disable=not progress):
        eps, x0 = denoise(model, x, t, schedule, prediction, clip_x0)
        alpha, sigma = schedule.alpha_sigma_at(t)
        alpha_next, sigma_next = schedule.alpha_sigma_at(t_next)
        x_euler = alpha_next * x0 + sigma_next * eps                               # line 5, back in x
        if not second_order(alpha, sigma, t_next):
            x = x_euler                                                            # first order (see above)
            continue
        eps_next, _ = denoise(model, x_euler, t_next, schedule, prediction, clip_x0)
        # trapezoid in sigma~: average the slopes at both ends (lines 7-8), then scale back by alpha_s
        x = alpha_next * (x / alpha + (sigma_next / alpha_next - sigma / alpha) * (eps + eps_next) / 2)
    return x


def second_order(alpha, sigma, t_next) -> bool:
    """Whether heun's step from a time with (alpha, sigma) to t_next takes the correction (a second model call):
    not into the clean data (t_next None) and not from above sigma~ = KARRAS_SIGMA_MAX (see heun)."""
    return t_next is not None and bool(sigma <= KARRAS_SIGMA_MAX * alpha)


def heun_model_calls(schedule: GaussianPath, steps: int, spacing: str = "trailing") -> int:
    """Model calls `heun(..., schedule, steps, spacing=spacing)` makes per image: one a step, two where the
    step is second order; 2 steps - 2 on the flow and on the VP schedules, whose first step starts at pure
    or near-pure noise."""
    pairs = step_pairs(schedule, steps, spacing)
    return sum(1 + second_order(*schedule.alpha_sigma_at(t), t_next) for t, t_next in pairs)
