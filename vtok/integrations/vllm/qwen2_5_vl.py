"""vLLM's ``Qwen2_5_VLForConditionalGeneration`` with vtok's pre-LLM pruning of images and videos
(``vtok.integrations.vllm``).

As vLLM's own EVS video path: the processor shrinks each image's ``<|image_pad|>`` (each video's ``<|video_pad|>``)
run to ``vtok.retained_count`` before the encoder runs, the features (the merger's output on the ``(h / 2, w / 2)``
grid, ``t`` temporal patches of it for a video) are pruned with ``vtok.compress``, and the 3-D M-RoPE positions follow
the kept tokens. One method prunes every image and video, with the context ``vtok.wrap`` gives it on Hugging Face's
Qwen2.5-VL: an image is one frame (``frames=1`` and its grid); a video gives a temporal method ``frames=t`` and the
grid, and an image method its tokens flattened (``frames=t``, no grid; methods needing a grid refuse videos).

The positions rule is ``vtok.wrap``'s ``"reindex"`` (the default of every method offered): each kept token keeps its
``(t, h, w)`` offset from its item's start (a video's temporal offset scaled by ``second_per_grid_ts *
tokens_per_second`` as vLLM scales it), the item spans ``max kept offset + 1`` positions, text counts on by one
(``reindex_mrope`` in ``vtok/hooks/hf/_sequence.py``).

vLLM fixes a request's M-RoPE positions when the request arrives (``get_mrope_input_positions``), before the encoder
runs, and recomputes them afterwards (``recompute_mrope_positions``) only when ``video_pruning_rate > 0`` and only
in the GPU model runner. So the kept cells are found where the positions are made: ``get_mrope_input_positions``
runs the vision tower on each item alone and prunes it, and keeps the pruned features (keyed by the item's pixels)
for ``embed_multimodal``, which uses them instead of running the tower again (an item it has not seen is run alone
the same way). Without ``vtok_method`` in the config the class is vLLM's own, unchanged.

Methods reading the tower's attention (``cls_attn``, ``visionzip``, ``holitom``, ...) get it as ``vtok.wrap`` gives
it (``vtok/hooks/hf/qwen2_vl.py``): a wrapper around the forward of the last full-attention vision block
(``fullatt_block_indexes``) captures its input while the tower runs on one item; the block's queries and keys are
recomputed from it (``norm1``, the fused ``qkv``, the block's own 2-D rotary embedding). ``cls_attn`` is the
attention each patch receives within its segment (the image, or the video's temporal patch), averaged over heads and
query rows, ``keys`` the per-head keys before the rotary embedding; both are averaged over each ``merge x merge``
merger group and mapped from the tower's window order back to row-major order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vtok.integrations.vllm._qwen import GRID_KEY, QwenPruning, assemble_positions, pruning_processor

FAMILY = "qwen2_5_vl"
VtokQwen2_5_VLMultiModalProcessor = pruning_processor(Qwen2_5_VLMultiModalProcessor, FAMILY, ("image", "video"))


@MULTIMODAL_REGISTRY.register_processor(VtokQwen2_5_VLMultiModalProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class VtokQwen2_5_VLForConditionalGeneration(QwenPruning, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL; with ``vtok_method`` set, each image's and video's features are pruned before the LLM."""

    FAMILY = FAMILY

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vtok_setup()

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[Tensor, int]:
        if self.vtok is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        runs: list[tuple[int, np.ndarray]] = []
        for f in mm_features:
            if f.modality not in GRID_KEY:
                raise ValueError(f"vtok: unsupported modality {f.modality!r}")
            seconds = f.data.get("second_per_grid_ts") if f.modality == "video" else None
            factor = (seconds.data.item() if seconds is not None else 1.0) * tokens_per_second
            pos = self._kept_offsets(f.modality, f.data, factor if f.modality == "video" else 1.0)
            if pos.shape[1] != f.mm_position.length:
                raise RuntimeError(f"vtok: {pos.shape[1]} {f.modality} tokens for {f.mm_position.length} "
                                   f"placeholders")
            runs.append((f.mm_position.offset, pos))
        return assemble_positions(runs, len(input_tokens))
