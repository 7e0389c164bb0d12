"""vLLM's ``Qwen2_5_VLForConditionalGeneration`` with vtok's pre-LLM image pruning (``vtok.integrations.vllm``).

As vLLM's own EVS video path: the processor shrinks each image's ``<|image_pad|>`` run to ``vtok.retained_count``
before the encoder runs, the image features (the merger's output, ``(h / 2, w / 2)`` grid) are pruned with
``vtok.compress``, and the 3-D M-RoPE positions follow the kept tokens. The positions rule is ``vtok.wrap``'s
``"reindex"`` (the default of every method offered): each kept token keeps its ``(t, h, w)`` offset from its image's
start, the image spans ``max kept offset + 1`` positions, text counts on by one (``reindex_mrope`` in
``vtok/hooks/hf/_sequence.py``).

vLLM fixes a request's M-RoPE positions when the request arrives (``get_mrope_input_positions``), before the encoder
runs, and recomputes them afterwards (``recompute_mrope_positions``) only when ``video_pruning_rate > 0`` and only
in the GPU model runner. So the kept cells are found where the positions are made: ``get_mrope_input_positions``
runs the vision tower on each image alone and prunes it, and keeps the pruned features (keyed by the image's pixels)
for ``embed_multimodal``, which uses them instead of running the tower again (an image it has not seen is run alone
the same way). Videos pass unpruned. Without ``vtok_method`` in the config the class is vLLM's own, unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from vtok.integrations.vllm import settings as vs

FAMILY = "qwen2_5_vl"
CACHE_ITEMS = 256  # pruned images kept between get_mrope_input_positions and embed_multimodal


def _grid(thw: Any, merge: int) -> tuple[int, int]:
    t, h, w = (int(v) for v in (thw.tolist() if isinstance(thw, Tensor) else thw))
    if t != 1:
        raise ValueError(f"vtok: an image must have 1 temporal patch, got grid {(t, h, w)}")
    return h // merge, w // merge


def _shrink(replacement: Any, cfg: vs.Settings, out_mm_kwargs: Any, merge: int, item_idx: int) -> list[int]:
    ids = list(replacement(item_idx))
    grid = _grid(out_mm_kwargs["image"][item_idx]["image_grid_thw"].data, merge)
    if len(ids) != grid[0] * grid[1] or len(set(ids)) != 1:
        raise NotImplementedError(f"vtok: unexpected Qwen2.5-VL image placeholders ({len(ids)} for grid {grid})")
    return ids[:1] * cfg.count(len(ids), grid)


class VtokQwen2_5_VLMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL's processor with each image's placeholder run cut to ``vtok.retained_count``."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs
                            ) -> Sequence[Any]:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        cfg = vs.read(self.info.get_hf_config(), FAMILY)
        if cfg is None:
            return updates
        merge = self.info.get_image_processor(**hf_processor_mm_kwargs).merge_size
        return [u if u.modality != "image" else
                PromptReplacement(modality=u.modality, target=u.target,
                                  replacement=partial(_shrink, u.replacement, cfg, out_mm_kwargs, merge))
                for u in updates]


@MULTIMODAL_REGISTRY.register_processor(VtokQwen2_5_VLMultiModalProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class VtokQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL; with ``vtok_method`` set, each image's features are pruned before the LLM."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtok = vs.read(self.config, FAMILY)
        self._vtok_cache: OrderedDict[bytes, tuple[Tensor, Tensor]] = OrderedDict()
        if self.vtok is not None and self.is_multimodal_pruning_enabled:
            raise ValueError("vtok: vtok_method together with vLLM's video_pruning_rate (EVS) is not supported; "
                             "set one of them")

    def get_encoder_cudagraph_config(self):
        """vLLM's, without images when pruning them: the encoder CUDA-graph path (GPU) bypasses
        ``_process_image_input``, as vLLM's own EVS notes for its postprocess."""
        cfg = super().get_encoder_cudagraph_config()
        if self.vtok is not None:
            cfg = dataclasses.replace(cfg, modalities=[m for m in cfg.modalities if m != "image"])
        return cfg

    # --- the pruned features of one image, computed alone and cached
    def _key(self, pixels: Tensor, thw: Sequence[int]) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        h.update(np.asarray(list(thw), dtype=np.int64).tobytes())
        h.update(pixels.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        return h.digest()

    @torch.inference_mode()
    def _pruned_image(self, pixels: Tensor, thw: Sequence[int], pop: bool) -> tuple[Tensor, Tensor]:
        """``(features [k, D], kept [k])`` of one image (``kept``: each output token's index in the ``h x w``
        merged grid, row-major), from the cache or by running the tower on this image alone."""
        pixels = pixels.to(device=self.visual.device, dtype=self.visual.dtype)
        thw = [int(v) for v in thw]
        key = self._key(pixels, thw)
        hit = self._vtok_cache.pop(key, None) if pop else self._vtok_cache.get(key)
        if hit is not None:
            return hit
        feats = self.visual(pixels, grid_thw=[thw])
        out, sel = self.vtok.prune(feats, _grid(thw, self.visual.spatial_merge_size))
        got = (out, sel.emitted_keep()[0].to("cpu"))
        if not pop:
            self._vtok_cache[key] = got
            while len(self._vtok_cache) > CACHE_ITEMS:
                self._vtok_cache.popitem(last=False)
        return got

    def _process_image_input(self, image_input) -> tuple[Tensor, ...]:
        if self.vtok is None:
            return super()._process_image_input(image_input)
        thw = image_input["image_grid_thw"].tolist()
        merge = self.visual.spatial_merge_size
        if image_input["type"] == "image_embeds":
            return tuple(self.vtok.prune(e, _grid(g, merge))[0]
                         for e, g in zip(super()._process_image_input(image_input), thw, strict=True))
        rows = [t * h * w for t, h, w in thw]
        pixels = image_input["pixel_values"].split(rows)
        return tuple(self._pruned_image(p, g, pop=True)[0] for p, g in zip(pixels, thw, strict=True))

    # --- M-RoPE positions of the pruned prompt
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[Tensor, int]:
        if self.vtok is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        merge = self.visual.spatial_merge_size
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        pieces: list[np.ndarray] = []
        st = cur = 0
        for f in sorted(mm_features, key=lambda f: f.mm_position.offset):
            offset, data = f.mm_position.offset, f.data
            text = offset - st
            pieces.append(np.broadcast_to(np.arange(text), (3, text)) + cur)
            cur += text
            if f.modality == "image":
                thw = data["image_grid_thw"].data.tolist()
                gh, gw = _grid(thw, merge)
                if "pixel_values" in data:
                    _, kept = self._pruned_image(data["pixel_values"].data, thw, pop=False)
                else:
                    _, sel = self.vtok.prune(data["image_embeds"].data, (gh, gw))
                    kept = sel.emitted_keep()[0].to("cpu")
                kept = kept.numpy()
                pos = np.stack([np.zeros_like(kept), kept // gw, kept % gw])
                length = len(kept)
            elif f.modality == "video":
                t, h, w = data["video_grid_thw"].data.tolist()
                pos = np.indices((t, h // merge, w // merge)).reshape(3, -1)
                seconds = data.get("second_per_grid_ts")
                factor = (seconds.data.item() if seconds is not None else 1.0) * tokens_per_second
                if factor != 1.0:
                    pos[0] = (pos[0] * factor).astype(np.int64)
                length = pos.shape[1]
            else:
                raise ValueError(f"vtok: unsupported modality {f.modality!r}")
            if length != f.mm_position.length:
                raise RuntimeError(f"vtok: {length} {f.modality} tokens for {f.mm_position.length} placeholders")
            pieces.append(pos + cur)
            cur += int(pos.max()) + 1
            st = offset + length
        if st < len(input_tokens):
            text = len(input_tokens) - st
            pieces.append(np.broadcast_to(np.arange(text), (3, text)) + cur)
        positions = np.concatenate(pieces, axis=1).astype(np.int64)
        return torch.from_numpy(positions), int(positions.max()) + 1 - len(input_tokens)
