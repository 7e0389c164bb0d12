"""Video strategies over flattened frame tokens ``[B, T·P, D]`` (``frames=T`` in context, ``grid=(h, w)`` the grid of
one frame, ``h·w = P``): frame redundancy merging (DyCoke), segment clustering (PruneVid / FastVID), query-driven frame
budgets (QuoTA), temporal pooling (STORM), and any image strategy run frame by frame (``per_frame``).

Every one keeps exactly ``k`` tokens, returns the identity for ``k = N``, treats each sample on its own (a batch equals
its samples one by one) and is deterministic. Tokens are frame-major: token ``t·P + i`` is grid position ``i`` of
frame ``t``.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.kernels.reference import acc, acc_dtype
from vtok.pruners._checks import check_int, check_real
from vtok.pruners._grid import grid_bins, pool_grid
from vtok.pruners.registry import get, register
from vtok.selection import Selection

DYCOKE = "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models (arXiv 2411.15024)"
PRUNEVID = ("PruneVid: Visual Token Pruning for Efficient Video LLMs (arXiv 2412.16117); FastVID: Dynamic "
            "Density Pruning for Fast Video LLMs (arXiv 2503.11187)")
QUOTA = "QuoTA: Query-oriented Token Assignment via CoT Query Decouple for Long Video Comprehension (arXiv 2503.08689)"
STORM = "STORM: Token-Efficient Long Video Understanding for Multimodal LLMs (arXiv 2503.04130)"


# ------------------------------------------------------------------------------------------------------ helpers


def frame_layout(tokens: Tensor, ctx: Context) -> tuple[int, int, tuple[int, int]]:
    """``(T, P, (h, w))`` of video tokens ``[B, T·P, D]``: frames, tokens per frame, the grid of one frame (a single
    row ``(1, P)`` when no per-frame grid is given)."""
    n = tokens.shape[1]
    t = int(ctx["frames"])
    p = n // t
    grid = ctx.frame_grid(n)
    if grid is None and "grid" in ctx:
        raise ValueError(f"context 'grid' for video tokens must be the grid of one frame (h * w == N / frames = {p}), "
                         f"got {ctx['grid']} with frames={t}")
    return t, p, grid or (1, p)


def allocate(total: int, weights: Tensor, caps: Tensor) -> Tensor:
    """Split ``total`` into integers ``[T]`` proportional to ``weights [T] >= 0`` with ``0 <= out <= caps``, summing to
    exactly ``total`` (requires ``total <= caps.sum()``).

    Water-filling: shares above their cap are clipped and the rest re-split among the others; then the floors of the
    shares are taken and the remainder goes one by one to the largest fractional parts (ties → lower index) that
    still have room. Zero total weight splits evenly. Computed in float64 on the CPU, so it does not depend on the
    device or the batch.
    """
    w = weights.detach().double().cpu().clamp_min(0)
    cap = caps.detach().long().cpu()
    if total > int(cap.sum()):
        raise ValueError(f"cannot allocate {total} over capacities summing to {int(cap.sum())}")
    if float(w.sum()) <= 0:
        w = torch.ones_like(w)
    w = torch.where(cap > 0, w, torch.zeros_like(w))
    if float(w.sum()) <= 0:
        w = (cap > 0).double()
    share = torch.zeros_like(w)
    free = cap > 0
    left = float(total)
    for _ in range(len(w) + 1):  # each round fixes at least one frame at its cap, or ends
        wf = torch.where(free, w, torch.zeros_like(w))
        if left <= 0 or float(wf.sum()) <= 0:
            break
        s = left * wf / wf.sum()
        over = free & (s >= cap.double())
        if not bool(over.any()):
            share = torch.where(free, s, share)
            break
        share = torch.where(over, cap.double(), share)
        left -= float(cap[over].sum())
        free = free & ~over
    out = torch.minimum(share.floor().long(), cap)
    rest = total - int(out.sum())
    if rest > 0:
        frac = share - share.floor()
        frac = torch.where(out < cap, frac, torch.full_like(frac, -1.0))
        order = [i for i in torch.sort(frac, descending=True, stable=True).indices.tolist() if out[i] < cap[i]]
        while rest > 0:  # one more token each, largest fractional part first, until the total is reached
            for i in order:
                if rest > 0 and out[i] < cap[i]:
                    out[i] += 1
                    rest -= 1
    return out


def _from_groups(target: Tensor, n: int) -> Selection:
    """Merging selection where every token names the *position* of the kept token it joins (``target [B, N]``,
    ``-1`` = dropped; kept tokens name themselves; each row keeps the same number of tokens)."""
    b = target.shape[0]
    ar = torch.arange(n, device=target.device).expand(b, n)
    kept = target == ar
    keep = Selection.from_mask(kept).keep
    slot = torch.full((b, n), -1, dtype=torch.long, device=target.device)
    slot.scatter_(1, keep, torch.arange(keep.shape[1], device=target.device).expand_as(keep).contiguous())
    assign = torch.where(target >= 0, slot.gather(1, target.clamp_min(0)), torch.full_like(target, -1))
    return Selection(keep, n, assign)


# ---------------------------------------------------------------------------------------------- frame_merge


@register("frame_merge", family="temporal", needs=("frames",), merges=True, paper=DYCOKE)
def frame_merge(tokens: Tensor, k: int, ctx: Context, *, window: int | None = None, merge: bool = True) -> Selection:
    """Merge each token that is nearly identical to the same grid position in an earlier kept frame into it (DyCoke).

    DyCoke's temporal token merging (arXiv 2411.15024, "Temporal Token Merging") compares each token with the token at
    the same position in an earlier frame of its window (cosine similarity) and removes the most similar ones, which
    the earlier frame already represents. Here the ``N − k`` removals are chosen globally over the clip (exact
    budget): tokens of frames ``t ≥ 1`` ranked by ``cos(x[t, i], x[t−1, i])``, most similar removed first, so a frozen
    stretch loses all but its first frame. The authors' code (``dycoke_ttm``) differs and is not reproduced: in
    windows of 4 frames it keeps frame 0, prunes frames 1 and 3 against frames 0 and 2 and then frame 2 against
    frame 0, keeping a fixed share (the least similar tokens) of every pruned frame, and it *drops* the pruned tokens
    (``merge=False`` here). ``window=W`` gives its windows: the first frame of each window is an anchor, removed only
    after every other token, and merges stay within a window. Frame 0 (and, with ``window``, the anchors) go last,
    ranked by their similarity to the next (resp. previous) frame.

    A removed token joins the latest kept token at its position earlier in its window (the "previous kept frame"),
    else the earliest later one, else it is dropped; ``apply`` averages each group. ``merge=False`` drops every
    removed token instead (plain pruning). ``tokens [B, T·P, D]`` → ``Selection`` with ``assign`` (``merge=True``).
    """
    b, n, _ = tokens.shape
    t, p, _ = frame_layout(tokens, ctx)
    win = t if window is None else check_int("window", window, 1)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    _, sim = ops.segment_stats(tokens.detach(), t)  # [B, T, P], sim[:, 0] = 0
    fidx = torch.arange(t, device=tokens.device)
    anchor = (fidx % win == 0)[None, :, None].expand(b, t, p)
    score = sim.clone()
    score[:, :1] = 0.0 if t == 1 else sim[:, 1:2]  # frame 0: ranked by similarity to frame 1 at the same position
    # tiers: frame 0 kept last (2), then window anchors (1), then the rest (0); exact two-key sort (no float offsets,
    # which would merge nearly equal similarities into ties)
    tier = torch.where(anchor & (fidx > 0)[None, :, None], 1, 0).expand(b, t, p).clone()
    tier[:, :1] = 2
    by_sim = torch.sort(score.reshape(b, n), dim=1, stable=True).indices
    by_tier = torch.sort(-tier.reshape(b, n).gather(1, by_sim), dim=1, stable=True).indices
    order = by_sim.gather(1, by_tier)  # least redundant first, highest tier first
    kept = torch.zeros(b, n, dtype=torch.bool, device=tokens.device).scatter_(1, order[:, :k], True)
    if not merge:
        return Selection(Selection.from_mask(kept).keep, n)
    kept3 = kept.view(b, t, p)
    tt = fidx[None, :, None].expand(b, t, p)
    start = (fidx // win * win)[None, :, None]
    end = torch.clamp(start + win - 1, max=t - 1)
    prev = torch.where(kept3, tt, torch.full_like(tt, -1)).cummax(1).values  # latest kept frame <= t
    later = torch.where(kept3, tt, torch.full_like(tt, t)).flip(1).cummin(1).values.flip(1)  # earliest kept >= t
    frame = torch.where(prev >= start, prev, torch.where(later <= end, later, torch.full_like(tt, -1)))
    pos = torch.arange(p, device=tokens.device)[None, None, :]
    target = torch.where(frame >= 0, frame * p + pos, torch.full_like(frame, -1)).reshape(b, n)
    return _from_groups(target, n)


# ------------------------------------------------------------------------------------------ segment_cluster


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
    return _from_groups(torch.stack(targets), n)


# ----------------------------------------------------------------------------------- per-frame image strategies

# where the token axis N sits in each tensor context key (batch first, except prev_hidden [L, B, N, D])
_TOKEN_AXIS: dict[str, Mapping[int, tuple[int, int]]] = {  # key → {ndim: (batch axis, token axis)}
    "cls_attn": {2: (0, 1), 3: (0, 2)},
    "mid_attn": {2: (0, 1), 3: (0, 2)},
    "text_attn": {2: (0, 1), 3: (0, 2), 4: (0, 3)},
    "keys": {3: (0, 1), 4: (0, 2)},
    "prev_hidden": {3: (0, 1), 4: (1, 2)},
    "sizes": {2: (0, 1)},
    "relevance_features": {3: (0, 1)},
    "seq_index": {2: (0, 1)},
}


def _frame_rows(value: Tensor, key: str, t: int, p: int) -> Tensor:
    """A context tensor of ``B`` samples over ``T·P`` tokens → the same over ``B·T`` frames of ``P`` tokens (frame
    ``f`` of sample ``b`` at row ``b·T + f``)."""
    if key == "query":
        return value.repeat_interleave(t, 0)
    if key == "attn":  # [B, (H,) N, N] → the diagonal blocks
        lead = value.shape[:-2]
        v = value.reshape(*lead, t, p, t, p).diagonal(dim1=-4, dim2=-2)  # [B, (H,) P, P, T]
        return v.movedim(-1, 1).flatten(0, 1)
    axes = _TOKEN_AXIS.get(key, {}).get(value.dim())
    if axes is None:
        raise ValueError(f"context '{key}' cannot be split frame by frame (shape {list(value.shape)})")
    bax, tax = axes
    shape = value.shape[:tax] + (t, p) + value.shape[tax + 1:]
    return value.reshape(shape).movedim(tax, bax + 1).flatten(bax, bax + 1)


def run_per_frame(tokens: Tensor, ctx: Context, budgets: Tensor, method: str,
                  options: Mapping[str, Any] | None = None) -> Selection:
    """Run the image strategy ``method`` inside every frame with its own budget ``budgets [B, T]`` (each in
    ``[0, P]``, every row summing to the same ``k``) and join the frames' selections into one over ``[B, T·P]``.

    Frames with equal budgets are run as one batch (a strategy's batch equals its samples one by one). A frame with
    budget 0 is dropped whole; budget ``P`` keeps it whole. Context tensors are cut to each frame (``grid`` is the
    per-frame grid; ``frames`` / ``frame_scores`` are not passed on). Kept positions, merge maps, sizes, emission
    order and coefficients of the frames are offset and concatenated in frame order.
    """
    info = get(method)
    if info.family == "temporal":
        raise ValueError(f"method must be an image strategy (not the temporal '{method}')")
    options = dict(options or {})
    bad = sorted(set(options) - set(info.options))
    if bad:
        raise TypeError(f"method '{method}' got unknown option(s) {bad}; its options: {sorted(info.options)}")
    b, n, d = tokens.shape
    t, p, grid = frame_layout(tokens, ctx)
    dev = tokens.device
    flat = tokens.reshape(b * t, p, d)
    kb = budgets.to(torch.long).reshape(-1).cpu()
    k = int(kb.view(b, t)[0].sum())
    off = (torch.cumsum(kb.view(b, t), 1) - kb.view(b, t)).reshape(-1)  # [B*T] first output slot of each frame
    values = {key: v for key, v in ctx.items() if key not in ("frames", "frame_scores", "grid")}
    groups = []  # (rows [R], selection over [R, P] or None for whole frames)
    for kt in torch.unique(kb).tolist():
        rows = (kb == kt).nonzero().flatten()
        if kt == 0:
            continue
        if kt == p:
            groups.append((rows, Selection.identity(len(rows), p, dev)))
            continue
        ridx = rows.to(dev)
        x = flat[ridx]  # advanced indexing: several times faster than index_select on [R, P, D] rows here
        cv = {key: ((_frame_rows(v, key, t, p)[:, ridx] if key == "prev_hidden" and v.dim() == 4
                     else _frame_rows(v, key, t, p)[ridx]) if isinstance(v, Tensor) else v)
              for key, v in values.items()}
        if ctx.get("grid") is not None or "grid" in info.needs:
            cv["grid"] = grid
        c = Context.build(x, cv)
        c.require(method, info.needs)
        groups.append((rows, info.fn(x, kt, c, **options).validate()))
    return _join(groups, off, b, t, p, k, dev)


def _join(groups: Sequence[tuple[Tensor, Selection]], off: Tensor, b: int, t: int, p: int, k: int,
          device: torch.device) -> Selection:
    """One selection over ``T·P`` tokens from per-frame selections: ``groups`` of (rows ``b·T + f``, their selection),
    ``off [B·T]`` the first output slot of every frame; frames in no group are dropped."""
    merges = any(s.assign is not None for _, s in groups)
    ordered = any(s.order is not None for _, s in groups)
    sized = any(s.size is not None for _, s in groups)
    coefs = any(s.coef is not None for _, s in groups)
    keep = torch.zeros(b * k, dtype=torch.long, device=device)
    assign = torch.full((b * t, p), -1, dtype=torch.long, device=device)
    order = torch.zeros(b * k, dtype=torch.long, device=device)
    fp64 = any(v is not None and v.dtype == torch.float64 for _, s in groups for v in (s.size, s.coef))
    size = torch.ones(b * k, device=device, dtype=torch.float64 if fp64 else torch.float32)
    coef = torch.zeros(b * t, p, device=device, dtype=size.dtype)
    for rows, s in groups:
        rows_d = rows.to(device)
        kt = s.k
        o = off.to(device)[rows_d][:, None]  # [R, 1]
        sample = (rows_d // t)[:, None]
        dst = (sample * k + o + torch.arange(kt, device=device)).reshape(-1)  # flat output slots
        keep[dst] = (s.keep + (rows_d % t)[:, None] * p).reshape(-1)
        slot = s.assign if s.assign is not None else s._slot_of_each_token()
        assign[rows_d] = torch.where(slot >= 0, slot + o, slot)
        if ordered:
            local = s.order if s.order is not None else torch.arange(kt, device=device).expand(len(rows), kt)
            order[dst] = (local + o).reshape(-1)
        if sized:
            sz = s.size
            if sz is None and s.assign is not None:  # slot-aligned member counts (token_sizes() is emitted order)
                a = s.assign
                sz = torch.zeros(a.shape[0], kt, device=device).scatter_add_(1, a.clamp_min(0), (a >= 0).float())
            if sz is not None:
                size[dst] = sz.to(size.dtype).reshape(-1)
        if coefs:
            coef[rows_d] = s._effective_coef()
    return Selection(keep.view(b, k), t * p, assign.view(b, t * p) if merges else None,
                     size.view(b, k) if sized else None, order.view(b, k) if ordered else None,
                     coef.view(b, t * p) if coefs else None)


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


# -------------------------------------------------------------------------------------------------- query_budget


def frame_relevance(tokens: Tensor, ctx: Context) -> Tensor:
    """``[B, T]``: ``frame_scores`` when given, else the cosine similarity of ``query`` (mean over its rows) with each
    frame's mean token."""
    if "frame_scores" in ctx:
        return acc(ctx["frame_scores"])
    if "query" not in ctx:
        raise ValueError("query_budget needs a relevance per frame: pass frame_scores=[B, T] (e.g. text-frame "
                         "similarity) or query=[B, D] / [B, Q, D] (a text embedding in the tokens' space)")
    b, n, d = tokens.shape
    t = int(ctx["frames"])
    q = acc(ctx["query"])
    q = q.mean(1) if q.dim() == 3 else q
    means = acc(tokens.detach()).reshape(b, t, n // t, d).mean(2).to(q.dtype)
    return torch.nn.functional.cosine_similarity(means, q[:, None, :], dim=-1)


def query_budgets(scores: Tensor, k: int, p: int, floor: int | float) -> Tensor:
    """``[B, T]`` per-frame budgets: every frame gets the floor ``f`` (an int count, or a float share of the even
    split ``k / T``; at most ``min(P, k // T)``), the remaining ``k − T·f`` tokens go to the frames in proportion to
    ``max(score, 0)`` (:func:`allocate`, each frame capped at ``P``)."""
    b, t = scores.shape
    if isinstance(floor, bool) or not isinstance(floor, numbers.Real) or floor < 0:
        raise ValueError(f"floor must be an int count >= 0 or a float share in [0, 1], got {floor!r}")
    if isinstance(floor, numbers.Integral):
        f = int(floor)
    else:
        if floor > 1:
            raise ValueError(f"floor as a share of the even split must lie in [0, 1], got {floor}")
        f = int(float(floor) * k / t)
    f = min(f, p, k // t)
    rows = []
    for row in scores:
        rows.append(f + allocate(k - t * f, row, torch.full((t,), p - f, dtype=torch.long)))
    return torch.stack(rows)


@register("query_budget", family="temporal", needs=("frames",), uses=("frame_scores", "query", "grid"), paper=QUOTA)
def query_budget(tokens: Tensor, k: int, ctx: Context, *, strategy: str = "divprune", floor: int | float = 0.25,
                 options: Mapping[str, Any] | None = None) -> Selection:
    """Give each frame a budget proportional to its relevance to the query, with a floor, then prune inside it (QuoTA).

    QuoTA (arXiv 2503.08689) scores every frame's relevance to the (decoupled) question with a VLM and
    assigns token budgets in proportion to the scores before the LLM. Here the score is ``frame_scores`` from context
    (any relevance, e.g. CLIP text–frame similarity, the light variant the notes name) or, without it, the cosine of
    ``query`` with each frame's mean token (:func:`frame_relevance`); negative scores count as 0. Budgets:
    :func:`query_budgets` (every frame at least ``floor``); then the image strategy ``strategy`` (any registered one,
    with ``options``) keeps that many tokens inside each frame (:func:`run_per_frame`).
    """
    b, n, _ = tokens.shape
    t, p, _ = frame_layout(tokens, ctx)
    scores = frame_relevance(tokens, ctx)
    budgets = query_budgets(scores, k, p, floor)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    return run_per_frame(tokens, ctx, budgets, strategy, options)


# ------------------------------------------------------------------------------------------------- temporal_pool


def pool_shape(t: int, h: int, w: int, k: int, *, window: int | None = None,
               spatial: bool = True) -> tuple[int, int, int]:
    """Output ``(ot, oh, ow)`` with ``ot·oh·ow == k`` for pooling ``T`` frames of an ``h × w`` grid: time is pooled
    first (the largest spatial size ``oh·ow`` that fits), the spatial grid is the aspect closest to ``h / w``
    (``pool_grid``). ``window``: ``ot = ceil(T / window)`` fixed; ``spatial=False``: ``oh, ow = h, w``. Raises
    ``ValueError`` naming ``k`` when no such shape exists."""
    sizes = [h * w] if not spatial else sorted({a * c for a in range(1, h + 1) for c in range(1, w + 1)}, reverse=True)
    ots = [-(-t // window)] if window is not None else None
    for s in sizes:
        if k % s or k // s > t or (ots is not None and k // s not in ots):
            continue
        try:
            oh, ow = pool_grid(h, w, s)
        except ValueError:
            continue
        return k // s, oh, ow
    ok = sorted({ot * s for ot in (ots or range(1, t + 1)) for s in sizes if ot * s <= t * h * w})
    near = sorted(ok, key=lambda v: (abs(v - k), v))[:4]
    raise ValueError(f"keep: temporal_pool cannot make exactly k={k} tokens from {t} frames of {h}x{w} "
                     f"(window={window}, spatial={spatial}); nearest possible budgets: {sorted(near)}")


@register("temporal_pool", family="temporal", needs=("frames",), uses=("grid",), merges=True, paper=STORM)
def temporal_pool(tokens: Tensor, k: int, ctx: Context, *, window: int | None = None,
                  spatial: bool = True) -> Selection:
    """Average tokens over groups of consecutive frames, and over grid cells when the budget needs it (STORM).

    STORM (arXiv 2503.04130) average-pools the video tokens over groups of consecutive frames before the LLM (and
    studies spatial pooling as the alternative); the pooling itself needs no training (STORM applies it after its
    trained temporal encoder). Here
    the ``T × h × w`` token volume is average-pooled to ``ot × oh × ow == k`` cells (:func:`pool_shape`: time
    first, then space; ``window`` fixes the frames per group, ``spatial=False`` forbids spatial pooling), bins
    ``[floor(i·T/ot), floor((i+1)·T/ot))`` on each axis as in ``pool2d``. Each output token takes the position of its
    cell's centre token. Budgets without such a factorisation raise ``ValueError`` (like ``pool2d``).
    """
    if window is not None:
        window = check_int("window", window, 1)
    b, n, _ = tokens.shape
    t, p, (h, w) = frame_layout(tokens, ctx)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    ot, oh, ow = pool_shape(t, h, w, k, window=window, spatial=bool(spatial))
    dev = tokens.device
    tc, tm = grid_bins(t, ot, dev)
    rc, rm = grid_bins(h, oh, dev)
    cc, cm = grid_bins(w, ow, dev)
    assign = ((tc[:, None, None] * oh + rc[None, :, None]) * ow + cc[None, None, :]).reshape(n)
    keep = ((tm[:, None, None] * h + rm[None, :, None]) * w + cm[None, None, :]).reshape(k)
    return Selection(keep.expand(b, k).contiguous(), n, assign.expand(b, n).contiguous())
