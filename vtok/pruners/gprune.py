"""Graph-propagation strategies: G-Prune (importance propagated over a token-similarity graph, then top-k).

The graph is the thresholded, temperature-softmaxed cosine-similarity matrix of one sample's tokens, ``N × N``, in
row blocks of ``reference.DEFAULT_CHUNK``: kept for all ``iters`` propagation steps while one sample's matrix fits
``reference.GRAM_MAX_ELEMENTS``, recomputed block by block at every step above it (memory ``O(chunk · N)``, the same
blocks and summation order, so the same scores). ``iters`` vector–matrix products (``O(iters · N^2)``) replace the
authors' matrix power (``O(log(iters) · N^3)``), the same product by associativity.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.kernels import reference as ref
from vtok.kernels.reference import acc
from vtok.pruners._checks import check_k
from vtok.pruners.registry import Placement, register
from vtok.selection import Selection


def gprune_scores(tokens: Tensor, *, threshold: float = 0.5, temperature: float = 0.03, iters: int = 5) -> Tensor:
    """``[B, N]`` G-Prune importance of ``tokens [B, N, D]`` after ``iters`` rounds of information propagation.

    Per sample: ``S = cos(x_i, x_j)``; links below ``threshold`` are cut; each row of the kept links is a
    softmax of ``S_ij / temperature`` over its neighbours (a row-stochastic transition matrix ``P``; the token
    itself is always a neighbour, ``cos = 1``); the degree ``deg_j`` counts ``j``'s neighbours. Initial
    information is the feature norm ``w_i = ||x_i||``; after ``iters`` steps ``s = w P^iters`` (``s_j = Σ_i w_i
    (P^iters)_ij``: each token passes its information to its neighbours in proportion to similarity), and the
    score is ``s_j / deg_j``.
    """
    x = acc(tokens)
    n = x.shape[1]
    out = torch.empty(x.shape[:2], dtype=x.dtype, device=x.device)
    cache = ref.gram_groups(1, n) is not None  # one sample's N x N fits: transition blocks built once
    for b in range(x.shape[0]):
        xn = F.normalize(x[b], dim=-1)
        blocks = range(0, n, ref.DEFAULT_CHUNK)

        def transition(a: int, xn: Tensor = xn) -> tuple[Tensor, Tensor]:
            """Rows ``[a, a + chunk)`` of ``P`` and their degrees (the same block GEMM on both paths)."""
            sim = xn[a:a + ref.DEFAULT_CHUNK] @ xn.T
            linked = sim >= threshold
            logits = torch.where(linked, sim / temperature, torch.full_like(sim, float("-inf")))
            empty = ~linked.any(1, keepdim=True)  # only a zero vector (cos 0 with itself) has no link
            p = torch.softmax(torch.where(empty, torch.zeros_like(logits), logits), dim=1)
            deg = torch.where(empty[:, 0], torch.full_like(p[:, 0], n), linked.sum(1).to(x.dtype))
            return p, deg

        kept = [transition(a) for a in blocks] if cache else None
        deg = torch.cat([blk[1] for blk in kept]) if cache else torch.cat([transition(a)[1] for a in blocks])
        s = x[b].norm(dim=-1)
        for _ in range(iters):  # s P = Σ over row blocks of s[block] P[block], in block order on both paths
            nxt = torch.zeros_like(s)
            for i, a in enumerate(blocks):
                p = kept[i][0] if cache else transition(a)[0]
                nxt = nxt + s[a:a + ref.DEFAULT_CHUNK] @ p
            s = nxt
        out[b] = s / deg
    return out


@register("gprune", family="clustering", placement=Placement(layer=-2, at="output", prop_attn=False),
          paper="G-Prune: What Kind of Visual Tokens Do We Need? Training-free Visual Token Pruning for Multi-modal "
                "Large Language Models from the Perspective of Graph (AAAI 2025, arXiv 2501.02268)")
def gprune_select(tokens: Tensor, k: int, ctx: Context, *, threshold: float = 0.5, temperature: float = 0.03,
                  iters: int = 5) -> Selection:
    """G-Prune: keep the ``k`` tokens with the most information after propagation over a similarity graph.

    Paper (method section): visual tokens are nodes, edges link semantically similar tokens (cosine similarity),
    information flows along the weighted links for a few iterations, and the tokens holding the most information
    are kept — foreground or background alike. Details follow the authors' code (LLaVA-NeXT, their defaults):
    links with ``cos < threshold`` (``0.5``) are cut, the remaining weights are a row softmax of ``cos / temperature``
    (``0.03``), the initial information is each token's feature norm, ``iters`` (``5``) propagation steps
    (their ``matrix_power``; here repeated vector–matrix products, the same product), then the result is divided
    by each token's degree and the top-``k`` are kept (:func:`gprune_scores`). ``tokens [B, N, D]``: the code uses
    the projector's output; pass projected tokens to match it. The code prunes the base image and the anyres
    crops as two separate graphs: one call per image grid here. Returns ``keep [B, k]`` ascending; ties → lowest
    index.
    """
    b, n = tokens.shape[:2]
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not -1.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {threshold!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not float(temperature) > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    check_k(k, n)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    scores = gprune_scores(tokens, threshold=float(threshold), temperature=float(temperature), iters=iters)
    return Selection(ops.stable_topk(scores, k), n)
