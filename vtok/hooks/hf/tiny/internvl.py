"""Tiny random-weight ``InternVLForConditionalGeneration`` (family ``internvl``) and its inputs.

Vision tower: InternViT-style, 56 px tiles / 7 px patches (8 x 8 patches + CLS), 3 layers, hidden 32, 4 heads,
features from the last layer (``vision_feature_layer=-1``, CLS dropped), pixel shuffle 0.5: 4 x 4 = 16 tokens per
tile (``IMAGE_SEQ``). Language model: Qwen2, 64 wide, 4 heads (2 key / value heads), 256-token vocabulary.

Inputs as ``InternVLProcessor`` gives them: an image of ``t`` tiles (dynamic tiles, plus a thumbnail when ``t > 1``)
is ``<img>`` (``IMG_START``), ``t * 16`` context tokens (``IMG_CONTEXT``), ``</img>`` (``IMG_END``); its tiles are
consecutive rows of one flat ``pixel_values [sum(t), 3, 56, 56]``, the images of all prompts in order. Tile counts
of ``tiny_inputs``' images are ``TILES`` in turn (3 = 2 tiles + thumbnail, 1 = a single tile, 5 = 4 + thumbnail).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vtok.hooks.hf.tiny import PAD, Runs, register_family

IMG_CONTEXT = 250
IMG_START = 252
IMG_END = 253
TILE = 56
PATCH = 7
IMAGE_SEQ = ((TILE // PATCH) // 2) ** 2  # 16 tokens per tile after the 0.5 pixel shuffle
TILES = (3, 1, 5)  # tiles of tiny_inputs' images, in turn


def build_tiny_internvl(*, layers: int, attn: str, qk_norm: bool = False) -> torch.nn.Module:
    """The tiny InternVL (see the module docstring); ``qk_norm``: RMS-normalised vision queries / keys (InternViT-6B).
    CLS token, position embeddings and vision queries / keys are re-drawn sharper than the zero / 0.02 init, so that
    vision attention rows are no near-ties; the image tokens' output rows are zero, so greedy decoding never emits
    them."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  image_size=[TILE, TILE], patch_size=[PATCH, PATCH], layer_scale_init_value=1.0,
                                  use_qk_norm=qk_norm)
    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, pad_token_id=PAD,
                       bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    cfg = InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMG_CONTEXT,
                         image_seq_length=IMAGE_SEQ, downsample_ratio=0.5, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", tie_word_embeddings=False)
    cfg._attn_implementation = attn
    cfg.text_config._attn_implementation = attn
    model = InternVLForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(1)
    tower = model.model.vision_tower
    with torch.no_grad():
        emb = tower.embeddings
        for p in (emb.cls_token, emb.position_embeddings):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for layer in tower.encoder.layer:
            for lin in (layer.attention.q_proj, layer.attention.k_proj):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.5)
        model.lm_head.weight[[IMG_CONTEXT, IMG_START, IMG_END]] = 0.0  # never generated (uncached steps re-read them)
    return model


def internvl_pixels(tiles: Sequence[int], seed: int = 0) -> torch.Tensor:
    """``pixel_values [sum(tiles), 3, 56, 56]``: random tiles of images of ``tiles`` tiles each, flat, in order."""
    return torch.randn(sum(tiles), 3, TILE, TILE, generator=torch.Generator().manual_seed(seed))


def internvl_run(tiles: int) -> list[int]:
    """The prompt run of one image of ``tiles`` tiles: ``<img>``, ``16 * tiles`` context tokens, ``</img>``."""
    return [IMG_START] + [IMG_CONTEXT] * (IMAGE_SEQ * tiles) + [IMG_END]


def _runs(model: torch.nn.Module, n: int, seed: int) -> Runs:
    tiles = [TILES[i % len(TILES)] for i in range(n)]
    pixels: dict[str, Any] = {"pixel_values": internvl_pixels(tiles, seed)} if n else {}
    return [internvl_run(t) for t in tiles], pixels


register_family("internvl", "InternVLForConditionalGeneration", build_tiny_internvl, _runs)
