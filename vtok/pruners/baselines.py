"""Baselines every comparison must report: random, uniform stride, 2-D average pooling, lower resolution.

Independent benchmarks find random pruning a surprisingly strong baseline (see ``shared/METHODS.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from vtok.context import Context
from vtok.pruners.registry import Placement, register
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


@register("uniform", family="baseline", paper="baseline: evenly spaced indices")
def uniform_select(tokens: Tensor, k: int, ctx: Context) -> Selection:
    """Keep ``k`` evenly spaced tokens: index ``floor((j + 1/2) * N / k)`` for ``j = 0..k-1`` (bin centres)."""
    b, n = tokens.shape[:2]
    j = torch.arange(k, device=tokens.device)
    idx = ((2 * j + 1) * n) // (2 * k)
    return Selection(idx.expand(b, k).contiguous(), n)


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


def _bins(size: int, out: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Cell index of each of ``size`` positions for ``out`` non-overlapping bins, and each bin's centre."""
    edges = (torch.arange(out + 1, device=device) * size) // out  # bin i covers [edges[i], edges[i+1])
    cell = torch.bucketize(torch.arange(size, device=device), edges[1:-1], right=True)
    centre = (edges[:-1] + edges[1:] - 1) // 2
    return cell, centre


@register("pool2d", family="baseline", needs=("grid",), merges=True,
          paper="baseline: 2-D average pooling of the patch grid (as in LLaVA-style spatial pooling)")
def pool2d_select(tokens: Tensor, k: int, ctx: Context) -> Selection:
    """Average-pool the ``grid=(h, w)`` patch grid of ``tokens [B, h*w, D]`` to an ``(oh, ow)`` grid, ``oh*ow == k``.

    Rows and columns are split into non-overlapping bins ``[floor(i*h/oh), floor((i+1)*h/oh))``; when ``oh``
    divides ``h`` and ``ow`` divides ``w`` this equals ``F.avg_pool2d`` exactly. Each output token takes the
    position of its cell's centre patch (``keep``), and ``assign`` maps every patch to its cell.
    """
    b, n = tokens.shape[:2]
    h, w = ctx["grid"]
    oh, ow = pool_grid(h, w, k)
    row_cell, row_mid = _bins(h, oh, tokens.device)
    col_cell, col_mid = _bins(w, ow, tokens.device)
    assign = (row_cell[:, None] * ow + col_cell[None, :]).reshape(n)
    keep = (row_mid[:, None] * w + col_mid[None, :]).reshape(k)
    return Selection(keep.expand(b, k).contiguous(), n, assign.expand(b, n).contiguous())


@register("downsample", family="baseline", needs=("grid",), merges=True,
          paper="baseline: a lower input resolution (VTC-Bench, arXiv 2510.07143, finds plain downsampling beats many "
                "methods); Qwen-style dynamic resolution = a smaller max_pixels",
          placement=Placement(resize_input=True))
def downsample_select(tokens: Tensor, k: int, ctx: Context) -> Selection:
    """Fewer tokens by a lower resolution: the ``grid=(h, w)`` patch grid of ``tokens [B, h*w, D]`` becomes the
    ``(oh, ow)`` grid of ``pool2d`` (``oh * ow == k``, aspect ratio kept).

    Through ``vtok.wrap`` on a VLM whose tower takes any resolution (Qwen2-VL, Qwen2.5-VL) the *image* is resized
    to that grid before the tower (what a smaller ``max_pixels`` does), so the tower's own tokens of the smaller
    image are what the LLM reads, each in place of the centre token of its cell. On a fixed-resolution tower
    (LLaVA's CLIP) and on plain tensors it is the equivalent spatial pooling of the patch grid: the average of each
    cell, i.e. the same selection as ``pool2d``.
    """
    return pool2d_select(tokens, k, ctx)
