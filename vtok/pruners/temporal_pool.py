"""STORM's temporal pooling (arXiv 2503.04130): tokens averaged over groups of consecutive frames, and over grid
cells when the budget needs it.

On video tokens ``[B, T·P, D]``, frame-major (``frames=T`` in context, ``grid=(h, w)`` the grid of one frame);
see ``vtok.pruners._video``.
"""

from __future__ import annotations

from torch import Tensor

from vtok.context import Context
from vtok.pruners._checks import check_int
from vtok.pruners._grid import grid_bins, pool_grid
from vtok.pruners._video import frame_layout
from vtok.pruners.registry import register
from vtok.selection import Selection

STORM = "STORM: Token-Efficient Long Video Understanding for Multimodal LLMs (arXiv 2503.04130)"


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
