"""Fixtures shared by several test files."""
from pathlib import Path

import pytest
import torch

from helpers import write_tiny_npz


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared CPU their spin-waits cost seconds
    (10-50x for small elementwise ops). One thread for the test, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory) -> Path:
    """16 random 12x12 grayscale images in two classes, as an .npz a training step reads in milliseconds."""
    return write_tiny_npz(tmp_path_factory.mktemp("tiny_data") / "tiny.npz", 16)
