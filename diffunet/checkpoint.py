"""Checkpoints: a run folder of safetensors weights plus JSON, and a resumable training state.

A run folder (`diffunet train --out runs/NAME`) holds:
    config.json                 {"format_version", "diffunet_version", "model" (UNetConfig.to_dict()),
                                 and the run's settings: diffunet/run.py owns those keys}
    model.safetensors           EMA weights; the same config JSON sits in its metadata, so the file
                                alone rebuilds the model
    training_state.safetensors  a nested dict (raw weights, EMA, optimizer, step, RNG states, data
                                position): its tensors are stored as tensors, its structure as a
                                JSON skeleton in the file's metadata (serialiser.py). One file,
                                one atomic rename.

No pickle anywhere: weights are safetensors, structure is JSON, and the one reader of `.pt` files
(`load_torch_file`) uses `torch.load(weights_only=True)`. Every file is written through
`diffunet.atomic`, so a kill at any moment leaves the previous file intact. Every bad input
raises `CheckpointError` with one line that names the fix.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from . import __version__
from .atomic import atomic_write_bytes
from .errors import CheckpointError
from .serialiser import flatten, restore

FORMAT_VERSION = 1                      # bump when the run-folder layout changes incompatibly
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.safetensors"
META_FORMAT, META_CONFIG, META_STATE = "format_version", "diffunet_config", "diffunet_state"
FIX_RUN = "pass a run folder written by `diffunet train --out` or its model.safetensors"


# ---- the model: weights + config ------------------------------------------------------------

def save_model(path: str | Path, model: nn.Module, extra_config: dict | None = None) -> Path:
    """Save a UNet's weights with its config, atomically.

    Args:
        path: a run folder (writes `model.safetensors` and `config.json` in it) or a file name
            ending in `.safetensors` (writes that file alone; the config is in its metadata).
        model: a `UNet` (DistributedDataParallel and torch.compile wrappers are unwrapped).
        extra_config: JSON-able entries stored beside "model", e.g. "schedule", "prediction", "train".

    Returns:
        The path of the weights file.
    """
    model = _unwrap(model)
    if not callable(getattr(getattr(model, "config", None), "to_dict", None)):
        raise TypeError(f"save_model needs a diffunet UNet (with a UNetConfig .config); got {type(model).__name__}")
    config = {"format_version": FORMAT_VERSION, "diffunet_version": __version__, **(extra_config or {}),
              "model": model.config.to_dict()}
    config["format_version"] = FORMAT_VERSION
    text = _to_json(config, "extra_config")
    path = Path(path)
    weights_file = path if path.suffix == ".safetensors" else path / MODEL_FILE
    tensors = _plain_tensors(model.state_dict())
    metadata = {META_FORMAT: str(FORMAT_VERSION), META_CONFIG: text}
    _write(weights_file, save(tensors, metadata=metadata))
    if path.suffix != ".safetensors":
        _write(path / CONFIG_FILE, (text + "\n").encode("utf-8"))
    return weights_file


def read_model(path: str | Path, build: Callable[[dict], nn.Module],
               device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a network from a run folder or a `.safetensors` file; no architecture arguments needed.
    (`UNet.from_pretrained` and `run.load_model` call it with the UNet's builder; this module imports no network.)

    A run folder's `config.json` describes the model (falling back to the weights' metadata when
    it is absent); a lone `.safetensors` file uses its metadata (or a `config.json` beside it). A
    `.pt`/`.pth` state dict is read only with `torch.load(weights_only=True)` and needs a
    `config.json` beside it.

    Args:
        path: run folder, `.safetensors`, or `.pt`/`.pth` file.
        build: makes the untrained network from the config's "model" fields (`UNetConfig.to_dict()`).
        device: where to put the model.

    Returns:
        (model in eval mode on `device`, the config dict).
    """
    path = Path(path)
    if path.suffix in (".pt", ".pth"):
        weights_file, tensors = path, load_torch_file(path)
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise CheckpointError(f"{path} is not a state dict (name -> tensor); save model.state_dict() in it")
        config = read_config(path.parent)
    else:
        config = read_config(path)
        weights_file = path / MODEL_FILE if path.is_dir() else path
        if not weights_file.is_file():
            raise CheckpointError(f"{path} has no {MODEL_FILE} (no weights saved yet?); {FIX_RUN}")
        tensors, _ = _read_safetensors(weights_file)
    try:
        model = build(config["model"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"the model config for {weights_file} is invalid ({_one_line(error)}); "
                              f"restore the config.json saved with these weights") from None
    try:
        model.load_state_dict(tensors)
    except RuntimeError:
        raise CheckpointError(f"{weights_file} does not match its config: {_mismatch(model, tensors)}; "
                              f"use the config.json saved with these weights") from None
    return model.to(device).eval(), config


def read_config(run_dir: str | Path) -> dict:
    """The config dict of a run folder (config.json) or of a `.safetensors` file (its metadata).

    Raises:
        CheckpointError: missing path, not a run folder, unreadable JSON, or a newer format.
    """
    path = Path(run_dir)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; {FIX_RUN}")
    if path.is_dir():
        if (path / CONFIG_FILE).is_file():
            config, source = _read_json(path / CONFIG_FILE), path / CONFIG_FILE
        elif (path / MODEL_FILE).is_file():
            config, source = _metadata_config(path / MODEL_FILE), path / MODEL_FILE
        else:
            raise CheckpointError(f"{path} is not a run folder (no {CONFIG_FILE} or {MODEL_FILE}); {FIX_RUN}")
    elif path.suffix == ".safetensors":
        config, source = _metadata_config(path), path
        if config is None and (path.parent / CONFIG_FILE).is_file():
            config, source = _read_json(path.parent / CONFIG_FILE), path.parent / CONFIG_FILE
    else:
        raise CheckpointError(f"{path} is neither a run folder nor a .safetensors file; {FIX_RUN}")
    if config is None:
        raise CheckpointError(f"{source} holds no diffunet config (not saved by diffunet?); "
                              f"put the run's {CONFIG_FILE} beside it")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{source} has no \"model\" section; restore the {CONFIG_FILE} written with the run")
    _check_format(config.get("format_version"), source)
    return config


# ---- the resumable training state ------------------------------------------------------------

def save_training_state(run_dir: str | Path, state: dict) -> Path:
    """Write a nested training state to `run_dir/training_state.safetensors` in one atomic rename.

    Args:
        run_dir: the run folder (created if missing).
        state: a dict of tensors, numpy arrays, numbers, strings, None, and lists, tuples and dicts
            of those (any key type), e.g. {"model": model.state_dict(), "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(), "step": 1200, "rng": capture_rng_states(),
            "data_position": 1200}.

    Returns:
        The path of the state file.
    """
    skeleton, tensors = flatten(state)
    metadata = {META_FORMAT: str(FORMAT_VERSION), META_STATE: _to_json(skeleton, "state")}
    tensors = _plain_tensors(tensors)
    path = Path(run_dir) / STATE_FILE
    _write(path, save(tensors, metadata=metadata))
    return path


def load_training_state(run_dir: str | Path) -> dict:
    """Read back what `save_training_state` wrote: same structure, key types, dtypes and values.

    Tensors come back on the CPU; `optimizer.load_state_dict` moves its state to the parameters'
    device.
    """
    run_dir = Path(run_dir)
    path = run_dir / STATE_FILE
    if not run_dir.exists():
        raise CheckpointError(f"{run_dir} does not exist; {FIX_RUN}")
    if not path.is_file():
        raise CheckpointError(f"{run_dir} holds no {STATE_FILE} to resume from; train the run from the start")
    tensors, metadata = _read_safetensors(path)
    _check_format(metadata.get(META_FORMAT), path)
    try:
        return restore(json.loads(metadata[META_STATE]), tensors)
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path} is corrupt ({_one_line(error)}); delete it to start over, "
                              f"or restore it from a backup") from None


def capture_rng_states() -> dict:
    """Every global RNG state: Python `random`, NumPy, torch CPU and (when present) each CUDA device."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    """Set the global RNGs from `capture_rng_states()` output (CUDA states only where CUDA exists)."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---- foreign files --------------------------------------------------------------------------

def load_torch_file(path: str | Path) -> Any:
    """Load a `.pt`/`.pth` file of tensors and plain containers, never running code from it.

    Uses `torch.load(weights_only=True)`, whose unpickler refuses every global that is not a
    tensor type or a plain container, so a pickle crafted to run code is rejected before it runs.

    Raises:
        CheckpointError: missing file, anything but tensors/containers/primitives, or a corrupt file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; pass the path of a .pt/.pth or .safetensors file")
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for refused globals, RuntimeError/EOFError for damage
        if "Weights only load failed" in str(error):
            raise CheckpointError(f"{path} holds Python objects besides tensors and was refused (loading it "
                                  f"could run code); ask for a .safetensors file or a plain state dict") from None
        raise CheckpointError(f"{path} is not a readable PyTorch file ({type(error).__name__}); "
                              f"re-download it or ask for a .safetensors file") from None
    _check_plain(value, path)
    return value


def _check_plain(value: Any, path: Path) -> None:
    """Raise CheckpointError unless `value` is made of tensors, primitives and plain containers."""
    if isinstance(value, (dict, list, tuple)):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            _check_plain(key, path)
            _check_plain(item, path)
    elif not isinstance(value, (torch.Tensor, str, bytes, int, float, bool, type(None), torch.dtype, torch.device)):
        raise CheckpointError(f"{path} holds a {type(value).__name__}, not only tensors; "
                              f"ask for a .safetensors file or a plain state dict")


# ---- helpers ----------------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (.module) or torch.compile (._orig_mod) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        inner = inner if isinstance(inner, nn.Module) else getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _plain_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, each with its own storage (safetensors refuses shared memory)."""
    plain, storages = {}, set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages and tensor.numel() > 0:
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        plain[key] = tensor
    return plain


def _write(path: Path, data: bytes) -> None:
    """Write `data` atomically, first removing temp files that a killed earlier write left behind.

    The bytes are built in memory (safetensors.torch.save) rather than by save_file, which would
    leave a temp file of its own after a kill. A failure (full disk, no permission) becomes one
    CheckpointError line.
    """
    try:
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # diffunet.atomic's temp-file names
            stale.unlink(missing_ok=True)
        atomic_write_bytes(path, data)
    except OSError as error:
        raise CheckpointError(f"could not write {path} ({error.strerror or error}); the previous file is kept "
                              f"intact. Free disk space or choose another output folder") from error


def _to_json(value: Any, what: str) -> str:
    """json.dumps with a clear error for values JSON cannot hold."""
    try:
        return json.dumps(value, indent=2)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{what} must be JSON-able (numbers, strings, lists, dicts): {error}") from None


def _read_safetensors(path: Path, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (on the CPU; none when tensors=False) and the metadata of a safetensors file."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            return {key: file.get_tensor(key) for key in file.keys() if tensors}, file.metadata() or {}
    except Exception as error:  # SafetensorError, OSError: truncated, corrupt or unreadable
        raise CheckpointError(f"{path} is truncated or corrupt ({_one_line(error)}); "
                              f"re-download it or use an earlier checkpoint") from None


def _metadata_config(path: Path) -> dict | None:
    """The config JSON stored in a safetensors file's metadata (None when there is none)."""
    metadata = _read_safetensors(path, tensors=False)[1]
    if META_CONFIG not in metadata:
        return None
    try:
        return json.loads(metadata[META_CONFIG])
    except ValueError as error:
        raise CheckpointError(f"the config in {path}'s metadata is corrupt ({_one_line(error)}); "
                              f"put the run's {CONFIG_FILE} beside it") from None


def _read_json(path: Path) -> Any:
    """Parse a JSON file; CheckpointError when it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is unreadable ({_one_line(error)}); delete it to fall back on the "
                              f"config stored in {MODEL_FILE}, or restore it") from None


def _check_format(version: Any, source: Path) -> None:
    """Refuse files from a newer run-folder format, naming the upgrade."""
    try:
        version = int(version)
    except (TypeError, ValueError):
        raise CheckpointError(f"{source} has no valid format_version (got {version!r}); "
                              f"it was not written by diffunet") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{source} uses checkpoint format {version}, newer than this diffunet "
                              f"{__version__} reads ({FORMAT_VERSION}); upgrade: pip install -U diffunet")


def _mismatch(model: nn.Module, tensors: dict[str, torch.Tensor]) -> str:
    """Summary of missing, unexpected and wrongly shaped weights, rephrasing torch's load error."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in tensors]
    unexpected = [key for key in tensors if key not in expected]
    shapes = [f"{key} {list(tensors[key].shape)} vs {list(value.shape)}" for key, value in expected.items()
              if key in tensors and tensors[key].shape != value.shape]
    parts = [f"{len(found)} {what} (e.g. {found[0]})" for what, found in
             (("missing weights", missing), ("unexpected weights", unexpected), ("shape mismatches", shapes)) if found]
    return ", ".join(parts) or "the weights could not be copied"


def _one_line(error: BaseException) -> str:
    """The first line of an exception message."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
