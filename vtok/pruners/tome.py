"""ToMe: bipartite soft matching (Bolya et al., Token Merging: Your ViT But Faster, arXiv 2210.09461)."""

from __future__ import annotations

import torch
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.kernels.reference import upcast_half
from vtok.pruners._checks import check_int
from vtok.pruners.registry import register
from vtok.selection import Selection, gather_tokens

_ORDERS = ("tome", "position")


@register("tome", family="clustering", uses=("keys", "sizes"), merges=True,
          paper="Token Merging: Your ViT But Faster (arXiv 2210.09461)")
def tome(tokens: Tensor, k: int, ctx: Context, *, protect_first: int = 0, order: str = "tome") -> Selection:
    """ToMe bipartite soft matching (Sec. 3, "Token Merging"): merge ``tokens [B, N, D]`` down to exactly ``k``.

    One step, as in the paper and the authors' code: split the current sequence alternately into ``A`` (even
    positions) and ``B`` (odd positions); the similarity is cosine on the attention ``keys`` (``[B, N, Dk]``, or per
    head ``[B, H, N, dh]`` averaged over heads as ToMe's timm patch does) or on the tokens when no keys are given;
    each ``A`` token draws an edge to its most similar ``B`` token (``ops.cosine_argmax``); the ``r`` most similar
    edges are kept (stable sort, ties → lowest index; the authors' ``argsort`` is unstable on exact ties) and their
    ``A`` tokens are merged into their ``B`` partners by a size-weighted average (ToMe's ``merge_wavg``).

    ``r = N − k``. One step can merge at most ``|A|`` tokens; when more are requested the step is repeated on the
    merged sequence (in the emitted order below, exactly as consecutive ToMe blocks would; matching features of
    merged tokens are the size-weighted mean of their members' features) until exactly ``k`` tokens remain.

    Options:
        protect_first: the first ``protect_first`` tokens are never merged: a protected ``A`` token is never a
            source (ToMe's CLS rule) and a protected ``B`` token never a destination (ToMe's distillation-token
            rule). Requires ``protect_first < k`` (when ``k < N``).
        order: the order the merged sequence is emitted in (``Selection.order``):

            * ``"tome"`` (default, the authors' code): ``[unmerged A | all B]``, the ``B`` tokens in their
              original order and the unmerged ``A`` tokens by descending edge score, or ascending when tokens are
              protected (ToMe sorts them when there is a class token); protected tokens come first, in order
              (ToMe's ``[CLS, dist, A, B]`` for a distillation token). The next block's alternating split runs over
              this order, so this is what reproduces ToMe's published numbers inside an encoder.
            * ``"position"``: ascending original position of each output's representative (vtok ≤ 0.1; the
              split of the next block then alternates over spatial order).

    Context: ``sizes [B, N]`` (ToMe's size from earlier merges) weights the averages; default 1. Sizes and matching
    features are held in float64 for float64 input, else in float32.

    Returns a merging ``Selection``: ``assign [B, N]`` maps every token to its slot, ``keep [B, k]`` (ascending) holds
    each slot's representative (an unmerged ``A`` token or a ``B`` destination), ``size [B, k]`` the merged sizes (sum
    of incoming sizes) for proportional attention (``+ log size`` on the attention logits), and ``order`` the
    emission order.
    """
    p = check_int("protect_first", protect_first, 0)
    if order not in _ORDERS:
        raise ValueError(f"order must be one of {list(_ORDERS)}, got {order!r}")
    b, n, _ = tokens.shape
    keys = ctx.get("keys")
    f = tokens if keys is None else (keys.mean(1) if keys.dim() == 4 else keys)
    f = upcast_half(f)
    if f.dtype not in (torch.float32, torch.float64):
        f = f.float()
    sizes = ctx.get("sizes")
    dev = tokens.device
    s = torch.ones(b, n, device=dev, dtype=f.dtype) if sizes is None else sizes.to(f.dtype)
    if k >= n:
        return Selection(torch.arange(n, device=dev).expand(b, n).contiguous(), n, size=s)
    if p >= k:
        raise ValueError(f"protect_first must be < k={k} (protected tokens are never merged, and at least one "
                         f"unprotected token must remain), got {p}")
    rep = torch.arange(n, device=dev).expand(b, n).contiguous()  # original index of each current position's rep
    out_of = rep.clone()  # current position of every original token
    m = n
    while m > k:
        pos = torch.arange(m, device=dev)
        a_pos, b_pos = pos[0::2], pos[1::2]
        b_pos = b_pos[b_pos >= p]
        a_free = a_pos >= p
        r = min(m - k, int(a_free.sum()))
        sim, j = ops.cosine_argmax(f[:, a_pos], f[:, b_pos])
        sim = sim.masked_fill(~a_free, float("-inf"))
        ranked = torch.sort(sim, dim=1, descending=True, stable=True).indices  # [B, |A|] A indices, best edge first
        src = a_pos[ranked[:, :r]]  # [B, r] current positions merged away
        dst = b_pos[j.gather(1, ranked[:, :r])]  # [B, r] their destinations
        d = f.shape[-1]
        s_src = s.gather(1, src)
        num = torch.zeros_like(f).scatter_add_(1, dst[..., None].expand(b, r, d),
                                               gather_tokens(f, src) * s_src[..., None])
        s_new = s.scatter_add(1, dst, s_src)
        is_dst = torch.zeros(b, m, dtype=torch.bool, device=dev).scatter_(1, dst, True)
        f = torch.where(is_dst[..., None], (f * s[..., None] + num) / s_new[..., None], f)
        if order == "position":
            removed = torch.zeros(b, m, dtype=torch.bool, device=dev).scatter_(1, src, True)
            nxt = torch.sort(removed.to(torch.uint8), dim=1, stable=True).indices[:, :m - r]
        else:
            unm = ranked[:, r:]
            if p:
                n_prot_a = int((~a_free).sum())  # protected A tokens: never merged, first after sorting
                unm = unm.sort(1).values[:, n_prot_a:]
            nxt = torch.cat([torch.arange(p, device=dev).expand(b, p), a_pos[unm], b_pos.expand(b, -1)], 1)
        new_index = torch.empty(b, m, dtype=torch.long, device=dev)
        new_index.scatter_(1, nxt, torch.arange(m - r, device=dev).expand(b, -1).contiguous())
        new_index.scatter_(1, src, new_index.gather(1, dst))
        out_of = new_index.gather(1, out_of)
        f = gather_tokens(f, nxt)
        s = s_new.gather(1, nxt)
        rep = rep.gather(1, nxt)
        m -= r
    return Selection.from_emitted(rep, n, out_of, s)
