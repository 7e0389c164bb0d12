"""Ordered tokens ``adaptive_length``: a prefix length per image, chosen from how well each prefix reconstructs.

An ordered 1D tokenizer (``prefix``) decodes any prefix, so the length can follow the image: a flat photo needs few
tokens, a busy one many. The strategy reads ``prefix_error [B, N]`` — the reconstruction error from the first
``j + 1`` tokens, which a tokenizer measures through its own decoder (``Tokenizer.prefix_errors``) — and returns a
ragged prefix selection (``Selection.lengths``). Two targets:

* ``target="mean"`` (default): the lengths ``k_b`` minimise the batch's total error ``Σ_b prefix_error[b, k_b − 1]``
  subject to ``Σ_b k_b = B · k`` exactly, so the batch meets the same *mean* budget as a fixed-``k`` method and
  compares with it token for token. Solved exactly by dynamic programming over the images (no convexity assumed).
  The lengths of one image depend on the rest of its batch, by design.
* ``target=τ`` (a float ``>= 0``): each image alone takes the shortest prefix whose error is ``<= τ``, capped at
  ``k`` (then ``keep`` is the cap): ElasticTok's adaptive encoding (Yan et al. 2024, arXiv 2410.08368, §3.3: the
  fewest tokens that meet a reconstruction threshold). Batch = one by one.

``min_k`` is a floor for every image in both modes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vtok.context import Context
from vtok.pruners._checks import check_int, check_k, check_real
from vtok.pruners.registry import register
from vtok.selection import Selection


def allocate_lengths(errors: Tensor, total: int, min_k: int = 1) -> Tensor:
    """Lengths ``[B]`` in ``[min_k, N]`` summing to ``total`` that minimise ``Σ_b errors[b, len_b − 1]`` (``errors
    [B, N]``), exactly, by dynamic programming over the images (ties: the shorter length for the later image)."""
    b, n = errors.shape
    if not b * min_k <= total <= b * n:
        raise ValueError(f"total must lie in [B·min_k, B·N] = [{b * min_k}, {b * n}], got {total}")
    e = errors.detach().to("cpu", torch.float64)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    best = torch.full((total + 1,), float("inf"), dtype=torch.float64)
    best[0] = 0.0
    choice = torch.zeros(b, total + 1, dtype=torch.long)
    for i in range(b):
        new = torch.full_like(best, float("inf"))
        pick = torch.zeros(total + 1, dtype=torch.long)
        for j in range(min_k, min(n, total) + 1):
            cand = torch.full_like(best, float("inf"))
            cand[j:] = best[:total + 1 - j] + e[i, j - 1]
            better = cand < new
            new = torch.where(better, cand, new)
            pick = torch.where(better, torch.full_like(pick, j), pick)
        best, choice[i] = torch.where(torch.isfinite(new), new, inf), pick
    lengths, c = torch.zeros(b, dtype=torch.long), total
    for i in range(b - 1, -1, -1):
        lengths[i] = choice[i, c]
        c -= int(lengths[i])
    return lengths


def threshold_lengths(errors: Tensor, threshold: float, cap: int, min_k: int = 1) -> Tensor:
    """Per row of ``errors [B, N]``: the shortest length ``j`` with ``errors[b, j − 1] <= threshold``, clipped to
    ``[min_k, cap]`` (``cap`` where none meets it)."""
    ok = errors[:, :cap] <= threshold
    first = torch.where(ok.any(1), ok.float().argmax(1) + 1, torch.full_like(ok[:, 0], cap, dtype=torch.long))
    return first.clamp(min=min_k, max=cap).long()


@register("adaptive_length", family="ordered", needs=("prefix_error",), ragged=True,
          paper="ElasticTok (2410.08368) §3.3 threshold mode; exact mean-budget allocation over the batch (vtok)")
def adaptive_length(tokens: Tensor, k: int, ctx: Context, *, target: str | float = "mean",
                    min_k: int = 1) -> Selection:
    """A prefix of each of the ``B`` ordered token rows ``[B, N, D]``, its length chosen from ``prefix_error``:
    mean ``k`` per image at the least total error (``target="mean"``), or the shortest prefix under the error
    ``target`` capped at ``k``. Ragged ``Selection`` (``lengths``); the identity at ``k = N`` with the mean target."""
    b, n = tokens.shape[:2]
    check_k(k, n)
    min_k = check_int("min_k", min_k, 1)
    if min_k > k:
        raise ValueError(f"min_k must be <= k={k} (the mean budget or cap), got {min_k}")
    errors = ctx["prefix_error"]
    if isinstance(target, str):
        if target != "mean":
            raise ValueError(f"target must be 'mean' or an error threshold (a float >= 0), got {target!r}")
        lengths = allocate_lengths(errors, b * k, min_k)
    else:
        lengths = threshold_lengths(errors, check_real("target", target, low=0.0), k, min_k)
    lengths = lengths.to(tokens.device)
    kmax = int(lengths.max())
    keep = torch.arange(kmax, device=tokens.device).expand(b, kmax).contiguous()
    return Selection(keep, n, lengths=None if bool((lengths == kmax).all()) else lengths)
