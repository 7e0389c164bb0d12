"""Measure the largest single CPU allocation a call makes (to prove no N×N matrix is built)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def max_alloc_bytes(fn: Callable[[], object]) -> int:
    """Largest single tensor allocation (bytes) made on the CPU while running ``fn()``."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = [ev.cpu_memory_usage for ev in prof.events() if ev.cpu_memory_usage > 0]
    return max(sizes, default=0)


def nxn_bytes(b: int, n: int, dtype: torch.dtype = torch.float32) -> int:
    return b * n * n * torch.empty((), dtype=dtype).element_size()
