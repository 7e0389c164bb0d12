"""DivPrune (arXiv 2503.02175): keep the tokens that greedily maximise the minimum pairwise cosine distance.

A *pruner* (a plain gather, no merge map): the kept tokens are real tokens in original order. The greedy max–min
loop (``ops.farthest_point`` / ``reference.max_min_diverse``) is ``k`` sequential steps. On the CPU path, where a
sample's ``N × N`` matrix fits ``reference.GRAM_MAX_ELEMENTS`` (N ≤ 4096), the cosine Gram matrix is computed once (one
GEMM, as the DivPrune code does) and each step is a row lookup, ``O(B·N)``; above it (and on CUDA, where the fused
kernel runs) each step is one ``[N, D] × [D]`` product, ``O(B·N·D)``, and no ``N × N`` matrix is built. Same picks
either way.
"""

from __future__ import annotations

from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.kernels import reference as ref
from vtok.pruners.registry import register
from vtok.selection import Selection


@register("divprune", family="diversity",
          paper="DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models (arXiv 2503.02175)")
def divprune(tokens: Tensor, k: int, ctx: Context) -> Selection:
    """Keep ``k`` of ``tokens [B, N, D]`` that greedily maximise the minimum pairwise cosine distance (DivPrune).

    DivPrune (Sec. 3, the Max–Min Diversity Problem, solved greedily as in its Algorithm 1) uses the cosine
    distance ``d(i, j) = 1 − cos(x_i, x_j)`` on the visual features. Greedy rule, as in the authors' code:

    1. the first pick is the *most isolated* token: ``argmax_i min_{j≠i} d(i, j)`` (the largest
       nearest-neighbour distance; ``ops.nearest_neighbor_distance``);
    2. then repeatedly add ``argmax_{i ∉ S} min_{j ∈ S} d(i, j)`` (``ops.farthest_point`` from that start).

    Ties go to the lowest index. Returns a plain-gather ``Selection`` with ``keep [B, k]`` sorted ascending
    (original token order). On the CPU both steps read one cosine-distance matrix (``reference.max_min_diverse``:
    one GEMM, then ``k`` row lookups) up to ``reference.GRAM_MAX_ELEMENTS`` entries per group of samples; above it,
    and on CUDA (fused ``farthest_point``), memory is ``O(B·N)`` plus one ``chunk × N`` block for step 1.
    """
    b, n, _ = tokens.shape
    if k >= n:
        return Selection.identity(b, n, tokens.device)
    if not ops.use_triton(tokens):
        return Selection.from_indices(ref.max_min_diverse(tokens, k), n)
    start = ops.nearest_neighbor_distance(tokens, metric="cosine").argmax(1)
    picks = ops.farthest_point(tokens, k, start=start, metric="cosine")
    return Selection.from_indices(picks, n)
