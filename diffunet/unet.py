"""UNetConfig (a frozen dataclass) and UNet: a time-conditioned U-Net for any image size.

Two layouts share one forward: "resnet" (Ho et al. 2020: a skip after every block, the decoder one
block longer per level) and "double_conv" (Ronneberger et al. 2015: one skip per level, taken
before pooling). The backbone (this file, layers.py, kernels.py, valid.py) imports only torch and einops.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import valid
from .layers import (Attention, DoubleConv, Downsample, ResBlock, TimestepSequential, Upsample, make_activation,
                     make_norm, timestep_embedding, zero_)

CHOICES = {"activation": ("silu", "relu"), "block": ("resnet", "double_conv"), "time_injection": ("scale_shift", "add"),
           "skip": ("concat", "add"), "upsample": ("nearest", "bilinear", "transposed"),
           "downsample": ("conv", "maxpool"), "padding": ("same", "valid")}


@dataclass(frozen=True)
class UNetConfig:
    """Everything that defines a UNet's layers; stored as JSON in checkpoints (`to_dict`/`from_dict`)."""
    in_channels: int = 3                          # image channels: 1 grayscale, 3 RGB, 4 RGBA or latents
    out_channels: int | None = None               # predicted channels; None = in_channels
    base_channels: int = 64                       # width of the first resolution level
    channel_mults: tuple[int, ...] = (1, 2, 2)    # level i has base_channels * channel_mults[i]; depth = len - 1
    num_res_blocks: int = 2                       # blocks per level in the encoder ("resnet" decoder: one more)
    attention_levels: tuple[int, ...] = ()        # levels (0 = full size) with self-attention after each block
    mid_attention: bool = True                    # self-attention in the middle, at the lowest resolution
    num_heads: int = 1                            # attention heads (when head_channels is None)
    head_channels: int | None = None              # channels per attention head; heads = width // head_channels
    dropout: float = 0.0                          # dropout probability before each block's second conv
    norm_groups: int = 32                         # GroupNorm groups; 0 = no normalisation
    activation: str = "silu"                      # "silu" | "relu"
    block: str = "resnet"                         # "resnet" (Ho et al. 2020) | "double_conv" (Ronneberger et al. 2015)
    time_conditional: bool = True                 # embed t; False = a plain U-Net called as model(x)
    time_injection: str = "scale_shift"           # "scale_shift" (FiLM after GroupNorm) | "add" (Ho et al. 2020)
    emb_channels: int | None = None               # width of the time/label embedding; None = 4 * base_channels
    num_classes: int | None = None                # labels y in 0..num_classes-1, plus a "no label" row (y = -1)
    cond_channels: int = 0                        # channels of an image `cond` concatenated to x; 0 = none
    skip: str = "concat"                          # how encoder maps join the decoder: "concat" | "add"
    upsample: str = "nearest"                     # "nearest" | "bilinear" (then a 3x3 conv) | "transposed" (2x2)
    downsample: str = "conv"                      # "conv" (3x3, stride 2) | "maxpool" (2x2)
    padding: str = "same"                         # "same" (output H x W = input's) | "valid" (no padding, cropped skips)
    zero_init: bool = True                        # zero each residual branch's last conv and the output conv

    def __post_init__(self):
        for name in ("channel_mults", "attention_levels"):  # accept lists (JSON, user code); store tuples
            _require(isinstance(getattr(self, name), (tuple, list)),
                     f"{name} must be a tuple of integers, e.g. (1, 2, 2); got {getattr(self, name)!r}")
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name, value in dataclasses.asdict(self).items():
            if name in CHOICES:
                _require(value in CHOICES[name], f"{name} must be one of {CHOICES[name]}; got {value!r}")
            elif name in ("channel_mults", "attention_levels"):
                _require(all(isinstance(v, int) and not isinstance(v, bool) for v in value),
                         f"{name} must be a tuple of integers, e.g. (1, 2, 2); got {value!r}")
            elif name not in ("dropout", "mid_attention", "time_conditional", "zero_init"):
                _require(value is None or (isinstance(value, int) and not isinstance(value, bool)),
                         f"{name} must be an integer; got {value!r}")
        _require(self.in_channels >= 1, f"in_channels must be >= 1; got {self.in_channels}")
        _require(self.out_channels is None or self.out_channels >= 1, "out_channels must be >= 1 or None")
        _require(self.base_channels >= 1 and len(self.channel_mults) >= 1 and min(self.channel_mults) >= 1,
                 "base_channels and channel_mults must be positive, with at least one level")
        _require(self.num_res_blocks >= 1, f"num_res_blocks must be >= 1; got {self.num_res_blocks}")
        _require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1); got {self.dropout}")
        _require(self.cond_channels >= 0, f"cond_channels must be >= 0; got {self.cond_channels}")
        _require(self.num_classes is None or self.num_classes >= 1, "num_classes must be >= 1, or None for none")
        _require(self.emb_channels is None or self.emb_channels >= 1, "emb_channels must be >= 1 or None")
        top = self.depth if self.block == "resnet" else self.depth - 1
        _require(all(0 <= level <= top for level in self.attention_levels),
                 f"attention_levels must lie in 0..{top}; got {self.attention_levels} "
                 f"(for the lowest resolution of a double_conv U-Net use mid_attention)")
        if self.norm_groups:
            _require(self.norm_groups >= 1 and all(w % self.norm_groups == 0 for w in self.widths),
                     f"every level width {self.widths} must be divisible by norm_groups={self.norm_groups}; "
                     f"change base_channels or norm_groups (0 = no normalisation)")
        attention_widths = [self.widths[i] for i in self.attention_levels] + [self.widths[-1]] * self.mid_attention
        heads = self.head_channels or self.num_heads
        _require(heads >= 1 and all(w % heads == 0 for w in attention_widths),
                 f"attention widths {sorted(set(attention_widths))} must be divisible by "
                 f"{'head_channels' if self.head_channels else 'num_heads'}={heads}; change it or base_channels")

    @property
    def depth(self) -> int:
        """Number of downsamplings; the input side is halved `depth` times."""
        return len(self.channel_mults) - 1

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels of each resolution level."""
        return tuple(self.base_channels * m for m in self.channel_mults)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        """Rebuild from `to_dict()` output; missing keys take their defaults, unknown keys are refused."""
        if not isinstance(data, dict):
            raise ValueError(f"a UNetConfig dict is needed; got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown UNetConfig keys {unknown}; remove them (or upgrade diffunet)")
        return cls(**data)

    # Presets: each takes keyword overrides, e.g. UNetConfig.small28(num_classes=10).
    @classmethod
    def ronneberger2015(cls, **overrides) -> UNetConfig:
        """Ronneberger et al. 2015, fig. 1: 1x572x572 -> 1024x28x28 bottleneck -> 2x388x388."""
        return dataclasses.replace(cls(
            in_channels=1, out_channels=2, base_channels=64, channel_mults=(1, 2, 4, 8, 16), num_res_blocks=1,
            mid_attention=False, norm_groups=0, activation="relu", block="double_conv", time_conditional=False,
            upsample="transposed", downsample="maxpool", padding="valid", zero_init=False), **overrides)

    @classmethod
    def ddpm_cifar10(cls, **overrides) -> UNetConfig:
        """Ho et al. 2020, app. B: the 35.7 M CIFAR-10 model (attention at 16x16, additive timestep)."""
        return dataclasses.replace(cls(
            in_channels=3, base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2, attention_levels=(1,),
            dropout=0.1, norm_groups=32, time_injection="add"), **overrides)

    @classmethod
    def small28(cls, **overrides) -> UNetConfig:
        """A CPU-friendly denoiser for 1x28x28 images (MNIST): 28 -> 14 -> 7, attention only at 7x7, 0.29 M
        parameters.

        16 channels wide: at five minutes of a 2-core fp32 CPU, many images through a narrow network beat
        fewer through a wide one (benchmarks/README.md, "Width at a fixed CPU budget": 64k images at width 16
        gave FD 1.69x the floor, 22k at width 32 2.55x, in about the same time). Until issue 14 it was 32 wide
        (1.14 M); `UNetConfig.small28(base_channels=32)` is that network. norm_groups=2 trained 1.15x faster in
        bf16 but gave worse samples over three seeds ("GroupNorm groups"), so 8 stays."""
        return dataclasses.replace(cls(
            in_channels=1, base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1, num_heads=1,
            norm_groups=8), **overrides)

    @classmethod
    def small32(cls, **overrides) -> UNetConfig:
        """A CPU-friendly denoiser for 3x32x32 images (emoji, CIFAR-like): 32 -> 16 -> 8, attention only at 8x8,
        0.29 M parameters.

        16 channels wide with one block a level, for the reason small28 is: on the 1,906 emoji at 32x32, 112k
        images through this network gave FD 2.91x the floor (strict 2.49x), 70k through a 24-wide one (the
        same time) 4.12x (2.93x), and the 48-wide, two-block network of before (3.73 M, 8x slower a step in
        fp32) 6.63x after 8 minutes (benchmarks/README.md, "Dataset x CPU x minutes"). That network is
        `UNetConfig.small32(base_channels=48, num_res_blocks=2)`."""
        return dataclasses.replace(cls(
            in_channels=3, base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1, num_heads=1,
            norm_groups=8), **overrides)


    @classmethod
    def small64(cls, **overrides) -> UNetConfig:
        """A CPU-sized denoiser for 3x64x64 images: 64 -> 32 -> 16 -> 8, attention only at 8x8."""
        return dataclasses.replace(cls(
            in_channels=3, base_channels=32, channel_mults=(1, 2, 2, 4), num_res_blocks=1, attention_levels=(3,),
            num_heads=1, norm_groups=8), **overrides)


PRESETS: dict[str, Callable[..., UNetConfig]] = {
    "small28": UNetConfig.small28, "small32": UNetConfig.small32, "small64": UNetConfig.small64,
    "ddpm_cifar10": UNetConfig.ddpm_cifar10, "ronneberger2015": UNetConfig.ronneberger2015}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class UNet(nn.Module):
    """A U-Net denoiser (Ronneberger et al. 2015; Ho et al. 2020): embed t (and y), go down while
    pushing skips, go through the middle, go up while joining skips, then project out.

    With padding="same" any H x W works: the input is padded inside to a multiple of 2^depth and the
    output cropped back, so the output always has the input's H x W. With padding="valid" the output
    is smaller (see `output_size`), as in the 2015 paper.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        self.out_channels = cfg.out_channels or cfg.in_channels
        self.factor = 2 ** cfg.depth                  # same padding: sides are padded to a multiple of this
        self.freq_channels = cfg.base_channels + cfg.base_channels % 2
        emb = cfg.emb_channels or 4 * cfg.base_channels
        self.emb_channels = emb if (cfg.time_conditional or cfg.num_classes) else None
        if cfg.time_conditional:   # Ho et al. 2020: sinusoid -> Linear -> act -> Linear
            self.time_mlp = nn.Sequential(nn.Linear(self.freq_channels, emb), make_activation(cfg.activation),
                                          nn.Linear(emb, emb))
        if cfg.num_classes:        # the extra last row is "no label", for classifier-free guidance
            self.class_embedding = nn.Embedding(cfg.num_classes + 1, emb)
        self.emb_activation = make_activation(cfg.activation)

        self.down, self.up, self.skip_projections = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.pushes: list[bool] = []   # down stage i pushes its output as a skip
        self.pops: list[bool] = []     # up stage i first joins the last skip
        (self._build_resnet if cfg.block == "resnet" else self._build_double_conv)()
        self._fitting_sizes: set[tuple[int, int]] = set()   # valid padding: input sizes already checked
        # channels_last weights and maps: oneDNN's convolutions work in NHWC, so NCHW costs a reorder
        # per convolution (12-14% of a CPU training step, fp32 and bf16). Inputs are converted in forward.
        self.to(memory_format=torch.channels_last)

    @classmethod
    def from_pretrained(cls, path, device: str | torch.device = "cpu") -> UNet:
        """The network alone from a run folder or a `.safetensors` file (config from the file; no arguments).

        Args:
            path: a run folder written by `diffunet train`, or a weights file saved by `save_model`.
            device: where to put the model.
        Returns:
            the UNet in eval mode (a run's EMA weights). `diffunet.load_run` also gives its schedule.
        """
        from .checkpoint import read_model  # here, so that the backbone imports only torch, einops and itself
        return read_model(path, cls.from_fields, device=device)[0]

    @classmethod
    def from_fields(cls, fields: dict) -> UNet:
        """An untrained UNet from a stored `UNetConfig.to_dict()` (fields it predates take their defaults)."""
        return cls(UNetConfig.from_dict(fields))

    # ---- construction: channel bookkeeping happens here, once ----
    def _block(self, in_channels: int, out_channels: int) -> nn.Module:
        cfg = self.config
        kind = ResBlock if cfg.block == "resnet" else DoubleConv
        return kind(in_channels, out_channels, emb_channels=self.emb_channels, norm_groups=cfg.norm_groups,
                    activation=cfg.activation, dropout=cfg.dropout, padding=int(cfg.padding == "same"),
                    scale_shift=cfg.time_injection == "scale_shift", zero_init=cfg.zero_init)

    def _attention(self, channels: int) -> Attention:
        cfg = self.config
        heads = channels // cfg.head_channels if cfg.head_channels else cfg.num_heads
        return Attention(channels, heads, norm_groups=cfg.norm_groups, zero_init=cfg.zero_init)

    def _stage(self, level: int, in_channels: int, out_channels: int) -> TimestepSequential:
        """A block, plus self-attention when `level` is in attention_levels."""
        attention = [self._attention(out_channels)] if level in self.config.attention_levels else []
        return TimestepSequential(self._block(in_channels, out_channels), *attention)

    def _add_down(self, stage: nn.Module, push: bool) -> None:
        self.down.append(stage if isinstance(stage, TimestepSequential) else TimestepSequential(stage))
        self.pushes.append(push)

    def _add_up(self, stage: nn.Module, skip_channels: int | None = None, channels: int = 0) -> None:
        """Append a decoder stage; with skip_channels, it first joins a skip onto `channels` channels."""
        self.up.append(stage if isinstance(stage, TimestepSequential) else TimestepSequential(stage))
        self.pops.append(skip_channels is not None)
        add_projection = self.config.skip == "add" and skip_channels not in (None, channels)
        self.skip_projections.append(nn.Conv2d(skip_channels, channels, 1) if add_projection else nn.Identity())

    def _joined(self, channels: int, skip_channels: int) -> int:
        """Channels after joining a skip: summed for concat, unchanged for add (skips are projected)."""
        return channels + skip_channels if self.config.skip == "concat" else channels

    def _build_resnet(self) -> None:
        """Ho et al. 2020 layout: skips after the input conv, every block and every downsampling."""
        cfg, widths, pad = self.config, self.config.widths, int(self.config.padding == "same")
        channels = widths[0]
        self._add_down(nn.Conv2d(cfg.in_channels + cfg.cond_channels, channels, 3, padding=pad), push=True)
        skips = [channels]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                self._add_down(self._stage(level, channels, width), push=True)
                channels = width
                skips.append(channels)
            if level < cfg.depth:
                self._add_down(Downsample(channels, cfg.downsample, padding=pad, exact=not pad), push=True)
                skips.append(channels)
        attention = [self._attention(channels)] if cfg.mid_attention else []
        self.middle = TimestepSequential(self._block(channels, channels), *attention, self._block(channels, channels))
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks + 1):
                skip = skips.pop()
                self._add_up(self._stage(level, self._joined(channels, skip), widths[level]), skip, channels)
                channels = widths[level]
            if level > 0:
                self._add_up(Upsample(channels, channels, cfg.upsample, padding=pad))
        self.output = TimestepSequential(make_norm(channels, cfg.norm_groups), make_activation(cfg.activation),
                                         nn.Conv2d(channels, self.out_channels, 3, padding=pad))
        if cfg.zero_init:
            zero_(self.output[-1])

    def _build_double_conv(self) -> None:
        """Ronneberger et al. 2015 layout: one skip per level, taken before pooling; the decoder first
        upsamples to the level's width (the "up-convolution"), then joins the skip."""
        cfg, widths, pad = self.config, self.config.widths, int(self.config.padding == "same")
        channels, skips = cfg.in_channels + cfg.cond_channels, []
        for level, width in enumerate(widths[:-1]):
            for i in range(cfg.num_res_blocks):
                self._add_down(self._stage(level, channels, width), push=i == cfg.num_res_blocks - 1)
                channels = width
            skips.append(channels)
            self._add_down(Downsample(channels, cfg.downsample, padding=pad, exact=not pad), push=False)
        attention = [self._attention(widths[-1])] if cfg.mid_attention else []
        self.middle = TimestepSequential(self._block(channels, widths[-1]), *attention,
                                         *[self._block(widths[-1], widths[-1]) for _ in range(cfg.num_res_blocks - 1)])
        channels = widths[-1]
        for level in reversed(range(cfg.depth)):
            self._add_up(Upsample(channels, widths[level], cfg.upsample, padding=pad))
            channels, skip = widths[level], skips.pop()
            self._add_up(self._stage(level, self._joined(channels, skip), channels), skip, channels)
            for _ in range(cfg.num_res_blocks - 1):
                self._add_up(self._stage(level, channels, channels))
        self.output = TimestepSequential(nn.Conv2d(channels, self.out_channels, 1))
        if cfg.zero_init:
            zero_(self.output[-1])

    # ---- forward ----
    def forward(self, x: Tensor, t: Tensor | float | None = None, y: Tensor | None = None,
                cond: Tensor | None = None) -> Tensor:
        """Predict from a noisy image (eps, x0 or v: the caller's choice of training target).

        Args:
            x: [B, in_channels, H, W] images (any memory format, e.g. channels_last).
            t: timesteps: a Python int or float, a 0-d tensor, or a [B] tensor (integer or fractional).
                Required when config.time_conditional, refused otherwise.
            y: None (no label for any image) or [B] integer labels in 0..num_classes-1, where -1 means
                "no label" for that image (classifier-free guidance). Only with config.num_classes.
                Labels on an accelerator or under torch.compile are not range-checked (no host syncs, no graph break).
            cond: [B, cond_channels, H, W] image concatenated to x; required when config.cond_channels > 0.
        Returns:
            [B, out_channels, H, W] for padding="same"; [B, out_channels, *output_size(H, W)] for "valid".
        """
        x = self._check_input(x, cond).contiguous(memory_format=torch.channels_last)
        emb = self._embedding(t, y, x.shape[0], x.device)
        height, width = x.shape[-2:]
        x, top, left = self._fit(x, height, width)

        h, skips = x, []
        for stage, pushes in zip(self.down, self.pushes):
            h = stage(h, emb)
            if pushes:
                skips.append(h)
        h = self.middle(h, emb)
        for stage, pops, projection in zip(self.up, self.pops, self.skip_projections):
            if pops:
                h = self._join(h, projection(skips.pop()))
            h = stage(h, emb)
        h = self.output(h, emb)
        h = h if self.config.padding == "valid" else h[..., top:top + height, left:left + width]
        return h.contiguous()                           # callers get the usual NCHW layout back

    def _join(self, h: Tensor, skip: Tensor) -> Tensor:
        """Concatenate or add an encoder map, centre-cropped to h's size for valid padding."""
        if skip.shape[-2:] != h.shape[-2:]:
            skip = valid.center_crop(skip, h.shape[-2], h.shape[-1])
        return torch.cat([h, skip], dim=1) if self.config.skip == "concat" else h + skip

    def _fit(self, x: Tensor, height: int, width: int) -> tuple[Tensor, int, int]:
        """Same padding: zero-pad to a multiple of 2^depth, centred. Valid: check the size fits."""
        if self.config.padding == "valid":
            if (height, width) not in self._fitting_sizes:
                self.output_size(height, width)
                self._fitting_sizes.add((height, width))
            return x, 0, 0
        pad_h, pad_w = -height % self.factor, -width % self.factor
        if pad_h == 0 and pad_w == 0:
            return x, 0, 0
        top, left = pad_h // 2, pad_w // 2
        return F.pad(x, (left, pad_w - left, top, pad_h - top)), top, left

    def _check_input(self, x: Tensor, cond: Tensor | None) -> Tensor:
        """Validate x and cond; returns x with cond concatenated on the channels."""
        cfg = self.config
        if not isinstance(x, Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a [B, C, H, W] tensor; got {shape}. For one image use x[None].")
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels but the model takes in_channels={cfg.in_channels}; "
                             f"convert the images or build the model with in_channels={x.shape[1]}")
        if cfg.cond_channels == 0:
            if cond is not None:
                raise ValueError("this model takes no cond image; drop cond or build with cond_channels=C")
            return x
        expected = (x.shape[0], cfg.cond_channels, *x.shape[-2:])
        if cond is None or tuple(cond.shape) != expected:
            got = "none" if cond is None else tuple(cond.shape)
            raise ValueError(f"cond must be a {list(expected)} tensor (cond_channels={cfg.cond_channels}, "
                             f"same B, H, W as x); got {got}")
        return torch.cat([x, cond.to(x.dtype)], dim=1)

    def _embedding(self, t, y, batch: int, device: torch.device) -> Tensor | None:
        """emb = act(MLP(sinusoid(t)) + class_embedding(y)), [B, emb_channels]; None for a plain U-Net."""
        cfg = self.config
        if not cfg.time_conditional and t is not None:
            raise ValueError("this model has time_conditional=False; call it without t")
        if cfg.num_classes is None and y is not None:
            raise ValueError("this model has no classes; drop y or build it with num_classes=N")
        if self.emb_channels is None:
            return None
        emb = 0
        if cfg.time_conditional:
            t = self._timesteps(t, batch, device)
            weight = self.time_mlp[0].weight
            emb = self.time_mlp(timestep_embedding(t, self.freq_channels).to(weight.dtype))
        if cfg.num_classes:
            emb = emb + self.class_embedding(self._labels(y, batch, device))
        return self.emb_activation(emb)

    def _timesteps(self, t, batch: int, device: torch.device) -> Tensor:
        """Any accepted form of t -> a [B] tensor on `device`."""
        if t is None:
            raise ValueError("this model is time-conditional: pass t (a number or a [B] tensor), "
                             "or build it with time_conditional=False")
        if not isinstance(t, Tensor):
            return torch.full((batch,), float(t), device=device)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
            raise ValueError(f"t must be a number, a 0-d tensor or a [B] = [{batch}] tensor; got shape {tuple(t.shape)}")
        return t.to(device).reshape(-1).expand(batch)

    def _labels(self, y, batch: int, device: torch.device) -> Tensor:
        """y (None, int or [B], -1 = no label) -> [B] row indices into class_embedding."""
        null = self.config.num_classes
        if y is None:
            return torch.full((batch,), null, device=device, dtype=torch.long)
        y = torch.as_tensor(y, device=device)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"y must hold integer class labels; got dtype {y.dtype}. Use y.long()")
        if y.ndim > 1 or (y.ndim == 1 and y.shape[0] != batch):
            raise ValueError(f"y must be an integer or a [B] = [{batch}] tensor; got shape {tuple(y.shape)}")
        checkable = y.device.type == "cpu" and not torch.compiler.is_compiling()   # compiling: no graph break
        if checkable and y.numel() and (int(y.min()) < -1 or int(y.max()) >= null):
            raise ValueError(f"labels must lie in 0..{null - 1} (or -1 for no label); got values "
                             f"{int(y.min())}..{int(y.max())}. Check num_classes={null}")
        return torch.where(y < 0, null, y).long().reshape(-1).expand(batch)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Output H, W for an input of height x width (integer arithmetic only; no tensors).

        Raises ValueError, naming the nearest sizes that fit, when a valid-padding model cannot take it.
        """
        if self.config.padding == "same":
            return height, width
        return valid.output_size(self, height, width)
