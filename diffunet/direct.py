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
condition alone. The cross-entropy may be weighted per pixel by the paper's weight map (sec. 3, eq. 2;
`TrainConfig.border_weight` = w0, off by default): class balance plus a border term that is large in the
thin gaps between touching objects, so the network learns to keep them apart (`weight_map`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import valid
from .errors import UserError
from .unet import PRESETS, UNet, UNetConfig

OBJECTIVES = ("diffusion", "direct")  # TrainConfig.objective
BORDER_SIGMA = 5.0                    # sigma of the weight map's border term, pixels (Ronneberger et al. 2015, sec. 3)
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


def direct_loss(forward, unet: UNet, cond: Tensor, target: Tensor, border_weight: float = 0.0) -> Tensor:
    """Per-example loss [B] of the network mapping cond [B, Cc, H, W] to target [B, C, H, W] (both in [-1, 1]).

    Args:
        forward: the callable to run: the UNet itself, or its DDP / compiled wrapper.
        unet: the UNet behind it, whose padding and size arithmetic apply.
        border_weight: w0 of the 2015 weight map (`weight_map`; the paper's 10) weighting the cross-entropy
            pixel by pixel; 0 = unweighted. Refused (UserError) for an MSE target.
    Returns:
        the mean squared error, or the (weighted) cross-entropy over the classes averaged over the pixels
        (Ronneberger et al. 2015, eq. 1, per pixel), per example.
    """
    height, width = target.shape[-2:]
    out = crop_output(forward(overlap_tile_pad(cond, unet)), height, width)      # [B, K, H, W]
    if loss_kind(out.shape[1], target.shape[1]) == "mse":
        if border_weight > 0:
            raise UserError("border_weight (--border-weight) weights a cross-entropy over mask classes; this run's "
                            "targets are images (mean squared error): drop --border-weight")
        return (out.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
    classes = target_classes(target, out.shape[1])                                 # [B, H, W]
    loss = F.cross_entropy(out.float(), classes, reduction="none")                 # [B, H, W]
    if border_weight > 0:
        loss = loss * weight_map(classes, out.shape[1], border_weight)
    return loss.mean(dim=(1, 2))


# ---- the 2015 weight map (sec. 3, eq. 2) ------------------------------------------------------

@torch.no_grad()
def weight_map(classes: Tensor, num_classes: int, border_weight: float = 10.0, sigma: float = BORDER_SIGMA) -> Tensor:
    """The loss weights of Ronneberger et al. 2015 (sec. 3, eq. 2) for class maps [B, H, W] (0 = background):

        w(x) = w_c(x) + w0 exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

    w_c balances the class frequencies within each image: H W / (K' n_k) for a pixel of class k, with n_k the
    pixels of class k and K' the classes present, so every class present carries the same total weight and
    w_c averages 1. d1 and d2 are the Euclidean distances (pixels) to the nearest and the second-nearest
    object, an object being a 4-connected region of one foreground class (`connected_components`); a pixel
    of an object is at distance 0 from it. With fewer than two objects the border term is 0.

    Args:
        border_weight: w0 (the paper's 10); sigma: in pixels (the paper's "approximately 5").
    Returns:
        float32 [B, H, W].
    """
    with torch.autocast(classes.device.type, enabled=False):   # distances in float32 even in a bf16 step
        return _weight_map(classes, num_classes, border_weight, sigma)


def _weight_map(classes: Tensor, num_classes: int, border_weight: float, sigma: float) -> Tensor:
    """weight_map's arithmetic, [B, H, W] long -> [B, H, W] float32."""
    batch, height, width = classes.shape
    counts = F.one_hot(classes, num_classes).flatten(1, 2).sum(1)                   # [B, K] pixels per class
    present = (counts > 0).sum(1, keepdim=True)                                      # [B, 1] K'
    balance = height * width / (present * counts.clamp(min=1)).float()              # [B, K]
    w_c = balance.gather(1, classes.flatten(1)).reshape(batch, height, width)       # [B, H, W]
    d1, d2 = object_distances(connected_components(classes))
    return w_c + border_weight * torch.exp(-(d1 + d2) ** 2 / (2 * sigma ** 2))      # exp(-inf) = 0: < 2 objects


def connected_components(classes: Tensor) -> Tensor:
    """[B, H, W] class maps -> [B, H, W] long object ids: 0 on the background (class 0), else one id per
    4-connected region of one class, unique across the batch (each pixel takes the largest id among its
    same-class neighbours until nothing changes)."""
    ids = torch.arange(1, classes.numel() + 1, device=classes.device).reshape(classes.shape)
    labels = torch.where(classes > 0, ids, torch.zeros_like(ids))
    while True:
        spread = labels.clone()
        for here, there in _neighbour_slices():
            same = (classes[here] == classes[there]) & (classes[here] > 0)
            spread[here] = torch.maximum(spread[here], torch.where(same, labels[there], 0))
        if torch.equal(spread, labels):
            return labels
        labels = spread


def object_distances(objects: Tensor, chunk: int = 1 << 22) -> tuple[Tensor, Tensor]:
    """(d1, d2) float32 [B, H, W]: each pixel's Euclidean distance to its nearest and second-nearest object in
    the object ids [B, H, W] (0 = none); inf where there are fewer objects. The nearest pixel of an object
    to a pixel outside it lies on its boundary, so only boundary pixels are measured, `chunk` distances at
    a time."""
    batch, height, width = objects.shape
    boundary = torch.zeros_like(objects, dtype=torch.bool)
    for here, there in _neighbour_slices():
        boundary[here] |= objects[here] != objects[there]
    boundary &= objects > 0
    rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    grid = torch.stack([rows, columns], -1).reshape(-1, 2).float().to(objects.device)    # [H W, 2]
    d1 = torch.full((batch, height * width), math.inf, device=objects.device)
    d2 = d1.clone()
    for b in range(batch):
        ids = objects[b].unique()
        ids = ids[ids > 0]                                                          # this image's objects
        if len(ids) == 0:
            continue
        points = boundary[b].nonzero().float()                                      # [P, 2]
        owner = torch.searchsorted(ids, objects[b][boundary[b]])                    # [P] index into ids
        distance = torch.full((height * width, len(ids)), math.inf, device=objects.device)
        step = max(1, chunk // max(1, len(points)))
        for start in range(0, height * width, step):
            part = torch.cdist(grid[start:start + step], points)                    # [step, P]
            distance[start:start + step].scatter_reduce_(1, owner.expand(len(part), -1), part, "amin")
        inside = objects[b].flatten() > 0
        own = torch.searchsorted(ids, objects[b].flatten()[inside])
        distance[inside.nonzero()[:, 0], own] = 0                                    # in an object: 0 from it
        nearest = distance.topk(min(2, len(ids)), dim=1, largest=False).values      # [H W, 1 or 2] ascending
        d1[b] = nearest[:, 0]
        if len(ids) > 1:
            d2[b] = nearest[:, 1]
    return d1.reshape(batch, height, width), d2.reshape(batch, height, width)


def _neighbour_slices():
    """(here, there) index pairs into [B, H, W] that pair every pixel with its up, down, left and right neighbour."""
    every = slice(None)
    return [((every, slice(1, None), every), (every, slice(None, -1), every)),
            ((every, slice(None, -1), every), (every, slice(1, None), every)),
            ((every, every, slice(1, None)), (every, every, slice(None, -1))),
            ((every, every, slice(None, -1)), (every, every, slice(1, None)))]


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
