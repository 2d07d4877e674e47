"""Image-to-image tasks: conditional denoisers trained on paired images (SR3 / Palette style).

SR3 (Saharia et al. 2021, "Image Super-Resolution via Iterative Refinement", Sec. 2.1) and Palette
(Saharia et al. 2022, "Palette: Image-to-Image Diffusion Models", Sec. 3) train the usual denoising
loss with a condition image y concatenated to x_t on the channels: the network is f(concat(x_t, y), t).
Our U-Net takes that concatenation through `UNetConfig.cond_channels`; this module says what y is:

    superres:F  y = the image shrunk F times (area average) and brought back to size (nearest)
    inpaint     y = [image * keep, keep], keep = 1 where a random mask keeps the pixel, 0 = fill in
    colorize    y = the luma 0.299 R + 0.587 G + 0.114 B of a colour image (ITU-R 601)
    pairs       y = the user's own aligned input image (`--data-cond PATH`)

The first three are derived on the fly from any dataset `load_data` reads. The samplers stay
model-agnostic: `with_condition(model, y)` closes over y, so they see a plain `model(x_t, t)`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import ImageData, load_data
from .errors import UserError
from .images import to_model_range
from .pairs import load_pairs

KINDS = ("none", "superres", "inpaint", "colorize", "pairs")
TASK_HINT = "task (--task) must be none, superres:F (F an integer >= 2, e.g. superres:4), inpaint or colorize"
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, as data.py's RGB -> gray and Pillow's convert("L")
MASK_CELL = 4                 # inpaint masks that drop patches drop MASK_CELL x MASK_CELL cells


@dataclass(frozen=True)
class Task:
    """What the condition image of a run is; stored in its config.json under "task"."""
    kind: str = "none"       # none | superres | inpaint | colorize | pairs (see the module docstring)
    factor: int = 1          # superres: how many times each side is shrunk (4: 28x28 -> 7x7)
    cond_channels: int = 0   # channels of the condition concatenated to x_t (0 for none)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"{TASK_HINT}; got {self.kind!r}")
        if (self.kind == "superres") != (self.factor != 1) or self.factor < 1:
            raise ValueError(f"{TASK_HINT}; got kind {self.kind!r} with factor {self.factor}")

    @property
    def name(self) -> str:
        """The --task spelling: superres:4, inpaint, ..."""
        return f"superres:{self.factor}" if self.kind == "superres" else self.kind

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> Task:
        """From `to_dict()` output; missing keys take their defaults (a run that predates tasks: none)."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in (data or {}).items() if key in known})


def parse_task(text: str, data_cond: str | None = None) -> Task:
    """`--task` (and `--data-cond`) -> an unbound Task (cond_channels is set by `bind`). ValueError names the fix."""
    if data_cond:
        if text != "none":
            raise ValueError(f"data_cond (--data-cond) trains on your own pairs, so task (--task) {text} cannot be "
                             f"used with it; drop one of them")
        return Task("pairs")
    kind, _, option = str(text).partition(":")
    if kind == "superres":
        if not option.isdigit() or int(option) < 2:
            raise ValueError(f"{TASK_HINT}; got {text!r}")
        return Task("superres", int(option))
    if kind in ("none", "inpaint", "colorize") and not option and ":" not in text:
        return Task(kind)
    if kind == "pairs":
        raise ValueError("task (--task) pairs is set by data_cond (--data-cond PATH: a folder with inputs/ and "
                         "targets/, or an .npz)")
    raise ValueError(f"{TASK_HINT}; got {text!r}")


def bind(task: Task, image_shape: tuple[int, ...], paired: Tensor | None = None) -> Task:
    """The task with cond_channels set for [C, H, W] training images; a UserError when the data cannot serve it."""
    channels, height, width = image_shape
    if task.kind == "superres" and (height % task.factor or width % task.factor):
        raise UserError(f"task (--task) {task.name} needs image sides divisible by {task.factor}; the data is "
                        f"{width}x{height}: pass --image-size with a multiple of {task.factor}")
    if task.kind == "colorize" and channels != 3:
        raise UserError(f"task (--task) colorize needs colour (RGB) images; the data has {channels} channel(s): "
                        f"use colour data{' without --channels 4' if channels == 4 else ''}")
    count = {"none": 0, "superres": channels, "inpaint": channels + 1, "colorize": 1,
             "pairs": 0 if paired is None else paired.shape[1]}[task.kind]
    return replace(task, cond_channels=count)


# ---- conditions from a batch -----------------------------------------------------------------

def shrink_and_restore(x: Tensor, factor: int) -> Tensor:
    """[B, C, H, W] -> the same size, each factor x factor block replaced by its mean (area down, nearest up).

    Nearest upsampling keeps exactly the low-resolution pixels (bilinear would invent values between
    them); the network learns the interpolation, as SR3's does from its upsampled input."""
    low = F.interpolate(x, size=(x.shape[-2] // factor, x.shape[-1] // factor), mode="area")   # [B, C, H/f, W/f]
    return F.interpolate(low, scale_factor=factor, mode="nearest")                              # [B, C, H, W]


def luma(x: Tensor) -> Tensor:
    """[B, 3, H, W] -> [B, 1, H, W]: 0.299 R + 0.587 G + 0.114 B (affine, so it holds in [-1, 1] as in 0..255)."""
    weights = torch.tensor(LUMA, dtype=x.dtype, device=x.device)
    return (x[:, :3] * weights[:, None, None]).sum(dim=1, keepdim=True)


def random_masks(batch: int, height: int, width: int, generator: torch.Generator | None = None) -> Tensor:
    """[B, 1, H, W] float keep-masks (1 = known, 0 = to fill in), half of them each kind, as Palette mixes
    free-form and box masks (Saharia et al. 2022, Sec. 5.2): a box of 1/4 to 3/4 of each side at a random
    place, or a random half of the 4x4 cells."""
    device = generator.device if generator is not None else torch.device("cpu")
    draws = torch.rand(batch, 5, generator=generator, device=device)                 # [B, 5]
    box_h = (height * (0.25 + 0.5 * draws[:, 0])).long().clamp(min=1)
    box_w = (width * (0.25 + 0.5 * draws[:, 1])).long().clamp(min=1)
    top, left = ((height - box_h + 1) * draws[:, 2]).long(), ((width - box_w + 1) * draws[:, 3]).long()
    rows, columns = torch.arange(height, device=device), torch.arange(width, device=device)
    inside = (((rows[None] >= top[:, None]) & (rows[None] < (top + box_h)[:, None]))[:, :, None]
              & ((columns[None] >= left[:, None]) & (columns[None] < (left + box_w)[:, None]))[:, None, :])
    cells = torch.rand(batch, -(-height // MASK_CELL), -(-width // MASK_CELL), generator=generator, device=device)
    dropped = (cells < 0.5).repeat_interleave(MASK_CELL, 1).repeat_interleave(MASK_CELL, 2)[:, :height, :width]
    hole = torch.where((draws[:, 4] < 0.5)[:, None, None], inside, dropped)            # [B, H, W]
    return (~hole).float()[:, None]


def masked_condition(x0: Tensor, keep: Tensor) -> Tensor:
    """[B, C, H, W] image and [B or 1, 1, H, W] keep-mask -> [B, C + 1, H, W]: zero where masked, then the mask."""
    keep = keep.to(x0).expand(len(x0), 1, *x0.shape[-2:])
    return torch.cat([x0 * keep, keep], dim=1)


def split_batch(task: Task, x: Tensor, generator: torch.Generator | None = None,
                dropout: float = 0.0) -> tuple[Tensor, Tensor | None]:
    """A training batch -> (x0, condition or None); draws nothing for task none.

    Args:
        x: [B, C, H, W] images in [-1, 1]; for pairs the user's inputs follow as extra channels
            (so that a random flip mirrors target and input together).
        generator: draws the inpaint masks and the dropout.
        dropout: probability of replacing an example's condition by zeros, the "no condition" of
            classifier-free guidance (Ho & Salimans 2022; zero images as in Brooks et al. 2023,
            InstructPix2Pix, Sec. 3.3).
    Returns:
        x0 [B, C, H, W] and the condition [B, cond_channels, H, W] (None for task none).
    """
    if task.kind == "none":
        return x, None
    if task.kind == "pairs":
        x0, cond = x[:, :-task.cond_channels], x[:, -task.cond_channels:]
    elif task.kind == "superres":
        x0, cond = x, shrink_and_restore(x, task.factor)
    elif task.kind == "inpaint":
        x0, cond = x, masked_condition(x, random_masks(len(x), *x.shape[-2:], generator).to(x.device))
    else:
        x0, cond = x, luma(x)
    if dropout > 0:
        device = generator.device if generator is not None else x.device
        kept = torch.rand(len(x), generator=generator, device=device).to(x.device) >= dropout   # [B]
        cond = cond * kept[:, None, None, None]
    return x0, cond


def with_condition(model, cond: Tensor, guidance: float = 1.0):
    """Close over a condition so a sampler sees `model(x_t, t, **labels)`.

    `cond` [N, cond_channels, H, W] is tiled when the batch is a multiple of N (label guidance doubles
    it). With guidance != 1, classifier-free guidance on the condition (Ho & Salimans 2022, eq. 6):
    out = out(zeros) + guidance * (out(cond) - out(zeros)), both in one forward on the doubled batch."""
    def denoiser(x: Tensor, t, **kwargs) -> Tensor:
        c = cond.to(x.device)
        c = c.repeat(len(x) // len(c), 1, 1, 1) if len(x) != len(c) else c                     # [B, Cc, H, W]
        if guidance == 1.0:
            return model(x, t, cond=c, **kwargs)
        t = torch.as_tensor(t, device=x.device).expand(len(x))
        doubled = {key: torch.cat([value, value]) for key, value in kwargs.items()}
        out = model(torch.cat([x, x]), torch.cat([t, t]), cond=torch.cat([c, torch.zeros_like(c)]), **doubled)
        conditional, unconditional = out.chunk(2)
        return unconditional + guidance * (conditional - unconditional)
    return denoiser


# ---- conditions from a user's inputs (sampling) ----------------------------------------------

def condition_from_inputs(task: Task, inputs: Tensor, image_shape: tuple[int, int, int],
                          mask: Tensor | None = None) -> Tensor:
    """The condition for sampling from inputs as a user has them.

    Args:
        inputs: [N, C', h, w] (or [C', h, w]), uint8 or float in [-1, 1]: for superres the low-resolution
            image (h, w = H/F, W/F) or a full-size one, shrunk first as in training; for colorize a colour or
            gray image; for inpaint the image, with `mask`; for pairs an input like the training inputs.
        image_shape: (C, H, W) of the run's outputs.
        mask: inpaint only: [N or 1, 1, H, W] (or [H, W]), 1 (True) = keep the pixel, 0 = fill it in.
    Returns:
        float [N, cond_channels, H, W].
    """
    channels, height, width = image_shape
    x = inputs[None] if inputs.dim() == 3 else inputs
    x = to_model_range(x) if x.dtype == torch.uint8 else x.float()
    low = (height // task.factor, width // task.factor)
    sizes = [(height, width), low] if task.kind == "superres" else [(height, width)]
    want = {"superres": channels, "inpaint": channels, "pairs": task.cond_channels}.get(task.kind)
    if task.kind == "none":
        raise UserError("this run was trained without a condition (task none); sample it without cond")
    if x.dim() != 4 or tuple(x.shape[-2:]) not in sizes or (want is not None and x.shape[1] != want) \
            or (task.kind == "colorize" and x.shape[1] not in (1, 3)):
        shape = " or ".join(f"{want or '1 or 3'}x{w}x{h}" for h, w in sizes)
        raise UserError(f"a {task.name} run takes condition inputs of {shape} (channels x width x height); "
                        f"got {'x'.join(str(s) for s in x.shape[1:])}: resize or convert the input")
    if task.kind == "superres":
        return shrink_and_restore(x, task.factor) if x.shape[-2:] == (height, width) \
            else F.interpolate(x, scale_factor=task.factor, mode="nearest")
    if task.kind == "colorize":
        return luma(x) if x.shape[1] == 3 else x
    if task.kind == "inpaint":
        if mask is None:
            raise UserError("an inpaint run needs a mask (1 = keep, 0 = fill in); pass mask= (--mask FILE)")
        mask = mask.reshape(-1, 1, *mask.shape[-2:]).float()
        if tuple(mask.shape[-2:]) != (height, width) or len(mask) not in (1, len(x)):
            raise UserError(f"the mask must be {width}x{height} (one, or one per input); got {tuple(mask.shape)}")
        return masked_condition(x, mask)
    return x


def cond_picture(task: Task, cond: Tensor, channels: int) -> Tensor:
    """[N, cond_channels, H, W] -> [N, channels, H, W] in [-1, 1]: what a person should see of the condition."""
    picture = cond[:, :channels] if task.kind == "inpaint" else cond
    if picture.shape[1] == channels:
        return picture
    return picture[:, :1].expand(-1, channels, -1, -1) if channels in (1, 3) else picture[:, :channels]


@dataclass(frozen=True)
class Preview:
    """A few training examples for the sample grids of a task run: their conditions, labels and targets."""
    task: Task              # the run's task
    cond: Tensor            # [N, cond_channels, H, W]
    labels: Tensor | None   # [N] or None
    truth: Tensor           # [N, C, H, W] in [-1, 1]

    def grid_rows(self, outputs: Tensor) -> Tensor:
        """[3N, C, H, W]: the conditions, the outputs, the targets (a grid of N columns)."""
        return torch.cat([cond_picture(self.task, self.cond, self.truth.shape[1]), outputs.float(), self.truth])


def preview(task: Task, images: Tensor, paired: Tensor | None, labels: Tensor | None, seed: int,
            count: int = 8) -> Preview:
    """The first `count` training examples as a Preview (inpaint masks drawn from `seed`)."""
    x = to_model_range(images[:count])
    if paired is not None:
        x = torch.cat([x, to_model_range(paired[:count])], dim=1)
    x0, cond = split_batch(task, x, torch.Generator().manual_seed(seed))
    return Preview(task, cond, labels[:count] if labels is not None else None, x0)


def load_task_data(cfg, progress: bool = True) -> tuple[Task, ImageData, Tensor | None]:
    """The training data of a TrainConfig `cfg` and its task: (bound Task, targets, paired inputs or None)."""
    task = parse_task(cfg.task, cfg.data_cond)
    options = dict(image_size=cfg.image_size, channels=cfg.channels, alpha_background=cfg.alpha_background,
                   progress=progress)
    if task.kind == "pairs":
        if cfg.data != "builtin":
            raise UserError(f"data (--data) {cfg.data} and data_cond (--data-cond) {cfg.data_cond} were both given; the targets of "
                            f"--data-cond are the training images, so drop --data")
        data, paired = load_pairs(cfg.data_cond, **options)
    else:
        data, paired = load_data(cfg.data, **options), None
    return bind(task, tuple(data.images.shape[1:]), paired), data, paired
