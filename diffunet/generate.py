"""Draw images from a trained denoiser: per-image seeds, batching, labels and guidance in one place.

Used by training (sample grids), the `diffunet sample` command and evaluation.
"""
from __future__ import annotations

import torch
from torch import Tensor

import samplers
from samplers import NoiseSchedule

from .errors import UserError
from .tasks import with_condition


def image_generators(seed: int, start: int, stop: int) -> list[torch.Generator]:
    """One CPU generator per image index in [start, stop): image i gets the same noise at any batch size."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(start, stop)]


def generate(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    num: int,
    image_shape: tuple[int, int, int],
    *,
    sampler: str = "dpmpp_2m",
    steps: int = 20,
    prediction: str = "eps",
    labels: Tensor | None = None,
    guidance: float = 1.0,
    cond: Tensor | None = None,
    cond_guidance: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    clip_x0: float | None = 1.0,
    progress: bool = False,
) -> Tensor:
    """Sample `num` images of `image_shape` = (C, H, W) with the named sampler.

    Args:
        model: a denoiser `model(x_t, t, y=...)`; put it in eval mode first.
        labels: [num] class labels (long), or None for an unconditional draw. -1 means "no label".
        guidance: classifier-free guidance scale; 1.0 means plain conditional sampling.
        cond: [num, cond_channels, H, W] condition images of a task run (tasks.py), or None.
        cond_guidance: classifier-free guidance on `cond` (a run trained with cond dropout); 1.0 = none.
        seed: image i depends only on (seed, i), never on the batch size or the device.
    Returns:
        float tensor [num, C, H, W] on the CPU, roughly in [-1, 1].
    """
    if sampler not in samplers.SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(samplers.SAMPLERS)}")
    _check_counts(schedule, num, steps, batch_size)
    out = []
    for start, stop, generators, x in _noise_batches(num, image_shape, seed, batch_size, device):
        conditioned = model if cond is None else with_condition(model, cond[start:stop].to(device), cond_guidance)
        denoiser = _bind_labels(conditioned, labels[start:stop].to(device) if labels is not None else None, guidance)
        with torch.inference_mode():
            x0 = samplers.sample(denoiser, x, schedule, method=sampler, steps=steps, prediction=prediction,
                                 clip_x0=clip_x0, generator=generators, progress=progress)
        out.append(x0.float().cpu())
    return torch.cat(out)


def generate_inpainted(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    known: Tensor,
    keep: Tensor,
    num: int,
    *,
    steps: int = 50,
    jump_length: int = 10,
    resamples: int = 10,
    prediction: str = "eps",
    labels: Tensor | None = None,
    guidance: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Tensor:
    """Fill in `num` images where `keep` is 0 with RePaint (`samplers.repaint`), batched and seeded as `generate`.

    Args:
        known: [1 or num, C, H, W] the images to complete, in [-1, 1]; one image is completed `num` times.
        keep: [1 or num, 1, H, W] 1 = keep the pixel of `known`, 0 = fill in.
        labels, guidance, seed, batch_size: as in `generate` (labels -1 = "no label": the known pixels decide).
        steps, jump_length, resamples: RePaint's descent, J and R (R = 1: plain replacement).
    Returns:
        float tensor [num, C, H, W] on the CPU, equal to `known` where keep is 1.
    """
    _check_counts(schedule, num, steps, batch_size)
    known, keep = known.expand(num, *known.shape[1:]), keep.expand(num, *keep.shape[1:])
    out = []
    for start, stop, generators, x in _noise_batches(num, tuple(known.shape[1:]), seed, batch_size, device):
        denoiser = _bind_labels(model, labels[start:stop].to(device) if labels is not None else None, guidance)
        with torch.inference_mode():
            filled = samplers.repaint(denoiser, x, schedule, known[start:stop].to(device), keep[start:stop].to(device),
                                      steps, jump_length=jump_length, resamples=resamples, prediction=prediction,
                                      clip_x0=1.0, generator=generators, progress=progress)
        out.append(filled.float().cpu())
    return torch.cat(out)


def _check_counts(schedule: NoiseSchedule, num: int, steps: int, batch_size: int) -> None:
    """One-line errors for counts the sampling loops cannot run with, in the words of the CLI's flags."""
    if steps <= 0:
        raise UserError(f"steps (--steps) must be a positive number of sampling steps; got {steps}")
    if num <= 0:
        raise UserError(f"num (--num) must be a positive number of images; got {num}")
    if batch_size <= 0:
        raise UserError(f"batch_size (--batch-size) must be positive; got {batch_size}")
    if steps > schedule.num_timesteps:
        raise UserError(f"steps (--steps) must be at most the run's {schedule.num_timesteps} diffusion timesteps; "
                        f"got {steps}")


def _noise_batches(num: int, image_shape: tuple[int, ...], seed: int, batch_size: int, device):
    """(start, stop, per-image generators, starting noise [stop - start, *image_shape]) for each batch of `num`."""
    for start in range(0, num, batch_size):
        stop = min(start + batch_size, num)
        generators = image_generators(seed, start, stop)
        yield start, stop, generators, samplers.randn((stop - start, *image_shape), generator=generators, device=device)


def _bind_labels(model, labels: Tensor | None, guidance: float):
    """Close over labels (and guidance) so samplers see a plain `model(x_t, t)`."""
    if labels is None:
        return model
    if guidance != 1.0:
        return samplers.guided(model, labels, guidance)
    return lambda x, t: model(x, t, y=labels)
