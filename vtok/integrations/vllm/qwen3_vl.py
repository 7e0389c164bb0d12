"""vLLM's ``Qwen3VLForConditionalGeneration`` with vtok's pre-LLM image pruning (``vtok.integrations.vllm``).

As the Qwen2.5-VL class (``qwen2_5_vl.py``, shared code in ``_qwen.py``): each image's ``<|image_pad|>`` run is cut
to ``vtok.retained_count`` by the processor, its merged features are pruned with ``vtok.compress`` (on the tower's
main output; the DeepStack features, which vLLM concatenates to it per token, follow the kept tokens: a merged token
takes its representative's rows, as ``vtok.wrap`` does), and the kept tokens get ``vtok.wrap``'s ``"reindex"`` 3-D
positions (ids as Qwen2.5-VL's; Qwen3-VL only interleaves the rotary frequencies). The tower's attention for methods
reading it is its last block's (Qwen3-VL's vision blocks all attend fully), as in ``vtok.wrap``.

Videos pass unpruned: Qwen3-VL puts each temporal patch in its own ``<t seconds> <vision_start> … <vision_end>`` run,
and ``vtok.wrap`` splits a video's budget over those runs; the plugin does not yet. Their positions are vLLM's own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vtok.integrations.vllm._qwen import QwenPruning, assemble_positions, pruning_processor

FAMILY = "qwen3_vl"
VtokQwen3VLMultiModalProcessor = pruning_processor(Qwen3VLMultiModalProcessor, FAMILY, ("image",))


@MULTIMODAL_REGISTRY.register_processor(VtokQwen3VLMultiModalProcessor, info=Qwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class VtokQwen3VLForConditionalGeneration(QwenPruning, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL; with ``vtok_method`` set, each image's features (DeepStack included) are pruned."""

    FAMILY = FAMILY
    PRUNED_MODALITIES = ("image",)

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vtok_setup()

    def _split(self, feats: Tensor) -> tuple[Tensor, Tensor | None]:
        if feats.shape[-1] == self.visual_dim:
            return feats, None
        return feats[:, :self.visual_dim], feats[:, self.visual_dim:]

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[Tensor, int]:
        if self.vtok is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        cfg = self.config
        runs: list[tuple[int, np.ndarray]] = []  # kept image tokens, and every video frame's run as it is
        for f in mm_features:
            if f.modality == "image":
                runs.append((f.mm_position.offset, self._kept_offsets("image", f.data)))
                continue
            if f.modality != "video":
                raise ValueError(f"vtok: unsupported modality {f.modality!r}")
            for offset, gh, gw, n in self._iter_mm_grid_hw(
                    input_tokens, [f], video_token_id=cfg.video_token_id,
                    vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id,
                    spatial_merge_size=cfg.vision_config.spatial_merge_size):
                if n:
                    runs.append((offset, np.indices((1, gh, gw)).reshape(3, -1)[:, :n]))
        return assemble_positions(runs, len(input_tokens))
