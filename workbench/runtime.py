"""Run-time switches and facts: quick mode, the CPU allocator a benchmark may opt into, and a one-line
description of the machine for benchmarks."""

from __future__ import annotations

import ctypes
import os
import platform
import sys

import torch

__all__ = ["describe_machine", "quick_mode", "steady_cpu_allocator"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_KEEP_BYTES = 1 << 30
_allocator_is_steady = False


def quick_mode() -> bool:
    """True when ``WORKBENCH_QUICK=1`` (set by the tests): notebooks and long routines shrink to ~1 minute."""
    value = os.environ.get("WORKBENCH_QUICK", "0").strip().lower()
    if value not in {"", "0", "1", "false", "true", "no", "yes"}:
        raise ValueError(f"WORKBENCH_QUICK must be 0 or 1, got {value!r}")
    return value in {"1", "true", "yes"}


def steady_cpu_allocator() -> bool:
    """Make glibc's malloc keep freed memory for reuse, for the rest of this process; False where it is not glibc.

    A process-wide change: call it only from a benchmark's entry point (``python -m workbench bench``
    does, and its first output line says so through :func:`describe_machine`), never from library code or a
    notebook. By default glibc gives a large block (above a threshold that adapts up to 32 MiB) fresh pages
    from the OS on every allocation, each page faulting on first touch, and hands freed memory at the top
    of the heap back. PyTorch on a CPU allocates every activation afresh, so a call on a large canvas pays
    more of those faults than the same work cut into small patches, which skews timings that compare the
    two. Raising both thresholds to 1 GiB takes the effect out (the memory stays with the process).
    Processes started from here afterwards (the ranks of a launch) get the same through the environment.
    """
    global _allocator_is_steady
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another C library
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES) and mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES):
        _allocator_is_steady = True
        os.environ["MALLOC_MMAP_THRESHOLD_"] = os.environ["MALLOC_TRIM_THRESHOLD_"] = str(_KEEP_BYTES)
    return _allocator_is_steady


def describe_machine() -> str:
    """CPU, core count, torch threads, GPU (if any) and allocator: the line every benchmark prints first."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    allocator = (
        "glibc malloc keeps freed memory (steady_cpu_allocator, set for this benchmark process)"
        if _allocator_is_steady
        else "default allocator"
    )
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, {gpu}, "
        f"{allocator}"
    )
