"""Adapter for ``LlavaForConditionalGeneration`` (LLaVA-1.5 and other single-view LLaVA checkpoints).

Each image is one record of ``(image_size / patch)²`` tokens (``N + 1`` with ``vision_feature_select_strategy
"full"``) with grid ``(side, side)``. ``cls_attn`` / ``keys`` come from the encoder layer that produces
``vision_feature_layer`` (``-2`` in LLaVA-1.5, the layer VisionZip reads).
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import torch
from torch import Tensor

from vtok.hooks.hf import _vision
from vtok.hooks.hf._runtime import ImageRecord
from vtok.pruners import get as get_method


class LlavaAdapter:
    """Model-specific glue for LLaVA; the ``Runtime`` does the rest."""

    names = ("LlavaForConditionalGeneration",)
    rope = "1d"

    # --- structure
    def inner(self, model):
        return model.model

    def language_model(self, model):
        return model.model.language_model

    def decoder_layers(self, model):
        return self.language_model(model).layers

    def self_attention(self, layer):
        return layer.self_attn

    def image_token_ids(self, model) -> list[int]:
        cfg = model.config
        return [getattr(cfg, "image_token_id", None) or cfg.image_token_index]

    def attn_implementation(self, model) -> str:
        return model.config.text_config._attn_implementation or "sdpa"

    def num_layers(self, model) -> int:
        return len(self.decoder_layers(model))

    # --- vision side
    def _tower(self, model):
        vt = model.model.vision_tower
        return getattr(vt, "vision_model", vt)  # transformers 4.x nests the CLIP / SigLIP body in .vision_model

    def _tower_layers(self, model):
        return self._tower(model).encoder.layers

    def _feature_layer(self, model) -> int:
        fl = model.config.vision_feature_layer
        return fl[-1] if isinstance(fl, (list, tuple)) else fl

    def _has_cls(self, model) -> bool:
        return hasattr(self._tower(model).embeddings, "class_embedding")

    def _drops_cls(self, model) -> bool:
        return self._has_cls(model) and model.config.vision_feature_select_strategy == "default"

    def provides(self, model) -> set[str]:
        """Context keys the pre-LLM stage can give."""
        out = {"grid", "query"}
        layers = self._tower_layers(model)
        h = self._feature_layer(model) % (len(layers) + 1)
        if h >= 1:
            out |= {"cls_attn", "keys", "mid_attn"}
        return out

    def install(self, model, rt) -> list[Any]:
        inner = model.model
        orig = inner.get_image_features
        needs = rt.pre_context()
        want = {"cls_attn", "keys", "mid_attn"} & set(needs) & self.provides(model)
        layers = self._tower_layers(model)
        li = self._feature_layer(model) % (len(layers) + 1) - 1
        placement = get_method(rt.pre.method).placement if rt.pre is not None else None
        # HiPrune-style anchors: the layer floor(mid_layer · depth) of the tower, at or before the feature layer
        mi = li if placement is None or placement.mid_layer is None else min(
            int(placement.mid_layer * len(layers)), li)
        rows = placement.score_rows if placement is not None else "cls"
        watch = sorted({li} | ({mi} if "mid_attn" in want else set())) if want else []
        captured: dict[int, Tensor] = {}

        def hook_for(i):
            def pre_hook(module, args, kwargs):
                captured[i] = args[0] if args else kwargs["hidden_states"]
            return pre_hook

        @functools.wraps(orig)  # keeps the signature: generate() inspects it to pre-encode the images
        def get_image_features(*args, **kwargs):
            captured.clear()
            handles = [layers[i].register_forward_pre_hook(hook_for(i), with_kwargs=True) for i in watch]
            try:
                out = orig(*args, **kwargs)
            finally:
                for handle in handles:
                    handle.remove()
            t0 = time.perf_counter()
            feats = out.pooler_output if hasattr(out, "pooler_output") else out
            feats = list(feats) if isinstance(feats, Tensor) else feats
            ctx = self._context(model, layers[li], captured[li], want, rows=rows) if li in captured else {}
            if "mid_attn" in want and mi in captured:
                ctx["mid_attn"] = self._context(model, layers[mi], captured[mi], {"cls_attn"}, rows=rows)["cls_attn"]
            recs = []
            for i, f in enumerate(feats):
                n = f.shape[0]
                side = math.isqrt(n)
                recs.append(ImageRecord(n=n, image=i, grid=(side, side) if side * side == n else None,
                                        ctx={k: v[i] for k, v in ctx.items()}))
            rt.add_records(out, recs)
            rt.wrapper_s += time.perf_counter() - t0
            return out

        inner.get_image_features = get_image_features
        return [lambda: delattr(inner, "get_image_features")]

    @torch.no_grad()
    def _context(self, model, layer, hidden: Tensor, want: set[str], rows: str = "cls") -> dict[str, Tensor]:
        """``cls_attn`` (``rows="cls"``: the CLS row, or mean received attention without CLS; ``"all"``: attention
        received, averaged over heads and all query rows) and ``keys`` of one tower layer, CLS column dropped when
        the features drop it."""
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
