"""Evaluation and benchmarking helpers (synthetic contexts, eval models).

    import vtok.bench
    vit = vtok.bench.load_eval_vit()          # the committed Fashion-MNIST eval ViT (eval mode)
    model, processor = vtok.bench.load_clip_vlm()  # the small LLaVA on the real CLIP ViT-B/16 + SmolLM2-135M
    model, processor = vtok.bench.load_vlm()  # the older one on a 64-token tower trained here
    ctx = vtok.bench.example_context("transprune", tokens)
    clip = vtok.bench.load_tower("clip_b16", library="timm")  # real pretrained CLIP ViT-B/16 (see bench/towers.py)

The names below are loaded on first use, so ``import vtok.bench`` stays cheap (the eval ViT needs timm and
safetensors, the data loader numpy).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "load_eval_vit": "vtok.bench.eval_vit",
    "build_eval_vit": "vtok.bench.eval_vit",
    "save_eval_vit": "vtok.bench.eval_vit",
    "checkpoint_meta": "vtok.bench.eval_vit",
    "load_fashion_mnist": "vtok.bench.fashion_mnist",
    "load_vlm": "vtok.bench.vlm",
    "load_clip_vlm": "vtok.bench.vlm_clip",
    "example_context": "vtok.bench.synthetic",
    "load_tower": "vtok.bench.towers",
    "convert_tower": "vtok.bench.towers",
    "tower_preprocess": "vtok.bench.towers",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    raise AttributeError(f"module 'vtok.bench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
