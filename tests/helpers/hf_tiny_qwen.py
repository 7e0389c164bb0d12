"""Tiny random-weight Qwen2-VL / Qwen2.5-VL models (``vtok.hooks.hf.tiny``) and prompts for them.

Images are given as the processor would give them: ``pixel_values [sum(t*h*w), 3 * 2 * 14 * 14]`` (one row per
14 px patch, two temporal copies) and ``image_grid_thw [n_images, 3]`` in patches; each image takes
``t * h * w / 4`` placeholder tokens after the 2x2 merge.
"""

from __future__ import annotations

import torch

from vtok.hooks.hf import tiny
from vtok.hooks.hf.tiny import MERGE, PAD, PATCH, TEMPORAL, VISION_END, VISION_START, tiny_model
from vtok.hooks.hf.tiny import QWEN_IMAGE_TOKEN as IMAGE_TOKEN
from vtok.hooks.hf.tiny import QWEN_VIDEO_TOKEN as VIDEO_TOKEN
from vtok.hooks.hf.tiny import QWEN_VOCAB as VOCAB
from vtok.hooks.hf.tiny import qwen_pixels as images

__all__ = ["IMAGE_TOKEN", "MERGE", "PAD", "PATCH", "TEMPORAL", "VIDEO_TOKEN", "VISION_END", "VISION_START", "VOCAB",
           "images", "left_pad", "n_tokens", "qwen_prompt", "tiny_qwen2_5_vl", "tiny_qwen2_vl"]


def tiny_qwen2_vl(seed: int = 0, *, layers: int = 4, attn: str = "sdpa"):
    """A ``Qwen2VLForConditionalGeneration``: vision depth 2, embed 32, 2 heads, patch 14, merge 2; text 64 wide."""
    return tiny_model("qwen2_vl", seed=seed, layers=layers, attn=attn)


def tiny_qwen2_5_vl(seed: int = 0, *, layers: int = 4, attn: str = "sdpa"):
    """A ``Qwen2_5_VLForConditionalGeneration``: vision depth 3 with full attention only in block 1 (blocks 0 and 2
    use 56 px windows = 2x2 merged tokens), embed 32, 2 heads, patch 14, merge 2; text 64 wide."""
    return tiny_model("qwen2_5_vl", seed=seed, layers=layers, attn=attn)


def n_tokens(grid: tuple[int, int, int]) -> int:
    t, h, w = grid
    return t * h * w // (MERGE * MERGE)


def qwen_prompt(text_before: list[int], grids: list[tuple[int, int, int]], text_after: list[int]) -> list[int]:
    """``text_before <|vision_start|> image… <|vision_end|> 7 … text_after`` for each image grid."""
    ids = list(text_before)
    for grid in grids:
        ids += [VISION_START] + [IMAGE_TOKEN] * n_tokens(grid) + [VISION_END, 7]
    return ids + list(text_after)


def left_pad(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and (transformers 5) ``mm_token_type_ids`` (1 = image token) with left
    padding."""
    ids, mask = tiny.left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, **tiny.qwen_token_types(ids)}
