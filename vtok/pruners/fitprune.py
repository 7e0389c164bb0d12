"""FitPrune (Ye et al., "Fit and Prune: Fast and Training-free Visual Token Pruning for Multi-modal Large Language
Models", arXiv 2409.10197, AAAI 2025).

FitPrune has two parts:

* **The recipe** (Sec. 3.2–3.3): how many visual tokens to drop in each LLM layer, fitted offline on a few
  calibration samples by a binary search over ``α``. In layer ``l`` a sample drops the visual tokens whose removal
  keeps the attention mass the visual tokens receive within ``(1 − α)`` of the unpruned model's mass at ``l`` (both
  for the image's own queries, "self", and for the text queries after it, "cross"); the search finds the smallest
  ``α`` whose recipe meets the FLOPs budget. :func:`deletion_count`, :func:`layer_flops` and :func:`budget_reached`
  are those steps on plain numbers; ``vtok.hooks.hf.fit_fitprune`` runs them on a wrapped model and returns the
  schedule as ``layer=[...], keep=[...]`` for ``vtok.wrap``.
* **The pruning** (Eq. 7–8 and the authors' code): in a recipe layer, drop the visual tokens with the lowest
  ``cross × self``, both read from that layer's attention with heads max-reduced. In the authors' code the drop
  happens after layer ``l``'s attention (its KV cache keeps every token), which for the kept tokens is exactly a vtok
  in-LLM stage entering layer ``l + 1`` that reads layer ``l``'s attention (``Placement.attn_layer="previous"``).
  Positions stay the original ones (their code gathers ``position_ids``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.kernels.reference import acc
from vtok.pruners._checks import check_k
from vtok.pruners.registry import Placement, register
from vtok.selection import Selection


@register("fitprune", family="attention", needs=("self_cross_attn",), placement=Placement(positions="original"),
          paper="Fit and Prune: Fast and Training-free Visual Token Pruning for Multi-modal Large Language Models "
                "(arXiv 2409.10197)")
def fitprune_select(tokens: Tensor, k: int, ctx: Context) -> Selection:
    """FitPrune (Sec. 3.3, Eq. 7–8): keep the ``k`` visual tokens with the largest ``cross × self`` attention.

    ``self_cross_attn`` ``[B, 2, N]``: row 0 the attention each token receives from the image's own tokens (heads
    max-reduced, summed over those queries, divided by their count), row 1 from the text queries after the image
    (summed); ``vtok.wrap`` reads both from layer ``K − 1``'s attention. Use the fitted per-layer recipe as a
    multi-stage schedule (``vtok.hooks.hf.fit_fitprune``). Ties → lowest index kept (the authors' ``torch.sort``
    leaves them unspecified).
    """
    b, n = tokens.shape[:2]
    check_k(k, n)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    a = acc(ctx["self_cross_attn"])
    return Selection(ops.stable_topk(a[:, 0] * a[:, 1], k), n)


def deletion_count(scores: Tensor, reference: float, alpha: float) -> int:
    """How many of the lowest ``scores [N]`` (one sample's per-token attention mass at one layer) can be dropped while
    the rest keeps at least ``(1 − alpha) · reference`` (the unpruned model's mass at that layer): the authors' loop
    stops at the first ``i`` whose drop falls below that and drops ``max(i − 1, 0)``; where no ``i < N`` falls below,
    ``N − 1`` (one token stays; their loop leaves that case undefined)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if scores.dim() != 1:
        raise ValueError(f"scores must have shape [N], got {list(scores.shape)}")
    n = scores.numel()
    if n < 2:
        return 0
    s = torch.sort(scores.double()).values
    remaining = s.sum() - torch.cat([s.new_zeros(1), s.cumsum(0)[:-1]])  # remaining[i]: after dropping the i lowest
    below = (remaining < (1.0 - alpha) * reference).nonzero()
    return max(int(below[0]) - 1, 0) if len(below) else n - 1


def layer_flops(n: int, hidden: int, kv: int, ffn: int) -> tuple[float, float]:
    """FLOPs of ``n`` visual tokens in one decoder layer, split as FitPrune's budget counts them: ``(before, after)``
    the pruning point: q/k/v projections + the ``n × n`` attention products, then the output projection + MLP.
    ``kv`` is the width of k and v (grouped-query attention), ``ffn`` the MLP's inner width (gated: 3 matrices)."""
    before = n * hidden * (hidden + 2 * kv) + 2 * n * n * hidden
    after = n * hidden * hidden + 3 * n * hidden * ffn
    return float(before), float(after)


def budget_reached(counts: list[int], layer: int, used: list[float], layers: int, hidden: int, kv: int, ffn: int,
                   budget: float) -> bool:
    """FitPrune's stopping rule before pruning in ``layer``: the mean over samples of what they used so far (``used``,
    including this layer's part before the pruning point) plus the forecast at their current counts (this layer's
    rest and every later layer) is within ``budget``."""
    total = 0.0
    for n, u in zip(counts, used, strict=True):
        before, after = layer_flops(n, hidden, kv, ffn)
        total += u + after + (layers - 1 - layer) * (before + after)
    return total / len(counts) <= budget
