"""Tiny random-weight Idefics3 and SmolVLM models (families ``idefics3`` and ``smolvlm``) and their inputs.

Shapes: SigLIP-like tower (no CLS) of 56 px crops / 7 px patches (8 x 8 patches), 3 layers, 32 wide, 4 heads, query /
key weights sharpened; pixel shuffle ``scale_factor=2``: 16 placeholder tokens per crop (grid 4 x 4); Llama language
model 64 wide, 4 heads (2 key / value heads), 256-token vocabulary, ``lm_head`` rows of the image-structure tokens
zero (greedy decoding never emits them).

Prompts as the processors write them (``prompt_tokens``): a split image of ``rows x cols`` sub-images is, per row,
``<fake_token_around_image> <row_i_col_j> <image> * 16`` per column then a newline, then ``newline
<fake_token_around_image> <global-img> <image> * 16 <fake_token_around_image>`` (its global view); an unsplit image
only ``<fake_token_around_image> <global-img> <image> * 16 <fake_token_around_image>``. ``tiny_inputs``' images take
the layouts ``SPLITS`` in turn (2 x 2 sub-images + global: 5 crops; unsplit: 1; 1 x 2 + global: 3), and its
``pixel_values [B, max_crops, 3, 56, 56]`` / ``pixel_attention_mask [B, max_crops, 56, 56]`` hold each sample's crops
in prompt order, all-zero padding crops after them (a text-only sample: padding only), as the image processor pads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vtok.hooks.hf.tiny import PAD, Runs, register_family

IMAGE = 250  # <image>
FAKE = 246  # <fake_token_around_image>
GLOBAL = 247  # <global-img>
ROW_COL = 230  # <row_1_col_1>; <row_i_col_j> = ROW_COL + 4 (i - 1) + (j - 1), up to 4 x 4
NEWLINE = 20
CROP = 56
PATCH = 7
SCALE = 2
SEQ = (CROP // PATCH // SCALE) ** 2  # 16 tokens per crop
SPLITS = [(2, 2), (0, 0), (1, 2)]  # (rows, cols) of tiny_inputs' images, in turn; (0, 0): not split

_LAST: dict[str, Any] = {}  # the crops of the last ``_runs`` call, laid out per sample by ``_layout``


def prompt_tokens(rows: int, cols: int) -> list[int]:
    """The token ids of one image of ``rows x cols`` sub-images (``0, 0``: unsplit), as the processor writes it."""
    glob = [FAKE, GLOBAL] + [IMAGE] * SEQ + [FAKE]
    if rows == 0 and cols == 0:
        return glob
    out: list[int] = []
    for i in range(rows):
        for j in range(cols):
            out += [FAKE, ROW_COL + 4 * i + j] + [IMAGE] * SEQ
        out.append(NEWLINE)
    return out + [NEWLINE] + glob


def crops_of(rows: int, cols: int) -> int:
    """Crops of an image of ``rows x cols`` sub-images: those and its global view."""
    return rows * cols + 1


def batch_pixels(per_sample: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``pixel_values [B, max_crops, 3, 56, 56]`` and ``pixel_attention_mask [B, max_crops, 56, 56]`` (long) of each
    sample's crops ``[c_b, 3, 56, 56]``, zero-padded to the largest count as the image processor does."""
    most = max(max((int(p.shape[0]) for p in per_sample), default=0), 1)
    pv = torch.zeros(len(per_sample), most, 3, CROP, CROP)
    mask = torch.zeros(len(per_sample), most, CROP, CROP, dtype=torch.long)
    for b, p in enumerate(per_sample):
        pv[b, :p.shape[0]] = p
        mask[b, :p.shape[0]] = 1
    return {"pixel_values": pv, "pixel_attention_mask": mask}


def _config(cls_name: str, layers: int, attn: str):
    import transformers
    from transformers import LlamaConfig

    prefix = cls_name.removesuffix("ForConditionalGeneration")
    config_cls = getattr(transformers, f"{prefix}Config")
    vision_cls = getattr(transformers.models.smolvlm if prefix == "SmolVLM" else transformers.models.idefics3,
                         f"{prefix}VisionConfig")
    vision = vision_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                        image_size=CROP, patch_size=PATCH)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024, pad_token_id=PAD,
                       bos_token_id=None, eos_token_id=None)
    cfg = config_cls(vision_config=vision, text_config=text, image_token_id=IMAGE, scale_factor=SCALE,
                     pad_token_id=PAD)
    cfg._attn_implementation = attn
    return cfg


def _adjust(model: torch.nn.Module) -> torch.nn.Module:
    """Sharper vision attention than the 0.02 init gives (near-uniform rows make attention scores near-ties), and
    zero ``lm_head`` rows for the image-structure tokens, so that greedy decoding (other logits: some positive) never
    emits an ``<image>`` token (the model would then miss its features)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.vision_model.encoder.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=g) * 0.5)
        model.lm_head.weight[[IMAGE, FAKE, GLOBAL, *range(ROW_COL, ROW_COL + 16)]] = 0.0
    return model


def _build(cls_name: str):
    def build(*, layers: int, attn: str) -> torch.nn.Module:
        import transformers

        return _adjust(getattr(transformers, cls_name)(_config(cls_name, layers, attn)))

    return build


def crops(n_crops: int, seed: int = 0) -> torch.Tensor:
    """``[n_crops, 3, 56, 56]`` random crops (never all zero)."""
    return torch.randn(n_crops, 3, CROP, CROP, generator=torch.Generator().manual_seed(seed))


def _runs(model: torch.nn.Module, n: int, seed: int) -> Runs:
    """The runs of ``n`` images (layouts ``SPLITS`` in turn) and their crops in one row; ``_layout`` then lays the
    crops out per sample from the prompt's ids."""
    splits = [SPLITS[i % len(SPLITS)] for i in range(n)]
    pix = crops(sum(crops_of(*s) for s in splits), seed)
    _LAST.clear()
    if not n:
        return [], {}
    _LAST["crops"] = pix
    return [prompt_tokens(*s) for s in splits], {"pixel_values": pix[None]}


def _layout(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The crops of the last ``_runs`` call per sample of ``ids`` (its ``<image>`` tokens / 16 crops each):
    ``batch_pixels``, the processor's layout."""
    pix = _LAST.pop("crops", None)
    if pix is None:
        return {}
    counts = ((ids == IMAGE).sum(1) // SEQ).tolist()
    if sum(counts) != pix.shape[0]:
        return {}
    return batch_pixels(list(pix.split(counts)))


register_family("idefics3", "Idefics3ForConditionalGeneration", _build("Idefics3ForConditionalGeneration"), _runs,
                _layout)
register_family("smolvlm", "SmolVLMForConditionalGeneration", _build("SmolVLMForConditionalGeneration"), _runs,
                _layout)
