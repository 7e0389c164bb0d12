"""Baseline ``random``: a uniformly random subset of the tokens (seeded).

A baseline every comparison must report; independent benchmarks find random pruning a surprisingly strong
baseline (see ``shared/METHODS.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from vtok.context import Context
from vtok.pruners.registry import register
from vtok.selection import Selection


@register("random", family="baseline", paper="baseline: uniformly random subset (seeded)")
def random_select(tokens: Tensor, k: int, ctx: Context, *, seed: int | Sequence[int] = 0) -> Selection:
    """Keep a uniformly random subset of ``k`` of the ``N`` tokens ``[B, N, D]``.

    The subset depends only on ``(seed, N, k)``, never on the device or the rest of the batch, so a
    batch gives the same per-sample result as running samples one by one. With one ``seed`` every sample
    keeps the same indices; pass one seed per sample (``seed=[0, 1, 2, 3]``) for different subsets.
    """
    b, n = tokens.shape[:2]
    seeds = [int(seed)] * b if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != b:
        raise ValueError(f"seed must be an int or one int per sample (B={b}), got {len(seeds)} seeds")
    cache: dict[int, Tensor] = {}
    rows = []
    for s in seeds:
        if s not in cache:
            g = torch.Generator().manual_seed(s)
            cache[s] = torch.randperm(n, generator=g)[:k].sort().values
        rows.append(cache[s])
    return Selection(torch.stack(rows).to(tokens.device), n)
