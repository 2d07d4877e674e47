"""Noise schedules and the forward-process math: alpha_bar, add_noise, eps/x0/v, the posterior.

The forward process of Ho et al. 2020 ("Denoising Diffusion Probabilistic Models", eq. 4) is
q(x_t | x0) = N(alpha_t x0, sigma_t^2 I) with alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t)
and alpha_bar_t = prod_{s <= t} (1 - beta_s). Timesteps are indices 0 ... T-1; the samplers use
t = -1 for the clean data (alpha_bar = 1). Everything is held in float64 on the CPU and cast to the
input's device and dtype where used, so nothing float64 runs on an accelerator. For t on an accelerator
(a training step's draws), alpha and sigma are looked up in tables cast once per device and dtype, so
no step waits for a copy of t to the host.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .path import PREDICTIONS, Denoiser, GaussianPath  # noqa: F401  (re-exported)

SPACINGS = ("trailing", "leading", "linspace", "karras")
MAX_BETA = 0.999  # cap for schedules defined through alpha_bar (Nichol & Dhariwal 2021, sec. 3.2)


@dataclass(frozen=True, eq=False, repr=False)
class NoiseSchedule(GaussianPath):
    """A discrete variance-preserving schedule beta_0 ... beta_{T-1} and what follows from it (float64, CPU).
    Model time t is the index 0 ... T-1; alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t)."""

    betas: Tensor                                # [T] in (0, 1]: variance added at each step
    recipe: dict = field(default_factory=dict)   # how it was built ({} = from raw betas); see to_dict
    alphas: Tensor = field(init=False)           # [T] alpha_t = 1 - beta_t (Ho et al. notation)
    alpha_bar: Tensor = field(init=False)        # [T] prod_{s <= t} alpha_s; 0 only at zero terminal SNR
    alpha_bar_prev: Tensor = field(init=False)   # [T] alpha_bar_{t-1}, with alpha_bar_{-1} = 1
    _device_tables: dict = field(init=False, default_factory=dict)  # (device, dtype) -> [2, T] alpha, sigma

    def __post_init__(self):
        betas = torch.as_tensor(self.betas, dtype=torch.float64).detach().cpu().clone()
        if betas.dim() != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence; got shape {tuple(betas.shape)}")
        if not (torch.isfinite(betas).all() and (betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must all lie in (0, 1]; clip them or build the schedule with a named constructor")
        if (betas[:-1] == 1).any():
            raise ValueError("only the last of the betas may be 1 (zero terminal SNR); an earlier 1 erases the signal")
        if self.recipe and self.recipe.get("num_timesteps") != len(betas):
            raise ValueError("recipe does not match the betas; build schedules with the named constructors")
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas", alphas)
        object.__setattr__(self, "alpha_bar", alpha_bar)
        object.__setattr__(self, "alpha_bar_prev", torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]]))

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """Linear betas (Ho et al. 2020, sec. 4). beta_start and beta_end are the values for T = 1000;
        other T scale them by 1000 / T so alpha_bar follows the same curve (alpha_bar[T-1] ~ 4e-5)."""
        _check_num_timesteps(num_timesteps)
        scale = 1000 / num_timesteps
        if not 0 < beta_start * scale <= beta_end * scale < 1:
            raise ValueError(f"linear schedule needs 0 < beta_start <= beta_end and beta_end * 1000 / T < 1; got "
                             f"beta_start={beta_start}, beta_end={beta_end}, T={num_timesteps}. Use more timesteps")
        betas = torch.linspace(beta_start * scale, beta_end * scale, num_timesteps, dtype=torch.float64)
        return cls(betas, {"kind": "linear", "num_timesteps": num_timesteps, "beta_start": beta_start,
                           "beta_end": beta_end, "zero_terminal_snr": False})

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008) -> NoiseSchedule:
        """Cosine schedule (Nichol & Dhariwal 2021, eq. 17): alpha_bar(u) = f(u) / f(0) with
        f(u) = cos((u + s) / (1 + s) * pi / 2)^2 and index t at u = (t + 1) / T; betas capped at 0.999."""
        _check_num_timesteps(num_timesteps)
        if not s >= 0:
            raise ValueError(f"cosine offset s must be >= 0; got {s}")
        betas = _betas_from_alpha_bar(lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2, num_timesteps)
        return cls(betas, {"kind": "cosine", "num_timesteps": num_timesteps, "s": s, "zero_terminal_snr": False})

    @classmethod
    def sigmoid(cls, num_timesteps: int = 1000, start: float = -3.0, end: float = 3.0,
                tau: float = 1.0) -> NoiseSchedule:
        """Sigmoid schedule (Chen 2023, "On the Importance of Noise Scheduling", Algorithm 1):
        alpha_bar(u) = (v_end - sigmoid((u (end - start) + start) / tau)) / (v_end - v_start),
        v = sigmoid(. / tau) at start and end, index t at u = (t + 1) / T; betas capped at 0.999."""
        _check_num_timesteps(num_timesteps)
        if not (start < end and tau > 0):
            raise ValueError(f"sigmoid schedule needs start < end and tau > 0; got {start}, {end}, {tau}")
        v_start, v_end = (torch.sigmoid(torch.tensor(v / tau, dtype=torch.float64)) for v in (start, end))
        gamma = lambda u: (v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)
        return cls(_betas_from_alpha_bar(gamma, num_timesteps),
                   {"kind": "sigmoid", "num_timesteps": num_timesteps, "start": start, "end": end, "tau": tau,
                    "zero_terminal_snr": False})

    @classmethod
    def from_betas(cls, betas) -> NoiseSchedule:
        """Any schedule given as T betas in (0, 1] (a sequence or tensor)."""
        return cls(torch.as_tensor(betas, dtype=torch.float64))

    @staticmethod
    def rectified_flow(shift: float = 1.0):
        """The rectified-flow path alpha = 1 - tau, sigma = tau (Liu et al. 2023), model time t = 1000 tau;
        `shift` warps the sampling grid as in Esser et al. 2024 (SD3, eq. 23). See `samplers.flow`."""
        from .flow import RectifiedFlow
        return RectifiedFlow(shift)

    def rescale_zero_terminal_snr(self) -> NoiseSchedule:
        """Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1):
        shift sqrt(alpha_bar) so its last value is 0 and scale it so its first is kept. Returns a new
        schedule with alpha_bar[T-1] = 0 (pure noise at T-1); sample it with prediction "v" or "x0"."""
        if self.num_timesteps < 2:
            raise ValueError("zero terminal SNR needs at least 2 timesteps")
        sqrt_alpha_bar = self.alpha_bar.sqrt()
        first, last = sqrt_alpha_bar[0].item(), sqrt_alpha_bar[-1].item()
        alpha_bar = ((sqrt_alpha_bar - last) * first / (first - last)) ** 2
        betas = 1 - alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        return NoiseSchedule(betas, {**self.recipe, "zero_terminal_snr": True} if self.recipe else {})

    def respace(self, timesteps: Tensor) -> NoiseSchedule:
        """The schedule that visits only `timesteps` (Nichol & Dhariwal 2021, sec. 4): between kept
        steps s < t, beta = 1 - alpha_bar_t / alpha_bar_s, so alpha_bar at the kept steps is unchanged.
        Index i of the result is the i-th smallest kept timestep."""
        kept = torch.as_tensor(timesteps).cpu().long().sort().values
        if len(kept) == 0 or kept.unique().numel() != len(kept) or kept[0] < 0 or kept[-1] >= self.num_timesteps:
            raise ValueError(f"respace needs distinct timesteps in 0..{self.num_timesteps - 1}")
        alpha_bar = self.alpha_bar[kept]
        return NoiseSchedule(1 - alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]]))

    # ---- the forward process and its parameterisations -----------------------------------------

    @property
    def num_timesteps(self) -> int:
        """T, the number of diffusion steps."""
        return len(self.betas)

    def alpha_bar_at(self, t: int) -> float:
        """alpha_bar_t as a Python float; t = -1 is the clean data (alpha_bar = 1)."""
        return 1.0 if t == -1 else self.alpha_bar[t].item()

    def snr(self, t, like: Tensor | None = None) -> Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) (Kingma et al. 2021), float64 on the CPU;
        `like`: see GaussianPath.snr."""
        if like is not None:
            return super().snr(t, like)
        alpha_bar = self.alpha_bar[self._check_timesteps(t)]
        return alpha_bar / (1 - alpha_bar)

    def alpha_sigma(self, t) -> tuple[Tensor, Tensor]:
        """alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t) for integer indices t, float64 on the CPU."""
        alpha_bar = self.alpha_bar[self._check_timesteps(t)]
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_{t-1} | x_t, x0) = N(mean, variance I) (Ho et al. 2020, eqs. 6-7):
            mean = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x0
                   + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t,
            variance = beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t.
        At t = 0 the mean is x0 and the variance 0; log_variance is floored at log(1e-20) there.
        Returns (mean, variance, log_variance), the last two shaped to broadcast over x_t.
        """
        one_minus_alpha_bar = 1 - self.alpha_bar
        coef_x0 = self.alpha_bar_prev.sqrt() * self.betas / one_minus_alpha_bar
        coef_x_t = self.alphas.sqrt() * (1 - self.alpha_bar_prev) / one_minus_alpha_bar
        variance = (1 - self.alpha_bar_prev) / one_minus_alpha_bar * self.betas
        mean = self._at(coef_x0, t, x_t) * x0 + self._at(coef_x_t, t, x_t) * x_t
        return mean, self._at(variance, t, x_t), self._at(variance.clamp_min(1e-20).log(), t, x_t)

    def timesteps(self, steps: int, spacing: str = "trailing") -> Tensor:
        """`steps` descending index timesteps for a sampler (Lin et al. 2024, Table 2):
            trailing: round(T - i T / steps) - 1, always starts at T-1 (the default);
            leading:  i * (T // steps), as in DDIM; ends at 0 and never reaches T-1;
            linspace: round(linspace(T-1, 0, steps)), both ends included;
            karras:   Karras et al. 2022's rho = 7 grid (`karras_timesteps`), each point rounded to the
                      nearest index in log sigma/alpha, as k-diffusion does for discrete models;
                      repeated indices at the low-noise end are dropped, so it may give fewer steps.
        Returns a long tensor [steps] (at most `steps` for karras)."""
        T = self.num_timesteps
        if not (isinstance(steps, int) and 1 <= steps <= T):
            raise ValueError(f"steps must be an integer in 1..{T} (the schedule's num_timesteps); got {steps!r}")
        if spacing == "trailing":
            values = [round(T - i * T / steps) - 1 for i in range(steps)]
        elif spacing == "leading":
            values = [i * (T // steps) for i in reversed(range(steps))]
        elif spacing == "linspace":
            values = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().tolist()
        elif spacing == "karras":
            values = list(dict.fromkeys(self.karras_timesteps(steps).long().tolist()))
        else:
            raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}; got {spacing!r}")
        return torch.tensor(values, dtype=torch.long)

    def sigma_tilde_range(self) -> tuple[float, float]:
        """sigma / alpha at index 0 and at T-1 (inf under zero terminal SNR)."""
        first, last = self.alpha_bar[0].item(), self.alpha_bar[-1].item()
        return math.sqrt((1 - first) / first), math.sqrt((1 - last) / last) if last > 0 else math.inf

    def time_from_sigma_tilde(self, sigma_tilde: Tensor) -> Tensor:
        """The index whose log(sigma / alpha) is nearest to each value (long [N])."""
        table = 0.5 * ((1 - self.alpha_bar).log() - self.alpha_bar.log())              # [T], increasing
        return (table[None, :] - sigma_tilde.log()[:, None]).abs().argmin(dim=1)

    # ---- serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """JSON-able description: the constructor and its arguments, or the raw betas."""
        return dict(self.recipe) if self.recipe else {"kind": "betas", "betas": self.betas.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> NoiseSchedule:
        """Rebuild a schedule from `to_dict()` output; unknown kinds or keys raise ValueError."""
        d = dict(d)
        if d.get("kind") == "rectified_flow":
            from .flow import RectifiedFlow
            return RectifiedFlow.from_dict(d)
        kind, zero_terminal_snr = d.pop("kind", None), d.pop("zero_terminal_snr", False)
        constructors = {"linear": cls.linear, "cosine": cls.cosine, "sigmoid": cls.sigmoid, "betas": cls.from_betas}
        if kind not in constructors:
            raise ValueError(f"schedule kind must be one of {', '.join(constructors)}, rectified_flow; got {kind!r}")
        unknown = set(d) - set(inspect.signature(constructors[kind]).parameters)
        if unknown:
            raise ValueError(f"unknown keys for a {kind} schedule: {', '.join(sorted(unknown))}; remove them")
        schedule = constructors[kind](**d)
        return schedule.rescale_zero_terminal_snr() if zero_terminal_snr else schedule

    def __repr__(self) -> str:
        extra = ", zero_terminal_snr" if self.recipe.get("zero_terminal_snr") else ""
        return f"NoiseSchedule({self.recipe.get('kind', 'betas')}, num_timesteps={self.num_timesteps}{extra})"

    # ---- helpers --------------------------------------------------------------------------------

    def _check_timesteps(self, t) -> Tensor:
        """t (int, 0-d or [B] integer tensor, any device) as a CPU long tensor, checked to lie in 0..T-1."""
        t = torch.as_tensor(t).cpu()
        if t.is_floating_point() or t.is_complex() or t.dim() > 1:
            raise ValueError(f"t must be integer timestep indices (an int or a [B] long tensor); got {t.dtype} "
                             f"of shape {tuple(t.shape)}. Convert with t.long()")
        if t.numel() and (t.min() < 0 or t.max() >= self.num_timesteps):
            raise ValueError(f"t must lie in 0..{self.num_timesteps - 1}; "
                             f"got values {t.min().item()}..{t.max().item()}")
        return t.long()

    def _alpha_sigma_on_device(self, t: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """alpha_t, sigma_t looked up on t's device in [2, T] tables made once per device and dtype (from the
        float64 values, so they equal the CPU path's); t is checked there by torch._assert_async."""
        if t.is_floating_point() or t.is_complex() or t.dim() > 1:
            self._check_timesteps(t)                              # the one-line error; dtype and shape need no sync
        torch._assert_async(((t >= 0) & (t < self.num_timesteps)).all(), f"t must lie in 0..{self.num_timesteps - 1}")
        key = (t.device, dtype)
        if key not in self._device_tables:
            self._device_tables[key] = torch.stack([self.alpha_bar.sqrt(), (1 - self.alpha_bar).sqrt()]).to(
                device=t.device, dtype=dtype)
        alpha, sigma = self._device_tables[key]
        return alpha[t], sigma[t]

    def _at(self, values: Tensor, t, like: Tensor) -> Tensor:
        """values[t] shaped to broadcast over `like` ([B] -> [B, 1, ..., 1]), in like's device and dtype."""
        picked = values[self._check_timesteps(t)]
        if picked.dim() == 1:
            picked = picked.reshape(-1, *([1] * (like.dim() - 1)))
        return picked.to(device=like.device, dtype=like.dtype)


def _betas_from_alpha_bar(alpha_bar: Callable[[Tensor], Tensor], num_timesteps: int) -> Tensor:
    """[T] betas with prod (1 - beta) following alpha_bar(u) / alpha_bar(0) at u = (t + 1) / T, capped at MAX_BETA."""
    u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    values = alpha_bar(u)
    return (1 - values[1:] / values[:-1]).clamp(max=MAX_BETA)


def _check_num_timesteps(num_timesteps: int) -> None:
    if not (isinstance(num_timesteps, int) and num_timesteps >= 1):
        raise ValueError(f"num_timesteps must be a positive integer; got {num_timesteps!r}")
