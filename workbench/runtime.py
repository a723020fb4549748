"""Run-time switches and facts: quick mode, and a one-line description of the machine for benchmarks."""

from __future__ import annotations

import os
import platform

import torch

__all__ = ["describe_machine", "quick_mode"]


def quick_mode() -> bool:
    """True when ``WORKBENCH_QUICK=1`` (set by the tests): notebooks and long routines shrink to ~1 minute."""
    value = os.environ.get("WORKBENCH_QUICK", "0").strip().lower()
    if value not in {"", "0", "1", "false", "true", "no", "yes"}:
        raise ValueError(f"WORKBENCH_QUICK must be 0 or 1, got {value!r}")
    return value in {"1", "true", "yes"}


def describe_machine() -> str:
    """CPU, core count, torch threads and GPU (if any): the line every benchmark prints first."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, {gpu}"
