"""What training on a CPU needs to run fast: freed memory kept for the next step, and whether torch.compile can
build CPU kernels here.

Plain Python/torch only: every layer may import this module.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# The largest mmap threshold glibc accepts (half its 64 MiB heap size on 64-bit): blocks up to this size come from
# the heap, larger ones are still mapped and unmapped per allocation.
MMAP_THRESHOLD_MAX = 32 << 20
TRIM_THRESHOLD = (1 << 31) - 1  # a C int: in effect, never hand the top of the heap back to the OS


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks of up to 32 MiB for reuse instead of returning them to the OS; True if it took.

    A training step allocates and frees the same large tensors (activations, logits, their gradients) every
    micro-batch. By default glibc serves such blocks with fresh mmaps, or trims the heap after they are freed, so
    every step faults its memory back in page by page and the kernel zeroes it: on a d2 GPT (4 x 4 x 256 tokens,
    vocab 4096) 44.6K page faults per step eager and 21.3K compiled, against 10 and 134 with this, for 0.85x and
    0.91x the step time (benchmarks/cpu_memory.py, benchmarks/README.md).
    The process's peak memory is the same (the next step reuses the blocks); it just stays mapped between steps.
    Process-wide and once; a no-op where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        gnu_version = libc.gnu_get_libc_version  # glibc only: musl has a mallopt that does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    del gnu_version
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the mmap threshold first: setting it also stops glibc from adjusting it (and the trim threshold) itself
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


@functools.cache
def cpu_compiler() -> str | None:
    """The C++ compiler torch.compile (Inductor) would build CPU kernels with, or None when it finds none."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # InvalidCxxCompiler, or an Inductor without this helper: then do not compile
        return None


def compile_by_default(device: torch.device) -> bool:
    """Whether ``compile=None`` compiles on ``device``: on CUDA, and on a CPU where a C++ compiler is installed
    (the compiled step is ~1.2-1.5x faster there too; nanochat d575940 compiles on every device). Not on MPS."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_compiler() is not None


__all__ = ["compile_by_default", "cpu_compiler", "keep_freed_memory"]
