"""The user's own aligned (input, target) pairs for an image-to-image run (`diffunet train --data-cond PATH`).

A pairs set is two folders PATH/inputs and PATH/targets whose image files have the same relative names,
or one .npz with uint8 arrays `inputs` and `targets` (and optional `labels`). Each input must have its
target's height and width; the input's channels may differ (e.g. a sketch for a colour image).

Held-out pairs, never trained on, are the set's test split (`split="test"`, what `diffunet eval` scores):
arrays `test_inputs` and `test_targets` (and optional `test_labels`) in the .npz, or the folders
PATH/test/inputs and PATH/test/targets.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .data import ImageData, as_nhwc, convert_channels, image_names, is_gray, load_data
from .errors import DataError


def load_pairs(path: str | os.PathLike, *, image_size: int | None = None, channels: int | None = None,
               alpha_background: int = 0, progress: bool = True, split: str = "train") -> tuple[ImageData, Tensor]:
    """Aligned (input, target) pairs: folders PATH/inputs and PATH/targets with the same file names, or
    an .npz with uint8 arrays `inputs` and `targets` (and optional `labels`); same sizes pair by pair.

    Args:
        split: "train", or "test" for the held-out pairs (test_inputs / test_targets, or PATH/test/).
    Returns:
        (the targets as ImageData, the inputs uint8 [N, C_in, H, W]); `channels` applies to the targets.
    Raises:
        DataError: naming the first unaligned name (or index) and the fix, or the missing test split.
    """
    path = Path(path).expanduser()
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test'; got {split!r}")
    hint = "give a folder with inputs/ and targets/ (same file names) or an .npz with inputs and targets"
    if path.is_file() and path.suffix.lower() == ".npz":
        return _npz_pairs(path, image_size, channels, alpha_background, "" if split == "train" else "test_")
    if split == "test":
        if not (path / "test" / "inputs").is_dir():
            raise DataError(f"{path} has no held-out pairs; put them in {path / 'test'} as inputs/ and targets/")
        path = path / "test"
    if not (path / "inputs").is_dir() or not (path / "targets").is_dir():
        raise DataError(f"data_cond (--data-cond) {path} is not a pairs set; {hint}")
    names = {side: image_names(path / side) for side in ("inputs", "targets")}
    for side, other in (("targets", "inputs"), ("inputs", "targets")):
        missing = sorted(set(names[side]) - set(names[other]))
        if missing:
            raise DataError(f"unaligned pairs in {path}: {side}/{missing[0]} has no {other}/{missing[0]}; "
                            f"give every target an input of the same name")
    loaded = {side: load_data(path / side, image_size=image_size, channels=channels if side == "targets" else None,
                              alpha_background=alpha_background, progress=progress) for side in names}
    inputs, targets = loaded["inputs"].images, loaded["targets"]
    if inputs.shape[-2:] != targets.images.shape[-2:]:
        (h, w), (th, tw) = inputs.shape[-2:], targets.images.shape[-2:]
        raise DataError(f"unaligned pairs in {path}: inputs/{names['inputs'][0]} is {w}x{h} but "
                        f"targets/{names['inputs'][0]} is {tw}x{th}; make each input its target's size")
    return targets, inputs


def has_test_pairs(path: str | os.PathLike) -> bool:
    """Whether the pairs set at `path` holds held-out pairs (test_inputs / test_targets, or PATH/test/)."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            return {"test_inputs", "test_targets"} <= set(arrays.files)
    return (path / "test" / "inputs").is_dir() and (path / "test" / "targets").is_dir()


def _npz_pairs(path: Path, image_size: int | None, channels: int | None, alpha_background: int,
               prefix: str = "") -> tuple[ImageData, Tensor]:
    """load_pairs for an .npz: arrays inputs, targets (uint8 [N, H, W(, C)] or [N, C, H, W]), labels optional;
    with prefix "test_" the held-out test_inputs, test_targets and test_labels."""
    with np.load(path, allow_pickle=False) as arrays:
        found = {key[len(prefix):]: arrays[key] for key in arrays.files if key.startswith(prefix)}
    if prefix and ("inputs" not in found or "targets" not in found):
        raise DataError(f"{path} has no held-out pairs; save them in it as arrays {prefix}inputs and {prefix}targets")
    if "inputs" not in found or "targets" not in found:
        raise DataError(f"{path} has arrays {sorted(found)}; a pairs .npz needs arrays named inputs and targets")
    if image_size is not None:
        raise DataError(f"image_size (--image-size) does not resize an .npz of pairs ({path}); save the arrays at the "
                        f"size to train")
    inputs, targets = found["inputs"], found["targets"]
    if len(inputs) != len(targets):
        first = min(len(inputs), len(targets))
        raise DataError(f"unaligned pairs in {path}: {'targets' if len(targets) > first else 'inputs'}[{first}] has "
                        f"no partner ({len(inputs)} inputs, {len(targets)} targets); give one input per target")
    for name, array in (("inputs", inputs), ("targets", targets)):
        if array.dtype != np.uint8 or len(array) == 0:
            raise DataError(f"{name} in {path} are {array.dtype} {array.shape}; save non-empty uint8 0..255 arrays")
    inputs, targets = as_nhwc(inputs, f"{path} inputs"), as_nhwc(targets, f"{path} targets")
    if inputs.shape[1:3] != targets.shape[1:3]:
        raise DataError(f"unaligned pairs in {path}: inputs[0] is {inputs.shape[2]}x{inputs.shape[1]} but "
                        f"targets[0] is {targets.shape[2]}x{targets.shape[1]}; make each input its target's size")
    inputs = convert_channels(inputs, 1 if is_gray(inputs) else 3, alpha_background)
    targets = convert_channels(targets, channels or (1 if is_gray(targets) else 3), alpha_background)
    labels = found.get("labels")
    if labels is not None and (labels.dtype.kind not in "iu" or labels.shape != (len(targets),) or labels.min() < 0):
        raise DataError(f"labels in {path} must be {len(targets)} integers >= 0 (one per pair)")

    def tensor(array: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))           # [N, C, H, W]
    data = ImageData(tensor(targets), None if labels is None else torch.from_numpy(labels.astype(np.int64)),
                     None if labels is None else int(labels.max()) + 1, path.stem)
    return data, tensor(inputs)
