"""Coverage strategies: SCOPE (saliency × coverage gain, greedy facility-location selection).

The coverage of a kept set ``S`` is ``Σ_v max_{s ∈ S} max(0, cos(x_v, x_s))`` (how well every token is represented
by its most similar kept token); the greedy adds the token whose coverage gain, weighted by its saliency, is
largest. The sample's ``N × N`` cosine matrix is built once per sample, in row blocks of ``reference.DEFAULT_CHUNK``,
while it fits ``reference.GRAM_MAX_ELEMENTS``; above it the rows a step needs are recomputed block by block (memory
``O(chunk · N)``, the same values, slower). Each step costs ``O(N)`` plus ``O(N)`` per token whose coverage rose.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from vtok.context import Context
from vtok.kernels import reference as ref
from vtok.kernels.reference import acc
from vtok.pruners._checks import check_k
from vtok.pruners.registry import Placement, register
from vtok.selection import Selection

_COMBINE = ("multi", "add")



def scope_greedy(tokens: Tensor, saliency: Tensor, k: int, *, alpha: float = 1.0, combine: str = "multi") -> Tensor:
    """``[B, k]`` SCOPE picks in pick order for ``tokens [B, N, D]`` and ``saliency [B, N]`` (>= 0).

    Per sample: ``S = cos(x_i, x_j)``, ``m_v = 0``; ``k`` times: ``gain_u = Σ_v max(0, S_vu − m_v)`` (the token-
    coverage gain), score ``gain_u · saliency_u^α`` (``combine="multi"``) or ``gain_u + saliency_u^α`` (``"add"``),
    take the best unpicked ``u`` (ties → lowest index), ``m ← max(m, S_u)``. The gains are updated incrementally
    (float64) over the tokens whose coverage ``m_v`` rose, instead of re-summing all ``N × N`` terms each step as the
    authors' code does; the same values up to rounding.
    """
    x = acc(tokens)
    b, n = x.shape[:2]
    sal = saliency.double().clamp_min(0) ** alpha
    out = torch.empty(b, k, dtype=torch.long, device=x.device)
    chunk = ref.DEFAULT_CHUNK
    for i in range(b):
        xn = F.normalize(x[i], dim=-1)
        sim = _Rows(xn, chunk, cache=ref.gram_groups(1, n) is not None)  # symmetric: column u = row u
        cover = torch.zeros(n, dtype=x.dtype, device=x.device)
        picked = torch.zeros(n, dtype=torch.bool, device=x.device)
        gain = torch.zeros(n, dtype=torch.float64, device=x.device)  # Σ_v max(0, S_vu − m_v) with m = 0
        for a in range(0, n, chunk):
            gain += sim.block(a).clamp_min(0).sum(0, dtype=torch.float64)
        for t in range(k):
            score = gain * sal[i] if combine == "multi" else gain + sal[i]
            u = int(score.masked_fill(picked, float("-inf")).argmax())
            out[i, t] = u
            picked[u] = True
            new = torch.maximum(cover, sim.row(u))
            rows = (new > cover).nonzero()[:, 0]  # only tokens whose coverage rose change any gain
            if rows.numel():
                block = sim.rows(rows)
                gain -= ((block - cover[rows, None]).clamp_min(0) - (block - new[rows, None]).clamp_min(0)).sum(
                    0, dtype=torch.float64)
            cover = new
    return out


class _Rows:
    """Rows of the cosine matrix ``xn xnᵀ`` as row blocks of ``chunk`` compute them: kept (one ``N × N``) when
    ``cache``, else recomputed block by block on demand (memory ``O(chunk · N)``); the same values either way."""

    def __init__(self, xn: Tensor, chunk: int, cache: bool):
        self.xn, self.chunk = xn, chunk
        self.full = torch.cat([self._compute(a) for a in range(0, xn.shape[0], chunk)]) if cache else None

    def _compute(self, a: int) -> Tensor:
        return self.xn[a:a + self.chunk] @ self.xn.T

    def block(self, a: int) -> Tensor:
        return self.full[a:a + self.chunk] if self.full is not None else self._compute(a)

    def row(self, u: int) -> Tensor:
        if self.full is not None:
            return self.full[u]
        a = u // self.chunk * self.chunk
        return self._compute(a)[u - a]

    def rows(self, idx: Tensor) -> Tensor:
        if self.full is not None:
            return self.full.index_select(0, idx)
        out = torch.empty(idx.numel(), self.xn.shape[0], dtype=self.xn.dtype, device=self.xn.device)
        blk = torch.div(idx, self.chunk, rounding_mode="floor")
        for q in torch.unique(blk).tolist():
            sel = (blk == q).nonzero()[:, 0]
            out[sel] = self._compute(q * self.chunk).index_select(0, idx[sel] - q * self.chunk)
        return out


@register("scope", family="diversity", needs=("cls_attn",), placement=Placement(layer=-2, at="output", prop_attn=False),
          paper="SCOPE: Saliency-Coverage Oriented Token Pruning for Efficient Multimodel LLMs (NeurIPS 2025, "
                "arXiv 2510.24214)")
def scope_select(tokens: Tensor, k: int, ctx: Context, *, alpha: float = 1.0, combine: str = "multi") -> Selection:
    """SCOPE: greedily keep the tokens with the highest saliency-weighted coverage gain (exact ``k``).

    Paper Sec. 3: set coverage from the tokens' cosine similarities, the token-coverage gain of each unselected
    token, and the SCOPE score = gain × saliency^α, selected iteratively (:func:`scope_greedy`). Saliency is the
    encoder's [CLS] attention ``cls_attn`` (``[B, N]``, or ``[B, H, N]`` head-averaged; the authors sum over heads,
    the same ranking for ``combine="multi"``), similarity the cosine of ``tokens [B, N, D]`` (the feature layer's
    patch tokens, as their code). Follows the authors' code: coverage is the soft sum
    ``Σ_v max(0, S_vu − m_v)`` (the paper also discusses a thresholded θ-coverage), ``alpha`` defaults to their
    ``1.0`` and ``combine`` to ``"multi"`` (their ``"add"`` adds ``saliency^α``; with per-head input they add the
    head *sum*, here the head mean). Negative saliency is clamped to 0. Returns ``keep [B, k]`` ascending.
    """
    b, n = tokens.shape[:2]
    if combine not in _COMBINE:
        raise ValueError(f"combine must be one of {list(_COMBINE)}, got {combine!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not float(alpha) >= 0:
        raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
    check_k(k, n)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    sal = acc(ctx["cls_attn"])
    sal = sal.mean(1) if sal.dim() == 3 else sal
    return Selection.from_indices(scope_greedy(tokens, sal, k, alpha=float(alpha), combine=combine), n)
