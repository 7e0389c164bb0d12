"""Tiny random-weight Qwen2-VL / Qwen2.5-VL models built from configs (no downloads) and prompts for them.

Images are given as the processor would give them: ``pixel_values [sum(t*h*w), 3 * 2 * 14 * 14]`` (one row per
14 px patch, two temporal copies) and ``image_grid_thw [n_images, 3]`` in patches; each image takes
``t * h * w / 4`` placeholder tokens after the 2x2 merge.
"""

from __future__ import annotations

import torch

PAD = 0
IMAGE_TOKEN = 290
VIDEO_TOKEN = 291
VISION_START = 292
VISION_END = 293
VOCAB = 300
MERGE = 2
PATCH = 14
TEMPORAL = 2


def _text_config(layers: int) -> dict:
    # head_dim 16 -> 8 rotary frequencies, split over (t, h, w) by mrope_section
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=PAD,
                bos_token_id=1, eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                 "mrope_section": [2, 3, 3]},
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})  # transformers 4.x reads this one


def _finish(model):
    # sharper vision attention than the 0.02 init gives (near-uniform rows would make attention scores near-ties)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for blk in model.model.visual.blocks:
            w = blk.attn.qkv.weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.5)
    model = model.eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None  # always generate max_new_tokens
    return model


def tiny_qwen2_vl(seed: int = 0, *, layers: int = 4, attn: str = "sdpa"):
    """A ``Qwen2VLForConditionalGeneration``: vision depth 2, embed 32, 2 heads, patch 14, merge 2; text 64 wide."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
    cfg = Qwen2VLConfig(vision_config=vision, text_config=_text_config(layers), image_token_id=IMAGE_TOKEN,
                        video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                        vision_end_token_id=VISION_END)
    cfg._attn_implementation = attn
    return _finish(Qwen2VLForConditionalGeneration(cfg))


def tiny_qwen2_5_vl(seed: int = 0, *, layers: int = 4, attn: str = "sdpa"):
    """A ``Qwen2_5_VLForConditionalGeneration``: vision depth 3 with full attention only in block 1 (blocks 0 and 2
    use 56 px windows = 2x2 merged tokens), embed 32, 2 heads, patch 14, merge 2; text 64 wide."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2,
                  patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, window_size=56,
                  fullatt_block_indexes=[1])
    cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=_text_config(layers), image_token_id=IMAGE_TOKEN,
                           video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                           vision_end_token_id=VISION_END)
    cfg._attn_implementation = attn
    return _finish(Qwen2_5_VLForConditionalGeneration(cfg))


def images(grids: list[tuple[int, int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values, image_grid_thw)`` for images of the given ``(t, h, w)`` patch grids (random pixels)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grids)
    pix = torch.randn(n, 3 * TEMPORAL * PATCH * PATCH, generator=g)
    return pix, torch.tensor(grids, dtype=torch.long)


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
    """``input_ids``, ``attention_mask`` and ``mm_token_type_ids`` (1 = image token) with left padding."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = torch.tensor(r)
        mask[i, n - len(r):] = 1
    types = (ids == IMAGE_TOKEN).int() + 2 * (ids == VIDEO_TOKEN).int()
    import transformers

    if transformers.__version__.startswith("4."):  # 4.x has no mm_token_type_ids (get_rope_index reads the ids)
        return {"input_ids": ids, "attention_mask": mask}
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types}
