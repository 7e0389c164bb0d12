"""ToMe: bipartite soft matching (Bolya et al., Token Merging: Your ViT But Faster, arXiv 2210.09461)."""

from __future__ import annotations

import torch
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.kernels.reference import upcast_half
from vtok.pruners.clustering import _check_int
from vtok.pruners.registry import register
from vtok.selection import Selection, gather_tokens


@register("tome", family="clustering", uses=("keys", "sizes"), merges=True,
          paper="Token Merging: Your ViT But Faster (arXiv 2210.09461)")
def tome(tokens: Tensor, k: int, ctx: Context, *, protect_first: int = 0) -> Selection:
    """ToMe bipartite soft matching (Sec. 3): merge ``tokens [B, N, D]`` down to exactly ``k`` tokens.

    One step, as in the paper: split the current sequence alternately into ``A`` (even positions) and ``B`` (odd
    positions); the similarity is cosine on the attention ``keys`` (``[B, N, Dk]``, or per head ``[B, H, N, dh]``
    averaged over heads as in the paper) or on the tokens when no keys are given; each ``A`` token draws an edge
    to its most similar ``B`` token (``ops.cosine_argmax``); the ``r`` most similar edges are kept (stable sort,
    ties → lowest index) and their ``A`` tokens are merged into their ``B`` partners by a size-weighted average.

    ``r = N − k``. One step can merge at most ``|A|`` tokens; when more are requested the step is repeated on the
    merged sequence (in ascending order of representatives; matching features of merged tokens are the size-weighted
    mean of their members' features) until exactly ``k`` tokens remain. ToMe itself does one step per layer.

    Options:
        protect_first: the first ``protect_first`` tokens are never merged: a protected ``A`` token is never a
            source (ToMe's CLS rule) and a protected ``B`` token never a destination (ToMe's distillation-token
            rule). Requires ``protect_first < k`` (when ``k < N``).

    Context: ``sizes [B, N]`` (ToMe's size from earlier merges) weights the averages; default 1.

    Returns a merging ``Selection``: ``assign [B, N]`` maps every token to its output slot, ``keep [B, k]`` (ascending)
    holds each slot's representative (an unmerged ``A`` token or a ``B`` destination), and ``size [B, k]`` the merged
    sizes (sum of incoming sizes) for proportional attention (``+ log size`` on the attention logits).
    """
    p = _check_int("protect_first", protect_first, 0)
    b, n, _ = tokens.shape
    sizes = ctx.get("sizes")
    s = torch.ones(b, n, device=tokens.device) if sizes is None else sizes.float()
    if k >= n:
        return Selection(torch.arange(n, device=tokens.device).expand(b, n).contiguous(), n, size=s)
    if p >= k:
        raise ValueError(f"protect_first must be < k={k} (protected tokens are never merged, and at least one "
                         f"unprotected token must remain), got {p}")
    keys = ctx.get("keys")
    f = tokens if keys is None else (keys.float().mean(1) if keys.dim() == 4 else keys)
    f = upcast_half(f).float()
    dev = tokens.device
    rep = torch.arange(n, device=dev).expand(b, n).contiguous()  # representative of each current position
    slot_of = rep.clone()  # current position of every original token
    m = n
    while m > k:
        pos = torch.arange(m, device=dev)
        a_pos, b_pos = pos[0::2], pos[1::2]
        b_pos = b_pos[b_pos >= p]
        a_free = a_pos >= p
        r = min(m - k, int(a_free.sum()))
        sim, j = ops.cosine_argmax(f[:, a_pos], f[:, b_pos])
        sim = sim.masked_fill(~a_free, float("-inf"))
        src_a = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :r]
        src = a_pos[src_a]  # [B, r] current positions merged away
        dst = b_pos[j.gather(1, src_a)]  # [B, r] their destinations
        d = f.shape[-1]
        s_src = s.gather(1, src)
        num = torch.zeros_like(f).scatter_add_(1, dst[..., None].expand(b, r, d),
                                               gather_tokens(f, src) * s_src[..., None])
        s_new = s.scatter_add(1, dst, s_src)
        is_dst = torch.zeros(b, m, dtype=torch.bool, device=dev).scatter_(1, dst, True)
        f = torch.where(is_dst[..., None], (f * s[..., None] + num) / s_new[..., None], f)
        removed = torch.zeros(b, m, dtype=torch.bool, device=dev).scatter_(1, src, True)
        new_pos = (~removed).long().cumsum(1) - 1
        new_pos = new_pos.scatter(1, src, new_pos.gather(1, dst))
        kept = torch.sort(removed.to(torch.uint8), dim=1, stable=True).indices[:, :m - r]  # ascending positions
        slot_of = new_pos.gather(1, slot_of)
        f = gather_tokens(f, kept)
        s = s_new.gather(1, kept)
        rep = rep.gather(1, kept)
        m -= r
    return Selection(rep, n, slot_of, s)


