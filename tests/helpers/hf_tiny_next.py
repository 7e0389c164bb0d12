"""Tiny random-weight LLaVA-NeXT / LLaVA-OneVision models (``vtok.hooks.hf.tiny``) and their inputs.

Vision tower: 28 px crops, patch 7 (a 4 x 4 grid = 16 tokens per crop), 3 layers (CLIP for LLaVA-NeXT, SigLIP for
OneVision); grid pinpoints ``(28, 56)``, ``(56, 28)``, ``(56, 56)``: an image becomes a base view plus 2 or 4 tiles.
The number of image tokens of an image comes from the model's own ``get_image_features`` (``image_tokens``).
"""

from __future__ import annotations

import torch

from tests.helpers.hf_tiny import image_features
from vtok.hooks.hf.tiny import IMAGE_TOKEN, PAD, PINPOINTS, VIDEO_TOKEN, left_pad, tiny_model
from vtok.hooks.hf.tiny import next_pixels as pixels

__all__ = ["IMAGE_TOKEN", "PAD", "PINPOINTS", "VIDEO_TOKEN", "image_tokens", "left_pad", "pixels", "prompt",
           "tiny_llava_next", "tiny_llava_onevision"]


def tiny_llava_next(seed: int = 0, *, layers: int = 4, attn: str = "sdpa"):
    """A ``LlavaNextForConditionalGeneration``: CLIP tower (CLS dropped, ``vision_feature_layer=-2``), Llama LM."""
    return tiny_model("llava_next", seed=seed, layers=layers, attn=attn)


def tiny_llava_onevision(seed: int = 0, *, layers: int = 4, attn: str = "sdpa", aspect: str = "anyres_max_2"):
    """A ``LlavaOnevisionForConditionalGeneration``: SigLIP tower (no CLS, ``"full"``, ``vision_feature_layer=-1``),
    Llama LM. ``anyres_max_2``: a 4 x 8 high-res grid stays, an 8 x 8 one is interpolated down to 5 x 5."""
    return tiny_model("llava_onevision", seed=seed, layers=layers, attn=attn, aspect=aspect)


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
