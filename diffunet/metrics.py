"""Per-image quality of an image-to-image output against its ground truth: PSNR and SSIM for images, pixel
accuracy, IoU and Dice for class masks. Used by `diffunet eval` on task runs and by the benchmarks.

    PSNR      10 log10(1 / MSE) on pixels in [0, 1]
    SSIM      Wang et al. 2004 ("Image Quality Assessment: From Error Visibility to Structural Similarity",
              eq. 13) under their 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, over the valid part
              of the window, averaged over positions and channels
    IoU       |P n T| / |P u T| of a foreground class over all pixels of all images (Jaccard index)
    Dice      2 |P n T| / (|P| + |T|) per image (Dice 1945), averaged over images; an empty prediction of an
              empty truth counts 1

Imports only torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """[N] PSNR in dB of uint8 [N, C, H, W] images against references: 10 log10(1 / MSE), pixels in [0, 1]
    (an exact match is capped at 100 dB)."""
    mse = ((a.double() - b.double()) / 255).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1 / mse.clamp(min=1e-10))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    """[size, size] Gaussian weights summing to 1 (Wang et al. 2004, Sec. III-C: 11x11, sigma 1.5)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return torch.outer(g, g) / g.sum() ** 2


def ssim(a: Tensor, b: Tensor, size: int = 11, sigma: float = 1.5) -> Tensor:
    """[N] mean SSIM (Wang et al. 2004, eq. 13) of uint8 [N, C, H, W] images, L = 1, K1 = 0.01, K2 = 0.03:
    SSIM = (2 mu_a mu_b + C1)(2 sigma_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(sigma_a^2 + sigma_b^2 + C2)),
    local statistics under the Gaussian window (valid positions only), averaged over positions and channels.
    Images smaller than the window are refused (ValueError)."""
    if min(a.shape[-2:]) < size:
        raise ValueError(f"SSIM's {size}x{size} window needs images of at least {size}x{size}; got "
                         f"{a.shape[-1]}x{a.shape[-2]}")
    x, y = a.double() / 255, b.double() / 255
    channels = x.shape[1]
    window = gaussian_window(size, sigma)[None, None].expand(channels, 1, size, size)

    def local_mean(z: Tensor) -> Tensor:
        return F.conv2d(z, window, groups=channels)                                # [N, C, H - size + 1, ...]
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x, var_y = local_mean(x * x) - mu_x ** 2, local_mean(y * y) - mu_y ** 2
    cov = local_mean(x * y) - mu_x * mu_y
    score = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return score.flatten(1).mean(dim=1)


def segmentation_scores(predicted: Tensor, truth: Tensor, num_classes: int = 2) -> dict:
    """Pixel accuracy, IoU and Dice of integer class maps [N, H, W] (class 0 = background).

    IoU is each foreground class's intersection over union over all pixels, Dice its mean per-image
    2|P n T| / (|P| + |T|) (1 where both are empty); "iou" and "dice" are their means over the classes
    1 .. num_classes - 1, so for two classes they are the foreground's own.
    Returns:
        {"accuracy", "iou", "dice", "iou_per_class", "dice_per_class"}: floats, lists of floats.
    """
    if predicted.shape != truth.shape or predicted.dim() != 3:
        raise ValueError(f"segmentation_scores needs two class maps [N, H, W] of one shape; got "
                         f"{tuple(predicted.shape)} and {tuple(truth.shape)}")
    ious, dices = [], []
    for k in range(1, num_classes):
        mine, theirs = (predicted == k).flatten(1), (truth == k).flatten(1)           # [N, H W] bool
        both = (mine & theirs).sum(1).double()                                          # [N]
        sizes = (mine.sum(1) + theirs.sum(1)).double()                                  # [N] |P| + |T|
        union = (sizes.sum() - both.sum()).item()
        ious.append(both.sum().item() / union if union > 0 else 1.0)
        dices.append(torch.where(sizes > 0, 2 * both / sizes.clamp(min=1), torch.ones_like(sizes)).mean().item())
    return {"accuracy": (predicted == truth).double().mean().item(), "iou": sum(ious) / len(ious),
            "dice": sum(dices) / len(dices), "iou_per_class": ious, "dice_per_class": dices}
