"""Any image strategy run inside each frame, the budget split evenly over the frames (or as given).

On video tokens ``[B, T·P, D]``, frame-major (``frames=T`` in context, ``grid=(h, w)`` the grid of one frame);
see ``vtok.pruners._video``.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from vtok.context import Context
from vtok.pruners._video import frame_layout, run_per_frame
from vtok.pruners.registry import register
from vtok.selection import Selection


def even_budgets(k: int, b: int, t: int, p: int) -> Tensor:
    """``[B, T]``: ``k`` split as evenly as possible over ``T`` frames of ``P`` tokens; the ``k mod T`` extra tokens go
    to evenly spaced frames (bin centres ``floor((2j + 1)·T / (2r))``)."""
    base, rem = divmod(k, t)
    out = torch.full((t,), base, dtype=torch.long)
    if rem:
        j = torch.arange(rem)
        out[((2 * j + 1) * t) // (2 * rem)] += 1
    return out.expand(b, t).contiguous()


@register("per_frame", family="temporal", needs=("frames",), uses=("grid",),
          paper="any image strategy applied inside each frame with an even share of the budget")
def per_frame(tokens: Tensor, k: int, ctx: Context, *, strategy: str = "uniform",
              options: Mapping[str, Any] | None = None, budgets: Sequence[int] | None = None) -> Selection:
    """Run the image strategy ``strategy`` (with its ``options``) inside each frame, the budget split evenly.

    Frame ``f`` keeps ``k // T`` tokens, plus one for ``k mod T`` evenly spaced frames (:func:`even_budgets`), or
    ``budgets[f]`` when given (one int per frame in ``[0, P]``, summing to ``k``). Other context the image strategy
    needs (``cls_attn``, ``keys``, …) is passed over all ``T·P`` tokens and cut per frame. For one budget shared by
    the whole clip, call the image strategy on the flattened tokens instead.
    """
    b, n, _ = tokens.shape
    t, p, _ = frame_layout(tokens, ctx)
    if budgets is None:
        per = even_budgets(k, b, t, p)
    else:
        vals = list(budgets)
        if (len(vals) != t or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v <= p
                                  for v in vals) or sum(vals) != k):
            raise ValueError(f"budgets must be {t} ints in [0, {p}] (one per frame) summing to k={k}, got {budgets!r}")
        per = torch.tensor(vals, dtype=torch.long).expand(b, t).contiguous()
    if k == n:
        return Selection.identity(b, n, tokens.device)
    return run_per_frame(tokens, ctx, per, strategy, options)
