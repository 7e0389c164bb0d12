"""Tiny random-weight Qwen3-VL (``Qwen3VLForConditionalGeneration``) for tests and demos.

Vision: depth 3, 32 wide, 2 heads, 14 px patches merged 2 x 2 (``t * h * w / 4`` tokens for a ``(t, h, w)`` patch
grid, the ``qwen2_vl`` tiny inputs), DeepStack features from blocks 0 and 1 (added to the output of decoder layers 0
and 1 at the image tokens). Language model 64 wide, 4 heads (2 key / value heads), interleaved M-RoPE over
``(t, h, w)`` sections ``[2, 3, 3]``. Images only (the prompts hold no videos).
"""

from __future__ import annotations

from typing import Any

import torch

from vtok.hooks.hf.tiny import (
    MERGE,
    PAD,
    PATCH,
    QWEN_GRIDS,
    QWEN_IMAGE_TOKEN,
    QWEN_VIDEO_TOKEN,
    QWEN_VOCAB,
    TEMPORAL,
    VISION_END,
    VISION_START,
    Runs,
    qwen_pixels,
    register_family,
)

DEEPSTACK = [0, 1]


def _text(layers: int) -> dict[str, Any]:
    mrope = {"mrope_section": [2, 3, 3], "mrope_interleaved": True}
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=QWEN_VOCAB, max_position_embeddings=512,
                pad_token_id=PAD, bos_token_id=None, eos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **mrope},
                rope_scaling={"rope_type": "default", **mrope})  # transformers 4.x reads this one


def build(*, layers: int, attn: str) -> torch.nn.Module:
    """The tiny model (see the module docstring)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, num_position_embeddings=64,
                  deepstack_visual_indexes=DEEPSTACK)
    cfg = Qwen3VLConfig(vision_config=vision, text_config=_text(layers), image_token_id=QWEN_IMAGE_TOKEN,
                        video_token_id=QWEN_VIDEO_TOKEN, vision_start_token_id=VISION_START,
                        vision_end_token_id=VISION_END)
    cfg._attn_implementation = attn
    cfg.text_config._attn_implementation = attn
    model = Qwen3VLForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # sharper vision attention than the 0.02 init (near-uniform rows: near-ties)
        for blk in model.model.visual.blocks:
            w = blk.attn.qkv.weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.5)
    return model


def runs(model: torch.nn.Module, n: int, seed: int) -> Runs:
    """Per image ``<vision_start>`` + its tokens + ``<vision_end>`` (grids ``QWEN_GRIDS`` in turn), and pixels."""
    grids = [QWEN_GRIDS[i % len(QWEN_GRIDS)] for i in range(n)]
    pix, thw = qwen_pixels(grids, seed)
    out = [[VISION_START] + [QWEN_IMAGE_TOKEN] * (t * h * w // MERGE ** 2) + [VISION_END] for t, h, w in grids]
    return out, ({"pixel_values": pix, "image_grid_thw": thw} if n else {})


def token_types(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``mm_token_type_ids`` on transformers 5 (1 image, 2 video); none on 4.x."""
    import transformers

    if transformers.__version__.startswith("4."):
        return {}
    return {"mm_token_type_ids": (ids == QWEN_IMAGE_TOKEN).int() + 2 * (ids == QWEN_VIDEO_TOKEN).int()}


register_family("qwen3_vl", "Qwen3VLForConditionalGeneration", build, runs, token_types)
