"""Baseline ``pool2d``: 2-D average pooling of the patch grid (LLaVA-style spatial pooling).

A baseline every comparison must report; independent benchmarks find random pruning a surprisingly strong
baseline (see ``shared/METHODS.md``).
"""

from __future__ import annotations

from torch import Tensor

from vtok.context import Context
from vtok.pruners._grid import grid_bins, pool_grid
from vtok.pruners.registry import register
from vtok.selection import Selection


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
    row_cell, row_mid = grid_bins(h, oh, tokens.device)
    col_cell, col_mid = grid_bins(w, ow, tokens.device)
    assign = (row_cell[:, None] * ow + col_cell[None, :]).reshape(n)
    keep = (row_mid[:, None] * w + col_mid[None, :]).reshape(k)
    return Selection(keep.expand(b, k).contiguous(), n, assign.expand(b, n).contiguous())
