"""Flags and data shared by the CLI-level tests: a tiny model and a fast run, so a training step takes
milliseconds. Imported by the test files (pytest puts tests/ on sys.path)."""
from pathlib import Path

import numpy as np

# --model-* flags: a two-level, 8-channel U-Net without attention
TINY = ["--model-base-channels", "8", "--model-channel-mults", "1,2", "--model-num-res-blocks", "1",
        "--model-attention-levels", "", "--model-norm-groups", "4", "--model-head-channels", "8"]
# small batches, small grids, a metrics row every step, no progress bar
FAST = ["--batch-size", "8", "--num-samples", "4", "--sample-steps", "2", "--log-every", "1", "--quiet"]


def write_tiny_npz(path: Path, count: int) -> Path:
    """`count` random 12x12 grayscale images in two classes, as an .npz; returns `path`."""
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, (count, 12, 12), dtype=np.uint8), labels=rng.integers(0, 2, count))
    return path
