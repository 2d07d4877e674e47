"""Diffusion sampling for any denoiser `model(x_t, t)`: Gaussian paths (discrete VP schedules and the
rectified flow), DDPM, DDIM, DPM-Solver++(2M), Euler, Heun (EDM) and classifier-free guidance, each
sampler on every path and every prediction. Imports only torch and tqdm, never diffunet.

    schedule = NoiseSchedule.linear(1000)                  # or NoiseSchedule.rectified_flow(shift=3.0)
    x0 = sample(model, randn((16, 1, 28, 28), generator), schedule, method="dpmpp_2m", steps=20)
"""
from __future__ import annotations

from torch import Tensor

from .ddim import ddim
from .ddpm import ddpm
from .dpm_solver import dpmpp_2m
from .euler import euler
from .flow import RectifiedFlow
from .guidance import guided
from .heun import heun, heun_model_calls
from .noise import randn
from .path import PREDICTIONS, GaussianPath
from .repaint import repaint
from .schedule import Denoiser, NoiseSchedule

SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "dpmpp_2m": dpmpp_2m, "euler": euler, "heun": heun}


def model_calls(method: str, schedule: GaussianPath, steps: int, spacing: str = "trailing") -> int:
    """Model evaluations `method` makes per image in `steps` steps on `schedule` (before guidance doubles the
    batch): one a step, and for heun one more on each second-order step (see heun_model_calls)."""
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; choose one of {', '.join(SAMPLERS)}")
    return heun_model_calls(schedule, steps, spacing) if method == "heun" else steps


def sample(model: Denoiser, x: Tensor, schedule: GaussianPath, method: str = "dpmpp_2m", **options) -> Tensor:
    """Run the sampler named `method` (a key of SAMPLERS) with its keyword `options`
    (steps, prediction, clip_x0, generator, progress, ...); returns the denoised batch."""
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[method](model, x, schedule, **options)


__all__ = ["NoiseSchedule", "RectifiedFlow", "GaussianPath", "PREDICTIONS", "ddpm", "ddim", "dpmpp_2m", "euler",
           "heun", "repaint", "sample", "model_calls", "SAMPLERS", "guided", "randn"]
