"""The training-state serialiser: a nested state <-> a JSON skeleton plus a flat dict of tensors.

A resumable state is a tree of dicts, lists and tuples (model and EMA weights, optimizer state with
integer keys, RNG states with tuples and NumPy arrays, the step, the data position). safetensors
stores only a flat name -> tensor dict and string metadata, so `flatten` moves every tensor into
the flat dict under its path in the tree ("optimizer/state/0/exp_avg") and leaves a JSON skeleton
that marks where it was; `restore` puts it back, with the same structure, key types, dtypes and
values. checkpoint.py writes the two into one `training_state.safetensors`. No pickle: the skeleton
is JSON, NumPy arrays are stored as their raw bytes.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

# Markers of the JSON skeleton: {"__tensor__": key}, {"__tuple__": [...]}, {"__dict__": [[k, v], ...]}
# (a dict whose keys are not all strings), {"__ndarray__": [key, dtype, shape]}.
TENSOR, TUPLE, DICT, NDARRAY = "__tensor__", "__tuple__", "__dict__", "__ndarray__"


def flatten(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON skeleton, flat tensors) of a nested state; TypeError names the path of a value it cannot hold."""
    tensors: dict[str, torch.Tensor] = {}
    return _flatten(state, [], tensors), tensors


def _flatten(value: Any, path: list[str], tensors: dict[str, torch.Tensor]) -> Any:
    """JSON skeleton of `value`; each tensor moves into `tensors` under its path, e.g. "optimizer/state/0/exp_avg"."""
    where = "/".join(path)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        key = where or "tensor"
        while key in tensors:  # two paths gave the same name (a dict key containing "/")
            key += "#"
        if isinstance(value, torch.Tensor):
            tensors[key] = value
            return {TENSOR: key}
        if value.dtype.hasobject:
            raise TypeError(f"cannot store the object array at '{where}' in the training state; use numbers")
        tensors[key] = torch.from_numpy(np.frombuffer(value.tobytes(), dtype=np.uint8).copy())  # raw bytes
        return {NDARRAY: [key, value.dtype.str, list(value.shape)]}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {TUPLE: [_flatten(item, path + [str(i)], tensors) for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_flatten(item, path + [str(i)], tensors) for i, item in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value) and not (len(value) == 1 and next(iter(value)) in
                                                              (TENSOR, TUPLE, DICT, NDARRAY)):
            return {key: _flatten(item, path + [key], tensors) for key, item in value.items()}
        return {DICT: [[_flatten(key, path, tensors), _flatten(item, path + [str(key)], tensors)]
                       for key, item in value.items()]}
    raise TypeError(f"cannot store a {type(value).__name__} at '{where}' in the training state; "
                    f"use tensors, arrays, numbers, strings, None, lists, tuples and dicts")


def restore(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten`: the nested state from its skeleton and tensors."""
    if isinstance(skeleton, list):
        return [restore(item, tensors) for item in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if len(skeleton) == 1:
        marker, payload = next(iter(skeleton.items()))
        if marker == TENSOR:
            return tensors[payload]
        if marker == NDARRAY:
            key, dtype, shape = payload
            return np.frombuffer(tensors[key].numpy().tobytes(), dtype=np.dtype(dtype)).reshape(shape).copy()
        if marker == TUPLE:
            return tuple(restore(item, tensors) for item in payload)
        if marker == DICT:
            return {restore(key, tensors): restore(item, tensors) for key, item in payload}
    return {key: restore(item, tensors) for key, item in skeleton.items()}
