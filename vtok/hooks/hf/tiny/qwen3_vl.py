"""Tiny random-weight Qwen3-VL (``Qwen3VLForConditionalGeneration``) for tests and demos.

Vision: depth 3, 32 wide, 2 heads, 14 px patches merged 2 x 2 (``t * h * w / 4`` tokens for a ``(t, h, w)`` patch
grid; the ``qwen2_vl`` tiny inputs and vision sharpening), DeepStack features from blocks 0 and 1 (added to the output
of decoder layers 0 and 1 at the image tokens). Language model 64 wide, 4 heads (2 key / value heads), interleaved
M-RoPE over ``(t, h, w)`` sections ``[2, 3, 3]``. Images only (the prompts hold no videos).
"""

from __future__ import annotations

from typing import Any

import torch

from vtok.hooks.hf.tiny import (
    MERGE,
    PAD,
    PATCH,
    QWEN_IMAGE_TOKEN,
    QWEN_VIDEO_TOKEN,
    QWEN_VOCAB,
    TEMPORAL,
    VISION_END,
    VISION_START,
    qwen_runs,
    qwen_token_types,
    register_family,
    sharpen_qwen_vision,
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
    return sharpen_qwen_vision(Qwen3VLForConditionalGeneration(cfg))


register_family("qwen3_vl", "Qwen3VLForConditionalGeneration", build, qwen_runs, qwen_token_types)
