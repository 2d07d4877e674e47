"""The rectified-flow path (Liu et al. 2023, "Flow Straight and Fast"; Lipman et al. 2023, "Flow Matching";
Esser et al. 2024, "Scaling Rectified Flow Transformers", SD3): x_tau = (1 - tau) x0 + tau eps, tau in [0, 1].

The model sees t = 1000 tau (diffusers' convention for flow models), so the same sinusoidal timestep
embedding serves discrete and continuous paths. tau = 1 is pure noise (alpha = 0): sample such a
path with prediction "flow", "v" or "x0"; an eps-prediction cannot give x0 there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .path import GaussianPath

TIME_SCALE = 1000.0                   # model time t = TIME_SCALE * tau
FLOW_SPACINGS = ("trailing", "karras")


@dataclass(frozen=True)
class RectifiedFlow(GaussianPath):
    """alpha(tau) = 1 - tau, sigma(tau) = tau; its velocity dx/dtau = eps - x0 is the "flow" target."""

    shift: float = 1.0                # SD3 timestep shift of the sampling grid; > 1 spends more steps at high noise

    def __post_init__(self):
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be a positive number (1 = no shift, SD3 uses 3); got {self.shift}")

    @property
    def num_timesteps(self) -> int:
        """The model-time scale, 1000 (t = 1000 tau); also the most steps the CLI lets a sampler take."""
        return int(TIME_SCALE)

    def alpha_sigma(self, t) -> tuple[Tensor, Tensor]:
        """alpha = 1 - t / 1000, sigma = t / 1000 for model times t in [0, 1000], float64 on the CPU."""
        tau = torch.as_tensor(t).detach().cpu().to(torch.float64) / TIME_SCALE
        if tau.dim() > 1 or (tau.numel() and not (tau.min() >= 0 and tau.max() <= 1)):
            raise ValueError(f"rectified-flow times must be a number or a [B] tensor in 0..{TIME_SCALE:g}; got "
                             f"shape {tuple(tau.shape)}, values {tau.min().item() * TIME_SCALE:g}.."
                             f"{tau.max().item() * TIME_SCALE:g}")
        return 1 - tau, tau

    def _alpha_sigma_on_device(self, t: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """alpha = 1 - t / 1000, sigma = t / 1000 on t's device (float32 arithmetic, then `dtype`); the range is
        checked there by torch._assert_async."""
        if t.dim() > 1 or t.is_complex():
            self.alpha_sigma(t)                                   # the one-line error; shape needs no sync
        tau = t.float() / TIME_SCALE
        torch._assert_async(((tau >= 0) & (tau <= 1)).all(), f"rectified-flow times must lie in 0..{TIME_SCALE:g}")
        return (1 - tau).to(dtype), tau.to(dtype)

    def timesteps(self, steps: int, spacing: str = "trailing") -> Tensor:
        """`steps` descending model times (float64):
            trailing: tau_i = 1 - i / steps, i = 0 ... steps-1, warped by the shift
                      tau -> shift tau / (1 + (shift - 1) tau) (Esser et al. 2024, eq. 23);
            karras:   Karras et al. 2022's rho = 7 grid over sigma / alpha = tau / (1 - tau) in [0.002, 80].
        The step after the last one goes to tau = 0, the clean data."""
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"steps must be a positive integer; got {steps!r}")
        if spacing == "karras":
            return self.karras_timesteps(steps)
        if spacing != "trailing":
            raise ValueError(f"spacing for a rectified flow must be one of {', '.join(FLOW_SPACINGS)}; got {spacing!r}")
        tau = 1 - torch.arange(steps, dtype=torch.float64) / steps
        tau = self.shift * tau / (1 + (self.shift - 1) * tau)
        return tau * TIME_SCALE

    def sigma_tilde_range(self) -> tuple[float, float]:
        """tau / (1 - tau) runs from 0 (clean) to inf (pure noise)."""
        return 0.0, math.inf

    def time_from_sigma_tilde(self, sigma_tilde: Tensor) -> Tensor:
        """tau = s / (1 + s) for s = sigma / alpha, as model times."""
        return sigma_tilde / (1 + sigma_tilde) * TIME_SCALE

    def to_dict(self) -> dict:
        """JSON-able description, read back by `NoiseSchedule.from_dict` and `RectifiedFlow.from_dict`."""
        return {"kind": "rectified_flow", "shift": self.shift}

    @classmethod
    def from_dict(cls, d: dict) -> RectifiedFlow:
        """Rebuild from `to_dict()` output; unknown keys raise ValueError."""
        d = dict(d)
        if d.pop("kind", None) != "rectified_flow":
            raise ValueError("not a rectified_flow schedule description")
        unknown = set(d) - {"shift"}
        if unknown:
            raise ValueError(f"unknown keys for a rectified_flow schedule: {', '.join(sorted(unknown))}; remove them")
        return cls(**d)

    def __repr__(self) -> str:
        return f"RectifiedFlow(shift={self.shift:g})"
