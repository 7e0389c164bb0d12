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
