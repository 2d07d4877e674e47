"""The U-Net's building blocks, smallest first: timestep embedding, residual and double-conv blocks,
self-attention, down- and upsampling.

Every block can also say how long a side it outputs (`out_size`), in integer arithmetic, so the
U-Net can check an input size for valid padding without running a single convolution (valid.py).
GroupNorm and `norm_act` (norm, FiLM, activation) come from kernels.py, which holds their fused CPU
path. Imports only torch, einops and those two files, so the backbone can be lifted into other code.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .kernels import GroupNorm, norm_act
from .valid import center_crop, out_size


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of integer or fractional timesteps (Vaswani et al. 2017, sec. 3.5):
    [sin(t * f_k), cos(t * f_k)] with f_k = max_period^(-k / half), k = 0 ... half - 1. [B] -> [B, dim]."""
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    angles = t.float()[:, None] * torch.exp(k * (-math.log(max_period) / half))[None, :]  # [B, half]
    return F.pad(torch.cat([angles.sin(), angles.cos()], dim=1), (0, dim - 2 * half))  # odd dim: a zero column


def make_norm(channels: int, groups: int) -> nn.Module:
    """GroupNorm (Wu & He 2018) with `groups` groups, or nothing when groups == 0."""
    return GroupNorm(groups, channels) if groups else nn.Identity()


def make_activation(name: str) -> nn.Module:
    """"silu" (x * sigmoid(x), Ho et al. 2020) or "relu" (Ronneberger et al. 2015)."""
    return {"silu": nn.SiLU, "relu": nn.ReLU}[name]()


def zero_(module: nn.Module) -> nn.Module:
    """Set a layer's weight and bias to zero, so its branch starts as the identity; returns it."""
    nn.init.zeros_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


class TimestepBlock(nn.Module):
    """A block that takes the time/label embedding: forward(x, emb), with emb None when there is none."""

    def forward(self, x: Tensor, emb: Tensor | None) -> Tensor:
        raise NotImplementedError


class TimestepSequential(nn.Sequential):
    """nn.Sequential that hands `emb` to the layers that are TimestepBlocks."""

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class ResBlock(TimestepBlock):
    """Residual block (He et al. 2016; Ho et al. 2020, app. B) with the embedding injected after the
    second GroupNorm, either as FiLM (Perez et al. 2018): h = norm2(h) * (1 + scale) + shift,
    or added before it as in Ho et al. 2020: h = norm2(h + proj(emb)).

    x -> norm1 -> act -> conv1 -> norm2 (+ emb) -> act -> dropout -> conv2, plus the skip of x.
    conv2 starts at zero when zero_init, so the block starts as the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, *, emb_channels: int | None, norm_groups: int,
                 activation: str, dropout: float, padding: int, scale_shift: bool, zero_init: bool):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = make_norm(in_channels, norm_groups)
        self.act = make_activation(activation)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=padding)
        projected = 2 * out_channels if scale_shift else out_channels
        self.emb_proj = nn.Linear(emb_channels, projected) if emb_channels else None
        self.norm2 = make_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=padding)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        if zero_init:
            zero_(self.conv2)

    def forward(self, x: Tensor, emb: Tensor | None) -> Tensor:
        h = self.conv1(norm_act(self.norm1, self.act, x))                # [B, C_out, H', W']
        if self.emb_proj is None:
            h = norm_act(self.norm2, self.act, h)
        elif self.scale_shift:
            scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
            h = norm_act(self.norm2, self.act, h, scale, shift)          # FiLM from the timestep
        else:
            h = norm_act(self.norm2, self.act, h + self.emb_proj(emb)[:, :, None, None])
        h = self.conv2(self.dropout(h))                                  # conv2 starts at zero
        if h.shape[-2:] != x.shape[-2:]:                                 # valid padding: crop the skip
            x = center_crop(x, h.shape[-2], h.shape[-1])
        return self.skip(x) + h

    def out_size(self, size: int) -> int:
        return out_size(self.conv2, out_size(self.conv1, size))


class DoubleConv(TimestepBlock):
    """Two 3x3 convolutions, each followed by (GroupNorm and) the activation, as in Ronneberger et al.
    2015, fig. 1: conv1 -> norm1 -> act -> dropout -> conv2 -> norm2 (FiLM) -> act. No residual path."""

    def __init__(self, in_channels: int, out_channels: int, *, emb_channels: int | None, norm_groups: int,
                 activation: str, dropout: float, padding: int, scale_shift: bool, zero_init: bool):
        super().__init__()
        self.scale_shift = scale_shift
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=padding)
        self.norm1 = make_norm(out_channels, norm_groups)
        self.act = make_activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=padding)
        projected = 2 * out_channels if scale_shift else out_channels
        self.emb_proj = nn.Linear(emb_channels, projected) if emb_channels else None
        self.norm2 = make_norm(out_channels, norm_groups)

    def forward(self, x: Tensor, emb: Tensor | None) -> Tensor:
        h = self.conv2(self.dropout(self.act(self.norm1(self.conv1(x)))))  # [B, C_out, H', W']
        if self.emb_proj is None:
            h = self.norm2(h)
        elif self.scale_shift:
            scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift                        # FiLM from the timestep
        else:
            h = self.norm2(h + self.emb_proj(emb)[:, :, None, None])
        return self.act(h)

    def out_size(self, size: int) -> int:
        return out_size(self.conv2, out_size(self.conv1, size))


class Attention(nn.Module):
    """Residual multi-head self-attention over the H*W positions (Vaswani et al. 2017, eq. 1):
    x + proj(softmax(q k^T / sqrt(d)) v), with q, k, v linear in GroupNorm(x). proj starts at zero
    when zero_init. On CPU, maps of up to 64 positions (8x8) use the plain formula in float32, also
    under autocast (which is switched off for it; the result is cast back to v's dtype): with bf16
    inputs its forward + backward is still ~3x faster there than F.scaled_dot_product_attention's
    (3.9 against 11 ms for [64, 1, 49, 64], one thread); larger maps and GPUs use
    F.scaled_dot_product_attention (flash / memory-efficient kernels, in the autocast dtype)."""

    def __init__(self, channels: int, num_heads: int, *, norm_groups: int, zero_init: bool):
        super().__init__()
        self.num_heads = num_heads
        self.norm = make_norm(channels, norm_groups)
        self.qkv = nn.Linear(channels, 3 * channels)   # a 1x1 conv over tokens (same parameters)
        self.proj = nn.Linear(channels, channels)
        if zero_init:
            zero_(self.proj)

    def forward(self, x: Tensor) -> Tensor:
        height = x.shape[-2]
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")       # a view for channels_last x
        q, k, v = rearrange(self.qkv(tokens), "b n (three heads d) -> three b heads n d",
                            three=3, heads=self.num_heads)
        if x.device.type == "cpu" and q.shape[-2] <= 64:
            with torch.autocast(device_type="cpu", enabled=False):     # else autocast runs the matmuls in bf16
                logits = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5  # [B, heads, H*W, H*W]
                out = (logits.softmax(dim=-1) @ v.float()).to(v.dtype)  # [B, heads, H*W, d]
        else:
            out = F.scaled_dot_product_attention(q, k, v)                # [B, heads, H*W, d]
        out = self.proj(rearrange(out, "b heads n d -> b n (heads d)"))
        return x + rearrange(out, "b (h w) c -> b c h w", h=height)


class Downsample(nn.Module):
    """Halve H and W: a 3x3 stride-2 convolution ("conv", Ho et al. 2020) or 2x2 max-pooling
    ("maxpool", Ronneberger et al. 2015). With valid padding, `exact` refuses sides it would truncate."""

    def __init__(self, channels: int, kind: str, *, padding: int, exact: bool):
        super().__init__()
        self.exact = exact
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=padding) if kind == "conv" else nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)

    def out_size(self, size: int) -> int:
        if isinstance(self.op, nn.MaxPool2d):
            if size < 2 or (self.exact and size % 2):
                raise ValueError(f"a 2x2 max-pool gets a side of {size} pixels (it needs an even side)")
            return size // 2
        if self.exact and (size + 2 * self.op.padding[0] - 3) % 2:
            raise ValueError(f"a 3x3 stride-2 convolution would drop the last pixel of a {size}-pixel side")
        return out_size(self.op, size)


class Upsample(nn.Module):
    """Double H and W: "nearest" or "bilinear" interpolation followed by a 3x3 convolution, or a 2x2
    stride-2 transposed convolution ("transposed", the up-convolution of Ronneberger et al. 2015).

    Bilinear uses the half-pixel mapping (align_corners=False): x_src = (x_dst + 0.5) * (W_src / W_dst) - 0.5,
    clamped to the image.
    """

    def __init__(self, in_channels: int, out_channels: int, kind: str, *, padding: int):
        super().__init__()
        self.kind = kind
        if kind == "transposed":
            self.conv = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "transposed":
            return self.conv(x)
        if self.kind == "bilinear":
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    def out_size(self, size: int) -> int:
        return 2 * size if self.kind == "transposed" else out_size(self.conv, 2 * size)
