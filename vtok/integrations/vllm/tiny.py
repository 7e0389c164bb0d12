"""Tiny random-weight folders that both vLLM (CPU build) and Hugging Face load, for the plugin's tests and benchmark.

``vtok.hooks.hf.tiny`` saves folders in transformers' current layout; vLLM 0.32's LLaVA reads the CLIP tower's
weights as ``vision_tower.vision_model.*``. ``vllm_copy(hf_path, out)`` writes the same checkpoint with those names
(config, tokenizer and processor files copied as they are): the two folders hold the same weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def vllm_copy(hf_path: str | Path, out: str | Path) -> Path:
    """Copy the folder ``hf_path`` to ``out`` (once) with the LLaVA tower's weights renamed for vLLM."""
    from safetensors.torch import load_file, save_file

    hf_path, out = Path(hf_path), Path(out)
    if (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in hf_path.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy2(f, out / f.name)
    tensors = load_file(hf_path / "model.safetensors")
    renamed = {}
    for name, t in tensors.items():
        for head in ("vision_tower.", "model.vision_tower."):
            if name.startswith(head) and not name.startswith(head + "vision_model."):
                name = head + "vision_model." + name[len(head):]
                break
        renamed[name] = t.contiguous()
    save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    return out


def tiny_llava_pair(root: str | Path, **opts) -> tuple[Path, Path]:
    """``(hf_folder, vllm_folder)`` of ``build_tiny_llava`` (float32, 576 image tokens, head size 32)."""
    from vtok.hooks.hf.tiny import build_tiny_llava

    root = Path(root)
    hf = build_tiny_llava(root / "hf", **opts)
    return hf, vllm_copy(hf, root / "vllm")


def build_tiny_qwen2_5_vl(path: str | Path, *, seed: int = 0, layers: int = 4) -> Path:
    """Create (once) a tiny float32 ``Qwen2_5_VLForConditionalGeneration`` folder that vLLM's CPU build runs: the
    language model of ``vtok.hooks.hf.tiny``'s Qwen shape widened to head size 32 (hidden 128, 4 heads; the CPU
    attention backend takes 32, 64, 80, ...), M-RoPE sections ``[4, 6, 6]``, vocabulary = tokenizer (300); its vision
    tower (depth 3, 56 px windows, full attention in block 1, sharpened attention) and a ``Qwen2_5_VLProcessor``
    resizing images to 56 - 224 px a side (4 to 64 image tokens)."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    from vtok.hooks.hf import tiny as t
    from vtok.hooks.hf.tiny.folders import _QWEN_TEMPLATE, _qwen_tokenizer_class, _tokenizer

    path = Path(path)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    specials = {t.QWEN_IMAGE_TOKEN: "<|image_pad|>", t.QWEN_VIDEO_TOKEN: "<|video_pad|>",
                t.VISION_START: "<|vision_start|>", t.VISION_END: "<|vision_end|>", 294: "<|im_start|>",
                295: "<|im_end|>"}
    named = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
             "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
    tokenizer = _tokenizer(t.QWEN_VOCAB, specials, named, cls=_qwen_tokenizer_class())
    side = t.PATCH * t.MERGE
    least, most = (2 * side) ** 2, (8 * side) ** 2
    grid = dict(patch_size=t.PATCH, merge_size=t.MERGE, temporal_patch_size=t.TEMPORAL,
                size={"shortest_edge": least, "longest_edge": most}, min_pixels=least, max_pixels=most)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**grid), tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(**grid), chat_template=_QWEN_TEMPLATE)
    mrope = [4, 6, 6]
    text = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048, pad_token_id=t.PAD,
                bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
                rope_scaling={"type": "mrope", "mrope_section": mrope})
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=128, num_heads=2,
                  patch_size=t.PATCH, spatial_merge_size=t.MERGE, temporal_patch_size=t.TEMPORAL, window_size=56,
                  fullatt_block_indexes=[1])
    cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=t.QWEN_IMAGE_TOKEN,
                           video_token_id=t.QWEN_VIDEO_TOKEN, vision_start_token_id=t.VISION_START,
                           vision_end_token_id=t.VISION_END)
    torch.manual_seed(seed)
    model = t.sharpen_qwen_vision(Qwen2_5_VLForConditionalGeneration(cfg)).eval()
    model.generation_config.pad_token_id = t.PAD
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
