"""The denoising training loss (Ho et al. 2020, Algorithm 1) with optional min-SNR-gamma weighting
and a choice of training noise levels.

One call draws a timestep and a noise image per example, noises the batch, and compares the
network's output with the target of the chosen parameterisation (`eps`, `x0` or `v`, converted in
one place: `NoiseSchedule.training_target`).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from samplers import NoiseSchedule

from samplers.path import PREDICTIONS  # noqa: E402  (eps | x0 | v | flow)

WEIGHTINGS = ("none", "min_snr")
TIMESTEP_DISTRIBUTIONS = ("uniform", "lognormal", "logit_normal")


def training_loss(model: Callable[..., Tensor], x0: Tensor, schedule: NoiseSchedule, *,
                  prediction: str = "eps", weighting: str = "none", min_snr_gamma: float = 5.0,
                  timestep_sampling: str = "uniform", logsnr_mean: float = 1.0, logsnr_std: float = 2.4,
                  logit_mean: float = 0.0, logit_std: float = 1.0, y: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Per-example denoising loss: w(t) * mean((model(x_t, t) - target)^2).

    For each image, t (see `draw_timesteps`) and eps ~ N(0, I) are drawn, x_t = sqrt(alpha_bar_t) x0 +
    sqrt(1 - alpha_bar_t) eps (Ho et al. 2020, eq. 4), and the target is eps, x0 or
    v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 (Salimans & Ho 2022, Sec. 4).

    weighting="min_snr" is Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via
    Min-SNR Weighting Strategy"): the loss measured on x0 gets the weight min(SNR(t), gamma), with
    SNR(t) = alpha_bar_t / (1 - alpha_bar_t). The other targets' errors are rescaled x0 errors,
    |eps - eps_hat|^2 = SNR |x0 - x0_hat|^2 and |v - v_hat|^2 = (SNR + 1) |x0 - x0_hat|^2, so the
    same weighting reads, per target:
        x0:  min(SNR, gamma)
        eps: min(SNR, gamma) / SNR        (= min(1, gamma / SNR); 1 at SNR = 0)
        v:   min(SNR, gamma) / (SNR + 1)

    Args:
        model: called as `model(x_t, t)` or `model(x_t, t, y=y)`; t is a [B] long tensor.
        x0: clean images in [-1, 1], [B, C, H, W] (any trailing shape works).
        schedule: the noise schedule (T = schedule.num_timesteps).
        prediction: what the model outputs: "eps", "x0" or "v".
        weighting: "none" (plain MSE on the target) or "min_snr".
        min_snr_gamma: gamma of min-SNR weighting (5 in the paper).
        timestep_sampling, logsnr_mean, logsnr_std, logit_mean, logit_std: how t is drawn; see `draw_timesteps`.
        y: optional [B] long class labels (-1 = no label), passed through to the model.
        generator: draws t and the noise; None uses the global RNG. The draws happen on the
            generator's device, then move to x0's device.

    Returns:
        The loss of each example, float32 [B]; call `.mean()` to train.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}; got {prediction!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")
    if weighting == "min_snr" and not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be positive; got {min_snr_gamma}")
    if timestep_sampling not in TIMESTEP_DISTRIBUTIONS:
        raise ValueError(f"timestep_sampling must be one of {', '.join(TIMESTEP_DISTRIBUTIONS)}; got {timestep_sampling!r}")
    if not (math.isfinite(logsnr_mean) and math.isfinite(logsnr_std) and logsnr_std > 0):
        raise ValueError(f"need a finite logsnr_mean and logsnr_std > 0; got {logsnr_mean} and {logsnr_std}")
    if x0.dim() < 2:
        raise ValueError(f"x0 must be a batch [B, ...]; got shape {tuple(x0.shape)}")

    # Draw t and eps ~ N(0, I) per example (Ho et al. 2020, Algorithm 1, lines 3-4).
    batch = x0.shape[0]
    draw_device = generator.device if generator is not None else x0.device
    t = draw_timesteps(schedule, batch, timestep_sampling, logsnr_mean, logsnr_std, generator, draw_device,
                       logit_mean, logit_std)
    noise = torch.randn(x0.shape, generator=generator, device=draw_device, dtype=x0.dtype)
    t, noise = t.to(x0.device), noise.to(x0.device)

    # Noise the batch and compare with the target of the chosen parameterisation.
    x_t = schedule.add_noise(x0, t, noise)
    target = schedule.training_target(x0, noise, t, prediction)
    output = model(x_t, t) if y is None else model(x_t, t, y=y)
    squared_error = (output.float() - target.float()) ** 2                  # [B, C, H, W]
    loss = squared_error.mean(dim=tuple(range(1, squared_error.dim())))    # [B]
    if weighting == "none":
        return loss
    # SNR(t) in float32 beside the loss: on an accelerator, a lookup there rather than a copy of t to the host.
    return loss * min_snr_weight(schedule.snr(t, like=loss), prediction, min_snr_gamma)


def draw_timesteps(schedule: NoiseSchedule, batch: int, distribution: str = "uniform", logsnr_mean: float = 1.0,
                   logsnr_std: float = 2.4, generator: torch.Generator | None = None,
                   device: str | torch.device = "cpu", logit_mean: float = 0.0, logit_std: float = 1.0) -> Tensor:
    """Training timesteps [batch] on `device`: long indices on a discrete schedule, float model times
    t = 1000 tau on the rectified flow (`_draw_flow_times`).

    "uniform": t ~ U{0, ..., T-1} (Ho et al. 2020, Algorithm 1). On the linear schedule this spends
    half the steps at log-SNR below -2.5, where x_t is nearly pure noise and the target nearly fixed.
    "lognormal": log-SNR lambda ~ N(logsnr_mean, logsnr_std^2) and t is the timestep whose
    log-SNR is nearest; beyond the schedule's range, t is its first or last step (the last finite
    one under zero terminal SNR, whose final log-SNR is -inf and so never nearest). This is the
    training noise distribution of Karras et al. 2022 ("EDM", Sec. 5, ln sigma ~ N(P_mean, P_std^2)),
    written in log-SNR = -2 ln sigma: their P_mean = -1.2, P_std = 1.2 at data std 0.5 become
    lambda ~ N(2.4 - 2 ln 2, 2.4^2) ~ N(1.0, 2.4^2) for data of std ~1 such as images in [-1, 1].
    "logit_normal": u = sigmoid(n), n ~ N(logit_mean, logit_std^2) (Esser et al. 2024, eq. 19, SD3's
    rf/lognorm(0, 1)), and t = floor(u T), the index at that fraction of the schedule.
    """
    if not hasattr(schedule, "betas"):
        return _draw_flow_times(schedule, batch, distribution, logsnr_mean, logsnr_std, logit_mean, logit_std,
                                generator, device)
    if distribution == "logit_normal":
        u = torch.sigmoid(logit_mean + logit_std * torch.randn(batch, generator=generator, device=device,
                                                               dtype=torch.float64))
        return (u * schedule.num_timesteps).long().clamp(max=schedule.num_timesteps - 1)
    if distribution == "uniform":
        return torch.randint(0, schedule.num_timesteps, (batch,), generator=generator, device=device)
    logsnr = schedule.snr(torch.arange(schedule.num_timesteps)).log().to(device)  # [T], -inf where SNR = 0
    draws = logsnr_mean + logsnr_std * torch.randn(batch, generator=generator, device=device, dtype=torch.float64)
    return (logsnr[None, :] - draws[:, None]).abs().argmin(dim=1)                # nearest step, [batch]


def _draw_flow_times(schedule, batch, distribution, logsnr_mean, logsnr_std, logit_mean, logit_std,
                     generator, device) -> Tensor:
    """Float model times t = 1000 tau [batch] on a continuous path: tau ~ U(0, 1) (Liu et al. 2023);
    tau = sigmoid(n), n ~ N(logit_mean, logit_std^2) (Esser et al. 2024, eq. 19); or log-SNR
    lambda ~ N(logsnr_mean, logsnr_std^2) and tau = sigmoid(-lambda / 2), where alpha / sigma = (1 - tau) / tau."""
    normal = torch.randn(batch, generator=generator, device=device, dtype=torch.float64)
    if distribution == "uniform":
        tau = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
    elif distribution == "logit_normal":
        tau = torch.sigmoid(logit_mean + logit_std * normal)
    else:
        tau = torch.sigmoid(-(logsnr_mean + logsnr_std * normal) / 2)
    return (tau * schedule.num_timesteps).float()


def min_snr_weight(snr: Tensor, prediction: str, gamma: float = 5.0) -> Tensor:
    """Min-SNR-gamma loss weight for each SNR value (Hang et al. 2023), for the loss on `prediction`.

    x0: min(SNR, gamma); eps: min(SNR, gamma) / SNR; v: min(SNR, gamma) / (SNR + 1) (VP paths);
    flow: min(SNR, gamma) / (sqrt(SNR) + 1)^2, since |u - u_hat| = (alpha / sigma + 1) |x0 - x0_hat| at
    fixed x_t. See `training_loss` for why they differ. Computed in snr's dtype (float64 from `schedule.snr(t)`);
    SNR = 0 and SNR = inf are allowed.
    """
    clipped = snr.clamp(max=gamma)                                          # min(SNR, gamma)
    if prediction == "x0":
        return clipped
    if prediction == "eps":
        # min(SNR, gamma) / SNR written as min(1, gamma / SNR), which stays finite at SNR = 0.
        return (gamma / snr).clamp(max=1.0)
    if prediction == "v":
        return clipped / (snr + 1.0)
    if prediction == "flow":
        return clipped / (snr.sqrt() + 1.0) ** 2
    raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}; got {prediction!r}")
