"""vLLM's ``LlavaForConditionalGeneration`` with vtok's pre-LLM pruning (registered by ``vtok.integrations.vllm``).

The processor shrinks each image's run of ``<image>`` placeholders to ``vtok.retained_count`` before the encoder
runs; ``embed_multimodal`` prunes each image's projected features ``[n, D]`` with ``vtok.compress`` to exactly that
many, on the ``(side, side)`` patch grid, as ``vtok.wrap`` prunes the projected features of Hugging Face's LLaVA.
Positions are LLaVA's plain 1-D ones over the shorter prompt: ``vtok.wrap``'s ``"reindex"``, the default of every
method offered. Without ``vtok_method`` in the config the class is vLLM's own, unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

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

    def embed_multimodal(self, **kwargs: object):
        embeds = super().embed_multimodal(**kwargs)
        if self.vtok is None or len(embeds) == 0:
            return embeds
        # a [B, n, D] tensor or a sequence of [n, D], one per image: each image pruned alone, so a request's tokens do
        # not depend on what it is batched with
        return [self.vtok.prune(e, vs.square_grid(int(e.shape[0])))[0] for e in embeds]
