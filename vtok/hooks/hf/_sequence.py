"""Pure tensor helpers of the VLM wrapper: pick image tokens per image, rebuild a shorter left-padded batch, and
give it position ids and masks. No model code here.

Shapes: ``B`` samples, ``L`` sequence length before a stage, ``L'`` after it, ``D`` hidden size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vtok.api import compress
from vtok.hooks.hf.providers import TOKEN_DIM  # the token dimension of each per-record context tensor
from vtok.pruners import get as get_method


@dataclass
class Slot:
    """One image's tokens inside one sample's current sequence.

    Attributes:
        record: index of the image record (``Runtime.records``) these tokens belong to.
        positions: ``LongTensor [n]``: where the tokens sit in the sample's current sequence (ascending).
        protected: ``BoolTensor [n]``: tokens never pruned (LLaVA-NeXT's image-newline), or ``None``.
        grid: ``(h, w)`` while the tokens still form the full patch grid, else ``None``.
        n_free0: the record's prunable token count before any stage (its share of the image's budget).
        frames: for a video, its frame count ``T`` (the tokens are ``T`` frames of ``grid`` in time order) while the
            tokens are all there, else ``None``.
    """

    record: int
    positions: Tensor
    protected: Tensor | None
    grid: tuple[int, int] | None
    n_free0: int
    frames: int | None = None


@dataclass
class StageResult:
    """A rebuilt batch: ``x [B, L', D]``, ``valid [B, L']`` (False = left padding), ``index [B, L']`` (the source
    position in the stage's input, -1 for padding), the new slots, and per-record ``(n_before, n_after)``."""

    x: Tensor
    valid: Tensor
    index: Tensor
    slots: list[list[Slot]]
    counts: dict[int, tuple[int, int]] = field(default_factory=dict)


def _slice_ctx(value: Tensor, key: str, idx: Tensor) -> Tensor:
    return value.index_select(TOKEN_DIM[key] % value.dim(), idx)


def select_slots(x: Tensor, slots: list[list[Slot]], ks: list[list[int]], method: str, options: dict[str, Any],
                 ctx: dict[int, dict[str, Any]]) -> dict[tuple[int, int], tuple[Tensor, Tensor]]:
    """Run ``method`` on every slot's prunable tokens, batching slots of equal shape.

    Args:
        x: ``[B, L, D]`` current sequence.
        slots: per sample, its image slots.
        ks: per sample, the budget ``k`` of each slot (of its prunable tokens).
        ctx: per record id, the context tensors for *all* the slot's tokens (sliced to the prunable ones here),
            plus non-token context (``grid`` is taken from the slot, ``query`` as given ``[D]``).

    Returns:
        ``{(b, j): (values [m, D], rel [m])}``: the slot's new tokens in output order and, for each, the index in the
        slot (``positions``) of the token whose place it takes. Protected tokens are merged back by position.
    """
    temporal = get_method(method).family == "temporal"
    groups: dict[tuple, list[tuple[int, int, Tensor]]] = {}
    for b, row in enumerate(slots):
        for j, s in enumerate(row):
            free = (torch.arange(len(s.positions), device=x.device) if s.protected is None
                    else (~s.protected).nonzero().squeeze(1))
            c = ctx.get(s.record, {})
            shape_key = tuple(sorted((key, tuple(v.shape) if isinstance(v, Tensor) else None) for key, v in c.items()))
            grid = s.grid  # with protected tokens: the grid of the prunable ones (as retained_count counts it)
            frames = 1 if s.frames is None and temporal else s.frames  # an image is one frame to a temporal method
            groups.setdefault((len(free), ks[b][j], grid, frames, shape_key), []).append((b, j, free))
    out: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
    for (_, k, grid, frames, _), members in groups.items():
        tokens = torch.stack([x[b, slots[b][j].positions[free]] for b, j, free in members])
        kwargs: dict[str, Any] = {}
        keys = {key for b, j, _ in members for key in ctx.get(slots[b][j].record, {})}
        for key in keys:
            vals = []
            for b, j, free in members:
                v = ctx[slots[b][j].record][key]
                vals.append(_slice_ctx(v, key, free) if key in TOKEN_DIM else v)
            kwargs[key] = torch.stack(vals, dim=1 if key == "prev_hidden" else 0)  # prev_hidden: [L, B, N, D]
        if grid is not None and (frames in (None, 1) or temporal):  # an image strategy sees a video flattened
            kwargs["grid"] = grid
        if frames is not None:
            kwargs["frames"] = frames
        values, sel = compress(tokens, method, k, **kwargs, **options)
        rel = sel.emitted_keep()
        for i, (b, j, free) in enumerate(members):
            s = slots[b][j]
            v, r = values[i], free[rel[i]]
            if s.protected is not None and bool(s.protected.any()):
                prot = s.protected.nonzero().squeeze(1)
                r = torch.cat([r, prot])
                v = torch.cat([v, x[b, s.positions[prot]].to(v.dtype)])
                r, perm = r.sort(stable=True)
                v = v[perm]
            out[(b, j)] = (v, r)
    return out


def rebuild(x: Tensor, valid: Tensor, slots: list[list[Slot]], picked: dict[tuple[int, int], tuple[Tensor, Tensor]]
            ) -> StageResult:
    """Replace each slot's tokens by its picked ones, drop padding, and left-pad the batch again.

    Text tokens and the picked image tokens keep their relative order; a slot's new tokens take the slot's place in
    the order ``select_slots`` gives (the strategy's emission order).
    """
    b_sz, _, d = x.shape
    rows_x, rows_idx, new_slots, counts = [], [], [], {}
    for b in range(b_sz):
        keep_pos = valid[b].clone()
        for s in slots[b]:
            keep_pos[s.positions] = False
        pieces: list[tuple[int, Tensor, Tensor]] = []  # (start, values, source index)
        text_pos = keep_pos.nonzero().squeeze(1)
        pieces.append((-1, x[b, text_pos], text_pos))
        row_slots = []
        for j, s in enumerate(slots[b]):
            v, r = picked[(b, j)]
            pieces.append((int(s.positions[0]), v.to(x.dtype), s.positions[r]))
            counts[s.record] = (len(s.positions), len(r))
        # order: text tokens by position; a slot's block sits where its first token was
        start = torch.cat([text_pos] + [torch.full((len(p[2]),), p[0], device=x.device) for p in pieces[1:]])
        sub = torch.cat([torch.zeros(len(text_pos), dtype=torch.long, device=x.device)]
                        + [torch.arange(1, len(p[2]) + 1, device=x.device) for p in pieces[1:]])
        key = start * (x.shape[1] + 2) + sub
        perm = key.argsort(stable=True)
        vals = torch.cat([p[1] for p in pieces])[perm]
        idx = torch.cat([p[2] for p in pieces])[perm]
        rows_x.append(vals)
        rows_idx.append(idx)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(len(perm), device=x.device)
        offset = len(text_pos)
        for j, s in enumerate(slots[b]):
            m = len(picked[(b, j)][1])
            new_pos = inv[offset:offset + m]
            offset += m
            prot = None
            if s.protected is not None:
                prot = s.protected[picked[(b, j)][1]]
            full = m == len(s.positions)
            row_slots.append(Slot(s.record, new_pos, prot, s.grid if full else None, s.n_free0,
                                  s.frames if full else None))
        new_slots.append(row_slots)
    lmax = max(len(r) for r in rows_idx)
    out_x = x.new_zeros(b_sz, lmax, d)
    out_valid = torch.zeros(b_sz, lmax, dtype=torch.bool, device=x.device)
    out_idx = torch.full((b_sz, lmax), -1, dtype=torch.long, device=x.device)
    for b in range(b_sz):
        pad = lmax - len(rows_idx[b])
        out_x[b, pad:] = rows_x[b]
        out_valid[b, pad:] = True
        out_idx[b, pad:] = rows_idx[b]
        for s in new_slots[b]:
            s.positions = s.positions + pad
    return StageResult(out_x, out_valid, out_idx, new_slots, counts)


def gather_positions(pos: Tensor, index: Tensor) -> Tensor:
    """Position ids ``[..., B|1, L]`` gathered at ``index [B, L']`` (-1 → 0) along the last dim."""
    idx = index.clamp_min(0)
    pos = pos.expand(pos.shape[:-2] + (idx.shape[0], pos.shape[-1]))
    return pos.gather(-1, idx.expand(pos.shape[:-2] + idx.shape))


def gather_seq(t: Tensor, index: Tensor) -> Tensor:
    """Per-token tensors ``[..., B|1, L, d]`` (RoPE cos / sin) gathered at ``index [B, L']`` (-1 → 0) along ``L``."""
    b, lp = index.shape
    t = t.expand(t.shape[:-3] + (b,) + t.shape[-2:])
    idx = index.clamp_min(0)[..., None].expand(t.shape[:-3] + (b, lp, t.shape[-1]))
    return t.gather(-2, idx)


def reindex_1d(valid: Tensor) -> Tensor:
    """Contiguous positions ``[B, L']`` over the valid tokens (padding gets 0)."""
    return (valid.long().cumsum(-1) - 1).clamp_min(0) * valid


def reindex_mrope(orig: Tensor, index: Tensor, valid: Tensor, slots: list[list[Slot]],
                  starts: list[dict[int, int]]) -> Tensor:
    """Qwen-style 3-D positions for a pruned prompt, as ``get_rope_index`` gives a prompt whose images (videos) hold
    only the kept tokens at their grid cells: text tokens count up by one; an image keeps each token's ``(t, h, w)``
    offset from the image's start and spans ``max kept offset + 1`` positions; padding gets 0.

    Args:
        orig: ``[3, B, L]`` 3-D position ids of the unpruned prompt; ``index [B, L']`` into it.
        starts: per sample, ``{record: start}``, the position value of each image's first token in ``orig`` (its
            offset origin; needed because a video whose first frame lost every token has no kept token there).
    """
    src = gather_positions(orig, index)  # [3, B, L']
    out = torch.zeros_like(src)
    for b in range(index.shape[0]):
        slot_of = torch.full((index.shape[1],), -1, dtype=torch.long)
        for j, s in enumerate(slots[b]):
            slot_of[s.positions.cpu()] = j
        cur, i, length = 0, 0, index.shape[1]
        vb = valid[b].tolist()
        so = slot_of.tolist()
        while i < length:
            if not vb[i]:
                i += 1
                continue
            if so[i] < 0:
                out[:, b, i] = cur
                cur += 1
                i += 1
                continue
            j = so[i]
            pos = slots[b][j].positions
            start_vals = src[:, b, pos]
            base = starts[b][slots[b][j].record]
            off = start_vals - base
            out[:, b, pos] = off + cur
            cur += int(off.max()) + 1
            i = int(pos.max()) + 1
    return out


def causal_keep_mask(valid_keys: Tensor, q: int, dtype: torch.dtype | None) -> Tensor:
    """A 4-D mask ``[B, 1, q, K]`` for the last ``q`` of ``K`` key positions: causal among those ``q``, padding
    (``valid_keys [B, K]`` False) masked. ``dtype`` ``None`` or bool: boolean (True = attend); a float dtype: additive
    (0 / the dtype's min)."""
    b, k = valid_keys.shape
    qi = torch.arange(k - q, k, device=valid_keys.device)[:, None]
    ki = torch.arange(k, device=valid_keys.device)[None, :]
    m = (ki <= qi)[None, None] & valid_keys[:, None, None, :]
    if dtype is None or dtype == torch.bool:
        return m
    return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)


def split_budget(k: int, sizes: Sequence[int]) -> list[int]:
    """Split an image's budget ``k`` over its parts of ``sizes`` prunable tokens (LLaVA-NeXT: base view, high-res
    tiles) in proportion to their sizes: largest remainder, ties to the earlier part; every part keeps at least one
    token (so an image of ``m`` parts keeps ``max(k, m)``), taken from the part with the most."""
    if k <= len(sizes):
        return [1] * len(sizes)
    total = sum(sizes)
    out = [k * n // total for n in sizes]
    order = sorted(range(len(sizes)), key=lambda i: (-(k * sizes[i] % total), i))  # largest remainder first
    for i in order[: k - sum(out)]:
        out[i] += 1
    for i in range(len(out)):
        if out[i] == 0:  # k > len(sizes): some part holds two or more
            out[max(range(len(out)), key=lambda j: (out[j], -j))] -= 1
            out[i] = 1
    return out


def budgets(slots: list[list[Slot]], keep: Sequence[Any], resolve, image_of: Sequence[int]) -> list[list[int]]:
    """Per sample and slot, ``k`` of the slot's prunable tokens. ``keep[b]`` is per image: an image whose slots
    (records ``image_of[record]`` equal) hold ``N = sum(n_free0)`` prunable tokens keeps ``resolve(keep[b], N)``,
    split over its slots by :func:`split_budget` on their ``n_free0``; each share is capped at what is left of the
    slot (later stages)."""
    out = []
    for b, row in enumerate(slots):
        parts: dict[int, list[int]] = {}
        for j, s in enumerate(row):
            parts.setdefault(image_of[s.record], []).append(j)
        ks = [0] * len(row)
        for js in parts.values():
            sizes = [row[j].n_free0 for j in js]
            for j, k in zip(js, split_budget(resolve(keep[b], sum(sizes)), sizes), strict=True):
                s = row[j]
                n_free = len(s.positions) - (0 if s.protected is None else int(s.protected.sum()))
                ks[j] = min(k, n_free)
        out.append(ks)
    return out
