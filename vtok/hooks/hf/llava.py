"""Adapter for ``LlavaForConditionalGeneration`` (LLaVA-1.5 and other single-view LLaVA checkpoints).

Each image is one record of ``(image_size / patch)²`` tokens (``N + 1`` with ``vision_feature_select_strategy
"full"``) with grid ``(side, side)``. ``cls_attn`` / ``keys`` come from the encoder layer that produces
``vision_feature_layer`` (``-2`` in LLaVA-1.5, the layer VisionZip reads).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vtok.hooks.hf import _vision
from vtok.hooks.hf._runtime import ImageRecord
from vtok.hooks.hf.adapter import FeatureCall, Undo, VLMAdapter, features_of, register_adapter

if TYPE_CHECKING:
    from vtok.hooks.hf._runtime import Runtime
    from vtok.pruners.registry import Placement

VISION_KEYS = frozenset({"cls_attn", "keys", "mid_attn"})  # the context read from the tower's attention


@register_adapter
class LlavaAdapter(VLMAdapter):
    """Model-specific glue for LLaVA; the ``Runtime`` does the rest."""

    names = ("LlavaForConditionalGeneration",)
    positions = "1d"

    # --- vision side
    def tower(self, model: torch.nn.Module) -> torch.nn.Module:
        vt = self.inner(model).vision_tower
        return getattr(vt, "vision_model", vt)  # transformers 4.x nests the CLIP / SigLIP body in .vision_model

    def tower_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return self.tower(model).encoder.layers

    def feature_layer(self, model: torch.nn.Module) -> int:
        """The encoder layer producing the configured ``vision_feature_layer`` (its last entry when a list)."""
        return self._producing_layer(model, model.config.vision_feature_layer)

    def _producing_layer(self, model: torch.nn.Module, fl: int | Any) -> int:
        """The encoder layer whose output is hidden state ``fl`` (an index into ``hidden_states``; ``-1``: the
        embeddings, no layer)."""
        fl = fl[-1] if isinstance(fl, (list, tuple)) else fl
        return fl % (len(self.tower_layers(model)) + 1) - 1

    def _call_feature_layer(self, model: torch.nn.Module, call: FeatureCall) -> int:
        """The feature layer of one ``get_image_features`` call (LLaVA: the configured one)."""
        return self.feature_layer(model)

    def _has_cls(self, model: torch.nn.Module) -> bool:
        return hasattr(self.tower(model).embeddings, "class_embedding")

    def _drops_cls(self, model: torch.nn.Module) -> bool:
        return self._has_cls(model) and model.config.vision_feature_select_strategy == "default"

    def provides(self, model: torch.nn.Module) -> set[str]:
        """Context keys the pre-LLM stage can give: the tower's attention context when a layer produces the
        features."""
        out = {"grid", "query"}
        if self.feature_layer(model) >= 0:
            out |= VISION_KEYS
        return out

    # --- hooks
    def install(self, model: torch.nn.Module, rt: Runtime) -> list[Undo]:
        want = VISION_KEYS & set(rt.pre_context()) & self.provides(model)
        placement = self.pre_placement(rt)
        layers = self.tower_layers(model)

        def watched(call: FeatureCall) -> tuple[int, int, set[str]]:
            """``(feature layer, mid layer, keys to compute)`` of one call."""
            li = self._call_feature_layer(model, call)
            return li, self._mid_layer(placement, li, len(layers)), want if li >= 0 else set()

        def watch(call: FeatureCall) -> dict[int, torch.nn.Module]:
            li, mi, use = watched(call)
            keys = ({li} if use - {"mid_attn"} else set()) | ({mi} if "mid_attn" in use else set())
            return {i: layers[i] for i in sorted(keys)}

        def make_records(out: Any, call: FeatureCall) -> list[ImageRecord]:
            li, mi, use = watched(call)
            rows = placement.score_rows if placement is not None else "cls"
            got = call.captured
            ctx: dict[str, Tensor] = {}
            if li in got and use - {"mid_attn"}:
                ctx.update(self._context(model, layers[li], got[li], use - {"mid_attn"}, rows))
            if "mid_attn" in use and mi in got:
                ctx["mid_attn"] = self._context(model, layers[mi], got[mi], {"cls_attn"}, rows)["cls_attn"]
            return self._records(model, list(features_of(out)), call, ctx)

        return [self.hook_features(model, rt, "get_image_features", watch, make_records),
                *self._install_video(model, rt)]

    @staticmethod
    def _mid_layer(placement: Placement | None, li: int, depth: int) -> int:
        """HiPrune-style anchors: the layer ``floor(mid_layer · depth)`` of the tower, at or before the feature
        layer ``li`` (``li`` itself without a ``mid_layer``)."""
        mid = getattr(placement, "mid_layer", None)
        return li if mid is None else min(int(mid * depth), li)

    def _install_video(self, model: torch.nn.Module, rt: Runtime) -> list[Undo]:
        """Hooks of the video features (none: LLaVA has no video input)."""
        return []

    def _records(self, model: torch.nn.Module, feats: list[Tensor], call: FeatureCall, ctx: dict[str, Tensor]
                 ) -> list[ImageRecord]:
        """One record per image (``feats[i] [n, D]``), square grids; ``ctx`` values ``[images, ...]``."""
        recs = []
        for i, f in enumerate(feats):
            n = f.shape[0]
            side = math.isqrt(n)
            recs.append(ImageRecord(n=n, image=i, grid=(side, side) if side * side == n else None,
                                    ctx={k: v[i] for k, v in ctx.items()}))
        return recs

    @torch.no_grad()
    def _context(self, model: torch.nn.Module, layer: torch.nn.Module, hidden: Tensor, want: set[str],
                 rows: str = "cls") -> dict[str, Tensor]:
        """``cls_attn [n, N]`` (``rows="cls"``: the CLS row, or mean received attention without CLS; ``"all"``:
        attention received, averaged over heads and all query rows) and ``keys [n, H, N, dh]`` of one tower layer
        for its input ``hidden [n, T, D]`` (one row per image or crop), CLS column dropped when the features drop
        it."""
        q, k, scale = _vision.qk(layer, hidden)
        drop = 1 if self._drops_cls(model) else 0
        out: dict[str, Tensor] = {}
        if "cls_attn" in want:
            use_cls = self._has_cls(model) and rows == "cls"
            row = _vision.cls_row(q, k, scale) if use_cls else _vision.received(q, k, scale)
            out["cls_attn"] = row[:, drop:]
        if "keys" in want:
            out["keys"] = k[:, :, drop:]
        return out
