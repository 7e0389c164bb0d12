"""Baseline ``uniform``: evenly spaced token indices (bin centres).

A baseline every comparison must report; independent benchmarks find random pruning a surprisingly strong
baseline (see ``shared/METHODS.md``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vtok.context import Context
from vtok.pruners.registry import register
from vtok.selection import Selection


@register("uniform", family="baseline", paper="baseline: evenly spaced indices")
def uniform_select(tokens: Tensor, k: int, ctx: Context) -> Selection:
    """Keep ``k`` evenly spaced tokens: index ``floor((j + 1/2) * N / k)`` for ``j = 0..k-1`` (bin centres)."""
    b, n = tokens.shape[:2]
    j = torch.arange(k, device=tokens.device)
    idx = ((2 * j + 1) * n) // (2 * k)
    return Selection(idx.expand(b, k).contiguous(), n)
