"""HoliTom outside the LLM (Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models",
arXiv 2505.21334): global temporal segmentation, static tokens merged across each segment's frames, then per-frame
dominant tokens and density-peak merging.

Written from the paper (Sec. 3, Method: "Temporal Merging", "Spatial Merging", "Inner-LLM Merging") and the authors'
code (``cokeshao/HoliTom``, ``holitom/llava_arch.py``), whose defaults it follows:

1. **Segmentation** (temporal merging): ``sim[t, p] = cos(x_{t,p}, x_{t+1,p})`` between consecutive frames; a token is
   *static* over frames ``s..e`` when every consecutive pair in between is above ``τ``. Merging a segment's static
   tokens saves ``(e − s) · #static``; a dynamic programme over the frames picks the segmentation that saves the most
   (:func:`holitom_segments`, their ``select_static_windows``: a lone frame first, then shorter windows, on ties).
2. **Static tokens** of a segment (temporal, then spatial merging): averaged over its frames, then clustered by
   DPC-kNN; each cluster is ``β · centre + (1 − β) · mean(other members)`` (their default ``β = 0.6``), placed in the
   segment's first frame.
3. **Dynamic tokens** of each frame (spatial merging): the ones with the most attention (``cls_attn``: the attention
   each token receives, their last-layer head and query mean) are kept; a ``1 − dominant`` share of a frame's count is
   DPC-kNN clusters of the rest instead (their ``D``, default 0: attention only).

The per-pool counts are the authors' ratio ``k / (N − saved)`` applied to every static pool and every frame's dynamic
pool, split exactly (largest remainders) so the total is ``k``. HoliTom's inner-LLM merge is the separate
strategy ``holitom_llm`` (an in-LLM stage); both together: ``vtok.wrap(model, ["holitom", "holitom_llm"], ...)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vtok.context import Context
from vtok.kernels.reference import acc, acc_dtype
from vtok.pruners._checks import check_int, check_k, check_real
from vtok.pruners._video import allocate, frame_layout
from vtok.pruners.dpc_knn import dpc_knn
from vtok.pruners.fastv import fastv_select
from vtok.pruners.registry import Placement, register
from vtok.selection import Selection, gather_tokens

HOLITOM = "HoliTom: Holistic Token Merging for Fast Video Large Language Models (arXiv 2505.21334)"


def static_counts(static: Tensor) -> Tensor:
    """``saved [T, T]`` (int64) from ``static [T − 1, P]`` (bool: token ``p`` similar between frames ``t`` and
    ``t + 1``): ``saved[s, e] = (e − s) · #{p static over s..e}`` for ``s < e``, else 0 (their
    ``pruned_static_count``)."""
    t = static.shape[0] + 1
    out = torch.zeros(t, t, dtype=torch.long)
    st = static.cpu()
    for s in range(t - 1):
        run = torch.cumprod(st[s:].long(), 0).sum(1)  # [T − 1 − s]: tokens static over s..s+1, s..s+2, ...
        out[s, s + 1:] = run * torch.arange(1, t - s)
    return out


def holitom_segments(static: Tensor, max_window: int = 1024) -> tuple[list[tuple[int, int]], int]:
    """The segmentation that saves the most tokens: ``([(start, end), ...], saved)`` over ``T = static.shape[0] + 1``
    frames (inclusive ends, in order), windows of at most ``max_window`` frames. Their dynamic programme: ``dp[i]`` the
    best saving of frames ``0..i``; frame ``i`` alone first, then windows of 2, 3, ... frames ending at ``i``, a
    strictly larger saving replacing the best."""
    t = static.shape[0] + 1
    saved = static_counts(static).tolist()
    dp, prev = [0] * t, [0] * t
    for i in range(t):
        best, start = (dp[i - 1] if i > 0 else 0), i
        for w in range(2, min(i + 1, max_window) + 1):
            j = i - w
            val = (dp[j] if j >= 0 else 0) + saved[j + 1][i]
            if val > best:
                best, start = val, j + 1
        dp[i], prev[i] = best, start
    segs, i = [], t - 1
    while i >= 0:
        segs.append((prev[i], i))
        i = prev[i] - 1
    return segs[::-1], dp[-1]


def _cluster(x: Tensor, c: int, knn: int, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """DPC-kNN of ``x [n, D]`` into ``c`` clusters merged as ``β · centre + (1 − β) · mean(others)`` (a lone centre
    stays itself): ``(centres [c] ascending, label [n] in 0..c−1, coef [n])``."""
    n = x.shape[0]
    if c >= n:
        return torch.arange(n), torch.arange(n), torch.ones(n, dtype=torch.float64)
    sel = dpc_knn(x[None], c, Context(), knn=min(knn, c), include_self=True, order="position")
    centres, label = sel.keep[0].cpu(), sel.assign[0].cpu()
    members = torch.bincount(label, minlength=c) - 1  # others per cluster
    is_centre = torch.zeros(n, dtype=torch.bool)
    is_centre[centres] = True
    m = members[label].double()
    coef = torch.where(is_centre, torch.where(m > 0, torch.full_like(m, beta), torch.ones_like(m)),
                       (1 - beta) / m.clamp_min(1))
    return centres, label, coef


@register("holitom", family="temporal", needs=("frames",), uses=("cls_attn", "grid"), merges=True, paper=HOLITOM)
def holitom_select(tokens: Tensor, k: int, ctx: Context, *, tau: float = 0.8, max_window: int = 1024,
                   beta: float = 0.6, knn: int = 7, dominant: float = 1.0) -> Selection:
    """HoliTom outer-LLM merging (Sec. 3, temporal and spatial merging): segment the video where tokens stay static,
    merge each segment's static tokens across its frames and space, keep each frame's most attended dynamic tokens.

    ``tokens [B, T·P, D]`` (``frames=T``), ``cls_attn [B, T·P]`` optional. Per sample: :func:`holitom_segments` of
    ``cos(x_t, x_{t+1}) > tau`` (no segmentation when ``k`` exceeds what it leaves); pools = each segment's static
    tokens (their mean over the segment's frames) and each frame's dynamic tokens; ``k`` split over the pools in
    proportion to their sizes (the authors' common ratio, exact here). A static pool: DPC-kNN clusters
    (``knn`` nearest, self included, at most the count), ``β · centre + (1 − β) · mean(others)``, at the centre's place
    in the segment's first frame. A dynamic pool of count ``c``: the ``round(c · dominant)`` most attended tokens (ties
    → lower index) plus clusters of the rest as above; without ``cls_attn`` all ``c`` are clusters. Output in
    position order (their newline layout). Options: the authors' defaults (``T=0.8``, ``MAX_WINDOW_SIZE``,
    ``BETA=0.6``, ``K=7``, ``D=0``).

    Differences: the authors' per-pool counts round (``ceil`` per frame, ``round`` per static pool), so their total
    misses ``k`` by a few tokens; their DPC-kNN adds ``rand·1e-6`` to densities (vtok breaks ties by index).
    """
    b, n, _ = tokens.shape
    check_k(k, n)
    t, p, _ = frame_layout(tokens, ctx)
    tau = check_real("tau", tau, -1.0, 1.0)
    max_window = check_int("max_window", max_window, 1)
    beta, dominant = check_real("beta", beta, 0.0, 1.0), check_real("dominant", dominant, 0.0, 1.0)
    knn = check_int("knn", knn, 1)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    att = ctx.get("cls_attn")
    if att is not None and att.dim() == 3:
        att = att.mean(1)
    positions = torch.empty(b, k, dtype=torch.long)
    assign = torch.full((b, n), -1, dtype=torch.long)
    coef = torch.zeros(b, n, dtype=torch.float64)
    for i in range(b):
        x = tokens[i].detach().reshape(t, p, -1)
        xn = F.normalize(acc(x), dim=-1)
        static = ((xn[:-1] * xn[1:]).sum(-1) > tau).cpu()  # [T − 1, P]
        segs, saved = holitom_segments(static, max_window)
        if k > n - saved:
            segs = [(f, f) for f in range(t)]
        pools: list[tuple[str, int, int, Tensor]] = []  # (kind, first frame, last frame, token indices in a frame)
        for s, e in segs:
            mask = static[s:e].all(0) if e > s else torch.zeros(p, dtype=torch.bool)
            if bool(mask.any()):
                pools.append(("static", s, e, mask.nonzero().squeeze(1)))
            pools += [("dynamic", f, f, (~mask).nonzero().squeeze(1)) for f in range(s, e + 1) if not bool(mask.all())]
        sizes = torch.tensor([len(idx) for *_, idx in pools])
        counts = allocate(k, sizes.double(), sizes).tolist()
        out: list[int] = []
        for (kind, s, e, idx), c in zip(pools, counts, strict=True):
            if c == 0:
                continue
            w = e - s + 1
            flat = [f * p + idx for f in range(s, e + 1)]  # [w] × [m] token indices
            if kind == "static":
                feats, free, c_dom = acc(x[s:e + 1, idx]).mean(0), torch.arange(len(idx)), 0
            else:
                c_dom = round(c * dominant) if att is not None else 0
                feats, free = acc(x[s, idx]), torch.arange(len(idx))
                if c_dom:
                    a = acc(att[i, flat[0]]).cpu()
                    top = torch.sort(-a, stable=True).indices[:c_dom]
                    for j in top.tolist():
                        tok = int(flat[0][j])
                        assign[i, tok], coef[i, tok] = len(out), 1.0
                        out.append(tok)
                    keep = torch.ones(len(idx), dtype=torch.bool)
                    keep[top] = False
                    free = keep.nonzero().squeeze(1)
            if c - c_dom == 0:
                continue
            centres, label, cf = _cluster(feats[free], c - c_dom, knn, beta)
            base = len(out)
            for q in centres.tolist():
                out.append(int(flat[0][free[q]]))
            for fr in flat:
                tok = fr[free]
                assign[i, tok] = base + label
                coef[i, tok] = cf / w
        order = torch.tensor(out).sort()
        remap = torch.empty(k, dtype=torch.long)
        remap[order.indices] = torch.arange(k)
        positions[i] = order.values
        assign[i] = torch.where(assign[i] >= 0, remap[assign[i].clamp_min(0)], assign[i])
    dev = tokens.device
    return Selection(positions.to(dev), n, assign.to(dev), coef=coef.to(dev, acc_dtype(tokens)))


@register("holitom_llm", family="attention", needs=("text_attn",), merges=True,
          placement=Placement(positions="original"), paper=HOLITOM)
def holitom_llm_select(tokens: Tensor, k: int, ctx: Context) -> Selection:
    """HoliTom inner-LLM merging (Sec. 3, "Inner-LLM Merging"; the authors' ``Qwen2Model_holitom.forward``): keep the
    ``k`` image tokens the last prompt token attends to most in layer ``K − 1`` (heads averaged: FastV's score,
    ``text_attn``) and merge every other one into its most cosine-similar kept token.

    The merge is their running average in position order: a kept token ``j`` receiving ``x_{i_1}, …, x_{i_m}``
    (``i_1 < … < i_m``) becomes ``h ← (h + x_i) / 2`` for each in turn, i.e. ``2^{−m} x_j + Σ_t 2^{−(m−t+1)} x_{i_t}``
    (later tokens weigh more; similarities are taken before any merge). Positions stay the original ones (their
    ``position_ids = keep_indexs``). Their defaults: ``K = HOLITOM_k``, ``k = round(N · (1 − HOLITOM_r))``, e.g.
    ``layer=18, keep=0.5`` on LLaVA-OneVision-7B; with the outer stage: ``vtok.wrap(model, ["holitom",
    "holitom_llm"], [0.15, 0.5], layer=[None, 18])`` (the in-LLM keep is of the original count: 0.075 of it).
    Ties → lowest index (attention) and the earlier kept token (similarity).
    """
    b, n, _ = tokens.shape
    sel = fastv_select(tokens, k, ctx, query_source="last")
    if k == n:
        return sel
    kept = sel.keep  # [B, k] ascending
    dropped = torch.ones(b, n, dtype=torch.bool, device=tokens.device).scatter_(1, kept, False)
    drop = torch.sort(dropped.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :n - k]
    drop = drop.sort(1).values  # [B, n − k] ascending positions (their merge order)
    x = F.normalize(acc(tokens), dim=-1)
    sim = torch.einsum("bid,bjd->bij", gather_tokens(x, drop), gather_tokens(x, kept))  # [B, n − k, k]
    target = sim.argmax(-1)  # first maximum → the earlier kept token
    # merges received after each dropped token (same target, later position): its weight is 2^-(1 + later)
    same = target[:, :, None] == target[:, None, :]  # [B, n − k, n − k]
    later = (same & torch.ones(n - k, n - k, dtype=torch.bool, device=tokens.device).triu(1)).sum(-1)
    total = torch.zeros(b, k, dtype=torch.long, device=tokens.device).scatter_add_(1, target, torch.ones_like(target))
    assign = torch.empty(b, n, dtype=torch.long, device=tokens.device)
    assign.scatter_(1, kept, torch.arange(k, device=tokens.device).expand(b, k).contiguous())
    assign.scatter_(1, drop, target)
    coef = torch.empty(b, n, dtype=torch.float64, device=tokens.device)
    coef.scatter_(1, kept, torch.pow(0.5, total.double()))
    coef.scatter_(1, drop, torch.pow(0.5, 1.0 + later.double()))
    return Selection(kept, n, assign, coef=coef.to(acc_dtype(tokens)))
