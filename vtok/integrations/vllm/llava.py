"""vLLM's ``LlavaForConditionalGeneration`` with vtok's pre-LLM pruning (registered by ``vtok.integrations.vllm``).

The processor shrinks each image's run of ``<image>`` placeholders to ``vtok.retained_count`` before the encoder
runs; ``embed_multimodal`` prunes each image's projected features ``[n, D]`` with ``vtok.compress`` to exactly that
many, on the ``(side, side)`` patch grid, as ``vtok.wrap`` prunes the projected features of Hugging Face's LLaVA.
Positions are LLaVA's plain 1-D ones over the shorter prompt: ``vtok.wrap``'s ``"reindex"``, the default of every
method offered. Without ``vtok_method`` in the config the class is vLLM's own, unchanged.

Methods reading the tower's attention (``cls_attn``, ``visionzip``, ``fastervlm``, ...) get it as ``vtok.wrap``
gives it: a forward pre-hook captures the input of the tower's feature layer (vLLM builds the tower only up to the
layer producing ``vision_feature_layer``, so it is the last one), and the layer's queries and keys are recomputed from
it (``layer_norm1``, the fused ``qkv_proj``): ``cls_attn`` is the CLS query's softmax row over the patches, heads
averaged, ``keys`` the per-head patch keys (``vtok.hooks.hf._vision``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from vtok.hooks.hf import _vision
from vtok.integrations.vllm import settings as vs

FAMILY = "llava"


def _shrink(replacement: Any, cfg: vs.Settings, item_idx: int) -> list[int]:
    """The base replacement of one image (``n`` placeholder ids), cut to the retained count."""
    full = replacement(item_idx) if callable(replacement) else replacement
    ids = list(getattr(full, "full", full))
    if len(set(ids)) != 1:
        raise NotImplementedError("vtok: LLaVA placeholders with extra (non-feature) tokens are not supported")
    n = len(ids)
    return ids[:1] * cfg.count(n, vs.square_grid(n))


class VtokLlavaMultiModalProcessor(LlavaMultiModalProcessor):
    """LLaVA's processor with the placeholder runs cut to ``vtok.retained_count``."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs
                            ) -> Sequence[Any]:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        cfg = vs.read(self.info.get_hf_config(), FAMILY)
        if cfg is None:
            return updates
        return [PromptReplacement(modality=u.modality, target=u.target,
                                  replacement=partial(_shrink, u.replacement, cfg)) for u in updates]


def _build_processor(info, dummy_inputs, **kwargs):
    base = _build_llava_or_pixtral_hf_processor(info, dummy_inputs, **kwargs)
    if type(base) is not LlavaMultiModalProcessor:
        if vs.read(info.get_hf_config(), FAMILY) is not None:
            raise ValueError(f"vtok: the vLLM plugin prunes LLaVA with a CLIP / SigLIP tower, not "
                             f"{type(base).__name__}")
        return base
    return VtokLlavaMultiModalProcessor(info, dummy_inputs, **kwargs)


@MULTIMODAL_REGISTRY.register_processor(_build_processor, info=_build_llava_or_pixtral_hf_info,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class VtokLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA; with ``vtok_method`` set, each image's projected features are pruned before the LLM."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtok = vs.read(self.config, FAMILY)
        if self.vtok is not None:
            if self.config.vision_config.model_type == "pixtral":
                raise ValueError("vtok: the vLLM plugin prunes LLaVA with a CLIP / SigLIP tower, not Pixtral")
            strategy = self.config.vision_feature_select_strategy
            if strategy != "default":
                raise ValueError(f"vtok: vision_feature_select_strategy {strategy!r} keeps the CLS token among the "
                                 f"image features; the plugin prunes the patch grid of 'default' only")
            self._vtok_hidden = None
            if self.vtok.tower_context:
                self._hook_feature_layer(vllm_config)

    def _hook_feature_layer(self, vllm_config) -> None:
        """Capture the feature layer's input for ``cls_attn`` / ``keys`` (see the module docstring)."""
        why = None
        if not isinstance(self.config.vision_feature_layer, int):
            why = "a list of vision_feature_layer"
        elif vllm_config.parallel_config.tensor_parallel_size > 1:
            why = "tensor parallelism (the tower's heads are split over ranks)"
        elif not hasattr(getattr(self.vision_tower, "vision_model", None), "encoder"):
            why = f"the tower {type(self.vision_tower).__name__}"
        if why is not None:
            raise ValueError(f"vtok: vtok_method {self.vtok.method!r} reads the tower's attention, which the plugin "
                             f"does not recompute with {why}")
        self._vtok_layer = self.vision_tower.vision_model.encoder.layers[-1]

        def capture(module, args, kwargs):
            self._vtok_hidden = args[0] if args else kwargs["hidden_states"]

        self._vtok_layer.register_forward_pre_hook(capture, with_kwargs=True)

    @torch.no_grad()
    def _tower_context(self) -> list[dict[str, Tensor]]:
        """Per image ``cls_attn [N]`` / ``keys [H, N, dh]`` of the captured feature-layer input (CLS dropped)."""
        layer, hidden = self._vtok_layer, self._vtok_hidden
        self._vtok_hidden = None
        y = layer.layer_norm1(hidden)
        qkv, _ = layer.self_attn.qkv_proj(y)
        q, k, _ = qkv.chunk(3, dim=-1)
        n, t, _ = q.shape
        h = layer.self_attn.num_heads_per_partition
        q, k = (x.reshape(n, t, h, -1).transpose(1, 2) for x in (q, k))
        want = self.vtok.tower_context
        ctx: dict[str, Tensor] = {}
        if "cls_attn" in want:
            ctx["cls_attn"] = _vision.cls_row(q, k, float(layer.self_attn.scale))[:, 1:]
        if "keys" in want:
            ctx["keys"] = k[:, :, 1:]
        return [{key: v[i] for key, v in ctx.items()} for i in range(n)]

    def embed_multimodal(self, **kwargs: object):
        embeds = super().embed_multimodal(**kwargs)
        if self.vtok is None or len(embeds) == 0:
            return embeds
        ctx = self._tower_context() if self.vtok.tower_context else [None] * len(embeds)
        if len(ctx) != len(embeds):
            raise RuntimeError(f"vtok: tower context for {len(ctx)} images, {len(embeds)} images embedded")
        # a [B, n, D] tensor or a sequence of [n, D], one per image: each image pruned alone, so a request's tokens do
        # not depend on what it is batched with
        return [self.vtok.prune(e, vs.square_grid(int(e.shape[0])), c)[0] for e, c in zip(embeds, ctx, strict=True)]
