"""keep_freed_memory: after it, freed activation-sized buffers are reused instead of page-faulted in anew."""
import subprocess
import sys

import pytest

CHILD = """
import ctypes, ctypes.util, resource
from diffunet.allocator import keep_freed_memory

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 8 << 20

def step():                                 # like a training step: many activations live, then all freed
    blocks = [libc.malloc(SIZE) for _ in range(8)]
    for block in blocks:
        ctypes.memset(block, 1, SIZE)       # touch every page
    for block in blocks:
        libc.free(block)

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
