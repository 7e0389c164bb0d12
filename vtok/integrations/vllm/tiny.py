"""Tiny random-weight folders that both vLLM (CPU build) and Hugging Face load, for the plugin's tests and benchmark.

``vtok.hooks.hf.tiny`` saves folders in transformers' current layout; vLLM 0.32's LLaVA reads the CLIP tower's
weights as ``vision_tower.vision_model.*``. ``vllm_copy(hf_path, out)`` writes the same checkpoint with those names
(config, tokenizer and processor files copied as they are): the two folders hold the same weights.
``build_tiny_qwen2_5_vl`` and ``build_tiny_qwen3_vl`` write folders both engines read as they are.
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


def _qwen_ids() -> dict[str, int]:
    from vtok.hooks.hf import tiny as t

    return dict(image_token_id=t.QWEN_IMAGE_TOKEN, video_token_id=t.QWEN_VIDEO_TOKEN,
                vision_start_token_id=t.VISION_START, vision_end_token_id=t.VISION_END)


def _save_qwen(cls: type, cfg, processor, path: Path, seed: int) -> Path:
    """The seeded model of ``cfg`` (vision attention sharpened) and ``processor``, saved to ``path``."""
    import torch

    from vtok.hooks.hf import tiny as t

    torch.manual_seed(seed)
    model = t.sharpen_qwen_vision(cls(cfg)).eval()
    model.generation_config.pad_token_id = t.PAD
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_qwen2_5_vl(path: str | Path, *, seed: int = 0, layers: int = 4) -> Path:
    """Create (once) a tiny float32 ``Qwen2_5_VLForConditionalGeneration`` folder that vLLM's CPU build runs: the
    language model of ``vtok.hooks.hf.tiny``'s Qwen shape widened to head size 32 (hidden 128, 4 heads; the CPU
    attention backend takes 32, 64, 80, ...), M-RoPE sections ``[4, 6, 6]``, vocabulary = tokenizer (300); its vision
    tower (depth 3, 56 px windows, full attention in block 1, sharpened attention) and a ``Qwen2_5_VLProcessor``
    resizing images to 56 - 224 px a side (4 to 64 image tokens)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    from vtok.hooks.hf import tiny as t
    from vtok.hooks.hf.tiny.folders import _QWEN_TEMPLATE, qwen_grid, qwen_tokenizer

    path = Path(path)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    tokenizer = qwen_tokenizer()
    grid = qwen_grid(8)
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
    cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **_qwen_ids())
    return _save_qwen(Qwen2_5_VLForConditionalGeneration, cfg, processor, path, seed)


def build_tiny_qwen3_vl(path: str | Path, *, seed: int = 0, layers: int = 4) -> Path:
    """Create (once) a tiny float32 ``Qwen3VLForConditionalGeneration`` folder that vLLM's CPU build runs: the vision
    tower of ``vtok.hooks.hf.tiny``'s Qwen3-VL (depth 3, DeepStack from blocks 0 and 1, sharpened attention), a
    language model of head size 32 (hidden 128, 4 heads, 2 key / value heads, interleaved M-RoPE ``[4, 6, 6]``),
    vocabulary = tokenizer (300), and a ``Qwen3VLProcessor`` resizing images to 56 - 224 px a side."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from vtok.hooks.hf import tiny as t
    from vtok.hooks.hf.tiny.folders import qwen3_vl_processor
    from vtok.hooks.hf.tiny.qwen3_vl import DEEPSTACK

    path = Path(path)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    processor = qwen3_vl_processor(max_side=8)
    mrope = {"mrope_section": [4, 6, 6], "mrope_interleaved": True}
    text = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, vocab_size=len(processor.tokenizer), max_position_embeddings=2048,
                pad_token_id=t.PAD, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **mrope},
                rope_scaling={"rope_type": "default", **mrope})
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=128,
                  patch_size=t.PATCH, spatial_merge_size=t.MERGE, temporal_patch_size=t.TEMPORAL,
                  num_position_embeddings=64, deepstack_visual_indexes=DEEPSTACK)
    cfg = Qwen3VLConfig(vision_config=vision, text_config=text, **_qwen_ids())
    return _save_qwen(Qwen3VLForConditionalGeneration, cfg, processor, path, seed)
