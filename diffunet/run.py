"""A run folder as one object: `load_run(path)` reads it, `make_run_config(...)` writes its config.json.

This module owns the run folder's layout: the CLI, `eval`, training and user code read and write a
run's config through it, never by string keys into `config.json`. The files themselves (safetensors
weights, JSON, the resumable state) are `checkpoint.py`'s:

    run = diffunet.load_run("runs/mnist")
    images = run.sample(16, seed=0)          # [16, C, H, W] in [-1, 1], as `diffunet sample` draws them
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from samplers import NoiseSchedule

from . import direct
from .checkpoint import CONFIG_FILE, MODEL_FILE, read_config, read_model
from .errors import CheckpointError, UserError
from .generate import generate, generate_inpainted
from .images import to_model_range
from .tasks import Task, condition_from_inputs
from .unet import UNet, UNetConfig

# How a run whose stored train config predates the sampling fields is sampled (the defaults of that time).
LEGACY_SAMPLING = {"sampler": "ddpm", "sample_steps": 50, "guidance": 1.0}


def run_guidance(train_config: dict) -> float:
    """The guidance a run's grids, `sample` and `eval` use by default: its stored `guidance` where label dropout
    trained the "no label" branch that classifier-free guidance needs, else 1.0 (none)."""
    if not train_config.get("label_dropout", 0) > 0:
        return 1.0
    return train_config.get("guidance", LEGACY_SAMPLING["guidance"])


def make_run_config(model_config: UNetConfig, schedule: NoiseSchedule, prediction: str, train_config: dict,
               image_shape: tuple[int, ...], data_name: str | None, task: dict | None = None) -> dict:
    """The config.json of a run: what `load_run` reads back (checkpoint.save_model adds the format version).
    `task` is a `tasks.Task` dict: what the run's condition image is (none for an unconditional run)."""
    return {"model": model_config.to_dict(), "schedule": schedule.to_dict(), "prediction": prediction,
            "train": train_config, "image_shape": list(image_shape), "num_classes": model_config.num_classes,
            "data_name": data_name, "task": task or Task().to_dict()}


@dataclass(frozen=True)
class Run:
    """A trained run: the EMA network, its noise schedule and the settings it samples with."""
    path: Path                          # the run folder (or weights file) it was loaded from
    model: UNet = field(repr=False)     # EMA weights from model.safetensors, in eval mode
    config: UNetConfig                  # the network's architecture
    schedule: NoiseSchedule             # the noise schedule it was trained with
    prediction: str                     # what the network predicts: eps | x0 | v
    image_shape: tuple[int, int, int]   # (C, H, W) of the training images
    num_classes: int | None             # labels 0..num_classes-1; None = unconditional
    train_config: dict                  # the stored TrainConfig dict
    sampler: str                        # the run's default sampler (ddpm | ddim | dpmpp_2m)
    steps: int                          # its default number of sampler steps
    guidance: float                     # its default classifier-free guidance scale
    step: int | None                    # optimizer steps behind these weights
    data_name: str | None               # the dataset it was trained on
    task: Task = Task()                 # what its condition image is (tasks.py); Task() = none, for older runs
    objective: str = "diffusion"        # diffusion (sampled) | direct (the network maps cond to the output: direct.py)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def labels(self, num: int, label: int | None = None) -> Tensor | None:
        """[num] labels: `label` for every image, else one class per image in turn; None when unconditional."""
        if not self.num_classes:
            if label is not None:
                raise UserError(f"a label was given but {self.path} is unconditional (trained without labels)")
            return None
        if label is not None and not 0 <= label < self.num_classes:
            raise UserError(f"label must be in 0..{self.num_classes - 1} for {self.path}; got {label}")
        return torch.full((num,), label) if label is not None else torch.arange(num) % self.num_classes

    def no_labels(self, num: int, guidance: float | None = None) -> Tensor | None:
        """[num] "no label" (-1) for a class-conditional run, so the known pixels or the condition alone decide
        the class (the branch classifier-free guidance trains by label dropout); None for an unconditional run.

        Raises:
            UserError: guidance was asked for (it pushes towards a class, and none is given), or the run
                never trained its no-label branch (label_dropout 0).
        """
        if not self.num_classes:
            return None
        if guidance is not None:
            raise UserError("guidance (--guidance) needs a label (--label): it pushes towards a class, and none "
                            "was given")
        if not self.train_config.get("label_dropout", 0) > 0:
            raise UserError(f"{self.path} was trained without label dropout, so it cannot draw an image without a "
                            f"class; give a label (--label)")
        return torch.full((num,), -1)

    def sample(self, num: int, seed: int = 0, label: int | None = None, guidance: float | None = None,
               sampler: str | None = None, steps: int | None = None, batch_size: int = 64,
               progress: bool = False, cond: Tensor | None = None, mask: Tensor | None = None,
               cond_guidance: float = 1.0) -> Tensor:
        """Draw `num` images; image i depends only on (seed, i), as in `diffunet sample`.

        Args:
            label: class of every image; None gives one class per image in turn (0, 1, 2, ...), or for a
                task run given `cond`, "no label" (the condition decides).
            guidance, sampler, steps: None takes the run's own (see `Run.guidance` etc.).
            cond: a task run's inputs, [1 or num, C', h, w] uint8 or float in [-1, 1]
                (`tasks.condition_from_inputs`: e.g. 7x7 images for a superres:4 run on 28x28); one input is
                used for all `num` images. Required for a task run, refused otherwise. A direct run takes
                inputs of any size (`output_shape`); a diffusion run those of its training size.
            mask: inpaint runs: [1 or num, 1, H, W], 1 = keep, 0 = fill in.
            cond_guidance: classifier-free guidance on the condition (runs trained with cond dropout).
        Returns:
            float tensor [num, C, H, W] on the CPU, in [-1, 1].
        """
        return self.sample_conditioned(self.condition(num, cond, mask), num, seed=seed, label=label,
                                       guidance=guidance, sampler=sampler, steps=steps, batch_size=batch_size,
                                       progress=progress, cond_guidance=cond_guidance)

    def sample_conditioned(self, condition: Tensor | None, num: int, seed: int = 0, label: int | None = None,
                           guidance: float | None = None, sampler: str | None = None, steps: int | None = None,
                           batch_size: int = 64, progress: bool = False, cond_guidance: float = 1.0) -> Tensor:
        """`sample` from ready conditions [num, cond_channels, H, W] in [-1, 1], as `tasks.split_batch` derives
        them in training (None for a run without a task); the other arguments as in `sample`."""
        if self.objective == "direct":  # no noise, no sampler: the network's own output (a mask for cross-entropy)
            if label is not None or guidance is not None:
                raise UserError(f"{self.path} was trained directly (--objective direct), without labels or guidance; "
                                f"drop the label and guidance")
            return direct.predict(self.model, condition, self.image_shape[0], batch_size=batch_size)
        unlabelled = condition is not None and label is None    # the condition decides the class
        labels = self.no_labels(num, guidance) if unlabelled else self.labels(num, label)
        if labels is None and guidance is not None:
            raise UserError(f"guidance needs a class-conditional model; {self.path} was trained without labels")
        return generate(self.model, self.schedule, num, self.image_shape, sampler=sampler or self.sampler,
                        steps=steps if steps is not None else self.steps, prediction=self.prediction,
                        labels=labels, guidance=self._guidance(guidance, labels is None or unlabelled),
                        seed=seed, batch_size=batch_size, device=self.device, progress=progress,
                        cond=condition, cond_guidance=cond_guidance)

    def inpaint(self, image: Tensor, keep: Tensor, num: int | None = None, seed: int = 0, label: int | None = None,
                guidance: float | None = None, steps: int = 50, jump_length: int = 10, resamples: int = 10,
                batch_size: int = 64, progress: bool = False) -> Tensor:
        """Fill in the part of `image` where `keep` is 0, with no retraining (RePaint, `samplers.repaint`), as
        `diffunet inpaint` does; completion i depends only on (seed, i).

        Args:
            image: [1 or N, C, H, W] uint8, or float in [-1, 1]: the images to complete, the run's size.
            keep: [1 or N, 1, H, W]: 1 = keep the pixel, 0 = fill in.
            num: completions; None = one per image (N). One image is completed `num` times.
            label: class of every completion; None = "no label" (the known pixels decide; `no_labels`).
            steps, jump_length, resamples: RePaint's descent, J and R (R = 1: plain replacement).
        Returns:
            float tensor [num, C, H, W] on the CPU in [-1, 1], equal to the image where keep is 1.
        """
        if self.objective == "direct":
            raise UserError(f"{self.path} was trained directly (--objective direct) and draws no samples to inpaint "
                            f"with; use a diffusion run")
        num = len(image) if num is None else num
        if tuple(image.shape[1:]) != self.image_shape or keep.shape[1:] != (1, *self.image_shape[1:]):
            raise UserError(f"inpaint needs images [N, {', '.join(map(str, self.image_shape))}] and masks "
                            f"[N, 1, {self.image_shape[1]}, {self.image_shape[2]}] for {self.path}; got "
                            f"{list(image.shape)} and {list(keep.shape)}")
        if len(image) not in (1, num) or len(keep) not in (1, num):
            raise UserError(f"got {len(image)} images and {len(keep)} masks for {num} completions; give one, or one "
                            f"per completion")
        labels = self.labels(num, label) if label is not None else self.no_labels(num, guidance)
        known = to_model_range(image) if image.dtype == torch.uint8 else image.float()
        return generate_inpainted(self.model, self.schedule, known, keep.float(), num, steps=steps,
                                  jump_length=jump_length, resamples=resamples, prediction=self.prediction,
                                  labels=labels, guidance=self._guidance(guidance, label is None),
                                  seed=seed, batch_size=batch_size, device=self.device, progress=progress)

    def _guidance(self, guidance: float | None, unlabelled: bool) -> float:
        """The guidance scale to sample with: none (1.0) without a class to push towards, else given or the run's."""
        return 1.0 if unlabelled else guidance if guidance is not None else self.guidance

    def condition(self, num: int, cond: Tensor | None, mask: Tensor | None = None) -> Tensor | None:
        """[num, cond_channels, H, W] conditions from a user's inputs (None for a run without a task)."""
        if self.task.kind == "none":
            if cond is not None or mask is not None:
                raise UserError(f"{self.path} was trained without a condition (no --task); sample it without cond")
            return None
        if cond is None:
            raise UserError(f"{self.path} is a {self.task.name} run: give its inputs as cond "
                            f"(diffunet sample --cond IMAGE_OR_FOLDER)")
        condition = condition_from_inputs(self.task, cond, self.output_shape(cond), mask)
        if len(condition) not in (1, num):
            raise UserError(f"got {len(condition)} condition inputs for {num} images; give one, or one per image")
        return condition.expand(num, *condition.shape[1:])

    def output_shape(self, cond: Tensor) -> tuple[int, int, int]:
        """(C, H, W) of the outputs for inputs cond [..., h, w]. A direct run maps any size (overlap-tile,
        `direct.predict`): h x w, or for superres F h x F w unless h x w is the training size (then shrunk
        first, as in training). A diffusion run samples its training size only; another is a UserError."""
        channels, height, width = self.image_shape
        size, factor = tuple(cond.shape[-2:]), self.task.factor
        allowed = [(height, width), (height // factor, width // factor)] if self.task.kind == "superres" \
            else [(height, width)]
        if self.objective == "direct":
            return (channels, *size) if size == allowed[0] else (channels, size[0] * factor, size[1] * factor)
        if size not in allowed:
            sizes = " or ".join(f"{w}x{h}" for h, w in allowed)
            raise UserError(f"{self.path} is a diffusion run: it samples {width}x{height} images, so its "
                            f"{self.task.name} inputs must be {sizes} (width x height); got {size[1]}x{size[0]}: "
                            f"resize the input (a direct run, --objective direct, takes any size)")
        return self.image_shape


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[UNet, dict]:
    """The UNet (eval mode, on `device`) and the whole stored config of a run folder or weights file
    (`checkpoint.read_model`; `UNet.from_pretrained` is the network alone)."""
    return read_model(path, UNet.from_fields, device=device)


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
    """Load a run written by `diffunet train` (its folder or its model.safetensors).

    Args:
        path: the run folder, or a weights file whose config holds the run's settings.
        device: where to put the model.
    Returns:
        The `Run`, its model in eval mode on `device`.
    Raises:
        CheckpointError: not a run, or one whose config lacks a schedule, prediction or image shape.
    """
    model, config = load_model(path, device=device)
    train_config = config.get("train", {})
    try:
        schedule = NoiseSchedule.from_dict(_section(config, "schedule", path))
        image_shape = tuple(int(size) for size in _section(config, "image_shape", path))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"the run config of {path} is invalid ({error}); "
                              f"restore the config.json written with the run") from None
    if len(image_shape) != 3:
        raise CheckpointError(f"the run config of {path} has image_shape {list(image_shape)}, not [C, H, W]; "
                              f"restore the config.json written with the run")
    return Run(path=Path(path), model=model, config=model.config, schedule=schedule,
               prediction=_section(config, "prediction", path), image_shape=image_shape,
               num_classes=model.config.num_classes, train_config=train_config,
               sampler=train_config.get("sampler", LEGACY_SAMPLING["sampler"]),
               steps=train_config.get("sample_steps", LEGACY_SAMPLING["sample_steps"]),
               guidance=run_guidance(train_config),
               step=config.get("step"), data_name=config.get("data_name"), task=Task.from_dict(config.get("task")),
               objective=train_config.get("objective", "diffusion"))


# ---- continuing a run --------------------------------------------------------------------------

def stored_train_config(path: str | Path) -> dict:
    """The TrainConfig dict stored in the run folder `path`; {} when no run config is there yet."""
    if not (Path(path) / CONFIG_FILE).is_file() and not (Path(path) / MODEL_FILE).is_file():
        return {}
    return dict(read_config(path).get("train", {}))


def stored_model_fields(path: str | Path) -> dict:
    """The UNetConfig fields of the run in `path` (the architecture a resumed run must keep)."""
    return dict(read_config(path)["model"])


def check_continues(path: str | Path, config: dict) -> None:
    """Refuse to resume the run in `path` with a `make_run_config(...)` dict that trains a different model.

    The task, the architecture, the noise schedule, the prediction target and the image shape must be the run's.

    Raises:
        CheckpointError: naming the first field that differs.
    """
    stored = read_config(path)
    fix = "keep the run's value, or train a new run in another folder"
    try:  # fields a run predates take their defaults, as when loading it
        sections = {"model": UNetConfig.from_dict(stored["model"]).to_dict()}
        if "schedule" in stored:
            sections["schedule"] = NoiseSchedule.from_dict(stored["schedule"]).to_dict()
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"the run config of {path} is invalid ({error}); "
                              f"restore the config.json written with the run") from None
    old_task, new_task = Task.from_dict(stored.get("task")), Task.from_dict(config.get("task"))
    if old_task.name != new_task.name:  # first: it explains a differing cond_channels
        raise CheckpointError(f"cannot resume {path}: task is {new_task.name!r} here but {old_task.name!r} in the "
                              f"run; {fix}")
    for section, old in sections.items():
        new = config[section]
        for key in sorted(set(old) | set(new), key=lambda key: (key != "kind", key)):  # a schedule's kind first
            if old.get(key) != new.get(key):
                raise CheckpointError(f"cannot resume {path}: {section} field {key} is {new.get(key)!r} here but "
                                      f"{old.get(key)!r} in the run; {fix}")
    for key in ("prediction", "image_shape"):
        if key in stored and stored[key] != config[key]:
            raise CheckpointError(f"cannot resume {path}: {key} is {config[key]!r} here but {stored[key]!r} "
                                  f"in the run; {fix}")


def _section(config: dict, key: str, path: str | Path) -> Any:
    """config[key], or a CheckpointError saying the weights carry no run settings."""
    if key not in config:
        raise CheckpointError(f"{path} has no {key!r} in its config, so it holds a network, not a run; "
                              f"load it with UNet.from_pretrained, or pass a folder written by `diffunet train`")
    return config[key]
