"""DyCoke's temporal token merging (arXiv 2411.15024): a token nearly identical to the same grid position in an
earlier kept frame is merged into it.

On video tokens ``[B, T·P, D]``, frame-major (``frames=T`` in context, ``grid=(h, w)`` the grid of one frame);
see ``vtok.pruners._video``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.pruners._checks import check_int
from vtok.pruners._video import frame_layout, from_groups
from vtok.pruners.registry import register
from vtok.selection import Selection

DYCOKE = "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models (arXiv 2411.15024)"


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
    return from_groups(target, n)
