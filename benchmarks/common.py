"""Timing helpers shared by the benchmark scripts (compare.py, train_speed.py)."""
from __future__ import annotations

import os
import time

import torch

from diffunet.errors import UserError
from diffunet.training import pick_device


def bench_device(name: str) -> torch.device:
    """--device for a benchmark: `pick_device`'s rules and messages, as an exit instead of an exception."""
    try:
        return pick_device(name)
    except UserError as error:
        raise SystemExit(str(error)) from None


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock times cover it (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(closures: dict, rounds: int, device: torch.device, repeats: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each closure, `rounds` times, round-robin so that load changes hit all alike."""
    times = {name: [] for name in closures}
    for _ in range(rounds):
        for name, fn in closures.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / repeats)
    return times


def load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())
