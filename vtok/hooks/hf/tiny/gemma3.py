"""Tiny random-weight Gemma 3 (``Gemma3ForConditionalGeneration``) for tests and demos.

SigLIP tower: 56 px images, 7 px patches (8 x 8 = 64 patches), 3 layers; the projector pools 2 x 2 patches into one
token: 4 x 4 = 16 tokens per image (``mm_tokens_per_image=16``). Gemma 3 language model 64 wide, 4 heads (2 key /
value heads), its layers alternating sliding-window (``window``, default 512: every tiny prompt fits) and full
attention. Prompt runs: ``<start_of_image>``, 16 image tokens, ``<end_of_image>``; ``token_type_ids`` mark the image
tokens (as Gemma 3's processor gives them).
"""

from __future__ import annotations

import torch

from vtok.hooks.hf.tiny import IMAGE_TOKEN, PAD, Runs, register_family

BOI = 252  # <start_of_image>
EOI = 253  # <end_of_image>
IMAGE_SIZE = 56
TOKENS = 16


def build(*, layers: int, attn: str, window: int = 512) -> torch.nn.Module:
    """The tiny model (see the module docstring); ``window``: the sliding window of its local layers."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=512,
                            pad_token_id=PAD, bos_token_id=None, eos_token_id=None, sliding_window=window,
                            query_pre_attn_scalar=16,
                            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                         for i in range(layers)])
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=IMAGE_SIZE, patch_size=7, vision_use_head=False)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=TOKENS,
                       image_token_index=IMAGE_TOKEN, boi_token_index=BOI, eoi_token_index=EOI)
    cfg._attn_implementation = attn
    cfg.text_config._attn_implementation = attn
    model = Gemma3ForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the projection starts at zero: random, so that images differ
        w = model.model.multi_modal_projector.mm_input_projection_weight
        w.copy_(torch.randn(w.shape, generator=g) * 0.5)
    return model


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    """``pixel_values [n, 3, 56, 56]``: random images (or pan-and-scan crops)."""
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def runs(model: torch.nn.Module, n: int, seed: int) -> Runs:
    """Per image ``<start_of_image>`` + 16 image tokens + ``<end_of_image>``, and its pixels."""
    return [[BOI] + [IMAGE_TOKEN] * TOKENS + [EOI] for _ in range(n)], ({"pixel_values": pixels(n, seed)} if n else {})


def token_types(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``token_type_ids [B, L]``: 1 at image tokens."""
    return {"token_type_ids": (ids == IMAGE_TOKEN).long()}


register_family("gemma3", "Gemma3ForConditionalGeneration", build, runs, token_types)
