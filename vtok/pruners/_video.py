"""Helpers shared by the video (``temporal`` family) strategies: the frame layout of the tokens, exact budget
splits (:func:`allocate`), merge maps from group targets (:func:`from_groups`) and image strategies run frame by frame
(:func:`run_per_frame`).

The video strategies work on flattened frame tokens ``[B, T·P, D]`` (``frames=T`` in context, ``grid=(h, w)`` the grid
of one frame, ``h·w = P``). Every one keeps exactly ``k`` tokens, returns the identity for ``k = N``, treats each sample
on its own (a batch equals its samples one by one) and is deterministic. Tokens are frame-major: token ``t·P + i`` is
grid position ``i`` of frame ``t``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from vtok.context import Context
from vtok.pruners.registry import get
from vtok.selection import Selection


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


def from_groups(target: Tensor, n: int) -> Selection:
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
