"""Test-set negative log-likelihood in bits/dim from the variational bound (Ho et al. 2020, eq. 5).

With the package's timestep indices 0 ... T-1 (index i is the paper's t = i + 1) the bound on
-log p(x0) is
    L = L_T + sum_{i=1}^{T-1} L_i + L_0
    L_T = KL(q(x_{T-1} | x0) || N(0, I))                              the prior term, no model needed
    L_i = KL(q(x_{i-1} | x_i, x0) || p(x_{i-1} | x_i))                i >= 1, both Gaussian (eq. 6-7)
    L_0 = -log p(x0 | x_0-latent)                                     the discretized Gaussian decoder (eq. 13)
The model's p(x_{i-1} | x_i) has the posterior mean with the model's x0 in place of the true one and
the fixed "small" variance beta_tilde_i (Ho et al. 2020 sec. 3.2); at i = 0, where beta_tilde is 0,
the decoder uses beta_tilde_1 instead (improved-diffusion's clipped log variance, Nichol & Dhariwal
2021). Data are uint8, scaled to [-1, 1] with 256 bins of width 2/255.

Each term is an expectation over x_i ~ q(x_i | x0); one noise draw per (image, timestep) gives an
unbiased estimate, and the standard error across images covers that randomness too. Evaluating
every timestep costs T forwards per image (batched over timesteps); `timesteps_per_image = K`
evaluates L_0 exactly and the sum over i >= 1 by stratified sampling: 1 ... T-1 cut into K-1 strata
of geometrically growing size (the terms fall roughly like 1/i), one uniform timestep per stratum,
weighted by the stratum's size. Unbiased for any K; K = T is the exact sum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.special import log_ndtr
from tqdm import tqdm

from samplers import NoiseSchedule

BIN_HALF_WIDTH = 1 / 255   # [-1, 1] holds 256 values 2/255 apart; each owns +-1/255 around it


@dataclass
class NLLResult:
    """The bound in bits/dim, its parts, and how it was estimated."""
    bits_per_dim: float            # mean over images of the bound L / (D ln 2)
    stderr: float                  # standard error of that mean across images (nan for one image)
    per_image: Tensor              # float64 [M] bits/dim of each image
    prior_bits_per_dim: float      # the L_T share of bits_per_dim
    decoder_bits_per_dim: float    # the L_0 share
    num_images: int                # M
    timesteps_per_image: int       # model forwards per image; T means every term was evaluated


def normal_kl(mean1: Tensor, log_var1: Tensor, mean2: Tensor, log_var2: Tensor) -> Tensor:
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) per element, in nats:
    0.5 (log_var2 - log_var1 + e^(log_var1 - log_var2) + (mean1 - mean2)^2 e^-log_var2 - 1)."""
    return 0.5 * (log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2) - 1)


def discretized_gaussian_log_likelihood(x0: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x0's bin) per element under N(mean, e^(2 log_scale)) (Ho et al. 2020, eq. 13).

    x0 lies on the 256-value grid of [-1, 1]; its bin is x0 +- 1/255, and the end bins reach -inf
    (x0 = -1) and +inf (x0 = 1), so the 256 probabilities sum to 1. Computed from log Phi in float64;
    a bin above the mean uses Phi's symmetry so the difference of CDFs never cancels.
    """
    x0, mean, log_scale = x0.double(), mean.double(), log_scale.double()
    inv_scale = torch.exp(-log_scale)
    upper = (x0 + BIN_HALF_WIDTH - mean) * inv_scale                       # bin edges in std units
    lower = (x0 - BIN_HALF_WIDTH - mean) * inv_scale
    flip = upper + lower > 0                                               # bin centre above the mean
    high, low = torch.where(flip, -lower, upper), torch.where(flip, -upper, lower)
    log_high, log_low = log_ndtr(high), log_ndtr(low)
    interior = log_high + torch.log(-torch.expm1(log_low - log_high))      # log(Phi(high) - Phi(low))
    return torch.where(x0 < -1 + BIN_HALF_WIDTH, log_ndtr(upper),
                       torch.where(x0 > 1 - BIN_HALF_WIDTH, log_ndtr(-lower), interior))


def prior_kl(x0: Tensor, schedule: NoiseSchedule) -> Tensor:
    """L_T = KL(q(x_{T-1} | x0) || N(0, I)) summed over pixels, in nats [B]; 0 at zero terminal SNR."""
    alpha_bar = schedule.alpha_bar[-1].item()
    x0 = x0.double()
    mean = math.sqrt(alpha_bar) * x0
    log_var = torch.full_like(x0, math.log1p(-alpha_bar))
    return normal_kl(mean, log_var, torch.zeros_like(x0), torch.zeros_like(x0)).flatten(1).sum(1)


def model_log_variance(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """log of the fixed "small" variance beta_tilde_t [B] (float64); at t = 0, log beta_tilde_1."""
    variance = (1 - schedule.alpha_bar_prev) / (1 - schedule.alpha_bar) * schedule.betas
    floor = variance[1] if schedule.num_timesteps > 1 else schedule.betas[0]
    return torch.cat([floor.reshape(1), variance[1:]]).log()[t.cpu()]


def vlb_terms(model, x0: Tensor, t: Tensor, noise: Tensor, schedule: NoiseSchedule, prediction: str,
              y: Tensor | None = None, clip_x0: float | None = 1.0) -> Tensor:
    """One term of the bound per image, in nats summed over pixels [B]: L_t for t >= 1, L_0 for t = 0.

    Args:
        model: a denoiser `model(x_t, t)` (or `model(x_t, t, y=y)` when y is given).
        x0: float [B, C, H, W] on the 256-value grid of [-1, 1], on the model's device.
        t: long [B] timestep indices; noise: [B, C, H, W] standard normal, like x0.
        clip_x0: clip the model's x0 to [-c, c] (as the samplers do); a function of x_t, so still a bound.
    """
    x_t = schedule.add_noise(x0, t, noise)
    out = model(x_t, t) if y is None else model(x_t, t, y=y)
    x0, x_t, out, t = x0.double().cpu(), x_t.double().cpu(), out.double().cpu(), t.cpu()  # float64 on the CPU
    _, x0_model = schedule.to_eps_x0(out, x_t, t, prediction, clip_x0=clip_x0)
    true_mean, _, true_log_var = schedule.posterior_mean_variance(x0, x_t, t)
    model_mean, _, _ = schedule.posterior_mean_variance(x0_model, x_t, t)
    log_var = model_log_variance(schedule, t).reshape(-1, *[1] * (x0.dim() - 1)).expand_as(x0)
    kl = normal_kl(true_mean, true_log_var, model_mean, log_var).flatten(1).sum(1)
    decoder_nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * log_var).flatten(1).sum(1)
    return torch.where(t == 0, decoder_nll, kl)


def stratum_edges(num_timesteps: int, count: int) -> Tensor:
    """`count` + 1 increasing edges from 1 to T cutting 1 ... T-1 into `count` strata of geometrically
    growing size: the terms fall roughly like 1/t, so the small t that carry most of the bound get
    strata of one timestep (evaluated exactly) and the flat tail shares a few wide ones. Long [count + 1]."""
    edges = [1]
    for k in range(count):
        remaining = count - k                                                     # strata still to place
        geometric = round(edges[-1] * (num_timesteps / edges[-1]) ** (1 / remaining))
        edges.append(min(max(edges[-1] + 1, geometric), num_timesteps - remaining + 1))
    return torch.tensor(edges)


def stratified_timesteps(num_timesteps: int, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """0 plus one uniform draw from each of the `count - 1` strata of `stratum_edges`, with the weights
    (stratum sizes) that make sum_i weight_i L_{t_i} an unbiased estimate of sum_t L_t. Long [count] each."""
    edges = stratum_edges(num_timesteps, count - 1)
    sizes = edges[1:] - edges[:-1]                                                   # [count - 1]
    offsets = (torch.rand(count - 1, generator=generator, dtype=torch.float64) * sizes).long()
    first = torch.zeros(1, dtype=torch.long)                                          # t = 0, weight 1
    return torch.cat([first, edges[:-1] + offsets]), torch.cat([first + 1, sizes])


@torch.no_grad()
def nll_bits_per_dim(model, images: Tensor, schedule: NoiseSchedule, prediction: str = "eps", *,
                     labels: Tensor | None = None, timesteps_per_image: int | None = None,
                     batch_size: int = 256, seed: int = 0, device: str | torch.device = "cpu",
                     clip_x0: float | None = 1.0, progress: bool = False) -> NLLResult:
    """Negative log-likelihood bound of each image in bits/dim: L / (C H W ln 2).

    Args:
        model: a denoiser `model(x_t, t)` in eval mode (class-conditional: called with y=labels).
        images: uint8 [M, C, H, W]; pixel u becomes x0 = u / 127.5 - 1.
        schedule, prediction: the noise schedule and what the model outputs ("eps", "x0" or "v").
        labels: long [M] labels to condition on, or None for an unconditional model (or branch).
        timesteps_per_image: model forwards per image, K in 2 ... T; None or T evaluates every term.
        batch_size: model forwards per batch, timesteps of several images together.
        seed: image i's noise and timesteps depend only on (seed, i), never on the batch size.
        device: where the model runs; the bound's arithmetic is float64 on the CPU.

    Returns:
        NLLResult with the mean, its standard error across images and the per-image values.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty uint8 [M, C, H, W] tensor (the 256-bin data); "
                         f"got {images.dtype} {tuple(images.shape)}")
    T = schedule.num_timesteps
    count = T if timesteps_per_image is None else timesteps_per_image
    if not (isinstance(count, int) and (2 <= count <= T or count == T)):
        raise ValueError(f"timesteps_per_image must be an integer in 2..{T} (or None for all {T}); got {count!r}")
    dims = images[0].numel()
    x0_all = images.double() / 127.5 - 1                                          # [M, C, H, W]
    prior = prior_kl(x0_all, schedule)                                            # [M] nats
    sums, decoder = torch.zeros(len(images), dtype=torch.float64), torch.zeros(len(images), dtype=torch.float64)
    per_group = max(1, batch_size // count)                                       # images per group of pairs
    bar = tqdm(total=len(images) * count, disable=not progress, desc="likelihood", unit="fwd")
    for start in range(0, len(images), per_group):
        index, t, weight, noise = [], [], [], []
        for i in range(start, min(start + per_group, len(images))):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + i)
            if count == T:
                steps, weights = torch.arange(T), torch.ones(T, dtype=torch.long)
            else:
                steps, weights = stratified_timesteps(T, count, generator)
            index.append(torch.full((count,), i))
            t.append(steps)
            weight.append(weights)
            noise.append(torch.randn((count, *images.shape[1:]), generator=generator))
        index, t, weight, noise = torch.cat(index), torch.cat(t), torch.cat(weight), torch.cat(noise)
        for lo in range(0, len(index), batch_size):
            part = slice(lo, lo + batch_size)
            x0 = x0_all[index[part]].float().to(device)
            y = labels[index[part]].to(device) if labels is not None else None
            terms = vlb_terms(model, x0, t[part].to(device), noise[part].to(device), schedule, prediction,
                              y=y, clip_x0=clip_x0)
            sums.index_add_(0, index[part], terms * weight[part])
            decoder.index_add_(0, index[part], torch.where(t[part] == 0, terms, torch.zeros_like(terms)))
            bar.update(len(terms))
    bar.close()
    to_bits = 1 / (dims * math.log(2))
    per_image = (prior + sums) * to_bits
    stderr = per_image.std().item() / math.sqrt(len(images)) if len(images) > 1 else math.nan
    return NLLResult(per_image.mean().item(), stderr, per_image, (prior * to_bits).mean().item(),
                     (decoder * to_bits).mean().item(), len(images), count)
