"""PruneVid / FastVID segment clustering: cut the clip into scenes, merge static tokens over time within each,
cluster the rest.

On video tokens ``[B, T·P, D]``, frame-major (``frames=T`` in context, ``grid=(h, w)`` the grid of one frame);
see ``vtok.pruners._video``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.kernels.reference import acc, acc_dtype
from vtok.pruners._checks import check_int, check_real
from vtok.pruners._video import allocate, frame_layout, from_groups
from vtok.pruners.registry import get, register
from vtok.selection import Selection

PRUNEVID = ("PruneVid: Visual Token Pruning for Efficient Video LLMs (arXiv 2412.16117); FastVID: Dynamic "
            "Density Pruning for Fast Video LLMs (arXiv 2503.11187)")


def frame_similarity(tokens: Tensor, frames: int) -> Tensor:
    """``[B, T]``: mean over grid positions of the cosine similarity of each frame's tokens with the previous frame's
    at the same positions (frame 0: 1)."""
    _, sim = ops.segment_stats(tokens.detach(), frames)
    out = sim.mean(2)
    out[:, 0] = 1.0
    return out


def segment_frames(tokens: Tensor, frames: int, *, threshold: float = 0.9, min_segments: int = 1) -> list[list[int]]:
    """Per sample, the first frame of each segment (always starting with 0).

    FastVID's dynamic segmentation (arXiv 2503.11187, DySeg): the cuts are the transitions whose consecutive-frame
    similarity is below ``threshold`` (its S2; FastVID uses 0.9) together with the ``min_segments − 1`` least similar
    transitions (its S1; FastVID uses at least 8 segments, vtok defaults to 1), ties → earlier frame. FastVID compares
    one global feature per frame; here the similarity is the mean over grid positions of the same-position cosine
    (:func:`frame_similarity`), which needs no [CLS] / pooled feature.
    """
    sim = frame_similarity(tokens, frames).cpu()
    out = []
    for row in sim:
        cuts = {i for i in range(1, frames) if float(row[i]) < threshold}
        need = min(min_segments, frames) - 1 - len(cuts)
        if need > 0:
            rest = torch.sort(row[1:], stable=True).indices.add(1).tolist()
            cuts |= set([i for i in rest if i not in cuts][:need])
        out.append([0] + sorted(cuts))
    return out


def _dpc_groups(feat: Tensor, k: int, knn: int) -> Tensor:
    """Density-peaks clustering of ``feat [M, D]`` into ``k`` clusters with vtok's ``dpc_knn`` (the DPC-kNN of
    TCFormer / Chat-UniVi's ``cluster_dpc_knn``, which PruneVid's code calls): ``[M]`` the index (into ``feat``) of
    each unit's centre."""
    m = feat.shape[0]
    if k >= m:
        return torch.arange(m, device=feat.device)
    sel = get("dpc_knn").fn(feat[None], k, Context(), knn=knn, order="position")
    return sel.keep[0][sel.assign[0]]


@register("segment_cluster", family="temporal", needs=("frames",), merges=True, paper=PRUNEVID)
def segment_cluster(tokens: Tensor, k: int, ctx: Context, *, mode: str = "prunevid", threshold: float = 0.9,
                    min_segments: int = 1, static_threshold: float = 0.8, knn: int = 7) -> Selection:
    """Cut the clip into scenes, merge static tokens over time within each, cluster the rest (PruneVid / FastVID).

    Segments come from :func:`segment_frames` (FastVID's DySeg: cut where consecutive-frame similarity drops below
    ``threshold``, at least ``min_segments``). The budget is split over segments in proportion to their token counts
    (:func:`allocate`). Within a segment of ``L`` frames:

    - ``mode="prunevid"`` (PruneVid, arXiv 2412.16117, Sec. 3.2): a grid position whose mean cosine similarity over
      all pairs of the segment's frames (its Eq. 3) is at least ``static_threshold`` (0.8, the authors' default) is
      *static* and its ``L`` tokens are averaged into one (its Eq. 4; most static first, as long as the segment stays
      above its budget); the units (static merges and the remaining dynamic tokens) are then clustered with DPC-kNN
      (``knn`` = 7 neighbours, the authors' default). Differences from the authors' code (``merge_tokens`` in their
      PLLaVA integration): they segment the frames by DPC-kNN clustering of frame features into ``0.25·T`` segments
      (here: FastVID's threshold cut, so the scene cut decides), and they cluster static and dynamic tokens
      separately (the dynamic ones per frame) to a fixed ``cluster_ratio`` instead of an exact budget.
    - ``mode="fastvid"`` (FastVID, arXiv 2503.11187, STPrune: density-based spatio-temporal pruning): no static
      pass; density peaks over all the segment's tokens in space and time pick the anchors, every other token
      merges into its nearest anchor.

    Each output token is the mean of its members and takes the position of its centre (a static unit's position is
    its first frame's token). Clusters never cross a segment boundary. ``tokens [B, T·P, D]`` → merging ``Selection``.
    """
    if mode not in ("prunevid", "fastvid"):
        raise ValueError(f"mode must be 'prunevid' or 'fastvid', got {mode!r}")
    threshold = check_real("threshold", threshold)
    static_threshold = check_real("static_threshold", static_threshold)
    min_segments = check_int("min_segments", min_segments, 1)
    knn = check_int("knn", knn, 1)
    b, n, d = tokens.shape
    t, p, _ = frame_layout(tokens, ctx)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    x = tokens.detach()
    targets = []
    for s, starts in enumerate(segment_frames(x, t, threshold=threshold, min_segments=min_segments)):
        bounds = starts + [t]
        sizes = torch.tensor([(bounds[i + 1] - bounds[i]) * p for i in range(len(starts))])
        budgets = allocate(k, sizes.double(), sizes).tolist()
        target = torch.full((n,), -1, dtype=torch.long, device=x.device)
        for (f0, f1), ks in zip(zip(bounds[:-1], bounds[1:], strict=True), budgets, strict=True):
            if ks == 0:
                continue
            pos = torch.arange(f0 * p, f1 * p, device=x.device).view(f1 - f0, p)  # [L, P] token positions
            static = torch.zeros(p, dtype=torch.bool, device=x.device)
            length = f1 - f0
            if mode == "prunevid" and length > 1:
                xn = torch.nn.functional.normalize(acc(x[s, f0 * p:f1 * p]).view(length, p, d), dim=-1)
                tot = xn.sum(0)  # mean over pairs t != t' of cos = (|sum_t xn_t|^2 - L) / (L (L - 1))
                stat = ((tot * tot).sum(-1) - length) / (length * (length - 1))  # [P]
                count = length * p
                for i in torch.sort(stat, descending=True, stable=True).indices.tolist():
                    if float(stat[i]) < static_threshold or count - (length - 1) < ks:
                        break
                    static[i] = True
                    count -= length - 1
            # units: one per static position (all L tokens, in position order), then each dynamic token (frame-major)
            n_static = int(static.sum())
            stat_all = static[None, :].expand(length, p).reshape(-1)
            dyn_rank = torch.cumsum((~stat_all).long(), 0) - 1
            member_unit = torch.where(stat_all, (torch.cumsum(static.long(), 0) - 1).repeat(length),
                                      n_static + dyn_rank)
            members = pos.reshape(-1)
            m = n_static + int((~stat_all).sum())
            rep = torch.empty(m, dtype=torch.long, device=x.device)  # each unit's position: its first token
            rep[n_static + dyn_rank[~stat_all]] = members[~stat_all]
            rep[:n_static] = pos[0, static]
            feat = torch.zeros(m, d, device=x.device, dtype=acc_dtype(x))
            feat.index_add_(0, member_unit, acc(x[s, members]))
            feat /= torch.bincount(member_unit, minlength=m).to(feat.dtype)[:, None]
            centre = _dpc_groups(feat, ks, knn)  # unit → centre unit
            target[members] = rep[centre[member_unit]]
        targets.append(target)
    return from_groups(torch.stack(targets), n)
