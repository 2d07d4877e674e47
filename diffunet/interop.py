"""Adapters at the edge: our UNet inside diffusers, diffusers' UNet2DModel inside `samplers`, and a
k-diffusion-style denoiser D(x, sigma) over any of our models.

    pipe = diffusers.DDIMPipeline(unet=to_diffusers(model, sample_size=28), scheduler=diffusers_scheduler(schedule))
    x0 = samplers.ddim(from_diffusers(unet2d), noise, schedule, steps=50)
    D = karras_denoiser(model, schedule, prediction="eps")   # D(x, sigma) -> x0, x = x0 + sigma eps

This is the only module of the package that may import diffusers, and it does so only inside
`diffusers_scheduler`: the wrappers themselves need nothing but torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn


class _Config(dict):
    """A read-only dict whose keys are also attributes, like diffusers' FrozenDict (`unet.config.in_channels`)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class UNetOutput:
    """What a diffusers UNet returns: the prediction under `.sample` (UNet2DOutput's layout)."""
    sample: Tensor                                   # [B, out_channels, H, W]

    def __getitem__(self, index: int) -> Tensor:    # `out[0]`, as diffusers' BaseOutput allows
        return (self.sample,)[index]

    def to_tuple(self) -> tuple[Tensor]:
        return (self.sample,)


class DiffusersUNet(nn.Module):
    """Our UNet with the calling convention of diffusers' UNet2DModel, so that its pipelines and
    schedulers drive it unchanged. Build it with `to_diffusers`."""

    def __init__(self, model: nn.Module, sample_size: int | tuple[int, int] | None = None,
                 prediction: str = "eps"):
        super().__init__()
        cfg = model.config
        self.model = model
        self.config = _Config(sample_size=tuple(sample_size) if isinstance(sample_size, (tuple, list)) else sample_size,
                              in_channels=cfg.in_channels, out_channels=cfg.out_channels or cfg.in_channels,
                              num_class_embeds=cfg.num_classes, prediction_type=_epsilon(prediction))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, sample: Tensor, timestep, class_labels: Tensor | None = None,
                return_dict: bool = True) -> UNetOutput | tuple[Tensor]:
        """diffusers' UNet2DModel.forward.

        Args:
            sample: [B, C, H, W] noisy images x_t.
            timestep: an int or float, a 0-d tensor, or a [B] tensor (index units, 0 ... T-1);
                one value is broadcast to the batch.
            class_labels: None (no label) or [B] integer labels, -1 = no label for that image.
            return_dict: False gives a one-tuple instead of an object with `.sample`.
        Returns:
            UNetOutput(sample=prediction) or (prediction,).
        """
        batch = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        if t.numel() not in (1, batch):
            raise ValueError(f"timestep must be one value or one per image ({batch}); got {t.numel()} values")
        out = self.model(sample, t.expand(batch), y=class_labels)
        return UNetOutput(out) if return_dict else (out,)


def to_diffusers(model: nn.Module, sample_size: int | tuple[int, int] | None = None,
                 prediction: str = "eps") -> DiffusersUNet:
    """Wrap our UNet so that diffusers' pipelines (DDIMPipeline, DDPMPipeline, ...) and schedulers accept it.

    Args:
        model: a diffunet `UNet` (anything with a `UNetConfig` as `.config`, called `model(x, t, y=labels)`).
        sample_size: image side (int) or (H, W); pipelines read it to shape their starting noise.
        prediction: what the model predicts ("eps", "x0", "v"); stored as diffusers' `prediction_type`
            in `.config` ("epsilon", "sample", "v_prediction") for building a matching scheduler.
    Returns:
        An nn.Module with `forward(sample, timestep, class_labels=None, return_dict=True)`, `.config`
        (sample_size, in_channels, out_channels, num_class_embeds, prediction_type), `.dtype`, `.device`.
    """
    if not hasattr(getattr(model, "config", None), "in_channels"):
        raise TypeError(f"to_diffusers needs a diffunet UNet (with a UNetConfig .config); got {type(model).__name__}")
    return DiffusersUNet(model, sample_size, prediction)


def from_diffusers(unet: nn.Module, class_labels: Tensor | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """A `samplers` denoiser `model(x_t, t) -> Tensor` over a diffusers UNet2DModel (which returns `.sample`).

    Args:
        unet: a diffusers `UNet2DModel` (or anything called `unet(x, t, class_labels=...)` returning `.sample`).
        class_labels: [B] labels passed on every call, for class-conditional UNet2DModels.
    Returns:
        The denoiser; `samplers.ddim(from_diffusers(unet), noise, schedule, prediction=...)` samples it.
    """
    if class_labels is None:
        return lambda x_t, t: unet(x_t, t).sample
    return lambda x_t, t: unet(x_t, t, class_labels=class_labels).sample


def diffusers_scheduler(schedule, prediction: str = "eps", kind: str = "ddim"):
    """A diffusers scheduler with our schedule's betas and our samplers' conventions: trailing
    timesteps, no clipping, and a last step to the clean data (alpha_bar = 1).

    Args:
        schedule: a discrete `samplers.NoiseSchedule` (its `betas` are passed as `trained_betas`).
        prediction: "eps", "x0" or "v".
        kind: "ddim" (DDIMScheduler) or "ddpm" (DDPMScheduler, posterior variance beta_tilde).
    Returns:
        The scheduler.
    """
    import diffusers   # the interop extra: pip install 'diffunet[interop]'

    common = dict(num_train_timesteps=schedule.num_timesteps, trained_betas=schedule.betas.numpy(),
                  prediction_type=_epsilon(prediction), clip_sample=False, timestep_spacing="trailing")
    if kind == "ddim":
        return diffusers.DDIMScheduler(**common, set_alpha_to_one=True)
    if kind == "ddpm":
        return diffusers.DDPMScheduler(**common, variance_type="fixed_small")
    raise ValueError(f"kind must be 'ddim' or 'ddpm'; got {kind!r}")


def _epsilon(prediction: str) -> str:
    """Our prediction name -> diffusers' prediction_type."""
    names = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
    if prediction not in names:
        raise ValueError(f"prediction must be one of {', '.join(names)}; got {prediction!r}")
    return names[prediction]


# ---- k-diffusion: D(x, sigma) ------------------------------------------------------------------

def karras_denoiser(model: Callable, schedule, prediction: str = "eps") -> Callable[[Tensor, Tensor], Tensor]:
    """The denoiser D(x, sigma) of Karras et al. 2022 ("Elucidating the Design Space of
    Diffusion-Based Generative Models") over a model trained on a discrete VP schedule.

    x lives in the variance-exploding space x = x0 + sigma eps, sigma = sigma_t / alpha_t. With the VP
    column of their Table 1 and eq. 7, D(x, sigma) = c_skip x + c_out F(c_in x, c_noise):
        c_in = alpha = 1 / sqrt(1 + sigma^2)        (x_t = alpha x, the model's own input scale)
        c_noise = t(sigma)                          the fractional timestep whose sigma_t / alpha_t = sigma,
                                                    interpolating log(sigma_t / alpha_t) linearly over
                                                    the integer timesteps (as k-diffusion does), clamped to 0 ... T-1
        eps: c_skip = 1,                 c_out = -sigma                       (D = x - sigma eps_hat)
        x0:  c_skip = 0,                 c_out = 1
        v:   c_skip = 1 / (1 + sigma^2), c_out = -sigma / sqrt(1 + sigma^2)   (x0 = alpha x_t - sigma_t v)
    sigma = 0 returns x itself.

    Args:
        model: our denoiser, called `model(x_t, t)` with t a float [B] tensor (our UNet accepts fractional t);
            bind labels with a closure.
        schedule: a discrete VP schedule (`alpha_bar`, or `alpha_sigma(t)` for its integer timesteps).
        prediction: what the model outputs: "eps", "x0" or "v".
    Returns:
        D(x, sigma): x [B, ...], sigma a number, 0-d or [B] tensor -> the x0 prediction, shaped like x.
    """
    _epsilon(prediction)
    log_sigma_tilde = _log_sigma_tilde(schedule)                     # [T] float64, increasing

    def denoiser(x: Tensor, sigma) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu().reshape(-1).expand(x.shape[0])
        t = _interpolate_timestep(sigma.log(), log_sigma_tilde)     # [B] float64
        alpha = (1 + sigma**2).rsqrt()                               # c_in, Table 1 (VP)
        shape = (-1,) + (1,) * (x.dim() - 1)
        c_in = alpha.reshape(shape).to(x.dtype).to(x.device)
        out = model(x * c_in, t.to(device=x.device, dtype=torch.float32))
        sigma_x = sigma.reshape(shape).to(x.dtype).to(x.device)
        if prediction == "eps":
            x0 = x - sigma_x * out
        elif prediction == "x0":
            x0 = out
        else:
            x0 = c_in**2 * x - sigma_x * c_in * out
        return torch.where(sigma_x == 0, x, x0)

    return denoiser


def _log_sigma_tilde(schedule) -> Tensor:
    """log(sigma_t / alpha_t) at the schedule's integer timesteps, [T] float64; infinite ends dropped."""
    T = len(schedule.alpha_bar)
    if hasattr(schedule, "alpha_sigma"):
        alpha, sigma = schedule.alpha_sigma(torch.arange(T))
        alpha, sigma = alpha.double(), sigma.double()
    else:
        alpha, sigma = schedule.alpha_bar.sqrt(), (1 - schedule.alpha_bar).sqrt()
    table = sigma.log() - alpha.log()
    if not (torch.isfinite(table[:-1]).all() and (table.diff() > 0).all()):
        raise ValueError("karras_denoiser needs a schedule whose sigma/alpha increases with t; "
                         "use a NoiseSchedule built by linear, cosine or sigmoid")
    return table[torch.isfinite(table)]                              # zero terminal SNR: the last step is inf


def _interpolate_timestep(log_sigma: Tensor, table: Tensor) -> Tensor:
    """The fractional index where `table` ([T], increasing) reaches each log_sigma ([B]), clamped to the ends."""
    if len(table) == 1:
        return torch.zeros_like(log_sigma)
    high = torch.searchsorted(table, log_sigma.clamp(table[0], table[-1])).clamp(1, len(table) - 1)
    low = high - 1
    weight = ((log_sigma - table[low]) / (table[high] - table[low])).clamp(0, 1)
    return low.double() + weight
