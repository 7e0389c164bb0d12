"""Token reduction inside ViT encoders: ``patch`` / ``unpatch`` timm and open_clip ViTs, ``capture`` their attention.

    vtok.patch(vit, "tome", r=16)                        # ToMe: merge r tokens in every block
    vtok.patch(vit, "divprune", keep=0.5, layers=6)      # any registered strategy at block 6
    logits = vit(images)
    vit._vtok_state.selection                            # Selection over the original patch tokens
    vtok.unpatch(vit)                                    # the original model, bit-exact

How it works. Each block's class is swapped for a subclass whose ``forward`` (``encoders_timm`` /
``encoders_openclip``) runs the block's own math on the fused ``scaled_dot_product_attention`` path, keeps ``q`` and
``k``, and reduces the tokens *after the attention and before the MLP* of the chosen blocks (ToMe's placement;
EViT's for pruning). Weights, submodules and every other method of the model are untouched; a block with nothing
to do calls its original forward, so ``keep=1.0`` / ``r=0`` is bit-exact, and ``unpatch`` restores the original
classes. A forward hook on the patch embedding records the patch grid of each input.

* ``tome`` with ``r``: ToMe (arXiv 2210.09461) in every block of ``layers`` (default all): bipartite matching on
  the block's keys averaged over heads, ``r`` pairs merged by size-weighted average, prefix (CLS / register /
  distillation) tokens protected; the merged sequence is ``[prefix, unmerged A, B]`` as in the authors' code (the
  next block's alternating split runs over that order; ``order="position"`` keeps spatial order instead); from
  then on every block adds ``log(size)`` to its attention logits (proportional attention, ``prop_attn=True``) as
  the additive float mask of the fused kernel.
* any other strategy (or ``tome`` with ``keep``) with ``keep`` (a ratio of the patch tokens present at that block,
  or an int count) at ``layers`` (default: the method's ``placement``, else the middle block ``depth // 2``),
  between the block's attention and its MLP, or on the block's output (``at="output"``, VisionZip's default, at
  block −2 as its code reads layer −2): the strategy sees the patch tokens only; prefix tokens are never dropped
  and are re-attached in front (its emission order, ``Selection.order``, is kept). Its context comes from that
  block: ``cls_attn`` = the CLS row of the block's attention (or, without CLS, the mean attention each token
  receives), recomputed from ``q``/``k`` for that one query row — for HiPrune (``placement.score_rows="all"``) the
  attention received averaged over heads and all query rows, as its authors compute it; ``mid_attn`` (HiPrune's
  anchors) = the same quantity at ``mid_layer`` (default ``floor(9/24 · depth)``); ``keys`` = the block's keys
  ``[B, H, N, dh]``; ``prev_hidden`` (TransPrune) = the block's input tokens, so the transition scored is the
  block's attention update; ``grid`` while the tokens are still the full patch grid; ``sizes`` = running merge sizes;
  ``attn`` (Zero-TPrune) = the block's patch-to-patch attention ``[B, H, N, N]``, built only for N <= 2048.
  Context a ViT cannot supply (``text_attn``, ``query``, ``frames``) is a ``ValueError`` at
  patch time.

After each forward, ``model._vtok_state`` holds ``selection`` (the composed ``Selection`` over the original patch
tokens: ``keep`` = original patch index of each output patch token, ``assign`` for merges), ``sizes`` and
``grid``.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from vtok.budget import resolve_k
from vtok.hooks import encoders_openclip, encoders_timm
from vtok.hooks._encoder_state import CAPTURE_KEYS, ENCODER_CONTEXT, EncoderState, Plan, Spec

_ADAPTERS = (encoders_timm, encoders_openclip)
_SUBCLASSES: dict[type, type] = {}


def supported() -> list[str]:
    """The encoder architectures ``patch`` / ``capture`` accept."""
    return [a.NAME for a in _ADAPTERS]


def _spec(model: Any) -> Spec:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for cand in (model, getattr(model, "visual", None)):
        if isinstance(cand, torch.nn.Module):
            for adapter in _ADAPTERS:
                s = adapter.spec(cand)
                if s is not None:
                    return s
    raise TypeError(f"vtok cannot patch a {type(model).__module__}.{type(model).__name__}; supported encoders: "
                    + "; ".join(supported()))


def _layers(layers: Any, depth: int, default: list[int]) -> list[int]:
    if layers is None:
        return default
    items = [layers] if isinstance(layers, numbers.Integral) or isinstance(layers, bool) else layers
    if not isinstance(items, Sequence) or not items:
        raise ValueError(f"layers must be a block index or a non-empty list of them, got {layers!r}")
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not -depth <= int(v) < depth:
            raise ValueError(f"layers must be block indices in [-{depth}, {depth}) (the encoder has {depth} blocks), "
                             f"got {v!r}")
        out.append(int(v) % depth)
    if len(set(out)) != len(out):
        raise ValueError(f"layers must not repeat a block, got {layers!r}")
    return sorted(out)


def _per_layer(name: str, value: Any, layers: list[int]) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != len(layers):
            raise ValueError(f"{name} has {len(value)} entries but layers has {len(layers)} ({layers})")
        return list(value)
    return [value] * len(layers)


_AT = ("attention", "output")


def _plan(spec: Spec, method: str, keep: Any, layers: Any, r: Any, prop_attn: bool, options: dict,
          at: str | None = None, mid_layer: int | None = None) -> Plan:
    from vtok.pruners import get

    info = get(method)  # ValueError for unknown names
    depth = len(spec.blocks)
    place = info.placement
    at = place.at if at is None else at
    if at not in _AT:
        raise ValueError(f"at must be one of {list(_AT)}, got {at!r}")
    prop_attn = place.prop_attn if prop_attn is None else bool(prop_attn)
    plan = Plan(method=info, prop_attn=prop_attn, at=at, score_rows=place.score_rows)
    if r is not None:
        if method != "tome":
            raise ValueError(f"r= is ToMe's per-block merge count (method 'tome'); for '{method}' pass keep=")
        if keep is not None:
            raise ValueError("pass either r= (tokens merged per block) or keep= (one budget at layers=), not both")
        if set(options) - {"order"}:
            raise TypeError(f"'tome' with r= takes only the option order= (the prefix is protected by the hook), got "
                            f"{sorted(options)}")
        if at != "attention":
            raise ValueError("ToMe merges between attention and MLP (at='attention')")
        plan.options = dict(options)
        lays = _layers(layers, depth, list(range(depth)))
        for v in _per_layer("r", r, lays):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                raise ValueError(f"r must be an int >= 0 (or one per layer), got {v!r}")
        plan.merge_r = dict(zip(lays, (int(v) for v in _per_layer("r", r, lays)), strict=True))
        return plan
    if keep is None:
        raise ValueError(f"method '{method}' needs keep= (a ratio in (0, 1] of the patch tokens, or an int count)"
                         + ("; or r= for ToMe's per-block merging" if method == "tome" else ""))
    missing = sorted(info.needs - ENCODER_CONTEXT)
    if missing:
        raise ValueError(f"method '{method}' needs context {missing}, which a ViT encoder cannot supply (the encoder "
                         f"hook provides {sorted(ENCODER_CONTEXT)}); prune after the encoder with vtok.compress")
    bad = sorted(set(options) - set(info.options))
    if bad:
        raise TypeError(f"method '{method}' got unknown option(s) {bad}; its options: {sorted(info.options)}")
    lays = _layers(layers, depth, [depth // 2 if place.layer is None else place.layer % depth])
    if "mid_attn" in (info.needs | info.uses):
        if mid_layer is not None:
            mid = _layers(mid_layer, depth, [])[0]
            if mid > lays[0]:
                raise ValueError(f"mid_layer={mid_layer} comes after the pruning block {lays[0]}; mid_attn must be "
                                 f"read at or before it")
            plan.mid_layer = mid
        elif place.mid_layer is not None:
            plan.mid_layer = min(int(place.mid_layer * depth), lays[0])
    elif mid_layer is not None:
        raise ValueError(f"mid_layer= is for methods that read mid_attn (HiPrune); '{method}' does not")
    if "grid" in info.needs and len(lays) > 1:
        raise ValueError(f"method '{method}' needs the full patch grid, so it can prune at one block only, got "
                         f"layers={lays}")
    keeps = _per_layer("keep", keep, lays)
    for kp in keeps:
        resolve_k(kp, spec.n_patches or 1 << 40)  # ValueError / TypeError for a bad budget
    plan.prune_keep = dict(zip(lays, keeps, strict=True))
    plan.options = dict(options)
    return plan


def _method_options(method: Any) -> Any:
    from vtok.pruners import get

    try:
        return get(method)
    except (TypeError, ValueError):
        return None


def _subclass(cls: type, forward: Any) -> type:
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        sub = type(f"VTok{cls.__name__}", (cls,), {"forward": forward, "_vtok_orig_cls": cls, "__module__": __name__})
        _SUBCLASSES[cls] = sub
    return sub


def _check_unpatched(model: torch.nn.Module, spec: Spec) -> None:
    if (getattr(model, "_vtok_state", None) is not None or getattr(spec.target, "_vtok_state", None) is not None
            or any(hasattr(b, "_vtok_state") for b in spec.blocks)):
        raise ValueError("this model is already patched by vtok (patches never stack); call vtok.unpatch(model) "
                         "first")


def _install(model: torch.nn.Module, spec: Spec, plan: Plan) -> EncoderState:
    state = EncoderState(spec, plan)

    def record_grid(module, inputs, output):
        state.grid_in = spec.grid_hook(module, inputs, output)

    for i, blk in enumerate(spec.blocks):
        blk.__class__ = _subclass(type(blk), spec.patched_forward[type(blk)])
        blk._vtok_state = state
        blk._vtok_index = i
    state.handles.append(spec.embed.register_forward_hook(record_grid))
    state.owners = [m for m in dict.fromkeys([model, spec.target])]
    for m in state.owners:
        m._vtok_state = state
    return state


def patch(model: torch.nn.Module, method: str, keep: int | float | Sequence[int | float] | None = None, *,
          layers: int | Sequence[int] | None = None, r: int | Sequence[int] | None = None,
          prop_attn: bool | None = None, at: str | None = None, mid_layer: int | None = None,
          **options: Any) -> torch.nn.Module:
    """Reduce tokens inside a timm / open_clip ViT in place; returns ``model``. See the module docstring.

    Args:
        model: a timm ``VisionTransformer``, an open_clip ``VisionTransformer`` or a CLIP model (its ``.visual`` is
            patched).
        method: ``"tome"`` with ``r`` for ToMe, or any registered strategy (``vtok.methods()``) with ``keep``.
        keep: budget at each pruning block: a ratio in ``(0, 1]`` of the patch tokens present there, or an int
            count (one value, or one per layer).
        layers: block index or indices (negative allowed; ``layer=`` is accepted too). Default: every block for
            ToMe's ``r``, else the method's placement (``vtok.get_method(m).placement.layer``: VisionZip ``-2``, as its
            code reads layer −2) or the middle block ``depth // 2``.
        at: ``"attention"`` (prune between the block's attention and its MLP) or ``"output"`` (prune the block's
            output, with that block's attention as context). Default: the method's placement (VisionZip
            ``"output"``, every other method ``"attention"``).
        mid_layer: the block whose attention gives ``mid_attn`` (HiPrune's anchors), at or before the pruning
            block. Default: the method's placement (HiPrune: ``floor(9/24 · depth)``, the paper's layer 9 of
            CLIP ViT-L/14's 24), capped at the pruning block.
        r: ToMe's tokens merged per block (int, or one per layer); clamped to half the unprotected tokens.
        prop_attn: add ``log(size)`` to the attention logits once tokens were merged (ToMe's proportional attention).
            Default: the method's placement (on, except VisionZip, whose code does not).
        **options: the strategy's own options (``seed=`` for ``random``, ...).

    Raises:
        TypeError: unsupported model (the message lists supported architectures); unknown options.
        ValueError: already patched; unknown method; bad ``keep`` / ``r`` / ``layers``; a method needing context
            an encoder cannot supply.
    """
    if "layer" in options and layers is None and "layer" not in getattr(_method_options(method), "options", {}):
        layers = options.pop("layer")  # layer=6 reads naturally for one block
    spec = _spec(model)
    _check_unpatched(model, spec)
    plan = _plan(spec, method, keep, layers, r, prop_attn, options, at, mid_layer)
    _install(model, spec, plan)
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``patch``: original block classes, no hooks, no vtok attributes. Returns ``model``."""
    state = getattr(model, "_vtok_state", None)
    if not isinstance(state, EncoderState):
        raise ValueError("this model is not patched by vtok")
    for blk in state.spec.blocks:
        blk.__class__ = blk._vtok_orig_cls
        del blk._vtok_state, blk._vtok_index
    for h in state.handles:
        h.remove()
    state.handles.clear()
    for m in state.owners:
        del m._vtok_state
    return model


class Captured(dict):
    """``{block index: {"cls_attn": [B, Np], "keys": [B, H, Np, dh], "hidden": [B, Np, D], "attn": ...}}`` of the
    last forward, patch tokens only. ``cls_attn`` / ``keys`` / ``attn`` describe the tokens entering the block (its
    attention), ``hidden`` the block's output; ``attn_received`` ``[B, Np]`` is the attention each patch token
    receives averaged over heads and all query rows (HiPrune's score). ``num_prefix``: prefix tokens stripped;
    ``grid``: input patch grid; ``selection``: which original patch tokens the encoder's output holds (identity
    unless patched)."""

    def __init__(self, state: EncoderState):
        super().__init__()
        self._state = state

    @property
    def num_prefix(self) -> int:
        return self._state.n_prefix

    @property
    def grid(self) -> tuple[int, int] | None:
        return self._state.grid

    @property
    def selection(self):
        return self._state.selection


@contextmanager
def capture(model: torch.nn.Module, layers: int | Sequence[int] | None = None,
            what: str | Sequence[str] = ("cls_attn", "keys", "hidden")) -> Iterator[Captured]:
    """Collect per-block tensors during the forwards run inside the ``with`` block (the last forward wins)::

        with vtok.capture(vit, layers=[6, 11]) as feats:
            vit(images)
        scores = feats[11]["cls_attn"]            # [B, Np]: CLS row of block 11's attention (fused SDPA stays on)

    ``layers`` default: the last block. ``what`` ⊆ ``("cls_attn", "keys", "hidden", "attn", "attn_received")``.
    Works on a plain or a ``vtok.patch``-ed model; a plain model is patched for the duration (blocks not captured
    run their original forward) and restored on exit.
    """
    what = (what,) if isinstance(what, str) else tuple(what)
    unknown = sorted(set(what) - set(CAPTURE_KEYS))
    if unknown or not what:
        raise ValueError(f"what must name some of {list(CAPTURE_KEYS)}, got {list(what)}")
    state = getattr(model, "_vtok_state", None)
    spec = state.spec if isinstance(state, EncoderState) else _spec(model)
    depth = len(spec.blocks)
    lays = _layers(layers, depth, [depth - 1])
    installed = state is None
    if installed:
        _check_unpatched(model, spec)
        state = _install(model, spec, Plan())
    elif state.capture:
        raise ValueError("a vtok.capture is already active on this model")
    result = Captured(state)
    state.capture = {i: what for i in lays}
    state.captured = result
    try:
        yield result
    finally:
        state.capture = {}
        state.captured = {}
        if installed:
            unpatch(model)
