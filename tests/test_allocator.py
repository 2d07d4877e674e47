"""keep_freed_memory: after it, freed activation-sized buffers are reused instead of page-faulted in anew."""
import subprocess
import sys

import pytest

CHILD = """
import resource, torch
from diffunet.allocator import keep_freed_memory

def step():                                 # like a training step: many activations live, then all freed
    maps = [torch.empty(2 << 20).fill_(1.0) for _ in range(8)]   # 8 x 8 MiB, every page touched

def faults_per_step():
    for _ in range(3):                      # warm-up: the heap grows once
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10

default = faults_per_step()
accepted = keep_freed_memory()
print(default, accepted, faults_per_step())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux-only")
def test_freed_buffers_are_reused_instead_of_faulted_in():
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    default, accepted, tuned = result.stdout.split()
    if accepted != "True":
        pytest.skip("this C library has no mallopt (not glibc)")
    assert float(default) > 4000          # 64 MiB = 16,384 pages, most faulted in again on every step
    assert float(tuned) < 100             # reused: no new pages
