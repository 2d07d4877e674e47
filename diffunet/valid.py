"""Valid padding (Ronneberger et al. 2015, sec. 2 and fig. 2): every unpadded 3x3 convolution takes
two pixels off a side, so an encoder map is centre-cropped to the decoder's size before they join,
and only some input sizes fit (every 2x2 max-pool must get an even side).

Sizes are worked out in integer arithmetic, without running a convolution: `out_size` for one layer
(blocks with a shape of their own answer through their `out_size` method), `output_size` for a whole
U-Net, with an error that names the nearest input sides that fit. Imports only torch.
"""
from __future__ import annotations

from torch import Tensor, nn


def center_crop(x: Tensor, height: int, width: int) -> Tensor:
    """The central height x width window of x (a view). [..., H, W] -> [..., height, width]."""
    top, left = (x.shape[-2] - height) // 2, (x.shape[-1] - width) // 2
    return x[..., top:top + height, left:left + width]


def out_size(module: nn.Module, size: int) -> int:
    """Side length after `module` for an input side of `size`; ValueError if the map would vanish."""
    if isinstance(module, nn.Sequential):
        for layer in module:
            size = out_size(layer, size)
        return size
    if isinstance(module, nn.Conv2d):
        kernel, stride, pad = module.kernel_size[0], module.stride[0], module.padding[0]
        if size + 2 * pad < kernel:
            raise ValueError(f"a {kernel}x{kernel} convolution gets a side of {size} pixels")
        return (size + 2 * pad - kernel) // stride + 1
    if hasattr(module, "out_size"):
        return module.out_size(size)
    return size  # norms, activations, attention, identity


def output_size(unet: nn.Module, height: int, width: int) -> tuple[int, int]:
    """Output H, W of a valid-padding diffunet UNet for an input of height x width (no tensors).

    Raises ValueError, naming the nearest sizes that fit, when the model cannot take it.
    """
    return _fitting_side(unet, height, "H"), _fitting_side(unet, width, "W")


def _side(unet: nn.Module, size: int) -> int:
    """Walk one side length through unet.down, .middle, .up and .output exactly as UNet.forward does,
    taking a skip's size where it pushes one and checking it where it pops one."""
    skips = []
    for stage, pushes in zip(unet.down, unet.pushes):
        size = out_size(stage, size)
        if pushes:
            skips.append(size)
    size = out_size(unet.middle, size)
    for stage, pops in zip(unet.up, unet.pops):
        if pops and skips.pop() < size:
            raise ValueError(f"a skip is smaller than the decoder's {size}-pixel map")
        size = out_size(stage, size)
    return out_size(unet.output, size)


def _fitting_side(unet: nn.Module, size: int, name: str) -> int:
    """_side, or a ValueError that names the nearest sides below and above `size` that fit."""
    try:
        return _side(unet, size)
    except ValueError as error:
        reason = error
    lower = next((s for s in range(size - 1, 0, -1) if _fits(unet, s)), None)
    upper = next((s for s in range(size + 1, size + 64 * unet.factor) if _fits(unet, s)), None)
    nearest = " or ".join(str(s) for s in (lower, upper) if s is not None)
    raise ValueError(f"with padding='valid' the input {name}={size} does not fit ({reason}); "
                     f"the nearest sides that fit are {nearest}. Crop or pad the input, or use padding='same'")


def _fits(unet: nn.Module, size: int) -> bool:
    try:
        _side(unet, size)
        return True
    except ValueError:
        return False


def input_size_for(unet: nn.Module, size: int) -> int:
    """The smallest input side that fits `unet` and gives an output side of at least `size` (the tile an
    overlap-tile strategy feeds the network, Ronneberger et al. 2015, fig. 2). Integer arithmetic only."""
    if size < 1:
        raise ValueError(f"an image side must be at least 1 pixel; got {size}")
    for side in range(size, size + 64 * unet.factor + 1024):  # the margin of any U-Net here is far below this
        if _fits(unet, side) and _side(unet, side) >= size:
            return side
    raise ValueError(f"no input side up to {size + 64 * unet.factor + 1024} gives a {size}-pixel output; "
                     f"use fewer levels (--model-channel-mults) or padding='same'")
