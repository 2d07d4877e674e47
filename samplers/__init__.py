"""Diffusion sampling for any denoiser `model(x_t, t)`: noise schedules, DDPM, DDIM, DPM-Solver++(2M)
and classifier-free guidance. Imports only torch and tqdm, never diffunet.

    schedule = NoiseSchedule.linear(1000)
    x0 = sample(model, randn((16, 1, 28, 28), generator), schedule, method="dpmpp_2m", steps=20)
"""
from __future__ import annotations

from torch import Tensor

from .ddim import ddim
from .ddpm import ddpm
from .dpm_solver import dpmpp_2m
from .guidance import guided
from .noise import randn
from .schedule import Denoiser, NoiseSchedule

SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "dpmpp_2m": dpmpp_2m}


def sample(model: Denoiser, x: Tensor, schedule: NoiseSchedule, method: str = "dpmpp_2m", **options) -> Tensor:
    """Run the sampler named `method` ("ddpm", "ddim" or "dpmpp_2m") with its keyword `options`
    (steps, prediction, clip_x0, generator, progress, ...); returns the denoised batch."""
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[method](model, x, schedule, **options)


__all__ = ["NoiseSchedule", "ddpm", "ddim", "dpmpp_2m", "sample", "SAMPLERS", "guided", "randn"]
