"""Gaussian paths x_t = alpha(t) x0 + sigma(t) eps, and the one place where model outputs are converted.

Every schedule in `samplers` is a path: the discrete variance-preserving schedules of Ho et al. 2020
(`NoiseSchedule`, alpha^2 + sigma^2 = 1, t an index 0 ... T-1) and the rectified flow of Liu et al.
2023 (`RectifiedFlow`, alpha = 1 - tau, sigma = tau, t = 1000 tau). A path answers
`alpha_sigma(t)` for the model times t that the samplers pass to the model, so any code can build an
exact denoiser or a loss for it, and the samplers are written against (alpha, sigma) alone.

What a model predicts is one of:
    eps   the noise                                     (Ho et al. 2020)
    x0    the clean data
    v     alpha eps - sigma x0                          (Salimans & Ho 2022, sec. 4)
    flow  eps - x0, the velocity dx_t/dtau of the rectified path (Liu et al. 2023; Lipman et al. 2023)
All four are affine in (eps, x0) at fixed x_t, so each converts back exactly on every path.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]  # out = model(x_t, t), t a [B] tensor of model times
PREDICTIONS = ("eps", "x0", "v", "flow")
KARRAS_SIGMA_MIN, KARRAS_SIGMA_MAX, KARRAS_RHO = 0.002, 80.0, 7.0   # Karras et al. 2022, Table 1 (EDM)


class GaussianPath:
    """Base of every schedule: subclasses give `alpha_sigma(t)`, `timesteps(steps, spacing)`,
    `sigma_tilde_range()` and `time_from_sigma_tilde(sigma_tilde)`; the rest follows here."""

    def alpha_sigma(self, t) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) as float64 CPU tensors shaped like t, for model times t."""
        raise NotImplementedError

    def timesteps(self, steps: int, spacing: str = "trailing") -> Tensor:
        """`steps` descending model times for a sampler; the step after the last one goes to the clean data."""
        raise NotImplementedError

    def sigma_tilde_range(self) -> tuple[float, float]:
        """The smallest and largest sigma / alpha the path reaches at its model times (inf at pure noise)."""
        raise NotImplementedError

    def time_from_sigma_tilde(self, sigma_tilde: Tensor) -> Tensor:
        """The model times at which sigma / alpha takes the given values (float64 [N])."""
        raise NotImplementedError

    # ---- the forward process ----------------------------------------------------------------------

    def log_snr(self, t) -> Tensor:
        """lambda_t = log(alpha_t^2 / sigma_t^2) (Kingma et al. 2021), float64 on the CPU; +-inf at the ends."""
        alpha, sigma = self.alpha_sigma(t)
        return 2 * (alpha.log() - sigma.log())

    def snr(self, t, like: Tensor | None = None) -> Tensor:
        """Signal-to-noise ratio alpha_t^2 / sigma_t^2, float64 on the CPU; with `like`, in like's dtype on its
        device, shaped to broadcast over it, and for t on an accelerator looked up there with no host sync."""
        alpha, sigma = self.alpha_sigma(t) if like is None else self._alpha_sigma(t, like)
        return alpha**2 / sigma**2

    def add_noise(self, x0: Tensor, t, noise: Tensor) -> Tensor:
        """Draw from q(x_t | x0) = N(alpha_t x0, sigma_t^2 I): x_t = alpha_t x0 + sigma_t eps (Ho et al. 2020, eq. 4)."""
        alpha, sigma = self._alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def training_target(self, x0: Tensor, noise: Tensor, t, prediction: str) -> Tensor:
        """What a model of kind `prediction` should output: eps, x0, v = alpha_t eps - sigma_t x0
        (Salimans & Ho 2022, sec. 4) or flow = eps - x0 (Liu et al. 2023, eq. 1)."""
        _check_prediction(prediction)
        if prediction == "eps":
            return noise
        if prediction == "x0":
            return x0
        if prediction == "flow":
            return noise - x0
        alpha, sigma = self._alpha_sigma(t, x0)
        return alpha * noise - sigma * x0

    def to_eps_x0(self, model_output: Tensor, x_t: Tensor, t, prediction: str,
                  clip_x0: float | None = None) -> tuple[Tensor, Tensor]:
        """Turn a model output of any kind into (eps, x0), solving x_t = alpha x0 + sigma eps with:
            eps:  x0 = (x_t - sigma eps) / alpha                                  (Ho et al. 2020, eq. 15)
            x0:   eps = (x_t - alpha x0) / sigma
            v:    x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2),
                  eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2)    (Salimans & Ho 2022, sec. 4; VP: / 1)
            flow: x0 = (x_t - sigma u) / (alpha + sigma),  eps = (x_t + alpha u) / (alpha + sigma)
        With clip_x0 = c, x0 is clipped to [-c, c] and eps re-derived from it, so both stay consistent with x_t.
        """
        _check_prediction(prediction)
        alpha64, sigma64 = self.alpha_sigma(t)
        alpha, sigma = self._alpha_sigma(t, x_t)
        if prediction == "eps":
            if (alpha64 == 0).any():
                raise ValueError("an eps-prediction cannot give x0 where alpha = 0 (zero terminal SNR: pure noise); "
                                 "train and sample with prediction='v', 'x0' or 'flow'")
            eps, x0 = model_output, (x_t - sigma * model_output) / alpha
        elif prediction == "x0":
            eps, x0 = (x_t - alpha * model_output) / sigma, model_output
        elif prediction == "v":
            norm = self._broadcast(alpha64**2 + sigma64**2, x_t)                 # 1 on VP paths
            eps = (sigma * x_t + alpha * model_output) / norm
            x0 = (alpha * x_t - sigma * model_output) / norm
        else:
            total = self._broadcast(alpha64 + sigma64, x_t)
            eps, x0 = (x_t + alpha * model_output) / total, (x_t - sigma * model_output) / total
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = (x_t - alpha * x0) / sigma
        return eps, x0

    # ---- what the samplers read -----------------------------------------------------------------

    def alpha_sigma_at(self, t) -> tuple[float, float]:
        """(alpha_t, sigma_t) as Python floats for one model time; t = None is the clean data (1, 0)."""
        if t is None:
            return 1.0, 0.0
        alpha, sigma = self.alpha_sigma(t)
        return alpha.item(), sigma.item()

    def karras_timesteps(self, steps: int, rho: float = KARRAS_RHO) -> Tensor:
        """Karras et al. 2022, eq. 5: sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho
        over sigma_tilde = sigma / alpha, in [max(path min, 0.002), min(path max, 80)] (their Table 1),
        then mapped back to model times. Returns float64 [steps], descending."""
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"steps must be a positive integer; got {steps!r}")
        low, high = self.sigma_tilde_range()
        low, high = max(low, KARRAS_SIGMA_MIN), min(high, KARRAS_SIGMA_MAX)
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
        sigma_tilde = (high ** (1 / rho) + ramp * (low ** (1 / rho) - high ** (1 / rho))) ** rho
        return self.time_from_sigma_tilde(sigma_tilde)

    # ---- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _broadcast(values: Tensor, like: Tensor) -> Tensor:
        """[B] or 0-d float64 values shaped to broadcast over `like` ([B] -> [B, 1, ..., 1]), cast like it."""
        if values.dim() == 1:
            values = values.reshape(-1, *([1] * (like.dim() - 1)))
        return values.to(device=like.device, dtype=like.dtype)

    def _alpha_sigma(self, t, like: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_t and sigma_t shaped and cast to broadcast over `like`: computed in float64 on the CPU, or for
        t a tensor on an accelerator, looked up there (`_alpha_sigma_on_device`): copying t to the host to
        check and index it would wait for the GPU in every training step."""
        if isinstance(t, Tensor) and t.device.type != "cpu":
            alpha, sigma = self._alpha_sigma_on_device(t, like.dtype)
        else:
            alpha, sigma = self.alpha_sigma(t)
        return self._broadcast(alpha, like), self._broadcast(sigma, like)

    def _alpha_sigma_on_device(self, t: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) in `dtype` on t's device, without a device-to-host copy; the range of t is
        checked with torch._assert_async (an error at the device's next sync, not a ValueError)."""
        raise NotImplementedError


def step_pairs(schedule: GaussianPath, steps: int, spacing: str) -> list[tuple]:
    """(t, t_next) for each sampler step over `schedule.timesteps(steps, spacing)`; the last t_next is
    None, the clean data."""
    times = schedule.timesteps(steps, spacing).tolist()                     # descending model times
    return list(zip(times, times[1:] + [None]))


def denoise(model: Denoiser, x: Tensor, t, schedule: GaussianPath, prediction: str,
            clip_x0: float | None = None) -> tuple[Tensor, Tensor]:
    """One model call at model time t (a number) for the whole batch, turned into (eps, x0)."""
    out = model(x, torch.full((len(x),), t, device=x.device))
    return schedule.to_eps_x0(out, x, t, prediction, clip_x0)


def log_snr_of(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma) as a float (half the log-SNR), +inf at the clean data, -inf at pure noise."""
    if alpha == 0 or sigma == 0:
        return math.inf if sigma == 0 else -math.inf
    return math.log(alpha / sigma)


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}; got {prediction!r}")
