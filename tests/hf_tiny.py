"""Tiny random-weight Hugging Face VLMs built from configs (no downloads) and prompts for them."""

from __future__ import annotations

import torch

IMAGE_TOKEN = 250
PAD = 0


def tiny_llava(seed: int = 0, *, select: str = "default", layers: int = 4, attn: str = "sdpa"):
    """A ``LlavaForConditionalGeneration``: CLIP tower 28 px / patch 7 (16 patches + CLS, 3 layers), Llama LM."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=28, patch_size=7, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, pad_token_id=PAD)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                      vision_feature_select_strategy=select, vision_feature_layer=-2)
    cfg._attn_implementation = attn
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None  # random weights: never stop early (batch vs single stay aligned)
    return model


def llava_prompt(text_before: list[int], n_images: int, text_after: list[int], n_tokens: int = 16) -> list[int]:
    ids = list(text_before)
    for _ in range(n_images):
        ids += [IMAGE_TOKEN] * n_tokens + [7]
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
