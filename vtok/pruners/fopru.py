"""FoPru (Focal Pruning, arXiv 2411.14164): tokens ranked by the vision encoder's attention-based significance,
globally or by whole rows of the patch grid.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.pruners._attention import head_mean, rank_order
from vtok.pruners._checks import check_choice, check_k
from vtok.pruners.registry import register
from vtok.selection import Selection


@register("fopru", family="attention", needs=("cls_attn",), uses=("grid",),
          paper="FoPru: Focal Pruning for Efficient Large Vision-Language Models (arXiv 2411.14164)")
def fopru_select(tokens: Tensor, k: int, ctx: Context, *, mode: str = "rank") -> Selection:
    """FoPru (Sec. 3): prune by the vision encoder's attention-based token significance, ``mode`` "rank" or "row".

    Significance is ``cls_attn`` (``[B, N]`` or ``[B, H, N]``, head-averaged; the hook may pass the CLS row
    or, for encoders without CLS, the mean attention each token receives — the paper's token significance).

    * ``mode="rank"`` (rank strategy): global top-``k`` by significance.
    * ``mode="row"`` (row strategy, needs ``grid=(h, w)``): rows of the row-major patch grid are scored by
      their total significance and kept whole, best first, preserving local continuity. Because the budget
      is exact and rows hold ``w`` tokens, the first ``k // w`` rows in row-score order are kept whole and the
      remaining ``k % w`` tokens are the most significant tokens of the next-best row (simplification: the
      paper keeps whole rows only).

    As in the paper, kept tokens are returned in original order. Ties → lowest row / token index.
    """
    b, n = tokens.shape[:2]
    check_choice("mode", mode, ("rank", "row"))
    if mode == "row" and "grid" not in ctx:
        raise ValueError("fopru mode='row' needs context 'grid' = (h, w), the patch grid of the tokens")
    check_k(k, n)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    sig = head_mean(ctx["cls_attn"])
    if mode == "rank":
        return Selection(ops.stable_topk(sig, k), n)
    h, w = ctx["grid"]
    rows = sig.view(b, h, w)
    row_order = rank_order(rows.sum(-1))  # [B, h]
    full, rem = divmod(k, w)
    keep_row = torch.zeros(b, h, dtype=torch.bool, device=sig.device)
    keep_row.scatter_(1, row_order[:, :full], True)
    mask = keep_row[:, :, None].expand(b, h, w).reshape(b, n).clone()
    if rem:
        nxt = row_order[:, full]  # [B] the next-best row
        in_row = ops.stable_topk(rows[torch.arange(b, device=sig.device), nxt], rem)  # [B, rem] column indices
        mask.scatter_(1, nxt[:, None] * w + in_row, True)
    return Selection.from_mask(mask)
