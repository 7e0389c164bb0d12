"""Patch-grid pooling shared by ``pool2d`` / ``downsample``, ``temporal_pool`` and the Qwen2-VL input resize:
the output grid of a budget and the bins of each axis.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def pool_grid(h: int, w: int, k: int) -> tuple[int, int]:
    """Output grid ``(oh, ow)`` with ``oh * ow == k`` exactly, ``oh <= h``, ``ow <= w``, whose aspect ratio is
    closest to ``h / w`` (ties: fewer rows). Raises ``ValueError`` when ``k`` has no such factorisation."""
    best: tuple[float, int, int] | None = None
    for oh in range(1, min(h, k) + 1):
        if k % oh:
            continue
        ow = k // oh
        if ow > w:
            continue
        cost = abs(math.log(oh / ow) - math.log(h / w))
        if best is None or cost < best[0] - 1e-12:
            best = (cost, oh, ow)
    if best is None:
        near = sorted({a * c for a in range(1, h + 1) for c in range(1, w + 1)}, key=lambda x: (abs(x - k), x))[:4]
        raise ValueError(f"keep: pool2d cannot make exactly k={k} tokens on a {h}x{w} grid (k must be oh*ow with "
                         f"oh <= {h}, ow <= {w}); nearest possible budgets: {sorted(near)}")
    return best[1], best[2]


def grid_bins(size: int, out: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Cell index of each of ``size`` positions for ``out`` non-overlapping bins, and each bin's centre."""
    edges = (torch.arange(out + 1, device=device) * size) // out  # bin i covers [edges[i], edges[i+1])
    cell = torch.bucketize(torch.arange(size, device=device), edges[1:-1], right=True)
    centre = (edges[:-1] + edges[1:] - 1) // 2
    return cell, centre
