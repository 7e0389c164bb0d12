"""Forwards of a timm ViT that the eval-ViT sweep task and ``benchmarks/encoder_accuracy.py`` share.

Two placements of a strategy: ``inside`` (``vtok.patch`` at a block; the blocks before the first active one run
once per batch and are shared by every cell, ``tail_inside`` runs the rest) and ``after`` (the full encoder runs
once, captured; the strategy keeps some final patch tokens and the model's mean-pooling head sees only those).
"""

from __future__ import annotations

from torch import Tensor

import vtok
from vtok.hooks._encoder_state import ENCODER_CONTEXT


def image_methods() -> list[str]:
    """Registered strategies whose required context a ViT encoder can supply (inside or after it)."""
    return [m.name for m in vtok.methods() if m.needs <= ENCODER_CONTEXT]


def embed(model, x: Tensor) -> Tensor:
    """Tokens entering block 0: ``[B, 1 + N, D]``."""
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))


def grid_of(model) -> tuple[int, int]:
    """The model's patch grid at its default resolution."""
    return tuple(int(g) for g in model.patch_embed.grid_size)


def forward_to(model, x: Tensor, mid: int) -> Tensor:
    """The (unpatched) tokens entering block ``mid``: ``[B, 1 + N, D]``."""
    h = embed(model, x)
    for blk in model.blocks[:mid]:
        h = blk(h)
    return h


def mid_block(method: str, depth: int) -> int:
    """The block ``mid_attn`` comes from: the method's ``placement.mid_layer``, else the middle block."""
    frac = vtok.get_method(method).placement.mid_layer
    return depth // 2 if frac is None else int(frac * depth)


CAPTURED = ("cls_attn", "attn_received", "keys", "hidden", "attn")


def captured_forward(model, x: Tensor, what: tuple[str, ...] = CAPTURED) -> tuple[Tensor, dict]:
    """The unpatched model's logits and what ``after_logits`` reads: per block (middle, every method's mid block,
    next-to-last, last) its ``cls_attn``, ``attn_received``, ``keys``, ``hidden`` and ``attn`` (``what``: a subset,
    e.g. without the ``N x N`` ``attn`` when no method reads it)."""
    depth = len(model.blocks)
    mids = {mid_block(m, depth) for m in image_methods()}
    with vtok.capture(model, layers=sorted({depth // 2, depth - 2, depth - 1} | mids), what=what) as cap:
        logits = model(x)
    return logits, {i: dict(v) for i, v in cap.items()}


def head(model, tokens: Tensor) -> Tensor:
    """Logits from the final tokens ``[B, 1 + k, D]`` (the model's own norm and pooling head)."""
    return model.forward_head(model.norm(tokens))


def first_active(model) -> int:
    """The first block a ``vtok.patch``-ed model does anything at (pruning, or reading ``mid_attn``)."""
    plan = model._vtok_state.plan
    blocks = list(plan.prune_keep) + list(plan.merge_r) + ([] if plan.mid_layer is None else [plan.mid_layer])
    return min(blocks)


def tail_inside(model, h_start: Tensor, start: int, grid: tuple[int, int]) -> Tensor:
    """Blocks ``start..`` of a ``vtok.patch``-ed model on the tokens ``h_start`` entering block ``start``: the same
    computation as ``model(x)`` when ``h_start`` is what blocks ``0..start-1`` produce and nothing happens there
    (``start <= first_active(model)``)."""
    st = model._vtok_state
    st.grid_in = grid
    st.begin(h_start)
    h = h_start
    for blk in model.blocks[start:]:
        h = blk(h)
    return head(model, h)


class Prefixes:
    """Tokens entering block ``i`` of the unpatched model for one batch, computed once per block asked for."""

    def __init__(self, model, x: Tensor):
        self.model, self.x, self.cache = model, x, {}

    def __call__(self, i: int) -> Tensor:
        if i not in self.cache:
            self.cache[i] = forward_to(self.model, self.x, i)
        return self.cache[i]


def after_reads(method: str, depth: int) -> dict[str, tuple[int, str]]:
    """What ``after_logits`` reads from ``captured_forward``'s capture for ``method``: context name (and
    ``"tokens"``, the final hidden states) -> (block, captured entry). Only these need to be kept for it."""
    info = vtok.get_method(method)
    score = "attn_received" if info.placement.score_rows == "all" else "cls_attn"
    last = depth - 1
    where = {"cls_attn": (last, score), "mid_attn": (mid_block(method, depth), score), "keys": (last, "keys"),
             "attn": (last, "attn"), "prev_hidden": (depth - 2, "hidden")}
    want = info.needs | info.uses
    return {"tokens": (last, "hidden"), **{k: v for k, v in where.items() if k in want}}


def after_logits(model, method: str, keep: float, cap: dict, grid: tuple[int, int], **options) -> Tensor:
    """Logits when ``method`` keeps ``keep`` of the final patch tokens and the head pools only those. ``cap`` needs
    only the entries ``after_reads`` names (a missing ``attn``: ``None``, as when it was not captured)."""
    reads = after_reads(method, len(model.blocks))
    ctx = {k: cap[i].get(entry) if entry == "attn" else cap[i][entry] for k, (i, entry) in reads.items()}
    tokens = ctx.pop("tokens")
    if "grid" in vtok.get_method(method).needs | vtok.get_method(method).uses:
        ctx["grid"] = grid
    out, _ = vtok.compress(model.norm(tokens), method, keep, **ctx, **options)
    pooled = out.mean(1)  # the head's mean pooling over the tokens it receives
    return model.head(model.fc_norm(pooled))


def inside_logits(model, method: str, keep: float, layer: int, prefix: Prefixes, grid: tuple[int, int],
                  **options) -> Tensor:
    """Logits of the model patched with ``method`` at block ``layer``, from the shared unpatched prefix."""
    vtok.patch(model, method, keep=keep, layers=layer, **options)
    try:
        start = first_active(model)
        return tail_inside(model, prefix(start), start, grid)
    finally:
        vtok.unpatch(model)
