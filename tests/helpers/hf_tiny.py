"""Tiny random-weight Hugging Face VLMs (``vtok.hooks.hf.tiny``) and LLaVA prompts for them."""

from __future__ import annotations

import pytest
import torch

from vtok.hooks.hf.tiny import IMAGE_TOKEN, PAD, left_pad, tiny_model

__all__ = ["IMAGE_TOKEN", "PAD", "eager_forward", "image_features", "left_pad", "llava_prompt", "tiny_llava"]


def tiny_llava(seed: int = 0, *, select: str = "default", layers: int = 4, attn: str = "sdpa"):
    """A ``LlavaForConditionalGeneration``: CLIP tower 28 px / patch 7 (16 patches + CLS, 3 layers), Llama LM."""
    return tiny_model("llava", seed=seed, layers=layers, attn=attn, select=select)


def llava_prompt(text_before: list[int], n_images: int, text_after: list[int], n_tokens: int = 16) -> list[int]:
    ids = list(text_before)
    for _ in range(n_images):
        ids += [IMAGE_TOKEN] * n_tokens + [7]
    return ids + list(text_after)


def image_features(out):
    """The per-image features of ``get_image_features``: transformers 5 returns an output with ``pooler_output``,
    4.x the list itself."""
    return getattr(out, "pooler_output", out)


def eager_forward(model, **inputs):
    """``model(**inputs, output_attentions=True)`` without gradients, the language model's attention switched to eager
    for the call (SDPA returns no attention weights) and back to SDPA after it."""
    cfg = model.config.text_config
    cfg._attn_implementation = "eager"
    try:
        with torch.no_grad():
            return model(**inputs, output_attentions=True)
    finally:
        cfg._attn_implementation = "sdpa"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster than two (and much faster on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
