"""Direct training (`--objective direct`): the network maps the condition image straight to the target,
with no diffusion, as the 2015 U-Net was trained (Ronneberger et al. 2015, "U-Net: Convolutional Networks
for Biomedical Image Segmentation").

    loss = per-pixel loss(model(overlap_tile_pad(cond)) cropped to H x W, target)

Overlap-tile (sec. 2, fig. 2): a valid-padding network's output is smaller than its input, so the input
border is mirror-extrapolated until the valid output covers the whole H x W image; the output is then
centre-cropped to exactly H x W, pixel-aligned with the image. Any input size works: it is padded to the
nearest side that fits the poolings (`valid.input_size_for`). A same-padding network needs no padding.
The mirror is torch's "reflect" (about the edge pixel, which is not repeated), but a border wider than the
image (the 2015 network's margin on a 28x28 digit is 44 pixels and more) folds back again and again, as
repeated reflections; `F.pad(mode="reflect")` would refuse it. A 1-pixel side is repeated.

The per-pixel loss follows from the network's output channels K and the target's channels C:

    K == C            mean squared error on the image target, in [-1, 1] (restoration)
    K >= 2, C == 1    cross-entropy over K classes (sec. 3: a pixel-wise soft-max, then cross-entropy),
                      the target's gray level v in 0..255 being class round(v * (K - 1) / 255): a mask
                      saved as 0 / 255 is background 0 / foreground 1 for the 2015 preset's K = 2

anything else is refused with the flag to change. Labels are not used: the output is a function of the
condition alone. The paper's border-weight map (sec. 3, eq. 2) is not used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import valid
from .errors import UserError
from .unet import PRESETS, UNet, UNetConfig

OBJECTIVES = ("diffusion", "direct")  # TrainConfig.objective
PRESET = "ronneberger2015"            # what --preset auto means for a direct run
_TILE_SIDES: dict[tuple[UNetConfig, int], tuple[int, int]] = {}  # (config, side) -> (input side, output side)


def loss_kind(out_channels: int, target_channels: int) -> str:
    """"mse" or "cross_entropy" for a network with `out_channels` outputs and a target with `target_channels`."""
    if out_channels == target_channels:
        return "mse"
    if target_channels == 1 and out_channels >= 2:
        return "cross_entropy"
    raise UserError(f"a direct run maps to {target_channels}-channel targets, but the network has {out_channels} "
                    f"output channels: set --model-out-channels {target_channels} (mean squared error), or give "
                    f"1-channel mask targets (cross-entropy over the output channels' classes)")


def _tile_sides(unet: UNet, size: int) -> tuple[int, int]:
    """(input side, valid output side) of the tile that covers an image side of `size`; cached per config."""
    key = (unet.config, size)
    if key not in _TILE_SIDES:
        side = valid.input_size_for(unet, size)
        _TILE_SIDES[key] = side, valid.output_size(unet, side, side)[0]
    return _TILE_SIDES[key]


def mirror_indices(size: int, before: int, after: int, device=None) -> Tensor:
    """[before + size + after] source indices of a side mirrored about its edge pixels, as torch's reflect
    mode but for any width: the pattern ... 2 1 | 0 1 2 ... n-1 | n-2 n-3 ... repeats with period 2(n - 1),
    so the border may be wider than the image. A 1-pixel side has nothing to mirror and is repeated."""
    positions = torch.arange(-before, size + after, device=device)
    if size == 1:
        return torch.zeros_like(positions)
    period = 2 * (size - 1)
    folded = positions.remainder(period)
    return torch.where(folded < size, folded, period - folded)


def overlap_tile_pad(x: Tensor, unet: UNet) -> Tensor:
    """Mirror-extrapolate x's border (Ronneberger et al. 2015, fig. 2) so that `unet`'s output, centre-cropped
    to x's H x W (`crop_output`), covers x pixel for pixel. [B, C, H, W] -> [B, C, H', W'], H' >= H.

    The output of a valid-padding U-Net sees the input's central (H' - O) / 2 margin removed on each side; the
    image is placed so that the output's central H x W window falls on it. Same padding: x unchanged.
    """
    if unet.config.padding == "same":
        return x
    for axis in (-2, -1):
        size = x.shape[axis]
        tile, out = _tile_sides(unet, size)
        before = (tile - out) // 2 + (out - size) // 2   # the valid margin, then the output's own centring
        x = x.index_select(axis, mirror_indices(size, before, tile - size - before, x.device))
    return x


def crop_output(out: Tensor, height: int, width: int) -> Tensor:
    """The network's output on an overlap-tile input, cropped to the image's height x width."""
    return valid.center_crop(out, height, width)


def direct_loss(forward, unet: UNet, cond: Tensor, target: Tensor) -> Tensor:
    """Per-example loss [B] of the network mapping cond [B, Cc, H, W] to target [B, C, H, W] (both in [-1, 1]).

    Args:
        forward: the callable to run: the UNet itself, or its DDP / compiled wrapper.
        unet: the UNet behind it, whose padding and size arithmetic apply.
    Returns:
        the mean squared error, or the cross-entropy over the classes (see the module docstring), per example.
    """
    height, width = target.shape[-2:]
    out = crop_output(forward(overlap_tile_pad(cond, unet)), height, width)      # [B, K, H, W]
    if loss_kind(out.shape[1], target.shape[1]) == "mse":
        return (out.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
    classes = target_classes(target, out.shape[1])                                 # [B, H, W]
    return F.cross_entropy(out.float(), classes, reduction="none").mean(dim=(1, 2))


def target_classes(target: Tensor, num_classes: int) -> Tensor:
    """[B, 1, H, W] in [-1, 1] -> [B, H, W] long: gray level v in 0..255 is class round(v (K - 1) / 255)."""
    return ((target[:, 0].float() + 1) / 2 * (num_classes - 1)).round().clamp(0, num_classes - 1).long()


@torch.no_grad()
def predict(unet: UNet, cond: Tensor, target_channels: int, batch_size: int = 64) -> Tensor:
    """The direct output for cond [N, Cc, H, W]: [N, target_channels, H, W] float on the CPU in [-1, 1]. An MSE
    network gives its image (clamped); a cross-entropy one the arg-max class k as the gray level -1 + 2k / (K - 1)."""
    device, outputs = next(unet.parameters()).device, []
    for start in range(0, len(cond), batch_size):
        batch = cond[start:start + batch_size].to(device).float()
        out = crop_output(unet(overlap_tile_pad(batch, unet)), *batch.shape[-2:]).float()   # [b, K, H, W]
        if loss_kind(out.shape[1], target_channels) == "cross_entropy":
            out = out.argmax(dim=1, keepdim=True).float() * (2 / (out.shape[1] - 1)) - 1
        outputs.append(out.clamp(-1, 1).cpu())
    return torch.cat(outputs)


def model_config(preset: str, target_channels: int, cond_channels: int, overrides: dict | None = None) -> UNetConfig:
    """The network of a direct run: `preset` (auto = ronneberger2015) taking the condition as its input
    (in_channels = cond_channels, no cond, no time, no labels), with `target_channels` outputs unless the
    preset has its own (the 2015 preset's 2 classes), then the user's --model-* overrides."""
    preset = PRESET if preset == "auto" else preset
    out_channels = PRESETS[preset]().out_channels or target_channels
    fields = {"in_channels": cond_channels, "out_channels": out_channels, "cond_channels": 0,
              "time_conditional": False, "num_classes": None, **(overrides or {})}
    config = PRESETS[preset](**fields)
    if (config.in_channels, config.cond_channels, config.time_conditional, config.num_classes) != \
            (cond_channels, 0, False, None):
        raise UserError(f"a direct run's network takes the {cond_channels}-channel condition as its input, without "
                        f"time or labels; drop --model-in-channels, --model-cond-channels, "
                        f"--model-time-conditional and --model-num-classes")
    loss_kind(config.out_channels or config.in_channels, target_channels)
    return config
