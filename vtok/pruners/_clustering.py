"""Helpers shared by the clustering strategies ``kmeans``, ``kmedoids`` and ``dpc_knn``.

Merging strategies return a ``Selection`` with ``assign`` (every token → its output slot) so ``apply`` averages
each group (size-weighted when ``compress`` passes ``sizes``); ``keep`` is one real token per slot, in ascending
order, giving the output token its position. k-medoids keeps the medoids themselves (a plain gather).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vtok.kernels import ops
from vtok.kernels.reference import acc
from vtok.selection import Selection


def slot_sizes(assign: Tensor, k: int, sizes: Tensor | None) -> Tensor:
    """``[B, k]``: sum of the incoming ``sizes`` (or counts) of the tokens assigned to each slot (fp32; fp64 for fp64
    ``sizes``)."""
    w = torch.ones(assign.shape, device=assign.device) if sizes is None else acc(sizes)
    return torch.zeros(assign.shape[0], k, device=assign.device, dtype=w.dtype).scatter_add_(1, assign, w)


def merge_selection(rep: Tensor, labels: Tensor, n: int, sizes: Tensor | None) -> Selection:
    """Selection from one representative token per cluster ``rep [B, c]`` (unique) and ``labels [B, N]``:
    slots are renumbered so that ``keep`` (the representatives) is ascending."""
    keep, order = rep.sort(1)
    slot_of_cluster = torch.empty_like(order).scatter_(1, order, torch.arange(rep.shape[1], device=rep.device)
                                                        .expand_as(order).contiguous())
    assign = slot_of_cluster.gather(1, labels)
    return Selection(keep, n, assign, slot_sizes(assign, rep.shape[1], sizes))


def nearest(x: Tensor, centers: Tensor, metric: str, chunk: int = 256) -> Tensor:
    """``[B, N]``: index of the nearest of ``centers [B, C, D]`` for each token (ties → lowest center index, i.e.
    the earliest in ``centers``' order), in the input's precision (fp64 stays fp64), chunked over tokens."""
    out = []
    for s in range(0, x.shape[1], chunk):
        out.append(ops.pairwise_distance_native(x[:, s:s + chunk], centers, metric).argmin(-1))
    return torch.cat(out, 1)
