"""Graph-propagation strategies: G-Prune (importance propagated over a token-similarity graph, then top-k).

The graph is the thresholded, temperature-softmaxed cosine-similarity matrix of one sample's tokens, ``N × N``:
built per sample (memory ``O(N^2)`` for one sample at a time), propagated with ``iters`` vector–matrix products
(``O(iters · N^2)``) instead of the authors' matrix power (``O(log(iters) · N^3)``), the same product by
associativity.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.pruners.registry import Placement, register
from vtok.selection import Selection


def _acc(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def gprune_scores(tokens: Tensor, *, threshold: float = 0.5, temperature: float = 0.03, iters: int = 5) -> Tensor:
    """``[B, N]`` G-Prune importance of ``tokens [B, N, D]`` after ``iters`` rounds of information propagation.

    Per sample: ``S = cos(x_i, x_j)``; links below ``threshold`` are cut; each row of the kept links is a
    softmax of ``S_ij / temperature`` over its neighbours (a row-stochastic transition matrix ``P``; the token
    itself is always a neighbour, ``cos = 1``); the degree ``deg_j`` counts ``j``'s neighbours. Initial
    information is the feature norm ``w_i = ||x_i||``; after ``iters`` steps ``s = w P^iters`` (``s_j = Σ_i w_i
    (P^iters)_ij``: each token passes its information to its neighbours in proportion to similarity), and the
    score is ``s_j / deg_j``.
    """
    x = _acc(tokens)
    out = torch.empty(x.shape[:2], dtype=x.dtype, device=x.device)
    for b in range(x.shape[0]):
        xn = F.normalize(x[b], dim=-1)
        sim = xn @ xn.T
        linked = sim >= threshold
        logits = torch.where(linked, sim / temperature, torch.full_like(sim, float("-inf")))
        rows_empty = ~linked.any(1, keepdim=True)  # only a zero vector (cos 0 with itself) has no link
        logits = torch.where(rows_empty, torch.zeros_like(logits), logits)
        p = torch.softmax(logits, dim=1)
        deg = torch.where(rows_empty[:, 0], torch.full_like(p[:, 0], p.shape[0]), linked.sum(1).to(x.dtype))
        s = x[b].norm(dim=-1)
        for _ in range(iters):
            s = s @ p
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
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > n:
        raise ValueError(f"k must be an int in [1, N={n}], got {k!r}")
    if k == n:
        return Selection.identity(b, n, tokens.device)
    scores = gprune_scores(tokens, threshold=float(threshold), temperature=float(temperature), iters=iters)
    return Selection(ops.stable_topk(scores, k), n)
