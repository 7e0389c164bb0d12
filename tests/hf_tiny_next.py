"""Tiny random-weight LLaVA-NeXT / LLaVA-OneVision models built from configs (no downloads), and their inputs.

Vision tower: 28 px crops, patch 7 (a 4 x 4 grid = 16 tokens per crop), 3 layers (CLIP for LLaVA-NeXT, SigLIP for
OneVision); grid pinpoints ``(28, 56)``, ``(56, 28)``, ``(56, 56)``: an image becomes a base view plus 2 or 4 tiles.
The number of image tokens of an image comes from the model's own ``get_image_features`` (``image_tokens``).
"""

from __future__ import annotations

import torch

from tests.hf_tiny import image_features

IMAGE_TOKEN = 250
VIDEO_TOKEN = 251
PAD = 0
PINPOINTS = [[28, 56], [56, 28], [56, 56]]


def _text(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, pad_token_id=PAD,
                       eos_token_id=None, bos_token_id=None)


def _finish(model):
    model = model.eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None  # always generate max_new_tokens
    return model


def tiny_llava_next(seed: int = 0, *, layers: int = 4, attn: str = "sdpa"):
    """A ``LlavaNextForConditionalGeneration``: CLIP tower (CLS dropped, ``vision_feature_layer=-2``), Llama LM."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=28, patch_size=7, projection_dim=32)
    cfg = LlavaNextConfig(vision_config=vision, text_config=_text(layers), image_token_id=IMAGE_TOKEN,
                          vision_feature_select_strategy="default", vision_feature_layer=-2,
                          image_grid_pinpoints=PINPOINTS)
    cfg._attn_implementation = attn
    return _finish(LlavaNextForConditionalGeneration(cfg))


def tiny_llava_onevision(seed: int = 0, *, layers: int = 4, attn: str = "sdpa", aspect: str = "anyres_max_2"):
    """A ``LlavaOnevisionForConditionalGeneration``: SigLIP tower (no CLS, ``"full"``, ``vision_feature_layer=-1``),
    Llama LM. ``anyres_max_2``: a 4 x 8 high-res grid stays, an 8 x 8 one is interpolated down to 5 x 5."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=28, patch_size=7, vision_use_head=False)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=_text(layers), image_token_index=IMAGE_TOKEN,
                               video_token_index=VIDEO_TOKEN, vision_feature_select_strategy="full",
                               vision_feature_layer=-1, image_grid_pinpoints=PINPOINTS, vision_aspect_ratio=aspect)
    cfg._attn_implementation = attn
    return _finish(LlavaOnevisionForConditionalGeneration(cfg))


def pixels(image_sizes: list[tuple[int, int]], model, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values [n_images, max_crops, 3, 28, 28], image_sizes [n_images, 2])`` random crops, zero-padded to
    the largest crop count as the processors do."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    g = torch.Generator().manual_seed(seed)
    counts = [image_size_to_num_patches(list(s), model.config.image_grid_pinpoints, 28) for s in image_sizes]
    pv = torch.zeros(len(image_sizes), max(counts), 3, 28, 28)
    for i, c in enumerate(counts):
        pv[i, :c] = torch.randn(c, 3, 28, 28, generator=g)
    return pv, torch.tensor(image_sizes, dtype=torch.long)


@torch.no_grad()
def image_tokens(model, pixel_values: torch.Tensor, image_sizes: torch.Tensor, **kwargs) -> list[int]:
    """Placeholder tokens per image: the lengths of the model's own packed features."""
    out = model.model.get_image_features(pixel_values, image_sizes, **kwargs)
    return [int(f.shape[0]) for f in image_features(out)]


def prompt(text_before: list[int], counts: list[int], text_after: list[int]) -> list[int]:
    """Text, then each image's placeholder run followed by token 7, then text."""
    ids = list(text_before)
    for n in counts:
        ids += [IMAGE_TOKEN] * n + [7]
    return ids + list(text_after)


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with left padding."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = torch.tensor(r)
        mask[i, n - len(r):] = 1
    return ids, mask
